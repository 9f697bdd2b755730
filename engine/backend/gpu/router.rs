//! The MoE router's logits, f32 on the CUDA cores (expert choice must match the f32 reference:
//! no tensor cores): the GEMV up to `ROUTER_GEMV_MAX_ROWS` tokens, from tuned
//! `router_blas_min_rows` the GEMM library's f32 GEMM (FFMA, no TF32; a bf16 router converted to
//! f32 first by `widen_bf16` each call: ~7 MB for V3, ~11 µs), else linear.hip's 128 × 64 tiles
//! split over K (~11 TFLOPS at 4,096 tokens on the H200, 0.66 ms a V3 layer). The router has few
//! outputs (V3: 256 experts), so its tiles alone are a handful of blocks (8 at 256 tokens) and
//! the GEMV's 16-row slices each re-read the weights on a few blocks (16 launches of ~18 µs at
//! 256 tokens on the H200); K parts give every SM two blocks. Each part writes its own [tokens,
//! experts] and moe_route adds them in order.
use super::backend::{GpuBackend, GpuTensor, GpuVendor};
use super::device::{err, DevBuf};
use super::ops::{cfg, GpuLinear, LINEAR_TILE, LINEAR_TILE_K};
use crate::backend::BackendError;

const EW: &str = "hip-kernels/elementwise.hip";

/// Tokens up to which the router runs on the GEMV (its batch-1 latency kernels).
pub(super) const ROUTER_GEMV_MAX_ROWS: usize = 8;
/// The least K a part sums (8 of the tile's steps: fewer leave each block mostly waiting).
const ROUTER_MIN_PART_K: usize = 128;

/// The K split of the router's tiles for `rows` tokens, `n` experts and hidden size `k` on `sms`
/// SMs: (parts, K a part), parts × tiles reaching two blocks an SM where K allows.
pub(super) fn router_split(rows: usize, n: usize, k: usize, sms: usize) -> (usize, usize) {
    let tiles = n.div_ceil(LINEAR_TILE.1) * rows.div_ceil(LINEAR_TILE.0);
    let want = (2 * sms).div_ceil(tiles.max(1)).min(k / ROUTER_MIN_PART_K).max(1);
    let kc = k.div_ceil(want).next_multiple_of(LINEAR_TILE_K);
    (k.div_ceil(kc), kc)
}

/// How many distinct experts `ids` name (the routed pairs of one call; negative: none).
pub(super) fn distinct_experts(ids: &[i32]) -> usize {
    let mut seen: Vec<i32> = ids.iter().copied().filter(|&e| e >= 0).collect();
    seen.sort_unstable();
    seen.dedup();
    seen.len()
}

impl<V: GpuVendor> GpuBackend<V> {
    /// While profiling (eager steps: `engine bench --profile`'s re-run), the distinct experts of
    /// this routing call, read back: what the decode step's expert bytes are.
    pub(super) fn record_routed(&self, ids: &DevBuf<i32>, pairs: usize) -> Result<(), BackendError> {
        if self.profile.enabled.load(std::sync::atomic::Ordering::Relaxed) && pairs > 0 {
            let v: Vec<i32> = ids.to_host().map_err(err("routed ids"))?;
            self.profile.routed.lock().unwrap().push(distinct_experts(&v[..pairs.min(v.len())]));
        }
        Ok(())
    }

    /// The router's logits as (buffer, parts): `parts` [x.rows, gate.out] K parts in a row.
    pub(super) fn router_logits(&self, x: &GpuTensor, gate: &GpuLinear) -> Result<(DevBuf<f32>, usize), BackendError> {
        if x.rows <= ROUTER_GEMV_MAX_ROWS {
            return Ok((self.linear_with(x, gate, false)?.buf, 1));
        }
        if let Some(y) = self.router_blas(x, gate)? {
            return Ok((y, 1));
        }
        let split = router_split(x.rows, gate.out, gate.inp, self.sms);
        let mut y = self.alloc_out(split.0 * x.rows * gate.out)?;
        self.linear_tiles(x, gate, &mut y, split)?;
        Ok((y, split.0))
    }

    /// The logits by the GEMM library's f32 GEMM where tuned and available (f32 or bf16 router
    /// weights); None: the own kernels.
    fn router_blas(&self, x: &GpuTensor, gate: &GpuLinear) -> Result<Option<DevBuf<f32>>, BackendError> {
        let (m, n, k) = (x.rows, gate.out, gate.inp);
        let min = self.tuned.router_blas_min_rows;
        let Some(lt) = self.blaslt.as_ref().filter(|lt| min > 0 && m >= min && gate.wdt <= 1 && lt.supports_f32(m, n, k)) else {
            return Ok(None);
        };
        let w32 = match gate.wdt {
            0 => None,
            _ => {
                let mut w = self.scratch::<f32>(n * k)?;
                let f = self.func(EW, "widen_bf16")?;
                let total = (n * k) as i64;
                self.launch(&f).arg(&gate.data).arg(&mut w).arg(&total).run(cfg(((n * k).div_ceil(256) as u32, 1), 256, 0)).map_err(err("widen_bf16"))?;
                Some(w)
            }
        };
        let wp = w32.as_ref().map_or(gate.data.ptr(), |w| w.ptr());
        let y = self.scratch::<f32>(m * n)?;
        lt.gemm_f32(m, n, k, wp, x.buf.ptr(), y.ptr()).map_err(|msg| self.op_err("router", format!("{}: {msg}", lt.name())))?;
        Ok(Some(y))
    }
}

#[cfg(test)]
mod tests {
    use super::{distinct_experts, router_split};

    #[test]
    fn distinct_experts_counts_each_id_once() {
        assert_eq!(distinct_experts(&[3, 1, 3, 7, 1, 0]), 4);
        assert_eq!(distinct_experts(&[-1, 2, 2]), 1);
        assert_eq!(distinct_experts(&[]), 0);
    }

    #[test]
    fn router_tiles_split_k_to_fill_the_gpu() {
        // V3's router (256 experts, hidden 7168) on 132 SMs: 256 tokens are 8 tiles, so 33 parts
        // wanted, 224 of K a part (14 steps): 32 parts
        assert_eq!(router_split(256, 256, 7168, 132), (32, 224));
        // 4096 tokens: 128 tiles, 3 parts
        assert_eq!(router_split(4096, 256, 7168, 132), (3, 2400));
        // enough tiles alone: one part, all of K
        assert_eq!(router_split(16384, 256, 7168, 132), (1, 7168));
        // a small hidden size keeps parts of at least 128 (and K not a multiple of the step)
        assert_eq!(router_split(200, 256, 256, 132), (2, 128));
        assert_eq!(router_split(20, 12, 100, 4), (1, 112));
        for (rows, n, k, sms) in [(9, 256, 7168, 132), (300, 160, 5120, 80), (64, 64, 2000, 304)] {
            let (parts, kc) = router_split(rows, n, k, sms);
            assert!(kc % 16 == 0 && (parts - 1) * kc < k && parts * kc >= k, "{rows} {n} {k}: {parts} x {kc}");
        }
    }
}
