//! Integration tests of `ChatState` through its public API only: scenario tests for apply,
//! reads, restart and snapshots, and proptest properties over random logs.

mod common;
mod properties;
mod scenarios;
mod snapshots;
