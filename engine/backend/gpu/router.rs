//! The MoE router's logits in f32 (expert choice must match the f32 reference: no product rounded
//! below f32): the GEMV up to `ROUTER_GEMV_MAX_ROWS` tokens, from tuned `router_blas_min_rows`
//! the GEMM library (bf16 weights: its bf16 GEMM on x split into three bf16 terms, exact
//! products; f32 weights: its f32 GEMM, FFMA, no TF32), else linear.hip's 128 × 64 tiles
//! split over K (~11 TFLOPS at 4,096 tokens on the H200, 0.66 ms a V3 layer). The router has few
//! outputs (V3: 256 experts), so its tiles alone are a handful of blocks (8 at 256 tokens) and
//! the GEMV's 16-row slices each re-read the weights on a few blocks (16 launches of ~18 µs at
//! 256 tokens on the H200); K parts give every SM two blocks. Each part writes its own [tokens,
//! experts] and moe_route adds them in order. Then moe.hip's routing kernel (`route`): each
//! token's top-k experts and weights (`GpuRouting`), and its row of the experts' output zeroed.
use super::backend::{GpuBackend, GpuTensor, GpuVendor};
use super::device::{err, DevBuf};
use super::ops::{cfg, GpuLinear, LINEAR_TILE, LINEAR_TILE_K};
use crate::backend::{BackendError, RouteParams};
use crate::config::{ScoringFunc, TopkMethod};

const EW: &str = "hip-kernels/elementwise.hip";
const MOE: &str = "hip-kernels/moe.hip";

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

pub struct GpuRouting {
    pub top_k: usize,
    pub ids: DevBuf<i32>,
    pub weights: DevBuf<f32>,
    /// The experts' output [tokens, hidden], zeroed by the routing kernel; taken by the first
    /// expert call (a later one zeroes its own)
    zeroed: std::sync::Mutex<Option<DevBuf<f32>>>,
}

impl GpuRouting {
    /// The routing kernel's ids and weights, with the experts' output it zeroed.
    fn new(top_k: usize, ids: DevBuf<i32>, weights: DevBuf<f32>, zeroed: DevBuf<f32>) -> Self {
        GpuRouting { top_k, ids, weights, zeroed: std::sync::Mutex::new(Some(zeroed)) }
    }

    /// The zeroed output where it is still there and holds `n` floats.
    pub(super) fn take_zeroed(&self, n: usize) -> Option<DevBuf<f32>> {
        self.zeroed.lock().unwrap().take().filter(|b| b.len() == n)
    }

    /// ... given back unwritten (the call that took it launched nothing).
    pub(super) fn give_back_zeroed(&self, b: DevBuf<f32>) {
        *self.zeroed.lock().unwrap() = Some(b);
    }
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

    /// `Backend::moe_route`: the logits, then moe.hip's routing kernel, which also zeroes each
    /// token's row of the experts' output they add into (carried by the routing to the first
    /// expert call).
    pub(super) fn route(&self, x: &GpuTensor, gate: &GpuLinear, bias: Option<&[f32]>, p: &RouteParams) -> Result<GpuRouting, BackendError> {
        let r = self.span("routing", || {
            let (logits, parts) = self.router_logits(x, gate)?;
            if p.n_experts > 1024 || p.top_k > 64 || p.top_k > p.n_experts || p.n_group > 64 || p.n_group == 0 {
                return Err(self.op_err("moe_route", format!("{} experts, top-k {}, {} groups: the routing kernel takes at most 1024 experts, top-k 64 (and no more than the experts) and 64 groups", p.n_experts, p.top_k, p.n_group)));
            }
            let f = self.func(MOE, "moe_route")?;
            let d_bias = self.constant(bias.unwrap_or(&[0.0]))?;
            // every token's top_k ids and weights are written, and its output row zeroed
            let mut ids = self.scratch::<i32>((x.rows * p.top_k).max(1))?;
            let mut weights = self.alloc_out(x.rows * p.top_k)?;
            let mut zeroed = self.scratch::<f32>((x.rows * x.cols).max(1))?;
            let method = match p.method {
                TopkMethod::NoauxTc => 0i32,
                TopkMethod::Greedy => 1,
                TopkMethod::GroupLimitedGreedy => 2,
            };
            let (hb, e, k, ng, tg, sm, norm, sc) = (bias.is_some() as i32, p.n_experts as i32, p.top_k as i32, p.n_group as i32, p.topk_group as i32, (p.scoring == ScoringFunc::Softmax) as i32, p.norm_topk_prob as i32, p.routed_scaling_factor);
            let mut b = self.launch(&f);
            let parts = parts as i32;
            b.arg(&logits).arg(&parts).arg(&d_bias).arg(&hb).arg(&e).arg(&k).arg(&ng).arg(&tg).arg(&method).arg(&sm).arg(&norm).arg(&sc).arg(&mut ids).arg(&mut weights);
            b.arg(&mut zeroed).arg(&(x.cols as i32));
            // one block per token, a thread per expert
            let threads = p.n_experts.next_multiple_of(self.warp as usize).max(self.warp as usize) as u32;
            b.run(cfg((x.rows as u32, 1), threads, 0)).map_err(err("moe_route"))?;
            Ok(GpuRouting::new(p.top_k, ids, weights, zeroed))
        })?;
        // (outside the span: the profile's read-back waits for the host, which the routing
        // class's events would otherwise time)
        self.record_routed(&r.ids, x.rows * p.top_k)?;
        Ok(r)
    }

    /// The router's logits as (buffer, parts): `parts` [x.rows, gate.out] K parts in a row.
    pub(super) fn router_logits(&self, x: &GpuTensor, gate: &GpuLinear) -> Result<(DevBuf<f32>, usize), BackendError> {
        if x.rows <= ROUTER_GEMV_MAX_ROWS {
            return Ok((self.linear_with(x, gate, false)?.buf, 1));
        }
        if let Some(y) = self.router_blas(x, gate)? {
            return Ok(y);
        }
        let split = router_split(x.rows, gate.out, gate.inp, self.sms);
        let mut y = self.alloc_out(split.0 * x.rows * gate.out)?;
        self.linear_tiles(x, gate, &mut y, split)?;
        Ok((y, split.0))
    }

    /// The logits by the GEMM library where tuned and available, as (buffer, parts): bf16 router
    /// weights (V3's) on its bf16 GEMM with x split into three bf16 terms (`split3_bf16_rows`:
    /// x = hi + mid + lo to f32's 24 bits; the weights are exact in bf16, so each product is an
    /// f32 GEMM's, and moe_route adds the three parts in order; the stacked operand is transient
    /// scratch of 1.5x x's f32 bytes), f32 weights on its f32 GEMM;
    /// None: the own kernels. (The f32 GEMM on the CUDA cores, with the bf16 weights widened each
    /// call, took ~53 µs a V3 layer at 256 tokens.)
    fn router_blas(&self, x: &GpuTensor, gate: &GpuLinear) -> Result<Option<(DevBuf<f32>, usize)>, BackendError> {
        let (m, n, k) = (x.rows, gate.out, gate.inp);
        let min = self.tuned.router_blas_min_rows;
        let Some(lt) = self.blaslt.as_ref().filter(|_| min > 0 && m >= min) else {
            return Ok(None);
        };
        let fail = |msg: String| self.op_err("router", format!("{}: {msg}", lt.name()));
        match gate.wdt {
            1 if lt.supports(3 * m, n, k) => {
                let mut x3 = self.scratch::<u16>(3 * m * k)?;
                let f = self.func(EW, "split3_bf16_rows")?;
                let total = (m * k) as i64;
                self.launch(&f).arg(&x.buf).arg(&mut x3).arg(&total).run(cfg(((m * k).div_ceil(8 * 256) as u32, 1), 256, 0)).map_err(err("split3_bf16_rows"))?;
                let y = self.scratch::<f32>(3 * m * n)?;
                lt.gemm_bf16(3 * m, n, k, gate.data.ptr(), x3.ptr(), y.ptr()).map_err(fail)?;
                Ok(Some((y, 3)))
            }
            0 if lt.supports_f32(m, n, k) => {
                let y = self.scratch::<f32>(m * n)?;
                lt.gemm_f32(m, n, k, gate.data.ptr(), x.buf.ptr(), y.ptr()).map_err(fail)?;
                Ok(Some((y, 1)))
            }
            _ => Ok(None),
        }
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
