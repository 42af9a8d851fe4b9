"""Self-re-arming arrival counters and split-K workspaces: the last program of a group to arrive does
the group's final step.

What
    Split-K kernels (fused_linear's decode GEMM, paged_attention's flash-decoding) cut one output
    into S partials computed by S programs. Instead of a second launch to combine them, each
    program stores its fp32 partial to a workspace and calls `last_to_arrive` on the group's
    int32 counter; the one program that sees S - 1 arrivals before its own combines all S
    partials and writes the output. One launch, no fp32 atomics.

Determinism
    The combining program reads the partials of splits 0..S-1 from the workspace in a fixed order
    (a loop over s, or one vector load reduced by a fixed-shape tl.sum / tl.max), whatever the
    arrival order and whichever program is elected; every program runs the same code. So a
    result is a function of the inputs and the launch configuration only: bit-for-bit repeatable.

Memory ordering (PTX memory model; argued, not testable on CPU)
    1. Each thread of a program stores its part of the partial (plain st.global), then
       `tl.debug_barrier()` (bar.sync) orders every thread's stores of the CTA before what the
       CTA does next, in particular before the atomic.
    2. The atomic is `atom.add.acq_rel.gpu` (a scalar atomic: Triton issues it from one thread
       and broadcasts the old value through shared memory behind another barrier). Its release
       half is cumulative: the CTA's partial stores, made visible to the issuing thread by the
       barrier, are released at gpu scope before the increment is.
    3. The counter's increments form one release sequence (read-modify-writes continue it), so
       the acquire half of the last arriver's atomic synchronises with every earlier arriver's
       release: all S partials happen-before the elected program's loads, which follow its
       atomic (and the broadcast barrier, for the other threads of the CTA).
    4. The elected program loads the partials with cache modifier ".cg" (cache in L2 only): the
       SM's L1, which is not coherent with other SMs' stores, cannot serve a line of the workspace
       cached before those stores landed; L2 is the point of coherence for gpu scope.
    Re-arming: the elected program resets the counter to 0 with a relaxed exchange right after
    its election (all S arrivals have happened; nobody touches the counter again in this launch).
    The next launch on the stream starts after this one completes, and a kernel boundary orders
    all of its memory operations, so every launch that follows a completed one finds its counters at 0.

Counters that cannot get stuck
    A launch that does not complete (an exception inside the interpreter's grid loop, a
    KeyboardInterrupt between programs) would leave some counters at 1..S-1, and every later
    split-K result on those counters would elect too early. `guarded_launch` runs a launch and, if
    it raises anything at all, re-arms (zeroes) the buffers before re-raising. On a GPU a kernel
    that faults poisons the whole CUDA context (every later call fails loudly), so the remaining
    risk is sharing: two streams, or two CUDA graphs replayed concurrently, using one buffer.
    Eager launches use one buffer per (device, stream); a CUDA-graph capture wrapped in
    `graph_buffers(device)` gets buffers of its own, zeroed inside the capture, so every replay
    starts with a memset node that re-arms them whatever happened before.

Buffers: zeroed int32 counters and an fp32 workspace per (device, stream), shared by every kernel
    (launches on one stream run one after the other). They are allocated on first use, so a
    CUDA-graph capture must be preceded by a warm-up run on the capture stream or wrapped in
    `graph_buffers`; a graph records the buffers' addresses. A launch that needs more than a buffer
    holds gets a larger one; the smaller one is kept alive, so a graph captured with it stays valid.
"""
from __future__ import annotations

import contextlib

import torch
from gpt2_engine.kernels import triton_defaults  # noqa: F401  (before triton)
import triton
import triton.language as tl

_MIN_COUNTERS = 4096
_MIN_WORKSPACE = 1 << 16


class _Buffers:
    """The counters and workspace of one stream (or one captured graph); grown, never freed."""

    __slots__ = ("device", "counters", "workspace", "kept")

    def __init__(self, device: torch.device):
        self.device = device
        self.counters = self._zeros(0, torch.int32)
        self.workspace = self._zeros(0, torch.float32)
        self.kept: list[torch.Tensor] = []

    def _zeros(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        # Never an inference tensor, whoever allocates first: the buffers outlive the call (and the
        # caller's torch.inference_mode()) and are written in place by later launches outside it.
        with torch.inference_mode(False):
            return torch.zeros(numel, dtype=dtype, device=self.device)

    def _grown(self, current: torch.Tensor, numel: int, minimum: int) -> torch.Tensor:
        """current if it holds numel elements, else a larger zeroed buffer (current is kept alive)."""
        if current.numel() >= numel:
            return current
        self.kept.append(current)
        return self._zeros(max(minimum, 1 << (numel - 1).bit_length()), current.dtype)

    def get_counters(self, count: int) -> torch.Tensor:
        self.counters = self._grown(self.counters, count, _MIN_COUNTERS)
        return self.counters

    def get_workspace(self, numel: int) -> torch.Tensor:
        self.workspace = self._grown(self.workspace, numel, _MIN_WORKSPACE)
        return self.workspace

    def rearm(self) -> None:
        for t in (self.counters, *self.kept):
            if t.dtype == torch.int32:
                t.zero_()


_STREAM_BUFFERS: dict[tuple[str, int], _Buffers] = {}
_GRAPH_SCOPE: dict[tuple[str, int], _Buffers] = {}   # (device, stream) -> buffers of the graph being captured


@triton.jit
def last_to_arrive(counter_ptr, num_arrivals):
    """Count this program's arrival at *counter_ptr; True in exactly one of the num_arrivals programs
    of the group (the last), with every other program's stores before its call visible to it (load
    them with cache_modifier=".cg"). Re-arms the counter to 0 for the next launch."""
    tl.debug_barrier()   # all of this CTA's stores precede the release below
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    is_last = arrived == num_arrivals - 1
    tl.atomic_xchg(counter_ptr, 0, mask=is_last, sem="relaxed", scope="gpu")
    return is_last


def _key(device: torch.device) -> tuple[str, int]:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    return str(device), stream


def buffers(device: torch.device) -> _Buffers:
    """The buffers launches on `device`'s current stream use now (a graph's own while capturing in graph_buffers)."""
    key = _key(device)
    scoped = _GRAPH_SCOPE.get(key)
    if scoped is not None:
        return scoped
    found = _STREAM_BUFFERS.get(key)
    if found is None:
        found = _STREAM_BUFFERS[key] = _Buffers(device)
    return found


def arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """At least `count` zeroed int32 counters for launches on `device`'s current stream."""
    return buffers(device).get_counters(count)


def guarded_launch(launch, device: torch.device) -> None:
    """Run launch(); if it raises (a partial launch), re-arm the current buffers' counters, then re-raise."""
    try:
        launch()
    except BaseException:
        buffers(device).rearm()
        raise


@contextlib.contextmanager
def graph_buffers(device: torch.device):
    """Around a CUDA-graph capture (inside `torch.cuda.graph(...)`): the launches captured use
    counters and workspaces private to this graph, zeroed by the graph itself at its start."""
    device = torch.device(device)
    key = _key(device)
    scoped = _GRAPH_SCOPE[key] = _Buffers(device)
    scoped.get_counters(_MIN_COUNTERS)   # allocated and zeroed inside the capture: a memset node at graph start
    try:
        yield scoped
    finally:
        del _GRAPH_SCOPE[key]
        _KEEP_ALIVE.append(scoped)   # the graph holds raw addresses into these tensors


_KEEP_ALIVE: list[_Buffers] = []
