//! `markers`: what read markers and presence cost the cluster. A publisher keeps one channel
//! moving, and U users connect as the interactive clients do: each holds a push connection
//! that watches presence (heartbeats, the nodes' gossip, the online list), then marks the
//! channel read once a second at its newest message, as the clients do while a user reads an
//! active channel. The same window is measured three times: the publisher alone, with the
//! users online, and with them online and marking; the differences in the servers' CPU are
//! what presence and markers cost.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cellchat_client::identity::Identity;
use cellchat_client::Client;
use futures::{StreamExt, TryStreamExt};

use crate::stats::{Latencies, RunResult};
use crate::sut::cellchat::{client_config, Cellchat};
use crate::sut::procs::cpu_time;
use crate::sut::System;

/// How often each user marks the channel read.
const MARK_EVERY: Duration = Duration::from_secs(1);

/// What one `markers` run does.
#[derive(Debug, Clone)]
pub struct MarkersOptions {
    /// Users marking the channel read.
    pub users: usize,
    /// Messages per second the publisher sends into the channel.
    pub rate: f64,
    /// Each measured window.
    pub duration: Duration,
    /// Marks before the measured window (each user's first registers its name).
    pub warmup: Duration,
}

/// Sends into `channel` at `rate` until `stop`, keeping `head` at the newest seq.
async fn publish(
    client: Client,
    channel: String,
    rate: f64,
    head: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    let gap = Duration::from_secs_f64(1.0 / rate.max(0.1));
    let mut next = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        if let Ok(reply) = client.send_text(&channel, &format!("m{n}"), None).await {
            head.fetch_max(reply.seq, Ordering::Relaxed);
        }
        next += gap;
        tokio::time::sleep_until(next.into()).await;
    }
}

/// The servers' CPU time used during `window`.
async fn cpu_during(pids: &[u32], window: Duration) -> Duration {
    let cpu = || -> Duration { pids.iter().filter_map(|p| cpu_time(*p)).sum() };
    let before = cpu();
    tokio::time::sleep(window).await;
    cpu().saturating_sub(before)
}

/// Runs `markers` on a cluster the harness started.
///
/// # Errors
/// A client could not connect, or the first send failed.
pub async fn run(cellchat: &Cellchat, options: &MarkersOptions) -> Result<RunResult> {
    let target = cellchat.target().clone();
    let pids = cellchat.pids();
    let tag = format!("{:08x}", rand::random::<u32>());
    let channel = format!("markers-{tag}");
    let identity = Identity::ephemeral(format!("b{tag}-pub"), None);
    let publisher = Client::connect(client_config(&target, Some(identity))).await?;
    let first =
        (publisher.send_text(&channel, "m0", None).await).context("the publisher's first send")?;
    let head = Arc::new(AtomicU64::new(first.seq));
    let stop = Arc::new(AtomicBool::new(false));
    let publishing = tokio::spawn(publish(
        publisher,
        channel.clone(),
        options.rate,
        head.clone(),
        stop.clone(),
    ));

    // The publisher alone.
    let alone = cpu_during(&pids, options.duration).await;

    let bar = super::bar(options.users as u64, "connecting users");
    let users: Vec<Client> = futures::stream::iter(0..options.users)
        .map(|i| {
            let (target, bar) = (target.clone(), bar.clone());
            let name = format!("b{tag}-u{i}");
            async move {
                let identity = Identity::ephemeral(name, None);
                let client = Client::connect(client_config(&target, Some(identity))).await?;
                // Opens the user's push connection and watches presence, as a client does.
                client.online().await?;
                bar.inc(1);
                anyhow::Ok(client)
            }
        })
        .buffered(super::CONNECT_PARALLELISM)
        .try_collect()
        .await?;
    bar.finish_and_clear();

    // Online, not marking yet.
    let with_presence = cpu_during(&pids, options.duration).await;

    // Each user marks once a second, at a phase of its own, and times each mark.
    let measuring = Arc::new(AtomicBool::new(false));
    let marking = Arc::new(AtomicBool::new(true));
    let tasks: Vec<_> = users
        .into_iter()
        .enumerate()
        .map(|(i, user)| {
            let (channel, head) = (channel.clone(), head.clone());
            let (measuring, marking) = (measuring.clone(), marking.clone());
            let phase = MARK_EVERY.mul_f64(i as f64 / options.users.max(1) as f64);
            tokio::spawn(async move {
                let (mut latencies, mut marks, mut errors) = (Latencies::new(), 0u64, 0u64);
                let mut next = Instant::now() + phase;
                while marking.load(Ordering::Relaxed) {
                    tokio::time::sleep_until(next.into()).await;
                    next += MARK_EVERY;
                    let seq = head.load(Ordering::Relaxed);
                    let started = Instant::now();
                    let outcome = user.mark_read(&channel, seq).await;
                    if measuring.load(Ordering::Relaxed) {
                        match outcome {
                            Ok(_) => {
                                latencies.record(started.elapsed());
                                marks += 1;
                            }
                            Err(_) => errors += 1,
                        }
                    }
                }
                (latencies, marks, errors)
            })
        })
        .collect();
    tokio::time::sleep(options.warmup.max(MARK_EVERY * 2)).await;
    measuring.store(true, Ordering::Relaxed);
    let token_before = cellchat_applied(&target).await;
    let with_marks = cpu_during(&pids, options.duration).await;
    let token_after = cellchat_applied(&target).await;
    measuring.store(false, Ordering::Relaxed);
    marking.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let (mut latencies, mut marks, mut errors) = (Latencies::new(), 0, 0);
    for task in tasks {
        let (l, m, e) = task.await?;
        latencies.merge(&l);
        marks += m;
        errors += e;
    }
    let _ = publishing.await;

    let window = options.duration.as_secs_f64();
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64;
    let percent = |cpu: Duration| 100.0 * cpu.as_secs_f64() / window;
    let mut result = RunResult::new("markers", "cellchat", cellchat.node_count());
    result.clients = options.users;
    result.rate_per_s = options.rate;
    result.duration_s = window;
    result.ops = marks;
    result.errors = errors;
    result.throughput_per_s = marks as f64 / window;
    result.latency_ms = latencies.summary();
    result.set("server_cpu_percent_publisher_alone", percent(alone));
    result.set("server_cpu_percent_with_presence", percent(with_presence));
    result.set("server_cpu_percent_with_markers", percent(with_marks));
    let presence = with_presence.saturating_sub(alone);
    result.set("presence_cpu_percent_of_machine", percent(presence) / cores);
    let markers = with_marks.saturating_sub(with_presence);
    result.set("markers_cpu_percent_of_one_core", percent(markers));
    result.set("markers_cpu_percent_of_machine", percent(markers) / cores);
    let both = with_marks.saturating_sub(alone);
    result.set(
        "presence_and_markers_cpu_percent_of_machine",
        percent(both) / cores,
    );
    if let (Some(before), Some(after)) = (token_before, token_after) {
        // Entries of every kind: the publisher's batches and the markers' entries.
        result.set(
            "log_entries_per_s",
            after.saturating_sub(before) as f64 / window,
        );
    }
    Ok(result)
}

/// The highest applied index the nodes report, for the entries written in a window.
async fn cellchat_applied(target: &crate::sut::cellchat::Target) -> Option<u64> {
    let client = Client::connect(client_config(target, None)).await.ok()?;
    let info = client.cluster().await.ok()?;
    info.nodes.iter().map(|n| n.applied).max()
}
