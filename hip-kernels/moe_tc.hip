// MoE experts for decode-sized batches on the matrix units (NVIDIA sm_80+, CDNA gfx942/gfx950),
// FP8 weights, grouped by expert (moe_grouped.hip's moe_group builds the tile list: ≤ 16
// positions per tile), through the swap-AB product of tc_swap.h: each expert's weights read once
// per tile. Needs K % 64 == 0 and bk % 64 == 0 (the host checks). Other targets compute the same
// sums with scalar loops, so the module builds everywhere (the host selects it only where
// tc_swap.h has a matrix-unit form).
#include "tc_swap.h"

#ifdef TC_MMA
// h[pos] = silu(gate_e · x_tok) · (up_e · x_tok): a block 64 rows of gate and the same rows of up,
// each warp 64 / TC_WAVES of them (gate and up m-fragments sharing the tokens). Grid (I / 64,
// max_tiles), block 128.
template <int NT>
__device__ void moe_gate_up_tc_tile(const float* x, const int32_t* tok, int start, int c, const uint8_t* G, const float* GS, const uint8_t* U, const float* US,
                                    float* h, int I, int H, int bn, int bk) {
    constexpr int MF = 64 / TC_WAVES / 16; // m-fragments per projection per warp
    const int i0 = (blockIdx.x * TC_WAVES + threadIdx.x / WARP) * 16 * MF;
    if (i0 >= I) return;
    TcRows<2 * MF> o;
#pragma unroll
    for (int f = 0; f < MF; ++f) {
        o.W[f] = G + (int64_t)(i0 + 16 * f) * H;
        o.W[MF + f] = U + (int64_t)(i0 + 16 * f) * H;
        o.S[f] = GS;
        o.S[MF + f] = US;
        o.row0[f] = o.row0[MF + f] = i0 + 16 * f;
    }
    const float* xrow[TC_NT_MAX];
    tc_xrows<NT>(x, tok, start, c, H, xrow);
    float acc[2 * MF][TC_NT_MAX][4] = {};
    tc_gemm<2 * MF, NT>(o, xrow, H, 0, H, bn, bk, acc);
#pragma unroll
    for (int f = 0; f < MF; ++f)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                int tt = tc_tok(n, q), row = i0 + 16 * f + tc_row(q);
                float gv = acc[f][n][q], uv = acc[MF + f][n][q];
                if (tt < c && row < I) h[(int64_t)(start + tt) * I + row] = silu_mul1(gv, uv);
            }
}

// out[tok] += weight · down_e · h[pos]: a block 128 output rows, each warp 128 / TC_WAVES of them.
// Grid (H / 128, max_tiles), block 128.
template <int NT>
__device__ void moe_down_tc_tile(const float* hbuf, const int32_t* pair_of, const float* weights, int start, int c, const uint8_t* D, const float* DS,
                                 float* out, int top_k, int I, int H, int bn, int bk) {
    constexpr int MF = 128 / TC_WAVES / 16;
    const int n0 = (blockIdx.x * TC_WAVES + threadIdx.x / WARP) * 16 * MF;
    if (n0 >= H) return;
    TcRows<MF> o;
#pragma unroll
    for (int f = 0; f < MF; ++f) {
        o.W[f] = D + (int64_t)(n0 + 16 * f) * I;
        o.S[f] = DS;
        o.row0[f] = n0 + 16 * f;
    }
    const float* xrow[TC_NT_MAX];
    tc_xrows<NT>(hbuf, nullptr, start, c, I, xrow);
    float acc[MF][TC_NT_MAX][4] = {};
    tc_gemm<MF, NT>(o, xrow, I, 0, I, bn, bk, acc);
#pragma unroll
    for (int f = 0; f < MF; ++f)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                int tt = tc_tok(n, q), row = n0 + 16 * f + tc_row(q);
                if (tt < c && row < H) {
                    int pr = pair_of[start + tt];
                    atomicAdd(&out[(int64_t)(pr / top_k) * H + row], weights[pr] * acc[f][n][q]);
                }
            }
}
#endif

extern "C" __global__ void __launch_bounds__(128) moe_gate_up_tc_fp8w(const float* x, const int32_t* tok, const int32_t* tiles, const int32_t* ntiles,
                                                                    const uint8_t* wg, const float* sg, const uint8_t* wu, const float* su, float* h,
                                                                    int I, int H, int bn, int bk) { ENGINE_GRID_DEP();
    int tile = blockIdx.y;
    if (tile >= *ntiles) return;
    int e = tiles[3 * tile], start = tiles[3 * tile + 1], c = tiles[3 * tile + 2] - start;
    int64_t wstride = (int64_t)I * H, sstride = (int64_t)((I + bn - 1) / bn) * ((H + bk - 1) / bk);
    const uint8_t *G = wg + e * wstride, *U = wu + e * wstride;
    const float *GS = sg + e * sstride, *US = su + e * sstride;
#ifdef TC_MMA
    // the fewest n-fragments for the tile's tokens (on NVIDIA one when ≤ 8: the usual decode case)
    TC_DISPATCH(moe_gate_up_tc_tile, x, tok, start, c, G, GS, U, US, h, I, H, bn, bk);
#else
    // scalar: thread r of the block's 64 rows, every token of the tile
    int i = blockIdx.x * 64 + threadIdx.x % 64;
    if (i >= I || threadIdx.x >= 64) return;
    int kb = (H + bk - 1) / bk;
    for (int tt = 0; tt < c; ++tt) {
        const float* xt = x + (int64_t)tok[start + tt] * H;
        float gs = 0.f, us = 0.f;
        for (int k = 0; k < H; ++k) {
            float s = xt[k];
            gs += fp8e4m3_to_f32(G[(int64_t)i * H + k]) * GS[(i / bn) * kb + k / bk] * s;
            us += fp8e4m3_to_f32(U[(int64_t)i * H + k]) * US[(i / bn) * kb + k / bk] * s;
        }
        h[(int64_t)(start + tt) * I + i] = silu_mul1(gs, us);
    }
#endif
}

extern "C" __global__ void __launch_bounds__(128) moe_down_tc_fp8w(const float* hbuf, const int32_t* pair_of, const float* weights, const int32_t* tiles,
                                                                 const int32_t* ntiles, const uint8_t* wd, const float* sd, float* out, int top_k, int I,
                                                                 int H, int bn, int bk) { ENGINE_GRID_DEP();
    int tile = blockIdx.y;
    if (tile >= *ntiles) return;
    int e = tiles[3 * tile], start = tiles[3 * tile + 1], c = tiles[3 * tile + 2] - start;
    int64_t wstride = (int64_t)I * H, sstride = (int64_t)((H + bn - 1) / bn) * ((I + bk - 1) / bk);
    const uint8_t* D = wd + e * wstride;
    const float* DS = sd + e * sstride;
#ifdef TC_MMA
    TC_DISPATCH(moe_down_tc_tile, hbuf, pair_of, weights, start, c, D, DS, out, top_k, I, H, bn, bk);
#else
    // scalar: each of the block's 128 threads one of its 128 output rows
    int n = blockIdx.x * 128 + threadIdx.x;
    if (n >= H) return;
    int kb = (I + bk - 1) / bk;
    for (int tt = 0; tt < c; ++tt) {
        const float* ht = hbuf + (int64_t)(start + tt) * I;
        float a = 0.f;
        for (int k = 0; k < I; ++k) a += fp8e4m3_to_f32(D[(int64_t)n * I + k]) * DS[(n / bn) * kb + k / bk] * ht[k];
        int pr = pair_of[start + tt];
        atomicAdd(&out[(int64_t)(pr / top_k) * H + n], weights[pr] * a);
    }
#endif
}
