"""Triton settings shared by every kernel module, applied before triton is first imported (each module
that imports triton imports this first, for its effect).

TRITON_DEFAULT_FP_FUSION: keep Triton 3.9's current default (fused multiply-add in kernels)
explicitly: 3.10 will change it, and 3.9 warns on every compile until it is set."""
import os

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
