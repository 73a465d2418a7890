//! cellchat's fault-injection harness: the history format, the checker, the report, and live
//! runs against real server processes.
//!
//! Contract:
//! - [`HistoryWriter`] records operations as JSON lines (`history.jsonl`), one flushed line per
//!   op, stamping `index` and `time`; [`History::read`] reads them back, rejecting a malformed
//!   line with its line number.
//! - [`check`] decides whether a history satisfies the guarantees of MISSION.md ("Guarantees")
//!   as specified in notes/jepsen.md §1.6: no acknowledged send lost on any node, exactly-once
//!   effect, one dense total order per channel, monotonic streams, read-your-writes, sends
//!   ordered consistently with real time, acknowledged deletes that stay deleted and
//!   acknowledged edits that stay visible. It runs in O(n log n) in the number of observations.
//! - [`report::write`] writes `results.json` and `report.html` (inline SVG plots).
//!
//! - [`live::run_live`] (`jepsen run`) starts a real cluster of `server` processes, drives the
//!   workload while the nemesis injects faults from a seeded schedule, heals, takes final
//!   reads from every node, checks, and writes the run directory.
//!
//! Non-goals: stale-read checks for reads not claimed linearizable (I8), monotonic writes per
//! session (I11), and Elle-style cycle search; every operation touches one channel, so the
//! direct checks suffice.

mod checker;
mod cli;
mod history;
pub mod live;
pub mod report;

pub use checker::{check, Anomaly, AnomalySummary, FCounts, Report, Stats, EXAMPLES_MAX};
pub use cli::{run, run_config, Cli, Command, RunArgs};
pub use history::{
    History, HistoryError, HistoryReader, HistoryWriter, Op, OpType, Process, ReadEntry, F_DELETE,
    F_EDIT, F_FINAL_READ, F_READ, F_RESUBSCRIBE, F_SEND,
};
