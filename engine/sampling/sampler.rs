//! Penalties, token selection and log-probabilities over one row of logits.
use std::collections::HashMap;

use super::{Rng, SamplingParams};

/// Occurrences of each token: in the prompt (repetition penalty) and in the output so far
/// (repetition, frequency and presence penalties).
#[derive(Debug, Default, Clone)]
pub struct TokenCounts {
    pub prompt: HashMap<u32, u32>,
    pub output: HashMap<u32, u32>,
}

impl TokenCounts {
    pub fn new(prompt: &[u32]) -> Self {
        let mut c = TokenCounts::default();
        for &t in prompt {
            *c.prompt.entry(t).or_default() += 1;
        }
        c
    }
    pub fn add_output(&mut self, t: u32) {
        *self.output.entry(t).or_default() += 1;
    }
}

/// Repetition penalty (HF semantics: positive logits divided, negative multiplied, over prompt and
/// output tokens) and OpenAI frequency/presence penalties (over output tokens).
pub fn apply_penalties(logits: &mut [f32], p: &SamplingParams, counts: &TokenCounts) {
    if p.repetition_penalty != 1.0 {
        let r = p.repetition_penalty;
        for &t in counts.prompt.keys().chain(counts.output.keys()) {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l > 0.0 { *l / r } else { *l * r };
            }
        }
        // a token in both maps was penalised twice: undo one
        for t in counts.prompt.keys().filter(|t| counts.output.contains_key(t)) {
            if let Some(l) = logits.get_mut(*t as usize) {
                *l = if *l > 0.0 { *l * r } else { *l / r };
            }
        }
    }
    if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
        for (&t, &n) in &counts.output {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= p.frequency_penalty * n as f32 + p.presence_penalty;
            }
        }
    }
}

/// OpenAI's logit bias, and `min_new_tokens`: while fewer than that many tokens are out
/// (`generated`), EOS (`eos`) and the request's stop token ids cannot be sampled.
pub fn apply_bias_and_min_tokens(logits: &mut [f32], p: &SamplingParams, eos: &[u32], generated: usize) {
    for &(t, b) in &p.logit_bias {
        if let Some(l) = logits.get_mut(t as usize) {
            *l += b;
        }
    }
    if generated < p.min_new_tokens {
        for &t in eos.iter().chain(&p.stop_token_ids) {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

/// log-softmax in f64 accumulation.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
    logits.iter().map(|&x| (x as f64 - lse) as f32).collect()
}

/// The `n` most likely (logprob, id), best first (ties to the lower id).
pub fn top_logprobs(logprobs: &[f32], n: usize) -> Vec<(f32, u32)> {
    let mut idx: Vec<u32> = (0..logprobs.len() as u32).collect();
    let n = n.min(idx.len());
    if n == 0 {
        return vec![];
    }
    let cmp = |a: &u32, b: &u32| logprobs[*b as usize].partial_cmp(&logprobs[*a as usize]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(b));
    idx.select_nth_unstable_by(n - 1, cmp);
    idx.truncate(n);
    idx.sort_by(cmp);
    idx.into_iter().map(|i| (logprobs[i as usize], i)).collect()
}

/// Index of the first largest value (greedy decoding).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// Picks the next token from (penalised) logits.
pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut Rng) -> u32 {
    if p.is_greedy() {
        return argmax(logits);
    }
    let inv_t = 1.0 / p.temperature as f64;
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut cand: Vec<(f64, u32)> = logits.iter().enumerate().map(|(i, &l)| (((l as f64 - m) * inv_t).exp(), i as u32)).filter(|(w, _)| *w > 0.0).collect();
    cand.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
    if p.top_k > 0 {
        cand.truncate(p.top_k as usize);
    }
    let total: f64 = cand.iter().map(|c| c.0).sum();
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = cand.len();
        for (i, c) in cand.iter().enumerate() {
            acc += c.0 / total;
            if acc >= p.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        cand.truncate(keep.max(1));
    }
    if p.min_p > 0.0 {
        let floor = cand[0].0 * p.min_p as f64;
        cand.retain(|c| c.0 >= floor);
    }
    let total: f64 = cand.iter().map(|c| c.0).sum();
    let mut u = rng.uniform() * total;
    for c in &cand {
        if u < c.0 {
            return c.1;
        }
        u -= c.0;
    }
    cand.last().unwrap().1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logit_bias_and_min_new_tokens() {
        // EOS 3 and stop id 1 lead; masked while fewer than 2 tokens are out; a bias moves token 0
        let logits = [0.0f32, 5.0, 1.0, 9.0];
        let p = SamplingParams { temperature: 0.0, stop_token_ids: vec![1], min_new_tokens: 2, logit_bias: vec![(0, 1.5), (99, 3.0)], ..Default::default() };
        let mut l = logits.to_vec();
        apply_bias_and_min_tokens(&mut l, &p, &[3], 1);
        assert_eq!(l, [1.5, f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY]);
        assert_eq!(sample(&l, &p, &mut Rng::new(1)), 0);
        let hot = SamplingParams { temperature: 1.0, ..p.clone() };
        let mut rng = Rng::new(5);
        assert!((0..300).all(|_| matches!(sample(&l, &hot, &mut rng), 0 | 2)));
        let mut l = logits.to_vec();
        apply_bias_and_min_tokens(&mut l, &p, &[3], 2);
        assert_eq!(l, [1.5, 5.0, 1.0, 9.0]);
        assert!(p.adjusts_logits(5) && SamplingParams { min_new_tokens: 2, ..Default::default() }.adjusts_logits(1));
        assert!(!SamplingParams { min_new_tokens: 2, ..Default::default() }.adjusts_logits(2));
    }

    #[test]
    fn greedy_and_filters() {
        let logits = [1.0, 3.0, 2.0, -1.0];
        let mut rng = Rng::new(1);
        assert_eq!(sample(&logits, &SamplingParams { temperature: 0.0, ..Default::default() }, &mut rng), 1);
        let k1 = SamplingParams { top_k: 2, temperature: 1.0, ..Default::default() };
        for _ in 0..200 {
            let t = sample(&logits, &k1, &mut rng);
            assert!(t == 1 || t == 2);
        }
        let p = SamplingParams { top_p: 0.5, ..Default::default() };
        for _ in 0..200 {
            assert_eq!(sample(&logits, &p, &mut rng), 1);
        }
        let mp = SamplingParams { min_p: 0.3, ..Default::default() };
        for _ in 0..200 {
            let t = sample(&logits, &mp, &mut rng);
            assert!(t == 1 || t == 2, "min_p keeps tokens with p >= 0.3 p_max (e^-1 = 0.37)");
        }
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        let logits = [0.0f32, (2.0f32).ln(), (7.0f32).ln()]; // p = 0.1, 0.2, 0.7
        let p = SamplingParams::default();
        let mut rng = Rng::new(42);
        let mut n = [0usize; 3];
        for _ in 0..20000 {
            n[sample(&logits, &p, &mut rng) as usize] += 1;
        }
        assert!((n[0] as f64 / 20000.0 - 0.1).abs() < 0.015, "{n:?}");
        assert!((n[2] as f64 / 20000.0 - 0.7).abs() < 0.015, "{n:?}");
        let a: Vec<u32> = { let mut r = Rng::new(9); (0..50).map(|_| sample(&logits, &p, &mut r)).collect() };
        let b: Vec<u32> = { let mut r = Rng::new(9); (0..50).map(|_| sample(&logits, &p, &mut r)).collect() };
        assert_eq!(a, b);
    }

    #[test]
    fn penalties() {
        let mut l = vec![2.0, -2.0, 1.0, 0.5];
        let mut c = TokenCounts::new(&[0, 1]);
        c.add_output(2);
        c.add_output(2);
        c.add_output(0);
        let p = SamplingParams { repetition_penalty: 2.0, frequency_penalty: 0.5, presence_penalty: 0.25, ..Default::default() };
        apply_penalties(&mut l, &p, &c);
        assert_eq!(l, vec![2.0 / 2.0 - 0.75, -4.0, 1.0 / 2.0 - 1.25, 0.5]);
    }

    #[test]
    fn log_softmax_and_top() {
        let lp = log_softmax(&[1.0, 2.0, 3.0]);
        let z: f64 = lp.iter().map(|x| (*x as f64).exp()).sum();
        assert!((z - 1.0).abs() < 1e-6);
        assert_eq!(top_logprobs(&lp, 2).iter().map(|x| x.1).collect::<Vec<_>>(), vec![2, 1]);
    }
}
