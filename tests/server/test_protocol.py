"""Request parsing, the mapping onto SamplingParams, and the incremental text of a choice, without
a server (the server tests cover the same through HTTP)."""
from __future__ import annotations

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
    request = CompletionRequest.parse({"model": "m", "prompt": "hi"} | body)
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
        request = CompletionRequest.parse({"model": "m", "prompt": prompt})
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
                                  ["serve", "--random-weights", "--model", "not-a-preset"]])
def test_serve_bad_flags_exit_2(argv, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt2-engine serve: error: ") and err.count("\n") == 1


def test_bench_serve_bad_flags_exit_2(capsys):
    assert cli_main(["bench", "serve", "--url", "http://x", "--concurrency", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt2-engine bench serve: error: argument --concurrency") and err.count("\n") == 1
