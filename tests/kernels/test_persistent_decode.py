"""The persistent decode step (kernels/persistent_decode.py, schedules from engine/persistent_decode.py)
under Triton's interpreter, against the torch backend's multi-launch step on the same inputs.

Each case builds a random-weight model, a KV cache filled with noise, scattered block tables and
mixed context lengths (across cache-block and KV-tile boundaries), runs one decode step through the
persistent kernel and through the torch backend on a copy of the cache, and compares logits,
greedy tokens and the KV rows the step writes. fp32: max error <= 1e-5 of the reference's max
magnitude; fp16: the 2x rule (at most twice the error of the torch backend run in fp16, against
the fp32 torch backend, plus a floor of 1e-5 of the magnitude). The activation arena and the
workspace are NaN-poisoned before each launch, so an element read before it is written fails."""
import pytest
import torch

from gpt2_engine.kv_cache import allocate_kv_cache
from gpt2_engine import torch_backend
from gpt2_engine.config import GPT2Config
from gpt2_engine.kernels import persistent_decode as pk
from gpt2_engine.model import PagedGPT2, pack_step
from gpt2_engine.persistent_decode import PersistentDecode
from gpt2_engine.weights import random_state_dict
from tests.seeding import reproducible_seed

FP32_RTOL = 1e-5
FP16_FLOOR = 1e-5
TINY = GPT2Config(vocab_size=101, n_embd=48, n_head=3, n_layer=2, n_positions=160)   # D = 16, odd widths
SMALL_DIMS = GPT2Config(vocab_size=300, n_embd=768, n_head=12, n_layer=1, n_positions=256)   # GPT-2 small's widths



def _models(cfg, dtype):
    state = random_state_dict(cfg, seed=int(torch.randint(0, 1 << 30, ())))
    for name, t in state.items():   # GPT-2-like LayerNorms (gamma != 1, beta != 0) exercise the folding
        if ".ln_" in name or name.startswith("ln_f"):
            state[name] = t + 0.2 * torch.randn_like(t)
    return PagedGPT2(cfg, state, backend="triton", dtype=dtype), state


def _step(cfg, context_lens, block_size, num_blocks):
    """A decode step over scattered block tables: row i's blocks are a random run of a permutation."""
    perm = torch.randperm(num_blocks).tolist()
    tables, used = [], 0
    for c in context_lens:
        n = -(-c // block_size)
        tables.append(perm[used:used + n])
        used += n
    slots = [t[(c - 1) // block_size] * block_size + (c - 1) % block_size for t, c in zip(tables, context_lens)]
    return pack_step(cfg.vocab_size, torch.device("cpu"), token_ids=torch.randint(0, cfg.vocab_size, (len(tables),)).tolist(),
                     positions=[c - 1 for c in context_lens], num_prefill_tokens=0, slot_mapping=slots,
                     block_tables=tables, context_lens=context_lens)


def _poisoned_run(pd, step, **kwargs):
    pd.act.fill_(float("nan"))
    pd.workspace.fill_(float("nan"))
    return pd.run(step, **kwargs)


def _reference(cfg, state, step, kv, dtype):
    """The torch backend's multi-launch step (unfolded LayerNorms) on a copy of the cache."""
    kv = kv.clone()
    return PagedGPT2(cfg, state, backend="torch", dtype=dtype).forward(step, kv), kv


CASES = [  # (config, block size, context lengths): batch 1..16, lengths across block and 64-token tile edges
    (TINY, 4, [1]),
    (TINY, 4, [5, 64, 65, 130, 3]),
    (TINY, 16, [16, 17, 1, 63, 64, 65, 100, 128, 129, 159, 2, 33, 48, 80, 97, 160]),
]


@pytest.mark.parametrize("cfg, block_size, context_lens", CASES, ids=["b1", "b5", "b16"])
def test_step_fp32_matches_torch_backend(cfg, block_size, context_lens):
    seed = reproducible_seed()
    model, state = _models(cfg, torch.float32)
    num_blocks = sum(-(-c // block_size) for c in context_lens) + 3
    kv = allocate_kv_cache(cfg, num_blocks, block_size, torch.float32, "cpu").normal_()
    step = _step(cfg, context_lens, block_size, num_blocks)
    expected, expected_kv = _reference(cfg, state, step, kv, torch.float32)
    pd = PersistentDecode(model, kv, block_size)
    logits = _poisoned_run(pd, step)
    scale = expected.abs().max()
    assert (logits - expected).abs().max() <= FP32_RTOL * scale, f"seed {seed}"
    assert torch.equal(logits.argmax(1), expected.argmax(1)), f"seed {seed}"
    assert (kv - expected_kv).abs().max() <= FP32_RTOL * expected_kv.abs().max(), f"seed {seed}: KV rows"
    # the kernel's torch twin runs the same schedule to the same result
    kv_twin = kv.clone()
    pd.kv_cache = kv_twin
    twin = _poisoned_run(pd, step, reference=True)
    assert (twin - logits).abs().max() <= FP32_RTOL * scale, f"seed {seed}: run_schedule_ref"


@pytest.mark.parametrize("cfg, block_size, context_lens", [(TINY, 8, [9, 70, 1, 33]), (SMALL_DIMS, 16, [70, 16, 200])],
                         ids=["tiny", "gpt2-small-dims"])
def test_step_fp16_2x_rule(cfg, block_size, context_lens, monkeypatch):
    """fp16, the engine's GPU dtype; SMALL_DIMS has GPT-2 small's n_embd 768 and 12 heads (one layer, a
    short vocabulary and context to keep the interpreter fast). The fp16 reference is torch's own fp16
    ops: on CPU the torch backend would otherwise widen 16-bit weights to fp32 arithmetic
    (torch_backend.compute_dtype), as it does on a machine without our C++ kernels."""
    seed = reproducible_seed()
    monkeypatch.setattr(torch_backend, "compute_dtype", lambda device, weight_dtype: weight_dtype)
    model, state = _models(cfg, torch.float16)
    kv32 = allocate_kv_cache(cfg, 24, block_size, torch.float32, "cpu").normal_()
    step = _step(cfg, context_lens, block_size, 24)
    exact, _ = _reference(cfg, state, step, kv32, torch.float32)
    torch16, _ = _reference(cfg, state, step, kv32.half(), torch.float16)
    kv16 = kv32.half()
    logits = _poisoned_run(PersistentDecode(model, kv16, block_size), step)
    ours, theirs = (logits - exact).abs().max(), (torch16 - exact).abs().max()
    assert ours <= 2 * theirs + FP16_FLOOR * exact.abs().max(), f"seed {seed}: {ours} vs torch fp16 {theirs}"


def test_launch_rearms_counters_and_repeats_bitwise():
    """The last program to leave zeroes the queue and the stage counters: a second launch runs the whole
    schedule again (poisoned arena) to the same bits."""
    reproducible_seed()
    model, _ = _models(TINY, torch.float32)
    kv = allocate_kv_cache(TINY, 8, 4, torch.float32, "cpu").normal_()
    step = _step(TINY, [7, 13], 4, 8)
    pd = PersistentDecode(model, kv, 4)
    saved = kv.clone()
    first = _poisoned_run(pd, step)
    assert not pd.counters.any()
    kv.copy_(saved)
    assert torch.equal(_poisoned_run(pd, step), first)


def test_out_of_order_schedule_is_caught():
    """check_schedule (run on every built schedule) rejects an instruction taken before an instruction it waits on."""
    model, _ = _models(TINY, torch.float32)
    pd = PersistentDecode(model, allocate_kv_cache(TINY, 4, 4, torch.float32, "cpu"), 4)
    schedule = pd.schedule(2)
    table = schedule.instructions
    pk.check_schedule(table, schedule.num_counters)     # the built order passes
    attn = int((table[:, pk.F["op"]] == pk.ATTN).nonzero()[0])
    swapped = table.clone()
    swapped[[attn - 1, attn]] = table[[attn, attn - 1]]   # the first attention chunk before the last QKV tile
    with pytest.raises(ValueError, match="topological order"):
        pk.check_schedule(swapped, schedule.num_counters)
    with pytest.raises(ValueError, match="topological order"):
        pk.check_schedule(table.flip(0), schedule.num_counters)
    bad = table.clone()
    bad[0, pk.F["done_ctr"]] = schedule.num_counters
    with pytest.raises(ValueError, match="done_ctr"):
        pk.check_schedule(bad, schedule.num_counters)


def test_bad_inputs_raise():
    model, _ = _models(TINY, torch.float32)
    kv = allocate_kv_cache(TINY, 40, 4, torch.float32, "cpu")
    pd = PersistentDecode(model, kv, 4)
    seventeen = _step(TINY, [2] * 17, 4, 40)
    assert not pd.covers(seventeen)
    with pytest.raises(ValueError, match="context_lens has 17 rows"):
        pd.run(seventeen)
    with pytest.raises(ValueError, match="backend='triton'"):
        PersistentDecode(PagedGPT2(TINY, random_state_dict(TINY), backend="torch"), kv, 4)
    with pytest.raises(ValueError, match="num_programs"):
        pk.run_schedule(pd.schedule(1), pd.counters, pd.weights, pd.params, pd.act, pd.workspace, kv,
                        *(getattr(_step(TINY, [3], 4, 40), n) for n in ("embed_indices", "slot_mapping", "block_tables",
                                                                        "context_lens")),
                        kv_v_offset=pd.kv_v_offset, eps=1e-5, sm_scale=0.25, num_programs=0)


def test_time_model_counts_the_schedule():
    """Stages, bytes and the bounds of the per-step time model, from a built schedule (no timing)."""
    from gpt2_engine.persistent_decode import Hardware, time_model

    model, _ = _models(TINY, torch.float16)
    pd = PersistentDecode(model, allocate_kv_cache(TINY, 4, 16, torch.float16, "cpu"), 16)
    schedule = pd.schedule(1)
    est = time_model(schedule, context_len=64)
    assert est["stages"] == 2 + 5 * TINY.n_layer                 # embed, 5 per layer, LM head
    C, V = TINY.n_embd, TINY.vocab_size
    tiles = sum(-(-k // schedule.block_k) * -(-n // schedule.block_n)
                for k, n in [(C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)] * TINY.n_layer + [(C, V)])
    kv_bytes = TINY.n_layer * 2 * 64 * C * 2                      # one row, 64 cached tokens, K and V, fp16
    assert est["mbytes"] * 1e6 == tiles * schedule.block_k * schedule.block_n * 2 + kv_bytes
    assert est["step_us"] == max(est["stream_us"], est["chain_us"]) + Hardware().t_launch
    faster = time_model(schedule, context_len=64, hw=Hardware(t_l2=0.1, t_atomic=0.1, t_release=0.1))
    assert faster["chain_us"] < est["chain_us"]
    assert pd.schedule(16).instructions.shape[0] > schedule.instructions.shape[0]   # attention per row
