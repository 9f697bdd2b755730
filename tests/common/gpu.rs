//! Helpers of the GPU tests (gpu_ops.rs, gpu_moe.rs): the backend under test, random inputs,
//! relative errors against the CPU reference, weights of each dtype.
use engine::backend::cpu::CpuBackend;
use engine::backend::gpu::backend::{GpuBackend, GpuVendor};
use engine::backend::Backend;
use engine::sampling::Rng;
use engine::weights::{HostLinear, LinearData, MmapSlice};

pub const F32_TOL: f64 = 1e-4;
/// bf16 operands: FP8 weights whose block scale varies inside a 128-row tile are rounded to bf16
/// after scaling
pub const BF16_TOL: f64 = 1e-2;
// tensor-core GEMMs: X split into bf16 hi + lo, bf16/FP8 weights exact (FP8 scale folded into X),
// f32 weights split too: near-f32 results
pub const MMA_TOL: f64 = 2e-4;
/// FP8 × FP8 on the tensor cores: exact products, accumulated within each 128-column block at
/// the tensor cores' reduced precision, then scaled and summed in f32
pub const FP8_ACC_TOL: f64 = 2e-3;

pub fn gpu<V: GpuVendor>() -> GpuBackend<V> {
    std::env::set_var("ENGINE_GPU_POISON", "1");
    GpuBackend::<V>::new(0).unwrap_or_else(|e| panic!("{} backend: {e}", V::NAME))
}

pub fn randn(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() * scale).collect()
}

/// `n` distinct cache slots below `total`, drawn in turn.
pub fn distinct_slots(rng: &mut Rng, n: usize, total: usize) -> Vec<u32> {
    let mut slots: Vec<u32> = Vec::new();
    while slots.len() < n {
        let s = (rng.next_u64() % total as u64) as u32;
        if !slots.contains(&s) {
            slots.push(s);
        }
    }
    slots
}

/// `n` token positions below 100,000.
pub fn positions(rng: &mut Rng, n: usize) -> Vec<u32> {
    (0..n).map(|_| (rng.next_u64() % 100_000) as u32).collect()
}

/// ‖a − b‖ / ‖b‖ in f64; NaN anywhere fails.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length");
    assert!(a.iter().all(|x| x.is_finite()), "GPU output has NaN/inf (unwritten elements?)");
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        num += ((x - y) as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

pub fn check(name: &str, a: &[f32], b: &[f32], tol: f64) {
    let e = rel_err(a, b);
    eprintln!("{name}: rel err {e:.2e}");
    assert!(e <= tol, "{name}: relative error {e:.3e} > {tol:e}");
}

#[derive(Clone, Copy)]
pub enum WType {
    F32,
    Bf16,
    Fp8,
}

impl WType {
    pub fn name(self) -> &'static str {
        match self {
            WType::F32 => "f32",
            WType::Bf16 => "bf16",
            WType::Fp8 => "fp8",
        }
    }
}

/// An MLP's (gate, up, down) of `wt` between `hidden` and `inter` columns.
pub fn host_mlp(rng: &mut Rng, hidden: usize, inter: usize, wt: WType) -> [HostLinear; 3] {
    [host_linear(rng, inter, hidden, wt), host_linear(rng, inter, hidden, wt), host_linear(rng, hidden, inter, wt)]
}

pub fn host_linear(rng: &mut Rng, out: usize, inp: usize, t: WType) -> HostLinear {
    let w = randn(rng, out * inp, (inp as f32).powf(-0.5));
    match t {
        WType::F32 => HostLinear::from_f32("w", out, inp, &w),
        WType::Bf16 => {
            let b: Vec<u8> = w.iter().flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes()).collect();
            HostLinear { name: "w".into(), out, inp, data: LinearData::BF16(MmapSlice::from_vec(b)) }
        }
        WType::Fp8 => host_fp8(rng, out, inp, &w, 128),
    }
}

/// FP8 e4m3 with [bn × 128] block scales.
pub fn host_fp8(rng: &mut Rng, out: usize, inp: usize, w: &[f32], bn: usize) -> HostLinear {
    let bk = 128;
    let scale: Vec<f32> = (0..out.div_ceil(bn) * inp.div_ceil(bk)).map(|_| 0.002 + rng.uniform() as f32 * 0.004).collect();
    let q: Vec<u8> = (0..out * inp).map(|i| engine::synth::f32_to_fp8_e4m3fn(w[i] / scale[(i / inp / bn) * inp.div_ceil(bk) + (i % inp) / bk])).collect();
    HostLinear { name: "w".into(), out, inp, data: LinearData::Fp8 { w: MmapSlice::from_vec(q), scale_inv: scale, block_n: bn, block_k: bk } }
}

/// x [m, k] · wᵀ on the CPU reference.
pub fn cpu_linear(c: &CpuBackend, w: &HostLinear, m: usize, k: usize, x: &[f32]) -> Vec<f32> {
    c.download(&c.linear(&c.upload(m, k, x).unwrap(), &c.upload_linear(w).unwrap()).unwrap()).unwrap()
}

/// x [m, k] · wᵀ on the GPU and on the CPU reference: (GPU, CPU).
pub fn linear_both<V: GpuVendor>(g: &GpuBackend<V>, c: &CpuBackend, w: &HostLinear, m: usize, k: usize, x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let got = g.download(&g.linear(&g.upload(m, k, x).unwrap(), &g.upload_linear(w).unwrap()).unwrap()).unwrap();
    (got, cpu_linear(c, w, m, k, x))
}

/// A random FP8 layer [n, k] (scale blocks of `bn` rows, 128 columns) on m random rows, on the GPU
/// against the CPU reference, within `tol`.
pub fn check_fp8_linear<V: GpuVendor>(g: &GpuBackend<V>, c: &CpuBackend, rng: &mut Rng, (m, n, k, bn): (usize, usize, usize, usize), name: &str, tol: f64) {
    let v = randn(rng, n * k, (k as f32).powf(-0.5));
    let w = host_fp8(rng, n, k, &v, bn);
    let x = randn(rng, m * k, 1.0);
    let (got, want) = linear_both(g, c, &w, m, k, &x);
    check(&format!("{name} {m}x{n}x{k}"), &got, &want, tol);
}

/// `g.linear` against the CPU at each (m, n, k) and every weight dtype, within `tol`.
pub fn check_linears<V: GpuVendor>(g: &GpuBackend<V>, name: &str, seed: u64, shapes: &[(usize, usize, usize)], tol: f64) {
    let c = CpuBackend::new();
    let mut rng = Rng::new(seed);
    for &(m, n, k) in shapes {
        for t in [WType::F32, WType::Bf16, WType::Fp8] {
            let tag = t.name();
            let w = host_linear(&mut rng, n, k, t);
            let x = randn(&mut rng, m * k, 1.0);
            let (got, want) = linear_both(g, &c, &w, m, k, &x);
            check(&format!("{name} {tag} {m}x{n}x{k}"), &got, &want, tol);
        }
    }
}
