"""Int8 weight-only GEMM with the LayerNorm folded in: y = act(LN(x) @ W + b) + residual on int8 codes of W.

What
    int8_ln_linear(x, None, None, folded) with folded = fold_layernorm_int8(ln_weight, ln_bias, W, b)
    (at load): ln_1 -> c_attn (+ the paged KV write), ln_2 -> c_fc (+ GELU), ln_f -> LM head.
    int8_ln_linear(x, None, None, q, scale, bias, residual=r): the plain form, attn / mlp c_proj.
    Codes q [N, K] (one row per output channel) and fp32 scales [N], engine/quantization.py's
    scheme (symmetric, per output channel). At decode the weights are all of the traffic, and int8
    halves the bytes of fp16: twice the batch-1 roofline of kernels.ln_linear.

LayerNorm folded before quantizing (fold_layernorm_int8, once at load)
    LN(x) @ W + b = rstd * (x - mean) @ W' + b' with W' = diag(gamma) W and b' = beta @ W + b, as in
    kernels.fused_linear's fold; here W' (not W) is quantized: q = round(W'^T / s), s_n = max_k
    |W'_kn| / 127, so gamma shapes the per-channel ranges instead of multiplying rounded codes.
    b' is fp32 from the unquantized W; colsum_n = s_n * sum_k q_nk (an exact integer sum, rounded
    once to fp32) is the column sum of the dequantised W' the kernel actually multiplies by, so the
    centering below cancels against the same weights. The kernel computes
        y_n = rstd * (s_n * acc_n - mean * colsum_n) + b'_n,    acc_n = sum_k x_k q_nk   (fp32)
    on the raw activations (exact operands: int8 codes are exact in fp16/bf16/fp32, products of
    fp16 x and int8 q are exact in fp32), with the row's (mean, M2) merged per K tile (Chan) in the
    same main loop from the A tiles already in registers: no statistics pass before the first
    weight load and no LayerNorm launch. An int8 call cannot take a LayerNorm at call time (gamma
    must be applied before quantizing): ln_weight with raw codes is an error.

Algorithm: kernels.fused_linear's GEMM kernel itself (_ln_linear_kernel with HAS_SCALE), so the
    int8 and fp16 paths share one main loop, one split-K reduction and one epilogue. Each program
    owns a [BLOCK_M, BLOCK_N] output tile and one K range. Main loop: the A tile [BLOCK_M, BLOCK_K]
    in x's dtype; the B tile [BLOCK_K, BLOCK_N] read through the [K, N] view q^T (strides (1, K)):
    for each of the BLOCK_N output channels BLOCK_K contiguous bytes (a 64- or 128-byte segment),
    widened to x's dtype in registers; tl.dot accumulates in fp32 (HMMA for fp16/bf16, exact FMA
    for fp32); the A tile's per-row (mean, M2) is merged into the running pair. The scale is
    applied once per column after the K loop (and after the split-K reduction): (sum_k x_k q_nk)
    s_n == sum_k x_k (q_nk s_n), so the dequantised weight never exists. Epilogue: the LN
    correction, + b', GELU-tanh, + residual, cast, store, and the QKV projection's K/V columns to
    the paged caches. The LM head (N = 50257) stores whole rows of a 16-element-padded output
    (vector stores; the padding columns hold 0).

Launch plan: kernels/launch_plan.py's gemm_plan(..., int8=True), the planner of the fp16 path with
    an int8 kind. For M <= 256 the K split (BLOCK_N, BLOCK_K in {128, 64}, k_per_split, split) is a
    function of (K, N, dtype, SM count) only, never of M, and every GPT-2 small..xl decode GEMM gets
    >= 2 x SMs programs at every M in 1..256 (`gpt2-engine kernels --plan`, rows "... int8"). So a
    row's reduction (K ranges, tile order, moment merges) is the same whatever else is batched.
    Split-K partials (fp32 tiles and the rows' moments) go to a workspace; the last split of a tile
    to arrive (kernels/arrival_counter.py) sums them in the fixed order 0..split-1, merges the
    moments in that order and runs the epilogue: one launch, deterministic, graph-capturable.
    Row tiles: 16 rows up to M = 64, 64 rows up to 256 (split-K), above 256 an unsplit 64 x 128 x 64
    tile, 8 warps (prefill is compute bound and the widening is off the tensor cores' critical
    path); fp32 activations use BLOCK_K 32 (a correctness path: int8 weights are for fp16/bf16).

Memory layout and why: codes q [N, K] row-major (engine/quantization.py's Int8Weight layout), one
    row per output channel, so the per-channel scale is one fp32 per row and a K tile of one channel
    is BLOCK_K contiguous bytes (16-byte vector loads along K, whole 32-byte sectors); the kernel
    sees it as the [K, N] view q^T (stride_wk = 1, which the JIT specialises), the same K-major
    operand as the fp16 LM head's wte^T. A folded head has codes of its own (diag(gamma_f) wte^T),
    V x C bytes beside the embedding's. Folding before quantizing is also the more accurate
    order: on a 2-layer test model with non-trivial LayerNorms the max logit error against fp32 is
    0.54% of max |logit|, against 0.69% for the torch backend's unfolded int8 (codes of W).

Host side: fused_linear's plan cache, validation and launch (one key lookup per call on a hit; on
    CUDA the compiled kernel is launched directly).

Limits: x [M, K] (contiguous last dim) in fp16 / bf16 / fp32; q int8 [N, K] with contiguous rows;
    scale [N] (any float dtype, read as fp32); bias [N], residual [M, N] and the output in x's
    dtype (the folded b' and colsum are fp32).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpt2_engine.kernels import checks
from gpt2_engine.kernels import fused_linear as fl
from gpt2_engine.kernels.fused_linear import gelu_tanh, write_kv_columns_ref

_QMAX = 127         # symmetric int8 codes: -127..127


# ----------------------------------------------------------------------------------------------
# LayerNorm folding and quantization (done once at load by the engine)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FoldedInt8Linear:
    """LayerNorm(gamma, beta) then x @ W + b, folded and quantized: q int8 [N, K] and scale fp32 [N]
    of W' = diag(gamma) W (per output channel), bias b' = beta @ W + b (fp32 [N]) and colsum_n =
    scale_n * sum_k q_nk (fp32 [N], the column sums of the dequantised W')."""
    q: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor
    colsum: torch.Tensor


def quantize_per_channel(weight_out_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel (per-row) int8 codes q [out, in] and fp32 scales s [out] of a
    floating-point [out, in] weight: s = max |row| / 127 (1 for an all-zero row), q = round(W / s)."""
    if weight_out_in.dim() != 2 or not weight_out_in.is_floating_point():
        raise ValueError(f"weight must be a 2-D floating-point [out, in] tensor, got {weight_out_in.dtype} "
                         f"of shape {tuple(weight_out_in.shape)}")
    w = weight_out_in.float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / _QMAX, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-_QMAX, _QMAX).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def fold_layernorm_int8(ln_weight, ln_bias, weight, bias=None) -> FoldedInt8Linear:
    """fold_layernorm(ln_weight, ln_bias, weight [K, N], bias) in fp32, then W' quantized with
    quantize_per_channel; ln_bias None = 0, weight in any float dtype and strides."""
    folded = fl.fold_layernorm(ln_weight, ln_bias, weight.float(), bias)   # W' and b' in fp32, the checks
    q, scale = quantize_per_channel(folded.weight.t())                   # [N, K], one scale per output channel
    colsum = (q.sum(1, dtype=torch.int64).double() * scale.double()).float()
    return FoldedInt8Linear(q, scale, folded.bias, colsum.contiguous())


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

def _validate(x, q, scale, bias, colsum, activation, residual, out, kv_cache):
    """Every check of an int8_ln_linear call (on a plan-cache miss only: the key covers all it reads)."""
    fl._check_x(x, activation)
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8 or q.dim() != 2:
        raise TypeError(f"q must be an int8 [N, K] tensor, got {getattr(q, 'dtype', type(q).__name__)}")
    K = x.shape[1]
    if q.shape[1] != K:
        raise ValueError(f"q must be [N, K={K}] (one row per output channel), got {tuple(q.shape)}")
    if q.stride(1) != 1:
        raise ValueError(f"q must have contiguous rows, got strides {q.stride()}")
    checks.same_device("q", q, "x", x.device)
    if scale is None:
        raise TypeError("scale must be a floating-point [N] tensor with int8 codes q, got None")
    fl._check_operands(x, q.shape[0], (("scale", scale), ("bias", bias), ("colsum", colsum)), residual, out, kv_cache)


def int8_ln_linear(x, ln_weight, ln_bias, q, scale=None, bias=None, *, eps=1e-5, activation=None, residual=None,
                   out=None, kv_cache=None):
    """act(LN(x) @ W + b) + residual on int8 weights in one launch; x [M, K].

    q is a FoldedInt8Linear (fold_layernorm_int8 at load; ln_weight, ln_bias, scale and bias None):
    the LayerNorm's statistics are accumulated in the GEMM's main loop; or int8 codes [N, K] with
    scale [N] and an optional bias, no LayerNorm: x @ (q * scale[:, None])^T + bias. `out`,
    `residual` and kv_cache = (k_cache, v_cache, slot_mapping) as for kernels.ln_linear."""
    if isinstance(q, FoldedInt8Linear):
        if ln_weight is not None or ln_bias is not None or scale is not None or bias is not None:
            raise ValueError("with a FoldedInt8Linear, ln_weight, ln_bias, scale and bias must be None (they are folded in)")
        q, scale, bias, colsum = q.q, q.scale, q.bias, q.colsum
    elif ln_weight is not None or ln_bias is not None:
        raise ValueError("int8 codes take no LayerNorm at call time: fold it in at load with fold_layernorm_int8 "
                         "(gamma must scale W before it is quantized)")
    else:
        colsum = None
    try:
        key = ("int8", fl._meta(x), fl._meta(q), fl._meta(scale), fl._meta(bias), fl._meta(colsum), fl._meta(residual),
               fl._meta(out), activation, None if kv_cache is None else tuple(map(fl._meta, kv_cache)))
    except (AttributeError, TypeError):   # not tensors: the checks in make() name the culprit
        key = None

    def make():
        _validate(x, q, scale, bias, colsum, activation, residual, out, kv_cache)
        return fl._make_plan(x, q.t(), residual, out, colsum is not None, bias is not None, activation, kv_cache,
                             int8=True)

    plan = fl._cached_plan(key, make)
    operands = (q, scale, bias if bias is not None else x, colsum if colsum is not None else x)
    return fl._run(plan, key, x, operands, residual, out, kv_cache, eps)


def int8_ln_linear_ref(x, ln_weight, ln_bias, q, scale=None, bias=None, *, eps=1e-5, activation=None, residual=None,
                       kv_cache=None):
    """The contract in plain torch, fp32 math and one cast at the end. A FoldedInt8Linear:
    rstd * ((x @ q^T) * scale - mean * colsum) + b'. Codes: (LN(x) rounded to x's dtype, when
    ln_weight is given: the unfolded form the torch backend runs) @ (q * scale)^T + bias."""
    if isinstance(q, FoldedInt8Linear):
        h = x.float()
        var, mean = torch.var_mean(h, dim=-1, keepdim=True, correction=0)
        y = torch.rsqrt(var + eps) * ((h @ q.q.float().t()) * q.scale - mean * q.colsum) + q.bias
    else:
        h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps) if ln_weight is not None else x
        y = (h.float() @ q.float().t()) * scale.float()
        y = y + bias.float() if bias is not None else y
    if activation == "gelu_tanh":
        y = gelu_tanh(y)
    if residual is not None:
        y = y + residual.float()
    y = y.to(x.dtype)
    if kv_cache is not None:
        write_kv_columns_ref(y, kv_cache)
    return y


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile report entries
# ----------------------------------------------------------------------------------------------

def aot_kernels():
    """Every (tile, epilogue) gemm_plan(int8=True) picks for GPT-2 small..xl: the planned split-K tiles
    (fused_linear.planned_aot_kernels) and the unsplit tiles above M = 256 (fp16 with the LM head's
    for prompt logits, and fp32), all on int8 codes."""
    from gpt2_engine.kernels.launch_plan import UNSPLIT_INT8_TILES

    specs = fl.planned_aot_kernels("int8_linear", int8=True)
    for dtype, name in ((torch.float16, "int8_prefill"), (torch.float32, "fp32")):
        for epi in ("ln+bias+kv", "ln+bias+gelu", "bias+residual") + (("lm-head wte^T",) if name != "fp32" else ()):
            specs.append(fl._aot(f"int8_linear {name} {fl._TL_TYPES[dtype]} {epi}", UNSPLIT_INT8_TILES[name], dtype,
                                 **fl._EPILOGUES[epi][1], split=False, int8=True))
    return specs
