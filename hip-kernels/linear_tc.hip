// y = x · Wᵀ for decode-sized x (a few rows) and FP8 W on the matrix units (NVIDIA sm_80+, CDNA
// gfx942/gfx950), through
// the swap-AB product of tc_swap.h: W's rows are the MMA's M side, x's rows (≤ 16 per block) its
// N side, so W streams at full width with 16-byte loads and no shared memory. Grid (token tiles,
// N / 128, splits): the token tiles of one group of rows are neighbours in launch order, so a
// second tile's read of the same weights tends to hit L2. Split-K writes partial sums to
// part[split] (linear_mma.hip's linear_split_sum adds them in a fixed order: deterministic).
// Needs K % 64 == 0, bk % 64 == 0, N % 16 == 0 (the host checks). Other targets compute the same
// sums with scalar loops, so the module builds everywhere (the host selects it only where
// tc_swap.h has a matrix-unit form).
#include "tc_swap.h"

#ifdef TC_MMA
// a block 128 output rows, each warp 128 / TC_WAVES of them (m-fragments sharing the tokens)
template <int NT>
__device__ void linear_tc_tile(const float* x, const uint8_t* W, const float* S, float* y, int m0, int c, int N, int K, int bn, int bk, int k_lo, int k_hi) {
    constexpr int MF = 128 / TC_WAVES / 16;
    const int n0 = (blockIdx.y * TC_WAVES + threadIdx.x / WARP) * 16 * MF;
    if (n0 >= N) return;
    TcRows<MF> o;
#pragma unroll
    for (int f = 0; f < MF; ++f) {
        o.W[f] = W + (int64_t)(n0 + 16 * f) * K;
        o.S[f] = S;
        o.row0[f] = n0 + 16 * f;
    }
    const float* xrow[TC_NT_MAX];
    tc_xrows<NT>(x, nullptr, m0, c, K, xrow);
    float acc[MF][TC_NT_MAX][4] = {};
    tc_gemm<MF, NT>(o, xrow, K, k_lo, k_hi, bn, bk, acc);
#pragma unroll
    for (int f = 0; f < MF; ++f)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                int tt = tc_tok(n, q), row = n0 + 16 * f + tc_row(q);
                if (tt < c && row < N) y[(int64_t)(m0 + tt) * N + row] = acc[f][n][q];
            }
}
#endif

// y (or part + split·M·N when split-K) [M, N] = x [M, K] · W [N, K]ᵀ over K range blockIdx.z · ksplit ..
extern "C" __global__ void __launch_bounds__(128) linear_tc_fp8w(const float* x, const uint8_t* W, const float* S, float* y, int M, int N, int K, int bn,
                                                                int bk, int ksplit) { ENGINE_GRID_DEP();
    const int m0 = blockIdx.x * TC_T, c = min(TC_T, M - m0);
    const int k_lo = blockIdx.z * ksplit, k_hi = min(K, k_lo + ksplit);
    float* out = y + (int64_t)blockIdx.z * M * N;
#ifdef TC_MMA
    TC_DISPATCH(linear_tc_tile, x, W, S, out, m0, c, N, K, bn, bk, k_lo, k_hi);
#else
    // scalar: each of the block's 128 threads one of its 128 output rows, every token of the tile
    int n = blockIdx.y * 128 + threadIdx.x;
    if (n >= N) return;
    int kb = (K + bk - 1) / bk;
    for (int tt = 0; tt < c; ++tt) {
        const float* xt = x + (int64_t)(m0 + tt) * K;
        float a = 0.f;
        for (int k = k_lo; k < k_hi; ++k) a += fp8e4m3_to_f32(W[(int64_t)n * K + k]) * S[(n / bn) * kb + k / bk] * xt[k];
        out[(int64_t)(m0 + tt) * N + n] = a;
    }
#endif
}
