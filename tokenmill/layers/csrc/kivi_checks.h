// The KIVI cache tensors both the fused write (fused.cpp) and the attention kernel (paged_attention.cpp) take,
// checked once here (kv/kivi.py has the layout).
#pragma once
#include <torch/extension.h>

inline void check_kivi_cache(const torch::Tensor& k_codes, const torch::Tensor& v_codes, const torch::Tensor& k_stats,
                             const torch::Tensor& v_stats, const torch::Tensor& res_k, const torch::Tensor& res_v,
                             int64_t bits) {
  TORCH_CHECK(bits == 2 || bits == 4, "kivi: 2 or 4 bits");
  for (const auto* t : {&k_codes, &v_codes, &k_stats, &v_stats, &res_k, &res_v})
    TORCH_CHECK(t->is_contiguous(), "kivi cache tensors must be contiguous");
  TORCH_CHECK(k_codes.scalar_type() == at::kByte && v_codes.scalar_type() == at::kByte, "kivi codes: uint8");
  TORCH_CHECK(k_stats.scalar_type() == at::kHalf && v_stats.scalar_type() == at::kHalf, "kivi stats: fp16");
  TORCH_CHECK(res_k.scalar_type() == res_v.scalar_type() &&
                  (res_k.scalar_type() == at::kFloat || res_k.scalar_type() == at::kHalf),
              "kivi residual: fp32 or fp16, K and V alike");
}
