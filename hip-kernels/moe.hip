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
// expert's rank is how many others beat it, a higher value or an equal one with a lower id, so
// rank k is the k-th pick of a sequential scan that keeps the lowest id among equal scores (as the
// CPU reference, backend/routing.rs, does). Ranks are found in two levels: each expert's rank in
// its part (its group, or for greedy routing a run of WARP experts), whose first two give the
// group's score; then the picks among the parts' first top_k only (whatever beats a pick beats it
// in its own part too, so the picks and their ranks are those over all experts): V3's 256 experts
// compare 32 + 64 values each instead of 256 (one pass over all E: ~6 µs of a batch-1 MoE layer
// on the H200; the single warp before it, picking one at a time: ~15 µs). The logits come in
// `parts` K parts of [tokens, E] each (the router's split-K tiles, linear.hip), added in order.
// Each block also zeroes its token's row of `zero` ([tokens, zero_cols]: the experts' output).
#define ROUTE_CAND (1024 + 64)
// the in-part rank's eight loads a round unrolled on NVIDIA; CDNA keeps the loop (unrolled, it
// spilled 47 of gfx942's scalar registers)
#if defined(__AMDGCN__)
#define ROUTE_UNROLL _Pragma("unroll 1")
#else
#define ROUTE_UNROLL _Pragma("unroll")
#endif
extern "C" __global__ void moe_route(const float* __restrict__ logits, int parts, const float* __restrict__ bias, int has_bias, int E, int top_k,
                                     int n_group, int topk_group, int method, int softmax_scoring, int norm_topk_prob, float scaling,
                                     int32_t* __restrict__ ids, float* __restrict__ weights, float* __restrict__ zero, int zero_cols) { ENGINE_GRID_DEP();
    // the experts' output row of this token zeroed (they add into it), so that no memset of its own
    // sits between a step's kernels
    for (int i = threadIdx.x; i < zero_cols; i += blockDim.x) zero[(int64_t)blockIdx.x * zero_cols + i] = 0.f;
    __shared__ float scores[1024];
    __shared__ float choice[1024];
    __shared__ float cand_v[ROUTE_CAND]; // part q's in-part rank r at q·kk + r
    __shared__ int cand_e[ROUTE_CAND];
    __shared__ float gtop[65][2]; // each group's best two choices (a short last group: the 65th)
    __shared__ int picked[64];
    const int t = blockIdx.x, e = threadIdx.x;
    const bool live = e < E;
    float l = -ENGINE_INF;
    if (live) {
        l = logits[(int64_t)t * E + e];
        for (int p = 1; p < parts; ++p) l += logits[((int64_t)p * gridDim.x + t) * E + e];
    }
    const float b = live && has_bias ? bias[e] : 0.f;
    float sc;
    if (softmax_scoring) {
        float m = block_max(l);
        float p = live ? expf(l - m) : 0.f;
        sc = p / block_sum(p);
    } else {
        sc = 1.0f / (1.0f + expf(-l));
    }
    const bool grouped = method != METHOD_GREEDY;
    const int per = grouped ? E / n_group : min(E, WARP), kk = min(top_k, per), nc = (E + per - 1) / per * kk;
    if (live) {
        scores[e] = sc;
        choice[e] = sc + b;
    }
    for (int i = e; i < nc; i += blockDim.x) cand_v[i] = -ENGINE_INF, cand_e[i] = i; // (slots of a short last part)
    if (e < 65) gtop[e][0] = -ENGINE_INF, gtop[e][1] = 0.f; // (a group of one: its best alone, as the reference's sum)
    if (e < top_k) picked[e] = 0; // unreachable for valid configs: fewer valid experts than top_k
    __syncthreads();
    // this expert's rank in its part, eight shared-memory loads in flight
    float c = -ENGINE_INF;
    int prank = 0;
    if (live) {
        c = choice[e];
        const int p0 = e / per * per, p1 = min(p0 + per, E);
        int f = p0;
        for (; f + 8 <= p1; f += 8) {
            float d[8];
            ROUTE_UNROLL
            for (int j = 0; j < 8; ++j) d[j] = choice[f + j];
            ROUTE_UNROLL
            for (int j = 0; j < 8; ++j) prank += d[j] > c || (d[j] == c && f + j < e);
        }
        for (; f < p1; ++f) prank += choice[f] > c || (choice[f] == c && f < e);
    }
    if (grouped) {
        const int g = e / per;
        if (live && prank < 2) gtop[g][prank] = c;
        __syncthreads();
        // an expert of a group with topk_group or more groups ranked above it is dropped (group
        // score: the best two choices' sum, noaux_tc; the best, group_limited_greedy)
        if (live) {
            const float gs = method == METHOD_NOAUX_TC ? gtop[g][0] + gtop[g][1] : gtop[g][0];
            int above = 0;
            for (int h = 0; h < n_group; ++h) {
                const float o = method == METHOD_NOAUX_TC ? gtop[h][0] + gtop[h][1] : gtop[h][0];
                above += o > gs || (o == gs && h < g);
            }
            if (above >= topk_group) c = -ENGINE_INF;
        }
    }
    const bool cand = live && c > -ENGINE_INF && prank < kk;
    if (cand) cand_v[e / per * kk + prank] = c, cand_e[e / per * kk + prank] = e;
    __syncthreads();
    if (cand) {
        int rank = 0, j = 0;
        for (; j + 8 <= nc; j += 8) {
            float d[8];
            int f[8];
#pragma unroll
            for (int u = 0; u < 8; ++u) d[u] = cand_v[j + u], f[u] = cand_e[j + u];
#pragma unroll
            for (int u = 0; u < 8; ++u) rank += d[u] > c || (d[u] == c && f[u] < e);
        }
        for (; j < nc; ++j) rank += cand_v[j] > c || (cand_v[j] == c && cand_e[j] < e);
        if (rank < top_k) picked[rank] = e;
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

// acc[r] += rows[r] · x over K for R weight rows, read by a group of `g` lanes (a power of two
// dividing the warp): each lane a 16-byte chunk of every row per step and U steps' chunks loaded
// before any is used (U·R loads in flight a lane: one step's R loads left each warp waiting a whole
// memory latency per 2 KB), and each x chunk (64 bytes for 16 FP8 weights) read once for the R
// rows. The same arithmetic, in the same order, as VecDot per row. Needs K % VE == 0 (and FP8:
// bk % VE == 0).
// With ks > 1 the group reads steps part, part + ks, .. only (a K part of ks interleaved ones).
template <int WDT, int R, int U>
__device__ __forceinline__ void moe_rows_dot(const uint8_t* const (&rows)[R], const float* const (&srows)[R], const float* __restrict__ x, int K, int bk, float (&acc)[R],
                                             int g, int part, int ks) {
    const int lane = threadIdx.x % g, es = WDT == WDT_F32 ? 4 : WDT == WDT_BF16 ? 2 : 1, VE = VecDot<WDT>::ELEMS;
    for (int kb = (part * g + lane) * VE; kb < K; kb += U * ks * g * VE) {
        Chunk16 c[U][R];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int k0 = kb + u * ks * g * VE;
#pragma unroll
            for (int r = 0; r < R; ++r) c[u][r] = k0 < K ? load_chunk<WDT>(rows[r] + (int64_t)k0 * es) : Chunk16{};
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int k0 = kb + u * ks * g * VE;
            if (k0 >= K) break;
            float4 xv[VE / 4];
#pragma unroll
            for (int q = 0; q < VE / 4; ++q) xv[q] = ((const float4*)(x + k0))[q];
#pragma unroll
            for (int r = 0; r < R; ++r) {
                float w[VE];
                unpack_chunk<WDT>(c[u][r], w);
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
}

// gate/up rows per lane group's pass (2: four weight rows), down rows per pass (4), and the steps
// of chunks a lane loads ahead (two: eight 16-byte loads in flight; f32 weights' 32-byte chunks one)
#define MOE_GU_ROWS 2
#define MOE_DOWN_ROWS 4
#define MOE_STEPS(WDT) ((WDT) == WDT_F32 ? 1 : 2)
// Lanes that read a row of K weights (VE a 16-byte chunk): the fewest (a power of two) that cover
// it in one step, at most the warp. A warp's item is then WARP / lanes such groups' rows: V3's
// experts at a TP8 rank (down rows of K = 256 FP8: 16 lanes) had half of every warp idle and twice
// the items in turn. moe_pairs.rs mirrors this.
__device__ __forceinline__ int moe_lanes(int K, int VE) {
    int g = 1;
    while (g < WARP && g * VE < K) g *= 2;
    return g;
}
// NVIDIA takes whole-warp rows through a second copy of the loops with the group size a constant
// (unrolled as before lane groups: the generic copy measured ~3% slower on V3's shapes); CDNA
// keeps the generic copy alone (the second overflowed gfx942's scalar registers).
// The K split of moe_gate_up_impl and pairs of a second weight set (a MoE layer's shared experts
// folded into the routed launch) are NVIDIA's only: with the split the FP8 kernel spilled gfx942's
// scalar registers (3), and CDNA is not measured here.
#if defined(__AMDGCN__)
#define MOE_CONST_WARP 0
#define MOE_K_SPLIT 0
#define MOE_FOLD_SHARED 0
#else
#define MOE_CONST_WARP 1
#define MOE_K_SPLIT 1
#define MOE_FOLD_SHARED 1
#endif
// moe_rows_dot, then each row's sum over its lane group (every lane of the group gets it)
template <int WDT, int R>
__device__ __forceinline__ void moe_rows_sum(const uint8_t* const (&rows)[R], const float* const (&srows)[R], const float* __restrict__ x, int K, int bk, float (&acc)[R],
                                             int g, int part, int ks) {
    if (MOE_CONST_WARP && g == WARP) {
        moe_rows_dot<WDT, R, MOE_STEPS(WDT)>(rows, srows, x, K, bk, acc, WARP, part, ks);
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r] = warp_sum(acc[r]);
    } else {
        moe_rows_dot<WDT, R, MOE_STEPS(WDT)>(rows, srows, x, K, bk, acc, g, part, ks);
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r] = group_sum(acc[r], g);
    }
}
// Blocks a multiprocessor keeps resident (the launch bound the host sizes its grid by: one wave
// of blocks, each warp striding over (pair, row group) items; a grid of a block column per pair
// ran 1.3 waves at batch 1 on the H200, the last third of the time on a third of the SMs)
#define MOE_PAIR_BLOCKS_PER_SM 2
// ... and of gate/up's second copy (`_wide`), for launches of at least two waves' items at two
// (V3's experts whole: 1,024 row groups a pair): three on NVIDIA (80 registers, no spills on
// sm_90a; down would spill), more warps resident in turn. H200 steps, 4-layer V3 batch 1 / 4:
// 1.501-1.515 / 2.752-2.759 ms -> 1.472-1.475 / 2.703-2.704; a TP8 rank's fewer items lost at
// batch 4 with it (0.475 -> 0.479-0.487: the register cap) and keep the first copy (docs/
// BENCHMARKS.md, nineteenth session). CDNA: the same bound as the first (unmeasured).
#if defined(__AMDGCN__)
#define MOE_GU_WIDE_BLOCKS_PER_SM MOE_PAIR_BLOCKS_PER_SM
#else
#define MOE_GU_WIDE_BLOCKS_PER_SM 3
#endif

// The gate and up dot products of rows i0 .. i0+RG-1 (past I: row I - 1 again, not to be written)
// of one expert into acc (gate rows, then up rows), lanes in groups of g, K part `part` of `ks`,
// summed over each lane group.
template <int WDT>
__device__ __forceinline__ void moe_gu_dot(const float* xt, const uint8_t* g, const uint8_t* u, const float* gs, const float* us, int i0, int I, int H,
                                           int bn, int bk, int g_lanes, int part, int ks, float (&acc)[2 * MOE_GU_ROWS]) {
    const int es = WDT == WDT_F32 ? 4 : WDT == WDT_BF16 ? 2 : 1, kb = (H + bk - 1) / bk;
    const uint8_t* rows[2 * MOE_GU_ROWS];
    const float* srows[2 * MOE_GU_ROWS];
#pragma unroll
    for (int r = 0; r < MOE_GU_ROWS; ++r) {
        const int i = i0 + r < I ? i0 + r : I - 1;
        rows[r] = g + (int64_t)i * H * es, rows[MOE_GU_ROWS + r] = u + (int64_t)i * H * es;
        srows[r] = gs + (WDT == WDT_FP8 ? (i / bn) * kb : 0), srows[MOE_GU_ROWS + r] = us + (WDT == WDT_FP8 ? (i / bn) * kb : 0);
        acc[r] = acc[MOE_GU_ROWS + r] = 0.f;
    }
    moe_rows_sum<WDT, 2 * MOE_GU_ROWS>(rows, srows, xt, H, bk, acc, g_lanes, part, ks);
}

// h[p, i] = silu(x[t] · Wg[e, i]) · (x[t] · Wu[e, i]) for pair p = t·top_k + k with expert e = ids[p]
// of the `pairs`. Weights of this rank's experts e0 .. e0+ne are stacked: [ne, I, H] (+ FP8 scales
// [E, ceil(I/bn), ceil(H/bk)]). Each warp of the grid takes (pair, row group) items in turn. With
// no ids (null), every pair is expert 0: an MLP's own weights (a MoE layer's shared experts, one
// row; moe_pairs.rs). With fewer items than the grid has warps (a TP8 rank's experts of 256 rows,
// a shared expert alone) teams of `ks` warps of a block take an item each, every warp a part of
// K, the parts added in order through shared memory: each warp's chain of loads along K is 1/ks
// as long (one warp an item left most warps idle and the rest 7 load rounds deep at H = 7,168).
template <int WDT>
__device__ __forceinline__ void moe_gate_up_impl(const float* x, const int32_t* ids, const uint8_t* wg, const float* sg, const uint8_t* wu,
                                                 const float* su, float* h, int pairs, int top_k, int I, int H, int bn, int bk, int e0, int ne,
                                                 int ks_arg, const uint8_t* wg2, const float* sg2, const uint8_t* wu2, const float* su2, int from2) {
    const int lane = threadIdx.x % WARP, w = threadIdx.x / WARP, nw = blockDim.x / WARP;
    const int gw = blockIdx.x * nw + w, warps = gridDim.x * nw;
    const int kb = (H + bk - 1) / bk;
    const int es = WDT == WDT_F32 ? 4 : WDT == WDT_BF16 ? 2 : 1;
    const int64_t wstride = (int64_t)I * H * es;
    const int64_t sstride = (int64_t)((I + bn - 1) / bn) * kb;
    const int VE = VecDot<WDT>::ELEMS;
    const bool vec = H % VE == 0 && (WDT != WDT_FP8 || bk % VE == 0);
    const int G = vec ? moe_lanes(H, VE) : WARP; // lanes a row
    const int RG = vec ? MOE_GU_ROWS : 1, per = RG * (WARP / G), groups = (I + per - 1) / per, n = pairs * groups;
    // (the host's split: only for whole-warp rows, at most a block's warps)
    const int ks = MOE_K_SPLIT && vec && G == WARP && ks_arg > 1 && nw % ks_arg == 0 && nw <= 8 ? ks_arg : 1;
    const int part = w % ks, team = gw / ks, teams = warps / ks;
    __shared__ float red[8][2 * MOE_GU_ROWS]; // with ks > 1: each warp's sums of its item's rows
    for (int it = 0, iters = (n + teams - 1) / teams; it < iters; ++it) { // the same count for every warp of a block
        const int item = it * teams + team;
        const int p = item / groups, i0 = item % groups * per + lane / G * RG; // this lane group's rows
        const bool sh = MOE_FOLD_SHARED && p >= from2; // token p - from2's pair of the second set (its expert 0)
        const int e = item >= n ? -1 : sh ? 0 : (ids ? ids[p] : 0) - e0;
        const bool live = e >= 0 && (sh || e < ne); // (past the items, or another rank's expert: expert parallelism)
        if (live) {
            const uint8_t* g = (sh ? wg2 : wg) + e * wstride;
            const uint8_t* u = (sh ? wu2 : wu) + e * wstride;
            const float* gs = (sh ? sg2 : sg) + (WDT == WDT_FP8 ? e * sstride : 0);
            const float* us = (sh ? su2 : su) + (WDT == WDT_FP8 ? e * sstride : 0);
            const float* xt = x + (int64_t)(sh ? p - from2 : p / top_k) * H;
            if (vec) {
                float acc[2 * MOE_GU_ROWS];
                moe_gu_dot<WDT>(xt, g, u, gs, us, i0, I, H, bn, bk, G, part, ks, acc);
#pragma unroll
                for (int r = 0; r < MOE_GU_ROWS; ++r) {
                    if (ks > 1 && lane == 0) red[w][r] = acc[r], red[w][MOE_GU_ROWS + r] = acc[MOE_GU_ROWS + r];
                    if (ks == 1 && lane % G == 0 && i0 + r < I) h[(int64_t)p * I + i0 + r] = silu_mul1(acc[r], acc[MOE_GU_ROWS + r]);
                }
            } else {
                float a = 0.f, b = 0.f;
                for (int c = lane; c < H; c += WARP) {
                    a += xt[c] * load_w<WDT>(g, gs, i0, c, H, bn, bk, kb);
                    b += xt[c] * load_w<WDT>(u, us, i0, c, H, bn, bk, kb);
                }
                a = warp_sum(a);
                b = warp_sum(b);
                if (lane == 0) h[(int64_t)p * I + i0] = silu_mul1(a, b);
            }
        }
        if (ks > 1) { // the team's parts added in order by its first warp
            __syncthreads();
            if (live && part == 0 && lane < MOE_GU_ROWS && i0 + lane < I) {
                float a = 0.f, b = 0.f;
                for (int q = 0; q < ks; ++q) a += red[w + q][lane], b += red[w + q][MOE_GU_ROWS + lane];
                h[(int64_t)p * I + i0 + lane] = silu_mul1(a, b);
            }
            __syncthreads(); // red is rewritten by the next item
        }
    }
}

// out[t, r] += weight[p] · (Wd[e, r] · h[p]), items of (pair, row group) as above (no ids, or a
// pair of the second set from from2: expert 0 with weight 1)
template <int WDT>
__device__ void moe_down_impl(const float* h, const int32_t* ids, const float* weights, const uint8_t* wd, const float* sd, float* out,
                              int pairs, int top_k, int I, int H, int bn, int bk, int e0, int ne, const uint8_t* wd2, const float* sd2, int from2) {
    const int lane = threadIdx.x % WARP, nw = blockDim.x / WARP;
    const int gw = blockIdx.x * nw + threadIdx.x / WARP, warps = gridDim.x * nw;
    const int kb = (I + bk - 1) / bk;
    const int es = WDT == WDT_F32 ? 4 : WDT == WDT_BF16 ? 2 : 1;
    const int64_t wstride = (int64_t)I * H * es;
    const int64_t sstride = (int64_t)((H + bn - 1) / bn) * kb;
    const int VE = VecDot<WDT>::ELEMS;
    const bool vec = I % VE == 0 && (WDT != WDT_FP8 || bk % VE == 0);
    const int G = vec ? moe_lanes(I, VE) : WARP; // lanes a row
    const int RD = vec ? MOE_DOWN_ROWS : 1, per = RD * (WARP / G), groups = (H + per - 1) / per;
    for (int item = gw; item < pairs * groups; item += warps) {
        const int p = item / groups, r0 = item % groups * per + lane / G * RD; // this lane group's rows
        const bool sh = MOE_FOLD_SHARED && p >= from2;
        const int t = sh ? p - from2 : p / top_k, e = sh ? 0 : (ids ? ids[p] : 0) - e0;
        if (!sh && (e < 0 || e >= ne)) continue; // another rank's expert (expert parallelism)
        const uint8_t* d = (sh ? wd2 : wd) + e * wstride;
        const float* ds = (sh ? sd2 : sd) + (WDT == WDT_FP8 ? e * sstride : 0);
        const float* hp = h + (int64_t)p * I;
        const float wt = sh || !ids ? 1.f : weights[p];
        if (vec) {
            const uint8_t* rows[MOE_DOWN_ROWS];
            const float* srows[MOE_DOWN_ROWS];
            float acc[MOE_DOWN_ROWS];
#pragma unroll
            for (int q = 0; q < MOE_DOWN_ROWS; ++q) {
                const int r = r0 + q < H ? r0 + q : H - 1;
                rows[q] = d + (int64_t)r * I * es;
                srows[q] = ds + (WDT == WDT_FP8 ? (r / bn) * kb : 0);
                acc[q] = 0.f;
            }
            moe_rows_sum<WDT, MOE_DOWN_ROWS>(rows, srows, hp, I, bk, acc, G, 0, 1);
#pragma unroll
            for (int q = 0; q < MOE_DOWN_ROWS; ++q) {
                if (lane % G == 0 && r0 + q < H) atomicAdd(&out[(int64_t)t * H + r0 + q], wt * acc[q]);
            }
        } else {
            float a = 0.f;
            for (int c = lane; c < I; c += WARP) a += hp[c] * load_w<WDT>(d, ds, r0, c, I, bn, bk, kb);
            a = warp_sum(a);
            if (lane == 0) atomicAdd(&out[(int64_t)t * H + r0], wt * a);
        }
    }
}

#define MOE_GATE_UP(NAME, BOUND, WDT)                                                                                                 \
    extern "C" __global__ void __launch_bounds__(256, BOUND) NAME(const float* x, const int32_t* ids, const uint8_t* wg, const float* sg,    \
                                                                  const uint8_t* wu, const float* su, float* h, int pairs, int top_k, int I,  \
                                                                  int H, int bn, int bk, int e0, int ne, int ks, const uint8_t* wg2,         \
                                                                  const float* sg2, const uint8_t* wu2, const float* su2, int from2,       \
                                                                  float* zero, int zero_n) {                                                \
        ENGINE_GRID_DEP();                                                                                                             \
        /* the output down adds into, zeroed here (moe_pairs.rs: no memset node between a step's kernels) */                         \
        for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < zero_n; i += gridDim.x * blockDim.x) zero[i] = 0.f;                   \
        moe_gate_up_impl<WDT>(x, ids, wg, sg, wu, su, h, pairs, top_k, I, H, bn, bk, e0, ne, ks, wg2, sg2, wu2, su2, from2);               \
    }
#define MOE_KERNELS(SUF, WDT)                                                                                                          \
    MOE_GATE_UP(moe_gate_up_##SUF, MOE_PAIR_BLOCKS_PER_SM, WDT)                                                                        \
    MOE_GATE_UP(moe_gate_up_wide_##SUF, MOE_GU_WIDE_BLOCKS_PER_SM, WDT)                                                                \
    extern "C" __global__ void __launch_bounds__(256, MOE_PAIR_BLOCKS_PER_SM) moe_down_##SUF(                                             \
        const float* h, const int32_t* ids, const float* weights, const uint8_t* wd, const float* sd, float* out, int pairs, int top_k,    \
        int I, int H, int bn, int bk, int e0, int ne, const uint8_t* wd2, const float* sd2, int from2) { ENGINE_GRID_DEP();                 \
        moe_down_impl<WDT>(h, ids, weights, wd, sd, out, pairs, top_k, I, H, bn, bk, e0, ne, wd2, sd2, from2);                             \
    }
MOE_KERNELS(f32w, WDT_F32)
MOE_KERNELS(bf16w, WDT_BF16)
MOE_KERNELS(fp8w, WDT_FP8)
