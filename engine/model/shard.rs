//! Which part of the model a rank holds under tensor / expert parallelism: attention heads,
//! MLP and expert intermediate columns, whole experts (EP), and a slice of the vocabulary.
use std::ops::Range;

use super::ModelError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub size: usize,
    /// Routed experts split by expert (`--ep-size` = `--tp`) instead of by intermediate size.
    pub expert_parallel: bool,
    /// Attention data-parallel: every rank holds all heads and serves its own requests.
    pub dp_attention: bool,
}

impl Shard {
    pub fn single() -> Self {
        Shard { rank: 0, size: 1, expert_parallel: false, dp_attention: false }
    }

    /// This rank's equal part of `n` items; `what` names the config field when `n` does not divide.
    pub fn part(&self, n: usize, what: &str) -> Result<Range<usize>, ModelError> {
        if !n.is_multiple_of(self.size) {
            return Err(ModelError::Parallel(format!("{what} = {n} is not divisible by the tensor-parallel size {}", self.size)));
        }
        let k = n / self.size;
        Ok(self.rank * k..(self.rank + 1) * k)
    }

    /// The attention heads this rank holds.
    pub fn heads(&self, n: usize) -> Result<Range<usize>, ModelError> {
        if self.dp_attention {
            Ok(0..n)
        } else {
            self.part(n, "num_attention_heads")
        }
    }

    /// This rank's slice of `n` rows split in ceil(n / size) pieces (the last may be short): the
    /// range it holds and the padded length every rank uses.
    pub fn padded_part(&self, n: usize) -> (Range<usize>, usize) {
        let k = n.div_ceil(self.size);
        let start = (self.rank * k).min(n);
        (start..((self.rank + 1) * k).min(n), k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DeepSeek-V3 at TP 8 and 16: every FP8 weight slice
    /// the loader cuts (heads of q_b / kv_b rows and o_proj columns, intermediate rows/columns of
    /// the dense MLP, shared and routed experts) starts on a 128-block boundary, so no rank falls
    /// back to dequantised f32. (At TP 32 the expert slices are 64 columns, half a block: the
    /// 4x8 A100 preset serves the BF16 checkpoint, where this does not arise.)
    #[test]
    fn v3_slices_stay_fp8_block_aligned_at_tp8() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/models/deepseek-v3/config.json");
        let c = crate::config::ModelConfig::from_file(&dir).unwrap();
        let q = c.quantization.as_ref().unwrap();
        for size in [8, 16] {
            for rank in 0..size {
                let s = Shard { rank, size, expert_parallel: false, dp_attention: false };
                let h = s.heads(c.num_attention_heads).unwrap();
                for (what, per, block) in [("q_b rows", c.qk_head_dim(), q.block_n), ("kv_b rows", c.qk_nope_head_dim + c.v_head_dim, q.block_n), ("o_proj cols", c.v_head_dim, q.block_k)] {
                    assert_eq!(h.start * per % block, 0, "tp {size} rank {rank}: {what}");
                }
                for (what, inter) in [("dense", c.intermediate_size), ("expert", c.moe_intermediate_size), ("shared", c.moe_intermediate_size * c.n_shared_experts)] {
                    let r = s.part(inter, what).unwrap();
                    assert_eq!(r.start % q.block_n, 0, "tp {size} rank {rank}: {what} rows");
                    assert_eq!(r.start % q.block_k, 0, "tp {size} rank {rank}: {what} down_proj columns");
                }
            }
        }
    }

    #[test]
    fn parts_cover_everything_once() {
        for size in 1..=8 {
            let mut seen = vec![0; 129];
            for rank in 0..size {
                let s = Shard { rank, size, expert_parallel: false, dp_attention: false };
                let (r, k) = s.padded_part(129);
                assert!(r.len() <= k && k == 129usize.div_ceil(size));
                r.for_each(|i| seen[i] += 1);
            }
            assert!(seen.iter().all(|&c| c == 1));
        }
        let s = Shard { rank: 2, size: 4, expert_parallel: false, dp_attention: false };
        assert_eq!(s.part(16, "num_attention_heads").unwrap(), 8..12);
        let e = s.part(10, "num_attention_heads").unwrap_err().to_string();
        assert!(e.contains("num_attention_heads = 10") && e.contains("tensor-parallel size 4"), "{e}");
    }
}
