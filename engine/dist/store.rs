//! A minimal TCP key-value store for rendezvous (in the manner of torch.distributed's TCPStore).
//! Protocol, one request per line: `SET key hexvalue` → `OK`; `GET key` → `VAL hexvalue` once the
//! key exists (the server holds the reply until then); `ADD key n` → `VAL counter` (for barriers);
//! `DEL key` → `OK`.
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rank {rank}: timed out after {secs}s at step `{step}` (--dist-timeout)")]
    Timeout { rank: usize, step: String, secs: u64 },
    #[error("rank {rank}: step `{step}`: {msg}")]
    Io { rank: usize, step: String, msg: String },
}

#[derive(Default)]
struct State {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

fn serve_client(state: Arc<State>, stream: TcpStream, timeout: Duration) {
    stream.set_nodelay(true).ok();
    let Ok(read) = stream.try_clone() else { return };
    let mut w = stream;
    for line in BufReader::new(read).lines() {
        let Ok(line) = line else { return };
        let mut parts = line.splitn(3, ' ');
        let reply = match (parts.next(), parts.next(), parts.next()) {
            (Some("SET"), Some(k), Some(v)) => match unhex(v) {
                Some(v) => {
                    state.map.lock().unwrap().insert(k.to_string(), v);
                    state.changed.notify_all();
                    "OK".to_string()
                }
                None => "ERR bad value".into(),
            },
            (Some("GET"), Some(k), None) => {
                let deadline = Instant::now() + timeout;
                let mut map = state.map.lock().unwrap();
                loop {
                    if let Some(v) = map.get(k) {
                        break format!("VAL {}", hex(v));
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        break "ERR timeout".into();
                    }
                    map = state.changed.wait_timeout(map, deadline - now).unwrap().0;
                }
            }
            (Some("ADD"), Some(k), Some(n)) => {
                let n: i64 = n.parse().unwrap_or(0);
                let mut map = state.map.lock().unwrap();
                let cur = map.get(k).and_then(|v| std::str::from_utf8(v).ok()?.parse::<i64>().ok()).unwrap_or(0) + n;
                map.insert(k.to_string(), cur.to_string().into_bytes());
                state.changed.notify_all();
                format!("VAL {}", hex(cur.to_string().as_bytes()))
            }
            (Some("DEL"), Some(k), None) => {
                state.map.lock().unwrap().remove(k);
                "OK".to_string()
            }
            _ => "ERR bad request".into(),
        };
        if writeln!(w, "{reply}").is_err() {
            return;
        }
    }
}

/// A client of the store (rank 0 also runs the server).
pub struct TcpStore {
    rank: usize,
    timeout: Duration,
    conn: Mutex<(BufReader<TcpStream>, TcpStream)>,
    pub local_addr: Option<SocketAddr>,
}

impl TcpStore {
    /// Rank 0 binds `addr` and serves; every rank (0 included) then connects, retrying until
    /// `timeout` (other ranks may start before rank 0).
    /// Another connection to a running store (never hosts).
    pub fn connect(addr: &str, rank: usize, timeout: Duration) -> Result<TcpStore, StoreError> {
        Self::open(addr, rank, timeout, false)
    }

    pub fn start(addr: &str, rank: usize, timeout: Duration) -> Result<TcpStore, StoreError> {
        Self::open(addr, rank, timeout, rank == 0)
    }

    fn open(addr: &str, rank: usize, timeout: Duration, host: bool) -> Result<TcpStore, StoreError> {
        let io = |step: &str, msg: String| StoreError::Io { rank, step: step.into(), msg };
        let mut connect_to = addr.to_string();
        let mut local_addr = None;
        if host {
            let listener = TcpListener::bind(addr).map_err(|e| io("bind the store at --dist-init-addr", format!("{addr}: {e}")))?;
            let bound = listener.local_addr().map_err(|e| io("bind", e.to_string()))?;
            local_addr = Some(bound);
            connect_to = bound.to_string();
            let state = Arc::new(State::default());
            std::thread::Builder::new()
                .name("dist-store".into())
                .spawn(move || {
                    for s in listener.incoming().flatten() {
                        let st = state.clone();
                        std::thread::spawn(move || serve_client(st, s, timeout));
                    }
                })
                .map_err(|e| io("spawn the store", e.to_string()))?;
        }
        let deadline = Instant::now() + timeout;
        let target = connect_to
            .to_socket_addrs()
            .map_err(|e| io("resolve --dist-init-addr", format!("{connect_to}: {e}")))?
            .next()
            .ok_or_else(|| io("resolve --dist-init-addr", connect_to.clone()))?;
        let stream = loop {
            match TcpStream::connect_timeout(&target, Duration::from_millis(500)) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
                Err(_) => return Err(StoreError::Timeout { rank, step: format!("connect to the rendezvous store at {connect_to}"), secs: timeout.as_secs() }),
            }
        };
        stream.set_read_timeout(Some(timeout + Duration::from_secs(1))).ok();
        stream.set_nodelay(true).ok();
        let reader = BufReader::new(stream.try_clone().map_err(|e| io("connect", e.to_string()))?);
        Ok(TcpStore { rank, timeout, conn: Mutex::new((reader, stream)), local_addr })
    }

    fn request(&self, step: &str, line: &str) -> Result<String, StoreError> {
        let io = |msg: String| StoreError::Io { rank: self.rank, step: step.into(), msg };
        let mut c = self.conn.lock().unwrap();
        writeln!(c.1, "{line}").map_err(|e| io(format!("the store went away: {e}")))?;
        let mut reply = String::new();
        match c.0.read_line(&mut reply) {
            Ok(0) => Err(io("the store closed the connection (rank 0 gone?)".into())),
            Ok(_) => {
                let reply = reply.trim_end().to_string();
                if reply == "ERR timeout" {
                    Err(StoreError::Timeout { rank: self.rank, step: step.into(), secs: self.timeout.as_secs() })
                } else if let Some(e) = reply.strip_prefix("ERR ") {
                    Err(io(e.to_string()))
                } else {
                    Ok(reply)
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                Err(StoreError::Timeout { rank: self.rank, step: step.into(), secs: self.timeout.as_secs() })
            }
            Err(e) => Err(io(e.to_string())),
        }
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.request(&format!("set {key}"), &format!("SET {key} {}", hex(value))).map(|_| ())
    }

    pub fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.request(&format!("delete {key}"), &format!("DEL {key}")).map(|_| ())
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The value of `key`, waiting (bounded by the timeout) until some rank sets it.
    pub fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        let r = self.request(&format!("wait for {key}"), &format!("GET {key}"))?;
        // an empty value comes back as "VAL" (the reply line is trimmed)
        r.strip_prefix("VAL").map(str::trim_start).and_then(unhex).ok_or_else(|| StoreError::Io { rank: self.rank, step: format!("wait for {key}"), msg: format!("bad reply {r:?}") })
    }

    /// Blocks until `world` ranks have reached barrier `name` (bounded by the timeout).
    pub fn barrier(&self, name: &str, world: usize) -> Result<(), StoreError> {
        let step = format!("barrier {name}");
        self.request(&step, &format!("ADD barrier/{name} 1"))?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let r = self.request(&step, &format!("ADD barrier/{name} 0"))?;
            let n: usize = r.strip_prefix("VAL ").and_then(unhex).and_then(|v| String::from_utf8(v).ok()?.parse().ok()).unwrap_or(0);
            if n >= world {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(StoreError::Timeout { rank: self.rank, step: format!("{step} ({n} of {world} ranks arrived)"), secs: self.timeout.as_secs() });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_ranks_exchange_an_id_and_meet() {
        let t = Duration::from_secs(10);
        let r0 = TcpStore::start("127.0.0.1:0", 0, t).unwrap();
        let addr = r0.local_addr.unwrap().to_string();
        let others: Vec<_> = (1..4)
            .map(|rank| {
                let a = addr.clone();
                std::thread::spawn(move || {
                    let s = TcpStore::start(&a, rank, t).unwrap();
                    let id = s.get("nccl_id").unwrap();
                    s.barrier("init", 4).unwrap();
                    id
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        let id: Vec<u8> = (0..128).map(|i| i as u8).collect();
        r0.set("nccl_id", &id).unwrap();
        r0.barrier("init", 4).unwrap();
        for h in others {
            assert_eq!(h.join().unwrap(), id);
        }
    }

    #[test]
    fn a_missing_rank_times_out_naming_rank_and_step() {
        let t = Duration::from_secs(1);
        let r0 = TcpStore::start("127.0.0.1:0", 0, t).unwrap();
        let r1 = TcpStore::start(&r0.local_addr.unwrap().to_string(), 1, t).unwrap();
        let e = r1.get("nccl_id").unwrap_err().to_string();
        assert!(e.contains("rank 1") && e.contains("wait for nccl_id") && e.contains("timed out"), "{e}");
        let e = r0.barrier("weights-loaded", 3).unwrap_err().to_string();
        assert!(e.contains("rank 0") && e.contains("barrier weights-loaded") && e.contains("1 of 3"), "{e}");
    }

    #[test]
    fn no_store_at_the_address_times_out() {
        // a port nobody listens on (bound then released)
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let t0 = Instant::now();
        let e = TcpStore::start(&format!("127.0.0.1:{port}"), 3, Duration::from_secs(1)).err().unwrap().to_string();
        assert!(e.contains("rank 3") && e.contains("connect to the rendezvous store"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5));
    }
}
