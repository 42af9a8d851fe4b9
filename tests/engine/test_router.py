"""The request router and the faults users hit: inference_mode around every entry point, streams
dropped unread, exceptions (Ctrl-C included) in consumers and inside a step, generators restored
after a failed draw, abort freeing blocks at once."""
import gc
import threading
import time

import pytest
import torch

import gpt2_engine
import gpt2_engine.sampling as sampling
import gpt2_engine.scheduler as scheduler_module
from gpt2_engine.llm_engine import LLMEngine, StepError
from gpt2_engine.model import PagedGPT2
from gpt2_engine.router import MAX_STEP_FAILURES
from gpt2_engine.sampling import SamplingParams
from gpt2_engine.weights import load_hf_model_state
from tests.engine.tiny_models import tiny_hf_model

SAMPLED = dict(max_new_tokens=8, do_sample=True, top_k=20, seed=11)


def _model(backend="torch", **runtime):
    return gpt2_engine.GPT2.from_hf(tiny_hf_model(seed=21), backend=backend, **runtime)


def _assert_idle(model):
    assert model.router.wait_idle(timeout=30), "requests still live"
    stats = model.stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0 and stats["num_requests"] == 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


MODE_CASES = [(backend, mode) for backend in ("eager", "torch", "triton") for mode in (torch.inference_mode, torch.no_grad)
              if (backend, mode) != ("triton", torch.no_grad)]   # the interpreter is slow: triton takes the stricter mode


@pytest.mark.parametrize("backend,mode", MODE_CASES, ids=[f"{b}-{m.__name__}" for b, m in MODE_CASES])
def test_every_entry_point_works_inside_inference_mode_and_no_grad(backend, mode):
    model = _model(backend)
    model.tokenizer = _byte_tokenizer()
    ids = torch.randint(0, 101, (2, 4))
    expected = model.generate(ids, max_new_tokens=3)
    expected_logits = model(ids)
    with mode():
        assert torch.equal(model.generate(ids, max_new_tokens=3), expected)
        assert torch.equal(model(ids), expected_logits)
        text = model.generate_text("ab", max_new_tokens=3)[0]
        assert "".join(model.stream("ab", max_new_tokens=3)) == text


def test_a_stream_dropped_unread_frees_its_request():
    model = _model(num_blocks=64, block_size=4)
    model.tokenizer = _byte_tokenizer()
    for _ in range(500):
        model.stream("ab", max_new_tokens=20)       # created and dropped at once, never iterated
    gc.collect()
    _assert_idle(model)
    assert model.stats()["tokens_generated"] < 500 * 20   # they were aborted, not run to the end


def test_close_and_leaving_early_free_the_blocks_at_once():
    model = _model(num_blocks=64, block_size=4)
    stream = model.router.add([1, 2, 3, 4, 5], SamplingParams(max_new_tokens=40))
    next(stream)
    stream.close()
    stats = model.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["num_requests"] == 0
    model.tokenizer = _byte_tokenizer()
    for _piece in model.stream("abc", max_new_tokens=40):
        break
    _assert_idle(model)


class Boom(Exception):
    pass


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_an_exception_in_a_consumer_callback_touches_only_its_request(error):
    model = _model()
    ids = torch.randint(0, 101, (1, 5))
    other_prompt = [3, 1, 4, 1, 5]
    solo = model.generate(torch.tensor([other_prompt]), **SAMPLED)[0, 5:].tolist()
    other = model.router.add(other_prompt, SamplingParams(max_new_tokens=8, do_sample=True, top_k=20, seed=11))

    class FailingStreamer:
        def __init__(self):
            self.calls = 0

        def put(self, value):
            self.calls += 1
            if self.calls == 3:          # the prompt, then two tokens, then it fails
                raise error("consumer failed")

        def end(self):
            pass

    with pytest.raises(error):
        model.generate(ids, max_new_tokens=30, streamer=FailingStreamer())
    assert [event.token_id for event in other] == solo
    _assert_idle(model)


def test_an_exception_between_sampling_and_delivery_loses_no_token(monkeypatch):
    model = _model()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    solo = [model.generate(torch.tensor([p]), **SAMPLED)[0, len(p):].tolist() for p in prompts]
    real_postprocess = scheduler_module.Scheduler.postprocess
    calls = {"n": 0}

    def failing_postprocess(self, batch, sampled, prompt_scores=None):
        calls["n"] += 1
        if calls["n"] in (3, 5):         # after the tokens were drawn, before anything is delivered
            raise KeyboardInterrupt("injected")
        return real_postprocess(self, batch, sampled, prompt_scores)

    params = SamplingParams(max_new_tokens=8, do_sample=True, top_k=20, seed=11)
    streams = [model.router.add(p, params) for p in prompts]
    monkeypatch.setattr(scheduler_module.Scheduler, "postprocess", failing_postprocess)
    results = _consume_in_threads(streams)
    assert calls["n"] > 5 and results == solo
    _assert_idle(model)


def test_a_failed_draw_restores_the_generators_of_those_that_already_drew(monkeypatch):
    model = _model()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    solo = [model.generate(torch.tensor([p]), **SAMPLED)[0, len(p):].tolist() for p in prompts]
    real_multinomial = torch.multinomial
    draws = {"n": 0}

    def flaky_multinomial(*args, **kwargs):
        draws["n"] += 1
        if draws["n"] == 8:              # some step's draw, possibly after others of that step drew
            raise RuntimeError("injected draw failure")
        return real_multinomial(*args, **kwargs)

    params = SamplingParams(max_new_tokens=8, do_sample=True, top_k=20, seed=11)
    monkeypatch.setattr(sampling.torch, "multinomial", flaky_multinomial)
    streams = [model.router.add(p, params) for p in prompts]
    assert _consume_in_threads(streams) == solo and draws["n"] > 8
    _assert_idle(model)


def test_engine_step_is_all_or_nothing(monkeypatch):
    config, state = load_hf_model_state(tiny_hf_model(seed=21))
    paged = PagedGPT2(config, state, backend="torch")
    params = SamplingParams(max_new_tokens=6, do_sample=True, seed=3)

    def run(fail_at=None):
        llm = LLMEngine(paged, num_blocks=32, block_size=4)
        ids = [llm.add_request([1 + i, 2, 3], params) for i in range(3)]
        tokens, steps = {rid: [] for rid in ids}, 0
        while llm.has_unfinished_requests():
            steps += 1
            if steps == fail_at:
                real = sampling.torch.multinomial
                monkeypatch.setattr(sampling.torch, "multinomial", _fail_on_call(2, real))
                with pytest.raises(StepError) as info:
                    llm.step()
                monkeypatch.setattr(sampling.torch, "multinomial", real)
                assert info.value.request_ids == set(ids)
                continue
            for event in llm.step():
                tokens[event.request_id].append(event.token_id)
        return list(tokens.values())

    assert run(fail_at=3) == run()


def test_a_step_that_keeps_failing_ends_its_requests_with_the_error(monkeypatch):
    model = _model()
    ok = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4)

    def always_fails(self, batch, sampled, prompt_scores=None):
        raise RuntimeError("broken step")

    monkeypatch.setattr(scheduler_module.Scheduler, "postprocess", always_fails)
    with pytest.raises(StepError, match="broken step"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4)
    monkeypatch.undo()
    _assert_idle(model)
    assert MAX_STEP_FAILURES >= 2
    assert torch.equal(model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4), ok)   # the engine goes on


def test_async_consumers_and_shutdown():
    import asyncio

    model = _model()
    solo = model.generate(torch.tensor([[4, 5, 6]]), max_new_tokens=6)[0, 3:].tolist()

    async def gather_all():
        async def one(s):
            return [event.token_id async for event in s]
        streams = [model.router.add([4, 5, 6], SamplingParams(max_new_tokens=6)) for _ in range(4)]
        return await asyncio.gather(*(one(s) for s in streams))

    assert asyncio.run(gather_all()) == [solo] * 4
    pending = model.router.add([4, 5, 6], SamplingParams(max_new_tokens=40))
    model.router.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        list(pending)
    with pytest.raises(RuntimeError, match="shut down"):
        model.router.add([1], SamplingParams(max_new_tokens=1))


# ---- helpers ---------------------------------------------------------------------------------------

def _consume_in_threads(streams, timeout=60):
    """Each stream's token ids, consumed in its own thread; fails rather than hangs."""
    results = [None] * len(streams)

    def work(i):
        results[i] = [event.token_id for event in streams[i]]

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a consumer is still waiting"
    return results


def _fail_on_call(n, real):
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("injected")
        return real(*args, **kwargs)
    return wrapper


def _byte_tokenizer():
    """One token per byte: text of bytes below 101 ("a".."d") fits the tiny model's vocabulary."""
    import tiktoken

    ranks = {bytes([i]): i for i in range(256)}
    return tiktoken.Encoding("bytes", pat_str=r".", mergeable_ranks=ranks, special_tokens={})



def test_a_waiting_client_gets_the_engine_before_the_next_step(monkeypatch):
    """A client (stats here; add, abort and shutdown take the engine the same way) that waits for the
    engine while a step runs gets it before the loop's next step. With a plain lock the stepping
    thread retook it at once, step after step, and such calls could wait until the requests ended
    (seen as a server shutdown that never came within its grace time)."""
    model = gpt2_engine.GPT2.from_hf(tiny_hf_model(seed=21, n_positions=1024), backend="torch")
    engine = model.router.engine
    order, in_step, release = [], threading.Event(), threading.Event()
    real_step = engine.step

    def step():
        order.append("step")
        if len(order) == 3:       # the third step holds the engine until the client waits for it
            in_step.set()
            release.wait(30)
        return real_step()

    monkeypatch.setattr(engine, "step", step)
    stream = model.router.add([1, 2, 3], SamplingParams(max_new_tokens=1000))     # no EOS: 1000 steps
    assert in_step.wait(30)
    client = threading.Thread(target=lambda: order.append(("stats", model.router.stats()["num_requests"])))
    client.start()
    time.sleep(0.2)               # the client is now blocked on the engine
    release.set()
    client.join(30)
    stream.close()
    assert order[:4] == ["step", "step", "step", ("stats", 1)]
    _assert_idle(model)
