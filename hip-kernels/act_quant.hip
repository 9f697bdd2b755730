// Dynamic FP8 activation quantisation, as SGLang and DeepSeek do it for block-FP8 checkpoints
// (quantization_config.activation_scheme "dynamic"): per token and group of 128 channels,
// s = max(max|x|, 1e-10) / 448 and q = e4m3fn(x / s), rounded to nearest even. The scales are
// written group-major, s[g·M + m] (every token of a group contiguous): the layout the vendor GEMM
// library's 1×128 block scaling reads. engine/weights/act_quant.rs is the host twin (tests).
// The codes are OCP e4m3fn (NVIDIA, gfx950). gfx942 reads e4m3fnuz, whose code c is worth half
// of c's e4m3fn value (exponent bias 8, not 7) except 0x80 (NaN there, −0 in e4m3fn): there the
// e4m3fn code is kept with −0 written as 0 and the scale doubled — the same values, so the same
// numerics as the other targets (and the rule the ROCm backend converts FP8 checkpoints by).
#include "common.h"
#include "e4m3.h"

#define ACT_GROUP 128
// x [M, K] f32 → q [R, K] e4m3fn and s: output row r is x's row src[r] (src == nullptr: row r;
// negative or ≥ M: zeros, e.g. the rows padding a token count to the GEMM library's multiple of
// 4). Rows are cut into segments, one GEMM each (MoE experts): seg[2r], seg[2r + 1] give r's
// segment start and length, and its scales sit at s[off·L + g·len + (r − off)] (L = ceil(K/128)),
// i.e. [L, len] per segment; seg == nullptr is one segment of R rows, s [L, R]. A block of 256
// threads covers 8 groups of `rpb` rows (grid: ceil(R / rpb) × ceil(K/1024), rows on x: more
// than 65535 of them): 32 threads a group, 4 consecutive channels each (K % 4 == 0), every row's
// loads issued before any is used (rpb ≤ QUANT_MAX_RPB; many rows, as the MoE prefill's gather,
// are bound by the loads in flight, not by bytes), the group's max found by xor-shuffles within
// 32 lanes (right for 32- and 64-wide warps).
// With `up` (quant_fp8_silu_act): the rows are SiLU(x) · up, elementwise as silu_mul computes them.
#define QUANT_MAX_RPB 4
__device__ __forceinline__ void quant_fp8_rows(const float* __restrict__ x, const float* __restrict__ up, uint8_t* __restrict__ q, float* __restrict__ s, int M, int R, int K,
                                               const int* __restrict__ src, const int* __restrict__ seg, int rpb, int64_t ldx) {
    const int g = blockIdx.y * 8 + threadIdx.x / 32, j = threadIdx.x % 32, col = g * ACT_GROUP + j * 4;
    const bool in = col < K;
    float4 v[QUANT_MAX_RPB], u[QUANT_MAX_RPB];
#pragma unroll
    for (int i = 0; i < QUANT_MAX_RPB; ++i) {
        const int r = blockIdx.x * rpb + i, m = i < rpb && r < R ? (src ? src[r] : r) : -1;
        const bool load = in && m >= 0 && m < M;
        v[i] = load ? *(const float4*)(x + (int64_t)m * ldx + col) : make_float4(0.f, 0.f, 0.f, 0.f);
        u[i] = load && up ? *(const float4*)(up + (int64_t)m * ldx + col) : make_float4(1.f, 1.f, 1.f, 1.f);
    }
#pragma unroll
    for (int i = 0; i < QUANT_MAX_RPB; ++i) {
        const int r = blockIdx.x * rpb + i;
        if (i >= rpb || r >= R) break; // block-uniform
        float4 w = v[i];
        if (up) w = make_float4(silu_mul1(w.x, u[i].x), silu_mul1(w.y, u[i].y), silu_mul1(w.z, u[i].z), silu_mul1(w.w, u[i].w));
        float amax = fmaxf(fmaxf(fabsf(w.x), fabsf(w.y)), fmaxf(fabsf(w.z), fabsf(w.w)));
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor(amax, o, WARP));
        float sc = e4m3_act_scale(amax);
        if (!in) continue;
        uint32_t packed = f32_to_e4m3fn(w.x / sc) | (f32_to_e4m3fn(w.y / sc) << 8) | (f32_to_e4m3fn(w.z / sc) << 16) | (f32_to_e4m3fn(w.w / sc) << 24);
#if defined(__gfx942__)
        // e4m3fnuz: −0 (0x80) bytes become 0; the scale doubles (below)
#pragma unroll
        for (int b = 0; b < 4; ++b)
            if (((packed >> (8 * b)) & 0xff) == 0x80) packed &= ~(0xffu << (8 * b));
        sc *= 2.f;
#endif
        *(uint32_t*)(q + (int64_t)r * K + col) = packed;
        if (j == 0) {
            int off = seg ? seg[2 * r] : 0, len = seg ? seg[2 * r + 1] : R, L = (K + ACT_GROUP - 1) / ACT_GROUP;
            s[(int64_t)off * L + (int64_t)g * len + (r - off)] = sc;
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) quant_fp8_act(const float* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ s, int M, int R, int K,
                                                                const int* __restrict__ src, const int* __restrict__ seg, int rpb) { ENGINE_GRID_DEP();
    quant_fp8_rows(x, nullptr, q, s, M, R, K, src, seg, rpb, K);
}

// x = SiLU(gate) · up ([M, K] each), quantised as quant_fp8_act does (the MoE prefill's
// intermediate, without its f32 copy).
extern "C" __global__ void __launch_bounds__(256) quant_fp8_silu_act(const float* __restrict__ gate, const float* __restrict__ up, uint8_t* __restrict__ q, float* __restrict__ s, int M,
                                                                     int R, int K, const int* __restrict__ src, const int* __restrict__ seg, int rpb) { ENGINE_GRID_DEP();
    quant_fp8_rows(gate, up, q, s, M, R, K, src, seg, rpb, K);
}

// The same with gate and up side by side in the rows of `gu` ([M, 2K]: an MLP's joint gate / up
// GEMM, joint.rs).
extern "C" __global__ void __launch_bounds__(256) quant_fp8_silu_halves(const float* __restrict__ gu, uint8_t* __restrict__ q, float* __restrict__ s, int M, int R, int K,
                                                                        const int* __restrict__ src, const int* __restrict__ seg, int rpb) { ENGINE_GRID_DEP();
    quant_fp8_rows(gu, gu + K, q, s, M, R, K, src, seg, rpb, 2 * (int64_t)K);
}

// quant_fp8_act's row map and segments applied to codes already made: q [M, K] and s [L, M]
// (quant_fp8_act of x without a map) → qo [R, K], so (segments as above): output row r is row
// src[r]'s codes and scales (negative or ≥ M: the zero row's, as quant_fp8_act writes it), the
// same bytes quantising the gathered rows gives (the quantiser works row by row), for a quarter
// of the f32 rows' reads (the MoE prefill's ~8 pairs a token). K % 16 == 0; a block a row.
extern "C" __global__ void __launch_bounds__(256) gather_fp8_rows(const uint8_t* __restrict__ q, const float* __restrict__ s, uint8_t* __restrict__ qo, float* __restrict__ so, int M,
                                                                  int R, int K, const int* __restrict__ src, const int* __restrict__ seg) { ENGINE_GRID_DEP();
    const int r = blockIdx.x, m = src ? src[r] : r;
    const bool in = m >= 0 && m < M;
    for (int i = threadIdx.x; i < K / 16; i += blockDim.x)
        *(uint4*)(qo + (int64_t)r * K + 16 * i) = in ? *(const uint4*)(q + (int64_t)m * K + 16 * i) : make_uint4(0u, 0u, 0u, 0u);
    float zero_scale = e4m3_act_scale(0.f); // an all-zero row's
#if defined(__gfx942__)
    zero_scale *= 2.f;
#endif
    const int off = seg ? seg[2 * r] : 0, len = seg ? seg[2 * r + 1] : R, L = (K + ACT_GROUP - 1) / ACT_GROUP;
    for (int g = threadIdx.x; g < L; g += blockDim.x) so[(int64_t)off * L + (int64_t)g * len + (r - off)] = in ? s[(int64_t)g * M + m] : zero_scale;
}
