// The CPU kernels' phases, run by every member of a parallel() team (team.h). Each phase shares its work
// with Team::for_each and so ends in a barrier: a phase's writes are complete and visible before any
// thread starts the next phase. stream_gemm.cpp and paged_attention.cpp run their phases in a parallel()
// call of their own; decode_block.cpp runs a whole GPT-2 block's decode step in one.
#pragma once
#include <cstdint>
#include <vector>

#include "team.h"

// How a packed weight's values are stored (stream_gemm.cpp has each layout): kF32 .. kF16 are widened
// to fp32 in registers and multiply fp32 activations; the dot-product formats multiply activations
// rounded to their own type: kInt8Dot (int8 codes + 128, integer dot products) int8 codes of the
// activations (w8a8), kBF16Dot (bf16 in k pairs, AVX512-BF16's vdpbf16ps) the activations in bf16.
enum WeightFormat : int { kF32 = 0, kInt8 = 1, kBF16 = 2, kF16 = 3, kInt8Dot = 4, kBF16Dot = 5 };

inline bool is_dot_format(int format) { return format == kInt8Dot || format == kBF16Dot; }

// A dot-product GEMM's activations: gemm_phase stores x's rows here before its tiles run. kInt8Dot:
// int8 codes (symmetric per row: code = round(x * 127 / max|x|), scale = max|x| / 127, and each row's
// code sum); kBF16Dot: x rounded to bf16 (to nearest even), as bit patterns. Rows of `stride` values:
// K rounded up to a multiple of 4, zero past K. Sized for the largest GEMM that uses it, holding only
// what its formats need (int8 codes, bf16 values); one scratch serves GEMMs run one after another.
struct RowCodes {
  RowCodes(int64_t rows, int64_t max_k, bool int8, bool bf16)
      : stride((max_k + 3) / 4 * 4), codes(int8 ? rows * stride : 0), bf16(bf16 ? rows * stride : 0),
        scales(int8 ? rows : 0), sums(int8 ? rows : 0) {}
  int64_t stride;
  std::vector<int8_t> codes;
  std::vector<uint16_t> bf16;
  std::vector<float> scales;
  std::vector<int32_t> sums;
};

struct Gemm {
  const float* x; int64_t M, K;        // x [M, K], row-major
  const void* w; WeightFormat format;  // packed blocks (layout: stream_gemm.cpp)
  int64_t N;
  const float* scale;                  // [N] (int8 formats only) or null
  const float* bias;                   // [N] or null
  bool gelu;                           // GELU (tanh form) after the bias
  const float* residual;               // [M, N] or null, added last
  float* y;                            // [M, N]
  RowCodes* x_codes;                   // dot-product formats only (else null): where x's rows are rounded
};

// The Gemm of a linear stored in `format`: the scale taken for int8 formats only, the codes for dot formats only.
inline Gemm make_gemm(const float* x, int64_t M, int64_t K, const void* w, int format, int64_t N, const float* scale,
                      const float* bias, bool gelu, const float* residual, float* y, RowCodes* x_codes) {
  const WeightFormat f = (WeightFormat)format;
  return Gemm{x, M, K, w, f, N, f == kInt8 || f == kInt8Dot ? scale : nullptr, bias, gelu, residual, y,
              is_dot_format(f) ? x_codes : nullptr};
}

// h[m] = LayerNorm(x[m]) * weight + bias for every row m < M (bias may be null).
void layer_norm_phase(Team& team, const float* x, int64_t M, int64_t K, const float* weight, const float* bias, float eps, float* h);
// y = gelu?(x @ W * scale + bias) + residual. next: the GEMM that follows (null: none or unknown), whose
// weights a member that finishes its share early prefetches while it waits for the others.
void gemm_phase(Team& team, const Gemm& g, const Gemm* next = nullptr);

// k_cache/v_cache row slot_mapping[t] = k[t], v[t] (H rows of D at the given strides); negative slots skipped.
void write_kv_phase(Team& team, const float* k, int64_t k_stride_t, int64_t k_stride_h, const float* v, int64_t v_stride_t,
                    int64_t v_stride_h, float* k_cache, float* v_cache, const int64_t* slot_mapping, int64_t T,
                    int64_t H, int64_t D);
// 0, or 1 + the first token whose slot is past num_slots.
int64_t check_slots(const int64_t* slot_mapping, int64_t T, int64_t num_slots);

// Paged decode attention (paged_attention.cpp): built outside a parallel() call (validation and the work
// list), then run() inside one by every member, over pools of num_blocks x block_size rows: the same
// work for every layer of a step (each layer's pools passed to run()).
struct PagedAttention {
  const float* q; int64_t q_stride_b, q_stride_h;    // q [B, H, D], D contiguous
  int64_t num_blocks, block_size, H, D;
  const int32_t* block_tables; int64_t table_width;  // [B, table_width]
  const int32_t* context_lens; int64_t B;
  float scale;
  float* out;                                        // [B, H, D]
};

class AttentionWork {
 public:
  explicit AttentionWork(const PagedAttention& a);
  int64_t bad_sequence() const { return bad_; }      // 0, or 1 + the first sequence out of range
  // by every member of a team, two phases; pools [num_blocks, block_size, H, D]
  void run(Team& team, const float* k_cache, const float* v_cache);
 private:
  PagedAttention a_;
  int64_t bad_ = 0;
  std::vector<int64_t> first_item_, item_sequence_;
  std::vector<float> partials_;
};
