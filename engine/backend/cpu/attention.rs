//! MLA attention over the latent KV cache, in the two forms of DEEPSEEK.md:
//! - absorbed (MQA) form: the query mapped into latent space (W_UK), scores against the cached
//!   [c_kv | k_pe], the latent output mapped back (W_UV); the cache is read once and never expanded;
//! - MHA form: K/V decompressed from the latents through kv_b_proj.
//!
//! The CPU backend runs the absorbed form for prefill and decode alike: each query's arithmetic is
//! then the same whatever the batch, the chunking or the prefix-cache hit, so results are bitwise
//! independent of scheduling. The MHA form is kept as the cross-check (the GPU backends use it for
//! prefill).
use rayon::prelude::*;

use super::kv::CpuKvCache;
use super::linear::linear;
use super::tensor::{dot, CpuTensor};
use crate::backend::{AttnSeq, MlaDims};
use crate::weights::HostLinear;

fn softmax_in_place(s: &mut [f32]) {
    let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for x in s.iter_mut() {
        *x = (*x - m).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    s.iter_mut().for_each(|x| *x *= inv);
}

pub fn mla_attention(q: &CpuTensor, kv: &CpuKvCache, layer: usize, seqs: &[AttnSeq], kv_b: &HostLinear, d: &MlaDims) -> CpuTensor {
    assert_eq!(q.cols, d.num_heads * d.qk_head(), "mla_attention: query width");
    let mut out = CpuTensor::zeros(q.rows, d.num_heads * d.v_head);
    for s in seqs {
        assert!(s.q_len <= s.slots.len(), "mla_attention: more queries than context");
        let block = absorbed(q, kv, layer, s, kv_b, d);
        let w = d.num_heads * d.v_head;
        out.data[s.q_start * w..(s.q_start + s.q_len) * w].copy_from_slice(&block);
    }
    out
}

/// MHA form; returns [q_len, heads·v].
#[cfg_attr(not(test), allow(dead_code))]
pub fn prefill_mha(q: &CpuTensor, kv: &CpuKvCache, layer: usize, s: &AttnSeq, kv_b: &HostLinear, d: &MlaDims) -> Vec<f32> {
    let ctx = s.slots.len();
    let lora = d.kv_lora_rank;
    let mut latent = CpuTensor::zeros(ctx, lora);
    for (j, &slot) in s.slots.iter().enumerate() {
        latent.data[j * lora..(j + 1) * lora].copy_from_slice(&kv.entry(layer, slot)[..lora]);
    }
    let kvd = linear(&latent, kv_b); // [ctx, heads·(nope+v)]
    let per_head = d.qk_nope + d.v_head;
    let heads: Vec<Vec<f32>> = (0..d.num_heads)
        .into_par_iter()
        .map(|h| {
            let mut o = vec![0f32; s.q_len * d.v_head];
            let mut scores = vec![0f32; ctx];
            for i in 0..s.q_len {
                let qrow = q.row(s.q_start + i);
                let qh = &qrow[h * d.qk_head()..(h + 1) * d.qk_head()];
                let limit = ctx - s.q_len + i + 1;
                for (j, sc) in scores[..limit].iter_mut().enumerate() {
                    let k_nope = &kvd.row(j)[h * per_head..h * per_head + d.qk_nope];
                    let k_pe = &kv.entry(layer, s.slots[j])[lora..];
                    *sc = (dot(&qh[..d.qk_nope], k_nope) + dot(&qh[d.qk_nope..], k_pe)) * d.scale;
                }
                softmax_in_place(&mut scores[..limit]);
                let oi = &mut o[i * d.v_head..(i + 1) * d.v_head];
                for (j, &p) in scores[..limit].iter().enumerate() {
                    let v = &kvd.row(j)[h * per_head + d.qk_nope..(h + 1) * per_head];
                    oi.iter_mut().zip(v).for_each(|(a, b)| *a += p * b);
                }
            }
            o
        })
        .collect();
    interleave_heads(&heads, s.q_len, d.v_head)
}

/// Absorbed form; returns [q_len, heads·v].
pub fn absorbed(q: &CpuTensor, kv: &CpuKvCache, layer: usize, s: &AttnSeq, kv_b: &HostLinear, d: &MlaDims) -> Vec<f32> {
    let ctx = s.slots.len();
    let lora = d.kv_lora_rank;
    let per_head = d.qk_nope + d.v_head;
    let heads: Vec<Vec<f32>> = (0..d.num_heads)
        .into_par_iter()
        .map(|h| {
            // W_UK(h) [nope, lora] and W_UV(h) [v, lora], dequantised once for all queries.
            let mut w_uk = vec![0f32; d.qk_nope * lora];
            let mut w_uv = vec![0f32; d.v_head * lora];
            for (r, row) in w_uk.chunks_mut(lora).enumerate() {
                kv_b.row_f32(h * per_head + r, row);
            }
            for (r, row) in w_uv.chunks_mut(lora).enumerate() {
                kv_b.row_f32(h * per_head + d.qk_nope + r, row);
            }
            let mut o = vec![0f32; s.q_len * d.v_head];
            let mut q_lat = vec![0f32; lora];
            let mut lat = vec![0f32; lora];
            let mut scores = vec![0f32; ctx];
            for i in 0..s.q_len {
                let qh = &q.row(s.q_start + i)[h * d.qk_head()..(h + 1) * d.qk_head()];
                q_lat.iter_mut().for_each(|x| *x = 0.0);
                for (dd, &qv) in qh[..d.qk_nope].iter().enumerate() {
                    q_lat.iter_mut().zip(&w_uk[dd * lora..(dd + 1) * lora]).for_each(|(a, b)| *a += qv * b);
                }
                let limit = ctx - s.q_len + i + 1;
                for (j, &slot) in s.slots[..limit].iter().enumerate() {
                    let e = kv.entry(layer, slot);
                    scores[j] = (dot(&q_lat, &e[..lora]) + dot(&qh[d.qk_nope..], &e[lora..])) * d.scale;
                }
                softmax_in_place(&mut scores[..limit]);
                lat.iter_mut().for_each(|x| *x = 0.0);
                for (j, &slot) in s.slots[..limit].iter().enumerate() {
                    let p = scores[j];
                    lat.iter_mut().zip(&kv.entry(layer, slot)[..lora]).for_each(|(a, b)| *a += p * b);
                }
                for (e, oe) in o[i * d.v_head..(i + 1) * d.v_head].iter_mut().enumerate() {
                    *oe = dot(&w_uv[e * lora..(e + 1) * lora], &lat);
                }
            }
            o
        })
        .collect();
    interleave_heads(&heads, s.q_len, d.v_head)
}

/// Per-head blocks [q_len, v] → rows of [heads·v].
fn interleave_heads(heads: &[Vec<f32>], q_len: usize, v: usize) -> Vec<f32> {
    let n = heads.len();
    let mut out = vec![0f32; q_len * n * v];
    for (h, o) in heads.iter().enumerate() {
        for i in 0..q_len {
            out[i * n * v + h * v..i * n * v + (h + 1) * v].copy_from_slice(&o[i * v..(i + 1) * v]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The absorbed form equals the MHA form for every query of a sequence.
    #[test]
    fn absorbed_equals_mha() {
        let d = MlaDims { num_heads: 3, qk_nope: 8, qk_rope: 4, v_head: 6, kv_lora_rank: 10, scale: 0.3 };
        let mut rng = crate::sampling::Rng::new(7);
        let ctx = 9;
        let mut kv = CpuKvCache::new(2, 16, d.kv_entry());
        let slots: Vec<u32> = (0..ctx as u32).map(|i| 15 - i).collect();
        for &s in &slots {
            let e: Vec<f32> = (0..d.kv_entry()).map(|_| rng.normal()).collect();
            kv.entry_mut(1, s).copy_from_slice(&e);
        }
        let wb: Vec<f32> = (0..d.num_heads * (d.qk_nope + d.v_head) * d.kv_lora_rank).map(|_| rng.normal() * 0.3).collect();
        let kv_b = HostLinear::from_f32("kv_b", d.num_heads * (d.qk_nope + d.v_head), d.kv_lora_rank, &wb);
        let q = CpuTensor::new(ctx, d.num_heads * d.qk_head(), (0..ctx * d.num_heads * d.qk_head()).map(|_| rng.normal()).collect());
        let full = prefill_mha(&q, &kv, 1, &AttnSeq { q_start: 0, q_len: ctx, slots: &slots }, &kv_b, &d);
        let abs = absorbed(&q, &kv, 1, &AttnSeq { q_start: 0, q_len: ctx, slots: &slots }, &kv_b, &d);
        let last = absorbed(&q, &kv, 1, &AttnSeq { q_start: ctx - 1, q_len: 1, slots: &slots }, &kv_b, &d);
        let w = d.num_heads * d.v_head;
        for (a, b) in full.iter().zip(&abs) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        // one query alone gives bitwise the same result as inside the whole sequence
        assert_eq!(&abs[(ctx - 1) * w..], &last[..]);
    }
}
