//! cuBLASLt (dynamically loaded) as the CUDA backend's `GemmLib`: bf16 × bf16 → f32 GEMMs for the
//! linear layers (backend/gpu/blas.rs splits x into bf16 hi/lo rows), f32 × f32 → f32 for the
//! MoE router at prefill sizes (backend/gpu/router.rs), and block-scaled FP8 ×
//! FP8 → f32 (cuBLASLt 12.9+ on Hopper: 128×128 weight blocks, 1×128 activation groups) for
//! `--fp8-activations dynamic`, and the same into bf16 (MLA's kv_b at prefill, read by the flash
//! attention as bf16).
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::{result, sys};

use crate::backend::gpu::blas::{DescAttr as Attr, GemmLib, PlanCache};
use crate::backend::gpu::device::{DevBuf, DevPtr, DeviceApi, Handle};
use crate::backend::BackendError;

const WORKSPACE: usize = 32 << 20;

fn blas_err(op: &'static str) -> impl Fn(result::CublasError) -> BackendError {
    move |e| BackendError::Op { backend: "cuda", op, msg: format!("cuBLASLt: {e:?}") }
}

/// One GEMM shape's descriptors and chosen algorithm (created once, reused, also inside graphs).
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

pub struct BlasLt {
    handle: sys::cublasLtHandle_t,
    workspace: DevBuf<u8>,
    stream: sys::cudaStream_t,
    plans: PlanCache<Plan>,
    /// Block-scaled FP8 plans, per (m, n, k)
    fp8_plans: PlanCache<Plan>,
    /// ... with a bf16 D
    fp8_bf16_plans: PlanCache<Plan>,
    /// f32 plans, per (m, n, k)
    f32_plans: PlanCache<Plan>,
    /// A workspace per side stream (GEMMs that overlap must not share one), made on first use
    side_ws: Mutex<HashMap<Handle, DevBuf<u8>>>,
    dev: Arc<dyn DeviceApi>,
}

// SAFETY: the handle and descriptors are used from one stream at a time, under the backend's
// calls (plans behind a Mutex); cuBLASLt handles may be shared across threads.
unsafe impl Send for BlasLt {}
unsafe impl Sync for BlasLt {}

impl Drop for BlasLt {
    fn drop(&mut self) {
        for p in self.plans.drain().into_iter().chain(self.fp8_plans.drain()).chain(self.fp8_bf16_plans.drain()).chain(self.f32_plans.drain()) {
            unsafe {
                let _ = result::destroy_matrix_layout(p.a);
                let _ = result::destroy_matrix_layout(p.b);
                let _ = result::destroy_matrix_layout(p.d);
                let _ = result::destroy_matmul_desc(p.desc);
            }
        }
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}

impl BlasLt {
    /// cuBLASLt when the library loads (`libcublasLt.so.13` on the library path), else None.
    pub fn new(b: &super::CudaBackend) -> Option<Self> {
        if !unsafe { sys::is_culib_present() } {
            log::info!("cuda: cuBLASLt not found (libcublasLt on the library path); bf16 linear layers use the own tensor-core kernel");
            return None;
        }
        let handle = match result::create_handle() {
            Ok(h) => h,
            Err(e) => {
                log::warn!("cuda: cuBLASLt did not start ({e:?}); bf16 linear layers use the own tensor-core kernel");
                return None;
            }
        };
        let workspace = match b.zeros::<u8>(WORKSPACE) {
            Ok(w) => w,
            Err(e) => {
                log::warn!("cuda: no memory for cuBLASLt's workspace ({e:?}); bf16 linear layers use the own tensor-core kernel");
                return None;
            }
        };
        Some(BlasLt { handle, workspace, stream: b.dev.stream() as sys::cudaStream_t, plans: PlanCache::default(), fp8_plans: PlanCache::default(), fp8_bf16_plans: PlanCache::default(), f32_plans: PlanCache::default(), side_ws: Mutex::new(HashMap::new()), dev: b.dev.clone() })
    }

    /// D [m2, n] (row-major f32) = X2 [m2, k] (bf16) · W [n, k]ᵀ (bf16), in column-major terms
    /// Dᵀ = op(W) · X2ᵀ with W's stored K×N matrix transposed.
    fn plan(&self, m2: usize, n: usize, k: usize) -> Result<Plan, BackendError> {
        self.plan_typed(m2, n, k, sys::cudaDataType::CUDA_R_16BF, sys::cudaDataType::CUDA_R_32F, &[])
    }

    /// The block-scaled FP8 form: A = W (e4m3, one scale per 128×128 block), B = x (e4m3, one
    /// scale per token and 128 columns); the scale pointers are set per call; D of type `dt`.
    fn plan_fp8_block(&self, m: usize, n: usize, k: usize, dt: sys::cudaDataType) -> Result<Plan, BackendError> {
        use sys::cublasLtMatmulDescAttributes_t::*;
        use sys::cublasLtMatmulMatrixScale_t::*;
        // the heuristic sees scale pointers (any 16-byte aligned device address: the workspace's);
        // each call sets its own
        let ws = self.workspace.ptr();
        let attrs = [
            (CUBLASLT_MATMUL_DESC_A_SCALE_MODE, Attr::I32(CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F as i32)),
            (CUBLASLT_MATMUL_DESC_B_SCALE_MODE, Attr::I32(CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F as i32)),
            (CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, Attr::Ptr(ws)),
            (CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, Attr::Ptr(ws)),
        ];
        self.plan_typed(m, n, k, sys::cudaDataType::CUDA_R_8F_E4M3, dt, &attrs)
    }

    /// Dᵀ [n, rows] (type `dt`) = op(W)ᵀ · Xᵀ with W and X of type `ab`, and `attrs` set on the descriptor.
    fn plan_typed(&self, m2: usize, n: usize, k: usize, ab: sys::cudaDataType, dt: sys::cudaDataType, attrs: &[(sys::cublasLtMatmulDescAttributes_t, Attr)]) -> Result<Plan, BackendError> {
        let e = blas_err("cublasLt plan");
        let desc = result::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType::CUDA_R_32F).map_err(&e)?;
        let trans: i32 = 1; // CUBLAS_OP_T
        unsafe { result::set_matmul_desc_attribute(desc, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &trans as *const i32 as *const c_void, 4) }.map_err(&e)?;
        for (attr, v) in attrs {
            let (p, size) = v.raw();
            unsafe { result::set_matmul_desc_attribute(desc, *attr, p, size) }.map_err(&e)?;
        }
        let a = result::create_matrix_layout(ab, k as u64, n as u64, k as i64).map_err(&e)?;
        let b = result::create_matrix_layout(ab, k as u64, m2 as u64, k as i64).map_err(&e)?;
        let d = result::create_matrix_layout(dt, n as u64, m2 as u64, n as i64).map_err(&e)?;
        let pref = result::create_matmul_pref().map_err(&e)?;
        let ws = WORKSPACE as u64;
        unsafe { result::set_matmul_pref_attribute(pref, sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws as *const u64 as *const c_void, 8) }.map_err(&e)?;
        let h = unsafe { result::get_matmul_algo_heuristic(self.handle, desc, a, b, d, d, pref) };
        unsafe { result::destroy_matmul_pref(pref) }.map_err(&e)?;
        match h {
            Ok(h) => Ok(Plan { desc, a, b, d, algo: h.algo }),
            Err(x) => {
                unsafe {
                    let _ = result::destroy_matrix_layout(a);
                    let _ = result::destroy_matrix_layout(b);
                    let _ = result::destroy_matrix_layout(d);
                    let _ = result::destroy_matmul_desc(desc);
                }
                Err(e(x))
            }
        }
    }
}

impl GemmLib for BlasLt {
    fn name(&self) -> &'static str {
        "cuBLASLt"
    }

    fn supports(&self, m2: usize, n: usize, k: usize) -> bool {
        self.plans.supports((m2, n, k), || self.plan(m2, n, k).map_err(|e| e.to_string()))
    }

    fn gemm_bf16(&self, m2: usize, n: usize, k: usize, w: DevPtr, x2: DevPtr, d: DevPtr) -> Result<(), String> {
        self.plans.with((m2, n, k), |p| self.run(p, w, x2, d, self.stream, self.workspace.ptr(), 0.0))?
    }

    fn supports_f32(&self, m: usize, n: usize, k: usize) -> bool {
        // CUBLAS_COMPUTE_32F with f32 operands: FFMA products and sums (TF32 only under _FAST_TF32)
        self.f32_plans.supports((m, n, k), || self.plan_typed(m, n, k, sys::cudaDataType::CUDA_R_32F, sys::cudaDataType::CUDA_R_32F, &[]).map_err(|e| e.to_string()))
    }

    fn gemm_f32(&self, m: usize, n: usize, k: usize, w: DevPtr, x: DevPtr, d: DevPtr) -> Result<(), String> {
        self.f32_plans.with((m, n, k), |p| self.run(p, w, x, d, self.stream, self.workspace.ptr(), 0.0))?
    }

    fn supports_fp8_block(&self, m: usize, n: usize, k: usize) -> bool {
        self.fp8_plans.supports((m, n, k), || self.plan_fp8_block(m, n, k, sys::cudaDataType::CUDA_R_32F).map_err(|e| e.to_string()))
    }

    fn supports_fp8_block_bf16(&self, m: usize, n: usize, k: usize) -> bool {
        self.fp8_bf16_plans.supports((m, n, k), || self.plan_fp8_block(m, n, k, sys::cudaDataType::CUDA_R_16BF).map_err(|e| e.to_string()))
    }

    fn gemm_fp8_block_bf16(&self, shape: (usize, usize, usize), w: (DevPtr, DevPtr), x: (DevPtr, DevPtr), d: DevPtr) -> Result<(), String> {
        self.scaled(&self.fp8_bf16_plans, shape, w, x, d, (self.stream, self.workspace.ptr()), 0.0)
    }

    fn gemm_fp8_block(&self, shape: (usize, usize, usize), w: (DevPtr, DevPtr), x: (DevPtr, DevPtr), d: DevPtr, stream: Handle) -> Result<(), String> {
        self.fp8_block(shape, w, x, d, stream, 0.0)
    }

    fn gemm_fp8_block_add(&self, shape: (usize, usize, usize), w: (DevPtr, DevPtr), x: (DevPtr, DevPtr), d: DevPtr) -> Result<(), String> {
        self.fp8_block(shape, w, x, d, 0, 1.0)
    }
}

impl BlasLt {
    /// D = beta · D + the block-scaled FP8 product (`GemmLib::gemm_fp8_block`).
    #[allow(clippy::too_many_arguments)]
    fn fp8_block(&self, shape: (usize, usize, usize), (w, ws): (DevPtr, DevPtr), (xq, xs): (DevPtr, DevPtr), d: DevPtr, stream: Handle, beta: f32) -> Result<(), String> {
        let (st, work) = if stream == 0 {
            (self.stream, self.workspace.ptr())
        } else {
            let mut side = self.side_ws.lock().unwrap();
            let w = match side.entry(stream) {
                std::collections::hash_map::Entry::Occupied(o) => o.get().ptr(),
                std::collections::hash_map::Entry::Vacant(v) => v.insert(DevBuf::zeros(&self.dev, WORKSPACE).map_err(|e| format!("side-stream workspace: {e}"))?).ptr(),
            };
            (stream as sys::cudaStream_t, w)
        };
        self.scaled(&self.fp8_plans, shape, (w, ws), (xq, xs), d, (st, work), beta)
    }

    /// D = beta · D + the block-scaled FP8 product by `plans`' plan for `shape`, on (stream,
    /// workspace). The scale pointers belong to this call: set under the plans' lock, right
    /// before the launch.
    #[allow(clippy::too_many_arguments)]
    fn scaled(&self, plans: &PlanCache<Plan>, shape: (usize, usize, usize), (w, ws): (DevPtr, DevPtr), (xq, xs): (DevPtr, DevPtr), d: DevPtr, (st, work): (sys::cudaStream_t, DevPtr), beta: f32) -> Result<(), String> {
        use sys::cublasLtMatmulDescAttributes_t::{CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER};
        plans.with(shape, |p| {
            for (attr, ptr) in [(CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, ws), (CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, xs)] {
                unsafe { result::set_matmul_desc_attribute(p.desc, attr, &ptr as *const u64 as *const c_void, 8) }.map_err(|e| format!("cublasLtMatmulDescSetAttribute: {e:?}"))?;
            }
            self.run(p, w, xq, d, st, work, beta)
        })?
    }

    /// D = W-side A × x-side B + beta · D with the plan's descriptors (C is D), on `stream` with
    /// `workspace`.
    #[allow(clippy::too_many_arguments)]
    fn run(&self, p: &Plan, w: DevPtr, x: DevPtr, d: DevPtr, stream: sys::cudaStream_t, workspace: DevPtr, beta: f32) -> Result<(), String> {
        let alpha = 1.0f32;
        unsafe {
            result::matmul(
                self.handle,
                p.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                w as *const c_void,
                p.a,
                x as *const c_void,
                p.b,
                d as *const c_void,
                p.d,
                d as *mut c_void,
                p.d,
                &p.algo,
                workspace as *mut c_void,
                WORKSPACE,
                stream,
            )
        }
        .map_err(|e| format!("cublasLtMatmul: {e:?}"))
    }
}
