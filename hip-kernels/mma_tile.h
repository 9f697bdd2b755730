// One 128×128 output tile of Y = X · Wᵀ on the matrix units, shared by the dense GEMM
// (linear_mma.hip) and the grouped MoE GEMM (moe_grouped.hip). A block of 256 threads walks its K
// range in steps of 32: the next step's X (f32) and W (f32 / bf16 / FP8 with 128×128 block scales)
// chunks are loaded into registers with 16-byte loads while the matrix units work on the current
// step, then staged in shared memory as bf16.
// Numerics close to f32: X is split into bf16 hi + lo parts (two products), bf16 and FP8 weights
// are exact in bf16, and an FP8 block scale that is uniform over the tile's rows (DeepSeek's
// 128-row blocks) is folded into X rather than rounded into W; f32 weights (and, in mt_run's SPLIT
// form, FP8 weights times scales that differ within the tile) are split into hi + lo as well (a
// third product). Relative error ~1e-5 instead of bf16's ~4e-3.
// The tile logic (staging, row maps, K ranges, the epilogue's element order) is the same for every
// vendor; only the warp-level product differs:
//   - NVIDIA sm_80+: 8 warps, each 64×32 of the tile, mma.sync m16n8k16 bf16,
//   - CDNA gfx942 / gfx950: 4 wavefronts, each 64×64, MFMA 32x32x8 bf16,
//   - anything else: the portable product, each thread an 8×8 block in scalar FMAs.
// Rows of X come through a row map (the MoE's token gather).
#pragma once
#include "bf16.h"

#define MT_M 128
#define MT_N 128
#define MT_K 32
#define MT_KP (MT_K + 8) // padded shared row (bf16): conflict-free fragment reads
#define MT_THREADS 256
// Blocks per SM a kernel may cut its register budget for: two on NVIDIA (≤ 128 registers a
// thread; at one block, 8 warps, the grouped MoE tiles left the tensor cores idle through every
// barrier), the compiler's choice on AMD.
#if defined(__AMDGCN__)
#define MT_MIN_BLOCKS 1
#else
#define MT_MIN_BLOCKS 2
#endif

struct MmaShared {
    uint16_t xs[2][MT_M][MT_KP]; // X hi, lo
    uint16_t ws[2][MT_N][MT_KP]; // W hi, lo (lo used for f32 weights only)
};

#if defined(__AMDGCN__)
typedef short mt_short4 __attribute__((ext_vector_type(4)));
typedef float mt_float16 __attribute__((ext_vector_type(16)));
struct MmaAcc {
    mt_float16 c[2][2];
};
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define MT_MMA_SYNC 1
struct MmaAcc {
    float c[4][4][4];
};
#else
struct MmaAcc {
    float c[8][8];
};
#endif

__device__ __forceinline__ void mt_zero(MmaAcc& a) {
#if defined(__AMDGCN__)
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int r = 0; r < 16; ++r) a.c[i][j][r] = 0.f;
#elif defined(MT_MMA_SYNC)
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) a.c[i][j][r] = 0.f;
#else
    for (int i = 0; i < 8; ++i)
        for (int j = 0; j < 8; ++j) a.c[i][j] = 0.f;
#endif
}

// Where the tile's rows and columns come from. Local row r is valid when m0 + r < m_end; its X row
// is rowmap[m0 + r] (or m0 + r without a map), `ldx` floats apart (0: K). W rows n0 .. n0+127
// (< N) of a [rows, K] weight whose FP8 block scales count rows from W's first (the per-head
// projections pass a head's rows as n0 .. N of the whole kv_b).
struct MtOperands {
    const float* X;
    const int* rowmap;
    int m0, m_end;
    const uint8_t* W;
    const float* S;
    int N, n0, K, bn, bk;
    int64_t ldx;
    // set by mt_run: the tile's row of FP8 block scales when they are folded into X (else null)
    const float* srow;
};

__device__ __forceinline__ int64_t mt_xrow(const MtOperands& o, int r) {
    int m = o.m0 + r;
    if (m >= o.m_end) return -1;
    return o.rowmap ? (int64_t)o.rowmap[m] : (int64_t)m;
}

// Whether the FP8 scale of a K block is one number for all of the tile's rows (then X carries it).
template <int WDT>
__device__ __forceinline__ bool mt_fold(const MtOperands& o) {
    return WDT == WDT_FP8 && o.n0 / o.bn == (min(o.n0 + MT_N, o.N) - 1) / o.bn;
}

// The scale that multiplies X at column k (1 unless folded) and the one that multiplies W[n][k].
template <int WDT>
__device__ __forceinline__ float mt_xscale(const MtOperands& o, int k) {
    return o.srow && k < o.K ? o.srow[k / o.bk] : 1.f;
}
template <int WDT>
__device__ __forceinline__ float mt_wscale(const MtOperands& o, int n, int k) {
    return WDT == WDT_FP8 && !o.srow ? o.S[(n / o.bn) * ((o.K + o.bk - 1) / o.bk) + k / o.bk] : 1.f;
}

// four consecutive floats split into bf16 hi and lo parts at hi[0..4] and lo[0..4] (8-byte aligned)
__device__ __forceinline__ void mt_put_split4(uint16_t* hi, uint16_t* lo, float a, float b, float c, float d) {
    uint32_t h0, l0, h1, l1;
    bf16_split2(a, b, &h0, &l0);
    bf16_split2(c, d, &h1, &l1);
    *(uint2*)hi = make_uint2(h0, h1);
    *(uint2*)lo = make_uint2(l0, l1);
}

// Per-thread share of one K step, still in the checkpoint's format.
template <int WDT>
struct MtStage {
    static const int ES = WDT == WDT_F32 ? 4 : WDT == WDT_BF16 ? 2 : 1;
    static const int WCH = ES; // 16-byte weight chunks per thread per step
    float4 x[4];
    float xs; // the X chunks share their columns, so their scale
    uint4 w[WCH];
    float s[WCH];
};

// Vector path (K % 16 == 0 and, for FP8, bk % 16 == 0): every 16-byte chunk lies inside K and
// inside one scale block. X chunk i: row tid/8 + 32i, columns 4·(tid%8) .. +4.
template <int WDT>
__device__ __forceinline__ void mt_load(MtStage<WDT>& st, const MtOperands& o, int k0) {
    const int tid = threadIdx.x, ES = MtStage<WDT>::ES;
    const int kx = k0 + 4 * (tid % 8);
    st.xs = mt_xscale<WDT>(o, kx);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        int64_t xr = mt_xrow(o, tid / 8 + 32 * i);
        st.x[i] = (xr >= 0 && kx < o.K) ? *(const float4*)(o.X + xr * o.ldx + kx) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    const int per_row = 2 * ES, rows_per_pass = MT_THREADS / per_row, elems = 16 / ES;
#pragma unroll
    for (int i = 0; i < MtStage<WDT>::WCH; ++i) {
        int n = o.n0 + tid / per_row + rows_per_pass * i;
        int k = k0 + (tid % per_row) * elems;
        bool in = n < o.N && k < o.K;
        st.w[i] = in ? *(const uint4*)(o.W + ((int64_t)n * o.K + k) * ES) : make_uint4(0, 0, 0, 0);
        st.s[i] = in ? mt_wscale<WDT>(o, n, k) : 1.f;
    }
}

// `wsplit`: FP8 weights times unfolded scales go in as hi + lo parts (else w·s would round to bf16)
template <int WDT>
__device__ __forceinline__ void mt_store(MmaShared& sh, const MtStage<WDT>& st, bool wsplit) {
    const int tid = threadIdx.x, ES = MtStage<WDT>::ES;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float4 v = st.x[i];
        float s = st.xs;
        int r = tid / 8 + 32 * i, c = 4 * (tid % 8);
        mt_put_split4(&sh.xs[0][r][c], &sh.xs[1][r][c], v.x * s, v.y * s, v.z * s, v.w * s);
    }
    const int per_row = 2 * ES, rows_per_pass = MT_THREADS / per_row, elems = 16 / ES;
#pragma unroll
    for (int i = 0; i < MtStage<WDT>::WCH; ++i) {
        int r = tid / per_row + rows_per_pass * i, c = (tid % per_row) * elems;
        uint4 u = st.w[i];
        if (WDT == WDT_BF16) {
            *(uint4*)&sh.ws[0][r][c] = u;
        } else if (WDT == WDT_F32) {
            mt_put_split4(&sh.ws[0][r][c], &sh.ws[1][r][c], __uint_as_float(u.x), __uint_as_float(u.y), __uint_as_float(u.z), __uint_as_float(u.w));
        } else if (wsplit) {
            uint32_t w4[4] = {u.x, u.y, u.z, u.w};
            float s = st.s[i];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                float f[4];
                fp8x4_to_f32(w4[q], f);
                mt_put_split4(&sh.ws[0][r][c + 4 * q], &sh.ws[1][r][c + 4 * q], f[0] * s, f[1] * s, f[2] * s, f[3] * s);
            }
        } else {
            // e4m3 values are exact in bf16; the scale is exact too when folded into X (s = 1)
            uint32_t w4[4] = {u.x, u.y, u.z, u.w}, p[8];
            float s = st.s[i];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                float f[4];
                fp8x4_to_f32(w4[q], f);
                p[2 * q] = bf16_pack(f[0] * s, f[1] * s);
                p[2 * q + 1] = bf16_pack(f[2] * s, f[3] * s);
            }
            *(uint4*)&sh.ws[0][r][c] = make_uint4(p[0], p[1], p[2], p[3]);
            *(uint4*)&sh.ws[0][r][c + 8] = make_uint4(p[4], p[5], p[6], p[7]);
        }
    }
}

// Scalar path for shapes the vector path cannot take (odd K, unaligned rows): element by element.
template <int WDT>
__device__ void mt_fill_scalar(MmaShared& sh, const MtOperands& o, int k0) {
    for (int i = threadIdx.x; i < MT_M * MT_K; i += MT_THREADS) {
        int r = i / MT_K, c = i % MT_K, k = k0 + c;
        int64_t xr = mt_xrow(o, r);
        float x = (xr >= 0 && k < o.K) ? o.X[xr * o.ldx + k] * mt_xscale<WDT>(o, k) : 0.f;
        bf16_split(x, &sh.xs[0][r][c], &sh.xs[1][r][c]);
        int n = o.n0 + r;
        float w = 0.f;
        if (n < o.N && k < o.K) {
            if (WDT == WDT_F32) w = ((const float*)o.W)[(int64_t)n * o.K + k];
            else if (WDT == WDT_BF16) w = bf16_to_f32(((const uint16_t*)o.W)[(int64_t)n * o.K + k]);
            else w = fp8e4m3_to_f32(o.W[(int64_t)n * o.K + k]) * mt_wscale<WDT>(o, n, k);
        }
        bf16_split(w, &sh.ws[0][r][c], &sh.ws[1][r][c]);
    }
}

// acc += A · Bᵀ for one (X part, W part) pair of the shared tiles over one K step
__device__ __forceinline__ void mt_product1(const uint16_t (*xs)[MT_KP], const uint16_t (*ws)[MT_KP], MmaAcc& acc) {
    const int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP;
#if defined(__AMDGCN__)
    // MFMA 32x32x8: lane l gives A[l%32][4(l/32) .. +4] and B[4(l/32) .. +4][l%32]
    const int wm = (wid / 2) * 64, wn = (wid % 2) * 64;
#pragma unroll
    for (int kk = 0; kk < MT_K; kk += 8) {
        int kq = kk + 4 * (lane / 32);
        mt_short4 a[2], b[2];
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                a[i][q] = (short)xs[wm + 32 * i + lane % 32][kq + q];
                b[i][q] = (short)ws[wn + 32 * i + lane % 32][kq + q];
            }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 2; ++j) acc.c[i][j] = __builtin_amdgcn_mfma_f32_32x32x8bf16_1k(a[i], b[j], acc.c[i][j], 0, 0, 0);
    }
#elif defined(MT_MMA_SYNC)
    // m16n8k16: group g = lane/4, t = lane%4 hold A rows g, g+8 at k 2t, 2t+1 (+8) and B column g
    const int wm = (wid / 4) * 64, wn = (wid % 4) * 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int kk = 0; kk < MT_K; kk += 16) {
        uint32_t a[4][4], b[4][2];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int r = wm + 16 * i + g;
            a[i][0] = *(const uint32_t*)&xs[r][kk + 2 * t];
            a[i][1] = *(const uint32_t*)&xs[r + 8][kk + 2 * t];
            a[i][2] = *(const uint32_t*)&xs[r][kk + 2 * t + 8];
            a[i][3] = *(const uint32_t*)&xs[r + 8][kk + 2 * t + 8];
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            int n = wn + 8 * j + g;
            b[j][0] = *(const uint32_t*)&ws[n][kk + 2 * t];
            b[j][1] = *(const uint32_t*)&ws[n][kk + 2 * t + 8];
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) mma_bf16_16816(acc.c[i][j], a[i], b[j][0], b[j][1]);
    }
#else
    const int r0 = (threadIdx.x / 16) * 8, c0 = (threadIdx.x % 16) * 8;
    for (int kk = 0; kk < MT_K; ++kk)
        for (int i = 0; i < 8; ++i) {
            float x = bf16_to_f32(xs[r0 + i][kk]);
            for (int j = 0; j < 8; ++j) acc.c[i][j] += x * bf16_to_f32(ws[c0 + j][kk]);
        }
#endif
}

// acc += X·Wᵀ for one K step: hi·hi + lo·hi (+ hi·lo for f32 weights and split FP8 ones)
template <int WDT>
__device__ __forceinline__ void mt_product(const MmaShared& sh, MmaAcc& acc, bool wsplit) {
    mt_product1(sh.xs[0], sh.ws[0], acc);
    mt_product1(sh.xs[1], sh.ws[0], acc);
    if (WDT == WDT_F32 || (WDT == WDT_FP8 && wsplit)) mt_product1(sh.xs[0], sh.ws[1], acc);
}

// acc (+)= the tile's product over K range [kbeg, kend) (kbeg a multiple of MT_K). SPLIT: FP8
// scales that cannot be folded go in with the weights as hi + lo (a third product; the per-head
// projections, whose heads need not start a scale block); without it they round into bf16 weights
// (the dense and MoE GEMMs, whose 128-row tiles always fold DeepSeek's blocks: the split path
// would cost them registers, and the MoE tile spills at its 128-register cap).
template <int WDT, bool SPLIT = false>
__device__ void mt_run(MmaShared& sh, MmaAcc& acc, const MtOperands& operands, int kbeg, int kend, bool vec) {
    // the folded scales' row, found once per tile (the divisions cost more than the loads)
    MtOperands o = operands;
    if (!o.ldx) o.ldx = o.K;
    o.srow = mt_fold<WDT>(o) ? o.S + (int64_t)(o.n0 / o.bn) * ((o.K + o.bk - 1) / o.bk) : nullptr;
    const bool wsplit = SPLIT && WDT == WDT_FP8 && !o.srow;
    MtStage<WDT> st;
    if (vec && kbeg < kend) mt_load<WDT>(st, o, kbeg);
    for (int k0 = kbeg; k0 < kend; k0 += MT_K) {
        if (vec) mt_store<WDT>(sh, st, wsplit);
        else mt_fill_scalar<WDT>(sh, o, k0);
        __syncthreads();
        if (vec && k0 + MT_K < kend) mt_load<WDT>(st, o, k0 + MT_K); // in flight during the product
        mt_product<WDT>(sh, acc, wsplit);
        __syncthreads();
    }
}

// Calls f(r, c, value) for every element of the tile this thread holds (r, c local to the tile).
template <class F>
__device__ __forceinline__ void mt_each(const MmaAcc& acc, F f) {
    const int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP;
#if defined(__AMDGCN__)
    const int wm = (wid / 2) * 64, wn = (wid % 2) * 64;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int r = 0; r < 16; ++r) f(wm + 32 * i + 8 * (r / 4) + 4 * (lane / 32) + r % 4, wn + 32 * j + lane % 32, acc.c[i][j][r]);
#elif defined(MT_MMA_SYNC)
    const int wm = (wid / 4) * 64, wn = (wid % 4) * 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) f(wm + 16 * i + g + 8 * (c / 2), wn + 8 * j + 2 * t + c % 2, acc.c[i][j][c]);
#else
    const int r0 = (threadIdx.x / 16) * 8, c0 = (threadIdx.x % 16) * 8;
    for (int i = 0; i < 8; ++i)
        for (int j = 0; j < 8; ++j) f(r0 + i, c0 + j, acc.c[i][j]);
#endif
}
