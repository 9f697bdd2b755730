// Vectorised weight reads: 8 consecutive weights as f32 from one 16-byte (bf16), 8-byte (fp8) or 2×16-byte (f32) load, and 16 FP8 weights from one 16-byte load (unpack16_fp8).
#pragma once
#include "common.h"

// One load's worth of weights, kept raw so several loads can be in flight before any is decoded:
// 16 bytes (8 bf16 or 16 FP8 weights), or 32 (8 f32 weights).
struct Chunk16 {
    uint4 a, b;
};

template <int WDT>
__device__ __forceinline__ Chunk16 load_chunk(const uint8_t* p) {
    Chunk16 c;
    c.a = *(const uint4*)p;
    c.b = WDT == WDT_F32 ? *(const uint4*)(p + 16) : make_uint4(0, 0, 0, 0);
    return c;
}

// The chunk's weights as f32 (16 for FP8, unscaled; 8 otherwise).
template <int WDT>
__device__ __forceinline__ void unpack_chunk(Chunk16 c, float* o) {
    uint32_t u[8] = {c.a.x, c.a.y, c.a.z, c.a.w, c.b.x, c.b.y, c.b.z, c.b.w};
    if (WDT == WDT_FP8) {
#pragma unroll
        for (int i = 0; i < 4; ++i) fp8x4_to_f32(u[i], o + 4 * i);
    } else if (WDT == WDT_BF16) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            o[2 * i] = __uint_as_float(u[i] << 16);
            o[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
        }
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) o[i] = __uint_as_float(u[i]);
    }
}

__device__ __forceinline__ void unpack8(const uint8_t* p, int wdt, float* o) {
    if (wdt == WDT_BF16) {
        unpack_chunk<WDT_BF16>(load_chunk<WDT_BF16>(p), o);
    } else if (wdt == WDT_FP8) {
        uint2 r = *(const uint2*)p;
        fp8x4_to_f32(r.x, o);
        fp8x4_to_f32(r.y, o + 4);
    } else {
        unpack_chunk<WDT_F32>(load_chunk<WDT_F32>(p), o);
    }
}

// Σ w[k0..k0+8] · x[k0..k0+8] for a weight row of type WDT (FP8 scaled by its block's scale).
template <int WDT>
__device__ __forceinline__ float dot8(const uint8_t* row, const float* scales_row, int k0, int bk, const float* x) {
    const int es = WDT == WDT_F32 ? 4 : WDT == WDT_BF16 ? 2 : 1;
    float w[8];
    unpack8(row + (int64_t)k0 * es, WDT, w);
    const float4* xp = (const float4*)(x + k0);
    float4 a = xp[0], b = xp[1];
    float d = w[0] * a.x + w[1] * a.y + w[2] * a.z + w[3] * a.w + w[4] * b.x + w[5] * b.y + w[6] * b.z + w[7] * b.w;
    return WDT == WDT_FP8 ? d * scales_row[k0 / bk] : d;
}

// 16 consecutive FP8 weights (unscaled) from one 16-byte load.
__device__ __forceinline__ void unpack16_fp8(const uint8_t* p, float* o) {
    unpack_chunk<WDT_FP8>(load_chunk<WDT_FP8>(p), o);
}

// Σ w[k0..k0+16] · x[k0..k0+16] for an FP8 weight row from one 16-byte load, scaled by its block's
// scale (needs bk % 16 == 0).
__device__ __forceinline__ float dot16_fp8(const uint8_t* row, const float* scales_row, int k0, int bk, const float* x) {
    float w[16];
    unpack16_fp8(row + k0, w);
    const float4* xp = (const float4*)(x + k0);
    float d = 0.f;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        float4 a = xp[q];
        d += w[4 * q] * a.x + w[4 * q + 1] * a.y + w[4 * q + 2] * a.z + w[4 * q + 3] * a.w;
    }
    return d * scales_row[k0 / bk];
}

// The widest dot the weight type allows: 16 FP8 or 8 bf16 / f32 weights (VEC_ELEMS of them).
template <int WDT>
struct VecDot {
    static const int ELEMS = WDT == WDT_FP8 ? 16 : 8;
    static __device__ __forceinline__ float dot(const uint8_t* row, const float* scales_row, int k0, int bk, const float* x) {
        if (WDT == WDT_FP8) return dot16_fp8(row, scales_row, k0, bk, x);
        return dot8<WDT>(row, scales_row, k0, bk, x);
    }
};
