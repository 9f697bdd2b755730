// MoE experts on the matrix units, for batches with many routed (token, expert) pairs:
//   1. moe_group: the pairs routed to this rank's experts [e0, e0 + ne), grouped by expert
//      (positions), with a tile list (expert, first, end) of at most MT_M positions each;
//   2. moe_gate_up_mma: gu[pos] = [gate_e · x_tok | up_e · x_tok], one 128×128 tile per block
//      (mma_tile.h), tokens gathered through tok[pos];
//   3. moe_silu_mul_halves: h[pos] = silu(gate) · up;
//   4. moe_down_mma: out[tok] += weight · down_e · h[pos].
// Each expert's weights are read once per tile of up to 128 pairs instead of once per pair.
// Grids are sized for the most tiles the pairs can make; blocks beyond *ntiles return.
#include "mma_tile.h"

#define MOE_MAX_EXPERTS 1024

extern "C" __global__ void moe_group(const int32_t* ids, int P, int top_k, int e0, int ne, int32_t* tok, int32_t* pair_of, int32_t* tiles,
                                     int32_t* ntiles) {
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
            for (int s = 0; s < cnt[e]; s += MT_M) {
                tiles[3 * nt] = e;
                tiles[3 * nt + 1] = off + s;
                tiles[3 * nt + 2] = off + min(s + MT_M, cnt[e]);
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
