//! The embedded default model: the tiny synthetic DeepSeek-V3 (random weights), written once into
//! the cache folder and loaded from there like any checkpoint.
use std::path::PathBuf;

use crate::synth::{write_checkpoint, GenOptions, Preset};

pub const DEMO_SEED: u64 = 0;

fn cache_root() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("engine");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache/engine"),
        None => std::env::temp_dir().join("engine-cache"),
    }
}

/// The demo checkpoint's folder, generating it on first use.
pub fn demo_model_path() -> Result<PathBuf, Box<dyn std::error::Error + Send + Sync>> {
    let dir = cache_root().join(format!("demo/tiny-v3-seed{DEMO_SEED}-{}", env!("CARGO_PKG_VERSION")));
    if !dir.join("config.json").exists() {
        let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
        write_checkpoint(&tmp, &GenOptions { preset: Preset::TinyV3, layers: None, seed: DEMO_SEED, tp_rank_shapes: 1 })?;
        if std::fs::rename(&tmp, &dir).is_err() && !dir.join("config.json").exists() {
            return Err(format!("cannot create demo model folder {}", dir.display()).into());
        }
        let _ = std::fs::remove_dir_all(&tmp);
    }
    log::warn!("no --model-path: using the built-in tiny DeepSeek-V3 demo model; its weights are RANDOM, so its output is gibberish ({})", dir.display());
    Ok(dir)
}

/// The checkpoint a command loads: `--model-path` when given, else the demo model.
pub fn model_path_or_demo(model_path: &Option<PathBuf>) -> Result<PathBuf, Box<dyn std::error::Error + Send + Sync>> {
    match model_path {
        Some(p) => Ok(p.clone()),
        None => demo_model_path(),
    }
}
