//! A lead rank's followers: the other ranks of its node (threads, over channels) and, on node 0
//! of a multi-node run, the other nodes (through the rendezvous store). The lead sends each job
//! to all of them, runs its own part, then collects every result, each wait bounded by
//! `--dist-timeout`. A watchdog ends the process when a step stalls past the timeout: a GPU
//! collective whose peer died never returns on its own.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Job, StoreError, TcpStore};

pub struct LocalFollower {
    pub rank: usize,
    pub tx: Sender<Job>,
    pub done: Mutex<Receiver<Result<(), String>>>,
}

/// The follower nodes, seen from node 0.
pub struct RemoteNodes {
    pub store: TcpStore,
    pub nnodes: usize,
    seq: AtomicU64,
}

impl RemoteNodes {
    pub fn new(store: TcpStore, nnodes: usize) -> Self {
        RemoteNodes { store, nnodes, seq: AtomicU64::new(0) }
    }
}

/// Ends the process at once, skipping exit handlers: the CUDA runtime's would wait for a device
/// still spinning in a collective whose peer is gone, and never return.
pub fn exit_now(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stderr().flush();
    let _ = std::io::stdout().flush();
    unsafe { libc::_exit(code) }
}

/// A step busy this long starts having its communicator checked for failed peers.
const PROBE_AFTER: Duration = Duration::from_secs(5);

/// A check of the communicator from another thread: Some(error) once a peer has failed.
pub type CommProbe = Box<dyn Fn() -> Option<String> + Send + Sync>;

/// Flags a step that has run longer than the timeout, or whose communicator reports a failed peer.
pub struct Watchdog {
    who: String,
    timeout: Duration,
    /// (since, step, extra time on top of the timeout)
    busy: Mutex<Option<(Instant, String, Duration)>>,
    probe: Mutex<Option<CommProbe>>,
}

impl Watchdog {
    pub fn start(who: String, timeout: Duration) -> Arc<Watchdog> {
        let w = Arc::new(Watchdog { who, timeout, busy: Mutex::new(None), probe: Mutex::new(None) });
        let weak = Arc::downgrade(&w);
        std::thread::Builder::new()
            .name("dist-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(500));
                let Some(w) = weak.upgrade() else { return };
                let busy = w.busy.lock().unwrap().as_ref().map(|(since, s, slack)| (since.elapsed().saturating_sub(*slack), s.clone()));
                // only for a step already slow (a healthy one finishes in milliseconds): NCCL
                // names a dead peer long before --dist-timeout would
                let slow = busy.as_ref().is_some_and(|(elapsed, _)| *elapsed > PROBE_AFTER);
                let failed = if slow { w.probe.lock().unwrap().as_ref().and_then(|p| p()) } else { None };
                if let (Some((_, step)), Some(e)) = (&busy, failed) {
                    eprintln!("error: {}: step `{step}`: the communicator reports a failed peer ({e}); exiting", w.who);
                    exit_now(1);
                }
                let stalled = busy.filter(|(elapsed, _)| *elapsed > w.timeout).map(|(_, s)| s);
                if let Some(step) = stalled {
                    eprintln!(
                            "error: {}: step `{step}` did not finish within --dist-timeout {}s (a peer rank or node has probably died); exiting",
                            w.who,
                            w.timeout.as_secs()
                        );
                    exit_now(1);
                }
            })
            .expect("spawn watchdog");
        w
    }
    /// From now on a slow step also checks the communicator (set once it is up).
    pub fn set_probe(&self, probe: Option<CommProbe>) {
        *self.probe.lock().unwrap() = probe;
    }
    pub fn enter(&self, step: String) {
        self.enter_with_slack(step, Duration::ZERO);
    }
    /// A step whose own waits are bounded by the timeout already: the watchdog gives them `slack`
    /// to report first, with their more precise message.
    pub fn enter_with_slack(&self, step: String, slack: Duration) {
        *self.busy.lock().unwrap() = Some((Instant::now(), step, slack));
    }
    pub fn leave(&self) {
        *self.busy.lock().unwrap() = None;
    }
}

pub struct Group {
    pub rank: usize,
    pub locals: Vec<LocalFollower>,
    pub remote: Option<RemoteNodes>,
    pub timeout: Duration,
    pub watchdog: Arc<Watchdog>,
}

fn store_msg(e: StoreError) -> String {
    e.to_string()
}

impl Group {
    /// Sends `job` to every follower.
    pub fn dispatch(&self, job: &Job) -> Result<(), String> {
        for f in &self.locals {
            f.tx.send(job.clone()).map_err(|_| format!("rank {}: its thread has stopped", f.rank))?;
        }
        if let Some(r) = &self.remote {
            let seq = r.seq.load(Ordering::SeqCst);
            r.store.set(&format!("job/{seq}"), &job.encode()).map_err(store_msg)?;
            if seq >= 2 {
                // every node acknowledged seq - 1, so all have read seq - 2
                r.store.delete(&format!("job/{}", seq - 2)).map_err(store_msg)?;
            }
        }
        Ok(())
    }

    /// Tells follower nodes the lead is done, so they exit cleanly, and waits briefly for their
    /// acknowledgements: node 0 hosts the store, and exiting takes it away (a follower that misses
    /// the stop still exits, with an error, when the store goes).
    pub fn stop(&self) {
        let Some(r) = &self.remote else { return };
        let seq = r.seq.load(Ordering::SeqCst);
        if let Err(e) = r.store.set(&format!("job/{seq}"), &Job::Stop.encode()) {
            log::warn!("could not tell the follower nodes to stop: {e}");
            return;
        }
        let Some(addr) = r.store.local_addr else { return };
        let (tx, rx) = std::sync::mpsc::channel();
        let (nnodes, rank, timeout) = (r.nnodes, r.store.rank(), r.store.timeout());
        // its own connection, so a node that never answers leaves nothing blocked behind it
        std::thread::spawn(move || {
            if let Ok(s) = TcpStore::connect(&addr.to_string(), rank, timeout) {
                for node in 1..nnodes {
                    let _ = s.get(&format!("ack/{seq}/{node}"));
                }
            }
            let _ = tx.send(());
        });
        if rx.recv_timeout(Duration::from_secs(10)).is_err() {
            log::warn!("follower nodes did not acknowledge the stop within 10s");
        }
    }

    /// Waits for every follower's result of the last job.
    pub fn collect(&self) -> Result<(), String> {
        let mut first_err = None;
        for f in &self.locals {
            let r = match f.done.lock().unwrap().recv_timeout(self.timeout) {
                Ok(r) => r,
                Err(RecvTimeoutError::Timeout) => Err(format!("rank {}: no result within --dist-timeout {}s", f.rank, self.timeout.as_secs())),
                Err(RecvTimeoutError::Disconnected) => Err(format!("rank {}: its thread has stopped", f.rank)),
            };
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        if let Some(r) = &self.remote {
            let seq = r.seq.fetch_add(1, Ordering::SeqCst);
            for node in 1..r.nnodes {
                let key = format!("ack/{seq}/{node}");
                let v = r.store.get(&key).map_err(|e| format!("node {node}: {e}"))?;
                r.store.delete(&key).map_err(store_msg)?;
                if !v.is_empty() {
                    first_err.get_or_insert(format!("node {node}: {}", String::from_utf8_lossy(&v)));
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// A follower node's side: the jobs node 0 posts, in order, and the acknowledgements.
pub struct JobFeed {
    pub store: TcpStore,
    pub node: usize,
    seq: u64,
}

impl JobFeed {
    pub fn new(store: TcpStore, node: usize) -> Self {
        JobFeed { store, node, seq: 0 }
    }

    /// The next job; waits as long as node 0 is alive (an idle server posts nothing for a while).
    pub fn next_job(&mut self) -> Result<Job, String> {
        let key = format!("job/{}", self.seq);
        loop {
            match self.store.get(&key) {
                Ok(v) => return Job::decode(&v),
                Err(StoreError::Timeout { .. }) => continue,
                Err(e) => return Err(format!("node 0 went away: {e}")),
            }
        }
    }

    /// Reports the result of the current job (an empty value is success).
    pub fn ack(&mut self, r: Result<(), String>) -> Result<(), String> {
        let v = r.err().unwrap_or_default();
        self.store.set(&format!("ack/{}/{}", self.seq, self.node), v.as_bytes()).map_err(|e| format!("node 0 went away: {e}"))?;
        self.seq += 1;
        Ok(())
    }
}
