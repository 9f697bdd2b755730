// y[M, N] = x[M, K] · W[N, K]ᵀ with W in f32, bf16 or block-scaled FP8, dequantised while it is
// staged in shared memory; float32 accumulation in K order (exact f32 products: the router, whose
// expert choice must match the f32 reference, and every layer without a matrix-unit path).
// A LT_BM × LT_BN output tile per block of 256 threads, 8 × 4 outputs per thread (three 16-byte
// shared loads a 32 FMAs), K in steps of LT_KT: the next step's x and W are loaded into registers
// while the current one is multiplied out of shared memory (two buffers, one barrier a step).
// x rows load as float4 where K % 4 == 0, element by element otherwise. Split K (the router's
// few output tiles): block z sums K [z · kc, (z + 1) · kc) into its own [M, N] of Y (kc a
// multiple of LT_KT), and the reader adds the parts in z order (moe_route); kc = K: no split.
#include "common.h"
#include "mla_kv_entry.h"
#include "rope.h"
#include "vec8.h"

#define LT_BM 128
#define LT_BN 64
#define LT_KT 16
#define LT_XP (LT_BM + 4) // shared row pitches (floats): 16-byte aligned rows
#define LT_WP (LT_BN + 4)

template <int WDT>
__device__ void linear_impl(const float* __restrict__ X, const uint8_t* __restrict__ W, const float* __restrict__ S, float* __restrict__ Y,
                            int M, int N, int K, int bn, int bk, int kc) {
    __shared__ __align__(16) float xs[2][LT_KT][LT_XP];
    __shared__ __align__(16) float ws[2][LT_KT][LT_WP];
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16; // outputs: rows ty·8 .., columns tx·4 ..
    const int m0 = blockIdx.y * LT_BM, n0 = blockIdx.x * LT_BN, kbeg = blockIdx.z * kc, kend = min(K, kbeg + kc);
    Y += (int64_t)blockIdx.z * M * N;
    const int kblocks = (K + bk - 1) / bk;
    const bool vec = K % 4 == 0;
    // staging: 4 k a thread (k 4·sc ..) of x rows sr and sr + 64 and of W row sr
    const int sr = tid / 4, sc = tid % 4;
    float xv[2][4], wv[4];
    auto load = [&](int k0) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int gm = m0 + sr + 64 * h, gk = k0 + 4 * sc;
            if (vec && gm < M && gk + 3 < kend) {
                const float4 v = *(const float4*)&X[(int64_t)gm * K + gk];
                xv[h][0] = v.x, xv[h][1] = v.y, xv[h][2] = v.z, xv[h][3] = v.w;
            } else {
#pragma unroll
                for (int j = 0; j < 4; ++j) xv[h][j] = (gm < M && gk + j < kend) ? X[(int64_t)gm * K + gk + j] : 0.f;
            }
        }
        const int gn = n0 + sr, gk = k0 + 4 * sc;
#pragma unroll
        for (int j = 0; j < 4; ++j) wv[j] = (gn < N && gk + j < kend) ? load_w<WDT>(W, S, gn, gk + j, K, bn, bk, kblocks) : 0.f;
    };
    auto store = [&](int b) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            xs[b][4 * sc + j][sr] = xv[0][j];
            xs[b][4 * sc + j][sr + 64] = xv[1][j];
            ws[b][4 * sc + j][sr] = wv[j];
        }
    };
    float acc[8][4];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    load(kbeg);
    store(0);
    __syncthreads();
    for (int k0 = kbeg, b = 0; k0 < kend; k0 += LT_KT, b ^= 1) {
        const bool more = k0 + LT_KT < kend;
        if (more) load(k0 + LT_KT); // in flight during the products below
#pragma unroll
        for (int kk = 0; kk < LT_KT; ++kk) {
            const float4 a0 = *(const float4*)&xs[b][kk][ty * 8], a1 = *(const float4*)&xs[b][kk][ty * 8 + 4];
            const float4 w4 = *(const float4*)&ws[b][kk][tx * 4];
            const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w}, w[4] = {w4.x, w4.y, w4.z, w4.w};
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * w[j];
        }
        if (more) store(b ^ 1); // the other buffer: free since the last barrier
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int m = m0 + ty * 8 + i;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int n = n0 + tx * 4 + j;
            if (n < N) Y[(int64_t)m * N + n] = acc[i][j];
        }
    }
}

// (256 threads: launch bounds let CDNA's compiler give each lane the registers of a 256-thread
// block instead of a 1024-thread one's, where the 8×4 tile spilled)
extern "C" __global__ void __launch_bounds__(256) linear_f32w(const float* X, const uint8_t* W, const float* S, float* Y, int M, int N, int K, int bn, int bk, int kc) { ENGINE_GRID_DEP(); linear_impl<WDT_F32>(X, W, S, Y, M, N, K, bn, bk, kc); }
extern "C" __global__ void __launch_bounds__(256) linear_bf16w(const float* X, const uint8_t* W, const float* S, float* Y, int M, int N, int K, int bn, int bk, int kc) { ENGINE_GRID_DEP(); linear_impl<WDT_BF16>(X, W, S, Y, M, N, K, bn, bk, kc); }
extern "C" __global__ void __launch_bounds__(256) linear_fp8w(const float* X, const uint8_t* W, const float* S, float* Y, int M, int N, int K, int bn, int bk, int kc) { ENGINE_GRID_DEP(); linear_impl<WDT_FP8>(X, W, S, Y, M, N, K, bn, bk, kc); }

// Decode path (M <= GEMV_MAX_M rows of x): one warp per output row, lanes striding along K so the
// weight row is read once, coalesced; every token's partial sum lives in registers. Memory-bound
// on the weights, as batch-1..8 decode is.
#define GEMV_MAX_M 8

template <int WDT>
__device__ void gemv_impl(const float* __restrict__ X, const uint8_t* __restrict__ W, const float* __restrict__ S, float* __restrict__ Y,
                          int M, int N, int K, int bn, int bk) {
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP, nw = blockDim.x / WARP;
    int n = blockIdx.x * nw + w;
    if (n >= N) return;
    int kblocks = (K + bk - 1) / bk;
    float acc[GEMV_MAX_M];
#pragma unroll
    for (int m = 0; m < GEMV_MAX_M; ++m) acc[m] = 0.f;
    for (int k = lane; k < K; k += WARP) {
        float wv = load_w<WDT>(W, S, n, k, K, bn, bk, kblocks);
#pragma unroll
        for (int m = 0; m < GEMV_MAX_M; ++m)
            if (m < M) acc[m] += wv * X[(int64_t)m * K + k];
    }
#pragma unroll
    for (int m = 0; m < GEMV_MAX_M; ++m) {
        if (m < M) {
            float v = warp_sum(acc[m]);
            if (lane == 0) Y[(int64_t)m * N + n] = v;
        }
    }
}

extern "C" __global__ void gemv_f32w(const float* X, const uint8_t* W, const float* S, float* Y, int M, int N, int K, int bn, int bk) { ENGINE_GRID_DEP(); gemv_impl<WDT_F32>(X, W, S, Y, M, N, K, bn, bk); }
extern "C" __global__ void gemv_bf16w(const float* X, const uint8_t* W, const float* S, float* Y, int M, int N, int K, int bn, int bk) { ENGINE_GRID_DEP(); gemv_impl<WDT_BF16>(X, W, S, Y, M, N, K, bn, bk); }
extern "C" __global__ void gemv_fp8w(const float* X, const uint8_t* W, const float* S, float* Y, int M, int N, int K, int bn, int bk) { ENGINE_GRID_DEP(); gemv_impl<WDT_FP8>(X, W, S, Y, M, N, K, bn, bk); }

// The same with 16 bytes of consecutive weights per lane per step (8 bf16 / 16 fp8; f32: 2×16
// bytes), R output rows per row group sharing each load of x (up to 8 rows R = 2: half the x
// traffic per weight byte, which bounds FP8 rows). A row group is read by `lanes` lanes (a power
// of two up to the warp: rows of K = 128, MLA's absorbed q, fill a 32-lane warp with four groups
// instead of leaving three quarters of it idle; 16 → 7 µs a layer on the H200) or, for layers
// with few output rows (kv_a: 576), by `split` whole warps (1, 2, 4 or 8) whose sums are added in
// a fixed order (deterministic). A block per `nw / split · WARP / lanes` row groups (one wave of
// register-heavy blocks with two steps' loads in flight a lane ran slower than these, 2.7-2.9
// TB/s on V3's layers against 2.8-3.2). Requires K % 8 == 0 and, for FP8,
// K % 16 == 0 and bk % 16 == 0 (the host checks).
//
// HEADS (MLA's absorbed projections at decode sizes, one GEMV per head): output n of the N =
// heads·nh is column j = n % nh of head h = n / nh, computed from W row h·wh + w0 + j (FP8 scales
// by that absolute row) and x row m at X + m·ldx + h·xh, written to Y[m·ldy + h·yh + j]; a group's
// R rows stay in one head (nh % R == 0; the host checks, and X's offsets keep 16-byte loads).
struct GemvHeads {
    int64_t ldx, ldy;
    int xh, nh, wh, w0, yh;
};

// Fusions of a neighbouring op (gemv_fused.rs on the host), each a template flag:
// PAIR: rows N1 .. N − 1 come from a second matrix of the same K, format and scale blocks (row
// n − N1 of W2, scales S2, written to Y2[m·(N − N1) + n − N1]; rows below N1 go to Y[m·N1 + n]):
// two linears of one x (MLA's q_a and kv_a) in one launch. N1 % R == 0, so a group stays in one
// matrix.
// NORM: x is RMS-normed on the fly: the products take G·x and each group also sums x² over the
// row, so that y = rsqrt(mean(x²) + eps) · Σ_k W·(G·x) (the norm's scale factors out of the
// dot): MLA's q_a_layernorm folded into q_b. With `pos` (not null), interleaved RoPE on the
// outputs too (rope.h; row m at position pos[m]): output columns n, n + 1 (n even) that lie in a
// head's rope columns [off, off + 2·half) of each hs-wide head are a rotary pair, both in one row
// group (R even, hs and off even; the host checks): q_b's query RoPE in its epilogue.
struct GemvFuse {
    const uint8_t* w2;
    const float* s2;
    float* y2;
    int n1;
    const float* g;
    float eps;
    const uint32_t* pos;
    const float* inv_freq;
    int hs, off, half;
    float scale;
};

// The rotary pair (y0, y1) of output columns n, n + 1 of row m, where they are rope columns.
__device__ __forceinline__ void gemv_rope_pair(float& y0, float& y1, int n, int m, const GemvFuse& fz) {
    const int j = n % fz.hs - fz.off;
    if (j < 0 || j >= 2 * fz.half) return;
    float seg[2] = {y0, y1};
    rope_pair(seg, 0, 1, 1, fz.inv_freq[j / 2], (float)fz.pos[m], fz.scale);
    y0 = seg[0], y1 = seg[1];
}

template <int WDT, int MAXM, int R, bool HEADS, bool PAIR = false, bool NORM = false>
__device__ void gemv8_impl(const float* __restrict__ X, const uint8_t* __restrict__ W, const float* __restrict__ S, float* __restrict__ Y,
                           int M, int N, int K, int bn, int bk, int split, int lanes, GemvHeads hd, GemvFuse fz = {}) {
    __shared__ float red[8][R][MAXM];
    __shared__ float red_ss[NORM ? 8 : 1][MAXM];
    const int lane = threadIdx.x % WARP, w = threadIdx.x / WARP, nw = blockDim.x / WARP;
    const int gl = lane % lanes, part = w % split;
    // row groups a block covers: (warps / split) × (groups a warp holds)
    const int per_block = nw / split * (WARP / lanes);
    const int kblocks = (K + bk - 1) / bk;
    const int es = WDT == WDT_F32 ? 4 : WDT == WDT_BF16 ? 2 : 1;
    const int VE = WDT == WDT_FP8 ? 16 : 8;
    const int g0 = blockIdx.x * per_block;
    const int n0 = (g0 + w / split * (WARP / lanes) + lane / lanes) * R;
    const bool live = n0 < N, second = PAIR && n0 >= fz.n1;
    const int64_t ldx = HEADS ? hd.ldx : K, ldy = HEADS ? hd.ldy : PAIR ? (second ? N - fz.n1 : fz.n1) : N;
    // the group's first weight row, where its x rows start, where its outputs go
    const int head = HEADS ? (live ? n0 / hd.nh : 0) : 0, j0 = HEADS ? n0 - head * hd.nh : second ? n0 - fz.n1 : n0;
    const int wrow = HEADS ? head * hd.wh + hd.w0 + j0 : j0;
    const uint8_t* __restrict__ Wm = W;
    const float* __restrict__ Sm = S;
    float* __restrict__ Yg = Y + (HEADS ? (int64_t)head * hd.yh : 0);
    if constexpr (PAIR)
        if (second) Wm = fz.w2, Sm = fz.s2, Yg = fz.y2;
    const float* Xg = X + (HEADS ? (int64_t)head * hd.xh : 0);
    const uint8_t* rows[R];
    int srows[R]; // FP8: where each row's scales start in Sm (one row of blocks for all R where they share it)
#pragma unroll
    for (int r = 0; r < R; ++r) {
        rows[r] = Wm + (int64_t)(n0 + r < N ? wrow + r : 0) * K * es;
        srows[r] = (n0 + r < N ? wrow + r : 0) / bn * kblocks;
    }
    const bool one_srow = srows[0] == srows[R - 1];
    const BlockDiv kdiv(bk);
    float acc[R][MAXM], ss[MAXM];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < MAXM; ++m) acc[r][m] = 0.f;
#pragma unroll
    for (int m = 0; m < MAXM; ++m) ss[m] = 0.f;
    if (live) {
        const int stride = lanes * VE * split;
        for (int k0 = (part * lanes + gl) * VE; k0 < K; k0 += stride) {
            Chunk16 c[R];
#pragma unroll
            for (int r = 0; r < R; ++r) c[r] = load_chunk<WDT>(rows[r] + (int64_t)k0 * es);
            float4 gv[NORM ? VE / 4 : 1];
            if constexpr (NORM)
#pragma unroll
                for (int q = 0; q < VE / 4; ++q) gv[q] = ((const float4*)(fz.g + k0))[q];
            float wv[R][VE], sc[R];
            // FP8: the chunk lies in one scale block; its scale multiplies the chunk's dot once
            const int kbi = WDT == WDT_FP8 ? kdiv(k0) : 0;
#pragma unroll
            for (int r = 0; r < R; ++r) {
                unpack_chunk<WDT>(c[r], wv[r]);
                // (the norm forms keep the division: their 64 registers hold no more)
                sc[r] = WDT != WDT_FP8 ? 1.f
                        : NORM         ? Sm[((n0 + r < N ? wrow + r : 0) / bn) * kblocks + k0 / bk]
                                       : (r > 0 && one_srow ? sc[0] : Sm[srows[r] + kbi]);
            }
#pragma unroll
            for (int m = 0; m < MAXM; ++m) {
                if (m < M) {
                    const float4* xp = (const float4*)(Xg + (int64_t)m * ldx + k0);
                    float a[R];
#pragma unroll
                    for (int r = 0; r < R; ++r) a[r] = 0.f;
#pragma unroll
                    for (int q = 0; q < VE / 4; ++q) {
                        float4 x = xp[q];
                        if constexpr (NORM) {
                            ss[m] += x.x * x.x + x.y * x.y + x.z * x.z + x.w * x.w;
                            x = make_float4(x.x * gv[q].x, x.y * gv[q].y, x.z * gv[q].z, x.w * gv[q].w);
                        }
#pragma unroll
                        for (int r = 0; r < R; ++r) a[r] += wv[r][4 * q] * x.x + wv[r][4 * q + 1] * x.y + wv[r][4 * q + 2] * x.z + wv[r][4 * q + 3] * x.w;
                    }
#pragma unroll
                    for (int r = 0; r < R; ++r) acc[r][m] += WDT == WDT_FP8 ? a[r] * sc[r] : a[r];
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < MAXM; ++m) acc[r][m] = group_sum(acc[r][m], lanes);
    if constexpr (NORM)
#pragma unroll
        for (int m = 0; m < MAXM; ++m) ss[m] = group_sum(ss[m], lanes);
    if (split == 1) {
        // each group's first lane writes its R × M outputs
        if (live && gl == 0) {
            if constexpr (NORM) {
#pragma unroll
                for (int m = 0; m < MAXM; ++m) {
                    const float rs = rsqrtf(ss[m] / (float)K + fz.eps);
#pragma unroll
                    for (int r = 0; r < R; ++r) acc[r][m] *= rs;
                }
                if (fz.pos)
#pragma unroll
                    for (int m = 0; m < MAXM; ++m)
#pragma unroll
                        for (int r = 0; r + 1 < R; r += 2)
                            if (m < M && n0 + r + 1 < N) gemv_rope_pair(acc[r][m], acc[r + 1][m], n0 + r, m, fz);
            }
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int m = 0; m < MAXM; ++m)
                    if (m < M && n0 + r < N) Yg[(int64_t)m * ldy + j0 + r] = acc[r][m];
        }
        return;
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < MAXM; ++m)
            if (lane == 0 && m < M) red[w][r][m] = acc[r][m];
    if constexpr (NORM)
#pragma unroll
        for (int m = 0; m < MAXM; ++m)
            if (lane == 0 && m < M) red_ss[w][m] = ss[m];
    __syncthreads();
    if constexpr (NORM) {
        // the group's whole first warp (live and part are uniform in a warp when split > 1): the
        // rotary partner of output r is lane (r ^ 1)·M + m's
        if (live && part == 0) {
            const int r = lane / M, m = lane % M;
            const bool mine = lane < M * R && n0 + r < N;
            float v = 0.f, sq = 0.f;
            if (mine) {
                for (int p = 0; p < split; ++p) v += red[w + p][r][m], sq += red_ss[w + p][m];
                v *= rsqrtf(sq / (float)K + fz.eps);
            }
            if (fz.pos) {
                const float pv = __shfl(v, ((r ^ 1) * M + m) & (WARP - 1), WARP);
                if (mine && n0 + (r | 1) < N) {
                    float y0 = r % 2 ? pv : v, y1 = r % 2 ? v : pv;
                    gemv_rope_pair(y0, y1, n0 + (r & ~1), m, fz);
                    v = r % 2 ? y1 : y0;
                }
            }
            if (mine) Yg[(int64_t)m * ldy + j0 + r] = v;
        }
        return;
    }
    if (live && part == 0 && lane < M * R) {
        int r = lane / M, m = lane % M;
        if (n0 + r < N) {
            float v = 0.f;
            for (int p = 0; p < split; ++p) v += red[w + p][r][m];
            Yg[(int64_t)m * ldy + j0 + r] = v;
        }
    }
}

#define GEMV8(NAME, WDT, MAXM, R)                                                                                                      \
    extern "C" __global__ void __launch_bounds__(256) NAME(const float* X, const uint8_t* W, const float* S, float* Y, int M, int N, \
                                                                               int K, int bn, int bk, int split, int lanes) { ENGINE_GRID_DEP(); \
        gemv8_impl<WDT, MAXM, R, false>(X, W, S, Y, M, N, K, bn, bk, split, lanes, GemvHeads{});                                        \
    }
// ... and its per-head form (mla_proj.rs: MLA's absorbed projections below the GEMM threshold)
#define GEMV8_HEADS(NAME, WDT, MAXM, R)                                                                                                \
    extern "C" __global__ void __launch_bounds__(256) NAME##_heads(const float* X, const uint8_t* W, const float* S, float* Y, int M, \
                                                                                       int N, int K, int bn, int bk, int split, int lanes, \
                                                                                       int64_t ldx, int xh, int nh, int wh, int w0, int64_t ldy, int yh) { ENGINE_GRID_DEP(); \
        gemv8_impl<WDT, MAXM, R, true>(X, W, S, Y, M, N, K, bn, bk, split, lanes, GemvHeads{ldx, ldy, xh, nh, wh, w0, yh});             \
    }
// ... and its fused forms (the GemvFuse flags above)
#define GEMV8_FUSED(NAME, WDT, MAXM, R)                                                                                                \
    extern "C" __global__ void __launch_bounds__(256) NAME##_pair(const float* X, const uint8_t* W, const float* S, float* Y, int M, \
                                                                                      int N, int K, int bn, int bk, int split, int lanes, \
                                                                                      const uint8_t* W2, const float* S2, float* Y2, int n1) { ENGINE_GRID_DEP(); \
        gemv8_impl<WDT, MAXM, R, false, true, false>(X, W, S, Y, M, N, K, bn, bk, split, lanes, GemvHeads{}, GemvFuse{W2, S2, Y2, n1, nullptr, 0.f, nullptr, nullptr, 0, 0, 0, 0.f}); \
    }                                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) NAME##_norm(const float* X, const uint8_t* W, const float* S, float* Y, int M, \
                                                                                      int N, int K, int bn, int bk, int split, int lanes, \
                                                                                      const float* G, float eps, const uint32_t* pos, const float* inv_freq, \
                                                                                      int hs, int off, int half, float scale) { ENGINE_GRID_DEP(); \
        gemv8_impl<WDT, MAXM, R, false, false, true>(X, W, S, Y, M, N, K, bn, bk, split, lanes, GemvHeads{},                           \
                                                     GemvFuse{nullptr, nullptr, nullptr, 0, G, eps, pos, inv_freq, hs, off, half, scale}); \
    }
// ... and the `_norm` form with blocks past `gemv_blocks` writing MLA's new cache entries (one a
// block, row blockIdx.x − gemv_blocks of kx; mla_kv_entry.h, the cache f32 or, with kbf16, bf16):
// q_b and the entries are both of the first projections' outputs, so one launch takes both.
// MINB: blocks an SM the kernel keeps its registers for: the one-row form at 4 (64 registers on
// sm_90a, no spills; it took 112 before the entry's norm kept fewer float4s, two blocks an SM,
// and V3's q_b, 769 blocks, ran in three waves); the 8-row form needs its ~116 (1: no bound)
#define GEMV8_NORM_KV(NAME, WDT, MAXM, R, MINB)                                                                                        \
    extern "C" __global__ void __launch_bounds__(256, MINB) NAME##_norm_kv(                                                             \
        const float* X, const uint8_t* W, const float* S, float* Y, int M, int N, int K, int bn, int bk, int split, int lanes,          \
        const float* G, float eps, const uint32_t* pos, const float* inv_freq, int hs, int off, int half, float scale, float* kx,     \
        const float* kw, int kn, float keps, const uint32_t* kpos, const float* kinv, int koff, int khalf, int kil, float kscale,      \
        void* kv, int kbf16, const uint32_t* kslots, int klayer, int knum_slots, int kentry, int gemv_blocks) { ENGINE_GRID_DEP();      \
        if ((int)blockIdx.x >= gemv_blocks) {                                                                                          \
            const int r = blockIdx.x - gemv_blocks;                                                                                    \
            if (kbf16)                                                                                                                 \
                mla_kv_entry_row(r, kx, kw, kn, keps, kpos, kinv, koff, khalf, kil, kscale, (uint16_t*)kv, kslots, klayer, knum_slots, kentry); \
            else                                                                                                                       \
                mla_kv_entry_row(r, kx, kw, kn, keps, kpos, kinv, koff, khalf, kil, kscale, (float*)kv, kslots, klayer, knum_slots, kentry); \
            return;                                                                                                                    \
        }                                                                                                                              \
        gemv8_impl<WDT, MAXM, R, false, false, true>(X, W, S, Y, M, N, K, bn, bk, split, lanes, GemvHeads{},                           \
                                                     GemvFuse{nullptr, nullptr, nullptr, 0, G, eps, pos, inv_freq, hs, off, half, scale}); \
    }
// up to 8 rows (decode at small batch; 2 output rows per warp) and up to 16 rows per launch
// (larger batches, in slices; one output row per warp: 16 rows' accumulators leave no room)
GEMV8(gemv8_f32w, WDT_F32, 8, 2)
GEMV8(gemv8_bf16w, WDT_BF16, 8, 2)
GEMV8(gemv8_fp8w, WDT_FP8, 8, 2)
GEMV8_HEADS(gemv8_f32w, WDT_F32, 8, 2)
GEMV8_HEADS(gemv8_bf16w, WDT_BF16, 8, 2)
GEMV8_HEADS(gemv8_fp8w, WDT_FP8, 8, 2)
GEMV8(gemv16_f32w, WDT_F32, 16, 1)
GEMV8(gemv16_bf16w, WDT_BF16, 16, 1)
GEMV8(gemv16_fp8w, WDT_FP8, 16, 1)
// one row of x (batch-1 decode): four output rows per warp share each x load, so the x traffic
// per weight byte halves again (FP8's 16-weight chunks otherwise read 4x their bytes of x)
GEMV8(gemv1_f32w, WDT_F32, 1, 4)
GEMV8(gemv1_bf16w, WDT_BF16, 1, 4)
GEMV8(gemv1_fp8w, WDT_FP8, 1, 4)
GEMV8_HEADS(gemv1_f32w, WDT_F32, 1, 4)
GEMV8_HEADS(gemv1_bf16w, WDT_BF16, 1, 4)
GEMV8_HEADS(gemv1_fp8w, WDT_FP8, 1, 4)
GEMV8_FUSED(gemv8_f32w, WDT_F32, 8, 2)
GEMV8_FUSED(gemv8_bf16w, WDT_BF16, 8, 2)
GEMV8_FUSED(gemv8_fp8w, WDT_FP8, 8, 2)
GEMV8_FUSED(gemv1_f32w, WDT_F32, 1, 4)
GEMV8_FUSED(gemv1_bf16w, WDT_BF16, 1, 4)
GEMV8_FUSED(gemv1_fp8w, WDT_FP8, 1, 4)
GEMV8_NORM_KV(gemv8_f32w, WDT_F32, 8, 2, 1)
GEMV8_NORM_KV(gemv8_bf16w, WDT_BF16, 8, 2, 1)
GEMV8_NORM_KV(gemv8_fp8w, WDT_FP8, 8, 2, 1)
GEMV8_NORM_KV(gemv1_f32w, WDT_F32, 1, 4, 4)
GEMV8_NORM_KV(gemv1_bf16w, WDT_BF16, 1, 4, 4)
GEMV8_NORM_KV(gemv1_fp8w, WDT_FP8, 1, 4, 4)
