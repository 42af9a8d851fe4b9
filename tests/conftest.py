"""Test-wide setup. Without a CUDA GPU, Triton kernels run in Triton's CPU interpreter, which
must be switched on before triton is first imported."""
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

assert "triton" not in sys.modules, "triton was imported before conftest could choose the interpreter"
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
DEVICE = "cuda" if HAS_CUDA else "cpu"
# CPU GEMM probe choices persist in a per-run directory (shared with the servers and CLIs the tests
# start), never in the user's cache: every run probes afresh.
_PROBE_CACHE = tempfile.TemporaryDirectory(prefix="gpt2-engine-test-cache-")
os.environ["GPT2_ENGINE_CACHE_DIR"] = _PROBE_CACHE.name

# The real GPT-2 BPE files live beside every checkout (and in CI) at ../shared/gpt2-tokenizer.
REPO_ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = Path(os.environ.get("GPT2_TOKENIZER_DIR", REPO_ROOT.parent / "shared" / "gpt2-tokenizer"))


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


def require_modules(*names: str) -> None:
    """Skip the calling test module where any of these optional packages is missing (the server's
    dependencies on a GPU image that lacks them), except in CI (`CI` set), where every dependency is
    installed and a missing one must fail the run instead of hiding its tests."""
    missing = [name for name in names if not _importable(name)]
    if missing and os.environ.get("CI"):
        raise ImportError(f"CI must have {', '.join(missing)} installed (make test installs the dev and ray extras)")
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (not installed)", allow_module_level=True)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.on_device)   # runs on the GPU when there is one
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def tokenizer_dir():
    if not (TOKENIZER_DIR / "encoder.json").exists():
        pytest.fail(f"GPT-2 BPE files not found at {TOKENIZER_DIR} (set GPT2_TOKENIZER_DIR)")
    return TOKENIZER_DIR
