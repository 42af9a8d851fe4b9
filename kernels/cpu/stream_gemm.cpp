// Streaming GEMM for decode-sized batches: y[M, N] = gelu?(LN?(x)[M, K] @ W[K, N] * scale + bias) + residual,
// W in fp32, bf16, fp16 or int8 codes (int8: one scale per column). Two kinds of arithmetic:
//  - fp32 activations (kF32, kBF16, kF16, kInt8): x, the accumulators and y are fp32 whatever W is: a
//    16-bit or int8 weight is widened to fp32 in registers (exactly: every bf16, fp16 and int8 value is
//    an fp32 value), so the kernel streams half or a quarter of fp32's bytes and computes what fp32
//    arithmetic on the stored weights gives.
//  - int8 activations (kInt8Dot, "w8a8"): each row of x is quantized to int8 codes first (dynamic,
//    symmetric, one scale per row; RowCodes in kernels.h) and the dot products run on integers with
//    int32 accumulation: y = (sum_k xq[k] * wq[k][n]) * w_scale[n] * x_scale[m], the integer sum exact.
//    The instruction is VNNI's vpdpbusd (AVX512-VNNI on zmm, AVX-VNNI on ymm; a portable loop where the
//    ISA has neither): per 32-bit lane, acc += the sum of four products of an unsigned byte and a signed
//    byte. So the weight is stored as u = wq + 128 (1..255) and the activations as signed codes, and
//        sum_k u[k] x[k] = sum_k wq[k] x[k] + 128 * sum_k x[k],
//    the second term one integer per row (RowCodes::sums), subtracted before the scales. Bounds: |x| <=
//    127 and u <= 255, so a lane grows by < 2^17 per instruction: K < 2^16 keeps the int32 exact.
//    One vpdpbusd does 4 * VL multiply-adds, where the widening int8 path needs a widening conversion and
//    an FMA per VL, so a batch-8 step stays a weight stream instead of becoming compute bound.
//  - bf16 activations (kBF16Dot, bf16 weights where the CPU has AVX512-BF16): each row of x is rounded
//    to bf16 (to nearest even; RowCodes), and vdpbf16ps multiplies two k at once: per 32-bit lane,
//    acc += w[k] x[k] + w[k + 1] x[k + 1], the products of bf16 values exact in fp32 and summed into the
//    fp32 accumulator (the ISA flushes subnormal inputs and results to zero). So x carries bf16's
//    relative rounding (<= 2^-9) as well as the weight, as torch's own bf16 matmul would, and a
//    vector of 2 * VL weights costs one instruction where widening costs two conversions and two FMAs.
//    The same products and sums also run on shifts and FMAs (dot2), in the ISA's documented order (the
//    odd k first), bitwise vdpbf16ps's result for normal values: for tiles of many rows where that is
//    faster (a probed setting, below), and in builds without AVX512-BF16 (only tests select kBF16Dot there).
//
// Why hand-written: at decode batches a linear layer is a weight stream (each weight is used by M <= 8
// rows), so its speed is the DRAM read rate. The library GEMMs reachable from torch (oneDNN packed, MKL
// on either layout) were measured streaming 12-25 GB/s where a plain read of the same bytes streamed
// 24-28 GB/s on a 2-core AVX-512 EPYC (4 KiB pages); this kernel reads at about the plain read's rate
// (benchmarks/test_bench_cpu_gemm.py; huge pages: below).
//
// Memory layout (stream_gemm.py packs it once at load): W is cut into column blocks of NB
// output channels, and block b is stored as K contiguous rows of NB values:
//     packed[b][k][c] = W[k][b * NB + c]      (zero where b * NB + c >= N)
// kInt8Dot keeps four consecutive k of a column together, the four bytes one vpdpbusd lane multiplies:
//     packed[b][g][c][j] = W[4g + j][b * NB + c] + 128      (g < ceil(K / 4); 128, a zero code, past K or N)
// and kBF16Dot two, the two bf16 values one vdpbf16ps lane multiplies:
//     packed[b][g][c][j] = W[2g + j][b * NB + c]            (g < ceil(K / 2); zero past K or N)
// so a block is one contiguous run of K * NB values, read front to back: the hardware prefetcher sees a
// plain sequential stream and every cache line fetched is used whole. stream_gemm.py puts the blocks in
// transparent huge pages where the OS grants them, so the stream never crosses a 4 KiB page boundary
// (where the prefetcher stops): on a 2-core EPYC that took the batch-1 read rate from ~0.65x to ~0.92x
// of a torch sum over huge pages.
//
// More reads in flight: one sequential stream per core leaves DRAM bandwidth unused on some CPUs (a
// 2-core Xeon VM with AVX-512 and AMX read 26 GB/s with one stream per core, 30 with two, 36 with two
// and a software prefetch 1 KiB ahead; a plain C++ read loop). So at decode batches each thread reads
// two blocks side by side (tiles(): the first and second half of its range), and the software prefetch
// distance is a run-time setting (stream_gemm_set_prefetch), chosen per machine by timing
// (engine/cpu_gemm.py): on the 2-core EPYC software prefetch (t0 / t1 / t2, 1-8 KiB ahead) was measured
// slower on huge pages (0.62-0.86x); on the Xeon 512 bytes ahead was ~1.1x faster than none.
//
// Register tile: R <= MR rows of x times one block, NV vectors of VL floats per row (NB = NV * VL
// columns), all R * NV accumulators held in registers for the whole K loop. Per k: NV vector loads of W
// (widened to fp32 where stored narrower), R scalar broadcasts of x, R * NV fused multiply-adds.
//
// Widening, by what the compiler targets (-march=native: the CPU's own ISA): bf16 is the high half of an
// fp32, so zero-extend each 16-bit value to 32 bits and shift it up 16 (vpmovzxwd + vpslld); fp16 goes
// through the F16C conversion (vcvtph2ps, in AVX-512F and F16C), else a scalar conversion. Both cost two
// instructions per vector of VL weights, far below the DRAM time of its 2 * VL bytes at decode batches.
// (Where the CPU has AVX512-BF16, bf16 weights take kBF16Dot instead: engine/cpu_gemm.py.) x's rows
// stay in L1/L2 across blocks; a block is re-read from L1/L2 (not DRAM) by each further group of MR rows.
//
// Batch invariance: every output y[m][n] is one accumulator summed over k = 0 .. K-1 in order, whatever
// M is, whichever rows share its tile and whichever thread runs it. So a row's result is bitwise the
// same at every batch size and thread count (tests/kernels/test_cpu_stream_gemm.py checks it).
//
// Vector width and tile come from the ISA the compiler targets (built with -march=native for the CPU
// it runs on): AVX-512 has 32 vector registers (8 x 2 = 16 accumulators), AVX2 16 (6 x 2 = 12).
#include <algorithm>
#include <atomic>
#include <type_traits>
#include <cmath>
#include <vector>

#include "kernels.h"
#include "vector.h"

#if defined(__AVX512F__)
#define MR 8
#else
#define MR 6
#endif
#define NV 2
#define NB (NV * VL)

typedef int8_t vq __attribute__((vector_size(VL)));

// VL int8 codes -> VL floats (exact: |code| <= 127).
static inline vf widen_int8(const int8_t* p) {
#if defined(__AVX512F__)
  return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#elif defined(__AVX2__)
  return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
#else
  vq q; std::memcpy(&q, p, sizeof q); return __builtin_convertvector(q, vf);
#endif
}

// VL bf16 values -> VL floats: each is the upper 16 bits of its fp32.
static inline vf widen_bf16(const uint16_t* p) {
#if defined(__AVX512F__)
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
  return (vf)_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
#elif defined(__AVX2__)
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  return (vf)_mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
#else
  vi bits;
  for (int i = 0; i < VL; ++i) bits[i] = (int32_t)((uint32_t)p[i] << 16);
  vf v; std::memcpy(&v, &bits, sizeof v); return v;
#endif
}

// One IEEE half -> float, for CPUs without F16C: zero and subnormals (man * 2^-24), normals
// ((1024 + man) * 2^(exp - 25)), infinities and NaNs; the sign applied last.
static inline float half_to_float(uint16_t h) {
  const int exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  const float magnitude = exponent == 0    ? std::ldexp((float)mantissa, -24)
                          : exponent == 31 ? (mantissa ? NAN : INFINITY)
                                           : std::ldexp((float)(mantissa | 0x400), exponent - 25);
  return h & 0x8000 ? -magnitude : magnitude;
}

// VL fp16 values -> VL floats.
static inline vf widen_f16(const uint16_t* p) {
#if defined(__AVX512F__)
  return (vf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
#elif defined(__AVX2__) && defined(__F16C__)
  return (vf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
#else
  vf v;
  for (int i = 0; i < VL; ++i) v[i] = half_to_float(p[i]);
  return v;
#endif
}

// The VL weights at element `offset` of a packed weight stored in format F, as fp32.
template <WeightFormat F>
static inline vf load_weights(const void* w, int64_t offset) {
  if constexpr (F == kInt8) return widen_int8((const int8_t*)w + offset);
  else if constexpr (F == kBF16) return widen_bf16((const uint16_t*)w + offset);
  else if constexpr (F == kF16) return widen_f16((const uint16_t*)w + offset);
  else return load((const float*)w + offset);
}

// acc + per 32-bit lane i, sum over j < 4 of u[4i + j] (unsigned weight bytes) * x[j] (the signed activation
// codes of one k group, the same four bytes in every lane).
static inline vi dot4(vi acc, vi u, int32_t x_group) {
  const vi x = (vi){} + x_group;
#if VL == 16 && defined(__AVX512VNNI__)
  return (vi)_mm512_dpbusd_epi32((__m512i)acc, (__m512i)u, (__m512i)x);
#elif VL == 8 && defined(__AVXVNNI__)
  return (vi)_mm256_dpbusd_avx_epi32((__m256i)acc, (__m256i)u, (__m256i)x);
#else
  uint8_t w[4 * VL];
  int8_t xb[4];
  std::memcpy(w, &u, sizeof w);
  std::memcpy(xb, &x_group, sizeof xb);
  for (int i = 0; i < VL; ++i)
    for (int j = 0; j < 4; ++j) acc[i] += (int32_t)w[4 * i + j] * xb[j];
  return acc;
#endif
}

typedef uint32_t vu __attribute__((vector_size(VL * 4)));

// acc + per 32-bit lane i, w[2i] * x[0] + w[2i + 1] * x[1]: the lane's two bf16 weights (a k pair of one
// column; element 2i the low half) times the k pair of x in bf16 (x_pair: low half x[0], the same in
// every lane). A bf16 value is the upper half of its fp32, and the product of two is exact in fp32.
// kFused: one vdpbf16ps where the build has it; else (or where the CPU's vdpbf16ps is the slower way)
// the same products and sums as two shifts and two FMAs, in the ISA's documented order (the odd k
// first): bitwise vdpbf16ps's result for normal values (tests check it; the ISA flushes subnormals).
template <bool kFused>
static inline vf dot2(vf acc, vi w, uint32_t x_pair) {
#if VL == 16 && defined(__AVX512BF16__)
  if constexpr (kFused)
    return (vf)_mm512_dpbf16_ps((__m512)acc, (__m512bh)(__m512i)w, (__m512bh)_mm512_set1_epi32((int)x_pair));
#endif
  const vu u = (vu)w, x = (vu){} + x_pair;   // x: one broadcast, split as the weights are (vector ops only)
  acc += (vf)(u & 0xFFFF0000u) * (vf)(x & 0xFFFF0000u);
  return acc + (vf)(u << 16) * (vf)(x << 16);
}

static const char* bf16_isa() {
#if VL == 16 && defined(__AVX512BF16__)
  return "avx512_bf16";
#else
  return "portable";
#endif
}

static const char* dot_isa() {
#if VL == 16 && defined(__AVX512VNNI__)
  return "avx512_vnni";
#elif VL == 8 && defined(__AVXVNNI__)
  return "avx_vnni";
#else
  return "portable";
#endif
}

// h[m] = (x[m] - mean) / sqrt(var + eps) * weight + bias over the K features of row m (two-pass moments).
static void layer_norm_row(const float* x, int64_t K, const float* weight, const float* bias, float eps, float* h) {
  float mean = 0.f, var = 0.f;
  for (int64_t k = 0; k < K; ++k) mean += x[k];
  mean /= K;
  for (int64_t k = 0; k < K; ++k) var += (x[k] - mean) * (x[k] - mean);
  const float rstd = 1.f / std::sqrt(var / K + eps);
  for (int64_t k = 0; k < K; ++k) h[k] = (x[k] - mean) * rstd * weight[k] + (bias ? bias[k] : 0.f);
}

// The epilogue of rows m0 .. m0+R-1 times column block b: gelu(acc * scale * row scale + bias) + residual,
// in that order (scale: int8 formats; row scale: kInt8Dot's x_scale); the last block stores only its columns.
template <int R>
static inline void finish(const Gemm& p, int64_t m0, int64_t b, vf (&acc)[R][NV]) {
  const int64_t n0 = b * NB, cols = p.N - n0 < NB ? p.N - n0 : NB;
  float scale[NB], bias[NB];
  for (int c = 0; c < NB; ++c) {
    scale[c] = p.scale && c < cols ? p.scale[n0 + c] : 1.f;
    bias[c] = p.bias && c < cols ? p.bias[n0 + c] : 0.f;
  }
  for (int r = 0; r < R; ++r) {
    float out[NB];
    for (int j = 0; j < NV; ++j) {
      vf v = acc[r][j];
      if (p.scale) v *= load(scale + j * VL);
      if (p.format == kInt8Dot) v *= p.x_codes->scales[m0 + r];
      v += load(bias + j * VL);
      if (p.gelu) v = gelu_tanh(v);
      std::memcpy(out + j * VL, &v, sizeof v);
    }
    float* y = p.y + (m0 + r) * p.N + n0;
    const float* res = p.residual ? p.residual + (m0 + r) * p.N + n0 : nullptr;
    for (int64_t c = 0; c < cols; ++c) y[c] = res ? out[c] + res[c] : out[c];
  }
}

// Bytes of one column block of g's packed weight (the layouts above).
static int64_t block_bytes(const Gemm& g) {
  switch (g.format) {
    case kF32: return g.K * NB * 4;
    case kInt8: return g.K * NB;
    case kBF16: case kF16: return g.K * NB * 2;
    case kInt8Dot: return (g.K + 3) / 4 * 4 * NB;
    case kBF16Dot: return (g.K + 1) / 2 * 4 * NB;
  }
  return 0;
}

// Software prefetch distance in bytes ahead of each weight stream (0: none), set once per process by
// stream_gemm_set_prefetch (engine/cpu_gemm.py times the candidates on the machine: it helps on some
// CPUs and hurts on others, header).
static std::atomic<int> prefetch_bytes{0};

// Prefetch the cache lines `distance` bytes past the `bytes` just read at `at` (into L1: t0).
static inline void prefetch_ahead(const void* at, int bytes, int distance) {
  for (int offset = 0; offset < bytes; offset += 64) __builtin_prefetch((const char*)at + distance + offset, 0, 3);
}

// Rows m0 .. m0+R-1 of y times the S column blocks `blocks`, fp32 activations. The S blocks are read
// side by side (S sequential streams at once: more reads in flight than one stream keeps); each
// output is still one accumulator summed over k in order, whatever S is.
template <int R, int S, WeightFormat F>
static inline void tile(const Gemm& p, int64_t m0, const int64_t (&blocks)[S]) {
  constexpr int step = NB * (F == kF32 ? 4 : F == kInt8 ? 1 : 2);   // bytes of one k row of a block
  const char* w[S];
  for (int s = 0; s < S; ++s) w[s] = (const char*)p.w + blocks[s] * block_bytes(p);
  const float* x = p.x + m0 * p.K;
  const int distance = prefetch_bytes.load(std::memory_order_relaxed);
  vf acc[S][R][NV];
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NV; ++j) acc[s][r][j] = (vf){};
  for (int64_t k = 0; k < p.K; ++k) {
    for (int s = 0; s < S; ++s) {
      if (distance) prefetch_ahead(w[s] + k * step, step, distance);
      vf wk[NV];
      for (int j = 0; j < NV; ++j) wk[j] = load_weights<F>(w[s], k * NB + j * VL);
      for (int r = 0; r < R; ++r) {
        const float xs = x[r * p.K + k];
        for (int j = 0; j < NV; ++j) acc[s][r][j] += xs * wk[j];
      }
    }
  }
  for (int s = 0; s < S; ++s) finish<R>(p, m0, blocks[s], acc[s]);
}

// Tiles of at most this many rows run kBF16Dot on vdpbf16ps, larger ones on FMAs (dot2; the same
// results). Where the instruction issues on one port and FMAs on two (as measured on a 2-vCPU Xeon:
// a batch-8 GPT-2 step 0.93x the widening path's speed on vdpbf16ps, batch 1 1.09x), many-row tiles
// are compute bound and go faster on FMAs; set once per process by stream_gemm_set_bf16_fused_rows
// (engine/cpu_gemm.py times the candidates on the machine).
static std::atomic<int> bf16_fused_rows{MR};

// Rows m0 .. m0+R-1 of y times the S column blocks `blocks` in a dot-product format F: x's rows as
// RowCodes holds them, one k group of a row in 4 bytes (kInt8Dot: 4 int8 codes; kBF16Dot: 2 bf16),
// and a block's groups 4 * NB contiguous bytes. kInt8Dot accumulates in int32 (dot4), kBF16Dot in
// fp32 (dot2: on vdpbf16ps where kFused).
template <int R, int S, WeightFormat F, bool kFused>
static inline void dot_tile(const Gemm& p, int64_t m0, const int64_t (&blocks)[S]) {
  constexpr bool int8 = F == kInt8Dot;
  using Acc = std::conditional_t<int8, vi, vf>;
  constexpr int step = 4 * NB;   // bytes of one k group of a block
  const RowCodes& rows = *p.x_codes;
  const int64_t groups = int8 ? (p.K + 3) / 4 : (p.K + 1) / 2;   // the weight's; rows.stride may be longer
  const uint8_t* w[S];
  for (int s = 0; s < S; ++s) w[s] = (const uint8_t*)p.w + blocks[s] * block_bytes(p);
  const int64_t row_bytes = rows.stride * (int8 ? 1 : 2);
  const char* x = int8 ? (const char*)rows.codes.data() : (const char*)rows.bf16.data();
  x += m0 * row_bytes;
  const int distance = prefetch_bytes.load(std::memory_order_relaxed);
  Acc acc[S][R][NV];
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NV; ++j) acc[s][r][j] = (Acc){};
  for (int64_t g = 0; g < groups; ++g) {
    for (int s = 0; s < S; ++s) {
      if (distance) prefetch_ahead(w[s] + g * step, step, distance);
      vi u[NV];
      for (int j = 0; j < NV; ++j) std::memcpy(&u[j], w[s] + (g * NB + j * VL) * 4, sizeof u[j]);   // one vector load each
      for (int r = 0; r < R; ++r) {
        uint32_t x_group;
        std::memcpy(&x_group, x + r * row_bytes + 4 * g, sizeof x_group);
        for (int j = 0; j < NV; ++j) {
          if constexpr (int8) acc[s][r][j] = dot4(acc[s][r][j], u[j], (int32_t)x_group);
          else acc[s][r][j] = dot2<kFused>(acc[s][r][j], u[j], x_group);
        }
      }
    }
  }
  for (int s = 0; s < S; ++s) {
    if constexpr (int8) {
      vf dots[R][NV];   // sum_k wq x = sum_k u x - 128 sum_k x, exact in int32, then rounded once to fp32
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < NV; ++j) dots[r][j] = __builtin_convertvector(acc[s][r][j] - 128 * rows.sums[m0 + r], vf);
      finish<R>(p, m0, blocks[s], dots);
    } else {
      finish<R>(p, m0, blocks[s], acc[s]);
    }
  }
}
// A tile of R rows times S blocks: fp32 activations times format F, or the activations rounded as a
// dot-product format takes them (int8 codes times kInt8Dot, bf16 times kBF16Dot).
template <int R, int S, WeightFormat F>
static inline void any_tile(const Gemm& p, int64_t m0, const int64_t (&blocks)[S]) {
  if constexpr (F == kInt8Dot) dot_tile<R, S, F, true>(p, m0, blocks);
  else if constexpr (F == kBF16Dot) {
    if (R <= bf16_fused_rows.load(std::memory_order_relaxed)) dot_tile<R, S, F, true>(p, m0, blocks);
    else dot_tile<R, S, F, false>(p, m0, blocks);
  }
  else tile<R, S, F>(p, m0, blocks);
}

void layer_norm_phase(Team& team, const float* x, int64_t M, int64_t K, const float* weight, const float* bias,
                      float eps, float* h) {
  team.for_each(M, [&](int64_t m) { layer_norm_row(x + m * K, K, weight, bias, eps, h + m * K); });
}

// Row m of x -> rows.codes / scales / sums (RowCodes' scheme). x * (127 / max|x|) rounds to nearest
// even (the default rounding mode), so |code| <= 127; an all-zero row has scale 0 and codes 0. A row
// holding an inf or NaN gets a NaN scale: its outputs are NaN, as fp32 arithmetic would make them.
static void quantize_row(const float* x, int64_t K, RowCodes& rows, int64_t m) {
  float amax = 0.f;
  bool finite = true;
  for (int64_t k = 0; k < K; ++k) {
    amax = std::fabs(x[k]) > amax ? std::fabs(x[k]) : amax;
    finite &= std::isfinite(x[k]);
  }
  const float inv = finite && amax > 0.f ? 127.f / amax : 0.f;
  int8_t* codes = rows.codes.data() + m * rows.stride;
  int32_t sum = 0;
  for (int64_t k = 0; k < K; ++k) {
    codes[k] = (int8_t)std::nearbyint(x[k] * inv);
    sum += codes[k];
  }
  for (int64_t k = K; k < (K + 3) / 4 * 4; ++k) codes[k] = 0;
  rows.scales[m] = finite ? amax / 127.f : NAN;
  rows.sums[m] = sum;
}

// Row m of x -> rows.bf16: each value rounded to bf16 to nearest even (as torch's .to(torch.bfloat16));
// a NaN stays a (quiet) NaN, values past bf16's largest round to infinity; zero past K.
static void round_row_bf16(const float* x, int64_t K, RowCodes& rows, int64_t m) {
  uint16_t* out = rows.bf16.data() + m * rows.stride;
  for (int64_t k = 0; k < K; ++k) {
    uint32_t bits;
    std::memcpy(&bits, x + k, sizeof bits);
    out[k] = (bits & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)((bits >> 16) | 0x40u)
                                                  : (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  }
  for (int64_t k = K; k < (K + 3) / 4 * 4; ++k) out[k] = 0;
}

// `rows` rows (<= MR) from m0 times the S blocks.
template <int S, WeightFormat F>
static inline void rows_tile(const Gemm& g, int64_t m0, int64_t rows, const int64_t (&blocks)[S]) {
  switch (rows) {
    case 1: any_tile<1, S, F>(g, m0, blocks); break;
    case 2: any_tile<2, S, F>(g, m0, blocks); break;
    case 3: any_tile<3, S, F>(g, m0, blocks); break;
    case 4: any_tile<4, S, F>(g, m0, blocks); break;
    case 5: any_tile<5, S, F>(g, m0, blocks); break;
    case 6: any_tile<6, S, F>(g, m0, blocks); break;
#if MR > 6
    case 7: any_tile<7, S, F>(g, m0, blocks); break;
    case 8: any_tile<8, S, F>(g, m0, blocks); break;
#endif
  }
}

// A member's blocks [lo, hi) of `blocks` at decode batches (Team::share) as two streams: [lo, lo + half)
// and [lo + half, hi).
struct Streams {
  int64_t lo, hi, half;
};
static Streams streams(const Team& team, int64_t blocks) {
  const auto [lo, hi] = team.share(blocks);
  return {lo, hi, (hi - lo + 1) / 2};
}

// Rows per tile when two blocks are read side by side: 2 * R * NV accumulators stay within the
// registers left beside the weights (AVX-512: 32, AVX2: 16 vector registers).
#define PAIR_ROWS (MR / 2)

// Weights never wait on activations: a member that finishes its share of a decode-batch GEMM before the
// others would idle at the closing barrier while DRAM has nothing to do (the members' shares are equal
// in bytes, but the machine slows one or the other: a batch-1 GPT-2-small step's GEMMs waited ~0.7 ms
// in all at their barriers on a 2-vCPU Xeon VM). Instead it prefetches, into L2, the start of both
// streams of its share of the next GEMM (the weights are known; only the activations are not), up to
// kWarmBytes each, kWarmStep bytes per spin of the barrier; the next GEMM then begins on L2 hits while
// the hardware prefetcher takes over the stream. Measured there, 80 interleaved rounds: a fp32 batch-1
// step 2.6% faster, bf16 0.6-1%, w8a8 and fp32 batch 8 unchanged. kWarmBytes: two streams' worth stays
// a small part of any recent x86 core's L2 (1-2 MB), so the lines are still there when read (128 KB and
// 512 KB measured the same).
constexpr int64_t kWarmBytes = 128 << 10, kWarmStep = 256;

struct WarmShare {
  const char* first;               // the starts of this member's two streams of the next GEMM
  const char* second;
  int64_t first_bytes, second_bytes;   // how much of each to prefetch (at most kWarmBytes; 0: none)
  int64_t done;                    // prefetched so far, per stream
};

// One spin's worth of a WarmShare (Team::barrier's idle hook); false once it is all requested.
static bool warm_step(void* arg) {
  WarmShare& w = *static_cast<WarmShare*>(arg);
  if (w.done >= w.first_bytes) return false;   // the first stream is never the shorter one
  for (int64_t offset = w.done; offset < w.done + kWarmStep; offset += 64) {
    __builtin_prefetch(w.first + offset, 0, 2);   // prefetcht1: into L2 (and L3), not L1
    if (offset < w.second_bytes) __builtin_prefetch(w.second + offset, 0, 2);
  }
  w.done += kWarmStep;
  return true;
}

template <WeightFormat F>
static void tiles(Team& team, const Gemm& g, const Gemm* next) {
  const int64_t blocks = (g.N + NB - 1) / NB, groups = (g.M + MR - 1) / MR;
  if (groups == 1) {
    // Decode batches (M <= MR): each thread streams its contiguous range of blocks (streams()) as two
    // streams, its first half beside its second half (block lo + i with block lo + half + i), PAIR_ROWS
    // rows at a time: the first rows read the pair from DRAM, later rows from L2 (a pair is 2 * K * NB
    // weights). Then it warms its share of the next GEMM while it waits for the others (WarmShare).
    const auto [lo, hi, half] = streams(team, blocks);
    for (int64_t i = 0; i < half; ++i)
      for (int64_t m0 = 0; m0 < g.M; m0 += PAIR_ROWS) {
        const int64_t rows = g.M - m0 < PAIR_ROWS ? g.M - m0 : PAIR_ROWS;
        if (lo + half + i < hi) rows_tile<2, F>(g, m0, rows, {lo + i, lo + half + i});
        else rows_tile<1, F>(g, m0, rows, {lo + i});
      }
    if (next == nullptr) {
      team.barrier();
      return;
    }
    const auto [next_lo, next_hi, next_half] = streams(team, (next->N + NB - 1) / NB);
    const int64_t bytes = block_bytes(*next);   // the streams: blocks [lo, lo + half) and [lo + half, hi)
    WarmShare warm{(const char*)next->w + next_lo * bytes, (const char*)next->w + (next_lo + next_half) * bytes,
                   std::min(kWarmBytes, next_half * bytes), std::min(kWarmBytes, (next_hi - next_lo - next_half) * bytes),
                   0};
    team.barrier(warm_step, &warm);
    return;
  }
  // Prompt sizes: work items are (block, row group) pairs, block-major, so a small N still gives
  // every thread work.
  team.for_each(blocks * groups, [&](int64_t item) {
    const int64_t m0 = (item % groups) * MR;
    rows_tile<1, F>(g, m0, g.M - m0 < MR ? g.M - m0 : MR, {item / groups});
  });
}

void gemm_phase(Team& team, const Gemm& g, const Gemm* next) {
  // x's rows to the dot format's values first; the barrier publishes them to every tile
  if (g.format == kInt8Dot) team.for_each(g.M, [&](int64_t m) { quantize_row(g.x + m * g.K, g.K, *g.x_codes, m); });
  if (g.format == kBF16Dot) team.for_each(g.M, [&](int64_t m) { round_row_bf16(g.x + m * g.K, g.K, *g.x_codes, m); });
  switch (g.format) {
    case kF32: tiles<kF32>(team, g, next); break;
    case kInt8: tiles<kInt8>(team, g, next); break;
    case kBF16: tiles<kBF16>(team, g, next); break;
    case kF16: tiles<kF16>(team, g, next); break;
    case kInt8Dot: tiles<kInt8Dot>(team, g, next); break;
    case kBF16Dot: tiles<kBF16Dot>(team, g, next); break;
  }
}

extern "C" {
int stream_gemm_block_cols(void) { return NB; }
const char* cpu_kernels_isa(void) { return ISA; }
// How kInt8Dot's integer dot products run in this build: "avx512_vnni", "avx_vnni" or "portable".
const char* stream_gemm_dot_isa(void) { return dot_isa(); }
// How kBF16Dot's bf16 dot products run in this build: "avx512_bf16" (vdpbf16ps) or "portable".
const char* stream_gemm_bf16_isa(void) { return bf16_isa(); }
// The sum of x[0 .. n) read the way the GEMM streams its weights at decode batches (each thread's range
// as two streams side by side, the prefetch setting applied): the bench's measure of the machine's
// read bandwidth, so a roofline share compares a kernel with the fastest plain read known here.
float stream_read_sum(const float* x, int64_t n, int threads) {
  constexpr int64_t chunk = 2 * VL;   // 128 bytes (AVX-512) per stream and step, as a fp32 weight row of a block
  std::vector<float> partial(threads > 0 ? threads : 1);
  parallel(threads, [&](Team& team) {
    team.for_range(n / chunk, [&](int64_t lo, int64_t hi) {
      const int distance = prefetch_bytes.load(std::memory_order_relaxed);
      const int64_t half = (hi - lo) / 2;
      vf a = (vf){}, b = (vf){};
      for (int64_t i = lo; i < lo + half; ++i) {
        const float* first = x + i * chunk;
        const float* second = x + (i + half) * chunk;
        if (distance) {
          prefetch_ahead(first, chunk * 4, distance);
          prefetch_ahead(second, chunk * 4, distance);
        }
        a += load(first) + load(first + VL);
        b += load(second) + load(second + VL);
      }
      for (int64_t i = lo + 2 * half; i < hi; ++i) a += load(x + i * chunk) + load(x + i * chunk + VL);
      float total = 0.f;
      for (int l = 0; l < VL; ++l) total += a[l] + b[l];
      partial[team.index()] = total;
    });
  });
  float total = 0.f;
  for (float p : partial) total += p;
  for (int64_t i = n / chunk * chunk; i < n; ++i) total += x[i];
  return total;
}

// kBF16Dot's tiles of at most `rows` rows run on vdpbf16ps, larger ones on FMAs (the same results).
void stream_gemm_set_bf16_fused_rows(int rows) { bf16_fused_rows.store(rows, std::memory_order_relaxed); }

// The software prefetch distance of every later call (bytes; 0: none). Set before any call runs.
void stream_gemm_set_prefetch(int bytes) { prefetch_bytes.store(bytes, std::memory_order_relaxed); }

// y = gelu?(LN?(x) @ W * scale + bias) + residual; w: packed blocks in `format` (a WeightFormat; int8
// codes come with their scale). Null ln_weight: no LayerNorm; null ln_bias / scale / bias / residual: absent.
// K < 2^16 (kInt8Dot's int32 bound; stream_gemm.py checks it).
void stream_gemm(const float* x, int64_t M, int64_t K, const void* w, int format, int64_t N, const float* scale,
                 const float* ln_weight, const float* ln_bias, float eps, const float* bias, int gelu,
                 const float* residual, float* y, int threads) {
  std::vector<float> normalized(ln_weight ? M * K : 0);
  RowCodes x_codes(M, K, format == kInt8Dot, format == kBF16Dot);
  const Gemm g = make_gemm(ln_weight ? normalized.data() : x, M, K, w, format, N, scale, bias, gelu != 0, residual, y,
                           &x_codes);
  parallel(threads, [&](Team& team) {
    if (ln_weight) layer_norm_phase(team, x, M, K, ln_weight, ln_bias, eps, normalized.data());
    gemm_phase(team, g);
  });
}
}
