"""Launching a @triton.jit kernel with little host work.

`fn[grid](...)` costs tens of microseconds of Python per call in Triton 3.x: it binds every
argument, derives each one's specialisation (dtype, 16-byte alignment, == 1) and hashes them into
the compile-cache key. A launcher that caches its plan per (shapes, strides, dtypes, devices, options)
already knows all of that except the pointers' alignment, so on CUDA it passes `key` = its plan key
plus `aligned(...)` of its tensors: the first launch with a key goes through the JIT and keeps the
CompiledKernel it returns; later launches with that key call the compiled kernel directly. Under
the interpreter (no GPU) every launch takes the JIT path (key None).

Calling convention: since Triton 3.3 the JIT hands the compiled kernel every bound argument,
constexprs included (`kernel.run(..., *bound_args.values())`), and `CompiledKernel[grid](*args)`
forwards them the same way; older Triton passed only the non-constexpr ones, so there every
launch takes the JIT path.
"""
from __future__ import annotations

from gpt2_engine.kernels import triton_defaults  # noqa: F401  (before triton)
import triton

_COMPILED: dict = {}
DIRECT = tuple(int(part) for part in triton.__version__.split(".")[:2]) >= (3, 3)


def aligned(*tensors) -> tuple[bool, ...]:
    """16-byte alignment of each tensor's data pointer (Triton specialises pointers on it)."""
    return tuple(t.data_ptr() % 16 == 0 for t in tensors)


def launch(fn, grid: tuple[int, int, int], args: tuple, constexprs: dict, *, num_warps: int, num_stages: int,
           key=None) -> None:
    """fn[grid](*args, **constexprs). args are the kernel's leading runtime parameters in order and
    constexprs its trailing constexpr ones, in declaration order. key (CUDA only): a hashable that
    determines every specialisation Triton derives from these arguments; None = always the JIT path."""
    if key is not None and DIRECT:
        compiled = _COMPILED.get(key)
        if compiled is not None:
            compiled[grid](*args, *constexprs.values())   # the JIT passes every bound argument, constexprs included
            return
    compiled = fn[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
    if key is not None and DIRECT and compiled is not None:
        _COMPILED[key] = compiled
