// MoE experts for decode-sized batches with FP8 activations (`--fp8-activations dynamic`), FP8
// weights, on the matrix units through f8_swap.h: the pairs grouped by expert (moe_grouped.hip's
// moe_group: ≤ 16 positions a tile), each expert's weights read once per tile with 16-byte loads
// and multiplied as e4m3 with no conversion. x is quantised per token and 128 channels (q [T, H],
// scales [ceil(H/128), T]), SiLU·up per position the same way between the two kernels (SGLang's
// fused MoE requantises it too). Needs H % 64 == 0, I % 64 == 0, 128 × 128 weight blocks (the host
// checks). Without the e4m3 MMA (before sm_89, CDNA) the module builds a scalar form of the same
// sums; the host selects these kernels only on sm_89+.
#include "f8_swap.h"

// The tile's expert and positions.
struct F8Tile {
    int e, start, c;
};

__device__ __forceinline__ F8Tile f8_tile(const int32_t* tiles, int tile) { return F8Tile{tiles[3 * tile], tiles[3 * tile + 1], tiles[3 * tile + 2] - tiles[3 * tile + 1]}; }

#ifdef F8_MMA
// h[pos] = silu(gate_e · x_tok) · (up_e · x_tok): a block 64 rows of gate and the same rows of
// up, each warp 16 of them (a gate and an up fragment sharing the tokens).
template <int NT>
__device__ void moe_gate_up_f8_tile(const uint8_t* q, const float* sx, int T, const int32_t* tok, F8Tile tl, const uint8_t* G, const float* GS, const uint8_t* U,
                                    const float* US, float* h, int I, int H) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4, kb = (H + 127) / 128;
    const int i0 = (blockIdx.x * 4 + threadIdx.x / 32) * 16;
    if (i0 >= I) return;
    F8Operands<2, NT> o;
    f8_set_rows(o, 0, G, GS, i0, H, kb);
    f8_set_rows(o, 1, U, US, i0, H, kb);
    o.xs = sx;
    o.xs_stride = T;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        int tt = 8 * n + g;
        o.x[n] = tt < tl.c ? q + (int64_t)tok[tl.start + tt] * H + 16 * t : nullptr;
#pragma unroll
        for (int i = 0; i < 2; ++i) o.xc[n][i] = 8 * n + 2 * t + i < tl.c ? tok[tl.start + 8 * n + 2 * t + i] : -1;
    }
    float acc[2][NT][4] = {};
    f8_gemm<2, NT>(o, 0, H, acc);
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int q4 = 0; q4 < 4; ++q4) {
            int tt = 8 * n + 2 * t + (q4 & 1), row = i0 + g + (q4 >= 2 ? 8 : 0);
            float gv = acc[0][n][q4], uv = acc[1][n][q4];
            if (tt < tl.c) h[(int64_t)(tl.start + tt) * I + row] = silu_mul1(gv, uv);
        }
}

// out[tok] += weight · down_e · h[pos]: a block 128 output rows, each warp 32 (two fragments).
template <int NT>
__device__ void moe_down_f8_tile(const uint8_t* qh, const float* sh, int P, const int32_t* pair_of, const float* weights, F8Tile tl, const uint8_t* D,
                                 const float* DS, float* out, int top_k, int I, int H) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4, kb = (I + 127) / 128;
    const int n0 = (blockIdx.x * 4 + threadIdx.x / 32) * 32;
    if (n0 >= H) return;
    F8Operands<2, NT> o;
#pragma unroll
    for (int f = 0; f < 2; ++f) {
        // a fragment past H (H % 32 == 16) reads fragment 0's rows and drops its sums
        f8_set_rows(o, f, D, DS, n0 + 16 * f < H ? n0 + 16 * f : n0, I, kb);
    }
    o.xs = sh;
    o.xs_stride = P;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        int tt = 8 * n + g;
        o.x[n] = tt < tl.c ? qh + (int64_t)(tl.start + tt) * I + 16 * t : nullptr;
#pragma unroll
        for (int i = 0; i < 2; ++i) o.xc[n][i] = 8 * n + 2 * t + i < tl.c ? tl.start + 8 * n + 2 * t + i : -1;
    }
    float acc[2][NT][4] = {};
    f8_gemm<2, NT>(o, 0, I, acc);
#pragma unroll
    for (int f = 0; f < 2; ++f) {
        if (n0 + 16 * f >= H) continue;
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int q4 = 0; q4 < 4; ++q4) {
                int tt = 8 * n + 2 * t + (q4 & 1), row = n0 + 16 * f + g + (q4 >= 2 ? 8 : 0);
                if (tt < tl.c) {
                    int pr = pair_of[tl.start + tt];
                    atomicAdd(&out[(int64_t)(pr / top_k) * H + row], weights[pr] * acc[f][n][q4]);
                }
            }
    }
}
#endif

// Grid (I / 64, max_tiles), block 128.
extern "C" __global__ void __launch_bounds__(128) moe_gate_up_f8_fp8w(const uint8_t* q, const float* sx, int T, const int32_t* tok, const int32_t* tiles,
                                                                    const int32_t* ntiles, const uint8_t* wg, const float* sg, const uint8_t* wu,
                                                                    const float* su, float* h, int I, int H) { ENGINE_GRID_DEP();
    if ((int)blockIdx.y >= *ntiles) return;
    const F8Tile tl = f8_tile(tiles, blockIdx.y);
    const int64_t wstride = (int64_t)I * H, sstride = (int64_t)((I + 127) / 128) * ((H + 127) / 128);
    const uint8_t *G = wg + tl.e * wstride, *U = wu + tl.e * wstride;
    const float *GS = sg + tl.e * sstride, *US = su + tl.e * sstride;
#ifdef F8_MMA
    if (tl.c <= 8)
        moe_gate_up_f8_tile<1>(q, sx, T, tok, tl, G, GS, U, US, h, I, H);
    else
        moe_gate_up_f8_tile<2>(q, sx, T, tok, tl, G, GS, U, US, h, I, H);
#else
    // scalar: thread r of the block's 64 rows, every token of the tile
    int i = blockIdx.x * 64 + threadIdx.x % 64, kb = (H + 127) / 128;
    if (i >= I || threadIdx.x >= 64) return;
    for (int tt = 0; tt < tl.c; ++tt) {
        int x = tok[tl.start + tt];
        float gv = f8_dot_scalar(G, GS, kb, i, q + (int64_t)x * H, sx, T, x, H, 0, H);
        float uv = f8_dot_scalar(U, US, kb, i, q + (int64_t)x * H, sx, T, x, H, 0, H);
        h[(int64_t)(tl.start + tt) * I + i] = silu_mul1(gv, uv);
    }
#endif
}

// Grid (H / 128, max_tiles), block 128.
extern "C" __global__ void __launch_bounds__(128) moe_down_f8_fp8w(const uint8_t* qh, const float* sh, int P, const int32_t* pair_of, const float* weights,
                                                                 const int32_t* tiles, const int32_t* ntiles, const uint8_t* wd, const float* sd,
                                                                 float* out, int top_k, int I, int H) { ENGINE_GRID_DEP();
    if ((int)blockIdx.y >= *ntiles) return;
    const F8Tile tl = f8_tile(tiles, blockIdx.y);
    const int64_t wstride = (int64_t)I * H, sstride = (int64_t)((H + 127) / 128) * ((I + 127) / 128);
    const uint8_t* D = wd + tl.e * wstride;
    const float* DS = sd + tl.e * sstride;
#ifdef F8_MMA
    if (tl.c <= 8)
        moe_down_f8_tile<1>(qh, sh, P, pair_of, weights, tl, D, DS, out, top_k, I, H);
    else
        moe_down_f8_tile<2>(qh, sh, P, pair_of, weights, tl, D, DS, out, top_k, I, H);
#else
    // scalar: each of the block's 128 threads one of its 128 output rows
    int n = blockIdx.x * 128 + threadIdx.x, kb = (I + 127) / 128;
    if (n >= H) return;
    for (int tt = 0; tt < tl.c; ++tt) {
        int pos = tl.start + tt, pr = pair_of[pos];
        float a = f8_dot_scalar(D, DS, kb, n, qh + (int64_t)pos * I, sh, P, pos, I, 0, I);
        atomicAdd(&out[(int64_t)(pr / top_k) * H + n], weights[pr] * a);
    }
#endif
}
