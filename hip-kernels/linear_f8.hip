// y = x · Wᵀ for decode-sized x (≤ 8 rows) with FP8 activations and FP8 weights on the matrix
// units (f8_swap.h; `--fp8-activations dynamic`): x arrives quantised per token and 128 channels
// (act_quant.hip: q [R, K] e4m3fn, scales sx [ceil(K/128), R]), W is the checkpoint's e4m3fn with
// 128 × 128 block scales S. Grid (1, ceil(N / 128), splits), block 128: 4 warps × 2 fragments × 16
// rows; split-K ranges of `ksplit` columns (multiples of 64) write partials to y + z·M·N for
// linear_mma.hip's fixed-order linear_split_sum. Needs K % 64 == 0, N % 16 == 0, bn == bk == 128
// (the host checks). Without the e4m3 MMA (before sm_89, CDNA) the module builds a scalar form of
// the same sums; the host selects this kernel only on sm_89+.
#include "f8_swap.h"

#define F8_FRAGS 2
#define F8_BLOCK_ROWS (4 * F8_FRAGS * 16)

extern "C" __global__ void __launch_bounds__(128) linear_f8_fp8w(const uint8_t* __restrict__ q, const float* __restrict__ sx, int R, const uint8_t* __restrict__ W,
                                                                const float* __restrict__ S, float* y, int M, int N, int K, int ksplit) { ENGINE_GRID_DEP();
    const int k_lo = blockIdx.z * ksplit, k_hi = min(K, k_lo + ksplit), kb = (K + 127) / 128;
    float* out = y + (int64_t)blockIdx.z * M * N;
#ifdef F8_MMA
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int n0 = (blockIdx.y * 4 + threadIdx.x / 32) * 16 * F8_FRAGS;
    if (n0 >= N) return;
    F8Operands<F8_FRAGS, 1> o;
#pragma unroll
    for (int f = 0; f < F8_FRAGS; ++f) {
        // fragments past N (N % 32 == 16) read fragment 0's rows and drop their sums
        f8_set_rows(o, f, W, S, n0 + 16 * f < N ? n0 + 16 * f : n0, K, kb);
    }
    o.x[0] = g < M ? q + (int64_t)g * K + 16 * t : nullptr;
    o.xs = sx;
    o.xs_stride = R;
    o.xc[0][0] = 2 * t < M ? 2 * t : -1;
    o.xc[0][1] = 2 * t + 1 < M ? 2 * t + 1 : -1;
    float acc[F8_FRAGS][1][4] = {};
    f8_gemm<F8_FRAGS, 1>(o, k_lo, k_hi, acc);
#pragma unroll
    for (int f = 0; f < F8_FRAGS; ++f) {
        if (n0 + 16 * f >= N) continue;
        const int r = n0 + 16 * f + g;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            if (o.xc[0][i] < 0) continue;
            out[(int64_t)o.xc[0][i] * N + r] = acc[f][0][i];
            out[(int64_t)o.xc[0][i] * N + r + 8] = acc[f][0][2 + i];
        }
    }
#else
    // scalar: each thread one of the block's output rows, every token
    int n = blockIdx.y * F8_BLOCK_ROWS + threadIdx.x;
    if (n >= N) return;
    for (int m = 0; m < M; ++m) out[(int64_t)m * N + n] = f8_dot_scalar(W, S, kb, n, q + (int64_t)m * K, sx, R, m, K, k_lo, k_hi);
#endif
}
