// Paged attention for fp32 queries over an fp32 or int8 cache (the default engine's decode, speculative
// verification and short prompt chunks), AVX2 builds: the same contract as paged_attention.cpp's generic
// kernel, faster. (int4 and KIVI caches keep their own kernels.)
//
// Why a second kernel: the generic one computes every q . k as its own reduction (one horizontal sum per key
// and query row) and gives each (row, KV head) pair to one thread, so a single sequence with 3 KV heads keeps
// one of two cores idle a third of the time. Here:
// - Split KV (flash decoding): a row's keys are cut into chunks when there are few (row, KV head) tasks
//   for the threads; each (row, head, chunk) computes a partial softmax (max, sum, weighted values) and the
//   partials are merged exactly through their maxima, as merge_attention does with log-sum-exps.
// - Scores for 8 keys at a time: 8 independent FMA chains over the head dimension, reduced together to one
//   vector of 8 scores (hadd tree) instead of 8 horizontal sums.
// - Values: each query row's output (64 floats at a time) stays in registers across the keys.
// Accumulation is fp32 throughout; results equal the generic kernel's up to summation order.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "isa.h"
#include "packed_rows.h"
#include "split_kv_attention.h"

#ifdef TM_AVX2
namespace {

constexpr int64_t kMinChunkKeys = 64;  // never split a row's keys finer than this
constexpr int64_t kKeyGroup = 8;       // keys scored together
constexpr int64_t kValueSpan = 64;     // output floats held in registers per pass over the values
constexpr int64_t kTileKeys = 32;      // keys per tile: K or V of a 128-wide head in 16 KB of L1

// [sum(a[0]), ..., sum(a[7])] in one vector.
inline __m256 sum8(const __m256 a[8]) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// 8 cached elements as floats: fp32 as stored, int8 codes widened (their per-token scale is applied to the
// whole dot product or softmax weight, not per element).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// One K or V cache: elements (fp32, or int8 codes with one fp32 scale per token and head) and, per key of the
// chunk being attended, the key's element offset and (int8) scale.
template <typename C>
struct KeyRows {
  const C* data;
  const int64_t* off;   // [keys]: element offset of each key's row
  const float* scale;   // [keys], int8 only: the row's scale
};

// scores[i] = q . k_i for the 8 keys starting at key i0 of `keys` (key indices clamped to last: a group's tail
// repeats a key) (D a multiple of 8).
template <typename C>
inline void score8(const float* q, const KeyRows<C>& keys, int64_t i0, int64_t last, int64_t D, float* scores) {
  const C* row[8];
  for (int i = 0; i < 8; ++i) row[i] = keys.data + keys.off[std::min(i0 + i, last)];
  __m256 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 qv = _mm256_loadu_ps(q + d);
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(qv, load8(row[i] + d), acc[i]);
  }
  __m256 sc = sum8(acc);
  if constexpr (std::is_same_v<C, int8_t>) {
    alignas(32) float ks[8];
    for (int i = 0; i < 8; ++i) ks[i] = keys.scale[std::min(i0 + i, last)];
    sc = _mm256_mul_ps(sc, _mm256_load_ps(ks));
  }
  _mm256_storeu_ps(scores, sc);
}

// acc[0..8 NV) += sum over keys i < n (from key i0) of p[i] * v_i[d0 .. d0 + 8 NV): the NV output vectors stay
// in registers.
template <int NV, typename C>
inline void add_values(const float* p, const KeyRows<C>& values, int64_t i0, int64_t n, int64_t d0, float* out) {
  __m256 acc[NV];
  for (int j = 0; j < NV; ++j) acc[j] = _mm256_loadu_ps(out + 8 * j);
  for (int64_t i = 0; i < n; ++i) {
    float pi = p[i];
    if constexpr (std::is_same_v<C, int8_t>) pi *= values.scale[i0 + i];
    const __m256 w = _mm256_set1_ps(pi);
    const C* v = values.data + values.off[i0 + i] + d0;
    for (int j = 0; j < NV; ++j) acc[j] = _mm256_fmadd_ps(w, load8(v + 8 * j), acc[j]);
  }
  for (int j = 0; j < NV; ++j) _mm256_storeu_ps(out + 8 * j, acc[j]);
}

template <typename C>
inline void add_values_span(const float* p, const KeyRows<C>& values, int64_t i0, int64_t n, int64_t d0,
                            int64_t span, float* out) {
  switch (span / 8) {
    case 8: add_values<8>(p, values, i0, n, d0, out); break;
    case 7: add_values<7>(p, values, i0, n, d0, out); break;
    case 6: add_values<6>(p, values, i0, n, d0, out); break;
    case 5: add_values<5>(p, values, i0, n, d0, out); break;
    case 4: add_values<4>(p, values, i0, n, d0, out); break;
    case 3: add_values<3>(p, values, i0, n, d0, out); break;
    case 2: add_values<2>(p, values, i0, n, d0, out); break;
    default: add_values<1>(p, values, i0, n, d0, out); break;
  }
}

// e^x for x <= 0 (softmax numerators), 8 at a time: x = n ln2 + r with |r| <= ln2 / 2, e^r by Cephes' expf
// polynomial (relative error ~1e-7, as libm's expf), 2^n through the exponent bits. Below -87 (e^x under the
// smallest normal float, and never visible next to the row's maximum, e^0) the result is 0.
inline __m256 exp8(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

// p[i] = e^(p[i] - m) for i < n (p padded to a multiple of 8: the tail lanes are computed and left unused,
// then zeroed so a sum over the padding adds nothing); returns the sum over i < n.
inline float exp_sum(float* p, int64_t n, float m) {
  const __m256 vm = _mm256_set1_ps(m);
  __m256 sum = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + i), vm));
    _mm256_storeu_ps(p + i, e);
    sum = _mm256_add_ps(sum, e);
  }
  float tail = 0.f;
  if (i < n) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, exp8(_mm256_sub_ps(_mm256_loadu_ps(p + i), vm)));
    for (int64_t j = 0; j < 8; ++j) {
      p[i + j] = i + j < n ? lanes[j] : 0.f;
      tail += p[i + j];
    }
  }
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h) + tail;
}

// One work item's partial result for each of its R query rows: running max, softmax sum, weighted values; and,
// for eviction policies (the chunk is then the whole row), where rows from `weights_from` on add the softmax
// weight each key receives.
struct Partial {
  float* m;    // [R]
  float* s;    // [R]
  float* acc;  // [R, D]
  float* weights = nullptr;  // [keys], indexed by the key's position in the row
  int64_t weights_from = 0;
};

// Prefetch the keys (or values) of the tile starting at key i0 (< n) into L2. Needed because a head's tokens
// are contiguous only within a block (16 tokens x 64 floats = one 4 KB page), and hardware prefetchers stop at
// page boundaries: without it every block starts with a cache miss.
template <typename C>
inline void prefetch_tile(const KeyRows<C>& rows, int64_t i0, int64_t n, int64_t D) {
  constexpr int64_t per_line = 64 / sizeof(C);
  const int64_t end = std::min(n, i0 + kTileKeys);
  for (int64_t i = i0; i < end; ++i)
    for (int64_t d = 0; d < D; d += per_line)
      _mm_prefetch(reinterpret_cast<const char*>(rows.data + rows.off[i] + d), _MM_HINT_T1);
}

// Where attend_chunk reads a tile of keys (or values) [i0, i0 + n) of its chunk from: the cache rows in place
// (fp32, int8) ...
template <typename C>
struct DirectRows {
  KeyRows<C> rows;
  const KeyRows<C>& tile(int64_t, int64_t) const { return rows; }
  void prefetch(int64_t i0, int64_t n, int64_t D) const { prefetch_tile(rows, i0, n, D); }
};

// ... or int4 rows (two codes per byte: element j low, j + D/2 high; an fp16 scale and min per group of D / G)
// dequantized a tile at a time into a small fp32 buffer, each row once for every query row of the group.
struct Int4Rows {
  const uint8_t* data;
  const at::Half* stats;    // [rows, G, 2]
  const int64_t* off;       // [keys]: row * D (element offsets, as the direct sources')
  const int64_t* tile_off;  // [keys]: (key % kTileKeys) * D, the key's row in `buf`
  int64_t D, G;
  float* buf;               // [kTileKeys, D]
  KeyRows<float> tile(int64_t i0, int64_t n) const {
    for (int64_t i = i0; i < i0 + n; ++i)
      decode_row(data + off[i] / 2, 4, D, D / G, stats + off[i] / D * G * 2, buf + (i - i0) * D);
    return KeyRows<float>{buf, tile_off, nullptr};
  }
  void prefetch(int64_t i0, int64_t n, int64_t) const {
    const int64_t end = std::min(n, i0 + kTileKeys);
    for (int64_t i = i0; i < end; ++i)
      for (int64_t byte = 0; byte < D / 2; byte += 64) _mm_prefetch(reinterpret_cast<const char*>(data + off[i] / 2 + byte), _MM_HINT_T1);
  }
};

// Partial attention of R query rows (qf, already scaled) over keys [t0, t1) of one (row, KV head); query row
// r sees keys [0, first + r / QG]. `keys` and `values` (sources above) index the chunk's keys from 0. Both passes walk
// the keys in tiles of kTileKeys with the rows inside, so a tile of K or V is read from memory once and from
// L1 by the other query heads of the group (rows outside would stream the chunk once per row).
template <typename Src>
void attend_chunk(const float* qf, int64_t R, int64_t QG, int64_t first, const Src& keys, const Src& values,
                  int64_t t0, int64_t t1, int64_t D, std::vector<float>& scores, Partial part) {
  const int64_t n = t1 - t0, padded = (n + kKeyGroup - 1) / kKeyGroup * kKeyGroup;
  scores.resize(R * padded);
  std::vector<int64_t> vis(R);
  int64_t most = 0;
  for (int64_t r = 0; r < R; ++r) {
    vis[r] = std::max<int64_t>(0, std::min(t1, first + r / QG + 1) - t0);  // keys of the chunk row r sees
    most = std::max(most, vis[r]);
    std::fill(part.acc + r * D, part.acc + (r + 1) * D, 0.f);
  }
  for (int64_t i0 = 0; i0 < most; i0 += kTileKeys) {  // pass 1: scores
    keys.prefetch(i0 + kTileKeys, most, D);
    const auto& tile = keys.tile(i0, std::min(most, i0 + kTileKeys) - i0);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t end = std::min(vis[r], i0 + kTileKeys);
      for (int64_t i = i0; i < end; i += kKeyGroup) score8(qf + r * D, tile, i, vis[r] - 1, D, scores.data() + r * padded + i);
    }
  }
  for (int64_t r = 0; r < R; ++r) {  // softmax numerators
    float* sr = scores.data() + r * padded;
    if (vis[r] == 0) {
      part.m[r] = -std::numeric_limits<float>::infinity(), part.s[r] = 0.f;
      continue;
    }
    // the max over whole groups of 8: a group's tail lanes repeat the last visible key's score
    __m256 vmax = _mm256_loadu_ps(sr);
    for (int64_t i = 8; i < vis[r]; i += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(sr + i));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    const float m = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    part.m[r] = m, part.s[r] = exp_sum(sr, vis[r], m);
    if (part.weights != nullptr && r >= part.weights_from) {
      const float inv = 1.f / part.s[r];
      float* dst = part.weights + t0;
#pragma omp simd
      for (int64_t i = 0; i < vis[r]; ++i) dst[i] += sr[i] * inv;
    }
  }
  values.prefetch(0, most, D);
  for (int64_t i0 = 0; i0 < most; i0 += kTileKeys) {  // pass 2: values
    values.prefetch(i0 + kTileKeys, most, D);
    const auto& tile = values.tile(i0, std::min(most, i0 + kTileKeys) - i0);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t cnt = std::min(vis[r], i0 + kTileKeys) - i0;
      if (cnt <= 0) continue;
      for (int64_t d0 = 0; d0 < D; d0 += kValueSpan)
        add_values_span(scores.data() + r * padded + i0, tile, i0, cnt, d0, std::min(kValueSpan, D - d0),
                        part.acc + r * D + d0);
    }
  }
}

// C: the cache's element type: float, int8_t, or uint8_t for int4 (k_scale, v_scale: fp32 per row for int8,
// fp16 (scale, min) per row and group for int4, with G groups).
template <typename C>
bool split_kv(const float* q, const C* kc, const C* vc, const void* k_scale, const void* v_scale, int64_t G,
              const int64_t* tables, const int64_t* lens, const int64_t* qsl, float* out, float* lse, float* score_out,
              const int64_t* score_from, int64_t score_len, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t bs,
              int64_t max_blocks, float scale) {
  if (D % 8 != 0 || B == 0) return D % 8 == 0;
  const int64_t QG = H / Hkv, T = qsl[B];
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) max_len = std::max(max_len, lens[b]);
  // Chunks per row: enough (row, head, chunk) items for every thread to get two, none under kMinChunkKeys keys;
  // one when eviction wants the normalised weights (they need the row's whole softmax sum).
  const int64_t threads = at::get_num_threads(), tasks = B * Hkv;
  int64_t S = std::max<int64_t>(1, (2 * threads + tasks - 1) / tasks);
  S = std::min(S, std::max<int64_t>(1, max_len / kMinChunkKeys));
  if (score_out != nullptr) S = 1;
  // partials [S, T, H]: max, sum, D accumulators
  std::vector<float> pm(S * T * H), ps(S * T * H), pacc(S * T * H * D);
  at::parallel_for(0, tasks * S, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf, scores, m, s, acc, ksc, vsc, kbuf, vbuf;
    std::vector<int64_t> off, tile_off;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t si = item % S, task = item / S, b = task / Hkv, h = task % Hkv;
      const int64_t L = lens[b], q0 = qsl[b], nq = qsl[b + 1] - q0;
      if (nq <= 0) continue;
      const int64_t chunk = (L + S - 1) / S, t0 = std::min(L, si * chunk), t1 = std::min(L, t0 + chunk);
      const int64_t R = nq * QG, first = L - nq;
      const int64_t keys = std::max<int64_t>(1, t1 - t0);
      qf.resize(R * D), m.resize(R), s.resize(R), acc.resize(R * D), off.resize(keys);
      for (int64_t j = 0; j < nq; ++j)
        for (int64_t g = 0; g < QG; ++g) {
          const float* src = q + ((q0 + j) * H + h * QG + g) * D;
          float* dst = qf.data() + (j * QG + g) * D;
          for (int64_t i = 0; i < D; ++i) dst[i] = src[i] * scale;
        }
      const int64_t* table = tables + b * max_blocks;
      for (int64_t t = t0; t < t1;) {  // block by block: no division per key
        const int64_t blk = t / bs, o0 = t % bs, cnt = std::min(bs - o0, t1 - t);
        const int64_t base = ((table[blk] * Hkv + h) * bs + o0) * D;
        for (int64_t o = 0; o < cnt; ++o) off[t - t0 + o] = base + o * D;
        t += cnt;
      }
      Partial part{m.data(), s.data(), acc.data()};
      if (score_out != nullptr && score_from[b] >= 0)  // S == 1: the chunk is the whole row
        part.weights = score_out + (b * Hkv + h) * score_len, part.weights_from = score_from[b] * QG;
      if constexpr (std::is_same_v<C, uint8_t>) {
        kbuf.resize(kTileKeys * D), vbuf.resize(kTileKeys * D), tile_off.resize(keys);
        for (int64_t i = 0; i < keys; ++i) tile_off[i] = (i % kTileKeys) * D;
        const auto* ks = static_cast<const at::Half*>(k_scale);
        const auto* vs = static_cast<const at::Half*>(v_scale);
        attend_chunk(qf.data(), R, QG, first, Int4Rows{kc, ks, off.data(), tile_off.data(), D, G, kbuf.data()},
                     Int4Rows{vc, vs, off.data(), tile_off.data(), D, G, vbuf.data()}, t0, t1, D, scores, part);
      } else {
        if constexpr (std::is_same_v<C, int8_t>) {  // each key's scales: its row is its offset / D
          ksc.resize(keys), vsc.resize(keys);
          const auto* ks = static_cast<const float*>(k_scale);
          const auto* vs = static_cast<const float*>(v_scale);
          for (int64_t i = 0; i < t1 - t0; ++i) ksc[i] = ks[off[i] / D], vsc[i] = vs[off[i] / D];
        }
        attend_chunk(qf.data(), R, QG, first, DirectRows<C>{KeyRows<C>{kc, off.data(), ksc.data()}},
                     DirectRows<C>{KeyRows<C>{vc, off.data(), vsc.data()}}, t0, t1, D, scores, part);
      }
      for (int64_t r = 0; r < R; ++r) {
        const int64_t p = (si * T + q0 + r / QG) * H + h * QG + r % QG;
        pm[p] = m[r], ps[p] = s[r];
        std::copy(acc.data() + r * D, acc.data() + (r + 1) * D, pacc.data() + p * D);
      }
    }
  });
  // merge the chunks of every (query, head): weights exp(m_chunk - m_max)
  at::parallel_for(qsl[0] * H, T * H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t si = 0; si < S; ++si) mx = std::max(mx, pm[si * T * H + p]);
      float sum = 0.f;
      float* o = out + p * D;
      std::fill(o, o + D, 0.f);
      for (int64_t si = 0; si < S; ++si) {
        const int64_t i = si * T * H + p;
        if (ps[i] == 0.f) continue;
        const float w = S == 1 ? 1.f : std::exp(pm[i] - mx);
        sum += ps[i] * w;
        const float* a = pacc.data() + i * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] += a[d] * w;
      }
      if (sum == 0.f) continue;  // a row of q outside every range: left as the contract says
      const float inv = 1.f / sum;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] *= inv;
      if (lse != nullptr) lse[p] = mx + std::log(sum);
    }
  });
  return true;
}
}  // namespace

bool split_kv_attention(const float* q, const void* kc, const void* vc, const void* k_scale, const void* v_scale,
                        CacheKind kind, int64_t groups, const int64_t* tables, const int64_t* lens, const int64_t* qsl,
                        float* out, float* lse, float* score_out, const int64_t* score_from, int64_t score_len,
                        int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t bs, int64_t max_blocks, float scale) {
  switch (kind) {
    case CacheKind::kInt8:
      return split_kv(q, static_cast<const int8_t*>(kc), static_cast<const int8_t*>(vc), k_scale, v_scale, groups,
                      tables, lens, qsl, out, lse, score_out, score_from, score_len, B, H, Hkv, D, bs, max_blocks, scale);
    case CacheKind::kInt4:
      return split_kv(q, static_cast<const uint8_t*>(kc), static_cast<const uint8_t*>(vc), k_scale, v_scale, groups,
                      tables, lens, qsl, out, lse, score_out, score_from, score_len, B, H, Hkv, D, bs, max_blocks, scale);
    default:
      return split_kv(q, static_cast<const float*>(kc), static_cast<const float*>(vc), nullptr, nullptr, groups,
                      tables, lens, qsl, out, lse, score_out, score_from, score_len, B, H, Hkv, D, bs, max_blocks, scale);
  }
}
#else
bool split_kv_attention(const float*, const void*, const void*, const void*, const void*, CacheKind, int64_t,
                        const int64_t*, const int64_t*, const int64_t*, float*, float*, float*, const int64_t*, int64_t,
                        int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float) {
  return false;  // portable builds: the generic kernel
}
#endif
