//! `engine info`: what a checkpoint holds.
use std::collections::BTreeMap;
use std::path::Path;

use crate::config::ModelConfig;
use crate::model::mtp::is_mtp_tensor;
use crate::weights::WeightStore;

pub fn run(dir: &Path) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let store = WeightStore::open(dir)?;
    println!("checkpoint: {}", dir.display());
    println!("config:\n{cfg:#?}");
    let (mut params, mut mtp_params) = (0usize, 0usize);
    let mut bytes: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut names: Vec<&str> = store.names().collect();
    names.sort();
    for name in names {
        let t = store.get(name)?;
        let n: usize = t.info.shape.iter().product();
        if name.ends_with("weight_scale_inv") {
            // scales are metadata of FP8 weights, not parameters
        } else if is_mtp_tensor(name, cfg.num_hidden_layers) {
            mtp_params += n;
        } else {
            params += n;
        }
        *bytes.entry(t.info.dtype.safetensors_name()).or_default() += t.bytes.len();
    }
    println!("parameters: {params} ({:.3} B) + MTP {mtp_params} ({:.3} B), skipped by the plain forward pass", params as f64 / 1e9, mtp_params as f64 / 1e9);
    for (d, b) in &bytes {
        println!("weight bytes {d}: {b} ({:.3} GiB)", *b as f64 / (1u64 << 30) as f64);
    }
    let per_layer = cfg.kv_entry_dim();
    let elems = per_layer * cfg.num_hidden_layers;
    println!(
        "kv cache per token: {elems} elements ({per_layer} per layer x {} layers) = {} bytes in bf16, {} bytes in fp8, {} bytes in f32 (cpu backend)",
        cfg.num_hidden_layers,
        elems * 2,
        elems,
        elems * 4
    );
    Ok(())
}
