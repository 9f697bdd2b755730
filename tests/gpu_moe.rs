//! The MoE ops on the GPU against the CPU reference: routing (exactly: the expert ids), the routed
//! experts on every path (per-pair, grouped, swap-AB, tiles, FP8 activations), expert
//! parallelism, and the shared experts alone and folded into the routed launches. Like gpu_ops.rs,
//! these need a GPU: `#[ignore]`d, run with `ENGINE_TEST_BACKEND=cuda cargo test --release --test
//! gpu_moe -- --ignored`; outputs NaN-poisoned before every launch.
mod common;

use common::gpu::*;
use engine::backend::cpu::CpuBackend;
use engine::backend::gpu::backend::{GpuBackend, GpuVendor};
use engine::backend::{Backend, RouteParams};
use engine::config::{ScoringFunc, TopkMethod};
use engine::sampling::Rng;
use engine::weights::HostLinear;

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
        let experts: Vec<[HostLinear; 3]> = (0..p.n_experts).map(|_| host_mlp(&mut rng, hidden, inter, WType::Fp8)).collect();
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
            let experts: Vec<[HostLinear; 3]> = (0..p.n_experts).map(|_| host_mlp(&mut rng, hidden, inter, wt)).collect();
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
/// run), group-limited greedy, and groups of one expert; then V3's router (256 experts of
/// hidden 7,168, bf16) at 9 and 256 tokens, whose CUDA-core tiles are split over K (router.rs),
/// and at 600 through the GEMM library (x in three bf16 terms: router.rs).
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
    let p = rp(256, 8, 8, 4, TopkMethod::NoauxTc, ScoringFunc::Sigmoid);
    let gate = host_linear(&mut rng, 256, 7168, WType::Bf16);
    let bias = randn(&mut rng, 256, 0.1);
    // 600 tokens: past router_blas_min_rows (512), the GEMM library's bf16 GEMM on x in three
    // bf16 terms where it has one
    for t in [9, 256, 600] {
        let x = randn(&mut rng, t * 7168, 1.0);
        let cr = c.moe_route(&c.upload(t, 7168, &x).unwrap(), &c.upload_linear(&gate).unwrap(), Some(&bias), &p).unwrap();
        let gr = g.moe_route(&g.upload(t, 7168, &x).unwrap(), &g.upload_linear(&gate).unwrap(), Some(&bias), &p).unwrap();
        let gids: Vec<u32> = gr.ids.to_host().unwrap().iter().map(|&i: &i32| i as u32).collect();
        assert_eq!(gids, cr.ids, "V3 router, {t} tokens: routed experts");
        let gw: Vec<f32> = gr.weights.to_host().unwrap();
        check(&format!("moe_route V3 router {t} tokens weights"), &gw[..t * p.top_k], &cr.weights, F32_TOL);
    }
}

/// A MoE layer's shared experts added into the routed sum (`mlp_add`): at one row the per-pair
/// kernels on the MLP's own FP8 weights (moe_pairs.rs), at three rows the linear layers, SiLU·up
/// and the add; V3's shared-expert shape (hidden 7,168, inter 2,048) and a bf16 MLP, into a
/// random y, against the f32 CPU ops. And a dense layer's MLP (`mlp`: at one row the same
/// kernels into a zeroed output).
#[test]
#[ignore = "needs a GPU: ENGINE_TEST_BACKEND=cuda (or rocm) ... -- --ignored"]
fn shared_experts_mlp_add() {
    common::on_gpu!(shared_experts_mlp_add_on)
}

fn shared_experts_mlp_add_on<V: GpuVendor>() {
    let (g, c) = (gpu::<V>(), CpuBackend::new());
    let mut rng = Rng::new(77);
    for (hidden, inter, wt) in [(7168, 2048, WType::Fp8), (7168, 256, WType::Fp8), (512, 256, WType::Bf16)] {
        let w = host_mlp(&mut rng, hidden, inter, wt);
        let gw: Vec<_> = w.iter().map(|l| g.upload_linear(l).unwrap()).collect();
        let cw: Vec<_> = w.iter().map(|l| c.upload_linear(l).unwrap()).collect();
        for rows in [1, 3] {
            let (x, y0) = (randn(&mut rng, rows * hidden, 1.0), randn(&mut rng, rows * hidden, 1.0));
            let mut gy = g.upload(rows, hidden, &y0).unwrap();
            g.mlp_add(&g.upload(rows, hidden, &x).unwrap(), &gw[0], &gw[1], &gw[2], &mut gy).unwrap();
            let mut cy = c.upload(rows, hidden, &y0).unwrap();
            c.mlp_add(&c.upload(rows, hidden, &x).unwrap(), &cw[0], &cw[1], &cw[2], &mut cy).unwrap();
            check(&format!("mlp_add {hidden}x{inter} {rows} rows"), &g.download(&gy).unwrap(), &c.download(&cy).unwrap(), F32_TOL);
            let gm = g.mlp(&g.upload(rows, hidden, &x).unwrap(), &gw[0], &gw[1], &gw[2]).unwrap();
            let cm = c.mlp(&c.upload(rows, hidden, &x).unwrap(), &cw[0], &cw[1], &cw[2]).unwrap();
            check(&format!("mlp {hidden}x{inter} {rows} rows"), &g.download(&gm).unwrap(), &c.download(&cm).unwrap(), F32_TOL);
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
        let experts: Vec<[HostLinear; 3]> = (0..p.n_experts).map(|_| host_mlp(&mut rng, hidden, inter, WType::Fp8)).collect();
        let sw = host_mlp(&mut rng, hidden, inter, WType::Fp8);
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

/// `--fp8-activations dynamic` MoE at prefill sizes (engine/backend/gpu/moe_prefill.rs) through
/// the grouped FP8 GEMM (moe_f8_gemm.hip, sm_90a; elsewhere the library's), against an f32
/// reference on the CPU fed with the same quantisations (tokens per 128 channels, then SiLU·up
/// per pair row), and its forms against each other bit for bit (clusters and blocks alone, x's
/// codes gathered and the gathered rows quantised); all
/// experts on this rank, then a quarter of them (expert parallelism): 600 and 2,000 tokens
/// (segments of ~56 and ~190 rows: one partial 128-row tile, a whole and a partial one), then a
/// TP8 rank's expert width (inter 256: two column blocks of gate and up, two K blocks of down),
/// which only the grouped GEMM takes at prefill sizes.
#[test]
#[ignore = "needs a GPU: ENGINE_TEST_BACKEND=cuda (or rocm) ... -- --ignored"]
fn moe_experts_fp8_prefill_grouped() {
    common::on_gpu!(moe_experts_fp8_prefill_grouped_on)
}

fn moe_experts_fp8_prefill_grouped_on<V: GpuVendor>() {
    let mut g = gpu::<V>();
    g.fp8_act = true;
    let c = CpuBackend::new();
    let mut rng = Rng::new(53);
    for (hidden, inter, cases) in [(512, 512, &[(600, true), (2000, true)][..]), (512, 256, &[(700, true)][..])] {
        moe_fp8_dynamic_case(&mut g, &c, &mut rng, (hidden, inter, 64), cases);
    }
}

/// The same at the other sizes and paths: the library's block-scaled FP8 GEMM per expert segment
/// at a prefill size, and the decode sizes' FP8 × FP8 kernels.
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
    // the library at a prefill size; then hidden and inter 1024 at decode sizes (moe_f8s.hip's
    // ring of 4 stages goes round twice), staged and not; then 8 of V3's experts (7,168 × 2,048)
    // at 40 and 10 tokens (tiles of 9-16 and of ≤ 8), staged; then 16 of a TP8 rank's (7,168 ×
    // 256: down's K two blocks, fewer than the ring's stages), staged and not
    for (hidden, inter, cases) in [(512, 512, &[(600, false), (200, true), (20, true)][..]), (1024, 1024, &[(200, true), (20, true)][..])] {
        moe_fp8_dynamic_case(&mut g, &c, &mut rng, (hidden, inter, 64), cases);
    }
    moe_fp8_dynamic_case(&mut g, &c, &mut rng, (7168, 2048, 8), &[(40, true), (10, true)]);
    moe_fp8_dynamic_case(&mut g, &c, &mut rng, (7168, 256, 16), &[(40, true), (10, true)]);
    g.moe_f8s = false;
    moe_fp8_dynamic_case(&mut g, &c, &mut rng, (1024, 1024, 64), &[(200, true), (20, true)]);
    moe_fp8_dynamic_case(&mut g, &c, &mut rng, (7168, 256, 16), &[(40, true)]);
}

fn moe_fp8_dynamic_case<V: GpuVendor>(g: &mut GpuBackend<V>, c: &CpuBackend, rng: &mut Rng, (hidden, inter, n_exp): (usize, usize, usize), cases: &[(usize, bool)]) {
    use engine::weights::act_quant::ActFp8;
    let p = RouteParams { n_experts: n_exp, top_k: 6, n_group: 1, topk_group: 1, method: TopkMethod::Greedy, scoring: ScoringFunc::Softmax, norm_topk_prob: false, routed_scaling_factor: 1.0 };
    let gate = host_linear(rng, n_exp, hidden, WType::F32);
    let experts: Vec<[HostLinear; 3]> = (0..n_exp).map(|_| host_mlp(rng, hidden, inter, WType::Fp8)).collect();
    // 600 and 2,000 tokens (segments of ~56 and ~190 rows: a tile of one 64-row box; tiles of three
    // boxes, or a whole 192-row tile and a partial one): the grouped FP8 GEMM (sm_90a; elsewhere these run the library too), then
    // cuBLASLt's block-scaled GEMM per expert segment;
    // 200 and 20 (sm_89+): the FP8 × FP8 grouped kernels (moe_f8s.hip where H and I are whole
    // 128-column blocks and `moe_f8s`, else moe_f8.hip), with tiles of 9-16 tokens (two
    // n-fragments) and of ≤ 8
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
            let ge = g.upload_experts(experts[first..first + n].to_vec(), first).unwrap();
            let got = g.download(&g.moe_experts(&gx, &gr, &ge).unwrap()).unwrap();
            // SiLU·up is requantised from the GPU's own gate/up products, ~1e-4 from the reference's,
            // so a few of its codes round the other way (one e4m3 step, 6-12%): ~3e-3 in all. A wrong
            // row, segment or scale would be O(1) (the distance to f32 activations is printed).
            check(&format!("moe_experts fp8 activations {hidden}x{inter}, experts {first}..{} of {n_exp}, {t} tokens, grouped GEMM {grouped}, staged {}", first + n, g.moe_f8s), &got, &want, 6e-3);
            g.fp8_act = false;
            let f32_acts = g.download(&g.moe_experts(&gx, &gr, &ge).unwrap()).unwrap();
            eprintln!("  (f32 activations against this reference: rel err {:.2e})", rel_err(&f32_acts, &want));
            g.fp8_act = true;
            if grouped && t >= g.tuned.moe_mma_min_rows {
                // the grouped GEMM's blocks alone (no clusters sharing the activation tiles): the
                // same products in the same order, so the same result
                g.tuned.moe_f8_gemm_cluster = false;
                let alone = g.download(&g.moe_experts(&gx, &gr, &ge).unwrap()).unwrap();
                g.tuned.moe_f8_gemm_cluster = true;
                let d = rel_err(&alone, &got);
                eprintln!("  (grouped GEMM in clusters against blocks alone: rel err {d:.2e})");
                assert!(d <= 1e-6, "{hidden}x{inter}, {t} tokens: clusters {d:e} from blocks alone");
                // gate and up as two launches with f32 outputs, then the quantiser of SiLU(g) · u:
                // the same products, promotions and rounding as the joint launch's own codes
                g.tuned.moe_f8_gemm_glu = false;
                let apart = g.download(&g.moe_experts(&gx, &gr, &ge).unwrap()).unwrap();
                g.tuned.moe_f8_gemm_glu = true;
                assert!(apart == got, "{hidden}x{inter}, {t} tokens: gate / up apart (rel err {:.2e}) differ from the joint launch", rel_err(&apart, &got));
                eprintln!("  (gate and up in one launch: equal bit for bit to two launches and the quantiser)");
                // the down projection in 256-row tiles: the same products and promotions a row
                g.tuned.moe_f8_gemm_rows256 = true;
                let rows256 = g.download(&g.moe_experts(&gx, &gr, &ge).unwrap()).unwrap();
                g.tuned.moe_f8_gemm_rows256 = false;
                assert!(rows256 == got, "{hidden}x{inter}, {t} tokens: 256-row tiles (rel err {:.2e}) differ from 128-row ones", rel_err(&rows256, &got));
                eprintln!("  (256-row tiles: equal bit for bit to 128-row ones)");
                // with a shared expert: its GEMMs first (while the host lays the routed pairs out),
                // the routed sum added to its output, against the routed experts first and the
                // shared MLP added to theirs (shared + routed and routed + shared: one f32 addition)
                let sw: Vec<_> = host_mlp(rng, hidden, inter, WType::Fp8).iter().map(|l| g.upload_linear(l).unwrap()).collect();
                let with_shared = |g: &GpuBackend<V>| g.download(&g.moe_experts_shared(&gx, &gr, &ge, Some([&sw[0], &sw[1], &sw[2]])).unwrap()).unwrap();
                let first_ = with_shared(g);
                g.tuned.moe_shared_first = false;
                let last_ = with_shared(g);
                g.tuned.moe_shared_first = true;
                let d = rel_err(&first_, &last_);
                eprintln!("  (shared experts first against last: rel err {d:.2e}, equal bit for bit: {})", first_ == last_);
                assert!(d <= 1e-6 && first_ != got, "{hidden}x{inter}, {t} tokens: shared experts first {d:e} from last");
            }
            if t >= g.tuned.moe_mma_min_rows {
                // the routed rows as the gathered f32 rows quantised, where x's codes were
                // gathered: the same codes and scales, so the same bits
                g.tuned.moe_gather_codes = false;
                let quantised = g.download(&g.moe_experts(&gx, &gr, &ge).unwrap()).unwrap();
                g.tuned.moe_gather_codes = true;
                assert!(quantised == got, "{hidden}x{inter}, {t} tokens: x's codes gathered differ from the gathered rows quantised");
                eprintln!("  (x's codes gathered: equal bit for bit to the gathered rows quantised)");
            }
        }
    }
}
