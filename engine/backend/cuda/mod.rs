//! The CUDA backend: cudarc (driver API, dynamically loaded) running the portable HIP-dialect
//! kernels of hip-kernels/ compiled by NVRTC through the kernel cache. Activations are float32;
//! weights stay in their checkpoint dtype on the device (f32, bf16, or FP8 with block scales) and
//! are dequantised inside the kernels. Every op runs on the GPU; nothing falls back to the CPU.
mod blaslt;
mod gemv;
mod mla_prefill;
pub(crate) mod mma;
mod moe_grouped;
mod nccl;
mod ops;
mod staging;
mod step;

pub use nccl::unique_id as nccl_unique_id;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr};

use super::gpu::source::Vendor;
use super::gpu::specs::{generic_module, mla_module, mla_prefill_module};
use super::gpu::{Jit, KernelCache, KernelModule, ModelDims};
use super::{BackendError, BackendUnavailable, TensorShape};

pub use ops::{GpuExperts, GpuKvCache, GpuLinear, GpuRouting};
pub use step::{capture_sizes, Graphs};

/// The default `--cuda-graph-max-bs` (SGLang's on large-memory GPUs).
pub const DEFAULT_GRAPH_MAX_BS: usize = 160;

pub(crate) fn err(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> BackendError {
    move |e| BackendError::Op { backend: "cuda", op, msg: format!("{e:?}") }
}

/// The compute capability of device 0 as an NVRTC architecture name (e.g. sm_90a).
pub fn local_arch() -> Result<String, String> {
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("the CUDA driver library (libcuda.so) is not present".into());
    }
    let ctx = CudaContext::new(0).map_err(|e| format!("no CUDA device: {e:?}"))?;
    let (major, minor) = ctx.compute_capability().map_err(|e| format!("{e:?}"))?;
    // 'a' targets enable the architecture-specific instructions (wgmma on sm_90a)
    Ok(if major >= 9 { format!("sm_{major}{minor}a") } else { format!("sm_{major}{minor}") })
}

/// A float32 activation tensor on the device.
pub struct GpuTensor {
    pub rows: usize,
    pub cols: usize,
    pub buf: CudaSlice<f32>,
}

impl TensorShape for GpuTensor {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
}

pub struct CudaBackend {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub jit: Jit,
    pub arch: String,
    pub device_name: String,
    modules: Mutex<HashMap<KernelModule, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(String, Option<ModelDims>), CudaFunction>>,
    /// Fill new outputs with NaN (ENGINE_GPU_POISON=1) so unwritten elements show in tests.
    poison: bool,
    pub profile: OpProfile,
    /// The tensor-parallel communicator (None alone)
    ccl: Option<Arc<nccl::Nccl>>,
    /// Pinned buffers for weight upload, allocated on first use
    staging: Mutex<Option<staging::Staging>>,
    /// Linear layers and MoE experts beyond 8 rows on the tensor cores (hip-kernels/mma_tile.h):
    /// on for sm_80+, ENGINE_MMA_GEMM=0 keeps the CUDA-core kernels (for comparison)
    pub mma_gemm: bool,
    /// Streaming multiprocessors (split-K sizing)
    pub sms: usize,
    /// Where ops switch kernels, for this device (configs/tuned/)
    pub tuned: super::gpu::tuned::Tuned,
    /// Per-step index uploads and decode CUDA graphs
    pub graphs: Graphs,
    /// Small constant arrays (RoPE frequencies, router biases) uploaded once, by content
    constants: Mutex<HashMap<Vec<u32>, CudaSlice<f32>>>,
    /// cuBLASLt for linear layers with bf16 weights (None: not found, or ENGINE_CUBLASLT=0)
    pub blaslt: Option<blaslt::BlasLt>,
}

/// Per-op-class timing from CUDA events recorded around each op (`engine bench --profile`).
#[derive(Default)]
pub struct OpProfile {
    pub enabled: std::sync::atomic::AtomicBool,
    /// Linear layers timed per shape ("dense GEMM MxNxK") instead of as one class
    pub by_shape: std::sync::atomic::AtomicBool,
    shape_names: Mutex<HashMap<(usize, usize, usize), &'static str>>,
    depth: std::sync::atomic::AtomicUsize,
    spans: Mutex<Vec<(&'static str, cudarc::driver::CudaEvent, cudarc::driver::CudaEvent)>>,
}

impl CudaBackend {
    pub fn new(ordinal: usize) -> Result<Self, BackendError> {
        let unavailable = |reason: String| BackendError::Unavailable(BackendUnavailable { backend: "cuda", reason });
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(unavailable("the CUDA driver library libcuda.so was not found (no NVIDIA driver on this machine)".into()));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| unavailable(format!("cannot open CUDA device {ordinal}: {e:?}")))?;
        let (major, minor) = ctx.compute_capability().map_err(err("compute_capability"))?;
        let arch = if major >= 9 { format!("sm_{major}{minor}a") } else { format!("sm_{major}{minor}") };
        let device_name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let compiler = super::gpu::nvrtc::NvrtcCompiler::new(&arch).map_err(|e| unavailable(e.to_string()))?;
        let jit = Jit::new(KernelCache::from_env(), Box::new(compiler), Vendor::Nvidia);
        // one stream of our own for everything (the legacy default stream cannot be captured into
        // a graph); with a single stream, cudarc's per-buffer event tracking is not needed
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(err("new_stream"))?;
        log::info!("cuda backend: {device_name} ({arch}); kernels: portable HIP-dialect sources via NVRTC, cache {}", jit.cache.dir.display());
        log::info!("cuda op paths: linear/experts/embedding = own dequantising kernels (f32/bf16/fp8 weights, f32 accumulate); attention = absorbed MLA (decode, prompts under 64 tokens) and flash MHA prefill (64+ tokens, tensor cores); routing and sampling = GPU kernels");
        let poison = std::env::var("ENGINE_GPU_POISON").is_ok_and(|v| v == "1");
        let mma_gemm = major >= 8 && !std::env::var("ENGINE_MMA_GEMM").is_ok_and(|v| v == "0");
        let tuned = super::gpu::tuned::for_device(&device_name).map_err(unavailable)?;
        if mma_gemm {
            log::info!(
                "cuda op paths: linear layers from {} rows on the tensor cores (mma.sync bf16 hi+lo, 128x128 tiles, split-K); MoE experts grouped by expert from {} tokens (grouped GEMV), on the tensor cores from {}; flash MLA prefill from {} new tokens",
                tuned.mma_min_rows,
                tuned.moe_grouped_min_rows,
                tuned.moe_mma_min_rows,
                tuned.flash_min_q
            );
        } else {
            log::info!("cuda op paths: no tensor-core GEMM ({}): CUDA-core tiles for every batch", if major < 8 { "compute capability below 8.0" } else { "ENGINE_MMA_GEMM=0" });
        }
        keep_pool_memory(&ctx);
        let sms = ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).map_err(err("multiprocessor count"))? as usize;
        let mut b = CudaBackend { ctx, stream, jit, arch, device_name, modules: Mutex::new(HashMap::new()), functions: Mutex::new(HashMap::new()), poison, profile: OpProfile::default(), ccl: None, staging: Mutex::new(None), mma_gemm, sms, tuned, graphs: Graphs::new(DEFAULT_GRAPH_MAX_BS), constants: Mutex::new(HashMap::new()), blaslt: None };
        if std::env::var("ENGINE_CUBLASLT").is_ok_and(|v| v == "0") {
            log::info!("cuda op paths: cuBLASLt off (ENGINE_CUBLASLT=0)");
        } else {
            b.blaslt = blaslt::BlasLt::new(&b);
            if b.blaslt.is_some() {
                log::info!("cuda op paths: linear layers with bf16 weights from {} rows through cuBLASLt (x as bf16 hi + lo rows, f32 accumulate)", b.tuned.cublaslt_min_rows);
            }
        }
        Ok(b)
    }

    /// Joins NCCL communicator `id` as `rank` of `size` (blocks until all ranks join).
    pub fn with_nccl(mut self, id: &[u8], rank: usize, size: usize) -> Result<Self, BackendError> {
        self.ctx.bind_to_thread().map_err(err("bind_to_thread"))?;
        self.ccl = Some(Arc::new(nccl::Nccl::init(id, rank, size).map_err(|msg| BackendError::Op { backend: "cuda", op: "nccl init", msg })?));
        Ok(self)
    }

    /// A check the step watchdog can run from its own thread: NCCL's asynchronous error (a peer
    /// that failed or went away), if any.
    pub fn comm_probe(&self) -> Option<crate::dist::CommProbe> {
        let c = self.ccl.clone()?;
        Some(Box::new(move || c.async_error()))
    }

    /// Compiles (or loads from the cache) every kernel the model needs, up front.
    pub fn warmup(&self, dims: ModelDims) -> Result<(), BackendError> {
        for m in super::gpu::modules_for(dims, Vendor::Nvidia) {
            for f in &m.functions {
                self.load(&m, f)?;
            }
        }
        let (hits, compiles) = self.jit.stats();
        log::info!("kernels ready: {compiles} modules compiled, {hits} loaded from the cache");
        Ok(())
    }

    fn load(&self, m: &KernelModule, name: &str) -> Result<CudaFunction, BackendError> {
        // shape-specialised modules (the MLA kernels) are cached per shape
        let dims = if m.file.starts_with("hip-kernels/mla") { Some(dims_of(m)) } else { None };
        let key = (name.to_string(), dims);
        if let Some(f) = self.functions.lock().unwrap().get(&key) {
            return Ok(f.clone());
        }
        let module = {
            let mut mods = self.modules.lock().unwrap();
            match mods.get(m) {
                Some(x) => x.clone(),
                None => {
                    let bin = self.jit.binary(m).map_err(|e| BackendError::Op { backend: "cuda", op: "jit", msg: e.to_string() })?;
                    let module = self.ctx.load_module(cudarc::nvrtc::Ptx::from_binary(bin)).map_err(err("load_module"))?;
                    mods.insert(m.clone(), module.clone());
                    module
                }
            }
        };
        let f = module.load_function(name).map_err(err("load_function"))?;
        self.functions.lock().unwrap().insert(key, f.clone());
        Ok(f)
    }

    pub(crate) fn func(&self, file: &'static str, name: &str) -> Result<CudaFunction, BackendError> {
        self.load(&generic_module(file, Vendor::Nvidia), name)
    }

    pub(crate) fn mla_func(&self, dims: ModelDims, name: &str) -> Result<CudaFunction, BackendError> {
        self.load(&mla_module(dims, Vendor::Nvidia), name)
    }

    pub(crate) fn mla_prefill_func(&self, dims: ModelDims, name: &str) -> Result<CudaFunction, BackendError> {
        self.load(&mla_prefill_module(dims, Vendor::Nvidia), name)
    }

    /// Runs one op, timing it under `class` when profiling (outermost op only, so nothing counts twice).
    pub(crate) fn span<T>(&self, class: &'static str, f: impl FnOnce() -> Result<T, BackendError>) -> Result<T, BackendError> {
        use std::sync::atomic::Ordering;
        if !self.profile.enabled.load(Ordering::Relaxed) || self.profile.depth.fetch_add(1, Ordering::Relaxed) > 0 {
            if self.profile.enabled.load(Ordering::Relaxed) {
                let r = f();
                self.profile.depth.fetch_sub(1, Ordering::Relaxed);
                return r;
            }
            return f();
        }
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let a = self.stream.record_event(timing).map_err(err("profile"));
        let r = f();
        let b = self.stream.record_event(timing).map_err(err("profile"));
        self.profile.depth.fetch_sub(1, Ordering::Relaxed);
        if let (Ok(a), Ok(b)) = (a, b) {
            self.profile.spans.lock().unwrap().push((class, a, b));
        }
        r
    }

    /// The profile class of a linear layer of `m` rows: per shape when asked for.
    pub(crate) fn gemm_class(&self, m: usize, n: usize, k: usize) -> &'static str {
        use std::sync::atomic::Ordering;
        if !self.profile.enabled.load(Ordering::Relaxed) || !self.profile.by_shape.load(Ordering::Relaxed) {
            return "dense GEMM";
        }
        // a handful of distinct shapes per model: named once, kept for the process
        self.profile.shape_names.lock().unwrap().entry((m, n, k)).or_insert_with(|| Box::leak(format!("dense GEMM {m}x{n}x{k}").into_boxed_str()))
    }

    /// Milliseconds per op class since the last call (synchronises the stream).
    pub fn take_profile(&self) -> Result<Vec<(&'static str, f64)>, BackendError> {
        self.stream.synchronize().map_err(err("synchronize"))?;
        let spans = std::mem::take(&mut *self.profile.spans.lock().unwrap());
        let mut acc: Vec<(&'static str, f64)> = Vec::new();
        for (class, a, b) in spans {
            let ms = a.elapsed_ms(&b).map_err(err("elapsed_ms"))? as f64;
            match acc.iter_mut().find(|x| x.0 == class) {
                Some(x) => x.1 += ms,
                None => acc.push((class, ms)),
            }
        }
        Ok(acc)
    }

    /// A new f32 output buffer (NaN-poisoned when ENGINE_GPU_POISON=1; a device memset, so it
    /// is captured into graphs too).
    pub(crate) fn alloc_out(&self, n: usize) -> Result<CudaSlice<f32>, BackendError> {
        let b = self.stream.alloc_zeros::<f32>(n.max(1)).map_err(err("alloc"))?;
        if self.poison {
            let ptr = b.device_ptr(&self.stream).0;
            let r = unsafe { cudarc::driver::sys::cuMemsetD32Async(ptr, f32::NAN.to_bits(), n.max(1), self.stream.cu_stream()) };
            if r != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
                return Err(BackendError::Op { backend: "cuda", op: "poison", msg: format!("{r:?}") });
            }
        }
        Ok(b)
    }

    /// A device copy of a small constant array (uploaded once per distinct content).
    pub(crate) fn constant(&self, v: &[f32]) -> Result<u64, BackendError> {
        let key: Vec<u32> = v.iter().map(|x| x.to_bits()).collect();
        let mut c = self.constants.lock().unwrap();
        if let Some(b) = c.get(&key) {
            return Ok(b.device_ptr(&self.stream).0);
        }
        if self.capturing() {
            return Err(BackendError::Op { backend: "cuda", op: "constant", msg: "a new constant uploaded inside a CUDA graph capture".into() });
        }
        let b = self.stream.clone_htod(if v.is_empty() { &[0f32][..] } else { v }).map_err(err("constant"))?;
        let p = b.device_ptr(&self.stream).0;
        c.insert(key, b);
        Ok(p)
    }
}

/// Every op allocates its outputs stream-ordered (cuMemAllocAsync); by default the pool hands freed
/// memory back to the driver at each synchronisation, so the next step maps it again. Keep it (as
/// PyTorch's caching allocator does): steps reuse the same blocks.
fn keep_pool_memory(ctx: &CudaContext) {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    let ok = unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) == sys::CUresult::CUDA_SUCCESS
            && sys::cuMemPoolSetAttribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &mut threshold as *mut u64 as *mut std::ffi::c_void) == sys::CUresult::CUDA_SUCCESS
    };
    if !ok {
        log::warn!("cuda: could not raise the memory pool's release threshold; allocations may be slower");
    }
}

fn dims_of(m: &KernelModule) -> ModelDims {
    let get = |k: &str| m.defines.iter().find(|(n, _)| n == k).and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
    ModelDims { kv_lora_rank: get("KV_LORA"), qk_rope_head_dim: get("ROPE"), qk_nope_head_dim: get("NOPE"), v_head_dim: get("VDIM") }
}
