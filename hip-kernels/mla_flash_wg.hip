// Causal flash attention of the MLA prefill on Hopper's warpgroup MMA (sm_90a), FlashAttention-3's
// form, straight from kv_b's bf16 output kvd [ctx, heads · (NOPE + VDIM)] (each head's k_nope,
// then its value) and the rotated key parts pe [ctx, ROPE] (bf16, shared by the heads); queries
// f32 [T, heads, NOPE + ROPE], output f32 [T, heads, VDIM]; mla_flash_bf16.hip's tiles (128
// queries of one sequence a block, per head):
//   - a block is three warpgroups: a producer, one thread of which copies each 64-key tile by the
//     tensor memory accelerator (the keys as NOPE / 64 boxes of kvd and ROPE / 64 of pe, the
//     values as VDIM / 64 boxes of kvd, each 64 rows × 128 bytes, 128-byte swizzled) into a ring of
//     FW_ST stages handed over by full / empty mbarriers (as moe_f8_gemm.hip), and two consumers of
//     64 queries each, which hold their queries as bf16 A fragments in registers for the whole loop
//     (setmaxnreg moves the producer's registers to them);
//   - S = Q·Kᵀ by wgmma.m64n64k16 (Q from registers, K from shared memory: from shared memory
//     too, Q's reads and K's would fill its bandwidth as the MMAs run), the online softmax in
//     registers in base 2, then O += P·V by wgmma.m64n128k16 with P from registers (the score
//     accumulators, packed to bf16, are its A fragments) and V from shared memory, read
//     transposed (MN-major: the boxes are 64-column atoms, 8-key groups 1,024 bytes apart);
//   - tile t's S is issued before tile t - 1's P·V, so the softmax of t runs while the tensor
//     cores do t - 1's P·V; O is rescaled once that completes, and its stage is handed back;
//   - the causal mask only where a tile crosses a warp's diagonal; a consumer stops at its last
//     query's position (it hands the block's later tiles back unread); heaviest tiles first (block
//     x takes the tile list from its end).
// sm_90a, NOPE and ROPE multiples of 64 and VDIM == 128 (the host checks; DeepSeek V2 / V3 are
// 128 + 64 / 128); elsewhere it compiles a trap the host never selects.
// Launch: grid (tiles, heads), block FW_THREADS, dynamic shared memory FW_SMEM (mla_prefill.rs
// mirrors FW_*). `maps`: tensor maps (16 words each, in global memory) of kvd as bytes [ctx rows,
// 2 · heads · (NOPE + VDIM)] and of pe as bytes [ctx rows, 2 · ROPE], both in boxes of FW_K rows
// × 128 bytes. A tile is 4 ints as mla_flash_bf16.hip's. With `codes` given, the output rows go
// out as o_proj's FP8 input instead of f32 (`out` unused): each (token, head) row of VDIM = 128
// columns is one group of act_quant.hip's quantiser, whose codes and scale this writes as it
// would (codes [tokens, heads · VDIM], scales [heads, tokens]: s[h · tokens + token]).
#include "bf16.h"
#include "sm90.h"
#include "e4m3.h"

#ifndef KV_LORA
#error "KV_LORA must be defined"
#endif
#define QK (NOPE + ROPE)
#define FW_Q 128         // queries a block (two consumer warpgroups of 64)
#define FW_K 64          // keys a stage
#define FW_ST 4          // stages
#define FW_THREADS 384   // a producer and two consumer warpgroups
#define FW_QC (QK / 64)  // 128-byte (64 bf16) chunks of a key row
#define FW_KBYTES (FW_K * QK * 2)    // a stage's keys: FW_QC chunks of FW_K rows × 128 bytes
#define FW_VBYTES (VDIM * FW_K * 2)  // a stage's values: VDIM / 64 boxes of FW_K rows × 128 bytes
#define FW_STAGE (FW_KBYTES + FW_VBYTES)
#define FW_SMEM (FW_ST * FW_STAGE + 1024) // + the alignment of the first stage

#if defined(SM90_WGMMA) && NOPE % 64 == 0 && ROPE % 64 == 0 && VDIM == 128
#define FW_ON 1
// s (64 queries × 64 keys a warpgroup, 32 floats a thread) = (acc ? s : 0) + Q · Kᵀ over 16 of QK: Q
// from registers (the m16n8k16 A fragment of each warp's 16 rows), K K-major in shared memory.
__device__ __forceinline__ void fw_qk(float* d, const uint32_t* a, uint64_t db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, "
        "%24, %25, %26, %27, %28, %29, %30, %31}, "
        "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
          "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]),
          "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc));
}

// o (64 queries × 128 value columns, 64 floats a thread) = (acc ? o : 0) + P · V over 16 keys: P from
// registers (the m16n8k16 A fragment of each warp's 16 rows), V MN-major in shared memory.
__device__ __forceinline__ void fw_pv(float* d, const uint32_t* a, uint64_t db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, "
        "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, "
        "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
          "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]),
          "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]),
          "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]),
          "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc));
}
#endif

extern "C" __global__ void __launch_bounds__(FW_THREADS, 1) mla_flash_wg(const uint64_t* __restrict__ maps, const float* __restrict__ q, const int32_t* __restrict__ tiles,
                                                                       float* __restrict__ out, int heads, float scale, uint8_t* __restrict__ codes, float* __restrict__ scales, int tokens) { ENGINE_GRID_DEP();
#ifdef FW_ON
    extern __shared__ __align__(16) unsigned char fw_smem[];
    __shared__ __align__(8) uint64_t full[FW_ST], empty[FW_ST];
    uint8_t* smem = fw_smem + ((1024 - ((uint32_t)__cvta_generic_to_shared(fw_smem) & 1023)) & 1023); // 1024-aligned
    uint8_t* stages = smem;
    const int* tl = tiles + (gridDim.x - 1 - blockIdx.x) * 4;
    const int q_row0 = tl[0], nq = tl[1], ctx0 = tl[2], pos0 = tl[3];
    const int h = blockIdx.y, n_kt = (pos0 + nq + FW_K - 1) / FW_K; // key tiles the block's last query sees
    if (threadIdx.x == 0) {
        for (int s = 0; s < FW_ST; ++s) {
            sm90_bar_init(&full[s], 1);  // the producer's expectation, completed by its copies' bytes
            sm90_bar_init(&empty[s], 8); // lane 0 of each consumer warp, once its P·V has read the stage
        }
    }
    __syncthreads();
    const int wg = __shfl_sync(0xffffffff, threadIdx.x / 128, 0); // warp-uniform, visibly to ptxas
    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory"); // (its registers go to the consumers: 128 · 40 + 256 · 232 = 384 · 168)
        // producer, one thread: stage use it of slot it % FW_ST waits for the release of use it - FW_ST
        if (threadIdx.x == 0) {
            const uint64_t* mk = maps;      // kvd: keys' k_nope and values
            const uint64_t* mv = maps + 16; // pe: keys' rotated parts
            asm volatile("prefetch.tensormap [%0];\nprefetch.tensormap [%1];\n" ::"l"((uint64_t)mk), "l"((uint64_t)mv) : "memory");
            for (int it = 0; it < n_kt; ++it) {
                const int s = it % FW_ST;
                uint8_t* st = stages + s * FW_STAGE;
                if (it >= FW_ST) sm90_bar_wait(&empty[s], (it / FW_ST - 1) & 1);
                sm90_bar_expect(&full[s], FW_STAGE);
                const int key = ctx0 + it * FW_K;
                const int col = 2 * h * (NOPE + VDIM); // the head's bytes in a kvd row
#pragma unroll
                for (int c = 0; c < FW_QC; ++c) {
                    if (c < NOPE / 64) sm90_tma(st + c * FW_K * 128, mk, col + 128 * c, key, &full[s]);
                    else sm90_tma(st + c * FW_K * 128, mv, 128 * (c - NOPE / 64), key, &full[s]);
                }
#pragma unroll
                for (int c = 0; c < VDIM / 64; ++c) sm90_tma(st + FW_KBYTES + c * FW_K * 128, mk, col + 2 * NOPE + 128 * c, key, &full[s]);
            }
        }
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory"); // the queries' fragments, two probability buffers, the output
    const int c = wg - 1, w = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int rows = min(64, nq - 64 * c);
    const int mine = rows > 0 ? (pos0 + 64 * c + rows - 1) / FW_K + 1 : 0; // tiles through this consumer's last query
    const int rw = 64 * c + 16 * w; // the warp's first row in the tile; this thread's rows rw + g, rw + g + 8
    const float scale2 = scale * 1.4426950408889634f;
    // this warp's 16 queries as bf16 A fragments for the whole loop (QK / 16 steps: (row g, k 2t),
    // (g + 8, 2t), (g, 2t + 8), (g + 8, 2t + 8)); rows past the tile's queries are 0
    uint32_t qa[QK / 16][4];
#pragma unroll
    for (int kk = 0; kk < QK / 16; ++kk)
#pragma unroll
        for (int f = 0; f < 4; ++f) {
            const int r = rw + g + 8 * (f % 2);
            float2 x = make_float2(0.f, 0.f);
            if (r < nq) x = *(const float2*)(q + ((int64_t)(q_row0 + r) * heads + h) * QK + 16 * kk + 2 * t + 8 * (f / 2));
            qa[kk][f] = bf16_pack(x.x, x.y);
        }
    // s: scores (row g + 8(e / 2), key 8j + 2t + e % 2 at 4j + e); P's A fragments (keys 16kc ..
    // at 4kc: (g, 2t), (g + 8, 2t), (g, 2t + 8), (g + 8, 2t + 8)); o: the output (column 8j + 2t + e % 2)
    float s[32], o[64];
#pragma unroll
    for (int j = 0; j < 64; ++j) o[j] = 0.f;
    // rows g and g + 8, in base-2 units; l this thread's keys only until the end. Every row sees
    // key 0 in the first tile, so m is finite from then on and masked scores' exp2 is 0.
    float m[2] = {-ENGINE_INF, -ENGINE_INF}, l[2] = {0.f, 0.f};
    auto issue_qk = [&](int it) {
        const int st = it % FW_ST;
        sm90_bar_wait(&full[st], (it / FW_ST) & 1);
        const uint8_t* ks = stages + st * FW_STAGE;
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int kk = 0; kk < QK / 16; ++kk) fw_qk(s, qa[kk], sm90_desc(ks + (kk / 4) * (FW_K * 128) + 32 * (kk % 4)), kk);
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    };
    auto issue_pv = [&](int it, const uint32_t* p) {
        const uint8_t* vs = stages + (it % FW_ST) * FW_STAGE + FW_KBYTES;
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int kc = 0; kc < FW_K / 16; ++kc) fw_pv(o, p + 4 * kc, sm90_desc_mn(vs + kc * 16 * 128, FW_K * 128), 1);
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    };
    // tile it's scores → probabilities pn (bf16 A fragments), m and l updated; corr: the factor
    // the output so far takes. The maximum is taken of the raw scores (scale2 > 0: the same as
    // of the scaled ones), each probability one FFMA and one ex2; the causal mask only in the
    // form for tiles with a key past the warp's first row (the others' body has none)
    auto softmax = [&](int it, uint32_t* pn, float* corr) {
        const int key0 = it * FW_K;
        auto body = [&](auto diag) {
            // (s is only read: writing an accumulator while the P·V MMA is in flight would make
            // ptxas serialise every wgmma)
            auto masked = [&](int j, int e) { return decltype(diag)::value && key0 + 8 * j + 2 * t + e % 2 > pos0 + rw + g + 8 * (e / 2); };
            float mx[2] = {-ENGINE_INF, -ENGINE_INF};
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    if (!masked(j, e)) mx[e / 2] = fmaxf(mx[e / 2], s[4 * j + e]);
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
                const float mn = fmaxf(m[r], mx[r] * scale2); // finite (see above)
                corr[r] = sm90_exp2(m[r] - mn);                // 0 the first time, 1 once the maximum settles
                m[r] = mn;
                l[r] *= corr[r];
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                float e4[4];
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    e4[e] = masked(j, e) ? 0.f : sm90_exp2(fmaf(s[4 * j + e], scale2, -m[e / 2]));
                    l[e / 2] += e4[e];
                }
                pn[2 * j] = bf16_pack(e4[0], e4[1]);
                pn[2 * j + 1] = bf16_pack(e4[2], e4[3]);
            }
        };
        if (key0 + FW_K - 1 > pos0 + rw) body(sm90_flag<true>{}); // a key past the warp's first row
        else body(sm90_flag<false>{});
    };
    // tile it: its S is issued, then tile it - 1's P·V (probabilities pc); the softmax of it writes
    // pn while that runs (two probability buffers in turn: registers a wgmma in flight reads are
    // never written, or ptxas serialises every wgmma); then the output is rescaled
    auto step = [&](int it, const uint32_t* pc, uint32_t* pn) {
        float corr[2];
        issue_qk(it);
        issue_pv(it - 1, pc);
        asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory"); // S of tile it
        softmax(it, pn, corr);
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); // P·V of tile it - 1
        if (lane == 0) sm90_bar_arrive(&empty[(it - 1) % FW_ST]);
        if (__any_sync(0xffffffffu, corr[0] != 1.f || corr[1] != 1.f)) { // (once the maxima settle, mostly not)
#pragma unroll
            for (int j = 0; j < 16; ++j) {
                o[4 * j] *= corr[0];
                o[4 * j + 1] *= corr[0];
                o[4 * j + 2] *= corr[1];
                o[4 * j + 3] *= corr[1];
            }
        }
    };
    auto last = [&](const uint32_t* pc) { // P·V of the last tile
        issue_pv(mine - 1, pc);
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
        if (lane == 0) sm90_bar_arrive(&empty[(mine - 1) % FW_ST]);
    };
    if (mine > 0) {
        uint32_t pa[16], pb[16];
        float corr[2];
        issue_qk(0);
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
        softmax(0, pa, corr); // the output is still 0
        for (int it = 1;; it += 2) {
            if (it == mine) {
                last(pa);
                break;
            }
            step(it, pa, pb);
            if (it + 1 == mine) {
                last(pb);
                break;
            }
            step(it + 1, pb, pa);
        }
    }
    for (int it = mine; it < n_kt; ++it) { // keys past every query of this consumer: hand them back
        sm90_bar_wait(&full[it % FW_ST], (it / FW_ST) & 1);
        if (lane == 0) sm90_bar_arrive(&empty[it % FW_ST]);
    }
    if (rows <= 0) return;
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        inv[r] = 1.f / l[r];
    }
    if (codes) {
        // quant_fp8_act's numerics on the values the f32 output would hold: s = max(max|x|,
        // 1e-10) / 448 over the row's 128 columns (a quad's), q = e4m3fn(x / s)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float amax = 0.f;
#pragma unroll
            for (int j = 0; j < 32; ++j) amax = fmaxf(amax, fabsf(o[4 * (j / 2) + 2 * r + j % 2] * inv[r]));
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
            const float sc = e4m3_act_scale(amax);
            const int row = rw + g + 8 * r;
            if (row >= nq) continue;
            uint8_t* d = codes + ((int64_t)(q_row0 + row) * heads + h) * VDIM + 2 * t;
#pragma unroll
            for (int j = 0; j < 16; ++j) *(uint16_t*)(d + 8 * j) = (uint16_t)(f32_to_e4m3fn(o[4 * j + 2 * r] * inv[r] / sc) | f32_to_e4m3fn(o[4 * j + 2 * r + 1] * inv[r] / sc) << 8);
            if (t == 0) scales[(int64_t)h * tokens + q_row0 + row] = sc;
        }
        return;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = rw + g + 8 * r;
        if (row >= nq) continue;
        float* d = out + ((int64_t)(q_row0 + row) * heads + h) * VDIM + 2 * t;
#pragma unroll
        for (int j = 0; j < 16; ++j) *(float2*)(d + 8 * j) = make_float2(o[4 * j + 2 * r] * inv[r], o[4 * j + 2 * r + 1] * inv[r]);
    }
#else
    ENGINE_TRAP(); // the host takes mla_flash_bf16.hip on targets without the warpgroup MMA
#endif
}
