"""LayerNorm-folded GEMM with bias / GELU / residual epilogues, and the fused GPT-2 MLP.

What
    ln_linear(x, ln_weight, ln_bias, weight, bias, activation, residual) = act(LN(x) @ W + b) + r
    in one launch: ln_1 -> c_attn (N = 3C), ln_2 -> c_fc (N = 4C, GELU), attn c_proj and mlp
    c_proj (+ residual, no LN), ln_f -> LM head (N = vocab = 50257, no bias, W = wte^T).
    ln_gelu_mlp = two ln_linear launches: c_fc with LN and GELU epilogue writing the hidden
    activation once, then c_proj with bias + residual epilogue.
    ln_linear(..., kv_cache=(k_cache, v_cache, slot_mapping)) on the c_attn projection also
    stores the K and V columns into the paged KV cache (what write_kv does, without its launch).

LayerNorm folded into the GEMM (no serial statistics pass before the first weight load)
    LN(x) @ W + b = rstd * (x - mean) @ (diag(gamma) W) + (beta @ W + b), so at load time
    `fold_layernorm` makes W' = diag(gamma) W (rounded once to the weight dtype), b' = beta W + b
    and colsum = 1^T W' (fp32, summed from the rounded W'), and the kernel computes
        y = rstd * (x @ W' - mean * colsum) + b'
    x @ W' runs on the raw activations; the row statistics are accumulated in the same main loop,
    from the A tiles already in registers. Numerics: x is the fp16/bf16 residual stream itself
    (exact operands), products are exact in fp32 and the subtraction uses the colsum of the same
    rounded W', so acc - mean * colsum = sum_k (x_k - mean) W'_k up to fp32 accumulation error:
    the only rounding of the fold is W' (relative 2^-11 in fp16, the same size as the rounding of
    LN(x) to fp16 in the unfolded form, but multiplied by x - mean instead of the normalised
    value). The statistics are merged per K tile with Chan's parallel formula (mean, M2), not as
    E[x^2] - E[x]^2: GPT-2's residual stream has a nonzero mean and a few channels ~100x the rest,
    which sum / sum-of-squares in fp32 would cancel badly. rstd = 1 / sqrt(M2 / K + eps) (biased
    variance, like torch). An unfolded call (ln_weight given) folds on the fly, a pass over W per call:
    the engine folds once at load (FoldedLinear).

Algorithm (one @triton.jit GEMM kernel; constexpr flags select LN / epilogue / split-K)
    Each program owns a [BLOCK_M, BLOCK_N] output tile and one K range (grouped "GROUP_M"
    ordering so that the programs running together share B column-panels in L2 during prefill).
    Main loop over its K range: A tile [BLOCK_M, BLOCK_K] of x, B tile of W'; tl.dot accumulates in
    fp32: tensor cores for fp16/bf16 (HMMA on sm_80, wgmma/HGMMA on sm_90 for BLOCK_M >= 64);
    exact fp32 FMA dots (input_precision="ieee", no tf32) for fp32 inputs. With HAS_LN the A tile's
    per-row (mean, M2) is merged into the running pair.
    Int8 weights (HAS_SCALE, kernels/int8_linear.py's launcher): W is the [K, N] view q^T of int8
    codes [N, K]; B tiles are loaded as int8 and widened to x's dtype in registers (exact), and the
    fp32 accumulator is multiplied by the per-column scale once, after the K loop and the split-K
    reduction. The main loop, the split-K reduction and the epilogue are @triton.jit helpers.
    Epilogue in fp32: the LN correction, + bias, GELU tanh (as y * sigmoid(2u), the same function as
    0.5 y (1 + tanh u) without a tanh instruction), + residual, cast to x's dtype, store.
    KV write (WRITE_KV): the output is [M, 3C] = [q | k | v] with C = H * D, and the caches
    [num_blocks, block_size, H, D] are contiguous, so token slot s's K row is the C elements
    at s * C: output column c in [C, 2C) also goes to k_cache[s * C + c - C], c in [2C, 3C)
    to v_cache[s * C + c - 2C], rows with slot < 0 (padding) are skipped. A column tile may
    straddle C or 2C (C = 1600 with BLOCK_N = 128): the masks are per column.
    LM head store: N = 50257 is odd, so a row-masked, column-masked store would be scalar; a
    launcher-allocated output of such an N gets a padded row stride (a multiple of 16 elements) and
    the kernel stores whole padded rows (the padding columns hold 0: masked weights), so the
    compiler emits 16-byte vector stores. The result is the [M, N] view.
    Decode split-K (SPLIT_K, M <= 256): kernels/launch_plan.py cuts K into `split` ranges that
    depend on (K, N, dtype, SM count) only, so that every decode GEMM launches >= 2 x SMs programs
    and a row's reduction does not depend on the batch. Every split stores its fp32 partial tile
    and its rows' (mean, M2) to a workspace; a per-tile arrival counter (kernels/arrival_counter.py:
    the determinism and memory-ordering arguments are there) elects the last-arriving split, which
    sums the partials in the fixed order 0..split-1 (L2 loads, .cg), merges the moments in the same
    order (Chan) and runs the epilogue (KV write included). Bit-for-bit deterministic, no fp32
    atomics, CUDA-graph capturable (the counters re-arm themselves).

Weight layout decision: the HF Conv1D layout [K, N] as loaded, no packing. For a row-major [K, N]
    weight a [BLOCK_K, BLOCK_N] tile is BLOCK_K rows of BLOCK_N contiguous elements (64-256 byte
    coalesced rows), which is the natural B operand of tl.dot and of wgmma (smem B tile, N-major).
    Strides are arbitrary, so the LM head may pass wte.t() (a [K, N] view with stride (1, K)):
    Triton specialises stride == 1, so that view compiles to loads coalesced along K instead; the
    folded head keeps that layout (fold_layernorm preserves strides), at the cost of one folded
    copy of wte next to the embedding's.

One vs two launches for the MLP: two. The hidden activation round trip is M * 4C * 2 bytes
    written + read: at decode (M <= 16, C = 768..1600) that is 0.1-2 % of the 8 C^2 * 2 weight
    bytes the MLP must stream anyway, and the c_fc and c_proj launches each get the whole GPU at
    full bandwidth (split-K keeps both filled). A single-launch decode MLP would need a
    cross-program reduction over the 4C dimension for every one of the C outputs, with every
    program holding a full [BLOCK_M, C] partial (1600 fp32 columns do not fit in registers). With
    CUDA graphs the second launch costs ~1-2 us.

Tiles (kernels/launch_plan.py, read by the launcher and by aot_kernels()):
    decode   M <= 64        16 x {32,64,128} x 64, 4 warps, 4 stages, planned split-K
    batch    64 < M <= 256  64 x {32,64,128} x 64 (same BLOCK_N / BLOCK_K / split as decode)
    small    256 < M <= 512 64 x 128 x 64, 8 warps (4 spill 8 bytes on sm_80), 4 stages, no split
    prefill  M > 512        128 x 128 x 64, 8 warps; 3 stages on sm_80, 4 on sm_90. 128 x 256 tiles
                            spill (255 registers) with the residual epilogue.
    fp32     BLOCK_K 32 in the planned tiles; 64 x 64 x 32, 8 warps above M = 256 (correctness path)
    BLOCK_M = 16 decode tiles use mma.sync (HMMA) on sm_90 too: wgmma's M is 64 per warpgroup, and
    at decode the kernel is bandwidth bound, so HMMA costs nothing there.

Host side: the launch (grid, constexprs, ints, workspace sizes) is planned once per key of
    (shapes, strides, dtypes, devices, options) and cached; a call that hits the cache only builds
    the key and launches. On CUDA the compiled kernel is then launched directly
    (kernels/launching.py), skipping the JIT's per-call argument binding.

Limits: x [M, K] with a contiguous last dim (any row stride); weight [K, N] with any strides;
    x, weight, residual and out share one dtype (fp32 / fp16 / bf16); LN params and bias may be any
    float dtype (read as fp32). tl.dot needs every block dim >= 16 on a GPU (all tiles are).
    Row offsets are int64 (M * N may exceed 2^31 for prefill logits).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from gpt2_engine.kernels import triton_defaults  # noqa: F401  (before triton)
import triton
import triton.language as tl

from gpt2_engine.kernels import checks
from gpt2_engine.kernels.arrival_counter import buffers, guarded_launch, last_to_arrive
from gpt2_engine.kernels.launch_plan import UNSPLIT_TILES, gemm_plan, reduction, split_tile
from gpt2_engine.kernels.launching import aligned, launch
from gpt2_engine.kernels.paged_attention import check_caches, check_slot_mapping, write_kv_ref


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
def _merge_moments(mean, m2, n_a, mean_b, m2_b, n_b):
    """Chan's parallel merge of (mean, M2) over n_a elements with (mean_b, M2_b) over n_b (fp32 counts)."""
    delta = mean_b - mean
    n_ab = n_a + n_b
    return mean + delta * (n_b / n_ab), m2 + m2_b + delta * delta * (n_a * n_b / n_ab)


@triton.jit
def _epilogue(acc, mean, m2, bias_ptr, colsum_ptr, res_ptr, out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
              stride_rm, stride_om, offs_m, offs_n, M, N, K, kv_width, store_n, eps,
              HAS_LN: tl.constexpr, HAS_BIAS: tl.constexpr, APPLY_GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
              WRITE_KV: tl.constexpr):
    # acc: [BLOCK_M, BLOCK_N] fp32 = x @ W'; all math in fp32, one cast at the store.
    m_mask = offs_m < M
    n_mask = offs_n < N
    mask = m_mask[:, None] & n_mask[None, :]
    rows = offs_m.to(tl.int64)
    if HAS_LN:
        rstd = 1.0 / tl.sqrt(m2 / K + eps)                                                     # [BLOCK_M]
        colsum = tl.load(colsum_ptr + offs_n, mask=n_mask, other=0.0)                          # [BLOCK_N] fp32
        acc = rstd[:, None] * (acc - mean[:, None] * colsum[None, :])
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if APPLY_GELU:
        acc = _gelu_tanh(acc)
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + rows[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    y = acc.to(out_ptr.dtype.element_ty)
    # store_n >= N: whole padded rows of a padded output (16-element aligned: vector stores)
    tl.store(out_ptr + rows[:, None] * stride_om + offs_n[None, :], y, mask=m_mask[:, None] & (offs_n < store_n)[None, :])
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
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of output tile `pid` in grouped ordering: GROUP_M row tiles per group, so
    that the programs running together share B column-panels in L2 (prefill)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_m = min(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + (pid % pids_per_group) % group_m, (pid % pids_per_group) // group_m


@triton.jit
def _main_loop(x_rows, w_ptr, stride_wk, stride_wn, offs_n, m_mask, n_mask, k_start, k_end,
               HAS_LN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """x[rows, k_start:k_end] @ W[k_start:k_end, cols] in fp32 and (HAS_LN) the rows' (mean, M2) over
    the same columns, merged per K tile (Chan) from the A tiles already in registers.

    x_rows: [BLOCK_M, 1] row pointers; W's tiles are loaded in W's dtype and widened to x's in
    registers before tl.dot (a no-op for float weights; int8 codes are exact in fp16/bf16/fp32)."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_M], dtype=tl.float32)    # sum of squared deviations from the mean
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < k_end
        a = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        b = tl.load(w_ptr + kk[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=k_mask[:, None] & n_mask[None, :], other=0)                    # [BLOCK_K, BLOCK_N]
        if HAS_LN:
            xa = a.to(tl.float32)
            n_b = tl.minimum(k_end - k0, BLOCK_K) * 1.0                # elements in this tile (fp32)
            mean_b = tl.sum(xa, axis=1) / n_b                          # [BLOCK_M]
            dev = tl.where(k_mask[None, :], xa - mean_b[:, None], 0.0)
            mean, m2 = _merge_moments(mean, m2, (k0 - k_start) * 1.0, mean_b, tl.sum(dev * dev, axis=1), n_b)
        # fp32 inputs: exact fp32; fp16/bf16: tensor cores
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision="ieee")
    return acc, mean, m2


@triton.jit
def _reduce_splits(acc, mean, m2, ws_ptr, counter_ptr, pid, pid_k, num_splits, offs_m, offs_n, M, N, K, k_per_split,
                   HAS_LN: tl.constexpr, BLOCK_M: tl.constexpr):
    """Split-K: store this split's fp32 partial tile (and its rows' moments); return (sum of every
    split's partial in the order 0..num_splits-1, the moments merged in that order, True) in the last
    split of output tile `pid` to arrive, (acc, mean, m2, False) in the others.

    Workspace: partials [num_splits, M, N] fp32, then moments [tiles, num_splits, 2, BLOCK_M]; split-K
    runs only for M <= 256, so num_splits * M * N is small and int32 offsets suffice."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tile = offs_m[:, None] * N + offs_n[None, :]                                           # [BLOCK_M, BLOCK_N]
    tl.store(ws_ptr + pid_k * M * N + tile, acc, mask=mask)
    rows = tl.arange(0, BLOCK_M)
    moments = ws_ptr + num_splits * M * N + pid * num_splits * 2 * BLOCK_M                  # this tile's slots
    if HAS_LN:
        tl.store(moments + pid_k * 2 * BLOCK_M + rows, mean)
        tl.store(moments + pid_k * 2 * BLOCK_M + BLOCK_M + rows, m2)
    is_last = last_to_arrive(counter_ptr + pid, num_splits)
    if is_last:
        acc = tl.zeros_like(acc)
        mean = tl.zeros_like(mean)
        m2 = tl.zeros_like(m2)
        for s in range(0, num_splits):   # fixed order 0..SPLIT-1: deterministic
            acc += tl.load(ws_ptr + s * M * N + tile, mask=mask, other=0.0, cache_modifier=".cg")
            if HAS_LN:
                mean_s = tl.load(moments + s * 2 * BLOCK_M + rows, cache_modifier=".cg")
                m2_s = tl.load(moments + s * 2 * BLOCK_M + BLOCK_M + rows, cache_modifier=".cg")
                n_s = (tl.minimum(K, (s + 1) * k_per_split) - s * k_per_split) * 1.0
                mean, m2 = _merge_moments(mean, m2, (s * k_per_split) * 1.0, mean_s, m2_s, n_s)
    return acc, mean, m2, is_last


@triton.jit
def _ln_linear_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, colsum_ptr, res_ptr, out_ptr, ws_ptr, counter_ptr,
    k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_xm,
    stride_wk, stride_wn,
    stride_rm,
    stride_om,
    M, N, K, k_per_split, kv_width, store_n, eps,
    HAS_SCALE: tl.constexpr, HAS_LN: tl.constexpr, HAS_BIAS: tl.constexpr, APPLY_GELU: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, WRITE_KV: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)     # output tile
    pid_k = tl.program_id(1)   # K range
    pid_m, pid_n = _grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)   # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)   # [BLOCK_N]
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm   # [BLOCK_M, 1] row pointers

    # ---- main loop over this split's K range: x @ W' and (HAS_LN) the rows' (mean, M2) -------
    k_start = pid_k * k_per_split
    acc, mean, m2 = _main_loop(x_rows, w_ptr, stride_wk, stride_wn, offs_n, m_mask, n_mask, k_start,
                               min(K, k_start + k_per_split), HAS_LN, BLOCK_M, BLOCK_N, BLOCK_K)

    # ---- epilogue (split-K: the last-arriving split reduces the partials in a fixed order) ---
    finish = True
    if SPLIT_K:
        acc, mean, m2, finish = _reduce_splits(acc, mean, m2, ws_ptr, counter_ptr, pid, pid_k, tl.num_programs(1),
                                               offs_m, offs_n, M, N, K, k_per_split, HAS_LN, BLOCK_M)
    if finish:
        if HAS_SCALE:   # int8 codes (kernels/int8_linear.py): (x @ q^T) * scale, per output channel
            acc *= tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        _epilogue(acc, mean, m2, bias_ptr, colsum_ptr, res_ptr, out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                  stride_rm, stride_om, offs_m, offs_n, M, N, K, kv_width, store_n, eps,
                  HAS_LN, HAS_BIAS, APPLY_GELU, HAS_RESIDUAL, WRITE_KV)


# ----------------------------------------------------------------------------------------------
# LayerNorm folding (done once at load by the engine)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FoldedLinear:
    """LayerNorm(gamma, beta) then x @ W + b, folded: weight W' = diag(gamma) W ([K, N], W's dtype
    and strides), bias b' = beta @ W + b and colsum = 1^T W' (fp32 [N], from the rounded W')."""
    weight: torch.Tensor
    bias: torch.Tensor
    colsum: torch.Tensor

    @property
    def shape(self):
        return self.weight.shape


def fold_layernorm(ln_weight, ln_bias, weight, bias=None) -> FoldedLinear:
    """Fold LayerNorm(ln_weight, ln_bias) into the [K, N] linear (weight, bias); ln_bias None = 0."""
    checks.float_tensor("weight", weight, ndim=2, layout="[K, N]", dtypes=(*checks.FLOAT_DTYPES, torch.float64))
    K, N = weight.shape
    vectors = {"ln_weight": (ln_weight, K), "ln_bias": (ln_bias, K), "bias": (bias, N)}
    for name, (t, size) in vectors.items():
        if t is None and name != "ln_weight":
            continue
        checks.float_tensor(name, t, ndim=1, layout=f"[{size}]", dtypes=(*checks.FLOAT_DTYPES, torch.float64))
        checks.shape(name, t, (size,))
        checks.same_device(name, t, "weight", weight.device)
    w32 = weight.float()
    folded = torch.empty_like(weight)                       # keeps W's strides (wte^T stays K-major)
    folded.copy_(w32 * ln_weight.float()[:, None])          # one rounding to W's dtype
    b = ln_bias.float() @ w32 if ln_bias is not None else torch.zeros(N, device=weight.device)
    if bias is not None:
        b = b + bias.float()
    return FoldedLinear(folded, b.contiguous(), folded.float().sum(0).contiguous())


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

_DEFAULT_CAPABILITY = 90   # without a GPU (interpreter), plan for the H100
_DEFAULT_NUM_SMS = 132
_DEVICE_INFO: dict = {}


def _device_info(device):
    if device.type != "cuda":
        return _DEFAULT_CAPABILITY, _DEFAULT_NUM_SMS
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _DEVICE_INFO:
        props = torch.cuda.get_device_properties(key)
        _DEVICE_INFO[key] = (props.major * 10 + props.minor, props.multi_processor_count)
    return _DEVICE_INFO[key]


def _meta(t):
    """What a plan depends on of a tensor (None stays None)."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.get_device())


@dataclass(frozen=True)
class _Plan:
    grid: tuple[int, int, int]
    ints: tuple                 # stride_xm .. store_n
    constexprs: dict
    num_warps: int
    num_stages: int
    workspace: int              # fp32 elements (0: no split)
    counters: int
    padded_n: int               # row stride of a launcher-allocated output


_PLANS: dict = {}


def _check_vector(name, t, size, device):
    checks.float_tensor(name, t, ndim=1, layout=f"[{size}]", dtypes=(*checks.FLOAT_DTYPES,))
    checks.shape(name, t, (size,))
    checks.same_device(name, t, "x", device)


def _check_matrix(name, t, shape, dtype, device):
    checks.tensor(name, t, ndim=2, layout=f"[{shape[0]}, {shape[1]}]")
    checks.shape(name, t, shape)
    checks.same_dtype(name, t, "x", dtype)
    checks.same_device(name, t, "x", device)


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
    checks.same_dtype("k_cache/v_cache", k_cache, "x", x.dtype)
    checks.same_device("k_cache", k_cache, "x", x.device)
    check_slot_mapping(slot_mapping, x.shape[0], x.device)
    if slot_mapping.stride(0) != 1:
        raise ValueError(f"slot_mapping must be contiguous, got stride {slot_mapping.stride(0)}")


def _check_x(x, activation):
    checks.float_tensor("x", x, ndim=2, layout="[M, K]")
    if x.stride(1) != 1:
        raise ValueError(f"x must have a contiguous last dim, got strides {x.stride()}")
    if activation not in (None, "gelu_tanh"):
        raise ValueError(f"activation must be None or 'gelu_tanh', got {activation!r}")


def _check_operands(x, N, vectors, residual, out, kv_cache):
    """The checks of everything but the weight, for an [M, N] output of x [M, K]; vectors: (name,
    tensor or None) pairs of per-column [N] operands."""
    M, K = x.shape
    device = x.device
    for name, t in vectors:
        if t is not None:
            _check_vector(name, t, N, device)
            if t.stride(0) != 1:
                raise ValueError(f"{name} must be contiguous, got stride {t.stride(0)}")
    if kv_cache is not None:
        _check_kv_cache(kv_cache, x, N)
    for name, t in (("residual", residual), ("out", out)):
        if t is not None:
            _check_matrix(name, t, (M, N), x.dtype, device)
            if t.stride(1) != 1:
                raise ValueError(f"{name} must have a contiguous last dim, got strides {t.stride()}")
    if K == 0 and M and N:
        raise ValueError("x must have K >= 1 columns")


def _validate(x, weight, bias, colsum, activation, residual, out, kv_cache):
    """Every check of a ln_linear call (run on a plan-cache miss only: the key covers all it reads)."""
    _check_x(x, activation)
    K = x.shape[1]
    checks.tensor("weight", weight, ndim=2, layout="[K, N] (Conv1D layout)")
    if weight.shape[0] != K:
        raise ValueError(f"weight must be [K={K}, N] (Conv1D layout) for x of shape {tuple(x.shape)}, got {tuple(weight.shape)}")
    checks.same_dtype("weight", weight, "x", x.dtype)
    checks.same_device("weight", weight, "x", x.device)
    _check_operands(x, weight.shape[1], (("bias", bias), ("colsum", colsum)), residual, out, kv_cache)


def _make_plan(x, weight, residual, out, has_ln, has_bias, activation, kv_cache, *, int8=False) -> _Plan:
    """The launch of x [M, K] @ weight [K, N] (any strides; int8: a q^T view of int8 codes)."""
    M, K = x.shape
    N = weight.shape[1]
    capability, num_sms = _device_info(x.device)
    plan = gemm_plan(M, N, K, x.dtype, capability, num_sms, int8=int8)
    t = plan.tile
    tiles = -(-M // t.block_m) * -(-N // t.block_n)
    padded_n = N if N % 16 == 0 else N + 16 - N % 16
    stride_om = out.stride(0) if out is not None else padded_n
    store_n = padded_n if out is None else N
    ints = (x.stride(0), weight.stride(0), weight.stride(1), residual.stride(0) if residual is not None else 0,
            stride_om, M, N, K, plan.k_per_split, N // 3, store_n)
    constexprs = dict(HAS_SCALE=int8, HAS_LN=has_ln, HAS_BIAS=has_bias, APPLY_GELU=activation == "gelu_tanh",
                      HAS_RESIDUAL=residual is not None, WRITE_KV=kv_cache is not None, SPLIT_K=plan.split > 1,
                      BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, GROUP_M=t.group_m)
    split = plan.split
    workspace = split * M * N + tiles * split * 2 * t.block_m if split > 1 else 0
    return _Plan((tiles, split, 1), ints, constexprs, t.num_warps, t.num_stages, workspace,
                 tiles if split > 1 else 0, padded_n)


def _cached_plan(key, make) -> _Plan:
    """The plan cached under key (None: not cacheable), else make() (which validates the call)."""
    plan = _PLANS.get(key) if key is not None else None
    if plan is None:
        plan = make()
        if key is not None:
            _PLANS[key] = plan
    return plan


def _run(plan: _Plan, key, x, operands, residual, out, kv_cache, eps):
    """Allocate the output (rows padded as planned) unless given, take the split-K buffers and launch
    the kernel on (x, *operands = weight, scale, bias, colsum, residual, out, workspace, counters,
    k_cache, v_cache, slot_mapping, *plan.ints, eps); absent operands are any valid pointer (x)."""
    M, N = plan.ints[5], plan.ints[6]
    if out is None:
        out = torch.empty((M, plan.padded_n), dtype=x.dtype, device=x.device)
        if plan.padded_n != N:
            out = out[:, :N]
    if M == 0 or N == 0:
        return out
    device = x.device
    if plan.workspace:
        bufs = buffers(device)
        ws, counters = bufs.get_workspace(plan.workspace), bufs.get_counters(plan.counters)
    else:
        ws = counters = out   # unused (SPLIT_K=False); any valid pointer
    k_cache, v_cache, slot_mapping = kv_cache if kv_cache is not None else (out, out, out)   # unused without WRITE_KV
    tensors = (x, *operands, residual if residual is not None else x, out, ws, counters, k_cache, v_cache, slot_mapping)
    args = (*tensors, *plan.ints, float(eps))
    launch_key = (key, aligned(*tensors)) if key is not None and device.type == "cuda" else None
    guarded_launch(lambda: launch(_ln_linear_kernel, plan.grid, args, plan.constexprs, num_warps=plan.num_warps,
                                  num_stages=plan.num_stages, key=launch_key), device)
    return out


def ln_linear(x, ln_weight, ln_bias, weight, bias=None, *, eps=1e-5, activation=None, residual=None, out=None,
              kv_cache=None):
    """act(LN(x) @ weight + bias) + residual in one launch; x [M, K], weight [K, N] (any strides).

    weight may be a FoldedLinear (fold_layernorm at load; then ln_weight, ln_bias and bias are None):
    the engine's form. With a plain weight, ln_weight None means no LayerNorm (ln_bias None with
    ln_weight given means beta = 0), and a given LayerNorm is folded on the fly (a pass over W).
    `out` (optional, [M, N], x's dtype, contiguous last dim) receives the result; without it the
    result is a new [M, N] tensor (for N not a multiple of 16, a view of rows padded to one).
    kv_cache (optional) = (k_cache, v_cache, slot_mapping) with contiguous caches
    [num_blocks, block_size, H, D] in x's dtype, N = 3 H D and slot_mapping int32/int64 [M]
    (contiguous): the output's columns [C, 2C) and [2C, 3C) (C = H D) are also written to the
    caches at row slot_mapping[m], as write_kv(k, v, k_cache, v_cache, slot_mapping) would;
    negative slots skip.
    """
    if isinstance(weight, FoldedLinear):
        if ln_weight is not None or ln_bias is not None or bias is not None:
            raise ValueError("with a FoldedLinear weight, ln_weight, ln_bias and bias must be None (they are folded in)")
        weight, bias, colsum = weight.weight, weight.bias, weight.colsum
    elif ln_weight is not None:
        folded = fold_layernorm(ln_weight, ln_bias, weight, bias)
        weight, bias, colsum = folded.weight, folded.bias, folded.colsum
    elif ln_bias is not None:
        raise ValueError("ln_bias given without ln_weight (ln_weight None means no LayerNorm)")
    else:
        colsum = None
    try:
        key = (_meta(x), _meta(weight), _meta(bias), _meta(colsum), _meta(residual), _meta(out), activation,
               None if kv_cache is None else tuple(map(_meta, kv_cache)))
    except (AttributeError, TypeError):   # not tensors: the checks in make() name the culprit
        key = None

    def make():
        _validate(x, weight, bias, colsum, activation, residual, out, kv_cache)
        return _make_plan(x, weight, residual, out, colsum is not None, bias is not None, activation, kv_cache)

    plan = _cached_plan(key, make)
    operands = (weight, x, bias if bias is not None else x, colsum if colsum is not None else x)
    return _run(plan, key, x, operands, residual, out, kv_cache, eps)


def ln_gelu_mlp(x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias, *, eps=1e-5, out=None):
    """x + gelu_tanh(LN(x) @ fc_weight + fc_bias) @ proj_weight + proj_bias in two launches
    (fc_weight may be a FoldedLinear, with ln_weight, ln_bias and fc_bias None)."""
    checks.tensor("x", x, ndim=2, layout="[M, K]")
    checks.tensor("fc_weight", fc_weight.weight if isinstance(fc_weight, FoldedLinear) else fc_weight, ndim=2)
    checks.tensor("proj_weight", proj_weight, ndim=2)
    K = x.shape[1]
    if fc_weight.shape[0] != K:
        raise ValueError(f"fc_weight must be [K={K}, hidden], got {tuple(fc_weight.shape)}")
    if proj_weight.shape != (fc_weight.shape[1], K):
        raise ValueError(f"proj_weight must be [hidden={fc_weight.shape[1]}, K={K}], got {tuple(proj_weight.shape)}")
    hidden = ln_linear(x, ln_weight, ln_bias, fc_weight, fc_bias, eps=eps, activation="gelu_tanh")
    return ln_linear(hidden, None, None, proj_weight, proj_bias, residual=x, out=out)


# ----------------------------------------------------------------------------------------------
# References (the contract; the engine's CPU "torch" backend runs these)
# ----------------------------------------------------------------------------------------------

def gelu_tanh(x):
    """GPT-2's "gelu_new": 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return F.gelu(x, approximate="tanh")


def folded_linear_ref(x, folded: FoldedLinear, *, eps=1e-5):
    """The fold's math in fp32 torch, cast to x's dtype: rstd * (x @ W' - mean * colsum) + b'."""
    h = x.float()
    var, mean = torch.var_mean(h, dim=-1, keepdim=True, correction=0)
    y = torch.rsqrt(var + eps) * (h @ folded.weight.float() - mean * folded.colsum) + folded.bias
    return y.to(x.dtype)


def ln_linear_ref(x, ln_weight, ln_bias, weight, bias=None, *, eps=1e-5, activation=None, residual=None, kv_cache=None):
    """act(LN(x) @ weight + bias) + residual in plain torch; x [M, K], weight [K, N] or a FoldedLinear;
    with kv_cache, the K/V columns also go to the paged caches (write_kv_columns_ref)."""
    if activation not in (None, "gelu_tanh"):
        raise ValueError(f"activation must be None or 'gelu_tanh', got {activation!r}")
    if isinstance(weight, FoldedLinear):
        y = folded_linear_ref(x, weight, eps=eps)
    else:
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
_GPT2_WIDTHS = (768, 1024, 1280, 1600)
_VOCAB = 50257
_EPILOGUES = {   # what the engine launches: (K, N) of width C, and the epilogue flags
    "ln+bias+kv": (lambda C: (C, 3 * C), dict(ln=True, bias=True, gelu=False, residual=False, kv=True)),
    "ln+bias+gelu": (lambda C: (C, 4 * C), dict(ln=True, bias=True, gelu=True, residual=False)),
    "bias+residual": (lambda C: (C, C), dict(ln=False, bias=True, gelu=False, residual=True)),
    "bias+residual mlp": (lambda C: (4 * C, C), dict(ln=False, bias=True, gelu=False, residual=True)),
    "lm-head wte^T": (lambda C: (C, _VOCAB), dict(ln=True, bias=True, gelu=False, residual=False, lm_head=True)),
}


def _aot(label, tile, dtype, *, ln, bias, gelu, residual, split, kv=False, lm_head=False, int8=False):
    """One shipped configuration, described as the JIT would specialise a real GPT-2 launch: W [K, N]
    contiguous, or a K-major view (the LM head's wte^T; int8: every weight is the view q^T of int8
    codes [N, K], with fp32 scales). The LM head's N = 50257 is not a multiple of 16."""
    from gpt2_engine.kernels.compile_report import AotKernel

    t = "*" + _TL_TYPES[dtype]
    signature = {
        "x_ptr": t, "w_ptr": "*i8" if int8 else t, "scale_ptr": "*fp32", "bias_ptr": "*fp32" if ln else t,
        "colsum_ptr": "*fp32", "res_ptr": t, "out_ptr": t,
        "ws_ptr": "*fp32", "counter_ptr": "*i32", "k_cache_ptr": t, "v_cache_ptr": t, "slot_ptr": "*i64",
        "stride_xm": "i32", "stride_wk": "i32", "stride_wn": "i32", "stride_rm": "i32", "stride_om": "i32",
        "M": "i32", "N": "i32", "K": "i32", "k_per_split": "i32", "kv_width": "i32", "store_n": "i32", "eps": "fp32",
    }
    constexprs = dict(HAS_SCALE=int8, HAS_LN=ln, HAS_BIAS=bias, APPLY_GELU=gelu, HAS_RESIDUAL=residual, WRITE_KV=kv,
                      SPLIT_K=split, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, GROUP_M=tile.group_m)
    # the JIT turns a stride of 1 into a constexpr: [K, N] contiguous -> stride_wn = 1; wte.t(), q.t() -> stride_wk = 1
    k_major = lm_head or int8
    unit = "stride_wk" if k_major else "stride_wn"
    del signature[unit]
    constexprs[unit] = 1
    aligned = ["x_ptr", "w_ptr", "scale_ptr", "bias_ptr", "colsum_ptr", "res_ptr", "out_ptr", "ws_ptr", "counter_ptr",
               "k_cache_ptr", "v_cache_ptr", "slot_ptr", "stride_xm", "stride_rm", "K", "k_per_split",
               "stride_om", "store_n"]   # the LM head's output rows are padded to 16 elements
    if not lm_head:   # GPT-2 widths (768 ... 6400) are multiples of 16; the vocabulary 50257 is not
        aligned += ["N", "kv_width"]
    aligned += ["stride_wn" if k_major else "stride_wk"]   # = K, or N (a GPT-2 width)
    return AotKernel(
        label=label, fn=_ln_linear_kernel, signature=signature, constexprs=constexprs,
        num_warps=tile.num_warps, num_stages=tile.num_stages, aligned=tuple(a for a in aligned if a in signature),
        tensor_cores=dtype != torch.float32, wgmma_on_sm90=dtype != torch.float32 and tile.block_m >= 64,
        vector_store=lm_head,
    )


def planned_aot_kernels(prefix: str, *, int8: bool = False):
    """The planned split-K tiles (M <= 256) the launch plan picks for GPT-2 small..xl: fp16 decode
    and batch tiles; for bf16 and fp32 (the same code in another dtype) the decode tiles."""
    from gpt2_engine.kernels.launch_plan import DECODE_MAX_M, SPLIT_MAX_M

    specs, seen = [], set()
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        d = _TL_TYPES[dtype]
        for epi, (shape, flags) in _EPILOGUES.items():
            for C in _GPT2_WIDTHS:
                K, N = shape(C)
                red = reduction(K, N, dtype, _DEFAULT_NUM_SMS, int8=int8)
                for M in (DECODE_MAX_M, SPLIT_MAX_M) if dtype == torch.float16 else (DECODE_MAX_M,):
                    name, tile = split_tile(M, red, dtype)
                    key = (dtype, epi.split()[0] if "residual" in epi else epi, name, tile, red.split > 1)
                    if key in seen:
                        continue
                    seen.add(key)
                    t = f"{tile.block_m}x{tile.block_n}x{tile.block_k}"
                    specs.append(_aot(f"{prefix} {name} {t} {d} {epi.split(' mlp')[0]}{' split-k' if red.split > 1 else ''}",
                                      tile, dtype, **flags, split=red.split > 1, int8=int8))
    return specs


def aot_kernels():
    """Every (tile, epilogue) the launch plan picks for GPT-2 small..xl: the planned split-K tiles
    (planned_aot_kernels) and the unsplit tiles above M = 256 (fp16; bf16 and fp32 one each)."""
    specs = planned_aot_kernels("ln_linear")
    for dtype, names in ((torch.float16, ("small", "prefill", "prefill_sm90")), (torch.bfloat16, ("prefill_sm90",)),
                         (torch.float32, ("fp32",))):
        for name in names:
            for epi in ("ln+bias+kv", "ln+bias+gelu", "bias+residual"):
                specs.append(_aot(f"ln_linear {name} {_TL_TYPES[dtype]} {epi}", UNSPLIT_TILES[name], dtype,
                                  **_EPILOGUES[epi][1], split=False))
    specs.append(_aot("ln_linear prefill_sm90 fp16 lm-head wte^T", UNSPLIT_TILES["prefill_sm90"], torch.float16,
                      **_EPILOGUES["lm-head wte^T"][1], split=False))
    return specs
