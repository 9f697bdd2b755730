//! OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions.
use hyper::StatusCode;
use serde_json::{json, Value};

use super::http::{json_response, sse, ApiError, Resp};
use super::params::{ids, sampling, Obj, OPENAI};
use super::reasoning::ReasoningParser;
use super::{merge, App};
use crate::runtime::GenerateOutput;
use crate::scheduler::{Event, RequestSpec};
use crate::tokenizer::ChatMessage;

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub fn models(app: &App) -> Resp {
    json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": [{
            "id": app.served_model_name, "object": "model", "created": now(), "owned_by": "engine",
            "root": app.info().model_path, "max_model_len": app.info().context_length,
        }]}),
    )
}

/// `model` must be a string when given; like SGLang, any name is served by the one model.
fn check_model(app: &App, o: &Obj) -> Result<(), ApiError> {
    if let Some(m) = o.str("model")? {
        if m != app.served_model_name {
            log::debug!("request names model {m:?}; serving {:?}", app.served_model_name);
        }
    }
    Ok(())
}

/// Completions' `prompt`: text, token ids, or a list of either.
fn completion_prompts(app: &App, v: Option<&Value>) -> Result<Vec<Vec<u32>>, ApiError> {
    let bad = || ApiError::param("prompt", "`prompt` must be a string, a list of token ids, or a list of strings or token-id lists");
    let v = v.ok_or_else(|| ApiError::param("prompt", "`prompt` is required"))?;
    let prompts = match v {
        Value::String(s) => vec![app.encode(s, "prompt")?],
        Value::Array(a) if a.is_empty() => return Err(ApiError::param("prompt", "`prompt` is empty")),
        Value::Array(a) if a[0].is_number() => vec![ids(v).ok_or_else(bad)?],
        Value::Array(a) => a
            .iter()
            .map(|x| match x {
                Value::String(s) => app.encode(s, "prompt"),
                _ => ids(x).ok_or_else(bad),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(bad()),
    };
    if prompts.iter().any(Vec::is_empty) {
        return Err(ApiError::param("prompt", "`prompt` is empty"));
    }
    Ok(prompts)
}

/// The OpenAI finish_reason, and SGLang's matched_stop.
fn finish(out: &GenerateOutput) -> (&'static str, Value) {
    use crate::runtime::FinishReason::*;
    let matched = match &out.finish_reason {
        StopToken(t) => json!(t),
        StopString(s) => json!(s),
        _ => Value::Null,
    };
    (out.finish_reason.openai(), matched)
}

struct Common {
    stream: bool,
    include_usage: bool,
    top_logprobs: Option<usize>,
}

fn common(o: &Obj, chat: bool) -> Result<Common, ApiError> {
    let stream = o.bool("stream")?.unwrap_or(false);
    let include_usage = match o.object("stream_options")? {
        Some(so) => so.bool("include_usage")?.unwrap_or(false),
        None => false,
    };
    let top_logprobs = if chat {
        match o.bool("logprobs")? {
            Some(true) => Some(o.uint("top_logprobs")?.unwrap_or(0)),
            _ => {
                if o.uint("top_logprobs")?.is_some_and(|x| x > 0) {
                    return Err(ApiError::param("top_logprobs", "`top_logprobs` needs `logprobs: true`"));
                }
                None
            }
        }
    } else {
        o.uint("logprobs")?
    };
    if top_logprobs.is_some_and(|k| k > 20) {
        return Err(ApiError::param(if chat { "top_logprobs" } else { "logprobs" }, "at most 20 top logprobs"));
    }
    Ok(Common { stream, include_usage, top_logprobs })
}

fn submit_all(app: &App, prompts: &[Vec<u32>], params: &crate::sampling::SamplingParams, c: &Common) -> Result<Vec<(u64, tokio::sync::mpsc::UnboundedReceiver<Event>)>, ApiError> {
    let mut rxs = Vec::new();
    for prompt in prompts {
        for i in 0..params.n {
            let mut p = params.clone();
            p.seed = p.seed.map(|s| s + i as u64);
            let spec = RequestSpec { input_ids: prompt.clone(), params: p, return_logprob: c.top_logprobs.is_some(), logprob_start_len: None, top_logprobs_num: c.top_logprobs.unwrap_or(0) };
            rxs.push(app.engine.submit(spec)?);
        }
    }
    Ok(rxs)
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens})
}

/// Legacy completions logprobs object.
fn completion_logprobs(app: &App, lps: &[(Option<f32>, u32)], tops: &[Vec<(f32, u32)>], offset0: usize) -> Value {
    let mut offset = offset0;
    let (mut tokens, mut token_logprobs, mut top, mut offsets) = (vec![], vec![], vec![], vec![]);
    for ((lp, id), t) in lps.iter().zip(tops) {
        let s = app.token_text(*id);
        offsets.push(offset);
        offset += s.len();
        tokens.push(s);
        token_logprobs.push(*lp);
        top.push(t.iter().map(|(l, i)| (app.token_text(*i), json!(l))).collect::<serde_json::Map<_, _>>());
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets})
}

/// Chat logprobs object (`choices[].logprobs.content`).
fn chat_logprobs(app: &App, lps: &[(Option<f32>, u32)], tops: &[Vec<(f32, u32)>]) -> Value {
    let entry = |id: u32, lp: f32| {
        let s = app.token_text(id);
        json!({"token": s, "logprob": lp, "bytes": s.as_bytes()})
    };
    let content: Vec<Value> = lps
        .iter()
        .zip(tops)
        .map(|((lp, id), t)| {
            let mut e = entry(*id, lp.unwrap_or(f32::NEG_INFINITY));
            e["top_logprobs"] = Value::Array(t.iter().map(|(l, i)| entry(*i, *l)).collect());
            e
        })
        .collect();
    json!({"content": content})
}

pub async fn completions(app: &App, body: Value) -> Result<Resp, ApiError> {
    let o = Obj(body.as_object().unwrap());
    check_model(app, &o)?;
    let prompts = completion_prompts(app, o.get("prompt"))?;
    let params = sampling(&o, &OPENAI, 16)?;
    let c = common(&o, false)?;
    if o.bool("echo")?.unwrap_or(false) {
        return Err(ApiError::param("echo", "`echo` is not supported"));
    }
    if o.str("suffix")?.is_some_and(|x| !x.is_empty()) {
        return Err(ApiError::param("suffix", "`suffix` (insertion) is not supported"));
    }
    let n = params.n;
    let rxs = submit_all(app, &prompts, &params, &c)?;
    let id = format!("cmpl-{}", rxs[0].0);
    let created = now();
    let model = app.served_model_name.clone();
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    if !c.stream {
        let mut choices = Vec::new();
        let mut completion_tokens = 0;
        for (i, (_, rx)) in rxs.into_iter().enumerate() {
            let out = app.collect(rx).await?;
            completion_tokens += out.output_ids.len();
            let (reason, matched) = finish(&out);
            let logprobs = out.logprobs.as_ref().map(|l| completion_logprobs(app, &l.output_token_logprobs, &l.output_top_logprobs, 0));
            choices.push(json!({"index": i, "text": out.text, "logprobs": logprobs, "finish_reason": reason, "matched_stop": matched}));
        }
        return Ok(json_response(StatusCode::OK, &json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens),
        })));
    }
    let (resp, tx) = sse();
    let guard = app.inflight();
    let app2 = app.clone();
    let mut merged = merge(rxs);
    let total = prompts.len() * n;
    tokio::spawn(async move {
        let _guard = guard;
        let mut completion_tokens = 0;
        let mut offsets = vec![0usize; total];
        while let Some((i, ev)) = merged.recv().await {
            let chunk = match ev {
                Event::Delta { token_ids, text, logprobs, top_logprobs } => {
                    completion_tokens += token_ids.len();
                    let lp = c.top_logprobs.map(|_| completion_logprobs(&app2, &logprobs, &top_logprobs, offsets[i]));
                    offsets[i] += text.len();
                    if text.is_empty() && lp.is_none() {
                        continue;
                    }
                    json!({"index": i, "text": text, "logprobs": lp, "finish_reason": null})
                }
                Event::Done(out) => {
                    let (reason, matched) = finish(&out);
                    json!({"index": i, "text": "", "logprobs": null, "finish_reason": reason, "matched_stop": matched})
                }
                Event::Error(e) => {
                    tx.data(&ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, e).body()).await;
                    continue;
                }
            };
            let v = json!({"id": id, "object": "text_completion", "created": created, "model": model, "choices": [chunk]});
            if !tx.data(&v).await {
                return;
            }
        }
        if c.include_usage {
            tx.data(&json!({"id": id, "object": "text_completion", "created": created, "model": model, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})).await;
        }
        tx.done().await;
    });
    Ok(resp)
}

fn parse_messages(o: &Obj) -> Result<Vec<ChatMessage>, ApiError> {
    let arr = o.get("messages").and_then(Value::as_array).ok_or_else(|| ApiError::param("messages", "`messages` must be a non-empty list"))?;
    if arr.is_empty() {
        return Err(ApiError::param("messages", "`messages` must be a non-empty list"));
    }
    arr.iter()
        .enumerate()
        .map(|(i, m)| {
            let obj = m.as_object().ok_or_else(|| ApiError::param("messages", format!("messages[{i}] must be an object")))?;
            let role = obj.get("role").and_then(Value::as_str).ok_or_else(|| ApiError::param("messages", format!("messages[{i}].role must be a string")))?;
            if !["system", "user", "assistant", "tool", "developer"].contains(&role) {
                return Err(ApiError::param("messages", format!("messages[{i}].role {role:?} is not one of system, user, assistant, tool")));
            }
            let content = match obj.get("content") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                // content parts: concatenate the text parts
                Some(Value::Array(parts)) => Some(
                    parts
                        .iter()
                        .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                            (Some("text"), Some(t)) => Ok(t.to_string()),
                            _ => Err(ApiError::param("messages", format!("messages[{i}].content: only text parts are supported"))),
                        })
                        .collect::<Result<String, _>>()?,
                ),
                Some(v) => return Err(ApiError::param("messages", format!("messages[{i}].content must be a string or a list of parts, got {v}"))),
            };
            let mut extra = obj.clone();
            extra.remove("role");
            extra.remove("content");
            Ok(ChatMessage { role: if role == "developer" { "system".into() } else { role.into() }, content, extra })
        })
        .collect()
}

pub async fn chat(app: &App, body: Value) -> Result<Resp, ApiError> {
    let o = Obj(body.as_object().unwrap());
    check_model(app, &o)?;
    let messages = parse_messages(&o)?;
    // tools would reach neither the prompt nor a parser: refused unless the client asks for none
    // of them to be called (vLLM's answer without a tool-call parser, too)
    if o.get("tools").and_then(Value::as_array).is_some_and(|t| !t.is_empty()) && o.get("tool_choice").and_then(Value::as_str) != Some("none") {
        return Err(ApiError::param("tools", "tool calling is not supported by this server (tool_choice \"none\" is)"));
    }
    let tok = app.engine.tokenizer.as_ref().ok_or_else(|| ApiError::bad("this model has no tokenizer: use /v1/completions with token ids"))?;
    let prompt = tok.encode_chat(&messages, true).map_err(|e| ApiError::param("messages", e.to_string()))?;
    let params = sampling(&o, &OPENAI, app.info().context_length.saturating_sub(prompt.len()).clamp(1, 4096))?;
    let c = common(&o, true)?;
    let n = params.n;
    let prompts = vec![prompt];
    let rxs = submit_all(app, &prompts, &params, &c)?;
    let id = format!("chatcmpl-{}", rxs[0].0);
    let created = now();
    let model = app.served_model_name.clone();
    let prompt_tokens = prompts[0].len();
    let reasoning = app.reasoning_parser;
    if !c.stream {
        let mut choices = Vec::new();
        let mut completion_tokens = 0;
        for (i, (_, rx)) in rxs.into_iter().enumerate() {
            let out = app.collect(rx).await?;
            completion_tokens += out.output_ids.len();
            let (reason, matched) = finish(&out);
            let mut message = json!({"role": "assistant", "content": out.text});
            if reasoning {
                let (r, content) = ReasoningParser::split_all(&out.text);
                message = json!({"role": "assistant", "content": content, "reasoning_content": r});
            }
            let logprobs = out.logprobs.as_ref().map(|l| chat_logprobs(app, &l.output_token_logprobs, &l.output_top_logprobs));
            choices.push(json!({"index": i, "message": message, "logprobs": logprobs, "finish_reason": reason, "matched_stop": matched}));
        }
        return Ok(json_response(StatusCode::OK, &json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens),
        })));
    }
    let (resp, tx) = sse();
    let guard = app.inflight();
    let app2 = app.clone();
    let mut merged = merge(rxs);
    tokio::spawn(async move {
        let _guard = guard;
        let chunk = |choice: Value| json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]});
        for i in 0..n {
            if !tx.data(&chunk(json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}))).await {
                return;
            }
        }
        let mut parsers: Vec<ReasoningParser> = (0..n).map(|_| ReasoningParser::new()).collect();
        let mut completion_tokens = 0;
        while let Some((i, ev)) = merged.recv().await {
            let choice = match ev {
                Event::Delta { token_ids, text, logprobs, top_logprobs } => {
                    completion_tokens += token_ids.len();
                    let lp = c.top_logprobs.map(|_| chat_logprobs(&app2, &logprobs, &top_logprobs));
                    let delta = if reasoning {
                        let (r, content) = parsers[i].push(&text);
                        let mut d = serde_json::Map::new();
                        if !r.is_empty() {
                            d.insert("reasoning_content".into(), json!(r));
                        }
                        if !content.is_empty() {
                            d.insert("content".into(), json!(content));
                        }
                        Value::Object(d)
                    } else {
                        json!({"content": text})
                    };
                    if delta.as_object().is_some_and(|d| d.is_empty() || d.get("content").is_some_and(|c| c == "")) && lp.is_none() {
                        continue;
                    }
                    json!({"index": i, "delta": delta, "logprobs": lp, "finish_reason": null})
                }
                Event::Done(out) => {
                    let (reason, matched) = finish(&out);
                    let mut delta = json!({});
                    if reasoning {
                        let (r, content) = parsers[i].finish();
                        if !r.is_empty() {
                            delta["reasoning_content"] = json!(r);
                        }
                        if !content.is_empty() {
                            delta["content"] = json!(content);
                        }
                    }
                    json!({"index": i, "delta": delta, "logprobs": null, "finish_reason": reason, "matched_stop": matched})
                }
                Event::Error(e) => {
                    tx.data(&ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, e).body()).await;
                    continue;
                }
            };
            if !tx.data(&chunk(choice)).await {
                return;
            }
        }
        if c.include_usage {
            tx.data(&json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})).await;
        }
        tx.done().await;
    });
    Ok(resp)
}
