"""The public API: `GPT2` (load, forward, generate, text generation, streaming) and `optimize`.

Backends: "triton" runs the runtime on our kernels (default on CUDA), "torch" the same runtime on
each kernel's torch reference (default on CPU), "eager" the plain PyTorch baseline. The runtime
backends serve every call through one LLMEngine, so concurrent `stream()` iterators and
`generate()` calls (from one thread or several) are batched together: whichever consumer needs
tokens steps the engine under a lock, and each request's events are routed to its own queue.
"""
from __future__ import annotations

import codecs
import json
import os
import threading
import types
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import torch

from engine.baseline import EagerGPT2, generate_eager
from engine.config import GPT2Config
from engine.generation import (
    GeneratedSequence, GenerateOptions, assemble_output, check_fits_context, check_streamer,
    prompts_from_batch, resolve_generate_options,
)
from engine.quantization import check_quantization
from engine.weights import load_checkpoint, load_hf_model_state, random_state_dict

BACKENDS = ("auto", "triton", "torch", "eager")


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
               "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise TypeError(f"dtype must be one of {sorted(DTYPE_NAMES)} or a torch dtype, got {dtype!r}")
        dtype = DTYPE_NAMES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
    return dtype


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' needs a CUDA device (or TRITON_INTERPRET=1 for Triton's CPU interpreter)")
    return backend


class GPT2:
    """A GPT-2 model served by gpt2-engine. Build it with from_pretrained / from_config / from_hf."""

    def __init__(self, config: GPT2Config, state_dict: dict[str, torch.Tensor], *, device=None, dtype=None,
                 backend: str = "auto", block_size: int = 16, num_blocks: int | None = None,
                 max_num_seqs: int = 256, max_num_batched_tokens: int | None = None, source: str = "",
                 tokenizer_path=None, generation_config=None, quantization: str | None = None):
        self.config = config
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self.backend = _resolve_backend(backend, self.device)
        self.quantization = check_quantization(quantization)   # int8 weight-only: engine/quantization.py
        if self.quantization and self.backend == "eager":
            raise ValueError(f"quantization={quantization!r} needs the torch or triton backend, not 'eager'")
        self.source = source                      # where the weights came from (reported by the bench)
        self.generation_config = generation_config  # the checkpoint's defaults for generate()
        self._tokenizer_path = tokenizer_path
        self._tokenizer = None
        # .to() returns the tensor itself when device and dtype already match: from_hf shares weights.
        weights = {name: t.to(device=self.device, dtype=self.dtype) for name, t in state_dict.items()}
        self._weights = weights
        if self.backend == "eager":
            self._eager = EagerGPT2(config, weights)
            self._engine = None
        else:
            from engine.llm_engine import LLMEngine
            from engine.model import PagedGPT2

            model = PagedGPT2(config, weights, backend=self.backend, device=self.device, dtype=self.dtype,
                              quantization=self.quantization)
            self._engine = LLMEngine(model, block_size=block_size, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                                     max_num_batched_tokens=max_num_batched_tokens)
            self._queues: dict[int, deque] = {}
            self._lock = threading.RLock()   # one engine, possibly several consumer threads

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path, *, device=None, dtype=None, backend: str = "auto", **runtime) -> "GPT2":
        """A local HF checkpoint directory, or a hub id resolved through huggingface_hub's cache."""
        config, state_dict, directory = load_checkpoint(name_or_path, dtype=None, return_directory=True)
        gen_file = Path(directory) / "generation_config.json"
        generation_config = None
        if gen_file.is_file():
            try:
                generation_config = json.loads(gen_file.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{gen_file} is not valid JSON: {exc}") from exc
        return cls(config, state_dict, device=device, dtype=dtype, backend=backend, source=str(name_or_path),
                   tokenizer_path=directory, generation_config=generation_config, **runtime)

    @classmethod
    def from_config(cls, config="gpt2", *, seed: int = 0, device=None, dtype=None, backend: str = "auto", **runtime) -> "GPT2":
        """Seeded random weights for a preset name or a GPT2Config (labelled as such in `source`)."""
        if isinstance(config, str):
            name, config = config, GPT2Config.preset(config)
        else:
            name = f"custom {config.n_layer}x{config.n_embd}"
        if not isinstance(config, GPT2Config):
            raise TypeError(f"config must be a preset name or a GPT2Config, got {type(config).__name__}")
        state_dict = random_state_dict(config, seed=seed)
        return cls(config, state_dict, device=device, dtype=dtype, backend=backend,
                   source=f"{name} shape, seeded random weights (seed={seed})", **runtime)

    @classmethod
    def from_hf(cls, hf_model, *, backend: str = "auto", **runtime) -> "GPT2":
        """Serve a transformers GPT2LMHeadModel's weights. The tensors are shared, not copied, when
        device and dtype match; the runtime backends additionally prepare their own layouts once
        (the CPU torch backend packs its GEMM weights for oneDNN), which later in-place edits of the
        HF weights do not reach."""
        config, state_dict = load_hf_model_state(hf_model)
        first = next(iter(state_dict.values()))
        runtime.setdefault("device", first.device)
        runtime.setdefault("dtype", first.dtype)
        return cls(config, state_dict, backend=backend, source=f"transformers model {type(hf_model).__name__}",
                   generation_config=getattr(hf_model, "generation_config", None), **runtime)

    def with_backend(self, backend: str, **runtime) -> "GPT2":
        """The same weights (shared tensors) served by another backend."""
        return GPT2(self.config, self._weights, device=self.device, dtype=self.dtype, backend=backend, source=self.source,
                    tokenizer_path=self._tokenizer_path, generation_config=self.generation_config, **runtime)

    @property
    def engine(self):
        """The LLMEngine serving this model (None on the eager backend)."""
        return self._engine

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The canonical weights (HF GPT-2 names without `transformer.`), on the model's device and dtype."""
        return dict(self._weights)

    # ---- tensors in, tensors out ----------------------------------------------------------------

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] in fp32, like HF's .logits with positions = cumsum(mask) - 1 (so a
        left-padded row equals the same row unpadded). Padded positions hold zeros."""
        prompts = prompts_from_batch(input_ids, attention_mask, self.config)
        input_ids = input_ids.reshape(len(prompts), -1)
        batch, width = input_ids.shape
        logits = torch.zeros(batch, width, self.config.vocab_size, dtype=torch.float32, device=self.device)
        if self._engine is None:
            mask = attention_mask.reshape(batch, width) if attention_mask is not None else torch.ones_like(input_ids)
            ids, mask = input_ids.to(self.device), mask.to(self.device)
            full = self._eager(ids, mask, self._eager.new_cache(batch, width)).float()
            return torch.where(mask.bool()[..., None], full, logits)
        for row, rows_logits in enumerate(self._engine.prompt_logits(prompts)):
            logits[row, width - rows_logits.shape[0]:] = rows_logits
        return logits

    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                 inputs: torch.Tensor | None = None, generation_config=None, **kwargs):
        """transformers' generate() for the options listed in the README; others raise ValueError."""
        if input_ids is not None and inputs is not None:
            raise ValueError("pass input_ids or inputs, not both")
        input_ids = input_ids if input_ids is not None else inputs
        if input_ids is None:
            raise ValueError("generate() needs input_ids")
        if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__} "
                            "(pass a generation config as generation_config=...)")
        prompts = prompts_from_batch(input_ids, attention_mask, self.config)
        options = resolve_generate_options(self.config, input_ids.shape[-1], self.generation_config, generation_config, **kwargs)
        check_fits_context(prompts, options, self.config)
        check_streamer(options, len(prompts))
        streamer = options.streamer
        if streamer is not None:
            streamer.put(input_ids.detach().cpu())
            on_token = lambda row, token: streamer.put(torch.tensor([token]))  # noqa: E731
        else:
            on_token = None
        generated = self._generate_tokens(prompts, options, on_token)
        if streamer is not None:
            streamer.end()
        return assemble_output(input_ids, generated, options)

    def _generate_tokens(self, prompts: list[list[int]], options: GenerateOptions, on_token=None) -> list[GeneratedSequence]:
        if self._engine is None:
            with torch.inference_mode():
                return generate_eager(self._eager, prompts, options, on_token)
        n = options.num_return_sequences
        request_ids = [self._add_request(p, options.sampling.for_prompt(row), n) for row, p in enumerate(prompts)]
        row_of = {(rid, i): r * n + i for r, rid in enumerate(request_ids) for i in range(n)}
        out = [GeneratedSequence() for _ in range(len(prompts) * n)]
        for event in self._events_of(request_ids, n):
            row = row_of[(event.request_id, event.index)]
            out[row].tokens.append(event.token_id)
            if event.scores is not None:
                out[row].scores.append(event.scores.cpu())
            if on_token is not None:
                on_token(row, event.token_id)
        return out

    # ---- the request router (runtime backends) ---------------------------------------------------

    def _add_request(self, prompt: list[int], params, n: int) -> int:
        with self._lock:
            rid = self._engine.add_request(prompt, params, n=n)
            self._queues[rid] = deque()
        return rid

    def _events_of(self, request_ids: list[int], num_sequences: int) -> Iterator:
        """Yield the token events of these requests as they arrive, stepping the shared engine; events
        of other requests wait in their own queues for their consumers."""
        live = {rid: num_sequences for rid in request_ids}
        try:
            while live:
                with self._lock:
                    ready = [self._queues[rid].popleft() for rid in live for _ in range(len(self._queues[rid]))]
                    if not ready:  # nothing waiting for us: advance everyone by one step
                        for event in self._engine.step():
                            self._queues[event.request_id].append(event)
                for event in ready:
                    yield event
                    if event.finished:
                        live[event.request_id] -= 1
                        if live[event.request_id] == 0:
                            del live[event.request_id]
                            with self._lock:
                                del self._queues[event.request_id]
        finally:  # an abandoned iterator must not leave its requests running
            with self._lock:
                for rid in live:
                    self._engine.abort_request(rid)
                    self._queues.pop(rid, None)

    # ---- text ------------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        """A tiktoken Encoding for GPT-2's BPE (from the checkpoint directory when it has the files)."""
        if self._tokenizer is None:
            from engine.tokenizer import load_tokenizer, tokenizer_files_in

            path = self._tokenizer_path if self._tokenizer_path and tokenizer_files_in(self._tokenizer_path) else None
            self._tokenizer = load_tokenizer(path)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, encoding) -> None:
        self._tokenizer = encoding

    def _encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"prompt must be a str, got {type(text).__name__}")
        if not text:
            raise ValueError("prompt is empty")
        # As transformers' GPT-2 tokenizer does, the literal "<|endoftext|>" in text is the special token.
        return self.tokenizer.encode(text, allowed_special="all")

    def _text_options(self, prompts: list[list[int]], kwargs) -> GenerateOptions:
        user_config = kwargs.pop("generation_config", None)
        options = resolve_generate_options(self.config, max(len(p) for p in prompts), self.generation_config,
                                           user_config, **kwargs)
        if options.streamer is not None:
            raise ValueError("streamer is a generate() option; use GPT2.stream for text streaming")
        check_fits_context(prompts, options, self.config)
        return options

    def generate_text(self, prompts, **kwargs) -> list[str]:
        """Continuations (without the prompt) of each prompt, num_return_sequences per prompt."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("prompts is empty")
        token_lists = [self._encode(p) for p in prompts]
        options = self._text_options(token_lists, kwargs)
        generated = self._generate_tokens(token_lists, options)
        eos = set(options.sampling.eos_token_ids)
        return [self.tokenizer.decode([t for t in g.tokens if t not in eos]) for g in generated]

    def stream(self, prompt: str, **kwargs) -> Iterator[str]:
        """An iterator of the continuation's text as its tokens arrive (arguments are checked now, not
        at the first next()). Several stream() iterators consumed side by side, from one thread or
        several, are batched together by the engine (runtime backends)."""
        tokens = self._encode(prompt)
        options = self._text_options([tokens], kwargs)
        if options.num_return_sequences != 1:
            raise ValueError("stream() yields one sequence; num_return_sequences must be 1")
        if self._engine is None:
            new_tokens = iter(self._generate_tokens([tokens], options)[0].tokens)
        else:
            request = self._add_request(tokens, options.sampling, 1)
            new_tokens = (event.token_id for event in self._events_of([request], 1))
        return self._text_pieces(new_tokens, set(options.sampling.eos_token_ids))

    def _text_pieces(self, tokens: Iterator[int], eos: set[int]) -> Iterator[str]:
        """Text as tokens arrive, never splitting a UTF-8 character (its bytes may span several
        byte-level BPE tokens); the result joins to generate_text's decode."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for token in tokens:
            if token not in eos:
                piece = decoder.decode(self.tokenizer.decode_single_token_bytes(token))
                if piece:
                    yield piece
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail


def optimize(hf_model, *, backend: str = "auto", **runtime):
    """Make an existing transformers GPT2LMHeadModel's generate() run on gpt2-engine, sharing its
    weights. Returns the same model object; the engine model is attached as `hf_model.gpt2_engine`."""
    engine_model = GPT2.from_hf(hf_model, backend=backend, **runtime)

    def generate(self, inputs=None, generation_config=None, **kwargs):
        # transformers' signature: generate(inputs, generation_config, ..., input_ids=, attention_mask=)
        return engine_model.generate(inputs=inputs, generation_config=generation_config, **kwargs)

    hf_model.gpt2_engine = engine_model
    hf_model.generate = types.MethodType(generate, hf_model)
    return hf_model
