"""Paged KV cache: KV write and split-K paged decode attention.

(Triton kernels and launchers: in progress.) The references below fix the contract.

Cache layout: k_cache, v_cache `[num_blocks, block_size, H, D]`; token slot s lives at
block s // block_size, offset s % block_size. block_tables int32 `[B, max_blocks]` lists each
sequence's blocks in order; context_lens int32 `[B]` counts its cached tokens (>= 1, including
the current one, whose K/V are already written).
"""
from __future__ import annotations

import math

import torch


def write_kv(k, v, k_cache, v_cache, slot_mapping):
    raise NotImplementedError("Triton write_kv launcher: in progress")


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, *, sm_scale=None, num_splits=None):
    raise NotImplementedError("Triton paged_decode_attention launcher: in progress")


def write_kv_ref(k, v, k_cache, v_cache, slot_mapping):
    """Scatter k, v `[T, H, D]` into the caches at slot_mapping `[T]`; negative slots are skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep]


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, *, sm_scale=None, num_splits=None):
    """One query per sequence over its paged context (gather, mask, softmax; computes in q's dtype)."""
    batch, _, head_dim = q.shape
    block_size = k_cache.shape[1]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
    num_used_blocks = -(-int(context_lens.max()) // block_size)
    tables = block_tables[:, :num_used_blocks].clamp(min=0).long()          # [B, nb] (unused entries may be -1)
    keys = k_cache[tables].flatten(1, 2)                                     # [B, nb*bs, H, D]
    values = v_cache[tables].flatten(1, 2)
    scores = torch.einsum("bhd,bthd->bht", q, keys) * scale                  # [B, H, nb*bs]
    positions = torch.arange(keys.shape[1], device=q.device)
    scores = scores.masked_fill(positions[None, None, :] >= context_lens[:, None, None], float("-inf"))
    return torch.einsum("bht,bthd->bhd", scores.softmax(-1), values)


def aot_kernels():
    return []
