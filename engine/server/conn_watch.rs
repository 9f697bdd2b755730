//! Noticing that a client hung up while its request is still being computed. hyper's HTTP/1
//! server does not read the socket while a handler is pending, so a non-streaming request would
//! otherwise run to its end after the client left. A watcher holds a duplicate of the socket and
//! peeks at it: end-of-file or a reset marks the connection closed, and waiting handlers give up,
//! which drops their requests and so aborts them in the engine.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Default)]
pub struct ConnWatch {
    closed: AtomicBool,
    notify: Notify,
}

impl ConnWatch {
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Resolves once the peer has hung up.
    pub async fn closed(&self) {
        loop {
            let n = self.notify.notified();
            if self.is_closed() {
                return;
            }
            n.await;
        }
    }

    fn set_closed(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }
}

/// Splits an accepted stream into the one hyper serves and a watcher task over a duplicate.
pub fn watch(stream: tokio::net::TcpStream) -> std::io::Result<(tokio::net::TcpStream, Arc<ConnWatch>, tokio::task::JoinHandle<()>)> {
    let std = stream.into_std()?;
    let dup = std.try_clone()?;
    let served = tokio::net::TcpStream::from_std(std)?;
    let peer = tokio::net::TcpStream::from_std(dup)?;
    let state = Arc::new(ConnWatch::default());
    let s2 = state.clone();
    let task = tokio::spawn(async move {
        let mut buf = [0u8; 1];
        loop {
            match peer.peek(&mut buf).await {
                Ok(0) | Err(_) => break,
                // a pipelined request is waiting: hyper will read it; look again later
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        s2.set_closed();
    });
    Ok((served, state, task))
}
