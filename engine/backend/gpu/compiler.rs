//! A run-time kernel compiler (NVRTC on NVIDIA, hipRTC on AMD).

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("{compiler} is not available: {reason}")]
    Unavailable { compiler: &'static str, reason: String },
    #[error("{compiler} failed to compile {file} for {arch}:\n{log}")]
    Failed { compiler: &'static str, file: String, arch: String, log: String },
}

pub trait KernelCompiler: Send + Sync {
    /// e.g. "nvrtc"
    fn name(&self) -> &'static str;
    /// Target architecture, e.g. "sm_90a" or "gfx942".
    fn arch(&self) -> &str;
    /// Compiler version string (part of the cache key).
    fn version(&self) -> String;
    /// Options passed to the compiler (part of the cache key).
    fn options(&self) -> Vec<String>;
    /// Source → loadable binary (cubin / code object).
    fn compile(&self, file: &str, source: &str) -> Result<Vec<u8>, CompileError>;
}
