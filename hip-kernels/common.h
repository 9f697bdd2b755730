// Shared helpers of the portable kernels: dtype decoding without vendor headers, and reductions
// that are correct for 32-wide (NVIDIA) and 64-wide (CDNA) warps. ENGINE_WARP_SIZE is the physical
// warp size, defined by the host for the target arch (never hard-code 32).
#pragma once
#ifndef ENGINE_WARP_SIZE
#error "ENGINE_WARP_SIZE must be defined by the host"
#endif
#define WARP ENGINE_WARP_SIZE
#define ENGINE_INF __int_as_float(0x7f800000)
// Stops the kernel: a path its host never selects on this target or for these shapes (NVRTC has
// __trap, HIP __builtin_trap).
#if defined(__AMDGCN__)
#define ENGINE_TRAP() __builtin_trap()
#else
#define ENGINE_TRAP() __trap()
#endif

// Programmatic dependent launch (sm_90+): the CUDA backend launches every kernel so that it may
// start while the kernel before it in the stream drains. ENGINE_GRID_DEP(), the first statement of
// every kernel (kernels.rs tests this), waits until that kernel has completed and its writes are
// visible, then lets the next kernel's blocks be scheduled (they in turn wait here), so the
// launch latency of each kernel overlaps the tail of the one before. No-op elsewhere (CDNA has no
// such launch; a kernel launched without the attribute passes the wait at once).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define ENGINE_GRID_DEP() asm volatile("griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;" ::: "memory")
#else
#define ENGINE_GRID_DEP() \
    do {                  \
    } while (0)
#endif

// Weight element types (the host passes these as template arguments / kernel name suffixes).
#define WDT_F32 0
#define WDT_BF16 1
#define WDT_FP8 2

__device__ __forceinline__ float bf16_to_f32(uint16_t b) { return __uint_as_float(((uint32_t)b) << 16); }

// SiLU(g) · u, as every MLP / expert epilogue and the SiLU·up quantiser compute it (one
// expression, so that fused and unfused paths round alike).
__device__ __forceinline__ float silu_mul1(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// Element i of a latent KV cache entry: f32, or bf16 (`--fp8-activations dynamic`).
__device__ __forceinline__ float kv_elem(const float* e, int i) { return e[i]; }
__device__ __forceinline__ float kv_elem(const uint16_t* e, int i) { return bf16_to_f32(e[i]); }

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
// sm_89+: two e4m3 bytes (the low two of `two`, low byte first) through the hardware conversion to
// f16x2, then to f32: exact, since every e4m3 value (NaN included) is an f16 value.
#define ENGINE_FP8_HW 1
__device__ __forceinline__ float2 fp8x2_e4m3_to_f32(uint32_t two) {
    unsigned short in = (unsigned short)(two & 0xffff);
    uint32_t h2;
    float lo, hi;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(in));
    asm("{\n\t.reg .b16 l, h;\n\tmov.b32 {l, h}, %2;\n\tcvt.f32.f16 %0, l;\n\tcvt.f32.f16 %1, h;\n\t}" : "=f"(lo), "=f"(hi) : "r"(h2));
    return make_float2(lo, hi);
}
#elif defined(__gfx942__) || defined(__gfx950__)
// CDNA3/CDNA4: v_cvt_pk_f32_fp8 converts two FP8 bytes (the low two of `two`) to f32, exactly.
// gfx942 reads e4m3fnuz (the ROCm backend converts e4m3fn checkpoints at upload: bits kept, 0x80
// → 0, block scales doubled); gfx950 reads OCP e4m3fn as stored.
#define ENGINE_FP8_HW 1
__device__ __forceinline__ float2 fp8x2_e4m3_to_f32(uint32_t two) {
    typedef float engine_f32x2 __attribute__((ext_vector_type(2)));
    engine_f32x2 v = __builtin_amdgcn_cvt_pk_f32_fp8((int)two, false);
    return make_float2(v[0], v[1]);
}
#endif

// float8 e4m3 to f32: the hardware conversion where there is one (above), else the portable
// decoder of OCP e4m3fn (NaN at 0x7f/0xff; max 448).
__device__ __forceinline__ float fp8e4m3_to_f32(uint8_t b) {
#ifdef ENGINE_FP8_HW
    return fp8x2_e4m3_to_f32(b).x;
#endif
    uint32_t sign = (uint32_t)(b & 0x80) << 24;
    uint32_t exp = (b >> 3) & 0xf;
    uint32_t man = b & 0x7;
    float v;
    if (exp == 0) {
        v = (float)man * 0.001953125f; // man * 2^-9
    } else if (exp == 0xf && man == 0x7) {
        v = __uint_as_float(0x7fc00000u);
    } else {
        v = __uint_as_float(((exp + 120u) << 23) | (man << 20));
    }
    return __uint_as_float(__float_as_uint(v) | sign);
}

// The four e4m3 bytes of `w` (lowest first) as f32.
__device__ __forceinline__ void fp8x4_to_f32(uint32_t w, float* o) {
#ifdef ENGINE_FP8_HW
    float2 a = fp8x2_e4m3_to_f32(w), b = fp8x2_e4m3_to_f32(w >> 16);
    o[0] = a.x;
    o[1] = a.y;
    o[2] = b.x;
    o[3] = b.y;
#else
#pragma unroll
    for (int i = 0; i < 4; ++i) o[i] = fp8e4m3_to_f32((w >> (8 * i)) & 0xff);
#endif
}

// Element (row, col) of a [rows, K] weight of type WDT; FP8 uses 2-D block scales
// [ceil(rows/bn), ceil(K/bk)] (`kblocks` = ceil(K/bk)).
template <int WDT>
__device__ __forceinline__ float load_w(const uint8_t* __restrict__ w, const float* __restrict__ scales, int64_t row, int64_t col,
                                        int64_t K, int bn, int bk, int kblocks) {
    if (WDT == WDT_F32) return ((const float*)w)[row * K + col];
    if (WDT == WDT_BF16) return bf16_to_f32(((const uint16_t*)w)[row * K + col]);
    return fp8e4m3_to_f32(w[row * K + col]) * scales[(row / bn) * kblocks + col / bk];
}

// k / d for the FP8 scale-block lookups inside weight loops: a shift where d is a power of two
// (every checkpoint's 128-wide blocks), the division otherwise. An integer division is ~20
// instructions: linear.hip's one-row GEMV divided once a row and step, ~100 of the ~320
// instructions of its loop (V3's o_proj at batch 1 issued in 57% of its cycles; ncu 39.4 → 37.1 µs
// without them). The per-pair MoE kernels measured slower with it (moe_down 44.6 → 46.5 µs) and
// keep their division.
struct BlockDiv {
    int d, shift;
    __device__ __forceinline__ explicit BlockDiv(int d_) : d(d_), shift((d_ & (d_ - 1)) == 0 ? __ffs(d_) - 1 : -1) {}
    __device__ __forceinline__ int operator()(int k) const { return shift >= 0 ? k >> shift : k / d; }
};

struct EngineSum {
    __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct EngineMax {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// op over the warp (xor-shuffles: right for 32- and 64-wide warps); every lane gets the result.
template <class Op>
__device__ __forceinline__ float warp_reduce(float v, Op op) {
#pragma unroll
    for (int o = WARP / 2; o > 0; o >>= 1) v = op(v, __shfl_xor(v, o, WARP));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) { return warp_reduce(v, EngineSum{}); }
// v summed over each aligned group of g lanes (g a power of two dividing the warp; every lane of
// the group gets it)
__device__ __forceinline__ float group_sum(float v, int g) {
    for (int o = g / 2; o > 0; o >>= 1) v += __shfl_xor(v, o, WARP);
    return v;
}
__device__ __forceinline__ float warp_max(float v) { return warp_reduce(v, EngineMax{}); }

// op over the block (blockDim.x a multiple of WARP, at most 1024), starting from `init`, through
// `part` (shared, a float per warp); every thread gets the result.
template <class Op>
__device__ __forceinline__ float block_reduce(float v, float* part, Op op, float init) {
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP, nw = blockDim.x / WARP;
    v = warp_reduce(v, op);
    __syncthreads();
    if (lane == 0) part[w] = v;
    __syncthreads();
    float t = init;
    for (int i = 0; i < nw; ++i) t = op(t, part[i]);
    return t;
}

// Sum over the block (as block_reduce, through its own shared memory).
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float part[1024 / 32];
    return block_reduce(v, part, EngineSum{}, 0.f);
}

// Max over the block (as block_sum).
__device__ __forceinline__ float block_max(float v) {
    __shared__ float part[1024 / 32];
    return block_reduce(v, part, EngineMax{}, -ENGINE_INF);
}

// 32-bit word j (0-3) of a 16-byte load.
__device__ __forceinline__ uint32_t u4_word(const uint4& v, int j) { return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w; }
