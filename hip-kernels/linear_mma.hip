// Dense GEMM on the matrix units: Y[M, N] = X[M, K] · W[N, K]ᵀ, one 128×128 tile per block
// (mma_tile.h), split over K in `gridDim.z` ranges of `ksplit` columns when M × N has too few tiles
// to fill the GPU (decode batches, narrow projections). With splits, block z writes its partial to
// Y + z·M·N (a workspace) and linear_split_sum adds them in a fixed order: deterministic results.
// Launch: grid (ceil(N/128), ceil(M/128), splits), block 256. `vec`: K % 16 == 0 (and bk % 16 == 0
// for FP8), so every operand chunk takes a 16-byte load.
#include "mma_tile.h"

template <int WDT>
__device__ void linear_mma_impl(const float* X, const uint8_t* W, const float* S, float* Y, int M, int N, int K, int bn, int bk, int ksplit, int vec) {
    __shared__ MmaShared sh;
    MtOperands o = {X, nullptr, (int)blockIdx.y * MT_M, M, W, S, N, (int)blockIdx.x * MT_N, K, bn, bk};
    int kbeg = blockIdx.z * ksplit, kend = min(K, kbeg + ksplit);
    MmaAcc acc;
    mt_zero(acc);
    mt_run<WDT>(sh, acc, o, kbeg, kend, vec != 0);
    float* out = Y + (int64_t)blockIdx.z * M * N;
    mt_each(acc, [&](int r, int c, float v) {
        int m = o.m0 + r, n = o.n0 + c;
        if (m < M && n < N) out[(int64_t)m * N + n] = v;
    });
}

extern "C" __global__ void __launch_bounds__(MT_THREADS) linear_mma_f32w(const float* X, const uint8_t* W, const float* S, float* Y, int M, int N, int K, int bn, int bk, int ksplit, int vec) { ENGINE_GRID_DEP(); linear_mma_impl<WDT_F32>(X, W, S, Y, M, N, K, bn, bk, ksplit, vec); }
extern "C" __global__ void __launch_bounds__(MT_THREADS) linear_mma_bf16w(const float* X, const uint8_t* W, const float* S, float* Y, int M, int N, int K, int bn, int bk, int ksplit, int vec) { ENGINE_GRID_DEP(); linear_mma_impl<WDT_BF16>(X, W, S, Y, M, N, K, bn, bk, ksplit, vec); }
extern "C" __global__ void __launch_bounds__(MT_THREADS) linear_mma_fp8w(const float* X, const uint8_t* W, const float* S, float* Y, int M, int N, int K, int bn, int bk, int ksplit, int vec) { ENGINE_GRID_DEP(); linear_mma_impl<WDT_FP8>(X, W, S, Y, M, N, K, bn, bk, ksplit, vec); }

// Per-head GEMMs (MLA's absorbed projections around the decode attention): for head z = blockIdx.z,
//   Y[m, z·yh + n] = Σ_k X[m, z·xh + k] · W[z·wh + w0 + n, k]     (m < M, n < N, k < K)
// with X rows `ldx` floats apart, Y rows `ldy` apart, and W a [rows, K] weight whose FP8 block scales
// count its rows from the first (a head's rows need not start a scale block). No split K: the heads
// fill the GPU. Launch: grid (ceil(N/128), ceil(M/128), heads), block 256; `vec` as above, plus
// X rows and head offsets of a multiple of 4 floats.
// `_fold_fp8w`: for weights whose every tile lies inside one row of scale blocks (the host checks:
// 128-row multiples for wh, w0 and bn — DeepSeek's kv_b and its transposed W_UK), so the scales
// fold into X and the split-weight path is left out: two blocks an SM on NVIDIA instead of one
// (166 registers with the split path; a decode step's heads run few K steps, so a second block
// hides one's loads and epilogue behind the other's products). (bf16 weights never take the split
// path; bounded to two blocks an SM they spilled on sm_80, so they keep the compiler's choice.)
template <int WDT, bool SPLIT>
__device__ void linear_mma_heads_impl(const float* X, int64_t ldx, int xh, const uint8_t* W, const float* S, int wh, int w0, float* Y, int64_t ldy, int yh,
                                      int M, int N, int K, int bn, int bk, int vec) {
    __shared__ MmaShared sh;
    int z = blockIdx.z, wr = z * wh + w0, nt = (int)blockIdx.x * MT_N;
    MtOperands o = {X + (int64_t)z * xh, nullptr, (int)blockIdx.y * MT_M, M, W, S, wr + N, wr + nt, K, bn, bk, ldx};
    MmaAcc acc;
    mt_zero(acc);
    mt_run<WDT, SPLIT>(sh, acc, o, 0, K, vec != 0);
    float* out = Y + (int64_t)z * yh;
    mt_each(acc, [&](int r, int c, float v) {
        int m = o.m0 + r, n = nt + c;
        if (m < M && n < N) out[(int64_t)m * ldy + n] = v;
    });
}

#define LINEAR_MMA_HEADS(SUF, WDT, SPLIT, ...)                                                                                          \
    extern "C" __global__ void __launch_bounds__(__VA_ARGS__) linear_mma_heads_##SUF(const float* X, int64_t ldx, int xh, const uint8_t* W, \
                                                                                     const float* S, int wh, int w0, float* Y, int64_t ldy,  \
                                                                                     int yh, int M, int N, int K, int bn, int bk, int vec) { \
        ENGINE_GRID_DEP();                                                                                                                  \
        linear_mma_heads_impl<WDT, SPLIT>(X, ldx, xh, W, S, wh, w0, Y, ldy, yh, M, N, K, bn, bk, vec);                                      \
    }
LINEAR_MMA_HEADS(f32w, WDT_F32, true, MT_THREADS)
LINEAR_MMA_HEADS(bf16w, WDT_BF16, false, MT_THREADS)
LINEAR_MMA_HEADS(fp8w, WDT_FP8, true, MT_THREADS)
LINEAR_MMA_HEADS(fold_fp8w, WDT_FP8, false, MT_THREADS, MT_MIN_BLOCKS)

// Y[i] = Σ_z part[z][i] over the split-K partials, z in order.
extern "C" __global__ void linear_split_sum(const float* part, float* Y, int64_t n, int splits) { ENGINE_GRID_DEP();
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float s = 0.f;
    for (int z = 0; z < splits; ++z) s += part[z * n + i];
    Y[i] = s;
}
