//! The HTTP server (hyper + tokio): OpenAI and SGLang endpoints, Prometheus metrics. It talks to
//! the engine thread only through `EngineHandle`'s channels.
mod conn_watch;
mod http;
mod native;
mod openai;
mod params;
mod reasoning;

pub use reasoning::ReasoningParser;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::mpsc;

use crate::runtime::GenerateOutput;
use crate::scheduler::{EngineHandle, EngineInfo, Event};
use http::{text_response, ApiError, Resp};

/// Server-wide state shared by every connection.
#[derive(Clone)]
pub struct App {
    pub engine: EngineHandle,
    pub served_model_name: String,
    pub api_key: Option<String>,
    pub reasoning_parser: bool,
    /// What `/get_server_info` reports of the command line (SGLang's server_args)
    pub server_args: serde_json::Value,
    inflight: Arc<AtomicUsize>,
    /// The connection this request came on (set per connection).
    conn: Option<Arc<conn_watch::ConnWatch>>,
}

/// Counts a request as in flight until dropped (graceful shutdown waits for these).
pub struct InflightGuard(Arc<AtomicUsize>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl App {
    pub fn new(engine: EngineHandle, served_model_name: String, api_key: Option<String>, reasoning_parser: bool) -> Self {
        App { engine, served_model_name, api_key, reasoning_parser, server_args: serde_json::Value::Null, inflight: Arc::new(AtomicUsize::new(0)), conn: None }
    }

    pub fn with_server_args(mut self, args: serde_json::Value) -> Self {
        self.server_args = args;
        self
    }

    pub fn info(&self) -> &EngineInfo {
        &self.engine.info
    }

    pub fn inflight(&self) -> InflightGuard {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        InflightGuard(self.inflight.clone())
    }

    /// Text → token ids (with special tokens, as SGLang tokenizes prompts).
    pub fn encode(&self, text: &str, field: &str) -> Result<Vec<u32>, ApiError> {
        let tok = self.engine.tokenizer.as_ref().ok_or_else(|| ApiError::param(field, "this model has no tokenizer: send token ids"))?;
        if text.is_empty() {
            return Err(ApiError::param(field, format!("`{field}` is empty")));
        }
        tok.encode(text, true).map_err(|e| ApiError::param(field, e.to_string()))
    }

    /// A token's text, for logprob listings.
    pub fn token_text(&self, id: u32) -> String {
        self.engine.tokenizer.as_ref().and_then(|t| t.decode(&[id], false).ok()).unwrap_or_else(|| format!("<{id}>"))
    }
}

impl App {
    /// Waits for a request's final output; gives up (dropping, hence aborting, the request) if the
    /// client hangs up first.
    pub async fn collect(&self, mut rx: mpsc::UnboundedReceiver<Event>) -> Result<GenerateOutput, ApiError> {
        loop {
            let ev = match &self.conn {
                Some(c) => tokio::select! {
                    ev = rx.recv() => ev,
                    _ = c.closed() => return Err(ApiError::status(StatusCode::from_u16(499).unwrap(), "client closed the connection")),
                },
                None => rx.recv().await,
            };
            match ev {
                Some(Event::Delta { .. }) => {}
                Some(Event::Done(out)) => return Ok(out),
                Some(Event::Error(e)) => return Err(ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, e)),
                None => return Err(ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, "the engine dropped the request")),
            }
        }
    }
}

/// Merges several requests' events, tagged with their index. Dropping the result drops every
/// request's receiver, which aborts the unfinished ones.
pub fn merge(rxs: Vec<(u64, mpsc::UnboundedReceiver<Event>)>) -> mpsc::Receiver<(usize, Event)> {
    let (tx, out) = mpsc::channel(64);
    for (i, (_, mut rx)) in rxs.into_iter().enumerate() {
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    ev = rx.recv() => match ev {
                        Some(ev) => {
                            let last = matches!(ev, Event::Done(_) | Event::Error(_));
                            if tx.send((i, ev)).await.is_err() || last {
                                return;
                            }
                        }
                        None => return,
                    },
                    _ = tx.closed() => return,
                }
            }
        });
    }
    out
}

fn authorized(app: &App, req: &Request<Incoming>) -> bool {
    let Some(key) = &app.api_key else { return true };
    req.headers()
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .is_some_and(|k| k.trim() == key)
}

async fn route(app: App, req: Request<Incoming>) -> Resp {
    let _guard = app.inflight();
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    if path != "/health" && !authorized(&app, &req) {
        return ApiError::status(StatusCode::UNAUTHORIZED, "missing or invalid API key (send `Authorization: Bearer KEY`)").response();
    }
    let result = match (&method, path.as_str()) {
        (&Method::GET, "/health") => Ok(text_response(StatusCode::OK, "")),
        (&Method::GET, "/health_generate") => Ok(native::health_generate(&app).await),
        (&Method::GET, "/get_model_info") => Ok(native::model_info(&app).await),
        (&Method::GET, "/get_server_info") => Ok(native::server_info(&app).await),
        (&Method::GET | &Method::POST, "/flush_cache") => Ok(native::flush_cache(&app).await),
        (&Method::GET, "/metrics") => Ok(text_response(StatusCode::OK, app.engine.metrics.render())),
        (&Method::GET, "/v1/models") => Ok(openai::models(&app)),
        (&Method::POST, "/generate") => match http::read_json(req.into_body()).await {
            Ok(v) => native::generate(&app, v).await,
            Err(e) => Err(e),
        },
        (&Method::POST, "/v1/completions") => match http::read_json(req.into_body()).await {
            Ok(v) => openai::completions(&app, v).await,
            Err(e) => Err(e),
        },
        (&Method::POST, "/v1/chat/completions") => match http::read_json(req.into_body()).await {
            Ok(v) => openai::chat(&app, v).await,
            Err(e) => Err(e),
        },
        (_, "/health" | "/health_generate" | "/get_model_info" | "/get_server_info" | "/metrics" | "/v1/models" | "/generate" | "/v1/completions" | "/v1/chat/completions") => {
            Err(ApiError::status(StatusCode::METHOD_NOT_ALLOWED, format!("{method} is not allowed on {path}")))
        }
        _ => Err(ApiError::status(StatusCode::NOT_FOUND, format!("no route for {method} {path}"))),
    };
    match result {
        Ok(r) => r,
        Err(e) => {
            log::debug!("{method} {path}: {} {}", e.status, e.message);
            e.response()
        }
    }
}

/// Serves until SIGTERM/SIGINT, then stops accepting, waits (bounded) for in-flight requests and
/// returns.
pub async fn serve(app: App, listener: tokio::net::TcpListener, drain: Duration) -> std::io::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    log::info!("serving {} on http://{addr}", app.served_model_name);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            acc = listener.accept() => {
                let (stream, _) = match acc {
                    Ok(x) => x,
                    Err(e) => {
                        log::warn!("accept: {e}");
                        continue;
                    }
                };
                let (stream, watch, watcher) = match conn_watch::watch(stream) {
                    Ok(x) => x,
                    Err(e) => {
                        log::warn!("accept: {e}");
                        continue;
                    }
                };
                let mut app = app.clone();
                app.conn = Some(watch);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let app = app.clone();
                        async move { Ok::<_, std::convert::Infallible>(route(app, req).await) }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                        log::debug!("connection: {e}");
                    }
                    watcher.abort();
                });
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    drop(listener);
    log::info!("shutting down: no new connections; waiting up to {}s for {} in-flight requests", drain.as_secs(), app.inflight.load(Ordering::SeqCst));
    let deadline = tokio::time::Instant::now() + drain;
    while app.inflight.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = app.inflight.load(Ordering::SeqCst);
    if left > 0 {
        log::warn!("{left} requests still in flight at the deadline");
    }
    Ok(())
}
