//! The projections around MLA's absorbed attention: each query into the latent space,
//! q_lat[t, h] = q_nope[t, h] · W_UK(h), and the attention's latents out to values,
//! out[t, h] = W_UV(h) · lat[t, h] (W_UK(h) / W_UV(h): head h's key / value rows of kv_b).
//!
//! Up to `mla_proj_mma_min_rows` tokens: the CUDA-core kernels of mla.hip (f32; each head's
//! weights read once per 8 tokens, bandwidth-bound at decode sizes). From there: one GEMM per head
//! on the matrix units (linear_mma.hip's `linear_mma_heads`, the dense GEMM's 128 × 128 tile with
//! its near-f32 numerics), W_UV read from kv_b as it is and W_UK from the transposed copy made at
//! load (`weights::wuk_transposed`; only where the device has the matrix-unit GEMM).
use super::backend::{GpuBackend, GpuTensor, GpuVendor};
use super::device::{err, DevBuf, LaunchConfig};
use super::mma::{launch, vec_ok, TILE};
use super::ops::{wdt_suffix, GpuLinear, ATTN_PROJ};
use crate::backend::{BackendError, MlaDims};
use super::ModelDims;

const LIN_MMA: &str = "hip-kernels/linear_mma.hip";

/// One per-head GEMM: for head z, Y[m, z·yh + n] = Σ_k X[m, z·xh + k] · W[z·wh + w0 + n, k].
struct HeadsGemm<'a> {
    x: &'a DevBuf<f32>,
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
    /// Whether a batch of `t` tokens takes the matrix-unit projections.
    fn mla_proj_mma(&self, t: usize) -> bool {
        self.mma_gemm && t >= self.tuned.mla_proj_mma_min_rows
    }

    /// q_lat [T, heads, kv_lora] from the queries `q` [T, heads·(nope + rope)].
    pub(super) fn mla_q_latent(&self, q: &GpuTensor, kv_b: &GpuLinear, d: &MlaDims, q_lat: &mut DevBuf<f32>) -> Result<(), BackendError> {
        let (t, heads, lora) = (q.rows, d.num_heads, d.kv_lora_rank);
        if let (true, Some(wt)) = (self.mla_proj_mma(t), &kv_b.wuk_t) {
            let g = HeadsGemm { x: &q.buf, ldx: heads * d.qk_head(), xh: d.qk_head(), w: wt, wh: lora, w0: 0, ldy: heads * lora, yh: lora, m: t, n: lora, k: d.qk_nope, heads };
            return self.span(ATTN_PROJ, || self.heads_gemm(&g, q_lat));
        }
        let f = self.mla_func(ModelDims::of_mla(d), &format!("mla_q_latent_{}", wdt_suffix(kv_b.wdt)))?;
        self.span(ATTN_PROJ, || {
            let mut b = self.launch(&f);
            b.arg(&q.buf).arg(&kv_b.data).arg(&kv_b.scales).arg(q_lat).arg(&(t as i32)).arg(&(heads as i32)).arg(&kv_b.bn).arg(&kv_b.bk);
            // grid.z: the latent columns in chunks of QL_COLS (128)
            b.run(cuda_core_grid(t, heads, lora.div_ceil(128))).map_err(err("mla_q_latent"))
        })
    }

    /// out [T, heads·v] from the attention's latents `lat` [T, heads, kv_lora].
    pub(super) fn mla_v_out(&self, lat: &DevBuf<f32>, t: usize, kv_b: &GpuLinear, d: &MlaDims, out: &mut DevBuf<f32>) -> Result<(), BackendError> {
        let (heads, lora) = (d.num_heads, d.kv_lora_rank);
        if self.mla_proj_mma(t) {
            let g = HeadsGemm { x: lat, ldx: heads * lora, xh: lora, w: kv_b, wh: d.qk_nope + d.v_head, w0: d.qk_nope, ldy: heads * d.v_head, yh: d.v_head, m: t, n: d.v_head, k: lora, heads };
            return self.span(ATTN_PROJ, || self.heads_gemm(&g, out));
        }
        let f = self.mla_func(ModelDims::of_mla(d), &format!("mla_out_{}", wdt_suffix(kv_b.wdt)))?;
        self.span(ATTN_PROJ, || {
            let mut b = self.launch(&f);
            b.arg(lat).arg(&kv_b.data).arg(&kv_b.scales).arg(out).arg(&(t as i32)).arg(&(heads as i32)).arg(&kv_b.bn).arg(&kv_b.bk);
            // grid.z: the value rows in chunks of OUT_ROWS (32)
            b.run(cuda_core_grid(t, heads, d.v_head.div_ceil(32))).map_err(err("mla_out"))
        })
    }

    fn heads_gemm(&self, g: &HeadsGemm, y: &mut DevBuf<f32>) -> Result<(), BackendError> {
        let w = g.w;
        let f = self.func(LIN_MMA, &format!("linear_mma_heads_{}", wdt_suffix(w.wdt)))?;
        // 16-byte X loads also need X's rows and head offsets on 4-float boundaries
        let v = vec_ok(g.k, w.wdt, w.bk) & (g.ldx.is_multiple_of(4) && g.xh.is_multiple_of(4)) as i32;
        let (ldx, ldy) = (g.ldx as i64, g.ldy as i64);
        let ints = [g.xh, g.wh, g.w0, g.yh, g.m, g.n, g.k].map(|x| x as i32);
        let [xh, wh, w0, yh, m, n, k] = ints;
        let mut b = self.launch(&f);
        b.arg(g.x).arg(&ldx).arg(&xh).arg(&w.data).arg(&w.scales).arg(&wh).arg(&w0).arg(y).arg(&ldy).arg(&yh);
        b.arg(&m).arg(&n).arg(&k).arg(&w.bn).arg(&w.bk).arg(&v);
        b.run(launch((g.n.div_ceil(TILE) as u32, g.m.div_ceil(TILE) as u32, g.heads as u32))).map_err(err("linear_mma_heads"))
    }
}

/// The CUDA-core projections: 8 tokens a block (MLA_TB), a head per grid row, `z` chunks.
fn cuda_core_grid(t: usize, heads: usize, z: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (t.div_ceil(8) as u32, heads as u32, z as u32), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}
