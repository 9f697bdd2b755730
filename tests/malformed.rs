//! Malformed checkpoints and inputs: each is an error naming the file, tensor or field (exit 1),
//! never a panic (exit 101).
mod common;

use common::*;
use std::path::Path;

fn generate_err(dir: &Path, extra: &[&str]) -> String {
    let mut args = vec!["generate", "--model-path", dir.to_str().unwrap()];
    if !extra.contains(&"--max-new-tokens") {
        args.extend(["--max-new-tokens", "2"]);
    }
    if !extra.iter().any(|a| *a == "--input-ids" || *a == "--prompt") {
        args.extend(["--input-ids", "0,5,7"]);
    }
    args.extend(extra);
    let o = run(&args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "expected a clean error, got {:?}: {err}", o.status);
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn fresh_copy(tag: &str) -> TempDir {
    let t = TempDir::new(tag);
    copy_dir(&golden_dir("tiny_v3"), t.path());
    t
}

fn edit_index(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("model.safetensors.index.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(p, v.to_string()).unwrap();
}

fn shard_of(dir: &Path, tensor: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap()).unwrap();
    v["weight_map"][tensor].as_str().unwrap().to_string()
}

/// Rewrites one shard with `f` applied to its tensors (name, dtype, shape, bytes).
fn rewrite_shard(dir: &Path, shard: &str, f: impl FnOnce(&mut Vec<(String, engine::weights::DType, Vec<usize>, Vec<u8>)>)) {
    let p = dir.join(shard);
    let st = engine::weights::SafetensorsFile::open(&p).unwrap();
    let mut entries: Vec<_> = st.tensors.iter().map(|(n, i)| (n.clone(), i.dtype, i.shape.clone(), st.bytes(i).to_vec())).collect();
    drop(st);
    f(&mut entries);
    engine::weights::write_safetensors(&p, &entries).unwrap();
}

const T: &str = "model.layers.1.self_attn.kv_b_proj.weight";

#[test]
fn missing_tensor_names_it() {
    let t = fresh_copy("missing");
    let shard = shard_of(t.path(), T);
    rewrite_shard(t.path(), &shard, |e| e.retain(|x| x.0 != T));
    edit_index(t.path(), |v| {
        v["weight_map"].as_object_mut().unwrap().remove(T);
    });
    let e = generate_err(t.path(), &[]);
    assert!(e.contains(T) && e.contains("missing"), "{e}");
}

#[test]
fn index_pointing_at_wrong_shard_names_both() {
    let t = fresh_copy("wrongshard");
    let shard = shard_of(t.path(), T);
    let other = if shard.contains("00001") { "model-00002-of-00003.safetensors" } else { "model-00001-of-00003.safetensors" };
    edit_index(t.path(), |v| v["weight_map"][T] = other.into());
    let e = generate_err(t.path(), &[]);
    assert!(e.contains(T) && e.contains(other), "{e}");
}

#[test]
fn wrong_shape_and_dtype_name_the_tensor() {
    let t = fresh_copy("shape");
    let shard = shard_of(t.path(), T);
    rewrite_shard(t.path(), &shard, |e| {
        let x = e.iter_mut().find(|x| x.0 == T).unwrap();
        x.2 = vec![x.2[1], x.2[0]];
    });
    let e = generate_err(t.path(), &[]);
    assert!(e.contains(T) && e.contains("shape") && e.contains(&shard), "{e}");

    let t = fresh_copy("dtype");
    let norm = "model.norm.weight";
    let shard = shard_of(t.path(), norm);
    rewrite_shard(t.path(), &shard, |e| {
        let x = e.iter_mut().find(|x| x.0 == norm).unwrap();
        x.1 = engine::weights::DType::F8E4M3;
        x.3.truncate(x.3.len() / 2);
    });
    let e = generate_err(t.path(), &[]);
    assert!(e.contains(norm) && e.contains("dtype F8_E4M3"), "{e}");
}

#[test]
fn truncated_and_corrupt_files_are_errors() {
    let t = fresh_copy("trunc");
    let shard = shard_of(t.path(), T);
    let p = t.path().join(&shard);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let e = generate_err(t.path(), &[]);
    assert!(e.contains(&shard) && e.contains("truncated"), "{e}");

    let mut c = bytes.clone();
    for b in &mut c[8..40] {
        *b = b'#';
    }
    std::fs::write(&p, &c).unwrap();
    let e = generate_err(t.path(), &[]);
    assert!(e.contains(&shard) && e.contains("corrupt header"), "{e}");

    std::fs::write(&p, b"").unwrap();
    let e = generate_err(t.path(), &[]);
    assert!(e.contains(&shard), "{e}");
}

#[test]
fn bad_config_names_the_field() {
    let t = fresh_copy("cfg");
    let p = t.path().join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["scoring_func"] = "relu".into();
    std::fs::write(&p, v.to_string()).unwrap();
    let e = generate_err(t.path(), &[]);
    assert!(e.contains("scoring_func") && e.contains("relu") && e.contains("config.json"), "{e}");
    std::fs::write(&p, "{not json").unwrap();
    let e = generate_err(t.path(), &[]);
    assert!(e.contains("config.json") && e.contains("JSON"), "{e}");
}

#[test]
fn bad_inputs_are_errors() {
    let d = golden_dir("tiny_v3");
    let e = generate_err(&d, &["--input-ids", "0,99999"]);
    assert!(e.contains("99999") && e.contains("vocabulary"), "{e}");
    let e = generate_err(&d, &["--temperature", "-1"]);
    assert!(e.contains("temperature"), "{e}");
    let e = generate_err(&d, &["--top-p", "0"]);
    assert!(e.contains("top_p"), "{e}");
    let e = generate_err(&d, &["--max-new-tokens", "5000"]);
    assert!(e.contains("context length"), "{e}");
    let e = generate_err(&d, &["--return-logprob", "--logprob-start-len", "3"]);
    assert!(e.contains("logprob_start_len"), "{e}");
    let missing = d.join("no-such-dir");
    let e = generate_err(&missing, &[]);
    assert!(e.contains("no-such-dir"), "{e}");
}
