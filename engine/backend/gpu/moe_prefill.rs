//! MoE experts at prefill sizes with FP8 activations (`--fp8-activations dynamic`): the routed
//! (token, expert) pairs are laid out as one segment of rows per expert (padded to a multiple of 8
//! rows), the tokens' FP8 codes (per 128 channels) gathered into that layout, then the gate and
//! up products, SiLU·up quantised again (one pass), the down product, and each token's pairs
//! summed in its top-k order. The products run as one grouped FP8 GEMM a projection over every
//! expert's segment (moe_f8_gemm.rs, NVIDIA sm_90a), or else as the GEMM library's block-scaled
//! FP8 GEMM per expert. The layout needs the expert counts on the host: one copy of the routed
//! ids, so this path is for op-by-op steps (prefill), never inside a graph capture; with shared
//! experts their GEMMs are enqueued first, so that the GPU runs them while the host waits for
//! the ids and lays the pairs out.
use super::backend::{GpuBackend, GpuTensor, GpuVendor};
use super::blas::fp8_block_ok;
use super::device::{err, DevBuf, DevEvent, PinnedBuf};
use super::ops::{cfg, GpuExperts, GpuLinear, GpuRouting};
use crate::backend::BackendError;

const COMBINE: &str = "hip-kernels/moe_combine.hip";
/// Rows of an expert's segment are padded to a multiple of this
const PAD: usize = 8;
/// Streams the experts' GEMMs are spread over (each GEMM's ~32 tiles leave most SMs idle alone)
const SIDE_STREAMS: usize = 4;

/// The pairs of this rank's experts as row segments.
#[derive(Debug, PartialEq)]
pub struct MoeLayout {
    /// (local expert, first row, rows incl. padding)
    pub segments: Vec<(usize, usize, usize)>,
    /// Per row: the token it holds, −1 for padding
    pub src: Vec<i32>,
    /// Per row: its segment's first row and length
    pub seg: Vec<i32>,
    /// Per pair (token · top_k + j): its row, −1 where the expert is another rank's
    pub pair_row: Vec<i32>,
}

impl MoeLayout {
    /// `ids` [tokens · top_k] global expert ids; this rank holds experts `first .. first + n`.
    /// A counting sort (the stream waits for it: one pass to count, one to place).
    pub fn build(ids: &[i32], top_k: usize, first: usize, n: usize) -> MoeLayout {
        let local = |id: i32| (id as usize).checked_sub(first).filter(|&e| id >= 0 && e < n);
        let mut count = vec![0usize; n];
        for &id in ids {
            if let Some(e) = local(id) {
                count[e] += 1;
            }
        }
        let (mut segments, mut next) = (Vec::new(), vec![0usize; n]);
        let mut rows = 0;
        for (e, &c) in count.iter().enumerate().filter(|(_, &c)| c > 0) {
            let len = c.next_multiple_of(PAD);
            segments.push((e, rows, len));
            next[e] = rows;
            rows += len;
        }
        let mut l = MoeLayout { segments, src: vec![-1; rows], seg: vec![0; 2 * rows], pair_row: vec![-1; ids.len()] };
        for (p, &id) in ids.iter().enumerate() {
            if let Some(e) = local(id) {
                let r = next[e];
                next[e] += 1;
                l.src[r] = (p / top_k) as i32;
                l.pair_row[p] = r as i32;
            }
        }
        for &(_, off, len) in &l.segments {
            for r in off..off + len {
                (l.seg[2 * r], l.seg[2 * r + 1]) = (off as i32, len as i32);
            }
        }
        l
    }

    pub fn rows(&self) -> usize {
        self.src.len()
    }
}

/// How the prefill's expert products run: the grouped kernel (its work built from the layout a
/// launch), or the GEMM library once per expert.
enum Products<'a> {
    Grouped,
    Library(&'a dyn super::blas::GemmLib),
}

impl<V: GpuVendor> GpuBackend<V> {
    /// Whether these experts at this batch take the FP8 prefill path: FP8 activations on, FP8
    /// experts, prefill-sized, not capturing, and the grouped kernel or the library for their
    /// shapes (128×128 blocks of library-friendly sizes).
    pub(super) fn moe_prefill_f8_for(&self, x: &GpuTensor, e: &GpuExperts) -> bool {
        self.fp8_act && e.wdt == 2 && x.rows >= self.tuned.moe_mma_min_rows && !self.capturing() && (self.moe_f8_gemm_for(e) || self.moe_blaslt_ok(e))
    }

    fn moe_blaslt_ok(&self, e: &GpuExperts) -> bool {
        fp8_block_ok(e.inter, e.hidden, e.bn, e.bk)
            && fp8_block_ok(e.hidden, e.inter, e.bn, e.bk)
            && self.blaslt.as_ref().is_some_and(|l| l.supports_fp8_block(PAD, e.inter, e.hidden) && l.supports_fp8_block(PAD, e.hidden, e.inter))
    }

    /// out [T, hidden] += Σ over this rank's routed pairs of weight · down_e(silu(gate_e x) · up_e x)
    /// with FP8 activations (see the module); false (nothing launched) where the library path has
    /// no plan for one of the segment sizes.
    pub(super) fn moe_experts_prefill_f8(&self, x: &GpuTensor, r: &GpuRouting, e: &GpuExperts, out: &mut DevBuf<f32>) -> Result<bool, BackendError> {
        let t0 = std::time::Instant::now();
        let ids = r.ids.to_host().map_err(err("routed ids"))?;
        self.moe_experts_prefill_f8_ids(x, r, e, &ids[..x.rows * r.top_k], out, t0)
    }

    /// A MoE layer's routed and shared experts (`shared`: gate, up, down) at prefill sizes, the
    /// shared experts first: their GEMMs keep the GPU busy while the host waits for the routed ids
    /// and lays the pairs out (the other order leaves it idle meanwhile, ~0.1-0.4 ms a layer). The
    /// routed sum is added to the shared experts' output: shared + routed, the same f32 addition
    /// as the other order's routed + shared.
    pub(super) fn moe_prefill_shared_first(&self, x: &GpuTensor, r: &GpuRouting, e: &GpuExperts, [g, u, d]: [&GpuLinear; 3]) -> Result<GpuTensor, BackendError> {
        use crate::backend::Backend;
        let t0 = std::time::Instant::now();
        let copy = self.ids_copy(r, x.rows * r.top_k)?;
        let (buf, _) = self.experts_out(r, x.rows * x.cols)?;
        let mut y = GpuTensor { rows: x.rows, cols: x.cols, buf };
        self.mlp_add(x, g, u, d, &mut y)?;
        let ids = self.ids_wait(copy)?;
        if !self.span("MoE GEMM", || self.moe_experts_prefill_f8_ids(x, r, e, &ids, &mut y.buf, t0))? {
            return Err(self.op_err("moe prefill", "the FP8 prefill path declined experts it was chosen for".into()));
        }
        Ok(y)
    }

    /// Starts copying routing `r`'s first `n` ids to the host, behind the stream's work so far.
    fn ids_copy(&self, r: &GpuRouting, n: usize) -> Result<IdsCopy, BackendError> {
        let bytes = 4 * n.max(1);
        let held = self.ids_host.lock().unwrap().take().filter(|b| b.as_slice().len() >= bytes);
        let mut buf = match held {
            Some(b) => b,
            None => PinnedBuf::alloc(&self.dev, bytes.next_power_of_two()).map_err(err("routed ids: page-locked buffer"))?,
        };
        // SAFETY: page-locked, and IdsCopy keeps it untouched until `done` has passed
        unsafe { self.dev.dtoh_async(&mut buf.as_mut_slice()[..bytes], r.ids.ptr()) }.map_err(err("routed ids"))?;
        let done = DevEvent::record(&self.dev, false).map_err(err("routed ids: event"))?;
        Ok(IdsCopy { buf: Some(buf), done, n })
    }

    /// The ids of `ids_copy` once they have landed (its buffer kept for the next layer).
    fn ids_wait(&self, mut c: IdsCopy) -> Result<Vec<i32>, BackendError> {
        c.done.wait().map_err(err("routed ids"))?;
        let buf = c.buf.take().expect("an IdsCopy's buffer is taken once");
        let ids = buf.as_slice()[..4 * c.n].chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        *self.ids_host.lock().unwrap() = Some(buf);
        Ok(ids)
    }

    /// `moe_experts_prefill_f8` on the routed ids read back (`t0`: when the wait for them began).
    fn moe_experts_prefill_f8_ids(&self, x: &GpuTensor, r: &GpuRouting, e: &GpuExperts, ids: &[i32], out: &mut DevBuf<f32>, t0: std::time::Instant) -> Result<bool, BackendError> {
        let (t, k, inter, hidden) = (x.rows, r.top_k, e.inter, e.hidden);
        let t1 = std::time::Instant::now();
        let l = MoeLayout::build(ids, k, e.first, e.n);
        let t2 = std::time::Instant::now();
        let rows = l.rows();
        if rows == 0 {
            return Ok(true); // no pair on this rank's experts: out as it was
        }
        let path = if self.moe_f8_gemm_for(e) {
            Products::Grouped
        } else {
            match &self.blaslt {
                Some(lt) if l.segments.iter().all(|&(_, _, len)| lt.supports_fp8_block(len, inter, hidden) && lt.supports_fp8_block(len, hidden, inter)) => Products::Library(lt.as_ref()),
                _ => return Ok(false),
            }
        };
        let (src, seg, pair_row) = (self.htod(&l.src)?, self.htod(&l.seg)?, self.htod(&l.pair_row)?);
        let enqueue = std::time::Instant::now();
        // gate and up: [len, hidden] · [inter, hidden]ᵀ per expert
        let (qx, sx) = self.quant_fp8_gather(x, rows, src.ptr(), seg.ptr())?;
        let t4 = std::time::Instant::now();
        // d [rows, n] = the segments' rows of a times their experts' wᵀ (K = k), by the chosen path
        let gemm = |a: (&DevBuf<u8>, &DevBuf<f32>), w: (&DevBuf<u8>, &DevBuf<f32>), d: &mut DevBuf<f32>, n: usize, k: usize| match &path {
            Products::Grouped => self.moe_f8_gemm(a, w, &l, d, n, k),
            Products::Library(lt) => self.moe_blaslt_gemms(*lt, &l, a, w, d, n, k),
        };
        // down's A: SiLU(g) · u quantised, from the gate / up launch itself or from its f32 outputs
        let (qh, sh) = match &path {
            Products::Grouped if self.tuned.moe_f8_gemm_glu => self.moe_f8_gemm_glu((&qx, &sx), (&e.gate, &e.gs), (&e.up, &e.us), &l, inter, hidden)?,
            _ => {
                let (mut g, mut u) = (self.scratch::<f32>(rows * inter)?, self.scratch::<f32>(rows * inter)?);
                gemm((&qx, &sx), (&e.gate, &e.gs), &mut g, inter, hidden)?;
                gemm((&qx, &sx), (&e.up, &e.us), &mut u, inter, hidden)?;
                self.quant_fp8_silu_rows(&GpuTensor { rows, cols: inter, buf: g }, &u, seg.ptr())?
            }
        };
        drop((qx, sx));
        let t5 = std::time::Instant::now();
        // down: [len, inter] · [hidden, inter]ᵀ per expert
        let mut dn = self.scratch::<f32>(rows * hidden)?;
        gemm((&qh, &sh), (&e.down, &e.ds), &mut dn, hidden, inter)?;
        let f = self.func(COMBINE, "moe_combine")?;
        let (ki, hi) = (k as i32, hidden as i32);
        self.launch(&f).arg(&dn).arg(&pair_row).arg(&r.weights).arg(out).arg(&ki).arg(&hi).run(cfg((t as u32, 1), 256, 0)).map_err(err("moe_combine"))?;
        let how = match &path {
            Products::Grouped => "grouped FP8 GEMM".to_string(),
            Products::Library(_) => format!("{} library GEMMs", 3 * l.segments.len()),
        };
        let us = |a: std::time::Instant, b: std::time::Instant| b.duration_since(a).as_micros();
        log::debug!("moe prefill: {t} tokens, {} experts, {rows} rows, {how}, enqueued in {} us (ids after {} us, layout {}, uploads {}, gather {}, gate/up {}, rest {})", l.segments.len(), enqueue.elapsed().as_micros(), us(t0, t1), us(t1, t2), us(t2, enqueue), us(enqueue, t4), us(t4, t5), us(t5, std::time::Instant::now()));
        Ok(true)
    }

    /// d [rows, n] = each segment's rows of `a` times its expert's `w`ᵀ, a library GEMM per expert;
    /// the GEMMs are small (a ~150-row GEMM has few tiles): several run at once on side streams,
    /// round robin.
    #[allow(clippy::too_many_arguments)]
    fn moe_blaslt_gemms(&self, lt: &dyn super::blas::GemmLib, l: &MoeLayout, (a, sa): (&DevBuf<u8>, &DevBuf<f32>), (w, ws): (&DevBuf<u8>, &DevBuf<f32>), d: &mut DevBuf<f32>, n: usize, k: usize) -> Result<(), BackendError> {
        let gemm_err = |msg| self.op_err("moe prefill", format!("{}: {msg}", lt.name()));
        let side = self.side_streams(SIDE_STREAMS);
        let on = |i: usize| if side.is_empty() { 0 } else { side[i % side.len()] };
        let (wsz, ssz, lk) = ((n * k) as u64, (4 * n.div_ceil(128) * k.div_ceil(128)) as u64, k.div_ceil(128)); // bytes per expert of W, of its scales
        self.fork(&side)?;
        for (i, &(ex, off, len)) in l.segments.iter().enumerate() {
            let a_ = (a.ptr() + (off * k) as u64, sa.ptr() + (4 * off * lk) as u64);
            lt.gemm_fp8_block((len, n, k), (w.ptr() + ex as u64 * wsz, ws.ptr() + ex as u64 * ssz), a_, d.ptr() + (4 * off * n) as u64, on(i)).map_err(gemm_err)?;
        }
        self.join(&side)
    }
}

/// Routed ids on their way to the host (`ids_copy`): the page-locked buffer they land in and the
/// event after the copy. Dropped unread, it waits for the copy before the buffer goes.
struct IdsCopy {
    buf: Option<PinnedBuf>,
    done: DevEvent,
    n: usize,
}

impl Drop for IdsCopy {
    fn drop(&mut self) {
        if self.buf.is_some() {
            let _ = self.done.wait(); // (the copy may still be writing into the buffer)
        }
    }
}

impl<V: GpuVendor> GpuBackend<V> {
    /// The side streams wait for the main stream's work so far (inputs ready, scratch allocated).
    fn fork(&self, side: &[super::device::Handle]) -> Result<(), BackendError> {
        side.iter().try_for_each(|&s| self.dev.stream_wait(s, 0)).map_err(err("fork"))
    }

    /// ... and the main stream for theirs (outputs ready before the next op or a free).
    fn join(&self, side: &[super::device::Handle]) -> Result<(), BackendError> {
        side.iter().try_for_each(|&s| self.dev.stream_wait(0, s)).map_err(err("join"))
    }
}

#[cfg(test)]
mod tests {
    use super::{MoeLayout, PAD};

    #[test]
    fn pairs_become_padded_expert_segments_in_pair_order() {
        // 3 tokens, top-2; this rank holds experts 4..8 (expert 9 is another rank's)
        let ids = [5, 4, 5, 9, 7, 5];
        let l = MoeLayout::build(&ids, 2, 4, 4);
        // expert 4 (local 0): pair 1; expert 5 (local 1): pairs 0, 2, 5; expert 7 (local 3): pair 4
        assert_eq!(l.segments, vec![(0, 0, 8), (1, 8, 8), (3, 16, 8)]);
        assert_eq!(l.rows(), 24);
        assert_eq!(&l.src[..10], &[0, -1, -1, -1, -1, -1, -1, -1, 0, 1]);
        assert_eq!(l.src[10], 2);
        assert_eq!(l.src[16], 2);
        assert_eq!(l.pair_row, vec![8, 0, 9, -1, 16, 10]);
        assert_eq!(&l.seg[16..18], &[8, 8]);
        assert_eq!(&l.seg[46..48], &[16, 8]);
        assert!(MoeLayout::build(&[9, 9], 1, 0, 4).segments.is_empty());
        // 500 tokens, top-6 over 64 experts, this rank holding 16..48: each segment is its
        // expert's pairs in pair order, padded; every local pair has exactly one row
        let mut x = 7u64;
        let ids: Vec<i32> = (0..500 * 6).map(|_| { x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); ((x >> 33) % 64) as i32 }).collect();
        let l = MoeLayout::build(&ids, 6, 16, 32);
        let mut row = 0;
        for e in 0..32 {
            let pairs: Vec<usize> = (0..ids.len()).filter(|&p| ids[p] == 16 + e as i32).collect();
            if pairs.is_empty() {
                continue;
            }
            let len = pairs.len().next_multiple_of(PAD);
            assert!(l.segments.contains(&(e, row, len)), "expert {e}");
            for (i, &p) in pairs.iter().enumerate() {
                assert_eq!((l.pair_row[p], l.src[row + i]), ((row + i) as i32, (p / 6) as i32));
            }
            assert!(l.src[row + pairs.len()..row + len].iter().all(|&s| s == -1));
            assert!(l.seg[2 * row..2 * (row + len)].chunks(2).all(|c| c == [row as i32, len as i32]));
            row += len;
        }
        assert_eq!((l.rows(), l.pair_row.iter().filter(|&&r| r >= 0).count()), (row, ids.iter().filter(|&&i| (16..48).contains(&i)).count()));
    }
}
