"""The torch backend's CPU preparations equal the kernels' references they stand in for, on every
GEMM path the load-time probe may choose; the probe picks the fastest candidate and keeps it."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from gpt2_engine import cpu_gemm, torch_backend
from gpt2_engine.api import GPT2
from gpt2_engine.quantization import Int8Weight
from gpt2_engine.kernels.cpu.decode_block import DecodeLayers
from gpt2_engine.kernels.fused_linear import ln_gelu_mlp_ref, ln_linear_ref
from gpt2_engine.kernels.int8_linear import int8_ln_linear_ref
from gpt2_engine.kernels.paged_attention import paged_decode_attention_ref
from tests.engine.no_compiler import without_cpu_kernels
from tests.engine.tiny_models import tiny_hf_model

FP32_PATHS = cpu_gemm.float_candidates(torch.float32)
INT8_PATHS = [*cpu_gemm.int8_candidates(), cpu_gemm.Int8Dequant(chunk_bytes=4 * 72 * 7)]   # 7-row chunks: the multi-chunk loop
EPILOGUES = [(None, True, False), ("gelu_tanh", True, False), (None, False, True)]   # (activation, LayerNorm, residual)


def _inputs(m, k, n, with_ln, with_residual):
    x, b = torch.randn(m, k), torch.randn(n)
    ln = (torch.randn(k), torch.randn(k)) if with_ln else (None, None)
    return x, b, ln, (torch.randn(m, n) if with_residual else None)


def test_every_machine_has_a_plain_blas_path():
    assert {"matmul_in_out", "matmul_out_in"} <= {p.name for p in FP32_PATHS}
    assert any(isinstance(p, cpu_gemm.Int8Dequant) for p in INT8_PATHS)


def _fp32_layer(path, k, n):
    w = torch.randn(k, n) / 8                                   # Conv1D layout [in, out]
    return cpu_gemm.CpuLinear(path, path.prepare(w.t()), k, n), lambda x, *a, **kw: ln_linear_ref(x, *a[:2], w, *a[2:], **kw)


def _int8_layer(path, k, n):
    w = Int8Weight.quantize(torch.randn(n, k) / 8)
    return cpu_gemm.CpuLinear(path, path.prepare(w), k, n), lambda x, *a, **kw: int8_ln_linear_ref(x, *a[:2], w.q, w.scale, *a[2:], **kw)


@pytest.mark.parametrize("path,make", [(p, _fp32_layer) for p in FP32_PATHS] + [(p, _int8_layer) for p in INT8_PATHS],
                         ids=lambda v: getattr(v, "name", ""))
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("activation,with_ln,with_residual", EPILOGUES)
def test_paths_equal_their_reference(path, make, m, activation, with_ln, with_residual):
    """fp32 paths equal ln_linear_ref, int8 paths int8_ln_linear_ref."""
    k, n = 72, 100
    x, b, ln, residual = _inputs(m, k, n, with_ln, with_residual)
    layer, reference = make(path, k, n)
    got = torch_backend.ln_linear(x, *ln, layer, b, activation=activation, residual=residual)
    torch.testing.assert_close(got, reference(x, *ln, b, activation=activation, residual=residual), rtol=1e-5, atol=1e-5)


def test_mlp_and_kv_write_equal_the_references():
    c, m = 64, 5
    x = torch.randn(m, c)
    params = [torch.randn(c), torch.randn(c), torch.randn(c, 4 * c) / 8, torch.randn(4 * c), torch.randn(4 * c, c) / 16, torch.randn(c)]
    fc = cpu_gemm.prepare_linear(params[2].t(), cpu_gemm.Epilogue(bias=True, gelu=True))
    proj = cpu_gemm.prepare_linear(params[4].t(), cpu_gemm.Epilogue(bias=True, residual=True))
    prepared = params[:2] + [fc, params[3], proj, params[5]]
    torch.testing.assert_close(torch_backend.ln_gelu_mlp(x, *prepared), ln_gelu_mlp_ref(x, *params), rtol=1e-5, atol=1e-5)
    w = torch.randn(c, 3 * c) / 8
    caches = [torch.full((4, 4, 4, 16), float("nan")) for _ in range(2)]
    slots = torch.tensor([3, -1, 9, 0, 15])
    ref_caches = [t.clone() for t in caches]
    qkv = torch_backend.ln_linear(x, None, None, cpu_gemm.prepare_linear(w.t(), cpu_gemm.Epilogue()), None, kv_cache=(*caches, slots))
    ln_linear_ref(x, None, None, w, None, kv_cache=(*ref_caches, slots))
    torch.testing.assert_close(qkv, x @ w, rtol=1e-5, atol=1e-5)
    for got, want in zip(caches, ref_caches):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)


class _Slow(cpu_gemm.Blas):
    """A correct path made slower than any real one by a 20 ms sleep per call."""

    def __init__(self):
        super().__init__("in_out")
        self.name = "slow"

    def __call__(self, *args):
        time.sleep(0.02)
        return super().__call__(*args)


def test_the_probe_keeps_the_fastest_candidate_per_shape(monkeypatch):
    monkeypatch.setattr(cpu_gemm, "llc_bytes", lambda: 0)   # one weight copy per candidate: a short probe
    fast, slow = cpu_gemm.Blas("out_in"), _Slow()
    w = torch.randn(24, 40)
    layer = cpu_gemm.prepare_linear(w, cpu_gemm.Epilogue(bias=True), candidates=[slow, fast])
    assert layer.path is fast and (layer.in_features, layer.out_features) == (40, 24)
    assert cpu_gemm.chosen_paths()["40x24 bias torch.float32"] == "matmul_out_in"
    again = cpu_gemm.prepare_linear(torch.randn(24, 40), cpu_gemm.Epilogue(bias=True), candidates=[slow, fast])
    assert again.path is fast   # the cached choice: no second probe needed, the same path for the same key


def test_probe_choices_persist_for_later_processes(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_gemm, "llc_bytes", lambda: 0)
    monkeypatch.setenv("GPT2_ENGINE_CACHE_DIR", str(tmp_path))
    fast, slow = cpu_gemm.Blas("out_in"), _Slow()

    def new_process_prepares(probe=cpu_gemm._probe):
        monkeypatch.setattr(cpu_gemm, "_CHOICES", {})          # only the file remembers
        monkeypatch.setattr(cpu_gemm, "_probe", probe)
        return cpu_gemm.prepare_linear(torch.randn(24, 40), cpu_gemm.Epilogue(), candidates=[slow, fast]).path

    def no_probe(*args):
        raise AssertionError("probed although the cache file has the choice")

    assert new_process_prepares() is fast
    stored = json.loads(cpu_gemm.cache_file().read_text())
    assert list(stored.values()) == ["matmul_out_in"] and next(iter(stored)).startswith("40x24 plain torch.float32")
    assert new_process_prepares(no_probe) is fast
    cpu_gemm.cache_file().write_text("{not json")             # corrupt: probed again and rewritten
    assert new_process_prepares() is fast and json.loads(cpu_gemm.cache_file().read_text()) == stored
    monkeypatch.setenv("GPT2_ENGINE_CACHE_DIR", "off")
    assert cpu_gemm.cache_file() is None and new_process_prepares() is fast


def test_the_cpu_signature_is_the_same_in_every_process():
    """It keys the persisted choices: nothing in it may vary per process (e.g. Python's salted str hash)."""
    code = "from gpt2_engine.cpu_gemm import cpu_signature; print(cpu_signature())"
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")]
    assert runs[0] == runs[1] == cpu_gemm.cpu_signature() + "\n"


def test_paged_attention_reuses_its_index_only_for_the_same_unchanged_tensors():
    k_cache, v_cache = torch.randn(8, 4, 2, 16), torch.randn(8, 4, 2, 16)
    q = torch.randn(2, 2, 16)
    tables = torch.tensor([[5, 1, 0], [2, 7, 3]], dtype=torch.int32)
    lens = torch.tensor([9, 5], dtype=torch.int32)
    attention = torch_backend.PagedDecodeAttention()
    for _ in range(2):  # the second call reuses the index
        torch.testing.assert_close(attention(q, k_cache, v_cache, tables, lens), paged_decode_attention_ref(q, k_cache, v_cache, tables, lens))
    lens[0] = 12                       # edited in place: the index must be rebuilt
    tables[1, 0] = 6
    torch.testing.assert_close(attention(q, k_cache, v_cache, tables, lens), paged_decode_attention_ref(q, k_cache, v_cache, tables, lens))
    other = torch.tensor([[4, 6, 0], [1, 2, 5]], dtype=torch.int32)   # a new step's tables
    torch.testing.assert_close(attention(q, k_cache, v_cache, other, lens), paged_decode_attention_ref(q, k_cache, v_cache, other, lens))


def test_without_a_compiler_the_cpu_path_falls_back_to_the_libraries(monkeypatch, tmp_path):
    """No C++ compiler: one warning, no streaming candidates, decode attention on the gather path, and
    a model still generates the same tokens as with the C++ kernels."""
    hf = tiny_hf_model()
    prompt = torch.tensor([[5, 7, 11, 13]])
    with_kernels = GPT2.from_hf(hf, backend="torch").generate(prompt, max_new_tokens=6, do_sample=False)
    with without_cpu_kernels(monkeypatch, tmp_path):
        assert not any(isinstance(p, cpu_gemm.Streaming) for p in cpu_gemm.float_candidates(torch.float32))
        assert isinstance(torch_backend.decode_attention(torch.device("cpu"), torch.float32), torch_backend.PagedDecodeAttention)
        without = GPT2.from_hf(hf, backend="torch").generate(prompt, max_new_tokens=6, do_sample=False)
        assert torch.equal(without, with_kernels)


@pytest.mark.parametrize("quantization", [None, "int8", "w8a8"])
def test_fused_decode_layers_equal_the_op_by_op_steps_bitwise(monkeypatch, quantization):
    """Every linear on the streaming GEMM: decode-only steps run all blocks and the LM head as one C++ call.
    Its scores (full-vocabulary logits of every step, batch of mixed prompt lengths) equal the op-by-op
    path's bitwise."""
    monkeypatch.setattr(cpu_gemm, "float_candidates", lambda dtype: [cpu_gemm.Streaming("float")])
    monkeypatch.setattr(cpu_gemm, "int8_candidates", lambda: (cpu_gemm.Streaming("int8"),))
    model = GPT2.from_hf(tiny_hf_model(), backend="torch", quantization=quantization)
    paged = model.engine.runner.model
    assert paged.decode_layers is not None and len(paged.decode_layers.blocks) == len(paged.h)
    assert paged.decode_layers.lm_head is not None
    prompts = torch.tensor([[5, 7, 11, 13, 17, 19], [0, 0, 0, 23, 29, 31]])
    mask = (prompts != 0).long()

    def scores():
        out = model.generate(prompts, attention_mask=mask, max_new_tokens=8, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=0)
        return out.sequences, torch.stack(out.scores)

    fused_tokens, fused_scores = scores()
    fused = paged.decode_layers
    paged.decode_layers = DecodeLayers(fused.blocks, fused.heads, fused.eps)    # the blocks only, the head op by op
    blocks_tokens, blocks_scores = scores()
    paged.decode_layers = None
    tokens, op_scores = scores()
    assert torch.equal(fused_tokens, tokens) and torch.equal(fused_scores, op_scores)
    assert torch.equal(blocks_tokens, tokens) and torch.equal(blocks_scores, op_scores)
    kv_cache = torch.zeros(len(paged.h), 2, 4, 16, 3, 16)
    step_inputs = (torch.randn(1, 48), kv_cache, torch.tensor([0]), torch.tensor([[0]], dtype=torch.int32))
    with pytest.raises(ValueError, match="sequence 0"):
        fused(*step_inputs, torch.tensor([17], dtype=torch.int32))
    with pytest.raises(ValueError, match="slot_mapping"):
        fused(*step_inputs[:2], torch.tensor([64]), step_inputs[3], torch.tensor([1], dtype=torch.int32))
    with pytest.raises(ValueError, match="kv_cache must be contiguous"):
        fused(step_inputs[0], kv_cache[:1], *step_inputs[2:], torch.tensor([1], dtype=torch.int32))
    assert torch.equal(kv_cache, torch.zeros_like(kv_cache))     # bad input: nothing written
