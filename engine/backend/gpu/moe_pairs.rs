//! moe.hip's per-pair expert kernels: up to 7 tokens' (token, expert) pairs, each warp of one wave
//! of blocks taking (pair, row group) items — gate/up with SiLU into `h`, then down times the
//! routing weight added atomically into the output. At one row they also run a MoE layer's shared
//! experts (`mlp_add`): one "pair" of an MLP's own weights added straight into the routed sum, two
//! launches instead of the GEMVs' five (gate, up, SiLU·up, down, add).
use super::backend::{GpuBackend, GpuTensor, GpuVendor};
use super::device::{err, DevBuf};
use super::gemv::{chunk_elems, row_lanes};
use super::ops::{cfg, wdt_suffix, GpuExperts, GpuLinear, GpuRouting};
use super::source::Vendor;
use crate::backend::BackendError;

const MOE: &str = "hip-kernels/moe.hip";
/// The kernels' launch bound (blocks resident per multiprocessor) and the gate/up and down rows a
/// warp's item covers
const MOE_PAIR_BLOCKS_PER_SM: usize = 2;
const MOE_GU_ROWS: usize = 2;
const MOE_DOWN_ROWS: usize = 4;
/// The launch bound of gate/up's second copy on NVIDIA (moe.hip's MOE_GU_WIDE_BLOCKS_PER_SM;
/// CDNA: MOE_PAIR_BLOCKS_PER_SM)
const MOE_GU_WIDE_BLOCKS_PER_SM_NVIDIA: usize = 3;

/// Whether gate/up's `items` take its second copy (`_wide`: more blocks resident, fewer registers
/// a thread): at least two waves' items at the first copy's bound (`wave_warps`), where more warps
/// in flight pay (V3's whole experts) and the register cap does not (a TP8 rank's few items).
fn gate_up_wide(items: usize, wave_warps: usize) -> bool {
    items >= 2 * wave_warps
}

/// One set of stacked expert weights as the kernels read them (experts `e0 .. e0 + ne`).
struct PairWeights<'a> {
    gate: (&'a DevBuf<u8>, &'a DevBuf<f32>),
    up: (&'a DevBuf<u8>, &'a DevBuf<f32>),
    down: (&'a DevBuf<u8>, &'a DevBuf<f32>),
    wdt: u8,
    inter: usize,
    hidden: usize,
    bn: i32,
    bk: i32,
    e0: i32,
    ne: i32,
}

impl<V: GpuVendor> GpuBackend<V> {
    /// `Backend::moe_experts_shared` inside its scope of shared codes: one row on the per-pair
    /// kernels folds the shared experts in as one more pair of the same launches; otherwise the
    /// routed experts, then the shared ones added.
    pub(super) fn moe_experts_shared_once(&self, x: &GpuTensor, r: &GpuRouting, e: &GpuExperts, shared: Option<[&GpuLinear; 3]>) -> Result<GpuTensor, BackendError> {
        if let Some(s) = shared.filter(|_| self.tuned.moe_shared_first && x.rows * r.top_k > 0 && self.moe_prefill_f8_for(x, e) && self.moe_f8_gemm_for(e)) {
            return self.moe_prefill_shared_first(x, r, e, s);
        }
        if let Some(s) = shared.filter(|_| x.rows == 1 && r.top_k > 0 && !self.moe_prefill_f8_for(x, e) && !self.moe_grouped_for(x, e)) {
            let folded = self.span("MoE GEMM", || {
                let (mut out, taken) = self.experts_out(r, x.cols.max(1))?;
                if self.moe_experts_pairs_shared(x, r, e, s, &mut out)? {
                    return Ok(Some(out));
                }
                if taken {
                    r.give_back_zeroed(out); // nothing launched: the experts below take it
                }
                Ok(None)
            })?;
            if let Some(buf) = folded {
                return Ok(GpuTensor { rows: x.rows, cols: x.cols, buf });
            }
        }
        crate::backend::moe_experts_shared_by_ops(self, x, r, e, shared)
    }

    /// The routed experts of `x`'s tokens into `out` (zeroed by the caller).
    pub(super) fn moe_experts_pairs(&self, x: &GpuTensor, r: &GpuRouting, e: &GpuExperts, out: &mut DevBuf<f32>) -> Result<(), BackendError> {
        let w = PairWeights { gate: (&e.gate, &e.gs), up: (&e.up, &e.us), down: (&e.down, &e.ds), wdt: e.wdt, inter: e.inter, hidden: e.hidden, bn: e.bn, bk: e.bk, e0: e.first as i32, ne: e.n as i32 };
        self.pairs(x, Some(r), &w, None, out, false)
    }

    /// `y += down(silu(x·gateᵀ) · (x·upᵀ))` for one row of x and FP8 weights of one block shape
    /// whose rows take the kernels' 16-byte loads; `Ok(false)` where it does not apply.
    pub(super) fn mlp_add_pairs(&self, x: &GpuTensor, gate: &GpuLinear, up: &GpuLinear, down: &GpuLinear, y: &mut GpuTensor) -> Result<bool, BackendError> {
        let Some(w) = mlp_pair_weights(x, [gate, up, down], y.cols) else {
            return Ok(false);
        };
        self.span("MoE GEMM", || self.pairs(x, None, &w, None, &mut y.buf, false))?;
        Ok(true)
    }

    /// `down(silu(x·gateᵀ) · (x·upᵀ))` of one row on the same two launches (a dense layer's MLP at
    /// batch 1: gate and up in one launch, no SiLU·up launch), the output zeroed by gate/up (down
    /// adds into it; no memset node between a step's kernels);
    /// `Ok(None)` where `mlp_add_pairs` would not apply.
    pub(super) fn mlp_pairs(&self, x: &GpuTensor, gate: &GpuLinear, up: &GpuLinear, down: &GpuLinear) -> Result<Option<GpuTensor>, BackendError> {
        let Some(w) = mlp_pair_weights(x, [gate, up, down], down.out) else {
            return Ok(None);
        };
        self.span("dense GEMM", || {
            let mut y = GpuTensor { rows: 1, cols: down.out, buf: self.alloc_out(down.out)? };
            self.pairs(x, None, &w, None, &mut y.buf, true)?;
            Ok(Some(y))
        })
    }

    /// The routed experts and a MoE layer's shared experts (`shared`: gate, up, down) of one row
    /// in the same two launches, the shared MLP one more pair (NVIDIA; moe.hip's
    /// MOE_FOLD_SHARED): `Ok(false)` where it does not apply (more rows, another vendor, shared
    /// weights of another dtype or shape than the experts').
    pub(super) fn moe_experts_pairs_shared(&self, x: &GpuTensor, r: &GpuRouting, e: &GpuExperts, shared: [&GpuLinear; 3], out: &mut DevBuf<f32>) -> Result<bool, BackendError> {
        let Some(s) = mlp_pair_weights(x, shared, x.cols) else {
            return Ok(false);
        };
        if V::SOURCE != Vendor::Nvidia || e.wdt != 2 || (s.inter, s.hidden, s.bn, s.bk) != (e.inter, e.hidden, e.bn, e.bk) {
            return Ok(false);
        }
        let w = PairWeights { gate: (&e.gate, &e.gs), up: (&e.up, &e.us), down: (&e.down, &e.ds), wdt: e.wdt, inter: e.inter, hidden: e.hidden, bn: e.bn, bk: e.bk, e0: e.first as i32, ne: e.n as i32 };
        self.pairs(x, Some(r), &w, Some(&s), out, false)?;
        Ok(true)
    }

    /// The two launches over `x`'s pairs: routed (ids and weights from `r`) or, with no routing,
    /// one pair per row of expert 0 with weight 1; then, with `second` (of `w`'s shapes), one pair
    /// per row of its expert 0 with weight 1. `zero_out`: gate/up zeroes `out` first (else the
    /// caller has).
    fn pairs(&self, x: &GpuTensor, r: Option<&GpuRouting>, w: &PairWeights, second: Option<&PairWeights>, out: &mut DevBuf<f32>, zero_out: bool) -> Result<(), BackendError> {
        let top_k = r.map_or(1, |r| r.top_k);
        let from2 = x.rows * top_k;
        let pairs = from2 + second.map_or(0, |_| x.rows);
        let s = second.unwrap_or(w);
        let mut h = self.alloc_out(pairs * w.inter)?;
        let (k, i, hd, np, f2) = (top_k as i32, w.inter as i32, w.hidden as i32, pairs as i32, from2 as i32);
        let null = 0u64;
        // one wave of blocks (the launch bound), each warp taking (pair, row group) items
        let warp = self.warp as usize;
        let ve = chunk_elems(w.wdt);
        let vec = |k: usize| k.is_multiple_of(ve) && (w.wdt != 2 || (w.bk as usize).is_multiple_of(ve));
        let per_item = |k: usize, rows: usize| if vec(k) { rows * (warp / row_lanes(k, ve, warp)) } else { 1 };
        let wpb = self.warps_per_block();
        let most = self.sms * MOE_PAIR_BLOCKS_PER_SM;
        let grid = |items: usize, most: usize| (items.div_ceil(wpb).min(most) as u32, 1);
        // gate/up items (pair, row group) and the warps that share each (a K part a warp)
        let gu_items = pairs * w.inter.div_ceil(per_item(w.hidden, MOE_GU_ROWS));
        // (moe.hip's MOE_K_SPLIT: NVIDIA only)
        let split = V::SOURCE == Vendor::Nvidia && vec(w.hidden) && row_lanes(w.hidden, ve, warp) == warp;
        let wide = gate_up_wide(gu_items, most * wpb);
        let gu_most = if wide { self.sms * if V::SOURCE == Vendor::Nvidia { MOE_GU_WIDE_BLOCKS_PER_SM_NVIDIA } else { MOE_PAIR_BLOCKS_PER_SM } } else { most };
        let ks = if split { k_split(gu_items, gu_most * wpb, wpb) } else { 1 };
        let ks_arg = ks as i32;
        let f = self.func(MOE, &format!("moe_gate_up{}_{}", if wide { "_wide" } else { "" }, wdt_suffix(w.wdt)))?;
        let mut b = self.launch(&f);
        b.arg(&x.buf);
        match r {
            Some(r) => b.arg(&r.ids),
            None => b.arg(&null),
        };
        b.arg(w.gate.0).arg(w.gate.1).arg(w.up.0).arg(w.up.1).arg(&mut h).arg(&np).arg(&k).arg(&i).arg(&hd).arg(&w.bn).arg(&w.bk).arg(&w.e0).arg(&w.ne).arg(&ks_arg);
        b.arg(s.gate.0).arg(s.gate.1).arg(s.up.0).arg(s.up.1).arg(&f2);
        if zero_out {
            b.arg(&mut *out).arg(&(out.len() as i32));
        } else {
            b.arg(&null).arg(&0i32);
        }
        b.run(cfg(grid(gu_items * ks, gu_most), 256, 0)).map_err(err("moe_gate_up"))?;
        let f = self.func(MOE, &format!("moe_down_{}", wdt_suffix(w.wdt)))?;
        let mut b = self.launch(&f);
        b.arg(&h);
        match r {
            Some(r) => b.arg(&r.ids).arg(&r.weights),
            None => b.arg(&null).arg(&null),
        };
        b.arg(w.down.0).arg(w.down.1).arg(out).arg(&np).arg(&k).arg(&i).arg(&hd).arg(&w.bn).arg(&w.bk).arg(&w.e0).arg(&w.ne);
        b.arg(s.down.0).arg(s.down.1).arg(&f2);
        b.run(cfg(grid(pairs * w.hidden.div_ceil(per_item(w.inter, MOE_DOWN_ROWS)), most), 256, 0)).map_err(err("moe_down"))
    }
}

/// An MLP's FP8 weights (gate, up, down) as one pair's, for one row of `x` into `out_cols`
/// columns: one block shape, rows that take the kernels' 16-byte loads; None otherwise.
fn mlp_pair_weights<'a>(x: &GpuTensor, [gate, up, down]: [&'a GpuLinear; 3], out_cols: usize) -> Option<PairWeights<'a>> {
    let same_blocks = [up, down].iter().all(|l| (l.bn, l.bk) == (gate.bn, gate.bk));
    let shapes = up.out == gate.out && up.inp == gate.inp && down.out == gate.inp && down.inp == gate.out && out_cols == gate.inp;
    let vec = gate.inp.is_multiple_of(16) && gate.out.is_multiple_of(16) && gate.bk % 16 == 0;
    if x.rows != 1 || [gate, up, down].iter().any(|l| l.wdt != 2) || !same_blocks || !shapes || !vec {
        return None;
    }
    Some(PairWeights { gate: (&gate.data, &gate.scales), up: (&up.data, &up.scales), down: (&down.data, &down.scales), wdt: 2, inter: gate.out, hidden: gate.inp, bn: gate.bn, bk: gate.bk, e0: 0, ne: 1 })
}

/// The warps (a power of two, at most a block's `wpb`, at most 8) that share each of `items`
/// gate/up items, each a part of K, so that the items fill the grid's `warps` (moe.hip's
/// `moe_gate_up_impl`): 1 where there are items enough.
fn k_split(items: usize, warps: usize, wpb: usize) -> usize {
    let mut ks = 1;
    while ks * 2 <= wpb.min(8) && items * ks * 2 <= warps {
        ks *= 2;
    }
    ks
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-pair MoE grid is sized by the kernels' launch bound and item rows: the host's
    /// constants are moe.hip's.
    #[test]
    fn moe_pair_grid_mirrors_the_kernel() {
        let src = include_str!("../../../hip-kernels/moe.hip");
        for (name, v) in [("MOE_PAIR_BLOCKS_PER_SM", MOE_PAIR_BLOCKS_PER_SM), ("MOE_GU_WIDE_BLOCKS_PER_SM", MOE_GU_WIDE_BLOCKS_PER_SM_NVIDIA), ("MOE_GU_ROWS", MOE_GU_ROWS), ("MOE_DOWN_ROWS", MOE_DOWN_ROWS)] {
            assert!(src.contains(&format!("#define {name} {v}\n")), "{name} {v}");
        }
        assert!(src.contains("MOE_GATE_UP(moe_gate_up_##SUF, MOE_PAIR_BLOCKS_PER_SM, WDT)") && src.contains("MOE_GATE_UP(moe_gate_up_wide_##SUF, MOE_GU_WIDE_BLOCKS_PER_SM, WDT)"));
        assert!(src.contains("__launch_bounds__(256, MOE_PAIR_BLOCKS_PER_SM) moe_down_"));
        assert!(src.contains("while (g < WARP && g * VE < K) g *= 2;"), "moe_lanes is gemv.rs's row_lanes");
    }

    #[test]
    fn gate_up_copy_by_items() {
        // H200 at two blocks an SM: 2,112 warps. A TP8 rank's 9 pairs at batch 1 (1,152 items) and
        // 32 at batch 4 (4,096) keep the first copy; V3's 9 pairs of 1,024 row groups take the second
        assert!(!gate_up_wide(1152, 2112) && !gate_up_wide(4096, 2112));
        assert!(gate_up_wide(9216, 2112) && gate_up_wide(4224, 2112));
    }

    #[test]
    fn few_gate_up_items_split_k() {
        // H200: 132 SMs × 2 blocks × 8 warps = 2,112 warps
        // a TP8 rank's 8 routed pairs × 128 row groups (256 rows of 2): 2 warps an item
        assert_eq!(k_split(1024, 2112, 8), 2);
        // a TP8 rank's shared expert alone (128 items): 8; V3's shared expert (1,024 items): 2
        assert_eq!(k_split(128, 2112, 8), 8);
        // V3's 8 routed pairs at batch 1 (8,192 items): none
        assert_eq!(k_split(8192, 2112, 8), 1);
        // CDNA's 4 wavefronts a block bound it
        assert_eq!(k_split(16, 304 * 2 * 4, 4), 4);
    }

    #[test]
    fn short_rows_take_a_group_of_lanes() {
        // V3's down rows at a TP8 rank (K = 256 FP8): 16 lanes, two groups a 32-wide warp
        assert_eq!(row_lanes(256, 16, 32), 16);
        assert_eq!(row_lanes(256, 16, 64), 16);
        // full rows (7,168 hidden, 2,048 inter) keep the warp
        assert_eq!(row_lanes(7168, 16, 32), 32);
        assert_eq!(row_lanes(2048, 16, 64), 64);
        // 96 FP8 weights: 6 chunks, 8 lanes; 96 bf16: 12 chunks, 16 lanes
        assert_eq!(row_lanes(96, 16, 32), 8);
        assert_eq!(row_lanes(96, 8, 32), 16);
        assert_eq!(row_lanes(16, 16, 32), 1);
    }
}
