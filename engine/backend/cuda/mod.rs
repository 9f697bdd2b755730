//! The CUDA backend: the shared GPU backend (backend/gpu) on the CUDA driver API (cudarc, loaded
//! at run time), with kernels compiled by NVRTC, cuBLASLt for bf16 GEMMs and NCCL (through
//! rccl-sys) between ranks.
mod blaslt;
mod driver;

use std::sync::Arc;

use cudarc::driver::CudaContext;

use super::gpu::backend::{DeviceParts, GpuBackend, GpuVendor};
use super::gpu::blas::GemmLib;
use super::gpu::device::err;
use super::gpu::source::Vendor;
use super::gpu::{Jit, KernelCache};
use super::{BackendError, BackendUnavailable};

pub use super::gpu::backend::{GpuTensor, DEFAULT_GRAPH_MAX_BS};
pub use super::gpu::ops::{GpuExperts, GpuKvCache, GpuLinear, GpuRouting};
pub use super::gpu::step::{capture_sizes, Graphs};

/// NVIDIA GPUs through the CUDA driver API.
pub struct Cuda;

/// The shared GPU backend on an NVIDIA device.
pub type CudaBackend = GpuBackend<Cuda>;

/// The compute capability of device 0 as an NVRTC architecture name (e.g. sm_90a).
pub fn local_arch() -> Result<String, String> {
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("the CUDA driver library (libcuda.so) is not present".into());
    }
    let ctx = CudaContext::new(0).map_err(|e| format!("no CUDA device: {e:?}"))?;
    let (major, minor) = ctx.compute_capability().map_err(|e| format!("{e:?}"))?;
    Ok(arch_name(major, minor))
}

/// 'a' targets enable the architecture-specific instructions (wgmma on sm_90a).
fn arch_name(major: i32, minor: i32) -> String {
    if major >= 9 {
        format!("sm_{major}{minor}a")
    } else {
        format!("sm_{major}{minor}")
    }
}

impl GpuVendor for Cuda {
    const NAME: &'static str = "cuda";
    const SOURCE: Vendor = Vendor::Nvidia;
    const CCL: rccl_sys::Vendor = rccl_sys::Vendor::Nvidia;

    fn open(ordinal: usize) -> Result<DeviceParts, BackendError> {
        let unavailable = |reason: String| BackendError::Unavailable(BackendUnavailable { backend: "cuda", reason });
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(unavailable("the CUDA driver library libcuda.so was not found (no NVIDIA driver on this machine)".into()));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| unavailable(format!("cannot open CUDA device {ordinal}: {e:?}")))?;
        let (major, minor) = ctx.compute_capability().map_err(|e| unavailable(format!("compute capability: {e:?}")))?;
        let arch = arch_name(major, minor);
        let device_name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let compiler = super::gpu::nvrtc::NvrtcCompiler::new(&arch).map_err(|e| unavailable(e.to_string()))?;
        let jit = Jit::new(KernelCache::from_env(), Box::new(compiler), Vendor::Nvidia);
        let sms = ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).map_err(|e| unavailable(format!("multiprocessor count: {e:?}")))? as usize;
        let dev = driver::CudaDriver::new(ctx).map_err(err("open"))?;
        Ok(DeviceParts { dev: Arc::new(dev), jit, arch, device_name, warp: 32, sms, matrix_units: major >= 8, swap_ab: major >= 8, fp8_fnuz: false })
    }

    fn gemm_lib(b: &CudaBackend) -> Option<Box<dyn GemmLib>> {
        if std::env::var("ENGINE_CUBLASLT").is_ok_and(|v| v == "0") {
            log::info!("cuda op paths: cuBLASLt off (ENGINE_CUBLASLT=0)");
            return None;
        }
        let lt = blaslt::BlasLt::new(b)?;
        log::info!("cuda op paths: linear layers with bf16 weights from {} rows through cuBLASLt (x as bf16 hi + lo rows, f32 accumulate)", b.tuned.cublaslt_min_rows);
        Some(Box::new(lt))
    }
}
