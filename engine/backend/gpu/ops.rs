//! `Backend` for `GpuBackend`: buffers and kernel launches.
use super::backend::{GpuBackend, GpuTensor, GpuVendor};
use super::device::{err, DevBuf, LaunchConfig};
use crate::backend::{AttnSeq, Backend, BackendError, GraphStep, KvEntrySite, MlaDims, RouteParams, SampleRow, StepInputs};
use crate::config::RopeTables;
use crate::weights::{HostLinear, LinearData};

const EW: &str = "hip-kernels/elementwise.hip";
const NORM: &str = "hip-kernels/norm.hip";
const ROPE: &str = "hip-kernels/rope.hip";
/// Rows from which `rope` runs one block a row (enough blocks to fill the device)
const ROPE_ROW_BLOCK_ROWS: usize = 128;
const KV_ENTRY: &str = "hip-kernels/mla_kv_entry.hip";
const LIN: &str = "hip-kernels/linear.hip";
const SAMPLE: &str = "hip-kernels/sampling.hip";
/// Profile class of MLA's kv_b projections (q into the latent space, the latent out to v, and the
/// prefill's K/V decompression)
pub(super) const ATTN_PROJ: &str = "attention projections";

/// A weight in its checkpoint dtype on the device.
pub struct GpuLinear {
    pub out: usize,
    pub inp: usize,
    /// 0 f32, 1 bf16, 2 fp8 (the kernels' WDT_*)
    pub wdt: u8,
    pub data: DevBuf<u8>,
    /// FP8 block scales (a single dummy element otherwise)
    pub scales: DevBuf<f32>,
    pub bn: i32,
    pub bk: i32,
    /// An MLA kv_b's W_UK transposed (`weights::wuk_transposed`), for the query → latent
    /// projection as per-head GEMMs or GEMVs (mla_proj.rs)
    pub wuk_t: Option<Box<GpuLinear>>,
    /// The layer this one and the next uploaded beside it form (joint.rs)
    pub joint: Option<std::sync::Arc<GpuLinear>>,
}

/// Whether the new cache entries of `latent` take one launch (mla_kv_entry.hip, or the tail of
/// q_b's fused GEMV): each row has its slot and position and is a whole entry.
pub(super) fn kv_entry_one_launch(latent: &GpuTensor, kv: &GpuKvCache, site: &KvEntrySite) -> bool {
    let rows = latent.rows;
    rows > 0 && site.slots.len() == rows && site.positions.len() == rows && latent.cols == kv.entry && site.offset + 2 * site.rope.half <= latent.cols
}

pub(super) fn wdt_suffix(w: u8) -> &'static str {
    match w {
        0 => "f32w",
        1 => "bf16w",
        _ => "fp8w",
    }
}

pub struct GpuExperts {
    /// Experts `first .. first + n` (expert parallelism: this rank's range)
    pub first: usize,
    pub n: usize,
    pub inter: usize,
    pub hidden: usize,
    pub wdt: u8,
    pub gate: DevBuf<u8>,
    pub up: DevBuf<u8>,
    pub down: DevBuf<u8>,
    pub gs: DevBuf<f32>,
    pub us: DevBuf<f32>,
    pub ds: DevBuf<f32>,
    pub bn: i32,
    pub bk: i32,
}

pub use super::router::GpuRouting;

pub struct GpuKvCache {
    pub layers: usize,
    pub slots: usize,
    pub entry: usize,
    /// bf16 entries (`attn_bf16` when allocated: SGLang's bf16 KV cache, half the bytes), packed
    /// two to a word of `buf`; else f32
    pub bf16: bool,
    pub buf: DevBuf<f32>,
}

/// One projection of a layer's experts as uploaded: every expert's bytes (borrowed from the
/// checkpoint's mmap where they need no conversion) and its scales, in expert order.
type ProjectionParts<'a> = (Vec<std::borrow::Cow<'a, [u8]>>, Vec<f32>);

pub(super) fn cfg(grid: (u32, u32), block: u32, shared: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (grid.0.max(1), grid.1.max(1), 1), block_dim: (block, 1, 1), shared_mem_bytes: shared }
}

/// Host weight bytes in a dtype the kernels read (F16 becomes f32; the others stay borrowed
/// from the checkpoint's memory map). `fnuz`: the device decodes FP8 as e4m3fnuz (gfx942), so
/// FP8 weights are converted (bits kept, 0x80 → 0) and their block scales doubled.
pub(super) fn host_weight(w: &HostLinear, fnuz: bool) -> (u8, std::borrow::Cow<'_, [u8]>, Vec<f32>, i32, i32) {
    use std::borrow::Cow;
    match &w.data {
        LinearData::F32(b) => (0, Cow::Borrowed(&b[..]), vec![0.0], 1, 1),
        LinearData::BF16(b) => (1, Cow::Borrowed(&b[..]), vec![0.0], 1, 1),
        LinearData::F16(_) => (0, Cow::Owned(w.to_f32().iter().flat_map(|x| x.to_le_bytes()).collect()), vec![0.0], 1, 1),
        LinearData::Fp8 { w: b, scale_inv, block_n, block_k } => {
            let (mut bytes, mut scales) = (Cow::Borrowed(&b[..]), scale_inv.clone());
            if fnuz {
                crate::weights::fnuz::e4m3fn_to_e4m3fnuz(bytes.to_mut());
                crate::weights::fnuz::fnuz_scales(&mut scales);
            }
            (2, bytes, scales, *block_n as i32, *block_k as i32)
        }
    }
}

/// Rows and columns of linear.hip's CUDA-core output tile (LT_BM, LT_BN).
pub(super) const LINEAR_TILE: (usize, usize) = (128, 64);
/// The tile's K step (linear.hip's LT_KT): a K part of a split tile is a whole number of them.
pub(super) const LINEAR_TILE_K: usize = 16;

impl<V: GpuVendor> GpuBackend<V> {
    /// One linear layer's weight and scales in their own buffers.
    pub(super) fn upload_linear_one(&self, w: &HostLinear) -> Result<GpuLinear, BackendError> {
        let (wdt, bytes, scales, bn, bk) = host_weight(w, self.fp8_fnuz);
        Ok(GpuLinear { out: w.out, inp: w.inp, wdt, data: self.upload_parts(&[&bytes])?, scales: self.htod(&scales)?, bn, bk, wuk_t: None, joint: None })
    }

    /// The experts' output of `n` floats, zero: the routing's (true: taken from `r`), else zeroed here.
    pub(super) fn experts_out(&self, r: &GpuRouting, n: usize) -> Result<(DevBuf<f32>, bool), BackendError> {
        match r.take_zeroed(n) {
            Some(z) => Ok((z, true)),
            None => Ok((self.zeros::<f32>(n)?, false)),
        }
    }

    pub(super) fn linear_with(&self, x: &GpuTensor, w: &GpuLinear, mma: bool) -> Result<GpuTensor, BackendError> {
        assert_eq!(x.cols, w.inp, "linear: input has {} columns, weight expects {}", x.cols, w.inp);
        let mut y = self.alloc_out(x.rows * w.out)?;
        if x.rows > 0 {
            self.linear_into(x, w, &mut y, mma)?;
        }
        Ok(GpuTensor { rows: x.rows, cols: w.out, buf: y })
    }

    fn scatter_rows(&self, x: &GpuTensor, rows: &[u32], out: &mut DevBuf<f32>) -> Result<(), BackendError> {
        if rows.is_empty() {
            return Ok(());
        }
        let f = self.func(EW, "scatter_rows")?;
        let r = self.idx(rows)?;
        let cols = x.cols as i32;
        let mut b = self.launch(&f);
        b.arg(&x.buf).arg(&r.0).arg(out).arg(&cols);
        b.run(cfg((rows.len() as u32, 1), 256, 0)).map_err(err("scatter_rows"))
    }

    /// The device address of an index array: the running step's copy when `v` is one of the
    /// step's arrays, else a fresh upload (returned with it, to be kept alive until the launch).
    pub(super) fn idx(&self, v: &[u32]) -> Result<(u64, Option<DevBuf<u32>>), BackendError> {
        if let Some(p) = self.step_ptr(v) {
            return Ok((p, None));
        }
        if self.capturing() {
            return Err(self.op_err("upload", format!("{} indices uploaded inside a graph capture (not one of the step's arrays)", v.len())));
        }
        let b = self.htod(if v.is_empty() { &[0u32][..] } else { v })?;
        let p = b.ptr();
        Ok((p, Some(b)))
    }

    /// `mma`: whether batches beyond the GEMV sizes may take the tensor cores (bf16 hi/lo operands); the
    /// router keeps f32 so that expert choice matches the reference (DeepSeek's gate is f32).
    fn linear_into(&self, x: &GpuTensor, w: &GpuLinear, y: &mut DevBuf<f32>, mma: bool) -> Result<(), BackendError> {
        let vec8 = super::gemv::chunked_rows(w);
        if mma && self.linear_f8s_for(x, w) {
            return self.linear_f8s(x, w, y);
        }
        if mma && self.blaslt_for(x, w) && self.linear_blaslt(x, w, y)? {
            return Ok(());
        }
        if mma && self.linear_f8_for(x, w) {
            return self.linear_f8(x, w, y);
        }
        if mma && self.linear_tc_for(x, w) {
            return self.linear_tc(x, w, y);
        }
        if mma && self.mma_gemm && x.rows >= self.tuned.mma_min_rows {
            return self.linear_mma(x, w, y);
        }
        // the GEMV up to 32 rows (the f32 router, `mma` false, comes here up to 8: router.rs)
        if x.rows <= 8 || (vec8 && x.rows <= 32) {
            return self.gemv_into(x, w, y, vec8);
        }
        self.linear_tiles(x, w, y, (1, w.inp))
    }

    /// linear.hip's CUDA-core tiles over K split in `parts` of `kc` (grid z): part z writes its own
    /// [x.rows, w.out] from `y`'s element z · rows · out (one part: y itself).
    pub(super) fn linear_tiles(&self, x: &GpuTensor, w: &GpuLinear, y: &mut DevBuf<f32>, (parts, kc): (usize, usize)) -> Result<(), BackendError> {
        let f = self.func(LIN, &format!("linear_{}", wdt_suffix(w.wdt)))?;
        let (m, n, k, kci) = (x.rows as i32, w.out as i32, w.inp as i32, kc as i32);
        let mut b = self.launch(&f);
        b.arg(&x.buf).arg(&w.data).arg(&w.scales).arg(y).arg(&m).arg(&n).arg(&k).arg(&w.bn).arg(&w.bk).arg(&kci);
        let grid = (w.out.div_ceil(LINEAR_TILE.1) as u32, x.rows.div_ceil(LINEAR_TILE.0) as u32, parts as u32);
        b.run(LaunchConfig { grid_dim: grid, block_dim: (256, 1, 1), shared_mem_bytes: 0 }).map_err(err("linear"))
    }
}

impl<V: GpuVendor> Backend for GpuBackend<V> {
    type Tensor = GpuTensor;
    type Linear = GpuLinear;
    type Experts = GpuExperts;
    type Routing = GpuRouting;
    type KvCache = GpuKvCache;

    fn name(&self) -> &'static str {
        V::NAME
    }

    fn memory_info(&self) -> Option<(usize, usize)> {
        self.dev.mem_info().ok()
    }

    /// bf16 latents with bf16 attention (`--fp8-activations dynamic`), else f32
    fn kv_element_bytes(&self) -> usize {
        if self.attn_bf16 {
            2
        } else {
            4
        }
    }

    fn upload(&self, rows: usize, cols: usize, data: &[f32]) -> Result<GpuTensor, BackendError> {
        assert_eq!(data.len(), rows * cols, "upload: data does not match its shape");
        let buf = self.htod(if data.is_empty() { &[0f32][..] } else { data })?;
        Ok(GpuTensor { rows, cols, buf })
    }

    fn download(&self, t: &GpuTensor) -> Result<Vec<f32>, BackendError> {
        let mut v = t.buf.to_host().map_err(err("download"))?;
        v.truncate(t.rows * t.cols);
        Ok(v)
    }

    fn upload_linear(&self, w: &HostLinear) -> Result<GpuLinear, BackendError> {
        self.upload_linear_one(w)
    }

    fn upload_linear_pair(&self, first: &HostLinear, second: &HostLinear) -> Result<(GpuLinear, GpuLinear), BackendError> {
        self.upload_pair(first, second)
    }

    fn upload_mla_kv_b(&self, w: &HostLinear, nope: usize, v_head: usize) -> Result<GpuLinear, BackendError> {
        let mut l = self.upload_linear(w)?;
        let heads = w.out / (nope + v_head);
        l.wuk_t = Some(Box::new(self.upload_linear(&crate::weights::wuk_transposed(w, heads, nope, v_head))?));
        Ok(l)
    }

    fn upload_experts(&self, experts: Vec<[HostLinear; 3]>, first: usize) -> Result<GpuExperts, BackendError> {
        let e0 = &experts[0];
        let (wdt, _, _, bn, bk) = host_weight(&e0[0], self.fp8_fnuz);
        // per projection: every expert's bytes (borrowed from the mmap) and scales, in expert order
        let mut parts: [ProjectionParts; 3] = Default::default();
        for (e, ex) in experts.iter().enumerate() {
            for (p, w) in ex.iter().enumerate() {
                let (d, bytes, scales, wbn, wbk) = host_weight(w, self.fp8_fnuz);
                if d != wdt || (wbn, wbk) != (bn, bk) {
                    return Err(self.op_err("upload_experts", format!("expert {e} ({}) differs in dtype or block size from expert 0", w.name)));
                }
                parts[p].0.push(bytes);
                if wdt == 2 {
                    parts[p].1.extend(scales);
                }
            }
        }
        let up = |v: &[std::borrow::Cow<[u8]>]| self.upload_parts(&v.iter().map(|c| &c[..]).collect::<Vec<_>>());
        let upf = |v: &Vec<f32>| self.htod(if v.is_empty() { &[0f32][..] } else { v });
        Ok(GpuExperts {
            first,
            n: experts.len(),
            inter: e0[0].out,
            hidden: e0[0].inp,
            wdt,
            gate: up(&parts[0].0)?,
            up: up(&parts[1].0)?,
            down: up(&parts[2].0)?,
            gs: upf(&parts[0].1)?,
            us: upf(&parts[1].1)?,
            ds: upf(&parts[2].1)?,
            bn,
            bk,
        })
    }

    fn alloc_kv_cache(&self, layers: usize, slots: usize, kv_entry: usize) -> Result<GpuKvCache, BackendError> {
        let n = layers * slots * kv_entry;
        let bf16 = self.attn_bf16;
        let buf = self.zeros::<f32>((if bf16 { n.div_ceil(2) } else { n }).max(1))?;
        Ok(GpuKvCache { layers, slots, entry: kv_entry, bf16, buf })
    }

    fn embedding(&self, table: &GpuLinear, ids: &[u32]) -> Result<GpuTensor, BackendError> {
        self.span("other", || {
            if let Some(&bad) = ids.iter().find(|&&i| i as usize >= table.out) {
                return Err(self.op_err("embedding", format!("token id {bad} outside the vocabulary of {}", table.out)));
            }
            let f = self.func(EW, &format!("embedding_{}", wdt_suffix(table.wdt)))?;
            let d_ids = self.idx(ids)?;
            let mut out = self.alloc_out(ids.len() * table.inp)?;
            let (t, h) = (ids.len() as i32, table.inp as i32);
            let mut b = self.launch(&f);
            b.arg(&table.data).arg(&table.scales).arg(&d_ids.0).arg(&mut out).arg(&t).arg(&h).arg(&table.bn).arg(&table.bk);
            b.run(cfg((ids.len() as u32, 1), 256, 0)).map_err(err("embedding"))?;
            Ok(GpuTensor { rows: ids.len(), cols: table.inp, buf: out })
        })
    }

    fn rms_norm(&self, x: &GpuTensor, w: &GpuTensor, eps: f32) -> Result<GpuTensor, BackendError> {
        self.span("norms", || {
            let f = self.func(NORM, "rms_norm")?;
            let mut out = self.alloc_out(x.rows * x.cols)?;
            let cols = x.cols as i32;
            let mut b = self.launch(&f);
            b.arg(&x.buf).arg(&w.buf).arg(&mut out).arg(&cols).arg(&eps);
            b.run(cfg((x.rows as u32, 1), 256, 0)).map_err(err("rms_norm"))?;
            Ok(GpuTensor { rows: x.rows, cols: x.cols, buf: out })
        })
    }

    fn add_rms_norm(&self, x: &GpuTensor, residual: &mut GpuTensor, w: &GpuTensor, eps: f32) -> Result<GpuTensor, BackendError> {
        self.span("norms", || {
            let f = self.func(NORM, "add_rms_norm")?;
            let mut out = self.alloc_out(x.rows * x.cols)?;
            let cols = x.cols as i32;
            let mut b = self.launch(&f);
            b.arg(&x.buf).arg(&mut residual.buf).arg(&w.buf).arg(&mut out).arg(&cols).arg(&eps);
            b.run(cfg((x.rows as u32, 1), 256, 0)).map_err(err("add_rms_norm"))?;
            Ok(GpuTensor { rows: x.rows, cols: x.cols, buf: out })
        })
    }

    fn rms_norm_cols(&self, x: &mut GpuTensor, start: usize, w: &GpuTensor, eps: f32) -> Result<(), BackendError> {
        self.span("norms", || {
            let f = self.func(NORM, "rms_norm_cols")?;
            let (cols, st, n) = (x.cols as i32, start as i32, w.cols as i32);
            let mut b = self.launch(&f);
            b.arg(&mut x.buf).arg(&w.buf).arg(&cols).arg(&st).arg(&n).arg(&eps);
            b.run(cfg((x.rows as u32, 1), 256, 0)).map_err(err("rms_norm_cols"))?;
            Ok(())
        })
    }

    fn linear(&self, x: &GpuTensor, w: &GpuLinear) -> Result<GpuTensor, BackendError> {
        self.span(self.gemm_class(x.rows, w.out, w.inp), || self.linear_with(x, w, true))
    }

    fn linear_pair(&self, x: &GpuTensor, first: &GpuLinear, second: &GpuLinear) -> Result<(GpuTensor, GpuTensor), BackendError> {
        if let Some(ys) = self.linear_pair_gemv(x, first, second)? {
            return Ok(ys);
        }
        match self.linear_pair_codes(x, first, second)? {
            Some(ys) => Ok(ys),
            None => crate::backend::linear_pair_by_ops(self, x, first, second),
        }
    }

    fn norm_linear(&self, x: &GpuTensor, norm: &GpuTensor, eps: f32, w: &GpuLinear, rope: Option<&crate::backend::RopeSite>) -> Result<GpuTensor, BackendError> {
        match self.norm_linear_gemv(x, norm, eps, w, rope)? {
            Some(y) => Ok(y),
            None => crate::backend::norm_linear_by_ops(self, x, norm, eps, w, rope),
        }
    }

    fn norm_linear_kv_entry(&self, x: &GpuTensor, norm: &GpuTensor, eps: f32, w: &GpuLinear, rope: Option<&crate::backend::RopeSite>, mut entry: crate::backend::KvEntryOp<Self>) -> Result<GpuTensor, BackendError> {
        match self.norm_linear_kv_entry_gemv(x, norm, eps, w, rope, &mut entry)? {
            Some(y) => Ok(y),
            None => crate::backend::norm_linear_kv_entry_by_ops(self, x, norm, eps, w, rope, entry),
        }
    }

    fn silu_mul(&self, gate: &GpuTensor, up: &GpuTensor) -> Result<GpuTensor, BackendError> {
        self.span("activation", || {
            let f = self.func(EW, "silu_mul")?;
            let n = (gate.rows * gate.cols) as i64;
            let mut out = self.alloc_out(n as usize)?;
            let mut b = self.launch(&f);
            b.arg(&gate.buf).arg(&up.buf).arg(&mut out).arg(&n);
            b.run(cfg(((n as usize).div_ceil(256) as u32, 1), 256, 0)).map_err(err("silu_mul"))?;
            Ok(GpuTensor { rows: gate.rows, cols: gate.cols, buf: out })
        })
    }

    fn mlp(&self, x: &GpuTensor, gate: &GpuLinear, up: &GpuLinear, down: &GpuLinear) -> Result<GpuTensor, BackendError> {
        if let Some(y) = self.mlp_pairs(x, gate, up, down)? {
            return Ok(y);
        }
        match self.mlp_codes(x, gate, up, down)? {
            Some(y) => Ok(y),
            None => crate::backend::mlp_by_ops(self, x, [gate, up, down]),
        }
    }

    fn mlp_add(&self, x: &GpuTensor, gate: &GpuLinear, up: &GpuLinear, down: &GpuLinear, y: &mut GpuTensor) -> Result<(), BackendError> {
        if self.mlp_add_pairs(x, gate, up, down, y)? || self.mlp_add_codes(x, gate, up, down, y)? {
            return Ok(());
        }
        crate::backend::mlp_add_by_ops(self, x, [gate, up, down], y)
    }

    fn add(&self, x: &mut GpuTensor, y: &GpuTensor) -> Result<(), BackendError> {
        self.span("norms", || {
            let f = self.func(EW, "add_inplace")?;
            let n = (x.rows * x.cols) as i64;
            let mut b = self.launch(&f);
            b.arg(&mut x.buf).arg(&y.buf).arg(&n);
            b.run(cfg(((n as usize).div_ceil(256) as u32, 1), 256, 0)).map_err(err("add"))?;
            Ok(())
        })
    }

    fn rope(&self, x: &mut GpuTensor, positions: &[u32], heads: usize, head_stride: usize, offset: usize, rope: &RopeTables) -> Result<(), BackendError> {
        self.span("attention", || {
            let f = self.func(ROPE, "rope")?;
            let pos = self.idx(positions)?;
            let inv = self.constant(rope.inv_freq())?;
            let (cols, h, hs, off, half, il, scale) = (x.cols as i32, heads as i32, head_stride as i32, offset as i32, rope.half as i32, rope.interleaved as i32, rope.scale());
            let mut b = self.launch(&f);
            b.arg(&mut x.buf).arg(&pos.0).arg(&inv).arg(&cols).arg(&h).arg(&hs).arg(&off).arg(&half).arg(&il).arg(&scale);
            // a row's pairs over several blocks for few rows (latency); from ROPE_ROW_BLOCK_ROWS
            // rows one block a row, whose threads each make one angle's cos and sin for their heads
            let pairs = if x.rows >= ROPE_ROW_BLOCK_ROWS { 1 } else { (heads * rope.half).div_ceil(256).clamp(1, 65535) as u32 };
            b.run(cfg((x.rows as u32, pairs), 256, 0)).map_err(err("rope"))?;
            Ok(())
        })
    }

    fn kv_write(&self, kv: &mut GpuKvCache, layer: usize, slots: &[u32], entries: &GpuTensor) -> Result<(), BackendError> {
        self.span("attention", || {
            if slots.is_empty() {
                return Ok(());
            }
            let f = self.func(EW, if kv.bf16 { "kv_write_bf16" } else { "kv_write" })?;
            let s = self.idx(slots)?;
            let (l, ns, e) = (layer as i32, kv.slots as i32, kv.entry as i32);
            let mut b = self.launch(&f);
            b.arg(&mut kv.buf).arg(&entries.buf).arg(&s.0).arg(&l).arg(&ns).arg(&e);
            b.run(cfg((slots.len() as u32, 1), 256, 0)).map_err(err("kv_write"))?;
            Ok(())
        })
    }

    fn mla_kv_entry(&self, latent: &mut GpuTensor, norm: &GpuTensor, eps: f32, kv: &mut GpuKvCache, site: &KvEntrySite) -> Result<(), BackendError> {
        if !kv_entry_one_launch(latent, kv, site) {
            return crate::backend::mla_kv_entry_by_ops(self, latent, norm, eps, kv, site);
        }
        let (rows, r) = (latent.rows, site.rope);
        self.span("attention", || {
            let f = self.func(KV_ENTRY, if kv.bf16 { "mla_kv_entry_bf16" } else { "mla_kv_entry" })?;
            let (pos, slots) = (self.idx(site.positions)?, self.idx(site.slots)?);
            let inv = self.constant(r.inv_freq())?;
            let (n, off, half, il, scale) = (norm.cols as i32, site.offset as i32, r.half as i32, r.interleaved as i32, r.scale());
            let (l, ns, e) = (site.layer as i32, kv.slots as i32, kv.entry as i32);
            let mut b = self.launch(&f);
            b.arg(&mut latent.buf).arg(&norm.buf).arg(&n).arg(&eps).arg(&pos.0).arg(&inv).arg(&off).arg(&half).arg(&il).arg(&scale);
            b.arg(&mut kv.buf).arg(&slots.0).arg(&l).arg(&ns).arg(&e);
            b.run(cfg((rows as u32, 1), 256, 0)).map_err(err("mla_kv_entry"))?;
            Ok(())
        })
    }

    fn mla_attention(&self, q: &GpuTensor, kv: &GpuKvCache, layer: usize, seqs: &[AttnSeq], kv_b: &GpuLinear, d: &MlaDims) -> Result<GpuTensor, BackendError> {
        // profiled in two classes: the attention kernels, and the kv_b projections around them
        let (flash, rest): (Vec<&AttnSeq>, Vec<&AttnSeq>) = seqs.iter().partition(|s| self.flash_prefill_for(s, d));
        if flash.is_empty() {
            return self.mla_absorbed(q, kv, layer, seqs, kv_b, d);
        }
        let mut out = self.alloc_out(q.rows * d.num_heads * d.v_head)?;
        self.mla_flash(q, kv, layer, &flash, kv_b, d, super::mla_prefill::FlashOut::F32(&mut out))?;
        if !rest.is_empty() {
            // the other sequences (decode tokens, short prompts) in the absorbed form, on their rows
            let rows: Vec<u32> = rest.iter().flat_map(|s| (s.q_start..s.q_start + s.q_len).map(|r| r as u32)).collect();
            let qs = self.gather_rows(q, &rows)?;
            let mut q0 = 0;
            let rebased: Vec<AttnSeq> = rest
                .iter()
                .map(|s| {
                    q0 += s.q_len;
                    AttnSeq { q_start: q0 - s.q_len, q_len: s.q_len, slots: s.slots }
                })
                .collect();
            let part = self.mla_absorbed(&qs, kv, layer, &rebased, kv_b, d)?;
            self.span("other", || self.scatter_rows(&part, &rows, &mut out))?;
        }
        Ok(GpuTensor { rows: q.rows, cols: d.num_heads * d.v_head, buf: out })
    }

    fn mla_attention_linear(&self, q: &GpuTensor, kv: &GpuKvCache, layer: usize, seqs: &[AttnSeq], kv_b: &GpuLinear, d: &MlaDims, o: &GpuLinear) -> Result<GpuTensor, BackendError> {
        match self.mla_attention_codes(q, kv, layer, seqs, (kv_b, o), d)? {
            Some(y) => Ok(y),
            None => self.linear(&self.mla_attention(q, kv, layer, seqs, kv_b, d)?, o),
        }
    }

    fn moe_route(&self, x: &GpuTensor, gate: &GpuLinear, bias: Option<&[f32]>, p: &RouteParams) -> Result<GpuRouting, BackendError> {
        self.route(x, gate, bias, p)
    }

    fn moe_experts(&self, x: &GpuTensor, r: &GpuRouting, e: &GpuExperts) -> Result<GpuTensor, BackendError> {
        self.span("MoE GEMM", || {
            let pairs = x.rows * r.top_k;
            let (mut out, _) = self.experts_out(r, (x.rows * x.cols).max(1))?;
            if pairs == 0 {
                return Ok(GpuTensor { rows: x.rows, cols: x.cols, buf: out });
            }
            if self.moe_prefill_f8_for(x, e) && self.moe_experts_prefill_f8(x, r, e, &mut out)? {
                return Ok(GpuTensor { rows: x.rows, cols: x.cols, buf: out });
            }
            if self.moe_grouped_for(x, e) {
                self.moe_experts_grouped(x, r, e, &mut out)?;
                return Ok(GpuTensor { rows: x.rows, cols: x.cols, buf: out });
            }
            self.moe_experts_pairs(x, r, e, &mut out)?;
            Ok(GpuTensor { rows: x.rows, cols: x.cols, buf: out })
        })
    }

    fn moe_experts_shared(&self, x: &GpuTensor, r: &GpuRouting, e: &GpuExperts, shared: Option<[&GpuLinear; 3]>) -> Result<GpuTensor, BackendError> {
        // the routed and the shared experts quantise x once between them
        self.share_act_codes(x, || self.moe_experts_shared_once(x, r, e, shared))
    }

    fn mark_layer(&self, layer: Option<usize>) -> Result<(), BackendError> {
        self.layer_mark(layer)
    }

    fn synchronize(&self) -> Result<(), BackendError> {
        self.dev.synchronize().map_err(err("synchronize"))
    }

    fn graph_batch(&self, tokens: usize) -> Option<usize> {
        self.graph_batch_size(tokens)
    }

    fn kv_cache_id(&self, kv: &GpuKvCache) -> u64 {
        // the buffer's address and its layout (a new cache may reuse an old one's address)
        let p = kv.buf.ptr();
        let mut h = std::hash::DefaultHasher::new();
        std::hash::Hash::hash(&(p, kv.layers, kv.slots, kv.entry), &mut h);
        std::hash::Hasher::finish(&h)
    }

    fn run_step<E: From<BackendError>>(&self, inputs: &StepInputs, graph: Option<GraphStep>, run: &mut dyn FnMut(&StepInputs) -> Result<GpuTensor, E>) -> Result<GpuTensor, E> {
        self.run_step_impl(inputs, graph, run)
    }

    fn tp_group(&self) -> (usize, usize) {
        self.ccl.as_ref().map_or((0, 1), |c| (c.rank, c.size))
    }

    fn all_reduce(&self, x: &mut GpuTensor) -> Result<(), BackendError> {
        let Some(c) = &self.ccl else { return Ok(()) };
        self.span("communication", || c.all_reduce_sum(x.buf.ptr(), x.rows * x.cols, self.dev.stream()))
    }

    fn all_gather_cols(&self, x: GpuTensor, total: usize) -> Result<GpuTensor, BackendError> {
        let Some(c) = &self.ccl else { return Ok(x) };
        self.span("communication", || {
            let n = x.rows * x.cols;
            let all = self.alloc_out(n * c.size)?;
            c.all_gather(x.buf.ptr(), all.ptr(), n, self.dev.stream())?;
            let mut out = self.alloc_out(x.rows * total)?;
            if x.rows > 0 {
                let f = self.func(EW, "concat_cols")?;
                let (rows, cols, size, tot) = (x.rows as i32, x.cols as i32, c.size as i32, total as i32);
                let mut b = self.launch(&f);
                b.arg(&all).arg(&mut out).arg(&rows).arg(&cols).arg(&size).arg(&tot);
                b.run(cfg((x.rows as u32, 1), 256, 0)).map_err(err("concat_cols"))?;
            }
            Ok(GpuTensor { rows: x.rows, cols: total, buf: out })
        })
    }

    fn all_gather_rows(&self, x: &GpuTensor, per_rank: usize) -> Result<GpuTensor, BackendError> {
        let c = self.ccl.as_ref().ok_or_else(|| self.op_err("all_gather_rows", "no communicator".into()))?;
        assert!(x.rows <= per_rank, "all_gather_rows: {} rows > {per_rank}", x.rows);
        self.span("communication", || {
            let n = per_rank * x.cols;
            let mut mine = self.zeros::<f32>(n.max(1))?;
            if x.rows > 0 {
                mine.copy_from(x.buf.ptr(), x.rows * x.cols).map_err(err("all_gather_rows"))?;
            }
            let all = self.alloc_out(n * c.size)?;
            c.all_gather(mine.ptr(), all.ptr(), n, self.dev.stream())?;
            Ok(GpuTensor { rows: per_rank * c.size, cols: x.cols, buf: all })
        })
    }

    fn reduce_scatter_rows(&self, x: &GpuTensor, keep: usize) -> Result<GpuTensor, BackendError> {
        let c = self.ccl.as_ref().ok_or_else(|| self.op_err("reduce_scatter_rows", "no communicator".into()))?;
        let per_rank = x.rows / c.size;
        assert!(keep <= per_rank && x.rows == per_rank * c.size, "reduce_scatter_rows: bad shape");
        self.span("communication", || {
            let n = per_rank * x.cols;
            let block = self.alloc_out(n)?;
            c.reduce_scatter(x.buf.ptr(), block.ptr(), n, self.dev.stream())?;
            if keep == per_rank {
                return Ok(GpuTensor { rows: keep, cols: x.cols, buf: block });
            }
            let mut out = self.alloc_out(keep * x.cols)?;
            if keep > 0 {
                out.copy_from(block.ptr(), keep * x.cols).map_err(err("reduce_scatter_rows"))?;
            }
            Ok(GpuTensor { rows: keep, cols: x.cols, buf: out })
        })
    }

    fn gather_rows(&self, x: &GpuTensor, rows: &[u32]) -> Result<GpuTensor, BackendError> {
        self.span("other", || {
            let mut out = self.alloc_out(rows.len() * x.cols)?;
            if !rows.is_empty() {
                let f = self.func(EW, "gather_rows")?;
                let r = self.idx(rows)?;
                let cols = x.cols as i32;
                let mut b = self.launch(&f);
                b.arg(&x.buf).arg(&r.0).arg(&mut out).arg(&cols);
                b.run(cfg((rows.len() as u32, 1), 256, 0)).map_err(err("gather_rows"))?;
            }
            Ok(GpuTensor { rows: rows.len(), cols: x.cols, buf: out })
        })
    }

    fn sample(&self, logits: &mut GpuTensor, rows: &[SampleRow]) -> Result<Option<Vec<u32>>, BackendError> {
        self.span("sampling", || {
            assert_eq!(logits.rows, rows.len(), "sample: one SampleRow per logits row");
            if rows.is_empty() {
                return Ok(Some(vec![]));
            }
            let f = self.func(SAMPLE, "sample_rows")?;
            let v = logits.cols as i32;
            let mut off = vec![0i32];
            let (mut tok, mut cnt, mut inp) = (vec![], vec![], vec![]);
            for r in rows {
                for &(t, c, p) in &r.penalties {
                    tok.push(t as i32);
                    cnt.push(c as i32);
                    inp.push(p as u8);
                }
                off.push(tok.len() as i32);
            }
            // three uploads: the f32 parameters, the i32 ones, the prompt flags
            let n = rows.len();
            let params: [&dyn Fn(&SampleRow) -> f32; 7] = [
                &|r| r.params.temperature,
                &|r| r.params.top_p,
                &|r| r.params.min_p,
                &|r| r.params.repetition_penalty,
                &|r| r.params.frequency_penalty,
                &|r| r.params.presence_penalty,
                &|r| r.uniform,
            ];
            let floats: Vec<f32> = params.iter().flat_map(|f| rows.iter().map(f)).collect();
            let (o_off, o_tok) = (n, 2 * n + 1);
            let o_cnt = o_tok + tok.len().max(1);
            let mut ints: Vec<i32> = rows.iter().map(|r| r.params.top_k.clamp(-1, i32::MAX as i64) as i32).collect();
            ints.extend_from_slice(&off);
            ints.extend(if tok.is_empty() { vec![0] } else { tok });
            ints.extend(if cnt.is_empty() { vec![0] } else { cnt });
            let d_f = self.htod(&floats)?;
            let d_i = self.htod(&ints)?;
            let d_inp = self.htod(if inp.is_empty() { &[0u8][..] } else { &inp })?;
            let fv = |i: usize| d_f.at(i * n);
            let (temp, top_p, min_p, rep, freq, pres, uni) = (fv(0), fv(1), fv(2), fv(3), fv(4), fv(5), fv(6));
            let (top_k, d_off, d_tok, d_cnt) = (d_i.at(0), d_i.at(o_off), d_i.at(o_tok), d_i.at(o_cnt));
            let mut out = self.zeros::<i32>(n)?;
            let mut b = self.launch(&f);
            b.arg(&mut logits.buf).arg(&v).arg(&temp).arg(&top_k).arg(&top_p).arg(&min_p).arg(&rep).arg(&freq).arg(&pres).arg(&d_off).arg(&d_tok).arg(&d_cnt).arg(&d_inp).arg(&uni).arg(&mut out);
            b.run(cfg((rows.len() as u32, 1), 1024, 0)).map_err(err("sample"))?;
            let ids: Vec<i32> = out.to_host().map_err(err("sample"))?;
            Ok(Some(ids.into_iter().map(|i| i as u32).collect()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::fnuz::fp8_e4m3fnuz_to_f32;
    use crate::weights::MmapSlice;

    /// The weight a gfx942 device receives, decoded as e4m3fnuz with its doubled scales, is the
    /// checkpoint's e4m3fn weight exactly (every byte value, in 2×2 scale blocks).
    #[test]
    fn fnuz_upload_dequantises_to_the_checkpoint_weight() {
        let (out, inp) = (16, 32);
        let w: Vec<u8> = (0..out * inp).map(|i| (i * 37 % 256) as u8).filter(|&b| b & 0x7f != 0x7f).chain(std::iter::repeat(0x80)).take(out * inp).collect();
        let scale_inv: Vec<f32> = (0..(out / 2) * (inp / 2)).map(|i| 0.25 + i as f32 * 0.125).collect();
        let hl = HostLinear { name: "w".into(), out, inp, data: LinearData::Fp8 { w: MmapSlice::from_vec(w), scale_inv, block_n: 2, block_k: 2 } };
        let want = hl.to_f32();
        let (wdt, bytes, scales, bn, bk) = host_weight(&hl, true);
        assert_eq!((wdt, bn, bk), (2, 2, 2));
        for r in 0..out {
            for c in 0..inp {
                let got = fp8_e4m3fnuz_to_f32(bytes[r * inp + c]) * scales[(r / 2) * (inp / 2) + c / 2];
                assert_eq!(got.to_bits() & 0x7fff_ffff, want[r * inp + c].to_bits() & 0x7fff_ffff, "({r}, {c})");
            }
        }
        // OCP devices get the checkpoint's bytes and scales untouched
        let (_, same, s1, _, _) = host_weight(&hl, false);
        assert!(matches!(same, std::borrow::Cow::Borrowed(_)));
        assert_eq!(s1[3], 0.25 + 3.0 * 0.125);
    }
}
