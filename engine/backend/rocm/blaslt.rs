//! hipBLASLt (libhipblaslt, loaded at run time) as the ROCm backend's `GemmLib`: bf16 × bf16 → f32
//! GEMMs for the linear layers with bf16 weights (backend/gpu/blas.rs splits x into bf16 hi/lo
//! rows), and the block-scaled FP8 GEMM of `--fp8-activations dynamic` (W one f32 scale per
//! 128×128 block, x one per token and 128 columns: the same scale modes as cuBLASLt's, where the
//! installed hipBLASLt has a kernel for them — its heuristic is asked once per shape, and without
//! one the activations stay f32). FP8 operands are e4m3fnuz on gfx942 (weights converted at
//! upload, activations quantised to it by act_quant.hip), OCP e4m3fn on gfx950. The same
//! column-major formulation as cuBLASLt: Dᵀ [n, m2] = op(W)ᵀ · X2ᵀ.
use std::ffi::c_void;

use hip_sys::hipblaslt as lt;

use super::RocmBackend;
use crate::backend::gpu::blas::{DescAttr as Attr, GemmLib, PlanCache};
use crate::backend::gpu::device::{DevBuf, DevPtr, Handle};

const WORKSPACE: usize = 32 << 20;

/// One GEMM shape's descriptors and chosen algorithm (created once, reused, also inside graphs).
struct Plan {
    desc: lt::hipblasLtMatmulDesc_t,
    a: lt::hipblasLtMatrixLayout_t,
    b: lt::hipblasLtMatrixLayout_t,
    d: lt::hipblasLtMatrixLayout_t,
    algo: lt::hipblasLtMatmulAlgo_t,
}

pub struct HipBlasLt {
    api: lt::HipBlasLtApi,
    handle: lt::hipblasLtHandle_t,
    workspace: DevBuf<u8>,
    stream: lt::hipStream_t,
    plans: PlanCache<Plan>,
    fp8_plans: PlanCache<Plan>,
    /// The FP8 operands' type: e4m3fnuz on gfx942, e4m3fn elsewhere
    fp8: lt::hipDataType,
}

// SAFETY: the handle and descriptors are used from one stream at a time, under the backend's
// calls (plans behind a Mutex); hipBLASLt handles may be shared across threads.
unsafe impl Send for HipBlasLt {}
unsafe impl Sync for HipBlasLt {}

fn check(call: &'static str, s: lt::hipblasStatus_t) -> Result<(), String> {
    if s == lt::hipblasStatus_t_HIPBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(format!("{call} failed: hipblasStatus_t {s}"))
    }
}

impl HipBlasLt {
    /// hipBLASLt when the library loads, else None (the own tensor-core kernel runs).
    pub fn new(b: &RocmBackend) -> Option<Self> {
        let (api, path) = match hip_sys::load_hipblaslt() {
            Ok(x) => x,
            Err(e) => {
                log::info!("rocm: {e}; bf16 linear layers use the own matrix-core kernel");
                return None;
            }
        };
        let mut handle: lt::hipblasLtHandle_t = std::ptr::null_mut();
        if let Err(e) = check("hipblasLtCreate", unsafe { api.hipblasLtCreate(&mut handle) }) {
            log::warn!("rocm: hipBLASLt ({}) did not start ({e}); bf16 linear layers use the own matrix-core kernel", path.display());
            return None;
        }
        let workspace = match b.zeros::<u8>(WORKSPACE) {
            Ok(w) => w,
            Err(e) => {
                log::warn!("rocm: no memory for hipBLASLt's workspace ({e}); bf16 linear layers use the own matrix-core kernel");
                unsafe { api.hipblasLtDestroy(handle) };
                return None;
            }
        };
        let fp8 = if b.fp8_fnuz { lt::hipDataType_HIP_R_8F_E4M3_FNUZ } else { lt::hipDataType_HIP_R_8F_E4M3 };
        Some(HipBlasLt { api, handle, workspace, stream: b.dev.stream(), plans: PlanCache::default(), fp8_plans: PlanCache::default(), fp8 })
    }

    fn destroy(&self, p: &Plan) {
        unsafe {
            self.api.hipblasLtMatrixLayoutDestroy(p.a);
            self.api.hipblasLtMatrixLayoutDestroy(p.b);
            self.api.hipblasLtMatrixLayoutDestroy(p.d);
            self.api.hipblasLtMatmulDescDestroy(p.desc);
        }
    }

    /// D [m2, n] (row-major f32) = X2 [m2, k] (bf16) · W [n, k]ᵀ (bf16), in column-major terms
    /// Dᵀ = op(W) · X2ᵀ with W's stored K×N matrix transposed.
    fn plan(&self, m2: usize, n: usize, k: usize) -> Result<Plan, String> {
        self.plan_typed(m2, n, k, lt::hipDataType_HIP_R_16BF, &[])
    }

    /// The block-scaled FP8 form: A = W (one scale per 128×128 block), B = x (one scale per
    /// token and 128 columns); the heuristic sees scale pointers (the workspace's address), each
    /// call sets its own.
    fn plan_fp8_block(&self, m: usize, n: usize, k: usize) -> Result<Plan, String> {
        let ws = self.workspace.ptr();
        let attrs = [
            (lt::hipblasLtMatmulDescAttributes_t_HIPBLASLT_MATMUL_DESC_A_SCALE_MODE, Attr::I32(lt::hipblasLtMatmulMatrixScale_t_HIPBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F as i32)),
            (lt::hipblasLtMatmulDescAttributes_t_HIPBLASLT_MATMUL_DESC_B_SCALE_MODE, Attr::I32(lt::hipblasLtMatmulMatrixScale_t_HIPBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F as i32)),
            (lt::hipblasLtMatmulDescAttributes_t_HIPBLASLT_MATMUL_DESC_A_SCALE_POINTER, Attr::Ptr(ws)),
            (lt::hipblasLtMatmulDescAttributes_t_HIPBLASLT_MATMUL_DESC_B_SCALE_POINTER, Attr::Ptr(ws)),
        ];
        self.plan_typed(m, n, k, self.fp8, &attrs)
    }

    /// Dᵀ [n, m2] f32 = op(W)ᵀ · Xᵀ with W and X of type `ab`, and `attrs` set on the descriptor.
    fn plan_typed(&self, m2: usize, n: usize, k: usize, ab: lt::hipDataType, attrs: &[(lt::hipblasLtMatmulDescAttributes_t, Attr)]) -> Result<Plan, String> {
        let a = &self.api;
        let mut p = Plan { desc: std::ptr::null_mut(), a: std::ptr::null_mut(), b: std::ptr::null_mut(), d: std::ptr::null_mut(), algo: unsafe { std::mem::zeroed() } };
        let made = (|| unsafe {
            check("hipblasLtMatmulDescCreate", a.hipblasLtMatmulDescCreate(&mut p.desc, lt::hipblasComputeType_t_HIPBLAS_COMPUTE_32F, lt::hipDataType_HIP_R_32F))?;
            let trans = lt::hipblasOperation_t_HIPBLAS_OP_T;
            let attr = lt::hipblasLtMatmulDescAttributes_t_HIPBLASLT_MATMUL_DESC_TRANSA;
            check("hipblasLtMatmulDescSetAttribute", a.hipblasLtMatmulDescSetAttribute(p.desc, attr, &trans as *const _ as *const c_void, std::mem::size_of_val(&trans)))?;
            for (attr, v) in attrs {
                let (ptr, size) = v.raw();
                check("hipblasLtMatmulDescSetAttribute", a.hipblasLtMatmulDescSetAttribute(p.desc, *attr, ptr, size))?;
            }
            check("hipblasLtMatrixLayoutCreate", a.hipblasLtMatrixLayoutCreate(&mut p.a, ab, k as u64, n as u64, k as i64))?;
            check("hipblasLtMatrixLayoutCreate", a.hipblasLtMatrixLayoutCreate(&mut p.b, ab, k as u64, m2 as u64, k as i64))?;
            check("hipblasLtMatrixLayoutCreate", a.hipblasLtMatrixLayoutCreate(&mut p.d, lt::hipDataType_HIP_R_32F, n as u64, m2 as u64, n as i64))?;
            let mut pref: lt::hipblasLtMatmulPreference_t = std::ptr::null_mut();
            check("hipblasLtMatmulPreferenceCreate", a.hipblasLtMatmulPreferenceCreate(&mut pref))?;
            let ws = WORKSPACE as u64;
            let wattr = lt::hipblasLtMatmulPreferenceAttributes_t_HIPBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES;
            let set = check("hipblasLtMatmulPreferenceSetAttribute", a.hipblasLtMatmulPreferenceSetAttribute(pref, wattr, &ws as *const u64 as *const c_void, 8));
            let mut result: lt::hipblasLtMatmulHeuristicResult_t = std::mem::zeroed();
            let mut found = 0;
            let h = set.and_then(|()| check("hipblasLtMatmulAlgoGetHeuristic", a.hipblasLtMatmulAlgoGetHeuristic(self.handle, p.desc, p.a, p.b, p.d, p.d, pref, 1, &mut result, &mut found)));
            a.hipblasLtMatmulPreferenceDestroy(pref);
            h?;
            if found == 0 {
                return Err(format!("hipBLASLt has no algorithm for {m2}x{n}x{k} of type {ab}"));
            }
            p.algo = result.algo;
            Ok(())
        })();
        match made {
            Ok(()) => Ok(p),
            Err(e) => {
                self.destroy(&p);
                Err(e)
            }
        }
    }
}

impl Drop for HipBlasLt {
    fn drop(&mut self) {
        for p in self.plans.drain().into_iter().chain(self.fp8_plans.drain()) {
            self.destroy(&p);
        }
        unsafe { self.api.hipblasLtDestroy(self.handle) };
    }
}

impl GemmLib for HipBlasLt {
    fn name(&self) -> &'static str {
        "hipBLASLt"
    }

    fn supports(&self, m2: usize, n: usize, k: usize) -> bool {
        self.plans.supports((m2, n, k), || self.plan(m2, n, k))
    }

    fn gemm_bf16(&self, m2: usize, n: usize, k: usize, w: DevPtr, x2: DevPtr, d: DevPtr) -> Result<(), String> {
        self.plans.with((m2, n, k), |p| self.run(p, w, x2, d, self.stream))?
    }

    fn supports_fp8_block(&self, m: usize, n: usize, k: usize) -> bool {
        self.fp8_plans.supports((m, n, k), || self.plan_fp8_block(m, n, k))
    }

    /// On the backend's stream (the ROCm backend has no side streams: `stream` is 0).
    fn gemm_fp8_block(&self, shape: (usize, usize, usize), (w, ws): (DevPtr, DevPtr), (xq, xs): (DevPtr, DevPtr), d: DevPtr, stream: Handle) -> Result<(), String> {
        if stream != 0 {
            return Err("hipBLASLt runs on the backend's stream only".into());
        }
        // the scale pointers belong to this call: set under the plans' lock, right before the launch
        self.fp8_plans.with(shape, |p| {
            for (attr, ptr) in [(lt::hipblasLtMatmulDescAttributes_t_HIPBLASLT_MATMUL_DESC_A_SCALE_POINTER, ws), (lt::hipblasLtMatmulDescAttributes_t_HIPBLASLT_MATMUL_DESC_B_SCALE_POINTER, xs)] {
                check("hipblasLtMatmulDescSetAttribute", unsafe { self.api.hipblasLtMatmulDescSetAttribute(p.desc, attr, &ptr as *const u64 as *const c_void, 8) })?;
            }
            self.run(p, w, xq, d, self.stream)
        })?
    }
}

impl HipBlasLt {
    /// D = W-side A × x-side B with the plan's descriptors, on `stream`.
    fn run(&self, p: &Plan, w: DevPtr, x: DevPtr, d: DevPtr, stream: lt::hipStream_t) -> Result<(), String> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        let r = unsafe {
            self.api.hipblasLtMatmul(
                self.handle,
                p.desc,
                &alpha as *const f32 as *const c_void,
                w as *const c_void,
                p.a,
                x as *const c_void,
                p.b,
                &beta as *const f32 as *const c_void,
                d as *const c_void,
                p.d,
                d as *mut c_void,
                p.d,
                &p.algo,
                self.workspace.ptr() as *mut c_void,
                WORKSPACE,
                stream,
            )
        };
        check("hipblasLtMatmul", r)
    }
}
