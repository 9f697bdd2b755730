//! What the GPU backends share: the kernel sources (assembled from the build.rs manifest), the
//! kernel list a model needs, the JIT compiler interface, the on-disk kernel cache, and the
//! backend itself (`GpuBackend`: every op, graphs, weight upload, collectives) written once
//! against the device runtime interface (`device::DeviceApi`) that CUDA and ROCm implement.
pub mod act_codes;
pub mod backend;
pub mod blas;
pub mod ccl;
pub mod compiler;
pub mod device;
#[cfg(test)]
mod dispatch_tests;
mod gemv;
mod gemv_fused;
#[cfg(test)]
mod graph_tests;
pub mod hiprtc;
#[cfg(test)]
mod host_runtime;
pub mod jit;
mod joint;
pub mod kernel_cache;
mod linear_tc;
mod mla_absorbed;
mod mla_decode;
mod mla_proj;
mod mla_prefill;
pub(crate) mod mma;
mod moe_f8_gemm;
mod moe_prefill;
mod moe_grouped;
mod moe_pairs;
mod prefill_fused;
pub mod nvrtc;
pub mod ops;
mod router;
pub mod source;
pub mod specs;
mod staging;
pub mod step;
pub mod tuned;

pub use compiler::{CompileError, KernelCompiler};
pub use jit::Jit;
pub use kernel_cache::KernelCache;
pub use specs::{modules_for, KernelModule, ModelDims};
