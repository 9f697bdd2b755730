//! One request's state inside the scheduler: its tokens, its KV slots, its sampler, and the
//! incremental output (detokenised text, stop strings, logprobs) it sends back.
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use crate::kv_cache::NodeId;
use crate::runtime::{FinishReason, GenerateOutput, Logprobs, TokenLogprob};
use crate::sampling::{Rng, SamplingParams, TokenCounts};
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

/// What a client asks for.
#[derive(Debug, Clone, Default)]
pub struct RequestSpec {
    pub input_ids: Vec<u32>,
    pub params: SamplingParams,
    pub return_logprob: bool,
    /// First prompt position with input logprobs (None: no input logprobs).
    pub logprob_start_len: Option<usize>,
    pub top_logprobs_num: usize,
}

/// Sent back to the client as the request progresses.
#[derive(Debug, Clone)]
pub enum Event {
    /// New output tokens and the text they complete (text may lag tokens by a held-back suffix).
    Delta { token_ids: Vec<u32>, text: String, logprobs: Vec<TokenLogprob>, top_logprobs: Vec<Vec<(f32, u32)>> },
    Done(GenerateOutput),
    Error(String),
}

pub struct Request {
    pub id: u64,
    pub spec: RequestSpec,
    pub output_ids: Vec<u32>,
    /// KV slots of `tokens()[..slots.len()]` (allocated ahead of the tokens being computed).
    pub slots: Vec<u32>,
    /// Tokens whose latent KV is in the cache.
    pub num_computed: usize,
    /// Leading slots that came from the prefix cache (locked under `cache_node`).
    pub prefix_len: usize,
    pub cache_node: NodeId,
    /// Whether the input logprobs have been produced (they are not recomputed after a retraction).
    pub input_logprobs_done: bool,
    pub rng: Rng,
    pub counts: TokenCounts,
    pub logprobs: Option<Logprobs>,
    detok: IncrementalDecoder,
    text: String,
    /// Bytes of `text` already sent.
    sent: usize,
    pub out: UnboundedSender<Event>,
    pub arrival: Instant,
    pub last_token_at: Option<Instant>,
    pub finish: Option<FinishReason>,
}

impl Request {
    pub fn new(id: u64, spec: RequestSpec, out: UnboundedSender<Event>) -> Self {
        let seed = spec.params.seed.unwrap_or_else(|| id.wrapping_mul(0x9e3779b97f4a7c15) ^ std::process::id() as u64 ^ Instant::now().elapsed().as_nanos() as u64);
        let detok = IncrementalDecoder::new(&spec.input_ids, spec.params.skip_special_tokens);
        let counts = TokenCounts::new(&spec.input_ids);
        let logprobs = spec.return_logprob.then(Logprobs::default);
        let input_logprobs_done = spec.logprob_start_len.is_none() || !spec.return_logprob;
        Request {
            id,
            output_ids: vec![],
            slots: vec![],
            num_computed: 0,
            prefix_len: 0,
            cache_node: 0,
            input_logprobs_done,
            rng: Rng::new(seed),
            counts,
            logprobs,
            detok,
            text: String::new(),
            sent: 0,
            out,
            arrival: Instant::now(),
            last_token_at: None,
            finish: None,
            spec,
        }
    }

    pub fn prompt_len(&self) -> usize {
        self.spec.input_ids.len()
    }

    /// Prompt then output so far.
    pub fn tokens(&self) -> Vec<u32> {
        let mut t = self.spec.input_ids.clone();
        t.extend_from_slice(&self.output_ids);
        t
    }

    pub fn num_tokens(&self) -> usize {
        self.spec.input_ids.len() + self.output_ids.len()
    }

    pub fn token_at(&self, i: usize) -> u32 {
        let p = self.spec.input_ids.len();
        if i < p { self.spec.input_ids[i] } else { self.output_ids[i - p] }
    }

    /// Longest prefix the cache may supply: at least one token must be computed (for its logits),
    /// and prompt positions that need input logprobs must be computed too.
    pub fn max_cached_prefix(&self) -> usize {
        let mut limit = self.num_tokens() - 1;
        if !self.input_logprobs_done {
            limit = limit.min(self.spec.logprob_start_len.unwrap_or(0));
        }
        limit
    }

    /// Records the sampled token and its logprob info; returns true when the request is finished.
    pub fn push_token(&mut self, tok: Option<&Tokenizer>, eos: &[u32], t: u32, lp: Option<(f32, Vec<(f32, u32)>)>) -> bool {
        let p = &self.spec.params;
        self.output_ids.push(t);
        self.counts.add_output(t);
        if let (Some(l), Some((lp, top))) = (self.logprobs.as_mut(), lp) {
            l.output_token_logprobs.push((Some(lp), t));
            l.output_top_logprobs.push(top);
        }
        if let Some(tk) = tok {
            match self.detok.push(tk, t) {
                Ok(s) => self.text.push_str(&s),
                Err(e) => log::warn!("request {}: detokenize: {e}", self.id),
            }
        }
        // no stop before min_new_tokens tokens are out (their stop tokens were masked too)
        let may_stop = self.output_ids.len() > p.min_new_tokens;
        let finish = if may_stop && ((!p.ignore_eos && eos.contains(&t)) || p.stop_token_ids.contains(&t)) {
            Some(FinishReason::StopToken(t))
        } else if let Some((pos, s)) = p.stop.iter().filter_map(|s| self.text[self.sent..].find(s.as_str()).map(|i| (self.sent + i, s))).filter(|_| may_stop).min_by_key(|x| x.0) {
            self.text.truncate(if p.no_stop_trim { pos + s.len() } else { pos });
            Some(FinishReason::StopString(s.clone()))
        } else if self.output_ids.len() >= p.max_new_tokens {
            Some(FinishReason::Length(p.max_new_tokens))
        } else {
            None
        };
        if let (Some(f), Some(tk)) = (&finish, tok) {
            if !matches!(f, FinishReason::StopString(_)) {
                if let Ok(s) = self.detok.flush(tk) {
                    self.text.push_str(&s);
                }
            }
        }
        self.finish = finish;
        self.finish.is_some()
    }

    /// Text that can be sent now: everything when finished, else all but a suffix that could still
    /// grow into a stop string.
    fn releasable(&self) -> usize {
        if self.finish.is_some() {
            return self.text.len();
        }
        let mut hold = 0;
        for s in &self.spec.params.stop {
            for k in (1..s.len()).rev() {
                if s.is_char_boundary(k) && self.text.ends_with(&s[..k]) {
                    hold = hold.max(k);
                    break;
                }
            }
        }
        self.text.len() - hold
    }

    /// The delta since the last call (tokens from `from_token`).
    pub fn take_delta(&mut self, from_token: usize) -> Event {
        let end = self.releasable().max(self.sent);
        let text = self.text[self.sent..end].to_string();
        self.sent = end;
        let (logprobs, top_logprobs) = match &self.logprobs {
            Some(l) => (l.output_token_logprobs[from_token..].to_vec(), l.output_top_logprobs[from_token..].to_vec()),
            None => (vec![], vec![]),
        };
        Event::Delta { token_ids: self.output_ids[from_token..].to_vec(), text, logprobs, top_logprobs }
    }

    pub fn output(&self) -> GenerateOutput {
        GenerateOutput {
            text: self.text.clone(),
            output_ids: self.output_ids.clone(),
            prompt_tokens: self.prompt_len(),
            finish_reason: self.finish.clone().unwrap_or(FinishReason::Abort("unfinished".into())),
            logprobs: self.logprobs.clone(),
        }
    }
}
