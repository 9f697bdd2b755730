//! HTTP plumbing: bodies, JSON and OpenAI-style error responses, SSE streams.
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;

pub type RespBody = BoxBody<Bytes, Infallible>;
pub type Resp = Response<RespBody>;

/// Largest request body accepted.
pub const MAX_BODY: usize = 16 << 20;

/// A client error: status, message, and the parameter it concerns.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
}

impl ApiError {
    pub fn bad(message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::BAD_REQUEST, message: message.into(), param: None }
    }
    pub fn param(param: &str, message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::BAD_REQUEST, message: message.into(), param: Some(param.into()) }
    }
    pub fn status(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), param: None }
    }
    pub fn body(&self) -> Value {
        let kind = match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status.as_u16()}})
    }
    pub fn response(&self) -> Resp {
        json_response(self.status, &self.body())
    }
}

impl From<crate::scheduler::SubmitError> for ApiError {
    fn from(e: crate::scheduler::SubmitError) -> Self {
        match e {
            crate::scheduler::SubmitError::Invalid(m) => {
                let param = m.strip_prefix("invalid sampling parameter `").and_then(|r| r.split('`').next()).map(str::to_string);
                ApiError { status: StatusCode::BAD_REQUEST, message: m, param }
            }
            crate::scheduler::SubmitError::Stopped => ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "the engine is shutting down"),
        }
    }
}

pub fn full(b: impl Into<Bytes>) -> RespBody {
    Full::new(b.into()).boxed()
}

pub fn json_response(status: StatusCode, v: &Value) -> Resp {
    Response::builder().status(status).header("content-type", "application/json").body(full(v.to_string())).unwrap()
}

pub fn text_response(status: StatusCode, s: impl Into<String>) -> Resp {
    Response::builder().status(status).header("content-type", "text/plain; charset=utf-8").body(full(s.into())).unwrap()
}

/// Reads the body (bounded) and parses it as a JSON object.
pub async fn read_json(body: Incoming) -> Result<Value, ApiError> {
    let bytes = Limited::new(body, MAX_BODY).collect().await.map_err(|e| {
        if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
            ApiError::status(StatusCode::PAYLOAD_TOO_LARGE, format!("request body exceeds {MAX_BODY} bytes"))
        } else {
            ApiError::bad(format!("cannot read request body: {e}"))
        }
    })?;
    let bytes = bytes.to_bytes();
    let text = std::str::from_utf8(&bytes).map_err(|e| ApiError::bad(format!("request body is not valid UTF-8: {e}")))?;
    let v: Value = serde_json::from_str(text).map_err(|e| ApiError::bad(format!("request body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad("request body must be a JSON object"));
    }
    Ok(v)
}

/// A response body fed through a channel: SSE streams.
pub struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// An SSE response and the sender that writes its events. Dropping the sender ends the stream;
/// a failed send means the client went away.
pub fn sse() -> (Resp, SseSender) {
    let (tx, rx) = mpsc::channel(64);
    let resp = Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(ChannelBody { rx }.boxed())
        .unwrap();
    (resp, SseSender { tx })
}

pub struct SseSender {
    tx: mpsc::Sender<Bytes>,
}

impl SseSender {
    pub async fn data(&self, v: &Value) -> bool {
        self.tx.send(Bytes::from(format!("data: {v}\n\n"))).await.is_ok()
    }
    pub async fn done(&self) -> bool {
        self.tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await.is_ok()
    }
}
