"""Paged decode attention: GB/s on KV bytes (fp16, GPT-2 small heads 12 x 64, block_size 16).

GPU: batch 1..256 x context 128..1024, paged (shuffled block table) against contiguous (the same
kernel over a contiguous pool with an identity block table, block i of sequence b = b * max_blocks
+ i), and split vs unsplit at batch 1, context 1024. CPU: the torch reference at one small size
(Triton's interpreter is far too slow to time). Metrics land in benchmark.extra_info.
"""
import pytest
import torch

from benchmarks.conftest import HAS_CUDA
from gpt2_engine.kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref

HEADS, HEAD_DIM, BLOCK_SIZE = 12, 64, 16
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="Triton kernel timing needs a CUDA GPU (the CPU interpreter is not a benchmark)")


def _problem(batch, context, *, paged, device, dtype=torch.float16):
    max_blocks = -(-context // BLOCK_SIZE)
    num_blocks = batch * max_blocks
    order = torch.randperm(num_blocks) if paged else torch.arange(num_blocks)
    tables = order.view(batch, max_blocks).to(torch.int32).to(device)
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, HEADS, HEAD_DIM, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(batch, HEADS, HEAD_DIM, dtype=dtype, device=device)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    kv_bytes = 2 * batch * context * HEADS * HEAD_DIM * k_cache.element_size()
    return (q, k_cache, v_cache, tables, lens), kv_bytes


def _record(benchmark, kv_bytes, **info):
    benchmark.extra_info.update(info, kv_bytes=kv_bytes)
    if benchmark.stats is not None:  # None under --benchmark-disable
        seconds = benchmark.stats.stats.min
        benchmark.extra_info["gb_per_s"] = kv_bytes / seconds / 1e9
        benchmark.extra_info["fraction_of_3_tb_s"] = kv_bytes / seconds / 3.0e12


@needs_gpu
@pytest.mark.parametrize("paged", [True, False], ids=["paged", "contiguous"])
@pytest.mark.parametrize("context", [128, 512, 1024])
@pytest.mark.parametrize("batch", [1, 8, 32, 64, 256])
def test_bench_paged_decode(benchmark, batch, context, paged):
    args, kv_bytes = _problem(batch, context, paged=paged, device="cuda")
    out = torch.empty_like(args[0])
    run = lambda: paged_decode_attention(*args, out=out)  # noqa: E731
    run()
    torch.cuda.synchronize()
    benchmark.pedantic(lambda: (run(), torch.cuda.synchronize()), rounds=50, warmup_rounds=5)
    _record(benchmark, kv_bytes, batch=batch, context=context, layout="paged" if paged else "contiguous")


@needs_gpu
@pytest.mark.parametrize("num_splits", [1, None], ids=["unsplit", "fixed-chunks"])
def test_bench_split_vs_unsplit_batch1(benchmark, num_splits):
    args, kv_bytes = _problem(1, 1024, paged=True, device="cuda")
    run = lambda: paged_decode_attention(*args, num_splits=num_splits)  # noqa: E731
    run()
    torch.cuda.synchronize()
    benchmark.pedantic(lambda: (run(), torch.cuda.synchronize()), rounds=200, warmup_rounds=10)
    _record(benchmark, kv_bytes, batch=1, context=1024, num_splits=num_splits or "fixed 128-token chunks")


def test_bench_paged_decode_reference_cpu(benchmark):
    args, kv_bytes = _problem(4, 256, paged=True, device="cpu", dtype=torch.float32)
    benchmark(paged_decode_attention_ref, *args)
    _record(benchmark, kv_bytes, batch=4, context=256, backend="torch reference, CPU fp32")
