//! The GPU backend both vendors run: the portable HIP-dialect kernels of hip-kernels/ compiled by
//! the vendor's runtime compiler (NVRTC, hipRTC) through the kernel cache, launched through
//! `DeviceApi`. Activations are float32; weights stay in their checkpoint dtype on the device
//! (f32, bf16, or FP8 with block scales) and are dequantised inside the kernels. Every op runs on
//! the GPU; nothing falls back to the CPU. What differs per vendor is the `GpuVendor` that opens
//! the device (backend/cuda, backend/rocm): its runtime, compiler, warp width and BLAS library.
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use super::blas::GemmLib;
use super::ccl::Ccl;
use super::device::{err, DevBuf, DevEvent, DevPtr, DeviceApi, Elem, Kernel, Launch};
use super::source::Vendor;
use super::specs::{generic_module, mla_decode_module, mla_decode_rows_module, mla_decode_wg_module, mla_flash_bf16_module, mla_flash_wg_module, mla_module, mla_prefill_bf16_module, mla_prefill_module};
use super::step::Graphs;
use super::{Jit, KernelModule, ModelDims};
use crate::backend::{BackendError, TensorShape};

/// The default `--cuda-graph-max-bs` (SGLang's on large-memory GPUs).
pub const DEFAULT_GRAPH_MAX_BS: usize = 160;

/// What a vendor's device brings to the shared backend.
pub struct DeviceParts {
    pub dev: Arc<dyn DeviceApi>,
    pub jit: Jit,
    /// The compile target (sm_90a, gfx942)
    pub arch: String,
    pub device_name: String,
    /// Threads per warp/wavefront (32 NVIDIA, 64 CDNA): launch geometry follows it
    pub warp: u32,
    /// Streaming multiprocessors / compute units (split-K sizing)
    pub sms: usize,
    /// The matrix-unit kernels with the tile logic shared by both vendors (mma_tile.h,
    /// mla_prefill.hip: mma.sync on sm_80+, MFMA on CDNA)
    pub matrix_units: bool,
    /// The swap-AB matrix-unit decode kernels (tc_swap.h: mma.sync on sm_80+, MFMA on CDNA)
    pub swap_ab: bool,
    /// The device's FP8 conversion reads e4m3fnuz (gfx942): FP8 weights are converted at upload
    pub fp8_fnuz: bool,
}

/// A GPU vendor: how to open its device, its communicator library, its BLAS.
pub trait GpuVendor: Send + Sync + Sized + 'static {
    /// The backend's name in errors and logs ("cuda", "rocm")
    const NAME: &'static str;
    /// Which build of the kernel sources (vendor prelude) the device compiles
    const SOURCE: Vendor;
    fn open(ordinal: usize) -> Result<DeviceParts, BackendError>;
    /// The vendor's GEMM library for bf16 linear layers (cuBLASLt, hipBLASLt), if present.
    fn gemm_lib(b: &GpuBackend<Self>) -> Option<Box<dyn GemmLib>>;
    /// The collective library (NCCL, RCCL) flavour rccl-sys loads
    const CCL: rccl_sys::Vendor;
}

/// A float32 activation tensor on the device.
pub struct GpuTensor {
    pub rows: usize,
    pub cols: usize,
    pub buf: DevBuf<f32>,
}

impl TensorShape for GpuTensor {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
}

pub struct GpuBackend<V: GpuVendor> {
    pub dev: Arc<dyn DeviceApi>,
    pub jit: Jit,
    pub arch: String,
    pub device_name: String,
    pub warp: u32,
    modules: Mutex<HashMap<KernelModule, usize>>,
    /// Loaded functions by (name, its module's defines: shapes and variants)
    functions: Mutex<HashMap<FnKey, Kernel>>,
    /// What new op outputs are filled with (`alloc_out`): NaN with ENGINE_GPU_POISON=1 (the GPU
    /// tests: an element a kernel leaves unwritten shows), zero with ENGINE_GPU_ZERO_OUTPUTS=1,
    /// else nothing.
    out_fill: Option<u32>,
    pub profile: OpProfile,
    /// The tensor-parallel communicator (None alone)
    pub(super) ccl: Option<Arc<Ccl>>,
    /// Pinned buffers for weight upload, allocated on first use
    pub(super) staging: Mutex<Option<super::staging::Staging>>,
    /// Page-locked memory the MoE prefill's routed ids come back to the host in (moe_prefill.rs),
    /// allocated on first use and grown as needed
    pub(super) ids_host: Mutex<Option<super::device::PinnedBuf>>,
    /// Linear layers and MoE experts beyond 8 rows on the matrix units (hip-kernels/mma_tile.h):
    /// on for sm_80+ and CDNA, ENGINE_MMA_GEMM=0 keeps the CUDA-core kernels (for comparison)
    pub mma_gemm: bool,
    /// Flash MLA prefill on the matrix units (mla_prefill.hip: mma.sync on NVIDIA sm_80+, MFMA on
    /// CDNA)
    pub flash_prefill: bool,
    /// The matrix-unit attention kernels' portable scalar product instead of the matrix units
    /// (FB_PORTABLE in the flash prefill, MD_PORTABLE in the decode kernel; for the tests;
    /// functions are cached by their module's defines, so it can change between calls)
    pub flash_portable: bool,
    /// Attention on bf16 operands, set with `--fp8-activations dynamic` (whose FP8 GEMM inputs
    /// leave ~1e-2 in q, k and v): the flash prefill takes one product per step (FB_PARTS 1)
    /// instead of hi + lo (three), as SGLang's bf16 prefill attention, KV caches allocated from
    /// then on hold bf16 latents, and decode runs the matrix-unit kernel (mla_decode.hip;
    /// FlashMLA's numerics) instead of the f32 CUDA-core one
    pub attn_bf16: bool,
    /// Decode-sized MoE batches (FP8 experts) on the matrix units (moe_tc.hip; NVIDIA sm_80+,
    /// CDNA; ENGINE_MOE_TC=0 keeps the grouped GEMV)
    pub moe_tc: bool,
    /// Decode-sized linear layers with FP8 weights on the matrix units (linear_tc.hip; NVIDIA
    /// sm_80+, CDNA; ENGINE_LINEAR_TC=0 keeps the GEMV and the 128-row tiles)
    pub linear_tc: bool,
    /// The staged FP8 × FP8 MoE kernels for decode batches (moe_f8s.hip: weights by cp.async into
    /// shared memory) where the shapes allow; ENGINE_MOE_F8S=0 keeps moe_f8.hip's
    pub moe_f8s: bool,
    /// Streaming multiprocessors (split-K sizing)
    pub sms: usize,
    /// The arch has matrix units the kernels use (NVIDIA sm_80+, CDNA gfx942/gfx950)
    pub matrix_units: bool,
    /// FP8 weights are converted to e4m3fnuz at upload (gfx942)
    pub fp8_fnuz: bool,
    /// Where ops switch kernels, for this device (configs/tuned/)
    pub tuned: super::tuned::Tuned,
    /// Per-step index uploads and decode graphs
    pub graphs: Graphs,
    /// Small constant arrays (RoPE frequencies, router biases) uploaded once, by content
    constants: Mutex<HashMap<Vec<u32>, DevBuf<f32>>>,
    /// The vendor's GEMM library for linear layers with bf16 weights (None: not found, or
    /// ENGINE_CUBLASLT=0 / ENGINE_HIPBLASLT=0)
    pub blaslt: Option<Box<dyn GemmLib>>,
    /// `--fp8-activations dynamic`: FP8 linear layers that go through the GEMM library quantise
    /// their input per token and 128 channels and run its block-scaled FP8 GEMM (SGLang's
    /// numerics); off, activations stay f32 (bf16 hi + lo operands, ~1e-5)
    pub fp8_act: bool,
    /// `--fp8-activations dynamic` too: bf16-weight layers through the GEMM library (V3's
    /// lm_head) take x rounded to bf16, one product (SGLang's bf16 hidden states), instead of
    /// x as bf16 hi + lo (two: the batch-256 lm_head is compute-bound, 1.3 ms against ~0.65)
    pub bf16_act: bool,
    /// Streams beside the main one (made on first use; empty where the runtime has none)
    side: Mutex<Option<Vec<super::device::Handle>>>,
    /// The 2-block clusters of moe_f8_gemm.hip's launches (its three kernels) the device holds
    /// at once (asked of the runtime on first use: fixed by the kernel and the device)
    pub(super) moe_gemm_clusters: [std::sync::OnceLock<usize>; 3],
    /// The FP8 codes of the tensor `share_act_codes` shares (blas.rs)
    pub(super) act_memo: super::act_codes::ActMemo,
    _v: PhantomData<V>,
}

/// A loaded function's name and its module's defines.
type FnKey = (String, Vec<(String, String)>);

impl<V: GpuVendor> Drop for GpuBackend<V> {
    fn drop(&mut self) {
        for s in self.side.lock().unwrap().take().unwrap_or_default() {
            self.dev.stream_destroy(s);
        }
    }
}

/// Per-op-class timing from device events recorded around each op (`engine bench --profile`).
#[derive(Default)]
pub struct OpProfile {
    pub enabled: std::sync::atomic::AtomicBool,
    /// Linear layers timed per shape ("dense GEMM MxNxK") instead of as one class
    pub by_shape: std::sync::atomic::AtomicBool,
    shape_names: Mutex<HashMap<(usize, usize, usize), &'static str>>,
    depth: std::sync::atomic::AtomicUsize,
    spans: Mutex<Vec<(&'static str, DevEvent, DevEvent)>>,
    /// `Backend::mark_layer` records events (steps run op by op, as while `enabled`, but no op
    /// spans: each layer's time as the step's own, not inflated by events between ops)
    pub layers: std::sync::atomic::AtomicBool,
    /// ... its marks: (the layer that begins, None: the layers end)
    layer_marks: Mutex<Vec<(Option<usize>, DevEvent)>>,
    /// While enabled: the distinct experts each routing call picked (its ids read back)
    pub(super) routed: Mutex<Vec<usize>>,
}

impl<V: GpuVendor> GpuBackend<V> {
    /// Opens device `ordinal` (its runtime, compiler and tuned configs).
    pub fn new(ordinal: usize) -> Result<Self, BackendError> {
        let p = V::open(ordinal)?;
        let unavailable = |reason: String| BackendError::Unavailable(crate::backend::BackendUnavailable { backend: V::NAME, reason });
        let env_on = |k: &str| std::env::var(k).is_ok_and(|v| v == "1");
        let out_fill = if env_on("ENGINE_GPU_POISON") {
            Some(f32::NAN.to_bits())
        } else {
            env_on("ENGINE_GPU_ZERO_OUTPUTS").then_some(0)
        };
        let mma_gemm = p.matrix_units && !std::env::var("ENGINE_MMA_GEMM").is_ok_and(|v| v == "0");
        let tuned = super::tuned::for_device(&p.device_name).map_err(unavailable)?;
        log::info!("{} backend: {} ({}, {}-wide warps); kernels: portable HIP-dialect sources, cache {}", V::NAME, p.device_name, p.arch, p.warp, p.jit.cache.dir.display());
        log::info!("{} op paths: linear/experts/embedding = own dequantising kernels (f32/bf16/fp8 weights, f32 accumulate); attention = absorbed MLA (decode, short prompts){}; routing and sampling = GPU kernels", V::NAME, if p.matrix_units { " and flash MHA prefill (matrix units)" } else { "" });
        if mma_gemm {
            log::info!(
                "{} op paths: linear layers from {} rows on the matrix units (bf16 hi+lo, 128x128 tiles, split-K); MoE experts grouped by expert from {} tokens ({}), on 128-token matrix-unit tiles from {}; FP8 linear layers through the vendor GEMM library (where it loads) from {} rows; flash MLA prefill from {} new tokens",
                V::NAME,
                tuned.mma_min_rows,
                tuned.moe_grouped_min_rows,
                if p.swap_ab { "FP8 experts: swap-AB matrix-unit grouped GEMV, 16-token tiles; others: grouped GEMV" } else { "grouped GEMV" },
                tuned.moe_mma_min_rows,
                tuned.blaslt_fp8_min_rows,
                tuned.flash_min_q
            );
        } else {
            log::info!("{} op paths: no matrix-unit GEMM ({}): CUDA-core tiles for every batch", V::NAME, if p.matrix_units { "ENGINE_MMA_GEMM=0" } else { "the arch has none the kernels use" });
        }
        let mut b = GpuBackend {
            dev: p.dev,
            jit: p.jit,
            arch: p.arch,
            device_name: p.device_name,
            warp: p.warp,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            out_fill,
            profile: OpProfile::default(),
            ccl: None,
            staging: Mutex::new(None),
            ids_host: Mutex::new(None),
            mma_gemm,
            flash_prefill: p.matrix_units && mma_gemm,
            flash_portable: false,
            attn_bf16: false,
            moe_tc: p.swap_ab && mma_gemm && !std::env::var("ENGINE_MOE_TC").is_ok_and(|v| v == "0"),
            linear_tc: p.swap_ab && mma_gemm && !std::env::var("ENGINE_LINEAR_TC").is_ok_and(|v| v == "0"),
            moe_f8s: !std::env::var("ENGINE_MOE_F8S").is_ok_and(|v| v == "0"),
            sms: p.sms,
            matrix_units: p.matrix_units,
            fp8_fnuz: p.fp8_fnuz,
            tuned,
            graphs: Graphs::new(DEFAULT_GRAPH_MAX_BS),
            constants: Mutex::new(HashMap::new()),
            blaslt: None,
            fp8_act: false,
            bf16_act: false,
            side: Mutex::new(None),
            moe_gemm_clusters: Default::default(),
            act_memo: Default::default(),
            _v: PhantomData,
        };
        b.blaslt = V::gemm_lib(&b);
        Ok(b)
    }

    /// Joins communicator `id` as `rank` of `size` (blocks until all ranks join).
    pub fn with_ccl(mut self, id: &[u8], rank: usize, size: usize) -> Result<Self, BackendError> {
        self.dev.bind().map_err(err("bind"))?;
        let ccl = Ccl::init(V::CCL, V::NAME, id, rank, size).map_err(|msg| self.op_err("communicator init", msg))?;
        self.ccl = Some(Arc::new(ccl));
        Ok(self)
    }

    /// A check the step watchdog can run from its own thread: the communicator's asynchronous
    /// error (a peer that failed or went away), if any.
    pub fn comm_probe(&self) -> Option<crate::dist::CommProbe> {
        let c = self.ccl.clone()?;
        Some(Box::new(move || c.async_error()))
    }

    /// Compiles (or loads from the cache) every kernel the model needs, up front.
    pub fn warmup(&self, dims: ModelDims) -> Result<(), BackendError> {
        // the flash prefill in the form this backend runs (modules_for lists both)
        let prefill = self.prefill_variant(dims);
        for m in super::modules_for(dims, V::SOURCE) {
            if m.file == prefill.file && m != prefill {
                continue;
            }
            for f in &m.functions {
                self.load(&m, f)?;
            }
        }
        let (hits, compiles) = self.jit.stats();
        log::info!("kernels ready: {compiles} modules compiled, {hits} loaded from the cache");
        Ok(())
    }

    fn load(&self, m: &KernelModule, name: &str) -> Result<Kernel, BackendError> {
        // shape-specialised modules (the MLA kernels) and variants (FB_*) by their defines
        let key = (name.to_string(), m.defines.clone());
        if let Some(f) = self.functions.lock().unwrap().get(&key) {
            return Ok(*f);
        }
        let module = {
            let mut mods = self.modules.lock().unwrap();
            match mods.get(m) {
                Some(x) => *x,
                None => {
                    let bin = self.jit.binary(m).map_err(|e| self.op_err("jit", e.to_string()))?;
                    let module = self.dev.load_module(&bin).map_err(err("load_module"))?;
                    mods.insert(m.clone(), module);
                    module
                }
            }
        };
        let f = Kernel(self.dev.function(module, name).map_err(err("load_function"))?);
        // kernels that size their shared memory at launch may take all the device offers (a
        // refusal only matters to a launch that asks for more than the default, which then fails
        // naming the kernel)
        if let Err(e) = self.dev.allow_dynamic_shared(f.0) {
            log::warn!("{}: {name}: {e}", V::NAME);
        }
        self.functions.lock().unwrap().insert(key, f);
        Ok(f)
    }

    pub(crate) fn func(&self, file: &'static str, name: &str) -> Result<Kernel, BackendError> {
        self.load(&generic_module(file, V::SOURCE), name)
    }

    pub(crate) fn mla_func(&self, dims: ModelDims, name: &str) -> Result<Kernel, BackendError> {
        self.load(&mla_module(dims, V::SOURCE), name)
    }

    /// The matrix-unit decode attention (portable product with `flash_portable`).
    pub(crate) fn mla_decode_func(&self, dims: ModelDims) -> Result<Kernel, BackendError> {
        let mut m = mla_decode_module(dims, V::SOURCE);
        if self.flash_portable {
            m.defines.push(("MD_PORTABLE".into(), "1".into()));
        }
        self.load(&m, "mla_decode_mma")
    }

    /// The decode attention for groups of 64 heads on the warpgroup MMA (NVIDIA sm_90a).
    pub(crate) fn mla_decode_wg_func(&self, dims: ModelDims) -> Result<Kernel, BackendError> {
        self.load(&mla_decode_wg_module(dims, V::SOURCE), "mla_decode_wg")
    }

    /// The decode attention for groups of 16 heads (NVIDIA sm_80+).
    pub(crate) fn mla_decode_rows_func(&self, dims: ModelDims) -> Result<Kernel, BackendError> {
        self.load(&mla_decode_rows_module(dims, V::SOURCE), "mla_decode_rows")
    }

    /// The flash prefill in FlashAttention-2's form (NVIDIA sm_80+, bf16 operands).
    pub(crate) fn mla_flash_bf16_func(&self, dims: ModelDims) -> Result<Kernel, BackendError> {
        self.load(&mla_flash_bf16_module(dims, V::SOURCE), "mla_flash_bf16")
    }

    pub(crate) fn mla_flash_wg_func(&self, dims: ModelDims) -> Result<Kernel, BackendError> {
        self.load(&mla_flash_wg_module(dims, V::SOURCE), "mla_flash_wg")
    }

    pub(crate) fn mla_prefill_func(&self, dims: ModelDims, name: &str) -> Result<Kernel, BackendError> {
        self.load(&self.prefill_variant(dims), name)
    }

    /// The flash prefill module with this backend's variant defines (`attn_bf16`,
    /// `flash_portable`).
    fn prefill_variant(&self, dims: ModelDims) -> KernelModule {
        let mut m = if self.attn_bf16 { mla_prefill_bf16_module(dims, V::SOURCE) } else { mla_prefill_module(dims, V::SOURCE) };
        if self.flash_portable {
            m.defines.push(("FB_PORTABLE".into(), "1".into()));
        }
        m
    }

    /// `n` streams beside the main one, made on the first call (none where the runtime cannot:
    /// the caller then runs everything on the main stream).
    pub(crate) fn side_streams(&self, n: usize) -> Vec<super::device::Handle> {
        let mut side = self.side.lock().unwrap();
        side.get_or_insert_with(|| match (0..n).map(|_| self.dev.stream_create()).collect::<Result<Vec<_>, _>>() {
            Ok(v) => v,
            Err(e) => {
                log::info!("{}: no side streams ({e}); overlapping work runs on the main stream", V::NAME);
                Vec::new()
            }
        })
        .clone()
    }

    /// A launch of `f` on the device's stream; arguments follow with `.arg(..)`.
    pub(crate) fn launch<'a>(&'a self, f: &Kernel) -> Launch<'a> {
        Launch::new(&*self.dev, f)
    }

    /// Warps of a 256-thread block (8 on NVIDIA, 4 on CDNA): kernels that give each warp an
    /// output row are launched with that many rows per block.
    pub(crate) fn warps_per_block(&self) -> usize {
        256 / self.warp as usize
    }

    /// An op error of this backend.
    pub(crate) fn op_err(&self, op: &'static str, msg: String) -> BackendError {
        BackendError::Op { backend: V::NAME, op, msg }
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
        let a = DevEvent::record(&self.dev, true);
        let r = f();
        let b = DevEvent::record(&self.dev, true);
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

    /// The distinct experts of each routing call since the profile was enabled (or last taken).
    pub fn take_routed_experts(&self) -> Vec<usize> {
        std::mem::take(&mut *self.profile.routed.lock().unwrap())
    }

    /// Milliseconds per op class since the last call (synchronises the stream).
    pub fn take_profile(&self) -> Result<Vec<(&'static str, f64)>, BackendError> {
        self.dev.synchronize().map_err(err("synchronize"))?;
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

    /// `Backend::mark_layer`: an event at the mark while timing layers (`profile.layers`; not
    /// while capturing a graph).
    pub(crate) fn layer_mark(&self, layer: Option<usize>) -> Result<(), BackendError> {
        if self.profile.layers.load(std::sync::atomic::Ordering::Relaxed) && !self.capturing() {
            let e = DevEvent::record(&self.dev, true).map_err(err("event"))?;
            self.profile.layer_marks.lock().unwrap().push((layer, e));
        }
        Ok(())
    }

    /// Milliseconds per layer (index: the layer) since the last call, summed over the forward
    /// passes: each layer from its mark to the next one (synchronises the stream).
    pub fn take_layer_profile(&self) -> Result<Vec<f64>, BackendError> {
        self.dev.synchronize().map_err(err("synchronize"))?;
        let marks = std::mem::take(&mut *self.profile.layer_marks.lock().unwrap());
        layer_spans(&marks, |a, b| a.elapsed_ms(b).map(f64::from)).map_err(err("elapsed_ms"))
    }

    /// `n` zeroed elements on the device.
    pub(crate) fn zeros<T: Elem>(&self, n: usize) -> Result<DevBuf<T>, BackendError> {
        DevBuf::zeros(&self.dev, n).map_err(err("alloc"))
    }

    /// An uninitialised buffer, for scratch the next kernels overwrite completely.
    pub(crate) fn scratch<T: Elem>(&self, n: usize) -> Result<DevBuf<T>, BackendError> {
        DevBuf::alloc(&self.dev, n).map_err(err("alloc"))
    }

    /// A device copy of `v`.
    pub(crate) fn htod<T: Elem>(&self, v: &[T]) -> Result<DevBuf<T>, BackendError> {
        DevBuf::from_host(&self.dev, v).map_err(err("upload"))
    }

    /// For kernel `op`, which copies by the tensor memory accelerator: the tensor maps (16 words
    /// each, in order) of row-major byte matrices given as (pointer, bytes a row, rows, rows a box;
    /// boxes 128 bytes wide, 128-byte swizzled), uploaded in one buffer.
    pub(crate) fn upload_tensor_maps(&self, op: &'static str, mats: &[(DevPtr, usize, usize, usize)]) -> Result<DevBuf<u8>, BackendError> {
        let mut bytes = Vec::with_capacity(mats.len() * 128);
        for &(p, cols, rows, box_rows) in mats {
            let m = self.dev.tensor_map_u8_sw128(p, cols as u64, rows as u64, cols as u64, box_rows as u32).map_err(|e| BackendError::Op { backend: e.vendor, op, msg: format!("tensor map: {e}") })?;
            let m = m.ok_or_else(|| self.op_err(op, "the device has no tensor maps".into()))?;
            bytes.extend(m.iter().flat_map(|w| w.to_le_bytes()));
        }
        self.htod(&bytes)
    }

    /// A new f32 output buffer for a kernel that writes every element (outputs that kernels add
    /// into come from `zeros`): unfilled, so that a decode step's graph holds no memset between
    /// its kernels (a V3 layer made ~12 of them), or NaN-poisoned (ENGINE_GPU_POISON=1, set by
    /// every GPU test: an element left unwritten fails the test) or zeroed
    /// (ENGINE_GPU_ZERO_OUTPUTS=1), by a device memset, captured into graphs too.
    pub(crate) fn alloc_out(&self, n: usize) -> Result<DevBuf<f32>, BackendError> {
        let b = DevBuf::<f32>::alloc(&self.dev, n).map_err(err("alloc"))?;
        if let Some(fill) = self.out_fill {
            self.dev.memset_d32(b.ptr(), fill, b.len()).map_err(err("alloc"))?;
        }
        Ok(b)
    }

    /// A device copy of a small constant array (uploaded once per distinct content).
    pub(crate) fn constant(&self, v: &[f32]) -> Result<u64, BackendError> {
        let key: Vec<u32> = v.iter().map(|x| x.to_bits()).collect();
        let mut c = self.constants.lock().unwrap();
        if let Some(b) = c.get(&key) {
            return Ok(b.ptr());
        }
        if self.capturing() {
            return Err(self.op_err("constant", "a new constant uploaded inside a graph capture".into()));
        }
        let b = self.htod(v)?;
        let p = b.ptr();
        c.insert(key, b);
        Ok(p)
    }
}

/// Per-layer sums of the spans between consecutive marks (`elapsed` of two marks' events): a
/// layer's span runs from its mark to the next mark of the same pass (the next layer's, or the
/// end's).
fn layer_spans<E, X>(marks: &[(Option<usize>, E)], elapsed: impl Fn(&E, &E) -> Result<f64, X>) -> Result<Vec<f64>, X> {
    let mut ms: Vec<f64> = Vec::new();
    for w in marks.windows(2) {
        if let (Some(i), _) = &w[0] {
            if ms.len() <= *i {
                ms.resize(i + 1, 0.0);
            }
            ms[*i] += elapsed(&w[0].1, &w[1].1)?;
        }
    }
    Ok(ms)
}

#[cfg(test)]
mod layer_span_tests {
    /// Layer spans run from a layer's mark to the next mark, summed over passes; the end mark
    /// closes a pass and opens nothing.
    #[test]
    fn layer_spans_sum_mark_to_mark_over_passes() {
        let t = |v: f64| v; // an "event" is its time stamp
        let marks = [(Some(0), t(1.0)), (Some(1), t(3.0)), (None, t(7.0)), (Some(0), t(10.0)), (Some(1), t(10.5)), (None, t(12.0))];
        let ms = super::layer_spans(&marks, |a: &f64, b: &f64| Ok::<f64, ()>(b - a)).unwrap();
        assert_eq!(ms, vec![2.0 + 0.5, 4.0 + 1.5]);
        assert!(super::layer_spans::<f64, ()>(&[], |a, b| Ok(b - a)).unwrap().is_empty());
    }
}
