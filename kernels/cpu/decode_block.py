"""A GPT-2 model's decode step through all its blocks, and the LM head where it streams too, in one call
(decode_block.cpp): per block the LayerNorms, the four linears on streaming-GEMM weights (each in its own
packed format), the K/V write and paged attention, bitwise equal to running them one by one. The
weights' `lib` is a kernels.cpu.library() build."""
from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gpt2_engine.kernels.cpu.paged_attention import check_cpu_tensor
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

    def __post_init__(self):
        c = self.width
        shapes = {"attn": (self.attn, c, 3 * c), "proj": (self.proj, c, c), "fc": (self.fc, c, 4 * c),
                  "mlp_proj": (self.mlp_proj, 4 * c, c)}
        for name, (linear, k, n) in shapes.items():
            if (linear.weight.in_features, linear.weight.out_features) != (k, n) or linear.bias.shape != (n,):
                raise ValueError(f"{name} must be {k} -> {n} with a bias of {n}, got {linear.weight.in_features} -> "
                                 f"{linear.weight.out_features}, bias {tuple(linear.bias.shape)}")

    @property
    def width(self) -> int:
        return self.attn.weight.in_features

    def table_row(self) -> list[int]:
        """The block's row of the layer table: decode_block.cpp's TableBlock, its 20 fields in order, 8 bytes
        each (the tensors never move)."""
        return [self.ln_1[0].data_ptr(), self.ln_1[1].data_ptr(), *_table_linear(self.attn.weight, self.attn.bias),
                *_table_linear(self.proj.weight, self.proj.bias), self.ln_2[0].data_ptr(), self.ln_2[1].data_ptr(),
                *_table_linear(self.fc.weight, self.fc.bias), *_table_linear(self.mlp_proj.weight, self.mlp_proj.bias)]


def _table_linear(weight: PackedWeight, bias: torch.Tensor | None) -> list[int]:
    """decode_block.cpp's TableLinear: addresses (0 for none) and the format code."""
    return [weight.blocks.data_ptr(), weight.format, 0 if weight.scale is None else weight.scale.data_ptr(),
            0 if bias is None else bias.data_ptr()]


class DecodeLayers:
    """The blocks of a model (H heads, LayerNorm eps) as one call: x [B, C] (one decode token per sequence)
    -> the last block's output [B, C], or with `lm_head` (the final LayerNorm's (weight, bias) and the
    head's packed weight [C -> V], no bias) the logits [B, V]; it writes each block's K/V for the tokens."""

    def __init__(self, blocks: Sequence[DecodeBlock], heads: int, eps: float,
                 lm_head: tuple[tuple[torch.Tensor, torch.Tensor], PackedWeight] | None = None):
        if not blocks:
            raise ValueError("DecodeLayers needs at least one block")
        widths = {block.width for block in blocks}
        if len(widths) != 1:
            raise ValueError(f"every block must have one width, got {sorted(widths)}")
        self.blocks, self.width, self.heads, self.eps = tuple(blocks), widths.pop(), heads, eps
        if self.width % heads:
            raise ValueError(f"{heads} heads do not divide the width {self.width}")
        self.lib = blocks[0].attn.weight.lib
        self._table = torch.tensor([block.table_row() for block in blocks], dtype=torch.int64)   # [L, 20]
        self.lm_head = lm_head
        self._head = None
        if lm_head is not None:
            (norm_weight, norm_bias), head = lm_head
            if head.in_features != self.width or norm_weight.shape != (self.width,) or norm_bias.shape != (self.width,):
                raise ValueError(f"the LM head must take the width {self.width} after a LayerNorm of {self.width}, got "
                                 f"{head.in_features} -> {head.out_features} and {tuple(norm_weight.shape)}")
            self._head = torch.tensor(_table_linear(head, None), dtype=torch.int64)

    def __call__(self, x, kv_cache, slot_mapping, block_tables, context_lens) -> torch.Tensor:
        """kv_cache [L, 2, num_blocks, block_size, H, D] contiguous fp32: block i's K and V pools at [i, 0] and
        [i, 1]; slot_mapping [B] int64, block_tables [B, W] and context_lens [B] int32."""
        c, layers = self.width, len(self.blocks)
        check_cpu_tensor("x", x, torch.float32, 2)
        check_cpu_tensor("kv_cache", kv_cache, torch.float32, 6)
        check_cpu_tensor("slot_mapping", slot_mapping, torch.int64, 1)
        check_cpu_tensor("block_tables", block_tables, torch.int32, 2)
        check_cpu_tensor("context_lens", context_lens, torch.int32, 1)
        batch = x.shape[0]
        if x.shape[1] != c or slot_mapping.shape != (batch,) or block_tables.shape[0] != batch or context_lens.shape != (batch,):
            raise ValueError(f"x must be [B, {c}] with slot_mapping, block_tables and context_lens of B rows, got "
                             f"{tuple(x.shape)}, {tuple(slot_mapping.shape)}, {tuple(block_tables.shape)}, "
                             f"{tuple(context_lens.shape)}")
        head_dim = c // self.heads
        if kv_cache.shape[:2] != (layers, 2) or kv_cache.shape[4:] != (self.heads, head_dim) or not kv_cache.is_contiguous():
            raise ValueError(f"kv_cache must be contiguous [{layers}, 2, num_blocks, block_size, {self.heads}, "
                             f"{head_dim}], got {tuple(kv_cache.shape)}")
        x, slots, tables, lens = x.contiguous(), slot_mapping.contiguous(), block_tables.contiguous(), context_lens.contiguous()
        norm, head = (None, None) if self.lm_head is None else self.lm_head
        out = torch.empty(batch, c if head is None else head.out_features)
        bad = self.lib.gpt2_decode_layers(
            x.data_ptr(), batch, c, self.heads, self.eps, layers, self._table.data_ptr(),
            *((None, None, None, 0) if head is None else (norm[0].data_ptr(), norm[1].data_ptr(), self._head.data_ptr(),
                                                          head.out_features)),
            kv_cache.data_ptr(), kv_cache.shape[2], kv_cache.shape[3], slots.data_ptr(), tables.data_ptr(),
            tables.shape[1], lens.data_ptr(), 1.0 / math.sqrt(head_dim), out.data_ptr(), torch.get_num_threads())
        if bad > 0:
            raise ValueError(f"sequence {bad - 1}: context length {int(lens[bad - 1])} or its block table entries are "
                             f"out of range")
        if bad < 0:
            raise ValueError(f"slot_mapping[{-bad - 1}] = {int(slots[-bad - 1])} is past the cache")
        return out


def argtypes() -> list:
    """gpt2_decode_layers's C signature for ctypes."""
    ptr, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    return [ptr, i64, i64, i64, f32, i64, ptr, ptr, ptr, ptr, i64, ptr, i64, i64, ptr, ptr, i64, ptr, f32, ptr, i32]
