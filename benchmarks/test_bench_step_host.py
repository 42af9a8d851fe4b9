"""Host time of a whole decode step of GPT-2 small on the triton backend: schedule + pack + every
launcher call + sampling bookkeeping + postprocess (LLMEngine.step()).

On CPU the kernel bodies are stubbed out (Triton's interpreter would run them), so the figure is the
step's own Python plus the few torch ops it runs itself (embedding, argmax over the logits), i.e. an
upper bound on what the host spends per step before a GPU would see the work. On a GPU the real
kernels run and the figure is the full step, device time included (with async scheduling, the
default there, a step() call commits one step and launches the next). Goal: <= 2 ms at batch 1 and
<= 8 ms at batch 256 on the host side.

At batch 256 most of the CPU figure is tensor work a GPU would do: converting and reducing the
[256, 50257] logits (fp16 -> fp32, argmax). The "bookkeeping" cases run the same step with a
512-token vocabulary, which leaves the host's own work (schedule, pack, launcher calls, sampling
and postprocess bookkeeping) and makes that tensor work negligible; their difference from the
full-vocabulary case is the tensor work.
"""
import dataclasses

import pytest
import torch

from benchmarks.conftest import HAS_CUDA
from benchmarks.test_bench_launch_host import stubbed  # noqa: F401  (the kernel-stubbing fixture)
from gpt2_engine.config import GPT2Config
from gpt2_engine.llm_engine import LLMEngine
from gpt2_engine.model import PagedGPT2
from gpt2_engine.sampling import SamplingParams
from gpt2_engine.weights import random_state_dict


@pytest.mark.parametrize("batch, vocab", [(1, None), (1, 512), (256, None), (256, 512)],
                         ids=["1", "1-bookkeeping", "256", "256-bookkeeping"])
def test_bench_decode_step_host_time(benchmark, stubbed, batch, vocab):   # noqa: F811
    benchmark.group = "decode-step" + ("" if HAS_CUDA else " host time (kernels stubbed, interpreter)")
    config = GPT2Config.preset("gpt2")
    if vocab is not None:
        config = dataclasses.replace(config, vocab_size=vocab)
    model = PagedGPT2(config, random_state_dict(config), backend="triton", device=stubbed, dtype=torch.float16)
    rounds = 10
    engine = LLMEngine(model, block_size=16, num_blocks=batch * 3, max_num_seqs=batch, use_cuda_graphs=False)
    for i in range(batch):
        engine.add_request([(i * 7 + j) % config.vocab_size for j in range(8)], SamplingParams(max_new_tokens=rounds + 3))
    engine.step()          # prefill of every sequence
    engine.step()          # first decode step: plans cached
    steps = []

    def decode_step():
        steps.append(engine.step())

    benchmark.pedantic(decode_step, rounds=rounds, iterations=1)   # one round when benchmarks are disabled
    assert all(len(events) == batch for events in steps)
    assert all(len(seq.token_ids) == 8 + 2 + len(steps) for seq in engine.scheduler.running)
