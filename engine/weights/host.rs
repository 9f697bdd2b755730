//! A linear layer's weight as the checkpoint stores it, before a backend takes it.
use super::{bf16_to_f32, f16_to_f32, fp8_e4m3fn_to_f32, MmapSlice};

#[derive(Debug, Clone)]
pub enum LinearData {
    F32(MmapSlice),
    BF16(MmapSlice),
    F16(MmapSlice),
    /// float8 e4m3fn, row-major [out, in], dequantised as w × scale_inv[row / block_n][col / block_k].
    Fp8 { w: MmapSlice, scale_inv: Vec<f32>, block_n: usize, block_k: usize },
}

/// Weight of `y = x · Wᵀ`, W of shape [out, inp], row-major.
#[derive(Debug, Clone)]
pub struct HostLinear {
    pub name: String,
    pub out: usize,
    pub inp: usize,
    pub data: LinearData,
}

impl HostLinear {
    pub fn from_f32(name: &str, out: usize, inp: usize, w: &[f32]) -> Self {
        assert_eq!(w.len(), out * inp);
        let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
        HostLinear { name: name.to_string(), out, inp, data: LinearData::F32(MmapSlice::from_vec(bytes)) }
    }

    /// Row `r` of W (dequantised) into `dst` (length `inp`).
    pub fn row_f32(&self, r: usize, dst: &mut [f32]) {
        let n = self.inp;
        debug_assert_eq!(dst.len(), n);
        match &self.data {
            LinearData::F32(b) => {
                for (d, c) in dst.iter_mut().zip(b[r * n * 4..(r + 1) * n * 4].chunks_exact(4)) {
                    *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            LinearData::BF16(b) => {
                for (d, c) in dst.iter_mut().zip(b[r * n * 2..(r + 1) * n * 2].chunks_exact(2)) {
                    *d = bf16_to_f32(c[0], c[1]);
                }
            }
            LinearData::F16(b) => {
                for (d, c) in dst.iter_mut().zip(b[r * n * 2..(r + 1) * n * 2].chunks_exact(2)) {
                    *d = f16_to_f32(c[0], c[1]);
                }
            }
            LinearData::Fp8 { w, scale_inv, block_n, block_k } => {
                let scales = &scale_inv[(r / block_n) * n.div_ceil(*block_k)..];
                for (kb, (d, c)) in dst.chunks_mut(*block_k).zip(w[r * n..(r + 1) * n].chunks(*block_k)).enumerate() {
                    let s = scales[kb];
                    for (x, b) in d.iter_mut().zip(c) {
                        *x = fp8_e4m3fn_to_f32(*b) * s;
                    }
                }
            }
        }
    }

    /// The whole weight dequantised to f32 (tests, small weights).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.out * self.inp];
        for (r, row) in out.chunks_mut(self.inp).enumerate() {
            self.row_f32(r, row);
        }
        out
    }

    /// A weight of random finite e4m3fn codes (never 0x7f / 0xff, the NaNs) and block scales in
    /// [0.5, 2.5), reproducible from `seed` (unit tests of the layout transforms).
    #[cfg(test)]
    pub(crate) fn random_fp8(out: usize, inp: usize, bn: usize, bk: usize, seed: u64) -> HostLinear {
        let mut s = seed;
        let mut next = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        let w: Vec<u8> = (0..out * inp).map(|_| (next() % 0x7e) as u8 | if next() % 2 == 0 { 0x80 } else { 0 }).collect();
        let scale_inv = (0..out.div_ceil(bn) * inp.div_ceil(bk)).map(|_| 0.5 + (next() % 100) as f32 / 50.0).collect();
        HostLinear { name: "t".into(), out, inp, data: LinearData::Fp8 { w: super::MmapSlice::from_vec(w), scale_inv, block_n: bn, block_k: bk } }
    }

    pub fn bytes(&self) -> usize {
        match &self.data {
            LinearData::F32(b) | LinearData::BF16(b) | LinearData::F16(b) => b.len(),
            LinearData::Fp8 { w, scale_inv, .. } => w.len() + scale_inv.len() * 4,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_partial_edge_blocks_use_their_own_scale() {
        // 3 x 5 weight with 2 x 2 blocks: scale grid 2 x 3, last row/column blocks partial.
        let w: Vec<u8> = vec![0x38; 15]; // every element 1.0
        let scale_inv = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let l = HostLinear {
            name: "t".into(),
            out: 3,
            inp: 5,
            data: LinearData::Fp8 { w: MmapSlice::from_vec(w), scale_inv, block_n: 2, block_k: 2 },
        };
        let f = l.to_f32();
        assert_eq!(&f[0..5], &[1.0, 1.0, 2.0, 2.0, 3.0]);
        assert_eq!(&f[5..10], &[1.0, 1.0, 2.0, 2.0, 3.0]);
        assert_eq!(&f[10..15], &[4.0, 4.0, 5.0, 5.0, 6.0]);
    }
}
