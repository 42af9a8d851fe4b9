"""Kernel launches in one decode step of the triton backend, counted on any machine.

Triton launches are counted at `run` of triton's JITFunction (GPU) and InterpretedFunction
(TRITON_INTERPRET=1), the entry point of `kernel[grid](...)`. Torch ops that would launch a kernel on
a GPU are counted with a TorchDispatchMode: every aten op except views and allocations, outside the
Triton launches (the interpreter's own host copies are not launches) and outside the value checks
the launchers run on host tensors only (paged attention's context_lens range: on a GPU it is
skipped, being a sync). `.item()`-style reads (_local_scalar_dense) are host syncs, reported apart. Measured at n_layer = 1 and 2, the difference
is the per-layer count and the rest the fixed count: total(L) = fixed + L * per_layer.

Two regimes are measured, since the paged attention launch depends on its split count: batch 1
over a context of several K/V tiles (split-K flash-decoding, S > 1 programs per head merging in
the same launch) and a batch of short contexts (S = 1). The runtime is GPU-sized (the launchers'
132-SM heuristics), so S is what an H100 would run. In fp16, as served, the LM head's logits are
cast to fp32 (one more launch per step than in fp32).

    python -m gpt2_engine.bench.launch_count      (set TRITON_INTERPRET=1 on a machine without a GPU)
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gpt2_engine.config import GPT2Config
from gpt2_engine.llm_engine import LLMEngine
from gpt2_engine.model import PagedGPT2
from gpt2_engine.sampling import SamplingParams
from gpt2_engine.weights import random_state_dict
from gpt2_engine.kernels import paged_attention
from gpt2_engine.kernels.launch_plan import attention_splits

_aten = torch.ops.aten
NOT_LAUNCHES = {_aten.empty.memory_format, _aten.empty_strided.default, _aten.empty_like.default,
                _aten.lift_fresh.default, _aten.detach.default, _aten.alias.default, _aten._unsafe_view.default}


@dataclass(frozen=True)
class LaunchCount:
    triton: Counter      # kernel name -> launches
    torch: Counter       # aten op -> calls
    host_syncs: int
    num_splits: int      # the paged attention's split count in this step

    @property
    def total(self) -> int:
        return sum(self.triton.values()) + sum(self.torch.values())


class _TorchOpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.syncs, self.paused = Counter(), 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            if func is _aten._local_scalar_dense.default:
                self.syncs += 1
            elif func.overloadpacket is _aten.to:
                # under inference_mode a dtype conversion arrives as aten.to (a possible alias, so
                # flagged a view): it launches a copy kernel whenever it returns a new tensor
                if out is not args[0]:
                    self.ops["to"] += 1
            elif not func.is_view and func not in NOT_LAUNCHES:
                self.ops[str(func.overloadpacket.__name__)] += 1
        return out


@contextlib.contextmanager
def count_launches():
    """Counts the launches made inside the block; yields a callable giving the LaunchCount."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    triton_counts, counter = Counter(), _TorchOpCounter()
    originals = {(cls, "run"): cls.run for cls in (JITFunction, InterpretedFunction)}
    originals[(paged_attention, "_check_context_lens_values")] = paged_attention._check_context_lens_values

    def uncounted(original):   # torch ops inside are not launches of the step
        def call(*args, **kwargs):
            paused, counter.paused = counter.paused, True
            try:
                return original(*args, **kwargs)
            finally:
                counter.paused = paused
        return call

    def counting(original):
        def run(self, *args, grid, warmup, **kwargs):
            if not warmup:
                triton_counts[self.fn.__name__ if hasattr(self, "fn") else str(self)] += 1
            return uncounted(original)(self, *args, grid=grid, warmup=warmup, **kwargs)
        return run

    for (owner, name), original in originals.items():
        setattr(owner, name, counting(original) if name == "run" else uncounted(original))
    try:
        with counter:
            yield lambda num_splits: LaunchCount(Counter(triton_counts), Counter(counter.ops), counter.syncs, num_splits)
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)


def count_decode_step(config: GPT2Config, *, batch_size: int = 2, prompt_len: int = 5, backend: str = "triton",
                      device: str = "cpu", dtype: torch.dtype = torch.float32) -> LaunchCount:
    """Launches of the model forward of one decode step (batch_size sequences, after their prefill)."""
    model = PagedGPT2(config, random_state_dict(config), backend=backend, device=device, dtype=dtype)
    engine = LLMEngine(model, num_blocks=batch_size * (-(-config.n_positions // 16)), use_cuda_graphs=False)
    for i in range(batch_size):
        engine.add_request([(7 * i + j) % config.vocab_size for j in range(prompt_len + i)], SamplingParams(max_new_tokens=4))
    engine.step()                                                     # prefill
    batch = engine.scheduler.schedule()
    assert batch.block_copies == [] and all(n == 1 for n in batch.num_tokens)
    step, _, _ = engine.runner.prepare_step(batch)
    kv_cache = engine.runner.kv_cache
    block_size = kv_cache.shape[3]
    num_splits = attention_splits(step.block_tables.shape[1] * block_size, block_size)
    model.forward(step, kv_cache)   # warm-up, as before a CUDA-graph capture: one-time allocations
    with count_launches() as result:        # (arrival counters) happen here; the step is idempotent
        model.forward(step, kv_cache)
    return result(num_splits)


def per_layer_counts(config: GPT2Config, **kwargs) -> tuple[int, int, LaunchCount, LaunchCount]:
    """(launches per layer, fixed launches per step, the counts at n_layer = 1, at n_layer = 2)."""
    one, two = (count_decode_step(GPT2Config(**{**config.__dict__, "n_layer": n}), **kwargs) for n in (1, 2))
    return two.total - one.total, 2 * one.total - two.total, one, two


def per_layer_report(config: GPT2Config, **kwargs) -> str:
    per_layer, fixed, one, two = per_layer_counts(config, **kwargs)
    lines = [f"paged attention splits: {two.num_splits}"]
    for name, a, b in (("triton", one.triton, two.triton), ("torch", one.torch, two.torch)):
        layer_part = sum(b.values()) - sum(a.values())
        lines.append(f"{name}: {layer_part} per layer + {sum(a.values()) - layer_part} fixed   (n_layer=2: {dict(b)})")
    lines.append(f"host syncs: n_layer=1 {one.host_syncs}, n_layer=2 {two.host_syncs}")
    lines.append(f"all launches: {per_layer} per layer + {fixed} fixed -> GPT-2 small (12 layers): "
                 f"{12 * per_layer + fixed} (target <= 5 per layer + 3 = 63)")
    return "\n".join(lines)


REGIMES = {   # name -> count_decode_step arguments
    "batch 1, 150-token context (split-K attention)": dict(batch_size=1, prompt_len=150),
    "batch 16, short contexts (one split)": dict(batch_size=16, prompt_len=5),
}

if __name__ == "__main__":
    tiny = GPT2Config(vocab_size=211, n_positions=160, n_embd=64, n_layer=1, n_head=4)
    for regime, kwargs in REGIMES.items():
        print(f"== {regime}, fp16\n{per_layer_report(tiny, dtype=torch.float16, **kwargs)}")
