"""GPT-2 weights as a canonical state dict: loaded from Hugging Face checkpoints (a local directory or a
hub id), taken from an in-memory transformers model, or seeded random.

Canonical names are HF GPT-2's without the `transformer.` prefix; linear weights keep HF's Conv1D
layout [in, out] (C = n_embd, V = vocab_size, P = n_positions):
  wte.weight [V, C]   wpe.weight [P, C]   ln_f.weight, ln_f.bias [C]
  h.{i}.ln_1.weight/.bias [C]            h.{i}.ln_2.weight/.bias [C]
  h.{i}.attn.c_attn.weight [C, 3C] .bias [3C]   h.{i}.attn.c_proj.weight [C, C] .bias [C]
  h.{i}.mlp.c_fc.weight [C, 4C] .bias [4C]      h.{i}.mlp.c_proj.weight [4C, C] .bias [C]
  lm_head.weight [V, C]: only for an untied head; a tied head (absent or equal to wte) is dropped.

Checkpoint directories hold config.json and one of (first found wins): model.safetensors,
model.safetensors.index.json + shards, pytorch_model.bin, pytorch_model.bin.index.json + shards.
An index is JSON {"weight_map": {tensor name: shard file name}}; it is authoritative: each tensor is read
from the shard it names (a stale copy of it in another shard, or a tensor no entry names, is not read;
a shard file that no entry names is not opened), and shard names are paths inside the directory. Keys come with the `transformer.`
prefix (save_pretrained) or without (openai-community/gpt2, which also stores the causal-mask buffers
h.{i}.attn.bias and h.{i}.attn.masked_bias; they are not weights and are dropped).
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from gpt2_engine.config import GPT2Config

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")
MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
# Hub downloads: the safetensors files first; the .bin files only for a repository without them.
HUB_PATTERNS = (
    ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors", *TOKENIZER_FILES],
    ["config.json", "pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin", *TOKENIZER_FILES],
)


def expected_shapes(config: GPT2Config | str) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor name and its shape, in model order (lm_head.weight excluded: it is tied)."""
    config = _as_config(config)
    c, v, p = config.n_embd, config.vocab_size, config.n_positions
    shapes = {"wte.weight": (v, c), "wpe.weight": (p, c)}
    for i in range(config.n_layer):
        shapes |= {
            f"h.{i}.ln_1.weight": (c,), f"h.{i}.ln_1.bias": (c,),
            f"h.{i}.attn.c_attn.weight": (c, 3 * c), f"h.{i}.attn.c_attn.bias": (3 * c,),
            f"h.{i}.attn.c_proj.weight": (c, c), f"h.{i}.attn.c_proj.bias": (c,),
            f"h.{i}.ln_2.weight": (c,), f"h.{i}.ln_2.bias": (c,),
            f"h.{i}.mlp.c_fc.weight": (c, 4 * c), f"h.{i}.mlp.c_fc.bias": (4 * c,),
            f"h.{i}.mlp.c_proj.weight": (4 * c, c), f"h.{i}.mlp.c_proj.bias": (c,),
        }  # fmt: skip
    return shapes | {"ln_f.weight": (c,), "ln_f.bias": (c,)}


def validate_state_dict(state_dict: dict[str, torch.Tensor], config: GPT2Config, source: str = "state dict") -> None:
    """Raise a ValueError naming `source` and every missing, unexpected, wrongly shaped or non-float tensor."""
    shapes = expected_shapes(config) | {"lm_head.weight": (config.vocab_size, config.n_embd)}
    problems = []
    missing = [name for name in shapes if name not in state_dict and name != "lm_head.weight"]
    if missing:
        problems.append(f"missing tensors: {_names(missing)}")
    unexpected = [name for name in state_dict if name not in shapes]
    if unexpected:
        problems.append(f"unexpected tensors: {_names(unexpected)}")
    for name, tensor in state_dict.items():
        if name not in shapes:
            continue
        if not isinstance(tensor, torch.Tensor):
            problems.append(f"{name} is a {type(tensor).__name__}, not a tensor")
        elif tuple(tensor.shape) != shapes[name]:
            problems.append(f"{name} has shape {tuple(tensor.shape)}, expected {shapes[name]}")
        elif not tensor.is_floating_point():
            problems.append(f"{name} has dtype {tensor.dtype}, expected a floating-point dtype")
    if problems:
        raise ValueError(f"{source} does not match the GPT-2 config {config}: " + "; ".join(problems))


def random_state_dict(config: GPT2Config | str, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Seeded random weights initialised like transformers' GPT-2: weights N(0, 0.02), the residual
    projections (c_proj) N(0, 0.02 / sqrt(2 * n_layer)), biases 0, LayerNorm weights 1."""
    config = _as_config(config)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith(".bias"):
            tensor = torch.zeros(shape)
        elif ".ln_" in name or name.startswith("ln_f"):
            tensor = torch.ones(shape)
        else:
            std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("c_proj.weight") else 0.02
            tensor = torch.empty(shape).normal_(0.0, std, generator=generator)
        state[name] = tensor.to(dtype)
    return state


def load_checkpoint(
    name_or_path: str | Path, *, dtype: torch.dtype | None = None, return_directory: bool = False
) -> tuple[GPT2Config, dict[str, torch.Tensor]] | tuple[GPT2Config, dict[str, torch.Tensor], Path]:
    """Config and canonical state dict of an HF GPT-2 checkpoint: a local directory, or a hub id ("gpt2",
    "openai-community/gpt2-medium") found in the huggingface_hub cache or downloaded. dtype None keeps the
    stored dtype. return_directory=True adds the directory read (a hub id's snapshot), which also holds the
    tokenizer files and generation_config.json when the checkpoint has them."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
    directory = _checkpoint_directory(name_or_path)
    config = _read_config(directory)
    weights_path = next((directory / name for name in WEIGHT_FILES if (directory / name).is_file()), None)
    if weights_path is None:
        raise FileNotFoundError(f"checkpoint directory {directory} has no weights file: looked for {', '.join(WEIGHT_FILES)}")
    raw = _load_sharded(weights_path) if weights_path.name.endswith(".index.json") else _load_weights_file(weights_path)
    state = _canonical(raw, str(weights_path))
    validate_state_dict(state, config, source=str(weights_path))
    if dtype is not None:
        state = {name: tensor.to(dtype) for name, tensor in state.items()}
    return (config, state, directory) if return_directory else (config, state)


def load_config(name_or_path: str | Path) -> GPT2Config:
    """The config of a checkpoint (a local directory or a hub id, as load_checkpoint takes), without its weights."""
    return _read_config(_checkpoint_directory(name_or_path))


def _checkpoint_directory(name_or_path: str | Path) -> Path:
    directory = Path(name_or_path).expanduser()
    if not directory.exists() and HUB_ID.fullmatch(str(name_or_path)):
        directory = _hub_snapshot(str(name_or_path))
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    return directory


def _read_config(directory: Path) -> GPT2Config:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"checkpoint directory {directory} has no config.json")
    try:
        return GPT2Config.from_json_file(config_path)
    except (ValueError, TypeError) as exc:
        raise ValueError(str(exc) if str(config_path) in str(exc) else f"{config_path}: {exc}") from exc


def load_hf_model_state(hf_model) -> tuple[GPT2Config, dict[str, torch.Tensor]]:
    """Config and canonical state dict of an in-memory transformers GPT2LMHeadModel (or GPT2Model); the
    tensors are detached views sharing storage with the model's parameters."""
    if not hasattr(hf_model, "config") or not hasattr(hf_model, "state_dict"):
        raise TypeError(f"expected a transformers GPT2LMHeadModel, got {type(hf_model).__name__}")
    config = GPT2Config.from_dict(hf_model.config.to_dict())
    source = f"{type(hf_model).__name__} state dict"
    state = _canonical(hf_model.state_dict(), source)  # Module.state_dict() holds .detach() views
    validate_state_dict(state, config, source=source)
    return config, state


def _as_config(config: GPT2Config | str) -> GPT2Config:
    if isinstance(config, str):
        return GPT2Config.preset(config)
    if not isinstance(config, GPT2Config):
        raise TypeError(f"expected a GPT2Config or a preset name, got {type(config).__name__}")
    return config


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def _canonical(raw: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Strip the `transformer.` prefix, drop the mask buffers, and drop lm_head.weight when tied to wte."""
    state = {}
    for key, tensor in raw.items():
        name = key.removeprefix("transformer.")
        if MASK_BUFFER.fullmatch(name):
            continue
        if name in state:
            raise ValueError(f"{source} holds tensor {name} twice (with and without the 'transformer.' prefix)")
        state[name] = tensor
    head, wte = state.get("lm_head.weight"), state.get("wte.weight")
    if head is not None and wte is not None and head.shape == wte.shape:
        tied = head.data_ptr() == wte.data_ptr() and head.stride() == wte.stride()
        if tied or (head.dtype == wte.dtype and torch.equal(head, wte)):
            del state["lm_head.weight"]
    return state


def _load_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    """Every tensor the index names, each read from the shard its weight_map entry names."""
    by_shard: dict[Path, list[str]] = {}
    for name, shard in _weight_map(index_path).items():
        by_shard.setdefault(index_path.parent / shard, []).append(name)
    raw = {}
    for shard, names in by_shard.items():
        if not shard.is_file():
            raise FileNotFoundError(f"shard {shard} listed in {index_path} not found")
        tensors = _load_weights_file(shard, names)
        absent = [name for name in names if name not in tensors]
        if absent:
            raise ValueError(f"checkpoint index {index_path} maps tensors to shard {shard.name}, which does not hold "
                             f"them: {_names(absent)}")
        raw |= tensors
    return raw


def _weight_map(index_path: Path) -> dict[str, str]:
    """The index's weight_map, checked: a non-empty object of tensor name -> shard path inside the directory."""
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"checkpoint index {index_path} is not JSON with a 'weight_map' object: {exc!r}") from exc
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"checkpoint index {index_path}: 'weight_map' must map tensor names to shard files, got {weight_map!r}")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise ValueError(f"checkpoint index {index_path}: weight_map[{name!r}] must be a shard file name, got {shard!r}")
        # Checked on the name, not on the resolved path: a hub snapshot's files are symlinks into its blob store.
        if Path(shard).anchor or ".." in Path(shard).parts:
            raise ValueError(f"checkpoint index {index_path}: weight_map[{name!r}] = {shard!r} is not a path inside "
                             f"the checkpoint directory")
    return weight_map


def _load_weights_file(path: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, or only those of `names` it holds (a safetensors file reads only those)."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt") as file:
                stored = file.keys()
                wanted = stored if names is None else [name for name in names if name in set(stored)]
                return {name: file.get_tensor(name) for name in wanted}
        except SafetensorError as exc:
            raise ValueError(f"weights file {path} is not a valid safetensors file (corrupt or truncated): {exc}") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - damaged pickles fail anywhere in the unpickler (IndexError, KeyError, ...)
        raise ValueError(f"weights file {path} is not a loadable PyTorch checkpoint (corrupt or truncated): {exc}") from exc
    if not isinstance(state, dict):
        raise ValueError(f"weights file {path} holds a {type(state).__name__}, expected a state dict")
    return state if names is None else {name: state[name] for name in names if name in state}


def _hub_snapshot(repo_id: str) -> Path:
    """The local snapshot directory of a hub repository: from the huggingface_hub cache, else downloaded."""
    from huggingface_hub import constants, snapshot_download
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    error: Exception | None = None
    for local_files_only in (True,) if offline else (True, False):
        for patterns in HUB_PATTERNS:
            try:
                folder = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_files_only))
            except Exception as exc:  # noqa: BLE001 - network, HTTP and cache errors come in many types; reported below
                error = exc
                continue
            if (folder / "config.json").is_file() and any((folder / name).is_file() for name in WEIGHT_FILES):
                return folder
    reason = "offline mode: HF_HUB_OFFLINE is set" if offline else "network unavailable or no such repository"
    if error is not None:
        reason += f"; {type(error).__name__}: " + str(error).partition("\n")[0]
    raise FileNotFoundError(
        f"{repo_id!r} is not a local directory, not in the Hugging Face cache ({constants.HF_HUB_CACHE}), and could "
        f"not be downloaded ({reason}). Pass a local checkpoint directory instead: one holding config.json and "
        f"model.safetensors (or pytorch_model.bin), e.g. written by transformers' "
        f"GPT2LMHeadModel.from_pretrained({repo_id!r}).save_pretrained(directory) on a machine with network access."
    )
