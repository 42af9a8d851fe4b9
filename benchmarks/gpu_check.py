"""One-shot check of a machine with a CUDA GPU: correctness, kernel speed and end-to-end decode.

    python3 -m benchmarks.gpu_check --out DIR        (or `make gpu-check OUT=DIR`)
    python3 -m benchmarks.gpu_check --out DIR --dry-run   (CPU: tiny sizes, Triton's interpreter)

It uses the machine's installed python3 and packages (torch >= 2.4, triton >= 3.2, transformers;
no installs, no network; optional APIs are guarded) and is sized to finish in about 8 minutes on
an H100/H200 (`--budget-s`; sections past the budget are recorded as skipped, never silently left
out). Sections:

    tests      the cuda-marked tests (pytest -m cuda tests)
    copy       device copy bandwidth (read + write bytes): the reference for every "% of copy"
    flash      flash_attention TFLOP/s at S = 1k/2k/4k, D = 64, causal, against torch SDPA
    paged      paged_decode_attention GB/s at batch 32/64/128, context 1k/4k: shuffled block
               tables (paged) against an identity table over the same pool (contiguous)
    gemm       decode ln_linear GB/s of weight bytes at M = 1/16/64/256 against torch (cuBLAS)
    launch     launch-plan cache + direct compiled launch: bit-identical to the JIT launch
    e2e        decode tokens/s of GPT-2 small/medium/xl fp16 at batch 1/8/64 (engine through the
               public API: GPT2.from_config(..., backend="triton").generate) against transformers
               eager and transformers static cache + torch.compile, each with the per-step weight
               bytes as % of copy bandwidth; decode time = difference of two generate lengths
    graphs     the engine's CUDA-graph decode is token-identical to its graph-less decode
    bf16       bf16 logits parity: |engine bf16 - fp32 ref| <= 2 |transformers bf16 - fp32 ref| + floor

Writes DIR/results.json (every row, plus versions and the device) and DIR/results.md, and prints
a table of at most 40 lines last. Exit status 1 when a correctness row fails.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_TABLE_LINES = 40


class Check:
    """Collects rows and keeps the time budget."""

    def __init__(self, dry: bool, budget_s: float):
        self.dry, self.deadline, self.rows = dry, time.monotonic() + budget_s, []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, section, name, value=None, unit="", *, reference=None, ref_name="", status="ok", note=""):
        self.rows.append(dict(section=section, name=name, value=value, unit=unit, reference=reference,
                              ref_name=ref_name, status=status, note=note))

    def run(self, section, fn):
        """Run one section; an exception becomes an 'error' row (the other sections still run)."""
        if self.left() <= 0:
            self.add(section, "(section)", status="skipped", note="time budget spent")
            return
        try:
            fn(self)
        except Exception as exc:  # a broken section must not hide the others
            self.add(section, "(section)", status="error", note=f"{type(exc).__name__}: {str(exc)[:160]}")


# ---- timing -------------------------------------------------------------------------------------

def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, *, warmup=2, iters=10) -> float:
    """Median seconds per call (device work synchronised)."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---- sections -----------------------------------------------------------------------------------

def section_tests(chk: Check):
    if chk.dry:
        chk.add("tests", "cuda-marked tests", status="skipped", note="dry run (no GPU)")
        return
    try:
        import pytest  # noqa: F401
    except ImportError:
        chk.add("tests", "cuda-marked tests", status="skipped", note="pytest is not installed")
        return
    timeout = max(30, min(240, chk.left() - 200))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    chk.add("tests", "cuda-marked tests", status="ok" if proc.returncode == 0 else "FAIL", note=last[:120])


def section_copy(chk: Check):
    import torch

    mb = 8 if chk.dry else 1024
    src = torch.randn(mb * 2**20 // 4, device=chk.device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), iters=3 if chk.dry else 10)
    chk.copy_gbps = 2 * src.numel() * 4 / seconds / 1e9
    chk.add("copy", "device copy", chk.copy_gbps, "GB/s")


def section_flash(chk: Check):
    import torch
    import torch.nn.functional as F

    from kernels import flash_attention

    heads, dim = (2, 64) if chk.dry else (16, 64)
    for seqlen in ((64,) if chk.dry else (1024, 2048, 4096)):
        batch = 1 if chk.dry else max(1, 16384 // seqlen)
        q, k, v = (torch.randn(batch, seqlen, heads, dim, device=chk.device, dtype=chk.dtype) for _ in range(3))
        flops = 4 * batch * heads * seqlen * seqlen * dim / 2          # causal: half of QK^T and PV
        t_ours = timed(lambda: flash_attention(q, k, v), iters=2 if chk.dry else 10)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        t_sdpa = timed(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True), iters=2 if chk.dry else 10)
        chk.add("flash", f"S={seqlen} D={dim} B={batch} H={heads}", flops / t_ours / 1e12, "TFLOP/s",
                reference=flops / t_sdpa / 1e12, ref_name="torch SDPA")


def section_paged(chk: Check):
    import torch

    from kernels import paged_decode_attention

    heads, dim, block = (2, 64, 16) if chk.dry else (12, 64, 16)
    cases = [(2, 64)] if chk.dry else [(b, c) for c in (1024, 4096) for b in (32, 64, 128)]
    for batch, ctx in cases:
        blocks = ctx // block
        pool = batch * blocks
        k_cache = torch.randn(pool, block, heads, dim, device=chk.device, dtype=chk.dtype)
        v_cache = torch.randn_like(k_cache)
        q = torch.randn(batch, heads, dim, device=chk.device, dtype=chk.dtype)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=chk.device)
        identity = torch.arange(pool, dtype=torch.int32, device=chk.device).view(batch, blocks)
        shuffled = torch.randperm(pool, device=chk.device).to(torch.int32).view(batch, blocks)
        kv_bytes = 2 * batch * ctx * heads * dim * k_cache.element_size()
        iters = 2 if chk.dry else 20
        t_paged = timed(lambda: paged_decode_attention(q, k_cache, v_cache, shuffled, lens), iters=iters)
        t_contig = timed(lambda: paged_decode_attention(q, k_cache, v_cache, identity, lens), iters=iters)
        chk.add("paged", f"B={batch} ctx={ctx}", kv_bytes / t_paged / 1e9, "GB/s",
                reference=kv_bytes / t_contig / 1e9, ref_name="contiguous")


def section_gemm(chk: Check):
    import torch
    import torch.nn.functional as F

    from kernels import ln_linear
    from kernels.fused_linear import fold_layernorm

    shapes = [("tiny c_fc", 64, 256)] if chk.dry else [("gpt2 c_fc", 768, 3072), ("gpt2-xl mlp.c_proj", 6400, 1600)]
    for label, K, N in shapes:
        w = torch.randn(K, N, device=chk.device, dtype=chk.dtype) / K ** 0.5
        gamma, beta, bias = (torch.randn(n, device=chk.device, dtype=chk.dtype) for n in (K, K, N))
        folded = fold_layernorm(gamma, beta, w, bias)
        w_nk = w.t().contiguous()
        for M in ((1, 16) if chk.dry else (1, 16, 64, 256)):
            x = torch.randn(M, K, device=chk.device, dtype=chk.dtype)
            iters = 2 if chk.dry else 50
            t_ours = timed(lambda: ln_linear(x, None, None, folded, None), iters=iters)
            t_torch = timed(lambda: F.linear(F.layer_norm(x, (K,), gamma, beta), w_nk, bias), iters=iters)
            nbytes = K * N * w.element_size()
            chk.add("gemm", f"{label} M={M}", nbytes / t_ours / 1e9, "GB/s", reference=nbytes / t_torch / 1e9,
                    ref_name="torch LN+linear")


def section_launch(chk: Check):
    import torch

    from kernels import launching, ln_linear

    K, N = (64, 96) if chk.dry else (768, 2304)
    x = torch.randn(3, K, device=chk.device, dtype=chk.dtype)
    w = torch.randn(K, N, device=chk.device, dtype=chk.dtype)
    g, b = torch.ones(K, device=chk.device), torch.zeros(K, device=chk.device)
    launching._COMPILED.clear()
    first = ln_linear(x, g, b, w)     # JIT path (compiles and caches the CompiledKernel on CUDA)
    second = ln_linear(x, g, b, w)    # direct compiled launch on CUDA
    direct = bool(launching._COMPILED)
    same = torch.equal(first, second)
    chk.add("launch", "direct launch == JIT launch", status="ok" if same else "FAIL",
            note=f"direct path {'used' if direct else 'not used (interpreter)'}")


def _hf_model(cfg, dtype, device, state_dict=None):
    import torch
    import transformers

    eos = cfg.vocab_size - 1
    hf_cfg = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                                     n_layer=cfg.n_layer, n_head=cfg.n_head, bos_token_id=eos, eos_token_id=eos)
    model = transformers.GPT2LMHeadModel(hf_cfg)
    if state_dict is not None:
        model.transformer.load_state_dict({k: v.float().cpu() for k, v in state_dict.items()}, strict=False)
        model.tie_weights()
    return model.to(device=device, dtype=dtype).eval()


def _decode_rate(generate, batch, short, long, repeats) -> float:
    """Decode steps/s from the time difference of two generation lengths (prefill cancels)."""
    generate(short)
    t_short = min(timed(lambda: generate(short), warmup=0, iters=1) for _ in range(repeats))
    t_long = min(timed(lambda: generate(long), warmup=0, iters=1) for _ in range(repeats))
    return (long - short) / max(t_long - t_short, 1e-9)


def _model_configs(chk: Check):
    from engine.config import PRESETS, GPT2Config

    if chk.dry:
        return {"tiny": GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=2)}
    return {name: PRESETS[name] for name in ("gpt2", "gpt2-medium", "gpt2-xl")}


def section_e2e(chk: Check):
    import torch

    from engine import GPT2

    batches = (1, 2) if chk.dry else (1, 8, 64)
    short, long, repeats = (2, 4, 1) if chk.dry else (8, 40, 2)
    prompt_len = 4 if chk.dry else 16
    compiled_todo = []
    for name, cfg in _model_configs(chk).items():
        if chk.left() < 30:
            chk.add("e2e", name, status="skipped", note="time budget spent")
            continue
        ours = GPT2.from_config(cfg, dtype=chk.dtype, device=chk.device, backend="triton")
        hf = _hf_model(cfg, chk.dtype, chk.device)
        weight_bytes = sum(t.numel() * t.element_size() for t in hf.parameters())
        for batch in batches:
            ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device=chk.device)
            mask = torch.ones_like(ids)
            run_ours = lambda n: ours.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)  # noqa: E731
            run_hf = lambda n: hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,  # noqa: E731
                                           do_sample=False, pad_token_id=0)
            with torch.inference_mode():
                steps_ours = _decode_rate(run_ours, batch, short, long, repeats)
                steps_hf = _decode_rate(run_hf, batch, short, long, repeats)
            pct = 100 * steps_ours * weight_bytes / (chk.copy_gbps * 1e9)
            chk.add("e2e", f"{name} {str(chk.dtype)[6:]} B={batch}", steps_ours * batch, "tok/s", reference=steps_hf * batch,
                    ref_name="HF eager", note=f"{pct:.0f}% of copy; HF {100 * steps_hf * weight_bytes / (chk.copy_gbps * 1e9):.0f}%")
            compiled_todo.append((name, cfg, batch, weight_bytes))
        del ours, hf
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    for name, cfg, batch, weight_bytes in compiled_todo:   # the slowest peer last, as the budget allows
        if chk.dry:
            chk.add("e2e", f"{name} B={batch} HF static+compile", status="skipped", note="dry run")
            continue
        if chk.left() < 60:
            chk.add("e2e", f"{name} B={batch} HF static+compile", status="skipped", note="time budget spent")
            continue
        try:
            rate = _hf_compiled_rate(cfg, chk, batch, prompt_len, short, long)
            chk.add("e2e", f"{name} B={batch} HF static+compile", rate * batch, "tok/s",
                    note=f"{100 * rate * weight_bytes / (chk.copy_gbps * 1e9):.0f}% of copy")
        except Exception as exc:  # an optional peer: record why it did not run
            chk.add("e2e", f"{name} B={batch} HF static+compile", status="skipped", note=f"{type(exc).__name__}: {str(exc)[:100]}")


_HF_COMPILED: dict = {}


def _hf_compiled_rate(cfg, chk, batch, prompt_len, short, long):
    import torch

    key = cfg.n_embd
    if key not in _HF_COMPILED:
        model = _hf_model(cfg, chk.dtype, chk.device)
        model.generation_config.cache_implementation = "static"
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        _HF_COMPILED.clear()
        _HF_COMPILED[key] = model
    model = _HF_COMPILED[key]
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device=chk.device)
    mask = torch.ones_like(ids)
    run = lambda n: model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,  # noqa: E731
                                   do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        return _decode_rate(run, batch, short, long, 1)


def section_graphs(chk: Check):
    import torch

    from engine import GPT2

    cfg = next(iter(_model_configs(chk).values()))
    model = GPT2.from_config(cfg, dtype=chk.dtype, device=chk.device, backend="triton")
    ids = torch.randint(0, cfg.vocab_size, (4, 8), device=chk.device)
    n = 4 if chk.dry else 32
    with_graphs = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    holder = getattr(model.engine, "runner", model.engine)   # who owns the CUDA graphs (runner, or the engine)
    graphs = getattr(holder, "graphs", None)
    if graphs is None and chk.device.type == "cuda":
        chk.add("graphs", "CUDA-graph decode == graph-less", status="FAIL", note="the engine captured no graphs")
        return
    holder.graphs = None
    try:
        without = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    finally:
        holder.graphs = graphs
    same = torch.equal(with_graphs, without)
    chk.add("graphs", "CUDA-graph decode == graph-less", status="ok" if same else "FAIL",
            note=f"{n} greedy tokens x 4 rows" + ("" if graphs is not None else " (no graphs on CPU: eager twice)"))


def section_bf16(chk: Check):
    import torch

    from engine import GPT2

    cfg = next(iter(_model_configs(chk).values()))
    half = torch.float16 if chk.dry else torch.bfloat16   # Triton's interpreter (numpy) has no bfloat16
    ours = GPT2.from_config(cfg, dtype=half, device=chk.device, backend="triton")
    weights = ours.state_dict()
    ref = _hf_model(cfg, torch.float32, chk.device, weights)
    peer = _hf_model(cfg, half, chk.device, weights)
    ids = torch.randint(0, cfg.vocab_size, (2, 16 if chk.dry else 64), device=chk.device)
    with torch.inference_mode():
        want = ref(ids).logits.float()
        err_ours = (ours(ids).float() - want).abs().max().item()
        err_peer = (peer(ids).logits.float() - want).abs().max().item()
    floor = 1e-3 * want.abs().max().item()
    chk.add("bf16", f"{str(half)[6:]} logits max err vs fp32", err_ours, "", reference=err_peer, ref_name=f"HF {str(half)[6:]}",
            status="ok" if err_ours <= 2 * err_peer + floor else "FAIL")


SECTIONS = [("tests", section_tests), ("copy", section_copy), ("flash", section_flash), ("paged", section_paged),
            ("gemm", section_gemm), ("launch", section_launch), ("e2e", section_e2e), ("graphs", section_graphs),
            ("bf16", section_bf16)]


# ---- output -------------------------------------------------------------------------------------

def _fmt(v):
    if v is None:
        return ""
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def table(rows) -> list[str]:
    lines = [f"{'section':<7} {'check':<34} {'value':>10} {'unit':<8} {'reference':>12}  {'status':<7} note",
             "-" * 100]
    for r in rows:
        ref = f"{_fmt(r['reference'])} {r['ref_name']}".strip() if r["reference"] is not None else ""
        lines.append(f"{r['section']:<7} {r['name'][:34]:<34} {_fmt(r['value']):>10} {r['unit']:<8} {ref:>12}  "
                     f"{r['status']:<7} {r['note'][:60]}")
    return lines


def _versions():
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "transformers"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    return versions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for results.json and results.md")
    parser.add_argument("--dry-run", action="store_true", help="CPU: tiny sizes under Triton's interpreter")
    parser.add_argument("--budget-s", type=float, default=450, help="time budget in seconds (default 450)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"       # before triton is first imported
    sys.path.insert(0, str(REPO))
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA GPU here (use --dry-run for the CPU smoke run)", file=sys.stderr)
        return 2
    chk = Check(args.dry_run, args.budget_s)
    chk.device = torch.device("cpu" if args.dry_run else "cuda")
    chk.dtype = torch.float32 if args.dry_run else torch.float16
    chk.copy_gbps = float("nan")
    started = time.monotonic()
    for name, fn in SECTIONS:
        chk.run(name, fn)
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.dry_run else "cpu (dry run)"
    report = dict(device=device_name, dry_run=args.dry_run, versions=_versions(),
                  seconds=round(time.monotonic() - started, 1), rows=chk.rows)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    lines = table(chk.rows)
    header = f"gpu_check on {device_name}, {report['seconds']} s, " + \
             ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    (out / "results.md").write_text(f"# gpu_check\n\n{header}\n\n```\n" + "\n".join(lines) + "\n```\n")
    shown = [header, *lines][:MAX_TABLE_LINES]
    print("\n".join(shown))
    return 1 if any(r["status"] in ("FAIL", "error") for r in chk.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
