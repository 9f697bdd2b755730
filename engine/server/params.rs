//! Request-field parsing shared by the OpenAI and SGLang endpoints: typed getters whose errors
//! name the field, sampling parameters, prompts.
use serde_json::{Map, Value};

use super::http::ApiError;
use crate::sampling::SamplingParams;

pub struct Obj<'a>(pub &'a Map<String, Value>);

impl<'a> Obj<'a> {
    /// The value, treating null as absent.
    pub fn get(&self, k: &str) -> Option<&'a Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }
    pub fn f32(&self, k: &str) -> Result<Option<f32>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.as_f64().filter(|x| x.is_finite()).map(|x| Some(x as f32)).ok_or_else(|| ApiError::param(k, format!("`{k}` must be a number, got {v}"))),
        }
    }
    pub fn int(&self, k: &str) -> Result<Option<i64>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.as_i64().map(Some).ok_or_else(|| ApiError::param(k, format!("`{k}` must be an integer, got {v}"))),
        }
    }
    pub fn uint(&self, k: &str) -> Result<Option<usize>, ApiError> {
        match self.int(k)? {
            Some(x) if x < 0 => Err(ApiError::param(k, format!("`{k}` must be >= 0, got {x}"))),
            x => Ok(x.map(|x| x as usize)),
        }
    }
    pub fn bool(&self, k: &str) -> Result<Option<bool>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| ApiError::param(k, format!("`{k}` must be true or false, got {v}"))),
        }
    }
    pub fn str(&self, k: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| ApiError::param(k, format!("`{k}` must be a string, got {v}"))),
        }
    }
    pub fn object(&self, k: &str) -> Result<Option<Obj<'a>>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(Obj(m))),
            Some(v) => Err(ApiError::param(k, format!("`{k}` must be an object, got {v}"))),
        }
    }
    /// A string or a list of strings.
    pub fn strings(&self, k: &str) -> Result<Vec<String>, ApiError> {
        match self.get(k) {
            None => Ok(vec![]),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(a)) => a.iter().map(|x| x.as_str().map(str::to_string).ok_or_else(|| ApiError::param(k, format!("`{k}` must be a string or a list of strings")))).collect(),
            Some(v) => Err(ApiError::param(k, format!("`{k}` must be a string or a list of strings, got {v}"))),
        }
    }
    pub fn token_ids(&self, k: &str) -> Result<Vec<u32>, ApiError> {
        match self.get(k) {
            None => Ok(vec![]),
            Some(v) => ids(v).ok_or_else(|| ApiError::param(k, format!("`{k}` must be a list of token ids (non-negative integers)"))),
        }
    }
}

/// A list of token ids, if `v` is one.
pub fn ids(v: &Value) -> Option<Vec<u32>> {
    v.as_array()?.iter().map(|x| x.as_u64().filter(|&t| t <= u32::MAX as u64).map(|t| t as u32)).collect()
}

/// Where a sampling parameter comes from: its name in this API.
pub struct SamplingNames {
    pub max_tokens: &'static [&'static str],
    pub min_tokens: &'static str,
}

pub const OPENAI: SamplingNames = SamplingNames { max_tokens: &["max_tokens", "max_completion_tokens"], min_tokens: "min_tokens" };
pub const NATIVE: SamplingNames = SamplingNames { max_tokens: &["max_new_tokens"], min_tokens: "min_new_tokens" };

/// Fields asking for constrained decoding (SGLang's grammar backends), which this server does not
/// have: refused by name rather than ignored, so that no client takes free text for a match.
const CONSTRAINED: &[&str] = &["regex", "json_schema", "ebnf", "structural_tag"];

/// Keys of SGLang's `sampling_params` object.
pub const NATIVE_KEYS: &[&str] = &[
    "max_new_tokens", "temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
    "repetition_penalty", "stop", "stop_token_ids", "ignore_eos", "skip_special_tokens", "n", "seed",
    "min_new_tokens", "spaces_between_special_tokens", "no_stop_trim", "json_schema", "regex", "ebnf",
    "structural_tag", "logit_bias",
];

/// Sampling parameters from an object, with `default_max` when no max-tokens field is given.
pub fn sampling(o: &Obj, names: &SamplingNames, default_max: usize) -> Result<SamplingParams, ApiError> {
    let mut p = SamplingParams { max_new_tokens: default_max, ..Default::default() };
    for k in names.max_tokens {
        if let Some(x) = o.int(k)? {
            if x < 1 {
                return Err(ApiError::param(k, format!("`{k}` must be at least 1, got {x}")));
            }
            p.max_new_tokens = x as usize;
        }
    }
    if let Some(x) = o.f32("temperature")? {
        p.temperature = x;
    }
    if let Some(x) = o.f32("top_p")? {
        p.top_p = x;
    }
    if let Some(x) = o.int("top_k")? {
        p.top_k = if x == 0 { -1 } else { x };
    }
    if let Some(x) = o.f32("min_p")? {
        p.min_p = x;
    }
    if let Some(x) = o.f32("frequency_penalty")? {
        p.frequency_penalty = x;
    }
    if let Some(x) = o.f32("presence_penalty")? {
        p.presence_penalty = x;
    }
    if let Some(x) = o.f32("repetition_penalty")? {
        p.repetition_penalty = x;
    }
    if let Some(x) = o.int("seed")? {
        p.seed = Some(x as u64);
    }
    if let Some(x) = o.int("n")? {
        if x < 1 {
            return Err(ApiError::param("n", format!("`n` must be at least 1, got {x}")));
        }
        if x > 128 {
            return Err(ApiError::param("n", format!("`n` must be at most 128, got {x}")));
        }
        p.n = x as usize;
    }
    // OpenAI's `stop` may hold strings; SGLang's may too; token ids go in stop_token_ids.
    p.stop = o.strings("stop")?;
    if p.stop.len() > 16 {
        return Err(ApiError::param("stop", "at most 16 stop strings"));
    }
    p.stop_token_ids = o.token_ids("stop_token_ids")?;
    if let Some(x) = o.bool("ignore_eos")? {
        p.ignore_eos = x;
    }
    if let Some(x) = o.bool("skip_special_tokens")? {
        p.skip_special_tokens = x;
    }
    if let Some(x) = o.uint(names.min_tokens)? {
        p.min_new_tokens = x;
    }
    if let Some(x) = o.bool("no_stop_trim")? {
        p.no_stop_trim = x;
    }
    if let Some(b) = o.object("logit_bias")? {
        for (k, v) in b.0 {
            let t = k.parse::<u32>().map_err(|_| ApiError::param("logit_bias", format!("`logit_bias` keys must be token ids, got {k:?}")))?;
            let x = v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| ApiError::param("logit_bias", format!("`logit_bias` values must be numbers, got {v} for token {t}")))?;
            p.logit_bias.push((t, x as f32));
        }
        p.logit_bias.sort_by_key(|x| x.0);
    }
    if let Some(k) = CONSTRAINED.iter().find(|k| o.get(k).is_some()) {
        return Err(ApiError::param(k, format!("`{k}`: constrained decoding is not supported by this server")));
    }
    if let Some(f) = o.object("response_format")? {
        match f.str("type")? {
            None | Some("text") => {}
            Some(t) => return Err(ApiError::param("response_format", format!("`response_format` {t:?}: constrained decoding is not supported by this server (only \"text\")"))),
        }
    }
    p.validate().map_err(|e| ApiError::param(e.field, e.to_string()))?;
    Ok(p)
}
