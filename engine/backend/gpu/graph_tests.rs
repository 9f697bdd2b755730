//! The decode-graph state machine of `step.rs` (eager run, capture, replay, recapture when the KV
//! cache or the index arena changes, a failed capture turning graphs off) on the host-memory
//! runtime: the same host code both vendors run, without a GPU. Kernels do not execute here, so
//! the steps' "logits" are uploads the test controls; copies (the static logits buffer) do run.
use super::backend::{GpuBackend, GpuTensor};
use super::host_runtime::{host_backend, HostVendor};
use crate::backend::{AttnSeq, BackendError, GraphStep, StepInputs};

const VOCAB: usize = 5;

/// A decode step of `bs` tokens whose contexts have `ctx` slots each; `run` uploads logits
/// row r = [r·10 + step, ...] and counts its calls.
fn step(b: &GpuBackend<HostVendor>, bs: usize, ctx: usize, graph: Option<GraphStep>, value: f32, calls: &mut usize) -> Result<GpuTensor, BackendError> {
    let ids: Vec<u32> = (0..bs as u32).collect();
    let slots: Vec<Vec<u32>> = (0..bs).map(|i| (0..ctx as u32).map(|j| j + (i * ctx) as u32).collect()).collect();
    let seqs: Vec<AttnSeq> = slots.iter().enumerate().map(|(i, s)| AttnSeq { q_start: i, q_len: 1, slots: s }).collect();
    let inputs = StepInputs { embed_ids: &ids, positions: &ids, new_slots: &ids, seqs: &seqs, logit_rows: &ids };
    b.run_step_impl(&inputs, graph, &mut |inp: &StepInputs| -> Result<GpuTensor, BackendError> {
        *calls += 1;
        // the step's arrays are on the device already (no per-op uploads)
        assert!(b.step_ptr(inp.positions).is_some() && b.step_attn(inp.seqs).is_some());
        let v: Vec<f32> = (0..bs * VOCAB).map(|i| (i / VOCAB) as f32 * 10.0 + value).collect();
        let buf = if b.capturing() { b.zeros::<f32>(bs * VOCAB)? } else { b.htod(&v)? };
        Ok(GpuTensor { rows: bs, cols: VOCAB, buf })
    })
}

#[test]
fn decode_graphs_capture_replay_and_recapture() {
    let (mut b, _) = host_backend();
    b.set_graph_max_bs(8);
    assert_eq!(b.graphs.sizes, vec![1, 2, 4, 8]);
    assert_eq!((b.graph_batch_size(3), b.graph_batch_size(9)), (Some(4), None));
    let g = |kv| Some(GraphStep { keep: 3, kv });
    let mut calls = 0;
    // first step of size 4: an eager run, then the same host code captured
    let out = step(&b, 4, 10, g(1), 1.0, &mut calls).unwrap();
    assert_eq!((calls, out.rows, out.cols), (2, 3, VOCAB));
    assert_eq!(b.graph_stats(), (1, 0, None));
    // the next one replays: the host code does not run, the logits come from the static buffer
    // the capture copied into (on the host runtime the capture's logits were zeros)
    let out = step(&b, 4, 12, g(1), 2.0, &mut calls).unwrap();
    assert_eq!((calls, b.graph_stats().1), (2, 1));
    assert_eq!((out.rows, out.buf.to_host().unwrap()[..3 * VOCAB].to_vec()), (3, vec![0.0; 3 * VOCAB]));
    // another KV cache: the graph holds the old one's address, so it is captured again
    step(&b, 4, 12, g(2), 3.0, &mut calls).unwrap();
    assert_eq!((calls, b.graph_stats().0), (4, 2));
    // a context that outgrows the index arena (65,536 entries at first) also recaptures
    step(&b, 4, 20_000, g(2), 4.0, &mut calls).unwrap();
    assert_eq!((calls, b.graph_stats().0), (6, 3));
    step(&b, 4, 20_000, g(2), 5.0, &mut calls).unwrap();
    assert_eq!((calls, b.graph_stats()), (6, (3, 2, None)));
    // a step without a graph runs eagerly and returns its own logits
    let out = step(&b, 2, 5, None, 6.0, &mut calls).unwrap();
    assert_eq!(calls, 7);
    assert_eq!(out.buf.to_host().unwrap()[VOCAB], 16.0);
}

#[test]
fn an_upload_inside_a_capture_turns_graphs_off_with_the_reason() {
    let (mut b, _) = host_backend();
    b.set_graph_max_bs(4);
    let ids = [0u32];
    let slots = [0u32, 1];
    let seqs = [AttnSeq { q_start: 0, q_len: 1, slots: &slots }];
    let inputs = StepInputs { embed_ids: &ids, positions: &ids, new_slots: &ids, seqs: &seqs, logit_rows: &ids };
    let out = b.run_step_impl(&inputs, Some(GraphStep { keep: 1, kv: 1 }), &mut |_: &StepInputs| -> Result<GpuTensor, BackendError> {
        // an index array that is not one of the step's: uploaded per op, which a graph cannot replay
        let _ = b.idx(&[7, 8, 9])?;
        Ok(GpuTensor { rows: 1, cols: VOCAB, buf: b.zeros::<f32>(VOCAB)? })
    });
    assert_eq!(out.unwrap().rows, 1, "the eager run still answers");
    let (captured, _, failed) = b.graph_stats();
    assert_eq!(captured, 0);
    assert!(failed.is_some(), "the failed capture is recorded");
    assert_eq!(b.graph_batch_size(1), None, "later steps run without graphs");
    assert!(!b.capturing());
}
