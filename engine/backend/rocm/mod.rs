//! The ROCm backend's entry: the HIP runtime through `hip-sys` (loaded at run time). Kernels,
//! hipBLASLt and graphs are not built yet; what works is finding the runtime, reporting its version
//! and devices, and a clear answer on a machine without an AMD GPU.
use crate::backend::BackendUnavailable;

/// What the HIP runtime on this machine reports.
#[derive(Debug, Clone)]
pub struct RocmProbe {
    pub library: String,
    pub runtime_version: i32,
    pub devices: i32,
}

/// Loads libamdhip64 and counts devices. Errors say which paths were tried, or that the runtime
/// was found (with its version) but no ROCm device is present.
pub fn probe() -> Result<RocmProbe, BackendUnavailable> {
    let no = |reason: String| BackendUnavailable { backend: "rocm", reason };
    let hip = hip_sys::hip().map_err(no)?;
    let library = hip.path.display().to_string();
    let runtime_version = hip.runtime_version().unwrap_or(-1);
    let version = if runtime_version >= 0 {
        format!("{}.{}.{}", runtime_version / 10_000_000, (runtime_version / 100_000) % 100, runtime_version % 100_000)
    } else {
        "unknown".into()
    };
    match hip.device_count() {
        Ok(n) if n > 0 => Ok(RocmProbe { library, runtime_version, devices: n }),
        Ok(_) => Err(no(format!("HIP runtime {library} (version {version}) loaded, but there is no ROCm device (hipGetDeviceCount returned 0)"))),
        // hipErrorNoDevice (100) and hipErrorInvalidDevice (101) both mean "no GPU" from hipInit
        Err(e) => Err(no(format!("HIP runtime {library} (version {version}) loaded, but there is no ROCm device: {e}"))),
    }
}
