"""Causal prefill attention throughput: our Triton kernel vs torch SDPA vs eager matmul-softmax-matmul.

GPT-2 shapes (12 heads, head_dim 64, fp16), S from 128 to 4096 with batch * S = 16k tokens.
TFLOP/s counts causal work as 2 * B * H * S^2 * D (the 4 * B * H * S^2 * D of QK^T and PV,
halved by the mask) and lands in `benchmark.extra_info["tflops"]`; the target on an H100 is
>= 230 at S = 1024-2048 (DESIGN.md). On CPU only the torch paths run, at one small size: the
Triton kernel under the interpreter measures the interpreter, not the kernel.
"""
import math

import pytest
import torch

from benchmarks.conftest import HAS_CUDA
from gpt2_engine.kernels.flash_attention import flash_attention

HEADS, HEAD_DIM, TOKENS = 12, 64, 16384
SEQLENS = [128, 512, 1024, 2048, 4096]
CPU_SEQLEN = 128


def _eager(q, k, v):
    """[B, H, S, D] causal attention materialising the S x S scores."""
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    causal = torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool, device=q.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v


def _case(impl, seqlen):
    """A zero-argument callable running `impl` on fresh GPT-2-shaped inputs, and its batch size."""
    device = "cuda" if HAS_CUDA else "cpu"
    dtype = torch.float16 if HAS_CUDA else torch.float32
    batch = max(1, TOKENS // seqlen) if HAS_CUDA else 2
    qkv = torch.randn(batch, seqlen, 3, HEADS, HEAD_DIM, device=device, dtype=dtype)
    if impl == "triton_bshd":
        q, k, v = qkv.unbind(2)                                   # strided views of the fused QKV
        return (lambda: flash_attention(q, k, v)), batch
    if impl == "triton_varlen":
        q, k, v = qkv.flatten(0, 1).unbind(1)                     # packed [T, H, D] views
        cu = torch.arange(0, batch + 1, dtype=torch.int32, device=device) * seqlen
        return (lambda: flash_attention(q, k, v, cu)), batch
    q, k, v = (t.transpose(1, 2).contiguous() for t in qkv.unbind(2))  # [B, H, S, D], SDPA's best layout
    if impl == "sdpa":
        return (lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)), batch
    return (lambda: _eager(q, k, v)), batch


@pytest.mark.parametrize("seqlen", SEQLENS)
@pytest.mark.parametrize("impl", ["triton_bshd", "triton_varlen", "sdpa", "eager"])
def test_causal_prefill_attention(benchmark, impl, seqlen):
    if not HAS_CUDA and impl.startswith("triton"):
        pytest.skip("Triton kernel timings need a GPU (the CPU interpreter would time the interpreter)")
    if not HAS_CUDA and seqlen != CPU_SEQLEN:
        pytest.skip(f"CPU runs the torch paths at S={CPU_SEQLEN} only")
    fn, batch = _case(impl, seqlen)

    def run():
        out = fn()
        if HAS_CUDA:
            torch.cuda.synchronize()
        return out

    fn()  # compile / warm up outside the timing
    benchmark.group = f"causal attention S={seqlen}"
    flops = 2 * batch * HEADS * seqlen * seqlen * HEAD_DIM
    benchmark.extra_info.update(batch=batch, heads=HEADS, head_dim=HEAD_DIM, seqlen=seqlen, flops=flops)
    out = benchmark(run)
    assert out.isfinite().all()
    if benchmark.stats is not None:
        benchmark.extra_info["tflops"] = flops / benchmark.stats.stats.mean / 1e12
