// Decode-sized products with FP8 activations and FP8 weights on the matrix units, roles swapped
// ("swap AB", as tc_swap.h): W's rows are the MMA's M side (16 rows a fragment), the tokens its N
// side (fragments of 8), so W streams at full width with 16-byte loads, and the e4m3 bytes of both
// go into mma.m16n8k32 as loaded — no conversion, one MMA per 512 weights and 8 tokens. Used with
// `--fp8-activations dynamic` (x quantised per token and 128 channels by act_quant.hip, SGLang's
// and DeepSeek's numerics) by the dense linear layers (linear_f8.hip) and the grouped MoE experts
// (moe_f8.hip). NVIDIA sm_89+ only (F8_MMA); the kernels keep a scalar form elsewhere.
//
// K in chunks of 64 (each inside one 128-column scale block), permuted inside a chunk the same way
// for A and B: lane (g, t) = (lane / 4, lane % 4) loads bytes [16t, 16t + 16) of rows g and g + 8
// and of token g of each n-fragment; k32 step j takes words 2j, 2j + 1 of them (a0/a2 for row g,
// a1/a3 for row g + 8, b0/b1 for the token). Each chunk's product is scaled by its rows' weight
// scale and its tokens' activation scales and added in f32 (the promotion every 64 columns that
// DeepSeek's FP8 GEMM does every 128). The lane's accumulators: rows g, g + 8 × tokens 2t, 2t + 1.
#pragma once
#include "common.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
#define F8_MMA 1

__device__ __forceinline__ void mma_e4m3_16832(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The operands of one warp: NF fragments of 16 weight rows and NT fragments of 8 tokens.
template <int NF, int NT>
struct F8Operands {
    // rows g and g + 8 of fragment f, already offset by the lane's 16t bytes
    const uint8_t* w[NF][2];
    // fragment f's weight scales along K (one per 128 columns; its 16 rows share one row block)
    const float* ws[NF];
    // the lane's token g of n-fragment n, offset by 16t bytes (nullptr: no token, zeros)
    const uint8_t* x[NT];
    // activation scales: token column c's scale for 128-column block b is xs[b · xs_stride + c];
    // the lane's tokens 2t and 2t + 1 of n-fragment n are columns xc[n][0], xc[n][1] (-1: none)
    const float* xs;
    int xs_stride;
    int xc[NT][2];
};

// Fragment f of `o`: the 16 rows of W [.., K] from row r0 (the lane's rows g and g + 8 at its 16t
// bytes) and their weight scales (S with kb blocks a row; the 16 rows share one 128-row block).
template <int NF, int NT>
__device__ __forceinline__ void f8_set_rows(F8Operands<NF, NT>& o, int f, const uint8_t* W, const float* S, int r0, int K, int kb) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    o.w[f][0] = W + (int64_t)(r0 + g) * K + 16 * t;
    o.w[f][1] = W + (int64_t)(r0 + g + 8) * K + 16 * t;
    o.ws[f] = S + (int64_t)(r0 / 128) * kb;
}

// acc[f][n][q] += the scaled products over columns [k_lo, k_hi) (multiples of 64): q = 0, 1 row g
// × tokens 2t, 2t + 1 of n-fragment n; q = 2, 3 row g + 8.
template <int NF, int NT>
__device__ __forceinline__ void f8_gemm(const F8Operands<NF, NT>& o, int k_lo, int k_hi, float (&acc)[NF][NT][4]) {
    uint4 w[NF][2], wn[NF][2], xv[NT], xn[NT];
    auto load = [&](int k0, uint4 (&wd)[NF][2], uint4 (&xd)[NT]) {
#pragma unroll
        for (int f = 0; f < NF; ++f) {
            wd[f][0] = *(const uint4*)(o.w[f][0] + k0);
            wd[f][1] = *(const uint4*)(o.w[f][1] + k0);
        }
#pragma unroll
        for (int n = 0; n < NT; ++n) xd[n] = o.x[n] ? *(const uint4*)(o.x[n] + k0) : make_uint4(0, 0, 0, 0);
    };
    if (k_lo >= k_hi) return;
    load(k_lo, w, xv);
    for (int k0 = k_lo; k0 < k_hi; k0 += 64) {
        // the next chunk's loads in flight while this one is multiplied
        if (k0 + 64 < k_hi) load(k0 + 64, wn, xn);
        const int blk = k0 / 128;
        float s[NT][2];
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int i = 0; i < 2; ++i) s[n][i] = o.xc[n][i] >= 0 ? o.xs[(int64_t)blk * o.xs_stride + o.xc[n][i]] : 0.f;
#pragma unroll
        for (int f = 0; f < NF; ++f) {
            const float sw = o.ws[f][blk];
            float part[NT][4];
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int q = 0; q < 4; ++q) part[n][q] = 0.f;
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                uint32_t a[4] = {u4_word(w[f][0], 2 * j), u4_word(w[f][1], 2 * j), u4_word(w[f][0], 2 * j + 1), u4_word(w[f][1], 2 * j + 1)};
#pragma unroll
                for (int n = 0; n < NT; ++n) mma_e4m3_16832(part[n], a, u4_word(xv[n], 2 * j), u4_word(xv[n], 2 * j + 1));
            }
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                acc[f][n][0] += part[n][0] * (sw * s[n][0]);
                acc[f][n][1] += part[n][1] * (sw * s[n][1]);
                acc[f][n][2] += part[n][2] * (sw * s[n][0]);
                acc[f][n][3] += part[n][3] * (sw * s[n][1]);
            }
        }
#pragma unroll
        for (int f = 0; f < NF; ++f) {
            w[f][0] = wn[f][0];
            w[f][1] = wn[f][1];
        }
#pragma unroll
        for (int n = 0; n < NT; ++n) xv[n] = xn[n];
    }
}
#endif

// Σ over [k_lo, k_hi) of the dequantised products of weight row n (block scales S, kb blocks a
// row) and token column c of q (scales xs[b · xs_stride + c]), in 64-column chunks scaled as the
// MMA form does: the scalar form of the kernels where there is no e4m3 MMA.
__device__ __forceinline__ float f8_dot_scalar(const uint8_t* W, const float* S, int kb, int64_t n, const uint8_t* qrow, const float* xs, int xs_stride, int c, int K,
                                               int k_lo, int k_hi) {
    float a = 0.f;
    for (int k0 = k_lo; k0 < k_hi; k0 += 64) {
        float part = 0.f;
        for (int k = k0; k < min(k0 + 64, K); ++k) part += fp8e4m3_to_f32(W[n * K + k]) * fp8e4m3_to_f32(qrow[k]);
        a += part * (S[(n / 128) * kb + k0 / 128] * xs[(int64_t)(k0 / 128) * xs_stride + c]);
    }
    return a;
}
