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
//   - persistent blocks (one an SM) walk the work items (tile, 128 columns of N) with a stride of
//     the grid; a block is three warpgroups: a producer, one thread of which copies each item's K
//     blocks by the tensor memory accelerator (a tensor map each for A and for the weights, boxes
//     of 128 rows × 128 bytes written with the 128-byte swizzle; the rows' scales by a bulk copy)
//     into a ring of MG_ST shared stages, running ahead across items, and two consumers of 64
//     rows each that multiply (one wgmma.m64n128k32 a 32-column step from shared memory, K-major
//     swizzled rows, as the descriptors say). A stage is handed over by mbarriers: "full"
//     completes when the bytes the producer expects have landed, "empty" when both consumers'
//     MMAs have read it. The consumers never wait for each other;
//   - each 128-column K block's products land in registers (the first step overwrites them), then
//     are scaled by the row's activation scale and the block's weight scale and added to the f32
//     accumulators (the promotion DeepSeek's FP8 GEMM does every 128). A consumer keeps two
//     product buffers: block kb + 1's MMA is issued before block kb's products are promoted
//     (setmaxnreg moves the producer's registers to the consumers for them). A consumer with no
//     rows in a tile (≤ 64 rows) hands its stages back without multiplying; the warpgroup index
//     and that test are broadcast from lane 0 so that ptxas sees the branches as warp-uniform and
//     keeps the MMAs asynchronous;
//   - launched in clusters of two (`cluster` 2; the host's choice where the column blocks pair up
//     and the device holds enough clusters at once), the blocks of a cluster share one operand:
//     the A tile of a tile's column blocks 2c and 2c + 1 (MG_PAIR_A), or the weights' column
//     block c of an expert's two tiles (MG_PAIR_W: the expert's rows past 128, which would
//     otherwise read its weights twice). Each block copies half of the shared operand (64 rows)
//     into the stage of both (TMA multicast), and a consumer warp releases a stage to both
//     producers (its "empty" counts the 16 warps of the cluster), so that L2 serves it once for
//     both (at 4,096 tokens the launch is bound by L2: ncu, its fabric between the two L2
//     halves ~90% busy). Both blocks wait at a cluster barrier before exiting: a peer may still
//     arrive on their barriers. Only A's 64-row boxes that hold rows of the tile are copied;
//   - the work is a list of units built on the host (moe_f8_gemm.rs), N / 128 items each, in
//     expert order, so that the blocks working at once share the few experts' weights and tiles
//     in L2: a pair of one expert's tiles (MG_PAIR_W), two tiles column pair by column pair
//     (MG_PAIR_A: the first tile's N / 256 items, then the second's; an absent second tile's are
//     skipped), or with blocks alone a tile (MG_SOLO);
//   - moe_gemm_f8_glu, the gate and up projections at once (NW 2: a stage holds the tile's A
//     and both weights' column blocks, so that A is copied once for both): a consumer keeps both
//     accumulators and one product buffer (gate's K block multiplied, promoted, then up's; the
//     other consumer's MMAs fill the tensor cores meanwhile), and the item ends as
//     quant_fp8_silu_act would: h = SiLU(gate) · up, its 128 columns (one activation group) a
//     row's amax across the lane quad, and h's e4m3 codes Q [rows, N] and scales S, each
//     segment's [N / 128, len] from S + first · N / 128: the down projection's A as the
//     activation quantiser writes it (the same values), without the f32 gate and up in memory.
//   - moe_gemm_f8_r2, moe_gemm_f8 in 256-row tiles (RB 2: a stage holds 256 rows of A, its
//     boxes that hold rows copied): a consumer takes row blocks h and h + 2 with two
//     accumulators and one product buffer, the second MMA only where block h + 2 holds rows, so
//     an expert's ≤ 256 rows read a weight block once (128-row tiles read it once a tile: ~1.5
//     times at 4,096 tokens). Tuned `moe_f8_gemm_rows256` (1,540 µs against 1,585 a V3 layer);
// sm_90a only; other targets compile a trap the host never selects. Needs N % 128 == 0,
// K % 128 == 0 and 128 × 128 weight blocks (the host checks).
// Launch: grid min(SMs, units · N / 128) (with clusters: 2 × min(clusters resident at once,
// units · N / 128)), block MG_THREADS, dynamic shared memory MG_SMEM (moe_gemm_f8_glu: MG_SMEM2;
// moe_f8_gemm.rs mirrors MG_*). `maps`: the tensor maps of A ([rows, K]) and of W ([experts · N,
// K]; glu: gate's, then up's) in boxes of 64 rows × 128 bytes, then W's again in boxes of 128
// rows (one copy a column block where the weights are not shared), 16 words each, in global
// memory. A
// unit is MG_UNIT ints: its kind, then tiles t0 and t1 of 5 ints each: expert (of W's), first
// row, rows (0: none), its segment's first row and rows (where the segment's scales are: [K /
// 128, rows] from index first · K / 128).
#include "sm90.h"
#include "e4m3.h"

#define MG_BM 128     // rows a tile (two warpgroups of 64)
#define MG_BN 128     // columns an item (one weight scale block)
#define MG_BK 128     // K a stage (one scale block; one 128-byte swizzle row)
#define MG_ST 6       // stages (one weight a stage)
#define MG_ST2 4      // stages (two weights a stage: moe_gemm_f8_glu)
#define MG_THREADS 384 // a producer and two consumer warpgroups
// bytes a stage of NW weights and RB · MG_BM rows: A, the weights' column blocks, scales; 1024-aligned
#define MG_STAGE(NW, RB) ((RB * MG_BM * MG_BK + (NW) * MG_BN * MG_BK + RB * MG_BM * 4 + 1023) / 1024 * 1024)
#define MG_SMEM (MG_ST * MG_STAGE(1, 1) + 1024) // + the alignment of the first stage
#define MG_SMEM2 (MG_ST2 * MG_STAGE(2, 1) + 1024) // (and MG_STAGE(1, 2): moe_gemm_f8_r2)

#ifdef SM90_WGMMA
#define MG_WGMMA 1
#define MG_UNIT 16 // ints a unit
#define MG_PAIR_W 0 // a cluster's two blocks: tiles t0 and t1 of one expert, the same column (W multicast)
#define MG_PAIR_A 1 // a cluster's two blocks: one tile, two columns (A multicast); tile t0's, then t1's
#define MG_SOLO 2   // a block alone: tile t0, every column

// A block's share of work item i (of unit i / nb, its item i % nb): expert e, the tile's first
// row and rows, its segment's first row and rows, the first column n0, and which operand the
// cluster's two blocks share (MG_PAIR_W: the weights; MG_PAIR_A: the activations; MG_SOLO:
// none). False: nothing for this item (a MG_PAIR_A unit of one tile: its second half).
struct MgItem {
    int e, row0, rows, sf, sl, n0, share;
};
__device__ __forceinline__ bool mg_item(const int32_t* __restrict__ units, int nb, int i, int cr, MgItem& m) {
    // the unit's kind and both tiles in three 16-byte loads issued together: one trip to memory
    // at an item's start (the kind first and then its tile, two trips, cost the down
    // projection ~1%: 1,601-1,607 µs against 1,583-1,587)
    const int4* u = (const int4*)(units + MG_UNIT * (i / nb));
    const int4 a = u[0], b = u[1], d = u[2]; // kind, t0 = (a.y, a.z, a.w, b.x, b.y), t1 = (b.z, b.w, d.x, d.y, d.z)
    const int c = i % nb;
    bool t = false;
    m.share = a.x;
    if (m.share == MG_PAIR_W) {
        t = cr;
        m.n0 = c * MG_BN;
    } else if (m.share == MG_PAIR_A) {
        t = c >= nb / 2;
        m.n0 = (2 * (c - t * (nb / 2)) + cr) * MG_BN;
    } else
        m.n0 = c * MG_BN;
    m.e = t ? b.z : a.y, m.row0 = t ? b.w : a.z, m.rows = t ? d.x : a.w, m.sf = t ? d.y : b.x, m.sl = t ? d.z : b.y;
    return m.rows > 0;
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

#ifdef MG_WGMMA
// acc (a warpgroup's 64 rows × 128 columns) += K block products p promoted: rows 16w + g by s0,
// 16w + g + 8 by s1 (columns 8j + 2t, + 1)
__device__ __forceinline__ void mg_promote(float* acc, const float* p, float s0, float s1) {
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        acc[4 * j] += p[4 * j] * s0;
        acc[4 * j + 1] += p[4 * j + 1] * s0;
        acc[4 * j + 2] += p[4 * j + 2] * s1;
        acc[4 * j + 3] += p[4 * j + 3] * s1;
    }
}

// p = the stage's A rows of warpgroup h times weight block wt (K-major, 128-byte swizzled) over
// the stage's 128 K, issued and committed (not waited for)
__device__ __forceinline__ void mg_issue(float* p, const uint8_t* a, const uint8_t* wt) {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
    for (int kk = 0; kk < MG_BK / 32; ++kk) mg_wgmma(p, sm90_desc(a + 32 * kk), sm90_desc(wt + 32 * kk), kk);
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

// The grouped GEMM of NW weights a stage and tiles of RB · MG_BM rows (see the top): NW 1 writes
// D, NW 2 (gate W0, up W1) writes SiLU(gate) · up's codes Q and scales S. NW · RB is a consumer's
// MMAs a K block: 1 with two product buffers, 2 with one (two accumulators: gate's and up's, or
// row blocks h and h + 2 of a 256-row tile).
template <int NW, int RB>
__device__ __forceinline__ void mg_gemm(const uint64_t* __restrict__ maps, const float* __restrict__ SX, const float* __restrict__ WS0, const float* __restrict__ WS1,
                                        const int32_t* __restrict__ units, int n_units, float* __restrict__ D, uint8_t* __restrict__ Q, float* __restrict__ S, int N, int K,
                                        int cluster) {
    static_assert(NW * RB == 1 || NW * RB == 2, "one or two MMAs a K block");
    constexpr int ST = NW * RB == 1 ? MG_ST : MG_ST2, STAGE = MG_STAGE(NW, RB), BM = RB * MG_BM;
    extern __shared__ __align__(16) unsigned char mg_smem[];
    __shared__ __align__(8) uint64_t full[ST], empty[ST];
    uint8_t* smem = mg_smem + ((1024 - ((uint32_t)__cvta_generic_to_shared(mg_smem) & 1023)) & 1023); // 1024-aligned
    // with clusters of 2 (`cluster` 2) the blocks of a cluster (rank cr) share the A tile of two
    // column blocks or the weights of two tiles (mg_item): each copies half of it into both
    // blocks' stage (TMA multicast), so that L2 serves it once for both
    const int cr = cluster > 1 ? sm90_cluster_rank() : 0, ci = blockIdx.x / cluster, clusters = gridDim.x / cluster;
    const int nb = N / MG_BN, kbs = K / MG_BK, items = n_units * nb;
    if ((cluster != 1 && cluster != 2) || nb % cluster != 0) __trap(); // the host's launch and this kernel disagree
    if (threadIdx.x == 0) {
        for (int s = 0; s < ST; ++s) {
            sm90_bar_init(&full[s], 1);           // the producer's expectation, completed by the copies' bytes
            sm90_bar_init(&empty[s], 8 * cluster); // lane 0 of each consumer warp of the cluster, once its MMA has read the stage
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    if (cluster > 1) sm90_cluster_sync(); // the peer's barriers are initialised before any copy or arrival reaches them
    else __syncthreads();
    const int wg = __shfl_sync(0xffffffff, threadIdx.x / 128, 0); // warp-uniform, visibly to ptxas
    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 48;\n" ::: "memory"); // (its registers go to the consumers: 128 · 48 + 256 · 224 ≤ 384 · 168)
        // producer, one thread: stage use u of slot s waits for the consumers' release of use u - 1
        if (threadIdx.x == 0) {
            const uint64_t* ma = maps; // the activations [rows, K]; then the weights [experts · N, K]
            asm volatile("prefetch.tensormap [%0];\nprefetch.tensormap [%1];\n" ::"l"((uint64_t)ma), "l"((uint64_t)(maps + 16)) : "memory");
            int it = 0;
            for (int i = ci; i < items; i += clusters) {
                MgItem m;
                if (!mg_item(units, nb, i, cr, m)) continue;
                const int sx0 = m.sf * kbs + (m.row0 - m.sf), sxb = 4 * min(m.rows, BM); // the tile's rows' scales (rows a multiple of 8)
                const int boxes = min((m.rows + 63) / 64, BM / 64);                        // A's 64-row boxes that hold rows
                for (int kb = 0; kb < kbs; ++kb, ++it) {
                    const int s = it % ST;
                    uint8_t* st = smem + s * STAGE;
                    if (it >= ST) sm90_bar_wait(&empty[s], (it / ST - 1) & 1);
                    sm90_bar_expect(&full[s], (64 * boxes + NW * MG_BN) * MG_BK + sxb);
                    // A: box b by block b of the cluster into both (shared), else by this block
                    for (int b = m.share == MG_PAIR_A ? cr : 0; b < boxes; b += m.share == MG_PAIR_A ? 2 : 1) {
                        if (m.share == MG_PAIR_A) sm90_tma_multicast(st + b * 64 * MG_BK, ma, kb * MG_BK, m.row0 + 64 * b, &full[s], 3);
                        else sm90_tma(st + b * 64 * MG_BK, ma, kb * MG_BK, m.row0 + 64 * b, &full[s]);
                    }
                    // the weights' 128 rows from n0: half by each block into both (shared), else all
#pragma unroll
                    for (int w = 0; w < NW; ++w) {
                        uint8_t* dw = st + (BM + w * MG_BN) * MG_BK;
                        const int wr = m.e * N + m.n0;
                        if (m.share == MG_PAIR_W) sm90_tma_multicast(dw + cr * 64 * MG_BK, maps + 16 * (1 + w), kb * MG_BK, wr + 64 * cr, &full[s], 3);
                        else sm90_tma(dw, maps + 16 * (1 + NW + w), kb * MG_BK, wr, &full[s]); // one 128-row box
                    }
                    sm90_bulk(st + (BM + NW * MG_BN) * MG_BK, SX + sx0 + (int64_t)kb * m.sl, sxb, &full[s]);
                }
            }
        }
        __syncwarp(); // (thread 0 rejoins its warp before the aligned cluster barrier)
        if (cluster > 1) sm90_cluster_sync();
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 224;\n" ::: "memory"); // two product buffers (or accumulators) and the accumulators
    const int h = wg - 1, w = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    int it = 0; // stage uses before this item's
    // a stage back to both producers of the cluster that copy into it
    auto release = [&](int u) {
        if (lane == 0) {
            sm90_bar_arrive(&empty[u % ST]);
            if (cluster > 1) sm90_bar_arrive_remote(&empty[u % ST], cr ^ 1);
        }
    };
    for (int i = ci; i < items; i += clusters) {
        MgItem m;
        if (!mg_item(units, nb, i, cr, m)) continue;
        const int e = m.e, row0 = m.row0, nrows = m.rows, n0 = m.n0;
        if (!__shfl_sync(0xffffffff, 64 * h < nrows, 0)) { // no rows of this item: only hand the stages back
            for (int kb = 0; kb < kbs; ++kb) {
                sm90_bar_wait(&full[(it + kb) % ST], ((it + kb) / ST) & 1);
                release(it + kb);
            }
            it += kbs;
            continue;
        }
        const int64_t wsb = ((int64_t)e * nb + n0 / MG_BN) * kbs; // this column block's weight scales
        // stage use u landed (the stage returned); rows(st, rb, ...): A's 64-row block rb in it
        // and the promotion scales of the lane's rows 16w + g and 16w + g + 8 of the block
        auto stage = [&](int u) {
            const uint8_t* st = smem + (u % ST) * STAGE;
            sm90_bar_wait(&full[u % ST], (u / ST) & 1);
            return st;
        };
        auto rows = [&](const uint8_t* st, int rb, float& x0, float& x1) {
            const float* sx = (const float*)(st + (BM + NW * MG_BN) * MG_BK);
            x0 = sx[64 * rb + 16 * w + g];
            x1 = sx[64 * rb + 16 * w + g + 8];
            return st + rb * 64 * MG_BK;
        };
        // D's rows of 64-row block rb from a warpgroup's accumulators (columns 8j + 2t, + 1);
        // rows past the tile's are not written
        auto store = [&](const float* acc, int rb) {
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int r = 64 * rb + 16 * w + g + 8 * hh;
                if (r >= nrows) continue;
                float* d = D + (int64_t)(row0 + r) * N + n0 + 2 * t;
#pragma unroll
                for (int j = 0; j < 16; ++j) *(float2*)(d + 8 * j) = make_float2(acc[4 * j + 2 * hh], acc[4 * j + 2 * hh + 1]);
            }
        };
        if constexpr (NW * RB == 1) {
            const float* ws = WS0 + wsb;
            // two product buffers: K block kb + 1's MMA runs while block kb's products are promoted
            float acc[64], pa[64], pb[64], sa0, sa1, sb0, sb1;
#pragma unroll
            for (int j = 0; j < 64; ++j) acc[j] = 0.f;
            // K block kb's MMA into p (its first step overwrites), once its stage has landed; (s0, s1):
            // its promotion scales
            auto issue = [&](float* p, int kb, float& s0, float& s1) {
                const uint8_t* st = stage(it + kb);
                const uint8_t* a = rows(st, h, s0, s1);
                const float sw = ws[kb];
                s0 *= sw;
                s1 *= sw;
                mg_issue(p, a, st + BM * MG_BK);
            };
            // K block kb's MMA has completed: its stage back to the producer, its products promoted
            auto finish = [&](const float* p, int kb, float s0, float s1) {
                release(it + kb);
                mg_promote(acc, p, s0, s1);
            };
            issue(pa, 0, sa0, sa1);
            for (int kb = 0;; kb += 2) {
                // block kb in flight in pa
                if (kb + 1 == kbs) {
                    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
                    finish(pa, kb, sa0, sa1);
                    break;
                }
                issue(pb, kb + 1, sb0, sb1);
                asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
                finish(pa, kb, sa0, sa1);
                // block kb + 1 in flight in pb
                if (kb + 2 == kbs) {
                    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
                    finish(pb, kb + 1, sb0, sb1);
                    break;
                }
                issue(pa, kb + 2, sa0, sa1);
                asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
                finish(pb, kb + 1, sb0, sb1);
            }
            store(acc, h);
        } else {
            // two accumulators (gate's and up's, or row blocks h and h + 2), one product buffer
            // (while this warpgroup promotes, the other's MMAs keep the tensor cores busy); with
            // RB 2 the second pass only where block h + 2 holds rows (warp-uniform)
            const int rb1 = RB == 2 ? h + 2 : h;
            const bool two = NW == 2 || __shfl_sync(0xffffffff, 64 * rb1 < nrows, 0);
            float ag[64], au[64], p[64];
#pragma unroll
            for (int j = 0; j < 64; ++j) ag[j] = au[j] = 0.f;
            for (int kb = 0; kb < kbs; ++kb) {
                const uint8_t* st = stage(it + kb);
                const uint8_t* wt = st + BM * MG_BK;
                float x0, x1;
                const uint8_t* a = rows(st, h, x0, x1);
                const float sg = WS0[wsb + kb], su = NW == 2 ? WS1[wsb + kb] : sg;
                mg_issue(p, a, wt);
                asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
                mg_promote(ag, p, x0 * sg, x1 * sg);
                if (two) {
                    if (RB == 2) a = rows(st, rb1, x0, x1);
                    mg_issue(p, a, NW == 2 ? wt + MG_BN * MG_BK : wt);
                    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
                }
                release(it + kb);
                if (two) mg_promote(au, p, x0 * su, x1 * su);
            }
            if constexpr (RB == 2) { // D: row blocks h (ag) and h + 2 (au)
                store(ag, h);
                store(au, rb1);
            } else {
                // h = SiLU(gate) · up into ag; a row's 128 columns are the lane quad's
                const int soff = m.sf, slen = m.sl;
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    float amax = 0.f;
#pragma unroll
                    for (int j = 0; j < 16; ++j)
#pragma unroll
                        for (int c = 0; c < 2; ++c) {
                            const int x = 4 * j + 2 * hh + c;
                            ag[x] = silu_mul1(ag[x], au[x]);
                            amax = fmaxf(amax, fabsf(ag[x]));
                        }
                    amax = fmaxf(amax, __shfl_xor_sync(0xffffffff, amax, 1));
                    amax = fmaxf(amax, __shfl_xor_sync(0xffffffff, amax, 2));
                    const float sc = e4m3_act_scale(amax);
                    const int r = 64 * h + 16 * w + g + 8 * hh;
                    if (r >= nrows) continue;
                    uint8_t* q = Q + (int64_t)(row0 + r) * N + n0 + 2 * t;
#pragma unroll
                    for (int j = 0; j < 16; ++j)
                        *(uint16_t*)(q + 8 * j) = (uint16_t)(f32_to_e4m3fn(ag[4 * j + 2 * hh] / sc) | (f32_to_e4m3fn(ag[4 * j + 2 * hh + 1] / sc) << 8));
                    if (t == 0) S[(int64_t)soff * nb + (int64_t)(n0 / MG_BN) * slen + (row0 + r - soff)] = sc;
                }
            }
        }
        it += kbs;
    }
    if (cluster > 1) sm90_cluster_sync();
}
#endif

extern "C" __global__ void __launch_bounds__(MG_THREADS, 1) moe_gemm_f8(const uint64_t* __restrict__ maps, const float* __restrict__ SX,
                                                                      const float* __restrict__ WS, const int32_t* __restrict__ units, int n_units, float* __restrict__ D, int N,
                                                                      int K, int cluster) { ENGINE_GRID_DEP();
#if defined(MG_WGMMA)
    mg_gemm<1, 1>(maps, SX, WS, nullptr, units, n_units, D, nullptr, nullptr, N, K, cluster);
#else
    __builtin_trap(); // the host takes the GEMM library on targets without the warpgroup MMA
#endif
}

// `maps`: A's, gate's and up's; WSG, WSU their weight scales; Q [rows, N] e4m3 and S the scales of
// SiLU(gate) · up.
extern "C" __global__ void __launch_bounds__(MG_THREADS, 1) moe_gemm_f8_glu(const uint64_t* __restrict__ maps, const float* __restrict__ SX, const float* __restrict__ WSG,
                                                                          const float* __restrict__ WSU, const int32_t* __restrict__ units, int n_units, uint8_t* __restrict__ Q,
                                                                          float* __restrict__ S, int N, int K, int cluster) { ENGINE_GRID_DEP();
#if defined(MG_WGMMA)
    mg_gemm<2, 1>(maps, SX, WSG, WSU, units, n_units, nullptr, Q, S, N, K, cluster);
#else
    __builtin_trap();
#endif
}

// moe_gemm_f8 in 256-row tiles (dynamic shared memory MG_ST2 · MG_STAGE(1, 2) + 1024): an
// expert's ≤ 256 rows read its weights' column block once, where 128-row tiles read it once a
// tile; the same products and promotions, so the same D.
extern "C" __global__ void __launch_bounds__(MG_THREADS, 1) moe_gemm_f8_r2(const uint64_t* __restrict__ maps, const float* __restrict__ SX,
                                                                         const float* __restrict__ WS, const int32_t* __restrict__ units, int n_units, float* __restrict__ D, int N,
                                                                         int K, int cluster) { ENGINE_GRID_DEP();
#if defined(MG_WGMMA)
    mg_gemm<1, 2>(maps, SX, WS, nullptr, units, n_units, D, nullptr, nullptr, N, K, cluster);
#else
    __builtin_trap();
#endif
}
