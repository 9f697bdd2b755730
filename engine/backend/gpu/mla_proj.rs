//! The projections around MLA's absorbed attention: each query into the latent space,
//! q_lat[t, h] = q_nope[t, h] · W_UK(h), and the attention's latents out to values,
//! out[t, h] = W_UV(h) · lat[t, h] (W_UK(h) / W_UV(h): head h's key / value rows of kv_b).
//!
//! Both read W_UV from kv_b as it is and W_UK from the transposed copy made at load
//! (`weights::wuk_transposed`), as `[N, K]` rows per head:
//! - from `mla_proj_mma_min_rows` tokens, one GEMM per head on the matrix units (linear_mma.hip's
//!   `linear_mma_heads`: the dense GEMM's 128 × 128 tile with its near-f32 numerics; `_fold_fp8w`
//!   where every tile lies in one row of scale blocks, as for DeepSeek's kv_b: two blocks an SM);
//!   On NVIDIA sm_80+ with such FP8 weights, mla_heads.hip's kernel instead: X and W by cp.async
//!   in a ring of 64-column K chunks, X split into hi + lo once a chunk, the FP8 weights widened as
//!   fragments are read (`mla_proj_async`);
//! - below, one GEMV per head (linear.hip's `gemv1/gemv8 …_heads`: the decode GEMVs, 16-byte
//!   weight loads streamed once per 8 tokens, f32 accumulation), where the rows allow 16-byte loads;
//! - otherwise (odd shapes without matrix units) the CUDA-core kernels of mla.hip.
use super::backend::{GpuBackend, GpuTensor, GpuVendor};
use super::device::{err, DevBuf, DevPtr, Elem, LaunchConfig};
use super::mla_decode::Latents;
use super::mla_prefill::FlashOut;
use crate::weights::act_quant::ACT_GROUP;
use super::mma::{launch, vec_ok, TILE};
use super::gemv::gemv_geometry;
use super::ops::{cfg, wdt_suffix, GpuLinear, ATTN_PROJ};
use super::ops::GpuKvCache;
use crate::backend::{AttnSeq, BackendError, MlaDims};
use super::ModelDims;

const LIN_MMA: &str = "hip-kernels/linear_mma.hip";
const LIN: &str = "hip-kernels/linear.hip";
const HEADS: &str = "hip-kernels/mla_heads.hip";
/// mla_heads.hip's ring (HM_ST stages of HM_KC K columns), block and a stage's bytes for BM rows:
/// X as f32 rows of HM_KC + 8 (`_bx`: bf16 rows of HM_KC + 8), the tile's 128 W rows of HM_KC + 16
/// bytes
const HM_STAGES: usize = 3;
const HM_KC: usize = 64;
const HM_THREADS: u32 = 128;
fn hm_stage_bytes(bm: usize, xb: bool) -> usize {
    bm * (HM_KC + 8) * if xb { 2 } else { 4 } + TILE * (HM_KC + 16)
}
/// ... and its chunk's X split into bf16 hi and lo tiles (rows of HM_KC + 8; none for bf16 X)
fn hm_split_bytes(bm: usize, xb: bool) -> usize {
    if xb {
        0
    } else {
        2 * bm * (HM_KC + 8) * 2
    }
}
/// Its block rows for M tokens (the `_m32` / `_m64` kernels)
fn hm_rows(m: usize) -> usize {
    if m <= 32 {
        32
    } else {
        64
    }
}
/// Its dynamic shared memory for M tokens, K columns and X's type: the ring's stages (no more
/// than K's chunks) and the split tiles (f32 X at BM 64 and K 512: 104 KB, NVIDIA sm_80 / sm_90,
/// not sm_86 / 89; bf16 X: 58 KB, three blocks an SM)
fn hm_shared_bytes(m: usize, k: usize, xb: bool) -> usize {
    let bm = hm_rows(m);
    HM_STAGES.min(k / HM_KC) * hm_stage_bytes(bm, xb) + hm_split_bytes(bm, xb)
}

/// What mla_heads.hip's kernel writes: f32, bf16 pairs, or e4m3 codes with their scales (at the
/// address given).
#[derive(Debug, Clone, Copy)]
enum HeadsY {
    F32,
    Bf16,
    Codes(DevPtr),
}

/// One product per head: for head z, Y[m, z·yh + n] = Σ_k X[m, z·xh + k] · W[z·wh + w0 + n, k].
/// X is f32, or (`xb`) bf16 (mla_heads.hip's `_bx` kernels only).
struct HeadsGemm<'a> {
    x: DevPtr,
    xb: bool,
    ldx: usize,
    xh: usize,
    w: &'a GpuLinear,
    wh: usize,
    w0: usize,
    ldy: usize,
    yh: usize,
    m: usize,
    n: usize,
    k: usize,
    heads: usize,
}

impl<V: GpuVendor> GpuBackend<V> {
    /// The matrix-unit GEMMs or the GEMVs for `g`, where one applies (else false: the caller
    /// runs the CUDA-core kernel).
    fn heads_product(&self, g: &HeadsGemm, y: &mut DevBuf<f32>) -> Result<bool, BackendError> {
        if self.heads_takes_gemv(g) {
            self.span(ATTN_PROJ, || self.heads_gemv(g, y))?;
        } else if self.heads_takes_async(g) {
            self.span(ATTN_PROJ, || self.heads_async(g, y, HeadsY::F32))?;
        } else if self.mma_gemm && !g.xb {
            self.span(ATTN_PROJ, || self.heads_gemm(g, y))?;
        } else {
            return Ok(false);
        }
        Ok(true)
    }

    /// Whether `heads_product` takes the GEMVs for `g`: below `mla_proj_mma_min_rows` (or
    /// without the GEMM kernels) where the GEMV can.
    fn heads_takes_gemv(&self, g: &HeadsGemm) -> bool {
        !(self.mma_gemm && g.m >= self.tuned.mla_proj_mma_min_rows) && gemv_rows(g) > 0 && !g.xb
    }

    /// Whether `heads_product` takes mla_heads.hip's kernel for `g`.
    fn heads_takes_async(&self, g: &HeadsGemm) -> bool {
        !self.heads_takes_gemv(g) && self.mma_gemm && self.heads_async_ok(g)
    }

    /// q_lat [T, heads, kv_lora] from the queries `q` [T, heads·(nope + rope)].
    pub(super) fn mla_q_latent(&self, q: &GpuTensor, kv_b: &GpuLinear, d: &MlaDims, q_lat: &mut DevBuf<f32>) -> Result<(), BackendError> {
        let (t, heads, lora) = (q.rows, d.num_heads, d.kv_lora_rank);
        if let Some(wt) = &kv_b.wuk_t {
            let g = q_latent_gemm(q, wt, d);
            if self.heads_product(&g, q_lat)? {
                return Ok(());
            }
        }
        let f = self.mla_func(ModelDims::of_mla(d), &format!("mla_q_latent_{}", wdt_suffix(kv_b.wdt)))?;
        self.span(ATTN_PROJ, || {
            let mut b = self.launch(&f);
            b.arg(&q.buf).arg(&kv_b.data).arg(&kv_b.scales).arg(q_lat).arg(&(t as i32)).arg(&(heads as i32)).arg(&kv_b.bn).arg(&kv_b.bk);
            // grid.z: the latent columns in chunks of QL_COLS (128)
            b.run(cuda_core_grid(t, heads, lora.div_ceil(128))).map_err(err("mla_q_latent"))
        })
    }

    /// q_lat as bf16, rounded to nearest even as the warpgroup decode kernel rounds its queries
    /// (half the bytes written here and read there), where mla_heads.hip's kernel takes the
    /// product; None: the caller makes f32 q_lat (`mla_q_latent`).
    pub(super) fn mla_q_latent_bf16(&self, q: &GpuTensor, kv_b: &GpuLinear, d: &MlaDims) -> Result<Option<DevBuf<u16>>, BackendError> {
        let (t, heads, lora) = (q.rows, d.num_heads, d.kv_lora_rank);
        let Some(wt) = &kv_b.wuk_t else {
            return Ok(None);
        };
        let g = q_latent_gemm(q, wt, d);
        if !self.heads_takes_async(&g) {
            return Ok(None);
        }
        let mut y = self.scratch::<u16>(t * heads * lora)?; // every element written
        self.span(ATTN_PROJ, || self.heads_async(&g, &mut y, HeadsY::Bf16))?;
        Ok(Some(y))
    }

    /// `mla_v_out` of bf16 latents straight to the activation quantiser's codes and scales
    /// ([T, heads·v] e4m3 and [heads, T]: a head's v_head = 128 values one group), as
    /// `quantize_act_fp8` of its f32 output would give them (mla_heads.hip's `_bxq`); None where
    /// that kernel does not take the product.
    pub(super) fn mla_v_out_codes(&self, lat: &DevBuf<u16>, t: usize, kv_b: &GpuLinear, d: &MlaDims) -> Result<Option<super::act_codes::ActCodes>, BackendError> {
        let g = v_out_gemm(lat.ptr(), true, t, kv_b, d);
        if g.n != TILE || !self.heads_takes_async(&g) {
            return Ok(None);
        }
        // every code and scale written
        let (mut q, s) = (self.scratch::<u8>(t * d.num_heads * d.v_head)?, self.scratch::<f32>(d.num_heads * t)?);
        self.span(ATTN_PROJ, || self.heads_async(&g, &mut q, HeadsY::Codes(s.ptr())))?;
        Ok(Some(super::act_codes::ActCodes { q, s }))
    }

    /// `mla_attention` then `o` where the attention's kernels hand o's block-scaled GEMM its FP8
    /// codes (the codes `quantize_act_fp8` of the f32 output would give, without that output's
    /// 4 bytes a value written and read back): a batch of prompts alone on the warpgroup flash
    /// kernel (which quantises its own output rows), or decodes whose warpgroup decode kernel's
    /// bf16 latents go through the value projection straight to codes (`mla_v_out_codes`); None
    /// (nothing run) where the batch takes neither: prompts mixed with absorbed sequences, rows
    /// not a multiple of 4, o not on the shared-codes GEMM, another decode kernel.
    pub(super) fn mla_attention_codes(&self, q: &GpuTensor, kv: &GpuKvCache, layer: usize, seqs: &[AttnSeq], (kv_b, o): (&GpuLinear, &GpuLinear), d: &MlaDims) -> Result<Option<GpuTensor>, BackendError> {
        let t = q.rows;
        if self.fa3_prefill(d) && !seqs.is_empty() && seqs.iter().all(|s| self.flash_prefill_for(s, d)) && self.shares_fp8_rows(t, d.num_heads * d.v_head, o) && d.v_head == ACT_GROUP {
            // prompts alone, on the warpgroup flash kernel: it writes o's codes itself (each
            // head's 128 value columns one quantisation group)
            let mut codes = self.scratch::<u8>(t * d.num_heads * d.v_head)?;
            let mut scales = self.scratch::<f32>(t * d.num_heads)?;
            let flash: Vec<&AttnSeq> = seqs.iter().collect();
            self.mla_flash(q, kv, layer, &flash, kv_b, d, FlashOut::Codes(&mut codes, &mut scales))?;
            return Ok(Some(self.gemm_codes((&codes, &scales), t, o)?));
        }
        let takes = !seqs.iter().any(|s| self.flash_prefill_for(s, d)) && self.shares_fp8_rows(t, d.num_heads * d.v_head, o) && self.mma_decode(d, kv) && self.wg_decode(d, t);
        if !takes {
            return Ok(None);
        }
        let lat = self.mla_absorbed_latents(q, kv, layer, seqs, kv_b, d)?;
        if let Latents::Bf16(b) = &lat {
            if let Some(c) = self.mla_v_out_codes(b, t, kv_b, d)? {
                return Ok(Some(self.gemm_codes((&c.q, &c.s), t, o)?));
            }
        }
        Ok(Some(crate::backend::Backend::linear(self, &self.mla_values(&lat, t, kv_b, d)?, o)?))
    }

    /// The attention's output [T, heads·v] from its latents (`mla_v_out` into a new tensor).
    pub(super) fn mla_values(&self, lat: &Latents, t: usize, kv_b: &GpuLinear, d: &MlaDims) -> Result<GpuTensor, BackendError> {
        let mut out = self.alloc_out(t * d.num_heads * d.v_head)?;
        self.mla_v_out(lat, t, kv_b, d, &mut out)?;
        Ok(GpuTensor { rows: t, cols: d.num_heads * d.v_head, buf: out })
    }

    /// Whether `mla_v_out` takes bf16 latents for `t` tokens: where mla_heads.hip's kernel
    /// takes the product (its `_bx` form).
    pub(super) fn mla_v_out_bf16(&self, t: usize, kv_b: &GpuLinear, d: &MlaDims) -> bool {
        self.heads_takes_async(&v_out_gemm(0, true, t, kv_b, d))
    }

    /// out [T, heads·v] from the attention's latents `lat` [T, heads, kv_lora] (bf16 where
    /// `mla_v_out_bf16`).
    pub(super) fn mla_v_out(&self, lat: &Latents, t: usize, kv_b: &GpuLinear, d: &MlaDims, out: &mut DevBuf<f32>) -> Result<(), BackendError> {
        let heads = d.num_heads;
        let lat = match lat {
            Latents::Bf16(b) => {
                let g = v_out_gemm(b.ptr(), true, t, kv_b, d);
                if !self.heads_takes_async(&g) {
                    return Err(self.op_err("mla_v_out", "bf16 latents are mla_heads.hip's only".into()));
                }
                return self.span(ATTN_PROJ, || self.heads_async(&g, out, HeadsY::F32));
            }
            Latents::F32(b) => b,
        };
        if self.heads_product(&v_out_gemm(lat.ptr(), false, t, kv_b, d), out)? {
            return Ok(());
        }
        let f = self.mla_func(ModelDims::of_mla(d), &format!("mla_out_{}", wdt_suffix(kv_b.wdt)))?;
        self.span(ATTN_PROJ, || {
            let mut b = self.launch(&f);
            b.arg(lat).arg(&kv_b.data).arg(&kv_b.scales).arg(out).arg(&(t as i32)).arg(&(heads as i32)).arg(&kv_b.bn).arg(&kv_b.bk);
            // grid.z: the value rows in chunks of OUT_ROWS (32)
            b.run(cuda_core_grid(t, heads, d.v_head.div_ceil(32))).map_err(err("mla_out"))
        })
    }

    /// Whether mla_heads.hip's kernel takes `g`: NVIDIA sm_80+ (32-wide warps with matrix
    /// units), FP8 weights whose tiles fold their scales, K chunks of 64 inside scale blocks,
    /// X rows (f32 or bf16) in 16-byte chunks, Y written as float pairs, its shared memory within a block's.
    fn heads_async_ok(&self, g: &HeadsGemm) -> bool {
        let w = g.w;
        let piece = if g.xb { 8 } else { 4 }; // X elements in 16 bytes
        let shapes = g.k.is_multiple_of(HM_KC) && (w.bk.max(1) as usize).is_multiple_of(HM_KC) && g.ldx.is_multiple_of(piece) && g.xh.is_multiple_of(piece);
        let out = g.ldy.is_multiple_of(2) && g.yh.is_multiple_of(2) && g.n.is_multiple_of(2);
        let fits = hm_shared_bytes(g.m, g.k, g.xb) <= self.dev.max_shared_per_block();
        self.tuned.mla_proj_async && self.warp == 32 && self.matrix_units && w.wdt == 2 && scales_fold(g.wh, g.w0, w.bn) && shapes && out && fits
    }

    /// mla_heads.hip's kernel into `y`: f32, bf16 pairs (its `_by` form) or e4m3 codes with their
    /// scales (`_bxq`).
    fn heads_async<T: Elem>(&self, g: &HeadsGemm, y: &mut DevBuf<T>, kind: HeadsY) -> Result<(), BackendError> {
        let w = g.w;
        let bm = hm_rows(g.m);
        let (form, sy) = match (kind, g.xb) {
            (HeadsY::Bf16, false) => ("_by", 0),
            (HeadsY::F32, true) => ("_bx", 0),
            (HeadsY::F32, false) => ("", 0),
            (HeadsY::Codes(sy), true) if g.n == TILE => ("_bxq", sy),
            _ => return Err(self.op_err("heads_mma", format!("no kernel for {kind:?} from {} X, {} columns", if g.xb { "bf16" } else { "f32" }, g.n))),
        };
        let f = self.func(HEADS, &format!("heads_mma_fp8w_m{bm}{form}"))?;
        let smem = hm_shared_bytes(g.m, g.k, g.xb);
        let (ldx, ldy) = (g.ldx as i64, g.ldy as i64);
        let [xh, wh, w0, yh, m, n, k] = [g.xh, g.wh, g.w0, g.yh, g.m, g.n, g.k].map(|x| x as i32);
        let mut b = self.launch(&f);
        b.arg(&g.x).arg(&ldx).arg(&xh).arg(&w.data).arg(&w.scales).arg(&wh).arg(&w0).arg(y).arg(&ldy).arg(&yh);
        b.arg(&m).arg(&n).arg(&k).arg(&w.bn).arg(&w.bk).arg(&sy);
        let grid = (g.n.div_ceil(TILE) as u32, g.m.div_ceil(bm) as u32, g.heads as u32);
        b.run(LaunchConfig { grid_dim: grid, block_dim: (HM_THREADS, 1, 1), shared_mem_bytes: smem as u32 }).map_err(err("heads_mma"))
    }

    fn heads_gemm(&self, g: &HeadsGemm, y: &mut DevBuf<f32>) -> Result<(), BackendError> {
        let w = g.w;
        let fold = if w.wdt == 2 && scales_fold(g.wh, g.w0, w.bn) { "fold_" } else { "" };
        let f = self.func(LIN_MMA, &format!("linear_mma_heads_{fold}{}", wdt_suffix(w.wdt)))?;
        // 16-byte X loads also need X's rows and head offsets on 4-float boundaries
        let v = vec_ok(g.k, w.wdt, w.bk) & (g.ldx.is_multiple_of(4) && g.xh.is_multiple_of(4)) as i32;
        let (ldx, ldy) = (g.ldx as i64, g.ldy as i64);
        let ints = [g.xh, g.wh, g.w0, g.yh, g.m, g.n, g.k].map(|x| x as i32);
        let [xh, wh, w0, yh, m, n, k] = ints;
        let mut b = self.launch(&f);
        b.arg(&g.x).arg(&ldx).arg(&xh).arg(&w.data).arg(&w.scales).arg(&wh).arg(&w0).arg(y).arg(&ldy).arg(&yh);
        b.arg(&m).arg(&n).arg(&k).arg(&w.bn).arg(&w.bk).arg(&v);
        b.run(launch((g.n.div_ceil(TILE) as u32, g.m.div_ceil(TILE) as u32, g.heads as u32))).map_err(err("linear_mma_heads"))
    }
}

impl<V: GpuVendor> GpuBackend<V> {
    /// The GEMVs: x in slices of up to 8 rows (`gemv8`; one FP8 row: `gemv1`, four outputs a warp).
    fn heads_gemv(&self, g: &HeadsGemm, y: &mut DevBuf<f32>) -> Result<(), BackendError> {
        let (w, per_warp) = (g.w, gemv_rows(g));
        let kind = if per_warp == 4 { "gemv1" } else { "gemv8" };
        let f = self.func(LIN, &format!("{kind}_{}_heads", wdt_suffix(w.wdt)))?;
        let rows = g.heads * g.n;
        let geo = gemv_geometry(rows.div_ceil(per_warp), g.k, w.wdt, self.warp as usize);
        let (ldx, ldy) = (g.ldx as i64, g.ldy as i64);
        let [n, k, sp, lanes, xh, nh, wh, w0, yh] = [rows, g.k, geo.split, geo.lanes, g.xh, g.n, g.wh, g.w0, g.yh].map(|x| x as i32);
        for r0 in (0..g.m).step_by(8) {
            let m = (g.m - r0).min(8) as i32;
            let mut b = self.launch(&f);
            b.arg(&(g.x + (4 * r0 * g.ldx) as u64)).arg(&w.data).arg(&w.scales).arg(&y.at(r0 * g.ldy)).arg(&m).arg(&n).arg(&k).arg(&w.bn).arg(&w.bk).arg(&sp).arg(&lanes);
            b.arg(&ldx).arg(&xh).arg(&nh).arg(&wh).arg(&w0).arg(&ldy).arg(&yh);
            b.run(cfg((geo.blocks as u32, 1), 256, 0)).map_err(err("linear gemv heads"))?;
        }
        Ok(())
    }
}

/// q → latent as per-head products: head h's q_nope [T, nope] (inside q's rows) times W_UK(h)
/// transposed ([kv_lora, nope] rows of `wuk_t`), into q_lat [T, heads, kv_lora].
fn q_latent_gemm<'a>(q: &'a GpuTensor, wuk_t: &'a GpuLinear, d: &MlaDims) -> HeadsGemm<'a> {
    let (t, heads, lora) = (q.rows, d.num_heads, d.kv_lora_rank);
    HeadsGemm { x: q.buf.ptr(), xb: false, ldx: heads * d.qk_head(), xh: d.qk_head(), w: wuk_t, wh: lora, w0: 0, ldy: heads * lora, yh: lora, m: t, n: lora, k: d.qk_nope, heads }
}

/// latent → v as per-head products: head h's latents [T, kv_lora] (f32, or `xb` bf16, at `x`)
/// times W_UV(h) (kv_b's value rows of the head), into out [T, heads·v].
fn v_out_gemm<'a>(x: DevPtr, xb: bool, t: usize, kv_b: &'a GpuLinear, d: &MlaDims) -> HeadsGemm<'a> {
    let (heads, lora) = (d.num_heads, d.kv_lora_rank);
    HeadsGemm { x, xb, ldx: heads * lora, xh: lora, w: kv_b, wh: d.qk_nope + d.v_head, w0: d.qk_nope, ldy: heads * d.v_head, yh: d.v_head, m: t, n: d.v_head, k: lora, heads }
}

/// Output rows a warp of the GEMV takes for `g` (4 for one row of FP8 weights, else 2), or 0
/// where the GEMV cannot: rows of 16-byte chunks (FP8: and scale blocks whole chunks), x rows and
/// head offsets on 4-float boundaries, a warp's rows inside one head.
fn gemv_rows(g: &HeadsGemm) -> usize {
    let w = g.w;
    let per_warp = if g.m == 1 && w.wdt == 2 { 4 } else { 2 };
    let chunks = if w.wdt == 2 { g.k.is_multiple_of(16) && w.bk % 16 == 0 } else { g.k.is_multiple_of(8) };
    if chunks && g.ldx.is_multiple_of(4) && g.xh.is_multiple_of(4) && g.n.is_multiple_of(per_warp) {
        per_warp
    } else {
        0
    }
}

/// Whether every 128-row tile of every head of an FP8 weight lies inside one row of scale blocks
/// (tiles start at z·wh + w0 + 128·i), so that linear_mma.hip's `_fold_fp8w` kernel applies.
fn scales_fold(wh: usize, w0: usize, bn: i32) -> bool {
    let bn = bn.max(1) as usize;
    wh.is_multiple_of(TILE) && w0.is_multiple_of(TILE) && bn.is_multiple_of(TILE)
}

/// The CUDA-core projections: 8 tokens a block (MLA_TB), a head per grid row, `z` chunks.
fn cuda_core_grid(t: usize, heads: usize, z: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (t.div_ceil(8) as u32, heads as u32, z as u32), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

#[cfg(test)]
mod tests {
    use super::{hm_shared_bytes, scales_fold};

    #[test]
    fn heads_kernel_shared_memory_mirrors_mla_heads() {
        let src = include_str!("../../../hip-kernels/mla_heads.hip");
        for d in ["#define HM_KC 64 ", "#define HM_XS (HM_KC + 8) ", "#define HM_WS (HM_KC + 16) ", "#define HM_ST 3 ", "#define HM_SS (HM_KC + 8) "] {
            assert!(src.contains(d), "mla_heads.hip: {d}");
        }
        // V3's latent → v at batch 256 (BM 64, K 512): f32 X three stages of 64 × 72 floats and
        // 128 × 80 weight bytes, plus the split tiles; bf16 X the stages alone (64 × 72 bf16),
        // three blocks within an SM's 228 KB (1 KB each reserved)
        assert_eq!(hm_shared_bytes(256, 512, false), 3 * (18432 + 10240) + 18432);
        assert_eq!(hm_shared_bytes(256, 512, true), 3 * (9216 + 10240));
        assert!(3 * (hm_shared_bytes(256, 512, true) + 1024) <= 228 * 1024);
        // q → latent (K 128: two chunks, two stages)
        assert_eq!(hm_shared_bytes(20, 128, false), 2 * (32 * 72 * 4 + 10240) + 2 * 32 * 72 * 2);
    }

    #[test]
    fn folded_scales_need_every_tile_in_one_block_row() {
        // DeepSeek's kv_b: 256 rows a head (W_UK then W_UV at 128), 128-row blocks; W_UK transposed:
        // 512 rows a head
        assert!(scales_fold(256, 128, 128) && scales_fold(512, 0, 128) && scales_fold(256, 0, 256));
        // a head or its rows starting inside a block, blocks smaller than a tile
        assert!(!scales_fold(44, 20, 128) && !scales_fold(256, 64, 128) && !scales_fold(256, 128, 64));
    }
}
