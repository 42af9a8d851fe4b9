"""End-to-end decode tokens/s: the engine (and its int8 weights) against the eager baseline,
transformers' generate and, when installed (extra `peers`), CTranslate2 fp32 / int8.

On a GPU: GPT-2 small shape (seeded random weights), fp16, batch 1..64, prompt 128, 128 new tokens.
On CPU (and under `--benchmark-disable` in the test suite) a small model keeps it to seconds.
Run: pytest benchmarks/test_bench_e2e.py --benchmark-json=e2e.json
"""
import statistics

import pytest
import torch

from gpt2_engine.bench import ctranslate2_peer
from gpt2_engine.api import GPT2
from gpt2_engine.bench.decode import StepClock, build_hf_model, decode_bytes_per_step, ReadBandwidth, run_eager, run_engine, run_transformers
from gpt2_engine.config import GPT2Config
from tests.conftest import DEVICE, HAS_CUDA

if HAS_CUDA:
    CONFIG, DTYPE, BATCHES, PROMPT, NEW = GPT2Config.preset("gpt2"), torch.float16, [1, 8, 32, 64], 128, 128
else:
    CONFIG = GPT2Config(vocab_size=2048, n_positions=128, n_embd=128, n_layer=2, n_head=4)
    DTYPE, BATCHES, PROMPT, NEW = torch.float32, [1, 4], 16, 8


@pytest.fixture(scope="module")
def systems():
    runtime = dict(device=DEVICE, dtype=DTYPE, max_num_batched_tokens=max(BATCHES) * PROMPT)
    engine = GPT2.from_config(CONFIG, seed=0, **runtime)
    hf = build_hf_model(engine, compiled=False)
    systems = {
        "engine": (run_engine, engine),
        "engine-int8": (run_engine, GPT2.from_config(CONFIG, seed=0, quantization="int8", **runtime)),
        "eager": (run_eager, engine.with_backend("eager")),
        "transformers": (run_transformers, hf),
    }
    if ctranslate2_peer.available():
        for q in ("float32", "int8"):
            systems[f"ctranslate2-{q}"] = (ctranslate2_peer.run_ctranslate2, ctranslate2_peer.CTranslate2Peer(hf, q, torch.device(DEVICE)))
    return systems


@pytest.fixture(scope="module")
def bandwidth():
    return ReadBandwidth(torch.device(DEVICE)).measure()


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("system", ["engine", "engine-int8", "eager", "transformers", "ctranslate2-float32", "ctranslate2-int8"])
def test_decode_tokens_per_s(benchmark, systems, bandwidth, system, batch):
    if system not in systems:
        pytest.skip("ctranslate2 (extra 'peers') is not installed")
    runner, handle = systems[system]
    prompts = torch.randint(0, CONFIG.vocab_size, (batch, PROMPT))
    clock = StepClock(torch.device(DEVICE))
    runner(handle, prompts, 2, clock)  # warm-up
    benchmark.pedantic(runner, args=(handle, prompts, NEW, clock), rounds=1, iterations=1)
    intervals = clock.step_intervals()
    assert len(intervals) == NEW - 1 or system.startswith("engine")  # one timestamp per decode step
    step = statistics.median(intervals)
    int8 = system.endswith("int8")
    roofline = batch * bandwidth * 1e9 / decode_bytes_per_step(CONFIG, DTYPE, batch, PROMPT + NEW // 2, int8=int8)
    benchmark.extra_info.update(decode_tokens_per_s=batch / step, prefill_tokens_per_s=batch * PROMPT / clock.prefill_seconds(),
                                roofline_pct=100 * batch / step / roofline, bandwidth_gb_s=bandwidth)
