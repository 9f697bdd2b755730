// Causal flash attention of the MLA prefill (the MHA form: mla_prefill.hip decompresses the
// context and mla_prefill_kv lays out per head bf16 keys [ctx][NOPE + ROPE] and transposed values
// [VDIM][ctx]; queries f32 [T, heads, NOPE + ROPE], output f32 [T, heads, VDIM]) on bf16 operands
// (`--fp8-activations dynamic`, SGLang's numerics), in FlashAttention-2's form, NVIDIA sm_80+:
//   - a block per (128-query tile, head): 8 warps of 16 query rows; a warp's queries stay in
//     registers as A fragments for the whole loop, and its scores, probabilities and output
//     accumulator never leave registers (the m16n8k16 score fragments, packed to bf16, are P's A
//     fragments);
//   - 64-key tiles in two shared buffers: tile t + 1 lands by cp.async while t is worked on, one
//     barrier a tile; fragments by ldmatrix.x4 (two n8 tiles an instruction: keys as row-major
//     rows, values from the transposed copy);
//   - softmax in base 2 (scores × scale · log2 e), the causal mask only on tiles that cross the
//     diagonal of a warp's rows, key tiles wholly past a warp's rows skipped;
//   - heavy tiles first: block x takes the tile list from its end (a sequence's last queries see
//     the most keys), so the grid's tail is its lightest blocks.
// mla_prefill.hip's mma.sync product (64 queries × 32 keys, 4 warps, 32-bit fragment loads, two
// barriers a tile) stays for the near-f32 hi + lo operands, other head sizes and CDNA.
// Launch: grid (tiles, heads), block FA_THREADS, dynamic shared memory sizeof(FaShared) (the host
// mirrors it: mla_prefill.rs FA2_*). A tile is 4 ints as mla_prefill.hip's: first query row,
// queries (≤ FA_Q), first context row (a multiple of FA_K), position of its first query; each
// sequence's context is padded to a multiple of FA_K with finite keys the mask hides.
#include "bf16.h"

#ifndef KV_LORA
#error "KV_LORA must be defined"
#endif
#define QK (NOPE + ROPE)
#define FA_Q 128                  // queries a block
#define FA_K 64                   // keys a tile
#define FA_WARPS (FA_Q / 16)      // a warp a 16-row fragment
#define FA_THREADS (32 * FA_WARPS)
#define FA_KP (QK + 8)            // bf16 row pitches: an odd number of 16-byte chunks (QK % 16 == 0),
#define FA_VP (FA_K + 8)          // conflict-free ldmatrix

struct FaShared {
    uint16_t k[2][FA_K][FA_KP];  // key tiles
    uint16_t vt[2][VDIM][FA_VP]; // their values, transposed
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && QK % 16 == 0 && VDIM % 16 == 0
// Keys key0 .. key0 + FA_K - 1 of head h (rows of the per-head copies) into buffer b, one copy group.
__device__ __forceinline__ void fa_stage(FaShared& sh, int b, const uint16_t* __restrict__ k, const uint16_t* __restrict__ vt, int ctx, int h, int key0) {
    const uint16_t* kg = k + ((int64_t)h * ctx + key0) * QK; // FA_K contiguous rows
    for (int i = threadIdx.x; i < FA_K * (QK / 8); i += FA_THREADS) cp_async16(&sh.k[b][i / (QK / 8)][8 * (i % (QK / 8))], kg + 8 * i);
    const uint16_t* vg = vt + (int64_t)h * VDIM * ctx + key0;
    for (int i = threadIdx.x; i < VDIM * (FA_K / 8); i += FA_THREADS) {
        const int r = i / (FA_K / 8), c = i % (FA_K / 8);
        cp_async16(&sh.vt[b][r][8 * c], vg + (int64_t)r * ctx + 8 * c);
    }
    cp_async_commit();
}
#define FA_MMA 1
#endif

extern "C" __global__ void __launch_bounds__(FA_THREADS, 1) mla_flash_bf16(const float* __restrict__ q, const uint16_t* __restrict__ k, const uint16_t* __restrict__ vt,
                                                                         const int32_t* __restrict__ tiles, float* __restrict__ out, int ctx, int heads, float scale) { ENGINE_GRID_DEP();
#ifdef FA_MMA
    extern __shared__ __align__(16) unsigned char fa_smem[];
    FaShared& sh = *reinterpret_cast<FaShared*>(fa_smem);
    const int* tl = tiles + (gridDim.x - 1 - blockIdx.x) * 4;
    const int q_row0 = tl[0], nq = tl[1], ctx0 = tl[2], pos0 = tl[3];
    const int h = blockIdx.y, len = pos0 + nq; // keys the tile's last query sees
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32, g = lane / 4, tq = lane % 4;
    const int rw = 16 * w; // the warp's first row in the tile; this thread's rows rw + g, rw + g + 8
    const float scale2 = scale * 1.4426950408889634f;
    fa_stage(sh, 0, k, vt, ctx, h, ctx0);
    // the queries' A fragments: (row g, k 2tq), (row g + 8, k 2tq), (row g, k 2tq + 8), (row g + 8, k 2tq + 8)
    uint32_t qa[QK / 16][4];
#pragma unroll
    for (int kk = 0; kk < QK / 16; ++kk)
#pragma unroll
        for (int f = 0; f < 4; ++f) {
            const int r = rw + g + 8 * (f % 2);
            float2 x = make_float2(0.f, 0.f);
            if (r < nq) x = *(const float2*)(q + ((int64_t)(q_row0 + r) * heads + h) * QK + 16 * kk + 2 * tq + 8 * (f / 2));
            qa[kk][f] = bf16_pack(x.x, x.y);
        }
    float o[VDIM / 8][4];
#pragma unroll
    for (int j = 0; j < VDIM / 8; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) o[j][c] = 0.f;
    // rows g and g + 8, in base-2 units; l this thread's keys only until the end. Every row sees
    // key 0 in the first tile, so m is finite from then on and masked scores' exp2 is 0.
    float m[2] = {-ENGINE_INF, -ENGINE_INF}, l[2] = {0.f, 0.f};
    const int lrow = lane % 8 + 8 * (lane / 16), lcol = 8 * ((lane / 8) % 2); // ldmatrix.x4 row and column of this lane
    for (int key0 = 0, it = 0; key0 < len; key0 += FA_K, ++it) {
        cp_async_wait<0>();
        __syncthreads(); // tile it landed (every thread's copies); every warp is done with tile it - 1
        if (key0 + FA_K < len) fa_stage(sh, (it + 1) % 2, k, vt, ctx, h, ctx0 + key0 + FA_K);
        if (key0 > pos0 + rw + 15) continue; // every key past every row of this warp (and of the tiles after)
        // S = Q·Kᵀ: n8 tiles j = keys 8j ..; fragments of contraction step kk + 1 loaded before
        // step kk's products
        const uint16_t* krow = &sh.k[it % 2][lrow][lcol];
        float s[FA_K / 8][4];
#pragma unroll
        for (int j = 0; j < FA_K / 8; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) s[j][c] = 0.f;
        uint32_t fb[2][FA_K / 16][4];
#pragma unroll
        for (int jp = 0; jp < FA_K / 16; ++jp) ldmatrix_x4(fb[0][jp], krow + 16 * jp * FA_KP);
#pragma unroll
        for (int kk = 0; kk < QK / 16; ++kk) {
            if (kk + 1 < QK / 16) {
#pragma unroll
                for (int jp = 0; jp < FA_K / 16; ++jp) ldmatrix_x4(fb[(kk + 1) % 2][jp], krow + 16 * jp * FA_KP + 16 * (kk + 1));
            }
#pragma unroll
            for (int jp = 0; jp < FA_K / 16; ++jp) {
                mma_bf16_16816(s[2 * jp], qa[kk], fb[kk % 2][jp][0], fb[kk % 2][jp][1]);
                mma_bf16_16816(s[2 * jp + 1], qa[kk], fb[kk % 2][jp][2], fb[kk % 2][jp][3]);
            }
        }
        // scale, causal mask where the tile crosses the warp's diagonal, online softmax
        const bool diag = key0 + FA_K - 1 > pos0 + rw;
        float mx[2] = {-ENGINE_INF, -ENGINE_INF};
#pragma unroll
        for (int j = 0; j < FA_K / 8; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                float x = s[j][c] * scale2;
                if (diag && key0 + 8 * j + 2 * tq + c % 2 > pos0 + rw + g + 8 * (c / 2)) x = -ENGINE_INF;
                s[j][c] = x;
                mx[c / 2] = fmaxf(mx[c / 2], x);
            }
        float corr[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            const float mn = fmaxf(m[r], mx[r]); // finite (see above)
            corr[r] = exp2f(m[r] - mn);          // 0 the first time, 1 once the maximum settles
            m[r] = mn;
            l[r] *= corr[r];
        }
#pragma unroll
        for (int j = 0; j < FA_K / 8; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const float p = exp2f(s[j][c] - m[c / 2]);
                s[j][c] = p;
                l[c / 2] += p;
            }
        if (__any_sync(0xffffffffu, corr[0] != 1.f || corr[1] != 1.f)) {
#pragma unroll
            for (int j = 0; j < VDIM / 8; ++j) {
                o[j][0] *= corr[0];
                o[j][1] *= corr[0];
                o[j][2] *= corr[1];
                o[j][3] *= corr[1];
            }
        }
        // O += P·V: P's A fragment of keys 16c .. is score tiles 2c and 2c + 1 as bf16 pairs;
        // ldmatrix.x4 over the transposed values gives the B fragments of two value n8 tiles
        const uint16_t* vrow = &sh.vt[it % 2][lrow][lcol];
#pragma unroll
        for (int c = 0; c < FA_K / 16; ++c) {
            const uint32_t a[4] = {bf16_pack(s[2 * c][0], s[2 * c][1]), bf16_pack(s[2 * c][2], s[2 * c][3]), bf16_pack(s[2 * c + 1][0], s[2 * c + 1][1]),
                                   bf16_pack(s[2 * c + 1][2], s[2 * c + 1][3])};
            uint32_t fv[2][4];
            ldmatrix_x4(fv[0], vrow + 16 * c);
#pragma unroll
            for (int jp = 0; jp < VDIM / 16; ++jp) {
                if (jp + 1 < VDIM / 16) ldmatrix_x4(fv[(jp + 1) % 2], vrow + 16 * (jp + 1) * FA_VP + 16 * c);
                mma_bf16_16816(o[2 * jp], a, fv[jp % 2][0], fv[jp % 2][1]);
                mma_bf16_16816(o[2 * jp + 1], a, fv[jp % 2][2], fv[jp % 2][3]);
            }
        }
    }
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        inv[r] = 1.f / l[r];
    }
#pragma unroll
    for (int j = 0; j < VDIM / 8; ++j)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = rw + g + 8 * r;
            if (row < nq) *(float2*)(out + ((int64_t)(q_row0 + row) * heads + h) * VDIM + 8 * j + 2 * tq) = make_float2(o[j][2 * r] * inv[r], o[j][2 * r + 1] * inv[r]);
        }
#else
    __builtin_trap(); // the host takes mla_prefill.hip's kernel on targets without mma.sync and cp.async
#endif
}
