// Linear layers over block-quantized weights, y = x @ W^T with x in fp32.
//
// Both formats cut each weight row into blocks of 32 along the input dimension, with an fp16 scale per
// block (and, for 4-bit, an fp16 offset):
//   q8: codes int8  [N, K],   w = s * q
//   q4: codes uint8 [N, K/2], w = s * q + m, q in 0..15; byte j of a block holds element j in its low
//       nibble and element j + 16 in its high nibble (the Q4_0/Q4_1 layout of GGUF, so those repack as-is).
// Few rows (decode): integer dot products per block of 32, the activations rounded to int16 per block (a
// relative step of 3e-5) or, with int8_activations, to int8 (lossy); each weight block is unpacked once and
// used for up to 8 activation rows at a time, so a step reads the quantized bytes once. A single row (batch-1
// decode) takes 4 weight rows at a time instead, with software prefetch ahead of the interleaved rows (the
// hardware prefetcher does not follow them). From fp32_min_rows rows, several rows may run in plain fp32
// instead (AVX-512; AVX2 for narrow inputs). Many rows (prefill): weights are decoded a tile at a time into a cache-sized fp32 buffer and
// multiplied with torch's GEMM, exact up to summation order.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>
#include "isa.h"

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kTileRows = 8;  // activation rows sharing one weight block unpack (k <= 7 drafts: one pass)
constexpr int64_t kWideRows = 4;  // weight rows sharing one activation load (single-row decode)
constexpr int64_t kPrefetchGroups = 4;  // single-row decode prefetches this many groups of kWideRows ahead

inline float half_to_float(uint16_t h) {
#ifdef TM_AVX2
  return _cvtsh_ss(h);
#else
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
#endif
}

// Decode one block to 32 floats (scalar; also the reference for the vector path).
inline void decode_q4_scalar(const uint8_t* qs, float s, float m, float* w) {
  for (int j = 0; j < 16; ++j) {
    w[j] = s * static_cast<float>(qs[j] & 0x0F) + m;
    w[j + 16] = s * static_cast<float>(qs[j] >> 4) + m;
  }
}

inline void decode_q8_scalar(const int8_t* qs, float s, float* w) {
  for (int j = 0; j < 32; ++j) w[j] = s * static_cast<float>(qs[j]);
}

#ifdef TM_AVX2
inline void decode_q4(const uint8_t* qs, float s, float m, __m256 w[4]) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(v, mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
  const __m256 vs = _mm256_set1_ps(s), vm = _mm256_set1_ps(m);
  w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), vs, vm);
  w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), vs, vm);
  w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), vs, vm);
  w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), vs, vm);
}

inline void decode_q8(const int8_t* qs, float s, __m256 w[4]) {
  const __m256 vs = _mm256_set1_ps(s);
  for (int i = 0; i < 4; ++i) {
    const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8 * i));
    w[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), vs);
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// One output column n for R activation rows: y[r, n] = x[r] . w[n] (scalar fp32; builds without AVX2).
template <bool Q4, int R>
inline void dot_rows(const float* x, int64_t ldx, int64_t K, const uint8_t* codes, const uint16_t* scales,
                     const uint16_t* mins, float* y, int64_t ldy) {
  const int64_t nb = K / kBlock;
  float acc[R] = {};
  float w[kBlock];
  for (int64_t b = 0; b < nb; ++b) {
    if constexpr (Q4) {
      decode_q4_scalar(codes + b * 16, half_to_float(scales[b]), half_to_float(mins[b]), w);
    } else {
      decode_q8_scalar(reinterpret_cast<const int8_t*>(codes) + b * 32, half_to_float(scales[b]), w);
    }
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * ldx + b * kBlock;
      for (int j = 0; j < kBlock; ++j) acc[r] += xr[j] * w[j];
    }
  }
  for (int r = 0; r < R; ++r) y[r * ldy] = acc[r];
}

#ifdef TM_AVX2
// Activations for the integer dot products: each row's blocks of 32 rounded to Q (int16: absmax / 32767, a
// relative step of 3e-5, far below the weights' own quantization step; int8: absmax / 127, llama.cpp's Q8
// blocks, lossy) with a per-block scale, and the exact fp32 block sums that multiply the 4-bit offsets.
template <typename Q>
struct QuantizedActivations {
  std::vector<Q> q;  // [M, K]
  std::vector<float> scale;  // [M, K / 32]
  std::vector<float> sum;  // [M, K / 32]
};
using Int16Activations = QuantizedActivations<int16_t>;
using Int8Activations = QuantizedActivations<int8_t>;

template <typename Q>
QuantizedActivations<Q> quantize_activations(const float* x, int64_t M, int64_t K) {
  constexpr float qmax = static_cast<float>(std::numeric_limits<Q>::max());
  const int64_t nb = K / kBlock;
  QuantizedActivations<Q> a{std::vector<Q>(M * K), std::vector<float>(M * nb), std::vector<float>(M * nb)};
  for (int64_t i = 0; i < M * nb; ++i) {
    const float* xb = x + i * kBlock;
    float amax = 0.f, sum = 0.f;
    for (int j = 0; j < kBlock; ++j) {
      amax = std::max(amax, std::fabs(xb[j]));
      sum += xb[j];
    }
    const float d = amax / qmax, inv = amax > 0.f ? qmax / amax : 0.f;
    for (int j = 0; j < kBlock; ++j) a.q[i * kBlock + j] = static_cast<Q>(std::nearbyint(xb[j] * inv));
    a.scale[i] = d;
    a.sum[i] = sum;
  }
  return a;
}

constexpr int64_t kMaxBlocks = 1024;  // K <= 32768

inline void load_halfs(const uint16_t* h, int64_t n, float* out) {
  int64_t b = 0;
  for (; b + 8 <= n; b += 8)
    _mm256_storeu_ps(out + b, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + b))));
  for (; b < n; ++b) out[b] = half_to_float(h[b]);
}

// The integer dot products, for either activation type Q. A block of 32 weights or activations sits in the
// registers its product takes: int16 lanes in two (lo: elements 0..15, hi: 16..31), or 32 bytes in one (lo).
struct Block32 {
  __m256i lo, hi;
};

// A weight block: 4-bit codes are 0..15 (byte j: element j low, j + 16 high), 8-bit codes signed.
template <bool Q4, typename Q>
inline Block32 weight_block(const uint8_t* codes, int64_t b) {
  if constexpr (Q4) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + b * 16));
    if constexpr (std::is_same_v<Q, int8_t>)  // low nibbles in the low lane, high nibbles in the high lane
      return {_mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(0x0F)), _mm256_setzero_si256()};
    else {  // bytes widened once, then split: three ALU instructions where masking first took five
      const __m256i w16 = _mm256_cvtepu8_epi16(v);
      return {_mm256_and_si256(w16, _mm256_set1_epi16(0x0F)), _mm256_srli_epi16(w16, 4)};
    }
  } else {
    const int8_t* q = reinterpret_cast<const int8_t*>(codes) + b * kBlock;
    if constexpr (std::is_same_v<Q, int8_t>)
      return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)), _mm256_setzero_si256()};
    else
      return {_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))),
              _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)))};
  }
}

template <typename Q>
inline Block32 activation_block(const Q* x) {
  const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  if constexpr (std::is_same_v<Q, int8_t>) return {lo, _mm256_setzero_si256()};
  else return {lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16))};
}

// The block's sum of w_j x_j in 8 int32 lanes, exact either way. int16: madd sums pair products into int32
// (4-bit codes are 0..15, far from overflow). int8: maddubs multiplies unsigned by signed bytes and adds pairs
// into int16 (4-bit: |pair| <= 2 * 15 * 127; 8-bit codes go in as |w| with w's sign moved onto x: |pair| <=
// 2 * 128 * 127 < 2^15, no saturation), madd with ones widens them: 32 multiply-adds in two instructions,
// where int16 needs two widenings and two madds.
template <bool Q4, typename Q>
inline __m256i block_dot(const Block32& w, const Block32& x) {
  if constexpr (std::is_same_v<Q, int8_t>) {
    const __m256i p = Q4 ? _mm256_maddubs_epi16(w.lo, x.lo)
                         : _mm256_maddubs_epi16(_mm256_sign_epi8(w.lo, w.lo), _mm256_sign_epi8(x.lo, w.lo));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
  } else {
    return _mm256_add_epi32(_mm256_madd_epi16(w.lo, x.lo), _mm256_madd_epi16(w.hi, x.hi));
  }
}

// y[r, n] for R activation rows against one weight row: each weight block is unpacked once for the R rows,
// its integer products scaled in fp32. Block scales (weight scale x activation scale) and the 4-bit offsets'
// contribution (offset x exact block sum) are computed up front, so the inner loop is the product and one FMA.
template <bool Q4, int R, typename Q>
inline void dot_rows_int(const QuantizedActivations<Q>& a, int64_t r0, int64_t K, const uint8_t* codes,
                         const uint16_t* scales, const uint16_t* mins, float* y, int64_t ldy) {
  const int64_t nb = K / kBlock;
  alignas(32) float ws[kMaxBlocks], wm[kMaxBlocks], cs[R][kMaxBlocks];
  float offset[R] = {};
  load_halfs(scales, nb, ws);
  if constexpr (Q4) {
    load_halfs(mins, nb, wm);
    for (int r = 0; r < R; ++r) {
      const float* xsum = a.sum.data() + (r0 + r) * nb;
      for (int64_t b = 0; b < nb; ++b) offset[r] += wm[b] * xsum[b];
    }
  }
  for (int r = 0; r < R; ++r) {
    const float* xs = a.scale.data() + (r0 + r) * nb;
    for (int64_t b = 0; b < nb; ++b) cs[r][b] = ws[b] * xs[b];
  }
  __m256 acc[R];  // one chain per row (fixed indices keep them in registers; a runtime b & 1 did not)
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const Block32 w = weight_block<Q4, Q>(codes, b);
    for (int r = 0; r < R; ++r) {
      const __m256i p = block_dot<Q4, Q>(w, activation_block(a.q.data() + ((r0 + r) * nb + b) * kBlock));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(&cs[r][b]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r * ldy] = hsum(acc[r]) + offset[r];
}

// Prefetch (into L2) the cache line at `offset` of each of the W rows kPrefetchGroups groups ahead. Called
// once per 64 bytes of a row; a prefetch past the weight's end is harmless (it never faults).
template <int W>
inline void prefetch_rows_ahead(const uint8_t* codes, int64_t row_bytes, int64_t offset) {
  for (int w = 0; w < W; ++w)
    _mm_prefetch(reinterpret_cast<const char*>(codes + (kPrefetchGroups * W + w) * row_bytes + offset), _MM_HINT_T1);
}

// One activation row (single-sequence decode) against W weight rows at a time: the activation block is
// loaded once for all of them, and their FMA chains are independent.
template <bool Q4, int W, typename Q>
inline void dot_wide_int(const QuantizedActivations<Q>& a, int64_t K, const uint8_t* codes, int64_t row_bytes,
                         const uint16_t* scales, const uint16_t* mins, float* y) {
  const int64_t nb = K / kBlock;
  alignas(32) float cs[W][kMaxBlocks], tmp[kMaxBlocks];
  float off[W] = {};
  for (int w = 0; w < W; ++w) {
    load_halfs(scales + w * nb, nb, cs[w]);
    for (int64_t b = 0; b < nb; ++b) cs[w][b] *= a.scale[b];
    if constexpr (Q4) {
      load_halfs(mins + w * nb, nb, tmp);
      for (int64_t b = 0; b < nb; ++b) off[w] += tmp[b] * a.sum[b];
    }
  }
  __m256 acc[W];  // one chain per weight row: W chains cover the FMA latency
  for (int w = 0; w < W; ++w) acc[w] = _mm256_setzero_ps();
  constexpr int64_t block_bytes = Q4 ? kBlock / 2 : kBlock;
  for (int64_t b = 0; b < nb; ++b) {
    if ((b * block_bytes) % 64 == 0) prefetch_rows_ahead<W>(codes, row_bytes, b * block_bytes);
    const Block32 x = activation_block(a.q.data() + b * kBlock);
    for (int w = 0; w < W; ++w) {
      const __m256i p = block_dot<Q4, Q>(weight_block<Q4, Q>(codes + w * row_bytes, b), x);
      acc[w] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(&cs[w][b]), acc[w]);
    }
  }
  for (int w = 0; w < W; ++w) y[w] = hsum(acc[w]) + off[w];
}

// Several activation rows in fp32 with 256-bit vectors (the AVX2 counterpart of dot_rows_f32_512 below): each
// weight block is decoded once to fp32, as `dequantize` does, and multiplied into up to kTileRows rows by FMAs
// that read the activations from memory, so the math equals a matmul with the dequantized weight up to
// summation order. Per row and block of 32 that is four FMAs, where the int16 products take two madds, an add,
// a conversion, a broadcast and an FMA, plus per weight row the block scales and the 4-bit offsets' sums.
// Measured on Zen 3 (benchmarks/isa_quant.py --levels avx2,avx2+f32): 1.05-1.5x the int16 rows per linear
// from 4 rows while the rows' activations stay in L1 (K up to kF32RowsMaxK); at 2-3 rows, and for wider inputs
// (re-read from L2 for every weight row), the int16 rows are as fast or faster. A accumulators per row keep
// enough FMA chains in flight when the rows are few.
constexpr int64_t kF32RowsMaxK = 1024;  // 8 rows x 1,024 fp32 = 32 KiB: Zen 3's L1 data cache

template <bool Q4, int R>
inline void dot_rows_f32(const float* x, int64_t ldx, int64_t K, const uint8_t* codes, const uint16_t* scales,
                         const uint16_t* mins, float* y, int64_t ldy) {
  constexpr int A = R <= 2 ? 4 : (R <= 5 ? 2 : 1);
  const int64_t nb = K / kBlock;
  __m256 acc[R][A];
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < A; ++a) acc[r][a] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256 w[4];
    if constexpr (Q4)
      decode_q4(codes + b * 16, half_to_float(scales[b]), half_to_float(mins[b]), w);
    else
      decode_q8(reinterpret_cast<const int8_t*>(codes) + b * kBlock, half_to_float(scales[b]), w);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * ldx + b * kBlock;
      for (int i = 0; i < 4; ++i) acc[r][i % A] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xr + 8 * i), acc[r][i % A]);
    }
  }
  for (int r = 0; r < R; ++r) {
    __m256 s = acc[r][0];
    for (int a = 1; a < A; ++a) s = _mm256_add_ps(s, acc[r][a]);
    y[r * ldy] = hsum(s);
  }
}

#ifdef TM_AVX512
// 8-bit single-row decode with 512-bit vectors: a block of 32 codes widened to int16 fills one register and
// VNNI's dpwssd sums the int16 pair products into int32 lanes (exact: |lane| <= 2 * 127 * 32767 < 2^24, so
// the fp32 conversion is exact too); only the fp32 summation order differs from the AVX2 path. (Measured on
// Zen 4: this wins for 8-bit; for 4-bit rows and for several activation rows 512-bit variants were slower
// than the AVX2 kernels, which therefore run at this level too.)
inline void load_halfs16(const uint16_t* h, int64_t n, float* out) {
  int64_t b = 0;
  for (; b + 16 <= n; b += 16)
    _mm512_storeu_ps(out + b, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + b))));
  if (b < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - b)) - 1);
    _mm512_mask_storeu_ps(out + b, k, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, h + b)));
  }
}

template <int W>
inline void dot_wide_q8_512(const Int16Activations& a, int64_t K, const uint8_t* codes, int64_t row_bytes,
                            const uint16_t* scales, float* y) {
  const int64_t nb = K / kBlock;
  alignas(64) float cs[W][kMaxBlocks];
  for (int w = 0; w < W; ++w) {
    load_halfs16(scales + w * nb, nb, cs[w]);
    for (int64_t b = 0; b < nb; ++b) cs[w][b] *= a.scale[b];
  }
  __m512 acc[W];
  for (int w = 0; w < W; ++w) acc[w] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    if (b % 2 == 0) prefetch_rows_ahead<W>(codes, row_bytes, b * kBlock);
    const __m512i x = _mm512_loadu_si512(a.q.data() + b * kBlock);
    for (int w = 0; w < W; ++w) {
      const __m512i q = _mm512_cvtepi8_epi16(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + w * row_bytes + b * kBlock)));
      const __m512i p = _mm512_dpwssd_epi32(_mm512_setzero_si512(), q, x);
      acc[w] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_set1_ps(cs[w][b]), acc[w]);
    }
  }
  for (int w = 0; w < W; ++w) y[w] = _mm512_reduce_add_ps(acc[w]);
}

// Several activation rows (batched decode, speculative verification, short chunks) with 512-bit vectors:
// each weight block is decoded once to fp32 (exactly as `dequantize` does) and multiplied into up to
// kTileRows512 rows with FMAs whose activation operand comes straight from memory. The math is plain fp32
// (no activation rounding), so it equals a matmul with the dequantized weight up to summation order. On
// Sapphire Rapids this runs at ~4x the int16 path per row: that path spends 8 instructions on 32
// multiply-adds of one row, this one two FMAs plus a ninth of a block decode.
constexpr int64_t kTileRows512 = 16;

template <bool Q4>
inline void decode_block_512(const uint8_t* codes, int64_t b, const uint16_t* scales, const uint16_t* mins,
                             __m512& w0, __m512& w1) {
  const __m512 vs = _mm512_set1_ps(half_to_float(scales[b]));
  if constexpr (Q4) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + b * 16));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m512 vm = _mm512_set1_ps(half_to_float(mins[b]));
    w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(v, mask))), vs, vm);
    w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), mask))), vs, vm);
  } else {
    const int8_t* q = reinterpret_cast<const int8_t*>(codes) + b * kBlock;
    w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)))), vs);
    w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)))), vs);
  }
}

// y[r, n] = x[r] . w[n] for R rows. Up to 8 rows keep two accumulators per row (2R independent FMA chains
// cover the FMA latency); more rows have chains enough with one, and need the registers.
template <bool Q4, int R>
inline void dot_rows_f32_512(const float* x, int64_t ldx, int64_t K, const uint8_t* codes, const uint16_t* scales,
                             const uint16_t* mins, float* y, int64_t ldy) {
  constexpr int A = R > 8 ? 1 : 2;
  const int64_t nb = K / kBlock;
  __m512 acc[A][R];
  for (int a = 0; a < A; ++a)
    for (int r = 0; r < R; ++r) acc[a][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512 w0, w1;
    decode_block_512<Q4>(codes, b, scales, mins, w0, w1);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * ldx + b * kBlock;
      acc[0][r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), acc[0][r]);
      acc[A - 1][r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), acc[A - 1][r]);
    }
  }
  for (int r = 0; r < R; ++r)
    y[r * ldy] = _mm512_reduce_add_ps(A == 2 ? _mm512_add_ps(acc[0][r], acc[A - 1][r]) : acc[0][r]);
}
#endif  // TM_AVX512
#endif  // TM_AVX2

// fp32_min_rows: from that many rows (0: never) the fp32 FMA paths run (AVX-512 builds; AVX2 builds while
// K <= kF32RowsMaxK; the portable build always computes in fp32); the other rows take the integer dot
// products, with int16 activations or, if int8_acts, int8 ones (lossy, fewer instructions).
template <bool Q4>
void gemv_rows(const float* x, int64_t M, int64_t K, const uint8_t* codes, const uint16_t* scales,
               const uint16_t* mins, int64_t N, float* y, int64_t fp32_min_rows, bool int8_acts) {
  const int64_t row_bytes = Q4 ? K / 2 : K, nb = K / kBlock;
#ifdef TM_AVX2
#ifdef TM_AVX512
  const bool fits = true;
#else
  const bool fits = K <= kF32RowsMaxK;
#endif
  const bool float_rows = fp32_min_rows > 0 && M >= std::max<int64_t>(2, fp32_min_rows) && fits;  // reads x directly
  const Int16Activations a = quantize_activations<int16_t>(x, float_rows || int8_acts ? 0 : M, K);
  const Int8Activations a8 = quantize_activations<int8_t>(x, !float_rows && int8_acts ? M : 0, K);
#endif
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    int64_t n = n0;
#ifdef TM_AVX2
    if (M == 1) {
      for (; n + kWideRows <= n1; n += kWideRows) {
        if (int8_acts) {
          dot_wide_int<Q4, kWideRows>(a8, K, codes + n * row_bytes, row_bytes, scales + n * nb,
                                      Q4 ? mins + n * nb : nullptr, y + n);
          continue;
        }
#ifdef TM_AVX512
        if constexpr (!Q4) {
          dot_wide_q8_512<kWideRows>(a, K, codes + n * row_bytes, row_bytes, scales + n * nb, y + n);
          continue;
        }
#endif
        dot_wide_int<Q4, kWideRows>(a, K, codes + n * row_bytes, row_bytes, scales + n * nb,
                                    Q4 ? mins + n * nb : nullptr, y + n);
      }
    }
#endif
#if defined(TM_AVX2) && !defined(TM_AVX512)
    if (float_rows) {
      for (; n < n1; ++n) {
        const uint8_t* c = codes + n * row_bytes;
        const uint16_t* s = scales + n * nb;
        const uint16_t* m = Q4 ? mins + n * nb : nullptr;
        for (int64_t r = 0; r < M; r += kTileRows) {
#define TM_DOT(RR) dot_rows_f32<Q4, RR>(x + r * K, K, K, c, s, m, y + r * N + n, N)
          switch (std::min<int64_t>(kTileRows, M - r)) {
            case 8: TM_DOT(8); break;
            case 7: TM_DOT(7); break;
            case 6: TM_DOT(6); break;
            case 5: TM_DOT(5); break;
            case 4: TM_DOT(4); break;
            case 3: TM_DOT(3); break;
            case 2: TM_DOT(2); break;
            default: TM_DOT(1); break;
          }
#undef TM_DOT
        }
      }
    }
#endif
#ifdef TM_AVX512
    if (float_rows) {
      for (; n < n1; ++n) {
        const uint8_t* c = codes + n * row_bytes;
        const uint16_t* s = scales + n * nb;
        const uint16_t* m = Q4 ? mins + n * nb : nullptr;
        for (int64_t r = 0; r < M; r += kTileRows512) {
#define TM_DOT(RR) dot_rows_f32_512<Q4, RR>(x + r * K, K, K, c, s, m, y + r * N + n, N)
          switch (std::min<int64_t>(kTileRows512, M - r)) {
            case 16: TM_DOT(16); break;
            case 15: TM_DOT(15); break;
            case 14: TM_DOT(14); break;
            case 13: TM_DOT(13); break;
            case 12: TM_DOT(12); break;
            case 11: TM_DOT(11); break;
            case 10: TM_DOT(10); break;
            case 9: TM_DOT(9); break;
            case 8: TM_DOT(8); break;
            case 7: TM_DOT(7); break;
            case 6: TM_DOT(6); break;
            case 5: TM_DOT(5); break;
            case 4: TM_DOT(4); break;
            case 3: TM_DOT(3); break;
            case 2: TM_DOT(2); break;
            default: TM_DOT(1); break;
          }
#undef TM_DOT
        }
      }
    }
#endif
    for (; n < n1; ++n) {
      const uint8_t* c = codes + n * row_bytes;
      const uint16_t* s = scales + n * nb;
      const uint16_t* m = Q4 ? mins + n * nb : nullptr;
      // each weight block is decoded once per tile of up to kTileRows activation rows
      for (int64_t r = 0; r < M; r += kTileRows) {
        const int64_t R = std::min<int64_t>(kTileRows, M - r);
#ifdef TM_AVX2
#define TM_DOT(RR)                                                \
  if (int8_acts)                                                  \
    dot_rows_int<Q4, RR>(a8, r, K, c, s, m, y + r * N + n, N);    \
  else                                                            \
    dot_rows_int<Q4, RR>(a, r, K, c, s, m, y + r * N + n, N)
#else
#define TM_DOT(RR) dot_rows<Q4, RR>(x + r * K, K, K, c, s, m, y + r * N + n, N)
#endif
        switch (R) {
          case 8: TM_DOT(8); break;
          case 7: TM_DOT(7); break;
          case 6: TM_DOT(6); break;
          case 5: TM_DOT(5); break;
          case 4: TM_DOT(4); break;
          case 3: TM_DOT(3); break;
          case 2: TM_DOT(2); break;
          default: TM_DOT(1); break;
        }
#undef TM_DOT
      }
    }
  });
}

// Rows [n0, n1) of the weight, decoded to fp32 into out [n1 - n0, K].
template <bool Q4>
void decode_rows(const uint8_t* codes, const uint16_t* scales, const uint16_t* mins, int64_t K, int64_t n0,
                 int64_t n1, float* out) {
  const int64_t row_bytes = Q4 ? K / 2 : K, nb = K / kBlock;
  at::parallel_for(n0, n1, 4, [&](int64_t a, int64_t e) {
    for (int64_t n = a; n < e; ++n) {
      float* o = out + (n - n0) * K;
      for (int64_t b = 0; b < nb; ++b) {
#ifdef TM_AVX512
        __m512 w0, w1;
        decode_block_512<Q4>(codes + n * row_bytes, b, scales + n * nb, Q4 ? mins + n * nb : nullptr, w0, w1);
        _mm512_storeu_ps(o + b * kBlock, w0);
        _mm512_storeu_ps(o + b * kBlock + 16, w1);
        continue;
#endif
        const float s = half_to_float(scales[n * nb + b]);
#ifdef TM_AVX2
        __m256 w[4];
        if constexpr (Q4) {
          decode_q4(codes + n * row_bytes + b * 16, s, half_to_float(mins[n * nb + b]), w);
        } else {
          decode_q8(reinterpret_cast<const int8_t*>(codes + n * row_bytes) + b * 32, s, w);
        }
        for (int i = 0; i < 4; ++i) _mm256_storeu_ps(o + b * kBlock + 8 * i, w[i]);
#else
        if constexpr (Q4) {
          decode_q4_scalar(codes + n * row_bytes + b * 16, s, half_to_float(mins[n * nb + b]), o + b * kBlock);
        } else {
          decode_q8_scalar(reinterpret_cast<const int8_t*>(codes + n * row_bytes) + b * 32, s, o + b * kBlock);
        }
#endif
      }
    }
  });
}

void check_weight(const torch::Tensor& codes, const torch::Tensor& scales, const torch::Tensor* mins, bool q4) {
  TORCH_CHECK(codes.device().is_cpu() && codes.is_contiguous() && codes.dim() == 2, "codes: contiguous 2-D CPU");
  TORCH_CHECK(codes.scalar_type() == (q4 ? at::kByte : at::kChar), q4 ? "q4 codes must be uint8" : "q8 codes must be int8");
  const int64_t K = q4 ? codes.size(1) * 2 : codes.size(1);
  TORCH_CHECK(K % kBlock == 0 && K <= 32768, "input features must be a multiple of 32, at most 32768");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous(), "scales must be contiguous fp16");
  TORCH_CHECK(scales.size(0) == codes.size(0) && scales.size(1) == K / kBlock, "scales shape mismatch");
  if (mins != nullptr) {
    TORCH_CHECK(mins->scalar_type() == at::kHalf && mins->is_contiguous(), "mins must be contiguous fp16");
    TORCH_CHECK(mins->sizes() == scales.sizes(), "mins shape mismatch");
  }
}

template <bool Q4>
torch::Tensor quant_linear(torch::Tensor x, const torch::Tensor& codes, const torch::Tensor& scales,
                           const torch::Tensor& mins, int64_t gemm_min_rows, int64_t tile_bytes,
                           int64_t fp32_min_rows, bool int8_acts) {
  check_weight(codes, scales, Q4 ? &mins : nullptr, Q4);
  const int64_t N = codes.size(0), K = Q4 ? codes.size(1) * 2 : codes.size(1);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.size(-1) == K, "x must be fp32 with ", K, " features");
  auto shape = x.sizes().vec();
  x = x.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0);
  shape.back() = N;
  const auto* c = static_cast<const uint8_t*>(codes.data_ptr());
  const auto* s = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  const auto* m = Q4 ? reinterpret_cast<const uint16_t*>(mins.data_ptr<at::Half>()) : nullptr;
  if (M < gemm_min_rows) {
    auto y = torch::empty({M, N}, x.options());
    gemv_rows<Q4>(x.data_ptr<float>(), M, K, c, s, m, N, y.data_ptr<float>(), fp32_min_rows, int8_acts);
    return y.view(shape);
  }
  // GEMM path: decode a tile of weight rows (all of them when they fit in tile_bytes) to fp32 and multiply
  // with torch's GEMM as y = x @ tile^T, written straight into y when one tile covers the weight. (Computing
  // y^T = tile @ x^T per cache-sized tile instead ran at 60% of this on Sapphire Rapids: the decode is cheap,
  // the transposed GEMM is not.)
  const int64_t tile = std::max<int64_t>(16, std::min<int64_t>(N, tile_bytes / (K * 4)));
  auto buf = torch::empty({tile, K}, x.options());
  if (tile == N) {
    decode_rows<Q4>(c, s, m, K, 0, N, buf.data_ptr<float>());
    return at::mm(x, buf.t()).view(shape);
  }
  auto y = torch::empty({M, N}, x.options());
  for (int64_t n0 = 0; n0 < N; n0 += tile) {
    const int64_t n1 = std::min(N, n0 + tile);
    decode_rows<Q4>(c, s, m, K, n0, n1, buf.data_ptr<float>());
    y.narrow(1, n0, n1 - n0).copy_(at::mm(x, buf.narrow(0, 0, n1 - n0).t()));
  }
  return y.view(shape);
}

}  // namespace

torch::Tensor q4_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor mins,
                        int64_t gemm_min_rows, int64_t tile_bytes, int64_t fp32_min_rows, bool int8_activations) {
  return quant_linear<true>(x, codes, scales, mins, gemm_min_rows, tile_bytes, fp32_min_rows, int8_activations);
}

torch::Tensor q8_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, int64_t gemm_min_rows,
                        int64_t tile_bytes, int64_t fp32_min_rows, bool int8_activations) {
  return quant_linear<false>(x, codes, scales, scales, gemm_min_rows, tile_bytes, fp32_min_rows, int8_activations);
}

// W8A8: y = (x_q @ W_q^T) * x_scale[m] * w_scale[n], with x rounded to int8 per row (absmax / 127) and the
// int8 GEMM done by torch (_int_mm: oneDNN's VNNI / AMX kernels). The weight's rows carry one scale each
// (the w8a8 format), so both scales factor out of the whole row's integer sum. Input features where some
// row's |x| exceeds `outlier` are left out of the int8 product and added in fp32 (LLM.int8()'s decomposition):
// a few such features would otherwise set every row's scale and flatten the rest to a handful of levels.
torch::Tensor w8a8_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor row_scales, double outlier) {
  TORCH_CHECK(codes.device().is_cpu() && codes.is_contiguous() && codes.dim() == 2 && codes.scalar_type() == at::kChar,
              "codes: contiguous 2-D int8 CPU");
  const int64_t N = codes.size(0), K = codes.size(1);
  TORCH_CHECK(row_scales.scalar_type() == at::kFloat && row_scales.is_contiguous() && row_scales.numel() == N,
              "row_scales must be ", N, " contiguous fp32 values");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.size(-1) == K, "x must be fp32 with ", K, " features");
  auto shape = x.sizes().vec();
  x = x.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0);
  shape.back() = N;
  const float* xp = x.data_ptr<float>();
  // outlier features: |x| > outlier in any row
  std::vector<uint8_t> is_outlier(K, 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < K; ++j) is_outlier[j] |= std::fabs(xp[m * K + j]) > outlier;
  std::vector<int64_t> outliers;
  for (int64_t j = 0; j < K; ++j)
    if (is_outlier[j]) outliers.push_back(j);
  auto xq = torch::empty({M, K}, x.options().dtype(at::kChar));
  std::vector<float> xs(M);
  int8_t* qp = xq.data_ptr<int8_t>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* r = xp + m * K;
      float amax = 0.f;
      for (int64_t j = 0; j < K; ++j) amax = std::max(amax, is_outlier[j] ? 0.f : std::fabs(r[j]));
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      xs[m] = amax / 127.f;
      for (int64_t j = 0; j < K; ++j)
        qp[m * K + j] = is_outlier[j] ? 0 : static_cast<int8_t>(std::nearbyint(r[j] * inv));
    }
  });
  const auto acc = at::_int_mm(xq, codes.t());
  auto y = torch::empty({M, N}, x.options());
  const int32_t* ap = acc.data_ptr<int32_t>();
  const float* ws = row_scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t n = 0; n < N; ++n) yp[m * N + n] = static_cast<float>(ap[m * N + n]) * xs[m] * ws[n];
  });
  if (!outliers.empty()) {
    const auto idx = torch::tensor(outliers, torch::kLong);
    const auto w_out = codes.index_select(1, idx).to(at::kFloat) * row_scales.unsqueeze(1);  // [N, k_o]
    y.addmm_(x.index_select(1, idx), w_out.t());
  }
  return y.view(shape);
}

// Dequantize every row of a weight (or of a row gather of one, e.g. embedding lookups) to fp32 [N, K].
torch::Tensor q4_dequantize(torch::Tensor codes, torch::Tensor scales, torch::Tensor mins) {
  codes = codes.contiguous(), scales = scales.contiguous(), mins = mins.contiguous();
  check_weight(codes, scales, &mins, true);
  const int64_t N = codes.size(0), K = codes.size(1) * 2;
  auto out = torch::empty({N, K}, torch::kFloat);
  decode_rows<true>(codes.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()),
                    reinterpret_cast<const uint16_t*>(mins.data_ptr<at::Half>()), K, 0, N, out.data_ptr<float>());
  return out;
}

torch::Tensor q8_dequantize(torch::Tensor codes, torch::Tensor scales) {
  codes = codes.contiguous(), scales = scales.contiguous();
  check_weight(codes, scales, nullptr, false);
  const int64_t N = codes.size(0), K = codes.size(1);
  auto out = torch::empty({N, K}, torch::kFloat);
  decode_rows<false>(reinterpret_cast<const uint8_t*>(codes.data_ptr<int8_t>()),
                     reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()), nullptr, K, 0, N,
                     out.data_ptr<float>());
  return out;
}

// The level this module was compiled for: "avx512", "avx2" or "portable" (the names of cpu_kernels.py).
std::string cpu_isa() {
#if defined(TM_AVX512)
  return "avx512";
#elif defined(TM_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}
