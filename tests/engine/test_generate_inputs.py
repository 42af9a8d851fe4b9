"""Inputs that used to slip through or fail late: each is a clear error before any work is done,
or the right result (transformers' behaviour)."""
import pytest
import torch

import gpt2_engine
from tests.engine.tiny_models import tiny_hf_model


@pytest.fixture(scope="module")
def model():
    return gpt2_engine.GPT2.from_hf(tiny_hf_model(seed=31), backend="torch")


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_any_integer_input_ids_give_int64_output_like_transformers(model, dtype):
    ids = torch.tensor([[3, 90, 100, 7], [8, 9, 10, 11]])
    out = model.generate(ids.to(dtype), max_new_tokens=5)
    assert out.dtype == torch.int64 and torch.equal(out, model.generate(ids, max_new_tokens=5))
    # row 0 stops at its first token; its padding, a pad id above 255, must not wrap around in uint8
    eos = out[0, 4].item()
    out = model.generate(ids.to(dtype), max_new_tokens=5, eos_token_id=eos, pad_token_id=300)
    assert out.shape[1] > 5 and out[0, 4] == eos and (out[0, 5:] == 300).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(pad_token_id=2**63), "pad_token_id must be a token id"),
    (dict(pad_token_id=-1), "pad_token_id must be a token id"),
    (dict(eos_token_id=2**70), "eos_token_id must be a token id"),
    (dict(eos_token_id=[1, 2**64]), "eos_token_id must be a token id"),
    (dict(do_sample=True, top_k=2.5), "top_k must be an integer"),
    (dict(do_sample=True, temperature="hot"), "temperature must be a number"),
    (dict(do_sample=True, temperature=float("nan")), "temperature must be > 0"),
    (dict(do_sample=True, top_p=float("nan")), "top_p must be in"),
])
def test_bad_option_values_fail_before_any_work(model, kwargs, message):
    before = model.stats()
    with pytest.raises(ValueError, match=message):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, **kwargs)
    after = model.stats()
    assert after["prompt_tokens"] == before["prompt_tokens"] and after["tokens_generated"] == before["tokens_generated"]


def test_a_float_mask_must_hold_only_zeros_and_ones(model):
    ids = torch.tensor([[0, 5, 6]])
    with pytest.raises(ValueError, match="only 0 and 1"):
        model.generate(ids, attention_mask=torch.tensor([[0.0, 0.5, 1.0]]), max_new_tokens=2)
    exact = model.generate(ids, attention_mask=torch.tensor([[0.0, 1.0, 1.0]]), max_new_tokens=2)
    assert torch.equal(exact, model.generate(ids, attention_mask=torch.tensor([[0, 1, 1]]), max_new_tokens=2))


def test_text_entry_points_say_what_is_wrong(model):
    with pytest.raises(TypeError, match="prompts must be a str or a list of str, got NoneType"):
        model.generate_text(None)
    with pytest.raises(TypeError, match="got bytes .*decode"):
        model.generate_text(b"hi")
    with pytest.raises(TypeError, match="got bytes"):
        model.stream(b"hi")


def test_a_prompt_too_long_names_the_context_limit(model):
    # 64-token context (tiny model): the prompt alone fills it, whatever max_length says
    model.tokenizer = _byte_tokenizer()
    with pytest.raises(ValueError, match=r"fills the model's context \(n_positions=64\)"):
        model.stream("a" * 64)
    with pytest.raises(ValueError, match=r"exceeds the model's context \(n_positions=64\)"):
        model.stream("a" * 40, max_new_tokens=30)
    with pytest.raises(ValueError, match=r"exceeds the model's context \(n_positions=64\)"):
        model.generate(torch.ones(1, 65, dtype=torch.long))


def _byte_tokenizer():
    import tiktoken

    return tiktoken.Encoding("bytes", pat_str=r".", mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={})


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(input_ids=torch.ones(1, 3, dtype=torch.long, device="meta")), ValueError, "input_ids is on the meta device"),
    (dict(attention_mask=torch.ones(1, 3, dtype=torch.long, device="meta")), ValueError,
     "attention_mask is on the meta device"),
    (dict(streamer=object()), TypeError, "streamer must have put"),
    (dict(do_sample="false"), TypeError, "do_sample must be a bool"),
    (dict(return_dict_in_generate="yes"), TypeError, "return_dict_in_generate must be a bool"),
])
def test_unusable_arguments_name_themselves(model, kwargs, error, message):
    arguments = dict(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=2) | kwargs
    with pytest.raises(error, match=message):
        model.generate(**arguments)


@pytest.mark.parametrize("block_size", [10**9, 0, 2.0])
def test_block_size_beyond_the_context_is_refused_before_allocating(block_size):
    with pytest.raises(ValueError, match="block_size must be an integer in"):
        gpt2_engine.GPT2.from_hf(tiny_hf_model(seed=31), backend="torch", block_size=block_size)


def test_generate_documents_every_option_it_takes():
    """help(gpt2_engine.GPT2.generate) lists the options, as transformers' documentation does."""
    from gpt2_engine.generation import HF_DEFAULTS

    doc = gpt2_engine.GPT2.generate.__doc__
    assert [name for name in HF_DEFAULTS if name not in doc] == []
