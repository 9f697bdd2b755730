// MoE: routing (noaux_tc / greedy / group_limited_greedy, sigmoid or softmax scores) and the routed
// experts. Routing follows backend/routing.rs exactly (ties to the lower expert id). The expert
// kernels run one (token, slot) pair per block row: gate/up with SiLU, then down with the routing
// weight, accumulated into the output with atomics.
#include "common.h"
#include "vec8.h"

#define METHOD_NOAUX_TC 0
#define METHOD_GREEDY 1
#define METHOD_GROUP_LIMITED 2

// One block per token, a thread per expert (blockDim.x = E rounded up to whole warps; E <= 1024,
// top_k and n_group <= 64): scores, then the group limit and the top-k picks by rank — an
// expert's (or group's) rank is how many others beat it, a higher value or an equal one with a
// lower id, so rank k is the k-th pick of a sequential scan that keeps the lowest id among equal
// scores (as the CPU reference, backend/routing.rs, does). The single warp this replaced walked
// the experts lane by lane and picked one at a time: ~15 µs a token at batch 1.
extern "C" __global__ void moe_route(const float* __restrict__ logits, const float* __restrict__ bias, int has_bias, int E, int top_k,
                                     int n_group, int topk_group, int method, int softmax_scoring, int norm_topk_prob, float scaling,
                                     int32_t* __restrict__ ids, float* __restrict__ weights) {
    __shared__ float scores[1024];
    __shared__ float choice[1024];
    __shared__ float gscore[64];
    __shared__ int picked[64];
    const int t = blockIdx.x, e = threadIdx.x;
    const bool live = e < E;
    const float l = live ? logits[(int64_t)t * E + e] : -ENGINE_INF;
    const float b = live && has_bias ? bias[e] : 0.f;
    float sc;
    if (softmax_scoring) {
        float m = block_max(l);
        float p = live ? expf(l - m) : 0.f;
        sc = p / block_sum(p);
    } else {
        sc = 1.0f / (1.0f + expf(-l));
    }
    if (live) {
        scores[e] = sc;
        choice[e] = sc + b;
    }
    if (e < top_k) picked[e] = 0; // unreachable for valid configs: fewer valid experts than top_k
    __syncthreads();
    if (method != METHOD_GREEDY) {
        const int per = E / n_group;
        if (e < n_group) {
            const float* c = choice + e * per;
            if (method == METHOD_NOAUX_TC) {
                float b1 = -ENGINE_INF, b2 = -ENGINE_INF;
                for (int i = 0; i < per; ++i) {
                    if (c[i] > b1) { b2 = b1; b1 = c[i]; } else if (c[i] > b2) { b2 = c[i]; }
                }
                gscore[e] = b1 + b2;
            } else {
                float bm = -ENGINE_INF;
                for (int i = 0; i < per; ++i) bm = fmaxf(bm, c[i]);
                gscore[e] = bm;
            }
        }
        __syncthreads();
        // an expert of a group with topk_group or more groups ranked above it is dropped
        if (live) {
            const int g = e / per;
            const float gs = gscore[g];
            int above = 0;
            for (int h = 0; h < n_group; ++h) above += gscore[h] > gs || (gscore[h] == gs && h < g);
            if (above >= topk_group) choice[e] = -ENGINE_INF;
        }
        __syncthreads();
    }
    // every expert's rank, over all E with no early exit, eight shared-memory loads in flight (a
    // loop that stopped at rank top_k waited on each load in turn: ~6 µs)
    if (live) {
        const float c = choice[e];
        int rank = 0;
        int f0 = 0;
        for (; f0 + 8 <= E; f0 += 8) {
            float d[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) d[j] = choice[f0 + j];
#pragma unroll
            for (int j = 0; j < 8; ++j) rank += d[j] > c || (d[j] == c && f0 + j < e);
        }
        for (; f0 < E; ++f0) rank += choice[f0] > c || (choice[f0] == c && f0 < e);
        if (c > -ENGINE_INF && rank < top_k) picked[rank] = e;
    }
    __syncthreads();
    if (e < top_k) {
        // weights in pick order, summed in that order (as the reference does; each of the top_k
        // threads sums the same values in the same order)
        float wsum = 0.f;
        for (int k = 0; k < top_k; ++k) wsum += scores[picked[k]];
        float w = scores[picked[e]];
        if (method == METHOD_NOAUX_TC) {
            if (norm_topk_prob) w /= (wsum + 1e-20f);
            w *= scaling;
        } else if (top_k > 1 && norm_topk_prob) {
            w /= (wsum + 1e-20f);
        } else {
            w *= scaling;
        }
        ids[t * top_k + e] = picked[e];
        weights[t * top_k + e] = w;
    }
}

// acc[r] += rows[r] · x over K for R weight rows, each lane a 16-byte chunk of every row per step:
// the R loads in flight together, and each x chunk (64 bytes for 16 FP8 weights) read once for
// the R rows instead of once per row (the L1 traffic that bounded one row at a time). The same
// arithmetic, in the same order, as VecDot per row. Needs K % VE == 0 (and FP8: bk % VE == 0).
template <int WDT, int R>
__device__ __forceinline__ void moe_rows_dot(const uint8_t* const (&rows)[R], const float* const (&srows)[R], const float* __restrict__ x, int K, int bk, float (&acc)[R]) {
    const int lane = threadIdx.x % WARP, es = WDT == WDT_F32 ? 4 : WDT == WDT_BF16 ? 2 : 1, VE = VecDot<WDT>::ELEMS;
    for (int k0 = lane * VE; k0 < K; k0 += WARP * VE) {
        Chunk16 c[R];
#pragma unroll
        for (int r = 0; r < R; ++r) c[r] = load_chunk<WDT>(rows[r] + (int64_t)k0 * es);
        float4 xv[VE / 4];
#pragma unroll
        for (int q = 0; q < VE / 4; ++q) xv[q] = ((const float4*)(x + k0))[q];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            float w[VE];
            unpack_chunk<WDT>(c[r], w);
            float d;
            if (WDT == WDT_FP8) {
                d = 0.f;
#pragma unroll
                for (int q = 0; q < 4; ++q) d += w[4 * q] * xv[q].x + w[4 * q + 1] * xv[q].y + w[4 * q + 2] * xv[q].z + w[4 * q + 3] * xv[q].w;
                d *= srows[r][k0 / bk];
            } else {
                d = w[0] * xv[0].x + w[1] * xv[0].y + w[2] * xv[0].z + w[3] * xv[0].w + w[4] * xv[1].x + w[5] * xv[1].y + w[6] * xv[1].z + w[7] * xv[1].w;
            }
            acc[r] += d;
        }
    }
}

// gate/up rows per warp pass (2: four weight rows in flight), down rows per pass (4)
#define MOE_GU_ROWS 2
#define MOE_DOWN_ROWS 4

// h[p, i] = silu(x[t] · Wg[e, i]) · (x[t] · Wu[e, i]) for pair p = t·top_k + k with expert e = ids[p].
// Weights of this rank's experts e0 .. e0+ne are stacked: [ne, I, H] (+ FP8 scales [E, ceil(I/bn), ceil(H/bk)]).
template <int WDT>
__device__ void moe_gate_up_impl(const float* x, const int32_t* ids, const uint8_t* wg, const float* sg, const uint8_t* wu,
                                 const float* su, float* h, int top_k, int I, int H, int bn, int bk, int e0, int ne) {
    int p = blockIdx.x;
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP, nw = blockDim.x / WARP;
    int t = p / top_k, e = ids[p] - e0;
    if (e < 0 || e >= ne) return; // another rank's expert (expert parallelism)
    int kb = (H + bk - 1) / bk;
    int64_t wstride = (int64_t)I * H * (WDT == WDT_F32 ? 4 : WDT == WDT_BF16 ? 2 : 1);
    int64_t sstride = (int64_t)((I + bn - 1) / bn) * kb;
    const uint8_t* g = wg + e * wstride;
    const uint8_t* u = wu + e * wstride;
    const float* gs = sg + (WDT == WDT_FP8 ? e * sstride : 0);
    const float* us = su + (WDT == WDT_FP8 ? e * sstride : 0);
    const float* xt = x + (int64_t)t * H;
    const int es = WDT == WDT_F32 ? 4 : WDT == WDT_BF16 ? 2 : 1;
    const int VE = VecDot<WDT>::ELEMS;
    bool vec = H % VE == 0 && (WDT != WDT_FP8 || bk % VE == 0);
    if (vec) {
        const int RG = MOE_GU_ROWS;
        for (int i0 = (blockIdx.y * nw + w) * RG; i0 < I; i0 += gridDim.y * nw * RG) {
            // rows i0 .. i0+RG-1 of gate, then of up (past I: row i0 again, not written)
            const uint8_t* rows[2 * RG];
            const float* srows[2 * RG];
            float acc[2 * RG];
#pragma unroll
            for (int r = 0; r < RG; ++r) {
                const int i = i0 + r < I ? i0 + r : i0;
                rows[r] = g + (int64_t)i * H * es, rows[RG + r] = u + (int64_t)i * H * es;
                srows[r] = gs + (WDT == WDT_FP8 ? (i / bn) * kb : 0), srows[RG + r] = us + (WDT == WDT_FP8 ? (i / bn) * kb : 0);
                acc[r] = acc[RG + r] = 0.f;
            }
            moe_rows_dot<WDT, 2 * RG>(rows, srows, xt, H, bk, acc);
#pragma unroll
            for (int r = 0; r < RG; ++r) {
                const float a = warp_sum(acc[r]), b = warp_sum(acc[RG + r]);
                if (lane == 0 && i0 + r < I) h[(int64_t)p * I + i0 + r] = a / (1.0f + expf(-a)) * b;
            }
        }
        return;
    }
    for (int i = blockIdx.y * nw + w; i < I; i += gridDim.y * nw) {
        float a = 0.f, b = 0.f;
        {
            for (int c = lane; c < H; c += WARP) {
                a += xt[c] * load_w<WDT>(g, gs, i, c, H, bn, bk, kb);
                b += xt[c] * load_w<WDT>(u, us, i, c, H, bn, bk, kb);
            }
        }
        a = warp_sum(a);
        b = warp_sum(b);
        if (lane == 0) h[(int64_t)p * I + i] = a / (1.0f + expf(-a)) * b;
    }
}

// out[t, r] += weight[p] · (Wd[e, r] · h[p])
template <int WDT>
__device__ void moe_down_impl(const float* h, const int32_t* ids, const float* weights, const uint8_t* wd, const float* sd, float* out,
                              int top_k, int I, int H, int bn, int bk, int e0, int ne) {
    int p = blockIdx.x;
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP, nw = blockDim.x / WARP;
    int t = p / top_k, e = ids[p] - e0;
    if (e < 0 || e >= ne) return; // another rank's expert (expert parallelism)
    int kb = (I + bk - 1) / bk;
    int64_t wstride = (int64_t)I * H * (WDT == WDT_F32 ? 4 : WDT == WDT_BF16 ? 2 : 1);
    int64_t sstride = (int64_t)((H + bn - 1) / bn) * kb;
    const uint8_t* d = wd + e * wstride;
    const float* ds = sd + (WDT == WDT_FP8 ? e * sstride : 0);
    const float* hp = h + (int64_t)p * I;
    float wt = weights[p];
    const int es = WDT == WDT_F32 ? 4 : WDT == WDT_BF16 ? 2 : 1;
    const int VE = VecDot<WDT>::ELEMS;
    bool vec = I % VE == 0 && (WDT != WDT_FP8 || bk % VE == 0);
    if (vec) {
        const int RD = MOE_DOWN_ROWS;
        for (int r0 = (blockIdx.y * nw + w) * RD; r0 < H; r0 += gridDim.y * nw * RD) {
            const uint8_t* rows[RD];
            const float* srows[RD];
            float acc[RD];
#pragma unroll
            for (int q = 0; q < RD; ++q) {
                const int r = r0 + q < H ? r0 + q : r0;
                rows[q] = d + (int64_t)r * I * es;
                srows[q] = ds + (WDT == WDT_FP8 ? (r / bn) * kb : 0);
                acc[q] = 0.f;
            }
            moe_rows_dot<WDT, RD>(rows, srows, hp, I, bk, acc);
#pragma unroll
            for (int q = 0; q < RD; ++q) {
                const float a = warp_sum(acc[q]);
                if (lane == 0 && r0 + q < H) atomicAdd(&out[(int64_t)t * H + r0 + q], wt * a);
            }
        }
        return;
    }
    for (int r = blockIdx.y * nw + w; r < H; r += gridDim.y * nw) {
        float a = 0.f;
        {
            for (int c = lane; c < I; c += WARP) a += hp[c] * load_w<WDT>(d, ds, r, c, I, bn, bk, kb);
        }
        a = warp_sum(a);
        if (lane == 0) atomicAdd(&out[(int64_t)t * H + r], wt * a);
    }
}

#define MOE_KERNELS(SUF, WDT)                                                                                                          \
    extern "C" __global__ void moe_gate_up_##SUF(const float* x, const int32_t* ids, const uint8_t* wg, const float* sg,                \
                                                 const uint8_t* wu, const float* su, float* h, int top_k, int I, int H, int bn, int bk, int e0, int ne) { \
        moe_gate_up_impl<WDT>(x, ids, wg, sg, wu, su, h, top_k, I, H, bn, bk, e0, ne);                                                         \
    }                                                                                                                                  \
    extern "C" __global__ void moe_down_##SUF(const float* h, const int32_t* ids, const float* weights, const uint8_t* wd,              \
                                              const float* sd, float* out, int top_k, int I, int H, int bn, int bk, int e0, int ne) {  \
        moe_down_impl<WDT>(h, ids, weights, wd, sd, out, top_k, I, H, bn, bk, e0, ne);                                                         \
    }
MOE_KERNELS(f32w, WDT_F32)
MOE_KERNELS(bf16w, WDT_BF16)
MOE_KERNELS(fp8w, WDT_FP8)
