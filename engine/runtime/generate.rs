//! The generation loop for one request: prefill the prompt, then decode token by token over the
//! latent KV cache until a stop condition.
use super::output::{FinishReason, GenerateOutput, Logprobs};
use crate::backend::{AttnSeq, Backend};
use crate::model::{ForwardBatch, Model, ModelError};
use crate::sampling::{apply_penalties, log_softmax, sample, top_logprobs, Rng, SamplingParams, TokenCounts};
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

#[derive(Debug, Clone, Default)]
pub struct GenerateRequest {
    pub input_ids: Vec<u32>,
    pub params: SamplingParams,
    pub return_logprob: bool,
    pub logprob_start_len: usize,
    pub top_logprobs_num: usize,
}

/// Validates a request against the model; errors name the offending field.
pub fn validate<B: Backend>(model: &Model<B>, req: &GenerateRequest) -> Result<(), ModelError> {
    let bad = |m: String| Err(ModelError::Input(m));
    req.params.validate().map_err(|e| ModelError::Input(e.to_string()))?;
    if req.input_ids.is_empty() {
        return bad("the prompt is empty".into());
    }
    let vocab = model.cfg.vocab_size;
    if let Some(&t) = req.input_ids.iter().find(|&&t| t as usize >= vocab) {
        return bad(format!("input_ids contains token id {t}, outside the vocabulary (size {vocab})"));
    }
    let ctx = model.cfg.max_position_embeddings;
    if req.input_ids.len() + req.params.max_new_tokens > ctx {
        return bad(format!(
            "prompt of {} tokens plus max_new_tokens {} exceeds the context length of {ctx}",
            req.input_ids.len(),
            req.params.max_new_tokens
        ));
    }
    if req.return_logprob && req.logprob_start_len >= req.input_ids.len() {
        return bad(format!("logprob_start_len {} must be less than the prompt length {}", req.logprob_start_len, req.input_ids.len()));
    }
    Ok(())
}

fn row(logits: &[f32], vocab: usize, r: usize) -> &[f32] {
    &logits[r * vocab..(r + 1) * vocab]
}

pub fn generate<B: Backend>(model: &Model<B>, tok: Option<&Tokenizer>, req: &GenerateRequest) -> Result<GenerateOutput, ModelError> {
    validate(model, req)?;
    let p = &req.params;
    let vocab = model.cfg.vocab_size;
    let prompt = &req.input_ids;
    let n = prompt.len();
    let slots: Vec<u32> = (0..(n + p.max_new_tokens) as u32).collect();
    let mut kv = model.alloc_kv_cache(slots.len().max(1))?;

    // Prefill: logits for every position from logprob_start_len when logprobs are wanted.
    let first_row = if req.return_logprob { req.logprob_start_len } else { n - 1 };
    let logit_rows: Vec<u32> = (first_row as u32..n as u32).collect();
    let positions: Vec<u32> = (0..n as u32).collect();
    let seqs = [AttnSeq { q_start: 0, q_len: n, slots: &slots[..n] }];
    let logits = model.forward(&mut kv, &ForwardBatch { tokens: prompt, positions: &positions, seqs: &seqs, logit_rows: &logit_rows })?;
    let mut logits = model.backend.download(&logits)?;

    let mut lp = req.return_logprob.then(Logprobs::default);
    if let Some(l) = lp.as_mut() {
        let k = req.logprob_start_len;
        l.input_token_logprobs.push((None, prompt[k]));
        l.input_top_logprobs.push(None);
        for j in k + 1..n {
            let ls = log_softmax(row(&logits, vocab, j - 1 - k));
            l.input_token_logprobs.push((Some(ls[prompt[j] as usize]), prompt[j]));
            l.input_top_logprobs.push(Some(top_logprobs(&ls, req.top_logprobs_num)));
        }
        let last = logit_rows.len() - 1;
        logits = row(&logits, vocab, last).to_vec();
    }

    let mut eos: Vec<u32> = model.cfg.eos_token_ids.clone();
    if let Some(e) = tok.and_then(Tokenizer::eos_token_id) {
        eos.push(e);
    }
    let mut rng = Rng::new(p.seed.unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)));
    let mut counts = TokenCounts::new(prompt);
    let mut out_ids = Vec::new();
    let mut text = String::new();
    let mut detok = IncrementalDecoder::new(prompt, p.skip_special_tokens);
    let mut finish = FinishReason::Length(p.max_new_tokens);
    for step in 0..p.max_new_tokens {
        if let Some(l) = lp.as_mut() {
            let ls = log_softmax(&logits);
            // the token is sampled below; record the distribution now
            l.output_top_logprobs.push(top_logprobs(&ls, req.top_logprobs_num));
            l.output_token_logprobs.push((None, 0));
            apply_penalties(&mut logits, p, &counts);
            let t = sample(&logits, p, &mut rng);
            *l.output_token_logprobs.last_mut().unwrap() = (Some(ls[t as usize]), t);
            out_ids.push(t);
        } else {
            apply_penalties(&mut logits, p, &counts);
            out_ids.push(sample(&logits, p, &mut rng));
        }
        let t = *out_ids.last().unwrap();
        counts.add_output(t);
        if let Some(tk) = tok {
            text.push_str(&detok.push(tk, t).map_err(|e| ModelError::Input(e.to_string()))?);
        }
        if (!p.ignore_eos && eos.contains(&t)) || p.stop_token_ids.contains(&t) {
            finish = FinishReason::StopToken(t);
            break;
        }
        if let Some((pos, s)) = p.stop.iter().filter_map(|s| text.find(s.as_str()).map(|i| (i, s))).min_by_key(|x| x.0) {
            text.truncate(pos);
            finish = FinishReason::StopString(s.clone());
            break;
        }
        if step + 1 == p.max_new_tokens {
            break;
        }
        let pos = (n + step) as u32;
        let ctx = &slots[..n + step + 1];
        let seqs = [AttnSeq { q_start: 0, q_len: 1, slots: ctx }];
        let l = model.forward(&mut kv, &ForwardBatch { tokens: &[t], positions: &[pos], seqs: &seqs, logit_rows: &[0] })?;
        logits = model.backend.download(&l)?;
    }
    if let (Some(tk), FinishReason::Length(_) | FinishReason::StopToken(_)) = (tok, &finish) {
        text.push_str(&detok.flush(tk).map_err(|e| ModelError::Input(e.to_string()))?);
    }
    Ok(GenerateOutput { text, output_ids: out_ids, prompt_tokens: n, finish_reason: finish, logprobs: lp })
}
