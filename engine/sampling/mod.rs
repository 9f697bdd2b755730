//! Sampling: parameters (validated, SGLang's names), penalties, logit bias and min_new_tokens, greedy / temperature / top-k /
//! top-p / min-p selection with a seedable generator, and log-probabilities.
mod params;
mod rng;
mod sampler;

pub use params::{SamplingError, SamplingParams};
pub use rng::Rng;
pub use sampler::{apply_bias_and_min_tokens, apply_penalties, argmax, log_softmax, sample, top_logprobs, TokenCounts};
