"""Continuous-batching scheduler: waiting and running queues, admission by free blocks, running
slots and a token budget per step, chunked prefill, and preemption by recompute when the KV pool runs dry.
A step also scores at most SCORED_ROWS_PER_STEP prompt positions (gpt2_engine.prompt_logprobs): a
sequence that asks for prompt logprobs gets no larger chunks than that allows.

`schedule()` picks, for some sequences, the next `num_tokens` of their token_ids starting at
num_computed_tokens: one token for a running sequence in decode, a chunk of the prompt (or of
prompt + generated tokens, after a preemption) otherwise. A sequence samples in the step whose
chunk reaches the end of its token_ids. All of a sequence's tokens get their KV slots when it is
admitted; after that it only needs one slot per generated token.

The scheduler is the only writer of sequence state once a request is added (gpt2_engine.sequence
lists each field's writers): `schedule` admits and preempts, `postprocess(batch, sampled)` writes a
step's progress (computed tokens, forks of return sequences at a request's first sample, appended
tokens, beam steps, finish and free) and `rollback` undoes a failed step's. postprocess is
`advance` (what the step changes whatever it sampled: computed tokens, a pending token per
drawing sequence) then `commit` (the tokens themselves, events, forks, finishes). The engine's
async scheduling calls them apart: it schedules the next step between the two, when
`can_schedule_ahead` says the next step's structure cannot depend on this step's tokens.

A beam group (gpt2_engine.beam_search) is one unit: admitted with all its active members, decoded with all
of them in one step (their rows form the group's one draw), preempted together. After a preemption
its members recompute all but their last token by prefill, then decode that token together.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from gpt2_engine.beam_search import BeamGroup, BeamStep
from gpt2_engine.block_manager import BlockManager
from gpt2_engine.prompt_logprobs import SCORED_ROWS_PER_STEP, PromptScores
from gpt2_engine.sampling import SampledToken
from gpt2_engine.sequence import PromptLogprobs, Sequence, SequenceStatus, TokenEvent


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)   # tokens computed for each seq this step
    block_copies: list[tuple[int, int]] = field(default_factory=list)   # copy-on-write (src, dst), applied first
    # the seqs whose chunk ends their token_ids, in the order of their rows in the step's logits
    row_seqs: list[Sequence] = field(default_factory=list)
    # Who draws this step (Sequence.row_draws), and from which of the rows of row_seqs: a request's
    # first sample also draws for its other return sequences (not yet forked) from the same logits
    # row; a beam group draws once, from the rows of all its active members (gpt2_engine.beam_search).
    draws: list[Sequence | BeamGroup] = field(default_factory=list)
    draw_rows: list[list[int]] = field(default_factory=list)

    def add(self, seq: Sequence, num_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_tokens.append(num_tokens)
        if seq.num_computed_tokens + num_tokens == seq.num_tokens:
            row = len(self.row_seqs)
            for draw in seq.row_draws:
                if self.draws and self.draws[-1] is draw:    # a beam group's next member (added together)
                    self.draw_rows[-1].append(row)
                else:
                    self.draws.append(draw)
                    self.draw_rows.append([row])
            self.row_seqs.append(seq)


@dataclass
class _StepBudget:
    """What the step being scheduled may still take: tokens (max_num_batched_tokens), and positions
    whose prompt logprobs it scores (each costs an LM-head row and a log-softmax over the vocabulary)."""
    tokens: int
    scored_rows: int = SCORED_ROWS_PER_STEP

    def take_chunk(self, seq: Sequence, remaining: int) -> int:
        """The size of seq's next prefill chunk (up to `remaining` tokens) that fits, taken from the budget."""
        start = seq.num_computed_tokens
        size = min(remaining, self.tokens)
        scored = seq.prompt_positions_to_score(start, start + size)
        if len(scored) > self.scored_rows:
            size = scored.start + self.scored_rows - start
            scored = range(scored.start, scored.start + self.scored_rows)
        self.tokens -= size
        self.scored_rows -= len(scored)
        return size


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

    def schedule(self, *, preempt: bool = True) -> ScheduledBatch | None:
        """The step's sequences and token counts, and the copy-on-write block copies to apply first.
        With preempt=False (a step is in flight), None instead when the pool may be too dry for the
        decode slots: a preemption victim could be a sequence of the step in flight."""
        batch = ScheduledBatch()
        budget = _StepBudget(self.max_num_batched_tokens)
        # 1. decode slots for running sequences (a beam group's active members all together),
        #    preempting the most recently admitted when the pool is dry
        decoding = [unit for unit in self._running_units()
                    if all(seq.num_uncomputed == 1 and not seq.out_of_tokens for seq in unit)]
        slot_needs = [self._needing_slots(unit) for unit in decoding]
        # when all of them fit (an upper bound), no unit needs its own check
        room = self.block_manager.can_append_all([seq_id for needing in slot_needs for seq_id in needing])
        if not (room or preempt):
            return None
        for unit, needing in zip(decoding, slot_needs):
            if unit[0].status is not SequenceStatus.RUNNING or budget.tokens < len(unit):     # (preempted meanwhile)
                continue
            while not room and unit[0].status is SequenceStatus.RUNNING and not self.block_manager.can_append_all(needing):
                self.preempt(self._newest_unscheduled(batch))
            if unit[0].status is not SequenceStatus.RUNNING:
                continue
            for seq_id in needing:
                batch.block_copies += self.block_manager.append(seq_id)
            for seq in unit:
                batch.add(seq, 1)
            budget.tokens -= len(unit)
        # 2. running sequences in the middle of a chunked prefill (or a beam's recompute)
        for seq in self.running:
            remaining = seq.prefill_target - seq.num_computed_tokens
            if remaining > 0 and seq.num_uncomputed > 1 and budget.tokens > 0:
                self._add_chunk(batch, seq, budget.take_chunk(seq, remaining))
        # 3. admit waiting sequences (or beam groups, all members at once) first come, first served
        while self.waiting and budget.tokens > 0:
            seq = self.waiting[0]
            members = seq.unit
            if self._running_slots() + seq.running_slots > self.max_num_seqs or not self.block_manager.can_allocate_all(
                    [len(m.token_ids) for m in members], [m.token_ids if self._may_reuse(m) else None for m in members]):
                break
            self.waiting.popleft()
            for member in members:
                # a cached prefix (prefix caching) is computed already; the rest goes through prefill
                member.num_computed_tokens = self.block_manager.allocate(member.seq_id, len(member.token_ids),
                                                                         member.token_ids, reuse=self._may_reuse(member))
                member.status = SequenceStatus.RUNNING
                self.running.append(member)
                remaining = member.prefill_target - member.num_computed_tokens
                if budget.tokens > 0 and remaining > 0:
                    self._add_chunk(batch, member, budget.take_chunk(member, remaining))
        return batch

    @staticmethod
    def _add_chunk(batch: ScheduledBatch, seq: Sequence, size: int) -> None:
        if size > 0:       # (none when the step may score no more of its prompt)
            batch.add(seq, size)

    @staticmethod
    def _may_reuse(seq: Sequence) -> bool:
        """Whether the sequence may skip a cached prefix: not while it has prompt tokens to score,
        whose logits only its own prefill gives (gpt2_engine.prompt_logprobs)."""
        return not seq.prompt_positions_to_score(0, seq.num_tokens)

    def _needing_slots(self, unit: list[Sequence]) -> list[int]:
        """The unit's sequences whose next token needs a slot (a prompt's last token got one at admission)."""
        return [seq.seq_id for seq in unit if self.block_manager.num_tokens[seq.seq_id] < seq.num_tokens]

    def _newest_unscheduled(self, batch: ScheduledBatch) -> Sequence:
        """The preemption victim: the most recently admitted running sequence not already in this
        step (a beam group's members are spread over `running`, so the newest may be scheduled)."""
        scheduled = {id(seq) for seq in batch.seqs}
        return next(seq for seq in reversed(self.running) if id(seq) not in scheduled)

    def _running_units(self) -> list[list[Sequence]]:
        """Running sequences in admission order, a beam group's active members as one unit (Sequence.unit)."""
        units, seen = [], set()
        for seq in self.running:
            unit = seq.unit
            if id(unit[0]) not in seen:
                seen.add(id(unit[0]))
                units.append(list(unit))
        return units

    def _running_slots(self) -> int:
        return sum(unit[0].running_slots for unit in self._running_units())

    def postprocess(self, batch: ScheduledBatch, sampled: list[SampledToken | BeamStep],
                    prompt_scores: PromptScores | None = None) -> list[TokenEvent | PromptLogprobs]:
        """Commit a step: its tokens' K/V are now cached, first-sampled requests fork their return
        sequences (copy-on-write), every drawing sequence gets its token, beam groups take their
        step (and, when done, deliver their hypotheses), finished ones are freed."""
        self.advance(batch)
        return self.commit(batch, sampled, prompt_scores)

    def can_schedule_ahead(self, batch: ScheduledBatch) -> bool:
        """Whether the next step may be scheduled after advance(batch), before its tokens are known:
        not when the next step's structure or sampling depends on them (a beam group's step, a first
        sample that forks return sequences, a sampler reading the token history on the host, a
        speculative sequence, whose next drafts follow from its tokens). A
        preemption that it might need is schedule(preempt=False)'s to refuse."""
        return all(draw.can_draw_ahead for draw in batch.draws)

    def advance(self, batch: ScheduledBatch) -> None:
        """What the step writes whatever its tokens are: its tokens' K/V are cached (full blocks are
        indexed for prefix caching: the device computes them before any later step reads them), and
        each drawing sequence has its new token pending (Sequence.num_pending).
        Sequences that ended since the step was launched (aborted, finished) are left alone."""
        for seq, num_tokens in zip(batch.seqs, batch.num_tokens):
            if seq.status is SequenceStatus.RUNNING:
                seq.num_computed_tokens += num_tokens
                self.block_manager.mark_computed(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
        for draw, running in zip(batch.draws, self._running_draws(batch)):
            if running:
                draw.add_pending()

    def commit(self, batch: ScheduledBatch, sampled: list[SampledToken | BeamStep],
               prompt_scores: PromptScores | None = None) -> list[TokenEvent | PromptLogprobs]:
        """The rest of postprocess once the step's outcomes are known (after advance). The events are
        built before anything is written, and the writes cannot fail, so a step is either committed
        with all its events or not at all (then the engine rolls it back). A draw whose sequence
        ended since the step was launched is dropped. The prompt logprobs its chunks scored come
        first (they precede any token of their sequence)."""
        if len(sampled) != len(batch.draws):
            raise ValueError(f"{len(sampled)} sampled tokens for {len(batch.draws)} drawing sequences")
        running = self._running_draws(batch)
        scored = [(chunk.seq, event) for chunk, event in zip(prompt_scores.chunks, prompt_scores.events())
                  if chunk.seq.status is SequenceStatus.RUNNING] if prompt_scores is not None else []
        # per draw: its events (a beam group has none until it is done, then all its hypotheses')
        draw_events = [draw.events_for(outcome) if runs else [] for draw, outcome, runs in zip(batch.draws, sampled, running)]
        for seq, event in scored:
            seq.num_prompt_logprobs = event.first_token + len(event.logprobs) - 1
        for seq in batch.row_seqs:
            if seq.status is SequenceStatus.RUNNING:
                for child in seq.forks:
                    self._admit_fork(seq, child)
                seq.forks = []
        for draw, outcome, runs in zip(batch.draws, sampled, running):
            if not runs:
                continue
            self.num_generated_tokens += draw.num_sequences
            self.running += draw.commit(outcome, self.block_manager)
            reason = draw.finish_reason_of(outcome)
            if reason is not None:
                for seq in list(draw.unit):
                    self._finish(seq, reason)
        return [event for _, event in scored] + [event for events in draw_events for event in events]

    def commit_runs(self, batch: ScheduledBatch, runs: list[list[SampledToken]]) -> list[TokenEvent]:
        """Commit a speculative step (gpt2_engine.speculative) instead of postprocess: each sequence
        of a decode-only batch keeps a run of tokens, its verified drafts and the target's next token.
        Keeping a token makes the previous one computed (its K/V were written by the verification),
        so the run's last token stays uncomputed, as after a decode step; the slots of rejected drafts
        are given back. A finish (EOS, max_new_tokens) inside the run ends it there."""
        events = []
        for seq, run in zip(batch.seqs, runs):
            if seq.status is not SequenceStatus.RUNNING:
                continue
            reason = None
            for sampled in run:
                seq.num_computed_tokens += 1
                seq.token_ids.append(sampled.token_id)
                seq.num_generated += 1
                self.num_generated_tokens += 1
                reason = seq.finish_reason_for(sampled.token_id)
                events.append(TokenEvent(seq.request_id, seq.index, sampled.token_id, reason, sampled.logprob,
                                         sampled.top_logprobs, sampled.scores))
                if reason is not None:
                    break
            self.block_manager.truncate(seq.seq_id, seq.num_computed_tokens)
            self.block_manager.mark_computed(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
            if reason is not None:
                self._finish(seq, reason)
        return events

    @staticmethod
    def _running_draws(batch: ScheduledBatch) -> list[bool]:
        """Per draw, whether its (first) sampler is still running: a draw whose sequence ended or was
        preempted since the step was launched is dropped (a beam group's members go together)."""
        return [batch.row_seqs[rows[0]].status is SequenceStatus.RUNNING for rows in batch.draw_rows]

    def rollback(self, batch: ScheduledBatch) -> None:
        """Undo a step that failed before its commit (advanced or not): its sequences drop a
        pending token, give back their blocks and are recomputed later from the tokens they
        had, so nothing a request produced is lost."""
        for draw in batch.draws:
            draw.drop_pending()
        for seq in batch.seqs:
            if seq.status is SequenceStatus.RUNNING:
                self.preempt(seq)

    def preempt(self, seq: Sequence) -> None:
        """Free the blocks and requeue at the front of waiting; the K/V are recomputed on readmission.
        A beam is preempted with its whole group (which waits as its leader)."""
        members = list(seq.unit)
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
        child.num_prompt_logprobs = parent.num_prompt_logprobs     # the prompt's were delivered once, as the parent's
        child.status = SequenceStatus.RUNNING
        self.running.append(child)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        self.running.remove(seq)
        self.block_manager.free(seq.seq_id)

    def abort(self, request_id: int) -> list[Sequence]:
        """End a request's sequences at once, freeing their blocks; returns those that had not ended."""
        aborted = [s for s in self.running if s.request_id == request_id]
        for seq in aborted:
            self._finish(seq, "abort")
        for seq in [s for s in self.waiting if s.request_id == request_id]:
            self.waiting.remove(seq)
            for member in seq.request_sequences:
                member.status, member.finish_reason = SequenceStatus.FINISHED, "abort"
                aborted.append(member)
        return aborted
