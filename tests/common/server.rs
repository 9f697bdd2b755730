//! Starts `engine serve` on a free port and talks to it over real HTTP (hyper's client).
#![allow(dead_code)]
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;

pub struct Server {
    pub child: Child,
    pub addr: String,
    pub stderr_lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    /// `engine serve --port 0 ARGS...`; waits for the ready line and reads the bound address from it.
    pub fn start(args: &[&str]) -> Server {
        let mut child = super::engine()
            .env("ENGINE_LOG", "info")
            .args(["serve", "--port", "0"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn engine serve");
        let stderr = child.stderr.take().unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let l2 = lines.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(a) = line.strip_prefix("engine is ready: http://") {
                    if let Some(t) = tx.take() {
                        let _ = t.send(a.to_string());
                    }
                }
                l2.lock().unwrap().push(line);
            }
        });
        let addr = rx.recv_timeout(std::time::Duration::from_secs(60)).unwrap_or_else(|_| panic!("server did not start: {:?}", lines.lock().unwrap()));
        Server { child, addr, stderr_lines: lines }
    }

    pub fn log(&self) -> String {
        self.stderr_lines.lock().unwrap().join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Resp {
    pub status: u16,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

async fn send(addr: &str, req: Request<Full<Bytes>>) -> hyper::Response<Incoming> {
    send_on_conn(addr, req).await.0
}

/// Sends a request on a fresh connection; the handle owns the connection (abort it to hang up).
async fn send_on_conn(addr: &str, req: Request<Full<Bytes>>) -> (hyper::Response<Incoming>, tokio::task::JoinHandle<()>) {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    let h = tokio::spawn(async move {
        let _ = conn.await;
    });
    (sender.send_request(req).await.expect("send request"), h)
}

pub fn request(method: &str, addr: &str, path: &str, body: impl Into<Bytes>, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(format!("http://{addr}{path}")).header("host", addr).header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(body.into())).unwrap()
}

pub async fn call(method: &str, addr: &str, path: &str, body: impl Into<Bytes>, headers: &[(&str, &str)]) -> Resp {
    let r = send(addr, request(method, addr, path, body, headers)).await;
    let status = r.status().as_u16();
    let body = r.into_body().collect().await.expect("read body").to_bytes();
    Resp { status, body }
}

pub async fn post(addr: &str, path: &str, v: &Value) -> Resp {
    call("POST", addr, path, v.to_string(), &[]).await
}

pub async fn get(addr: &str, path: &str) -> Resp {
    call("GET", addr, path, "", &[]).await
}

/// A streaming POST: the `data:` payloads in order (the final "[DONE]" included).
pub async fn post_sse(addr: &str, path: &str, v: &Value) -> (u16, Vec<String>) {
    let r = send(addr, request("POST", addr, path, v.to_string(), &[])).await;
    let status = r.status().as_u16();
    let body = r.into_body().collect().await.expect("read stream").to_bytes();
    let text = String::from_utf8(body.to_vec()).expect("utf-8 stream");
    let events = text.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(str::to_string).collect();
    (status, events)
}

/// Opens a streaming request, reads `n` body frames, then hangs up (closes the TCP connection).
pub async fn start_stream_then_drop(addr: &str, path: &str, v: &Value, n: usize) {
    let (r, conn) = send_on_conn(addr, request("POST", addr, path, v.to_string(), &[])).await;
    assert_eq!(r.status().as_u16(), 200);
    let mut body = r.into_body();
    for _ in 0..n {
        let _ = body.frame().await;
    }
    drop(body);
    conn.abort();
}

/// Sends a non-streaming request and hangs up after `after` without reading the response.
pub async fn send_then_hang_up(addr: &str, path: &str, v: &Value, after: std::time::Duration) {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    let c = tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = request("POST", addr, path, v.to_string(), &[]);
    let _ = tokio::time::timeout(after, sender.send_request(req)).await;
    c.abort();
}

pub async fn model_info(addr: &str) -> Value {
    get(addr, "/get_model_info").await.json()
}

/// Waits until the server has no running or waiting requests; returns /get_model_info.
pub async fn wait_idle(addr: &str) -> Value {
    for _ in 0..500 {
        let v = model_info(addr).await;
        if v["num_running_reqs"] == 0 && v["num_waiting_reqs"] == 0 {
            return v;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("server never became idle: {}", model_info(addr).await);
}

/// The KV pool is whole: nothing held by requests, free + cached == total, integrity ok.
pub fn assert_kv_whole(info: &Value) {
    let kv = &info["kv_cache"];
    assert_eq!(kv["integrity"], "ok", "{info}");
    assert_eq!(kv["used"], 0, "{info}");
    assert_eq!(kv["free"].as_u64().unwrap() + kv["cached"].as_u64().unwrap(), kv["total"].as_u64().unwrap(), "{info}");
}
