//! Tensor-core GEMMs (hip-kernels/mma_tile.h): the dense linear layer with split-K; and the MoE
//! experts grouped by expert (one weight read per expert and tile, not per routed token), as a
//! grouped GEMV for decode-sized batches or on the tensor cores for prefill-sized ones.
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::ops::{wdt_suffix, GpuExperts, GpuLinear, GpuRouting};
use super::{err, CudaBackend, GpuTensor};
use crate::backend::BackendError;

const LIN_MMA: &str = "hip-kernels/linear_mma.hip";
const MOE_GROUPED: &str = "hip-kernels/moe_grouped.hip";
/// Tile edge of the kernels (MT_M = MT_N) and their K step (MT_K).
const TILE: usize = 128;
const KSTEP: usize = 32;
/// Tokens of one expert per grouped-GEMV tile (GV_T in moe_grouped.hip).
const GV_TOKENS: usize = 16;
/// The grouping kernel keeps one counter per expert in shared memory.
const MAX_EXPERTS: usize = 1024;

fn launch(grid: (u32, u32, u32)) -> LaunchConfig {
    LaunchConfig { grid_dim: (grid.0.max(1), grid.1.max(1), grid.2.max(1)), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// Every operand chunk can take a 16-byte load: rows of a multiple of 16 elements and FP8 scale
/// blocks that a chunk never straddles.
fn vec_ok(k: usize, w: u8, bk: i32) -> i32 {
    (k % 16 == 0 && (w != 2 || bk % 16 == 0)) as i32
}

/// K split so that the tiles fill the GPU twice over, each range at least 4 K steps.
fn k_splits(tiles: usize, k: usize, sms: usize) -> (usize, usize) {
    let want = (2 * sms).div_ceil(tiles.max(1)).max(1);
    let most = (k / (4 * KSTEP)).max(1);
    let splits = want.min(most);
    let ksplit = k.div_ceil(splits).div_ceil(KSTEP) * KSTEP;
    (k.div_ceil(ksplit), ksplit)
}

impl CudaBackend {
    pub(super) fn linear_mma(&self, x: &GpuTensor, w: &GpuLinear, y: &mut CudaSlice<f32>) -> Result<(), BackendError> {
        let (m, n, k) = (x.rows, w.out, w.inp);
        let tiles = n.div_ceil(TILE) * m.div_ceil(TILE);
        let (splits, ksplit) = k_splits(tiles, k, self.sms);
        let f = self.func(LIN_MMA, &format!("linear_mma_{}", wdt_suffix(w.wdt)))?;
        let (mi, ni, ki, ks, v) = (m as i32, n as i32, k as i32, ksplit as i32, vec_ok(k, w.wdt, w.bk));
        let grid = (n.div_ceil(TILE) as u32, m.div_ceil(TILE) as u32, splits as u32);
        if splits == 1 {
            let mut b = self.stream.launch_builder(&f);
            b.arg(&x.buf).arg(&w.data).arg(&w.scales).arg(y).arg(&mi).arg(&ni).arg(&ki).arg(&w.bn).arg(&w.bk).arg(&ks).arg(&v);
            return unsafe { b.launch(launch(grid)) }.map(|_| ()).map_err(err("linear_mma"));
        }
        let mut part = self.stream.alloc_zeros::<f32>(splits * m * n).map_err(err("linear_mma"))?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&x.buf).arg(&w.data).arg(&w.scales).arg(&mut part).arg(&mi).arg(&ni).arg(&ki).arg(&w.bn).arg(&w.bk).arg(&ks).arg(&v);
        unsafe { b.launch(launch(grid)) }.map_err(err("linear_mma"))?;
        let f = self.func(LIN_MMA, "linear_split_sum")?;
        let (total, sp) = ((m * n) as i64, splits as i32);
        let mut b = self.stream.launch_builder(&f);
        b.arg(&part).arg(y).arg(&total).arg(&sp);
        unsafe { b.launch(launch(((m * n).div_ceil(256) as u32, 1, 1))) }.map(|_| ()).map_err(err("linear_split_sum"))
    }

    /// Whether the grouped kernels can take these experts: 16-byte loads along both K dimensions.
    pub(super) fn moe_grouped_ok(e: &GpuExperts) -> bool {
        e.n <= MAX_EXPERTS && vec_ok(e.hidden, e.wdt, e.bk) == 1 && vec_ok(e.inter, e.wdt, e.bk) == 1
    }

    /// out (zeroed, [T, hidden]) += Σ over this rank's routed (token, expert) pairs of
    /// weight · down_e(silu(gate_e x) · up_e x), the pairs grouped by expert on the device, then
    /// the grouped GEMV (decode-sized batches) or the tensor-core tiles.
    pub(super) fn moe_experts_grouped(&self, x: &GpuTensor, r: &GpuRouting, e: &GpuExperts, out: &mut CudaSlice<f32>) -> Result<(), BackendError> {
        let mma = self.mma_gemm && x.rows >= self.tuned.moe_mma_min_rows;
        let tile_m = if mma { TILE } else { GV_TOKENS };
        let pairs = x.rows * r.top_k;
        let alloc_i32 = |n: usize| self.stream.alloc_zeros::<i32>(n.max(1)).map_err(err("moe_group"));
        // at most one partial tile per expert beyond the full ones
        let max_tiles = pairs.div_ceil(tile_m) + e.n.min(pairs);
        let (mut tok, mut pair_of, mut tiles, mut ntiles) = (alloc_i32(pairs)?, alloc_i32(pairs)?, alloc_i32(3 * max_tiles)?, alloc_i32(1)?);
        let (p, k, e0, ne, tm) = (pairs as i32, r.top_k as i32, e.first as i32, e.n as i32, tile_m as i32);
        let f = self.func(MOE_GROUPED, "moe_group")?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&r.ids).arg(&p).arg(&k).arg(&e0).arg(&ne).arg(&tm).arg(&mut tok).arg(&mut pair_of).arg(&mut tiles).arg(&mut ntiles);
        unsafe { b.launch(LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 }) }.map_err(err("moe_group"))?;

        let (inter, hidden) = (e.inter, e.hidden);
        let (ii, hi) = (inter as i32, hidden as i32);
        if !mma {
            // 8 warps per block, a warp per output row
            let mut h = self.alloc_out(pairs * inter)?;
            let f = self.func(MOE_GROUPED, &format!("moe_gate_up_gv_{}", wdt_suffix(e.wdt)))?;
            let mut b = self.stream.launch_builder(&f);
            b.arg(&x.buf).arg(&tok).arg(&tiles).arg(&ntiles).arg(&e.gate).arg(&e.gs).arg(&e.up).arg(&e.us).arg(&mut h).arg(&ii).arg(&hi).arg(&e.bn).arg(&e.bk);
            unsafe { b.launch(launch((inter.div_ceil(8) as u32, max_tiles as u32, 1))) }.map_err(err("moe_gate_up_gv"))?;
            let f = self.func(MOE_GROUPED, &format!("moe_down_gv_{}", wdt_suffix(e.wdt)))?;
            let mut b = self.stream.launch_builder(&f);
            b.arg(&h).arg(&pair_of).arg(&r.weights).arg(&tiles).arg(&ntiles).arg(&e.down).arg(&e.ds).arg(out).arg(&k).arg(&ii).arg(&hi).arg(&e.bn).arg(&e.bk);
            return unsafe { b.launch(launch((hidden.div_ceil(8) as u32, max_tiles as u32, 1))) }.map(|_| ()).map_err(err("moe_down_gv"));
        }
        let mut gu = self.alloc_out(pairs * 2 * inter)?;
        let f = self.func(MOE_GROUPED, &format!("moe_gate_up_mma_{}", wdt_suffix(e.wdt)))?;
        let v = vec_ok(hidden, e.wdt, e.bk);
        let mut b = self.stream.launch_builder(&f);
        b.arg(&x.buf).arg(&tok).arg(&tiles).arg(&ntiles).arg(&e.gate).arg(&e.gs).arg(&e.up).arg(&e.us).arg(&mut gu).arg(&ii).arg(&hi).arg(&e.bn).arg(&e.bk).arg(&v);
        unsafe { b.launch(launch((2 * inter.div_ceil(TILE) as u32, max_tiles as u32, 1))) }.map_err(err("moe_gate_up_mma"))?;

        let mut h = self.alloc_out(pairs * inter)?;
        let f = self.func(MOE_GROUPED, "moe_silu_mul_halves")?;
        let n = (pairs * inter) as i64;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&gu).arg(&mut h).arg(&n).arg(&ii);
        unsafe { b.launch(launch(((pairs * inter).div_ceil(256) as u32, 1, 1))) }.map_err(err("moe_silu_mul_halves"))?;

        let f = self.func(MOE_GROUPED, &format!("moe_down_mma_{}", wdt_suffix(e.wdt)))?;
        let v = vec_ok(inter, e.wdt, e.bk);
        let mut b = self.stream.launch_builder(&f);
        b.arg(&h).arg(&pair_of).arg(&r.weights).arg(&tiles).arg(&ntiles).arg(&e.down).arg(&e.ds).arg(out).arg(&k).arg(&ii).arg(&hi).arg(&e.bn).arg(&e.bk).arg(&v);
        unsafe { b.launch(launch((hidden.div_ceil(TILE) as u32, max_tiles as u32, 1))) }.map(|_| ()).map_err(err("moe_down_mma"))
    }
}

#[cfg(test)]
mod tests {
    use super::k_splits;

    #[test]
    fn k_splits_cover_k_in_whole_steps() {
        for (tiles, k, sms) in [(1, 7168, 132), (56, 18432, 132), (192, 1536, 132), (1, 64, 132), (1, 100, 132), (300, 7168, 132), (4, 513, 80)] {
            let (s, ks) = k_splits(tiles, k, sms);
            assert!(s >= 1 && ks % super::KSTEP == 0, "{tiles} {k}: {s} x {ks}");
            assert!(s * ks >= k && (s - 1) * ks < k, "{tiles} {k}: ranges {s} x {ks} do not tile K exactly");
            if tiles >= 2 * sms {
                assert_eq!(s, 1);
            }
        }
        // a batch-64 decode projection 7168 -> 2048 (16 tiles) splits to fill 264 blocks
        assert_eq!(k_splits(16, 7168, 132), (16, 448));
    }
}
