//! `engine generate`: one prompt through the model, printed as text or as SGLang's /generate JSON.
use std::path::PathBuf;

use super::BackendArgs;
use crate::backend::{cpu::CpuBackend, BackendKind};
use crate::model::{launch, RankBackend, Role};
use crate::runtime::{generate, GenerateRequest};
use crate::sampling::SamplingParams;
use crate::tokenizer::{ChatMessage, Tokenizer};

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// Checkpoint folder (Hugging Face layout); default: the built-in tiny demo model
    #[arg(long)]
    pub model_path: Option<PathBuf>,
    #[command(flatten)]
    pub backend: BackendArgs,
    #[command(flatten)]
    pub dist: crate::dist::DistArgs,
    /// Prompt text (tokenized with special tokens, as SGLang does)
    #[arg(long, conflicts_with = "input_ids", required_unless_present = "input_ids")]
    pub prompt: Option<String>,
    /// Wrap --prompt as one user message in the model's chat template
    #[arg(long, requires = "prompt")]
    pub chat: bool,
    /// Token ids, comma-separated (e.g. 0,5,7)
    #[arg(long, value_delimiter = ',')]
    pub input_ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 (the default here) is greedy
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    /// -1 disables
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub top_k: i64,
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f32,
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f32,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop string (repeatable)
    #[arg(long)]
    pub stop: Vec<String>,
    #[arg(long, value_delimiter = ',')]
    pub stop_token_ids: Vec<u32>,
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print SGLang's /generate response object
    #[arg(long)]
    pub json: bool,
    #[arg(long)]
    pub return_logprob: bool,
    #[arg(long, default_value_t = 0)]
    pub logprob_start_len: usize,
    #[arg(long, default_value_t = 0)]
    pub top_logprobs_num: usize,
}

pub fn run(a: GenerateArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let kind = a.backend.backend.resolve()?;
    let path = super::demo::model_path_or_demo(&a.model_path)?;
    match kind {
        BackendKind::Cuda => run_on::<crate::backend::cuda::CudaBackend>(a, path),
        BackendKind::Rocm => run_on::<crate::backend::rocm::RocmBackend>(a, path),
        _ => run_on::<CpuBackend>(a, path),
    }
}

fn run_on<B: RankBackend>(a: GenerateArgs, path: PathBuf) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let t0 = std::time::Instant::now();
    let model = match launch::<B>(&path, &a.dist.validate()?, a.backend.load_format, a.backend.device_opts(a.backend.graph_max_bs()))? {
        Role::Lead(m) => std::sync::Arc::new(m),
        Role::FollowerDone => return Ok(()),
    };
    let tok = Tokenizer::load_if_present(&path)?.map(std::sync::Arc::new);
    log::info!("loaded {} on {} in {:.2}s", path.display(), model.backend_name(), t0.elapsed().as_secs_f64());
    let input_ids = match (&a.input_ids, &a.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(text)) => {
            let tok = tok.as_ref().ok_or_else(|| format!("{} has no tokenizer.json: pass --input-ids instead of --prompt", path.display()))?;
            if a.chat {
                tok.encode_chat(&[ChatMessage::new("user", text)], true)?
            } else {
                tok.encode(text, true)?
            }
        }
        (None, None) => unreachable!("clap requires one"),
    };
    let req = GenerateRequest {
        input_ids,
        params: SamplingParams {
            max_new_tokens: a.max_new_tokens,
            temperature: a.temperature,
            top_p: a.top_p,
            top_k: a.top_k,
            min_p: a.min_p,
            repetition_penalty: a.repetition_penalty,
            frequency_penalty: a.frequency_penalty,
            presence_penalty: a.presence_penalty,
            seed: a.seed,
            stop: a.stop.clone(),
            stop_token_ids: a.stop_token_ids.clone(),
            ignore_eos: a.ignore_eos,
            ..Default::default()
        },
        return_logprob: a.return_logprob,
        logprob_start_len: a.logprob_start_len,
        top_logprobs_num: a.top_logprobs_num,
    };
    let t1 = std::time::Instant::now();
    let out = generate(&model, tok, &req);
    model.stop_followers();
    let out = out?;
    let secs = t1.elapsed().as_secs_f64();
    if a.json {
        println!("{}", serde_json::to_string(&out.to_json())?);
    } else {
        println!("{}", out.text);
    }
    log::info!(
        "{} prompt + {} generated tokens in {:.2}s ({:.1} tok/s), finish: {}",
        out.prompt_tokens,
        out.output_ids.len(),
        secs,
        out.output_ids.len() as f64 / secs.max(1e-9),
        out.finish_reason.to_json()
    );
    Ok(())
}
