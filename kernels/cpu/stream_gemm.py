"""The streaming GEMM (stream_gemm.cpp): weight packing and the call.

y = act(LN(x) @ W^T * scale + bias) + residual for an fp32, bf16, fp16 or int8 (per-output-channel
scale) weight, x and y in fp32, LayerNorm and GELU optional, in a column-blocked layout streamed front
to back (the .cpp file has the layouts, the tiles and why the kernel exists). Int8 codes and bf16
weights are packed for one of two kinds of arithmetic: widened to fp32 and multiplied with fp32
activations (`pack(q, scale)`, `pack(w_bf16)`), or dot products on activations rounded to the
weight's type (`dot=True`): int8 codes (w8a8: integer dot products, VNNI where the CPU has it;
`lib.stream_gemm_dot_isa()` says which instruction) or bf16 (vdpbf16ps where the CPU has
AVX512-BF16; `lib.stream_gemm_bf16_isa()`).
It is a candidate path for the engine's CPU linears, chosen by their timing probe like the library
paths (engine/cpu_gemm.py). `lib` is a kernels.cpu.library() build.
"""
from __future__ import annotations

import ctypes
import math
import mmap
from dataclasses import dataclass

import torch


_HUGE_PAGE = 2 << 20
# The kernel's WeightFormat (kernels.h) of each weight dtype, widened (dot=False) or in dot products (dot=True).
WEIGHT_FORMATS = {torch.float32: 0, torch.int8: 1, torch.bfloat16: 2, torch.float16: 3}
DOT_FORMATS = {torch.int8: 4, torch.bfloat16: 5}
# k values of a column kept together in the dot layouts: one vpdpbusd lane's 4 bytes, one vdpbf16ps lane's 2 bf16
_DOT_GROUP = {torch.int8: 4, torch.bfloat16: 2}
_MAX_DOT_K = 2**16  # kInt8Dot's int32 accumulators stay exact below this K


def huge_page_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor for a packed weight. From 2 MiB up, on Linux, in 2 MiB-aligned memory advised for
    transparent huge pages: a stream over 4 KiB pages restarts the hardware prefetcher at every page
    boundary (the README's results give the read rate with and without). Elsewhere, or where
    the kernel does not grant them, the memory is plain pages and nothing else changes."""
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or nbytes < _HUGE_PAGE:
        return torch.empty(shape, dtype=dtype)
    region = mmap.mmap(-1, (-(-nbytes // _HUGE_PAGE) + 1) * _HUGE_PAGE,   # one page spare for the alignment
                       flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # (shared anonymous memory gets no THP)
    region.madvise(advice)
    offset = -ctypes.addressof(ctypes.c_char.from_buffer(region)) % _HUGE_PAGE
    return torch.frombuffer(region, dtype=dtype, count=numel, offset=offset).view(shape)   # keeps `region` alive


@dataclass(frozen=True)
class PackedWeight:
    """A weight in the kernel's column-blocked layout: blocks [ceil(N / NB), K, NB] (fp32, bf16, fp16 or int8
    codes) or, for the dot products, [ceil(N / NB), ceil(K / G), NB * G] (G = 4: uint8 codes + 128; G = 2:
    bf16), with the kernel's WeightFormat code, the int8 codes' per-output-channel scale (fp32 [N]; None
    for floating point), and the library built for that NB."""
    blocks: torch.Tensor
    in_features: int
    out_features: int
    scale: torch.Tensor | None
    lib: ctypes.CDLL
    format: int


def pack(weight_out_in: torch.Tensor, scale: torch.Tensor | None = None, *, lib: ctypes.CDLL,
         dot: bool = False) -> PackedWeight:
    """W [out, in] (fp32, bf16, fp16, or int8 codes with their fp32 scale [out]) in the blocked layout
    of `lib` (a library() build), in W's own dtype; dot: int8 codes or bf16 in the dot products' layout
    (stream_linear then rounds x to int8 codes or to bf16 too)."""
    int8 = weight_out_in.dtype == torch.int8
    if weight_out_in.dim() != 2 or weight_out_in.dtype not in WEIGHT_FORMATS:
        raise ValueError(f"weight must be a 2-D float32, bfloat16, float16 or int8 [out, in] tensor, got "
                         f"{weight_out_in.dtype} of shape {tuple(weight_out_in.shape)}")
    if int8 != (scale is not None):
        raise ValueError("int8 codes need their per-output-channel scale; a floating-point weight takes none")
    n, k = weight_out_in.shape
    if scale is not None and (scale.dtype != torch.float32 or scale.shape != (n,)):
        raise ValueError(f"scale must be float32 of shape ({n},), got {scale.dtype} of shape {tuple(scale.shape)}")
    if dot and weight_out_in.dtype not in DOT_FORMATS:
        raise ValueError(f"dot packs int8 codes or bfloat16, got a {weight_out_in.dtype} weight")
    if dot and int8 and k >= _MAX_DOT_K:
        raise ValueError(f"int8 dot products take fewer than {_MAX_DOT_K} input features (int32 accumulators), got {k}")
    nb = lib.stream_gemm_block_cols()
    blocks = -(-n // nb)
    scale = None if scale is None else scale.contiguous()
    if not dot:
        padded = torch.zeros(blocks * nb, k, dtype=weight_out_in.dtype)
        padded[:n] = weight_out_in
        packed = huge_page_empty((blocks, k, nb), weight_out_in.dtype)
        packed.copy_(padded.view(blocks, nb, k).transpose(1, 2))
        return PackedWeight(packed, k, n, scale, lib, WEIGHT_FORMATS[weight_out_in.dtype])
    # packed[b][g][c][j] = W[b * NB + c][G g + j]: int8 as codes + 128 (128, a zero code, past N and K), bf16 zero there
    group = _DOT_GROUP[weight_out_in.dtype]
    groups = -(-k // group)
    values = (weight_out_in.to(torch.int16) + 128).to(torch.uint8) if int8 else weight_out_in
    padded = torch.full((blocks * nb, groups * group), 128 if int8 else 0, dtype=values.dtype)
    padded[:n, :k] = values
    packed = huge_page_empty((blocks, groups, nb * group), values.dtype)
    packed.view(blocks, groups, nb, group).copy_(padded.view(blocks, nb, groups, group).transpose(1, 2))
    return PackedWeight(packed, k, n, scale, lib, DOT_FORMATS[weight_out_in.dtype])


def _contiguous_f32(t: torch.Tensor | None, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    """t as a contiguous fp32 CPU tensor of the given shape (None: absent), or ValueError naming it."""
    if t is None:
        return None
    if t.dtype != torch.float32 or t.device.type != "cpu" or tuple(t.shape) != shape:
        raise ValueError(f"{name} must be a float32 CPU tensor of shape {shape}, got {t.dtype} on {t.device} "
                         f"of shape {tuple(t.shape)}")
    return t.contiguous()


def _address(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def stream_linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None, *,
                  activation: str | None = None, residual: torch.Tensor | None = None,
                  layer_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
    """y [M, N] = act(LN(x) [M, K] @ W^T * scale + bias) + residual, in fp32 on the CPU, on torch's threads.

    activation: None or "gelu_tanh"; layer_norm: (weight [K], bias [K], eps) or None."""
    if x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"x must be a 2-D float32 CPU tensor, got {x.dtype} on {x.device} of shape {tuple(x.shape)}")
    if activation not in (None, "gelu_tanh"):
        raise ValueError(f"activation must be None or 'gelu_tanh', got {activation!r}")
    m, k = x.shape
    n = weight.out_features
    if k != weight.in_features:
        raise ValueError(f"x has {k} features, the weight takes {weight.in_features}")
    x = x.contiguous()
    bias, residual = _contiguous_f32(bias, "bias", (n,)), _contiguous_f32(residual, "residual", (m, n))
    ln_weight = ln_bias = None
    eps = 0.0
    if layer_norm is not None:
        ln_weight, ln_bias, eps = layer_norm
        ln_weight, ln_bias = _contiguous_f32(ln_weight, "ln_weight", (k,)), _contiguous_f32(ln_bias, "ln_bias", (k,))
    y = torch.empty(m, n, dtype=torch.float32)
    weight.lib.stream_gemm(x.data_ptr(), m, k, weight.blocks.data_ptr(), weight.format, n,
                           _address(weight.scale), _address(ln_weight), _address(ln_bias), eps, _address(bias),
                           activation is not None, _address(residual), y.data_ptr(), torch.get_num_threads())
    return y


def stream_read_sum(x: torch.Tensor, *, lib: ctypes.CDLL) -> float:
    """x's sum, read as the streaming GEMM reads its weights (on torch's threads): a read-bandwidth probe."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous float32 CPU tensor, got {x.dtype} on {x.device}")
    return lib.stream_read_sum(x.data_ptr(), x.numel(), torch.get_num_threads())
