//! Per-device kernel-path thresholds (configs/tuned/<device>.toml, embedded in the binary; like
//! SGLang's fused-MoE config files, keyed by the device name). `ENGINE_TUNED_CONFIG=FILE` replaces
//! the embedded choice. A device without a file runs the defaults and logs that it does.
use serde::Deserialize;

/// Where each op switches kernels (rows = tokens in the batch).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tuned {
    /// The device name this file was measured on (informational)
    #[serde(default)]
    pub device: String,
    /// Linear layers on the tensor cores from this many rows
    pub mma_min_rows: usize,
    /// MoE experts grouped by expert from this many tokens
    pub moe_grouped_min_rows: usize,
    /// ... and on the tensor cores from this many
    pub moe_mma_min_rows: usize,
    /// Flash MHA prefill for sequences with at least this many new tokens
    pub flash_min_q: usize,
    /// Tensor-core GEMMs split K until the tiles fill the SMs this many times over
    #[serde(default = "default_split_fill")]
    pub mma_split_fill: usize,
    /// Linear layers with bf16 weights through cuBLASLt from this many rows (where it loads)
    #[serde(default = "default_cublaslt_min_rows")]
    pub cublaslt_min_rows: usize,
    /// Linear layers with FP8 weights through the GEMM library (dequantised to bf16 hi + lo per
    /// call) from this many rows, where it loads: prefill sizes
    #[serde(default = "default_blaslt_fp8_min_rows")]
    pub blaslt_fp8_min_rows: usize,
    /// ... with `--fp8-activations dynamic` (the input quantised to FP8, the library's
    /// block-scaled FP8 GEMM: no dequantised copy, so it pays from fewer rows)
    #[serde(default = "default_blaslt_fp8_act_min_rows")]
    pub blaslt_fp8_act_min_rows: usize,
    /// Linear layers with FP8 weights of up to this many rows take the swap-AB tensor-core kernel
    /// (linear_tc.hip; NVIDIA sm_80+), ahead of the GEMV and the 128-row tiles; 0: never
    #[serde(default = "default_linear_tc_max_rows")]
    pub linear_tc_max_rows: usize,
    /// ... from this many rows (below: the GEMV)
    #[serde(default = "default_linear_tc_min_rows")]
    pub linear_tc_min_rows: usize,
    /// With `--fp8-activations dynamic`, FP8 linear layers of up to this many rows (at most 8;
    /// fewer than `blaslt_fp8_act_min_rows`) quantise x too and take the FP8 × FP8 swap-AB
    /// kernel (linear_f8.hip; NVIDIA sm_89+); 0: never (f32 activations below the GEMM library)
    #[serde(default = "default_linear_f8_max_rows")]
    pub linear_f8_max_rows: usize,
    /// ... from this many rows (below: the f32-activation GEMV, whose single launch beats the
    /// quantiser, the MMA kernel and its split-K sum at one row)
    #[serde(default = "default_linear_f8_min_rows")]
    pub linear_f8_min_rows: usize,
    /// With `--fp8-activations dynamic`, FP8 linear layers of more rows than linear_f8.hip takes
    /// and up to this many quantise x and take the staged FP8 × FP8 kernel (moe_f8s.hip's
    /// `linear_f8s_fp8w`, split over K; NVIDIA sm_89+), ahead of the GEMM library; 0: never
    #[serde(default = "default_linear_f8s_max_rows")]
    pub linear_f8s_max_rows: usize,
    /// With `--fp8-activations dynamic`, MoE batches of up to this many tokens on the grouped decode
    /// path (below `moe_mma_min_rows`) quantise x and SiLU·up and take the FP8 × FP8 grouped
    /// kernels (moe_f8.hip; NVIDIA sm_89+); 0: never (f32 activations on moe_tc.hip)
    #[serde(default = "default_moe_f8_max_rows")]
    pub moe_f8_max_rows: usize,
    /// MLA's absorbed projections (q → latent, latent → v) as per-head GEMMs on the matrix units
    /// from this many tokens (below: per-head GEMVs)
    #[serde(default = "default_mla_proj_mma_min_rows")]
    pub mla_proj_mma_min_rows: usize,
    /// Those GEMMs, for FP8 weights whose tiles fold their scales (V3's kv_b), on mla_heads.hip's
    /// cp.async-fed kernel (NVIDIA sm_80+); false: linear_mma.hip's 128 × 128 register-staged tile
    #[serde(default = "default_true")]
    pub mla_proj_async: bool,
    /// MLA decode attention of models with at most this many heads (per rank) takes the 16-head
    /// kernel with the scores in registers (mla_decode_rows.hip; NVIDIA sm_80+, bf16 cache; in
    /// groups of 16 heads), more heads the 64-head tiles (mla_decode.hip); batches the
    /// warpgroup-MMA kernel takes (`mla_decode_wgmma`) go there first; 0: never
    #[serde(default = "default_mla_decode_rows_max_heads")]
    pub mla_decode_rows_max_heads: usize,
    /// With `--fp8-activations dynamic`, MoE batches from `moe_mma_min_rows` tokens (prefill)
    /// multiply every expert's rows in one grouped FP8 GEMM a projection (moe_f8_gemm.hip; NVIDIA
    /// sm_90a); false: the GEMM library's block-scaled FP8 GEMM per expert
    #[serde(default = "default_true")]
    pub moe_f8_gemm: bool,
    /// ... in clusters of two blocks that share each activation tile (TMA multicast: L2 serves it
    /// once for two column blocks); false: a block alone
    #[serde(default = "default_true")]
    pub moe_f8_gemm_cluster: bool,
    /// ... the gate and up projections in one launch that writes SiLU(gate) · up's FP8 codes
    /// (moe_f8_gemm.hip's moe_gemm_f8_glu); false: two launches, f32 outputs, then the quantiser
    #[serde(default = "default_true")]
    pub moe_f8_gemm_glu: bool,
    /// ... its clusters take an expert's tiles in pairs that share the weights (moe_f8_gemm.rs
    /// `gemm_units`); false: every tile's column pairs share its rows
    #[serde(default = "default_true")]
    pub moe_f8_gemm_glu_pair_tiles: bool,
    /// The grouped GEMM's other launches (the down projection) in 256-row tiles, an expert's
    /// weights read once up to 256 rows (moe_f8_gemm.hip's moe_gemm_f8_r2); false: 128-row tiles
    #[serde(default = "default_true")]
    pub moe_f8_gemm_rows256: bool,
    /// A MoE layer's shared experts before its routed ones at prefill sizes (moe_prefill.rs): their
    /// GEMMs run while the host reads the routed ids back and lays the pairs out
    #[serde(default = "default_true")]
    pub moe_shared_first: bool,
    /// The MoE prefill's routed rows as x's FP8 codes gathered (act_codes.rs's
    /// `quant_fp8_gather`); false: the gathered f32 rows quantised (the same bytes)
    #[serde(default = "default_true")]
    pub moe_gather_codes: bool,
    /// The MoE router's f32 logits from this many tokens through the GEMM library's f32 GEMM
    /// (router.rs); 0: never (the own CUDA-core tiles)
    #[serde(default = "default_router_blas_min_rows")]
    pub router_blas_min_rows: usize,
    /// With bf16 attention operands, the flash prefill of V2 / V3 head sizes runs in
    /// FlashAttention-3's form on the warpgroup MMA (mla_flash_wg.hip; NVIDIA sm_90a); false:
    /// FlashAttention-2's form on mma.sync (mla_flash_bf16.hip)
    #[serde(default = "default_true")]
    pub flash_wgmma: bool,
    /// With bf16 attention operands, the decode attention of 64-head groups with V2 / V3's
    /// 512 + 64 latent entries runs on the warpgroup MMA (mla_decode_wg.hip; NVIDIA sm_90a);
    /// false: mma.sync (mla_decode.hip)
    #[serde(default = "default_true")]
    pub mla_decode_wgmma: bool,
}

fn default_true() -> bool {
    true
}

fn default_router_blas_min_rows() -> usize {
    512
}

fn default_mla_decode_rows_max_heads() -> usize {
    16
}

fn default_mla_proj_mma_min_rows() -> usize {
    8
}

fn default_linear_f8_max_rows() -> usize {
    8
}

fn default_linear_f8_min_rows() -> usize {
    2
}

fn default_linear_f8s_max_rows() -> usize {
    32
}

fn default_moe_f8_max_rows() -> usize {
    511
}

fn default_linear_tc_max_rows() -> usize {
    64
}

fn default_linear_tc_min_rows() -> usize {
    2
}

fn default_cublaslt_min_rows() -> usize {
    2
}

fn default_blaslt_fp8_min_rows() -> usize {
    128
}

fn default_blaslt_fp8_act_min_rows() -> usize {
    32
}

fn default_split_fill() -> usize {
    4
}

impl Default for Tuned {
    fn default() -> Self {
        Tuned { device: String::new(), mma_min_rows: 9, moe_grouped_min_rows: 8, moe_mma_min_rows: 512, flash_min_q: 64, mma_split_fill: default_split_fill(),
            cublaslt_min_rows: default_cublaslt_min_rows(),
            blaslt_fp8_min_rows: default_blaslt_fp8_min_rows(),
            blaslt_fp8_act_min_rows: default_blaslt_fp8_act_min_rows(),
            linear_tc_max_rows: default_linear_tc_max_rows(),
            linear_f8_max_rows: default_linear_f8_max_rows(),
            linear_f8_min_rows: default_linear_f8_min_rows(),
            linear_f8s_max_rows: default_linear_f8s_max_rows(),
            moe_f8_max_rows: default_moe_f8_max_rows(),
            linear_tc_min_rows: default_linear_tc_min_rows(),
            mla_proj_mma_min_rows: default_mla_proj_mma_min_rows(),
            mla_proj_async: default_true(),
            mla_decode_rows_max_heads: default_mla_decode_rows_max_heads(),
            moe_f8_gemm: default_true(),
            moe_f8_gemm_cluster: default_true(),
            moe_f8_gemm_glu: default_true(),
            moe_f8_gemm_glu_pair_tiles: default_true(),
            moe_f8_gemm_rows256: default_true(),
            moe_shared_first: default_true(),
            moe_gather_codes: default_true(),
            router_blas_min_rows: default_router_blas_min_rows(),
            flash_wgmma: default_true(),
            mla_decode_wgmma: default_true(),
        }
    }
}

/// The embedded files: (key, text).
const FILES: &[(&str, &str)] = &[("nvidia-h200", include_str!("../../../configs/tuned/nvidia-h200.toml"))];

/// "NVIDIA H200" -> "nvidia-h200": lower case, runs of other characters as one '-'.
pub fn device_key(name: &str) -> String {
    let mut k = String::new();
    for c in name.trim().chars() {
        if c.is_ascii_alphanumeric() {
            k.push(c.to_ascii_lowercase());
        } else if !k.ends_with('-') && !k.is_empty() {
            k.push('-');
        }
    }
    k.trim_end_matches('-').to_string()
}

pub fn parse(text: &str, origin: &str) -> Result<Tuned, String> {
    let t: Tuned = toml::from_str(text).map_err(|e| format!("tuned kernel config {origin}: {e}"))?;
    if t.mma_min_rows == 0 || t.moe_grouped_min_rows == 0 || t.flash_min_q == 0 || t.mma_split_fill == 0 || t.cublaslt_min_rows == 0 || t.blaslt_fp8_min_rows == 0 || t.blaslt_fp8_act_min_rows == 0 || t.linear_tc_min_rows == 0 || t.linear_f8_min_rows == 0 || t.mla_proj_mma_min_rows == 0 {
        return Err(format!("tuned kernel config {origin}: thresholds must be at least 1"));
    }
    if t.linear_f8_max_rows > 8 {
        return Err(format!("tuned kernel config {origin}: linear_f8_max_rows {} exceeds the kernel's 8 tokens", t.linear_f8_max_rows));
    }
    Ok(t)
}

/// The thresholds for `device_name`: ENGINE_TUNED_CONFIG, else the embedded file for its key, else
/// the defaults (logged).
pub fn for_device(device_name: &str) -> Result<Tuned, String> {
    if let Ok(path) = std::env::var("ENGINE_TUNED_CONFIG") {
        let text = std::fs::read_to_string(&path).map_err(|e| format!("ENGINE_TUNED_CONFIG={path}: {e}"))?;
        let t = parse(&text, &path)?;
        log::info!("kernel thresholds from {path}: {t:?}");
        return Ok(t);
    }
    let key = device_key(device_name);
    match FILES.iter().find(|(k, _)| *k == key) {
        Some((k, text)) => {
            let t = parse(text, &format!("configs/tuned/{k}.toml"))?;
            log::info!("kernel thresholds from configs/tuned/{k}.toml: {t:?}");
            Ok(t)
        }
        None => {
            log::info!("no tuned kernel config for {device_name:?} (configs/tuned/{key}.toml); using the defaults {:?}", Tuned::default());
            Ok(Tuned::default())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_map_to_file_keys() {
        assert_eq!(device_key("NVIDIA H200"), "nvidia-h200");
        assert_eq!(device_key(" NVIDIA H100 80GB HBM3 "), "nvidia-h100-80gb-hbm3");
        assert_eq!(device_key("AMD Instinct MI300X"), "amd-instinct-mi300x");
    }

    #[test]
    fn embedded_files_parse_and_unknown_devices_get_the_defaults() {
        for (k, text) in FILES {
            let t = parse(text, k).unwrap();
            assert_eq!(device_key(&t.device), *k, "{k}: the file's device field names its key");
        }
        assert_eq!(for_device("Some Future GPU").unwrap(), Tuned::default());
        assert_eq!(for_device("NVIDIA H200").unwrap().moe_mma_min_rows, 512);
    }

    #[test]
    fn bad_files_name_the_problem() {
        let e = parse("mma_min_rows = 9\nmoe_grouped_min_rows = 9\nmoe_mma_min_rows = 512\nflash_min_q = 64\ntile = 3\n", "x.toml").unwrap_err();
        assert!(e.contains("x.toml") && e.contains("tile"), "{e}");
        let e = parse("mma_min_rows = 0\nmoe_grouped_min_rows = 9\nmoe_mma_min_rows = 512\nflash_min_q = 64\n", "y.toml").unwrap_err();
        assert!(e.contains("y.toml") && e.contains("at least 1"), "{e}");
        let e = parse("mma_min_rows = 9\n", "z.toml").unwrap_err();
        assert!(e.contains("z.toml") && e.contains("moe_grouped_min_rows"), "{e}");
    }
}
