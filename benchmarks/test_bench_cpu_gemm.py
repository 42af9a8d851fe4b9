"""CPU decode GEMMs side by side: our streaming GEMM (kernels/cpu; fp32, int8 weight-only and w8a8) against the library paths the probe
also considers (oneDNN packed, BLAS on [in, out]), and a plain read of the same bytes.

One timed call runs the layer over enough copies of its weight to exceed twice the last-level cache,
so every weight comes from DRAM, as in a decode step. extra_info["gb_s"] is weight bytes per second;
the "read" case (torch.sum over the same fp32 bytes, in huge pages like the packed weights) is the
machine's plain read rate to compare against. Run with `pytest benchmarks/test_bench_cpu_gemm.py
--benchmark-enable`; pytest-benchmark interleaves nothing, so compare rows of one run only.
"""
import math

import pytest
import torch

from gpt2_engine import cpu_gemm
from gpt2_engine.quantization import Int8Weight
from gpt2_engine.kernels.cpu.stream_gemm import huge_page_empty

SHAPE = (768, 3072)   # GPT-2 small's c_fc, [in, out]
PATHS = {
    "stream": lambda: cpu_gemm.Streaming("float"),
    "int8_stream": lambda: cpu_gemm.Streaming("int8"),
    "w8a8_stream": lambda: cpu_gemm.Streaming("w8a8"),
    "onednn_m1": lambda: cpu_gemm.OneDnnPacked(1),
    "matmul_in_out": lambda: cpu_gemm.Blas("in_out"),
}


def _copies(nbytes: int) -> int:
    return max(1, math.ceil(2 * cpu_gemm.llc_bytes() / nbytes))


@pytest.mark.parametrize("m", [1, 8])
@pytest.mark.parametrize("name", [*PATHS, "read"])
def test_cpu_decode_gemm(benchmark, name, m):
    k, n = SHAPE
    weight = torch.randn(n, k) / k ** 0.5
    x = torch.randn(m, k)
    if name == "read":
        buffers = [huge_page_empty((n, k), torch.float32).copy_(weight) for _ in range(_copies(weight.numel() * 4))]
        call, nbytes = (lambda: [b.sum() for b in buffers]), weight.numel() * 4
    else:
        path = PATHS[name]()
        if not path.available(torch.float32):
            pytest.skip(f"{name} is not available on this machine")
        int8 = name.startswith(("int8", "w8a8"))
        source = Int8Weight.quantize(weight) if int8 else weight
        nbytes = n * k * (1 if int8 else 4)
        prepared = [path.prepare(source) for _ in range(_copies(nbytes))]
        call = lambda: [path(w, x, None, None, None) for w in prepared]   # noqa: E731
        buffers = prepared
    call()
    benchmark(call)
    benchmark.extra_info.update(path=name, M=m, K=k, N=n)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gb_s"] = nbytes * len(buffers) / benchmark.stats.stats.median / 1e9
