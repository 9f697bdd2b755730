//! W_UK transposed, for MLA's absorbed query projection on the matrix units.
//!
//! kv_b is `[heads·(nope + v), kv_lora]`: head h's rows are its `nope` key rows W_UK(h) then its
//! `v` value rows W_UV(h). The absorbed attention projects each query into the latent space,
//! q_lat[h] = q_nope[h] · W_UK(h), a contraction over W_UK's rows. A GEMM that reads its weight
//! as `[N, K]` rows (every tile kernel here) needs W_UK(h)ᵀ: `[kv_lora, nope]` per head, stacked
//! as a `[heads·kv_lora, nope]` weight. The value projection reads W_UV(h) as it is.
use super::{HostLinear, LinearData, MmapSlice};

/// W_UK(h)ᵀ of every head of `kv_b`, in kv_b's format: element (h·kv_lora + l, d) is
/// kv_b[h·(nope + v) + d][l]. FP8 keeps its bytes where each head's rows start a scale block
/// and the latent width is whole blocks (DeepSeek's checkpoints: 128 × 128 blocks, 256 rows a
/// head, 512 latents); the transposed blocks are then `block_k × block_n`. Other FP8 layouts
/// are dequantised to f32 (exact).
pub fn wuk_transposed(kv_b: &HostLinear, heads: usize, nope: usize, v_head: usize) -> HostLinear {
    let (per_head, lora) = (nope + v_head, kv_b.inp);
    assert_eq!(kv_b.out, heads * per_head, "{}: {} rows are not {heads} heads of {nope} + {v_head}", kv_b.name, kv_b.out);
    let name = format!("{} (W_UK transposed)", kv_b.name);
    let (out, inp) = (heads * lora, nope);
    let data = match &kv_b.data {
        LinearData::F32(b) => LinearData::F32(permute(b, 4, heads, nope, per_head, lora)),
        LinearData::BF16(b) => LinearData::BF16(permute(b, 2, heads, nope, per_head, lora)),
        LinearData::F16(b) => LinearData::F16(permute(b, 2, heads, nope, per_head, lora)),
        LinearData::Fp8 { w, scale_inv, block_n, block_k } if lora.is_multiple_of(*block_k) && per_head.is_multiple_of(*block_n) => {
            let (bn, bk) = (*block_n, *block_k);
            let (kb, dblocks) = (lora.div_ceil(bk), nope.div_ceil(bn));
            let mut scales = Vec::with_capacity(out / bk * dblocks);
            for h in 0..heads {
                for lb in 0..kb {
                    for db in 0..dblocks {
                        scales.push(scale_inv[(h * per_head / bn + db) * kb + lb]);
                    }
                }
            }
            LinearData::Fp8 { w: permute(w, 1, heads, nope, per_head, lora), scale_inv: scales, block_n: bk, block_k: bn }
        }
        LinearData::Fp8 { .. } => {
            let full = kv_b.to_f32();
            let mut t = vec![0f32; out * inp];
            for h in 0..heads {
                for d in 0..nope {
                    let row = &full[(h * per_head + d) * lora..][..lora];
                    for (l, x) in row.iter().enumerate() {
                        t[(h * lora + l) * nope + d] = *x;
                    }
                }
            }
            return HostLinear::from_f32(&name, out, inp, &t);
        }
    };
    HostLinear { name, out, inp, data }
}

/// The W_UK part of `src` (elements of `es` bytes) transposed per head.
fn permute(src: &[u8], es: usize, heads: usize, nope: usize, per_head: usize, lora: usize) -> MmapSlice {
    let mut dst = vec![0u8; heads * lora * nope * es];
    for h in 0..heads {
        for d in 0..nope {
            let row = &src[(h * per_head + d) * lora * es..][..lora * es];
            for (l, e) in row.chunks_exact(es).enumerate() {
                let at = ((h * lora + l) * nope + d) * es;
                dst[at..at + es].copy_from_slice(e);
            }
        }
    }
    MmapSlice::from_vec(dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every element of the transposed weight against the dequantised original.
    fn check(kv_b: &HostLinear, heads: usize, nope: usize, v: usize) -> HostLinear {
        let t = wuk_transposed(kv_b, heads, nope, v);
        let (full, tf, lora) = (kv_b.to_f32(), t.to_f32(), kv_b.inp);
        assert_eq!((t.out, t.inp), (heads * lora, nope));
        for h in 0..heads {
            for d in 0..nope {
                for l in 0..lora {
                    let (a, b) = (full[(h * (nope + v) + d) * lora + l], tf[(h * lora + l) * nope + d]);
                    assert_eq!(a.to_bits(), b.to_bits(), "head {h} row {d} latent {l}");
                }
            }
        }
        t
    }

    #[test]
    fn fp8_with_whole_blocks_keeps_its_bytes_and_moves_its_scales() {
        // DeepSeek's layout scaled down: 2 heads of 8 + 8 rows, 16 latents, 8 × 4 blocks
        let t = check(&HostLinear::random_fp8(2 * 16, 16, 8, 4, 1), 2, 8, 8);
        match t.data {
            LinearData::Fp8 { block_n, block_k, ref scale_inv, .. } => {
                assert_eq!((block_n, block_k), (4, 8));
                assert_eq!(scale_inv.len(), 2 * 16 / 4);
            }
            _ => panic!("aligned FP8 should stay FP8"),
        }
        // nope spanning two row blocks, v of one
        check(&HostLinear::random_fp8(3 * 24, 32, 8, 16, 2), 3, 16, 8);
    }

    #[test]
    fn fp8_with_blocks_across_heads_is_dequantised() {
        // 20 rows a head with 8-row blocks: head 1 starts inside a block
        let t = check(&HostLinear::random_fp8(2 * 20, 12, 8, 8, 3), 2, 12, 8);
        assert!(matches!(t.data, LinearData::F32(_)));
    }

    #[test]
    fn f32_and_bf16_are_transposed_exactly() {
        let (heads, nope, v, lora) = (3, 5, 4, 7);
        let vals: Vec<f32> = (0..heads * (nope + v) * lora).map(|i| (i as f32 * 0.37).sin()).collect();
        check(&HostLinear::from_f32("kv_b", heads * (nope + v), lora, &vals), heads, nope, v);
        let bytes = vals.iter().flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes()).collect();
        let b = HostLinear { name: "kv_b".into(), out: heads * (nope + v), inp: lora, data: LinearData::BF16(MmapSlice::from_vec(bytes)) };
        check(&b, heads, nope, v);
    }
}
