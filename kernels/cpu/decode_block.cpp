// One GPT-2 block's decode step, one token per sequence, in a single parallel() call (team.h):
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

#include "kernels.h"

extern "C" {
// w_*: packed weights (stream_gemm.cpp), each in its f_* (a WeightFormat), int8 codes with their s_* scales
// (s_* ignored otherwise). Returns 0; 1 + a sequence index whose context or block table is out of range; or
// -(1 + a token index) whose slot is past the pools.
int64_t gpt2_decode_block(const float* x, int64_t B, int64_t C, int64_t H, float eps,
                          const float* ln1_w, const float* ln1_b, const void* w_attn, int f_attn, const float* s_attn,
                          const float* b_attn, const void* w_proj, int f_proj, const float* s_proj, const float* b_proj,
                          const float* ln2_w, const float* ln2_b, const void* w_fc, int f_fc, const float* s_fc,
                          const float* b_fc, const void* w_mlp, int f_mlp, const float* s_mlp, const float* b_mlp,
                          float* k_cache, float* v_cache, int64_t num_blocks, int64_t block_size,
                          const int64_t* slot_mapping, const int32_t* block_tables, int64_t table_width,
                          const int32_t* context_lens, float sm_scale, float* out, int threads) {
  const int64_t D = C / H;
  if (const int64_t bad = check_slots(slot_mapping, B, num_blocks * block_size)) return -bad;
  std::vector<float> h(B * C), qkv(B * 3 * C), attended(B * C), x1(B * C), hidden(B * 4 * C);
  AttentionWork attention(PagedAttention{qkv.data(), 3 * C, D, k_cache, v_cache, num_blocks, block_size, H, D,
                                         block_tables, table_width, context_lens, B, sm_scale, attended.data()});
  if (attention.bad_sequence()) return attention.bad_sequence();
  auto any_in = [&](int format) { return f_attn == format || f_proj == format || f_fc == format || f_mlp == format; };
  RowCodes x_codes(B, 4 * C, any_in(kInt8Dot), any_in(kBF16Dot));
  const Gemm attn = make_gemm(h.data(), B, C, w_attn, f_attn, 3 * C, s_attn, b_attn, false, nullptr, qkv.data(), &x_codes);
  const Gemm proj = make_gemm(attended.data(), B, C, w_proj, f_proj, C, s_proj, b_proj, false, x, x1.data(), &x_codes);
  const Gemm fc = make_gemm(h.data(), B, C, w_fc, f_fc, 4 * C, s_fc, b_fc, true, nullptr, hidden.data(), &x_codes);
  const Gemm mlp = make_gemm(hidden.data(), B, 4 * C, w_mlp, f_mlp, C, s_mlp, b_mlp, false, x1.data(), out, &x_codes);
  parallel(threads, [&](Team& team) {
    layer_norm_phase(team, x, B, C, ln1_w, ln1_b, eps, h.data());
    gemm_phase(team, attn);
    write_kv_phase(team, qkv.data() + C, 3 * C, D, qkv.data() + 2 * C, 3 * C, D, k_cache, v_cache, slot_mapping, B, H, D);
    attention.run(team);
    gemm_phase(team, proj);
    layer_norm_phase(team, x1.data(), B, C, ln2_w, ln2_b, eps, h.data());
    gemm_phase(team, fc);
    gemm_phase(team, mlp);
  });
  return 0;
}
}
