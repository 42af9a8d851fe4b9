"""GPT-2 model configuration: a frozen dataclass, the four OpenAI presets, and HF config.json parsing."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

SUPPORTED_ACTIVATIONS = ("gelu_new",)  # GPT-2's tanh-approximated GELU


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    bos_token_id: int = 50256
    # The model's end-of-sequence token(s), generate()'s default eos_token_id: an id, a tuple of ids (HF's
    # list form), or None for no EOS (config.json's null or []): generation then runs to its length limit.
    eos_token_id: int | tuple[int, ...] | None = 50256

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPT2Config.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPT2Config.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not self.layer_norm_epsilon > 0:
            raise ValueError(f"GPT2Config.layer_norm_epsilon must be positive, got {self.layer_norm_epsilon!r}")
        eos = self.eos_token_id
        if not (eos is None or _is_token_id(eos) or (isinstance(eos, tuple) and eos and all(map(_is_token_id, eos)))):
            raise ValueError(f"GPT2Config.eos_token_id must be a non-negative token id, a non-empty tuple of them, "
                             f"or None, got {self.eos_token_id!r}")
        if self.activation_function not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"GPT2Config.activation_function must be one of {SUPPORTED_ACTIVATIONS}, got {self.activation_function!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def check_prompt(self, prompt_token_ids: list[int], max_new_tokens: int = 0) -> None:
        """The one check of a prompt against the model: token ids in the vocabulary, and the
        prompt plus max_new_tokens within the context."""
        if len(prompt_token_ids) == 0:
            raise ValueError("prompt is empty: give at least one token id")
        bad = [t for t in prompt_token_ids if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
        if bad:
            raise ValueError(f"prompt token id {bad[0]!r} is outside the vocabulary [0, {self.vocab_size})")
        if len(prompt_token_ids) + max_new_tokens > self.n_positions:
            asked = f" + max_new_tokens={max_new_tokens}" if max_new_tokens else ""
            raise ValueError(f"prompt of {len(prompt_token_ids)} tokens{asked} exceeds the model's context "
                             f"(n_positions={self.n_positions})")

    @property
    def num_parameters(self) -> int:
        """Parameter count with the LM head tied to wte (as GPT-2 stores it)."""
        c, layers = self.n_embd, self.n_layer
        per_layer = 2 * 2 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * 4 * c + 4 * c) + (4 * c * c + c)
        return self.vocab_size * c + self.n_positions * c + layers * per_layer + 2 * c

    @classmethod
    def preset(cls, name: str) -> "GPT2Config":
        key = name.removeprefix("openai-community/")
        if key not in PRESETS:
            raise ValueError(f"unknown GPT-2 preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[key]

    @classmethod
    def from_dict(cls, values: dict) -> "GPT2Config":
        """Build from an HF GPT-2 config dict (n_ctx is a legacy alias). HF options this engine does not
        implement raise when set to a value that changes the math; other HF keys are ignored."""
        if not isinstance(values, dict):
            raise ValueError(f"a GPT-2 config must be a JSON object, got {type(values).__name__}")
        model_type = values.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ValueError(f"config model_type must be 'gpt2', got {model_type!r}")
        for option, neutral in UNSUPPORTED_HF_OPTIONS.items():
            if values.get(option, neutral) != neutral:
                raise ValueError(f"config option {option}={values[option]!r} is not supported by gpt2-engine (only {neutral!r})")
        n_inner = values.get("n_inner")
        if n_inner is not None and n_inner != 4 * values.get("n_embd", 768):
            raise ValueError(f"config option n_inner={n_inner} is not supported (the MLP width must be 4 * n_embd)")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in known and v is not None}
        if "n_positions" not in kwargs and "n_ctx" in values:
            kwargs["n_positions"] = values["n_ctx"]
        if "eos_token_id" in values:  # HF: an id, a list of ids (each one stops), or null / [] for none
            eos = values["eos_token_id"]
            if isinstance(eos, (list, tuple)):
                eos = tuple(eos) if len(eos) > 1 else (eos[0] if eos else None)
            kwargs["eos_token_id"] = eos
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "GPT2Config":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {path} is not valid JSON: {exc}") from exc
        return cls.from_dict(values)

    def to_hf_dict(self) -> dict:
        """The fields transformers' GPT2Config takes (used to build a reference HF model)."""
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return asdict(self) | {"model_type": "gpt2", "n_ctx": self.n_positions, "eos_token_id": eos}


def _is_token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# HF GPT-2 options that change the computation, with the only value this engine implements.
UNSUPPORTED_HF_OPTIONS = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False}

PRESETS = {
    "gpt2": GPT2Config(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": GPT2Config(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": GPT2Config(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": GPT2Config(n_embd=1600, n_layer=48, n_head=25),
}
