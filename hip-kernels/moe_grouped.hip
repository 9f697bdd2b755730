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
#define MOE_GROUP_THREADS 1024 // moe_group's block (the host launches this many)

extern "C" __global__ void moe_group(const int32_t* ids, int P, int top_k, int e0, int ne, int tile_m, int32_t* tok, int32_t* pair_of,
                                     int32_t* tiles, int32_t* ntiles) { ENGINE_GRID_DEP();
    __shared__ int cnt[MOE_MAX_EXPERTS];
    __shared__ int cur[MOE_MAX_EXPERTS];
    for (int e = threadIdx.x; e < ne; e += blockDim.x) cnt[e] = 0;
    __syncthreads();
    for (int p = threadIdx.x; p < P; p += blockDim.x) {
        int e = ids[p] - e0;
        if (e >= 0 && e < ne) atomicAdd(&cnt[e], 1);
    }
    __syncthreads();
    // each expert's first position and first tile: exclusive sums of the experts' counts and
    // tile counts by a Hillis-Steele scan over the threads (thread i: experts i · run ..), each
    // thread then writing its experts' tiles (one thread walking all experts took ~24 µs for
    // V3's 256 on the H200)
    __shared__ int2 scan[2][MOE_GROUP_THREADS];
    if (blockDim.x > MOE_GROUP_THREADS) ENGINE_TRAP();
    const int run = (ne + blockDim.x - 1) / blockDim.x, lo = min(ne, (int)threadIdx.x * run), hi = min(ne, lo + run);
    int2 v = make_int2(0, 0);
    for (int e = lo; e < hi; ++e) v.x += cnt[e], v.y += (cnt[e] + tile_m - 1) / tile_m;
    scan[0][threadIdx.x] = v;
    __syncthreads();
    int b = 0;
    for (int o = 1; o < (int)blockDim.x; o <<= 1, b ^= 1) {
        int2 a = scan[b][threadIdx.x];
        if ((int)threadIdx.x >= o) {
            const int2 q = scan[b][threadIdx.x - o];
            a.x += q.x, a.y += q.y;
        }
        scan[b ^ 1][threadIdx.x] = a;
        __syncthreads();
    }
    const int2 incl = scan[b][threadIdx.x];
    int off = incl.x - v.x, nt = incl.y - v.y;
    for (int e = lo; e < hi; ++e) {
        cur[e] = off;
        for (int s = 0; s < cnt[e]; s += tile_m) {
            tiles[3 * nt] = e;
            tiles[3 * nt + 1] = off + s;
            tiles[3 * nt + 2] = off + min(s + tile_m, cnt[e]);
            ++nt;
        }
        off += cnt[e];
    }
    if (threadIdx.x == blockDim.x - 1) *ntiles = incl.y;
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

extern "C" __global__ void moe_silu_mul_halves(const float* gu, float* h, int64_t n, int I) { ENGINE_GRID_DEP();
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int64_t pos = i / I, c = i % I;
    float g = gu[pos * 2 * I + c];
    h[i] = silu_mul1(g, gu[pos * 2 * I + I + c]);
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

#define MOE_MMA_KERNELS(SUF, WDT, MINB)                                                                                                          \
    extern "C" __global__ void __launch_bounds__(MT_THREADS, MINB) moe_gate_up_mma_##SUF(const float* x, const int32_t* tok, const int32_t* tiles, const int32_t* ntiles,       \
                                                     const uint8_t* wg, const float* sg, const uint8_t* wu, const float* su, float* gu, int I, \
                                                     int H, int bn, int bk, int vec) { ENGINE_GRID_DEP();                                    \
        moe_gate_up_mma_impl<WDT>(x, tok, tiles, ntiles, wg, sg, wu, su, gu, I, H, bn, bk, vec);                                            \
    }                                                                                                                                        \
    extern "C" __global__ void __launch_bounds__(MT_THREADS, MINB) moe_down_mma_##SUF(const float* h, const int32_t* pair_of, const float* weights, const int32_t* tiles,        \
                                                  const int32_t* ntiles, const uint8_t* wd, const float* sd, float* out, int top_k, int I,     \
                                                  int H, int bn, int bk, int vec) { ENGINE_GRID_DEP();                                       \
        moe_down_mma_impl<WDT>(h, pair_of, weights, tiles, ntiles, wd, sd, out, top_k, I, H, bn, bk, vec);                                  \
    }
// FP8 experts (the checkpoints') cut registers for MT_MIN_BLOCKS blocks per SM; f32 and bf16
// ones (tests, tiny models) would spill there and keep the compiler's choice
MOE_MMA_KERNELS(f32w, WDT_F32, 1)
MOE_MMA_KERNELS(bf16w, WDT_BF16, 1)
MOE_MMA_KERNELS(fp8w, WDT_FP8, MT_MIN_BLOCKS)

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

// 16 weights of row `row` from column k, raw: one 16-byte load (FP8) or two (bf16; f32: four),
// issued before the tile's x slice is staged so the loads overlap the staging.
template <int WDT>
struct GvChunk {
    Chunk16 a, b;
};

template <int WDT>
__device__ __forceinline__ GvChunk<WDT> gv_load(const uint8_t* W, int64_t row, int K, int k) {
    const int es = WDT == WDT_F32 ? 4 : WDT == WDT_BF16 ? 2 : 1;
    const uint8_t* p = W + (row * K + k) * es;
    GvChunk<WDT> c;
    c.a = load_chunk<WDT>(p);
    if (WDT != WDT_FP8) c.b = load_chunk<WDT>(p + 8 * es);
    return c;
}

// The chunk's 16 weights as f32 (FP8 unscaled: its block scale multiplies each dot once).
template <int WDT>
__device__ __forceinline__ void gv_unpack(const GvChunk<WDT>& c, float* w) {
    unpack_chunk<WDT>(c.a, w);
    if (WDT != WDT_FP8) unpack_chunk<WDT>(c.b, w + 8);
}

// acc[r][tt] += s[r] · (w[r] · x_tt) over the tile's c tokens: R weight rows share each read of a
// token's x chunk from shared memory (the reads, not the weights, bound this kernel).
template <int R>
__device__ __forceinline__ void gv_dot(const float (*w)[16], const float* s, const float* xs, int lane, int c, float (*acc)[GV_T]) {
    const float* xl = xs + lane * GV_CH;
#pragma unroll
    for (int tt = 0; tt < GV_T; ++tt) {
        if (tt < c) {
            const float4* xv = (const float4*)(xl + tt * (GV_KS / 16) * GV_CH);
            float a[R];
#pragma unroll
            for (int r = 0; r < R; ++r) a[r] = 0.f;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                float4 v = xv[q];
#pragma unroll
                for (int r = 0; r < R; ++r) a[r] += w[r][4 * q] * v.x + w[r][4 * q + 1] * v.y + w[r][4 * q + 2] * v.z + w[r][4 * q + 3] * v.w;
            }
#pragma unroll
            for (int r = 0; r < R; ++r) acc[r][tt] += a[r] * s[r];
        }
    }
}

template <int WDT>
__device__ __forceinline__ float gv_scale(const float* S, int64_t row, int K, int bn, int bk, int k) {
    return WDT == WDT_FP8 ? S[(row / bn) * ((K + bk - 1) / bk) + k / bk] : 1.f;
}

// h[pos] = silu(gate_e · x_tok) · (up_e · x_tok): a warp per output row i, its gate and up rows
// sharing each x read; 8 warps per block. Grid (ceil(I / 8), max_tiles), block 256.
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
    float acc[2][GV_T]; // gate, up
#pragma unroll
    for (int tt = 0; tt < GV_T; ++tt) acc[0][tt] = acc[1][tt] = 0.f;
    for (int k0 = 0; k0 < H; k0 += GV_KS) {
        int k = k0 + lane * 16;
        bool on = i < I && lane * 16 < GV_KS && k < H;
        GvChunk<WDT> cg, cu;
        if (on) {
            cg = gv_load<WDT>(G, i, H, k);
            cu = gv_load<WDT>(U, i, H, k);
        }
        __syncthreads();
        gv_stage(xs, x, tok, start, end, H, k0);
        __syncthreads();
        if (on) {
            float wv[2][16], sc[2] = {gv_scale<WDT>(GS, i, H, bn, bk, k), gv_scale<WDT>(US, i, H, bn, bk, k)};
            gv_unpack<WDT>(cg, wv[0]);
            gv_unpack<WDT>(cu, wv[1]);
            gv_dot<2>(wv, sc, xs, lane, c, acc);
        }
    }
#pragma unroll
    for (int tt = 0; tt < GV_T; ++tt) {
        float g = warp_sum(acc[0][tt]), u = warp_sum(acc[1][tt]);
        if (lane == 0 && i < I && tt < c) h[(int64_t)(start + tt) * I + i] = silu_mul1(g, u);
    }
}

// out[tok] += weight · down_e · h[pos]: a warp per two output rows (sharing each read of h), 8
// warps per block. Grid (ceil(H / 16), max_tiles), block 256.
template <int WDT>
__device__ void moe_down_gv_impl(const float* h, const int32_t* pair_of, const float* weights, const int32_t* tiles, const int32_t* ntiles,
                                 const uint8_t* wd, const float* sd, float* out, int top_k, int I, int H, int bn, int bk) {
    int tile = blockIdx.y;
    if (tile >= *ntiles) return;
    __shared__ float xs[GV_T * (GV_KS / 16) * GV_CH];
    int e = tiles[3 * tile], start = tiles[3 * tile + 1], end = tiles[3 * tile + 2], c = end - start;
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP, nw = blockDim.x / WARP;
    int n0 = (blockIdx.x * nw + w) * 2;
    // the second row (n0 + 1) past the end reads row n0 again and is not written
    int64_t n1 = n0 + 1 < H ? n0 + 1 : n0;
    const int es = WDT == WDT_F32 ? 4 : WDT == WDT_BF16 ? 2 : 1;
    int64_t wstride = (int64_t)I * H * es, sstride = (int64_t)((H + bn - 1) / bn) * ((I + bk - 1) / bk);
    const uint8_t* D = wd + e * wstride;
    const float* DS = sd + (WDT == WDT_FP8 ? e * sstride : 0);
    float acc[2][GV_T];
#pragma unroll
    for (int tt = 0; tt < GV_T; ++tt) acc[0][tt] = acc[1][tt] = 0.f;
    for (int k0 = 0; k0 < I; k0 += GV_KS) {
        int k = k0 + lane * 16;
        bool on = n0 < H && lane * 16 < GV_KS && k < I;
        GvChunk<WDT> c0, c1;
        if (on) {
            c0 = gv_load<WDT>(D, n0, I, k);
            c1 = gv_load<WDT>(D, n1, I, k);
        }
        __syncthreads();
        gv_stage(xs, h, nullptr, start, end, I, k0);
        __syncthreads();
        if (on) {
            float wv[2][16], sc[2] = {gv_scale<WDT>(DS, n0, I, bn, bk, k), gv_scale<WDT>(DS, n1, I, bn, bk, k)};
            gv_unpack<WDT>(c0, wv[0]);
            gv_unpack<WDT>(c1, wv[1]);
            gv_dot<2>(wv, sc, xs, lane, c, acc);
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
#pragma unroll
        for (int tt = 0; tt < GV_T; ++tt) {
            float v = warp_sum(acc[r][tt]);
            int n = n0 + r;
            if (lane == 0 && n < H && (r == 0 || n0 + 1 < H) && tt < c) {
                int p = pair_of[start + tt];
                atomicAdd(&out[(int64_t)(p / top_k) * H + n], weights[p] * v);
            }
        }
    }
}

#define MOE_GV_KERNELS(SUF, WDT)                                                                                                             \
    extern "C" __global__ void __launch_bounds__(256) moe_gate_up_gv_##SUF(const float* x, const int32_t* tok, const int32_t* tiles,          \
                                                                          const int32_t* ntiles, const uint8_t* wg, const float* sg,         \
                                                                          const uint8_t* wu, const float* su, float* h, int I, int H, int bn,  \
                                                                          int bk) { ENGINE_GRID_DEP();                                       \
        moe_gate_up_gv_impl<WDT>(x, tok, tiles, ntiles, wg, sg, wu, su, h, I, H, bn, bk);                                                    \
    }                                                                                                                                        \
    extern "C" __global__ void __launch_bounds__(256) moe_down_gv_##SUF(const float* h, const int32_t* pair_of, const float* weights,         \
                                                                       const int32_t* tiles, const int32_t* ntiles, const uint8_t* wd,       \
                                                                       const float* sd, float* out, int top_k, int I, int H, int bn, int bk) { ENGINE_GRID_DEP(); \
        moe_down_gv_impl<WDT>(h, pair_of, weights, tiles, ntiles, wd, sd, out, top_k, I, H, bn, bk);                                        \
    }
MOE_GV_KERNELS(f32w, WDT_F32)
MOE_GV_KERNELS(bf16w, WDT_BF16)
MOE_GV_KERNELS(fp8w, WDT_FP8)
