//! Two linear layers that read the same input, stored as one weight: MLA's q_a and kv_a, an MLP's
//! gate and up (`Backend::upload_linear_pair`). Where both are FP8 in DeepSeek's 128 × 128
//! blocks over the same input and the first's rows fill whole blocks, their bytes and scales are
//! uploaded back to back: each layer is a view of its part, and the first also carries the joint
//! layer [out₁ + out₂, inp] (views of the whole; no byte is stored twice). Where the library's
//! block-scaled GEMM takes x's codes (`shares_fp8_codes`) one GEMM then gives both outputs side
//! by side: two GEMMs of few output tiles took a split-K reduction each (V3's q_a and kv_a at
//! batch 256: 15.3 + 5.8 and 15.3 + 4.0 µs; the shared experts' gate and up the same).
use std::sync::Arc;

use super::backend::{GpuBackend, GpuTensor, GpuVendor};
use super::device::{err, DevBuf};
use super::ops::{cfg, host_weight, GpuLinear};
use crate::backend::BackendError;
use crate::weights::HostLinear;

const EW: &str = "hip-kernels/elementwise.hip";

impl<V: GpuVendor> GpuBackend<V> {
    /// (first, second) uploaded back to back where they can form one layer, else apart.
    pub(super) fn upload_pair(&self, a: &HostLinear, b: &HostLinear) -> Result<(GpuLinear, GpuLinear), BackendError> {
        let (wa, bytes_a, sa, bna, bka) = host_weight(a, self.fp8_fnuz);
        let (wb, bytes_b, sb, bnb, bkb) = host_weight(b, self.fp8_fnuz);
        if !joinable((wa, bna, bka, a.out, a.inp), (wb, bnb, bkb, b.inp)) {
            return Ok((self.upload_linear_one(a)?, self.upload_linear_one(b)?));
        }
        let data = Arc::new(self.upload_parts(&[&bytes_a, &bytes_b])?);
        let scales = Arc::new(self.htod(&[sa.as_slice(), sb.as_slice()].concat())?);
        let part = |(start, len): (usize, usize), (s0, sn): (usize, usize), out: usize| GpuLinear {
            out,
            inp: a.inp,
            wdt: 2,
            data: DevBuf::view(&data, start, len),
            scales: DevBuf::view(&scales, s0, sn),
            bn: 128,
            bk: 128,
            wuk_t: None,
            joint: None,
        };
        let (na, nb, ns, nt) = (bytes_a.len(), bytes_b.len(), sa.len(), sb.len());
        let mut first = part((0, na), (0, ns), a.out);
        first.joint = Some(Arc::new(part((0, na + nb), (0, ns + nt), a.out + b.out)));
        Ok((first, part((na, nb), (ns, nt), b.out)))
    }

    /// The joint layer of (first, second) where `upload_pair` stored them so.
    pub(super) fn joint_of<'a>(first: &'a GpuLinear, second: &GpuLinear) -> Option<&'a GpuLinear> {
        let j = first.joint.as_deref()?;
        let tail = second.data.ptr() == first.data.at(first.data.len()) && second.scales.ptr() == first.scales.at(first.scales.len());
        (tail && j.out == first.out + second.out && j.inp == second.inp).then_some(j)
    }

    /// y [rows, n₁ + n₂] → ([rows, n₁], [rows, n₂]) (elementwise.hip's `split_cols`).
    pub(super) fn split_cols(&self, y: &GpuTensor, n1: usize) -> Result<(GpuTensor, GpuTensor), BackendError> {
        let (rows, n2) = (y.rows, y.cols - n1);
        let (mut a, mut b) = (self.alloc_out(rows * n1)?, self.alloc_out(rows * n2)?);
        if rows > 0 {
            let f = self.func(EW, "split_cols")?;
            let (r, c1, c2) = (rows as i32, n1 as i32, n2 as i32);
            self.launch(&f).arg(&y.buf).arg(&mut a).arg(&mut b).arg(&r).arg(&c1).arg(&c2).run(cfg((rows as u32, 1), 256, 0)).map_err(err("split_cols"))?;
        }
        Ok((GpuTensor { rows, cols: n1, buf: a }, GpuTensor { rows, cols: n2, buf: b }))
    }
}

/// Whether two layers (dtype, block rows, block columns, rows, inputs) / (dtype, blocks, inputs)
/// can be one: FP8 in 128 × 128 blocks over the same input, the first's rows whole blocks (so
/// the second's scale rows follow the first's).
fn joinable((wa, bna, bka, out_a, inp_a): (u8, i32, i32, usize, usize), (wb, bnb, bkb, inp_b): (u8, i32, i32, usize)) -> bool {
    wa == 2 && wb == 2 && (bna, bka, bnb, bkb) == (128, 128, 128, 128) && inp_a == inp_b && out_a.is_multiple_of(128)
}

#[cfg(test)]
mod tests {
    use super::joinable;

    #[test]
    fn fp8_layers_of_whole_blocks_over_one_input_join() {
        // V3's q_a (1536 rows) then kv_a (576): joined; the other way round 576 is not whole blocks
        assert!(joinable((2, 128, 128, 1536, 7168), (2, 128, 128, 7168)));
        assert!(!joinable((2, 128, 128, 576, 7168), (2, 128, 128, 7168)));
        // another input width, other blocks, bf16
        assert!(!joinable((2, 128, 128, 1536, 7168), (2, 128, 128, 2048)));
        assert!(!joinable((2, 64, 128, 1536, 7168), (2, 64, 128, 7168)));
        assert!(!joinable((1, 1, 1, 1536, 7168), (1, 1, 1, 7168)));
    }
}
