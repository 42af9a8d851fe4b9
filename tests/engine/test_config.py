"""GPT2Config: presets, HF config.json parsing, and validation that names the field."""
import json

import pytest
import torch
import transformers

from gpt2_engine.config import PRESETS, GPT2Config


@pytest.mark.parametrize("name,n_embd,n_layer,n_head", [
    ("gpt2", 768, 12, 12), ("gpt2-medium", 1024, 24, 16), ("gpt2-large", 1280, 36, 20), ("gpt2-xl", 1600, 48, 25),
])
def test_presets_have_openai_shapes_and_transformers_parameter_counts(name, n_embd, n_layer, n_head):
    config = GPT2Config.preset(name)
    assert (config.n_embd, config.n_layer, config.n_head, config.head_dim) == (n_embd, n_layer, n_head, 64)
    assert GPT2Config.preset("openai-community/" + name) == config
    if name == "gpt2":  # building the larger HF models just to count is slow; the formula is shared
        hf = transformers.GPT2Model(transformers.GPT2Config(**config.to_hf_dict()))
        assert config.num_parameters == sum(p.numel() for p in hf.parameters())


def test_from_hf_config_json_round_trip(tmp_path):
    hf_config = transformers.GPT2Config(vocab_size=321, n_positions=77, n_embd=96, n_layer=3, n_head=4, layer_norm_epsilon=1e-6)
    hf_config.save_pretrained(tmp_path)
    config = GPT2Config.from_json_file(tmp_path / "config.json")
    assert (config.vocab_size, config.n_positions, config.n_embd, config.n_layer, config.n_head) == (321, 77, 96, 3, 4)
    assert config.layer_norm_epsilon == 1e-6 and config.head_dim == 24


@pytest.mark.parametrize("field,value", [
    ("n_embd", 0), ("n_layer", -1), ("n_head", 0), ("vocab_size", 2.5), ("n_positions", True), ("layer_norm_epsilon", 0.0),
])
def test_non_positive_sizes_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        GPT2Config(**{field: value})


def test_indivisible_heads_and_other_activations_raise():
    with pytest.raises(ValueError, match="n_embd .* divisible by n_head"):
        GPT2Config(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="activation_function"):
        GPT2Config.from_dict({"activation_function": "relu"})


@pytest.mark.parametrize("values,message", [
    ({"model_type": "llama"}, "model_type"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"scale_attn_weights": False}, "scale_attn_weights"),
    ({"add_cross_attention": True}, "add_cross_attention"),
    ({"n_embd": 64, "n_head": 4, "n_inner": 100}, "n_inner"),
])
def test_hf_options_that_change_the_math_are_rejected(values, message):
    with pytest.raises(ValueError, match=message):
        GPT2Config.from_dict(values)


def test_bad_config_files_raise_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT2Config.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        GPT2Config.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="JSON object"):
        GPT2Config.from_json_file(tmp_path / "config.json")


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="gpt2-medium"):
        GPT2Config.preset("gpt5")
    assert set(PRESETS) == {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"}


@pytest.mark.parametrize("value, eos", [
    ([], None), (None, None), (50256, 50256), ([7], 7), ([7, 9], (7, 9)),
])
def test_eos_token_id_forms_of_config_json(tmp_path, value, eos):
    """HF's config.json: an id, a list of ids (each one ends a sequence), or null / [] for no EOS."""
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": value}))
    config = GPT2Config.from_json_file(tmp_path / "config.json")
    assert config.eos_token_id == eos
    assert transformers.GPT2Config(**config.to_hf_dict()).eos_token_id == (list(eos) if isinstance(eos, tuple) else eos)


@pytest.mark.parametrize("value", [-1, True, 2.5, "50256", ["a"], [1, None], ()])
def test_bad_eos_token_id_names_the_field(value):
    with pytest.raises(ValueError, match="eos_token_id"):
        GPT2Config(eos_token_id=value)


def test_a_model_without_eos_generates_to_the_length_limit(tmp_path):
    """eos_token_id [] is no EOS: generation never stops early. With the first greedy token as EOS it
    stops after that token; with [] the same model runs all max_new_tokens."""
    from gpt2_engine import GPT2
    from tests.engine.tiny_models import tiny_hf_model

    tiny_hf_model().save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").unlink()  # its eos_token_id would take precedence over config.json's
    values = json.loads((tmp_path / "config.json").read_text())
    ids = torch.tensor([[5, 17, 3, 42]])
    first = int(GPT2.from_pretrained(tmp_path, device="cpu").generate(ids, max_new_tokens=1, pad_token_id=0)[0, -1])
    lengths = {}
    for eos in ([first], []):
        (tmp_path / "config.json").write_text(json.dumps(values | {"eos_token_id": eos}))
        out = GPT2.from_pretrained(tmp_path, device="cpu").generate(ids, max_new_tokens=6, pad_token_id=0)
        lengths[len(eos)] = out.shape[1] - ids.shape[1]  # one sequence: no padding after its EOS
    assert lengths == {1: 1, 0: 6}
