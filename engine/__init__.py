"""gpt2-engine: GPT-2 inference on our own kernels (see README.md).

The public API: GPT2, GPT2Config, optimize, load_tokenizer. Modules: gpt2_engine.<module> (api, server,
...); the Triton kernels in gpt2_engine.kernels.<family>, the C++ CPU kernels in gpt2_engine.kernels.cpu.
The public names load on first use, so importing a kernel module does not import the engine."""
import importlib

_PUBLIC = {"GPT2": "api", "optimize": "api", "GPT2Config": "config", "load_tokenizer": "tokenizer"}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
