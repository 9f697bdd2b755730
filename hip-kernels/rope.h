// One rotary pair of `seg` in place: pairs (2i, 2i+1) when interleaved (DeepSeek), else (i, i +
// half); the angle formed in float32 from the YaRN inverse frequency, as the reference does, and
// cos / sin scaled by YaRN's `scale` (rope.hip, mla_kv_entry.hip).
#pragma once
#include "common.h"

__device__ __forceinline__ void rope_pair(float* seg, int i, int half, int interleaved, float inv_freq_i, float pos, float scale) {
    float angle = inv_freq_i * pos;
    float c = cosf(angle) * scale, s = sinf(angle) * scale;
    int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
    float x0 = seg[a], x1 = seg[b];
    seg[a] = x0 * c - x1 * s;
    seg[b] = x1 * c + x0 * s;
}
