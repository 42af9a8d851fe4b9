"""Int8 weight-only GEMM: y = act((LN(x) @ q^T) * scale + bias) + residual, dequantising in registers.

What
    int8_ln_linear(x, ln_weight, ln_bias, q, scale, bias, activation, residual, kv_cache) with int8
    codes q [N, K] (one row per output channel) and fp32 scales [N] (engine/quantization.py:
    symmetric per-output-channel). At decode the weights are all of the traffic, and int8 halves
    the bytes of fp16: twice the batch-1 roofline of kernels.ln_linear.

Algorithm (one @triton.jit kernel; the LayerNorm, when asked for, is one F.layer_norm before it)
    Each program owns a [BLOCK_M, BLOCK_N] output tile and a K range (split-K). Main loop: the
    activation tile [BLOCK_M, BLOCK_K] is loaded in x's dtype; the weight tile is loaded as int8
    [BLOCK_K, BLOCK_N] (for each of the BLOCK_N output rows of q, BLOCK_K contiguous bytes: 128-byte
    coalesced segments) and widened to x's dtype in registers (every int8 code is exact in fp16,
    bf16 and fp32); tl.dot accumulates in fp32 (tensor cores for fp16/bf16: HMMA at BLOCK_M = 16).
    The per-column scale is applied once to the fp32 accumulator after the K loop, not per tile:
    (sum_k a_k q_kn) * s_n == sum_k a_k (q_kn s_n), so the dequantised weight never exists. Then
    kernels.fused_linear's epilogue: + bias, GELU-tanh, + residual, cast, and the optional paged KV
    write of the QKV projection's K/V columns.
    Split-K (decode, M <= 64): a GPT-2 projection with N = 768 has 12 BLOCK_N = 64 column tiles,
    far from filling 132 SMs; K is split across a second grid axis so that about 2 x SMs programs
    run, each split stores its fp32 partial to a workspace [SPLIT, M, N], and the last-arriving split
    of a tile (kernels/arrival_counter.py) sums the partials in the fixed order 0..SPLIT-1, scales
    and runs the epilogue: one launch, deterministic, no fp32 atomics, graph-capturable.

Why the LayerNorm is not a prologue here: kernels.ln_linear fuses it (Chan's one-pass statistics);
    the int8 GEMM calls F.layer_norm first instead (one extra launch of M x K elements, ~0.1% of the
    weight bytes at decode) rather than duplicating that prologue; sharing it is a follow-up.

Tiles (`_TILES`, used by the launcher and `aot_kernels()`)
    decode   M <= 64   16 x 64 x 128, 4 warps, 4 stages; split-K while tiles < SMs
    prefill  M > 64    64 x 128 x 64, 8 warps, 3 stages (compute bound: the widening is off the
                       critical path of the tensor cores; 4 warps spilled with the GELU epilogue)
    fp32 x   any M     16/64 x 64 x 32, 8 warps, FMA dots (correctness path; int8 weights are for fp16/bf16)

Limits: x [M, K] (contiguous last dim) in fp16 / bf16 / fp32; q int8 [N, K] with contiguous rows;
    scale [N] (read as fp32); bias [N], residual [M, N] and the output in x's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.arrival_counter import arrival_counters, last_to_arrive
from kernels.fused_linear import _check_kv_cache, _device_info, _epilogue, gelu_tanh, write_kv_columns_ref


@triton.jit
def _int8_linear_kernel(
    x_ptr, q_ptr, scale_ptr, bias_ptr, res_ptr, out_ptr, ws_ptr, counter_ptr,
    k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_xm, stride_qn, stride_rm, stride_om,
    M, N, K, k_per_split, kv_width,
    HAS_BIAS: tl.constexpr, APPLY_GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr, WRITE_KV: tl.constexpr,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)   # M tiles first: at decode there is one, so neighbours share no B panel anyway
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)   # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)   # [BLOCK_N]
    offs_k = tl.arange(0, BLOCK_K)                     # [BLOCK_K]
    m_mask = offs_m < M
    n_mask = offs_n < N

    # this split's K range [k_start, k_start + k_len), walked by advancing both tile pointers
    k_start = pid_k * k_per_split
    k_len = min(K - k_start, k_per_split)
    a_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + (k_start + offs_k)[None, :]   # [BLOCK_M, BLOCK_K]
    b_ptrs = q_ptr + offs_n.to(tl.int64)[None, :] * stride_qn + (k_start + offs_k)[:, None]   # [BLOCK_K, BLOCK_N]: q^T
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i in range(0, tl.cdiv(k_len, BLOCK_K)):
        k_ok = offs_k < k_len - i * BLOCK_K
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_mask[None, :], other=0)      # int8 codes
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision="ieee")            # widened in registers
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    finish = True
    if SPLIT_K:
        acc, finish = _merge_splits(acc, ws_ptr, counter_ptr + pid_m * tl.num_programs(1) + pid_n, offs_m, offs_n,
                                    m_mask, n_mask, M, N, pid_k, tl.num_programs(2))
    if finish:
        scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)   # [BLOCK_N], per output column
        # fused_linear's epilogue without its LayerNorm (no moments, no column sums; all N columns stored)
        _epilogue(acc * scale[None, :], 0.0, 0.0, bias_ptr, bias_ptr, res_ptr, out_ptr, k_cache_ptr, v_cache_ptr,
                  slot_ptr, stride_rm, stride_om, offs_m, offs_n, M, N, K, kv_width, N, 0.0,
                  False, HAS_BIAS, APPLY_GELU, HAS_RESIDUAL, WRITE_KV)


@triton.jit
def _merge_splits(acc, ws_ptr, counter_ptr, offs_m, offs_n, m_mask, n_mask, M, N, split, num_splits):
    """(sum of all splits' partials, True) in the last split of a tile to arrive, (acc, False) elsewhere.

    Workspace [num_splits, M, N] fp32, contiguous (decode only: small, int32 offsets suffice); the
    partials are summed in split order 0..num_splits-1 whatever the arrival order: deterministic."""
    offsets = offs_m[:, None] * N + offs_n[None, :]
    valid = m_mask[:, None] & n_mask[None, :]
    tl.store(ws_ptr + split * M * N + offsets, acc, mask=valid)
    is_last = last_to_arrive(counter_ptr, num_splits)
    if is_last:
        acc = tl.zeros_like(acc)
        for s in range(0, num_splits):
            acc += tl.load(ws_ptr + s * M * N + offsets, mask=valid, other=0.0, cache_modifier=".cg")
    return acc, is_last


@dataclass(frozen=True)
class Int8Tile:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


_TILES = {
    "decode": Int8Tile(16, 64, 128, 4, 4),
    "prefill": Int8Tile(64, 128, 64, 8, 3),      # 4 warps: 227-234 registers, spills on sm_80 with GELU
    "fp32_decode": Int8Tile(16, 64, 32, 8, 2),   # 4 warps spilled 8 bytes on sm_90 with GELU
    "fp32": Int8Tile(64, 64, 32, 8, 2),
}
_DECODE_MAX_M = 64


def _tile_and_split(M: int, N: int, K: int, dtype: torch.dtype, num_sms: int) -> tuple[str, int]:
    """Tile name and K splits: decode tiles that under-fill the GPU split K to reach ~2 x SMs programs."""
    decode = M <= _DECODE_MAX_M
    name = ("fp32_decode" if decode else "fp32") if dtype == torch.float32 else ("decode" if decode else "prefill")
    tile = _TILES[name]
    tiles = triton.cdiv(M, tile.block_m) * triton.cdiv(N, tile.block_n)
    if not decode or tiles >= num_sms:
        return name, 1
    return name, max(1, min(triton.cdiv(2 * num_sms, tiles), triton.cdiv(K, 2 * tile.block_k)))


def _check_int8_weight(q, scale, K, device):
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8 or q.dim() != 2:
        raise TypeError(f"q must be an int8 [N, K] tensor, got {getattr(q, 'dtype', type(q).__name__)}")
    if q.shape[1] != K:
        raise ValueError(f"q must be [N, K={K}] (one row per output channel), got {tuple(q.shape)}")
    if not isinstance(scale, torch.Tensor) or scale.shape != (q.shape[0],) or not scale.is_floating_point():
        raise ValueError(f"scale must be a floating-point [{q.shape[0]}] tensor, got {getattr(scale, 'shape', scale)}")
    if q.device != device or scale.device != device:
        raise ValueError(f"q ({q.device}) and scale ({scale.device}) must be on x's device {device}")


def int8_ln_linear(x, ln_weight, ln_bias, q, scale, bias=None, *, eps=1e-5, activation=None, residual=None,
                   out=None, kv_cache=None):
    """act((LN(x) @ q^T) * scale + bias) + residual; x [M, K], q int8 [N, K], scale [N].

    ln_weight None means no LayerNorm. kv_cache = (k_cache, v_cache, slot_mapping) as for
    kernels.ln_linear (N = 3 H D: the K/V columns also go to the paged caches)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be a 2-D float32/float16/bfloat16 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if activation not in (None, "gelu_tanh"):
        raise ValueError(f"activation must be None or 'gelu_tanh', got {activation!r}")
    M, K = x.shape
    _check_int8_weight(q, scale, K, x.device)
    N = q.shape[0]
    if ln_weight is not None:
        x = F.layer_norm(x, (K,), ln_weight, ln_bias, eps)
    elif ln_bias is not None:
        raise ValueError("ln_bias given without ln_weight (ln_weight None means no LayerNorm)")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have {N} elements, got {tuple(bias.shape)}")
    if residual is not None and (residual.shape != (M, N) or residual.dtype != x.dtype):
        raise ValueError(f"residual must be [{M}, {N}] in {x.dtype}, got {tuple(residual.shape)} {residual.dtype}")
    k_cache = v_cache = slot_mapping = None
    if kv_cache is not None:
        _check_kv_cache(kv_cache, x, N)
        k_cache, v_cache, slot_mapping = kv_cache
    out = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    if M == 0 or N == 0:
        return out
    x, q = x.contiguous(), q.contiguous()
    residual = residual.contiguous() if residual is not None else None
    name, split = _tile_and_split(M, N, K, x.dtype, _device_info(x.device)[1])
    tile = _TILES[name]
    k_per_split = triton.cdiv(triton.cdiv(K, split), tile.block_k) * tile.block_k
    split = triton.cdiv(K, k_per_split)   # no empty splits
    grid = (triton.cdiv(M, tile.block_m), triton.cdiv(N, tile.block_n), split)
    if split > 1:
        ws = torch.empty((split, M, N), dtype=torch.float32, device=x.device)
        counters = arrival_counters(x.device, grid[0] * grid[1])
    else:
        ws = counters = out   # unused (SPLIT_K=False)
    _int8_linear_kernel[grid](
        x, q, scale, bias if bias is not None else x, residual if residual is not None else x, out, ws, counters,
        k_cache if k_cache is not None else out, v_cache if v_cache is not None else out,
        slot_mapping if slot_mapping is not None else out,
        x.stride(0), q.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
        M, N, K, k_per_split, N // 3,
        HAS_BIAS=bias is not None, APPLY_GELU=activation == "gelu_tanh", HAS_RESIDUAL=residual is not None,
        WRITE_KV=kv_cache is not None, SPLIT_K=split > 1,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    return out


def int8_ln_linear_ref(x, ln_weight, ln_bias, q, scale, bias=None, *, eps=1e-5, activation=None, residual=None,
                       kv_cache=None):
    """The contract in plain torch: fp32 math on LN(x) rounded to x's dtype, one cast at the end."""
    h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps) if ln_weight is not None else x
    y = (h.float() @ q.float().t()) * scale.float()
    if bias is not None:
        y = y + bias.float()
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

_TL_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _aot(label, tile_name, dtype, *, bias, gelu, residual, kv=False, split, vocab=False):
    """One shipped configuration, as the JIT specialises a GPT-2 launch (q rows contiguous)."""
    from kernels.compile_report import AotKernel

    tile = _TILES[tile_name]
    t = "*" + _TL_TYPES[dtype]
    signature = {
        "x_ptr": t, "q_ptr": "*i8", "scale_ptr": "*fp32", "bias_ptr": t, "res_ptr": t, "out_ptr": t,
        "ws_ptr": "*fp32", "counter_ptr": "*i32", "k_cache_ptr": t, "v_cache_ptr": t, "slot_ptr": "*i64",
        "stride_xm": "i32", "stride_qn": "i32", "stride_rm": "i32", "stride_om": "i32",
        "M": "i32", "N": "i32", "K": "i32", "k_per_split": "i32", "kv_width": "i32",
    }
    constexprs = dict(HAS_BIAS=bias, APPLY_GELU=gelu, HAS_RESIDUAL=residual, WRITE_KV=kv, SPLIT_K=split,
                      BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k)
    aligned = ["x_ptr", "q_ptr", "scale_ptr", "bias_ptr", "res_ptr", "out_ptr", "ws_ptr", "counter_ptr",
               "k_cache_ptr", "v_cache_ptr", "slot_ptr", "stride_xm", "stride_qn", "stride_rm", "K", "k_per_split"]
    if not vocab:   # GPT-2 widths are multiples of 16; the vocabulary 50257 is not
        aligned += ["N", "kv_width", "stride_om"]
    return AotKernel(label=label, fn=_int8_linear_kernel, signature=signature, constexprs=constexprs,
                     num_warps=tile.num_warps, num_stages=tile.num_stages, aligned=tuple(aligned),
                     tensor_cores=dtype != torch.float32, wgmma_on_sm90=dtype != torch.float32 and tile.block_m >= 64)


_AOT_EPILOGUES = {   # what the engine launches: QKV (+ KV cache write), c_fc (+ GELU), c_proj (+ residual), LM head
    "bias+kv": dict(bias=True, gelu=False, residual=False, kv=True),
    "bias+gelu": dict(bias=True, gelu=True, residual=False),
    "bias+residual": dict(bias=True, gelu=False, residual=True),
    "lm-head": dict(bias=False, gelu=False, residual=False, vocab=True),
}


def aot_kernels():
    """fp16/bf16 decode tiles (split-K, except the LM head's 786 column tiles) and prefill tiles
    (the LM head's for prompt logits), and the fp32 decode tile."""
    specs = [_aot(f"int8_linear {tile} {_TL_TYPES[dtype]} {name}{' split-k' if split else ''}", tile, dtype, **epilogue, split=split)
             for dtype in (torch.float16, torch.bfloat16) for tile in ("decode", "prefill")
             for name, epilogue in _AOT_EPILOGUES.items() for split in [tile == "decode" and name != "lm-head"]]
    return specs + [_aot("int8_linear fp32_decode fp32 bias+gelu split-k", "fp32_decode", torch.float32,
                         **_AOT_EPILOGUES["bias+gelu"], split=True)]
