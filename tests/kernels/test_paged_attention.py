"""write_kv and split-K paged decode attention against their references and against dense float64
attention over the gathered K/V (Triton's interpreter on CPU; bf16 on GPU only)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from gpt2_engine.kernels.arrival_counter import arrival_counters
from gpt2_engine.kernels.paged_attention import (
    MAX_SPLITS,
    paged_decode_attention,
    paged_decode_attention_ref,
    write_kv,
    write_kv_ref,
)
from gpt2_engine.kernels.launch_plan import attention_plan
from tests.conftest import DEVICE, REPO_ROOT


def _paged_problem(context_lens, num_heads, head_dim, block_size, dtype, *, spare_blocks=3, seed=0):
    """Shuffled block tables over a NaN-poisoned pool: every used cache row holds random K/V, every
    unused row (the tail of each last block, the spare blocks) holds NaN, and table entries past a
    sequence's last block hold garbage (-1 or out-of-range ids) that the kernel must not read."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(context_lens)
    used = [-(-n // block_size) for n in context_lens]
    max_blocks = max(used) + 1
    num_blocks = sum(used) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    k_cache = torch.full((num_blocks, block_size, num_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    tables = torch.empty((batch, max_blocks), dtype=torch.int32)
    keys, values = [], []
    start = 0
    for i, n in enumerate(context_lens):
        blocks = perm[start:start + used[i]]
        start += used[i]
        garbage = torch.where(torch.arange(max_blocks - used[i]) % 2 == 0, -1, num_blocks + 1000)
        tables[i] = torch.cat([blocks, garbage]).to(torch.int32)
        k = torch.randn(n, num_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(n, num_heads, head_dim, generator=gen).to(dtype)
        slots = blocks.repeat_interleave(block_size) * block_size + torch.arange(block_size).repeat(used[i])
        k_cache.view(-1, num_heads, head_dim)[slots[:n]] = k
        v_cache.view(-1, num_heads, head_dim)[slots[:n]] = v
        keys.append(k)
        values.append(v)
    # q as a strided view: the query slice of a fused [B, 3, H, D] projection.
    qkv = torch.randn(batch, 3, num_heads, head_dim, generator=gen).to(dtype)
    q = qkv[:, 0]
    lens = torch.tensor(context_lens, dtype=torch.int32)
    to = lambda t: t.to(DEVICE)  # noqa: E731
    return to(q), to(k_cache), to(v_cache), to(tables), to(lens), keys, values


def _dense_f64(q, keys, values, scale=None):
    """Independent check: softmax(q K^T) V per sequence over its contiguous K/V, in float64."""
    out = torch.empty(q.shape, dtype=torch.float64)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    for i, (k, v) in enumerate(zip(keys, values)):
        scores = torch.einsum("hd,thd->ht", q[i].double().cpu(), k.double()) * scale
        out[i] = torch.einsum("ht,thd->hd", scores.softmax(-1), v.double())
    return out


def _poisoned_out(q):
    return torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)


def _rel_err(x, ref):
    return ((x.double().cpu() - ref).abs().max() / ref.abs().max()).item()


MIXED_LENS = [1, 16, 17, 5, 33, 64, 97]   # 1, block_size, block_size + 1 and odd values in one batch


@pytest.mark.parametrize("block_size,head_dim", [(16, 64), (8, 16), (32, 32)])
@pytest.mark.parametrize("num_splits", [1, 4, None])
def test_paged_decode_fp32_matches_dense_and_ref(block_size, head_dim, num_splits):
    q, kc, vc, tables, lens, keys, values = _paged_problem(MIXED_LENS, 2, head_dim, block_size, torch.float32)
    out = paged_decode_attention(q, kc, vc, tables, lens, num_splits=num_splits, out=_poisoned_out(q))
    assert not out.isnan().any()
    dense = _dense_f64(q, keys, values)
    assert _rel_err(out, dense) <= 1e-5
    ref = paged_decode_attention_ref(q, kc, vc, tables, lens)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_split_and_unsplit_agree_and_empty_splits_are_neutral():
    # num_splits up to MAX_SPLITS: the short sequences leave most of their splits empty.
    lens = [1, 3, 200, 64, 65, 130]
    q, kc, vc, tables, lens_t, keys, values = _paged_problem(lens, 2, 32, 16, torch.float32)
    outs = {s: paged_decode_attention(q, kc, vc, tables, lens_t, num_splits=s, out=_poisoned_out(q))
            for s in (1, 2, 4, 7, MAX_SPLITS, None)}
    for s, o in outs.items():
        assert not o.isnan().any(), s
        assert (o - outs[1]).abs().max().item() <= 2e-6, s
    assert _rel_err(outs[4], _dense_f64(q, keys, values)) <= 1e-5
    # single launch: the last split of each (b, h) merged and re-armed its counter, so a second
    # launch elects again and gives the same bits
    assert int(arrival_counters(q.device, 1).abs().sum()) == 0
    for s in (7, MAX_SPLITS):
        assert torch.equal(paged_decode_attention(q, kc, vc, tables, lens_t, num_splits=s), outs[s]), s


def test_arrival_counters_grow_and_keep_old_buffers():
    device = torch.device(DEVICE)
    small = arrival_counters(device, 1)
    big = arrival_counters(device, small.numel() + 1)
    assert big.numel() > small.numel() and big.dtype == torch.int32 and not big.any()
    assert arrival_counters(device, 1) is big   # the largest buffer serves every later launch


def test_paged_decode_fp16_two_x_rule():
    q, kc, vc, tables, lens, keys, values = _paged_problem(MIXED_LENS + [150], 2, 64, 16, torch.float16, seed=1)
    dense = _dense_f64(q, keys, values)
    torch_fp16 = paged_decode_attention_ref(q, kc, vc, tables, lens)
    for num_splits in (1, 3):
        out = paged_decode_attention(q, kc, vc, tables, lens, num_splits=num_splits, out=_poisoned_out(q))
        assert out.dtype == torch.float16 and not out.isnan().any()
        err = (out.double().cpu() - dense).abs().max().item()
        torch_err = (torch_fp16.double().cpu() - dense).abs().max().item()
        assert err <= 2 * torch_err + 1e-4, (err, torch_err)


def test_paged_decode_sm_scale_and_identity_table():
    # Contiguous pool with an identity (arange) block table: the benchmark's "contiguous" layout.
    lens = [40, 7]
    q, kc, vc, tables, lens_t, keys, values = _paged_problem(lens, 3, 16, 8, torch.float32)
    identity = torch.arange(tables.numel(), dtype=torch.int32, device=q.device).view(tables.shape)
    kc2 = torch.full((tables.numel(), *kc.shape[1:]), float("nan"), device=q.device)
    vc2 = kc2.clone()
    for i, n in enumerate(lens):
        used = -(-n // 8)
        kc2[identity[i, :used].long()] = kc[tables[i, :used].long()]
        vc2[identity[i, :used].long()] = vc[tables[i, :used].long()]
    out = paged_decode_attention(q, kc2, vc2, identity, lens_t, sm_scale=0.3, num_splits=2)
    assert _rel_err(out, _dense_f64(q, keys, values, scale=0.3)) <= 1e-5


def test_split_plan_fixed_chunks():
    assert attention_plan(1024, 16) == (8, 2)          # 128-token chunks of two 64-token tiles
    assert attention_plan(64, 16) == (1, 2)            # one tile: nothing to split
    assert attention_plan(8192, 16) == (MAX_SPLITS, 2)
    assert attention_plan(1 << 20, 16)[0] <= MAX_SPLITS  # beyond 8192 tokens the chunks grow
    assert attention_plan(1024, 16, 7) == (6, 3)       # explicit: the context cut into runs of cdiv(16, 7) tiles


def test_batch_invariant_split():
    """A sequence's output does not depend on the batch: alone (a narrow block table, one split) or
    next to longer sequences (a wide table, many splits), the same bits."""
    lens = [150, 1000, 7, 300]
    q, kc, vc, tables, lens_t, _, _ = _paged_problem(lens, 2, 32, 16, torch.float32, seed=3)
    batched = paged_decode_attention(q, kc, vc, tables, lens_t)
    for i, n in enumerate(lens):
        width = -(-n // 16)
        alone = paged_decode_attention(q[i:i + 1], kc, vc, tables[i:i + 1, :width].contiguous(), lens_t[i:i + 1])
        assert torch.equal(alone[0], batched[i]), n


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("block_size,num_heads,head_dim", [(16, 3, 64), (8, 2, 16)])
def test_write_kv_writes_exactly_its_slots(slot_dtype, block_size, num_heads, head_dim):
    num_blocks, tokens = 5, 13
    # k, v as strided views of a fused [T, 3, H, D] projection.
    qkv = torch.randn(tokens, 3, num_heads, head_dim, device=DEVICE)
    k, v = qkv[:, 1], qkv[:, 2]
    slots = torch.randperm(num_blocks * block_size)[:tokens]
    slots[[2, 7, 11]] = -1                                     # padding tokens: skipped
    slots = slots.to(slot_dtype).to(DEVICE)
    k_cache = torch.full((num_blocks, block_size, num_heads, head_dim), float("nan"), device=DEVICE)
    v_cache = torch.full_like(k_cache, float("nan"))
    write_kv(k, v, k_cache, v_cache, slots)
    k_ref, v_ref = k_cache.clone().fill_(float("nan")), v_cache.clone().fill_(float("nan"))
    write_kv_ref(k, v, k_ref, v_ref, slots)
    torch.testing.assert_close(k_cache, k_ref, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(v_cache, v_ref, equal_nan=True, rtol=0, atol=0)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[slots[slots >= 0].long().cpu()] = True
    flat_k = k_cache.view(-1, num_heads, head_dim).cpu()
    assert not flat_k[written].isnan().any() and flat_k[~written].isnan().all()
    assert torch.equal(flat_k[slots[slots >= 0].long().cpu()], k[slots >= 0].cpu())


def test_write_kv_fp16_then_decode():
    # The runtime's order: write the current token's K/V (its cache row poisoned first), then attend.
    lens = [9, 16, 1]
    q, kc, vc, tables, lens_t, keys, values = _paged_problem(lens, 2, 32, 8, torch.float16, seed=3)
    new_k = torch.randn(3, 2, 32, dtype=torch.float16, device=DEVICE)
    new_v = torch.randn(3, 2, 32, dtype=torch.float16, device=DEVICE)
    slots = []
    for i, n in enumerate(lens[:2]):
        slot = int(tables[i, (n - 1) // 8]) * 8 + (n - 1) % 8
        kc.view(-1, 2, 32)[slot] = float("nan")
        vc.view(-1, 2, 32)[slot] = float("nan")
        keys[i][-1], values[i][-1] = new_k[i].cpu(), new_v[i].cpu()
        slots.append(slot)
    slots.append(-1)   # sequence 2 is a padding row this step: its cache stays as it was
    write_kv(new_k, new_v, kc, vc, torch.tensor(slots, dtype=torch.int32, device=DEVICE))
    out = paged_decode_attention(q, kc, vc, tables, lens_t, out=_poisoned_out(q))
    dense = _dense_f64(q, keys, values)
    torch_err = (paged_decode_attention_ref(q, kc, vc, tables, lens_t).double().cpu() - dense).abs().max().item()
    assert not out.isnan().any()
    assert (out.double().cpu() - dense).abs().max().item() <= 2 * torch_err + 1e-4


def test_bad_inputs_raise_clear_errors():
    q, kc, vc, tables, lens, _, _ = _paged_problem([5, 20], 2, 16, 8, torch.float32)
    call = paged_decode_attention
    with pytest.raises(ValueError, match="context_lens"):
        call(q, kc, vc, tables, torch.tensor([0, 3], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="context_lens"):
        call(q, kc, vc, tables, torch.tensor([5, 10_000], dtype=torch.int32, device=DEVICE))
    with pytest.raises(TypeError, match="context_lens"):
        call(q, kc, vc, tables, lens.long())
    with pytest.raises(TypeError, match="block_tables"):
        call(q, kc, vc, tables.long(), lens)
    with pytest.raises(ValueError, match="block_tables"):
        call(q, kc, vc, tables[:1], lens)
    with pytest.raises(TypeError, match="q"):
        call(q.half(), kc, vc, tables, lens)
    with pytest.raises(TypeError, match="v_cache"):
        call(q, kc, vc.half(), tables, lens)
    with pytest.raises(ValueError, match="q must be"):
        call(q[:, :1], kc, vc, tables, lens)
    with pytest.raises(ValueError, match="num_splits"):
        call(q, kc, vc, tables, lens, num_splits=0)
    with pytest.raises(ValueError, match="out"):
        call(q, kc, vc, tables, lens, out=torch.empty(2, 2, 8, device=DEVICE))
    with pytest.raises(ValueError, match="power of two"):
        call(q[..., :12], kc[..., :12].contiguous(), vc[..., :12].contiguous(), tables, lens)

    k = torch.randn(3, 2, 16, device=DEVICE)
    slots = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE)
    with pytest.raises(TypeError, match="slot_mapping"):
        write_kv(k, k, kc, vc, slots.float())
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv(k, k, kc, vc, slots[:2])
    with pytest.raises(TypeError, match="k dtype"):
        write_kv(k.half(), k, kc, vc, slots)
    with pytest.raises(ValueError, match="v must be"):
        write_kv(k, k[:, :1], kc, vc, slots)
    with pytest.raises(ValueError, match="v_cache"):
        write_kv(k, k, kc, vc[:1], slots)


@pytest.mark.cuda
def test_paged_decode_bf16_on_gpu():
    q, kc, vc, tables, lens, keys, values = _paged_problem(MIXED_LENS * 4, 12, 64, 16, torch.bfloat16, seed=2)
    dense = _dense_f64(q, keys, values)
    torch_bf16 = paged_decode_attention_ref(q, kc, vc, tables, lens)
    for num_splits in (1, 4, None):
        out = paged_decode_attention(q, kc, vc, tables, lens, num_splits=num_splits, out=_poisoned_out(q))
        err = (out.double().cpu() - dense).abs().max().item()
        assert err <= 2 * (torch_bf16.double().cpu() - dense).abs().max().item() + 1e-3


@pytest.mark.cuda
def test_write_kv_bf16_on_gpu():
    k = torch.randn(7, 12, 64, dtype=torch.bfloat16, device="cuda")
    kc = torch.zeros(4, 16, 12, 64, dtype=torch.bfloat16, device="cuda")
    vc, kr, vr = kc.clone(), kc.clone(), kc.clone()
    slots = torch.tensor([3, -1, 17, 40, 63, 0, 5], dtype=torch.int64, device="cuda")
    write_kv(k, k * 2, kc, vc, slots)
    write_kv_ref(k, k * 2, kr, vr, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


def test_compile_report_clean(tmp_path):
    # A fresh interpreter without TRITON_INTERPRET: the AOT compile needs the real JIT functions.
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "gpt2_engine.cli", "kernels", "--filter", "paged_", "--json", str(report)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and report.exists(), proc.stdout + proc.stderr
    rows = json.loads(report.read_text())
    labels = {r["label"] for r in rows}
    assert {"paged_decode_fp16_bs16_d64_split", "paged_write_kv_fp16_h16_d64"} <= labels and len(rows) == 2 * len(labels)
    assert all(r["ok"] for r in rows), proc.stdout
