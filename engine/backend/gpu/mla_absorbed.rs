//! MLA in the absorbed (MQA) form over the latent cache: the decode path, and prompts where the
//! flash kernel does not take them. Each query to the latent space (mla_proj.rs), the decode
//! kernel over the paged cache (mla_decode.rs's matrix-unit kernels, or mla.hip's CUDA-core one
//! here), the context splits merged, then the latents out to values (mla_proj.rs).
use super::backend::{GpuBackend, GpuTensor, GpuVendor};
use super::device::{err, DevBuf, LaunchConfig};
use super::mla_decode::Latents;
use super::ops::{GpuKvCache, GpuLinear};
use super::step;
use super::ModelDims;
use crate::backend::{AttnSeq, BackendError, MlaDims};

impl<V: GpuVendor> GpuBackend<V> {
    /// MLA in the absorbed (MQA) form over the latent cache: the decode path, and prefill where the
    /// flash kernel does not apply.
    pub(super) fn mla_absorbed(&self, q: &GpuTensor, kv: &GpuKvCache, layer: usize, seqs: &[AttnSeq], kv_b: &GpuLinear, d: &MlaDims) -> Result<GpuTensor, BackendError> {
        let lat = self.mla_absorbed_latents(q, kv, layer, seqs, kv_b, d)?;
        self.mla_values(&lat, q.rows, kv_b, d)
    }

    /// The absorbed attention up to its latents ([T, heads, kv_lora]: bf16 where the warpgroup
    /// kernel writes them for the value projection's `_bx` kernels, else f32).
    pub(super) fn mla_absorbed_latents(&self, q: &GpuTensor, kv: &GpuKvCache, layer: usize, seqs: &[AttnSeq], kv_b: &GpuLinear, d: &MlaDims) -> Result<Latents, BackendError> {
        let t = q.rows;
        // per token: where its context starts in the flattened slot list, and how long it is
        // (causal): the step's copy when these are the step's sequences, else uploaded here
        let mut owned = Vec::new();
        let a = match self.step_attn(seqs) {
            Some(a) => a,
            None => {
                let a = step::attn_index(seqs, t);
                let (flat, off, len) = (self.idx(&a.flat)?, self.idx(&a.off)?, self.idx(&a.len)?);
                let dev = step::AttnDev { flat: flat.0, off: off.0, len: len.0, max_len: a.max_len };
                owned.extend([flat, off, len]);
                dev
            }
        };
        // the warpgroup decode kernel takes q_lat as bf16 where the heads kernel makes it so, and
        // writes its latents as bf16 where the value projection's heads kernel reads them so
        let mma = self.mma_decode(d, kv);
        let n = t * d.num_heads * d.kv_lora_rank;
        let q16 = if mma && self.wg_decode(d, t) { self.mla_q_latent_bf16(q, kv_b, d)? } else { None };
        let (q_lat, mut lat) = match q16 {
            Some(b) if self.mla_v_out_bf16(t, kv_b, d) => (Latents::Bf16(b), Latents::Bf16(self.scratch::<u16>(n)?)), // every element written
            Some(b) => (Latents::Bf16(b), Latents::F32(self.alloc_out(n)?)),
            None => {
                let mut b = self.alloc_out(n)?;
                self.mla_q_latent(q, kv_b, d, &mut b)?;
                (Latents::F32(b), Latents::F32(self.alloc_out(n)?))
            }
        };
        match (&q_lat, &mut lat) {
            _ if mma => self.mla_decode_mma(q, &q_lat, kv, layer, &a, d, &mut lat)?,
            (Latents::F32(b), Latents::F32(lat)) => self.mla_decode_cuda_cores(q, b, kv, layer, &a, d, lat)?,
            _ => return Err(self.op_err("mla_attention", "bf16 latents are the warpgroup kernel's only".into())),
        }
        Ok(lat)
    }

    /// The absorbed attention on the CUDA cores (mla.hip; f32): `lat` = each token's heads'
    /// attention-weighted latents.
    #[allow(clippy::too_many_arguments)]
    fn mla_decode_cuda_cores(&self, q: &GpuTensor, q_lat: &DevBuf<f32>, kv: &GpuKvCache, layer: usize, a: &step::AttnDev, d: &MlaDims, lat: &mut DevBuf<f32>) -> Result<(), BackendError> {
        let (t, dims, heads) = (q.rows, ModelDims::of_mla(d), d.num_heads as i32);
        let (d_flat, d_off, d_len) = (a.flat, a.off, a.len);
        // four heads per block share each cache entry they read
        let hpb = if d.num_heads.is_multiple_of(4) { 4 } else { 1 };
        let f = self.mla_func(dims, &format!("mla_attention{}{}", if hpb == 4 { "4" } else { "" }, if kv.bf16 { "_bf16c" } else { "" }))?;
        let (l, ns, scale) = (layer as i32, kv.slots as i32, d.scale);
        let warps = self.warps_per_block();
        let shared = (warps * (2 + d.kv_lora_rank) * 4) as u32;
        // split-K over the sequence when too few (token, head) blocks would fill the GPU
        let splits = step::attn_splits(t * d.num_heads / hpb, a.max_len, self.in_graph_step());
        let part_len = if splits > 1 { t * d.num_heads * splits * (2 + d.kv_lora_rank) } else { 1 };
        let mut part = self.zeros::<f32>(part_len)?;
        let (sp, min_chunk) = (splits as i32, step::SPLIT_MIN_KEYS as i32);
        self.span("attention", || {
            let mut b = self.launch(&f);
            b.arg(&q.buf).arg(q_lat).arg(&kv.buf).arg(&d_flat).arg(&d_off).arg(&d_len).arg(&mut *lat).arg(&heads).arg(&l).arg(&ns).arg(&scale).arg(&sp).arg(&min_chunk).arg(&mut part);
            let launch = LaunchConfig { grid_dim: (t as u32, (d.num_heads / hpb) as u32, splits as u32), block_dim: (256, 1, 1), shared_mem_bytes: shared };
            b.run(launch).map_err(err("mla_attention"))?;
            self.mla_merge_splits(dims, &part, lat, t, d.num_heads, splits)
        })
    }

    /// Combines each (token, head)'s `splits` context partials in `part` ([T, heads, splits,
    /// 2 + kv_lora]) into `lat` (mla.hip's `mla_merge`); one split wrote `lat` itself.
    pub(super) fn mla_merge_splits(&self, dims: ModelDims, part: &DevBuf<f32>, lat: &mut DevBuf<f32>, t: usize, heads: usize, splits: usize) -> Result<(), BackendError> {
        if splits <= 1 {
            return Ok(());
        }
        // mla.hip's MERGE_MAX_SPLITS (both split policies stay within it)
        use super::mla_decode::{merge_shape, MERGE_MAX_SPLITS};
        if splits > MERGE_MAX_SPLITS {
            return Err(self.op_err("mla_merge", format!("{splits} context splits (at most {MERGE_MAX_SPLITS})")));
        }
        let f = self.mla_func(dims, "mla_merge")?;
        let (h, sp) = (heads as i32, splits as i32);
        let (threads, chunks, zw) = merge_shape(t * heads, dims.kv_lora_rank, splits, self.sms, self.warp);
        let launch = LaunchConfig { grid_dim: (t as u32, heads as u32, chunks as u32), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        let zw = zw as i32;
        self.launch(&f).arg(part).arg(lat).arg(&h).arg(&sp).arg(&zw).run(launch).map_err(err("mla_merge"))
    }
}
