//! A free list of KV slots.
#[derive(Debug)]
pub struct SlotPool {
    total: usize,
    free: Vec<u32>,
}

impl SlotPool {
    pub fn new(total: usize) -> Self {
        SlotPool { total, free: (0..total as u32).rev().collect() }
    }
    pub fn total(&self) -> usize {
        self.total
    }
    pub fn num_free(&self) -> usize {
        self.free.len()
    }
    pub fn can_alloc(&self, n: usize) -> bool {
        self.free.len() >= n
    }
    /// `n` slots, or None (nothing taken) when fewer are free.
    pub fn alloc(&mut self, n: usize) -> Option<Vec<u32>> {
        if !self.can_alloc(n) {
            return None;
        }
        Some(self.free.split_off(self.free.len() - n))
    }
    pub fn free(&mut self, slots: &[u32]) {
        debug_assert!(slots.iter().all(|&s| (s as usize) < self.total));
        self.free.extend_from_slice(slots);
        debug_assert!(self.free.len() <= self.total, "slot pool over-freed");
    }
    /// Every slot appears at most once in the free list.
    pub fn check_no_duplicates(&self) -> Result<(), String> {
        let mut seen = vec![false; self.total];
        for &s in &self.free {
            if std::mem::replace(&mut seen[s as usize], true) {
                return Err(format!("slot {s} is free twice"));
            }
        }
        Ok(())
    }
}
