// The RMSNorm of one row by a block (norm.hip's kernels, mla_kv_entry.hip). A row whose width is a
// multiple of 4 and fits NORM_VEC float4s per thread (7,168 columns with 256 threads: 7) is read
// once with 16-byte loads, all issued before the first is used, and kept in registers for the
// scaling pass: at batch 1 these kernels are pure latency, and a loop of dependent scalar loads (28
// a thread for 7,168 columns) cost ~25 µs a norm. Other widths take the scalar loop.
#pragma once
#include "common.h"

#define NORM_VEC 8

// Σ of squares over v's live entries (NV float4s a thread: NORM_VEC, or fewer for narrow rows,
// whose registers then stay free: MLA's 512-wide cache entries take 2).
template <int NV = NORM_VEC>
__device__ __forceinline__ float sumsq4(const float4* v, int n4) {
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
        int c = threadIdx.x + i * blockDim.x;
        if (c < n4) ss += v[i].x * v[i].x + v[i].y * v[i].y + v[i].z * v[i].z + v[i].w * v[i].w;
    }
    return ss;
}

// out = w · v · rsqrt(mean(v²) + eps) for the row held in registers (v[i] is float4 column
// threadIdx.x + i · blockDim.x).
template <int NV = NORM_VEC>
__device__ __forceinline__ void scale_store4(const float4* v, const float* __restrict__ w, float* out, int n4, float ss, int n, float eps) {
    float r = rsqrtf(block_sum(ss) / (float)n + eps);
    const float4* w4 = (const float4*)w;
    float4 wv[NV];
#pragma unroll
    for (int i = 0; i < NV; ++i) {
        int c = threadIdx.x + i * blockDim.x;
        if (c < n4) wv[i] = w4[c];
    }
#pragma unroll
    for (int i = 0; i < NV; ++i) {
        int c = threadIdx.x + i * blockDim.x;
        if (c < n4) ((float4*)out)[c] = make_float4(wv[i].x * (v[i].x * r), wv[i].y * (v[i].y * r), wv[i].z * (v[i].z * r), wv[i].w * (v[i].w * r));
    }
}

// Whether a row of n columns at these addresses takes the register-resident float4 form.
template <int NV = NORM_VEC>
__device__ __forceinline__ bool norm_vec_ok(int n, const void* a, const void* b, const void* c) {
    return n % 4 == 0 && n / 4 <= NV * (int)blockDim.x && ((unsigned long long)a | (unsigned long long)b | (unsigned long long)c) % 16 == 0;
}

template <int NV = NORM_VEC>
__device__ void rms_norm_row(const float* x, const float* __restrict__ w, float* out, int n, float eps) {
    if (norm_vec_ok<NV>(n, x, w, out)) {
        int n4 = n / 4;
        float4 v[NV];
#pragma unroll
        for (int i = 0; i < NV; ++i) {
            int c = threadIdx.x + i * blockDim.x;
            if (c < n4) v[i] = ((const float4*)x)[c];
        }
        scale_store4<NV>(v, w, out, n4, sumsq4<NV>(v, n4), n, eps);
        return;
    }
    float ss = 0.f;
#pragma unroll 4
    for (int c = threadIdx.x; c < n; c += blockDim.x) ss += x[c] * x[c];
    ss = block_sum(ss);
    float r = rsqrtf(ss / (float)n + eps);
#pragma unroll 4
    for (int c = threadIdx.x; c < n; c += blockDim.x) out[c] = w[c] * (x[c] * r);
}
