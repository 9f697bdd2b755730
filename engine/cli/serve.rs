//! `engine serve`: SGLang's flags, an optional TOML preset (`--config`, flags override it), the
//! engine thread and the HTTP server.
use std::path::PathBuf;
use std::sync::Arc;

use super::BackendArgs;
use crate::backend::{cpu::CpuBackend, BackendKind};
use crate::model::{launch, Model, RankBackend, Role};
use crate::scheduler::{spawn_engine, SchedulePolicy, SchedulerConfig};
use crate::server::{serve, App};
use crate::tokenizer::Tokenizer;

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Checkpoint folder (Hugging Face layout); default: the built-in tiny demo model (random weights)
    #[arg(long)]
    pub model_path: Option<PathBuf>,
    #[command(flatten)]
    pub backend: BackendArgs,
    #[command(flatten)]
    pub dist: crate::dist::DistArgs,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 30000)]
    pub port: u16,
    /// Model name reported by /v1/models and accepted in requests (default: the model path)
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health
    #[arg(long)]
    pub api_key: Option<String>,
    /// Maximum tokens of prompt plus output (default: the model's max_position_embeddings)
    #[arg(long)]
    pub context_length: Option<usize>,
    #[arg(long, default_value_t = 128)]
    pub max_running_requests: usize,
    /// Size of the KV pool in tokens (default: what fits in 2 GiB on the CPU backend)
    #[arg(long)]
    pub max_total_tokens: Option<usize>,
    /// Token budget of one step; long prompts are prefilled in chunks of this size (-1: no chunking)
    #[arg(long, default_value_t = 2048, allow_negative_numbers = true)]
    pub chunked_prefill_size: i64,
    /// Fraction of GPU memory for weights and KV cache (GPU backends; ignored on the CPU)
    #[arg(long)]
    pub mem_fraction_static: Option<f32>,
    #[arg(long, value_enum, default_value = "fcfs")]
    pub schedule_policy: SchedulePolicy,
    /// Turn off the radix prefix cache
    #[arg(long)]
    pub disable_radix_cache: bool,
    /// Split chat output into reasoning_content and content (deepseek-r1)
    #[arg(long, value_parser = ["deepseek-r1"])]
    pub reasoning_parser: Option<String>,
    /// Seconds to wait for in-flight requests after SIGTERM
    #[arg(long, default_value_t = 30)]
    pub shutdown_timeout: u64,
    /// TOML preset whose keys are these flags' names (flags on the command line win)
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Inserts the keys of `--config FILE.toml` as flags that the command line does not already set.
pub fn apply_config_file(argv: Vec<String>) -> Result<Vec<String>, String> {
    use clap::CommandFactory;
    let Some(pos) = argv.iter().position(|a| a == "--config" || a.starts_with("--config=")) else { return Ok(argv) };
    let path = if let Some(p) = argv[pos].strip_prefix("--config=") { p.to_string() } else { argv.get(pos + 1).cloned().ok_or("--config needs a file")? };
    let text = std::fs::read_to_string(&path).map_err(|e| format!("--config {path}: {e}"))?;
    let table: toml::Table = text.parse().map_err(|e| format!("--config {path}: not valid TOML: {e}"))?;
    let cmd = super::Cli::command();
    let serve = cmd.find_subcommand("serve").expect("serve subcommand");
    let known: Vec<String> = serve.get_arguments().filter_map(|a| a.get_long().map(str::to_string)).collect();
    let mut extra = Vec::new();
    for (key, value) in table {
        let flag = key.replace('_', "-");
        if !known.contains(&flag) || flag == "config" {
            return Err(format!("--config {path}: unknown key `{key}` (not a flag of `engine serve`)"));
        }
        if argv.iter().any(|a| a == &format!("--{flag}") || a.starts_with(&format!("--{flag}="))) {
            continue; // the command line wins
        }
        match value {
            toml::Value::Boolean(true) => extra.push(format!("--{flag}")),
            toml::Value::Boolean(false) => {}
            toml::Value::String(s) => extra.push(format!("--{flag}={s}")),
            toml::Value::Integer(i) => extra.push(format!("--{flag}={i}")),
            toml::Value::Float(f) => extra.push(format!("--{flag}={f}")),
            other => return Err(format!("--config {path}: key `{key}` has an unsupported value {other}")),
        }
    }
    let mut out = argv;
    out.extend(extra);
    Ok(out)
}

/// KV pool size in tokens. On a GPU (SGLang's rule): weights plus KV take `mem_fraction_static` of
/// the device memory, so the KV gets that share minus what is already in use. On the CPU: 2 GiB.
fn default_pool_tokens<B: crate::backend::Backend>(model: &Model<B>, context: usize, mem_fraction_static: Option<f32>) -> Result<usize, String> {
    let cfg = &model.cfg;
    let per_token = cfg.kv_entry_dim() * cfg.num_hidden_layers * model.backend.kv_element_bytes();
    let budget = match model.backend.memory_info() {
        Some((free, total)) => {
            let frac = mem_fraction_static.unwrap_or(0.88) as f64;
            if !(frac > 0.0 && frac <= 1.0) {
                return Err(format!("--mem-fraction-static must be in (0, 1], got {frac}"));
            }
            let used = total - free;
            let budget = (total as f64 * frac) as usize;
            if budget <= used {
                return Err(format!(
                    "--mem-fraction-static {frac} leaves no room for the KV cache: weights and buffers already use {:.1} GiB of {:.1} GiB",
                    used as f64 / (1u64 << 30) as f64,
                    total as f64 / (1u64 << 30) as f64
                ));
            }
            budget - used
        }
        None => 2usize << 30,
    };
    let tokens = budget / per_token.max(1);
    if tokens < context.min(4096) {
        return Err(format!("the KV cache budget of {budget} bytes holds only {tokens} tokens"));
    }
    Ok(tokens.min(if model.backend.memory_info().is_some() { 1 << 24 } else { 1 << 18 }))
}

pub fn run(a: ServeArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let kind = a.backend.backend.resolve()?;
    let path = super::demo::model_path_or_demo(&a.model_path)?;
    match kind {
        BackendKind::Cuda => run_on::<crate::backend::cuda::CudaBackend>(a, path),
        BackendKind::Rocm => run_on::<crate::backend::rocm::RocmBackend>(a, path),
        _ => {
            if a.mem_fraction_static.is_some() {
                log::info!("--mem-fraction-static applies to GPU backends; the CPU backend sizes its KV pool from --max-total-tokens");
            }
            run_on::<CpuBackend>(a, path)
        }
    }
}

fn run_on<B: RankBackend>(a: ServeArgs, path: PathBuf) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let t0 = std::time::Instant::now();
    let par = a.dist.validate()?;
    let model = match launch::<B>(&path, &par, a.backend.load_format, a.backend.device_opts(a.backend.graph_max_bs()))? {
        Role::Lead(m) => Arc::new(m),
        Role::FollowerDone => return Ok(()),
    };
    let tok = Tokenizer::load_if_present(&path)?.map(Arc::new);
    if tok.is_none() {
        log::warn!("{} has no tokenizer.json: only token-id prompts will work", path.display());
    }
    let max_pos = model.cfg.max_position_embeddings;
    let context_length = match a.context_length {
        Some(c) if c > max_pos => {
            log::warn!("--context-length {c} exceeds the model's max_position_embeddings {max_pos}");
            c
        }
        Some(c) => c,
        None => max_pos,
    };
    let max_total_tokens = match a.max_total_tokens {
        Some(n) => n,
        None => default_pool_tokens(&model, context_length, a.mem_fraction_static)?,
    };
    let chunk = if a.chunked_prefill_size <= 0 { usize::MAX } else { a.chunked_prefill_size as usize };
    let cfg = SchedulerConfig { max_running_requests: a.max_running_requests.max(1), chunked_prefill_size: chunk, policy: a.schedule_policy };
    let name = match (&a.served_model_name, &a.model_path) {
        (Some(n), _) => n.clone(),
        (None, Some(p)) => p.display().to_string(),
        (None, None) => "engine-demo-tiny-v3".to_string(),
    };
    log::info!(
        "loaded {} on {} in {:.2}s: context {context_length}, KV pool {max_total_tokens} tokens, radix cache {}, max running {}",
        path.display(),
        model.backend_name(),
        t0.elapsed().as_secs_f64(),
        if a.disable_radix_cache { "off" } else { "on" },
        cfg.max_running_requests
    );
    let server_args = serde_json::json!({
        "model_path": path.display().to_string(), "backend": model.backend_name(), "load_format": format!("{:?}", a.backend.load_format).to_lowercase(),
        "tp_size": par.world, "ep_size": par.ep_size(), "dp_size": par.dp_size(),
        "enable_dp_attention": par.dp_attention, "nnodes": par.nnodes, "node_rank": par.node_rank, "dist_init_addr": par.init_addr,
        "dist_timeout": par.timeout.as_secs(), "chunked_prefill_size": a.chunked_prefill_size, "max_running_requests": cfg.max_running_requests,
        "schedule_policy": format!("{:?}", a.schedule_policy).to_lowercase(), "disable_radix_cache": a.disable_radix_cache,
        "mem_fraction_static": a.mem_fraction_static, "reasoning_parser": a.reasoning_parser, "host": a.host, "port": a.port,
    });
    let handle = spawn_engine(model.clone(), tok, cfg, max_total_tokens, !a.disable_radix_cache, path.display().to_string(), context_length)?;
    let app = App::new(handle, name, a.api_key.clone(), a.reasoning_parser.is_some()).with_server_args(server_args);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port)).await.map_err(|e| format!("cannot bind {}:{}: {e}", a.host, a.port))?;
        eprintln!("engine is ready: http://{}", listener.local_addr()?);
        serve(app, listener, std::time::Duration::from_secs(a.shutdown_timeout)).await?;
        model.stop_followers();
        Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    })?;
    log::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// Every preset under configs/presets parses as `engine serve` flags and gives a valid layout
    /// that divides DeepSeek-V3's heads, intermediate sizes and experts.
    #[test]
    fn presets_are_valid_serve_flags() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/presets");
        let v3 = crate::config::ModelConfig::from_file(&dir.join("../models/deepseek-v3/config.json")).unwrap();
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_none_or(|x| x != "toml") {
                continue;
            }
            let argv = vec!["engine".into(), "serve".into(), "--config".into(), p.display().to_string(), "--dist-init-addr".into(), "10.0.0.1:5000".into()];
            let argv = apply_config_file(argv).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let cli = crate::cli::Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let crate::cli::Command::Serve(a) = cli.command else { panic!("not serve") };
            let par = a.dist.validate().unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert!(par.world > 1, "{}", p.display());
            for (what, k) in [("heads", v3.num_attention_heads), ("intermediate", v3.intermediate_size), ("moe_intermediate", v3.moe_intermediate_size), ("vocab", v3.vocab_size)] {
                assert_eq!(k % par.world, 0, "{}: {what} {k} not divisible by tp {}", p.display(), par.world);
            }
            n += 1;
        }
        assert!(n >= 5, "found {n} presets");
    }
}
