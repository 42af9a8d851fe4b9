"""transformers' `generate()` semantics, independent of the backend that produces the tokens.

    resolve_generate_options   kwargs + generation_config -> GenerateOptions (unknown options raise)
    prompts_from_batch         input_ids [B, T] + left-padding attention_mask -> one token list per row
    assemble_output            prompt rows + each sequence's new tokens -> sequences padded with
                               pad_token_id after EOS (or a GenerateOutput with per-step scores)

Defaults are transformers' (max_length 20, top_k 50, ...). num_return_sequences rows follow their
prompt (repeat_interleave order), as in transformers; with num_beams > 1 they are the prompt's best
hypotheses, best first (gpt2_engine.beam_search).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gpt2_engine.beam_search import beam_fill_value
from gpt2_engine.config import GPT2Config
from gpt2_engine.sampling import SamplingParams

# transformers' defaults for the options this engine implements.
HF_DEFAULTS = {
    "max_length": 20, "max_new_tokens": None, "min_length": 0, "min_new_tokens": None,
    "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0,
    "num_return_sequences": 1, "eos_token_id": None, "pad_token_id": None, "seed": None,
    "output_scores": False, "return_dict_in_generate": False, "streamer": None,
    "num_beams": 1, "length_penalty": 1.0, "early_stopping": False, "no_repeat_ngram_size": 0,
    # assisted generation (speculative decoding, gpt2_engine.speculative)
    "assistant_model": None, "num_assistant_tokens": 20, "assistant_confidence_threshold": 0.4,
    "prompt_lookup_num_tokens": None, "max_matching_ngram_size": None,
}
# An explicit None means "off" for these (as in transformers), "default" for the others.
NONE_MEANS_OFF = {"top_k": 0, "eos_token_id": ()}
# transformers options accepted only at their neutral value (or None); any other value raises.
NEUTRAL_OPTIONS = {
    "num_beam_groups": 1, "diversity_penalty": 0.0,
    "output_attentions": False, "output_hidden_states": False, "output_logits": False, "typical_p": 1.0,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "encoder_no_repeat_ngram_size": 0,
    "encoder_repetition_penalty": 1.0, "renormalize_logits": False, "remove_invalid_values": False,
    "min_p": None, "logits_processor": None, "stopping_criteria": None, "prefix_allowed_tokens_fn": None,
    "bad_words_ids": None, "force_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "exponential_decay_length_penalty": None,
    "sequence_bias": None, "guidance_scale": None, "stop_strings": None, "num_assistant_tokens_schedule": "constant",
}
# Options whose value never changes the result of this engine (its cache is its own; the lookbehinds
# matter only to an assistant with another tokenizer, which it refuses).
IGNORED_OPTIONS = {"use_cache", "cache_implementation", "bos_token_id", "transformers_version", "_from_model_config",
                   "assistant_lookbehind", "target_lookbehind"}


@dataclass(frozen=True)
class AssistedOptions:
    """transformers' assisted generation: a draft model (a GPT2, a transformers GPT-2 or "int8", the
    model's own int8 twin) drafting num_assistant_tokens, or prompt lookup drafting
    prompt_lookup_num_tokens; the API turns it into the sampling's Speculation."""
    assistant_model: object | None
    num_assistant_tokens: int
    confidence_threshold: float
    prompt_lookup_num_tokens: int | None
    max_matching_ngram_size: int


@dataclass(frozen=True)
class GenerateOptions:
    sampling: SamplingParams
    num_return_sequences: int
    pad_token_id: int
    return_dict_in_generate: bool
    streamer: object | None
    output_scores: bool = False     # as asked (beam search reports it as sequences_scores)
    assisted: AssistedOptions | None = None


@dataclass
class GenerateOutput:
    """transformers' GenerateDecoderOnlyOutput subset: sequences, and per-step scores when asked;
    for beam search (GenerateBeamDecoderOnlyOutput) sequences_scores (with output_scores) and
    beam_indices, without the per-step scores."""
    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None
    sequences_scores: torch.Tensor | None = None
    beam_indices: torch.Tensor | None = None

    def __getitem__(self, key):
        """By name like a dict, or by position over the fields that are set (transformers' ModelOutput)."""
        if isinstance(key, int):
            values = (self.sequences, self.sequences_scores, self.scores, self.beam_indices)
            return tuple(v for v in values if v is not None)[key]
        return getattr(self, key)


@dataclass
class GeneratedSequence:
    tokens: list[int] = field(default_factory=list)
    scores: list[torch.Tensor] = field(default_factory=list)
    sequence_score: float | None = None           # beam search
    beam_indices: tuple[int, ...] | None = None   # beam search, within the request

    def add(self, event) -> None:
        """Take one TokenEvent of this sequence."""
        self.tokens.append(event.token_id)
        if event.scores is not None:
            self.scores.append(event.scores.cpu())
        if event.sequence_score is not None:
            self.sequence_score, self.beam_indices = event.sequence_score, event.beam_indices


def _generation_config_values(generation_config) -> dict:
    if generation_config is None:
        return {}
    if isinstance(generation_config, dict):
        return dict(generation_config)
    if hasattr(generation_config, "to_diff_dict"):  # transformers.GenerationConfig: only what was set
        return generation_config.to_diff_dict()
    raise TypeError(f"generation_config must be a transformers GenerationConfig or a dict, got {type(generation_config).__name__}")


def resolve_generate_options(config: GPT2Config, prompt_length: int, *generation_configs, **kwargs) -> GenerateOptions:
    """transformers' precedence: defaults <- each generation config in turn (the model's, then the
    caller's; a config sets only what it sets) <- keyword arguments. Unsupported options raise."""
    values = dict(HF_DEFAULTS, eos_token_id=config.eos_token_id)
    for source in (*map(_generation_config_values, generation_configs), kwargs):
        for name, value in source.items():
            if name in IGNORED_OPTIONS:
                continue
            if name in NEUTRAL_OPTIONS:
                if value is not None and value != NEUTRAL_OPTIONS[name]:
                    raise ValueError(f"generate() option {name}={value!r} is not supported by gpt2-engine")
                continue
            if name not in HF_DEFAULTS:
                raise ValueError(f"generate() option {name!r} is not supported by gpt2-engine")
            if value is None:
                value = NONE_MEANS_OFF.get(name, HF_DEFAULTS[name])
            values[name] = value

    if prompt_length >= config.n_positions:
        raise ValueError(f"the prompt of {prompt_length} tokens fills the model's context (n_positions="
                         f"{config.n_positions}): no room for a new token")
    max_new = values["max_new_tokens"]
    if max_new is None:  # max_length counts the (padded) prompt too
        max_new = values["max_length"] - prompt_length
        if max_new < 1:
            raise ValueError(
                f"max_length={values['max_length']} leaves no room after the prompt of {prompt_length} tokens; "
                "pass max_new_tokens instead")
    min_new = values["min_new_tokens"]
    if min_new is None:
        min_new = max(0, values["min_length"] - prompt_length)

    eos = values["eos_token_id"]
    if isinstance(eos, torch.Tensor) and eos.dim() == 1:
        eos = eos.tolist()
    eos_ids = tuple([eos] if _is_int(eos) else (eos or []))
    if not all(_is_token_id(e) for e in eos_ids):
        raise ValueError(f"eos_token_id must be a token id (an int in [0, 2**63)) or a list of them, got {eos!r}")
    eos_ids = tuple(int(e) for e in eos_ids)
    pad = values["pad_token_id"]
    if pad is None:  # transformers falls back to the (first) eos token
        pad = eos_ids[0] if eos_ids else 0
    if not _is_token_id(pad):
        raise ValueError(f"pad_token_id must be a token id (an int in [0, 2**63): it is written into the int64 "
                         f"output), got {pad!r}")
    num_return = values["num_return_sequences"]
    if not _is_int(num_return) or num_return < 1:
        raise ValueError(f"num_return_sequences must be a positive integer, got {num_return!r}")
    num_beams = _as_int("num_beams", values["num_beams"])
    if num_beams < 1:
        raise ValueError(f"num_beams must be a positive integer, got {num_beams!r}")
    do_sample = _as_bool("do_sample", values["do_sample"])
    if num_return > 1 and not do_sample and num_beams == 1:
        raise ValueError(f"greedy decoding (do_sample=False) without beam search does not support "
                         f"num_return_sequences={num_return}, as in transformers; pass do_sample=True or num_beams")
    if num_beams > 1 and num_return > num_beams:
        raise ValueError(f"num_return_sequences ({num_return}) must be <= num_beams ({num_beams}), as in transformers")
    # Greedy decoding ignores the sampling warpers (transformers only warns), so e.g. temperature=0 is fine.
    warpers = dict(temperature=_as_float("temperature", values["temperature"]), top_k=_as_int("top_k", values["top_k"]),
                   top_p=_as_float("top_p", values["top_p"])) if do_sample else {}
    sampling = SamplingParams(
        max_new_tokens=_as_int("max_new_tokens", max_new), min_new_tokens=_as_int("min_new_tokens", min_new),
        do_sample=do_sample, repetition_penalty=_as_float("repetition_penalty", values["repetition_penalty"]),
        eos_token_ids=eos_ids,
        seed=None if values["seed"] is None else _as_int("seed", values["seed"]),
        output_scores=_as_bool("output_scores", values["output_scores"]) and num_beams == 1, **warpers,
        no_repeat_ngram_size=_as_int("no_repeat_ngram_size", values["no_repeat_ngram_size"]),
        num_beams=num_beams, length_penalty=_as_float("length_penalty", values["length_penalty"]),
        early_stopping=values["early_stopping"],
    )
    return GenerateOptions(sampling, int(num_return), int(pad),
                           _as_bool("return_dict_in_generate", values["return_dict_in_generate"]),
                           _check_streamer_object(values["streamer"]), bool(values["output_scores"]),
                           _assisted_options(values, num_beams))


def _assisted_options(values: dict, num_beams: int) -> AssistedOptions | None:
    assistant, lookup = values["assistant_model"], values["prompt_lookup_num_tokens"]
    if assistant is None and lookup is None:
        return None
    if assistant is not None and lookup is not None:
        raise ValueError("pass assistant_model or prompt_lookup_num_tokens, not both")
    if num_beams > 1:
        raise ValueError("assisted generation (assistant_model, prompt_lookup_num_tokens) does not support beam search "
                         "(num_beams > 1), as in transformers")
    ngram = values["max_matching_ngram_size"]
    counts = {"num_assistant_tokens": values["num_assistant_tokens"], "prompt_lookup_num_tokens": lookup,
              "max_matching_ngram_size": 2 if ngram is None else ngram}
    for name, value in counts.items():
        if value is not None and _as_int(name, value) < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    threshold = _as_float("assistant_confidence_threshold", values["assistant_confidence_threshold"])
    if not 0 <= threshold <= 1:
        raise ValueError(f"assistant_confidence_threshold must be in [0, 1], got {threshold!r}")
    return AssistedOptions(assistant, int(counts["num_assistant_tokens"]), threshold,
                           None if lookup is None else int(lookup), int(counts["max_matching_ngram_size"]))


def _is_int(value) -> bool:
    """Python, numpy and 0-d torch integers (not bools)."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.dtype.is_floating_point and value.dtype != torch.bool
    return hasattr(value, "__index__") and not isinstance(value, bool)


def _is_token_id(value) -> bool:
    return _is_int(value) and 0 <= int(value) < 2**63


def _as_int(name: str, value) -> int:
    if not _is_int(value):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


def _as_bool(name: str, value) -> bool:
    """A flag: Python, numpy or 0-d torch booleans only (bool("false") is True, so strings are refused)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype == torch.bool:
        return bool(value)
    if type(value).__name__ not in ("bool", "bool_"):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return bool(value)


def _check_streamer_object(streamer):
    """transformers' streamer protocol: put(tensor) and end()."""
    if streamer is not None and not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
        raise TypeError(f"streamer must have put(value) and end() methods (transformers' BaseStreamer), "
                        f"got {type(streamer).__name__}")
    return streamer


def _as_float(name: str, value) -> float:
    if isinstance(value, bool) or not _is_real_scalar(value):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def _is_real_scalar(value) -> bool:
    """numpy and 0-d torch real numbers."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and value.dtype != torch.bool and not value.is_complex()
    return hasattr(value, "__float__") and not isinstance(value, (str, bytes, complex))


def prompts_from_batch(input_ids, attention_mask, config: GPT2Config) -> list[list[int]]:
    """Validate a transformers-style batch (any integer dtype) and strip its left padding."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    for name, tensor in (("input_ids", input_ids), ("attention_mask", attention_mask)):
        if isinstance(tensor, torch.Tensor) and tensor.device.type == "meta":
            raise ValueError(f"{name} is on the meta device (shape only, no values): move it to the cpu or a GPU")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [batch, seq_len], got {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.is_complex():
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)})")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.dim() == 1:
        attention_mask = attention_mask[None]
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
    mask = attention_mask.detach().cpu()
    if not bool(((mask == 0) | (mask == 1)).all()):     # checked before any cast: 0.5 must not become 0
        raise ValueError("attention_mask must hold only 0 and 1")
    mask = mask.long()
    ids = input_ids.detach().cpu().long()
    prompts = []
    for row in range(ids.shape[0]):
        length = int(mask[row].sum())
        if length == 0:
            raise ValueError(f"row {row} of the batch is empty (attention_mask is all zeros)")
        if bool((mask[row, ids.shape[1] - length:] == 0).any()):
            raise ValueError(f"row {row} is not left-padded: pad on the left (tokenizer padding_side='left')")
        prompts.append(ids[row, ids.shape[1] - length:].tolist())
    for prompt in prompts:        # vocabulary and context: the model's one prompt check
        config.check_prompt(prompt)
    return prompts


def left_pad(prompts: list[list[int]], width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 input_ids [B, width] with each prompt right-aligned, and its 0/1 attention mask."""
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def check_streamer(options: GenerateOptions, num_prompts: int) -> None:
    if options.streamer is not None and options.sampling.num_beams > 1:
        raise ValueError("streamer cannot be used with beam search (num_beams > 1), as in transformers")
    if options.streamer is not None and num_prompts * options.num_return_sequences != 1:
        raise ValueError("streamer supports a single sequence (batch size 1, num_return_sequences=1), as in transformers; "
                         "use GPT2.stream for several")


def assemble_output(input_ids: torch.Tensor, generated: list[GeneratedSequence], options: GenerateOptions):
    """Rows = prompt rows (with their padding) repeated num_return_sequences times, each followed by
    its new tokens, padded on the right with pad_token_id to the longest."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    # int64 whatever the input's integer dtype, as transformers' output (uint8 prompts, 50k-token vocab)
    prompts = input_ids.long().repeat_interleave(options.num_return_sequences, dim=0)
    beam = options.sampling.num_beams > 1
    fill = beam_fill_value(options.pad_token_id, options.sampling.eos_token_ids) if beam else options.pad_token_id
    width = max(len(g.tokens) for g in generated)
    new = torch.full((len(generated), width), fill, dtype=torch.long, device=input_ids.device)
    for row, seq in enumerate(generated):
        new[row, :len(seq.tokens)] = torch.tensor(seq.tokens, dtype=torch.long)
    sequences = torch.cat([prompts, new], dim=1)
    if not options.return_dict_in_generate:
        return sequences
    if beam:
        return _beam_output(sequences, generated, options, width)
    scores = None
    if options.sampling.output_scores:
        # Step t holds each sequence's processed scores; a sequence finished earlier has -inf rows.
        vocab = next(s.scores[0].shape[-1] for s in generated if s.scores)
        scores = tuple(
            torch.stack([s.scores[t] if t < len(s.scores) else torch.full((vocab,), float("-inf")) for s in generated])
            for t in range(width))
    return GenerateOutput(sequences=sequences, scores=scores)


def _beam_output(sequences: torch.Tensor, generated: list[GeneratedSequence], options: GenerateOptions,
                 width: int) -> GenerateOutput:
    """transformers' beam output: sequences_scores (when output_scores), and beam_indices [rows,
    width] counting beams across the batch (prompt b's beams are b * num_beams + i), -1 padded."""
    num_beams, n = options.sampling.num_beams, options.num_return_sequences
    indices = torch.full((len(generated), width), -1, dtype=torch.int32)   # int32, as transformers
    for row, seq in enumerate(generated):
        indices[row, :len(seq.beam_indices)] = torch.tensor(seq.beam_indices, dtype=torch.int32) + (row // n) * num_beams
    scores = torch.tensor([seq.sequence_score for seq in generated]) if options.output_scores else None
    return GenerateOutput(sequences=sequences, sequences_scores=scores, beam_indices=indices.to(sequences.device))
