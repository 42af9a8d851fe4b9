"""ln_linear / ln_gelu_mlp against their torch references (Triton's interpreter on CPU).

Tolerances: fp32 runs exact fp32 dots, so its max error is held to 1e-5 of the reference's max
magnitude (a normwise relative bound; measured ~2e-7 at K = 72 and ~1.5e-6 at K = 3072). fp16 by
the 2x rule: the kernel's max error against an fp32 reference is at most twice that of the torch
reference run in fp16, plus a floor of fp16's unit roundoff (2^-11) times the reference's largest magnitude:
the one output rounding neither side avoids, which matters where the fp16 reference is almost exact by
luck (a 24-term dot has too few terms for its error to be typical; the kernel also rounds the
LN-folded weights, which the reference does not). Outputs are NaN-poisoned through `out`, so an
unwritten element fails; NaN never passes (a NaN in the difference makes the comparison false).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpt2_engine.kernels.fused_linear as fl
from gpt2_engine.kernels import arrival_counter
from gpt2_engine.kernels.arrival_counter import arrival_counters
from gpt2_engine.kernels.fused_linear import (
    FoldedLinear,
    fold_layernorm,
    gelu_tanh,
    ln_gelu_mlp,
    ln_gelu_mlp_ref,
    ln_linear,
    ln_linear_ref,
)
from gpt2_engine.kernels.launch_plan import UNSPLIT_TILES, gemm_plan
from gpt2_engine.kernels.paged_attention import write_kv_ref
from tests.seeding import reproducible_seed

FP32_RTOL = 1e-5
FP16_FLOOR = 2 ** -11


@pytest.fixture
def few_sms(monkeypatch):
    """The interpreter runs programs one by one: size the grid for an 8-SM device (the split-K
    heuristic is the same code, it only sees a smaller GPU)."""
    monkeypatch.setattr(fl, "_DEFAULT_NUM_SMS", 8)
    monkeypatch.setattr(fl, "_PLANS", {})



def _inputs(M, K, N, dtype, device, *, ln=True, bias=True, residual=False):
    """Fresh random GPT-2-like operands: a residual stream with a nonzero mean, scaled weights."""
    x = torch.randn(M, K, device=device) * 3 + 0.5
    args = dict(
        x=x.to(dtype),
        ln_weight=(1 + 0.2 * torch.randn(K, device=device)).to(dtype) if ln else None,
        ln_bias=(0.1 * torch.randn(K, device=device)).to(dtype) if ln else None,
        weight=(torch.randn(K, N, device=device) / K ** 0.5).to(dtype),
        bias=(0.1 * torch.randn(N, device=device)).to(dtype) if bias else None,
        residual=torch.randn(M, N, device=device).to(dtype) if residual else None,
    )
    return args


def _f32(t):
    return t.float() if t is not None else None


def _poisoned(M, N, dtype, device):
    return torch.full((M, N), float("nan"), dtype=dtype, device=device)


def _check(y, args, *, activation, seed, ref_fn=ln_linear_ref, ref_args=None):
    ref_args = ref_args if ref_args is not None else args
    ref32 = ref_fn(**{k: _f32(v) for k, v in ref_args.items()}, **({"activation": activation} if activation is not None else {}))
    assert not torch.isnan(y).any(), f"NaN in output (seed {seed})"
    scale = ref32.abs().max().item()
    err = (y.float() - ref32).abs().max().item()
    if y.dtype == torch.float32:
        assert err <= FP32_RTOL * scale, f"fp32 max err {err:.3g} > {FP32_RTOL} x {scale:.3g} (seed {seed})"
    else:
        ref_lo = ref_fn(**ref_args, **({"activation": activation} if activation is not None else {}))
        err_ref = (ref_lo.float() - ref32).abs().max().item()
        bound = 2 * err_ref + FP16_FLOOR * scale
        assert err <= bound, f"{y.dtype} max err {err:.3g} > 2 x torch {y.dtype} err {err_ref:.3g} + floor (seed {seed})"
    return err / scale


VARIANTS = [  # (ln, bias, activation, residual)
    (ln, bias, act, res)
    for ln in (True, False) for bias in (True, False) for act in (None, "gelu_tanh") for res in (False, True)
]


def _variant_id(v):
    ln, bias, act, res = v
    return "+".join([p for p, on in (("ln", ln), ("bias", bias), ("gelu", act), ("res", res)) if on]) or "plain"


SMALL_SHAPES = [(1, 24, 40), (3, 72, 100), (17, 72, 100), (257, 24, 40)]
# every prologue/epilogue combination on one small shape (cycled), and the full combination on all
VARIANT_CASES = [(v, SMALL_SHAPES[i % len(SMALL_SHAPES)]) for i, v in enumerate(VARIANTS)] + [
    ((True, True, "gelu_tanh", True), shape) for shape in SMALL_SHAPES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("variant,shape", VARIANT_CASES, ids=[f"{_variant_id(v)}-{'x'.join(map(str, s))}" for v, s in VARIANT_CASES])
def test_ln_linear_variants(variant, shape, dtype, device):
    ln, bias, act, res = variant
    M, K, N = shape
    seed = reproducible_seed()
    args = _inputs(M, K, N, dtype, device, ln=ln, bias=bias, residual=res)
    y = ln_linear(**args, activation=act, out=_poisoned(M, N, dtype, device))
    _check(y, args, activation=act, seed=seed)


# GPT-2 widths: the engine's three shapes per layer, at decode batch sizes (1600 at M = 1 only:
# the interpreter is slow).
WIDTH_CASES = [(768, 3, "qkv"), (768, 1, "proj"), (1024, 1, "fc"), (1024, 3, "qkv"), (1280, 3, "proj"),
               (1280, 1, "fc"), (1600, 1, "qkv"), (1600, 3, "proj")]


@pytest.mark.parametrize("C,M,shape", WIDTH_CASES)
def test_ln_linear_gpt2_widths(C, M, shape, device, few_sms):
    K, N, kw = {"qkv": (C, 3 * C, dict(ln=True, act=None, res=False)),
                "fc": (C, 4 * C, dict(ln=True, act="gelu_tanh", res=False)),
                "proj": (4 * C, C, dict(ln=False, act=None, res=True))}[shape]
    dtype = torch.float32 if C == 768 else torch.float16   # fp32 decode tiles (BLOCK_K 32) are slow here
    seed = reproducible_seed()
    args = _inputs(M, K, N, dtype, device, ln=kw["ln"], residual=kw["res"])
    y = ln_linear(**args, activation=kw["act"], out=_poisoned(M, N, dtype, device))
    _check(y, args, activation=kw["act"], seed=seed)


@pytest.mark.parametrize("M,K,N,dtype", [(1, 3072, 96, torch.float16), (5, 1600, 200, torch.float16),
                                         (17, 520, 72, torch.float32)])
def test_ln_linear_split_k(M, K, N, dtype, device):
    """Narrow N at decode: the launcher splits K (132-SM heuristic) and reduces deterministically."""
    assert gemm_plan(M, N, K, dtype, 90, 132).split > 1
    seed = reproducible_seed()
    args = _inputs(M, K, N, dtype, device, residual=True)
    y1 = ln_linear(**args, activation="gelu_tanh", out=_poisoned(M, N, dtype, device))
    _check(y1, args, activation="gelu_tanh", seed=seed)
    y2 = ln_linear(**args, activation="gelu_tanh")   # counters re-armed: a second launch agrees bit for bit
    assert torch.equal(y1, y2)
    assert int(arrival_counters(y1.device, 1).abs().sum()) == 0


def _kv_problem(M, H, D, dtype, device, *, block_size=8, num_blocks=None):
    """NaN-poisoned caches with room for 2M tokens, and a shuffled slot per row, some negative (padding)."""
    num_blocks = num_blocks or -(-2 * M // block_size)
    k_cache = torch.full((num_blocks, block_size, H, D), float("nan"), dtype=dtype, device=device)
    slots = torch.randperm(num_blocks * block_size)[:M]
    slots[torch.arange(M) % 4 == 1] = -1
    return k_cache, torch.full_like(k_cache, float("nan")), slots.to(device)


# (M, H, D, dtype, split-K?): the decode tiles with split-K (fp16 and fp32), and the non-split small
# and fp32 tiles where a BLOCK_N column tile straddles C and 2C (C = 80, 48 with BLOCK_N = 128, 64).
KV_CASES = [(3, 8, 64, torch.float16, True), (5, 4, 64, torch.float32, True), (1, 4, 64, torch.float32, True),
            (97, 5, 16, torch.float16, True), (300, 5, 16, torch.float16, False), (270, 3, 16, torch.float32, False)]


@pytest.mark.parametrize("M,H,D,dtype,split", KV_CASES,
                         ids=[f"{m}x{h}x{d}-{str(dt)[6:]}-{'split' if sp else 'nosplit'}" for m, h, d, dt, sp in KV_CASES])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_ln_linear_fused_kv_write(M, H, D, dtype, split, slot_dtype, device):
    """ln_1 -> c_attn with kv_cache: the output as without it, and the K/V columns in the caches at
    exactly the slotted rows, bit-equal to write_kv_ref of the output's K/V views."""
    C = H * D
    assert (gemm_plan(M, 3 * C, C, dtype, 90, 132).split > 1) == split
    seed = reproducible_seed()
    args = _inputs(M, C, 3 * C, dtype, device)
    k_cache, v_cache, slots = _kv_problem(M, H, D, dtype, device)
    slots = slots.to(slot_dtype)
    y = ln_linear(**args, out=_poisoned(M, 3 * C, dtype, device), kv_cache=(k_cache, v_cache, slots))
    _check(y, args, seed=seed, activation=None)
    k_ref, v_ref = torch.full_like(k_cache, float("nan")), torch.full_like(v_cache, float("nan"))
    _, k, v = y.view(M, 3, H, D).unbind(1)
    write_kv_ref(k, v, k_ref, v_ref, slots)
    torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0, equal_nan=True)
    written = torch.zeros(k_cache.shape[0] * k_cache.shape[1], dtype=torch.bool)
    written[slots[slots >= 0].long().cpu()] = True
    for cache in (k_cache, v_cache):
        rows = cache.view(-1, H, D).cpu()
        assert not rows[written].isnan().any() and rows[~written].isnan().all()
    # the reference honours the same contract
    k_ref.fill_(float("nan"))
    v_ref.fill_(float("nan"))
    y_ref = ln_linear_ref(**args, kv_cache=(k_ref, v_ref, slots))
    torch.testing.assert_close(k_ref.isnan(), k_cache.isnan())
    _, k, v = y_ref.view(M, 3, H, D).unbind(1)
    assert torch.equal(k_ref.view(-1, H, D)[slots[slots >= 0].long()], k[slots >= 0])
    assert torch.equal(v_ref.view(-1, H, D)[slots[slots >= 0].long()], v[slots >= 0])


@pytest.mark.parametrize("weight_view", ["transposed", "contiguous"])
def test_ln_linear_lm_head_vocab(weight_view, device, few_sms):
    """ln_f -> LM head: N = 50257 (no tile divides it), no bias, W = wte^T as a view or a copy."""
    M, K, N = 2, 64, 50257
    seed = reproducible_seed()
    args = _inputs(M, K, N, torch.float32, device, bias=False)
    wte = torch.randn(N, K, device=device) / K ** 0.5
    args["weight"] = wte.t() if weight_view == "transposed" else wte.t().contiguous()
    y = ln_linear(**args, out=_poisoned(M, N, torch.float32, device))
    _check(y, args, activation=None, seed=seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ln_linear_strided_x_and_residual(dtype, device):
    M, K, N = 17, 72, 100
    seed = reproducible_seed()
    args = _inputs(M, K, N, dtype, device, residual=False)
    args["x"] = args["x"].repeat(1, 3)[:, K:2 * K]   # a slice of a wider tensor (same values)
    args["residual"] = torch.randn(M, 2 * N, device=device).to(dtype)[:, N:]   # row stride 2N
    assert args["x"].stride(0) == 3 * K and not args["x"].is_contiguous()
    y = ln_linear(**args, out=_poisoned(M, N, dtype, device))
    _check(y, args, activation=None, seed=seed)


def test_ln_linear_out_row_strided(device):
    M, K, N = 3, 24, 40
    seed = reproducible_seed()
    args = _inputs(M, K, N, torch.float32, device)
    wide = torch.full((M, 2 * N), float("nan"), device=device)
    y = ln_linear(**args, out=wide[:, :N])
    _check(y, args, activation=None, seed=seed)
    assert torch.isnan(wide[:, N:]).all()   # nothing written outside the view


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,C", [(1, 256), (3, 72), (17, 24), (257, 24)])
def test_ln_gelu_mlp(dtype, M, C, device, few_sms):
    seed = reproducible_seed()
    H = 4 * C
    a = _inputs(M, C, H, dtype, device)
    p = _inputs(M, H, C, dtype, device, ln=False)
    args = dict(x=a["x"], ln_weight=a["ln_weight"], ln_bias=a["ln_bias"], fc_weight=a["weight"], fc_bias=a["bias"],
                proj_weight=p["weight"], proj_bias=p["bias"])
    y = ln_gelu_mlp(**args, out=_poisoned(M, C, dtype, device))
    _check(y, args, activation=None, seed=seed, ref_fn=ln_gelu_mlp_ref)


def test_large_values_no_nan(device):
    """A residual stream with a large mean and outliers, and GELU far into both tails."""
    M, K, N = 3, 72, 100
    seed = reproducible_seed()
    args = _inputs(M, K, N, torch.float32, device)
    args["x"] = args["x"] * 100 + 1000
    args["weight"] = args["weight"] * 50
    y = ln_linear(**args, activation="gelu_tanh", out=_poisoned(M, N, torch.float32, device))
    _check(y, args, activation="gelu_tanh", seed=seed)


def test_gelu_tails():
    y = torch.tensor([-1e4, -50.0, -5.0, 0.0, 5.0, 50.0, 1e4])
    assert torch.allclose(gelu_tanh(y), torch.tensor([0.0, 0.0, -2.9e-7, 0.0, 5.0, 50.0, 1e4]), atol=1e-6)


def test_bad_inputs(device):
    M, K, N = 3, 24, 40
    a = _inputs(M, K, N, torch.float32, device, residual=True)
    with pytest.raises(ValueError, match="weight"):
        ln_linear(a["x"], a["ln_weight"], a["ln_bias"], a["weight"][:-1], a["bias"])
    with pytest.raises(TypeError, match="weight"):
        ln_linear(a["x"], a["ln_weight"], a["ln_bias"], a["weight"].half(), a["bias"])
    with pytest.raises(ValueError, match="activation"):
        ln_linear(**a, activation="relu")
    with pytest.raises(ValueError, match="ln_weight"):
        ln_linear(a["x"], a["ln_weight"][:-1], a["ln_bias"], a["weight"], a["bias"])
    with pytest.raises(ValueError, match="ln_bias"):
        ln_linear(a["x"], a["ln_weight"], a["ln_bias"][:-1], a["weight"], a["bias"])
    with pytest.raises(ValueError, match="bias"):
        ln_linear(a["x"], a["ln_weight"], a["ln_bias"], a["weight"], a["bias"][:-1])
    with pytest.raises(ValueError, match="residual"):
        ln_linear(**{**a, "residual": a["residual"][:, :-1]})
    with pytest.raises(TypeError, match="residual"):
        ln_linear(**{**a, "residual": a["residual"].half()})
    with pytest.raises(ValueError, match="x"):
        ln_linear(a["x"][0], a["ln_weight"], a["ln_bias"], a["weight"])
    with pytest.raises(TypeError, match="x"):
        ln_linear(a["x"].to(torch.float64), None, None, a["weight"].to(torch.float64))
    with pytest.raises(ValueError, match="out"):
        ln_linear(**a, out=torch.empty(M, N + 1, device=device))
    with pytest.raises(TypeError, match="out"):
        ln_linear(**a, out=torch.empty(M, N, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="proj_weight"):
        ln_gelu_mlp(a["x"], a["ln_weight"], a["ln_bias"], torch.randn(K, 4 * K), None, torch.randn(4 * K, K + 1), None)
    with pytest.raises(ValueError, match="fc_weight"):
        ln_gelu_mlp(a["x"], a["ln_weight"], a["ln_bias"], torch.randn(K + 1, 4 * K), None, torch.randn(4 * K, K), None)


def test_bad_kv_cache(device):
    M, H, D = 3, 2, 8
    a = _inputs(M, H * D, 3 * H * D, torch.float32, device)
    kc, vc, slots = _kv_problem(M, H, D, torch.float32, device)
    with pytest.raises(TypeError, match="kv_cache must be a tuple"):
        ln_linear(**a, kv_cache=[kc, vc, slots])
    with pytest.raises(ValueError, match="N = 3 \\* H \\* D"):
        ln_linear(**{**a, "weight": a["weight"][:, :-D], "bias": None}, kv_cache=(kc, vc, slots))
    with pytest.raises(TypeError, match="k_cache/v_cache dtype"):
        ln_linear(**a, kv_cache=(kc.half(), vc.half(), slots))
    with pytest.raises(ValueError, match="v_cache"):
        ln_linear(**a, kv_cache=(kc, vc[:, :4], slots))
    kp, vp = (torch.zeros(*kc.shape[:3], 2 * D, device=device)[..., :D] for _ in range(2))   # head rows 2D apart
    with pytest.raises(ValueError, match="must be contiguous"):
        ln_linear(**a, kv_cache=(kp, vp, slots))
    with pytest.raises(ValueError, match="slot_mapping"):
        ln_linear(**a, kv_cache=(kc, vc, slots[:-1]))
    with pytest.raises(TypeError, match="slot_mapping"):
        ln_linear(**a, kv_cache=(kc, vc, slots.float()))


def test_empty_batch(device):
    a = _inputs(0, 24, 40, torch.float16, device)
    assert ln_linear(**a).shape == (0, 40)


def test_plan_regimes():
    assert gemm_plan(1, 2304, 768, torch.float16, 90, 132).tile_name == "decode"
    assert gemm_plan(100, 2304, 768, torch.float16, 90, 132).tile_name == "batch"
    assert gemm_plan(300, 3072, 768, torch.float16, 90, 132).tile_name == "small"
    assert gemm_plan(8192, 3072, 768, torch.float16, 90, 132).tile_name == "prefill_sm90"
    assert gemm_plan(8192, 3072, 768, torch.float16, 80, 108).tile_name == "prefill"
    assert gemm_plan(8192, 3072, 768, torch.float32, 90, 132).tile_name == "fp32"
    assert gemm_plan(1, 50257, 768, torch.float16, 90, 132).split == 1   # 393 column tiles fill the GPU alone
    for M in (300, 8192):
        assert gemm_plan(M, 3072, 768, torch.float16, 90, 132).split == 1
    shipped = {(s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"], s.constexprs["BLOCK_K"]) for s in fl.aot_kernels()}
    assert {(t.block_m, t.block_n, t.block_k) for t in UNSPLIT_TILES.values()} <= shipped


def test_compile_report_clean(tmp_path):
    """Every shipped configuration compiles for sm_80 and sm_90 with no spills, shared memory within
    limits, and tensor-core instructions (HGMMA on sm_90 for BLOCK_M >= 64 tiles). Runs the report in
    a subprocess: under TRITON_INTERPRET=1 the @triton.jit functions cannot be compiled in-process."""
    pytest.importorskip("triton.backends.nvidia")
    specs = fl.aot_kernels()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "gpt2_engine.cli", "kernels", "--filter", "ln_linear", "--json", str(report)],
                          cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=600)
    assert report.exists(), proc.stdout + proc.stderr
    rows = json.loads(report.read_text())
    assert {r["label"] for r in rows} == {s.label for s in specs}
    assert len(rows) == 2 * len(specs)
    assert all(r["ok"] for r in rows), proc.stdout


@pytest.mark.cuda
@pytest.mark.parametrize("M,C", [(1, 768), (16, 1600), (1024, 768)])
def test_bf16_on_gpu(M, C, device):
    seed = reproducible_seed()
    for K, N, act, ln, res in ((C, 4 * C, "gelu_tanh", True, False), (4 * C, C, None, False, True)):
        args = _inputs(M, K, N, torch.bfloat16, device, ln=ln, residual=res)
        y = ln_linear(**args, activation=act, out=_poisoned(M, N, torch.bfloat16, device))
        _check(y, args, activation=act, seed=seed)


# ---- LayerNorm folded into the GEMM ------------------------------------------------------------

def _gpt2_like(M, K, device, *, seed):
    """Activations shaped like GPT-2's residual stream: per-row nonzero means, a few channels ~100x the rest."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) + 2.0 * torch.rand(M, 1, generator=g) + 0.5
    outliers = torch.randperm(K, generator=g)[:3]
    x[:, outliers] *= 100
    return x.to(device)


FOLD_CASES = [(768, 1), (1024, 3), (1280, 1), (1600, 2), (100, 5), (333, 17), (1111, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("C,M", FOLD_CASES)
def test_folded_layernorm_gpt2_activations(C, M, dtype, device):
    """fold_layernorm + ln_linear on GPT-2-like activations against the unfolded fp32 reference:
    fp32 within 1e-5 (normwise relative), fp16 by the 2x rule against torch's fp16 LN + matmul."""
    seed = reproducible_seed()
    N = 3 * C if C < 300 else 200    # wide rows: a narrow N keeps the interpreter quick (K is what the
                                     # fold's numerics depend on; columns are independent)
    x = _gpt2_like(M, C, device, seed=seed)
    args = _inputs(M, C, N, torch.float32, device)
    args["x"] = x
    lo = {k: v.to(dtype) if v is not None else None for k, v in args.items()}
    folded = fold_layernorm(lo["ln_weight"], lo["ln_bias"], lo["weight"], lo["bias"])
    y = ln_linear(lo["x"], None, None, folded, None, out=_poisoned(M, N, dtype, device))
    _check(y, lo, activation=None, seed=seed)


def test_fold_reference_matches_unfolded(device):
    seed = reproducible_seed()
    M, K, N = 4, 333, 50
    args = _inputs(M, K, N, torch.float32, device)
    args["x"] = _gpt2_like(M, K, device, seed=seed)
    folded = fold_layernorm(args["ln_weight"], args["ln_bias"], args["weight"], args["bias"])
    assert isinstance(folded, FoldedLinear) and folded.colsum.dtype == torch.float32
    ref = ln_linear_ref(**args)
    got = ln_linear_ref(args["x"], None, None, folded, None)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max(), seed
    lm_head = torch.randn(N, K, device=device).t()                  # wte^T: K-major view
    assert fold_layernorm(args["ln_weight"], None, lm_head).weight.stride() == lm_head.stride()


def test_folded_weight_rejects_unfolded_params(device):
    a = _inputs(2, 24, 40, torch.float32, device)
    folded = fold_layernorm(a["ln_weight"], a["ln_bias"], a["weight"], a["bias"])
    with pytest.raises(ValueError, match="FoldedLinear"):
        ln_linear(a["x"], a["ln_weight"], None, folded)
    with pytest.raises(ValueError, match="FoldedLinear"):
        ln_linear(a["x"], None, None, folded, a["bias"])


def test_split_is_batch_invariant(device):
    """A row's result does not depend on how many rows are batched with it (same planned split and
    row tile for M = 1, 7, 64): bit-identical."""
    seed = reproducible_seed()
    K, N = 768, 256
    args = _inputs(64, K, N, torch.float16, device)
    args["x"] = _gpt2_like(64, K, device, seed=seed).half()
    folded = fold_layernorm(args["ln_weight"], args["ln_bias"], args["weight"], args["bias"])
    assert len({(gemm_plan(M, N, K, torch.float16, 90, 132).split, gemm_plan(M, N, K, torch.float16, 90, 132).k_per_split)
                for M in (1, 7, 64, 65, 256)}) == 1
    full = ln_linear(args["x"], None, None, folded, None, activation="gelu_tanh")
    for M in (1, 7):
        part = ln_linear(args["x"][:M], None, None, folded, None, activation="gelu_tanh")
        assert torch.equal(part, full[:M]), (M, seed)


def test_lm_head_output_rows_padded_for_vector_stores(device, few_sms):
    M, K, N = 2, 64, 1001
    seed = reproducible_seed()
    args = _inputs(M, K, N, torch.float32, device, bias=False)
    args["weight"] = (torch.randn(N, K, device=device) / K ** 0.5).t()
    y = ln_linear(**args)
    assert y.shape == (M, N) and y.stride() == (1008, 1)            # rows padded to a multiple of 16
    assert torch.equal(y.as_strided((M, 1008), (1008, 1))[:, N:], torch.zeros(M, 7, device=device))
    _check(y, args, activation=None, seed=seed)


def test_partial_launch_cannot_corrupt_later_results(device, monkeypatch):
    """A split-K launch that dies after some splits have arrived (here: all splits but the last, then
    an exception) leaves its counters re-armed, so the next launch elects correctly."""
    M, K, N = 3, 1024, 96
    seed = reproducible_seed()
    args = _inputs(M, K, N, torch.float16, device, residual=True)
    plan = gemm_plan(M, N, K, torch.float16, 90, 132)
    assert plan.split > 2
    real_launch = fl.launch

    def dying_launch(fn, grid, *a, **kw):
        real_launch(fn, (grid[0], grid[1] - 1, grid[2]), *a, **kw)   # every tile: split - 1 arrivals
        raise KeyboardInterrupt

    monkeypatch.setattr(fl, "launch", dying_launch)
    with pytest.raises(KeyboardInterrupt):
        ln_linear(**args)
    monkeypatch.setattr(fl, "launch", real_launch)
    assert int(arrival_counters(torch.device(device), 1).abs().sum()) == 0
    y = ln_linear(**args, out=_poisoned(M, N, torch.float16, device))
    _check(y, args, activation=None, seed=seed)


def test_graph_buffers_are_private_and_zeroed(device):
    dev = torch.device(device)
    stream_counters = arrival_counters(dev, 1)
    stream_counters[:3] = 5                                          # stale state on the stream's buffer
    with arrival_counter.graph_buffers(dev) as scoped:
        inside = arrival_counters(dev, 1)
        assert inside is scoped.counters and inside is not stream_counters and not inside.any()
    assert arrival_counters(dev, 1) is stream_counters
    stream_counters.zero_()
