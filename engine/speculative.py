"""Speculative decoding on the paged cache: a proposer drafts up to k tokens per sequence, the target
scores them all in one step, and gpt2_engine.rejection_sampling keeps the longest verified run.

    LLMEngine.step: schedule() -> speculative_step(runner, batch)   (a decode-only batch whose
        sequences ask for speculation; else the plain step runs)
      1. drafts: NgramProposer (the sequence's last n-gram looked up in its own tokens, transformers'
         prompt lookup) or DraftModelProposer (a smaller model, or the target's int8 twin, decoding
         k tokens on its own paged cache)
      2. slots: the target's block manager gives each draft a slot after the decode token's own
         (as many as the pool has: a dry pool drafts less, it never fails or preempts)
      3. one forward: each sequence's token and its drafts as k + 1 one-token rows (add_position_rows:
         the decode path, each row attending its own prefix), logits at every position
      4. verify -> Scheduler.commit_runs: the run's tokens are appended, the slots of rejected drafts
         are given back (a block emptied by that returns to the pool); prefix-cache hashes are
         registered only over committed tokens.

A step with prefill rows, beam groups or a first sample that forks return sequences runs as a plain
step (its speculative sequences then take one token), and so does one where nothing was drafted.
Draft and target share the scheduler: a preempted sequence is recomputed from its tokens in both
models, so it resumes with the same tokens.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from gpt2_engine.block_manager import BlockManager
from gpt2_engine.kv_cache import copy_blocks
from gpt2_engine.model import PagedGPT2
from gpt2_engine.model_runner import ModelRunner
from gpt2_engine.rejection_sampling import sampling_probs, verify
from gpt2_engine.sampling import SampledToken, apply_logits_processors
from gpt2_engine.scheduler import ScheduledBatch
from gpt2_engine.sequence import Sequence, SequenceStatus


class NgramProposer:
    """Prompt lookup (transformers' PromptLookupCandidateGenerator; vLLM's n-gram speculator): the
    sequence's last n tokens, for n = max_ngram_size down to 1, are searched for in its tokens
    (prompt and output); the first earlier occurrence with a continuation proposes up to k of the
    tokens that followed it. No model, no cache; its drafts are deterministic (q is one-hot)."""

    def __init__(self, max_ngram_size: int = 2):
        if not isinstance(max_ngram_size, int) or isinstance(max_ngram_size, bool) or max_ngram_size < 1:
            raise ValueError(f"max_matching_ngram_size must be a positive integer, got {max_ngram_size!r}")
        self.max_ngram_size = max_ngram_size

    def prefill(self, seqs: list[Sequence]) -> None:
        """Nothing to read ahead: the lookup reads the tokens when it drafts."""

    def propose(self, seqs: list[Sequence], ks: list[int], specs: list[Speculation]) -> tuple[list[list[int]], list[None]]:
        return [ngram_lookup(seq.token_ids, k, self.max_ngram_size) for seq, k in zip(seqs, ks)], [None] * len(seqs)


def ngram_lookup(tokens: list[int], k: int, max_ngram_size: int) -> list[int]:
    """Up to k tokens that followed the first earlier occurrence of tokens' last n-gram (longest n first)."""
    for n in range(min(max_ngram_size, len(tokens) - 1), 0, -1):
        tail = tokens[-n:]
        # windows starting at 0 .. len - n - 1: each has at least one token after it
        for start in range(len(tokens) - n):
            if tokens[start:start + n] == tail:
                return tokens[start + n:start + n + k]
    return []


class DraftModelProposer:
    """Drafts with another model on its own paged KV cache (its own block manager and pool, the
    same block size): for each sequence a shadow Sequence holds the target's tokens plus the drafts,
    and how many of them the draft's cache holds. Each call first drops the cache past the longest
    prefix still shared with the target's tokens (rejected drafts), then feeds what is missing and
    decodes k tokens in k batched forwards. Greedy sequences draft greedily (stopping early where
    the draft's probability of its token is below the request's confidence threshold, as
    transformers' assistant_confidence_threshold); sampled ones draw from the draft's distribution
    with the same processors and warpers and the sequence's generator, and report it (q). A pool
    without room for a sequence drafts nothing for it this step."""

    def __init__(self, model: PagedGPT2, *, block_size: int, num_blocks: int, max_num_seqs: int):
        self.model = model
        self.block_manager = BlockManager(num_blocks, block_size)
        self.runner = ModelRunner(model, self.block_manager, max_num_seqs=max_num_seqs, use_cuda_graphs=False)
        self.shadows: dict[int, tuple[Sequence, Sequence]] = {}   # seq_id -> (target's sequence, draft's shadow)

    def check_target(self, target: PagedGPT2) -> None:
        """The draft must read and write the target's token ids at the target's positions."""
        if self.model.config.vocab_size != target.config.vocab_size:
            raise ValueError(f"assistant_model has a vocabulary of {self.model.config.vocab_size} tokens, the model "
                             f"{target.config.vocab_size}: they must share the tokenizer")
        if self.model.config.n_positions < target.config.n_positions:
            raise ValueError(f"assistant_model's context ({self.model.config.n_positions}) is shorter than the model's "
                             f"({target.config.n_positions})")
        if self.model.device != target.device:
            raise ValueError(f"assistant_model is on {self.model.device}, the model on {target.device}")

    def prefill(self, seqs: list[Sequence]) -> None:
        """Read the prompts of sequences whose prefill the target finishes in this step, so that the
        draft's prompt work counts with the prompt's (time to first token), not with decoding."""
        self._forget_stopped()
        shadows = [self.shadows[seq.seq_id][1] for seq in seqs if self._sync(seq, 1)]
        self._forward([shadow for shadow in shadows if shadow.num_uncomputed])

    def propose(self, seqs: list[Sequence], ks: list[int],
                specs: list[Speculation]) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        self._forget_stopped()
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        ks = [self._sync(seq, k) if k > 0 else 0 for seq, k in zip(seqs, ks)]
        for r in range(max(ks, default=0)):
            active = [i for i, k in enumerate(ks) if k > r]
            if not active:
                break
            shadows = [self.shadows[seqs[i].seq_id][1] for i in active]
            logits = self._forward(shadows)
            sampled = [j for j, i in enumerate(active) if seqs[i].params.do_sample]
            if sampled:
                q = sampling_probs(logits[sampled], [shadows[j] for j in sampled])
                for row, j in enumerate(sampled):
                    draft = int(torch.multinomial(q[row], 1, generator=seqs[active[j]].generator))
                    drafts[active[j]].append(draft)
                    probs[active[j]].append(q[row])
            greedy = [j for j, i in enumerate(active) if not seqs[i].params.do_sample]
            if greedy:
                scores = logits[greedy].clone()
                apply_logits_processors(scores, [shadows[j] for j in greedy])
                confidence, picks = scores.softmax(-1).max(-1)
                for j, token, p in zip(greedy, picks.tolist(), confidence.tolist()):
                    drafts[active[j]].append(token)
                    if p < specs[active[j]].confidence_threshold:
                        ks[active[j]] = r + 1       # the draft is unsure: verify what it has
            for j, i in enumerate(active):
                shadows[j].token_ids.append(drafts[i][-1])
                shadows[j].num_generated += 1
        return drafts, [torch.stack(p) if p else None for p in probs]

    def _forward(self, shadows: list[Sequence]) -> torch.Tensor:
        """Feed each shadow's uncomputed tokens (a few as one-token rows, a prompt as a prefill chunk);
        the draft's logits [len(shadows), V] at their last ones."""
        if not shadows:
            return torch.empty(0)
        batch, last = ScheduledBatch(), []
        for shadow in shadows:
            if shadow.num_uncomputed <= MAX_POSITION_ROWS:
                add_position_rows(batch, shadow, shadow.token_ids, shadow.num_computed_tokens)
            else:
                batch.add(shadow, shadow.num_uncomputed)
            last.append(len(batch.row_seqs) - 1)
        with self.runner.on_device(), torch.inference_mode():
            step, rows, _ = self.runner.prepare_step(batch)
            logits = self.runner.model.forward(step, self.runner.kv_cache)
        for shadow in shadows:
            shadow.num_computed_tokens = len(shadow.token_ids)
        return logits[torch.tensor([rows[i] for i in last], device=logits.device)]

    def _sync(self, seq: Sequence, k: int) -> int:
        """Bring the sequence's shadow to the target's tokens (keeping the cache of the prefix they
        share) with slots for k drafts; returns how many drafts it has room for."""
        bm, entry = self.block_manager, self.shadows.get(seq.seq_id)
        if entry is None:
            if not bm.can_allocate(len(seq.token_ids)):
                return 0
            bm.allocate(seq.seq_id, len(seq.token_ids))
            # the draft model's own prefill scores nothing (the target's chunks give the prompt logprobs)
            params = dataclasses.replace(seq.params, prompt_logprobs=None)
            shadow = Sequence(seq.seq_id, seq.request_id, seq.index, [], params, seq.generator, status=SequenceStatus.RUNNING)
            self.shadows[seq.seq_id] = seq, shadow
        else:
            shadow = entry[1]
        shared = next((i for i, (a, b) in enumerate(zip(shadow.token_ids, seq.token_ids)) if a != b),
                      min(len(shadow.token_ids), len(seq.token_ids)))
        # the newest token is always fed again when it was computed (prefill in this very step):
        # drafting starts from its logits
        shadow.num_computed_tokens = min(shadow.num_computed_tokens, shared, len(seq.token_ids) - 1)
        shadow.token_ids, shadow.num_generated = list(seq.token_ids), seq.num_generated
        # the last draft is never fed: slots for the tokens and k - 1 drafts
        while bm.num_tokens[seq.seq_id] < len(seq.token_ids) + k - 1 and bm.can_append(seq.seq_id):
            bm.append(seq.seq_id)
        return min(k, bm.num_tokens[seq.seq_id] - len(seq.token_ids) + 1)

    def _forget_stopped(self) -> None:
        """Free the shadows of sequences that finished or were preempted (they recompute on readmission)."""
        for seq_id, (seq, _) in list(self.shadows.items()):
            if seq.status is not SequenceStatus.RUNNING:
                self.block_manager.free(seq_id)
                del self.shadows[seq_id]


# Up to this many uncomputed tokens of a sequence go in as one-token rows (below).
MAX_POSITION_ROWS = 16


def add_position_rows(batch: ScheduledBatch, seq: Sequence, tokens: list[int], start: int) -> None:
    """tokens[start:] of a sequence as one-token rows of the batch, row p a view of the sequence
    ending at position p. They run as decode rows: each row's K/V are written before any row's
    attention reads the cache, so row p attends positions 0..p, as a causal chunk would, while the
    step keeps the decode path (on CPU one fused call for all blocks, no gather of the cached keys). Each
    row samples, so the step returns logits at every position."""
    for p in range(start, len(tokens)):
        batch.add(dataclasses.replace(seq, token_ids=tokens[:p + 1], num_computed_tokens=p), 1)


@dataclass(frozen=True, eq=False)
class Speculation:
    """How a request drafts: the proposer, at most num_tokens drafts per step, and (draft models,
    greedy) the draft probability below which drafting stops early for the step."""
    proposer: NgramProposer | DraftModelProposer
    num_tokens: int
    confidence_threshold: float = 0.0

    def __post_init__(self):
        if not isinstance(self.num_tokens, int) or isinstance(self.num_tokens, bool) or self.num_tokens < 1:
            raise ValueError(f"the number of speculative tokens must be a positive integer, got {self.num_tokens!r}")
        if isinstance(self.confidence_threshold, bool) or not 0 <= self.confidence_threshold <= 1:
            raise ValueError(f"assistant_confidence_threshold must be in [0, 1], got {self.confidence_threshold!r}")


@dataclass
class SpeculativeStats:
    """Counters over speculative steps: drafts proposed and kept, and sequence-steps that verified
    drafts with the tokens they emitted (mean accepted length = emitted / steps, the bonus counted)."""
    drafted: int = 0
    accepted: int = 0
    steps: int = 0
    emitted: int = 0

    def add(self, drafts: list[list[int]], runs: list[list[SampledToken]]) -> None:
        for draft, run in zip(drafts, runs):
            if draft:
                self.drafted += len(draft)
                self.accepted += len(run) - 1
                self.steps += 1
                self.emitted += len(run)


def _num_drafts(seq: Sequence) -> int:
    """Drafts the sequence may verify this step: none without speculation, none where a sampled
    token must report logprobs or scores (the rejection rule reports neither), and never past the
    token before max_new_tokens (the step adds one token of its own)."""
    spec, params = seq.params.speculation, seq.params
    if spec is None or (params.do_sample and (params.logprobs is not None or params.output_scores)):
        return 0
    return min(spec.num_tokens, params.max_new_tokens - seq.num_generated - 1)


def _by_proposer(seqs: list[Sequence]) -> list[list[Sequence]]:
    """The sequences grouped by the proposer they speculate with, in order."""
    groups: dict[int, list[Sequence]] = {}
    for seq in seqs:
        groups.setdefault(id(seq.params.speculation.proposer), []).append(seq)
    return list(groups.values())


def _prefill_drafts(batch: ScheduledBatch) -> None:
    """Proposers read the prompts whose prefill ends in this step (their first sample), as the target does."""
    for group in _by_proposer([seq for seq in batch.row_seqs
                               if seq.params.speculation is not None and seq.num_generated == 0]):
        group[0].params.speculation.proposer.prefill(group)


def speculative_step(runner: ModelRunner, batch: ScheduledBatch,
                     stats: SpeculativeStats) -> list[list[SampledToken]] | None:
    """Run the batch speculatively (the module docstring), returning each sequence's run for
    Scheduler.commit_runs; None when it is not a speculative step (run it as a plain one)."""
    _prefill_drafts(batch)
    seqs = batch.seqs
    # decode-only, one draw per sequence: no prefill chunk, no beam group, no return sequences to fork
    if not (batch.draws == seqs == batch.row_seqs and all(n == 1 for n in batch.num_tokens)):
        return None
    ks = [_num_drafts(seq) for seq in seqs]
    if not any(ks):
        return None
    num_drafts = {seq.seq_id: k for seq, k in zip(seqs, ks) if k}
    proposals: dict[int, tuple[list[int], torch.Tensor | None]] = {}    # seq_id -> (drafts, q or None)
    for group in _by_proposer([seq for seq in seqs if seq.seq_id in num_drafts]):
        proposed, probs = group[0].params.speculation.proposer.propose(
            group, [num_drafts[seq.seq_id] for seq in group], [seq.params.speculation for seq in group])
        proposals.update((seq.seq_id, proposal) for seq, proposal in zip(group, zip(proposed, probs)))
    drafts = [proposals.get(seq.seq_id, ([], None))[0] for seq in seqs]
    draft_probs = [proposals.get(seq.seq_id, ([], None))[1] for seq in seqs]
    # slots after the decode token's for as many drafts as the pool holds (copy-on-write of a shared last block)
    bm, copies = runner.block_manager, list(batch.block_copies)
    for i, seq in enumerate(seqs):
        kept = 0
        while kept < len(drafts[i]) and bm.can_append(seq.seq_id):
            copies += bm.append(seq.seq_id)
            kept += 1
        drafts[i] = drafts[i][:kept]
        draft_probs[i] = draft_probs[i][:kept] if draft_probs[i] is not None and kept else None
    if not any(drafts):
        return None
    # each sequence's token and drafts as one-token rows, in batch order: logits [sum(k_i + 1), V]
    rows = ScheduledBatch()
    for seq, draft in zip(seqs, drafts):
        add_position_rows(rows, seq, seq.token_ids + draft, seq.num_computed_tokens)
    with runner.on_device(), torch.inference_mode():
        copy_blocks(runner.kv_cache, copies)
        step, _, _ = runner.prepare_step(rows)
        logits = runner.model.forward(step, runner.kv_cache)
        runs = verify(list(logits.split([1 + len(draft) for draft in drafts])), seqs, drafts, draft_probs)
    stats.add(drafts, runs)
    return runs
