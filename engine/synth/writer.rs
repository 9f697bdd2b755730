//! Writes a synthetic checkpoint in the official layout: config.json, one safetensors shard per
//! decoder layer (plus embeddings, head and MTP shards), model.safetensors.index.json, tokenizer files.
use std::path::Path;

use rayon::prelude::*;
use serde_json::json;

use super::{f32_to_fp8_e4m3fn, preset_config, Preset};
use crate::config::ModelConfig;
use crate::sampling::Rng;
use crate::weights::{write_safetensors_with, DType};

pub struct GenOptions {
    pub preset: Preset,
    pub layers: Option<usize>,
    pub seed: u64,
    /// One rank's shapes of an N-way tensor-parallel group (1: the whole model)
    pub tp_rank_shapes: usize,
}

/// How a tensor's values are drawn.
#[derive(Clone, Copy)]
enum Init {
    /// Linear weight [out, in]: N(0, 1/in); FP8 with per-block scales when the checkpoint is quantised.
    Linear { fp8: bool },
    /// Norm weight: 1 + N(0, 0.1²).
    Norm,
    /// Embedding: N(0, 1).
    Embed,
    /// Routing bias: N(0, 0.1²), float32.
    Bias,
}

struct Spec {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

fn name_seed(seed: u64, name: &str) -> u64 {
    name.bytes().fold(seed ^ 0xcbf29ce484222325, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

/// N(0,1) quantiles at the 256 byte values, as FP8 codes: random bytes through this table give
/// normal-looking FP8 weights at memory speed.
fn fp8_normal_table() -> [u8; 256] {
    let mut t = [0u8; 256];
    for (i, v) in t.iter_mut().enumerate() {
        // inverse normal CDF by bisection on erf-free logistic approximation refined numerically
        let p = (i as f64 + 0.5) / 256.0;
        let (mut lo, mut hi) = (-8.0f64, 8.0f64);
        for _ in 0..60 {
            let mid = 0.5 * (lo + hi);
            if normal_cdf(mid) < p {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        *v = f32_to_fp8_e4m3fn((0.5 * (lo + hi)) as f32);
    }
    t
}

fn normal_cdf(x: f64) -> f64 {
    // Abramowitz–Stegun 7.1.26 erf, accurate to 1.5e-7: plenty for a weight distribution.
    let z = x.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.3275911 * z);
    let y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * (-z * z).exp();
    0.5 * (1.0 + if x >= 0.0 { y } else { -y })
}

const CHUNK: usize = 1 << 20;

/// Elements of a tensor from independent per-chunk generators (parallel, reproducible).
fn fill_f32(seed: u64, n: usize, f: impl Fn(&mut Rng) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
        let mut rng = Rng::new(seed.wrapping_add(c as u64 * 0x9e3779b97f4a7c15));
        chunk.iter_mut().for_each(|x| *x = f(&mut rng));
    });
    out
}

fn to_bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.par_iter().flat_map_iter(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes()).collect()
}

fn tensor_bytes(spec: &Spec, dtype: DType, seed: u64, table: &[u8; 256]) -> Vec<u8> {
    let s = name_seed(seed, &spec.name);
    let n: usize = spec.shape.iter().product();
    match (spec.init, dtype) {
        (Init::Linear { .. }, DType::F8E4M3) => {
            let mut out = vec![0u8; n];
            out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
                let mut rng = Rng::new(s.wrapping_add(c as u64 * 0x9e3779b97f4a7c15));
                for w in chunk.chunks_mut(8) {
                    let r = rng.next_u64().to_le_bytes();
                    w.iter_mut().zip(r).for_each(|(d, b)| *d = table[b as usize]);
                }
            });
            out
        }
        (Init::Linear { .. }, _) => {
            let std = (spec.shape[1] as f32).powf(-0.5);
            to_bf16_bytes(&fill_f32(s, n, |r| r.normal() * std))
        }
        (Init::Norm, _) => to_bf16_bytes(&fill_f32(s, n, |r| 1.0 + 0.1 * r.normal())),
        (Init::Embed, _) => to_bf16_bytes(&fill_f32(s, n, |r| r.normal())),
        (Init::Bias, _) => fill_f32(s, n, |r| 0.1 * r.normal()).iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn layer_specs(c: &ModelConfig, i: usize, fp8: bool) -> Vec<Spec> {
    let (hs, h) = (c.hidden_size, c.num_attention_heads);
    let p = format!("model.layers.{i}");
    let lin = |name: String, out: usize, inp: usize| Spec { name, shape: vec![out, inp], init: Init::Linear { fp8 } };
    let norm = |name: String, n: usize| Spec { name, shape: vec![n], init: Init::Norm };
    let mut v = vec![norm(format!("{p}.input_layernorm.weight"), hs), norm(format!("{p}.post_attention_layernorm.weight"), hs)];
    let a = format!("{p}.self_attn");
    match c.q_lora_rank {
        Some(r) => {
            v.push(lin(format!("{a}.q_a_proj.weight"), r, hs));
            v.push(norm(format!("{a}.q_a_layernorm.weight"), r));
            v.push(lin(format!("{a}.q_b_proj.weight"), h * c.qk_head_dim(), r));
        }
        None => v.push(lin(format!("{a}.q_proj.weight"), h * c.qk_head_dim(), hs)),
    }
    v.push(lin(format!("{a}.kv_a_proj_with_mqa.weight"), c.kv_entry_dim(), hs));
    v.push(norm(format!("{a}.kv_a_layernorm.weight"), c.kv_lora_rank));
    v.push(lin(format!("{a}.kv_b_proj.weight"), h * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank));
    v.push(lin(format!("{a}.o_proj.weight"), hs, h * c.v_head_dim));
    let mlp = |v: &mut Vec<Spec>, prefix: String, inter: usize| {
        v.push(lin(format!("{prefix}.gate_proj.weight"), inter, hs));
        v.push(lin(format!("{prefix}.up_proj.weight"), inter, hs));
        v.push(lin(format!("{prefix}.down_proj.weight"), hs, inter));
    };
    if c.is_moe_layer(i) {
        let n = c.n_routed_experts.unwrap();
        v.push(Spec { name: format!("{p}.mlp.gate.weight"), shape: vec![n, hs], init: Init::Linear { fp8: false } });
        if c.topk_method == crate::config::TopkMethod::NoauxTc {
            v.push(Spec { name: format!("{p}.mlp.gate.e_score_correction_bias"), shape: vec![n], init: Init::Bias });
        }
        for e in 0..n {
            mlp(&mut v, format!("{p}.mlp.experts.{e}"), c.moe_intermediate_size);
        }
        if c.n_shared_experts > 0 {
            mlp(&mut v, format!("{p}.mlp.shared_experts"), c.moe_intermediate_size * c.n_shared_experts);
        }
    } else {
        mlp(&mut v, format!("{p}.mlp"), c.intermediate_size);
    }
    v
}

fn mtp_specs(c: &ModelConfig, i: usize, fp8: bool) -> Vec<Spec> {
    let (hs, vocab) = (c.hidden_size, c.vocab_size);
    let p = format!("model.layers.{i}");
    let mut v = layer_specs(c, i, fp8);
    v.push(Spec { name: format!("{p}.enorm.weight"), shape: vec![hs], init: Init::Norm });
    v.push(Spec { name: format!("{p}.hnorm.weight"), shape: vec![hs], init: Init::Norm });
    v.push(Spec { name: format!("{p}.eh_proj.weight"), shape: vec![hs, 2 * hs], init: Init::Linear { fp8 } });
    v.push(Spec { name: format!("{p}.shared_head.norm.weight"), shape: vec![hs], init: Init::Norm });
    v.push(Spec { name: format!("{p}.shared_head.head.weight"), shape: vec![vocab, hs], init: Init::Linear { fp8: false } });
    v.push(Spec { name: format!("{p}.embed_tokens.weight"), shape: vec![vocab, hs], init: Init::Embed });
    v
}

/// One tensor of a synthetic checkpoint: its name, dtype, shape and how its bytes are drawn.
pub struct PlannedTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    spec: Spec,
    /// A `weight_scale_inv` (FP8 block scales of `spec`)
    is_scale: bool,
}

impl PlannedTensor {
    /// The tensor's bytes: the same for the same seed whether written to disk or made in memory.
    pub fn bytes(&self, seed: u64, table: &[u8; 256]) -> Vec<u8> {
        if self.is_scale {
            let std = (self.spec.shape[1] as f32).powf(-0.5);
            let n: usize = self.shape.iter().product();
            return fill_f32(name_seed(seed, &self.name), n, |r| std * (0.75 + 0.5 * r.uniform() as f32)).iter().flat_map(|x| x.to_le_bytes()).collect();
        }
        tensor_bytes(&self.spec, self.dtype, seed, table)
    }
}

/// The FP8 code table the generators draw through.
pub fn weight_table() -> [u8; 256] {
    fp8_normal_table()
}

/// Every tensor of a checkpoint for `cfg`, grouped in shards (embeddings, one per decoder layer,
/// the MTP layers when `mtp`, then norm and head); FP8 linears are followed by their scales.
pub fn plan_tensors(cfg: &ModelConfig, mtp: bool) -> Vec<Vec<PlannedTensor>> {
    let fp8 = cfg.quantization.as_ref().map(|q| (q.block_n, q.block_k));
    let (hs, vocab) = (cfg.hidden_size, cfg.vocab_size);
    let mut shards: Vec<Vec<Spec>> = vec![vec![Spec { name: "model.embed_tokens.weight".into(), shape: vec![vocab, hs], init: Init::Embed }]];
    for i in 0..cfg.num_hidden_layers {
        shards.push(layer_specs(cfg, i, fp8.is_some()));
    }
    if mtp {
        for k in 0..cfg.num_nextn_predict_layers {
            shards.push(mtp_specs(cfg, cfg.num_hidden_layers + k, fp8.is_some()));
        }
    }
    let mut last = vec![Spec { name: "model.norm.weight".into(), shape: vec![hs], init: Init::Norm }];
    if !cfg.tie_word_embeddings {
        last.push(Spec { name: "lm_head.weight".into(), shape: vec![vocab, hs], init: Init::Linear { fp8: false } });
    }
    shards.push(last);
    shards
        .into_iter()
        .map(|shard| {
            let mut out = Vec::new();
            for s in shard {
                let is_fp8 = matches!(s.init, Init::Linear { fp8: true }) && fp8.is_some();
                let dtype = match s.init {
                    Init::Bias => DType::F32,
                    _ if is_fp8 => DType::F8E4M3,
                    _ => DType::BF16,
                };
                let scale = is_fp8.then(|| {
                    let (bn, bk) = fp8.unwrap();
                    let spec = Spec { name: s.name.clone(), shape: s.shape.clone(), init: s.init };
                    PlannedTensor { name: s.name.replace(".weight", ".weight_scale_inv"), dtype: DType::F32, shape: vec![s.shape[0].div_ceil(bn), s.shape[1].div_ceil(bk)], spec, is_scale: true }
                });
                out.push(PlannedTensor { name: s.name.clone(), dtype, shape: s.shape.clone(), spec: s, is_scale: false });
                out.extend(scale);
            }
            out
        })
        .collect()
}

pub fn write_checkpoint(out: &Path, opts: &GenOptions) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let cfg_json = super::presets::tp_rank_config(preset_config(opts.preset, opts.layers), opts.tp_rank_shapes)?;
    let cfg = ModelConfig::from_json(&cfg_json, "preset config")?;
    std::fs::create_dir_all(out)?;
    let shards = plan_tensors(&cfg, true);
    let table = fp8_normal_table();
    let total = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total_bytes = 0usize;
    let mut progress = crate::weights::Progress::new("writing shards", total as u64);
    for (k, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, total);
        let specs: Vec<(String, DType, Vec<usize>)> = shard.iter().map(|t| (t.name.clone(), t.dtype, t.shape.clone())).collect();
        for (name, dtype, shape) in &specs {
            weight_map.insert(name.clone(), json!(file));
            total_bytes += shape.iter().product::<usize>() * dtype.size();
        }
        write_safetensors_with(&out.join(&file), &specs, |i| shard[i].bytes(opts.seed, &table))?;
        progress.advance(1);
    }
    progress.finish();
    let index = json!({"metadata": {"total_size": total_bytes}, "weight_map": weight_map});
    std::fs::write(out.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index)?)?;
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&cfg_json)?)?;
    std::fs::write(out.join("generation_config.json"), serde_json::to_string_pretty(&json!({"bos_token_id": 0, "eos_token_id": 1}))?)?;
    crate::tokenizer::byte_level::write_files(out)?;
    Ok(())
}
