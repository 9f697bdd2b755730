//! `DeviceApi` over the CUDA driver API (cudarc's dynamically loaded bindings): the device's
//! primary context and one non-blocking stream of its own (the legacy default stream cannot be
//! captured into a graph).
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext, CudaStream, DriverError};

use crate::backend::gpu::device::{ApiError, DevPtr, DeviceApi, Handle, LaunchConfig};

pub struct CudaDriver {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// The most shared memory a block may opt in to (bytes)
    max_shared: i32,
    /// Kernels are launched as programmatic dependents of the kernel before them (sm_90+; every
    /// kernel begins with ENGINE_GRID_DEP(), hip-kernels/common.h) where `ENGINE_PDL=1`: off by
    /// default, as the dependents' blocks, scheduled early, hold SM slots that multi-wave kernels'
    /// later blocks need (V3 4-layer steps at batch 128/256: 12.47/16.82 ms with, 12.22/16.37
    /// without; batch 1 unchanged; docs/BENCHMARKS.md, eighteenth session).
    programmatic: bool,
}

fn e(call: &'static str) -> impl Fn(DriverError) -> ApiError {
    move |x| ApiError { vendor: "cuda", call, msg: format!("{x:?}") }
}

impl CudaDriver {
    pub fn new(ctx: Arc<CudaContext>) -> Result<Self, ApiError> {
        // with a single stream, cudarc's per-buffer event tracking is not needed
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(e("cuStreamCreate"))?;
        keep_pool_memory(&ctx);
        let max_shared = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN).map_err(e("cuDeviceGetAttribute"))?;
        let major = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR).map_err(e("cuDeviceGetAttribute"))?;
        let programmatic = major >= 9 && std::env::var("ENGINE_PDL").is_ok_and(|v| v == "1");
        log::info!("cuda: programmatic dependent launch {}", if programmatic { "on (ENGINE_PDL=1)" } else { "off (ENGINE_PDL=1 turns it on from sm_90)" });
        Ok(CudaDriver { ctx, stream, max_shared, programmatic })
    }

    fn s(&self) -> sys::CUstream {
        self.stream.cu_stream()
    }

    /// cuLaunchKernelEx with programmatic dependent launch (where on) and clusters of `cluster`
    /// blocks along x (where > 1).
    unsafe fn launch_ex(&self, f: Handle, c: LaunchConfig, cluster: u32, params: &mut [*mut c_void]) -> Result<(), ApiError> {
        let (mut attrs, n) = launch_attrs(self.programmatic, cluster);
        let cfg = launch_config(c, self.s(), &mut attrs[..n]);
        sys::cuLaunchKernelEx(&cfg, f as sys::CUfunction, params.as_mut_ptr(), std::ptr::null_mut()).result().map_err(e("cuLaunchKernelEx"))
    }
}

/// A launch's attributes (programmatic stream serialisation, a cluster dimension) and how many
/// of the two are set; on the stack: every launch with PDL on comes through here.
fn launch_attrs(programmatic: bool, cluster: u32) -> ([sys::CUlaunchAttribute; 2], usize) {
    // SAFETY: a zeroed attribute value is a valid union; only the field of each id is read
    let mut a: [sys::CUlaunchAttribute; 2] = unsafe { std::mem::zeroed() };
    let mut n = 0;
    if programmatic {
        a[n].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        a[n].value.programmaticStreamSerializationAllowed = 1;
        n += 1;
    }
    if cluster > 1 {
        a[n].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
        a[n].value.clusterDim.x = cluster;
        a[n].value.clusterDim.y = 1;
        a[n].value.clusterDim.z = 1;
        n += 1;
    }
    (a, n)
}

fn launch_config(c: LaunchConfig, stream: sys::CUstream, attrs: &mut [sys::CUlaunchAttribute]) -> sys::CUlaunchConfig {
    let (g, b) = (c.grid_dim, c.block_dim);
    sys::CUlaunchConfig {
        gridDimX: g.0,
        gridDimY: g.1,
        gridDimZ: g.2,
        blockDimX: b.0,
        blockDimY: b.1,
        blockDimZ: b.2,
        sharedMemBytes: c.shared_mem_bytes,
        hStream: stream,
        attrs: if attrs.is_empty() { std::ptr::null_mut() } else { attrs.as_mut_ptr() },
        numAttrs: attrs.len() as u32,
    }
}

/// Every op allocates its outputs stream-ordered (cuMemAllocAsync); by default the pool hands freed
/// memory back to the driver at each synchronisation, so the next step maps it again. Keep it (as
/// PyTorch's caching allocator does): steps reuse the same blocks.
fn keep_pool_memory(ctx: &CudaContext) {
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    let ok = unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) == sys::CUresult::CUDA_SUCCESS
            && sys::cuMemPoolSetAttribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &mut threshold as *mut u64 as *mut c_void) == sys::CUresult::CUDA_SUCCESS
    };
    if !ok {
        log::warn!("cuda: could not raise the memory pool's release threshold; allocations may be slower");
    }
}

/// The static shared memory of `f` (its dynamic share is what is left of the block's).
fn static_shared(f: Handle) -> i32 {
    let mut v = 0i32;
    let attr = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES;
    if unsafe { sys::cuFuncGetAttribute(&mut v, attr, f as sys::CUfunction) } != sys::CUresult::CUDA_SUCCESS {
        return 0;
    }
    v
}

impl DeviceApi for CudaDriver {
    fn vendor(&self) -> &'static str {
        "cuda"
    }

    fn bind(&self) -> Result<(), ApiError> {
        self.ctx.bind_to_thread().map_err(e("cuCtxSetCurrent"))
    }

    fn alloc(&self, bytes: usize) -> Result<DevPtr, ApiError> {
        self.bind()?;
        unsafe { result::malloc_async(self.s(), bytes) }.map_err(e("cuMemAllocAsync"))
    }

    fn free(&self, p: DevPtr) {
        if let Err(x) = self.bind().and_then(|()| unsafe { result::free_async(p, self.s()) }.map_err(e("cuMemFreeAsync"))) {
            log::error!("cuda: {x}");
        }
    }

    fn memset_d32(&self, p: DevPtr, value: u32, count: usize) -> Result<(), ApiError> {
        self.bind()?;
        let r = unsafe { sys::cuMemsetD32Async(p, value, count, self.s()) };
        r.result().map_err(e("cuMemsetD32Async"))
    }

    fn htod(&self, dst: DevPtr, src: &[u8]) -> Result<(), ApiError> {
        self.bind()?;
        unsafe { result::memcpy_htod_async(dst, src, self.s()) }.map_err(e("cuMemcpyHtoDAsync"))
    }

    fn dtoh(&self, dst: &mut [u8], src: DevPtr) -> Result<(), ApiError> {
        self.bind()?;
        unsafe { result::memcpy_dtoh_async(dst, src, self.s()) }.map_err(e("cuMemcpyDtoHAsync"))?;
        self.synchronize()
    }

    unsafe fn dtoh_async(&self, dst: &mut [u8], src: DevPtr) -> Result<(), ApiError> {
        self.bind()?;
        unsafe { result::memcpy_dtoh_async(dst, src, self.s()) }.map_err(e("cuMemcpyDtoHAsync"))
    }

    fn dtod(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<(), ApiError> {
        self.bind()?;
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.s()) }.map_err(e("cuMemcpyDtoDAsync"))
    }

    fn synchronize(&self) -> Result<(), ApiError> {
        self.bind()?;
        unsafe { result::stream::synchronize(self.s()) }.map_err(e("cuStreamSynchronize"))
    }

    fn load_module(&self, image: &[u8]) -> Result<Handle, ApiError> {
        self.bind()?;
        // cuModuleLoadData takes a cubin (or NUL-terminated PTX) image
        unsafe { result::module::load_data(image.as_ptr() as *const c_void) }.map(|m| m as Handle).map_err(e("cuModuleLoadData"))
    }

    fn function(&self, module: Handle, name: &str) -> Result<Handle, ApiError> {
        self.bind()?;
        let n = std::ffi::CString::new(name).map_err(|_| ApiError { vendor: "cuda", call: "cuModuleGetFunction", msg: format!("kernel name {name:?} contains NUL") })?;
        unsafe { result::module::get_function(module as sys::CUmodule, n) }.map(|f| f as Handle).map_err(e("cuModuleGetFunction"))
    }

    fn max_shared_per_block(&self) -> usize {
        self.max_shared.max(0) as usize
    }

    fn allow_dynamic_shared(&self, f: Handle) -> Result<(), ApiError> {
        self.bind()?;
        let attr = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        let r = unsafe { sys::cuFuncSetAttribute(f as sys::CUfunction, attr, self.max_shared - static_shared(f)) };
        if r == sys::CUresult::CUDA_SUCCESS {
            Ok(())
        } else {
            Err(ApiError { vendor: "cuda", call: "cuFuncSetAttribute", msg: format!("{r:?}") })
        }
    }

    fn tensor_map_u8_sw128(&self, p: DevPtr, cols: u64, rows: u64, stride: u64, box_rows: u32) -> Result<Option<[u64; 16]>, ApiError> {
        use sys::{CUtensorMapDataType as T, CUtensorMapFloatOOBfill as F, CUtensorMapInterleave as I, CUtensorMapL2promotion as L, CUtensorMapSwizzle as S};
        let mut m = sys::CUtensorMap { opaque: [0; 16] };
        let (dims, strides, boxes, steps) = ([cols, rows], [stride], [128u32, box_rows], [1u32, 1]);
        let r = unsafe {
            sys::cuTensorMapEncodeTiled(&mut m, T::CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, p as *mut c_void, dims.as_ptr(), strides.as_ptr(), boxes.as_ptr(), steps.as_ptr(), I::CU_TENSOR_MAP_INTERLEAVE_NONE, S::CU_TENSOR_MAP_SWIZZLE_128B, L::CU_TENSOR_MAP_L2_PROMOTION_L2_256B, F::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
        };
        match r {
            sys::CUresult::CUDA_SUCCESS => Ok(Some(m.opaque)),
            r => Err(ApiError { vendor: "cuda", call: "cuTensorMapEncodeTiled", msg: format!("{r:?} ({rows} rows of {cols} bytes, stride {stride}, box {box_rows} × 128)") }),
        }
    }

    unsafe fn launch(&self, f: Handle, c: LaunchConfig, params: &mut [*mut c_void]) -> Result<(), ApiError> {
        self.bind()?;
        if !self.programmatic {
            return result::launch_kernel(f as sys::CUfunction, c.grid_dim, c.block_dim, c.shared_mem_bytes, self.s(), params).map_err(e("cuLaunchKernel"));
        }
        self.launch_ex(f, c, 1, params)
    }

    fn max_active_clusters(&self, f: Handle, c: LaunchConfig, cluster: u32) -> Result<usize, ApiError> {
        self.bind()?;
        let (mut attrs, n) = launch_attrs(false, cluster);
        let cfg = launch_config(c, self.s(), &mut attrs[..n]);
        let mut n: std::ffi::c_int = 0;
        // SAFETY: the config and its attributes outlive the call
        unsafe { sys::cuOccupancyMaxActiveClusters(&mut n, f as sys::CUfunction, &cfg) }.result().map_err(e("cuOccupancyMaxActiveClusters"))?;
        Ok(n.max(0) as usize)
    }

    unsafe fn launch_cluster(&self, f: Handle, c: LaunchConfig, cluster: u32, params: &mut [*mut c_void]) -> Result<(), ApiError> {
        self.bind()?;
        self.launch_ex(f, c, cluster, params)
    }

    fn event_record(&self, timing: bool) -> Result<Handle, ApiError> {
        self.bind()?;
        let flags = if timing { sys::CUevent_flags::CU_EVENT_DEFAULT } else { sys::CUevent_flags::CU_EVENT_DISABLE_TIMING };
        let ev = result::event::create(flags).map_err(e("cuEventCreate"))?;
        unsafe { result::event::record(ev, self.s()) }.map_err(e("cuEventRecord"))?;
        Ok(ev as Handle)
    }

    fn event_wait(&self, ev: Handle) -> Result<(), ApiError> {
        self.bind()?;
        unsafe { result::event::synchronize(ev as sys::CUevent) }.map_err(e("cuEventSynchronize"))
    }

    fn event_elapsed_ms(&self, a: Handle, b: Handle) -> Result<f32, ApiError> {
        self.bind()?;
        unsafe { result::event::elapsed(a as sys::CUevent, b as sys::CUevent) }.map_err(e("cuEventElapsedTime"))
    }

    fn event_destroy(&self, ev: Handle) {
        let _ = self.bind().map(|()| unsafe { result::event::destroy(ev as sys::CUevent) });
    }

    fn begin_capture(&self) -> Result<(), ApiError> {
        self.bind()?;
        unsafe { result::stream::begin_capture(self.s(), sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED) }.map_err(e("cuStreamBeginCapture"))
    }

    fn end_capture(&self) -> Result<Option<Handle>, ApiError> {
        self.bind()?;
        let g = unsafe { result::stream::end_capture(self.s()) }.map_err(e("cuStreamEndCapture"))?;
        if g.is_null() {
            return Ok(None);
        }
        let exec = unsafe { result::graph::instantiate(g, sys::CUgraphInstantiate_flags(0)) };
        // the executable graph does not need its template
        let _ = unsafe { result::graph::destroy(g) };
        exec.map(|x| Some(x as Handle)).map_err(e("cuGraphInstantiate"))
    }

    fn graph_upload(&self, g: Handle) -> Result<(), ApiError> {
        self.bind()?;
        unsafe { result::graph::upload(g as sys::CUgraphExec, self.s()) }.map_err(e("cuGraphUpload"))
    }

    fn graph_launch(&self, g: Handle) -> Result<(), ApiError> {
        self.bind()?;
        unsafe { result::graph::launch(g as sys::CUgraphExec, self.s()) }.map_err(e("cuGraphLaunch"))
    }

    fn graph_destroy(&self, g: Handle) {
        let _ = self.bind().map(|()| unsafe { result::graph::exec_destroy(g as sys::CUgraphExec) });
    }

    fn graph_mem_reserved(&self) -> u64 {
        let mut v = 0u64;
        let attr = sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT;
        let r = unsafe { sys::cuDeviceGetGraphMemAttribute(self.ctx.cu_device(), attr, &mut v as *mut u64 as *mut c_void) };
        if r == sys::CUresult::CUDA_SUCCESS {
            v
        } else {
            0
        }
    }

    fn host_alloc(&self, bytes: usize) -> Result<*mut u8, ApiError> {
        self.bind()?;
        unsafe { result::malloc_host(bytes.max(1), 0) }.map(|p| p as *mut u8).map_err(e("cuMemHostAlloc"))
    }

    fn host_free(&self, p: *mut u8) {
        let _ = self.bind().map(|()| unsafe { result::free_host(p as *mut c_void) });
    }

    fn mem_info(&self) -> Result<(usize, usize), ApiError> {
        self.bind()?;
        result::mem_get_info().map_err(e("cuMemGetInfo"))
    }

    fn stream(&self) -> *mut c_void {
        self.s() as *mut c_void
    }

    fn stream_create(&self) -> Result<Handle, ApiError> {
        self.bind()?;
        Ok(result::stream::create(result::stream::StreamKind::NonBlocking).map_err(e("cuStreamCreate"))? as Handle)
    }

    fn stream_wait(&self, waiter: Handle, on: Handle) -> Result<(), ApiError> {
        self.bind()?;
        let st = |h: Handle| if h == 0 { self.s() } else { h as sys::CUstream };
        let ev = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(e("cuEventCreate"))?;
        // the event is released once it has completed, even though destroyed right away
        let r = unsafe { result::event::record(ev, st(on)) }.map_err(e("cuEventRecord")).and_then(|()| unsafe { result::stream::wait_event(st(waiter), ev, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) }.map_err(e("cuStreamWaitEvent")));
        let _ = unsafe { result::event::destroy(ev) };
        r
    }

    fn stream_destroy(&self, s: Handle) {
        if let Err(x) = unsafe { result::stream::destroy(s as sys::CUstream) } {
            log::error!("cuda: cuStreamDestroy failed: {x:?}");
        }
    }
}
