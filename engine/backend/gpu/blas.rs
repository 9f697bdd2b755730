//! Linear layers through the vendor's GEMM library (cuBLASLt on CUDA, hipBLASLt on ROCm;
//! dynamically loaded, absent → the own kernels): bf16 weights from a few rows, FP8 weights at
//! prefill sizes. The f32 activations are split into bf16 hi and lo parts stacked as one [2M, K]
//! operand, so one GEMM reads W once and gives both products in f32. bf16 weights are exact in
//! bf16; an FP8 weight with its block scales is dequantised into bf16 hi + lo copies first (a
//! scratch of 4 bytes per weight) and a second GEMM adds x_hi · W_loᵀ. A fixed-order sum of the
//! products gives y with ~16 bits of x and W like the own tensor-core path (~1e-5 relative), not
//! bf16's ~4e-3. With `--fp8-activations dynamic` FP8 layers instead quantise x per token and 128
//! channels (SGLang's numerics) and run the library's block-scaled FP8 GEMM where it has one, and
//! bf16 layers take x_hi alone (SGLang's bf16 hidden states).
use std::collections::HashMap;
use std::sync::Mutex;

use super::backend::{GpuBackend, GpuTensor, GpuVendor};
use super::device::{err, DevBuf, DevPtr};
use super::ops::{cfg, GpuLinear};
use crate::backend::BackendError;

const EW: &str = "hip-kernels/elementwise.hip";

/// A matmul descriptor attribute's value, as cuBLASLt's and hipBLASLt's `...MatmulDescSetAttribute`
/// take it: a pointer to the value and its size.
pub enum DescAttr {
    I32(i32),
    Ptr(DevPtr),
}

impl DescAttr {
    pub fn raw(&self) -> (*const std::ffi::c_void, usize) {
        match self {
            DescAttr::I32(x) => (x as *const i32 as *const std::ffi::c_void, 4),
            DescAttr::Ptr(x) => (x as *const u64 as *const std::ffi::c_void, 8),
        }
    }
}

/// A vendor GEMM library as the backend uses it.
pub trait GemmLib: Send + Sync {
    /// "cuBLASLt", "hipBLASLt"
    fn name(&self) -> &'static str;
    /// Whether the library has an algorithm for this shape (the plan is made on the first call
    /// for a shape, outside any graph capture, and kept).
    fn supports(&self, m2: usize, n: usize, k: usize) -> bool;
    /// D [m2, n] (row-major f32) = X2 [m2, k] (row-major bf16) · W [n, k]ᵀ (row-major bf16), on
    /// the backend's stream, with the plan `supports` made.
    fn gemm_bf16(&self, m2: usize, n: usize, k: usize, w: DevPtr, x2: DevPtr, d: DevPtr) -> Result<(), String>;
    /// Whether the library has an f32 × f32 → f32 GEMM (f32 products and sums, no TF32) for
    /// this shape (`gemm_f32`; the plan is made on the first call, as for `supports`).
    fn supports_f32(&self, _m: usize, _n: usize, _k: usize) -> bool {
        false
    }
    /// D [m, n] (row-major f32) = X [m, k] (row-major f32) · W [n, k]ᵀ (row-major f32), on the
    /// backend's stream, with the plan `supports_f32` made.
    fn gemm_f32(&self, _m: usize, _n: usize, _k: usize, _w: DevPtr, _x: DevPtr, _d: DevPtr) -> Result<(), String> {
        Err(format!("{} has no f32 GEMM here", self.name()))
    }
    /// Whether the library has a block-scaled FP8 GEMM for this shape (`gemm_fp8_block`; the
    /// plan is made on the first call, as for `supports`).
    fn supports_fp8_block(&self, _m: usize, _n: usize, _k: usize) -> bool {
        false
    }
    /// D [m, n] (row-major f32) = (xq · xs) · (W · ws)ᵀ: xq [m, k] e4m3fn row-major with xs one f32
    /// per token and 128 columns, stored [ceil(k/128), m]; W [n, k] e4m3fn row-major with ws one
    /// f32 per 128×128 block, [ceil(n/128), ceil(k/128)] row-major (the checkpoint's scales). On
    /// `stream` (0: the backend's; else one of its side streams, with a workspace of its own).
    fn gemm_fp8_block(&self, _shape: (usize, usize, usize), _w: (DevPtr, DevPtr), _x: (DevPtr, DevPtr), _d: DevPtr, _stream: super::device::Handle) -> Result<(), String> {
        Err(format!("{} has no block-scaled FP8 GEMM here", self.name()))
    }
    /// Whether the library has the block-scaled FP8 GEMM with a bf16 D for this shape
    /// (`gemm_fp8_block_bf16`; the plan is made on the first call, as for `supports`).
    fn supports_fp8_block_bf16(&self, _m: usize, _n: usize, _k: usize) -> bool {
        false
    }
    /// `gemm_fp8_block`'s product rounded to bf16 (nearest even): D [m, n] row-major bf16, on
    /// the backend's stream.
    fn gemm_fp8_block_bf16(&self, _shape: (usize, usize, usize), _w: (DevPtr, DevPtr), _x: (DevPtr, DevPtr), _d: DevPtr) -> Result<(), String> {
        Err(format!("{} has no block-scaled FP8 GEMM into bf16 here", self.name()))
    }
    /// D += the product of `gemm_fp8_block` (D read as C, beta 1), on the backend's stream; an
    /// error (nothing launched) where the library does not offer it, and the caller adds.
    fn gemm_fp8_block_add(&self, _shape: (usize, usize, usize), _w: (DevPtr, DevPtr), _x: (DevPtr, DevPtr), _d: DevPtr) -> Result<(), String> {
        Err(format!("{} adds no block-scaled FP8 product into D here", self.name()))
    }
}

/// A GEMM library's plans per shape (2M, N, K): made on a shape's first use (outside any graph
/// capture) and kept; None where the library offered no algorithm, so the own kernel runs it.
pub struct PlanCache<P>(Mutex<HashMap<(usize, usize, usize), Option<P>>>);

impl<P> Default for PlanCache<P> {
    fn default() -> Self {
        PlanCache(Mutex::new(HashMap::new()))
    }
}

impl<P> PlanCache<P> {
    /// Whether `shape` has a plan, making it with `make` the first time.
    pub fn supports(&self, shape: (usize, usize, usize), make: impl FnOnce() -> Result<P, String>) -> bool {
        let mut plans = self.0.lock().unwrap();
        let (m2, n, k) = shape;
        plans.entry(shape).or_insert_with(|| make().inspect_err(|e| log::warn!("{e}; a GEMM of {m2}x{n}x{k} (x rows as bf16 hi + lo) was needed, so that layer runs on the engine's own kernel")).ok()).is_some()
    }

    /// `f` on the plan `supports` made for `shape`.
    pub fn with<R>(&self, shape: (usize, usize, usize), f: impl FnOnce(&P) -> R) -> Result<R, String> {
        let plans = self.0.lock().unwrap();
        let (m2, n, k) = shape;
        plans.get(&shape).and_then(|p| p.as_ref()).map(f).ok_or_else(|| format!("no plan for {m2}x{n}x{k}"))
    }

    /// Every plan made, for the library to destroy.
    pub fn drain(&self) -> Vec<P> {
        self.0.lock().unwrap().drain().filter_map(|(_, p)| p).collect()
    }
}

impl<V: GpuVendor> GpuBackend<V> {
    /// Whether this linear layer goes through the GEMM library: bf16 weights from a few rows, FP8
    /// ones from prefill sizes (where the GEMM's work outweighs the dequantised copy), and rows
    /// of W and D that start on 16-byte boundaries (odd shapes take the own kernel).
    pub(super) fn blaslt_for(&self, x: &GpuTensor, w: &GpuLinear) -> bool {
        self.blaslt_rows(x.rows, w)
    }

    /// The same for `rows` rows of input.
    pub(super) fn blaslt_rows(&self, rows: usize, w: &GpuLinear) -> bool {
        let min_rows = match w.wdt {
            1 => self.tuned.cublaslt_min_rows,
            2 if self.fp8_act_for(w) => self.tuned.blaslt_fp8_act_min_rows,
            2 => self.tuned.blaslt_fp8_min_rows,
            _ => return false,
        };
        self.blaslt.is_some() && rows >= min_rows && w.inp.is_multiple_of(8) && w.out.is_multiple_of(4)
    }

    /// Whether this FP8 layer's input is quantised to FP8 (`--fp8-activations dynamic` and a
    /// shape the block-scaled GEMM takes).
    pub(super) fn fp8_act_for(&self, w: &GpuLinear) -> bool {
        self.fp8_act && fp8_block_ok(w.out, w.inp, w.bn, w.bk)
    }

    /// D [rows, w.out] = codes · Wᵀ for `rows` quantised rows (`quantize_act_fp8`'s codes and
    /// scales) by the library's block-scaled FP8 GEMM, on the backend's stream.
    pub(super) fn gemm_fp8_codes(&self, (q, s): (&DevBuf<u8>, &DevBuf<f32>), rows: usize, w: &GpuLinear, d: DevPtr) -> Result<(), BackendError> {
        let lt = self.blaslt.as_ref().expect("the caller checked supports_fp8_block");
        lt.gemm_fp8_block((rows, w.out, w.inp), (w.data.ptr(), w.scales.ptr()), (q.ptr(), s.ptr()), d, 0).map_err(|msg| self.op_err("blaslt", format!("{}: {msg}", lt.name())))
    }

    /// y [rows, w.out] = x · Wᵀ rounded to bf16, for an FP8 layer under `--fp8-activations
    /// dynamic`: the library's block-scaled GEMM writing bf16 where it has one (x quantised as
    /// `linear` does), else `linear`'s f32 product rounded by `to_bf16`: the same codes and
    /// products either way, one rounding.
    pub(super) fn linear_bf16_out(&self, x: &GpuTensor, w: &GpuLinear) -> Result<DevBuf<u16>, BackendError> {
        let (m, n, k) = (x.rows, w.out, w.inp);
        let mut y = self.scratch::<u16>((m * n).max(1))?;
        let lib = self.blaslt.as_ref().filter(|lt| w.wdt == 2 && self.blaslt_rows(m, w) && self.fp8_act_for(w) && m.is_multiple_of(4) && lt.supports_fp8_block_bf16(m, n, k));
        if let Some(lt) = lib {
            let c = self.quantize_act_fp8(x, m)?;
            lt.gemm_fp8_block_bf16((m, n, k), (w.data.ptr(), w.scales.ptr()), (c.q.ptr(), c.s.ptr()), y.ptr()).map_err(|msg| self.op_err("blaslt", format!("{}: {msg}", lt.name())))?;
            return Ok(y);
        }
        let f32_out = self.linear_with(x, w, true)?;
        self.to_bf16(&f32_out.buf, &mut y, m * n)?;
        Ok(y)
    }

    /// out[..n] = x[..n] rounded to bf16 (nearest even).
    pub(super) fn to_bf16(&self, x: &DevBuf<f32>, out: &mut DevBuf<u16>, n: usize) -> Result<(), BackendError> {
        if n == 0 {
            return Ok(());
        }
        let f = self.func(EW, "to_bf16")?;
        let total = n as i64;
        self.launch(&f).arg(x).arg(out).arg(&total).run(cfg((n.div_ceil(8 * 256) as u32, 1), 256, 0)).map_err(err("to_bf16"))
    }

    /// y = x · Wᵀ through the GEMM library; false (nothing launched) where it has no algorithm
    /// for the shape.
    pub(super) fn linear_blaslt(&self, x: &GpuTensor, w: &GpuLinear, y: &mut DevBuf<f32>) -> Result<bool, BackendError> {
        let lt = self.blaslt.as_ref().expect("blaslt_for checked");
        let (m, n, k) = (x.rows, w.out, w.inp);
        let fp8 = w.wdt == 2;
        // the library wants a multiple of 4 tokens: padded rows are zeros, their products dropped
        let m4 = m.next_multiple_of(4);
        if fp8 && self.fp8_act_for(w) && lt.supports_fp8_block(m4, n, k) {
            let c = self.quantize_act_fp8(x, m4)?;
            let (q, s) = (&c.q, &c.s);
            if m4 == m {
                self.gemm_fp8_codes((q, s), m, w, y.ptr())?;
            } else {
                let d = self.scratch::<f32>(m4 * n)?;
                self.gemm_fp8_codes((q, s), m4, w, d.ptr())?;
                self.dev.dtod(y.ptr(), d.ptr(), 4 * m * n).map_err(err("copy"))?;
            }
            return Ok(true);
        }
        // bf16 weights under `--fp8-activations dynamic`: x_hi alone, straight into y
        let hi_only = !fp8 && self.bf16_act;
        if !lt.supports(if hi_only { m } else { 2 * m }, n, k) || (fp8 && !lt.supports(m, n, k)) {
            return Ok(false);
        }
        // x → [hi rows; lo rows] in bf16
        let mut x2 = self.scratch::<u16>(2 * m * k)?;
        let f = self.func(EW, "split_bf16_rows")?;
        let total = (m * k) as i64;
        self.launch(&f).arg(&x.buf).arg(&mut x2).arg(&total).run(cfg(((m * k).div_ceil(256) as u32, 1), 256, 0)).map_err(err("split_bf16_rows"))?;
        let gemm = |rows: usize, w: DevPtr, d: DevPtr| lt.gemm_bf16(rows, n, k, w, x2.ptr(), d).map_err(|msg| self.op_err("blaslt", format!("{}: {msg}", lt.name())));
        if hi_only {
            gemm(m, w.data.ptr(), y.ptr())?;
            return Ok(true);
        }
        // products: [x_hi · Wᵀ; x_lo · Wᵀ] (+ x_hi · W_loᵀ for FP8), each [m, n]
        let parts = if fp8 { 3 } else { 2 };
        let d = self.scratch::<f32>(parts * m * n)?;
        if fp8 {
            let mut whl = self.scratch::<u16>(2 * n * k)?;
            let f = self.func(EW, "dequant_fp8_hilo")?;
            let (ni, ki) = (n as i32, k as i32);
            let c = cfg(((n * k / 4).div_ceil(256) as u32, 1), 256, 0);
            self.launch(&f).arg(&w.data).arg(&w.scales).arg(&mut whl).arg(&ni).arg(&ki).arg(&w.bn).arg(&w.bk).run(c).map_err(err("dequant_fp8_hilo"))?;
            gemm(2 * m, whl.ptr(), d.ptr())?;
            gemm(m, whl.ptr() + (2 * n * k) as u64, d.ptr() + (8 * m * n) as u64)?;
        } else {
            gemm(2 * m, w.data.ptr(), d.ptr())?;
        }
        self.split_sum(&d, y, m * n, parts)?;
        Ok(true)
    }
}

/// Shapes the block-scaled FP8 GEMM takes: DeepSeek's 128×128 weight blocks, rows of 16 bytes,
/// and a whole number of 16-byte rows of weight scales (the library reads them with that pitch).
pub(super) fn fp8_block_ok(out: usize, inp: usize, bn: i32, bk: i32) -> bool {
    bn == 128 && bk == 128 && inp.is_multiple_of(16) && out.is_multiple_of(16) && inp.div_ceil(128).is_multiple_of(4)
}


#[cfg(test)]
mod tests {
    use super::{fp8_block_ok, PlanCache};

    #[test]
    fn block_scaled_fp8_takes_every_v3_layer_but_not_all_tp8_slices() {
        // (out, in) of V3's FP8 linears: q_a, q_b, kv_a, kv_b, o, dense gate/up and down, experts
        for (n, k) in [(1536, 7168), (24576, 1536), (576, 7168), (32768, 512), (7168, 16384), (18432, 7168), (7168, 18432), (2048, 7168), (7168, 2048)] {
            assert!(fp8_block_ok(n, k, 128, 128), "{n}x{k}");
        }
        // a TP8 rank: the dense down projection's 2304 inputs have 18 scale columns (not a
        // multiple of 4) and the experts' 256-wide intermediate 2; other block sizes never
        assert!(!fp8_block_ok(7168, 2304, 128, 128));
        assert!(!fp8_block_ok(7168, 256, 128, 128));
        assert!(!fp8_block_ok(1536, 7168, 64, 128));
        assert!(fp8_block_ok(3072, 1536, 128, 128));
    }


    #[test]
    fn plans_are_made_once_per_shape_and_failures_are_remembered() {
        let c = PlanCache::<u32>::default();
        let mut made = 0;
        assert!(c.supports((4, 8, 16), || {
            made += 1;
            Ok(7)
        }));
        assert!(c.supports((4, 8, 16), || unreachable!("made again")));
        assert!(!c.supports((2, 3, 5), || Err("no algorithm".into())));
        assert!(!c.supports((2, 3, 5), || unreachable!("a failed shape is not retried")));
        assert_eq!((made, c.with((4, 8, 16), |p| *p + 1)), (1, Ok(8)));
        assert_eq!(c.with((2, 3, 5), |p| *p), Err("no plan for 2x3x5".to_string()));
        assert_eq!(c.drain(), vec![7]);
    }
}
