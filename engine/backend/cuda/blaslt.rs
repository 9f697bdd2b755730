//! Linear layers with bf16 weights through cuBLASLt (dynamically loaded; absent → the own kernels).
//! The f32 activations are split into bf16 hi and lo parts stacked as one [2M, K] operand, so one
//! GEMM reads W once and gives both products in f32; a kernel adds the two halves. bf16 weights
//! are exact in bf16, so the result carries ~16 bits of x like the own tensor-core path (~1e-5
//! relative), not bf16's ~4e-3.
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::cublaslt::{result, sys};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};

use super::ops::{cfg, GpuLinear};
use super::{err, CudaBackend, GpuTensor};
use crate::backend::BackendError;

const EW: &str = "hip-kernels/elementwise.hip";
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
    workspace: CudaSlice<u8>,
    /// Per (2M, N, K): the plan, or None where cuBLASLt offered no algorithm (the own kernel runs)
    plans: Mutex<HashMap<(usize, usize, usize), Option<Plan>>>,
}

// SAFETY: the handle and descriptors are used from one stream at a time, under the backend's
// calls (plans behind a Mutex); cuBLASLt handles may be shared across threads.
unsafe impl Send for BlasLt {}
unsafe impl Sync for BlasLt {}

impl Drop for BlasLt {
    fn drop(&mut self) {
        for (_, p) in self.plans.lock().unwrap().drain().filter_map(|(k, p)| p.map(|p| (k, p))) {
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
    pub fn new(b: &CudaBackend) -> Option<Self> {
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
        let workspace = match b.stream.alloc_zeros::<u8>(WORKSPACE) {
            Ok(w) => w,
            Err(e) => {
                log::warn!("cuda: no memory for cuBLASLt's workspace ({e:?}); bf16 linear layers use the own tensor-core kernel");
                return None;
            }
        };
        Some(BlasLt { handle, workspace, plans: Mutex::new(HashMap::new()) })
    }

    /// D [m2, n] (row-major f32) = X2 [m2, k] (bf16) · W [n, k]ᵀ (bf16), in column-major terms
    /// Dᵀ = op(W) · X2ᵀ with W's stored K×N matrix transposed.
    fn plan(&self, m2: usize, n: usize, k: usize) -> Result<Plan, BackendError> {
        let e = blas_err("cublasLt plan");
        let desc = result::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType::CUDA_R_32F).map_err(&e)?;
        let trans: i32 = 1; // CUBLAS_OP_T
        unsafe { result::set_matmul_desc_attribute(desc, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &trans as *const i32 as *const c_void, 4) }.map_err(&e)?;
        let a = result::create_matrix_layout(sys::cudaDataType::CUDA_R_16BF, k as u64, n as u64, k as i64).map_err(&e)?;
        let b = result::create_matrix_layout(sys::cudaDataType::CUDA_R_16BF, k as u64, m2 as u64, k as i64).map_err(&e)?;
        let d = result::create_matrix_layout(sys::cudaDataType::CUDA_R_32F, n as u64, m2 as u64, n as i64).map_err(&e)?;
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

impl CudaBackend {
    /// Whether this linear layer goes through cuBLASLt: bf16 weights, enough rows, and rows of
    /// W and D that start on 16-byte boundaries (odd shapes take the own kernel).
    pub(super) fn blaslt_for(&self, x: &GpuTensor, w: &GpuLinear) -> bool {
        w.wdt == 1 && self.blaslt.is_some() && x.rows >= self.tuned.cublaslt_min_rows && w.inp.is_multiple_of(8) && w.out.is_multiple_of(4)
    }

    /// y = x · Wᵀ through cuBLASLt; false (nothing launched) where it has no algorithm for the shape.
    pub(super) fn linear_blaslt(&self, x: &GpuTensor, w: &GpuLinear, y: &mut CudaSlice<f32>) -> Result<bool, BackendError> {
        let lt = self.blaslt.as_ref().expect("blaslt_for checked");
        let (m, n, k) = (x.rows, w.out, w.inp);
        let m2 = 2 * m;
        {
            let mut plans = lt.plans.lock().unwrap();
            let p = plans.entry((m2, n, k)).or_insert_with(|| lt.plan(m2, n, k).inspect_err(|e| log::warn!("{e}; {m}x{n}x{k} runs on the own tensor-core kernel")).ok());
            if p.is_none() {
                return Ok(false);
            }
        }
        // x → [hi rows; lo rows] in bf16
        let mut x2 = self.stream.alloc_zeros::<u16>(m2 * k).map_err(err("cublasLt split"))?;
        let f = self.func(EW, "split_bf16_rows")?;
        let total = (m * k) as i64;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&x.buf).arg(&mut x2).arg(&total);
        unsafe { b.launch(cfg(((m * k).div_ceil(256) as u32, 1), 256, 0)) }.map_err(err("split_bf16_rows"))?;
        let mut d = self.stream.alloc_zeros::<f32>(m2 * n).map_err(err("cublasLt out"))?;
        {
            let plans = lt.plans.lock().unwrap();
            let p = plans[&(m2, n, k)].as_ref().expect("checked above");
            let (alpha, beta) = (1.0f32, 0.0f32);
            let (wp, _g1) = w.data.device_ptr(&self.stream);
            let (xp, _g2) = x2.device_ptr(&self.stream);
            let (dp, _g3) = d.device_ptr_mut(&self.stream);
            let (wsp, _g4) = lt.workspace.device_ptr(&self.stream);
            unsafe {
                result::matmul(
                    lt.handle,
                    p.desc,
                    &alpha as *const f32 as *const c_void,
                    &beta as *const f32 as *const c_void,
                    wp as *const c_void,
                    p.a,
                    xp as *const c_void,
                    p.b,
                    dp as *const c_void,
                    p.d,
                    dp as *mut c_void,
                    p.d,
                    &p.algo,
                    wsp as *mut c_void,
                    WORKSPACE,
                    self.stream.cu_stream() as sys::cudaStream_t,
                )
            }
            .map_err(blas_err("cublasLtMatmul"))?;
        }
        // y = hi rows' products + lo rows' products
        let f = self.func(EW, "sum_halves")?;
        let total = (m * n) as i64;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&d).arg(y).arg(&total);
        unsafe { b.launch(cfg(((m * n).div_ceil(256) as u32, 1), 256, 0)) }.map_err(err("sum_halves"))?;
        Ok(true)
    }
}
