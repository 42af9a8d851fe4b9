"""gpt2-engine: GPT-2 inference on Triton kernels (see README.md)."""
from engine.api import GPT2, optimize
from engine.config import GPT2Config
from engine.tokenizer import load_tokenizer

__all__ = ["GPT2", "GPT2Config", "optimize", "load_tokenizer"]
