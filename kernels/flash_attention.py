"""Causal flash-attention forward for prefill.

(Triton kernel and launcher: in progress.) The reference below fixes the contract.

Layouts: q, k, v are `[T, H, D]` packed over a variable-length batch whose sequence i occupies
rows cu_seqlens[i]:cu_seqlens[i+1], or `[B, S, H, D]` when cu_seqlens is None. With
`cu_seqlens_k` (chunked prefill: a query chunk attending to its cached prefix plus itself) the
keys of sequence i are rows cu_seqlens_k[i]:cu_seqlens_k[i+1] of k/v, at least as many as its
queries, and the causal mask is aligned bottom-right: query r of a sequence with Lq queries and
Lk keys sees keys c <= r + (Lk - Lq).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def flash_attention(q, k, v, cu_seqlens=None, *, sm_scale=None, cu_seqlens_k=None):
    raise NotImplementedError("Triton flash_attention launcher: in progress")


def flash_attention_ref(q, k, v, cu_seqlens=None, *, sm_scale=None, cu_seqlens_k=None):
    """Plain-torch causal attention with the launcher's signature (computes in q's dtype)."""
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens is None:
        # [B, S, H, D] -> [B, H, S, D] for SDPA and back.
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale)
        return out.transpose(1, 2)
    starts_q = cu_seqlens.tolist()
    starts_k = cu_seqlens_k.tolist() if cu_seqlens_k is not None else starts_q
    out = torch.empty_like(q)
    for i in range(len(starts_q) - 1):
        q0, q1, k0, k1 = starts_q[i], starts_q[i + 1], starts_k[i], starts_k[i + 1]
        if q1 == q0:
            continue
        qi, ki, vi = (t.transpose(0, 1) for t in (q[q0:q1], k[k0:k1], v[k0:k1]))  # [H, L, D]
        # bottom-right causal mask: query r sees keys c <= r + (Lk - Lq)
        rows = torch.arange(q1 - q0, device=q.device)[:, None]
        cols = torch.arange(k1 - k0, device=q.device)[None, :]
        mask = cols <= rows + ((k1 - k0) - (q1 - q0))
        out[q0:q1] = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale).transpose(0, 1)
    return out


def aot_kernels():
    return []
