//! NVRTC through cudarc's dynamically loaded bindings. Needs no GPU: on a CPU-only machine the
//! PyPI package `nvidia-cuda-nvrtc` provides the library (point `ENGINE_NVRTC_LIB` at it, or put its
//! folder on LD_LIBRARY_PATH). Produces a CUBIN for the named architecture (e.g. sm_90a).
use std::ffi::CString;
use std::sync::OnceLock;

use super::{CompileError, KernelCompiler};

static LOADED: OnceLock<Result<(), String>> = OnceLock::new();

/// Makes libnvrtc loadable: already on the search path, or found in the usual places (kept loaded
/// so that cudarc's later load by soname finds it).
pub fn ensure_loaded() -> Result<(), String> {
    LOADED
        .get_or_init(|| {
            if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                return Ok(());
            }
            let mut tried = Vec::new();
            let mut candidates: Vec<std::path::PathBuf> = Vec::new();
            if let Some(p) = std::env::var_os("ENGINE_NVRTC_LIB") {
                candidates.push(p.into());
            }
            for var in ["CUDA_HOME", "CUDA_PATH"] {
                if let Some(h) = std::env::var_os(var) {
                    let h = std::path::PathBuf::from(h);
                    candidates.push(h.join("lib64/libnvrtc.so.13"));
                    candidates.push(h.join("lib/libnvrtc.so.13"));
                }
            }
            for d in ["/usr/local/cuda/lib64", "/usr/local/cuda-13.0/lib64", "/usr/lib/x86_64-linux-gnu"] {
                candidates.push(std::path::Path::new(d).join("libnvrtc.so.13"));
            }
            for c in candidates {
                tried.push(c.display().to_string());
                // NVRTC opens libnvrtc-builtins by soname: load the one beside it first
                if let Some(dir) = c.parent().filter(|_| c.exists()) {
                    if let Ok(rd) = std::fs::read_dir(dir) {
                        for e in rd.flatten() {
                            if e.file_name().to_string_lossy().starts_with("libnvrtc-builtins.so") {
                                if let Ok(b) = unsafe { libloading::Library::new(e.path()) } {
                                    std::mem::forget(b);
                                }
                            }
                        }
                    }
                }
                if let Ok(lib) = unsafe { libloading::Library::new(&c) } {
                    std::mem::forget(lib); // stays loaded for the process
                    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                        return Ok(());
                    }
                }
            }
            Err(format!("libnvrtc not found on the library path nor in: {}", tried.join(", ")))
        })
        .clone()
}

pub struct NvrtcCompiler {
    arch: String,
    version: String,
}

impl NvrtcCompiler {
    pub fn new(arch: &str) -> Result<Self, CompileError> {
        ensure_loaded().map_err(|reason| CompileError::Unavailable { compiler: "nvrtc", reason })?;
        let (mut major, mut minor) = (0i32, 0i32);
        unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
            .result()
            .map_err(|e| CompileError::Unavailable { compiler: "nvrtc", reason: format!("nvrtcVersion: {e:?}") })?;
        if !arch.starts_with("sm_") {
            return Err(CompileError::Unavailable { compiler: "nvrtc", reason: format!("{arch} is not an NVIDIA architecture (expected sm_XX)") });
        }
        Ok(NvrtcCompiler { arch: arch.to_string(), version: format!("nvrtc {major}.{minor}") })
    }
}

impl KernelCompiler for NvrtcCompiler {
    fn name(&self) -> &'static str {
        "nvrtc"
    }
    fn arch(&self) -> &str {
        &self.arch
    }
    fn version(&self) -> String {
        self.version.clone()
    }
    fn options(&self) -> Vec<String> {
        vec![format!("--gpu-architecture={}", self.arch), "--std=c++17".into(), "-default-device".into(), "--fmad=true".into()]
    }
    fn compile(&self, file: &str, source: &str) -> Result<Vec<u8>, CompileError> {
        use cudarc::nvrtc::{result, sys};
        let fail = |log: String| CompileError::Failed { compiler: "nvrtc", file: file.to_string(), arch: self.arch.clone(), log };
        let src = CString::new(source).map_err(|e| fail(e.to_string()))?;
        let name = CString::new(file).unwrap();
        let prog = result::create_program(&src, Some(&name)).map_err(|e| fail(format!("{e:?}")))?;
        let compiled = unsafe { result::compile_program(prog, &self.options()) };
        let log = unsafe { result::get_program_log(prog) }
            .map(|l| l.iter().map(|&c| c as u8 as char).collect::<String>().trim_end_matches('\0').to_string())
            .unwrap_or_default();
        let out = match compiled {
            Err(e) => Err(fail(format!("{e:?}\n{log}"))),
            Ok(()) => unsafe {
                let mut n = 0usize;
                sys::nvrtcGetCUBINSize(prog, &mut n).result().map_err(|e| fail(format!("nvrtcGetCUBINSize: {e:?}")))?;
                let mut buf = vec![0u8; n];
                sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut _).result().map_err(|e| fail(format!("nvrtcGetCUBIN: {e:?}")))?;
                Ok(buf)
            },
        };
        let _ = unsafe { result::destroy_program(prog) };
        if out.is_ok() && !log.trim().is_empty() {
            log::debug!("nvrtc {file}: {log}");
        }
        out
    }
}
