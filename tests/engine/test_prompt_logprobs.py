"""Prompt logprobs in the engine's steps (gpt2_engine.prompt_logprobs): each prompt token's logprob
and top k, scored chunk by chunk of the prefill within the token budget while other sequences
decode, equal to the log-softmax of a full forward; delivered once each, whatever the prefix cache,
return sequences or a preemption do."""
import itertools

import pytest
import torch

from gpt2_engine.config import GPT2Config
from gpt2_engine.llm_engine import LLMEngine
from gpt2_engine.model import PagedGPT2
from gpt2_engine.prompt_logprobs import SCORED_ROWS_PER_STEP
from gpt2_engine.sampling import SamplingParams
from gpt2_engine.sequence import PromptLogprobs, TokenEvent
from tests.engine.tiny_models import tiny_hf_model

CONFIG = GPT2Config(vocab_size=101, n_positions=64, n_embd=48, n_layer=2, n_head=3, bos_token_id=100, eos_token_id=100)
LONG_PROMPT = [(7 * i + 3) % 100 for i in range(40)]


def paged_model(config: GPT2Config) -> PagedGPT2:
    hf = tiny_hf_model(vocab_size=config.vocab_size, n_embd=config.n_embd, n_layer=config.n_layer,
                       n_head=config.n_head, n_positions=config.n_positions)
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()
             if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"}
    return PagedGPT2(config, state, backend="torch")


@pytest.fixture(scope="module")
def model():
    return paged_model(CONFIG)


def drive(engine: LLMEngine, requests: dict[int, list[tuple]]) -> tuple[dict, list[list]]:
    """Step the engine, adding requests[step]'s (prompt, params, n) before that step. Returns each
    request's events (by order of addition) and each step's events."""
    events, order, steps = {}, {}, []
    while len(steps) <= max(requests) or engine.has_unfinished_requests():
        for prompt, params, n in requests.get(len(steps), []):
            order[engine.add_request(prompt, params, n=n)] = len(order)
        step_events = engine.step()
        for event in step_events:
            events.setdefault(order[event.request_id], []).append(event)
        steps.append(step_events)
    return events, steps


def check_against_full_forward(model, prompt: list[int], events: list[PromptLogprobs], k: int) -> None:
    """The events hold tokens 1 .. L-1 once each, in order, as log_softmax of the full forward's logits."""
    log_probs = torch.log_softmax(model.prompt_logits([prompt])[0], dim=-1)
    assert [e.first_token for e in events] == list(itertools.accumulate([1] + [len(e.logprobs) for e in events[:-1]]))
    chosen = [lp for e in events for lp in e.logprobs]
    tops = [top for e in events for top in e.top_logprobs]
    assert len(chosen) == len(prompt) - 1
    expected = log_probs[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    torch.testing.assert_close(torch.tensor(chosen, dtype=torch.float32), expected, atol=1e-4, rtol=1e-4)
    top_values, top_ids = log_probs[:-1].topk(k, dim=-1)
    assert [[t for t, _ in top] for top in tops] == top_ids.tolist()
    torch.testing.assert_close(torch.tensor([[v for _, v in top] for top in tops], dtype=torch.float32),
                               top_values, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_scored_in_budgeted_chunks_beside_a_decoding_request(model, async_scheduling):
    engine = LLMEngine(model, num_blocks=64, block_size=4, max_num_batched_tokens=8, async_scheduling=async_scheduling)
    decoding = ([5, 7], SamplingParams(max_new_tokens=30), 1)
    scored = (LONG_PROMPT, SamplingParams(max_new_tokens=3, prompt_logprobs=3), 1)
    events, steps = drive(engine, {0: [decoding], 3: [scored]})
    prompt_events = [e for e in events[1] if isinstance(e, PromptLogprobs)]
    check_against_full_forward(model, LONG_PROMPT, prompt_events, 3)
    # the budget bounds each step's rows; the scoring spans several steps, and the decoding request
    # gets a token in each of them
    assert all(len(e.logprobs) <= 8 for e in prompt_events) and len(prompt_events) > 3
    for step_events in steps:
        if any(isinstance(e, PromptLogprobs) for e in step_events):
            assert any(isinstance(e, TokenEvent) and e.request_id == 0 for e in step_events)
    # the prompt's logprobs come before its tokens, whose run is the same as without scoring
    assert all(isinstance(e, PromptLogprobs) for e in events[1][:len(prompt_events)])
    alone, _ = drive(LLMEngine(model, num_blocks=64, block_size=4), {0: [(LONG_PROMPT, SamplingParams(max_new_tokens=3), 1)]})
    assert [e.token_id for e in events[1][len(prompt_events):]] == [e.token_id for e in alone[0]]


def test_a_step_scores_a_bounded_number_of_positions_whatever_its_token_budget():
    model = paged_model(GPT2Config(vocab_size=101, n_positions=640, n_embd=24, n_layer=1, n_head=2, bos_token_id=100,
                                   eos_token_id=100))
    prompt = [(7 * i + 3) % 100 for i in range(600)]
    engine = LLMEngine(model, num_blocks=200, block_size=4)       # the default budget: 4096 tokens a step
    events, _ = drive(engine, {0: [([5, 7], SamplingParams(max_new_tokens=8), 1)],
                               1: [(prompt, SamplingParams(max_new_tokens=1, prompt_logprobs=1), 1)]})
    sizes = [len(e.logprobs) for e in events[1] if isinstance(e, PromptLogprobs)]
    assert sizes == [SCORED_ROWS_PER_STEP] * (599 // SCORED_ROWS_PER_STEP) + [599 % SCORED_ROWS_PER_STEP]
    check_against_full_forward(model, prompt, [e for e in events[1] if isinstance(e, PromptLogprobs)], 1)


def test_a_cached_prefix_is_scored_again_and_return_sequences_share_one_delivery(model):
    engine = LLMEngine(model, num_blocks=64, block_size=4, enable_prefix_caching=True)
    drive(engine, {0: [(LONG_PROMPT, SamplingParams(max_new_tokens=2), 1)]})        # caches the prompt's blocks
    events, _ = drive(engine, {0: [(LONG_PROMPT, SamplingParams(max_new_tokens=4, do_sample=True, seed=1,
                                                                prompt_logprobs=0), 2)]})
    prompt_events = [e for e in events[0] if isinstance(e, PromptLogprobs)]
    assert {e.index for e in prompt_events} == {0}
    check_against_full_forward(model, LONG_PROMPT, prompt_events, 0)
    assert sorted(e.index for e in events[0] if isinstance(e, TokenEvent)) == [0] * 4 + [1] * 4


def test_a_preempted_scoring_sequence_delivers_each_prompt_token_once(model):
    # 11 blocks of 4 and 3 tokens a step: the decoding request grows until the scoring one (the
    # newest) is preempted halfway through its prompt; it recomputes it once the other is done
    engine = LLMEngine(model, num_blocks=11, block_size=4, max_num_batched_tokens=3)
    engine.add_request(list(range(1, 13)), SamplingParams(max_new_tokens=30))
    engine.step()
    scored = engine.add_request(LONG_PROMPT[:21], SamplingParams(max_new_tokens=6, prompt_logprobs=2))
    events, delivered_at_preemption = [], None
    while engine.has_unfinished_requests():
        events += [e for e in engine.step() if e.request_id == scored]
        if engine.scheduler.num_preemptions and delivered_at_preemption is None:
            delivered_at_preemption = sum(len(e.logprobs) for e in events if isinstance(e, PromptLogprobs))
    assert 0 < delivered_at_preemption < 20
    check_against_full_forward(model, LONG_PROMPT[:21], [e for e in events if isinstance(e, PromptLogprobs)], 2)
    alone, _ = drive(LLMEngine(model, num_blocks=64, block_size=4), {0: [(LONG_PROMPT[:21], SamplingParams(max_new_tokens=6), 1)]})
    assert [e.token_id for e in events if isinstance(e, TokenEvent)] == [e.token_id for e in alone[0]]


def test_bad_prompt_logprobs_are_refused():
    for bad in (-1, 21, True, 1.5):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=1, num_beams=2)
