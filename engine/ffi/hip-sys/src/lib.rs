//! HIP runtime, hipRTC and hipBLASLt, loaded at run time: the crate builds on any machine, and a process
//! without ROCm gets an error listing the paths it tried instead of a link failure.
//! `bindings.rs` is generated (regen.sh); `HipError` names the call that failed.
#![allow(non_camel_case_types, non_snake_case, non_upper_case_globals, dead_code, clippy::all)]

mod bindings;
pub use bindings::*;
/// hipBLASLt (its own library, libhipblaslt)
pub mod hipblaslt;

use std::path::PathBuf;
use std::sync::OnceLock;

/// A failed HIP call: which call, the hipError_t code and HIP's own name for it.
#[derive(Debug, Clone, PartialEq)]
pub struct HipError {
    pub call: &'static str,
    pub code: u32,
    pub name: String,
}

impl std::fmt::Display for HipError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed: {} ({})", self.call, self.name, self.code)
    }
}

impl std::error::Error for HipError {}

/// The loaded library and where it came from.
pub struct Hip {
    pub api: HipApi,
    pub path: PathBuf,
}

impl Hip {
    /// Turns a hipError_t into a Result naming `call`.
    pub fn check(&self, call: &'static str, e: hipError_t) -> Result<(), HipError> {
        if e == hipError_t_hipSuccess {
            return Ok(());
        }
        let name = unsafe {
            let p = self.api.hipGetErrorName(e);
            if p.is_null() { format!("{e:?}") } else { std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned() }
        };
        Err(HipError { call, code: e as u32, name })
    }

    /// `hipRuntimeGetVersion`.
    pub fn runtime_version(&self) -> Result<i32, HipError> {
        let mut v = 0;
        self.check("hipRuntimeGetVersion", unsafe { self.api.hipRuntimeGetVersion(&mut v) })?;
        Ok(v)
    }

    /// `hipInit` then `hipGetDeviceCount`.
    pub fn device_count(&self) -> Result<i32, HipError> {
        self.check("hipInit", unsafe { self.api.hipInit(0) })?;
        let mut n = 0;
        self.check("hipGetDeviceCount", unsafe { self.api.hipGetDeviceCount(&mut n) })?;
        Ok(n)
    }
}

/// Library candidates, in order: `ENGINE_HIP_LIB`, `$ROCM_PATH/lib`, /opt/rocm/lib, then the
/// loader's search path with the sonames of ROCm 6, 5 and the unversioned name.
pub fn candidates() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(p) = std::env::var_os("ENGINE_HIP_LIB") {
        v.push(PathBuf::from(p));
        return v;
    }
    for root in std::env::var_os("ROCM_PATH").map(PathBuf::from).into_iter().chain([PathBuf::from("/opt/rocm")]) {
        for name in ["libamdhip64.so", "libamdhip64.so.6", "libamdhip64.so.5"] {
            v.push(root.join("lib").join(name));
        }
    }
    for name in ["libamdhip64.so", "libamdhip64.so.6", "libamdhip64.so.5"] {
        v.push(PathBuf::from(name));
    }
    v
}

static HIP: OnceLock<Result<Hip, String>> = OnceLock::new();

/// The HIP runtime, loaded once per process; the error lists every path tried.
pub fn hip() -> Result<&'static Hip, String> {
    HIP.get_or_init(|| {
        let mut tried = Vec::new();
        for c in candidates() {
            // a bare name goes through the dynamic loader's search path
            match unsafe { HipApi::new(&c) } {
                Ok(api) => return Ok(Hip { api, path: c }),
                Err(e) => tried.push(format!("{} ({e})", c.display())),
            }
        }
        Err(format!("the HIP runtime (libamdhip64) was not found; tried: {}", tried.join("; ")))
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// hipBLASLt library candidates: `ENGINE_HIPBLASLT_LIB`, then `$ROCM_PATH/lib` and /opt/rocm/lib,
/// then the loader's search path (sonames of ROCm 7, 6 and the unversioned name).
pub fn hipblaslt_candidates() -> Vec<PathBuf> {
    if let Some(p) = std::env::var_os("ENGINE_HIPBLASLT_LIB") {
        return vec![PathBuf::from(p)];
    }
    let names = ["libhipblaslt.so.1", "libhipblaslt.so.0", "libhipblaslt.so"];
    let mut v = Vec::new();
    for root in std::env::var_os("ROCM_PATH").map(PathBuf::from).into_iter().chain([PathBuf::from("/opt/rocm")]) {
        v.extend(names.iter().map(|n| root.join("lib").join(n)));
    }
    v.extend(names.iter().map(PathBuf::from));
    v
}

/// Loads hipBLASLt (once per call site's owner); the error lists every path tried.
pub fn load_hipblaslt() -> Result<(hipblaslt::HipBlasLtApi, PathBuf), String> {
    let mut tried = Vec::new();
    for c in hipblaslt_candidates() {
        match unsafe { hipblaslt::HipBlasLtApi::new(&c) } {
            Ok(api) => return Ok((api, c)),
            Err(e) => tried.push(format!("{} ({e})", c.display())),
        }
    }
    Err(format!("hipBLASLt (libhipblaslt) was not found; tried: {}", tried.join("; ")))
}
