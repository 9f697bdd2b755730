//! GPU ops against the CPU reference backend, and the golden checkpoints end to end on the GPU.
//! These need a GPU: they are `#[ignore]`d (reported as ignored, never as passed) and run with
//! `ENGINE_TEST_BACKEND=cuda cargo test --release --test gpu_ops -- --ignored` on an NVIDIA machine
//! (`ENGINE_TEST_BACKEND=rocm` on an AMD one: the same tests on the ROCm backend).
//! Outputs are NaN-poisoned before every launch (ENGINE_GPU_POISON=1) so unwritten elements fail.
mod common;

use std::sync::Arc;

use engine::backend::cpu::CpuBackend;
use engine::backend::gpu::backend::{GpuBackend, GpuVendor};
use engine::backend::{AttnSeq, Backend, KvEntrySite, MlaDims, RopeSite, RouteParams, TensorShape};
use engine::config::{RopeConfig, RopeTables, ScoringFunc, TopkMethod};
use engine::model::{ForwardBatch, Model};
use engine::sampling::{log_softmax, Rng};
use engine::weights::{HostLinear, LinearData, MmapSlice};

const F32_TOL: f64 = 1e-4;
/// bf16 operands: FP8 weights whose block scale varies inside a 128-row tile are rounded to bf16
/// after scaling
const BF16_TOL: f64 = 1e-2;
// tensor-core GEMMs: X split into bf16 hi + lo, bf16/FP8 weights exact (FP8 scale folded into X),
// f32 weights split too: near-f32 results
const MMA_TOL: f64 = 2e-4;
/// FP8 × FP8 on the tensor cores: exact products, accumulated within each 128-column block at
/// the tensor cores' reduced precision, then scaled and summed in f32
const FP8_ACC_TOL: f64 = 2e-3;

fn gpu<V: GpuVendor>() -> GpuBackend<V> {
    std::env::set_var("ENGINE_GPU_POISON", "1");
    GpuBackend::<V>::new(0).unwrap_or_else(|e| panic!("{} backend: {e}", V::NAME))
}

fn randn(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() * scale).collect()
}

/// ‖a − b‖ / ‖b‖ in f64; NaN anywhere fails.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length");
    assert!(a.iter().all(|x| x.is_finite()), "GPU output has NaN/inf (unwritten elements?)");
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        num += ((x - y) as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

fn check(name: &str, a: &[f32], b: &[f32], tol: f64) {
    let e = rel_err(a, b);
    eprintln!("{name}: rel err {e:.2e}");
    assert!(e <= tol, "{name}: relative error {e:.3e} > {tol:e}");
}

#[derive(Clone, Copy)]
enum WType {
    F32,
    Bf16,
    Fp8,
}

fn host_linear(rng: &mut Rng, out: usize, inp: usize, t: WType) -> HostLinear {
    let w = randn(rng, out * inp, (inp as f32).powf(-0.5));
    match t {
        WType::F32 => HostLinear::from_f32("w", out, inp, &w),
        WType::Bf16 => {
            let b: Vec<u8> = w.iter().flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes()).collect();
            HostLinear { name: "w".into(), out, inp, data: LinearData::BF16(MmapSlice::from_vec(b)) }
        }
        WType::Fp8 => host_fp8(rng, out, inp, &w, 128),
    }
}

/// FP8 e4m3 with [bn × 128] block scales.
fn host_fp8(rng: &mut Rng, out: usize, inp: usize, w: &[f32], bn: usize) -> HostLinear {
    let bk = 128;
    let scale: Vec<f32> = (0..out.div_ceil(bn) * inp.div_ceil(bk)).map(|_| 0.002 + rng.uniform() as f32 * 0.004).collect();
    let q: Vec<u8> = (0..out * inp).map(|i| engine::synth::f32_to_fp8_e4m3fn(w[i] / scale[(i / inp / bn) * inp.div_ceil(bk) + (i % inp) / bk])).collect();
    HostLinear { name: "w".into(), out, inp, data: LinearData::Fp8 { w: MmapSlice::from_vec(q), scale_inv: scale, block_n: bn, block_k: bk } }
}

/// x [m, k] · wᵀ on the GPU and on the CPU reference: (GPU, CPU).
fn linear_both<V: GpuVendor>(g: &GpuBackend<V>, c: &CpuBackend, w: &HostLinear, m: usize, k: usize, x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let got = g.download(&g.linear(&g.upload(m, k, x).unwrap(), &g.upload_linear(w).unwrap()).unwrap()).unwrap();
    let want = c.download(&c.linear(&c.upload(m, k, x).unwrap(), &c.upload_linear(w).unwrap()).unwrap()).unwrap();
    (got, want)
}

/// A random FP8 layer [n, k] (scale blocks of `bn` rows, 128 columns) on m random rows, on the GPU
/// against the CPU reference, within `tol`.
fn check_fp8_linear<V: GpuVendor>(g: &GpuBackend<V>, c: &CpuBackend, rng: &mut Rng, (m, n, k, bn): (usize, usize, usize, usize), name: &str, tol: f64) {
    let v = randn(rng, n * k, (k as f32).powf(-0.5));
    let w = host_fp8(rng, n, k, &v, bn);
    let x = randn(rng, m * k, 1.0);
    let (got, want) = linear_both(g, c, &w, m, k, &x);
    check(&format!("{name} {m}x{n}x{k}"), &got, &want, tol);
}

/// `g.linear` against the CPU at each (m, n, k) and every weight dtype, within `tol`.
fn check_linears<V: GpuVendor>(g: &GpuBackend<V>, name: &str, seed: u64, shapes: &[(usize, usize, usize)], tol: f64) {
    let c = CpuBackend::new();
    let mut rng = Rng::new(seed);
    for &(m, n, k) in shapes {
        for t in [WType::F32, WType::Bf16, WType::Fp8] {
            let tag = match t { WType::F32 => "f32", WType::Bf16 => "bf16", WType::Fp8 => "fp8" };
            let w = host_linear(&mut rng, n, k, t);
            let x = randn(&mut rng, m * k, 1.0);
            let (got, want) = linear_both(g, &c, &w, m, k, &x);
            check(&format!("{name} {tag} {m}x{n}x{k}"), &got, &want, tol);
        }
    }
}

#[test]
#[ignore = "needs a GPU: ENGINE_TEST_BACKEND=cuda (or rocm) ... -- --ignored"]
fn linear_all_dtypes_real_and_odd_shapes() {
    common::on_gpu!(linear_all_dtypes_real_and_odd_shapes_on)
}

fn linear_all_dtypes_real_and_odd_shapes_on<V: GpuVendor>() {
    // the CUDA-core kernels (GEMV up to 32 rows, f32 tiles beyond) with the tensor cores (own and
    // cuBLASLt, the swap-AB kernel) off
    let mut g = gpu::<V>();
    g.mma_gemm = false;
    g.blaslt = None;
    g.linear_tc = false;
    // GEMV: 1-8 warps per row (576 rows: 8; 1536: 4; 24576: 1), odd row counts; more row groups
    // than the one-wave grid holds (7,168 × 2,048 at one row, 4,096 × 7,168 at three), rows of
    // 128 and 64 (several row groups a warp)
    let shapes = [(1, 1536, 7168), (7, 576, 7168), (1, 576, 7168), (2, 24576, 1536), (3, 4096, 7168), (1, 7168, 2048), (1, 999, 128), (4, 300, 64), (20, 1000, 2048), (32, 576, 7168), (33, 7168, 2048), (5, 77, 100), (130, 129, 257)];
    check_linears(&g, "linear", 1, &shapes, F32_TOL);
}

/// hip-kernels/linear_tc.hip (NVIDIA sm_80+): FP8 layers at decode batches (1-32 rows) with W on
/// the MMA's M side, x as bf16 hi + lo; real V3 shapes, with and without split-K, two token tiles
/// (17-32 rows), against the f32 CPU reference.
#[test]
#[ignore = "needs a GPU: ENGINE_TEST_BACKEND=cuda (or rocm) ... -- --ignored"]
fn linear_swap_ab_small_batches() {
    common::on_gpu!(linear_swap_ab_small_batches_on)
}

fn linear_swap_ab_small_batches_on<V: GpuVendor>() {
    let g = gpu::<V>();
    let c = CpuBackend::new();
    let mut rng = Rng::new(21);
    for (m, n, k) in [(1, 576, 7168), (3, 1536, 7168), (8, 24576, 1536), (9, 7168, 16384), (16, 2048, 7168), (17, 7168, 2048), (32, 4096, 512)] {
        check_fp8_linear(&g, &c, &mut rng, (m, n, k, 128), &format!("linear_tc fp8 (swap-AB: {})", g.linear_tc), MMA_TOL);
    }
}

/// hip-kernels/linear_mma.hip (mma.sync bf16 on NVIDIA; the same tile logic runs MFMA on CDNA):
/// real V3 shapes with and without split-K (9-64 rows split K to fill the GPU), odd sizes and
/// partial tiles (the scalar staging path), every weight dtype, against the f32 CPU reference.
#[test]
#[ignore = "needs a GPU: ENGINE_TEST_BACKEND=cuda (or rocm) ... -- --ignored"]
fn linear_on_tensor_cores() {
    common::on_gpu!(linear_on_tensor_cores_on)
}

fn linear_on_tensor_cores_on<V: GpuVendor>() {
    let mut g = gpu::<V>();
    // the 128-row tiles at every size here (the swap-AB kernel and the GEMM library's FP8 path
    // have their own tests)
    g.linear_tc = false;
    g.tuned.blaslt_fp8_min_rows = usize::MAX;
    assert!(g.mma_gemm, "sm_80+ and CDNA take the matrix-unit path by default");
    // bf16 weights go through cuBLASLt / hipBLASLt (x as bf16 hi + lo rows) where it loads, as on
    // the H200 (libcublasLt on the library path); odd shapes keep the own kernel
    assert!(g.blaslt.is_some(), "the vendor GEMM library did not load: put CUDA's lib64 (or ROCm's lib) on LD_LIBRARY_PATH");
    let shapes = [(9, 7168, 2048), (33, 7168, 2048), (64, 2048, 7168), (256, 576, 7168), (64, 64, 32), (130, 129, 257), (100, 1536, 7168), (65, 24576, 1536), (520, 1536, 7168), (300, 7168, 18432)];
    check_linears(&g, "linear_mma", 11, &shapes, MMA_TOL);
    // 64-row scale blocks: the scale cannot ride on X, so W is scaled and rounded to bf16
    let c = CpuBackend::new();
    let mut rng = Rng::new(12);
    for (m, n, k) in [(40, 1000, 2048), (200, 576, 7168)] {
        check_fp8_linear(&g, &c, &mut rng, (m, n, k, 64), "linear_mma fp8 64x128 blocks", BF16_TOL);
    }
}

/// FP8 layers through the vendor GEMM library (cuBLASLt / hipBLASLt): W·s dequantised to bf16
/// hi + lo, three bf16 products summed in a fixed order; 128×128 and 64-row scale blocks (the
/// latter cannot ride on X in the own tiles, here they are exact either way), real V3 shapes and
/// rows that are not a multiple of any tile, against the f32 CPU reference.
#[test]
#[ignore = "needs a GPU: ENGINE_TEST_BACKEND=cuda (or rocm) ... -- --ignored"]
fn linear_fp8_through_gemm_library() {
    common::on_gpu!(linear_fp8_through_gemm_library_on)
}

fn linear_fp8_through_gemm_library_on<V: GpuVendor>() {
    let mut g = gpu::<V>();
    assert!(g.blaslt.is_some(), "the vendor GEMM library did not load: put CUDA's lib64 (or ROCm's lib) on LD_LIBRARY_PATH");
    g.tuned.blaslt_fp8_min_rows = 1;
    let c = CpuBackend::new();
    let mut rng = Rng::new(31);
    for (m, n, k, bn) in [(1, 576, 7168, 128), (37, 24576, 1536, 128), (256, 2048, 7168, 128), (300, 7168, 2048, 128), (520, 1536, 7168, 128), (200, 576, 7168, 64)] {
        check_fp8_linear(&g, &c, &mut rng, (m, n, k, bn), &format!("gemm library fp8 {bn}-row blocks"), MMA_TOL);
    }
}

/// `--fp8-activations dynamic`: the activation quantiser (hip-kernels/act_quant.hip) bit for bit
/// against its host twin (engine/weights/act_quant.rs), then FP8 layers through the library's
/// block-scaled FP8 GEMM against the f32 CPU reference fed with the same quantised activations
/// (what remains is the tensor cores' FP8 accumulation inside each 128-column block); real V3
/// shapes, rows that are not a multiple of any tile.
#[test]
#[ignore = "needs a GPU: ENGINE_TEST_BACKEND=cuda (or rocm) ... -- --ignored"]
fn linear_fp8_dynamic_activations() {
    common::on_gpu!(linear_fp8_dynamic_activations_on)
}

fn linear_fp8_dynamic_activations_on<V: GpuVendor>() {
    use engine::weights::act_quant::{ActFp8, ACT_GROUP};
    let mut g = gpu::<V>();
    let c = CpuBackend::new();
    let mut rng = Rng::new(41);
    for (rows, cols, padded) in [(3, 7168, 4), (130, 300, 132), (1, 2048, 1)] {
        let mut x = randn(&mut rng, rows * cols, 2.0);
        x[cols - ACT_GROUP..cols].fill(0.0); // an all-zero group
        let (q, s) = g.quantize_act_fp8(&g.upload(rows, cols, &x).unwrap(), padded).unwrap();
        let (q, s) = (q.to_host().unwrap(), s.to_host().unwrap());
        let want = ActFp8::quantize(&x, rows, cols);
        let groups = cols.div_ceil(ACT_GROUP);
        assert_eq!(&q[..rows * cols], &want.q[..], "quantised codes {rows}x{cols}");
        assert!(q[rows * cols..padded * cols].iter().all(|&b| b == 0), "padding rows are zeros");
        for r in 0..rows {
            for j in 0..groups {
                assert_eq!(s[j * padded + r].to_bits(), want.scales[r * groups + j].to_bits(), "scale of row {r} group {j} ({rows}x{cols})");
            }
        }
        eprintln!("quant_fp8_act {rows}x{cols}: codes and scales equal the host's");
    }
    assert!(g.blaslt.as_ref().is_some_and(|l| l.supports_fp8_block(256, 576, 7168)), "no block-scaled FP8 GEMM in the vendor library (cuBLASLt 12.9+ on Hopper is needed)");
    g.fp8_act = true;
    g.tuned.linear_f8_min_rows = 1;
    // up to 8 rows on sm_89+: linear_f8.hip's FP8 × FP8 MMA (split-K at V3's shapes; 48 rows: a
    // half fragment; K 448: a last scale block of 64 columns); the rest through cuBLASLt
    let small = [(1, 576, 7168), (1, 7168, 16384), (3, 24576, 1536), (8, 2048, 7168), (5, 7168, 2048), (1, 48, 512), (2, 64, 448)];
    for (m, n, k) in small.into_iter().chain([(256, 576, 7168), (300, 7168, 2048), (136, 24576, 1536), (200, 32768, 512), (513, 7168, 16384)]) {
        let v = randn(&mut rng, n * k, (k as f32).powf(-0.5));
        let w = host_fp8(&mut rng, n, k, &v, 128);
        let x = randn(&mut rng, m * k, 1.0);
        let (got, f32_ref) = linear_both(&g, &c, &w, m, k, &x);
        let xq = ActFp8::quantize(&x, m, k).dequantize();
        let want = c.download(&c.linear(&c.upload(m, k, &xq).unwrap(), &c.upload_linear(&w).unwrap()).unwrap()).unwrap();
        eprintln!("  (FP8 activations against f32 ones: rel err {:.2e})", rel_err(&got, &f32_ref));
        check(&format!("block-scaled fp8 gemm {m}x{n}x{k}"), &got, &want, FP8_ACC_TOL);
    }
}

#[test]
#[ignore = "needs a GPU: ENGINE_TEST_BACKEND=cuda (or rocm) ... -- --ignored"]
fn norms_elementwise_embedding_gather_rope() {
    common::on_gpu!(norms_elementwise_embedding_gather_rope_on)
}

fn norms_elementwise_embedding_gather_rope_on<V: GpuVendor>() {
    let g = gpu::<V>();
    let c = CpuBackend::new();
    let mut rng = Rng::new(2);
    // 7,168 and 64: rows held in registers (16-byte loads); 513 and 8,196 (wider than the
    // registers hold): the scalar loops
    for (rows, cols) in [(3, 7168), (17, 513), (1, 64), (2, 8196)] {
        let x = randn(&mut rng, rows * cols, 1.0);
        let y = randn(&mut rng, rows * cols, 1.0);
        let w = randn(&mut rng, cols, 1.0);
        let (cx, gx) = (c.upload(rows, cols, &x).unwrap(), g.upload(rows, cols, &x).unwrap());
        let (cy, gy) = (c.upload(rows, cols, &y).unwrap(), g.upload(rows, cols, &y).unwrap());
        let (cw, gw) = (c.upload(1, cols, &w).unwrap(), g.upload(1, cols, &w).unwrap());
        check("rms_norm", &g.download(&g.rms_norm(&gx, &gw, 1e-6).unwrap()).unwrap(), &c.download(&c.rms_norm(&cx, &cw, 1e-6).unwrap()).unwrap(), F32_TOL);
        let (mut cr, mut gr) = (c.upload(rows, cols, &y).unwrap(), g.upload(rows, cols, &y).unwrap());
        let a = g.download(&g.add_rms_norm(&gx, &mut gr, &gw, 1e-6).unwrap()).unwrap();
        let b = c.download(&c.add_rms_norm(&cx, &mut cr, &cw, 1e-6).unwrap()).unwrap();
        check("add_rms_norm", &a, &b, F32_TOL);
        check("add_rms_norm residual", &g.download(&gr).unwrap(), &c.download(&cr).unwrap(), F32_TOL);
        check("silu_mul", &g.download(&g.silu_mul(&gx, &gy).unwrap()).unwrap(), &c.download(&c.silu_mul(&cx, &cy).unwrap()).unwrap(), F32_TOL);
        let (mut ca, mut ga) = (c.upload(rows, cols, &x).unwrap(), g.upload(rows, cols, &x).unwrap());
        c.add(&mut ca, &cy).unwrap();
        g.add(&mut ga, &gy).unwrap();
        check("add", &g.download(&ga).unwrap(), &c.download(&ca).unwrap(), F32_TOL);
        // from column 1 (the scalar loop) and from column 0 over a multiple of 4 (16-byte loads)
        for (start, sub) in [(1, (cols / 3).max(1)), (0, (cols / 3 / 4 * 4).max(4))] {
            let ws = randn(&mut rng, sub, 1.0);
            let (mut cc, mut gc) = (c.upload(rows, cols, &x).unwrap(), g.upload(rows, cols, &x).unwrap());
            c.rms_norm_cols(&mut cc, start, &c.upload(1, sub, &ws).unwrap(), 1e-6).unwrap();
            g.rms_norm_cols(&mut gc, start, &g.upload(1, sub, &ws).unwrap(), 1e-6).unwrap();
            check(&format!("rms_norm_cols from {start}"), &g.download(&gc).unwrap(), &c.download(&cc).unwrap(), F32_TOL);
        }
        let rowsel: Vec<u32> = (0..5).map(|i| (i * 7 % rows) as u32).collect();
        check("gather_rows", &g.download(&g.gather_rows(&gx, &rowsel).unwrap()).unwrap(), &c.download(&c.gather_rows(&cx, &rowsel).unwrap()).unwrap(), 0.0);
    }
    for t in [WType::F32, WType::Bf16, WType::Fp8] {
        let table = host_linear(&mut rng, 1000, 300, t);
        let ids: Vec<u32> = vec![0, 999, 17, 17, 500];
        let a = g.download(&g.embedding(&g.upload_linear(&table).unwrap(), &ids).unwrap()).unwrap();
        let b = c.download(&c.embedding(&c.upload_linear(&table).unwrap(), &ids).unwrap()).unwrap();
        check("embedding", &a, &b, 0.0);
    }
    for (interleaved, dim, yarn) in [(true, 64, true), (false, 64, false), (true, 16, true)] {
        let mut cfg: serde_json::Value = serde_json::json!({"rope_theta": 10000.0});
        if yarn {
            cfg["rope_scaling"] = serde_json::json!({"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0});
        }
        let f = engine::config::Fields::new("t", &cfg).unwrap();
        let rope = RopeTables::new(&RopeConfig::parse(&f, dim, 163840, interleaved).unwrap());
        // 21 heads: more pairs a row than one block's threads (the grid's y blocks)
        let (rows, heads, stride, off) = (9, 21, 192, 128);
        let cols = heads * stride;
        let x = randn(&mut rng, rows * cols, 1.0);
        let pos: Vec<u32> = (0..rows as u32).map(|i| i * 4099 + 3).collect();
        let (mut cx, mut gx) = (c.upload(rows, cols, &x).unwrap(), g.upload(rows, cols, &x).unwrap());
        c.rope(&mut cx, &pos, heads, stride, off.min(stride - dim), &rope).unwrap();
        g.rope(&mut gx, &pos, heads, stride, off.min(stride - dim), &rope).unwrap();
        check(&format!("rope interleaved={interleaved} dim={dim} yarn={yarn}"), &g.download(&gx).unwrap(), &c.download(&cx).unwrap(), F32_TOL);
    }
}

/// `linear_pair` (one launch for two weights of one input: MLA's q_a and kv_a) and `norm_linear`
/// (the RMSNorm folded into the GEMV: q_a_layernorm and q_b) against the CPU's unfused ops, every
/// weight dtype, at 1, 3 and 8 rows (the fused GEMVs) and 12 (the ops in turn); V3's shapes
/// (1,536 + 576 rows of 7,168; 3,072 rows of 1,536) and short odd ones, and a pair of mixed dtypes
/// (not fusable: two linears); `norm_linear` with no RoPE, the interleaved one (the GEMV's
/// epilogue) and the rotate-half one (the rope op after), YaRN, at random positions.
#[test]
#[ignore = "needs a GPU: ENGINE_TEST_BACKEND=cuda (or rocm) ... -- --ignored"]
fn linear_pair_and_norm_linear() {
    common::on_gpu!(linear_pair_and_norm_linear_on)
}

fn linear_pair_and_norm_linear_on<V: GpuVendor>() {
    let (g, c) = (gpu::<V>(), CpuBackend::new());
    let mut rng = Rng::new(71);
    let tag = |t: WType| match t { WType::F32 => "f32", WType::Bf16 => "bf16", WType::Fp8 => "fp8" };
    for (n1, n2, k, types) in [(1536, 576, 7168, [WType::F32, WType::Bf16, WType::Fp8]), (40, 24, 256, [WType::F32, WType::Bf16, WType::Fp8]), (64, 32, 384, [WType::Bf16, WType::Fp8, WType::F32])] {
        for (ta, tb) in types.iter().zip(types.iter().cycle().skip(if n1 == 64 { 1 } else { 0 })) {
            let (a, b) = (host_linear(&mut rng, n1, k, *ta), host_linear(&mut rng, n2, k, *tb));
            let (ga, gb, ca, cb) = (g.upload_linear(&a).unwrap(), g.upload_linear(&b).unwrap(), c.upload_linear(&a).unwrap(), c.upload_linear(&b).unwrap());
            for m in [1, 3, 8, 12] {
                let x = randn(&mut rng, m * k, 1.0);
                let (y1, y2) = g.linear_pair(&g.upload(m, k, &x).unwrap(), &ga, &gb).unwrap();
                let (r1, r2) = engine::backend::linear_pair_by_ops(&c, &c.upload(m, k, &x).unwrap(), &ca, &cb).unwrap();
                assert_eq!((y1.rows(), y1.cols(), y2.rows(), y2.cols()), (m, n1, m, n2));
                let name = format!("linear_pair {}+{} {m}x({n1}+{n2})x{k}", tag(*ta), tag(*tb));
                check(&format!("{name} first"), &g.download(&y1).unwrap(), &c.download(&r1).unwrap(), F32_TOL);
                check(&format!("{name} second"), &g.download(&y2).unwrap(), &c.download(&r2).unwrap(), F32_TOL);
            }
        }
    }
    // (rows, K, heads, head width, rope offset, rope dim): V3's q_b (K split over 2 warps at one
    // row), short rows of 8 lanes, K split 8 ways, and FP8 rows not of whole 16-byte chunks
    let yarn = serde_json::json!({"rope_theta": 10000.0, "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}});
    let f = engine::config::Fields::new("t", &yarn).unwrap();
    for (n, k, heads, hs, off, dim) in [(3072, 1536, 16, 192, 128, 64), (40, 128, 2, 20, 12, 8), (128, 4096, 2, 64, 32, 32), (64, 264, 4, 16, 8, 8)] {
        let tables: Vec<RopeTables> = [true, false].map(|il| RopeTables::new(&RopeConfig::parse(&f, dim, 163840, il).unwrap())).into();
        for t in [WType::F32, WType::Bf16, WType::Fp8] {
            let w = host_linear(&mut rng, n, k, t);
            let (gw, cw) = (g.upload_linear(&w).unwrap(), c.upload_linear(&w).unwrap());
            let norm: Vec<f32> = (0..k).map(|_| 1.0 + 0.2 * rng.normal()).collect();
            let (gn, cn) = (g.upload(1, k, &norm).unwrap(), c.upload(1, k, &norm).unwrap());
            for m in [1, 3, 8, 12] {
                // rows of different scales: each row's own norm
                let x: Vec<f32> = (0..m * k).map(|i| rng.normal() * (1.0 + (i / k) as f32)).collect();
                let pos: Vec<u32> = (0..m).map(|_| (rng.next_u64() % 100_000) as u32).collect();
                for rope in [None, Some(&tables[0]), Some(&tables[1])] {
                    let site = rope.map(|tables| RopeSite { positions: &pos, heads, head_stride: hs, offset: off, tables });
                    let y = g.norm_linear(&g.upload(m, k, &x).unwrap(), &gn, 1e-6, &gw, site.as_ref()).unwrap();
                    let r = engine::backend::norm_linear_by_ops(&c, &c.upload(m, k, &x).unwrap(), &cn, 1e-6, &cw, site.as_ref()).unwrap();
                    let kind = rope.map_or("no rope", |t| if t.interleaved { "interleaved rope" } else { "rotate-half rope" });
                    check(&format!("norm_linear {} {m}x{n}x{k} {kind}", tag(t)), &g.download(&y).unwrap(), &c.download(&r).unwrap(), F32_TOL);
                }
            }
        }
    }
}

/// The new tokens' MLA cache entries in one launch (`mla_kv_entry`: norm, RoPE and cache write of
/// kv_a's output) against the same three ops on the GPU — bit for bit, the latent and the whole
/// cache, f32 and bf16 caches — and the latent against the f32 CPU ops; V3's entry (512 + 64,
/// YaRN, interleaved) at 1 and 5 rows on random slots and positions.
#[test]
#[ignore = "needs a GPU: ENGINE_TEST_BACKEND=cuda (or rocm) ... -- --ignored"]
fn mla_kv_entry_fused() {
    common::on_gpu!(mla_kv_entry_fused_on)
}

fn mla_kv_entry_fused_on<V: GpuVendor>() {
    let c = CpuBackend::new();
    let mut rng = Rng::new(43);
    let cfg = serde_json::json!({"rope_theta": 10000.0, "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}});
    let f = engine::config::Fields::new("t", &cfg).unwrap();
    let rope = RopeTables::new(&RopeConfig::parse(&f, 64, 163840, true).unwrap());
    let (lora, entry, layers, slots_total, eps) = (512, 576, 2, 300, 1e-6f32);
    for bf16 in [false, true] {
        let mut g = gpu::<V>();
        g.attn_bf16 = bf16;
        for rows in [1, 5] {
            let x = randn(&mut rng, rows * entry, 1.0);
            let w: Vec<f32> = (0..lora).map(|_| 1.0 + 0.1 * rng.normal()).collect();
            let mut slots: Vec<u32> = Vec::new();
            while slots.len() < rows {
                let s = (rng.next_u64() % slots_total as u64) as u32;
                if !slots.contains(&s) {
                    slots.push(s);
                }
            }
            let pos: Vec<u32> = (0..rows).map(|_| (rng.next_u64() % 100_000) as u32).collect();
            let site = KvEntrySite { layer: 1, slots: &slots, positions: &pos, rope: &rope, offset: lora };
            let gw = g.upload(1, lora, &w).unwrap();
            let (mut fx, mut ox) = (g.upload(rows, entry, &x).unwrap(), g.upload(rows, entry, &x).unwrap());
            let (mut fkv, mut okv) = (g.alloc_kv_cache(layers, slots_total, entry).unwrap(), g.alloc_kv_cache(layers, slots_total, entry).unwrap());
            g.mla_kv_entry(&mut fx, &gw, eps, &mut fkv, &site).unwrap();
            engine::backend::mla_kv_entry_by_ops(&g, &mut ox, &gw, eps, &mut okv, &site).unwrap();
            let (fl, ol) = (g.download(&fx).unwrap(), g.download(&ox).unwrap());
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
            assert_eq!(bits(&fl), bits(&ol), "bf16 cache {bf16}, {rows} rows: fused latent = the ops' latent");
            let (fc, oc) = (fkv.buf.to_host().unwrap(), okv.buf.to_host().unwrap());
            assert_eq!(bits(&fc), bits(&oc), "bf16 cache {bf16}, {rows} rows: fused cache = the ops' cache");
            if !bf16 {
                for (i, &s) in slots.iter().enumerate() {
                    let at = (slots_total + s as usize) * entry;
                    assert_eq!(bits(&fc[at..at + entry]), bits(&fl[i * entry..(i + 1) * entry]), "row {i} at slot {s}");
                }
            }
            let mut cx = c.upload(rows, entry, &x).unwrap();
            c.rms_norm_cols(&mut cx, 0, &c.upload(1, lora, &w).unwrap(), eps).unwrap();
            c.rope(&mut cx, &pos, 1, entry, lora, &rope).unwrap();
            check(&format!("mla_kv_entry bf16 cache {bf16} {rows} rows"), &fl, &c.download(&cx).unwrap(), F32_TOL);
        }
    }
}

#[test]
#[ignore = "needs a GPU: ENGINE_TEST_BACKEND=cuda (or rocm) ... -- --ignored"]
fn mla_attention_paged_causal_real_and_odd_dims() {
    common::on_gpu!(mla_attention_paged_causal_real_and_odd_dims_on)
}

fn mla_attention_paged_causal_real_and_odd_dims_on<V: GpuVendor>() {
    let g = gpu::<V>();
    let c = CpuBackend::new();
    let mut rng = Rng::new(3);
    for (d, kvt) in [
        (MlaDims { num_heads: 16, qk_nope: 128, qk_rope: 64, v_head: 128, kv_lora_rank: 512, scale: 0.13 }, WType::Fp8),
        (MlaDims { num_heads: 16, qk_nope: 128, qk_rope: 64, v_head: 128, kv_lora_rank: 512, scale: 0.13 }, WType::Bf16),
        (MlaDims { num_heads: 3, qk_nope: 20, qk_rope: 8, v_head: 24, kv_lora_rank: 40, scale: 0.3 }, WType::F32),
        // FP8 scale blocks across heads (44 rows a head in 128-row blocks): W_UK transposed in f32
        (MlaDims { num_heads: 3, qk_nope: 20, qk_rope: 8, v_head: 24, kv_lora_rank: 40, scale: 0.3 }, WType::Fp8),
    ] {
        // a long decode (4000 cached tokens), a prefill chunk over a prefix, a fresh prefill (all
        // under the flash threshold: the absorbed form; 59 tokens: the projections as per-head
        // GEMMs on the matrix units where the device has them); then the long decode alone
        // (split-K; one token: the CUDA-core projections)
        mla_case(&g, &c, &mut rng, &d, kvt, &[(4000, 1), (300, 37), (21, 21)], F32_TOL, true);
        // a decode batch of three (the projections as per-head GEMVs where the rows allow it)
        mla_case(&g, &c, &mut rng, &d, kvt, &[(300, 1), (200, 1), (50, 1)], F32_TOL, false);
    }
}

/// Prompts of 64+ tokens take the flash kernel (MHA form, tensor cores with hi/lo bf16 operands)
/// while the decode and short sequences of the same batch stay absorbed: real V3 dims and small
/// odd ones, on one backend (the kernels are cached per shape); then the kernel's portable product.
#[test]
#[ignore = "needs a GPU: ENGINE_TEST_BACKEND=cuda (or rocm) ... -- --ignored"]
fn mla_flash_prefill_mixed_batches() {
    common::on_gpu!(mla_flash_prefill_mixed_batches_on)
}

fn mla_flash_prefill_mixed_batches_on<V: GpuVendor>() {
    let g = gpu::<V>();
    let c = CpuBackend::new();
    let mut rng = Rng::new(31);
    for (d, kvt) in [
        (MlaDims { num_heads: 16, qk_nope: 128, qk_rope: 64, v_head: 128, kv_lora_rank: 512, scale: 0.1 }, WType::Fp8),
        (MlaDims { num_heads: 16, qk_nope: 128, qk_rope: 64, v_head: 128, kv_lora_rank: 512, scale: 0.1 }, WType::Bf16),
        (MlaDims { num_heads: 3, qk_nope: 16, qk_rope: 16, v_head: 24, kv_lora_rank: 40, scale: 0.3 }, WType::F32),
    ] {
        mla_case(&g, &c, &mut rng, &d, kvt, &[(900, 1), (1000, 137), (200, 200), (64, 64), (30, 10)], MMA_TOL, false);
        // prefill only, several 64-query tiles and a partial one
        mla_case(&g, &c, &mut rng, &d, kvt, &[(333, 333)], MMA_TOL, false);
    }
    // the kernel's portable product (the form of targets without a matrix-unit path) over the
    // same staging and tiles; the CDNA MFMA form shares them too but cannot run here
    let mut p = gpu::<V>();
    p.flash_portable = true;
    for d in [MlaDims { num_heads: 16, qk_nope: 128, qk_rope: 64, v_head: 128, kv_lora_rank: 512, scale: 0.1 }, MlaDims { num_heads: 3, qk_nope: 16, qk_rope: 16, v_head: 24, kv_lora_rank: 40, scale: 0.3 }] {
        mla_case(&p, &c, &mut rng, &d, WType::Bf16, &[(500, 1), (400, 137), (64, 64), (333, 333)], MMA_TOL, false);
    }
    // bf16 operands, one product (`--fp8-activations dynamic`): q, k, v and P rounded to bf16
    // (~2e-3 each), on the matrix units (NVIDIA: mla_flash_wg.hip's warpgroup MMA on sm_90a, and
    // mla_flash_bf16.hip's mma.sync with that tuned off, both 128-query blocks; value heads of 24
    // columns: mla_prefill.hip's kernel) and in the portable form; prompts over a prefix that is
    // not a multiple of a tile, several tiles and a partial one
    for (portable, wgmma) in [(false, true), (false, false), (true, true)] {
        let mut b = gpu::<V>();
        (b.attn_bf16, b.flash_portable, b.tuned.flash_wgmma) = (true, portable, wgmma);
        let v3 = MlaDims { num_heads: 16, qk_nope: 128, qk_rope: 64, v_head: 128, kv_lora_rank: 512, scale: 0.1 };
        mla_case(&b, &c, &mut rng, &v3, WType::Bf16, &[(500, 1), (400, 137), (64, 64), (333, 333), (1100, 700)], BF16_TOL, false);
        for d in [MlaDims { num_heads: 3, qk_nope: 16, qk_rope: 16, v_head: 32, kv_lora_rank: 40, scale: 0.3 }, MlaDims { num_heads: 3, qk_nope: 16, qk_rope: 16, v_head: 24, kv_lora_rank: 40, scale: 0.3 }] {
            mla_case(&b, &c, &mut rng, &d, WType::Bf16, &[(300, 1), (700, 259), (129, 129)], BF16_TOL, false);
        }
    }
}

/// Decode attention on the matrix units (`--fp8-activations dynamic`: a bf16 latent cache, bf16
/// queries and probabilities, as FlashMLA): V3's 128 heads (two 64-head groups on NVIDIA), a head count
/// that leaves a partial group, and small odd dims whose entry (48) and latent (40) are padded to
/// the 32-wide fragments; long decodes split across blocks and merged, prefill chunks over a
/// prefix, several sequences in one call; then the kernel's portable product over the same tiles.
#[test]
#[ignore = "needs a GPU: ENGINE_TEST_BACKEND=cuda (or rocm) ... -- --ignored"]
fn mla_decode_matrix_units_bf16() {
    common::on_gpu!(mla_decode_matrix_units_bf16_on)
}

fn mla_decode_matrix_units_bf16_on<V: GpuVendor>() {
    let c = CpuBackend::new();
    let mut rng = Rng::new(47);
    let v3 = MlaDims { num_heads: 128, qk_nope: 128, qk_rope: 64, v_head: 128, kv_lora_rank: 512, scale: 0.1 };
    let partial = MlaDims { num_heads: 80, qk_nope: 32, qk_rope: 32, v_head: 32, kv_lora_rank: 96, scale: 0.2 };
    let odd = MlaDims { num_heads: 3, qk_nope: 20, qk_rope: 8, v_head: 24, kv_lora_rank: 40, scale: 0.3 };
    // 46-float entries: no 16-byte copies, the entries are read straight from the cache
    let unaligned = MlaDims { qk_rope: 6, ..odd };
    // a rank of V3 under TP8 (16 heads) and of a narrower model (8 heads, 128-wide entries)
    let tp8 = MlaDims { num_heads: 16, ..v3 };
    let rank8 = MlaDims { num_heads: 8, ..partial };
    // the matrix units (16-head register kernel for ≤ 16 heads with whole 16-byte entries on NVIDIA,
    // 64-head tiles above; then the register kernel for every head count, V3's 128 in 8 groups), the
    // portable product, and the CUDA-core kernel over the same bf16 cache (what runs where the
    // matrix-unit kernel does not: no matrix units, or too little shared memory)
    for (portable, matrix_units, rows_max_heads) in [(false, true, 16), (false, true, 128), (true, true, 16), (false, false, 16)] {
        let mut g = gpu::<V>();
        (g.attn_bf16, g.flash_portable, g.flash_prefill, g.tuned.mla_decode_rows_max_heads) = (true, portable, false, rows_max_heads);
        g.mma_gemm &= matrix_units;
        for (d, kvt) in [(v3, WType::Fp8), (tp8, WType::Fp8), (partial, WType::Bf16), (rank8, WType::Bf16), (odd, WType::F32), (unaligned, WType::F32)] {
            // the decode of a 5000-token context alone too (split-K, merged)
            mla_case(&g, &c, &mut rng, &d, kvt, &[(5000, 1), (300, 37), (21, 21), (64, 1), (1, 1)], BF16_TOL, true);
        }
    }
}

/// One batched attention call on the GPU against the CPU: sequences of (context, new tokens) over
/// shuffled cache slots of layer 1; with `split_decode`, the first sequence's last token alone too.
#[allow(clippy::too_many_arguments)]
fn mla_case<V: GpuVendor>(g: &GpuBackend<V>, c: &CpuBackend, rng: &mut Rng, d: &MlaDims, kvt: WType, lens: &[(usize, usize)], tol: f64, split_decode: bool) {
    let slots_total: usize = lens.iter().map(|x| x.0).sum::<usize>() + 7;
    let layers = 2;
    let kv_b = host_linear(rng, d.num_heads * (d.qk_nope + d.v_head), d.kv_lora_rank, kvt);
    let (ck, gk) = (c.upload_mla_kv_b(&kv_b, d.qk_nope, d.v_head).unwrap(), g.upload_mla_kv_b(&kv_b, d.qk_nope, d.v_head).unwrap());
    let mut ckv = c.alloc_kv_cache(layers, slots_total, d.kv_entry()).unwrap();
    let mut gkv = g.alloc_kv_cache(layers, slots_total, d.kv_entry()).unwrap();
    let mut perm: Vec<u32> = (0..slots_total as u32).collect();
    for i in (1..perm.len()).rev() {
        perm.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    let mut seq_slots = Vec::new();
    let mut used = 0;
    for &(ctx, _) in lens {
        seq_slots.push(perm[used..used + ctx].to_vec());
        used += ctx;
    }
    let all: Vec<u32> = perm[..used].to_vec();
    let entries = randn(rng, used * d.kv_entry(), 1.0);
    c.kv_write(&mut ckv, 1, &all, &c.upload(used, d.kv_entry(), &entries).unwrap()).unwrap();
    g.kv_write(&mut gkv, 1, &all, &g.upload(used, d.kv_entry(), &entries).unwrap()).unwrap();
    let t: usize = lens.iter().map(|x| x.1).sum();
    let q = randn(rng, t * d.num_heads * d.qk_head(), 1.0);
    let mut seqs = Vec::new();
    let mut qs = 0;
    for (i, (_, ql)) in lens.iter().enumerate() {
        seqs.push(AttnSeq { q_start: qs, q_len: *ql, slots: &seq_slots[i] });
        qs += ql;
    }
    let a = g.download(&g.mla_attention(&g.upload(t, d.num_heads * d.qk_head(), &q).unwrap(), &gkv, 1, &seqs, &gk, d).unwrap()).unwrap();
    let b = c.download(&c.mla_attention(&c.upload(t, d.num_heads * d.qk_head(), &q).unwrap(), &ckv, 1, &seqs, &ck, d).unwrap()).unwrap();
    check(&format!("mla_attention lora={} heads={} {lens:?}", d.kv_lora_rank, d.num_heads), &a, &b, tol);
    if split_decode {
        let one = [AttnSeq { q_start: 0, q_len: 1, slots: &seq_slots[0] }];
        let q1 = &q[..d.num_heads * d.qk_head()];
        let a = g.download(&g.mla_attention(&g.upload(1, d.num_heads * d.qk_head(), q1).unwrap(), &gkv, 1, &one, &gk, d).unwrap()).unwrap();
        let b = c.download(&c.mla_attention(&c.upload(1, d.num_heads * d.qk_head(), q1).unwrap(), &ckv, 1, &one, &ck, d).unwrap()).unwrap();
        check(&format!("mla_attention split-K decode ctx {} lora={} heads={}", lens[0].0, d.kv_lora_rank, d.num_heads), &a, &b, tol);
    }
}

#[test]
#[ignore = "needs a GPU: ENGINE_TEST_BACKEND=cuda (or rocm) ... -- --ignored"]
fn moe_routing_and_experts() {
    common::on_gpu!(moe_routing_and_experts_on)
}

fn moe_routing_and_experts_on<V: GpuVendor>() {
    // one block per (token, expert) pair (5 tokens); the grouped GEMV (f32; 11 and 200 tokens:
    // several 16-token tiles per expert, with the tensor cores on or off) and, for FP8 experts of
    // 64-multiple sizes, its tensor-core form (moe_tc.hip, 16-token tiles, x as bf16 hi + lo:
    // near-f32; off in the second 11-token run); the grouped tensor-core 128-token tiles (bf16
    // hi/lo operands; 520 tokens put more than one tile on the experts of the small variants).
    // Hidden 250 / inter 100 take the per-pair kernels at every size.
    for (mma, tc, t, tol) in [(false, false, 5, F32_TOL), (true, true, 11, F32_TOL), (false, false, 11, F32_TOL), (true, true, 200, F32_TOL), (true, true, 520, MMA_TOL)] {
        let mut g = gpu::<V>();
        g.mma_gemm = mma;
        g.moe_tc = g.moe_tc && tc;
        moe_on(&g, t, tol);
    }
    // the per-pair kernels on V3's expert shapes (hidden 7,168, inter 2,048, FP8 128 × 128
    // blocks): rows of several load rounds, more (pair, row group) items than the grid's warps
    // (and a TP8 rank's: inter 256, so down rows of 16 lanes, two row groups a warp)
    let (g, c) = (gpu::<V>(), CpuBackend::new());
    let mut rng = Rng::new(31);
    for (hidden, inter) in [(7168, 2048), (7168, 256)] {
        let p = RouteParams { n_experts: 8, top_k: 4, n_group: 1, topk_group: 1, method: TopkMethod::Greedy, scoring: ScoringFunc::Softmax, norm_topk_prob: true, routed_scaling_factor: 1.0 };
        let gate = host_linear(&mut rng, p.n_experts, hidden, WType::F32);
        let experts: Vec<[HostLinear; 3]> = (0..p.n_experts).map(|_| [host_linear(&mut rng, inter, hidden, WType::Fp8), host_linear(&mut rng, inter, hidden, WType::Fp8), host_linear(&mut rng, hidden, inter, WType::Fp8)]).collect();
        let (ge, ce) = (g.upload_experts(experts.clone(), 0).unwrap(), c.upload_experts(experts, 0).unwrap());
        for t in [1, 5] {
            let x = randn(&mut rng, t * hidden, 1.0);
            let (cx, gx) = (c.upload(t, hidden, &x).unwrap(), g.upload(t, hidden, &x).unwrap());
            let cr = c.moe_route(&cx, &c.upload_linear(&gate).unwrap(), None, &p).unwrap();
            let gr = g.moe_route(&gx, &g.upload_linear(&gate).unwrap(), None, &p).unwrap();
            let a = g.download(&g.moe_experts(&gx, &gr, &ge).unwrap()).unwrap();
            let b = c.download(&c.moe_experts(&cx, &cr, &ce).unwrap()).unwrap();
            check(&format!("moe_experts V3 shapes {hidden}x{inter} {t} tokens"), &a, &b, F32_TOL);
        }
    }
}

fn moe_on<V: GpuVendor>(g: &GpuBackend<V>, t: usize, tol: f64) {
    let c = CpuBackend::new();
    let mut rng = Rng::new(4 + t as u64);
    let variants = [
        RouteParams { n_experts: 256, top_k: 8, n_group: 8, topk_group: 4, method: TopkMethod::NoauxTc, scoring: ScoringFunc::Sigmoid, norm_topk_prob: true, routed_scaling_factor: 2.5 },
        RouteParams { n_experts: 64, top_k: 6, n_group: 1, topk_group: 1, method: TopkMethod::Greedy, scoring: ScoringFunc::Softmax, norm_topk_prob: false, routed_scaling_factor: 1.0 },
        RouteParams { n_experts: 160, top_k: 6, n_group: 8, topk_group: 3, method: TopkMethod::GroupLimitedGreedy, scoring: ScoringFunc::Softmax, norm_topk_prob: false, routed_scaling_factor: 16.0 },
        RouteParams { n_experts: 12, top_k: 3, n_group: 4, topk_group: 2, method: TopkMethod::NoauxTc, scoring: ScoringFunc::Sigmoid, norm_topk_prob: false, routed_scaling_factor: 1.5 },
    ];
    // (256, 96): 8-wide vector loads; (256, 128): also the tensor-core grouped GEMV (FP8);
    // (250, 100): the scalar fallback
    for (p, (hidden, inter)) in variants.iter().cloned().flat_map(|p| [(p.clone(), (256, 96)), (p.clone(), (256, 128)), (p, (250, 100))]) {
        let gate = host_linear(&mut rng, p.n_experts, hidden, WType::F32);
        let bias = (p.method == TopkMethod::NoauxTc).then(|| randn(&mut rng, p.n_experts, 0.1));
        let x = randn(&mut rng, t * hidden, 1.0);
        let (cx, gx) = (c.upload(t, hidden, &x).unwrap(), g.upload(t, hidden, &x).unwrap());
        let cr = c.moe_route(&cx, &c.upload_linear(&gate).unwrap(), bias.as_deref(), &p).unwrap();
        let gr = g.moe_route(&gx, &g.upload_linear(&gate).unwrap(), bias.as_deref(), &p).unwrap();
        let gids: Vec<i32> = gr.ids.to_host().unwrap();
        let gw: Vec<f32> = gr.weights.to_host().unwrap();
        assert_eq!(gids.iter().map(|&i| i as u32).collect::<Vec<_>>(), cr.ids, "{:?}: routed experts", p.method);
        check(&format!("moe_route {:?} weights", p.method), &gw[..t * p.top_k], &cr.weights, F32_TOL);
        for wt in [WType::Bf16, WType::Fp8, WType::F32] {
            let experts: Vec<[HostLinear; 3]> = (0..p.n_experts)
                .map(|_| {
                    let k = match wt { WType::Bf16 => 1, WType::Fp8 => 2, WType::F32 => 0 };
                    let mk = |o, i, rng: &mut Rng| host_linear(rng, o, i, match k { 1 => WType::Bf16, 2 => WType::Fp8, _ => WType::F32 });
                    [mk(inter, hidden, &mut rng), mk(inter, hidden, &mut rng), mk(hidden, inter, &mut rng)]
                })
                .collect();
            let a = g.download(&g.moe_experts(&gx, &gr, &g.upload_experts(experts.clone(), 0).unwrap()).unwrap()).unwrap();
            let b = c.download(&c.moe_experts(&cx, &cr, &c.upload_experts(experts.clone(), 0).unwrap()).unwrap()).unwrap();
            check(&format!("moe_experts {:?} {hidden}x{inter} {t} tokens", p.method), &a, &b, tol);
            // expert parallelism: this rank holds the second quarter of the experts only
            let q = p.n_experts / 4;
            let part: Vec<[HostLinear; 3]> = experts[q..2 * q].to_vec();
            let a = g.download(&g.moe_experts(&gx, &gr, &g.upload_experts(part.clone(), q).unwrap()).unwrap()).unwrap();
            let b = c.download(&c.moe_experts(&cx, &cr, &c.upload_experts(part, q).unwrap()).unwrap()).unwrap();
            assert!(b.iter().any(|&v| v != 0.0), "some token routes to experts {q}..{}", 2 * q);
            check(&format!("moe_experts EP range {q}..{} {:?} {hidden}x{inter} {t} tokens", 2 * q, p.method), &a, &b, tol);
        }
    }
}

/// Routing alone, against the CPU's rules exactly (ids) on 48 tokens: router rows repeated in
/// runs (tied logits, so that ties inside and across groups are broken by the lower id), V3's
/// noaux_tc with tied bias, greedy over 256 and over 72 experts (runs of a warp, a short last
/// run), group-limited greedy, and groups of one expert.
#[test]
#[ignore = "needs a GPU: ENGINE_TEST_BACKEND=cuda (or rocm) ... -- --ignored"]
fn moe_route_ties_and_groups() {
    common::on_gpu!(moe_route_ties_and_groups_on)
}

fn moe_route_ties_and_groups_on<V: GpuVendor>() {
    let (g, c) = (gpu::<V>(), CpuBackend::new());
    let mut rng = Rng::new(19);
    let (t, hidden) = (48, 64);
    let rp = |n_experts, top_k, n_group, topk_group, method, scoring| RouteParams { n_experts, top_k, n_group, topk_group, method, scoring, norm_topk_prob: true, routed_scaling_factor: 2.5 };
    for p in [
        rp(256, 8, 8, 4, TopkMethod::NoauxTc, ScoringFunc::Sigmoid),
        rp(256, 8, 1, 1, TopkMethod::Greedy, ScoringFunc::Softmax),
        rp(72, 6, 1, 1, TopkMethod::Greedy, ScoringFunc::Sigmoid),
        rp(160, 6, 8, 3, TopkMethod::GroupLimitedGreedy, ScoringFunc::Softmax),
        // (as many kept groups' experts as picks: with fewer, the reference's later picks are
        // masked experts, which no routing kernel picks)
        rp(8, 4, 8, 4, TopkMethod::NoauxTc, ScoringFunc::Sigmoid),
    ] {
        // each distinct router row repeated 1-4 times at random places: equal logits
        let distinct: Vec<Vec<f32>> = (0..p.n_experts / 2).map(|_| randn(&mut rng, hidden, 0.3)).collect();
        let rows: Vec<f32> = (0..p.n_experts).flat_map(|_| distinct[(rng.next_u64() % distinct.len() as u64) as usize].clone()).collect();
        let gate = HostLinear::from_f32("gate", p.n_experts, hidden, &rows);
        let bias = (p.method == TopkMethod::NoauxTc).then(|| (0..p.n_experts).map(|_| [0.0, 0.05, -0.05][(rng.next_u64() % 3) as usize]).collect::<Vec<f32>>());
        let x = randn(&mut rng, t * hidden, 1.0);
        let cr = c.moe_route(&c.upload(t, hidden, &x).unwrap(), &c.upload_linear(&gate).unwrap(), bias.as_deref(), &p).unwrap();
        let gr = g.moe_route(&g.upload(t, hidden, &x).unwrap(), &g.upload_linear(&gate).unwrap(), bias.as_deref(), &p).unwrap();
        let gids: Vec<u32> = gr.ids.to_host().unwrap().iter().map(|&i: &i32| i as u32).collect();
        assert_eq!(gids, cr.ids, "{} experts, {:?}: routed experts", p.n_experts, p.method);
        let gw: Vec<f32> = gr.weights.to_host().unwrap();
        check(&format!("moe_route {} experts {:?} weights", p.n_experts, p.method), &gw[..t * p.top_k], &cr.weights, F32_TOL);
    }
}

/// A MoE layer's shared experts added into the routed sum (`mlp_add`): at one row the per-pair
/// kernels on the MLP's own FP8 weights (moe_pairs.rs), at three rows the linear layers, SiLU·up
/// and the add; V3's shared-expert shape (hidden 7,168, inter 2,048) and a bf16 MLP, into a
/// random y, against the f32 CPU ops.
#[test]
#[ignore = "needs a GPU: ENGINE_TEST_BACKEND=cuda (or rocm) ... -- --ignored"]
fn shared_experts_mlp_add() {
    common::on_gpu!(shared_experts_mlp_add_on)
}

fn shared_experts_mlp_add_on<V: GpuVendor>() {
    let (g, c) = (gpu::<V>(), CpuBackend::new());
    let mut rng = Rng::new(77);
    for (hidden, inter, wt) in [(7168, 2048, WType::Fp8), (7168, 256, WType::Fp8), (512, 256, WType::Bf16)] {
        let w = [host_linear(&mut rng, inter, hidden, wt), host_linear(&mut rng, inter, hidden, wt), host_linear(&mut rng, hidden, inter, wt)];
        let gw: Vec<_> = w.iter().map(|l| g.upload_linear(l).unwrap()).collect();
        let cw: Vec<_> = w.iter().map(|l| c.upload_linear(l).unwrap()).collect();
        for rows in [1, 3] {
            let (x, y0) = (randn(&mut rng, rows * hidden, 1.0), randn(&mut rng, rows * hidden, 1.0));
            let mut gy = g.upload(rows, hidden, &y0).unwrap();
            g.mlp_add(&g.upload(rows, hidden, &x).unwrap(), &gw[0], &gw[1], &gw[2], &mut gy).unwrap();
            let mut cy = c.upload(rows, hidden, &y0).unwrap();
            c.mlp_add(&c.upload(rows, hidden, &x).unwrap(), &cw[0], &cw[1], &cw[2], &mut cy).unwrap();
            check(&format!("mlp_add {hidden}x{inter} {rows} rows"), &g.download(&gy).unwrap(), &c.download(&cy).unwrap(), F32_TOL);
        }
    }
}

/// Routed and shared experts together (`moe_experts_shared`): at one row the shared MLP is one more
/// pair of the routed per-pair launches (NVIDIA); V3's shapes (7,168 × 2,048) and a TP8 rank's
/// (7,168 × 256), FP8, 1 and 3 tokens, top-8 of 16 experts, against the f32 CPU ops; and a
/// quarter of the experts on this rank (expert parallelism: the shared pair is always computed).
#[test]
#[ignore = "needs a GPU: ENGINE_TEST_BACKEND=cuda (or rocm) ... -- --ignored"]
fn moe_experts_with_shared_folded() {
    common::on_gpu!(moe_experts_with_shared_folded_on)
}

fn moe_experts_with_shared_folded_on<V: GpuVendor>() {
    let (g, c) = (gpu::<V>(), CpuBackend::new());
    let mut rng = Rng::new(79);
    let p = RouteParams { n_experts: 16, top_k: 8, n_group: 1, topk_group: 1, method: TopkMethod::Greedy, scoring: ScoringFunc::Softmax, norm_topk_prob: true, routed_scaling_factor: 1.0 };
    for (hidden, inter) in [(7168, 2048), (7168, 256)] {
        let gate = host_linear(&mut rng, p.n_experts, hidden, WType::F32);
        let experts: Vec<[HostLinear; 3]> = (0..p.n_experts).map(|_| [host_linear(&mut rng, inter, hidden, WType::Fp8), host_linear(&mut rng, inter, hidden, WType::Fp8), host_linear(&mut rng, hidden, inter, WType::Fp8)]).collect();
        let sw = [host_linear(&mut rng, inter, hidden, WType::Fp8), host_linear(&mut rng, inter, hidden, WType::Fp8), host_linear(&mut rng, hidden, inter, WType::Fp8)];
        let gs: Vec<_> = sw.iter().map(|l| g.upload_linear(l).unwrap()).collect();
        let cs: Vec<_> = sw.iter().map(|l| c.upload_linear(l).unwrap()).collect();
        for first in [0, p.n_experts / 4] {
            let part = if first == 0 { experts.clone() } else { experts[first..2 * first].to_vec() };
            let (ge, ce) = (g.upload_experts(part.clone(), first).unwrap(), c.upload_experts(part, first).unwrap());
            for t in [1, 3] {
                let x = randn(&mut rng, t * hidden, 1.0);
                let (cx, gx) = (c.upload(t, hidden, &x).unwrap(), g.upload(t, hidden, &x).unwrap());
                let cr = c.moe_route(&cx, &c.upload_linear(&gate).unwrap(), None, &p).unwrap();
                let gr = g.moe_route(&gx, &g.upload_linear(&gate).unwrap(), None, &p).unwrap();
                let a = g.download(&g.moe_experts_shared(&gx, &gr, &ge, Some([&gs[0], &gs[1], &gs[2]])).unwrap()).unwrap();
                let b = c.download(&c.moe_experts_shared(&cx, &cr, &ce, Some([&cs[0], &cs[1], &cs[2]])).unwrap()).unwrap();
                check(&format!("moe_experts_shared {hidden}x{inter} experts from {first}, {t} tokens"), &a, &b, F32_TOL);
            }
        }
    }
}

/// `--fp8-activations dynamic` MoE at prefill sizes (engine/backend/gpu/moe_prefill.rs): per-expert
/// row segments through the grouped FP8 GEMM (moe_f8_gemm.hip, sm_90a) and through the library's
/// block-scaled FP8 GEMM, against an f32 reference on the CPU fed with the same quantisations
/// (tokens per 128 channels, then SiLU·up per pair row); all experts on this rank, then a quarter
/// of them (expert parallelism).
#[test]
#[ignore = "needs a GPU: ENGINE_TEST_BACKEND=cuda (or rocm) ... -- --ignored"]
fn moe_experts_fp8_dynamic_activations() {
    common::on_gpu!(moe_experts_fp8_dynamic_activations_on)
}

fn moe_experts_fp8_dynamic_activations_on<V: GpuVendor>() {
    let mut g = gpu::<V>();
    g.fp8_act = true;
    let c = CpuBackend::new();
    let mut rng = Rng::new(51);
    // then a TP8 rank's expert width (inter 256: two column blocks of gate and up, two K blocks of
    // down), which only the grouped GEMM takes at prefill sizes
    for (inter, cases) in [(512, &[(600, true), (2000, true), (600, false), (200, true), (20, true)][..]), (256, &[(700, true)][..])] {
        moe_fp8_dynamic_case(&mut g, &c, &mut rng, inter, cases);
    }
}

fn moe_fp8_dynamic_case<V: GpuVendor>(g: &mut GpuBackend<V>, c: &CpuBackend, rng: &mut Rng, inter: usize, cases: &[(usize, bool)]) {
    use engine::weights::act_quant::ActFp8;
    let (hidden, n_exp) = (512, 64);
    let p = RouteParams { n_experts: n_exp, top_k: 6, n_group: 1, topk_group: 1, method: TopkMethod::Greedy, scoring: ScoringFunc::Softmax, norm_topk_prob: false, routed_scaling_factor: 1.0 };
    let gate = host_linear(rng, n_exp, hidden, WType::F32);
    let experts: Vec<[HostLinear; 3]> = (0..n_exp).map(|_| [host_linear(rng, inter, hidden, WType::Fp8), host_linear(rng, inter, hidden, WType::Fp8), host_linear(rng, hidden, inter, WType::Fp8)]).collect();
    // 600 and 2,000 tokens (segments of ~56 and ~190 rows: one partial 128-row tile, a whole and a
    // partial one): the grouped FP8 GEMM (sm_90a; elsewhere these run the library too), then
    // cuBLASLt's block-scaled GEMM per expert segment;
    // 200 and 20 (sm_89+): the FP8 × FP8 grouped kernels of moe_f8.hip, with tiles of 9-16 tokens
    // (two n-fragments) and of ≤ 8
    for &(t, grouped) in cases {
        g.tuned.moe_f8_gemm = grouped;
        let x = randn(rng, t * hidden, 1.0);
        let gx = g.upload(t, hidden, &x).unwrap();
        let gr = g.moe_route(&gx, &g.upload_linear(&gate).unwrap(), None, &p).unwrap();
        let (ids, w): (Vec<i32>, Vec<f32>) = (gr.ids.to_host().unwrap(), gr.weights.to_host().unwrap());
        let xq = ActFp8::quantize(&x, t, hidden).dequantize();
        for (first, n) in [(0, n_exp), (n_exp / 4, n_exp / 4)] {
            // the reference: each local expert over its pairs' rows, in pair order
            let mut per_pair = vec![Vec::<f32>::new(); t * p.top_k];
            for (e, ex) in experts.iter().enumerate().skip(first).take(n) {
                let pairs: Vec<usize> = (0..t * p.top_k).filter(|&q| ids[q] as usize == e).collect();
                if pairs.is_empty() {
                    continue;
                }
                let xe: Vec<f32> = pairs.iter().flat_map(|&q| xq[(q / p.top_k) * hidden..(q / p.top_k + 1) * hidden].to_vec()).collect();
                let ce = |i: usize| c.upload_linear(&ex[i]).unwrap();
                let xt = c.upload(pairs.len(), hidden, &xe).unwrap();
                let h = c.download(&c.silu_mul(&c.linear(&xt, &ce(0)).unwrap(), &c.linear(&xt, &ce(1)).unwrap()).unwrap()).unwrap();
                let hq = ActFp8::quantize(&h, pairs.len(), inter).dequantize();
                let d = c.download(&c.linear(&c.upload(pairs.len(), inter, &hq).unwrap(), &ce(2)).unwrap()).unwrap();
                for (i, &q) in pairs.iter().enumerate() {
                    per_pair[q] = d[i * hidden..(i + 1) * hidden].to_vec();
                }
            }
            let mut want = vec![0f32; t * hidden];
            for q in 0..t * p.top_k {
                for (o, v) in want[(q / p.top_k) * hidden..(q / p.top_k + 1) * hidden].iter_mut().zip(&per_pair[q]) {
                    *o += w[q] * v;
                }
            }
            assert!(want.iter().any(|&v| v != 0.0), "some token routes to experts {first}..{}", first + n);
            let got = g.download(&g.moe_experts(&gx, &gr, &g.upload_experts(experts[first..first + n].to_vec(), first).unwrap()).unwrap()).unwrap();
            // SiLU·up is requantised from the GPU's own gate/up products, ~1e-4 from the reference's,
            // so a few of its codes round the other way (one e4m3 step, 6-12%): ~3e-3 in all. A wrong
            // row, segment or scale would be O(1) (the distance to f32 activations is printed).
            check(&format!("moe_experts fp8 activations, experts {first}..{} of {n_exp}, {t} tokens, grouped GEMM {grouped}", first + n), &got, &want, 6e-3);
            g.fp8_act = false;
            let f32_acts = g.download(&g.moe_experts(&gx, &gr, &g.upload_experts(experts[first..first + n].to_vec(), first).unwrap()).unwrap()).unwrap();
            eprintln!("  (f32 activations against this reference: rel err {:.2e})", rel_err(&f32_acts, &want));
            g.fp8_act = true;
        }
    }
}

/// The golden checkpoints through the whole model on the GPU: teacher-forced logprobs against
/// transformers, prefill and decode.
#[test]
#[ignore = "needs a GPU: ENGINE_TEST_BACKEND=cuda (or rocm) ... -- --ignored"]
fn golden_end_to_end_on_gpu() {
    common::on_gpu!(golden_end_to_end_on_gpu_on)
}

fn golden_end_to_end_on_gpu_on<V: GpuVendor>() {
    let _ = gpu::<V>();
    for name in ["tiny_v3", "tiny_v2_lite", "tiny_v3_fp8"] {
        let dir = common::golden_dir(name);
        let model = Arc::new(Model::load(GpuBackend::<V>::new(0).unwrap(), &dir).unwrap());
        let exp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
        let st = engine::weights::SafetensorsFile::open(&dir.join("expected.safetensors")).unwrap();
        let vocab = model.cfg.vocab_size;
        for (i, case) in exp["cases"].as_array().unwrap().iter().enumerate() {
            let ids = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<_>>();
            let prompt = ids(&case["prompt"]);
            let seq: Vec<u32> = prompt.iter().chain(ids(&case["continuation"]).iter()).copied().collect();
            let want: Vec<f32> = st.bytes(&st.tensors[&format!("p{i}.logprobs")]).chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            // prompt in one prefill, then token-by-token decode
            let slots: Vec<u32> = (0..seq.len() as u32).collect();
            let mut kv = model.alloc_kv_cache(seq.len()).unwrap();
            let mut worst = 0f32;
            let mut start = 0;
            while start < seq.len() {
                let n = if start == 0 { prompt.len() } else { 1 };
                let pos: Vec<u32> = (start as u32..(start + n) as u32).collect();
                let seqs = [AttnSeq { q_start: 0, q_len: n, slots: &slots[..start + n] }];
                let rows: Vec<u32> = (0..n as u32).collect();
                let l = model.forward(&mut kv, &ForwardBatch { tokens: &seq[start..start + n], positions: &pos, seqs: &seqs, logit_rows: &rows }).unwrap();
                assert_eq!(l.rows(), n);
                let v = model.backend.download(&l).unwrap();
                for (r, row) in v.chunks(vocab).enumerate() {
                    let lp = log_softmax(row);
                    let p = start + r;
                    for (a, b) in lp.iter().zip(&want[p * vocab..(p + 1) * vocab]) {
                        assert!(a.is_finite());
                        worst = worst.max((a - b).abs());
                    }
                }
                start += n;
            }
            eprintln!("{name} prompt {} tokens: max |Δ logprob| {worst:.2e}", prompt.len());
            assert!(worst <= 1e-3, "{name}: max |Δ logprob| {worst}");
        }
        // the decode steps above were replayed from CUDA graphs (batch 1; captured anew for each
        // case's KV cache)
        let (captured, replays, failed) = model.backend.graph_stats();
        let cases = exp["cases"].as_array().unwrap().len();
        assert!(failed.is_none() && captured == cases && replays > 0, "graphs: {captured} captured for {cases} cases, {replays} replays, {failed:?}");
    }
}

#[test]
#[ignore = "needs a GPU: ENGINE_TEST_BACKEND=cuda (or rocm) ... -- --ignored"]
fn sampling_on_the_gpu() {
    common::on_gpu!(sampling_on_the_gpu_on)
}

fn sampling_on_the_gpu_on<V: GpuVendor>() {
    use engine::backend::SampleRow;
    use engine::sampling::{apply_penalties, SamplingParams, TokenCounts};
    let g = gpu::<V>();
    let mut rng = Rng::new(5);
    let v = 129280;
    // greedy with penalties equals the CPU's argmax of the penalised logits
    let logits = randn(&mut rng, 4 * v, 3.0);
    let counts = TokenCounts { prompt: [(5u32, 1u32), (77, 2)].into_iter().collect(), output: [(77u32, 3u32), (1000, 1)].into_iter().collect() };
    let p = SamplingParams { temperature: 0.0, repetition_penalty: 1.3, frequency_penalty: 0.5, presence_penalty: 0.2, ..Default::default() };
    let pens: Vec<(u32, u32, bool)> = vec![(5, 0, true), (77, 3, true), (1000, 1, false)];
    let mut t = g.upload(4, v, &logits).unwrap();
    let rows: Vec<SampleRow> = (0..4).map(|_| SampleRow { params: &p, penalties: pens.clone(), uniform: 0.5 }).collect();
    let ids = g.sample(&mut t, &rows).unwrap().unwrap();
    for (r, id) in ids.iter().enumerate() {
        let mut l = logits[r * v..(r + 1) * v].to_vec();
        apply_penalties(&mut l, &p, &counts);
        let want = l.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0 as u32;
        assert_eq!(*id, want, "greedy row {r}");
    }
    // greedy ties go to the lower id, over a vocabulary of 16-byte rows and an odd one (scalar loads)
    for vt in [129280usize, 50001] {
        let mut l = randn(&mut rng, 2 * vt, 1.0);
        for (r, (a, b)) in [(70001usize.min(vt - 7), vt - 5), (3, vt - 1)].into_iter().enumerate() {
            l[r * vt + a] = 9.0;
            l[r * vt + b] = 9.0;
        }
        let mut t = g.upload(2, vt, &l).unwrap();
        let p0 = SamplingParams { temperature: 0.0, ..Default::default() };
        let rows: Vec<SampleRow> = (0..2).map(|_| SampleRow { params: &p0, penalties: vec![], uniform: 0.5 }).collect();
        let ids = g.sample(&mut t, &rows).unwrap().unwrap();
        assert_eq!(ids, [70001.min(vt as u32 - 7), 3], "greedy ties, vocabulary {vt}");
    }
    // inverse CDF over a known distribution (p = 0.1, 0.2, 0.7) on a grid of u
    let probs = [0.1f32, 0.2, 0.7];
    let base: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
    let n = 1000;
    let count = |p: &SamplingParams| {
        let data: Vec<f32> = (0..n).flat_map(|_| base.clone()).collect();
        let mut t = g.upload(n, 3, &data).unwrap();
        let rows: Vec<SampleRow> = (0..n).map(|i| SampleRow { params: p, penalties: vec![], uniform: (i as f32 + 0.5) / n as f32 }).collect();
        let mut c = [0usize; 3];
        for id in g.sample(&mut t, &rows).unwrap().unwrap() {
            c[id as usize] += 1;
        }
        c
    };
    let c = count(&SamplingParams::default());
    assert!((c[0] as i64 - 100).abs() <= 2 && (c[1] as i64 - 200).abs() <= 2 && (c[2] as i64 - 700).abs() <= 2, "{c:?}");
    assert_eq!(count(&SamplingParams { min_p: 0.5, ..Default::default() }), [0, 0, n], "min_p keeps p >= 0.5 p_max");
    assert_eq!(count(&SamplingParams { top_k: 2, ..Default::default() })[0], 0, "top_k 2 drops the least likely");
    let c = count(&SamplingParams { top_p: 0.75, ..Default::default() });
    assert_eq!(c[0], 0, "top_p 0.75 keeps {{0.7, 0.2}}: {c:?}");
    assert!((c[1] as f64 / n as f64 - 0.2 / 0.9).abs() < 0.01, "{c:?}");
    // a real-size vocabulary: the pick is always inside the CPU's allowed set
    let p = SamplingParams { temperature: 0.7, top_k: 50, top_p: 0.9, ..Default::default() };
    let logits = randn(&mut rng, 8 * v, 2.0);
    let mut t = g.upload(8, v, &logits).unwrap();
    let rows: Vec<SampleRow> = (0..8).map(|i| SampleRow { params: &p, penalties: vec![], uniform: (i as f32 + 0.3) / 8.0 }).collect();
    for (r, id) in g.sample(&mut t, &rows).unwrap().unwrap().iter().enumerate() {
        let row = &logits[r * v..(r + 1) * v];
        let mut idx: Vec<usize> = (0..v).collect();
        idx.sort_by(|a, b| row[*b].partial_cmp(&row[*a]).unwrap());
        assert!(idx[..50].contains(&(*id as usize)), "row {r}: {id} not in the top 50");
    }
}
