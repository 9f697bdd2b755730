// MoE experts for decode-sized batches on the tensor cores (NVIDIA sm_80+), FP8 weights, grouped
// by expert (moe_grouped.hip's moe_group builds the tile list: ≤ 16 positions per tile), through
// the swap-AB product of tc_swap.h: each expert's weights read once per tile.
// Needs K % 64 == 0, bk % 64 == 0, I % 16 == 0 and H % 32 == 0 (the host checks). Elsewhere (no
// mma.sync) the kernels compute the same sums with scalar loops, so the module builds for every
// target (the ROCm backend does not select them: it has the grouped GEMV and MFMA tiles).
#include "tc_swap.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// h[pos] = silu(gate_e · x_tok) · (up_e · x_tok): each warp 16 rows of gate and the same 16 rows of
// up (two m-fragments sharing the tokens). Grid (I / 64, max_tiles), block 128 (4 warps).
template <int NT>
__device__ void moe_gate_up_tc_tile(const float* x, const int32_t* tok, int start, int c, const uint8_t* G, const float* GS, const uint8_t* U, const float* US,
                                    float* h, int I, int H, int bn, int bk) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4, w = threadIdx.x / 32;
    const int i0 = (blockIdx.x * 4 + w) * 16;
    if (i0 >= I) return;
    TcRows<2> o = {{G + (int64_t)i0 * H, U + (int64_t)i0 * H}, {GS, US}, {i0, i0}};
    const float* xrow[2];
    tc_xrows<NT>(x, tok, start, c, H, xrow);
    float acc[2][2][4] = {};
    tc_gemm<2, NT>(o, xrow, H, 0, H, bn, bk, acc);
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            int tt = n * 8 + 2 * t + (q & 1), row = i0 + g + (q >= 2 ? 8 : 0);
            float gv = acc[0][n][q], uv = acc[1][n][q];
            if (tt < c) h[(int64_t)(start + tt) * I + row] = gv / (1.0f + expf(-gv)) * uv;
        }
}

// out[tok] += weight · down_e · h[pos]: each warp 32 rows (two m-fragments). Grid (H / 128,
// max_tiles), block 128.
template <int NT>
__device__ void moe_down_tc_tile(const float* hbuf, const int32_t* pair_of, const float* weights, int start, int c, const uint8_t* D, const float* DS,
                                 float* out, int top_k, int I, int H, int bn, int bk) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4, w = threadIdx.x / 32;
    const int n0 = (blockIdx.x * 4 + w) * 32;
    if (n0 >= H) return;
    TcRows<2> o = {{D + (int64_t)n0 * I, D + (int64_t)(n0 + 16) * I}, {DS, DS}, {n0, n0 + 16}};
    const float* xrow[2];
    tc_xrows<NT>(hbuf, nullptr, start, c, I, xrow);
    float acc[2][2][4] = {};
    tc_gemm<2, NT>(o, xrow, I, 0, I, bn, bk, acc);
#pragma unroll
    for (int p = 0; p < 2; ++p)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                int tt = n * 8 + 2 * t + (q & 1), row = n0 + 16 * p + g + (q >= 2 ? 8 : 0);
                if (tt < c) {
                    int pr = pair_of[start + tt];
                    atomicAdd(&out[(int64_t)(pr / top_k) * H + row], weights[pr] * acc[p][n][q]);
                }
            }
}
#endif

extern "C" __global__ void __launch_bounds__(128) moe_gate_up_tc_fp8w(const float* x, const int32_t* tok, const int32_t* tiles, const int32_t* ntiles,
                                                                    const uint8_t* wg, const float* sg, const uint8_t* wu, const float* su, float* h,
                                                                    int I, int H, int bn, int bk) {
    int tile = blockIdx.y;
    if (tile >= *ntiles) return;
    int e = tiles[3 * tile], start = tiles[3 * tile + 1], c = tiles[3 * tile + 2] - start;
    int64_t wstride = (int64_t)I * H, sstride = (int64_t)((I + bn - 1) / bn) * ((H + bk - 1) / bk);
    const uint8_t *G = wg + e * wstride, *U = wu + e * wstride;
    const float *GS = sg + e * sstride, *US = su + e * sstride;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    // one n-fragment when the tile has at most 8 tokens (the usual decode case)
    if (c <= 8) moe_gate_up_tc_tile<1>(x, tok, start, c, G, GS, U, US, h, I, H, bn, bk);
    else moe_gate_up_tc_tile<2>(x, tok, start, c, G, GS, U, US, h, I, H, bn, bk);
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
        h[(int64_t)(start + tt) * I + i] = gs / (1.0f + expf(-gs)) * us;
    }
#endif
}

extern "C" __global__ void __launch_bounds__(128) moe_down_tc_fp8w(const float* hbuf, const int32_t* pair_of, const float* weights, const int32_t* tiles,
                                                                 const int32_t* ntiles, const uint8_t* wd, const float* sd, float* out, int top_k, int I,
                                                                 int H, int bn, int bk) {
    int tile = blockIdx.y;
    if (tile >= *ntiles) return;
    int e = tiles[3 * tile], start = tiles[3 * tile + 1], c = tiles[3 * tile + 2] - start;
    int64_t wstride = (int64_t)I * H, sstride = (int64_t)((H + bn - 1) / bn) * ((I + bk - 1) / bk);
    const uint8_t* D = wd + e * wstride;
    const float* DS = sd + e * sstride;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if (c <= 8) moe_down_tc_tile<1>(hbuf, pair_of, weights, start, c, D, DS, out, top_k, I, H, bn, bk);
    else moe_down_tc_tile<2>(hbuf, pair_of, weights, start, c, D, DS, out, top_k, I, H, bn, bk);
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
