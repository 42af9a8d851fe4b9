"""Continuous-batching scheduler: waiting and running queues, admission by free blocks, seats and a
token budget per step, chunked prefill, and preemption by recompute when the KV pool runs dry.

`schedule()` picks, for some sequences, the next `num_tokens` of their token_ids starting at
num_computed_tokens: one token for a running sequence in decode, a chunk of the prompt (or of
prompt + generated tokens, after a preemption) otherwise. A sequence samples in the step whose
chunk reaches the end of its token_ids. All of a sequence's tokens get their KV slots when it is
admitted; after that it only needs one slot per generated token.

`postprocess(batch, sampled)` is the only writer of sequence progress: computed tokens, forks of
return sequences at a request's first sample, appended tokens, beam steps, finish and free.

A beam group (engine.beam_search) is one unit: admitted with all its live members, decoded with all
of them in one step (their rows form the group's one draw), preempted together. After a preemption
its members recompute all but their last token by prefill, then decode that token together.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.beam_search import BeamGroup, BeamStep
from engine.block_manager import BlockManager
from engine.sampling import SampledToken
from engine.sequence import Sequence, SequenceStatus, TokenEvent


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)   # tokens computed for each seq this step
    block_copies: list[tuple[int, int]] = field(default_factory=list)   # copy-on-write (src, dst), applied first
    samplers: list[Sequence] = field(default_factory=list)   # seqs whose chunk ends their token_ids
    # Who draws this step, and from which samplers' logits rows: a request's first sample also
    # draws for its other return sequences (not yet forked) from the same logits row; a beam group
    # draws once, from the rows of all its live members (engine.beam_search).
    draws: list[Sequence | BeamGroup] = field(default_factory=list)
    draw_rows: list[int | list[int]] = field(default_factory=list)

    def add(self, seq: Sequence, num_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_tokens.append(num_tokens)
        if seq.num_computed_tokens + num_tokens == len(seq.token_ids):
            if seq.group is not None:
                self._add_beam_row(seq.group, len(self.samplers))
            else:
                for member in (seq, *seq.forks):
                    self.draws.append(member)
                    self.draw_rows.append(len(self.samplers))
            self.samplers.append(seq)

    def _add_beam_row(self, group: BeamGroup, row: int) -> None:
        """The group draws once its live members' rows are all in (the scheduler adds them together)."""
        if self.draws and self.draws[-1] is group:
            self.draw_rows[-1].append(row)
        else:
            self.draws.append(group)
            self.draw_rows.append([row])


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
        # 1. decode slots for running sequences (a beam group's live members all together),
        #    preempting the most recently admitted when the pool is dry
        for unit in self._decode_units():
            if (unit[0].status is not SequenceStatus.RUNNING or budget < len(unit)     # (preempted meanwhile)
                    or any(seq.num_uncomputed != 1 for seq in unit)):
                continue
            # a slot is needed unless the token's slot was allocated at admission (a prompt's last token)
            needy = [seq.seq_id for seq in unit if self.block_manager.num_tokens[seq.seq_id] < len(seq.token_ids)]
            while unit[0].status is SequenceStatus.RUNNING and not self.block_manager.can_append_all(needy):
                self.preempt(self._newest_unscheduled(batch))
            if unit[0].status is not SequenceStatus.RUNNING:
                continue
            for seq_id in needy:
                batch.block_copies += self.block_manager.append(seq_id)
            for seq in unit:
                batch.add(seq, 1)
            budget -= len(unit)
        # 2. running sequences in the middle of a chunked prefill (or a beam's recompute)
        for seq in self.running:
            remaining = self._prefill_target(seq) - seq.num_computed_tokens
            if remaining > 0 and seq.num_uncomputed > 1 and budget > 0:
                batch.add(seq, min(remaining, budget))
                budget -= batch.num_tokens[-1]
        # 3. admit waiting sequences (or beam groups, all members at once) first come, first served
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            members = seq.group.live if seq.group is not None else [seq]
            seats = self._seats_taken() + seq.seats
            if seats > self.max_num_seqs or not self.block_manager.can_allocate_all(
                    [len(m.token_ids) for m in members], [m.token_ids for m in members]):
                break
            self.waiting.popleft()
            for member in members:
                # a cached prefix (prefix caching) is computed already; the rest goes through prefill
                member.num_computed_tokens = self.block_manager.allocate(member.seq_id, len(member.token_ids),
                                                                         member.token_ids)
                member.status = SequenceStatus.RUNNING
                self.running.append(member)
                remaining = self._prefill_target(member) - member.num_computed_tokens
                if budget > 0 and remaining > 0:
                    batch.add(member, min(remaining, budget))
                    budget -= batch.num_tokens[-1]
        return batch

    def _newest_unscheduled(self, batch: ScheduledBatch) -> Sequence:
        """The preemption victim: the most recently admitted running sequence not already in this
        step (a beam group's members are spread over `running`, so the newest may be scheduled)."""
        scheduled = {id(seq) for seq in batch.seqs}
        return next(seq for seq in reversed(self.running) if id(seq) not in scheduled)

    def _decode_units(self) -> list[list[Sequence]]:
        """Running sequences in admission order, a beam group's live members as one unit."""
        units, groups = [], set()
        for seq in self.running:
            if seq.group is None:
                units.append([seq])
            elif id(seq.group) not in groups:
                groups.add(id(seq.group))
                units.append(list(seq.group.live))
        return units

    def _seats_taken(self) -> int:
        groups = {id(s.group): s.group.num_beams for s in self.running if s.group is not None}
        return sum(s.seats for s in self.running if s.group is None) + sum(groups.values())

    @staticmethod
    def _prefill_target(seq: Sequence) -> int:
        """Tokens a prefill computes: all of token_ids (the last one's logits sample), or all but the
        last for a started beam group's member (the group decodes its last tokens together)."""
        return seq.group.recompute_target(seq) if seq.group is not None else len(seq.token_ids)

    def postprocess(self, batch: ScheduledBatch, sampled: list[SampledToken | BeamStep]) -> list[TokenEvent]:
        """Commit a step: its tokens' K/V are now cached, first-sampled requests fork their return
        sequences (copy-on-write), every drawing sequence gets its token, beam groups take their
        step (and, when done, deliver their hypotheses), finished ones are freed. The events are
        built before anything is written, and the writes cannot fail, so a step is either committed
        with all its events or not at all."""
        if len(sampled) != len(batch.draws):
            raise ValueError(f"{len(sampled)} sampled tokens for {len(batch.draws)} drawing sequences")
        # per draw: its events (a beam group has none until it is done, then all its hypotheses')
        draw_events = [(draw.final_events(outcome.state) if outcome.done else []) if isinstance(draw, BeamGroup) else
                       [TokenEvent(draw.request_id, draw.index, outcome.token_id, draw.finish_reason_after(outcome.token_id),
                                   outcome.logprob, outcome.top_logprobs, outcome.scores)]
                       for draw, outcome in zip(batch.draws, sampled)]
        for seq, num_tokens in zip(batch.seqs, batch.num_tokens):
            seq.num_computed_tokens += num_tokens
            self.block_manager.mark_computed(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
        for seq in batch.samplers:
            for child in seq.forks:
                self._admit_fork(seq, child)
            seq.forks = []
        for draw, outcome, events in zip(batch.draws, sampled, draw_events):
            if isinstance(draw, BeamGroup):
                self.num_generated_tokens += draw.num_beams
                self.running += draw.commit(outcome, self.block_manager)
                if outcome.done:
                    for member in draw.live:
                        self._finish(member, "stop")
                continue
            (event,) = events
            draw.token_ids.append(event.token_id)
            draw.num_generated += 1
            self.num_generated_tokens += 1
            if event.finish_reason is not None:
                self._finish(draw, event.finish_reason)
        return [event for events in draw_events for event in events]

    def rollback(self, batch: ScheduledBatch) -> None:
        """Undo a step that failed before postprocess: its sequences give back their blocks and are
        recomputed later from the tokens they had, so nothing a request produced is lost."""
        for seq in batch.seqs:
            if seq.status is SequenceStatus.RUNNING:
                self.preempt(seq)

    def preempt(self, seq: Sequence) -> None:
        """Free the blocks and requeue at the front of waiting; the K/V are recomputed on readmission.
        A beam is preempted with its whole group (which waits as its leader)."""
        members = seq.group.live if seq.group is not None else [seq]
        for member in members:
            self.running.remove(member)
            self.block_manager.free(member.seq_id)
            member.num_computed_tokens = 0
            member.status = SequenceStatus.WAITING
        self.waiting.appendleft(members[0])
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
            for member in (seq.group.members if seq.group is not None else (seq, *seq.forks)):
                member.status, member.finish_reason = SequenceStatus.FINISHED, "abort"
                aborted.append(member)
        return aborted
