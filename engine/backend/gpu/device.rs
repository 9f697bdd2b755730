//! The device runtime the GPU backend runs on: one small interface over the CUDA driver API
//! (`backend/cuda/driver.rs`) and the HIP runtime (`backend/rocm/driver.rs`), both loaded at run
//! time. Everything happens on one stream per device: stream-ordered allocation (so buffers freed
//! during a graph capture become graph allocations), asynchronous copies, module loading and
//! kernel launches, events, and stream capture into graphs. The ops of `GpuBackend` are written
//! once against it; only this interface differs between the vendors.
use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::Arc;

use crate::backend::BackendError;

/// A device address.
pub type DevPtr = u64;

/// A failed runtime call: which vendor, which call, and the runtime's own words.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub vendor: &'static str,
    pub call: &'static str,
    pub msg: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed: {}", self.call, self.msg)
    }
}

/// The op-level error of a failed runtime call inside `op`.
pub fn err(op: &'static str) -> impl Fn(ApiError) -> BackendError {
    move |e| BackendError::Op { backend: e.vendor, op, msg: e.to_string() }
}

/// Opaque runtime handles (CUmodule/hipModule_t, CUfunction/hipFunction_t, events, graph execs).
pub type Handle = usize;

/// Grid, block and dynamic shared memory of one launch.
#[derive(Debug, Clone, Copy)]
pub struct LaunchConfig {
    pub grid_dim: (u32, u32, u32),
    pub block_dim: (u32, u32, u32),
    pub shared_mem_bytes: u32,
}

/// What a backend needs from a vendor's runtime, on the device's one stream.
pub trait DeviceApi: Send + Sync {
    /// "cuda" or "rocm": names the backend in errors
    fn vendor(&self) -> &'static str;
    /// Makes the device current on the calling thread (each call does this itself where needed).
    fn bind(&self) -> Result<(), ApiError>;
    /// `bytes` of device memory, stream-ordered (graph allocations while capturing).
    fn alloc(&self, bytes: usize) -> Result<DevPtr, ApiError>;
    /// Frees stream-ordered; failures are logged (called from Drop).
    fn free(&self, p: DevPtr);
    fn memset_d32(&self, p: DevPtr, value: u32, count: usize) -> Result<(), ApiError>;
    /// Host to device, ordered on the stream. `src` may be pageable (the runtime stages it before
    /// returning) or pinned (`host_alloc`; the caller keeps it untouched until an event passes).
    fn htod(&self, dst: DevPtr, src: &[u8]) -> Result<(), ApiError>;
    /// Device to host; returns when the bytes are there (waits for the stream's earlier work).
    fn dtoh(&self, dst: &mut [u8], src: DevPtr) -> Result<(), ApiError>;
    /// Device to host, ordered on the stream, returning at once: the bytes are there once an
    /// event recorded after this call has passed.
    /// # Safety
    /// `dst` must be page-locked (`host_alloc`) and neither read, written nor freed until then.
    unsafe fn dtoh_async(&self, dst: &mut [u8], src: DevPtr) -> Result<(), ApiError>;
    fn dtod(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<(), ApiError>;
    fn synchronize(&self) -> Result<(), ApiError>;
    /// Loads a code object (cubin / hsaco) compiled for this device.
    fn load_module(&self, image: &[u8]) -> Result<Handle, ApiError>;
    fn function(&self, module: Handle, name: &str) -> Result<Handle, ApiError>;
    /// Lets launches of `f` ask for as much dynamic shared memory as a block may have (CUDA caps
    /// it at 48 KB unless a function opts in; HIP needs no opt-in for its 64 KB).
    fn allow_dynamic_shared(&self, _f: Handle) -> Result<(), ApiError> {
        Ok(())
    }
    /// The most shared memory (bytes) one block may use, opted in (64 KB of LDS on CDNA).
    fn max_shared_per_block(&self) -> usize {
        64 * 1024
    }
    /// A tensor map (the 128-byte descriptor Hopper's tensor memory accelerator copies by) of a
    /// byte matrix of `rows` rows of `cols` bytes, `stride` bytes apart, read in boxes of
    /// `box_rows` rows × 128 bytes written with the 128-byte swizzle (rows past the matrix read as
    /// zeros); None where the device has none.
    fn tensor_map_u8_sw128(&self, _p: DevPtr, _cols: u64, _rows: u64, _stride: u64, _box_rows: u32) -> Result<Option<[u64; 16]>, ApiError> {
        Ok(None)
    }
    /// # Safety
    /// `params` must point to values matching the kernel's parameter list.
    unsafe fn launch(&self, f: Handle, cfg: LaunchConfig, params: &mut [*mut c_void]) -> Result<(), ApiError>;
    /// The most clusters of `cluster` blocks (along x) of this launch that can be resident at
    /// once; 0 where the runtime has no thread-block clusters (then `launch_cluster` is not called).
    fn max_active_clusters(&self, _f: Handle, _cfg: LaunchConfig, _cluster: u32) -> Result<usize, ApiError> {
        Ok(0)
    }
    /// `launch` with thread-block clusters of `cluster` blocks along x (Hopper).
    /// # Safety
    /// As `launch`.
    unsafe fn launch_cluster(&self, f: Handle, cfg: LaunchConfig, cluster: u32, params: &mut [*mut c_void]) -> Result<(), ApiError> {
        if cluster == 1 {
            return self.launch(f, cfg, params);
        }
        Err(ApiError { vendor: self.vendor(), call: "launch_cluster", msg: format!("clusters of {cluster} blocks: this runtime has no thread-block clusters") })
    }
    /// An event recorded on the stream now (timing enabled when `timing`).
    fn event_record(&self, timing: bool) -> Result<Handle, ApiError>;
    fn event_wait(&self, e: Handle) -> Result<(), ApiError>;
    fn event_elapsed_ms(&self, a: Handle, b: Handle) -> Result<f32, ApiError>;
    fn event_destroy(&self, e: Handle);
    /// Starts capturing the stream (relaxed mode: other threads may use the runtime meanwhile).
    fn begin_capture(&self) -> Result<(), ApiError>;
    /// Ends the capture and instantiates it; None when nothing was recorded.
    fn end_capture(&self) -> Result<Option<Handle>, ApiError>;
    /// Uploads an instantiated graph's resources ahead of its first launch.
    fn graph_upload(&self, g: Handle) -> Result<(), ApiError>;
    fn graph_launch(&self, g: Handle) -> Result<(), ApiError>;
    fn graph_destroy(&self, g: Handle);
    /// Device memory the runtime holds for graph allocations.
    fn graph_mem_reserved(&self) -> u64;
    /// Page-locked host memory.
    fn host_alloc(&self, bytes: usize) -> Result<*mut u8, ApiError>;
    fn host_free(&self, p: *mut u8);
    /// (free, total) device memory
    fn mem_info(&self) -> Result<(usize, usize), ApiError>;
    /// The raw stream (for NCCL/RCCL and the BLAS libraries)
    fn stream(&self) -> *mut c_void;
    /// Another stream of the device, for work that may overlap the main stream's (where the
    /// runtime wrapper offers it; the raw handle is what `GemmLib` calls take).
    fn stream_create(&self) -> Result<Handle, ApiError> {
        Err(ApiError { vendor: self.vendor(), call: "stream_create", msg: "side streams are not wired for this runtime".into() })
    }
    /// Stream `waiter` waits for the work enqueued so far on stream `on` (0: the main stream).
    fn stream_wait(&self, _waiter: Handle, _on: Handle) -> Result<(), ApiError> {
        Err(ApiError { vendor: self.vendor(), call: "stream_wait", msg: "side streams are not wired for this runtime".into() })
    }
    fn stream_destroy(&self, _s: Handle) {}
}

/// Element types that live in device buffers.
pub trait Elem: Copy + Default + 'static {}
impl Elem for f32 {}
impl Elem for u32 {}
impl Elem for i32 {}
impl Elem for u16 {}
impl Elem for u8 {}

/// The bytes of a slice of device element values (for copies).
pub fn bytes_of<T: Elem>(v: &[T]) -> &[u8] {
    // SAFETY: Elem types are plain numbers without padding
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// A device buffer of `len` elements, freed (stream-ordered) on drop; or a view of part of one,
/// which keeps that buffer alive and frees nothing itself.
pub struct DevBuf<T: Elem> {
    ptr: DevPtr,
    len: usize,
    dev: Arc<dyn DeviceApi>,
    parent: Option<Arc<DevBuf<T>>>,
    _t: PhantomData<T>,
}

impl<T: Elem> DevBuf<T> {
    /// Uninitialised memory for `len` elements (at least one, so every buffer has an address).
    pub fn alloc(dev: &Arc<dyn DeviceApi>, len: usize) -> Result<Self, ApiError> {
        // whole 32-bit words, so that any buffer can be filled by memset_d32
        let ptr = dev.alloc((len.max(1) * std::mem::size_of::<T>()).div_ceil(4) * 4)?;
        Ok(DevBuf { ptr, len: len.max(1), dev: dev.clone(), parent: None, _t: PhantomData })
    }

    /// Elements `start .. start + len` of `parent` as a buffer of their own (a view: `parent`
    /// stays allocated while it lives).
    pub fn view(parent: &Arc<DevBuf<T>>, start: usize, len: usize) -> Self {
        assert!(start + len <= parent.len && len > 0, "view of {start}..{} of a {}-element buffer", start + len, parent.len);
        DevBuf { ptr: parent.at(start), len, dev: parent.dev.clone(), parent: Some(parent.clone()), _t: PhantomData }
    }

    /// `len` elements of zero bytes.
    pub fn zeros(dev: &Arc<dyn DeviceApi>, len: usize) -> Result<Self, ApiError> {
        let b = Self::alloc(dev, len)?;
        dev.memset_d32(b.ptr, 0, (b.len * std::mem::size_of::<T>()).div_ceil(4))?;
        Ok(b)
    }

    /// A copy of `v` (an empty `v` gives a one-element buffer of zero).
    pub fn from_host(dev: &Arc<dyn DeviceApi>, v: &[T]) -> Result<Self, ApiError> {
        let one = [T::default()];
        let v = if v.is_empty() { &one[..] } else { v };
        let b = Self::alloc(dev, v.len())?;
        dev.htod(b.ptr, bytes_of(v))?;
        Ok(b)
    }

    pub fn to_host(&self) -> Result<Vec<T>, ApiError> {
        let mut v = vec![T::default(); self.len];
        // SAFETY: as bytes_of, for the mutable slice
        let bytes = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(&v[..])) };
        self.dev.dtoh(bytes, self.ptr)?;
        Ok(v)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn ptr(&self) -> DevPtr {
        self.ptr
    }

    /// The address of element `i`.
    pub fn at(&self, i: usize) -> DevPtr {
        debug_assert!(i <= self.len, "element {i} of a {}-element buffer", self.len);
        self.ptr + (i * std::mem::size_of::<T>()) as u64
    }

    /// Copies `src`'s first `n` elements over this buffer's first `n`.
    pub fn copy_from(&mut self, src: DevPtr, n: usize) -> Result<(), ApiError> {
        assert!(n <= self.len, "copy of {n} elements into {}", self.len);
        if n == 0 {
            return Ok(());
        }
        self.dev.dtod(self.ptr, src, n * std::mem::size_of::<T>())
    }
}

impl<T: Elem> Drop for DevBuf<T> {
    fn drop(&mut self) {
        if self.parent.is_none() {
            self.dev.free(self.ptr);
        }
    }
}

/// A kernel argument: its bits in a 64-bit slot (4-byte values in the low half; both vendors
/// read parameters little-endian at the address they are given).
pub trait KernelArg {
    fn bits(&self) -> u64;
}

impl<T: Elem> KernelArg for &DevBuf<T> {
    fn bits(&self) -> u64 {
        self.ptr
    }
}
impl<T: Elem> KernelArg for &mut DevBuf<T> {
    fn bits(&self) -> u64 {
        self.ptr
    }
}
impl KernelArg for &u64 {
    fn bits(&self) -> u64 {
        **self
    }
}
impl KernelArg for &i64 {
    fn bits(&self) -> u64 {
        **self as u64
    }
}
impl KernelArg for &i32 {
    fn bits(&self) -> u64 {
        **self as u32 as u64
    }
}
impl KernelArg for &u32 {
    fn bits(&self) -> u64 {
        **self as u64
    }
}
impl KernelArg for &f32 {
    fn bits(&self) -> u64 {
        self.to_bits() as u64
    }
}

/// A loaded kernel.
#[derive(Clone, Copy, Debug)]
pub struct Kernel(pub Handle);

/// One launch's arguments, collected in order.
pub struct Launch<'a> {
    dev: &'a dyn DeviceApi,
    f: Kernel,
    args: Vec<u64>,
}

impl<'a> Launch<'a> {
    pub fn new(dev: &'a dyn DeviceApi, f: &Kernel) -> Self {
        Launch { dev, f: *f, args: Vec::with_capacity(16) }
    }

    pub fn arg<A: KernelArg>(&mut self, a: A) -> &mut Self {
        self.args.push(a.bits());
        self
    }

    /// Enqueues the kernel; the arguments must match its parameter list in order and size (the
    /// kernels take pointers, int, int64 and float parameters).
    pub fn run(&mut self, cfg: LaunchConfig) -> Result<(), ApiError> {
        let mut params = self.params();
        // SAFETY: every parameter is a pointer, int, int64 or float, stored in its own slot
        unsafe { self.dev.launch(self.f.0, cfg, &mut params) }
    }

    /// `run` with thread-block clusters of `cluster` blocks along x (grid x a multiple of it).
    pub fn run_cluster(&mut self, cfg: LaunchConfig, cluster: u32) -> Result<(), ApiError> {
        let mut params = self.params();
        // SAFETY: as in `run`
        unsafe { self.dev.launch_cluster(self.f.0, cfg, cluster, &mut params) }
    }

    /// The kernel's parameter pointers: one to each argument slot.
    fn params(&mut self) -> Vec<*mut c_void> {
        self.args.iter_mut().map(|a| a as *mut u64 as *mut c_void).collect()
    }
}

/// An event, destroyed on drop.
pub struct DevEvent {
    pub handle: Handle,
    dev: Arc<dyn DeviceApi>,
}

impl DevEvent {
    pub fn record(dev: &Arc<dyn DeviceApi>, timing: bool) -> Result<Self, ApiError> {
        Ok(DevEvent { handle: dev.event_record(timing)?, dev: dev.clone() })
    }

    pub fn wait(&self) -> Result<(), ApiError> {
        self.dev.event_wait(self.handle)
    }

    pub fn elapsed_ms(&self, end: &DevEvent) -> Result<f32, ApiError> {
        self.dev.event_elapsed_ms(self.handle, end.handle)
    }
}

impl Drop for DevEvent {
    fn drop(&mut self) {
        self.dev.event_destroy(self.handle);
    }
}

/// An instantiated graph, destroyed on drop. Graph objects need external serialisation, not a
/// particular thread: the backend only touches them under its graph lock.
pub struct DevGraph {
    handle: Handle,
    dev: Arc<dyn DeviceApi>,
}

impl DevGraph {
    pub fn new(dev: &Arc<dyn DeviceApi>, handle: Handle) -> Self {
        DevGraph { handle, dev: dev.clone() }
    }

    pub fn upload(&self) -> Result<(), ApiError> {
        self.dev.graph_upload(self.handle)
    }

    pub fn launch(&self) -> Result<(), ApiError> {
        self.dev.graph_launch(self.handle)
    }
}

impl Drop for DevGraph {
    fn drop(&mut self) {
        self.dev.graph_destroy(self.handle);
    }
}

/// Page-locked host memory, freed on drop.
pub struct PinnedBuf {
    ptr: *mut u8,
    len: usize,
    dev: Arc<dyn DeviceApi>,
}

// SAFETY: plain host memory owned by this value
unsafe impl Send for PinnedBuf {}

impl PinnedBuf {
    pub fn alloc(dev: &Arc<dyn DeviceApi>, len: usize) -> Result<Self, ApiError> {
        Ok(PinnedBuf { ptr: dev.host_alloc(len)?, len, dev: dev.clone() })
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` bytes allocated by host_alloc, owned by self
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `len` bytes allocated by host_alloc, owned by self
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        self.dev.host_free(self.ptr);
    }
}

#[cfg(test)]
mod tests {
    use super::super::host_runtime::HostRuntime;
    use super::*;

    fn host() -> (Arc<HostRuntime>, Arc<dyn DeviceApi>) {
        let h = Arc::new(HostRuntime::default());
        (h.clone(), h)
    }

    #[test]
    fn buffers_round_trip_and_fill_whole_words() {
        let (h, dev) = host();
        // 3 u16 = 6 bytes: the allocation is rounded to 8 so zeros() fills it with 32-bit words
        let z = DevBuf::<u16>::zeros(&dev, 3).unwrap();
        assert_eq!(h.mem.lock().unwrap()[&z.ptr()].len(), 8);
        assert_eq!(z.to_host().unwrap(), vec![0u16; 3]);
        let v = [1.5f32, -2.0, 3.25, 7.0];
        let b = DevBuf::from_host(&dev, &v).unwrap();
        assert_eq!((b.len(), b.to_host().unwrap()), (4, v.to_vec()));
        assert_eq!(b.at(2) - b.ptr(), 8);
        // an empty upload is one element of zero, so every buffer has an address
        let e = DevBuf::<i32>::from_host(&dev, &[]).unwrap();
        assert_eq!(e.to_host().unwrap(), vec![0]);
        let mut c = DevBuf::<f32>::zeros(&dev, 4).unwrap();
        c.copy_from(b.at(1), 2).unwrap();
        assert_eq!(c.to_host().unwrap(), vec![-2.0, 3.25, 0.0, 0.0]);
        // dropping frees stream-ordered
        let p = b.ptr();
        drop(b);
        assert!(h.freed.lock().unwrap().contains(&p));
    }

    #[test]
    fn launches_pass_arguments_in_order_and_handles_are_released() {
        let (h, dev) = host();
        let buf = DevBuf::<f32>::zeros(&dev, 16).unwrap();
        let (n, s, big) = (7i32, 0.5f32, 1i64 << 40);
        let cfg = LaunchConfig { grid_dim: (3, 2, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        Launch::new(&*dev, &Kernel(5)).arg(&buf).arg(&n).arg(&s).arg(&big).arg(&buf.at(4)).run(cfg).unwrap();
        let l = h.launches.lock().unwrap();
        assert_eq!(l.len(), 1);
        let (f, grid, threads, args) = &l[0];
        assert_eq!((*f, *grid, *threads), (5, (3, 2, 1), 256));
        assert_eq!(args, &vec![buf.ptr(), 7, 0.5f32.to_bits() as u64, 1 << 40, buf.ptr() + 16]);
        drop(l);
        drop(DevEvent::record(&dev, true).unwrap());
        drop(DevGraph::new(&dev, 99));
        assert_eq!(*h.destroyed.lock().unwrap(), vec![77, 99]);
        let mut pin = PinnedBuf::alloc(&dev, 64).unwrap();
        pin.as_mut_slice()[63] = 1;
    }

    #[test]
    fn arguments_keep_their_bits_in_the_low_bytes() {
        let (i, f, l, u) = (-3i32, 1.5f32, -2i64, 7u32);
        assert_eq!((&i).bits() as u32 as i32, -3);
        assert_eq!((&i).bits() >> 32, 0, "an int's slot has no high bits (read as 4 bytes)");
        assert_eq!(f32::from_bits((&f).bits() as u32), 1.5);
        assert_eq!((&l).bits() as i64, -2);
        assert_eq!((&u).bits(), 7);
        // little-endian: the first 4 bytes of the slot are the int
        let slot = (&i).bits();
        let b = slot.to_le_bytes();
        assert_eq!(i32::from_le_bytes([b[0], b[1], b[2], b[3]]), -3);
    }
}
