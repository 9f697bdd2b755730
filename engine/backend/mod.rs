//! The `Backend` trait: the single seam between the model and the hardware.
//!
//! It is ops-level, not a tensor library: buffers, the KV cache, and exactly the ops a DeepSeek
//! forward pass needs. The model (`crate::model`) is written once against it; `cpu/` is the f32
//! reference implementation that every GPU backend is tested against.
pub mod cpu;
pub mod cuda;
pub mod gpu;
pub mod rocm;
mod routing;
mod select;

pub use routing::{route_token, RouteParams};
pub use select::{BackendKind, BackendUnavailable};

use crate::config::RopeTables;
use crate::weights::HostLinear;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Unavailable(#[from] BackendUnavailable),
    #[error("{backend}: {op}: {msg}")]
    Op { backend: &'static str, op: &'static str, msg: String },
}

/// Dimensions of one MLA layer.
#[derive(Debug, Clone, Copy)]
pub struct MlaDims {
    pub num_heads: usize,
    pub qk_nope: usize,
    pub qk_rope: usize,
    pub v_head: usize,
    pub kv_lora_rank: usize,
    /// Softmax scale (qk_head_dim^-0.5 × YaRN mscale²).
    pub scale: f32,
}

impl MlaDims {
    pub fn qk_head(&self) -> usize {
        self.qk_nope + self.qk_rope
    }
    pub fn kv_entry(&self) -> usize {
        self.kv_lora_rank + self.qk_rope
    }
}

/// One sequence's part of a batched attention call. Its queries are rows
/// `q_start .. q_start + q_len` of the query tensor; `slots` lists the KV-cache slots of its whole
/// context in order, the last `q_len` of them being the new tokens (already written), so query `i`
/// attends causally to `slots[.. slots.len() - q_len + i + 1]`.
#[derive(Debug, Clone)]
pub struct AttnSeq<'a> {
    pub q_start: usize,
    pub q_len: usize,
    pub slots: &'a [u32],
}

/// Where a step's new MLA cache entries go and how they are rotated (`Backend::mla_kv_entry`):
/// row i to slot `slots[i]` of `layer`, at position `positions[i]`, RoPE on the columns from
/// `offset` (kv_lora_rank).
pub struct KvEntrySite<'a> {
    pub layer: usize,
    pub slots: &'a [u32],
    pub positions: &'a [u32],
    pub rope: &'a RopeTables,
    pub offset: usize,
}

/// The `rope` op's arguments: `heads` slices per row, `tables.half*2` wide, starting at column
/// `offset + h * head_stride`; row `i` at position `positions[i]`.
pub struct RopeSite<'a> {
    pub positions: &'a [u32],
    pub heads: usize,
    pub head_stride: usize,
    pub offset: usize,
    pub tables: &'a RopeTables,
}

/// One row of device-side sampling: the request's parameters, its penalty tokens
/// (token, count in the output so far, whether it occurs in the prompt) and a uniform draw.
pub struct SampleRow<'a> {
    pub params: &'a crate::sampling::SamplingParams,
    pub penalties: Vec<(u32, u32, bool)>,
    pub uniform: f32,
}

/// The host-side index data of one forward step, handed to `Backend::run_step` so a GPU backend
/// can upload it once (instead of per op and layer) and replay a captured graph. The ops of the
/// step receive these same slices.
pub struct StepInputs<'a> {
    /// Rows of the embedding table, one per token (token ids, or this rank's local rows under a
    /// vocabulary-parallel embedding).
    pub embed_ids: &'a [u32],
    pub positions: &'a [u32],
    /// The KV slot of each new token.
    pub new_slots: &'a [u32],
    pub seqs: &'a [AttnSeq<'a>],
    pub logit_rows: &'a [u32],
}

/// A decode step that may replay a captured graph.
#[derive(Debug, Clone, Copy)]
pub struct GraphStep {
    /// Rows of logits wanted (the real batch; the rest are padding)
    pub keep: usize,
    /// `Backend::kv_cache_id` of the cache the step runs on
    pub kv: u64,
}

/// Rows × columns of an activation tensor.
pub trait TensorShape {
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
}

/// `down(silu(x·gateᵀ) · (x·upᵀ))` from the unfused ops: linear, linear, SiLU·up, linear.
pub fn mlp_by_ops<B: Backend + ?Sized>(b: &B, x: &B::Tensor, [gate, up, down]: [&B::Linear; 3]) -> Result<B::Tensor, BackendError> {
    let h = b.silu_mul(&b.linear(x, gate)?, &b.linear(x, up)?)?;
    b.linear(&h, down)
}

/// `Backend::mlp_add` as `Backend::mlp`, then the add.
pub fn mlp_add_by_ops<B: Backend + ?Sized>(b: &B, x: &B::Tensor, [gate, up, down]: [&B::Linear; 3], y: &mut B::Tensor) -> Result<(), BackendError> {
    b.add(y, &b.mlp(x, gate, up, down)?)
}

/// `Backend::linear_pair` as two `linear`s.
pub fn linear_pair_by_ops<B: Backend + ?Sized>(b: &B, x: &B::Tensor, first: &B::Linear, second: &B::Linear) -> Result<(B::Tensor, B::Tensor), BackendError> {
    Ok((b.linear(x, first)?, b.linear(x, second)?))
}

/// The `rope` op at `site`.
pub fn rope_at<B: Backend + ?Sized>(b: &B, x: &mut B::Tensor, site: &RopeSite) -> Result<(), BackendError> {
    b.rope(x, site.positions, site.heads, site.head_stride, site.offset, site.tables)
}

/// `Backend::norm_linear` as `rms_norm`, `linear`, then `rope` where given.
pub fn norm_linear_by_ops<B: Backend + ?Sized>(b: &B, x: &B::Tensor, norm: &B::Tensor, eps: f32, w: &B::Linear, rope: Option<&RopeSite>) -> Result<B::Tensor, BackendError> {
    let mut y = b.linear(&b.rms_norm(x, norm, eps)?, w)?;
    if let Some(r) = rope {
        rope_at(b, &mut y, r)?;
    }
    Ok(y)
}

/// `Backend::norm_linear_kv_entry` as `norm_linear`, then `mla_kv_entry`.
pub fn norm_linear_kv_entry_by_ops<B: Backend + ?Sized>(b: &B, x: &B::Tensor, norm: &B::Tensor, eps: f32, w: &B::Linear, rope: Option<&RopeSite>, entry: KvEntryOp<B>) -> Result<B::Tensor, BackendError> {
    let y = b.norm_linear(x, norm, eps, w, rope)?;
    b.mla_kv_entry(entry.latent, entry.norm, entry.eps, entry.kv, entry.site)?;
    Ok(y)
}

/// `Backend::mla_kv_entry`'s arguments, for an op that runs it alongside another.
pub struct KvEntryOp<'a, B: Backend + ?Sized> {
    pub latent: &'a mut B::Tensor,
    pub norm: &'a B::Tensor,
    pub eps: f32,
    pub kv: &'a mut B::KvCache,
    pub site: &'a KvEntrySite<'a>,
}

/// `Backend::mla_kv_entry` as the norm, RoPE and cache-write ops in turn.
pub fn mla_kv_entry_by_ops<B: Backend + ?Sized>(b: &B, latent: &mut B::Tensor, norm: &B::Tensor, eps: f32, kv: &mut B::KvCache, site: &KvEntrySite) -> Result<(), BackendError> {
    b.rms_norm_cols(latent, 0, norm, eps)?;
    let stride = latent.cols();
    b.rope(latent, site.positions, 1, stride, site.offset, site.rope)?;
    b.kv_write(kv, site.layer, site.slots, latent)
}

/// `Backend::moe_experts_shared` as `moe_experts`, then `mlp_add`.
pub fn moe_experts_shared_by_ops<B: Backend + ?Sized>(b: &B, x: &B::Tensor, routing: &B::Routing, experts: &B::Experts, shared: Option<[&B::Linear; 3]>) -> Result<B::Tensor, BackendError> {
    let mut y = b.moe_experts(x, routing, experts)?;
    if let Some([g, u, d]) = shared {
        b.mlp_add(x, g, u, d, &mut y)?;
    }
    Ok(y)
}

pub trait Backend: Send + Sync + 'static {
    /// A 2-D activation buffer [rows, cols].
    type Tensor: TensorShape + Send + Sync;
    /// A linear layer's weight in this backend's layout.
    type Linear: Send + Sync;
    /// The routed experts of one MoE layer.
    type Experts: Send + Sync;
    /// Per-token expert ids and weights from `moe_route`.
    type Routing: Send + Sync;
    /// The latent KV cache: `slots` entries of `kv_entry` elements per layer.
    type KvCache: Send + Sync;

    fn name(&self) -> &'static str;

    /// (free, total) device memory in bytes, for sizing the KV pool; None on the CPU.
    fn memory_info(&self) -> Option<(usize, usize)> {
        None
    }
    /// Bytes one element of the KV cache takes.
    fn kv_element_bytes(&self) -> usize {
        4
    }

    // --- memory ---
    fn upload(&self, rows: usize, cols: usize, data: &[f32]) -> Result<Self::Tensor, BackendError>;
    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>, BackendError>;
    fn upload_linear(&self, w: &HostLinear) -> Result<Self::Linear, BackendError>;
    /// Two linear layers that read the same input (MLA's q_a and kv_a, an MLP's gate and up),
    /// stored where the backend can run them as one product; by default apart.
    fn upload_linear_pair(&self, first: &HostLinear, second: &HostLinear) -> Result<(Self::Linear, Self::Linear), BackendError> {
        Ok((self.upload_linear(first)?, self.upload_linear(second)?))
    }
    /// An MLA layer's kv_b (`[heads·(nope + v), kv_lora]`, this rank's heads); a backend may keep
    /// another layout of it for the absorbed attention (the GPU backends: W_UK transposed, so that
    /// the query projection runs as per-head GEMVs / GEMMs over `[N, K]` weight rows).
    fn upload_mla_kv_b(&self, w: &HostLinear, _nope: usize, _v_head: usize) -> Result<Self::Linear, BackendError> {
        self.upload_linear(w)
    }
    /// Experts `first ..` as (gate, up, down) triples, in expert-id order. Under expert parallelism
    /// a rank holds a contiguous range; routed pairs to experts outside it contribute nothing.
    fn upload_experts(&self, experts: Vec<[HostLinear; 3]>, first: usize) -> Result<Self::Experts, BackendError>;
    fn alloc_kv_cache(&self, layers: usize, slots: usize, kv_entry: usize) -> Result<Self::KvCache, BackendError>;

    // --- ops ---
    /// Rows `ids` of an embedding table stored as a [vocab, hidden] linear weight.
    fn embedding(&self, table: &Self::Linear, ids: &[u32]) -> Result<Self::Tensor, BackendError>;
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Tensor, eps: f32) -> Result<Self::Tensor, BackendError>;
    /// `residual += x`, then returns rms_norm(residual).
    fn add_rms_norm(&self, x: &Self::Tensor, residual: &mut Self::Tensor, w: &Self::Tensor, eps: f32) -> Result<Self::Tensor, BackendError>;
    /// RMSNorm in place over columns `start .. start + w.cols()` of each row.
    fn rms_norm_cols(&self, x: &mut Self::Tensor, start: usize, w: &Self::Tensor, eps: f32) -> Result<(), BackendError>;
    /// `x · Wᵀ`.
    fn linear(&self, x: &Self::Tensor, w: &Self::Linear) -> Result<Self::Tensor, BackendError>;
    /// `(x · firstᵀ, x · secondᵀ)`: two linears of one input (MLA's q_a and kv_a). Backends may
    /// run both in one launch (the GPU does at decode sizes); by default two `linear`s.
    fn linear_pair(&self, x: &Self::Tensor, first: &Self::Linear, second: &Self::Linear) -> Result<(Self::Tensor, Self::Tensor), BackendError> {
        linear_pair_by_ops(self, x, first, second)
    }
    /// `rms_norm(x, norm, eps) · Wᵀ`, then RoPE at `rope` where given (MLA's q_a_layernorm, q_b
    /// and the query's RoPE). Backends may fold the norm and the rotation into the product (the
    /// GPU does at decode sizes); by default the ops in turn.
    fn norm_linear(&self, x: &Self::Tensor, norm: &Self::Tensor, eps: f32, w: &Self::Linear, rope: Option<&RopeSite>) -> Result<Self::Tensor, BackendError> {
        norm_linear_by_ops(self, x, norm, eps, w, rope)
    }
    /// `norm_linear(x, norm, eps, w, rope)` and `mla_kv_entry` of `entry`: MLA's query (q_b of
    /// q_a's normed output) and the new cache entries (of kv_a's output), both from the first
    /// projections. Backends may run the two in one launch (the GPU does at decode sizes); by
    /// default the two ops.
    fn norm_linear_kv_entry(&self, x: &Self::Tensor, norm: &Self::Tensor, eps: f32, w: &Self::Linear, rope: Option<&RopeSite>, entry: KvEntryOp<Self>) -> Result<Self::Tensor, BackendError> {
        norm_linear_kv_entry_by_ops(self, x, norm, eps, w, rope, entry)
    }
    /// silu(gate) · up, elementwise.
    fn silu_mul(&self, gate: &Self::Tensor, up: &Self::Tensor) -> Result<Self::Tensor, BackendError>;
    /// `x += y`.
    fn add(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<(), BackendError>;
    /// `down(silu(x·gateᵀ) · (x·upᵀ))`: a dense layer's MLP. Backends may share work between its
    /// linears (the GPU quantises x once for gate and up at prefill sizes); by default the ops
    /// above in turn.
    fn mlp(&self, x: &Self::Tensor, gate: &Self::Linear, up: &Self::Linear, down: &Self::Linear) -> Result<Self::Tensor, BackendError> {
        mlp_by_ops(self, x, [gate, up, down])
    }
    /// `y += down(silu(x·gateᵀ) · (x·upᵀ))`: an MLP (a MoE layer's shared experts) added into `y`.
    /// Backends may fuse it (the GPU does at one row); by default `mlp`, then the add.
    fn mlp_add(&self, x: &Self::Tensor, gate: &Self::Linear, up: &Self::Linear, down: &Self::Linear, y: &mut Self::Tensor) -> Result<(), BackendError> {
        mlp_add_by_ops(self, x, [gate, up, down], y)
    }
    /// Rotary embedding in place on `heads` slices per row, each `rope.half*2` wide, starting at
    /// column `offset + h * head_stride`; row `i` has position `positions[i]`.
    fn rope(&self, x: &mut Self::Tensor, positions: &[u32], heads: usize, head_stride: usize, offset: usize, rope: &RopeTables) -> Result<(), BackendError>;
    /// Writes row `i` of `entries` ([T, kv_entry]) to `slots[i]` of layer `layer`.
    fn kv_write(&self, kv: &mut Self::KvCache, layer: usize, slots: &[u32], entries: &Self::Tensor) -> Result<(), BackendError>;
    /// The new tokens' MLA cache entries: RMSNorm (`norm`) in place over the first `norm.cols()`
    /// columns of `latent` (kv_a's output, [T, kv_entry]), RoPE in place on its rope columns, then
    /// `kv_write` at `site`. Backends may fuse it (the GPU does); by default the three ops in turn.
    fn mla_kv_entry(&self, latent: &mut Self::Tensor, norm: &Self::Tensor, eps: f32, kv: &mut Self::KvCache, site: &KvEntrySite) -> Result<(), BackendError> {
        mla_kv_entry_by_ops(self, latent, norm, eps, kv, site)
    }
    /// MLA attention over the latent cache. `q` is [T, heads·(qk_nope+qk_rope)] with RoPE applied;
    /// `kv_b` is the layer's kv_b_proj [heads·(qk_nope+v), kv_lora_rank]; returns [T, heads·v].
    fn mla_attention(&self, q: &Self::Tensor, kv: &Self::KvCache, layer: usize, seqs: &[AttnSeq], kv_b: &Self::Linear, dims: &MlaDims) -> Result<Self::Tensor, BackendError>;
    /// `mla_attention`, then the output projection `o` (`linear`). Backends may hand the
    /// attention's output to `o` in another form (the GPU: FP8 codes from the value projection).
    #[allow(clippy::too_many_arguments)]
    fn mla_attention_linear(&self, q: &Self::Tensor, kv: &Self::KvCache, layer: usize, seqs: &[AttnSeq], kv_b: &Self::Linear, dims: &MlaDims, o: &Self::Linear) -> Result<Self::Tensor, BackendError> {
        self.linear(&self.mla_attention(q, kv, layer, seqs, kv_b, dims)?, o)
    }
    /// Router: scores and top-k selection per token.
    fn moe_route(&self, x: &Self::Tensor, gate: &Self::Linear, bias: Option<&[f32]>, p: &RouteParams) -> Result<Self::Routing, BackendError>;
    /// Σ_k w_k · expert_k(x) per token.
    fn moe_experts(&self, x: &Self::Tensor, routing: &Self::Routing, experts: &Self::Experts) -> Result<Self::Tensor, BackendError>;
    /// `moe_experts`, plus a MoE layer's shared experts' MLP (`shared`: gate, up, down) where
    /// given. Backends may fuse the two (the GPU does at one row: the shared experts as one more
    /// pair of the routed kernels); by default `moe_experts`, then `mlp_add`.
    fn moe_experts_shared(&self, x: &Self::Tensor, routing: &Self::Routing, experts: &Self::Experts, shared: Option<[&Self::Linear; 3]>) -> Result<Self::Tensor, BackendError> {
        moe_experts_shared_by_ops(self, x, routing, experts, shared)
    }
    /// The given rows of `x`, in order.
    fn gather_rows(&self, x: &Self::Tensor, rows: &[u32]) -> Result<Self::Tensor, BackendError>;

    /// Profiling mark of a forward pass: layer `layer` begins (None: the layers are done). GPU
    /// backends time the spans between marks while profiling (`engine bench --profile`'s per-layer
    /// times); by default nothing.
    fn mark_layer(&self, _layer: Option<usize>) -> Result<(), BackendError> {
        Ok(())
    }

    /// Waits for all queued device work (no-op on the CPU).
    fn synchronize(&self) -> Result<(), BackendError> {
        Ok(())
    }

    // --- tensor-parallel collectives (no-ops for a group of one) ---
    /// (rank, size) of this backend's tensor-parallel group.
    fn tp_group(&self) -> (usize, usize) {
        (0, 1)
    }
    /// Sums `x` over the group, in place.
    fn all_reduce(&self, _x: &mut Self::Tensor) -> Result<(), BackendError> {
        Ok(())
    }
    /// Concatenates every rank's columns: [T, c] on each rank → [T, `total`] (rank order; the
    /// trailing `size·c − total` padding columns are dropped).
    fn all_gather_cols(&self, x: Self::Tensor, total: usize) -> Result<Self::Tensor, BackendError> {
        assert_eq!(x.cols(), total, "all_gather_cols without a group");
        Ok(x)
    }

    /// DP attention: every rank's rows, each rank's `x` ([≤ per_rank, c]) padded with zero rows to
    /// `per_rank`, concatenated in rank order → [size·per_rank, c].
    fn all_gather_rows(&self, _x: &Self::Tensor, _per_rank: usize) -> Result<Self::Tensor, BackendError> {
        Err(BackendError::Op { backend: self.name(), op: "all_gather_rows", msg: "needs a tensor-parallel group".into() })
    }
    /// DP attention: `x` is [size·per_rank, c] on every rank; sums it over the ranks and returns
    /// the first `keep` rows of this rank's block.
    fn reduce_scatter_rows(&self, _x: &Self::Tensor, _keep: usize) -> Result<Self::Tensor, BackendError> {
        Err(BackendError::Op { backend: self.name(), op: "reduce_scatter_rows", msg: "needs a tensor-parallel group".into() })
    }

    /// The batch size a decode step of `tokens` tokens is padded to so that it replays a captured
    /// graph (CUDA graphs), or None: no graphs on this backend, or `tokens` beyond the largest
    /// captured size.
    fn graph_batch(&self, _tokens: usize) -> Option<usize> {
        None
    }

    /// What identifies a KV cache's device memory and layout (a captured graph holds its address).
    fn kv_cache_id(&self, _kv: &Self::KvCache) -> u64 {
        0
    }

    /// Runs one forward step (`run`, the model's host code, which issues the ops). `graph`: the
    /// step is a decode step padded to `graph_batch` rows, so it may be captured once and
    /// replayed. Returns the logits.
    fn run_step<E: From<BackendError>>(&self, inputs: &StepInputs, graph: Option<GraphStep>, run: &mut dyn FnMut(&StepInputs) -> Result<Self::Tensor, E>) -> Result<Self::Tensor, E> {
        let _ = graph;
        run(inputs)
    }

    /// Picks one token per row of `logits` on the device (penalties applied in place), or None when
    /// this backend samples on the host (the CPU reference does).
    fn sample(&self, _logits: &mut Self::Tensor, _rows: &[SampleRow]) -> Result<Option<Vec<u32>>, BackendError> {
        Ok(None)
    }
}
