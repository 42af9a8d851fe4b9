"""Batch-invariant mode: a request's logits do not depend on what else is in the step.

A row's numbers change with the batch only where a reduction's order depends on the batch. In this
mode none does (`batch_invariant_model` returns the model with these ops; the ModelRunner also
packs every row, decode tokens included, as a varlen prefill row whose keys are read back from the
cache, so one attention path serves prefill chunks and decode steps alike):

* GEMMs (every Linear of gpt2_engine.linear, the LM head included) run row-blocked: the rows are cut
  into blocks of ROW_BLOCK (the last one zero-padded), one call per block. Every row is then
  computed by a call of the same shape M = ROW_BLOCK, whatever the step's token count: on CPU
  oneDNN/MKL pick their kernel (and MKL its reduction order: measured, a row differs by up to
  8e-6 between M <= 3 and M >= 4) by M, and the Triton GEMM picks its tile and split-K by M; at a
  fixed shape, a row's result does not depend on its position in the block or on the other rows
  (tests/engine/test_batch_invariance.py checks this for the CPU paths). Padded rows write no K/V
  (slot -1).
* Attention, torch backend: each query row is one SDPA call over exactly its own keys (positions
  0 .. p of its sequence), with no mask. PyTorch's CPU SDPA changes a row's result with the batch
  size and with masked padding keys (measured up to 1.2e-7 per call, 1.4e-6 on the logits), so
  rows are not batched. Triton backend: the flash-attention kernel, every row as a varlen row with
  cu_seqlens_k; each query row's online softmax walks its keys in BLOCK_N tiles from key 0 (tiles
  past the row are fully masked and leave its state unchanged), and tl.dot computes a row of a
  tile independently of the tile's other rows.

Costs: padding to ROW_BLOCK rows, one GEMM launch per block, a per-row attention call (torch) or
a key gather per layer (triton), no decode CUDA graphs.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.nn.functional as F

ROW_BLOCK = 16


def row_blocked(op):
    """op(x [M, K], ..., residual=[M, N] | None, kv_cache=(k, v, slots [M]) | None) computed in
    fixed blocks of ROW_BLOCK rows."""
    def blocked(x, *args, residual=None, kv_cache=None, **kwargs):
        num_rows = x.shape[0]
        pad = -num_rows % ROW_BLOCK
        x = F.pad(x, (0, 0, 0, pad))
        residual = F.pad(residual, (0, 0, 0, pad)) if residual is not None else None
        slots = F.pad(kv_cache[2], (0, pad), value=-1) if kv_cache is not None else None   # padded rows write nothing

        def block(rows: slice):
            extra = {} if residual is None else {"residual": residual[rows]}
            if kv_cache is not None:
                extra["kv_cache"] = (kv_cache[0], kv_cache[1], slots[rows])
            return op(x[rows], *args, **extra, **kwargs)
        if num_rows == 0:        # e.g. the LM head of a step in which nothing samples
            return block(slice(0, 0))
        return torch.cat([block(slice(start, start + ROW_BLOCK)) for start in range(0, num_rows + pad, ROW_BLOCK)])[:num_rows]
    return blocked


def rowwise_attention(q, k, v, cu_seqlens=None, *, sm_scale=None, cu_seqlens_k=None, out=None):
    """Causal varlen attention (flash_attention_ref's contract, bottom-right aligned) with one SDPA
    call per query row over exactly the keys it sees."""
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    starts_q = cu_seqlens.tolist()
    starts_k = cu_seqlens_k.tolist() if cu_seqlens_k is not None else starts_q
    result = torch.empty_like(q) if out is None else out
    for i in range(len(starts_q) - 1):
        q0, q1, k0, k1 = starts_q[i], starts_q[i + 1], starts_k[i], starts_k[i + 1]
        offset = (k1 - k0) - (q1 - q0)          # query row r is at position offset + r
        for r in range(q1 - q0):
            visible = k0 + offset + r + 1
            # [1, H, 1, D] over [1, H, Lk, D]
            qi = q[q0 + r][None, :, None, :]
            ki, vi = (t[k0:visible].transpose(0, 1)[None] for t in (k, v))
            result[q0 + r] = F.scaled_dot_product_attention(qi, ki, vi, scale=scale)[0, :, 0]
    return result


def batch_invariant_model(model):
    """A shallow copy of a PagedGPT2 (weights shared) running the batch-invariant ops."""
    def blocked(linear):
        return dataclasses.replace(linear, gemm=row_blocked(linear.gemm))

    invariant = copy.copy(model)
    invariant.h = [dataclasses.replace(blk, **{f.name: blocked(getattr(blk, f.name)) for f in dataclasses.fields(blk)})
                   for blk in model.h]
    invariant.lm_head = blocked(model.lm_head)
    if model.backend == "torch":
        invariant.attention_ops = dataclasses.replace(model.attention_ops, flash_attention=rowwise_attention)
    return invariant
