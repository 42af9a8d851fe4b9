"""The torch backend's CPU speed-ups: the kernels' references, prepared once and shared per step.

GEMMs: every linear layer's weight is prepared at load time for the GEMM path a short timing probe
found fastest on this CPU for its shape and epilogue (engine/cpu_gemm.py: our streaming GEMM on fp32
or int8 weights, oneDNN packed, BLAS on [in, out] or [out, in], fbgemm's int8 paths, ...); w8a8 runs
on our streaming GEMM's integer dot products.
ln_linear / ln_gelu_mlp are the kernels' references with the LayerNorm, GEMM and epilogue (bias,
GELU-tanh, residual) done by that path (the streaming GEMM fuses them all; the others take the
LayerNorm from torch); results equal the references to fp32 rounding (accumulation order only), or
for int8 weights equal the int8 reference (gpt2_engine.kernels.int8_linear.int8_ln_linear_ref).

Decode-only steps (fused_decode_layers): where every linear of every block runs on our streaming GEMM,
all blocks' decode step, and the LM head's where it streams too, is one C++ call
(kernels/cpu/decode_block.cpp), bitwise equal to the op-by-op path; steps with prompt tokens run op by op.

Paged decode attention (decode_attention): on CPU in fp32 our C++ kernel, which reads K and V in place
from the pools (kernels/cpu/paged_attention.cpp); elsewhere, or where it cannot be built, the reference
with its gather index built once per step: every layer of a step gets the same block tables and context
lengths, so PagedDecodeAttention computes the index on the first layer and reuses it.
"""
from __future__ import annotations

import functools

import torch

from gpt2_engine.cpu_gemm import CpuLinear, Epilogue, Streaming, cpu_kernel_library, prepare_linear, w8a8_available
from gpt2_engine.kernels.cpu import paged_attention as cpu_paged_attention
from gpt2_engine.kernels.cpu import decode_block
from gpt2_engine.kernels.cpu.decode_block import DecodeBlock, DecodeLayers
from gpt2_engine.kernels.fused_linear import ln_linear_ref, write_kv_columns_ref
from gpt2_engine.kernels.paged_attention import gathered_decode_attention, paged_gather_index

__all__ = ["CpuLinear", "Epilogue", "prepare_linear", "w8a8_available", "supported", "compute_dtype", "ln_linear", "ln_gelu_mlp",
           "PagedDecodeAttention", "decode_attention", "fused_decode_layers"]


def supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the probed CPU GEMM paths serve this device and compute dtype (fp32 on CPU)."""
    return device.type == "cpu" and dtype == torch.float32


def compute_dtype(device: torch.device, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype of activations and the KV cache for weights stored in `weight_dtype`: on CPU, bf16 and
    fp16 weights are streamed by our GEMM, widened to fp32 in registers, with everything else in fp32
    (torch's 16-bit CPU ops are slower than fp32 and round every activation); that needs the C++
    kernels, and without them (no compiler) the model runs in weight_dtype through torch's ops."""
    if device.type == "cpu" and weight_dtype in (torch.bfloat16, torch.float16) and cpu_kernel_library() is not None:
        return torch.float32
    return weight_dtype


def ln_linear(x, ln_weight, ln_bias, weight, bias=None, *, eps=1e-5, activation=None, residual=None, kv_cache=None):
    """fused_linear.ln_linear's contract with a CpuLinear weight (a plain weight goes to the reference)."""
    if not isinstance(weight, CpuLinear):
        return ln_linear_ref(x, ln_weight, ln_bias, weight, bias, eps=eps, activation=activation, residual=residual,
                             kv_cache=kv_cache)
    if activation not in (None, "gelu_tanh"):
        raise ValueError(f"activation must be None or 'gelu_tanh', got {activation!r}")
    if x.shape[-1] != weight.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight takes {weight.in_features}")
    y = weight(x, bias, activation, residual, layer_norm=(ln_weight, ln_bias, eps) if ln_weight is not None else None)
    if kv_cache is not None:
        _write_kv_columns(y, kv_cache)
    return y


def _write_kv_columns(qkv, kv_cache) -> None:
    """write_kv_columns_ref's contract; in fp32 through our C++ write where it is built (one call
    instead of the reference's mask check and two index copies)."""
    lib = cpu_kernel_library()
    if lib is None or qkv.dtype != torch.float32:
        return write_kv_columns_ref(qkv, kv_cache)
    k_cache, v_cache, slot_mapping = kv_cache
    _, k, v = qkv.view(qkv.shape[0], 3, *k_cache.shape[2:]).unbind(1)
    cpu_paged_attention.write_kv(k, v, k_cache, v_cache, slot_mapping, lib=lib)


def ln_gelu_mlp(x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias, *, eps=1e-5):
    """fused_linear.ln_gelu_mlp's contract with CpuLinear weights: two ln_linear calls."""
    hidden = ln_linear(x, ln_weight, ln_bias, fc_weight, fc_bias, eps=eps, activation="gelu_tanh")
    return ln_linear(hidden, None, None, proj_weight, proj_bias, residual=x)


def decode_attention(device: torch.device, dtype: torch.dtype):
    """paged_attention.paged_decode_attention's contract for the torch backend on `device` / `dtype`."""
    lib = cpu_kernel_library() if supported(device, dtype) else None
    if lib is None:
        return PagedDecodeAttention()
    return functools.partial(cpu_paged_attention.paged_decode_attention, lib=lib)


class PagedDecodeAttention:
    """paged_attention.paged_decode_attention's contract; the gather index is computed once per step.

    Every layer of a step passes the same block_tables and context_lens: the index is reused while
    the same two tensors come back with the same contents and q's dtype (checked against copies, since tensors
    made under torch.inference_mode() have no version counter to tell an in-place edit)."""

    def __init__(self):
        self._key: tuple | None = None
        self._index = None

    def __call__(self, q, k_cache, v_cache, block_tables, context_lens, *, sm_scale=None, num_splits=None, out=None):
        key = self._key
        if key is None or not (key[0] is block_tables and key[1] is context_lens and key[4] == q.dtype
                               and torch.equal(key[2], block_tables) and torch.equal(key[3], context_lens)):
            self._index = paged_gather_index(block_tables, context_lens, k_cache.shape[1], q.dtype)
            self._key = (block_tables, context_lens, block_tables.clone(), context_lens.clone(), q.dtype)
        return gathered_decode_attention(q, k_cache, v_cache, self._index, sm_scale=sm_scale, out=out)


def fused_decode_layers(blocks, heads: int, eps: float, lm_head=None) -> DecodeLayers | None:
    """The model's blocks (gpt2_engine.model.Block, Linears on CpuLinear weights) as one DecodeLayers call,
    or None unless every linear's probed path is the streaming GEMM (a fused block has no other GEMM
    inside). The LM head (a Linear: LayerNorm, no bias) joins the call where it streams too."""
    linears = [lin for blk in blocks for lin in (blk.qkv, blk.attn_proj, blk.fc, blk.mlp_proj)]
    if not all(_streams(lin) for lin in linears):
        return None

    def packed(linear) -> decode_block.Linear:
        return decode_block.Linear(linear.weight.weight, linear.bias)

    head = None
    if lm_head is not None and _streams(lm_head) and lm_head.ln_weight is not None and lm_head.bias is None \
            and lm_head.activation is None and lm_head.eps == eps:
        head = ((lm_head.ln_weight, lm_head.ln_bias), lm_head.weight.weight)
    return DecodeLayers([DecodeBlock((blk.qkv.ln_weight, blk.qkv.ln_bias), packed(blk.qkv), packed(blk.attn_proj),
                                     (blk.fc.ln_weight, blk.fc.ln_bias), packed(blk.fc), packed(blk.mlp_proj))
                         for blk in blocks], heads, eps, head)


def _streams(linear) -> bool:
    return isinstance(linear.weight, CpuLinear) and isinstance(linear.weight.path, Streaming)
