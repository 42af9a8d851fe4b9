"""The OpenAI-compatible server as a real uvicorn process, driven by the official `openai` client
and httpx; every answer is compared with the same model run in-process."""
from __future__ import annotations

import asyncio
import json
import math
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
import torch

from tests.conftest import require_modules

require_modules("openai", "fastapi", "uvicorn", "pydantic")

import openai  # noqa: E402

from gpt2_engine import GPT2
from gpt2_engine.bench import serve as bench_serve
from gpt2_engine.server.choices import token_string
from tests.server.conftest import MODEL_NAME, ServerProcess, half_sent_connection, metric

PROMPTS = ["The quick brown fox", "Once upon a time", "Hello, my name is", "In 1492,", "def main():"]


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=60, max_retries=0) as c:
        yield c


def generated_ids(model, prompt: str, max_new_tokens: int) -> list[int]:
    """The greedy continuation's token ids in-process (EOS included, padding after it dropped)."""
    ids = torch.tensor([model.tokenizer.encode(prompt)])
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1]:].tolist()
    eos = model.config.eos_token_id
    return out[:out.index(eos) + 1] if eos in out else out


def test_completion_equals_in_process_greedy(client, model):
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    tokens = generated_ids(model, PROMPTS[0], 12)
    choice = response.choices[0]
    assert choice.text == model.generate_text(PROMPTS[0], max_new_tokens=12)[0]
    assert choice.finish_reason == ("length" if len(tokens) == 12 and tokens[-1] != model.config.eos_token_id else "stop")
    assert response.usage.prompt_tokens == len(model.tokenizer.encode(PROMPTS[0]))
    assert response.usage.completion_tokens == len(tokens)
    assert response.usage.total_tokens == response.usage.prompt_tokens + len(tokens)
    assert response.model == MODEL_NAME and response.object == "text_completion"


def test_stream_joins_to_the_plain_completion(client):
    plain = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == plain.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_prompt_list_with_n_and_seed_equals_in_process_batch(client, model):
    prompts, n = PROMPTS[:2], 3
    options = dict(max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9, top_k=0, seed=7, num_return_sequences=n)
    expected = model.generate_text(prompts, **options)
    response = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=8, temperature=0.8, top_p=0.9,
                                         seed=7, n=n)
    assert [c.index for c in response.choices] == list(range(len(prompts) * n))
    assert [c.text for c in response.choices] == expected
    assert len(set(expected[:n])) > 1           # the n sequences of a prompt are distinct draws
    assert response.usage.prompt_tokens == sum(len(model.tokenizer.encode(p)) for p in prompts)
    token_prompts = [model.tokenizer.encode(p) for p in prompts]   # the same prompts as token ids
    again = client.completions.create(model=MODEL_NAME, prompt=token_prompts, max_tokens=8, temperature=0.8,
                                      top_p=0.9, seed=7, n=n)
    assert [c.text for c in again.choices] == expected


def test_stop_string_spanning_tokens_is_cut_and_ends_the_choice(client, model):
    tokens = generated_ids(model, PROMPTS[2], 16)
    pieces = [model.tokenizer.decode([t]) for t in tokens]
    full = "".join(pieces)
    # a stop string made of the end of token 3 and the start of token 4
    boundary = len("".join(pieces[:4]))
    stop = full[boundary - 2:boundary + 2]
    assert len(stop) == 4 and full.find(stop) == boundary - 2, "the test's continuation is too short"
    expected = full[:full.index(stop)]
    for stream in (False, True):
        response = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=16, temperature=0,
                                             stop=["never-there", stop], stream=stream)
        chunks = list(response) if stream else [response]
        assert "".join(c.choices[0].text for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == "stop"
        if not stream:
            assert response.usage.completion_tokens == 5      # the stop string completes in token 4 (0-based)


def _check_logprobs(model, logprobs, token_ids: list[int], shown_from: int, k: int, text: str) -> None:
    """logprobs lists token_ids[shown_from:]; each token after the first of token_ids has the model's
    logprob given the tokens before it, and its top-k."""
    tokenizer = model.tokenizer
    log_probs = torch.log_softmax(model(torch.tensor([token_ids]))[0].float(), dim=-1)
    shown = token_ids[shown_from:]
    assert logprobs.tokens == [tokenizer.decode([t]) for t in shown]
    for entry, i in enumerate(range(max(shown_from, 1), len(token_ids)), max(shown_from, 1) - shown_from):
        assert math.isclose(logprobs.token_logprobs[entry], log_probs[i - 1, token_ids[i]].item(), abs_tol=1e-3)
        top = logprobs.top_logprobs[entry]
        expected = [token_string(tokenizer, t) for t in log_probs[i - 1].topk(k).indices.tolist()]
        expected += [] if logprobs.tokens[entry] in expected else [logprobs.tokens[entry]]   # the chosen one too
        assert list(top) == expected
        assert max(top.values()) >= logprobs.token_logprobs[entry] - 1e-3
    assert logprobs.text_offset == [len(tokenizer.decode(shown[:i])) for i in range(len(shown))]
    assert "".join(logprobs.tokens) == text


def _greedy_ids(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The greedy continuation in-process, EOS not stopping it (the requests send ignore_eos)."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def test_logprobs_match_the_model(client, model):
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[3], max_tokens=6, temperature=0, logprobs=3,
                                         extra_body={"ignore_eos": True})
    prompt = model.tokenizer.encode(PROMPTS[3])
    choice = response.choices[0]
    # without echo the offsets count from the start of the completion
    _check_logprobs(model, choice.logprobs, prompt + _greedy_ids(model, prompt, 6), len(prompt), 3, choice.text)


def test_echo_prepends_the_prompt_and_its_logprobs(client, model):
    prompt = model.tokenizer.encode(PROMPTS[4])
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[4], max_tokens=4, temperature=0, echo=True,
                                         logprobs=2, extra_body={"ignore_eos": True})
    gen = _greedy_ids(model, prompt, 4)
    choice = response.choices[0]
    assert choice.text == PROMPTS[4] + model.tokenizer.decode(gen)
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    _check_logprobs(model, choice.logprobs, prompt + gen, 0, 2, choice.text)


def test_concurrent_streaming_clients_each_equal_their_solo_run(server, model):
    num_clients = 32

    async def one(c, i):
        stream = await c.completions.create(model=MODEL_NAME, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=12,
                                            temperature=1.0, seed=100 + i, stream=True)
        return "".join([chunk.choices[0].text async for chunk in stream])

    async def all_clients():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0) as c:
            return await asyncio.gather(*(one(c, i) for i in range(num_clients)))

    texts = asyncio.run(asyncio.wait_for(all_clients(), 180))
    for i, text in enumerate(texts):
        solo = model.generate_text(PROMPTS[i % len(PROMPTS)], max_new_tokens=12, do_sample=True, temperature=1.0,
                                   top_k=0, seed=100 + i)[0]
        assert text == solo, f"client {i}"


def test_disconnect_mid_stream_frees_the_blocks(server):
    body = {"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{server.url}/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            assert metric(server.url, "gpt2_engine_kv_blocks_used") > 0
        # leaving the block closed the connection mid-stream
    deadline = time.monotonic() + 10
    while metric(server.url, "gpt2_engine_kv_blocks_used") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server.url, "gpt2_engine_kv_blocks_used") == 0
    assert metric(server.url, "gpt2_engine_num_requests_running") == 0
    assert metric(server.url, "gpt2_engine_generation_tokens_total") < 900 * 2
    assert metric(server.url, "gpt2_engine_kv_blocks_total") > 0
    assert metric(server.url, "gpt2_engine_time_to_first_token_seconds_count") > 0
    assert metric(server.url, "gpt2_engine_inter_token_latency_seconds_count") > 0


@pytest.mark.parametrize("options, param", [
    ({"temperature": -1.0}, "temperature"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 2000}, "max_tokens"),
    ({"logprobs": 6}, "logprobs"),
    ({"extra_body": {"best_of": 2}}, "best_of"), ({"suffix": "x"}, "suffix"), ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"), ({"logit_bias": {"1": 2}}, "logit_bias"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"extra_body": {"no_such_option": 1}}, "no_such_option"),
    ({"prompt": [[1, 2, 60000]]}, "prompt"), ({"prompt": ""}, "prompt"), ({"n": 0}, "n"),
    ({"n": 65}, "n"), ({"prompt": ["hello world"] * 4000}, "prompt"), ({"extra_body": {"ignore_eos": "yes"}}, "ignore_eos"),
    ({"max_tokens": True}, "max_tokens"), ({"prompt": [1.0, 2.0]}, "prompt"),
])
def test_bad_parameters_are_400_naming_them(client, options, param):
    kwargs = {"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": 4} | options
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**kwargs)
    error = info.value.body
    assert info.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == param and param in error["message"]
    assert "n (n)" not in error["message"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert info.value.body["code"] == "model_not_found"


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    health = httpx.get(f"{server.url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["kv_blocks_total"] > 0


def test_bench_serve_reports_every_level(server, tmp_path, capsys):
    code = bench_serve.main(["--url", server.url, "--num-prompts", "4", "--concurrency", "1", "2", "--input-len", "8",
                             "--output-len", "6", "--out", str(tmp_path)])
    assert code == 0
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [(r["concurrency"], r["completed"], r["total_output_tokens"]) for r in rows] == [(1, 4, 24), (2, 4, 24)]
    assert all(r["p99_ttft_ms"] >= r["p50_ttft_ms"] > 0 for r in rows)
    assert "out tok/s" in (tmp_path / "results.md").read_text()
    captured = capsys.readouterr()
    assert f"wrote {tmp_path / 'results.json'}, {tmp_path / 'results.md'}" in captured.out
    assert "concurrency 2: 100%" in captured.err and "4/4" in captured.err      # the progress bar of each level


@pytest.fixture(scope="module")
def guarded_server(checkpoint):
    """One running slot, no queue, an API key: for the 401 and 429 answers."""
    process = ServerProcess("--model", str(checkpoint), "--max-num-seqs", "1", "--max-queue", "0", "--api-key", "sk-test")
    yield process
    process.stop()


def test_api_key_is_required(guarded_server):
    with openai.OpenAI(base_url=f"{guarded_server.url}/v1", api_key="wrong", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError):
            c.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2)
    body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}
    response = httpx.post(f"{guarded_server.url}/v1/completions", json=body, timeout=30)   # no key at all
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with openai.OpenAI(base_url=f"{guarded_server.url}/v1", api_key="sk-test", max_retries=0) as c:
        assert c.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2).usage.completion_tokens >= 1


def test_full_queue_is_429(guarded_server):
    with openai.OpenAI(base_url=f"{guarded_server.url}/v1", api_key="sk-test", max_retries=0, timeout=60) as c:
        long = c.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=900, stream=True, extra_body={"ignore_eos": True})
        next(iter(long))                      # it holds the one running slot now
        with pytest.raises(openai.RateLimitError) as info:
            c.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2)
        assert info.value.body["code"] == "queue_full"
        long.close()


def _refused(url: str) -> bool:
    """No new request is served: the connection is refused, or (in the moment the listener closes) the
    kernel had already accepted it and the server closes it without a response (a clean close, or a
    reset when the backlog's socket is dropped)."""
    try:
        httpx.get(f"{url}/health", timeout=5)
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
        return True
    return False


def test_sigterm_finishes_running_requests_and_exits_0(checkpoint):
    process = ServerProcess("--model", str(checkpoint))
    body = {"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": 900, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    try:
        with httpx.Client(timeout=60) as http:
            streams = [http.stream("POST", f"{process.url}/v1/completions", json=body) for _ in range(4)]
            lines = [s.__enter__().iter_lines() for s in streams]
            for it in lines:                       # every request is running
                next(line for line in it if line.startswith("data: "))
            process.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10       # new connections are refused while they run on
            while not _refused(process.url) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _refused(process.url)
            assert process.proc.poll() is None
            for it, stream in zip(lines, streams):
                events = [line[len("data: "):] for line in it if line.startswith("data: ")]
                assert events[-1] == "[DONE]"
                assert json.loads(events[-2])["usage"]["completion_tokens"] == 900
                assert json.loads(events[-3])["choices"][0]["finish_reason"] == "length"
                stream.__exit__(None, None, None)
        assert process.proc.wait(timeout=60) == 0
    finally:
        process.stop()


def test_metrics_count_prefix_cache_reuse(client, server):
    prompt = " ".join(["alpha beta gamma delta"] * 12)      # well over two 16-token blocks
    hits = metric(server.url, "gpt2_engine_prefix_cache_hits_total")
    queries = metric(server.url, "gpt2_engine_prefix_cache_queries_total")
    for _ in range(2):
        client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2, temperature=0)
    assert metric(server.url, "gpt2_engine_prefix_cache_queries_total") > queries
    assert metric(server.url, "gpt2_engine_prefix_cache_hits_total") >= hits + 32   # the second reused full blocks


# ---- hostile or careless clients (issue 22) -------------------------------------------------------------


def _sse_events(response) -> list[str]:
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def test_body_size_limit_is_413(server):
    body = b'{"model": "%s", "prompt": "%s"}' % (MODEL_NAME.encode(), b"x" * (10 * 1024 * 1024))
    response = httpx.post(f"{server.url}/v1/completions", content=body, timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    def chunks():                 # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b"x" * (1024 * 1024)

    response = httpx.post(f"{server.url}/v1/completions", content=chunks(), timeout=30)
    assert response.status_code == 413 and response.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


@pytest.mark.parametrize("method, path, status", [("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405),
                                                  ("DELETE", "/health", 405)])
def test_unknown_routes_and_methods_answer_in_openais_shape(server, method, path, status):
    response = httpx.request(method, f"{server.url}{path}", timeout=10)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_deeply_nested_json_is_400_and_the_connection_serves_on(server):
    nested = '{"model": "%s", "prompt": %s}' % (MODEL_NAME, "[" * 3000 + "]" * 3000)
    with httpx.Client(timeout=30) as http:      # one keep-alive connection for both requests
        response = http.post(f"{server.url}/v1/completions", content=nested, headers={"content-type": "application/json"})
        assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
        assert http.post(f"{server.url}/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 1}
                         ).status_code == 200
    assert "RecursionError" not in "".join(server.output)


def test_stream_chunks_carry_usage_null_only_when_usage_is_asked(server):
    """OpenAI: with stream_options.include_usage every chunk but the last has "usage": null; without
    it, no usage field at all."""
    body = {"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": 5, "stream": True}
    for include_usage in (False, True):
        options = {"stream_options": {"include_usage": True}} if include_usage else {}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body | options, timeout=30) as response:
            chunks = [json.loads(e) for e in _sse_events(response) if e != "[DONE]"]
        if include_usage:
            assert all("usage" in c and c["usage"] is None for c in chunks[:-1]) and chunks[-1]["usage"]["total_tokens"]
        else:
            assert all("usage" not in c for c in chunks)


def test_max_tokens_0_with_echo_scores_the_prompt_only(client, model):
    prompt = model.tokenizer.encode(PROMPTS[1])
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=0, echo=True, logprobs=1)
    choice = response.choices[0]
    assert choice.text == PROMPTS[1] and choice.finish_reason == "length"
    assert response.usage.completion_tokens == 0 and response.usage.prompt_tokens == len(prompt)
    _check_logprobs(model, choice.logprobs, prompt, 0, 1, choice.text)
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=0, echo=True, logprobs=1,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == PROMPTS[1]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_logprobs_0_lists_the_chosen_token(client, model):
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[3], max_tokens=4, temperature=0, logprobs=0,
                                         extra_body={"ignore_eos": True})
    logprobs = response.choices[0].logprobs
    assert logprobs.top_logprobs == [{token: lp} for token, lp in zip(logprobs.tokens, logprobs.token_logprobs)]


def test_cancelled_requests_leave_no_noise_in_the_log(server):
    before = len(server.output)
    body = {"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": 900, "ignore_eos": True}
    for _ in range(6):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
    for _ in range(3):          # the server collects the cancelled requests' futures meanwhile
        httpx.post(f"{server.url}/v1/completions", json=body | {"max_tokens": 40}, timeout=60).raise_for_status()
    log = "".join(server.output[before:])
    assert "never retrieved" not in log and "Traceback" not in log, log


def test_never_fitting_request_is_400_not_429(guarded_server):
    body = {"model": MODEL_NAME, "prompt": ["a", "b"], "max_tokens": 2}
    response = httpx.post(f"{guarded_server.url}/v1/completions", json=body, timeout=30,
                          headers={"authorization": "Bearer sk-test"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"


def test_metrics_and_health_stay_open_with_an_api_key(guarded_server):
    """As vLLM's: --api-key guards /v1 only (documented in the README)."""
    assert httpx.get(f"{guarded_server.url}/metrics", timeout=10).status_code == 200
    assert httpx.get(f"{guarded_server.url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{guarded_server.url}/v1/models", timeout=10).status_code == 401



def test_sigterm_drain_is_bounded_and_every_accepted_request_is_answered(checkpoint):
    """--shutdown-timeout 0: the running requests are ended at once, each with an answer (an SSE
    error event, a 503), a half-sent request does not hold the exit, and the process exits 0."""
    process = ServerProcess("--model", str(checkpoint), "--shutdown-timeout", "0")
    body = {"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": 900, "ignore_eos": True}
    try:
        half = half_sent_connection(process.url)
        with httpx.Client(timeout=60) as http, \
                http.stream("POST", f"{process.url}/v1/completions", json=body | {"stream": True}) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            plain = ThreadPoolExecutor(1).submit(httpx.post, f"{process.url}/v1/completions", json=body, timeout=60)
            deadline = time.monotonic() + 30
            while http.get(f"{process.url}/health").json()["num_requests"] < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            process.proc.send_signal(signal.SIGTERM)
            events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
            assert json.loads(events[-1])["error"]["type"] == "service_unavailable"
            response = plain.result(timeout=60)
            assert response.status_code == 503 and response.json()["error"]["message"] == "the server is shutting down"
        assert process.proc.wait(timeout=60) == 0
        half.close()
    finally:
        process.stop()


def test_ctrl_c_drains_and_exits_without_a_traceback(checkpoint):
    process = ServerProcess("--model", str(checkpoint))
    try:
        httpx.post(f"{process.url}/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2},
                   timeout=30).raise_for_status()
        process.proc.send_signal(signal.SIGINT)
        assert process.proc.wait(timeout=60) == 130
        log = "".join(process.output)
        assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    finally:
        process.stop()


def test_concurrent_prompt_scoring_requests_each_get_their_own_logprobs(model):
    """Echo + logprobs is computed in the engine's steps (tests/engine/test_prompt_logprobs.py), so
    concurrent scoring requests are batched like any prompts (in-process app): each answer is its
    own prompt's."""
    from gpt2_engine.server.app import build_app

    app = build_app(model, served_model_name=MODEL_NAME)    # its lifespan (router shutdown) never runs here

    async def requests():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
            body = {"model": MODEL_NAME, "max_tokens": 0, "echo": True, "logprobs": 1}
            return await asyncio.gather(*(http.post("/v1/completions", json=body | {"prompt": p}) for p in PROMPTS))

    responses = asyncio.run(asyncio.wait_for(requests(), 120))
    for prompt, response in zip(PROMPTS, responses):
        logprobs = SimpleNamespace(**response.json()["choices"][0]["logprobs"])
        _check_logprobs(model, logprobs, model.tokenizer.encode(prompt), 0, 1, prompt)


def test_a_client_leaving_while_its_prompts_are_prepared_gets_nothing_queued(model, monkeypatch):
    """A request of 64 prompts is still being prepared (each checked) when its client leaves: none of
    its prompts may be queued (in-process app, driven through ASGI with a client that disconnects)."""
    from gpt2_engine.server.app import build_app

    app = build_app(model, served_model_name=MODEL_NAME)    # its lifespan (router shutdown) never runs here
    check = model.router.check
    monkeypatch.setattr(model.router, "check", lambda *args: (time.sleep(0.05), check(*args))[1])  # ~3 s for the 64
    body = json.dumps({"model": MODEL_NAME, "prompt": [[464, 2068 + i] for i in range(64)], "max_tokens": 50,
                       "echo": True, "logprobs": 1}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent = []

    async def receive():
        if messages:
            return messages.pop()
        await asyncio.sleep(0.3)           # the client leaves while the prompts are checked
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    queued = model.stats()["prompt_tokens"]
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 120))
    assert model.stats()["prompt_tokens"] == queued
    assert sent[0]["status"] == 499


def test_metrics_and_tokenizing_leave_the_event_loop_free(model, monkeypatch):
    """/metrics (the engine's stats wait for a step to end) and tokenizing (a 4 MB prompt takes
    seconds) run in worker threads: while they work, the event loop serves the other connections.
    Each waits for a signal that only the running event loop can give."""
    from gpt2_engine.server.app import build_app

    loop_free, seen = threading.Event(), []

    def waiting_for_the_loop(work):
        def wrapped(*args, **kwargs):
            seen.append(loop_free.wait(10))
            return work(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(model.router, "stats", waiting_for_the_loop(model.router.stats))
    monkeypatch.setattr(model.tokenizer, "encode", waiting_for_the_loop(model.tokenizer.encode))
    app = build_app(model, served_model_name=MODEL_NAME)    # its lifespan (router shutdown) never runs here

    async def signal_from_the_loop():
        await asyncio.sleep(0.1)
        loop_free.set()

    async def requests():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
            for request in (http.get("/metrics"),
                            http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 1})):
                loop_free.clear()
                response, _ = await asyncio.gather(request, signal_from_the_loop())
                assert response.status_code == 200

    asyncio.run(asyncio.wait_for(requests(), 120))
    assert seen and all(seen)


def test_quantization_flag_serves_the_quantized_model(checkpoint):
    """`serve --quantization w8a8` answers what the w8a8 model generates in-process."""
    process = ServerProcess("--model", str(checkpoint), "--quantization", "w8a8")
    try:
        reference = GPT2.from_pretrained(checkpoint, device="cpu", quantization="w8a8")
        with openai.OpenAI(base_url=f"{process.url}/v1", api_key="unused", timeout=60, max_retries=0) as c:
            answer = c.completions.create(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=12, temperature=0)
        assert answer.choices[0].text == reference.tokenizer.decode(generated_ids(reference, PROMPTS[1], 12))
    finally:
        process.stop()
