"""Which GEMM runs each linear layer, per backend: every weight is prepared once, at load, into a Linear.

A Linear computes y = act(LN(x) @ W + b) + residual (kernels.fused_linear.ln_linear's contract) with
its LayerNorm, weight, bias and activation bound at load; a call passes only x, the residual and the
K/V write (c_attn's epilogue). GPT-2's linears (HF Conv1D weights are W [in, out]):

    qkv       = LN(ln_1) then attn.c_attn     [C -> 3C], the K/V columns also written to the pools
    attn_proj = attn.c_proj                   [C -> C],  + residual
    fc        = LN(ln_2) then mlp.c_fc        [C -> 4C], GELU-tanh
    mlp_proj  = mlp.c_proj                    [4C -> C], + residual
    lm_head   = LN(ln_f) then wte^T           [C -> V]   (tied head, or lm_head.weight where given)

The GEMM on each backend (LinearBuilder picks it once; `build` prepares the weight for it):

    backend  quantization  device, dtype  GEMM                                 weight as prepared
    triton   none          any            fused_linear.ln_linear               LN folded in (FoldedLinear), else W [in, out]
    triton   int8          any            int8_linear.int8_ln_linear           LN folded, then quantized (FoldedInt8Linear),
                                                                               else Int8Weight
    torch    none, int8    CPU, fp32      torch_backend.ln_linear              CpuLinear: the path a load-time probe
                                                                               picked for the shape (cpu_gemm)
    torch    none          CPU, bf16/fp16 torch_backend.ln_linear              CpuLinear: our streaming GEMM on the
                                                                               16-bit weight (activations fp32)
    torch    w8a8          CPU, fp32      torch_backend.ln_linear              CpuLinear: our streaming GEMM on int8
                                                                               codes, activations quantized per row
    torch    none          other          fused_linear.ln_linear_ref           W [in, out]
    torch    int8          other          int8_linear.int8_ln_linear_ref       Int8Weight

Folding (triton): LN(x) @ W = rstd * (x @ W' - mean * colsum) + b' with W' = diag(gamma) W and
b' = beta @ W + b, so the GEMM reads x once and accumulates the LayerNorm's statistics as it goes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from gpt2_engine import torch_backend
from gpt2_engine.kernels import fused_linear, int8_linear
from gpt2_engine.quantization import Int8Weight


@dataclass(frozen=True)
class LayerNorm:
    weight: torch.Tensor
    bias: torch.Tensor


@dataclass(frozen=True)
class Linear:
    """y = act(LN(x) @ W + b) + residual through `gemm`, a function of ln_linear's contract taking
    `weight` in the form it was prepared for (ln_weight None: no LayerNorm, or one folded into the weight)."""
    gemm: Callable
    weight: object
    bias: torch.Tensor | None
    ln_weight: torch.Tensor | None = None
    ln_bias: torch.Tensor | None = None
    eps: float = 1e-5
    activation: str | None = None

    def __call__(self, x: torch.Tensor, *, residual: torch.Tensor | None = None, kv_cache: tuple | None = None):
        """x [M, in] -> [M, out]; kv_cache = (k_cache, v_cache, slot_mapping [M]) stores the K/V columns."""
        return self.gemm(x, self.ln_weight, self.ln_bias, self.weight, bias=self.bias, eps=self.eps,
                         activation=self.activation, residual=residual, kv_cache=kv_cache)


def _on_int8_weight(int8_gemm: Callable) -> Callable:
    """An int8 GEMM (codes and scales as two arguments) in ln_linear's contract on an Int8Weight."""
    def gemm(x, ln_weight, ln_bias, weight: Int8Weight, **kwargs):
        return int8_gemm(x, ln_weight, ln_bias, weight.q, weight.scale, **kwargs)
    return gemm


class LinearBuilder:
    """Prepares the model's linears for one backend, device, dtype and quantization (the table above)."""

    def __init__(self, backend: str, device: torch.device, dtype: torch.dtype, quantization: str | None, eps: float,
                 *, weight_dtype: torch.dtype | None = None):
        """dtype: the activations'; weight_dtype (default dtype): how unquantized CPU-path weights are
        stored (bf16 / fp16 weights with fp32 activations: torch_backend.compute_dtype)."""
        self.device, self.eps = device, eps
        self.int8, self.w8a8 = quantization in ("int8", "w8a8"), quantization == "w8a8"
        self.weight_dtype = dtype if weight_dtype is None else weight_dtype
        self.fold = backend == "triton"
        self.cpu_paths = backend == "torch" and torch_backend.supported(device, dtype)
        if self.w8a8 and not (self.cpu_paths and torch_backend.w8a8_available()):
            raise ValueError(f"quantization='w8a8' runs on the CPU with the torch backend in fp32 and needs the C++ CPU "
                             f"kernels (a C++ compiler), got backend={backend!r}, device={device}, dtype={dtype}")
        if self.cpu_paths:
            self.gemm = torch_backend.ln_linear
        elif self.fold:
            self.gemm = int8_linear.int8_ln_linear if self.int8 else fused_linear.ln_linear
        else:
            self.gemm = int8_linear.int8_ln_linear_ref if self.int8 else fused_linear.ln_linear_ref

    def build(self, weight_out_in: torch.Tensor, bias: torch.Tensor | None, ln: LayerNorm | None = None, *,
              activation: str | None = None, residual: bool = False, codes: Int8Weight | None = None) -> Linear:
        """The Linear of act(LN(x) @ W + bias) (+ a residual at call time when `residual`).

        weight_out_in: W as [out, in] (an HF Conv1D weight's transpose, a view); codes: int8 codes of
        this weight already made (the tied LM head shares the embedding's), used where no LayerNorm is
        folded into the weight."""
        gemm = self.gemm
        if self.fold and ln is not None:
            fold = int8_linear.fold_layernorm_int8 if self.int8 else fused_linear.fold_layernorm
            return Linear(gemm, fold(ln.weight, ln.bias, self._in_out(weight_out_in), bias), None, eps=self.eps,
                          activation=activation)
        if self.int8:
            weight = codes if codes is not None else Int8Weight.quantize(weight_out_in)
            if not self.cpu_paths:
                gemm = _on_int8_weight(gemm)
        else:
            weight = weight_out_in.to(self.weight_dtype) if self.cpu_paths else self._in_out(weight_out_in)
        if self.cpu_paths:
            epilogue = torch_backend.Epilogue(bias=bias is not None, gelu=activation is not None, residual=residual)
            weight = torch_backend.prepare_linear(weight, epilogue, w8a8=self.w8a8)
        return Linear(gemm, weight, bias, *((ln.weight, ln.bias) if ln is not None else (None, None)), eps=self.eps,
                      activation=activation)

    def _in_out(self, weight_out_in: torch.Tensor) -> torch.Tensor:
        """W as [in, out]: a view on GPU (the tied LM head's [C, V] view of wte is read column-major, which
        tl.dot handles, and costs no second copy of the largest matrix), contiguous on CPU."""
        weight = weight_out_in.t()
        return weight.contiguous() if self.device.type == "cpu" else weight
