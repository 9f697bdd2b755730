//! Tensor-parallel slices of a linear weight: a block of output rows (column-parallel layers)
//! or of input columns (row-parallel layers). Row slices of an unquantised or block-aligned FP8
//! weight share the memory map, so a rank touches only its own pages of the checkpoint; column
//! slices copy just their columns. An FP8 slice that would cut through a 128×128 scale block is
//! dequantised to f32 (logged), which keeps the numbers exact at the cost of memory.
use std::ops::Range;

use super::{HostLinear, LinearData, MmapSlice};

impl HostLinear {
    fn elem_bytes(&self) -> usize {
        match &self.data {
            LinearData::F32(_) => 4,
            LinearData::BF16(_) | LinearData::F16(_) => 2,
            LinearData::Fp8 { .. } => 1,
        }
    }

    fn dequantised(&self, out: usize, inp: usize, mut f: impl FnMut(usize, &mut [f32])) -> HostLinear {
        log::warn!("{}: this rank's slice cuts through a 128x128 FP8 scale block, so it is dequantised to f32 (4x the memory)", self.name);
        let mut w = vec![0f32; out * inp];
        for (r, row) in w.chunks_mut(inp.max(1)).enumerate().take(out) {
            f(r, row);
        }
        HostLinear::from_f32(&self.name, out, inp, &w)
    }

    /// Output rows `rows` (the weight of a column-parallel layer's shard).
    pub fn slice_rows(&self, rows: Range<usize>) -> HostLinear {
        assert!(rows.start <= rows.end && rows.end <= self.out, "{}: rows {rows:?} outside {}", self.name, self.out);
        let (n, inp) = (rows.len(), self.inp);
        let eb = self.elem_bytes();
        let bytes = |b: &MmapSlice| b.sub(rows.start * inp * eb..rows.end * inp * eb);
        let data = match &self.data {
            LinearData::F32(b) => LinearData::F32(bytes(b)),
            LinearData::BF16(b) => LinearData::BF16(bytes(b)),
            LinearData::F16(b) => LinearData::F16(bytes(b)),
            LinearData::Fp8 { w, scale_inv, block_n, block_k } => {
                if !rows.start.is_multiple_of(*block_n) {
                    let mut full = vec![0f32; inp];
                    return self.dequantised(n, inp, |r, dst| {
                        self.row_f32(rows.start + r, &mut full);
                        dst.copy_from_slice(&full);
                    });
                }
                let kb = inp.div_ceil(*block_k);
                let s = &scale_inv[rows.start / block_n * kb..rows.end.div_ceil(*block_n) * kb];
                LinearData::Fp8 { w: bytes(w), scale_inv: s.to_vec(), block_n: *block_n, block_k: *block_k }
            }
        };
        HostLinear { name: self.name.clone(), out: n, inp, data }
    }

    /// Output rows `rows`, padded with zero rows to `len` (a vocabulary-parallel lm_head whose
    /// last shard is short, an embedding slice with its zero row), in the slice's own dtype: zero
    /// bytes are zero in every format (FP8 zeros times any scale).
    pub fn slice_rows_padded(&self, rows: Range<usize>, len: usize) -> HostLinear {
        let s = self.slice_rows(rows.clone());
        if rows.len() == len {
            return s;
        }
        let pad = |b: &MmapSlice, eb: usize| {
            let mut v = b.to_vec();
            v.resize(len * self.inp * eb, 0);
            MmapSlice::from_vec(v)
        };
        let data = match &s.data {
            LinearData::F32(b) => LinearData::F32(pad(b, 4)),
            LinearData::BF16(b) => LinearData::BF16(pad(b, 2)),
            LinearData::F16(b) => LinearData::F16(pad(b, 2)),
            LinearData::Fp8 { w, scale_inv, block_n, block_k } => {
                let mut scales = scale_inv.clone();
                scales.resize(len.div_ceil(*block_n) * self.inp.div_ceil(*block_k), 1.0);
                LinearData::Fp8 { w: pad(w, 1), scale_inv: scales, block_n: *block_n, block_k: *block_k }
            }
        };
        HostLinear { name: s.name, out: len, inp: self.inp, data }
    }

    /// Input columns `cols` (the weight of a row-parallel layer's shard).
    pub fn slice_cols(&self, cols: Range<usize>) -> HostLinear {
        assert!(cols.start <= cols.end && cols.end <= self.inp, "{}: columns {cols:?} outside {}", self.name, self.inp);
        if cols == (0..self.inp) {
            return self.clone();
        }
        let (out, n, inp) = (self.out, cols.len(), self.inp);
        let eb = self.elem_bytes();
        let copy = |b: &MmapSlice| {
            let mut v = Vec::with_capacity(out * n * eb);
            for r in 0..out {
                v.extend_from_slice(&b[(r * inp + cols.start) * eb..(r * inp + cols.end) * eb]);
            }
            MmapSlice::from_vec(v)
        };
        let data = match &self.data {
            LinearData::F32(b) => LinearData::F32(copy(b)),
            LinearData::BF16(b) => LinearData::BF16(copy(b)),
            LinearData::F16(b) => LinearData::F16(copy(b)),
            LinearData::Fp8 { w, scale_inv, block_n, block_k } => {
                if !cols.start.is_multiple_of(*block_k) {
                    let mut full = vec![0f32; inp];
                    return self.dequantised(out, n, |r, dst| {
                        self.row_f32(r, &mut full);
                        dst.copy_from_slice(&full[cols.clone()]);
                    });
                }
                let kb = inp.div_ceil(*block_k);
                let (k0, k1) = (cols.start / block_k, cols.end.div_ceil(*block_k));
                let s: Vec<f32> = (0..out.div_ceil(*block_n)).flat_map(|rb| scale_inv[rb * kb + k0..rb * kb + k1].to_vec()).collect();
                LinearData::Fp8 { w: copy(w), scale_inv: s, block_n: *block_n, block_k: *block_k }
            }
        };
        HostLinear { name: self.name.clone(), out, inp: n, data }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_rows(l: &HostLinear, rows: Range<usize>) {
        let full = l.to_f32();
        let s = l.slice_rows(rows.clone());
        assert_eq!(s.to_f32(), full[rows.start * l.inp..rows.end * l.inp].to_vec(), "rows {rows:?}");
    }

    fn check_cols(l: &HostLinear, cols: Range<usize>) {
        let full = l.to_f32();
        let s = l.slice_cols(cols.clone());
        let want: Vec<f32> = (0..l.out).flat_map(|r| full[r * l.inp + cols.start..r * l.inp + cols.end].to_vec()).collect();
        assert_eq!(s.to_f32(), want, "cols {cols:?}");
    }

    #[test]
    fn fp8_slices_equal_the_dequantised_weight_aligned_or_not() {
        let l = HostLinear::random_fp8(10, 13, 4, 4, 7); // partial edge blocks both ways
        for r in [0..4, 4..10, 8..10, 3..7, 0..10] {
            check_rows(&l, r);
        }
        for c in [0..4, 4..13, 8..13, 5..9, 0..13] {
            check_cols(&l, c);
        }
        // aligned slices stay FP8 and share the map
        assert!(matches!(l.slice_rows(4..8).data, LinearData::Fp8 { .. }));
        assert!(matches!(l.slice_cols(4..8).data, LinearData::Fp8 { .. }));
        assert!(matches!(l.slice_rows(3..8).data, LinearData::F32(_)));
        // padding keeps the dtype: FP8 zero rows (any scale) after the slice
        let p = l.slice_rows_padded(4..10, 13);
        assert!(matches!(p.data, LinearData::Fp8 { .. }));
        let (full, f) = (l.to_f32(), p.to_f32());
        assert_eq!(&f[..6 * 13], &full[4 * 13..10 * 13]);
        assert!(f[6 * 13..].iter().all(|&x| x == 0.0) && f.len() == 13 * 13);
    }

    #[test]
    fn float_slices_and_padding() {
        let w: Vec<f32> = (0..6 * 5).map(|i| i as f32 * 0.25 - 3.0).collect();
        let l = HostLinear::from_f32("t", 6, 5, &w);
        check_rows(&l, 2..5);
        check_cols(&l, 1..4);
        let p = l.slice_rows_padded(4..6, 4);
        assert_eq!(p.out, 4);
        let f = p.to_f32();
        assert_eq!(&f[..10], &w[20..30]);
        assert!(f[10..].iter().all(|&x| x == 0.0));
    }
}
