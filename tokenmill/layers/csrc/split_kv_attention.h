// The split-KV attention kernel (split_kv_attention.cpp) as paged_attention.cpp calls it.
#pragma once
#include <cstdint>

enum class CacheKind { kFloat, kInt8, kInt4 };

// Paged attention of fp32 queries over an fp32, int8 (k_scale, v_scale: fp32 [blocks, Hkv, block_size]) or
// int4 (fp16 [blocks, Hkv, block_size, groups, 2]) cache, with paged_attention()'s other arguments. Returns
// false where it does not apply (portable builds, head_dim not a multiple of 8): the caller runs the generic
// kernel.
bool split_kv_attention(const float* q, const void* kc, const void* vc, const void* k_scale, const void* v_scale,
                        CacheKind kind, int64_t groups, const int64_t* tables, const int64_t* lens, const int64_t* qsl,
                        float* out, float* lse, float* score_out, const int64_t* score_from, int64_t score_len,
                        int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t bs, int64_t max_blocks, float scale);
