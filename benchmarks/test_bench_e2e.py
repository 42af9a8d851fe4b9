"""End-to-end decode tokens/s: the engine against the eager baseline and transformers' generate.

On a GPU: GPT-2 small shape (seeded random weights), fp16, batch 1..64, prompt 128, 128 new tokens.
On CPU (and under `--benchmark-disable` in the test suite) a small model keeps it to seconds.
Run: pytest benchmarks/test_bench_e2e.py --benchmark-json=e2e.json
"""
import statistics

import pytest
import torch

from engine.api import GPT2
from engine.bench import StepClock, build_hf_model, decode_bytes_per_step, measure_bandwidth, run_eager, run_engine, run_transformers
from engine.config import GPT2Config
from tests.conftest import DEVICE, HAS_CUDA

if HAS_CUDA:
    CONFIG, DTYPE, BATCHES, PROMPT, NEW = GPT2Config.preset("gpt2"), torch.float16, [1, 8, 32, 64], 128, 128
else:
    CONFIG = GPT2Config(vocab_size=2048, n_positions=128, n_embd=128, n_layer=2, n_head=4)
    DTYPE, BATCHES, PROMPT, NEW = torch.float32, [1, 4], 16, 8


@pytest.fixture(scope="module")
def systems():
    engine = GPT2.from_config(CONFIG, seed=0, device=DEVICE, dtype=DTYPE, max_num_batched_tokens=max(BATCHES) * PROMPT)
    return {
        "engine": (run_engine, engine),
        "eager": (run_eager, engine.with_backend("eager")),
        "transformers": (run_transformers, build_hf_model(engine, compiled=False)),
    }


@pytest.fixture(scope="module")
def bandwidth():
    return measure_bandwidth(torch.device(DEVICE), megabytes=64)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("system", ["engine", "eager", "transformers"])
def test_decode_tokens_per_s(benchmark, systems, bandwidth, system, batch):
    runner, handle = systems[system]
    prompts = torch.randint(0, CONFIG.vocab_size, (batch, PROMPT))
    clock = StepClock(torch.device(DEVICE))
    runner(handle, prompts, 2, clock)  # warm-up
    benchmark.pedantic(runner, args=(handle, prompts, NEW, clock), rounds=1, iterations=1)
    intervals = clock.step_intervals()
    assert len(intervals) == NEW - 1 or system == "engine"  # one timestamp per decode step
    step = statistics.median(intervals)
    roofline = batch * bandwidth * 1e9 / decode_bytes_per_step(CONFIG, DTYPE, batch, PROMPT + NEW // 2)
    benchmark.extra_info.update(decode_tokens_per_s=batch / step, prefill_tokens_per_s=batch * PROMPT / clock.prefill_seconds(),
                                roofline_pct=100 * batch / step / roofline, bandwidth_gb_s=bandwidth)
