//! Decode-sized linear layers with FP8 weights on the matrix units (hip-kernels/linear_tc.hip:
//! mma.sync on NVIDIA sm_80+, MFMA on CDNA; whole 64-row groups so no warp reads past W): W's rows on the MMA's M side and x's few rows on its N side, so the weights
//! stream at full width whatever the batch; split-K when the row groups alone would not fill
//! the GPU, summed in a fixed order. With FP8 activations: 2-8 rows on linear_f8.hip (FP8 × FP8,
//! registers), 9-32 on the staged FP8 × FP8 form of moe_f8s.hip (`linear_f8s`).
use super::backend::{GpuBackend, GpuTensor, GpuVendor};
use super::device::{err, DevBuf, Kernel, LaunchConfig};
use super::ops::GpuLinear;
use crate::backend::BackendError;

const LIN_TC: &str = "hip-kernels/linear_tc.hip";
const LIN_F8: &str = "hip-kernels/linear_f8.hip";
/// Output rows per block of linear_f8.hip (4 warps × 2 fragments of 16)
const F8_ROWS: usize = 128;
/// Output rows per block (4 warps × 32) and tokens per block (TC_T)
const ROWS: usize = 128;
const TOKENS: usize = 16;
/// K chunk of the kernel
const KCHUNK: usize = 64;
/// Tokens a block of the staged linear kernel (ML_TOK in moe_f8s.hip)
const F8S_TOKENS: usize = 32;
/// Its K step (MS_BK: a stage, one scale block)
const F8S_KBLOCK: usize = 128;
/// Its dynamic shared memory (ML_SMEM: 4 stages of 128 weight rows and 32 token rows of 128
/// bytes, 32 token scales and 2 weight scales, each stage rounded up to 128 bytes)
pub(super) const LINEAR_F8S_SMEM: usize = 4 * 20736;

/// The least K a split takes: 8 of the swap-AB kernels' 64-column chunks, 4 of the staged
/// kernel's 128-column stages (its ring).
const MIN_SPLIT_K: usize = 512;

/// K split so that blocks fill the GPU's `sms` about `fill` times over, each range whole `chunk`s
/// (the kernel's K step) and at least MIN_SPLIT_K columns: (splits, columns per split).
pub(super) fn tc_splits(blocks: usize, k: usize, chunk: usize, sms: usize, fill: usize) -> (usize, usize) {
    let want = (fill * sms).div_ceil(blocks.max(1)).max(1);
    let most = (k / MIN_SPLIT_K).max(1);
    let splits = want.min(most);
    let ksplit = k.div_ceil(splits).div_ceil(chunk) * chunk;
    (k.div_ceil(ksplit), ksplit)
}

impl<V: GpuVendor> GpuBackend<V> {
    /// Whether this layer at this batch takes the swap-AB matrix-unit kernel.
    pub(super) fn linear_tc_for(&self, x: &GpuTensor, w: &GpuLinear) -> bool {
        let t = &self.tuned;
        self.linear_tc && self.mma_gemm && w.wdt == 2 && (t.linear_tc_min_rows..=t.linear_tc_max_rows).contains(&x.rows) && w.inp.is_multiple_of(KCHUNK) && w.bk % KCHUNK as i32 == 0 && w.out.is_multiple_of(64)
    }

    /// Whether this layer at this batch quantises x to FP8 and takes linear_f8.hip: FP8
    /// activations on (`--fp8-activations dynamic`, a shape with 128 × 128 weight blocks), fewer
    /// rows than the GEMM library takes, `linear_f8_min_rows` to `linear_f8_max_rows` (≤ 8: one
    /// MMA n-fragment), on NVIDIA sm_89+ (the e4m3 MMA).
    pub(super) fn linear_f8_for(&self, x: &GpuTensor, w: &GpuLinear) -> bool {
        let t = &self.tuned;
        self.fp8_act
            && self.mma_gemm
            && e4m3_mma(&self.arch)
            && w.wdt == 2
            && super::blas::fp8_block_ok(w.out, w.inp, w.bn, w.bk)
            && (t.linear_f8_min_rows..=t.linear_f8_max_rows.min(8)).contains(&x.rows)
            && x.rows < t.blaslt_fp8_act_min_rows
            && w.inp.is_multiple_of(KCHUNK)
    }

    /// y = quant(x) · Wᵀ on linear_f8.hip: x quantised per token and 128 channels, split-K where
    /// the 128-row blocks alone would not fill the GPU (fixed-order sum).
    pub(super) fn linear_f8(&self, x: &GpuTensor, w: &GpuLinear, y: &mut DevBuf<f32>) -> Result<(), BackendError> {
        let (m, n, k) = (x.rows, w.out, w.inp);
        let c = self.quantize_act_fp8(x, m)?;
        let (q, s) = (&c.q, &c.s);
        let blocks = n.div_ceil(F8_ROWS);
        let (splits, ksplit) = tc_splits(blocks, k, KCHUNK, self.sms, self.tuned.mma_split_fill);
        let f = self.func(LIN_F8, "linear_f8_fp8w")?;
        let cfg = LaunchConfig { grid_dim: (1, blocks as u32, splits as u32), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        self.f8_split_launch(&f, cfg, (q, s), w, (m, ksplit), y, "linear_f8")
    }

    /// One launch of an FP8 × FP8 linear kernel (linear_f8.hip's and the staged kernel's common
    /// arguments: q, scales, rows, W, S, out, M, N, K, the K step of a split `ks`) over grid z =
    /// splits: straight into y, or into partials summed in a fixed order.
    #[allow(clippy::too_many_arguments)]
    fn f8_split_launch(&self, f: &Kernel, cfg: LaunchConfig, (q, s): (&DevBuf<u8>, &DevBuf<f32>), w: &GpuLinear, (m, ks): (usize, usize), y: &mut DevBuf<f32>, name: &'static str) -> Result<(), BackendError> {
        let (n, splits) = (w.out, cfg.grid_dim.2 as usize);
        let (mi, ni, ki, ksi) = (m as i32, n as i32, w.inp as i32, ks as i32);
        if splits == 1 {
            return self.launch(f).arg(q).arg(s).arg(&mi).arg(&w.data).arg(&w.scales).arg(y).arg(&mi).arg(&ni).arg(&ki).arg(&ksi).run(cfg).map_err(err(name));
        }
        let part = self.scratch::<f32>(splits * m * n)?;
        self.launch(f).arg(q).arg(s).arg(&mi).arg(&w.data).arg(&w.scales).arg(&part).arg(&mi).arg(&ni).arg(&ki).arg(&ksi).run(cfg).map_err(err(name))?;
        self.split_sum(&part, y, m * n, splits)
    }

    /// Whether this layer at this batch quantises x to FP8 and takes the staged FP8 × FP8 kernel
    /// (moe_f8s.hip's `linear_f8s_fp8w`), ahead of the GEMM library: FP8 activations on, more
    /// rows than linear_f8.hip can take (9) up to `linear_f8s_max_rows`, 128 × 128 weight
    /// blocks, whole K blocks, NVIDIA sm_89+. cuBLASLt's block-scaled GEMM has one algorithm for
    /// V3's q_a and kv_a at these sizes (12 and 5 output tiles over K 7,168).
    pub fn linear_f8s_for(&self, x: &GpuTensor, w: &GpuLinear) -> bool {
        self.linear_f8s_rows(x.rows, w)
    }

    /// The same for `rows` rows of input.
    pub(super) fn linear_f8s_rows(&self, rows: usize, w: &GpuLinear) -> bool {
        let t = &self.tuned;
        self.fp8_act
            && self.mma_gemm
            && e4m3_mma(&self.arch)
            && w.wdt == 2
            && w.bn == 128
            && w.bk == 128
            && (9..=t.linear_f8s_max_rows).contains(&rows)
            && w.inp.is_multiple_of(128)
            && w.out.is_multiple_of(16)
    }

    /// y = quant(x) · Wᵀ on the staged kernel: 128 output rows × 32 tokens a block, split over K
    /// (whole 128-column blocks, at least 4 a split: the ring's stages) until the blocks fill the
    /// GPU `mma_split_fill` times over; the splits summed in a fixed order.
    pub(super) fn linear_f8s(&self, x: &GpuTensor, w: &GpuLinear, y: &mut DevBuf<f32>) -> Result<(), BackendError> {
        let (m, n, k) = (x.rows, w.out, w.inp);
        let c = self.quantize_act_fp8(x, m)?;
        let (q, s) = (&c.q, &c.s);
        let grid = (n.div_ceil(F8_ROWS), m.div_ceil(F8S_TOKENS));
        let (splits, ksplit) = tc_splits(grid.0 * grid.1, k, F8S_KBLOCK, self.sms, self.tuned.mma_split_fill);
        let f = self.func(super::moe_grouped::MOE_F8S, "linear_f8s_fp8w")?;
        let cfg = LaunchConfig { grid_dim: (grid.0 as u32, grid.1 as u32, splits as u32), block_dim: (128, 1, 1), shared_mem_bytes: LINEAR_F8S_SMEM as u32 };
        // (the kernel takes a split's K in 128-column blocks)
        self.f8_split_launch(&f, cfg, (q, s), w, (m, ksplit / F8S_KBLOCK), y, "linear_f8s")
    }

    pub(super) fn linear_tc(&self, x: &GpuTensor, w: &GpuLinear, y: &mut DevBuf<f32>) -> Result<(), BackendError> {
        let (m, n, k) = (x.rows, w.out, w.inp);
        let grid = (m.div_ceil(TOKENS), n.div_ceil(ROWS));
        let (splits, ksplit) = tc_splits(grid.0 * grid.1, k, KCHUNK, self.sms, self.tuned.mma_split_fill);
        let f = self.func(LIN_TC, "linear_tc_fp8w")?;
        let (mi, ni, ki, ks) = (m as i32, n as i32, k as i32, ksplit as i32);
        let cfg = LaunchConfig { grid_dim: (grid.0 as u32, grid.1 as u32, splits as u32), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        if splits == 1 {
            return self.launch(&f).arg(&x.buf).arg(&w.data).arg(&w.scales).arg(y).arg(&mi).arg(&ni).arg(&ki).arg(&w.bn).arg(&w.bk).arg(&ks).run(cfg).map_err(err("linear_tc"));
        }
        let part = self.zeros::<f32>(splits * m * n)?;
        self.launch(&f).arg(&x.buf).arg(&w.data).arg(&w.scales).arg(&part).arg(&mi).arg(&ni).arg(&ki).arg(&w.bn).arg(&w.bk).arg(&ks).run(cfg).map_err(err("linear_tc"))?;
        self.split_sum(&part, y, m * n, splits)
    }
}

/// Whether an NVRTC arch name (`sm_90a`) has the e4m3 MMA (sm_89+).
pub(super) fn e4m3_mma(arch: &str) -> bool {
    arch.strip_prefix("sm_").and_then(|a| a.trim_end_matches(|c: char| c.is_ascii_alphabetic()).parse::<u32>().ok()).is_some_and(|v| v >= 89)
}

#[cfg(test)]
mod tests {
    use super::{e4m3_mma, tc_splits, F8S_KBLOCK};

    #[test]
    fn staged_splits_cover_the_k_blocks() {
        // (blocks, K blocks of 128): splits of whole K blocks, at least 4 of them
        for (blocks, kbs) in [(24, 56), (10, 56), (2, 12), (896, 128), (1, 3), (112, 16), (400, 144)] {
            let k = kbs * F8S_KBLOCK;
            let (s, ks) = tc_splits(blocks, k, F8S_KBLOCK, 132, 4);
            let kps = ks / F8S_KBLOCK;
            assert!(ks % F8S_KBLOCK == 0 && s >= 1 && s * kps >= kbs && (s - 1) * kps < kbs, "{blocks} {kbs}: {s} x {kps}");
            assert!(kps >= 4.min(kbs), "{blocks} {kbs}: splits of at least 4 blocks");
        }
        // V3's q_a at batch 32 (12 n-blocks × 1 token tile) over K 7,168: 14 splits of 4 blocks
        assert_eq!(tc_splits(12, 7168, F8S_KBLOCK, 132, 4), (14, 4 * F8S_KBLOCK));
        // o_proj at batch 256 (56 × 16 blocks): no split
        assert_eq!(tc_splits(896, 16384, F8S_KBLOCK, 132, 4), (1, 128 * F8S_KBLOCK));
    }

    #[test]
    fn the_e4m3_mma_is_sm89_and_later() {
        assert!(e4m3_mma("sm_90a") && e4m3_mma("sm_89") && e4m3_mma("sm_100a") && e4m3_mma("sm_120"));
        assert!(!e4m3_mma("sm_80") && !e4m3_mma("sm_86") && !e4m3_mma("gfx942") && !e4m3_mma("gfx950") && !e4m3_mma("sm_"));
    }

    #[test]
    fn splits_cover_k_in_whole_chunks_and_fill_the_gpu() {
        for (blocks, k, sms) in [(1, 7168, 132), (5, 7168, 132), (192, 1536, 132), (1, 64, 132), (56, 18432, 132), (600, 7168, 132)] {
            let (s, ks) = tc_splits(blocks, k, super::KCHUNK, sms, 4);
            assert!(s >= 1 && ks % super::KCHUNK == 0, "{blocks} {k}: {s} x {ks}");
            assert!(s * ks >= k && (s - 1) * ks < k, "{blocks} {k}: ranges {s} x {ks} do not tile K exactly");
            assert!(ks >= 512.min(k) || s == 1, "{blocks} {k}: ranges of at least 8 chunks");
        }
        // V3's kv_a at batch 1 (576 rows: 5 blocks) splits K 7168 into 14 ranges of 512
        assert_eq!(tc_splits(5, 7168, super::KCHUNK, 132, 4), (14, 512));
        // o_proj (7168 rows: 56 blocks) over K 16384: 10 ranges fill 528 blocks
        assert_eq!(tc_splits(56, 16384, super::KCHUNK, 132, 4), (10, 1664));
        // enough blocks: no split
        assert_eq!(tc_splits(600, 7168, super::KCHUNK, 132, 4), (1, 7168));
    }
}
