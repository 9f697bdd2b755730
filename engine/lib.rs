//! engine: an AMD-first inference server for DeepSeek V2/V3-class models.
//! See docs/ARCHITECTURE.md for the module map.
pub mod backend;
pub mod bench;
pub mod cli;
pub mod config;
pub mod dist;
pub mod kernels;
pub mod kv_cache;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod runtime;
pub mod sampling;
pub mod scheduler;
pub mod server;
pub mod synth;
pub mod tokenizer;
pub mod weights;
