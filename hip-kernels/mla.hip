// MLA attention over the paged latent cache in the absorbed (MQA) form, specialised at JIT time
// for the model's KV_LORA (kv_lora_rank), ROPE (qk_rope_head_dim), NOPE (qk_nope_head_dim) and VDIM.
//   1. mla_q_latent:  q_lat[t,h,:] = q_nope[t,h,:] · W_UK(h)           (W_UK(h) = kv_b rows of head h)
//   2. mla_attention: lat[t,h,:] = Σ_j softmax_j(scale·(q_lat·c_j + q_pe·kpe_j)) c_j over the
//      token's causal context, read from the cache by slot; each warp keeps an online softmax over
//      its share of the context, warps merge at the end (flash-decoding style).
//   3. mla_out:       out[t, h·VDIM + e] = W_UV(h)[e,:] · lat[t,h,:]
// kv_b is [heads·(NOPE+VDIM), KV_LORA] in f32, bf16 or block-FP8 (dequantised on load); the cache
// is [layers, slots, KV_LORA+ROPE] in f32, or bf16 (the _bf16c attention; `--fp8-activations
// dynamic`).
#include "common.h"
#include "vec8.h"

#ifndef KV_LORA
#error "KV_LORA must be defined"
#endif
#define ENTRY (KV_LORA + ROPE)
#define QK (NOPE + ROPE)
#define PER_HEAD (NOPE + VDIM)
#define LPL ((KV_LORA + WARP - 1) / WARP) // latent elements per lane

// Tokens per block of the two projections: W_UK(h) / W_UV(h) is read once per MLA_TB tokens.
#define MLA_TB 8

// q → latent: a block computes QL_COLS latent columns of one head for MLA_TB tokens (grid.z over
// the column chunks, so even one token spreads over heads × KV_LORA/QL_COLS blocks). Thread i
// owns 4 consecutive columns (i % 32) for every 8th row of W_UK(h) (i / 32): the 32 threads of a
// row read 128 contiguous weights with one 4-element load each; the 8 row groups are summed in
// shared memory in a fixed order.
#define QL_COLS 128

// Weights (row, l .. l+3) of a [rows, KV_LORA] kv_b as f32: one 4-element load when the row
// length, the column and the FP8 scale block allow it, else element by element (odd test shapes).
template <int WDT>
__device__ __forceinline__ float4 load_w4(const uint8_t* __restrict__ w, const float* __restrict__ sc, int64_t row, int l, int bn, int bk, int kb) {
    if (KV_LORA % 4 == 0 && (WDT != WDT_FP8 || bk % 4 == 0)) {
        int64_t at = row * KV_LORA + l;
        if (WDT == WDT_F32) return *(const float4*)(w + at * 4);
        if (WDT == WDT_BF16) {
            uint2 r = *(const uint2*)(w + at * 2);
            return make_float4(__uint_as_float(r.x << 16), __uint_as_float(r.x & 0xffff0000u), __uint_as_float(r.y << 16), __uint_as_float(r.y & 0xffff0000u));
        }
        uint32_t r = *(const uint32_t*)(w + at);
        float s = sc[(row / bn) * kb + l / bk];
        float v[4];
        fp8x4_to_f32(r, v);
        return make_float4(v[0] * s, v[1] * s, v[2] * s, v[3] * s);
    }
    float v[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = l + j < KV_LORA ? load_w<WDT>(w, sc, row, l + j, KV_LORA, bn, bk, kb) : 0.f;
    return make_float4(v[0], v[1], v[2], v[3]);
}

template <int WDT>
__device__ void mla_q_latent_impl(const float* __restrict__ q, const uint8_t* __restrict__ kvb, const float* __restrict__ sc,
                                  float* __restrict__ q_lat, int T, int heads, int bn, int bk) {
    int t0 = blockIdx.x * MLA_TB, h = blockIdx.y, c0 = blockIdx.z * QL_COLS, nt = min(MLA_TB, T - t0);
    int kb = (KV_LORA + bk - 1) / bk;
    __shared__ float qs[MLA_TB][NOPE];
    __shared__ float red[8][MLA_TB][QL_COLS];
    for (int i = threadIdx.x; i < MLA_TB * NOPE; i += blockDim.x) {
        int tt = i / NOPE, d = i % NOPE;
        qs[tt][d] = tt < nt ? q[((int64_t)(t0 + tt) * heads + h) * QK + d] : 0.f;
    }
    __syncthreads();
    int cq = threadIdx.x % 32, dg = threadIdx.x / 32; // blockDim.x == 256: 8 row groups
    int l = c0 + cq * 4;
    float acc[MLA_TB][4];
#pragma unroll
    for (int tt = 0; tt < MLA_TB; ++tt)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[tt][j] = 0.f;
    if (l < KV_LORA) {
#pragma unroll 4
        for (int d = dg; d < NOPE; d += 8) {
            float4 wv = load_w4<WDT>(kvb, sc, (int64_t)h * PER_HEAD + d, l, bn, bk, kb);
#pragma unroll
            for (int tt = 0; tt < MLA_TB; ++tt) {
                float qv = qs[tt][d];
                acc[tt][0] += qv * wv.x;
                acc[tt][1] += qv * wv.y;
                acc[tt][2] += qv * wv.z;
                acc[tt][3] += qv * wv.w;
            }
        }
    }
#pragma unroll
    for (int tt = 0; tt < MLA_TB; ++tt)
#pragma unroll
        for (int j = 0; j < 4; ++j) red[dg][tt][cq * 4 + j] = acc[tt][j];
    __syncthreads();
    for (int i = threadIdx.x; i < MLA_TB * QL_COLS; i += blockDim.x) {
        int tt = i / QL_COLS, c = i % QL_COLS;
        if (tt < nt && c0 + c < KV_LORA) {
            float v = 0.f;
#pragma unroll
            for (int g = 0; g < 8; ++g) v += red[g][tt][c];
            q_lat[((int64_t)(t0 + tt) * heads + h) * KV_LORA + c0 + c] = v;
        }
    }
}

// Per token t: its context is slots[ctx_off[t] .. ctx_off[t] + ctx_len[t]]. A block serves HPB heads
// (blockIdx.y · HPB ..) of one token, so every cache entry it reads feeds HPB scores (the entry
// is loaded once per HPB heads instead of once per head). With `splits` > 1 the context is cut into
// that many contiguous chunks of at least `min_chunk` keys (blockIdx.z; chunks past the context are
// empty and write an empty partial), each writing an unnormalised partial (max, sum, Σ p·c)
// to `part` [T, heads, splits, 2 + KV_LORA] for mla_merge (split-K over the sequence, for long
// contexts with few blocks). Shared memory: [warps][2 + KV_LORA] floats.
template <int HPB, class CT>
__device__ void mla_attention_impl(const float* __restrict__ q, const float* __restrict__ q_lat, const CT* __restrict__ kv,
                                   const uint32_t* __restrict__ slots, const uint32_t* __restrict__ ctx_off, const uint32_t* __restrict__ ctx_len,
                                   float* __restrict__ lat_out, int heads, int layer, int num_slots, float scale, int splits, int min_chunk, float* __restrict__ part) {
    int t = blockIdx.x, h0 = blockIdx.y * HPB, z = blockIdx.z;
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP, nw = blockDim.x / WARP;
    // the heads' latent queries in shared memory (every warp reads them for each of its keys; in
    // registers they took 64 of the 195 a thread used and left one block per SM)
    __shared__ float qs[HPB][LPL * WARP];
    for (int i = threadIdx.x; i < HPB * LPL * WARP; i += blockDim.x) {
        int hh = i / (LPL * WARP), l = i % (LPL * WARP);
        qs[hh][l] = l < KV_LORA ? q_lat[((int64_t)t * heads + h0 + hh) * KV_LORA + l] : 0.f;
    }
    __syncthreads();
    float acc[HPB][LPL], m[HPB], s[HPB];
#pragma unroll
    for (int hh = 0; hh < HPB; ++hh) {
#pragma unroll
        for (int i = 0; i < LPL; ++i) acc[hh][i] = 0.f;
        m[hh] = -ENGINE_INF;
        s[hh] = 0.f;
    }
    const uint32_t* sl = slots + ctx_off[t];
    int total = ctx_len[t];
    int chunk = max((total + splits - 1) / splits, min_chunk);
    int j0 = z * chunk, n = min(total, j0 + chunk);
    const CT* base = kv + (int64_t)layer * num_slots * ENTRY;
    for (int j = j0 + w; j < n; j += nw) {
        const CT* e = base + (int64_t)sl[j] * ENTRY;
        float c[LPL];
#pragma unroll
        for (int i = 0; i < LPL; ++i) {
            int l = lane + i * WARP;
            c[i] = l < KV_LORA ? kv_elem(e, l) : 0.f;
        }
#pragma unroll
        for (int hh = 0; hh < HPB; ++hh) {
            const float* qpe = q + ((int64_t)t * heads + h0 + hh) * QK + NOPE;
            float dot = 0.f;
#pragma unroll
            for (int i = 0; i < LPL; ++i) dot += qs[hh][lane + i * WARP] * c[i];
            for (int r = lane; r < ROPE; r += WARP) dot += qpe[r] * kv_elem(e, KV_LORA + r);
            float score = warp_sum(dot) * scale;
            float m2 = fmaxf(m[hh], score);
            float corr = expf(m[hh] - m2), p = expf(score - m2);
            s[hh] = s[hh] * corr + p;
#pragma unroll
            for (int i = 0; i < LPL; ++i) acc[hh][i] = acc[hh][i] * corr + p * c[i];
            m[hh] = m2;
        }
    }
    // merge the warps' partial softmaxes, one head at a time
    extern __shared__ float sh[]; // [nw][2 + KV_LORA]
    float* mine = sh + w * (2 + KV_LORA);
#pragma unroll
    for (int hh = 0; hh < HPB; ++hh) {
        int h = h0 + hh;
        __syncthreads();
        if (lane == 0) {
            mine[0] = m[hh];
            mine[1] = s[hh];
        }
#pragma unroll
        for (int i = 0; i < LPL; ++i) {
            int l = lane + i * WARP;
            if (l < KV_LORA) mine[2 + l] = acc[hh][i];
        }
        __syncthreads();
        float gm = -ENGINE_INF;
        for (int k = 0; k < nw; ++k) gm = fmaxf(gm, sh[k * (2 + KV_LORA)]);
        float gs = 0.f;
        for (int k = 0; k < nw; ++k) {
            float mk = sh[k * (2 + KV_LORA)];
            if (mk > -ENGINE_INF) gs += sh[k * (2 + KV_LORA) + 1] * expf(mk - gm);
        }
        float* pz = part + (((int64_t)t * heads + h) * splits + z) * (2 + KV_LORA);
        if (splits > 1 && threadIdx.x == 0) {
            pz[0] = gm;
            pz[1] = gs;
        }
        for (int l = threadIdx.x; l < KV_LORA; l += blockDim.x) {
            float v = 0.f;
            for (int k = 0; k < nw; ++k) {
                float mk = sh[k * (2 + KV_LORA)];
                if (mk > -ENGINE_INF) v += sh[k * (2 + KV_LORA) + 2 + l] * expf(mk - gm);
            }
            if (splits > 1) pz[2 + l] = v;
            else lat_out[((int64_t)t * heads + h) * KV_LORA + l] = v / gs;
        }
    }
}

// two blocks of 256 threads an SM (128 registers a thread)
#define MLA_ATTENTION(NAME, HPB, CT)                                                                                                    \
    extern "C" __global__ void __launch_bounds__(256, 2) NAME(const float* q, const float* q_lat, const CT* kv, const uint32_t* slots, const uint32_t* ctx_off, \
                                    const uint32_t* ctx_len, float* lat_out, int heads, int layer, int num_slots, float scale, int splits,    \
                                    int min_chunk, float* part) { ENGINE_GRID_DEP();                                                     \
        mla_attention_impl<HPB, CT>(q, q_lat, kv, slots, ctx_off, ctx_len, lat_out, heads, layer, num_slots, scale, splits, min_chunk, part); \
    }
// one head per block (any head count), or four (head counts divisible by 4, as in every DeepSeek);
// over an f32 cache, or a bf16 one (_bf16c)
MLA_ATTENTION(mla_attention, 1, float)
MLA_ATTENTION(mla_attention4, 4, float)
MLA_ATTENTION(mla_attention_bf16c, 1, uint16_t)
MLA_ATTENTION(mla_attention4_bf16c, 4, uint16_t)

// Combines the split partials [T, heads, splits, 2 + KV_LORA] (of mla_attention and of
// mla_decode.hip) into the normalised latent output: out = Σ_z e_z·part_z / Σ_z e_z·l_z with
// e_z = exp(m_z − max_z m_z), empty splits (m = −inf) skipped. The e_z and the sum are found once
// by the first warp (into shared memory; the host keeps splits ≤ MERGE_MAX_SPLITS); then each
// thread takes a pair of columns (8-byte loads: the rows start 2 floats in) with 16 splits' loads
// in flight (one dependent load a split made it latency-bound: 27 µs for 64 splits of V3's 128
// heads). With `zw` > 1 (few blocks: a batch-1 step of 16 heads) the block's zw groups of a warp
// each take every zw-th split of the same columns, added through shared memory in group order
// (one warp walking 128 splits in 8 rounds of loads took 18 µs). Launch: grid (T, heads, column
// chunks), zw groups of whole warps (zw > 1: of one warp each, zw ≤ MERGE_ZW).
#define MERGE_MAX_SPLITS 128
#define MERGE_ZW 8
#define MERGE_CW (KV_LORA % 2 == 0 ? 2 : 1) // columns a thread
extern "C" __global__ void mla_merge(const float* __restrict__ part, float* __restrict__ lat_out, int heads, int splits, int zw) { ENGINE_GRID_DEP();
    __shared__ float ez[MERGE_MAX_SPLITS], gsum, red[MERGE_ZW - 1][WARP][MERGE_CW];
    __shared__ int nzs;
    const int t = blockIdx.x, h = blockIdx.y, R = 2 + KV_LORA;
    const int ct = blockDim.x / zw, zi = threadIdx.x / ct, tc = threadIdx.x % ct; // column threads, this thread's group
    if (zw > MERGE_ZW || (zw > 1 && ct > WARP)) ENGINE_TRAP(); // the host's launch and this layout disagree
    const float* p = part + ((int64_t)t * heads + h) * splits * R;
    if (threadIdx.x < WARP) {
        const int lane = threadIdx.x;
        float gm = -ENGINE_INF;
        for (int z = lane; z < splits; z += WARP) gm = fmaxf(gm, p[z * R]);
        gm = warp_max(gm);
        float gs = 0.f, last = -1.f;
        for (int z = lane; z < splits; z += WARP) {
            const float mz = p[z * R], e = mz > -ENGINE_INF ? expf(mz - gm) : -1.f; // -1: empty
            ez[z] = e;
            if (e >= 0.f) gs += p[z * R + 1] * e, last = (float)z;
        }
        gs = warp_sum(gs); // exact where one split has keys (the rest add zeros)
        last = warp_max(last);
        if (lane == 0) gsum = gs, nzs = (int)last + 1;
    }
    __syncthreads();
    // splits past the last one with keys are never read (a graph step launches the SM-filling
    // count: at 512 tokens and 64-key splits, 8 of 128 have keys)
    const float gs = gsum;
    const int nz = nzs;
    float* out = lat_out + ((int64_t)t * heads + h) * KV_LORA;
    // the column loop's trip count is the block's (its barriers); c is this thread's first column
    for (int cb = MERGE_CW * blockIdx.z * ct; cb < KV_LORA; cb += MERGE_CW * ct * gridDim.z) {
        const int c = cb + MERGE_CW * tc;
        float v[MERGE_CW] = {};
        if (c < KV_LORA) {
            // every split's columns up to the last with keys loaded (an empty one's are allocated
            // but unwritten: selected away, never multiplied), so that the unrolled loads need no
            // branch
#pragma unroll 16
            for (int z = zi; z < nz; z += zw) {
                const float e = ez[z];
                if constexpr (MERGE_CW == 2) {
                    const float2 x = *(const float2*)(p + z * R + 2 + c);
                    v[0] += e >= 0.f ? x.x * e : 0.f;
                    v[1] += e >= 0.f ? x.y * e : 0.f;
                } else {
                    v[0] += e >= 0.f ? p[z * R + 2 + c] * e : 0.f;
                }
            }
        }
        if (zw > 1) {
            if (zi > 0)
                for (int u = 0; u < MERGE_CW; ++u) red[zi - 1][tc][u] = v[u];
            __syncthreads();
            if (zi == 0)
                for (int g = 1; g < zw; ++g)
                    for (int u = 0; u < MERGE_CW; ++u) v[u] += red[g - 1][tc][u];
            __syncthreads(); // before the next columns' partials
        }
        if (zi == 0 && c < KV_LORA) {
            if constexpr (MERGE_CW == 2) *(float2*)(out + c) = make_float2(v[0] / gs, v[1] / gs);
            else out[c] = v[0] / gs;
        }
    }
}

// latent → v: a block computes OUT_ROWS rows of W_UV(h) for MLA_TB tokens (grid.z over the row
// chunks), a warp per row; the tokens' latents sit in shared memory and each lane reads 16-byte
// chunks of the row (one chunk per lane covers a 512-wide FP8 row), decoded once for all tokens.
#define OUT_ROWS 32

template <int WDT>
__device__ void mla_out_impl(const float* __restrict__ lat, const uint8_t* __restrict__ kvb, const float* __restrict__ sc,
                             float* __restrict__ out, int T, int heads, int bn, int bk) {
    int t0 = blockIdx.x * MLA_TB, h = blockIdx.y, e0 = blockIdx.z * OUT_ROWS, nt = min(MLA_TB, T - t0);
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP, nw = blockDim.x / WARP;
    int kb = (KV_LORA + bk - 1) / bk;
    __shared__ float ls[MLA_TB][KV_LORA];
    for (int i = threadIdx.x; i < MLA_TB * KV_LORA; i += blockDim.x) {
        int tt = i / KV_LORA, l = i % KV_LORA;
        ls[tt][l] = tt < nt ? lat[((int64_t)(t0 + tt) * heads + h) * KV_LORA + l] : 0.f;
    }
    __syncthreads();
    const int es = WDT == WDT_F32 ? 4 : WDT == WDT_BF16 ? 2 : 1;
    const int VE = WDT == WDT_FP8 ? 16 : 8;
    bool vec = KV_LORA % VE == 0 && (WDT != WDT_FP8 || bk % VE == 0);
    for (int e = e0 + w; e < min(e0 + OUT_ROWS, VDIM); e += nw) {
        int64_t row = (int64_t)h * PER_HEAD + NOPE + e;
        float acc[MLA_TB];
#pragma unroll
        for (int tt = 0; tt < MLA_TB; ++tt) acc[tt] = 0.f;
        if (vec) {
            for (int k0 = lane * VE; k0 < KV_LORA; k0 += WARP * VE) {
                float wv[VE];
                unpack_chunk<WDT>(load_chunk<WDT>(kvb + (row * KV_LORA + k0) * es), wv);
                float s = WDT == WDT_FP8 ? sc[(row / bn) * kb + k0 / bk] : 1.f;
#pragma unroll
                for (int tt = 0; tt < MLA_TB; ++tt) {
                    float a = 0.f;
#pragma unroll
                    for (int i = 0; i < VE; ++i) a += wv[i] * ls[tt][k0 + i];
                    acc[tt] += a * s;
                }
            }
        } else {
            for (int l = lane; l < KV_LORA; l += WARP) {
                float wv = load_w<WDT>(kvb, sc, row, l, KV_LORA, bn, bk, kb);
#pragma unroll
                for (int tt = 0; tt < MLA_TB; ++tt) acc[tt] += wv * ls[tt][l];
            }
        }
#pragma unroll
        for (int tt = 0; tt < MLA_TB; ++tt) {
            float v = warp_sum(acc[tt]);
            if (lane == 0 && tt < nt) out[((int64_t)(t0 + tt) * heads + h) * VDIM + e] = v;
        }
    }
}

#define MLA_KERNELS(SUF, WDT)                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) mla_q_latent_##SUF(const float* q, const uint8_t* kvb, const float* sc, float* q_lat, int T, int heads, \
                                                  int bn, int bk) { ENGINE_GRID_DEP();                                          \
        mla_q_latent_impl<WDT>(q, kvb, sc, q_lat, T, heads, bn, bk);                                                            \
    }                                                                                                                           \
    extern "C" __global__ void __launch_bounds__(256) mla_out_##SUF(const float* lat, const uint8_t* kvb, const float* sc, float* out, int T, int heads,  \
                                             int bn, int bk) { ENGINE_GRID_DEP();                                               \
        mla_out_impl<WDT>(lat, kvb, sc, out, T, heads, bn, bk);                                                                 \
    }
MLA_KERNELS(f32w, WDT_F32)
MLA_KERNELS(bf16w, WDT_BF16)
MLA_KERNELS(fp8w, WDT_FP8)
