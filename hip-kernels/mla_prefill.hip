// MLA prefill in the MHA form (what DeepSeek's reference does for long prompts): the context's
// latents are decompressed once, kvd = kv_b · c ([ctx, heads·(NOPE+VDIM)], a tensor-core GEMM on the
// host side), then causal flash attention per (64-query tile, head) with the scores never
// materialised: K = [k_nope(head) | k_pe], V = v(head), online softmax over 32-key tiles.
// Specialised at JIT time for KV_LORA, ROPE, NOPE, VDIM (like mla.hip).
//   - NVIDIA sm_80+: 4 warps × 16 queries; S = Q·Kᵀ and O += P·V with mma.sync m16n8k16 bf16,
//     every operand split into bf16 hi + lo and three products per step (hi·hi + lo·hi + hi·lo):
//     near-f32 scores and outputs (Q and P as A fragments in registers, K and Vᵀ staged in shared
//     memory), f32 softmax.
//   - other targets: the portable scalar product over the same shared tiles (hi + lo summed), one
//     query row per thread pair.
//   - other targets: the portable product over the same shared tiles, one query row per thread pair.
// Launch: grid (tiles, heads), block 128. A tile is 4 ints: first query row in q / out, queries
// (≤ 64), first context row in kvd / pe, position of the tile's first query in its sequence.
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

// c_out[j] = the latent c and pe_out[j] = k_pe of context slot slots[j] (layer `layer`).
extern "C" __global__ void mla_gather_ctx(const float* __restrict__ kv, const uint32_t* __restrict__ slots, int layer, int num_slots,
                                          float* __restrict__ c_out, float* __restrict__ pe_out) {
    int j = blockIdx.x;
    const float* e = kv + ((int64_t)layer * num_slots + slots[j]) * ENTRY;
    for (int i = threadIdx.x; i < KV_LORA; i += blockDim.x) c_out[(int64_t)j * KV_LORA + i] = e[i];
    for (int i = threadIdx.x; i < ROPE; i += blockDim.x) pe_out[(int64_t)j * ROPE + i] = e[KV_LORA + i];
}

struct FbShared {
    uint16_t ks[2][FB_K][FB_KP];  // keys of the tile, hi and lo: [k_nope(head) | k_pe]
    uint16_t vt[2][VDIM][FB_VP];  // values, transposed, hi and lo
};

// Keys j0 .. j0+FB_K-1 of the context (zero beyond `len`) into shared memory.
__device__ __forceinline__ void fb_stage(FbShared& sh, const float* kvd, const float* pe, int ctx0, int j0, int len, int heads, int h) {
    for (int i = threadIdx.x; i < FB_K * QK; i += blockDim.x) {
        int key = i / QK, d = i % QK, j = j0 + key;
        float v = 0.f;
        if (j < len) v = d < NOPE ? kvd[(int64_t)(ctx0 + j) * heads * PER_HEAD + h * PER_HEAD + d] : pe[(int64_t)(ctx0 + j) * ROPE + d - NOPE];
        bf16_split(v, &sh.ks[0][key][d], &sh.ks[1][key][d]);
    }
    for (int i = threadIdx.x; i < FB_K * VDIM; i += blockDim.x) {
        int key = i / VDIM, d = i % VDIM, j = j0 + key;
        float v = j < len ? kvd[(int64_t)(ctx0 + j) * heads * PER_HEAD + h * PER_HEAD + NOPE + d] : 0.f;
        bf16_split(v, &sh.vt[0][d][key], &sh.vt[1][d][key]);
    }
}

extern "C" __global__ void __launch_bounds__(128) mla_flash_prefill(const float* __restrict__ q, const float* __restrict__ kvd, const float* __restrict__ pe,
                                                                   const int32_t* __restrict__ tiles, float* __restrict__ out, int heads, float scale) {
    __shared__ FbShared sh;
    const int* tl = tiles + blockIdx.x * 4;
    const int q_row0 = tl[0], nq = tl[1], ctx0 = tl[2], pos0 = tl[3];
    const int h = blockIdx.y;
    const int len = pos0 + nq; // keys the tile's last query sees
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
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
    for (int j0 = 0; j0 < len; j0 += FB_K) {
        fb_stage(sh, kvd, pe, ctx0, j0, len, heads, h);
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
                uint32_t bl0 = *(const uint32_t*)&sh.ks[1][kr][kc], bl1 = *(const uint32_t*)&sh.ks[1][kr][kc + 8];
                mma_bf16_16816(s[j], qh[kk], bh0, bh1);
                mma_bf16_16816(s[j], ql[kk], bh0, bh1);
                mma_bf16_16816(s[j], qh[kk], bl0, bl1);
            }
        }
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
                uint32_t bl0 = *(const uint32_t*)&sh.vt[1][vr][vc], bl1 = *(const uint32_t*)&sh.vt[1][vr][vc + 8];
                mma_bf16_16816(o[jv], ph[kc], bh0, bh1);
                mma_bf16_16816(o[jv], pl[kc], bh0, bh1);
                mma_bf16_16816(o[jv], ph[kc], bl0, bl1);
            }
        }
        __syncthreads();
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
#else
    // portable: thread pair (row, half) keeps half of one query row's output
    const int row = threadIdx.x / 2, half = threadIdx.x % 2;
    const float* qr = q + ((int64_t)(q_row0 + row) * heads + h) * QK;
    float o[VDIM / 2];
    for (int e = 0; e < VDIM / 2; ++e) o[e] = 0.f;
    float m = -ENGINE_INF, l = 0.f;
    for (int j0 = 0; j0 < len; j0 += FB_K) {
        fb_stage(sh, kvd, pe, ctx0, j0, len, heads, h);
        __syncthreads();
        if (row < nq) {
            for (int key = 0; key < FB_K && j0 + key <= pos0 + row; ++key) {
                float s = 0.f;
                for (int d = 0; d < QK; ++d) s += qr[d] * (bf16_to_f32(sh.ks[0][key][d]) + bf16_to_f32(sh.ks[1][key][d]));
                s *= scale;
                float mn = fmaxf(m, s), corr = expf(m - mn), p = expf(s - mn);
                l = l * corr + p;
                for (int e = 0; e < VDIM / 2; ++e) {
                    int d = half * (VDIM / 2) + e;
                    o[e] = o[e] * corr + p * (bf16_to_f32(sh.vt[0][d][key]) + bf16_to_f32(sh.vt[1][d][key]));
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
