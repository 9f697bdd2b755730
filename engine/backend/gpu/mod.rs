//! What the GPU backends share: the kernel sources (assembled from the build.rs manifest), the
//! kernel list a model needs, the JIT compiler interface, and the on-disk kernel cache.
pub mod compiler;
pub mod hiprtc;
pub mod jit;
pub mod kernel_cache;
pub mod nvrtc;
pub mod source;
pub mod specs;
pub mod tuned;

pub use compiler::{CompileError, KernelCompiler};
pub use jit::Jit;
pub use kernel_cache::KernelCache;
pub use specs::{modules_for, KernelModule, ModelDims};
