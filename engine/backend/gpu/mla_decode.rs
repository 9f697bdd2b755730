//! MLA decode attention on the matrix units (hip-kernels/mla_decode.hip): the absorbed form with
//! bf16 operands, a block per (token, group of heads, split of the context) that reads each cache
//! entry once for the whole head group; split partials are combined by mla.hip's `mla_merge`.
//! Taken with `--fp8-activations dynamic` (`attn_bf16`, whose KV caches hold bf16 latents) where
//! the device has matrix units (or the tests ask for the portable product); the CUDA-core kernel
//! stays for the f32 mode and for devices without this path. Three kernels: 64 heads a block
//! (mla_decode.hip, mma.sync / MFMA; 128-head V3 is compute-bound there), the same groups on
//! Hopper's warpgroup MMA (mla_decode_wg.hip; sm_90a, V2 / V3's 512 + 64 entries; batches of a
//! block an SM) and, for at most `mla_decode_rows_max_heads` heads (on the H200 128: V3's heads in
//! 8 groups, and a tensor-parallel rank's 16), 16 heads a block with the softmax in registers
//! (mla_decode_rows.hip; NVIDIA sm_80+), which must stream the cache once a head group.
use super::backend::{GpuBackend, GpuTensor, GpuVendor};
use super::device::{err, DevBuf, LaunchConfig};
use super::ops::GpuKvCache;
use super::step::AttnDev;
use crate::backend::gpu::ModelDims;
use crate::backend::{BackendError, MlaDims};

/// Fewest keys a split of one token's context takes (two of NVIDIA's 32-key tiles): below that
/// the block's fixed cost (staging the heads' queries, writing a partial) outweighs its keys.
pub(super) const MMA_SPLIT_MIN_KEYS: usize = 64;
/// The most splits of one token's context.
pub(super) const MMA_MAX_SPLITS: usize = 64;
/// ... for the 16-head kernel, whose one head group leaves a batch-1 step a block per split
/// (at most mla.hip's MERGE_MAX_SPLITS)
pub(super) const ROWS_MAX_SPLITS: usize = 128;
/// mla.hip's MERGE_MAX_SPLITS
pub(super) const MERGE_MAX_SPLITS: usize = 128;
/// mla.hip's MERGE_ZW: the most groups of a block that take every zw-th split
const MERGE_ZW: usize = 8;

/// mla_merge's launch for `rows` (token, head) rows: (threads a block, column chunks, split
/// groups). 128 threads a block, a column pair each (V3's 512 latents in 2 chunks); where that
/// leaves fewer blocks than SMs (a batch-1 step of 16 heads), a warp's column pairs a block and up
/// to MERGE_ZW groups of a warp, each taking every zw-th split, so that a thread walks ~16 splits
/// (one round of unrolled loads): one warp walking 128 splits took 18 µs.
pub(super) fn merge_shape(rows: usize, kv_lora: usize, splits: usize, sms: usize, warp: u32) -> (u32, usize, usize) {
    let wide = kv_lora.div_ceil(256).max(1);
    if rows * wide >= sms {
        return (128, wide, 1);
    }
    let zw = splits.div_ceil(16).clamp(1, MERGE_ZW);
    (warp * zw as u32, kv_lora.div_ceil(2 * warp as usize).max(1), zw)
}

/// The kernel's tile shape on one vendor (MD_* in mla_decode.hip): heads per block, keys per
/// tile, threads, the ways a row tile's warps split the contraction and the value columns, and
/// whether the next tile's entries land by cp.async in a second key tile (NVIDIA sm_80+, entries
/// of whole 16-byte chunks: 8 bf16).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct DecodeTile {
    pub heads: usize,
    pub keys: usize,
    pub threads: usize,
    pub split: usize,
    pub async_stage: bool,
}

impl DecodeTile {
    pub fn for_target(warp: u32, nvidia_sm80: bool, d: &MlaDims) -> Self {
        if warp == 64 {
            DecodeTile { heads: 32, keys: 16, threads: 256, split: 2, async_stage: false }
        } else {
            DecodeTile { heads: 64, keys: 32, threads: 512, split: 4, async_stage: nvidia_sm80 && d.kv_entry().is_multiple_of(8) }
        }
    }

    /// sizeof(MdShared) in mla_decode.hip (every member a multiple of 4 bytes: no padding)
    pub fn shared_bytes(&self, d: &MlaDims) -> usize {
        let entry = d.kv_entry();
        let row = entry.next_multiple_of(16 * self.split) + 8; // MD_DP, bf16
        let q = self.heads * row * 2;
        let k = self.keys * row * 2 * if self.async_stage { 2 } else { 1 };
        let s = self.split * self.heads * (self.keys + 4) * 4;
        let p = self.heads * (self.keys + 8) * 2;
        q + k + s + p + self.heads * 4 + self.heads * 8
    }
}

/// The warpgroup-MMA kernel (mla_decode_wg.hip, WD_* there): 64 heads a block, 256 threads, and
/// its shared memory: the queries and two 64-key tiles as 9 chunks of 64 rows × 128 bytes, a
/// chunk of probabilities, 64 rescales and 64 (max, scale) pairs, and 1 KB to align the chunks.
const WG_HEADS: usize = 64;
const WG_THREADS: u32 = 256;
pub(super) const WG_SHARED: usize = 3 * 9 * 8192 + 8192 + 64 * 4 + 64 * 8 + 1024;

/// The 16-head kernel (mla_decode_rows.hip, MR_* there): heads a block, key groups (16 keys
/// each), keys a tile, tile buffers, threads (4 key groups × 2 value halves, a warp each).
pub(super) const ROWS_HEADS: usize = 16;
const ROWS_KEY_GROUPS: usize = 4;
const ROWS_KEYS: usize = 64;
const ROWS_STAGES: usize = 2;
const ROWS_THREADS: u32 = 256;
/// MR_QKS: a key group's two value halves each take half of the score contraction and exchange
/// their partial scores through shared memory (a warp's 16 × 16 f32 a tile, by lane); where the
/// padded contraction is an odd number of 16-column steps the kernel keeps whole scores.
const ROWS_SPLIT_SCORES: bool = true;

/// sizeof(MrShared) in mla_decode_rows.hip: the queries and two key tiles as bf16 rows of the
/// contraction (padded to 16) or the value columns (padded to 32), whichever is wider, plus 8;
/// the four key groups' (max, sum) per head; each head's output divisor; a transaction barrier (8
/// bytes) per tile buffer; with split scores each warp's partial scores (16 × 16 f32).
pub(super) fn rows_shared_bytes(d: &MlaDims) -> usize {
    let contraction = d.kv_entry().next_multiple_of(16);
    let row = contraction.max(d.kv_lora_rank.next_multiple_of(32)) + 8;
    // split over the two value halves: an even number of 16-column steps; a warp's heads × keys
    let scores = if ROWS_SPLIT_SCORES && (contraction / 16).is_multiple_of(2) { ROWS_THREADS as usize / 32 * ROWS_HEADS * (ROWS_KEYS / ROWS_KEY_GROUPS) * 4 } else { 0 };
    ROWS_HEADS * row * 2 + ROWS_STAGES * ROWS_KEYS * row * 2 + ROWS_KEY_GROUPS * ROWS_HEADS * 2 * 4 + ROWS_HEADS * 4 + scores + ROWS_STAGES * 8
}

/// Splits of each token's context for the 16-head kernel (`slots`: the blocks all SMs hold at
/// once): for a graph step (lengths unknown) as many as fit one wave; otherwise the count that
/// minimises waves × (keys a split + a tile's worth of fixed cost), at most one split per
/// MMA_SPLIT_MIN_KEYS keys (the kernel's least chunk: more splits would be empty).
pub(super) fn rows_splits(blocks: usize, slots: usize, max_len: usize, graph: bool) -> usize {
    let blocks = blocks.max(1);
    if graph {
        return (slots / blocks).clamp(1, ROWS_MAX_SPLITS);
    }
    let cap = max_len.div_ceil(MMA_SPLIT_MIN_KEYS).clamp(1, ROWS_MAX_SPLITS);
    (1..=cap).min_by_key(|&s| (blocks * s).div_ceil(slots) * (max_len.div_ceil(s) + ROWS_KEYS)).unwrap_or(1)
}

/// Splits of each token's context: enough blocks for every SM (`blocks` = tokens × head groups),
/// each split at least MMA_SPLIT_MIN_KEYS keys of the longest context; a graph step does not know
/// the context lengths of its replays, so it takes the SM-filling count (empty splits cost one
/// short block each).
pub(super) fn mma_splits(blocks: usize, sms: usize, max_len: usize, graph: bool) -> usize {
    let fill = sms.div_ceil(blocks.max(1)).clamp(1, MMA_MAX_SPLITS);
    if graph {
        fill
    } else {
        fill.min(max_len.div_ceil(MMA_SPLIT_MIN_KEYS)).max(1)
    }
}

/// Latents a decode kernel reads or writes ([T, heads, kv_lora]): f32, or bf16 for the warpgroup
/// kernel, which takes either as its queries (`mla_q_latent` / `mla_q_latent_bf16`) and writes
/// either as its output (bf16 where the value projection reads it so: `mla_v_out`).
pub(super) enum Latents {
    F32(DevBuf<f32>),
    Bf16(DevBuf<u16>),
}

impl<V: GpuVendor> GpuBackend<V> {
    /// Whether decode attention takes the matrix-unit kernel: a bf16 cache (allocated so with
    /// bf16 attention), matrix units (or the tests' portable product), and the tile's shared
    /// memory (plus the kernel's 1 KB of static shared memory) within what a block may have here.
    pub(super) fn mma_decode(&self, d: &MlaDims, kv: &GpuKvCache) -> bool {
        let tile = self.decode_tile(d);
        kv.bf16 && self.attn_bf16 && (self.mma_gemm || self.flash_portable) && tile.shared_bytes(d) + 1024 <= self.dev.max_shared_per_block()
    }

    /// Whether that kernel is the 16-head one (mla_decode_rows.hip): few heads (a tensor-parallel
    /// rank's share), NVIDIA sm_80+ with entries of whole 16-byte chunks, not the tests' portable
    /// product, and its shared memory within a block's.
    fn rows_decode(&self, d: &MlaDims) -> bool {
        d.num_heads <= self.tuned.mla_decode_rows_max_heads && self.decode_tile(d).async_stage && !self.flash_portable && rows_shared_bytes(d) + 1024 <= self.dev.max_shared_per_block()
    }

    /// Whether decode attention of `t` tokens takes the warpgroup-MMA kernel: tuned on, sm_90a, V2 /
    /// V3's entries (512 latents + 64 rope), whole 64-head groups, its shared memory within a
    /// block's, and at least a block an SM before any split (the compute-bound batches it was
    /// measured at: V3's 128 and 256; smaller batches take the 16-head kernel where the heads
    /// are within `mla_decode_rows_max_heads`, else mla_decode.hip).
    pub(super) fn wg_decode(&self, d: &MlaDims, t: usize) -> bool {
        t * d.num_heads.div_ceil(WG_HEADS) >= self.sms && self.tuned.mla_decode_wgmma && self.arch == "sm_90a" && !self.flash_portable && d.kv_lora_rank == 512 && d.qk_rope == 64 && d.qk_nope.is_multiple_of(4) && d.num_heads.is_multiple_of(WG_HEADS) && WG_SHARED <= self.dev.max_shared_per_block()
    }

    /// The kernel's tile on this device (cp.async staging on NVIDIA sm_80+).
    fn decode_tile(&self, d: &MlaDims) -> DecodeTile {
        DecodeTile::for_target(self.warp, self.warp == 32 && self.matrix_units, d)
    }

    /// `lat` = each token's heads' attention-weighted latents ([T, heads, kv_lora]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn mla_decode_mma(&self, q: &GpuTensor, q_lat: &Latents, kv: &GpuKvCache, layer: usize, a: &AttnDev, d: &MlaDims, lat: &mut Latents) -> Result<(), BackendError> {
        let (t, dims) = (q.rows, ModelDims::of_mla(d));
        let tile = self.decode_tile(d);
        // the kernel, its block and shared memory, and how many blocks an SM holds
        let wg = self.wg_decode(d, t);
        let (f, name, heads_per_block, threads, smem, bps) = if wg {
            (self.mla_decode_wg_func(dims)?, "mla_decode_wg", WG_HEADS, WG_THREADS, WG_SHARED, None)
        } else if self.rows_decode(d) {
            let smem = rows_shared_bytes(d);
            // by shared memory (an SM has 1 KB more than a block may take) and registers (≤ 255 a thread)
            let bps = ((self.dev.max_shared_per_block() + 1024) / (smem + 1024)).min(65536 / (ROWS_THREADS as usize * 256)).max(1);
            (self.mla_decode_rows_func(dims)?, "mla_decode_rows", ROWS_HEADS, ROWS_THREADS, smem, Some(bps))
        } else {
            (self.mla_decode_func(dims)?, "mla_decode_mma", tile.heads, tile.threads as u32, tile.shared_bytes(d), None)
        };
        let groups = d.num_heads.div_ceil(heads_per_block);
        let splits = match bps {
            Some(bps) => rows_splits(t * groups, self.sms * bps, a.max_len, self.in_graph_step()),
            None => mma_splits(t * groups, self.sms, a.max_len, self.in_graph_step()),
        };
        // every (token, head, split) header is written by the kernel, every value row of a
        // non-empty split too (mla_merge reads no values of an empty one)
        let mut part = if splits > 1 { self.scratch::<f32>(t * d.num_heads * splits * (2 + d.kv_lora_rank))? } else { self.scratch::<f32>(1)? };
        let (heads, l, ns, scale, sp, min_chunk, sm) = (d.num_heads as i32, layer as i32, kv.slots as i32, d.scale, splits as i32, MMA_SPLIT_MIN_KEYS as i32, smem as i32);
        self.span("attention", || {
            // (f32, bf16) pointers of the query latents and of the output: the one given, the
            // other null; bf16 is the warpgroup kernel's only, and its output so needs one split
            let ptrs = |x: &Latents| match x {
                Latents::F32(b) => (b.ptr(), 0u64),
                Latents::Bf16(b) => (0u64, b.ptr()),
            };
            let ((q32, q16), (o32, o16)) = (ptrs(q_lat), ptrs(lat));
            if (q16 != 0 || o16 != 0) && !wg || o16 != 0 && splits > 1 {
                return Err(self.op_err(name, format!("bf16 latents need the warpgroup kernel and one split ({splits})")));
            }
            let mut b = self.launch(&f);
            b.arg(&q.buf).arg(&q32).arg(&kv.buf).arg(&a.flat).arg(&a.off).arg(&a.len).arg(&o32).arg(&heads).arg(&l).arg(&ns).arg(&scale).arg(&sp).arg(&min_chunk).arg(&mut part).arg(&sm);
            if wg {
                b.arg(&q16).arg(&o16);
            }
            let launch = LaunchConfig { grid_dim: if wg { ((t * groups) as u32, 1, splits as u32) } else { (t as u32, groups as u32, splits as u32) }, block_dim: (threads, 1, 1), shared_mem_bytes: smem as u32 };
            b.run(launch).map_err(err(name))?;
            match lat {
                Latents::F32(lat) => self.mla_merge_splits(dims, &part, lat, t, d.num_heads, splits),
                Latents::Bf16(_) => Ok(()), // one split (checked above)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3() -> MlaDims {
        MlaDims { num_heads: 128, qk_nope: 128, qk_rope: 64, v_head: 128, kv_lora_rank: 512, scale: 0.1 }
    }

    #[test]
    fn shared_layout_fits_each_vendor() {
        // NVIDIA: 64 heads × 584 bf16 + two tiles of 32 keys × 584 bf16 + four parts' scores,
        // probabilities, rescale and final max/sum: under the 227 KB an H100/H200 block may have
        // (less the kernel's 1 KB of static shared memory)
        let nv = DecodeTile::for_target(32, true, &v3());
        assert_eq!(nv.shared_bytes(&v3()), 74752 + 2 * 37376 + 36864 + 5120 + 256 + 512);
        assert!(nv.shared_bytes(&v3()) + 1024 <= 227 * 1024);
        // CDNA: 32 heads and 16 keys fit the 64 KB of LDS
        let amd = DecodeTile::for_target(64, false, &v3());
        assert_eq!((amd.heads, amd.keys, amd.async_stage), (32, 16, false));
        assert!(amd.shared_bytes(&v3()) <= 64 * 1024, "{}", amd.shared_bytes(&v3()));
        // odd dims: the contraction padded to 64 (40 + 6 → 64); no 16-byte copies of 46-wide entries
        let odd = MlaDims { num_heads: 3, qk_nope: 20, qk_rope: 6, v_head: 24, kv_lora_rank: 40, scale: 0.3 };
        let t = DecodeTile::for_target(32, true, &odd);
        assert!(!t.async_stage);
        assert_eq!(t.shared_bytes(&odd), 64 * 72 * 2 + 32 * 72 * 2 + 4 * 64 * 36 * 4 + 64 * 40 * 2 + 64 * 12);
    }

    #[test]
    fn rows_kernel_layout_and_splits() {
        // V3's rank of 8: 16 heads; rows of 576 + 8 bf16: the queries, two 64-key tiles, four key
        // groups' (max, sum) and two transaction barriers, within the 227 KB of a block
        // (and, with split scores, 8 warps' 16 × 16 f32 partial scores: 576 columns, 36 steps)
        let scores = if ROWS_SPLIT_SCORES { 8 * 16 * 16 * 4 } else { 0 };
        let tp8 = MlaDims { num_heads: 16, ..v3() };
        assert_eq!(rows_shared_bytes(&tp8), 16 * 584 * 2 + 2 * 64 * 584 * 2 + 4 * 16 * 8 + 16 * 4 + scores + 16);
        assert!(rows_shared_bytes(&tp8) + 1024 <= 227 * 1024);
        // value columns wider than the padded contraction (40 latents + 8 rope: 48 → 64 + 8)
        let narrow = MlaDims { num_heads: 3, qk_nope: 20, qk_rope: 8, v_head: 24, kv_lora_rank: 40, scale: 0.3 };
        // (whole scores: 48 columns are three steps)
        assert_eq!(rows_shared_bytes(&narrow), 16 * 72 * 2 + 2 * 64 * 72 * 2 + 4 * 16 * 8 + 16 * 4 + 16);
        // the host's switch is the kernel's
        let src = include_str!("../../../hip-kernels/mla_decode_rows.hip");
        assert!(src.contains(&format!("#define MR_QKS {}", ROWS_SPLIT_SCORES as u8)));
        // batch 1: 128 splits (128 keys each at 16K, one block a split on 128 of the 132 SMs); a
        // graph step the same
        assert_eq!(rows_splits(1, 132, 16384, false), 128);
        assert_eq!(rows_splits(1, 132, 16384, true), 128);
        // batch 32 at 4K: 4 splits, 128 blocks in one wave (5 would spill into a second)
        assert_eq!(rows_splits(32, 132, 4096, false), 4);
        assert_eq!(rows_splits(32, 132, 4096, true), 4);
        // batch 128: one wave already; batch 200: one split (two waves whatever the count)
        assert_eq!(rows_splits(128, 132, 4096, false), 1);
        assert_eq!(rows_splits(200, 132, 4096, true), 1);
        // short contexts: no more splits than 64-key tiles
        assert_eq!(rows_splits(1, 132, 100, false), 2);
        assert_eq!(rows_splits(1, 132, 1, false), 1);
    }

    #[test]
    fn merge_takes_split_groups_when_blocks_are_few() {
        // batch 1, 16 heads, 128 splits: 8 chunks of 64 latents × 8 groups of 16 splits
        assert_eq!(merge_shape(16, 512, 128, 132, 32), (256, 8, 8));
        // 40 splits: 3 groups; 4 splits: one warp (the old batch-1 shape)
        assert_eq!(merge_shape(16, 512, 40, 132, 32), (96, 8, 3));
        assert_eq!(merge_shape(16, 512, 4, 132, 32), (32, 8, 1));
        // CDNA's 64-wide waves: 4 chunks of 128 latents
        assert_eq!(merge_shape(16, 512, 128, 304, 64), (512, 4, 8));
        // enough rows for the SMs (batch 32 × 16 heads × 2 chunks): 128 threads, no groups
        assert_eq!(merge_shape(512, 512, 4, 132, 32), (128, 2, 1));
        // the host's bounds are mla.hip's (the kernel traps on a launch past them)
        let src = include_str!("../../../hip-kernels/mla.hip");
        for (name, v) in [("MERGE_MAX_SPLITS", MERGE_MAX_SPLITS), ("MERGE_ZW", MERGE_ZW)] {
            assert!(src.contains(&format!("#define {name} {v}\n")), "{name} {v}");
        }
    }

    #[test]
    fn splits_fill_the_gpu_but_keep_enough_keys() {
        // batch 1, 128 heads: 2 head groups; a 16K context takes 64 splits of 256 keys
        assert_eq!(mma_splits(2, 132, 16384, false), 64);
        // ... a 512-token one 8 (64 keys each); a graph step the SM-filling count either way
        assert_eq!(mma_splits(2, 132, 512, false), 8);
        assert_eq!(mma_splits(2, 132, 512, true), 64);
        // batch 128: 256 blocks already fill 132 SMs
        assert_eq!(mma_splits(256, 132, 512, false), 1);
        assert_eq!(mma_splits(256, 132, 512, true), 1);
        assert_eq!(mma_splits(40, 132, 100_000, false), 4);
        assert_eq!(mma_splits(2, 132, 1, false), 1);
    }
}
