// MoE experts for decode-sized batches with FP8 activations (`--fp8-activations dynamic`): the
// staged form of moe_f8.hip's FP8 × FP8 swap-AB kernels (same tiles of ≤ 16 positions of one
// expert from moe_group, same operands and outputs). moe_f8.hip's warps load their own weight
// rows 64 bytes a row at a time into registers, one chunk ahead (~2.3 TB/s at batch 256 on the
// H200, with L2 at 75% of its throughput: the requests are half lines); here a block's 128 weight
// rows go to shared memory by cp.async, a whole 128-byte line of each row a request (8 lanes a
// row), MS_ST stages of 128 columns in flight, and the tile's tokens (and their scales) are copied
// once a stage for the four warps instead of by each. A stage is 128 weight rows × 128 bytes, 16
// token rows × 128 bytes, 16 token scales and 2 weight scales; the 16-byte chunk c of row r lies
// at c ^ 4·(r & 1), so that a quarter warp's fragment loads (rows g, g + 1 at the same chunks)
// fall on all 32 banks. Per stage a warp multiplies two 16-row fragments by the tile's tokens
// (mma.m16n8k32 e4m3, K permuted inside each 64 columns as f8_swap.h does: lane t holds bytes
// [16t, 16t + 16) of a row's 64) and promotes the stage's products once, scaled by the weight
// block's scale and each token's (DeepSeek's promotion every 128).
//   gate/up: a block 64 rows of gate (stage rows 0-63) and the same rows of up (64-127); warp w
//            fragments rows 16w (gate) and 64 + 16w (up); h[pos] = silu(g) · u, f32.
//   down:    a block 128 output rows, warp w fragments 32w and 32w + 16; out[tok] += weight · d
//            (atomics, as moe_f8.hip).
//   linear:  the down form's 128 rows of a dense FP8 layer over a 16-token tile of a decode batch,
//            split over K (linear_f8s_fp8w, at the end).
// Needs H % 128 == 0 and I % 128 == 0 and 128 × 128 weight blocks (the host checks). NVIDIA
// sm_89+ only (F8_MMA); other targets compile a trap the host never selects.
// Launch: block 128, dynamic shared memory MS_SMEM (moe_grouped.rs mirrors it); gate/up grid
// (I / 64, max_tiles), down grid (H / 128, max_tiles).
#include "bf16.h"
#include "f8_swap.h"

#define MS_BK 128  // K a stage (one scale block)
#define MS_ROWS 128 // weight rows a stage
#define MS_TOK 16  // positions a tile (MoE)
#define ML_TOK 32  // tokens a tile (linear)
#define MS_ST 4    // stages
#define MS_X (MS_ROWS * MS_BK)             // the tokens' rows
#define MS_SX(TOK) (MS_X + (TOK) * MS_BK)    // their scales
#define MS_SW(TOK) (MS_SX(TOK) + (TOK) * 4)  // the two weight scales
#define MS_STAGE(TOK) ((MS_SW(TOK) + 8 + 127) / 128 * 128)
#define MS_SMEM (MS_ST * MS_STAGE(MS_TOK))
#define ML_SMEM (MS_ST * MS_STAGE(ML_TOK))

#ifdef F8_MMA
// Where a stage's operands come from: weight row r (0-127) at its column 0, token row tt at its
// column 0 (nullptr past the tile), that token's scale for K block kb, the two weight scales.
struct MsSrc {
    const uint8_t* w[2]; // rows 0-63 and 64-127 (gate/up) or all 128 from w[0] (down, linear)
    int64_t ld;          // bytes a weight row (K)
    bool split;          // gate/up: rows 64+ from w[1]
    int rows;            // weight rows that exist from w[0] (linear: N - n0); later ones read the last
    const uint8_t* x;    // token rows: x + xrow(tt) · ld
    const int32_t* xrow; // the tile's token rows (gate/up: token ids; down: positions)
    int xrow_plus;       // (down: position = xrow_plus + tt, xrow unused)
    int cnt;             // tokens in the tile
    const float* xs;     // token scales: xs[kb · xs_stride + row]
    int xs_stride;
    const float* sw[2];  // the two weight scales of K block kb: sw[i][kb]
};

__device__ __forceinline__ int ms_xrow(const MsSrc& s, int tt) { return s.xrow ? s.xrow[tt] : s.xrow_plus + tt; }

// Stage kb of `s` (tiles of TOK tokens) into `st` by cp.async (this thread's share), closed as one group.
template <int TOK>
__device__ __forceinline__ void ms_issue(uint8_t* st, const MsSrc& s, int kb) {
    const int c = threadIdx.x % 8, r0 = threadIdx.x / 8;
#pragma unroll
    for (int m = 0; m < MS_ROWS / 16; ++m) {
        const int r = r0 + 16 * m;
        const uint8_t* row = s.split && r >= 64 ? s.w[1] + (int64_t)(r - 64) * s.ld : s.w[0] + (int64_t)min(r, s.rows - 1) * s.ld;
        cp_async16(st + r * MS_BK + ((c ^ ((r & 1) << 2)) << 4), row + kb * MS_BK + 16 * c);
    }
#pragma unroll
    for (int j = 0; j < TOK / 16; ++j) { // rows of 8 chunks: one a thread per 16 rows
        const int tt = r0 + 16 * j;
        const bool live = tt < s.cnt;
        const uint8_t* src = s.x + (live ? (int64_t)ms_xrow(s, tt) * s.ld : 0) + kb * MS_BK + 16 * c;
        const unsigned d = (unsigned)__cvta_generic_to_shared(st + MS_X + tt * MS_BK + ((c ^ ((tt & 1) << 2)) << 4));
        cp_async16_fill(d, src, live ? 16 : 0);
    }
    if (threadIdx.x < TOK + 2) {
        const int i = threadIdx.x;
        const float* src;
        bool live = true;
        if (i < TOK) {
            live = i < s.cnt;
            src = s.xs + (int64_t)kb * s.xs_stride + (live ? ms_xrow(s, i) : 0);
        } else {
            src = (i == TOK ? s.sw[0] : s.sw[1]) + kb;
        }
        const unsigned d = (unsigned)__cvta_generic_to_shared(st + (i < TOK ? MS_SX(TOK) + 4 * i : MS_SW(TOK) + 4 * (i - TOK)));
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(live ? 4 : 0));
    }
    cp_async_commit();
}

// acc += one stage's products: fragment f's 16 rows from stage row rf[f] (even), weight scale
// sw[f]; the lane's rows g, g + 8 × tokens 2t, 2t + 1 of n-fragment n (as f8_gemm's).
template <int TOK, int NT>
__device__ __forceinline__ void ms_mma(const uint8_t* st, const int (&rf)[2], float (&acc)[2][NT][4]) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4, sz = (g & 1) << 2;
    const float* sx = (const float*)(st + MS_SX(TOK));
    const float* sw = (const float*)(st + MS_SW(TOK));
    float part[2][NT][4];
#pragma unroll
    for (int f = 0; f < 2; ++f)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int q = 0; q < 4; ++q) part[f][n][q] = 0.f;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const int ch = ((4 * j + t) ^ sz) << 4; // rows g, g + 8 and tokens 8n + g share the parity of g
        uint4 a[2][2], b[NT];
#pragma unroll
        for (int f = 0; f < 2; ++f) {
            a[f][0] = *(const uint4*)(st + (rf[f] + g) * MS_BK + ch);
            a[f][1] = *(const uint4*)(st + (rf[f] + g + 8) * MS_BK + ch);
        }
#pragma unroll
        for (int n = 0; n < NT; ++n) b[n] = *(const uint4*)(st + MS_X + (8 * n + g) * MS_BK + ch);
#pragma unroll
        for (int kk = 0; kk < 2; ++kk)
#pragma unroll
            for (int f = 0; f < 2; ++f) {
                const uint32_t av[4] = {u4_word(a[f][0], 2 * kk), u4_word(a[f][1], 2 * kk), u4_word(a[f][0], 2 * kk + 1), u4_word(a[f][1], 2 * kk + 1)};
#pragma unroll
                for (int n = 0; n < NT; ++n) mma_e4m3_16832(part[f][n], av, u4_word(b[n], 2 * kk), u4_word(b[n], 2 * kk + 1));
            }
    }
#pragma unroll
    for (int f = 0; f < 2; ++f)
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            const float s0 = sw[f] * sx[8 * n + 2 * t], s1 = sw[f] * sx[8 * n + 2 * t + 1];
            acc[f][n][0] += part[f][n][0] * s0;
            acc[f][n][1] += part[f][n][1] * s1;
            acc[f][n][2] += part[f][n][2] * s0;
            acc[f][n][3] += part[f][n][3] * s1;
        }
}

// The whole K of `s` through the MS_ST-stage ring: acc = Σ over K blocks of the promoted products.
template <int TOK, int NT>
__device__ __forceinline__ void ms_run(uint8_t* smem, const MsSrc& s, int kbs, const int (&rf)[2], float (&acc)[2][NT][4]) {
#pragma unroll
    for (int f = 0; f < 2; ++f)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[f][n][q] = 0.f;
#pragma unroll
    for (int p = 0; p < MS_ST - 1; ++p) {
        if (p < kbs) ms_issue<TOK>(smem + p * MS_STAGE(TOK), s, p);
        else cp_async_commit(); // (empty groups keep the count)
    }
    for (int kb = 0; kb < kbs; ++kb) {
        cp_async_wait<MS_ST - 2>(); // this thread's copies of stage kb have landed
        __syncthreads();            // everyone's; and every warp is done with stage kb - 1's buffer
        const int nx = kb + MS_ST - 1;
        if (nx < kbs) ms_issue<TOK>(smem + (nx % MS_ST) * MS_STAGE(TOK), s, nx);
        else cp_async_commit();
        ms_mma<TOK, NT>(smem + (kb % MS_ST) * MS_STAGE(TOK), rf, acc);
    }
    cp_async_wait<0>();
}

// gate/up: stage rows 0-63 of gate and 64-127 of up from row i0; h[pos] = silu(g) · u.
template <int NT>
__device__ __forceinline__ void ms_gate_up(uint8_t* smem, const MsSrc& s, int kbs, int i0, int start, int cnt, float* h, int I) {
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int rf[2] = {16 * w, 64 + 16 * w};
    float acc[2][NT][4];
    ms_run<MS_TOK, NT>(smem, s, kbs, rf, acc);
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int q4 = 0; q4 < 4; ++q4) {
            const int tt = 8 * n + 2 * t + (q4 & 1), row = i0 + 16 * w + g + (q4 >= 2 ? 8 : 0);
            const float gv = acc[0][n][q4], uv = acc[1][n][q4];
            if (tt < cnt) h[(int64_t)(start + tt) * I + row] = silu_mul1(gv, uv);
        }
}

// down: stage rows 0-127 from output row n0; out[token] += weight · d.
template <int NT>
__device__ __forceinline__ void ms_down(uint8_t* smem, const MsSrc& s, int kbs, int n0, int start, int cnt, const int32_t* pair_of, const float* weights, float* out,
                                        int top_k, int H) {
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int rf[2] = {32 * w, 32 * w + 16};
    float acc[2][NT][4];
    ms_run<MS_TOK, NT>(smem, s, kbs, rf, acc);
#pragma unroll
    for (int f = 0; f < 2; ++f)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int q4 = 0; q4 < 4; ++q4) {
                const int tt = 8 * n + 2 * t + (q4 & 1), row = n0 + rf[f] + g + (q4 >= 2 ? 8 : 0);
                if (tt < cnt) {
                    const int pr = pair_of[start + tt];
                    atomicAdd(&out[(int64_t)(pr / top_k) * H + row], weights[pr] * acc[f][n][q4]);
                }
            }
}

// linear: stage rows 0-127 from output row n0 (those past N read the last), tiles of ML_TOK
// tokens; y[t0 + tt][row] = acc.
template <int NT>
__device__ __forceinline__ void ms_linear(uint8_t* smem, const MsSrc& s, int kbs, int n0, int t0, float* y, int N) {
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int rf[2] = {32 * w, 32 * w + 16};
    float acc[2][NT][4];
    ms_run<ML_TOK, NT>(smem, s, kbs, rf, acc);
#pragma unroll
    for (int f = 0; f < 2; ++f)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int q4 = 0; q4 < 4; ++q4) {
                const int tt = 8 * n + 2 * t + (q4 & 1), row = n0 + rf[f] + g + (q4 >= 2 ? 8 : 0);
                if (tt < s.cnt && row < N) y[(int64_t)(t0 + tt) * N + row] = acc[f][n][q4];
            }
}
#endif

// Grid (I / 64, max_tiles), block 128, MS_SMEM bytes of dynamic shared memory.
extern "C" __global__ void __launch_bounds__(128, 3) moe_gate_up_f8s_fp8w(const uint8_t* q, const float* sx, int T, const int32_t* tok, const int32_t* tiles,
                                                                     const int32_t* ntiles, const uint8_t* wg, const float* sg, const uint8_t* wu,
                                                                     const float* su, float* h, int I, int H) { ENGINE_GRID_DEP();
#ifdef F8_MMA
    extern __shared__ __align__(128) uint8_t ms_smem[];
    if ((int)blockIdx.y >= *ntiles) return;
    const int e = tiles[3 * blockIdx.y], start = tiles[3 * blockIdx.y + 1], cnt = tiles[3 * blockIdx.y + 2] - start;
    const int i0 = blockIdx.x * 64, kbs = H / MS_BK;
    const int64_t wstride = (int64_t)I * H, sstride = (int64_t)(I / 128) * kbs;
    MsSrc s;
    s.w[0] = wg + e * wstride + (int64_t)i0 * H;
    s.w[1] = wu + e * wstride + (int64_t)i0 * H;
    s.ld = H;
    s.split = true;
    s.rows = 128;
    s.x = q;
    s.xrow = tok + start;
    s.xrow_plus = 0;
    s.cnt = cnt;
    s.xs = sx;
    s.xs_stride = T;
    s.sw[0] = sg + e * sstride + (int64_t)(i0 / 128) * kbs;
    s.sw[1] = su + e * sstride + (int64_t)(i0 / 128) * kbs;
    if (cnt <= 8)
        ms_gate_up<1>(ms_smem, s, kbs, i0, start, cnt, h, I);
    else
        ms_gate_up<2>(ms_smem, s, kbs, i0, start, cnt, h, I);
#else
    __builtin_trap(); // the host takes moe_f8.hip's kernels without the e4m3 MMA
#endif
}

// Grid (H / 128, max_tiles), block 128, MS_SMEM bytes of dynamic shared memory.
extern "C" __global__ void __launch_bounds__(128, 3) moe_down_f8s_fp8w(const uint8_t* qh, const float* sh, int P, const int32_t* pair_of, const float* weights,
                                                                  const int32_t* tiles, const int32_t* ntiles, const uint8_t* wd, const float* sd,
                                                                  float* out, int top_k, int I, int H) { ENGINE_GRID_DEP();
#ifdef F8_MMA
    extern __shared__ __align__(128) uint8_t ms_smem[];
    if ((int)blockIdx.y >= *ntiles) return;
    const int e = tiles[3 * blockIdx.y], start = tiles[3 * blockIdx.y + 1], cnt = tiles[3 * blockIdx.y + 2] - start;
    const int n0 = blockIdx.x * 128, kbs = I / MS_BK;
    const int64_t wstride = (int64_t)I * H, sstride = (int64_t)(H / 128) * kbs;
    MsSrc s;
    s.w[0] = wd + e * wstride + (int64_t)n0 * I;
    s.w[1] = s.w[0];
    s.ld = I;
    s.split = false;
    s.rows = 128;
    s.x = qh;
    s.xrow = nullptr;
    s.xrow_plus = start;
    s.cnt = cnt;
    s.xs = sh;
    s.xs_stride = P;
    s.sw[0] = sd + e * sstride + (int64_t)(n0 / 128) * kbs;
    s.sw[1] = s.sw[0];
    if (cnt <= 8)
        ms_down<1>(ms_smem, s, kbs, n0, start, cnt, pair_of, weights, out, top_k, H);
    else
        ms_down<2>(ms_smem, s, kbs, n0, start, cnt, pair_of, weights, out, top_k, H);
#else
    __builtin_trap(); // the host takes moe_f8.hip's kernels without the e4m3 MMA
#endif
}

// A dense linear layer y = quant(x) · Wᵀ of a decode batch on the same stages (linear_tc.rs),
// with tiles of ML_TOK tokens so that a block reads its weights once for up to 32 tokens: x
// quantised per token and 128 channels (q [R, K], sx [K / 128, R]; M ≤ R rows used), W [N, K]
// e4m3fn with 128 × 128 block scales S. Block (n-block x, token tile y) over K blocks
// [z · kps, z · kps + kps) of split z, which writes y + z · M · N (the host sums the splits in
// order). Grid (ceil(N / 128), ceil(M / ML_TOK), splits), block 128, ML_SMEM bytes of dynamic
// shared memory. Needs K % 128 == 0 and N % 16 == 0 (the host checks).
extern "C" __global__ void __launch_bounds__(128, 2) linear_f8s_fp8w(const uint8_t* q, const float* sx, int R, const uint8_t* W, const float* S, float* y, int M,
                                                                int N, int K, int kps) { ENGINE_GRID_DEP();
#ifdef F8_MMA
    extern __shared__ __align__(128) uint8_t ms_smem[];
    const int n0 = blockIdx.x * 128, t0 = blockIdx.y * ML_TOK, kbs = K / MS_BK;
    const int kb0 = blockIdx.z * kps, nk = min(kbs, kb0 + kps) - kb0;
    MsSrc s;
    s.w[0] = W + (int64_t)n0 * K + (int64_t)kb0 * MS_BK;
    s.w[1] = s.w[0];
    s.ld = K;
    s.split = false;
    s.rows = N - n0;
    s.x = q + (int64_t)kb0 * MS_BK;
    s.xrow = nullptr;
    s.xrow_plus = t0;
    s.cnt = min(ML_TOK, M - t0);
    s.xs = sx + (int64_t)kb0 * R;
    s.xs_stride = R;
    s.sw[0] = S + (int64_t)(n0 / 128) * kbs + kb0;
    s.sw[1] = s.sw[0];
    float* out = y + (int64_t)blockIdx.z * M * N;
    if (s.cnt <= 16)
        ms_linear<2>(ms_smem, s, nk, n0, t0, out, N);
    else
        ms_linear<4>(ms_smem, s, nk, n0, t0, out, N);
#else
    __builtin_trap(); // the host takes this kernel only with the e4m3 MMA
#endif
}
