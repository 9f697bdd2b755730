// f32 → OCP e4m3fn, as the activation quantiser (act_quant.hip) and the kernels that quantise
// their own outputs (mla_heads.hip's `_bxq`) write it.
#pragma once

#define E4M3_MAX 448.f

// The activation quantiser's scale of a 128-channel group whose largest |x| is amax (s = max(amax,
// 1e-10) / 448; q = e4m3fn(x / s)): act_quant.hip and the kernels that write its codes themselves.
__device__ __forceinline__ float e4m3_act_scale(float amax) { return fmaxf(amax, 1e-10f) / E4M3_MAX; }

// f32 → e4m3fn, round to nearest even, saturating at ±448 (x / s never exceeds 448 by more than
// rounding here). sm_89+ converts in hardware; elsewhere the bit manipulation below.
__device__ __forceinline__ uint32_t f32_to_e4m3fn(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    unsigned short two;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(two) : "f"(0.f), "f"(x));
    return two & 0xff;
#else
    uint32_t bits = __float_as_uint(x), sign = (bits >> 24) & 0x80;
    float a = fminf(fabsf(x), E4M3_MAX);
    if (a < 0.015625f) return sign | (uint32_t)rintf(a * 512.f); // subnormal: m × 2^-9 (8 → 0x08)
    uint32_t b = __float_as_uint(a);
    int e = (int)((b >> 23) & 0xff) - 127 + 7;
    uint32_t man = b & 0x7fffff, m3 = man >> 20, rem = man & 0xfffff;
    if (rem > 0x80000 || (rem == 0x80000 && (m3 & 1))) ++m3;
    if (m3 == 8) {
        m3 = 0;
        ++e;
    }
    if (e > 15 || (e == 15 && m3 > 6)) {
        e = 15;
        m3 = 6;
    }
    return sign | ((uint32_t)e << 3) | m3;
#endif
}

