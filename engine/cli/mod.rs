//! The `engine` command line (clap): generate, info, gen-model.
mod demo;
pub use demo::{demo_model_path, model_path_or_demo};
mod generate;
mod info;
mod kernels;
mod serve;

use clap::{Parser, Subcommand};

use crate::backend::BackendKind;
use crate::synth::Preset;

#[derive(Parser, Debug)]
#[command(name = "engine", version, about = "AMD-first inference server for DeepSeek V2/V3-class models")]
pub struct Cli {
    /// error, warn, info, debug or trace
    #[arg(long, global = true, default_value = "info", env = "ENGINE_LOG")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate a completion for one prompt (prints SGLang's /generate JSON with --json).
    Generate(generate::GenerateArgs),
    /// Serve the model over HTTP (OpenAI and SGLang APIs).
    Serve(serve::ServeArgs),
    /// Kernel cache: warmup, list, clear
    #[command(subcommand)]
    Kernels(kernels::KernelsCommand),
    /// One-batch benchmark (`engine bench --model-path DIR --batch-size 1,8`), or `engine bench serve`
    Bench(BenchArgs),
    /// Print a checkpoint's parsed config, parameter count, weight bytes and KV-cache size.
    Info {
        /// Checkpoint folder (Hugging Face layout)
        #[arg(long)]
        model_path: std::path::PathBuf,
    },
    /// Write a synthetic checkpoint in the official layout with random weights.
    GenModel {
        #[arg(long, value_enum)]
        preset: Preset,
        #[arg(long)]
        out: std::path::PathBuf,
        /// Decoder layers (default: the preset's)
        #[arg(long)]
        layers: Option<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Write one rank's shapes of an N-way tensor-parallel group (heads, intermediate sizes
        /// and vocabulary divided by N), for timing a rank of a larger deployment on one GPU
        #[arg(long, default_value_t = 1)]
        tp_rank_shapes: usize,
    },
}

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub sub: Option<BenchCommand>,
    #[command(flatten)]
    pub one_batch: crate::bench::one_batch::BenchOneBatchArgs,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Serving benchmark against a running server (like SGLang's bench_serving)
    Serve(crate::bench::serve::BenchServeArgs),
}

/// Where to run: shared by every command that loads a model.
#[derive(clap::Args, Debug, Clone)]
pub struct BackendArgs {
    /// auto tries ROCm, then CUDA, then CPU
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendKind,
    /// auto reads the safetensors files; dummy makes random weights from config.json alone
    #[arg(long, value_enum, default_value = "auto")]
    pub load_format: crate::weights::LoadFormat,
    /// Largest decode batch replayed from a captured CUDA graph (SGLang's flag; default 160, and
    /// for `engine bench` its largest batch size); larger batches run op by op
    #[arg(long)]
    pub cuda_graph_max_bs: Option<usize>,
    /// Run every step op by op (no CUDA graphs)
    #[arg(long)]
    pub disable_cuda_graph: bool,
    /// Inputs of FP8 linear layers and MoE experts from 16 / 512 rows (GPU backends): dynamic
    /// quantises them per token and 128 channels to e4m3 and runs the GEMM library's
    /// block-scaled FP8 GEMM (CUDA: cuBLASLt 12.9+ on Hopper), and FP8 layers of 2-8 rows and
    /// MoE batches of 8-511 tokens the engine's FP8 × FP8 kernels (NVIDIA sm_89+; other layers
    /// and vendors keep f32 inputs), keeps the latent KV cache in bf16, runs attention on bf16 operands (flash
    /// prefill, matrix-unit decode) and gives bf16-weight layers through the GEMM library (the
    /// lm_head from 2 rows) a bf16 input, as SGLang and vLLM run block-FP8 checkpoints; f32 keeps
    /// every activation and the KV cache in f32 (bf16 hi + lo operands: ~1e-5 from the f32 reference,
    /// 2-3x slower prefill); auto follows the checkpoint's quantization_config.activation_scheme
    /// (FP8 checkpoints: dynamic; others: f32)
    #[arg(long, value_enum, default_value = "auto")]
    pub fp8_activations: Fp8Activations,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8Activations {
    Auto,
    F32,
    Dynamic,
}

impl BackendArgs {
    /// The largest graph batch size; 0 when graphs are off.
    pub fn graph_max_bs(&self) -> usize {
        self.graph_max_bs_or(crate::backend::gpu::backend::DEFAULT_GRAPH_MAX_BS)
    }

    /// What a GPU backend starts with, graphs up to `graph_max_bs`.
    pub fn device_opts(&self, graph_max_bs: usize) -> crate::model::DeviceOpts {
        let fp8_activations = match self.fp8_activations {
            Fp8Activations::Auto => None,
            x => Some(x == Fp8Activations::Dynamic),
        };
        crate::model::DeviceOpts { graph_max_bs, fp8_activations }
    }

    /// The same with `default` where `--cuda-graph-max-bs` is not given.
    pub fn graph_max_bs_or(&self, default: usize) -> usize {
        if self.disable_cuda_graph {
            0
        } else {
            self.cuda_graph_max_bs.unwrap_or(default)
        }
    }
}

pub fn main() -> i32 {
    let argv = match serve::apply_config_file(std::env::args().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let cli = Cli::parse_from(argv);
    crate::logging::init(&cli.log_level);
    let result: Result<(), Box<dyn std::error::Error + Send + Sync>> = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Kernels(cmd) => kernels::run(cmd),
        Command::Bench(BenchArgs { sub: Some(BenchCommand::Serve(args)), .. }) => crate::bench::serve::run(args),
        Command::Bench(BenchArgs { sub: None, one_batch }) => crate::bench::one_batch::run(one_batch),
        Command::Info { model_path } => info::run(&model_path),
        Command::GenModel { preset, out, layers, seed, tp_rank_shapes } => {
            let t = std::time::Instant::now();
            crate::synth::write_checkpoint(&out, &crate::synth::GenOptions { preset, layers, seed, tp_rank_shapes }).map(|()| {
                eprintln!("wrote {:?} checkpoint to {} in {:.1}s", preset, out.display(), t.elapsed().as_secs_f64());
            })
        }
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}
