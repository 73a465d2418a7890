//! `write`: C closed-loop senders of fixed-size messages; throughput and acknowledgement
//! latency.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use testkit::{metric_value, scrape_metrics};
use tokio::task::JoinHandle;

use super::{connect_writers, timed_bar, CpuMeter};
use crate::stats::{Latencies, RunResult};
use crate::sut::{System, Writer};

/// What one `write` run does.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// Concurrent closed-loop senders.
    pub clients: usize,
    /// Measured time.
    pub duration: Duration,
    /// Time before measuring (connections warm, leader settled).
    pub warmup: Duration,
    /// Body size in bytes.
    pub body: usize,
    /// Topics (channels) the senders spread over.
    pub topics: usize,
}

/// Longest wait past the warmup for every writer's first acknowledged send; past it the run is
/// measured anyway, and writers that never got through show as missing throughput.
const WARM_WAIT_MAX: Duration = Duration::from_secs(30);

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

/// What one sender measured.
#[derive(Default)]
pub struct SenderTally {
    pub latencies: Latencies,
    pub ops: u64,
    pub errors: u64,
}

/// Runs `write` once.
///
/// # Errors
/// Writers could not connect.
pub async fn run(system: &dyn System, options: &WriteOptions) -> Result<RunResult> {
    let senders = Senders::start(system, options).await?;
    let label = format!("{} write x{}", system.kind(), options.clients);
    let hops = Hops::start(system).await;
    let cpu = CpuMeter::start(system);
    let (total, elapsed) = senders.measure(options.duration, &label).await?;
    let mut result = RunResult::new("write", system.kind().name(), system.node_count());
    result.clients = options.clients;
    result.body_bytes = options.body;
    result.duration_s = elapsed.as_secs_f64();
    result.ops = total.ops;
    result.errors = total.errors;
    result.throughput_per_s = total.ops as f64 / elapsed.as_secs_f64();
    result.latency_ms = total.latencies.summary();
    result.set("topics", options.topics);
    cpu.finish(&mut result, total.ops);
    hops.finish(&mut result).await;
    Ok(result)
}

/// The nodes' own timings over a measured window, from their `/metrics` (cellchat only):
/// means of the leader's send RPC (proposal to reply), its batches' proposal to applied answer
/// and its AppendEntries round trips, each follower's time to answer an AppendEntries, each
/// node's log fdatasync and apply, and the sends per log entry. Next to the senders' own latency they split one send
/// into its hops.
struct Hops {
    addrs: Vec<std::net::SocketAddr>,
    /// Each node's text at the start; `None` where the scrape failed.
    before: Vec<Option<String>>,
}

/// The `_sum` and `_count` series of `histogram` (with `labels`, e.g. `{method="send"}`).
fn sum_count(text: &str, histogram: &str, labels: &str) -> (f64, f64) {
    let get =
        |suffix: &str| metric_value(text, &format!("{histogram}_{suffix}{labels}")).unwrap_or(0.0);
    (get("sum"), get("count"))
}

impl Hops {
    async fn start(system: &dyn System) -> Hops {
        let addrs = system.metrics_addrs();
        let mut before = Vec::new();
        for addr in &addrs {
            before.push(scrape_metrics(*addr).await.ok());
        }
        Hops { addrs, before }
    }

    async fn finish(self, result: &mut RunResult) {
        if self.addrs.is_empty() {
            return;
        }
        let mut nodes = Vec::new();
        for (addr, before) in self.addrs.iter().zip(&self.before) {
            // A node not scraped at both ends has no window to tell: figures from one end
            // alone would count everything since it started.
            let (Some(before), Ok(after)) = (before, scrape_metrics(*addr).await) else {
                nodes.push(serde_json::json!({ "sends": 0.0, "scrape_failed": true }));
                continue;
            };
            // (sum, count) of the window: after minus before.
            let delta = |histogram: &str, labels: &str| {
                let (s1, c1) = sum_count(&after, histogram, labels);
                let (s0, c0) = sum_count(before, histogram, labels);
                (s1 - s0, c1 - c0)
            };
            let mean_ms = |(sum, count): (f64, f64)| (count > 0.0).then(|| 1e3 * sum / count);
            let send = delta("cellchat_rpc_seconds", "{method=\"send\"}");
            let batch = delta("cellchat_batch_sends", "");
            let fsync = delta("cellchat_wal_fsync_seconds", "");
            nodes.push(serde_json::json!({
                "sends": send.1,
                "send_rpc_ms_mean": mean_ms(send),
                "propose_ms_mean": mean_ms(delta("cellchat_propose_seconds", "")),
                "append_round_trip_ms_mean":
                    mean_ms(delta("cellchat_raft_append_round_trip_seconds", "")),
                "append_handling_ms_mean":
                    mean_ms(delta("cellchat_raft_append_handling_seconds", "")),
                "fsync_ms_mean": mean_ms(fsync),
                "fsyncs": fsync.1,
                "apply_ms_mean": mean_ms(delta("cellchat_apply_seconds", "")),
                "sends_per_entry_mean": (batch.1 > 0.0).then(|| batch.0 / batch.1),
            }));
        }
        // The leader answered the sends; list it first.
        nodes.sort_by(|a, b| {
            b["sends"]
                .as_f64()
                .partial_cmp(&a["sends"].as_f64())
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        result.set("nodes_leader_first", serde_json::Value::Array(nodes));
    }
}

/// Closed-loop senders, connected and warm, waiting for their one measured window. Dropped
/// without [`measure`](Self::measure), they stop after their send in flight.
pub struct Senders {
    phase: Arc<AtomicU8>,
    tasks: Vec<JoinHandle<SenderTally>>,
}

impl Senders {
    /// Connects `options.clients` senders, starts them, and returns once every one had an
    /// acknowledged send after `options.warmup` (or [`WARM_WAIT_MAX`] later).
    ///
    /// # Errors
    /// Writers could not connect.
    pub async fn start(system: &dyn System, options: &WriteOptions) -> Result<Senders> {
        let writers = connect_writers(system, options.clients).await?;
        let phase = Arc::new(AtomicU8::new(WARMUP));
        // Writers with at least one acknowledged send: measuring starts only when all are
        // warm, so a slow first send (login, registration, a leader still settling) is not
        // measured as a stall.
        let warm = Arc::new(AtomicUsize::new(0));
        let writer_count = writers.len();
        let mut tasks = Vec::new();
        for (index, writer) in writers.into_iter().enumerate() {
            let (phase, warm) = (phase.clone(), warm.clone());
            let topic = format!("load-{}", index % options.topics.max(1));
            let body = vec![b'x'; options.body];
            tasks.push(tokio::spawn(send_loop(writer, topic, body, phase, warm)));
        }
        let senders = Senders { phase, tasks };
        tokio::time::sleep(options.warmup).await;
        let warm_deadline = Instant::now() + WARM_WAIT_MAX;
        while warm.load(Ordering::Acquire) < writer_count && Instant::now() < warm_deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(senders)
    }

    /// Measures for `duration`, stops the senders, and returns what they measured together
    /// and the window's length.
    ///
    /// # Errors
    /// A sender task panicked.
    pub async fn measure(
        mut self,
        duration: Duration,
        label: &str,
    ) -> Result<(SenderTally, Duration)> {
        self.phase.store(MEASURE, Ordering::Release);
        let measure_start = Instant::now();
        let bar = timed_bar(duration, label);
        while measure_start.elapsed() < duration {
            tokio::time::sleep(Duration::from_millis(250).min(duration)).await;
            bar.set_position(measure_start.elapsed().as_secs());
        }
        // Sends that complete after this instant are not counted (see `send_loop`).
        self.phase.store(STOP, Ordering::Release);
        let elapsed = measure_start.elapsed();
        bar.finish_and_clear();
        let mut total = SenderTally::default();
        for task in std::mem::take(&mut self.tasks) {
            let tally = task.await?;
            total.latencies.merge(&tally.latencies);
            total.ops += tally.ops;
            total.errors += tally.errors;
        }
        Ok((total, elapsed))
    }
}

impl Drop for Senders {
    fn drop(&mut self) {
        self.phase.store(STOP, Ordering::Release);
    }
}

/// One closed-loop sender: sends until the phase is [`STOP`], counting only sends that started
/// and ended inside the measured window.
async fn send_loop(
    mut writer: Box<dyn Writer>,
    topic: String,
    body: Vec<u8>,
    phase: Arc<AtomicU8>,
    warm: Arc<AtomicUsize>,
) -> SenderTally {
    let mut tally = SenderTally::default();
    let mut warmed = false;
    loop {
        let state = phase.load(Ordering::Acquire);
        if state == STOP {
            break;
        }
        let started = Instant::now();
        let outcome = writer.write(&topic, body.clone()).await;
        if !warmed && outcome.is_ok() {
            warmed = true;
            warm.fetch_add(1, Ordering::Release);
        }
        if phase.load(Ordering::Acquire) != MEASURE || state != MEASURE {
            continue;
        }
        match outcome {
            Ok(()) => {
                tally.latencies.record(started.elapsed());
                tally.ops += 1;
            }
            Err(_) => {
                tally.errors += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    tally
}

#[cfg(test)]
mod tests {
    use super::sum_count;

    #[test]
    fn histogram_sums_and_counts_are_read_by_name_and_labels() {
        let text = "# TYPE cellchat_rpc_seconds histogram\n\
            cellchat_rpc_seconds_sum{method=\"login\"} 9.0\n\
            cellchat_rpc_seconds_count{method=\"login\"} 3\n\
            cellchat_rpc_seconds_sum{method=\"send\"} 0.25\n\
            cellchat_rpc_seconds_count{method=\"send\"} 100\n\
            cellchat_wal_fsync_seconds_sum 0.5\n\
            cellchat_wal_fsync_seconds_count 1000\n";
        assert_eq!(
            sum_count(text, "cellchat_rpc_seconds", "{method=\"send\"}"),
            (0.25, 100.0)
        );
        assert_eq!(
            sum_count(text, "cellchat_wal_fsync_seconds", ""),
            (0.5, 1000.0)
        );
        // A series that is absent reads as nothing, not as another one's value.
        assert_eq!(sum_count(text, "cellchat_apply_seconds", ""), (0.0, 0.0));
    }
}
