//! `engine kernels warmup|list|clear`: the kernel cache from the command line. `warmup` compiles
//! every kernel a model needs for the local GPU or, with `--arch`, for a named architecture on a
//! machine with no GPU at all (image builders).
use std::path::PathBuf;

use clap::Subcommand;

use crate::backend::gpu::kernel_cache::KernelCache;
use crate::backend::gpu::source::Vendor;
use crate::backend::gpu::{modules_for, Jit, KernelCompiler, ModelDims};
use crate::config::ModelConfig;

#[derive(Subcommand, Debug)]
pub enum KernelsCommand {
    /// Compile every kernel the model needs into the cache
    Warmup {
        #[arg(long)]
        model_path: PathBuf,
        /// Tensor-parallel degree (kernels are specialised on head dims, which TP does not change)
        #[arg(long, default_value_t = 1)]
        tp: usize,
        /// Target architecture (sm_90a, gfx942, gfx950); default: the local GPU's
        #[arg(long)]
        arch: Option<String>,
    },
    /// Write the assembled kernel sources (what the JIT compiles) for an architecture into a folder,
    /// for offline compile checks
    Source {
        #[arg(long)]
        model_path: PathBuf,
        #[arg(long)]
        arch: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// List cached kernels
    List,
    /// Remove every cached kernel
    Clear,
}

/// The compiler for an architecture name.
pub fn compiler_for(arch: &str) -> Result<(Box<dyn KernelCompiler>, Vendor), Box<dyn std::error::Error + Send + Sync>> {
    if arch.starts_with("sm_") {
        Ok((Box::new(crate::backend::gpu::nvrtc::NvrtcCompiler::new(arch)?), Vendor::Nvidia))
    } else if arch.starts_with("gfx") {
        Ok((Box::new(crate::backend::gpu::hiprtc::HiprtcCompiler::new(arch)?), Vendor::Amd))
    } else {
        Err(format!("unknown architecture {arch:?} (expected sm_XX or gfxXXX)").into())
    }
}

pub fn run(cmd: KernelsCommand) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let cache = KernelCache::from_env();
    match cmd {
        KernelsCommand::List => {
            let list = cache.list();
            println!("kernel cache {}: {} entries", cache.dir.display(), list.len());
            for e in list {
                match e.meta {
                    Some(m) => println!("{}  {:>9} B  {}  {}  {}  {:?}", &e.key[..16], e.bytes, m.arch, m.compiler, m.file, m.defines),
                    None => println!("{}  {:>9} B  (corrupt: will be rebuilt)", &e.key[..16], e.bytes),
                }
            }
        }
        KernelsCommand::Source { model_path, arch, out } => {
            let cfg = ModelConfig::from_file(&model_path.join("config.json"))?;
            let vendor = if arch.starts_with("gfx") { Vendor::Amd } else if arch.starts_with("sm_") { Vendor::Nvidia } else { return Err(format!("unknown architecture {arch:?}").into()) };
            std::fs::create_dir_all(&out)?;
            for m in modules_for(ModelDims::of(&cfg), vendor) {
                let src = crate::backend::gpu::source::assemble(m.file, &m.defines, vendor)?;
                let stem = m.file.rsplit('/').next().unwrap().trim_end_matches(".hip");
                let bf16 = m.defines.iter().any(|(k, v)| k == "FB_PARTS" && v == "1");
                let name = if m.file.ends_with("mla.hip") {
                    format!("{stem}_{}.hip", ModelDims::of(&cfg).kv_lora_rank)
                } else if bf16 {
                    format!("{stem}_bf16.hip") // the flash prefill's --fp8-activations dynamic form
                } else {
                    format!("{stem}.hip")
                };
                std::fs::write(out.join(&name), src)?;
                println!("{}", out.join(&name).display());
            }
        }
        KernelsCommand::Clear => {
            let n = cache.clear();
            println!("removed {n} entries from {}", cache.dir.display());
        }
        KernelsCommand::Warmup { model_path, tp, arch } => {
            let cfg = ModelConfig::from_file(&model_path.join("config.json"))?;
            if tp == 0 || cfg.num_attention_heads % tp != 0 {
                return Err(format!("--tp {tp} must divide num_attention_heads {}", cfg.num_attention_heads).into());
            }
            let arch = match arch {
                Some(a) => a,
                None => match crate::backend::rocm::probe() {
                    Ok(p) => p.archs[0].target.to_string(),
                    Err(rocm) => crate::backend::cuda::local_arch().map_err(|e| format!("no --arch given and no local GPU (rocm: {}; cuda: {e})", rocm.reason))?,
                },
            };
            let (compiler, vendor) = compiler_for(&arch)?;
            let jit = Jit::new(cache, compiler, vendor);
            let t = std::time::Instant::now();
            let modules = modules_for(ModelDims::of(&cfg), vendor);
            for m in &modules {
                jit.binary(m)?;
            }
            let (hits, compiles) = jit.stats();
            println!(
                "warmed {} kernel modules for {arch} in {:.1}s: {compiles} compiled, {hits} already cached ({})",
                modules.len(),
                t.elapsed().as_secs_f64(),
                jit.cache.dir.display()
            );
        }
    }
    Ok(())
}
