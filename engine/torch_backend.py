"""The torch backend's CPU speed-ups: the kernels' references, prepared once and shared per step.

GEMMs through oneDNN on weights packed once at load time. MKL's fp32 GEMM takes a slow path on
these AMD cores at decode shapes, while oneDNN JIT-compiles for the CPU it runs on. With each
weight reordered once into oneDNN's blocked layout, measured here (2 cores): 768x3072 at M=8
0.21 ms vs 0.71 ms for torch.addmm; the LM head (768x50257) at M=8 7.7 ms vs 35 ms; M=1024 36 ms
vs 55 ms. So every Conv1D weight becomes a PackedLinear, and ln_linear / ln_gelu_mlp are the
references with the matmul done by oneDNN, bias, GELU-tanh and the residual add fused as oneDNN
post-ops. Results equal the references to fp32 rounding (accumulation order only).

Paged decode attention with the gather index built once per step: every layer of a step gets the
same block tables and context lengths, so PagedDecodeAttention computes the reference's index on
the first layer and reuses it (measured 1.4 ms of a 27 ms GPT-2-small decode step otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.fused_linear import ln_linear_ref, write_kv_columns_ref
from kernels.paged_attention import gathered_decode_attention, paged_gather_index

# oneDNN picks its blocked weight layout for this batch size; any M works with it, and measured
# M = 1 .. 1024 all ran at least as fast as with the plain weight.
_PACKING_BATCH_HINT = 8


def packing_supported(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


@dataclass(frozen=True)
class PackedLinear:
    """A linear layer's weight in oneDNN's blocked layout (an opaque mkldnn tensor of W^T [N, K])."""
    packed: torch.Tensor
    in_features: int
    out_features: int

    @classmethod
    def from_out_in(cls, weight_nk: torch.Tensor) -> "PackedLinear":
        """From a [out, in] weight (nn.Linear's layout; GPT-2's wte for the tied LM head)."""
        packed = torch.ops.mkldnn._reorder_linear_weight(weight_nk.contiguous(), _PACKING_BATCH_HINT)
        return cls(packed, weight_nk.shape[1], weight_nk.shape[0])

    @classmethod
    def from_conv1d(cls, weight_kn: torch.Tensor) -> "PackedLinear":
        """From an HF Conv1D weight [in, out]."""
        return cls.from_out_in(weight_kn.t())


def ln_linear(x, ln_weight, ln_bias, weight, bias=None, *, eps=1e-5, activation=None, residual=None, kv_cache=None):
    """kernels.ln_linear's contract with a PackedLinear weight (a plain weight goes to the reference)."""
    if not isinstance(weight, PackedLinear):
        return ln_linear_ref(x, ln_weight, ln_bias, weight, bias, eps=eps, activation=activation, residual=residual,
                             kv_cache=kv_cache)
    if activation not in (None, "gelu_tanh"):
        raise ValueError(f"activation must be None or 'gelu_tanh', got {activation!r}")
    if x.shape[-1] != weight.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight takes {weight.in_features}")
    h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps) if ln_weight is not None else x
    h = h.contiguous()
    if residual is not None and activation is None:
        y = torch.ops.mkldnn._linear_pointwise.binary(h, residual.contiguous(), weight.packed, bias, "add")
    else:
        y = torch.ops.mkldnn._linear_pointwise(h, weight.packed, bias, "gelu" if activation else "none", [],
                                               "tanh" if activation else "")
        y = y + residual if residual is not None else y
    if kv_cache is not None:
        write_kv_columns_ref(y, kv_cache)
    return y


def ln_gelu_mlp(x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias, *, eps=1e-5):
    """kernels.ln_gelu_mlp's contract with PackedLinear weights."""
    hidden = ln_linear(x, ln_weight, ln_bias, fc_weight, fc_bias, eps=eps, activation="gelu_tanh")
    return ln_linear(hidden, None, None, proj_weight, proj_bias, residual=x)


class PagedDecodeAttention:
    """kernels.paged_decode_attention's contract; the gather index is computed once per step.

    Every layer of a step passes the same block_tables and context_lens: the index is reused while
    the same two tensors come back with the same contents (checked against copies, since tensors
    made under torch.inference_mode() have no version counter to tell an in-place edit)."""

    def __init__(self):
        self._key: tuple | None = None
        self._index = None

    def __call__(self, q, k_cache, v_cache, block_tables, context_lens, *, sm_scale=None, num_splits=None, out=None):
        key = self._key
        if key is None or not (key[0] is block_tables and key[1] is context_lens and torch.equal(key[2], block_tables)
                               and torch.equal(key[3], context_lens)):
            self._index = paged_gather_index(block_tables, context_lens, k_cache.shape[1])
            self._key = (block_tables, context_lens, block_tables.clone(), context_lens.clone())
        return gathered_decode_attention(q, k_cache, v_cache, self._index, sm_scale=sm_scale, out=out)
