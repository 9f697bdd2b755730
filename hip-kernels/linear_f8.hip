// y = x · Wᵀ for decode-sized x (≤ 8 rows) with FP8 activations and FP8 weights on the matrix
// units (`--fp8-activations dynamic`, SGLang's and DeepSeek's numerics for block-FP8 checkpoints):
// x arrives quantised per token and 128 channels (act_quant.hip: q [R, K] e4m3fn, scales sx
// [K/128, R]), W is the checkpoint's e4m3fn with 128 × 128 block scales S. The roles are swapped
// as in tc_swap.h: W's rows are the MMA's M side (16 rows a fragment), the tokens its N side (one
// fragment of 8), so W streams at full width with 16-byte loads, and the bytes go into
// mma.m16n8k32.e4m3 as loaded: no conversion, one MMA per 512 weights. The f32-activation GEMV
// spent ~24 conversion and 16 FMA instructions a lane per 16 weights and was issue-bound (ncu:
// 66% of issue slots at 2.7 TB/s).
//
// K in chunks of 64 (each within one 128-column scale block), permuted inside a chunk the same way
// for A and B: lane (g, t) = (lane / 4, lane % 4) loads bytes [16t, 16t + 16) of rows g and g + 8
// and of token g; k32 step j takes words 2j, 2j + 1 of them (mma's a0/a2 for row g, a1/a3 for row
// g + 8, b0/b1 for token g). The chunk's product times its rows' weight scale and its tokens'
// scales is added to the accumulators: lane (g, t) holds rows g, g + 8 × tokens 2t, 2t + 1.
//
// Grid (N / 128, 1, splits), block 128 (4 warps × 2 fragments × 16 rows); split-K ranges of
// `ksplit` columns (multiples of 64) write partials to y + z·M·N for linear_mma.hip's fixed-order
// linear_split_sum. Needs K % 64 == 0, N % 16 == 0, bn == bk == 128 (the host checks). Only
// NVIDIA sm_89+ has the e4m3 MMA; elsewhere the module builds a scalar form of the same sums
// (the host selects this kernel only on sm_89+).
#include "common.h"

#define F8_FRAGS 2
#define F8_BLOCK_ROWS (4 * F8_FRAGS * 16)

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
__device__ __forceinline__ void mma_e4m3_16832(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t f8_word(const uint4& v, int j) { return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w; }
#endif

extern "C" __global__ void __launch_bounds__(128) linear_f8_fp8w(const uint8_t* __restrict__ q, const float* __restrict__ sx, int R, const uint8_t* __restrict__ W,
                                                                const float* __restrict__ S, float* y, int M, int N, int K, int ksplit) {
    const int k_lo = blockIdx.z * ksplit, k_hi = min(K, k_lo + ksplit), kb = (K + 127) / 128;
    float* out = y + (int64_t)blockIdx.z * M * N;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int n0 = (blockIdx.y * 4 + threadIdx.x / 32) * 16 * F8_FRAGS;
    if (n0 >= N) return;
    // fragments past N (N % 32 == 16) read fragment 0's rows and drop their sums
    const uint8_t* wr[F8_FRAGS][2];
    const float* sr[F8_FRAGS];
#pragma unroll
    for (int f = 0; f < F8_FRAGS; ++f) {
        int r0 = n0 + 16 * f < N ? n0 + 16 * f : n0;
        wr[f][0] = W + (int64_t)(r0 + g) * K + 16 * t;
        wr[f][1] = W + (int64_t)(r0 + g + 8) * K + 16 * t;
        sr[f] = S + (int64_t)(r0 / 128) * kb;
    }
    const uint8_t* xr = g < M ? q + (int64_t)g * K + 16 * t : nullptr;
    const int t0 = 2 * t, t1 = 2 * t + 1;
    float acc[F8_FRAGS][4] = {};
    uint4 w[F8_FRAGS][2], wn[F8_FRAGS][2], xv, xn;
    auto load = [&](int k0, uint4 (*wd)[2], uint4& xd) {
#pragma unroll
        for (int f = 0; f < F8_FRAGS; ++f) {
            wd[f][0] = *(const uint4*)(wr[f][0] + k0);
            wd[f][1] = *(const uint4*)(wr[f][1] + k0);
        }
        xd = xr ? *(const uint4*)(xr + k0) : make_uint4(0, 0, 0, 0);
    };
    if (k_lo < k_hi) load(k_lo, w, xv);
    for (int k0 = k_lo; k0 < k_hi; k0 += 64) {
        // the next chunk's loads in flight while this one is multiplied
        if (k0 + 64 < k_hi) load(k0 + 64, wn, xn);
        const int blk = k0 / 128;
        const float s0 = t0 < M ? sx[blk * R + t0] : 0.f, s1 = t1 < M ? sx[blk * R + t1] : 0.f;
#pragma unroll
        for (int f = 0; f < F8_FRAGS; ++f) {
            float part[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                uint32_t a[4] = {f8_word(w[f][0], 2 * j), f8_word(w[f][1], 2 * j), f8_word(w[f][0], 2 * j + 1), f8_word(w[f][1], 2 * j + 1)};
                mma_e4m3_16832(part, a, f8_word(xv, 2 * j), f8_word(xv, 2 * j + 1));
            }
            const float sw = sr[f][blk];
            acc[f][0] += part[0] * (sw * s0);
            acc[f][1] += part[1] * (sw * s1);
            acc[f][2] += part[2] * (sw * s0);
            acc[f][3] += part[3] * (sw * s1);
        }
#pragma unroll
        for (int f = 0; f < F8_FRAGS; ++f) {
            w[f][0] = wn[f][0];
            w[f][1] = wn[f][1];
        }
        xv = xn;
    }
#pragma unroll
    for (int f = 0; f < F8_FRAGS; ++f) {
        if (n0 + 16 * f >= N) continue;
        const int r = n0 + 16 * f + g;
        if (t0 < M) {
            out[(int64_t)t0 * N + r] = acc[f][0];
            out[(int64_t)t0 * N + r + 8] = acc[f][2];
        }
        if (t1 < M) {
            out[(int64_t)t1 * N + r] = acc[f][1];
            out[(int64_t)t1 * N + r + 8] = acc[f][3];
        }
    }
#else
    // scalar: each thread one of the block's output rows, every token (same sums, in k order)
    int n = blockIdx.y * F8_BLOCK_ROWS + threadIdx.x;
    if (n >= N) return;
    for (int m = 0; m < M; ++m) {
        float a = 0.f;
        for (int k0 = k_lo; k0 < k_hi; k0 += 64) {
            float part = 0.f;
            for (int k = k0; k < k0 + 64; ++k) part += fp8e4m3_to_f32(W[(int64_t)n * K + k]) * fp8e4m3_to_f32(q[(int64_t)m * K + k]);
            a += part * (S[(n / 128) * kb + k0 / 128] * sx[(k0 / 128) * R + m]);
        }
        out[(int64_t)m * N + n] = a;
    }
#endif
}
