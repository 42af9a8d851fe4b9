"""dtype="bf16" / "fp16" on CPU (torch backend): the weights are stored in 16 bits and streamed by our
GEMM, widened to fp32 in registers, except bf16 where the CPU has AVX512-BF16: there each linear's
input is rounded to bf16 too and multiplied by vdpbf16ps (as torch's bf16 matmul rounds it). The
residual stream, LayerNorm, attention and the KV cache stay fp32. So the model computes what fp32
arithmetic on the 16-bit-rounded weights (and, with bf16 dot products, the bf16-rounded linear inputs)
gives: transformers in fp32 on those rounded values is the reference, and the error against the fp32
model is the rounding's own."""
import copy

import pytest
import torch

from gpt2_engine import cpu_gemm, torch_backend
from gpt2_engine.api import GPT2
from tests.engine.no_compiler import without_cpu_kernels
from tests.engine.tiny_models import tiny_hf_model

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PROMPTS = torch.tensor([[5, 7, 11, 13, 17, 19, 23, 29], [31, 37, 41, 43, 47, 53, 59, 61], [2, 3, 2, 3, 2, 3, 2, 3]])


def _rounded(hf, dtype):
    """transformers' model with every parameter rounded to `dtype`, computing in fp32; where our bf16
    linears run as bf16 dot products, each linear's input rounded to bf16 as well."""
    rounded = copy.deepcopy(hf)
    with torch.no_grad():
        for parameter in rounded.parameters():
            parameter.copy_(parameter.to(dtype).float())
    if dtype == torch.bfloat16 and cpu_gemm.bf16_dot_products():
        linears = [rounded.lm_head] + [m for m in rounded.modules() if type(m).__name__ == "Conv1D"]
        assert len(linears) == 1 + 4 * hf.config.n_layer
        for linear in linears:
            linear.register_forward_pre_hook(lambda module, args: (args[0].bfloat16().float(), *args[1:]))
    return rounded


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model(vocab_size=211, n_embd=96, n_layer=3, n_head=4, n_positions=96, init=0.3)


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_16_bit_weights_stream_with_fp32_activations(hf, name):
    model = GPT2.from_hf(hf, backend="torch", dtype=name)
    paged = model.engine.runner.model
    assert model.dtype == DTYPES[name] and paged.weight_dtype == DTYPES[name]
    assert paged.dtype == torch.float32 and model.engine.runner.kv_cache.dtype == torch.float32
    linears = [paged.lm_head] + [linear for block in paged.h for linear in vars(block).values()]
    assert all(isinstance(linear.weight.path, cpu_gemm.Streaming) and linear.weight.weight.blocks.dtype == DTYPES[name]
               for linear in linears)
    dot = name == "bf16" and cpu_gemm.bf16_dot_products()    # bf16 dot products where the CPU has AVX512-BF16
    assert {linear.weight.weight.format for linear in linears} == {5 if dot else 2 if name == "bf16" else 3}
    assert paged.decode_layers is not None     # every linear streams: decode steps run all blocks in one call


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_logits_are_fp32_arithmetic_on_the_rounded_weights(hf, name):
    """Against transformers in fp32 on the same rounded weights: equal to fp32 summation order (the
    bound below is ~100x that rounding noise here, and ~1/20 of the rounding's own effect); against
    the fp32 model: within the error the rounding itself causes (transformers on rounded weights vs
    transformers on the originals), plus that summation noise."""
    with torch.no_grad():
        reference = _rounded(hf, DTYPES[name])(PROMPTS).logits
        exact = hf(PROMPTS).logits
    got = GPT2.from_hf(hf, backend="torch", dtype=name)(PROMPTS)
    assert got.dtype == torch.float32
    noise = (got - reference).abs().max().item()
    rounding_error = (reference - exact).abs().max().item()
    # With bf16 dot products the linears' inputs are rounded to bf16: an input an fp32 rounding away
    # from a bf16 tie (its LayerNorm summed in another order) rounds the other way than in the
    # reference, moving by a bf16 ulp, so the noise is that of a few such flips, not fp32's alone.
    dot = name == "bf16" and cpu_gemm.bf16_dot_products()
    assert noise <= (2e-3 if dot else 2e-4) * reference.abs().max().item()
    assert noise < rounding_error / 20
    assert (got - exact).abs().max().item() <= rounding_error + noise


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_greedy_tokens_equal_transformers_on_the_rounded_weights(hf, name):
    rounded = _rounded(hf, DTYPES[name])
    expected = rounded.generate(PROMPTS, attention_mask=torch.ones_like(PROMPTS), max_new_tokens=24, do_sample=False,
                                pad_token_id=0)
    got = GPT2.from_hf(hf, backend="torch", dtype=name).generate(PROMPTS, max_new_tokens=24, do_sample=False)
    assert torch.equal(got, expected)


def test_without_a_compiler_16_bit_weights_run_in_16_bit_through_torch(hf, monkeypatch, tmp_path):
    """No C++ kernels: compute_dtype falls back to the weights' dtype (torch's bf16 ops), and the model
    still generates."""
    with without_cpu_kernels(monkeypatch, tmp_path):
        assert torch_backend.compute_dtype(torch.device("cpu"), torch.bfloat16) == torch.bfloat16
        model = GPT2.from_hf(hf, backend="torch", dtype="bf16")
        assert model.engine.runner.model.dtype == torch.bfloat16
        assert model.generate(PROMPTS[:1], max_new_tokens=4).shape == (1, PROMPTS.shape[1] + 4)
