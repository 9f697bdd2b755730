//! SGLang's native endpoints: /generate, /health, /health_generate, /get_model_info, /flush_cache.
use hyper::StatusCode;
use serde_json::{json, Value};

use super::http::{json_response, sse, text_response, ApiError, Resp};
use super::params::{ids, sampling, Obj, NATIVE, NATIVE_KEYS};
use super::{merge, App};
use crate::scheduler::{Event, RequestSpec};

/// The prompts of a /generate request and whether it was a batch.
fn prompts(app: &App, o: &Obj) -> Result<(Vec<Vec<u32>>, bool), ApiError> {
    match (o.get("text"), o.get("input_ids")) {
        (Some(_), Some(_)) => Err(ApiError::bad("give either `text` or `input_ids`, not both")),
        (None, None) => Err(ApiError::bad("`text` or `input_ids` is required")),
        (Some(Value::String(s)), None) => Ok((vec![app.encode(s, "text")?], false)),
        (Some(Value::Array(a)), None) => {
            let v = a
                .iter()
                .map(|x| x.as_str().ok_or_else(|| ApiError::param("text", "`text` must be a string or a list of strings")).and_then(|s| app.encode(s, "text")))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((v, true))
        }
        (Some(v), None) => Err(ApiError::param("text", format!("`text` must be a string or a list of strings, got {v}"))),
        (None, Some(v)) => {
            if let Some(one) = ids(v) {
                Ok((vec![one], false))
            } else if let Some(many) = v.as_array().and_then(|a| a.iter().map(ids).collect::<Option<Vec<_>>>()) {
                Ok((many, true))
            } else {
                Err(ApiError::param("input_ids", "`input_ids` must be a list of token ids or a list of such lists"))
            }
        }
    }
}

pub async fn generate(app: &App, body: Value) -> Result<Resp, ApiError> {
    let o = Obj(body.as_object().unwrap());
    let (prompts, batch) = prompts(app, &o)?;
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(ApiError::bad("empty prompt"));
    }
    // one sampling_params object for every prompt, or a list with one per prompt (SGLang's batch form)
    let parse = |v: Option<&Value>| -> Result<crate::sampling::SamplingParams, ApiError> {
        let empty = serde_json::Map::new();
        let m = match v {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(m)) => m,
            Some(other) => return Err(ApiError::param("sampling_params", format!("`sampling_params` must be an object or a list of objects, got {other}"))),
        };
        if let Some(k) = m.keys().find(|k| !NATIVE_KEYS.contains(&k.as_str())) {
            return Err(ApiError::param(k, format!("unknown sampling parameter `{k}`")));
        }
        sampling(&Obj(m), &NATIVE, 128)
    };
    let per_prompt: Vec<crate::sampling::SamplingParams> = match o.get("sampling_params") {
        Some(Value::Array(list)) => {
            if list.len() != prompts.len() {
                return Err(ApiError::param("sampling_params", format!("{} sampling_params for {} prompts", list.len(), prompts.len())));
            }
            list.iter().map(|v| parse(Some(v))).collect::<Result<_, _>>()?
        }
        v => {
            let p = parse(v)?;
            vec![p; prompts.len()]
        }
    };
    let return_logprob = o.bool("return_logprob")?.unwrap_or(false);
    let logprob_start_len = match o.int("logprob_start_len")? {
        None | Some(-1) => None,
        Some(k) if k >= 0 => Some(k as usize),
        Some(k) => return Err(ApiError::param("logprob_start_len", format!("`logprob_start_len` must be -1 or >= 0, got {k}"))),
    };
    let top_logprobs_num = o.uint("top_logprobs_num")?.unwrap_or(0);
    if top_logprobs_num > app.info().vocab_size {
        return Err(ApiError::param("top_logprobs_num", "`top_logprobs_num` exceeds the vocabulary"));
    }
    let stream = o.bool("stream")?.unwrap_or(false);
    let mut rxs = Vec::new();
    for (prompt, params) in prompts.iter().zip(&per_prompt) {
        for i in 0..params.n {
            let mut p = params.clone();
            p.seed = p.seed.map(|s| s + i as u64);
            let spec = RequestSpec { input_ids: prompt.clone(), params: p, return_logprob, logprob_start_len, top_logprobs_num };
            rxs.push(app.engine.submit(spec)?);
        }
    }
    let multi = batch || per_prompt.iter().any(|p| p.n > 1);
    if !stream {
        let mut outs = Vec::new();
        for (_, rx) in rxs {
            outs.push(app.collect(rx).await?.to_json());
        }
        let v = if multi { Value::Array(outs) } else { outs.pop().unwrap() };
        return Ok(json_response(StatusCode::OK, &v));
    }
    let (resp, tx) = sse();
    let guard = app.inflight();
    let mut merged = merge(rxs);
    let prompt_lens: Vec<usize> = prompts.iter().zip(&per_prompt).flat_map(|(p, sp)| std::iter::repeat_n(p.len(), sp.n)).collect();
    tokio::spawn(async move {
        let _guard = guard;
        let mut text = vec![String::new(); prompt_lens.len()];
        let mut out_ids: Vec<Vec<u32>> = vec![vec![]; prompt_lens.len()];
        while let Some((i, ev)) = merged.recv().await {
            let mut v = match ev {
                Event::Delta { token_ids, text: t, .. } => {
                    text[i].push_str(&t);
                    out_ids[i].extend(token_ids);
                    json!({"text": text[i], "output_ids": out_ids[i], "meta_info": {
                        "prompt_tokens": prompt_lens[i], "completion_tokens": out_ids[i].len(), "finish_reason": null}})
                }
                Event::Done(out) => out.to_json(),
                Event::Error(e) => ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, e).body(),
            };
            if multi {
                v["index"] = json!(i);
            }
            if !tx.data(&v).await {
                return; // client gone: dropping `merged` aborts the requests
            }
        }
        tx.done().await;
    });
    Ok(resp)
}

pub async fn health_generate(app: &App) -> Resp {
    let spec = RequestSpec { input_ids: vec![app.engine.info.eos_token_ids.first().copied().unwrap_or(0)], params: crate::sampling::SamplingParams { max_new_tokens: 1, temperature: 0.0, ..Default::default() }, ..Default::default() };
    let res = match app.engine.submit(spec) {
        Ok((_, rx)) => tokio::time::timeout(std::time::Duration::from_secs(30), app.collect(rx)).await.ok().and_then(|r| r.ok()),
        Err(_) => None,
    };
    match res {
        Some(_) => text_response(StatusCode::OK, ""),
        None => text_response(StatusCode::SERVICE_UNAVAILABLE, "generation failed"),
    }
}

pub async fn model_info(app: &App) -> Resp {
    let stats = app.engine.stats().await;
    let info = app.info();
    json_response(
        StatusCode::OK,
        &json!({
            "model_path": info.model_path,
            "tokenizer_path": info.model_path,
            "is_generation": true,
            "served_model_name": app.served_model_name,
            "backend": info.backend,
            "vocab_size": info.vocab_size,
            "context_length": info.context_length,
            "max_total_tokens": info.max_total_tokens,
            "max_running_requests": info.max_running_requests,
            "kv_cache": stats.as_ref().map(|s| json!({
                "total": s.kv.total, "free": s.kv.free, "used": s.kv.owned, "cached": s.kv.cached,
                "evictable": s.kv.evictable, "integrity": s.integrity.as_ref().map(|_| "ok").unwrap_or_else(|e| e.as_str()),
            })),
            "num_running_reqs": stats.as_ref().map(|s| s.running),
            "num_waiting_reqs": stats.as_ref().map(|s| s.waiting),
            "num_retractions": stats.as_ref().map(|s| s.retractions),
        }),
    )
}

/// SGLang's `/get_server_info`: the server's arguments (parallel layout included) and its live
/// state, per DP-attention rank.
pub async fn server_info(app: &App) -> Resp {
    let stats = app.engine.stats().await;
    let mut v = match &app.server_args {
        serde_json::Value::Object(m) => m.clone(),
        _ => serde_json::Map::new(),
    };
    let info = app.info();
    v.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
    v.insert("served_model_name".into(), json!(app.served_model_name));
    v.insert("max_total_num_tokens".into(), json!(info.max_total_tokens));
    v.insert("context_length".into(), json!(info.context_length));
    let states: Vec<serde_json::Value> = stats
        .as_ref()
        .map(|s| s.per_rank.iter().enumerate().map(|(rank, (r, w))| json!({"dp_rank": rank, "num_running_reqs": r, "num_waiting_reqs": w})).collect())
        .unwrap_or_default();
    v.insert("internal_states".into(), json!(states));
    json_response(StatusCode::OK, &serde_json::Value::Object(v))
}

pub async fn flush_cache(app: &App) -> Resp {
    match app.engine.flush_cache().await {
        Ok(n) => text_response(StatusCode::OK, format!("Cache flushed ({n} tokens freed).\n")),
        Err(e) => ApiError::bad(format!("Cache not flushed: {e}")).response(),
    }
}
