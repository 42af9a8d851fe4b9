"""The public API: `GPT2` (load, forward, generate, text generation, streaming) and `optimize`.

Backends: "triton" runs the runtime on our kernels (default on CUDA), "torch" the same runtime on
each kernel's torch reference (default on CPU), "eager" the plain PyTorch baseline. The runtime
backends serve every call through one request router (gpt2_engine.router) in front of one LLMEngine,
so concurrent `stream()` iterators and `generate()` calls (from one thread or several) are batched
together.

    GPT2 / server -> RequestRouter (thread, per-request queues, abort) -> LLMEngine.step():
    Scheduler.schedule() -> ModelRunner.launch(batch) -> Scheduler.postprocess(batch, tokens)
"""
from __future__ import annotations

import codecs
import dataclasses
import json
import os
import types
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch

from gpt2_engine.baseline import EagerGPT2, generate_eager
from gpt2_engine.config import GPT2Config
from gpt2_engine.generation import (
    GeneratedSequence, GenerateOptions, assemble_output, check_streamer, left_pad,
    prompts_from_batch, resolve_generate_options,
)
from gpt2_engine.persistent_decode import check_decode_kernel
from gpt2_engine.quantization import check_quantization
from gpt2_engine.weights import load_checkpoint, load_hf_model_state, random_state_dict

BACKENDS = ("auto", "triton", "torch", "eager")


def resolve_device(device) -> torch.device:
    """cpu, cuda or cuda:N where this machine has that device (None: cuda when available)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported: use cpu, cuda or cuda:N")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        build = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"device {device!r}: CUDA is not available on this machine ({build}); use cpu")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return resolved


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
    """A GPT-2 model served by gpt2-engine. Build it with from_pretrained / from_config / from_hf.

    It constructs, converts and delegates: options become SamplingParams at this boundary
    (gpt2_engine.generation), requests go to the request router (gpt2_engine.router), which steps the one
    LLMEngine in its own thread; the eager backend runs the baseline model in the caller's thread."""

    def __init__(self, config: GPT2Config, state_dict: dict[str, torch.Tensor], *, device=None, dtype=None,
                 backend: str = "auto", block_size: int = 16, num_blocks: int | None = None,
                 max_num_seqs: int = 256, max_num_batched_tokens: int | None = None, source: str = "",
                 tokenizer_path=None, generation_config=None, enable_prefix_caching: bool = True,
                 batch_invariant: bool = False, quantization: str | None = None, async_scheduling: bool | None = None,
                 decode_kernel: str = "graphs", speculative_model=None, num_speculative_tokens: int | None = None):
        self.config = config
        if not isinstance(block_size, int) or isinstance(block_size, bool) or not 1 <= block_size <= config.n_positions:
            # a block longer than the context holds nothing more, and its cache is allocated up front
            raise ValueError(f"block_size must be an integer in [1, n_positions={config.n_positions}], got {block_size!r}")
        self.device = resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self.backend = _resolve_backend(backend, self.device)
        self.quantization = check_quantization(quantization)   # int8 weight-only or w8a8: engine/quantization.py
        if self.quantization and self.backend == "eager":
            raise ValueError(f"quantization={quantization!r} needs the torch or triton backend, not 'eager'")
        if self.quantization == "w8a8" and (self.backend, self.device.type) != ("torch", "cpu"):
            raise ValueError(f"quantization='w8a8' runs on the CPU with the torch backend, got backend={self.backend!r} "
                             f"on {self.device}")
        if check_decode_kernel(decode_kernel) == "persistent" and (self.backend != "triton" or self.quantization):
            raise ValueError("decode_kernel='persistent' needs backend='triton' without quantization, "
                             f"got backend={self.backend!r}, quantization={self.quantization!r}")
        self.source = source                      # where the weights came from (reported by the bench)
        self.generation_config = generation_config  # the checkpoint's defaults for generate()
        self._tokenizer_path = tokenizer_path
        self._tokenizer = None
        # .to() returns the tensor itself when device and dtype already match: from_hf shares weights.
        weights = {name: t.to(device=self.device, dtype=self.dtype) for name, t in state_dict.items()}
        self._weights = weights
        self._eager, self._router = None, None
        self._drafts = weakref.WeakKeyDictionary()    # assistant model -> its DraftModelProposer
        self._int8_draft = None
        if self.backend == "eager":
            if speculative_model is not None:
                raise ValueError("speculative_model runs on the runtime backends (torch, triton), not eager")
            self._eager = EagerGPT2(config, weights)
        else:
            from gpt2_engine.llm_engine import LLMEngine
            from gpt2_engine.model import PagedGPT2
            from gpt2_engine.router import RequestRouter

            model = PagedGPT2(config, weights, backend=self.backend, device=self.device, dtype=self.dtype,
                              quantization=self.quantization)
            self._router = RequestRouter(LLMEngine(model, block_size=block_size, num_blocks=num_blocks,
                                                   max_num_seqs=max_num_seqs,
                                                   max_num_batched_tokens=max_num_batched_tokens,
                                                   enable_prefix_caching=enable_prefix_caching,
                                                   batch_invariant=batch_invariant,
                                                   async_scheduling=async_scheduling,
                                                   decode_kernel=decode_kernel))
            # the router's thread stops when this object goes away (or at interpreter exit)
            weakref.finalize(self, self._router.shutdown)
            self._router.engine.speculation = self._engine_speculation(speculative_model, num_speculative_tokens)

    # ---- speculative decoding (gpt2_engine.speculative) -----------------------------------------

    def _engine_speculation(self, speculative_model, num_speculative_tokens):
        """The engine's default for every request (vLLM's speculative_model / num_speculative_tokens):
        "ngram" (prompt lookup), "int8" (this model's int8 twin), a GPT2 or a transformers GPT-2."""
        if speculative_model is None:
            if num_speculative_tokens is not None:
                raise ValueError("num_speculative_tokens needs a speculative_model")
            return None
        from gpt2_engine.speculative import NgramProposer, Speculation

        k = 4 if num_speculative_tokens is None else num_speculative_tokens
        if isinstance(speculative_model, str) and speculative_model == "ngram":
            return Speculation(NgramProposer(), k)
        return Speculation(self._draft_proposer(speculative_model, "speculative_model"), k)

    def _with_assistance(self, options: GenerateOptions) -> GenerateOptions:
        """The options with their assisted generation (if any) as the sampling's Speculation."""
        assisted = options.assisted
        if assisted is None:
            return options
        if self._eager is not None:
            raise ValueError("assisted generation (assistant_model, prompt_lookup_num_tokens) runs on the runtime "
                             "backends (torch, triton), not eager")
        from gpt2_engine.speculative import NgramProposer, Speculation

        if assisted.prompt_lookup_num_tokens is not None:
            spec = Speculation(NgramProposer(assisted.max_matching_ngram_size), assisted.prompt_lookup_num_tokens)
        else:
            spec = Speculation(self._draft_proposer(assisted.assistant_model, "assistant_model"),
                               assisted.num_assistant_tokens, assisted.confidence_threshold)
        return dataclasses.replace(options, sampling=dataclasses.replace(options.sampling, speculation=spec))

    def _draft_proposer(self, assistant, name: str):
        """The proposer drafting with `assistant` (made once per assistant, with its own KV pool)."""
        if isinstance(assistant, str):
            if assistant != "int8":
                raise ValueError(f"{name} must be a GPT2, a transformers GPT-2 model or 'int8', got {assistant!r}")
            if self.quantization:
                raise ValueError(f"{name}='int8' drafts with the model's int8 twin; this model is int8 already")
            if self._int8_draft is None:
                from gpt2_engine.model import PagedGPT2

                self._int8_draft = self.engine.draft_proposer(PagedGPT2(
                    self.config, self._weights, backend=self.backend, device=self.device, dtype=self.dtype,
                    quantization="int8"))
            return self._int8_draft
        if assistant not in self._drafts:
            self._drafts[assistant] = self.engine.draft_proposer(self._draft_model(assistant, name))
        return self._drafts[assistant]

    def _draft_model(self, assistant, name: str):
        from gpt2_engine.model import PagedGPT2

        if isinstance(assistant, GPT2):
            if assistant.engine is None:
                raise ValueError(f"{name} must run on a runtime backend (torch, triton), not eager")
            return assistant.engine.model
        if not (hasattr(assistant, "config") and getattr(assistant.config, "model_type", None) == "gpt2"):
            raise ValueError(f"{name} must be a GPT2, a transformers GPT-2 model or 'int8', got {type(assistant).__name__}")
        config, state_dict = load_hf_model_state(assistant)
        return PagedGPT2(config, {k: t.to(device=self.device, dtype=self.dtype) for k, t in state_dict.items()},
                         backend=self.backend, device=self.device, dtype=self.dtype)

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
        """The LLMEngine serving this model (None on the eager backend). Its router steps it; drive
        it directly only while no generate/stream call is running (benchmarks do)."""
        return self._router.engine if self._router is not None else None

    @property
    def router(self):
        """The RequestRouter in front of the engine (None on the eager backend): the server's entry."""
        return self._router

    def stats(self) -> dict[str, int]:
        """num_running, num_waiting, kv_blocks_free, kv_blocks_total, num_preemptions,
        tokens_generated, prompt_tokens, prefix_cache_queries, prefix_cache_hits (tokens looked up
        in the prefix cache at admission, and found there), num_requests (the server's /metrics
        reads the same)."""
        if self._router is None:
            raise ValueError("stats() describes the paged runtime; the eager backend has none")
        return self._router.stats()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The canonical weights (HF GPT-2 names without `transformer.`), on the model's device and dtype."""
        return dict(self._weights)

    # ---- tensors in, tensors out ----------------------------------------------------------------

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] in fp32, like HF's .logits with positions = cumsum(mask) - 1 (so a
        left-padded row equals the same row unpadded; HF's forward without position_ids would
        instead count the padding). Padded positions hold zeros."""
        prompts = prompts_from_batch(input_ids, attention_mask, self.config)
        batch, width = len(prompts), input_ids.shape[-1]
        with torch.inference_mode():
            logits = torch.zeros(batch, width, self.config.vocab_size, dtype=torch.float32, device=self.device)
            if self._eager is not None:
                ids, mask = left_pad(prompts, width, self.device)
                full = self._eager(ids, mask, self._eager.new_cache(batch, width)).float()
                return torch.where(mask.bool()[..., None], full, logits)
            for row, rows_logits in enumerate(self._router.prompt_logits(prompts)):
                logits[row, width - rows_logits.shape[0]:] = rows_logits
        return logits

    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                 inputs: torch.Tensor | None = None, generation_config=None, **kwargs):
        """Continue a batch of token prompts, as transformers' `model.generate(...)`.

        Args:
            input_ids: int tensor [batch, seq_len] (or [seq_len]), left-padded when rows differ in length
                (also accepted as `inputs`).
            attention_mask: 1 for prompt tokens, 0 for the left padding (default: all ones).
            generation_config: a transformers GenerationConfig or dict; keyword arguments override it,
                and it overrides the checkpoint's generation_config.json.

        Options (keyword arguments, transformers' names and defaults):
            max_new_tokens: tokens to add (default: max_length - prompt length, max_length=20).
            min_new_tokens / min_length: EOS is suppressed until this many (default 0).
            do_sample: False = greedy (default); True samples with temperature (1.0), top_k (50;
                0 or None = off) and top_p (1.0 = off).
            num_beams: beam search with this many beams (default 1 = off), with length_penalty (1.0),
                early_stopping (False, True or "never") and no_repeat_ngram_size (0 = off).
            num_return_sequences: continuations per prompt (default 1; more need do_sample or beams).
            repetition_penalty: transformers' CTRL penalty (default 1.0 = off).
            seed: seeds the sampler per row (gpt2-engine's addition; default unseeded).
            eos_token_id: int or list of ints ending a sequence (default: the model's; None = never).
            pad_token_id: fills finished rows (default: the first EOS id).
            streamer: a transformers streamer (put/end), for a single sequence.
            output_scores, return_dict_in_generate: transformers' output object with scores
                (beam search: sequences_scores and beam_indices).
            assistant_model: assisted generation (speculative decoding, gpt2_engine.speculative): a
                GPT2, a transformers GPT-2 sharing the vocabulary, or "int8" (the model's own int8
                twin) drafts num_assistant_tokens (20) tokens per step, stopping early when its
                probability falls below assistant_confidence_threshold (0.4); the output is the
                model's own (greedy: identical tokens; sampling: the same distribution).
            prompt_lookup_num_tokens: prompt-lookup decoding instead: drafts this many tokens by
                matching the last max_matching_ngram_size (2) tokens earlier in the sequence.
        Other transformers options raise ValueError unless given at their neutral value; every bad
        value is a ValueError or TypeError naming the option.

        Returns:
            int64 tensor [batch * num_return_sequences, prompt + new tokens], right-padded with
            pad_token_id (or transformers' output object with return_dict_in_generate=True).
        """
        if input_ids is not None and inputs is not None:
            raise ValueError("pass input_ids or inputs, not both")
        input_ids = input_ids if input_ids is not None else inputs
        if input_ids is None:
            raise ValueError("generate() needs input_ids")
        if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__} "
                            "(pass a generation config as generation_config=...)")
        prompts = prompts_from_batch(input_ids, attention_mask, self.config)
        options = self._with_assistance(resolve_generate_options(self.config, input_ids.shape[-1], self.generation_config,
                                                                 generation_config, **kwargs))
        check_streamer(options, len(prompts))
        streamer = options.streamer
        on_token = None
        if streamer is not None:
            streamer.put(input_ids.detach().cpu())
            on_token = lambda row, token: streamer.put(torch.tensor([token]))  # noqa: E731
        generated = self._generate_tokens(prompts, options, on_token)
        if streamer is not None:
            streamer.end()
        return assemble_output(input_ids, generated, options)

    def _generate_tokens(self, prompts: list[list[int]], options: GenerateOptions, on_token=None) -> list[GeneratedSequence]:
        """Each prompt's num_return_sequences continuations; on_token(row, token) as each arrives."""
        if self._eager is not None:
            if options.sampling.num_beams > 1:
                raise ValueError("beam search (num_beams > 1) runs on the runtime backends (torch, triton), not eager")
            for prompt in prompts:
                self.config.check_prompt(prompt, options.sampling.max_new_tokens)
            with torch.inference_mode():
                return generate_eager(self._eager, prompts, options, on_token)
        n = options.num_return_sequences
        params = [options.sampling.for_prompt(row) for row in range(len(prompts))]
        # every prompt is checked (once) before any is queued
        checked = [self._router.check(prompt, row_params, n) for prompt, row_params in zip(prompts, params)]
        streams = []
        try:
            streams = [self._router.add_checked(request) for request in checked]
            out = [GeneratedSequence() for _ in range(len(prompts) * n)]
            for r, stream in enumerate(streams):
                for event in stream:
                    row = r * n + event.index
                    out[row].add(event)
                    if on_token is not None:
                        on_token(row, event.token_id)
            return out
        finally:   # a callback that raised, Ctrl-C: the requests still running end here
            for stream in streams:
                stream.close()

    # ---- text ------------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        """A tiktoken Encoding for GPT-2's BPE (from the checkpoint directory when it has the files)."""
        if self._tokenizer is None:
            from gpt2_engine.tokenizer import load_tokenizer, tokenizer_files_in

            path = self._tokenizer_path if self._tokenizer_path and tokenizer_files_in(self._tokenizer_path) else None
            self._tokenizer = load_tokenizer(path)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, encoding) -> None:
        self._tokenizer = encoding

    def _encode(self, text) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"a prompt must be a str, got {type(text).__name__}"
                            + (" (decode bytes first, e.g. b.decode('utf-8'))" if isinstance(text, (bytes, bytearray)) else ""))
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
        return self._with_assistance(options)

    def generate_text(self, prompts, **kwargs) -> list[str]:
        """Continuations (without the prompt) of each prompt, num_return_sequences per prompt."""
        if isinstance(prompts, (str, bytes, bytearray)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a str or a list of str, got {type(prompts).__name__}")
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
        several, are batched together by the engine (runtime backends). Dropping the iterator, or
        leaving it early, aborts the request."""
        tokens = self._encode(prompt)
        options = self._text_options([tokens], kwargs)
        if options.num_return_sequences != 1:
            raise ValueError("stream() yields one sequence; num_return_sequences must be 1")
        if self._eager is not None:
            new_tokens = iter(self._generate_tokens([tokens], options)[0].tokens)
        else:
            request = self._router.add(tokens, options.sampling)
            return self._text_pieces((event.token_id for event in request), set(options.sampling.eos_token_ids),
                                     on_exit=request.close)
        return self._text_pieces(new_tokens, set(options.sampling.eos_token_ids))

    def _text_pieces(self, tokens: Iterator[int], eos: set[int], on_exit=None) -> Iterator[str]:
        """Text as tokens arrive, never splitting a UTF-8 character (its bytes may span several
        byte-level BPE tokens); the result joins to generate_text's decode. on_exit runs when the
        iteration ends, however it ends (an unstarted, dropped iterator aborts through the router's
        finalizer instead)."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            for token in tokens:
                if token not in eos:
                    piece = decoder.decode(self.tokenizer.decode_single_token_bytes(token))
                    if piece:
                        yield piece
            tail = decoder.decode(b"", final=True)
            if tail:
                yield tail
        finally:
            if on_exit is not None:
                on_exit()


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
