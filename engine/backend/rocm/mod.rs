//! The ROCm backend: the shared GPU backend (backend/gpu) on the HIP runtime (`hip-sys`, loaded at
//! run time), kernels compiled by hipRTC for the device's gcnArchName (gfx942, gfx950) into the
//! same kernel cache, hipBLASLt for bf16 GEMMs, HIP graphs for decode and RCCL between ranks.
//! On a machine without an AMD GPU, `probe` says what was found and why it cannot run.
use std::sync::Arc;

use super::gpu::backend::{DeviceParts, GpuBackend, GpuVendor};
use super::gpu::blas::GemmLib;
use super::gpu::device::err;
use super::gpu::source::Vendor;
use super::gpu::{Jit, KernelCache};
use super::BackendError;
use crate::backend::BackendUnavailable;

mod blaslt;
pub mod device;
mod driver;

/// AMD Instinct GPUs through the HIP runtime.
pub struct Rocm;

/// The shared GPU backend on an AMD device.
pub type RocmBackend = GpuBackend<Rocm>;

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
    device_props(hip, i).map(|(arch, _, _)| arch)
}

/// Device `i`'s checked arch, marketing name and compute-unit count.
fn device_props(hip: &hip_sys::Hip, i: i32) -> Result<(device::AmdArch, String, usize), String> {
    let mut p: hip_sys::hipDeviceProp_t = unsafe { std::mem::zeroed() };
    hip.check("hipGetDeviceProperties", unsafe { hip.api.hipGetDeviceProperties(&mut p, i) }).map_err(|e| e.to_string())?;
    let gcn = unsafe { std::ffi::CStr::from_ptr(p.gcnArchName.as_ptr()) }.to_string_lossy().into_owned();
    let arch = device::arch_from_gcn_name(&gcn).map_err(|e| format!("device {i}: {e}"))?;
    device::check_wave(&arch, p.warpSize).map_err(|e| format!("device {i}: {e}"))?;
    let name = unsafe { std::ffi::CStr::from_ptr(p.name.as_ptr()) }.to_string_lossy().into_owned();
    Ok((arch, name, p.multiProcessorCount.max(1) as usize))
}

/// Loads libamdhip64 and counts devices. Errors say which paths were tried, or that the runtime
/// was found (with its version) but no ROCm device is present. Probed once per process (backend
/// selection and each device's start ask the same question).
pub fn probe() -> Result<RocmProbe, BackendUnavailable> {
    static PROBE: std::sync::OnceLock<Result<RocmProbe, BackendUnavailable>> = std::sync::OnceLock::new();
    PROBE.get_or_init(probe_now).clone()
}

fn probe_now() -> Result<RocmProbe, BackendUnavailable> {
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

impl GpuVendor for Rocm {
    const NAME: &'static str = "rocm";
    const SOURCE: Vendor = Vendor::Amd;
    const CCL: rccl_sys::Vendor = rccl_sys::Vendor::Amd;

    fn open(ordinal: usize) -> Result<DeviceParts, BackendError> {
        let p = probe().map_err(BackendError::Unavailable)?;
        let unavailable = |reason: String| BackendError::Unavailable(BackendUnavailable { backend: "rocm", reason });
        if ordinal >= p.devices as usize {
            return Err(unavailable(format!("ROCm device {ordinal} requested, but {} reports {} device(s)", p.library, p.devices)));
        }
        let hip = hip_sys::hip().map_err(unavailable)?;
        let (arch, device_name, cus) = device_props(hip, ordinal as i32).map_err(unavailable)?;
        let compiler = super::gpu::hiprtc::HiprtcCompiler::new(arch.target).map_err(|e| unavailable(e.to_string()))?;
        let jit = Jit::new(KernelCache::from_env(), Box::new(compiler), Vendor::Amd);
        let dev = driver::HipDriver::new(hip, ordinal as i32).map_err(err("open"))?;
        Ok(DeviceParts {
            dev: Arc::new(dev),
            jit,
            arch: arch.target.to_string(),
            device_name,
            warp: arch.wave,
            sms: cus,
            // mma_tile.h's MFMA 32x32x8 bf16 tiles, tc_swap.h's MFMA 16x16x16 decode kernels and
            // mla_prefill.hip's MFMA 16x16x16 flash prefill (v_head a multiple of 16)
            matrix_units: true,
            swap_ab: true,
            fp8_fnuz: arch.fp8 == device::Fp8Format::E4m3Fnuz,
        })
    }

    fn gemm_lib(b: &RocmBackend) -> Option<Box<dyn GemmLib>> {
        if std::env::var("ENGINE_HIPBLASLT").is_ok_and(|v| v == "0") {
            log::info!("rocm op paths: hipBLASLt off (ENGINE_HIPBLASLT=0)");
            return None;
        }
        let lt = blaslt::HipBlasLt::new(b)?;
        log::info!("rocm op paths: linear layers with bf16 weights from {} rows through hipBLASLt (x as bf16 hi + lo rows, f32 accumulate)", b.tuned.cublaslt_min_rows);
        Some(Box::new(lt))
    }
}
