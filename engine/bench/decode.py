"""`gpt2-engine bench`: prefill and decode tokens/s of the engine (fp32/16-bit, int8 and w8a8 weights) against
the eager baseline, transformers' generate, CTranslate2 (fp32 and int8, when installed: extra
`peers`) and llama.cpp (F32, F16 and Q8_0 GGUF, when built: `make llama-cpp`), on the same weights,
with roofline columns; built to survive a noisy machine.

Method. Each system generates `new_tokens` greedy tokens for a batch of random prompts of
`prompt_len` tokens (EOS disabled, so every row decodes the full length). A timestamp is taken
after the prefill and after every decode step (engine: around `LLMEngine.step`; eager baseline:
its per-token callback; transformers: a logits processor, which runs once per step right after
the forward; CTranslate2: its per-token callback of batch row 0, in the worker process it runs in;
llama.cpp: after each step's llama_decode and argmax, in its worker process). One run's decode tokens/s =
batch / median step interval; prefill tokens/s = batch * prompt_len / prefill time. GPU work is
synchronised before each timestamp. One warm-up run per (system, batch) is excluded.

Noise. Every (system, batch) point is run `repeats` times (default 3), interleaved: repeat r runs
every batch size of every system before repeat r + 1 starts, so a burst of load from other
processes hits all systems alike. The table gives the median over repeats with the min-max range;
a system's ratio to a peer is the median of the per-repeat ratios (pair by pair, the two runs of a
pair being neighbours in time); a warning line names every point whose spread (max - min) / median
exceeds 10%.

Roofline: a decode step must read every weight once plus the KV cache of every sequence, so
tokens/s <= batch * bandwidth / (weight bytes + KV bytes at the mid-decode context), with the
weights at 1 byte each for int8 systems. The bandwidth is the machine's read bandwidth, measured
right before every run as a sum over a buffer 4x the last-level cache (CPU) or 1 GiB (GPU) (median
of 3), and each run's roofline share uses its own measurement (the table: the median share). On
CPU that buffer is in transparent huge pages where the OS grants them, like the streaming GEMM's
weights (a torch sum over 4 KiB pages was measured reading only ~0.6x as fast on a 2-core EPYC), and
it is read by the C++ kernels' streaming read (two streams per thread, the probed prefetch distance:
on a 2-core Xeon 1.2x the rate of a torch sum), else by a torch sum: a weak read would flatter every
system's roofline share.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gpt2_engine import cpu_gemm
from gpt2_engine.bench import ctranslate2_peer, llama_cpp_peer
from gpt2_engine.bench.stepping import off_main_thread
from gpt2_engine.api import GPT2
from gpt2_engine.cli_args import add_device_argument, int_at_least
from gpt2_engine.config import PRESETS, GPT2Config
from gpt2_engine.generation import resolve_generate_options
from gpt2_engine.sampling import SamplingParams
from gpt2_engine.weights import load_config
from gpt2_engine.kernels.cpu.stream_gemm import huge_page_empty, stream_read_sum

OUTPUT_FILES = ("results.json", "results.md", "decode_tokens_per_s.png")  # written into --out

SPREAD_WARNING = 0.10
REFERENCE = "transformers generate"


@dataclass
class Measurement:
    system: str
    batch: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float                       # median over repeats
    decode_min: float
    decode_max: float
    decode_spread: float                             # (max - min) / median
    decode_runs: list[float]                         # one per repeat, in run order
    decode_roofline_pct: float                       # median over repeats of each run's share (its own bandwidth)
    decode_step_ms: float
    speedup_vs_transformers: float | None = None     # median of per-repeat ratios
    speedup_vs_ctranslate2: float | None = None      # vs CTranslate2 of the same precision
    speedup_vs_llama_cpp: float | None = None        # vs llama.cpp's counterpart (F32, F16, Q8_0)
    bandwidth_runs: list[float] = field(default_factory=list)   # GB/s measured right before each run


@dataclass
class BenchReport:
    model: str
    weights: str
    device: str
    dtype: str
    prompt_len: int
    new_tokens: int
    repeats: int
    bandwidth_gb_s: float                            # read bandwidth, median over repeats
    bandwidth_runs: list[float]                      # every run's, in run order
    bandwidth_method: str                            # how it was read (ReadBandwidth.method)
    weight_bytes: int
    flops_per_token: int
    timestamp: str
    cpu: dict
    threads: int
    versions: dict
    gemm_paths: dict = field(default_factory=dict)   # CPU torch backend: the probe's choice per layer shape
    results: list[Measurement] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class System:
    label: str
    runner: object
    handle: object
    int8: bool = False
    peer_of: str | None = None    # the CTranslate2 system of the same precision
    llama_cpp_peer_of: str | None = None   # llama.cpp's counterpart system
    dtype: torch.dtype | None = None      # its weights' (None: the run's first --dtype)
    kv_dtype: torch.dtype | None = None   # its KV cache's (None: its weights' dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ReadBandwidth:
    """The machine's read bandwidth in GB/s: a sum over a buffer several times the last-level cache.
    The buffer is allocated and faulted in once; measure() times fresh reads of it (before each run)."""

    def __init__(self, device: torch.device, megabytes: int | None = None):
        if megabytes is None:
            megabytes = 1024 if device.type == "cuda" else max(256, 4 * cpu_gemm.llc_bytes() // 2**20)
        self.device = device
        if device.type == "cpu":   # in huge pages where the OS grants them, as the streaming GEMM's weights are
            self.buffer = huge_page_empty((megabytes * 2**20 // 4,), torch.float32).fill_(1.0)
        else:
            self.buffer = torch.ones(megabytes * 2**20 // 4, device=device)
        # CPU: the buffer read as the streaming GEMM reads weights (two streams per thread, the prefetch
        # distance probed for this machine), where the C++ kernels build: the fastest plain read known here
        self.lib = cpu_gemm.cpu_kernel_library() if device.type == "cpu" else None
        if self.lib is not None:
            cpu_gemm.stream_prefetch_distance()
        self.method = "C++ streaming read" if self.lib is not None else "torch sum"

    def _read(self) -> None:
        if self.lib is not None:
            stream_read_sum(self.buffer, lib=self.lib)
        else:
            self.buffer.sum()

    def measure(self, repeats: int = 3) -> float:
        """Median over `repeats` timed reads, after one untimed."""
        times = []
        for _ in range(repeats + 1):
            _sync(self.device)
            start = time.perf_counter()
            self._read()
            _sync(self.device)
            times.append(time.perf_counter() - start)
        return self.buffer.numel() * 4 / statistics.median(times[1:]) / 1e9


def decode_bytes_per_step(config: GPT2Config, dtype: torch.dtype, batch: int, context: int, *, int8: bool = False,
                          kv_dtype: torch.dtype | None = None) -> int:
    """Weights in `dtype` (LM head tied to wte, read once; 1 byte each when int8) plus the K and V of
    `context` tokens per sequence in kv_dtype (default: dtype; fp32 for 16-bit weights on CPU)."""
    itemsize = torch.finfo(dtype).bits // 8
    kv = 2 * config.n_layer * config.n_embd * context * batch
    return config.num_parameters * (1 if int8 else itemsize) + kv * torch.finfo(kv_dtype or dtype).bits // 8


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
    """Drive the runtime directly: one prefill step for the whole batch, then decode steps, off the
    main thread (bench.stepping)."""
    engine = model.engine
    params = SamplingParams(max_new_tokens=new_tokens, eos_token_ids=())

    def steps():
        clock.begin()
        for row in prompts.tolist():
            engine.add_request(row, params)
        while engine.has_unfinished_requests():
            engine.step()
            clock.stamp()

    off_main_thread(steps)


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


def _engine_system(label: str, engine: GPT2, **fields) -> System:
    model = engine.engine.runner.model
    return System(label, run_engine, engine, dtype=model.weight_dtype, kv_dtype=model.dtype, **fields)


def _systems(args, device, dtypes: list[torch.dtype]) -> tuple[GPT2, list[System], list[str]]:
    """Every system compared in this run (the engine always runs, in each of `dtypes`; int8 and the
    peers run in the first; peers that are not installed are skipped), and notes on how peers run."""
    engine_backend = "triton" if device.type == "cuda" else "torch"
    build = GPT2.from_config if args.model in PRESETS else GPT2.from_pretrained
    build_kwargs = {"seed": args.seed} if build is GPT2.from_config else {}
    runtime = dict(device=device, backend=engine_backend, max_num_batched_tokens=max(args.batch_sizes) * args.prompt_len,
                   decode_kernel=args.decode_kernel)
    engines = {dtype: build(args.model, dtype=dtype, **runtime, **build_kwargs) for dtype in dtypes}
    engine = engines[dtypes[0]]
    ct2 = "ctranslate2" in args.systems and ctranslate2_peer.available()
    skip_llama = llama_cpp_peer.skip_reason(device, engine.config.vocab_size) if "llama.cpp" in args.systems else "not asked for"
    llama = skip_llama is None
    llama_types = []   # llama.cpp's counterparts of the engine's precisions in this run, in order

    def llama_counterpart(gguf_type: str) -> str | None:
        if not llama:
            return None
        llama_types.append(gguf_type) if gguf_type not in llama_types else None
        return f"llama.cpp {gguf_type}"

    systems, notes = [], []
    if "none" in args.quantization:
        for dtype, each in engines.items():
            precision = f" {_DTYPE_LABELS[dtype]}" if len(dtypes) > 1 else ""
            fp32_peer = "CTranslate2 fp32" if ct2 and dtype == torch.float32 else None
            systems.append(_engine_system(f"gpt2-engine{precision} ({engine_backend})", each, peer_of=fp32_peer,
                                          llama_cpp_peer_of=llama_counterpart("F32" if dtype == torch.float32 else "F16")))
    for quantization in ("int8", "w8a8"):
        if quantization in args.quantization:
            systems.append(_engine_system(f"gpt2-engine {quantization} ({engine_backend})",
                                          engine.with_backend(engine_backend, quantization=quantization,
                                                              max_num_batched_tokens=runtime["max_num_batched_tokens"]),
                                          int8=True, peer_of="CTranslate2 int8" if ct2 else None,
                                          llama_cpp_peer_of=llama_counterpart("Q8_0")))
    if "eager" in args.systems:
        systems.append(System("eager baseline", run_eager, engine.with_backend("eager")))
    hf = None
    if "transformers" in args.systems or ct2 or llama:
        try:
            hf = build_hf_model(engine, compiled=False)
        except ImportError:
            print("transformers is not installed: skipping its rows (and CTranslate2's conversion)")
    if hf is not None and "transformers" in args.systems:
        systems.append(System(REFERENCE, run_transformers, hf))
        if device.type == "cuda":
            systems.append(System("transformers static+compile", run_transformers, build_hf_model(engine, compiled=True)))
    if "ctranslate2" in args.systems and not ct2:
        print("ctranslate2 is not installed (pip install 'gpt2-engine[peers]'): skipping its rows")
    if ct2 and hf is not None:
        for quantization, int8 in (("float32", False), ("int8", True)):
            peer = ctranslate2_peer.CTranslate2Peer(hf, quantization, device)
            systems.append(System(f"CTranslate2 {'int8' if int8 else 'fp32'}", ctranslate2_peer.run_ctranslate2, peer, int8=int8))
    if "llama.cpp" in args.systems and skip_llama:
        print(f"{skip_llama}: skipping llama.cpp's rows")
    if llama and hf is not None:
        with tempfile.TemporaryDirectory(prefix="gpt2-engine-gguf-") as workdir:   # the GGUF files: loaded, then not needed
            for gguf_type in llama_types:
                peer = llama_cpp_peer.LlamaCppPeer(hf, gguf_type, max_batch=max(args.batch_sizes),
                                                   max_tokens=args.prompt_len + args.new_tokens, workdir=Path(workdir))
                systems.append(System(f"llama.cpp {gguf_type}", llama_cpp_peer.run_llama_cpp, peer, int8=gguf_type == "Q8_0",
                                      dtype=torch.float32 if gguf_type == "F32" else torch.float16))
                notes += [peer.note] if peer.note else []
    return engine, systems, notes


def _cpu_info() -> dict:
    flags = ""
    try:
        flags = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.split(":")[0].strip() in ("flags", "Features")), "")
    except OSError:
        pass
    return {"signature": cpu_gemm.cpu_signature(), "machine": platform.machine(), "flags": flags,
            "torch_capability": torch.backends.cpu.get_cpu_capability(), "llc_bytes": cpu_gemm.llc_bytes()}


def _paired_ratio(runs: list[float], reference: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(runs, reference))


def _progress(message: str) -> None:
    print(f"gpt2-engine bench: {message}", file=sys.stderr, flush=True)


def run_bench(args) -> tuple[BenchReport, GPT2Config, torch.dtype]:
    from tqdm import tqdm

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = _dtypes(args, device)
    dtype = dtypes[0]
    torch.manual_seed(args.seed)
    _progress(f"loading {args.model} for {', '.join(args.systems)} on {device} ({', '.join(map(str, dtypes))}); on the "
              "CPU the torch backend also times its GEMM paths per layer shape")
    read_bandwidth = ReadBandwidth(device)   # first: on a GPU the engines size their KV caches by what is left
    engine, systems, notes = _systems(args, device, dtypes)
    config = engine.config
    context = args.prompt_len + args.new_tokens // 2
    report = BenchReport(
        model=args.model, weights=engine.source,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu_gemm.cpu_signature()}, {torch.get_num_threads()} threads)",
        dtype=", ".join(str(d).removeprefix("torch.") for d in dtypes), prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
        bandwidth_gb_s=0.0, bandwidth_runs=[], bandwidth_method=read_bandwidth.method, weight_bytes=decode_bytes_per_step(config, dtype, 0, 0),
        flops_per_token=flops_per_token(config, context), timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        cpu=_cpu_info(), threads=torch.get_num_threads(), versions=_versions(), gemm_paths=cpu_gemm.chosen_paths(),
        warnings=notes,
    )
    clock = StepClock(device)
    prompts = {b: torch.randint(0, config.vocab_size, (b, args.prompt_len)) for b in args.batch_sizes}
    for system in systems:   # warm-up at every batch size: weights faulted in, kernels compiled / primitives built
        _progress(f"warming up {system.label} (batch sizes {' '.join(map(str, args.batch_sizes))}: kernels compiled, "
                  "weights faulted in)")
        for b in args.batch_sizes:
            system.runner(system.handle, prompts[b], 2, clock)
    # per (system, batch), one entry per repeat: prefill tok/s, decode tok/s, read bandwidth just before the run
    runs = {(s.label, b): ([], [], []) for s in systems for b in args.batch_sizes}
    grid = [(r, b, s) for r in range(args.repeats) for b in args.batch_sizes for s in systems]
    bar = tqdm(grid, desc="bench", unit="run")
    for r, b, system in bar:
        prefill, decode, bandwidth = runs[(system.label, b)]
        bandwidth.append(read_bandwidth.measure())
        report.bandwidth_runs.append(bandwidth[-1])
        bar.set_description(f"{system.label}, batch {b}, repeat {r + 1}/{args.repeats}")
        system.runner(system.handle, prompts[b], args.new_tokens, clock)
        prefill.append(b * args.prompt_len / clock.prefill_seconds())
        decode.append(b / statistics.median(clock.step_intervals()))
    report.bandwidth_gb_s = statistics.median(report.bandwidth_runs)
    for b in args.batch_sizes:
        for system in systems:
            prefill, decode, bandwidth = runs[(system.label, b)]
            median = statistics.median(decode)
            step_bytes = decode_bytes_per_step(config, system.dtype or dtype, b, context, int8=system.int8,
                                               kv_dtype=system.kv_dtype)
            roofline_pct = statistics.median(100 * tok_s * step_bytes / (b * gb_s * 1e9) for tok_s, gb_s in zip(decode, bandwidth))
            m = Measurement(system.label, b, statistics.median(prefill), median, min(decode), max(decode),
                            (max(decode) - min(decode)) / median, decode, roofline_pct, 1e3 * b / median,
                            bandwidth_runs=bandwidth)
            if (REFERENCE, b) in runs and system.label != REFERENCE:
                m.speedup_vs_transformers = _paired_ratio(decode, runs[(REFERENCE, b)][1])
            if system.peer_of is not None:
                m.speedup_vs_ctranslate2 = _paired_ratio(decode, runs[(system.peer_of, b)][1])
            if system.llama_cpp_peer_of is not None:
                m.speedup_vs_llama_cpp = _paired_ratio(decode, runs[(system.llama_cpp_peer_of, b)][1])
            report.results.append(m)
            if m.decode_spread > SPREAD_WARNING:
                report.warnings.append(f"warning: {system.label} at batch {b}: decode tok/s spread {100 * m.decode_spread:.0f}% "
                                       f"over {args.repeats} repeats ({m.decode_min:,.1f} .. {m.decode_max:,.1f}): the machine was noisy")
    spread = (max(report.bandwidth_runs) - min(report.bandwidth_runs)) / report.bandwidth_gb_s
    if spread > SPREAD_WARNING:
        report.warnings.append(f"warning: read bandwidth spread {100 * spread:.0f}% over the repeats "
                               f"({min(report.bandwidth_runs):.1f} .. {max(report.bandwidth_runs):.1f} GB/s)")
    return report, config, dtype


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "triton", "transformers", "ctranslate2", "llama_cpp_python", "gpt2-engine"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _ratio(x: float | None) -> str:
    return f"{x:.2f}x" if x is not None else "-"


def format_markdown(report: BenchReport) -> str:
    lines = [
        f"# gpt2-engine bench: {report.model} ({report.weights})",
        "",
        f"device {report.device}, {report.dtype}, prompt {report.prompt_len}, {report.new_tokens} new tokens, "
        f"{report.repeats} interleaved repeats (median, min-max), read bandwidth {report.bandwidth_gb_s:.1f} GB/s "
        f"({report.bandwidth_method}), "
        f"weights {report.weight_bytes / 1e6:.0f} MB, {report.timestamp}",
        "",
        "| system | batch | prefill tok/s | decode tok/s | min-max | spread | decode step ms | % of bandwidth roofline "
        "| vs transformers | vs CTranslate2 (same precision) | vs llama.cpp (F32 / F16 / Q8_0) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in report.results:
        lines.append(f"| {m.system} | {m.batch} | {m.prefill_tokens_per_s:,.0f} | {m.decode_tokens_per_s:,.1f} | "
                     f"{m.decode_min:,.1f}-{m.decode_max:,.1f} | {100 * m.decode_spread:.0f}% | {m.decode_step_ms:.2f} | "
                     f"{m.decode_roofline_pct:.1f}% | {_ratio(m.speedup_vs_transformers)} | {_ratio(m.speedup_vs_ctranslate2)} | "
                     f"{_ratio(m.speedup_vs_llama_cpp)} |")
    return "\n".join(lines + [""] + report.warnings) + "\n"


def offset_batches(batches: list[int], index: int, count: int, spread: float = 0.15) -> list[float]:
    """The x positions of system `index` of `count`: each batch size nudged sideways (on the plot's
    log2 axis, within +-spread/2 of an octave) so that the systems' min-max bars stand side by side."""
    shift = 0.0 if count == 1 else spread * (index / (count - 1) - 0.5)
    return [b * 2 ** shift for b in batches]


def save_plot(report: BenchReport, path: Path, config: GPT2Config, dtype: torch.dtype) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({m.batch for m in report.results})
    context = report.prompt_len + report.new_tokens // 2
    fig, ax = plt.subplots(figsize=(7, 4.5))
    systems = list(dict.fromkeys(m.system for m in report.results))
    for i, system in enumerate(systems):
        rows = [m for m in report.results if m.system == system]
        ax.errorbar(offset_batches([m.batch for m in rows], i, len(systems)), [m.decode_tokens_per_s for m in rows],
                    marker="o", capsize=3, label=system,
                    yerr=[[m.decode_tokens_per_s - m.decode_min for m in rows], [m.decode_max - m.decode_tokens_per_s for m in rows]])
    for int8, style in ((False, "--"), (True, ":")):
        roof = [b * report.bandwidth_gb_s * 1e9 / decode_bytes_per_step(config, dtype, b, context, int8=int8) for b in batches]
        weights = "int8" if int8 else str(dtype).removeprefix("torch.")
        ax.plot(batches, roof, style, color="gray", label=f"roofline ({weights} weights)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s (median, min-max)")
    ax.set_title(f"{report.model}, {report.dtype}, {report.device}\n{report.weights}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SYSTEMS = ("engine", "eager", "transformers", "ctranslate2", "llama.cpp")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_LABELS = {dtype: name for name, dtype in _DTYPES.items()}


def _dtypes(args, device: torch.device) -> list[torch.dtype]:
    """--dtype's dtypes in order, each once (default: fp16 on GPU, fp32 on CPU)."""
    names = args.dtype or ["fp16" if device.type == "cuda" else "fp32"]
    return [_DTYPES[name] for name in dict.fromkeys(names)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="gpt2", help="a preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl: seeded random "
                        "weights of that shape) or a checkpoint directory / hub id (default: gpt2)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 1 8 (GPU: 1 8 32 64 128 256)")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per sequence (default 128)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens generated per sequence (default 32; GPU 128)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed runs per point (default 3)")
    parser.add_argument("--systems", nargs="+", default=None, choices=SYSTEMS,
                        help="what to compare (the engine always runs; default: all but the eager baseline on CPU, all on GPU)")
    parser.add_argument("--quantization", nargs="+", default=["none", "int8"], choices=["none", "int8", "w8a8"],
                        help="the engine's precisions to run: none (the compute dtype), int8 (weight-only) and/or w8a8 "
                             "(int8 weights and activations; CPU) (default: none int8)")
    add_device_argument(parser)
    parser.add_argument("--dtype", nargs="+", choices=list(_DTYPES), default=None,
                        help="the engine's weight dtypes to run side by side (int8 and the peers run in the first; on "
                             "CPU bf16 / fp16 weights are streamed with fp32 arithmetic); default: fp16 on GPU, fp32 on CPU")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")
    parser.add_argument("--decode-kernel", choices=["graphs", "persistent"], default="graphs",
                        help="decode step on the triton backend: graphs (multi-launch, CUDA graphs; default) or persistent (one launch for "
                        "decode-only steps of <= 16 rows; opt-in until verified on a GPU)")
    parser.add_argument("--out", default="bench-results", help="directory for results.json, results.md, decode_tokens_per_s.png")
    parser.add_argument("--speculative", type=int_at_least(1), default=None, metavar="K",
                        help="instead: plain greedy decoding against speculative decoding drafting K tokens (int8 "
                             "self-drafting, n-gram lookup, a separate draft model) on --model; writes "
                             "speculative.json and speculative.md")
    parser.add_argument("--speculative-methods", nargs="+", default=["int8", "ngram", "draft"],
                        choices=["int8", "ngram", "draft"],
                        help="the speculative rows (default all): int8 self-drafting, n-gram lookup, a separate draft model")


def _check_arguments(args) -> None:
    if args.batch_sizes is not None and min(args.batch_sizes) < 1:
        raise ValueError(f"--batch-sizes must be positive, got {args.batch_sizes}")
    if args.prompt_len < 1:
        raise ValueError(f"--prompt-len must be positive, got {args.prompt_len}")
    if args.new_tokens < 3:
        raise ValueError(f"--new-tokens must be at least 3 (decode speed is timed between steps), got {args.new_tokens}")
    if args.repeats < 1:
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


def _speculative_main(args, on_gpu: bool) -> int:
    from gpt2_engine.bench import speculative

    device = torch.device(args.device or ("cuda" if on_gpu else "cpu"))
    dtypes = _dtypes(args, device)
    if len(dtypes) > 1:
        raise ValueError(f"--speculative runs in one --dtype, got {' '.join(args.dtype)}")
    report = speculative.run(args, device, dtypes[0])
    out = Path(args.out)
    (out / "speculative.json").write_text(json.dumps(asdict(report), indent=2))
    markdown = speculative.format_markdown(report)
    (out / "speculative.md").write_text(markdown)
    print("\n" + markdown)
    print(f"wrote {out / 'speculative.json'}, {out / 'speculative.md'}")
    return 0


def main(args) -> int:
    on_gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if args.new_tokens is None:
        args.new_tokens = 128 if on_gpu else 32
    _check_arguments(args)
    args.batch_sizes = sorted(set(args.batch_sizes or ([1, 8, 32, 64, 128, 256] if on_gpu else [1, 8])))
    if args.speculative is not None:
        return _speculative_main(args, on_gpu)
    args.systems = args.systems or [s for s in SYSTEMS if on_gpu or s != "eager"]
    report, config, dtype = run_bench(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(asdict(report), indent=2))
    markdown = format_markdown(report)
    (out / "results.md").write_text(markdown)
    save_plot(report, out / "decode_tokens_per_s.png", config, dtype)
    print("\n" + markdown)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'decode_tokens_per_s.png'}")
    return 0
