//! One scheduler per DP-attention rank (a single one otherwise). Each rank has its own KV pool and
//! prefix cache, matching its own KV cache on its GPU; a new request goes to the rank with the
//! fewest running + waiting requests (SGLang's shortest-queue balancing), the lower rank on ties.
use super::{BatchItem, Request, Scheduler, SchedulerConfig};
use crate::kv_cache::{KvManager, KvStats};

pub struct RankSchedulers(pub Vec<Scheduler>);

impl RankSchedulers {
    pub fn new(ranks: usize, cfg: SchedulerConfig, pool: usize, radix_cache: bool) -> Self {
        RankSchedulers((0..ranks.max(1)).map(|_| Scheduler::new(cfg.clone(), KvManager::new(pool, radix_cache))).collect())
    }

    pub fn is_idle(&self) -> bool {
        self.0.iter().all(Scheduler::is_idle)
    }

    /// Queues `r` on the least loaded rank; returns the rank.
    pub fn submit(&mut self, r: Request) -> usize {
        let rank = (0..self.0.len()).min_by_key(|&i| (self.0[i].running.len() + self.0[i].waiting.len(), i)).unwrap_or(0);
        self.0[rank].waiting.push_back(r);
        rank
    }

    pub fn abort(&mut self, id: u64) -> Option<Request> {
        self.0.iter_mut().find_map(|s| s.abort(id))
    }

    pub fn schedule(&mut self) -> Vec<Vec<BatchItem>> {
        self.0.iter_mut().map(Scheduler::schedule).collect()
    }

    /// Ids of requests whose client has gone away.
    pub fn disconnected(&self) -> Vec<u64> {
        self.0.iter().flat_map(|s| s.running.iter().chain(s.waiting.iter())).filter(|r| r.out.is_closed()).map(|r| r.id).collect()
    }

    pub fn running(&self) -> usize {
        self.0.iter().map(|s| s.running.len()).sum()
    }

    pub fn waiting(&self) -> usize {
        self.0.iter().map(|s| s.waiting.len()).sum()
    }

    pub fn retractions(&self) -> u64 {
        self.0.iter().map(|s| s.num_retractions).sum()
    }

    /// (prompt tokens admitted, of which from the prefix cache)
    pub fn prefix_counts(&self) -> (u64, u64) {
        self.0.iter().fold((0, 0), |a, s| (a.0 + s.num_admitted_tokens, a.1 + s.num_cached_tokens))
    }

    /// KV statistics summed over the ranks.
    pub fn kv_stats(&self) -> KvStats {
        let mut t = KvStats { total: 0, free: 0, owned: 0, cached: 0, evictable: 0 };
        for s in &self.0 {
            let k = s.kv.stats();
            t.total += k.total;
            t.free += k.free;
            t.owned += k.owned;
            t.cached += k.cached;
            t.evictable += k.evictable;
        }
        t
    }

    pub fn check_integrity(&self) -> Result<(), String> {
        for (rank, s) in self.0.iter().enumerate() {
            s.kv.check_integrity().map_err(|e| if self.0.len() > 1 { format!("DP rank {rank}: {e}") } else { e })?;
        }
        Ok(())
    }

    /// Empties every rank's prefix cache; only when idle.
    pub fn flush(&mut self) -> Result<usize, String> {
        if !self.is_idle() {
            return Err(format!("{} running and {} waiting requests: the cache is flushed only when idle", self.running(), self.waiting()));
        }
        Ok(self.0.iter_mut().map(|s| s.kv.flush()).sum())
    }
}
