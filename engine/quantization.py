"""Int8 quantization: "int8" (weight-only: activations unquantized) and "w8a8" (weights and activations).

"int8" (every backend): the weight codes below, activations in the compute dtype; the model computes
exactly what it would on the dequantised weights (up to the GEMM's summation order).

"w8a8" (the CPU's torch backend, which runs it on our streaming GEMM, kernels/cpu/stream_gemm.cpp): the
same weight codes, and each linear's input quantized per row at run time (dynamic, symmetric:
xq = round(x * 127 / max|x|), one fp32 scale per row), so the dot products run on integers with int32
accumulation: VNNI's vpdpbusd where the CPU has AVX512-VNNI or AVX-VNNI, a portable loop elsewhere.
y = (xq @ q^T) * s * x_scale + b, as CTranslate2's and llama.cpp's int8 modes compute. It adds the
activations' rounding to the weights' (tests/engine/test_quantization.py measures both on GPT-2 small
shapes) and buys speed where the weight-only path is compute bound (the README's CPU results).

A weight W [out, in] (nn.Linear's layout; an HF Conv1D weight [in, out] is transposed first) is
stored as int8 codes q = round(W / s).clamp(-127, 127) with s[o] = max_i |W[o, i]| / 127 (fp32,
one per output row; an all-zero row gets s = 1 so that q = 0). Then W ~= q * s[:, None], and a
linear layer computes y = (x @ q^T) * s + b: the scale is applied to the output columns after
the GEMM, so the GEMM itself only widens int8 codes (exactly representable in fp16/bf16/fp32) to
the activations' dtype. -127..127 (not -128) keeps the code range symmetric.

Which weights: every Conv1D of the blocks (c_attn, attn c_proj, c_fc, mlp c_proj) and wte, which
is both the token embedding (a row lookup: q[id] * s[id]) and the tied LM head (its output channels
are wte's rows, so the same per-row scales serve both). wpe stays in the compute dtype: a decode
step reads one of its rows per token, so quantizing it saves no bandwidth (0.6% of GPT-2 small's
weights). LayerNorm parameters and biases stay in the compute dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt2_engine.kernels.int8_linear import quantize_per_channel

QUANTIZATIONS = (None, "int8", "w8a8")


def check_quantization(quantization) -> str | None:
    """The validated `quantization` argument (None, "int8" or "w8a8")."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    return quantization


@dataclass(frozen=True)
class Int8Weight:
    """q int8 [out, in] (in contiguous) and scale fp32 [out]: W ~= q * scale[:, None]."""
    q: torch.Tensor
    scale: torch.Tensor

    @property
    def in_features(self) -> int:
        return self.q.shape[1]

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    @classmethod
    def quantize(cls, weight_out_in: torch.Tensor) -> "Int8Weight":
        """Symmetric per-output-channel (per-row) int8 codes of a floating-point [out, in] weight."""
        return cls(*quantize_per_channel(weight_out_in))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W ~= q * scale as a [out, in] tensor of `dtype` (rounded once, from fp32)."""
        return (self.q.float() * self.scale[:, None]).to(dtype)

    def rows(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized rows q[index] * scale[index] (the embedding lookup of a quantized wte)."""
        return (self.q[index].to(torch.float32) * self.scale[index, None]).to(dtype)
