// bf16 rounding and hi/lo splitting for the tensor-core kernels (mma_tile.h, mla_prefill.hip), and
// NVIDIA's bf16 matrix instruction. A float v ≈ hi + lo with both parts bf16 carries ~16 mantissa
// bits: products of split operands give near-f32 results on bf16 matrix units.
#pragma once
#include "common.h"

// round-to-nearest-even bf16 of f, in the low 16 bits
__device__ __forceinline__ uint32_t bf16_rne(float f) {
    uint32_t u = __float_as_uint(f);
    u += 0x7fffu + ((u >> 16) & 1u);
    return u >> 16;
}

// two floats as packed bf16 (`lo` in the low half), rounded to nearest even: one cvt on NVIDIA
// sm_80+ (the integer rounding above is ~10 ALU operations a pair, and the tensor-core tiles'
// staging was bound by the ALU pipe), the same bits either way
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
__device__ __forceinline__ uint32_t bf16_pack(float lo, float hi) {
    uint32_t d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}
#else
__device__ __forceinline__ uint32_t bf16_pack(float lo, float hi) { return bf16_rne(lo) | (bf16_rne(hi) << 16); }
#endif

// v ≈ hi + lo
__device__ __forceinline__ void bf16_split(float v, uint16_t* hi, uint16_t* lo) {
    uint32_t h = bf16_rne(v);
    *hi = (uint16_t)h;
    *lo = (uint16_t)bf16_rne(v - __uint_as_float(h << 16));
}

// (a, b) as a packed hi pair and a packed lo pair
__device__ __forceinline__ void bf16_split2(float a, float b, uint32_t* hi, uint32_t* lo) {
    uint32_t h = bf16_pack(a, b);
    *hi = h;
    *lo = bf16_pack(a - __uint_as_float(h << 16), b - __uint_as_float(h & 0xffff0000u));
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// c += a · b for one m16n8k16 fragment: bf16 operands, f32 accumulators (4 A, 2 B registers)
__device__ __forceinline__ void mma_bf16_16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8 × 8 b16 matrices from shared memory: lane i gives the address of row i % 8 of matrix
// i / 8; register j of a lane comes back as row lane / 4, columns 2(lane % 4) .. + 1 of matrix j
// (an A or B fragment of mma_bf16_16816 for row-major rows).
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

// ... transposed: register j holds column lane / 4, rows 2(lane % 4) .. + 1 of matrix j (B
// fragments from rows that run along K).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

// 16 bytes global → shared without registers (cp.async, L2 only), completing in the background:
// cp_async_commit closes a group of them, cp_async_wait<N> returns when at most N of this thread's
// groups are still in flight (a __syncthreads after it makes every thread's copies visible)
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
}
// ... to the shared address `dst` (cvta'd), reading `bytes` (16, or 0: zeros written: rows past a
// tile's end)
__device__ __forceinline__ void cp_async16_fill(unsigned dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#endif
