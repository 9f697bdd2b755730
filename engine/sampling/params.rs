//! Sampling parameters with SGLang's names and defaults, validated with errors naming the field.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[error("invalid sampling parameter `{field}`: {msg}")]
pub struct SamplingError {
    pub field: &'static str,
    pub msg: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// -1 (or 0) means no limit.
    pub top_k: i64,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub skip_special_tokens: bool,
    pub n: usize,
    /// EOS and `stop_token_ids` are masked out of the sampling, and no stop (token or string)
    /// ends the request, until this many tokens are out (SGLang's `min_new_tokens`, OpenAI
    /// servers' `min_tokens`)
    pub min_new_tokens: usize,
    /// A matched stop string stays in the text (SGLang's `no_stop_trim`)
    pub no_stop_trim: bool,
    /// Added to the token's logit before sampling (OpenAI's `logit_bias`, in [-100, 100])
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_new_tokens: 128,
            temperature: 1.0,
            top_p: 1.0,
            top_k: -1,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
            stop: vec![],
            stop_token_ids: vec![],
            ignore_eos: false,
            skip_special_tokens: true,
            n: 1,
            min_new_tokens: 0,
            no_stop_trim: false,
            logit_bias: vec![],
        }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    pub fn validate(&self) -> Result<(), SamplingError> {
        let err = |field, msg: String| Err(SamplingError { field, msg });
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return err("temperature", format!("must be a finite number >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return err("top_p", format!("must be in (0, 1], got {}", self.top_p));
        }
        if self.top_k < -1 {
            return err("top_k", format!("must be -1 (disabled) or >= 1, got {}", self.top_k));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return err("min_p", format!("must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= 2.0) {
            return err("repetition_penalty", format!("must be in (0, 2], got {}", self.repetition_penalty));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return err("frequency_penalty", format!("must be in [-2, 2], got {}", self.frequency_penalty));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return err("presence_penalty", format!("must be in [-2, 2], got {}", self.presence_penalty));
        }
        if self.n < 1 {
            return err("n", format!("must be >= 1, got {}", self.n));
        }
        if self.stop.iter().any(String::is_empty) {
            return err("stop", "stop strings must not be empty".into());
        }
        if self.min_new_tokens > self.max_new_tokens {
            return err("min_new_tokens", format!("must be at most max_new_tokens ({}), got {}", self.max_new_tokens, self.min_new_tokens));
        }
        if let Some((t, b)) = self.logit_bias.iter().find(|(_, b)| !(-100.0..=100.0).contains(b)) {
            return err("logit_bias", format!("token {t}: a bias must be in [-100, 100], got {b}"));
        }
        Ok(())
    }

    /// Whether sampling this request's next token (after `generated` tokens) changes logits
    /// beyond the penalties: a logit bias, or stop tokens still masked by `min_new_tokens`.
    pub fn adjusts_logits(&self, generated: usize) -> bool {
        !self.logit_bias.is_empty() || generated < self.min_new_tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_fields() {
        let bad = [
            SamplingParams { temperature: -0.5, ..Default::default() },
            SamplingParams { top_p: 0.0, ..Default::default() },
            SamplingParams { top_p: 1.5, ..Default::default() },
            SamplingParams { top_k: -3, ..Default::default() },
            SamplingParams { min_p: 2.0, ..Default::default() },
            SamplingParams { n: 0, ..Default::default() },
            SamplingParams { max_new_tokens: 4, min_new_tokens: 5, ..Default::default() },
            SamplingParams { logit_bias: vec![(3, 1.0), (7, -100.5)], ..Default::default() },
        ];
        let fields = ["temperature", "top_p", "top_p", "top_k", "min_p", "n", "min_new_tokens", "logit_bias"];
        for (p, f) in bad.iter().zip(fields) {
            assert_eq!(p.validate().unwrap_err().field, f);
        }
        assert!(SamplingParams::default().validate().is_ok());
    }
}
