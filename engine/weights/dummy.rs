//! `--load-format dummy` (SGLang's and vLLM's name): weights made in memory from the model's
//! config.json alone, with no checkpoint files, for benchmarks and start-up checks at full size
//! (DeepSeek-V3 is ~690 GB; a machine with a smaller disk can still serve it). The tensors are
//! exactly those `engine gen-model` would write for that config with seed 0, drawn the same way,
//! so a dummy load and a generated checkpoint give the same outputs. Each tensor is made when a
//! rank asks for it, and a rank keeps only its slice.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::{MmapSlice, TensorInfo};
use crate::config::ModelConfig;
use crate::synth::{plan_tensors, weight_table, PlannedTensor};

pub const DUMMY_SEED: u64 = 0;

pub struct DummyWeights {
    pub path: PathBuf,
    pub infos: HashMap<String, TensorInfo>,
    plan: HashMap<String, PlannedTensor>,
    table: [u8; 256],
}

impl DummyWeights {
    pub fn new(dir: &Path, cfg: &ModelConfig) -> Self {
        let mut infos = HashMap::new();
        let mut plan = HashMap::new();
        for t in plan_tensors(cfg, false).into_iter().flatten() {
            let n: usize = t.shape.iter().product::<usize>() * t.dtype.size();
            infos.insert(t.name.clone(), TensorInfo { dtype: t.dtype, shape: t.shape.clone(), start: 0, end: n });
            plan.insert(t.name.clone(), t);
        }
        DummyWeights { path: dir.join("<dummy weights>"), infos, plan, table: weight_table() }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.plan.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.plan.keys().map(String::as_str)
    }

    /// The tensor's bytes, made now.
    pub fn bytes(&self, name: &str) -> Option<MmapSlice> {
        self.plan.get(name).map(|t| MmapSlice::from_vec(t.bytes(DUMMY_SEED, &self.table)))
    }
}
