// Decode-sized products on the matrix units with the roles swapped ("swap AB"): FP8 weight rows
// are the MMA's M side (16 rows per fragment) and the few tokens its N side, so one token still
// streams W at full width, and each weight byte is read once per tile of tokens by 16-byte loads,
// with no shared memory and no barriers. Used by the grouped MoE GEMV (moe_tc.hip) and the dense
// linear layers (linear_tc.hip).
// K in chunks of 64, permuted inside each chunk the same way for A and B (every dot product is
// unchanged) so that each lane loads 16 contiguous bytes of a weight row and the same 16 columns
// of its token's x; k16 step j takes bytes 4j .. 4j + 3 of them. x enters as bf16 hi + lo (two
// products; near-f32), FP8 weights are exact in bf16, and each chunk's partial sums are
// multiplied by their rows' block scale (bk a multiple of 64: one scale per row and chunk).
// The tile logic (chunks, the K permutation, loads one chunk ahead, scales, the kernels' row and
// token maps) is shared; the fragment product differs per vendor:
//   - NVIDIA sm_80+: mma.sync m16n8k16; lane (g, t) = (lane / 4, lane % 4) loads bytes
//     [16t, 16t + 16) of rows g and g + 8 and x of token g of each 8-token n-fragment (two per
//     16-token tile); its accumulators are rows g, g + 8 × tokens 2t, 2t + 1;
//   - CDNA gfx942 / gfx950: MFMA 16x16x16 bf16; lane (r, q) = (lane % 16, lane / 16) loads bytes
//     [16q, 16q + 16) of row r and x of token r (one 16-token n-fragment); its accumulators are
//     rows 4q .. 4q + 3 × token r. Compiled (and checked for spills) for both archs; it cannot
//     run here (no AMD GPU), while the NVIDIA form is tested on the H200.
#pragma once
#include "bf16.h"

#define TC_T 16 // tokens per tile
#define TC_WAVES (128 / WARP) // warps / wavefronts of a 128-thread block
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define TC_MMA 1
#define TC_NTOK 8 // tokens per n-fragment
#elif defined(__gfx942__) || defined(__gfx950__)
#define TC_MMA 1
#define TC_NTOK 16
typedef short tc_short4 __attribute__((ext_vector_type(4)));
typedef float tc_float4 __attribute__((ext_vector_type(4)));
#endif
#ifdef TC_MMA
#define TC_NT_MAX (TC_T / TC_NTOK) // n-fragments per tile

// Accumulator q of n-fragment n of this lane: its row within the m-fragment, and its token.
__device__ __forceinline__ int tc_row(int q) {
    const int lane = threadIdx.x % WARP;
#if TC_NTOK == 8
    return lane / 4 + (q >= 2 ? 8 : 0);
#else
    return 4 * (lane / 16) + q;
#endif
}

__device__ __forceinline__ int tc_tok(int n, int q) {
    const int lane = threadIdx.x % WARP;
#if TC_NTOK == 8
    return n * 8 + 2 * (lane % 4) + (q & 1);
#else
    (void)n;
    (void)q;
    return lane % 16;
#endif
}

// The token whose x this lane loads for n-fragment n.
__device__ __forceinline__ int tc_btok(int n) {
    const int lane = threadIdx.x % WARP;
#if TC_NTOK == 8
    return n * 8 + lane / 4;
#else
    (void)n;
    return lane % 16;
#endif
}
#endif

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


// The operands of one warp: NP m-fragments of 16 weight rows (row r of fragment p at W[p] + r·K,
// its scales at S[p] for rows row0[p] + r), sharing the B fragments of the tile's tokens.
template <int NP>
struct TcRows {
    const uint8_t* W[NP];
    const float* S[NP];
    int row0[NP];
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// acc[p][n][q] += the products over columns [k_lo, k_hi) (multiples of 64) of rows of length K:
// q = 0, 1 row g, tokens n·8 + 2t, + 1; q = 2, 3 row g + 8. xrow[n]: token g of n-fragment n
// (nullptr: no token, zeros).
template <int NP, int NT>
__device__ __forceinline__ void tc_gemm(const TcRows<NP>& o, const float* const* xrow, int K, int k_lo, int k_hi, int bn, int bk, float (*acc)[TC_NT_MAX][4]) {
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
    if (k_lo >= k_hi) return;
    load(k_lo, w, xv);
    for (int k0 = k_lo; k0 < k_hi; k0 += 64) {
        // the next chunk's loads are in flight while this one is multiplied
        if (k0 + 64 < k_hi) load(k0 + 64, wn, xn);
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
                tc_a_fp8(u4_word(w[p][0], j), u4_word(w[p][1], j), a);
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
#elif defined(__gfx942__) || defined(__gfx950__)
// 4 FP8 weights as bf16 (exact by truncation)
__device__ __forceinline__ tc_short4 tc_a4(uint32_t w) {
    float f[4];
    fp8x4_to_f32(w, f);
    tc_short4 a;
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = (short)(__float_as_uint(f[i]) >> 16);
    return a;
}

// acc[p][0][q] += the products over columns [k_lo, k_hi): rows 4·(lane / 16) + q of m-fragment p,
// token lane % 16 (xrow[0]: this lane's token, nullptr: none).
template <int NP, int NT>
__device__ __forceinline__ void tc_gemm(const TcRows<NP>& o, const float* const* xrow, int K, int k_lo, int k_hi, int bn, int bk, float (*acc)[TC_NT_MAX][4]) {
    const int lane = threadIdx.x % WARP, r = lane % 16, qg = lane / 16;
    const int kb = (K + bk - 1) / bk;
    uint4 w[NP], wn[NP];
    float4 xv[4], xn[4];
    auto load = [&](int k0, uint4* wd, float4* xd) {
#pragma unroll
        for (int p = 0; p < NP; ++p) wd[p] = *(const uint4*)(o.W[p] + (int64_t)r * K + k0 + 16 * qg);
#pragma unroll
        for (int j = 0; j < 4; ++j) xd[j] = xrow[0] ? *(const float4*)(xrow[0] + k0 + 16 * qg + 4 * j) : make_float4(0.f, 0.f, 0.f, 0.f);
    };
    if (k_lo >= k_hi) return;
    load(k_lo, w, xv);
    for (int k0 = k_lo; k0 < k_hi; k0 += 64) {
        if (k0 + 64 < k_hi) load(k0 + 64, wn, xn);
        tc_float4 part[NP];
#pragma unroll
        for (int p = 0; p < NP; ++p) part[p] = tc_float4{0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            uint16_t h[4], l[4];
            bf16_split(xv[j].x, &h[0], &l[0]);
            bf16_split(xv[j].y, &h[1], &l[1]);
            bf16_split(xv[j].z, &h[2], &l[2]);
            bf16_split(xv[j].w, &h[3], &l[3]);
            tc_short4 bh = {(short)h[0], (short)h[1], (short)h[2], (short)h[3]}, bl = {(short)l[0], (short)l[1], (short)l[2], (short)l[3]};
#pragma unroll
            for (int p = 0; p < NP; ++p) {
                tc_short4 a = tc_a4(u4_word(w[p], j));
                part[p] = __builtin_amdgcn_mfma_f32_16x16x16bf16_1k(a, bh, part[p], 0, 0, 0);
                part[p] = __builtin_amdgcn_mfma_f32_16x16x16bf16_1k(a, bl, part[p], 0, 0, 0);
            }
        }
        const int kbi = k0 / bk;
#pragma unroll
        for (int p = 0; p < NP; ++p)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[p][0][q] += part[p][q] * o.S[p][((o.row0[p] + 4 * qg + q) / bn) * kb + kbi];
#pragma unroll
        for (int p = 0; p < NP; ++p) w[p] = wn[p];
#pragma unroll
        for (int j = 0; j < 4; ++j) xv[j] = xn[j];
    }
}
#endif

#ifdef TC_MMA
// The tile's token rows for this lane's B fragments.
template <int NT>
__device__ __forceinline__ void tc_xrows(const float* x, const int32_t* tok, int start, int c, int K, const float** xrow) {
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        int tt = tc_btok(n);
        xrow[n] = tt < c ? x + (int64_t)(tok ? tok[start + tt] : start + tt) * K : nullptr;
    }
}

// Runs TILE<NT> with the fewest n-fragments that hold the tile's c tokens.
#define TC_DISPATCH(TILE, ...)                    \
    do {                                          \
        if (TC_NT_MAX == 1 || c <= TC_NTOK)       \
            TILE<1>(__VA_ARGS__);                 \
        else                                      \
            TILE<TC_NT_MAX>(__VA_ARGS__);         \
    } while (0)
#endif

