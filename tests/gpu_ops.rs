//! GPU ops against the CPU reference backend, and the golden checkpoints end to end on the GPU.
//! These need a GPU: they are `#[ignore]`d (reported as ignored, never as passed) and run with
//! `ENGINE_TEST_BACKEND=cuda cargo test --release --test gpu_ops -- --ignored` on an NVIDIA machine
//! (`ENGINE_TEST_BACKEND=rocm` on an AMD one: the same tests on the ROCm backend).
//! Outputs are NaN-poisoned before every launch (ENGINE_GPU_POISON=1) so unwritten elements fail.
mod common;

use common::gpu::*;
use std::sync::Arc;

use engine::backend::cpu::CpuBackend;
use engine::backend::gpu::backend::{GpuBackend, GpuVendor};
use engine::backend::{AttnSeq, Backend, KvEntrySite, MlaDims, RopeSite, TensorShape};
use engine::config::{RopeConfig, RopeTables};
use engine::model::{ForwardBatch, Model};
use engine::sampling::{log_softmax, Rng};

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

/// The FP8 layers that read one input at prefill sizes under `--fp8-activations dynamic`
/// (`linear_pair`: MLA's q_a + kv_a; `mlp` and `mlp_add`: a dense MLP, a MoE layer's shared
/// experts) quantise it once, and SiLU·up is quantised in the pass that computes it: their
/// results equal the ops' in turn bit for bit (the same quantiser on the same values, the same
/// GEMMs; `mlp_add` to 1e-6, its down product added as the GEMM's C), and the CPU's on the
/// quantised inputs. 256 and 260 rows take the shared codes, 258 (not a multiple of 4) the ops.
#[test]
#[ignore = "needs a GPU: ENGINE_TEST_BACKEND=cuda (or rocm) ... -- --ignored"]
fn prefill_fp8_layers_share_one_quantisation() {
    common::on_gpu!(prefill_fp8_layers_share_one_quantisation_on)
}

fn prefill_fp8_layers_share_one_quantisation_on<V: GpuVendor>() {
    use engine::weights::act_quant::ActFp8;
    let mut g = gpu::<V>();
    let c = CpuBackend::new();
    let mut rng = Rng::new(43);
    assert!(g.blaslt.as_ref().is_some_and(|l| l.supports_fp8_block(256, 576, 7168)), "no block-scaled FP8 GEMM in the vendor library (cuBLASLt 12.9+ on Hopper is needed)");
    g.fp8_act = true;
    let quantised = |x: &[f32], m: usize, k: usize| ActFp8::quantize(x, m, k).dequantize();
    // V3's q_a and kv_a
    let (qa, kva) = (host_linear(&mut rng, 1536, 7168, WType::Fp8), host_linear(&mut rng, 576, 7168, WType::Fp8));
    let (gqa, gkva) = (g.upload_linear(&qa).unwrap(), g.upload_linear(&kva).unwrap());
    // an MLP of 2,048 hidden and 1,024 intermediate columns
    let (hid, inter) = (2048, 1024);
    let [gate, up, down] = host_mlp(&mut rng, hid, inter, WType::Fp8);
    let (gg, gu, gd) = (g.upload_linear(&gate).unwrap(), g.upload_linear(&up).unwrap(), g.upload_linear(&down).unwrap());
    // the same uploaded as pairs (one joint GEMM where the shared path runs)
    let ((pqa, pkva), (pg, pu)) = (g.upload_linear_pair(&qa, &kva).unwrap(), g.upload_linear_pair(&gate, &up).unwrap());
    for m in [256, 258, 260] {
        let x = randn(&mut rng, m * 7168, 1.0);
        let gx = g.upload(m, 7168, &x).unwrap();
        assert_eq!(g.shares_fp8_codes(&gx, &gqa) && g.shares_fp8_codes(&gx, &gkva), m % 4 == 0, "{m} rows: the shared path where the rows are a multiple of 4");
        let (a, b) = g.linear_pair(&gx, &gqa, &gkva).unwrap();
        let (a, b) = (g.download(&a).unwrap(), g.download(&b).unwrap());
        assert_eq!(a, g.download(&g.linear(&gx, &gqa).unwrap()).unwrap(), "q_a of the pair, {m} rows, equals the linear op's");
        assert_eq!(b, g.download(&g.linear(&gx, &gkva).unwrap()).unwrap(), "kv_a of the pair, {m} rows, equals the linear op's");
        let xq = quantised(&x, m, 7168);
        check(&format!("q_a of the pair, {m} rows, against the CPU"), &a, &cpu_linear(&c, &qa, m, 7168, &xq), FP8_ACC_TOL);
        check(&format!("kv_a of the pair, {m} rows, against the CPU"), &b, &cpu_linear(&c, &kva, m, 7168, &xq), FP8_ACC_TOL);
        let (ja, jb) = g.linear_pair(&gx, &pqa, &pkva).unwrap();
        check(&format!("q_a of the joint pair, {m} rows, against the pair apart"), &g.download(&ja).unwrap(), &a, FP8_ACC_TOL);
        check(&format!("kv_a of the joint pair, {m} rows, against the pair apart"), &g.download(&jb).unwrap(), &b, FP8_ACC_TOL);

        let x = randn(&mut rng, m * hid, 1.0);
        let gx = g.upload(m, hid, &x).unwrap();
        assert_eq!(g.shares_fp8_codes(&gx, &gg) && g.shares_fp8_codes(&g.upload(m, inter, &vec![0.0; m * inter]).unwrap(), &gd), m % 4 == 0, "{m} rows: the MLP's shared path");
        let y = g.download(&g.mlp(&gx, &gg, &gu, &gd).unwrap()).unwrap();
        let by_ops = g.download(&engine::backend::mlp_by_ops(&g, &gx, [&gg, &gu, &gd]).unwrap()).unwrap();
        assert_eq!(y, by_ops, "mlp, {m} rows, equals the ops in turn");
        let y0 = randn(&mut rng, m * hid, 1.0);
        let mut gy = g.upload(m, hid, &y0).unwrap();
        g.mlp_add(&gx, &gg, &gu, &gd, &mut gy).unwrap();
        let added: Vec<f32> = y0.iter().zip(&by_ops).map(|(a, b)| a + b).collect();
        // (the down product added as the GEMM's C: its epilogue's one f32 addition)
        check(&format!("mlp_add, {m} rows, against y + the ops in turn"), &g.download(&gy).unwrap(), &added, 1e-6);
        // the CPU on the quantised x, then on the quantised SiLU·up
        let xq = quantised(&x, m, hid);
        let h = c.download(&c.silu_mul(&c.upload(m, inter, &cpu_linear(&c, &gate, m, hid, &xq)).unwrap(), &c.upload(m, inter, &cpu_linear(&c, &up, m, hid, &xq)).unwrap()).unwrap()).unwrap();
        let want = cpu_linear(&c, &down, m, inter, &quantised(&h, m, inter));
        check(&format!("mlp, {m} rows, against the CPU"), &y, &want, 1e-2);
        // gate and up uploaded as a pair: one GEMM, SiLU·up quantised from its halves
        let yj = g.download(&g.mlp(&gx, &pg, &pu, &gd).unwrap()).unwrap();
        check(&format!("mlp of the joint gate / up, {m} rows, against the CPU"), &yj, &want, 1e-2);
        let mut gy = g.upload(m, hid, &y0).unwrap();
        g.mlp_add(&gx, &pg, &pu, &gd, &mut gy).unwrap();
        let added: Vec<f32> = y0.iter().zip(&yj).map(|(a, b)| a + b).collect();
        check(&format!("mlp_add of the joint gate / up, {m} rows, against y + its mlp"), &g.download(&gy).unwrap(), &added, 1e-6);
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
    // (1,100 rows into 1,105: four rows a block, a last block of one)
    for (rows, cols, padded) in [(3, 7168, 4), (130, 300, 132), (1, 2048, 1), (1100, 1024, 1105)] {
        let mut x = randn(&mut rng, rows * cols, 2.0);
        x[cols - ACT_GROUP..cols].fill(0.0); // an all-zero group
        let codes = g.quantize_act_fp8(&g.upload(rows, cols, &x).unwrap(), padded).unwrap();
        let (q, s) = (codes.q.to_host().unwrap(), codes.s.to_host().unwrap());
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
        let w = host_linear(&mut rng, n, k, WType::Fp8);
        let x = randn(&mut rng, m * k, 1.0);
        let (got, f32_ref) = linear_both(&g, &c, &w, m, k, &x);
        let xq = ActFp8::quantize(&x, m, k).dequantize();
        let want = cpu_linear(&c, &w, m, k, &xq);
        eprintln!("  (FP8 activations against f32 ones: rel err {:.2e})", rel_err(&got, &f32_ref));
        check(&format!("block-scaled fp8 gemm {m}x{n}x{k}"), &got, &want, FP8_ACC_TOL);
    }
    // 9-64 rows (the threshold raised to 64): the staged kernel (moe_f8s.hip's linear_f8s_fp8w)
    // at V3's q_a, kv_a (576 rows: a last block of 64), q_b, o_proj and shared-expert shapes, one
    // and two tiles of ≤ 16 and 17-32 tokens, split over K and not
    let staged_rows = g.tuned.linear_f8s_max_rows;
    g.tuned.linear_f8s_max_rows = 64;
    for (m, n, k) in [(32, 1536, 7168), (32, 576, 7168), (17, 24576, 1536), (64, 7168, 16384), (9, 2048, 7168), (44, 7168, 2048)] {
        let w = host_linear(&mut rng, n, k, WType::Fp8);
        let x = randn(&mut rng, m * k, 1.0);
        assert!(g.linear_f8s_for(&g.upload(m, k, &x).unwrap(), &g.upload_linear(&w).unwrap()), "{m}x{n}x{k} takes the staged kernel");
        let (got, _) = linear_both(&g, &c, &w, m, k, &x);
        let xq = ActFp8::quantize(&x, m, k).dequantize();
        let want = cpu_linear(&c, &w, m, k, &xq);
        check(&format!("staged fp8 linear {m}x{n}x{k}"), &got, &want, FP8_ACC_TOL);
    }
    g.tuned.linear_f8s_max_rows = staged_rows;
    // bf16 weights (V3's lm_head) through the GEMM library take x rounded to bf16, one product:
    // against the CPU fed the rounded x, and visibly off the f32 input's result
    g.bf16_act = true;
    for (m, n, k) in [(2, 1000, 7168), (256, 4096, 7168), (37, 132, 512)] {
        let w = host_linear(&mut rng, n, k, WType::Bf16);
        let x = randn(&mut rng, m * k, 1.0);
        let (got, f32_ref) = linear_both(&g, &c, &w, m, k, &x);
        let xb: Vec<f32> = x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        let want = cpu_linear(&c, &w, m, k, &xb);
        let off = rel_err(&got, &f32_ref);
        eprintln!("  (bf16 input against f32: rel err {off:.2e})");
        check(&format!("bf16 weights, bf16 input {m}x{n}x{k}"), &got, &want, MMA_TOL);
        assert!(off > 1e-4, "bf16 weights {m}x{n}x{k}: {off:.2e} from the f32 input's result: x was not rounded to bf16");
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
        // 21 heads: more pairs a row than one block's threads (the grid's y blocks); 200 rows: a
        // block a row, each thread's angle made once for its heads
        for rows in [9, 200] {
            let (heads, stride, off) = (21, 192, 128);
            let cols = heads * stride;
            let x = randn(&mut rng, rows * cols, 1.0);
            let pos: Vec<u32> = (0..rows as u32).map(|i| i * 4099 + 3).collect();
            let (mut cx, mut gx) = (c.upload(rows, cols, &x).unwrap(), g.upload(rows, cols, &x).unwrap());
            c.rope(&mut cx, &pos, heads, stride, off.min(stride - dim), &rope).unwrap();
            g.rope(&mut gx, &pos, heads, stride, off.min(stride - dim), &rope).unwrap();
            check(&format!("rope interleaved={interleaved} dim={dim} yarn={yarn}, {rows} rows"), &g.download(&gx).unwrap(), &c.download(&cx).unwrap(), F32_TOL);
        }
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
    for (n1, n2, k, types) in [(1536, 576, 7168, [WType::F32, WType::Bf16, WType::Fp8]), (40, 24, 256, [WType::F32, WType::Bf16, WType::Fp8]), (64, 32, 384, [WType::Bf16, WType::Fp8, WType::F32])] {
        for (ta, tb) in types.iter().zip(types.iter().cycle().skip(if n1 == 64 { 1 } else { 0 })) {
            let (a, b) = (host_linear(&mut rng, n1, k, *ta), host_linear(&mut rng, n2, k, *tb));
            let (ga, gb, ca, cb) = (g.upload_linear(&a).unwrap(), g.upload_linear(&b).unwrap(), c.upload_linear(&a).unwrap(), c.upload_linear(&b).unwrap());
            for m in [1, 3, 8, 12] {
                let x = randn(&mut rng, m * k, 1.0);
                let (y1, y2) = g.linear_pair(&g.upload(m, k, &x).unwrap(), &ga, &gb).unwrap();
                let (r1, r2) = engine::backend::linear_pair_by_ops(&c, &c.upload(m, k, &x).unwrap(), &ca, &cb).unwrap();
                assert_eq!((y1.rows(), y1.cols(), y2.rows(), y2.cols()), (m, n1, m, n2));
                let name = format!("linear_pair {}+{} {m}x({n1}+{n2})x{k}", ta.name(), tb.name());
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
                let pos = positions(&mut rng, m);
                for rope in [None, Some(&tables[0]), Some(&tables[1])] {
                    let site = rope.map(|tables| RopeSite { positions: &pos, heads, head_stride: hs, offset: off, tables });
                    let y = g.norm_linear(&g.upload(m, k, &x).unwrap(), &gn, 1e-6, &gw, site.as_ref()).unwrap();
                    let r = engine::backend::norm_linear_by_ops(&c, &c.upload(m, k, &x).unwrap(), &cn, 1e-6, &cw, site.as_ref()).unwrap();
                    let kind = rope.map_or("no rope", |t| if t.interleaved { "interleaved rope" } else { "rotate-half rope" });
                    check(&format!("norm_linear {} {m}x{n}x{k} {kind}", t.name()), &g.download(&y).unwrap(), &c.download(&r).unwrap(), F32_TOL);
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
            let slots = distinct_slots(&mut rng, rows, slots_total);
            let pos = positions(&mut rng, rows);
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
        // decode batches of 20 and 70 (per-head GEMMs: on NVIDIA sm_80+ with V3's FP8 kv_b
        // mla_heads.hip's 32-row, then 64-row blocks, two of them and a part one)
        for n in [20, 70] {
            let lens: Vec<(usize, usize)> = (0..n).map(|i| (17 + 5 * i, 1)).collect();
            mla_case(&g, &c, &mut rng, &d, kvt, &lens, F32_TOL, false);
        }
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
    // FP8 kv_b under `--fp8-activations dynamic`: on sm_90a the GEMM library's block-scaled GEMM
    // writes kv_b's product as bf16 and the warpgroup kernel reads it in place (elsewhere the f32
    // product rounded to bf16); the latents are drawn exact in FP8 (mla_case), so the CPU's f32
    // kv_b is the reference
    let mut b = gpu::<V>();
    (b.attn_bf16, b.fp8_act) = (true, true);
    let v3 = MlaDims { num_heads: 16, qk_nope: 128, qk_rope: 64, v_head: 128, kv_lora_rank: 512, scale: 0.1 };
    if b.arch == "sm_90a" {
        assert!(b.blaslt.as_ref().is_some_and(|l| l.supports_fp8_block_bf16(1536, 16 * 256, 512)), "no block-scaled FP8 GEMM into bf16 in the vendor library (cuBLASLt 12.9+ on Hopper)");
    }
    mla_case(&b, &c, &mut rng, &v3, WType::Fp8, &[(500, 1), (400, 137), (64, 64), (333, 333), (1100, 700)], BF16_TOL, false);
}

/// `rows` cache entries of `d` whose latents quantise exactly under `--fp8-activations dynamic`:
/// each 128-column group e4m3 codes times a power of two, one of them ±448 (so the group's scale
/// is that power of two and its codes are the drawn ones); the rotated part normal.
fn fp8_exact_entries(rng: &mut Rng, rows: usize, d: &MlaDims) -> Vec<f32> {
    let mut e = randn(rng, rows * d.kv_entry(), 1.0);
    for r in 0..rows {
        for g0 in (0..d.kv_lora_rank).step_by(128) {
            let scale = (2f32).powi((rng.next_u64() % 8) as i32 - 10);
            let span = g0..(g0 + 128).min(d.kv_lora_rank);
            let top = span.start + (rng.next_u64() as usize) % span.len();
            for i in span {
                // finite e4m3fn codes (0x7f and 0xff are NaN; 0x7e is 448)
                let mut code = rng.next_u64() as u8;
                if i == top {
                    code = 0x7e | (code & 0x80);
                } else if code & 0x7f == 0x7f {
                    code ^= 1;
                }
                e[r * d.kv_entry() + i] = engine::weights::fp8_e4m3fn_to_f32(code) * scale;
            }
        }
    }
    e
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
            if d.num_heads == 128 {
                // 71 tokens × 2 head groups: a block an SM, where sm_90a takes mla_decode_wg.hip
                mla_case(&g, &c, &mut rng, &d, kvt, &[(700, 70), (90, 1)], BF16_TOL, false);
            }
        }
    }
}

/// `mla_attention_linear` where the warpgroup decode kernel runs with FP8 activations: the value
/// projection writes o_proj's FP8 codes itself (mla_heads.hip's `_bxq`), which must equal the
/// ops in turn bit for bit (`mla_attention`, then `linear`: the f32 projection, the activation
/// quantiser, the same GEMM); 72 decode tokens of V3's 128 heads over random contexts, and 71
/// (not a multiple of 4: the ops). Then prompts, where the warpgroup flash kernel writes the
/// codes, against the ops the same way.
#[test]
#[ignore = "needs a GPU: ENGINE_TEST_BACKEND=cuda (or rocm) ... -- --ignored"]
fn mla_attention_hands_o_proj_codes() {
    common::on_gpu!(mla_attention_hands_o_proj_codes_on)
}

fn mla_attention_hands_o_proj_codes_on<V: GpuVendor>() {
    let mut g = gpu::<V>();
    (g.attn_bf16, g.fp8_act) = (true, true);
    let mut rng = Rng::new(61);
    let d = MlaDims { num_heads: 128, qk_nope: 128, qk_rope: 64, v_head: 128, kv_lora_rank: 512, scale: 0.1 };
    let (slots_total, hidden) = (3000, 1024);
    let kv_b = g.upload_mla_kv_b(&host_linear(&mut rng, 128 * 256, 512, WType::Fp8), d.qk_nope, d.v_head).unwrap();
    let o = g.upload_linear(&host_linear(&mut rng, hidden, 128 * 128, WType::Fp8)).unwrap();
    let mut kv = g.alloc_kv_cache(2, slots_total, d.kv_entry()).unwrap();
    let all: Vec<u32> = (0..slots_total as u32).collect();
    g.kv_write(&mut kv, 1, &all, &g.upload(slots_total, d.kv_entry(), &randn(&mut rng, slots_total * d.kv_entry(), 1.0)).unwrap()).unwrap();
    // mla_attention_linear against the ops in turn for `seqs` (their rows q_start.. in order)
    let fused_equals_ops = |rng: &mut Rng, seqs: &[AttnSeq], what: &str| {
        let t: usize = seqs.iter().map(|s| s.q_len).sum();
        let q = g.upload(t, 128 * d.qk_head(), &randn(rng, t * 128 * d.qk_head(), 1.0)).unwrap();
        let fused = g.download(&g.mla_attention_linear(&q, &kv, 1, seqs, &kv_b, &d, &o).unwrap()).unwrap();
        let ops = g.download(&g.linear(&g.mla_attention(&q, &kv, 1, seqs, &kv_b, &d).unwrap(), &o).unwrap()).unwrap();
        assert!(fused.iter().all(|v| v.is_finite()) && fused.iter().any(|v| *v != 0.0), "{what}: finite, not all zero");
        assert_eq!(fused, ops, "{what}: o_proj of the attention's codes equals the ops in turn");
        eprintln!("mla_attention_linear, {what}: equal to mla_attention + linear");
    };
    for t in [72, 71] {
        let lens: Vec<usize> = (0..t).map(|i| 1 + (i * 37) % 700).collect();
        let starts: Vec<usize> = (0..t).map(|i| (i * 29) % (slots_total - 700)).collect();
        let seqs: Vec<AttnSeq> = (0..t).map(|i| AttnSeq { q_start: i, q_len: 1, slots: &all[starts[i]..starts[i] + lens[i]] }).collect();
        fused_equals_ops(&mut rng, &seqs, &format!("{t} decode tokens"));
    }
    // prompts: alone on the flash kernel (sm_90a: its warpgroup form writes o's codes; a prompt
    // over a prefix and a fresh one, 1,032 rows), a row count not a multiple of 4, and a prompt
    // batched with a decode token (the ops)
    let prompts: [&[(usize, usize, usize)]; 3] = [&[(0, 700, 400), (1200, 332, 0)], &[(0, 333, 0)], &[(0, 300, 100), (1500, 1, 899)]];
    for p in prompts {
        let mut q0 = 0;
        let seqs: Vec<AttnSeq> = p
            .iter()
            .map(|&(start, new, prefix)| {
                q0 += new;
                AttnSeq { q_start: q0 - new, q_len: new, slots: &all[start..start + prefix + new] }
            })
            .collect();
        fused_equals_ops(&mut rng, &seqs, &format!("prompts {p:?}"));
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
    // latents the dynamic FP8 quantisation leaves as they are where the GPU quantises kv_b's input
    let entries = if g.fp8_act { fp8_exact_entries(rng, used, d) } else { randn(rng, used * d.kv_entry(), 1.0) };
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

/// `norm_linear_kv_entry` (q_b's fused GEMV with the new cache entries in its tail blocks) against
/// the two ops on the GPU — bit for bit, the query, the latent and the whole cache — at one row of
/// FP8 (V3's q_b: `gemv1`) and 3 rows of bf16 (`gemv8`), f32 and bf16 caches, YaRN RoPE on both,
/// random slots and positions; and the query against the f32 CPU ops.
#[test]
#[ignore = "needs a GPU: ENGINE_TEST_BACKEND=cuda (or rocm) ... -- --ignored"]
fn norm_linear_with_cache_entries() {
    common::on_gpu!(norm_linear_with_cache_entries_on)
}

fn norm_linear_with_cache_entries_on<V: GpuVendor>() {
    use engine::backend::KvEntryOp;
    let c = CpuBackend::new();
    let mut rng = Rng::new(97);
    let cfg = serde_json::json!({"rope_theta": 10000.0, "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}});
    let f = engine::config::Fields::new("t", &cfg).unwrap();
    let tables = RopeTables::new(&RopeConfig::parse(&f, 64, 163840, true).unwrap());
    let (lora, entry, slots_total, eps, heads, k) = (512, 576, 300, 1e-6f32, 16, 1536);
    for (rows, wt) in [(1, WType::Fp8), (3, WType::Bf16)] {
        let w = host_linear(&mut rng, heads * 192, k, wt);
        for bf16 in [false, true] {
            let mut g = gpu::<V>();
            g.attn_bf16 = bf16;
            let gw = g.upload_linear(&w).unwrap();
            let qn: Vec<f32> = (0..k).map(|_| 1.0 + 0.2 * rng.normal()).collect();
            let kn: Vec<f32> = (0..lora).map(|_| 1.0 + 0.1 * rng.normal()).collect();
            let (gqn, gkn) = (g.upload(1, k, &qn).unwrap(), g.upload(1, lora, &kn).unwrap());
            let x = randn(&mut rng, rows * k, 1.0);
            let lat = randn(&mut rng, rows * entry, 1.0);
            let slots = distinct_slots(&mut rng, rows, slots_total);
            let pos = positions(&mut rng, rows);
            let rope = RopeSite { positions: &pos, heads, head_stride: 192, offset: 128, tables: &tables };
            let site = KvEntrySite { layer: 1, slots: &slots, positions: &pos, rope: &tables, offset: lora };
            let gx = g.upload(rows, k, &x).unwrap();
            let (mut fl, mut ol) = (g.upload(rows, entry, &lat).unwrap(), g.upload(rows, entry, &lat).unwrap());
            let (mut fkv, mut okv) = (g.alloc_kv_cache(2, slots_total, entry).unwrap(), g.alloc_kv_cache(2, slots_total, entry).unwrap());
            let fq = g.norm_linear_kv_entry(&gx, &gqn, eps, &gw, Some(&rope), KvEntryOp { latent: &mut fl, norm: &gkn, eps, kv: &mut fkv, site: &site }).unwrap();
            let oq = engine::backend::norm_linear_kv_entry_by_ops(&g, &gx, &gqn, eps, &gw, Some(&rope), KvEntryOp { latent: &mut ol, norm: &gkn, eps, kv: &mut okv, site: &site }).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
            let tag = format!("{rows} rows, bf16 cache {bf16}");
            assert_eq!(bits(&g.download(&fq).unwrap()), bits(&g.download(&oq).unwrap()), "{tag}: fused query = the ops' query");
            assert_eq!(bits(&g.download(&fl).unwrap()), bits(&g.download(&ol).unwrap()), "{tag}: fused latent = the ops' latent");
            assert_eq!(bits(&fkv.buf.to_host().unwrap()), bits(&okv.buf.to_host().unwrap()), "{tag}: fused cache = the ops' cache");
            let r = engine::backend::norm_linear_by_ops(&c, &c.upload(rows, k, &x).unwrap(), &c.upload(1, k, &qn).unwrap(), eps, &c.upload_linear(&w).unwrap(), Some(&rope)).unwrap();
            check(&format!("norm_linear_kv_entry {tag}"), &g.download(&fq).unwrap(), &c.download(&r).unwrap(), F32_TOL);
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
