// The staging both MLA decode kernels share (mla_decode.hip's 64-head tiles, mla_decode_rows.hip's
// 16-head rows): the heads' queries as bf16 rows [q_lat | q_pe | 0 ..] and, on NVIDIA sm_80+, a
// tile of cache entries landing by cp.async straight into shared memory. Shapes come from the
// module's defines (KV_LORA, ROPE, NOPE); row pitches and tile sizes from the kernel.
#pragma once
#include "bf16.h"

#ifndef KV_LORA
#error "KV_LORA must be defined"
#endif
#define ENTRY (KV_LORA + ROPE)
#define QK (NOPE + ROPE)
// 16-byte query loads: q_lat rows and the q_pe parts of q rows on 16-byte boundaries
#define MD_QVEC (KV_LORA % 8 == 0 && QK % 4 == 0 && NOPE % 4 == 0)

// Heads h0 .. h0 + ROWS - 1 of token t as bf16 rows sq[ROWS][DP], D columns (a multiple of 8; zero
// past ENTRY and for heads past `heads`), in two steps: md_load_queries issues every load of the
// thread's share into registers (so that a kernel can start them first and have them in flight
// while it looks up slots and starts its copies), md_store_queries converts and stores them. Two
// 16-byte loads per 8 columns where the rows allow (scalar loads, 8 a thread and each warp
// instruction over 32 sectors, kept the LG queue full for most of a short context's time).
template <int ROWS, int D, int THREADS>
struct MdQueries {
    float v[(ROWS * (D / 8) + THREADS - 1) / THREADS][8];
};

// Item i of the queries (row i / (D / 8), 8 columns from 8 · (i % (D / 8))) into v.
template <int D>
__device__ __forceinline__ void md_query_item(float* v, int i, const float* __restrict__ q, const float* __restrict__ q_lat, int t, int h0, int heads) {
    const int c = 8 * (i % (D / 8)), h = h0 + i / (D / 8);
    const float* ql = q_lat + ((int64_t)t * heads + h) * KV_LORA;
    const float* qp = q + ((int64_t)t * heads + h) * QK + NOPE - KV_LORA; // indexed by the column
    if (MD_QVEC && h < heads && (c + 8 <= KV_LORA || (c >= KV_LORA && c + 8 <= ENTRY))) {
        const float4* src = (const float4*)(c < KV_LORA ? ql + c : qp + c);
        const float4 a = src[0], b = src[1];
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const int d = c + e;
            v[e] = 0.f;
            if (h < heads && d < KV_LORA) v[e] = ql[d];
            else if (h < heads && d < ENTRY) v[e] = qp[d];
        }
    }
}

template <int D, int DP>
__device__ __forceinline__ void md_query_store(uint16_t (*sq)[DP], int i, const float* v) {
    *(uint4*)&sq[i / (D / 8)][8 * (i % (D / 8))] = make_uint4(bf16_pack(v[0], v[1]), bf16_pack(v[2], v[3]), bf16_pack(v[4], v[5]), bf16_pack(v[6], v[7]));
}

template <int ROWS, int D, int THREADS>
__device__ __forceinline__ void md_load_queries(MdQueries<ROWS, D, THREADS>& r, const float* __restrict__ q, const float* __restrict__ q_lat, int t, int h0, int heads) {
#pragma unroll
    for (int u = 0; u < (ROWS * (D / 8) + THREADS - 1) / THREADS; ++u)
        if (threadIdx.x + u * THREADS < ROWS * (D / 8)) md_query_item<D>(r.v[u], threadIdx.x + u * THREADS, q, q_lat, t, h0, heads);
}

template <int ROWS, int D, int DP, int THREADS>
__device__ __forceinline__ void md_store_queries(uint16_t (*sq)[DP], const MdQueries<ROWS, D, THREADS>& r) {
#pragma unroll
    for (int u = 0; u < (ROWS * (D / 8) + THREADS - 1) / THREADS; ++u)
        if (threadIdx.x + u * THREADS < ROWS * (D / 8)) md_query_store<D, DP>(sq, threadIdx.x + u * THREADS, r.v[u]);
}

// Both steps in one loop (the 64-head kernel: its share is 18 items a thread).
template <int ROWS, int D, int DP, int THREADS>
__device__ __forceinline__ void md_stage_queries(uint16_t (*sq)[DP], const float* __restrict__ q, const float* __restrict__ q_lat, int t, int h0, int heads) {
#pragma unroll
    for (int i = threadIdx.x; i < ROWS * (D / 8); i += THREADS) {
        float v[8];
        md_query_item<D>(v, i, q, q_lat, t, h0, heads);
        md_query_store<D, DP>(sq, i, v);
    }
}

// Zeroes columns ENTRY .. W - 1 of `rows` rows (the padding no copy writes; stale shared memory
// could hold NaN patterns, and 0 · NaN is NaN in the products).
template <int DP, int W, int THREADS>
__device__ __forceinline__ void md_zero_pad(uint16_t (*k)[DP], int rows) {
    if constexpr (W > ENTRY)
        for (int i = threadIdx.x; i < rows * (W - ENTRY); i += THREADS) k[i / (W - ENTRY)][ENTRY + i % (W - ENTRY)] = 0;
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && ENTRY % 8 == 0
#define MD_CP_ASYNC 1
// The cache slot of this thread's key in a tile of KT keys from key0 (THREADS / KT threads a key),
// looked up a tile ahead so that the copies need not wait for it; 0 past n.
template <int KT, int THREADS>
__device__ __forceinline__ uint32_t md_slot(const uint32_t* __restrict__ sl, int key0, int n) {
    const int key = key0 + threadIdx.x / (THREADS / KT);
    return key < n ? sl[key] : 0u;
}

// The entries of keys key0 .. key0 + KT - 1 into k[KT][DP] by cp.async: THREADS / KT threads a key,
// each every (THREADS / KT)-th 16-byte chunk of it (8 bf16), zero-filled for keys past n; one
// commit group.
template <int KT, int DP, int THREADS>
__device__ __forceinline__ void md_fetch(uint16_t (*k)[DP], const uint16_t* __restrict__ base, uint32_t slot, int key0, int n) {
    constexpr int TPK = THREADS / KT;
    const int key = threadIdx.x / TPK, part = threadIdx.x % TPK;
    const int bytes = key0 + key < n ? 16 : 0; // 0: the copy writes zeros
    // one base address each, the chunks at constant offsets from it (per-chunk 64-bit address
    // arithmetic was three or four instructions a copy)
    const uint16_t* e = base + (int64_t)slot * ENTRY + 8 * part;
    const unsigned d = (unsigned)__cvta_generic_to_shared(&k[key][8 * part]);
#pragma unroll
    for (int c = 0; c < ENTRY; c += 8 * TPK) {
        if ((ENTRY / 8) % TPK == 0 || c + 8 * part < ENTRY)
            cp_async16_fill(d + 2 * c, e + c, bytes);
    }
    cp_async_commit();
}
#endif

// Where element (r, c) of head row h0 + r's result goes: its split's unnormalised partial
// ([T, heads, splits, 2 + KV_LORA], after the max and sum) or, with one split, the output.
__device__ __forceinline__ float* md_dst(float* part, float* lat_out, int t, int heads, int h0, int r, int c, int splits, int z) {
    const int64_t th = (int64_t)t * heads + h0 + r;
    return splits > 1 ? part + (th * splits + z) * (2 + KV_LORA) + 2 + c : lat_out + th * KV_LORA + c;
}

// The (max, sum) header of head h's partial for split z.
__device__ __forceinline__ void md_header(float* part, int t, int heads, int h, int splits, int z, float m, float l) {
    float* pz = part + (((int64_t)t * heads + h) * splits + z) * (2 + KV_LORA);
    pz[0] = m;
    pz[1] = l;
}
