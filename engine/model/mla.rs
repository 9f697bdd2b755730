//! Multi-head latent attention (MLA), written against `Backend`.
use super::{ModelError, WeightsCtx};
use crate::backend::{rope_at, AttnSeq, Backend, KvEntryOp, KvEntrySite, MlaDims, RopeSite};
use crate::config::RopeTables;

enum QProj<B: Backend> {
    /// q = q_b(rmsnorm(q_a(x)))
    Lora { a: B::Linear, norm: B::Tensor, b: B::Linear },
    /// q = q_proj(x) (q_lora_rank null, as in V2-Lite)
    Plain(B::Linear),
}

pub struct Mla<B: Backend> {
    q: QProj<B>,
    kv_a: B::Linear,
    kv_a_norm: B::Tensor,
    pub kv_b: B::Linear,
    o: B::Linear,
}

/// What one attention call needs besides the activations.
pub struct AttnInputs<'a> {
    pub positions: &'a [u32],
    pub seqs: &'a [AttnSeq<'a>],
    /// KV slot of each new token, in token order.
    pub new_slots: &'a [u32],
    pub rope: &'a RopeTables,
    pub dims: &'a MlaDims,
    pub eps: f32,
}

impl<B: Backend> Mla<B> {
    pub fn load(w: &WeightsCtx<B>, prefix: &str) -> Result<Self, ModelError> {
        let c = w.cfg;
        let h = c.num_attention_heads;
        // tensor parallel: this rank's heads of q_b/q_proj and kv_b (column-parallel) and of
        // o_proj's input (row-parallel); the latent projection kv_a is replicated
        let hr = w.shard.heads(h)?;
        let rows = |per: usize| hr.start * per..hr.end * per;
        let qk = c.qk_head_dim();
        // the query's first projection and kv_a read the same x: uploaded as a pair
        let kv_a = w.host_linear(&format!("{prefix}.kv_a_proj_with_mqa"), c.kv_entry_dim(), c.hidden_size)?;
        let (q, kv_a) = match c.q_lora_rank {
            Some(r) => {
                let (a, kv_a) = w.linear_pair(&w.host_linear(&format!("{prefix}.q_a_proj"), r, c.hidden_size)?, &kv_a)?;
                let norm = w.vector(&format!("{prefix}.q_a_layernorm.weight"), r)?;
                (QProj::Lora { a, norm, b: w.linear_rows(&format!("{prefix}.q_b_proj"), h * qk, r, rows(qk))? }, kv_a)
            }
            None => {
                let (p, kv_a) = w.linear_pair(&w.host_linear(&format!("{prefix}.q_proj"), h * qk, c.hidden_size)?.slice_rows(rows(qk)), &kv_a)?;
                (QProj::Plain(p), kv_a)
            }
        };
        let kvb = c.qk_nope_head_dim + c.v_head_dim;
        Ok(Mla {
            q,
            kv_a,
            kv_a_norm: w.vector(&format!("{prefix}.kv_a_layernorm.weight"), c.kv_lora_rank)?,
            kv_b: w.mla_kv_b(&format!("{prefix}.kv_b_proj"), h * kvb, rows(kvb))?,
            o: w.linear_cols(&format!("{prefix}.o_proj"), c.hidden_size, h * c.v_head_dim, rows(c.v_head_dim))?,
        })
    }

    /// `x` is the normed hidden state [T, hidden]; writes the new latents into `kv` and returns the
    /// attention output after o_proj (this rank's partial sum under tensor parallelism).
    pub fn forward(&self, b: &B, x: &B::Tensor, kv: &mut B::KvCache, layer: usize, a: &AttnInputs) -> Result<B::Tensor, ModelError> {
        let d = a.dims;
        // the query's first projection and kv_a read the same x (one launch where the backend
        // can); the query's RoPE on each head's last qk_rope columns; the new cache entries
        // (kv_a's latent normed, rotated, written) alongside q_b where the backend can
        let rope = RopeSite { positions: a.positions, heads: d.num_heads, head_stride: d.qk_head(), offset: d.qk_nope, tables: a.rope };
        let site = KvEntrySite { layer, slots: a.new_slots, positions: a.positions, rope: a.rope, offset: d.kv_lora_rank };
        let q = match &self.q {
            QProj::Lora { a: qa, norm, b: qb } => {
                let (t, mut latent) = b.linear_pair(x, qa, &self.kv_a)?;
                let entry = KvEntryOp { latent: &mut latent, norm: &self.kv_a_norm, eps: a.eps, kv: &mut *kv, site: &site };
                b.norm_linear_kv_entry(&t, norm, a.eps, qb, Some(&rope), entry)?
            }
            QProj::Plain(p) => {
                let (mut q, mut latent) = b.linear_pair(x, p, &self.kv_a)?;
                rope_at(b, &mut q, &rope)?;
                b.mla_kv_entry(&mut latent, &self.kv_a_norm, a.eps, kv, &site)?;
                q
            }
        };
        Ok(b.mla_attention_linear(&q, kv, layer, a.seqs, &self.kv_b, d, &self.o)?)
    }
}
