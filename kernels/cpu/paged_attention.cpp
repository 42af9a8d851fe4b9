// Paged decode attention on the CPU: one query row per sequence over its cached keys and values, read in
// place from the paged K/V pools (no gathered copy), fp32; and the K/V write into the pools.
//
//   out[b, h, :] = softmax_p(scale * q[b, h, :] . K[slot(b, p), h, :]) @ V[slot(b, p), h, :],  p < len[b]
//   slot(b, p)   = block_tables[b, p / block_size] * block_size + p % block_size
//
// Memory layout: the pools are [num_blocks, block_size, H, D] contiguous, so the row of (slot, head) is
// D contiguous floats at (slot * H + h) * D; q is [B, H, D] with D contiguous (strides given: it is a
// view into the QKV GEMM's output), out is [B, H, D] contiguous.
//
// Why: the gather-then-SDPA reference copies every sequence's K and V (index_select), then reads them
// again; at decode that is 3x the KV bytes and ~2 ms of a GPT-2-small step on a 2-core EPYC.
//
// Work split (flash-decoding): a sequence's positions are cut into chunks of CHUNK positions, and one
// work item is one (sequence, chunk) pair over all H heads, so it reads the chunk's K rows and then its V
// rows front to back (a position's H * D values are contiguous) and a batch-1 step still spreads over the
// threads. An item writes, per head, its partial softmax state: the max score m, the sum l of
// exp(score - m) and the exp-weighted sum of V rows. A second pass merges a sequence's chunks in order:
//     M = max_c m_c,   out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c.
// The chunking depends only on the sequence's own length and every sum runs in a fixed order, so the
// result is bitwise the same at any batch size or thread count (batch invariance).
#include <cmath>
#include <vector>

#include "kernels.h"
#include "vector.h"

#define CHUNK 16   // positions per work item (a multiple of VL)

static inline float dot(const float* a, const float* b, int64_t d) {
  vf acc = (vf){};
  int64_t i = 0;
  for (; i + VL <= d; i += VL) acc += load(a + i) * load(b + i);
  float s = hsum(acc);
  for (; i < d; ++i) s += a[i] * b[i];
  return s;
}

// acc[0 .. d) += w * row[0 .. d)
static inline void axpy(float* acc, float w, const float* row, int64_t d) {
  int64_t i = 0;
  for (; i + VL <= d; i += VL) store(acc + i, load(acc + i) + w * load(row + i));
  for (; i < d; ++i) acc[i] += w * row[i];
}

// xs[0 .. n) = e^(xs - shift); xs has room for a multiple of VL
static inline void exp_shifted(float* xs, float shift, int64_t n) {
  for (int64_t i = 0; i < n; i += VL) store(xs + i, vexp(load(xs + i) - shift));
}

static inline int64_t slot_of(const PagedAttention& a, int64_t b, int64_t p) {
  return (int64_t)a.block_tables[b * a.table_width + p / a.block_size] * a.block_size + p % a.block_size;
}

// Positions p0 .. p0+n-1 of sequence b, every head: partial[h] = {m, l, acc[D]}.
static void chunk(const PagedAttention& a, const float* k_cache, const float* v_cache, int64_t b, int64_t p0, int64_t n,
                  float* partial, float* scores) {
  const int64_t H = a.H, D = a.D, row = H * D, stride = 2 + D;
  for (int64_t i = 0; i < n; ++i) {
    const float* keys = k_cache + slot_of(a, b, p0 + i) * row;
    for (int64_t h = 0; h < H; ++h)
      scores[h * CHUNK + i] = a.scale * dot(a.q + b * a.q_stride_b + h * a.q_stride_h, keys + h * D, D);
  }
  for (int64_t h = 0; h < H; ++h) {   // scores -> weights e^(score - max), and their sum
    float* part = partial + h * stride;
    float top = scores[h * CHUNK], total = 0.f;
    for (int64_t i = 1; i < n; ++i) top = scores[h * CHUNK + i] > top ? scores[h * CHUNK + i] : top;
    exp_shifted(scores + h * CHUNK, top, n);
    for (int64_t i = 0; i < n; ++i) total += scores[h * CHUNK + i];
    part[0] = top, part[1] = total;
    std::memset(part + 2, 0, D * sizeof(float));
  }
  for (int64_t i = 0; i < n; ++i) {
    const float* values = v_cache + slot_of(a, b, p0 + i) * row;
    for (int64_t h = 0; h < H; ++h) axpy(partial + h * stride + 2, scores[h * CHUNK + i], values + h * D, D);
  }
}

AttentionWork::AttentionWork(const PagedAttention& a) : a_(a), first_item_(a.B + 1, 0) {
  for (int64_t b = 0; b < a.B; ++b) {   // validate every table entry a sequence uses before reading any
    const int64_t len = a.context_lens[b];
    bool ok = len >= 1 && len <= a.table_width * a.block_size;
    for (int64_t i = 0; ok && i < (len + a.block_size - 1) / a.block_size; ++i) {
      const int32_t block = a.block_tables[b * a.table_width + i];
      ok = block >= 0 && block < a.num_blocks;
    }
    if (!ok) {
      bad_ = b + 1;
      return;
    }
    first_item_[b + 1] = first_item_[b] + (len + CHUNK - 1) / CHUNK;   // sequence b's chunks: its items
  }
  item_sequence_.resize(first_item_[a.B]);
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t i = first_item_[b]; i < first_item_[b + 1]; ++i) item_sequence_[i] = b;
  partials_.resize(first_item_[a.B] * a.H * (2 + a.D));
}

void AttentionWork::run(Team& team, const float* k_cache, const float* v_cache) {
  const PagedAttention& a = a_;
  const int64_t H = a.H, D = a.D, stride = 2 + D, items = first_item_[a.B];
  std::vector<float> scores(H * CHUNK);   // this thread's
  team.for_each(items, [&](int64_t item) {
    const int64_t b = item_sequence_[item], p0 = (item - first_item_[b]) * CHUNK;
    const int64_t n = a.context_lens[b] - p0 < CHUNK ? a.context_lens[b] - p0 : CHUNK;
    chunk(a, k_cache, v_cache, b, p0, n, partials_.data() + item * H * stride, scores.data());
  });
  // (the barrier: every partial is written before any merge reads it)
  team.for_each(a.B * H, [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    float top = -INFINITY;
    for (int64_t c = first_item_[b]; c < first_item_[b + 1]; ++c) {
      const float m = partials_[(c * H + h) * stride];
      top = m > top ? m : top;
    }
    float* o = a.out + bh * D;
    std::memset(o, 0, D * sizeof(float));
    float total = 0.f;
    for (int64_t c = first_item_[b]; c < first_item_[b + 1]; ++c) {
      const float* part = partials_.data() + (c * H + h) * stride;
      const float w = std::exp(part[0] - top);
      total += w * part[1];
      axpy(o, w, part + 2, D);
    }
    const float inv = 1.f / total;
    for (int64_t i = 0; i < D; ++i) o[i] *= inv;
  });
}

int64_t check_slots(const int64_t* slot_mapping, int64_t T, int64_t num_slots) {
  for (int64_t t = 0; t < T; ++t)
    if (slot_mapping[t] >= num_slots) return t + 1;
  return 0;
}

void write_kv_phase(Team& team, const float* k, int64_t k_stride_t, int64_t k_stride_h, const float* v,
                    int64_t v_stride_t, int64_t v_stride_h, float* k_cache, float* v_cache, const int64_t* slot_mapping,
                    int64_t T, int64_t H, int64_t D) {
  team.for_each(T, [&](int64_t t) {
    const int64_t slot = slot_mapping[t];
    if (slot < 0) return;
    for (int64_t h = 0; h < H; ++h) {
      std::memcpy(k_cache + (slot * H + h) * D, k + t * k_stride_t + h * k_stride_h, D * sizeof(float));
      std::memcpy(v_cache + (slot * H + h) * D, v + t * v_stride_t + h * v_stride_h, D * sizeof(float));
    }
  });
}

extern "C" {
// Returns 0, or 1 + the index of the first sequence whose length or block table is out of range (then
// nothing is computed).
int64_t paged_decode_attention_f32(const float* q, int64_t q_stride_b, int64_t q_stride_h, const float* k_cache,
                                   const float* v_cache, int64_t num_blocks, int64_t block_size, int64_t H,
                                   const int32_t* block_tables, int64_t table_width, const int32_t* context_lens,
                                   int64_t B, float scale, float* out, int64_t D, int threads) {
  AttentionWork work(PagedAttention{q, q_stride_b, q_stride_h, num_blocks, block_size, H, D,
                                    block_tables, table_width, context_lens, B, scale, out});
  if (work.bad_sequence()) return work.bad_sequence();
  parallel(threads, [&](Team& team) { work.run(team, k_cache, v_cache); });
  return 0;
}

// k_cache/v_cache row slot_mapping[t] (a slot: block * block_size + offset) = k[t], v[t]; a negative slot
// is skipped. Returns 0, or 1 + the first token whose slot is past the pools (then nothing is written).
int64_t paged_write_kv_f32(const float* k, int64_t k_stride_t, int64_t k_stride_h, const float* v, int64_t v_stride_t,
                           int64_t v_stride_h, float* k_cache, float* v_cache, const int64_t* slot_mapping, int64_t T,
                           int64_t num_slots, int64_t H, int64_t D) {
  if (const int64_t bad = check_slots(slot_mapping, T, num_slots)) return bad;
  Team alone(0, 1, nullptr);   // a copy of T rows: not worth waking the pool
  write_kv_phase(alone, k, k_stride_t, k_stride_h, v, v_stride_t, v_stride_h, k_cache, v_cache, slot_mapping, T, H, D);
  return 0;
}
}
