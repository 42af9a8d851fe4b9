"""One generated sequence: its tokens, how many of them have K/V in the cache, and its lifecycle.

A request with n return sequences starts as one Sequence whose `forks` are the other n - 1; they
are forked off (sharing its KV blocks copy-on-write) at the request's first sample. A beam-search
request is a BeamGroup of num_beams Sequences (gpt2_engine.beam_search), scheduled as one unit.

Who writes what: LLMEngine.add_checked creates it (prompt, params, generator); after that only the
Scheduler writes it, each field in these places:

    status               schedule (admission), preempt, _admit_fork, _finish, abort; BeamGroup.commit
    num_computed_tokens  schedule (admission: a cached prefix), advance (a step's tokens), preempt (0),
                         _admit_fork (its parent's); BeamGroup.commit (its parent beam's)
    num_pending,         advance (one per draw), commit (the token appended, the pending one gone),
    num_generated        rollback (the pending one dropped); BeamGroup.commit (the beams' tokens)
    token_ids            commit; BeamGroup.commit
    num_prompt_logprobs  commit (a step's PromptLogprobs), _admit_fork (its parent's)
    forks                commit (forked off at the first sample)

With async scheduling (gpt2_engine.llm_engine) a step is scheduled before the previous step's tokens are
read back: each sequence that drew in that step then has a pending token (num_pending, already
counted in num_generated and in num_tokens, not in token_ids), which the model runner takes on the
device from that step's sampled tokens, and the commit appends on the host.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import torch

from gpt2_engine.sampling import SamplingParams

if TYPE_CHECKING:
    from gpt2_engine.beam_search import BeamGroup


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
    params: SamplingParams
    generator: torch.Generator | None
    forks: list[Sequence] = field(default_factory=list)   # return sequences to fork off at the first sample
    num_computed_tokens: int = 0      # tokens whose K/V are in the cache
    num_pending: int = 0              # tokens drawn on the device, not read back yet (0 or 1), after token_ids
    num_generated: int = 0
    num_prompt_logprobs: int = 0      # prompt tokens 1 .. this whose logprobs were delivered (params.prompt_logprobs)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "stop" (eos), "length" or "abort"
    group: BeamGroup | None = None    # the beam search this sequence is a beam of (gpt2_engine.beam_search)

    # ---- scheduling: where a beam's answers differ, they are its group's ----

    @property
    def running_slots(self) -> int:
        """Running slots this sequence takes once admitted (itself and its pending forks, or its
        beam group's num_beams)."""
        return self.group.num_beams if self.group is not None else 1 + len(self.forks)

    @property
    def unit(self) -> list[Sequence]:
        """The sequences scheduled, preempted and finished together with this one: its beam group's
        active members, else itself."""
        return self.group.unit if self.group is not None else [self]

    @property
    def request_sequences(self) -> list[Sequence]:
        """Its request's sequences that this one stands for while it waits: its beam group's members,
        or itself and its pending forks."""
        return list(self.group.members) if self.group is not None else [self, *self.forks]

    @property
    def row_draws(self) -> list[Sequence | BeamGroup]:
        """The draws that read this sequence's logits row when it samples: itself and its pending
        forks (a request's first sample draws for all its return sequences), or its beam group."""
        return [self.group] if self.group is not None else [self, *self.forks]

    @property
    def prefill_target(self) -> int:
        """Tokens a prefill computes: all of token_ids (the last one's logits sample), or all but the
        last for a started beam group's member (the group decodes its last tokens together)."""
        return self.group.recompute_target(self) if self.group is not None else self.num_tokens

    # ---- the draw protocol (gpt2_engine.beam_search.BeamGroup has the same) ----

    @property
    def num_sequences(self) -> int:
        """Sequences that take a token per draw."""
        return 1

    @property
    def can_draw_ahead(self) -> bool:
        """Whether the next step may be scheduled before this draw's token is known: not when it
        forks return sequences, its sampler reads the token history on the host, or it speculates
        (the drafts are proposed from the tokens it has)."""
        return not self.forks and not self.params.reads_token_history and self.params.speculation is None

    def add_pending(self) -> None:
        """The step is done on the device: its token is pending until commit."""
        self.num_pending += 1
        self.num_generated += 1

    def drop_pending(self) -> None:
        """Undo add_pending (a step rolled back before its commit), if it happened."""
        if self.num_pending:
            self.num_pending -= 1
            self.num_generated -= 1

    def events_for(self, outcome) -> list[TokenEvent]:
        """The consumer's events of this draw's outcome (a SampledToken); writes nothing."""
        return [TokenEvent(self.request_id, self.index, outcome.token_id, self.finish_reason_for(outcome.token_id),
                           outcome.logprob, outcome.top_logprobs, outcome.scores)]

    def commit(self, outcome, block_manager) -> list[Sequence]:
        """Append the pending token; returns the sequences that started running (none)."""
        self.token_ids.append(outcome.token_id)
        self.num_pending -= 1
        return []

    def finish_reason_of(self, outcome) -> str | None:
        """Why the unit ends with this outcome (None: it goes on)."""
        return self.finish_reason_for(outcome.token_id)

    @property
    def num_tokens(self) -> int:
        """Prompt and generated tokens, the pending one included."""
        return len(self.token_ids) + self.num_pending

    @property
    def num_prompt_tokens(self) -> int:
        return self.num_tokens - self.num_generated

    def prompt_positions_to_score(self, start: int, end: int) -> range:
        """The positions p of a chunk [start, end) whose logits give a prompt token's logprob (token
        p + 1's) not delivered yet, when the request asks for prompt logprobs; else none."""
        if self.params.prompt_logprobs is None:
            return range(0)
        return range(max(start, self.num_prompt_logprobs), min(end, self.num_prompt_tokens - 1))

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def out_of_tokens(self) -> bool:
        """All max_new_tokens are drawn (the last maybe not read back yet): nothing more to decode."""
        return self.num_generated >= self.params.max_new_tokens

    def finish_reason_for(self, token: int) -> str | None:
        """Why the sequence ends with `token` as its newest token (counted in num_generated already):
        "stop" (eos), "length", or None."""
        if token in self.params.eos_token_ids:
            return "stop"
        return "length" if self.out_of_tokens else None


@dataclass(frozen=True)
class TokenEvent:
    """One token of one sequence, as delivered to the request's consumer."""
    request_id: int
    index: int                          # which return sequence of the request
    token_id: int
    finish_reason: str | None           # "stop" (eos) / "length" on the sequence's last token, else None
    logprob: float | None = None        # when the request asked for logprobs (see SampledToken)
    top_logprobs: tuple[tuple[int, float], ...] | None = None
    scores: torch.Tensor | None = None  # [V] processed scores (HF output_scores), when asked for
    # beam search, on a returned hypothesis' last token: its length-penalised score (HF
    # sequences_scores) and the beam each of its tokens came from (HF beam_indices, per request)
    sequence_score: float | None = None
    beam_indices: tuple[int, ...] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class PromptLogprobs:
    """Logprobs of prompt tokens first_token .. first_token + len(logprobs) - 1, each under the model's
    raw logits given the tokens before it (params.prompt_logprobs; token 0 has none). A request's
    events hold each such token once, in order, before its first TokenEvent."""
    request_id: int
    index: int                          # which return sequence of the request (its first: it is the prompt's)
    first_token: int
    logprobs: tuple[float, ...]
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...]   # the top params.prompt_logprobs of each

    finished = False                    # it never ends a sequence (TokenEvent.finished)
