//! NCCL for the CUDA backend, through `rccl-sys` (the same bindings load RCCL on ROCm). One
//! communicator per rank; collectives are enqueued on the backend's stream, so they order with
//! the kernels around them and never synchronise the host.
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use rccl_sys::{check, ncclComm_t, ncclUniqueId, Rccl};

use crate::backend::BackendError;

/// ncclInProgress (NCCL >= 2.14; newer than the header the bindings came from)
const NCCL_IN_PROGRESS: rccl_sys::ncclResult_t = 7;

/// A rank's communicator. It is never destroyed: it lives as long as the process, because
/// ncclCommDestroy can wait on peers that have not reached it (a node still following jobs), and
/// tearing it down while a peer is mid-collective hangs or crashes at exit.
pub struct Nccl {
    lib: Arc<Rccl>,
    comm: ncclComm_t,
    pub rank: usize,
    pub size: usize,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not
// concurrent; the backend issues them from the thread that owns the rank.
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

fn op_err(op: &'static str) -> impl Fn(String) -> BackendError {
    move |msg| BackendError::Op { backend: "cuda", op, msg }
}

/// The library, loaded once and never unloaded: ncclGetUniqueId starts a bootstrap thread that
/// runs library code for the life of the process.
pub fn load() -> Result<Arc<Rccl>, String> {
    static LIB: std::sync::OnceLock<Result<Arc<Rccl>, String>> = std::sync::OnceLock::new();
    LIB.get_or_init(|| rccl_sys::load(rccl_sys::Vendor::Nvidia).map(Arc::new)).clone()
}

/// A fresh communicator id (rank 0 makes it and hands it to the others).
pub fn unique_id() -> Result<Vec<u8>, String> {
    let lib = load()?;
    let mut id = ncclUniqueId { internal: [0; 128] };
    check("ncclGetUniqueId", unsafe { lib.ncclGetUniqueId(&mut id) }).map_err(|e| e.to_string())?;
    Ok(id.internal.iter().map(|&b| b as u8).collect())
}

/// NCCL's version as `major.minor.patch`.
pub fn version(lib: &Rccl) -> String {
    let mut v = 0;
    if unsafe { lib.ncclGetVersion(&mut v) } != rccl_sys::ncclResult_t_ncclSuccess {
        return "unknown".into();
    }
    format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100)
}

impl Nccl {
    /// Joins communicator `id` as `rank` of `size`; blocks until every rank has joined. The
    /// caller's CUDA context must be current on this thread.
    pub fn init(id: &[u8], rank: usize, size: usize) -> Result<Self, String> {
        let lib = load()?;
        let mut uid = ncclUniqueId { internal: [0; 128] };
        if id.len() != uid.internal.len() {
            return Err(format!("communicator id has {} bytes, expected {}", id.len(), uid.internal.len()));
        }
        for (d, s) in uid.internal.iter_mut().zip(id) {
            *d = *s as _;
        }
        let mut comm: ncclComm_t = std::ptr::null_mut();
        check("ncclCommInitRank", unsafe { lib.ncclCommInitRank(&mut comm, size as i32, uid, rank as i32) }).map_err(|e| format!("rank {rank} of {size}: {e}"))?;
        log::info!("rank {rank}/{size}: NCCL {} communicator ready", version(&lib));
        Ok(Nccl { lib, comm, rank, size })
    }

    fn stream(s: &CudaStream) -> rccl_sys::hipStream_t {
        s.cu_stream() as rccl_sys::hipStream_t
    }

    pub fn all_reduce_sum(&self, buf: &mut CudaSlice<f32>, n: usize, stream: &Arc<CudaStream>) -> Result<(), BackendError> {
        let (ptr, _guard) = buf.device_ptr_mut(stream);
        let r = unsafe {
            self.lib.ncclAllReduce(ptr as *const _, ptr as *mut _, n, rccl_sys::ncclDataType_t_ncclFloat32, rccl_sys::ncclRedOp_t_ncclSum, self.comm, Self::stream(stream))
        };
        check("ncclAllReduce", r).map_err(|e| e.to_string()).map_err(op_err("all_reduce"))
    }

    pub fn all_gather(&self, send: &CudaSlice<f32>, recv: &mut CudaSlice<f32>, n: usize, stream: &Arc<CudaStream>) -> Result<(), BackendError> {
        let (sp, _g1) = send.device_ptr(stream);
        let (rp, _g2) = recv.device_ptr_mut(stream);
        let r = unsafe { self.lib.ncclAllGather(sp as *const _, rp as *mut _, n, rccl_sys::ncclDataType_t_ncclFloat32, self.comm, Self::stream(stream)) };
        check("ncclAllGather", r).map_err(|e| e.to_string()).map_err(op_err("all_gather"))
    }

    /// Sums `send` ([size·n]) over the ranks; this rank receives block `rank` ([n]).
    pub fn reduce_scatter(&self, send: &CudaSlice<f32>, recv: &mut CudaSlice<f32>, n: usize, stream: &Arc<CudaStream>) -> Result<(), BackendError> {
        let (sp, _g1) = send.device_ptr(stream);
        let (rp, _g2) = recv.device_ptr_mut(stream);
        let r = unsafe {
            self.lib.ncclReduceScatter(sp as *const _, rp as *mut _, n, rccl_sys::ncclDataType_t_ncclFloat32, rccl_sys::ncclRedOp_t_ncclSum, self.comm, Self::stream(stream))
        };
        check("ncclReduceScatter", r).map_err(|e| e.to_string()).map_err(op_err("reduce_scatter"))
    }

    /// The communicator's asynchronous error, if a peer failed (polled by the watchdog).
    pub fn async_error(&self) -> Option<String> {
        let mut r = rccl_sys::ncclResult_t_ncclSuccess;
        unsafe { self.lib.ncclCommGetAsyncError(self.comm, &mut r) };
        (r != rccl_sys::ncclResult_t_ncclSuccess && r != NCCL_IN_PROGRESS).then(|| format!("ncclResult_t {r}"))
    }
}

