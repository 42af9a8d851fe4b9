"""Continuous-batching scheduler: waiting and running queues, admission by free blocks, seats and a
token budget per step, chunked prefill, and preemption by recompute when the KV pool runs dry.

`schedule()` picks, for some sequences, the next `num_tokens` of their token_ids starting at
num_computed_tokens: one token for a running sequence in decode, a chunk of the prompt (or of
prompt + generated tokens, after a preemption) otherwise. A sequence samples in the step whose
chunk reaches the end of its token_ids. All of a sequence's tokens get their KV slots when it is
admitted; after that it only needs one slot per generated token.

`postprocess(batch, sampled)` is the only writer of sequence progress: computed tokens, forks of
return sequences at a request's first sample, appended tokens, finish and free.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.sampling import SampledToken
from engine.sequence import Sequence, SequenceStatus, TokenEvent


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)   # tokens computed for each seq this step
    block_copies: list[tuple[int, int]] = field(default_factory=list)   # copy-on-write (src, dst), applied first
    samplers: list[Sequence] = field(default_factory=list)   # seqs whose chunk ends their token_ids
    # Who draws a token this step, and from which sampler's logits: a request's first sample also
    # draws for its other return sequences (not yet forked) from the same logits row.
    draws: list[Sequence] = field(default_factory=list)
    draw_rows: list[int] = field(default_factory=list)

    def add(self, seq: Sequence, num_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_tokens.append(num_tokens)
        if seq.num_computed_tokens + num_tokens == len(seq.token_ids):
            for member in (seq, *seq.forks):
                self.draws.append(member)
                self.draw_rows.append(len(self.samplers))
            self.samplers.append(seq)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []    # in admission order
        self.num_preemptions = 0
        self.num_generated_tokens = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        """The step's sequences and token counts, and the copy-on-write block copies to apply first."""
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        # 1. decode slots for running sequences, preempting the most recently admitted when the pool is dry
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or seq.num_uncomputed != 1 or budget == 0:
                continue
            # a slot is needed unless the token was a prompt's last, already allocated at admission
            if self.block_manager.num_tokens[seq.seq_id] < len(seq.token_ids):
                while seq.status is SequenceStatus.RUNNING and not self.block_manager.can_append(seq.seq_id):
                    self.preempt(self.running[-1])
                if seq.status is not SequenceStatus.RUNNING:
                    continue
                batch.block_copies += self.block_manager.append(seq.seq_id)
            batch.add(seq, 1)
            budget -= 1
        # 2. running sequences in the middle of a chunked prefill
        for seq in self.running:
            if seq.num_uncomputed > 1 and budget > 0:
                batch.add(seq, min(seq.num_uncomputed, budget))
                budget -= batch.num_tokens[-1]
        # 3. admit waiting sequences first come, first served
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            seats = sum(s.seats for s in self.running) + seq.seats
            if seats > self.max_num_seqs or not self.block_manager.can_allocate(len(seq.token_ids)):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq.seq_id, len(seq.token_ids))
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, min(seq.num_uncomputed, budget))
            budget -= batch.num_tokens[-1]
        return batch

    def postprocess(self, batch: ScheduledBatch, sampled: list[SampledToken]) -> list[TokenEvent]:
        """Commit a step: its tokens' K/V are now cached, first-sampled requests fork their return
        sequences (copy-on-write), every drawing sequence gets its token, finished ones are freed.
        The events are built before anything is written, and the writes cannot fail, so a step is
        either committed with all its events or not at all."""
        if len(sampled) != len(batch.draws):
            raise ValueError(f"{len(sampled)} sampled tokens for {len(batch.draws)} drawing sequences")
        events = [TokenEvent(seq.request_id, seq.index, token.token_id, seq.finish_reason_after(token.token_id),
                             token.logprob, token.top_logprobs, token.scores)
                  for seq, token in zip(batch.draws, sampled)]
        for seq, num_tokens in zip(batch.seqs, batch.num_tokens):
            seq.num_computed_tokens += num_tokens
        for seq in batch.samplers:
            for child in seq.forks:
                self._admit_fork(seq, child)
            seq.forks = []
        for seq, event in zip(batch.draws, events):
            seq.token_ids.append(event.token_id)
            seq.num_generated += 1
            if event.finish_reason is not None:
                self._finish(seq, event.finish_reason)
        self.num_generated_tokens += len(events)
        return events

    def rollback(self, batch: ScheduledBatch) -> None:
        """Undo a step that failed before postprocess: its sequences give back their blocks and are
        recomputed later from the tokens they had, so nothing a request produced is lost."""
        for seq in batch.seqs:
            if seq.status is SequenceStatus.RUNNING:
                self.preempt(seq)

    def preempt(self, seq: Sequence) -> None:
        """Free the blocks and requeue at the front of waiting; the K/V are recomputed on readmission."""
        self.running.remove(seq)
        self.block_manager.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _admit_fork(self, parent: Sequence, child: Sequence) -> None:
        """A return sequence sharing its parent's blocks (copy-on-write), running right away."""
        self.block_manager.fork(parent.seq_id, child.seq_id)
        child.num_computed_tokens = parent.num_computed_tokens
        child.status = SequenceStatus.RUNNING
        self.running.append(child)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        self.running.remove(seq)
        self.block_manager.free(seq.seq_id)

    def abort(self, request_id: int) -> list[Sequence]:
        """End a request's sequences at once, freeing their blocks; returns those that were live."""
        aborted = [s for s in self.running if s.request_id == request_id]
        for seq in aborted:
            self._finish(seq, "abort")
        for seq in [s for s in self.waiting if s.request_id == request_id]:
            self.waiting.remove(seq)
            for member in (seq, *seq.forks):
                member.status, member.finish_reason = SequenceStatus.FINISHED, "abort"
                aborted.append(member)
        return aborted
