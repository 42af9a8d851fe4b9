"""Scheduler unit tests: admission order, running slots, token budget, chunked prefill, preemption and
resume, freeing."""
import torch

from gpt2_engine.block_manager import BlockManager
from gpt2_engine.sampling import SampledToken, SamplingParams
from gpt2_engine.scheduler import Scheduler
from gpt2_engine.sequence import Sequence, SequenceStatus


def make_seq(seq_id: int, num_tokens: int, max_new_tokens: int = 20) -> Sequence:
    return Sequence(seq_id, seq_id, 0, list(range(num_tokens)), SamplingParams(max_new_tokens=max_new_tokens), None)


def advance(scheduler, batch, sampled_token: int = 0):
    """What the engine does after the forward: commit the step with one sampled token per draw."""
    return scheduler.postprocess(batch, [SampledToken(sampled_token)] * len(batch.draws))


def test_admits_first_come_first_served_within_running_slots():
    scheduler = Scheduler(BlockManager(32, 4), max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [make_seq(i, 5) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    batch = scheduler.schedule()
    assert batch.seqs == seqs[:2] and batch.num_tokens == [5, 5]
    assert list(scheduler.waiting) == [seqs[2]]


def test_decodes_come_first_and_long_prompts_are_chunked():
    scheduler = Scheduler(BlockManager(32, 4), max_num_seqs=8, max_num_batched_tokens=6)
    first, long = make_seq(0, 3), make_seq(1, 13)
    scheduler.add(first)
    batch = scheduler.schedule()
    advance(scheduler, batch)
    scheduler.add(long)
    chunks = []
    while long.num_uncomputed > 1 or not chunks:
        batch = scheduler.schedule()
        assert batch.seqs[0] is first and batch.num_tokens[0] == 1      # the decode token, every step
        assert sum(batch.num_tokens) <= 6
        chunks.append(batch.num_tokens[1])
        advance(scheduler, batch)
    assert chunks == [5, 5, 3] and len(long.token_ids) == 14


def test_preemption_requeues_the_newest_and_resume_recomputes():
    bm = BlockManager(3, 4)
    scheduler = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    old, new = make_seq(0, 4, max_new_tokens=2), make_seq(1, 4)
    scheduler.add(old)
    scheduler.add(new)
    batch = scheduler.schedule()
    advance(scheduler, batch)                        # both have 5 tokens now, 4 computed: each needs a second block
    assert bm.num_free_blocks == 1
    batch = scheduler.schedule()
    assert scheduler.num_preemptions == 1 and batch.seqs == [old]
    assert list(scheduler.waiting) == [new] and new.num_computed_tokens == 0 and new.status is SequenceStatus.WAITING
    assert new.token_ids == [0, 1, 2, 3, 0]                               # its generated token is kept
    (event,) = advance(scheduler, batch)  # old's second token is its last (max_new_tokens=2)
    assert event.finish_reason == "length" and old.status is SequenceStatus.FINISHED
    assert bm.num_free_blocks == 3
    batch = scheduler.schedule()
    assert batch.seqs == [new] and batch.num_tokens == [5]                # recompute prompt + generated


def test_forked_parent_reserves_running_slots_for_its_children():
    scheduler = Scheduler(BlockManager(32, 4), max_num_seqs=3, max_num_batched_tokens=100)
    parent, other = make_seq(0, 5), make_seq(1, 5)
    parent.forks = [make_seq(2, 5), make_seq(3, 5)]
    scheduler.add(parent)
    scheduler.add(other)
    batch = scheduler.schedule()
    assert batch.seqs == [parent] and list(scheduler.waiting) == [other]


def test_fork_shares_blocks_and_first_decode_copies_on_write():
    bm = BlockManager(8, 4)
    scheduler = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100)
    parent, child = make_seq(0, 6), make_seq(1, 6)
    parent.forks = [child]      # a request with two return sequences
    scheduler.add(parent)
    batch = scheduler.schedule()
    events = advance(scheduler, batch)   # the first sample forks the child, then both draw
    assert [(e.request_id, e.index) for e in events] == [(0, 0), (1, 0)] and not parent.forks
    assert bm.block_tables[0] == bm.block_tables[1]
    batch = scheduler.schedule()
    copies = batch.block_copies
    # the shared, partly filled last block is copied for the parent; the child then owns it alone
    assert batch.seqs == [parent, child] and copies == [(bm.block_tables[1][1], bm.block_tables[0][1])]
    assert bm.block_tables[0][0] == bm.block_tables[1][0] and bm.block_tables[0][1] != bm.block_tables[1][1]


def test_abort_and_finish_free_everything():
    bm = BlockManager(8, 4)
    scheduler = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100)
    running, waiting = make_seq(0, 20), make_seq(1, 20)
    scheduler.add(running)
    scheduler.add(waiting)
    scheduler.schedule()
    scheduler.abort(0)
    scheduler.abort(1)
    assert not scheduler.has_unfinished() and bm.num_free_blocks == 8


def test_a_beam_group_is_admitted_decoded_and_preempted_as_one_unit():
    from gpt2_engine.beam_search import BeamGroup, BeamStep

    bm = BlockManager(32, 4)
    scheduler = Scheduler(bm, max_num_seqs=3, max_num_batched_tokens=100)
    params = SamplingParams(max_new_tokens=5, num_beams=3)
    beams = [Sequence(i, 0, i, [1, 2, 3, 4, 5], params, None) for i in range(3)]
    group = BeamGroup(beams, 1)
    scheduler.add(beams[0])
    scheduler.add(make_seq(9, 3))                 # no seat left while the group holds its 3
    batch = scheduler.schedule()
    assert batch.seqs == [beams[0]] and batch.draws == [group] and batch.draw_rows == [[0]]
    # the first step: every beam continues beam 0 (sharing its blocks), with tokens 7, 8, 9
    logits = torch.full((1, 10), -10.0)
    logits[0, 7:10] = torch.tensor([3.0, 2.0, 1.0])
    scheduler.postprocess(batch, [group.propose(logits)])
    assert [b.token_ids[-1] for b in beams] == [7, 8, 9] and all(b.status is SequenceStatus.RUNNING for b in beams)
    assert bm.block_tables[1][:1] == bm.block_tables[0][:1] and bm.ref_counts[bm.block_tables[0][0]] == 3
    batch = scheduler.schedule()
    assert batch.seqs == beams and batch.draws == [group] and batch.draw_rows == [[0, 1, 2]]
    scheduler.rollback(batch)                    # a failed step: the whole group goes back to waiting
    assert list(scheduler.waiting)[0] is beams[0] and not scheduler.running and bm.num_free_blocks == 32
    assert all(b.num_computed_tokens == 0 and b.status is SequenceStatus.WAITING for b in beams)
    batch = scheduler.schedule()                 # readmitted together: each recomputes all but its last token
    assert batch.seqs == beams and batch.num_tokens == [5, 5, 5] and batch.draws == []
    advance(scheduler, batch)
    batch = scheduler.schedule()                 # ... then they decode that token together
    assert batch.seqs == beams and batch.num_tokens == [1, 1, 1] and batch.draws == [group]
    assert isinstance(group.propose(torch.randn(3, 10)), BeamStep)
