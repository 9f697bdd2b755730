//! Dynamic FP8 activation quantisation on the device (hip-kernels/act_quant.hip): x, SiLU(gate) ·
//! up, or the halves of a joint gate / up product, per token and 128 channels into e4m3 codes and
//! scales for the block-scaled FP8 GEMMs; and the scope in which one tensor's codes are made once
//! and shared (`share_act_codes`: a MoE layer's routed and shared experts).
use std::sync::{Arc, Mutex};

use super::backend::{GpuBackend, GpuTensor, GpuVendor};
use super::device::{err, DevBuf, DevPtr};
use super::ops::cfg;
use crate::backend::BackendError;

const ACT_QUANT: &str = "hip-kernels/act_quant.hip";
/// Rows a block of the activation quantiser takes from QUANT_RPB_MIN_ROWS rows (act_quant.hip's
/// QUANT_MAX_RPB at most)
const QUANT_RPB: usize = 4;
const QUANT_RPB_MIN_ROWS: usize = 1024;

/// What the activation quantiser reads: x, SiLU(x) · up, or SiLU(gate) · up from one buffer's
/// row halves.
enum QuantIn<'a> {
    X,
    SiluMul(&'a DevBuf<f32>),
    Halves,
}

/// An activation's FP8 codes [rows, cols] and per-token, per-128-channel scales
/// [ceil(cols/128), rows] (`quantize_act_fp8`).
pub struct ActCodes {
    pub q: DevBuf<u8>,
    pub s: DevBuf<f32>,
}

/// The tensor whose codes `share_act_codes` shares (its buffer, rows, columns) and the codes
/// made for it so far, by rows.
type MemoKey = (DevPtr, usize, usize);

/// The codes made for the memo's tensor, by the rows they were padded to.
type Kept = Vec<(usize, Arc<ActCodes>)>;

/// `share_act_codes`' memo: open for one tensor at a time.
#[derive(Default)]
pub struct ActMemo(Mutex<Option<(MemoKey, Kept)>>);

impl ActMemo {
    /// Opens the memo for `key`; false where it is open already (an enclosing scope's).
    fn open(&self, key: MemoKey) -> bool {
        let mut m = self.0.lock().unwrap();
        if m.is_some() {
            return false;
        }
        *m = Some((key, Vec::new()));
        true
    }

    fn close(&self) {
        *self.0.lock().unwrap() = None;
    }

    /// Opens the memo for `key` until the scope returned is dropped (an enclosing scope's stays:
    /// its tensor's codes only).
    fn scope(&self, key: MemoKey) -> MemoScope<'_> {
        MemoScope(self, self.open(key))
    }

    fn lookup(&self, (p, r, c, rows): (DevPtr, usize, usize, usize)) -> Option<Arc<ActCodes>> {
        let m = self.0.lock().unwrap();
        let (key, kept) = m.as_ref()?;
        (*key == (p, r, c)).then(|| kept.iter().find(|e| e.0 == rows).map(|e| e.1.clone()))?
    }

    fn keep(&self, (p, r, c, rows): (DevPtr, usize, usize, usize), codes: &Arc<ActCodes>) {
        if let Some((key, kept)) = self.0.lock().unwrap().as_mut() {
            if *key == (p, r, c) {
                kept.push((rows, codes.clone()));
            }
        }
    }
}

/// An open memo, closed on drop (also when the scope unwinds: no codes outlive their tensor's
/// borrow).
struct MemoScope<'a>(&'a ActMemo, bool);

impl Drop for MemoScope<'_> {
    fn drop(&mut self) {
        if self.1 {
            self.0.close();
        }
    }
}

impl<V: GpuVendor> GpuBackend<V> {
    /// x → (q [rows, cols] e4m3fn, scales [ceil(cols/128), rows]): dynamic per-token, per-128
    /// channel activation quantisation (hip-kernels/act_quant.hip; cols % 4 == 0), `rows` ≥
    /// x.rows of them (rows past x's are zeros with the floor scale). Inside `share_act_codes(x,
    /// ..)` the first quantisation of x to `rows` rows is kept and handed to later calls.
    pub fn quantize_act_fp8(&self, x: &GpuTensor, rows: usize) -> Result<Arc<ActCodes>, BackendError> {
        if rows < x.rows {
            return Err(self.op_err("quant_fp8_act", format!("{} rows into {rows}", x.rows)));
        }
        let key = (x.buf.ptr(), x.rows, x.cols, rows);
        if let Some(c) = self.act_memo.lookup(key) {
            return Ok(c);
        }
        let (q, s) = self.quant_fp8_rows(x, rows, 0, 0)?;
        let c = Arc::new(ActCodes { q, s });
        self.act_memo.keep(key, &c);
        Ok(c)
    }

    /// `f()` with x's FP8 codes shared: every `quantize_act_fp8` of x inside it after the first
    /// (to the same rows) returns the first's codes, which are the same values (the same
    /// quantiser on the same x, which nothing writes while it is borrowed here). A MoE layer's
    /// routed and shared experts both quantise the layer's input.
    pub(super) fn share_act_codes<R>(&self, x: &GpuTensor, f: impl FnOnce() -> R) -> R {
        let _scope = self.act_memo.scope((x.buf.ptr(), x.rows, x.cols));
        f()
    }

    /// The quantiser with its row map: output row r is x's row src[r] (0: r itself; negative:
    /// zeros), in segments seg[2r], seg[2r + 1] (0: one segment) that each get their own [L, len]
    /// block of scales (act_quant.hip).
    pub(super) fn quant_fp8_rows(&self, x: &GpuTensor, rows: usize, src: DevPtr, seg: DevPtr) -> Result<(DevBuf<u8>, DevBuf<f32>), BackendError> {
        self.quant_fp8_launch(x, QuantIn::X, rows, src, seg)
    }

    /// `quant_fp8_rows` with a row map, from x's own codes gathered (act_quant.hip's
    /// gather_fp8_rows): the same codes and scales for a quarter of the reads where rows repeat
    /// x's (the MoE prefill's pairs), and x's codes, made by `quantize_act_fp8`, are those a
    /// `share_act_codes` scope hands the layer's shared experts too. Tuned off, or columns not a
    /// multiple of 16: `quant_fp8_rows`.
    pub(super) fn quant_fp8_gather(&self, x: &GpuTensor, rows: usize, src: DevPtr, seg: DevPtr) -> Result<(DevBuf<u8>, DevBuf<f32>), BackendError> {
        let k = x.cols;
        if !self.tuned.moe_gather_codes || !k.is_multiple_of(16) || x.rows == 0 {
            return self.quant_fp8_rows(x, rows, src, seg);
        }
        // (the rows the GEMM library's shared-codes path quantises x to: the same codes)
        let m = x.rows.next_multiple_of(4);
        let c = self.quantize_act_fp8(x, m)?;
        let mut q = self.scratch::<u8>(rows * k)?;
        let mut s = self.scratch::<f32>(k.div_ceil(crate::weights::act_quant::ACT_GROUP) * rows)?;
        let f = self.func(ACT_QUANT, "gather_fp8_rows")?;
        let (mi, ri, ki) = (m as i32, rows as i32, k as i32);
        let mut b = self.launch(&f);
        b.arg(&c.q).arg(&c.s).arg(&mut q).arg(&mut s).arg(&mi).arg(&ri).arg(&ki).arg(&src).arg(&seg);
        b.run(cfg((rows as u32, 1), 256, 0)).map_err(err("gather_fp8_rows"))?;
        Ok((q, s))
    }

    /// The quantiser of SiLU(gate) · up (both [rows, cols] f32; act_quant.hip's
    /// quant_fp8_silu_act), in segments as `quant_fp8_rows`.
    pub(super) fn quant_fp8_silu_rows(&self, gate: &GpuTensor, up: &DevBuf<f32>, seg: DevPtr) -> Result<(DevBuf<u8>, DevBuf<f32>), BackendError> {
        self.quant_fp8_launch(gate, QuantIn::SiluMul(up), gate.rows, 0, seg)
    }

    /// The same of `gu` [rows, 2K] holding gate and up side by side (an MLP's joint GEMM):
    /// codes [rows, K] (act_quant.hip's quant_fp8_silu_halves).
    pub(super) fn quant_fp8_silu_halves(&self, gu: &GpuTensor) -> Result<(DevBuf<u8>, DevBuf<f32>), BackendError> {
        self.quant_fp8_launch(gu, QuantIn::Halves, gu.rows, 0, 0)
    }

    fn quant_fp8_launch(&self, x: &GpuTensor, input: QuantIn, rows: usize, src: DevPtr, seg: DevPtr) -> Result<(DevBuf<u8>, DevBuf<f32>), BackendError> {
        let (m, k) = (x.rows, if matches!(input, QuantIn::Halves) { x.cols / 2 } else { x.cols });
        if !k.is_multiple_of(4) {
            return Err(self.op_err("quant_fp8_act", format!("{m}x{k}: the columns must be a multiple of 4")));
        }
        let mut q = self.scratch::<u8>(rows * k)?;
        let mut s = self.scratch::<f32>(k.div_ceil(crate::weights::act_quant::ACT_GROUP) * rows)?;
        let name = match input {
            QuantIn::X => "quant_fp8_act",
            QuantIn::SiluMul(_) => "quant_fp8_silu_act",
            QuantIn::Halves => "quant_fp8_silu_halves",
        };
        let f = self.func(ACT_QUANT, name)?;
        let (mi, ri, ki) = (m as i32, rows as i32, k as i32);
        // rows a block: one for decode sizes (the most blocks for the few rows), several from
        // QUANT_RPB_MIN_ROWS (more loads in flight: the MoE prefill's gather of ~33K rows)
        let rpb = if rows >= QUANT_RPB_MIN_ROWS { QUANT_RPB } else { 1 };
        let rpb_i = rpb as i32;
        let mut b = self.launch(&f);
        b.arg(&x.buf);
        if let QuantIn::SiluMul(u) = input {
            b.arg(u);
        }
        b.arg(&mut q).arg(&mut s).arg(&mi).arg(&ri).arg(&ki).arg(&src).arg(&seg).arg(&rpb_i).run(cfg((rows.div_ceil(rpb) as u32, k.div_ceil(1024) as u32), 256, 0)).map_err(err(name))?;
        Ok((q, s))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_quantiser_s_rows_a_block_fit_its_kernel() {
        let src = include_str!("../../../hip-kernels/act_quant.hip");
        let at = src.find("#define QUANT_MAX_RPB ").unwrap() + "#define QUANT_MAX_RPB ".len();
        let max: usize = src[at..].split_whitespace().next().unwrap().parse().unwrap();
        assert!((1..=max).contains(&super::QUANT_RPB));
    }
}
