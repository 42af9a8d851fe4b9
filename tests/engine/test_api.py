"""The public API (gpt2_engine.GPT2, gpt2_engine.optimize) against transformers, on every backend.

The triton backend runs under Triton's CPU interpreter here, so its cases use the smallest
models and fewest tokens that still exercise prefill, decode and padding."""
import pytest
import torch

import gpt2_engine
from tests.engine.tiny_models import left_padded_batch, tiny_hf_model

BACKENDS = ["eager", "torch", "triton"]
TOLERANCE = {"eager": 1e-4, "torch": 1e-4, "triton": 1e-3}


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_transformers_on_a_left_padded_batch(backend):
    hf = tiny_hf_model()
    model = gpt2_engine.GPT2.from_hf(hf, backend=backend)
    ids, mask = left_padded_batch([11, 4, 7], hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, position_ids=_positions(mask)).logits
    logits = model(ids, attention_mask=mask)
    assert logits.shape == expected.shape and logits.dtype == torch.float32
    valid = mask.bool()
    assert (logits[valid] - expected[valid]).abs().max() < TOLERANCE[backend]
    assert torch.all(logits[~valid] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_generate_is_token_identical_to_transformers(backend):
    hf = tiny_hf_model(seed=1)
    model = gpt2_engine.GPT2.from_hf(hf, backend=backend)
    ids = torch.randint(0, hf.config.vocab_size, (1, 9))
    new = 6 if backend == "triton" else 20
    expected = hf.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, max_new_tokens=new), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_left_padded_batch_with_eos_pads_after_it_like_transformers(backend):
    hf = tiny_hf_model(seed=2)
    model = gpt2_engine.GPT2.from_hf(hf, backend=backend)
    ids, mask = left_padded_batch([3, 8, 5], hf.config.vocab_size, pad_id=0)
    new = 5 if backend == "triton" else 16
    plain = hf.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
    # Choose as EOS the token row 0 produces at its 2nd step, so row 0 stops early and is padded.
    eos = int(plain[0, ids.shape[1] + 1])
    kwargs = dict(attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=eos)
    expected = hf.generate(ids, **kwargs)
    out = model.generate(ids, **kwargs)
    assert torch.equal(out, expected)
    assert (out[0, ids.shape[1] + 2:] == 0).all()


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_max_length_min_new_tokens_and_eos_list(backend):
    hf = tiny_hf_model(seed=3)
    model = gpt2_engine.GPT2.from_hf(hf, backend=backend)
    ids = torch.randint(0, hf.config.vocab_size, (2, 6))
    first = hf.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    eos = [int(first[0, 6]), int(first[1, 7])]
    for kwargs in (dict(max_length=15), dict(max_new_tokens=8, min_new_tokens=3, eos_token_id=eos),
                   dict(max_new_tokens=8, eos_token_id=eos), dict(max_new_tokens=5, repetition_penalty=1.5)):
        expected = hf.generate(ids, do_sample=False, pad_token_id=0, **kwargs)
        assert torch.equal(model.generate(ids, pad_token_id=0, **kwargs), expected), kwargs


@pytest.mark.parametrize("backend", ["eager", "torch", "triton"])
def test_num_return_sequences_with_top_k_1_matches_transformers(backend):
    hf = tiny_hf_model(seed=4)
    model = gpt2_engine.GPT2.from_hf(hf, backend=backend)
    ids, mask = left_padded_batch([5, 3], hf.config.vocab_size)
    new = 4 if backend == "triton" else 10
    kwargs = dict(attention_mask=mask, max_new_tokens=new, do_sample=True, top_k=1, num_return_sequences=3, pad_token_id=0)
    expected = hf.generate(ids, **kwargs)
    assert torch.equal(model.generate(ids, **kwargs), expected)


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_scores_and_return_dict_match_transformers(backend):
    hf = tiny_hf_model(seed=5)
    model = gpt2_engine.GPT2.from_hf(hf, backend=backend)
    ids = torch.randint(0, hf.config.vocab_size, (2, 5))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True,
                  repetition_penalty=1.3)
    expected = hf.generate(ids, **kwargs)
    out = model.generate(ids, **kwargs)
    assert torch.equal(out.sequences, expected.sequences) and torch.equal(out["sequences"], expected.sequences)
    assert len(out.scores) == len(expected.scores)
    for mine, theirs in zip(out.scores, expected.scores):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_seeded_sampling_is_reproducible(backend):
    model = gpt2_engine.GPT2.from_hf(tiny_hf_model(seed=6), backend=backend)
    ids = torch.randint(0, 101, (2, 5))
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=0.9, top_p=0.9, seed=42, num_return_sequences=2)
    first = model.generate(ids, **kwargs)
    assert torch.equal(first, model.generate(ids, **kwargs))
    assert not torch.equal(first, model.generate(ids, **(kwargs | {"seed": 43})))


def test_sampling_is_the_same_on_eager_and_runtime_backends():
    hf = tiny_hf_model(seed=7)
    ids = torch.randint(0, 101, (2, 5))
    kwargs = dict(max_new_tokens=10, do_sample=True, top_k=20, seed=5, num_return_sequences=2)
    outs = [gpt2_engine.GPT2.from_hf(hf, backend=b).generate(ids, **kwargs) for b in ("eager", "torch")]
    assert torch.equal(outs[0], outs[1])


class RecordingStreamer:
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended = True


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_streamer_protocol_like_transformers(backend):
    hf = tiny_hf_model(seed=8)
    model = gpt2_engine.GPT2.from_hf(hf, backend=backend)
    ids = torch.randint(0, 101, (1, 4))
    theirs, mine = RecordingStreamer(), RecordingStreamer()
    hf.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, streamer=theirs)
    model.generate(ids, max_new_tokens=5, streamer=mine)
    assert mine.puts == theirs.puts and mine.ended and theirs.ended


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_optimize_makes_hf_generate_run_on_the_engine_sharing_weights(backend):
    hf = tiny_hf_model(seed=9)
    ids, mask = left_padded_batch([6, 2], 101)
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert gpt2_engine.optimize(hf, backend=backend) is hf
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out, expected)
    shared = hf.gpt2_engine.state_dict()["h.0.attn.c_attn.weight"]
    assert shared.data_ptr() == hf.transformer.h[0].attn.c_attn.weight.data_ptr()


def test_from_config_uses_seeded_random_weights_and_says_so():
    config = gpt2_engine.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    a = gpt2_engine.GPT2.from_config(config, seed=3)
    b = gpt2_engine.GPT2.from_config(config, seed=3)
    ids = torch.randint(0, 64, (1, 5))
    assert torch.equal(a(ids), b(ids))
    assert not torch.equal(a(ids), gpt2_engine.GPT2.from_config(config, seed=4)(ids))
    assert "random weights" in a.source and "seed=3" in a.source


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_generate_text_and_stream_agree(backend, tokenizer_dir):
    hf = tiny_hf_model(vocab_size=50257, n_embd=32, n_layer=1, n_head=2, n_positions=64, seed=10, init=0.5)
    model = gpt2_engine.GPT2.from_hf(hf, backend=backend)
    model.tokenizer = gpt2_engine.load_tokenizer(tokenizer_dir)
    prompts = ["Hello world", "Once upon a time, émigrés 🤖"]
    texts = model.generate_text(prompts, max_new_tokens=12)
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    ids = model.tokenizer.encode(prompts[1])
    expected = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(ids):]
    assert texts[1] == model.tokenizer.decode(expected.tolist())
    streams = [model.stream(p, max_new_tokens=12) for p in prompts]
    pieces = [[], []]
    for step in range(40):  # consume the two streams side by side: the engine batches them
        for i, stream in enumerate(streams):
            piece = next(stream, None)
            if piece is not None:
                pieces[i].append(piece)
    assert ["".join(p) for p in pieces] == texts


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_beam_groups=2), "num_beam_groups"),
    (dict(encoder_no_repeat_ngram_size=2), "encoder_no_repeat_ngram_size"),
    (dict(typo_option=1), "typo_option"),
    (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_length=3), "max_length"),
    (dict(max_new_tokens=60), "exceeds the model.s context"),
    (dict(temperature=-1.0, do_sample=True), "temperature"),
])
def test_bad_generate_options_raise_naming_them(kwargs, message):
    model = gpt2_engine.GPT2.from_hf(tiny_hf_model(), backend="torch")
    with pytest.raises(ValueError, match=message):
        model.generate(torch.randint(0, 101, (1, 5)), **kwargs)


@pytest.mark.parametrize("make_input,error,message", [
    (lambda: torch.tensor([[1, 2, 101]]), ValueError, "outside the vocabulary"),
    (lambda: torch.tensor([[1, -1]]), ValueError, "outside the vocabulary"),
    (lambda: torch.zeros(1, 0, dtype=torch.long), ValueError, "empty"),
    (lambda: torch.ones(1, 65, dtype=torch.long), ValueError, "exceeds the model.s context"),
    (lambda: torch.ones(1, 3), TypeError, "integer"),
    (lambda: [[1, 2]], TypeError, "torch.Tensor"),
    (lambda: torch.ones(1, 2, 3, dtype=torch.long), ValueError, "shape"),
])
@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_bad_input_ids_raise(make_input, error, message, backend):
    model = gpt2_engine.GPT2.from_hf(tiny_hf_model(), backend=backend)
    with pytest.raises(error, match=message):
        model.generate(make_input(), max_new_tokens=2)
    with pytest.raises(error, match=message):
        model(make_input())


def test_bad_attention_masks_raise():
    model = gpt2_engine.GPT2.from_hf(tiny_hf_model(), backend="torch")
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="not left-padded"):
        model.generate(ids, attention_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="all zeros"):
        model.generate(ids, attention_mask=torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="does not match"):
        model.generate(ids, attention_mask=torch.ones(2, 3, dtype=torch.long), max_new_tokens=2)


def test_bad_constructor_arguments_raise():
    hf = tiny_hf_model()
    with pytest.raises(ValueError, match="backend"):
        gpt2_engine.GPT2.from_hf(hf, backend="cuda-graphs")
    with pytest.raises(TypeError, match="dtype"):
        gpt2_engine.GPT2.from_hf(hf, backend="torch", dtype=torch.int8)
    with pytest.raises(ValueError, match="preset"):
        gpt2_engine.GPT2.from_config("gpt3")
    with pytest.raises(ValueError, match="empty"):
        gpt2_engine.GPT2.from_hf(hf, backend="eager").generate_text("")


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_none_and_greedy_only_options_follow_transformers(backend):
    hf = tiny_hf_model(seed=11)
    model = gpt2_engine.GPT2.from_hf(hf, backend=backend)
    ids = torch.randint(0, 101, (1, 6))
    greedy = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    eos = int(greedy[0, 7])
    # eos_token_id=None: no EOS at all; temperature=0 / top_p with do_sample=False: ignored (transformers warns)
    for kwargs in (dict(eos_token_id=None), dict(temperature=0.0), dict(top_p=0.0, top_k=None)):
        expected = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, **kwargs)
        assert torch.equal(model.generate(ids, max_new_tokens=6, pad_token_id=0, **kwargs), expected), kwargs
    stopped = model.generate(ids, max_new_tokens=6, pad_token_id=0, eos_token_id=eos)
    assert torch.equal(model.generate(ids, max_new_tokens=6, pad_token_id=0, eos_token_id=None), greedy)
    assert stopped.shape[1] < greedy.shape[1]


def test_top_k_none_turns_top_k_off():
    model = gpt2_engine.GPT2.from_hf(tiny_hf_model(vocab_size=400, seed=12), backend="torch")
    ids = torch.randint(0, 400, (1, 3))
    out = model.generate(ids, max_new_tokens=1, do_sample=True, top_k=None, temperature=50.0, seed=1,
                         num_return_sequences=64, output_scores=True, return_dict_in_generate=True)
    kept = torch.isfinite(out.scores[0][0]).sum()
    assert kept == 400  # the default top_k=50 would keep only 50 finite scores


def test_generation_configs_layer_like_transformers():
    from transformers import GenerationConfig

    hf = tiny_hf_model(seed=13)
    model = gpt2_engine.GPT2.from_hf(hf, backend="torch")
    model.generation_config = {"do_sample": True, "top_k": 1}    # e.g. a checkpoint's generation_config.json
    ids = torch.randint(0, 101, (1, 5))
    out = model.generate(ids, generation_config=GenerationConfig(max_new_tokens=4), num_return_sequences=2)
    expected = hf.generate(ids, max_new_tokens=4, do_sample=True, top_k=1, num_return_sequences=2, pad_token_id=0)
    assert torch.equal(out[:, :9], expected[:, :9]) and out.shape == (2, 9)
    texts = model.generate(ids, max_new_tokens=4, generation_config=GenerationConfig(do_sample=False),
                           return_dict_in_generate=True)
    assert texts[0].shape == (1, 9) and torch.equal(texts[0], texts.sequences)


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_a_seed_gives_each_prompt_of_a_batch_its_own_samples(backend):
    model = gpt2_engine.GPT2.from_hf(tiny_hf_model(seed=14), backend=backend)
    ids = torch.randint(0, 101, (1, 4)).repeat(3, 1)
    out = model.generate(ids, max_new_tokens=12, do_sample=True, seed=0)
    assert len({tuple(row.tolist()) for row in out}) == 3
    assert torch.equal(out, model.generate(ids, max_new_tokens=12, do_sample=True, seed=0))


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_default_pad_outside_a_small_vocabulary_is_only_an_output_value(backend):
    hf = tiny_hf_model(seed=15)  # config eos/pad default 50256 > vocab 101
    model = gpt2_engine.GPT2.from_hf(hf, backend=backend)
    ids, mask = left_padded_batch([2, 6], 101)
    first = model.generate(ids, attention_mask=mask, max_new_tokens=3)
    eos = int(first[0, 6])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=eos, min_new_tokens=1)
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=eos, min_new_tokens=1, do_sample=False)
    assert torch.equal(out, expected)


def test_threads_sharing_one_model_get_their_own_tokens():
    import threading

    model = gpt2_engine.GPT2.from_hf(tiny_hf_model(seed=16), backend="torch")
    prompts = [torch.randint(0, 101, (1, 3 + i)) for i in range(6)]
    alone = [model.generate(p, max_new_tokens=10) for p in prompts]
    results = [None] * len(prompts)

    def work(i):
        results[i] = model.generate(prompts[i], max_new_tokens=10)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(a, r) for a, r in zip(alone, results))


def test_argument_mistakes_raise_clearly():
    from transformers import GenerationConfig

    model = gpt2_engine.GPT2.from_hf(tiny_hf_model(), backend="torch")
    ids = torch.randint(0, 101, (1, 4))
    with pytest.raises(ValueError, match="not both"):
        model.generate(ids, inputs=ids, max_new_tokens=2)
    with pytest.raises(TypeError, match="generation_config"):
        model.generate(ids, GenerationConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="prompt is empty"):
        model.stream("")  # checked when called, not at the first next()
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        gpt2_engine.GPT2.from_hf(tiny_hf_model(), backend="torch", max_num_batched_tokens=0)
    assert gpt2_engine.GPT2.from_hf(tiny_hf_model(), backend="eager", dtype="bf16").dtype == torch.bfloat16


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_gpt2_small_shape_logits_match_transformers(backend):
    import transformers

    torch.manual_seed(1)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()   # the real GPT-2 small shape
    model = gpt2_engine.GPT2.from_hf(hf, backend=backend)
    ids, mask = left_padded_batch([64, 40], hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, position_ids=_positions(mask)).logits
    diff = (model(ids, attention_mask=mask) - expected)[mask.bool()].abs().max().item()
    assert diff < 1e-4, f"max |logit diff| {diff:.2e}"
