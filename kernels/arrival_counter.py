"""Self-re-arming arrival counters: the last program of a group to arrive does the group's final step.

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
    all of its memory operations, so every launch finds all counters at 0.

Buffers: one zeroed int32 buffer per (device, stream), shared by every kernel using counters
    (launches on one stream run one after the other, and each leaves all counters at 0). The
    buffer is allocated on first use, so a CUDA-graph capture must be preceded by a warm-up run on
    the capture stream (the engine's DecodeGraphs does this); a graph records the buffer's address.
    A launch that needs more counters than the buffer holds gets a larger buffer; the smaller one
    is kept alive, so a graph captured with it stays valid. Two launches must not run
    concurrently on one stream's counters (one stream serialises them).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_MIN_SLOTS = 4096
_BUFFERS: dict[tuple[str, int], list[torch.Tensor]] = {}   # (device, stream) -> buffers, the newest last


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


def arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """At least `count` zeroed int32 counters for launches on `device`'s current stream."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    buffers = _BUFFERS.setdefault((str(device), stream), [])
    if not buffers or buffers[-1].numel() < count:
        size = max(_MIN_SLOTS, triton.next_power_of_2(count))
        buffers.append(torch.zeros(size, dtype=torch.int32, device=device))
    return buffers[-1]
