"""Persistent decode step: a whole decode forward as one launch of an instruction interpreter.

What
    `run_schedule` launches about one program per SM (PROGRAMS_PER_SM resident programs per SM);
    the programs execute a host-built schedule: an int64 table [n, NUM_FIELDS] of tile
    instructions over flat arenas (weights, fp32 parameters, activations, fp32 workspace, KV
    cache). The kernel knows three instructions and nothing of the model:

      EMBED  out[rows, n0:n0+BN] = table[idx[2r]] + table[idx[2r+1]]     (embedding_bag of a pair)
      GEMV   one K slice x one column tile of act(LN(x) @ W' + b') + residual, LN folded as in
             fused_linear (y = rstd * (x @ W' - mean * colsum) + b'); split-K slices store fp32
             partials and the last slice to arrive (arrival_counter.last_to_arrive) sums them in
             the fixed order 0..S-1 and runs the epilogue (bias, GELU, residual, the KV write)
      ATTN   one KV chunk of paged decode attention for (row, head); the last chunk to arrive
             merges the chunks' softmax states (as paged_attention's split kernel)

    Each instruction names an arrival counter to wait on (and the count it must reach) and a
    counter to publish to when its output unit is complete: the schedule's dependency graph.

Queue and progress
    Programs take instruction indices from one global counter (relaxed atomic_add). The schedule
    is in topological order (check_schedule: an instruction waits only on instructions before it),
    so the smallest unfinished instruction never waits on anything unfinished: whichever program
    holds it makes progress, for any number of programs and any interleaving, including Triton's
    interpreter, which runs program 0 to the end before starting program 1 (program 0 then executes
    the whole schedule and the others find the queue empty). A program takes its next index before
    executing the current one (the atomic's latency hides behind the work); the held index is
    larger than the current one, so the argument still holds.

Weight loads before the wait
    A GEMV loads its whole [BLOCK_K, BLOCK_N] weight tile (and its fp32 bias / colsum) before it
    spins on its input counter: weights never depend on activations, so each resident program
    keeps one tile in flight while it waits for the previous stage. In the sm_90 SASS this is the
    tile's four LDG.E.128 per thread issued before the wait's poll (LDG.E.STRONG.GPU followed by
    CCTL.IVALL: the acquire, as ptxas emits it, then its back-edge loop) and consumed (the dot's
    operand staging, then HMMA) only after it; the compile report checks that order
    (`loads_before_wait`) on sm_80 and sm_90.

Memory ordering (PTX memory model; see arrival_counter.py for the split-K election)
    publish: every thread's plain stores of the output unit, then bar.sync (tl.debug_barrier), then
      one `atom.add.release.gpu` on the unit's counter: release is cumulative, so all of the CTA's
      stores (ordered before the issuing thread's atomic by the barrier) are visible at gpu scope
      before the increment is.
    wait: an acquire atomic_add of 0 at gpu scope polled until the count is reached (every
      publish it counts synchronises with it; in the SASS a strong load then CCTL.IVALL, which
      drops the SM's stale L1 lines); Triton broadcasts the scalar result through shared memory
      behind a barrier, which orders the other threads' loads after the acquire. Activations are then loaded
      with ".cg" (L2 only): the SM's L1 is not coherent with other SMs' stores.
    Re-arming: the last program to leave (an exit arrival counter) zeroes the queue and every
      stage counter; split counters re-arm themselves. All other programs have left, so nobody
      reads them again in this launch; the kernel boundary orders the zeros before the next launch.

Determinism: every reduction (split-K partials, attention chunks, LayerNorm moments: each K slice's
(mean, M2) from its x tile, merged by the last slice in closed form) runs in an order fixed by the
schedule, so a step's results are bitwise the same run to run.

Time model (engine/persistent_decode.py `time_model`; `python -m gpt2_engine.persistent_decode`)
    From the schedule: step = max(stream, chain) + t_launch, where stream is the bytes over what
    PROGRAMS_PER_SM programs per SM, each with one 16 KB tile in flight, can pull (Little's law:
    an instruction holds its program ~2.6 us: its fields and its tile's first byte from DRAM,
    0.8 us each, the transfer, the split-K arrival atomic), and chain is the 62 dependent stages
    of GPT-2 small (embed, 5 per layer, LM head), each ~2.3-3.5 us after its input publishes (the
    poll, x from L2, the arrival, the partials' reload, the publish) plus a wave per 264
    instructions beyond the first. Assumed (Hopper, loaded): 4.3 TB/s, 132 SMs, DRAM 0.8 us, L2
    round trip 0.3 us, returning atomic 0.5 us, publish 0.3 us, launch and tail 4 us. Its
    estimates for GPT-2 small (README, "Persistent decode step") are below the 60%-of-roofline
    target at batch 1: the model says the stage chain, not bandwidth, decides GPT-2 small (62
    global syncs of at least a publish, a poll and an activation load, ~0.9 us each, already cost
    about the 57 us roofline), and one tile in flight per program caps the stream at ~37% of the
    bandwidth. Unmeasured: no GPU run yet.

Limits: BLOCK_M (the schedule's row bucket) is 16 (mma m16): up to 16 decode rows per step;
    weights and activations of one dtype (fp32 / fp16 / bf16); head_dim and the cache block size
    powers of two; arena offsets in elements, int64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from gpt2_engine.kernels import triton_defaults  # noqa: F401  (before triton)
import triton
import triton.language as tl

from gpt2_engine.kernels import checks
from gpt2_engine.kernels.arrival_counter import last_to_arrive
from gpt2_engine.kernels.fused_linear import _gelu_tanh, gelu_tanh
from gpt2_engine.kernels.launching import aligned, launch

# ---- the instruction format (int64 fields) -----------------------------------------------------

EMBED, GEMV, ATTN = 0, 1, 2
OP_GEMV, OP_ATTN = tl.constexpr(GEMV), tl.constexpr(ATTN)      # the same codes inside the kernel
FIELDS = ("op", "wait_ctr", "wait_count", "done_ctr", "split_ctr", "n_split", "split",
          "x_off", "x_stride", "k", "k0", "w_off", "w_stride", "n0", "n",
          "bias_off", "colsum_off", "res_off", "out_off", "out_stride", "gelu", "kv_off", "ws_off")
NUM_FIELDS = len(FIELDS)
F = {name: i for i, name in enumerate(FIELDS)}
# ATTN reuses fields: x_off/x_stride = q, k0 = row, n0 = head, n = C (= heads x HEAD_DIM), k = KV tiles per
# chunk, kv_off = the layer's K pool. EMBED: w_off/w_stride = the [rows, C] table, n = C, out_* = x.
# GEMV: w_off = its [BLOCK_K, BLOCK_N] weight tile, stored contiguous (row-major, zero-padded past K and N).
# Every *_off, *_stride, kv_off and GEMV / EMBED k0, n0 is a multiple of 16 elements (the builder pads): 16-byte vector accesses.
QUEUE = tl.constexpr(0)             # counters[QUEUE]: the next instruction index
EXIT = tl.constexpr(1)              # counters[EXIT]: programs that found the queue empty
FIRST_FREE_COUNTER = 2              # the schedule's stage and split counters follow
PROGRAMS_PER_SM = 2
NUM_WARPS = 8
SUM_SPLITS = 4            # split-K partials summed per load round trip
MAX_SPLITS_K = 64         # K slices of one GEMV at most (K <= 64 x BLOCK_K: 8192 for fp16, 4096 for fp32)

F_OP = tl.constexpr(F["op"])
F_WAIT_CTR = tl.constexpr(F["wait_ctr"])
F_WAIT_COUNT = tl.constexpr(F["wait_count"])
F_DONE_CTR = tl.constexpr(F["done_ctr"])
F_SPLIT_CTR = tl.constexpr(F["split_ctr"])
F_N_SPLIT = tl.constexpr(F["n_split"])
F_SPLIT = tl.constexpr(F["split"])
F_X_OFF = tl.constexpr(F["x_off"])
F_X_STRIDE = tl.constexpr(F["x_stride"])
F_K = tl.constexpr(F["k"])
F_K0 = tl.constexpr(F["k0"])
F_W_OFF = tl.constexpr(F["w_off"])
F_W_STRIDE = tl.constexpr(F["w_stride"])
F_N0 = tl.constexpr(F["n0"])
F_N = tl.constexpr(F["n"])
F_BIAS_OFF = tl.constexpr(F["bias_off"])
F_COLSUM_OFF = tl.constexpr(F["colsum_off"])
F_RES_OFF = tl.constexpr(F["res_off"])
F_OUT_OFF = tl.constexpr(F["out_off"])
F_OUT_STRIDE = tl.constexpr(F["out_stride"])
F_GELU = tl.constexpr(F["gelu"])
F_KV_OFF = tl.constexpr(F["kv_off"])
F_WS_OFF = tl.constexpr(F["ws_off"])


# ---- kernel --------------------------------------------------------------------------------------

@triton.jit
def _aligned(ins, field):
    """An offset or stride field, which the schedule keeps a multiple of 16 elements: telling the
    compiler lets it vectorise the loads and stores built on it."""
    return tl.multiple_of(tl.load(ins + field), 16)


@triton.jit
def _wait(counters_ptr, ins):
    """Spin until counters[wait_ctr] >= wait_count (acquire); wait_count 0 = no dependency."""
    ctr = tl.load(ins + F_WAIT_CTR)
    count = tl.load(ins + F_WAIT_COUNT)
    seen = tl.atomic_add(counters_ptr + ctr, 0, sem="acquire", scope="gpu")
    while seen < count:
        seen = tl.atomic_add(counters_ptr + ctr, 0, sem="acquire", scope="gpu")


@triton.jit
def _publish(counters_ptr, ins):
    """The CTA's stores of this output unit, then a release increment of its done counter."""
    tl.debug_barrier()
    tl.atomic_add(counters_ptr + tl.load(ins + F_DONE_CTR), 1, sem="release", scope="gpu")


@triton.jit
def _embed(ins, counters_ptr, w_ptr, act_ptr, idx_ptr, M, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    m_mask = rows < M
    offs_n = _aligned(ins, F_N0) + tl.arange(0, BLOCK_N)
    n_mask = offs_n < tl.load(ins + F_N)
    mask = m_mask[:, None] & n_mask[None, :]
    table = w_ptr + _aligned(ins, F_W_OFF)
    stride = _aligned(ins, F_W_STRIDE)
    i0 = tl.load(idx_ptr + 2 * rows, mask=m_mask, other=0)                                  # [BLOCK_M]
    i1 = tl.load(idx_ptr + 2 * rows + 1, mask=m_mask, other=0)
    e = (tl.load(table + i0[:, None] * stride + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
         + tl.load(table + i1[:, None] * stride + offs_n[None, :], mask=mask, other=0.0).to(tl.float32))
    out = act_ptr + _aligned(ins, F_OUT_OFF) + rows[:, None] * _aligned(ins, F_OUT_STRIDE) + offs_n[None, :]
    tl.store(out, e.to(act_ptr.dtype.element_ty), mask=mask)
    _publish(counters_ptr, ins)


@triton.jit
def _gemv(ins, counters_ptr, w_ptr, p_ptr, act_ptr, ws_ptr, kv_ptr, slot_ptr, M, kv_v_offset, eps,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUM_SPLITS: tl.constexpr,
          MAX_SPLITS_K: tl.constexpr):
    K = tl.load(ins + F_K)
    N = tl.load(ins + F_N)
    k0 = _aligned(ins, F_K0)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = _aligned(ins, F_N0) + tl.arange(0, BLOCK_N)
    k_mask = offs_k < K
    n_mask = offs_n < N
    # 1. The weight tile, before any wait: BLOCK_K x BLOCK_N contiguous elements (one run of 16 KB
    #    in fp16), zero-padded by the builder, so no mask and one 16-byte load per 8 elements.
    w = tl.load(w_ptr + _aligned(ins, F_W_OFF) + tl.arange(0, BLOCK_K)[:, None] * BLOCK_N
                + tl.arange(0, BLOCK_N)[None, :])                                         # [BLOCK_K, BLOCK_N]
    colsum_off = tl.load(ins + F_COLSUM_OFF)       # the epilogue's fp32 vectors: no activation in them either
    colsum = tl.load(p_ptr + colsum_off + offs_n, mask=offs_n < tl.where(colsum_off >= 0, N, 0), other=0.0)  # [BLOCK_N]
    bias_off = tl.load(ins + F_BIAS_OFF)                                                  # -1: none (loads 0)
    bias = tl.load(p_ptr + bias_off + offs_n, mask=offs_n < tl.where(bias_off >= 0, N, 0), other=0.0)        # [BLOCK_N]
    # 2. Its input activations, once the stage that writes them has published.
    _wait(counters_ptr, ins)
    rows = tl.arange(0, BLOCK_M)
    m_mask = rows < M
    x_ptr = act_ptr + _aligned(ins, F_X_OFF)
    x_stride = _aligned(ins, F_X_STRIDE)
    x = tl.load(x_ptr + rows[:, None] * x_stride + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                other=0.0, cache_modifier=".cg")                                          # [BLOCK_M, BLOCK_K]
    acc = tl.dot(x, w.to(x.dtype), input_precision="ieee")                               # [BLOCK_M, BLOCK_N] fp32
    # The rows' LayerNorm moments over this K slice, from the x tile already in registers:
    # mean and M2 (sum of squared deviations) of n_k = min(BLOCK_K, K - k0) values.
    n_k = tl.minimum(K - k0, BLOCK_K) * 1.0
    xf = x.to(tl.float32)
    mean = tl.sum(xf, axis=1) / n_k                                                       # [BLOCK_M]
    dev = tl.where(k_mask[None, :], xf - mean[:, None], 0.0)
    m2 = tl.sum(dev * dev, axis=1)
    # 3. Split K. Slice s stores its partial tile at ws[ws_off + s * BLOCK_M * BLOCK_N] and its
    #    moments at ws[ws_off + S * BLOCK_M * BLOCK_N + s * 2 * BLOCK_M]; the last slice to arrive sums
    #    the partials SUM_SPLITS per L2 round trip (one [SUM_SPLITS, BLOCK_M, BLOCK_N] load, a
    #    fixed-shape tl.sum, rounds in order) and merges all S moments in one [MAX_SPLITS_K, BLOCK_M]
    #    load: mean = sum n_s mean_s / K, M2 = sum M2_s + n_s (mean_s - mean)^2 (Chan, closed form).
    #    Fixed shapes and orders: the result does not depend on which slice arrives last.
    n_split = tl.load(ins + F_N_SPLIT)
    is_last = n_split == 1
    if n_split > 1:
        ws = ws_ptr + _aligned(ins, F_WS_OFF)
        split = tl.load(ins + F_SPLIT)
        tile = rows[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]                   # [BLOCK_M, BLOCK_N]
        tl.store(ws + split * (BLOCK_M * BLOCK_N) + tile, acc)
        moments = ws + n_split * (BLOCK_M * BLOCK_N)
        tl.store(moments + split * (2 * BLOCK_M) + rows, mean)
        tl.store(moments + split * (2 * BLOCK_M) + BLOCK_M + rows, m2)
        is_last = last_to_arrive(counters_ptr + tl.load(ins + F_SPLIT_CTR), n_split)
        if is_last:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s0 in range(0, n_split, SUM_SPLITS):
                s = s0 + tl.arange(0, SUM_SPLITS)                                          # [SUM_SPLITS]
                parts = tl.load(ws + s[:, None, None] * (BLOCK_M * BLOCK_N) + tile[None, :, :],
                                mask=(s < n_split)[:, None, None], other=0.0, cache_modifier=".cg")
                acc += tl.sum(parts, axis=0)
            s = tl.arange(0, MAX_SPLITS_K)
            has = (s < n_split)[:, None]
            n_s = tl.minimum(K - s * BLOCK_K, BLOCK_K).to(tl.float32)[:, None]             # [MAX_SPLITS_K, 1]
            mean_s = tl.load(moments + s[:, None] * (2 * BLOCK_M) + rows[None, :], mask=has, other=0.0,
                             cache_modifier=".cg")                                        # [MAX_SPLITS_K, BLOCK_M]
            m2_s = tl.load(moments + s[:, None] * (2 * BLOCK_M) + BLOCK_M + rows[None, :], mask=has, other=0.0,
                           cache_modifier=".cg")
            mean = tl.sum(tl.where(has, n_s * mean_s, 0.0), axis=0) / K
            gap = mean_s - mean[None, :]
            m2 = tl.sum(tl.where(has, m2_s + n_s * gap * gap, 0.0), axis=0)
    if is_last:
        # 4. Epilogue in fp32 (fused_linear's): LN correction, + b', GELU, + residual, one cast.
        if colsum_off >= 0:
            rstd = 1.0 / tl.sqrt(m2 / K + eps)                                               # [BLOCK_M]
            acc = rstd[:, None] * (acc - mean[:, None] * colsum[None, :])
        acc += bias[None, :]                                                               # 0 without a bias
        if tl.load(ins + F_GELU) != 0:
            acc = _gelu_tanh(acc)
        mask = m_mask[:, None] & n_mask[None, :]
        out_stride = _aligned(ins, F_OUT_STRIDE)
        res_off = tl.multiple_of(tl.load(ins + F_RES_OFF), 16)
        if res_off >= 0:
            acc += tl.load(act_ptr + res_off + rows[:, None] * out_stride + offs_n[None, :], mask=mask, other=0.0,
                           cache_modifier=".cg").to(tl.float32)
        y = acc.to(act_ptr.dtype.element_ty)
        tl.store(act_ptr + _aligned(ins, F_OUT_OFF) + rows[:, None] * out_stride + offs_n[None, :], y, mask=mask)
        kv_off = tl.multiple_of(tl.load(ins + F_KV_OFF), 16)
        if kv_off >= 0:
            # [q | k | v] columns, C = N / 3; slot s's K row is C contiguous elements at s * C of the pool
            C = N // 3
            slot = tl.load(slot_ptr + rows, mask=m_mask, other=-1)                         # [BLOCK_M]
            row_ok = mask & (slot >= 0)[:, None]
            dst = kv_ptr + kv_off + slot[:, None] * C + (offs_n - C)[None, :]            # [BLOCK_M, BLOCK_N]
            tl.store(dst, y, mask=row_ok & ((offs_n >= C) & (offs_n < 2 * C))[None, :])
            tl.store(dst + kv_v_offset - C, y, mask=row_ok & (offs_n >= 2 * C)[None, :])
        _publish(counters_ptr, ins)


@triton.jit
def _attn(ins, counters_ptr, act_ptr, ws_ptr, kv_ptr, block_tables_ptr, context_lens_ptr, M, stride_tb,
          kv_v_offset, qk_scale, HEAD_DIM: tl.constexpr, CACHE_BLOCK: tl.constexpr, KV_TILE: tl.constexpr,
          BLOCK_S: tl.constexpr):
    _wait(counters_ptr, ins)              # q and this step's K/V rows (the QKV stage)
    b = tl.load(ins + F_K0)
    h = tl.load(ins + F_N0)
    s = tl.load(ins + F_SPLIT)
    n_split = tl.load(ins + F_N_SPLIT)
    tiles_per_split = tl.load(ins + F_K)
    valid = b < M                          # rows past M (the bucket's padding) stay empty
    context_len = tl.load(context_lens_ptr + b, mask=valid, other=0)
    tile_hi = tl.minimum(s * tiles_per_split + tiles_per_split, tl.cdiv(context_len, KV_TILE))
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(act_ptr + _aligned(ins, F_X_OFF) + b * _aligned(ins, F_X_STRIDE) + h * HEAD_DIM + d,
                cache_modifier=".cg").to(tl.float32) * qk_scale                            # [HEAD_DIM], log2 domain
    table_row = block_tables_ptr + b * stride_tb
    last_block = tl.maximum(context_len - 1, 0) // CACHE_BLOCK
    kv_layer = kv_ptr + _aligned(ins, F_KV_OFF)
    num_heads = tl.load(ins + F_N) // HEAD_DIM
    # paged_attention's loop: row r of the tile keeps its own online softmax over tokens r, r + KV_TILE, ...
    m_i = tl.full([KV_TILE], -1e30, dtype=tl.float32)                                     # [KV_TILE]
    l_i = tl.zeros([KV_TILE], dtype=tl.float32)
    acc = tl.zeros([KV_TILE, HEAD_DIM], dtype=tl.float32)                                 # [KV_TILE, HEAD_DIM]
    n = s * tiles_per_split * KV_TILE + tl.arange(0, KV_TILE)                              # token positions
    for _tile in range(s * tiles_per_split, tile_hi):
        block = tl.load(table_row + tl.minimum(n // CACHE_BLOCK, last_block))             # [KV_TILE] block ids
        # cache [blocks, CACHE_BLOCK, H, D] contiguous: token slot t's head h at (t * H + h) * D
        kv_off = (block.to(tl.int64) * CACHE_BLOCK + n % CACHE_BLOCK) * num_heads + h
        kv_off = kv_off[:, None] * HEAD_DIM + d[None, :]
        k = tl.load(kv_layer + kv_off, cache_modifier=".cg")                               # [KV_TILE, HEAD_DIM]
        v = tl.load(kv_layer + kv_v_offset + kv_off, cache_modifier=".cg")
        ok = n < context_len
        scores = tl.where(ok, tl.sum(k.to(tl.float32) * q[None, :], axis=1), -float("inf"))
        m_new = tl.maximum(m_i, scores)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + tl.where(ok[:, None], p[:, None] * v.to(tl.float32), 0.0)
        m_i = m_new
        n += KV_TILE
    m_max = tl.max(m_i, axis=0)
    w = tl.exp2(m_i - m_max)
    l = tl.sum(w * l_i, axis=0)
    a = tl.sum(w[:, None] * acc, axis=0)                                                   # [HEAD_DIM]
    # chunk s's state at ws[ws_off + s * (HEAD_DIM + 2)]: a [HEAD_DIM], then m, then l
    part = ws_ptr + _aligned(ins, F_WS_OFF)
    tl.store(part + s * (HEAD_DIM + 2) + d, a)
    tl.store(part + s * (HEAD_DIM + 2) + HEAD_DIM, tl.where(l > 0, m_max, -1e30))     # empty chunk: weight 0
    tl.store(part + s * (HEAD_DIM + 2) + HEAD_DIM + 1, l)
    if last_to_arrive(counters_ptr + tl.load(ins + F_SPLIT_CTR), n_split):
        chunks = tl.arange(0, BLOCK_S)
        has = chunks < n_split
        m_s = tl.load(part + chunks * (HEAD_DIM + 2) + HEAD_DIM, mask=has, other=-1e30, cache_modifier=".cg")
        l_s = tl.load(part + chunks * (HEAD_DIM + 2) + HEAD_DIM + 1, mask=has, other=0.0, cache_modifier=".cg")
        a_s = tl.load(part + chunks[:, None] * (HEAD_DIM + 2) + d[None, :], mask=has[:, None], other=0.0,
                      cache_modifier=".cg")                                                # [BLOCK_S, HEAD_DIM]
        big = tl.max(m_s, axis=0)
        w_s = tl.exp2(m_s - big)
        # a row's chunk 0 holds its token 0, so the sum is >= 1; a padding row (all chunks empty) gives 0
        out = tl.sum(w_s[:, None] * a_s, axis=0) / tl.maximum(tl.sum(w_s * l_s, axis=0), 1e-30)
        out_ptr = act_ptr + _aligned(ins, F_OUT_OFF) + b * _aligned(ins, F_OUT_STRIDE) + h * HEAD_DIM + d
        tl.store(out_ptr, out.to(act_ptr.dtype.element_ty), mask=(b + 0 * d) < M)
        _publish(counters_ptr, ins)


@triton.jit
def _persistent_decode_kernel(
    instr_ptr, counters_ptr, w_ptr, p_ptr, act_ptr, ws_ptr, kv_ptr,
    idx_ptr, slot_ptr, block_tables_ptr, context_lens_ptr,
    stride_tb,
    n_instr, n_counters, M, kv_v_offset, eps, qk_scale,
    NF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HEAD_DIM: tl.constexpr, CACHE_BLOCK: tl.constexpr, KV_TILE: tl.constexpr, BLOCK_S: tl.constexpr,
    SUM_SPLITS: tl.constexpr, MAX_SPLITS_K: tl.constexpr,
):
    i = tl.atomic_add(counters_ptr + QUEUE, 1, sem="relaxed", scope="gpu")
    while i < n_instr:
        following = tl.atomic_add(counters_ptr + QUEUE, 1, sem="relaxed", scope="gpu")
        ins = instr_ptr + i.to(tl.int64) * NF
        op = tl.load(ins + F_OP)
        if op == OP_GEMV:
            _gemv(ins, counters_ptr, w_ptr, p_ptr, act_ptr, ws_ptr, kv_ptr, slot_ptr, M, kv_v_offset, eps,
                  BLOCK_M, BLOCK_N, BLOCK_K, SUM_SPLITS, MAX_SPLITS_K)
        elif op == OP_ATTN:
            _attn(ins, counters_ptr, act_ptr, ws_ptr, kv_ptr, block_tables_ptr, context_lens_ptr, M, stride_tb,
                  kv_v_offset, qk_scale, HEAD_DIM, CACHE_BLOCK, KV_TILE, BLOCK_S)
        else:
            _embed(ins, counters_ptr, w_ptr, act_ptr, idx_ptr, M, BLOCK_M, BLOCK_N)
        i = following
    # The last program to leave re-arms the queue and the stage counters for the next launch.
    if last_to_arrive(counters_ptr + EXIT, tl.num_programs(0)):
        offs = tl.arange(0, 1024)
        for c0 in range(0, n_counters, 1024):
            tl.store(counters_ptr + c0 + offs, 0, mask=c0 + offs < n_counters)


# ---- host side -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    """A built schedule: the instruction table and the sizes the launch needs (see the module docstring)."""
    instructions: torch.Tensor      # int64 [n, NUM_FIELDS], topological order
    num_counters: int               # counters[0..num_counters): queue, exit, stage and split counters
    workspace: int                  # fp32 elements of split-K / attention partials
    max_rows: int                   # rows the schedule covers (<= BLOCK_M)
    block_n: int
    block_k: int
    head_dim: int
    cache_block: int
    kv_tile: int
    max_chunks: int                 # attention chunks per (row, head): BLOCK_S = next_power_of_2


BLOCK_M = 16


def check_schedule(instructions: torch.Tensor, num_counters: int) -> None:
    """ValueError unless every instruction's wait is satisfied by publishes of instructions before
    it (topological order: the queue can never hand out an instruction that waits on a later one),
    and every counter index is in range."""
    table = instructions.tolist()
    done = [0] * num_counters
    for i, ins in enumerate(table):
        for name in ("wait_ctr", "done_ctr", "split_ctr"):
            if not FIRST_FREE_COUNTER <= ins[F[name]] < num_counters:
                raise ValueError(f"instructions[{i}].{name} = {ins[F[name]]} is outside counters "
                                 f"[{FIRST_FREE_COUNTER}, {num_counters})")
        if done[ins[F["wait_ctr"]]] < ins[F["wait_count"]]:
            raise ValueError(f"instructions[{i}] waits for counter {ins[F['wait_ctr']]} to reach "
                             f"{ins[F['wait_count']]}, but only {done[ins[F['wait_ctr']]]} publishes precede it: "
                             "the schedule is not in topological order")
        last_split = ins[F["op"]] == EMBED or ins[F["split"]] == ins[F["n_split"]] - 1
        done[ins[F["done_ctr"]]] += last_split   # one publish per output unit (its last split's turn)


def _launch_grid(device: torch.device, num_programs: int | None) -> int:
    if num_programs is not None:
        if num_programs < 1:
            raise ValueError(f"num_programs must be >= 1, got {num_programs}")
        return num_programs
    if device.type != "cuda":
        return 2
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def run_schedule(schedule: Schedule, counters: torch.Tensor, weights_base: torch.Tensor, params: torch.Tensor,
                 act: torch.Tensor, workspace: torch.Tensor, kv_cache: torch.Tensor, embed_indices: torch.Tensor,
                 slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor, *,
                 kv_v_offset: int, eps: float, sm_scale: float, num_programs: int | None = None) -> None:
    """Run the schedule once over M = len(context_lens) rows: one launch. Offsets in the table are
    elements from weights_base (weights), params (fp32 biases / colsums), act (activations, also
    the outputs), workspace (fp32 partials) and kv_cache (K pools; V = K + kv_v_offset). counters:
    int32 [schedule.num_counters] zeros, left zeroed by the launch."""
    M = context_lens.shape[0]
    if not 1 <= M <= schedule.max_rows:
        raise ValueError(f"context_lens has {M} rows; this schedule covers 1..{schedule.max_rows}")
    checks.int_tensor("counters", counters)
    if counters.numel() < schedule.num_counters:
        raise ValueError(f"counters has {counters.numel()} elements, the schedule needs {schedule.num_counters}")
    if workspace.numel() < schedule.workspace or workspace.dtype != torch.float32:
        raise ValueError(f"workspace must be fp32 with >= {schedule.workspace} elements")
    checks.same_dtype("act", act, "weights_base", weights_base.dtype)
    checks.same_dtype("kv_cache", kv_cache, "weights_base", weights_base.dtype)
    grid = _launch_grid(act.device, num_programs)
    tensors = (schedule.instructions, counters, weights_base, params, act, workspace, kv_cache,
               embed_indices, slot_mapping, block_tables, context_lens)
    ints = (block_tables.stride(0), schedule.instructions.shape[0], schedule.num_counters, M, kv_v_offset)
    constexprs = dict(NF=NUM_FIELDS, BLOCK_M=BLOCK_M, BLOCK_N=schedule.block_n, BLOCK_K=schedule.block_k,
                      HEAD_DIM=schedule.head_dim, CACHE_BLOCK=schedule.cache_block, KV_TILE=schedule.kv_tile,
                      BLOCK_S=triton.next_power_of_2(schedule.max_chunks), SUM_SPLITS=SUM_SPLITS,
                      MAX_SPLITS_K=MAX_SPLITS_K)
    # CUDA: the compiled kernel launched directly once known (kernels/launching.py); the key holds every
    # specialisation Triton derives: dtypes, pointer alignment, ints equal to 1 or divisible by 16.
    key = None
    if act.device.type == "cuda":
        key = ("persistent_decode", act.device, tuple(t.dtype for t in tensors), aligned(*tensors),
               tuple((v == 1, v % 16 == 0) for v in ints), tuple(constexprs.values()))
    try:
        launch(_persistent_decode_kernel, (grid, 1, 1), (*tensors, *ints, eps, sm_scale * 1.4426950408889634),
               constexprs, num_warps=NUM_WARPS, num_stages=1, key=key)
    except BaseException:
        counters.zero_()    # a partial launch leaves counters armed
        raise


def run_schedule_ref(schedule: Schedule, counters: torch.Tensor, weights_base: torch.Tensor, params: torch.Tensor,
                     act: torch.Tensor, workspace: torch.Tensor, kv_cache: torch.Tensor, embed_indices: torch.Tensor,
                     slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor, *,
                     kv_v_offset: int, eps: float, sm_scale: float, num_programs: int | None = None) -> None:
    """run_schedule in plain torch: the instructions one by one, in table order (same math, same
    reduction orders up to torch's own summation order inside a tile)."""
    M = context_lens.shape[0]
    flat_w, flat_a, flat_kv = (_flat(t) for t in (weights_base, act, kv_cache))
    partials: dict[int, list] = {}
    for ins in schedule.instructions.tolist():
        f = dict(zip(FIELDS, ins))
        if f["op"] == EMBED:
            cols = slice(f["n0"], min(f["n0"] + schedule.block_n, f["n"]))
            table = flat_w[f["w_off"]:]
            idx = embed_indices[:2 * M].view(M, 2)
            e = sum(table[idx[:, j, None] * f["w_stride"] + torch.arange(cols.start, cols.stop)].float() for j in (0, 1))
            _view(flat_a, f["out_off"], M, f["out_stride"])[:, cols] = e.to(act.dtype)
        elif f["op"] == GEMV:
            k = slice(f["k0"], min(f["k0"] + schedule.block_k, f["k"]))
            cols = slice(f["n0"], min(f["n0"] + schedule.block_n, f["n"]))
            tile = flat_w[f["w_off"]:f["w_off"] + schedule.block_k * schedule.block_n].view(schedule.block_k, -1)
            x = _view(flat_a, f["x_off"], M, f["x_stride"])[:, :f["k"]]
            partials.setdefault(f["split_ctr"], []).append(
                x[:, k].float() @ tile[:k.stop - k.start, :cols.stop - cols.start].float())
            if f["split"] != f["n_split"] - 1:
                continue
            acc = sum(partials.pop(f["split_ctr"]))
            if f["colsum_off"] >= 0:
                xf = x.float()
                mean = xf.mean(1, keepdim=True)
                rstd = ((xf - mean).pow(2).mean(1, keepdim=True) + eps).rsqrt()
                acc = rstd * (acc - mean * params[f["colsum_off"]:][cols])
            if f["bias_off"] >= 0:
                acc = acc + params[f["bias_off"]:][cols]
            if f["gelu"]:
                acc = gelu_tanh(acc)
            out = _view(flat_a, f["out_off"], M, f["out_stride"])
            if f["res_off"] >= 0:
                acc = acc + _view(flat_a, f["res_off"], M, f["out_stride"])[:, cols].float()
            out[:, cols] = acc.to(act.dtype)
            if f["kv_off"] >= 0:
                _write_kv_ref(flat_kv, f, cols, out[:, cols], slot_mapping[:M], kv_v_offset)
        elif f["split"] == f["n_split"] - 1:       # ATTN: the whole (row, head) at its last chunk
            _attn_ref(f, schedule, flat_a, flat_kv, block_tables, context_lens, M, kv_v_offset, sm_scale)
    counters.zero_()


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1)      # arenas and the KV cache are contiguous; offsets count from their first element


def _view(flat: torch.Tensor, off: int, rows: int, stride: int) -> torch.Tensor:
    return torch.as_strided(flat, (rows, stride), (stride, 1), off)


def _write_kv_ref(flat_kv, f, cols, y, slots, kv_v_offset):
    """[q | k | v] columns of y (rows with slot >= 0) into the layer's K / V pools, slot s at s * C."""
    C = f["n"] // 3
    c = torch.arange(cols.start, cols.stop)
    is_v = c >= 2 * C
    dst = f["kv_off"] + torch.where(is_v, kv_v_offset + c - 2 * C, c - C)[None, :] + slots[:, None] * C
    keep = (c >= C)[None, :] & (slots >= 0)[:, None]
    flat_kv[dst[keep]] = y[keep]


def _attn_ref(f, schedule, flat_a, flat_kv, block_tables, context_lens, M, kv_v_offset, sm_scale):
    b, h, D = f["k0"], f["n0"], schedule.head_dim
    if b >= M:
        return
    H = f["n"] // D
    L = int(context_lens[b])
    pos = torch.arange(L)
    slots = block_tables[b, pos // schedule.cache_block].long() * schedule.cache_block + pos % schedule.cache_block
    rows = (slots * H + h)[:, None] * D + torch.arange(D)
    k, v = flat_kv[f["kv_off"] + rows].float(), flat_kv[f["kv_off"] + kv_v_offset + rows].float()
    q = flat_a[f["x_off"] + b * f["x_stride"] + h * D + torch.arange(D)].float()
    out = torch.softmax(k @ q * sm_scale, 0) @ v
    flat_a[f["out_off"] + b * f["out_stride"] + h * D + torch.arange(D)] = out.to(flat_a.dtype)


# ---- ahead-of-time configurations ------------------------------------------------------------------

def aot_kernels():
    """The configurations the engine builds: fp16 / bf16 with 128 x 64 weight tiles, fp32 with 64 x 64;
    head_dim 64, cache block 16 (KV tile 64), up to 16 attention chunks per (row, head)."""
    from gpt2_engine.kernels.compile_report import AotKernel

    specs = []
    for dtype, block_k in (("fp16", 128), ("bf16", 128), ("fp32", 64)):
        ptr = f"*{dtype}"
        specs.append(AotKernel(
            label=f"persistent_decode_{dtype}_16x64x{block_k}_d64",
            fn=_persistent_decode_kernel,
            signature={"instr_ptr": "*i64", "counters_ptr": "*i32", "w_ptr": ptr, "p_ptr": "*fp32", "act_ptr": ptr,
                       "ws_ptr": "*fp32", "kv_ptr": ptr, "idx_ptr": "*i64", "slot_ptr": "*i64",
                       "block_tables_ptr": "*i32", "context_lens_ptr": "*i32", "stride_tb": "i32", "n_instr": "i32",
                       "n_counters": "i32", "M": "i32", "kv_v_offset": "i64", "eps": "fp32", "qk_scale": "fp32"},
            constexprs={"NF": NUM_FIELDS, "BLOCK_M": BLOCK_M, "BLOCK_N": 64, "BLOCK_K": block_k, "HEAD_DIM": 64,
                        "CACHE_BLOCK": 16, "KV_TILE": 64, "BLOCK_S": 16, "SUM_SPLITS": SUM_SPLITS,
                        "MAX_SPLITS_K": MAX_SPLITS_K},
            num_warps=NUM_WARPS, num_stages=1,
            aligned=("instr_ptr", "counters_ptr", "w_ptr", "p_ptr", "act_ptr", "ws_ptr", "kv_ptr", "idx_ptr",
                     "slot_ptr", "block_tables_ptr", "context_lens_ptr"),
            loads_before_wait=True, tensor_cores=dtype != "fp32",
        ))
    return specs
