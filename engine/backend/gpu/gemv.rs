//! The decode-sized linear layers (up to 32 rows): hip-kernels/linear.hip's GEMV kernels, a warp
//! (or several) per output row streaming the weights once.
use super::backend::{GpuBackend, GpuTensor, GpuVendor};
use super::device::{err, DevBuf};
use super::ops::{cfg, wdt_suffix, GpuLinear};
use crate::backend::BackendError;

const LIN: &str = "hip-kernels/linear.hip";
/// Warps that keep an H200's HBM busy (132 SMs × ~32 resident warps)
const TARGET_WARPS: usize = 4096;

/// Warps per group of output rows (1, 2, 4 or 8; `n` groups): enough warps in all for layers with
/// few rows, while each lane of a `warp`-wide warp keeps at least one 16-byte chunk of its row
/// (`ve` weights per chunk). A split never exceeds the warps of a 256-thread block (the kernel
/// keeps a row group inside one block).
pub(super) fn gemv_split(n: usize, k: usize, ve: usize, warp: usize) -> usize {
    let (mut split, most) = (1, (256 / warp).min(8));
    while split < most && n * split < TARGET_WARPS && k >= warp * ve * (split * 2) {
        split *= 2;
    }
    split
}

/// How a GEMV launch covers `n` groups of output rows of length `k` (weights of dtype `wdt`, the
/// kernels' WDT_*: 16 FP8 or 8 others a 16-byte chunk):
/// lanes per group (the warp, or a power of two that covers short rows in one step: K = 128 FP8
/// rows take 8 lanes, four groups a warp), whole warps per group (`gemv_split`, rows of a warp or
/// more), and the 256-thread blocks that hold them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct GemvGeometry {
    pub lanes: usize,
    pub split: usize,
    pub blocks: usize,
}

pub(super) fn gemv_geometry(n: usize, k: usize, wdt: u8, warp: usize) -> GemvGeometry {
    let ve = chunk_elems(wdt);
    let lanes = row_lanes(k, ve, warp);
    let split = if lanes == warp { gemv_split(n, k, ve, warp) } else { 1 };
    let per_block = 256 / warp / split * (warp / lanes);
    GemvGeometry { lanes, split, blocks: n.div_ceil(per_block).max(1) }
}

/// The 8-row GEMV family for `rows` (≤ 8) rows of x and weights of dtype `wdt`, and its output
/// rows a warp: `gemv1` (four) for one row of bf16/FP8 weights, whose four rows a warp share each x
/// load (V3's bf16 lm_head, 1.85 GB: 470 → 420 µs under ncu on the H200 against two), else
/// `gemv8` (two).
pub(super) fn gemv_kind(rows: usize, wdt: u8) -> (&'static str, usize) {
    if rows == 1 && wdt != 0 {
        ("gemv1", 4)
    } else {
        ("gemv8", 2)
    }
}

/// Whether `w`'s rows take the 16-byte-load kernels: rows of a multiple of 8 elements (FP8: 16,
/// and scale blocks too).
pub(super) fn chunked_rows(w: &GpuLinear) -> bool {
    if w.wdt == 2 {
        w.inp.is_multiple_of(16) && w.bk % 16 == 0
    } else {
        w.inp.is_multiple_of(8)
    }
}

/// Weights of dtype `wdt` (the kernels' WDT_*) in a 16-byte chunk: 16 FP8, 8 others (f32 rows are
/// read as 8-weight 32-byte chunks).
pub(super) fn chunk_elems(wdt: u8) -> usize {
    if wdt == 2 {
        16
    } else {
        8
    }
}

/// The lanes that read a row of `k` weights (`ve` a chunk): the fewest, a power of two, that
/// cover it in one step, at most the warp (linear.hip's GEMV `lanes`, moe.hip's `moe_lanes`).
pub(super) fn row_lanes(k: usize, ve: usize, warp: usize) -> usize {
    let mut lanes = warp;
    while lanes > 1 && (lanes / 2) * ve >= k {
        lanes /= 2;
    }
    lanes
}

impl<V: GpuVendor> GpuBackend<V> {
    /// y = x · Wᵀ for x of at most 32 rows (16-row slices beyond 8), with the 16-byte-load kernels
    /// where the row length allows them and the scalar ones otherwise.
    pub(super) fn gemv_into(&self, x: &GpuTensor, w: &GpuLinear, y: &mut DevBuf<f32>, vec8: bool) -> Result<(), BackendError> {
        // the kernel, its output rows a warp (GEMV8's R in linear.hip) and x rows a launch
        let (kind, per_warp, slice) = match (x.rows, vec8) {
            (0..=8, true) => {
                let (kind, per_warp) = gemv_kind(x.rows, w.wdt);
                (kind, per_warp, 8)
            }
            (_, true) => ("gemv16", 1, 16),
            _ => ("gemv", 1, 8),
        };
        let f = self.func(LIN, &format!("{kind}_{}", wdt_suffix(w.wdt)))?;
        let (n, k) = (w.out as i32, w.inp as i32);
        // (the scalar kernels: a warp a row, no split or lane groups)
        let (sp, lanes, blocks) = if vec8 {
            let geo = gemv_geometry(w.out.div_ceil(per_warp), w.inp, w.wdt, self.warp as usize);
            (geo.split as i32, geo.lanes as i32, geo.blocks)
        } else {
            (1, self.warp as i32, w.out.div_ceil(self.warps_per_block()))
        };
        for r0 in (0..x.rows).step_by(slice) {
            let m = (x.rows - r0).min(slice) as i32;
            let (xs, ys) = (x.buf.at(r0 * w.inp), y.at(r0 * w.out));
            let mut b = self.launch(&f);
            b.arg(&xs).arg(&w.data).arg(&w.scales).arg(&ys).arg(&m).arg(&n).arg(&k).arg(&w.bn).arg(&w.bk);
            if vec8 {
                b.arg(&sp).arg(&lanes);
            }
            b.run(cfg((blocks as u32, 1), 256, 0)).map_err(err("linear"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{gemv_geometry, gemv_split, GemvGeometry};

    #[test]
    fn one_row_of_narrow_weights_takes_four_rows_a_warp() {
        use super::gemv_kind;
        assert_eq!(gemv_kind(1, 2), ("gemv1", 4));
        assert_eq!(gemv_kind(1, 1), ("gemv1", 4));
        // f32 weights and several rows: the 8-row kernel, two rows a warp
        assert_eq!(gemv_kind(1, 0), ("gemv8", 2));
        assert_eq!(gemv_kind(5, 2), ("gemv8", 2));
    }

    #[test]
    fn narrow_row_groups_for_short_rows() {
        // weights FP8 (wdt 2: 16 a 16-byte chunk) or bf16 (wdt 1: 8)
        let g = gemv_geometry;
        // V3 o_proj at batch 1 (7,168 rows of 16,384 FP8, 4 rows a group): 1,792 groups, split 4
        assert_eq!(g(1792, 16384, 2, 32), GemvGeometry { lanes: 32, split: 4, blocks: 896 });
        // MLA's absorbed q (128 heads × 512 rows of K = 128 FP8): 8 lanes a group, 4 groups a warp
        assert_eq!(g(16384, 128, 2, 32), GemvGeometry { lanes: 8, split: 1, blocks: 512 });
        // 64 groups of K = 64: 4 lanes, 64 groups a block
        assert_eq!(g(64, 64, 2, 32), GemvGeometry { lanes: 4, split: 1, blocks: 1 });
        // a 512-wide row keeps the whole warp (one 16-byte chunk a lane); 64-wide wavefronts too
        assert_eq!(g(4096, 512, 2, 32), GemvGeometry { lanes: 32, split: 1, blocks: 512 });
        assert_eq!(g(4096, 512, 1, 64), GemvGeometry { lanes: 64, split: 1, blocks: 1024 });
        assert_eq!(g(4096, 128, 1, 64).lanes, 16);
        // 576 kv_a rows of 7,168: split 8 (one row group a block)
        assert_eq!(g(144, 7168, 2, 32), GemvGeometry { lanes: 32, split: 8, blocks: 144 });
    }

    #[test]
    fn small_layers_get_more_warps_per_row_while_rows_stay_long() {
        // V3 kv_a (576 × 7168 FP8): 8 warps per row (each lane 1-2 chunks)
        assert_eq!(gemv_split(576, 7168, 16, 32), 8);
        // q_a (1536 × 7168): 4
        assert_eq!(gemv_split(1536, 7168, 16, 32), 4);
        // q_b (24576 × 1536) and lm_head (129280 × 7168): already enough rows
        assert_eq!(gemv_split(24576, 1536, 16, 32), 1);
        assert_eq!(gemv_split(129280, 7168, 8, 32), 1);
        // short rows are not split below one chunk per lane
        assert_eq!(gemv_split(64, 512, 16, 32), 1);
        assert_eq!(gemv_split(64, 1024, 16, 32), 2);
        assert_eq!(gemv_split(64, 2048, 8, 32), 8);
        // 64-wide wavefronts need rows twice as long for the same split
        assert_eq!(gemv_split(64, 2048, 8, 64), 4);
        assert_eq!(gemv_split(576, 7168, 16, 64), 4);
        assert_eq!(gemv_split(64, 65536, 8, 64), 4, "at most 4 wavefronts of 64 in a 256-thread block");
    }
}
