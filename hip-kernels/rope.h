// One rotary pair of `seg` in place: pairs (2i, 2i+1) when interleaved (DeepSeek), else (i, i +
// half); the angle formed in float32 from the YaRN inverse frequency, as the reference does, and
// cos / sin scaled by YaRN's `scale` (rope.hip, mla_kv_entry.hip).
#pragma once
#include "common.h"

// The pair's (cos, sin) · scale.
__device__ __forceinline__ float2 rope_cs(float inv_freq_i, float pos, float scale) {
    const float angle = inv_freq_i * pos;
    return make_float2(cosf(angle) * scale, sinf(angle) * scale);
}

// Pair i of `seg` rotated by cs (rope_cs's).
__device__ __forceinline__ void rope_apply(float* seg, int i, int half, int interleaved, float2 cs) {
    int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
    float x0 = seg[a], x1 = seg[b];
    seg[a] = x0 * cs.x - x1 * cs.y;
    seg[b] = x1 * cs.x + x0 * cs.y;
}

__device__ __forceinline__ void rope_pair(float* seg, int i, int half, int interleaved, float inv_freq_i, float pos, float scale) {
    rope_apply(seg, i, half, interleaved, rope_cs(inv_freq_i, pos, scale));
}
