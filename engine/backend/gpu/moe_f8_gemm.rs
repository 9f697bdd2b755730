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

/// A launch form of the kernel: its name, the weights a stage (the kernel's NW), 128-row blocks a
/// tile (RB), and its slot in `GpuBackend::moe_gemm_clusters`.
#[derive(Clone, Copy)]
struct Form {
    name: &'static str,
    nw: usize,
    rb: usize,
    slot: usize,
}
const ONE: Form = Form { name: "moe_gemm_f8", nw: 1, rb: 1, slot: 0 };
const GLU: Form = Form { name: "moe_gemm_f8_glu", nw: 2, rb: 1, slot: 1 };
const ROWS256: Form = Form { name: "moe_gemm_f8_r2", nw: 1, rb: 2, slot: 2 };

/// MG_SMEM (MG_SMEM2 where a consumer makes two MMAs a K block): per stage `rb` × 128 activation
/// and `nw` × 128 weight rows of MG_BK bytes and their scales, rounded up to 1024 bytes (the
/// swizzled tiles' alignment), and 1024 bytes to align the first stage.
fn mg_shared_bytes(f: Form) -> usize {
    let stages = if f.nw * f.rb == 1 { MG_ST } else { MG_ST2 };
    stages * ((f.rb * MG_BM + f.nw * MG_BN) * MG_BK + f.rb * MG_BM * 4).next_multiple_of(1024) + 1024
}

/// Whether the device has Hopper's warpgroup MMA (the kernel is compiled for sm_90a only).
fn wgmma(arch: &str) -> bool {
    arch == "sm_90a"
}

/// The kernel's unit kinds (MG_PAIR_W, MG_PAIR_A, MG_SOLO) and ints a unit (MG_UNIT).
const PAIR_W: usize = 0;
const PAIR_A: usize = 1;
const SOLO: usize = 2;
const UNIT: usize = 16;

/// The kernel's work for clusters of `cluster` blocks: each segment in `rows`-row tiles of 5 ints
/// (expert, first row, rows, segment's first row, segment's rows), as units of MG_UNIT ints
/// (kind, tile t0, tile t1 or zeros, zeros) in segment order. Clusters of two: with `pair_w`, an
/// expert's tiles in pairs that share its weights (MG_PAIR_W); a tile left over (every tile
/// without `pair_w`) pairs with the next one left over, of any expert, the two sharing their rows
/// between column pairs (MG_PAIR_A; the last alone). Blocks alone: a unit a tile (MG_SOLO).
pub(super) fn gemm_units(l: &MoeLayout, cluster: usize, pair_w: bool, rows: usize) -> Vec<i32> {
    let mut units = Vec::new();
    let mut push = |kind: usize, t0: [usize; 5], t1: Option<[usize; 5]>| {
        let mut u = [0i32; UNIT];
        u[0] = kind as i32;
        for (d, v) in u[1..11].iter_mut().zip(t0.into_iter().chain(t1.unwrap_or_default())) {
            *d = v as i32;
        }
        units.extend(u);
    };
    let mut left: Option<[usize; 5]> = None;
    for &(ex, off, len) in &l.segments {
        let tiles: Vec<[usize; 5]> = (0..len).step_by(rows).map(|r0| [ex, off + r0, (len - r0).min(rows), off, len]).collect();
        for pair in tiles.chunks(if cluster == 2 && pair_w { 2 } else { 1 }) {
            match (pair, left.take()) {
                ([t], _) if cluster == 1 => push(SOLO, *t, None),
                ([t0, t1], l) => {
                    push(PAIR_W, *t0, Some(*t1));
                    left = l;
                }
                ([t], Some(l)) => push(PAIR_A, l, Some(*t)),
                ([t], None) => left = Some(*t),
                _ => unreachable!("chunks of one or two"),
            }
        }
    }
    if let Some(t) = left {
        push(PAIR_A, t, None);
    }
    units
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
            && [ONE, GLU, ROWS256].iter().all(|&f| mg_shared_bytes(f) <= self.dev.max_shared_per_block())
    }

    /// d [rows, n] f32 = the layout's segments of `a` (e4m3 [rows, k], per-segment scales `sx`)
    /// times their experts' `w` ([experts, n, k] e4m3, scales `ws` [experts, n / 128, k / 128])ᵀ.
    /// The kernel copies `a` and `w` by tensor maps (uploaded with the call: `a` is a scratch
    /// buffer). In 128-row tiles, or 256-row ones where tuned `moe_f8_gemm_rows256` (the same D).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn moe_f8_gemm(&self, (a, sx): (&DevBuf<u8>, &DevBuf<f32>), (w, ws): (&DevBuf<u8>, &DevBuf<f32>), l: &MoeLayout, d: &mut DevBuf<f32>, n: usize, k: usize) -> Result<(), BackendError> {
        let form = if self.tuned.moe_f8_gemm_rows256 { ROWS256 } else { ONE };
        let f = self.func(GEMM, form.name)?;
        let (cfg, cluster, maps, units, count) = self.mg_launch(&f, form, (a, &[w]), l, n, k)?;
        let (nu, ni, ki, cl) = (count as i32, n as i32, k as i32, cluster as i32);
        self.launch(&f).arg(&maps).arg(sx).arg(ws).arg(&units).arg(&nu).arg(d).arg(&ni).arg(&ki).arg(&cl).run_cluster(cfg, cluster as u32).map_err(err(form.name))
    }

    /// The gate and up projections of the same segments at once, ending as the activation
    /// quantiser of SiLU(gate) · up: its e4m3 codes [rows, n] and scales, each segment's
    /// [n / 128, len] block from index first · n / 128 (what `quant_fp8_silu_rows` writes).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn moe_f8_gemm_glu(&self, (a, sx): (&DevBuf<u8>, &DevBuf<f32>), (gate, gs): (&DevBuf<u8>, &DevBuf<f32>), (up, us): (&DevBuf<u8>, &DevBuf<f32>), l: &MoeLayout, n: usize, k: usize) -> Result<(DevBuf<u8>, DevBuf<f32>), BackendError> {
        let f = self.func(GEMM, GLU.name)?;
        let (cfg, cluster, maps, units, count) = self.mg_launch(&f, GLU, (a, &[gate, up]), l, n, k)?;
        let rows = l.rows();
        let (mut q, mut s) = (self.scratch::<u8>(rows * n)?, self.scratch::<f32>(rows * (n / MG_BN))?);
        let (nu, ni, ki, cl) = (count as i32, n as i32, k as i32, cluster as i32);
        self.launch(&f).arg(&maps).arg(sx).arg(gs).arg(us).arg(&units).arg(&nu).arg(&mut q).arg(&mut s).arg(&ni).arg(&ki).arg(&cl).run_cluster(cfg, cluster as u32).map_err(err(GLU.name))?;
        Ok((q, s))
    }

    /// The launch of form `form`: its config, its cluster size, the tensor maps of `a`
    /// and the weights, and its work units (uploaded) and their count. Clusters of two where the
    /// columns pair up and the device holds enough of them at once (persistent blocks: a cluster
    /// left for a second wave would double the launch's time); where the runtime cannot say,
    /// blocks alone. Asked once a kernel: its block and shared memory are fixed.
    #[allow(clippy::type_complexity)]
    fn mg_launch(&self, f: &Kernel, form: Form, (a, ws): (&DevBuf<u8>, &[&DevBuf<u8>]), l: &MoeLayout, n: usize, k: usize) -> Result<(LaunchConfig, usize, DevBuf<u8>, DevBuf<i32>, usize), BackendError> {
        let cfg = |blocks: usize| LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (MG_THREADS, 1, 1), shared_mem_bytes: mg_shared_bytes(form) as u32 };
        let clusters = if self.tuned.moe_f8_gemm_cluster && (n / MG_BN).is_multiple_of(2) {
            *self.moe_gemm_clusters[form.slot].get_or_init(|| self.dev.max_active_clusters(f.0, cfg(self.sms), 2).unwrap_or(0))
        } else {
            0
        };
        let cluster = if clusters > 0 && clusters >= self.sms / 4 { 2 } else { 1 };
        let units = gemm_units(l, cluster, form.nw == 2 && self.tuned.moe_f8_gemm_glu_pair_tiles, form.rb * MG_BM);
        let (count, items) = (units.len() / UNIT, units.len() / UNIT * (n / MG_BN)); // items: a cluster's (or a block's)
        let blocks = if cluster == 2 { 2 * clusters.min(items) } else { items.min(self.sms.max(1)) }; // persistent: a block (cluster) an SM (pair) walks the items
        let mut mats = vec![(a.ptr(), k, a.len() / k, 64)];
        mats.extend(ws.iter().map(|w| (w.ptr(), k, w.len() / k, 64)).chain(ws.iter().map(|w| (w.ptr(), k, w.len() / k, MG_BN))));
        Ok((cfg(blocks), cluster, self.upload_tensor_maps("moe_gemm_f8", &mats)?, self.htod(&units)?, count))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[test]
    fn segments_become_units_and_the_layout_mirrors_the_kernel() {
        // unit u's kind and its two tiles (5 ints each)
        let unit = |v: &[i32], u: usize| (v[UNIT * u], v[UNIT * u + 1..UNIT * u + 6].to_vec(), v[UNIT * u + 6..UNIT * u + 11].to_vec());
        // 3 tokens, top-2 over 4 experts: segments of 8 rows, a tile each; in clusters, tiles
        // of experts 1 and 2 share their rows' column pairs, expert 3's alone
        let l = MoeLayout::build(&[1, 2, 1, 3, 2, 1], 2, 0, 4);
        let u = gemm_units(&l, 2, true, MG_BM);
        assert_eq!(u.len(), 2 * UNIT);
        assert_eq!(unit(&u, 0), (PAIR_A as i32, vec![1, 0, 8, 0, 8], vec![2, 8, 8, 8, 8]));
        assert_eq!(unit(&u, 1), (PAIR_A as i32, vec![3, 16, 8, 16, 8], vec![0; 5]));
        assert!(u.chunks(UNIT).all(|c| c[11..].iter().all(|&v| v == 0)));
        // blocks alone: a unit a tile
        let u = gemm_units(&l, 1, true, MG_BM);
        assert_eq!(u.len(), 3 * UNIT);
        assert_eq!(unit(&u, 2), (SOLO as i32, vec![3, 16, 8, 16, 8], vec![0; 5]));
        // 300 tokens over experts 0 and 5: segments of 152 rows (150 padded), tiles of 128 and
        // 24; then 700 over experts 2 and 4: 352 rows, tiles of 128, 128 and 96
        let ids: Vec<i32> = (0..300).map(|i| if i % 2 == 0 { 0 } else { 5 }).chain((0..700).map(|i| if i % 2 == 0 { 2 } else { 4 })).collect();
        let l = MoeLayout::build(&ids, 1, 0, 6);
        let u = gemm_units(&l, 2, true, MG_BM);
        let kinds: Vec<i32> = u.chunks(UNIT).map(|c| c[0]).collect();
        assert_eq!(kinds, [PAIR_W, PAIR_W, PAIR_W, PAIR_A, PAIR_W].map(|k| k as i32));
        assert_eq!(unit(&u, 0), (PAIR_W as i32, vec![0, 0, 128, 0, 152], vec![0, 128, 24, 0, 152]));
        assert_eq!(unit(&u, 1), (PAIR_W as i32, vec![2, 152, 128, 152, 352], vec![2, 280, 128, 152, 352]));
        // expert 2's third tile waits for the next one left over: expert 4's third
        assert_eq!(unit(&u, 3), (PAIR_A as i32, vec![2, 408, 96, 152, 352], vec![4, 760, 96, 504, 352]));
        assert_eq!(unit(&u, 4), (PAIR_W as i32, vec![5, 856, 128, 856, 152], vec![5, 984, 24, 856, 152]));
        // without weight pairs: every tile pairs with the next, column pair by column pair
        let u = gemm_units(&l, 2, false, MG_BM);
        assert_eq!(u.len(), 5 * UNIT);
        assert!(u.chunks(UNIT).all(|c| c[0] == PAIR_A as i32));
        assert_eq!(unit(&u, 0), (PAIR_A as i32, vec![0, 0, 128, 0, 152], vec![0, 128, 24, 0, 152]));
        assert_eq!(unit(&u, 2), (PAIR_A as i32, vec![2, 408, 96, 152, 352], vec![4, 504, 128, 504, 352]));
        // 256-row tiles (moe_gemm_f8_r2): experts 0 and 5 a tile each, 2 and 4 two (256 + 96)
        let u = gemm_units(&l, 2, false, 2 * MG_BM);
        assert_eq!(u.len(), 3 * UNIT);
        assert_eq!(unit(&u, 0), (PAIR_A as i32, vec![0, 0, 152, 0, 152], vec![2, 152, 256, 152, 352]));
        assert_eq!(unit(&u, 2), (PAIR_A as i32, vec![4, 760, 96, 504, 352], vec![5, 856, 152, 856, 152]));
        // every tile once, whatever the pairing
        for (cluster, pair_w, rows) in [(1, true, MG_BM), (2, true, MG_BM), (2, false, MG_BM), (2, false, 2 * MG_BM)] {
            let mut tiles: Vec<Vec<i32>> = gemm_units(&l, cluster, pair_w, rows).chunks(UNIT).flat_map(|c| [c[1..6].to_vec(), c[6..11].to_vec()]).filter(|t| t[2] > 0).collect();
            tiles.sort();
            assert_eq!(tiles.len(), if rows == MG_BM { 2 * 2 + 2 * 3 } else { 2 + 2 * 2 });
            assert_eq!(tiles.iter().map(|t| t[2]).sum::<i32>(), l.rows() as i32);
        }
        assert_eq!(mg_shared_bytes(ONE), 6 * 33 * 1024 + 1024);
        assert_eq!(mg_shared_bytes(GLU), 4 * 49 * 1024 + 1024);
        assert_eq!(mg_shared_bytes(ROWS256), 4 * 49 * 1024 + 1024);
        assert!(wgmma("sm_90a") && !wgmma("sm_90") && !wgmma("sm_89") && !wgmma("gfx942"));
        let src = include_str!("../../../hip-kernels/moe_f8_gemm.hip");
        for (name, v) in [("MG_BM", MG_BM), ("MG_BN", MG_BN), ("MG_BK", MG_BK), ("MG_ST", MG_ST), ("MG_ST2", MG_ST2), ("MG_THREADS", MG_THREADS as usize), ("MG_UNIT", UNIT), ("MG_PAIR_W", PAIR_W), ("MG_PAIR_A", PAIR_A), ("MG_SOLO", SOLO)] {
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
