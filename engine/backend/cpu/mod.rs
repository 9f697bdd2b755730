//! The CPU reference backend: f32 arithmetic, rayon across rows, heads and experts.
mod attention;
mod kv;
mod linear;
mod moe;
mod tensor;

pub use kv::CpuKvCache;
pub use moe::{CpuExperts, CpuRouting};
pub use tensor::CpuTensor;

use rayon::prelude::*;

use super::{route_token, AttnSeq, Backend, BackendError, MlaDims, RouteParams};
use crate::config::RopeTables;
use crate::weights::HostLinear;

/// The CPU backend; `with_comm` joins it to a tensor-parallel group.
#[derive(Default, Clone)]
pub struct CpuBackend {
    comm: Option<std::sync::Arc<dyn crate::dist::HostComm>>,
}

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend { comm: None }
    }
    pub fn with_comm(comm: std::sync::Arc<dyn crate::dist::HostComm>) -> Self {
        CpuBackend { comm: Some(comm) }
    }
    fn group(&self, op: &'static str) -> Result<&std::sync::Arc<dyn crate::dist::HostComm>, BackendError> {
        self.comm.as_ref().ok_or(BackendError::Op { backend: "cpu", op, msg: "needs a tensor-parallel group".into() })
    }
}

fn comm_err(op: &'static str) -> impl Fn(crate::dist::CommError) -> BackendError {
    move |e| BackendError::Op { backend: "cpu", op, msg: e.to_string() }
}

fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ms + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        *o = g * (v * r);
    }
}

pub(crate) fn silu_mul(gate: &CpuTensor, up: &CpuTensor) -> CpuTensor {
    assert_eq!((gate.rows, gate.cols), (up.rows, up.cols), "silu_mul: shapes differ");
    let data = gate.data.iter().zip(&up.data).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u).collect();
    CpuTensor::new(gate.rows, gate.cols, data)
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Linear = HostLinear;
    type Experts = CpuExperts;
    type Routing = CpuRouting;
    type KvCache = CpuKvCache;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn upload(&self, rows: usize, cols: usize, data: &[f32]) -> Result<CpuTensor, BackendError> {
        Ok(CpuTensor::new(rows, cols, data.to_vec()))
    }
    fn download(&self, t: &CpuTensor) -> Result<Vec<f32>, BackendError> {
        Ok(t.data.clone())
    }
    fn upload_linear(&self, w: &HostLinear) -> Result<HostLinear, BackendError> {
        // Weights stay memory-mapped in their checkpoint dtype; rows are dequantised on use.
        Ok(w.clone())
    }
    fn upload_experts(&self, experts: Vec<[HostLinear; 3]>, first: usize) -> Result<CpuExperts, BackendError> {
        Ok(CpuExperts { experts, first })
    }
    fn alloc_kv_cache(&self, layers: usize, slots: usize, kv_entry: usize) -> Result<CpuKvCache, BackendError> {
        Ok(CpuKvCache::new(layers, slots, kv_entry))
    }

    fn embedding(&self, table: &HostLinear, ids: &[u32]) -> Result<CpuTensor, BackendError> {
        let mut t = CpuTensor::zeros(ids.len(), table.inp);
        for (i, &id) in ids.iter().enumerate() {
            if id as usize >= table.out {
                return Err(BackendError::Op { backend: "cpu", op: "embedding", msg: format!("token id {id} outside the vocabulary of {}", table.out) });
            }
            table.row_f32(id as usize, &mut t.data[i * table.inp..(i + 1) * table.inp]);
        }
        Ok(t)
    }

    fn rms_norm(&self, x: &CpuTensor, w: &CpuTensor, eps: f32) -> Result<CpuTensor, BackendError> {
        let mut out = CpuTensor::zeros(x.rows, x.cols);
        out.data.par_chunks_mut(x.cols).zip(x.data.par_chunks(x.cols)).for_each(|(o, r)| rms_norm_row(r, &w.data, eps, o));
        Ok(out)
    }

    fn add_rms_norm(&self, x: &CpuTensor, residual: &mut CpuTensor, w: &CpuTensor, eps: f32) -> Result<CpuTensor, BackendError> {
        self.add(residual, x)?;
        self.rms_norm(residual, w, eps)
    }

    fn rms_norm_cols(&self, x: &mut CpuTensor, start: usize, w: &CpuTensor, eps: f32) -> Result<(), BackendError> {
        let n = w.cols;
        x.data.par_chunks_mut(x.cols).for_each(|row| {
            let seg = row[start..start + n].to_vec();
            rms_norm_row(&seg, &w.data, eps, &mut row[start..start + n]);
        });
        Ok(())
    }

    fn linear(&self, x: &CpuTensor, w: &HostLinear) -> Result<CpuTensor, BackendError> {
        Ok(linear::linear(x, w))
    }

    fn silu_mul(&self, gate: &CpuTensor, up: &CpuTensor) -> Result<CpuTensor, BackendError> {
        Ok(silu_mul(gate, up))
    }

    fn add(&self, x: &mut CpuTensor, y: &CpuTensor) -> Result<(), BackendError> {
        assert_eq!((x.rows, x.cols), (y.rows, y.cols), "add: shapes differ");
        x.data.iter_mut().zip(&y.data).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn rope(&self, x: &mut CpuTensor, positions: &[u32], heads: usize, head_stride: usize, offset: usize, rope: &RopeTables) -> Result<(), BackendError> {
        let half = rope.half;
        let cols = x.cols;
        x.data.par_chunks_mut(cols).zip(positions.par_iter()).for_each(|(row, &pos)| {
            let (mut cos, mut sin) = (vec![0f32; half], vec![0f32; half]);
            rope.cos_sin(pos as usize, &mut cos, &mut sin);
            for h in 0..heads {
                let s = &mut row[offset + h * head_stride..offset + h * head_stride + 2 * half];
                for i in 0..half {
                    let (a, b) = if rope.interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
                    let (x0, x1) = (s[a], s[b]);
                    s[a] = x0 * cos[i] - x1 * sin[i];
                    s[b] = x1 * cos[i] + x0 * sin[i];
                }
            }
        });
        Ok(())
    }

    fn kv_write(&self, kv: &mut CpuKvCache, layer: usize, slots: &[u32], entries: &CpuTensor) -> Result<(), BackendError> {
        for (i, &s) in slots.iter().enumerate() {
            kv.entry_mut(layer, s).copy_from_slice(entries.row(i));
        }
        Ok(())
    }

    fn mla_attention(&self, q: &CpuTensor, kv: &CpuKvCache, layer: usize, seqs: &[AttnSeq], kv_b: &HostLinear, dims: &MlaDims) -> Result<CpuTensor, BackendError> {
        Ok(attention::mla_attention(q, kv, layer, seqs, kv_b, dims))
    }

    fn moe_route(&self, x: &CpuTensor, gate: &HostLinear, bias: Option<&[f32]>, p: &RouteParams) -> Result<CpuRouting, BackendError> {
        let logits = linear::linear(x, gate);
        let per_token: Vec<(Vec<u32>, Vec<f32>)> = logits.data.par_chunks(p.n_experts).map(|l| route_token(l, bias, p)).collect();
        let mut r = CpuRouting { top_k: p.top_k, ids: Vec::with_capacity(x.rows * p.top_k), weights: Vec::with_capacity(x.rows * p.top_k) };
        for (ids, w) in per_token {
            r.ids.extend(ids);
            r.weights.extend(w);
        }
        Ok(r)
    }

    fn moe_experts(&self, x: &CpuTensor, routing: &CpuRouting, experts: &CpuExperts) -> Result<CpuTensor, BackendError> {
        Ok(moe::moe_experts(x, routing, experts))
    }

    fn tp_group(&self) -> (usize, usize) {
        self.comm.as_ref().map_or((0, 1), |c| (c.rank(), c.size()))
    }

    fn all_reduce(&self, x: &mut CpuTensor) -> Result<(), BackendError> {
        match &self.comm {
            Some(c) => c.all_reduce_sum(&mut x.data).map_err(comm_err("all_reduce")),
            None => Ok(()),
        }
    }

    fn all_gather_cols(&self, x: CpuTensor, total: usize) -> Result<CpuTensor, BackendError> {
        let Some(c) = &self.comm else { return Ok(x) };
        let all = c.all_gather(&x.data).map_err(comm_err("all_gather"))?;
        let (rows, cols, n) = (x.rows, x.cols, c.size());
        let mut out = CpuTensor::zeros(rows, total);
        for r in 0..rows {
            for q in 0..n {
                let c0 = q * cols;
                if c0 >= total {
                    break;
                }
                let w = cols.min(total - c0);
                out.data[r * total + c0..r * total + c0 + w].copy_from_slice(&all[(q * rows + r) * cols..(q * rows + r) * cols + w]);
            }
        }
        Ok(out)
    }

    fn all_gather_rows(&self, x: &CpuTensor, per_rank: usize) -> Result<CpuTensor, BackendError> {
        let c = self.group("all_gather_rows")?;
        assert!(x.rows <= per_rank, "all_gather_rows: {} rows > {per_rank}", x.rows);
        let mut mine = x.data.clone();
        mine.resize(per_rank * x.cols, 0.0);
        let all = c.all_gather(&mine).map_err(comm_err("all_gather_rows"))?;
        Ok(CpuTensor::new(per_rank * c.size(), x.cols, all))
    }

    fn reduce_scatter_rows(&self, x: &CpuTensor, keep: usize) -> Result<CpuTensor, BackendError> {
        let c = self.group("reduce_scatter_rows")?;
        let per_rank = x.rows / c.size();
        assert!(keep <= per_rank && x.rows == per_rank * c.size(), "reduce_scatter_rows: bad shape");
        let mut all = x.data.clone();
        c.all_reduce_sum(&mut all).map_err(comm_err("reduce_scatter_rows"))?;
        let start = c.rank() * per_rank * x.cols;
        Ok(CpuTensor::new(keep, x.cols, all[start..start + keep * x.cols].to_vec()))
    }

    fn gather_rows(&self, x: &CpuTensor, rows: &[u32]) -> Result<CpuTensor, BackendError> {
        let mut data = Vec::with_capacity(rows.len() * x.cols);
        for &r in rows {
            data.extend_from_slice(x.row(r as usize));
        }
        Ok(CpuTensor::new(rows.len(), x.cols, data))
    }
}
