// Global → shared copies that complete in the background: cp.async on NVIDIA sm_80+ (no
// registers; acp_wait<N>() returns once at most N committed groups are still in flight, each
// thread its own: a __syncthreads after it makes every thread's copies visible), plain 16-byte
// copies elsewhere (then commit and wait do nothing).
#pragma once

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define ACP_ASYNC 1
#endif

__device__ __forceinline__ void acp_copy16(void* dst, const void* src) {
#ifdef ACP_ASYNC
    unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
#else
    *(uint4*)dst = *(const uint4*)src;
#endif
}

__device__ __forceinline__ void acp_commit() {
#ifdef ACP_ASYNC
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
__device__ __forceinline__ void acp_wait() {
#ifdef ACP_ASYNC
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}
