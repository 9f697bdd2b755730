//! hipRTC through `hip-sys` (libamdhip64 loaded at run time). Needs no GPU: it compiles for a named
//! gfx architecture into a code object for `hipModuleLoadData`. Only the CDNA targets the engine
//! supports are accepted (gfx942 = MI300X, gfx950 = MI355X).
use std::ffi::CString;

use super::{CompileError, KernelCompiler};

pub const SUPPORTED: &[&str] = &["gfx942", "gfx950"];

pub struct HiprtcCompiler {
    arch: String,
    version: String,
}

impl HiprtcCompiler {
    pub fn new(arch: &str) -> Result<Self, CompileError> {
        let unavailable = |reason: String| CompileError::Unavailable { compiler: "hiprtc", reason };
        if !SUPPORTED.contains(&arch) {
            return Err(unavailable(format!("{arch} is not supported (supported: {}; the wave64 CDNA parts the kernels are tuned for)", SUPPORTED.join(", "))));
        }
        let hip = hip_sys::hip().map_err(unavailable)?;
        let (mut major, mut minor) = (0, 0);
        let r = unsafe { hip.api.hiprtcVersion(&mut major, &mut minor) };
        if r != hip_sys::hiprtcResult_HIPRTC_SUCCESS {
            return Err(unavailable(format!("hiprtcVersion failed ({r}) in {}", hip.path.display())));
        }
        let runtime = hip.runtime_version().unwrap_or(-1);
        Ok(HiprtcCompiler { arch: arch.to_string(), version: format!("hiprtc {major}.{minor} (runtime {runtime})") })
    }
}

impl KernelCompiler for HiprtcCompiler {
    fn name(&self) -> &'static str {
        "hiprtc"
    }
    fn arch(&self) -> &str {
        &self.arch
    }
    fn version(&self) -> String {
        self.version.clone()
    }
    fn options(&self) -> Vec<String> {
        vec![format!("--offload-arch={}", self.arch), "-O3".into(), "-std=c++17".into()]
    }
    fn compile(&self, file: &str, source: &str) -> Result<Vec<u8>, CompileError> {
        let hip = hip_sys::hip().map_err(|reason| CompileError::Unavailable { compiler: "hiprtc", reason })?;
        let api = &hip.api;
        let fail = |log: String| CompileError::Failed { compiler: "hiprtc", file: file.to_string(), arch: self.arch.clone(), log };
        let src = CString::new(source).map_err(|e| fail(e.to_string()))?;
        let name = CString::new(file).unwrap();
        let opts: Vec<CString> = self.options().into_iter().map(|o| CString::new(o).unwrap()).collect();
        let mut opt_ptrs: Vec<*const std::os::raw::c_char> = opts.iter().map(|o| o.as_ptr()).collect();
        unsafe {
            let mut prog: hip_sys::hiprtcProgram = std::ptr::null_mut();
            let r = api.hiprtcCreateProgram(&mut prog, src.as_ptr(), name.as_ptr(), 0, std::ptr::null_mut(), std::ptr::null_mut());
            if r != hip_sys::hiprtcResult_HIPRTC_SUCCESS {
                return Err(fail(format!("hiprtcCreateProgram failed ({r})")));
            }
            let r = api.hiprtcCompileProgram(prog, opt_ptrs.len() as i32, opt_ptrs.as_mut_ptr());
            let mut n = 0usize;
            api.hiprtcGetProgramLogSize(prog, &mut n);
            let mut log = vec![0u8; n.max(1)];
            api.hiprtcGetProgramLog(prog, log.as_mut_ptr() as *mut _);
            let log = String::from_utf8_lossy(&log).trim_end_matches('\0').to_string();
            let out = if r != hip_sys::hiprtcResult_HIPRTC_SUCCESS {
                Err(fail(format!("hiprtcCompileProgram failed ({r}):\n{log}")))
            } else {
                let mut size = 0usize;
                api.hiprtcGetCodeSize(prog, &mut size);
                let mut code = vec![0u8; size];
                api.hiprtcGetCode(prog, code.as_mut_ptr() as *mut _);
                if size == 0 { Err(fail(format!("hipRTC produced no code object:\n{log}"))) } else { Ok(code) }
            };
            api.hiprtcDestroyProgram(&mut prog);
            out
        }
    }
}
