//! The metrics the storage and replication layers record themselves (fsync, apply and
//! AppendEntries latency, snapshot time), apart from `metrics.rs` so the state machine, the log
//! and the Raft network depend on nothing above them.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

/// Latency buckets doubling from 50 us: 16 reach ~1.6 s (RPCs); storage latencies get 18
/// (~6.6 s), since a stalled disk stretches them by orders of magnitude and alerts need the tail.
pub(crate) fn latency_histogram(buckets: u16) -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, buckets))
}

/// Buckets for counts of items per batch: 1 to 2048.
pub(crate) fn count_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 12))
}

/// The metrics storage and replication record themselves: made before the log, the state
/// machine and the Raft network open, so each can hold its part, and registered with the rest
/// by [`Metrics::new`]. Clones share the series.
#[derive(Clone)]
pub struct StorageMetrics {
    pub(crate) wal_fsync_seconds: Histogram,
    /// Leader: round trip of each answered AppendEntries that carried entries.
    pub(crate) append_round_trip_seconds: Histogram,
    /// Leader: AppendEntries with entries out to the follower as each one is sent, itself
    /// included.
    pub(crate) append_in_flight: Histogram,
    /// Follower: time to answer each AppendEntries that carried entries.
    pub(crate) append_handling_seconds: Histogram,
    pub(crate) apply_seconds: Histogram,
    pub(crate) apply_entries: Histogram,
    /// When the current snapshot was built or installed on this node; `None` before the first.
    pub(crate) snapshot_made_at: Arc<Mutex<Option<SystemTime>>>,
}

impl Default for StorageMetrics {
    fn default() -> Self {
        StorageMetrics {
            wal_fsync_seconds: latency_histogram(18),
            append_round_trip_seconds: latency_histogram(18),
            append_in_flight: count_histogram(),
            append_handling_seconds: latency_histogram(18),
            apply_seconds: latency_histogram(18),
            apply_entries: count_histogram(),
            snapshot_made_at: Arc::default(),
        }
    }
}

impl StorageMetrics {
    /// The hook raft-log calls with the duration of each segment fdatasync.
    pub fn fsync_observer(&self) -> raft_log::FsyncObserver {
        let histogram = self.wal_fsync_seconds.clone();
        raft_log::FsyncObserver::new(move |took| histogram.observe(took.as_secs_f64()))
    }

    /// Records one applied batch of `entries` committed entries that took `took`.
    pub fn observe_apply(&self, entries: usize, took: Duration) {
        self.apply_seconds.observe(took.as_secs_f64());
        self.apply_entries.observe(entries as f64);
    }

    /// Records that the current snapshot was built or installed at `at`.
    pub fn snapshot_made(&self, at: SystemTime) {
        *self.snapshot_made_at.lock() = Some(at);
    }
}
