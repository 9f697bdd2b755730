//! Checkpoint weights: safetensors files (single or sharded, memory-mapped), dtypes, FP8 blocks.
mod absorb;
pub mod act_quant;
mod dtype;
mod dummy;
pub mod fnuz;
mod host;
mod host_slice;
mod progress;
mod safetensors;
mod store;

pub use absorb::wuk_transposed;
pub use dtype::{bf16_to_f32, f16_to_f32, fp8_e4m3fn_to_f32, DType};
pub use host::{HostLinear, LinearData};
pub use progress::Progress;
pub use safetensors::{write_safetensors, write_safetensors_with, MmapSlice, SafetensorsFile, TensorInfo};
pub use dummy::DUMMY_SEED;
pub use store::{LoadFormat, TensorView, WeightStore};

use std::path::PathBuf;

/// An error reading weights, naming the file and the tensor.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("{file}: {msg}")]
    File { file: PathBuf, msg: String },
    #[error("{file}: tensor `{tensor}`: {msg}")]
    Tensor { file: PathBuf, tensor: String, msg: String },
    #[error("tensor `{tensor}` is missing from the checkpoint in {dir} (looked in {looked})")]
    Missing { tensor: String, dir: PathBuf, looked: String },
}
