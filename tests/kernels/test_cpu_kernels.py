"""The C++ CPU kernels (kernels/cpu): the streaming GEMM (every weight format, w8a8's integer dot
products and bf16 dot products included) and paged decode attention equal their torch references, are bitwise batch- and
thread-count-invariant (their thread pool too: concurrent callers, more threads than cores, a forked
child), and reject bad input by name; the build is reused across calls and fails with a clear error
where no compiler runs."""
import concurrent.futures
import itertools
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from gpt2_engine.kernels import cpu as cpu_kernels
from gpt2_engine.kernels.cpu import paged_attention as cpu_attention
from gpt2_engine.cpu_gemm import PREFETCH_DISTANCES
from gpt2_engine.kernels.cpu import stream_gemm
from gpt2_engine.kernels.paged_attention import paged_decode_attention_ref, write_kv_ref

# Users without a compiler get the library fallback (tested in test_torch_backend); CI has one, so
# there a missing compiler fails these tests instead of skipping them.
pytestmark = pytest.mark.skipif(shutil.which("g++") is None and not os.environ.get("CI"),
                                reason="no C++ compiler on this machine")


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cpu-kernels")


@pytest.fixture(scope="module")
def lib(build_dir):
    return cpu_kernels.library(build_dir)


def _reference(x, w, bias=None, activation=None, residual=None, layer_norm=None):
    """fp64 torch of what stream_linear computes (w: the dequantised [out, in] weight)."""
    h = x.double()
    if layer_norm is not None:
        h = F.layer_norm(h, (h.shape[-1],), layer_norm[0].double(), layer_norm[1].double(), layer_norm[2])
    y = h @ w.double().t() + (bias.double() if bias is not None else 0)
    if activation:
        y = F.gelu(y, approximate="tanh")
    return (y + residual.double() if residual is not None else y).float()


WEIGHT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8]


def _codes(w):
    """Symmetric per-row int8 codes of w [out, in] and their scales."""
    scale = w.abs().amax(1) / 127
    return torch.round(w / scale[:, None]).to(torch.int8), scale


def _weights(n, k, dtype):
    """(the weight's exact fp32 values [out, in], pack()'s arguments) for a weight stored in `dtype`."""
    w = torch.randn(n, k) / k ** 0.5
    if dtype != torch.int8:
        stored = w.to(dtype)
        return stored.float(), (stored,)
    q, scale = _codes(w)
    return q.float() * scale[:, None], (q, scale)


def _w8a8_reference(x, q, scale):
    """What w8a8 computes without an epilogue, exactly: x's rows quantized as the kernel does
    (code = round-half-even(x * (127 / max|x|)), fp32 products), the integer dot products exact (fp64
    holds them), rounded once to fp32, then * w_scale, then * x_scale (max|x| / 127)."""
    amax = x.abs().amax(1, keepdim=True)
    codes = torch.round(x * torch.where(amax > 0, 127 / amax, torch.zeros_like(amax)))
    return (codes.double() @ q.double().t()).float() * scale * (amax / 127)


def _row_codes_error_bound(x, q, scale):
    """|w8a8 - fp32 on the codes' weights| <= sum_k |x - x_rounded| |w| <= (max|x| / 254) * sum_k |w|, per output."""
    return x.abs().amax(1, keepdim=True) / 254 * (q.float().abs() * scale[:, None]).sum(1)


@pytest.mark.parametrize("m", [1, 5, 8, 9, 17])
@pytest.mark.parametrize("k,n", [(72, 100), (130, 33), (66, 257)])
def test_w8a8_equals_its_integer_reference(lib, m, k, n):
    """Integer dot products (K not a multiple of 4 included): bitwise the reference without an epilogue,
    within fp32 rounding of it with every epilogue; and within the activations' rounding of fp32."""
    q, scale = _codes(torch.randn(n, k) / k ** 0.5)
    packed = stream_gemm.pack(q, scale, lib=lib, dot=True)
    x, bias, residual = torch.randn(m, k), torch.randn(n), torch.randn(m, n)
    if m > 3:
        x[3] = 0.0   # an all-zero row: scale 0, outputs 0 (then the epilogue's)
    plain = stream_gemm.stream_linear(x, packed)
    assert torch.equal(plain, _w8a8_reference(x, q, scale))
    got = stream_gemm.stream_linear(x, packed, bias, activation="gelu_tanh", residual=residual)
    want = F.gelu(_w8a8_reference(x, q, scale).double() + bias.double(), approximate="tanh") + residual.double()
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=2e-5)
    dense = (x.double() @ (q.double() * scale.double()[:, None]).t()).float()
    assert ((plain - dense).abs() <= _row_codes_error_bound(x, q, scale) * 1.0001 + 1e-6).all()


def test_w8a8_quantizes_the_layer_normed_rows(lib):
    """With a LayerNorm the kernel quantizes LN(x) as it computed it (read back through an fp32 identity
    weight, which returns its input exactly)."""
    q, scale = _codes(torch.randn(90, 64))
    x, layer_norm = torch.randn(6, 64) * 3 + 1, (torch.randn(64), torch.randn(64), 1e-5)
    normalized = stream_gemm.stream_linear(x, stream_gemm.pack(torch.eye(64), lib=lib), layer_norm=layer_norm)
    got = stream_gemm.stream_linear(x, stream_gemm.pack(q, scale, lib=lib, dot=True), layer_norm=layer_norm)
    assert torch.equal(got, _w8a8_reference(normalized, q, scale))


def test_w8a8_extremes_and_non_finite_rows(lib):
    """Codes at +-127 in both operands (the largest products, K = 3072 as in GPT-2's MLP) stay exact in
    int32; a row holding inf or NaN gives NaN outputs, as fp32 arithmetic would, and no other row changes."""
    k = 3072
    q = torch.tensor([[127] * k, [-127] * k, [1, -1] * (k // 2)], dtype=torch.int8)
    scale = torch.ones(3)
    x = torch.stack([torch.full((k,), 2.0), torch.full((k,), -2.0), torch.randn(k), torch.randn(k)])
    x[3, 5] = float("nan")
    got = stream_gemm.stream_linear(x, stream_gemm.pack(q, scale, lib=lib, dot=True))
    assert torch.equal(got[:3], _w8a8_reference(x[:3], q, scale))
    assert got[0, 0] == 127 * 127 * k * (2 / 127) and torch.isnan(got[3]).all()
    x[3, 5] = float("inf")
    assert torch.isnan(stream_gemm.stream_linear(x[3:], stream_gemm.pack(q, scale, lib=lib, dot=True))).all()


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 5, 8, 9, 17])
@pytest.mark.parametrize("k,n", [(72, 100), (130, 33), (64, 257)])
def test_stream_linear_equals_the_reference(lib, dtype, m, k, n):
    """Every epilogue combination; N not a multiple of the block width; M across the row-tile sizes;
    every storage format against fp64 on the stored values (widening is exact)."""
    dense, packed_args = _weights(n, k, dtype)
    packed = stream_gemm.pack(*packed_args, lib=lib)
    x, bias, residual = torch.randn(m, k), torch.randn(n), torch.randn(m, n)
    layer_norm = (torch.randn(k), torch.randn(k), 1e-5)
    for kwargs in ({}, {"bias": bias}, {"bias": bias, "activation": "gelu_tanh", "layer_norm": layer_norm},
                   {"bias": bias, "residual": residual}, {"layer_norm": layer_norm, "residual": residual}):
        got = stream_gemm.stream_linear(x, packed, **kwargs)
        torch.testing.assert_close(got, _reference(x, dense, **kwargs), rtol=1e-5, atol=2e-5, msg=str(kwargs.keys()))


def _bf16_fused_rows(lib, rows):
    """Every later bf16 dot product on vdpbf16ps for tiles of at most `rows` rows (0: on FMAs)."""
    lib.stream_gemm_set_bf16_fused_rows(rows)


@pytest.mark.parametrize("m", [1, 5, 8, 9, 17])
@pytest.mark.parametrize("k,n", [(72, 100), (131, 33), (64, 257)])
def test_bf16_dot_products_equal_their_reference(lib, m, k, n):
    """bf16 weights in the dot layout (K odd included): x rounded to bf16 (as torch rounds it) times the
    weight, against fp64 on those values, with every epilogue; the same bits on vdpbf16ps and on FMAs;
    and within the activations' rounding (relative <= 2^-9) of fp32 activations."""
    w = (torch.randn(n, k) / k ** 0.5).bfloat16()
    packed = stream_gemm.pack(w, lib=lib, dot=True)
    x, bias, residual = torch.randn(m, k), torch.randn(n), torch.randn(m, n)
    layer_norm = (torch.randn(k), torch.randn(k), 1e-5)
    rounded = x.bfloat16().float()
    try:
        for kwargs in ({}, {"bias": bias, "activation": "gelu_tanh"}, {"bias": bias, "residual": residual}):
            results = []
            for rows in (8, 0):
                _bf16_fused_rows(lib, rows)
                results.append(stream_gemm.stream_linear(x, packed, **kwargs))
            assert torch.equal(results[0], results[1]), str(kwargs.keys())
            torch.testing.assert_close(results[0], _reference(rounded, w.float(), **kwargs), rtol=1e-5, atol=2e-5)
        # with a LayerNorm, the kernel rounds LN(x) as it computed it (read back through an identity weight)
        normalized = stream_gemm.stream_linear(x, stream_gemm.pack(torch.eye(k), lib=lib), layer_norm=layer_norm)
        torch.testing.assert_close(stream_gemm.stream_linear(x, packed, layer_norm=layer_norm),
                                   _reference(normalized.bfloat16().float(), w.float()), rtol=1e-5, atol=2e-5)
    finally:
        _bf16_fused_rows(lib, 8)
    plain = stream_gemm.stream_linear(x, packed)
    bound = 2.0 ** -9 * (x.abs().double() @ w.double().abs().t())
    assert ((plain.double() - x.double() @ w.double().t()).abs() <= bound * 1.001 + 1e-5).all()


def test_bf16_dot_products_round_and_propagate_like_torch(lib):
    """Activations at bf16's rounding ties, past its largest value (inf) and NaN: rounded as torch's
    .to(torch.bfloat16); a NaN row gives NaN outputs and no other row changes."""
    w = torch.tensor([[1.0, 1.0], [1.0, -1.0], [2.0, 0.5]], dtype=torch.bfloat16)
    x = torch.tensor([[1 + 2 ** -8, 1 + 3 * 2 ** -8], [3.4e38, 1.0], [float("nan"), 1.0], [-2.5, 1e-3]])
    got = stream_gemm.stream_linear(x, stream_gemm.pack(w, lib=lib, dot=True))
    want = x.bfloat16().float() @ w.float().t()
    assert torch.equal(got[[0, 3]], want[[0, 3]]) and torch.isinf(got[1, 0]) and torch.isnan(got[2]).all()


def test_bf16_dot_products_run_on_vdpbf16ps_where_the_cpu_has_it(lib):
    from gpt2_engine import cpu_gemm

    has = "avx512_bf16" in open("/proc/cpuinfo").read()
    assert lib.stream_gemm_bf16_isa().decode() == ("avx512_bf16" if has else "portable")
    assert cpu_gemm.bf16_dot_products() == has


def test_fused_gelu_is_accurate_over_the_whole_range(lib):
    """W = I, so y = gelu(x): the vectorised e^x's clamps give x and 0 in the tails, no inf or NaN."""
    x = torch.linspace(-60, 60, 4096).view(64, 64)
    got = stream_gemm.stream_linear(x, stream_gemm.pack(torch.eye(64), lib=lib), activation="gelu_tanh")
    torch.testing.assert_close(got, F.gelu(x.double(), approximate="tanh").float(), rtol=2e-6, atol=1e-6)


# Narrower builds than -march=native that every x86-64 CPU with AVX2 can run: on an AVX-512 machine
# they exercise the AVX2 tiles, and the generic one (SSE vectors, scalar fp16 conversion) everywhere.
ISA_VARIANTS = {"avx2": ("-mno-avx512f",), "generic": ("-mno-avx512f", "-mno-avx2", "-mno-fma", "-mno-f16c")}


@pytest.mark.parametrize("variant", sorted(ISA_VARIANTS))
def test_narrower_isa_builds_compute_the_same(tmp_path, variant):
    """Each ISA variant's streaming GEMM, on every weight format and both epilogue extremes, its
    16-bit widening at the formats' extremes (the generic build's scalar fp16 conversion included) and
    its integer dot products (AVX-VNNI on ymm where the CPU has it, else the portable loop)."""
    flags = ISA_VARIANTS[variant]
    if variant == "avx2" and "avx2" not in open("/proc/cpuinfo").read():
        pytest.skip("this CPU has no AVX2")
    narrow = cpu_kernels.library(tmp_path, flags)   # its own directory: build_dir holds the native build alone
    assert narrow.cpu_kernels_isa().decode() == variant
    avx_vnni = "avx_vnni" in open("/proc/cpuinfo").read()
    assert narrow.stream_gemm_dot_isa().decode() == ("avx_vnni" if variant == "avx2" and avx_vnni else "portable")
    assert narrow.stream_gemm_bf16_isa().decode() == "portable"
    w, x = (torch.randn(100, 71) / 8).bfloat16(), torch.randn(9, 71)
    torch.testing.assert_close(stream_gemm.stream_linear(x, stream_gemm.pack(w, lib=narrow, dot=True)),
                               _reference(x.bfloat16().float(), w.float()), rtol=1e-5, atol=2e-5)
    q, scale = _codes(torch.randn(100, 70))
    x = torch.randn(9, 70)
    assert torch.equal(stream_gemm.stream_linear(x, stream_gemm.pack(q, scale, lib=narrow, dot=True)),
                       _w8a8_reference(x, q, scale))
    for dtype in WEIGHT_DTYPES:
        dense, packed_args = _weights(100, 72, dtype)
        packed = stream_gemm.pack(*packed_args, lib=narrow)
        x, bias, residual = torch.randn(9, 72), torch.randn(100), torch.randn(9, 100)
        layer_norm = (torch.randn(72), torch.randn(72), 1e-5)
        for kwargs in ({}, {"bias": bias, "activation": "gelu_tanh", "layer_norm": layer_norm, "residual": residual}):
            got = stream_gemm.stream_linear(x, packed, **kwargs)
            torch.testing.assert_close(got, _reference(x, dense, **kwargs), rtol=1e-5, atol=2e-5, msg=f"{dtype} {kwargs.keys()}")
    _check_16_bit_extremes(narrow)


def _check_16_bit_extremes(lib) -> None:
    """x = [[1]] times a one-input weight holding each 16-bit value: y is that value in fp32, for
    subnormals, the largest finite values and infinities of fp16 and bf16."""
    for dtype in (torch.float16, torch.bfloat16):
        info = torch.finfo(dtype)
        values = torch.tensor([0.0, info.tiny, info.tiny / 4, -info.tiny / 8, info.max, -info.max, info.eps,
                               1.0, -2.5, float("inf"), float("-inf")], dtype=dtype)
        got = stream_gemm.stream_linear(torch.ones(1, 1), stream_gemm.pack(values[:, None], lib=lib))[0]
        assert torch.equal(got, values.float()), dtype


def test_16_bit_weights_widen_exactly_at_their_extremes(lib):
    _check_16_bit_extremes(lib)


@pytest.mark.parametrize("dtype", [*WEIGHT_DTYPES, "w8a8", "bf16_dot"], ids=str)
def test_a_rows_result_is_bitwise_the_same_at_every_batch_size_and_thread_count(lib, dtype):
    """Thread counts up to more than the cores (the pool's workers then yield to one another); batches
    on the decode path (two blocks side by side, rows in groups) and the prompt path; every prefetch
    distance the engine may choose (and for bf16 dot products, vdpbf16ps's tile height: fused or FMAs
    at each row count)."""
    stored = {"w8a8": torch.int8, "bf16_dot": torch.bfloat16}.get(dtype, dtype)
    _, packed_args = _weights(300, 96, stored)
    packed = stream_gemm.pack(*packed_args, lib=lib, dot=dtype in ("w8a8", "bf16_dot"))
    x, bias = torch.randn(23, 96), torch.randn(300)
    layer_norm = (torch.randn(96), torch.randn(96), 1e-5)
    alone = torch.cat([stream_gemm.stream_linear(x[i:i + 1], packed, bias, activation="gelu_tanh", layer_norm=layer_norm)
                       for i in range(23)])
    threads = torch.get_num_threads()
    try:
        for count, distance in itertools.product(sorted({1, 2, threads, os.cpu_count() + 3}), PREFETCH_DISTANCES):
            torch.set_num_threads(count)
            lib.stream_gemm_set_prefetch(distance)
            lib.stream_gemm_set_bf16_fused_rows(distance // 128)   # 0, 2, 4, 8 rows
            for rows in (23, 8, 5, 2):
                batched = stream_gemm.stream_linear(x[:rows], packed, bias, activation="gelu_tanh", layer_norm=layer_norm)
                assert torch.equal(batched, alone[:rows]), f"{rows} rows, {count} threads, prefetch {distance}"
    finally:
        torch.set_num_threads(threads)
        lib.stream_gemm_set_prefetch(0)
        lib.stream_gemm_set_bf16_fused_rows(8)


@pytest.mark.parametrize("n", [1, 31, 4096 + 77, 2**20 + 5])
def test_stream_read_sum_reads_every_element(lib, n):
    """Small integers: every partial sum is exact in fp32, so any element skipped or read twice shows."""
    x = torch.randint(-3, 4, (n,)).float()
    for distance in PREFETCH_DISTANCES:
        lib.stream_gemm_set_prefetch(distance)
        assert stream_gemm.stream_read_sum(x, lib=lib) == x.double().sum().item()
    lib.stream_gemm_set_prefetch(0)


def test_concurrent_callers_and_a_forked_child_get_the_same_results(lib):
    """Four Python threads calling at once (ctypes drops the GIL: one gets the pool, the others run
    alone) and a forked child (a fresh pool) compute what one caller does."""
    q, scale = _codes(torch.randn(500, 256))
    packed = stream_gemm.pack(q, scale, lib=lib, dot=True)
    inputs = [torch.randn(3, 256) for _ in range(16)]
    want = [stream_gemm.stream_linear(x, packed) for x in inputs]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda x: stream_gemm.stream_linear(x, packed), inputs))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    child = os.fork()
    if child == 0:   # the child: exit status 0 only if its results are right
        os._exit(0 if all(torch.equal(stream_gemm.stream_linear(x, packed), y) for x, y in zip(inputs, want)) else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_stream_linear_rejects_bad_input_by_name(lib):
    packed = stream_gemm.pack(torch.randn(40, 24), lib=lib)
    x = torch.randn(3, 24)
    cases = [((x.double(), packed), "x must be"), ((torch.randn(3, 25), packed), "x has 25 features"),
             ((x, packed, torch.randn(41)), "bias must be"),
             ((x, packed), "residual must be", {"residual": torch.randn(2, 40)}),
             ((x, packed), "activation must be", {"activation": "relu"}),
             ((x, packed), "ln_weight must be", {"layer_norm": (torch.randn(23), torch.randn(24), 1e-5)})]
    for args, message, *kwargs in cases:
        with pytest.raises(ValueError, match=message):
            stream_gemm.stream_linear(*args, **(kwargs[0] if kwargs else {}))
    with pytest.raises(ValueError, match="need their per-output-channel scale"):
        stream_gemm.pack(torch.zeros(4, 4, dtype=torch.int8), lib=lib)
    with pytest.raises(ValueError, match="weight must be"):
        stream_gemm.pack(torch.zeros(4, 4, dtype=torch.float64), lib=lib)
    with pytest.raises(ValueError, match="dot packs int8 codes or bfloat16"):
        stream_gemm.pack(torch.zeros(4, 4), lib=lib, dot=True)


def _paged_case(lengths, heads=4, head_dim=64, block_size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in lengths]
    num_blocks = sum(blocks_per_seq) + 3
    k_cache = torch.randn(num_blocks, block_size, heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, heads, head_dim, generator=g)
    order = torch.randperm(num_blocks, generator=g).int()          # scattered blocks, as after frees
    width = max(blocks_per_seq)
    tables, used = torch.zeros(len(lengths), width, dtype=torch.int32), 0
    for i, count in enumerate(blocks_per_seq):
        tables[i, :count] = order[used:used + count]
        used += count
    q = torch.randn(len(lengths), 3, heads, head_dim, generator=g)[:, 0]    # strided, as a QKV view
    return q, k_cache, v_cache, tables, torch.tensor(lengths, dtype=torch.int32)


@pytest.mark.parametrize("lengths", [[1], [16], [17], [100, 1, 33, 16], [300, 5]])
def test_paged_attention_equals_the_reference(lib, lengths):
    q, k_cache, v_cache, tables, lens = _paged_case(lengths)
    got = cpu_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, lib=lib)
    torch.testing.assert_close(got, paged_decode_attention_ref(q, k_cache, v_cache, tables, lens), rtol=1e-5, atol=1e-5)
    out = torch.empty_like(got)
    assert cpu_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, sm_scale=0.3, out=out, lib=lib) is out
    torch.testing.assert_close(out, paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, sm_scale=0.3),
                               rtol=1e-5, atol=1e-5)


def test_paged_attention_is_bitwise_batch_invariant(lib):
    q, k_cache, v_cache, tables, lens = _paged_case([100, 1, 33, 250, 16])
    batched = cpu_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, lib=lib)
    for i in range(len(lens)):
        alone = cpu_attention.paged_decode_attention(q[i:i + 1], k_cache, v_cache, tables[i:i + 1], lens[i:i + 1], lib=lib)
        assert torch.equal(alone, batched[i:i + 1])


def test_paged_attention_rejects_out_of_range_tables_and_lengths(lib):
    q, k_cache, v_cache, tables, lens = _paged_case([20, 5])
    bad_block = tables.clone()
    bad_block[0, 1] = k_cache.shape[0]
    for t, n, message in ((bad_block, lens, "sequence 0"), (tables, torch.tensor([20, 0], dtype=torch.int32), "sequence 1"),
                          (tables, torch.tensor([20, 33], dtype=torch.int32), "sequence 1")):
        with pytest.raises(ValueError, match=message):
            cpu_attention.paged_decode_attention(q, k_cache, v_cache, t, n, lib=lib)
    with pytest.raises(ValueError, match="block_tables must be"):
        cpu_attention.paged_decode_attention(q, k_cache, v_cache, tables.long(), lens, lib=lib)
    with pytest.raises(ValueError, match="k_cache and v_cache"):
        cpu_attention.paged_decode_attention(q, k_cache, v_cache[:, :, :2], tables, lens, lib=lib)


def test_write_kv_equals_the_reference_and_skips_negative_slots(lib):
    _, k_cache, v_cache, _, _ = _paged_case([40])
    qkv = torch.randn(5, 3, 4, 64)
    k, v = qkv[:, 1], qkv[:, 2]                                  # strided views, as the engine passes them
    slots = torch.tensor([3, -1, 17, 40, 0])
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    write_kv_ref(k, v, expected_k, expected_v, slots)
    cpu_attention.write_kv(k, v, k_cache, v_cache, slots, lib=lib)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    with pytest.raises(ValueError, match=r"slot_mapping\[1\] = 9999"):
        cpu_attention.write_kv(k[:2], v[:2], k_cache, v_cache, torch.tensor([0, 9999]), lib=lib)


def test_the_build_is_reused_and_a_missing_compiler_is_a_clear_error(lib, build_dir, tmp_path, monkeypatch):
    built = sorted(build_dir.iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"      # the library alone: no scratch left behind
    cpu_kernels.library.cache_clear()
    try:
        mtime = built[0].stat().st_mtime_ns
        again = cpu_kernels.library(build_dir)             # a later process: loads the same file, no rebuild
        assert again.cpu_kernels_isa() == lib.cpu_kernels_isa() and built[0].stat().st_mtime_ns == mtime
        (tmp_path / "a-file").write_text("")           # a build directory that cannot be made: a temporary one
        assert cpu_kernels.library(tmp_path / "a-file" / "kernels").cpu_kernels_isa() == lib.cpu_kernels_isa()
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
        with pytest.raises(cpu_kernels.BuildError, match="could not run"):
            cpu_kernels.library(tmp_path / "b")
    finally:
        cpu_kernels.library.cache_clear()
