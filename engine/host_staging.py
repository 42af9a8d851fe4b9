"""Host <-> device copies that never make the host wait for the device (CUDA); plain copies elsewhere.

A blocking `.to(cuda)` from pageable memory synchronises the stream, i.e. waits for every kernel
already queued; so does any readback. A step that is to run while the host prepares the next one
(gpt2_engine.llm_engine, async scheduling) may do neither between its first launch and its one readback:

- `PinnedStaging.upload`: a step's integer inputs written into a reused page-locked buffer and
  copied with non_blocking=True. The buffer is overwritten only after the copy out of it has run
  (an event recorded behind the copy is waited on first: by then the device has long started the
  step that used it, so this wait is short or nil).
- `upload`: small per-step tensors (sampling parameters, row indices) through PyTorch's caching
  host allocator, which hands out reused pinned blocks and keeps each one until the copy out of it
  has completed (it records an event on the stream), so nothing is overwritten early.
- `Readback`: one device-to-host copy into pinned memory, enqueued right behind the work that
  produces it; `values()` waits for that copy only, not for work queued after it.

On a machine without CUDA, or for a CPU device, these are plain tensor constructions and copies.
"""
from __future__ import annotations

import torch


def _pinned(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


def upload(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 1-D device tensor of values, copied without waiting for the device."""
    if not _pinned(device):
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


class PinnedStaging:
    """One reused page-locked buffer per dtype for a device's step inputs (grown when too small)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffers: dict[torch.dtype, torch.Tensor] = {}
        self.copied: dict[torch.dtype, torch.cuda.Event] = {}    # recorded behind the last copy out of each

    def upload(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        buffer = self.buffers.get(dtype)
        if buffer is None or buffer.numel() < len(values):
            # a buffer being replaced is kept by the caching host allocator until its copy has run
            buffer = torch.empty(max(len(values), 2 * (buffer.numel() if buffer is not None else 1024)), dtype=dtype,
                                 pin_memory=True)
            self.buffers[dtype], self.copied[dtype] = buffer, torch.cuda.Event()
        self.copied[dtype].synchronize()          # (returns at once for an event never recorded)
        host = buffer[:len(values)]
        host.copy_(torch.tensor(values, dtype=dtype))
        out = host.to(self.device, non_blocking=True)
        self.copied[dtype].record(torch.cuda.current_stream(self.device))
        return out


def staging_for(device: torch.device) -> PinnedStaging | None:
    """The staging buffers a runner on this device uploads through (None: plain copies)."""
    return PinnedStaging(device) if _pinned(device) else None


class Readback:
    """tensor's values for the host: the copy is enqueued now, `values()` waits for it alone."""

    def __init__(self, tensor: torch.Tensor):
        if _pinned(tensor.device):
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record(torch.cuda.current_stream(tensor.device))
        else:
            self._host, self._done = tensor, None

    def values(self) -> list:
        if self._done is not None:
            self._done.synchronize()
        return self._host.tolist()
