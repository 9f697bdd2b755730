// MLA prefill in the MHA form (what DeepSeek's reference does for long prompts): the context's
// latents are decompressed once, kvd = kv_b · c ([ctx, heads·(NOPE+VDIM)], a GEMM on the host
// side), mla_prefill_kv splits it per head into bf16 hi + lo keys [k_nope | k_pe] and transposed
// values, then causal flash attention per (64-query tile, head) with the scores never
// materialised: online softmax over 32-key tiles that are staged with 16-byte copies.
// Specialised at JIT time for KV_LORA, ROPE, NOPE, VDIM (like mla.hip).
//   - NVIDIA sm_80+: 4 warps × 16 queries; S = Q·Kᵀ and O += P·V with mma.sync m16n8k16 bf16,
//     every operand split into bf16 hi + lo and three products per step (hi·hi + lo·hi + hi·lo):
//     near-f32 scores and outputs (Q and P as A fragments in registers, K and Vᵀ staged in shared
//     memory), f32 softmax.
//   - CDNA gfx942 / gfx950: 2 wavefronts × 32 queries; Sᵀ = K·Qᵀ and O += P·V with MFMA 16x16x16
//     bf16, the same three products (compiled and checked for spills; never run: no AMD GPU here);
//   - other targets, and FB_PORTABLE: the portable product over the same shared tiles (hi + lo
//     summed), one query row per thread pair (run on the H200 by the tests with FB_PORTABLE).
// FB_PARTS 1 (`--fp8-activations dynamic`, whose FP8 GEMM inputs leave ~1e-2 in q, k and v) keeps
// the hi parts only: bf16 operands and one product per step, as SGLang's bf16 flash prefill (on
// NVIDIA sm_80+ with value heads of whole 16-column fragments the host runs mla_flash_bf16.hip's
// FlashAttention-2 form instead, on sm_90a with V2 / V3 head sizes mla_flash_wg.hip's
// FlashAttention-3 form; this one is the CDNA, portable and odd-shape form there).
// Launch: grid (tiles, heads), block 128. A tile is 4 ints: first query row in q / out, queries
// (≤ 64), first context row (a multiple of 32) in the per-head K / Vᵀ, position of the tile's
// first query in its sequence.
#include "bf16.h"

#ifndef KV_LORA
#error "KV_LORA must be defined"
#endif
#define ENTRY (KV_LORA + ROPE)
#define QK (NOPE + ROPE)
#define PER_HEAD (NOPE + VDIM)
#define FB_Q 64
#define FB_K 32
#define FB_KP (QK + 8)   // padded shared rows (bf16): conflict-free fragment reads
#define FB_VP (FB_K + 8)
#ifndef FB_PARTS
#define FB_PARTS 2 // bf16 parts per operand: 2 (hi + lo, near-f32) or 1 (bf16)
#endif

// c_out[j] = the latent c and pe_out[j] = k_pe of context slot slots[j] (layer `layer`), from an
// f32 or a bf16 cache.
template <class CT>
__device__ void mla_gather_ctx_impl(const CT* __restrict__ kv, const uint32_t* __restrict__ slots, int layer, int num_slots, float* __restrict__ c_out,
                                    float* __restrict__ pe_out) {
    int j = blockIdx.x;
    const CT* e = kv + ((int64_t)layer * num_slots + slots[j]) * ENTRY;
    for (int i = threadIdx.x; i < KV_LORA; i += blockDim.x) c_out[(int64_t)j * KV_LORA + i] = kv_elem(e, i);
    for (int i = threadIdx.x; i < ROPE; i += blockDim.x) pe_out[(int64_t)j * ROPE + i] = kv_elem(e, KV_LORA + i);
}

extern "C" __global__ void mla_gather_ctx(const float* kv, const uint32_t* slots, int layer, int num_slots, float* c_out, float* pe_out) { ENGINE_GRID_DEP();
    mla_gather_ctx_impl(kv, slots, layer, num_slots, c_out, pe_out);
}
extern "C" __global__ void mla_gather_ctx_bf16c(const uint16_t* kv, const uint32_t* slots, int layer, int num_slots, float* c_out, float* pe_out) { ENGINE_GRID_DEP();
    mla_gather_ctx_impl(kv, slots, layer, num_slots, c_out, pe_out);
}

#define FB_THREADS 128

struct FbShared {
    uint16_t ks[FB_PARTS][FB_K][FB_KP];  // keys of the tile, hi (and lo): [k_nope(head) | k_pe]
    uint16_t vt[FB_PARTS][VDIM][FB_VP];  // values, transposed, hi (and lo)
};

// Per head h, from kvd [ctx, heads·(NOPE+VDIM)] and pe [ctx, ROPE]: keys k[p][h][j][0..QK] and
// transposed values vt[p][h][0..VDIM][j] in bf16 (p = 0 hi, 1 lo; hi alone with FB_PARTS 1),
// ctx a multiple of FB_K.
// Launch: grid (ctx / FB_K, heads), block 256; a 32-key tile of one head per block, transposed
// through shared memory so that both outputs are written row by row.
extern "C" __global__ void __launch_bounds__(256) mla_prefill_kv(const float* __restrict__ kvd, const float* __restrict__ pe, uint16_t* __restrict__ k,
                                                                uint16_t* __restrict__ vt, int ctx, int heads) { ENGINE_GRID_DEP();
    __shared__ float v[FB_K][VDIM + 1];
    const int j0 = blockIdx.x * FB_K, h = blockIdx.y;
    const int64_t kpart = (int64_t)heads * ctx * QK, vpart = (int64_t)heads * VDIM * ctx;
    for (int i = threadIdx.x; i < FB_K * QK; i += blockDim.x) {
        int key = i / QK, d = i % QK, j = j0 + key;
        float x = d < NOPE ? kvd[(int64_t)j * heads * PER_HEAD + h * PER_HEAD + d] : pe[(int64_t)j * ROPE + d - NOPE];
        int64_t at = ((int64_t)h * ctx + j) * QK + d;
        uint16_t hi, lo;
        bf16_split(x, &hi, &lo);
        k[at] = hi;
        if (FB_PARTS == 2) k[kpart + at] = lo;
    }
    for (int i = threadIdx.x; i < FB_K * VDIM; i += blockDim.x) {
        int key = i / VDIM, d = i % VDIM;
        v[key][d] = kvd[(int64_t)(j0 + key) * heads * PER_HEAD + h * PER_HEAD + NOPE + d];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < FB_K * VDIM; i += blockDim.x) {
        int d = i / FB_K, key = i % FB_K;
        int64_t at = ((int64_t)h * VDIM + d) * ctx + j0 + key;
        uint16_t hi, lo;
        bf16_split(v[key][d], &hi, &lo);
        vt[at] = hi;
        if (FB_PARTS == 2) vt[vpart + at] = lo;
    }
}

// mla_prefill_kv's bf16 form (FB_PARTS 1: the operands of the bf16 flash kernels) in 16-byte
// pieces: 8 channels a thread from two float4 reads to one 8-bf16 store; the values of a 64-key
// tile transposed through shared memory and written as 8 keys a store (128 contiguous bytes of a
// transposed row a tile). Needs NOPE, ROPE and VDIM multiples of 8 and ctx of KV8_K (the host
// checks; the context is padded to 64).
// Launch: grid (ctx / KV8_K, heads), block 256.
#define KV8_K 64
extern "C" __global__ void __launch_bounds__(256) mla_prefill_kv_bf16(const float* __restrict__ kvd, const float* __restrict__ pe, uint16_t* __restrict__ k,
                                                                     uint16_t* __restrict__ vt, int ctx, int heads) { ENGINE_GRID_DEP();
#if NOPE % 8 == 0 && ROPE % 8 == 0 && VDIM % 8 == 0
    __shared__ float v[KV8_K][VDIM + 1];
    const int j0 = blockIdx.x * KV8_K, h = blockIdx.y;
    for (int i = threadIdx.x; i < KV8_K * (QK / 8); i += blockDim.x) {
        const int key = i / (QK / 8), d = 8 * (i % (QK / 8)), j = j0 + key;
        const float* src = d < NOPE ? kvd + (int64_t)j * heads * PER_HEAD + h * PER_HEAD + d : pe + (int64_t)j * ROPE + d - NOPE;
        const float4 a = *(const float4*)src, b = *(const float4*)(src + 4);
        *(uint4*)(k + ((int64_t)h * ctx + j) * QK + d) = make_uint4(bf16_pack(a.x, a.y), bf16_pack(a.z, a.w), bf16_pack(b.x, b.y), bf16_pack(b.z, b.w));
    }
    for (int i = threadIdx.x; i < KV8_K * (VDIM / 4); i += blockDim.x) {
        const int key = i / (VDIM / 4), d = 4 * (i % (VDIM / 4));
        const float4 a = *(const float4*)(kvd + (int64_t)(j0 + key) * heads * PER_HEAD + h * PER_HEAD + NOPE + d);
        v[key][d] = a.x;
        v[key][d + 1] = a.y;
        v[key][d + 2] = a.z;
        v[key][d + 3] = a.w;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < VDIM * (KV8_K / 8); i += blockDim.x) {
        const int d = i / (KV8_K / 8), key = 8 * (i % (KV8_K / 8));
        uint32_t w[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) w[e] = bf16_pack(v[key + 2 * e][d], v[key + 2 * e + 1][d]);
        *(uint4*)(vt + ((int64_t)h * VDIM + d) * ctx + j0 + key) = make_uint4(w[0], w[1], w[2], w[3]);
    }
#else
    ENGINE_TRAP(); // the host keeps mla_prefill_kv for these shapes
#endif
}

#define FB_KC (QK / 8)                // 16-byte chunks per key row
#define FB_VC (FB_K / 8)              // ... per transposed value row
#define FB_KN (FB_PARTS * FB_K * FB_KC) // chunks of a tile's keys, hi (and lo)
#define FB_VN (FB_PARTS * VDIM * FB_VC) // ... of its transposed values

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define FB_ASYNC 1
#endif

// The product: mma.sync on NVIDIA sm_80+, MFMA on CDNA (gfx942 / gfx950, VDIM a multiple of 16),
// the portable scalar one elsewhere — or anywhere with FB_PORTABLE defined (the backend's
// `flash_portable`, so the H200 tests run the portable product over the same staging and tiles).
#if !defined(FB_PORTABLE) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define FB_MMA_SYNC 1
#elif !defined(FB_PORTABLE) && (defined(__gfx942__) || defined(__gfx950__)) && VDIM % 16 == 0
#define FB_MFMA 1
typedef short fb_short4 __attribute__((ext_vector_type(4)));
typedef float fb_float4 __attribute__((ext_vector_type(4)));
// four bf16 (two packed pairs, lowest first) as an MFMA operand
__device__ __forceinline__ fb_short4 fb_pack4(uint32_t a, uint32_t b) {
    fb_short4 v = {(short)(a & 0xffff), (short)(a >> 16), (short)(b & 0xffff), (short)(b >> 16)};
    return v;
}
#endif

// One 16-byte chunk global → shared: cp.async on sm_80+ (no registers, completes in the
// background until fb_wait), a plain copy elsewhere.
__device__ __forceinline__ void fb_copy16(void* dst, const void* src) {
#ifdef FB_ASYNC
    cp_async16(dst, src);
#else
    *(uint4*)dst = *(const uint4*)src;
#endif
}

// Closes a group of copies; fb_wait<N>() returns when at most N groups are still in flight
// (each thread its own; a __syncthreads after it makes every thread's copies visible).
__device__ __forceinline__ void fb_commit() {
#ifdef FB_ASYNC
    cp_async_commit();
#endif
}
template <int N>
__device__ __forceinline__ void fb_wait() {
#ifdef FB_ASYNC
    cp_async_wait<N>();
#endif
}

// The keys key0 .. key0+FB_K-1 (key0 a multiple of FB_K) of head h into shared memory (hi and
// lo): one contiguous run of FB_K rows per part.
__device__ __forceinline__ void fb_stage_k(FbShared& sh, const uint16_t* __restrict__ k, int ctx, int heads, int h, int key0) {
    for (int i = threadIdx.x; i < FB_KN; i += FB_THREADS) {
        int p = i / (FB_K * FB_KC), r = i % (FB_K * FB_KC);
        fb_copy16(&sh.ks[p][r / FB_KC][8 * (r % FB_KC)], k + p * (int64_t)heads * ctx * QK + ((int64_t)h * ctx + key0 + r / FB_KC) * QK + 8 * (r % FB_KC));
    }
}

// ... and their transposed values: FB_K keys of each of the VDIM rows.
__device__ __forceinline__ void fb_stage_v(FbShared& sh, const uint16_t* __restrict__ vt, int ctx, int heads, int h, int key0) {
    for (int i = threadIdx.x; i < FB_VN; i += FB_THREADS) {
        int p = i / (VDIM * FB_VC), r = i % (VDIM * FB_VC);
        fb_copy16(&sh.vt[p][r / FB_VC][8 * (r % FB_VC)], vt + p * (int64_t)heads * VDIM * ctx + ((int64_t)h * VDIM + r / FB_VC) * ctx + key0 + 8 * (r % FB_VC));
    }
}

extern "C" __global__ void __launch_bounds__(FB_THREADS) mla_flash_prefill(const float* __restrict__ q, const uint16_t* __restrict__ k, const uint16_t* __restrict__ vt,
                                                                          const int32_t* __restrict__ tiles, float* __restrict__ out, int ctx, int heads, float scale) { ENGINE_GRID_DEP();
    __shared__ FbShared sh;
    const int* tl = tiles + blockIdx.x * 4;
    const int q_row0 = tl[0], nq = tl[1], ctx0 = tl[2], pos0 = tl[3];
    const int h = blockIdx.y;
    const int len = pos0 + nq; // keys the tile's last query sees
#if defined(FB_MMA_SYNC)
    // products in three bf16 parts (hi·hi + lo·hi + hi·lo) for near-f32 scores and outputs
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    const int r0 = w * 16 + g; // this thread's rows: r0 and r0 + 8
    uint32_t qh[QK / 16][4], ql[QK / 16][4];
#pragma unroll
    for (int kk = 0; kk < QK / 16; ++kk)
#pragma unroll
        for (int f = 0; f < 4; ++f) {
            int r = r0 + 8 * (f % 2), d = 16 * kk + 2 * t + 8 * (f / 2);
            const float* src = q + ((int64_t)(q_row0 + r) * heads + h) * QK + d;
            qh[kk][f] = ql[kk][f] = 0u;
            if (r < nq) bf16_split2(src[0], src[1], &qh[kk][f], &ql[kk][f]);
        }
    float o[VDIM / 8][4];
#pragma unroll
    for (int j = 0; j < VDIM / 8; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) o[j][c] = 0.f;
    float m[2] = {-ENGINE_INF, -ENGINE_INF}, l[2] = {0.f, 0.f};
    // keys and values of a tile arrive as two copy groups, each fetched while the other half of
    // the previous tile's work runs: K(t+1) during softmax and P·V of t, V(t+1) during Q·Kᵀ of t+1
    fb_stage_k(sh, k, ctx, heads, h, ctx0);
    fb_commit();
    fb_stage_v(sh, vt, ctx, heads, h, ctx0);
    fb_commit();
    for (int j0 = 0; j0 < len; j0 += FB_K) {
        const bool more = j0 + FB_K < len;
        fb_wait<1>(); // K(t) landed; V(t) may be in flight
        __syncthreads();
        float s[FB_K / 8][4];
#pragma unroll
        for (int j = 0; j < FB_K / 8; ++j) {
#pragma unroll
            for (int c = 0; c < 4; ++c) s[j][c] = 0.f;
#pragma unroll
            for (int kk = 0; kk < QK / 16; ++kk) {
                const int kr = 8 * j + g, kc = 16 * kk + 2 * t;
                uint32_t bh0 = *(const uint32_t*)&sh.ks[0][kr][kc], bh1 = *(const uint32_t*)&sh.ks[0][kr][kc + 8];
                mma_bf16_16816(s[j], qh[kk], bh0, bh1);
                if (FB_PARTS == 2) {
                    uint32_t bl0 = *(const uint32_t*)&sh.ks[FB_PARTS - 1][kr][kc], bl1 = *(const uint32_t*)&sh.ks[FB_PARTS - 1][kr][kc + 8];
                    mma_bf16_16816(s[j], ql[kk], bh0, bh1);
                    mma_bf16_16816(s[j], qh[kk], bl0, bl1);
                }
            }
        }
        __syncthreads(); // every warp is done with K(t)
        if (more) fb_stage_k(sh, k, ctx, heads, h, ctx0 + j0 + FB_K);
        fb_commit();
        // causal mask, scale, online softmax (rows r0: c = 0, 1; r0 + 8: c = 2, 3)
        float mx[2] = {-ENGINE_INF, -ENGINE_INF};
#pragma unroll
        for (int j = 0; j < FB_K / 8; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                int key = j0 + 8 * j + 2 * t + c % 2, row = r0 + 8 * (c / 2);
                float v = (key <= pos0 + row && key < len) ? s[j][c] * scale : -ENGINE_INF;
                s[j][c] = v;
                mx[c / 2] = fmaxf(mx[c / 2], v);
            }
        float corr[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            mx[i] = fmaxf(mx[i], __shfl_xor(mx[i], 1, 32));
            mx[i] = fmaxf(mx[i], __shfl_xor(mx[i], 2, 32));
            float mn = fmaxf(m[i], mx[i]);
            corr[i] = mn == -ENGINE_INF ? 1.f : expf(m[i] - mn);
            m[i] = mn;
            l[i] *= corr[i];
        }
        // P as A fragments: (row g, k 2t), (row g+8, k 2t), (row g, k 2t+8), (row g+8, k 2t+8)
        uint32_t ph[FB_K / 16][4], pl[FB_K / 16][4];
#pragma unroll
        for (int j = 0; j < FB_K / 8; ++j) {
            float p[4];
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                p[c] = s[j][c] == -ENGINE_INF ? 0.f : expf(s[j][c] - m[c / 2]);
                l[c / 2] += p[c];
            }
            bf16_split2(p[0], p[1], &ph[j / 2][2 * (j % 2)], &pl[j / 2][2 * (j % 2)]);
            bf16_split2(p[2], p[3], &ph[j / 2][2 * (j % 2) + 1], &pl[j / 2][2 * (j % 2) + 1]);
        }
        fb_wait<1>(); // V(t) landed; K(t+1) may be in flight
        __syncthreads();
#pragma unroll
        for (int jv = 0; jv < VDIM / 8; ++jv) {
            o[jv][0] *= corr[0];
            o[jv][1] *= corr[0];
            o[jv][2] *= corr[1];
            o[jv][3] *= corr[1];
#pragma unroll
            for (int kc = 0; kc < FB_K / 16; ++kc) {
                const int vr = 8 * jv + g, vc = 16 * kc + 2 * t;
                uint32_t bh0 = *(const uint32_t*)&sh.vt[0][vr][vc], bh1 = *(const uint32_t*)&sh.vt[0][vr][vc + 8];
                mma_bf16_16816(o[jv], ph[kc], bh0, bh1);
                if (FB_PARTS == 2) {
                    uint32_t bl0 = *(const uint32_t*)&sh.vt[FB_PARTS - 1][vr][vc], bl1 = *(const uint32_t*)&sh.vt[FB_PARTS - 1][vr][vc + 8];
                    mma_bf16_16816(o[jv], pl[kc], bh0, bh1);
                    mma_bf16_16816(o[jv], ph[kc], bl0, bl1);
                }
            }
        }
        __syncthreads(); // every warp is done with V(t)
        if (more) fb_stage_v(sh, vt, ctx, heads, h, ctx0 + j0 + FB_K);
        fb_commit();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        l[i] += __shfl_xor(l[i], 1, 32);
        l[i] += __shfl_xor(l[i], 2, 32);
    }
#pragma unroll
    for (int jv = 0; jv < VDIM / 8; ++jv)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            int row = r0 + 8 * (c / 2);
            if (row < nq) out[((int64_t)(q_row0 + row) * heads + h) * VDIM + 8 * jv + 2 * t + c % 2] = o[jv][c] / l[c / 2];
        }
#elif defined(FB_MFMA)
    // MFMA 16x16x16 bf16, lane (r, qd) = (lane % 16, lane / 16): A gives row r, k 4qd .. 4qd + 3;
    // B column r, the same k; D holds rows 4qd .. 4qd + 3 of column r. Each wavefront takes 32
    // queries (two blocks of 16, qb) and computes Sᵀ = K·Qᵀ, so that a lane's scores (query r,
    // keys 4qd .. 4qd + 3 of each 16) are already the A fragment of P in O = P·V; a query's softmax
    // state sits in the four lanes with its r. Three products per step as on NVIDIA.
    const int lane = threadIdx.x % WARP, w = threadIdx.x / WARP, r = lane % 16, qd = lane / 16;
    fb_short4 qh[2][QK / 16], ql[2][QK / 16];
#pragma unroll
    for (int qb = 0; qb < 2; ++qb)
#pragma unroll
        for (int kk = 0; kk < QK / 16; ++kk) {
            const int row = 32 * w + 16 * qb + r;
            uint32_t h0 = 0, l0 = 0, h1 = 0, l1 = 0;
            if (row < nq) {
                const float* src = q + ((int64_t)(q_row0 + row) * heads + h) * QK + 16 * kk + 4 * qd;
                bf16_split2(src[0], src[1], &h0, &l0);
                bf16_split2(src[2], src[3], &h1, &l1);
            }
            qh[qb][kk] = fb_pack4(h0, h1);
            ql[qb][kk] = fb_pack4(l0, l1);
        }
    fb_float4 o[2][VDIM / 16];
#pragma unroll
    for (int qb = 0; qb < 2; ++qb)
#pragma unroll
        for (int jv = 0; jv < VDIM / 16; ++jv) o[qb][jv] = fb_float4{0.f, 0.f, 0.f, 0.f};
    float m[2] = {-ENGINE_INF, -ENGINE_INF}, l[2] = {0.f, 0.f}; // query 32w + 16qb + r
    for (int j0 = 0; j0 < len; j0 += FB_K) {
        fb_stage_k(sh, k, ctx, heads, h, ctx0 + j0);
        fb_stage_v(sh, vt, ctx, heads, h, ctx0 + j0);
        __syncthreads();
        fb_float4 st[2][2]; // [kb][qb]: keys 16kb + 4qd + i of query r
#pragma unroll
        for (int kb = 0; kb < 2; ++kb)
#pragma unroll
            for (int qb = 0; qb < 2; ++qb) st[kb][qb] = fb_float4{0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int kk = 0; kk < QK / 16; ++kk)
#pragma unroll
            for (int kb = 0; kb < 2; ++kb) {
                fb_short4 kh = *(const fb_short4*)&sh.ks[0][16 * kb + r][16 * kk + 4 * qd];
                fb_short4 kl = *(const fb_short4*)&sh.ks[FB_PARTS - 1][16 * kb + r][16 * kk + 4 * qd];
#pragma unroll
                for (int qb = 0; qb < 2; ++qb) {
                    st[kb][qb] = __builtin_amdgcn_mfma_f32_16x16x16bf16_1k(kh, qh[qb][kk], st[kb][qb], 0, 0, 0);
                    if (FB_PARTS == 2) {
                        st[kb][qb] = __builtin_amdgcn_mfma_f32_16x16x16bf16_1k(kl, qh[qb][kk], st[kb][qb], 0, 0, 0);
                        st[kb][qb] = __builtin_amdgcn_mfma_f32_16x16x16bf16_1k(kh, ql[qb][kk], st[kb][qb], 0, 0, 0);
                    }
                }
            }
        // causal mask, scale, online softmax over the four lanes of each query
        float corr[2];
#pragma unroll
        for (int qb = 0; qb < 2; ++qb) {
            const int row = 32 * w + 16 * qb + r;
            float mx = -ENGINE_INF;
#pragma unroll
            for (int kb = 0; kb < 2; ++kb)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    int key = j0 + 16 * kb + 4 * qd + i;
                    float v = (key <= pos0 + row && key < len) ? st[kb][qb][i] * scale : -ENGINE_INF;
                    st[kb][qb][i] = v;
                    mx = fmaxf(mx, v);
                }
            mx = fmaxf(mx, __shfl_xor(mx, 16));
            mx = fmaxf(mx, __shfl_xor(mx, 32));
            float mn = fmaxf(m[qb], mx);
            corr[qb] = mn == -ENGINE_INF ? 1.f : expf(m[qb] - mn);
            m[qb] = mn;
            l[qb] *= corr[qb];
        }
        // P as A fragments [qb][kc]: query r, keys 16kc + 4qd .. +3 — the lane's own scores
        fb_short4 ph[2][2], pl[2][2];
#pragma unroll
        for (int qb = 0; qb < 2; ++qb)
#pragma unroll
            for (int kc = 0; kc < 2; ++kc) {
                float p[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    p[i] = st[kc][qb][i] == -ENGINE_INF ? 0.f : expf(st[kc][qb][i] - m[qb]);
                    l[qb] += p[i];
                }
                uint32_t h0, l0, h1, l1;
                bf16_split2(p[0], p[1], &h0, &l0);
                bf16_split2(p[2], p[3], &h1, &l1);
                ph[qb][kc] = fb_pack4(h0, h1);
                pl[qb][kc] = fb_pack4(l0, l1);
            }
        // O's rows are queries 4qd + i: their correction from the lane that holds query 4qd + i
#pragma unroll
        for (int qb = 0; qb < 2; ++qb)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                float ci = __shfl(corr[qb], 4 * qd + i);
#pragma unroll
                for (int jv = 0; jv < VDIM / 16; ++jv) o[qb][jv][i] *= ci;
            }
#pragma unroll
        for (int jv = 0; jv < VDIM / 16; ++jv)
#pragma unroll
            for (int kc = 0; kc < 2; ++kc) {
                fb_short4 vh = *(const fb_short4*)&sh.vt[0][16 * jv + r][16 * kc + 4 * qd];
                fb_short4 vl = *(const fb_short4*)&sh.vt[FB_PARTS - 1][16 * jv + r][16 * kc + 4 * qd];
#pragma unroll
                for (int qb = 0; qb < 2; ++qb) {
                    o[qb][jv] = __builtin_amdgcn_mfma_f32_16x16x16bf16_1k(ph[qb][kc], vh, o[qb][jv], 0, 0, 0);
                    if (FB_PARTS == 2) {
                        o[qb][jv] = __builtin_amdgcn_mfma_f32_16x16x16bf16_1k(pl[qb][kc], vh, o[qb][jv], 0, 0, 0);
                        o[qb][jv] = __builtin_amdgcn_mfma_f32_16x16x16bf16_1k(ph[qb][kc], vl, o[qb][jv], 0, 0, 0);
                    }
                }
            }
        __syncthreads();
    }
#pragma unroll
    for (int qb = 0; qb < 2; ++qb) {
        l[qb] += __shfl_xor(l[qb], 16);
        l[qb] += __shfl_xor(l[qb], 32);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float li = __shfl(l[qb], 4 * qd + i);
            const int row = 32 * w + 16 * qb + 4 * qd + i;
#pragma unroll
            for (int jv = 0; jv < VDIM / 16; ++jv)
                if (row < nq) out[((int64_t)(q_row0 + row) * heads + h) * VDIM + 16 * jv + r] = o[qb][jv][i] / li;
        }
    }
#else
    // portable: thread pair (row, half) keeps half of one query row's output
    const int row = threadIdx.x / 2, half = threadIdx.x % 2;
    const float* qr = q + ((int64_t)(q_row0 + row) * heads + h) * QK;
    float o[VDIM / 2];
    for (int e = 0; e < VDIM / 2; ++e) o[e] = 0.f;
    float m = -ENGINE_INF, l = 0.f;
    for (int j0 = 0; j0 < len; j0 += FB_K) {
        fb_stage_k(sh, k, ctx, heads, h, ctx0 + j0);
        fb_stage_v(sh, vt, ctx, heads, h, ctx0 + j0);
        fb_commit();
        fb_wait<0>();
        __syncthreads();
        if (row < nq) {
            for (int key = 0; key < FB_K && j0 + key <= pos0 + row; ++key) {
                float s = 0.f;
                for (int d = 0; d < QK; ++d) s += qr[d] * (bf16_to_f32(sh.ks[0][key][d]) + (FB_PARTS == 2 ? bf16_to_f32(sh.ks[FB_PARTS - 1][key][d]) : 0.f));
                s *= scale;
                float mn = fmaxf(m, s), corr = expf(m - mn), p = expf(s - mn);
                l = l * corr + p;
                for (int e = 0; e < VDIM / 2; ++e) {
                    int d = half * (VDIM / 2) + e;
                    o[e] = o[e] * corr + p * (bf16_to_f32(sh.vt[0][d][key]) + (FB_PARTS == 2 ? bf16_to_f32(sh.vt[FB_PARTS - 1][d][key]) : 0.f));
                }
                m = mn;
            }
        }
        __syncthreads();
    }
    if (row < nq)
        for (int e = 0; e < VDIM / 2; ++e) out[((int64_t)(q_row0 + row) * heads + h) * VDIM + half * (VDIM / 2) + e] = o[e] / l;
#endif
}
