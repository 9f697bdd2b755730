//! `engine bench`: one-batch latency and throughput (like SGLang's bench_one_batch). For each batch
//! size: prefill `batch × input_len` random tokens in one forward, then decode `output_len` steps
//! of one token per sequence (greedy), timing every step with a device synchronisation. Reports
//! prefill tok/s, decode tok/s and per-step latency (median and p90 after warm-up). As SGLang's
//! bench_one_batch does, CUDA graphs are captured up to the largest batch size benchmarked (unless
//! --cuda-graph-max-bs or --disable-cuda-graph says otherwise); `--profile` re-runs the decode steps op by op with GPU events, after the
//! timed ones, so the timings are not those of profiled steps: once with events around every op
//! (time per op class), once with events at the layer boundaries only (time per layer).
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;

use crate::backend::gpu::backend::{GpuBackend, GpuVendor};
use crate::backend::{AttnSeq, Backend, BackendKind, SampleRow, TensorShape};
use crate::model::{launch, ForwardBatch, Model, Role};
use crate::sampling::{Rng, SamplingParams};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchOneBatchArgs {
    #[arg(long)]
    pub model_path: Option<PathBuf>,
    #[command(flatten)]
    pub backend: crate::cli::BackendArgs,
    /// Batch sizes, comma-separated
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub batch_size: Vec<usize>,
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    #[arg(long, default_value_t = 32)]
    pub output_len: usize,
    /// Decode steps excluded from the statistics
    #[arg(long, default_value_t = 2)]
    pub warmup_steps: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long)]
    pub json: bool,
    /// Time per op class and per layer over the decode steps (and a prefill), from GPU events
    /// (CUDA / ROCm backends)
    #[arg(long)]
    pub profile: bool,
    /// With --profile: time each linear layer shape on its own ("dense GEMM MxNxK")
    #[arg(long)]
    pub profile_by_shape: bool,
    #[command(flatten)]
    pub dist: crate::dist::DistArgs,
}

/// Profiling hooks around the decode loop: start, then per-class milliseconds at the end, and the
/// distinct experts of each routing call while profiling (MoE checkpoints on the GPU).
pub struct ProfileHooks<'a> {
    pub profiling: bool,
    pub start: &'a dyn Fn(),
    pub finish: &'a dyn Fn() -> Option<Vec<(&'static str, f64)>>,
    pub routed: &'a dyn Fn() -> Vec<usize>,
    /// Starts timing layers alone (`Backend::mark_layer`'s spans, steps op by op, no op events)
    pub start_layers: &'a dyn Fn(),
    /// ... stops, and the milliseconds per layer since `start_layers`
    pub layers: &'a dyn Fn() -> Vec<f64>,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

fn bench_model<B: Backend>(model: &Model<B>, a: &BenchOneBatchArgs, hooks: &ProfileHooks) -> Result<Vec<serde_json::Value>, Box<dyn std::error::Error + Send + Sync>> {
    let vocab = model.cfg.vocab_size as u64;
    let mut rows = Vec::new();
    let dp = model.dp_size();
    for &bs in &a.batch_size {
        let per_seq = a.input_len + a.output_len;
        // sequence s runs on DP-attention rank s % dp, in that rank's own KV pool (dp = 1: all on one)
        let mut kv = model.alloc_kv_cache(bs.div_ceil(dp) * per_seq)?;
        let mut rng = Rng::new(a.seed ^ bs as u64);
        let slots: Vec<Vec<u32>> = (0..bs).map(|s| (((s / dp) * per_seq) as u32..((s / dp + 1) * per_seq) as u32).collect()).collect();
        let ranks: Vec<Vec<usize>> = (0..dp).map(|r| (r..bs).step_by(dp).collect()).collect();
        // logits come back rank by rank: this is the sequence order of their rows
        let order: Vec<usize> = ranks.iter().flatten().copied().collect();
        let prompt: Vec<Vec<u32>> = (0..bs).map(|_| (0..a.input_len).map(|_| 3 + (rng.next_u64() % (vocab - 3)) as u32).collect()).collect();
        // one forward: sequence s computes `new[s]` at positions `start ..`, logits at its last token
        let greedy = SamplingParams { temperature: 0.0, ..Default::default() };
        // one forward and the greedy next token of every sequence (in rank order)
        let step = |kv: &mut B::KvCache, new: &[Vec<u32>], start: usize| -> Result<Vec<u32>, crate::model::ModelError> {
            let parts: Vec<(Vec<u32>, Vec<u32>, Vec<u32>)> = ranks
                .iter()
                .map(|seqs| {
                    let tokens: Vec<u32> = seqs.iter().flat_map(|&s| new[s].iter().copied()).collect();
                    let positions: Vec<u32> = seqs.iter().flat_map(|&s| (start..start + new[s].len()).map(|p| p as u32)).collect();
                    let mut end = 0;
                    let last: Vec<u32> = seqs.iter().map(|&s| { end += new[s].len(); (end - 1) as u32 }).collect();
                    (tokens, positions, last)
                })
                .collect();
            let attn: Vec<Vec<AttnSeq>> = ranks
                .iter()
                .map(|seqs| {
                    let mut q = 0;
                    seqs.iter().map(|&s| { let n = new[s].len(); q += n; AttnSeq { q_start: q - n, q_len: n, slots: &slots[s][..start + n] } }).collect()
                })
                .collect();
            let batches: Vec<ForwardBatch> = parts.iter().zip(&attn).map(|(p, q)| ForwardBatch { tokens: &p.0, positions: &p.1, seqs: q, logit_rows: &p.2 }).collect();
            let mut logits = if dp == 1 { model.forward(kv, &batches[0])? } else { model.forward_dp(kv, &batches)? };
            // greedy on the device where the backend samples there (as the server does), else on the host
            let rows: Vec<SampleRow> = (0..logits.rows()).map(|_| SampleRow { params: &greedy, penalties: vec![], uniform: 0.0 }).collect();
            if let Some(ids) = model.backend.sample(&mut logits, &rows)? {
                return Ok(ids);
            }
            let v = model.backend.download(&logits)?;
            Ok(v.chunks(vocab as usize).map(crate::sampling::argmax).collect())
        };
        // a warm-up prefill first (as SGLang's bench_one_batch warms up): one-time costs — kernel
        // loads, GEMM-library plans for the prompt's shapes, memory-pool growth — stay out of the
        // timed one; timed without events; with --profile a third, identical prefill is profiled
        step(&mut kv, &prompt, 0)?;
        let t0 = Instant::now();
        let mut l = step(&mut kv, &prompt, 0)?;
        let prefill_s = t0.elapsed().as_secs_f64();
        let prefill_profile = if hooks.profiling {
            (hooks.start)();
            step(&mut kv, &prompt, 0)?;
            let p = (hooks.finish)().map(|v| json!(v.iter().map(|(k, ms)| (k.to_string(), json!(ms))).collect::<serde_json::Map<_, _>>()));
            (hooks.routed)(); // (the prompt's routing: not a decode step's)
            // and once more with only the layers timed
            (hooks.start_layers)();
            step(&mut kv, &prompt, 0)?;
            p.map(|p| (p, (hooks.layers)()))
        } else {
            None
        };
        let (prefill_profile, prefill_layers) = prefill_profile.unzip();
        // one decode step: each sequence's last token (`l`, in rank order) at position input_len + i
        let decode = |kv: &mut B::KvCache, l: &[u32], i: usize| {
            let mut next = vec![Vec::new(); bs];
            for (&id, &s) in l.iter().zip(&order) {
                next[s] = vec![id];
            }
            step(kv, &next, a.input_len + i)
        };
        let mut steps = Vec::new();
        let first = l.clone();
        for i in 0..a.output_len {
            let t = Instant::now();
            l = decode(&mut kv, &l, i)?;
            steps.push(t.elapsed().as_secs_f64());
        }
        // the same decode steps again from the first step's tokens (they rewrite the same KV slots)
        let replay = |kv: &mut B::KvCache| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            let mut l = first.clone();
            for i in 0..a.output_len {
                l = decode(kv, &l, i)?;
            }
            Ok(())
        };
        // ... profiled
        if hooks.profiling {
            (hooks.start)();
            replay(&mut kv)?;
        }
        let profile = (hooks.finish)().map(|v| {
            let per_step: serde_json::Map<String, serde_json::Value> = v.iter().map(|(k, ms)| (k.to_string(), json!(ms / a.output_len.max(1) as f64))).collect();
            serde_json::Value::Object(per_step)
        });
        // then the same steps once more with only the layers timed: each layer's time a step (its
        // span from its mark to the next: add + norm of the previous MLP output, attention, MLP),
        // op by op without the op events
        let layers: Option<Vec<f64>> = if hooks.profiling {
            (hooks.start_layers)();
            replay(&mut kv)?;
            Some((hooks.layers)().iter().map(|ms| ms / a.output_len.max(1) as f64).collect())
        } else {
            None
        };
        // the experts a MoE layer's decode step touched, measured (mean over layers and steps)
        let routed = (hooks.routed)();
        let distinct = (!routed.is_empty()).then(|| routed.iter().sum::<usize>() as f64 / routed.len() as f64);
        let mut s: Vec<f64> = steps.iter().skip(a.warmup_steps.min(steps.len().saturating_sub(1))).copied().collect();
        s.sort_by(|x, y| x.partial_cmp(y).unwrap());
        let med = pct(&s, 0.5);
        // the all-reduce a decode step of this batch does (2 per layer + the embedding): [bs, hidden] f32
        let comm = if model.backend.tp_group().1 > 1 {
            let elems = bs * model.cfg.hidden_size;
            let secs = model.comm_bench(elems, 50)?;
            let n = model.backend.tp_group().1 as f64;
            let bytes = (elems * 4) as f64;
            json!({"bytes": elems * 4, "latency_us": secs * 1e6, "bus_gb_s": 2.0 * (n - 1.0) / n * bytes / secs / 1e9,
                   // two per layer and one for the vocabulary-parallel embedding
                   "per_decode_step_ms": secs * 1e3 * (2.0 * model.num_layers() as f64 + 1.0)})
        } else {
            serde_json::Value::Null
        };
        rows.push(json!({
            "all_reduce": comm,
            "batch_size": bs, "input_len": a.input_len, "output_len": a.output_len,
            "prefill_s": prefill_s, "prefill_tok_s": (bs * a.input_len) as f64 / prefill_s,
            "decode_step_median_ms": med * 1e3, "decode_step_p90_ms": pct(&s, 0.9) * 1e3,
            "decode_tok_s": bs as f64 / med.max(1e-12), "decode_steps_measured": s.len(),
            "decode_profile_ms_per_step": profile, "prefill_profile_ms": prefill_profile,
            "decode_layer_ms_per_step": layers, "prefill_layer_ms": prefill_layers,
            "moe_distinct_experts": distinct,
        }));
    }
    Ok(rows)
}

pub fn run(a: BenchOneBatchArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let path = crate::cli::model_path_or_demo(&a.model_path)?;
    let kind = a.backend.backend.resolve()?;
    let t = Instant::now();
    let par = a.dist.validate()?;
    // (results, backend, kernels, seconds until weights and kernels were ready on every rank, checkpoint bytes, graph status)
    let (rows, backend, kernels, load_s, weight_bytes, graphs) = match kind {
        BackendKind::Cuda => match bench_gpu::<crate::backend::cuda::Cuda>(&a, &path, &par, t)? {
            Some(r) => r,
            None => return Ok(()),
        },
        BackendKind::Rocm => match bench_gpu::<crate::backend::rocm::Rocm>(&a, &path, &par, t)? {
            Some(r) => r,
            None => return Ok(()),
        },
        _ => {
            if a.profile {
                log::warn!("--profile times GPU events; the CPU backend has none, so no profile is printed");
            }
            let model = match launch::<crate::backend::cpu::CpuBackend>(&path, &par, a.backend.load_format, a.backend.device_opts(0))? {
                Role::Lead(m) => m,
                Role::FollowerDone => return Ok(()),
            };
            let load_s = t.elapsed().as_secs_f64();
            let rows = bench_model(&model, &a, &ProfileHooks { profiling: false, start: &|| {}, finish: &|| None, routed: &Vec::new, start_layers: &|| {}, layers: &Vec::new });
            model.stop_followers();
            (rows?, "cpu", json!(null), load_s, model.checkpoint_bytes, json!(null))
        }
    };
    let out = json!({"model_path": path.display().to_string(), "backend": backend, "load_s": load_s, "checkpoint_bytes": weight_bytes, "tp_size": par.world, "dp_attention": par.dp_attention, "ep_size": par.ep_size(), "nnodes": par.nnodes, "load_and_bench_s": t.elapsed().as_secs_f64(),
                     "kernels": kernels, "graphs": graphs, "results": rows});
    if a.json {
        println!("{out}");
    } else {
        println!("model {} on {backend} (tp {}, ep {}, dp attention {}, nnodes {}); kernels {}; graphs {}", path.display(), out["tp_size"], out["ep_size"], out["dp_attention"], out["nnodes"], out["kernels"], out["graphs"]);
        let (secs, gb) = (load_s, weight_bytes as f64 / 1e9);
        println!("loaded {gb:.1} GB in {secs:.2}s ({:.2} GB/s over all ranks)", gb / secs.max(1e-9));
        println!("{:>6} {:>6} {:>6} {:>12} {:>14} {:>14} {:>12}", "batch", "in", "out", "prefill tok/s", "step med ms", "step p90 ms", "decode tok/s");
        for r in out["results"].as_array().unwrap() {
            println!(
                "{:>6} {:>6} {:>6} {:>12.1} {:>14.3} {:>14.3} {:>12.1}",
                r["batch_size"].as_u64().unwrap(), r["input_len"].as_u64().unwrap(), r["output_len"].as_u64().unwrap(), r["prefill_tok_s"].as_f64().unwrap(), r["decode_step_median_ms"].as_f64().unwrap(),
                r["decode_step_p90_ms"].as_f64().unwrap(), r["decode_tok_s"].as_f64().unwrap()
            );
            if r["all_reduce"].is_object() {
                let c = &r["all_reduce"];
                println!(
                    "        all-reduce of {} bytes: {:.1} us ({:.1} GB/s bus), {:.3} ms per decode step",
                    c["bytes"], c["latency_us"].as_f64().unwrap_or(0.0), c["bus_gb_s"].as_f64().unwrap_or(0.0), c["per_decode_step_ms"].as_f64().unwrap_or(0.0)
                );
            }
            print_profile("decode ms/step by op class (the steps re-run op by op, profiled)", &r["decode_profile_ms_per_step"]);
            print_layers("decode ms/step by layer (the steps re-run op by op, layers timed)", &r["decode_layer_ms_per_step"]);
            if let Some(d) = r["moe_distinct_experts"].as_f64() {
                println!("        MoE experts a layer's decode step touched (measured in the profiled steps): {d:.1}");
            }
            print_profile("prefill ms by op class (another prefill, profiled)", &r["prefill_profile_ms"]);
        }
    }
    Ok(())
}

/// One line of "layer ms" pairs, in layer order.
fn print_layers(title: &str, p: &serde_json::Value) {
    let Some(v) = p.as_array().filter(|v| !v.is_empty()) else { return };
    let parts: Vec<String> = v.iter().enumerate().map(|(i, ms)| format!("{i} {:.3}", ms.as_f64().unwrap_or(0.0))).collect();
    println!("        {title}: {}", parts.join(", "));
}

/// One line of "op class ms" pairs, largest first.
fn print_profile(title: &str, p: &serde_json::Value) {
    let Some(p) = p.as_object() else { return };
    let mut v: Vec<(&String, f64)> = p.iter().map(|(k, x)| (k, x.as_f64().unwrap_or(0.0))).collect();
    v.sort_by(|x, y| y.1.total_cmp(&x.1));
    let parts: Vec<String> = v.iter().map(|(k, ms)| format!("{k} {ms:.3}")).collect();
    println!("        {title}: {}", parts.join(", "));
}

/// What one backend's run gives the report: (results, backend, kernels, seconds until weights and
/// kernels were ready on every rank, checkpoint bytes, graph status).
type BenchRun = (Vec<serde_json::Value>, &'static str, serde_json::Value, f64, u64, serde_json::Value);

/// The benchmark on a GPU backend (None: this process was a follower node and is done).
fn bench_gpu<V: GpuVendor>(a: &BenchOneBatchArgs, path: &std::path::Path, par: &crate::dist::ParallelConfig, t: Instant) -> Result<Option<BenchRun>, Box<dyn std::error::Error + Send + Sync>> {
    // as SGLang's bench_one_batch: graphs up to the largest batch measured unless told otherwise
    let graph_max_bs = a.backend.graph_max_bs_or(a.batch_size.iter().copied().max().unwrap_or(1));
    let model = match launch::<GpuBackend<V>>(path, par, a.backend.load_format, a.backend.device_opts(graph_max_bs))? {
        Role::Lead(m) => Arc::new(m),
        Role::FollowerDone => return Ok(None),
    };
    model.backend.warmup(crate::backend::gpu::ModelDims::of(&model.cfg))?;
    let load_s = t.elapsed().as_secs_f64();
    let (hits, compiles) = model.backend.jit.stats();
    let k = json!({"cache_dir": model.backend.jit.cache.dir.display().to_string(), "cache_hits": hits, "compiled": compiles, "device": model.backend.device_name, "arch": model.backend.arch, "fp8_activations": if model.backend.fp8_act { "dynamic" } else { "f32" }});
    let b = &model.backend;
    b.profile.by_shape.store(a.profile_by_shape, std::sync::atomic::Ordering::Relaxed);
    let start = || b.profile.enabled.store(a.profile, std::sync::atomic::Ordering::Relaxed);
    let finish = || {
        b.profile.enabled.store(false, std::sync::atomic::Ordering::Relaxed);
        if a.profile { b.take_profile().ok() } else { None }
    };
    let routed = || b.take_routed_experts();
    let start_layers = || b.profile.layers.store(true, std::sync::atomic::Ordering::Relaxed);
    let layers = || {
        b.profile.layers.store(false, std::sync::atomic::Ordering::Relaxed);
        b.take_layer_profile().unwrap_or_default()
    };
    let rows = bench_model(&model, a, &ProfileHooks { profiling: a.profile, start: &start, finish: &finish, routed: &routed, start_layers: &start_layers, layers: &layers });
    model.stop_followers();
    let (captured, replays, failed) = b.graph_stats();
    let graphs = json!({"max_bs": graph_max_bs, "captured": captured, "replays": replays, "capture_failed": failed, "graph_mem_mib": b.graph_mem_reserved() >> 20});
    Ok(Some((rows?, V::NAME, k, load_s, model.checkpoint_bytes, graphs)))
}
