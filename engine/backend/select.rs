//! Choosing a backend at run time (`--backend {auto,cpu,cuda,rocm}`).

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// ROCm, then CUDA, then CPU: the first one available.
    Auto,
    Cpu,
    Cuda,
    Rocm,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("backend `{backend}` is not available in this build/machine: {reason}")]
pub struct BackendUnavailable {
    pub backend: &'static str,
    pub reason: String,
}

impl BackendKind {
    /// The concrete backend to run on. `auto` takes the first available of ROCm, CUDA, CPU.
    pub fn resolve(self) -> Result<BackendKind, BackendUnavailable> {
        match self {
            BackendKind::Cpu => Ok(BackendKind::Cpu),
            BackendKind::Cuda => cuda_available().map(|()| BackendKind::Cuda),
            BackendKind::Rocm => super::rocm::probe().map(|p| {
                log::info!("rocm: {} device(s) ({}) through {}", p.devices, p.archs.iter().map(|a| a.target).collect::<Vec<_>>().join(", "), p.library);
                BackendKind::Rocm
            }),
            BackendKind::Auto => {
                let rocm = match super::rocm::probe() {
                    Ok(p) => {
                        log::info!("backend auto: {} ROCm device(s) through {}, using rocm", p.devices, p.library);
                        return Ok(BackendKind::Rocm);
                    }
                    Err(e) => e.reason,
                };
                match cuda_available() {
                    Ok(()) => {
                        log::info!("backend auto: rocm: {rocm}; CUDA device found, using cuda");
                        Ok(BackendKind::Cuda)
                    }
                    Err(e) => {
                        log::info!("backend auto: rocm: {rocm}; cuda: {}; using cpu", e.reason);
                        Ok(BackendKind::Cpu)
                    }
                }
            }
        }
    }
}

/// Whether a CUDA device can be opened (driver library present, at least one device).
fn cuda_available() -> Result<(), BackendUnavailable> {
    let no = |reason: String| BackendUnavailable { backend: "cuda", reason };
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(no("the NVIDIA driver library libcuda.so was not found on this machine".into()));
    }
    let n = cudarc::driver::CudaContext::device_count().map_err(|e| no(format!("the CUDA driver reports no usable device: {e:?}")))?;
    if n < 1 {
        return Err(no("no CUDA device".into()));
    }
    Ok(())
}
