"""PagedGPT2 and LLMEngine on CPU against transformers: logits, greedy tokens, continuous batching,
preemption, chunked prefill, copy-on-write forks, and bad input."""
from collections import Counter

import pytest
import torch
import transformers

from gpt2_engine.config import GPT2Config
from gpt2_engine.bench.launch_count import count_decode_step, per_layer_counts
from gpt2_engine.llm_engine import LLMEngine
from gpt2_engine.model import PagedGPT2
from gpt2_engine.sampling import SamplingParams

CONFIG = GPT2Config(vocab_size=97, n_positions=96, n_embd=64, n_layer=2, n_head=4, bos_token_id=96, eos_token_id=96)
PROMPTS = [[5, 7, 9, 11, 3, 2, 1], [40, 41], [8] * 19 + [50, 60, 70], [90]]


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    # a wide init so that greedy continuations are varied rather than one repeated token
    hf_config = transformers.GPT2Config(**CONFIG.to_hf_dict(), initializer_range=0.2)
    return transformers.GPT2LMHeadModel(hf_config).eval()


@pytest.fixture(scope="module")
def state_dict(hf_model):
    return {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items()
            if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"}


@pytest.fixture(scope="module")
def model(state_dict):
    return PagedGPT2(CONFIG, state_dict, backend="torch")


def run(engine: LLMEngine, requests: dict[int, list[tuple]]) -> dict[tuple[int, int], list[int]]:
    """Drive the engine; requests[step] lists the (prompt, params, n) added before that step.
    Returns the tokens of each (order of addition, index)."""
    tokens, order, step = {}, {}, 0
    while step <= max(requests, default=0) or engine.has_unfinished_requests():
        for prompt, params, n in requests.get(step, []):
            order[engine.add_request(prompt, params, n=n)] = len(order)
        for event in engine.step():
            tokens.setdefault((order[event.request_id], event.index), []).append(event.token_id)
        step += 1
    return tokens


def hf_greedy(hf_model, prompt, max_new_tokens, eos=None):
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                            eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_prompt_logits_match_transformers(hf_model, model):
    for prompt, logits in zip(PROMPTS, model.prompt_logits(PROMPTS)):
        expected = hf_model(torch.tensor([prompt])).logits[0]
        assert logits.dtype == torch.float32
        assert (logits - expected).abs().max() < 1e-4


def test_decode_logits_match_transformers(hf_model, model):
    """output_scores of a greedy run without processors are the raw logits of every decode step."""
    engine = LLMEngine(model, num_blocks=16, block_size=4)
    prompt = PROMPTS[0]
    engine.add_request(prompt, SamplingParams(max_new_tokens=8, output_scores=True))
    events = [e for _ in range(8) for e in engine.step()]
    full = prompt + [e.token_id for e in events]
    expected = hf_model(torch.tensor([full])).logits[0, len(prompt) - 1:-1]
    assert (torch.stack([e.scores for e in events]) - expected).abs().max() < 1e-4


def test_triton_backend_logits_match_transformers(hf_model, state_dict):
    """The kernels under the interpreter (on a CPU): prefill logits, then an engine run with a chunked
    prompt (the second chunk attends to its cached prefix) and two forked return sequences."""
    triton_model = PagedGPT2(CONFIG, state_dict, backend="triton")
    prompts = [PROMPTS[0], PROMPTS[1]]
    for prompt, logits in zip(prompts, triton_model.prompt_logits(prompts)):
        assert (logits - hf_model(torch.tensor([prompt])).logits[0]).abs().max() < 1e-3
    engine = LLMEngine(triton_model, num_blocks=8, block_size=4, max_num_batched_tokens=4)
    engine.add_request(prompts[0], SamplingParams(max_new_tokens=3, output_scores=True), n=2)
    events = [e for _ in range(4) for e in engine.step()]
    assert not engine.has_unfinished_requests() and len(events) == 6
    for index in (0, 1):
        mine = [e for e in events if e.index == index]
        full = prompts[0] + [e.token_id for e in mine]
        expected = hf_model(torch.tensor([full])).logits[0, len(prompts[0]) - 1:-1]
        assert (torch.stack([e.scores for e in mine]) - expected).abs().max() < 1e-3


def test_greedy_matches_transformers_single_and_batch(hf_model, model):
    params = SamplingParams(max_new_tokens=12)
    got = run(LLMEngine(model, num_blocks=64, block_size=4), {0: [(p, params, 1) for p in PROMPTS]})
    for i, prompt in enumerate(PROMPTS):
        assert got[(i, 0)] == hf_greedy(hf_model, prompt, 12)


def test_eos_stops_generation(hf_model, model):
    prompt = PROMPTS[0]
    free_run = hf_greedy(hf_model, prompt, 10)
    eos = free_run[3]
    expected = hf_greedy(hf_model, prompt, 10, eos=eos)
    got = run(LLMEngine(model, num_blocks=16), {0: [(prompt, SamplingParams(max_new_tokens=10, eos_token_ids=(eos,)), 1)]})
    assert got[(0, 0)] == expected == free_run[:free_run.index(eos) + 1]


def test_greedy_return_sequences_are_identical(hf_model, model):
    params = SamplingParams(max_new_tokens=9)
    got = run(LLMEngine(model, num_blocks=32, block_size=4), {0: [(PROMPTS[0], params, 3)]})
    assert [got[(0, i)] for i in range(3)] == [hf_greedy(hf_model, PROMPTS[0], 9)] * 3


def alone(model, prompt, params, n=1):
    got = run(LLMEngine(model, num_blocks=64, block_size=4), {0: [(prompt, params, n)]})
    return [got[(0, i)] for i in range(n)]


def test_staggered_arrivals_with_preemption_give_the_tokens_of_each_alone(model):
    greedy, sampled = SamplingParams(max_new_tokens=14), SamplingParams(max_new_tokens=14, do_sample=True, seed=3)
    requests = {0: [(PROMPTS[0], greedy, 1), (PROMPTS[2], sampled, 1)], 2: [(PROMPTS[1], sampled, 1)],
                5: [(PROMPTS[3], greedy, 2), (PROMPTS[0], sampled, 1)]}
    # 12 blocks of 4 tokens cannot hold these five sequences at once: the scheduler has to preempt
    engine = LLMEngine(model, num_blocks=12, block_size=4)
    got = run(engine, requests)
    assert engine.scheduler.num_preemptions > 0
    flat = [r for step in sorted(requests) for r in requests[step]]
    for k, (prompt, params, n) in enumerate(flat):
        assert [got[(k, i)] for i in range(n)] == alone(model, prompt, params, n)
    assert engine.block_manager.num_free_blocks == 12


def test_chunked_prefill_gives_the_same_tokens(model):
    params = SamplingParams(max_new_tokens=6)
    engine = LLMEngine(model, num_blocks=64, block_size=4, max_num_batched_tokens=5)
    got = run(engine, {0: [(p, params, 1) for p in PROMPTS]})
    for i, prompt in enumerate(PROMPTS):
        assert [got[(i, 0)]] == alone(model, prompt, params)


def test_sampled_forks_never_corrupt_a_sibling(model):
    """Siblings share the prompt's blocks (a partly filled last block included) copy-on-write."""
    params = SamplingParams(max_new_tokens=10, do_sample=True, seed=11)
    got = run(LLMEngine(model, num_blocks=64, block_size=4), {0: [(PROMPTS[0], params, 4)]})
    siblings = [got[(0, i)] for i in range(4)]
    assert len({tuple(s) for s in siblings}) > 1            # the seeds differ, so the samples do
    for i in range(4):
        # sibling i alone: its generator is the i-th of the request whatever the others do
        solo = run(LLMEngine(model, num_blocks=64, block_size=4), {0: [(PROMPTS[0], params, i + 1)]})
        assert solo[(0, i)] == siblings[i]


def test_abort_frees_blocks(model):
    engine = LLMEngine(model, num_blocks=16, block_size=4)
    request = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=30), n=2)
    engine.step()
    engine.abort_request(request)
    assert not engine.has_unfinished_requests() and engine.block_manager.num_free_blocks == 16


@pytest.mark.parametrize("prompt, params, message", [
    ([], SamplingParams(), "empty"),
    ([1, 97], SamplingParams(), "outside the vocabulary"),
    ([-1], SamplingParams(), "outside the vocabulary"),
    ([1] * 90, SamplingParams(max_new_tokens=10), "n_positions"),
    ([1] * 30, SamplingParams(max_new_tokens=40), "KV blocks"),
])
def test_bad_requests_raise_value_errors(model, prompt, params, message):
    engine = LLMEngine(model, num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, params)
    with pytest.raises(ValueError, match="empty"):
        engine.prompt_logits([[1], []])


@pytest.mark.cuda
def test_cuda_graph_replay_matches_eager_decode(state_dict):
    """Decode steps replayed from CUDA graphs (batch 3 pads to bucket 4) give the eager logits."""
    gpu_model = PagedGPT2(CONFIG, state_dict, backend="triton", device="cuda")
    scores = []
    for use_graphs in (False, True):
        engine = LLMEngine(gpu_model, num_blocks=64, block_size=4, max_num_seqs=8, use_cuda_graphs=use_graphs)
        assert (engine.runner.graphs is not None) == use_graphs
        for prompt in PROMPTS[:3]:
            engine.add_request(prompt, SamplingParams(max_new_tokens=6, output_scores=True))
        events = [e for _ in range(6) for e in engine.step()]
        scores.append(torch.stack([e.scores for e in events]))
    assert (scores[0] - scores[1]).abs().max() < 1e-4


@pytest.mark.parametrize("batch_size,prompt_len", [(1, 200), (3, 4)], ids=["split-attention", "one-split"])
def test_launch_count_per_layer(batch_size, prompt_len, device):
    """5 launches per layer (ln_1+QKV GEMM with the KV write, paged attention with its split merge,
    c_proj + residual, c_fc, mlp c_proj) + 2 per step (embedding_bag, LM head; fp32: no logits cast)."""
    config = GPT2Config(vocab_size=101, n_positions=300, n_embd=32, n_layer=1, n_head=2)
    per_layer, fixed, _, two = per_layer_counts(config, batch_size=batch_size, prompt_len=prompt_len, device=device)
    assert (two.num_splits > 1) == (prompt_len > 128)   # fixed 128-token KV chunks, whatever the batch
    assert two.triton == Counter({"_ln_linear_kernel": 9, "_paged_decode_kernel": 2})
    assert two.torch == Counter({"embedding_bag": 1}) and two.host_syncs == 0
    assert (per_layer, fixed) == (5, 2)


def test_launch_count_torch_backend_runs_no_triton(device):
    config = GPT2Config(vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    torch_count = count_decode_step(config, backend="torch", device=device)
    assert not torch_count.triton and torch_count.torch["embedding_bag"] == 1
