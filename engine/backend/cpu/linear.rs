//! `y = x · Wᵀ` over weights kept in their checkpoint dtype (dequantised one row at a time).
use rayon::prelude::*;

use super::tensor::{dot, CpuTensor};
use crate::weights::HostLinear;

/// Output rows handled per task: each task dequantises its rows of W once for all tokens.
const ROWS_PER_TASK: usize = 16;

pub fn linear(x: &CpuTensor, w: &HostLinear) -> CpuTensor {
    assert_eq!(x.cols, w.inp, "linear {}: input has {} columns, weight expects {}", w.name, x.cols, w.inp);
    let t = x.rows;
    let chunks: Vec<Vec<f32>> = (0..w.out.div_ceil(ROWS_PER_TASK))
        .into_par_iter()
        .map(|c| {
            let r0 = c * ROWS_PER_TASK;
            let r1 = (r0 + ROWS_PER_TASK).min(w.out);
            let mut row = vec![0f32; w.inp];
            let mut out = vec![0f32; (r1 - r0) * t];
            for r in r0..r1 {
                w.row_f32(r, &mut row);
                for i in 0..t {
                    out[(r - r0) * t + i] = dot(x.row(i), &row);
                }
            }
            out
        })
        .collect();
    let mut y = CpuTensor::zeros(t, w.out);
    for (c, chunk) in chunks.iter().enumerate() {
        let r0 = c * ROWS_PER_TASK;
        let n = chunk.len() / t.max(1);
        for k in 0..n {
            for i in 0..t {
                y.data[i * w.out + r0 + k] = chunk[k * t + i];
            }
        }
    }
    y
}
