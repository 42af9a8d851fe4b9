"""The K/V cache tensors (the model runner owns them; gpt2_engine.block_manager does the bookkeeping):
the pools' size from a memory budget, their allocation, and the copy-on-write block copies.

Layout: one tensor [n_layer, 2 (K, V), num_blocks, block_size, n_head, head_dim]; kv[i, 0] and
kv[i, 1] are layer i's K and V pools, and a sequence's token at position p lives in row
table[p // block_size], offset p % block_size, of each (BlockManager.slot).
"""
from __future__ import annotations

import math

import torch

from gpt2_engine.config import GPT2Config
from gpt2_engine.kernels.cpu.stream_gemm import huge_page_empty

CPU_KV_BUDGET_BYTES = 1 << 30       # the pool on CPU: 1 GiB
CUDA_KV_FREE_FRACTION = 0.45        # the pool on CUDA: this share of the memory free after the weights


def kv_block_bytes(config: GPT2Config, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block across all layers, K and V."""
    return 2 * config.n_layer * block_size * config.n_embd * torch.tensor([], dtype=dtype).element_size()


def num_kv_blocks(config: GPT2Config, block_size: int, dtype: torch.dtype, device: torch.device, max_num_seqs: int,
                  budget_bytes: int | None = None) -> int:
    """Pool size from a memory budget (default: 45% of free CUDA memory, or 1 GiB on CPU), capped at
    what max_num_seqs full-length sequences could ever use."""
    if budget_bytes is None:
        if device.type == "cuda":
            budget_bytes = int(torch.cuda.mem_get_info(device)[0] * CUDA_KV_FREE_FRACTION)
        else:
            budget_bytes = CPU_KV_BUDGET_BYTES
    cap = max_num_seqs * math.ceil(config.n_positions / block_size)
    return max(1, min(budget_bytes // kv_block_bytes(config, block_size, dtype), cap))


def allocate_kv_cache(config: GPT2Config, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device) -> torch.Tensor:
    """All layers' pools in one tensor [n_layer, 2 (K, V), num_blocks, block_size, n_head, head_dim];
    kv[i, 0] and kv[i, 1] are layer i's K and V pools. On CPU in transparent huge pages where the OS
    grants them: decode attention reads a block's rows front to back, and over 4 KiB pages the hardware
    prefetcher stops at every page (a GPT-2-small batch-1 step's attention took ~60 us a layer instead of
    100-150 on a 2-vCPU Xeon VM)."""
    shape = (config.n_layer, 2, num_blocks, block_size, config.n_head, config.head_dim)
    if torch.device(device).type == "cpu":
        return huge_page_empty(shape, dtype).zero_()
    return torch.zeros(shape, dtype=dtype, device=device)


def copy_blocks(kv_cache: torch.Tensor, copies: list[tuple[int, int]]) -> None:
    """Apply copy-on-write copies to every layer's K and V pool (one indexed copy)."""
    if copies:
        src, dst = (torch.tensor(ids, device=kv_cache.device) for ids in zip(*copies))
        kv_cache[:, :, dst] = kv_cache[:, :, src]
