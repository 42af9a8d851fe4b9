"""LayerNorm-prologue GEMM with bias / GELU / residual epilogues, and the fused GPT-2 MLP.

What
    ln_linear(x, ln_weight, ln_bias, weight, bias, activation, residual) = act(LN(x) @ W + b) + r
    in one launch: ln_1 -> c_attn (N = 3C), ln_2 -> c_fc (N = 4C, GELU), attn c_proj and mlp
    c_proj (+ residual, no LN), ln_f -> LM head (N = vocab = 50257, no bias, W = wte^T).
    ln_gelu_mlp = two ln_linear launches: c_fc with LN prologue and GELU epilogue writing the
    hidden activation once, then c_proj with bias + residual epilogue.
    ln_linear(..., kv_cache=(k_cache, v_cache, slot_mapping)) on the c_attn projection also
    stores the K and V columns into the paged KV cache (what write_kv does, without its launch).

Algorithm (one @triton.jit GEMM kernel; constexpr flags select prologue / epilogue / split-K)
    Each program owns a [BLOCK_M, BLOCK_N] output tile (grouped "GROUP_M" ordering so that the
    programs running together share B column-panels in L2 during prefill).
    1. LayerNorm statistics (HAS_LN): one pass over the K dimension of the tile's A rows in fp32,
       merging per-chunk (mean, M2) pairs with Chan's parallel formula; numerically as good as
       two-pass (no E[x^2] - E[x]^2 cancellation on residual streams with a large mean) but reads
       the rows once. rstd = 1 / sqrt(M2 / K + eps) (biased variance, like torch).
    2. Main loop over K: the A tile is normalised as it is loaded,
       (x - mean) * rstd * gamma + beta in fp32, then cast to the dot dtype, so LN(x) never goes
       to memory; B tiles come straight from the weight. tl.dot accumulates in fp32: tensor cores
       for fp16/bf16 (HMMA on sm_80, wgmma/HGMMA on sm_90 for BLOCK_M >= 64); exact fp32 FMA dots
       (input_precision="ieee", no tf32) for fp32 inputs.
    3. Epilogue in fp32: + bias, GELU tanh (as y * sigmoid(2u), the same function as
       0.5 y (1 + tanh u) without a tanh instruction), + residual, cast to x's dtype, store.
       KV write (WRITE_KV): the output is [M, 3C] = [q | k | v] with C = H * D, and the caches
       [num_blocks, block_size, H, D] are contiguous, so token slot s's K row is the C elements
       at s * C: output column c in [C, 2C) also goes to k_cache[s * C + c - C], c in [2C, 3C)
       to v_cache[s * C + c - 2C], rows with slot < 0 (padding) are skipped. A column tile may
       straddle C or 2C (C = 1600 with BLOCK_N = 128): the masks are per column.
    Decode split-K (SPLIT_K): at decode M is 1..64 and the weights are all of the traffic; a GPT-2
    projection with N = 768 has only 12 BLOCK_N = 64 column tiles, far from filling 132 SMs. The
    launcher then splits K across a second grid axis (each split >= 2 BLOCK_K). Every split stores
    its fp32 partial tile to a workspace [SPLIT, M, N]; a per-tile arrival counter
    (kernels/arrival_counter.py: the determinism and memory-ordering arguments are there) elects
    the last-arriving split, which sums the SPLIT partials in the fixed order 0..SPLIT-1 (L2
    loads, .cg) and runs the epilogue (KV write included). Bit-for-bit deterministic, no fp32
    atomics, CUDA-graph capturable (the counters re-arm themselves).

Weight layout decision: the HF Conv1D layout [K, N] as loaded, no packing. For a row-major [K, N]
    weight a [BLOCK_K, BLOCK_N] tile is BLOCK_K rows of BLOCK_N contiguous elements (128-256 byte
    coalesced rows, a full line per row at decode's BLOCK_N = 64 fp16), which is the natural B
    operand of tl.dot and of wgmma (smem B tile, N-major); packing would buy nothing and would cost
    a second copy of 0.25-3 GB of weights or a load-time transform the torch backend does not need.
    Strides are arbitrary, so the LM head may pass wte.t() (a [K, N] view with stride (1, K)):
    Triton specialises stride == 1, so that view compiles to loads coalesced along K instead,
    and no transposed copy of wte is needed.

One vs two launches for the MLP: two. The hidden activation round trip is M * 4C * 2 bytes
    written + read: at decode (M <= 16, C = 768..1600) that is 0.1-2 % of the 8 C^2 * 2 weight
    bytes the MLP must stream anyway, and the c_fc and c_proj launches each get the whole GPU at
    full bandwidth (split-K keeps both filled). A single-launch decode MLP would need a
    cross-program reduction over the 4C dimension for every one of the C outputs (the same
    counter scheme, but with every program holding a full [BLOCK_M, C] partial: 1600 fp32
    columns do not fit in registers, so it would loop over N chunks and write C-wide partials per
    program - more workspace traffic than the hidden round trip it saves). With CUDA graphs the
    second launch costs ~1-2 us.

Tile table (`_TILES`, used by both the launcher heuristic `_pick_config` and `aot_kernels()`):
    decode   M <= 64        16 x  64 x 128, 4 warps, 4 stages; split-K when tiles < SMs (aim: 2 x SMs programs)
    small    64 < M <= 512  64 x 128 x  64, 4 warps, 4 stages (wgmma m64 on sm_90)
    prefill  M > 512        128 x 128 x 64, 8 warps; 3 stages on sm_80, 4 on sm_90 (two wgmma
                            warpgroups of 64 x 128). 128 x 256 tiles were tried and dropped: with
                            the LN prologue and the residual epilogue they spill (255 registers,
                            24-192 bytes of local memory on sm_80 and sm_90).
    fp32     any M          16 x 64 x 32, 4 warps (M <= 64) or 64 x 64 x 32, 8 warps, FMA dots (correctness
                            path; with 4 warps the 64 x 64 QKV + KV-write epilogue spilled on sm_80)
    BLOCK_M = 16 decode tiles use mma.sync (HMMA) on sm_90 too: wgmma's M is 64 per warpgroup, and
    at decode the kernel is bandwidth bound, so HMMA costs nothing there.

Limits: x [M, K] with a contiguous last dim (any row stride); weight [K, N] with any strides;
    x, weight, residual and out share one dtype (fp32 / fp16 / bf16); LN params and bias may be any
    float dtype (read as fp32). tl.dot needs every block dim >= 16 on a GPU (all tiles are).
    Row offsets are int64 (M * N may exceed 2^31 for prefill logits). With split-K every split
    recomputes the LN statistics of its rows (M * K elements, L2 hits: 3 KB per program at M = 1,
    C = 1600; at M = 64 this L2 traffic is of the order of the weight bytes, which is why split-K
    stops at M = 64).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.arrival_counter import arrival_counters, last_to_arrive
from kernels.paged_attention import check_caches, check_slot_mapping, write_kv_ref


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------

@triton.jit
def _gelu_tanh(y):
    # 0.5 y (1 + tanh(u)) == y * sigmoid(2u), u = sqrt(2/pi) (y + 0.044715 y^3); exp2 form.
    # y -> +inf: exp2 -> 0, result y; y -> -inf: y / (1 + 2^126) -> -0. No inf / NaN either way.
    # The exponent is clamped at 126 (2^126 still finite in fp32): for y < -10 the result is -0.
    u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
    return y / (1.0 + tl.exp2(tl.minimum(-2.8853900817779268 * u, 126.0)))  # 2^(-2 log2(e) u) = e^(-2u)


@triton.jit
def _epilogue(acc, bias_ptr, res_ptr, out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_rm, stride_om,
              offs_m, offs_n, M, N, kv_width,
              HAS_BIAS: tl.constexpr, APPLY_GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr, WRITE_KV: tl.constexpr):
    # acc: [BLOCK_M, BLOCK_N] fp32; all math in fp32, one cast at the store.
    m_mask = offs_m < M
    n_mask = offs_n < N
    mask = m_mask[:, None] & n_mask[None, :]
    rows = offs_m.to(tl.int64)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if APPLY_GELU:
        acc = _gelu_tanh(acc)
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + rows[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    y = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * stride_om + offs_n[None, :], y, mask=mask)
    if WRITE_KV:
        # [q | k | v] columns; K/V row of token slot s = kv_width contiguous elements at s * kv_width
        slot = tl.load(slot_ptr + offs_m, mask=m_mask, other=-1).to(tl.int64)                  # [BLOCK_M]
        row_ok = mask & (slot >= 0)[:, None]                                                   # [BLOCK_M, BLOCK_N]
        is_k = (offs_n >= kv_width) & (offs_n < 2 * kv_width)                                  # [BLOCK_N]
        is_v = offs_n >= 2 * kv_width
        dst = slot[:, None] * kv_width + (offs_n - kv_width)[None, :]                          # [BLOCK_M, BLOCK_N]
        tl.store(k_cache_ptr + dst, y, mask=row_ok & is_k[None, :])
        tl.store(v_cache_ptr + (dst - kv_width), y, mask=row_ok & is_v[None, :])


@triton.jit
def _ln_linear_kernel(
    x_ptr, ln_w_ptr, ln_b_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, ws_ptr, counter_ptr,
    k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_xm,
    stride_wk, stride_wn,
    stride_rm,
    stride_om,
    M, N, K, k_per_split, kv_width, eps,
    HAS_LN: tl.constexpr, HAS_BIAS: tl.constexpr, APPLY_GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    WRITE_KV: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # ---- tile coordinates: grouped ordering along M for L2 reuse of B column-panels ----------
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_splits = tl.num_programs(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_m
    pid_n = (pid % pids_per_group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)   # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)   # [BLOCK_N]
    offs_k = tl.arange(0, BLOCK_K)                     # [BLOCK_K]
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm   # [BLOCK_M, 1] row pointers

    # ---- LayerNorm statistics over the full K of these rows (fp32, Chan's merge) -------------
    if HAS_LN:
        mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_M], dtype=tl.float32)   # sum of squared deviations from the mean
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            k_mask = kk < K
            xa = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_K]
            n_a = k0 * 1.0                                            # elements merged so far (fp32)
            n_b = tl.minimum(K - k0, BLOCK_K) * 1.0                   # elements in this chunk (fp32)
            mean_b = tl.sum(xa, axis=1) / n_b                         # [BLOCK_M]
            dev = tl.where(k_mask[None, :], xa - mean_b[:, None], 0.0)
            m2_b = tl.sum(dev * dev, axis=1)                          # [BLOCK_M]
            delta = mean_b - mean
            n_ab = n_a + n_b
            mean += delta * (n_b / n_ab)
            m2 += m2_b + delta * delta * (n_a * n_b / n_ab)
        rstd = 1.0 / tl.sqrt(m2 / K + eps)                            # [BLOCK_M]

    # ---- main loop over this split's K range -----------------------------------------------
    k_start = pid_k * k_per_split
    k_end = min(K, k_start + k_per_split)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < k_end
        a = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        if HAS_LN:
            # masked K lanes: gamma = beta = 0 there, so the normalised value is 0 as well
            gamma = tl.load(ln_w_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)   # [BLOCK_K]
            beta = tl.load(ln_b_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)    # [BLOCK_K]
            a = (a.to(tl.float32) - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
            a = a.to(w_ptr.dtype.element_ty)
        b = tl.load(w_ptr + kk[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)                  # [BLOCK_K, BLOCK_N]
        acc = tl.dot(a, b, acc, input_precision="ieee")   # fp32 inputs: exact fp32; fp16/bf16: tensor cores

    # ---- epilogue (split-K: the last-arriving split reduces the partials in a fixed order) ---
    if SPLIT_K:
        mask = m_mask[:, None] & n_mask[None, :]
        # workspace [SPLIT, M, N] fp32, contiguous; split-K runs only while tiles < SMs, so
        # SPLIT * M * N is small and int32 offsets suffice
        tile = offs_m[:, None] * N + offs_n[None, :]                                       # [BLOCK_M, BLOCK_N]
        tl.store(ws_ptr + pid_k * M * N + tile, acc, mask=mask)
        if last_to_arrive(counter_ptr + pid, num_splits):
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(0, num_splits):   # fixed order 0..SPLIT-1: deterministic
                acc += tl.load(ws_ptr + s * M * N + tile, mask=mask, other=0.0, cache_modifier=".cg")
            _epilogue(acc, bias_ptr, res_ptr, out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_rm, stride_om,
                      offs_m, offs_n, M, N, kv_width, HAS_BIAS, APPLY_GELU, HAS_RESIDUAL, WRITE_KV)
    else:
        _epilogue(acc, bias_ptr, res_ptr, out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_rm, stride_om,
                  offs_m, offs_n, M, N, kv_width, HAS_BIAS, APPLY_GELU, HAS_RESIDUAL, WRITE_KV)


# ----------------------------------------------------------------------------------------------
# Tile table and heuristic (shared by the launcher and aot_kernels)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


_TILES = {
    "decode": TileConfig(16, 64, 128, 8, 4, 4),
    "small": TileConfig(64, 128, 64, 8, 4, 4),
    "prefill": TileConfig(128, 128, 64, 8, 8, 3),        # sm_80: 82 KB smem, mma.sync
    "prefill_sm90": TileConfig(128, 128, 64, 8, 8, 4),   # sm_90: two wgmma warpgroups, deeper TMA-less pipeline
    "fp32_decode": TileConfig(16, 64, 32, 8, 4, 2),
    "fp32": TileConfig(64, 64, 32, 8, 8, 2),
}
_DECODE_MAX_M = 64
_SMALL_MAX_M = 512
_MIN_K_BLOCKS_PER_SPLIT = 2
_DEFAULT_CAPABILITY = 90   # without a GPU (interpreter), pick the H100 tiles
_DEFAULT_NUM_SMS = 132


def _pick_config(M, N, K, dtype, capability, num_sms):
    """(tile name, split count) for a problem; split > 1 only for decode tiles that under-fill the GPU."""
    if dtype == torch.float32:
        name = "fp32_decode" if M <= _DECODE_MAX_M else "fp32"
    elif M <= _DECODE_MAX_M:
        name = "decode"
    elif M <= _SMALL_MAX_M:
        name = "small"
    else:
        name = "prefill_sm90" if capability >= 90 else "prefill"
    cfg = _TILES[name]
    split = 1
    if M <= _DECODE_MAX_M:
        tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
        if tiles < num_sms:
            max_split = max(1, triton.cdiv(K, _MIN_K_BLOCKS_PER_SPLIT * cfg.block_k))
            split = min(triton.cdiv(2 * num_sms, tiles), max_split)
    return name, split


_DEVICE_INFO: dict = {}


def _device_info(device):
    if device.type != "cuda":
        return _DEFAULT_CAPABILITY, _DEFAULT_NUM_SMS
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _DEVICE_INFO:
        props = torch.cuda.get_device_properties(key)
        _DEVICE_INFO[key] = (props.major * 10 + props.minor, props.multi_processor_count)
    return _DEVICE_INFO[key]


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_tensor(name, t, ndim):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_vector(name, t, size, device):
    _check_tensor(name, t, 1)
    if t.shape[0] != size:
        raise ValueError(f"{name} must have {size} elements, got {t.shape[0]}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, x is on {device}")
    return t.contiguous()


def _check_matrix(name, t, shape, dtype, device):
    _check_tensor(name, t, 2)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} dtype {t.dtype} does not match x dtype {dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, x is on {device}")


def _check_kv_cache(kv_cache, x, N):
    """(k_cache, v_cache, slot_mapping) for a fused [M, N = 3 H D] QKV output of x's dtype."""
    if not (isinstance(kv_cache, tuple) and len(kv_cache) == 3):
        raise TypeError(f"kv_cache must be a tuple (k_cache, v_cache, slot_mapping), got {type(kv_cache).__name__}")
    k_cache, v_cache, slot_mapping = kv_cache
    check_caches(k_cache, v_cache)
    _, _, num_heads, head_dim = k_cache.shape
    if not k_cache.is_contiguous():
        raise ValueError(f"k_cache/v_cache must be contiguous for the fused KV write, got strides {k_cache.stride()}")
    if N != 3 * num_heads * head_dim:
        raise ValueError(f"kv_cache needs a fused QKV output of N = 3 * H * D = {3 * num_heads * head_dim} "
                         f"columns (cache [.., H={num_heads}, D={head_dim}]), got N = {N}")
    if k_cache.dtype != x.dtype:
        raise TypeError(f"k_cache/v_cache dtype {k_cache.dtype} does not match x dtype {x.dtype}")
    if k_cache.device != x.device:
        raise ValueError(f"k_cache is on {k_cache.device}, x is on {x.device}")
    check_slot_mapping(slot_mapping, x.shape[0], x.device)
    return k_cache, v_cache, slot_mapping.contiguous()


def ln_linear(x, ln_weight, ln_bias, weight, bias=None, *, eps=1e-5, activation=None, residual=None, out=None,
              kv_cache=None):
    """act(LN(x) @ weight + bias) + residual in one launch; x [M, K], weight [K, N] (any strides).

    ln_weight None means no LayerNorm (ln_bias None with ln_weight given means beta = 0).
    `out` (optional, [M, N], x's dtype, contiguous last dim) receives the result.
    kv_cache (optional) = (k_cache, v_cache, slot_mapping) with contiguous caches
    [num_blocks, block_size, H, D] in x's dtype, N = 3 H D and slot_mapping int32/int64 [M]: the
    output's columns [C, 2C) and [2C, 3C) (C = H D) are also written to the caches at row
    slot_mapping[m], as write_kv(k, v, k_cache, v_cache, slot_mapping) would; negative slots skip.
    """
    _check_tensor("x", x, 2)
    if x.dtype not in _DTYPES:
        raise TypeError(f"x dtype must be one of float32/float16/bfloat16, got {x.dtype}")
    if activation not in (None, "gelu_tanh"):
        raise ValueError(f"activation must be None or 'gelu_tanh', got {activation!r}")
    M, K = x.shape
    device = x.device
    _check_tensor("weight", weight, 2)
    if weight.shape[0] != K:
        raise ValueError(f"weight must be [K={K}, N] (Conv1D layout) for x of shape {tuple(x.shape)}, got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match x dtype {x.dtype}")
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device}, x is on {device}")
    N = weight.shape[1]
    if ln_weight is not None:
        ln_weight = _check_vector("ln_weight", ln_weight, K, device)
        ln_bias = torch.zeros_like(ln_weight) if ln_bias is None else _check_vector("ln_bias", ln_bias, K, device)
    elif ln_bias is not None:
        raise ValueError("ln_bias given without ln_weight (ln_weight None means no LayerNorm)")
    if bias is not None:
        bias = _check_vector("bias", bias, N, device)
    if kv_cache is not None:
        k_cache, v_cache, slot_mapping = _check_kv_cache(kv_cache, x, N)
    if residual is not None:
        _check_matrix("residual", residual, (M, N), x.dtype, device)
        if residual.stride(1) != 1:
            residual = residual.contiguous()
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=device)
    else:
        _check_matrix("out", out, (M, N), x.dtype, device)
        if out.stride(1) != 1:
            raise ValueError(f"out must have a contiguous last dim, got strides {out.stride()}")
    if M == 0 or N == 0:
        return out
    if K == 0:
        raise ValueError("x must have K >= 1 columns")
    if x.stride(1) != 1:
        x = x.contiguous()

    capability, num_sms = _device_info(device)
    name, split = _pick_config(M, N, K, x.dtype, capability, num_sms)
    cfg = _TILES[name]
    k_per_split = triton.cdiv(triton.cdiv(K, split), cfg.block_k) * cfg.block_k
    split = triton.cdiv(K, k_per_split)   # no empty splits
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    if split > 1:
        ws = torch.empty((split, M, N), dtype=torch.float32, device=device)
        counters = arrival_counters(device, tiles)
    else:
        ws, counters = out, out   # unused (SPLIT_K=False); any valid pointer
    if kv_cache is None:
        k_cache = v_cache = slot_mapping = out   # unused (WRITE_KV=False)
    _ln_linear_kernel[(tiles, split)](
        x, ln_weight if ln_weight is not None else x, ln_bias if ln_bias is not None else x,
        weight, bias if bias is not None else x, residual if residual is not None else x, out, ws, counters,
        k_cache, v_cache, slot_mapping,
        x.stride(0),
        weight.stride(0), weight.stride(1),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        M, N, K, k_per_split, N // 3, float(eps),
        HAS_LN=ln_weight is not None, HAS_BIAS=bias is not None, APPLY_GELU=activation == "gelu_tanh",
        HAS_RESIDUAL=residual is not None, WRITE_KV=kv_cache is not None, SPLIT_K=split > 1,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def ln_gelu_mlp(x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias, *, eps=1e-5, out=None):
    """x + gelu_tanh(LN(x) @ fc_weight + fc_bias) @ proj_weight + proj_bias in two launches."""
    _check_tensor("x", x, 2)
    _check_tensor("fc_weight", fc_weight, 2)
    _check_tensor("proj_weight", proj_weight, 2)
    K = x.shape[1]
    if fc_weight.shape[0] != K:
        raise ValueError(f"fc_weight must be [K={K}, hidden], got {tuple(fc_weight.shape)}")
    if proj_weight.shape != (fc_weight.shape[1], K):
        raise ValueError(f"proj_weight must be [hidden={fc_weight.shape[1]}, K={K}], got {tuple(proj_weight.shape)}")
    for name, w in (("fc_weight", fc_weight), ("proj_weight", proj_weight)):
        if w.dtype != x.dtype:
            raise TypeError(f"{name} dtype {w.dtype} does not match x dtype {x.dtype}")
    hidden = ln_linear(x, ln_weight, ln_bias, fc_weight, fc_bias, eps=eps, activation="gelu_tanh")
    return ln_linear(hidden, None, None, proj_weight, proj_bias, residual=x, out=out)


# ----------------------------------------------------------------------------------------------
# References (the contract; the engine's CPU "torch" backend runs these)
# ----------------------------------------------------------------------------------------------

def gelu_tanh(x):
    """GPT-2's "gelu_new": 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return F.gelu(x, approximate="tanh")


def ln_linear_ref(x, ln_weight, ln_bias, weight, bias=None, *, eps=1e-5, activation=None, residual=None, kv_cache=None):
    """act(LN(x) @ weight + bias) + residual in plain torch; x [M, K], weight [K, N]; with kv_cache,
    the K/V columns also go to the paged caches (write_kv_columns_ref)."""
    if activation not in (None, "gelu_tanh"):
        raise ValueError(f"activation must be None or 'gelu_tanh', got {activation!r}")
    h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps) if ln_weight is not None else x
    y = torch.addmm(bias, h, weight) if bias is not None else h @ weight
    if activation == "gelu_tanh":
        y = gelu_tanh(y)
    y = y + residual if residual is not None else y
    if kv_cache is not None:
        write_kv_columns_ref(y, kv_cache)
    return y


def write_kv_columns_ref(qkv, kv_cache):
    """write_kv_ref of a fused [M, 3C] QKV output's K and V columns; kv_cache = (k_cache, v_cache, slot_mapping)."""
    k_cache, v_cache, slot_mapping = kv_cache
    heads = k_cache.shape[2:]                                          # (H, D)
    _, k, v = qkv.view(qkv.shape[0], 3, *heads).unbind(1)              # [M, H, D] strided views
    write_kv_ref(k, v, k_cache, v_cache, slot_mapping)


def ln_gelu_mlp_ref(x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias, *, eps=1e-5):
    """x + gelu_tanh(LN(x) @ fc_weight + fc_bias) @ proj_weight + proj_bias in plain torch."""
    hidden = ln_linear_ref(x, ln_weight, ln_bias, fc_weight, fc_bias, eps=eps, activation="gelu_tanh")
    return ln_linear_ref(hidden, None, None, proj_weight, proj_bias, residual=x)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile report entries
# ----------------------------------------------------------------------------------------------

_TL_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _aot(label, tile, dtype, *, ln, bias, gelu, residual, split, kv=False, weight_t=False, vocab=False):
    """One shipped configuration, described as the JIT would specialise a real GPT-2 launch."""
    from kernels.compile_report import AotKernel

    cfg = _TILES[tile]
    t = "*" + _TL_TYPES[dtype]
    signature = {
        "x_ptr": t, "ln_w_ptr": t, "ln_b_ptr": t, "w_ptr": t, "bias_ptr": t, "res_ptr": t, "out_ptr": t,
        "ws_ptr": "*fp32", "counter_ptr": "*i32", "k_cache_ptr": t, "v_cache_ptr": t, "slot_ptr": "*i64",
        "stride_xm": "i32", "stride_wk": "i32", "stride_wn": "i32", "stride_rm": "i32", "stride_om": "i32",
        "M": "i32", "N": "i32", "K": "i32", "k_per_split": "i32", "kv_width": "i32", "eps": "fp32",
    }
    constexprs = dict(HAS_LN=ln, HAS_BIAS=bias, APPLY_GELU=gelu, HAS_RESIDUAL=residual, WRITE_KV=kv, SPLIT_K=split,
                      BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m)
    # the JIT turns a stride of 1 into a constexpr: [K, N] contiguous -> stride_wn = 1; wte.t() -> stride_wk = 1
    unit = "stride_wk" if weight_t else "stride_wn"
    del signature[unit]
    constexprs[unit] = 1
    aligned = ["x_ptr", "ln_w_ptr", "ln_b_ptr", "w_ptr", "bias_ptr", "res_ptr", "out_ptr", "ws_ptr", "counter_ptr",
               "k_cache_ptr", "v_cache_ptr", "slot_ptr", "stride_xm", "stride_rm", "K", "k_per_split"]
    if not vocab:   # GPT-2 widths (768 ... 6400) are multiples of 16; the vocabulary 50257 is not
        aligned += ["N", "kv_width", "stride_om", "stride_wk" if not weight_t else "stride_wn"]
    elif weight_t:
        aligned += ["stride_wn"]   # = K
    return AotKernel(
        label=label, fn=_ln_linear_kernel, signature=signature, constexprs=constexprs,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, aligned=tuple(a for a in aligned if a in signature),
        tensor_cores=dtype != torch.float32, wgmma_on_sm90=dtype != torch.float32 and cfg.block_m >= 64,
    )


def aot_kernels():
    """Every tile of `_TILES` with the epilogues the engine launches on it."""
    f16, b16, f32 = torch.float16, torch.bfloat16, torch.float32
    qkv = dict(ln=True, bias=True, gelu=False, residual=False, kv=True)   # ln_1 -> c_attn + KV cache write
    fc = dict(ln=True, bias=True, gelu=True, residual=False)              # ln_2 -> c_fc + GELU
    proj = dict(ln=False, bias=True, gelu=False, residual=True)           # c_proj + residual
    head = dict(ln=True, bias=False, gelu=False, residual=False)          # ln_f -> LM head
    specs = []
    for dtype in (f16, b16):
        d = _TL_TYPES[dtype]
        specs += [
            _aot(f"ln_linear decode {d} ln+bias+kv split-k", "decode", dtype, **qkv, split=True),
            _aot(f"ln_linear decode {d} ln+bias+gelu split-k", "decode", dtype, **fc, split=True),
            _aot(f"ln_linear decode {d} bias+residual split-k", "decode", dtype, **proj, split=True),
            _aot(f"ln_linear decode {d} lm-head wte^T", "decode", dtype, **head, split=False, weight_t=True, vocab=True),
            _aot(f"ln_linear small {d} ln+bias+kv", "small", dtype, **qkv, split=False),
            _aot(f"ln_linear small {d} ln+bias+gelu", "small", dtype, **fc, split=False),
            _aot(f"ln_linear small {d} bias+residual", "small", dtype, **proj, split=False),
            _aot(f"ln_linear prefill {d} ln+bias+kv", "prefill", dtype, **qkv, split=False),
            _aot(f"ln_linear prefill {d} ln+bias+gelu", "prefill", dtype, **fc, split=False),
            _aot(f"ln_linear prefill {d} bias+residual", "prefill", dtype, **proj, split=False),
            _aot(f"ln_linear prefill_sm90 {d} ln+bias+kv", "prefill_sm90", dtype, **qkv, split=False),
            _aot(f"ln_linear prefill_sm90 {d} ln+bias+gelu", "prefill_sm90", dtype, **fc, split=False),
            _aot(f"ln_linear prefill_sm90 {d} bias+residual", "prefill_sm90", dtype, **proj, split=False),
        ]
    specs += [  # prefill logits over the whole prompt (B operand K-major: wgmma with a transposed smem B)
        _aot("ln_linear prefill_sm90 fp16 lm-head wte^T", "prefill_sm90", f16, **head, split=False, weight_t=True, vocab=True),
    ]
    specs += [
        _aot("ln_linear fp32_decode fp32 ln+bias+gelu split-k", "fp32_decode", f32, **fc, split=True),
        _aot("ln_linear fp32_decode fp32 ln+bias+kv split-k", "fp32_decode", f32, **qkv, split=True),
        _aot("ln_linear fp32 fp32 ln+bias+kv", "fp32", f32, **qkv, split=False),
        _aot("ln_linear fp32 fp32 ln+bias+gelu", "fp32", f32, **fc, split=False),
        _aot("ln_linear fp32 fp32 bias+residual", "fp32", f32, **proj, split=False),
    ]
    return specs
