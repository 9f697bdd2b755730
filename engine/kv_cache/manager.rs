//! The KV manager: the slot pool plus (unless disabled) the radix prefix cache, with the accounting
//! that lets it prove its integrity: free + owned + cached == total.
use super::{NodeId, PrefixMatch, RadixCache, SlotPool};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct KvStats {
    pub total: usize,
    pub free: usize,
    /// Held by running requests and not in the prefix cache.
    pub owned: usize,
    /// In the prefix cache (in use or evictable).
    pub cached: usize,
    pub evictable: usize,
}

#[derive(Debug)]
pub struct KvManager {
    pool: SlotPool,
    radix: Option<RadixCache>,
    owned: usize,
}

impl KvManager {
    pub fn new(total_slots: usize, radix: bool) -> Self {
        KvManager { pool: SlotPool::new(total_slots), radix: radix.then(RadixCache::new), owned: 0 }
    }

    pub fn radix_enabled(&self) -> bool {
        self.radix.is_some()
    }

    pub fn stats(&self) -> KvStats {
        KvStats {
            total: self.pool.total(),
            free: self.pool.num_free(),
            owned: self.owned,
            cached: self.radix.as_ref().map_or(0, RadixCache::total_size),
            evictable: self.radix.as_ref().map_or(0, RadixCache::evictable_size),
        }
    }

    /// Slots that could be handed out now (free plus evictable).
    pub fn available(&self) -> usize {
        self.pool.num_free() + self.radix.as_ref().map_or(0, RadixCache::evictable_size)
    }

    /// The cached prefix of `tokens`, locked until `release`. Empty when the cache is disabled.
    pub fn match_and_lock(&mut self, tokens: &[u32]) -> PrefixMatch {
        match self.radix.as_mut() {
            Some(r) => {
                let m = r.match_prefix(tokens);
                r.lock(m.node);
                m
            }
            None => PrefixMatch { slots: vec![], node: 0 },
        }
    }

    /// Drops the lock `match_and_lock` took (when the match goes unused).
    pub fn unlock(&mut self, node: NodeId) {
        if let Some(r) = self.radix.as_mut() {
            r.unlock(node);
        }
    }

    /// `n` new slots for a request, evicting cached prefixes if the pool runs short.
    pub fn alloc(&mut self, n: usize) -> Option<Vec<u32>> {
        if !self.pool.can_alloc(n) {
            if let Some(r) = self.radix.as_mut() {
                let freed = r.evict(n - self.pool.num_free());
                self.pool.free(&freed);
            }
        }
        let s = self.pool.alloc(n)?;
        self.owned += s.len();
        Some(s)
    }

    /// A request gives its KV back. `tokens[i]` has its latent in `slots[i]`; the first
    /// `prefix_len` slots came from the cache under `node`. With the cache enabled the tokens are
    /// inserted (so later requests share them); duplicates of what is already cached are freed.
    pub fn release(&mut self, tokens: &[u32], slots: &[u32], prefix_len: usize, node: NodeId) {
        debug_assert!(tokens.len() >= slots.len() || tokens.len() == slots.len());
        let n = slots.len().min(tokens.len());
        self.owned -= slots.len() - prefix_len;
        match self.radix.as_mut() {
            Some(r) => {
                let existing = r.insert(&tokens[..n], &slots[..n]);
                // slots[prefix_len..existing] duplicate what another request cached meanwhile
                if existing > prefix_len {
                    self.pool.free(&slots[prefix_len..existing]);
                }
                // slots past the tokens (allocated but never filled) go back too
                self.pool.free(&slots[n..]);
                r.unlock(node);
            }
            None => self.pool.free(&slots[prefix_len..]),
        }
    }

    /// Empties the prefix cache (only what no request uses).
    pub fn flush(&mut self) -> usize {
        match self.radix.as_mut() {
            Some(r) => {
                let freed = r.reset();
                self.pool.free(&freed);
                freed.len()
            }
            None => 0,
        }
    }

    /// free + owned + cached == total, no slot free twice, the tree consistent.
    pub fn check_integrity(&self) -> Result<(), String> {
        let s = self.stats();
        if s.free + s.owned + s.cached != s.total {
            return Err(format!("KV pool leak: free {} + owned {} + cached {} != total {}", s.free, s.owned, s.cached, s.total));
        }
        self.pool.check_no_duplicates()?;
        if let Some(r) = &self.radix {
            r.check_integrity()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_release_and_evict_keep_the_books() {
        let mut m = KvManager::new(10, true);
        let a = m.alloc(4).unwrap();
        m.check_integrity().unwrap();
        m.release(&[1, 2, 3, 4], &a, 0, 0);
        assert_eq!(m.stats().cached, 4);
        // a second request shares [1 2 3] and computes one more token
        let p = m.match_and_lock(&[1, 2, 3, 9]);
        assert_eq!(p.slots.len(), 3);
        let b = m.alloc(1).unwrap();
        let slots: Vec<u32> = p.slots.iter().copied().chain(b).collect();
        m.check_integrity().unwrap();
        // pool has 5 free, 4 cached (3 locked): 7 cannot be had, 6 evicts the unlocked leaf [4]
        assert!(m.alloc(7).is_none());
        let c = m.alloc(6).unwrap();
        assert_eq!(m.stats().cached, 3);
        m.check_integrity().unwrap();
        m.release(&[1, 2, 3, 9], &slots, 3, p.node);
        m.release(&[5, 6, 7, 8, 9, 10], &c, 0, 0);
        m.check_integrity().unwrap();
        assert_eq!(m.flush(), 10);
        assert_eq!(m.stats().free, 10);
        m.check_integrity().unwrap();
    }

    #[test]
    fn without_radix_everything_returns_to_the_pool() {
        let mut m = KvManager::new(8, false);
        let a = m.alloc(8).unwrap();
        assert!(m.alloc(1).is_none());
        m.release(&[1; 8], &a, 0, 0);
        assert_eq!(m.stats(), KvStats { total: 8, free: 8, owned: 0, cached: 0, evictable: 0 });
    }
}
