//! MoE experts grouped by expert on the device (hip-kernels/moe_grouped.hip): one weight read per
//! expert and tile instead of per routed token; a grouped GEMV for decode-sized batches, the
//! tensor-core tile (mma_tile.h) for prefill-sized ones.
use super::backend::{GpuBackend, GpuTensor, GpuVendor};
use super::device::{err, DevBuf, LaunchConfig};
use super::mma::{launch, vec_ok, TILE};
use super::ops::{wdt_suffix, GpuExperts, GpuRouting};
use crate::backend::BackendError;

const MOE_GROUPED: &str = "hip-kernels/moe_grouped.hip";
const MOE_TC: &str = "hip-kernels/moe_tc.hip";
const MOE_F8: &str = "hip-kernels/moe_f8.hip";
pub(super) const MOE_F8S: &str = "hip-kernels/moe_f8s.hip";
/// moe_f8s.hip's dynamic shared memory (MS_SMEM: 4 stages of 128 weight rows and 16 token rows
/// of 128 bytes, 16 token scales and 2 weight scales, each stage rounded up to 128 bytes)
pub(super) const MOE_F8S_SMEM: usize = 4 * 18560;
/// Tokens of one expert per grouped-GEMV tile (GV_T in moe_grouped.hip).
const GV_TOKENS: usize = 16;
/// The grouping kernel keeps one counter per expert in shared memory.
const MAX_EXPERTS: usize = 1024;

impl<V: GpuVendor> GpuBackend<V> {
    /// Whether decode-sized batches of these experts take the tensor-core grouped GEMV
    /// (moe_tc.hip): FP8 weights, 64-wide K chunks inside one scale block, whole row fragments.
    fn moe_tc_for(&self, e: &GpuExperts) -> bool {
        self.moe_tc && self.mma_gemm && e.wdt == 2 && e.bk % 64 == 0 && e.hidden.is_multiple_of(64) && e.inter.is_multiple_of(64)
    }

    /// Whether decode-sized batches of these experts quantise their activations and take the FP8 ×
    /// FP8 grouped kernels (moe_f8.hip): `--fp8-activations dynamic`, 128 × 128 weight blocks,
    /// 64-wide K chunks, NVIDIA sm_89+ (the e4m3 MMA), up to `moe_f8_max_rows` tokens. The
    /// kernels read the weight scales themselves, so a TP8 rank's experts (inter 256, which
    /// cuBLASLt's scale pitch refuses) take them too.
    fn moe_f8_for(&self, x: &GpuTensor, e: &GpuExperts) -> bool {
        self.fp8_act
            && self.mma_gemm
            && super::linear_tc::e4m3_mma(&self.arch)
            && e.wdt == 2
            && x.rows <= self.tuned.moe_f8_max_rows
            && e.bn == 128
            && e.bk == 128
            && e.hidden.is_multiple_of(64)
            && e.inter.is_multiple_of(64)
    }

    /// Whether `moe_experts` takes the grouped kernels for `x`'s tokens (from
    /// `moe_grouped_min_rows`, experts they apply to).
    pub(super) fn moe_grouped_for(&self, x: &GpuTensor, e: &GpuExperts) -> bool {
        x.rows >= self.tuned.moe_grouped_min_rows && Self::moe_grouped_ok(e)
    }

    /// Whether the grouped kernels can take these experts: 16-byte loads along both K dimensions.
    pub(super) fn moe_grouped_ok(e: &GpuExperts) -> bool {
        e.n <= MAX_EXPERTS && vec_ok(e.hidden, e.wdt, e.bk) == 1 && vec_ok(e.inter, e.wdt, e.bk) == 1
    }

    /// out (zeroed, [T, hidden]) += Σ over this rank's routed (token, expert) pairs of
    /// weight · down_e(silu(gate_e x) · up_e x), the pairs grouped by expert on the device, then
    /// the grouped GEMV (decode-sized batches) or the tensor-core tiles.
    pub(super) fn moe_experts_grouped(&self, x: &GpuTensor, r: &GpuRouting, e: &GpuExperts, out: &mut DevBuf<f32>) -> Result<(), BackendError> {
        let mma = self.mma_gemm && x.rows >= self.tuned.moe_mma_min_rows;
        let tile_m = if mma { TILE } else { GV_TOKENS };
        let pairs = x.rows * r.top_k;
        let alloc_i32 = |n: usize| self.zeros::<i32>(n.max(1));
        // at most one partial tile per expert beyond the full ones
        let max_tiles = pairs.div_ceil(tile_m) + e.n.min(pairs);
        let (mut tok, mut pair_of, mut tiles, mut ntiles) = (alloc_i32(pairs)?, alloc_i32(pairs)?, alloc_i32(3 * max_tiles)?, alloc_i32(1)?);
        let (p, k, e0, ne, tm) = (pairs as i32, r.top_k as i32, e.first as i32, e.n as i32, tile_m as i32);
        let f = self.func(MOE_GROUPED, "moe_group")?;
        let mut b = self.launch(&f);
        b.arg(&r.ids).arg(&p).arg(&k).arg(&e0).arg(&ne).arg(&tm).arg(&mut tok).arg(&mut pair_of).arg(&mut tiles).arg(&mut ntiles);
        b.run(LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 }).map_err(err("moe_group"))?;

        let (inter, hidden) = (e.inter, e.hidden);
        let (ii, hi) = (inter as i32, hidden as i32);
        if !mma && self.moe_f8_for(x, e) {
            // x per token and 128 channels to e4m3; gate_up 4 warps × 16 rows a block; SiLU·up per
            // position to e4m3; down 4 warps × 32 rows. The staged form (moe_f8s.hip) where H and
            // I are whole 128-column blocks, the same arguments and grids
            let staged = self.moe_f8s && hidden.is_multiple_of(128) && inter.is_multiple_of(128);
            let (file, form, smem) = if staged { (MOE_F8S, "f8s", MOE_F8S_SMEM as u32) } else { (MOE_F8, "f8", 0) };
            let c = self.quantize_act_fp8(x, x.rows)?;
            let (q, s) = (&c.q, &c.s);
            let ti = x.rows as i32;
            let h = GpuTensor { rows: pairs, cols: inter, buf: self.alloc_out(pairs * inter)? };
            let f = self.func(file, &format!("moe_gate_up_{form}_fp8w"))?;
            let mut b = self.launch(&f);
            b.arg(q).arg(s).arg(&ti).arg(&tok).arg(&tiles).arg(&ntiles).arg(&e.gate).arg(&e.gs).arg(&e.up).arg(&e.us).arg(&h.buf).arg(&ii).arg(&hi);
            b.run(LaunchConfig { grid_dim: (inter.div_ceil(64) as u32, max_tiles as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: smem }).map_err(err("moe_gate_up_f8"))?;
            let ch = self.quantize_act_fp8(&h, pairs)?;
            let (qh, sh) = (&ch.q, &ch.s);
            let f = self.func(file, &format!("moe_down_{form}_fp8w"))?;
            let mut b = self.launch(&f);
            b.arg(qh).arg(sh).arg(&p).arg(&pair_of).arg(&r.weights).arg(&tiles).arg(&ntiles).arg(&e.down).arg(&e.ds).arg(out).arg(&k).arg(&ii).arg(&hi);
            return b.run(LaunchConfig { grid_dim: (hidden.div_ceil(128) as u32, max_tiles as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: smem }).map_err(err("moe_down_f8"));
        }
        if !mma && self.moe_tc_for(e) {
            // tensor-core grouped GEMV: gate_up 4 warps × 16 rows per block, down 4 warps × 32
            let mut h = self.alloc_out(pairs * inter)?;
            let f = self.func(MOE_TC, "moe_gate_up_tc_fp8w")?;
            let mut b = self.launch(&f);
            b.arg(&x.buf).arg(&tok).arg(&tiles).arg(&ntiles).arg(&e.gate).arg(&e.gs).arg(&e.up).arg(&e.us).arg(&mut h).arg(&ii).arg(&hi).arg(&e.bn).arg(&e.bk);
            b.run(LaunchConfig { grid_dim: (inter.div_ceil(64) as u32, max_tiles as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }).map_err(err("moe_gate_up_tc"))?;
            let f = self.func(MOE_TC, "moe_down_tc_fp8w")?;
            let mut b = self.launch(&f);
            b.arg(&h).arg(&pair_of).arg(&r.weights).arg(&tiles).arg(&ntiles).arg(&e.down).arg(&e.ds).arg(out).arg(&k).arg(&ii).arg(&hi).arg(&e.bn).arg(&e.bk);
            return b.run(LaunchConfig { grid_dim: (hidden.div_ceil(128) as u32, max_tiles as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }).map_err(err("moe_down_tc"));
        }
        if !mma {
            // gate_up a warp per output row (gate and up together), down a warp per two rows
            let mut h = self.alloc_out(pairs * inter)?;
            let f = self.func(MOE_GROUPED, &format!("moe_gate_up_gv_{}", wdt_suffix(e.wdt)))?;
            let mut b = self.launch(&f);
            b.arg(&x.buf).arg(&tok).arg(&tiles).arg(&ntiles).arg(&e.gate).arg(&e.gs).arg(&e.up).arg(&e.us).arg(&mut h).arg(&ii).arg(&hi).arg(&e.bn).arg(&e.bk);
            b.run(launch((inter.div_ceil(self.warps_per_block()) as u32, max_tiles as u32, 1))).map_err(err("moe_gate_up_gv"))?;
            let f = self.func(MOE_GROUPED, &format!("moe_down_gv_{}", wdt_suffix(e.wdt)))?;
            let mut b = self.launch(&f);
            b.arg(&h).arg(&pair_of).arg(&r.weights).arg(&tiles).arg(&ntiles).arg(&e.down).arg(&e.ds).arg(out).arg(&k).arg(&ii).arg(&hi).arg(&e.bn).arg(&e.bk);
            // a warp per two output rows
            return b.run(launch((hidden.div_ceil(2 * self.warps_per_block()) as u32, max_tiles as u32, 1))).map_err(err("moe_down_gv"));
        }
        let mut gu = self.alloc_out(pairs * 2 * inter)?;
        let f = self.func(MOE_GROUPED, &format!("moe_gate_up_mma_{}", wdt_suffix(e.wdt)))?;
        let v = vec_ok(hidden, e.wdt, e.bk);
        let mut b = self.launch(&f);
        b.arg(&x.buf).arg(&tok).arg(&tiles).arg(&ntiles).arg(&e.gate).arg(&e.gs).arg(&e.up).arg(&e.us).arg(&mut gu).arg(&ii).arg(&hi).arg(&e.bn).arg(&e.bk).arg(&v);
        b.run(launch((2 * inter.div_ceil(TILE) as u32, max_tiles as u32, 1))).map_err(err("moe_gate_up_mma"))?;

        let mut h = self.alloc_out(pairs * inter)?;
        let f = self.func(MOE_GROUPED, "moe_silu_mul_halves")?;
        let n = (pairs * inter) as i64;
        let mut b = self.launch(&f);
        b.arg(&gu).arg(&mut h).arg(&n).arg(&ii);
        b.run(launch(((pairs * inter).div_ceil(256) as u32, 1, 1))).map_err(err("moe_silu_mul_halves"))?;

        let f = self.func(MOE_GROUPED, &format!("moe_down_mma_{}", wdt_suffix(e.wdt)))?;
        let v = vec_ok(inter, e.wdt, e.bk);
        let mut b = self.launch(&f);
        b.arg(&h).arg(&pair_of).arg(&r.weights).arg(&tiles).arg(&ntiles).arg(&e.down).arg(&e.ds).arg(out).arg(&k).arg(&ii).arg(&hi).arg(&e.bn).arg(&e.bk).arg(&v);
        b.run(launch((hidden.div_ceil(TILE) as u32, max_tiles as u32, 1))).map_err(err("moe_down_mma"))
    }
}
