//! The engine thread: owns the model, the KV cache and the scheduler, and runs
//! schedule → forward → sample → send, one step after another. The HTTP layer talks to it only
//! through channels (`EngineHandle`).
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::{BatchItem, Event, RankSchedulers, Request, RequestSpec, SchedulerConfig};
use crate::backend::{AttnSeq, Backend, SampleRow};
use crate::kv_cache::KvStats;
use crate::metrics::Metrics;
use crate::model::{ForwardBatch, Model};
use crate::sampling::{apply_bias_and_min_tokens, apply_penalties, log_softmax, sample, top_logprobs};
use crate::tokenizer::Tokenizer;

/// Facts about the served model the HTTP layer needs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EngineInfo {
    pub model_path: String,
    pub vocab_size: usize,
    pub context_length: usize,
    pub max_total_tokens: usize,
    pub max_running_requests: usize,
    pub backend: &'static str,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EngineStats {
    pub kv: KvStats,
    pub running: usize,
    pub waiting: usize,
    pub retractions: u64,
    pub integrity: Result<(), String>,
    /// Per DP-attention rank: (running, waiting) requests (one entry without DP attention)
    pub per_rank: Vec<(usize, usize)>,
}

enum Command {
    Submit(Box<Request>),
    Abort(u64),
    Flush(oneshot::Sender<Result<usize, String>>),
    Stats(oneshot::Sender<EngineStats>),
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("{0}")]
    Invalid(String),
    #[error("the engine has stopped")]
    Stopped,
}

#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::UnboundedSender<Command>,
    pub info: Arc<EngineInfo>,
    pub tokenizer: Option<Arc<Tokenizer>>,
    pub metrics: Arc<Metrics>,
    next_id: Arc<std::sync::atomic::AtomicU64>,
}

impl EngineHandle {
    /// Validates and queues a request; events arrive on the returned receiver. Dropping the
    /// receiver aborts the request and frees its KV.
    pub fn submit(&self, spec: RequestSpec) -> Result<(u64, mpsc::UnboundedReceiver<Event>), SubmitError> {
        let info = &self.info;
        spec.params.validate().map_err(|e| SubmitError::Invalid(e.to_string()))?;
        if spec.input_ids.is_empty() {
            return Err(SubmitError::Invalid("the prompt is empty".into()));
        }
        if let Some(&t) = spec.input_ids.iter().find(|&&t| t as usize >= info.vocab_size) {
            return Err(SubmitError::Invalid(format!("token id {t} is outside the vocabulary (size {})", info.vocab_size)));
        }
        let p = &spec.params;
        if let Some(t) = p.stop_token_ids.iter().chain(p.logit_bias.iter().map(|b| &b.0)).find(|&&t| t as usize >= info.vocab_size) {
            return Err(SubmitError::Invalid(format!("token id {t} (stop_token_ids / logit_bias) is outside the vocabulary (size {})", info.vocab_size)));
        }
        let n = spec.input_ids.len();
        if n >= info.context_length {
            return Err(SubmitError::Invalid(format!("the prompt has {n} tokens, but the context length is {}", info.context_length)));
        }
        if n + spec.params.max_new_tokens > info.context_length {
            return Err(SubmitError::Invalid(format!(
                "the prompt ({n} tokens) plus max_new_tokens ({}) exceeds the context length of {}",
                spec.params.max_new_tokens, info.context_length
            )));
        }
        if n + spec.params.max_new_tokens > info.max_total_tokens {
            return Err(SubmitError::Invalid(format!(
                "the prompt ({n} tokens) plus max_new_tokens ({}) exceeds the KV cache of {} tokens (--max-total-tokens)",
                spec.params.max_new_tokens, info.max_total_tokens
            )));
        }
        if let Some(k) = spec.logprob_start_len {
            if spec.return_logprob && k >= n {
                return Err(SubmitError::Invalid(format!("logprob_start_len {k} must be less than the prompt length {n}")));
            }
        }
        let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        self.metrics.request_started(n);
        self.tx.send(Command::Submit(Box::new(Request::new(id, spec, tx)))).map_err(|_| SubmitError::Stopped)?;
        Ok((id, rx))
    }

    pub fn abort(&self, id: u64) {
        let _ = self.tx.send(Command::Abort(id));
    }

    pub async fn flush_cache(&self) -> Result<usize, String> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Flush(tx)).map_err(|_| "engine stopped".to_string())?;
        rx.await.map_err(|_| "engine stopped".to_string())?
    }

    pub async fn stats(&self) -> Option<EngineStats> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Stats(tx)).ok()?;
        rx.await.ok()
    }
}

/// Starts the engine thread for `model`.
pub fn spawn_engine<B: Backend>(
    model: Arc<Model<B>>,
    tokenizer: Option<Arc<Tokenizer>>,
    cfg: SchedulerConfig,
    max_total_tokens: usize,
    radix_cache: bool,
    model_path: String,
    context_length: usize,
) -> Result<EngineHandle, crate::model::ModelError> {
    let kv_cache = model.alloc_kv_cache(max_total_tokens)?;
    let mut eos = model.cfg.eos_token_ids.clone();
    if let Some(e) = tokenizer.as_ref().and_then(|t| t.eos_token_id()) {
        if !eos.contains(&e) {
            eos.push(e);
        }
    }
    let info = Arc::new(EngineInfo {
        model_path,
        vocab_size: model.cfg.vocab_size,
        context_length,
        max_total_tokens,
        max_running_requests: cfg.max_running_requests,
        backend: model.backend.name(),
        eos_token_ids: eos.clone(),
    });
    let metrics = Arc::new(Metrics::new());
    let (tx, rx) = mpsc::unbounded_channel();
    // one scheduler (KV pool, prefix cache) per DP-attention rank
    let sched = RankSchedulers::new(model.dp_size(), cfg, max_total_tokens, radix_cache);
    let m2 = metrics.clone();
    let tok2 = tokenizer.clone();
    std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || Runner { model, kv_cache, sched, tok: tok2, eos, metrics: m2 }.run(rx))
        .expect("spawn engine thread");
    Ok(EngineHandle { tx, info, tokenizer, metrics, next_id: Arc::new(std::sync::atomic::AtomicU64::new(1)) })
}

struct Runner<B: Backend> {
    model: Arc<Model<B>>,
    kv_cache: B::KvCache,
    sched: RankSchedulers,
    tok: Option<Arc<Tokenizer>>,
    eos: Vec<u32>,
    metrics: Arc<Metrics>,
}

impl<B: Backend> Runner<B> {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        loop {
            // Block while idle; otherwise take whatever has arrived.
            if self.sched.is_idle() {
                if let Err(e) = self.sched.check_integrity() {
                    log::error!("KV integrity check failed while idle: {e}");
                }
                self.publish_gauges();
                match rx.blocking_recv() {
                    Some(c) => self.handle(c),
                    None => return,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(c) => self.handle(c),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        if self.sched.is_idle() {
                            return;
                        }
                        break;
                    }
                }
            }
            self.drop_disconnected();
            let items = self.sched.schedule();
            self.publish_gauges();
            if items.iter().all(Vec::is_empty) {
                if !self.sched.is_idle() {
                    std::thread::sleep(Duration::from_millis(1));
                }
                continue;
            }
            if let Err(e) = self.step(&items) {
                log::error!("forward step failed: {e}");
                // fail every request of the batch, keep serving the others
                let mut ids: Vec<u64> = items.iter().enumerate().flat_map(|(rank, its)| its.iter().map(move |it| (rank, it.idx))).map(|(rank, i)| self.sched.0[rank].running[i].id).collect();
                ids.dedup();
                for id in ids {
                    if let Some(r) = self.sched.abort(id) {
                        let _ = r.out.send(Event::Error(format!("internal error: {e}")));
                        self.metrics.request_finished("abort");
                    }
                }
            }
        }
    }

    fn handle(&mut self, c: Command) {
        match c {
            Command::Submit(r) => {
                let id = r.id;
                let rank = self.sched.submit(*r);
                if self.sched.0.len() > 1 {
                    log::info!("request {id} → DP rank {rank}");
                }
            }
            Command::Abort(id) => {
                if let Some(mut r) = self.sched.abort(id) {
                    r.finish = Some(crate::runtime::FinishReason::Abort("aborted".into()));
                    let _ = r.out.send(Event::Done(r.output()));
                    self.metrics.request_finished("abort");
                }
            }
            Command::Flush(tx) => {
                let _ = tx.send(self.sched.flush());
            }
            Command::Stats(tx) => {
                let _ = tx.send(EngineStats {
                    kv: self.sched.kv_stats(),
                    running: self.sched.running(),
                    waiting: self.sched.waiting(),
                    retractions: self.sched.retractions(),
                    integrity: self.sched.check_integrity(),
                    per_rank: self.sched.0.iter().map(|s| (s.running.len(), s.waiting.len())).collect(),
                });
            }
        }
    }

    /// Requests whose client went away are aborted and their KV freed.
    fn drop_disconnected(&mut self) {
        let gone = self.sched.disconnected();
        for id in gone {
            log::info!("request {id}: client disconnected, aborting");
            self.sched.abort(id);
            self.metrics.request_finished("abort");
        }
    }

    fn publish_gauges(&self) {
        self.metrics.set_gauges(self.sched.running(), self.sched.waiting(), self.sched.kv_stats());
        let (admitted, cached) = self.sched.prefix_counts();
        self.metrics.set_prefix_counts(admitted, cached);
    }

    /// Runs one step: `items[rank]` is DP rank `rank`'s part of the batch (a single rank without
    /// DP attention). Logit rows are numbered over all ranks in rank order, as the model returns them.
    fn step(&mut self, items: &[Vec<BatchItem>]) -> Result<(), crate::model::ModelError> {
        let vocab = self.model.cfg.vocab_size;
        // per rank: tokens, positions, logit rows (rank-local token indices)
        let mut parts: Vec<(Vec<u32>, Vec<u32>, Vec<u32>)> = Vec::with_capacity(items.len());
        // per item, ranks in order: (rank, item, first global row of its input-logprob rows, how many, global sample row)
        let mut flat: Vec<(usize, BatchItem, usize, usize, Option<usize>)> = Vec::new();
        let mut global_rows = 0;
        for (rank, its) in items.iter().enumerate() {
            let (mut tokens, mut positions, mut logit_rows) = (Vec::new(), Vec::new(), Vec::new());
            for it in its {
                let r = &self.sched.0[rank].running[it.idx];
                let base = tokens.len();
                for p in it.start..it.start + it.len {
                    tokens.push(r.token_at(p));
                    positions.push(p as u32);
                }
                let first_lp = global_rows + logit_rows.len();
                let mut n_lp = 0;
                if !r.input_logprobs_done {
                    // logits at prompt positions [k, prompt_len - 1) give input logprobs of tokens k+1..
                    let k = r.spec.logprob_start_len.unwrap_or(0);
                    for p in it.start.max(k)..(it.start + it.len).min(r.prompt_len() - 1) {
                        logit_rows.push((base + p - it.start) as u32);
                        n_lp += 1;
                    }
                }
                let sample_row = it.samples(r).then(|| {
                    logit_rows.push((base + it.len - 1) as u32);
                    global_rows + logit_rows.len() - 1
                });
                flat.push((rank, it.clone(), first_lp, n_lp, sample_row));
            }
            global_rows += logit_rows.len();
            parts.push((tokens, positions, logit_rows));
        }
        let seqs: Vec<Vec<AttnSeq>> = items
            .iter()
            .enumerate()
            .map(|(rank, its)| {
                let mut q = 0;
                its.iter()
                    .map(|it| {
                        let r = &self.sched.0[rank].running[it.idx];
                        let s = AttnSeq { q_start: q, q_len: it.len, slots: &r.slots[..it.start + it.len] };
                        q += it.len;
                        s
                    })
                    .collect()
            })
            .collect();
        let batches: Vec<ForwardBatch> = parts.iter().zip(&seqs).map(|(p, s)| ForwardBatch { tokens: &p.0, positions: &p.1, seqs: s, logit_rows: &p.2 }).collect();
        let t0 = Instant::now();
        let out = if batches.len() == 1 { self.model.forward(&mut self.kv_cache, &batches[0])? } else { self.model.forward_dp(&mut self.kv_cache, &batches)? };
        let num_tokens: usize = parts.iter().map(|p| p.0.len()).sum();
        drop(batches);
        // Sample on the device when the backend can and no row needs host-side logprobs.
        // (and no row's logits take a bias or the min_new_tokens mask, applied on the host)
        let needs_host = flat.iter().any(|f| f.3 > 0)
            || flat.iter().any(|(rank, it, _, _, s)| {
                let r = &self.sched.0[*rank].running[it.idx];
                s.is_some() && (r.logprobs.is_some() || r.spec.params.adjusts_logits(r.output_ids.len()))
            });
        let mut device_ids = None;
        let mut out = out;
        if !needs_host && global_rows > 0 {
            let rows: Vec<SampleRow> = flat
                .iter()
                .filter(|f| f.4.is_some())
                .map(|(rank, it, ..)| {
                    let r = &self.sched.0[*rank].running[it.idx];
                    let p = &r.spec.params;
                    let penalties = if p.repetition_penalty != 1.0 || p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
                        let mut v: Vec<(u32, u32, bool)> = r.counts.output.iter().map(|(&t, &c)| (t, c, r.counts.prompt.contains_key(&t))).collect();
                        v.extend(r.counts.prompt.keys().filter(|t| !r.counts.output.contains_key(t)).map(|&t| (t, 0, true)));
                        v
                    } else {
                        vec![]
                    };
                    // drawn on the host from the request's own generator: a seed still reproduces
                    let mut rng = r.rng.clone();
                    let uniform = rng.uniform() as f32;
                    SampleRow { params: p, penalties, uniform }
                })
                .collect();
            device_ids = self.model.backend.sample(&mut out, &rows)?;
        }
        let logits = match (&device_ids, global_rows == 0) {
            (Some(_), _) | (None, true) => vec![],
            (None, false) => self.model.backend.download(&out)?,
        };
        drop(seqs);
        self.metrics.observe_step(num_tokens, t0.elapsed());

        let mut finished = Vec::new();
        for (rank, it, first_lp, n_lp, sample_row) in flat {
            let r = &mut self.sched.0[rank].running[it.idx];
            r.num_computed = it.start + it.len;
            if n_lp > 0 || (!r.input_logprobs_done && r.num_computed >= r.prompt_len().saturating_sub(1)) {
                record_input_logprobs(r, &logits, vocab, &it, first_lp, n_lp);
            }
            let Some(row) = sample_row else { continue };
            let (t, info) = match &device_ids {
                Some(ids) => {
                    r.rng.uniform(); // the draw the device used
                    (ids[row], None)
                }
                None => {
                    let mut l = logits[row * vocab..(row + 1) * vocab].to_vec();
                    let lp = r.logprobs.is_some().then(|| log_softmax(&l));
                    apply_penalties(&mut l, &r.spec.params, &r.counts);
                    apply_bias_and_min_tokens(&mut l, &r.spec.params, &self.eos, r.output_ids.len());
                    let t = sample(&l, &r.spec.params, &mut r.rng);
                    (t, lp.map(|ls| (ls[t as usize], top_logprobs(&ls, r.spec.top_logprobs_num))))
                }
            };
            let before = r.output_ids.len();
            let now = Instant::now();
            match r.last_token_at {
                None => self.metrics.observe_ttft(now - r.arrival),
                Some(prev) => self.metrics.observe_itl(now - prev),
            }
            r.last_token_at = Some(now);
            let done = r.push_token(self.tok.as_deref(), &self.eos, t, info);
            self.metrics.generation_tokens(1);
            let delta = r.take_delta(before);
            if r.out.send(delta).is_err() {
                log::info!("request {}: client disconnected, aborting", r.id);
                finished.push((rank, it.idx, false));
                continue;
            }
            if done {
                finished.push((rank, it.idx, true));
            }
        }
        // remove from the back so indices stay valid
        finished.sort_by_key(|x| std::cmp::Reverse((x.0, x.1)));
        for (rank, idx, completed) in finished {
            let r = self.sched.0[rank].finish(idx);
            if completed {
                let out = r.output();
                self.metrics.request_finished(out.finish_reason.openai());
                let _ = r.out.send(Event::Done(out));
            } else {
                self.metrics.request_finished("abort");
            }
        }
        Ok(())
    }
}

/// Stores the input logprobs computed in this chunk (rows `first..first+n` of `logits`).
fn record_input_logprobs(r: &mut Request, logits: &[f32], vocab: usize, it: &BatchItem, first: usize, n: usize) {
    let k = r.spec.logprob_start_len.unwrap_or(0);
    let top_n = r.spec.top_logprobs_num;
    let prompt_len = r.prompt_len();
    let input: Vec<u32> = r.spec.input_ids.clone();
    let Some(l) = r.logprobs.as_mut() else { return };
    if l.input_token_logprobs.is_empty() {
        l.input_token_logprobs.push((None, input[k]));
        l.input_top_logprobs.push(None);
    }
    let p0 = it.start.max(k);
    for j in 0..n {
        let p = p0 + j; // logits at position p predict token p + 1
        let ls = log_softmax(&logits[(first + j) * vocab..(first + j + 1) * vocab]);
        l.input_token_logprobs.push((Some(ls[input[p + 1] as usize]), input[p + 1]));
        l.input_top_logprobs.push(Some(top_logprobs(&ls, top_n)));
    }
    if r.num_computed >= prompt_len.saturating_sub(1) && l.input_token_logprobs.len() == prompt_len - k {
        r.input_logprobs_done = true;
    }
}
