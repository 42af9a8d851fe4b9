"""The serving loop: requests in, one token event per sampled token out.

step(): scheduler.schedule() -> pack the step's tokens (prefill chunks first, then decode tokens) ->
copy-on-write block copies -> model forward -> sample for the sequences whose computed tokens reach
the end of their token_ids -> append, finish, free, emit. A request with n > 1 return sequences is
prefilled once; when it first samples, n - 1 children fork its blocks (copy-on-write) and every
sequence draws its own first token from the same logits with its own generator.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import torch

from engine.block_manager import BlockManager, allocate_kv_cache, copy_blocks, num_kv_blocks
from engine.model import PagedGPT2, StepInputs, pack_step
from engine.sampling import SamplingParams, make_generator, sample_next_tokens
from engine.scheduler import ScheduledBatch, Scheduler, Sequence, SequenceStatus


@dataclass(frozen=True)
class TokenEvent:
    request_id: int
    index: int                          # which return sequence of the request
    token_id: int
    scores: torch.Tensor | None         # [V] processed scores (HF output_scores), when asked for
    finished: bool


class LLMEngine:
    def __init__(self, model: PagedGPT2, *, block_size: int = 16, num_blocks: int | None = None,
                 max_num_seqs: int = 256, max_num_batched_tokens: int | None = None, use_cuda_graphs: bool | None = None):
        self.model, cfg = model, model.config
        for name, value in (("block_size", block_size), ("max_num_seqs", max_num_seqs), ("num_blocks", num_blocks),
                            ("max_num_batched_tokens", max_num_batched_tokens)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if num_blocks is None:
            num_blocks = num_kv_blocks(cfg, block_size, model.dtype, model.device, max_num_seqs)
        self.kv_cache = allocate_kv_cache(cfg, num_blocks, block_size, model.dtype, model.device)
        self.block_manager = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens or max(4096, cfg.n_positions))
        self.seq_ids = itertools.count()
        self.request_ids = itertools.count()
        if use_cuda_graphs is None:
            use_cuda_graphs = model.device.type == "cuda" and model.backend == "triton"
        self.graphs = None
        if use_cuda_graphs:
            from engine.cuda_graphs import DecodeGraphs
            with self._on_device():
                self.graphs = DecodeGraphs(model, self.kv_cache, max_num_seqs, -(-cfg.n_positions // block_size))

    def _validate(self, prompt_token_ids: list[int], max_new_tokens: int = 0) -> None:
        cfg = self.model.config
        if len(prompt_token_ids) == 0:
            raise ValueError("prompt is empty: give at least one token id")
        bad = [t for t in prompt_token_ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is out of range [0, {cfg.vocab_size})")
        if len(prompt_token_ids) + max_new_tokens > cfg.n_positions:
            raise ValueError(f"prompt length {len(prompt_token_ids)} + max_new_tokens {max_new_tokens} exceeds "
                             f"the model's n_positions {cfg.n_positions}")

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, *, n: int = 1) -> int:
        prompt = [int(t) for t in prompt_token_ids]
        self._validate(prompt, params.max_new_tokens)
        if n < 1:
            raise ValueError(f"n (num_return_sequences) must be >= 1, got {n}")
        # the K/V of the last generated token are never written, so a sequence holds at most this many
        needed = self.block_manager.blocks_for(len(prompt) + params.max_new_tokens - 1)
        if needed > self.block_manager.num_blocks:
            raise ValueError(f"request needs {needed} KV blocks but the pool has only {self.block_manager.num_blocks}; "
                             f"raise num_blocks or shorten the prompt / max_new_tokens")
        if n > self.scheduler.max_num_seqs:
            raise ValueError(f"n (num_return_sequences) = {n} exceeds max_num_seqs = {self.scheduler.max_num_seqs}")
        request_id = next(self.request_ids)
        seqs = [Sequence(next(self.seq_ids), request_id, i, list(prompt), len(prompt), params,
                         make_generator(params, i, self.model.device)) for i in range(n)]
        seqs[0].forks = seqs[1:]
        self.scheduler.add(seqs[0])
        return request_id

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def abort_request(self, request_id: int) -> None:
        self.scheduler.abort(request_id)

    def prompt_logits(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        for prompt in prompts:
            self._validate(prompt)
        with self._on_device():
            return self.model.prompt_logits(prompts)

    def step(self) -> list[TokenEvent]:
        batch, copies = self.scheduler.schedule()
        if not batch.seqs:
            if self.scheduler.has_unfinished():
                raise RuntimeError("the scheduler can run none of its unfinished sequences (check max_num_batched_tokens)")
            return []
        try:
            with self._on_device():
                copy_blocks(self.kv_cache, copies)
                step, samplers = self.prepare_step(batch)
                decode_only = step.num_prefill_tokens == 0 and step.logits_indices is None
                if self.graphs is not None and decode_only:
                    logits = self.graphs.run(step)
                else:
                    logits = self.model.forward(step, self.kv_cache)
                states, rows = self._sampling_states(samplers)
                tokens, scores = sample_next_tokens(logits[rows] if len(rows) > len(samplers) else logits, states)
        except BaseException:
            # Nothing of this step is kept: its sequences give back their blocks and are recomputed
            # later with the tokens they had, so an error (or Ctrl-C) never strands a request.
            for seq in batch.seqs:
                if seq.status == SequenceStatus.RUNNING:
                    self.scheduler.preempt(seq)
            raise
        for seq, num_tokens in zip(batch.seqs, batch.num_tokens):
            seq.num_computed_tokens += num_tokens
        return self._commit(samplers, states, tokens, scores)

    def _on_device(self):
        """Triton launches on the current CUDA device: make it the model's (e.g. cuda:1)."""
        return torch.cuda.device(self.model.device) if self.model.device.type == "cuda" else contextlib.nullcontext()

    def prepare_step(self, batch: ScheduledBatch) -> tuple[StepInputs, list[Sequence]]:
        """Host lists of the step, prefill chunks (> 1 token) first, then the one-token rows, which
        read their context through the block table (decode attention)."""
        bm = self.block_manager
        items = sorted(zip(batch.seqs, batch.num_tokens), key=lambda item: item[1] == 1)
        ids, positions, slots, logits_indices, samplers = [], [], [], [], []
        cu_q, cu_k, prefill_seqs, tables, context_lens = [0], [0], [], [], []
        has_prefix, num_prefill = False, 0
        for seq, num_tokens in items:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_tokens
            ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += (bm.slot(seq.seq_id, p) for p in range(start, end))
            if num_tokens > 1:
                num_prefill += num_tokens
                cu_q.append(cu_q[-1] + num_tokens)
                cu_k.append(cu_k[-1] + end)
                prefill_seqs.append((seq.seq_id, end))
                has_prefix |= start > 0
            else:
                tables.append(bm.block_tables[seq.seq_id])
                context_lens.append(end)
            if end == len(seq.token_ids):
                logits_indices.append(len(ids) - 1)
                samplers.append(seq)
        # keys of every prefill sequence read back from the cache: needed only when a chunk has a prefix
        key_slots = [bm.slot(seq_id, p) for seq_id, end in prefill_seqs for p in range(end)] if has_prefix else None
        step = pack_step(self.model.config.vocab_size, self.model.device, token_ids=ids, positions=positions,
                         num_prefill_tokens=num_prefill, slot_mapping=slots,
                         cu_seqlens_q=cu_q if num_prefill else None,
                         cu_seqlens_k=cu_k if has_prefix else None, key_slots=key_slots,
                         block_tables=tables or None, context_lens=context_lens or None,
                         logits_indices=None if len(logits_indices) == len(ids) else logits_indices)
        return step, samplers

    @staticmethod
    def _sampling_states(samplers: list[Sequence]) -> tuple[list[Sequence], list[int]]:
        """The sequences that draw a token this step and their logits rows: a request's first sample
        also draws for its other return sequences (not yet forked), from the same row."""
        rows, states = [], []
        for row, seq in enumerate(samplers):
            for member in (seq, *seq.forks):
                rows.append(row)
                states.append(member)
        return states, rows

    def _commit(self, samplers: list[Sequence], states: list[Sequence], tokens: torch.Tensor, scores) -> list[TokenEvent]:
        """Fork the first-sampled requests' children (copy-on-write), append the tokens, finish."""
        for seq in samplers:
            for child in seq.forks:
                self.scheduler.admit_fork(seq, child)
            seq.forks = []
        events = []
        for row, (seq, token) in enumerate(zip(states, tokens.tolist())):
            seq.token_ids.append(token)
            seq.num_generated += 1
            if token in seq.params.eos_token_ids:
                self.scheduler.finish(seq, "stop")
            elif seq.num_generated >= seq.params.max_new_tokens:
                self.scheduler.finish(seq, "length")
            events.append(TokenEvent(seq.request_id, seq.index, token,
                                     scores[row] if scores is not None and seq.params.output_scores else None,
                                     seq.finish_reason is not None))
        return events
