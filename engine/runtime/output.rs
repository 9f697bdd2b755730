//! The result of one generation, serialised exactly like SGLang's `/generate` response.
use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq)]
pub enum FinishReason {
    /// Stopped on EOS or a stop token id.
    StopToken(u32),
    /// Stopped on a stop string.
    StopString(String),
    /// Reached max_new_tokens.
    Length(usize),
    Abort(String),
}

impl FinishReason {
    pub fn to_json(&self) -> Value {
        match self {
            FinishReason::StopToken(id) => json!({"type": "stop", "matched": id}),
            FinishReason::StopString(s) => json!({"type": "stop", "matched": s}),
            FinishReason::Length(n) => json!({"type": "length", "length": n}),
            FinishReason::Abort(m) => json!({"type": "abort", "message": m}),
        }
    }

    /// OpenAI's finish_reason string.
    pub fn openai(&self) -> &'static str {
        match self {
            FinishReason::StopToken(_) | FinishReason::StopString(_) => "stop",
            FinishReason::Length(_) => "length",
            FinishReason::Abort(_) => "abort",
        }
    }
}

/// (logprob, token id); the logprob is None for the first input token, which has no context.
pub type TokenLogprob = (Option<f32>, u32);

#[derive(Debug, Clone)]
pub struct GenerateOutput {
    pub text: String,
    pub output_ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub finish_reason: FinishReason,
    /// Present when logprobs were requested.
    pub logprobs: Option<Logprobs>,
}

#[derive(Debug, Clone, Default)]
pub struct Logprobs {
    pub input_token_logprobs: Vec<TokenLogprob>,
    pub output_token_logprobs: Vec<TokenLogprob>,
    /// One list per input position (None for the first).
    pub input_top_logprobs: Vec<Option<Vec<(f32, u32)>>>,
    pub output_top_logprobs: Vec<Vec<(f32, u32)>>,
}

fn lp_entry(lp: Option<f32>, id: u32) -> Value {
    json!([lp, id, null])
}

fn top_entry(list: &[(f32, u32)]) -> Value {
    Value::Array(list.iter().map(|(lp, id)| lp_entry(Some(*lp), *id)).collect())
}

impl GenerateOutput {
    pub fn to_json(&self) -> Value {
        let mut meta = json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.output_ids.len(),
            "finish_reason": self.finish_reason.to_json(),
        });
        if let Some(l) = &self.logprobs {
            let m = meta.as_object_mut().unwrap();
            m.insert("input_token_logprobs".into(), l.input_token_logprobs.iter().map(|(lp, id)| lp_entry(*lp, *id)).collect());
            m.insert("output_token_logprobs".into(), l.output_token_logprobs.iter().map(|(lp, id)| lp_entry(*lp, *id)).collect());
            m.insert("input_top_logprobs".into(), l.input_top_logprobs.iter().map(|t| t.as_ref().map_or(Value::Null, |t| top_entry(t))).collect());
            m.insert("output_top_logprobs".into(), l.output_top_logprobs.iter().map(|t| top_entry(t)).collect());
        }
        json!({"text": self.text, "output_ids": self.output_ids, "meta_info": meta})
    }
}
