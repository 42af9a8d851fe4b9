"""The C++ CPU kernels made unbuildable, as on a machine without a compiler."""
import contextlib

import pytest

from gpt2_engine import cpu_gemm
from gpt2_engine.kernels import cpu as cpu_kernels


@contextlib.contextmanager
def without_cpu_kernels(monkeypatch, tmp_path):
    """Inside: $CXX names no compiler and the kernel cache is empty, so the first use warns once and
    the library fallback paths run. Afterwards the next use looks for the kernels again (the test's
    monkeypatch restores $CXX and the cache directory when it ends)."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("GPT2_ENGINE_CACHE_DIR", str(tmp_path))
    cpu_gemm.cpu_kernel_library.cache_clear()
    cpu_kernels.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="C\\+\\+ CPU kernels are unavailable"):
            assert cpu_gemm.cpu_kernel_library() is None
        yield
    finally:
        cpu_gemm.cpu_kernel_library.cache_clear()
        cpu_kernels.library.cache_clear()
