"""Beam search with transformers' semantics, one request (a beam group) at a time.

A BeamGroup owns num_beams Sequences (its "members", fixed slots whose contents move between
steps). Before its first step only the leader (member 0) runs: it prefills the prompt once. Each
step the group's active members' logits rows [k, V] go through `propose`, a line-by-line port of
transformers' `_beam_search` loop body for one batch item (generation/utils.py: log_softmax ->
logits processors -> + running scores -> top 2*num_beams continuations -> running beams for the
next step -> finished hypotheses -> early-stop heuristic), which returns a BeamStep and changes
nothing. `Scheduler.postprocess` commits it (`commit`): member j takes over the blocks of its
parent beam (BlockManager.reorder: shared copy-on-write, no copy now) plus its new token. The
finished hypotheses live in the group's state tensors, not in the KV cache.

transformers runs a batch until every item is done; an item that is done no longer changes (its
new candidates are masked with -1e9), so running each item alone, as here, gives its result.
The group is scheduled as one unit: all active members decode in the same step, and a preemption
of one preempts all (they recompute their tokens but the last, then decode together).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpt2_engine.sampling import apply_repetition_penalty, ban_repeated_ngrams, mask_early_eos
from gpt2_engine.sequence import Sequence, SequenceStatus, TokenEvent

NEG = -1.0e9     # transformers' "never pick this" score offset


@dataclass(frozen=True)
class BeamState:
    """transformers' per-item beam tensors with a batch dimension of 1 (so every op is its op).
    Token and index tensors cover the generated positions only: [1, num_beams, max_new_tokens]."""
    running_tokens: torch.Tensor      # int64 (0 where not generated yet: never read)
    running_scores: torch.Tensor      # [1, nb] fp32 summed log-probs (0, -1e9, ... at the start)
    running_indices: torch.Tensor     # int32 beam index each token came from, -1 unfilled
    tokens: torch.Tensor              # finished hypotheses, best first
    scores: torch.Tensor              # [1, nb] their length-penalised scores (-1e9: empty slot)
    indices: torch.Tensor
    is_finished: torch.Tensor         # [1, nb] bool
    improvable: torch.Tensor          # [1, 1] bool: transformers' is_early_stop_heuristic_unsatisfied
    num_generated: int = 0            # cur_len - decoder_prompt_len

    @classmethod
    def initial(cls, num_beams: int, max_new_tokens: int) -> "BeamState":
        running_scores = torch.zeros((1, num_beams))
        running_scores[:, 1:] = NEG
        indices = torch.full((1, num_beams, max_new_tokens), -1, dtype=torch.int32)
        tokens = torch.zeros((1, num_beams, max_new_tokens), dtype=torch.int64)
        return cls(tokens, running_scores, indices, tokens.clone(), torch.full((1, num_beams), NEG), indices.clone(),
                   torch.zeros((1, num_beams), dtype=torch.bool), torch.ones((1, 1), dtype=torch.bool))


@dataclass(frozen=True)
class BeamStep:
    """A proposed step: the new state, and for each member slot j the active member it continues
    (`parents[j]`, an index into the group's active members at proposal time)."""
    state: BeamState
    parents: list[int]
    done: bool


def _gather_beams(tensor: torch.Tensor, beam_indices: torch.Tensor) -> torch.Tensor:
    while beam_indices.dim() < tensor.dim():
        beam_indices = beam_indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, beam_indices, dim=1)


class BeamGroup:
    """num_beams member Sequences decoded as one unit; one draw per step over its active members' rows
    (the draw protocol of gpt2_engine.sequence.Sequence)."""

    def __init__(self, members: list[Sequence], num_return_sequences: int):
        params = members[0].params
        if len(members) != params.num_beams:
            raise ValueError(f"a beam group needs num_beams = {params.num_beams} members, got {len(members)}")
        self.members = members
        self.num_return_sequences = num_return_sequences
        self.prompt_len = len(members[0].token_ids)
        self.state = BeamState.initial(params.num_beams, params.max_new_tokens)
        # the members that hold K/V (or are being recomputed) and take part in steps: the leader
        # alone before the first step, all of them after it
        self.active = [members[0]]
        for member in members:
            member.group = self

    @property
    def leader(self) -> Sequence:
        return self.members[0]

    @property
    def num_beams(self) -> int:
        return len(self.members)

    @property
    def started(self) -> bool:
        return self.state.num_generated > 0

    @property
    def unit(self) -> list[Sequence]:
        """The members scheduled, preempted and finished together: the active ones."""
        return self.active

    # ---- the draw protocol ----

    @property
    def generator(self) -> None:
        """Beam search draws nothing at random: no RNG state to snapshot or restore."""
        return None

    @property
    def num_sequences(self) -> int:
        return self.num_beams

    @property
    def can_draw_ahead(self) -> bool:
        """Never: the next step's members and rows follow from this step's choice of beams."""
        return False

    def add_pending(self) -> None:
        """Nothing: the beams' tokens are written at commit (a group is never drawn ahead)."""

    def drop_pending(self) -> None:
        """Nothing (see add_pending)."""

    def events_for(self, step: BeamStep) -> list[TokenEvent]:
        """None until the search is done, then every returned hypothesis' tokens; writes nothing."""
        return self.final_events(step.state) if step.done else []

    def finish_reason_of(self, step: BeamStep) -> str | None:
        return "stop" if step.done else None

    def propose(self, logits: torch.Tensor) -> BeamStep:
        """transformers' loop body on the active members' logits rows [k, V] (k = 1 at the first step,
        whose row stands for all num_beams identical rows there)."""
        params, s = self.leader.params, self.state
        nb, gen = self.num_beams, s.num_generated
        log_probs = F.log_softmax(logits.float(), dim=-1)
        apply_repetition_penalty(log_probs, self.active)
        ban_repeated_ngrams(log_probs, self.active)
        mask_early_eos(log_probs, self.active)
        log_probs = log_probs.expand(nb, -1) if log_probs.shape[0] == 1 else log_probs
        vocab = log_probs.shape[-1]
        log_probs = (log_probs[None] + s.running_scores[:, :, None].to(log_probs.device)).reshape(1, -1).cpu()

        # c. top-K continuations, K = max(2, 1 + #eos) * num_beams
        beams_to_keep = max(2, 1 + len(params.eos_token_ids)) * nb
        topk_log_probs, topk_indices = torch.topk(log_probs, k=beams_to_keep)
        topk_beams = topk_indices // vocab
        topk_running_indices = _gather_beams(s.running_indices, topk_beams)
        topk_running_tokens = _gather_beams(s.running_tokens, topk_beams)
        topk_ids = topk_indices % vocab
        topk_running_tokens[:, :, gen] = topk_ids
        topk_running_indices[:, :, gen] = topk_beams.to(torch.int32)

        # d. stopping criteria: EOS, or max_new_tokens reached
        hits = torch.isin(topk_ids, torch.tensor(params.eos_token_ids, dtype=torch.int64))
        if gen + 1 >= params.max_new_tokens:
            hits = torch.ones_like(hits)

        # e. running beams of the next step
        topk_running_log_probs = topk_log_probs + hits.to(torch.float32) * NEG
        next_topk = torch.topk(topk_running_log_probs, k=nb)[1]
        running_tokens = _gather_beams(topk_running_tokens, next_topk)
        running_scores = _gather_beams(topk_running_log_probs, next_topk)
        running_indices = _gather_beams(topk_running_indices, next_topk)
        parents = _gather_beams(topk_beams, next_topk)[0].tolist()

        # f. finished hypotheses
        top_num_beam_mask = torch.arange(beams_to_keep) < nb
        just_finished = hits & top_num_beam_mask[None, :]
        candidate_scores = topk_log_probs / ((gen + 1) ** params.length_penalty)
        full = torch.all(s.is_finished, dim=-1, keepdim=True) & (params.early_stopping is True)
        candidate_scores += full.to(torch.float32) * NEG
        candidate_scores += (~s.improvable).to(torch.float32) * NEG
        candidate_scores += (~just_finished) * NEG
        merged_scores = torch.cat((s.scores, candidate_scores), dim=1)
        best = torch.topk(merged_scores, k=nb)[1]
        tokens = _gather_beams(torch.cat((s.tokens, topk_running_tokens), dim=1), best)
        scores = _gather_beams(merged_scores, best)
        indices = _gather_beams(torch.cat((s.indices, topk_running_indices), dim=1), best)
        is_finished = _gather_beams(torch.cat((s.is_finished, just_finished), dim=1), best)

        # g. early-stop heuristic and the loop condition, at cur_len + 1
        gen += 1
        if params.early_stopping == "never" and params.length_penalty > 0.0:
            best_length = params.max_new_tokens
        else:
            best_length = gen
        best_running = running_scores[:, :1] / (best_length ** params.length_penalty)
        worst_finished = torch.where(is_finished, torch.min(scores, dim=1, keepdim=True)[0], NEG)
        improvable = s.improvable & torch.any(best_running > worst_finished, dim=-1, keepdim=True)
        open_beam = not (bool(torch.all(is_finished)) and params.early_stopping is True)
        done = not (bool(torch.any(improvable)) and open_beam and not bool(torch.all(hits)))
        state = BeamState(running_tokens, running_scores, running_indices, tokens, scores, indices, is_finished,
                          improvable, gen)
        return BeamStep(state, parents, done)

    def commit(self, step: BeamStep, block_manager) -> list[Sequence]:
        """Apply a step: member j continues active member parents[j] (its blocks, shared copy-on-write,
        and its computed tokens) with its new token. Returns the members that just started running."""
        parents = [self.active[p] for p in step.parents]
        block_manager.reorder([m.seq_id for m in self.members], [p.seq_id for p in parents])
        computed = [p.num_computed_tokens for p in parents]
        gen = step.state.num_generated
        new = [m for m in self.members if m not in self.active]
        for member, tokens, num_computed in zip(self.members, step.state.running_tokens[0, :, :gen].tolist(), computed):
            member.token_ids = member.token_ids[:self.prompt_len] + tokens
            member.num_computed_tokens = num_computed
            member.num_generated = gen
            member.status = SequenceStatus.RUNNING
        self.state, self.active = step.state, list(self.members)
        return new

    def final_events(self, state: BeamState) -> list[TokenEvent]:
        """The best num_return_sequences hypotheses as token events, best first; each one's last
        event carries its score and the beam index of each of its tokens."""
        params, events = self.leader.params, []
        for j in range(self.num_return_sequences):
            indices = state.indices[0, j]
            length = int((indices >= 0).sum())
            tokens = state.tokens[0, j, :length].tolist()
            reason = "stop" if tokens[-1] in params.eos_token_ids else "length"
            for t, token in enumerate(tokens):
                last = t == length - 1
                events.append(TokenEvent(self.leader.request_id, j, token, reason if last else None,
                                         sequence_score=float(state.scores[0, j]) if last else None,
                                         beam_indices=tuple(indices[:length].tolist()) if last else None))
        return events

    def recompute_target(self, seq: Sequence) -> int:
        """How many of seq's tokens a prefill should compute: all of them before the first step (the
        leader's prompt), all but the last after it (the last is decoded with the whole group)."""
        return len(seq.token_ids) - 1 if self.started else len(seq.token_ids)


def beam_fill_value(pad_token_id: int, eos_token_ids: tuple[int, ...]) -> int:
    """transformers' output fill of beam search: `pad_token_id or eos_token_id[0]` (a pad id of 0
    falls back to the first EOS)."""
    return pad_token_id or (eos_token_ids[0] if eos_token_ids else pad_token_id)

