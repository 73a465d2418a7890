//! The scenarios: `write`, `fanout`, `failover`, `scale`, `backup`, `markers`, `typing` and
//! `search`.

pub mod backup;
pub mod canary;
pub mod failover;
pub mod fanout;
pub mod floor;
pub mod markers;
pub mod scale;
pub mod search;
pub mod typing;
pub mod write;

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use anyhow::Result;
use futures::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressStyle};

use crate::stats::RunResult;
use crate::sut::procs::cpu_time;
use crate::sut::{Subscriber, System, Writer};
use canary::Canary;

/// Clients connect this many at a time (each does discovery, and a login for writers).
const CONNECT_PARALLELISM: usize = 32;

/// One instant every task of the process measures from, so a timestamp in a message body can
/// be compared with the receiver's clock.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Microseconds since [`EPOCH`].
pub fn now_micros() -> u64 {
    u64::try_from(EPOCH.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:>28} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

/// A spinner counting down a timed phase.
pub fn timed_bar(duration: Duration, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(duration.as_secs().max(1));
    bar.set_style(
        ProgressStyle::with_template("{msg:>28} [{bar:30}] {pos}/{len} s")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

/// Connects `count` writers, [`CONNECT_PARALLELISM`] at a time.
///
/// # Errors
/// Any writer failed to connect.
pub async fn connect_writers(system: &dyn System, count: usize) -> Result<Vec<Box<dyn Writer>>> {
    let bar = bar(count as u64, "connecting writers");
    let writers = futures::stream::iter(0..count)
        .map(|i| {
            let bar = bar.clone();
            async move {
                let writer = system.writer(i).await;
                bar.inc(1);
                writer
            }
        })
        .buffered(CONNECT_PARALLELISM)
        .try_collect()
        .await;
    bar.finish_and_clear();
    writers
}

/// Connects `count` subscribers of `topic`, spread over the nodes.
///
/// # Errors
/// Any subscriber failed to connect.
pub async fn connect_subscribers(
    system: &dyn System,
    count: usize,
    topic: &str,
) -> Result<Vec<Box<dyn Subscriber>>> {
    let bar = bar(count as u64, "connecting subscribers");
    let nodes = system.node_count().max(1);
    let subscribers = futures::stream::iter(0..count)
        .map(|i| {
            let bar = bar.clone();
            async move {
                let subscriber = system.subscriber(i, i % nodes, topic).await;
                bar.inc(1);
                subscriber
            }
        })
        .buffered(CONNECT_PARALLELISM)
        .try_collect()
        .await;
    bar.finish_and_clear();
    subscribers
}

/// Microseconds since [`EPOCH`] at `instant` (0 for an instant before it).
pub fn micros_at(instant: Instant) -> u64 {
    u64::try_from(instant.saturating_duration_since(*EPOCH).as_micros()).unwrap_or(u64::MAX)
}

/// A message body of `size` bytes (at least [`STAMP_LEN`]) carrying who sent it, its number
/// and its stamp (microseconds since [`EPOCH`], when it was sent). The fields are written in
/// hex, so the body is ASCII text: a signed writer sends it as a message's text.
pub fn stamped_body(size: usize, publisher: u32, counter: u64, stamp_micros: u64) -> Vec<u8> {
    let mut body = Vec::with_capacity(size.max(STAMP_LEN));
    body.extend_from_slice(STAMP_MAGIC);
    body.extend_from_slice(format!("{publisher:08x}{counter:016x}{stamp_micros:016x}").as_bytes());
    body.resize(size.max(STAMP_LEN), b'.');
    body
}

const STAMP_MAGIC: &[u8; 8] = b"ccbench2";

/// The bytes a stamp takes at the start of a body: the magic and 40 hex digits.
pub const STAMP_LEN: usize = 48;

/// The stamp of a body made by [`stamped_body`]: (publisher, counter, stamp micros).
pub fn read_stamp(body: &[u8]) -> Option<(u32, u64, u64)> {
    if body.len() < STAMP_LEN || &body[..8] != STAMP_MAGIC {
        return None;
    }
    let field = |from: usize, to: usize| {
        let digits = std::str::from_utf8(&body[from..to]).ok()?;
        u64::from_str_radix(digits, 16).ok()
    };
    let publisher = u32::try_from(field(8, 16)?).ok()?;
    Some((publisher, field(16, 32)?, field(32, 48)?))
}

/// CPU time the servers and this harness use over a measured window, for CPU per
/// acknowledged message: a system that is faster only because it burns more of the shared
/// cores shows it here. A [`Canary`] runs through the same window and records how fast the
/// machine itself was, since on a shared VM that moves CPU per message by itself.
pub struct CpuMeter {
    pids: Vec<u32>,
    servers: Duration,
    harness: Duration,
    canary: Canary,
}

impl CpuMeter {
    /// Starts metering the system's server processes (none when it was joined) and this one.
    pub fn start(system: &dyn System) -> CpuMeter {
        let pids = system.pids();
        CpuMeter {
            servers: servers_cpu(&pids),
            harness: cpu_time(std::process::id()).unwrap_or_default(),
            pids,
            canary: Canary::start(),
        }
    }

    /// Ends the window and records, per message of `messages`: `server_cpu_us_per_msg`
    /// (every node together) and `harness_cpu_us_per_msg` (the clients, the canary's own
    /// thread left out), with the totals (`server_cpu_s`, `harness_cpu_s`); and the canary's
    /// medians, `canary_unit_us` and `canary_memory_us`.
    pub fn finish(self, result: &mut RunResult, messages: u64) {
        let servers = servers_cpu(&self.pids).saturating_sub(self.servers);
        let canary = self.canary.stop();
        let harness = cpu_time(std::process::id())
            .unwrap_or_default()
            .saturating_sub(self.harness)
            .saturating_sub(canary.cpu);
        let per = |cpu: Duration| cpu.as_secs_f64() * 1e6 / messages.max(1) as f64;
        if !self.pids.is_empty() {
            result.set("server_cpu_s", servers.as_secs_f64());
            result.set("server_cpu_us_per_msg", per(servers));
        }
        result.set("harness_cpu_s", harness.as_secs_f64());
        result.set("harness_cpu_us_per_msg", per(harness));
        if let Some(unit) = canary.unit_us {
            result.set("canary_unit_us", unit);
        }
        if let Some(memory) = canary.memory_us {
            result.set("canary_memory_us", memory);
        }
    }
}

/// CPU time used so far by the processes `pids` (those gone count nothing).
fn servers_cpu(pids: &[u32]) -> Duration {
    pids.iter().filter_map(|p| cpu_time(*p)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_and_junk_is_refused() {
        let due = micros_at(Instant::now() + std::time::Duration::from_millis(5));
        let body = stamped_body(100, 7, 42, due);
        assert_eq!(body.len(), 100);
        assert_eq!(read_stamp(&body), Some((7, 42, due)));
        assert!(
            due > now_micros(),
            "a stamp is the time given, not the time of writing"
        );
        assert!(body.is_ascii(), "a signed writer sends the body as text");
        assert_eq!(
            read_stamp(&stamped_body(10, u32::MAX, u64::MAX, u64::MAX)),
            Some((u32::MAX, u64::MAX, u64::MAX))
        );
        assert_eq!(read_stamp(b"hello"), None);
        assert_eq!(read_stamp(&[0u8; 100]), None);
        let mut bad = stamped_body(100, 7, 42, due);
        bad[20] = b'g';
        assert_eq!(read_stamp(&bad), None, "a field that is not hex");
    }
}
