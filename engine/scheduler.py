"""Continuous-batching scheduler: waiting and running queues, admission by free blocks, seats and a
token budget per step, chunked prefill, and preemption by recompute when the KV pool runs dry.

Each step schedules, for some sequences, the next `num_tokens` of their token_ids starting at
num_computed_tokens: one token for a running sequence in decode, a chunk of the prompt (or of
prompt + generated tokens, after a preemption) otherwise. A sequence samples in the step whose
chunk reaches the end of its token_ids. All of a sequence's tokens get their KV slots when it is
admitted; after that it only needs one slot per generated token.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum

import torch

from engine.block_manager import BlockManager
from engine.sampling import SamplingParams


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: int
    index: int                        # which of the request's return sequences
    token_ids: list[int]              # prompt + generated so far
    num_prompt_tokens: int
    params: SamplingParams
    generator: torch.Generator | None
    forks: list[Sequence] = field(default_factory=list)   # return sequences to fork off at the first sample
    num_computed_tokens: int = 0      # tokens whose K/V are in the cache
    num_generated: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "stop" (eos) or "length"

    @property
    def seats(self) -> int:
        return 1 + len(self.forks)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)   # tokens computed for each seq this step

    def add(self, seq: Sequence, num_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_tokens.append(num_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []    # in admission order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[ScheduledBatch, list[tuple[int, int]]]:
        """The step's sequences and token counts, plus the copy-on-write block copies to apply first."""
        batch, copies = ScheduledBatch(), []
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
                copies += self.block_manager.append(seq.seq_id)
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
        return batch, copies

    def preempt(self, seq: Sequence) -> None:
        """Free the blocks and requeue at the front of waiting; the K/V are recomputed on readmission."""
        self.running.remove(seq)
        self.block_manager.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def admit_fork(self, parent: Sequence, child: Sequence) -> None:
        """A return sequence sharing its parent's blocks (copy-on-write), running right away."""
        self.block_manager.fork(parent.seq_id, child.seq_id)
        child.num_computed_tokens = parent.num_computed_tokens
        child.status = SequenceStatus.RUNNING
        self.running.append(child)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        self.running.remove(seq)
        self.block_manager.free(seq.seq_id)

    def abort(self, request_id: int) -> None:
        for seq in [s for s in self.running if s.request_id == request_id]:
            self.finish(seq, "abort")
        self.waiting = deque(s for s in self.waiting if s.request_id != request_id)
