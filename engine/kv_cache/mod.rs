//! The latent KV cache's bookkeeping: a pool of token slots (page size 1: one slot holds one token's
//! kv_lora_rank + qk_rope_head_dim latent for every layer), a radix-tree prefix cache that maps token
//! sequences to slots and knows nothing of allocation, and the manager that owns both.
//!
//! ```text
//!   total slots = free (pool) + owned (by running requests, not in the tree) + cached (in the tree)
//!                                                                  └ locked (in use) + evictable (LRU)
//! ```
mod manager;
mod pool;
mod radix;

pub use manager::{KvManager, KvStats};
pub use pool::SlotPool;
pub use radix::{NodeId, PrefixMatch, RadixCache};
