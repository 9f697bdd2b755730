//! Golden tests: the CPU backend against transformers' float32 outputs on tiny random DeepSeek
//! checkpoints in the official layout (tests/golden/generate.py writes them).
//! Rule: max |Δ logprob| ≤ 1e-3 over the whole vocabulary at every position, and identical greedy
//! ids while the reference's top-1/top-2 margin exceeds 1e-2.
use std::path::{Path, PathBuf};

use engine::backend::{cpu::CpuBackend, AttnSeq, Backend};
use engine::model::{ForwardBatch, Model};
use engine::runtime::{generate, GenerateRequest};
use engine::sampling::{log_softmax, SamplingParams};
use engine::weights::SafetensorsFile;

const TOL: f32 = 1e-3;
const MARGIN: f32 = 1e-2;

struct Case {
    prompt: Vec<u32>,
    continuation: Vec<u32>,
    margins: Vec<f32>,
    logprobs: Vec<f32>, // [positions, vocab]
}

fn data_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/data").join(name)
}

fn load_cases(dir: &Path) -> Vec<Case> {
    let exp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let st = SafetensorsFile::open(&dir.join("expected.safetensors")).unwrap();
    let ids = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<_>>();
    exp["cases"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let info = &st.tensors[&format!("p{i}.logprobs")];
            let bytes = st.bytes(info);
            Case {
                prompt: ids(&c["prompt"]),
                continuation: ids(&c["continuation"]),
                margins: c["margins"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect(),
                logprobs: bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
            }
        })
        .collect()
}

/// Runs `seq` through the model in the given chunk sizes (reusing the KV cache between chunks) and
/// returns log-softmax rows for every position.
fn teacher_forced(model: &Model<CpuBackend>, seq: &[u32], chunks: &[usize]) -> Vec<Vec<f32>> {
    let slots: Vec<u32> = (0..seq.len() as u32).rev().collect(); // non-contiguous slot order on purpose
    let mut kv = model.alloc_kv_cache(seq.len()).unwrap();
    let mut out = Vec::new();
    let mut start = 0;
    let mut sizes = chunks.iter().copied().chain(std::iter::repeat(1));
    while start < seq.len() {
        let n = sizes.next().unwrap().min(seq.len() - start);
        let positions: Vec<u32> = (start as u32..(start + n) as u32).collect();
        let seqs = [AttnSeq { q_start: 0, q_len: n, slots: &slots[..start + n] }];
        let rows: Vec<u32> = (0..n as u32).collect();
        let logits = model.forward(&mut kv, &ForwardBatch { tokens: &seq[start..start + n], positions: &positions, seqs: &seqs, logit_rows: &rows }).unwrap();
        let v = model.backend.download(&logits).unwrap();
        let vocab = model.cfg.vocab_size;
        out.extend(v.chunks(vocab).map(log_softmax));
        start += n;
    }
    out
}

fn check_case_logprobs(name: &str, case: &Case, got: &[Vec<f32>], vocab: usize, how: &str) {
    let mut worst = (0f32, 0, 0);
    for (p, row) in got.iter().enumerate() {
        let want = &case.logprobs[p * vocab..(p + 1) * vocab];
        for (t, (a, b)) in row.iter().zip(want).enumerate() {
            assert!(a.is_finite(), "{name} {how}: non-finite logprob at position {p} token {t}");
            let d = (a - b).abs();
            if d > worst.0 {
                worst = (d, p, t);
            }
        }
    }
    assert!(worst.0 <= TOL, "{name} {how} (prompt len {}): max |Δ logprob| {} at position {} token {} exceeds {TOL}", case.prompt.len(), worst.0, worst.1, worst.2);
}

fn run_golden(name: &str) {
    let dir = data_dir(name);
    let model = std::sync::Arc::new(Model::load(CpuBackend::new(), &dir).unwrap());
    let vocab = model.cfg.vocab_size;
    let cases = load_cases(&dir);
    let mut compared_greedy = 0;
    for case in &cases {
        let seq: Vec<u32> = case.prompt.iter().chain(&case.continuation).copied().collect();
        // one prefill over everything (MHA form)
        check_case_logprobs(name, case, &teacher_forced(&model, &seq, &[seq.len()]), vocab, "one-shot prefill");
        // the prompt, a chunk, then token-by-token decode over the cached prefix (absorbed form)
        check_case_logprobs(name, case, &teacher_forced(&model, &seq, &[case.prompt.len(), 5]), vocab, "chunked prefill + decode");

        let req = GenerateRequest {
            input_ids: case.prompt.clone(),
            params: SamplingParams { max_new_tokens: case.continuation.len(), temperature: 0.0, ignore_eos: true, ..Default::default() },
            ..Default::default()
        };
        let out = generate(&model, None, &req).unwrap();
        for (s, (&want, &margin)) in case.continuation.iter().zip(&case.margins).enumerate() {
            if margin <= MARGIN {
                break;
            }
            assert_eq!(out.output_ids[s], want, "{name}: greedy id at step {s} (reference margin {margin}) for prompt len {}", case.prompt.len());
            compared_greedy += 1;
        }
    }
    assert!(compared_greedy >= 20, "{name}: only {compared_greedy} greedy steps had a clear reference margin");
}

#[test]
fn golden_tiny_v3_yarn_mtp() {
    run_golden("tiny_v3");
}

#[test]
fn golden_tiny_v2_lite() {
    run_golden("tiny_v2_lite");
}

#[test]
fn golden_tiny_v3_fp8() {
    run_golden("tiny_v3_fp8");
}

#[test]
fn golden_prompts_cover_long_context() {
    // The set includes a prompt longer than original_max_position_embeddings (YaRN's interpolated range).
    for name in ["tiny_v3", "tiny_v2_lite", "tiny_v3_fp8"] {
        let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(data_dir(name).join("config.json")).unwrap()).unwrap();
        let orig = cfg["rope_scaling"]["original_max_position_embeddings"].as_u64().unwrap() as usize;
        assert!(load_cases(&data_dir(name)).iter().any(|c| c.prompt.len() > orig), "{name}");
    }
}
