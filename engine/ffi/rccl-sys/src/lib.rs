//! RCCL and NCCL share one C API: this crate loads `librccl.so.1` on ROCm and `libnccl.so.2` on
//! CUDA through the same generated bindings, so the engine has one `Communicator` for both vendors.
#![allow(non_camel_case_types, non_snake_case, non_upper_case_globals, dead_code, clippy::all)]

mod bindings;
pub use bindings::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    Amd,
    Nvidia,
}

/// Library names tried for each vendor (`ENGINE_CCL_LIB` overrides).
pub fn candidates(v: Vendor) -> Vec<String> {
    if let Ok(p) = std::env::var("ENGINE_CCL_LIB") {
        return vec![p];
    }
    match v {
        Vendor::Amd => vec!["librccl.so.1".into(), "/opt/rocm/lib/librccl.so.1".into(), "librccl.so".into()],
        Vendor::Nvidia => vec!["libnccl.so.2".into(), "libnccl.so".into()],
    }
}

/// A failed collective call, naming it.
#[derive(Debug, Clone, PartialEq)]
pub struct CclError {
    pub call: &'static str,
    pub code: u32,
}

impl std::fmt::Display for CclError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed with ncclResult_t {}", self.call, self.code)
    }
}

impl std::error::Error for CclError {}

pub fn check(call: &'static str, r: ncclResult_t) -> Result<(), CclError> {
    if r == ncclResult_t_ncclSuccess { Ok(()) } else { Err(CclError { call, code: r as u32 }) }
}

/// Loads the collective library of a vendor; the error lists what was tried.
pub fn load(v: Vendor) -> Result<Rccl, String> {
    let mut tried = Vec::new();
    for c in candidates(v) {
        match unsafe { Rccl::new(&c) } {
            Ok(l) => return Ok(l),
            Err(e) => tried.push(format!("{c} ({e})")),
        }
    }
    Err(format!("no collective library found; tried: {}", tried.join("; ")))
}
