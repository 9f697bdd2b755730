//! Collectives over host memory for the CPU backend: `LocalGroup` joins threads of one process,
//! `StoreComm` joins processes (or nodes) through the rendezvous store. GPU backends use NCCL/RCCL
//! instead; these exist so tensor parallelism runs, and is tested, on machines with no GPU.
//! Every wait is bounded by `--dist-timeout` and fails naming the rank and the collective.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::TcpStore;

#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("rank {rank}: timed out after {secs}s in {step} (--dist-timeout; a peer may have died)")]
    Timeout { rank: usize, step: String, secs: u64 },
    #[error("rank {rank}: {step}: {msg}")]
    Failed { rank: usize, step: String, msg: String },
}

/// A collective group over host f32 buffers. Every rank calls the same collectives in the same order.
pub trait HostComm: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Elementwise sum over the group, in place (the sum is taken in rank order on every rank,
    /// so all ranks hold bit-identical results).
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), CommError>;
    /// Every rank's `data` (equal lengths), concatenated in rank order.
    fn all_gather(&self, data: &[f32]) -> Result<Vec<f32>, CommError>;
}

fn combine(parts: &[Vec<f32>], sum: bool) -> Vec<f32> {
    if sum {
        let mut acc = parts[0].clone();
        for p in &parts[1..] {
            acc.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
        acc
    } else {
        parts.concat()
    }
}

#[derive(Default)]
struct Round {
    seq: u64,
    parts: Vec<Option<Vec<f32>>>,
    arrived: usize,
    result: Option<Vec<f32>>,
    readers: usize,
}

struct Shared {
    size: usize,
    timeout: Duration,
    round: Mutex<Round>,
    cv: Condvar,
}

/// The threads of one process as a group: `LocalGroup::new(n, timeout)` gives one member per rank.
pub struct LocalGroup {
    rank: usize,
    shared: Arc<Shared>,
}

impl LocalGroup {
    pub fn new(size: usize, timeout: Duration) -> Vec<LocalGroup> {
        let shared = Arc::new(Shared { size, timeout, round: Mutex::new(Round { parts: vec![None; size], ..Default::default() }), cv: Condvar::new() });
        (0..size).map(|rank| LocalGroup { rank, shared: shared.clone() }).collect()
    }

    fn collective(&self, data: &[f32], sum: bool, what: &str) -> Result<Vec<f32>, CommError> {
        let s = &self.shared;
        let deadline = Instant::now() + s.timeout;
        let timeout = |seq: u64, r: &Round| CommError::Timeout {
            rank: self.rank,
            step: format!("{what} #{seq} ({} of {} ranks arrived)", r.arrived, s.size),
            secs: s.timeout.as_secs(),
        };
        let left = || deadline.saturating_duration_since(Instant::now());
        // wait until everyone has read the previous round
        let (mut g, w) = s.cv.wait_timeout_while(s.round.lock().unwrap(), left(), |r| r.result.is_some() || r.parts[self.rank].is_some()).unwrap();
        if w.timed_out() {
            return Err(timeout(g.seq, &g));
        }
        let seq = g.seq;
        g.parts[self.rank] = Some(data.to_vec());
        g.arrived += 1;
        if g.arrived == s.size {
            let parts: Vec<Vec<f32>> = g.parts.iter_mut().map(|p| p.take().unwrap()).collect();
            if parts.iter().any(|p| p.len() != parts[0].len()) {
                return Err(CommError::Failed { rank: self.rank, step: format!("{what} #{seq}"), msg: "ranks passed buffers of different lengths".into() });
            }
            g.result = Some(combine(&parts, sum));
            g.readers = s.size;
            s.cv.notify_all();
        }
        let (mut g, w) = s.cv.wait_timeout_while(g, left(), |r| r.result.is_none() || r.seq != seq).unwrap();
        if w.timed_out() {
            return Err(timeout(seq, &g));
        }
        let out = g.result.as_ref().unwrap().to_vec();
        g.readers -= 1;
        if g.readers == 0 {
            g.result = None;
            g.arrived = 0;
            g.seq += 1;
            s.cv.notify_all();
        }
        Ok(out)
    }
}

impl HostComm for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.shared.size
    }
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), CommError> {
        let r = self.collective(data, true, "all_reduce")?;
        data.copy_from_slice(&r);
        Ok(())
    }
    fn all_gather(&self, data: &[f32]) -> Result<Vec<f32>, CommError> {
        self.collective(data, false, "all_gather")
    }
}

/// Processes (possibly on other hosts) as a group, exchanging buffers through the rendezvous
/// store: each rank posts `cc/{seq}/{rank}` and reads the others'. Slow, but it needs nothing
/// beyond TCP; the CPU backend uses it for multi-node runs.
pub struct StoreComm {
    rank: usize,
    size: usize,
    store: Arc<TcpStore>,
    seq: AtomicU64,
}

impl StoreComm {
    pub fn new(store: Arc<TcpStore>, rank: usize, size: usize) -> Self {
        StoreComm { rank, size, store, seq: AtomicU64::new(0) }
    }

    fn collective(&self, data: &[f32], sum: bool) -> Result<Vec<f32>, CommError> {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        let map = |e: super::StoreError| match e {
            super::StoreError::Timeout { rank, step, secs } => CommError::Timeout { rank, step: format!("collective #{seq}: {step}"), secs },
            super::StoreError::Io { rank, step, msg } => CommError::Failed { rank, step: format!("collective #{seq}: {step}"), msg },
        };
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.store.set(&format!("cc/{seq}/{}", self.rank), &bytes).map_err(map)?;
        let mut parts = Vec::with_capacity(self.size);
        for r in 0..self.size {
            let v = if r == self.rank { bytes.clone() } else { self.store.get(&format!("cc/{seq}/{r}")).map_err(map)? };
            if v.len() != bytes.len() {
                return Err(CommError::Failed { rank: self.rank, step: format!("collective #{seq}"), msg: format!("rank {r} sent {} bytes, this rank {}", v.len(), bytes.len()) });
            }
            parts.push(v.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect());
        }
        // every rank has posted `seq - 1`, so all have finished reading `seq - 2`
        if seq >= 2 {
            self.store.delete(&format!("cc/{}/{}", seq - 2, self.rank)).map_err(map)?;
        }
        Ok(combine(&parts, sum))
    }
}

impl HostComm for StoreComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), CommError> {
        let r = self.collective(data, true)?;
        data.copy_from_slice(&r);
        Ok(())
    }
    fn all_gather(&self, data: &[f32]) -> Result<Vec<f32>, CommError> {
        self.collective(data, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_group(members: Vec<Box<dyn HostComm>>) {
        let n = members.len();
        let handles: Vec<_> = members
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || {
                    for round in 0..20 {
                        let r = c.rank();
                        let mut v: Vec<f32> = (0..5).map(|i| (r * 100 + i + round) as f32 * 0.5).collect();
                        c.all_reduce_sum(&mut v).unwrap();
                        let want: Vec<f32> = (0..5).map(|i| (0..n).map(|q| (q * 100 + i + round) as f32 * 0.5).sum()).collect();
                        assert_eq!(v, want, "round {round} rank {r}");
                        let g = c.all_gather(&[r as f32, round as f32]).unwrap();
                        let want: Vec<f32> = (0..n).flat_map(|q| [q as f32, round as f32]).collect();
                        assert_eq!(g, want);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn local_group_sums_and_gathers_in_rank_order() {
        run_group(LocalGroup::new(3, Duration::from_secs(10)).into_iter().map(|g| Box::new(g) as Box<dyn HostComm>).collect());
    }

    #[test]
    fn store_comm_sums_and_gathers_across_connections() {
        let t = Duration::from_secs(10);
        let s0 = Arc::new(TcpStore::start("127.0.0.1:0", 0, t).unwrap());
        let addr = s0.local_addr.unwrap().to_string();
        let mut m: Vec<Box<dyn HostComm>> = vec![Box::new(StoreComm::new(s0, 0, 2))];
        m.push(Box::new(StoreComm::new(Arc::new(TcpStore::start(&addr, 1, t).unwrap()), 1, 2)));
        run_group(m);
    }

    #[test]
    fn a_missing_rank_times_out_naming_it() {
        let mut g = LocalGroup::new(2, Duration::from_millis(300));
        let g0 = g.remove(0);
        let t0 = Instant::now();
        let e = g0.all_reduce_sum(&mut [1.0]).unwrap_err().to_string();
        assert!(e.contains("rank 0") && e.contains("all_reduce #0") && e.contains("1 of 2"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(3));
    }
}
