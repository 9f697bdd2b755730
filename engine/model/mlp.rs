//! Dense MLP and MoE blocks.
use super::{ModelError, WeightsCtx};
use crate::backend::{Backend, RouteParams};

/// down(silu(gate(x)) · up(x))
pub struct Mlp<B: Backend> {
    gate: B::Linear,
    up: B::Linear,
    down: B::Linear,
}

impl<B: Backend> Mlp<B> {
    /// This rank's intermediate columns (gate/up column-parallel, down row-parallel).
    pub fn load(w: &WeightsCtx<B>, prefix: &str, inter: usize) -> Result<Self, ModelError> {
        let hs = w.cfg.hidden_size;
        let ir = w.shard.part(inter, &format!("the intermediate size of {prefix}"))?;
        // gate and up read the same x: uploaded as a pair
        let gate = w.host_linear(&format!("{prefix}.gate_proj"), inter, hs)?.slice_rows(ir.clone());
        let (gate, up) = w.linear_pair(&gate, &w.host_linear(&format!("{prefix}.up_proj"), inter, hs)?.slice_rows(ir.clone()))?;
        Ok(Mlp { gate, up, down: w.linear_cols(&format!("{prefix}.down_proj"), hs, inter, ir)? })
    }

    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor, ModelError> {
        Ok(b.mlp(x, &self.gate, &self.up, &self.down)?)
    }

    /// (gate, up, down)
    pub fn weights(&self) -> [&B::Linear; 3] {
        [&self.gate, &self.up, &self.down]
    }
}

pub struct Moe<B: Backend> {
    router: B::Linear,
    bias: Option<Vec<f32>>,
    experts: B::Experts,
    shared: Option<Mlp<B>>,
    params: RouteParams,
}

impl<B: Backend> Moe<B> {
    pub fn load(w: &WeightsCtx<B>, prefix: &str) -> Result<Self, ModelError> {
        let c = w.cfg;
        let n = c.n_routed_experts.expect("MoE layer without experts");
        let hs = c.hidden_size;
        let inter = c.moe_intermediate_size;
        let router = w.dense_linear(&format!("{prefix}.gate"), n, hs)?;
        let bias_name = format!("{prefix}.gate.e_score_correction_bias");
        let bias = if c.topk_method == crate::config::TopkMethod::NoauxTc {
            Some(w.store.vector(&bias_name, n)?)
        } else {
            None
        };
        // expert parallel: whole experts, a contiguous range per rank; tensor parallel: every
        // expert's intermediate columns split across the ranks
        let (ids, ir) = if w.shard.expert_parallel {
            (w.shard.part(n, "n_routed_experts")?, 0..inter)
        } else {
            (0..n, w.shard.part(inter, "moe_intermediate_size")?)
        };
        let mut host = Vec::with_capacity(ids.len());
        for e in ids.clone() {
            let p = format!("{prefix}.experts.{e}");
            host.push([
                w.host_linear(&format!("{p}.gate_proj"), inter, hs)?.slice_rows(ir.clone()),
                w.host_linear(&format!("{p}.up_proj"), inter, hs)?.slice_rows(ir.clone()),
                w.host_linear(&format!("{p}.down_proj"), hs, inter)?.slice_cols(ir.clone()),
            ]);
        }
        let experts = w.backend.upload_experts(host, ids.start)?;
        let shared = if c.n_shared_experts > 0 {
            Some(Mlp::load(w, &format!("{prefix}.shared_experts"), inter * c.n_shared_experts)?)
        } else {
            None
        };
        let params = RouteParams {
            n_experts: n,
            top_k: c.num_experts_per_tok,
            n_group: c.n_group,
            topk_group: c.topk_group,
            method: c.topk_method,
            scoring: c.scoring_func,
            norm_topk_prob: c.norm_topk_prob,
            routed_scaling_factor: c.routed_scaling_factor as f32,
        };
        Ok(Moe { router, bias, experts, shared, params })
    }

    /// This rank's partial sum of routed and shared experts (the layer all-reduces it).
    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor, ModelError> {
        let routing = b.moe_route(x, &self.router, self.bias.as_deref(), &self.params)?;
        Ok(b.moe_experts_shared(x, &routing, &self.experts, self.shared.as_ref().map(Mlp::weights))?)
    }
}

pub enum FeedForward<B: Backend> {
    Dense(Mlp<B>),
    Moe(Moe<B>),
}

impl<B: Backend> FeedForward<B> {
    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor, ModelError> {
        match self {
            FeedForward::Dense(m) => m.forward(b, x),
            FeedForward::Moe(m) => m.forward(b, x),
        }
    }
}
