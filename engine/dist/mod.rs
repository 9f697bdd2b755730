//! Distributed start-up (multi-GPU / multi-node): the rendezvous store. Rank 0 hosts a small TCP
//! key-value store at `--dist-init-addr`; the other ranks connect to it to exchange the
//! communicator id and to meet at barriers. Every wait is bounded by `--dist-timeout` and fails
//! with an error naming the rank and the step that timed out.
mod store;

pub use store::{StoreError, TcpStore};
