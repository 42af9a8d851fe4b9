"""Paged KV cache bookkeeping: fixed-size blocks, a free list with reference counts, per-sequence
block tables, copy-on-write forks and automatic prefix caching (the K/V tensors themselves:
gpt2_engine.kv_cache, owned by the model runner).

A sequence's token at position p lives in slot table[p // block_size] * block_size + p % block_size
of every layer's pool `[num_blocks, block_size, n_head, head_dim]`. Blocks are shared between
sequences only by `fork` (num_return_sequences) and `reorder` (beam search); a shared block is read-only, and the sequence about
to write into it first gets a private copy (`append` returns the (src, dst) pairs that the engine
copies in every layer's K and V pool before the step writes). Running out of blocks is a normal
condition: the scheduler asks `can_allocate` / `can_append` first, and `allocate` / `append` are only
called when the answer was yes.

With prefix caching (gpt2_engine.prefix_cache), `allocate(seq_id, n, token_ids)` starts the table with
the cached blocks of the longest cached prefix and returns how many tokens they hold; the scheduler
reports computed tokens (`mark_computed`) so full blocks get indexed. A freed block keeps its
content and key in the free list, which hands out the least recently freed block first: cached
blocks are evicted LRU, only when the pool needs them.
"""
from __future__ import annotations

from collections import OrderedDict

from gpt2_engine.prefix_cache import PrefixCache



class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16, *, enable_prefix_caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        # unreferenced blocks, least recently freed first (with prefix caching they may hold cached content)
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.block_tables: dict[int, list[int]] = {}
        self.num_tokens: dict[int, int] = {}     # tokens that have a slot, per sequence
        self.prefix_cache = PrefixCache(block_size) if enable_prefix_caching else None

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def slot(self, seq_id: int, position: int) -> int:
        return self.block_tables[seq_id][position // self.block_size] * self.block_size + position % self.block_size

    def _take(self) -> int:
        block, _ = self.free_blocks.popitem(last=False)
        if self.prefix_cache is not None:
            self.prefix_cache.evict(block)
        self.ref_counts[block] = 1
        return block

    def _share(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_blocks[block]
        self.ref_counts[block] += 1

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free_blocks[block] = None

    def _cached_prefix(self, token_ids: list[int] | None) -> list[int]:
        if self.prefix_cache is None or token_ids is None:
            return []
        return self.prefix_cache.match(token_ids)[0]

    def can_allocate(self, num_tokens: int, token_ids: list[int] | None = None) -> bool:
        return self.can_allocate_all([num_tokens], [token_ids])

    def can_allocate_all(self, lengths: list[int], token_lists: list[list[int] | None] | None = None) -> bool:
        """Whether new sequences of these lengths (and tokens, for the prefix cache) all fit: a beam
        group is admitted at once. A cached block in use costs nothing; one in the free list costs
        the block it is (counted per sequence: an upper bound when several share it)."""
        token_lists = token_lists or [None] * len(lengths)
        needed = sum(self.blocks_for(n) - sum(self.ref_counts[b] > 0 for b in self._cached_prefix(tokens))
                     for n, tokens in zip(lengths, token_lists))
        return needed <= self.num_free_blocks

    def allocate(self, seq_id: int, num_tokens: int, token_ids: list[int] | None = None, *, reuse: bool = True) -> int:
        """Blocks for positions 0 .. num_tokens-1 of a new sequence: with prefix caching and its
        token_ids, the cached blocks of its longest cached prefix (unless reuse=False: its full blocks
        are still indexed once computed), then private ones. Returns the number of tokens whose K/V
        are already in the cache."""
        assert seq_id not in self.block_tables and self.can_allocate(num_tokens, token_ids if reuse else None)
        cached, hashes = [], []
        if self.prefix_cache is not None and token_ids is not None:
            if reuse:
                cached, hashes = self.prefix_cache.lookup(token_ids)
            self.prefix_cache.start(seq_id, hashes)
        for block in cached:
            self._share(block)
        self.block_tables[seq_id] = cached + [self._take() for _ in range(self.blocks_for(num_tokens) - len(cached))]
        self.num_tokens[seq_id] = num_tokens
        return len(cached) * self.block_size

    def mark_computed(self, seq_id: int, token_ids: list[int], num_computed: int) -> None:
        """The sequence's first num_computed tokens have K/V in the cache: index its full blocks."""
        if self.prefix_cache is not None:
            self.prefix_cache.register(seq_id, self.block_tables[seq_id], token_ids, num_computed)

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

    def truncate(self, seq_id: int, num_tokens: int) -> None:
        """Keep slots for the first num_tokens tokens only (speculative decoding gives back the slots
        of rejected drafts); blocks left empty go back to the pool. Only slots past the sequence's
        computed tokens are dropped, so no block indexed by the prefix cache is released here."""
        assert num_tokens <= self.num_tokens[seq_id]
        table = self.block_tables[seq_id]
        for block in table[self.blocks_for(num_tokens):]:
            self._release(block)
        del table[self.blocks_for(num_tokens):]
        self.num_tokens[seq_id] = num_tokens

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares all of the parent's blocks (each block's refcount + 1)."""
        assert child_id not in self.block_tables
        self.block_tables[child_id] = list(self.block_tables[parent_id])
        self.num_tokens[child_id] = self.num_tokens[parent_id]
        for block in self.block_tables[child_id]:
            self.ref_counts[block] += 1
        if self.prefix_cache is not None:
            self.prefix_cache.copy(parent_id, child_id)

    def reorder(self, seq_ids: list[int], parent_ids: list[int]) -> None:
        """Beam search's step: sequence seq_ids[j] now holds the blocks of parent_ids[j] (as a fork;
        seq_ids[j] may have had blocks, or none yet). References are taken before any are released,
        so a block kept by some beam is never freed; no block is taken."""
        tables = [list(self.block_tables[p]) for p in parent_ids]
        counts = [self.num_tokens[p] for p in parent_ids]
        cache = self.prefix_cache
        hashes = [list(cache.seq_hashes[p]) for p in parent_ids] if cache is not None else None
        for table in tables:
            for block in table:
                self.ref_counts[block] += 1
        for seq_id in seq_ids:
            if seq_id in self.block_tables:
                self.free(seq_id)
        for j, (seq_id, table, count) in enumerate(zip(seq_ids, tables, counts)):
            self.block_tables[seq_id], self.num_tokens[seq_id] = table, count
            if cache is not None:
                cache.start(seq_id, hashes[j])

    def free(self, seq_id: int) -> None:
        for block in self.block_tables.pop(seq_id):
            self._release(block)
        del self.num_tokens[seq_id]
        if self.prefix_cache is not None:
            self.prefix_cache.forget(seq_id)
