"""Property tests of the block manager: random allocate / append / fork / free sequences keep the
refcount, table and slot invariants, and can_allocate / can_append answer exactly."""
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2_engine.block_manager import BlockManager

ops = st.lists(st.tuples(st.sampled_from(["allocate", "append", "fork", "free"]), st.integers(0, 10**6),
                         st.integers(1, 40)), max_size=60)


def check_invariants(bm: BlockManager) -> None:
    owners = [0] * bm.num_blocks
    for seq_id, table in bm.block_tables.items():
        assert len(table) == bm.blocks_for(bm.num_tokens[seq_id])
        for block in table:
            owners[block] += 1
    assert owners == bm.ref_counts
    assert sorted(bm.free_blocks) == [b for b in range(bm.num_blocks) if owners[b] == 0]
    # slots of blocks a sequence owns alone are unique across live sequences
    exclusive = [bm.slot(s, p) for s, n in bm.num_tokens.items() for p in range(n)
                 if bm.ref_counts[bm.block_tables[s][p // bm.block_size]] == 1]
    assert len(exclusive) == len(set(exclusive))


@settings(max_examples=150, deadline=None)
@given(ops=ops, num_blocks=st.integers(1, 12), block_size=st.sampled_from([1, 2, 4, 16]))
def test_random_operations_keep_invariants(ops, num_blocks, block_size):
    bm = BlockManager(num_blocks, block_size)
    next_id = 0
    for op, pick, num_tokens in ops:
        live = sorted(bm.block_tables)
        if op == "allocate":
            needed = -(-num_tokens // block_size)
            assert bm.can_allocate(num_tokens) == (needed <= bm.num_free_blocks)
            if bm.can_allocate(num_tokens):
                assert bm.allocate(next_id, num_tokens) == 0      # no prefix cache: nothing is computed yet
                next_id += 1
        elif live and op == "append":
            seq = live[pick % len(live)]
            n, last = bm.num_tokens[seq], bm.block_tables[seq][-1]
            needed = 1 if n % block_size == 0 else int(bm.ref_counts[last] > 1)
            assert bm.can_append(seq) == (needed <= bm.num_free_blocks)
            if bm.can_append(seq):
                copies = bm.append(seq)
                written = bm.block_tables[seq][n // block_size]
                assert bm.ref_counts[written] == 1          # the block being written has one owner
                assert copies == ([(last, written)] if needed and n % block_size else [])
        elif live and op == "fork":
            bm.fork(live[pick % len(live)], next_id)
            next_id += 1
        elif live and op == "free":
            bm.free(live[pick % len(live)])
        check_invariants(bm)
    for seq in list(bm.block_tables):
        bm.free(seq)
    assert bm.num_free_blocks == num_blocks and not any(bm.ref_counts)


cached_ops = st.lists(st.tuples(st.sampled_from(["allocate", "compute", "append", "fork", "reorder", "free"]),
                                st.integers(0, 10**6), st.integers(0, 3), st.integers(1, 12)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops=cached_ops, num_blocks=st.integers(1, 12), block_size=st.sampled_from([1, 2, 4]))
def test_prefix_caching_operations_keep_invariants(ops, num_blocks, block_size):
    """With prefix caching: allocations reuse only blocks registered for the same leading tokens
    (and never the block holding the last token), registered blocks are never written by append,
    beams' reorder keeps reference counts exact, and everything returns to the free list."""
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=True)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [1, 2, 3, 4, 9, 9, 9, 9, 9, 9, 9, 9], [7] * 12, [7, 7] + [1] * 10]
    tokens, contents, next_id = {}, {}, 0      # contents: block -> the tokens its full slots hold
    for op, pick, which, length in ops:
        live = sorted(bm.block_tables)
        if op == "allocate":
            ids = prompts[which][:length]
            if bm.can_allocate(len(ids), ids):
                cached = bm.allocate(next_id, len(ids), ids)
                assert cached % block_size == 0 and cached <= len(ids) - 1
                table = bm.block_tables[next_id]
                for i in range(cached // block_size):
                    assert contents[table[i]] == ids[:(i + 1) * block_size]
                tokens[next_id] = ids
                next_id += 1
        elif live and op == "compute":
            seq = live[pick % len(live)]
            bm.mark_computed(seq, tokens[seq], bm.num_tokens[seq])
            for i in range(bm.num_tokens[seq] // block_size):
                block = bm.block_tables[seq][i]
                if block in bm.prefix_cache.keys and block not in contents:     # just registered
                    contents[block] = tokens[seq][:(i + 1) * block_size]
        elif live and op == "append":
            seq = live[pick % len(live)]
            if bm.can_append(seq):
                n = bm.num_tokens[seq]
                bm.append(seq)
                written = bm.block_tables[seq][n // block_size]
                assert written not in bm.prefix_cache.keys and bm.ref_counts[written] == 1
                tokens[seq] = tokens[seq][:n] + [which]
        elif live and op == "fork":
            parent = live[pick % len(live)]
            bm.fork(parent, next_id)
            tokens[next_id] = list(tokens[parent])
            next_id += 1
        elif live and op == "reorder":
            parents = [live[(pick + k) % len(live)] for k in range(len(live))]
            snapshot = {p: list(tokens[p]) for p in parents}
            bm.reorder(live, parents)
            for seq, parent in zip(live, parents):
                tokens[seq] = snapshot[parent]
        elif live and op == "free":
            bm.free(live[pick % len(live)])
        for block in list(contents):       # an evicted block is handed out for new content
            if block not in bm.prefix_cache.keys:
                del contents[block]
        check_invariants(bm)
    for seq in list(bm.block_tables):
        bm.free(seq)
    assert bm.num_free_blocks == num_blocks and not any(bm.ref_counts)
