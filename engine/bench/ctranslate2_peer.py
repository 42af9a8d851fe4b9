"""CTranslate2 as a benchmark peer (extra `peers`): the same weights, converted, generating greedily.

Conversion: the engine's weights go into transformers' GPT2LMHeadModel (gpt2_engine.bench.decode.build_hf_model),
which is saved to a temporary directory and converted by ctranslate2's TransformersConverter, with
`quantization="int8"` for its int8 mode (int8 weights and activations, CTranslate2's own scheme).
The converter reads a tokenizer from the model directory for the vocabulary only; the benchmark
feeds token ids, so a synthetic GPT-2 tokenizer with one placeholder token per id (EOS at its id,
no merges) is written beside the model: any vocabulary size works, no tokenizer files are needed.

Its own process: the Generator runs in a worker process (gpt2_engine.bench.peer_worker: why).

Timing: `generate_batch(..., callback=...)` calls back once per generated token of each batch row;
the worker stamps row 0's callbacks, which come once per decode step (like the other systems).
"""
from __future__ import annotations

import importlib.util
import json
import tempfile
import time
from pathlib import Path

import torch

from gpt2_engine.bench.peer_worker import PeerWorker

COMPUTE_TYPES = {"float32": {"cpu": "float32", "cuda": "float32"}, "int8": {"cpu": "int8", "cuda": "int8_float16"}}


def available() -> bool:
    """Whether ctranslate2 is installed (found, not imported: its native code runs only in the worker)."""
    return importlib.util.find_spec("ctranslate2") is not None


def _write_placeholder_tokenizer(directory: Path, vocab_size: int, eos_token_id: int) -> None:
    # the tokenizer adds "<|endoftext|>" (its unk/bos/eos) unless the vocabulary has it: give it an id,
    # the model's EOS id or, for a small test vocabulary without one, the last id
    eos = eos_token_id if eos_token_id is not None and 0 <= eos_token_id < vocab_size else vocab_size - 1
    vocab = {f"<{i}>": i for i in range(vocab_size) if i != eos} | {"<|endoftext|>": eos}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")


class CTranslate2Peer:
    """A ctranslate2.Generator on a conversion of `hf_model`, in a worker process; with the token
    strings of each id. close() (or garbage collection, or exit) stops the worker."""

    def __init__(self, hf_model, quantization: str, device: torch.device, workdir: Path | None = None):
        from transformers.utils import logging as hf_logging

        if quantization not in COMPUTE_TYPES:
            raise ValueError(f"quantization must be one of {sorted(COMPUTE_TYPES)}, got {quantization!r}")
        self._tmp = tempfile.TemporaryDirectory(prefix="gpt2-engine-ct2-") if workdir is None else None
        root = Path(workdir or self._tmp.name)
        hf_dir, out_dir = root / "hf", root / f"ct2-{quantization}"
        config = hf_model.config
        hf_logging.disable_progress_bar()   # no progress bars inside the bench's own
        try:
            hf_model.save_pretrained(hf_dir)
        finally:
            hf_logging.enable_progress_bar()
        _write_placeholder_tokenizer(hf_dir, config.vocab_size, config.eos_token_id)
        # everything that runs CTranslate2's native code (converting, loading, generating) is in the worker
        self._worker = PeerWorker(f"ctranslate2-{quantization}", _load, _generate,
                                  (str(hf_dir), str(out_dir), quantization, device.type, COMPUTE_TYPES[quantization][device.type],
                                   torch.get_num_threads() if device.type == "cpu" else 0))
        self.tokens = json.loads((out_dir / "vocabulary.json").read_text())

    def generate(self, batch: list[list[str]], new_tokens: int) -> tuple[list[list[int]], float, list[float]]:
        """(ids of each row, start time, row 0's per-step stamps) of one greedy generation."""
        return self._worker.generate(batch, new_tokens)

    def close(self) -> None:
        self._worker.close()


def _load(hf_dir: str, out_dir: str, quantization: str, device: str, compute_type: str, threads: int):
    """Worker process: convert the saved model, load the Generator."""
    import ctranslate2
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    ctranslate2.converters.TransformersConverter(hf_dir).convert(out_dir, quantization=quantization, force=True)
    return ctranslate2.Generator(out_dir, device=device, compute_type=compute_type, intra_threads=threads)


def _generate(generator, batch: list[list[str]], new_tokens: int) -> tuple[list[list[int]], float, list[float]]:
    """Worker process: one greedy generation, with row 0's per-step stamps."""
    stamps: list[float] = []

    def on_step(step) -> bool:
        if step.batch_id == 0:
            stamps.append(time.perf_counter())
        return False   # keep going

    start = time.perf_counter()
    results = generator.generate_batch(batch, max_length=new_tokens, min_length=new_tokens, sampling_topk=1,
                                       include_prompt_in_result=False, callback=on_step)
    return [r.sequences_ids[0] for r in results], start, stamps


def run_ctranslate2(peer: CTranslate2Peer, prompts: torch.Tensor, new_tokens: int, clock) -> list[list[int]]:
    """Greedy generation of exactly new_tokens per row (EOS suppressed by min_length); returns the ids.
    The clock gets the worker's start and per-step stamps (CPU peer: no device to synchronise)."""
    ids, clock.start, clock.stamps = peer.generate([[peer.tokens[i] for i in row] for row in prompts.tolist()], new_tokens)
    return ids
