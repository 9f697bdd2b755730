//! Routed experts on the CPU: tokens grouped by expert, each expert run once on its tokens.
use super::linear::linear;
use super::tensor::CpuTensor;
use crate::weights::HostLinear;

/// Per token: `top_k` expert ids and weights.
#[derive(Debug, Clone)]
pub struct CpuRouting {
    pub top_k: usize,
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

pub struct CpuExperts {
    pub experts: Vec<[HostLinear; 3]>,
    /// Id of `experts[0]` (expert parallelism: this rank's range starts here)
    pub first: usize,
}

pub fn moe_experts(x: &CpuTensor, r: &CpuRouting, e: &CpuExperts) -> CpuTensor {
    let mut by_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e.experts.len()];
    for t in 0..x.rows {
        for k in 0..r.top_k {
            let i = t * r.top_k + k;
            // experts outside this rank's range are another rank's work
            if let Some(local) = (r.ids[i] as usize).checked_sub(e.first).filter(|&l| l < e.experts.len()) {
                by_expert[local].push((t, r.weights[i]));
            }
        }
    }
    let mut out = CpuTensor::zeros(x.rows, x.cols);
    for (id, toks) in by_expert.iter().enumerate() {
        if toks.is_empty() {
            continue;
        }
        let mut xs = CpuTensor::zeros(toks.len(), x.cols);
        for (j, (t, _)) in toks.iter().enumerate() {
            xs.data[j * x.cols..(j + 1) * x.cols].copy_from_slice(x.row(*t));
        }
        let [gate, up, down] = &e.experts[id];
        let h = super::silu_mul(&linear(&xs, gate), &linear(&xs, up));
        let y = linear(&h, down);
        for (j, (t, w)) in toks.iter().enumerate() {
            let dst = &mut out.data[t * x.cols..(t + 1) * x.cols];
            dst.iter_mut().zip(y.row(j)).for_each(|(a, b)| *a += w * b);
        }
    }
    out
}
