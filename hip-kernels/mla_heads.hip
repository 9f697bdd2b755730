// MLA's absorbed projections around the decode attention as per-head GEMMs on mma.sync, fed by
// cp.async (NVIDIA sm_80+): for head z = blockIdx.z,
//   Y[m, z·yh + n] = Σ_k X[m, z·xh + k] · W[z·wh + w0 + n, k]     (m < M, n < N, k < K)
// with FP8 weights whose 128-row tiles each lie in one row of scale blocks (the host checks; V3's
// kv_b and its transposed W_UK), so a K chunk's scale multiplies X. The numerics of mma_tile.h's
// tile: X·s split into bf16 hi + lo, the e4m3 weights exact in bf16, f32 accumulators.
// linear_mma.hip's `linear_mma_heads` stages each 32-column K step through registers into bf16
// shared tiles and waits on it (a q → latent head has K = 128: four steps, each a full load
// latency; 84 µs a V3 layer at batch 256 where its 92 MB move in ~22; here 51). Here:
//   - a block is BM rows × 128 columns of one head, four warps (each all BM rows × 32 columns);
//   - X (f32, as stored) and W (FP8, as stored) land by 16-byte cp.async in a ring of HM_ST
//     stages of 64 K columns, up to HM_ST - 1 chunks in flight ahead of the products (K = 128:
//     both chunks at once);
//   - each chunk's X·s split once into bf16 hi and lo tiles in shared memory (A fragments by
//     ldmatrix; splitting as fragments were read did it once per warp, four times over: latent → v
//     at V3 batch 256 47 → 45 µs), the weights widened to bf16 as each fragment is read;
//   - two block barriers a chunk (landed; split); results stored from the accumulators as float2;
//   - BM 64: three blocks an SM by registers (168; NVRTC spills 20 bytes of it for sm_80, none
//     for sm_90a), BM 32 (batches of up to 32 tokens): four.
// Launch: grid (ceil(N/128), ceil(M/BM), heads), block 128, dynamic shared memory
// min(HM_ST, K/64) · stage bytes + the split tiles (mla_proj.rs mirrors it). The `_bx` forms read
// X as bf16 (the warpgroup decode kernel's latents): exact operands, so one product a fragment
// from the landed tile (no split), the K blocks' weight scales applied to the accumulators. Needs K % 64 == 0,
// bk % 64 == 0, X rows and head offsets in whole 16-byte chunks, ldy, yh and N even. Elsewhere
// than NVIDIA sm_80+ the kernels are a trap the host never selects.
#include "bf16.h"
#include "e4m3.h"

#define HM_N 128                 // columns (W rows) a block
#define HM_KC 64                 // K columns a chunk (one scale: bk % 64 == 0)
#define HM_XS (HM_KC + 8)        // floats a shared X row: 8-byte fragment reads conflict-free
#define HM_WS (HM_KC + 16)       // bytes a shared W row
#define HM_ST 3                  // stages in the ring
#define HM_SS (HM_KC + 8)        // bf16 a row of the split tiles (ldmatrix rows conflict-free)
#define HM_THREADS 128

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// 16 bytes global → shared, or zeros where `bytes` is 0
__device__ __forceinline__ void hm_copy(void* dst, const void* src, int bytes) { cp_async16_fill((unsigned)__cvta_generic_to_shared(dst), src, bytes); }

// two e4m3 bytes (low two of `two`) as a packed bf16 pair, exactly (sm_80 / sm_86: the portable
// decoder, no e4m3 conversion instruction)
__device__ __forceinline__ uint32_t hm_w2(uint32_t two) {
#ifdef ENGINE_FP8_HW
    float2 f = fp8x2_e4m3_to_f32(two);
    return bf16_pack(f.x, f.y);
#else
    return bf16_pack(fp8e4m3_to_f32((uint8_t)(two & 0xff)), fp8e4m3_to_f32((uint8_t)((two >> 8) & 0xff)));
#endif
}

// The block's [BM rows × 128 columns] of f32 results as act_quant.hip's quant_fp8_act would write
// them (one group of 128 channels: s = max(max|y|, 1e-10) / 448, codes e4m3fn(y / s)): each
// row's maximum over the four warps' 32 columns through shared memory (the ring's, free once
// every warp is past its last products), codes as byte pairs at Q[r · ldq + n], the scale at
// Sg[r] (the group's scales, one a row).
// A warp's B fragments of K step kk: its 32 weight rows (4 groups of 8; row 8j + g) of the staged
// tile `ws`, two e4m3 pairs each (columns kk + 2t, + 8), widened to bf16.
__device__ __forceinline__ void hm_wfrags(uint32_t (&b)[4][2], const uint8_t* ws, int kk, int g, int t) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const uint8_t* wp = ws + (8 * j + g) * HM_WS + kk + 2 * t;
        b[j][0] = hm_w2(*(const uint16_t*)wp);
        b[j][1] = hm_w2(*(const uint16_t*)(wp + 8));
    }
}

template <int MI>
__device__ __forceinline__ void hm_store_codes(const float (&acc)[MI][4][4], uint8_t* Q, int64_t ldq, float* Sg, int m0, int M, int N) {
    extern __shared__ __align__(16) unsigned char hm_smem[];
    float* red = (float*)hm_smem; // [4 warps][16 MI rows]
    const int tid = threadIdx.x, lane = tid % 32, wid = tid / 32, g = lane / 4, t = lane % 4;
    float mx[MI][2];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float v = 0.f;
#pragma unroll
            for (int j = 0; j < 4; ++j) v = fmaxf(v, fmaxf(fabsf(acc[i][j][2 * h]), fabsf(acc[i][j][2 * h + 1])));
            v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
            mx[i][h] = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
        }
    __syncthreads(); // every warp past its products: the ring is free
    if (t == 0)
#pragma unroll
        for (int i = 0; i < MI; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h) red[wid * 16 * MI + 16 * i + 8 * h + g] = mx[i][h];
    __syncthreads();
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int rr = 16 * i + 8 * h + g, r = m0 + rr;
            float amax = 0.f;
#pragma unroll
            for (int w = 0; w < 4; ++w) amax = fmaxf(amax, red[w * 16 * MI + rr]);
            const float sc = e4m3_act_scale(amax);
            if (r >= M) continue;
            if (wid == 0 && t == 0) Sg[r] = sc;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int n = 32 * wid + 8 * j + 2 * t;
                if (n < N) *(uint16_t*)(Q + (int64_t)r * ldq + n) = (uint16_t)(f32_to_e4m3fn(acc[i][j][2 * h] / sc) | (f32_to_e4m3fn(acc[i][j][2 * h + 1] / sc) << 8));
            }
        }
}

template <int BM, bool BY, bool BX, bool QY>
__device__ void heads_mma_impl(const void* Xv, int64_t ldx, int xh, const uint8_t* W, const float* S, int wh, int w0, void* Yv, int64_t ldy, int yh, int M, int N,
                               int K, int bn, int bk, float* Sy) {
    // a stage: X (f32 rows of HM_XS, or BX bf16 rows of HM_SS), then the tile's 128 W rows
    constexpr int MI = BM / 16, XB = BX ? BM * HM_SS * 2 : BM * HM_XS * 4, STAGE = XB + HM_N * HM_WS;
    extern __shared__ __align__(16) unsigned char hm_smem[];
    const int tid = threadIdx.x, lane = tid % 32, wid = tid / 32, g = lane / 4, t = lane % 4;
    const int z = blockIdx.z, nt = (int)blockIdx.x * HM_N, m0 = (int)blockIdx.y * BM;
    const int wrow = z * wh + w0 + nt; // the tile's first W row
    const int nrows = min(HM_N, N - nt), chunks = K / HM_KC;
    const float* Xz = (const float*)Xv + (int64_t)z * xh;
    const uint16_t* Xbz = (const uint16_t*)Xv + (int64_t)z * xh; // (BX)
    const uint8_t* Wt = W + (int64_t)wrow * K;
    const float* srow = S + (int64_t)(wrow / bn) * ((K + bk - 1) / bk);
    // the split tiles, after the ring's stages (not BX's)
    uint16_t* sh_hi = (uint16_t*)(hm_smem + min(HM_ST, chunks) * STAGE);
    uint16_t* sh_lo = sh_hi + BM * HM_SS;

    auto fetch = [&](int c) {
        unsigned char* st = hm_smem + (c % HM_ST) * STAGE;
        const int k0 = c * HM_KC;
        if (BX) { // bf16 rows of HM_SS (ldmatrix rows conflict-free): 8 pieces of 8 columns
#pragma unroll
            for (int u = 0; u < BM * 8 / HM_THREADS; ++u) {
                const int i = tid + u * HM_THREADS, r = i / 8, q = i % 8;
                const bool in = m0 + r < M;
                hm_copy(st + r * HM_SS * 2 + 16 * q, Xbz + (int64_t)(in ? m0 + r : m0) * ldx + k0 + 8 * q, in ? 16 : 0);
            }
        } else {
#pragma unroll
            for (int u = 0; u < BM * 16 / HM_THREADS; ++u) {
                const int i = tid + u * HM_THREADS, r = i / 16, q = i % 16;
                const bool in = m0 + r < M;
                hm_copy(st + (r * HM_XS + 4 * q) * 4, Xz + (int64_t)(in ? m0 + r : m0) * ldx + k0 + 4 * q, in ? 16 : 0);
            }
        }
#pragma unroll
        for (int u = 0; u < HM_N * 4 / HM_THREADS; ++u) {
            const int i = tid + u * HM_THREADS, r = i / 4, q = i % 4;
            const bool in = r < nrows;
            hm_copy(st + XB + r * HM_WS + 16 * q, Wt + (int64_t)(in ? r : 0) * K + k0 + 16 * q, in ? 16 : 0);
        }
    };

    float acc[MI][4][4];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.f;

    float cur = 0.f; // (BX) the scale the accumulators are in units of
#pragma unroll
    for (int c = 0; c < HM_ST - 1; ++c) {
        if (c < chunks) fetch(c);
        cp_async_commit();
    }
    for (int c = 0; c < chunks; ++c) {
        cp_async_wait<HM_ST - 2>(); // chunk c landed (this thread's copies)
        __syncthreads();            // everyone's; and chunk c - 1's stage is free again
        if (c + HM_ST - 1 < chunks) fetch(c + HM_ST - 1);
        cp_async_commit();
        const unsigned char* st = hm_smem + (c % HM_ST) * STAGE;
        const float* xs = (const float*)st;
        const uint8_t* ws = st + XB + (32 * wid) * HM_WS;
        const float s = srow[c * HM_KC / bk];
        if (BX) {
            // X exact in bf16: one product a fragment straight from the landed tile, the
            // accumulators kept in units of the current K block's scale (rescaled where it
            // changes, multiplied by it at the end); a zero scale's block adds nothing
            if (s == 0.f) continue;
            if (s != cur) {
                const float ratio = cur / s; // (cur 0: nothing accumulated yet)
#pragma unroll
                for (int i = 0; i < MI; ++i)
#pragma unroll
                    for (int j = 0; j < 4; ++j)
#pragma unroll
                        for (int e = 0; e < 4; ++e) acc[i][j][e] *= ratio;
                cur = s;
            }
            const uint16_t* xb = (const uint16_t*)st;
#pragma unroll 2
            for (int kk = 0; kk < HM_KC; kk += 16) {
                uint32_t b[4][2];
                hm_wfrags(b, ws, kk, g, t);
#pragma unroll
                for (int i = 0; i < MI; ++i) {
                    uint32_t a[4];
                    ldmatrix_x4(a, xb + (16 * i + lane % 16) * HM_SS + kk + 8 * (lane / 16));
#pragma unroll
                    for (int j = 0; j < 4; ++j) mma_bf16_16816(acc[i][j], a, b[j][0], b[j][1]);
                }
            }
            continue;
        }
        // X · s split once into the hi and lo tiles (the previous chunk's products are done)
#pragma unroll
        for (int u = 0; u < BM * 16 / HM_THREADS; ++u) {
            const int i = tid + u * HM_THREADS, r = i / 16, q = i % 16;
            const float4 v = *(const float4*)(xs + r * HM_XS + 4 * q);
            uint32_t h0, l0, h1, l1;
            bf16_split2(v.x * s, v.y * s, &h0, &l0);
            bf16_split2(v.z * s, v.w * s, &h1, &l1);
            *(uint2*)(sh_hi + r * HM_SS + 4 * q) = make_uint2(h0, h1);
            *(uint2*)(sh_lo + r * HM_SS + 4 * q) = make_uint2(l0, l1);
        }
        __syncthreads();
#pragma unroll 2 // (fully unrolled, BM 64 spilled 32 bytes at its 168 registers)
        for (int kk = 0; kk < HM_KC; kk += 16) {
            uint32_t b[4][2];
            hm_wfrags(b, ws, kk, g, t);
#pragma unroll
            for (int i = 0; i < MI; ++i) { // a row block's fragments at a time (fewer registers live)
                const int o = (16 * i + lane % 16) * HM_SS + kk + 8 * (lane / 16);
                uint32_t hi[4], lo[4];
                ldmatrix_x4(hi, sh_hi + o);
                ldmatrix_x4(lo, sh_lo + o);
#pragma unroll
                for (int j = 0; j < 4; ++j) mma_bf16_16816(acc[i][j], hi, b[j][0], b[j][1]);
#pragma unroll
                for (int j = 0; j < 4; ++j) mma_bf16_16816(acc[i][j], lo, b[j][0], b[j][1]);
            }
        }
    }
    if (BX) {
#pragma unroll
        for (int i = 0; i < MI; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[i][j][e] *= cur;
    }

    if (QY) { // e4m3 codes of each row's 128 columns (one head: N == 128, the host checks)
        hm_store_codes<MI>(acc, (uint8_t*)Yv + (int64_t)z * yh, ldy, Sy + (int64_t)z * M, m0, M, N);
        return;
    }
    // f32 pairs, or (BY) bf16 pairs rounded to nearest even: the warpgroup decode kernel's
    // queries, which it would round so itself (half the bytes written and read back)
    float* Yz = (float*)Yv + (int64_t)z * yh;
    uint16_t* Yb = (uint16_t*)Yv + (int64_t)z * yh;
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int r = m0 + 16 * i + g, n = nt + 32 * wid + 8 * j + 2 * t;
            if (n >= N) continue;
            if (BY) {
                if (r < M) *(uint32_t*)&Yb[(int64_t)r * ldy + n] = bf16_pack(acc[i][j][0], acc[i][j][1]);
                if (r + 8 < M) *(uint32_t*)&Yb[(int64_t)(r + 8) * ldy + n] = bf16_pack(acc[i][j][2], acc[i][j][3]);
            } else {
                if (r < M) *(float2*)&Yz[(int64_t)r * ldy + n] = make_float2(acc[i][j][0], acc[i][j][1]);
                if (r + 8 < M) *(float2*)&Yz[(int64_t)(r + 8) * ldy + n] = make_float2(acc[i][j][2], acc[i][j][3]);
            }
        }
}
#define HM_BODY(BM, BY, BX, QY) heads_mma_impl<BM, BY, BX, QY>(X, ldx, xh, W, S, wh, w0, Y, ldy, yh, M, N, K, bn, bk, Sy)
#else
#define HM_BODY(BM, BY, BX, QY) ENGINE_TRAP()
#endif

// _by: Y as bf16 (ldy, yh in bf16 elements); _bx: X as bf16 (ldx, xh in bf16 elements); _bxq:
// that, and Y as e4m3 codes (ldy, yh in bytes) with each row's scale at Sy[z · M + m] (the
// activation quantiser's [groups, rows] layout, a head a group; Sy unread by the other forms)
#define HEADS_MMA(BM, MINB, SUF, BY, BX, QY)                                                                                           \
    extern "C" __global__ void __launch_bounds__(HM_THREADS, MINB)                                                                     \
        heads_mma_fp8w_m##BM##SUF(const void* X, int64_t ldx, int xh, const uint8_t* W, const float* S, int wh, int w0, void* Y, int64_t ldy, \
                                  int yh, int M, int N, int K, int bn, int bk, float* Sy) {                                              \
        ENGINE_GRID_DEP();                                                                                                            \
        HM_BODY(BM, BY, BX, QY);                                                                                                      \
    }
HEADS_MMA(32, 4, , false, false, false)
HEADS_MMA(64, 3, , false, false, false)
HEADS_MMA(32, 4, _by, true, false, false)
HEADS_MMA(64, 3, _by, true, false, false)
HEADS_MMA(32, 4, _bx, false, true, false)
HEADS_MMA(64, 3, _bx, false, true, false)
HEADS_MMA(32, 4, _bxq, false, true, true)
HEADS_MMA(64, 3, _bxq, false, true, true)
