"""Prompt logprobs (SamplingParams.prompt_logprobs; the server's echo + logprobs), computed in the
engine's own steps, chunk by chunk of the prefill.

A prefill chunk [start, end) of such a sequence also takes the logits of each position p whose next
prompt token p + 1 has no delivered logprob yet (Sequence.prompt_positions_to_score); the step reads
back that token's log-softmax under the raw logits, and the top k, and the scheduler's commit turns
them into PromptLogprobs events (before the step's token events). A scored position costs an
LM-head row, a log-softmax and a top-k over the vocabulary, so the scheduler lets a step score at
most SCORED_ROWS_PER_STEP positions (beside its token budget), as many LM-head rows as a decode
step of 64 sequences: the fp32 log-probabilities of a step are [<= 64, V] (13 MB for GPT-2's
vocabulary) whatever the prompts or the concurrency, and a scoring request slows the sequences
decoding beside it as 64 more decoding sequences would, not by a whole prompt's [L, V] at once.
A recomputed prefill (after a preemption) scores only what was not delivered.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt2_engine.host_staging import Readback, upload
from gpt2_engine.sampling import logprob_parts, read_logprobs
from gpt2_engine.sequence import PromptLogprobs, Sequence

SCORED_ROWS_PER_STEP = 64


@dataclass(frozen=True)
class ScoredChunk:
    """Rows of one sequence's chunk that score prompt tokens first_token .. first_token + count - 1."""
    seq: Sequence
    first_token: int
    count: int


class PromptScores:
    """A step's prompt logprobs on the device, their readback already enqueued (as SampledTokens):
    `logits` rows `rows` score the tokens `targets`, in the order of `chunks`."""

    def __init__(self, logits: torch.Tensor, rows: list[int], targets: list[int], chunks: list[ScoredChunk]):
        self.chunks = chunks
        self._width = max(chunk.seq.params.prompt_logprobs for chunk in chunks)
        self._num_rows = len(rows)
        log_probs = torch.log_softmax(logits[upload(rows, torch.int64, logits.device)].float(), dim=-1)
        parts = logprob_parts(log_probs, upload(targets, torch.int64, logits.device), self._width)
        # one float64 vector: fp32 log-probabilities and token ids are exact in it
        self._readback = Readback(torch.cat([part.double() for part in parts]))

    def events(self) -> list[PromptLogprobs]:
        """One event per chunk (waits for this step's readback only)."""
        chosen, tops = read_logprobs(self._readback.values(), self._num_rows, self._width)
        events, row = [], 0
        for chunk in self.chunks:
            k, end = chunk.seq.params.prompt_logprobs, row + chunk.count
            events.append(PromptLogprobs(chunk.seq.request_id, chunk.seq.index, chunk.first_token,
                                         tuple(chosen[row:end]), tuple(top[:k] for top in tops[row:end])))
            row = end
        return events
