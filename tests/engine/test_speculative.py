"""Speculative decoding (assisted generation): greedy runs token-identical to plain greedy decoding,
sampling keeping the target's distribution, and the paged cache's rollback, prefix cache,
preemption and continuous batching under it."""
import pytest
import torch

import gpt2_engine
from gpt2_engine.block_manager import BlockManager
from gpt2_engine.llm_engine import LLMEngine
from gpt2_engine.model import PagedGPT2
from gpt2_engine.rejection_sampling import rejection_sample
from gpt2_engine.sampling import SamplingParams
from gpt2_engine.speculative import NgramProposer, Speculation, ngram_lookup
from gpt2_engine.weights import load_hf_model_state
from tests.engine.tiny_models import left_padded_batch, tiny_hf_model

VOCAB = 50


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_model(vocab_size=VOCAB, init=0.5)


@pytest.fixture(scope="module")
def model(hf_model):
    return gpt2_engine.GPT2.from_hf(hf_model, backend="torch", num_blocks=128, block_size=4)


# one of each proposer: prompt lookup, the model's int8 twin, an unrelated draft model
ASSISTANCE = {
    "prompt_lookup": lambda: dict(prompt_lookup_num_tokens=3),
    "int8": lambda: dict(assistant_model="int8", num_assistant_tokens=4, assistant_confidence_threshold=0.0),
    "draft_model": lambda: dict(assistant_model=tiny_hf_model(vocab_size=VOCAB, seed=1, init=0.5), num_assistant_tokens=3),
}


def test_ngram_lookup_follows_transformers_prompt_lookup():
    # the last 2-gram (7, 8) first occurs at 1; the 4 tokens after it
    assert ngram_lookup([5, 7, 8, 9, 1, 2, 7, 8], 4, 2) == [9, 1, 2, 7]
    # longest n-gram first: (3, 4) at 4 wins over the earlier 1-gram match of 4 at 0
    assert ngram_lookup([4, 6, 9, 9, 3, 4, 5, 3, 4], 2, 2) == [5, 3]
    assert ngram_lookup([4, 6, 9, 9, 3, 4, 5, 3, 4], 2, 1) == [6, 9]
    assert ngram_lookup([1, 2, 3], 3, 2) == []       # no earlier occurrence
    assert ngram_lookup([1, 2, 1], 3, 2) == [2, 1]   # the continuation stops at the end


@pytest.mark.parametrize("assistance", sorted(ASSISTANCE))
def test_greedy_assisted_generation_is_token_identical(model, hf_model, assistance):
    torch.manual_seed(0)
    ids, mask = left_padded_batch([3, 11, 6, 1], VOCAB)
    # a one-token prompt alone: its prefill step is already a decode-only, speculative step
    one = model.generate(ids[3:, -1:], max_new_tokens=9)
    assert torch.equal(model.generate(ids[3:, -1:], max_new_tokens=9, **ASSISTANCE[assistance]()), one)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=24, pad_token_id=0)
    assisted = model.generate(ids, attention_mask=mask, max_new_tokens=24, pad_token_id=0, **ASSISTANCE[assistance]())
    assert torch.equal(assisted, plain)
    hf = hf_model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert torch.equal(assisted, hf)


@pytest.mark.parametrize("assistance", sorted(ASSISTANCE))
def test_eos_and_max_new_tokens_inside_an_accepted_run(model, assistance):
    torch.manual_seed(1)
    ids, mask = left_padded_batch([4, 9, 2], VOCAB)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=16, pad_token_id=0)
    # EOS: a token some row generates mid-way; rows stop there and are padded after it
    eos = int(plain[0, ids.shape[1] + 5])
    for max_new in (1, 2, 7, 16):
        kwargs = dict(attention_mask=mask, max_new_tokens=max_new, pad_token_id=0, eos_token_id=eos)
        expected = model.generate(ids, **kwargs)
        assert torch.equal(model.generate(ids, **kwargs, **ASSISTANCE[assistance]()), expected)


def test_min_new_tokens_and_repetition_penalty_apply_at_every_drafted_position(model):
    torch.manual_seed(2)
    ids, mask = left_padded_batch([5, 8], VOCAB)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0)
    kwargs = dict(attention_mask=mask, max_new_tokens=20, pad_token_id=0, eos_token_id=int(plain[0, 8 + 2]),
                  min_new_tokens=6, repetition_penalty=1.3, no_repeat_ngram_size=3)
    expected = model.generate(ids, **kwargs)
    for assistance in ASSISTANCE.values():
        assert torch.equal(model.generate(ids, **kwargs, **assistance()), expected)


def test_scores_and_streamer_see_accepted_tokens_only(model):
    torch.manual_seed(3)
    ids = torch.randint(0, VOCAB, (1, 6))

    class Recorder:
        def __init__(self):
            self.tokens, self.ended = [], False

        def put(self, value):
            self.tokens.append(value.tolist())

        def end(self):
            self.ended = True

    kwargs = dict(max_new_tokens=15, return_dict_in_generate=True, output_scores=True)
    plain, recorder = model.generate(ids, **kwargs), Recorder()
    assisted = model.generate(ids, **kwargs, prompt_lookup_num_tokens=4, streamer=recorder)
    assert torch.equal(assisted.sequences, plain.sequences)
    # the same scores up to rounding: the verification computes them in a multi-token chunk
    assert len(assisted.scores) == len(plain.scores)
    assert all(torch.allclose(a, p, atol=1e-4, rtol=1e-4) for a, p in zip(assisted.scores, plain.scores))
    assert recorder.ended and recorder.tokens[0] == ids.tolist()
    assert [t for (t,) in recorder.tokens[1:]] == plain.sequences[0, 6:].tolist()


def test_text_stream_with_a_speculative_engine_default(tokenizer_dir):
    plain = gpt2_engine.GPT2.from_config(_tiny_text_config(), seed=3, backend="torch", tokenizer_path=tokenizer_dir)
    spec = plain.with_backend("torch", speculative_model="int8", num_speculative_tokens=3)
    prompt = "the cat sat on the mat and the cat"
    expected = plain.generate_text(prompt, max_new_tokens=20)[0]
    assert "".join(spec.stream(prompt, max_new_tokens=20)) == expected
    assert spec.stats()["spec_draft_tokens"] > 0


def _tiny_text_config():
    from gpt2_engine.config import GPT2Config

    return GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64)


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P(chi2 >= observed) for counts against probs (cells with expected count < 5 merged into one)."""
    expected = probs.double() * counts.sum()
    keep = expected >= 5
    observed = torch.cat([counts[keep].double(), counts[~keep].double().sum()[None]])
    expected = torch.cat([expected[keep], expected[~keep].sum()[None]])
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    statistic = ((observed - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor((len(expected) - 1) / 2), statistic / 2))


def test_rejection_rule_keeps_the_target_distribution():
    torch.manual_seed(4)
    vocab, draws = 6, 6000
    logits = torch.randn(2, vocab) * 1.5
    params = SamplingParams(do_sample=True, top_k=0)
    p = logits.softmax(-1)
    q = torch.randn(vocab).softmax(-1)         # a draft distribution far from p
    generator = torch.Generator().manual_seed(0)

    class State:
        token_ids, num_generated = [1, 2], 0

    State.params, State.generator = params, generator
    counts = {"model": torch.zeros(vocab), "ngram": torch.zeros(vocab)}
    for _ in range(draws):
        draft = int(torch.multinomial(q, 1, generator=generator))
        counts["model"][rejection_sample(logits, State, [draft], q[None])[0]] += 1
        counts["ngram"][rejection_sample(logits, State, [3], None)[0]] += 1     # a fixed (one-hot) draft
    for name, observed in counts.items():
        assert _chi_square_p_value(observed, p[0]) > 1e-3, (name, observed / draws, p[0])


@pytest.mark.parametrize("assistance", ["prompt_lookup", "draft_model"])
def test_sampled_assisted_generation_keeps_the_target_distribution(assistance):
    """The second and third new tokens over many seeded rows against their exact marginals."""
    vocab, rows = 8, 1200
    hf = tiny_hf_model(vocab_size=vocab, n_embd=16, n_layer=1, n_head=2, init=0.3)
    m = gpt2_engine.GPT2.from_hf(hf, backend="torch", num_blocks=512, block_size=4)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]      # repeats, so that prompt lookup drafts
    kwargs = {"prompt_lookup": dict(prompt_lookup_num_tokens=3),
              "draft_model": dict(assistant_model=tiny_hf_model(vocab_size=vocab, n_embd=16, n_layer=1, n_head=2, seed=5,
                                                                init=0.3), num_assistant_tokens=3)}[assistance]
    out = m.generate(torch.tensor([prompt] * rows), max_new_tokens=3, do_sample=True, top_k=0, seed=11, **kwargs)
    assert m.stats()["spec_draft_tokens"] > 0
    # exact: P(t1, t2, t3) from the model's conditionals, marginalised
    with torch.no_grad():
        p1 = hf(torch.tensor([prompt])).logits[0, -1].softmax(-1)                               # [V]
        pairs = torch.tensor([prompt + [a] for a in range(vocab)])
        p2 = hf(pairs).logits[:, -1].softmax(-1)                                                # [V(t1), V(t2)]
        triples = torch.tensor([prompt + [a, b] for a in range(vocab) for b in range(vocab)])
        p3 = hf(triples).logits[:, -1].softmax(-1).view(vocab, vocab, vocab)                    # [t1, t2, t3]
    joint12 = p1[:, None] * p2
    marginal2, marginal3 = joint12.sum(0), (joint12[:, :, None] * p3).sum((0, 1))
    new = out[:, len(prompt):]
    for column, marginal in ((1, marginal2), (2, marginal3)):
        counts = torch.bincount(new[:, column], minlength=vocab)
        assert _chi_square_p_value(counts, marginal) > 1e-3, (column, counts / rows, marginal)
    # seeded: the same call gives the same tokens (which steps speculate depends on the batch, so
    # another batch may give a seed other tokens: docs/README)
    small = [m.generate(torch.tensor([prompt] * 6), max_new_tokens=6, do_sample=True, top_k=0, seed=7, **kwargs)
             for _ in range(2)]
    assert torch.equal(small[0], small[1])


def _engine(hf_model, *, speculation_of=None, **runtime):
    config, state_dict = load_hf_model_state(hf_model)
    engine = LLMEngine(PagedGPT2(config, state_dict), **runtime)
    if speculation_of is not None:
        engine.speculation = speculation_of(engine, config, state_dict)
    return engine


def _int8_twin(engine, config, state_dict):
    return Speculation(engine.draft_proposer(PagedGPT2(config, state_dict, quantization="int8")), 4)


def _run(engine, prompts, params, arrivals=None):
    """Tokens per request; request i is added before step arrivals[i]."""
    arrivals = arrivals or [0] * len(prompts)
    out, step = {}, 0
    while len(out) < len(prompts) or engine.has_unfinished_requests():
        for i, at in enumerate(arrivals):
            if at == step:
                out[engine.add_request(prompts[i], params)] = []
        for event in engine.step():
            out[event.request_id].append(event.token_id)
        step += 1
    return [out[i] for i in sorted(out)]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_continuous_batching_with_staggered_arrivals_and_preemption(hf_model, async_scheduling):
    torch.manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (5, 13, 3, 9, 7)]
    params = SamplingParams(max_new_tokens=20)
    arrivals = [0, 0, 2, 5, 6]
    plain = _run(_engine(hf_model, num_blocks=64, block_size=4), prompts, params, arrivals)
    for speculation_of in (_int8_twin, lambda *_: Speculation(NgramProposer(), 3)):
        # a pool too small for all five: sequences are preempted and recomputed, drafts get fewer slots
        engine = _engine(hf_model, speculation_of=speculation_of, num_blocks=14, block_size=4,
                         async_scheduling=async_scheduling)
        assert _run(engine, prompts, params, arrivals) == plain
        assert engine.scheduler.num_preemptions > 0 and engine.speculative_stats.drafted > 0
        assert engine.block_manager.num_free_blocks == 14


def test_rejected_drafts_leave_no_slots_and_no_prefix_cache_entries(hf_model):
    torch.manual_seed(6)
    prompt = torch.randint(0, VOCAB, (6,)).tolist()
    block = 4
    engine = _engine(hf_model, speculation_of=lambda *_: Speculation(NgramProposer(1), 5), num_blocks=32,
                     block_size=block, enable_prefix_caching=True)
    engine.add_request(prompt, SamplingParams(max_new_tokens=30))
    tokens = list(prompt)
    while engine.has_unfinished_requests():
        tokens += [event.token_id for event in engine.step()]
        for seq in engine.scheduler.running:    # after each commit: slots only up to the computed tokens
            assert engine.block_manager.num_tokens[seq.seq_id] == seq.num_computed_tokens
            assert len(engine.block_manager.block_tables[seq.seq_id]) == -(-seq.num_computed_tokens // block)
    stats = engine.speculative_stats
    assert stats.drafted > stats.accepted > 0        # some drafts were rejected
    # every indexed block holds committed tokens: a block of the final sequence
    committed = {tuple(tokens[i:i + block]) for i in range(0, len(tokens) - block + 1, block)}
    cached = [key[1] for key in engine.block_manager.prefix_cache.blocks]
    assert cached and all(chunk in committed for chunk in cached)


def test_truncate_gives_back_emptied_blocks():
    bm = BlockManager(8, block_size=4)
    bm.allocate(0, 5)
    for _ in range(6):
        bm.append(0)                      # 11 slots: 3 blocks
    assert bm.num_free_blocks == 5
    bm.truncate(0, 8)
    assert bm.num_tokens[0] == 8 and len(bm.block_tables[0]) == 2 and bm.num_free_blocks == 6
    bm.truncate(0, 5)
    assert len(bm.block_tables[0]) == 2 and bm.num_free_blocks == 6


def test_triton_backend_greedy_speculation_is_token_identical():
    hf = tiny_hf_model(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, init=0.5)
    m = gpt2_engine.GPT2.from_hf(hf, backend="triton", num_blocks=16, block_size=4)
    ids, mask = torch.tensor([[0, 7, 8, 7], [3, 7, 8, 9]]), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    plain = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for kwargs in (dict(prompt_lookup_num_tokens=3), dict(assistant_model="int8", num_assistant_tokens=3,
                                                           assistant_confidence_threshold=0.0)):
        assert torch.equal(m.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, **kwargs), plain)
    assert m.stats()["spec_accepted_tokens"] > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(assistant_model="int8", prompt_lookup_num_tokens=3), "not both"),
    (dict(prompt_lookup_num_tokens=3, num_beams=2), "num_beams"),
    (dict(prompt_lookup_num_tokens=0), "prompt_lookup_num_tokens"),
    (dict(assistant_model="int8", num_assistant_tokens=0), "num_assistant_tokens"),
    (dict(assistant_model="int8", assistant_confidence_threshold=2.0), "assistant_confidence_threshold"),
    (dict(prompt_lookup_num_tokens=3, max_matching_ngram_size=0), "max_matching_ngram_size"),
    (dict(assistant_model="int4"), "assistant_model"),
    (dict(assistant_model=object()), "assistant_model"),
    (dict(assistant_model="int8", num_assistant_tokens_schedule="heuristic"), "num_assistant_tokens_schedule"),
])
def test_bad_assisted_generation_options_raise_naming_them(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, **kwargs)


def test_an_assistant_must_share_the_vocabulary_and_runtime(model, hf_model):
    with pytest.raises(ValueError, match="vocabulary"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=2, assistant_model=tiny_hf_model(vocab_size=VOCAB + 1))
    eager = gpt2_engine.GPT2.from_hf(hf_model, backend="eager")
    with pytest.raises(ValueError, match="eager"):
        eager.generate(torch.tensor([[1, 2]]), max_new_tokens=2, prompt_lookup_num_tokens=2)
    with pytest.raises(ValueError, match="speculative_model"):
        gpt2_engine.GPT2.from_hf(hf_model, backend="torch", speculative_model="int4")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        gpt2_engine.GPT2.from_hf(hf_model, backend="torch", num_speculative_tokens=3)
