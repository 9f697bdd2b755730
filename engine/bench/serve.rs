//! `engine bench serve`: a serving benchmark in the manner of SGLang's bench_serving. Sends N
//! requests with random (or fixed) prompt and output lengths to a running server, at a fixed
//! concurrency or a Poisson request rate, streams every response, and reports throughput, TTFT,
//! inter-token latency, TPOT and end-to-end latency percentiles.
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use crate::sampling::Rng;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchServeArgs {
    /// Server address
    #[arg(long, default_value = "http://127.0.0.1:30000")]
    pub base_url: String,
    #[arg(long, default_value_t = 200)]
    pub num_prompts: usize,
    /// Requests in flight at once (default: no limit)
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    /// Poisson arrival rate in requests/s (default: all at once, limited by --max-concurrency)
    #[arg(long)]
    pub request_rate: Option<f64>,
    #[arg(long, default_value_t = 256)]
    pub random_input_len: usize,
    #[arg(long, default_value_t = 128)]
    pub random_output_len: usize,
    /// Lengths are drawn uniformly from [len × ratio, len]; 1.0 gives fixed lengths
    #[arg(long, default_value_t = 1.0)]
    pub random_range_ratio: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long)]
    pub api_key: Option<String>,
    /// Print the results as one JSON object
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Default, Clone)]
struct Outcome {
    ok: bool,
    error: String,
    prompt_len: usize,
    output_len: usize,
    ttft: f64,
    itls: Vec<f64>,
    latency: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let r = (p / 100.0) * (sorted.len() - 1) as f64;
    let (lo, hi) = (r.floor() as usize, r.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (r - lo as f64)
}

fn stats(mut v: Vec<f64>) -> Value {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mean = if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 };
    json!({"mean_ms": mean * 1e3, "median_ms": percentile(&v, 50.0) * 1e3, "p90_ms": percentile(&v, 90.0) * 1e3, "p99_ms": percentile(&v, 99.0) * 1e3})
}

struct Target {
    host: String,
    auth: Option<String>,
}

async fn one(t: Arc<Target>, prompt: Vec<u32>, out_len: usize) -> Outcome {
    let mut o = Outcome { prompt_len: prompt.len(), ..Default::default() };
    let body = json!({"input_ids": prompt, "stream": true, "sampling_params": {"max_new_tokens": out_len, "temperature": 0, "ignore_eos": true}});
    let start = Instant::now();
    let res: Result<(), String> = async {
        let stream = tokio::net::TcpStream::connect(&t.host).await.map_err(|e| format!("connect: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut req = hyper::Request::post(format!("http://{}/generate", t.host)).header("host", &t.host).header("content-type", "application/json");
        if let Some(a) = &t.auth {
            req = req.header("authorization", format!("Bearer {a}"));
        }
        let resp = sender.send_request(req.body(Full::new(Bytes::from(body.to_string()))).unwrap()).await.map_err(|e| e.to_string())?;
        if resp.status() != 200 {
            let b = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            return Err(format!("HTTP error: {}", String::from_utf8_lossy(&b)));
        }
        let mut body = resp.into_body();
        let mut buf = String::new();
        let mut last = start;
        let mut seen = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| e.to_string())?;
            let Some(data) = frame.data_ref() else { continue };
            buf.push_str(&String::from_utf8_lossy(data));
            while let Some(i) = buf.find("\n\n") {
                let ev: String = buf.drain(..i + 2).collect();
                let Some(payload) = ev.trim().strip_prefix("data: ") else { continue };
                if payload == "[DONE]" {
                    continue;
                }
                let v: Value = serde_json::from_str(payload).map_err(|e| e.to_string())?;
                let n = v["output_ids"].as_array().map_or(0, Vec::len);
                if n > seen {
                    let now = Instant::now();
                    if seen == 0 {
                        o.ttft = (now - start).as_secs_f64();
                    } else {
                        // tokens that arrived together share the gap
                        let gap = (now - last).as_secs_f64() / (n - seen) as f64;
                        o.itls.extend(std::iter::repeat_n(gap, n - seen));
                    }
                    last = now;
                    seen = n;
                }
            }
        }
        o.output_len = seen;
        Ok(())
    }
    .await;
    o.latency = start.elapsed().as_secs_f64();
    match res {
        Ok(()) => o.ok = true,
        Err(e) => o.error = e,
    }
    o
}

pub fn run(a: BenchServeArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let host = a.base_url.trim_start_matches("http://").trim_end_matches('/').to_string();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let t = Arc::new(Target { host, auth: a.api_key.clone() });
        // vocabulary from the server, so random prompts are valid token ids
        let info = {
            let stream = tokio::net::TcpStream::connect(&t.host).await.map_err(|e| format!("cannot reach {}: {e}", a.base_url))?;
            let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let mut req = hyper::Request::get(format!("http://{}/get_model_info", t.host)).header("host", &t.host);
            if let Some(k) = &t.auth {
                req = req.header("authorization", format!("Bearer {k}"));
            }
            let r = s.send_request(req.body(Full::new(Bytes::new()))?).await?;
            let b = r.into_body().collect().await?.to_bytes();
            serde_json::from_slice::<Value>(&b)?
        };
        let vocab = info["vocab_size"].as_u64().ok_or("server did not report vocab_size")? as u32;
        let mut rng = Rng::new(a.seed);
        let mut draw = |len: usize| {
            let lo = ((len as f64) * a.random_range_ratio).round() as usize;
            if lo >= len { len } else { lo + (rng.next_u64() % (len - lo + 1) as u64) as usize }.max(1)
        };
        let work: Vec<(usize, usize)> = (0..a.num_prompts).map(|_| (draw(a.random_input_len), draw(a.random_output_len))).collect();
        let mut prng = Rng::new(a.seed ^ 0x5eed);
        let prompts: Vec<Vec<u32>> = work.iter().map(|(n, _)| (0..*n).map(|_| 3 + (prng.next_u64() % (vocab as u64 - 3)) as u32).collect()).collect();
        let sem = Arc::new(tokio::sync::Semaphore::new(a.max_concurrency.unwrap_or(usize::MAX >> 4)));
        let mut arrivals = Rng::new(a.seed ^ 0xa11);
        let start = Instant::now();
        let mut handles = Vec::new();
        for (p, (_, out_len)) in prompts.into_iter().zip(&work) {
            if let Some(rate) = a.request_rate {
                let gap = -(1.0 - arrivals.uniform()).ln() / rate;
                tokio::time::sleep(Duration::from_secs_f64(gap)).await;
            }
            let permit = sem.clone().acquire_owned().await?;
            let t = t.clone();
            let out_len = *out_len;
            handles.push(tokio::spawn(async move {
                let r = one(t, p, out_len).await;
                drop(permit);
                r
            }));
        }
        let mut outs = Vec::new();
        for h in handles {
            outs.push(h.await?);
        }
        let dur = start.elapsed().as_secs_f64();
        let ok: Vec<&Outcome> = outs.iter().filter(|o| o.ok).collect();
        if let Some(bad) = outs.iter().find(|o| !o.ok) {
            eprintln!("{} requests failed; first error: {}", outs.len() - ok.len(), bad.error);
        }
        let inp: usize = ok.iter().map(|o| o.prompt_len).sum();
        let outp: usize = ok.iter().map(|o| o.output_len).sum();
        let tpot: Vec<f64> = ok.iter().filter(|o| o.output_len > 1).map(|o| (o.latency - o.ttft) / (o.output_len - 1) as f64).collect();
        let result = json!({
            "base_url": a.base_url, "num_prompts": a.num_prompts, "max_concurrency": a.max_concurrency, "request_rate": a.request_rate,
            "random_input_len": a.random_input_len, "random_output_len": a.random_output_len, "random_range_ratio": a.random_range_ratio,
            "completed": ok.len(), "failed": outs.len() - ok.len(), "duration_s": dur,
            "total_input_tokens": inp, "total_output_tokens": outp,
            "request_throughput": ok.len() as f64 / dur, "input_throughput": inp as f64 / dur, "output_throughput": outp as f64 / dur,
            "total_throughput": (inp + outp) as f64 / dur,
            "ttft": stats(ok.iter().map(|o| o.ttft).collect()),
            "itl": stats(ok.iter().flat_map(|o| o.itls.iter().copied()).collect()),
            "tpot": stats(tpot),
            "e2e_latency": stats(ok.iter().map(|o| o.latency).collect()),
        });
        if a.json {
            println!("{result}");
        } else {
            let ms = |k: &str, f: &str| result[k][f].as_f64().unwrap_or(0.0);
            println!("============ Serving Benchmark Result ============");
            println!("{:<40}{:>10}", "Successful requests:", ok.len());
            println!("{:<40}{:>10}", "Failed requests:", outs.len() - ok.len());
            println!("{:<40}{:>10.2}", "Benchmark duration (s):", dur);
            println!("{:<40}{:>10}", "Total input tokens:", inp);
            println!("{:<40}{:>10}", "Total generated tokens:", outp);
            println!("{:<40}{:>10.2}", "Request throughput (req/s):", ok.len() as f64 / dur);
            println!("{:<40}{:>10.2}", "Input token throughput (tok/s):", inp as f64 / dur);
            println!("{:<40}{:>10.2}", "Output token throughput (tok/s):", outp as f64 / dur);
            for (name, k) in [("Time to First Token", "ttft"), ("Inter-token Latency", "itl"), ("Time per Output Token", "tpot"), ("End-to-End Latency", "e2e_latency")] {
                println!("---------------{name:-^25}------------");
                println!("{:<40}{:>10.2}", format!("Mean {k} (ms):"), ms(k, "mean_ms"));
                println!("{:<40}{:>10.2}", format!("Median {k} (ms):"), ms(k, "median_ms"));
                println!("{:<40}{:>10.2}", format!("P99 {k} (ms):"), ms(k, "p99_ms"));
            }
            println!("==================================================");
        }
        if ok.is_empty() {
            return Err("every request failed".into());
        }
        Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    })
}
