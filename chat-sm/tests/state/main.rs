//! Integration tests of `ChatState` through its public API only: scenario tests for apply,
//! reads, restart and snapshots, and proptest properties over random logs (`rings.rs`: ring
//! eviction under the memory budget; `retention.rs`: expiry of messages and dedup records).

mod common;
mod crash;
mod markers;
mod properties;
mod relations;
mod retention;
mod rings;
mod scenarios;
mod snapshots;
