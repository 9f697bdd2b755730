//! FP8 layers at prefill sizes that read one input: quantised once (and, where they were uploaded
//! as one layer, one GEMM: joint.rs). Under `--fp8-activations
//! dynamic` each FP8 linear quantises its input (per token and 128 channels, act_quant.hip)
//! before cuBLASLt's block-scaled GEMM; MLA's q_a and kv_a read the same normed x, an MLP's gate
//! and up the same x, and the MLP's down projection SiLU(gate) · up, which the quantiser can
//! compute itself (`quant_fp8_silu_act`: the same expression as silu_mul, so the codes are the
//! same). Here those inputs are quantised once and the GEMMs read the codes; the results are the
//! ops' results bit for bit (the same quantiser on the same values, the same GEMMs). A MoE
//! layer's shared experts add their down projection into y as the GEMM's C (beta 1) where the
//! library offers it, instead of a separate add.
use super::backend::{GpuBackend, GpuTensor, GpuVendor};
use super::ops::GpuLinear;
use super::device::DevBuf;
use crate::backend::BackendError;

impl<V: GpuVendor> GpuBackend<V> {
    /// Whether `linear(x, w)` would quantise x and run the block-scaled FP8 GEMM on exactly x's
    /// rows (no padding: a multiple of 4, the library's step), the path that can share codes.
    pub fn shares_fp8_codes(&self, x: &GpuTensor, w: &GpuLinear) -> bool {
        self.shares_fp8_rows(x.rows, x.cols, w)
    }

    /// The same for an input of `rows` × `cols`.
    pub(super) fn shares_fp8_rows(&self, rows: usize, cols: usize, w: &GpuLinear) -> bool {
        w.wdt == 2
            && rows.is_multiple_of(4)
            && cols == w.inp
            && !self.linear_f8s_rows(rows, w)
            && self.blaslt_rows(rows, w)
            && self.fp8_act_for(w)
            && self.blaslt.as_ref().is_some_and(|lt| lt.supports_fp8_block(rows, w.out, w.inp))
    }

    /// codes · wᵀ for `rows` quantised rows (`quantize_act_fp8`'s codes and scales).
    pub(super) fn gemm_codes(&self, codes: (&DevBuf<u8>, &DevBuf<f32>), rows: usize, w: &GpuLinear) -> Result<GpuTensor, BackendError> {
        let y = self.alloc_out(rows * w.out)?;
        self.span(self.gemm_class(rows, w.out, w.inp), || self.gemm_fp8_codes(codes, rows, w, y.ptr()))?;
        Ok(GpuTensor { rows, cols: w.out, buf: y })
    }

    /// (x · firstᵀ, x · secondᵀ) from one quantisation of x, where both take the shared path.
    pub(super) fn linear_pair_codes(&self, x: &GpuTensor, first: &GpuLinear, second: &GpuLinear) -> Result<Option<(GpuTensor, GpuTensor)>, BackendError> {
        Ok(match self.pair_codes(x, first, second, x.rows <= JOINT_SPLIT_MAX_ROWS)? {
            None => None,
            Some(Pair::Apart(a, b)) => Some((a, b)),
            Some(Pair::Joint(y)) => Some(self.span("other", || self.split_cols(&y, first.out))?),
        })
    }

    /// Both products from one quantisation of x: one GEMM of their joint layer (joint.rs) where
    /// they were uploaded as one, it takes the shared path too and `joint` allows, else a GEMM
    /// each.
    fn pair_codes(&self, x: &GpuTensor, first: &GpuLinear, second: &GpuLinear, joint: bool) -> Result<Option<Pair>, BackendError> {
        if !self.shares_fp8_codes(x, first) || !self.shares_fp8_codes(x, second) {
            return Ok(None);
        }
        let c = self.span(self.gemm_class(x.rows, first.out, first.inp), || self.quantize_act_fp8(x, x.rows))?;
        if let Some(j) = Self::joint_of(first, second).filter(|j| joint && self.shares_fp8_codes(x, j)) {
            return Ok(Some(Pair::Joint(self.gemm_codes((&c.q, &c.s), x.rows, j)?)));
        }
        Ok(Some(Pair::Apart(self.gemm_codes((&c.q, &c.s), x.rows, first)?, self.gemm_codes((&c.q, &c.s), x.rows, second)?)))
    }

    /// down(SiLU(x · gateᵀ) · (x · upᵀ)) with x quantised once for gate and up, and the product
    /// quantised in the pass that computes it where down takes the shared path too.
    pub(super) fn mlp_codes(&self, x: &GpuTensor, gate: &GpuLinear, up: &GpuLinear, down: &GpuLinear) -> Result<Option<GpuTensor>, BackendError> {
        Ok(match self.mlp_down_codes(x, gate, up, down)? {
            None => None,
            Some(Down::Codes(q, s, rows)) => Some(self.gemm_codes((&q, &s), rows, down)?),
            Some(Down::Done(y)) => Some(y),
        })
    }

    /// `y += mlp_codes(x, ..)`, the down projection added as the GEMM's C where the library
    /// offers it; false (nothing done) where gate and up do not share codes.
    pub(super) fn mlp_add_codes(&self, x: &GpuTensor, gate: &GpuLinear, up: &GpuLinear, down: &GpuLinear, y: &mut GpuTensor) -> Result<bool, BackendError> {
        if (y.rows, y.cols) != (x.rows, down.out) {
            return Ok(false);
        }
        let h = match self.mlp_down_codes(x, gate, up, down)? {
            None => return Ok(false),
            Some(Down::Done(h)) => h,
            Some(Down::Codes(q, s, rows)) => {
                let lt = self.blaslt.as_ref().expect("shares_fp8_codes checked");
                let added = self.span(self.gemm_class(rows, down.out, down.inp), || Ok(lt.gemm_fp8_block_add((rows, down.out, down.inp), (down.data.ptr(), down.scales.ptr()), (q.ptr(), s.ptr()), y.buf.ptr())))?;
                match added {
                    Ok(()) => return Ok(true),
                    Err(e) => log::debug!("{e}: the shared experts' down projection is added separately"),
                }
                self.gemm_codes((&q, &s), rows, down)?
            }
        };
        crate::backend::Backend::add(self, y, &h)?;
        Ok(true)
    }

    /// The MLP up to its down projection: that projection's input codes where it shares the path,
    /// else its output by the ops; None where gate and up do not share codes.
    fn mlp_down_codes(&self, x: &GpuTensor, gate: &GpuLinear, up: &GpuLinear, down: &GpuLinear) -> Result<Option<Down>, BackendError> {
        let (g, u) = match self.pair_codes(x, gate, up, true)? {
            None => return Ok(None),
            Some(Pair::Apart(g, u)) => (g, u),
            // gate and up side by side: quantised from there where down takes the codes
            Some(Pair::Joint(gu)) if self.shares_fp8_rows(gu.rows, gate.out, down) => {
                let (q, s) = self.span("activation", || self.quant_fp8_silu_halves(&gu))?;
                return Ok(Some(Down::Codes(q, s, gu.rows)));
            }
            Some(Pair::Joint(gu)) => self.span("other", || self.split_cols(&gu, gate.out))?,
        };
        if !self.shares_fp8_codes(&g, down) {
            let h = crate::backend::Backend::silu_mul(self, &g, &u)?;
            return Ok(Some(Down::Done(crate::backend::Backend::linear(self, &h, down)?)));
        }
        let (q, s) = self.span("activation", || self.quant_fp8_silu_rows(&g, &u.buf, 0))?;
        Ok(Some(Down::Codes(q, s, g.rows)))
    }
}

/// The most rows whose joint GEMM is split into two outputs (`linear_pair_codes`): the copy
/// moves 2 × 4 × (out₁ + out₂) bytes a row, which at decode sizes costs less than the second
/// GEMM's split-K reduction and tail (V3's q_a + kv_a at 256 rows: 24.7 µs against 40.4, the copy
/// 3.6 of it) but at prefill sizes more than one GEMM saves (32,768 rows: the copy 261 µs).
const JOINT_SPLIT_MAX_ROWS: usize = 1024;

/// `pair_codes`' products: apart, or side by side from the joint layer's GEMM.
enum Pair {
    Apart(GpuTensor, GpuTensor),
    Joint(GpuTensor),
}

/// Where `mlp_down_codes` left the down projection.
enum Down {
    /// its input's codes and scales, and the rows
    Codes(DevBuf<u8>, DevBuf<f32>, usize),
    /// its output (the ops ran it)
    Done(GpuTensor),
}
