// y = x · Wᵀ for decode-sized x (a few rows) and FP8 W on the tensor cores (NVIDIA sm_80+), through
// the swap-AB product of tc_swap.h: W's rows are the MMA's M side, x's rows (≤ 16 per block) its
// N side, so W streams at full width with 16-byte loads and no shared memory. Grid (token tiles,
// N / 128, splits): the token tiles of one group of rows are neighbours in launch order, so a
// second tile's read of the same weights tends to hit L2. Split-K writes partial sums to
// part[split] (linear_mma.hip's linear_split_sum adds them in a fixed order: deterministic).
// Needs K % 64 == 0, bk % 64 == 0, N % 32 == 0 (the host checks). Elsewhere (no mma.sync) the
// same sums come from scalar loops, so the module builds for every target (the ROCm backend does
// not select it).
#include "tc_swap.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// each warp 32 output rows (two m-fragments sharing the tokens)
template <int NT>
__device__ void linear_tc_tile(const float* x, const uint8_t* W, const float* S, float* y, int m0, int c, int N, int K, int bn, int bk, int k_lo, int k_hi) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4, w = threadIdx.x / 32;
    const int n0 = (blockIdx.y * 4 + w) * 32;
    if (n0 >= N) return;
    TcRows<2> o = {{W + (int64_t)n0 * K, W + (int64_t)(n0 + 16) * K}, {S, S}, {n0, n0 + 16}};
    const float* xrow[2];
    tc_xrows<NT>(x, nullptr, m0, c, K, xrow);
    float acc[2][2][4] = {};
    tc_gemm<2, NT>(o, xrow, K, k_lo, k_hi, bn, bk, acc);
#pragma unroll
    for (int p = 0; p < 2; ++p)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                int tt = n * 8 + 2 * t + (q & 1), row = n0 + 16 * p + g + (q >= 2 ? 8 : 0);
                if (tt < c) y[(int64_t)(m0 + tt) * N + row] = acc[p][n][q];
            }
}
#endif

// y (or part + split·M·N when split-K) [M, N] = x [M, K] · W [N, K]ᵀ over K range blockIdx.z · ksplit ..
extern "C" __global__ void __launch_bounds__(128) linear_tc_fp8w(const float* x, const uint8_t* W, const float* S, float* y, int M, int N, int K, int bn,
                                                                int bk, int ksplit) {
    const int m0 = blockIdx.x * TC_T, c = min(TC_T, M - m0);
    const int k_lo = blockIdx.z * ksplit, k_hi = min(K, k_lo + ksplit);
    float* out = y + (int64_t)blockIdx.z * M * N;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if (c <= 8) linear_tc_tile<1>(x, W, S, out, m0, c, N, K, bn, bk, k_lo, k_hi);
    else linear_tc_tile<2>(x, W, S, out, m0, c, N, K, bn, bk, k_lo, k_hi);
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
