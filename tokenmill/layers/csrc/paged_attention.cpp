// Paged attention for the CPU over a flat, ragged batch of query rows: row b has query tokens
// [query_start_loc[b], query_start_loc[b+1]) and attends over its first seq_lens[b] cached keys, read in
// place through its block table (no gather copy). Query j of a row with n queries sees keys
// [0, seq_len - n + j]: causal among the row's own new tokens, which were written to the cache already.
// One query per row is a plain decode; several are a speculative verification or a short prompt chunk.
//
// Within a block each KV head's tokens are contiguous, so a (row, KV head) task streams whole cache lines.
// The query heads sharing a KV head (grouped-query attention) and the row's queries are handled together, so
// each K/V vector is read once per task. Scores live in a small per-task buffer: pass 1 computes q.k, pass 2
// the softmax, pass 3 accumulates the values; accumulation in fp32. The log-sum-exp of every (query, head) can
// be returned with the output, so attention over disjoint key sets can be merged exactly afterwards.
//
// KV eviction policies (H2O, SnapKV) rank cached tokens by the attention they receive. The kernel adds those
// weights as it computes them: for a row with score_from[b] = f >= 0, the softmax weight of every query j >= f
// (summed over the query heads of a KV head) is added to scores[b, h, t] for each key slot t. No second pass
// over the cache.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "kivi_checks.h"
#include "isa.h"
#include "packed_rows.h"
#include "split_kv_attention.h"

// A residual row as floats: fp32 rows as they are, fp16 rows widened into buf (F16C where the build has it),
// once per key or value, for every query row of the task.
static inline const float* float_row(const float* src, float*, int64_t) { return src; }
static inline const float* float_row(const at::Half* src, float* buf, int64_t D) {
  int64_t i = 0;
#ifdef TM_AVX2
  for (; i + 8 <= D; i += 8)
    _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < D; ++i) buf[i] = static_cast<float>(src[i]);
  return buf;
}

template <typename C>
static inline float dot_row(const float* a, const C* b, int64_t D) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < D; ++i) s += a[i] * static_cast<float>(b[i]);
  return s;
}

// One (row, KV head) task of either kernel: the row's queries for the KV head's query heads as rows
// r = j * QG + g (token j, head g), scaled by `scale`, with their scores over the row's L keys, running max,
// softmax sums and fp32 value accumulators. Query row r sees keys [0, first + r / QG]: causal among the row's
// own new tokens. The kernels differ only in how they read a key or value; the passes are these.
struct TaskRows {
  int64_t R = 0, L = 0, D = 0, QG = 1, first = 0;
  std::vector<float> qf, scores, acc, maxs, sums;
  std::vector<int64_t> visible;

  template <typename T>
  void start(const T* q, int64_t q0, int64_t n, int64_t h, int64_t H, int64_t qg, int64_t d, int64_t l,
             float scale) {
    QG = qg, D = d, L = l, R = n * qg, first = l - n;
    scores.resize(R * L);
    qf.resize(R * D);
    acc.assign(R * D, 0.f);
    maxs.assign(R, -std::numeric_limits<float>::infinity());
    sums.assign(R, 0.f);
    visible.resize(R);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t g = 0; g < QG; ++g) {
        const T* src = q + ((q0 + j) * H + h * QG + g) * D;
        float* dst = qf.data() + (j * QG + g) * D;
        for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<float>(src[i]) * scale;
        visible[j * QG + g] = first + j + 1;
      }
  }
  const float* query(int64_t r) const { return qf.data() + r * D; }
  int64_t first_row(int64_t t) const { return t < first ? 0 : (t - first) * QG; }  // rows that see key t

  // Pass 1, one key: score(r) is row r's scaled q . k_t.
  template <typename Score>
  void score_key(int64_t t, Score score) {
    for (int64_t r = first_row(t); r < R; ++r) {
      const float s = score(r);
      scores[r * L + t] = s;
      maxs[r] = std::max(maxs[r], s);
    }
  }

  // Pass 2: softmax numerators and sums (vectorized exp under -ffast-math, libmvec).
  void softmax() {
    for (int64_t r = 0; r < R; ++r) {
      float* sr = scores.data() + r * L;
      const float m = maxs[r];
      const int64_t vis = visible[r];
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t t = 0; t < vis; ++t) {
        sr[t] = std::exp(sr[t] - m);
        sum += sr[t];
      }
      sums[r] = sum;
    }
  }

  // The attention weight each key slot receives from rows of queries >= from, summed into dst (eviction).
  void add_weights(float* dst, int64_t from) const {
    for (int64_t r = from * QG; r < R; ++r) {
      const float* sr = scores.data() + r * L;
      const float inv = 1.f / sums[r];
      const int64_t vis = visible[r];
#pragma omp simd
      for (int64_t t = 0; t < vis; ++t) dst[t] += sr[t] * inv;
    }
  }

  // Pass 3, one value row v_t (times v_scale) into every row that sees it.
  template <typename V>
  void add_value(int64_t t, const V* v, float v_scale) {
    for (int64_t r = first_row(t); r < R; ++r) {
      const float p = scores[r * L + t] * v_scale;
      float* ar = acc.data() + r * D;
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) ar[i] += p * static_cast<float>(v[i]);
    }
  }

  template <typename T>
  void write(T* out, float* lse, int64_t q0, int64_t h, int64_t H) const {
    for (int64_t r = 0; r < R; ++r) {
      const int64_t j = r / QG, head = h * QG + r % QG;
      T* dst = out + ((q0 + j) * H + head) * D;
      const float inv = 1.f / sums[r];
      for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<T>(acc[r * D + i] * inv);
      if (lse != nullptr) lse[(q0 + j) * H + head] = maxs[r] + std::log(sums[r]);
    }
  }
};

// T: the queries' (and output's) type; C: the cache's element type. An int8 cache comes with one fp32 scale
// per (token, head) for K (ks) and V (vs), applied to whole dot products and to each softmax weight, so the
// packed blocks are read in place and never dequantized into a copy. An int4 cache (C = uint8_t) packs two
// codes per byte (byte j: element j in the low nibble, element j + D/2 in the high one) with an fp16
// (scale, min) pair per group of `D / G` elements: each K or V row is dequantized (decode_row, vectorized) into
// a D-float buffer once and used by every query row of the task.
template <typename T, typename C>
static void attention_kernel(const T* q, const C* kc, const C* vc, const void* ks_, const void* vs_, int64_t G,
                             const int64_t* tables, const int64_t* lens, const int64_t* qsl, T* out, float* lse,
                             float* score_out, const int64_t* score_from, int64_t score_len, int64_t B, int64_t H,
                             int64_t Hkv, int64_t D, int64_t bs, int64_t max_blocks, float scale) {
  constexpr bool int4 = std::is_same<C, uint8_t>::value;
  const float* ks = int4 ? nullptr : static_cast<const float*>(ks_);
  const float* vs = int4 ? nullptr : static_cast<const float*>(vs_);
  const at::Half* ksm = int4 ? static_cast<const at::Half*>(ks_) : nullptr;
  const at::Half* vsm = int4 ? static_cast<const at::Half*>(vs_) : nullptr;
  const int64_t NG = int4 ? G : 1, grp = D / NG, row_elems = int4 ? D / 2 : D;
  const int64_t QG = H / Hkv;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    TaskRows rows;
    std::vector<float> kv(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, h = task % Hkv;
      const int64_t L = lens[b], q0 = qsl[b], n = qsl[b + 1] - q0;
      if (n <= 0) continue;
      const int64_t* table = tables + b * max_blocks;
      rows.start(q, q0, n, h, H, QG, D, L, scale);
      for (int64_t t = 0; t < L; ++t) {
        const int64_t row = (table[t / bs] * Hkv + h) * bs + t % bs;
        const C* k = kc + row * row_elems;
        if constexpr (int4) {
          decode_row(k, 4, D, grp, ksm + row * NG * 2, kv.data());  // dequantized once for all rows
          rows.score_key(t, [&](int64_t r) { return dot_row(rows.query(r), kv.data(), D); });
        } else {
          const float k_scale = ks != nullptr ? ks[row] : 1.f;
          rows.score_key(t, [&](int64_t r) { return dot_row(rows.query(r), k, D) * k_scale; });
        }
      }
      rows.softmax();
      if (score_out != nullptr && score_from[b] >= 0) rows.add_weights(score_out + (b * Hkv + h) * score_len, score_from[b]);
      for (int64_t t = 0; t < L; ++t) {
        const int64_t row = (table[t / bs] * Hkv + h) * bs + t % bs;
        const C* v = vc + row * row_elems;
        if constexpr (int4) {
          decode_row(v, 4, D, grp, vsm + row * NG * 2, kv.data());
          rows.add_value(t, kv.data(), 1.f);
        } else {
          rows.add_value(t, v, vs != nullptr ? vs[row] : 1.f);
        }
      }
      rows.write(out, lse, q0, h, H);
    }
  });
}

// q [T, H, D]; k_cache, v_cache [num_blocks, Hkv, block_size, D] in q's dtype, or int8 with k_scale, v_scale
// [num_blocks, Hkv, block_size] fp32, or int4 as uint8 [num_blocks, Hkv, block_size, D / 2] with k_scale,
// v_scale [num_blocks, Hkv, block_size, G, 2] fp16 (scale, min per group) (quantized: q is fp32); block_tables [B, max_blocks] int64; seq_lens [B] int64
// (>= the row's query count); query_start_loc [B + 1] int64, rows of q in order. Returns (out [T, H, D],
// lse [T, H] fp32, empty unless return_lse). Rows of q outside every range stay uninitialized.
// scores [B, Hkv, >= max seq_len] fp32 (optional, accumulated into) with score_from [B] int64: see above.
// The optional attention-score output of both kernels, checked: [rows, Hkv, >= max seq_len] fp32 plus a
// per-row first query index that scores (eviction policies, see kv/eviction.py).
struct ScoreArgs {
  float* ptr = nullptr;
  const int64_t* from = nullptr;
  int64_t len = 0;
  torch::Tensor from_c;  // keeps `from` alive
};

static ScoreArgs check_scores(const c10::optional<torch::Tensor>& scores, const c10::optional<torch::Tensor>& score_from,
                              int64_t B, int64_t Hkv, const torch::Tensor& seq_lens) {
  ScoreArgs a;
  if (!scores.has_value()) return a;
  TORCH_CHECK(score_from.has_value(), "scores need score_from");
  TORCH_CHECK(scores->scalar_type() == at::kFloat && scores->is_contiguous() && scores->dim() == 3 &&
                  scores->size(0) == B && scores->size(1) == Hkv,
              "scores: contiguous fp32 [rows, Hkv, max_len]");
  TORCH_CHECK(B == 0 || scores->size(2) >= seq_lens.max().item<int64_t>(), "scores: too short for seq_lens");
  a.from_c = score_from->to(torch::kLong).contiguous();
  TORCH_CHECK(a.from_c.numel() == B, "score_from: one entry per row");
  a.ptr = scores->data_ptr<float>();
  a.from = a.from_c.data_ptr<int64_t>();
  a.len = scores->size(2);
  return a;
}

std::vector<torch::Tensor> paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                           c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale,
                                           torch::Tensor block_tables, torch::Tensor seq_lens,
                                           torch::Tensor query_start_loc, double scale, bool return_lse,
                                           c10::optional<torch::Tensor> scores, c10::optional<torch::Tensor> score_from) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "paged_attention: q [T, H, D], cache [blocks, Hkv, bs, D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "cache must be contiguous");
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), "K and V caches must share a dtype");
  const bool int4 = k_cache.scalar_type() == at::kByte;
  const bool quantized = int4 || k_cache.scalar_type() == at::kChar;
  TORCH_CHECK(quantized == (k_scale.has_value() && v_scale.has_value()), "a quantized cache needs K and V scales");
  TORCH_CHECK(quantized ? q.scalar_type() == at::kFloat : q.scalar_type() == k_cache.scalar_type(),
              "q must be fp32 over a quantized cache, else share the cache's dtype");
  q = q.contiguous();
  block_tables = block_tables.to(torch::kLong).contiguous();
  seq_lens = seq_lens.to(torch::kLong).contiguous();
  query_start_loc = query_start_loc.to(torch::kLong).contiguous();
  const int64_t B = seq_lens.size(0), H = q.size(1), D = q.size(2);
  const int64_t Hkv = k_cache.size(1), bs = k_cache.size(2);
  TORCH_CHECK(H % Hkv == 0 && k_cache.size(3) * (int4 ? 2 : 1) == D, "head layout mismatch");
  TORCH_CHECK(query_start_loc.size(0) == B + 1 && block_tables.size(0) == B, "one table and length per row");
  auto out = torch::empty_like(q);
  torch::Tensor lse = return_lse ? torch::empty({q.size(0), H}, q.options().dtype(torch::kFloat))
                                 : torch::empty({0}, q.options().dtype(torch::kFloat));
  float* lse_ptr = return_lse ? lse.data_ptr<float>() : nullptr;
  const ScoreArgs score_args = check_scores(scores, score_from, B, Hkv, seq_lens);
  float* score_ptr = score_args.ptr;
  const int64_t* score_from_ptr = score_args.from;
  const int64_t score_len = score_args.len;
  if (int4) {
    torch::Tensor ks = k_scale->contiguous(), vs = v_scale->contiguous();
    TORCH_CHECK(ks.scalar_type() == at::kHalf && vs.scalar_type() == at::kHalf && ks.dim() == 5 && ks.size(4) == 2 &&
                    ks.sizes() == vs.sizes() && ks.size(0) == k_cache.size(0) && D % ks.size(3) == 0,
                "int4 scales: fp16 [blocks, Hkv, block_size, groups, 2]");
    const int64_t G = ks.size(3);
    TORCH_CHECK((D / 2) % (D / G) == 0, "int4: a group must lie within one half of the head");
    if (split_kv_attention(q.data_ptr<float>(), k_cache.data_ptr<uint8_t>(), v_cache.data_ptr<uint8_t>(),
                           ks.data_ptr<at::Half>(), vs.data_ptr<at::Half>(), CacheKind::kInt4, G,
                           block_tables.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(),
                           query_start_loc.data_ptr<int64_t>(), out.data_ptr<float>(), lse_ptr, score_ptr,
                           score_from_ptr, score_len, B, H, Hkv, D, bs, block_tables.size(1), static_cast<float>(scale)))
      return {out, lse};
    attention_kernel<float, uint8_t>(q.data_ptr<float>(), k_cache.data_ptr<uint8_t>(), v_cache.data_ptr<uint8_t>(),
                                     ks.data_ptr<at::Half>(), vs.data_ptr<at::Half>(), G,
                                     block_tables.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(),
                                     query_start_loc.data_ptr<int64_t>(), out.data_ptr<float>(), lse_ptr, score_ptr,
                                     score_from_ptr, score_len, B, H, Hkv, D, bs, block_tables.size(1),
                                     static_cast<float>(scale));
    return {out, lse};
  }
  if (quantized) {
    torch::Tensor ks = k_scale->contiguous(), vs = v_scale->contiguous();
    TORCH_CHECK(ks.scalar_type() == at::kFloat && ks.numel() == k_cache.numel() / D, "k_scale: fp32 per token/head");
    TORCH_CHECK(vs.scalar_type() == at::kFloat && vs.numel() == v_cache.numel() / D, "v_scale: fp32 per token/head");
    if (split_kv_attention(q.data_ptr<float>(), k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>(),
                           ks.data_ptr<float>(), vs.data_ptr<float>(), CacheKind::kInt8, 1, block_tables.data_ptr<int64_t>(),
                           seq_lens.data_ptr<int64_t>(), query_start_loc.data_ptr<int64_t>(), out.data_ptr<float>(),
                           lse_ptr, score_ptr, score_from_ptr, score_len, B, H, Hkv, D, bs, block_tables.size(1),
                           static_cast<float>(scale)))
      return {out, lse};
    attention_kernel<float, int8_t>(q.data_ptr<float>(), k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>(),
                                    ks.data_ptr<float>(), vs.data_ptr<float>(), 1, block_tables.data_ptr<int64_t>(),
                                    seq_lens.data_ptr<int64_t>(), query_start_loc.data_ptr<int64_t>(),
                                    out.data_ptr<float>(), lse_ptr, score_ptr, score_from_ptr, score_len, B, H, Hkv, D, bs, block_tables.size(1),
                                    static_cast<float>(scale));
    return {out, lse};
  }
  if (q.scalar_type() == at::kFloat &&
      split_kv_attention(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), nullptr, nullptr,
                         CacheKind::kFloat, 1, block_tables.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(),
                         query_start_loc.data_ptr<int64_t>(), out.data_ptr<float>(), lse_ptr, score_ptr, score_from_ptr,
                         score_len, B, H, Hkv, D, bs, block_tables.size(1), static_cast<float>(scale)))
    return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention", [&] {
    attention_kernel<scalar_t, scalar_t>(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(),
                                         v_cache.data_ptr<scalar_t>(), nullptr, nullptr, 1,
                                         block_tables.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(),
                                         query_start_loc.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), lse_ptr, score_ptr,
                                         score_from_ptr, score_len, B, H, Hkv, D, bs, block_tables.size(1), static_cast<float>(scale));
  });
  return {out, lse};
}

// ---- KIVI (kv/kivi.py) ------------------------------------------------------------------------------------
// Blocks still filling (open_slot[block] = r >= 0) are read in full precision from residual r. A sealed block's
// keys are quantized per channel c with (s_c, m_c), so q . k_t = sum_c (q_c s_c) code_tc + sum_c q_c m_c: per
// block and query row, q * s and q . m are computed once; each key's codes are unpacked once (decode_row) and
// dotted with every row's q * s. Values are per token and group: each value row is dequantized once and added
// to every row's accumulator.
template <typename Res>
static void kivi_kernel(const float* q, const uint8_t* kc, const uint8_t* vc, const at::Half* kst,
                        const at::Half* vst, const Res* rk, const Res* rv, const int32_t* open_slot, int bits,
                        int64_t G, const int64_t* tables, const int64_t* lens, const int64_t* qsl, float* out,
                        float* lse, float* score_out, const int64_t* score_from, int64_t score_len, int64_t B,
                        int64_t H, int64_t Hkv, int64_t D, int64_t bs, int64_t max_blocks, float scale) {
  const int64_t RB = D * bits / 8, grp = D / G;
  const int64_t QG = H / Hkv;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    TaskRows rows;
    std::vector<float> qs, qm, buf(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, h = task % Hkv;
      const int64_t L = lens[b], q0 = qsl[b], n = qsl[b + 1] - q0;
      if (n <= 0) continue;
      const int64_t* table = tables + b * max_blocks;
      rows.start(q, q0, n, h, H, QG, D, L, scale);
      const int64_t R = rows.R;
      qs.resize(R * D);
      qm.resize(R);
      const int64_t nblocks = (L + bs - 1) / bs;
      for (int64_t bi = 0; bi < nblocks; ++bi) {
        const int64_t blk = table[bi], t0 = bi * bs, tn = std::min(bs, L - t0);
        const int32_t r_open = open_slot[blk];
        if (r_open >= 0) {
          for (int64_t o = 0; o < tn; ++o) {
            const float* k = float_row(rk + ((static_cast<int64_t>(r_open) * Hkv + h) * bs + o) * D, buf.data(), D);
            rows.score_key(t0 + o, [&](int64_t r) { return dot_row(rows.query(r), k, D); });
          }
          continue;
        }
        const at::Half* st = kst + (blk * Hkv + h) * D * 2;
        for (int64_t r = rows.first_row(t0); r < R; ++r) {  // rows that see a key of this block
          const float* qr = rows.query(r);
          float* qsr = qs.data() + r * D;
          float m = 0.f;
          for (int64_t c = 0; c < D; ++c) {
            qsr[c] = qr[c] * static_cast<float>(st[2 * c]);
            m += qr[c] * static_cast<float>(st[2 * c + 1]);
          }
          qm[r] = m;
        }
        for (int64_t o = 0; o < tn; ++o) {
          decode_row(kc + ((blk * Hkv + h) * bs + o) * RB, bits, D, D, nullptr, buf.data());  // codes, once
          rows.score_key(t0 + o, [&](int64_t r) { return dot_row(qs.data() + r * D, buf.data(), D) + qm[r]; });
        }
      }
      rows.softmax();
      if (score_out != nullptr && score_from[b] >= 0) rows.add_weights(score_out + (b * Hkv + h) * score_len, score_from[b]);
      for (int64_t bi = 0; bi < nblocks; ++bi) {
        const int64_t blk = table[bi], t0 = bi * bs, tn = std::min(bs, L - t0);
        const int32_t r_open = open_slot[blk];
        for (int64_t o = 0; o < tn; ++o) {
          if (r_open >= 0) {
            rows.add_value(t0 + o, float_row(rv + ((static_cast<int64_t>(r_open) * Hkv + h) * bs + o) * D, buf.data(), D),
                           1.f);
            continue;
          }
          const int64_t row = (blk * Hkv + h) * bs + o;
          decode_row(vc + row * RB, bits, D, grp, vst + row * G * 2, buf.data());  // dequantized, once
          rows.add_value(t0 + o, buf.data(), 1.f);
        }
      }
      rows.write(out, lse, q0, h, H);
    }
  });
}

// q [T, H, D] fp32; k_codes, v_codes [blocks, Hkv, bs, D * bits / 8] uint8; k_stats [blocks, Hkv, D, 2] fp16;
// v_stats [blocks, Hkv, bs, G, 2] fp16; res_k, res_v [R, Hkv, bs, D] fp32 or fp16; open_slot [blocks] int32; the rest
// as paged_attention.
std::vector<torch::Tensor> kivi_paged_attention(torch::Tensor q, torch::Tensor k_codes, torch::Tensor v_codes,
                                                torch::Tensor k_stats, torch::Tensor v_stats, torch::Tensor res_k,
                                                torch::Tensor res_v, torch::Tensor open_slot, int64_t bits,
                                                torch::Tensor block_tables, torch::Tensor seq_lens,
                                                torch::Tensor query_start_loc, double scale, bool return_lse,
                                                c10::optional<torch::Tensor> scores,
                                                c10::optional<torch::Tensor> score_from) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat, "kivi_paged_attention: q fp32 [T, H, D]");
  check_kivi_cache(k_codes, v_codes, k_stats, v_stats, res_k, res_v, bits);
  TORCH_CHECK(open_slot.is_contiguous() && open_slot.scalar_type() == at::kInt && open_slot.numel() == k_codes.size(0),
              "open_slot: contiguous int32 [blocks]");
  q = q.contiguous();
  block_tables = block_tables.to(torch::kLong).contiguous();
  seq_lens = seq_lens.to(torch::kLong).contiguous();
  query_start_loc = query_start_loc.to(torch::kLong).contiguous();
  const int64_t B = seq_lens.size(0), H = q.size(1), D = q.size(2);
  const int64_t Hkv = k_codes.size(1), bs = k_codes.size(2), G = v_stats.size(3);
  TORCH_CHECK(H % Hkv == 0 && k_codes.size(3) * 8 == D * bits && res_k.size(3) == D, "head layout mismatch");
  TORCH_CHECK(k_stats.size(2) == D && D % G == 0, "kivi stats shapes");
  TORCH_CHECK(query_start_loc.size(0) == B + 1 && block_tables.size(0) == B, "one table and length per row");
  auto out = torch::empty_like(q);
  torch::Tensor lse = return_lse ? torch::empty({q.size(0), H}, q.options()) : torch::empty({0}, q.options());
  const ScoreArgs score_args = check_scores(scores, score_from, B, Hkv, seq_lens);
  float* score_ptr = score_args.ptr;
  const int64_t* score_from_ptr = score_args.from;
  const int64_t score_len = score_args.len;
  auto run = [&](auto* rk, auto* rv) {
    kivi_kernel(q.data_ptr<float>(), k_codes.data_ptr<uint8_t>(), v_codes.data_ptr<uint8_t>(),
                k_stats.data_ptr<at::Half>(), v_stats.data_ptr<at::Half>(), rk, rv, open_slot.data_ptr<int32_t>(),
                static_cast<int>(bits), G, block_tables.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(),
                query_start_loc.data_ptr<int64_t>(), out.data_ptr<float>(),
                return_lse ? lse.data_ptr<float>() : nullptr, score_ptr, score_from_ptr, score_len, B, H, Hkv, D, bs,
                block_tables.size(1), static_cast<float>(scale));
  };
  if (res_k.scalar_type() == at::kHalf)
    run(res_k.data_ptr<at::Half>(), res_v.data_ptr<at::Half>());
  else
    run(res_k.data_ptr<float>(), res_v.data_ptr<float>());
  return {out, lse};
}
