// MLA decode attention for narrow head groups (16 heads a block: a tensor-parallel rank's share of
// V3's 128, or V2-Lite's 16), bf16 operands, scores and probabilities in registers. The absorbed
// (MQA) form as in mla_decode.hip:
//   scores  S[h][j] = [q_lat | q_pe](h) · [c | k_pe](j)
//   output  O[h][:] = Σ_j softmax_j(scale · S[h][j]) c(j)
// With 16 heads the work per cache byte is an eighth of 128 heads': the kernel must stream the
// cache at bandwidth, and mla_decode.hip's 64-row tiles would leave three quarters of their rows
// empty and round-trip the scores through shared memory with four barriers a tile. Here each warp
// keeps the online softmax of its keys in registers (FlashAttention-2's form: the m16n8k16 score
// fragments are, packed to bf16, the A fragments of P·V):
//   - a block is MR_KG × MR_VS warps: key group kg takes keys kg·MR_KW .. of each MR_KT-key tile,
//     value split vs takes columns vs·MR_VW/MR_VS .. of the output (the accumulator of 16 rows ×
//     512 columns would not fit one warp); the key group's scores are split over its value
//     splits by contraction steps (MR_QKS), each warp's partial sums exchanged through shared
//     memory and added in one order (measured on the H200: 8-12% faster than each warp
//     computing the whole scores, which doubled the score products and their fragment loads);
//   - the next MR_ST - 1 tiles' entries are in flight while the current one is worked on: on sm_90
//     bulk copies (one a key, completing on the tile's transaction barrier), on sm_80-89 16-byte
//     cp.async (mla_decode_stage.h); one barrier a tile;
//   - fragments come by ldmatrix (the queries and keys as row-major rows, the values transposed);
//   - at the end the key groups' (max, sum, accumulator) are combined through shared memory.
// NVIDIA sm_80+ (mma.sync, cp.async: entries of whole 16-byte chunks) only: the host takes it
// there and mla_decode.hip elsewhere; other targets compile a trap.
// Splits of the context (blockIdx.z) write unnormalised partials for mla.hip's mla_merge, in its
// layout [T, heads, splits, 2 + KV_LORA]. Launch: grid (tokens, ceil(heads / 16), splits), block
// MR_THREADS, dynamic shared memory sizeof(MrShared) (passed, and checked, as `smem`).
#include "mla_decode_stage.h"

// The tile shape (mla_decode.rs mirrors it: ROWS_*). Measured on the H200 against 2 key groups of
// 32 keys (4 warps), 2 × 16 keys with 3-5 stages, and 4 value splits: this one was fastest.
#define MR_H 16  // heads a block: one m16 row tile
#define MR_KW 16 // keys a warp takes of each tile
#define MR_KG 4  // key groups
#define MR_VS 2  // value splits
#define MR_SA 4  // partial score sums (independent accumulator chains; even: the fragment double buffer alternates with it)
#define MR_ST 2  // key tiles in shared memory: MR_ST - 1 in flight while one is worked on
#define MR_SPREAD 0 // sm_90 copies: key i of a tile by thread i (0), or by lane i % 8 of warp i / 8 (1)
#define MR_QKS 1 // 1: a key group's MR_VS value splits each take 1 / MR_VS of the score contraction and sum the partial scores
#define MR_THREADS (32 * MR_KG * MR_VS)
#define MR_KT (MR_KG * MR_KW)                                       // keys a tile
#define MR_D ((ENTRY + 15) / 16 * 16)                               // score contraction, zero-padded
#define MR_VW ((KV_LORA + 16 * MR_VS - 1) / (16 * MR_VS) * (16 * MR_VS)) // value columns computed
#define MR_W (MR_D > MR_VW ? MR_D : MR_VW)                          // columns read
#define MR_DP (MR_W + 8) // bf16 row pitch: an odd number of 16-byte chunks, conflict-free ldmatrix
#define MR_XP (MR_VW + 8) // f32 row pitch of the key groups' exchange (8-byte writes of a fragment's rows conflict-free)
#define MR_NT (MR_VW / MR_VS / 8) // n8 tiles of a warp's value columns
#define MR_SX (MR_QKS && MR_VS > 1 && MR_D / 16 % MR_VS == 0) // split scores (the contraction steps divide evenly)
#define MR_KS (MR_SX ? MR_D / 16 / MR_VS : MR_D / 16) // contraction steps a warp takes of the scores

struct MrShared {
    uint16_t q[MR_H][MR_DP];         // the heads' [q_lat | q_pe], bf16
    uint16_t k[MR_ST][MR_KT][MR_DP]; // key tiles (zero in the padding; past the range's end zero
                                     // (cp.async) or the range's last entry (bulk copies))
    float ml[MR_KG][MR_H][2];        // the key groups' max and sum per row
    float den[MR_H];                 // the rows' output divisors (the sum, or 1 for a partial)
#if MR_SX
    float sx[MR_KG * MR_VS][MR_KW / 8 * 4][32]; // each warp's partial scores, by lane
#endif
    uint64_t bar[MR_ST];             // sm_90: the key tiles' transaction barriers (bulk copies)
};
// after the loop the key tiles hold the key groups' accumulators
static_assert(MR_KG * MR_H * MR_XP * 4 <= MR_ST * MR_KT * MR_DP * 2, "exchange fits the key tiles");

#if defined(MD_CP_ASYNC) && __CUDA_ARCH__ >= 900
// sm_90: a tile's entries arrive by bulk copies (one instruction a key, the copy engine moving its
// ENTRY · 2 contiguous bytes), completing on the tile's transaction barrier; 16-byte cp.async per
// thread streamed at ~2.8 TB/s with no arithmetic at all
#define MR_TMA 1
__device__ __forceinline__ unsigned mr_smem(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

__device__ __forceinline__ bool mr_try_wait(const uint64_t* bar, unsigned parity) {
    unsigned ok;
    asm volatile("{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\tselp.u32 %0, 1, 0, p;\n\t}" : "=r"(ok) : "r"(mr_smem(bar)), "r"(parity) : "memory");
    return ok;
}
#endif


extern "C" __global__ void __launch_bounds__(MR_THREADS, 1)
    mla_decode_rows(const float* __restrict__ q, const float* __restrict__ q_lat, const uint16_t* __restrict__ kv, const uint32_t* __restrict__ slots,
                    const uint32_t* __restrict__ ctx_off, const uint32_t* __restrict__ ctx_len, float* __restrict__ lat_out, int heads, int layer,
                    int num_slots, float scale, int splits, int min_chunk, float* __restrict__ part, int smem) { ENGINE_GRID_DEP();
#ifndef MD_CP_ASYNC
#if defined(__AMDGCN__)
    __builtin_trap(); // the host takes mla_decode.hip on targets without cp.async and mma.sync
#else
    __trap();
#endif
#else
    extern __shared__ __align__(16) unsigned char mr_raw_shared[];
    MrShared& sh = *(MrShared*)mr_raw_shared;
    if (smem < (int)sizeof(MrShared)) __trap(); // the host's layout and this one disagree
    const int t = blockIdx.x, h0 = blockIdx.y * MR_H, z = blockIdx.z, tid = threadIdx.x;
    const int lane = tid % 32, w = tid / 32, kg = w / MR_VS, vs = w % MR_VS, g = lane / 4, tq = lane % 4;
    const uint32_t off = ctx_off[t];
    const int total = ctx_len[t];
    const int chunk = max((total + splits - 1) / splits, min_chunk);
    const int j0 = z * chunk, n = min(total, j0 + chunk);
    const uint16_t* base = kv + (int64_t)layer * num_slots * ENTRY;
    if (j0 >= n) { // an empty split (graph steps launch a fixed number): an empty partial
        if (splits > 1 && tid < MR_H && h0 + tid < heads) md_header(part, t, heads, h0 + tid, splits, z, -ENGINE_INF, 0.f);
        return;
    }
    // the queries' loads first: in flight while the slots are looked up and the copies start
    // (staged after them, they were the longest wait of a short context's block)
    MdQueries<MR_H, MR_D, MR_THREADS> qr;
    md_load_queries(qr, q, q_lat, t, h0, heads);
    const uint32_t* sl = slots + off;
    // The fetch of key tile `buf` from key key0 (`slot`: this thread's key's slot, looked up a tile
    // ahead), and the wait for tile `it`.
#ifdef MR_TMA
    // thread i < MR_KT copies key i of the tile (measured against 8 keys from each warp's first
    // lanes: slower with 8 warps, faster with 4); keys past n copy the range's last entry (a
    // written, finite entry: their scores are masked, their probabilities 0, so P·V gains 0)
    const int ci = MR_SPREAD ? (lane < 8 ? 8 * w + lane : MR_KT) : tid; // this thread's key of a tile's copies (none from MR_KT)
    auto slot_of = [&](int key0) { return ci < MR_KT ? sl[min(key0 + ci, n - 1)] : 0u; };
    auto fetch = [&](int buf, uint32_t slot, int) {
        if (tid == 0)
            asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(mr_smem(&sh.bar[buf])), "r"(MR_KT * ENTRY * 2) : "memory");
        if (ci < MR_KT) {
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); // after the generic reads of this buffer
            asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(mr_smem(&sh.k[buf][ci][0])),
                         "l"(base + (int64_t)slot * ENTRY), "r"(ENTRY * 2), "r"(mr_smem(&sh.bar[buf]))
                         : "memory");
        }
    };
    auto skip = [] {};
    auto wait = [&](int it) {
        while (!mr_try_wait(&sh.bar[it % MR_ST], (it / MR_ST) & 1)) {
        }
    };
    if (tid < MR_ST) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(mr_smem(&sh.bar[tid])) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    __syncthreads();
#else
    auto slot_of = [&](int key0) { return md_slot<MR_KT, MR_THREADS>(sl, key0, n); };
    auto fetch = [&](int buf, uint32_t slot, int key0) { md_fetch<MR_KT, MR_DP, MR_THREADS>(sh.k[buf], base, slot, key0, n); };
    auto skip = [] { cp_async_commit(); }; // a group either way: the count below stays right
    auto wait = [](int) { cp_async_wait<MR_ST - 2>(); }; // all but the newest MR_ST - 2 groups
#endif
    // tiles 0 .. MR_ST - 2 in flight (all of them before the loop measured no faster)
#pragma unroll
    for (int b = 0; b < MR_ST - 1; ++b) {
        if (j0 + b * MR_KT < n) fetch(b, slot_of(j0 + b * MR_KT), j0 + b * MR_KT);
        else skip();
    }
    uint32_t slot_next = slot_of(j0 + (MR_ST - 1) * MR_KT);
#pragma unroll
    for (int b = 0; b < MR_ST; ++b) md_zero_pad<MR_DP, MR_W, MR_THREADS>(sh.k[b], MR_KT);
    md_store_queries<MR_H, MR_D, MR_DP, MR_THREADS>(sh.q, qr);

    const int kb = kg * MR_KW, v0 = vs * (MR_VW / MR_VS);
    const float scale2 = scale * 1.4426950408889634f; // log2 e
    float acc[MR_NT][4];
#pragma unroll
    for (int j = 0; j < MR_NT; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[j][c] = 0.f;
    float m[2] = {-ENGINE_INF, -ENGINE_INF}, l[2] = {0.f, 0.f}; // rows g and g + 8; l this thread's keys only
    const uint16_t* qrow = &sh.q[lane % 16][8 * (lane / 16)];
    for (int key0 = j0, it = 0; key0 < n; key0 += MR_KT, ++it) {
        uint16_t(*k)[MR_DP] = sh.k[it % MR_ST];
        // tile it + MR_ST - 1 into the buffer the last tile used (free once every warp is past it)
        auto refill = [&] {
            if (key0 + (MR_ST - 1) * MR_KT < n) {
                fetch((it + MR_ST - 1) % MR_ST, slot_next, key0 + (MR_ST - 1) * MR_KT);
                slot_next = slot_of(key0 + MR_ST * MR_KT);
            } else {
                skip();
            }
        };
#ifdef MR_TMA
        // the last tile's reads are done: its buffer is refilled before this tile is waited for
        // (each thread waits on the tile's transaction barrier, which needs no block barrier), so
        // that two tiles are in flight while the cache is the slower side; waiting first left
        // one (the refill then started only after this tile had landed)
        __syncthreads();
        refill();
        wait(it);
#else
        wait(it);
        __syncthreads(); // this tile landed (every thread's copies); the last tile's reads are done
        refill();
#endif
        // S over the warp's MR_KW keys: n8 tiles j = keys kb + 8j ..; ldmatrix.x4 gives the query
        // rows' A fragment and the B fragments of two key tiles (rows = keys, contiguous columns).
        // MR_SA partial sums per tile (contraction steps kk % MR_SA): one accumulator per tile
        // made a chain of MR_D / 16 dependent products, latency-bound at ~2 warps a scheduler.
        // Software-pipelined: the fragments of step kk + 1 are loaded before step kk's products.
        float sp[MR_SA][MR_KW / 8][4];
#pragma unroll
        for (int u = 0; u < MR_SA; ++u)
#pragma unroll
            for (int j = 0; j < MR_KW / 8; ++j)
#pragma unroll
                for (int c = 0; c < 4; ++c) sp[u][j][c] = 0.f;
        uint32_t fa[2][4], fb[2][MR_KW / 16][4];
        const int ks0 = MR_SX ? vs * MR_KS : 0; // this warp's first contraction step
        const uint16_t* krow = &k[kb + lane % 8 + 8 * (lane / 16)][8 * ((lane / 8) % 2)];
        auto load_s = [&](int kk, int buf) {
            ldmatrix_x4(fa[buf], qrow + 16 * (ks0 + kk));
#pragma unroll
            for (int jp = 0; jp < MR_KW / 16; ++jp) ldmatrix_x4(fb[buf][jp], krow + 16 * jp * MR_DP + 16 * (ks0 + kk));
        };
        load_s(0, 0);
        for (int k0 = 0; k0 < MR_KS; k0 += MR_SA) {
#pragma unroll
            for (int u = 0; u < MR_SA; ++u) {
                const int kk = k0 + u;
                if (MR_KS % MR_SA != 0 && kk >= MR_KS) break;
                if (kk + 1 < MR_KS) load_s(kk + 1, (u + 1) % 2);
                const uint32_t* a = fa[u % 2];
#pragma unroll
                for (int jp = 0; jp < MR_KW / 16; ++jp) {
                    mma_bf16_16816(sp[u][2 * jp], a, fb[u % 2][jp][0], fb[u % 2][jp][1]);
                    mma_bf16_16816(sp[u][2 * jp + 1], a, fb[u % 2][jp][2], fb[u % 2][jp][3]);
                }
            }
        }
#if MR_SX
        // the value splits' shares of the contraction: this warp's sums out, then the MR_VS
        // shares added in the same order in every warp of the key group (the same scores bit for
        // bit, so the same maxima and sums)
#pragma unroll
        for (int j = 0; j < MR_KW / 8; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
#pragma unroll
                for (int u = 1; u < MR_SA; ++u) sp[0][j][c] += sp[u][j][c];
                sh.sx[w][4 * j + c][lane] = sp[0][j][c];
            }
        asm volatile("bar.sync %0, %1;\n" ::"r"(1 + kg), "r"(32 * MR_VS) : "memory"); // the key group's warps
#pragma unroll
        for (int j = 0; j < MR_KW / 8; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                float x = sh.sx[kg * MR_VS][4 * j + c][lane];
#pragma unroll
                for (int v = 1; v < MR_VS; ++v) x += sh.sx[kg * MR_VS + v][4 * j + c][lane];
                sp[0][j][c] = x;
            }
#endif
        // online softmax of rows g (c 0, 1) and g + 8 (c 2, 3) in base 2 (scores × scale ·
        // log2 e; m and l stay in those units until the end); keys past n masked to -inf, whose
        // exp2 is 0 (m is -inf only while no key of this warp was seen: then 0 is subtracted)
        float s[MR_KW / 8][4], mx[2] = {-ENGINE_INF, -ENGINE_INF};
#pragma unroll
        for (int j = 0; j < MR_KW / 8; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                float x = 0.f;
#pragma unroll
                for (int u = 0; u < (MR_SX ? 1 : MR_SA); ++u) x += sp[u][j][c];
                x = key0 + kb + 8 * j + 2 * tq + c % 2 < n ? x * scale2 : -ENGINE_INF;
                s[j][c] = x;
                mx[c / 2] = fmaxf(mx[c / 2], x);
            }
        float corr[2], mref[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            const float mn = fmaxf(m[r], mx[r]);
            mref[r] = mn == -ENGINE_INF ? 0.f : mn;
            corr[r] = exp2f(m[r] - mref[r]); // 0 the first time (nothing to keep), 1 once the maximum settles
            m[r] = mn;
            l[r] *= corr[r];
        }
#pragma unroll
        for (int j = 0; j < MR_KW / 8; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const float p = exp2f(s[j][c] - mref[c / 2]);
                s[j][c] = p;
                l[c / 2] += p;
            }
        if (__any_sync(0xffffffffu, corr[0] != 1.f || corr[1] != 1.f)) { // settled maxima: skipped
#pragma unroll
            for (int j = 0; j < MR_NT; ++j) {
                acc[j][0] *= corr[0];
                acc[j][1] *= corr[0];
                acc[j][2] *= corr[1];
                acc[j][3] *= corr[1];
            }
        }
        // O += P·V: P's A fragment of keys 16c .. is the score tiles 2c and 2c + 1 as bf16 pairs;
        // ldmatrix.x4.trans gives the B fragments of two value n8 tiles (mla_decode.hip's md_pv)
#pragma unroll
        for (int c = 0; c < MR_KW / 16; ++c) {
            const uint32_t a[4] = {bf16_pack(s[2 * c][0], s[2 * c][1]), bf16_pack(s[2 * c][2], s[2 * c][3]), bf16_pack(s[2 * c + 1][0], s[2 * c + 1][1]),
                                   bf16_pack(s[2 * c + 1][2], s[2 * c + 1][3])};
            const uint16_t* vrow = &k[kb + 16 * c + lane % 8 + 8 * ((lane / 8) % 2)][v0 + 8 * (lane / 16)];
            uint32_t fv[2][4];
            ldmatrix_x4_trans(fv[0], vrow);
#pragma unroll
            for (int jp = 0; jp < MR_NT / 2; ++jp) {
                if (jp + 1 < MR_NT / 2) ldmatrix_x4_trans(fv[(jp + 1) % 2], vrow + 16 * (jp + 1));
                mma_bf16_16816(acc[2 * jp], a, fv[jp % 2][0], fv[jp % 2][1]);
                mma_bf16_16816(acc[2 * jp + 1], a, fv[jp % 2][2], fv[jp % 2][3]);
            }
        }
    }
    // the rows' sums over the quad's keys; the key groups' (max, sum) for all
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
    if (vs == 0 && tq == 0) {
        sh.ml[kg][g][0] = m[0], sh.ml[kg][g][1] = l[0];
        sh.ml[kg][g + 8][0] = m[1], sh.ml[kg][g + 8][1] = l[1];
    }
#ifndef MR_TMA
    cp_async_wait<0>(); // (only empty groups are left)
#endif
    __syncthreads(); // the key tiles are free too
    float f[2], gm[2], gl[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = g + 8 * r;
        gm[r] = -ENGINE_INF;
#pragma unroll
        for (int x = 0; x < MR_KG; ++x) gm[r] = fmaxf(gm[r], sh.ml[x][row][0]); // finite: key group 0 has the range's first key
        gl[r] = 0.f;
#pragma unroll
        for (int x = 0; x < MR_KG; ++x) gl[r] += sh.ml[x][row][1] * exp2f(sh.ml[x][row][0] - gm[r]); // a group without keys: 0 · 0
        f[r] = exp2f(m[r] - gm[r]);
    }
    // every warp's accumulator, scaled to its rows' common maximum, into the exchange; then each
    // thread adds the key groups' 4-column pieces of its share of the output and stores them
    float* xs = (float*)&sh.k[0][0][0]; // [MR_KG][MR_H][MR_XP]
    const int col0 = v0 + 2 * tq;
#pragma unroll
    for (int j = 0; j < MR_NT; ++j)
#pragma unroll
        for (int r = 0; r < 2; ++r) *(float2*)&xs[(kg * MR_H + g + 8 * r) * MR_XP + col0 + 8 * j] = make_float2(acc[j][2 * r] * f[r], acc[j][2 * r + 1] * f[r]);
    if (w == 0 && tq == 0) { // rows g and g + 8: the partial's header, the output's divisor
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            sh.den[g + 8 * r] = splits > 1 ? 1.f : gl[r];
            if (splits > 1 && h0 + g + 8 * r < heads) md_header(part, t, heads, h0 + g + 8 * r, splits, z, gm[r] * 0.6931471805599453f, gl[r]); // max in natural units
        }
    }
    __syncthreads();
    // divided by the sum, not multiplied by its reciprocal: with one split the output is then
    // bit for bit what mla_merge makes of a graph step's one partial (v / sum)
#pragma unroll 2
    for (int u = 0; u < (MR_H * (MR_VW / 4) + MR_THREADS - 1) / MR_THREADS; ++u) {
        const int i = tid + u * MR_THREADS;
        if (i >= MR_H * (MR_VW / 4)) break;
        const int row = i / (MR_VW / 4), c = 4 * (i % (MR_VW / 4));
        float4 v = *(const float4*)&xs[row * MR_XP + c];
#pragma unroll
        for (int x = 1; x < MR_KG; ++x) {
            const float4 o = *(const float4*)&xs[(x * MR_H + row) * MR_XP + c];
            v.x += o.x, v.y += o.y, v.z += o.z, v.w += o.w;
        }
        if (h0 + row >= heads || c >= KV_LORA) continue;
        const float den = sh.den[row];
        float* d = md_dst(part, lat_out, t, heads, h0, row, c, splits, z);
        if (KV_LORA % 4 == 0) { // 8-byte aligned rows (a partial's values start 2 floats in)
            *(float2*)d = make_float2(v.x / den, v.y / den);
            *(float2*)(d + 2) = make_float2(v.z / den, v.w / den);
        } else {
            const float e[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int k4 = 0; k4 < 4; ++k4)
                if (c + k4 < KV_LORA) d[k4] = e[k4] / den;
        }
    }
#endif
}
