//! Running requests on a model: the single-request generation loop and its SGLang-shaped output.
mod generate;
mod output;

pub use generate::{generate, GenerateRequest};
pub use output::{FinishReason, GenerateOutput, Logprobs, TokenLogprob};
