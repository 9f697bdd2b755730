//! One forward step as the backend runs it: the step's index arrays (`StepInputs`) and, for
//! decode steps, the padding to a captured graph's batch size. Padded rows decode `pad_id` at
//! position 0 into the KV cache's scratch slot (one slot past those the cache manager hands out),
//! attend only to that slot, and their logits are dropped, so they change nothing the real rows see.
use super::{ForwardBatch, Model, ModelError};
use crate::backend::{AttnSeq, Backend, GraphStep, StepInputs};

/// A decode batch padded to `rows` rows.
pub(super) struct Padded {
    pub embed_ids: Vec<u32>,
    pub positions: Vec<u32>,
    pub new_slots: Vec<u32>,
    pub logit_rows: Vec<u32>,
    scratch: [u32; 1],
}

impl Padded {
    pub fn new(embed_ids: &[u32], positions: &[u32], new_slots: &[u32], rows: usize, pad_id: u32, scratch: u32) -> Self {
        let pad = |v: &[u32], x: u32| v.iter().copied().chain(std::iter::repeat(x)).take(rows).collect::<Vec<u32>>();
        Padded {
            embed_ids: pad(embed_ids, pad_id),
            positions: pad(positions, 0),
            new_slots: pad(new_slots, scratch),
            logit_rows: (0..rows as u32).collect(),
            scratch: [scratch],
        }
    }

    /// The batch's sequences followed by one single-token sequence per padded row.
    pub fn seqs<'a>(&'a self, real: &[AttnSeq<'a>]) -> Vec<AttnSeq<'a>> {
        let t = real.len();
        real.iter().cloned().chain((t..self.positions.len()).map(|i| AttnSeq { q_start: i, q_len: 1, slots: &self.scratch })).collect()
    }
}

/// Whether `batch` is a decode step a graph can replay: one new token per sequence, logits for
/// every row in order.
pub(super) fn is_plain_decode(batch: &ForwardBatch) -> bool {
    let t = batch.tokens.len();
    t > 0 && batch.seqs.len() == t && batch.seqs.iter().all(|s| s.q_len == 1) && batch.logit_rows.len() == t && batch.logit_rows.iter().enumerate().all(|(i, &r)| r as usize == i)
}

impl<B: Backend> Model<B> {
    /// The embedding rows of `tokens`: the ids, or under a vocabulary-parallel embedding this
    /// rank's local rows (ids of other ranks' slices map to the zero row).
    fn embed_rows(&self, tokens: &[u32]) -> Vec<u32> {
        match &self.embed_slice {
            None => tokens.to_vec(),
            Some((rows, zero)) => tokens.iter().map(|&t| if rows.contains(&(t as usize)) { t - rows.start as u32 } else { *zero }).collect(),
        }
    }

    pub(super) fn forward_local(&self, kv: &mut B::KvCache, batch: &ForwardBatch, new_slots: Vec<u32>) -> Result<B::Tensor, ModelError> {
        let b = &self.backend;
        let embed_ids = self.embed_rows(batch.tokens);
        let t = batch.tokens.len();
        let scratch = self.kv_scratch.load(std::sync::atomic::Ordering::Relaxed);
        if scratch != u32::MAX && is_plain_decode(batch) {
            if let Some(rows) = b.graph_batch(t) {
                let pad_id = self.embed_slice.as_ref().map_or(0, |(_, zero)| *zero);
                let p = Padded::new(&embed_ids, batch.positions, &new_slots, rows, pad_id, scratch);
                let seqs = p.seqs(batch.seqs);
                let inputs = StepInputs { embed_ids: &p.embed_ids, positions: &p.positions, new_slots: &p.new_slots, seqs: &seqs, logit_rows: &p.logit_rows };
                let graph = GraphStep { keep: t, kv: b.kv_cache_id(kv) };
                return b.run_step(&inputs, Some(graph), &mut |i| self.forward_rows(kv, i));
            }
        }
        let inputs = StepInputs { embed_ids: &embed_ids, positions: batch.positions, new_slots: &new_slots, seqs: batch.seqs, logit_rows: batch.logit_rows };
        b.run_step(&inputs, None, &mut |i| self.forward_rows(kv, i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_adds_scratch_rows_that_attend_only_to_the_scratch_slot() {
        let (s0, s1) = ([4u32, 5, 6], [9u32, 10]);
        let real = [AttnSeq { q_start: 0, q_len: 1, slots: &s0 }, AttnSeq { q_start: 1, q_len: 1, slots: &s1 }];
        let p = Padded::new(&[11, 12], &[2, 1], &[6, 10], 4, 7, 99);
        assert_eq!(p.embed_ids, vec![11, 12, 7, 7]);
        assert_eq!(p.positions, vec![2, 1, 0, 0]);
        assert_eq!(p.new_slots, vec![6, 10, 99, 99]);
        assert_eq!(p.logit_rows, vec![0, 1, 2, 3]);
        let seqs = p.seqs(&real);
        assert_eq!(seqs.len(), 4);
        assert_eq!(seqs[1].slots, &[9, 10]);
        assert_eq!((seqs[3].q_start, seqs[3].q_len, seqs[3].slots), (3, 1, &[99u32][..]));
    }

    #[test]
    fn only_plain_decode_steps_take_graphs() {
        let s = [1u32, 2];
        let seqs = [AttnSeq { q_start: 0, q_len: 1, slots: &s }];
        let ok = ForwardBatch { tokens: &[5], positions: &[1], seqs: &seqs, logit_rows: &[0] };
        assert!(is_plain_decode(&ok));
        let no_logits = ForwardBatch { tokens: &[5], positions: &[1], seqs: &seqs, logit_rows: &[] };
        assert!(!is_plain_decode(&no_logits));
        let prefill_seqs = [AttnSeq { q_start: 0, q_len: 2, slots: &s }];
        let prefill = ForwardBatch { tokens: &[5, 6], positions: &[0, 1], seqs: &prefill_seqs, logit_rows: &[1] };
        assert!(!is_plain_decode(&prefill));
    }
}
