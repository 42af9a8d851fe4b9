"""One-shot check of a machine with a CUDA GPU: correctness, kernel speed and end-to-end decode.

    python3 -m benchmarks.gpu_check --out DIR        (or `make gpu-check OUT=DIR`)
    python3 -m benchmarks.gpu_check --out DIR --dry-run   (CPU: tiny sizes, Triton's interpreter)

Runs from a checkout with the machine's own python3 and packages (torch >= 2.4, triton >= 3.2,
transformers; no network, no installs): the package is laid out from the checkout as the wheel lays it
out (engine/ -> gpt2_engine/, kernels/ -> gpt2_engine/kernels/, as links in a temporary directory),
so it need not be installed. Optional packages (fastapi, uvicorn, pydantic, openai, ray) may be
missing: the tests that need them skip. Sized to finish in about 8 minutes on an H100/H200
(`--budget-s`); every item has its own wall-clock guard, and results.json / results.md are rewritten
after every row, so a run stopped at any point keeps every finished row. Sections, in this order
(correctness first, then kernel speed, then end-to-end, largest model last):

    tests      the cuda-marked tests and every test that takes the device fixture (the kernels' parity
               tests), on the GPU: pytest -m "cuda or on_device" tests
    graphs     the engine's CUDA-graph decode is token-identical to its graph-less decode
    half       fp16 and bf16 logits parity with non-trivial LayerNorm gamma / beta:
               |engine half - fp32 ref| <= 2 |transformers half - fp32 ref| + floor
    persistent the one-launch persistent decode step against today's multi-launch graph step over
               1,000 greedy steps of GPT-2 small (one row, context 1..1000, scattered block table):
               |persistent - fp32 ref| <= 2 |multi-launch - fp32 ref| + floor at every step, the same
               tokens (a differing argmax only where the top-2 margin is within that error), and the
               whole run repeated bitwise (the arrival counters under real concurrency)
    launch     launch-plan cache + direct compiled launch: bit-identical to the JIT launch
    copy       device copy bandwidth (read + write bytes, 1 GiB): the reference for every "% of copy"
    flash      flash_attention TFLOP/s at S = 1k/2k/4k, D = 64, causal, against torch SDPA
    paged      paged_decode_attention GB/s at batch 32/64/128, context 1k/4k: shuffled block tables
               (paged) against identity tables (contiguous), rotating over 4 pools (> L2)
    gemm       decode ln_linear GB/s of weight bytes at M = 1/16/64/256 against torch (cuBLAS),
               rotating over weight copies that total > 256 MB (> the 50-60 MB L2)
    e2e        decode tokens/s of GPT-2 small/medium/xl fp16 at batch 1/8/64 (engine through the
               public API) against transformers eager and transformers static cache + torch.compile
               (warmed at every length it is timed at), each with the per-step weight bytes as % of
               copy bandwidth; decode time = difference of two generate lengths; and the engine with
               decode_kernel="persistent" at batch 1/8/16 side by side with today's graph path
               (tok/s, us per step, % of copy)

Kernels are timed with triton.testing.do_bench (CUDA events, median); end-to-end generate calls with
a host clock around synchronised calls. Exit status 1 when a correctness row fails or errors.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_TABLE_LINES = 40
BAD = ("FAIL", "error", "timeout")


def use_checkout() -> Path:
    """Make `import gpt2_engine` load this checkout, laid out as the wheel lays it out, without
    installing it: a temporary directory holding gpt2_engine/ (links to engine/'s entries, and
    kernels -> kernels/), first on sys.path and on PYTHONPATH (for the tests' subprocesses)."""
    root = Path(tempfile.mkdtemp(prefix="gpt2-engine-checkout-"))
    package = root / "gpt2_engine"
    package.mkdir()
    for entry in (REPO / "engine").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    (package / "kernels").symlink_to(REPO / "kernels")
    sys.path.insert(0, str(root))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), str(REPO), os.environ.get("PYTHONPATH")]))
    return root


# ---- rows, budget, guards -----------------------------------------------------------------------

class ItemTimeout(Exception):
    pass


@contextlib.contextmanager
def wall_clock_guard(seconds: float):
    """Raise ItemTimeout in this (the main) thread once `seconds` have passed. A call blocked inside
    the GPU driver is interrupted when it returns to Python."""
    def expire(signum, frame):
        raise ItemTimeout(f"over its {seconds:.0f} s guard")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Check:
    """Collects rows, keeps the time budget, and rewrites the results after every row."""

    def __init__(self, dry: bool, budget_s: float, out: Path):
        self.dry, self.out, self.rows = dry, out, []
        self.started = time.monotonic()
        self.deadline = self.started + budget_s
        self.header = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, section, name, value=None, unit="", *, reference=None, ref_name="", status="ok", note=""):
        self.rows.append(dict(section=section, name=name, value=value, unit=unit, reference=reference,
                              ref_name=ref_name, status=status, note=note))
        self.save()

    def item(self, section: str, name: str, limit_s: float, measure, *, min_left_s: float = 0.0):
        """One row: measure() returns add()'s keyword arguments (value, unit, reference, ...). Skipped
        when the budget cannot cover min_left_s; an exception or a run past limit_s becomes its row."""
        if self.left() < max(min_left_s, 1.0):
            self.add(section, name, status="skipped", note="time budget spent")
            return
        try:
            with wall_clock_guard(min(limit_s, self.left())):
                fields = measure()
        except ItemTimeout as exc:
            self.add(section, name, status="timeout", note=str(exc))
        except Exception as exc:  # a broken item must not hide the others
            self.add(section, name, status="error", note=f"{type(exc).__name__}: {str(exc)[:160]}")
        else:
            self.add(section, name, **fields)

    def save(self):
        report = dict(self.header, dry_run=self.dry, seconds=round(time.monotonic() - self.started, 1), rows=self.rows)
        lines = table(self.rows)
        _write(self.out / "results.json", json.dumps(report, indent=2))
        _write(self.out / "results.md", f"# gpu_check\n\n{self.title()}\n\n```\n" + "\n".join(lines) + "\n```\n")

    def title(self) -> str:
        versions = ", ".join(f"{k} {v}" for k, v in self.header.get("versions", {}).items())
        return f"gpu_check on {self.header.get('device')}, {time.monotonic() - self.started:.1f} s, {versions}"


def _write(path: Path, text: str):
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(text)
    os.replace(partial, path)          # a kill mid-write leaves the previous complete file


# ---- timing -------------------------------------------------------------------------------------

def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def kernel_seconds(chk: Check, fn) -> float:
    """Median seconds per call: CUDA events over many calls (triton.testing.do_bench, 25 ms warm-up,
    100 ms of repeats); in the dry run a host clock over 2 calls."""
    if chk.dry:
        fn()
        times = []
        for _ in range(2):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3


class Rotation:
    """Cycles through argument sets, so that repeated calls read memory that is not in L2."""

    def __init__(self, items):
        self.items, self.i = list(items), 0

    def next(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def copies_beyond_l2(nbytes: int, dry: bool) -> int:
    """How many copies of an nbytes operand make a rotation of more than 256 MB (the H100/H200 L2 is
    50-60 MB)."""
    return 2 if dry else max(2, -(-(256 << 20) // nbytes))


# ---- correctness --------------------------------------------------------------------------------

def section_tests(chk: Check):
    if chk.dry:
        def collect():
            """The dry run collects the cuda-marked tests: every test module must import on this
            machine's packages (the ones with missing optional dependencies skip)."""
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-m", "cuda or on_device",
                                   "-p", "no:cacheprovider", "tests"], cwd=REPO, capture_output=True, text=True, timeout=300)
            last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
            return dict(status="ok" if proc.returncode == 0 else "FAIL", note=f"collected: {last[:100]}")

        chk.item("tests", "cuda-marked and device tests collect", 300, collect)
        return

    def measure():
        timeout = max(30.0, min(200.0, chk.left() - 240))
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda or on_device", "-p", "no:cacheprovider",
                               "tests"], cwd=REPO, capture_output=True, text=True, timeout=timeout)
        (chk.out / "tests.log").write_text(proc.stdout[-200_000:] + proc.stderr[-50_000:])
        last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
        return dict(status="ok" if proc.returncode == 0 else "FAIL", note=last[:120])

    chk.item("tests", "cuda-marked and device tests", 210, measure, min_left_s=60)


def _model_configs(chk: Check):
    from gpt2_engine.config import PRESETS, GPT2Config

    if chk.dry:
        return {"tiny": GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=2)}
    return {name: PRESETS[name] for name in ("gpt2", "gpt2-medium", "gpt2-xl")}


def section_graphs(chk: Check):
    import torch

    from gpt2_engine import GPT2

    def measure():
        cfg = next(iter(_model_configs(chk).values()))
        model = GPT2.from_config(cfg, dtype=chk.dtype, device=chk.device, backend="triton")
        rows, n = (2, 2) if chk.dry else (4, 32)
        ids = torch.randint(0, cfg.vocab_size, (rows, 8), device=chk.device)
        with_graphs = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        runner = model.engine.runner
        graphs = runner.graphs
        if graphs is None and chk.device.type == "cuda":
            return dict(status="FAIL", note="the engine captured no graphs")
        runner.graphs = None
        try:
            without = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        finally:
            runner.graphs = graphs
        same = torch.equal(with_graphs, without)
        return dict(status="ok" if same else "FAIL",
                    note=f"{n} greedy tokens x {rows} rows" + ("" if graphs is not None else " (no graphs on CPU: eager twice)"))

    chk.item("graphs", "CUDA-graph decode == graph-less", 120, measure)


def section_persistent(chk: Check):
    import torch

    from gpt2_engine.kv_cache import allocate_kv_cache
    from gpt2_engine.model import PagedGPT2, pack_step
    from gpt2_engine.persistent_decode import PersistentDecode
    from gpt2_engine.weights import random_state_dict

    def measure():
        cfg = next(iter(_model_configs(chk).values()))
        steps, bs = min(3 if chk.dry else 1000, cfg.n_positions), 16
        state = random_state_dict(cfg, seed=0)
        model = PagedGPT2(cfg, state, backend="triton", device=chk.device, dtype=chk.dtype)
        exact = PagedGPT2(cfg, state, backend="triton", device=chk.device, dtype=torch.float32)
        blocks = -(-steps // bs)
        table = torch.randperm(blocks + 3)[:blocks].tolist()             # scattered blocks
        caches = {name: allocate_kv_cache(cfg, blocks + 3, bs, dtype, chk.device)
                  for name, dtype in (("persistent", chk.dtype), ("multi", chk.dtype), ("exact", torch.float32))}
        persistent = PersistentDecode(model, caches["persistent"], bs)
        if chk.device.type == "cuda":
            from gpt2_engine.cuda_graphs import DecodeGraphs
            multi = DecodeGraphs(model, caches["multi"], 1, blocks).run
        else:
            multi = lambda step: model.forward(step, caches["multi"])   # noqa: E731

        def step_at(i, token):
            return pack_step(cfg.vocab_size, chk.device, token_ids=[token], positions=[i], num_prefill_tokens=0,
                             slot_mapping=[table[i // bs] * bs + i % bs], block_tables=[table[:i // bs + 1]],
                             context_lens=[i + 1])

        tokens, logits, worst, flips, ties = [0], [], 0.0, 0, 0
        for i in range(steps):
            step = step_at(i, tokens[-1])
            ours, theirs, ref = persistent.run(step), multi(step), exact.forward(step, caches["exact"])
            err_ours, err_theirs = (ours - ref).abs().max().item(), (theirs - ref).abs().max().item()
            bound = 2 * err_theirs + 1e-5 * ref.abs().max().item()
            worst = max(worst, err_ours / bound)
            top2 = theirs.topk(2).values[0]
            if ours.argmax().item() != theirs.argmax().item():
                near_tie = (top2[0] - top2[1]).item() <= err_ours + err_theirs
                ties, flips = ties + near_tie, flips + (not near_tie)
            logits.append(ours.clone())
            tokens.append(ours.argmax().item())
        caches["persistent"].zero_()
        repeat_same = all(torch.equal(persistent.run(step_at(i, tokens[i])), logits[i]) for i in range(steps))
        ok = worst <= 1 and not flips and repeat_same
        return dict(value=steps, unit="steps", status="ok" if ok else "FAIL",
                    note=f"err <= {worst:.2f} x bound; {flips} token flips, {ties} near-ties; "
                         f"run-to-run {'bitwise' if repeat_same else 'DIFFERS'}")

    chk.item("persistent", "persistent == multi-launch, greedy", 240, measure)


def _hf_model(cfg, dtype, device):
    import transformers

    eos = cfg.vocab_size - 1
    hf_cfg = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                                     n_layer=cfg.n_layer, n_head=cfg.n_head, bos_token_id=eos, eos_token_id=eos)
    return transformers.GPT2LMHeadModel(hf_cfg).to(device=device, dtype=dtype).eval()


def section_half(chk: Check):
    """fp16 and bf16 logits of the engine against transformers', both against an fp32 reference."""
    import copy

    import torch

    from gpt2_engine import GPT2

    def measure(half):
        cfg = next(iter(_model_configs(chk).values()))
        ref = _hf_model(cfg, torch.float32, chk.device)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():                                  # LayerNorms that are not the identity
            for name, p in ref.named_parameters():
                if ".ln_" in name or name.startswith("transformer.ln_f"):
                    shape = p.shape
                    if name.endswith("weight"):
                        p.copy_(0.5 + torch.rand(shape, generator=gen))
                    else:
                        p.copy_(0.1 * torch.randn(shape, generator=gen))
        peer = copy.deepcopy(ref).to(half)
        ours = GPT2.from_hf(copy.deepcopy(peer), backend="triton")
        ids = torch.randint(0, cfg.vocab_size, (2, 16 if chk.dry else 64), device=chk.device)
        with torch.inference_mode():
            want = ref(ids).logits.float()
            err_ours = (ours(ids).float() - want).abs().max().item()
            err_peer = (peer(ids).logits.float() - want).abs().max().item()
        floor = 1e-3 * want.abs().max().item()
        return dict(value=err_ours, reference=err_peer, ref_name=f"HF {str(half)[6:]}",
                    status="ok" if err_ours <= 2 * err_peer + floor else "FAIL", note="LN gamma U(0.5,1.5), beta N(0,0.1)")

    # Triton's interpreter (numpy) has no bfloat16: the dry run checks fp16 only
    for half in (torch.float16,) if chk.dry else (torch.float16, torch.bfloat16):
        chk.item("half", f"{str(half)[6:]} logits max err vs fp32", 120, lambda half=half: measure(half))


def section_launch(chk: Check):
    import torch

    from gpt2_engine.kernels import launching
    from gpt2_engine.kernels.fused_linear import ln_linear

    def measure():
        K, N = (64, 96) if chk.dry else (768, 2304)
        x = torch.randn(3, K, device=chk.device, dtype=chk.dtype)
        w = torch.randn(K, N, device=chk.device, dtype=chk.dtype)
        g, b = torch.ones(K, device=chk.device), torch.zeros(K, device=chk.device)
        launching._COMPILED.clear()
        first = ln_linear(x, g, b, w)     # JIT path (compiles and caches the CompiledKernel on CUDA)
        second = ln_linear(x, g, b, w)    # direct compiled launch on CUDA
        direct = bool(launching._COMPILED)
        return dict(status="ok" if torch.equal(first, second) else "FAIL",
                    note=f"direct path {'used' if direct else 'not used (interpreter)'}")

    chk.item("launch", "direct launch == JIT launch", 60, measure)


# ---- kernel speed -------------------------------------------------------------------------------

def section_copy(chk: Check):
    import torch

    def measure():
        mb = 8 if chk.dry else 1024
        src = torch.randn(mb * 2**20 // 4, device=chk.device)
        dst = torch.empty_like(src)
        chk.copy_gbps = 2 * src.numel() * 4 / kernel_seconds(chk, lambda: dst.copy_(src)) / 1e9
        return dict(value=chk.copy_gbps, unit="GB/s")

    chk.item("copy", "device copy", 60, measure)


def section_flash(chk: Check):
    import torch
    import torch.nn.functional as F

    from gpt2_engine.kernels.flash_attention import flash_attention

    heads, dim = (2, 64) if chk.dry else (16, 64)
    for seqlen in ((64,) if chk.dry else (1024, 2048, 4096)):
        batch = 1 if chk.dry else max(1, 16384 // seqlen)

        def measure(seqlen=seqlen, batch=batch):
            q, k, v = (torch.randn(batch, seqlen, heads, dim, device=chk.device, dtype=chk.dtype) for _ in range(3))
            flops = 4 * batch * heads * seqlen * seqlen * dim / 2          # causal: half of QK^T and PV
            t_ours = kernel_seconds(chk, lambda: flash_attention(q, k, v))
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            t_sdpa = kernel_seconds(chk, lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True))
            return dict(value=flops / t_ours / 1e12, unit="TFLOP/s", reference=flops / t_sdpa / 1e12, ref_name="torch SDPA")

        chk.item("flash", f"S={seqlen} D={dim} B={batch} H={heads}", 45, measure)


def section_paged(chk: Check):
    import torch

    from gpt2_engine.kernels.paged_attention import paged_decode_attention

    heads, dim, block = (2, 64, 16) if chk.dry else (12, 64, 16)
    rotations = 2 if chk.dry else 4
    for batch, ctx in ([(2, 64)] if chk.dry else [(b, c) for c in (1024, 4096) for b in (32, 64, 128)]):
        def measure(batch=batch, ctx=ctx):
            blocks = ctx // block
            per_rotation = batch * blocks
            k_cache = torch.randn(rotations * per_rotation, block, heads, dim, device=chk.device, dtype=chk.dtype)
            v_cache = torch.randn_like(k_cache)
            q = torch.randn(batch, heads, dim, device=chk.device, dtype=chk.dtype)
            lens = torch.full((batch,), ctx, dtype=torch.int32, device=chk.device)
            # rotation r reads only its own quarter of the pool: 4 x the K/V bytes between re-reads
            base = [r * per_rotation + torch.arange(per_rotation, device=chk.device, dtype=torch.int32)
                    for r in range(rotations)]
            contiguous = Rotation(b.view(batch, blocks) for b in base)
            shuffled = Rotation(b[torch.randperm(per_rotation, device=chk.device)].view(batch, blocks) for b in base)
            kv_bytes = 2 * batch * ctx * heads * dim * k_cache.element_size()
            t_paged = kernel_seconds(chk, lambda: paged_decode_attention(q, k_cache, v_cache, shuffled.next(), lens))
            t_contig = kernel_seconds(chk, lambda: paged_decode_attention(q, k_cache, v_cache, contiguous.next(), lens))
            return dict(value=kv_bytes / t_paged / 1e9, unit="GB/s", reference=kv_bytes / t_contig / 1e9, ref_name="contiguous",
                        note=f"{100 * kv_bytes / t_paged / 1e9 / chk.copy_gbps:.0f}% of copy")

        chk.item("paged", f"B={batch} ctx={ctx}", 45, measure)


def section_gemm(chk: Check):
    import torch
    import torch.nn.functional as F

    from gpt2_engine.kernels.fused_linear import fold_layernorm, ln_linear

    shapes = [("tiny c_fc", 64, 256)] if chk.dry else [("gpt2 c_fc", 768, 3072), ("gpt2-xl mlp.c_proj", 6400, 1600)]
    for label, K, N in shapes:
        def measure_shape(K=K, N=N):
            nbytes = K * N * torch.tensor([], dtype=chk.dtype).element_size()
            sets = []
            for _ in range(copies_beyond_l2(nbytes, chk.dry)):
                w = torch.randn(K, N, device=chk.device, dtype=chk.dtype) / K ** 0.5
                gamma, beta, bias = (torch.randn(n, device=chk.device, dtype=chk.dtype) for n in (K, K, N))
                sets.append((fold_layernorm(gamma, beta, w, bias), w.t().contiguous(), gamma, beta, bias))
            return nbytes, Rotation(sets)

        try:
            nbytes, weights = measure_shape()
        except Exception as exc:
            chk.add("gemm", label, status="error", note=f"{type(exc).__name__}: {str(exc)[:160]}")
            continue
        for M in ((1, 16) if chk.dry else (1, 16, 64, 256)):
            def measure(M=M, K=K, nbytes=nbytes, weights=weights):
                x = torch.randn(M, K, device=chk.device, dtype=chk.dtype)

                def ours():
                    folded = weights.next()[0]
                    return ln_linear(x, None, None, folded, None)

                def reference():
                    _, w_nk, gamma, beta, bias = weights.next()
                    return F.linear(F.layer_norm(x, (K,), gamma, beta), w_nk, bias)

                t_ours, t_torch = kernel_seconds(chk, ours), kernel_seconds(chk, reference)
                return dict(value=nbytes / t_ours / 1e9, unit="GB/s", reference=nbytes / t_torch / 1e9,
                            ref_name="torch LN+linear", note=f"{100 * nbytes / t_ours / 1e9 / chk.copy_gbps:.0f}% of copy")

            chk.item("gemm", f"{label} M={M}", 30, measure)
        del weights


# ---- end to end ---------------------------------------------------------------------------------

def _decode_rate(generate, short, long, repeats) -> float:
    """Decode steps/s from the time difference of two generation lengths (prefill cancels); both
    lengths run once untimed first (compiles, graph captures and cache allocations stay out)."""
    generate(short)
    generate(long)

    def seconds(n):
        _sync()
        start = time.perf_counter()
        generate(n)
        _sync()
        return time.perf_counter() - start

    t_short = min(seconds(short) for _ in range(repeats))
    t_long = min(seconds(long) for _ in range(repeats))
    return (long - short) / max(t_long - t_short, 1e-9)


def section_e2e(chk: Check):
    import torch

    from gpt2_engine import GPT2

    batches = (1,) if chk.dry else (1, 8, 64)
    short, long, repeats = (1, 2, 1) if chk.dry else (8, 40, 2)
    prompt_len = 4 if chk.dry else 16
    for name, cfg in _model_configs(chk).items():          # small, medium, xl: largest last
        if chk.left() < 30:
            chk.add("e2e", name, status="skipped", note="time budget spent")
            continue
        ours = GPT2.from_config(cfg, dtype=chk.dtype, device=chk.device, backend="triton")
        hf = _hf_model(cfg, chk.dtype, chk.device)
        weight_bytes = sum(t.numel() * t.element_size() for t in hf.parameters())

        def share(steps_per_s):
            return f"{100 * steps_per_s * weight_bytes / (chk.copy_gbps * 1e9):.0f}% of copy"

        for batch in batches:
            ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device=chk.device)
            mask = torch.ones_like(ids)

            def measure(ids=ids, mask=mask, batch=batch, ours=ours, hf=hf):
                run_ours = lambda n: ours.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)  # noqa: E731
                run_hf = lambda n: hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,  # noqa: E731
                                               do_sample=False, pad_token_id=0)
                with torch.inference_mode():
                    steps_ours = _decode_rate(run_ours, short, long, repeats)
                    steps_hf = _decode_rate(run_hf, short, long, repeats)
                return dict(value=steps_ours * batch, unit="tok/s", reference=steps_hf * batch, ref_name="HF eager",
                            note=f"{share(steps_ours)}; HF {share(steps_hf)}")

            chk.item("e2e", f"{name} {str(chk.dtype)[6:]} B={batch}", 60, measure)
        # the persistent step (one launch per decode step) side by side with today's graph path
        persistent = GPT2.from_config(cfg, dtype=chk.dtype, device=chk.device, backend="triton",
                                      decode_kernel="persistent", max_num_seqs=16)
        for batch in (1,) if chk.dry else (1, 8, 16):
            ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device=chk.device)

            def measure_persistent(ids=ids, batch=batch, ours=ours, persistent=persistent):
                def rate(model):
                    run = lambda n: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)  # noqa: E731
                    with torch.inference_mode():   # dry run: one decode step (the interpreter takes seconds a step)
                        return _decode_rate(run, *((1, 2, 1) if chk.dry else (short, long, repeats)))
                steps_p, steps_g = rate(persistent), rate(ours)
                return dict(value=steps_p * batch, unit="tok/s", reference=steps_g * batch, ref_name="graphs",
                            note=f"{1e6 / steps_p:.0f} vs {1e6 / steps_g:.0f} us/step; {share(steps_p)} vs {share(steps_g)}")

            chk.item("e2e", f"{name} persistent B={batch}", 180 if chk.dry else 60, measure_persistent)
        del ours, hf, persistent
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        # transformers' static cache + torch.compile for this model, warmed at both timed lengths
        if chk.dry:
            chk.add("e2e", f"{name} HF static+compile", status="skipped", note="dry run")
            continue
        compiled = None
        for batch in batches:
            def measure_compiled(batch=batch):
                nonlocal compiled
                if compiled is None:     # transformers compiles its own decode step for a static cache
                    compiled = _hf_model(cfg, chk.dtype, chk.device)
                    compiled.generation_config.cache_implementation = "static"
                ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device=chk.device)
                mask = torch.ones_like(ids)
                run = lambda n: compiled.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,  # noqa: E731
                                                  do_sample=False, pad_token_id=0)
                with torch.inference_mode():
                    rate = _decode_rate(run, short, long, 1)
                return dict(value=rate * batch, unit="tok/s", note=share(rate))

            chk.item("e2e", f"{name} B={batch} HF static+compile", 90, measure_compiled, min_left_s=60)
        del compiled
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


SECTIONS = [("tests", section_tests), ("graphs", section_graphs), ("half", section_half), ("persistent", section_persistent),
            ("launch", section_launch),
            ("copy", section_copy), ("flash", section_flash), ("paged", section_paged), ("gemm", section_gemm),
            ("e2e", section_e2e)]


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
    import numpy
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    for mod in ("triton", "transformers"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    return versions


def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run our kernels with these package versions, or None. Triton 3.6's
    interpreter takes int() of a one-element array for a loop bound loaded from memory, which numpy 2.5
    refuses ("only 0-dimensional arrays can be converted to Python scalars"); triton 3.9's does not."""
    import numpy
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _loop_over_loaded_bound(n_ptr, out_ptr):
        total = 0
        for i in tl.range(0, tl.load(n_ptr)):
            total += i
        tl.store(out_ptr, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        _loop_over_loaded_bound[(1,)](torch.tensor([3], dtype=torch.int32), out)
    except Exception as exc:
        return (f"triton {triton.__version__}'s interpreter cannot run these kernels with numpy {numpy.__version__} "
                f"({str(exc)[:80]}): the dry run needs numpy < 2.5 with this triton, or a triton whose "
                f"interpreter handles it (3.9 does)")
    return None if out.item() == 3 else "triton's interpreter computed a wrong loop sum"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for results.json and results.md")
    parser.add_argument("--dry-run", action="store_true", help="CPU: tiny sizes under Triton's interpreter")
    parser.add_argument("--budget-s", type=float, default=450, help="time budget in seconds (default 450)")
    parser.add_argument("--sections", nargs="+", choices=[name for name, _ in SECTIONS], default=None,
                        help="run only these sections, in the usual order (default: all; copy runs whenever a "
                             "later section reports a share of the copy bandwidth)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"       # before triton is first imported
    use_checkout()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA GPU here (use --dry-run for the CPU smoke run)", file=sys.stderr)
        return 2
    if args.dry_run and (problem := interpreter_problem()):
        print(f"gpu_check: error: {problem}", file=sys.stderr)
        return 2
    chk = Check(args.dry_run, args.budget_s, out)
    chk.device = torch.device("cpu" if args.dry_run else "cuda")
    chk.dtype = torch.float32 if args.dry_run else torch.float16
    chk.copy_gbps = float("nan")
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.dry_run else "cpu (dry run)"
    chk.header = dict(device=device_name, versions=_versions())
    wanted = set(args.sections or [name for name, _ in SECTIONS])
    if wanted & {"paged", "gemm", "e2e"}:
        wanted.add("copy")
    for name, fn in SECTIONS:
        if name not in wanted:
            continue
        if chk.left() <= 0:
            chk.add(name, "(section)", status="skipped", note="time budget spent")
            continue
        try:
            fn(chk)
        except Exception as exc:  # a broken section must not hide the others
            chk.add(name, "(section)", status="error", note=f"{type(exc).__name__}: {str(exc)[:160]}")
    chk.save()
    shown = [chk.title(), *table(chk.rows)][:MAX_TABLE_LINES]
    print("\n".join(shown))
    return 1 if any(r["status"] in BAD for r in chk.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
