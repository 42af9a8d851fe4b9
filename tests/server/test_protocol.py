"""Request parsing, the mapping onto SamplingParams, and the incremental text of a choice, without
a server (the server tests cover the same through HTTP)."""
from __future__ import annotations

import json
import socket

import pytest

from tests.conftest import require_modules

require_modules("pydantic", "fastapi")

from gpt2_engine.cli import main as cli_main
from gpt2_engine.server.choices import Choice, token_string
from gpt2_engine.server.protocol import APIError, CompletionRequest, for_prompts, prompts_of, sampling_params
from gpt2_engine.tokenizer import load_tokenizer
from tests.conftest import TOKENIZER_DIR  # noqa: E402

EOS = 50256


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER_DIR)


def params_of(body: dict, tokenizer, n_positions: int = 1024):
    request = CompletionRequest.parse(json.dumps({"model": "m", "prompt": "hi"} | body))
    return [sampling_params(request, p, n_positions, EOS) for p in prompts_of(request, tokenizer)]


def test_temperature_zero_is_greedy_and_openai_defaults_sample(tokenizer):
    greedy, = params_of({"temperature": 0, "top_k": -1}, tokenizer)
    assert not greedy.do_sample and greedy.top_k == 0 and greedy.max_new_tokens == 16 and greedy.eos_token_ids == (EOS,)
    default, = params_of({}, tokenizer)
    assert default.do_sample and default.temperature == 1.0 and default.top_p == 1.0 and default.top_k == 0
    unbounded, = params_of({"max_tokens": None, "ignore_eos": True}, tokenizer, n_positions=100)
    assert unbounded.max_new_tokens == 100 - 1 and unbounded.eos_token_ids == ()


def test_prompt_forms_and_per_prompt_seeds(tokenizer):
    ids = tokenizer.encode("Hello world")
    for prompt in ("Hello world", ["Hello world"], ids, [ids]):
        request = CompletionRequest.parse(json.dumps({"model": "m", "prompt": prompt}))
        assert [(p.token_ids, p.text) for p in prompts_of(request, tokenizer)] == [(ids, "Hello world")]
    seeded = for_prompts(params_of({"prompt": ["a", "b", "c"], "seed": 5}, tokenizer))
    base, = params_of({"seed": 5}, tokenizer)
    assert [p.seed for p in seeded] == [base.for_prompt(row).seed for row in range(3)]   # as GPT2.generate's rows


@pytest.mark.parametrize("body, param", [
    ({"best_of": 3}, "best_of"), ({"suffix": "x"}, "suffix"), ({"logit_bias": {"5": 1}}, "logit_bias"),
    ({"presence_penalty": 1}, "presence_penalty"), ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"unknown": 1}, "unknown"), ({"max_tokens": "many"}, "max_tokens"), ({"prompt": []}, "prompt"),
])
def test_refused_requests_name_the_parameter(tokenizer, body, param):
    with pytest.raises(APIError) as info:
        params_of(body, tokenizer)
    assert info.value.status == 400 and info.value.param == param and param in info.value.message


def test_value_checks_are_sampling_params_own(tokenizer):
    with pytest.raises(APIError, match="temperature must be > 0"):
        params_of({"temperature": -0.5}, tokenizer)
    with pytest.raises(APIError, match=r"max_tokens \(max_new_tokens\) must be a positive integer"):
        params_of({"max_tokens": 0}, tokenizer)


def push_all(choice: Choice, tokens: list[int], finish_reason: str = "length") -> list[str]:
    return [choice.push(t, finish_reason if i == len(tokens) - 1 else None) for i, t in enumerate(tokens)]


def test_a_character_split_over_tokens_is_sent_whole(tokenizer):
    text = "naïve 日本語"
    tokens = tokenizer.encode(text)
    assert any(token_string(tokenizer, t).startswith("bytes:") for t in tokens), "its characters should span tokens"
    deltas = push_all(Choice(tokenizer, eos_token_ids=(EOS,), stop=[], logprobs=None), tokens + [EOS], "stop")
    assert "".join(deltas) == text and "\ufffd" not in "".join(deltas)


def test_a_stop_string_over_token_boundaries_is_held_back_then_cut(tokenizer):
    tokens = tokenizer.encode("one two three four five")
    choice = Choice(tokenizer, eos_token_ids=(EOS,), stop=["o thr"], logprobs=0)
    deltas = push_all(choice, tokens)
    assert "".join(deltas) == "one tw" and choice.finish_reason == "stop"
    assert choice.num_tokens == len(tokenizer.encode("one two three"))   # the token completing the stop string
    assert "o thr" not in "".join(deltas[:-1])


def test_stop_strings_are_not_searched_in_the_echoed_prompt(tokenizer):
    choice = Choice(tokenizer, eos_token_ids=(EOS,), stop=["STOP"], logprobs=None, prefix="say STOP ")
    assert "".join(push_all(choice, tokenizer.encode("and go on"))) == "say STOP and go on"
    assert choice.finish_reason == "length"


@pytest.mark.parametrize("argv", [["serve", "--max-num-seqs", "0"], ["serve", "--port", "x"], ["serve", "--max-queue", "-1"],
                                  ["serve", "--device", "tpu"], ["serve", "--no-such-flag"],
                                  ["serve", "--replicas", "2", "--port", "0"],
                                  ["serve", "--random-weights", "--model", "not-a-preset"],
                                  ["serve", "--port", "70000"], ["serve", "--port", "-1"],
                                  ["serve", "--random-weights", "--host", "999.1.1.1", "--port", "0"],
                                  ["serve", "--model", "/nonexistent/checkpoint", "--replicas", "2", "--port", "8123"],
                                  ["serve", "--shutdown-timeout", "-1"], ["serve", "--max-body-size", "0"]])
def test_serve_bad_flags_exit_2(argv, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt2-engine serve: error: ") and err.count("\n") == 1, err


def test_serve_on_a_port_in_use_is_one_line(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli_main(["serve", "--random-weights", "--model", "gpt2", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gpt2-engine serve: error: cannot listen on 127.0.0.1:{port}") and err.count("\n") == 1, err


@pytest.mark.parametrize("body, param", [
    ('{"model": "m", "prompt": "hi", "max_tokens": true}', "max_tokens"),
    ('{"model": "m", "prompt": "hi", "max_tokens": 2.0}', "max_tokens"),
    ('{"model": "m", "prompt": [true, false]}', "prompt"), ('{"model": "m", "prompt": [1.0, 2.0]}', "prompt"),
    ('{"model": "m", "prompt": "hi", "ignore_eos": "yes"}', "ignore_eos"),
    ('{"model": "m", "prompt": "hi", "temperature": Infinity}', "temperature"),
    ('{"model": "m", "prompt": "hi", "temperature": NaN}', "temperature"),
    ('{"model": "m", "prompt": "hi", "stream_options": {"include_usage": 1}}', "stream_options.include_usage"),
    ('{"model": "m", "prompt": ' + "[" * 3000 + "]" * 3000 + "}", None),      # 6 KB, nested past any sane depth
    ('[{"model": "m", "prompt": "hi"}]', None), ('{"model": "m", "prompt": "hi",', None),
])
def test_no_coercion_and_no_recursion(body, param):
    with pytest.raises(APIError) as info:
        CompletionRequest.parse(body)
    assert info.value.status == 400 and info.value.param == param
    assert param is None or param in info.value.message


def test_top_logprobs_hold_the_chosen_token_as_openai_documents(tokenizer):
    """OpenAI: 'the API will always return the logprob of the sampled token, so there may be up to
    logprobs+1 elements' (vLLM does the same); logprobs 0 gives the chosen token alone."""
    chosen, other = tokenizer.encode(" the")[0], tokenizer.encode(" a")[0]
    for k, top, expected in ((0, (), {" the": -0.5}), (1, ((other, -0.1),), {" a": -0.1, " the": -0.5}),
                             (1, ((chosen, -0.5),), {" the": -0.5})):
        choice = Choice(tokenizer, eos_token_ids=(EOS,), stop=[], logprobs=k)
        choice.push(chosen, None, -0.5, top)
        assert choice.take_logprobs()["top_logprobs"] == [expected]


def test_bench_serve_bad_flags_exit_2(capsys):
    assert cli_main(["bench", "serve", "--url", "http://x", "--concurrency", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt2-engine bench serve: error: argument --concurrency") and err.count("\n") == 1
