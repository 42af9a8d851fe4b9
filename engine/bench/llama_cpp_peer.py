"""llama.cpp as a benchmark peer (extra, built by `make llama-cpp`): the same weights in GGUF, greedy.

Conversion: the engine's weights go into transformers' GPT2LMHeadModel (gpt2_engine.bench.decode.build_hf_model),
saved to a temporary directory with GPT-2's own BPE files (the engine's packaged copy: llama.cpp's
converter identifies the pre-tokenizer by hashing the tokenizer's output, so only GPT-2's vocabulary
converts), then llama.cpp's own converter (convert_hf_to_gguf.py, from the llama-cpp-python source
that `make llama-cpp` builds; found at converter_path()) writes the GGUF at --outtype f32, f16 or
q8_0 (llama.cpp's 8-bit format: blocks of 32 weights with one fp16 scale; at run time it quantizes the
activations per block too and multiplies in int8).

Buffers: llama.cpp repacks weights into CPU-specific layouts ("extra buffer types": AMX tiles for
Q8_0 on a CPU with AMX-INT8, interleaved rows elsewhere) unless told not to. The peer keeps that
default, but where it crashes the worker (llama-cpp-python 0.3.36's AMX path does, on every batch
size, on the Xeon this was written on) it restarts on plain buffers (llama_model_params.use_extra_bufts
= false) and says so in `note`, which the bench prints with its results.

Its own process (gpt2_engine.bench.peer_worker); generation there uses the low-level API, which batches rows
as sequences of one context: one llama_decode for every row's prompt (logits of its last token), then
one llama_decode per step with each row's next token, picked greedily (argmax; first index on ties,
as torch.argmax). The worker stamps after each step's tokens are picked.
"""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gpt2_engine.bench.peer_worker import PeerCrashed, PeerWorker
from gpt2_engine.tokenizer import PACKAGED_DIR

GGUF_TYPES = {"F32": "f32", "F16": "f16", "Q8_0": "q8_0"}   # label -> converter --outtype
GPT2_VOCAB_SIZE = 50257


def converter_path() -> Path:
    """Where `make llama-cpp` puts llama.cpp's converter: inside the Python environment, beside the
    llama_cpp package it built (so the installed console script finds it from any folder)."""
    return Path(sys.prefix) / "share" / "llama.cpp" / "convert_hf_to_gguf.py"


def available() -> bool:
    """Whether llama-cpp-python and llama.cpp's converter are installed (found, not imported)."""
    return importlib.util.find_spec("llama_cpp") is not None and converter_path().is_file()


def skip_reason(device: torch.device, vocab_size: int) -> str | None:
    """Why llama.cpp cannot run beside the engine here (None: it can)."""
    if device.type != "cpu":
        return "llama.cpp runs on the CPU here"
    if vocab_size != GPT2_VOCAB_SIZE:
        return f"llama.cpp's converter takes GPT-2's own vocabulary ({GPT2_VOCAB_SIZE} tokens), not {vocab_size}"
    if not available():
        return "llama.cpp is not built (make llama-cpp)"
    return None


def convert(hf_model, directory: Path, outtype: str) -> Path:
    """The GGUF file of `hf_model` at `outtype` (a GGUF_TYPES value), written by llama.cpp's converter."""
    from transformers.utils import logging as hf_logging

    if hf_model.config.vocab_size != GPT2_VOCAB_SIZE:
        raise ValueError(f"llama.cpp's converter takes GPT-2's own vocabulary ({GPT2_VOCAB_SIZE} tokens), "
                         f"got a model with {hf_model.config.vocab_size}")
    hf_dir, out = directory / "hf", directory / f"model-{outtype}.gguf"
    if not hf_dir.is_dir():
        hf_logging.disable_progress_bar()
        try:
            hf_model.save_pretrained(hf_dir)
        finally:
            hf_logging.enable_progress_bar()
        shutil.copy(PACKAGED_DIR / "encoder.json", hf_dir / "vocab.json")
        shutil.copy(PACKAGED_DIR / "vocab.bpe", hf_dir / "merges.txt")
    done = subprocess.run([sys.executable, str(converter_path()), str(hf_dir), "--outtype", outtype, "--outfile", str(out)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp's converter failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return out


class LlamaCppPeer:
    """llama.cpp on a GGUF conversion of `hf_model` (a GGUF_TYPES label), in a worker process sized
    for `max_batch` rows of up to `max_tokens` tokens each. close() (or garbage collection, or exit)
    stops the worker."""

    def __init__(self, hf_model, gguf_type: str, *, max_batch: int, max_tokens: int, extra_buffers: bool = True,
                 threads: int | None = None, workdir: Path | None = None):
        if gguf_type not in GGUF_TYPES:
            raise ValueError(f"gguf_type must be one of {sorted(GGUF_TYPES)}, got {gguf_type!r}")
        self._tmp = tempfile.TemporaryDirectory(prefix="gpt2-engine-llama-cpp-") if workdir is None else None
        path = convert(hf_model, Path(workdir or self._tmp.name), GGUF_TYPES[gguf_type])
        self.max_batch, self.max_tokens = max_batch, max_tokens
        self.note = None   # what the bench should report about how this peer runs

        def start(extra: bool) -> PeerWorker:
            return PeerWorker(f"llama.cpp-{gguf_type}", _load, _generate,
                              (str(path), max_batch, max_tokens, extra, threads or torch.get_num_threads()))

        self._worker = start(extra_buffers)
        if extra_buffers:   # the largest prefill and a step: a repacked layout that crashes does so here
            try:
                self._worker.generate([[0] * (max_tokens - 1)] * max_batch, 2)
            except PeerCrashed as crash:
                self.note = (f"llama.cpp {gguf_type}: with llama.cpp's repacked weight buffers (its default) {crash}; "
                             "it ran on plain buffers")
                self._worker = start(False)

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float, list[float]]:
        """(new ids of each row, start time, per-step stamps) of one greedy generation."""
        if len(prompts) > self.max_batch or max(map(len, prompts)) + new_tokens - 1 > self.max_tokens:
            raise ValueError(f"this peer takes up to {self.max_batch} rows of up to {self.max_tokens} tokens "
                             f"(prompt and new tokens), got {len(prompts)} rows of up to {max(map(len, prompts))} + {new_tokens}")
        return self._worker.generate(prompts, new_tokens)

    def close(self) -> None:
        self._worker.close()


def run_llama_cpp(peer: LlamaCppPeer, prompts: torch.Tensor, new_tokens: int, clock) -> list[list[int]]:
    """Greedy generation of exactly new_tokens per row (no EOS check); returns the new ids. The clock
    gets the worker's start and per-step stamps (CPU peer: no device to synchronise)."""
    ids, clock.start, clock.stamps = peer.generate(prompts.tolist(), new_tokens)
    return ids


class _Context:
    """Worker process: a llama.cpp model and context, and a batch buffer big enough for any step."""

    def __init__(self, path: str, max_batch: int, max_tokens: int, extra_buffers: bool, threads: int):
        import llama_cpp as ll

        self.ll = ll
        self._quiet = ll.llama_log_callback(lambda level, text, user_data: None)   # kept: llama.cpp holds the pointer
        ll.llama_log_set(self._quiet, None)
        ll.llama_backend_init()
        model_params = ll.llama_model_default_params()
        model_params.use_extra_bufts = extra_buffers
        self.model = ll.llama_model_load_from_file(path.encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(self.model))
        params = ll.llama_context_default_params()
        params.n_ctx = max_batch * max_tokens
        params.n_batch = params.n_ubatch = max_batch * max_tokens
        params.n_seq_max = max_batch
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        self.ctx = ll.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.batch = ll.llama_batch_init(max_batch * max_tokens, 0, 1)

    def decode(self, rows: list[tuple[int, list[int], int]]) -> list[int]:
        """Each (sequence, tokens, first position) appended to its sequence; the argmax of the logits
        after each row's last token."""
        import numpy as np

        b, n = self.batch, 0
        for seq, tokens, first in rows:
            for i, token in enumerate(tokens):
                b.token[n], b.pos[n], b.n_seq_id[n], b.seq_id[n][0] = token, first + i, 1, seq
                b.logits[n] = int(i == len(tokens) - 1)
                n += 1
        b.n_tokens = n
        if (code := self.ll.llama_decode(self.ctx, b)) != 0:
            raise RuntimeError(f"llama_decode returned {code}")
        logits = np.ctypeslib.as_array(self.ll.llama_get_logits(self.ctx), shape=(len(rows), self.n_vocab))
        return logits.argmax(axis=1).tolist()


def _load(path: str, max_batch: int, max_tokens: int, extra_buffers: bool, threads: int) -> _Context:
    return _Context(path, max_batch, max_tokens, extra_buffers, threads)


def _generate(context: _Context, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float, list[float]]:
    context.ll.llama_memory_clear(context.ll.llama_get_memory(context.ctx), True)
    start = time.perf_counter()
    picked = context.decode([(seq, prompt, 0) for seq, prompt in enumerate(prompts)])
    stamps, ids = [time.perf_counter()], [[token] for token in picked]
    for step in range(1, new_tokens):
        picked = context.decode([(seq, [row[-1]], len(prompt) + step - 1) for seq, (prompt, row) in enumerate(zip(prompts, ids))])
        stamps.append(time.perf_counter())
        for row, token in zip(ids, picked):
            row.append(token)
    return ids, start, stamps
