//! Distributed serving (multi-GPU / multi-node): flags, the rendezvous store, host collectives,
//! and the lead → follower job protocol. Rank 0 hosts a small TCP
//! key-value store at `--dist-init-addr`; the other ranks connect to it to exchange the
//! communicator id and to meet at barriers. Every wait is bounded by `--dist-timeout` and fails
//! with an error naming the rank and the step that timed out.
mod args;
mod group;
mod host_comm;
mod job;
mod store;

pub use args::{DistArgs, ParallelConfig};
pub use group::{exit_now, CommProbe, Group, JobFeed, LocalFollower, RemoteNodes, Watchdog};
pub use job::{Job, OwnedBatch};

pub use host_comm::{CommError, HostComm, LocalGroup, StoreComm};
pub use store::{StoreError, TcpStore};
