// A GPT-2 model's decode step through all its blocks, one token per sequence, in a single parallel() call
// (team.h). Per block:
//
//   qkv = LN_1(x) @ W_attn + b_attn           [B, 3C]; its K and V columns go into the pools at slot_mapping
//   a   = paged attention of qkv's Q columns  [B, C]  (heads H, D = C / H)
//   x1  = a @ W_proj + b_proj + x
//   x   = gelu(LN_2(x1) @ W_fc + b_fc) @ W_mlp + b_mlp + x1
//
// and, where the LM head is given, logits = LN_f(x) @ W_head [B, V] after the last block.
//
// Why one call for every block (and the head): at batch 1 a GPT-2-small block is ~1 ms of weight
// streaming, and any host code between two blocks runs right after a weight stream has flushed the
// caches and the TLB: on a 2-vCPU Xeon VM three trivial tensor ops took ~3 us back to back and 150-300 us
// after a 160 MB stream, so a call per block and one for the head (argument checks, the cache views,
// the ctypes calls) cost ~1-2 ms of a ~22 ms step. The phases are the same functions the op-by-op calls run (kernels.h), in the same
// order, so the result is bitwise the one of the op-by-op path; each phase ends in a barrier, so each
// reads only what the previous ones finished writing. All inputs are validated before the region
// starts: on bad input nothing is written.
#include <cmath>
#include <vector>

#include "kernels.h"

// One linear of a block as the layer table stores it: packed weight (stream_gemm.cpp), its WeightFormat,
// the int8 codes' scales (null otherwise) and the bias.
struct TableLinear {
  const void* w;
  int64_t format;
  const float* scale;
  const float* bias;
};

// One block: a row of the layer table (decode_block.py builds it once from tensors that never move), 8
// bytes a field in this order.
struct TableBlock {
  const float* ln1_w;
  const float* ln1_b;
  TableLinear attn, proj;
  const float* ln2_w;
  const float* ln2_b;
  TableLinear fc, mlp;
};
static_assert(sizeof(TableBlock) == 20 * sizeof(int64_t), "decode_block.py's table_row() writes 20 fields");

extern "C" {
// x [B, C] in; layers [L] (TableBlock rows); kv [L, 2, num_blocks, block_size, H, D]: layer i's K pool is
// kv[i][0], its V pool kv[i][1]. Without a head (null), out [B, C] gets the last block's output; with
// one (the final LayerNorm's lnf_w, lnf_b and the head's weight, V outputs, no bias), out [B, V] gets the
// logits. out may not alias x. Returns 0; 1 + a sequence index whose context or block table is out of
// range; or -(1 + a token index) whose slot is past the pools.
int64_t gpt2_decode_layers(const float* x, int64_t B, int64_t C, int64_t H, float eps, int64_t L,
                           const TableBlock* layers, const float* lnf_w, const float* lnf_b, const TableLinear* head,
                           int64_t V, float* kv, int64_t num_blocks, int64_t block_size, const int64_t* slot_mapping,
                           const int32_t* block_tables, int64_t table_width, const int32_t* context_lens,
                           float sm_scale, float* out, int threads) {
  const int64_t D = C / H, pool = num_blocks * block_size * C;
  if (const int64_t bad = check_slots(slot_mapping, B, num_blocks * block_size)) return -bad;
  std::vector<float> h(B * C), qkv(B * 3 * C), attended(B * C), x1(B * C), hidden(B * 4 * C), last(head ? B * C : 0);
  float* y = head ? last.data() : out;   // the blocks' output
  AttentionWork attention(PagedAttention{qkv.data(), 3 * C, D, num_blocks, block_size, H, D, block_tables,
                                         table_width, context_lens, B, sm_scale, attended.data()});
  if (attention.bad_sequence()) return attention.bad_sequence();
  bool int8_rows = false, bf16_rows = false;   // whether any linear takes x's rows as int8 codes / bf16
  auto note_rows = [&](const TableLinear& lin) {
    int8_rows |= lin.format == kInt8Dot;
    bf16_rows |= lin.format == kBF16Dot;
  };
  for (int64_t i = 0; i < L; ++i)
    for (const TableLinear* lin : {&layers[i].attn, &layers[i].proj, &layers[i].fc, &layers[i].mlp}) note_rows(*lin);
  if (head) note_rows(*head);
  RowCodes x_codes(B, 4 * C, int8_rows, bf16_rows);
  auto gemm = [&](const TableLinear& lin, const float* in, int64_t K, int64_t N, bool gelu, const float* residual,
                  float* dst) {
    return make_gemm(in, B, K, lin.w, (int)lin.format, N, lin.scale, lin.bias, gelu, residual, dst, &x_codes);
  };
  // Every GEMM of the call in order, four a block and then the head. Layer 0 reads x; every layer writes
  // y, which the next one reads (the MLP's write of y comes after the projection's read of it as the
  // residual: a barrier apart).
  std::vector<Gemm> gemms;
  for (int64_t i = 0; i < L; ++i) {
    const TableBlock& p = layers[i];
    const float* in = i == 0 ? x : y;
    gemms.push_back(gemm(p.attn, h.data(), C, 3 * C, false, nullptr, qkv.data()));
    gemms.push_back(gemm(p.proj, attended.data(), C, C, false, in, x1.data()));
    gemms.push_back(gemm(p.fc, h.data(), C, 4 * C, true, nullptr, hidden.data()));
    gemms.push_back(gemm(p.mlp, hidden.data(), 4 * C, C, false, x1.data(), y));
  }
  if (head) gemms.push_back(gemm(*head, h.data(), C, V, false, nullptr, out));
  // each GEMM phase names the next GEMM, whose weights a member done early prefetches (gemm_phase)
  auto gemm_step = [&](Team& team, size_t k) {
    gemm_phase(team, gemms[k], k + 1 < gemms.size() ? &gemms[k + 1] : nullptr);
  };
  parallel(threads, [&](Team& team) {
    for (int64_t i = 0; i < L; ++i) {
      const TableBlock& p = layers[i];
      float* k_cache = kv + 2 * i * pool;
      float* v_cache = k_cache + pool;
      layer_norm_phase(team, i == 0 ? x : y, B, C, p.ln1_w, p.ln1_b, eps, h.data());
      gemm_step(team, 4 * i);
      write_kv_phase(team, qkv.data() + C, 3 * C, D, qkv.data() + 2 * C, 3 * C, D, k_cache, v_cache, slot_mapping,
                     B, H, D);
      attention.run(team, k_cache, v_cache);
      gemm_step(team, 4 * i + 1);
      layer_norm_phase(team, x1.data(), B, C, p.ln2_w, p.ln2_b, eps, h.data());
      gemm_step(team, 4 * i + 2);
      gemm_step(team, 4 * i + 3);
    }
    if (head) {
      layer_norm_phase(team, y, B, C, lnf_w, lnf_b, eps, h.data());
      gemm_step(team, 4 * L);
    }
  });
  return 0;
}
}
