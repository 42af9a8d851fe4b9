"""Verification of drafted tokens (speculative decoding, gpt2_engine.speculative): which of a
sequence's k drafts d_1..d_k the target keeps, and the token that follows them.

The target scored k + 1 positions in one step: position j (0 <= j <= k) saw the sequence's tokens
followed by d_1..d_j. Its scores there go through the logits processors with that history and that
count of generated tokens (`position_states`), so they are exactly what a plain decode step would
see at that point. With p_j the target's distribution at position j (processors, then warpers) and
q_j the draft's distribution that d_{j+1} was drawn from:

- greedy: t_j = argmax p_j (through draw_tokens, so logprobs and scores are the plain step's); the
  run is t_0..t_a, where a is the first j with d_{j+1} != t_j (a = k when all match: t_k is the
  bonus token). Kept drafts equal the target's own choices, so the run is token for token what
  plain greedy decoding produces.
- sampling, the rejection rule of Leviathan et al. (2023) and Chen et al. (2023): keep d_{j+1} with
  probability min(1, p_j(d) / q_j(d)); at the first rejection draw from the residual
  r = max(0, p_j - q_j) / sum(max(0, p_j - q_j)) and stop; when all k are kept, draw the bonus from
  p_k. Each emitted token is distributed as p at its position:
      P(x) = q(x) min(1, p(x)/q(x)) + P(reject) r(x) = min(p(x), q(x)) + max(0, p(x) - q(x)) = p(x),
  because P(reject) = 1 - sum_y min(p(y), q(y)) = sum_y max(0, p(y) - q(y)) is r's normaliser.
  A deterministic draft (n-gram lookup) has q_j = one-hot at d_{j+1}: keep it with probability
  p_j(d), else draw from p_j without d. The uniforms and draws come from the sequence's own
  generator, so a seeded run repeats.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt2_engine.sampling import (
    SampledToken, SamplingParams, SamplingState, apply_logits_processors, draw_tokens, warp_for_sampling,
)


@dataclass(frozen=True)
class PositionState:
    """A sequence as the sampler sees it at draft position j (a SamplingState)."""
    params: SamplingParams
    token_ids: list[int]
    num_generated: int
    generator: torch.Generator | None


def position_states(state: SamplingState, drafts: list[int]) -> list[PositionState]:
    """The sequence followed by d_1..d_j, for j = 0..len(drafts)."""
    return [PositionState(state.params, state.token_ids + drafts[:j], state.num_generated + j, state.generator)
            for j in range(len(drafts) + 1)]


def sampling_probs(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """p [N, V]: the distribution a sampling step draws from (processors, warpers, softmax)."""
    scores = logits.float().clone()
    apply_logits_processors(scores, states)
    return warp_for_sampling(scores, [s.params for s in states]).softmax(-1)


def verify(logits: list[torch.Tensor], states: list[SamplingState], drafts: list[list[int]],
           draft_probs: list[torch.Tensor | None]) -> list[list[SampledToken]]:
    """Each sequence's run of tokens from its target logits [k_i + 1, V] at its k_i drafts: greedy
    sequences and those without drafts through draw_tokens (one batched call), sampled ones with
    drafts by the rejection rule against draft_probs[i] ([k_i, V], or None for a deterministic draft)."""
    runs: list[list[SampledToken] | None] = [None] * len(states)
    plain = [i for i, state in enumerate(states) if not (state.params.do_sample and drafts[i])]
    if plain:
        rows = [position_states(states[i], drafts[i]) for i in plain]
        picked = draw_tokens(torch.cat([logits[i] for i in plain]), [s for row in rows for s in row]).result()
        start = 0
        for i in plain:
            tokens, start = picked[start:start + len(drafts[i]) + 1], start + len(drafts[i]) + 1
            kept = next((j for j, d in enumerate(drafts[i]) if tokens[j].token_id != d), len(drafts[i]))
            runs[i] = tokens[:kept + 1]
    for i, state in enumerate(states):
        if runs[i] is None:
            runs[i] = [SampledToken(t) for t in rejection_sample(logits[i], state, drafts[i], draft_probs[i])]
    return runs


def rejection_sample(logits: torch.Tensor, state: SamplingState, drafts: list[int],
                     draft_probs: torch.Tensor | None) -> list[int]:
    """The emitted tokens of one sampled sequence (the rule in the module docstring)."""
    p = sampling_probs(logits, position_states(state, drafts))                              # [k + 1, V]
    generator, tokens = state.generator, []
    for j, d in enumerate(drafts):
        if draft_probs is not None:
            q = draft_probs[j]
        else:
            q = torch.zeros_like(p[j])
            q[d] = 1.0
        u = torch.rand((), generator=generator, device=p.device)
        if u * q[d] < p[j, d]:              # probability min(1, p(d) / q(d))
            tokens.append(d)
            continue
        residual = (p[j] - q).clamp_(min=0)
        # p == q leaves no residual mass; then rejection has probability 0 and only rounding got here
        tokens.append(_draw(residual if residual.sum() > 0 else p[j], generator))
        return tokens
    tokens.append(_draw(p[len(drafts)], generator))
    return tokens


def _draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(weights, 1, generator=generator))
