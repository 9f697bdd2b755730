//! Synthetic checkpoints (`engine gen-model`): official-layout DeepSeek checkpoints with random
//! weights, for tests, the demo model and benchmarks without a 700 GB download.
mod fp8;
mod presets;
mod writer;

pub use fp8::f32_to_fp8_e4m3fn;
pub use presets::{preset_config, Preset};
pub use writer::{plan_tensors, weight_table, write_checkpoint, GenOptions, PlannedTensor};
