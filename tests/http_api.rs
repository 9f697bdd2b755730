//! The HTTP API with a real client against `engine serve` on the golden tiny DeepSeek-V3.
mod common;

use common::server::*;
use common::*;
use serde_json::{json, Value};

fn golden() -> String {
    golden_dir("tiny_v3").to_str().unwrap().to_string()
}

fn golden_case(i: usize) -> (Vec<u32>, Vec<f32>) {
    let dir = golden_dir("tiny_v3");
    let exp: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let prompt = exp["cases"][i]["prompt"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    let st = engine::weights::SafetensorsFile::open(&dir.join("expected.safetensors")).unwrap();
    let lp = st.bytes(&st.tensors[&format!("p{i}.logprobs")]).chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    (prompt, lp)
}

#[tokio::test(flavor = "multi_thread")]
async fn generate_matches_transformers_and_the_cli() {
    let s = Server::start(&["--model-path", &golden(), "--chunked-prefill-size", "16"]);
    let (prompt, lp) = golden_case(3); // 300 tokens: prefilled in chunks of 16
    let body = json!({"input_ids": prompt, "sampling_params": {"max_new_tokens": 5, "temperature": 0, "ignore_eos": true},
                      "return_logprob": true, "logprob_start_len": 0, "top_logprobs_num": 2});
    let r = post(&s.addr, "/generate", &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let inp = v["meta_info"]["input_token_logprobs"].as_array().unwrap();
    assert_eq!(inp.len(), prompt.len());
    assert!(inp[0][0].is_null());
    let mut worst = 0f32;
    for j in 1..prompt.len() {
        let want = lp[(j - 1) * 320 + prompt[j] as usize];
        worst = worst.max((inp[j][0].as_f64().unwrap() as f32 - want).abs());
    }
    assert!(worst <= 1e-3, "max |Δ logprob| {worst}");
    // exactly the object `engine generate --json` prints
    let ids: Vec<String> = prompt.iter().map(|x| x.to_string()).collect();
    let cli = stdout_json(&run(&["generate", "--model-path", &golden(), "--input-ids", &ids.join(","), "--max-new-tokens", "5", "--ignore-eos", "--json", "--return-logprob", "--logprob-start-len", "0", "--top-logprobs-num", "2"]));
    assert_eq!(v["output_ids"], cli["output_ids"]);
    assert_eq!(v["meta_info"]["finish_reason"], cli["meta_info"]["finish_reason"]);
    assert_eq!(v.as_object().unwrap().keys().collect::<Vec<_>>(), cli.as_object().unwrap().keys().collect::<Vec<_>>());
    assert_eq!(v["meta_info"].as_object().unwrap().keys().collect::<Vec<_>>(), cli["meta_info"].as_object().unwrap().keys().collect::<Vec<_>>());
    for (a, b) in v["meta_info"]["output_token_logprobs"].as_array().unwrap().iter().zip(cli["meta_info"]["output_token_logprobs"].as_array().unwrap()) {
        assert_eq!(a[1], b[1]);
        assert!((a[0].as_f64().unwrap() - b[0].as_f64().unwrap()).abs() < 1e-4);
    }
    // batch of two prompts and text input, with one sampling_params per prompt
    let r = post(&s.addr, "/generate", &json!({"text": ["ab", "cd"], "sampling_params": {"max_new_tokens": 2}})).await;
    assert_eq!(r.json().as_array().unwrap().len(), 2);
    let r = post(&s.addr, "/generate", &json!({"input_ids": [[0, 5], [0, 6]], "sampling_params": [{"max_new_tokens": 2, "ignore_eos": true}, {"max_new_tokens": 3, "ignore_eos": true}]})).await.json();
    assert_eq!(r[0]["meta_info"]["completion_tokens"], 2);
    assert_eq!(r[1]["meta_info"]["completion_tokens"], 3);
    let r = post(&s.addr, "/generate", &json!({"input_ids": [[0, 5], [0, 6]], "sampling_params": [{"max_new_tokens": 2}]})).await;
    assert_eq!(r.status, 400);
    // streaming: cumulative objects, then [DONE]
    let (st, ev) = post_sse(&s.addr, "/generate", &json!({"text": "abc", "stream": true, "sampling_params": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": true}})).await;
    assert_eq!(st, 200);
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let last: Value = serde_json::from_str(&ev[ev.len() - 2]).unwrap();
    assert_eq!(last["meta_info"]["completion_tokens"], 4);
    assert_eq!(last["meta_info"]["finish_reason"]["type"], "length");
    assert_kv_whole(&wait_idle(&s.addr).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_endpoints_shapes() {
    let s = Server::start(&["--model-path", &golden(), "--served-model-name", "tiny"]);
    let m = get(&s.addr, "/v1/models").await.json();
    assert_eq!(m["data"][0]["id"], "tiny");
    // completions: text, token ids, list of prompts, n
    let r = post(&s.addr, "/v1/completions", &json!({"model": "tiny", "prompt": ["ab", [0, 5, 6]], "max_tokens": 3, "n": 2, "temperature": 0.8, "seed": 1, "logprobs": 2})).await.json();
    assert_eq!(r["object"], "text_completion");
    assert_eq!(r["choices"].as_array().unwrap().len(), 4);
    assert_eq!(r["usage"]["completion_tokens"], 12);
    assert_eq!(r["choices"][0]["logprobs"]["tokens"].as_array().unwrap().len(), 3);
    assert_eq!(r["choices"][0]["logprobs"]["top_logprobs"][0].as_object().unwrap().len(), 2);
    // max_completion_tokens and stop token ids in chat
    let r = post(&s.addr, "/v1/chat/completions", &json!({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                                          "max_completion_tokens": 4, "temperature": 0, "logprobs": true, "top_logprobs": 2})).await.json();
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    assert_eq!(r["choices"][0]["logprobs"]["content"].as_array().unwrap().len(), r["usage"]["completion_tokens"].as_u64().unwrap() as usize);
    assert!(["stop", "length"].contains(&r["choices"][0]["finish_reason"].as_str().unwrap()));
    // streamed chat text equals the non-streamed text
    let body = json!({"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let whole = post(&s.addr, "/v1/chat/completions", &body).await.json();
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let (_, ev) = post_sse(&s.addr, "/v1/chat/completions", &sb).await;
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = ev[..ev.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"].get(0)?.get("delta")?.get("content")?.as_str().map(str::to_string)).collect();
    assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().unwrap());
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"].as_array().unwrap().len(), 0);
    assert_eq!(usage["usage"]["completion_tokens"], 12);
    assert_eq!(chunks[chunks.len() - 2]["choices"][0]["finish_reason"], "length");
    // stop string: the text ends before it and finish_reason is stop
    let full = post(&s.addr, "/v1/completions", &json!({"prompt": [0, 9, 10], "max_tokens": 20, "temperature": 0, "ignore_eos": true})).await.json();
    let t = full["choices"][0]["text"].as_str().unwrap().to_string();
    let cut = t.char_indices().nth(3).map(|x| x.0);
    if let Some(cut) = cut {
        let stop: String = t[cut..].chars().take(2).collect();
        let r = post(&s.addr, "/v1/completions", &json!({"prompt": [0, 9, 10], "max_tokens": 20, "temperature": 0, "ignore_eos": true, "stop": stop})).await.json();
        let got = r["choices"][0]["text"].as_str().unwrap();
        assert!(t.starts_with(got) && !got.contains(&stop) && got.len() <= cut, "{got:?} vs {t:?} stop {stop:?}");
        assert_eq!(r["choices"][0]["finish_reason"], "stop");
        assert_eq!(r["choices"][0]["matched_stop"], stop);
    }
    assert_kv_whole(&wait_idle(&s.addr).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_4xx_naming_the_problem() {
    let s = Server::start(&["--model-path", &golden(), "--context-length", "512"]);
    let a = &s.addr;
    let cases: Vec<(&str, String, &str)> = vec![
        ("/v1/completions", "{not json".into(), "JSON"),
        ("/v1/completions", "[1,2]".into(), "object"),
        ("/v1/completions", json!({"prompt": 5}).to_string(), "prompt"),
        ("/v1/completions", json!({"prompt": ""}).to_string(), "empty"),
        ("/v1/completions", json!({"prompt": []}).to_string(), "empty"),
        ("/v1/completions", json!({"prompt": "x", "max_tokens": "ten"}).to_string(), "max_tokens"),
        ("/v1/completions", json!({"prompt": "x", "max_tokens": 100000}).to_string(), "context length"),
        ("/v1/completions", json!({"prompt": vec![7; 600]}).to_string(), "context length"),
        ("/v1/completions", json!({"prompt": "x", "temperature": -0.1}).to_string(), "temperature"),
        ("/v1/completions", json!({"prompt": "x", "top_p": 0}).to_string(), "top_p"),
        ("/v1/completions", json!({"prompt": "x", "top_p": 1.5}).to_string(), "top_p"),
        ("/v1/completions", json!({"prompt": "x", "n": 0}).to_string(), "`n`"),
        ("/v1/completions", json!({"prompt": [0, 99999]}).to_string(), "99999"),
        ("/v1/completions", json!({"prompt": [0, -1]}).to_string(), "prompt"),
        ("/v1/chat/completions", json!({"messages": []}).to_string(), "messages"),
        ("/v1/chat/completions", json!({"messages": [{"role": "wizard", "content": "x"}]}).to_string(), "role"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": 3}]}).to_string(), "content"),
        ("/generate", json!({"sampling_params": {}}).to_string(), "input_ids"),
        ("/generate", json!({"text": "x", "sampling_params": {"max_new_token": 3}}).to_string(), "max_new_token"),
        ("/generate", json!({"input_ids": [0, 1], "return_logprob": true, "logprob_start_len": 9}).to_string(), "logprob_start_len"),
    ];
    for (path, body, needle) in cases {
        let r = call("POST", a, path, body.clone(), &[]).await;
        assert!((400..500).contains(&r.status), "{path} {body}: status {}", r.status);
        let v = r.json();
        let msg = v["error"]["message"].as_str().unwrap_or_else(|| panic!("no error message: {v}"));
        assert!(msg.contains(needle) || v["error"]["param"].as_str().is_some_and(|p| p.contains(needle.trim_matches('`'))), "{path} {body}: {msg}");
    }
    // invalid UTF-8 and an oversized body
    let r = call("POST", a, "/v1/completions", vec![b'{', 0xff, 0xfe, b'}'], &[]).await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("UTF-8"));
    let big = format!("{{\"prompt\": \"{}\"}}", "a".repeat(17 << 20));
    let r = call("POST", a, "/v1/completions", big, &[]).await;
    assert_eq!(r.status, 413);
    assert_eq!(call("GET", a, "/nope", "", &[]).await.status, 404);
    assert_eq!(call("GET", a, "/v1/completions", "", &[]).await.status, 405);
    // still serving, nothing leaked
    let r = post(a, "/v1/completions", &json!({"prompt": "ok", "max_tokens": 2})).await;
    assert_eq!(r.status, 200);
    assert_kv_whole(&wait_idle(a).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn min_new_tokens_logit_bias_no_stop_trim_and_constrained_decoding_refused() {
    let s = Server::start(&["--model-path", &golden(), "--context-length", "512"]);
    let a = &s.addr;
    let gen = |sp: Value| async move {
        let r = post(a, "/generate", &json!({"input_ids": [5, 17, 42, 9], "sampling_params": sp})).await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    };
    let ids = |v: &Value| -> Vec<u64> { v["output_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect() };
    let free = gen(json!({"max_new_tokens": 8, "temperature": 0})).await;
    let greedy = ids(&free);
    // the greedy first token as a stop token: the request ends at once ...
    let t0 = greedy[0];
    let stopped = gen(json!({"max_new_tokens": 8, "temperature": 0, "stop_token_ids": [t0]})).await;
    assert_eq!((ids(&stopped), stopped["meta_info"]["finish_reason"]["type"].as_str()), (vec![t0], Some("stop")));
    // ... unless min_new_tokens masks it: 3 tokens without it, then it may end the request
    let v = gen(json!({"max_new_tokens": 8, "temperature": 0, "stop_token_ids": [t0], "min_new_tokens": 3})).await;
    let out = ids(&v);
    assert!(out.len() >= 4 && !out[..3].contains(&t0), "{out:?}");
    assert!(out[3..].iter().position(|&t| t == t0).is_none_or(|i| i + 4 == out.len()), "{out:?}");
    // a +100 bias makes one token the greedy choice everywhere (sampled, and with top-k too)
    let v = gen(json!({"max_new_tokens": 5, "temperature": 0, "logit_bias": {"77": 100}})).await;
    assert_eq!(ids(&v), vec![77; 5]);
    let v = post(a, "/v1/completions", &json!({"prompt": [5, 17, 42, 9], "max_tokens": 3, "temperature": 0.8, "top_k": 4, "logit_bias": {"77": 100}, "logprobs": 1})).await.json();
    assert!(v["choices"][0]["logprobs"]["tokens"].as_array().is_some_and(|t| t.len() == 3), "{v}");
    // a stop string from the greedy text: cut before it, or kept with no_stop_trim
    let text = free["text"].as_str().unwrap();
    let (i, c) = text.char_indices().skip(1).find(|(_, c)| c.is_ascii_graphic()).unwrap_or_else(|| panic!("no ASCII character in {text:?}"));
    let stop = c.to_string();
    let cut = gen(json!({"max_new_tokens": 8, "temperature": 0, "stop": [stop]})).await;
    let kept = gen(json!({"max_new_tokens": 8, "temperature": 0, "stop": [stop], "no_stop_trim": true})).await;
    let first = text.find(&stop).unwrap();
    assert_eq!(cut["text"].as_str().unwrap(), &text[..first], "stop {stop:?} at {i} in {text:?}");
    assert_eq!(kept["text"].as_str().unwrap(), &text[..first + stop.len()]);
    // refused by name: constrained decoding, out-of-range or out-of-vocabulary biases, min > max
    for (path, body, needle) in [
        ("/generate", json!({"text": "x", "sampling_params": {"regex": "[a-z]+"}}), "regex"),
        ("/generate", json!({"text": "x", "sampling_params": {"json_schema": "{}"}}), "json_schema"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}), "response_format"),
        ("/v1/completions", json!({"prompt": "x", "logit_bias": {"5": 101}}), "logit_bias"),
        ("/v1/completions", json!({"prompt": "x", "logit_bias": {"99999": 1}}), "99999"),
        ("/v1/completions", json!({"prompt": "x", "max_tokens": 2, "min_tokens": 3}), "min_new_tokens"),
        ("/v1/completions", json!({"prompt": "x", "suffix": "y"}), "suffix"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]}), "tool"),
    ] {
        let r = post(a, path, &body).await;
        assert_eq!(r.status, 400, "{path} {body}");
        let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(msg.contains(needle), "{path} {body}: {msg}");
    }
    // tools the client asks not to be called are accepted
    let r = post(a, "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_kv_whole(&wait_idle(a).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn api_key_guards_everything_but_health() {
    let s = Server::start(&["--model-path", &golden(), "--api-key", "sekret"]);
    assert_eq!(get(&s.addr, "/health").await.status, 200);
    let r = get(&s.addr, "/v1/models").await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    assert_eq!(call("POST", &s.addr, "/generate", json!({"text": "x"}).to_string(), &[("authorization", "Bearer wrong")]).await.status, 401);
    assert_eq!(call("GET", &s.addr, "/v1/models", "", &[("authorization", "Bearer sekret")]).await.status, 200);
}

/// Greedy requests with shared prefixes, each alone on a fresh server.
fn workload() -> Vec<Value> {
    (0..64)
        .map(|i| {
            let mut prompt: Vec<u32> = vec![0, 40, 41, 42, 43, 44];
            prompt.extend((0..(i % 7) + 1).map(|k| 50 + ((i * 13 + k * 7) % 200) as u32));
            json!({"input_ids": prompt, "stream": true, "return_logprob": true,
                   "sampling_params": {"max_new_tokens": 8 + (i % 5), "temperature": 0, "ignore_eos": true}})
        })
        .collect()
}

async fn final_outputs(addr: &str, reqs: &[Value], concurrent: bool) -> Vec<(Value, Vec<f64>)> {
    let one = |r: Value, addr: String| async move {
        let (st, ev) = post_sse(&addr, "/generate", &r).await;
        assert_eq!(st, 200);
        assert_eq!(ev.last().unwrap(), "[DONE]");
        let last: Value = serde_json::from_str(&ev[ev.len() - 2]).unwrap();
        let lps: Vec<f64> = last["meta_info"]["output_token_logprobs"].as_array().unwrap().iter().map(|x| x[0].as_f64().unwrap()).collect();
        (last["output_ids"].clone(), lps)
    };
    if concurrent {
        let handles: Vec<_> = reqs.iter().map(|r| tokio::spawn(one(r.clone(), addr.to_string()))).collect();
        let mut out = vec![];
        for h in handles {
            out.push(h.await.unwrap());
        }
        out
    } else {
        let mut out = vec![];
        for r in reqs {
            out.push(one(r.clone(), addr.to_string()).await);
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sixty_four_concurrent_streams_equal_sequential_and_cache_on_equals_off() {
    let reqs = workload();
    let seq = {
        let s = Server::start(&["--model-path", &golden(), "--disable-radix-cache"]);
        let out = final_outputs(&s.addr, &reqs, false).await;
        assert_kv_whole(&wait_idle(&s.addr).await);
        out
    };
    let s = Server::start(&["--model-path", &golden(), "--max-running-requests", "64"]);
    let conc = final_outputs(&s.addr, &reqs, true).await;
    let info = wait_idle(&s.addr).await;
    assert_kv_whole(&info);
    assert!(info["kv_cache"]["cached"].as_u64().unwrap() > 0, "prefix cache was used: {info}");
    for (i, (a, b)) in seq.iter().zip(&conc).enumerate() {
        assert_eq!(a.0, b.0, "request {i}: output ids differ between sequential (cache off) and concurrent (cache on)");
        assert_eq!(a.1, b.1, "request {i}: logprobs differ");
    }
    let m = get(&s.addr, "/metrics").await.text();
    for name in ["engine_requests_total 64", "engine_prefix_cache_hit_rate", "engine_time_to_first_token_seconds_count 64", "engine_inter_token_latency_seconds_bucket", "engine_kv_cache_usage", "engine_num_running_reqs 0"] {
        assert!(m.contains(name), "metrics lack {name}:\n{m}");
    }
    // flush when idle empties the cache
    let r = post(&s.addr, "/flush_cache", &json!({})).await;
    assert_eq!(r.status, 200);
    let info = model_info(&s.addr).await;
    assert_eq!(info["kv_cache"]["cached"], 0);
    assert_kv_whole(&info);
}

#[tokio::test(flavor = "multi_thread")]
async fn retraction_when_the_pool_runs_out_keeps_outputs() {
    // 8 requests that each grow to ~50 tokens: all are admitted, then decode outgrows the pool
    let reqs: Vec<Value> = workload()
        .into_iter()
        .take(8)
        .map(|mut r| {
            r["sampling_params"]["max_new_tokens"] = json!(40);
            r
        })
        .collect();
    let seq = {
        let s = Server::start(&["--model-path", &golden()]);
        final_outputs(&s.addr, &reqs, false).await
    };
    let s = Server::start(&["--model-path", &golden(), "--max-total-tokens", "100", "--chunked-prefill-size", "8"]);
    let conc = final_outputs(&s.addr, &reqs, true).await;
    let info = wait_idle(&s.addr).await;
    assert_kv_whole(&info);
    assert!(info["num_retractions"].as_u64().unwrap() > 0, "no retraction happened: {info}");
    for (i, (a, b)) in seq.iter().zip(&conc).enumerate() {
        assert_eq!(a, b, "request {i} changed after retraction");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn client_disconnect_aborts_and_frees_pages() {
    let s = Server::start(&["--model-path", &golden()]);
    for _ in 0..3 {
        start_stream_then_drop(&s.addr, "/v1/completions", &json!({"prompt": "abc", "max_tokens": 900, "stream": true, "ignore_eos": true}), 3).await;
    }
    // non-streaming request whose client gives up
    send_then_hang_up(&s.addr, "/generate", &json!({"text": "abc", "sampling_params": {"max_new_tokens": 900, "ignore_eos": true}}), std::time::Duration::from_millis(100)).await;
    let info = wait_idle(&s.addr).await;
    assert_kv_whole(&info);
    // the server's log is read by a background thread: give it a moment
    for _ in 0..100 {
        if s.log().matches("client disconnected").count() >= 4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(s.log().matches("client disconnected").count() >= 4, "all four requests were aborted by their disconnect:\n{}", s.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_in_flight_then_exits_zero() {
    let mut s = Server::start(&["--model-path", &golden()]);
    let addr = s.addr.clone();
    let h = tokio::spawn(async move { post_sse(&addr, "/generate", &json!({"text": "abc", "stream": true, "sampling_params": {"max_new_tokens": 200, "ignore_eos": true}})).await });
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let pid = s.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let (st, ev) = h.await.unwrap();
    assert_eq!(st, 200);
    assert_eq!(ev.last().unwrap(), "[DONE]", "the in-flight stream completed");
    let status = s.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", s.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn config_file_with_flags_overriding() {
    let t = TempDir::new("cfg");
    let cfg = t.path().join("preset.toml");
    std::fs::write(&cfg, format!("model-path = {:?}\nserved_model_name = \"from-file\"\nmax-running-requests = 3\ndisable-radix-cache = true\n", golden())).unwrap();
    let s = Server::start(&["--config", cfg.to_str().unwrap(), "--served-model-name", "from-flag"]);
    let info = model_info(&s.addr).await;
    assert_eq!(info["served_model_name"], "from-flag");
    assert_eq!(info["max_running_requests"], 3);
    std::fs::write(&cfg, "no-such-flag = 1\n").unwrap();
    let o = run(&["serve", "--config", cfg.to_str().unwrap()]);
    assert_ne!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no-such-flag"));
}

#[tokio::test(flavor = "multi_thread")]
async fn health_generate_and_lpm_policy() {
    let s = Server::start(&["--model-path", &golden(), "--schedule-policy", "lpm"]);
    assert_eq!(get(&s.addr, "/health_generate").await.status, 200);
    let outs = final_outputs(&s.addr, &workload()[..8], true).await;
    assert_eq!(outs.len(), 8);
    assert_kv_whole(&wait_idle(&s.addr).await);
}
