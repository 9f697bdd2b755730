//! DP attention (`--enable-dp-attention --dp N`, N = tp): every rank holds all attention heads and
//! runs attention for its own requests over its own latent KV cache, so the cache is split across
//! the ranks instead of replicated; the MLP/MoE stays tensor- (or expert-) parallel over all ranks.
//! Per layer: each rank's normed rows are all-gathered (padded to the largest rank's count), the
//! sharded MLP/MoE runs on all of them, and a reduce-scatter gives each rank the summed rows it
//! owns. The logit rows' hidden states are gathered the same way so the vocabulary-parallel lm_head
//! scores everyone's rows; the lead returns them compacted in rank order.
use super::mla::AttnInputs;
use super::{ForwardBatch, Model, ModelError};
use crate::backend::{Backend, TensorShape};

impl<B: Backend> Model<B> {
    /// Ranks that serve their own requests (1 unless DP attention is on).
    pub fn dp_size(&self) -> usize {
        if self.shard.dp_attention {
            self.shard.size
        } else {
            1
        }
    }

    /// One step under DP attention: `batches[r]` is rank r's batch (possibly empty) over rank r's
    /// own KV cache. Returns the logits of every rank's logit rows, concatenated in rank order.
    pub fn forward_dp(&self, kv: &mut B::KvCache, batches: &[ForwardBatch]) -> Result<B::Tensor, ModelError> {
        if batches.len() != self.dp_size() {
            return Err(ModelError::Input(format!("{} batches for {} DP-attention ranks", batches.len(), self.dp_size())));
        }
        let mut new_slots = Vec::with_capacity(batches.len());
        for b in batches {
            new_slots.push(self.check_batch(b)?);
        }
        let total: usize = batches.iter().map(|b| b.tokens.len()).sum();
        let job = || crate::dist::Job::ForwardDp(batches.iter().map(crate::dist::OwnedBatch::of).collect());
        self.with_followers(job, &format!("DP forward of {total} tokens"), || self.forward_dp_local(kv, batches, new_slots))
    }

    fn forward_dp_local(&self, kv: &mut B::KvCache, batches: &[ForwardBatch], mut new_slots: Vec<Vec<u32>>) -> Result<B::Tensor, ModelError> {
        let b = &self.backend;
        let (rank, _) = b.tp_group();
        let (hidden, vocab) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let mine = &batches[rank];
        let slots = std::mem::take(&mut new_slots[rank]);
        let inputs = AttnInputs { positions: mine.positions, seqs: mine.seqs, new_slots: &slots, rope: &self.rope, dims: &self.dims, eps: self.cfg.rms_norm_eps as f32 };
        let tmax = batches.iter().map(|x| x.tokens.len()).max().unwrap_or(0);
        let mut resid = if mine.tokens.is_empty() { None } else { Some(b.embedding(&self.embed, mine.tokens)?) };
        if tmax > 0 {
            for (i, layer) in self.layers.iter().enumerate() {
                layer.forward_dp(b, resid.as_mut(), kv, i, &inputs, tmax)?;
            }
        }
        let lmax = batches.iter().map(|x| x.logit_rows.len()).max().unwrap_or(0);
        if lmax == 0 {
            return Ok(b.upload(0, vocab, &[])?);
        }
        let own = match &resid {
            Some(r) => b.gather_rows(r, mine.logit_rows)?,
            None => b.upload(0, hidden, &[])?,
        };
        let all = b.all_gather_rows(&own, lmax)?;
        let x = b.rms_norm(&all, &self.norm, inputs.eps)?;
        let logits = b.all_gather_cols(b.linear(&x, &self.lm_head)?, vocab)?;
        let rows: Vec<u32> = batches.iter().enumerate().flat_map(|(r, x)| (0..x.logit_rows.len()).map(move |j| (r * lmax + j) as u32)).collect();
        let out = b.gather_rows(&logits, &rows)?;
        debug_assert_eq!(out.cols(), vocab);
        Ok(out)
    }
}
