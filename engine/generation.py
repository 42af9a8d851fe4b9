"""transformers' `generate()` semantics, independent of the backend that produces the tokens.

    resolve_generate_options   kwargs + generation_config -> GenerateOptions (unknown options raise)
    prompts_from_batch         input_ids [B, T] + left-padding attention_mask -> one token list per row
    assemble_output            prompt rows + each sequence's new tokens -> sequences padded with
                               pad_token_id after EOS (or a GenerateOutput with per-step scores)

Defaults are transformers' (max_length 20, top_k 50, ...). num_return_sequences rows follow their
prompt (repeat_interleave order), as in transformers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.config import GPT2Config
from engine.sampling import SamplingParams

# transformers' defaults for the options this engine implements.
HF_DEFAULTS = {
    "max_length": 20, "max_new_tokens": None, "min_length": 0, "min_new_tokens": None,
    "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0,
    "num_return_sequences": 1, "eos_token_id": None, "pad_token_id": None, "seed": None,
    "output_scores": False, "return_dict_in_generate": False, "streamer": None,
}
# Options accepted only at the value that changes nothing here (anything else raises).
NEUTRAL_OPTIONS = {"num_beams": 1, "output_attentions": False, "output_hidden_states": False, "early_stopping": False}
# Options whose value never changes the result of this engine (its cache is its own).
IGNORED_OPTIONS = {"use_cache", "cache_implementation", "bos_token_id", "transformers_version", "_from_model_config"}


@dataclass(frozen=True)
class GenerateOptions:
    sampling: SamplingParams
    num_return_sequences: int
    pad_token_id: int
    return_dict_in_generate: bool
    streamer: object | None


@dataclass
class GenerateOutput:
    """transformers' GenerateDecoderOnlyOutput subset: sequences, and per-step scores when asked."""
    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None

    def __getitem__(self, key):
        return getattr(self, key)


@dataclass
class GeneratedSequence:
    tokens: list[int] = field(default_factory=list)
    scores: list[torch.Tensor] = field(default_factory=list)


def _generation_config_values(generation_config) -> dict:
    if generation_config is None:
        return {}
    if isinstance(generation_config, dict):
        return dict(generation_config)
    if hasattr(generation_config, "to_diff_dict"):  # transformers.GenerationConfig: only what was set
        return generation_config.to_diff_dict()
    raise TypeError(f"generation_config must be a transformers GenerationConfig or a dict, got {type(generation_config).__name__}")


def resolve_generate_options(config: GPT2Config, prompt_length: int, generation_config=None, **kwargs) -> GenerateOptions:
    """Merge defaults <- generation_config <- kwargs (transformers' precedence) and validate."""
    values = dict(HF_DEFAULTS)
    values["eos_token_id"] = config.eos_token_id
    for source in (_generation_config_values(generation_config), kwargs):
        for name, value in source.items():
            if name in IGNORED_OPTIONS:
                continue
            if name in NEUTRAL_OPTIONS:
                if value is not None and value != NEUTRAL_OPTIONS[name]:
                    raise ValueError(f"generate() option {name}={value!r} is not supported (only {NEUTRAL_OPTIONS[name]!r})")
                continue
            if name not in HF_DEFAULTS:
                raise ValueError(f"generate() option {name!r} is not supported by gpt2-engine")
            if value is not None or name in ("max_new_tokens", "min_new_tokens", "seed", "pad_token_id", "streamer"):
                values[name] = value

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
    eos_ids = tuple([eos] if isinstance(eos, int) else (eos or []))
    if not all(isinstance(e, int) for e in eos_ids):
        raise ValueError(f"eos_token_id must be an int or a list of ints, got {eos!r}")
    pad = values["pad_token_id"]
    if pad is None:  # transformers falls back to the (first) eos token
        pad = eos_ids[0] if eos_ids else 0
    num_return = values["num_return_sequences"]
    if not isinstance(num_return, int) or num_return < 1:
        raise ValueError(f"num_return_sequences must be a positive integer, got {num_return!r}")
    if num_return > 1 and not values["do_sample"]:
        raise ValueError(f"greedy decoding (do_sample=False) without beam search does not support "
                         f"num_return_sequences={num_return}, as in transformers; pass do_sample=True")
    sampling = SamplingParams(
        max_new_tokens=max_new, min_new_tokens=min_new, do_sample=bool(values["do_sample"]),
        temperature=float(values["temperature"]), top_k=int(values["top_k"] or 0), top_p=float(values["top_p"]),
        repetition_penalty=float(values["repetition_penalty"]), eos_token_ids=eos_ids, seed=values["seed"],
        output_scores=bool(values["output_scores"]),
    )
    return GenerateOptions(sampling, num_return, int(pad), bool(values["return_dict_in_generate"]), values["streamer"])


def prompts_from_batch(input_ids, attention_mask, config: GPT2Config) -> list[list[int]]:
    """Validate a transformers-style batch and strip its left padding."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
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
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
    mask = attention_mask.detach().cpu().long()
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 and 1")
    ids = input_ids.detach().cpu().long()
    prompts = []
    for row in range(ids.shape[0]):
        length = int(mask[row].sum())
        if length == 0:
            raise ValueError(f"row {row} of the batch is empty (attention_mask is all zeros)")
        if bool((mask[row, ids.shape[1] - length:] == 0).any()):
            raise ValueError(f"row {row} is not left-padded: pad on the left (tokenizer padding_side='left')")
        prompt = ids[row, ids.shape[1] - length:]
        bad = (prompt < 0) | (prompt >= config.vocab_size)
        if bool(bad.any()):
            raise ValueError(f"row {row} holds token id {int(prompt[bad][0])} outside the vocabulary [0, {config.vocab_size})")
        if length > config.n_positions:
            raise ValueError(f"row {row} has {length} tokens, longer than the context (n_positions={config.n_positions})")
        prompts.append(prompt.tolist())
    return prompts


def check_fits_context(prompts: list[list[int]], options: GenerateOptions, config: GPT2Config) -> None:
    longest = max(len(p) for p in prompts)
    if longest + options.sampling.max_new_tokens > config.n_positions:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens={options.sampling.max_new_tokens} exceeds the context "
            f"(n_positions={config.n_positions})")


def check_streamer(options: GenerateOptions, num_prompts: int) -> None:
    if options.streamer is not None and num_prompts * options.num_return_sequences != 1:
        raise ValueError("streamer supports a single sequence (batch size 1, num_return_sequences=1), as in transformers; "
                         "use GPT2.stream for several")


def assemble_output(input_ids: torch.Tensor, generated: list[GeneratedSequence], options: GenerateOptions):
    """Rows = prompt rows (with their padding) repeated num_return_sequences times, each followed by
    its new tokens, padded on the right with pad_token_id to the longest."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    prompts = input_ids.repeat_interleave(options.num_return_sequences, dim=0)
    width = max(len(g.tokens) for g in generated)
    new = torch.full((len(generated), width), options.pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    for row, seq in enumerate(generated):
        new[row, :len(seq.tokens)] = torch.tensor(seq.tokens, dtype=input_ids.dtype)
    sequences = torch.cat([prompts, new], dim=1)
    if not options.return_dict_in_generate:
        return sequences
    scores = None
    if options.sampling.output_scores:
        # Step t holds each sequence's processed scores; a sequence finished earlier has -inf rows.
        vocab = next(s.scores[0].shape[-1] for s in generated if s.scores)
        scores = tuple(
            torch.stack([s.scores[t] if t < len(s.scores) else torch.full((vocab,), float("-inf")) for s in generated])
            for t in range(width))
    return GenerateOutput(sequences=sequences, scores=scores)
