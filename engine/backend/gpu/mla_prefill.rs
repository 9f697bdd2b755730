//! MLA prefill in the MHA form on the matrix units (hip-kernels/mla_prefill.hip): the context's
//! latents are decompressed once by kv_b (a tensor-core GEMM) and causal flash attention runs per
//! (64-query tile, head), so long prompts cost GEMM FLOPs instead of the absorbed form's per-token,
//! per-head walk over the latent cache.
use super::backend::{GpuBackend, GpuTensor, GpuVendor};
use super::device::{err, DevBuf, LaunchConfig};
use super::ops::{GpuKvCache, GpuLinear};
use crate::backend::gpu::ModelDims;
use crate::backend::{AttnSeq, BackendError, MlaDims};

/// Largest decompressed K/V buffer (bytes) one call builds (its per-head bf16 hi/lo copies add
/// 1.25× that while both exist); longer contexts stay on the absorbed form, which reads the latent
/// cache directly.
const MAX_KVD_BYTES: usize = 4 << 30;

/// Queries a block of mla_prefill.hip's flash kernel (FB_Q) and of mla_flash_bf16.hip's (FA_Q).
const TILE_Q: usize = 64;
const FA2_Q: usize = 128;

/// Keys a block of mla_prefill_kv (FB_K, also the flash kernel's staged tile) and of
/// mla_flash_bf16.hip's tile (FA_K): each sequence's context starts on a multiple of the larger
/// in the flattened context, so a tile's keys are whole 16-byte runs of the transposed values and
/// the flattened context is a whole number of either kernel's tiles.
const KV_TILE: usize = 32;
/// Keys a block of mla_prefill_kv_bf16 (KV8_K).
const KV8_TILE: usize = 64;
const FA2_K: usize = 64;
const CTX_ALIGN: usize = FA2_K;

/// mla_flash_bf16.hip: 8 warps, and its shared memory (FaShared: two key tiles of FA_K rows of
/// QK + 8 bf16 and two transposed value tiles of VDIM rows of FA_K + 8).
const FA2_THREADS: u32 = 256;
fn fa2_shared_bytes(d: &MlaDims) -> usize {
    2 * (FA2_K * (d.qk_head() + 8) + d.v_head * (FA2_K + 8)) * 2
}

/// mla_flash_wg.hip: a producer and two consumer warpgroups, 64-key stages (FW_K, one
/// 128-byte swizzle row of transposed values), FW_ST of them; its shared memory FW_SMEM: the
/// stages' keys and transposed values, + 1024 to align them.
const FW_THREADS: u32 = 384;
const FW_K: usize = 64;
const FW_ST: usize = 4;
fn fw_shared_bytes(d: &MlaDims) -> usize {
    FW_ST * (FW_K * d.qk_head() * 2 + d.v_head * FW_K * 2) + 1024
}

/// Where the flash attention writes its output rows (`GpuBackend::mla_flash`).
pub(super) enum FlashOut<'a> {
    F32(&'a mut DevBuf<f32>),
    /// o_proj's FP8 input: codes and scales
    Codes(&'a mut DevBuf<u8>, &'a mut DevBuf<f32>),
}

/// The kernel's tile list: per `tile_q` queries of a sequence, [first query row, queries, first
/// context row in the flattened context, position of the first query in its sequence]; and that
/// context, each sequence's part padded with its first slot (finite keys that the causal mask
/// hides) to a multiple of CTX_ALIGN.
fn flash_tiles(seqs: &[&AttnSeq], tile_q: usize) -> (Vec<i32>, Vec<u32>) {
    let (mut tiles, mut flat) = (Vec::new(), Vec::new());
    for s in seqs {
        let ctx0 = flat.len();
        let pad = s.slots.len().next_multiple_of(CTX_ALIGN) - s.slots.len();
        flat.extend_from_slice(s.slots);
        flat.extend(std::iter::repeat_n(s.slots[0], pad));
        let prefix = s.slots.len() - s.q_len;
        for i0 in (0..s.q_len).step_by(tile_q) {
            tiles.extend([(s.q_start + i0) as i32, (s.q_len - i0).min(tile_q) as i32, ctx0 as i32, (prefix + i0) as i32]);
        }
    }
    (tiles, flat)
}

impl<V: GpuVendor> GpuBackend<V> {
    /// Whether `s` runs on the flash kernel: matrix units (mma.sync or MFMA), a long enough prompt
    /// (tuned: 64 new tokens on H200, a 64-query tile), head sizes the fragments tile (QK % 16,
    /// V % 8, V % 16 for MFMA), and a decompressed context that fits the budget.
    pub(super) fn flash_prefill_for(&self, s: &AttnSeq, d: &MlaDims) -> bool {
        let kvd_bytes = s.slots.len() * d.num_heads * (d.qk_nope + d.v_head) * 4;
        // the MFMA product (64-wide wavefronts) takes values in 16-column fragments
        let v_frag = if self.warp == 64 && !self.flash_portable { 16 } else { 8 };
        self.flash_prefill && s.q_len >= self.tuned.flash_min_q && d.qk_head().is_multiple_of(16) && d.v_head.is_multiple_of(v_frag) && kvd_bytes <= MAX_KVD_BYTES
    }

    /// Whether the flash prefill runs mla_flash_bf16.hip (FlashAttention-2's form: 128 queries a
    /// block, everything in registers): bf16 operands on NVIDIA's matrix units (sm_80+), value
    /// heads of whole 16-column fragments, its shared memory within the device's.
    pub(super) fn fa2_prefill(&self, d: &MlaDims) -> bool {
        self.attn_bf16 && self.warp == 32 && self.matrix_units && !self.flash_portable && d.v_head.is_multiple_of(16) && fa2_shared_bytes(d) <= self.dev.max_shared_per_block()
    }

    /// Whether that flash prefill takes mla_flash_wg.hip instead (FlashAttention-3's form, same
    /// tiles, reading kv_b's bf16 product in place): tuned on, sm_90a (the warpgroup MMA and
    /// tensor maps), whole 64-column chunks of k_nope and of the rotated part, and 128-column
    /// value heads (V2 / V3: 128 + 64 / 128).
    pub(super) fn fa3_prefill(&self, d: &MlaDims) -> bool {
        self.tuned.flash_wgmma && self.arch == "sm_90a" && self.fa2_prefill(d) && d.qk_nope.is_multiple_of(64) && d.qk_rope.is_multiple_of(64) && d.v_head == 128 && fw_shared_bytes(d) <= self.dev.max_shared_per_block()
    }

    /// Writes the attention output rows of `seqs` into `out`: f32 [T, heads·v_head], or (on
    /// `fa3_prefill`'s kernel only) o_proj's FP8 codes [T, heads·v_head] and scales [heads, T]
    /// as `quantize_act_fp8` would make them of the f32 rows.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn mla_flash(&self, q: &GpuTensor, kv: &GpuKvCache, layer: usize, seqs: &[&AttnSeq], kv_b: &GpuLinear, d: &MlaDims, out: FlashOut) -> Result<(), BackendError> {
        let dims = ModelDims::of_mla(d);
        let fa2 = self.fa2_prefill(d);
        let (tiles, flat) = flash_tiles(seqs, if fa2 { FA2_Q } else { TILE_Q });
        let n = flat.len();
        let slots = self.idx(&flat)?;
        let mut c = self.alloc_out(n * d.kv_lora_rank)?;
        let mut pe = self.alloc_out(n * d.qk_rope)?;
        let f = self.mla_prefill_func(dims, if kv.bf16 { "mla_gather_ctx_bf16c" } else { "mla_gather_ctx" })?;
        let (l, ns) = (layer as i32, kv.slots as i32);
        let gather = |c: &mut DevBuf<f32>, pe: &mut DevBuf<f32>| {
            let mut b = self.launch(&f);
            b.arg(&kv.buf).arg(&slots.0).arg(&l).arg(&ns).arg(c).arg(pe);
            b.run(super::ops::cfg((n as u32, 1), 128, 0)).map_err(err("mla_gather_ctx"))
        };
        let d_tiles = self.htod(&tiles)?;
        let (heads, scale, ctx) = (d.num_heads as i32, d.scale, n as i32);
        if self.fa3_prefill(d) {
            // kv_b's product as bf16 [ctx, heads·(nope + v)] and the rotated key parts as bf16
            // [ctx, rope], which the kernel's tensor maps read in place
            let (kvd, pe16) = self.span(super::ops::ATTN_PROJ, || {
                gather(&mut c, &mut pe)?;
                let kvd = self.linear_bf16_out(&GpuTensor { rows: n, cols: d.kv_lora_rank, buf: c }, kv_b)?;
                let mut pe16 = self.scratch::<u16>(n * d.qk_rope)?;
                self.to_bf16(&pe, &mut pe16, n * d.qk_rope)?;
                Ok((kvd, pe16))
            })?;
            return self.span("attention", || {
                let maps = self.upload_tensor_maps("mla_flash_wg", &[(kvd.ptr(), 2 * d.num_heads * (d.qk_nope + d.v_head), n, FW_K), (pe16.ptr(), 2 * d.qk_rope, n, FW_K)])?;
                let f = self.mla_flash_wg_func(dims)?;
                let mut b = self.launch(&f);
                let rows = q.rows as i32;
                match out {
                    FlashOut::F32(y) => b.arg(&maps).arg(&q.buf).arg(&d_tiles).arg(y).arg(&heads).arg(&scale).arg(&0u64).arg(&0u64).arg(&rows),
                    FlashOut::Codes(c, s) => b.arg(&maps).arg(&q.buf).arg(&d_tiles).arg(&0u64).arg(&heads).arg(&scale).arg(c).arg(s).arg(&rows),
                };
                let launch = LaunchConfig { grid_dim: ((tiles.len() / 4) as u32, d.num_heads as u32, 1), block_dim: (FW_THREADS, 1, 1), shared_mem_bytes: fw_shared_bytes(d) as u32 };
                b.run(launch).map_err(err("mla_flash_wg"))
            });
        }
        let FlashOut::F32(out) = out else {
            return Err(self.op_err("mla_flash", "FP8 codes out of the flash attention need its warpgroup kernel (sm_90a)".into()));
        };
        // [ctx, heads·(nope + v)]: every context token's k_nope and v for every head, once
        let kvd = self.span(super::ops::ATTN_PROJ, || {
            gather(&mut c, &mut pe)?;
            self.linear_with(&GpuTensor { rows: n, cols: d.kv_lora_rank, buf: c }, kv_b, true)
        })?;
        self.span("attention", || {
            // per head, bf16 hi + lo (hi alone with attn_bf16): keys [n][nope + rope] and values
            // transposed [v][n]
            let parts = if self.attn_bf16 { 1 } else { 2 };
            let mut k = self.scratch::<u16>(parts * d.num_heads * n * d.qk_head())?;
            let mut vt = self.scratch::<u16>(parts * d.num_heads * d.v_head * n)?;
            // bf16 alone in 16-byte pieces where the head sizes allow (64-key tiles: the context
            // is padded to CTX_ALIGN)
            let (name, tile) = if parts == 1 && [d.qk_nope, d.qk_rope, d.v_head].iter().all(|x| x.is_multiple_of(8)) { ("mla_prefill_kv_bf16", KV8_TILE) } else { ("mla_prefill_kv", KV_TILE) };
            let f = self.mla_prefill_func(dims, name)?;
            let mut b = self.launch(&f);
            b.arg(&kvd.buf).arg(&pe).arg(&mut k).arg(&mut vt).arg(&ctx).arg(&heads);
            b.run(LaunchConfig { grid_dim: ((n / tile) as u32, d.num_heads as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }).map_err(err(name))?;
            drop(kvd);
            let (f, name, threads, smem) = if fa2 {
                (self.mla_flash_bf16_func(dims)?, "mla_flash_bf16", FA2_THREADS, fa2_shared_bytes(d) as u32)
            } else {
                (self.mla_prefill_func(dims, "mla_flash_prefill")?, "mla_flash_prefill", 128, 0)
            };
            let mut b = self.launch(&f);
            b.arg(&q.buf).arg(&k).arg(&vt).arg(&d_tiles).arg(out).arg(&ctx).arg(&heads).arg(&scale);
            let launch = LaunchConfig { grid_dim: ((tiles.len() / 4) as u32, d.num_heads as u32, 1), block_dim: (threads, 1, 1), shared_mem_bytes: smem };
            b.run(launch).map_err(err(name))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_every_query_once_with_its_causal_position() {
        let a: Vec<u32> = (100..300).collect(); // 200 context, the last 150 new (prefix 50)
        let b: Vec<u32> = (0..64).collect(); // a fresh 64-token prompt
        let s = [AttnSeq { q_start: 0, q_len: 150, slots: &a }, AttnSeq { q_start: 150, q_len: 64, slots: &b }];
        let (tiles, flat) = flash_tiles(&[&s[0], &s[1]], TILE_Q);
        // a's context padded from 200 to 256 with its first slot; b's starts at 256
        assert_eq!(flat.len(), 320);
        assert_eq!(&flat[198..200], &[298, 299]);
        assert!(flat[200..256].iter().all(|&s| s == 100));
        assert_eq!(&flat[256..], &b[..]);
        assert_eq!(tiles, vec![0, 64, 0, 50, 64, 64, 0, 114, 128, 22, 0, 178, 150, 64, 256, 0]);
        // 128-query tiles over the same context
        let (tiles, flat2) = flash_tiles(&[&s[0], &s[1]], FA2_Q);
        assert_eq!(flat2, flat);
        assert_eq!(tiles, vec![0, 128, 0, 50, 128, 22, 0, 178, 150, 64, 256, 0]);
    }

    #[test]
    fn fa2_layout_mirrors_the_kernel() {
        // the kernel's FaShared for V3 (QK 192, VDIM 128): 2 × (64 × 200 + 128 × 72) bf16
        let d = MlaDims { num_heads: 128, qk_nope: 128, qk_rope: 64, v_head: 128, kv_lora_rank: 512, scale: 0.1 };
        assert_eq!(fa2_shared_bytes(&d), 88_064);
        assert!(CTX_ALIGN.is_multiple_of(KV_TILE) && CTX_ALIGN.is_multiple_of(KV8_TILE) && CTX_ALIGN.is_multiple_of(FA2_K) && CTX_ALIGN.is_multiple_of(32));
        assert!(include_str!("../../../hip-kernels/mla_prefill.hip").contains(&format!("#define KV8_K {KV8_TILE}\n")));
        let src = include_str!("../../../hip-kernels/mla_flash_bf16.hip");
        for (name, v) in [("FA_Q", FA2_Q), ("FA_K", FA2_K)] {
            assert!(src.contains(&format!("#define {name} {v} ")), "{name} {v}");
        }
        assert!(src.contains("#define FA_THREADS (32 * FA_WARPS)") && src.contains("#define FA_WARPS (FA_Q / 16)") && FA2_THREADS as usize == 32 * FA2_Q / 16);
    }

    #[test]
    fn fa3_layout_mirrors_the_kernel() {
        // FW_SMEM for V3: 4 stages × (64 × 192 + 128 × 64) bf16 + 1024, within an H200's 227 KB
        let d = MlaDims { num_heads: 128, qk_nope: 128, qk_rope: 64, v_head: 128, kv_lora_rank: 512, scale: 0.1 };
        assert_eq!(fw_shared_bytes(&d), 164_864);
        assert!(fw_shared_bytes(&d) <= 232_448);
        let src = include_str!("../../../hip-kernels/mla_flash_wg.hip");
        for (name, v) in [("FW_Q", FA2_Q), ("FW_K", FW_K), ("FW_ST", FW_ST), ("FW_THREADS", FW_THREADS as usize)] {
            assert!(src.contains(&format!("#define {name} {v} ")), "{name} {v}");
        }
        assert!(src.contains("#define FW_SMEM (FW_ST * FW_STAGE + 1024)") && src.contains("#define FW_STAGE (FW_KBYTES + FW_VBYTES)"));
        super::super::moe_f8_gemm::tests::check_register_handover(src, FW_THREADS as usize);
        // the context padding keeps every tile's keys inside its sequence's part
        assert!(CTX_ALIGN.is_multiple_of(FW_K));
    }
}
