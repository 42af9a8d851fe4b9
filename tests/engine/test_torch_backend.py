"""The torch backend's CPU preparations equal the kernels' references they stand in for."""
import pytest
import torch

from engine import torch_backend
from kernels.fused_linear import ln_gelu_mlp_ref, ln_linear_ref
from kernels.paged_attention import paged_decode_attention_ref

pytestmark = pytest.mark.skipif(not torch_backend.packing_supported(torch.device("cpu"), torch.float32),
                                reason="this torch build has no oneDNN")


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("activation,with_ln,with_residual", [(None, True, False), ("gelu_tanh", True, False), (None, False, True)])
def test_packed_ln_linear_equals_the_reference(m, activation, with_ln, with_residual):
    k, n = 72, 100
    x, w, b = torch.randn(m, k), torch.randn(k, n) / 8, torch.randn(n)
    ln_w, ln_b = (torch.randn(k), torch.randn(k)) if with_ln else (None, None)
    residual = torch.randn(m, n) if with_residual else None
    expected = ln_linear_ref(x, ln_w, ln_b, w, b, activation=activation, residual=residual)
    got = torch_backend.ln_linear(x, ln_w, ln_b, torch_backend.PackedLinear.from_conv1d(w), b, activation=activation, residual=residual)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_packed_mlp_and_kv_write_equal_the_references():
    c, m = 64, 5
    x = torch.randn(m, c)
    params = [torch.randn(c), torch.randn(c), torch.randn(c, 4 * c) / 8, torch.randn(4 * c), torch.randn(4 * c, c) / 16, torch.randn(c)]
    packed = params[:2] + [torch_backend.PackedLinear.from_conv1d(params[2]), params[3], torch_backend.PackedLinear.from_conv1d(params[4]), params[5]]
    torch.testing.assert_close(torch_backend.ln_gelu_mlp(x, *packed), ln_gelu_mlp_ref(x, *params), rtol=1e-5, atol=1e-5)
    w = torch.randn(c, 3 * c) / 8
    caches = [torch.full((4, 4, 4, 16), float("nan")) for _ in range(2)]
    slots = torch.tensor([3, -1, 9, 0, 15])
    ref_caches = [t.clone() for t in caches]
    qkv = torch_backend.ln_linear(x, None, None, torch_backend.PackedLinear.from_conv1d(w), None, kv_cache=(*caches, slots))
    ln_linear_ref(x, None, None, w, None, kv_cache=(*ref_caches, slots))
    torch.testing.assert_close(qkv, x @ w, rtol=1e-5, atol=1e-5)
    for got, want in zip(caches, ref_caches):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_paged_attention_reuses_its_index_only_for_the_same_unchanged_tensors():
    k_cache, v_cache = torch.randn(8, 4, 2, 16), torch.randn(8, 4, 2, 16)
    q = torch.randn(2, 2, 16)
    tables = torch.tensor([[5, 1, 0], [2, 7, 3]], dtype=torch.int32)
    lens = torch.tensor([9, 5], dtype=torch.int32)
    attention = torch_backend.PagedDecodeAttention()
    for _ in range(2):  # the second call reuses the index
        torch.testing.assert_close(attention(q, k_cache, v_cache, tables, lens), paged_decode_attention_ref(q, k_cache, v_cache, tables, lens))
    lens[0] = 12                       # edited in place: the index must be rebuilt
    tables[1, 0] = 6
    torch.testing.assert_close(attention(q, k_cache, v_cache, tables, lens), paged_decode_attention_ref(q, k_cache, v_cache, tables, lens))
    other = torch.tensor([[4, 6, 0], [1, 2, 5]], dtype=torch.int32)   # a new step's tables
    torch.testing.assert_close(attention(q, k_cache, v_cache, other, lens), paged_decode_attention_ref(q, k_cache, v_cache, other, lens))
