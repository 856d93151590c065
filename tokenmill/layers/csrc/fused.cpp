// Fused per-token elementwise work of a decoder layer (fp32). Each replaces several torch ops, and in a
// single-sequence decode step every op costs more in dispatch than in arithmetic.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kivi_checks.h"

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
// Rotary embedding in place on the first `heads` heads of a token's qkv row (the q and k heads), each of
// width Dh, its two halves rotated by the token's cos/sin (Dh / 2 values each).
inline void rotate_heads(float* row, const float* c, const float* s, int64_t heads, int64_t Dh) {
  const int64_t half = Dh / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* x = row + h * Dh;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = x[i], x2 = x[i + half];
      x[i] = x1 * c[i] - x2 * s[i];
      x[i + half] = x2 * c[i] + x1 * s[i];
    }
  }
}

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
      rotate_heads(row, cp + t * half, sp + t * half, H + Hkv, Dh);
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

// ---- KIVI (kv/kivi.py) ----------------------------------------------------------------------------------
// Codes: per = 8 / bits a byte; byte j of a token row holds channel j + i * span (span = D / per) at bit i * bits.
static inline void pack_row(const uint8_t* codes, int64_t D, int bits, uint8_t* dst) {
  const int per = 8 / bits;
  const int64_t span = D / per;
  for (int64_t j = 0; j < span; ++j) {
    uint8_t b = 0;
    for (int i = 0; i < per; ++i) b |= static_cast<uint8_t>(codes[i * span + j] << (i * bits));
    dst[j] = b;
  }
}

// fp16-rounded (scale, min) of [lo, hi] over `levels` steps and the code of x, as kv/kivi.py's _affine and
// quantizers compute them (round half to even).
static inline uint8_t affine_code(float x, float mf, float d, float levels) {
  return static_cast<uint8_t>(std::max(0.f, std::min(levels, std::nearbyint((x - mf) / d))));
}

// Seal and residual writes of rope_kivi_write for residual blocks of type R (float, or at::Half: the default
// for fp32 activations). A sealed block's tokens are gathered as R, whether they come from this step's rows or
// from the residual, so a block quantizes the same values whichever step filled it (as kv/kivi.py does).
template <typename R>
static void kivi_seal_and_stash(const float* p, int64_t W, int64_t T, int64_t H, int64_t Hkv, int64_t D, int64_t bs,
                                int64_t RB, int64_t G, int bits, uint8_t* kc, uint8_t* vc, at::Half* kst,
                                at::Half* vst, R* rk, R* rv, const int64_t* rows, const int64_t* sb,
                                const int64_t* ss, int64_t S) {
  const int64_t grp = D / G;
  const float levels = static_cast<float>((1 << bits) - 1);
  at::parallel_for(0, S * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kb(bs * D), vb(bs * D);  // the block's keys and values, [bs, D]
    std::vector<uint8_t> codes(D);
    std::vector<float> mfs(D), ds(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / Hkv, h = task % Hkv, blk = sb[i];
      for (int64_t o = 0; o < bs; ++o) {
        const int64_t src = ss[i * bs + o];
        float* kd = kb.data() + o * D;
        float* vd = vb.data() + o * D;
        if (src >= 0) {
          const float* k = p + src * W + (H + h) * D;
          const float* v = p + src * W + (H + Hkv + h) * D;
          for (int64_t c = 0; c < D; ++c) kd[c] = static_cast<float>(static_cast<R>(k[c]));
          for (int64_t c = 0; c < D; ++c) vd[c] = static_cast<float>(static_cast<R>(v[c]));
        } else {
          const int64_t rrow = -src - 1, r = rrow / bs, ro = rrow % bs;
          const R* k = rk + ((r * Hkv + h) * bs + ro) * D;
          const R* v = rv + ((r * Hkv + h) * bs + ro) * D;
          for (int64_t c = 0; c < D; ++c) kd[c] = static_cast<float>(k[c]);
          for (int64_t c = 0; c < D; ++c) vd[c] = static_cast<float>(v[c]);
        }
      }
      at::Half* st = kst + (blk * Hkv + h) * D * 2;
      for (int64_t c = 0; c < D; ++c) {  // keys: (scale, min) per channel over the block's tokens
        float lo = kb[c], hi = kb[c];
        for (int64_t o = 1; o < bs; ++o) lo = std::min(lo, kb[o * D + c]), hi = std::max(hi, kb[o * D + c]);
        const at::Half sh = static_cast<at::Half>((hi - lo) / levels), mh = static_cast<at::Half>(lo);
        st[2 * c] = sh;
        st[2 * c + 1] = mh;
        const float sf = static_cast<float>(sh);
        mfs[c] = static_cast<float>(mh);
        ds[c] = sf > 0.f ? sf : 1.f;
      }
      for (int64_t o = 0; o < bs; ++o) {
        const int64_t row = (blk * Hkv + h) * bs + o;
        const float* kx = kb.data() + o * D;
        for (int64_t c = 0; c < D; ++c) codes[c] = affine_code(kx[c], mfs[c], ds[c], levels);
        pack_row(codes.data(), D, bits, kc + row * RB);
        at::Half* vs = vst + row * G * 2;  // values: (scale, min) per token and group
        const float* x = vb.data() + o * D;
        for (int64_t g = 0; g < G; ++g) {
          const float* xg = x + g * grp;
          float lo = xg[0], hi = xg[0];
          for (int64_t e = 1; e < grp; ++e) lo = std::min(lo, xg[e]), hi = std::max(hi, xg[e]);
          const at::Half sh = static_cast<at::Half>((hi - lo) / levels), mh = static_cast<at::Half>(lo);
          vs[2 * g] = sh;
          vs[2 * g + 1] = mh;
          const float sf = static_cast<float>(sh), mf = static_cast<float>(mh), d = sf > 0.f ? sf : 1.f;
          for (int64_t e = 0; e < grp; ++e) codes[g * grp + e] = affine_code(xg[e], mf, d, levels);
        }
        pack_row(codes.data(), D, bits, vc + row * RB);
      }
    }
  });
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t rrow = rows[t];
      if (rrow < 0) continue;
      const int64_t r = rrow / bs, o = rrow % bs;
      const float* row = p + t * W;
      for (int64_t h = 0; h < Hkv; ++h) {
        R* kd = rk + ((r * Hkv + h) * bs + o) * D;
        R* vd = rv + ((r * Hkv + h) * bs + o) * D;
        const float* k = row + (H + h) * D;
        const float* v = row + (H + Hkv + h) * D;
        for (int64_t c = 0; c < D; ++c) kd[c] = static_cast<R>(k[c]);
        for (int64_t c = 0; c < D; ++c) vd[c] = static_cast<R>(v[c]);
      }
    }
  });
}

// Rotate q/k in place (as rope_kv_write), then for a KIVI cache: (1) seal the blocks this step completes —
// gather each block's bs tokens per KV head (from this step's rotated rows, or from the residual rows the
// block filled earlier), quantize the keys per channel and the values per token and group; (2) copy the
// tokens of blocks still filling into their residual rows. Seals read residual rows before any is written,
// so a residual a seal frees may take a new block's tokens in the same step.
// qkv [T, (H + 2 Hkv) * D] fp32; codes [blocks, Hkv, bs, D * bits / 8] uint8; k_stats [blocks, Hkv, D, 2]
// fp16; v_stats [blocks, Hkv, bs, G, 2] fp16; res [R, Hkv, bs, D] fp32 or fp16; res_rows [T] int64
// (r * bs + offset or -1); seal_blocks [S] int64; seal_src [S, bs] int64 (token t >= 0, or -(residual row) - 1).
void rope_kivi_write(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_codes,
                     torch::Tensor v_codes, torch::Tensor k_stats, torch::Tensor v_stats, torch::Tensor res_k,
                     torch::Tensor res_v, torch::Tensor res_rows, torch::Tensor seal_blocks, torch::Tensor seal_src,
                     int64_t H, int64_t Hkv, int64_t bits) {
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && qkv.is_contiguous(), "qkv: contiguous fp32");
  check_kivi_cache(k_codes, v_codes, k_stats, v_stats, res_k, res_v, bits);
  cos = cos.contiguous(), sin = sin.contiguous();
  res_rows = res_rows.to(torch::kLong).contiguous();
  seal_blocks = seal_blocks.to(torch::kLong).contiguous();
  seal_src = seal_src.to(torch::kLong).contiguous();
  const int64_t T = qkv.size(0), D = res_k.size(3), half = D / 2, bs = k_codes.size(2), RB = k_codes.size(3);
  const int64_t G = v_stats.size(3), S = seal_blocks.numel();
  TORCH_CHECK(RB * 8 == D * bits && D <= 512, "kivi codes: D * bits / 8 bytes a row, D <= 512");
  TORCH_CHECK(qkv.size(1) == (H + 2 * Hkv) * D && cos.size(-1) == half, "qkv/cos shapes");
  TORCH_CHECK(res_rows.numel() == T && (S == 0 || seal_src.size(1) == bs), "res_rows / seal_src shapes");
  float* p = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t W = qkv.size(1);
  at::parallel_for(0, T, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* row = p + t * W;
      rotate_heads(row, cp + t * half, sp + t * half, H + Hkv, D);
    }
  });
  uint8_t* kc = k_codes.data_ptr<uint8_t>();
  uint8_t* vc = v_codes.data_ptr<uint8_t>();
  at::Half* kst = k_stats.data_ptr<at::Half>();
  at::Half* vst = v_stats.data_ptr<at::Half>();
  const int64_t* rows = res_rows.data_ptr<int64_t>();
  const int64_t* sb = seal_blocks.data_ptr<int64_t>();
  const int64_t* ss = seal_src.data_ptr<int64_t>();
  if (res_k.scalar_type() == at::kHalf)
    kivi_seal_and_stash(p, W, T, H, Hkv, D, bs, RB, G, static_cast<int>(bits), kc, vc, kst, vst,
                        res_k.data_ptr<at::Half>(), res_v.data_ptr<at::Half>(), rows, sb, ss, S);
  else
    kivi_seal_and_stash(p, W, T, H, Hkv, D, bs, RB, G, static_cast<int>(bits), kc, vc, kst, vst,
                        res_k.data_ptr<float>(), res_v.data_ptr<float>(), rows, sb, ss, S);
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
