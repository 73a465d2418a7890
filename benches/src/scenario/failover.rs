//! `failover`: steady closed-loop load on a local cellchat cluster and one subscriber, then
//! kill -9 round after round. Even rounds kill the leader: time from the kill to the next
//! acknowledged send, and until throughput is back. Odd rounds kill the node the subscriber
//! reads from: time from the kill to the next message it is delivered.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use parking_lot::Mutex;

use cellchat_client::Client;

use super::{bar, connect_writers, now_micros, read_stamp, stamped_body};
use crate::stats::{Latencies, RunResult};
use crate::sut::cellchat::client_config;
use crate::sut::cellchat::Cellchat;
use crate::sut::System;

/// What one `failover` run does.
#[derive(Debug, Clone)]
pub struct FailoverOptions {
    /// Concurrent closed-loop senders.
    pub clients: usize,
    /// Kill rounds: even rounds kill the leader, odd rounds the subscriber's node.
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

/// Channels the writers spread over; the subscriber reads the first.
const TOPICS: usize = 8;

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
        let body_size = options.body;
        let topic = format!("failover-{}", index % TOPICS);
        tasks.push(tokio::spawn(async move {
            let mut errors = 0u64;
            let mut counter = 0u64;
            while !stop.load(Ordering::Acquire) {
                let started = Instant::now();
                counter += 1;
                let body = stamped_body(body_size, index as u32, counter, now_micros());
                match writer.write(&topic, body).await {
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

    // The subscriber: a read-only client streaming the first channel; it records when each
    // message it is delivered was sent (stamp) and arrived, both on the process clock.
    let identity = Some(cellchat.reader().clone());
    let reader = Client::connect(client_config(cellchat.target(), identity)).await?;
    let deliveries: Arc<Mutex<Vec<(u64, u64)>>> = Arc::new(Mutex::new(Vec::new()));
    let subscriber = {
        let mut subscription = reader.subscribe("failover-0", 0);
        let deliveries = deliveries.clone();
        tokio::spawn(async move {
            while let Some(Ok(message)) = subscription.recv().await {
                if let Some((_, _, sent)) = read_stamp(&message.body) {
                    deliveries.lock().push((sent, now_micros()));
                }
            }
        })
    };
    let mut to_delivery = Latencies::new();
    let mut reader_rounds_on_leader = 0u64;

    let progress = bar(options.rounds as u64, "cellchat failover rounds");
    let mut to_ack = Latencies::new();
    let mut to_elected = Latencies::new();
    let mut to_recover = Latencies::new();
    let mut unrecovered = 0u64;
    let run_started = Instant::now();
    for round in 0..options.rounds {
        tokio::time::sleep(options.steady).await;
        if round % 2 == 1 {
            // Kill the subscriber's node: the next message delivered after the kill must have
            // come through the node it moved to.
            let index = reader_node_index(cellchat, &reader)?;
            let leader = cellchat.leader_index().await?;
            if index == leader {
                reader_rounds_on_leader += 1;
            }
            cellchat.local()?.nodes[index].kill9();
            let killed_at = now_micros();
            tracing::info!(round, node = index, "killed the subscriber's node");
            let deadline = Instant::now() + options.recover_timeout;
            let mut delivered = None;
            while Instant::now() < deadline && delivered.is_none() {
                tokio::time::sleep(Duration::from_millis(20)).await;
                delivered = deliveries
                    .lock()
                    .iter()
                    .filter(|(sent, _)| *sent >= killed_at)
                    .map(|(_, arrived)| *arrived)
                    .min();
            }
            match delivered {
                Some(arrived) => to_delivery.record(Duration::from_micros(arrived - killed_at)),
                None => unrecovered += 1,
            }
            restart(cellchat, index, nodes).await?;
            progress.inc(1);
            continue;
        }
        // Find the leader first: discovery takes a few hundred ms that must not count.
        let index = cellchat.leader_index().await?;
        let baseline = {
            let acks = acks.lock();
            let from = Instant::now() - options.steady / 2;
            acks.iter().filter(|(_, done)| *done >= from).count() as f64
                / (options.steady / 2).as_secs_f64()
        };
        let killed_id = cellchat.local()?.nodes[index].ready().map(|r| r.id);
        cellchat.local()?.nodes[index].kill9();
        let killed_at = Instant::now();
        tracing::info!(round, node = index, "killed the leader");
        let deadline = killed_at + options.recover_timeout;
        let (mut first_ack, mut recovered, mut elected) = (None, None, None);
        while Instant::now() < deadline && recovered.is_none() {
            if elected.is_none() {
                // Split the failover time: when does discovery first show another leader?
                let view = cellchat
                    .local()?
                    .discover(Duration::from_millis(30))
                    .await?;
                if view
                    .iter()
                    .any(|a| a.role == proto::Role::Leader && Some(a.node_id) != killed_id)
                {
                    elected = Some(Instant::now());
                }
            } else {
                tokio::time::sleep(WINDOW).await;
            }
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
        if let Some(at) = elected {
            to_elected.record(at - killed_at);
        }
        tracing::info!(
            round,
            elected_ms = elected.map(|at| (at - killed_at).as_secs_f64() * 1e3),
            first_ack_ms = first_ack.map(|at| (at - killed_at).as_secs_f64() * 1e3),
            "leader kill round done"
        );
        match first_ack {
            Some(first) => to_ack.record(first - killed_at),
            None => unrecovered += 1,
        }
        match recovered {
            Some(at) => to_recover.record(at - killed_at),
            None => unrecovered += 1,
        }
        restart(cellchat, index, nodes).await?;
        progress.inc(1);
    }
    progress.finish_and_clear();
    stop.store(true, Ordering::Release);
    subscriber.abort();
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
    let delivery = to_delivery.summary();
    let elected = to_elected.summary();
    result.set("kill_to_new_leader_seen_ms_p50", elected.p50);
    result.set("kill_to_new_leader_seen_ms_max", elected.max);
    result.set("rounds", options.rounds);
    result.set("reader_kill_to_next_delivery_ms_p50", delivery.p50);
    result.set("reader_kill_to_next_delivery_ms_max", delivery.max);
    result.set(
        "reader_rounds_that_killed_the_leader",
        reader_rounds_on_leader,
    );
    result.set("kill_to_next_ack_ms_p50", ack.p50);
    result.set("kill_to_next_ack_ms_p99", ack.p99);
    result.set("kill_to_next_ack_ms_max", ack.max);
    result.set("kill_to_recovered_ms_p50", recover.p50);
    result.set("kill_to_recovered_ms_max", recover.max);
    result.set("rounds_not_recovered", unrecovered);
    Ok(result)
}

/// The index in the local cluster of the node `reader` streams from.
fn reader_node_index(cellchat: &mut Cellchat, reader: &Client) -> Result<usize> {
    let node = reader
        .status()
        .reading
        .context("the subscriber reads from no node")?;
    cellchat
        .local()?
        .nodes
        .iter()
        .position(|n| n.ready().map(|r| r.id) == Some(node))
        .with_context(|| format!("the subscriber's node {node} is not one of the started nodes"))
}

/// Restarts killed node `index` and waits for all `nodes` to follow one leader again.
async fn restart(cellchat: &mut Cellchat, index: usize, nodes: usize) -> Result<()> {
    let cluster = cellchat.local()?;
    cluster
        .restart(index, Duration::from_secs(60))
        .with_context(|| format!("restarting killed node {index}"))?;
    cluster
        .wait_converged(nodes, Duration::from_secs(60))
        .await
        .context("the cluster did not converge after a restart")?;
    Ok(())
}
