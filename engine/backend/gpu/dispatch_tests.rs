//! Which kernel each op launches, by batch size, weight dtype and device (the thresholds of
//! configs/tuned/nvidia-h200.toml, which are also the defaults), and the launch geometry for
//! 32- and 64-wide warps — on the host runtime, which records launches instead of running them.
use super::backend::{GpuBackend, GpuTensor};
use super::ops::{GpuExperts, GpuLinear};
use super::host_runtime::{host_backend, HostRuntime, HostVendor};
use crate::backend::{Backend, RouteParams};
use crate::config::{ScoringFunc, TopkMethod};
use crate::weights::{HostLinear, LinearData, MmapSlice};

fn fp8(out: usize, inp: usize) -> HostLinear {
    let scales = vec![0.01; out.div_ceil(128) * inp.div_ceil(128)];
    let w = (0..out * inp).map(|i| (i % 120) as u8).collect();
    HostLinear { name: "w".into(), out, inp, data: LinearData::Fp8 { w: MmapSlice::from_vec(w), scale_inv: scales, block_n: 128, block_k: 128 } }
}

fn bf16(out: usize, inp: usize) -> HostLinear {
    HostLinear { name: "w".into(), out, inp, data: LinearData::BF16(MmapSlice::from_vec(vec![0x3f; out * inp * 2])) }
}

/// An NVIDIA sm_80+-like device: matrix units and the swap-AB kernels on.
fn nvidia_like() -> (GpuBackend<HostVendor>, std::sync::Arc<HostRuntime>) {
    let (mut b, rt) = host_backend();
    (b.mma_gemm, b.linear_tc, b.moe_tc) = (true, true, true);
    (b, rt)
}

fn x(b: &GpuBackend<HostVendor>, rows: usize, cols: usize) -> GpuTensor {
    b.upload(rows, cols, &vec![0.5; rows * cols]).unwrap()
}

fn names(rt: &HostRuntime) -> Vec<String> {
    rt.take_launched().into_iter().map(|(n, _, _)| n).collect()
}

/// `n` FP8 experts of (hidden, inter) behind an f32 router, greedy softmax top-4 routing.
struct MoeCase {
    experts: GpuExperts,
    gate: GpuLinear,
    p: RouteParams,
    hidden: usize,
}

impl MoeCase {
    fn new(b: &GpuBackend<HostVendor>, hidden: usize, inter: usize, n: usize) -> Self {
        let experts = b.upload_experts((0..n).map(|_| [fp8(inter, hidden), fp8(inter, hidden), fp8(hidden, inter)]).collect(), 0).unwrap();
        let gate = b.upload_linear(&HostLinear::from_f32("gate", n, hidden, &vec![0.1; n * hidden])).unwrap();
        let p = RouteParams { n_experts: n, top_k: 4, n_group: 1, topk_group: 1, method: TopkMethod::Greedy, scoring: ScoringFunc::Softmax, norm_topk_prob: true, routed_scaling_factor: 1.0 };
        MoeCase { experts, gate, p, hidden }
    }

    /// Routes `tokens` tokens, then runs the experts: the runtime holds the experts' launches only.
    fn run_experts(&self, b: &GpuBackend<HostVendor>, rt: &HostRuntime, tokens: usize) {
        let xt = x(b, tokens, self.hidden);
        let mut r = b.moe_route(&xt, &self.gate, None, &self.p).unwrap();
        // the host runtime runs no kernel: every pair routed to expert 0, as the routing kernel
        // would have written them
        r.ids = b.htod(&vec![0i32; tokens * self.p.top_k]).unwrap();
        rt.take_launched();
        b.moe_experts(&xt, &r, &self.experts).unwrap();
    }

    /// The launches of the experts (after routing) for `tokens` tokens.
    fn expert_launches(&self, b: &GpuBackend<HostVendor>, rt: &HostRuntime, tokens: usize) -> Vec<(String, (u32, u32, u32), u32)> {
        self.run_experts(b, rt, tokens);
        rt.take_launched()
    }

    /// The grouped GEMMs' grids and cluster sizes (their last argument) for `tokens` tokens.
    fn gemm_grids_and_clusters(&self, b: &GpuBackend<HostVendor>, rt: &HostRuntime, tokens: usize) -> Vec<((u32, u32, u32), u64)> {
        self.run_experts(b, rt, tokens);
        rt.take_launched_args().into_iter().filter(|x| x.0.starts_with("moe_gemm_f8")).map(|x| (x.1, *x.3.last().unwrap())).collect()
    }
}

#[test]
fn prefill_moe_with_fp8_activations_takes_the_grouped_gemm_on_sm90a() {
    // 600 tokens, top-4: the host runtime runs no kernel, so every routed id reads back 0 and all
    // 2,400 pairs form expert 0's segment: 19 tiles of ≤ 128 rows, × 2 column blocks (256 wide):
    // 38 work items
    for arch in ["sm_90a", "sm_89"] {
        let (mut b, rt) = nvidia_like();
        (b.arch, b.fp8_act) = (arch.into(), true);
        let c = MoeCase::new(&b, 256, 256, 16);
        let l = c.expert_launches(&b, &rt, 600);
        let names: Vec<&str> = l.iter().map(|x| x.0.as_str()).collect();
        if arch == "sm_90a" {
            // x quantised once and its codes gathered into the expert segments (tuned
            // moe_gather_codes; off: the gathered rows quantised, the same bytes); gate and up in
            // one launch writing down's codes (tuned moe_f8_gemm_glu; off: two launches and the
            // quantiser); the down projection in 256-row tiles (tuned moe_f8_gemm_rows256)
            assert_eq!(names, ["quant_fp8_act", "gather_fp8_rows", "moe_gemm_f8_glu", "moe_gemm_f8_r2", "moe_combine"]);
            b.tuned.moe_f8_gemm_rows256 = false; // (128-row tiles from here)
            let l = c.expert_launches(&b, &rt, 600);
            assert_eq!(l.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(), ["quant_fp8_act", "gather_fp8_rows", "moe_gemm_f8_glu", "moe_gemm_f8", "moe_combine"]);
            b.tuned.moe_f8_gemm_glu = false;
            let l = c.expert_launches(&b, &rt, 600);
            assert_eq!(l.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(), ["quant_fp8_act", "gather_fp8_rows", "moe_gemm_f8", "moe_gemm_f8", "quant_fp8_silu_act", "moe_gemm_f8", "moe_combine"]);
            b.tuned.moe_f8_gemm_glu = true;
            b.tuned.moe_gather_codes = false;
            let l = c.expert_launches(&b, &rt, 600);
            assert_eq!(l.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(), ["quant_fp8_act", "moe_gemm_f8_glu", "moe_gemm_f8", "moe_combine"]);
            b.tuned.moe_gather_codes = true;
            // persistent blocks: one an SM (4 on the host runtime) walk the 38 items; and a
            // GPU with more SMs than items gets a block an item
            assert!(l.iter().filter(|x| x.0.starts_with("moe_gemm_f8")).all(|x| x.1 == (4, 1, 1) && x.2 == 384), "{l:?}");
            b.sms = 132;
            let l = c.expert_launches(&b, &rt, 600);
            assert!(l.iter().filter(|x| x.0.starts_with("moe_gemm_f8")).all(|x| x.1 == (19 * 2, 1, 1)), "{l:?}");
            // where the device holds clusters: pairs of blocks (the kernel's last argument 2), a
            // pair the same column of two of the expert's tiles (9 pairs) or a tile's two column
            // blocks (the 19th): 10 units of 2 items, 20 clusters of 132 SMs' 66: 40 blocks.
            // Too few clusters at once for a persistent launch (fewer than a quarter of the
            // SMs): blocks alone, 38. The runtime is asked once a backend (a fresh one per answer)
            for (held, cluster, blocks) in [(66, 2, 40), (20, 1, 38)] {
                let (mut b, rt) = nvidia_like();
                (b.arch, b.fp8_act, b.sms) = (arch.into(), true, 132);
                b.tuned.moe_f8_gemm_rows256 = false; // (128-row tiles: the counts above)
                *rt.clusters.lock().unwrap() = held;
                let c = MoeCase::new(&b, 256, 256, 16);
                let g = c.gemm_grids_and_clusters(&b, &rt, 600);
                assert!(g.len() == 2 && g.iter().all(|&x| x == ((blocks, 1, 1), cluster)), "{held}: {g:?}");
                *rt.clusters.lock().unwrap() = 86 - held; // the other answer: not asked for
                assert_eq!(c.gemm_grids_and_clusters(&b, &rt, 600), g);
            }
            // no clusters at all on a device of fewer than 4 SMs (a quarter of its SMs is 0): blocks alone
            let (mut b, rt) = nvidia_like();
            (b.arch, b.fp8_act, b.sms) = (arch.into(), true, 2);
            b.tuned.moe_f8_gemm_rows256 = false;
            let c = MoeCase::new(&b, 256, 256, 16);
            let g = c.gemm_grids_and_clusters(&b, &rt, 600);
            assert!(g.len() == 2 && g.iter().all(|&x| x == ((2, 1, 1), 1)), "{g:?}");
        } else {
            // no warpgroup MMA (and no GEMM library here): the bf16 tiles on f32 activations
            assert_eq!(names, ["moe_group", "moe_gate_up_mma_fp8w", "moe_silu_mul_halves", "moe_down_mma_fp8w"]);
        }
    }
}

#[test]
fn linear_layers_pick_their_kernel_by_rows_and_dtype() {
    let (b, rt) = nvidia_like();
    let w = b.upload_linear(&fp8(1536, 7168)).unwrap();
    let run = |rows: usize| {
        rt.take_launched();
        b.linear(&x(&b, rows, 7168), &w).unwrap();
        names(&rt)
    };
    assert_eq!(run(1), ["gemv1_fp8w"], "batch 1: the GEMV, four rows per warp");
    assert_eq!(run(2)[0], "linear_tc_fp8w", "2-64 rows: swap-AB on the matrix units");
    assert_eq!(run(64)[0], "linear_tc_fp8w");
    assert_eq!(run(65)[0], "linear_mma_fp8w", "65+: the 128-row tiles");
    // bf16 (the lm_head) without a GEMM library: the GEMV up to 8 rows, then the tiles
    let wb = b.upload_linear(&bf16(256, 512)).unwrap();
    for (rows, want) in [(1, "gemv1_bf16w"), (2, "gemv8_bf16w"), (8, "gemv8_bf16w"), (9, "linear_mma_bf16w")] {
        rt.take_launched();
        b.linear(&x(&b, rows, 512), &wb).unwrap();
        assert_eq!(names(&rt)[0], want, "{rows} rows of bf16");
    }
}

/// `--fp8-activations dynamic` on an sm_89+ device: 2 (or as tuned, 1) to 8 rows quantise x and
/// take the FP8 × FP8 swap-AB kernel, split over K where its 128-row blocks would not fill the GPU; elsewhere (an
/// sm_80 device, 9+ rows, the threshold at 0) the f32-activation kernels stay.
#[test]
fn fp8_activations_take_the_fp8_mma_kernel_up_to_8_rows_on_sm89() {
    let (mut b, rt) = nvidia_like();
    b.fp8_act = true;
    b.arch = "sm_90a".into();
    let w = b.upload_linear(&fp8(1536, 7168)).unwrap();
    let launched = |b: &GpuBackend<HostVendor>, rows: usize| {
        rt.take_launched();
        b.linear(&x(b, rows, 7168), &w).unwrap();
        rt.take_launched()
    };
    assert_eq!(launched(&b, 1)[0].0, "gemv1_fp8w", "one row: the f32-activation GEMV (linear_f8_min_rows 2)");
    b.tuned.linear_f8_min_rows = 1;
    for rows in [1, 3, 8] {
        let l = launched(&b, rows);
        let n: Vec<&str> = l.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(n, ["quant_fp8_act", "linear_f8_fp8w", "linear_split_sum"], "{rows} rows");
        // 12 blocks of 128 rows on 4 "SMs" × 4: K 7168 in 2 ranges of 3584
        assert_eq!((l[1].1, l[1].2), ((1, 12, 2), 128), "{rows} rows: grid and block");
        assert_eq!(l[0].1, (rows as u32, 7, 1), "{rows} rows: the quantiser's grid");
    }
    // 9-32 rows (`linear_f8s_max_rows`): the staged FP8 × FP8 kernel, 32 tokens a block, split
    // over K where the blocks would not fill the GPU (12 × 1 blocks on 4 "SMs" × 4: 2 splits of 28
    // K blocks); with the threshold raised, 33-64 rows in two token tiles (24 blocks fill the 16
    // wanted: no split)
    for (rows, tiles) in [(9, 1), (32, 1), (33, 2), (64, 2)] {
        b.tuned.linear_f8s_max_rows = if rows > 32 { 64 } else { 32 };
        let l = launched(&b, rows);
        let n: Vec<&str> = l.iter().map(|(n, _, _)| n.as_str()).collect();
        let split = tiles == 1; // 24 blocks already fill the 16 wanted
        assert_eq!(n, ["quant_fp8_act", "linear_f8s_fp8w", "linear_split_sum"][..if split { 3 } else { 2 }], "{rows} rows");
        assert_eq!((l[1].1, l[1].2), ((12, tiles, if split { 2 } else { 1 }), 128), "{rows} rows: grid and block");
    }
    b.tuned.linear_f8s_max_rows = 32;
    assert!(b.linear_f8s_for(&x(&b, 32, 7168), &w) && !b.linear_f8s_for(&x(&b, 33, 7168), &w), "past linear_f8s_max_rows: the library");
    b.tuned.linear_f8s_max_rows = 0;
    assert_eq!(launched(&b, 9)[0].0, "linear_tc_fp8w", "9 rows, staged kernel off: f32 activations on the swap-AB kernel");
    b.tuned.linear_f8s_max_rows = 32;
    b.tuned.linear_f8_max_rows = 0;
    assert_eq!(launched(&b, 1)[0].0, "gemv1_fp8w", "threshold 0: never");
    assert_eq!(launched(&b, 4)[0].0, "linear_tc_fp8w", "threshold 0: never");
    b.tuned.linear_f8_max_rows = 8;
    b.arch = "sm_80".into();
    assert_eq!(launched(&b, 1)[0].0, "gemv1_fp8w", "no e4m3 MMA before sm_89");
}

/// `--fp8-activations dynamic` on sm_89+: grouped decode batches (8-511 tokens) quantise x, run
/// the FP8 × FP8 gate_up, quantise SiLU·up and run the FP8 × FP8 down (the staged form where H
/// and I are whole 128-column blocks); below 8 tokens the per-pair kernels stay, and with
/// `moe_f8_max_rows` 0 or on sm_80 the bf16 swap-AB kernels.
#[test]
fn moe_fp8_activations_take_the_fp8_mma_kernels() {
    let (mut b, rt) = nvidia_like();
    (b.fp8_act, b.arch) = (true, "sm_90a".into());
    let c = MoeCase::new(&b, 512, 512, 16);
    let run = |b: &GpuBackend<HostVendor>, tokens: usize| c.expert_launches(b, &rt, tokens);
    let l = run(&b, 20);
    let names: Vec<&str> = l.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names, ["moe_group", "quant_fp8_act", "moe_gate_up_f8s_fp8w", "quant_fp8_act", "moe_down_f8s_fp8w"]);
    // 80 pairs: at most 5 full tiles + one partial per expert; x's 20 rows, then the 80 positions
    let tiles = 80usize.div_ceil(16) as u32 + 16;
    assert_eq!((l[1].1, l[2].1, l[3].1, l[4].1), ((20, 1, 1), (8, tiles, 1), (80, 1, 1), (4, tiles, 1)));
    // the staged kernels' shared memory as moe_f8s.hip sizes it: 4 stages of 128 weight rows and
    // 16 token rows of 128 bytes, 16 + 2 scales, 8 bytes spare, rounded up to 128
    let src = include_str!("../../../hip-kernels/moe_f8s.hip");
    for d in ["#define MS_BK 128 ", "#define MS_ROWS 128 ", "#define MS_TOK 16 ", "#define ML_TOK 32 ", "#define MS_ST 4 ", "#define MS_STAGE(TOK) ((MS_SW(TOK) + 8 + 127) / 128 * 128)"] {
        assert!(src.contains(d), "moe_f8s.hip: {d}");
    }
    assert_eq!(super::moe_grouped::MOE_F8S_SMEM, 4 * (128 * 128 + 16 * 128 + 16 * 4 + 8usize).div_ceil(128) * 128);
    // the dense linear's: 32 token rows and scales
    assert_eq!(super::linear_tc::LINEAR_F8S_SMEM, 4 * (128 * 128 + 32 * 128 + 32 * 4 + 8usize).div_ceil(128) * 128);
    // off, or H not whole 128-column blocks (448: 3.5): moe_f8.hip's
    b.moe_f8s = false;
    assert_eq!(run(&b, 20)[2].0, "moe_gate_up_f8_fp8w");
    b.moe_f8s = true;
    let c448 = MoeCase::new(&b, 448, 512, 16);
    let l = c448.expert_launches(&b, &rt, 20);
    assert_eq!((l[2].0.as_str(), l[4].0.as_str()), ("moe_gate_up_f8_fp8w", "moe_down_f8_fp8w"));
    // (28 pairs × 256 row groups: two waves' worth on the host runtime's 4 SMs, gate/up's second copy)
    assert_eq!(run(&b, 7)[0].0, "moe_gate_up_wide_fp8w", "below 8 tokens: the per-pair kernels");
    b.tuned.moe_f8_max_rows = 0;
    assert_eq!(run(&b, 20)[1].0, "moe_gate_up_tc_fp8w", "threshold 0: f32 activations");
    b.tuned.moe_f8_max_rows = 511;
    b.arch = "sm_80".into();
    assert_eq!(run(&b, 20)[1].0, "moe_gate_up_tc_fp8w", "no e4m3 MMA before sm_89");
}

/// A MoE layer's input quantised once for its routed and shared experts (`share_act_codes`):
/// the routed gate/up and the shared gate and up read the one quantisation's codes.
#[test]
fn moe_layer_quantises_its_input_once_for_routed_and_shared_experts() {
    let (mut b, rt) = nvidia_like();
    (b.fp8_act, b.arch) = (true, "sm_90a".into());
    let c = MoeCase::new(&b, 512, 512, 16);
    let up = |l: HostLinear| b.upload_linear(&l).unwrap();
    let shared = [up(fp8(256, 512)), up(fp8(256, 512)), up(fp8(512, 256))];
    let xt = x(&b, 20, c.hidden);
    let r = b.moe_route(&xt, &c.gate, None, &c.p).unwrap();
    rt.take_launched();
    b.moe_experts_shared(&xt, &r, &c.experts, Some([&shared[0], &shared[1], &shared[2]])).unwrap();
    let l = rt.take_launched_args();
    // quant_fp8_act's arguments: x, codes, scales; the FP8 kernels' first: codes
    let of_x: Vec<&super::host_runtime::Named> = l.iter().filter(|n| n.0 == "quant_fp8_act" && n.3[0] == xt.buf.ptr()).collect();
    assert_eq!(of_x.len(), 1, "{:?}", l.iter().map(|n| &n.0).collect::<Vec<_>>());
    let codes = of_x[0].3[1];
    let readers: Vec<&str> = l.iter().filter(|n| n.0 != "quant_fp8_act" && n.3.first() == Some(&codes)).map(|n| n.0.as_str()).collect();
    assert_eq!(readers, ["moe_gate_up_f8s_fp8w", "linear_f8s_fp8w", "linear_f8s_fp8w"]);
    // outside the layer's scope each linear quantises its own input again
    rt.take_launched();
    b.linear(&xt, &shared[0]).unwrap();
    b.linear(&xt, &shared[1]).unwrap();
    assert_eq!(names(&rt).iter().filter(|n| *n == "quant_fp8_act").count(), 2);
}

/// A GEMM library that records the block-scaled FP8 GEMMs' shapes and input codes (the host
/// runtime has none).
type GemmLog = std::sync::Arc<std::sync::Mutex<Vec<((usize, usize, usize), u64)>>>;
struct ShapeLib(GemmLog);

impl super::blas::GemmLib for ShapeLib {
    fn name(&self) -> &'static str {
        "shapes"
    }
    fn supports(&self, _: usize, _: usize, _: usize) -> bool {
        false
    }
    fn gemm_bf16(&self, _: usize, _: usize, _: usize, _: u64, _: u64, _: u64) -> Result<(), String> {
        Err("no bf16 GEMM".into())
    }
    fn supports_fp8_block(&self, _: usize, _: usize, _: usize) -> bool {
        true
    }
    fn gemm_fp8_block(&self, shape: (usize, usize, usize), _: (u64, u64), (xq, _): (u64, u64), _: u64, _: super::device::Handle) -> Result<(), String> {
        self.0.lock().unwrap().push((shape, xq));
        Ok(())
    }
}

/// Two FP8 layers uploaded as a pair (joint.rs) lie back to back and, where the library's GEMM
/// takes the shared codes, run as one GEMM: MLA's q_a + kv_a split after it, an MLP's SiLU·up
/// quantised from its halves. Uploaded apart: a GEMM each.
#[test]
fn layers_uploaded_as_a_pair_take_one_gemm() {
    let (mut b, rt) = nvidia_like();
    (b.fp8_act, b.arch) = (true, "sm_90a".into());
    let shapes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    b.blaslt = Some(Box::new(ShapeLib(shapes.clone())));
    let taken = || std::mem::take(&mut *shapes.lock().unwrap()).into_iter().map(|x| x.0).collect::<Vec<_>>();
    let (qa, kva) = b.upload_linear_pair(&fp8(1536, 512), &fp8(576, 512)).unwrap();
    // the second's bytes and its 5 × 4 scales follow the first's (12 × 4)
    assert_eq!((kva.data.ptr(), kva.scales.ptr()), (qa.data.ptr() + 1536 * 512, qa.scales.ptr() + 4 * 48));
    let xt = x(&b, 256, 512);
    rt.take_launched();
    let (q, kv) = b.linear_pair(&xt, &qa, &kva).unwrap();
    assert_eq!((q.cols, kv.cols), (1536, 576));
    assert_eq!((names(&rt), taken()), (vec!["quant_fp8_act".to_string(), "split_cols".into()], vec![(256, 2112, 512)]));
    // prefill sizes (past JOINT_SPLIT_MAX_ROWS): a GEMM each, no copy
    b.linear_pair(&x(&b, 2048, 512), &qa, &kva).unwrap();
    assert_eq!((names(&rt), taken()), (vec!["quant_fp8_act".to_string()], vec![(2048, 1536, 512), (2048, 576, 512)]));
    let (qa2, kva2) = (b.upload_linear(&fp8(1536, 512)).unwrap(), b.upload_linear(&fp8(576, 512)).unwrap());
    b.linear_pair(&xt, &qa2, &kva2).unwrap();
    assert_eq!((names(&rt), taken()), (vec!["quant_fp8_act".to_string()], vec![(256, 1536, 512), (256, 576, 512)]));
    // 576 rows first are not whole 128-row blocks: uploaded apart
    let (kv_first, qa_second) = b.upload_linear_pair(&fp8(576, 512), &fp8(1536, 512)).unwrap();
    assert!(kv_first.joint.is_none() && qa_second.joint.is_none());
    let (g, u) = b.upload_linear_pair(&fp8(512, 512), &fp8(512, 512)).unwrap();
    b.mlp(&xt, &g, &u, &b.upload_linear(&fp8(512, 512)).unwrap()).unwrap();
    assert_eq!((names(&rt), taken()), (vec!["quant_fp8_act".to_string(), "quant_fp8_silu_halves".into()], vec![(256, 1024, 512), (256, 512, 512)]));
    // a down projection the library does not take (2 scale columns): gate and up split for the ops
    let (g, u) = b.upload_linear_pair(&fp8(256, 512), &fp8(256, 512)).unwrap();
    b.mlp(&xt, &g, &u, &b.upload_linear(&fp8(512, 256)).unwrap()).unwrap();
    assert_eq!(names(&rt)[..3], ["quant_fp8_act", "split_cols", "silu_mul"]);
    assert_eq!(taken(), [(256, 512, 512)]);
}

/// A decode batch on the warpgroup kernel hands o_proj the value projection's FP8 codes
/// (`mla_attention_linear`: `_bxq` writes them, o's GEMM reads them: no f32 output, no
/// quantiser); rows not a multiple of 4 take the f32 projection and o quantises it (padded).
#[test]
fn decode_attention_hands_o_proj_the_value_projections_codes() {
    use crate::backend::{AttnSeq, MlaDims};
    let (mut b, rt) = nvidia_like();
    (b.attn_bf16, b.matrix_units, b.fp8_act, b.arch) = (true, true, true, "sm_90a".into());
    let log: GemmLog = Default::default();
    b.blaslt = Some(Box::new(ShapeLib(log.clone())));
    let d = MlaDims { num_heads: 128, qk_nope: 128, qk_rope: 64, v_head: 128, kv_lora_rank: 512, scale: 0.1 };
    let slots: Vec<u32> = (0..300).collect();
    let kv = b.alloc_kv_cache(2, 300, d.kv_entry()).unwrap();
    let kv_b = b.upload_mla_kv_b(&fp8(128 * 256, 512), d.qk_nope, d.v_head).unwrap();
    let o = b.upload_linear(&fp8(512, 128 * 128)).unwrap();
    // (36 tokens: o on the library's GEMM, past the staged FP8 kernel's 32)
    for (t, codes) in [(36, true), (35, false)] {
        let seqs: Vec<AttnSeq> = (0..t).map(|i| AttnSeq { q_start: i, q_len: 1, slots: &slots[..100 + i] }).collect();
        let q = x(&b, t, 128 * d.qk_head());
        rt.take_launched();
        let y = b.mla_attention_linear(&q, &kv, 1, &seqs, &kv_b, &d, &o).unwrap();
        assert_eq!((y.rows, y.cols), (t, 512));
        let l = rt.take_launched_args();
        let names: Vec<&str> = l.iter().map(|n| n.0.as_str()).collect();
        let gemms = std::mem::take(&mut *log.lock().unwrap());
        assert_eq!(gemms.iter().map(|g| g.0).collect::<Vec<_>>(), [(t.next_multiple_of(4), 512, 16384)]);
        if codes {
            assert_eq!(names, ["heads_mma_fp8w_m64_by", "mla_decode_wg", "heads_mma_fp8w_m64_bxq"]);
            assert_eq!(l[2].3[7], gemms[0].1, "o's GEMM reads the projection's codes");
        } else {
            assert_eq!(names, ["heads_mma_fp8w_m64_by", "mla_decode_wg", "heads_mma_fp8w_m64_bx", "quant_fp8_act"]);
        }
    }
}

#[test]
fn moe_batches_pick_per_pair_grouped_swap_ab_or_tiles() {
    let (b, rt) = nvidia_like();
    let c = MoeCase::new(&b, 256, 128, 16);
    let (hidden, gate, p) = (c.hidden, &c.gate, &c.p);
    let run = |tokens: usize| c.expert_launches(&b, &rt, tokens).into_iter().map(|(n, _, _)| n).collect::<Vec<_>>();
    assert_eq!(run(7), ["moe_gate_up_wide_fp8w", "moe_down_fp8w"], "below 8 tokens: the per-pair kernels");
    // their grid: one wave (2 blocks an SM, 4 SMs here; gate/up's second copy, taken from two
    // waves' items (7 tokens: 896), 3) of 8-warp blocks over (pair, row group) items, fewer when
    // the items run out (1 token of hidden 32, inter 16: short rows take groups
    // of lanes — gate/up rows of 32 FP8 weights 2 lanes, so 16 groups × 2 rows a warp, all 16
    // rows of a pair in one item; down rows of 16 one lane, 128 rows a warp — so 4 pairs are 4
    // items, one block each launch)
    let grids = |c: &MoeCase, tokens: usize| c.expert_launches(&b, &rt, tokens).into_iter().map(|(_, g, _)| g).collect::<Vec<_>>();
    assert_eq!(grids(&c, 7), [(12, 1, 1), (8, 1, 1)]);
    assert_eq!(grids(&MoeCase::new(&b, 32, 16, 16), 1), [(1, 1, 1), (1, 1, 1)]);
    // rows of a warp or more whose items do not fill the grid: warps share an item, each a part
    // of K (gate/up only; 1 token of hidden 512, inter 16: 4 pairs × 8 items in 64 warps, 2
    // warps each: 8 blocks; down rows of 16, a lane each: 4 items a pair, 2 blocks)
    assert_eq!(grids(&MoeCase::new(&b, 512, 16, 16), 1), [(8, 1, 1), (2, 1, 1)]);
    assert_eq!(run(8), ["moe_group", "moe_gate_up_tc_fp8w", "moe_down_tc_fp8w"], "8-511: grouped, swap-AB");
    assert_eq!(run(512), ["moe_group", "moe_gate_up_mma_fp8w", "moe_silu_mul_halves", "moe_down_mma_fp8w"], "512+: 128-token tiles");
    // the f32 router: the GEMV up to 8 tokens; beyond, one launch of the CUDA-core tiles split
    // over K (grid z), whose parts moe_route adds (its second argument)
    let (tm, tn) = super::ops::LINEAR_TILE;
    let src = include_str!("../../../hip-kernels/linear.hip");
    assert!(src.contains(&format!("#define LT_BM {tm}\n#define LT_BN {tn}\n#define LT_KT {}\n", super::ops::LINEAR_TILE_K)));
    rt.take_launched();
    b.moe_route(&x(&b, 8, hidden), gate, None, p).unwrap();
    assert_eq!(names(&rt), ["gemv8_f32w", "moe_route"]);
    for tokens in [9, 64, 600] {
        rt.launches.lock().unwrap().clear();
        b.moe_route(&x(&b, tokens, hidden), gate, None, p).unwrap();
        let (parts, kc) = super::router::router_split(tokens, p.n_experts, hidden, b.sms);
        assert!(parts > 1 || tokens == 600, "{tokens} tokens on {} SMs: {parts} parts", b.sms);
        let args: Vec<Vec<u64>> = rt.launches.lock().unwrap().iter().map(|l| l.3.clone()).collect();
        let l = rt.take_launched();
        let grid = ((p.n_experts.div_ceil(tn)) as u32, tokens.div_ceil(tm) as u32, parts as u32);
        assert_eq!((l[0].0.as_str(), l[0].1, l.len()), ("linear_f32w", grid, 2), "router at {tokens} tokens");
        assert_eq!((args[0][9], args[1][1]), (kc as u64, parts as u64), "K a part, parts added");
    }
    // while profiling, each routing call's ids are read back and their distinct experts kept (the
    // host runtime runs no kernel: with new memory reading as zeros, the ids name expert 0 alone)
    assert!(b.take_routed_experts().is_empty(), "not profiling: nothing read back");
    *rt.zero_fill.lock().unwrap() = true;
    b.profile.enabled.store(true, std::sync::atomic::Ordering::Relaxed);
    b.moe_route(&x(&b, 9, hidden), gate, None, p).unwrap();
    b.moe_route(&x(&b, 2, hidden), gate, None, p).unwrap();
    b.profile.enabled.store(false, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(b.take_routed_experts(), [1, 1]);
    b.take_profile().unwrap();
}

/// At one row a MoE layer's shared experts of the routed experts' shape are one more pair of the
/// routed launches (pairs top_k + 1, the second weight set from pair top_k); other shapes, or more
/// rows, keep their own launches.
#[test]
fn shared_experts_of_one_row_fold_into_the_routed_launches() {
    let (b, rt) = nvidia_like();
    let c = MoeCase::new(&b, 512, 64, 16);
    let up = |l: HostLinear| b.upload_linear(&l).unwrap();
    let same = [up(fp8(64, 512)), up(fp8(64, 512)), up(fp8(512, 64))];
    let other = [up(fp8(128, 512)), up(fp8(128, 512)), up(fp8(512, 128))];
    let run = |tokens: usize, s: &[GpuLinear; 3]| {
        let xt = x(&b, tokens, c.hidden);
        *rt.memsets.lock().unwrap() = 0;
        let r = b.moe_route(&xt, &c.gate, None, &c.p).unwrap();
        rt.take_launched();
        b.moe_experts_shared(&xt, &r, &c.experts, Some([&s[0], &s[1], &s[2]])).unwrap();
        // no memset between the kernels: the routing kernel zeroes the output the experts add into
        assert_eq!(*rt.memsets.lock().unwrap(), 0, "{tokens} tokens");
        let args: Vec<Vec<u64>> = rt.launches.lock().unwrap().iter().map(|l| l.3.clone()).collect();
        (names(&rt), args)
    };
    let (n, args) = run(1, &same);
    // (5 pairs × 32 row groups: two waves' worth on 4 SMs, gate/up's second copy)
    assert_eq!(n, ["moe_gate_up_wide_fp8w", "moe_down_fp8w"]);
    // gate/up: pairs (argument 7) 4 routed + 1 shared, the second set from pair 4 (argument 20);
    // down: the same pairs (6), from pair 4 (16)
    assert_eq!((args[0][7], args[0][20], args[1][6], args[1][16]), (5, 4, 5, 4));
    assert_eq!(run(1, &other).0, ["moe_gate_up_wide_fp8w", "moe_down_fp8w", "moe_gate_up_fp8w", "moe_down_fp8w"]);
    let (n2, _) = run(2, &same);
    assert_eq!((n2[0].as_str(), n2.last().map(String::as_str)), ("moe_gate_up_wide_fp8w", Some("add_inplace")), "{n2:?}");
}

/// A dense MLP of one row on the per-pair kernels: gate/up zeroes the output down adds into (no
/// memset node).
#[test]
fn dense_mlp_of_one_row_has_its_output_zeroed_by_gate_up() {
    let (b, rt) = nvidia_like();
    let up = |l: HostLinear| b.upload_linear(&l).unwrap();
    let m = [up(fp8(64, 512)), up(fp8(64, 512)), up(fp8(512, 64))];
    let xt = x(&b, 1, 512);
    rt.take_launched();
    *rt.memsets.lock().unwrap() = 0;
    let y = b.mlp(&xt, &m[0], &m[1], &m[2]).unwrap();
    assert_eq!(*rt.memsets.lock().unwrap(), 0);
    let l = rt.take_launched_args();
    assert_eq!(l.iter().map(|l| l.0.as_str()).collect::<Vec<_>>(), ["moe_gate_up_fp8w", "moe_down_fp8w"]);
    // gate/up's arguments 21, 22 (the buffer it zeroes, its floats); down's 5 (where it adds)
    assert_eq!((l[0].3[21], l[0].3[22], l[1].3[5]), (y.buf.ptr(), 512, y.buf.ptr()));
}

/// A MoE layer's shared experts at one row run the per-pair kernels on the MLP's own weights (no
/// routing: null ids), adding into the routed sum; more rows, or weights that are not FP8, keep
/// the linear layers, SiLU·up and the add.
#[test]
fn shared_experts_at_one_row_take_the_per_pair_kernels() {
    let (b, rt) = nvidia_like();
    let (h, i) = (64, 32);
    let up = |l: HostLinear| b.upload_linear(&l).unwrap();
    let fp8_mlp = [up(fp8(i, h)), up(fp8(i, h)), up(fp8(h, i))];
    let bf16_mlp = [up(bf16(i, h)), up(bf16(i, h)), up(bf16(h, i))];
    let run = |rows: usize, m: &[GpuLinear; 3]| {
        let mut y = x(&b, rows, h);
        rt.take_launched();
        b.mlp_add(&x(&b, rows, h), &m[0], &m[1], &m[2], &mut y).unwrap();
        rt.take_launched()
    };
    let l = run(1, &fp8_mlp);
    // 1 pair: gate/up rows of 64 FP8 weights read by 4 lanes (16 rows a warp: 2 items), down rows
    // of 32 by 2 (64 rows a warp: 1 item): a block each
    assert_eq!(l.iter().map(|(n, g, _)| (n.as_str(), *g)).collect::<Vec<_>>(), [("moe_gate_up_fp8w", (1, 1, 1)), ("moe_down_fp8w", (1, 1, 1))]);
    let names2: Vec<String> = run(2, &fp8_mlp).into_iter().map(|(n, _, _)| n).collect();
    assert_eq!(names2.last().map(String::as_str), Some("add_inplace"), "2 rows: {names2:?}");
    assert!(names2.iter().any(|n| n == "silu_mul"));
    let names_bf16: Vec<String> = run(1, &bf16_mlp).into_iter().map(|(n, _, _)| n).collect();
    assert_eq!(names_bf16, ["gemv1_bf16w", "gemv1_bf16w", "silu_mul", "gemv1_bf16w", "add_inplace"]);
}

#[test]
fn launch_geometry_follows_the_warp_width() {
    // kv_a-like (576 × 7168) at batch 1: 4 rows per warp, split over warps, 256-thread blocks
    for (warp, split, blocks) in [(32usize, 8usize, 144u32), (64, 4, 144)] {
        let (mut b, rt) = host_backend();
        b.warp = warp as u32;
        let w = b.upload_linear(&fp8(576, 7168)).unwrap();
        rt.take_launched();
        b.linear(&x(&b, 1, 7168), &w).unwrap();
        let l = rt.take_launched();
        assert_eq!(l[0].0, "gemv1_fp8w");
        // 144 row groups × split warps, (256 / warp) warps per block
        assert_eq!(l[0].1 .0, blocks, "warp {warp}: split {split}");
        // routing: a block per token, a thread per expert in whole warps
        for (experts, threads) in [(16, warp), (100, 128), (256, 256)] {
            let gate = b.upload_linear(&HostLinear::from_f32("gate", experts, 7168, &vec![0.1; experts * 7168])).unwrap();
            let p = RouteParams { n_experts: experts, top_k: 2, n_group: 1, topk_group: 1, method: TopkMethod::Greedy, scoring: ScoringFunc::Softmax, norm_topk_prob: true, routed_scaling_factor: 1.0 };
            rt.take_launched();
            b.moe_route(&x(&b, 3, 7168), &gate, None, &p).unwrap();
            let route = rt.take_launched().pop().unwrap();
            assert_eq!((route.0.as_str(), route.1, route.2), ("moe_route", (3, 1, 1), threads as u32), "{experts} experts, warp {warp}");
        }
    }
}

#[test]
fn decode_attention_over_a_bf16_cache_takes_the_matrix_unit_kernel() {
    use crate::backend::{AttnSeq, MlaDims};
    let d = MlaDims { num_heads: 128, qk_nope: 128, qk_rope: 64, v_head: 128, kv_lora_rank: 512, scale: 0.1 };
    for bf16 in [true, false] {
        let (mut b, rt) = nvidia_like();
        b.attn_bf16 = bf16;
        // the KV pool is sized by the element bytes; a bf16 cache packs two latents a word
        assert_eq!(b.kv_element_bytes(), if bf16 { 2 } else { 4 });
        let mut kv = b.alloc_kv_cache(2, 1000, d.kv_entry()).unwrap();
        assert_eq!((kv.bf16, kv.buf.len()), (bf16, 2 * 1000 * 576 / if bf16 { 2 } else { 1 }));
        let slots: Vec<u32> = (0..1000).rev().collect();
        rt.take_launched();
        b.kv_write(&mut kv, 1, &slots[..3], &x(&b, 3, d.kv_entry())).unwrap();
        assert_eq!(names(&rt), vec![if bf16 { "kv_write_bf16" } else { "kv_write" }]);
        let kv_b = b.upload_linear(&fp8(128 * 256, 512)).unwrap();
        let q = x(&b, 1, 128 * d.qk_head());
        let seqs = [AttnSeq { q_start: 0, q_len: 1, slots: &slots }];
        b.mla_attention(&q, &kv, 1, &seqs, &kv_b, &d).unwrap();
        let l = rt.take_launched();
        let attn: Vec<_> = l.iter().filter(|x| x.0.starts_with("mla_attention") || x.0 == "mla_decode_mma").collect();
        if bf16 {
            // two 64-head groups × 2 splits fill the host runtime's 4 SMs; 16 warps a block
            assert_eq!((attn[0].0.as_str(), attn[0].1, attn[0].2), ("mla_decode_mma", (1, 2, 2), 512));
        } else {
            // the CUDA-core kernel: 32 blocks of 4 heads, the 1000 keys in 2 splits of ≥ 512
            assert_eq!(attn[0].0, "mla_attention4");
        }
        assert!(l.iter().any(|x| x.0 == "mla_merge"), "{l:?}");
    }
}

/// MLA's first projections at decode sizes: q_a and kv_a of one row are one GEMV launch
/// (`linear_pair`: 2,112 rows in 528 groups of 4, a block each with K split over 8 warps), and
/// q_a_layernorm folds into q_b's GEMV (`norm_linear`); at 2+ rows of FP8 the swap-AB kernel takes
/// each linear (the ops in turn), as it does weights of two formats; bf16 pairs up to 8 rows.
#[test]
fn decode_projections_pair_and_fold_the_norm() {
    use crate::backend::RopeSite;
    use crate::config::{Fields, RopeConfig, RopeTables};
    let (b, rt) = nvidia_like();
    let up = |w: HostLinear| b.upload_linear(&w).unwrap();
    let (qa, kva, qb) = (up(fp8(1536, 7168)), up(fp8(576, 7168)), up(fp8(3072, 1536)));
    let norm = x(&b, 1, 1536);
    rt.take_launched();
    let (q, kv) = b.linear_pair(&x(&b, 1, 7168), &qa, &kva).unwrap();
    assert_eq!((q.rows, q.cols, kv.rows, kv.cols), (1, 1536, 1, 576));
    let l = rt.take_launched();
    assert_eq!(l.iter().map(|(n, g, t)| (n.as_str(), *g, *t)).collect::<Vec<_>>(), [("gemv1_fp8w_pair", (528, 1, 1), 256)]);
    // the query's RoPE (3,072 rows: 16 heads of 192, the last 64 columns rotary) in the epilogue where interleaved, as its own launch otherwise
    let cfg = serde_json::json!({"rope_theta": 10000.0});
    for interleaved in [true, false] {
        let tables = RopeTables::new(&RopeConfig::parse(&Fields::new("t", &cfg).unwrap(), 64, 4096, interleaved).unwrap());
        let site = RopeSite { positions: &[5], heads: 16, head_stride: 192, offset: 128, tables: &tables };
        b.norm_linear(&q, &norm, 1e-6, &qb, Some(&site)).unwrap();
        assert_eq!(names(&rt), if interleaved { vec!["gemv1_fp8w_norm"] } else { vec!["gemv1_fp8w_norm", "rope"] }, "interleaved {interleaved}");
    }
    b.norm_linear(&q, &norm, 1e-6, &qb, None).unwrap();
    assert_eq!(names(&rt), ["gemv1_fp8w_norm"]);
    // with the new cache entries: the same launch, one tail block a row past q_b's 192 (768 groups
    // of 4 rows, K split over 2 warps: 4 groups a block); a slot list of another length (none: no
    // cache write): the ops
    {
        use crate::backend::{KvEntryOp, KvEntrySite};
        let tables = RopeTables::new(&RopeConfig::parse(&Fields::new("t", &cfg).unwrap(), 64, 4096, true).unwrap());
        let rope = RopeSite { positions: &[5], heads: 16, head_stride: 192, offset: 128, tables: &tables };
        let (mut kv, kv_norm) = (b.alloc_kv_cache(2, 16, 576).unwrap(), x(&b, 1, 512));
        for (slots, want) in [(&[3u32][..], vec![("gemv1_fp8w_norm_kv", (192 + 1, 1, 1))]), (&[][..], vec![("gemv1_fp8w_norm", (192, 1, 1)), ("rms_norm_cols", (1, 1, 1)), ("rope", (1, 1, 1))])] {
            let site = KvEntrySite { layer: 1, slots, positions: &[5], rope: &tables, offset: 512 };
            let mut latent = x(&b, 1, 576);
            let entry = KvEntryOp { latent: &mut latent, norm: &kv_norm, eps: 1e-6, kv: &mut kv, site: &site };
            b.norm_linear_kv_entry(&q, &norm, 1e-6, &qb, Some(&rope), entry).unwrap();
            assert_eq!(rt.take_launched().iter().map(|(n, g, _)| (n.as_str(), *g)).collect::<Vec<_>>(), want, "{} slots", slots.len());
        }
    }
    b.linear_pair(&x(&b, 2, 7168), &qa, &kva).unwrap();
    // (K split over the host runtime's 4 SMs, summed after)
    assert_eq!(names(&rt), ["linear_tc_fp8w", "linear_split_sum", "linear_tc_fp8w", "linear_split_sum"], "2 rows: swap-AB, one a weight");
    b.norm_linear(&x(&b, 2, 1536), &norm, 1e-6, &qb, None).unwrap();
    assert_eq!(names(&rt)[..2], ["rms_norm", "linear_tc_fp8w"]);
    let (ab, bb, fb) = (up(bf16(256, 512)), up(bf16(64, 512)), up(fp8(64, 512)));
    for (rows, want) in [(1, "gemv1_bf16w_pair"), (8, "gemv8_bf16w_pair")] {
        b.linear_pair(&x(&b, rows, 512), &ab, &bb).unwrap();
        assert_eq!(names(&rt), [want], "{rows} rows of bf16");
    }
    b.linear_pair(&x(&b, 9, 512), &ab, &bb).unwrap();
    assert_eq!(names(&rt), ["linear_mma_bf16w", "linear_split_sum", "linear_mma_bf16w", "linear_split_sum"], "9 rows: the tiles");
    b.linear_pair(&x(&b, 1, 512), &ab, &fb).unwrap();
    assert_eq!(names(&rt), ["gemv1_bf16w", "gemv1_fp8w"], "bf16 and FP8: two GEMVs");
}

/// The new tokens' MLA cache entries (norm, RoPE, cache write) are one launch where every row has
/// its slot and position, the three ops otherwise (a slot list of another length).
#[test]
fn mla_kv_entries_are_one_launch() {
    use crate::backend::KvEntrySite;
    use crate::config::{Fields, RopeConfig, RopeTables};
    let cfg = serde_json::json!({"rope_theta": 10000.0});
    let rope = RopeTables::new(&RopeConfig::parse(&Fields::new("t", &cfg).unwrap(), 64, 4096, true).unwrap());
    let slots: Vec<u32> = vec![7, 3, 9];
    let pos: Vec<u32> = vec![1, 2, 3];
    for bf16 in [false, true] {
        let (mut b, rt) = nvidia_like();
        b.attn_bf16 = bf16;
        let mut kv = b.alloc_kv_cache(2, 16, 576).unwrap();
        let norm = x(&b, 1, 512);
        let site = KvEntrySite { layer: 1, slots: &slots, positions: &pos, rope: &rope, offset: 512 };
        rt.take_launched();
        b.mla_kv_entry(&mut x(&b, 3, 576), &norm, 1e-6, &mut kv, &site).unwrap();
        let l = rt.take_launched();
        let kernel = if bf16 { "mla_kv_entry_bf16" } else { "mla_kv_entry" };
        assert_eq!(l.iter().map(|(n, g, t)| (n.as_str(), *g, *t)).collect::<Vec<_>>(), [(kernel, (3, 1, 1), 256)]);
        let two = KvEntrySite { slots: &slots[..2], ..site };
        b.mla_kv_entry(&mut x(&b, 3, 576), &norm, 1e-6, &mut kv, &two).unwrap();
        assert_eq!(names(&rt), ["rms_norm_cols", "rope", if bf16 { "kv_write_bf16" } else { "kv_write" }]);
    }
}

#[test]
fn decode_attention_of_a_rank_s_16_heads_takes_the_register_kernel() {
    use crate::backend::{AttnSeq, MlaDims};
    let d = MlaDims { num_heads: 16, qk_nope: 128, qk_rope: 64, v_head: 128, kv_lora_rank: 512, scale: 0.1 };
    let slots: Vec<u32> = (0..1000).rev().collect();
    // (max heads for the 16-head kernel, heads, expected kernel, grid, threads): V3's rank of 8 and
    // 128 heads in 8 groups when the threshold allows; 17 heads or threshold 0 keep the 64-head
    // tiles, and so does one token of V3's 128 heads on sm_90a (2 blocks before splits, fewer than
    // the 4 SMs: the warpgroup-MMA kernel is for batches of a block an SM, below)
    let cases = [(16, 16, "mla_decode_rows", (1, 1, 4), 256), (128, 128, "mla_decode_rows", (1, 8, 1), 256), (16, 17, "mla_decode_mma", (1, 1, 4), 512), (0, 16, "mla_decode_mma", (1, 1, 4), 512), (16, 128, "mla_decode_mma", (1, 2, 2), 512)];
    for (max_heads, heads, kernel, grid, threads) in cases {
        let (mut b, rt) = nvidia_like();
        (b.attn_bf16, b.matrix_units, b.tuned.mla_decode_rows_max_heads) = (true, true, max_heads);
        b.arch = "sm_90a".into();
        let d = MlaDims { num_heads: heads, ..d };
        let kv = b.alloc_kv_cache(2, 1000, d.kv_entry()).unwrap();
        let kv_b = b.upload_mla_kv_b(&fp8(heads * 256, 512), d.qk_nope, d.v_head).unwrap();
        let q = x(&b, 1, heads * d.qk_head());
        rt.take_launched();
        b.mla_attention(&q, &kv, 1, &[AttnSeq { q_start: 0, q_len: 1, slots: &slots }], &kv_b, &d).unwrap();
        let l = rt.take_launched();
        let attn: Vec<_> = l.iter().filter(|x| x.0.starts_with("mla_decode")).map(|x| (x.0.as_str(), x.1, x.2)).collect();
        // one token's 1000 keys: 4 splits of 250 fill the host runtime's 4 SMs in one wave
        assert_eq!(attn, vec![(kernel, grid, threads)], "max heads {max_heads}, {heads} heads");
        assert_eq!(l.iter().any(|x| x.0 == "mla_merge"), grid.2 > 1, "{l:?}");
    }
}

/// V3's attention (128 heads, FP8 kv_b) for two decode tokens of 1,000 and 300 keys on sm_90a:
/// the launches (with their arguments) of that call alone.
fn v3_two_token_decode(b: &mut GpuBackend<HostVendor>, rt: &HostRuntime) -> Vec<super::host_runtime::Named> {
    use crate::backend::{AttnSeq, MlaDims};
    let d = MlaDims { num_heads: 128, qk_nope: 128, qk_rope: 64, v_head: 128, kv_lora_rank: 512, scale: 0.1 };
    let slots: Vec<u32> = (0..1000).rev().collect();
    b.arch = "sm_90a".into();
    let kv = b.alloc_kv_cache(2, 1000, d.kv_entry()).unwrap();
    let kv_b = b.upload_mla_kv_b(&fp8(128 * 256, 512), d.qk_nope, d.v_head).unwrap();
    let q = x(b, 2, 128 * d.qk_head());
    let seqs = [AttnSeq { q_start: 0, q_len: 1, slots: &slots }, AttnSeq { q_start: 1, q_len: 1, slots: &slots[..300] }];
    rt.take_launched();
    b.mla_attention(&q, &kv, 1, &seqs, &kv_b, &d).unwrap();
    rt.take_launched_args()
}

/// V3's 128 heads on sm_90a: batches of at least a block an SM (2 tokens × 2 groups on the host
/// runtime's 4 SMs) take the warpgroup-MMA kernel, 256 threads and its shared memory, no split,
/// also where the 16-head kernel would take 128 heads (it goes first); tuned off, the 64-head
/// mma.sync tiles.
#[test]
fn decode_attention_batches_of_128_heads_take_the_warpgroup_kernel_on_sm90a() {
    for (wg, rows_max_heads, kernel, threads, smem) in [(true, 16, "mla_decode_wg", 256, super::mla_decode::WG_SHARED), (true, 128, "mla_decode_wg", 256, super::mla_decode::WG_SHARED), (false, 16, "mla_decode_mma", 512, 0)] {
        let (mut b, rt) = nvidia_like();
        (b.attn_bf16, b.matrix_units, b.tuned.mla_decode_wgmma, b.tuned.mla_decode_rows_max_heads) = (true, true, wg, rows_max_heads);
        let l = v3_two_token_decode(&mut b, &rt);
        let attn: Vec<_> = l.iter().filter(|x| x.0.starts_with("mla_decode")).map(|x| (x.0.as_str(), x.1, x.2)).collect();
        assert_eq!(attn, vec![(kernel, if wg { (4, 1, 1) } else { (2, 2, 1) }, threads)], "wgmma {wg}, 16-head kernel up to {rows_max_heads} heads");
        if wg {
            assert!(smem <= b.dev.max_shared_per_block(), "{smem} bytes of shared memory");
        }
    }
}

/// Where the warpgroup decode kernel runs and the heads kernel makes the queries' latents
/// (mla_heads.hip on NVIDIA sm_80+), those come as bf16 (`_by`) and the decode kernel gets their
/// buffer as its 16th argument; it writes its latents as bf16 (the 17th argument; the f32 output,
/// the 7th, null) for the latent → v projection's `_bx` form. Other decode kernels (the warpgroup
/// kernel tuned off) take and write f32 latents and have neither argument.
#[test]
fn warpgroup_decode_takes_and_writes_bf16_latents_around_the_heads_kernels() {
    for wg in [true, false] {
        let (mut b, rt) = nvidia_like();
        (b.attn_bf16, b.matrix_units, b.mma_gemm, b.tuned.mla_decode_wgmma, b.tuned.mla_decode_rows_max_heads, b.tuned.mla_proj_mma_min_rows) = (true, true, true, wg, 16, 2);
        let l = v3_two_token_decode(&mut b, &rt);
        let names: Vec<&str> = l.iter().map(|x| x.0.as_str()).filter(|n| n.starts_with("heads_mma") || n.starts_with("mla_decode")).collect();
        let (q_proj, decode, v_proj) = if wg { ("heads_mma_fp8w_m32_by", "mla_decode_wg", "heads_mma_fp8w_m32_bx") } else { ("heads_mma_fp8w_m32", "mla_decode_mma", "heads_mma_fp8w_m32") };
        assert_eq!(names, [q_proj, decode, v_proj], "wgmma {wg}");
        let args = |n: &str| l.iter().find(|x| x.0 == n).unwrap().3.clone();
        // the q projection's Y (argument 7) is what the decode kernel reads: its 16th argument
        // (after `smem`) for the warpgroup kernel, none for the mma.sync tiles (15 arguments);
        // the decode kernel's output (the 17th, bf16, or the 7th, f32) is the v projection's X
        let dec = args(decode);
        if wg {
            assert_eq!((dec.len(), dec[15], dec[6]), (17, args(q_proj)[7], 0));
            assert_eq!(dec[16], args(v_proj)[0]);
        } else {
            // (the two projections have one name here: the v projection is the last launch)
            let last = l.iter().rev().find(|x| x.0 == v_proj).unwrap();
            assert_eq!((dec.len(), dec[6]), (15, last.3[0]));
        }
    }
}

#[test]
fn prompts_take_the_flash_kernel_of_their_operands_and_head_size() {
    use crate::backend::{AttnSeq, MlaDims};
    let slots: Vec<u32> = (0..300).collect();
    // (bf16 operands, value head, kernel, grid, threads): bf16 with 16-column value fragments takes
    // the FlashAttention-2 form's 128-query blocks (300 queries: 3), hi + lo operands or 24-column
    // value heads mla_prefill.hip's 64-query blocks (5)
    // value heads of 128 on sm_90a take FlashAttention-3's form (same 128-query blocks, 3 warpgroups)
    // unless it is tuned off
    for (arch, wg, bf16, v_head, kernel, grid, threads) in [
        ("sm_90", true, true, 128, "mla_flash_bf16", (3, 16, 1), 256),
        ("sm_90a", true, true, 128, "mla_flash_wg", (3, 16, 1), 384),
        ("sm_90a", false, true, 128, "mla_flash_bf16", (3, 16, 1), 256),
        ("sm_90a", true, false, 128, "mla_flash_prefill", (5, 16, 1), 128),
        ("sm_90a", true, true, 24, "mla_flash_prefill", (5, 16, 1), 128),
    ] {
        let (mut b, rt) = nvidia_like();
        (b.attn_bf16, b.matrix_units, b.flash_prefill, b.arch, b.tuned.flash_wgmma) = (bf16, true, true, arch.into(), wg);
        let d = MlaDims { num_heads: 16, qk_nope: 128, qk_rope: 64, v_head, kv_lora_rank: 512, scale: 0.1 };
        let kv = b.alloc_kv_cache(2, 300, d.kv_entry()).unwrap();
        let kv_b = b.upload_mla_kv_b(&fp8(16 * (128 + v_head), 512), d.qk_nope, d.v_head).unwrap();
        let q = x(&b, 300, 16 * d.qk_head());
        rt.take_launched();
        b.mla_attention(&q, &kv, 1, &[AttnSeq { q_start: 0, q_len: 300, slots: &slots }], &kv_b, &d).unwrap();
        let l = rt.take_launched();
        let attn: Vec<_> = l.iter().filter(|x| x.0.starts_with("mla_flash")).map(|x| (x.0.as_str(), x.1, x.2)).collect();
        assert_eq!(attn, vec![(kernel, grid, threads)], "{arch} wg {wg} bf16 {bf16}, v_head {v_head}");
        // the context padded to 320 keys: the per-head keys and values laid out by 10 blocks of
        // 32 (hi + lo) or, bf16 alone, 5 of 64 in 16-byte pieces; FlashAttention-3's form reads
        // kv_b's product in place (no GEMM library here: its f32 product rounded to bf16, 320 ×
        // 4,096 values, 8 a thread) and the rotated parts' bf16 copy (320 × 64)
        if kernel == "mla_flash_wg" {
            assert!(!l.iter().any(|x| x.0.starts_with("mla_prefill_kv")), "{l:?}");
            let to_bf16: Vec<_> = l.iter().filter(|x| x.0 == "to_bf16").map(|x| x.1).collect();
            assert_eq!(to_bf16, [(640, 1, 1), (10, 1, 1)], "{l:?}");
        } else {
            let kv = if bf16 { ("mla_prefill_kv_bf16", (5, 16, 1)) } else { ("mla_prefill_kv", (10, 16, 1)) };
            assert!(l.iter().any(|x| (x.0.as_str(), x.1) == kv), "{l:?}");
        }
    }
}

#[test]
fn absorbed_projections_take_per_head_gemvs_then_gemms() {
    use crate::backend::{AttnSeq, MlaDims};
    let d = MlaDims { num_heads: 16, qk_nope: 128, qk_rope: 64, v_head: 128, kv_lora_rank: 512, scale: 0.1 };
    assert_eq!(host_backend().0.tuned.mla_proj_mma_min_rows, super::tuned::Tuned::default().mla_proj_mma_min_rows);
    // (the GEMM kernels on, the device an NVIDIA sm_80+ one: mla_heads.hip's kernel)
    for (matrix_units, sm80) in [(true, true), (true, false), (false, false)] {
        let (mut b, rt) = nvidia_like();
        (b.mma_gemm, b.matrix_units) = (matrix_units, sm80);
        // W_UK transposed: [16·512, 128] FP8 with 128 × 128 blocks
        let kv_b = b.upload_mla_kv_b(&fp8(16 * 256, 512), d.qk_nope, d.v_head).unwrap();
        assert_eq!(kv_b.wuk_t.as_ref().map(|w| (w.out, w.inp, w.wdt, w.bn, w.bk)), Some((16 * 512, 128, 2, 128, 128)));
        let kv = b.alloc_kv_cache(1, 64, d.kv_entry()).unwrap();
        let slots: Vec<u32> = (0..64).collect();
        b.tuned.mla_proj_mma_min_rows = 8;
        for t in [1, 7, 8, 20, 40] {
            let seqs: Vec<AttnSeq> = (0..t).map(|i| AttnSeq { q_start: i, q_len: 1, slots: &slots[..i + 1] }).collect();
            rt.take_launched();
            b.mla_attention(&x(&b, t, 16 * d.qk_head()), &kv, 0, &seqs, &kv_b, &d).unwrap();
            let l = rt.take_launched();
            let proj: Vec<_> = l.iter().filter(|x| x.0.starts_with("mla_q_latent") || x.0.starts_with("mla_out") || x.0.contains("heads")).map(|x| (x.0.as_str(), x.1)).collect();
            let want: Vec<(&str, (u32, u32, u32))> = match (matrix_units && t >= 8, t) {
                // 32-row blocks up to 32 tokens, then 64-row ones
                (true, _) if sm80 => {
                    let k = if t <= 32 { "heads_mma_fp8w_m32" } else { "heads_mma_fp8w_m64" };
                    vec![(k, (4, 1, 16)), (k, (1, 1, 16))]
                }
                // q → latent: 4 column tiles of 512 per head; latent → v: one 128-row tile per head;
                // 128-row scale blocks at 128-row heads: the folded-scale kernel
                (true, _) => vec![("linear_mma_heads_fold_fp8w", (4, 1, 16)), ("linear_mma_heads_fold_fp8w", (1, 1, 16))],
                // one token: four outputs a group; q → latent rows (K = 128) take 8 lanes a group,
                // 32 groups a block (16·512 / 4 / 32 blocks), latent → v rows (K = 512) a warp each
                // (16·128 / 4 / 8 blocks)
                (false, 1) => vec![("gemv1_fp8w_heads", (64, 1, 1)), ("gemv1_fp8w_heads", (64, 1, 1))],
                // up to 8 tokens a launch, two outputs a group
                (false, _) => {
                    let slices = t.div_ceil(8);
                    let mut v = vec![("gemv8_fp8w_heads", (128, 1, 1)); slices];
                    v.extend(vec![("gemv8_fp8w_heads", (128, 1, 1)); slices]);
                    v
                }
            };
            assert_eq!(proj, want, "{t} tokens, matrix units {matrix_units}, sm_80+ {sm80}");
        }
    }
}
