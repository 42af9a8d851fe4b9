"""Beam search against transformers' generate(num_beams=...): tokens, sequences_scores and
beam_indices, on the torch and triton (interpreter) backends; beam groups under memory pressure
(preempted and recomputed as one unit) give the tokens they give alone; bad options raise."""
import dataclasses

import pytest
import torch
import transformers

import gpt2_engine
from gpt2_engine.llm_engine import LLMEngine
from gpt2_engine.sampling import SamplingParams
from tests.engine.tiny_models import left_padded_batch, tiny_hf_model

# sequences_scores within 1e-5, relative to the score once it exceeds 1 in magnitude (a negative
# length_penalty multiplies a summed log-prob by the length: -164 is 1.5e-5 per fp32 ulp)
SCORE_TOLERANCE = 1e-5
# EOS ids are tokens the tiny model's beams often pick, so hypotheses do end early
CASES = [
    dict(num_beams=4, max_new_tokens=10),
    dict(num_beams=3, max_new_tokens=12, eos_token_id=24, num_return_sequences=3, early_stopping=True),
    dict(num_beams=4, max_new_tokens=12, eos_token_id=[22, 98], num_return_sequences=2, length_penalty=0.5),
    dict(num_beams=2, max_new_tokens=8, early_stopping="never", eos_token_id=9, length_penalty=2.0),
    dict(num_beams=3, max_new_tokens=10, eos_token_id=97, early_stopping=False, length_penalty=-1.0, min_new_tokens=2),
    dict(num_beams=2, max_new_tokens=1),
]


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model()


@pytest.fixture(scope="module")
def torch_model(hf):
    return gpt2_engine.GPT2.from_hf(hf, backend="torch")


def assert_same_beams(expected, got):
    assert torch.equal(got.sequences, expected.sequences), (expected.sequences, got.sequences)
    diff = ((got.sequences_scores - expected.sequences_scores).abs() / expected.sequences_scores.abs().clamp(min=1))
    assert diff.max().item() < SCORE_TOLERANCE, f"sequences_scores differ by {diff.max().item():.2e} (relative)"
    assert got.beam_indices.dtype == expected.beam_indices.dtype
    assert torch.equal(got.beam_indices, expected.beam_indices)


def generate_both(hf, model, ids, mask, **kwargs):
    kwargs = dict(kwargs, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    return hf.generate(ids, attention_mask=mask, **kwargs), model.generate(ids, attention_mask=mask, **kwargs)


@pytest.mark.parametrize("lengths", [[7], [5, 9, 3]], ids=["single", "left-padded-batch"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_beam_search_matches_transformers(hf, torch_model, lengths, case):
    torch.manual_seed(len(lengths))
    ids, mask = left_padded_batch(lengths, hf.config.vocab_size)
    expected, got = generate_both(hf, torch_model, ids, mask, **case)
    assert_same_beams(expected, got)


def test_some_hypotheses_end_early_at_eos_and_are_padded(hf, torch_model):
    """The EOS cases above are not vacuous: hypotheses of different lengths, padded like transformers."""
    torch.manual_seed(2)
    ids, mask = left_padded_batch([5, 9, 3], hf.config.vocab_size)
    for case in (CASES[1], CASES[2], CASES[4]):     # ("never" with length_penalty 2 favours full length)
        expected, got = generate_both(hf, torch_model, ids, mask, **case)
        assert_same_beams(expected, got)
        lengths = (got.beam_indices >= 0).sum(-1)
        assert lengths.min() < case["max_new_tokens"], case


def test_no_repeat_ngram_size_and_repetition_penalty_match_transformers(hf, torch_model):
    ids = torch.tensor([[4, 9, 4, 9, 4, 17, 3]])
    expected, got = generate_both(hf, torch_model, ids, None, num_beams=3, max_new_tokens=10, no_repeat_ngram_size=2,
                                  repetition_penalty=1.3)
    assert_same_beams(expected, got)
    # and in greedy decoding
    for n in (1, 3):
        assert torch.equal(torch_model.generate(ids, max_new_tokens=12, no_repeat_ngram_size=n),
                           hf.generate(ids, max_new_tokens=12, no_repeat_ngram_size=n, pad_token_id=0))


def test_plain_tensor_output_and_generate_text(hf, torch_model):
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    assert torch.equal(torch_model.generate(ids, num_beams=3, max_new_tokens=6),
                       hf.generate(ids, num_beams=3, max_new_tokens=6, pad_token_id=0))


def test_gpt2_small_shape_matches_transformers():
    torch.manual_seed(3)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()   # the real GPT-2 small shape
    model = gpt2_engine.GPT2.from_hf(hf, backend="torch")
    ids, mask = left_padded_batch([9, 6], hf.config.vocab_size)
    expected, got = generate_both(hf, model, ids, mask, num_beams=3, max_new_tokens=5, num_return_sequences=2)
    assert_same_beams(expected, got)


def test_triton_backend_matches_transformers(hf):
    """Under the interpreter on CPU; on the GPU when there is one."""
    model = gpt2_engine.GPT2.from_hf(hf, backend="triton", block_size=4, device="cuda" if torch.cuda.is_available() else "cpu")
    ids, mask = left_padded_batch([6, 3], hf.config.vocab_size)
    expected, got = generate_both(hf, model, ids, mask, num_beams=2, max_new_tokens=4, eos_token_id=9)
    assert_same_beams(expected, dataclasses.replace(got, sequences=got.sequences.cpu(), beam_indices=got.beam_indices.cpu(),
                                                    sequences_scores=got.sequences_scores.cpu()))


def drive(llm: LLMEngine, requests):
    """Add all requests, step to the end; the tokens of each (request order, index)."""
    order = {llm.add_request(prompt, params, n=n): k for k, (prompt, params, n) in enumerate(requests)}
    tokens = {}
    while llm.has_unfinished_requests():
        for event in llm.step():
            tokens.setdefault((order[event.request_id], event.index), []).append(event.token_id)
    return tokens


def test_beam_groups_under_memory_pressure_preempt_and_give_the_tokens_of_each_alone(torch_model):
    paged = torch_model.engine.model
    beams = SamplingParams(max_new_tokens=12, num_beams=3, eos_token_ids=(5,))
    wide = SamplingParams(max_new_tokens=10, num_beams=4)
    sampled = SamplingParams(max_new_tokens=12, do_sample=True, seed=4)
    requests = [([1, 2, 3, 4, 5, 6, 7], beams, 2), ([9, 8, 7], sampled, 2), ([20, 21, 22, 23, 24], wide, 1),
                ([30] * 6, beams, 1)]
    # 4 x 4 beams of up to 17 tokens need ~20 blocks of 4 at once; 22 blocks force preemptions
    squeezed = LLMEngine(paged, num_blocks=22, block_size=4, max_num_batched_tokens=16)
    got = drive(squeezed, requests)
    assert squeezed.scheduler.num_preemptions > 0
    assert squeezed.block_manager.num_free_blocks == 22 and not squeezed.scheduler.running
    for k, request in enumerate(requests):
        alone = drive(LLMEngine(paged, num_blocks=128, block_size=4), [request])
        assert {i: t for (r, i), t in got.items() if r == k} == {i: t for (_, i), t in alone.items()}


def test_abort_frees_a_beam_group(torch_model):
    llm = LLMEngine(torch_model.engine.model, num_blocks=40, block_size=4)
    request = llm.add_request([1, 2, 3, 4, 5], SamplingParams(max_new_tokens=10, num_beams=4))
    for _ in range(3):
        assert llm.step() == []
    llm.abort_request(request)
    assert llm.block_manager.num_free_blocks == 40 and not llm.has_unfinished_requests()


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_beams=2, do_sample=True), "beam sampling"),
    (dict(num_beams=2, early_stopping="sometimes"), "early_stopping"),
    (dict(num_beams=0), "num_beams"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
])
def test_bad_beam_options_raise_naming_them(torch_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        torch_model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, **kwargs)


def test_a_beam_group_must_fit_the_pool(torch_model):
    small = gpt2_engine.GPT2.from_hf(tiny_hf_model(), backend="torch", num_blocks=6, block_size=4)
    with pytest.raises(ValueError, match="KV blocks"):
        small.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=8, num_beams=4)
    with pytest.raises(ValueError, match="eager"):
        gpt2_engine.GPT2.from_hf(tiny_hf_model(), backend="eager").generate(torch.tensor([[1, 2]]), num_beams=2)
