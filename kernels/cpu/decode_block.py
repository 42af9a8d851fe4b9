"""A GPT-2 block's whole decode step in one call (decode_block.cpp): LayerNorms, the four linears on
streaming-GEMM weights (each in its own packed format), the K/V write and paged attention, bitwise equal to running them one by one.
`lib` is a kernels.cpu.library() build."""
from __future__ import annotations

import ctypes
import functools
import math
from dataclasses import dataclass

import torch

from gpt2_engine.kernels.cpu.paged_attention import check_caches, check_cpu_tensor
from gpt2_engine.kernels.cpu.stream_gemm import PackedWeight


@dataclass(frozen=True)
class Linear:
    weight: PackedWeight
    bias: torch.Tensor


@dataclass(frozen=True)
class DecodeBlock:
    """One block's parameters: LayerNorms (weight, bias), linears on [in, out] = (C, 3C), (C, C), (C, 4C), (4C, C)."""
    ln_1: tuple[torch.Tensor, torch.Tensor]
    attn: Linear
    proj: Linear
    ln_2: tuple[torch.Tensor, torch.Tensor]
    fc: Linear
    mlp_proj: Linear
    heads: int
    eps: float

    def __post_init__(self):
        c = self.attn.weight.in_features
        shapes = {"attn": (self.attn, c, 3 * c), "proj": (self.proj, c, c), "fc": (self.fc, c, 4 * c),
                  "mlp_proj": (self.mlp_proj, 4 * c, c)}
        for name, (linear, k, n) in shapes.items():
            if (linear.weight.in_features, linear.weight.out_features) != (k, n) or linear.bias.shape != (n,):
                raise ValueError(f"{name} must be {k} -> {n} with a bias of {n}, got {linear.weight.in_features} -> "
                                 f"{linear.weight.out_features}, bias {tuple(linear.bias.shape)}")
        if c % self.heads:
            raise ValueError(f"{self.heads} heads do not divide the width {c}")

    @functools.cached_property
    def _parameter_addresses(self) -> tuple:
        """The block's fixed arguments of gpt2_decode_block, in its order (the tensors never move)."""
        def linear(lin: Linear) -> tuple:
            scale = lin.weight.scale
            return (lin.weight.blocks.data_ptr(), lin.weight.format, None if scale is None else scale.data_ptr(),
                    lin.bias.data_ptr())
        return (self.ln_1[0].data_ptr(), self.ln_1[1].data_ptr(), *linear(self.attn), *linear(self.proj),
                self.ln_2[0].data_ptr(), self.ln_2[1].data_ptr(), *linear(self.fc), *linear(self.mlp_proj))

    def __call__(self, x, k_cache, v_cache, slot_mapping, block_tables, context_lens) -> torch.Tensor:
        """x [B, C] (one decode token per sequence) -> the block's output [B, C]; writes the tokens' K/V."""
        c = self.attn.weight.in_features
        check_cpu_tensor("x", x, torch.float32, 2)
        check_cpu_tensor("slot_mapping", slot_mapping, torch.int64, 1)
        check_cpu_tensor("block_tables", block_tables, torch.int32, 2)
        check_cpu_tensor("context_lens", context_lens, torch.int32, 1)
        batch = x.shape[0]
        if x.shape[1] != c or slot_mapping.shape != (batch,) or block_tables.shape[0] != batch or context_lens.shape != (batch,):
            raise ValueError(f"x must be [B, {c}] with slot_mapping, block_tables and context_lens of B rows, got "
                             f"{tuple(x.shape)}, {tuple(slot_mapping.shape)}, {tuple(block_tables.shape)}, "
                             f"{tuple(context_lens.shape)}")
        check_caches(k_cache, v_cache, self.heads, c // self.heads)
        x, slots, tables, lens = x.contiguous(), slot_mapping.contiguous(), block_tables.contiguous(), context_lens.contiguous()
        out = torch.empty_like(x)
        bad = self.attn.weight.lib.gpt2_decode_block(
            x.data_ptr(), batch, c, self.heads, self.eps, *self._parameter_addresses,
            k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[0], k_cache.shape[1], slots.data_ptr(),
            tables.data_ptr(), tables.shape[1], lens.data_ptr(), 1.0 / math.sqrt(c // self.heads), out.data_ptr(),
            torch.get_num_threads())
        if bad > 0:
            raise ValueError(f"sequence {bad - 1}: context length {int(lens[bad - 1])} or its block table entries are "
                             f"out of range")
        if bad < 0:
            raise ValueError(f"slot_mapping[{-bad - 1}] = {int(slots[-bad - 1])} is past the cache")
        return out


def argtypes() -> list:
    """gpt2_decode_block's C signature for ctypes."""
    ptr, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    linear = [ptr, i32, ptr, ptr]
    return [ptr, i64, i64, i64, f32, ptr, ptr, *linear, *linear, ptr, ptr, *linear, *linear,
            ptr, ptr, i64, i64, ptr, ptr, i64, ptr, f32, ptr, i32]
