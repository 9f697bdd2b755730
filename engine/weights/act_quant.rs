//! Dynamic FP8 activation quantisation (`--fp8-activations dynamic`), as SGLang and DeepSeek run
//! block-FP8 checkpoints (`quantization_config.activation_scheme: "dynamic"`): per token and group
//! of 128 channels, s = max(max|x|, 1e-10) / 448 and q = e4m3fn(x / s), rounded to nearest even.
//! The host twin of hip-kernels/act_quant.hip: the GPU tests compare against it bit for bit.
use crate::synth::f32_to_fp8_e4m3fn;
use crate::weights::fnuz::{e4m3fn_to_e4m3fnuz, fnuz_scales, fp8_e4m3fnuz_to_f32};
use crate::weights::fp8_e4m3fn_to_f32;

/// Channels per activation scale
pub const ACT_GROUP: usize = 128;
const E4M3_MAX: f32 = 448.0;
const SCALE_FLOOR: f32 = 1e-10;

/// x [rows, cols] quantised: `q` row-major, `scales` [rows, ceil(cols / 128)] row-major.
pub struct ActFp8 {
    pub rows: usize,
    pub cols: usize,
    pub q: Vec<u8>,
    pub scales: Vec<f32>,
}

impl ActFp8 {
    pub fn quantize(x: &[f32], rows: usize, cols: usize) -> ActFp8 {
        assert_eq!(x.len(), rows * cols, "quantize: data does not match its shape");
        let groups = cols.div_ceil(ACT_GROUP);
        let mut q = vec![0u8; rows * cols];
        let mut scales = vec![0f32; rows * groups];
        for r in 0..rows {
            for g in 0..groups {
                let span = r * cols + g * ACT_GROUP..r * cols + ((g + 1) * ACT_GROUP).min(cols);
                let amax = x[span.clone()].iter().fold(0f32, |a, v| a.max(v.abs()));
                let s = amax.max(SCALE_FLOOR) / E4M3_MAX;
                scales[r * groups + g] = s;
                for i in span {
                    q[i] = f32_to_fp8_e4m3fn(x[i] / s);
                }
            }
        }
        ActFp8 { rows, cols, q, scales }
    }

    /// The e4m3fnuz form gfx942's matrix cores read (act_quant.hip there): the e4m3fn codes with
    /// −0 written as 0 and the scales doubled, worth exactly what the e4m3fn form is worth.
    pub fn quantize_fnuz(x: &[f32], rows: usize, cols: usize) -> ActFp8 {
        let mut a = ActFp8::quantize(x, rows, cols);
        e4m3fn_to_e4m3fnuz(&mut a.q);
        fnuz_scales(&mut a.scales);
        a
    }

    /// The e4m3fnuz form's q · s in f32.
    pub fn dequantize_fnuz(&self) -> Vec<f32> {
        self.dequantize_by(fp8_e4m3fnuz_to_f32)
    }

    /// q · s in f32: the values the block-scaled GEMM multiplies.
    pub fn dequantize(&self) -> Vec<f32> {
        self.dequantize_by(fp8_e4m3fn_to_f32)
    }

    fn dequantize_by(&self, decode: fn(u8) -> f32) -> Vec<f32> {
        let groups = self.cols.div_ceil(ACT_GROUP);
        (0..self.rows * self.cols).map(|i| decode(self.q[i]) * self.scales[(i / self.cols) * groups + (i % self.cols) / ACT_GROUP]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` values uniform in (−scale, scale) from the project's seeded generator.
    fn signed_uniform(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut rng = crate::sampling::Rng::new(seed);
        (0..n).map(|_| (rng.uniform() * 2.0 - 1.0) as f32 * scale).collect()
    }

    /// Every finite e4m3fn value, by code, decoded independently in f64.
    fn e4m3_values() -> Vec<(u8, f64)> {
        (0..=255u8)
            .filter(|b| b & 0x7f != 0x7f)
            .map(|b| {
                let (e, m) = ((b >> 3) & 0xf, b & 7);
                let mag = if e == 0 { m as f64 / 8.0 * 2f64.powi(-6) } else { (1.0 + m as f64 / 8.0) * 2f64.powi(e as i32 - 7) };
                (b, if b & 0x80 != 0 { -mag } else { mag })
            })
            .collect()
    }

    #[test]
    fn each_code_is_the_nearest_e4m3_value_and_the_group_max_is_448() {
        let table = e4m3_values();
        let (rows, cols) = (5, 300); // a partial third group
        let mut x = signed_uniform(rows * cols, 0x9e37_79b9_7f4a_7c15, 3.0);
        x[cols..cols + ACT_GROUP].fill(0.0); // an all-zero group: floor scale, zero codes
        x[7] = 1e-6; // tiny values land in the subnormals
        let a = ActFp8::quantize(&x, rows, cols);
        for r in 0..rows {
            for g in 0..cols.div_ceil(ACT_GROUP) {
                let s = a.scales[r * 3 + g] as f64;
                let span = r * cols + g * ACT_GROUP..r * cols + ((g + 1) * ACT_GROUP).min(cols);
                let amax = x[span.clone()].iter().fold(0f64, |m, v| m.max(v.abs() as f64));
                assert!((s - amax.max(1e-10) / 448.0).abs() <= s * 1e-7, "row {r} group {g}: scale {s}, max {amax}");
                for i in span {
                    let t = x[i] as f64 / s;
                    let got = table.iter().find(|(b, _)| *b == a.q[i]).expect("finite code").1;
                    let best = table.iter().map(|(_, v)| (v - t).abs()).fold(f64::INFINITY, f64::min);
                    assert!((got - t).abs() <= best + 1e-9 * t.abs(), "x {} / s {s} = {t}: code {:#x} ({got}), nearest is {best} away", x[i], a.q[i]);
                    if x[i] != 0.0 && (x[i].abs() as f64 - amax).abs() == 0.0 {
                        assert!((got.abs() - 448.0).abs() < 1e-3, "the group's largest element maps to ±448, got {got}");
                    }
                }
            }
        }
        assert!(a.q[cols..cols + ACT_GROUP].iter().all(|&b| b == 0));
        let d = a.dequantize();
        let err = x.iter().zip(&d).map(|(u, v)| (u - v).abs() as f64).fold(0.0, f64::max);
        assert!(err > 0.0 && err <= 3.0 / 448.0 * 32.0 / 2.0, "dequantised error {err}");
    }

    #[test]
    fn the_fnuz_form_is_worth_the_same_values_with_no_nan_code() {
        // signed values incl. −0 and values that round to −0 (e4m3fn's 0x80, e4m3fnuz's NaN)
        let (rows, cols) = (3, 256);
        let mut x = signed_uniform(rows * cols, 0x2545_f491_4f6c_dd1d, 5.0);
        x[3] = -0.0;
        x[4] = -1e-9; // rounds to −0 against the group's scale
        let (fn_, fnuz) = (ActFp8::quantize(&x, rows, cols), ActFp8::quantize_fnuz(&x, rows, cols));
        assert_eq!(fn_.q[4], 0x80, "the case is exercised");
        assert!(fnuz.q.iter().all(|&b| b != 0x80));
        assert!(fnuz.scales.iter().zip(&fn_.scales).all(|(a, b)| *a == 2.0 * b));
        let (a, b) = (fn_.dequantize(), fnuz.dequantize_fnuz());
        assert!(a.iter().zip(&b).all(|(u, v)| u == v), "values differ");
    }
}
