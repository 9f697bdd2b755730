//! One forward step's index data on the device, and CUDA graphs of the decode step.
//!
//! At the start of every step (`Backend::run_step`) the step's index arrays (embedding rows,
//! positions, new KV slots, logit rows, and the attention's per-token context layout) are packed
//! into one host buffer and copied into a device arena with one copy; the ops of the step find their
//! device copy by the identity of the host slice they are handed (the model passes the step's own
//! slices through), so nothing is uploaded per op or per layer.
//!
//! Decode steps padded to a capture size (SGLang's list: 1, 2, 4, 8, then every 8 up to
//! `--cuda-graph-max-bs`) are captured into a CUDA graph the first time their size is seen (after
//! one eager run of that step, which also loads every kernel) and replayed afterwards: the arena's
//! addresses are baked into the graph and only its contents change between steps. Intermediate
//! tensors are graph allocations freed inside the graph; the logits are copied into a static buffer
//! inside the graph and out of it after each replay.
use std::collections::HashMap;

use super::backend::{GpuBackend, GpuTensor, GpuVendor};
use super::device::{bytes_of, err, DevBuf, DevGraph};
use crate::backend::{AttnSeq, BackendError, GraphStep, StepInputs};

/// Context keys per attention split (a split covers at least this many keys).
pub(super) const SPLIT_MIN_KEYS: usize = 512;
/// The most splits of one token's context.
pub(super) const MAX_SPLITS: usize = 16;

/// Batch sizes decode graphs are captured for: 1, 2, 4, 8, then every 8, up to `max_bs`
/// (included even when it is not on that list).
pub fn capture_sizes(max_bs: usize) -> Vec<usize> {
    let mut v: Vec<usize> = [1, 2, 4].into_iter().chain((8..=max_bs).step_by(8)).filter(|&b| b <= max_bs).collect();
    if max_bs > 0 && v.last() != Some(&max_bs) {
        v.push(max_bs);
    }
    v
}

/// The captured size a decode batch of `t` tokens is padded to.
pub fn capture_bucket(sizes: &[usize], t: usize) -> Option<usize> {
    sizes.iter().copied().find(|&b| b >= t && t > 0)
}

/// The attention's view of the step: per token, where its context starts in the flattened slot
/// list and how long it is (causal within its sequence).
pub(super) struct AttnIndex {
    pub flat: Vec<u32>,
    pub off: Vec<u32>,
    pub len: Vec<u32>,
    /// The longest context
    pub max_len: usize,
}

pub(super) fn attn_index(seqs: &[AttnSeq], tokens: usize) -> AttnIndex {
    let (mut flat, mut off, mut len) = (Vec::new(), vec![0u32; tokens], vec![0u32; tokens]);
    let max_len = attn_layout(seqs, &mut flat, &mut off, &mut len);
    AttnIndex { flat, off, len, max_len }
}

/// Appends every sequence's slots to `flat` and fills each token's `off` (where its context starts,
/// counted from `flat`'s length on entry) and causal `len`; returns the longest context.
fn attn_layout(seqs: &[AttnSeq], flat: &mut Vec<u32>, off: &mut [u32], len: &mut [u32]) -> usize {
    let start = flat.len();
    let mut max_len = 0;
    for s in seqs {
        let base = (flat.len() - start) as u32;
        flat.extend_from_slice(s.slots);
        for i in 0..s.q_len {
            let l = s.slots.len() - s.q_len + i + 1;
            (off[s.q_start + i], len[s.q_start + i]) = (base, l as u32);
            max_len = max_len.max(l);
        }
    }
    max_len
}

/// How many splits the decode attention cuts each token's context into. A graph step always uses
/// the most (`MAX_SPLITS`; splits with no keys cost one empty block) so that its grid does not
/// depend on the context length; blocks cover at least `SPLIT_MIN_KEYS` keys either way.
pub(super) fn attn_splits(blocks: usize, max_len: usize, graph: bool) -> usize {
    if blocks >= 264 {
        1
    } else if graph {
        MAX_SPLITS
    } else {
        max_len.div_ceil(SPLIT_MIN_KEYS).clamp(1, MAX_SPLITS)
    }
}

/// Device addresses of the step's attention layout.
#[derive(Clone, Copy)]
pub(super) struct AttnDev {
    pub flat: u64,
    pub off: u64,
    pub len: u64,
    pub max_len: usize,
}

/// The packed host image of a step's index arrays: each array starts at a multiple of 64 u32s,
/// the flattened context last (so every other offset depends only on the token count).
struct Packed {
    host: Vec<u32>,
    /// (host address, length) → offset, for embed_ids, positions, new_slots, logit_rows
    index: Vec<((usize, usize), usize)>,
    off: usize,
    len: usize,
    flat: usize,
    max_len: usize,
}

/// The image is sized once and the attention layout (attn_index's, the same values) written
/// straight into it: at long contexts the flattened slot lists are most of a step's host work
/// (4 bytes a context token a step), copied once here instead of three or four times.
fn pack(inputs: &StepInputs) -> Packed {
    let t = inputs.positions.len();
    let pad = |n: usize| n.div_ceil(64) * 64;
    let arrays = [inputs.embed_ids, inputs.positions, inputs.new_slots, inputs.logit_rows];
    let ctx: usize = inputs.seqs.iter().map(|s| s.slots.len()).sum();
    let mut host = Vec::with_capacity(arrays.iter().map(|v| pad(v.len())).sum::<usize>() + 2 * pad(t) + pad(ctx));
    let mut index = Vec::new();
    for v in arrays {
        index.push(((v.as_ptr() as usize, v.len()), host.len()));
        host.extend_from_slice(v);
        host.resize(pad(host.len()), 0);
    }
    // per token: where its context starts in the flattened lists, and its causal length (written
    // into their places once the lists are in)
    let (off, len) = (host.len(), host.len() + pad(t));
    host.resize(len + pad(t), 0);
    let flat = host.len();
    let (mut offs, mut lens) = (vec![0u32; t], vec![0u32; t]);
    let max_len = attn_layout(inputs.seqs, &mut host, &mut offs, &mut lens);
    host[off..off + t].copy_from_slice(&offs);
    host[len..len + t].copy_from_slice(&lens);
    host.resize(pad(host.len()), 0);
    Packed { host, index, off, len, flat, max_len }
}

#[derive(Default)]
pub(super) struct StepState {
    arena: Option<(DevBuf<u32>, u64)>,
    /// The registered host slices of the running step → device address
    index: Vec<((usize, usize), u64)>,
    seqs: (usize, usize),
    attn: Option<AttnDev>,
    /// Inside a step that may be captured: the ops choose graph-stable launch shapes
    pub graph_step: bool,
    /// A capture is running: host uploads are errors (they would not be replayed)
    pub capturing: bool,
    graphs: HashMap<usize, DevGraph>,
    /// The KV cache the graphs were captured on (they hold its address)
    graphs_kv: u64,
    /// The logits of graph steps [max_bs, vocab]
    out: Option<DevBuf<f32>>,
    pub captured: usize,
    pub replays: u64,
    /// Set when a capture failed: the rest of the run is eager
    pub failed: Option<String>,
}

/// Graph settings and state of a `GpuBackend`.
pub struct Graphs {
    pub sizes: Vec<usize>,
    pub(super) state: std::sync::Mutex<StepState>,
}

impl Graphs {
    pub fn new(max_bs: usize) -> Self {
        Graphs { sizes: capture_sizes(max_bs), state: Default::default() }
    }
}

impl<V: GpuVendor> GpuBackend<V> {
    /// Sets the largest decode batch captured into a CUDA graph (`--cuda-graph-max-bs`; 0 is
    /// `--disable-cuda-graph`).
    pub fn set_graph_max_bs(&mut self, max_bs: usize) {
        self.graphs = Graphs::new(max_bs);
        if max_bs == 0 {
            log::info!("{} graphs: disabled", V::NAME);
        } else {
            log::info!("{} graphs: decode steps of up to {max_bs} sequences, captured on first use for batch sizes {:?}", V::NAME, self.graphs.sizes);
        }
    }

    /// `--fp8-activations dynamic` (see `fp8_act`), said in the log: FP8 GEMM inputs where the
    /// GEMM library has a block-scaled FP8 GEMM (asked with a small DeepSeek-like shape), else
    /// those stay f32; attention on bf16 operands either way (SGLang's numerics: the flash
    /// prefill's bf16 form and the matrix-unit decode kernel).
    pub fn set_fp8_activations(&mut self, on: bool) {
        let lib = self.blaslt.as_ref().map(|l| l.name()).unwrap_or("no GEMM library");
        let has = on && self.blaslt.as_ref().is_some_and(|l| l.supports_fp8_block(128, 128, 512));
        (self.fp8_act, self.attn_bf16, self.bf16_act) = (on && has, on, on);
        if on && has {
            let t = &self.tuned;
            let mma = if super::linear_tc::e4m3_mma(&self.arch) && self.mma_gemm {
                format!("; FP8 linear layers of {}-{} rows and MoE batches up to {} tokens (grouped, from {}) quantise it too for the FP8 x FP8 matrix-unit kernels", t.linear_f8_min_rows, t.linear_f8_max_rows.min(8), t.moe_f8_max_rows, t.moe_grouped_min_rows)
            } else {
                String::new()
            };
            log::info!("{} op paths: FP8 activations (--fp8-activations): FP8 linear layers from {} rows and MoE experts from {} tokens quantise their input per token and 128 channels to e4m3 and run {lib}'s block-scaled FP8 GEMM where it takes the shape{mma}; attention takes bf16 operands, and bf16-weight layers from {} rows (lm_head) a bf16 input", V::NAME, t.blaslt_fp8_act_min_rows, t.moe_mma_min_rows, t.cublaslt_min_rows);
        } else if on {
            log::info!("{} op paths: FP8 activations asked for, but {lib} has no block-scaled FP8 GEMM here: GEMM inputs stay f32; attention takes bf16 operands, and bf16-weight layers from {} rows (lm_head) a bf16 input", V::NAME, self.tuned.cublaslt_min_rows);
        }
    }

    /// (graphs captured, replays so far, why capturing stopped if it did)
    pub fn graph_stats(&self) -> (usize, u64, Option<String>) {
        let s = self.graphs.state.lock().unwrap();
        (s.captured, s.replays, s.failed.clone())
    }

    pub(super) fn graph_batch_size(&self, t: usize) -> Option<usize> {
        use std::sync::atomic::Ordering;
        if self.profile.enabled.load(Ordering::Relaxed) || self.profile.layers.load(Ordering::Relaxed) || self.graphs.state.lock().unwrap().failed.is_some() {
            return None;
        }
        capture_bucket(&self.graphs.sizes, t)
    }

    /// The device copy of one of the running step's index arrays (None: not one of them).
    pub(super) fn step_ptr(&self, v: &[u32]) -> Option<u64> {
        if v.is_empty() {
            return None;
        }
        let s = self.graphs.state.lock().unwrap();
        s.index.iter().find(|(k, _)| *k == (v.as_ptr() as usize, v.len())).map(|&(_, p)| p)
    }

    pub(super) fn step_attn(&self, seqs: &[AttnSeq]) -> Option<AttnDev> {
        let s = self.graphs.state.lock().unwrap();
        if seqs.is_empty() || s.seqs != (seqs.as_ptr() as usize, seqs.len()) {
            return None;
        }
        s.attn
    }

    pub(super) fn capturing(&self) -> bool {
        self.graphs.state.lock().unwrap().capturing
    }

    pub(super) fn in_graph_step(&self) -> bool {
        self.graphs.state.lock().unwrap().graph_step
    }

    /// Uploads the step's index arrays (one copy) and registers them for the ops.
    fn step_begin(&self, inputs: &StepInputs, graph: bool) -> Result<(), BackendError> {
        let p = pack(inputs);
        let mut s = self.graphs.state.lock().unwrap();
        let cap = s.arena.as_ref().map_or(0, |(a, _)| a.len());
        if cap < p.host.len() {
            // the graphs hold the old arena's addresses
            if !s.graphs.is_empty() {
                log::info!("{} graphs: step index arena grows to {} entries; recapturing", V::NAME, p.host.len() * 2);
            }
            s.graphs.clear();
            let a = self.zeros::<u32>((p.host.len() * 2).max(1 << 16))?;
            let base = a.ptr();
            s.arena = Some((a, base));
        }
        let (arena, base) = s.arena.as_mut().unwrap();
        let base = *base;
        if !p.host.is_empty() {
            self.dev.htod(arena.ptr(), bytes_of(&p.host)).map_err(err("step upload"))?;
        }
        let at = |o: usize| base + 4 * o as u64;
        s.index = p.index.iter().map(|&(k, o)| (k, at(o))).collect();
        s.seqs = (inputs.seqs.as_ptr() as usize, inputs.seqs.len());
        s.attn = Some(AttnDev { flat: at(p.flat), off: at(p.off), len: at(p.len), max_len: p.max_len });
        s.graph_step = graph;
        Ok(())
    }

    fn step_end(&self) {
        let mut s = self.graphs.state.lock().unwrap();
        s.index.clear();
        s.seqs = (0, 0);
        s.attn = None;
        s.graph_step = false;
    }

    pub(super) fn run_step_impl<E: From<BackendError>>(&self, inputs: &StepInputs, graph: Option<GraphStep>, run: &mut dyn FnMut(&StepInputs) -> Result<GpuTensor, E>) -> Result<GpuTensor, E> {
        self.step_begin(inputs, graph.is_some())?;
        if let Some(g) = graph {
            let mut s = self.graphs.state.lock().unwrap();
            if s.graphs_kv != g.kv {
                // graphs hold the old cache's address: a step on another cache captures anew
                s.graphs.clear();
                s.graphs_kv = g.kv;
            }
        }
        let r = match graph {
            Some(g) => self.graph_step(inputs, g.keep, run),
            None => run(inputs),
        };
        self.step_end();
        r
    }

    /// A padded decode step: replay its graph, or run it eagerly and capture it.
    fn graph_step<E: From<BackendError>>(&self, inputs: &StepInputs, keep: usize, run: &mut dyn FnMut(&StepInputs) -> Result<GpuTensor, E>) -> Result<GpuTensor, E> {
        let bs = inputs.positions.len();
        let replayed = {
            let mut s = self.graphs.state.lock().unwrap();
            match s.graphs.get(&bs) {
                Some(g) => {
                    g.launch().map_err(err("graph launch"))?;
                    s.replays += 1;
                    let vocab = s.out.as_ref().unwrap().len() / self.graphs.sizes.last().copied().unwrap_or(1);
                    Some(vocab)
                }
                None => None,
            }
        };
        if let Some(vocab) = replayed {
            let mut t = self.alloc_out(keep * vocab)?;
            let s = self.graphs.state.lock().unwrap();
            t.copy_from(s.out.as_ref().unwrap().ptr(), keep * vocab).map_err(err("graph output"))?;
            return Ok(GpuTensor { rows: keep, cols: vocab, buf: t });
        }
        // first time at this size: run it eagerly (loads kernels, warms the pools), then capture
        let logits = run(inputs)?;
        if let Err(why) = self.capture(inputs, bs, logits.cols, run) {
            log::warn!("{} graphs: capture of batch size {bs} failed ({why}); decode steps run without graphs from here on", V::NAME);
            self.graphs.state.lock().unwrap().failed = Some(why);
        }
        if keep == logits.rows {
            return Ok(logits);
        }
        let rows: Vec<u32> = (0..keep as u32).collect();
        Ok(crate::backend::Backend::gather_rows(self, &logits, &rows)?)
    }

    fn capture<E>(&self, inputs: &StepInputs, bs: usize, vocab: usize, run: &mut dyn FnMut(&StepInputs) -> Result<GpuTensor, E>) -> Result<(), String> {
        let max_bs = self.graphs.sizes.last().copied().unwrap_or(bs);
        let t0 = std::time::Instant::now();
        self.dev.synchronize().map_err(|e| e.to_string())?;
        {
            let mut s = self.graphs.state.lock().unwrap();
            if s.out.as_ref().is_none_or(|o| o.len() != max_bs * vocab) {
                // graphs captured before write to the old buffer
                s.graphs.clear();
                s.out = Some(self.zeros::<f32>(max_bs * vocab).map_err(|e| format!("static logits: {e}"))?);
            }
            s.capturing = true;
        }
        let begun = self.dev.begin_capture();
        let body = begun.map_err(|e| format!("begin capture: {e}")).and_then(|()| {
            let logits = run(inputs).map_err(|_| "the step failed while being captured".to_string())?;
            let mut s = self.graphs.state.lock().unwrap();
            let out = s.out.as_mut().unwrap();
            out.copy_from(logits.buf.ptr(), bs * vocab).map_err(|e| e.to_string())?;
            drop(s);
            drop(logits);
            Ok(())
        });
        // always end the capture, so the stream leaves capture mode whatever happened inside
        let ended = self.dev.end_capture();
        let mut s = self.graphs.state.lock().unwrap();
        s.capturing = false;
        body?;
        let g = DevGraph::new(&self.dev, ended.map_err(|e| format!("end capture / instantiate: {e}"))?.ok_or("the capture recorded nothing")?);
        g.upload().map_err(|e| format!("graph upload: {e}"))?;
        s.graphs.insert(bs, g);
        s.captured += 1;
        log::info!("{} graphs: captured the decode step for batch size {bs} in {:.1} ms; graph memory reserved: {} MiB", V::NAME, t0.elapsed().as_secs_f64() * 1e3, self.graph_mem_reserved() >> 20);
        Ok(())
    }

    /// Bytes of device memory the driver holds for graph allocations (shared by all graphs).
    pub fn graph_mem_reserved(&self) -> u64 {
        self.dev.graph_mem_reserved()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_sizes_follow_sglang_and_end_at_the_maximum() {
        assert_eq!(capture_sizes(0), Vec::<usize>::new());
        assert_eq!(capture_sizes(1), vec![1]);
        assert_eq!(capture_sizes(3), vec![1, 2, 3]);
        assert_eq!(capture_sizes(20), vec![1, 2, 4, 8, 16, 20]);
        assert_eq!(capture_sizes(32), vec![1, 2, 4, 8, 16, 24, 32]);
        let s = capture_sizes(160);
        assert_eq!(s.len(), 3 + 20);
        assert_eq!(capture_bucket(&s, 1), Some(1));
        assert_eq!(capture_bucket(&s, 3), Some(4));
        assert_eq!(capture_bucket(&s, 9), Some(16));
        assert_eq!(capture_bucket(&s, 160), Some(160));
        assert_eq!(capture_bucket(&s, 161), None);
        assert_eq!(capture_bucket(&s, 0), None);
    }

    #[test]
    fn packed_offsets_depend_only_on_the_token_count() {
        let (a, b) = ([1u32, 2, 3], [9u32; 700]);
        let seqs1 = [AttnSeq { q_start: 0, q_len: 1, slots: &a }, AttnSeq { q_start: 1, q_len: 1, slots: &b[..5] }];
        let seqs2 = [AttnSeq { q_start: 0, q_len: 1, slots: &b }, AttnSeq { q_start: 1, q_len: 1, slots: &a[..1] }];
        let v = [7u32, 8];
        let i1 = StepInputs { embed_ids: &v, positions: &v, new_slots: &v, seqs: &seqs1, logit_rows: &v };
        let i2 = StepInputs { embed_ids: &v, positions: &v, new_slots: &v, seqs: &seqs2, logit_rows: &v };
        let (p1, p2) = (pack(&i1), pack(&i2));
        assert_eq!((p1.off, p1.len, p1.flat), (p2.off, p2.len, p2.flat));
        assert_eq!(p1.index.iter().map(|x| x.1).collect::<Vec<_>>(), vec![0, 64, 128, 192]);
        // the attention layout: flattened contexts, per-token start and causal length
        assert_eq!(&p1.host[p1.flat..p1.flat + 8], &[1, 2, 3, 9, 9, 9, 9, 9]);
        assert_eq!(&p1.host[p1.off..p1.off + 2], &[0, 3]);
        assert_eq!(&p1.host[p1.len..p1.len + 2], &[3, 5]);
        assert_eq!((p1.max_len, p2.max_len), (5, 700));
        assert_eq!(p2.host.len(), p2.flat + 704);
        // the packed layout is attn_index's, also for prompt chunks over a prefix (tokens 1-3 of
        // a 300-slot sequence's last 3, then a decode token)
        let long: Vec<u32> = (1000..1300).collect();
        let seqs3 = [AttnSeq { q_start: 1, q_len: 3, slots: &long }, AttnSeq { q_start: 0, q_len: 1, slots: &a }];
        let w = [1u32, 2, 3, 4];
        let i3 = StepInputs { embed_ids: &w, positions: &w, new_slots: &w, seqs: &seqs3, logit_rows: &v };
        let (p3, want) = (pack(&i3), attn_index(&seqs3, 4));
        assert_eq!(&p3.host[p3.flat..p3.flat + want.flat.len()], &want.flat[..]);
        assert_eq!((&p3.host[p3.off..p3.off + 4], &p3.host[p3.len..p3.len + 4]), (&want.off[..], &want.len[..]));
        assert_eq!((p3.max_len, &want.len[..]), (300, &[3, 298, 299, 300][..]));
        assert_eq!(p3.host.len(), p3.flat + 320);
    }

    #[test]
    fn attention_splits_are_fixed_in_graph_steps() {
        assert_eq!(attn_splits(32, 100, false), 1);
        assert_eq!(attn_splits(32, 4096, false), 8);
        assert_eq!(attn_splits(32, 100_000, false), MAX_SPLITS);
        assert_eq!(attn_splits(32, 100, true), MAX_SPLITS);
        assert_eq!(attn_splits(264, 4096, true), 1);
    }
}
