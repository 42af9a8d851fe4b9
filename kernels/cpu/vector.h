// Vector helpers shared by the CPU kernels: the native vector width, loads/stores, horizontal sum and
// a vectorised e^x. Compiled with -march=native: VL follows the ISA of the CPU the library is built on.
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define VL 16
#define ISA "avx512"
#elif defined(__AVX2__)
#define VL 8
#define ISA "avx2"
#else
#define VL 4
#define ISA "generic"
#endif

typedef float vf __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));

static inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
static inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
static inline vf splat(float s) { return (vf){} + s; }

static inline float hsum(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#elif defined(__AVX2__)
  __m128 s = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
#else
  float s = 0.f;
  for (int i = 0; i < VL; ++i) s += v[i];
  return s;
#endif
}

// e^x within 2 ulp of expf for x in [-87, 88] (Cephes' single-precision scheme): x = n ln2 + r with
// n = round(x / ln2), |r| <= ln2 / 2; e^r by a degree-6 polynomial; 2^n through the exponent bits.
// x is clamped to [-87, 88]: e^-87 ~ 1.6e-38 keeps 2^n a normal number, e^88 ~ 1.7e38 < FLT_MAX.
static inline vf vexp(vf x) {
  x = x < splat(-87.f) ? splat(-87.f) : x;
  x = x > splat(88.f) ? splat(88.f) : x;
  const vf shifter = splat(12582912.f);                        // 1.5 * 2^23: adding it rounds to an integer
  const vf n = (x * 1.44269504088896341f + shifter) - shifter;
  const vf r = (x - n * 0.693359375f) + n * 2.12194440e-4f;   // ln2 split in two for an exact n * ln2
  vf p = splat(1.9875691500E-4f);
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

// GELU, tanh form: 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), written as x / (1 + e^(-2u))
// (= 0.5 x (1 + tanh u) exactly); e^(-2u) saturates through vexp's clamp, giving x or 0 in the tails.
static inline vf gelu_tanh(vf x) {
  const vf u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return x / (1.f + vexp(-2.f * u));
}
