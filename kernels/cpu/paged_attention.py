"""Paged decode attention read in place from the K/V pools, and the K/V write (paged_attention.cpp),
fp32 on the CPU. `lib` is a kernels.cpu.library() build.

paged_decode_attention: kernels.paged_decode_attention's contract (num_splits is the GPU kernel's and is
ignored here): q [B, H, D] (D contiguous), k_cache / v_cache [num_blocks, block_size, H, D] contiguous,
block_tables int32 [B, W], context_lens int32 [B]; returns (or fills `out`) [B, H, D].
write_kv: kernels.write_kv's contract: k, v [T, H, D] (D contiguous) into the pools at slot_mapping [T],
negative slots skipped.
"""
from __future__ import annotations

import ctypes
import math

import torch


def check_cpu_tensor(name: str, t: torch.Tensor, dtype: torch.dtype, dims: int) -> None:
    if t.dtype != dtype or t.device.type != "cpu" or t.dim() != dims:
        raise ValueError(f"{name} must be a {dims}-D {dtype} CPU tensor, got {t.dim()}-D {t.dtype} on {t.device}")


def check_caches(k_cache, v_cache, heads: int, head_dim: int) -> None:
    check_cpu_tensor("k_cache", k_cache, torch.float32, 4)
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype or k_cache.shape[2:] != (heads, head_dim):
        raise ValueError(f"k_cache and v_cache must both be float32 [num_blocks, block_size, {heads}, {head_dim}], "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")


def write_kv(k, v, k_cache, v_cache, slot_mapping, *, lib: ctypes.CDLL) -> None:
    check_cpu_tensor("k", k, torch.float32, 3)
    check_cpu_tensor("v", v, torch.float32, 3)
    check_cpu_tensor("slot_mapping", slot_mapping, torch.int64, 1)
    tokens, heads, head_dim = k.shape
    if v.shape != k.shape or slot_mapping.shape != (tokens,) or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError(f"k, v must be [T, H, D] with D contiguous and slot_mapping [T], got {tuple(k.shape)}, "
                         f"{tuple(v.shape)} and {tuple(slot_mapping.shape)}")
    check_caches(k_cache, v_cache, heads, head_dim)
    slots = slot_mapping.contiguous()
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    bad = lib.paged_write_kv_f32(k.data_ptr(), k.stride(0), k.stride(1), v.data_ptr(), v.stride(0), v.stride(1),
                                 k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(), tokens, num_slots, heads,
                                 head_dim)
    if bad:
        raise ValueError(f"slot_mapping[{bad - 1}] = {int(slots[bad - 1])} is past the cache's {num_slots} slots")


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, *, sm_scale=None, num_splits=None,
                           out=None, lib: ctypes.CDLL):
    check_cpu_tensor("q", q, torch.float32, 3)
    check_cpu_tensor("block_tables", block_tables, torch.int32, 2)
    check_cpu_tensor("context_lens", context_lens, torch.int32, 1)
    batch, heads, head_dim = q.shape
    if q.stride(2) != 1:
        raise ValueError("q's last dimension must be contiguous")
    check_caches(k_cache, v_cache, heads, head_dim)
    if block_tables.shape[0] != batch or context_lens.shape != (batch,):
        raise ValueError(f"block_tables and context_lens must have {batch} rows (one per query), got "
                         f"{tuple(block_tables.shape)} and {tuple(context_lens.shape)}")
    if out is None:
        out = torch.empty(batch, heads, head_dim, dtype=torch.float32)
    elif out.shape != q.shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of shape {tuple(q.shape)}")
    tables, lens = block_tables.contiguous(), context_lens.contiguous()
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
    bad = lib.paged_decode_attention_f32(q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(),
                                         k_cache.shape[0], k_cache.shape[1], heads, tables.data_ptr(), tables.shape[1],
                                         lens.data_ptr(), batch, scale, out.data_ptr(), head_dim, torch.get_num_threads())
    if bad:
        raise ValueError(f"sequence {bad - 1}: context length {int(lens[bad - 1])} or its block table entries are out "
                         f"of range ({tables.shape[1]} table entries of {k_cache.shape[1]} slots, "
                         f"{k_cache.shape[0]} blocks)")
    return out
