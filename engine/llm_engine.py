"""The engine: requests in, one token event per sampled token out.

    step() = scheduler.schedule() -> ModelRunner.launch(batch) -> scheduler.postprocess(batch, tokens)

A decode-only step of sequences that speculate (gpt2_engine.speculative) drafts, verifies and commits
runs of tokens instead: schedule() -> speculative_step -> scheduler.commit_runs, synchronously.

A step is all or nothing: if running or committing it fails (any exception, Ctrl-C included), the
sequences' random generators are put back and the batch is rolled back (its sequences recompute
later from the tokens they had); an Exception is then raised as StepError naming the requests that
were in it (KeyboardInterrupt and SystemExit propagate unchanged). So
a retried step draws the same tokens, and no request loses or repeats a token.

Async scheduling (async_scheduling=True; the default on CUDA) keeps the device busy while the host
does its part of a step. With step n launched (ModelRunner.launch: nothing waits for the device),
step() does

    advance(n) -> schedule(n+1) -> launch(n+1) -> read back n's tokens -> commit(n) -> events of n

so the host schedules and packs step n+1, and commits step n, while the device runs steps n and
n+1; step n+1 is still in flight when step() returns. advance(n) writes what step n changes
whatever it sampled (computed tokens, and a pending token for each drawing sequence, whose
position and slot follow from the lengths alone); step n+1's input for a pending token is gathered on
the device from step n's sampled-token tensor. Memory ordering: on CUDA everything (input copies,
that gather, the forward, sampling, the readback copy) is on the model's current stream, so stream
order makes the gather read step n's tokens after they are written, and a KV block freed on the
host at commit(n) (a sequence that hit EOS at step n, whose step-(n+1) row is then discarded) is
written again only by steps launched later, after step n+1 has read it. On a CPU device each launch
has finished when it returns, so the same code runs in program order.

The result is token for token the synchronous loop's: a step is scheduled ahead only when its
structure and sampling cannot depend on the previous step's tokens (Scheduler.can_schedule_ahead:
no beam group, no first sample forking return sequences, no repetition penalty or n-gram ban,
which read the tokens on the host; and schedule(preempt=False): no preemption, whose victim could be
in flight); otherwise step() launches and commits one step, as the synchronous loop does. A failure
anywhere rolls back every step not committed yet (restoring their generators, newest first).

Not thread-safe: one thread steps it (gpt2_engine.router.RequestRouter in the API and the server).
"""
from __future__ import annotations

import dataclasses
import itertools
import torch

from gpt2_engine.beam_search import BeamGroup
from gpt2_engine.block_manager import BlockManager
from gpt2_engine.kv_cache import num_kv_blocks
from gpt2_engine.model import PagedGPT2
from gpt2_engine.model_runner import LaunchedStep, ModelRunner
from gpt2_engine.sampling import SamplingParams, generator_states, make_generator, restore_generators
from gpt2_engine.scheduler import ScheduledBatch, Scheduler
from gpt2_engine.sequence import Sequence, TokenEvent
from gpt2_engine.speculative import DraftModelProposer, Speculation, SpeculativeStats, speculative_step


@dataclasses.dataclass(frozen=True)
class CheckedRequest:
    """A request LLMEngine.check_request accepted: add_checked queues it without validating again
    (the API and the server check every prompt of a call before queueing any)."""
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    n: int


class StepError(RuntimeError):
    """A step failed and was rolled back; `request_ids` were in it (and can simply be stepped again)."""

    def __init__(self, request_ids: set[int], cause: BaseException):
        super().__init__(f"engine step failed ({type(cause).__name__}: {cause}); requests {sorted(request_ids)} rolled back")
        self.request_ids = request_ids


def _positive_int(name: str, value) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class _Step:
    """A scheduled step not committed yet: its batch, its draws' generator states before it, and its
    launch once enqueued."""

    def __init__(self, batch: ScheduledBatch):
        self.batch, self.snapshot = batch, generator_states(batch.draws)
        self.launched: LaunchedStep | None = None


class LLMEngine:
    def __init__(self, model: PagedGPT2, *, block_size: int = 16, num_blocks: int | None = None,
                 max_num_seqs: int = 256, max_num_batched_tokens: int | None = None, use_cuda_graphs: bool | None = None,
                 enable_prefix_caching: bool = True, batch_invariant: bool = False, async_scheduling: bool | None = None,
                 decode_kernel: str = "graphs", speculation: Speculation | None = None):
        self.model, cfg = model, model.config
        for name, value in (("block_size", block_size), ("max_num_seqs", max_num_seqs), ("num_blocks", num_blocks),
                            ("max_num_batched_tokens", max_num_batched_tokens)):
            _positive_int(name, value)
        if num_blocks is None:
            num_blocks = num_kv_blocks(cfg, block_size, model.dtype, model.device, max_num_seqs)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching=enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens or max(4096, cfg.n_positions))
        self.runner = ModelRunner(model, self.block_manager, max_num_seqs=max_num_seqs, use_cuda_graphs=use_cuda_graphs,
                                  batch_invariant=batch_invariant, decode_kernel=decode_kernel)
        # schedule step n+1 before step n's tokens are read back (module docstring); default: on CUDA
        self.async_scheduling = model.device.type == "cuda" if async_scheduling is None else bool(async_scheduling)
        self.in_flight: _Step | None = None     # launched by the last step(), not committed
        # speculative decoding for requests that do not choose (gpt2_engine.speculative), and its counters
        self.speculation, self.speculative_stats = speculation, SpeculativeStats()
        self.seq_ids = itertools.count()
        self.request_ids = itertools.count()
        self.num_prompt_tokens = 0

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams, n: int = 1) -> CheckedRequest:
        """The one validation of a request: what the model and pool impose (SamplingParams validated
        its own values when it was built). Raises ValueError naming the problem; queues nothing."""
        prompt = tuple(prompt_token_ids)
        if params.speculation is None and self.speculation is not None and params.num_beams == 1:
            params = dataclasses.replace(params, speculation=self.speculation)
        self.model.config.check_prompt(prompt, params.max_new_tokens)
        _positive_int("n (num_return_sequences)", n)
        if n > self.scheduler.max_num_seqs:
            raise ValueError(f"n (num_return_sequences) = {n} exceeds max_num_seqs = {self.scheduler.max_num_seqs}")
        sched = self.scheduler
        if params.num_beams > 1 and not n <= params.num_beams <= min(sched.max_num_seqs, sched.max_num_batched_tokens):
            raise ValueError(f"beam search needs num_return_sequences ({n}) <= num_beams ({params.num_beams}) <= "
                             f"max_num_seqs ({sched.max_num_seqs}) and max_num_batched_tokens "
                             f"({sched.max_num_batched_tokens}): its beams decode in one step")
        # the K/V of the last generated token are never written, so a sequence holds at most this many
        # (times num_beams for a beam group: its beams may each end up with private blocks)
        needed = params.num_beams * self.block_manager.blocks_for(len(prompt) + params.max_new_tokens - 1)
        if needed > self.block_manager.num_blocks:
            raise ValueError(f"request needs {needed} KV blocks but the pool has only {self.block_manager.num_blocks}; "
                             f"raise num_blocks or shorten the prompt / max_new_tokens")
        return CheckedRequest(prompt, params, n)

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, *, n: int = 1) -> int:
        """Check and queue one request; its id."""
        return self.add_checked(self.check_request(prompt_token_ids, params, n))

    def add_checked(self, request: CheckedRequest) -> int:
        """Queue a request check_request returned (it is not validated again); its id."""
        request_id = next(self.request_ids)
        params, n = request.params, request.n
        seqs = [Sequence(next(self.seq_ids), request_id, i, list(request.prompt_token_ids), params,
                         make_generator(params, i, self.model.device)) for i in range(max(n, params.num_beams))]
        if params.num_beams > 1:
            BeamGroup(seqs, n)      # scheduled as one unit through its leader, seqs[0]
        else:
            seqs[0].forks = seqs[1:]
        self.scheduler.add(seqs[0])
        self.num_prompt_tokens += len(request.prompt_token_ids)
        return request_id

    def draft_proposer(self, draft: PagedGPT2) -> DraftModelProposer:
        """A proposer drafting with `draft` for this engine's requests: its own pool of as many blocks."""
        proposer = DraftModelProposer(draft, block_size=self.block_manager.block_size,
                                      num_blocks=self.block_manager.num_blocks, max_num_seqs=self.scheduler.max_num_seqs)
        proposer.check_target(self.model)
        return proposer

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def abort_request(self, request_id: int) -> None:
        """End the request now; its KV blocks are free when this returns."""
        self.scheduler.abort(request_id)

    def prompt_logits(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        for prompt in prompts:
            self.model.config.check_prompt(prompt)
        return self.runner.prompt_logits(prompts)

    def stats(self) -> dict[str, int]:
        bm, sched = self.block_manager, self.scheduler
        return {"num_running": len(sched.running), "num_waiting": len(sched.waiting),
                "kv_blocks_free": bm.num_free_blocks, "kv_blocks_total": bm.num_blocks,
                "num_preemptions": sched.num_preemptions, "tokens_generated": sched.num_generated_tokens,
                "prompt_tokens": self.num_prompt_tokens,
                "prefix_cache_queries": bm.prefix_cache.queries if bm.prefix_cache else 0,
                "prefix_cache_hits": bm.prefix_cache.hits if bm.prefix_cache else 0,
                "spec_draft_tokens": self.speculative_stats.drafted, "spec_accepted_tokens": self.speculative_stats.accepted}

    def step(self) -> list[TokenEvent]:
        """Run a step and return its events (async scheduling: commit the step in flight, leaving
        the next one in flight; the first call may return none)."""
        current, self.in_flight = self.in_flight, None
        if current is None:
            batch = self.scheduler.schedule()
            if not batch.seqs:
                if self.scheduler.has_unfinished():
                    raise RuntimeError("the scheduler can run none of its unfinished sequences (check max_num_batched_tokens)")
                return []
            current = _Step(batch)
        uncommitted = [current]
        try:
            if current.launched is None:
                runs = speculative_step(self.runner, current.batch, self.speculative_stats)
                if runs is not None:
                    return self.scheduler.commit_runs(current.batch, runs)
            if current.launched is None:
                current.launched = self.runner.launch(current.batch)
            if not (self.async_scheduling and self.scheduler.can_schedule_ahead(current.batch)):
                return self.scheduler.postprocess(current.batch, current.launched.outcomes(),
                                                  current.launched.prompt_scores)
            self.scheduler.advance(current.batch)
            batch = self.scheduler.schedule(preempt=False)     # None: commit first, then preempt
            if batch is not None and batch.seqs:
                uncommitted.append(_Step(batch))
                uncommitted[1].launched = self.runner.launch(batch, previous=current.launched)
            events = self.scheduler.commit(current.batch, current.launched.outcomes(), current.launched.prompt_scores)
        except BaseException as exc:
            for step in reversed(uncommitted):
                restore_generators(step.snapshot)
            for step in uncommitted:
                self.scheduler.rollback(step.batch)
            if not isinstance(exc, Exception):   # Ctrl-C and exits stay what they are
                raise
            raise StepError({seq.request_id for step in uncommitted for seq in step.batch.seqs}, exc) from exc
        self.in_flight = uncommitted[1] if len(uncommitted) > 1 else None
        return events
