"""The int8 weight-only GEMM (Triton's interpreter on CPU): the LayerNorm folded before quantizing,
parity on GPT-2-like activations against an fp64 reference of the same int8 weights (split-K and
unsplit), rows bitwise independent of the batch, the plain (no-LN) form, the KV write, the LM head's
padded rows, and the argument checks.

Tolerances as in test_fused_linear.py: fp32 within 1e-5 of the reference's max magnitude; fp16 by
the 2x rule (the kernel's max error against fp64 at most twice that of torch's own fp16 LayerNorm +
matmul on the same dequantised weights, plus a floor of 1e-5 of the magnitude). bf16 dots do not run
under the interpreter: bf16 parity is the cuda-marked test."""
import pytest
import torch
import torch.nn.functional as F

from gpt2_engine.quantization import Int8Weight
from gpt2_engine.kernels.int8_linear import FoldedInt8Linear, fold_layernorm_int8, int8_ln_linear, int8_ln_linear_ref
from gpt2_engine.kernels.launch_plan import gemm_plan
from tests.kernels.test_fused_linear import _gpt2_like, _poisoned, few_sms  # noqa: F401 (fixture: plans for 8 SMs)

EPS = 1e-5
FP32_RTOL = 1e-5
FLOOR = 1e-5


def _layer(K, N, device, seed=0):
    """A GPT-2-like LayerNorm + linear: gamma around 1, small beta, W [K, N] scaled by 1/sqrt(K)."""
    g = torch.Generator().manual_seed(seed)
    gamma = 1 + 0.2 * torch.randn(K, generator=g)
    beta = 0.1 * torch.randn(K, generator=g)
    weight = torch.randn(K, N, generator=g) / K ** 0.5
    bias = 0.1 * torch.randn(N, generator=g)
    return tuple(t.to(device) for t in (gamma, beta, weight, bias))


def _folded(K, N, device, seed=0):
    return fold_layernorm_int8(*_layer(K, N, device, seed))


def _ref64(x, folded, *, activation=None, residual=None):
    """LN(x) @ dequant(W')^T + b' (then GELU, + residual) in fp64: the exact value of the contract."""
    h = x.double()
    var, mean = torch.var_mean(h, dim=-1, keepdim=True, correction=0)
    w = folded.q.double() * folded.scale.double()[:, None]                       # [N, K]
    y = (h - mean) * torch.rsqrt(var + EPS) @ w.t() + folded.bias.double()
    y = F.gelu(y, approximate="tanh") if activation == "gelu_tanh" else y
    return y + residual.double() if residual is not None else y


def _torch_lowp(x, folded, *, activation=None, residual=None):
    """The same computation as torch runs it in x's dtype (the 2x rule's yardstick)."""
    h = F.layer_norm(x, (x.shape[1],), eps=EPS)
    y = h @ (folded.q.float() * folded.scale[:, None]).to(x.dtype).t() + folded.bias.to(x.dtype)
    y = F.gelu(y, approximate="tanh") if activation == "gelu_tanh" else y
    return y + residual if residual is not None else y


def _check(y, x, folded, **kwargs):
    ref = _ref64(x, folded, **kwargs)
    assert not torch.isnan(y).any()
    scale = ref.abs().max().item()
    err = (y.double() - ref).abs().max().item()
    if y.dtype == torch.float32:
        assert err <= FP32_RTOL * scale, f"fp32 max err {err:.3g} > {FP32_RTOL} x {scale:.3g}"
    else:
        err_torch = (_torch_lowp(x, folded, **kwargs).double() - ref).abs().max().item()
        assert err <= 2 * err_torch + FLOOR * scale, f"{y.dtype} max err {err:.3g} > 2 x torch's {err_torch:.3g} + floor"


# (C, M, N): GPT-2 widths as K (narrow N keeps the interpreter quick) and odd widths; M = 300 runs
# the unsplit tile, N = 2048 on 8 SMs fills the device without a split
FOLD_CASES = [(768, 1, 48), (1024, 3, 40), (1280, 1, 32), (1600, 2, 48), (100, 5, 40), (333, 17, 24), (1111, 1, 56),
              (768, 70, 32), (96, 300, 40), (768, 1, 2048)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("C,M,N", FOLD_CASES)
def test_folded_int8_gpt2_activations(C, M, N, dtype, device, few_sms):
    folded = _folded(C, N, device, seed=C + M)
    x = _gpt2_like(M, C, device, seed=C * M).to(dtype)
    split = gemm_plan(M, N, C, dtype, 90, 8, int8=True).split
    assert (split > 1) == (M <= 256 and N < 2048)   # split-K at decode unless the columns fill the GPU
    y = int8_ln_linear(x, None, None, folded, out=_poisoned(M, N, dtype, device))
    _check(y, x, folded)


@pytest.mark.parametrize("M", [1, 17, 300])
def test_folded_int8_gelu_and_residual_epilogues(M, device, few_sms):
    K, N = 256, 40
    folded = _folded(K, N, device, seed=M)
    x = _gpt2_like(M, K, device, seed=M).half()
    y = int8_ln_linear(x, None, None, folded, activation="gelu_tanh")
    _check(y, x, folded, activation="gelu_tanh")
    residual = torch.randn(M, N, device=device).half()
    plain = Int8Weight(folded.q, folded.scale)   # the c_proj form: no LayerNorm, bias + residual
    bias = torch.randn(N, device=device).half()
    y = int8_ln_linear(x, None, None, plain.q, plain.scale, bias, residual=residual)
    torch.testing.assert_close(y, int8_ln_linear_ref(x, None, None, plain.q, plain.scale, bias, residual=residual),
                               rtol=1e-2, atol=1e-2)


def test_fold_quantizes_the_folded_weight(device):
    gamma, beta, weight, bias = _layer(200, 24, device, seed=5)
    folded = fold_layernorm_int8(gamma, beta, weight.half(), bias)   # any float weight dtype: folded in fp32
    w32 = weight.half().float()
    codes = Int8Weight.quantize((w32 * gamma[:, None]).t())
    assert isinstance(folded, FoldedInt8Linear) and folded.q.dtype == torch.int8 and folded.q.shape == (24, 200)
    assert torch.equal(folded.q, codes.q) and torch.equal(folded.scale, codes.scale)
    torch.testing.assert_close(folded.colsum, (codes.q.double().sum(1) * codes.scale.double()).float(), rtol=0, atol=0)
    torch.testing.assert_close(folded.bias, beta @ w32 + bias)
    # the fold is LN(x) @ W + b up to the int8 rounding (relative ~1% here; a misplaced gamma or beta is O(1))
    x = _gpt2_like(6, 200, device, seed=5)
    exact = F.layer_norm(x.double(), (200,), gamma.double(), beta.double(), EPS) @ w32.double() + bias.double()
    assert (_ref64(x, folded) - exact).abs().max() <= 0.03 * exact.abs().max()


def test_rows_are_bitwise_independent_of_the_batch(device, few_sms):
    """A row's output is the same bits whatever M it is batched in: the K split and the moment merges
    are planned from (K, N, dtype) only, for the 16-row (M <= 64) and 64-row (M <= 256) tiles alike."""
    K, N = 768, 64
    folded = _folded(K, N, device, seed=7)
    x = _gpt2_like(256, K, device, seed=7).half()
    plans = {M: gemm_plan(M, N, K, torch.float16, 90, 8, int8=True) for M in (1, 8, 64, 65, 256)}
    assert len({(p.split, p.k_per_split, p.tile.block_n, p.tile.block_k) for p in plans.values()}) == 1
    assert plans[1].split > 1 and plans[1].tile.block_m != plans[256].tile.block_m
    full = int8_ln_linear(x, None, None, folded, activation="gelu_tanh")
    for M in (1, 8, 64, 65):
        assert torch.equal(int8_ln_linear(x[:M], None, None, folded, activation="gelu_tanh"), full[:M]), M


@pytest.mark.parametrize("M", [4, 300])   # split-K and unsplit
def test_kv_columns_are_written_to_the_paged_cache(M, device):
    heads, dim = 2, 16
    C = heads * dim
    folded = _folded(C, 3 * C, device, seed=M)
    x = _gpt2_like(M, C, device, seed=M)
    slots = torch.randperm(2 * M)[:M]
    slots[::3] = -1
    slots = slots.to(device)
    num_blocks = -(-2 * M // 4)
    caches = [torch.zeros(num_blocks, 4, heads, dim, device=device) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    y = int8_ln_linear(x, None, None, folded, kv_cache=(*caches, slots))
    y_ref = int8_ln_linear_ref(x, None, None, folded, kv_cache=(*ref_caches, slots))
    _check(y, x, folded)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(caches, ref_caches):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    written = torch.zeros(num_blocks * 4, dtype=torch.bool)
    written[slots[slots >= 0].cpu()] = True
    for cache in caches:   # exactly the slotted rows (padding rows, slot -1, skip)
        rows = cache.flatten(0, 1).cpu()
        assert rows[written].abs().sum(dim=(1, 2)).gt(0).all() and not rows[~written].any()


def test_lm_head_rows_are_padded_for_vector_stores(device, few_sms):
    M, K, N = 2, 64, 1001
    folded = fold_layernorm_int8(*_layer(K, N, device)[:3])   # the LM head: no bias
    x = _gpt2_like(M, K, device, seed=1)
    y = int8_ln_linear(x, None, None, folded)
    assert y.shape == (M, N) and y.stride() == (1008, 1)
    assert torch.equal(y.as_strided((M, 1008), (1008, 1))[:, N:], torch.zeros(M, 7, device=device))
    _check(y, x, folded)


def test_the_plain_reference_is_the_dequantised_linear(device):
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(3, 40, generator=g).to(device), Int8Weight.quantize(torch.randn(24, 40, generator=g).to(device))
    bias = torch.randn(24, device=device)
    torch.testing.assert_close(int8_ln_linear_ref(x, None, None, w.q, w.scale, bias), x @ w.dequantize().t() + bias,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(int8_ln_linear(x, None, None, w.q, w.scale, bias), x @ w.dequantize().t() + bias,
                               rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_rejected_with_a_clear_error(device):
    x = torch.randn(2, 32, device=device)
    gamma, beta, weight, bias = _layer(32, 16, device)
    w = Int8Weight.quantize(weight.t())
    folded = fold_layernorm_int8(gamma, beta, weight, bias)
    with pytest.raises(TypeError, match="int8"):
        int8_ln_linear(x, None, None, w.q.float(), w.scale)
    with pytest.raises(ValueError, match="K=32"):
        int8_ln_linear(x, None, None, w.q[:, :16], w.scale)
    with pytest.raises(ValueError, match="scale"):
        int8_ln_linear(x, None, None, w.q, w.scale[:3])
    with pytest.raises(TypeError, match="scale"):
        int8_ln_linear(x, None, None, w.q, None)
    with pytest.raises(ValueError, match="fold_layernorm_int8"):
        int8_ln_linear(x, gamma, beta, w.q, w.scale)
    with pytest.raises(ValueError, match="FoldedInt8Linear"):
        int8_ln_linear(x, None, None, folded, None, bias)
    with pytest.raises(ValueError, match="contiguous rows"):
        int8_ln_linear(x, None, None, torch.zeros(32, 16, dtype=torch.int8, device=device).t(), w.scale)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,C", [(1, 768), (16, 1600), (100, 1024), (1024, 768)])
def test_folded_int8_on_gpu(M, C, dtype, device):
    for N, activation in ((3 * C, None), (4 * C, "gelu_tanh")):
        folded = _folded(C, N, device, seed=M)
        x = _gpt2_like(M, C, device, seed=M).to(dtype)
        _check(int8_ln_linear(x, None, None, folded, activation=activation), x, folded, activation=activation)


def test_engine_folds_every_layernorm_into_int8_codes():
    """The triton backend's int8 model: ln_1 / ln_2 / ln_f folded into c_attn / c_fc / the LM head
    (FoldedInt8Linear), c_proj plain codes, and its logits within int8 rounding of the fp32 model on
    LayerNorms that are not the identity."""
    from gpt2_engine.api import GPT2
    from gpt2_engine.config import GPT2Config
    from gpt2_engine.model import PagedGPT2
    from gpt2_engine.weights import random_state_dict

    config = GPT2Config(vocab_size=97, n_positions=32, n_embd=48, n_layer=2, n_head=3)
    g = torch.Generator().manual_seed(0)
    state = {k: (1 + 0.3 * torch.randn(v.shape, generator=g)) if ".ln" in k or k.startswith("ln_f") else v
             for k, v in random_state_dict(config, seed=1).items()}
    state = {k: v + 0.1 * torch.randn(v.shape, generator=g) if k.endswith("ln_1.bias") or k == "ln_f.bias" else v
             for k, v in state.items()}
    model = PagedGPT2(config, state, backend="triton", quantization="int8")
    blk = model.h[0]
    assert all(isinstance(w, FoldedInt8Linear) for w in (blk.qkv.weight, blk.fc.weight, model.lm_head.weight))
    assert blk.qkv.ln_weight is None and model.lm_head.ln_weight is None and isinstance(blk.attn_proj.weight, Int8Weight)
    ids = torch.randint(0, config.vocab_size, (2, 7), generator=g)
    int8 = GPT2(config, state, backend="triton", quantization="int8")(ids)
    fp32 = GPT2(config, state, backend="eager")(ids)
    assert (int8 - fp32).abs().max() <= 0.03 * fp32.abs().max()
