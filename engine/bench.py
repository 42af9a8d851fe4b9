"""`gpt2-engine bench`: prefill and decode tokens/s of the engine against the eager baseline and
transformers' generate, on the same weights, with roofline columns.

Method. Each system generates `new_tokens` greedy tokens for a batch of random prompts of
`prompt_len` tokens (EOS disabled, so every row decodes the full length). A timestamp is taken
after the prefill and after every decode step (engine: around `LLMEngine.step`; eager baseline:
its per-token callback; transformers: a logits processor, which runs once per step right after
the forward). Prefill tokens/s = batch * prompt_len / prefill time (median over repeats); decode
tokens/s = batch / median step interval. GPU work is synchronised before each timestamp.
One warm-up run per system (compiles kernels, fills caches) is excluded.

Roofline: a decode step must read every weight once plus the KV cache of every sequence, so
tokens/s <= batch * bandwidth / (weight bytes + KV bytes at the mid-decode context); the
bandwidth is measured once per run with a large device copy (read + write bytes).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from engine.api import GPT2
from engine.cli import add_device_argument
from engine.config import PRESETS, GPT2Config
from engine.generation import resolve_generate_options
from engine.sampling import SamplingParams
from engine.weights import load_config

OUTPUT_FILES = ("results.json", "results.md", "decode_tokens_per_s.png")  # written into --out


@dataclass
class Measurement:
    system: str
    batch: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    decode_roofline_pct: float
    decode_step_ms: float
    speedup_vs_transformers: float | None = None


@dataclass
class BenchReport:
    model: str
    weights: str
    device: str
    dtype: str
    prompt_len: int
    new_tokens: int
    bandwidth_gb_s: float
    weight_bytes: int
    flops_per_token: int
    versions: dict
    results: list[Measurement] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device: torch.device, megabytes: int = 256, repeats: int = 5) -> float:
    """Device copy bandwidth in GB/s, counting bytes read plus bytes written (median of repeats)."""
    src = torch.randn(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times[1:]) / 1e9


def decode_bytes_per_step(config: GPT2Config, dtype: torch.dtype, batch: int, context: int) -> int:
    """Weights (LM head tied to wte, read once) plus the K and V of `context` tokens per sequence."""
    itemsize = torch.finfo(dtype).bits // 8
    kv = 2 * config.n_layer * config.n_embd * context * batch
    return (config.num_parameters + kv) * itemsize


def flops_per_token(config: GPT2Config, context: int) -> int:
    """2 FLOPs per weight multiply-add (embedding lookups excluded, LM head included) + attention."""
    matmul_params = config.num_parameters - config.n_positions * config.n_embd
    attention = 2 * 2 * config.n_layer * context * config.n_embd
    return 2 * matmul_params + attention


class StepClock:
    """Timestamps taken after each generated step; also usable as a transformers logits processor."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = 0.0
        self.stamps: list[float] = []

    def begin(self) -> None:
        _sync(self.device)
        self.stamps = []
        self.start = time.perf_counter()

    def stamp(self) -> None:
        _sync(self.device)
        self.stamps.append(time.perf_counter())

    def __call__(self, input_ids, scores):  # transformers LogitsProcessor protocol
        self.stamp()
        return scores

    def prefill_seconds(self) -> float:
        return self.stamps[0] - self.start

    def step_intervals(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def run_engine(model: GPT2, prompts: torch.Tensor, new_tokens: int, clock: StepClock) -> None:
    """Drive the runtime directly: one prefill step for the whole batch, then decode steps."""
    engine = model.engine
    params = SamplingParams(max_new_tokens=new_tokens, eos_token_ids=())
    clock.begin()
    for row in prompts.tolist():
        engine.add_request(row, params)
    while engine.has_unfinished_requests():
        engine.step()
        clock.stamp()


def run_eager(model: GPT2, prompts: torch.Tensor, new_tokens: int, clock: StepClock) -> None:
    options = resolve_generate_options(model.config, prompts.shape[1], max_new_tokens=new_tokens, eos_token_id=[], pad_token_id=0)
    clock.begin()
    model._generate_tokens(prompts.tolist(), options, on_token=lambda row, token: row == 0 and clock.stamp())


def run_transformers(hf_model, prompts: torch.Tensor, new_tokens: int, clock: StepClock) -> None:
    from transformers import LogitsProcessorList

    ids = prompts.to(hf_model.device)
    clock.begin()
    with torch.inference_mode():
        hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([clock]))


def build_hf_model(model: GPT2, compiled: bool):
    """transformers' GPT2LMHeadModel on the same weights (copied into HF's module)."""
    import transformers

    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**model.config.to_hf_dict()))
    weights = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing, unexpected = hf.transformer.load_state_dict(weights, strict=False)
    if unexpected or any(not k.endswith((".attn.bias", ".attn.masked_bias")) for k in missing):
        raise RuntimeError(f"could not load weights into transformers: missing {missing}, unexpected {unexpected}")
    hf = hf.to(device=model.device, dtype=model.dtype).eval()
    if compiled:  # transformers' fastest documented path: static cache + torch.compile
        hf.generation_config.cache_implementation = "static"
        hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
    return hf


def _systems(model_name: str, args, device, dtype):
    """(label, runner, handle) for every system compared in this run."""
    engine_backend = "triton" if device.type == "cuda" else "torch"
    build = GPT2.from_config if model_name in PRESETS else GPT2.from_pretrained
    build_kwargs = {"seed": args.seed} if build is GPT2.from_config else {}
    engine = build(model_name, device=device, dtype=dtype, backend=engine_backend,
                   max_num_batched_tokens=max(args.batch_sizes) * args.prompt_len, **build_kwargs)
    systems = [(f"gpt2-engine ({engine_backend})", run_engine, engine)]
    if "eager" in args.systems:
        systems.append(("eager baseline", run_eager, engine.with_backend("eager")))
    if "transformers" in args.systems:
        try:
            systems.append(("transformers generate", run_transformers, build_hf_model(engine, compiled=False)))
            if device.type == "cuda":
                systems.append(("transformers static+compile", run_transformers, build_hf_model(engine, compiled=True)))
        except ImportError:
            print("transformers is not installed: skipping its rows")
    return engine, systems


def run_bench(args) -> BenchReport:
    from tqdm import tqdm

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    torch.manual_seed(args.seed)
    engine, systems = _systems(args.model, args, device, dtype)
    config = engine.config
    context = args.prompt_len + args.new_tokens // 2
    report = BenchReport(
        model=args.model, weights=engine.source, device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        dtype=str(dtype).removeprefix("torch."), prompt_len=args.prompt_len, new_tokens=args.new_tokens,
        bandwidth_gb_s=measure_bandwidth(device), weight_bytes=decode_bytes_per_step(config, dtype, 0, 0),
        flops_per_token=flops_per_token(config, context), versions=_versions(),
    )
    clock = StepClock(device)
    grid = [(s, b) for b in args.batch_sizes for s in systems]
    for (label, runner, handle) in systems:  # warm-up: fault in weights, compile kernels
        runner(handle, torch.randint(0, config.vocab_size, (1, args.prompt_len)), 2, clock)
    for (label, runner, handle), batch in tqdm(grid, desc="bench", unit="run"):
        prompts = torch.randint(0, config.vocab_size, (batch, args.prompt_len))
        if device.type == "cuda":  # kernels specialise per batch size (and torch.compile recompiles)
            runner(handle, prompts, 2, clock)
        prefill, steps = [], []
        for _ in range(args.repeats):
            runner(handle, prompts, args.new_tokens, clock)
            prefill.append(clock.prefill_seconds())
            steps.extend(clock.step_intervals())
        step = statistics.median(steps)
        roofline = batch * report.bandwidth_gb_s * 1e9 / decode_bytes_per_step(config, dtype, batch, context)
        report.results.append(Measurement(label, batch, batch * args.prompt_len / statistics.median(prefill),
                                          batch / step, 100 * (batch / step) / roofline, 1e3 * step))
    for m in report.results:
        reference = next((r for r in report.results if r.system == "transformers generate" and r.batch == m.batch), None)
        if reference is not None:
            m.speedup_vs_transformers = m.decode_tokens_per_s / reference.decode_tokens_per_s
    return report


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "triton", "transformers", "gpt2-engine"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def format_markdown(report: BenchReport) -> str:
    lines = [
        f"# gpt2-engine bench: {report.model} ({report.weights})",
        "",
        f"device {report.device}, {report.dtype}, prompt {report.prompt_len}, {report.new_tokens} new tokens, "
        f"measured bandwidth {report.bandwidth_gb_s:.1f} GB/s, weights {report.weight_bytes / 1e6:.0f} MB",
        "",
        "| system | batch | prefill tok/s | decode tok/s | decode step ms | % of bandwidth roofline | vs transformers |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in report.results:
        speedup = f"{m.speedup_vs_transformers:.2f}x" if m.speedup_vs_transformers is not None else "-"
        lines.append(f"| {m.system} | {m.batch} | {m.prefill_tokens_per_s:,.0f} | {m.decode_tokens_per_s:,.1f} | "
                     f"{m.decode_step_ms:.2f} | {m.decode_roofline_pct:.1f}% | {speedup} |")
    return "\n".join(lines) + "\n"


def save_plot(report: BenchReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system in dict.fromkeys(m.system for m in report.results):
        rows = [m for m in report.results if m.system == system]
        ax.plot([m.batch for m in rows], [m.decode_tokens_per_s for m in rows], marker="o", label=system)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{report.model}, {report.dtype}, {report.device}\n{report.weights}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="gpt2", help="a preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl: seeded random "
                        "weights of that shape) or a checkpoint directory / hub id (default: gpt2)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 1 8 32 (GPU: up to 256)")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per sequence (default 128)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sequence (default 128)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per point (default: 1 on CPU, 3 on GPU)")
    parser.add_argument("--systems", nargs="+", default=["engine", "eager", "transformers"],
                        choices=["engine", "eager", "transformers"], help="what to compare (the engine always runs)")
    add_device_argument(parser)
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default: fp16 on GPU, fp32 on CPU")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")
    parser.add_argument("--out", default="bench-results", help="directory for results.json, results.md, decode_tokens_per_s.png")


def _check_arguments(args) -> None:
    if args.batch_sizes is not None and min(args.batch_sizes) < 1:
        raise ValueError(f"--batch-sizes must be positive, got {args.batch_sizes}")
    if args.prompt_len < 1:
        raise ValueError(f"--prompt-len must be positive, got {args.prompt_len}")
    if args.new_tokens < 3:
        raise ValueError(f"--new-tokens must be at least 3 (decode speed is timed between steps), got {args.new_tokens}")
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be positive, got {args.repeats}")
    config = GPT2Config.preset(args.model) if args.model in PRESETS else load_config(args.model)
    if args.prompt_len + args.new_tokens > config.n_positions:
        raise ValueError(f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} tokens is beyond the context "
                         f"of {args.model} (n_positions={config.n_positions})")
    _check_out(Path(args.out))


def _check_out(out: Path) -> None:
    """--out must be a directory (created now if missing) that the result files can be written into."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise ValueError(f"--out {out} is not a writable directory: {exc.strerror or exc}") from exc
    for name in OUTPUT_FILES:
        path = out / name
        if path.exists() and (path.is_dir() or not os.access(path, os.W_OK)):
            raise ValueError(f"--out {out}: {name} exists and cannot be overwritten")


def main(args) -> int:
    _check_arguments(args)
    on_gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    args.batch_sizes = args.batch_sizes or ([1, 8, 32, 64, 128, 256] if on_gpu else [1, 8, 32])
    args.repeats = args.repeats or (3 if on_gpu else 1)
    report = run_bench(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(asdict(report), indent=2))
    markdown = format_markdown(report)
    (out / "results.md").write_text(markdown)
    save_plot(report, out / "decode_tokens_per_s.png")
    print("\n" + markdown)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'decode_tokens_per_s.png'}")
    return 0
