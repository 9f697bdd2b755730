// EXPERIMENT, not used by the engine (benches/gemv_variants.py compiles and times it against
// linear.hip's gemv1_fp8w; results in docs/BENCHMARKS.md, twenty-ninth session).
// y[N] = W[N, K] · x[K] for one row of x and block-scaled FP8 weights, its weights fed by bulk
// copies (sm_90): linear.hip's GEMV issues a warp's four 16-byte loads a lane and waits for them
// before the next step's, so an SM has at most its warps × 2 KB in flight, and only while every
// warp waits; a plain read of the same bytes reaches ~4 TB/s with 64 KB a SM always in flight.
//   - warp w of TW takes the contiguous rows [w·N/TW, (w+1)·N/TW) (6-7 rows for V3's o_proj on
//     132 SMs × 8 warps: no part-filled wave), in groups of four rows;
//   - a group's rows stream through a ring of TB_NS stages of its own (4 rows × TB_KC bytes, one
//     bulk copy a row, lanes 0-3 issuing them, completing on the stage's mbarrier), so that the
//     warp always has TB_NS stages' copies in flight and never waits on a block barrier;
//   - the stage is read back as linear.hip's step: lane l takes 16 FP8 weights at 512·j + 16·l of
//     each of the four rows, x's 16 values once for the four, and its scale block's scale; the
//     warp re-issues the stage for its use TB_NS later as soon as it has read it.
#include "common.h"
#include "sm90.h"

template <int NS, int KC>
__device__ __forceinline__ void gemv_tb_impl(const float* __restrict__ x, const uint8_t* __restrict__ W, const float* __restrict__ S, float* __restrict__ y, int N, int K,
                                             int bn, int bk) {
#ifdef SM90_WGMMA
    extern __shared__ __align__(128) uint8_t tb_smem[];
    __shared__ __align__(8) uint64_t tb_bar[8][NS];
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32, nw = blockDim.x / 32;
    const int64_t gw = (int64_t)blockIdx.x * nw + w, tw = (int64_t)gridDim.x * nw;
    const int r0 = (int)(gw * N / tw), r1 = (int)((gw + 1) * N / tw);
    uint8_t* ring = tb_smem + (size_t)w * NS * 4 * KC;
    uint64_t* bar = tb_bar[w];
    if (lane < NS) sm90_bar_init(&bar[lane], 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    __syncwarp();
    const int ks = (K + KC - 1) / KC, groups = (r1 - r0 + 3) / 4, total = groups * ks, kb = (K + bk - 1) / bk;
    const BlockDiv kdiv(bk);
    auto issue = [&](int u) {
        const int row = r0 + 4 * (u / ks), k0 = (u % ks) * KC;
        const int nr = min(4, r1 - row), kc = min(KC, K - k0);
        uint64_t* b = &bar[u % NS];
        if (lane == 0) sm90_bar_expect(b, nr * kc);
        __syncwarp();
        if (lane < nr) sm90_bulk(ring + (u % NS) * 4 * KC + lane * KC, W + (int64_t)(row + lane) * K + k0, kc, b);
    };
    for (int u = 0; u < NS && u < total; ++u) issue(u);
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    int srow[4] = {0, 0, 0, 0};
    for (int u = 0; u < total; ++u) {
        const int kstep = u % ks, row = r0 + 4 * (u / ks), nr = min(4, r1 - row), k0 = kstep * KC;
        if (kstep == 0)
#pragma unroll
            for (int r = 0; r < 4; ++r) srow[r] = ((row + min(r, nr - 1)) / bn) * kb;
        sm90_bar_wait(&bar[u % NS], (u / NS) & 1);
        const uint8_t* st = ring + (u % NS) * 4 * KC;
#pragma unroll
        for (int j = 0; j < KC / 512; ++j) {
            const int kk = 512 * j + 16 * lane, k = k0 + kk;
            if (k < K) {
                float4 xv[4];
#pragma unroll
                for (int q = 0; q < 4; ++q) xv[q] = __ldg((const float4*)(x + k) + q);
                const int kbi = kdiv(k);
#pragma unroll
                for (int r = 0; r < 4; ++r)
                    if (r < nr) {
                        const uint4 c = *(const uint4*)(st + r * KC + kk);
                        float wv[16];
                        fp8x4_to_f32(c.x, wv);
                        fp8x4_to_f32(c.y, wv + 4);
                        fp8x4_to_f32(c.z, wv + 8);
                        fp8x4_to_f32(c.w, wv + 12);
                        float d = 0.f;
#pragma unroll
                        for (int q = 0; q < 4; ++q) d += wv[4 * q] * xv[q].x + wv[4 * q + 1] * xv[q].y + wv[4 * q + 2] * xv[q].z + wv[4 * q + 3] * xv[q].w;
                        acc[r] += d * __ldg(S + srow[r] + kbi);
                    }
            }
        }
        __syncwarp();
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); // the reads above before the copy that overwrites them
        if (u + NS < total) issue(u + NS);
        if (kstep == ks - 1) {
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[r] = warp_sum(acc[r]);
            if (lane < nr) y[row + lane] = lane == 0 ? acc[0] : lane == 1 ? acc[1] : lane == 2 ? acc[2] : acc[3];
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[r] = 0.f;
        }
    }
#else
    ENGINE_TRAP();
#endif
}

// (the harness's stream-K arguments part / cnt are unused)
#define GEMV_TB(NS, KC, MINB)                                                                                                        \
    extern "C" __global__ void __launch_bounds__(256, MINB) gemv_tb_fp8w_s##NS##_c##KC##_b##MINB(const float* x, const uint8_t* w,     \
                                                                                                const float* s, float* y, int n, int k, \
                                                                                                int bn, int bk, float* part, uint32_t* cnt) { \
        gemv_tb_impl<NS, KC>(x, w, s, y, n, k, bn, bk);                                                                              \
    }
GEMV_TB(8, 512, 1)
GEMV_TB(6, 512, 1)
GEMV_TB(4, 512, 2)
GEMV_TB(3, 512, 3)
GEMV_TB(4, 1024, 1)
GEMV_TB(2, 1024, 2)
