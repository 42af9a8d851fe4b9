"""Host time of each kernel launcher per call: argument checks, plan lookup, workspace, launch.

On CPU the kernel bodies are stubbed out (Triton's interpreter would run them), so the figure is the
launcher's own Python: what every decode step pays per launch before the GPU sees any work. On a
GPU the real kernels launch (the compiled kernel directly, after the first call), and the timing
is of the host call only, without a device sync. Shapes: GPT-2 small decode at batch 8.
"""
import importlib

import pytest
import torch

from benchmarks.conftest import HAS_CUDA

fl, pa, fa, i8 = (importlib.import_module(f"gpt2_engine.kernels.{name}")
                  for name in ("fused_linear", "paged_attention", "flash_attention", "int8_linear"))
C, H, D, B, BLOCK = 768, 12, 64, 8, 16


class _StubKernel:
    """Stands in for a @triton.jit kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.fixture
def stubbed(monkeypatch):
    if not HAS_CUDA:
        for module, name in ((fl, "_ln_linear_kernel"), (pa, "_paged_decode_kernel"), (fa, "_flash_attn_fwd_kernel")):
            monkeypatch.setattr(module, name, _StubKernel())
    return "cuda" if HAS_CUDA else "cpu"


def _randn(*shape, device, dtype=torch.float16):
    return torch.randn(*shape, device=device).to(dtype)


def _calls(device):
    x = _randn(B, C, device=device)
    qkv = fl.fold_layernorm(_randn(C, device=device), _randn(C, device=device), _randn(C, 3 * C, device=device),
                            _randn(3 * C, device=device))
    proj, proj_b, residual = _randn(C, C, device=device), _randn(C, device=device), _randn(B, C, device=device)
    k_cache = _randn(B * 64, BLOCK, H, D, device=device)
    v_cache = torch.empty_like(k_cache)
    slots = torch.arange(B, device=device)
    q = _randn(B, H, D, device=device)
    tables = torch.arange(B * 64, dtype=torch.int32, device=device).view(B, 64)
    lens = torch.full((B,), 100, dtype=torch.int32, device=device)
    qkv_int8 = i8.fold_layernorm_int8(_randn(C, device=device), _randn(C, device=device), _randn(C, 3 * C, device=device),
                                      _randn(3 * C, device=device))
    qp = _randn(256, H, D, device=device)
    cu = torch.tensor([0, 128, 256], dtype=torch.int32, device=device)
    return {
        "ln_linear qkv+kv-write": lambda: fl.ln_linear(x, None, None, qkv, None, kv_cache=(k_cache, v_cache, slots)),
        "ln_linear proj+residual": lambda: fl.ln_linear(x, None, None, proj, proj_b, residual=residual),
        "int8_ln_linear qkv+kv-write": lambda: i8.int8_ln_linear(x, None, None, qkv_int8, kv_cache=(k_cache, v_cache, slots)),
        "paged_decode_attention": lambda: pa.paged_decode_attention(q, k_cache, v_cache, tables, lens),
        "flash_attention varlen": lambda: fa.flash_attention(qp, qp, qp, cu),
    }


@pytest.mark.parametrize("launcher", ["ln_linear qkv+kv-write", "ln_linear proj+residual", "int8_ln_linear qkv+kv-write",
                                      "paged_decode_attention", "flash_attention varlen"])
def test_bench_launcher_host_time(benchmark, stubbed, launcher):
    benchmark.group = "launcher-host-time" + ("" if HAS_CUDA else " (kernel stubbed, interpreter)")
    call = _calls(stubbed)[launcher]
    call()   # plan (and on GPU, compile) outside the timing
    benchmark(call)
    if HAS_CUDA:
        torch.cuda.synchronize()
