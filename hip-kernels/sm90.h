// Hopper (sm_90a) building blocks shared by the kernels on the warpgroup MMA: mbarriers, copies by
// the tensor memory accelerator (TMA) and bulk copies that complete on them, and the shared-memory
// matrix descriptor of 128-byte-swizzled K-major tiles. SM90_WGMMA is defined where they exist
// (NVIDIA sm_90a); elsewhere a kernel compiles a trap its host never selects.
#pragma once
#include "common.h"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SM90_WGMMA 1
// Stage use: the producer's thread arrives on `full` expecting `bytes`; the copies below complete
// them as they land.
__device__ __forceinline__ void sm90_bar_expect(uint64_t* b, int bytes) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"((uint32_t)__cvta_generic_to_shared(b)), "r"(bytes) : "memory");
}

// A box of the tensor map at (column x in bytes, row y) into shared memory (written with the map's
// 128-byte swizzle: 16-byte chunk c of row r at r · 128 + 16 · (c ^ r % 8) of a 1024-aligned
// box, the layout the MMA descriptors below read); completes its bytes on `bar`.
__device__ __forceinline__ void sm90_tma(void* dst, const void* map, int x, int y, uint64_t* bar) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"((uint32_t)__cvta_generic_to_shared(dst)),
                 "l"((uint64_t)map), "r"(x), "r"(y), "r"((uint32_t)__cvta_generic_to_shared(bar))
                 : "memory");
}

// `bytes` (a multiple of 16, both ends 16-byte aligned) from global to shared memory; completes
// them on `bar`.
__device__ __forceinline__ void sm90_bulk(void* dst, const void* src, int bytes, uint64_t* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"((uint32_t)__cvta_generic_to_shared(dst)), "l"(src), "r"(bytes),
                 "r"((uint32_t)__cvta_generic_to_shared(bar))
                 : "memory");
}

__device__ __forceinline__ void sm90_bar_init(uint64_t* b, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"((uint32_t)__cvta_generic_to_shared(b)), "r"(count) : "memory");
}

__device__ __forceinline__ void sm90_bar_arrive(uint64_t* b) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"((uint32_t)__cvta_generic_to_shared(b)) : "memory");
}

// Returns once the barrier's phase of this parity has completed.
__device__ __forceinline__ void sm90_bar_wait(uint64_t* b, int parity) {
    uint32_t done;
    do {
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done)
                     : "r"((uint32_t)__cvta_generic_to_shared(b)), "r"(parity)
                     : "memory");
    } while (!done);
}

// Thread-block clusters (the kernels launched with a cluster dimension): this block's rank in its
// cluster; a barrier of every thread of the cluster (a block must not exit while another may
// still arrive on its mbarriers or copy into its shared memory).
__device__ __forceinline__ int sm90_cluster_rank() {
    uint32_t r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return (int)r;
}

__device__ __forceinline__ void sm90_cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

// Arrives on the mbarrier at b's offset in block `rank` of the cluster (the instruction's default
// semantics, as CUTLASS's cluster barrier: with `.release.cluster` moe_f8_gemm.hip ran 1.8x slower).
__device__ __forceinline__ void sm90_bar_arrive_remote(uint64_t* b, int rank) {
    asm volatile("{\n.reg .b32 ra;\nmapa.shared::cluster.u32 ra, %0, %1;\nmbarrier.arrive.shared::cluster.b64 _, [ra];\n}\n" ::"r"((uint32_t)__cvta_generic_to_shared(b)),
                 "r"(rank)
                 : "memory");
}

// sm90_tma into the same offset of every block of the cluster in `mask`, completing its bytes on
// the mbarrier at bar's offset in each.
__device__ __forceinline__ void sm90_tma_multicast(void* dst, const void* map, int x, int y, uint64_t* bar, uint16_t mask) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(
                     (uint32_t)__cvta_generic_to_shared(dst)),
                 "l"((uint64_t)map), "r"(x), "r"(y), "r"((uint32_t)__cvta_generic_to_shared(bar)), "h"(mask)
                 : "memory");
}

// 2^x, subnormal results flushed to 0 (one MUFU.EX2; exp2f's subnormal handling costs three more
// instructions a value): the softmax of the warpgroup attention kernels, whose probabilities
// below 2^-126 add nothing to an f32 sum of at least one.
__device__ __forceinline__ float sm90_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// A compile-time bool for generic lambdas (`decltype(b)::value`): a loop body in two forms.
template <bool B> struct sm90_flag {
    static constexpr bool value = B;
};

// A shared-memory matrix descriptor: K-major rows of 128 bytes, 128-byte swizzle, 8-row groups
// 1024 bytes apart. A K step of 32 bytes (32 e4m3 or 16 bf16) is the start plus 32 bytes.
__device__ __forceinline__ uint64_t sm90_desc(const void* p) {
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    return (uint64_t)((a & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) | ((uint64_t)1 << 62);
}

// The same for an MN-major operand (bf16 B read transposed, the MMA's transpose bit set): rows
// of 128 bytes (64 N columns) indexed by K, 8-row (K) groups 1024 bytes apart, 64-column atoms
// `lbo` bytes apart. A K step of 16 is the start plus 16 rows (2,048 bytes).
__device__ __forceinline__ uint64_t sm90_desc_mn(const void* p, uint32_t lbo) {
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    return (uint64_t)((a & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(1024 >> 4) << 32) | ((uint64_t)1 << 62);
}
#endif
