"""Int8 weight-only quantization: the codes, the int8 model's exactness against fp32 on the
dequantised weights (every backend path), its quality against the fp32 model, and the API's checks."""
import pytest
import torch

from gpt2_engine.api import GPT2
from gpt2_engine.config import GPT2Config
from gpt2_engine.quantization import Int8Weight
from gpt2_engine.weights import random_state_dict

TINY = GPT2Config(vocab_size=97, n_positions=64, n_embd=48, n_layer=2, n_head=3)


def test_codes_are_symmetric_per_output_row_and_round_to_nearest():
    w = torch.randn(6, 40) * torch.logspace(-3, 1, 6)[:, None]   # rows of very different ranges
    w[2] = 0.0
    q = Int8Weight.quantize(w)
    assert q.q.dtype == torch.int8 and q.q.shape == (6, 40) and q.scale.shape == (6,)
    assert int(q.q.abs().max()) == 127 and int(q.q.min()) >= -127
    torch.testing.assert_close(q.scale[[0, 1, 3]], w[[0, 1, 3]].abs().amax(1) / 127)
    assert q.scale[2] == 1 and not q.q[2].any()                  # an all-zero row: codes 0, finite scale
    err = (q.dequantize() - w).abs()
    assert bool((err <= q.scale[:, None] / 2 * (1 + 1e-5)).all())   # round to nearest: half a step at most
    torch.testing.assert_close(q.rows(torch.tensor([3, 0]), torch.float32), q.dequantize()[[3, 0]])


def test_quantize_rejects_what_is_not_a_float_matrix():
    with pytest.raises(ValueError, match="2-D floating-point"):
        Int8Weight.quantize(torch.ones(3, 4, 5))
    with pytest.raises(ValueError, match="2-D floating-point"):
        Int8Weight.quantize(torch.ones(3, 4, dtype=torch.int32))


def _dequantised(state_dict):
    """The fp32 weights an int8 model computes with: every linear and wte rounded through int8."""
    out = dict(state_dict)
    for name, w in state_dict.items():
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):   # Conv1D [in, out]: rows of W^T
            out[name] = Int8Weight.quantize(w.t()).dequantize().t().contiguous()
        elif name == "wte.weight":
            out[name] = Int8Weight.quantize(w).dequantize()
    return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_int8_model_equals_fp32_on_the_dequantised_weights(backend):
    state = {k: v * 8 if k.endswith(".weight") and "ln" not in k else v for k, v in random_state_dict(TINY, seed=3).items()}
    ids = torch.randint(0, TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    int8 = GPT2(TINY, state, backend=backend, quantization="int8")
    reference = GPT2(TINY, _dequantised(state), backend="eager")
    torch.testing.assert_close(int8(ids), reference(ids), rtol=1e-4, atol=1e-4)
    prompt = ids[:1]
    assert torch.equal(int8.generate(prompt, max_new_tokens=6, do_sample=False),
                       reference.generate(prompt, max_new_tokens=6, do_sample=False))   # paged decode too


def test_int8_and_w8a8_quality_on_gpt2_small_shapes():
    """GPT-2 small shape, GPT-2's initialisation: 1,024 positions of two 512-token prompts, each
    quantization against fp32 (w8a8 adds the activations' rounding to int8's)."""
    config = GPT2Config.preset("gpt2")
    state = random_state_dict(config, seed=0)
    ids = torch.randint(0, config.vocab_size, (2, 512), generator=torch.Generator().manual_seed(0))
    fp32 = GPT2(config, state, backend="torch")(ids)
    bounds = {"int8": (0.05, 0.9),    # measured 0.023 / 0.952 (seed 0) and 0.026 / 0.936 (seed 1)
              "w8a8": (0.06, 0.88)}   # measured 0.033 / 0.932 (seed 0)
    for quantization, (max_error, min_top1) in bounds.items():
        logits = GPT2(config, state, backend="torch", quantization=quantization)(ids)
        relative_error = float((logits - fp32).abs().max() / fp32.abs().max())
        top1 = float((logits.argmax(-1) == fp32.argmax(-1)).float().mean())
        print(f"{quantization} vs fp32 over {ids.numel()} positions: max |logit error| / max |logit| = "
              f"{relative_error:.4f}, greedy top-1 agreement = {top1:.4f}")
        assert relative_error < max_error, quantization
        assert top1 > min_top1, quantization   # random GPT-2 logits have small top-1 margins


def test_quantization_argument_is_checked():
    state = random_state_dict(TINY, seed=0)
    with pytest.raises(ValueError, match="quantization must be one of"):
        GPT2(TINY, state, quantization="int4")
    with pytest.raises(ValueError, match="torch or triton backend"):
        GPT2(TINY, state, backend="eager", quantization="int8")
    with pytest.raises(ValueError, match="w8a8' runs on the CPU with the torch backend"):
        GPT2(TINY, state, backend="triton", quantization="w8a8")
    assert GPT2.from_config(TINY, quantization="int8").quantization == "int8"


def test_w8a8_runs_every_linear_on_integer_dot_products():
    model = GPT2(TINY, random_state_dict(TINY, seed=0), backend="torch", quantization="w8a8")
    paged = model.engine.runner.model
    linears = [lin for blk in paged.h for lin in (blk.qkv, blk.attn_proj, blk.fc, blk.mlp_proj)] + [paged.lm_head]
    assert {lin.weight.path.name for lin in linears} == {"w8a8_stream"}
    assert paged.decode_layers is not None
