// y[M, N] = x[M, K] · W[N, K]ᵀ on the matrix units. One tile logic for every vendor: a block owns a
// 64×64 output tile and walks K in steps of 32, staging x (f32 → bf16) and W (f32 / bf16 / FP8 with
// 128×128 block scales, dequantised → bf16) in shared memory; four warps (NVIDIA) or wavefronts
// (CDNA) each own a 32×32 quarter. Only the warp-level product differs:
//   - NVIDIA sm_80+: mma.sync m16n8k16 bf16 (2×4 fragments per warp per 16 of K),
//   - CDNA gfx942 / gfx950: MFMA 32x32x8 bf16 (one per wave per 8 of K),
//   - anything else: the portable product, scalar FMAs over the same shared tiles.
// bf16 operands with f32 accumulation: results differ from the f32 path by bf16 rounding.
// Launch: grid (ceil(N/64), ceil(M/64)), block 4 × ENGINE_WARP_SIZE threads.
#include "common.h"

#define MMA_T 64
#define MMA_KS 32
#define MMA_KP (MMA_KS + 8) // padded shared row (bf16 elements): spreads the banks

__device__ __forceinline__ uint16_t f32_to_bf16_rne(float f) {
    uint32_t u = __float_as_uint(f);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#if defined(__AMDGCN__)
typedef short mma_short4 __attribute__((ext_vector_type(4)));
typedef float mma_float16 __attribute__((ext_vector_type(16)));
#endif

template <int WDT>
__device__ void linear_mma_impl(const float* __restrict__ X, const uint8_t* __restrict__ W, const float* __restrict__ S, float* __restrict__ Y,
                                int M, int N, int K, int bn, int bk) {
    __shared__ uint16_t xs[MMA_T][MMA_KP];
    __shared__ uint16_t ws[MMA_T][MMA_KP];
    const int m0 = blockIdx.y * MMA_T, n0 = blockIdx.x * MMA_T;
    const int kblocks = (K + bk - 1) / bk;
    const int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP;
    const int wm = (wid / 2) * 32, wn = (wid % 2) * 32; // this warp's quarter of the tile
#if defined(__AMDGCN__)
    mma_float16 acc;
#pragma unroll
    for (int i = 0; i < 16; ++i) acc[i] = 0.f;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.f;
#else
    // portable: each thread a 4×(32·32/(4·WARP)) strip of its warp's quarter
    const int per = 32 * 32 / WARP;
    float acc[32 * 32 / 32];
    for (int i = 0; i < per; ++i) acc[i] = 0.f;
#endif
    for (int k0 = 0; k0 < K; k0 += MMA_KS) {
        for (int i = threadIdx.x; i < MMA_T * MMA_KS; i += blockDim.x) {
            int r = i / MMA_KS, c = i % MMA_KS, gk = k0 + c;
            int gm = m0 + r, gn = n0 + r;
            xs[r][c] = f32_to_bf16_rne((gm < M && gk < K) ? X[(int64_t)gm * K + gk] : 0.f);
            ws[r][c] = f32_to_bf16_rne((gn < N && gk < K) ? load_w<WDT>(W, S, gn, gk, K, bn, bk, kblocks) : 0.f);
        }
        __syncthreads();
#if defined(__AMDGCN__)
        // MFMA 32x32x8: lane l gives A[l%32][4(l/32) .. +4] and B[4(l/32) .. +4][l%32]
#pragma unroll
        for (int kk = 0; kk < MMA_KS; kk += 8) {
            mma_short4 a, b;
            int kq = kk + 4 * (lane / 32);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                a[j] = (short)xs[wm + lane % 32][kq + j];
                b[j] = (short)ws[wn + lane % 32][kq + j];
            }
            acc = __builtin_amdgcn_mfma_f32_32x32x8bf16_1k(a, b, acc, 0, 0, 0);
        }
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
        // mma m16n8k16: group g = lane/4 and t = lane%4 hold A rows g, g+8 at k 2t, 2t+1 (+8),
        // B column g at k 2t, 2t+1 (+8); pairs of bf16 packed low-k first
        const int g = lane / 4, t = lane % 4;
#pragma unroll
        for (int kk = 0; kk < MMA_KS; kk += 16) {
            uint32_t a[2][4], b[4][2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
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
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    float* c = acc[i][j];
                    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                                 : "r"(a[i][0]), "r"(a[i][1]), "r"(a[i][2]), "r"(a[i][3]), "r"(b[j][0]), "r"(b[j][1]));
                }
        }
#else
        for (int e = 0; e < per; ++e) {
            int idx = lane + e * WARP, r = idx / 32, c = idx % 32;
            float s = 0.f;
            for (int kk = 0; kk < MMA_KS; ++kk) s += bf16_to_f32(xs[wm + r][kk]) * bf16_to_f32(ws[wn + c][kk]);
            acc[e] += s;
        }
#endif
        __syncthreads();
    }
#if defined(__AMDGCN__)
#pragma unroll
    for (int i = 0; i < 16; ++i) {
        int m = m0 + wm + 8 * (i / 4) + 4 * (lane / 32) + i % 4, n = n0 + wn + lane % 32;
        if (m < M && n < N) Y[(int64_t)m * N + n] = acc[i];
    }
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                int m = m0 + wm + 16 * i + g + 8 * (c / 2), n = n0 + wn + 8 * j + 2 * t + c % 2;
                if (m < M && n < N) Y[(int64_t)m * N + n] = acc[i][j][c];
            }
#else
    for (int e = 0; e < per; ++e) {
        int idx = lane + e * WARP, m = m0 + wm + idx / 32, n = n0 + wn + idx % 32;
        if (m < M && n < N) Y[(int64_t)m * N + n] = acc[e];
    }
#endif
}

extern "C" __global__ void linear_mma_f32w(const float* X, const uint8_t* W, const float* S, float* Y, int M, int N, int K, int bn, int bk) { linear_mma_impl<WDT_F32>(X, W, S, Y, M, N, K, bn, bk); }
extern "C" __global__ void linear_mma_bf16w(const float* X, const uint8_t* W, const float* S, float* Y, int M, int N, int K, int bn, int bk) { linear_mma_impl<WDT_BF16>(X, W, S, Y, M, N, K, bn, bk); }
extern "C" __global__ void linear_mma_fp8w(const float* X, const uint8_t* W, const float* S, float* Y, int M, int N, int K, int bn, int bk) { linear_mma_impl<WDT_FP8>(X, W, S, Y, M, N, K, bn, bk); }
