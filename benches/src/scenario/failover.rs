//! `failover`: steady closed-loop load on a local cellchat cluster, then kill -9 of the leader,
//! round after round: time from the kill to the next acknowledged send, and time until
//! throughput is back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use parking_lot::Mutex;

use super::{bar, connect_writers};
use crate::stats::{Latencies, RunResult};
use crate::sut::cellchat::Cellchat;
use crate::sut::System;

/// What one `failover` run does.
#[derive(Debug, Clone)]
pub struct FailoverOptions {
    /// Concurrent closed-loop senders.
    pub clients: usize,
    /// Leader kills.
    pub rounds: usize,
    /// Steady load before each kill; the throughput baseline is its second half.
    pub steady: Duration,
    /// Longest wait for throughput to come back after a kill.
    pub recover_timeout: Duration,
    /// Body size in bytes.
    pub body: usize,
}

/// Throughput is measured in windows of this length.
const WINDOW: Duration = Duration::from_millis(100);
/// Throughput counts as recovered at the end of the first window reaching this share of the
/// pre-kill baseline.
const RECOVERED_SHARE: f64 = 0.8;

/// Acknowledgements, as (send started, acknowledged) instants.
type AckLog = Arc<Mutex<Vec<(Instant, Instant)>>>;

/// Runs `failover`.
///
/// # Errors
/// The cluster was joined (nothing to kill), writers could not connect, or a killed node did
/// not come back.
pub async fn run(cellchat: &mut Cellchat, options: &FailoverOptions) -> Result<RunResult> {
    let nodes = cellchat.node_count();
    cellchat.local()?;
    let writers = connect_writers(cellchat, options.clients).await?;
    let acks: AckLog = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let latencies = Arc::new(Mutex::new(Latencies::new()));
    let mut tasks = Vec::new();
    for (index, mut writer) in writers.into_iter().enumerate() {
        let (acks, stop, latencies) = (acks.clone(), stop.clone(), latencies.clone());
        let body = vec![b'f'; options.body];
        let topic = format!("failover-{}", index % 8);
        tasks.push(tokio::spawn(async move {
            let mut errors = 0u64;
            while !stop.load(Ordering::Acquire) {
                let started = Instant::now();
                match writer.write(&topic, body.clone()).await {
                    Ok(()) => {
                        let done = Instant::now();
                        latencies.lock().record(done - started);
                        acks.lock().push((started, done));
                    }
                    Err(_) => errors += 1,
                }
            }
            errors
        }));
    }

    let progress = bar(options.rounds as u64, "cellchat failover rounds");
    let mut to_ack = Latencies::new();
    let mut to_recover = Latencies::new();
    let mut unrecovered = 0u64;
    let run_started = Instant::now();
    for _ in 0..options.rounds {
        tokio::time::sleep(options.steady).await;
        // Find the leader first: discovery takes a few hundred ms that must not count.
        let index = cellchat.leader_index().await?;
        let baseline = {
            let acks = acks.lock();
            let from = Instant::now() - options.steady / 2;
            acks.iter().filter(|(_, done)| *done >= from).count() as f64
                / (options.steady / 2).as_secs_f64()
        };
        cellchat.local()?.nodes[index].kill9();
        let killed_at = Instant::now();
        let deadline = killed_at + options.recover_timeout;
        let (mut first_ack, mut recovered) = (None, None);
        while Instant::now() < deadline && recovered.is_none() {
            tokio::time::sleep(WINDOW).await;
            let acks = acks.lock();
            if first_ack.is_none() {
                // The next acknowledged send: one started after the kill, so a live leader
                // must have committed it (an ack the old leader sent just before dying does
                // not count).
                first_ack = acks
                    .iter()
                    .filter(|(started, _)| *started >= killed_at)
                    .map(|(_, done)| *done)
                    .min();
            }
            if let Some(first) = first_ack {
                // Sliding windows from the first ack on.
                let mut window_end = first + WINDOW;
                while window_end <= Instant::now() {
                    let in_window = acks
                        .iter()
                        .filter(|(_, done)| *done > window_end - WINDOW && *done <= window_end)
                        .count() as f64;
                    if in_window / WINDOW.as_secs_f64() >= RECOVERED_SHARE * baseline {
                        recovered = Some(window_end);
                        break;
                    }
                    window_end += WINDOW;
                }
            }
        }
        match first_ack {
            Some(first) => to_ack.record(first - killed_at),
            None => unrecovered += 1,
        }
        match recovered {
            Some(at) => to_recover.record(at - killed_at),
            None => unrecovered += 1,
        }
        let cluster = cellchat.local()?;
        cluster
            .restart(index, Duration::from_secs(60))
            .with_context(|| format!("restarting killed node {index}"))?;
        cluster
            .wait_converged(nodes, Duration::from_secs(60))
            .await
            .context("the cluster did not converge after a restart")?;
        progress.inc(1);
    }
    progress.finish_and_clear();
    stop.store(true, Ordering::Release);
    let mut errors = 0;
    for task in tasks {
        errors += task.await?;
    }
    let elapsed = run_started.elapsed();
    let ops = acks.lock().len() as u64;
    let mut result = RunResult::new("failover", "cellchat", nodes);
    result.clients = options.clients;
    result.body_bytes = options.body;
    result.duration_s = elapsed.as_secs_f64();
    result.ops = ops;
    result.errors = errors;
    result.throughput_per_s = ops as f64 / elapsed.as_secs_f64();
    result.latency_ms = latencies.lock().summary();
    let ack = to_ack.summary();
    let recover = to_recover.summary();
    result.set("rounds", options.rounds);
    result.set("kill_to_next_ack_ms_p50", ack.p50);
    result.set("kill_to_next_ack_ms_p99", ack.p99);
    result.set("kill_to_next_ack_ms_max", ack.max);
    result.set("kill_to_recovered_ms_p50", recover.p50);
    result.set("kill_to_recovered_ms_max", recover.max);
    result.set("rounds_not_recovered", unrecovered);
    Ok(result)
}
