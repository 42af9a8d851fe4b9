"""Fused GPT-2 MLP (ln_2 -> c_fc + GELU -> c_proj + residual) against torch eager.

Decode shapes (M = 1..16) report GB/s on weight bytes (the MLP's roofline traffic: fc + proj
weights, 8 C^2 elements); prefill shapes (M = 8192) report TFLOP/s (2 * M * C * 4C * 2 flops).
"torch eager" is LayerNorm, Linear, GELU, Linear and the residual add as separate ops; the Triton
side is `ln_gelu_mlp` (two launches). On GPU both run in fp16. On CPU only the torch paths run, at
one small size (Triton under the interpreter is far too slow to time), so `pytest benchmarks
--benchmark-disable` takes seconds.
"""
import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import HAS_CUDA
from gpt2_engine.kernels.fused_linear import fold_layernorm, ln_gelu_mlp, ln_gelu_mlp_ref

WIDTHS = (768, 1024, 1280, 1600)
DECODE_M = (1, 4, 16)
PREFILL_M = 8192


def _mlp_params(M, C, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *shape, s=1.0: (torch.randn(*shape, generator=g) * s).to(dtype=dtype, device=device)  # noqa: E731
    return dict(x=mk(M, C), ln_weight=1 + mk(C, s=0.1), ln_bias=mk(C, s=0.1),
                fc_weight=mk(C, 4 * C, s=C ** -0.5), fc_bias=mk(4 * C, s=0.1),
                proj_weight=mk(4 * C, C, s=(4 * C) ** -0.5), proj_bias=mk(C, s=0.1))


def _torch_eager(x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias):
    # what an eager PyTorch GPT-2 block does (nn.Linear takes [N, K]: pass the pre-transposed views)
    h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, 1e-5)
    h = F.linear(h, fc_weight.t(), fc_bias)
    h = F.gelu(h, approximate="tanh")
    return x + F.linear(h, proj_weight.t(), proj_bias)


IMPLS = {"triton": ln_gelu_mlp, "torch_eager": _torch_eager, "torch_ref": ln_gelu_mlp_ref}


def _run(benchmark, impl, M, C, dtype, device):
    p = _mlp_params(M, C, dtype, device)
    fn = IMPLS[impl]
    if impl == "triton":   # the engine's form: ln_2 folded into c_fc once, at load
        folded = fold_layernorm(p["ln_weight"], p["ln_bias"], p["fc_weight"], p["fc_bias"])
        fn = lambda x, proj_weight, proj_bias, **_: ln_gelu_mlp(x, None, None, folded, None, proj_weight, proj_bias)  # noqa: E731
    if device == "cuda":
        fn(**p)   # compile / warm up outside the timing
        torch.cuda.synchronize()

        def call():
            fn(**p)
            torch.cuda.synchronize()
    else:
        def call():
            fn(**p)
    benchmark(call)
    weight_bytes = 8 * C * C * p["x"].element_size()
    flops = 2 * M * C * 4 * C * 2
    benchmark.extra_info.update(impl=impl, M=M, C=C, dtype=str(dtype).removeprefix("torch."),
                                weight_bytes=weight_bytes, flops=flops)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.mean > 0:
        seconds = stats.stats.mean   # includes the host sync; decode timings are launch-inclusive
        benchmark.extra_info["weight_GBps"] = weight_bytes / seconds / 1e9
        benchmark.extra_info["TFLOPps"] = flops / seconds / 1e12


@pytest.mark.skipif(not HAS_CUDA, reason="GPU timings: Triton under the CPU interpreter is too slow to benchmark")
@pytest.mark.parametrize("impl", ["triton", "torch_eager"])
@pytest.mark.parametrize("C", WIDTHS)
@pytest.mark.parametrize("M", DECODE_M)
def test_bench_mlp_decode(benchmark, impl, M, C):
    benchmark.group = f"mlp-decode-C{C}-M{M}"
    _run(benchmark, impl, M, C, torch.float16, "cuda")


@pytest.mark.skipif(not HAS_CUDA, reason="GPU timings: Triton under the CPU interpreter is too slow to benchmark")
@pytest.mark.parametrize("impl", ["triton", "torch_eager"])
@pytest.mark.parametrize("C", WIDTHS)
def test_bench_mlp_prefill(benchmark, impl, C):
    benchmark.group = f"mlp-prefill-C{C}-M{PREFILL_M}"
    _run(benchmark, impl, PREFILL_M, C, torch.float16, "cuda")


@pytest.mark.skipif(HAS_CUDA, reason="CPU reference paths; the GPU cases above cover CUDA")
@pytest.mark.parametrize("impl", ["torch_ref", "torch_eager"])
def test_bench_mlp_cpu_reference(benchmark, impl):
    """The engine's torch backend (addmm on the [K, N] weights) vs eager, GPT-2 small decode, fp32."""
    benchmark.group = "mlp-cpu-C768-M1"
    _run(benchmark, impl, 1, 768, torch.float32, "cpu")
