// MoE experts grouped by expert (the decode-sized grouped GEMV is at the end of the file), and on
// the matrix units for batches with many routed (token, expert) pairs:
//   1. moe_group: the pairs routed to this rank's experts [e0, e0 + ne), grouped by expert
//      (positions), with a tile list (expert, first, end) of at most tile_m positions each;
//   2. moe_gate_up_mma: gu[pos] = [gate_e · x_tok | up_e · x_tok], one 128×128 tile per block
//      (mma_tile.h), tokens gathered through tok[pos];
//   3. moe_silu_mul_halves: h[pos] = silu(gate) · up;
//   4. moe_down_mma: out[tok] += weight · down_e · h[pos].
// Each expert's weights are read once per tile of up to 128 pairs instead of once per pair.
// Grids are sized for the most tiles the pairs can make; blocks beyond *ntiles return.
#include "mma_tile.h"
#include "vec8.h"

#define MOE_MAX_EXPERTS 1024

extern "C" __global__ void moe_group(const int32_t* ids, int P, int top_k, int e0, int ne, int tile_m, int32_t* tok, int32_t* pair_of,
                                     int32_t* tiles, int32_t* ntiles) {
    __shared__ int cnt[MOE_MAX_EXPERTS];
    __shared__ int cur[MOE_MAX_EXPERTS];
    for (int e = threadIdx.x; e < ne; e += blockDim.x) cnt[e] = 0;
    __syncthreads();
    for (int p = threadIdx.x; p < P; p += blockDim.x) {
        int e = ids[p] - e0;
        if (e >= 0 && e < ne) atomicAdd(&cnt[e], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int off = 0, nt = 0;
        for (int e = 0; e < ne; ++e) {
            cur[e] = off;
            for (int s = 0; s < cnt[e]; s += tile_m) {
                tiles[3 * nt] = e;
                tiles[3 * nt + 1] = off + s;
                tiles[3 * nt + 2] = off + min(s + tile_m, cnt[e]);
                ++nt;
            }
            off += cnt[e];
        }
        *ntiles = nt;
    }
    __syncthreads();
    for (int p = threadIdx.x; p < P; p += blockDim.x) {
        int e = ids[p] - e0;
        if (e >= 0 && e < ne) {
            int pos = atomicAdd(&cur[e], 1);
            pair_of[pos] = p;
            tok[pos] = p / top_k;
        }
    }
}

template <int WDT>
__device__ void moe_gate_up_mma_impl(const float* x, const int32_t* tok, const int32_t* tiles, const int32_t* ntiles, const uint8_t* wg,
                                     const float* sg, const uint8_t* wu, const float* su, float* gu, int I, int H, int bn, int bk, int vec) {
    int tile = blockIdx.y;
    if (tile >= *ntiles) return;
    __shared__ MmaShared sh;
    int e = tiles[3 * tile], start = tiles[3 * tile + 1], end = tiles[3 * tile + 2];
    int tpp = (I + MT_N - 1) / MT_N, proj = (int)blockIdx.x >= tpp;
    const int es = WDT == WDT_F32 ? 4 : WDT == WDT_BF16 ? 2 : 1;
    int64_t wstride = (int64_t)I * H * es, sstride = (int64_t)((I + bn - 1) / bn) * ((H + bk - 1) / bk);
    const uint8_t* W = (proj ? wu : wg) + e * wstride;
    const float* S = (proj ? su : sg) + (WDT == WDT_FP8 ? e * sstride : 0);
    MtOperands o = {x, tok, start, end, W, S, I, ((int)blockIdx.x - proj * tpp) * MT_N, H, bn, bk};
    MmaAcc acc;
    mt_zero(acc);
    mt_run<WDT>(sh, acc, o, 0, H, vec != 0);
    mt_each(acc, [&](int r, int c, float v) {
        int pos = start + r, n = o.n0 + c;
        if (pos < end && n < I) gu[(int64_t)pos * 2 * I + proj * I + n] = v;
    });
}

extern "C" __global__ void moe_silu_mul_halves(const float* gu, float* h, int64_t n, int I) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int64_t pos = i / I, c = i % I;
    float g = gu[pos * 2 * I + c];
    h[i] = g / (1.0f + expf(-g)) * gu[pos * 2 * I + I + c];
}

template <int WDT>
__device__ void moe_down_mma_impl(const float* h, const int32_t* pair_of, const float* weights, const int32_t* tiles, const int32_t* ntiles,
                                  const uint8_t* wd, const float* sd, float* out, int top_k, int I, int H, int bn, int bk, int vec) {
    int tile = blockIdx.y;
    if (tile >= *ntiles) return;
    __shared__ MmaShared sh;
    int e = tiles[3 * tile], start = tiles[3 * tile + 1], end = tiles[3 * tile + 2];
    const int es = WDT == WDT_F32 ? 4 : WDT == WDT_BF16 ? 2 : 1;
    int64_t wstride = (int64_t)I * H * es, sstride = (int64_t)((H + bn - 1) / bn) * ((I + bk - 1) / bk);
    MtOperands o = {h, nullptr, start, end, wd + e * wstride, sd + (WDT == WDT_FP8 ? e * sstride : 0), H, (int)blockIdx.x * MT_N, I, bn, bk};
    MmaAcc acc;
    mt_zero(acc);
    mt_run<WDT>(sh, acc, o, 0, I, vec != 0);
    mt_each(acc, [&](int r, int c, float v) {
        int pos = start + r, n = o.n0 + c;
        if (pos < end && n < H) {
            int p = pair_of[pos];
            atomicAdd(&out[(int64_t)(p / top_k) * H + n], weights[p] * v);
        }
    });
}

#define MOE_MMA_KERNELS(SUF, WDT)                                                                                                            \
    extern "C" __global__ void __launch_bounds__(MT_THREADS) moe_gate_up_mma_##SUF(const float* x, const int32_t* tok, const int32_t* tiles, const int32_t* ntiles,       \
                                                     const uint8_t* wg, const float* sg, const uint8_t* wu, const float* su, float* gu, int I, \
                                                     int H, int bn, int bk, int vec) {                                                       \
        moe_gate_up_mma_impl<WDT>(x, tok, tiles, ntiles, wg, sg, wu, su, gu, I, H, bn, bk, vec);                                            \
    }                                                                                                                                        \
    extern "C" __global__ void __launch_bounds__(MT_THREADS) moe_down_mma_##SUF(const float* h, const int32_t* pair_of, const float* weights, const int32_t* tiles,        \
                                                  const int32_t* ntiles, const uint8_t* wd, const float* sd, float* out, int top_k, int I,     \
                                                  int H, int bn, int bk, int vec) {                                                          \
        moe_down_mma_impl<WDT>(h, pair_of, weights, tiles, ntiles, wd, sd, out, top_k, I, H, bn, bk, vec);                                  \
    }
MOE_MMA_KERNELS(f32w, WDT_F32)
MOE_MMA_KERNELS(bf16w, WDT_BF16)
MOE_MMA_KERNELS(fp8w, WDT_FP8)

// ---- Decode-sized batches (tiles of at most GV_T tokens per expert): grouped GEMV. Each expert's
// rows are streamed once per tile at bandwidth with 16-byte loads while the tile's tokens sit in
// shared memory, K in slices of GV_KS; f32 arithmetic (dequantised weights), like the per-pair
// kernels. Needs K % 16 == 0 and, for FP8, bk % 16 == 0 (the host checks).
#define GV_T 16
#define GV_KS 512
#define GV_CH 20 // a 16-float chunk padded to 20: lanes' float4 reads hit distinct banks

// x slice [tokens][GV_KS] of the rows given by rowmap[start .. end) (or start .. end) into shared
__device__ __forceinline__ void gv_stage(float* xs, const float* x, const int32_t* rowmap, int start, int end, int K, int k0) {
    int c = end - start;
    for (int i = threadIdx.x; i < GV_T * (GV_KS / 4); i += blockDim.x) {
        int tt = i / (GV_KS / 4), k = 4 * (i % (GV_KS / 4));
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (tt < c && k0 + k < K) {
            int64_t row = rowmap ? rowmap[start + tt] : start + tt;
            v = *(const float4*)(x + row * K + k0 + k);
        }
        *(float4*)&xs[(tt * (GV_KS / 16) + k / 16) * GV_CH + k % 16] = v;
    }
}

// 16 weights of row `row` at column k (dequantised), · the tile's tokens, into acc[tt]
template <int WDT>
__device__ __forceinline__ void gv_row(const uint8_t* W, const float* S, int64_t row, int K, int bn, int bk, int k, int lane, const float* xs, int c,
                                       float* acc) {
    const int es = WDT == WDT_F32 ? 4 : WDT == WDT_BF16 ? 2 : 1;
    float w[16];
    const uint8_t* p = W + (row * K + k) * es;
    if (WDT == WDT_FP8) {
        unpack16_fp8(p, w);
        float s = S[(row / bn) * ((K + bk - 1) / bk) + k / bk];
#pragma unroll
        for (int i = 0; i < 16; ++i) w[i] *= s;
    } else {
        unpack8(p, WDT, w);
        unpack8(p + 8 * es, WDT, w + 8);
    }
    const float* xl = xs + lane * GV_CH;
#pragma unroll
    for (int tt = 0; tt < GV_T; ++tt) {
        if (tt < c) {
            const float4* xv = (const float4*)(xl + tt * (GV_KS / 16) * GV_CH);
            float a = 0.f;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                float4 v = xv[q];
                a += w[4 * q] * v.x + w[4 * q + 1] * v.y + w[4 * q + 2] * v.z + w[4 * q + 3] * v.w;
            }
            acc[tt] += a;
        }
    }
}

// h[pos] = silu(gate_e · x_tok) · (up_e · x_tok): a warp per output row i (gate and up rows together),
// 8 warps per block. Grid (ceil(I / 8), max_tiles), block 256.
template <int WDT>
__device__ void moe_gate_up_gv_impl(const float* x, const int32_t* tok, const int32_t* tiles, const int32_t* ntiles, const uint8_t* wg,
                                    const float* sg, const uint8_t* wu, const float* su, float* h, int I, int H, int bn, int bk) {
    int tile = blockIdx.y;
    if (tile >= *ntiles) return;
    __shared__ float xs[GV_T * (GV_KS / 16) * GV_CH];
    int e = tiles[3 * tile], start = tiles[3 * tile + 1], end = tiles[3 * tile + 2], c = end - start;
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP, nw = blockDim.x / WARP;
    int i = blockIdx.x * nw + w;
    const int es = WDT == WDT_F32 ? 4 : WDT == WDT_BF16 ? 2 : 1;
    int64_t wstride = (int64_t)I * H * es, sstride = (int64_t)((I + bn - 1) / bn) * ((H + bk - 1) / bk);
    const uint8_t *G = wg + e * wstride, *U = wu + e * wstride;
    const float *GS = sg + (WDT == WDT_FP8 ? e * sstride : 0), *US = su + (WDT == WDT_FP8 ? e * sstride : 0);
    float ag[GV_T], au[GV_T];
#pragma unroll
    for (int tt = 0; tt < GV_T; ++tt) ag[tt] = au[tt] = 0.f;
    for (int k0 = 0; k0 < H; k0 += GV_KS) {
        __syncthreads();
        gv_stage(xs, x, tok, start, end, H, k0);
        __syncthreads();
        int k = k0 + lane * 16;
        if (i < I && lane * 16 < GV_KS && k < H) {
            gv_row<WDT>(G, GS, i, H, bn, bk, k, lane, xs, c, ag);
            gv_row<WDT>(U, US, i, H, bn, bk, k, lane, xs, c, au);
        }
    }
#pragma unroll
    for (int tt = 0; tt < GV_T; ++tt) {
        float g = warp_sum(ag[tt]), u = warp_sum(au[tt]);
        if (lane == 0 && i < I && tt < c) h[(int64_t)(start + tt) * I + i] = g / (1.0f + expf(-g)) * u;
    }
}

// out[tok] += weight · down_e · h[pos]: a warp per output row, 8 warps per block.
// Grid (ceil(H / 8), max_tiles), block 256.
template <int WDT>
__device__ void moe_down_gv_impl(const float* h, const int32_t* pair_of, const float* weights, const int32_t* tiles, const int32_t* ntiles,
                                 const uint8_t* wd, const float* sd, float* out, int top_k, int I, int H, int bn, int bk) {
    int tile = blockIdx.y;
    if (tile >= *ntiles) return;
    __shared__ float xs[GV_T * (GV_KS / 16) * GV_CH];
    int e = tiles[3 * tile], start = tiles[3 * tile + 1], end = tiles[3 * tile + 2], c = end - start;
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP, nw = blockDim.x / WARP;
    int n = blockIdx.x * nw + w;
    const int es = WDT == WDT_F32 ? 4 : WDT == WDT_BF16 ? 2 : 1;
    int64_t wstride = (int64_t)I * H * es, sstride = (int64_t)((H + bn - 1) / bn) * ((I + bk - 1) / bk);
    const uint8_t* D = wd + e * wstride;
    const float* DS = sd + (WDT == WDT_FP8 ? e * sstride : 0);
    float acc[GV_T];
#pragma unroll
    for (int tt = 0; tt < GV_T; ++tt) acc[tt] = 0.f;
    for (int k0 = 0; k0 < I; k0 += GV_KS) {
        __syncthreads();
        gv_stage(xs, h, nullptr, start, end, I, k0);
        __syncthreads();
        int k = k0 + lane * 16;
        if (n < H && lane * 16 < GV_KS && k < I) gv_row<WDT>(D, DS, n, I, bn, bk, k, lane, xs, c, acc);
    }
#pragma unroll
    for (int tt = 0; tt < GV_T; ++tt) {
        float v = warp_sum(acc[tt]);
        if (lane == 0 && n < H && tt < c) {
            int p = pair_of[start + tt];
            atomicAdd(&out[(int64_t)(p / top_k) * H + n], weights[p] * v);
        }
    }
}

#define MOE_GV_KERNELS(SUF, WDT)                                                                                                             \
    extern "C" __global__ void __launch_bounds__(256) moe_gate_up_gv_##SUF(const float* x, const int32_t* tok, const int32_t* tiles,          \
                                                                          const int32_t* ntiles, const uint8_t* wg, const float* sg,         \
                                                                          const uint8_t* wu, const float* su, float* h, int I, int H, int bn,  \
                                                                          int bk) {                                                          \
        moe_gate_up_gv_impl<WDT>(x, tok, tiles, ntiles, wg, sg, wu, su, h, I, H, bn, bk);                                                    \
    }                                                                                                                                        \
    extern "C" __global__ void __launch_bounds__(256) moe_down_gv_##SUF(const float* h, const int32_t* pair_of, const float* weights,         \
                                                                       const int32_t* tiles, const int32_t* ntiles, const uint8_t* wd,       \
                                                                       const float* sd, float* out, int top_k, int I, int H, int bn, int bk) { \
        moe_down_gv_impl<WDT>(h, pair_of, weights, tiles, ntiles, wd, sd, out, top_k, I, H, bn, bk);                                        \
    }
MOE_GV_KERNELS(f32w, WDT_F32)
MOE_GV_KERNELS(bf16w, WDT_BF16)
MOE_GV_KERNELS(fp8w, WDT_FP8)
