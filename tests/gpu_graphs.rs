//! CUDA graphs of the decode step against the same steps run op by op. Needs a GPU: `#[ignore]`d
//! (reported as ignored, never as passed); run with
//! `ENGINE_TEST_BACKEND=cuda cargo test --release --test gpu_graphs -- --ignored` (or `=rocm`).
mod common;

use engine::backend::gpu::backend::{GpuBackend, GpuVendor};
use engine::backend::{AttnSeq, Backend, TensorShape};
use engine::model::{ForwardBatch, Model};
use engine::sampling::{argmax, Rng};

fn backend<V: GpuVendor>(graph_max_bs: usize) -> GpuBackend<V> {
    std::env::set_var("ENGINE_GPU_POISON", "1");
    let mut b = GpuBackend::<V>::new(0).unwrap_or_else(|e| panic!("{} backend: {e}", V::NAME));
    b.set_graph_max_bs(graph_max_bs);
    b
}

/// ‖a − b‖ / ‖b‖ in f64.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut d, mut n) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        assert!(x.is_finite(), "non-finite output");
        d += (*x as f64 - *y as f64).powi(2);
        n += (*y as f64).powi(2);
    }
    (d / n.max(1e-30)).sqrt()
}

type Kv<V> = <GpuBackend<V> as Backend>::KvCache;

/// `bs` sequences with the given context lengths: one prefill of all prompts, then `steps` greedy
/// decode steps on both models in lockstep (the eager model's tokens feed both), each over its own
/// KV cache (slots from 0). Returns the largest relative difference of the decode logits.
#[allow(clippy::too_many_arguments)]
fn run<V: GpuVendor>(eager: &Model<GpuBackend<V>>, graph: &Model<GpuBackend<V>>, kv_e: &mut Kv<V>, kv_g: &mut Kv<V>, lens: &[usize], steps: usize, seed: u64) -> f64 {
    let bs = lens.len();
    let vocab = eager.cfg.vocab_size;
    let mut rng = Rng::new(seed);
    let cap: Vec<usize> = lens.iter().map(|l| l + steps).collect();
    // sequence s owns slots base[s] .. base[s] + cap[s]; slot order is reversed within each to
    // show the kernels follow the slot lists, not positions
    let mut base = 0;
    let slots: Vec<Vec<u32>> = cap
        .iter()
        .map(|&c| {
            let v: Vec<u32> = (base..base + c).rev().map(|x| x as u32).collect();
            base += c;
            v
        })
        .collect();
    let prompts: Vec<Vec<u32>> = lens.iter().map(|&l| (0..l).map(|_| (rng.next_u64() % vocab as u64) as u32).collect()).collect();
    let tokens: Vec<u32> = prompts.concat();
    let positions: Vec<u32> = lens.iter().flat_map(|&l| 0..l as u32).collect();
    let mut q = 0;
    let seqs: Vec<AttnSeq> = lens
        .iter()
        .enumerate()
        .map(|(s, &l)| {
            q += l;
            AttnSeq { q_start: q - l, q_len: l, slots: &slots[s][..l] }
        })
        .collect();
    let mut end = 0;
    let last: Vec<u32> = lens.iter().map(|&l| { end += l; (end - 1) as u32 }).collect();
    let pre = ForwardBatch { tokens: &tokens, positions: &positions, seqs: &seqs, logit_rows: &last };
    let le = eager.backend.download(&eager.forward(kv_e, &pre).unwrap()).unwrap();
    let lg = graph.backend.download(&graph.forward(kv_g, &pre).unwrap()).unwrap();
    assert_eq!(le, lg, "prefill runs op by op in both");
    let mut next: Vec<u32> = le.chunks(vocab).map(argmax).collect();
    let mut worst = 0f64;
    for i in 0..steps {
        let pos: Vec<u32> = lens.iter().map(|&l| (l + i) as u32).collect();
        let seqs: Vec<AttnSeq> = (0..bs).map(|s| AttnSeq { q_start: s, q_len: 1, slots: &slots[s][..lens[s] + i + 1] }).collect();
        let rows: Vec<u32> = (0..bs as u32).collect();
        let b = ForwardBatch { tokens: &next, positions: &pos, seqs: &seqs, logit_rows: &rows };
        let e = eager.forward(kv_e, &b).unwrap();
        let g = graph.forward(kv_g, &b).unwrap();
        assert_eq!((g.rows(), g.cols()), (bs, vocab), "a graph step returns the real rows only");
        let (e, g) = (eager.backend.download(&e).unwrap(), graph.backend.download(&g).unwrap());
        worst = worst.max(rel_err(&g, &e));
        next = e.chunks(vocab).map(argmax).collect();
    }
    worst
}

/// Graph steps (padded to the capture sizes, fixed attention splits) give the eager steps' logits
/// within 1e-5, also when a graph captured for one batch replays another's; batches beyond
/// --cuda-graph-max-bs run op by op and match bit for bit; a context that outgrows the step arena,
/// and a step on another KV cache, capture anew.
#[test]
#[ignore = "needs a GPU: ENGINE_TEST_BACKEND=cuda (or rocm) ... -- --ignored"]
fn decode_graphs_replay_the_eager_steps() {
    common::on_gpu!(decode_graphs_replay_the_eager_steps_on)
}

fn decode_graphs_replay_the_eager_steps_on<V: GpuVendor>() {
    let dir = common::golden_dir("tiny_v3_fp8");
    let eager = Model::load(backend::<V>(0), &dir).unwrap();
    let graph = Model::load(backend::<V>(16), &dir).unwrap();
    let slots = 16 * 4210;
    let (mut kv_e, mut kv_g) = (eager.alloc_kv_cache(slots).unwrap(), graph.alloc_kv_cache(slots).unwrap());
    // sizes 1, 4 (3 padded) and 16 (9 padded) are captured; 16 real rows replay the 16-row graph
    // captured on the 9-row batch
    for (lens, seed) in [(vec![7], 1), (vec![3, 40, 700], 2), (vec![9; 9], 3), (vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 600], 4)] {
        let worst = run(&eager, &graph, &mut kv_e, &mut kv_g, &lens, 6, seed);
        eprintln!("batch {} (contexts {:?}): max relative difference {worst:.2e}", lens.len(), &lens[..lens.len().min(4)]);
        assert!(worst <= 1e-5, "batch {}: {worst}", lens.len());
    }
    let (captured, replays, failed) = graph.backend.graph_stats();
    assert_eq!(failed, None);
    assert_eq!(captured, 3, "captures");
    // every decode step after the first of its size replays: 5 + 5 + 5, and all 6 of batch 16
    assert_eq!(replays, 21, "replays");
    // beyond the largest size: op by op, identical
    let worst = run(&eager, &graph, &mut kv_e, &mut kv_g, &[5; 17], 3, 5);
    assert_eq!(worst, 0.0, "17 sequences run op by op in both");
    assert_eq!(graph.backend.graph_stats().1, replays, "no replay beyond --cuda-graph-max-bs");
    // 16 contexts of 4,200 tokens outgrow the initial arena (65,536 indices): recapture, still equal
    let worst = run(&eager, &graph, &mut kv_e, &mut kv_g, &[4200; 16], 3, 6);
    assert!(worst <= 1e-5, "long contexts: {worst}");
    assert_eq!(graph.backend.graph_stats().0, 4, "the 16-row graph was captured again for the larger arena");
    // another KV cache: the graphs hold the old one's address, so batch 1 is captured anew
    let (mut kv_e2, mut kv_g2) = (eager.alloc_kv_cache(64).unwrap(), graph.alloc_kv_cache(64).unwrap());
    let worst = run(&eager, &graph, &mut kv_e2, &mut kv_g2, &[20], 4, 7);
    assert!(worst <= 1e-5, "new KV cache: {worst}");
    let (captured, replays2, _) = graph.backend.graph_stats();
    assert_eq!((captured, replays2), (5, replays + 2 + 3), "recaptured for the new cache");
}

/// The same with `--fp8-activations dynamic`'s attention (`attn_bf16`: the matrix-unit decode
/// kernel, whose graph steps launch a fixed, SM-filling number of context splits while eager steps
/// cut by context length): graph and eager logits agree to the bf16 kernel's rounding (the
/// softmax's bf16 probabilities are taken against different running maxima when the splits
/// differ), and at 1e-5 where every context fits one split in both.
#[test]
#[ignore = "needs a GPU: ENGINE_TEST_BACKEND=cuda (or rocm) ... -- --ignored"]
fn decode_graphs_with_matrix_unit_attention() {
    common::on_gpu!(decode_graphs_with_matrix_unit_attention_on)
}

fn decode_graphs_with_matrix_unit_attention_on<V: GpuVendor>() {
    let dir = common::golden_dir("tiny_v3_fp8");
    let bf16 = |max_bs| {
        let mut b = backend::<V>(max_bs);
        b.attn_bf16 = true;
        b
    };
    let eager = Model::load(bf16(0), &dir).unwrap();
    let graph = Model::load(bf16(16), &dir).unwrap();
    let (mut kv_e, mut kv_g) = (eager.alloc_kv_cache(16 * 2100).unwrap(), graph.alloc_kv_cache(16 * 2100).unwrap());
    for (lens, seed, tol) in [(vec![7], 11, 1e-5), (vec![3, 40, 50], 12, 1e-5), (vec![2000], 13, 5e-3), (vec![9, 1500, 30, 2000, 5, 6, 7, 8, 9], 14, 5e-3)] {
        let worst = run(&eager, &graph, &mut kv_e, &mut kv_g, &lens, 4, seed);
        eprintln!("bf16 attention, batch {} (contexts {:?}): max relative difference {worst:.2e}", lens.len(), &lens[..lens.len().min(4)]);
        assert!(worst <= tol, "batch {}: {worst} > {tol}", lens.len());
    }
    assert_eq!(graph.backend.graph_stats().2, None);
}
