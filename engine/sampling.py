"""Next-token selection, per sequence within one batch, with transformers' semantics.

Order of operations (transformers' logits processors, then its warpers when sampling):
    repetition_penalty -> no_repeat_ngram_size -> min_new_tokens (eos masked)
    -> [do_sample: temperature -> top_k -> top_p]
    -> greedy argmax, or one draw from softmax with the sequence's own torch.Generator.
Every row carries its own parameters, so one batch mixes greedy and sampled sequences, and a
sequence's draws depend only on its seed and its logits, not on what else is in the batch.

`draw_tokens` only enqueues work (on CUDA the host never waits for the device there: parameters go
up through pinned memory, draws avoid torch.multinomial's checks that read back) and enqueues the
one readback of the step's tokens and logprobs; `SampledTokens.result()` waits for that copy.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

import torch

from gpt2_engine.host_staging import Readback, upload

if TYPE_CHECKING:
    from gpt2_engine.speculative import Speculation

MAX_LOGPROBS = 20
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
    logprobs: int | None = None   # also return the sampled token's log-probability and this many top ones
    # also return each prompt token's log-probability given the tokens before it, and this many top
    # ones (computed in the prefill's chunks: PromptLogprobs events before the first token)
    prompt_logprobs: int | None = None
    no_repeat_ngram_size: int = 0  # 0 = off
    # beam search (gpt2_engine.beam_search) when num_beams > 1, with transformers' meaning of these
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False   # True, False or "never"
    # speculative decoding (gpt2_engine.speculative): who drafts, how many tokens; None = plain decoding
    speculation: Speculation | None = None

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
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int) or isinstance(
                self.prompt_logprobs, bool) or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS):
            raise ValueError(f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs!r}")
        if not isinstance(self.no_repeat_ngram_size, int) or self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be a non-negative integer, got {self.no_repeat_ngram_size!r}")
        if not isinstance(self.num_beams, int) or isinstance(self.num_beams, bool) or self.num_beams < 1:
            raise ValueError(f"num_beams must be a positive integer, got {self.num_beams!r}")
        if self.early_stopping not in (True, False, "never") or not isinstance(self.early_stopping, (bool, str)):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if isinstance(self.length_penalty, bool) or not isinstance(self.length_penalty, (int, float)):
            raise ValueError(f"length_penalty must be a number, got {self.length_penalty!r}")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("beam sampling (num_beams > 1 with do_sample=True) is not supported; use do_sample=False")
        if self.num_beams > 1 and self.logprobs is not None:
            raise ValueError("logprobs are not reported for beam search (num_beams > 1)")
        if self.num_beams > 1 and self.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs are not reported for beam search (num_beams > 1)")
        if self.num_beams > 1 and self.speculation is not None:
            raise ValueError("speculative decoding (assistant_model, prompt_lookup_num_tokens) does not combine with "
                             "beam search (num_beams > 1), as in transformers")

    @property
    def reads_token_history(self) -> bool:
        """Whether picking a token reads the sequence's earlier tokens on the host (repetition penalty,
        n-gram ban), so that a step cannot sample before the previous step's token is known."""
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0

    def for_prompt(self, row: int) -> "SamplingParams":
        """The parameters of the row-th prompt of a batch: with a seed, each prompt gets its own
        random stream (the same seed for two equal prompts must not give the same samples)."""
        if self.seed is None or row == 0:
            return self
        return dataclasses.replace(self, seed=(self.seed * _SEED_STRIDE + row) % 2**62)


@dataclass(frozen=True)
class SampledToken:
    """One drawn token. logprob / top_logprobs are log-softmax of the model's raw logits (before
    penalties and warpers, as vLLM reports them), present when the sequence asked for logprobs."""
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None
    scores: torch.Tensor | None = None     # [V] processed scores (transformers' output_scores), when asked


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
    the penalty, multiply negative ones by it. One padded [R, L] index upload for all rows."""
    rows = [row for row, state in enumerate(states) if state.params.repetition_penalty != 1.0]
    if not rows:
        return
    seen = [sorted(set(states[row].token_ids)) for row in rows]
    width = max(map(len, seen))
    # pad each row with one of its own ids: gather/scatter of a repeated id is idempotent
    device = logits.device
    index = upload([i for ids in seen for i in ids + ids[:1] * (width - len(ids))], torch.int64, device).view(-1, width)
    penalty = upload([states[row].params.repetition_penalty for row in rows], torch.float32, device)[:, None]
    rows_t = upload(rows, torch.int64, device)
    sub = logits[rows_t]
    values = sub.gather(1, index)
    sub.scatter_(1, index, torch.where(values < 0, values * penalty, values / penalty))
    logits[rows_t] = sub


def ban_repeated_ngrams(logits: torch.Tensor, states: Sequence[SamplingState]) -> None:
    """no_repeat_ngram_size n: a token that would complete an n-gram already in the sequence
    (prompt included) gets -inf, as transformers' NoRepeatNGramLogitsProcessor."""
    banned = []
    for row, state in enumerate(states):
        n, tokens = state.params.no_repeat_ngram_size, state.token_ids
        if n == 0 or len(tokens) < n:
            continue
        prefix = tuple(tokens[len(tokens) - n + 1:])
        banned += ((row, t) for t in sorted({tokens[i + n - 1] for i in range(len(tokens) - n + 1)
                                             if tuple(tokens[i:i + n - 1]) == prefix}))
    _mask(logits, banned)


def mask_early_eos(logits: torch.Tensor, states: Sequence[SamplingState]) -> None:
    """min_new_tokens: no EOS before it. EOS ids outside the vocabulary can never be drawn anyway."""
    vocab = logits.shape[-1]
    _mask(logits, [(row, e) for row, state in enumerate(states) if state.num_generated < state.params.min_new_tokens
                   for e in state.params.eos_token_ids if 0 <= e < vocab])


def _mask(logits: torch.Tensor, cells: list[tuple[int, int]]) -> None:
    """-inf at these (row, token) cells: one index upload."""
    if cells:
        index = upload([i for cell in cells for i in cell], torch.int64, logits.device).view(-1, 2)
        logits[index[:, 0], index[:, 1]] = float("-inf")


def apply_logits_processors(scores: torch.Tensor, states: Sequence[SamplingState]) -> None:
    """transformers' logits processors in their order, in place on rows [N, V] (one per state)."""
    apply_repetition_penalty(scores, states)
    ban_repeated_ngrams(scores, states)
    mask_early_eos(scores, states)


def warp_for_sampling(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus), as transformers' warpers do, on rows [R, V]
    with per-row parameters (one batched pass, no per-row launches)."""
    device, vocab = logits.device, logits.shape[-1]
    logits = logits / upload([p.temperature for p in params], torch.float32, device)[:, None]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if min(top_k) < vocab:
        kth_largest = logits.sort(dim=-1, descending=True).values.gather(1, upload(top_k, torch.int64, device)[:, None] - 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if min(p.top_p for p in params) < 1.0:
        top_p = upload([p.top_p for p in params], torch.float32, device)
        # Drop the tail whose total mass is <= 1 - top_p (ascending sort, as transformers does);
        # the most likely token always survives.
        sorted_logits, order = logits.sort(dim=-1)
        tail_mass = sorted_logits.softmax(-1).cumsum(-1)
        drop = tail_mass <= (1 - top_p)[:, None]
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def sample_next_tokens(logits: torch.Tensor, states: Sequence[SamplingState]) -> list[SampledToken]:
    """Pick one token per row of logits [N, V] (fp32), one SampledToken per state."""
    return draw_tokens(logits, states).result()


def draw_tokens(logits: torch.Tensor, states: Sequence[SamplingState]) -> "SampledTokens":
    """sample_next_tokens without waiting for the result: the draws are enqueued on logits' device."""
    if logits.shape[0] != len(states):
        raise ValueError(f"logits has {logits.shape[0]} rows for {len(states)} sequences")
    # a copy only where some row's scores are written (processors, warpers); greedy reads the logits
    writes = any(s.params.do_sample or s.params.reads_token_history or s.num_generated < s.params.min_new_tokens
                 for s in states)
    scores = logits.float().clone() if writes else logits.float()
    apply_logits_processors(scores, states)
    next_tokens = scores.argmax(-1)
    sampled = [row for row, state in enumerate(states) if state.params.do_sample]
    if sampled:
        rows = upload(sampled, torch.int64, scores.device)
        warped = warp_for_sampling(scores[rows], [states[row].params for row in sampled])
        scores[rows] = warped
        probs = warped.softmax(-1)
        # one draw per row from its own generator: a sequence's tokens depend on its seed alone
        next_tokens[rows] = torch.cat([_draw(probs[i], states[row].generator) for i, row in enumerate(sampled)])
    return SampledTokens(logits, next_tokens, scores, states)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index [1] drawn from probs [V], as torch.multinomial(probs, 1, generator=generator). On
    CUDA by that function's own algorithm (argmax of probs / q, q ~ Exp(1) from the generator),
    without its validity checks, which read values back and so wait for the device: the same draw
    from the same generator state, leaving the generator in the same state."""
    if probs.device.type != "cuda":
        return torch.multinomial(probs, 1, generator=generator)
    return exponential_race(probs, generator)


def exponential_race(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """argmax(p / q), q ~ Exp(1): index i wins with probability p_i (torch.multinomial's own draw)."""
    return (probs / torch.empty_like(probs).exponential_(1, generator=generator)).argmax(-1, keepdim=True)


def logprob_parts(log_probs: torch.Tensor, targets: torch.Tensor, width: int) -> list[torch.Tensor]:
    """For log_probs [R, V] and targets [R] on the device: each row's target's log-probability [R],
    then (width > 0) its top `width` values and token ids, flattened [R * width] each: the parts of a
    readback that `read_logprobs` splits again."""
    parts = [log_probs.gather(1, targets[:, None])[:, 0]]
    if width:
        values, ids = log_probs.topk(width, dim=-1)
        parts += [values.flatten(), ids.flatten()]
    return parts


def read_logprobs(values: list[float], rows: int, width: int) -> tuple[list[float], list[tuple[tuple[int, float], ...]]]:
    """logprob_parts of `rows` rows, read back as one list: each row's target's log-probability, and
    its top `width` (token id, log-probability) pairs."""
    chosen, top_values, top_ids = values[:rows], values[rows:rows + rows * width], values[rows + rows * width:]
    tops = [tuple((int(t), v) for t, v in zip(top_ids[r * width:(r + 1) * width], top_values[r * width:(r + 1) * width]))
            for r in range(rows)]
    return chosen, tops


class SampledTokens:
    """A step's drawn tokens on the device (`tokens` int64 [N]: async scheduling feeds them to the
    next step there), with one readback of them and of the asked-for logprobs already enqueued
    (where logprobs are asked, a single float64 vector: token ids and fp32 log-probabilities are exact in it)."""

    def __init__(self, logits: torch.Tensor, tokens: torch.Tensor, scores: torch.Tensor,
                 states: Sequence[SamplingState]):
        self.tokens, self._scores, self._states = tokens, scores, list(states)
        self._logprob_rows = [row for row, state in enumerate(states) if state.params.logprobs is not None]
        self._width = max((states[row].params.logprobs for row in self._logprob_rows), default=0)
        parts = [tokens]
        if self._logprob_rows:
            index = upload(self._logprob_rows, torch.int64, logits.device)
            log_probs = torch.log_softmax(logits[index].float(), dim=-1)
            parts += logprob_parts(log_probs, tokens[index], self._width)
        # tokens alone (no logprobs asked) are read back as they are: two tensor ops fewer on every step
        self._readback = Readback(torch.cat([part.double() for part in parts]) if len(parts) > 1 else tokens)

    def result(self) -> list[SampledToken]:
        """One SampledToken per state; waits for this step's readback only."""
        values, n = self._readback.values(), len(self._states)
        chosen, tops = read_logprobs(values[n:], len(self._logprob_rows), self._width)
        logprobs = {row: (chosen[i], tops[i][:self._states[row].params.logprobs])
                    for i, row in enumerate(self._logprob_rows)}
        return [SampledToken(int(token), *logprobs.get(row, (None, None)),
                             scores=self._scores[row] if state.params.output_scores else None)
                for row, (token, state) in enumerate(zip(values[:n], self._states))]


def generator_states(states: Sequence[SamplingState]) -> list[tuple[torch.Generator, torch.Tensor]]:
    """Snapshot of the sequences' RNG states, to undo the draws of a step that fails."""
    return [(s.generator, s.generator.get_state()) for s in states if s.generator is not None]


def restore_generators(snapshot: list[tuple[torch.Generator, torch.Tensor]]) -> None:
    for generator, state in snapshot:
        generator.set_state(state)
