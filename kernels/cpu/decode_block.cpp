// One GPT-2 block's decode step, one token per sequence, in a single OpenMP parallel region:
//
//   qkv = LN_1(x) @ W_attn + b_attn           [B, 3C]; its K and V columns go into the pools at slot_mapping
//   a   = paged attention of qkv's Q columns  [B, C]  (heads H, D = C / H)
//   x1  = a @ W_proj + b_proj + x
//   out = gelu(LN_2(x1) @ W_fc + b_fc) @ W_mlp + b_mlp + x1
//
// Why: at batch 1 a GPT-2-small block is ~1 ms of weight streaming, and issuing its seven phases as
// separate calls from Python cost ~0.1 ms per block in call overhead and thread fork/joins. The phases
// are the same functions the separate calls run (kernels.h), in the same order, so the result is bitwise
// the one of the op-by-op path; each phase ends in a barrier, so each reads only what the previous ones
// finished writing. All inputs are validated before the region starts: on bad input nothing is written.
#include <cmath>
#include <vector>
#include <omp.h>

#include "kernels.h"

extern "C" {
// w_*: packed weights (stream_gemm.cpp), all four in `format` (a WeightFormat), int8 codes with their
// s_* scales (s_* ignored otherwise). Returns 0; 1 + a sequence index whose context or block table is out of range; or
// -(1 + a token index) whose slot is past the pools.
int64_t gpt2_decode_block(const float* x, int64_t B, int64_t C, int64_t H, int format, float eps,
                          const float* ln1_w, const float* ln1_b, const void* w_attn, const float* s_attn,
                          const float* b_attn, const void* w_proj, const float* s_proj, const float* b_proj,
                          const float* ln2_w, const float* ln2_b, const void* w_fc, const float* s_fc,
                          const float* b_fc, const void* w_mlp, const float* s_mlp, const float* b_mlp,
                          float* k_cache, float* v_cache, int64_t num_blocks, int64_t block_size,
                          const int64_t* slot_mapping, const int32_t* block_tables, int64_t table_width,
                          const int32_t* context_lens, float sm_scale, float* out, int threads) {
  const int64_t D = C / H;
  if (const int64_t bad = check_slots(slot_mapping, B, num_blocks * block_size)) return -bad;
  std::vector<float> h(B * C), qkv(B * 3 * C), attended(B * C), x1(B * C), hidden(B * 4 * C);
  AttentionWork attention(PagedAttention{qkv.data(), 3 * C, D, k_cache, v_cache, num_blocks, block_size, H, D,
                                         block_tables, table_width, context_lens, B, sm_scale, attended.data()});
  if (attention.bad_sequence()) return attention.bad_sequence();
  const WeightFormat f = (WeightFormat)format;
  const bool q8 = f == kInt8;
  const Gemm attn{h.data(), B, C, w_attn, f, 3 * C, q8 ? s_attn : nullptr, b_attn, false, nullptr, qkv.data()};
  const Gemm proj{attended.data(), B, C, w_proj, f, C, q8 ? s_proj : nullptr, b_proj, false, x, x1.data()};
  const Gemm fc{h.data(), B, C, w_fc, f, 4 * C, q8 ? s_fc : nullptr, b_fc, true, nullptr, hidden.data()};
  const Gemm mlp{hidden.data(), B, 4 * C, w_mlp, f, C, q8 ? s_mlp : nullptr, b_mlp, false, x1.data(), out};
#pragma omp parallel num_threads(threads)
  {
    layer_norm_phase(x, B, C, ln1_w, ln1_b, eps, h.data());
    gemm_phase(attn);
    write_kv_phase(qkv.data() + C, 3 * C, D, qkv.data() + 2 * C, 3 * C, D, k_cache, v_cache, slot_mapping, B, H, D);
    attention.run();
    gemm_phase(proj);
    layer_norm_phase(x1.data(), B, C, ln2_w, ln2_b, eps, h.data());
    gemm_phase(fc);
    gemm_phase(mlp);
  }
  return 0;
}
}
