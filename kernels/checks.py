"""Argument checks shared by the kernel launchers: each raises a TypeError / ValueError naming the
argument and what is wrong. They read only tensor metadata (no device sync), a few hundred
nanoseconds each, and run only on a launcher's first call with a given shape (later calls hit the
launch-plan cache, which is keyed on everything these checks look at)."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def tensor(name: str, t, *, ndim: int | None = None, layout: str = "") -> torch.Tensor:
    """t is a torch.Tensor (of `ndim` dims, described by `layout` in the message)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {layout or f'{ndim}-D'}, got shape {tuple(t.shape)}")
    return t


def float_tensor(name: str, t, *, ndim: int | None = None, layout: str = "", dtypes=FLOAT_DTYPES) -> torch.Tensor:
    """A tensor of one of `dtypes` (float32 / float16 / bfloat16 by default)."""
    tensor(name, t, ndim=ndim, layout=layout)
    if t.dtype not in dtypes:
        raise TypeError(f"{name} dtype must be one of {', '.join(str(d).removeprefix('torch.') for d in dtypes)}, "
                        f"got {t.dtype}")
    return t


def same_dtype(name: str, t: torch.Tensor, ref_name: str, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name} dtype {t.dtype} does not match {ref_name} dtype {dtype}")


def same_device(name: str, t: torch.Tensor, ref_name: str, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, {ref_name} is on {device}")


def shape(name: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def int_tensor(name: str, t, dtypes=(torch.int32,)) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype not in dtypes:
        kinds = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must be an {kinds} tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    return t
