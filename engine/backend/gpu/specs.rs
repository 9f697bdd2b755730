//! The kernel modules a model needs, with the defines that specialise them for its shapes.
use super::source::Vendor;
use crate::config::ModelConfig;

/// Shapes that kernels are compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModelDims {
    pub kv_lora_rank: usize,
    pub qk_rope_head_dim: usize,
    pub qk_nope_head_dim: usize,
    pub v_head_dim: usize,
}

impl ModelDims {
    pub fn of(cfg: &ModelConfig) -> Self {
        ModelDims { kv_lora_rank: cfg.kv_lora_rank, qk_rope_head_dim: cfg.qk_rope_head_dim, qk_nope_head_dim: cfg.qk_nope_head_dim, v_head_dim: cfg.v_head_dim }
    }

    /// The shapes an attention call runs with.
    pub fn of_mla(d: &crate::backend::MlaDims) -> Self {
        ModelDims { kv_lora_rank: d.kv_lora_rank, qk_rope_head_dim: d.qk_rope, qk_nope_head_dim: d.qk_nope, v_head_dim: d.v_head }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KernelModule {
    pub file: &'static str,
    pub defines: Vec<(String, String)>,
    pub functions: Vec<&'static str>,
}

/// Modules that do not depend on the model's shapes.
const GENERIC: &[(&str, &[&str])] = &[
    ("hip-kernels/elementwise.hip", &["embedding_f32w", "embedding_bf16w", "embedding_fp8w", "silu_mul", "add_inplace", "gather_rows", "scatter_rows", "concat_cols", "split_cols", "kv_write", "kv_write_bf16", "split_bf16_rows", "split3_bf16_rows", "dequant_fp8_hilo"]),
    ("hip-kernels/norm.hip", &["rms_norm", "add_rms_norm", "rms_norm_cols"]),
    ("hip-kernels/rope.hip", &["rope"]),
    ("hip-kernels/mla_kv_entry.hip", &["mla_kv_entry", "mla_kv_entry_bf16"]),
    ("hip-kernels/linear.hip", &["linear_f32w", "linear_bf16w", "linear_fp8w", "gemv_f32w", "gemv_bf16w", "gemv_fp8w", "gemv8_f32w", "gemv8_bf16w", "gemv8_fp8w", "gemv16_f32w", "gemv16_bf16w", "gemv16_fp8w", "gemv1_f32w", "gemv1_bf16w", "gemv1_fp8w", "gemv8_f32w_heads", "gemv8_bf16w_heads", "gemv8_fp8w_heads", "gemv1_f32w_heads", "gemv1_bf16w_heads", "gemv1_fp8w_heads", "gemv8_f32w_pair", "gemv8_bf16w_pair", "gemv8_fp8w_pair", "gemv1_f32w_pair", "gemv1_bf16w_pair", "gemv1_fp8w_pair", "gemv8_f32w_norm", "gemv8_bf16w_norm", "gemv8_fp8w_norm", "gemv1_f32w_norm", "gemv1_bf16w_norm", "gemv1_fp8w_norm", "gemv8_f32w_norm_kv", "gemv8_bf16w_norm_kv", "gemv8_fp8w_norm_kv", "gemv1_f32w_norm_kv", "gemv1_bf16w_norm_kv", "gemv1_fp8w_norm_kv"]),
    ("hip-kernels/linear_mma.hip", &["linear_mma_f32w", "linear_mma_bf16w", "linear_mma_fp8w", "linear_mma_heads_f32w", "linear_mma_heads_bf16w", "linear_mma_heads_fp8w", "linear_mma_heads_fold_fp8w", "linear_split_sum"]),
    ("hip-kernels/mla_heads.hip", &["heads_mma_fp8w_m32", "heads_mma_fp8w_m64", "heads_mma_fp8w_m32_by", "heads_mma_fp8w_m64_by", "heads_mma_fp8w_m32_bx", "heads_mma_fp8w_m64_bx", "heads_mma_fp8w_m32_bxq", "heads_mma_fp8w_m64_bxq"]),
    (
        "hip-kernels/moe_grouped.hip",
        &["moe_group", "moe_silu_mul_halves", "moe_gate_up_mma_f32w", "moe_down_mma_f32w", "moe_gate_up_mma_bf16w", "moe_down_mma_bf16w", "moe_gate_up_mma_fp8w", "moe_down_mma_fp8w", "moe_gate_up_gv_f32w", "moe_down_gv_f32w", "moe_gate_up_gv_bf16w", "moe_down_gv_bf16w", "moe_gate_up_gv_fp8w", "moe_down_gv_fp8w"],
    ),
    ("hip-kernels/moe_tc.hip", &["moe_gate_up_tc_fp8w", "moe_down_tc_fp8w"]),
    ("hip-kernels/linear_tc.hip", &["linear_tc_fp8w"]),
    ("hip-kernels/linear_f8.hip", &["linear_f8_fp8w"]),
    ("hip-kernels/moe_f8.hip", &["moe_gate_up_f8_fp8w", "moe_down_f8_fp8w"]),
    ("hip-kernels/moe_f8s.hip", &["moe_gate_up_f8s_fp8w", "moe_down_f8s_fp8w", "linear_f8s_fp8w"]),
    ("hip-kernels/moe_f8_gemm.hip", &["moe_gemm_f8", "moe_gemm_f8_glu", "moe_gemm_f8_r2"]),
    ("hip-kernels/sampling.hip", &["sample_rows"]),
    ("hip-kernels/act_quant.hip", &["quant_fp8_act", "quant_fp8_silu_act", "quant_fp8_silu_halves"]),
    ("hip-kernels/moe_combine.hip", &["moe_combine"]),
    ("hip-kernels/moe.hip", &["moe_route", "moe_gate_up_f32w", "moe_down_f32w", "moe_gate_up_bf16w", "moe_down_bf16w", "moe_gate_up_fp8w", "moe_down_fp8w"]),
];

pub fn warp_size(vendor: Vendor) -> u32 {
    match vendor {
        Vendor::Nvidia => 32,
        // CDNA (gfx942, gfx950) runs 64-wide wavefronts
        Vendor::Amd => 64,
    }
}

pub fn generic_module(file: &'static str, vendor: Vendor) -> KernelModule {
    let (_, fns) = GENERIC.iter().find(|(f, _)| *f == file).expect("known module");
    KernelModule { file, defines: vec![("ENGINE_WARP_SIZE".into(), warp_size(vendor).to_string())], functions: fns.to_vec() }
}

pub fn mla_module(d: ModelDims, vendor: Vendor) -> KernelModule {
    KernelModule {
        file: "hip-kernels/mla.hip",
        defines: vec![
            ("ENGINE_WARP_SIZE".into(), warp_size(vendor).to_string()),
            ("KV_LORA".into(), d.kv_lora_rank.to_string()),
            ("ROPE".into(), d.qk_rope_head_dim.to_string()),
            ("NOPE".into(), d.qk_nope_head_dim.to_string()),
            ("VDIM".into(), d.v_head_dim.to_string()),
        ],
        functions: vec!["mla_q_latent_f32w", "mla_q_latent_bf16w", "mla_q_latent_fp8w", "mla_attention", "mla_attention4", "mla_attention_bf16c", "mla_attention4_bf16c", "mla_merge", "mla_out_f32w", "mla_out_bf16w", "mla_out_fp8w"],
    }
}

/// MLA prefill in the MHA form (flash attention over decompressed K/V), same shape defines.
pub fn mla_prefill_module(d: ModelDims, vendor: Vendor) -> KernelModule {
    KernelModule { file: "hip-kernels/mla_prefill.hip", functions: vec!["mla_gather_ctx", "mla_gather_ctx_bf16c", "mla_prefill_kv", "mla_prefill_kv_bf16", "mla_flash_prefill"], ..mla_module(d, vendor) }
}

/// The flash prefill on bf16 operands (FB_PARTS 1: `--fp8-activations dynamic`).
pub fn mla_prefill_bf16_module(d: ModelDims, vendor: Vendor) -> KernelModule {
    let mut m = mla_prefill_module(d, vendor);
    m.defines.push(("FB_PARTS".into(), "1".into()));
    m
}

/// The flash prefill in FlashAttention-2's form on bf16 operands (NVIDIA sm_80+), same shape
/// defines.
pub fn mla_flash_bf16_module(d: ModelDims, vendor: Vendor) -> KernelModule {
    KernelModule { file: "hip-kernels/mla_flash_bf16.hip", functions: vec!["mla_flash_bf16"], ..mla_module(d, vendor) }
}

/// The flash prefill in FlashAttention-3's form on the warpgroup MMA (NVIDIA sm_90a), same shape
/// defines.
pub fn mla_flash_wg_module(d: ModelDims, vendor: Vendor) -> KernelModule {
    KernelModule { file: "hip-kernels/mla_flash_wg.hip", functions: vec!["mla_flash_wg"], ..mla_module(d, vendor) }
}

/// MLA decode attention on the matrix units (bf16 operands), same shape defines.
pub fn mla_decode_module(d: ModelDims, vendor: Vendor) -> KernelModule {
    KernelModule { file: "hip-kernels/mla_decode.hip", functions: vec!["mla_decode_mma"], ..mla_module(d, vendor) }
}

/// MLA decode attention for groups of 64 heads on the warpgroup MMA (NVIDIA sm_90a), same shape
/// defines.
pub fn mla_decode_wg_module(d: ModelDims, vendor: Vendor) -> KernelModule {
    KernelModule { file: "hip-kernels/mla_decode_wg.hip", functions: vec!["mla_decode_wg"], ..mla_module(d, vendor) }
}

/// MLA decode attention for groups of 16 heads, scores in registers (NVIDIA sm_80+), same shape
/// defines.
pub fn mla_decode_rows_module(d: ModelDims, vendor: Vendor) -> KernelModule {
    KernelModule { file: "hip-kernels/mla_decode_rows.hip", functions: vec!["mla_decode_rows"], ..mla_module(d, vendor) }
}

/// Every module a model with these shapes runs (the four flash prefills, the four decode
/// attentions).
pub fn modules_for(d: ModelDims, vendor: Vendor) -> Vec<KernelModule> {
    let mut v: Vec<KernelModule> = GENERIC.iter().map(|(f, _)| generic_module(f, vendor)).collect();
    v.push(mla_module(d, vendor));
    v.push(mla_prefill_module(d, vendor));
    v.push(mla_prefill_bf16_module(d, vendor));
    v.push(mla_flash_bf16_module(d, vendor));
    v.push(mla_flash_wg_module(d, vendor));
    v.push(mla_decode_module(d, vendor));
    v.push(mla_decode_rows_module(d, vendor));
    v.push(mla_decode_wg_module(d, vendor));
    v
}
