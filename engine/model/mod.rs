//! DeepSeek V2/V3, written once against `Backend`.
mod dp;
mod launch;
mod layer;
mod mla;
mod mlp;
pub mod mtp;
mod shard;
mod step;

pub use launch::{launch, DeviceOpts, RankBackend, RankCtx, Role};
pub use shard::Shard;

use std::path::Path;

use layer::DecoderLayer;
use mla::AttnInputs;

use crate::backend::{AttnSeq, Backend, BackendError, MlaDims, StepInputs, TensorShape};
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
    #[error("parallel layout: {0}")]
    Parallel(String),
}

/// Loading context: the checkpoint, its config and the backend that receives the weights.
pub struct WeightsCtx<'a, B: Backend> {
    pub store: &'a WeightStore,
    pub cfg: &'a ModelConfig,
    pub backend: &'a B,
    pub shard: Shard,
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
    /// Output rows `rows` of a weight (column-parallel: this rank's heads or intermediate columns).
    pub fn linear_rows(&self, prefix: &str, out: usize, inp: usize, rows: std::ops::Range<usize>) -> Result<B::Linear, ModelError> {
        Ok(self.backend.upload_linear(&self.host_linear(prefix, out, inp)?.slice_rows(rows))?)
    }
    /// Two layers that read the same input (`Backend::upload_linear_pair`).
    pub fn linear_pair(&self, first: &HostLinear, second: &HostLinear) -> Result<(B::Linear, B::Linear), ModelError> {
        Ok(self.backend.upload_linear_pair(first, second)?)
    }
    /// An MLA layer's kv_b, rows `rows` (this rank's heads), for the absorbed attention.
    pub fn mla_kv_b(&self, prefix: &str, out: usize, rows: std::ops::Range<usize>) -> Result<B::Linear, ModelError> {
        let c = self.cfg;
        let w = self.host_linear(prefix, out, c.kv_lora_rank)?.slice_rows(rows);
        Ok(self.backend.upload_mla_kv_b(&w, c.qk_nope_head_dim, c.v_head_dim)?)
    }
    /// Input columns `cols` of a weight (row-parallel: its output is summed over the ranks).
    pub fn linear_cols(&self, prefix: &str, out: usize, inp: usize, cols: std::ops::Range<usize>) -> Result<B::Linear, ModelError> {
        Ok(self.backend.upload_linear(&self.host_linear(prefix, out, inp)?.slice_cols(cols))?)
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
    /// Vocabulary-parallel embedding: this rank's id range and the index of its zero row
    embed_slice: Option<(std::ops::Range<usize>, u32)>,
    layers: Vec<DecoderLayer<B>>,
    norm: B::Tensor,
    lm_head: B::Linear,
    rope: RopeTables,
    dims: MlaDims,
    /// This rank's followers when it leads a tensor-parallel group
    group: Option<crate::dist::Group>,
    shard: Shard,
    /// Bytes of the checkpoint's tensors (all ranks' shares together)
    pub checkpoint_bytes: u64,
    /// The KV cache's scratch slot, where padded rows of graph steps write (u32::MAX: no cache yet)
    kv_scratch: std::sync::atomic::AtomicU32,
}

impl<B: Backend> Model<B> {
    pub fn load(backend: B, dir: &Path) -> Result<Self, ModelError> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let store = WeightStore::open(dir)?;
        Self::from_store(backend, cfg, &store, Shard::single())
    }

    /// Loads this rank's `shard` of the checkpoint (the whole model for `Shard::single()`).
    pub fn from_store(backend: B, cfg: ModelConfig, store: &WeightStore, shard: Shard) -> Result<Self, ModelError> {
        let (brank, bsize) = backend.tp_group();
        if (brank, bsize) != (shard.rank, shard.size) {
            return Err(ModelError::Parallel(format!("backend is rank {brank} of {bsize} but the shard is rank {} of {}", shard.rank, shard.size)));
        }
        let heads = shard.heads(cfg.num_attention_heads)?;
        let w = WeightsCtx { store, cfg: &cfg, backend: &backend, shard };
        let (v, hs) = (cfg.vocab_size, cfg.hidden_size);
        let mut progress = Progress::new("loading weights", cfg.num_hidden_layers as u64 + 1);
        // vocabulary-parallel embedding under tensor parallelism: each rank holds its slice plus
        // a zero row that ids of other slices map to; the all-reduce then gives every rank the
        // embedding (exactly: one rank contributes each row, the others zeros). DP attention
        // keeps it whole, since each rank embeds only its own tokens.
        let (embed, embed_slice) = if shard.size > 1 && !shard.dp_attention {
            let (rows, len) = shard.padded_part(v);
            let table = store.linear("model.embed_tokens", v, hs, None)?.slice_rows_padded(rows.clone(), len + 1);
            (backend.upload_linear(&table)?, Some((rows, len as u32)))
        } else {
            (w.dense_linear("model.embed_tokens", v, hs)?, None)
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            layers.push(DecoderLayer::load(&w, i)?);
            progress.advance(1);
        }
        let norm = w.vector("model.norm.weight", hs)?;
        // vocabulary-parallel lm_head: each rank scores its slice, padded to equal size
        let head_name = if cfg.tie_word_embeddings && !store.contains("lm_head.weight") { "model.embed_tokens" } else { "lm_head" };
        let (vrows, vlen) = shard.padded_part(v);
        let lm_head = backend.upload_linear(&store.linear(head_name, v, hs, None)?.slice_rows_padded(vrows, vlen))?;
        progress.advance(1);
        progress.finish();
        let mtp = store.names().filter(|n| mtp::is_mtp_tensor(n, cfg.num_hidden_layers)).count();
        if mtp > 0 {
            log::info!("skipping {mtp} MTP tensors (model.layers.{}.*): the plain forward pass does not use them", cfg.num_hidden_layers);
        }
        let dims = MlaDims {
            num_heads: heads.len(),
            qk_nope: cfg.qk_nope_head_dim,
            qk_rope: cfg.qk_rope_head_dim,
            v_head: cfg.v_head_dim,
            kv_lora_rank: cfg.kv_lora_rank,
            scale: cfg.softmax_scale() as f32,
        };
        let rope = RopeTables::new(&cfg.rope);
        Ok(Model { cfg, backend, embed, embed_slice, layers, norm, lm_head, rope, dims, group: None, shard, checkpoint_bytes: store.total_bytes(), kv_scratch: u32::MAX.into() })
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Makes this model the lead of `group`: every forward and KV allocation runs on the
    /// followers too.
    pub fn set_group(&mut self, group: crate::dist::Group) {
        self.group = Some(group);
    }

    /// At the end of a run: follower nodes are told to exit (a no-op without them).
    pub fn stop_followers(&self) {
        if let Some(g) = &self.group {
            g.stop();
        }
    }

    /// Runs `f` here and `job` on every follower; fails if any rank failed.
    fn with_followers<T>(&self, job: impl FnOnce() -> crate::dist::Job, step: &str, f: impl FnOnce() -> Result<T, ModelError>) -> Result<T, ModelError> {
        let Some(g) = &self.group else { return f() };
        g.watchdog.enter(step.to_string());
        g.dispatch(&job()).map_err(ModelError::Parallel)?;
        let mine = f().and_then(|t| {
            self.backend.synchronize()?;
            Ok(t)
        });
        let theirs = g.collect();
        g.watchdog.leave();
        // inputs were checked before dispatch, so a failure here leaves the ranks out of step
        // (one may have entered a collective the others never will): the group cannot go on
        let failure = match (&mine, theirs) {
            (Err(e), _) => Some(format!("rank {}: {e}", g.rank)),
            (Ok(_), Err(e)) => Some(e),
            _ => None,
        };
        if let Some(e) = failure {
            eprintln!("error: tensor-parallel step `{step}` failed: {e}; exiting (the group cannot continue without every rank)");
            crate::dist::exit_now(1);
        }
        mine
    }

    /// Allocates a latent KV cache of `slots` tokens for this model (and for each follower), plus
    /// one scratch slot (index `slots`) that padded rows of graph-replayed decode steps write.
    pub fn alloc_kv_cache(&self, slots: usize) -> Result<B::KvCache, ModelError> {
        let scratch = u32::try_from(slots).map_err(|_| ModelError::Input(format!("a KV cache of {slots} slots exceeds the 32-bit slot index")))?;
        let kv = self.with_followers(|| crate::dist::Job::AllocKv(slots), "allocate the KV cache", || Ok(self.backend.alloc_kv_cache(self.layers.len(), slots + 1, self.dims.kv_entry())?))?;
        self.kv_scratch.store(scratch, std::sync::atomic::Ordering::Relaxed);
        Ok(kv)
    }

    /// Seconds per all-reduce of `elems` floats over the whole group (after 3 warm-up calls).
    pub fn comm_bench(&self, elems: usize, iters: usize) -> Result<f64, ModelError> {
        self.with_followers(|| crate::dist::Job::CommBench { elems, iters }, "all-reduce benchmark", || self.time_all_reduce(elems, iters))
    }

    fn time_all_reduce(&self, elems: usize, iters: usize) -> Result<f64, ModelError> {
        let b = &self.backend;
        let data: Vec<f32> = (0..elems).map(|i| (i % 13) as f32 * 0.25).collect();
        let mut t = b.upload(1, elems, &data)?;
        for _ in 0..3 {
            b.all_reduce(&mut t)?;
        }
        b.synchronize()?;
        let t0 = std::time::Instant::now();
        for _ in 0..iters {
            b.all_reduce(&mut t)?;
        }
        b.synchronize()?;
        Ok(t0.elapsed().as_secs_f64() / iters.max(1) as f64)
    }

    /// A follower's side of one job: `kv` is the follower's own cache.
    pub fn run_job(&self, kv: &mut Option<B::KvCache>, job: &crate::dist::Job) -> Result<(), ModelError> {
        match job {
            crate::dist::Job::AllocKv(n) => *kv = Some(self.alloc_kv_cache(*n)?),
            crate::dist::Job::Stop => {}
            crate::dist::Job::CommBench { elems, iters } => {
                self.time_all_reduce(*elems, *iters)?;
            }
            crate::dist::Job::ForwardDp(bs) => {
                let kv = kv.as_mut().ok_or_else(|| ModelError::Parallel("forward before the KV cache was allocated".into()))?;
                let seqs: Vec<Vec<AttnSeq>> = bs.iter().map(|b| b.seqs_view()).collect();
                let views: Vec<ForwardBatch> = bs.iter().zip(&seqs).map(|(b, s)| b.view(s)).collect();
                self.forward_dp(kv, &views)?;
                self.backend.synchronize()?;
            }
            crate::dist::Job::Forward(b) => {
                let kv = kv.as_mut().ok_or_else(|| ModelError::Parallel("forward before the KV cache was allocated".into()))?;
                b.with_view(|fb| self.forward(kv, fb))?;
                self.backend.synchronize()?;
            }
        }
        Ok(())
    }

    /// Runs the batch, writing its latents into `kv`; returns logits [logit_rows, vocab].
    pub fn forward(&self, kv: &mut B::KvCache, batch: &ForwardBatch) -> Result<B::Tensor, ModelError> {
        if self.dp_size() > 1 {
            return Err(ModelError::Parallel("with DP attention every step is a forward_dp of one batch per rank".into()));
        }
        let new_slots = self.check_batch(batch)?;
        // checked above, so every rank gets a batch it can run
        let t = batch.tokens.len();
        self.with_followers(|| crate::dist::Job::Forward(crate::dist::OwnedBatch::of(batch)), &format!("forward of {t} tokens"), || self.forward_local(kv, batch, new_slots))
    }

    /// Checks a batch before any rank runs it; returns the KV slots of its new tokens.
    fn check_batch(&self, batch: &ForwardBatch) -> Result<Vec<u32>, ModelError> {
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
        Ok(new_slots)
    }

    /// The layers, final norm and lm_head over one step's inputs (what `Backend::run_step` runs).
    fn forward_rows(&self, kv: &mut B::KvCache, step: &StepInputs) -> Result<B::Tensor, ModelError> {
        let b = &self.backend;
        let inputs = AttnInputs { positions: step.positions, seqs: step.seqs, new_slots: step.new_slots, rope: &self.rope, dims: &self.dims, eps: self.cfg.rms_norm_eps as f32 };
        let mut resid = b.embedding(&self.embed, step.embed_ids)?;
        if self.embed_slice.is_some() {
            b.all_reduce(&mut resid)?;
        }
        // each layer's MLP output is added to the residual stream by the next layer's input norm
        let mut pending = None;
        for (i, layer) in self.layers.iter().enumerate() {
            b.mark_layer(Some(i))?;
            pending = Some(layer.forward(b, &mut resid, pending.take(), kv, i, &inputs)?);
        }
        // ... and the last one here, before the rows that get logits are gathered and normed
        if let Some(y) = pending {
            b.add(&mut resid, &y)?;
        }
        b.mark_layer(None)?;
        let last = b.gather_rows(&resid, step.logit_rows)?;
        let x = b.rms_norm(&last, &self.norm, inputs.eps)?;
        let logits = b.all_gather_cols(b.linear(&x, &self.lm_head)?, self.cfg.vocab_size)?;
        debug_assert_eq!(logits.cols(), self.cfg.vocab_size);
        Ok(logits)
    }
}
