//! Model shapes of the synthetic presets, as config.json values.
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// Tiny DeepSeek-V3 (q LoRA, noaux_tc sigmoid routing, YaRN, an MTP layer), bf16. The demo model.
    TinyV3,
    /// Tiny DeepSeek-V2-Lite (q_lora_rank null, softmax greedy routing), bf16.
    TinyV2Lite,
    /// Tiny DeepSeek-V3 with FP8 block-quantised linears (partial edge blocks).
    TinyV3Fp8,
    /// DeepSeek-V3's real per-layer shapes (hidden 7168, 128 heads, 256 experts of 2048), FP8.
    DeepseekV3Layers,
}

fn yarn(factor: f64, original: usize) -> Value {
    json!({"type": "yarn", "factor": factor, "original_max_position_embeddings": original,
           "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
}

/// config.json for a preset with `layers` decoder layers (None: the preset's default).
pub fn preset_config(p: Preset, layers: Option<usize>) -> Value {
    let fp8 = json!({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]});
    let vocab = 320; // the byte-level tokenizer's 263 tokens, padded like DeepSeek's embedding
    let mut c = match p {
        Preset::TinyV3 | Preset::TinyV3Fp8 => json!({
            "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
            "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
            "num_hidden_layers": 2, "num_nextn_predict_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
            "n_shared_experts": 1, "n_routed_experts": 8, "routed_scaling_factor": 2.5, "kv_lora_rank": 32,
            "q_lora_rank": 48, "qk_rope_head_dim": 16, "v_head_dim": 16, "qk_nope_head_dim": 16,
            "topk_method": "noaux_tc", "n_group": 4, "topk_group": 2, "num_experts_per_tok": 2, "moe_layer_freq": 1,
            "first_k_dense_replace": 1, "norm_topk_prob": true, "scoring_func": "sigmoid", "hidden_act": "silu",
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "rope_scaling": yarn(4.0, 1024), "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": false,
            "torch_dtype": "bfloat16"
        }),
        Preset::TinyV2Lite => json!({
            "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
            "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
            "n_shared_experts": 2, "n_routed_experts": 8, "routed_scaling_factor": 1.0, "kv_lora_rank": 32,
            "q_lora_rank": null, "qk_rope_head_dim": 16, "v_head_dim": 16, "qk_nope_head_dim": 16,
            "topk_method": "greedy", "n_group": 1, "topk_group": 1, "num_experts_per_tok": 2, "moe_layer_freq": 1,
            "first_k_dense_replace": 1, "norm_topk_prob": false, "scoring_func": "softmax", "hidden_act": "silu",
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "rope_scaling": yarn(4.0, 1024), "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": false,
            "torch_dtype": "bfloat16"
        }),
        Preset::DeepseekV3Layers => json!({
            "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
            "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
            "num_hidden_layers": 4, "num_nextn_predict_layers": 0, "num_attention_heads": 128, "num_key_value_heads": 128,
            "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
            "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
            "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1,
            "first_k_dense_replace": 1, "norm_topk_prob": true, "scoring_func": "sigmoid", "hidden_act": "silu",
            "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
            "rope_scaling": yarn(40.0, 4096), "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": false,
            "quantization_config": fp8.clone(), "torch_dtype": "bfloat16"
        }),
    };
    if p == Preset::TinyV3Fp8 {
        // Wider than 128 so that blocks are both whole and partial.
        let o = c.as_object_mut().unwrap();
        for (k, v) in [("hidden_size", 192), ("intermediate_size", 320), ("moe_intermediate_size", 96), ("q_lora_rank", 160), ("kv_lora_rank", 144)] {
            o.insert(k.into(), json!(v));
        }
        o.insert("quantization_config".into(), fp8);
    }
    if let Some(n) = layers {
        let o = c.as_object_mut().unwrap();
        o.insert("num_hidden_layers".into(), json!(n));
        if p == Preset::DeepseekV3Layers && n >= 61 {
            o.insert("first_k_dense_replace".into(), json!(3));
        }
    }
    c
}

/// The shapes one rank of an `n`-way tensor-parallel group holds (`gen-model --tp-rank-shapes n`):
/// heads, the dense and expert intermediate sizes and the vocabulary (the vocabulary-parallel
/// lm_head) divided by `n`, the replicated parts (hidden size, the q/kv LoRA projections, the
/// router over all experts) whole. Running it on one GPU times one rank's share of a layer.
pub fn tp_rank_config(mut c: Value, n: usize) -> Result<Value, String> {
    if n <= 1 {
        return Ok(c);
    }
    let o = c.as_object_mut().unwrap();
    for k in ["num_attention_heads", "num_key_value_heads", "intermediate_size", "moe_intermediate_size", "vocab_size"] {
        let v = o.get(k).and_then(|v| v.as_u64()).ok_or_else(|| format!("preset has no {k}"))? as usize;
        if k != "vocab_size" && !v.is_multiple_of(n) {
            return Err(format!("--tp-rank-shapes {n}: {k} = {v} is not divisible by {n}"));
        }
        o.insert(k.into(), json!(v.div_ceil(n)));
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tp_rank_shapes_divide_the_sharded_dimensions_only() {
        let c = tp_rank_config(preset_config(Preset::DeepseekV3Layers, Some(2)), 8).unwrap();
        assert_eq!((c["num_attention_heads"].as_u64(), c["intermediate_size"].as_u64(), c["moe_intermediate_size"].as_u64(), c["vocab_size"].as_u64()), (Some(16), Some(2304), Some(256), Some(16160)));
        assert_eq!((c["hidden_size"].as_u64(), c["q_lora_rank"].as_u64(), c["kv_lora_rank"].as_u64(), c["n_routed_experts"].as_u64()), (Some(7168), Some(1536), Some(512), Some(256)));
        assert_eq!(tp_rank_config(preset_config(Preset::TinyV3, None), 1).unwrap(), preset_config(Preset::TinyV3, None));
        let e = tp_rank_config(preset_config(Preset::TinyV3, None), 3).unwrap_err();
        assert!(e.contains("num_attention_heads = 4 is not divisible by 3"), "{e}");
    }
}

