// Maps the HIP device dialect used by hip-kernels/ onto CUDA, so NVRTC compiles the same sources
// the ROCm backend compiles with hipRTC. Prepended by the JIT on NVIDIA; never seen by hipRTC.
#pragma once
#define __HIP_PLATFORM_NVIDIA__ 1
typedef unsigned long long uint64_t;
typedef long long int64_t;
typedef unsigned int uint32_t;
typedef int int32_t;
typedef unsigned short uint16_t;
typedef unsigned char uint8_t;

// HIP's warp shuffles take no mask; on NVIDIA every lane of the warp participates.
template <typename T>
__device__ __forceinline__ T __shfl_xor(T v, int lane_mask, int width = 32) {
    return __shfl_xor_sync(0xffffffffu, v, lane_mask, width);
}
template <typename T>
__device__ __forceinline__ T __shfl(T v, int src, int width = 32) {
    return __shfl_sync(0xffffffffu, v, src, width);
}
