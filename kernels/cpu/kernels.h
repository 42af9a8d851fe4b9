// The CPU kernels' phases, for use inside an OpenMP parallel region. Each phase is an orphaned `omp for`
// and so ends in an implicit barrier, which is also a flush: a phase's writes are complete and visible
// before any thread starts the next phase. stream_gemm.cpp and paged_attention.cpp wrap their phases in
// a parallel region of their own; decode_block.cpp runs a whole GPT-2 block's decode step in one.
#pragma once
#include <cstdint>
#include <vector>

// How a packed weight's values are stored (stream_gemm.cpp widens each to fp32 in registers).
enum WeightFormat : int { kF32 = 0, kInt8 = 1, kBF16 = 2, kF16 = 3 };

struct Gemm {
  const float* x; int64_t M, K;        // x [M, K], row-major
  const void* w; WeightFormat format;  // packed blocks (layout: stream_gemm.cpp)
  int64_t N;
  const float* scale;                  // [N] (int8 only) or null
  const float* bias;                   // [N] or null
  bool gelu;                           // GELU (tanh form) after the bias
  const float* residual;               // [M, N] or null, added last
  float* y;                            // [M, N]
};

// h[m] = LayerNorm(x[m]) * weight + bias for every row m < M (bias may be null).
void layer_norm_phase(const float* x, int64_t M, int64_t K, const float* weight, const float* bias, float eps, float* h);
// y = gelu?(x @ W * scale + bias) + residual.
void gemm_phase(const Gemm& g);

// k_cache/v_cache row slot_mapping[t] = k[t], v[t] (H rows of D at the given strides); negative slots skipped.
void write_kv_phase(const float* k, int64_t k_stride_t, int64_t k_stride_h, const float* v, int64_t v_stride_t,
                    int64_t v_stride_h, float* k_cache, float* v_cache, const int64_t* slot_mapping, int64_t T,
                    int64_t H, int64_t D);
// 0, or 1 + the first token whose slot is past num_slots.
int64_t check_slots(const int64_t* slot_mapping, int64_t T, int64_t num_slots);

// Paged decode attention (paged_attention.cpp): built outside a parallel region (validation and the work
// list), then run() inside one by every thread.
struct PagedAttention {
  const float* q; int64_t q_stride_b, q_stride_h;    // q [B, H, D], D contiguous
  const float* k_cache; const float* v_cache;        // [num_blocks, block_size, H, D]
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
  void run();                                        // inside a parallel region; two phases
 private:
  PagedAttention a_;
  int64_t bad_ = 0;
  std::vector<int64_t> first_item_, item_sequence_;
  std::vector<float> partials_;
};
