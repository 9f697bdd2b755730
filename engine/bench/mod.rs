//! Benchmarks (`engine bench ...`): measured by running, never by timed tests.
pub mod one_batch;
pub mod serve;
