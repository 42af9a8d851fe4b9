"""Paged KV cache bookkeeping: fixed-size blocks, a free list with reference counts, per-sequence
block tables, copy-on-write forks, and the sizing of the per-layer K/V pools.

A sequence's token at position p lives in slot table[p // block_size] * block_size + p % block_size
of every layer's pool `[num_blocks, block_size, n_head, head_dim]`. Blocks are shared between
sequences only by `fork` (num_return_sequences) and `reorder` (beam search); a shared block is read-only, and the sequence about
to write into it first gets a private copy (`append` returns the (src, dst) pairs that the engine
copies in every layer's K and V pool before the step writes). Running out of blocks is a normal
condition: the scheduler asks `can_allocate` / `can_append` first, and `allocate` / `append` are only
called when the answer was yes.
"""
from __future__ import annotations

import math
from collections import deque

import torch

from engine.config import GPT2Config

CPU_KV_BUDGET_BYTES = 1 << 30       # the pool on CPU: 1 GiB
CUDA_KV_FREE_FRACTION = 0.45        # the pool on CUDA: this share of the memory free after the weights


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.block_tables: dict[int, list[int]] = {}
        self.num_tokens: dict[int, int] = {}     # tokens that have a slot, per sequence

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def slot(self, seq_id: int, position: int) -> int:
        return self.block_tables[seq_id][position // self.block_size] * self.block_size + position % self.block_size

    def _take(self) -> int:
        block = self.free_blocks.popleft()
        self.ref_counts[block] = 1
        return block

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free_blocks.append(block)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.can_allocate_all([num_tokens])

    def can_allocate_all(self, lengths: list[int]) -> bool:
        """Whether new sequences of these lengths all fit (a beam group is admitted at once)."""
        return sum(map(self.blocks_for, lengths)) <= self.num_free_blocks

    def allocate(self, seq_id: int, num_tokens: int) -> None:
        """Private blocks for positions 0 .. num_tokens-1 of a new sequence."""
        assert seq_id not in self.block_tables and self.can_allocate(num_tokens)
        self.block_tables[seq_id] = [self._take() for _ in range(self.blocks_for(num_tokens))]
        self.num_tokens[seq_id] = num_tokens

    def _append_needs(self, seq_id: int) -> int:
        """Blocks one more token needs: a fresh block at a block boundary, or a private copy of a
        shared, partly filled last block (copy-on-write)."""
        if self.num_tokens[seq_id] % self.block_size == 0:
            return 1
        return int(self.ref_counts[self.block_tables[seq_id][-1]] > 1)

    def can_append(self, seq_id: int) -> bool:
        return self.can_append_all([seq_id])

    def can_append_all(self, seq_ids: list[int]) -> bool:
        """Whether these sequences can all take one more token (an upper bound: beams sharing a last
        block each count a copy, though the last of them to write needs none)."""
        return sum(map(self._append_needs, seq_ids)) <= self.num_free_blocks

    def append(self, seq_id: int) -> list[tuple[int, int]]:
        """A slot for one more token; returns the (src, dst) block copies to apply before writing."""
        assert self.can_append(seq_id)
        table, copies = self.block_tables[seq_id], []
        if self.num_tokens[seq_id] % self.block_size == 0:
            table.append(self._take())
        elif self.ref_counts[table[-1]] > 1:
            shared = table[-1]
            table[-1] = self._take()
            self._release(shared)
            copies.append((shared, table[-1]))
        self.num_tokens[seq_id] += 1
        return copies

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares all of the parent's blocks (each block's refcount + 1)."""
        assert child_id not in self.block_tables
        self.block_tables[child_id] = list(self.block_tables[parent_id])
        self.num_tokens[child_id] = self.num_tokens[parent_id]
        for block in self.block_tables[child_id]:
            self.ref_counts[block] += 1

    def reorder(self, seq_ids: list[int], parent_ids: list[int]) -> None:
        """Beam search's step: sequence seq_ids[j] now holds the blocks of parent_ids[j] (as a fork;
        seq_ids[j] may have had blocks, or none yet). References are taken before any are released,
        so a block kept by some beam is never freed; no block is taken."""
        tables = [list(self.block_tables[p]) for p in parent_ids]
        counts = [self.num_tokens[p] for p in parent_ids]
        for table in tables:
            for block in table:
                self.ref_counts[block] += 1
        for seq_id in seq_ids:
            if seq_id in self.block_tables:
                self.free(seq_id)
        for seq_id, table, count in zip(seq_ids, tables, counts):
            self.block_tables[seq_id], self.num_tokens[seq_id] = table, count

    def free(self, seq_id: int) -> None:
        for block in self.block_tables.pop(seq_id):
            self._release(block)
        del self.num_tokens[seq_id]


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
    kv[i, 0] and kv[i, 1] are layer i's K and V pools."""
    shape = (config.n_layer, 2, num_blocks, block_size, config.n_head, config.head_dim)
    return torch.zeros(shape, dtype=dtype, device=device)


def copy_blocks(kv_cache: torch.Tensor, copies: list[tuple[int, int]]) -> None:
    """Apply copy-on-write copies to every layer's K and V pool (one indexed copy)."""
    if copies:
        src, dst = (torch.tensor(ids, device=kv_cache.device) for ids in zip(*copies))
        kv_cache[:, :, dst] = kv_cache[:, :, src]
