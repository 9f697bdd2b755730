//! The tensor-core dense GEMM (hip-kernels/mma_tile.h + linear_mma.hip) with split-K.
use super::backend::{GpuBackend, GpuTensor, GpuVendor};
use super::device::{err, DevBuf, LaunchConfig};
use super::ops::{wdt_suffix, GpuLinear};
use crate::backend::BackendError;

const LIN_MMA: &str = "hip-kernels/linear_mma.hip";
/// Tile edge of the kernels (MT_M = MT_N) and their K step (MT_K).
pub(super) const TILE: usize = 128;
const KSTEP: usize = 32;

pub(super) fn launch(grid: (u32, u32, u32)) -> LaunchConfig {
    LaunchConfig { grid_dim: (grid.0.max(1), grid.1.max(1), grid.2.max(1)), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// Every operand chunk can take a 16-byte load: rows of a multiple of 16 elements and FP8 scale
/// blocks that a chunk never straddles.
pub(super) fn vec_ok(k: usize, w: u8, bk: i32) -> i32 {
    (k.is_multiple_of(16) && (w != 2 || bk % 16 == 0)) as i32
}

/// K split so that the tiles fill the GPU `fill` times over, each range at least 4 K steps.
fn k_splits(tiles: usize, k: usize, sms: usize, fill: usize) -> (usize, usize) {
    let want = (fill * sms).div_ceil(tiles.max(1)).max(1);
    let most = (k / (4 * KSTEP)).max(1);
    let splits = want.min(most);
    let ksplit = k.div_ceil(splits).div_ceil(KSTEP) * KSTEP;
    (k.div_ceil(ksplit), ksplit)
}

impl<V: GpuVendor> GpuBackend<V> {
    pub(super) fn linear_mma(&self, x: &GpuTensor, w: &GpuLinear, y: &mut DevBuf<f32>) -> Result<(), BackendError> {
        let (m, n, k) = (x.rows, w.out, w.inp);
        let tiles = n.div_ceil(TILE) * m.div_ceil(TILE);
        let (splits, ksplit) = k_splits(tiles, k, self.sms, self.tuned.mma_split_fill);
        let f = self.func(LIN_MMA, &format!("linear_mma_{}", wdt_suffix(w.wdt)))?;
        let (mi, ni, ki, ks, v) = (m as i32, n as i32, k as i32, ksplit as i32, vec_ok(k, w.wdt, w.bk));
        let grid = (n.div_ceil(TILE) as u32, m.div_ceil(TILE) as u32, splits as u32);
        if splits == 1 {
            let mut b = self.launch(&f);
            b.arg(&x.buf).arg(&w.data).arg(&w.scales).arg(y).arg(&mi).arg(&ni).arg(&ki).arg(&w.bn).arg(&w.bk).arg(&ks).arg(&v);
            return b.run(launch(grid)).map_err(err("linear_mma"));
        }
        let mut part = self.zeros::<f32>(splits * m * n)?;
        let mut b = self.launch(&f);
        b.arg(&x.buf).arg(&w.data).arg(&w.scales).arg(&mut part).arg(&mi).arg(&ni).arg(&ki).arg(&w.bn).arg(&w.bk).arg(&ks).arg(&v);
        b.run(launch(grid)).map_err(err("linear_mma"))?;
        self.split_sum(&part, y, m * n, splits)
    }

    /// y[i] = Σ_z part[z·len + i] over the `splits` partials, z in order (linear_mma.hip's
    /// `linear_split_sum`: deterministic split-K and hi/lo product sums).
    pub(super) fn split_sum(&self, part: &DevBuf<f32>, y: &mut DevBuf<f32>, len: usize, splits: usize) -> Result<(), BackendError> {
        let f = self.func(LIN_MMA, "linear_split_sum")?;
        let (total, sp) = (len as i64, splits as i32);
        self.launch(&f).arg(part).arg(y).arg(&total).arg(&sp).run(launch((len.div_ceil(256) as u32, 1, 1))).map_err(err("linear_split_sum"))
    }
}

#[cfg(test)]
mod tests {
    use super::k_splits;

    #[test]
    fn k_splits_cover_k_in_whole_steps() {
        for (tiles, k, sms) in [(1, 7168, 132), (56, 18432, 132), (192, 1536, 132), (1, 64, 132), (1, 100, 132), (300, 7168, 132), (4, 513, 80)] {
            let (s, ks) = k_splits(tiles, k, sms, 4);
            assert!(s >= 1 && ks % super::KSTEP == 0, "{tiles} {k}: {s} x {ks}");
            assert!(s * ks >= k && (s - 1) * ks < k, "{tiles} {k}: ranges {s} x {ks} do not tile K exactly");
            if tiles >= 4 * sms {
                assert_eq!(s, 1);
            }
        }
        // a batch-64 decode projection 7168 -> 2048 (16 tiles) splits to fill 264 blocks
        assert_eq!(k_splits(16, 7168, 132, 2), (16, 448));
        // filling 4 times over splits twice as far where K allows
        assert_eq!(k_splits(144, 7168, 132, 4), (4, 1792));
    }
}
