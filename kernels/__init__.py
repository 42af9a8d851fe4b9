"""Triton kernels of gpt2-engine. Each family has a launcher and a plain-torch `<name>_ref` twin
with the same signature; the engine calls kernels only through these names. fold_layernorm
prepares a LayerNorm + linear pair once at load for ln_linear / ln_gelu_mlp (FoldedLinear), and
fold_layernorm_int8 for int8_ln_linear (FoldedInt8Linear: the folded weight quantized).
kernels.cpu holds the C++ CPU kernels (streaming GEMM, in-place paged attention, a fused decode block)
that the engine's CPU path runs; importing this package does not build them."""
import os

# Keep Triton 3.9's current default (fused multiply-add in kernels) explicitly: 3.10 will change it,
# and 3.9 warns on every compile until it is set.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from kernels.flash_attention import flash_attention, flash_attention_ref
from kernels.fused_linear import FoldedLinear, fold_layernorm, ln_gelu_mlp, ln_gelu_mlp_ref, ln_linear, ln_linear_ref
from kernels.int8_linear import FoldedInt8Linear, fold_layernorm_int8, int8_ln_linear, int8_ln_linear_ref
from kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref, write_kv, write_kv_ref

__all__ = [
    "flash_attention", "flash_attention_ref",
    "ln_linear", "ln_linear_ref", "ln_gelu_mlp", "ln_gelu_mlp_ref", "FoldedLinear", "fold_layernorm",
    "write_kv", "write_kv_ref", "paged_decode_attention", "paged_decode_attention_ref",
    "int8_ln_linear", "int8_ln_linear_ref", "FoldedInt8Linear", "fold_layernorm_int8",
]
