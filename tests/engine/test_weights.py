"""gpt2_engine.weights: HF checkpoints written here by transformers (safetensors, sharded, .bin, the
openai-community key layout) load to exactly the model's tensors; seeded random weights; every bad
input raises an error that names the file or tensor."""
import json
import math

import pytest
import torch
import transformers
from safetensors.torch import save_file

from gpt2_engine.config import GPT2Config
from gpt2_engine.weights import (
    expected_shapes,
    load_checkpoint,
    load_hf_model_state,
    random_state_dict,
    validate_state_dict,
)

SMALL_ODD = dict(n_embd=48, n_head=3, n_layer=2, vocab_size=101, n_positions=37)
CONFIGS = [SMALL_ODD, dict(n_embd=32, n_head=4, n_layer=3, vocab_size=64, n_positions=16)]


def hf_model(seed=0, **sizes):
    """A random transformers GPT2LMHeadModel; every parameter (biases and LayerNorms included) is random
    so that a mix-up of any two tensors shows."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**(SMALL_ODD | sizes), bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def canonical(model):
    """What load_checkpoint must return for a tied model: HF names minus `transformer.`, no lm_head."""
    return {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}


def assert_same_tensors(state, expected):
    assert sorted(state) == sorted(expected)
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype, name
        assert torch.equal(state[name], tensor), name


def openai_layout(model):
    """openai-community/gpt2's key layout: no `transformer.` prefix, no lm_head, and the attention mask
    buffers h.{i}.attn.bias [1, 1, P, P] and h.{i}.attn.masked_bias (a scalar) stored beside the weights."""
    state = {name: t.clone().contiguous() for name, t in canonical(model).items()}
    p = model.config.n_positions
    for i in range(model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(p, p)).view(1, 1, p, p)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return state


def write_checkpoint(directory, model, state, filename="model.safetensors"):
    model.config.save_pretrained(directory)
    if filename.endswith(".safetensors"):
        save_file(state, directory / filename)
    else:
        torch.save(state, directory / filename)
    return directory


@pytest.fixture
def model():
    return hf_model()


@pytest.fixture
def saved(tmp_path, model):
    model.save_pretrained(tmp_path)
    return tmp_path


# --- loading ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", CONFIGS)
def test_safetensors_from_save_pretrained(tmp_path, sizes):
    model = hf_model(**sizes)
    model.save_pretrained(tmp_path)
    config, state = load_checkpoint(tmp_path)
    assert config == GPT2Config.from_dict(model.config.to_dict())
    assert (config.n_embd, config.n_head, config.n_layer, config.vocab_size) == (
        sizes["n_embd"], sizes["n_head"], sizes["n_layer"], sizes["vocab_size"])  # fmt: skip
    assert_same_tensors(state, canonical(model))
    assert load_checkpoint(tmp_path, return_directory=True)[2] == tmp_path


def test_sharded_safetensors(tmp_path, model):
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _, state = load_checkpoint(tmp_path)
    assert_same_tensors(state, canonical(model))


def test_pytorch_bin_with_tied_lm_head(tmp_path, model):
    # transformers 5 always writes safetensors, so the .bin is written the way older transformers did:
    # torch.save of the full state dict, lm_head.weight sharing wte's storage.
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
    write_checkpoint(tmp_path, model, state, "pytorch_model.bin")
    _, loaded = load_checkpoint(tmp_path)
    assert_same_tensors(loaded, canonical(model))


def test_lm_head_equal_to_wte_but_stored_separately_is_dropped(tmp_path, model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    write_checkpoint(tmp_path, model, state, "pytorch_model.bin")
    _, loaded = load_checkpoint(tmp_path)
    assert "lm_head.weight" not in loaded


def write_sharded(directory, model, kind, weight_map=None, extra=None):
    """A two-shard checkpoint of `kind` ("bin" or "safetensors"): the first 10 tensors in shard 1, the
    rest in shard 2, plus `extra` {shard number: {name: tensor}} stored beside them, and an index holding
    `weight_map` (default: where the split put each tensor). Returns the index path and the shard names."""
    state = canonical(model)
    names = list(state)
    prefix, ext = ("pytorch_model", "bin") if kind == "bin" else ("model", "safetensors")
    files = [f"{prefix}-0000{i}-of-00002.{ext}" for i in (1, 2)]
    split = [names[:10], names[10:]]
    if weight_map is None:
        weight_map = {k: filename for filename, keys in zip(files, split) for k in keys}
    model.config.save_pretrained(directory)
    for number, (filename, keys) in enumerate(zip(files, split), 1):
        tensors = {k: state[k].contiguous() for k in keys} | (extra or {}).get(number, {})
        save_file(tensors, directory / filename) if ext == "safetensors" else torch.save(tensors, directory / filename)
    index = directory / f"{prefix}.{ext}.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index, files


@pytest.mark.parametrize("kind", ["bin", "safetensors"])
def test_sharded_with_index(tmp_path, model, kind):
    write_sharded(tmp_path, model, kind)
    _, loaded = load_checkpoint(tmp_path)
    assert_same_tensors(loaded, canonical(model))


@pytest.mark.parametrize("kind", ["bin", "safetensors"])
def test_checkpoint_whose_index_disagrees_with_its_shards(tmp_path, model, kind):
    """Each tensor comes from the shard the index names. Not read: stale copies in the other shard
    (wte.weight's in shard 2, which a merge of the shards in sorted order would let win, and ln_f.bias's
    in shard 1), a tensor no entry names, and a shard file the index does not list."""
    state = canonical(model)
    extra = {1: {"ln_f.bias": torch.full_like(state["ln_f.bias"], 7.0)},
             2: {"wte.weight": torch.zeros_like(state["wte.weight"]), "h.0.attn.rotary.weight": torch.ones(3)}}
    index, files = write_sharded(tmp_path, model, kind, extra=extra)
    weight_map = json.loads(index.read_text())["weight_map"]
    assert weight_map["wte.weight"] == files[0] and weight_map["ln_f.bias"] == files[1]
    (tmp_path / files[1].replace("00002-of-00002", "00003-of-00003")).write_bytes(b"an old shard, not listed")
    _, loaded = load_checkpoint(tmp_path)
    assert_same_tensors(loaded, state)


def test_tensor_missing_from_the_shard_its_index_names(tmp_path, model):
    index, files = write_sharded(tmp_path, model, "safetensors")
    index_data = json.loads(index.read_text())
    index_data["weight_map"]["wte.weight"] = files[1]  # it is in shard 1 only
    index.write_text(json.dumps(index_data))
    with pytest.raises(ValueError, match=f"maps tensors to shard {files[1]}, which does not hold them: wte.weight"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("entry, message", [
    (3, r"weight_map\['wte.weight'\] must be a shard file name, got 3"),
    (None, r"weight_map\['wte.weight'\] must be a shard file name, got None"),
    (["model-00001-of-00002.safetensors"], r"weight_map\['wte.weight'\] must be a shard file name"),
    ("", r"weight_map\['wte.weight'\] must be a shard file name"),
    ("../outside/model.safetensors", r"'../outside/model.safetensors' is not a path inside the checkpoint directory"),
    ("sub/../../outside/model.safetensors", "is not a path inside the checkpoint directory"),
    ("ABSOLUTE", "is not a path inside the checkpoint directory"),
])
def test_bad_weight_map_entries(tmp_path, model, entry, message):
    # A real shard outside the checkpoint (holding every tensor): a path that leaves the directory must
    # not reach it, even though loading it would succeed.
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({k: t.contiguous() for k, t in canonical(model).items()}, outside / "model.safetensors")
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    index, files = write_sharded(checkpoint, model, "safetensors")
    index_data = json.loads(index.read_text())
    index_data["weight_map"] = {k: str(outside / "model.safetensors") if entry == "ABSOLUTE" else entry
                                for k in index_data["weight_map"]}
    index.write_text(json.dumps(index_data))
    with pytest.raises(ValueError, match=message):
        load_checkpoint(checkpoint)


def test_index_that_names_no_tensor(tmp_path, model):
    index, _ = write_sharded(tmp_path, model, "safetensors", weight_map={})
    with pytest.raises(ValueError, match="'weight_map' must map tensor names to shard files, got {}"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_openai_community_layout_without_prefix_and_with_mask_buffers(tmp_path, model, filename):
    write_checkpoint(tmp_path, model, openai_layout(model), filename)
    _, state = load_checkpoint(tmp_path)
    assert_same_tensors(state, canonical(model))


def test_untied_lm_head_is_kept(tmp_path, model):
    state = openai_layout(model)
    head = torch.randn(model.config.vocab_size, model.config.n_embd)
    state["lm_head.weight"] = head
    write_checkpoint(tmp_path, model, state)
    _, loaded = load_checkpoint(tmp_path)
    assert torch.equal(loaded["lm_head.weight"], head)
    assert torch.equal(loaded["wte.weight"], model.transformer.wte.weight)


def test_dtype_conversion_and_stored_fp16(tmp_path, model):
    model.save_pretrained(tmp_path / "fp32")
    _, state = load_checkpoint(tmp_path / "fp32", dtype=torch.float16)
    assert_same_tensors(state, {k: v.half() for k, v in canonical(model).items()})

    model.half().save_pretrained(tmp_path / "fp16")
    _, state = load_checkpoint(tmp_path / "fp16")  # dtype None keeps what is stored
    assert_same_tensors(state, canonical(model))
    assert all(t.dtype == torch.float16 for t in state.values())


def test_bad_dtype(saved):
    with pytest.raises(TypeError, match="dtype"):
        load_checkpoint(saved, dtype=torch.int32)


# --- in-memory transformers model -------------------------------------------------------------------


def test_load_hf_model_state_shares_storage(model):
    config, state = load_hf_model_state(model)
    assert config == GPT2Config(**SMALL_ODD, bos_token_id=0, eos_token_id=0)
    expected = canonical(model)
    assert_same_tensors(state, expected)
    params = dict(model.named_parameters())
    for name, tensor in state.items():
        assert tensor.data_ptr() == params["transformer." + name].data_ptr(), name
        assert not tensor.requires_grad
    with torch.no_grad():
        model.transformer.ln_f.bias.add_(1.0)  # the views see the model's updates: no copies
    assert torch.equal(state["ln_f.bias"], model.transformer.ln_f.bias)


def test_load_hf_model_state_rejects_other_activations():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SMALL_ODD, activation_function="relu"))
    with pytest.raises(ValueError, match="activation_function"):
        load_hf_model_state(model)


def test_load_hf_model_state_rejects_non_models():
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        load_hf_model_state({"wte.weight": torch.zeros(1)})


# --- random weights and shapes --------------------------------------------------------------------


def test_expected_shapes_of_gpt2_preset():
    shapes = expected_shapes("gpt2")
    config = GPT2Config.preset("gpt2")
    assert len(shapes) == 2 + 12 * 12 + 2
    assert shapes["wte.weight"] == (50257, 768) and shapes["wpe.weight"] == (1024, 768)
    assert shapes["h.11.attn.c_attn.weight"] == (768, 2304) and shapes["h.11.mlp.c_proj.weight"] == (3072, 768)
    assert sum(math.prod(s) for s in shapes.values()) == config.num_parameters == 124_439_808


def test_random_state_dict_gpt2_small_shapes():
    state = random_state_dict("gpt2", seed=0)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_shapes("gpt2")
    validate_state_dict(state, GPT2Config.preset("gpt2"))


def test_random_state_dict_is_seeded_and_initialised_like_hf():
    config = GPT2Config(n_embd=64, n_head=4, n_layer=8, vocab_size=300, n_positions=64)
    a, b, c = random_state_dict(config, seed=1), random_state_dict(config, seed=1), random_state_dict(config, seed=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["wte.weight"], c["wte.weight"])
    assert not torch.equal(a["wte.weight"], a["wpe.weight"][: a["wte.weight"].shape[0]])
    validate_state_dict(a, config)
    for name, tensor in a.items():
        if name.endswith(".bias"):
            assert torch.all(tensor == 0), name
        elif ".ln_" in name or name.startswith("ln_f"):
            assert torch.all(tensor == 1), name
        else:
            std = 0.02 / math.sqrt(2 * 8) if name.endswith("c_proj.weight") else 0.02
            assert abs(tensor.mean().item()) < 0.1 * std, name
            assert tensor.std().item() == pytest.approx(std, rel=0.1), name
    half = random_state_dict(config, seed=1, dtype=torch.float16)
    assert all(half[k].dtype == torch.float16 and torch.equal(half[k], a[k].half()) for k in a)


def test_validate_state_dict_names_every_problem():
    config = GPT2Config(**SMALL_ODD)
    state = random_state_dict(config)
    del state["h.1.ln_2.bias"]
    state["h.0.attn.rotary.weight"] = torch.zeros(3)
    state["h.0.mlp.c_fc.weight"] = torch.zeros(4 * 48, 48)
    state["ln_f.weight"] = torch.ones(48, dtype=torch.int64)
    with pytest.raises(ValueError) as info:
        validate_state_dict(state, config, source="my-weights.pt")
    message = str(info.value)
    assert "my-weights.pt" in message
    assert "missing tensors: h.1.ln_2.bias" in message
    assert "unexpected tensors: h.0.attn.rotary.weight" in message
    assert "h.0.mlp.c_fc.weight has shape (192, 48), expected (48, 192)" in message
    assert "ln_f.weight has dtype torch.int64" in message


# --- errors ---------------------------------------------------------------------------------------


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-checkpoint"):
        load_checkpoint(tmp_path / "no-such-checkpoint")


def test_missing_config_json(saved):
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"{saved}.*config.json"):
        load_checkpoint(saved)


def test_no_weights_file(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights file") as info:
        load_checkpoint(saved)
    assert str(saved) in str(info.value)
    assert "model.safetensors" in str(info.value) and "pytorch_model.bin" in str(info.value)


def test_bad_config_json(saved):
    (saved / "config.json").write_text('{"n_embd": 48,')
    with pytest.raises(ValueError, match="config.json"):
        load_checkpoint(saved)


def test_invalid_config_values(saved):
    values = json.loads((saved / "config.json").read_text()) | {"n_head": 5}
    (saved / "config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match="config.json.*n_embd"):
        load_checkpoint(saved)


def test_truncated_safetensors(saved):
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_checkpoint(saved)


def test_garbage_safetensors_header(saved):
    (saved / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="model.safetensors"):
        load_checkpoint(saved)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not a dict"])
def test_bad_pytorch_bin(tmp_path, model, damage):
    write_checkpoint(tmp_path, model, model.state_dict(), "pytorch_model.bin")
    path = tmp_path / "pytorch_model.bin"
    if damage == "garbage":
        path.write_bytes(b"this is not a checkpoint" * 10)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        torch.save([torch.zeros(2)], path)
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        load_checkpoint(tmp_path)


def test_sharded_index_errors(tmp_path, model):
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = tmp_path / "model.safetensors.index.json"
    index_text = index.read_text()
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_checkpoint(tmp_path)
    index.write_text(index_text[:20])
    with pytest.raises(ValueError, match="model.safetensors.index.json"):
        load_checkpoint(tmp_path)


def test_missing_tensor(tmp_path, model):
    state = openai_layout(model)
    del state["h.1.mlp.c_fc.bias"]
    write_checkpoint(tmp_path, model, state)
    with pytest.raises(ValueError, match=r"model\.safetensors.*missing tensors: h\.1\.mlp\.c_fc\.bias"):
        load_checkpoint(tmp_path)


def test_unexpected_tensor(tmp_path, model):
    state = openai_layout(model) | {"h.0.attn.q_norm.weight": torch.ones(48)}
    write_checkpoint(tmp_path, model, state)
    with pytest.raises(ValueError, match=r"model\.safetensors.*unexpected tensors: h\.0\.attn\.q_norm\.weight"):
        load_checkpoint(tmp_path)


def test_wrongly_shaped_tensor(tmp_path, model):
    state = openai_layout(model)
    state["h.1.attn.c_attn.weight"] = state["h.1.attn.c_attn.weight"].t().contiguous()  # nn.Linear layout
    write_checkpoint(tmp_path, model, state, "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*h\.1\.attn\.c_attn\.weight has shape \(144, 48\), expected \(48, 144\)"):
        load_checkpoint(tmp_path)


def test_tensor_stored_with_and_without_prefix(tmp_path, model):
    state = openai_layout(model) | {"transformer.wte.weight": model.transformer.wte.weight.detach().clone()}
    write_checkpoint(tmp_path, model, state)
    with pytest.raises(ValueError, match="wte.weight twice"):
        load_checkpoint(tmp_path)


# --- hub ids ----------------------------------------------------------------------------------------


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """An empty huggingface_hub cache in offline mode, so that no machine cache or network is involved
    (huggingface_hub reads these variables at import, hence the constants are patched too)."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # so that "gpt2" cannot be a local directory
    return cache


@pytest.mark.parametrize("repo_id", ["gpt2", "openai-community/gpt2-medium"])
def test_hub_id_offline_and_not_cached(empty_hub_cache, repo_id):
    with pytest.raises(FileNotFoundError) as info:
        load_checkpoint(repo_id)
    message = str(info.value)
    assert repo_id in message
    assert "not in the Hugging Face cache" in message and str(empty_hub_cache) in message
    assert "offline" in message
    assert "local checkpoint directory" in message and "save_pretrained" in message


def test_hub_id_found_in_local_cache(empty_hub_cache, model):
    # The huggingface_hub cache layout: models--{owner}--{name}/refs/main names the commit whose files
    # are in snapshots/{commit}/.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_hub_cache / "models--someone--tiny-gpt2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    model.save_pretrained(repo / "snapshots" / commit)
    config, state, directory = load_checkpoint("someone/tiny-gpt2", return_directory=True)
    assert directory == repo / "snapshots" / commit
    assert config.n_embd == 48
    assert_same_tensors(state, canonical(model))
