// MoE experts at prefill sizes with FP8 activations and FP8 weights (`--fp8-activations
// dynamic`): one launch multiplies every expert's rows, DeepGEMM's "grouped contiguous" form. The
// routed pairs are laid out as one segment of rows per expert (moe_prefill.rs MoeLayout: padded
// to a multiple of 8 rows), quantised per row and 128 channels with each segment's scales in its
// own [K / 128, len] block (act_quant.hip); a tile is ≤ 128 rows of one segment:
//   D[row, n] = Σ_kb sx[row, kb] · sw_e[n / 128, kb] · Σ_{k in kb} A[row, k] · W_e[n, k]
// with A and W e4m3, D f32 ([rows, N]; rows past a tile's count are not written).
//   - Hopper's warpgroup MMA (wgmma, sm_90a): the e4m3 products at the tensor cores' FP8 rate
//     (sm_90's mma.sync on e4m3 is emulated: each fragment converted to f16 by the ALUs, then an
//     f16 MMA; a version of this kernel on it ran at ~160 TFLOPS);
//   - a block per (tile, 128 columns of N): two warpgroups of 64 rows each, one
//     wgmma.m64n128k32 a 32-column step from shared memory (128-byte swizzled K-major rows, as the
//     descriptors say); each 128-column K block's products land in registers (the first step
//     overwrites them), then are scaled by the row's activation scale and the block's weight scale
//     and added to the f32 accumulators (the promotion DeepSeek's FP8 GEMM does every 128).
//     Both warpgroups always multiply (rows past the tile's are not written): a branch around
//     the MMA makes ptxas serialise every MMA of the kernel;
//   - K blocks in a ring of MG_ST shared stages filled by cp.async (written at their swizzled
//     places), MG_ST - 2 in flight ahead of the one multiplied, one barrier a block; a block's
//     MMA runs on across the next block's barrier and copies;
//   - blocks walk the (tile, column) grid in groups of MG_GROUP tiles, columns outermost inside a
//     group, so that a group's weight columns and rows stay in L2 while every block of the group
//     uses them.
// sm_90a only; other targets compile a trap the host never selects. Needs N % 128 == 0,
// K % 128 == 0 and 128 × 128 weight blocks (the host checks).
// Launch: grid (tiles · N / 128), block MG_THREADS, dynamic shared memory MG_SMEM (moe_f8_gemm.rs
// mirrors MG_*). A tile is 8 ints: expert (of W's), first row, rows, its segment's first row and
// rows (where the segment's scales are: [K / 128, rows] from index first · K / 128), 3 unused.
#include "bf16.h"

#define MG_BM 128     // rows a tile (two warpgroups of 64)
#define MG_BN 128     // columns a block (one weight scale block)
#define MG_BK 128     // K a stage (one scale block; one 128-byte swizzle row)
#define MG_ST 4       // stages
#define MG_GROUP 8    // tiles a group of the launch order
#define MG_THREADS 256
#define MG_STAGE ((MG_BM * MG_BK + MG_BN * MG_BK + MG_BM * 4 + 1023) / 1024 * 1024) // bytes a stage: A, W, scales; 1024-aligned
#define MG_SMEM (MG_ST * MG_STAGE + 1024) // + the alignment of the first stage

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MG_WGMMA 1
// The byte offset of 16-byte chunk c of row r in a 128-byte swizzled tile (1024-aligned): chunk
// c ^ (r % 8) of the row — the address bits 4-6 XOR bits 7-9 that the descriptors' 128-byte mode
// applies when the MMA reads it.
__device__ __forceinline__ int mg_swz(int r, int c) { return r * 128 + 16 * (c ^ (r % 8)); }

// K block kb of the tile into stage `st` (A rows < nrows, the block's 128 weight rows, the rows'
// scales); one copy group.
__device__ __forceinline__ void mg_stage(uint8_t* st, const uint8_t* __restrict__ A, const float* __restrict__ SX, const uint8_t* __restrict__ We, int row0, int nrows,
                                         int sx0, int sx_stride, int n0, int K, int kb) {
    const int tid = threadIdx.x;
    uint8_t* a = st;
    uint8_t* w = st + MG_BM * MG_BK;
    float* sx = (float*)(w + MG_BN * MG_BK);
#pragma unroll
    for (int i = tid; i < MG_BM * (MG_BK / 16); i += MG_THREADS) {
        const int r = i / (MG_BK / 16), c = i % (MG_BK / 16);
        if (r < nrows) cp_async16(a + mg_swz(r, c), A + (int64_t)(row0 + r) * K + kb * MG_BK + 16 * c);
        cp_async16(w + mg_swz(r, c), We + (int64_t)(n0 + r) * K + kb * MG_BK + 16 * c);
    }
    if (tid < MG_BM / 4 && 4 * tid < nrows) cp_async16(sx + 4 * tid, SX + sx0 + (int64_t)kb * sx_stride + 4 * tid);
    cp_async_commit();
}

// A shared-memory matrix descriptor: K-major rows of 128 bytes, 128-byte swizzle, 8-row groups
// 1024 bytes apart.
__device__ __forceinline__ uint64_t mg_desc(const void* p) {
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    return (uint64_t)((a & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) | ((uint64_t)1 << 62);
}

// d (64 rows × 128 columns a warpgroup, 64 floats a thread) = (acc ? d : 0) + A · Bᵀ over 32 K.
__device__ __forceinline__ void mg_wgmma(float* d, uint64_t da, uint64_t db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),
          "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]),
          "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
          "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]),
          "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(acc));
}
#endif

extern "C" __global__ void __launch_bounds__(MG_THREADS, 1) moe_gemm_f8(const uint8_t* __restrict__ A, const float* __restrict__ SX, const uint8_t* __restrict__ W,
                                                                      const float* __restrict__ WS, const int32_t* __restrict__ tiles, int n_tiles, float* __restrict__ D, int N,
                                                                      int K) {
#if defined(MG_WGMMA)
    extern __shared__ __align__(16) unsigned char mg_smem[];
    uint8_t* smem = mg_smem + ((1024 - ((uint32_t)__cvta_generic_to_shared(mg_smem) & 1023)) & 1023); // 1024-aligned
    // launch order: groups of MG_GROUP tiles; inside a group, column block outermost
    const int nb = N / MG_BN, per_group = MG_GROUP * nb;
    const int grp = blockIdx.x / per_group, in = blockIdx.x % per_group;
    const int gtiles = min(MG_GROUP, n_tiles - grp * MG_GROUP);
    const int tile = grp * MG_GROUP + in % gtiles, n0 = (in / gtiles) * MG_BN;
    const int32_t* tl = tiles + 8 * tile;
    const int kbs = K / MG_BK;
    const int e = tl[0], row0 = tl[1], nrows = tl[2], sx0 = tl[3] * kbs + (row0 - tl[3]), sx_stride = tl[4];
    const uint8_t* We = W + (int64_t)e * N * K;
    const float* ws = WS + ((int64_t)e * nb + n0 / MG_BN) * kbs; // this column block's weight scales
    const int wg = threadIdx.x / 128, w = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    // MG_ST - 2 K blocks in flight ahead of the one multiplied: the stage of the block before it
    // may still be read by that block's MMA until the wait below
#pragma unroll
    for (int s = 0; s < MG_ST - 2; ++s)
        if (s < kbs) mg_stage(smem + s * MG_STAGE, A, SX, We, row0, nrows, sx0, sx_stride, n0, K, s);
        else cp_async_commit();
    float acc[64], p[64]; // p: only ever written by the MMA (its first step of a block overwrites)
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.f;
    // promotion of block kb's products: × the row's activation scale × the weight scale; the
    // lane's rows 16w + g and 16w + g + 8 of the warpgroup's 64, columns 8j + 2t, + 1
    auto promote = [&](int kb) {
        const float* sx = (const float*)(smem + (kb % MG_ST) * MG_STAGE + (MG_BM + MG_BN) * MG_BK);
        const float sw = ws[kb], s0 = sx[64 * wg + 16 * w + g] * sw, s1 = sx[64 * wg + 16 * w + g + 8] * sw;
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            acc[4 * j] += p[4 * j] * s0;
            acc[4 * j + 1] += p[4 * j + 1] * s0;
            acc[4 * j + 2] += p[4 * j + 2] * s1;
            acc[4 * j + 3] += p[4 * j + 3] * s1;
        }
    };
    // Block kb's MMA runs across the next block's barrier and copies; its products are promoted
    // at the start of block kb + 1's turn, just before that block's MMA reuses the registers.
    for (int kb = 0; kb < kbs; ++kb) {
        const uint8_t* st = smem + (kb % MG_ST) * MG_STAGE;
        cp_async_wait<MG_ST - 3>();
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); // the copies, visible to the MMA's reads
        __syncthreads(); // stage kb landed; every MMA of block kb - 2 is done (promoted)
        if (kb + MG_ST - 2 < kbs) mg_stage(smem + ((kb + MG_ST - 2) % MG_ST) * MG_STAGE, A, SX, We, row0, nrows, sx0, sx_stride, n0, K, kb + MG_ST - 2);
        else cp_async_commit(); // an empty group: the count above stays right
        if (kb > 0) promote(kb - 1);
        const uint8_t* a = st + wg * 64 * MG_BK;
        const uint8_t* wt = st + MG_BM * MG_BK;
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int kk = 0; kk < MG_BK / 32; ++kk) mg_wgmma(p, mg_desc(a + 32 * kk), mg_desc(wt + 32 * kk), kk);
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    }
    promote(kbs - 1);
    cp_async_wait<0>(); // (only empty groups are left)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = 64 * wg + 16 * w + g + 8 * h;
        if (r >= nrows) continue;
        float* d = D + (int64_t)(row0 + r) * N + n0 + 2 * t;
#pragma unroll
        for (int j = 0; j < 16; ++j) *(float2*)(d + 8 * j) = make_float2(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
    }
#else
    __builtin_trap(); // the host takes the GEMM library on targets without the warpgroup MMA
#endif
}
