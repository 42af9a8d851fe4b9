"""Causal flash-attention forward for prefill (FlashAttention-2 algorithm, one Triton kernel).

Layouts: q, k, v are `[T, H, D]` packed over a variable-length batch whose sequence i occupies
rows cu_seqlens[i]:cu_seqlens[i+1], or `[B, S, H, D]` when cu_seqlens is None. With
`cu_seqlens_k` (chunked prefill: a query chunk attending to its cached prefix plus itself) the
keys of sequence i are rows cu_seqlens_k[i]:cu_seqlens_k[i+1] of k/v, at least as many as its
queries, and the causal mask is aligned bottom-right: query r of a sequence with Lq queries and
Lk keys sees keys c <= r + (Lk - Lq).

Algorithm. One program owns BLOCK_M query rows of one (sequence, head). It keeps the rows'
running max m, running denominator l and an unnormalised fp32 output accumulator, and streams
the sequence's K/V in BLOCK_N-key tiles once (online softmax): for each tile
    s     = (q @ k^T) * sm_scale * log2(e)          scores in base-2 units, fp32
    m'    = max(m, rowmax(s)),  p = 2^(s - m'),  alpha = 2^(m - m')
    l     = l * alpha + rowsum(p),  acc = acc * alpha + p @ v
and finally out = acc / l. exp2 with log2(e) folded into the scale is one MUFU.EX2 per score.
Causal block skipping: tiles wholly above the diagonal are never loaded; tiles wholly below it
run an unmasked loop; only the BLOCK_M/BLOCK_N (+1 when Lk - Lq is not tile aligned) tiles that
cross the diagonal run the masked loop. Programs take query blocks heaviest first (the last
block of a sequence sees the most keys) so the tail of the grid is short work.

Schedule. `[B, S, H, D]`: grid (cdiv(S, BLOCK_M), H, B). Packed: a flattened grid over every
sequence's query blocks, sized by an upper bound computed on the host without reading
cu_seqlens (no device sync); each program finds its sequence by a prefix sum of per-sequence
block counts over cu_seqlens (BATCH_PAD lanes, a power of two: recompiles only when the batch
size crosses a power of two) and programs past the last block exit at once. Sequence lengths
are runtime ints: new lengths never recompile.

Limits: head_dim 16..128 (padded to a power of two with masks); fp32 / fp16 / bf16 with fp32
accumulation; fp32 inputs use exact fp32 dots (input_precision="ieee"), fp16/bf16 tensor cores.
q, k, v may be strided views (e.g. slices of a fused QKV output) with a contiguous last dim.
cu_seqlens values are trusted (checking them would cost a device sync): they must be
non-decreasing, start at 0, end at T (k's rows for cu_seqlens_k), with Lk >= Lq per sequence.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from gpt2_engine.kernels import triton_defaults  # noqa: F401  (before triton)
import triton
import triton.language as tl

from gpt2_engine.kernels import checks
from gpt2_engine.kernels.launching import aligned, launch

LOG2E = 1.4426950408889634


@triton.jit
def _load_tile(ptrs, rows, num_rows, offs_d, CHECK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Load a [rows, BLOCK_D] tile, zero-filling rows >= num_rows (when CHECK_ROWS) and the
    head_dim padding. Masks exist only where needed so full tiles load as wide vectors."""
    if CHECK_ROWS:
        if BLOCK_D == HEAD_DIM:
            tile = tl.load(ptrs, mask=rows[:, None] < num_rows, other=0.0)
        else:
            tile = tl.load(ptrs, mask=(rows[:, None] < num_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    elif BLOCK_D == HEAD_DIM:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return tile


@triton.jit
def _attend_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, offs_d,
                 stride_kt, stride_vt, k_len, diag, qk_scale,
                 MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over the keys start_n .. start_n + BLOCK_N."""
    cols = start_n + offs_n                                                           # [BLOCK_N]
    k = _load_tile(k_ptrs + start_n * stride_kt, cols, k_len, offs_d, MASKED, HEAD_DIM, BLOCK_D)  # [BLOCK_N, BLOCK_D]
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)                        # [BLOCK_M, BLOCK_N] fp32
    if MASKED:
        # Bottom-right causal mask: row r sees keys c <= r + (Lk - Lq). Keys >= Lk are seen only
        # by padding rows r >= Lq (never stored); they load as zeros, so nothing non-finite.
        qk = tl.where(cols[None, :] <= offs_m[:, None] + diag, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))                                        # [BLOCK_M]
        p = tl.math.exp2(qk - m_new[:, None])                                         # [BLOCK_M, BLOCK_N]
    else:
        # qk_scale > 0, so max(s) * scale == max(s * scale); the subtraction fuses into one FMA.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)                                                 # [BLOCK_M], 0 on the first tile
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_tile(v_ptrs + start_n * stride_vt, cols, k_len, offs_d, MASKED, HEAD_DIM, BLOCK_D)  # [BLOCK_N, BLOCK_D]
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_D]
    return acc, m_new, l_i


@triton.jit
def _flash_attn_fwd_kernel(
    Q, K, V, O, CU_SEQLENS_Q, CU_SEQLENS_K,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    num_seqs, seqlen, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, BATCH_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """q/k/v/o element (seq b, row t, head h, d) lives at X + b*stride_xb + t*stride_xt + h*stride_xh + d.
    Packed inputs have stride_xb = 0 and rows offset by cu_seqlens; [B, S, H, D] inputs start at row 0."""
    head = tl.program_id(1)
    if IS_VARLEN:
        # Which sequence owns flattened query block program_id(0)? Sequence i owns
        # cdiv(Lq_i, BLOCK_M) consecutive blocks; its last block index + 1 is their prefix sum.
        seqs = tl.arange(0, BATCH_PAD)                                                # [BATCH_PAD]
        in_batch = seqs < num_seqs
        q_lens = tl.load(CU_SEQLENS_Q + seqs + 1, mask=in_batch, other=0) - tl.load(CU_SEQLENS_Q + seqs, mask=in_batch, other=0)
        num_blocks = tl.cdiv(q_lens, BLOCK_M)                                         # [BATCH_PAD]
        blocks_end = tl.cumsum(num_blocks, 0)                                         # [BATCH_PAD]
        block = tl.program_id(0)
        before = blocks_end <= block                                                  # sequences wholly before this block
        seq = tl.sum(before.to(tl.int32), 0)
        if seq >= num_seqs:
            return
        local_block = block - tl.sum(tl.where(before, num_blocks, 0), 0)
        q_start = tl.load(CU_SEQLENS_Q + seq)
        q_len = tl.load(CU_SEQLENS_Q + seq + 1) - q_start
        k_start = tl.load(CU_SEQLENS_K + seq)
        k_len = tl.load(CU_SEQLENS_K + seq + 1) - k_start
    else:
        seq = tl.program_id(2)
        local_block = tl.program_id(0)
        q_start = 0
        q_len = seqlen
        k_start = 0
        k_len = seqlen
    start_m = tl.cdiv(q_len, BLOCK_M) - 1 - local_block    # heaviest (latest) query block first
    diag = k_len - q_len                                   # bottom-right causal offset, >= 0

    # 64-bit base offsets: row * row-stride of a long packed batch can pass 2^31 elements.
    seq64 = seq.to(tl.int64)
    q_base = Q + seq64 * stride_qb + (q_start.to(tl.int64) * stride_qt + head * stride_qh)
    k_base = K + seq64 * stride_kb + (k_start.to(tl.int64) * stride_kt + head * stride_kh)
    v_base = V + seq64 * stride_vb + (k_start.to(tl.int64) * stride_vt + head * stride_vh)
    o_base = O + seq64 * stride_ob + (q_start.to(tl.int64) * stride_ot + head * stride_oh)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)     # [BLOCK_M] query rows within the sequence
    offs_n = tl.arange(0, BLOCK_N)                         # [BLOCK_N]
    offs_d = tl.arange(0, BLOCK_D)                         # [BLOCK_D]
    q = _load_tile(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], offs_m, q_len, offs_d, True, HEAD_DIM, BLOCK_D)  # [BLOCK_M, BLOCK_D]
    k_ptrs = k_base + offs_n[:, None] * stride_kt + offs_d[None, :]                  # [BLOCK_N, BLOCK_D]
    v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :]                  # [BLOCK_N, BLOCK_D]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Keys < full_end are visible to every row of the block (c <= first row + diag) and in range;
    # keys >= hi are invisible to every row. [full_end, hi) crosses the diagonal.
    first_row = start_m * BLOCK_M
    full_end = (tl.minimum(first_row + diag + 1, k_len) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(first_row + BLOCK_M + diag, k_len)
    for start_n in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, offs_d,
                                     stride_kt, stride_vt, k_len, diag, qk_scale,
                                     False, HEAD_DIM, BLOCK_D, DOT_PRECISION)
    for start_n in range(full_end, hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, offs_d,
                                     stride_kt, stride_vt, k_len, diag, qk_scale,
                                     True, HEAD_DIM, BLOCK_D, DOT_PRECISION)

    # Every stored row saw key 0, so l_i >= 1.
    out = (acc / l_i[:, None]).to(O.dtype.element_ty)                                 # [BLOCK_M, BLOCK_D]
    o_ptrs = o_base + offs_m[:, None] * stride_ot + offs_d[None, :]
    if BLOCK_D == HEAD_DIM:
        tl.store(o_ptrs, out, mask=offs_m[:, None] < q_len)
    else:
        tl.store(o_ptrs, out, mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM))


@dataclass(frozen=True)
class AttnConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# The one config table (launcher and aot_kernels() both read it), keyed by (arch, input dtype,
# BLOCK_D), each entry checked spill-free on sm_80 and sm_90 by the compile report.
# fp16/bf16: 128 query rows over 8 warps, i.e. two warpgroups each issuing wgmma m64 on sm_90
# (FA2's 128 x 64 tile). At D <= 64 that is 127 registers and 64 KiB shared memory on sm_90, so
# two CTAs share an SM and one's softmax overlaps the other's MMAs; 4 warps (FA2's Ampere
# choice) spill in Triton's sm_80 code, hence 8 there too. D = 128 holds a 128 x 128 fp32
# accumulator: BLOCK_N = 32 is the widest key tile that stays spill-free on both targets, with
# a third pipeline stage on sm_90 (one CTA per SM there, so deeper prefetch hides latency) and
# two on sm_80 (65 -> 49 KiB, leaving room on 99 KiB Ampere/Ada parts).
# fp32 runs on FMA units (exact dots): smaller tiles keep its operands in registers.
_CONFIGS: dict[tuple[int, torch.dtype, int], AttnConfig] = {}
for _dtype in (torch.float16, torch.bfloat16):
    for _block_d in (16, 32, 64):
        _CONFIGS[(90, _dtype, _block_d)] = _CONFIGS[(80, _dtype, _block_d)] = AttnConfig(128, 64, 8, 3)
    _CONFIGS[(90, _dtype, 128)] = AttnConfig(128, 32, 8, 3)
    _CONFIGS[(80, _dtype, 128)] = AttnConfig(128, 32, 8, 2)
for _block_d in (16, 32, 64):
    _CONFIGS[(90, torch.float32, _block_d)] = _CONFIGS[(80, torch.float32, _block_d)] = AttnConfig(64, 32, 8, 2)
_CONFIGS[(90, torch.float32, 128)] = _CONFIGS[(80, torch.float32, 128)] = AttnConfig(32, 16, 8, 2)


def _arch(device: torch.device) -> int:
    """Config table to use: sm_90 on Hopper and on CPU (the interpreter), sm_80 otherwise."""
    if device.type != "cuda":
        return 90
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def _block_d(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


def _config(arch: int, dtype: torch.dtype, head_dim: int) -> AttnConfig:
    return _CONFIGS[(arch, dtype, _block_d(head_dim))]


def _dot_precision(dtype: torch.dtype) -> str:
    # Only fp32 inputs are affected: "ieee" keeps them exact fp32 (no tf32 rounding).
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_inputs(q, k, v, cu_seqlens, cu_seqlens_k, sm_scale, out):
    for name, t in (("q", q), ("k", k), ("v", v)):
        checks.tensor(name, t)
    checks.float_tensor("q", q)
    for name, t in (("k", k), ("v", v)):
        checks.same_dtype(name, t, "q", q.dtype)
        checks.same_device(name, t, "q", q.device)
    if cu_seqlens is None:
        if cu_seqlens_k is not None:
            raise ValueError("flash_attention: cu_seqlens_k needs cu_seqlens (the packed [T, H, D] form)")
        if q.dim() != 4:
            raise ValueError(f"flash_attention: without cu_seqlens q must be [B, S, H, D], got shape {tuple(q.shape)}")
        if k.shape != q.shape or v.shape != q.shape:
            raise ValueError(f"flash_attention: q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    else:
        if q.dim() != 3:
            raise ValueError(f"flash_attention: with cu_seqlens q must be [T, H, D], got shape {tuple(q.shape)}")
        if k.dim() != 3 or k.shape[1:] != q.shape[1:] or v.shape != k.shape:
            raise ValueError(f"flash_attention: k, v must be [T_k, H, D] matching q's H, D: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
        if cu_seqlens_k is None and k.shape[0] != q.shape[0]:
            raise ValueError(f"flash_attention: k has {k.shape[0]} rows but q has {q.shape[0]}; pass cu_seqlens_k for distinct key rows")
        for name, cu in (("cu_seqlens", cu_seqlens), ("cu_seqlens_k", cu_seqlens_k)):
            if cu is None:
                continue
            checks.int_tensor(name, cu)
            if cu.dim() != 1 or cu.shape[0] < 2:
                raise ValueError(f"flash_attention: {name} must be [B+1] with B >= 1, got shape {tuple(cu.shape)}")
            checks.same_device(name, cu, "q", q.device)
        if cu_seqlens_k is not None and cu_seqlens_k.shape != cu_seqlens.shape:
            raise ValueError(f"flash_attention: cu_seqlens_k shape {tuple(cu_seqlens_k.shape)} differs from cu_seqlens {tuple(cu_seqlens.shape)}")
    head_dim = q.shape[-1]
    if not 16 <= head_dim <= 128:
        raise ValueError(f"flash_attention: head_dim must be in 16..128, got {head_dim}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"flash_attention: {name} must have a contiguous last dim (stride(-1) == 1), got strides {t.stride()}")
    if sm_scale is not None and not sm_scale > 0:
        raise ValueError(f"flash_attention: sm_scale must be positive, got {sm_scale}")
    if out is not None:
        if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(f"flash_attention: out must match q ({tuple(q.shape)}, {q.dtype}, {q.device}), got ({tuple(out.shape)}, {out.dtype}, {out.device})")
        if out.stride(-1) != 1:
            raise ValueError(f"flash_attention: out must have a contiguous last dim, got strides {out.stride()}")


def _meta(t):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.get_device())


_PLANS: dict = {}


def _plan(q, k, v, cu_seqlens, cu_seqlens_k, sm_scale, out):
    """(grid, ints after the pointers, constexprs, warps, stages) of a validated call."""
    head_dim = q.shape[-1]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
    cfg = _config(_arch(q.device), q.dtype, head_dim)
    num_heads = q.shape[-2]
    # strides of `out`, or of the new contiguous tensor the launcher allocates
    out_strides = out.stride() if out is not None else tuple(math.prod(q.shape[i + 1:]) for i in range(q.dim()))
    if cu_seqlens is None:
        batch, seqlen = q.shape[0], q.shape[1]
        strides = [t.stride()[:3] for t in (q, k, v)] + [out_strides[:3]]   # (b, t, h) per tensor
        grid = (-(-seqlen // cfg.block_m), num_heads, batch)
        num_seqs, batch_pad = batch, 1
    else:
        num_seqs, total = cu_seqlens.shape[0] - 1, q.shape[0]
        strides = [(0, *t.stride()[:2]) for t in (q, k, v)] + [(0, *out_strides[:2])]
        # sum_i cdiv(L_i, BLOCK_M) <= (T + B * (BLOCK_M - 1)) // BLOCK_M: a bound without reading cu_seqlens.
        grid = ((total + num_seqs * (cfg.block_m - 1)) // cfg.block_m, num_heads, 1)
        seqlen, batch_pad = 0, 1 << (num_seqs - 1).bit_length()
    ints = (*(s for tensor_strides in strides for s in tensor_strides), num_seqs, seqlen, scale * LOG2E)
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                      IS_VARLEN=cu_seqlens is not None, BATCH_PAD=batch_pad, DOT_PRECISION=_dot_precision(q.dtype))
    return grid, ints, constexprs, cfg.num_warps, cfg.num_stages


def flash_attention(q, k, v, cu_seqlens=None, *, sm_scale=None, cu_seqlens_k=None, out=None):
    """Causal attention; see the module docstring for layouts. Returns a new contiguous tensor
    shaped like q (or writes into `out` when given: same shape/dtype/device, last dim contiguous)."""
    try:
        key = (_meta(q), _meta(k), _meta(v), _meta(cu_seqlens), _meta(cu_seqlens_k), _meta(out), sm_scale)
        plan = _PLANS.get(key)
    except (AttributeError, TypeError):   # not tensors: the checks name the culprit
        key, plan = None, None
    if plan is None:
        _check_inputs(q, k, v, cu_seqlens, cu_seqlens_k, sm_scale, out)
        plan = _plan(q, k, v, cu_seqlens, cu_seqlens_k, sm_scale, out)
        if key is not None:
            _PLANS[key] = plan
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.numel() == 0:
        return out
    grid, ints, constexprs, num_warps, num_stages = plan
    if cu_seqlens is None:
        cu_q = cu_k = q  # unread placeholders: IS_VARLEN=False never touches them
    else:
        cu_q, cu_k = cu_seqlens, cu_seqlens_k if cu_seqlens_k is not None else cu_seqlens
    tensors = (q, k, v, out, cu_q, cu_k)
    launch_key = (key, aligned(*tensors)) if key is not None and q.device.type == "cuda" else None
    launch(_flash_attn_fwd_kernel, grid, (*tensors, *ints), constexprs, num_warps=num_warps, num_stages=num_stages,
           key=launch_key)
    return out


def flash_attention_ref(q, k, v, cu_seqlens=None, *, sm_scale=None, cu_seqlens_k=None, out=None):
    """Plain-torch causal attention with the launcher's signature (computes in q's dtype)."""
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens is None:
        # [B, S, H, D] -> [B, H, S, D] for SDPA and back.
        result = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale)
        result = result.transpose(1, 2)
    else:
        starts_q = cu_seqlens.tolist()
        starts_k = cu_seqlens_k.tolist() if cu_seqlens_k is not None else starts_q
        result = torch.empty_like(q)
        for i in range(len(starts_q) - 1):
            q0, q1, k0, k1 = starts_q[i], starts_q[i + 1], starts_k[i], starts_k[i + 1]
            if q1 == q0:
                continue
            qi, ki, vi = (t.transpose(0, 1) for t in (q[q0:q1], k[k0:k1], v[k0:k1]))  # [H, L, D]
            # bottom-right causal mask: query r sees keys c <= r + (Lk - Lq)
            rows = torch.arange(q1 - q0, device=q.device)[:, None]
            cols = torch.arange(k1 - k0, device=q.device)[None, :]
            mask = cols <= rows + ((k1 - k0) - (q1 - q0))
            result[q0:q1] = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale).transpose(0, 1)
    if out is None:
        return result
    return out.copy_(result)


# ---- ahead-of-time compile configurations (kernels.compile_report) ----

_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_STRIDES = [f"stride_{t}{d}" for t in "qkvo" for d in "bth"]


def _aot_kernel(archs: list[int], dtype: torch.dtype, head_dim: int, varlen: bool):
    """The kernel as GPT-2 launches it: q, k, v slices of a fused [T, 3, H, D] QKV output
    (row stride 3*H*D, head stride D, all multiples of 16) into a contiguous [T, H, D] out."""
    from gpt2_engine.kernels.compile_report import AotKernel  # deferred: the report module imports this one

    cfg = _config(archs[0], dtype, head_dim)
    ptr = f"*{_TRITON_DTYPE[dtype]}"
    signature = {"Q": ptr, "K": ptr, "V": ptr, "O": ptr, "CU_SEQLENS_Q": "*i32", "CU_SEQLENS_K": "*i32",
                 **{s: "i32" for s in _STRIDES}, "num_seqs": "i32", "seqlen": "i32", "qk_scale": "fp32"}
    aligned = ("Q", "K", "V", "O", "CU_SEQLENS_Q", "CU_SEQLENS_K", *_STRIDES)
    block_d = _block_d(head_dim)
    layout = "varlen" if varlen else "bshd"
    return AotKernel(
        label=f"flash_attn_fwd {_TRITON_DTYPE[dtype]} D={head_dim} {layout} {cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages} [{'/'.join(f'sm{a}' for a in archs)} table]",
        fn=_flash_attn_fwd_kernel,
        signature=signature,
        constexprs=dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                        IS_VARLEN=varlen, BATCH_PAD=64 if varlen else 1, DOT_PRECISION=_dot_precision(dtype)),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        aligned=aligned,
        tensor_cores=dtype != torch.float32,
        wgmma_on_sm90=cfg.block_m >= 64 and cfg.num_warps % 4 == 0,
    )


def aot_kernels():
    """Every configuration the launcher can pick for GPT-2-family shapes, once per distinct
    (dtype, head_dim, tile config, layout); the label names the arch tables that ship it."""
    wanted = [(dtype, d, True) for dtype in (torch.float16, torch.bfloat16) for d in (32, 64, 128)]
    wanted += [(torch.float16, 80, True), (torch.float16, 64, False), (torch.float32, 64, True), (torch.float32, 128, True)]
    specs: dict[tuple, list[int]] = {}
    for dtype, head_dim, varlen in wanted:
        for arch in (90, 80):
            specs.setdefault((dtype, head_dim, varlen, _config(arch, dtype, head_dim)), []).append(arch)
    return [_aot_kernel(archs, dtype, head_dim, varlen) for (dtype, head_dim, varlen, _), archs in specs.items()]
