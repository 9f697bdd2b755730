//! The `engine` binary as a user runs it: generate --json (SGLang's /generate shape), info, gen-model.
mod common;

use common::*;

fn ids_arg(ids: &[u32]) -> String {
    ids.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")
}

#[test]
fn generate_json_matches_transformers_logprobs() {
    let dir = golden_dir("tiny_v3");
    let exp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let case = &exp["cases"][2];
    let prompt: Vec<u32> = case["prompt"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    let st = engine::weights::SafetensorsFile::open(&dir.join("expected.safetensors")).unwrap();
    let lp: Vec<f32> = st.bytes(&st.tensors["p2.logprobs"]).chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    let vocab = 320;
    let o = run(&["generate", "--model-path", dir.to_str().unwrap(), "--input-ids", &ids_arg(&prompt), "--max-new-tokens", "6", "--ignore-eos", "--json", "--return-logprob", "--logprob-start-len", "0", "--top-logprobs-num", "3"]);
    let v = stdout_json(&o);
    let meta = &v["meta_info"];
    assert_eq!(meta["prompt_tokens"], prompt.len());
    assert_eq!(meta["completion_tokens"], 6);
    assert_eq!(meta["finish_reason"]["type"], "length");
    let inp = meta["input_token_logprobs"].as_array().unwrap();
    assert_eq!(inp.len(), prompt.len());
    assert!(inp[0][0].is_null() && inp[0][1] == prompt[0]);
    for j in 1..prompt.len() {
        let want = lp[(j - 1) * vocab + prompt[j] as usize];
        let got = inp[j][0].as_f64().unwrap() as f32;
        assert!((got - want).abs() <= 1e-3, "input logprob {j}: {got} vs {want}");
        assert_eq!(inp[j][1], prompt[j]);
    }
    let out_ids: Vec<u64> = v["output_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    let outlp = meta["output_token_logprobs"].as_array().unwrap();
    assert_eq!(outlp.len(), 6);
    for (s, e) in outlp.iter().enumerate() {
        assert_eq!(e[1].as_u64().unwrap(), out_ids[s]);
        let want = lp[(prompt.len() - 1 + s) * vocab + out_ids[s] as usize];
        assert!((e[0].as_f64().unwrap() as f32 - want).abs() <= 1e-3);
    }
    // greedy: the top-1 of each output distribution is the token taken
    for (s, top) in meta["output_top_logprobs"].as_array().unwrap().iter().enumerate() {
        assert_eq!(top.as_array().unwrap().len(), 3);
        assert_eq!(top[0][1].as_u64().unwrap(), out_ids[s]);
    }
    assert!(meta["input_top_logprobs"][0].is_null());
    assert_eq!(meta["input_top_logprobs"][1].as_array().unwrap().len(), 3);

    // logprob_start_len K: entries start at token K and the first is null
    let o = run(&["generate", "--model-path", dir.to_str().unwrap(), "--input-ids", &ids_arg(&prompt), "--max-new-tokens", "1", "--json", "--return-logprob", "--logprob-start-len", "5"]);
    let v = stdout_json(&o);
    let inp = v["meta_info"]["input_token_logprobs"].as_array().unwrap();
    assert_eq!(inp.len(), prompt.len() - 5);
    assert!(inp[0][0].is_null() && inp[0][1] == prompt[5]);
    let want = lp[5 * vocab + prompt[6] as usize];
    assert!((inp[1][0].as_f64().unwrap() as f32 - want).abs() <= 1e-3);
}

#[test]
fn generate_text_prompt_chat_and_stops() {
    let dir = golden_dir("tiny_v3");
    let d = dir.to_str().unwrap();
    let v = stdout_json(&run(&["generate", "--model-path", d, "--prompt", "Hello", "--max-new-tokens", "4", "--ignore-eos", "--json"]));
    assert_eq!(v["meta_info"]["prompt_tokens"], 6, "BOS + 5 bytes");
    assert_eq!(v["output_ids"].as_array().unwrap().len(), 4);
    let v = stdout_json(&run(&["generate", "--model-path", d, "--prompt", "Hi", "--chat", "--max-new-tokens", "2", "--json"]));
    assert_eq!(v["meta_info"]["prompt_tokens"], 5, "BOS <User> H i <Assistant>");
    // a stop token id ends generation with finish_reason stop and the matched id
    let full = stdout_json(&run(&["generate", "--model-path", d, "--input-ids", "0,50,60,70", "--max-new-tokens", "8", "--ignore-eos", "--json"]));
    let third = full["output_ids"][2].as_u64().unwrap();
    let v = stdout_json(&run(&["generate", "--model-path", d, "--input-ids", "0,50,60,70", "--max-new-tokens", "8", "--ignore-eos", "--stop-token-ids", &third.to_string(), "--json"]));
    let first_hit = full["output_ids"].as_array().unwrap().iter().position(|x| x.as_u64().unwrap() == third).unwrap();
    assert_eq!(v["output_ids"].as_array().unwrap().len(), first_hit + 1);
    assert_eq!(v["meta_info"]["finish_reason"]["type"], "stop");
    assert_eq!(v["meta_info"]["finish_reason"]["matched"], third);
    // seeded sampling is reproducible
    let a = stdout_json(&run(&["generate", "--model-path", d, "--input-ids", "0,9,9", "--max-new-tokens", "8", "--temperature", "1.0", "--seed", "7", "--json"]));
    let b = stdout_json(&run(&["generate", "--model-path", d, "--input-ids", "0,9,9", "--max-new-tokens", "8", "--temperature", "1.0", "--seed", "7", "--json"]));
    assert_eq!(a["output_ids"], b["output_ids"]);
}

#[test]
fn gen_model_presets_load_and_run() {
    for preset in ["tiny-v3", "tiny-v2-lite", "tiny-v3-fp8"] {
        let t = TempDir::new(preset);
        let out = t.path().join("ckpt");
        let o = run(&["gen-model", "--preset", preset, "--out", out.to_str().unwrap(), "--layers", "3", "--seed", "5"]);
        assert!(o.status.success(), "{preset}: {}", String::from_utf8_lossy(&o.stderr));
        assert!(out.join("model.safetensors.index.json").exists());
        let v = stdout_json(&run(&["generate", "--model-path", out.to_str().unwrap(), "--prompt", "abc", "--max-new-tokens", "3", "--ignore-eos", "--json"]));
        assert_eq!(v["output_ids"].as_array().unwrap().len(), 3);
        let info = run(&["info", "--model-path", out.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&info.stdout);
        assert!(info.status.success() && text.contains("kv cache per token") && text.contains("parameters:"), "{text}");
        if preset == "tiny-v3-fp8" {
            assert!(text.contains("weight bytes F8_E4M3"), "{text}");
        }
    }
}

/// `gen-model --tp-rank-shapes N` writes one rank's share of each layer (a model that runs on its
/// own); a size that does not divide the heads is refused by name. The graph flags are accepted
/// everywhere and change nothing on the CPU.
#[test]
fn tp_rank_shapes_and_graph_flags() {
    let t = TempDir::new("tp-rank");
    let out = t.path().join("ckpt");
    let o = run(&["gen-model", "--preset", "tiny-v3", "--out", out.to_str().unwrap(), "--tp-rank-shapes", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!((cfg["num_attention_heads"].as_u64(), cfg["intermediate_size"].as_u64(), cfg["moe_intermediate_size"].as_u64(), cfg["vocab_size"].as_u64()), (Some(2), Some(64), Some(16), Some(160)));
    let p = out.to_str().unwrap();
    let base = stdout_json(&run(&["generate", "--model-path", p, "--input-ids", "0,5,6", "--max-new-tokens", "3", "--ignore-eos", "--json"]));
    assert_eq!(base["output_ids"].as_array().unwrap().len(), 3);
    for flags in [&["--cuda-graph-max-bs", "4"][..], &["--disable-cuda-graph"][..]] {
        let mut args = vec!["generate", "--model-path", p, "--input-ids", "0,5,6", "--max-new-tokens", "3", "--ignore-eos", "--json"];
        args.extend_from_slice(flags);
        assert_eq!(stdout_json(&run(&args))["output_ids"], base["output_ids"], "{flags:?}");
    }
    let bad = run(&["gen-model", "--preset", "tiny-v3", "--out", t.path().join("bad").to_str().unwrap(), "--tp-rank-shapes", "3"]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("num_attention_heads = 4 is not divisible by 3"), "{err}");
}

/// `--load-format dummy` makes, from config.json alone, exactly the weights `gen-model` writes
/// (seed 0): same tokens and logprobs; and it shards like a checkpoint (TP 2 / EP 2 agree).
#[test]
fn dummy_load_format_matches_the_generated_checkpoint() {
    for preset in ["tiny-v3-fp8", "tiny-v2-lite"] {
        let t = TempDir::new("dummy");
        let full = t.path().join("ckpt");
        let bare = t.path().join("config-only");
        assert!(run(&["gen-model", "--preset", preset, "--out", full.to_str().unwrap(), "--seed", "0"]).status.success());
        std::fs::create_dir_all(&bare).unwrap();
        std::fs::copy(full.join("config.json"), bare.join("config.json")).unwrap();
        let gen = |dir: &std::path::Path, extra: &[&str]| {
            let mut args = vec!["generate", "--backend", "cpu", "--model-path", dir.to_str().unwrap(), "--input-ids", "3,1,4,1,5,9,2,6", "--max-new-tokens", "8", "--ignore-eos", "--json", "--return-logprob"];
            args.extend_from_slice(extra);
            stdout_json(&run(&args))["meta_info"]["output_token_logprobs"].clone()
        };
        let files = gen(&full, &[]);
        assert_eq!(gen(&bare, &["--load-format", "dummy"]), files, "{preset}: dummy weights differ from the written checkpoint");
        let lp = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|e| (e[1].as_u64().unwrap(), e[0].as_f64().unwrap())).collect::<Vec<_>>();
        for extra in [&["--load-format", "dummy", "--tp", "2"][..], &["--load-format", "dummy", "--tp", "2", "--ep", "2"]] {
            let (a, b) = (lp(&files), lp(&gen(&bare, extra)));
            assert_eq!(a.iter().map(|x| x.0).collect::<Vec<_>>(), b.iter().map(|x| x.0).collect::<Vec<_>>(), "{preset} {extra:?}");
            assert!(a.iter().zip(&b).all(|(x, y)| (x.1 - y.1).abs() < 1e-4), "{preset} {extra:?}: {a:?} vs {b:?}");
        }
        // without the flag, a folder with no weights is an error naming what is missing
        let o = run(&["generate", "--backend", "cpu", "--model-path", bare.to_str().unwrap(), "--input-ids", "1"]);
        assert_eq!(o.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&o.stderr).contains("no model.safetensors.index.json and no *.safetensors files"), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

#[test]
fn gpu_backends_answer_not_available() {
    for b in ["cuda", "rocm"] {
        let o = run(&["generate", "--backend", b, "--input-ids", "0,1", "--max-new-tokens", "1"]);
        assert_eq!(o.status.code(), Some(1));
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(&format!("backend `{b}` is not available in this build/machine")), "{e}");
    }
}
