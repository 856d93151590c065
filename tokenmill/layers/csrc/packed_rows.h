// Unpacking of bit-packed KV rows (int4 blocks, KIVI codes) into floats, shared by the attention kernels
// (paged_attention.cpp, split_kv_attention.cpp).
#pragma once
#include <torch/extension.h>
#include <cstdint>

#include "isa.h"

// One packed row of `bits`-bit codes (byte j holds element j + i * span at bit i * bits, span = D * bits / 8;
// int4's nibble layout is bits = 4) into D floats: the codes, or with `sm` (fp16 scale, min per group of `grp`
// elements) the dequantized values. A task decodes each cached row once into this small buffer and reuses it
// for every query row that reads it (the query heads of a KV head, a row's several queries), instead of
// unpacking nibbles inside every dot product. AVX-512 / AVX2 widen 16 / 8 codes at a time; the scalar loop
// is the portable path and the tail.
inline void decode_row(const uint8_t* bytes, int bits, int64_t D, int64_t grp, const at::Half* sm,
                              float* out) {
  const int per = 8 / bits, mask = (1 << bits) - 1;
  const int64_t span = D / per;
  for (int i = 0; i < per; ++i) {
    const int shift = i * bits;
    float* o = out + i * span;
    int64_t j = 0;
#ifdef TM_AVX512
    {
      const __m512i vm = _mm512_set1_epi32(mask);
      const __m128i cnt = _mm_cvtsi32_si128(shift);
      for (; j + 16 <= span; j += 16) {
        __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + j)));
        w = _mm512_and_si512(_mm512_srl_epi32(w, cnt), vm);
        _mm512_storeu_ps(o + j, _mm512_cvtepi32_ps(w));
      }
    }
#endif
#ifdef TM_AVX2
    {
      const __m256i vm = _mm256_set1_epi32(mask);
      const __m128i cnt = _mm_cvtsi32_si128(shift);
      for (; j + 8 <= span; j += 8) {
        __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + j)));
        w = _mm256_and_si256(_mm256_srl_epi32(w, cnt), vm);
        _mm256_storeu_ps(o + j, _mm256_cvtepi32_ps(w));
      }
    }
#endif
    for (; j < span; ++j) o[j] = static_cast<float>((bytes[j] >> shift) & mask);
  }
  if (sm == nullptr) return;
  for (int64_t g = 0; g < D / grp; ++g) {
    const float s = static_cast<float>(sm[2 * g]), m = static_cast<float>(sm[2 * g + 1]);
    float* o = out + g * grp;
#pragma omp simd
    for (int64_t e = 0; e < grp; ++e) o[e] = o[e] * s + m;
  }
}

