"""CPU GEMM paths for the torch backend's linear layers, each chosen at load time by a timing probe.

Why a probe: the fastest way to run y = act(x @ W + b) + r at decode sizes depends on the CPU and
the library build: oneDNN's packed-weight path beats a plain `x @ W` on one EPYC generation and
loses on another, and torch's `_weight_int8pack_mm` is far slower than both (the README's results
have the figures). So no choice is hard-coded: `prepare_linear` times every candidate on this machine, for this
layer's shape and epilogue (bias, GELU, residual: oneDNN fuses them as post-ops, the others run them
as separate ops), at M = 1 and M = 8 (decode batches) and M = 64 (a guard: a path that is fast at
decode but pathological on prompt chunks loses), and keeps the one with the least sum of times
relative to the best at each M (the streaming GEMM wins ties within _FUSION_MARGIN: with it on every
linear a decode step's blocks are one C++ call). Choices are cached per (shape, epilogue, dtype, candidates, CPU
model and flags, torch threads, torch version, build of our kernels), in-process and in a JSON file
(`cache_file()`), so a later process on the same machine skips the probe.

Cold weights: a decode step streams every weight from DRAM once, so the probe must not time a
weight that sits in the last-level cache. Each candidate is timed over copies of the weight, visited
in turn, as a step visits the layers; between two visits of one copy the probe reads every copy of
every candidate, so all the candidates' copies together exceed twice the LLC (read from sysfs). So
the probe's memory is about twice the LLC whatever the number of candidates (~1 GB where a VM
reports a 480 MB LLC: two replicas probing at once must not exhaust a host).

Before any streaming GEMM is timed: its software prefetch distance is probed the same way, once per
machine (stream_prefetch_distance; kept with the choices).

Where: the probe runs in a thread of its own (`_probe_off_main`), as the router's thread runs the layers.

Fixed after load: a linear's path never changes with the batch size M of a call, so a row's result does not depend on
which path another batch size would have preferred (batch invariance, issue 14; the library kernel
inside one path may still block differently by M).

Candidates, fp32: "stream" (our own streaming GEMM, kernels/cpu/stream_gemm.cpp, built for this CPU on
first use, faster than the library paths where they were compared; bias and residual fused), "onednn_m1" / "onednn_m8" (weight reordered once into oneDNN's blocked layout for
batch 1 or 8, fused post-ops),
"matmul_in_out" (torch.addmm on W [in, out], MKL/OpenBLAS), "matmul_out_in" (F.linear on W [out, in]).
bf16 / fp16 weights (dtype="bf16" / "fp16" on CPU, activations fp32): "stream" only, which widens the
16-bit values to fp32 in registers and so reads half of fp32's bytes.
Int8 (engine/quantization.py codes q [out, in], fp32 scales): "int8_stream" (the streaming GEMM on int8
codes, widened to fp32 in registers), "int8_bag_<splits>" (fbgemm's int8
embedding bag, which streams one byte per weight), "int8_dequant_<KiB>" (widen a chunk
of rows of q to fp32 into a reused scratch buffer that stays in cache, F.linear on it, scale the
output columns; chunk = LLC/4), and "int8pack" (torch's `_weight_int8pack_mm`).
W8A8 (quantization="w8a8": the same codes, activations quantized per row): "w8a8_stream" only (the
streaming GEMM's integer dot products), so no probe runs; it computes something else than the
weight-only paths (the activations' rounding), so it is the user's choice, never the probe's.
"""
from __future__ import annotations

import functools
import json
import math
import os
import platform
import tempfile
import threading
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from gpt2_engine.quantization import Int8Weight
from gpt2_engine.kernels import cpu as cpu_kernels
from gpt2_engine.kernels.cpu import stream_gemm as cpu_stream_gemm

PROBE_BATCHES = (1, 8, 64)   # decode batches, timed on cold weights; and a prefill-sized guard, on one copy
_COLD_BATCHES = 8
_PROBE_PASSES = 4
_HOPELESS = 4.0   # a candidate this many times slower than the best in a pass is dropped
_MAX_PROBE_COPIES = 64
# The streaming GEMM is kept over a library path up to this much slower in the probe's score: the probe
# times one layer, but with every linear on the streaming GEMM a decode step's blocks run as one C++
# call (kernels/cpu/decode_block.cpp), which saves more than that on the blocks' other ops
# (on a 2-core Xeon: oneDNN won the 768x768 projection by a few percent and cost the fused blocks,
# ~10% of a batch-1 step).
_FUSION_MARGIN = 1.15
_DEFAULT_LLC_BYTES = 32 * 2**20


@dataclass(frozen=True)
class Epilogue:
    """What follows the GEMM in a layer: + bias, GELU-tanh, + residual."""
    bias: bool = False
    gelu: bool = False
    residual: bool = False


def _finish(y: torch.Tensor, activation, residual) -> torch.Tensor:
    """GELU and residual on a freshly computed y (in place)."""
    if activation is not None:
        y = F.gelu(y, approximate="tanh")
    if residual is not None:
        y.add_(residual)
    return y


@functools.cache
def cpu_kernel_library():
    """kernels/cpu built for this CPU (kept in cache_dir()), or None, with one warning, where no C++
    compiler can build it: then the library paths remain."""
    try:
        return cpu_kernels.library(None if cache_dir() is None else cache_dir() / "kernels")
    except cpu_kernels.BuildError as err:
        warnings.warn(f"gpt2-engine: the C++ CPU kernels are unavailable ({err}); CPU linears use the library "
                      "GEMMs and decode attention the gather path")
        return None


class Streaming:
    """Our streaming GEMM (kernels/cpu/stream_gemm.cpp) on fp32, bf16 or fp16 weights or int8 codes: the
    LayerNorm before it, bias, GELU and residual in its epilogue, all in one call. kind: "float" and
    "int8" (weight-only) multiply fp32 activations; "w8a8" quantizes them to int8 (integer dot products).
    bf16 weights run as bf16 dot products (the activations rounded to bf16, as torch's bf16 matmul
    rounds them) where the CPU has AVX512-BF16's vdpbf16ps, else widened to fp32: chosen by what the
    CPU reports (the kernels are built for it), not by timing, so a machine's numerics do not depend
    on a probe."""
    NAMES = {"float": "stream", "int8": "int8_stream", "w8a8": "w8a8_stream"}

    def __init__(self, kind: str):
        if kind not in self.NAMES:
            raise ValueError(f"kind must be one of {sorted(self.NAMES)}, got {kind!r}")
        self.kind, self.name = kind, self.NAMES[kind]

    @staticmethod
    def available(dtype: torch.dtype) -> bool:
        return dtype in cpu_stream_gemm.WEIGHT_FORMATS and cpu_kernel_library() is not None

    def prepare(self, weight):
        lib = cpu_kernel_library()
        if self.kind == "float":
            return cpu_stream_gemm.pack(weight, lib=lib, dot=weight.dtype == torch.bfloat16 and bf16_dot_products())
        return cpu_stream_gemm.pack(weight.q, weight.scale, lib=lib, dot=self.kind == "w8a8")

    def __call__(self, packed, h, bias, activation, residual, layer_norm=None):
        return cpu_stream_gemm.stream_linear(h, packed, bias, activation=activation, residual=residual,
                                             layer_norm=layer_norm)


def bf16_dot_products() -> bool:
    """Whether bf16 weights run as bf16 dot products here: the kernels were built with AVX512-BF16
    (they are built for this CPU, -march=native)."""
    lib = cpu_kernel_library()
    return lib is not None and lib.stream_gemm_bf16_isa().decode() == "avx512_bf16"


class StreamingWithSetting(Streaming):
    """The streaming GEMM with one of the kernels' run-time settings (`setter`, a function of the C++
    library, and its value) applied before each call: a candidate of _probed_setting."""

    def __init__(self, setter: str, value: int):
        super().__init__("float")
        self.setter, self.value = setter, value
        self.name = f"{setter.removeprefix('stream_gemm_set_')}_{value}"

    def __call__(self, packed, h, bias, activation, residual, layer_norm=None):
        getattr(cpu_kernel_library(), self.setter)(self.value)
        return super().__call__(packed, h, bias, activation, residual, layer_norm)


def _probed_setting(setter: str, values: tuple[int, ...], dtype: torch.dtype) -> int:
    """The fastest of `values` for a kernel setting on this machine, probed once (and kept with the path
    choices) on cold copies of a GPT-2-small c_fc weight stored in `dtype`, then set for every call."""
    candidates = [StreamingWithSetting(setter, value) for value in values]
    weight, epilogue = torch.randn(3072, 768).to(dtype), Epilogue(bias=True, gelu=True, residual=False)
    key = (768, 3072, epilogue, setter, ",".join(p.name for p in candidates), cpu_signature(),
           f"{torch.get_num_threads()} threads", f"torch {torch.__version__}", _kernels_build())
    value = next(p.value for p in candidates if p.name == _choose(key, candidates, weight, epilogue))
    getattr(cpu_kernel_library(), setter)(value)
    return value


PREFETCH_DISTANCES = (0, 256, 512, 1024)   # bytes ahead of each weight stream; 0: the hardware prefetchers alone


@functools.cache
def stream_prefetch_distance() -> int:
    """The streaming GEMM's software prefetch distance for this machine (_probed_setting). Why probed:
    on a 2-core Xeon (AVX-512, AMX) 512 bytes ahead read a batch-1 weight stream ~1.1x faster than
    none, and on a 2-core EPYC every distance tried was slower (kernels/cpu/stream_gemm.cpp)."""
    return _probed_setting("stream_gemm_set_prefetch", PREFETCH_DISTANCES, torch.float32)


BF16_FUSED_ROWS = (0, 2, 4, 8)   # tiles of at most this many rows on vdpbf16ps; 0: FMAs always


@functools.cache
def bf16_fused_rows() -> int:
    """Up to which tile height bf16 dot products run on vdpbf16ps here, the larger tiles on shifts and
    FMAs with the same results (_probed_setting). Why probed: on a 2-vCPU Xeon vdpbf16ps was the
    faster way for one-row tiles (batch 1: 3.4 ms against 3.6 on FMAs for 24 c_fc weights) and the
    slower for four-row ones (batch 8: 6.9 against 6.2), as the instruction's issue ports and the
    core's FMA units compare (kernels/cpu/stream_gemm.cpp)."""
    return _probed_setting("stream_gemm_set_bf16_fused_rows", BF16_FUSED_ROWS, torch.bfloat16)


class OneDnnPacked:
    """oneDNN on a weight reordered once into its blocked layout; bias, GELU and residual fused.
    oneDNN picks the blocked layout for a batch-size hint (any M runs on it): 1 and 8 are both candidates."""

    def __init__(self, batch_hint: int):
        self.batch_hint, self.name = batch_hint, f"onednn_m{batch_hint}"

    @staticmethod
    def available(dtype: torch.dtype) -> bool:
        return (dtype == torch.float32 and torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))

    def prepare(self, weight_out_in: torch.Tensor):
        return torch.ops.mkldnn._reorder_linear_weight(weight_out_in.contiguous(), self.batch_hint)

    def __call__(self, packed, h, bias, activation, residual):
        if residual is not None and activation is None:
            return torch.ops.mkldnn._linear_pointwise.binary(h, residual.contiguous(), packed, bias, "add")
        y = torch.ops.mkldnn._linear_pointwise(h, packed, bias, "gelu" if activation else "none", [],
                                               "tanh" if activation else "")
        return y + residual if residual is not None else y


class Blas:
    """torch's BLAS GEMM (MKL / OpenBLAS) on a contiguous weight in one of the two layouts:
    "in_out" = W [in, out] through torch.addmm, "out_in" = W [out, in] through F.linear."""

    def __init__(self, layout: str):
        if layout not in ("in_out", "out_in"):
            raise ValueError(f"layout must be 'in_out' or 'out_in', got {layout!r}")
        self.layout, self.name = layout, f"matmul_{layout}"

    @staticmethod
    def available(dtype: torch.dtype) -> bool:
        return dtype == torch.float32

    def prepare(self, weight_out_in: torch.Tensor):
        return (weight_out_in.t() if self.layout == "in_out" else weight_out_in).contiguous()

    def __call__(self, w, h, bias, activation, residual):
        if self.layout == "out_in":
            y = F.linear(h, w, bias)
        else:
            y = torch.addmm(bias, h, w) if bias is not None else torch.mm(h, w)
        return _finish(y, activation, residual)


class Int8Dequant:
    """Int8 codes widened chunk by chunk (rows of q) into a reused fp32 scratch, then F.linear.

    The scratch (chunk_bytes, fp32) stays in cache between the widening copy and the GEMM, so DRAM
    sees one byte per weight; y[:, rows] = (h @ q[rows]^T) * scale[rows] (+ bias) per chunk."""

    def __init__(self, chunk_bytes: int):
        self.chunk_bytes = chunk_bytes
        self.name = f"int8_dequant_{chunk_bytes // 1024}k"
        self._scratch = threading.local()   # one buffer per thread, shared by every layer

    @staticmethod
    def available(dtype: torch.dtype) -> bool:
        return dtype == torch.float32

    def prepare(self, weight: Int8Weight):
        return weight

    def _buffer(self, numel: int) -> torch.Tensor:
        buf = getattr(self._scratch, "buf", None)
        if buf is None or buf.numel() < numel:
            with torch.inference_mode(False):   # a normal tensor: writable in and outside inference mode
                buf = self._scratch.buf = torch.empty(numel, dtype=torch.float32)
        return buf[:numel]

    def __call__(self, weight: Int8Weight, h, bias, activation, residual):
        n, k = weight.q.shape
        rows = max(1, min(n, self.chunk_bytes // (4 * k)))
        if rows == n:   # one chunk: no concatenation
            y = F.linear(h, self._buffer(n * k).view(n, k).copy_(weight.q))
        else:
            y = torch.empty(h.shape[0], n, dtype=h.dtype)
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                y[:, r0:r1] = F.linear(h, self._buffer((r1 - r0) * k).view(r1 - r0, k).copy_(weight.q[r0:r1]))
        y = torch.addcmul(bias, y, weight.scale) if bias is not None else y.mul_(weight.scale)
        return _finish(y, activation, residual)


class Int8PackMM:
    """torch's weight-only int8 GEMM, aten._weight_int8pack_mm(x, q [out, in], scale [out])."""
    name = "int8pack"

    @staticmethod
    def available(dtype: torch.dtype) -> bool:
        return dtype == torch.float32 and hasattr(torch.ops.aten, "_weight_int8pack_mm")

    def prepare(self, weight: Int8Weight):
        return weight

    def __call__(self, weight: Int8Weight, h, bias, activation, residual):
        y = torch.ops.aten._weight_int8pack_mm(h, weight.q, weight.scale)
        if bias is not None:
            y.add_(bias)
        return _finish(y, activation, residual)


class Int8EmbeddingBag:
    """fbgemm's row-wise int8 embedding bag as a weight-only int8 GEMM that reads one byte per weight.

    sum_k x[m, k] * table[k, :] is y[m, :] = x[m] @ W^T when table row k is W[:, k]: so the table is
    q^T shifted to uint8 (q + 128) with row scale 1 and row bias -128 (fbgemm dequantises each row as
    code * scale + bias), which reproduces the int8 codes exactly; the per-output-channel scales are
    applied to y afterwards. Each bag is one (K range, row m) pair: K is cut into `splits` ranges so
    that the threads share a row's work and a range's table rows stay in cache across the M rows
    (bags are ordered range-major); the partial sums of the ranges are added in range order.
    It is a streaming kernel, not a GEMM: at prompt sizes (M in the hundreds) it re-reads the table
    per row and loses to a GEMM on dequantised weights; the probe's M = 64 guard weighs that in."""

    def __init__(self, splits: int):
        self.splits, self.name = splits, f"int8_bag_{splits}"
        self._indices: dict[tuple[int, int], tuple] = {}

    @staticmethod
    def available(dtype: torch.dtype) -> bool:
        return dtype == torch.float32 and hasattr(torch.ops.quantized, "embedding_bag_byte_rowwise_offsets")

    def prepare(self, weight: Int8Weight):
        k = weight.in_features
        codes = (weight.q.t().to(torch.int16) + 128).to(torch.uint8)                       # [K, N]
        scale_bias = torch.tensor([1.0, -128.0]).view(torch.uint8).expand(k, 8)            # fp32 1.0, -128.0 per row
        return torch.cat([codes, scale_bias], 1).contiguous(), weight.scale

    def _bags(self, m: int, k: int):
        """(order of x's elements, table rows, bag offsets) for m rows, cached per (m, k)."""
        if (m, k) not in self._indices:
            bounds = [round(s * k / self.splits) for s in range(self.splits + 1)]
            ranges = [torch.arange(lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]
            rows = torch.cat([r for r in ranges for _ in range(m)])
            order = torch.cat([r + i * k for r in ranges for i in range(m)])
            offsets = torch.tensor([0] + [len(r) for r in ranges for _ in range(m)][:-1]).cumsum(0)
            self._indices[(m, k)] = (order, rows, offsets, len(ranges))
        return self._indices[(m, k)]

    def __call__(self, prepared, h, bias, activation, residual):
        table, scale = prepared
        m, k = h.shape
        order, rows, offsets, parts = self._bags(m, k)
        y = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(table, rows, offsets, False, 0, False,
                                                                  h.reshape(-1)[order], None, False)
        y = y.view(parts, m, -1).sum(0) if parts > 1 else y
        y = torch.addcmul(bias, y, scale) if bias is not None else y.mul_(scale)
        return _finish(y, activation, residual)


def llc_bytes() -> int:
    """The largest CPU cache (sysfs), or 32 MiB where sysfs does not say."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip().upper()
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes, default=_DEFAULT_LLC_BYTES)


@functools.cache
def cpu_signature() -> str:
    """CPU model, ISA flags and torch's CPU capability: what a path choice is valid for."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = value.strip()
    except OSError:
        pass
    return f"{model} | {torch.backends.cpu.get_cpu_capability()} | {zlib.crc32(flags.encode()):08x}"


def float_candidates(dtype: torch.dtype) -> list:
    """The paths for a weight stored in `dtype` (activations fp32): every fp32 path; for bf16 / fp16
    weights our streaming GEMM only (it widens them in registers; the library GEMMs would need the
    weight, or the activations, converted on every call)."""
    paths = (Streaming("float"), OneDnnPacked(1), OneDnnPacked(8), Blas("in_out"), Blas("out_in"))
    return [p for p in paths if p.available(dtype)]


@functools.cache
def int8_candidates() -> tuple:
    llc = llc_bytes()
    paths = (Streaming("int8"), Int8EmbeddingBag(2), Int8EmbeddingBag(8), Int8Dequant(llc // 4), Int8PackMM())
    return tuple(p for p in paths if p.available(torch.float32))


def _kernels_build() -> str:
    """Which build of our C++ kernels the choice was timed with (its file name hashes the sources): a
    changed kernel is probed afresh."""
    lib = cpu_kernel_library()
    return "no C++ kernels" if lib is None else Path(lib._name).stem


def w8a8_available() -> bool:
    """Whether quantization="w8a8" can run here: it needs our C++ kernels (a C++ compiler)."""
    return cpu_kernel_library() is not None


@dataclass(frozen=True)
class CpuLinear:
    """A linear layer's weight in the layout of the GEMM path chosen for it; y = layer(h, b, act, r)."""
    path: object
    weight: object
    in_features: int
    out_features: int

    def __call__(self, h, bias=None, activation=None, residual=None, layer_norm=None):
        """y = act(LN(h) @ W^T + bias) + residual; layer_norm = (weight, bias, eps) or None (no LN)."""
        if isinstance(self.path, Streaming):
            return self.path(self.weight, h, bias, activation, residual, layer_norm)
        if layer_norm is not None:
            h = F.layer_norm(h, (h.shape[-1],), layer_norm[0], layer_norm[1], layer_norm[2])
        return self.path(self.weight, h.contiguous(), bias, activation, residual)


_CHOICES: dict[tuple, str] = {}


def cache_dir() -> Path | None:
    """$GPT2_ENGINE_CACHE_DIR (default ~/.cache/gpt2-engine; "off": None, nothing kept between processes)."""
    root = os.environ.get("GPT2_ENGINE_CACHE_DIR", str(Path.home() / ".cache" / "gpt2-engine"))
    return None if root == "off" else Path(root)


def cache_file() -> Path | None:
    """Where probe choices persist between processes: cpu_gemm_paths.json in cache_dir(). A CLI call or
    a server start on a machine that has probed these shapes before loads without probing again."""
    root = cache_dir()
    return None if root is None else root / "cpu_gemm_paths.json"


def _stored_choices(path: Path) -> dict[str, str]:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):     # none yet, unreadable or corrupt: probe afresh (and rewrite it)
        return {}
    return stored if isinstance(stored, dict) else {}


def _store_choice(path: Path, key: str, name: str) -> None:
    """Add one choice to the file (read, update, atomic replace; another process's entries kept)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        stored = _stored_choices(path) | {key: name}
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
            json.dump(stored, tmp, indent=0, sort_keys=True)
        os.replace(tmp.name, path)
    except OSError:
        pass   # a read-only home: the choice still holds for this process


def _choose(key: tuple, candidates, weight, epilogue: Epilogue) -> str:
    """The path name for a key: this process's choice, else the cache file's, else a probe's."""
    if key not in _CHOICES:
        path, text_key = cache_file(), f"{_label(key)} {' | '.join(map(str, key[4:]))}"
        names = {p.name for p in candidates}
        stored = _stored_choices(path).get(text_key) if path is not None else None
        if stored in names:
            _CHOICES[key] = stored
        else:
            _CHOICES[key] = _probe_off_main(candidates, weight, epilogue) if len(names) > 1 else candidates[0].name
            if path is not None and len(names) > 1:
                _store_choice(path, text_key, _CHOICES[key])
    return _CHOICES[key]


def prepare_linear(weight: torch.Tensor | Int8Weight, epilogue: Epilogue, candidates=None, *,
                   w8a8: bool = False) -> CpuLinear:
    """The layer's weight prepared for the fastest candidate path here (probed once per key, on this
    machine: the choice is kept in-process and in cache_file()).

    weight: fp32, bf16 or fp16 [out, in] (for an HF Conv1D weight [in, out], pass its transpose) or an
    Int8Weight; activations are fp32 whatever the weight's dtype, except with w8a8 (an Int8Weight's
    codes times the activations' per-row int8 codes: the "w8a8_stream" path)."""
    int8 = isinstance(weight, Int8Weight)
    if w8a8 and not int8:
        raise ValueError(f"w8a8 takes an Int8Weight, got a {weight.dtype} weight")
    out_features, in_features = weight.q.shape if int8 else weight.shape
    if candidates is None:
        if w8a8:
            candidates = [Streaming("w8a8")] if w8a8_available() else []
        else:
            candidates = int8_candidates() if int8 else float_candidates(weight.dtype)
    precision = "w8a8" if w8a8 else "int8" if int8 else str(weight.dtype)
    if not candidates:
        raise ValueError(f"no CPU GEMM path supports a {precision} weight")
    if any(isinstance(p, Streaming) for p in candidates):
        stream_prefetch_distance()   # before any streaming GEMM is timed or run
        if not int8 and weight.dtype == torch.bfloat16 and bf16_dot_products():
            bf16_fused_rows()
    key = (in_features, out_features, epilogue, precision,
           ",".join(p.name for p in candidates), cpu_signature(), f"{torch.get_num_threads()} threads",
           f"torch {torch.__version__}", _kernels_build())
    name = _choose(key, candidates, weight, epilogue)
    path = next(p for p in candidates if p.name == name)
    return CpuLinear(path, path.prepare(weight), in_features, out_features)


def chosen_paths() -> dict[str, str]:
    """The probe's choices so far, as 'in x out epilogue dtype -> path' (for reports)."""
    return {_label(key): name for key, name in _CHOICES.items()}


def _label(key: tuple) -> str:
    """'in x out epilogue dtype' of a choice key."""
    in_features, out_features, e, dtype = key[:4]
    epilogue = "+".join(n for n, on in (("bias", e.bias), ("gelu", e.gelu), ("residual", e.residual)) if on) or "plain"
    return f"{in_features}x{out_features} {epilogue} {dtype}"


def _copy(weight):
    return Int8Weight(weight.q.clone(), weight.scale.clone()) if isinstance(weight, Int8Weight) else weight.clone()


def _probe_off_main(candidates, weight, epilogue: Epilogue) -> str:
    """_probe run in a thread of its own, as the router's thread runs the layers for generate() and
    the server: OpenMP libraries run slower there than on the main thread (libgomp gives each calling
    thread a pool of its own, and with more pools than cores it stops spinning between regions;
    measured: oneDNN's decode GEMMs ~1.3x slower there, ours not), so a probe on the main thread
    would pick paths by times that users never see."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpt2-engine-probe") as worker:
        return worker.submit(_probe, candidates, weight, epilogue).result()


@torch.inference_mode()
def _probe(candidates, weight, epilogue: Epilogue) -> str:
    """The candidate with the least sum over PROBE_BATCHES of its time relative to the best.

    Candidates alternate within each pass, so that a burst of load from other processes slows
    all of them rather than one; each keeps its fastest pass. One _HOPELESS times slower than the
    best after a pass is dropped: a slow candidate costs the probe a warm-up and one pass."""
    out_features, in_features = weight.q.shape if isinstance(weight, Int8Weight) else weight.shape
    nbytes = weight.q.numel() if isinstance(weight, Int8Weight) else weight.numel() * weight.element_size()
    copies = max(1, min(_MAX_PROBE_COPIES, math.ceil(2 * llc_bytes() / (nbytes * len(candidates)))))
    sources = [weight] + [_copy(weight) for _ in range(copies - 1)]
    prepared = {path.name: (path, [path.prepare(w) for w in sources]) for path in candidates}
    bias = torch.zeros(out_features) if epilogue.bias else None
    activation = "gelu_tanh" if epilogue.gelu else None
    times: dict[str, list[float]] = {name: [] for name in prepared}
    out: set[str] = set()   # hopeless somewhere: not timed again, and not chosen
    for m in PROBE_BATCHES:
        h = torch.randn(m, in_features)
        visits = {name: weights if m <= _COLD_BATCHES else weights[:1] for name, (_, weights) in prepared.items()}
        residual = torch.zeros(m, out_features) if epilogue.residual else None
        best = dict.fromkeys(prepared, math.inf)
        for step in range(_PROBE_PASSES + 1):   # pass 0 warms up: primitive creation, output pages
            for name, (path, _) in prepared.items():
                if name in out:
                    continue
                start = time.perf_counter()
                for w in visits[name]:
                    path(w, h, bias, activation, residual)
                elapsed = time.perf_counter() - start
                if step:
                    best[name] = min(best[name], elapsed)
            if step:
                fastest = min(best.values())
                out |= {name for name, t in best.items() if t > _HOPELESS * fastest}
        for name, t in best.items():
            times[name].append(t)
    times = {name: t for name, t in times.items() if name not in out}
    fastest = [min(t[i] for t in times.values()) for i in range(len(PROBE_BATCHES))]
    score = {name: sum(t / f for t, f in zip(times[name], fastest)) for name in times}
    best = min(score, key=score.get)
    stream = next((name for name, (path, _) in prepared.items() if type(path) is Streaming and name in score), None)
    return stream if stream is not None and score[stream] <= _FUSION_MARGIN * score[best] else best
