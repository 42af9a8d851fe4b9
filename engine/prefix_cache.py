"""Automatic prefix caching: full KV blocks indexed by their content.

Block i of a sequence holds the K/V of tokens [i * B, (i + 1) * B) (B = block_size); its K/V depend
on those tokens and on every token before them. Its key is (hash of block i - 1's key, the block's
B token ids), so equal keys mean equal prefixes (a Python dict compares the keys themselves; only
the parent's 64-bit hash stands for the earlier blocks). A block is registered once all of its
tokens' K/V are computed; a new sequence then reuses the cached blocks of its longest cached
prefix (shared, reference counted, never written: writes go past them) and computes the rest. The
block manager keeps a freed block's key until it hands the block out again (LRU eviction).

Counters (in tokens): `queries` sums the lengths looked up, `hits` the tokens found cached.
"""
from __future__ import annotations


class PrefixCache:
    def __init__(self, block_size: int):
        self.block_size = block_size
        self.blocks: dict[tuple, int] = {}      # key -> block holding that content
        self.keys: dict[int, tuple] = {}        # block -> its key (registered blocks only)
        self.seq_hashes: dict[int, list[int]] = {}   # per sequence: hashes of its computed full blocks
        self.queries = 0
        self.hits = 0

    def _key(self, hashes: list[int], token_ids: list[int], index: int) -> tuple:
        start = index * self.block_size
        return (hashes[index - 1] if index else None, tuple(token_ids[start:start + self.block_size]))

    def lookup(self, token_ids: list[int]) -> tuple[list[int], list[int]]:
        """match(), counted in the query and hit counters (a sequence being allocated)."""
        blocks, hashes = self.match(token_ids)
        self.queries += len(token_ids)
        self.hits += len(blocks) * self.block_size
        return blocks, hashes

    def match(self, token_ids: list[int]) -> tuple[list[int], list[int]]:
        """(cached blocks, their hashes) of the longest cached prefix of token_ids, leaving at
        least the last token to compute (its logits are needed)."""
        blocks, hashes = [], []
        for index in range((len(token_ids) - 1) // self.block_size):
            key = self._key(hashes, token_ids, index)
            block = self.blocks.get(key)
            if block is None:
                break
            blocks.append(block)
            hashes.append(hash(key))
        return blocks, hashes

    def start(self, seq_id: int, hashes: list[int]) -> None:
        self.seq_hashes[seq_id] = list(hashes)

    def copy(self, src_id: int, dst_id: int) -> None:
        self.seq_hashes[dst_id] = list(self.seq_hashes[src_id])

    def forget(self, seq_id: int) -> None:
        self.seq_hashes.pop(seq_id, None)

    def register(self, seq_id: int, table: list[int], token_ids: list[int], num_computed: int) -> None:
        """Index the sequence's blocks that are now full and computed (a content already cached
        under another block keeps that block; this one stays private)."""
        hashes = self.seq_hashes[seq_id]
        while (len(hashes) + 1) * self.block_size <= num_computed:
            key = self._key(hashes, token_ids, len(hashes))
            block = table[len(hashes)]
            if key not in self.blocks and block not in self.keys:
                self.blocks[key], self.keys[block] = block, key
            hashes.append(hash(key))

    def evict(self, block: int) -> None:
        """The block is being reused for other content: drop its key."""
        key = self.keys.pop(block, None)
        if key is not None:
            del self.blocks[key]
