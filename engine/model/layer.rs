//! One decoder layer: pre-norm MLA and pre-norm MLP/MoE, each added to the residual stream.
use super::mla::{AttnInputs, Mla};
use super::mlp::{FeedForward, Mlp, Moe};
use super::{ModelError, WeightsCtx};
use crate::backend::{Backend, TensorShape};

pub struct DecoderLayer<B: Backend> {
    input_norm: B::Tensor,
    post_attn_norm: B::Tensor,
    pub attn: Mla<B>,
    ffn: FeedForward<B>,
}

impl<B: Backend> DecoderLayer<B> {
    pub fn load(w: &WeightsCtx<B>, i: usize) -> Result<Self, ModelError> {
        let c = w.cfg;
        let p = format!("model.layers.{i}");
        let ffn = if c.is_moe_layer(i) {
            FeedForward::Moe(Moe::load(w, &format!("{p}.mlp"))?)
        } else {
            FeedForward::Dense(Mlp::load(w, &format!("{p}.mlp"), c.intermediate_size)?)
        };
        Ok(DecoderLayer {
            input_norm: w.vector(&format!("{p}.input_layernorm.weight"), c.hidden_size)?,
            post_attn_norm: w.vector(&format!("{p}.post_attention_layernorm.weight"), c.hidden_size)?,
            attn: Mla::load(w, &format!("{p}.self_attn"))?,
            ffn,
        })
    }

    /// DP attention: attention on this rank's own rows (all heads, no all-reduce), then the
    /// sharded MLP/MoE on every rank's rows (gathered, padded to `tmax`), reduce-scattered back.
    /// A rank with no tokens (`resid` None) still takes part in the collectives.
    pub fn forward_dp(&self, b: &B, resid: Option<&mut B::Tensor>, kv: &mut B::KvCache, layer: usize, a: &AttnInputs, tmax: usize) -> Result<(), ModelError> {
        let (x, resid) = match resid {
            Some(resid) => {
                let x = b.rms_norm(resid, &self.input_norm, a.eps)?;
                let attn = self.attn.forward(b, &x, kv, layer, a)?;
                (b.add_rms_norm(&attn, resid, &self.post_attn_norm, a.eps)?, Some(resid))
            }
            None => (b.upload(0, self.input_norm.cols(), &[])?, None),
        };
        let all = b.all_gather_rows(&x, tmax)?;
        let y = b.reduce_scatter_rows(&self.ffn.forward(b, &all)?, x.rows())?;
        if let Some(r) = resid {
            b.add(r, &y)?;
        }
        Ok(())
    }

    /// Advances the residual stream `resid` [T, hidden] through this layer, except for the MLP's
    /// output, which is returned instead of added: the next layer (or the final norm) adds it in
    /// its own norm (`pending`, the previous layer's output; None for the first layer), one
    /// `add_rms_norm` instead of an add and a norm.
    pub fn forward(&self, b: &B, resid: &mut B::Tensor, pending: Option<B::Tensor>, kv: &mut B::KvCache, layer: usize, a: &AttnInputs) -> Result<B::Tensor, ModelError> {
        let x = match pending {
            Some(y) => b.add_rms_norm(&y, resid, &self.input_norm, a.eps)?,
            None => b.rms_norm(resid, &self.input_norm, a.eps)?,
        };
        // each rank holds a share of the heads / intermediate columns: sum the partial outputs
        let mut attn = self.attn.forward(b, &x, kv, layer, a)?;
        b.all_reduce(&mut attn)?;
        let x = b.add_rms_norm(&attn, resid, &self.post_attn_norm, a.eps)?;
        let mut y = self.ffn.forward(b, &x)?;
        b.all_reduce(&mut y)?;
        Ok(y)
    }
}
