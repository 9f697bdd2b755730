//! Choosing a backend at run time (`--backend {auto,cpu,cuda,rocm}`).

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// ROCm, then CUDA, then CPU: the first one available.
    Auto,
    Cpu,
    Cuda,
    Rocm,
}

#[derive(Debug, thiserror::Error)]
#[error("backend `{backend}` is not available in this build/machine: {reason}")]
pub struct BackendUnavailable {
    pub backend: &'static str,
    pub reason: String,
}

impl BackendKind {
    /// The concrete backend to run on. GPU backends are not built yet: asking for one names that.
    pub fn resolve(self) -> Result<BackendKind, BackendUnavailable> {
        match self {
            BackendKind::Cpu => Ok(BackendKind::Cpu),
            BackendKind::Cuda => Err(BackendUnavailable {
                backend: "cuda",
                reason: "this build has no CUDA backend yet (the CPU backend is the only one implemented); use --backend cpu".into(),
            }),
            BackendKind::Rocm => Err(BackendUnavailable {
                backend: "rocm",
                reason: "this build has no ROCm backend yet (the CPU backend is the only one implemented); use --backend cpu".into(),
            }),
            BackendKind::Auto => {
                log::info!("backend auto: ROCm and CUDA backends are not in this build; using cpu");
                Ok(BackendKind::Cpu)
            }
        }
    }
}
