"""Runs one scheduled batch on the model: owns the KV cache, applies copy-on-write block copies,
packs the step's tokens, replays CUDA graphs for decode-only steps, and samples.

    launch(batch): block copies -> pack (prefill chunks first, then one-token decode rows) ->
                   forward (or graph replay) -> logits of the sampling rows -> one token per drawing
                   sequence (a request's first sample draws for all its return sequences), one
                   proposed BeamStep per beam group from its members' rows (gpt2_engine.beam_search),
                   and the prompt logprobs its prefill chunks score (gpt2_engine.prompt_logprobs)

`launch` only enqueues work on the device (on CUDA its inputs go up through pinned buffers without
waiting, and its tokens' readback is enqueued behind the sampling; beam proposals excepted, which
read back), so the engine can launch the next step before reading this one's tokens: that step's
pending tokens are then gathered on the device from this step's token tensor (pack_step's pending_*).
"""
from __future__ import annotations

import contextlib
import logging

import torch

from gpt2_engine.batch_invariant import batch_invariant_model
from gpt2_engine.beam_search import BeamStep
from gpt2_engine.block_manager import BlockManager
from gpt2_engine.host_staging import staging_for, upload
from gpt2_engine.kv_cache import allocate_kv_cache, copy_blocks
from gpt2_engine.model import PagedGPT2, StepInputs, pack_step
from gpt2_engine.persistent_decode import check_decode_kernel
from gpt2_engine.prompt_logprobs import PromptScores, ScoredChunk
from gpt2_engine.sampling import SampledToken, SampledTokens, draw_tokens
from gpt2_engine.scheduler import ScheduledBatch
from gpt2_engine.sequence import Sequence

PENDING_TOKEN = 0    # a pending token's stand-in in the packed host ids (pack_step puts the drawn one there on the device)

log = logging.getLogger(__name__)


class LaunchedStep:
    """A step enqueued on the device whose outcomes are not read back yet. `tokens` (int64 [D] on
    the device, None without token draws) holds the tokens of its sequences' draws (the beam
    groups' excepted), the draw of sequence s in row `token_rows[s.seq_id]`."""

    def __init__(self, batch: ScheduledBatch, sampled: SampledTokens | None, token_draws: list[int],
                 beam_steps: dict[int, BeamStep], prompt_scores: PromptScores | None = None):
        self.num_draws, self.token_draws, self.beam_steps = len(batch.draws), token_draws, beam_steps
        self.prompt_scores = prompt_scores      # the prompt logprobs its chunks score, if any
        self._sampled = sampled
        self.tokens = sampled.tokens if sampled is not None else None
        self.token_rows = {batch.draws[i].seq_id: row for row, i in enumerate(token_draws)}

    def outcomes(self) -> list[SampledToken | BeamStep]:
        """One outcome for each of batch.draws (reads the tokens back: waits for this step only)."""
        outcomes: list[SampledToken | BeamStep | None] = [None] * self.num_draws
        for i, token in zip(self.token_draws, self._sampled.result() if self._sampled is not None else []):
            outcomes[i] = token
        for i, step in self.beam_steps.items():
            outcomes[i] = step
        return outcomes


class ModelRunner:
    def __init__(self, model: PagedGPT2, block_manager: BlockManager, *, max_num_seqs: int,
                 use_cuda_graphs: bool | None = None, batch_invariant: bool = False, decode_kernel: str = "graphs"):
        cfg = model.config
        # batch-invariant mode: fixed-shape GEMMs and one attention path for every row (gpt2_engine.batch_invariant)
        self.batch_invariant = batch_invariant
        self.model = batch_invariant_model(model) if batch_invariant else model
        self.block_manager = block_manager      # read here (tables, slots); written by the scheduler
        self.staging = staging_for(model.device)     # pinned input buffers on CUDA, else None
        self.kv_cache = allocate_kv_cache(cfg, block_manager.num_blocks, block_manager.block_size, model.dtype,
                                          model.device)
        if use_cuda_graphs is None:
            use_cuda_graphs = model.device.type == "cuda" and model.backend == "triton" and not batch_invariant
        # decode_kernel "persistent": decode-only steps of <= 16 rows as one launch (gpt2_engine.persistent_decode)
        self.persistent, self._told_fallback = None, False
        if check_decode_kernel(decode_kernel) == "persistent":
            from gpt2_engine.persistent_decode import PersistentDecode
            with self.on_device():
                self.persistent = PersistentDecode(model, self.kv_cache, block_manager.block_size)
        self.graphs = None
        if use_cuda_graphs:
            from gpt2_engine.cuda_graphs import DecodeGraphs
            with self.on_device():
                self.graphs = DecodeGraphs(model, self.kv_cache, max_num_seqs,
                                           -(-cfg.n_positions // block_manager.block_size))

    def on_device(self):
        """Triton launches on the current CUDA device: make it the model's (e.g. cuda:1)."""
        return torch.cuda.device(self.model.device) if self.model.device.type == "cuda" else contextlib.nullcontext()

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, previous: LaunchedStep | None = None) -> LaunchedStep:
        """Enqueue the step; `previous` is the launched step whose tokens are pending in this one."""
        with self.on_device():
            copy_blocks(self.kv_cache, batch.block_copies)
            step, sampler_rows, scoring = self.prepare_step(batch, previous)
            if self.persistent is not None and self.persistent.covers(step):
                logits = self.persistent.run(step)
            elif self.graphs is not None and step.num_prefill_tokens == 0 and step.logits_indices is None:
                logits = self.graphs.run(step)
            else:
                logits = self.model.forward(step, self.kv_cache)
            if self.persistent is not None and step.num_prefill_tokens == 0 and not self.persistent.covers(step) \
                    and not self._told_fallback:
                self._told_fallback = True
                log.info("persistent decode covers decode-only steps of <= %d rows; this one (%d rows) and others "
                         "it does not cover run the multi-launch path", self.persistent.max_rows,
                         step.context_lens.shape[0] if step.context_lens is not None else 0)
            # sequences' draws: one batched sampling call on the device; beam groups: a proposal each
            token_draws = [i for i, draw in enumerate(batch.draws) if isinstance(draw, Sequence)]
            sampled = None
            if token_draws:
                rows = [sampler_rows[batch.draw_rows[i][0]] for i in token_draws]   # a sequence's draw reads one row
                picked = logits if rows == list(range(logits.shape[0])) else logits[upload(rows, torch.int64, logits.device)]
                sampled = draw_tokens(picked, [batch.draws[i] for i in token_draws])
            beam_steps = {i: draw.propose(logits[[sampler_rows[r] for r in batch.draw_rows[i]]])
                          for i, draw in enumerate(batch.draws) if not isinstance(draw, Sequence)}
            return LaunchedStep(batch, sampled, token_draws, beam_steps,
                                PromptScores(logits, *scoring) if scoring is not None else None)

    @torch.inference_mode()
    def prompt_logits(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        with self.on_device():
            return self.model.prompt_logits(prompts)

    def prepare_step(self, batch: ScheduledBatch, previous: LaunchedStep | None = None) \
            -> tuple[StepInputs, list[int], tuple[list[int], list[int], list[ScoredChunk]] | None]:
        """The step's device inputs, prefill chunks (> 1 token) first, then the one-token rows, which
        read their context through the block table (decode attention); for each of batch.row_seqs,
        its row in the logits; and the prompt logprobs its chunks score (their logits rows after the
        sampling rows, the tokens they score, the chunks), or None. In batch-invariant mode every
        sequence's tokens are prefill rows (one attention path for all). A sequence's last token
        may be pending: drawn in `previous`, it is read from there on the device."""
        bm = self.block_manager
        as_prefill = [n > 1 or self.batch_invariant for n in batch.num_tokens]
        order = sorted(range(len(batch.seqs)), key=lambda i: not as_prefill[i])
        ids, positions, slots, logits_indices = [], [], [], []
        logits_row = {}
        cu_q, cu_k, prefill_seqs, tables, context_lens = [0], [0], [], [], []
        has_prefix, num_prefill = False, 0
        pending_rows, pending_index = [], []
        score_indices, score_targets, scored = [], [], []
        for i in order:
            seq, num_tokens = batch.seqs[i], batch.num_tokens[i]
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_tokens
            to_score = seq.prompt_positions_to_score(start, end)     # prompt positions: their tokens are on the host
            if to_score:
                score_indices += [len(ids) + p - start for p in to_score]
                score_targets += seq.token_ids[to_score.start + 1:to_score.stop + 1]
                scored.append(ScoredChunk(seq, to_score.start + 1, len(to_score)))
            ids += seq.token_ids[start:end]
            if end > len(seq.token_ids):   # its pending token: taken on the device from `previous`'s draws
                ids.append(PENDING_TOKEN)
                pending_rows.append(len(ids) - 1)
                pending_index.append(previous.token_rows[seq.seq_id])
            positions += range(start, end)
            slots += (bm.slot(seq.seq_id, p) for p in range(start, end))
            if as_prefill[i]:
                num_prefill += num_tokens
                cu_q.append(cu_q[-1] + num_tokens)
                cu_k.append(cu_k[-1] + end)
                prefill_seqs.append((seq.seq_id, end))
                has_prefix |= start > 0
            else:
                tables.append(bm.block_tables[seq.seq_id])
                context_lens.append(end)
            if end == seq.num_tokens:
                logits_row[seq.seq_id] = len(logits_indices)
                logits_indices.append(len(ids) - 1)
        scoring = None
        if scored:
            scoring = (list(range(len(logits_indices), len(logits_indices) + len(score_indices))), score_targets, scored)
            logits_indices += score_indices
        # keys of every prefill sequence read back from the cache: needed only when a chunk has a prefix
        key_slots = [bm.slot(seq_id, p) for seq_id, end in prefill_seqs for p in range(end)] if has_prefix else None
        step = pack_step(self.model.config.vocab_size, self.model.device, token_ids=ids, positions=positions,
                         num_prefill_tokens=num_prefill, slot_mapping=slots,
                         cu_seqlens_q=cu_q if num_prefill else None,
                         cu_seqlens_k=cu_k if has_prefix else None, key_slots=key_slots,
                         block_tables=tables or None, context_lens=context_lens or None,
                         logits_indices=None if not scored and len(logits_indices) == len(ids) else logits_indices,
                         staging=self.staging, pending_tokens=previous.tokens if pending_rows else None,
                         pending_rows=pending_rows, pending_index=pending_index)
        return step, [logits_row[seq.seq_id] for seq in batch.row_seqs], scoring
