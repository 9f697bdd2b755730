// MoE experts for decode-sized batches on the tensor cores (NVIDIA sm_80+), FP8 weights, grouped
// by expert (moe_grouped.hip's moe_group builds the tile list: ≤ 16 positions per tile).
// "Swap AB": the expert's weight rows are the MMA's M side (16 rows per fragment) and the tile's
// tokens its N side (8 per fragment), so a tile of one token still streams W at full width, and
// the weight bytes are read once per tile by 16-byte loads with no shared memory and no barriers.
// K in chunks of 64: lane (g, t) loads bytes [16t, 16t + 16) of rows g and g + 8 and the same 16
// columns of x for token g; k16 step j takes bytes 4j .. 4j + 3 of them. That is a fixed
// permutation of K, the same for A and B, so every dot product is unchanged. x enters as bf16
// hi + lo (two products; near-f32), FP8 weights are exact in bf16, and each chunk's partial sums
// are multiplied by their rows' block scale (bk a multiple of 64, so a chunk has one scale per row).
// Needs K % 64 == 0, bk % 64 == 0, I % 16 == 0 and H % 32 == 0 (the host checks). Elsewhere (no
// mma.sync) the kernels compute the same sums with scalar loops, so the module builds for every
// target (the ROCm backend does not select them: it has the grouped GEMV and MFMA tiles).
#include "bf16.h"

#define TC_T 16 // tokens per tile: two n-fragments

// the 16 weights of a lane as bf16 pairs for step j: rows g (w0) and g + 8 (w1)
__device__ __forceinline__ void tc_a_fp8(uint32_t w0, uint32_t w1, uint32_t* a) {
    float f0[4], f1[4];
    fp8x4_to_f32(w0, f0);
    fp8x4_to_f32(w1, f1);
    // FP8 values are exact in bf16: truncation is exact
    a[0] = (__float_as_uint(f0[0]) >> 16) | (__float_as_uint(f0[1]) & 0xffff0000u);
    a[1] = (__float_as_uint(f1[0]) >> 16) | (__float_as_uint(f1[1]) & 0xffff0000u);
    a[2] = (__float_as_uint(f0[2]) >> 16) | (__float_as_uint(f0[3]) & 0xffff0000u);
    a[3] = (__float_as_uint(f1[2]) >> 16) | (__float_as_uint(f1[3]) & 0xffff0000u);
}

__device__ __forceinline__ uint32_t tc_word(const uint4& v, int j) { return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w; }

// The operands of one warp: NP m-fragments of 16 weight rows (row r of fragment p at W[p] + r·K,
// its scales at S[p] for rows rows[p] + r), sharing the B fragments of the tile's tokens.
template <int NP>
struct TcRows {
    const uint8_t* W[NP];
    const float* S[NP];
    int row0[NP];
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// acc[p][n][q] over the whole K: q = 0, 1 row g, tokens n·8 + 2t, + 1; q = 2, 3 row g + 8.
// xrow[n]: token g of n-fragment n (nullptr: no token, zeros).
template <int NP, int NT>
__device__ __forceinline__ void tc_gemm(const TcRows<NP>& o, const float* const* xrow, int K, int bn, int bk, float (*acc)[2][4]) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int kb = (K + bk - 1) / bk;
    uint4 w[NP][2], wn[NP][2];
    float4 xv[NT][4], xn[NT][4];
    auto load = [&](int k0, uint4 (*wd)[2], float4 (*xd)[4]) {
#pragma unroll
        for (int p = 0; p < NP; ++p) {
            wd[p][0] = *(const uint4*)(o.W[p] + (int64_t)g * K + k0 + 16 * t);
            wd[p][1] = *(const uint4*)(o.W[p] + (int64_t)(g + 8) * K + k0 + 16 * t);
        }
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int j = 0; j < 4; ++j) xd[n][j] = xrow[n] ? *(const float4*)(xrow[n] + k0 + 16 * t + 4 * j) : make_float4(0.f, 0.f, 0.f, 0.f);
    };
    load(0, w, xv);
    for (int k0 = 0; k0 < K; k0 += 64) {
        // the next chunk's loads are in flight while this one is multiplied
        if (k0 + 64 < K) load(k0 + 64, wn, xn);
        float part[NP][NT][4];
#pragma unroll
        for (int p = 0; p < NP; ++p)
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int q = 0; q < 4; ++q) part[p][n][q] = 0.f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            uint32_t bh[NT][2], bl[NT][2];
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                bf16_split2(xv[n][j].x, xv[n][j].y, &bh[n][0], &bl[n][0]);
                bf16_split2(xv[n][j].z, xv[n][j].w, &bh[n][1], &bl[n][1]);
            }
#pragma unroll
            for (int p = 0; p < NP; ++p) {
                uint32_t a[4];
                tc_a_fp8(tc_word(w[p][0], j), tc_word(w[p][1], j), a);
#pragma unroll
                for (int n = 0; n < NT; ++n) {
                    mma_bf16_16816(part[p][n], a, bh[n][0], bh[n][1]);
                    mma_bf16_16816(part[p][n], a, bl[n][0], bl[n][1]);
                }
            }
        }
        const int kbi = k0 / bk;
#pragma unroll
        for (int p = 0; p < NP; ++p) {
            float s0 = o.S[p][((o.row0[p] + g) / bn) * kb + kbi], s1 = o.S[p][((o.row0[p] + g + 8) / bn) * kb + kbi];
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                acc[p][n][0] += part[p][n][0] * s0;
                acc[p][n][1] += part[p][n][1] * s0;
                acc[p][n][2] += part[p][n][2] * s1;
                acc[p][n][3] += part[p][n][3] * s1;
            }
        }
#pragma unroll
        for (int p = 0; p < NP; ++p) {
            w[p][0] = wn[p][0];
            w[p][1] = wn[p][1];
        }
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int j = 0; j < 4; ++j) xv[n][j] = xn[n][j];
    }
}
#endif

// The tile's token rows for this lane's B fragments (token g of each n-fragment).
template <int NT>
__device__ __forceinline__ void tc_xrows(const float* x, const int32_t* tok, int start, int c, int K, const float** xrow) {
    const int g = (threadIdx.x % 32) / 4;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        int tt = n * 8 + g;
        xrow[n] = tt < c ? x + (int64_t)(tok ? tok[start + tt] : start + tt) * K : nullptr;
    }
}

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
    tc_gemm<2, NT>(o, xrow, H, bn, bk, acc);
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
    tc_gemm<2, NT>(o, xrow, I, bn, bk, acc);
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
