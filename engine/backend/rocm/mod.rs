//! The ROCm backend's entry: the HIP runtime through `hip-sys` (loaded at run time). Kernels,
//! hipBLASLt and graphs are not built yet; what works is finding the runtime, reporting its version
//! and devices, and a clear answer on a machine without an AMD GPU.
use crate::backend::BackendUnavailable;

pub mod device;

/// What the HIP runtime on this machine reports.
#[derive(Debug, Clone)]
pub struct RocmProbe {
    pub library: String,
    pub runtime_version: i32,
    pub devices: i32,
    /// Each device's arch, checked (gcnArchName and warp size)
    pub archs: Vec<device::AmdArch>,
}

/// Device `i`'s arch from hipGetDeviceProperties (the symbol ROCm 6 keeps for the pre-6.0 struct
/// layout these bindings describe), validated.
fn device_arch(hip: &hip_sys::Hip, i: i32) -> Result<device::AmdArch, String> {
    let mut p: hip_sys::hipDeviceProp_t = unsafe { std::mem::zeroed() };
    hip.check("hipGetDeviceProperties", unsafe { hip.api.hipGetDeviceProperties(&mut p, i) }).map_err(|e| e.to_string())?;
    let gcn = unsafe { std::ffi::CStr::from_ptr(p.gcnArchName.as_ptr()) }.to_string_lossy().into_owned();
    let arch = device::arch_from_gcn_name(&gcn).map_err(|e| format!("device {i}: {e}"))?;
    device::check_wave(&arch, p.warpSize).map_err(|e| format!("device {i}: {e}"))?;
    Ok(arch)
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
        Ok(n) if n > 0 => {
            let archs = (0..n).map(|i| device_arch(hip, i)).collect::<Result<Vec<_>, _>>().map_err(no)?;
            Ok(RocmProbe { library, runtime_version, devices: n, archs })
        }
        Ok(_) => Err(no(format!("HIP runtime {library} (version {version}) loaded, but there is no ROCm device (hipGetDeviceCount returned 0)"))),
        // hipErrorNoDevice (100) and hipErrorInvalidDevice (101) both mean "no GPU" from hipInit
        Err(e) => Err(no(format!("HIP runtime {library} (version {version}) loaded, but there is no ROCm device: {e}"))),
    }
}
