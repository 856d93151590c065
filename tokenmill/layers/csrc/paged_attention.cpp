// Paged decode attention for the CPU: one query token per sequence attends over its KV blocks, read in
// place through the block table (no gather copy). Within a block each KV head's tokens are contiguous,
// so a (sequence, head) task streams whole cache lines. Grouped-query heads that share a KV head are handled
// together so each K/V row is read once. Scores are kept per (sequence, KV head) in a small buffer:
// pass 1 computes q.k, pass 2 the softmax, pass 3 accumulates the values. Accumulation is in fp32.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <limits>
#include <vector>

template <typename T>
static void decode_kernel(const T* q, const T* kc, const T* vc, const int64_t* tables, const int64_t* lens,
                          T* out, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t bs, int64_t max_blocks,
                          float scale) {
  const int64_t G = H / Hkv;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, qf(G * D), acc(G * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, h = task % Hkv;
      const int64_t L = lens[b];
      const int64_t* table = tables + b * max_blocks;
      scores.resize(G * L);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < D; ++i) qf[g * D + i] = static_cast<float>(q[(b * H + h * G + g) * D + i]) * scale;
      std::vector<float> maxs(G, -std::numeric_limits<float>::infinity());
      for (int64_t t = 0; t < L; ++t) {
        const T* k = kc + ((table[t / bs] * Hkv + h) * bs + t % bs) * D;
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qf.data() + g * D;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t i = 0; i < D; ++i) s += qg[i] * static_cast<float>(k[i]);
          scores[g * L + t] = s;
          maxs[g] = std::max(maxs[g], s);
        }
      }
      std::vector<float> sums(G, 0.f);
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * L;
        const float m = maxs[g];
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < L; ++t) {
          sg[t] = std::exp(sg[t] - m);  // vectorized (libmvec) under -ffast-math
          sum += sg[t];
        }
        sums[g] = sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < L; ++t) {
        const T* v = vc + ((table[t / bs] * Hkv + h) * bs + t % bs) * D;
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * L + t];
          float* ag = acc.data() + g * D;
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) ag[i] += p * static_cast<float>(v[i]);
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < D; ++i)
          out[(b * H + h * G + g) * D + i] = static_cast<T>(acc[g * D + i] / sums[g]);
    }
  });
}

// q [B, H, D]; k_cache, v_cache [num_blocks, Hkv, block_size, D]; block_tables [B, max_blocks] int64;
// context_lens [B] int64 (>= 1). Returns [B, H, D].
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "bad shapes");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "cache must be contiguous");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  context_lens = context_lens.contiguous();
  auto out = torch::empty_like(q);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t Hkv = k_cache.size(1), bs = k_cache.size(2);
  TORCH_CHECK(H % Hkv == 0 && k_cache.size(3) == D, "head layout mismatch");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    decode_kernel<scalar_t>(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                            block_tables.data_ptr<int64_t>(), context_lens.data_ptr<int64_t>(),
                            out.data_ptr<scalar_t>(), B, H, Hkv, D, bs, block_tables.size(1),
                            static_cast<float>(scale));
  });
  return out;
}
