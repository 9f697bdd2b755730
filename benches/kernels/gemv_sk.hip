// EXPERIMENT, not used by the engine (benches/gemv_variants.py compiles and times it against
// linear.hip's gemv1_fp8w; results in docs/BENCHMARKS.md, twenty-fifth session: the measured
// forms, sk / skm / skc, were slower than gemv1_fp8w at V3's batch-1 shapes, so none went into
// hip-kernels/; skx, the last, was slower too: twenty-sixth session).
// y[N] = W[N, K] · x[K] for one row of x and block-scaled FP8 weights, as a "stream-K" GEMV: one
// wave of blocks (the host launches exactly the resident count) whose warps each take an equal,
// contiguous share of the whole (row group, K step) work, so that every warp streams the same
// number of weight bytes and none waits on a last, part-filled wave (linear.hip's GEMV runs V3's
// o_proj in 1.36 waves, the second at a third of the occupancy).
//   - work unit: R = 4 weight rows × one K step of 32 lanes × 16 FP8 weights (2 KB); units in
//     (row group, step) order, warp w takes units [w·U/TW, (w+1)·U/TW) of U (TW warps in all);
//   - each lane keeps SK_D units' chunks in flight (a ring of registers, the loop unrolled by
//     SK_D so the ring is indexed statically);
//   - a row group whose steps one warp holds entirely is written by it; one cut between warps
//     is summed in a fixed order: each warp writes its part (part[2·w + slot], slot 0 for the
//     group its range starts in, 1 for the one it ends in) and counts itself in cnt[group]; the
//     warp that completes the count adds the parts in warp order, writes y and resets the count
//     (so cnt stays zero between launches; the host zeroes it once). Results are deterministic
//     for a given grid (the SM count fixes where the cuts fall).
#include "common.h"
#include "vec8.h"
#include "bf16.h"
#ifndef SKM_INT_CVT
#define SKM_INT_CVT 0
#endif

#define SK_R 4      // weight rows a unit (a lane's 16-byte chunk of each)
#define SK_STEP 512 // K a unit: 32 lanes × 16 FP8 weights

struct SkArgs {
    const float* x;
    const uint8_t* w;
    const float* s;
    float* y;
    int n, k, bn, bk;
    float* part;   // [2 · warps][SK_R] partial sums of cut groups
    uint32_t* cnt; // [groups] zero between launches
};

// The warp holding unit u of U split among tw warps (the largest w with w·U/tw ≤ u), and the
// first unit of warp w.
__device__ __forceinline__ int sk_warp_of(int u, int U, int tw) { return (int)(((int64_t)(u + 1) * tw - 1) / U); }
__device__ __forceinline__ int sk_start(int w, int U, int tw) { return (int)((int64_t)w * U / tw); }

// Group g's sums (every lane of the warp calls it, with its lane's partial sums): written where
// warp w holds all of g's units [ubeg, uend), else its part stored and counted, and the group
// combined in warp order by the warp that completes the count.
__device__ __noinline__ void sk_flush(const SkArgs& a, int g, int steps, int U, int tw, int w, int ubeg, int uend, float rs, float v0, float v1,
                                      float v2, float v3) {
    const int lane = threadIdx.x % WARP;
    v0 = warp_sum(v0) * rs, v1 = warp_sum(v1) * rs, v2 = warp_sum(v2) * rs, v3 = warp_sum(v3) * rs;
    const float mine = lane == 0 ? v0 : lane == 1 ? v1 : lane == 2 ? v2 : v3;
    const int gb = g * steps, ge = gb + steps, row = g * SK_R + lane;
    if (gb >= ubeg && ge <= uend) {
        if (lane < SK_R && row < a.n) a.y[row] = mine;
        return;
    }
    const int slot = ubeg >= gb ? 0 : 1; // the group the range starts in, or the one it ends in
    if (lane < SK_R) a.part[(2 * w + slot) * SK_R + lane] = mine;
    __threadfence();
    const int wf = sk_warp_of(gb, U, tw), wl = sk_warp_of(ge - 1, U, tw);
    uint32_t seen = 0;
    if (lane == 0) seen = atomicAdd(&a.cnt[g], 1u);
    seen = __shfl(seen, 0, WARP);
    if ((int)seen != wl - wf) return;
    __threadfence();
    if (lane < SK_R && row < a.n) {
        float t = 0.f;
        for (int q = wf; q <= wl; ++q) t += ((volatile float*)a.part)[(2 * q + (sk_start(q, U, tw) >= gb ? 0 : 1)) * SK_R + lane];
        a.y[row] = t;
    }
    if (lane == 0) a.cnt[g] = 0;
}

template <int D>
__device__ void gemv_sk_fp8(const SkArgs a, float rs) {
    const int lane = threadIdx.x % WARP;
    const int tw = gridDim.x * (blockDim.x / WARP), w = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    const int steps = (a.k + SK_STEP - 1) / SK_STEP, groups = (a.n + SK_R - 1) / SK_R, kblocks = (a.k + a.bk - 1) / a.bk;
    const int U = groups * steps, ubeg = sk_start(w, U, tw), uend = sk_start(w + 1, U, tw);
    // the issue pointer (unit ui: group gi, step si) runs D units ahead of the consumer's (gc, sc)
    int ui = ubeg, gi = ubeg / steps, si = ubeg - gi * steps;
    int gc = gi, sc = si;
    uint4 ring[D][SK_R];
    float rsc[D];
    auto issue = [&](int d) {
        if (ui >= uend) return;
        const int k0 = si * SK_STEP + lane * 16;
        if (k0 < a.k) {
            const uint8_t* p = a.w + (int64_t)gi * SK_R * a.k + k0;
#pragma unroll
            for (int r = 0; r < SK_R; ++r) ring[d][r] = *(const uint4*)(p + (int64_t)(gi * SK_R + r < a.n ? r : 0) * a.k);
            rsc[d] = a.s[(gi * SK_R / a.bn) * kblocks + k0 / a.bk];
        }
        ++ui;
        if (++si == steps) si = 0, ++gi;
    };
#pragma unroll
    for (int d = 0; d < D; ++d) issue(d);
    float acc[SK_R];
#pragma unroll
    for (int r = 0; r < SK_R; ++r) acc[r] = 0.f;
    int cur = gc;
    for (int u0 = ubeg; u0 < uend; u0 += D) {
#pragma unroll
        for (int d = 0; d < D; ++d) {
            if (u0 + d < uend) {
                if (gc != cur) {
                    sk_flush(a, cur, steps, U, tw, w, ubeg, uend, rs, acc[0], acc[1], acc[2], acc[3]);
#pragma unroll
                    for (int r = 0; r < SK_R; ++r) acc[r] = 0.f;
                    cur = gc;
                }
                const int k0 = sc * SK_STEP + lane * 16;
                if (k0 < a.k) {
                    const float4* xp = (const float4*)(a.x + k0);
                    float t[SK_R];
#pragma unroll
                    for (int r = 0; r < SK_R; ++r) t[r] = 0.f;
#pragma unroll
                    for (int q = 0; q < 4; ++q) {
                        const float4 xv = xp[q];
#pragma unroll
                        for (int r = 0; r < SK_R; ++r) {
                            float wv[4];
                            fp8x4_to_f32(u4_word(ring[d][r], q), wv);
                            t[r] += wv[0] * xv.x + wv[1] * xv.y + wv[2] * xv.z + wv[3] * xv.w;
                        }
                    }
#pragma unroll
                    for (int r = 0; r < SK_R; ++r) acc[r] += t[r] * rsc[d];
                }
                if (++sc == steps) sc = 0, ++gc;
                issue(d);
            }
        }
    }
    if (ubeg < uend) sk_flush(a, cur, steps, U, tw, w, ubeg, uend, rs, acc[0], acc[1], acc[2], acc[3]);
}


// ---- The same partition on the matrix units: unit = 16 weight rows × 128 K (2 KB), one
// m16n8k16 f16 MMA per 16 K with the weights as A (FP8 → f16 is exact; cvt.rn.f16x2.e4m3x2 makes
// an A register from two weights, no f32 conversion) and x as B: x · 2^σ split into three f16
// terms hi + mid + lo (33 bits, exact to f32 for the unit's values; σ from the unit's largest
// |x| keeps hi below 2^15), the terms in the MMA's n columns 0-2, so that one MMA takes all three
// products. K inside a unit is permuted alike for A and B: lane (g, t) loads bytes [32t, 32t + 32)
// of rows g and g + 8, and k16 step j takes bytes 4j .. 4j + 3 of them.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define SKM_MMA 1
__device__ __forceinline__ uint32_t skm_f16x2_e4m3(uint32_t two) {
#if SKM_INT_CVT
    // e4m3 s.eeee.mmm → f16 s.0eeee.mmm0000000 is the value · 2^-8 (subnormals too); the host
    // folds 2^8 into the unit's factor
    const uint32_t v = __byte_perm(two, 0, 0x1404); // bytes b0 → bits 8-15, b1 → bits 24-31
    return (v & 0x80008000u) | ((v >> 1) & 0x3f803f80u);
#else
    uint32_t h2;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"((unsigned short)(two & 0xffff)));
    return h2;
#endif
}
__device__ __forceinline__ void skm_mma(float* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t skm_pack(float lo, float hi) {
    uint32_t d;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}
// the f16 halves of a packed pair as f32
__device__ __forceinline__ float skm_h(uint32_t p, int hi) {
    float f;
    if (hi)
        asm("{\n\t.reg .b16 l, h;\n\tmov.b32 {l, h}, %1;\n\tcvt.f32.f16 %0, h;\n\t}" : "=f"(f) : "r"(p));
    else
        asm("{\n\t.reg .b16 l, h;\n\tmov.b32 {l, h}, %1;\n\tcvt.f32.f16 %0, l;\n\t}" : "=f"(f) : "r"(p));
    return f;
}
#endif

#define SKM_ROWS 16
#define SKM_K 128

// Group g's 16 sums: lane (g8, t) holds rows g8 (v0) and g8 + 8 (v1) summed over its columns.
__device__ __noinline__ void skm_flush(const SkArgs& a, int g, int steps, int U, int tw, int w, int ubeg, int uend, float rs, float v0, float v1) {
    const int lane = threadIdx.x % WARP, t = lane % 4, r0 = lane / 4;
    v0 += __shfl_xor(v0, 1, WARP), v1 += __shfl_xor(v1, 1, WARP);
    v0 += __shfl_xor(v0, 2, WARP), v1 += __shfl_xor(v1, 2, WARP);
    v0 *= rs, v1 *= rs;
    const int gb = g * steps, ge = gb + steps, row0 = g * SKM_ROWS + r0, row1 = row0 + 8;
    if (gb >= ubeg && ge <= uend) {
        if (t == 0 && row0 < a.n) a.y[row0] = v0;
        if (t == 0 && row1 < a.n) a.y[row1] = v1;
        return;
    }
    const int slot = ubeg >= gb ? 0 : 1;
    if (t == 0) a.part[(2 * w + slot) * SKM_ROWS + r0] = v0, a.part[(2 * w + slot) * SKM_ROWS + r0 + 8] = v1;
    __threadfence();
    const int wf = sk_warp_of(gb, U, tw), wl = sk_warp_of(ge - 1, U, tw);
    uint32_t seen = 0;
    if (lane == 0) seen = atomicAdd(&a.cnt[g], 1u);
    seen = __shfl(seen, 0, WARP);
    if ((int)seen != wl - wf) return;
    __threadfence();
    if (lane < SKM_ROWS && g * SKM_ROWS + lane < a.n) {
        float s = 0.f;
        for (int q = wf; q <= wl; ++q) s += ((volatile float*)a.part)[(2 * q + (sk_start(q, U, tw) >= gb ? 0 : 1)) * SKM_ROWS + lane];
        a.y[g * SKM_ROWS + lane] = s;
    }
    if (lane == 0) a.cnt[g] = 0;
}

template <int D>
__device__ void gemv_skm_fp8(const SkArgs a, float rs, uint32_t* xsh) {
#ifdef SKM_MMA
    const int lane = threadIdx.x % WARP, g8 = lane / 4, t = lane % 4;
    const int tw = gridDim.x * (blockDim.x / WARP), w = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    const int steps = a.k / SKM_K, groups = (a.n + SKM_ROWS - 1) / SKM_ROWS, kblocks = (a.k + a.bk - 1) / a.bk;
    const int U = groups * steps, ubeg = sk_start(w, U, tw), uend = sk_start(w + 1, U, tw);
    uint32_t* xw = xsh + (threadIdx.x / WARP) * (3 * SKM_K / 2); // this warp's [3 terms][128] f16
    int ui = ubeg, gi = ubeg / steps, si = ubeg - gi * steps;
    int gc = gi, sc = si;
    uint4 ring[D][4]; // rows g8, g8 + 8: bytes [32t, 32t + 32) each
    float4 rx[D];     // x[k0 + 4·lane ..]
    float rsc[D];
    auto issue = [&](int d) {
        if (ui >= uend) return;
        const int k0 = si * SKM_K;
        const int r0 = min(gi * SKM_ROWS + g8, a.n - 1), r1 = min(gi * SKM_ROWS + g8 + 8, a.n - 1);
        const uint8_t* p0 = a.w + (int64_t)r0 * a.k + k0 + 32 * t;
        const uint8_t* p1 = a.w + (int64_t)r1 * a.k + k0 + 32 * t;
        ring[d][0] = *(const uint4*)p0, ring[d][1] = *(const uint4*)(p0 + 16);
        ring[d][2] = *(const uint4*)p1, ring[d][3] = *(const uint4*)(p1 + 16);
        rx[d] = *(const float4*)(a.x + k0 + 4 * lane);
        rsc[d] = a.s[(gi * SKM_ROWS / a.bn) * kblocks + k0 / a.bk];
        ++ui;
        if (++si == steps) si = 0, ++gi;
    };
#pragma unroll
    for (int d = 0; d < D; ++d) issue(d);
    float acc0 = 0.f, acc1 = 0.f;
    int cur = gc;
    for (int u0 = ubeg; u0 < uend; u0 += D) {
#pragma unroll
        for (int d = 0; d < D; ++d) {
            if (u0 + d < uend) {
                if (gc != cur) {
                    skm_flush(a, cur, steps, U, tw, w, ubeg, uend, rs, acc0, acc1);
                    acc0 = acc1 = 0.f;
                    cur = gc;
                }
                // x's three terms for this unit, through the warp's shared buffer
                const float4 xv = rx[d];
                float m = fmaxf(fmaxf(fabsf(xv.x), fabsf(xv.y)), fmaxf(fabsf(xv.z), fabsf(xv.w)));
                m = warp_max(m);
                const int sg = m > 0.f ? 14 - ilogbf(m) : 0; // |x| · 2^sg < 2^15
                const float x0 = ldexpf(xv.x, sg), x1 = ldexpf(xv.y, sg), x2 = ldexpf(xv.z, sg), x3 = ldexpf(xv.w, sg);
                const uint32_t h01 = skm_pack(x0, x1), h23 = skm_pack(x2, x3);
                const float r0 = x0 - skm_h(h01, 0), r1 = x1 - skm_h(h01, 1), r2 = x2 - skm_h(h23, 0), r3 = x3 - skm_h(h23, 1);
                const uint32_t m01 = skm_pack(r0, r1), m23 = skm_pack(r2, r3);
                const uint32_t l01 = skm_pack(r0 - skm_h(m01, 0), r1 - skm_h(m01, 1)), l23 = skm_pack(r2 - skm_h(m23, 0), r3 - skm_h(m23, 1));
                __syncwarp();
                ((uint2*)xw)[lane] = make_uint2(h01, h23);
                ((uint2*)xw)[32 + lane] = make_uint2(m01, m23);
                ((uint2*)xw)[64 + lane] = make_uint2(l01, l23);
                __syncwarp();
                // lane (g8 < 3, t): term g8 of x[32t .. 32t + 32) (k16 step j: x[32t + 4j ..])
                uint4 xb[4];
#pragma unroll
                for (int q = 0; q < 4; ++q) xb[q] = g8 < 3 ? ((const uint4*)xw)[g8 * 16 + 4 * t + q] : make_uint4(0, 0, 0, 0);
                float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const uint32_t w0 = u4_word(ring[d][j / 4], j % 4), w1 = u4_word(ring[d][2 + j / 4], j % 4);
                    const uint32_t b0 = u4_word(xb[j / 2], 2 * (j % 2)), b1 = u4_word(xb[j / 2], 2 * (j % 2) + 1);
                    skm_mma(c, skm_f16x2_e4m3(w0), skm_f16x2_e4m3(w1), skm_f16x2_e4m3(w0 >> 16), skm_f16x2_e4m3(w1 >> 16), b0, b1);
                }
                // columns 0-2 (lanes t = 0: 0, 1; t = 1: 2, 3 = 0); rows g8 (c0, c1) and g8 + 8 (c2, c3)
                const float f = ldexpf(rsc[d], -sg + (SKM_INT_CVT ? 8 : 0));
                acc0 += (c[0] + c[1]) * f;
                acc1 += (c[2] + c[3]) * f;
                if (++sc == steps) sc = 0, ++gc;
                issue(d);
            }
        }
    }
    if (ubeg < uend) skm_flush(a, cur, steps, U, tw, w, ubeg, uend, rs, acc0, acc1);
#endif
}

#define GEMV_SKM(D, MINB)                                                                                                              \
    extern "C" __global__ void __launch_bounds__(256, MINB) gemv_skm_fp8w_d##D##_b##MINB(const float* x, const uint8_t* w, const float* s, \
                                                                                          float* y, int n, int k, int bn, int bk, float* part, \
                                                                                          uint32_t* cnt) {                           \
        ENGINE_GRID_DEP();                                                                                                             \
        __shared__ uint32_t xsh[8 * 3 * SKM_K / 2];                                                                                    \
        gemv_skm_fp8<D>(SkArgs{x, w, s, y, n, k, bn, bk, part, cnt}, 1.f, xsh);                                                       \
    }
GEMV_SKM(2, 2)
GEMV_SKM(3, 2)
GEMV_SKM(4, 2)
GEMV_SKM(2, 3)
GEMV_SKM(3, 3)
GEMV_SKM(2, 4)


// ---- Staged form: each lane streams its own bytes into its warp's ring of shared-memory stages
// by 16-byte cp.async (RING stages of a super-unit: 64 rows × 128 K = 8 KB a warp; RING − 1 in
// flight while one is multiplied, whatever the registers), reads back exactly what it copied (no
// barriers), and multiplies as above; x's three terms once a super-unit for its four 16-row
// fragments.
#define SKC_RG 4
#define SKC_ROWS (16 * SKC_RG)
#define SKC_STAGE (SKC_RG * 4 * 512) // bytes a warp's stage: 16 chunks × 32 lanes × 16 bytes

__device__ __noinline__ void skc_flush(const SkArgs& a, int g, int steps, int U, int tw, int w, int ubeg, int uend, float rs, const float* acc) {
    const int lane = threadIdx.x % WARP, t = lane % 4, r0 = lane / 4;
    float v[2 * SKC_RG];
#pragma unroll
    for (int i = 0; i < 2 * SKC_RG; ++i) {
        v[i] = acc[i];
        v[i] += __shfl_xor(v[i], 1, WARP);
        v[i] += __shfl_xor(v[i], 2, WARP);
        v[i] *= rs;
    }
    const int gb = g * steps, ge = gb + steps, base = g * SKC_ROWS;
    const bool full = gb >= ubeg && ge <= uend;
    const int slot = ubeg >= gb ? 0 : 1;
    float* dst = full ? a.y + base : a.part + (2 * w + slot) * SKC_ROWS;
    if (t == 0)
#pragma unroll
        for (int i = 0; i < 2 * SKC_RG; ++i) {
            const int row = 16 * (i / 2) + r0 + 8 * (i % 2);
            if (!full || base + row < a.n) dst[row] = v[i];
        }
    if (full) return;
    __threadfence();
    const int wf = sk_warp_of(gb, U, tw), wl = sk_warp_of(ge - 1, U, tw);
    uint32_t seen = 0;
    if (lane == 0) seen = atomicAdd(&a.cnt[g], 1u);
    seen = __shfl(seen, 0, WARP);
    if ((int)seen != wl - wf) return;
    __threadfence();
    for (int row = lane; row < SKC_ROWS; row += WARP) {
        if (base + row >= a.n) break;
        float s = 0.f;
        for (int q = wf; q <= wl; ++q) s += ((volatile float*)a.part)[(2 * q + (sk_start(q, U, tw) >= gb ? 0 : 1)) * SKC_ROWS + row];
        a.y[base + row] = s;
    }
    if (lane == 0) a.cnt[g] = 0;
}

template <int RING>
__device__ void gemv_skc_fp8(const SkArgs a, float rs, unsigned char* sh) {
#ifdef SKM_MMA
    const int lane = threadIdx.x % WARP, g8 = lane / 4, t = lane % 4, wib = threadIdx.x / WARP;
    const int tw = gridDim.x * (blockDim.x / WARP), w = blockIdx.x * (blockDim.x / WARP) + wib;
    const int steps = a.k / SKM_K, groups = (a.n + SKC_ROWS - 1) / SKC_ROWS, kblocks = (a.k + a.bk - 1) / a.bk;
    const int U = groups * steps, ubeg = sk_start(w, U, tw), uend = sk_start(w + 1, U, tw);
    unsigned char* ring = sh + (size_t)wib * RING * SKC_STAGE;
    uint32_t* xw = (uint32_t*)(sh + (size_t)(blockDim.x / WARP) * RING * SKC_STAGE) + wib * (3 * SKM_K / 2);
    int ui = ubeg, gi = ubeg / steps, si = ubeg - gi * steps;
    // super-unit ui into stage `st`: chunk (q, h, c) = rows 16q + g8 + 8h, bytes 32t + 16c of the
    // unit's 128, at stage offset ((q·2 + h)·2 + c)·512 + 16·lane
    auto issue = [&](int st) {
        if (ui < uend) {
            const int k0 = si * SKM_K;
#pragma unroll
            for (int q = 0; q < SKC_RG; ++q)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int row = min(gi * SKC_ROWS + 16 * q + g8 + 8 * h, a.n - 1);
                    const uint8_t* src = a.w + (int64_t)row * a.k + k0 + 32 * t;
#pragma unroll
                    for (int c = 0; c < 2; ++c) cp_async16(ring + (size_t)st * SKC_STAGE + ((q * 2 + h) * 2 + c) * 512 + 16 * lane, src + 16 * c);
                }
            ++ui;
            if (++si == steps) si = 0, ++gi;
        }
        cp_async_commit();
    };
#pragma unroll
    for (int st = 0; st < RING; ++st) issue(st);
    float acc[2 * SKC_RG];
#pragma unroll
    for (int i = 0; i < 2 * SKC_RG; ++i) acc[i] = 0.f;
    int gc = ubeg / steps, sc = ubeg - gc * steps, cur = gc;
    float4 xn = ubeg < uend ? *(const float4*)(a.x + sc * SKM_K + 4 * lane) : make_float4(0.f, 0.f, 0.f, 0.f);
    for (int u = ubeg, st = 0; u < uend; ++u, st = st + 1 == RING ? 0 : st + 1) {
        if (gc != cur) {
            skc_flush(a, cur, steps, U, tw, w, ubeg, uend, rs, acc);
#pragma unroll
            for (int i = 0; i < 2 * SKC_RG; ++i) acc[i] = 0.f;
            cur = gc;
        }
        const int kbi = sc * SKM_K / a.bk, rb = gc * SKC_ROWS / a.bn;
        const float4 xv = xn;
        if (++sc == steps) sc = 0, ++gc;
        if (u + 1 < uend) xn = *(const float4*)(a.x + sc * SKM_K + 4 * lane);
        float m = fmaxf(fmaxf(fabsf(xv.x), fabsf(xv.y)), fmaxf(fabsf(xv.z), fabsf(xv.w)));
        m = warp_max(m);
        const int sg = m > 0.f ? 14 - ilogbf(m) : 0; // |x| · 2^sg < 2^15
        const float x0 = ldexpf(xv.x, sg), x1 = ldexpf(xv.y, sg), x2 = ldexpf(xv.z, sg), x3 = ldexpf(xv.w, sg);
        const uint32_t h01 = skm_pack(x0, x1), h23 = skm_pack(x2, x3);
        const float r0 = x0 - skm_h(h01, 0), r1 = x1 - skm_h(h01, 1), r2 = x2 - skm_h(h23, 0), r3 = x3 - skm_h(h23, 1);
        const uint32_t m01 = skm_pack(r0, r1), m23 = skm_pack(r2, r3);
        const uint32_t l01 = skm_pack(r0 - skm_h(m01, 0), r1 - skm_h(m01, 1)), l23 = skm_pack(r2 - skm_h(m23, 0), r3 - skm_h(m23, 1));
        __syncwarp();
        ((uint2*)xw)[lane] = make_uint2(h01, h23);
        ((uint2*)xw)[32 + lane] = make_uint2(m01, m23);
        ((uint2*)xw)[64 + lane] = make_uint2(l01, l23);
        __syncwarp();
        uint4 xb[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) xb[q] = g8 < 3 ? ((const uint4*)xw)[g8 * 16 + 4 * t + q] : make_uint4(0, 0, 0, 0);
        const float f = ldexpf(a.s[rb * kblocks + kbi], -sg);
        cp_async_wait<RING - 1>(); // this lane's copies of stage st are in
        const unsigned char* sb = ring + (size_t)st * SKC_STAGE + 16 * lane;
#pragma unroll
        for (int q = 0; q < SKC_RG; ++q) {
            uint4 wr[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) wr[i] = *(const uint4*)(sb + (q * 4 + i) * 512);
            float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const uint32_t w0 = u4_word(wr[j / 4], j % 4), w1 = u4_word(wr[2 + j / 4], j % 4);
                const uint32_t b0 = u4_word(xb[j / 2], 2 * (j % 2)), b1 = u4_word(xb[j / 2], 2 * (j % 2) + 1);
                skm_mma(c, skm_f16x2_e4m3(w0), skm_f16x2_e4m3(w1), skm_f16x2_e4m3(w0 >> 16), skm_f16x2_e4m3(w1 >> 16), b0, b1);
            }
            acc[2 * q] += (c[0] + c[1]) * f;
            acc[2 * q + 1] += (c[2] + c[3]) * f;
        }
        issue(st);
    }
    cp_async_wait<0>();
    if (ubeg < uend) skc_flush(a, cur, steps, U, tw, w, ubeg, uend, rs, acc);
#endif
}

#define GEMV_SKC(RING)                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(256, 1) gemv_skc_fp8w_r##RING(const float* x, const uint8_t* w, const float* s, float* y, \
                                                                               int n, int k, int bn, int bk, float* part, uint32_t* cnt) { \
        ENGINE_GRID_DEP();                                                                                                             \
        extern __shared__ __align__(16) unsigned char skc_sh[];                                                                        \
        gemv_skc_fp8<RING>(SkArgs{x, w, s, y, n, k, bn, bk, part, cnt}, 1.f, skc_sh);                                                 \
    }
GEMV_SKC(2)
GEMV_SKC(3)

// ---- Matrix-unit form with x prepared once a launch: each block writes x · 2^σ (σ from the
// largest |x| of the whole row, one block reduction) as three f16 planes hi, mid, lo into shared
// memory, while its first D units' weight loads are in flight; a unit (16 rows × 128 K) is then
// four B-fragment loads, 32 conversions and 8 MMAs, with no per-unit x work (forms above: a warp
// maximum, shuffles and the split every unit). Not yet measured (the session's device time ran
// out): benches/gemv_variants.py runs it as `skx dD`.
#define SKX_PLANE_PAD 8 // f16 elements after each plane: the three planes' reads fall on other banks

template <int D>
__device__ void gemv_skx_fp8(const SkArgs a, float rs, uint16_t* xs) {
#ifdef SKM_MMA
    const int lane = threadIdx.x % WARP, g8 = lane / 4, t = lane % 4;
    const int tw = gridDim.x * (blockDim.x / WARP), w = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    const int steps = a.k / SKM_K, groups = (a.n + SKM_ROWS - 1) / SKM_ROWS, kblocks = (a.k + a.bk - 1) / a.bk;
    const int U = groups * steps, ubeg = sk_start(w, U, tw), uend = sk_start(w + 1, U, tw);
    const int plane = a.k + SKX_PLANE_PAD;
    int ui = ubeg, gi = ubeg / steps, si = ubeg - gi * steps;
    int gc = gi, sc = si;
    uint4 ring[D][4];
    float rsc[D];
    const BlockDiv rdiv(a.bn), kdiv(a.bk); // scale blocks without divisions (common.h)
    auto issue = [&](int d) {
        if (ui >= uend) return;
        const int k0 = si * SKM_K;
        const int r0 = min(gi * SKM_ROWS + g8, a.n - 1), r1 = min(gi * SKM_ROWS + g8 + 8, a.n - 1);
        const uint8_t* p0 = a.w + (int64_t)r0 * a.k + k0 + 32 * t;
        const uint8_t* p1 = a.w + (int64_t)r1 * a.k + k0 + 32 * t;
        ring[d][0] = *(const uint4*)p0, ring[d][1] = *(const uint4*)(p0 + 16);
        ring[d][2] = *(const uint4*)p1, ring[d][3] = *(const uint4*)(p1 + 16);
        rsc[d] = a.s[rdiv(gi * SKM_ROWS) * kblocks + kdiv(k0)];
        ++ui;
        if (++si == steps) si = 0, ++gi;
    };
#pragma unroll
    for (int d = 0; d < D; ++d) issue(d);
    // x's planes (every block, the whole row; K a multiple of 4)
    float m = 0.f;
    for (int i = threadIdx.x; i < a.k / 4; i += blockDim.x) {
        const float4 v = ((const float4*)a.x)[i];
        m = fmaxf(m, fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))));
    }
    m = block_max(m);
    const int sg = m > 0.f ? 14 - ilogbf(m) : 0; // |x| · 2^sg < 2^15
    for (int i = threadIdx.x; i < a.k / 4; i += blockDim.x) {
        const float4 v = ((const float4*)a.x)[i];
        const float x0 = ldexpf(v.x, sg), x1 = ldexpf(v.y, sg), x2 = ldexpf(v.z, sg), x3 = ldexpf(v.w, sg);
        const uint32_t h01 = skm_pack(x0, x1), h23 = skm_pack(x2, x3);
        const float r0 = x0 - skm_h(h01, 0), r1 = x1 - skm_h(h01, 1), r2 = x2 - skm_h(h23, 0), r3 = x3 - skm_h(h23, 1);
        const uint32_t m01 = skm_pack(r0, r1), m23 = skm_pack(r2, r3);
        const uint32_t l01 = skm_pack(r0 - skm_h(m01, 0), r1 - skm_h(m01, 1)), l23 = skm_pack(r2 - skm_h(m23, 0), r3 - skm_h(m23, 1));
        *(uint2*)(xs + 4 * i) = make_uint2(h01, h23);
        *(uint2*)(xs + plane + 4 * i) = make_uint2(m01, m23);
        *(uint2*)(xs + 2 * plane + 4 * i) = make_uint2(l01, l23);
    }
    __syncthreads();
    const float unscale = ldexpf(1.f, -sg);
    float acc0 = 0.f, acc1 = 0.f;
    int cur = gc;
    for (int u0 = ubeg; u0 < uend; u0 += D) {
#pragma unroll
        for (int d = 0; d < D; ++d) {
            if (u0 + d < uend) {
                if (gc != cur) {
                    skm_flush(a, cur, steps, U, tw, w, ubeg, uend, rs, acc0, acc1);
                    acc0 = acc1 = 0.f;
                    cur = gc;
                }
                // lane (g8 < 3, t): plane g8 of x[k0 + 32t .. + 32) (k16 step j: x[k0 + 32t + 4j ..])
                uint4 xb[4];
                const uint16_t* xp = xs + g8 * plane + sc * SKM_K + 32 * t;
#pragma unroll
                for (int q = 0; q < 4; ++q) xb[q] = g8 < 3 ? ((const uint4*)xp)[q] : make_uint4(0, 0, 0, 0);
                float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const uint32_t w0 = u4_word(ring[d][j / 4], j % 4), w1 = u4_word(ring[d][2 + j / 4], j % 4);
                    const uint32_t b0 = u4_word(xb[j / 2], 2 * (j % 2)), b1 = u4_word(xb[j / 2], 2 * (j % 2) + 1);
                    skm_mma(c, skm_f16x2_e4m3(w0), skm_f16x2_e4m3(w1), skm_f16x2_e4m3(w0 >> 16), skm_f16x2_e4m3(w1 >> 16), b0, b1);
                }
                const float f = rsc[d] * unscale * (SKM_INT_CVT ? 256.f : 1.f);
                acc0 += (c[0] + c[1]) * f;
                acc1 += (c[2] + c[3]) * f;
                if (++sc == steps) sc = 0, ++gc;
                issue(d);
            }
        }
    }
    if (ubeg < uend) skm_flush(a, cur, steps, U, tw, w, ubeg, uend, rs, acc0, acc1);
#endif
}

#define GEMV_SKX(D)                                                                                                                    \
    extern "C" __global__ void __launch_bounds__(256, 2) gemv_skx_fp8w_d##D(const float* x, const uint8_t* w, const float* s, float* y, \
                                                                            int n, int k, int bn, int bk, float* part, uint32_t* cnt) { \
        ENGINE_GRID_DEP();                                                                                                             \
        extern __shared__ __align__(16) uint16_t skx_sh[];                                                                             \
        gemv_skx_fp8<D>(SkArgs{x, w, s, y, n, k, bn, bk, part, cnt}, 1.f, skx_sh);                                                    \
    }
GEMV_SKX(2)
GEMV_SKX(3)

#define GEMV_SK(D, MINB)                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256, MINB) gemv_sk_fp8w_d##D##_b##MINB(const float* x, const uint8_t* w, const float* s, \
                                                                                         float* y, int n, int k, int bn, int bk, float* part, \
                                                                                         uint32_t* cnt) {                            \
        ENGINE_GRID_DEP();                                                                                                             \
        gemv_sk_fp8<D>(SkArgs{x, w, s, y, n, k, bn, bk, part, cnt}, 1.f);                                                             \
    }
GEMV_SK(2, 2)
GEMV_SK(3, 2)
GEMV_SK(4, 2)
GEMV_SK(2, 3)
GEMV_SK(3, 3)
GEMV_SK(2, 4)
