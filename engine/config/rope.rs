//! Rotary position embedding parameters (plain and YaRN) and the cos/sin tables they produce.
//!
//! The arithmetic follows transformers' `_compute_yarn_parameters` step by step, in float32 where it
//! works in float32, so the tables agree with the reference to the last bit or two.
use super::{ConfigError, Fields};

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        attention_factor: Option<f64>,
        truncate: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    /// Rotary dimension (qk_rope_head_dim).
    pub dim: usize,
    /// Pairs are (x[2i], x[2i+1]) when true (DeepSeek's layout); halves (x[i], x[i+d/2]) otherwise.
    pub interleaved: bool,
    pub scaling: RopeScaling,
}

fn yarn_get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl RopeConfig {
    /// Reads `rope_theta` and `rope_scaling` (or transformers 5's `rope_parameters`).
    pub fn parse(f: &Fields, dim: usize, max_pos: usize, interleaved: bool) -> Result<Self, ConfigError> {
        let params = match f.opt_object("rope_parameters")? {
            Some(p) => Some(p),
            None => f.opt_object("rope_scaling")?,
        };
        let mut theta = f.opt_f64("rope_theta")?;
        let mut scaling = RopeScaling::None;
        if let Some(p) = params {
            if let Some(t) = p.opt_f64("rope_theta")? {
                theta = Some(t);
            }
            let kind = match p.opt_str("rope_type")? {
                Some(k) => k,
                None => p.opt_str("type")?.unwrap_or("default"),
            };
            match kind {
                "default" => {}
                "yarn" => {
                    let original = p.opt_usize("original_max_position_embeddings")?.unwrap_or(max_pos);
                    let factor = match p.opt_f64("factor")? {
                        Some(x) => x,
                        None => max_pos as f64 / original as f64,
                    };
                    if factor.is_nan() || factor < 1.0 {
                        return Err(ConfigError::invalid(f.origin, &format!("{}factor", p.prefix), format!("YaRN factor must be >= 1, got {factor}")));
                    }
                    // transformers treats 0/absent beta as the paper's defaults (`x or 32`).
                    let nonzero = |x: Option<f64>, d: f64| x.filter(|v| *v != 0.0).unwrap_or(d);
                    scaling = RopeScaling::Yarn {
                        factor,
                        original_max_position_embeddings: original,
                        beta_fast: nonzero(p.opt_f64("beta_fast")?, 32.0),
                        beta_slow: nonzero(p.opt_f64("beta_slow")?, 1.0),
                        mscale: p.opt_f64("mscale")?,
                        mscale_all_dim: p.opt_f64("mscale_all_dim")?,
                        attention_factor: p.opt_f64("attention_factor")?,
                        truncate: p.bool_or("truncate", true)?,
                    };
                }
                other => {
                    let field = if p.prefix.starts_with("rope_parameters") { "rope_type" } else { "type" };
                    return Err(ConfigError::invalid(
                        f.origin,
                        &format!("{}{field}", p.prefix),
                        format!("unsupported RoPE type {other:?} (supported: default, yarn)"),
                    ));
                }
            }
        }
        let theta = theta.unwrap_or(10000.0);
        if theta.is_nan() || theta <= 0.0 {
            return Err(ConfigError::invalid(f.origin, "rope_theta", format!("must be positive, got {theta}")));
        }
        Ok(RopeConfig { theta, dim, interleaved, scaling })
    }

    /// Scale multiplying cos and sin (YaRN's attention factor; 1 for plain RoPE).
    pub fn attention_factor(&self) -> f64 {
        match &self.scaling {
            RopeScaling::None => 1.0,
            RopeScaling::Yarn { factor, mscale, mscale_all_dim, attention_factor, .. } => {
                if let Some(a) = attention_factor {
                    return *a;
                }
                match (mscale, mscale_all_dim) {
                    (Some(m), Some(a)) if *m != 0.0 && *a != 0.0 => yarn_get_mscale(*factor, *m) / yarn_get_mscale(*factor, *a),
                    _ => yarn_get_mscale(*factor, 1.0),
                }
            }
        }
    }

    /// Multiplier of the softmax scale: mscale(factor, mscale_all_dim)^2 under YaRN, else 1.
    pub fn softmax_scale_multiplier(&self) -> f64 {
        match &self.scaling {
            RopeScaling::Yarn { factor, mscale_all_dim: Some(a), .. } if *a != 0.0 => {
                let m = yarn_get_mscale(*factor, *a);
                m * m
            }
            _ => 1.0,
        }
    }

    /// Inverse frequencies, one per rotary pair, in float32 as transformers computes them.
    pub fn inv_freq(&self) -> Vec<f32> {
        let dim = self.dim;
        let half = dim / 2;
        let pos_freqs: Vec<f32> = (0..half).map(|i| (self.theta.powf((2 * i) as f32 as f64 / dim as f64)) as f32).collect();
        let extrapolation: Vec<f32> = pos_freqs.iter().map(|p| 1.0f32 / p).collect();
        match &self.scaling {
            RopeScaling::None => extrapolation,
            RopeScaling::Yarn { factor, original_max_position_embeddings, beta_fast, beta_slow, truncate, .. } => {
                let factor32 = *factor as f32;
                let interpolation: Vec<f32> = pos_freqs.iter().map(|p| 1.0f32 / (factor32 * p)).collect();
                let corr = |rot: f64| {
                    (dim as f64 * (*original_max_position_embeddings as f64 / (rot * 2.0 * std::f64::consts::PI)).ln())
                        / (2.0 * self.theta.ln())
                };
                let (mut low, mut high) = (corr(*beta_fast), corr(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let mut high = high.min(dim as f64 - 1.0);
                if low == high {
                    high += 0.001;
                }
                (0..half)
                    .map(|i| {
                        let ramp = ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
                        let extra = 1.0f32 - ramp;
                        interpolation[i] * (1.0 - extra) + extrapolation[i] * extra
                    })
                    .collect()
            }
        }
    }
}

/// cos/sin per position and rotary pair, scaled by the attention factor.
pub struct RopeTables {
    pub half: usize,
    pub interleaved: bool,
    inv_freq: Vec<f32>,
    scale: f32,
}

impl RopeTables {
    pub fn new(cfg: &RopeConfig) -> Self {
        RopeTables { half: cfg.dim / 2, interleaved: cfg.interleaved, inv_freq: cfg.inv_freq(), scale: cfg.attention_factor() as f32 }
    }

    /// Inverse frequencies (float32), one per rotary pair.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Scale applied to cos and sin.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// (cos, sin) for one position, each `half` long. The angle is formed in float32 (as the reference
    /// does); cos and sin of it are then exact to float32 rounding.
    pub fn cos_sin(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        let p = pos as f32;
        for i in 0..self.half {
            let angle = (self.inv_freq[i] * p) as f64;
            cos[i] = (angle.cos() as f32) * self.scale;
            sin[i] = (angle.sin() as f32) * self.scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3_rope() -> RopeConfig {
        RopeConfig {
            theta: 10000.0,
            dim: 64,
            interleaved: true,
            scaling: RopeScaling::Yarn {
                factor: 40.0,
                original_max_position_embeddings: 4096,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: Some(1.0),
                mscale_all_dim: Some(1.0),
                attention_factor: None,
                truncate: true,
            },
        }
    }

    #[test]
    fn v3_softmax_multiplier_matches_deepseek_md() {
        // m = 0.1 * ln(40) + 1 = 1.36889; m^2 = 1.8739
        let r = v3_rope();
        let m = 0.1 * 40f64.ln() + 1.0;
        assert!((r.softmax_scale_multiplier() - m * m).abs() < 1e-12);
        assert_eq!(r.attention_factor(), 1.0);
    }

    #[test]
    fn yarn_keeps_high_freqs_and_interpolates_low_freqs() {
        let r = v3_rope();
        let f = r.inv_freq();
        let plain = RopeConfig { scaling: RopeScaling::None, ..r.clone() }.inv_freq();
        // First pairs rotate fast: extrapolated (unchanged); last pairs slow: divided by the factor.
        assert_eq!(f[0], plain[0]);
        assert!((f[31] - plain[31] / 40.0).abs() <= 1e-6 * plain[31]);
        assert!(f.windows(2).all(|w| w[0] > w[1]));
    }
}
