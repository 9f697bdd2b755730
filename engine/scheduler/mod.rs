//! Continuous batching. `Scheduler::schedule()` returns the next batch as data; the runner executes
//! it and hands the results back. Every request, whether prefilling, decoding or resuming after a
//! retraction, is "compute tokens[num_computed..] in chunks; sample when the chunk reaches the end".
mod ranks;
mod request;
mod runner;

pub use ranks::RankSchedulers;

pub use request::{Event, Request, RequestSpec};
pub use runner::{spawn_engine, EngineHandle, EngineInfo, EngineStats, SubmitError};

use std::collections::VecDeque;

use crate::kv_cache::KvManager;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchedulePolicy {
    /// First come, first served.
    Fcfs,
    /// Longest cached prefix first (SGLang's lpm).
    Lpm,
}

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub max_running_requests: usize,
    /// Token budget of one step (prefill chunks and decode tokens together).
    pub chunked_prefill_size: usize,
    pub policy: SchedulePolicy,
}

/// Part of a request computed in this step: tokens `start .. start + len` of its sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchItem {
    /// Index into `Scheduler::running`.
    pub idx: usize,
    pub start: usize,
    pub len: usize,
}

impl BatchItem {
    /// Whether this chunk completes the known tokens, so the request samples its next token.
    pub fn samples(&self, r: &Request) -> bool {
        self.start + self.len == r.num_tokens()
    }
}

pub struct Scheduler {
    pub cfg: SchedulerConfig,
    pub waiting: VecDeque<Request>,
    pub running: Vec<Request>,
    pub kv: KvManager,
    pub num_retractions: u64,
    /// Prompt tokens admitted, and how many of them came from the prefix cache.
    pub num_admitted_tokens: u64,
    pub num_cached_tokens: u64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, kv: KvManager) -> Self {
        Scheduler { cfg, waiting: VecDeque::new(), running: vec![], kv, num_retractions: 0, num_admitted_tokens: 0, num_cached_tokens: 0 }
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Gives a request's KV back (into the prefix cache when enabled) and resets its progress.
    fn release_kv(&mut self, r: &mut Request) {
        let tokens = r.tokens();
        let computed = r.num_computed.min(r.slots.len());
        // only computed tokens may enter the cache; the rest of the slots are just freed
        self.kv.release(&tokens[..computed], &r.slots, r.prefix_len, r.cache_node);
        r.slots.clear();
        r.num_computed = 0;
        r.prefix_len = 0;
        r.cache_node = 0;
    }

    /// Removes running request `idx` for good (finished or aborted).
    pub fn finish(&mut self, idx: usize) -> Request {
        let mut r = self.running.remove(idx);
        self.release_kv(&mut r);
        r
    }

    /// Removes a request wherever it is; returns it.
    pub fn abort(&mut self, id: u64) -> Option<Request> {
        if let Some(i) = self.running.iter().position(|r| r.id == id) {
            return Some(self.finish(i));
        }
        let i = self.waiting.iter().position(|r| r.id == id)?;
        self.waiting.remove(i)
    }

    /// Preempts the newest running request: its KV goes back (cached), it waits at the front.
    fn retract_newest(&mut self) {
        let mut r = self.running.pop().expect("retract with nothing running");
        if !r.input_logprobs_done {
            // recomputed from the start on resumption
            if let Some(l) = r.logprobs.as_mut() {
                l.input_token_logprobs.clear();
                l.input_top_logprobs.clear();
            }
        }
        log::info!("KV cache full: retracting request {} ({} tokens computed); it will resume", r.id, r.num_computed);
        self.release_kv(&mut r);
        self.num_retractions += 1;
        self.waiting.push_front(r);
    }

    /// Ensures running request `idx` has slots for `n` tokens past num_computed.
    fn grow(&mut self, idx: usize, n: usize) -> bool {
        let r = &self.running[idx];
        let need = (r.num_computed + n).saturating_sub(r.slots.len());
        if need == 0 {
            return true;
        }
        match self.kv.alloc(need) {
            Some(s) => {
                self.running[idx].slots.extend(s);
                true
            }
            None => false,
        }
    }

    pub fn schedule(&mut self) -> Vec<BatchItem> {
        let mut items = Vec::new();
        let mut budget = self.cfg.chunked_prefill_size;
        let mut i = 0;
        while i < self.running.len() {
            let r = &self.running[i];
            let remaining = r.num_tokens() - r.num_computed;
            // decodes always run; prefill chunks take what is left of the budget
            let n = if remaining == 1 { 1 } else { remaining.min(budget) };
            if n == 0 {
                i += 1;
                continue;
            }
            if self.grow(i, n) {
                items.push(BatchItem { idx: i, start: self.running[i].num_computed, len: n });
                budget = budget.saturating_sub(n);
                i += 1;
            } else if self.running.len() == 1 {
                // alone and still does not fit: nothing to preempt (admission prevents this)
                log::error!("request {} does not fit in the KV pool", self.running[0].id);
                break;
            } else {
                let last = self.running.len() - 1;
                self.retract_newest();
                if last == i {
                    break;
                }
            }
        }
        self.admit(&mut items, budget);
        items
    }

    fn admit(&mut self, items: &mut Vec<BatchItem>, mut budget: usize) {
        if self.cfg.policy == SchedulePolicy::Lpm && self.waiting.len() > 1 && self.kv.radix_enabled() {
            // longest cached prefix first; match lengths are measured without locking
            let mut scored: Vec<(usize, Request)> = self
                .waiting
                .drain(..)
                .map(|r| {
                    let m = self.kv.match_and_lock(&r.tokens()[..r.max_cached_prefix()]);
                    self.kv.unlock(m.node);
                    (m.slots.len(), r)
                })
                .collect();
            scored.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.arrival.cmp(&b.1.arrival)));
            self.waiting = scored.into_iter().map(|x| x.1).collect();
        }
        while budget > 0 && self.running.len() < self.cfg.max_running_requests {
            let Some(mut r) = self.waiting.pop_front() else { break };
            let tokens = r.tokens();
            let m = self.kv.match_and_lock(&tokens[..r.max_cached_prefix()]);
            let remaining = tokens.len() - m.slots.len();
            // admit only if the whole remaining sequence can get KV now (plus one decode slot)
            if self.kv.available() < remaining + 1 {
                self.kv.unlock(m.node);
                self.waiting.push_front(r);
                break;
            }
            let n = remaining.min(budget);
            let Some(new) = self.kv.alloc(n) else {
                self.kv.unlock(m.node);
                self.waiting.push_front(r);
                break;
            };
            self.num_admitted_tokens += tokens.len() as u64;
            self.num_cached_tokens += m.slots.len() as u64;
            r.prefix_len = m.slots.len();
            r.num_computed = m.slots.len();
            r.cache_node = m.node;
            r.slots = m.slots;
            r.slots.extend(new);
            items.push(BatchItem { idx: self.running.len(), start: r.num_computed, len: n });
            self.running.push(r);
            budget -= n;
        }
    }
}
