// MLA decode attention in the absorbed (MQA) form on Hopper's warpgroup MMA (sm_90a), for head
// groups of 64 (V3's 128 heads: two groups) with bf16 operands, the layout of FlashMLA:
//   scores  S[h][j] = [q_lat | q_pe](h) · [c | k_pe](j)    (ENTRY = KV_LORA + ROPE = 576 wide)
//   output  O[h][:] = Σ_j softmax_j(scale · S[h][j]) c(j)  (the first KV_LORA = 512 columns)
// mla_decode.hip's mma.sync form round-trips the scores through shared memory and loads every
// fragment by 32-bit reads (132 TFLOP/s at batch 256: a third of its issue slots, a third of the
// stalls on the MIO queue). Here a block is two warpgroups over one token's 64 heads and a range
// of its context, in tiles of 64 keys:
//   - the queries as bf16 in shared memory, 9 chunks of [64 rows × 128 bytes] with the 128-byte
//     swizzle (16-byte piece p of row r at r · 128 + 16 · (p ^ r % 8)), staged once; each key
//     tile the same way by cp.async from the cache (two tiles: the next lands while one is used);
//   - warpgroup 0: S = Q·Kᵀ by wgmma.m64n64k16 (both operands from shared memory, 36 steps), the
//     online softmax in registers in base 2, P as bf16 kept in registers (its own P·V's A
//     fragments) and written to shared memory (swizzled, for warpgroup 1) with each row's rescale;
//   - both: O[:, 256 w ..] = O · corr + P·V by wgmma.m64n256k16 over the tile's 64 keys (4 steps),
//     V the same key tile read transposed (MN-major: 64-column atoms 8 KB apart, 8-key groups 1 KB
//     apart), 128 accumulators a thread;
//   - one block barrier a tile (the tile landed, the other tile and P free again) and one named
//     barrier (P ready for warpgroup 1); shared memory written by threads is fenced to the async
//     proxy before a wgmma reads it.
// The queries: q_pe from q (f32) and q_lat either f32 or, where `q_lat16` is given, bf16 as
// mla_heads.hip's `_by` kernels write it (the same rounding this kernel applies: half the bytes,
// copied by cp.async without registers, one memory latency instead of two batches of loads).
// Splits of the context (blockIdx.z) write unnormalised partials for mla.hip's mla_merge, as
// mla_decode.hip does; one split writes the output, f32 or (`lat16` given) bf16. sm_90a with
// KV_LORA 512 and ROPE 64 only (the host checks); elsewhere the kernel is a trap the host never
// selects.
// Launch: grid (tokens × heads / 64, 1, splits) (a token's head groups adjacent), block 256, dynamic shared memory WD_SMEM (passed,
// and checked, as `smem`; mla_decode.rs mirrors it).
#include "mla_decode_stage.h"
#include "sm90.h"

#define WD_H 64       // heads a block
#define WD_KT 64      // keys a tile
#define WD_THREADS 256
#define WD_CH 8192    // a chunk: 64 rows × 128 bytes
#define WD_NC (ENTRY / 64) // chunks of a row (9)
#define WD_TILE (WD_NC * WD_CH)
#define WD_Q 0
#define WD_K (WD_Q + WD_TILE)          // two key tiles
#define WD_P (WD_K + 2 * WD_TILE)       // probabilities, one chunk
#define WD_CORR (WD_P + WD_CH)          // 64 rescales
#define WD_ML (WD_CORR + 4 * WD_H)      // 64 (max, scale) pairs
#define WD_SMEM (WD_ML + 8 * WD_H + 1024) // + the alignment of the first chunk
#define WD_OP (2 * KV_LORA + 16)          // bytes a staged bf16 output row (4-byte writes conflict-free)

#if defined(SM90_WGMMA) && KV_LORA == 512 && ROPE == 64
#define WD_ON 1
static_assert(WD_H * WD_OP <= 2 * WD_TILE, "the staged bf16 output fits the two key tiles");

// s (64 heads × 64 keys, 32 floats a thread) = (acc ? s : 0) + Q · Kᵀ over 16 of ENTRY, both from
// shared memory (K-major).
__device__ __forceinline__ void wd_qk(float* d, uint64_t da, uint64_t db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, "
        "%24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
          "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]),
          "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(acc));
}

#define WD_O128                                                                                                                                          \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, " \
    "%31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, "  \
    "%60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, "  \
    "%89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, " \
    "%115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}"
#define WD_F8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define WD_OUTS                                                                                                                                          \
    WD_F8(0), WD_F8(8), WD_F8(16), WD_F8(24), WD_F8(32), WD_F8(40), WD_F8(48), WD_F8(56), WD_F8(64), WD_F8(72), WD_F8(80), WD_F8(88), WD_F8(96),        \
        WD_F8(104), WD_F8(112), WD_F8(120)

// o (64 heads × 256 value columns, 128 floats a thread) += P · V over 16 keys: P from registers
// (each warp's m16n8k16 A fragment), V MN-major in shared memory.
__device__ __forceinline__ void wd_pv_reg(float* d, const uint32_t* a, uint64_t db) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 " WD_O128 ", {%128, %129, %130, %131}, %132, 1, 1, 1, 1;\n"
                 : WD_OUTS
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}

// The same with P from shared memory (K-major).
__device__ __forceinline__ void wd_pv_smem(float* d, uint64_t da, uint64_t db) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 " WD_O128 ", %128, %129, 1, 1, 1, 0, 1;\n" : WD_OUTS : "l"(da), "l"(db));
}

// 16-byte piece p (0-7) of row r of a swizzled chunk.
__device__ __forceinline__ int wd_sw(int r, int p) { return r * 128 + ((p ^ (r & 7)) << 4); }

// Keys key0 .. key0 + 63 of the context into the swizzled key tile `kt` by cp.async, zero past n;
// 4 threads a key (`slot`: this thread's key's, md_slot's lookup a tile ahead, so that the copies
// need not wait for it), each every 4th of its 72 pieces; one commit group.
static_assert(WD_THREADS / WD_KT == 4, "wd_fetch: 4 threads a key, as md_slot looks them up");
__device__ __forceinline__ void wd_fetch(uint8_t* kt, const uint16_t* __restrict__ base, uint32_t slot, int key0, int n) {
    const int key = threadIdx.x / 4, part = threadIdx.x % 4;
    const bool live = key0 + key < n;
    const uint16_t* e = base + (int64_t)slot * ENTRY;
    const unsigned d = (unsigned)__cvta_generic_to_shared(kt);
#pragma unroll
    for (int i = 0; i < 18; ++i) {
        const int p = part + 4 * i; // 0..71
        const unsigned dst = d + (p / 8) * WD_CH + wd_sw(key, p % 8);
        cp_async16_fill(dst, e + 8 * p, live ? 16 : 0);
    }
    cp_async_commit();
}

// The queries [q_lat | q_pe] as bf16, swizzled: 64 rows × 72 pieces of 8 columns, WD_QI pieces a
// thread (piece tid + 256 i), loaded in batches of WD_QB (every load of a batch issued before any
// is stored; the first batch before the slot lookups: one loop of load-then-store left a block
// nine memory latencies in its prologue).
#define WD_QI (WD_H * (ENTRY / 8) / WD_THREADS)
#define WD_QB 9
static_assert(WD_H * (ENTRY / 8) % WD_THREADS == 0 && WD_QI % WD_QB == 0, "whole batches of query pieces");
__device__ __forceinline__ void wd_q_load(float (&v)[WD_QB][8], int b, const float* __restrict__ q, const float* __restrict__ q_lat, int t, int h0, int heads) {
#pragma unroll
    for (int u = 0; u < WD_QB; ++u) md_query_item<ENTRY>(v[u], threadIdx.x + (b * WD_QB + u) * WD_THREADS, q, q_lat, t, h0, heads);
}
__device__ __forceinline__ void wd_q_store(uint8_t* sm, const float (&v)[WD_QB][8], int b) {
#pragma unroll
    for (int u = 0; u < WD_QB; ++u) {
        const int i = threadIdx.x + (b * WD_QB + u) * WD_THREADS, r = i / (ENTRY / 8), p = i % (ENTRY / 8);
        const float* a = v[u];
        *(uint4*)(sm + WD_Q + (p / 8) * WD_CH + wd_sw(r, p % 8)) = make_uint4(bf16_pack(a[0], a[1]), bf16_pack(a[2], a[3]), bf16_pack(a[4], a[5]), bf16_pack(a[6], a[7]));
    }
}

// With q_lat given as bf16 ([T, heads, KV_LORA], the heads kernel's `_by` output): its 64 rows ×
// 64 pieces by 16-byte cp.async into the swizzled chunks 0-7 (16 a thread, no registers; the
// first tile's wait covers them), and q_pe's 64 rows × 8 pieces (f32, in q) through registers,
// 2 a thread, stored as bf16 into chunk 8.
#define WD_QPE (WD_H * ROPE / 8 / WD_THREADS)
static_assert(WD_H * (KV_LORA / 8) % WD_THREADS == 0 && WD_QPE <= WD_QB, "whole rounds of q_lat and q_pe pieces");
__device__ __forceinline__ void wd_q16_copy(uint8_t* sm, const uint16_t* __restrict__ q_lat16, int t, int h0, int heads) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(sm + WD_Q);
#pragma unroll
    for (int u = 0; u < WD_H * (KV_LORA / 8) / WD_THREADS; ++u) {
        const int i = threadIdx.x + u * WD_THREADS, r = i / (KV_LORA / 8), p = i % (KV_LORA / 8);
        cp_async16_fill(d + (p / 8) * WD_CH + wd_sw(r, p % 8), q_lat16 + ((int64_t)t * heads + h0 + r) * KV_LORA + 8 * p, 16);
    }
    cp_async_commit();
}
__device__ __forceinline__ int wd_qpe_item(int u) { // item index (row · 72 + piece) of this thread's q_pe piece u
    const int i = threadIdx.x + u * WD_THREADS;
    return i / (ROPE / 8) * (ENTRY / 8) + KV_LORA / 8 + i % (ROPE / 8);
}
__device__ __forceinline__ void wd_qpe_load(float (&v)[WD_QB][8], const float* __restrict__ q, int t, int h0, int heads) {
#pragma unroll
    for (int u = 0; u < WD_QPE; ++u) md_query_item<ENTRY>(v[u], wd_qpe_item(u), q, q, t, h0, heads); // (q_lat unread: q_pe pieces only)
}
__device__ __forceinline__ void wd_qpe_store(uint8_t* sm, const float (&v)[WD_QB][8]) {
#pragma unroll
    for (int u = 0; u < WD_QPE; ++u) {
        const int i = wd_qpe_item(u), r = i / (ENTRY / 8), p = i % (ENTRY / 8);
        const float* a = v[u];
        *(uint4*)(sm + WD_Q + (p / 8) * WD_CH + wd_sw(r, p % 8)) = make_uint4(bf16_pack(a[0], a[1]), bf16_pack(a[2], a[3]), bf16_pack(a[4], a[5]), bf16_pack(a[6], a[7]));
    }
}

__device__ __forceinline__ void wd_fence_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
#endif

extern "C" __global__ void __launch_bounds__(WD_THREADS, 1)
    mla_decode_wg(const float* __restrict__ q, const float* __restrict__ q_lat, const uint16_t* __restrict__ kv, const uint32_t* __restrict__ slots,
                  const uint32_t* __restrict__ ctx_off, const uint32_t* __restrict__ ctx_len, float* __restrict__ lat_out, int heads, int layer,
                  int num_slots, float scale, int splits, int min_chunk, float* __restrict__ part, int smem, const uint16_t* __restrict__ q_lat16,
                  uint16_t* __restrict__ lat16) {
    ENGINE_GRID_DEP();
#ifdef WD_ON
    extern __shared__ __align__(16) unsigned char wd_raw[];
    if (smem < WD_SMEM) __trap(); // the host's layout and this one disagree
    uint8_t* sm = wd_raw + ((1024 - ((uint32_t)__cvta_generic_to_shared(wd_raw) & 1023)) & 1023); // 1024-aligned
    float* corr_s = (float*)(sm + WD_CORR);
    float* ml_s = (float*)(sm + WD_ML);
    // a token's head groups adjacent in the grid: its blocks run in the same wave and share the
    // cache entries through L2 (with the token outermost, as the other decode kernels launch,
    // batch 256's second head group re-read every entry from DRAM a wave later: 380 against
    // 228 MB a launch, 4-5% slower)
    const int groups = heads / WD_H, t = blockIdx.x / groups, h0 = blockIdx.x % groups * WD_H, z = blockIdx.z, tid = threadIdx.x;
    float qv[WD_QB][8];
    if (q_lat16) { // q_lat as bf16: its pieces by cp.async straight to the swizzled chunks, q_pe's loaded
        wd_q16_copy(sm, q_lat16, t, h0, heads);
        wd_qpe_load(qv, q, t, h0, heads);
    } else {
        wd_q_load(qv, 0, q, q_lat, t, h0, heads); // in flight while the slots are looked up
    }
    const uint32_t* sl = slots + ctx_off[t];
    const int total = ctx_len[t];
    const int chunk = max((total + splits - 1) / splits, min_chunk);
    const int j0 = z * chunk, n = min(total, j0 + chunk);
    const uint16_t* base = kv + (int64_t)layer * num_slots * ENTRY;
    const int wg = __shfl_sync(0xffffffffu, tid / 128, 0), w = (tid / 32) % 4, lane = tid % 32, g = lane / 4, tq = lane % 4;
    const int r0 = 16 * w + g; // this thread's rows r0, r0 + 8 (of the block's 64 heads)
    if (j0 >= n) { // an empty split (graph steps launch a fixed number): an empty partial
        if (splits > 1 && tid < WD_H && h0 + tid < heads) md_header(part, t, heads, h0 + tid, splits, z, -ENGINE_INF, 0.f);
        cp_async_wait<0>(); // (the query copies land before the block's shared memory goes)
        return;
    }
    wd_fetch(sm + WD_K, base, md_slot<WD_KT, WD_THREADS>(sl, j0, n), j0, n);
    uint32_t slot = md_slot<WD_KT, WD_THREADS>(sl, j0 + WD_KT, n); // the next tile's
    if (q_lat16) {
        wd_qpe_store(sm, qv);
    } else {
        wd_q_store(sm, qv, 0);
#pragma unroll
        for (int b = 1; b < WD_QI / WD_QB; ++b) {
            wd_q_load(qv, b, q, q_lat, t, h0, heads);
            wd_q_store(sm, qv, b);
        }
    }
    const float scale2 = scale * 1.4426950408889634f;
    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    float m[2] = {-ENGINE_INF, -ENGINE_INF}, l[2] = {0.f, 0.f}; // warpgroup 0: rows r0, r0 + 8, base 2
    const int ntiles = (n - j0 + WD_KT - 1) / WD_KT;
    for (int it = 0; it < ntiles; ++it) {
        const int key0 = j0 + it * WD_KT;
        uint8_t* kt = sm + WD_K + (it % 2) * WD_TILE;
        cp_async_wait<0>();
        wd_fence_async(); // this thread's copies (and query stores) to the MMA's proxy
        __syncthreads();  // every thread's; both warpgroups done with the other tile and with P
        if (it + 1 < ntiles) {
            wd_fetch(sm + WD_K + ((it + 1) % 2) * WD_TILE, base, slot, key0 + WD_KT, n);
            slot = md_slot<WD_KT, WD_THREADS>(sl, key0 + 2 * WD_KT, n);
        }
        uint32_t pa[16]; // warpgroup 0: P's A fragments (keys 16kc .. at 4kc)
        if (wg == 0) {
            float s[32];
            asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
            for (int kk = 0; kk < ENTRY / 16; ++kk) {
                const int off = (kk / 4) * WD_CH + 32 * (kk % 4);
                wd_qk(s, sm90_desc(sm + WD_Q + off), sm90_desc(kt + off), kk);
            }
            asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
            asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
            // online softmax of rows r0 (e < 2) and r0 + 8 (e ≥ 2): key key0 + 8j + 2tq + e % 2
            float mx[2] = {-ENGINE_INF, -ENGINE_INF};
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const bool live = key0 + 8 * j + 2 * tq + (e & 1) < n;
                    s[4 * j + e] = live ? s[4 * j + e] * scale2 : -ENGINE_INF;
                    mx[e / 2] = fmaxf(mx[e / 2], s[4 * j + e]);
                }
            float cr[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
                const float mn = fmaxf(m[r], mx[r]); // finite: the tile has a live key
                cr[r] = exp2f(m[r] - mn);
                m[r] = mn;
                l[r] *= cr[r];
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                float e4[4];
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    e4[e] = exp2f(s[4 * j + e] - m[e / 2]); // masked: exp2(-inf) = 0
                    l[e / 2] += e4[e];
                }
                pa[2 * j] = bf16_pack(e4[0], e4[1]);
                pa[2 * j + 1] = bf16_pack(e4[2], e4[3]);
                // P for warpgroup 1: rows r0 / r0 + 8, keys 8j + 2tq (piece j, bytes 4tq)
                *(uint32_t*)(sm + WD_P + wd_sw(r0, j) + 4 * tq) = pa[2 * j];
                *(uint32_t*)(sm + WD_P + wd_sw(r0 + 8, j) + 4 * tq) = pa[2 * j + 1];
            }
            if (tq == 0) {
                corr_s[r0] = cr[0];
                corr_s[r0 + 8] = cr[1];
            }
            wd_fence_async();
            asm volatile("bar.arrive 1, 256;\n" ::: "memory"); // P and the rescales are ready
#pragma unroll
            for (int j = 0; j < 32; ++j) {
                o[4 * j] *= cr[0];
                o[4 * j + 1] *= cr[0];
                o[4 * j + 2] *= cr[1];
                o[4 * j + 3] *= cr[1];
            }
            asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
            for (int kc = 0; kc < WD_KT / 16; ++kc) wd_pv_reg(o, pa + 4 * kc, sm90_desc_mn(kt + kc * 16 * 128, WD_CH));
        } else {
            asm volatile("bar.sync 1, 256;\n" ::: "memory");
            const float c0 = corr_s[r0], c1 = corr_s[r0 + 8];
#pragma unroll
            for (int j = 0; j < 32; ++j) {
                o[4 * j] *= c0;
                o[4 * j + 1] *= c0;
                o[4 * j + 2] *= c1;
                o[4 * j + 3] *= c1;
            }
            asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
            for (int kc = 0; kc < WD_KT / 16; ++kc) wd_pv_smem(o, sm90_desc(sm + WD_P + 32 * kc), sm90_desc_mn(kt + 4 * WD_CH + kc * 16 * 128, WD_CH));
        }
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    }
    if (wg == 0) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
            l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        }
        if (tq == 0) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int row = r0 + 8 * r;
                const float mnat = m[r] * 0.6931471805599453f; // base 2 → natural, as mla_merge reads it
                ml_s[2 * row] = mnat;
                ml_s[2 * row + 1] = splits > 1 ? 1.f : 1.f / l[r];
                if (splits > 1 && h0 + row < heads) md_header(part, t, heads, h0 + row, splits, z, mnat, l[r]);
            }
        }
    }
    __syncthreads();
    // this warpgroup's 256 columns: element (row r0 + 8(e / 2), column 256 wg + 8j + 2tq + e % 2);
    // with one split and `lat16` given, as bf16 rounded to nearest even (the value projection's
    // input, mla_heads.hip's `_bx` kernels: half the bytes written and read back), staged in the
    // key tiles (free: every MMA is done) so that the block's 64 rows, one contiguous 64 KB
    // range of the output, go out in 16-byte stores a warp's 512 contiguous bytes at a time (the
    // fragments' own 4-byte stores, half sectors, made the kernel 4% slower than f32 pairs)
    if (lat16 && splits == 1) {
        uint8_t* stage = sm + WD_K;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = r0 + 8 * r;
            const float f = ml_s[2 * row + 1];
#pragma unroll
            for (int j = 0; j < 32; ++j) *(uint32_t*)(stage + row * WD_OP + 2 * (256 * wg + 8 * j + 2 * tq)) = bf16_pack(o[4 * j + 2 * r] * f, o[4 * j + 2 * r + 1] * f);
        }
        __syncthreads();
        uint16_t* dst = lat16 + ((int64_t)t * heads + h0) * KV_LORA;
#pragma unroll
        for (int u = 0; u < WD_H * KV_LORA / 8 / WD_THREADS; ++u) {
            const int i = tid + u * WD_THREADS, r = i / (KV_LORA / 8), p = i % (KV_LORA / 8);
            *(uint4*)(dst + r * KV_LORA + 8 * p) = *(const uint4*)(stage + r * WD_OP + 16 * p);
        }
        return;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = r0 + 8 * r;
        const float f = ml_s[2 * row + 1];
#pragma unroll
        for (int j = 0; j < 32; ++j) *(float2*)md_dst(part, lat_out, t, heads, h0, row, 256 * wg + 8 * j + 2 * tq, splits, z) = make_float2(o[4 * j + 2 * r] * f, o[4 * j + 2 * r + 1] * f);
    }
#else
    ENGINE_TRAP(); // the host takes mla_decode.hip on targets without the warpgroup MMA
#endif
}
