"""Paged KV cache: KV write and single-launch split-K paged decode attention.

Cache layout: k_cache, v_cache `[num_blocks, block_size, H, D]` (last dim contiguous, the
(block, offset) dims collapsible so that token slot s = block * block_size + offset lives at
s * stride(1)); block_tables int32 `[B, max_blocks]` lists each sequence's blocks in order;
context_lens int32 `[B]` counts its cached tokens (>= 1, including the current one, whose K/V
are already written). Entries of a table row past the sequence's last used block may hold
anything (-1, stale ids): the kernel never reads them.

write_kv: one program per token copies its `[H, D]` K and V rows (16-byte vectors along D) to
cache slot slot_mapping[t]; a negative slot (padding) is skipped. (The engine's decode step does
not launch it: fused_linear's ln_linear(..., kv_cache=...) writes K/V in the QKV GEMM's epilogue.)

paged_decode_attention (flash-decoding): one query token per sequence. Grid (B, H, S): program
(b, h, s) owns head h of sequence b and split s of its context. The context is cut into tiles of
BLOCK_N = 64 tokens (a multiple of block_size, so every tile is whole cache blocks: the tile's block
ids are read from the table and its K/V rows gathered, 16 bytes per load along D), and split s
owns tiles [s * T, (s + 1) * T) with T = KV_CHUNK / BLOCK_N fixed (kernels/launch_plan.py): how a
sequence's softmax is cut depends on its own length only, never on what else is batched. S is
sized by the block tables' width (no host sync); a split past a sequence's end is empty. The loop
is software-pipelined by Triton (PIPELINE_STAGES): the K/V rows of the next tiles are copied
asynchronously (cp.async) into shared memory while the current tile is computed. Each
program streams its tiles with an online softmax in fp32, base 2 (q is prescaled by
sm_scale * log2(e), so p = exp2(s - m)):

    m' = max(m, max_j s_j);  l' = l * 2^(m - m') + sum_j 2^(s_j - m');  a' = a * 2^(m - m') + sum_j 2^(s_j - m') v_j

Each of the tile's BLOCK_N rows keeps its own (m, l, a) over the tokens it sees (no cross-warp
reduction inside the loop); the rows' states are combined once after the loop with the merge
below. With S == 1 the program writes a / l straight to the output. With S > 1 it writes its
partial (m_s, l_s, a_s) to fp32 workspaces and arrives at the (b, h) arrival counter
(kernels/arrival_counter.py: determinism and memory ordering are argued there); the last of the
S programs of (b, h) to arrive loads the S partials (.cg) and combines them, in the same launch:

    M = max_s m_s;  w_s = 2^(m_s - M);  out = (sum_s w_s a_s) / (sum_s w_s l_s)

A split whose run is empty (a short sequence batched with long ones) leaves m = -inf, l = 0,
a = 0, so w_s = 0 and it drops out; split 0 always holds tile 0, so M is finite and L > 0. The
merge loads the S <= MAX_SPLITS partials as one [MAX_SPLITS] / [MAX_SPLITS, HEAD_DIM] block and
reduces it with fixed-shape tl.max / tl.sum, so the result does not depend on which split merges.

Context lengths, split counts and table widths are runtime values: nothing recompiles per length.
Contexts longer than MAX_SPLITS * KV_CHUNK = 8192 tokens get longer chunks (the merge's capacity).

Limits: head_dim and block_size powers of two; fp32/fp16/bf16 with q, caches and k/v of one
dtype; values of context_lens are checked for host tensors only (on a GPU that would be a sync per call).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from gpt2_engine.kernels import triton_defaults  # noqa: F401  (before triton)
import triton
import triton.language as tl

from gpt2_engine.kernels import checks
from gpt2_engine.kernels.arrival_counter import buffers, guarded_launch, last_to_arrive
from gpt2_engine.kernels.launch_plan import MAX_SPLITS, attention_plan, kv_tile
from gpt2_engine.kernels.launching import aligned, launch

LOG2E = 1.4426950408889634
# 8 warps over a 64-token tile: 2 rows of K and V per thread (16-byte loads), ~64 registers,
# so 4 programs (32 warps) fit on an SM and keep enough K/V bytes in flight.
DECODE_WARPS = 8
# The decode loop's pipeline depth: 2 tiles of K and V in flight ahead of the one computed, in a
# shared-memory ring (fp16: 32 KiB per program, so the 4 programs that the registers allow fit).
PIPELINE_STAGES = tl.constexpr(3)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_cs, stride_ch,
    num_heads,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding token: nothing to write
        return
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HEAD_DIM)
    # Rows are masked per head only (constant along D), so the copies stay 16-byte vectors.
    mask = (h < num_heads)[:, None]                                                   # [BLOCK_H, 1]
    src_k = k_ptr + t.to(tl.int64) * stride_kt + h[:, None] * stride_kh + d[None, :]  # [BLOCK_H, HEAD_DIM]
    src_v = v_ptr + t.to(tl.int64) * stride_vt + h[:, None] * stride_vh + d[None, :]
    dst = slot * stride_cs + h[:, None] * stride_ch + d[None, :]                      # [BLOCK_H, HEAD_DIM]
    tl.store(k_cache_ptr + dst, tl.load(src_k, mask=mask), mask=mask)
    tl.store(v_cache_ptr + dst, tl.load(src_v, mask=mask), mask=mask)


@triton.jit
def _table_index(pos, last_block, BLOCK_SIZE: tl.constexpr):
    """Block-table column of token positions, clamped to the sequence's last used block."""
    return tl.minimum(pos // BLOCK_SIZE, last_block)


@triton.jit
def _combine_softmax_states(m, l, acc):
    """Merge online-softmax states along axis 0 (log2 domain): m, l `[N]`, acc `[N, HEAD_DIM]` ->
    M = max m, L = sum 2^(m - M) l, A = sum 2^(m - M) acc; a state with m = -inf (or the -1e30
    sentinel below a finite M) gets weight 0."""
    m_max = tl.max(m, axis=0)
    w = tl.exp2(m - m_max)                                                             # [N]
    return m_max, tl.sum(w * l, axis=0), tl.sum(w[:, None] * acc, axis=0)


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, ws_ptr, counter_ptr,
    stride_qb, stride_qh,
    stride_cs, stride_ch,
    stride_tb,
    stride_ob, stride_oh,
    tiles_per_split, qk_scale,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    num_heads = tl.num_programs(1)
    num_splits = tl.num_programs(2)

    context_len = tl.load(context_lens_ptr + b)
    n_tiles = tl.cdiv(context_len, BLOCK_N)
    tile_lo = s * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, n_tiles)   # tile_lo >= tile_hi: empty split

    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d).to(tl.float32) * qk_scale    # [HEAD_DIM], log2 domain
    table_row = block_tables_ptr + b.to(tl.int64) * stride_tb
    last_block = (context_len - 1) // BLOCK_SIZE
    head_off = h * stride_ch + d[None, :]                                              # [1, HEAD_DIM]

    # Row r of the tile runs its own online softmax over tokens r, r + BLOCK_N, ...: the loop
    # needs no cross-warp reduction (no barrier); the BLOCK_N states are merged once at the end.
    # -1e30 (not -inf) starts the max so that a row seeing only masked tokens keeps
    # 2^(m - m') = 1 instead of 2^(-inf + inf) = NaN; it weighs 0 against any real score.
    m_i = tl.full([BLOCK_N], -1e30, dtype=tl.float32)                                  # [BLOCK_N]
    l_i = tl.zeros([BLOCK_N], dtype=tl.float32)                                        # [BLOCK_N]
    acc = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)                              # [BLOCK_N, HEAD_DIM]
    # Table indices are clamped to the sequence's last used block, so every load is in bounds and
    # needs no mask: rows past context_len re-read real cache rows (L1/L2 hits) and are masked out
    # of the softmax; entries past the last used block are never read. Each row reads its block's
    # id (rows of one block share the address). Prefetch: Triton's software pipeliner
    # (tl.range(..., num_stages=PIPELINE_STAGES)) turns the K/V gathers into cp.async copies into a
    # shared-memory ring of PIPELINE_STAGES - 1 tiles, issued that many tiles ahead of the tile being
    # computed (compile report: LDGSTS in the loop body, DEPBAR before the shared loads), so each
    # program keeps the next tiles' K/V bytes in flight while it computes the current one.
    n = tile_lo * BLOCK_N + tl.arange(0, BLOCK_N)                                      # [BLOCK_N] token positions
    for _tile in tl.range(tile_lo, tile_hi, num_stages=PIPELINE_STAGES):
        block = tl.load(table_row + _table_index(n, last_block, BLOCK_SIZE))          # [BLOCK_N] block ids
        kv_off = (block.to(tl.int64) * BLOCK_SIZE + n % BLOCK_SIZE)[:, None] * stride_cs + head_off
        k = tl.load(k_cache_ptr + kv_off)                                              # [BLOCK_N, HEAD_DIM]
        v = tl.load(v_cache_ptr + kv_off)
        valid = n < context_len
        scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)                         # [BLOCK_N]
        scores = tl.where(valid, scores, -float("inf"))
        m_new = tl.maximum(m_i, scores)                                                # [BLOCK_N]
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new)                                                    # [BLOCK_N], 0 where masked
        l_i = l_i * alpha + p
        # where(): a row past context_len may hold stale or NaN V, and 0 * NaN = NaN.
        pv = tl.where(valid[:, None], p[:, None] * v.to(tl.float32), 0.0)              # [BLOCK_N, HEAD_DIM]
        acc = acc * alpha[:, None] + pv
        m_i = m_new
        n += BLOCK_N

    m, l, a = _combine_softmax_states(m_i, l_i, acc)                                   # scalar, scalar, [HEAD_DIM]
    out_row = out_ptr + b * stride_ob + h * stride_oh + d                              # [HEAD_DIM]
    if SPLIT:
        # Unnormalised partial of split s at workspace row (b, h, s); an empty split writes the
        # neutral state (m = -inf, l = 0, a = 0).
        # workspace (fp32): acc [B * H * S, HEAD_DIM], then max [B * H * S], then sum [B * H * S]
        num_rows = tl.num_programs(0) * num_heads * num_splits
        part_acc_ptr = ws_ptr
        part_max_ptr = ws_ptr + num_rows.to(tl.int64) * HEAD_DIM
        part_sum_ptr = part_max_ptr + num_rows
        first_row = (b * num_heads + h) * num_splits
        row = first_row + s
        tl.store(part_acc_ptr + row.to(tl.int64) * HEAD_DIM + d, a)
        tl.store(part_max_ptr + row, tl.where(l > 0, m, -float("inf")))
        tl.store(part_sum_ptr + row, l)
        if last_to_arrive(counter_ptr + b * num_heads + h, num_splits):
            # The last split of (b, h) to arrive merges all of them. Split 0 is never empty, so
            # M is finite and L > 0.
            splits = tl.arange(0, BLOCK_S)
            has = splits < num_splits
            rows = first_row + splits                                                  # [BLOCK_S]
            m_s = tl.load(part_max_ptr + rows, mask=has, other=-float("inf"), cache_modifier=".cg")  # [BLOCK_S]
            l_s = tl.load(part_sum_ptr + rows, mask=has, other=0.0, cache_modifier=".cg")           # [BLOCK_S]
            a_s = tl.load(part_acc_ptr + rows.to(tl.int64)[:, None] * HEAD_DIM + d[None, :],
                          mask=has[:, None], other=0.0, cache_modifier=".cg")          # [BLOCK_S, HEAD_DIM]
            _, l_sum, a_sum = _combine_softmax_states(m_s, l_s, a_s)
            tl.store(out_row, (a_sum / l_sum).to(out_ptr.dtype.element_ty))
    else:
        tl.store(out_row, (a / l).to(out_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _check_float(name, t, dtype=None):
    checks.float_tensor(name, t)
    if dtype is not None:
        checks.same_dtype(name, t, "k_cache", dtype)


def check_caches(k_cache, v_cache):
    """The cache contract: two float [num_blocks, block_size, H, D] tensors of one dtype, shape, strides
    and device; contiguous last dim, collapsible (block, offset) dims, block_size and D powers of two."""
    _check_float("k_cache", k_cache)
    _check_float("v_cache", v_cache, k_cache.dtype)
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be [num_blocks, block_size, H, D], got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        raise ValueError(f"v_cache (shape {tuple(v_cache.shape)}, strides {v_cache.stride()}) must match k_cache "
                         f"(shape {tuple(k_cache.shape)}, strides {k_cache.stride()})")
    checks.same_device("v_cache", v_cache, "k_cache", k_cache.device)
    _, block_size, _, head_dim = k_cache.shape
    if k_cache.stride(3) != 1 or k_cache.stride(0) != block_size * k_cache.stride(1):
        raise ValueError(f"k_cache/v_cache need a contiguous last dim and collapsible (block, offset) dims, "
                         f"got strides {k_cache.stride()}")
    for name, value in (("block_size", block_size), ("head_dim", head_dim)):
        if value & (value - 1):
            raise ValueError(f"k_cache {name} must be a power of two, got {value}")


def check_slot_mapping(slot_mapping, num_tokens, device):
    """slot_mapping must be an int32/int64 [num_tokens] tensor on the cache's device."""
    checks.int_tensor("slot_mapping", slot_mapping, (torch.int32, torch.int64))
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping must be [T] = [{num_tokens}], got {tuple(slot_mapping.shape)}")
    checks.same_device("slot_mapping", slot_mapping, "the cache", device)


def _check_context_lens_values(context_lens, max_context):
    """Value checks read the tensor: free for host tensors, a device sync for CUDA ones, so the
    launcher runs this on host tensors only; on a GPU the range of context_lens is a precondition
    the runtime's block manager guarantees."""
    lo, hi = (int(v) for v in torch.aminmax(context_lens))
    if lo < 1 or hi > max_context:
        raise ValueError(f"context_lens must lie in [1, max_blocks * block_size = {max_context}], got min {lo}, max {hi}")


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def write_kv(k, v, k_cache, v_cache, slot_mapping):
    """Scatter k, v `[T, H, D]` into the caches at slot_mapping `[T]`; negative slots are skipped."""
    check_caches(k_cache, v_cache)
    _, _, num_heads, head_dim = k_cache.shape
    for name, t in (("k", k), ("v", v)):
        _check_float(name, t, k_cache.dtype)
        if t.dim() != 3 or tuple(t.shape[1:]) != (num_heads, head_dim):
            raise ValueError(f"{name} must be [T, {num_heads}, {head_dim}] to match the cache, got {tuple(t.shape)}")
        checks.same_device(name, t, "the cache", k_cache.device)
    if v.shape[0] != k.shape[0]:
        raise ValueError(f"k has {k.shape[0]} tokens, v has {v.shape[0]}")
    check_slot_mapping(slot_mapping, k.shape[0], k_cache.device)
    if k.shape[0] == 0:
        return
    k, v, slot_mapping = _last_dim_contiguous(k), _last_dim_contiguous(v), slot_mapping.contiguous()
    block_h = 1 << (num_heads - 1).bit_length()
    _write_kv_kernel[(k.shape[0],)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1),
        v.stride(0), v.stride(1),
        k_cache.stride(1), k_cache.stride(2),
        num_heads,
        HEAD_DIM=head_dim, BLOCK_H=block_h,
        num_warps=4,
    )


def _validate_decode(q, k_cache, v_cache, block_tables, context_lens, num_splits, out):
    check_caches(k_cache, v_cache)
    _check_float("q", q, k_cache.dtype)
    _, block_size, num_heads, head_dim = k_cache.shape
    if q.dim() != 3 or tuple(q.shape[1:]) != (num_heads, head_dim):
        raise ValueError(f"q must be [B, {num_heads}, {head_dim}] to match the cache, got {tuple(q.shape)}")
    checks.same_device("q", q, "the cache", k_cache.device)
    if q.stride(-1) != 1:
        raise ValueError(f"q must have a contiguous last dim, got strides {q.stride()}")
    batch = q.shape[0]
    checks.int_tensor("block_tables", block_tables)
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or block_tables.shape[1] < 1:
        raise ValueError(f"block_tables must be [B={batch}, max_blocks >= 1], got {tuple(block_tables.shape)}")
    if block_tables.stride(1) != 1:
        raise ValueError(f"block_tables must have a contiguous last dim, got strides {block_tables.stride()}")
    checks.int_tensor("context_lens", context_lens)
    if context_lens.shape != (batch,) or context_lens.stride(0) != 1:
        raise ValueError(f"context_lens must be a contiguous [B] = [{batch}], got {tuple(context_lens.shape)}")
    for name, t in (("block_tables", block_tables), ("context_lens", context_lens)):
        checks.same_device(name, t, "q", q.device)
    if num_splits is not None and not (isinstance(num_splits, int) and 1 <= num_splits <= MAX_SPLITS):
        raise ValueError(f"num_splits must be an int in [1, {MAX_SPLITS}], got {num_splits!r}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device
                            or out.stride(-1) != 1):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device} with a contiguous last dim, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}, strides {out.stride()}")


def _meta(t):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.get_device())


_PLANS: dict = {}


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, *, sm_scale=None, num_splits=None, out=None):
    """softmax(q K^T * sm_scale) V for one query per sequence over its paged K/V; q `[B, H, D]` (last
    dim contiguous), block_tables / context_lens int32 with contiguous rows.
    `out` (optional, `[B, H, D]` in q's dtype, last dim contiguous) receives the result.
    num_splits None: fixed KV chunks (batch-invariant); an int cuts every context into that many runs."""
    try:
        key = (_meta(q), _meta(k_cache), _meta(v_cache), _meta(block_tables), _meta(context_lens), _meta(out),
               sm_scale, num_splits)
        plan = _PLANS.get(key)
    except (AttributeError, TypeError):   # not tensors: the checks name the culprit
        key, plan = None, None
    if plan is None:
        _validate_decode(q, k_cache, v_cache, block_tables, context_lens, num_splits, out)
        batch, num_heads, head_dim = q.shape
        block_size = k_cache.shape[1]
        max_context = block_tables.shape[1] * block_size
        splits, per_split = attention_plan(max_context, block_size, num_splits)
        scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
        plan = ((batch, num_heads, splits), max_context,
                (q.stride(0), q.stride(1), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
                 *((num_heads * head_dim, head_dim) if out is None else out.stride()[:2]),   # out: new contiguous or given
                 per_split, scale * LOG2E),
                dict(BLOCK_SIZE=block_size, BLOCK_N=kv_tile(block_size), HEAD_DIM=head_dim, SPLIT=splits > 1,
                     BLOCK_S=MAX_SPLITS))
        if key is not None:
            _PLANS[key] = plan
    grid, max_context, ints, constexprs = plan
    batch, num_heads, splits = grid
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    device = q.device
    if not context_lens.is_cuda:
        _check_context_lens_values(context_lens, max_context)
    if splits > 1:
        bufs = buffers(device)
        ws = bufs.get_workspace(batch * num_heads * splits * (constexprs["HEAD_DIM"] + 2))
        counters = bufs.get_counters(batch * num_heads)
    else:
        ws = counters = out  # unused: SPLIT=False writes out directly
    tensors = (q, k_cache, v_cache, block_tables, context_lens, out, ws, counters)
    launch_key = (key, aligned(*tensors)) if key is not None and device.type == "cuda" else None
    guarded_launch(lambda: launch(_paged_decode_kernel, grid, (*tensors, *ints), constexprs, num_warps=DECODE_WARPS,
                                  num_stages=1, key=launch_key), device)
    return out


# ---------------------------------------------------------------------------------------------
# References (the contract; the CPU "torch" backend runs these)
# ---------------------------------------------------------------------------------------------

def write_kv_ref(k, v, k_cache, v_cache, slot_mapping):
    """Scatter k, v `[T, H, D]` into the caches at slot_mapping `[T]`; negative slots are skipped."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    slots = slot_mapping.long()
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, *, sm_scale=None, num_splits=None, out=None):
    """One query per sequence over its paged context: gather the K/V rows, then masked SDPA."""
    index = paged_gather_index(block_tables, context_lens, k_cache.shape[1], q.dtype)
    return gathered_decode_attention(q, k_cache, v_cache, index, sm_scale=sm_scale, out=out)


def paged_gather_index(block_tables, context_lens, block_size, dtype=torch.float32):
    """(slots int64 [B * L], mask) with L = max context: the cache row of each sequence's position
    p, and SDPA's additive mask [B, 1, 1, L] in `dtype` (0 where p < the sequence's context length,
    -inf past it), or None when every sequence has length L (then SDPA needs no mask: batch 1
    always). Built once per step. A position past a sequence's end reads its last valid row (masked
    out), so only table entries of used blocks are followed and no uninitialised row (NaN: 0 * NaN =
    NaN) is ever read."""
    lens = context_lens.long()[:, None]                                         # [B, 1]
    shortest, longest = (int(v) for v in context_lens.aminmax())
    steps = torch.arange(longest, device=context_lens.device)[None, :]          # [1, L]
    positions = torch.minimum(steps, lens - 1)                                  # [B, L]
    slots = block_tables.long().gather(1, positions // block_size) * block_size + positions % block_size
    if shortest == longest:
        return slots.flatten(), None
    mask = torch.zeros(positions.shape, dtype=dtype, device=context_lens.device).masked_fill_(steps >= lens, float("-inf"))
    return slots.flatten(), mask[:, None, None, :]


def gathered_decode_attention(q, k_cache, v_cache, index, *, sm_scale=None, out=None):
    """SDPA of q [B, H, D] over the cache rows named by a paged_gather_index (with its mask)."""
    slots, mask = index
    batch, _, head_dim = q.shape
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
    # [B, H, L, D] strided views of the gathered rows (index_select: about 2x faster than indexing on CPU)
    keys = k_cache.flatten(0, 1).index_select(0, slots).view(batch, -1, *k_cache.shape[2:]).transpose(1, 2)
    values = v_cache.flatten(0, 1).index_select(0, slots).view(batch, -1, *v_cache.shape[2:]).transpose(1, 2)
    result = F.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=mask, scale=scale)[:, :, 0]
    if out is None:
        return result
    out.copy_(result)
    return out


# ---------------------------------------------------------------------------------------------
# Ahead-of-time configurations
# ---------------------------------------------------------------------------------------------

def aot_kernels():
    """Every configuration the launchers pick for GPT-2 models: head_dim 64, the engine's
    block_size 16, fp16/bf16/fp32; write_kv at BLOCK_H 16 (12 or 16 heads) and 32 (20 or 25)."""
    from gpt2_engine.kernels.compile_report import AotKernel

    specs = []
    for dtype in ("fp16", "bf16", "fp32"):
        ptr = f"*{dtype}"
        for block_h in (16, 32):
            specs.append(AotKernel(
                label=f"paged_write_kv_{dtype}_h{block_h}_d64",
                fn=_write_kv_kernel,
                signature={"k_ptr": ptr, "v_ptr": ptr, "k_cache_ptr": ptr, "v_cache_ptr": ptr, "slot_ptr": "*i32",
                           "stride_kt": "i32", "stride_kh": "i32", "stride_vt": "i32", "stride_vh": "i32",
                           "stride_cs": "i32", "stride_ch": "i32", "num_heads": "i32"},
                constexprs={"HEAD_DIM": 64, "BLOCK_H": block_h},
                num_warps=4, num_stages=1,
                aligned=("k_ptr", "v_ptr", "k_cache_ptr", "v_cache_ptr", "slot_ptr",
                         "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_cs", "stride_ch"),
                tensor_cores=False,
            ))
        for split in (False, True):
            specs.append(AotKernel(
                label=f"paged_decode_{dtype}_bs16_d64_{'split' if split else 'nosplit'}",
                fn=_paged_decode_kernel,
                signature={"q_ptr": ptr, "k_cache_ptr": ptr, "v_cache_ptr": ptr, "block_tables_ptr": "*i32",
                           "context_lens_ptr": "*i32", "out_ptr": ptr,
                           "ws_ptr": "*fp32" if split else ptr, "counter_ptr": "*i32" if split else ptr,
                           "stride_qb": "i32", "stride_qh": "i32", "stride_cs": "i32", "stride_ch": "i32",
                           "stride_tb": "i32", "stride_ob": "i32", "stride_oh": "i32", "tiles_per_split": "i32",
                           "qk_scale": "fp32"},
                constexprs={"BLOCK_SIZE": 16, "BLOCK_N": kv_tile(16), "HEAD_DIM": 64, "SPLIT": split,
                            "BLOCK_S": MAX_SPLITS},
                num_warps=DECODE_WARPS, num_stages=1,
                # block_tables' row stride (max_blocks) is arbitrary: not aligned.
                aligned=("q_ptr", "k_cache_ptr", "v_cache_ptr", "block_tables_ptr", "context_lens_ptr", "out_ptr",
                         "ws_ptr", "counter_ptr",
                         "stride_qb", "stride_qh", "stride_cs", "stride_ch", "stride_ob", "stride_oh"),
                tensor_cores=False, async_copies=True,
            ))
    return specs
