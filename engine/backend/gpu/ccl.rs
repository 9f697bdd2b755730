//! The collective library between ranks: NCCL on CUDA, RCCL on ROCm, one C API through
//! `rccl-sys`. One communicator per rank; collectives are enqueued on the backend's stream, so
//! they order with the kernels around them and never synchronise the host.
use std::sync::Arc;

use rccl_sys::{check, ncclComm_t, ncclUniqueId, Rccl, Vendor};

use super::device::DevPtr;
use crate::backend::BackendError;

/// ncclInProgress (NCCL >= 2.14; newer than the header the bindings came from)
const NCCL_IN_PROGRESS: rccl_sys::ncclResult_t = 7;

/// A rank's communicator. It is never destroyed: it lives as long as the process, because
/// ncclCommDestroy can wait on peers that have not reached it (a node still following jobs), and
/// tearing it down while a peer is mid-collective hangs or crashes at exit.
pub struct Ccl {
    /// The backend's name, for errors
    backend: &'static str,
    lib: Arc<Rccl>,
    comm: ncclComm_t,
    pub rank: usize,
    pub size: usize,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not
// concurrent; the backend issues them from the thread that owns the rank.
unsafe impl Send for Ccl {}
unsafe impl Sync for Ccl {}


/// The library, loaded once and never unloaded: ncclGetUniqueId starts a bootstrap thread that
/// runs library code for the life of the process.
pub fn load(v: Vendor) -> Result<Arc<Rccl>, String> {
    type Lib = std::sync::OnceLock<Result<Arc<Rccl>, String>>;
    static NCCL: Lib = Lib::new();
    static RCCL: Lib = Lib::new();
    let lib = if v == Vendor::Nvidia { &NCCL } else { &RCCL };
    lib.get_or_init(|| rccl_sys::load(v).map(Arc::new)).clone()
}

/// A fresh communicator id (rank 0 makes it and hands it to the others).
pub fn unique_id(v: Vendor) -> Result<Vec<u8>, String> {
    let lib = load(v)?;
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

impl Ccl {
    /// Joins communicator `id` as `rank` of `size`; blocks until every rank has joined. The
    /// caller's device must be current on this thread.
    pub fn init(vendor: Vendor, backend: &'static str, id: &[u8], rank: usize, size: usize) -> Result<Self, String> {
        let lib = load(vendor)?;
        let mut uid = ncclUniqueId { internal: [0; 128] };
        if id.len() != uid.internal.len() {
            return Err(format!("communicator id has {} bytes, expected {}", id.len(), uid.internal.len()));
        }
        for (d, s) in uid.internal.iter_mut().zip(id) {
            *d = *s as _;
        }
        let mut comm: ncclComm_t = std::ptr::null_mut();
        check("ncclCommInitRank", unsafe { lib.ncclCommInitRank(&mut comm, size as i32, uid, rank as i32) }).map_err(|e| format!("rank {rank} of {size}: {e}"))?;
        let name = if vendor == Vendor::Nvidia { "NCCL" } else { "RCCL" };
        log::info!("rank {rank}/{size}: {name} {} communicator ready", version(&lib));
        Ok(Ccl { backend, lib, comm, rank, size })
    }

    fn err(&self, op: &'static str) -> impl Fn(rccl_sys::CclError) -> BackendError {
        let backend = self.backend;
        move |e| BackendError::Op { backend, op, msg: e.to_string() }
    }

    /// Sums `n` floats at `buf` over the ranks, in place.
    pub fn all_reduce_sum(&self, buf: DevPtr, n: usize, stream: *mut std::ffi::c_void) -> Result<(), BackendError> {
        let (f32_, sum) = (rccl_sys::ncclDataType_t_ncclFloat32, rccl_sys::ncclRedOp_t_ncclSum);
        let r = unsafe { self.lib.ncclAllReduce(buf as *const _, buf as *mut _, n, f32_, sum, self.comm, stream as rccl_sys::hipStream_t) };
        check("ncclAllReduce", r).map_err(self.err("all_reduce"))
    }

    /// Every rank's `n` floats at `send`, in rank order, into `recv` ([size·n]).
    pub fn all_gather(&self, send: DevPtr, recv: DevPtr, n: usize, stream: *mut std::ffi::c_void) -> Result<(), BackendError> {
        let r = unsafe { self.lib.ncclAllGather(send as *const _, recv as *mut _, n, rccl_sys::ncclDataType_t_ncclFloat32, self.comm, stream as rccl_sys::hipStream_t) };
        check("ncclAllGather", r).map_err(self.err("all_gather"))
    }

    /// Sums `send` ([size·n]) over the ranks; this rank receives block `rank` ([n]).
    pub fn reduce_scatter(&self, send: DevPtr, recv: DevPtr, n: usize, stream: *mut std::ffi::c_void) -> Result<(), BackendError> {
        let (f32_, sum) = (rccl_sys::ncclDataType_t_ncclFloat32, rccl_sys::ncclRedOp_t_ncclSum);
        let r = unsafe { self.lib.ncclReduceScatter(send as *const _, recv as *mut _, n, f32_, sum, self.comm, stream as rccl_sys::hipStream_t) };
        check("ncclReduceScatter", r).map_err(self.err("reduce_scatter"))
    }

    /// The communicator's asynchronous error, if a peer failed (polled by the watchdog).
    pub fn async_error(&self) -> Option<String> {
        let mut r = rccl_sys::ncclResult_t_ncclSuccess;
        unsafe { self.lib.ncclCommGetAsyncError(self.comm, &mut r) };
        (r != rccl_sys::ncclResult_t_ncclSuccess && r != NCCL_IN_PROGRESS).then(|| format!("ncclResult_t {r}"))
    }
}
