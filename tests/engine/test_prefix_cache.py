"""Automatic prefix caching: reuse (a second request with a 512-token shared prefix computes only
its suffix), LRU eviction under pool pressure, copy-on-write keeps cached blocks unwritten, the
stats, and a property test: random request streams (shared prefixes, forks, beams, sampling,
preemption) give the same tokens with and without the cache."""
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import gpt2_engine
from gpt2_engine.config import GPT2Config
from gpt2_engine.llm_engine import LLMEngine
from gpt2_engine.model import PagedGPT2
from gpt2_engine.sampling import SamplingParams
from gpt2_engine.weights import random_state_dict

CONFIG = GPT2Config(vocab_size=97, n_positions=640, n_embd=32, n_layer=2, n_head=2, bos_token_id=96, eos_token_id=96)
MODEL = PagedGPT2(CONFIG, random_state_dict(CONFIG, seed=0), backend="torch")


def computed_tokens(llm: LLMEngine) -> list[int]:
    """Record the tokens each step computes (sum of the scheduled chunk lengths)."""
    counts, launch = [], llm.runner.launch

    def counting_launch(batch, previous=None):
        counts.append(sum(batch.num_tokens))
        return launch(batch, previous)
    llm.runner.launch = counting_launch
    return counts


def finish(llm: LLMEngine) -> dict[int, list[int]]:
    tokens = {}
    while llm.has_unfinished_requests():
        for event in llm.step():
            tokens.setdefault((event.request_id, event.index), []).append(event.token_id)
    return tokens


def test_a_second_request_with_a_512_token_shared_prefix_computes_only_its_suffix():
    torch.manual_seed(0)
    prefix = torch.randint(0, 96, (512,)).tolist()
    first, second = prefix + [1, 2, 3], prefix + [7, 8, 9, 10, 11]
    params = SamplingParams(max_new_tokens=4)
    llm = LLMEngine(MODEL, block_size=16, num_blocks=128)
    counts = computed_tokens(llm)
    llm.add_request(first, params)
    finish(llm)
    first_cost = sum(counts)
    counts.clear()
    llm.add_request(second, params)
    got = finish(llm)
    assert first_cost == len(first) + 3                 # the whole prompt, then 3 decode tokens
    assert sum(counts) == 5 + 3                         # only the 5-token suffix, then 3 decode tokens
    stats = llm.stats()
    assert stats["prefix_cache_hits"] == 512 and stats["prefix_cache_queries"] == len(first) + len(second)
    uncached = LLMEngine(MODEL, block_size=16, num_blocks=128, enable_prefix_caching=False)
    uncached.add_request(second, params)
    assert list(finish(uncached).values()) == list(got.values())
    assert uncached.stats()["prefix_cache_hits"] == uncached.stats()["prefix_cache_queries"] == 0


def test_freed_blocks_stay_cached_until_the_pool_needs_them():
    prompt = list(range(40))                            # 2 full blocks of 16 can be reused
    params = SamplingParams(max_new_tokens=2)
    llm = LLMEngine(MODEL, block_size=16, num_blocks=8)
    llm.add_request(prompt, params)
    finish(llm)
    assert llm.block_manager.num_free_blocks == 8      # freed, yet still indexed:
    llm.add_request(prompt, params)
    finish(llm)
    assert llm.stats()["prefix_cache_hits"] == 32
    # a 100-token prompt needs 7 of the 8 blocks: the pool hands out the least recently freed
    # first, and gets to the cached ones last, evicting them
    llm.add_request([90] * 100, SamplingParams(max_new_tokens=1))
    finish(llm)
    llm.add_request(prompt, params)
    finish(llm)
    assert llm.stats()["prefix_cache_hits"] == 32      # no new hit: those blocks were evicted


def test_a_shared_cached_block_is_never_written():
    """Two requests share a cached prefix whose last block is full; each writes only its own blocks
    (copy-on-write forks included), and the cached blocks' K/V stay bit-identical."""
    prompt = list(range(32))
    llm = LLMEngine(MODEL, block_size=16, num_blocks=32)
    llm.add_request(prompt + [5], SamplingParams(max_new_tokens=2))
    finish(llm)
    cached = sorted(llm.block_manager.prefix_cache.keys)
    before = llm.runner.kv_cache[:, :, cached].clone()
    llm.add_request(prompt + [6], SamplingParams(max_new_tokens=20, do_sample=True, seed=1), n=3)
    llm.add_request(prompt + [7], SamplingParams(max_new_tokens=12, num_beams=3))
    finish(llm)
    assert llm.stats()["prefix_cache_hits"] >= 2 * 32
    assert torch.equal(llm.runner.kv_cache[:, :, cached], before)


def test_router_stats_report_the_prefix_cache():
    model = gpt2_engine.GPT2.from_config(CONFIG, backend="torch")
    ids = torch.tensor([list(range(40))])
    model.generate(ids, max_new_tokens=2)
    model.generate(ids, max_new_tokens=2)
    stats = model.stats()
    assert stats["prefix_cache_queries"] == 80 and stats["prefix_cache_hits"] == 32


PREFIXES = [list(range(10, 30)), list(range(40, 52)), [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]]
request = st.tuples(
    st.integers(0, len(PREFIXES) - 1),                            # shared prefix
    st.lists(st.integers(0, 95), min_size=1, max_size=6),         # own suffix
    st.sampled_from(["greedy", "sampled", "forks", "beams"]),
    st.integers(0, 3),                                            # arrival step
)


def run_stream(requests, enable_prefix_caching):
    # 24 blocks of 4 tokens: a few of these requests at once fill the pool, so streams preempt
    llm = LLMEngine(MODEL, block_size=4, num_blocks=24, max_num_batched_tokens=24,
                    enable_prefix_caching=enable_prefix_caching, batch_invariant=True)
    kinds = {"greedy": (SamplingParams(max_new_tokens=6), 1),
             "sampled": (SamplingParams(max_new_tokens=6, do_sample=True, seed=5), 1),
             "forks": (SamplingParams(max_new_tokens=6, do_sample=True, top_k=5, seed=7), 2),
             "beams": (SamplingParams(max_new_tokens=6, num_beams=2), 1)}
    order, tokens, step = {}, {}, 0
    while step <= 3 or llm.has_unfinished_requests():
        for k, (prefix, suffix, kind, arrival) in enumerate(requests):
            if arrival == step:
                params, n = kinds[kind]
                order[llm.add_request(PREFIXES[prefix] + suffix, params, n=n)] = k
        for event in llm.step():
            tokens.setdefault((order[event.request_id], event.index), []).append(event.token_id)
        step += 1
    return tokens, llm


@settings(max_examples=20, deadline=None)
@given(requests=st.lists(request, min_size=1, max_size=6))
# found by this test: a decode step preempted a beam group it had already scheduled
@example(requests=[(1, [0], "greedy", 0), (1, [0], "greedy", 0), (0, [0, 0, 0, 0], "beams", 0), (0, [0, 0, 0], "greedy", 0)])
def test_tokens_are_the_same_with_and_without_the_prefix_cache(requests):
    cached, llm = run_stream(requests, True)
    uncached, _ = run_stream(requests, False)
    assert cached == uncached
    assert llm.block_manager.num_free_blocks == 24


def test_a_stream_that_preempts_gives_the_same_tokens_with_and_without_the_cache():
    requests = [(0, [1, 2, 3], "beams", 0), (0, [4], "forks", 0), (1, [5, 6], "sampled", 1), (2, [7], "beams", 1),
                (0, [1, 2, 3], "greedy", 2), (2, [9, 9], "forks", 3)]
    cached, llm = run_stream(requests, True)
    uncached, plain = run_stream(requests, False)
    assert llm.scheduler.num_preemptions > 0 and plain.scheduler.num_preemptions > 0
    assert llm.stats()["prefix_cache_hits"] > 0
    assert cached == uncached
