//! The decode GEMVs fused with a neighbouring op (linear.hip's `…_pair` and `…_norm` kernels):
//! - `Backend::linear_pair`: two linears of one input in one launch (MLA's q_a and kv_a): the
//!   second matrix's rows follow the first's in the row groups, each written to its own output;
//! - `Backend::norm_linear`: a linear of an RMS-normed input, the norm folded into the products
//!   (MLA's q_a_layernorm and q_b): y = rsqrt(mean(x²) + eps) · Σ W·(g·x), x² summed by the same
//!   lanes that read x; and the interleaved RoPE of the output (the query's) in its epilogue;
//! - `Backend::norm_linear_kv_entry`: that, with MLA's new cache entries (kv_a's latent normed,
//!   rotated and written: mla_kv_entry.h) done by tail blocks of the same launch.
//!
//! Taken where `linear` would run the 8-row GEMV for every weight involved (at most 8 rows, rows of
//! 16-byte chunks, no BLAS / FP8 / tensor-core path at these rows); elsewhere the ops in turn.
//! At batch 1 each saves a launch a layer (a GEMV of kv_a's 576 rows and a norm of 1,536
//! columns cost ~7 and ~3 µs of a TP8 rank's ~140 µs MoE layer on the H200).
use super::backend::{GpuBackend, GpuTensor, GpuVendor};
use super::device::{err, DevBuf};
use super::gemv::{chunked_rows, gemv_geometry, gemv_kind};
use super::ops::{cfg, kv_entry_one_launch, wdt_suffix, GpuLinear};
use crate::backend::{BackendError, KvEntryOp, RopeSite};

const LIN: &str = "hip-kernels/linear.hip";

/// Whether two weights can share a pair launch: one format, one K, the same scale blocks (FP8),
/// and the first's rows whole row groups (`per_warp`).
pub(super) fn pairable(a: &GpuLinear, b: &GpuLinear, per_warp: usize) -> bool {
    a.wdt == b.wdt && a.inp == b.inp && (a.wdt != 2 || (a.bn == b.bn && a.bk == b.bk)) && a.out.is_multiple_of(per_warp)
}

/// Whether the fused GEMV's epilogue can rotate `r` in an output of `n` columns and `rows` rows:
/// interleaved pairs (an even column and the next, both in one row group: even head stride and
/// offset), the row exactly the heads (the epilogue rotates every head-stride period's rope
/// columns), each head's rope columns inside it, one position a row.
pub(super) fn epilogue_rope(r: &RopeSite, n: usize, rows: usize) -> bool {
    let t = r.tables;
    t.interleaved && r.head_stride.is_multiple_of(2) && r.offset.is_multiple_of(2) && r.heads * r.head_stride == n && r.offset + 2 * t.half <= r.head_stride && r.positions.len() == rows
}

impl<V: GpuVendor> GpuBackend<V> {
    /// Whether `linear(x, w)` runs the 8-row GEMV (linear_into's choices, in its order).
    fn takes_gemv8(&self, x: &GpuTensor, w: &GpuLinear) -> bool {
        (1..=8).contains(&x.rows)
            && x.cols == w.inp
            && chunked_rows(w)
            && !self.blaslt_for(x, w)
            && !self.linear_f8_for(x, w)
            && !self.linear_tc_for(x, w)
            && !(self.mma_gemm && x.rows >= self.tuned.mma_min_rows)
    }

    /// The `_norm` kernels' RoPE arguments for `rope`: its positions (device), inverse
    /// frequencies, head stride, offset and pair count, and scale; null positions for none.
    #[allow(clippy::type_complexity)]
    fn epilogue_rope_args(&self, rope: Option<&RopeSite>) -> Result<((u64, Option<DevBuf<u32>>), u64, [i32; 3], f32), BackendError> {
        Ok(match rope {
            Some(r) => (self.idx(r.positions)?, self.constant(r.tables.inv_freq())?, [r.head_stride, r.offset, r.tables.half].map(|v| v as i32), r.tables.scale()),
            None => ((0, None), 0, [0; 3], 0.0),
        })
    }

    /// (x · aᵀ, x · bᵀ) in one launch, or None where the fused kernel does not apply.
    pub(super) fn linear_pair_gemv(&self, x: &GpuTensor, a: &GpuLinear, b: &GpuLinear) -> Result<Option<(GpuTensor, GpuTensor)>, BackendError> {
        let (kind, per_warp) = gemv_kind(x.rows, a.wdt);
        if !(self.takes_gemv8(x, a) && self.takes_gemv8(x, b) && pairable(a, b, per_warp)) {
            return Ok(None);
        }
        let n = a.out + b.out;
        let (mut ya, mut yb) = (self.alloc_out(x.rows * a.out)?, self.alloc_out(x.rows * b.out)?);
        self.span(self.gemm_class(x.rows, n, a.inp), || {
            let f = self.func(LIN, &format!("{kind}_{}_pair", wdt_suffix(a.wdt)))?;
            let geo = gemv_geometry(n.div_ceil(per_warp), a.inp, a.wdt, self.warp as usize);
            let [m, n, k, sp, lanes, n1] = [x.rows, n, a.inp, geo.split, geo.lanes, a.out].map(|v| v as i32);
            let mut l = self.launch(&f);
            l.arg(&x.buf).arg(&a.data).arg(&a.scales).arg(&mut ya).arg(&m).arg(&n).arg(&k).arg(&a.bn).arg(&a.bk).arg(&sp).arg(&lanes);
            l.arg(&b.data).arg(&b.scales).arg(&mut yb).arg(&n1);
            l.run(cfg((geo.blocks as u32, 1), 256, 0)).map_err(err("linear pair"))
        })?;
        Ok(Some((GpuTensor { rows: x.rows, cols: a.out, buf: ya }, GpuTensor { rows: x.rows, cols: b.out, buf: yb })))
    }

    /// rms_norm(x, g, eps) · wᵀ, then RoPE at `rope`, in one launch, or None where the fused
    /// kernel does not apply (the rotation: interleaved pairs of one row group, every head inside
    /// the output row; otherwise it stays the `rope` op, after the fused product).
    pub(super) fn norm_linear_gemv(&self, x: &GpuTensor, g: &GpuTensor, eps: f32, w: &GpuLinear, rope: Option<&RopeSite>) -> Result<Option<GpuTensor>, BackendError> {
        if !(self.takes_gemv8(x, w) && g.cols == x.cols && g.rows == 1) {
            return Ok(None);
        }
        let (kind, per_warp) = gemv_kind(x.rows, w.wdt);
        let fold = rope.filter(|r| epilogue_rope(r, w.out, x.rows));
        let mut y = GpuTensor { rows: x.rows, cols: w.out, buf: self.alloc_out(x.rows * w.out)? };
        self.span(self.gemm_class(x.rows, w.out, w.inp), || {
            let f = self.func(LIN, &format!("{kind}_{}_norm", wdt_suffix(w.wdt)))?;
            let geo = gemv_geometry(w.out.div_ceil(per_warp), w.inp, w.wdt, self.warp as usize);
            let [m, n, k, sp, lanes] = [x.rows, w.out, w.inp, geo.split, geo.lanes].map(|v| v as i32);
            let (pos, inv, [hs, off, half], scale) = self.epilogue_rope_args(fold)?;
            let mut l = self.launch(&f);
            l.arg(&x.buf).arg(&w.data).arg(&w.scales).arg(&mut y.buf).arg(&m).arg(&n).arg(&k).arg(&w.bn).arg(&w.bk).arg(&sp).arg(&lanes);
            l.arg(&g.buf).arg(&eps).arg(&pos.0).arg(&inv).arg(&hs).arg(&off).arg(&half).arg(&scale);
            l.run(cfg((geo.blocks as u32, 1), 256, 0)).map_err(err("norm linear"))
        })?;
        if let (Some(r), None) = (rope, fold) {
            crate::backend::rope_at(self, &mut y, r)?;
        }
        Ok(Some(y))
    }
}

impl<V: GpuVendor> GpuBackend<V> {
    /// q_b's fused GEMV (`norm_linear_gemv`, its RoPE in the epilogue) with MLA's new cache entries
    /// written by tail blocks of the same launch (one a row, mla_kv_entry.h), or None where either
    /// part would not take its one-launch form.
    pub(super) fn norm_linear_kv_entry_gemv(&self, x: &GpuTensor, g: &GpuTensor, eps: f32, w: &GpuLinear, rope: Option<&RopeSite>, e: &mut KvEntryOp<Self>) -> Result<Option<GpuTensor>, BackendError> {
        let fold = rope.is_none_or(|r| epilogue_rope(r, w.out, x.rows));
        if !(self.takes_gemv8(x, w) && g.cols == x.cols && g.rows == 1 && fold && kv_entry_one_launch(e.latent, e.kv, e.site)) {
            return Ok(None);
        }
        let (kind, per_warp) = gemv_kind(x.rows, w.wdt);
        let mut y = GpuTensor { rows: x.rows, cols: w.out, buf: self.alloc_out(x.rows * w.out)? };
        let (site, kr) = (e.site, e.site.rope);
        self.span(self.gemm_class(x.rows, w.out, w.inp), || {
            let f = self.func(LIN, &format!("{kind}_{}_norm_kv", wdt_suffix(w.wdt)))?;
            let geo = gemv_geometry(w.out.div_ceil(per_warp), w.inp, w.wdt, self.warp as usize);
            let [m, n, k, sp, lanes, gemv_blocks] = [x.rows, w.out, w.inp, geo.split, geo.lanes, geo.blocks].map(|v| v as i32);
            let (pos, inv, [hs, off, half], scale) = self.epilogue_rope_args(rope)?;
            let (kpos, kslots, kinv) = (self.idx(site.positions)?, self.idx(site.slots)?, self.constant(kr.inv_freq())?);
            let [kn, koff, khalf, kil, kbf16, klayer, knum_slots, kentry] = [e.norm.cols, site.offset, kr.half, kr.interleaved as usize, e.kv.bf16 as usize, site.layer, e.kv.slots, e.kv.entry].map(|v| v as i32);
            let (keps, kscale) = (e.eps, kr.scale());
            let mut l = self.launch(&f);
            l.arg(&x.buf).arg(&w.data).arg(&w.scales).arg(&mut y.buf).arg(&m).arg(&n).arg(&k).arg(&w.bn).arg(&w.bk).arg(&sp).arg(&lanes);
            l.arg(&g.buf).arg(&eps).arg(&pos.0).arg(&inv).arg(&hs).arg(&off).arg(&half).arg(&scale);
            l.arg(&mut e.latent.buf).arg(&e.norm.buf).arg(&kn).arg(&keps).arg(&kpos.0).arg(&kinv).arg(&koff).arg(&khalf).arg(&kil).arg(&kscale);
            l.arg(&mut e.kv.buf).arg(&kbf16).arg(&kslots.0).arg(&klayer).arg(&knum_slots).arg(&kentry).arg(&gemv_blocks);
            l.run(cfg(((geo.blocks + e.latent.rows) as u32, 1), 256, 0)).map_err(err("norm linear with cache entries"))
        })?;
        Ok(Some(y))
    }
}

#[cfg(test)]
mod tests {
    use super::epilogue_rope;
    use crate::backend::RopeSite;
    use crate::config::{Fields, RopeConfig, RopeTables};

    #[test]
    fn the_epilogue_rotates_interleaved_pairs_of_whole_heads_only() {
        let cfg = serde_json::json!({"rope_theta": 10000.0});
        let tables = |il| RopeTables::new(&RopeConfig::parse(&Fields::new("t", &cfg).unwrap(), 64, 4096, il).unwrap());
        let (il, half) = (tables(true), tables(false));
        let pos = [3u32, 9];
        let site = |t, heads, hs, off| RopeSite { positions: &pos, heads, head_stride: hs, offset: off, tables: t };
        // V3's q_b at a TP8 rank: 16 heads of 192, the last 64 rotary
        assert!(epilogue_rope(&site(&il, 16, 192, 128), 3072, 2));
        // rotate-half pairs lie 32 columns apart: the rope op
        assert!(!epilogue_rope(&site(&half, 16, 192, 128), 3072, 2));
        // an output wider than the heads, an odd offset or head stride, rope columns past the head,
        // a position count other than the rows: the rope op
        assert!(!epilogue_rope(&site(&il, 15, 192, 128), 3072, 2));
        assert!(!epilogue_rope(&site(&il, 16, 192, 127), 3072, 2));
        assert!(!epilogue_rope(&site(&il, 16, 191, 126), 3056, 2));
        assert!(!epilogue_rope(&site(&il, 16, 192, 130), 3072, 2));
        assert!(!epilogue_rope(&site(&il, 16, 192, 128), 3072, 1));
    }
}
