// Fused per-token elementwise work of a decoder layer (fp32). Each replaces several torch ops, and in a
// single-sequence decode step every op costs more in dispatch than in arithmetic.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>

// x += delta (when given), then returns weight * x / rms(x). x: [T, D] fp32, updated in place.
torch::Tensor add_rms_norm(torch::Tensor x, c10::optional<torch::Tensor> delta, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2, "x: contiguous fp32 [T, D]");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.numel() == x.size(1), "weight: fp32 [D]");
  const int64_t T = x.size(0), D = x.size(1);
  torch::Tensor d;
  if (delta.has_value()) {
    d = delta->contiguous();
    TORCH_CHECK(d.scalar_type() == at::kFloat && d.sizes() == x.sizes(), "delta must match x");
  }
  auto out = torch::empty_like(x);
  float* xp = x.data_ptr<float>();
  const float* dp = d.defined() ? d.data_ptr<float>() : nullptr;
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* xr = xp + t * D;
      if (dp != nullptr) {
        const float* dr = dp + t * D;
#pragma omp simd
        for (int64_t i = 0; i < D; ++i) xr[i] += dr[i];
      }
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < D; ++i) ss += xr[i] * xr[i];
      const float r = 1.f / std::sqrt(ss / static_cast<float>(D) + e);
      float* orow = op + t * D;
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) orow[i] = wp[i] * (xr[i] * r);
    }
  });
  return out;
}

// Store one head's vector at a cache row: copied as fp32, or (int8 cache) quantized symmetrically with one
// scale per vector, amax / 127, the codes rounded half to even, as kv/cache.py's quantize_int8 does.
static inline void store_head(const float* x, int64_t Dh, float* dst) { std::memcpy(dst, x, Dh * sizeof(float)); }

static inline void store_head(const float* x, int64_t Dh, int8_t* dst, float* scale) {
  float amax = 0.f;
  for (int64_t i = 0; i < Dh; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float s = amax / 127.f;
  *scale = s;
  const float d = s > 0.f ? s : 1.f;
  for (int64_t i = 0; i < Dh; ++i) dst[i] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, std::nearbyint(x[i] / d))));
}

// int4 cache: per group of Dh / G elements, min and max give an fp16 scale (max - min) / 15 and min; codes
// round((x - min) / scale) to [0, 15] with the fp16-rounded scale and min, as kv/cache.py's quantize_int4
// does; byte j holds element j (low nibble) and element j + Dh / 2 (high nibble).
static inline void store_head(const float* x, int64_t Dh, int64_t G, uint8_t* dst, at::Half* sm) {
  const int64_t grp = Dh / G, half = Dh / 2;
  uint8_t codes[512];
  for (int64_t g = 0; g < G; ++g) {
    const float* xg = x + g * grp;
    float lo = xg[0], hi = xg[0];
    for (int64_t i = 1; i < grp; ++i) lo = std::min(lo, xg[i]), hi = std::max(hi, xg[i]);
    const at::Half sh = static_cast<at::Half>((hi - lo) / 15.f), mh = static_cast<at::Half>(lo);
    sm[2 * g] = sh;
    sm[2 * g + 1] = mh;
    const float sf = static_cast<float>(sh), mf = static_cast<float>(mh);
    const float d = sf > 0.f ? sf : 1.f;
    for (int64_t i = 0; i < grp; ++i)
      codes[g * grp + i] = static_cast<uint8_t>(std::max(0.f, std::min(15.f, std::nearbyint((xg[i] - mf) / d))));
  }
  for (int64_t j = 0; j < half; ++j) dst[j] = static_cast<uint8_t>(codes[j] | (codes[j + half] << 4));
}

// qkv: [T, (H + 2 Hkv) * Dh] fp32, rotated in place (q and k heads, half-split layout); k and v are then
// written to their cache slots (slot = block * block_size + offset; a negative slot is not written).
// cos, sin: [T, Dh / 2]. Caches: [blocks, Hkv, block_size, Dh], fp32, or int8 with k_scale, v_scale
// [blocks, Hkv, block_size] fp32 (quantize on write).
void rope_kv_write(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
                   torch::Tensor v_cache, c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale,
                   torch::Tensor slot_mapping, int64_t H, int64_t Hkv) {
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && qkv.is_contiguous(), "qkv: contiguous fp32");
  const bool int4 = k_cache.scalar_type() == at::kByte;
  const bool quantized = int4 || k_cache.scalar_type() == at::kChar;
  TORCH_CHECK(quantized || k_cache.scalar_type() == at::kFloat, "caches: fp32, int8 or int4 (uint8)");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && v_cache.scalar_type() == k_cache.scalar_type(),
              "caches: contiguous, one dtype");
  TORCH_CHECK(quantized == (k_scale.has_value() && v_scale.has_value()), "an int8 cache needs K and V scales");
  cos = cos.contiguous(), sin = sin.contiguous();
  slot_mapping = slot_mapping.to(torch::kLong).contiguous();
  TORCH_CHECK(slot_mapping.numel() == qkv.size(0), "one slot per token");
  const int64_t T = qkv.size(0), Dh = k_cache.size(3) * (int4 ? 2 : 1), half = Dh / 2, bs = k_cache.size(2);
  TORCH_CHECK(Dh <= 512, "head_dim <= 512");
  TORCH_CHECK(qkv.size(1) == (H + 2 * Hkv) * Dh && cos.size(-1) == half, "qkv/cos shapes");
  float* p = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* kf = quantized ? nullptr : k_cache.data_ptr<float>();
  float* vf = quantized ? nullptr : v_cache.data_ptr<float>();
  int8_t* kq = quantized && !int4 ? k_cache.data_ptr<int8_t>() : nullptr;
  int8_t* vq = quantized && !int4 ? v_cache.data_ptr<int8_t>() : nullptr;
  uint8_t* k4 = int4 ? k_cache.data_ptr<uint8_t>() : nullptr;
  uint8_t* v4 = int4 ? v_cache.data_ptr<uint8_t>() : nullptr;
  torch::Tensor ks, vs;
  int64_t G = 1;
  if (int4) {
    ks = *k_scale, vs = *v_scale;
    TORCH_CHECK(ks.is_contiguous() && vs.is_contiguous() && ks.scalar_type() == at::kHalf &&
                    vs.scalar_type() == at::kHalf && ks.dim() == 5 && ks.size(4) == 2,
                "int4 scales: contiguous fp16 [blocks, Hkv, block_size, groups, 2]");
    G = ks.size(3);
    TORCH_CHECK(Dh % G == 0 && half % (Dh / G) == 0, "int4: a group must lie within one half of the head");
  } else if (quantized) {
    ks = *k_scale, vs = *v_scale;
    TORCH_CHECK(ks.is_contiguous() && vs.is_contiguous() && ks.scalar_type() == at::kFloat &&
                    vs.scalar_type() == at::kFloat && ks.numel() == k_cache.numel() / Dh,
                "scales: contiguous fp32 [blocks, Hkv, block_size]");
  }
  float* ksp = quantized && !int4 ? ks.data_ptr<float>() : nullptr;
  float* vsp = quantized && !int4 ? vs.data_ptr<float>() : nullptr;
  at::Half* ks4 = int4 ? ks.data_ptr<at::Half>() : nullptr;
  at::Half* vs4 = int4 ? vs.data_ptr<at::Half>() : nullptr;
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t W = qkv.size(1);
  at::parallel_for(0, T, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* row = p + t * W;
      const float* c = cp + t * half;
      const float* s = sp + t * half;
      for (int64_t h = 0; h < H + Hkv; ++h) {
        float* x = row + h * Dh;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = x[i], x2 = x[i + half];
          x[i] = x1 * c[i] - x2 * s[i];
          x[i + half] = x2 * c[i] + x1 * s[i];
        }
      }
      const int64_t slot = slots[t];
      if (slot < 0) continue;
      const int64_t base = (slot / bs) * Hkv * bs + slot % bs;
      for (int64_t h = 0; h < Hkv; ++h) {
        const int64_t r = base + h * bs;  // cache row of (slot, head)
        const float* k = row + (H + h) * Dh;
        const float* v = row + (H + Hkv + h) * Dh;
        if (int4) {
          store_head(k, Dh, G, k4 + r * half, ks4 + r * G * 2);
          store_head(v, Dh, G, v4 + r * half, vs4 + r * G * 2);
        } else if (quantized) {
          store_head(k, Dh, kq + r * Dh, ksp + r);
          store_head(v, Dh, vq + r * Dh, vsp + r);
        } else {
          store_head(k, Dh, kf + r * Dh);
          store_head(v, Dh, vf + r * Dh);
        }
      }
    }
  });
}

// gate_up: [T, 2I] -> silu(gate) * up: [T, I].
torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == at::kFloat && gate_up.dim() == 2, "gate_up: fp32 [T, 2I]");
  gate_up = gate_up.contiguous();
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  auto out = torch::empty({T, I}, gate_up.options());
  const float* g = gate_up.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, T, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* gr = g + t * 2 * I;
      const float* ur = gr + I;
      float* orow = o + t * I;
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) orow[i] = gr[i] / (1.f + std::exp(-gr[i])) * ur[i];
    }
  });
  return out;
}
