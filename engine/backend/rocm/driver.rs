//! `DeviceApi` over the HIP runtime (`hip-sys`, libamdhip64 loaded at run time): the device made
//! current per thread with hipSetDevice, one non-blocking stream of its own, stream-ordered
//! allocation from the device's default pool (kept, not released at each synchronisation), code
//! objects from hipRTC through hipModuleLoadData, and HIP graphs by stream capture.
use std::cell::Cell;
use std::ffi::c_void;

use hip_sys::{hipError_t, Hip};

use crate::backend::gpu::device::{ApiError, DevPtr, DeviceApi, Handle, LaunchConfig};

pub struct HipDriver {
    hip: &'static Hip,
    ordinal: i32,
    stream: hip_sys::hipStream_t,
}

// SAFETY: a hipStream_t may be used from any thread; the backend orders its calls itself.
unsafe impl Send for HipDriver {}
unsafe impl Sync for HipDriver {}

thread_local! {
    /// The device this thread last made current (hipSetDevice is per thread)
    static CURRENT: Cell<i32> = const { Cell::new(-1) };
}

impl HipDriver {
    /// Opens device `ordinal`: makes it current, creates the stream, keeps the pool's memory.
    pub fn new(hip: &'static Hip, ordinal: i32) -> Result<Self, ApiError> {
        let mut d = HipDriver { hip, ordinal, stream: std::ptr::null_mut() };
        d.bind()?;
        let mut s: hip_sys::hipStream_t = std::ptr::null_mut();
        d.check("hipStreamCreateWithFlags", unsafe { hip.api.hipStreamCreateWithFlags(&mut s, hip_sys::hipStreamNonBlocking) })?;
        d.stream = s;
        let mut pool: hip_sys::hipMemPool_t = std::ptr::null_mut();
        let mut threshold = u64::MAX;
        let kept = d.check("hipDeviceGetDefaultMemPool", unsafe { hip.api.hipDeviceGetDefaultMemPool(&mut pool, ordinal) }).and_then(|()| {
            let attr = hip_sys::hipMemPoolAttr_hipMemPoolAttrReleaseThreshold;
            d.check("hipMemPoolSetAttribute", unsafe { hip.api.hipMemPoolSetAttribute(pool, attr, &mut threshold as *mut u64 as *mut c_void) })
        });
        if let Err(e) = kept {
            log::warn!("rocm: could not raise the memory pool's release threshold ({e}); allocations may be slower");
        }
        Ok(d)
    }

    fn check(&self, call: &'static str, r: hipError_t) -> Result<(), ApiError> {
        self.hip.check(call, r).map_err(|e| ApiError { vendor: "rocm", call, msg: format!("{} ({})", e.name, e.code) })
    }
}

impl Drop for HipDriver {
    fn drop(&mut self) {
        if !self.stream.is_null() && self.bind().is_ok() {
            unsafe { self.hip.api.hipStreamDestroy(self.stream) };
        }
    }
}

impl DeviceApi for HipDriver {
    fn vendor(&self) -> &'static str {
        "rocm"
    }

    fn bind(&self) -> Result<(), ApiError> {
        if CURRENT.with(|c| c.get()) == self.ordinal {
            return Ok(());
        }
        self.check("hipSetDevice", unsafe { self.hip.api.hipSetDevice(self.ordinal) })?;
        CURRENT.with(|c| c.set(self.ordinal));
        Ok(())
    }

    fn alloc(&self, bytes: usize) -> Result<DevPtr, ApiError> {
        self.bind()?;
        let mut p: *mut c_void = std::ptr::null_mut();
        self.check("hipMallocAsync", unsafe { self.hip.api.hipMallocAsync(&mut p, bytes, self.stream) })?;
        Ok(p as DevPtr)
    }

    fn free(&self, p: DevPtr) {
        let r = self.bind().and_then(|()| self.check("hipFreeAsync", unsafe { self.hip.api.hipFreeAsync(p as *mut c_void, self.stream) }));
        if let Err(e) = r {
            log::error!("rocm: {e}");
        }
    }

    fn memset_d32(&self, p: DevPtr, value: u32, count: usize) -> Result<(), ApiError> {
        self.bind()?;
        self.check("hipMemsetD32Async", unsafe { self.hip.api.hipMemsetD32Async(p as *mut c_void, value as i32, count, self.stream) })
    }

    fn htod(&self, dst: DevPtr, src: &[u8]) -> Result<(), ApiError> {
        self.bind()?;
        // the runtime only reads `src` (the binding's pointer is not const)
        self.check("hipMemcpyHtoDAsync", unsafe { self.hip.api.hipMemcpyHtoDAsync(dst as *mut c_void, src.as_ptr() as *mut c_void, src.len(), self.stream) })
    }

    fn dtoh(&self, dst: &mut [u8], src: DevPtr) -> Result<(), ApiError> {
        self.bind()?;
        self.check("hipMemcpyDtoHAsync", unsafe { self.hip.api.hipMemcpyDtoHAsync(dst.as_mut_ptr() as *mut c_void, src as *mut c_void, dst.len(), self.stream) })?;
        self.synchronize()
    }

    unsafe fn dtoh_async(&self, dst: &mut [u8], src: DevPtr) -> Result<(), ApiError> {
        self.bind()?;
        self.check("hipMemcpyDtoHAsync", unsafe { self.hip.api.hipMemcpyDtoHAsync(dst.as_mut_ptr() as *mut c_void, src as *mut c_void, dst.len(), self.stream) })
    }

    fn dtod(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<(), ApiError> {
        self.bind()?;
        let kind = hip_sys::hipMemcpyKind_hipMemcpyDeviceToDevice;
        self.check("hipMemcpyAsync", unsafe { self.hip.api.hipMemcpyAsync(dst as *mut c_void, src as *const c_void, bytes, kind, self.stream) })
    }

    fn synchronize(&self) -> Result<(), ApiError> {
        self.bind()?;
        self.check("hipStreamSynchronize", unsafe { self.hip.api.hipStreamSynchronize(self.stream) })
    }

    fn load_module(&self, image: &[u8]) -> Result<Handle, ApiError> {
        self.bind()?;
        let mut m: hip_sys::hipModule_t = std::ptr::null_mut();
        self.check("hipModuleLoadData", unsafe { self.hip.api.hipModuleLoadData(&mut m, image.as_ptr() as *const c_void) })?;
        Ok(m as Handle)
    }

    fn function(&self, module: Handle, name: &str) -> Result<Handle, ApiError> {
        self.bind()?;
        let n = std::ffi::CString::new(name).map_err(|_| ApiError { vendor: "rocm", call: "hipModuleGetFunction", msg: format!("kernel name {name:?} contains NUL") })?;
        let mut f: hip_sys::hipFunction_t = std::ptr::null_mut();
        self.check("hipModuleGetFunction", unsafe { self.hip.api.hipModuleGetFunction(&mut f, module as hip_sys::hipModule_t, n.as_ptr()) })?;
        Ok(f as Handle)
    }

    unsafe fn launch(&self, f: Handle, c: LaunchConfig, params: &mut [*mut c_void]) -> Result<(), ApiError> {
        self.bind()?;
        let (g, b) = (c.grid_dim, c.block_dim);
        let r = self.hip.api.hipModuleLaunchKernel(f as hip_sys::hipFunction_t, g.0, g.1, g.2, b.0, b.1, b.2, c.shared_mem_bytes, self.stream, params.as_mut_ptr(), std::ptr::null_mut());
        self.check("hipModuleLaunchKernel", r)
    }

    fn event_record(&self, timing: bool) -> Result<Handle, ApiError> {
        self.bind()?;
        let mut ev: hip_sys::hipEvent_t = std::ptr::null_mut();
        let flags = if timing { 0 } else { hip_sys::hipEventDisableTiming };
        self.check("hipEventCreateWithFlags", unsafe { self.hip.api.hipEventCreateWithFlags(&mut ev, flags) })?;
        self.check("hipEventRecord", unsafe { self.hip.api.hipEventRecord(ev, self.stream) })?;
        Ok(ev as Handle)
    }

    fn event_wait(&self, ev: Handle) -> Result<(), ApiError> {
        self.bind()?;
        self.check("hipEventSynchronize", unsafe { self.hip.api.hipEventSynchronize(ev as hip_sys::hipEvent_t) })
    }

    fn event_elapsed_ms(&self, a: Handle, b: Handle) -> Result<f32, ApiError> {
        self.bind()?;
        let mut ms = 0f32;
        self.check("hipEventElapsedTime", unsafe { self.hip.api.hipEventElapsedTime(&mut ms, a as hip_sys::hipEvent_t, b as hip_sys::hipEvent_t) })?;
        Ok(ms)
    }

    fn event_destroy(&self, ev: Handle) {
        if self.bind().is_ok() {
            unsafe { self.hip.api.hipEventDestroy(ev as hip_sys::hipEvent_t) };
        }
    }

    fn begin_capture(&self) -> Result<(), ApiError> {
        self.bind()?;
        let mode = hip_sys::hipStreamCaptureMode_hipStreamCaptureModeRelaxed;
        self.check("hipStreamBeginCapture", unsafe { self.hip.api.hipStreamBeginCapture(self.stream, mode) })
    }

    fn end_capture(&self) -> Result<Option<Handle>, ApiError> {
        self.bind()?;
        let mut g: hip_sys::hipGraph_t = std::ptr::null_mut();
        self.check("hipStreamEndCapture", unsafe { self.hip.api.hipStreamEndCapture(self.stream, &mut g) })?;
        if g.is_null() {
            return Ok(None);
        }
        let mut exec: hip_sys::hipGraphExec_t = std::ptr::null_mut();
        let r = self.check("hipGraphInstantiateWithFlags", unsafe { self.hip.api.hipGraphInstantiateWithFlags(&mut exec, g, 0) });
        // the executable graph does not need its template
        unsafe { self.hip.api.hipGraphDestroy(g) };
        r.map(|()| Some(exec as Handle))
    }

    fn graph_upload(&self, g: Handle) -> Result<(), ApiError> {
        self.bind()?;
        self.check("hipGraphUpload", unsafe { self.hip.api.hipGraphUpload(g as hip_sys::hipGraphExec_t, self.stream) })
    }

    fn graph_launch(&self, g: Handle) -> Result<(), ApiError> {
        self.bind()?;
        self.check("hipGraphLaunch", unsafe { self.hip.api.hipGraphLaunch(g as hip_sys::hipGraphExec_t, self.stream) })
    }

    fn graph_destroy(&self, g: Handle) {
        if self.bind().is_ok() {
            unsafe { self.hip.api.hipGraphExecDestroy(g as hip_sys::hipGraphExec_t) };
        }
    }

    fn graph_mem_reserved(&self) -> u64 {
        let mut v = 0u64;
        let attr = hip_sys::hipGraphMemAttributeType_hipGraphMemAttrReservedMemCurrent;
        let r = unsafe { self.hip.api.hipDeviceGetGraphMemAttribute(self.ordinal, attr, &mut v as *mut u64 as *mut c_void) };
        if r == hip_sys::hipError_t_hipSuccess {
            v
        } else {
            0
        }
    }

    fn host_alloc(&self, bytes: usize) -> Result<*mut u8, ApiError> {
        self.bind()?;
        let mut p: *mut c_void = std::ptr::null_mut();
        self.check("hipHostMalloc", unsafe { self.hip.api.hipHostMalloc(&mut p, bytes.max(1), hip_sys::hipHostMallocDefault) })?;
        Ok(p as *mut u8)
    }

    fn host_free(&self, p: *mut u8) {
        unsafe { self.hip.api.hipHostFree(p as *mut c_void) };
    }

    fn mem_info(&self) -> Result<(usize, usize), ApiError> {
        self.bind()?;
        let (mut free, mut total) = (0usize, 0usize);
        self.check("hipMemGetInfo", unsafe { self.hip.api.hipMemGetInfo(&mut free, &mut total) })?;
        Ok((free, total))
    }

    fn stream(&self) -> *mut c_void {
        self.stream as *mut c_void
    }
}
