//! The MoE prefill's experts as one grouped FP8 GEMM a projection (hip-kernels/moe_f8_gemm.hip):
//! every expert's row segment of the MoeLayout in ≤ 128-row tiles, one launch for all of them,
//! instead of a GEMM library call per expert (~640 calls a layer at 4,096 tokens, each ~150 rows:
//! too few tiles to fill the GPU, and ~10 µs of host time each).
use super::backend::{GpuBackend, GpuVendor};
use super::device::{err, DevBuf, Kernel, LaunchConfig};
use super::moe_prefill::MoeLayout;
use super::ops::GpuExperts;
use crate::backend::BackendError;

const GEMM: &str = "hip-kernels/moe_f8_gemm.hip";

/// The kernel's tile rows (MG_BM), columns an item (MG_BN), K a stage (MG_BK), stages (MG_ST)
/// and threads (a producer and two consumer warpgroups).
const MG_BM: usize = 128;
const MG_BN: usize = 128;
const MG_BK: usize = 128;
const MG_ST: usize = 6;
const MG_ST2: usize = 4;
const MG_THREADS: u32 = 384;

/// MG_SMEM (MG_SMEM2 with `nw` 2): per stage 128 activation and `nw` × 128 weight rows of MG_BK
/// bytes and 128 scales, rounded up to 1024 bytes (the swizzled tiles' alignment), and 1024 bytes
/// to align the first stage.
fn mg_shared_bytes(nw: usize) -> usize {
    let stages = if nw == 1 { MG_ST } else { MG_ST2 };
    stages * ((MG_BM + nw * MG_BN) * MG_BK + MG_BM * 4).next_multiple_of(1024) + 1024
}

/// Whether the device has Hopper's warpgroup MMA (the kernel is compiled for sm_90a only).
fn wgmma(arch: &str) -> bool {
    arch == "sm_90a"
}

/// 8 ints a tile: (expert, first row, rows, segment's first row, segment's rows, 0, 0, 0), each
/// segment in MG_BM-row tiles.
pub(super) fn gemm_tiles(l: &MoeLayout) -> Vec<i32> {
    let mut t = Vec::new();
    for &(ex, off, len) in &l.segments {
        for r0 in (0..len).step_by(MG_BM) {
            t.extend([ex, off + r0, (len - r0).min(MG_BM), off, len, 0, 0, 0].map(|v| v as i32));
        }
    }
    t
}

impl<V: GpuVendor> GpuBackend<V> {
    /// Whether these experts' prefill GEMMs take the grouped kernel: tuned on, NVIDIA sm_90a (the
    /// warpgroup MMA), FP8 weights in 128 × 128 blocks, both dimensions whole blocks, the shared
    /// memory available.
    pub(super) fn moe_f8_gemm_for(&self, e: &GpuExperts) -> bool {
        self.tuned.moe_f8_gemm
            && self.mma_gemm
            && wgmma(&self.arch)
            && e.wdt == 2
            && (e.bn, e.bk) == (128, 128)
            && e.hidden.is_multiple_of(MG_BN)
            && e.inter.is_multiple_of(MG_BN)
            && mg_shared_bytes(1).max(mg_shared_bytes(2)) <= self.dev.max_shared_per_block()
    }

    /// d [rows, n] f32 = each tile's rows of `a` (e4m3 [rows, k], per-segment scales `sx`) times
    /// its expert's `w` ([experts, n, k] e4m3, scales `ws` [experts, n / 128, k / 128])ᵀ. The
    /// kernel copies `a` and `w` by tensor maps (uploaded with the call: `a` is a scratch buffer).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn moe_f8_gemm(&self, (a, sx): (&DevBuf<u8>, &DevBuf<f32>), (w, ws): (&DevBuf<u8>, &DevBuf<f32>), tiles: &DevBuf<i32>, n_tiles: usize, d: &mut DevBuf<f32>, n: usize, k: usize) -> Result<(), BackendError> {
        let f = self.func(GEMM, "moe_gemm_f8")?;
        let (cfg, cluster, maps) = self.mg_launch(&f, 1, (a, &[w]), n_tiles, n, k)?;
        let (nt, ni, ki, cl) = (n_tiles as i32, n as i32, k as i32, cluster as i32);
        self.launch(&f).arg(&maps).arg(sx).arg(ws).arg(tiles).arg(&nt).arg(d).arg(&ni).arg(&ki).arg(&cl).run_cluster(cfg, cluster as u32).map_err(err("moe_gemm_f8"))
    }

    /// The gate and up projections of the same tiles at once, ending as the activation
    /// quantiser of SiLU(gate) · up: its e4m3 codes [rows, n] and scales, each segment's
    /// [n / 128, len] block from index first · n / 128 (what `quant_fp8_silu_rows` writes).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn moe_f8_gemm_glu(&self, (a, sx): (&DevBuf<u8>, &DevBuf<f32>), (gate, gs): (&DevBuf<u8>, &DevBuf<f32>), (up, us): (&DevBuf<u8>, &DevBuf<f32>), tiles: &DevBuf<i32>, n_tiles: usize, rows: usize, n: usize, k: usize) -> Result<(DevBuf<u8>, DevBuf<f32>), BackendError> {
        let f = self.func(GEMM, "moe_gemm_f8_glu")?;
        let (cfg, cluster, maps) = self.mg_launch(&f, 2, (a, &[gate, up]), n_tiles, n, k)?;
        let (mut q, mut s) = (self.scratch::<u8>(rows * n)?, self.scratch::<f32>(rows * (n / MG_BN))?);
        let (nt, ni, ki, cl) = (n_tiles as i32, n as i32, k as i32, cluster as i32);
        self.launch(&f).arg(&maps).arg(sx).arg(gs).arg(us).arg(tiles).arg(&nt).arg(&mut q).arg(&mut s).arg(&ni).arg(&ki).arg(&cl).run_cluster(cfg, cluster as u32).map_err(err("moe_gemm_f8_glu"))?;
        Ok((q, s))
    }

    /// The launch of `nw` weights a stage: its config, its cluster size and the tensor maps of
    /// `a` and the weights. Clusters of two where the columns pair up and the device holds
    /// enough of them at once (persistent blocks: a cluster left for a second wave would double
    /// the launch's time); where the runtime cannot say, blocks alone. Asked once a kernel: its
    /// block and shared memory are fixed.
    fn mg_launch(&self, f: &Kernel, nw: usize, (a, ws): (&DevBuf<u8>, &[&DevBuf<u8>]), n_tiles: usize, n: usize, k: usize) -> Result<(LaunchConfig, usize, DevBuf<u8>), BackendError> {
        let items = n_tiles * (n / MG_BN);
        let cfg = |blocks: usize| LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (MG_THREADS, 1, 1), shared_mem_bytes: mg_shared_bytes(nw) as u32 };
        let clusters = if self.tuned.moe_f8_gemm_cluster && (n / MG_BN).is_multiple_of(2) {
            *self.moe_gemm_clusters[nw - 1].get_or_init(|| self.dev.max_active_clusters(f.0, cfg(self.sms), 2).unwrap_or(0))
        } else {
            0
        };
        let cluster = if clusters > 0 && clusters >= self.sms / 4 { 2 } else { 1 };
        let blocks = if cluster == 2 { 2 * clusters.min(items / 2) } else { items.min(self.sms.max(1)) }; // persistent: a block an SM walks the items
        let mut mats = vec![(a.ptr(), k, a.len() / k, MG_BM / cluster)];
        mats.extend(ws.iter().map(|w| (w.ptr(), k, w.len() / k, MG_BN)));
        Ok((cfg(blocks), cluster, self.upload_tensor_maps("moe_gemm_f8", &mats)?))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[test]
    fn segments_become_tiles_and_the_layout_mirrors_the_kernel() {
        // 3 tokens, top-2 over 4 experts: segments of 8 rows; a 300-row segment: 3 tiles
        let l = MoeLayout::build(&[1, 2, 1, 3, 2, 1], 2, 0, 4);
        assert_eq!(gemm_tiles(&l), vec![1, 0, 8, 0, 8, 0, 0, 0, 2, 8, 8, 8, 8, 0, 0, 0, 3, 16, 8, 16, 8, 0, 0, 0]);
        let ids: Vec<i32> = (0..300).map(|i| if i % 2 == 0 { 0 } else { 5 }).collect();
        let l = MoeLayout::build(&ids, 1, 0, 6);
        let t = gemm_tiles(&l);
        assert_eq!(t.len(), 8 * 4);
        assert_eq!(&t[..24], &[0, 0, 128, 0, 152, 0, 0, 0, 0, 128, 24, 0, 152, 0, 0, 0, 5, 152, 128, 152, 152, 0, 0, 0]);
        assert_eq!(mg_shared_bytes(1), 6 * 33 * 1024 + 1024);
        assert_eq!(mg_shared_bytes(2), 4 * 49 * 1024 + 1024);
        assert!(wgmma("sm_90a") && !wgmma("sm_90") && !wgmma("sm_89") && !wgmma("gfx942"));
        let src = include_str!("../../../hip-kernels/moe_f8_gemm.hip");
        for (name, v) in [("MG_BM", MG_BM), ("MG_BN", MG_BN), ("MG_BK", MG_BK), ("MG_ST", MG_ST), ("MG_ST2", MG_ST2), ("MG_THREADS", MG_THREADS as usize)] {
            assert!([" ", "\n"].iter().any(|end| src.contains(&format!("#define {name} {v}{end}"))), "{name} {v}");
        }
    }

    /// setmaxnreg moves registers inside the block's pool, which is what the launch allocated:
    /// `threads` × the per-thread count ptxas gives a 1-block-an-SM kernel (64K registers, a
    /// multiple of 8). Asking for more than the pool holds hangs the consumers. Checks the values
    /// in `src` (a producer warpgroup's `dec`, the consumers' `inc`).
    pub(in crate::backend::gpu) fn check_register_handover(src: &str, threads: usize) {
        let regs = |dir: &str| -> usize {
            let pat = format!("setmaxnreg.{dir}.sync.aligned.u32 ");
            let at = src.find(&pat).unwrap_or_else(|| panic!("{pat}")) + pat.len();
            src[at..].split(';').next().unwrap().trim().parse().unwrap()
        };
        let (producer, consumer) = (regs("dec"), regs("inc"));
        let launched = 65536 / threads / 8 * 8;
        assert!(producer % 8 == 0 && consumer % 8 == 0 && producer < launched && consumer > launched);
        assert!(128 * producer + (threads - 128) * consumer <= threads * launched, "{producer} / {consumer}");
    }

    #[test]
    fn the_register_handover_fits_what_the_launch_allocates() {
        assert_eq!(65536 / MG_THREADS as usize / 8 * 8, 168);
        check_register_handover(include_str!("../../../hip-kernels/moe_f8_gemm.hip"), MG_THREADS as usize);
        // the check fails on the pair that hung an H200 (48 / 232)
        let hung = "setmaxnreg.dec.sync.aligned.u32 48;\nsetmaxnreg.inc.sync.aligned.u32 232;";
        assert!(std::panic::catch_unwind(|| check_register_handover(hung, 384)).is_err());
    }
}
