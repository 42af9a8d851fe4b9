"""gpt2_engine.sampling against transformers' logits processors, plus statistical checks of the draw."""
from dataclasses import dataclass

import pytest
import torch
from transformers import (
    MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
    TopKLogitsWarper, TopPLogitsWarper,
)

from gpt2_engine.sampling import SamplingParams, make_generator, sample_next_tokens


@dataclass
class State:
    params: SamplingParams
    token_ids: list
    num_generated: int = 0
    generator: torch.Generator | None = None


def _sample(logits, states):
    """(token ids [N], processed scores [N, V] or None) from the per-row SampledTokens."""
    sampled = sample_next_tokens(logits, states)
    tokens = torch.tensor([s.token_id for s in sampled])
    scores = torch.stack([s.scores for s in sampled]) if sampled[0].scores is not None else None
    return tokens, scores


def _states(params, histories, index_offset=0):
    return [State(params, h, generator=make_generator(params, i + index_offset, "cpu")) for i, h in enumerate(histories)]


def test_greedy_is_argmax_after_repetition_penalty_like_transformers():
    logits = torch.randn(4, 50)
    histories = [torch.randint(0, 50, (9,)).tolist() for _ in range(4)]
    params = SamplingParams(repetition_penalty=1.7, output_scores=True)
    tokens, scores = _sample(logits, _states(params, histories))
    expected = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor(histories), logits.clone())
    torch.testing.assert_close(scores, expected)
    assert torch.equal(tokens, expected.argmax(-1))


def test_min_new_tokens_masks_every_eos_until_reached():
    logits = torch.zeros(2, 10)
    logits[:, 3] = 10.0  # eos would win
    params = SamplingParams(min_new_tokens=2, eos_token_ids=(3, 5), output_scores=True)
    states = _states(params, [[1, 2], [1, 2]])
    states[1].num_generated = 2
    tokens, scores = _sample(logits, states)
    hf = MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=2, min_new_tokens=2, eos_token_id=[3, 5])
    torch.testing.assert_close(scores[0], hf(torch.tensor([[1, 2]]), logits[:1].clone())[0])
    assert tokens[0] != 3 and tokens[1] == 3
    assert scores[0, 5] == float("-inf") and scores[1, 5] == 0


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8), (1.3, 7, 0.6)])
def test_warpers_match_transformers(temperature, top_k, top_p):
    logits = torch.randn(3, 40) * 3
    params = SamplingParams(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, output_scores=True, seed=1)
    _, scores = _sample(logits, _states(params, [[0]] * 3))
    expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    torch.testing.assert_close(scores, expected)


def test_top_k_1_sampling_equals_greedy():
    logits = torch.randn(6, 300)
    sampled, _ = _sample(logits, _states(SamplingParams(do_sample=True, top_k=1, seed=3), [[0]] * 6))
    assert torch.equal(sampled, logits.argmax(-1))


def test_same_seed_same_tokens_whatever_the_batch():
    logits = torch.randn(1, 1000)
    params = SamplingParams(do_sample=True, seed=1234)
    alone = [_sample(logits, _states(params, [[0]]))[0].item() for _ in range(3)]
    # The same sequence (index 0) in a batch with other rows in front of and behind it.
    batch_logits = torch.cat([torch.randn(2, 1000), logits, torch.randn(1, 1000)])
    other = SamplingParams(do_sample=True, seed=99)
    states = _states(other, [[0], [0]]) + _states(params, [[0]]) + _states(other, [[0]], index_offset=2)
    in_batch = _sample(batch_logits, states)[0][2].item()
    assert alone[0] == alone[1] == alone[2] == in_batch
    draws = {_sample(logits, _states(SamplingParams(do_sample=True, seed=s), [[0]]))[0].item() for s in range(20)}
    assert len(draws) > 5  # different seeds explore the distribution


def test_sampled_frequencies_match_softmax_chi_square():
    probs = torch.tensor([0.05, 0.1, 0.2, 0.25, 0.4])
    logits = probs.log()[None]
    draws = 20_000
    state = _states(SamplingParams(do_sample=True, seed=7), [[0]])
    counts = torch.zeros(5)
    for _ in range(draws):
        counts[_sample(logits, state)[0].item()] += 1
    expected = probs * draws
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < 18.47, (chi_square, counts)  # 99.9% quantile of chi-square with 4 degrees of freedom


@pytest.mark.parametrize("bad", [
    dict(max_new_tokens=0), dict(min_new_tokens=-1), dict(temperature=0.0), dict(top_k=-2),
    dict(top_p=0.0), dict(top_p=1.5), dict(repetition_penalty=0.0),
])
def test_invalid_parameters_raise_naming_the_field(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        SamplingParams(**bad)


def test_logprobs_are_the_raw_log_softmax_with_the_top_n():
    torch.manual_seed(5)
    logits = torch.randn(3, 40)
    params = [SamplingParams(logprobs=3), SamplingParams(), SamplingParams(do_sample=True, temperature=0.5, seed=1, logprobs=0)]
    sampled = sample_next_tokens(logits, [State(p, [0], generator=make_generator(p, 0, 'cpu')) for p in params])
    expected = torch.log_softmax(logits, -1)
    first, second, third = sampled
    assert first.logprob == pytest.approx(expected[0, first.token_id].item())
    top = expected[0].topk(3)
    assert [t for t, _ in first.top_logprobs] == top.indices.tolist()
    assert [v for _, v in first.top_logprobs] == pytest.approx(top.values.tolist())
    assert second.logprob is None and second.top_logprobs is None
    assert third.logprob == pytest.approx(expected[2, third.token_id].item()) and third.top_logprobs == ()
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21)


@pytest.mark.parametrize("ngram", [1, 2, 3])
def test_no_repeat_ngram_size_bans_like_transformers(ngram):
    from transformers import NoRepeatNGramLogitsProcessor

    torch.manual_seed(ngram)
    logits = torch.randn(5, 12)
    histories = [torch.randint(0, 4, (length,)).tolist() for length in (1, 2, 6, 9, 14)]   # few ids: many repeats
    params = SamplingParams(no_repeat_ngram_size=ngram, output_scores=True)
    _, scores = _sample(logits, _states(params, histories))
    for row, history in enumerate(histories):
        expected = NoRepeatNGramLogitsProcessor(ngram)(torch.tensor([history]), logits[row:row + 1].clone())
        assert torch.equal(scores[row:row + 1], expected)
