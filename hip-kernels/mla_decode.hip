// MLA decode attention in the absorbed (MQA) form on the matrix units, bf16 operands (the
// `--fp8-activations dynamic` numerics; FlashMLA's too): all of a token's heads share each cache
// entry, so a block takes MD_H heads of one token and walks a range of its context in tiles of
// MD_KT keys, reading each entry once per MD_H heads (mla.hip's CUDA-core kernel reads it once per
// 4 heads and spends a warp-wide reduction per key and head).
//   scores  S[h][j] = [q_lat | q_pe](h) · [c | k_pe](j)    (MD_D wide: KV_LORA + ROPE, zero-padded)
//   output  O[h][:] = Σ_j softmax_j(scale · S[h][j]) c(j)  (the first KV_LORA columns of the entry)
// The latent cache is bf16 in that mode (`kv_write_bf16`; SGLang's KV cache dtype for these
// checkpoints). Per tile: the entries are staged as bf16 rows (the keys; their first KV_LORA
// columns are the values too), S = Q·Kᵀ goes to shared memory (the MD_SP warps of a 16-head row tile each take a
// share of the contraction), the softmax runs on it in portable code (rows of threads, online max
// and sum), P goes back as bf16 and O += P·V accumulates in registers (the same warps each take a
// share of the value columns). Only the two products and the accumulator's element order are per
// vendor:
//   - NVIDIA sm_80+: 64 heads and 32 keys a block, 16 warps (MD_SP 4: 64 accumulator registers a
//     thread, so that 16 warps fit); mma.sync m16n8k16 bf16, values read as B fragments with
//     ldmatrix.trans; the next tile's entries land by cp.async straight into the second key tile
//     while the current one is worked on;
//   - CDNA gfx942 / gfx950: 32 heads and 16 keys (the 64 KB of LDS a block), 4 wavefronts; MFMA
//     16x16x16 bf16 (compiled and checked for spills; never run: no AMD GPU here);
//   - other targets, and MD_PORTABLE (the backend's `flash_portable`, run on the H200 by the
//     tests): the portable product over the same staging, tiles and softmax.
// Splits of the context (blockIdx.z) write unnormalised partials for mla.hip's mla_merge, in
// its layout [T, heads, splits, 2 + KV_LORA]. Launch: grid (tokens, ceil(heads / MD_H), splits),
// block MD_THREADS, dynamic shared memory sizeof(MdShared) (passed, and checked, as `smem`).
#include "mla_decode_stage.h"

#if !defined(MD_PORTABLE) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define MD_MMA_SYNC 1
#elif !defined(MD_PORTABLE) && (defined(__gfx942__) || defined(__gfx950__))
#define MD_MFMA 1
typedef short md_short4 __attribute__((ext_vector_type(4)));
typedef float md_float4 __attribute__((ext_vector_type(4)));
#endif

// MD_SP: the warps of a row tile split the score contraction and the value columns MD_SP ways
#if defined(__AMDGCN__)
#define MD_H 32
#define MD_KT 16
#define MD_THREADS 256
#define MD_SP 2
#else
#define MD_H 64
#define MD_KT 32
#define MD_THREADS 512
#define MD_SP 4
#ifdef MD_CP_ASYNC
#define MD_ASYNC 1
#endif
#endif
#define MD_PAD (16 * MD_SP)
#define MD_D ((ENTRY + MD_PAD - 1) / MD_PAD * MD_PAD)     // score contraction, zero-padded
#define MD_DP (MD_D + 8)                                  // padded bf16 row: conflict-free fragment reads
#define MD_VW ((KV_LORA + MD_PAD - 1) / MD_PAD * MD_PAD)  // value columns computed (those past KV_LORA dropped)
#define MD_RT (MD_H / 16)                                 // row tiles
#define MD_TPK (MD_THREADS / MD_KT)                       // staging threads per key
#define MD_TPR (MD_THREADS / MD_H) // softmax threads per row
#define MD_KPT (MD_KT / MD_TPR)    // ... and keys per thread
#if MD_RT * MD_SP * WARP != MD_THREADS || MD_KPT % 2 != 0
#error "a warp per (row tile, part), and key pairs per softmax thread"
#endif

#ifdef MD_ASYNC
#define MD_KB 2 // key tiles: the next one lands by cp.async while the current one is worked on
#else
#define MD_KB 1
#endif

typedef uint16_t MdKeys[MD_KT][MD_DP];

struct MdShared {
    uint16_t q[MD_H][MD_DP];      // the heads' [q_lat | q_pe], bf16
    MdKeys k[MD_KB];              // tiles of cache entries (zero past the range's end and in the padding)
    float s[MD_SP][MD_H][MD_KT + 4]; // the contraction parts' scores
    uint16_t p[MD_H][MD_KT + 8];  // probabilities, bf16
    float corr[MD_H];             // the rows' rescale of the accumulator for this tile
    float ml[MD_H][2];            // the rows' final max and output scale (1 / sum, or 1 for a partial)
};

#if defined(MD_MMA_SYNC)
struct MdAcc {
    float c[MD_VW / (8 * MD_SP)][4]; // n8 tiles of the warp's share of the value columns
};
#elif defined(MD_MFMA)
struct MdAcc {
    md_float4 c[MD_VW / (16 * MD_SP)]; // n16 tiles of the wavefront's share
};
#else
#define MD_PER (MD_H * MD_VW / MD_THREADS)
struct MdAcc {
    float c[MD_PER]; // elements tid + MD_THREADS·i of the [MD_H][MD_VW] output
};
#endif

// Calls f(row, col, value) for each accumulator element of this thread.
template <class F>
__device__ __forceinline__ void md_each(MdAcc& a, F f) {
#if defined(MD_MMA_SYNC)
    // warp w: rows 16(w % MD_RT) .., value columns (w / MD_RT)·MD_VW/MD_SP ..
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    const int r0 = 16 * (w % MD_RT), c0 = (w / MD_RT) * (MD_VW / MD_SP);
#pragma unroll
    for (int j = 0; j < MD_VW / (8 * MD_SP); ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) f(r0 + g + 8 * (c / 2), c0 + 8 * j + 2 * t + c % 2, a.c[j][c]);
#elif defined(MD_MFMA)
    // wavefront w: rows 16(w % MD_RT) .., columns (w / MD_RT)·MD_VW/MD_SP ..; lane (r, qd) holds
    // rows 4qd + i of column r
    const int lane = threadIdx.x % 64, w = threadIdx.x / 64, r = lane % 16, qd = lane / 16;
    const int r0 = 16 * (w % MD_RT), c0 = (w / MD_RT) * (MD_VW / MD_SP);
#pragma unroll
    for (int j = 0; j < MD_VW / (16 * MD_SP); ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            float x = a.c[j][i]; // (a vector element binds to no reference)
            f(r0 + 4 * qd + i, c0 + 16 * j + r, x);
            a.c[j][i] = x;
        }
#else
#pragma unroll
    for (int i = 0; i < MD_PER; ++i) {
        int e = threadIdx.x + MD_THREADS * i;
        f(e / MD_VW, e % MD_VW, a.c[i]);
    }
#endif
}

#if defined(MD_MMA_SYNC)
// Calls f(row, col, v, v') for each pair of consecutive columns (col even) this thread holds.
template <class F>
__device__ __forceinline__ void md_pairs(const MdAcc& a, F f) {
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    const int r0 = 16 * (w % MD_RT), c0 = (w / MD_RT) * (MD_VW / MD_SP);
#pragma unroll
    for (int j = 0; j < MD_VW / (8 * MD_SP); ++j)
#pragma unroll
        for (int half = 0; half < 2; ++half) f(r0 + g + 8 * half, c0 + 8 * j + 2 * t, a.c[j][2 * half], a.c[j][2 * half + 1]);
}
#endif

// sh.s[part] = the tile's scores over one MD_SP-th of the contraction (unscaled)
__device__ __forceinline__ void md_scores(MdShared& sh, const MdKeys& k) {
#if defined(MD_MMA_SYNC)
    // warp w: rows 16(w % MD_RT) .., all MD_KT keys, contraction part w / MD_RT
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    const int r = 16 * (w % MD_RT) + g, d0 = (w / MD_RT) * (MD_D / MD_SP);
    float s[MD_KT / 8][4];
#pragma unroll
    for (int j = 0; j < MD_KT / 8; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) s[j][c] = 0.f;
#pragma unroll
    for (int kk = 0; kk < MD_D / (16 * MD_SP); ++kk) {
        const int d = d0 + 16 * kk + 2 * t;
        uint32_t a[4] = {*(const uint32_t*)&sh.q[r][d], *(const uint32_t*)&sh.q[r + 8][d], *(const uint32_t*)&sh.q[r][d + 8], *(const uint32_t*)&sh.q[r + 8][d + 8]};
#pragma unroll
        for (int j = 0; j < MD_KT / 8; ++j) mma_bf16_16816(s[j], a, *(const uint32_t*)&k[8 * j + g][d], *(const uint32_t*)&k[8 * j + g][d + 8]);
    }
#pragma unroll
    for (int j = 0; j < MD_KT / 8; ++j) {
        *(float2*)&sh.s[w / MD_RT][r][8 * j + 2 * t] = make_float2(s[j][0], s[j][1]);
        *(float2*)&sh.s[w / MD_RT][r + 8][8 * j + 2 * t] = make_float2(s[j][2], s[j][3]);
    }
#elif defined(MD_MFMA)
    // wavefront w: rows 16(w % MD_RT) .., the 16 keys, contraction part w / MD_RT
    const int lane = threadIdx.x % 64, w = threadIdx.x / 64, r = lane % 16, qd = lane / 16;
    const int r0 = 16 * (w % MD_RT), d0 = (w / MD_RT) * (MD_D / MD_SP);
    md_float4 s = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 6
    for (int kk = 0; kk < MD_D / (16 * MD_SP); ++kk) {
        const int d = d0 + 16 * kk + 4 * qd;
        md_short4 a = *(const md_short4*)&sh.q[r0 + r][d];
        md_short4 b = *(const md_short4*)&k[r][d];
        s = __builtin_amdgcn_mfma_f32_16x16x16bf16_1k(a, b, s, 0, 0, 0);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) sh.s[w / MD_RT][r0 + 4 * qd + i][r] = s[i];
#else
    for (int e = threadIdx.x; e < MD_SP * MD_H * MD_KT; e += MD_THREADS) {
        const int part = e / (MD_H * MD_KT), row = (e / MD_KT) % MD_H, key = e % MD_KT;
        float v = 0.f;
        for (int d = part * (MD_D / MD_SP); d < (part + 1) * (MD_D / MD_SP); ++d) v += bf16_to_f32(sh.q[row][d]) * bf16_to_f32(k[key][d]);
        sh.s[part][row][key] = v;
    }
#endif
}

// acc = acc · corr(row) + P·V over the tile
__device__ __forceinline__ void md_pv(const MdShared& sh, const MdKeys& k, MdAcc& acc) {
#if defined(MD_MMA_SYNC)
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    const int r = 16 * (w % MD_RT) + g, c0 = (w / MD_RT) * (MD_VW / MD_SP);
    // once the rows' maxima settle the rescale is 1 for the whole warp: skipped
    const float lo = sh.corr[r], hi = sh.corr[r + 8];
    if (__any_sync(0xffffffffu, lo != 1.f || hi != 1.f)) {
#pragma unroll
        for (int j = 0; j < MD_VW / (8 * MD_SP); ++j) {
            acc.c[j][0] *= lo;
            acc.c[j][1] *= lo;
            acc.c[j][2] *= hi;
            acc.c[j][3] *= hi;
        }
    }
#pragma unroll
    for (int kc = 0; kc < MD_KT / 16; ++kc) {
        const int kp = 16 * kc + 2 * t;
        uint32_t a[4] = {*(const uint32_t*)&sh.p[r][kp], *(const uint32_t*)&sh.p[r + 8][kp], *(const uint32_t*)&sh.p[r][kp + 8], *(const uint32_t*)&sh.p[r + 8][kp + 8]};
        // ldmatrix.x4.trans: lanes 0-7 / 8-15 / 16-23 / 24-31 address the key rows 0-7 / 8-15 /
        // 0-7 / 8-15 of columns +0 / +0 / +8 / +8; each register comes back as the B fragment
        // (two consecutive keys of one column) of n8 tile 2jp (b0, b1) and 2jp + 1 (b0, b1)
        const int key = 16 * kc + (lane % 8) + 8 * ((lane / 8) % 2), coff = 8 * (lane / 16);
#pragma unroll
        for (int jp = 0; jp < MD_VW / (16 * MD_SP); ++jp) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, &k[key][c0 + 16 * jp + coff]);
            mma_bf16_16816(acc.c[2 * jp], a, b[0], b[1]);
            mma_bf16_16816(acc.c[2 * jp + 1], a, b[2], b[3]);
        }
    }
#elif defined(MD_MFMA)
    md_each(acc, [&](int row, int, float& v) { v *= sh.corr[row]; });
    const int lane = threadIdx.x % 64, w = threadIdx.x / 64, r = lane % 16, qd = lane / 16;
    const int r0 = 16 * (w % MD_RT), c0 = (w / MD_RT) * (MD_VW / MD_SP);
    md_short4 a = *(const md_short4*)&sh.p[r0 + r][4 * qd];
#pragma unroll
    for (int j = 0; j < MD_VW / (16 * MD_SP); ++j) {
        const int col = c0 + 16 * j + r;
        md_short4 b = {(short)k[4 * qd][col], (short)k[4 * qd + 1][col], (short)k[4 * qd + 2][col], (short)k[4 * qd + 3][col]};
        acc.c[j] = __builtin_amdgcn_mfma_f32_16x16x16bf16_1k(a, b, acc.c[j], 0, 0, 0);
    }
#else
    md_each(acc, [&](int row, int col, float& v) {
        float x = v * sh.corr[row];
        for (int key = 0; key < MD_KT; ++key) x += bf16_to_f32(sh.p[row][key]) * bf16_to_f32(k[key][col]);
        v = x;
    });
#endif
}

// The entries of keys key0 .. key0 + MD_KT - 1 of the token's context into key tile `k` straight
// from the cache with plain loads (no cp.async: CDNA, or entries that are not whole 16-byte
// chunks), zero past n and in the padding columns.
__device__ __forceinline__ void md_stage(MdKeys& k, const uint16_t* __restrict__ base, const uint32_t* __restrict__ sl, int key0, int n) {
    for (int i = threadIdx.x; i < MD_KT * (MD_D / 2); i += MD_THREADS) {
        const int key = i / (MD_D / 2), c = 2 * (i % (MD_D / 2));
        uint32_t a = 0, b = 0;
        if (key0 + key < n) {
            const uint16_t* e = base + (int64_t)sl[key0 + key] * ENTRY;
            if (c < ENTRY) a = e[c];
            if (c + 1 < ENTRY) b = e[c + 1];
        }
        *(uint32_t*)&k[key][c] = a | (b << 16);
    }
}

extern "C" __global__ void __launch_bounds__(MD_THREADS, 1)
    mla_decode_mma(const float* __restrict__ q, const float* __restrict__ q_lat, const uint16_t* __restrict__ kv, const uint32_t* __restrict__ slots,
                   const uint32_t* __restrict__ ctx_off, const uint32_t* __restrict__ ctx_len, float* __restrict__ lat_out, int heads, int layer,
                   int num_slots, float scale, int splits, int min_chunk, float* __restrict__ part, int smem) { ENGINE_GRID_DEP();
    extern __shared__ __align__(16) unsigned char md_raw_shared[];
    MdShared& sh = *(MdShared*)md_raw_shared;
    if (smem < (int)sizeof(MdShared)) { // the host's layout and this one disagree
#if defined(__AMDGCN__)
        __builtin_trap();
#else
        __trap();
#endif
    }
    const int t = blockIdx.x, h0 = blockIdx.y * MD_H, z = blockIdx.z, tid = threadIdx.x;
    const uint32_t* sl = slots + ctx_off[t];
    const int total = ctx_len[t];
    const int chunk = max((total + splits - 1) / splits, min_chunk);
    const int j0 = z * chunk, n = min(total, j0 + chunk);
    const uint16_t* base = kv + (int64_t)layer * num_slots * ENTRY;
    // softmax rows: thread tid keeps the state of row tid / MD_TPR (all MD_TPR threads of a row alike)
    const int row = tid / MD_TPR, part_i = tid % MD_TPR;
    if (j0 >= n) { // an empty split (graph steps launch a fixed number): an empty partial
        if (splits > 1 && part_i == 0 && h0 + row < heads) md_header(part, t, heads, h0 + row, splits, z, -ENGINE_INF, 0.f);
        return;
    }
#ifdef MD_ASYNC
    md_fetch<MD_KT, MD_DP, MD_THREADS>(sh.k[0], base, md_slot<MD_KT, MD_THREADS>(sl, j0, n), j0, n);
    uint32_t slot_next = md_slot<MD_KT, MD_THREADS>(sl, j0 + MD_KT, n);
#pragma unroll
    for (int b = 0; b < MD_KB; ++b) md_zero_pad<MD_DP, MD_D, MD_THREADS>(sh.k[b], MD_KT);
#endif
    md_stage_queries<MD_H, MD_D, MD_DP, MD_THREADS>(sh.q, q, q_lat, t, h0, heads);
    MdAcc acc;
    md_each(acc, [](int, int, float& v) { v = 0.f; });
    float m = -ENGINE_INF, l = 0.f;
    for (int key0 = j0, it = 0; key0 < n; key0 += MD_KT, ++it) {
#ifdef MD_ASYNC
        MdKeys& k = sh.k[it % 2];
        cp_async_wait<0>();
        __syncthreads(); // every thread's copies of this tile landed; the last tile's work is done
        if (key0 + MD_KT < n) { // into the other tile, free since the barrier
            md_fetch<MD_KT, MD_DP, MD_THREADS>(sh.k[(it + 1) % 2], base, slot_next, key0 + MD_KT, n);
            slot_next = md_slot<MD_KT, MD_THREADS>(sl, key0 + 2 * MD_KT, n); // lands while this tile is worked on
        }
#else
        MdKeys& k = sh.k[0];
        __syncthreads();
        md_stage(k, base, sl, key0, n);
        __syncthreads();
#endif
        md_scores(sh, k);
        __syncthreads();
        // online softmax: row `row`, keys part_i·MD_KPT ..
        float v[MD_KPT], mx = -ENGINE_INF;
#pragma unroll
        for (int i = 0; i < MD_KPT; ++i) {
            const int key = part_i * MD_KPT + i;
            float x = 0.f;
#pragma unroll
            for (int sp = 0; sp < MD_SP; ++sp) x += sh.s[sp][row][key];
            v[i] = key0 + key < n ? x * scale : -ENGINE_INF;
            mx = fmaxf(mx, v[i]);
        }
#pragma unroll
        for (int o = 1; o < MD_TPR; o *= 2) mx = fmaxf(mx, __shfl_xor(mx, o, WARP));
        const float mn = fmaxf(m, mx); // finite: the tile has at least one key
        const float corr = expf(m - mn);
        float sum = 0.f;
#pragma unroll
        for (int i = 0; i < MD_KPT; i += 2) {
            float p0 = v[i] == -ENGINE_INF ? 0.f : expf(v[i] - mn), p1 = v[i + 1] == -ENGINE_INF ? 0.f : expf(v[i + 1] - mn);
            sum += p0 + p1;
            *(uint32_t*)&sh.p[row][part_i * MD_KPT + i] = bf16_pack(p0, p1);
        }
#pragma unroll
        for (int o = 1; o < MD_TPR; o *= 2) sum += __shfl_xor(sum, o, WARP);
        m = mn;
        l = l * corr + sum;
        if (part_i == 0) sh.corr[row] = corr;
        __syncthreads();
        md_pv(sh, k, acc);
    }
    if (part_i == 0) {
        sh.ml[row][0] = m;
        sh.ml[row][1] = splits > 1 ? 1.f : 1.f / l; // the output's scale (one division a row: one
        // a column unrolled the epilogue into kilobytes of code, a fixed cost of cold fetches)
        if (splits > 1 && h0 + row < heads) md_header(part, t, heads, h0 + row, splits, z, m, l);
    }
    __syncthreads();
    // the unnormalised partial, or the output: where element (r, c) goes
    auto dst = [&](int r, int c) { return md_dst(part, lat_out, t, heads, h0, r, c, splits, z); };
#if defined(MD_MMA_SYNC)
    if (KV_LORA % 2 == 0) { // a thread's column pairs as one 8-byte store (the rows start on 8 bytes)
        md_pairs(acc, [&](int r, int c, float v0, float v1) {
            if (h0 + r >= heads || c >= KV_LORA) return;
            const float f = sh.ml[r][1];
            *(float2*)dst(r, c) = make_float2(v0 * f, v1 * f);
        });
        return;
    }
#endif
    md_each(acc, [&](int r, int c, float& v) {
        if (h0 + r >= heads || c >= KV_LORA) return;
        *dst(r, c) = v * sh.ml[r][1];
    });
}
