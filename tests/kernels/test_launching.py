"""gpt2_engine.kernels.launching: the first launch with a key goes through the JIT, later ones call the compiled
kernel directly with every argument in declaration order (constexprs last); on a GPU, both give the
same bits."""
import pytest
import torch

from gpt2_engine.kernels import launching


class _Recorder:
    """Records `obj[grid](*args, **kwargs)` calls and returns `returns` from them."""

    def __init__(self, returns=None):
        self.calls, self.returns = [], returns

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs)) or self.returns


def test_launch_caches_the_compiled_kernel_per_key(monkeypatch):
    monkeypatch.setattr(launching, "_COMPILED", {})
    compiled = _Recorder()
    jit = _Recorder(returns=compiled)
    args, constexprs = ("ptr", 3, 4), {"BLOCK": 16, "FLAG": True}
    launching.launch(jit, (2, 1, 1), args, constexprs, num_warps=4, num_stages=2, key="k")
    assert jit.calls == [((2, 1, 1), args, {"BLOCK": 16, "FLAG": True, "num_warps": 4, "num_stages": 2})]
    launching.launch(jit, (5, 1, 1), args, constexprs, num_warps=4, num_stages=2, key="k")
    assert len(jit.calls) == 1 and compiled.calls == [((5, 1, 1), ("ptr", 3, 4, 16, True), {})]
    launching.launch(jit, (5, 1, 1), args, constexprs, num_warps=4, num_stages=2, key=None)   # no key: always the JIT
    assert len(jit.calls) == 2


@pytest.mark.cuda
def test_direct_launch_equals_jit_launch():
    from gpt2_engine.kernels.fused_linear import fold_layernorm, ln_linear
    from gpt2_engine.kernels.paged_attention import paged_decode_attention

    torch.manual_seed(0)
    x = torch.randn(5, 768, device="cuda", dtype=torch.float16)
    folded = fold_layernorm(torch.randn(768, device="cuda"), torch.randn(768, device="cuda"),
                            torch.randn(768, 2304, device="cuda", dtype=torch.float16) / 28, None)
    launching._COMPILED.clear()
    first = ln_linear(x, None, None, folded, None)
    assert launching._COMPILED       # the second call takes the direct path
    assert torch.equal(ln_linear(x, None, None, folded, None), first)
    q = torch.randn(4, 12, 64, device="cuda", dtype=torch.float16)
    kc = torch.randn(64, 16, 12, 64, device="cuda", dtype=torch.float16)
    tables = torch.arange(64, dtype=torch.int32, device="cuda").view(4, 16)
    lens = torch.tensor([1, 100, 256, 17], dtype=torch.int32, device="cuda")
    a = paged_decode_attention(q, kc, kc, tables, lens)
    assert torch.equal(paged_decode_attention(q, kc, kc, tables, lens), a)
