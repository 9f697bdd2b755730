//! `config.json` of DeepSeek V2 / V3 checkpoints (Hugging Face layout).
use std::path::Path;

use serde_json::Value;

use super::{ConfigError, Fields, RopeConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    DeepseekV2,
    DeepseekV3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopkMethod {
    /// V3: sigmoid scores plus e_score_correction_bias, groups ranked by the sum of their top-2.
    NoauxTc,
    /// Plain top-k over all experts.
    Greedy,
    /// V2: groups ranked by their best expert.
    GroupLimitedGreedy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoringFunc {
    Sigmoid,
    Softmax,
}

/// `quantization_config` of a block-FP8 checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Config {
    pub block_n: usize,
    pub block_k: usize,
    /// Module names the checkpoint leaves unquantised (`modules_to_not_convert`).
    pub skip_modules: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub model_type: ModelType,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_nextn_predict_layers: usize,
    pub num_attention_heads: usize,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// None: no MoE layers at all (every layer dense).
    pub n_routed_experts: Option<usize>,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub topk_method: TopkMethod,
    pub scoring_func: ScoringFunc,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f64,
    pub first_k_dense_replace: usize,
    pub moe_layer_freq: usize,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub rope: RopeConfig,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub quantization: Option<Fp8Config>,
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { origin: origin.clone(), source })?;
        Self::from_json_str(&text, &origin)
    }

    pub fn from_json_str(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let v: Value = serde_json::from_str(text).map_err(|source| ConfigError::Json { origin: origin.to_string(), source })?;
        Self::from_json(&v, origin)
    }

    pub fn from_json(v: &Value, origin: &str) -> Result<Self, ConfigError> {
        let f = Fields::new(origin, v)?;
        let bad = |field: &str, msg: String| ConfigError::invalid(origin, field, msg);
        let model_type = match f.choice("model_type", &["deepseek_v3", "deepseek_v2"], None)?.as_str() {
            "deepseek_v3" => ModelType::DeepseekV3,
            _ => ModelType::DeepseekV2,
        };
        let v3 = model_type == ModelType::DeepseekV3;
        let hidden_size = f.usize("hidden_size")?;
        let num_hidden_layers = f.usize("num_hidden_layers")?;
        let num_attention_heads = f.usize("num_attention_heads")?;
        let qk_rope_head_dim = f.usize("qk_rope_head_dim")?;
        let max_position_embeddings = f.usize("max_position_embeddings")?;
        if qk_rope_head_dim % 2 != 0 {
            return Err(bad("qk_rope_head_dim", format!("must be even, got {qk_rope_head_dim}")));
        }
        for (name, val) in [("hidden_size", hidden_size), ("num_hidden_layers", num_hidden_layers), ("num_attention_heads", num_attention_heads)] {
            if val == 0 {
                return Err(bad(name, "must be at least 1".into()));
            }
        }
        if let Some(act) = f.opt_str("hidden_act")? {
            if act != "silu" {
                return Err(bad("hidden_act", format!("unsupported activation {act:?} (supported: silu)")));
            }
        }
        if f.bool_or("attention_bias", false)? {
            return Err(bad("attention_bias", "biases in attention projections are not supported".into()));
        }
        if f.bool_or("mlp_bias", false)? {
            return Err(bad("mlp_bias", "biases in MLP projections are not supported".into()));
        }
        let n_routed_experts = f.opt_usize("n_routed_experts")?;
        let topk_method = match f.choice("topk_method", &["noaux_tc", "greedy", "group_limited_greedy"], Some(if v3 { "noaux_tc" } else { "greedy" }))?.as_str() {
            "noaux_tc" => TopkMethod::NoauxTc,
            "greedy" => TopkMethod::Greedy,
            _ => TopkMethod::GroupLimitedGreedy,
        };
        let scoring_func = match f.choice("scoring_func", &["sigmoid", "softmax"], Some(if v3 { "sigmoid" } else { "softmax" }))?.as_str() {
            "sigmoid" => ScoringFunc::Sigmoid,
            _ => ScoringFunc::Softmax,
        };
        let num_experts_per_tok = f.usize_or("num_experts_per_tok", 0)?;
        let n_group = f.usize_or("n_group", 1)?.max(1);
        let topk_group = f.usize_or("topk_group", n_group)?.max(1);
        if let Some(e) = n_routed_experts {
            if num_experts_per_tok == 0 || num_experts_per_tok > e {
                return Err(bad("num_experts_per_tok", format!("must be in 1..={e} (n_routed_experts), got {num_experts_per_tok}")));
            }
            if e % n_group != 0 {
                return Err(bad("n_group", format!("n_routed_experts {e} is not divisible by n_group {n_group}")));
            }
            if topk_group > n_group {
                return Err(bad("topk_group", format!("{topk_group} exceeds n_group {n_group}")));
            }
            if topk_method != TopkMethod::Greedy && topk_group * (e / n_group) < num_experts_per_tok {
                return Err(bad("topk_group", format!("{topk_group} groups of {} experts cannot supply {num_experts_per_tok} experts per token", e / n_group)));
            }
            if topk_method == TopkMethod::NoauxTc && e / n_group < 2 {
                return Err(bad("n_group", "noaux_tc ranks groups by their top-2 experts, so each group needs at least 2".into()));
            }
        }
        let moe_layer_freq = f.usize_or("moe_layer_freq", 1)?;
        if moe_layer_freq == 0 {
            return Err(bad("moe_layer_freq", "must be at least 1".into()));
        }
        let eos_token_ids = match f.get("eos_token_id") {
            None => vec![],
            Some(Value::Number(n)) => vec![n.as_u64().ok_or_else(|| bad("eos_token_id", format!("expected a token id, got {n}")))? as u32],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_u64().map(|x| x as u32).ok_or_else(|| bad("eos_token_id", format!("expected token ids, got {x}"))))
                .collect::<Result<_, _>>()?,
            Some(other) => return Err(bad("eos_token_id", format!("expected a token id or a list, got {other}"))),
        };
        let quantization = match f.opt_object("quantization_config")? {
            None => None,
            Some(q) => {
                let method = q.choice("quant_method", &["fp8"], None)?;
                debug_assert_eq!(method, "fp8");
                q.choice("fmt", &["e4m3"], Some("e4m3"))?;
                q.choice("activation_scheme", &["dynamic"], Some("dynamic"))?;
                let (block_n, block_k) = match q.get("weight_block_size") {
                    Some(Value::Array(a)) if a.len() == 2 && a.iter().all(|x| x.as_u64().is_some_and(|x| x > 0)) => {
                        (a[0].as_u64().unwrap() as usize, a[1].as_u64().unwrap() as usize)
                    }
                    Some(other) => return Err(bad("quantization_config.weight_block_size", format!("expected two positive integers, got {other}"))),
                    None => return Err(bad("quantization_config.weight_block_size", "missing: only block-wise FP8 is supported".into())),
                };
                let skip_modules = match q.get("modules_to_not_convert") {
                    Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect(),
                    _ => vec![],
                };
                Some(Fp8Config { block_n, block_k, skip_modules })
            }
        };
        let interleaved = if v3 { f.bool_or("rope_interleave", true)? } else { true };
        let rope = RopeConfig::parse(&f, qk_rope_head_dim, max_position_embeddings, interleaved)?;
        let cfg = ModelConfig {
            model_type,
            vocab_size: f.usize("vocab_size")?,
            hidden_size,
            intermediate_size: f.usize("intermediate_size")?,
            moe_intermediate_size: f.usize_or("moe_intermediate_size", 0)?,
            num_hidden_layers,
            num_nextn_predict_layers: f.usize_or("num_nextn_predict_layers", 0)?,
            num_attention_heads,
            q_lora_rank: f.opt_usize("q_lora_rank")?,
            kv_lora_rank: f.usize("kv_lora_rank")?,
            qk_nope_head_dim: f.usize("qk_nope_head_dim")?,
            qk_rope_head_dim,
            v_head_dim: f.usize("v_head_dim")?,
            n_routed_experts,
            n_shared_experts: f.usize_or("n_shared_experts", 0)?,
            num_experts_per_tok,
            n_group,
            topk_group,
            topk_method,
            scoring_func,
            norm_topk_prob: f.bool_or("norm_topk_prob", false)?,
            routed_scaling_factor: f.f64_or("routed_scaling_factor", 1.0)?,
            first_k_dense_replace: f.usize_or("first_k_dense_replace", 0)?,
            moe_layer_freq,
            rms_norm_eps: f.f64_or("rms_norm_eps", 1e-6)?,
            max_position_embeddings,
            rope,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            bos_token_id: f.opt_usize("bos_token_id")?.map(|x| x as u32),
            eos_token_ids,
            quantization,
        };
        if cfg.n_routed_experts.is_some() && cfg.moe_intermediate_size == 0 {
            return Err(bad("moe_intermediate_size", "required when n_routed_experts is set".into()));
        }
        if cfg.vocab_size == 0 {
            return Err(bad("vocab_size", "must be at least 1".into()));
        }
        Ok(cfg)
    }

    /// Whether decoder layer `i` uses MoE (DeepSeek's rule: past the first dense layers, every
    /// `moe_layer_freq`-th layer).
    pub fn is_moe_layer(&self, i: usize) -> bool {
        self.n_routed_experts.is_some() && i >= self.first_k_dense_replace && i.is_multiple_of(self.moe_layer_freq)
    }

    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Latent KV entry per token per layer: c_kv plus the roped key.
    pub fn kv_entry_dim(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// The attention softmax scale: qk_head_dim^-0.5, times YaRN's mscale^2.
    pub fn softmax_scale(&self) -> f64 {
        (self.qk_head_dim() as f64).powf(-0.5) * self.rope.softmax_scale_multiplier()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const V3_CONFIG: &str = r#"{
      "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
      "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_nextn_predict_layers": 1,
      "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
      "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
      "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
      "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": true,
      "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840,
      "rms_norm_eps": 1e-06, "rope_theta": 10000, "bos_token_id": 0, "eos_token_id": 1,
      "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096, "type": "yarn"},
      "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
        "weight_block_size": [128, 128]}
    }"#;

    #[test]
    fn parses_official_v3() {
        let c = ModelConfig::from_json_str(V3_CONFIG, "config.json").unwrap();
        assert_eq!(c.model_type, ModelType::DeepseekV3);
        assert_eq!(c.topk_method, TopkMethod::NoauxTc);
        assert_eq!(c.scoring_func, ScoringFunc::Sigmoid);
        assert_eq!(c.kv_entry_dim(), 576);
        assert!(!c.is_moe_layer(2) && c.is_moe_layer(3));
        assert_eq!(c.quantization.as_ref().unwrap().block_n, 128);
        let m = 0.1 * 40f64.ln() + 1.0;
        assert!((c.softmax_scale() - m * m / 192f64.sqrt()).abs() < 1e-12);
    }

    fn with(key: &str, val: &str) -> String {
        let mut v: Value = serde_json::from_str(V3_CONFIG).unwrap();
        v[key] = serde_json::from_str(val).unwrap();
        v.to_string()
    }

    #[test]
    fn errors_name_the_field() {
        let e = ModelConfig::from_json_str(&with("model_type", "\"llama\""), "x/config.json").unwrap_err().to_string();
        assert!(e.contains("model_type") && e.contains("llama") && e.contains("x/config.json"), "{e}");
        let e = ModelConfig::from_json_str(&with("topk_method", "\"random\""), "c").unwrap_err().to_string();
        assert!(e.contains("topk_method"), "{e}");
        let e = ModelConfig::from_json_str(&with("hidden_size", "\"big\""), "c").unwrap_err().to_string();
        assert!(e.contains("hidden_size"), "{e}");
        let e = ModelConfig::from_json_str(&with("rope_scaling", r#"{"type":"dynamic","factor":2}"#), "c").unwrap_err().to_string();
        assert!(e.contains("rope_scaling.type"), "{e}");
        let e = ModelConfig::from_json_str(&with("quantization_config", r#"{"quant_method":"awq"}"#), "c").unwrap_err().to_string();
        assert!(e.contains("quantization_config.quant_method"), "{e}");
    }

    #[test]
    fn v2_lite_defaults() {
        let mut v: Value = serde_json::from_str(V3_CONFIG).unwrap();
        let o = v.as_object_mut().unwrap();
        o.insert("model_type".into(), "deepseek_v2".into());
        for k in ["topk_method", "scoring_func", "quantization_config"] {
            o.remove(k);
        }
        o.insert("q_lora_rank".into(), Value::Null);
        let c = ModelConfig::from_json(&v, "c").unwrap();
        assert_eq!(c.topk_method, TopkMethod::Greedy);
        assert_eq!(c.scoring_func, ScoringFunc::Softmax);
        assert_eq!(c.q_lora_rank, None);
        assert!(c.quantization.is_none());
    }
}
