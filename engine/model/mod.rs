//! DeepSeek V2/V3, written once against `Backend`.
mod layer;
mod mla;
mod mlp;
pub mod mtp;

use std::path::Path;

use layer::DecoderLayer;
use mla::AttnInputs;

use crate::backend::{AttnSeq, Backend, BackendError, MlaDims, TensorShape};
use crate::config::{ConfigError, ModelConfig, RopeTables};
use crate::weights::{HostLinear, Progress, WeightError, WeightStore};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("invalid input: {0}")]
    Input(String),
}

/// Loading context: the checkpoint, its config and the backend that receives the weights.
pub struct WeightsCtx<'a, B: Backend> {
    pub store: &'a WeightStore,
    pub cfg: &'a ModelConfig,
    pub backend: &'a B,
}

impl<B: Backend> WeightsCtx<'_, B> {
    fn block(&self) -> Option<(usize, usize)> {
        self.cfg.quantization.as_ref().map(|q| (q.block_n, q.block_k))
    }
    /// A linear weight as stored (FP8 allowed when the checkpoint is quantised).
    pub fn host_linear(&self, prefix: &str, out: usize, inp: usize) -> Result<HostLinear, ModelError> {
        Ok(self.store.linear(prefix, out, inp, self.block())?)
    }
    pub fn linear(&self, prefix: &str, out: usize, inp: usize) -> Result<B::Linear, ModelError> {
        Ok(self.backend.upload_linear(&self.host_linear(prefix, out, inp)?)?)
    }
    /// A linear weight that is never FP8 (router, embeddings, lm_head).
    pub fn dense_linear(&self, prefix: &str, out: usize, inp: usize) -> Result<B::Linear, ModelError> {
        Ok(self.backend.upload_linear(&self.store.linear(prefix, out, inp, None)?)?)
    }
    pub fn vector(&self, name: &str, n: usize) -> Result<B::Tensor, ModelError> {
        let v = self.store.vector(name, n)?;
        Ok(self.backend.upload(1, n, &v)?)
    }
}

/// A batch of new tokens from one or more sequences, concatenated sequence by sequence.
pub struct ForwardBatch<'a> {
    pub tokens: &'a [u32],
    pub positions: &'a [u32],
    /// Per sequence: its rows of `tokens` and the KV slots of its whole context (new tokens last).
    pub seqs: &'a [AttnSeq<'a>],
    /// Rows of `tokens` whose logits are wanted, in output order.
    pub logit_rows: &'a [u32],
}

pub struct Model<B: Backend> {
    pub cfg: ModelConfig,
    pub backend: B,
    embed: B::Linear,
    layers: Vec<DecoderLayer<B>>,
    norm: B::Tensor,
    lm_head: B::Linear,
    rope: RopeTables,
    dims: MlaDims,
}

impl<B: Backend> Model<B> {
    pub fn load(backend: B, dir: &Path) -> Result<Self, ModelError> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let store = WeightStore::open(dir)?;
        Self::from_store(backend, cfg, &store)
    }

    pub fn from_store(backend: B, cfg: ModelConfig, store: &WeightStore) -> Result<Self, ModelError> {
        let w = WeightsCtx { store, cfg: &cfg, backend: &backend };
        let (v, hs) = (cfg.vocab_size, cfg.hidden_size);
        let mut progress = Progress::new("loading weights", cfg.num_hidden_layers as u64 + 1);
        let embed = w.dense_linear("model.embed_tokens", v, hs)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            layers.push(DecoderLayer::load(&w, i)?);
            progress.advance(1);
        }
        let norm = w.vector("model.norm.weight", hs)?;
        let lm_head = if cfg.tie_word_embeddings && !store.contains("lm_head.weight") {
            w.dense_linear("model.embed_tokens", v, hs)?
        } else {
            w.dense_linear("lm_head", v, hs)?
        };
        progress.advance(1);
        progress.finish();
        let mtp = store.names().filter(|n| mtp::is_mtp_tensor(n, cfg.num_hidden_layers)).count();
        if mtp > 0 {
            log::info!("skipping {mtp} MTP tensors (model.layers.{}.*): the plain forward pass does not use them", cfg.num_hidden_layers);
        }
        let dims = MlaDims {
            num_heads: cfg.num_attention_heads,
            qk_nope: cfg.qk_nope_head_dim,
            qk_rope: cfg.qk_rope_head_dim,
            v_head: cfg.v_head_dim,
            kv_lora_rank: cfg.kv_lora_rank,
            scale: cfg.softmax_scale() as f32,
        };
        let rope = RopeTables::new(&cfg.rope);
        Ok(Model { cfg, backend, embed, layers, norm, lm_head, rope, dims })
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Allocates a latent KV cache of `slots` tokens for this model.
    pub fn alloc_kv_cache(&self, slots: usize) -> Result<B::KvCache, ModelError> {
        Ok(self.backend.alloc_kv_cache(self.layers.len(), slots, self.dims.kv_entry())?)
    }

    /// Runs the batch, writing its latents into `kv`; returns logits [logit_rows, vocab].
    pub fn forward(&self, kv: &mut B::KvCache, batch: &ForwardBatch) -> Result<B::Tensor, ModelError> {
        let t = batch.tokens.len();
        if batch.positions.len() != t {
            return Err(ModelError::Input(format!("{} positions for {t} tokens", batch.positions.len())));
        }
        if let Some(&bad) = batch.tokens.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            return Err(ModelError::Input(format!("token id {bad} is outside the vocabulary (size {})", self.cfg.vocab_size)));
        }
        let mut new_slots = Vec::with_capacity(t);
        let mut next = 0;
        for s in batch.seqs {
            if s.q_start != next || s.q_len > s.slots.len() {
                return Err(ModelError::Input("sequences must cover the tokens in order, each with its slots".into()));
            }
            new_slots.extend_from_slice(&s.slots[s.slots.len() - s.q_len..]);
            next += s.q_len;
        }
        if next != t {
            return Err(ModelError::Input(format!("sequences cover {next} of {t} tokens")));
        }
        if let Some(&r) = batch.logit_rows.iter().find(|&&r| r as usize >= t) {
            return Err(ModelError::Input(format!("logit row {r} is outside the batch of {t} tokens")));
        }
        let b = &self.backend;
        let inputs = AttnInputs {
            positions: batch.positions,
            seqs: batch.seqs,
            new_slots: &new_slots,
            rope: &self.rope,
            dims: &self.dims,
            eps: self.cfg.rms_norm_eps as f32,
        };
        let mut resid = b.embedding(&self.embed, batch.tokens)?;
        for (i, layer) in self.layers.iter().enumerate() {
            layer.forward(b, &mut resid, kv, i, &inputs)?;
        }
        let last = b.gather_rows(&resid, batch.logit_rows)?;
        let x = b.rms_norm(&last, &self.norm, inputs.eps)?;
        let logits = b.linear(&x, &self.lm_head)?;
        debug_assert_eq!(logits.cols(), self.cfg.vocab_size);
        Ok(logits)
    }
}
