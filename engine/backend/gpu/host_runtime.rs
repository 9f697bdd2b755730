//! A `DeviceApi` over host memory, for unit tests of the shared GPU layer's own logic (buffer
//! sizes and fills, copies, argument packing, handle lifetimes) on machines without a GPU. It runs
//! no kernels: a launch records the argument values it was given.
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use super::backend::{DeviceParts, GpuBackend, GpuVendor};
use super::blas::GemmLib;
use super::device::{ApiError, DevPtr, DeviceApi, Handle, LaunchConfig};
use super::source::Vendor;
use super::{CompileError, Jit, KernelCache, KernelCompiler};
use crate::backend::BackendError;

/// A recorded launch: kernel, grid, threads per block, argument values as u64 slots.
pub type Recorded = (Handle, (u32, u32, u32), u32, Vec<u64>);
/// ... with the kernel's name for its handle.
pub type Named = (String, (u32, u32, u32), u32, Vec<u64>);

#[derive(Default)]
pub struct HostRuntime {
    /// allocations by base address
    pub mem: Mutex<HashMap<DevPtr, Vec<u8>>>,
    next: Mutex<DevPtr>,
    /// every launch, in order
    pub launches: Mutex<Vec<Recorded>>,
    /// handles destroyed (events and graphs)
    pub destroyed: Mutex<Vec<Handle>>,
    pub freed: Mutex<Vec<DevPtr>>,
    /// page-locked stand-ins: address → length
    host: Mutex<HashMap<usize, usize>>,
    /// kernel names; a function handle is an index here
    pub names: Mutex<Vec<String>>,
    /// what `max_active_clusters` answers (0: no thread-block clusters, as by default)
    pub clusters: Mutex<usize>,
    /// new memory reads as zeros (else a 0xAB pattern, so that a missing fill shows)
    pub zero_fill: Mutex<bool>,
    /// device memsets so far
    pub memsets: Mutex<usize>,
}

impl HostRuntime {
    /// The kernels launched since the last call, in order, with their grids and block sizes.
    pub fn take_launched(&self) -> Vec<(String, (u32, u32, u32), u32)> {
        self.take_launched_args().into_iter().map(|(n, g, t, _)| (n, g, t)).collect()
    }

    /// As `take_launched`, with each launch's argument slots.
    pub fn take_launched_args(&self) -> Vec<Named> {
        let names = self.names.lock().unwrap();
        self.launches.lock().unwrap().drain(..).map(|(f, g, t, a)| (names.get(f).cloned().unwrap_or_default(), g, t, a)).collect()
    }

    /// (base, offset) of the allocation holding `p` with `len` bytes after it.
    fn find(&self, p: DevPtr, len: usize) -> Result<(DevPtr, usize), ApiError> {
        let mem = self.mem.lock().unwrap();
        mem.iter()
            .find(|(b, v)| p >= **b && p + len as u64 <= **b + v.len() as u64)
            .map(|(b, _)| (*b, (p - b) as usize))
            .ok_or(ApiError { vendor: "host", call: "access", msg: format!("{len} bytes at {p:#x} are outside every allocation") })
    }
}

impl DeviceApi for HostRuntime {
    fn vendor(&self) -> &'static str {
        "host"
    }
    fn bind(&self) -> Result<(), ApiError> {
        Ok(())
    }
    fn alloc(&self, bytes: usize) -> Result<DevPtr, ApiError> {
        let mut next = self.next.lock().unwrap();
        let p = 0x1000 + *next;
        // allocations 256-byte aligned, with a gap so overruns do not land in a neighbour
        *next += (bytes as u64).div_ceil(256) * 256 + 256;
        let fill = if *self.zero_fill.lock().unwrap() { 0 } else { 0xAB };
        self.mem.lock().unwrap().insert(p, vec![fill; bytes]);
        Ok(p)
    }
    fn free(&self, p: DevPtr) {
        self.mem.lock().unwrap().remove(&p);
        self.freed.lock().unwrap().push(p);
    }
    fn memset_d32(&self, p: DevPtr, value: u32, count: usize) -> Result<(), ApiError> {
        *self.memsets.lock().unwrap() += 1;
        let (b, off) = self.find(p, count * 4)?;
        let mut mem = self.mem.lock().unwrap();
        for w in mem.get_mut(&b).unwrap()[off..off + count * 4].chunks_mut(4) {
            w.copy_from_slice(&value.to_le_bytes());
        }
        Ok(())
    }
    fn htod(&self, dst: DevPtr, src: &[u8]) -> Result<(), ApiError> {
        let (b, off) = self.find(dst, src.len())?;
        self.mem.lock().unwrap().get_mut(&b).unwrap()[off..off + src.len()].copy_from_slice(src);
        Ok(())
    }
    fn dtoh(&self, dst: &mut [u8], src: DevPtr) -> Result<(), ApiError> {
        let (b, off) = self.find(src, dst.len())?;
        dst.copy_from_slice(&self.mem.lock().unwrap()[&b][off..off + dst.len()]);
        Ok(())
    }
    unsafe fn dtoh_async(&self, dst: &mut [u8], src: DevPtr) -> Result<(), ApiError> {
        self.dtoh(dst, src) // (no stream: done at once)
    }
    fn dtod(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<(), ApiError> {
        let mut tmp = vec![0u8; bytes];
        self.dtoh(&mut tmp, src)?;
        self.htod(dst, &tmp)
    }
    fn synchronize(&self) -> Result<(), ApiError> {
        Ok(())
    }
    fn load_module(&self, _image: &[u8]) -> Result<Handle, ApiError> {
        Ok(1)
    }
    /// The arguments in the descriptor's words (no kernel reads them here), so that the dispatch
    /// tests see the NVIDIA paths that copy by tensor maps.
    fn tensor_map_u8_sw128(&self, p: DevPtr, cols: u64, rows: u64, stride: u64, box_rows: u32) -> Result<Option<[u64; 16]>, ApiError> {
        let mut m = [0u64; 16];
        m[..5].copy_from_slice(&[p, cols, rows, stride, box_rows as u64]);
        Ok(Some(m))
    }
    /// A Hopper-sized block (227 KB), so that the dispatch tests see the NVIDIA paths.
    fn max_shared_per_block(&self) -> usize {
        227 * 1024
    }
    fn function(&self, _module: Handle, name: &str) -> Result<Handle, ApiError> {
        let mut n = self.names.lock().unwrap();
        n.push(name.to_string());
        Ok(n.len() - 1)
    }
    fn max_active_clusters(&self, _f: Handle, _cfg: LaunchConfig, _cluster: u32) -> Result<usize, ApiError> {
        Ok(*self.clusters.lock().unwrap())
    }
    /// Recorded as `launch` records (the kernels take the cluster size as an argument).
    unsafe fn launch_cluster(&self, f: Handle, cfg: LaunchConfig, cluster: u32, params: &mut [*mut c_void]) -> Result<(), ApiError> {
        if cluster > 1 && (*self.clusters.lock().unwrap() == 0 || !cfg.grid_dim.0.is_multiple_of(cluster)) {
            return Err(ApiError { vendor: "host", call: "launch_cluster", msg: format!("grid {:?} in clusters of {cluster}", cfg.grid_dim) });
        }
        self.launch(f, cfg, params)
    }
    unsafe fn launch(&self, f: Handle, cfg: LaunchConfig, params: &mut [*mut c_void]) -> Result<(), ApiError> {
        let vals = params.iter().map(|p| *(*p as *const u64)).collect();
        self.launches.lock().unwrap().push((f, cfg.grid_dim, cfg.block_dim.0, vals));
        Ok(())
    }
    fn event_record(&self, _timing: bool) -> Result<Handle, ApiError> {
        Ok(77)
    }
    fn event_wait(&self, _e: Handle) -> Result<(), ApiError> {
        Ok(())
    }
    fn event_elapsed_ms(&self, _a: Handle, _b: Handle) -> Result<f32, ApiError> {
        Ok(0.0)
    }
    fn event_destroy(&self, e: Handle) {
        self.destroyed.lock().unwrap().push(e);
    }
    fn begin_capture(&self) -> Result<(), ApiError> {
        Ok(())
    }
    fn end_capture(&self) -> Result<Option<Handle>, ApiError> {
        Ok(Some(99))
    }
    fn graph_upload(&self, _g: Handle) -> Result<(), ApiError> {
        Ok(())
    }
    fn graph_launch(&self, _g: Handle) -> Result<(), ApiError> {
        Ok(())
    }
    fn graph_destroy(&self, g: Handle) {
        self.destroyed.lock().unwrap().push(g);
    }
    fn graph_mem_reserved(&self) -> u64 {
        0
    }
    fn host_alloc(&self, bytes: usize) -> Result<*mut u8, ApiError> {
        let p = Box::into_raw(vec![0u8; bytes].into_boxed_slice()) as *mut u8;
        self.host.lock().unwrap().insert(p as usize, bytes);
        Ok(p)
    }
    fn host_free(&self, p: *mut u8) {
        if let Some(n) = self.host.lock().unwrap().remove(&(p as usize)) {
            // SAFETY: p and n came from the boxed slice made in host_alloc
            drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, n)) });
        }
    }
    fn mem_info(&self) -> Result<(usize, usize), ApiError> {
        Ok((0, 0))
    }
    fn stream(&self) -> *mut c_void {
        std::ptr::null_mut()
    }
}

/// Stands in for NVRTC / hipRTC: every module "compiles" to a marker the host runtime accepts.
struct NoCompiler;

impl KernelCompiler for NoCompiler {
    fn name(&self) -> &'static str {
        "none"
    }
    fn arch(&self) -> &str {
        "host"
    }
    fn version(&self) -> String {
        "0".into()
    }
    fn options(&self) -> Vec<String> {
        vec![]
    }
    fn compile(&self, _file: &str, _source: &str) -> Result<Vec<u8>, CompileError> {
        Ok(b"host".to_vec())
    }
}

pub struct HostVendor;

impl GpuVendor for HostVendor {
    const NAME: &'static str = "host";
    const SOURCE: Vendor = Vendor::Nvidia;
    const CCL: rccl_sys::Vendor = rccl_sys::Vendor::Nvidia;

    fn open(_ordinal: usize) -> Result<DeviceParts, BackendError> {
        // one cache for every run (entries are content-keyed and written through a rename)
        let dir = std::env::temp_dir().join("engine-graph-tests-kernels");
        let jit = Jit::new(KernelCache::new(dir), Box::new(NoCompiler), Vendor::Nvidia);
        let dev = Arc::new(HostRuntime::default());
        OPENED.with(|o| *o.borrow_mut() = Some(dev.clone()));
        Ok(DeviceParts { dev, jit, arch: "host".into(), device_name: "host".into(), warp: 32, sms: 4, matrix_units: false, swap_ab: false, fp8_fnuz: false })
    }

    fn gemm_lib(_b: &GpuBackend<Self>) -> Option<Box<dyn GemmLib>> {
        None
    }
}

thread_local! {
    /// The runtime the last `HostVendor::open` on this thread made
    static OPENED: RefCell<Option<Arc<HostRuntime>>> = const { RefCell::new(None) };
}

/// A GPU backend on the host runtime (NVIDIA sources, 32-wide warps, no matrix units: the tests
/// turn paths on through the backend's public flags), and that runtime.
pub fn host_backend() -> (GpuBackend<HostVendor>, Arc<HostRuntime>) {
    let b = GpuBackend::<HostVendor>::new(0).unwrap();
    let rt = OPENED.with(|o| o.borrow_mut().take()).expect("HostVendor::open ran");
    (b, rt)
}
