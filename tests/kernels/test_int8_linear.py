"""The int8 weight-only GEMM equals its reference (Triton's interpreter on CPU), split-K included."""
import pytest
import torch

from engine.quantization import Int8Weight
from kernels.int8_linear import _tile_and_split, int8_ln_linear, int8_ln_linear_ref
from tests.conftest import DEVICE

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-2, atol=1e-2)}


def _problem(m, k, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    w = Int8Weight.quantize(torch.randn(n, k, generator=g) / k**0.5)
    return x, w.q.to(DEVICE), w.scale.to(DEVICE), torch.randn(n, generator=g).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,k,n", [(1, 96, 80), (5, 200, 72), (70, 64, 48)])   # masked tails; 70 > decode's 64
@pytest.mark.parametrize("epilogue", ["ln+bias", "ln+bias+gelu", "bias+residual", "plain"])
def test_int8_linear_equals_the_reference(dtype, m, k, n, epilogue):
    x, q, scale, bias = _problem(m, k, n, dtype)
    ln = (torch.rand(k, device=DEVICE, dtype=dtype) + 0.5, torch.randn(k, device=DEVICE, dtype=dtype)) if "ln" in epilogue else (None, None)
    kwargs = dict(activation="gelu_tanh" if "gelu" in epilogue else None,
                  residual=torch.randn(m, n, device=DEVICE, dtype=dtype) if "residual" in epilogue else None)
    b = bias if "bias" in epilogue else None
    got = int8_ln_linear(x, *ln, q, scale, b, **kwargs)
    torch.testing.assert_close(got, int8_ln_linear_ref(x, *ln, q, scale, b, **kwargs), **TOL[dtype])


def test_split_k_is_used_at_decode_and_matches_the_reference():
    name, split = _tile_and_split(1, 768, 3072, torch.float16, num_sms=132)
    assert name == "decode" and split > 1        # 12 column tiles on 132 SMs: K is split
    x, q, scale, bias = _problem(3, 1024, 64, torch.float32, seed=1)   # 1 tile, K = 32 fp32 blocks: 16 splits
    assert _tile_and_split(3, 64, 1024, torch.float32, num_sms=132)[1] > 1
    torch.testing.assert_close(int8_ln_linear(x, None, None, q, scale, bias), int8_ln_linear_ref(x, None, None, q, scale, bias),
                               **TOL[torch.float32])


def test_kv_columns_are_written_to_the_paged_cache():
    heads, dim = 2, 16
    x, q, scale, bias = _problem(4, 48, 3 * heads * dim, torch.float32, seed=2)
    slots = torch.tensor([5, -1, 0, 9], device=DEVICE)
    caches = [torch.zeros(3, 4, heads, dim, device=DEVICE) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    y = int8_ln_linear(x, None, None, q, scale, bias, kv_cache=(*caches, slots))
    y_ref = int8_ln_linear_ref(x, None, None, q, scale, bias, kv_cache=(*ref_caches, slots))
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
    for got, want in zip(caches, ref_caches):
        torch.testing.assert_close(got, want, **TOL[torch.float32])
    assert caches[0].flatten(0, 1)[5].abs().sum() > 0 and caches[0].flatten(0, 1)[1].abs().sum() == 0


def test_the_reference_is_the_dequantised_linear():
    x, q, scale, bias = _problem(3, 40, 24, torch.float32, seed=3)
    w = Int8Weight(q, scale).dequantize()
    torch.testing.assert_close(int8_ln_linear_ref(x, None, None, q, scale, bias), x @ w.t() + bias, rtol=1e-5, atol=1e-5)


def test_bad_weights_are_rejected_with_a_clear_error():
    x, q, scale, _ = _problem(2, 32, 16, torch.float32)
    with pytest.raises(TypeError, match="int8"):
        int8_ln_linear(x, None, None, q.float(), scale)
    with pytest.raises(ValueError, match="K=32"):
        int8_ln_linear(x, None, None, q[:, :16], scale)
    with pytest.raises(ValueError, match="scale"):
        int8_ln_linear(x, None, None, q, scale[:3])
