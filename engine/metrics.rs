//! Serving metrics in Prometheus' text format (`GET /metrics`).
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::kv_cache::KvStats;

struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram { bounds, counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
    }
    fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(self.counts.iter_mut()) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
    fn render(&self, name: &str, help: &str, out: &mut String) {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} histogram\n"));
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            out.push_str(&format!("{name}_bucket{{le=\"{b}\"}} {c}\n"));
        }
        out.push_str(&format!("{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}\n", self.count, self.sum, self.count));
    }
}

const LATENCY: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

#[derive(Default)]
struct Gauges {
    running: usize,
    waiting: usize,
    kv: Option<KvStats>,
    admitted: u64,
    cached: u64,
}

pub struct Metrics {
    requests: AtomicU64,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    steps: AtomicU64,
    step_tokens: AtomicU64,
    finished: Mutex<std::collections::BTreeMap<String, u64>>,
    ttft: Mutex<Histogram>,
    itl: Mutex<Histogram>,
    gauges: Mutex<Gauges>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Metrics {
            requests: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            steps: AtomicU64::new(0),
            step_tokens: AtomicU64::new(0),
            finished: Mutex::new(Default::default()),
            ttft: Mutex::new(Histogram::new(LATENCY)),
            itl: Mutex::new(Histogram::new(LATENCY)),
            gauges: Mutex::new(Gauges::default()),
        }
    }

    pub fn request_started(&self, prompt_tokens: usize) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.prompt_tokens.fetch_add(prompt_tokens as u64, Ordering::Relaxed);
    }
    pub fn request_finished(&self, reason: &str) {
        *self.finished.lock().unwrap().entry(reason.to_string()).or_default() += 1;
    }
    pub fn generation_tokens(&self, n: u64) {
        self.generation_tokens.fetch_add(n, Ordering::Relaxed);
    }
    pub fn observe_step(&self, tokens: usize, _d: Duration) {
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.step_tokens.fetch_add(tokens as u64, Ordering::Relaxed);
    }
    pub fn observe_ttft(&self, d: Duration) {
        self.ttft.lock().unwrap().observe(d.as_secs_f64());
    }
    pub fn observe_itl(&self, d: Duration) {
        self.itl.lock().unwrap().observe(d.as_secs_f64());
    }
    pub fn set_gauges(&self, running: usize, waiting: usize, kv: KvStats) {
        let mut g = self.gauges.lock().unwrap();
        g.running = running;
        g.waiting = waiting;
        g.kv = Some(kv);
    }
    pub fn set_prefix_counts(&self, admitted: u64, cached: u64) {
        let mut g = self.gauges.lock().unwrap();
        g.admitted = admitted;
        g.cached = cached;
    }

    pub fn render(&self) -> String {
        let mut o = String::new();
        let counter = |o: &mut String, name: &str, help: &str, v: u64| {
            o.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"));
        };
        counter(&mut o, "engine_requests_total", "Requests received.", self.requests.load(Ordering::Relaxed));
        counter(&mut o, "engine_prompt_tokens_total", "Prompt tokens received.", self.prompt_tokens.load(Ordering::Relaxed));
        counter(&mut o, "engine_generation_tokens_total", "Tokens generated.", self.generation_tokens.load(Ordering::Relaxed));
        counter(&mut o, "engine_forward_steps_total", "Forward steps run.", self.steps.load(Ordering::Relaxed));
        o.push_str("# HELP engine_requests_finished_total Requests finished, by finish reason.\n# TYPE engine_requests_finished_total counter\n");
        for (k, v) in self.finished.lock().unwrap().iter() {
            o.push_str(&format!("engine_requests_finished_total{{finish_reason=\"{k}\"}} {v}\n"));
        }
        let g = self.gauges.lock().unwrap();
        let gauge = |o: &mut String, name: &str, help: &str, v: f64| {
            o.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"));
        };
        gauge(&mut o, "engine_num_running_reqs", "Requests in the running batch.", g.running as f64);
        gauge(&mut o, "engine_num_queue_reqs", "Requests waiting.", g.waiting as f64);
        if let Some(kv) = g.kv {
            gauge(&mut o, "engine_kv_cache_total_tokens", "KV pool size in tokens.", kv.total as f64);
            gauge(&mut o, "engine_kv_cache_free_tokens", "Free KV slots.", kv.free as f64);
            gauge(&mut o, "engine_kv_cache_used_tokens", "KV slots held by running requests.", kv.owned as f64);
            gauge(&mut o, "engine_kv_cache_cached_tokens", "KV slots held by the prefix cache.", kv.cached as f64);
            gauge(&mut o, "engine_kv_cache_usage", "Fraction of KV slots not free.", 1.0 - kv.free as f64 / kv.total.max(1) as f64);
        }
        let rate = if g.admitted == 0 { 0.0 } else { g.cached as f64 / g.admitted as f64 };
        counter(&mut o, "engine_prefix_cache_query_tokens_total", "Prompt tokens looked up in the prefix cache.", g.admitted);
        counter(&mut o, "engine_prefix_cache_hit_tokens_total", "Prompt tokens served from the prefix cache.", g.cached);
        gauge(&mut o, "engine_prefix_cache_hit_rate", "Hit tokens / query tokens.", rate);
        drop(g);
        self.ttft.lock().unwrap().render("engine_time_to_first_token_seconds", "Time to first token.", &mut o);
        self.itl.lock().unwrap().render("engine_inter_token_latency_seconds", "Time between output tokens.", &mut o);
        o
    }
}
