// Element-wise and data-movement ops: embedding, SiLU·up, add, row gather, all-gather reshuffle, KV-cache writes.
#include "common.h"
#include "bf16.h"

// out[c] = f(c) for c < n, this thread's columns with eight loads in flight before the stores
// (one row per block: a loop of one load at a time cost ~14 µs for 7,168 columns).
template <class F>
__device__ __forceinline__ void row_copy(float* out, int n, F f) {
    for (int c0 = threadIdx.x; c0 < n; c0 += 8 * blockDim.x) {
        float v[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            int c = c0 + j * (int)blockDim.x;
            v[j] = c < n ? f(c) : 0.f;
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            int c = c0 + j * (int)blockDim.x;
            if (c < n) out[c] = v[j];
        }
    }
}

template <int WDT>
__device__ void embedding_impl(const uint8_t* table, const float* scales, const uint32_t* ids, float* out, int T, int H, int bn, int bk) {
    int t = blockIdx.x;
    int kb = (H + bk - 1) / bk;
    int64_t id = ids[t];
    row_copy(out + (int64_t)t * H, H, [&](int c) { return load_w<WDT>(table, scales, id, c, H, bn, bk, kb); });
}
extern "C" __global__ void embedding_f32w(const uint8_t* t, const float* s, const uint32_t* ids, float* o, int T, int H, int bn, int bk) { ENGINE_GRID_DEP(); embedding_impl<WDT_F32>(t, s, ids, o, T, H, bn, bk); }
extern "C" __global__ void embedding_bf16w(const uint8_t* t, const float* s, const uint32_t* ids, float* o, int T, int H, int bn, int bk) { ENGINE_GRID_DEP(); embedding_impl<WDT_BF16>(t, s, ids, o, T, H, bn, bk); }
extern "C" __global__ void embedding_fp8w(const uint8_t* t, const float* s, const uint32_t* ids, float* o, int T, int H, int bn, int bk) { ENGINE_GRID_DEP(); embedding_impl<WDT_FP8>(t, s, ids, o, T, H, bn, bk); }

extern "C" __global__ void silu_mul(const float* gate, const float* up, float* out, int64_t n) { ENGINE_GRID_DEP();
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        out[i] = silu_mul1(gate[i], up[i]);
    }
}

extern "C" __global__ void add_inplace(float* x, const float* y, int64_t n) { ENGINE_GRID_DEP();
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

extern "C" __global__ void gather_rows(const float* x, const uint32_t* rows, float* out, int cols) { ENGINE_GRID_DEP();
    int r = blockIdx.x;
    const float* src = x + (int64_t)rows[r] * cols;
    row_copy(out + (int64_t)r * cols, cols, [&](int c) { return src[c]; });
}

// all-gather output [size, rows, cols] (rank-major) → [rows, total] (columns in rank order,
// trailing padding columns beyond `total` dropped).
// out[rows[r]] = x[r]: the inverse of gather_rows.
extern "C" __global__ void scatter_rows(const float* x, const uint32_t* rows, float* out, int cols) { ENGINE_GRID_DEP();
    int r = blockIdx.x;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) out[(int64_t)rows[r] * cols + c] = x[(int64_t)r * cols + c];
}

extern "C" __global__ void concat_cols(const float* in, float* out, int rows, int cols, int size, int total) { ENGINE_GRID_DEP();
    int r = blockIdx.x;
    for (int c = threadIdx.x; c < total; c += blockDim.x) {
        int q = c / cols;
        out[(int64_t)r * total + c] = in[((int64_t)q * rows + r) * cols + (c - q * cols)];
    }
}

// y [rows, c1 + c2] → a [rows, c1], b [rows, c2]: two linear layers' outputs from their joint
// GEMM (joint.rs); a block a row, 16 bytes a thread where both widths are multiples of 4 (one
// float a thread: V3's q_a + kv_a at 256 rows 6.4 µs).
extern "C" __global__ void split_cols(const float* y, float* a, float* b, int rows, int c1, int c2) { ENGINE_GRID_DEP();
    const int r = blockIdx.x, n = c1 + c2;
    if (c1 % 4 == 0 && c2 % 4 == 0) { // (rows of whole float4s: none straddles the two)
        for (int c = 4 * threadIdx.x; c < n; c += 4 * blockDim.x) {
            const float4 v = *(const float4*)(y + (int64_t)r * n + c);
            if (c < c1)
                *(float4*)(a + (int64_t)r * c1 + c) = v;
            else
                *(float4*)(b + (int64_t)r * c2 + c - c1) = v;
        }
        return;
    }
    for (int c = threadIdx.x; c < n; c += blockDim.x) {
        const float v = y[(int64_t)r * n + c];
        if (c < c1)
            a[(int64_t)r * c1 + c] = v;
        else
            b[(int64_t)r * c2 + c - c1] = v;
    }
}

// kv[layer][slot][e] = entries[i][e]; the pool is [layers, slots, entry].
extern "C" __global__ void kv_write(float* kv, const float* entries, const uint32_t* slots, int layer, int num_slots, int entry) { ENGINE_GRID_DEP();
    int i = blockIdx.x;
    float* dst = kv + ((int64_t)layer * num_slots + slots[i]) * entry;
    for (int e = threadIdx.x; e < entry; e += blockDim.x) dst[e] = entries[(int64_t)i * entry + e];
}

// The same into a bf16 pool (`--fp8-activations dynamic`: the attention reads bf16 operands, as
// SGLang's bf16 KV cache), rounded to nearest even.
extern "C" __global__ void kv_write_bf16(uint16_t* kv, const float* entries, const uint32_t* slots, int layer, int num_slots, int entry) { ENGINE_GRID_DEP();
    int i = blockIdx.x;
    uint16_t* dst = kv + ((int64_t)layer * num_slots + slots[i]) * entry;
    for (int e = threadIdx.x; e < entry; e += blockDim.x) dst[e] = (uint16_t)bf16_rne(entries[(int64_t)i * entry + e]);
}

// x [n] f32 → out [3n] bf16: the hi parts, then the mid, then the lo (x = hi + mid + lo to f32's
// 24 bits: each part the nearest bf16 of what the parts before it left, exactly representable):
// the MoE router's stacked operand (router.rs), whose three products with bf16 weights are an f32
// GEMM's products.
extern "C" __global__ void split3_bf16_rows(const float* x, uint16_t* out, int64_t n) { ENGINE_GRID_DEP();
    // 8 elements a thread (two 16-byte loads, a 16-byte store a part) where n allows; one a
    // thread, with 2-byte stores to three parts, took 10.6 µs for V3's 256 × 7,168 on the H200
    // (19.2 at 512 rows)
    const int64_t i = 8 * ((int64_t)blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= n) return;
    const int w = n % 8 == 0 ? 8 : (int)min((int64_t)8, n - i);
    float v8[8];
    if (w == 8) {
        *(float4*)&v8[0] = *(const float4*)&x[i];
        *(float4*)&v8[4] = *(const float4*)&x[i + 4];
    } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) v8[e] = e < w ? x[i + e] : 0.f;
    }
    uint32_t p[3][4]; // each part's 8 bf16, packed in pairs (constant indices: registers)
#pragma unroll
    for (int e = 0; e < 8; e += 2) {
        uint32_t h[2], m[2], l[2];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            const float v = v8[e + u];
            h[u] = bf16_rne(v);
            const float r = v - __uint_as_float(h[u] << 16);
            m[u] = bf16_rne(r);
            l[u] = bf16_rne(r - __uint_as_float(m[u] << 16));
        }
        p[0][e / 2] = h[0] | h[1] << 16;
        p[1][e / 2] = m[0] | m[1] << 16;
        p[2][e / 2] = l[0] | l[1] << 16;
    }
#pragma unroll
    for (int k = 0; k < 3; ++k) {
        if (w == 8) {
            *(uint4*)&out[k * n + i] = make_uint4(p[k][0], p[k][1], p[k][2], p[k][3]);
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e)
                if (e < w) out[k * n + i + e] = (uint16_t)(p[k][e / 2] >> (16 * (e % 2)));
        }
    }
}

// x [n] f32 → out [n] bf16 (nearest even), 8 elements a thread.
extern "C" __global__ void to_bf16(const float* x, uint16_t* out, int64_t n) { ENGINE_GRID_DEP();
    const int64_t i = 8 * ((int64_t)blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= n) return;
    if (n % 8 == 0) {
        const float4 a = *(const float4*)&x[i], b = *(const float4*)&x[i + 4];
        *(uint4*)&out[i] = make_uint4(bf16_pack(a.x, a.y), bf16_pack(a.z, a.w), bf16_pack(b.x, b.y), bf16_pack(b.z, b.w));
        return;
    }
    for (int64_t e = i; e < min(n, i + 8); ++e) out[e] = (uint16_t)bf16_rne(x[e]);
}

// x [n] f32 → out [2n] bf16: the hi parts, then the lo parts (x ≈ hi + lo): cuBLASLt's stacked
// operand for linear layers with bf16 weights.
extern "C" __global__ void split_bf16_rows(const float* x, uint16_t* out, int64_t n) { ENGINE_GRID_DEP();
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        uint16_t h, l;
        bf16_split(x[i], &h, &l);
        out[i] = h;
        out[n + i] = l;
    }
}

// W [N, K] FP8 with block scales, dequantised and split into bf16 hi (out[0 .. N·K]) and lo
// (out[N·K .. 2·N·K]) for the vendor GEMM library: hi + lo carries W·s to ~16 bits, where W·s
// rounded to bf16 alone would lose the scale's low bits (~4e-3). Four elements of a row per
// thread (K % 4 == 0).
extern "C" __global__ void dequant_fp8_hilo(const uint8_t* W, const float* S, uint16_t* out, int N, int K, int bn, int bk) { ENGINE_GRID_DEP();
    int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * 4, n = (int64_t)N * K;
    if (i >= n) return;
    int64_t row = i / K;
    int col = (int)(i % K), kb = (K + bk - 1) / bk;
    uint32_t w4 = *(const uint32_t*)(W + i);
    float f[4];
    fp8x4_to_f32(w4, f);
    uint16_t hi[4], lo[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) bf16_split(f[j] * S[(row / bn) * kb + (col + j) / bk], &hi[j], &lo[j]);
    *(uint2*)(out + i) = make_uint2(hi[0] | ((uint32_t)hi[1] << 16), hi[2] | ((uint32_t)hi[3] << 16));
    *(uint2*)(out + n + i) = make_uint2(lo[0] | ((uint32_t)lo[1] << 16), lo[2] | ((uint32_t)lo[3] << 16));
}

