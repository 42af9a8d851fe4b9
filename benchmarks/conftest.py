"""Benchmarks share the test-wide setup (the interpreter switch must precede triton's import)."""
from tests.conftest import DEVICE, HAS_CUDA, device  # noqa: F401
