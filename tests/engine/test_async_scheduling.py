"""Async scheduling (step n+1 scheduled and launched before step n's tokens are read back) gives the
synchronous loop's tokens, token for token, on the runtime backends (torch, triton; eager has no
engine): greedy and seeded sampling with logprobs, mixed prompt lengths, requests ending at
different steps (max_new_tokens, EOS), arrivals while others run, the steps that must fall back
(return-sequence forks, repetition penalty, beam search), preemption, abort mid-flight and failed
steps. On CPU the device is synchronous, but the placeholder tokens, their gather from the previous
step's token tensor and the discarded rows of sequences that ended are the same code as on CUDA;
each test checks that steps really were scheduled ahead."""
from typing import NamedTuple

import pytest
import torch

from gpt2_engine.host_staging import Readback, staging_for
from gpt2_engine.llm_engine import LLMEngine, StepError
from gpt2_engine.model import PagedGPT2
from gpt2_engine.model_runner import ModelRunner
from gpt2_engine.sampling import SampledTokens, SamplingParams, exponential_race
from gpt2_engine.weights import load_hf_model_state
from tests.engine.tiny_models import tiny_hf_model

SAMPLED = dict(do_sample=True, top_k=30, top_p=0.9, temperature=0.8, logprobs=2)
# (arrival step, prompt, params, n): mixed lengths, ends at different steps, late arrivals, and
# requests whose steps cannot be scheduled ahead (n > 1 fork, repetition penalty, beams)
REQUESTS = [
    (0, [5, 7, 9, 11, 3, 2, 1], SamplingParams(max_new_tokens=9), 1),
    (0, [40, 41], SamplingParams(max_new_tokens=4, seed=3, **SAMPLED), 1),
    (0, [8] * 19 + [50, 60, 70], SamplingParams(max_new_tokens=12, seed=5, min_new_tokens=3, **SAMPLED), 1),
    (2, [90], SamplingParams(max_new_tokens=7), 1),
    (3, [12, 13, 14], SamplingParams(max_new_tokens=5, seed=7, **SAMPLED), 2),
    (5, [20, 21, 22, 23], SamplingParams(max_new_tokens=5, repetition_penalty=1.5), 1),
    (6, [30, 31], SamplingParams(max_new_tokens=3, num_beams=2), 1),
    (7, [60, 61, 62], SamplingParams(max_new_tokens=6, seed=9, **SAMPLED), 1),
]


@pytest.fixture(scope="module")
def weights():
    return load_hf_model_state(tiny_hf_model(seed=21))


@pytest.fixture(scope="module")
def models(weights):
    """backend -> a PagedGPT2 of the tiny model, built once (the CPU path probes its GEMMs)."""
    built = {}

    def get(backend):
        if backend not in built:
            built[backend] = PagedGPT2(*weights, backend=backend)
        return built[backend]
    return get


def with_eos(requests, eos):
    return [(t, p, SamplingParams(**{**params.__dict__, "eos_token_ids": eos}), n) for t, p, params, n in requests]


class Run(NamedTuple):
    tokens: dict        # (request, index) -> token ids
    logprobs: dict      # (request, index) -> [(logprob, top logprobs)] of its tokens
    reasons: dict       # (request, index) -> finish reason
    ahead: int          # steps launched on top of one in flight
    preemptions: int


def run(model, requests, *, async_scheduling, aborts=None, num_blocks=64) -> Run:
    """Drive an engine: requests are added before their arrival step, request i of aborts[step] is
    aborted before that step; a failed step (StepError, or Ctrl-C inside it) is stepped again, as
    the router does."""
    engine = LLMEngine(model, block_size=4, num_blocks=num_blocks, async_scheduling=async_scheduling)
    ahead, launch = [0], engine.runner.launch

    def counting_launch(batch, previous=None):
        ahead[0] += previous is not None
        return launch(batch, previous)

    engine.runner.launch = counting_launch
    ids, tokens, logprobs, reasons, step = {}, {}, {}, {}, 0
    while step <= max(t for t, *_ in requests) or engine.has_unfinished_requests():
        for i, (arrival, prompt, params, n) in enumerate(requests):
            if arrival == step:
                ids[engine.add_request(prompt, params, n=n)] = i
        for i in (aborts or {}).get(step, ()):
            engine.abort_request(next(rid for rid, j in ids.items() if j == i))
        try:
            events = engine.step()
        except (StepError, KeyboardInterrupt):
            events = []
        for event in events:
            key = (ids[event.request_id], event.index)
            tokens.setdefault(key, []).append(event.token_id)
            logprobs.setdefault(key, []).append((event.logprob, event.top_logprobs))
            if event.finished:
                reasons[key] = event.finish_reason
        step += 1
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return Run(tokens, logprobs, reasons, ahead[0], engine.stats()["num_preemptions"])


def assert_same_logprobs(run, expected):
    """The same top ids; values equal up to rounding (a step's rows may share it with other rows
    than in the synchronous loop: a sequence that ended is in the next step, its row discarded)."""
    assert run.logprobs.keys() == expected.logprobs.keys()
    for key, values in expected.logprobs.items():
        for (logprob, top), (want, want_top) in zip(run.logprobs[key], values, strict=True):
            assert (logprob is None) == (want is None) and [i for i, _ in top or ()] == [i for i, _ in want_top or ()]
            if want is not None:
                assert [logprob, *(v for _, v in top)] == pytest.approx([want, *(v for _, v in want_top)], abs=1e-5)


def eos_of(model, requests):
    """An EOS id that ends request 0 after a few tokens (a token its greedy run draws third)."""
    return (run(model, requests[:1], async_scheduling=False).tokens[(0, 0)][2],)


@pytest.mark.parametrize("backend, num_requests", [("torch", len(REQUESTS)), ("triton", 5)])   # (the interpreter is slow)
def test_async_loop_matches_the_synchronous_loop(models, backend, num_requests):
    requests = with_eos(REQUESTS[:num_requests], eos_of(models("torch"), REQUESTS))
    model = models(backend)
    sync, overlapped = (run(model, requests, async_scheduling=mode) for mode in (False, True))
    assert sync.ahead == 0 and overlapped.ahead > 4
    assert {"stop", "length"} <= set(overlapped.reasons.values())
    assert len(overlapped.reasons) == sum(n for *_, n in requests)
    assert overlapped.tokens == sync.tokens and overlapped.reasons == sync.reasons
    assert_same_logprobs(overlapped, sync)


def test_preemption_falls_back_and_keeps_the_tokens(models):
    model = models("torch")
    requests = [(i // 2, [3 + i] * (3 + 2 * i), SamplingParams(max_new_tokens=10, seed=i, **SAMPLED), 1) for i in range(5)]
    roomy = run(model, requests, async_scheduling=False)
    sync, overlapped = (run(model, requests, async_scheduling=mode, num_blocks=14) for mode in (False, True))
    assert sync.preemptions > 0 and overlapped.preemptions > 0 and overlapped.ahead > 5
    assert sync.tokens == overlapped.tokens == roomy.tokens


def test_abort_mid_flight_delivers_a_prefix_and_frees_the_blocks(models):
    model = models("torch")
    requests = with_eos(REQUESTS[:4], ())
    full = run(model, requests, async_scheduling=False).tokens
    aborted = run(model, requests, async_scheduling=True, aborts={3: [0]})     # while its step is in flight
    tokens = aborted.tokens
    assert aborted.ahead > 3 and (0, 0) not in aborted.reasons
    assert 0 < len(tokens[(0, 0)]) < len(full[(0, 0)]) and tokens[(0, 0)] == full[(0, 0)][:len(tokens[(0, 0)])]
    assert {key: value for key, value in tokens.items() if key != (0, 0)} == {k: v for k, v in full.items() if k != (0, 0)}


@pytest.mark.parametrize("where", ["overlapped launch", "readback", "ctrl-c"])
def test_a_failed_step_rolls_back_both_steps_and_loses_no_token(models, monkeypatch, where):
    model = models("torch")
    requests = [(t, p, params, 1) for t, p, params, _ in REQUESTS[:4]]
    expected = run(model, requests, async_scheduling=False)
    calls = {"n": 0}
    if where == "overlapped launch":
        real_launch = ModelRunner.launch

        def launch(self, batch, previous=None):
            calls["n"] += previous is not None
            if previous is not None and calls["n"] in (2, 5):
                raise RuntimeError("injected launch failure")
            return real_launch(self, batch, previous)

        monkeypatch.setattr(ModelRunner, "launch", launch)
    else:
        real_result = SampledTokens.result

        def result(self):
            calls["n"] += 1
            if calls["n"] in (3, 6):
                raise KeyboardInterrupt("injected") if where == "ctrl-c" else RuntimeError("injected readback failure")
            return real_result(self)

        monkeypatch.setattr(SampledTokens, "result", result)
    overlapped = run(model, requests, async_scheduling=True)
    assert calls["n"] > 6 and overlapped.ahead > 3
    assert (overlapped.tokens, overlapped.reasons) == (expected.tokens, expected.reasons)


def test_a_step_reads_its_tokens_back_once(models, monkeypatch):
    """Outside the forward (whose CPU reference kernels read shapes back), an overlapped step reads
    from tensors once: its previous step's tokens and logprobs, in one copy."""
    model = models("torch")
    engine = LLMEngine(model, block_size=4, num_blocks=64, async_scheduling=True)
    for i, (_, prompt, params, _) in enumerate(REQUESTS[:3]):
        engine.add_request(prompt, params)
    engine.step()
    reads, in_forward, real_forward = [], [False], PagedGPT2.forward

    def forward(self, *args):
        in_forward[0] = True
        try:
            return real_forward(self, *args)
        finally:
            in_forward[0] = False

    def counted(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args):
            if not in_forward[0]:
                reads.append(name)
            return real(self, *args)
        return read

    monkeypatch.setattr(PagedGPT2, "forward", forward)
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    for _ in range(3):
        reads.clear()
        assert len(engine.step()) == 3 and engine.in_flight is not None
        assert reads == ["tolist"]


def test_exponential_race_is_multinomials_draw():
    """The draw used on CUDA (no host sync) is torch.multinomial's, from the same generator state."""
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for i in range(200):
        probs = torch.rand(64) ** (1 + i % 9)
        probs[1:: 2 + i % 5] = 0
        probs /= probs.sum()
        assert torch.equal(torch.multinomial(probs, 1, generator=g1), exponential_race(probs, g2))
    assert torch.equal(g1.get_state(), g2.get_state())


@pytest.mark.cuda
def test_async_loop_matches_the_synchronous_loop_on_cuda(weights):
    """triton on the GPU: pinned non-blocking inputs, CUDA graphs for decode-only steps, the
    device-side placeholder gather and the one readback per step, against the synchronous loop."""
    model = PagedGPT2(*weights, backend="triton", device="cuda")
    requests = with_eos(REQUESTS, eos_of(model, REQUESTS))
    sync = run(model, requests, async_scheduling=False)
    overlapped = run(model, requests, async_scheduling=None)     # the default on CUDA: async
    # how many steps go ahead depends on the tokens the device's generator draws (when requests end,
    # which of them fork or fall back): the CPU tests pin the count, this one that overlap happened
    assert overlapped.ahead > 0
    assert (overlapped.tokens, overlapped.reasons) == (sync.tokens, sync.reasons)
    assert_same_logprobs(overlapped, sync)
    probs = torch.rand(1000, device="cuda").softmax(-1)
    g1, g2 = (torch.Generator(device="cuda").manual_seed(3) for _ in range(2))
    draws = [(torch.multinomial(probs, 1, generator=g1), exponential_race(probs, g2)) for _ in range(50)]
    assert all(torch.equal(a, b) for a, b in draws)


@pytest.mark.cuda
def test_pinned_staging_and_readback_on_cuda():
    staging = staging_for(torch.device("cuda"))
    first = staging.upload(list(range(5000)), torch.int64)     # grows the buffer
    second = staging.upload([7] * 10, torch.int64)             # reuses it once the first copy has run
    assert first.cpu().tolist() == list(range(5000)) and second.cpu().tolist() == [7] * 10
    assert Readback(first[:3] * 2).values() == [0, 2, 4]
