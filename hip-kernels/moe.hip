// MoE: routing (noaux_tc / greedy / group_limited_greedy, sigmoid or softmax scores) and the routed
// experts. Routing follows backend/routing.rs exactly (ties to the lower expert id). The expert
// kernels run one (token, slot) pair per block row: gate/up with SiLU, then down with the routing
// weight, accumulated into the output with atomics.
#include "common.h"
#include "vec8.h"

#define METHOD_NOAUX_TC 0
#define METHOD_GREEDY 1
#define METHOD_GROUP_LIMITED 2

// One warp per token (blockDim.x == WARP; E <= 1024 scores in shared memory, top_k and n_group
// <= 64): scores, group limits and the top-k picks spread over the
// lanes; each pick is a warp arg-max that keeps the lowest expert id among equal scores (the
// order a sequential scan gives, as the CPU reference does).
extern "C" __global__ void moe_route(const float* __restrict__ logits, const float* __restrict__ bias, int has_bias, int E, int top_k,
                                     int n_group, int topk_group, int method, int softmax_scoring, int norm_topk_prob, float scaling,
                                     int32_t* __restrict__ ids, float* __restrict__ weights) {
    __shared__ float scores[1024];
    __shared__ float choice[1024];
    __shared__ float gscore[64];
    __shared__ int keep[64];
    __shared__ int picked[64];
    int t = blockIdx.x, lane = threadIdx.x;
    const float* l = logits + (int64_t)t * E;
    if (softmax_scoring) {
        float m = -ENGINE_INF;
        for (int e = lane; e < E; e += WARP) m = fmaxf(m, l[e]);
        m = warp_max(m);
        float z = 0.f;
        for (int e = lane; e < E; e += WARP) {
            scores[e] = expf(l[e] - m);
            z += scores[e];
        }
        z = warp_sum(z);
        for (int e = lane; e < E; e += WARP) scores[e] /= z;
    } else {
        for (int e = lane; e < E; e += WARP) scores[e] = 1.0f / (1.0f + expf(-l[e]));
    }
    for (int e = lane; e < E; e += WARP) choice[e] = scores[e] + (has_bias ? bias[e] : 0.f);
    __syncthreads();
    int per = E / n_group;
    if (method != METHOD_GREEDY) {
        for (int g = lane; g < n_group; g += WARP) {
            const float* c = choice + g * per;
            if (method == METHOD_NOAUX_TC) {
                float b1 = -ENGINE_INF, b2 = -ENGINE_INF;
                for (int i = 0; i < per; ++i) {
                    if (c[i] > b1) { b2 = b1; b1 = c[i]; } else if (c[i] > b2) { b2 = c[i]; }
                }
                gscore[g] = b1 + b2;
            } else {
                float b = -ENGINE_INF;
                for (int i = 0; i < per; ++i) b = fmaxf(b, c[i]);
                gscore[g] = b;
            }
            keep[g] = 0;
        }
        __syncthreads();
        if (lane == 0) {
            for (int k = 0; k < topk_group; ++k) {
                int best = -1;
                for (int g = 0; g < n_group; ++g)
                    if (!keep[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
                keep[best] = 1;
            }
        }
        __syncthreads();
        for (int e = lane; e < E; e += WARP)
            if (!keep[e / per]) choice[e] = -ENGINE_INF;
        __syncthreads();
    }
    for (int k = 0; k < top_k; ++k) {
        float bv = -ENGINE_INF;
        int bi = -1;
        for (int e = lane; e < E; e += WARP)
            if (choice[e] > -ENGINE_INF && (bi < 0 || choice[e] > bv)) {
                bv = choice[e];
                bi = e;
            }
#pragma unroll
        for (int o = WARP / 2; o > 0; o >>= 1) {
            float ov = __shfl_xor(bv, o, WARP);
            int oi = __shfl_xor(bi, o, WARP);
            if (oi >= 0 && (bi < 0 || ov > bv || (ov == bv && oi < bi))) {
                bv = ov;
                bi = oi;
            }
        }
        if (bi < 0) bi = 0; // unreachable for valid configs
        __syncthreads();
        if (lane == 0) {
            choice[bi] = -ENGINE_INF;
            picked[k] = bi;
        }
        __syncthreads();
    }
    if (lane == 0) {
        // weights in pick order, summed in that order (as the reference does)
        float wsum = 0.f;
        for (int k = 0; k < top_k; ++k) wsum += scores[picked[k]];
        for (int k = 0; k < top_k; ++k) {
            float w = scores[picked[k]];
            if (method == METHOD_NOAUX_TC) {
                if (norm_topk_prob) w /= (wsum + 1e-20f);
                w *= scaling;
            } else if (top_k > 1 && norm_topk_prob) {
                w /= (wsum + 1e-20f);
            } else {
                w *= scaling;
            }
            ids[t * top_k + k] = picked[k];
            weights[t * top_k + k] = w;
        }
    }
}

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
    for (int i = blockIdx.y * nw + w; i < I; i += gridDim.y * nw) {
        float a = 0.f, b = 0.f;
        if (vec) {
            const float* gsr = gs + (WDT == WDT_FP8 ? (i / bn) * kb : 0);
            const float* usr = us + (WDT == WDT_FP8 ? (i / bn) * kb : 0);
            for (int k0 = lane * VE; k0 < H; k0 += WARP * VE) {
                a += VecDot<WDT>::dot(g + (int64_t)i * H * es, gsr, k0, bk, xt);
                b += VecDot<WDT>::dot(u + (int64_t)i * H * es, usr, k0, bk, xt);
            }
        } else {
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
    for (int r = blockIdx.y * nw + w; r < H; r += gridDim.y * nw) {
        float a = 0.f;
        if (vec) {
            const float* dsr = ds + (WDT == WDT_FP8 ? (r / bn) * kb : 0);
            for (int k0 = lane * VE; k0 < I; k0 += WARP * VE) a += VecDot<WDT>::dot(d + (int64_t)r * I * es, dsr, k0, bk, hp);
        } else {
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
