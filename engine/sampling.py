"""Next-token selection, per sequence within one batch, with transformers' semantics.

Order of operations (transformers' logits processors, then its warpers when sampling):
    repetition_penalty -> min_new_tokens (eos masked) -> [do_sample: temperature -> top_k -> top_p]
    -> greedy argmax, or one draw from softmax with the sequence's own torch.Generator.
Every row carries its own parameters, so one batch mixes greedy and sampled sequences, and a
sequence's draws depend only on its seed and its logits, not on what else is in the batch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

# Distinct seeds per prompt of a batch and per return sequence: seed * stride + index (mod 2^63).
_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0             # 0 = off
    top_p: float = 1.0         # 1.0 = off
    repetition_penalty: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    seed: int | None = None    # None: drawn from torch's global RNG when the request is made
    output_scores: bool = False

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.min_new_tokens, int) or self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be a non-negative integer, got {self.min_new_tokens!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")


    def for_prompt(self, row: int) -> "SamplingParams":
        """The parameters of the row-th prompt of a batch: with a seed, each prompt gets its own
        random stream (the same seed for two equal prompts must not give the same samples)."""
        if self.seed is None or row == 0:
            return self
        return dataclasses.replace(self, seed=(self.seed * _SEED_STRIDE + row) % 2**62)


class SamplingState(Protocol):
    params: SamplingParams
    token_ids: list[int]          # prompt + generated so far
    num_generated: int
    generator: torch.Generator | None


def make_generator(params: SamplingParams, index: int, device) -> torch.Generator | None:
    """The RNG of the index-th return sequence of a request (None for greedy)."""
    if not params.do_sample:
        return None
    seed = params.seed if params.seed is not None else int(torch.randint(0, 2**31, (1,)).item())
    return torch.Generator(device=device).manual_seed((seed * _SEED_STRIDE + index) % 2**63)


def apply_repetition_penalty(logits: torch.Tensor, states: Sequence[SamplingState]) -> None:
    """transformers' rule on every token seen so far (prompt included): divide positive logits by
    the penalty, multiply negative ones by it."""
    for row, state in enumerate(states):
        penalty = state.params.repetition_penalty
        if penalty == 1.0:
            continue
        seen = torch.tensor(sorted(set(state.token_ids)), device=logits.device, dtype=torch.long)
        values = logits[row, seen]
        logits[row, seen] = torch.where(values < 0, values * penalty, values / penalty)


def mask_early_eos(logits: torch.Tensor, states: Sequence[SamplingState]) -> None:
    """min_new_tokens: no EOS before it. EOS ids outside the vocabulary can never be drawn anyway."""
    vocab = logits.shape[-1]
    for row, state in enumerate(states):
        if state.num_generated < state.params.min_new_tokens:
            eos = [e for e in state.params.eos_token_ids if 0 <= e < vocab]
            if eos:
                logits[row, eos] = float("-inf")


def warp_for_sampling(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on one row, as transformers' warpers do."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if params.top_p < 1.0:
        # Drop the tail whose total mass is <= 1 - top_p (ascending sort, as transformers does);
        # the most likely token always survives.
        sorted_logits, order = torch.sort(logits)
        tail_mass = sorted_logits.softmax(-1).cumsum(-1)
        drop = tail_mass <= 1 - params.top_p
        drop[-1] = False
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def sample_next_tokens(logits: torch.Tensor, states: Sequence[SamplingState]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pick one token per row of logits [N, V] (fp32). Returns (token ids [N] int64, processed
    scores [N, V] or None when no state asked for output_scores)."""
    if logits.shape[0] != len(states):
        raise ValueError(f"logits has {logits.shape[0]} rows for {len(states)} sequences")
    scores = logits.float().clone()
    apply_repetition_penalty(scores, states)
    mask_early_eos(scores, states)
    next_tokens = scores.argmax(-1)
    for row, state in enumerate(states):
        if state.params.do_sample:
            scores[row] = warp_for_sampling(scores[row], state.params)
            probs = scores[row].softmax(-1)
            next_tokens[row] = torch.multinomial(probs, 1, generator=state.generator)[0]
    wants_scores = any(state.params.output_scores for state in states)
    return next_tokens, (scores if wants_scores else None)
