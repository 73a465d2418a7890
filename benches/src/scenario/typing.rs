//! `typing`: how long a typing note takes from the writer's keystroke to the reader's screen.
//! P pairs each get a channel of their own; the writer tells the cluster it types there (what
//! the clients do at a keystroke), and the reader, subscribed to the channel, hears it as an
//! event of its client library (what the clients draw). Each writer sends its next note only
//! after the last one arrived (or was given up on), so every note is timed on its own. Writers
//! and readers pick their nearest node each, so some notes cross nodes and some do not.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cellchat_client::identity::Identity;
use cellchat_client::{Client, Ephemeral};
use tokio::sync::broadcast::error::RecvError;

use crate::stats::{Latencies, RunResult};
use crate::sut::cellchat::{client_config, Cellchat};
use crate::sut::System;

/// A note not heard within this long counts as lost.
const HEAR_MAX: Duration = Duration::from_secs(2);

/// Gap between one writer's notes: nodes take a few notes a second per connection.
const NOTE_EVERY: Duration = Duration::from_millis(500);

/// What one `typing` run does.
#[derive(Debug, Clone)]
pub struct TypingOptions {
    /// Writer and reader pairs.
    pub pairs: usize,
    /// The measured window.
    pub duration: Duration,
    /// Notes before the measured window (connections open, routes settle).
    pub warmup: Duration,
}

/// One pair: the writer's client, the reader's client and their channel.
struct Pair {
    writer: Client,
    reader: Client,
    channel: String,
}

async fn pair(target: &crate::sut::cellchat::Target, tag: &str, i: usize) -> Result<Pair> {
    let connect = |who: &str| {
        let identity = Identity::ephemeral(format!("t{tag}-{who}{i}"), None);
        Client::connect(client_config(target, Some(identity)))
    };
    let (writer, reader) = (connect("w").await?, connect("r").await?);
    let channel = format!("typing-{tag}-{i}");
    // The first message makes the channel; both then hold a push connection by subscribing.
    (writer.send_text(&channel, "hello", None).await).context("the writer's first send")?;
    Ok(Pair {
        writer,
        reader,
        channel,
    })
}

/// Times notes of one pair until `stop`; records only while `measuring`.
async fn run_pair(
    pair: Pair,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> (Latencies, u64, u64) {
    let Pair {
        writer,
        reader,
        channel,
    } = pair;
    let _writer_sub = writer.subscribe(&channel, 0);
    let _reader_sub = reader.subscribe(&channel, 0);
    let mut heard = reader.ephemeral();
    let (mut latencies, mut notes, mut lost) = (Latencies::new(), 0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        // A note counts when it was sent inside the window: the first notes, sent while the
        // reader's subscription may not be in place yet, never do, even when they are given
        // up on inside it.
        let counted = measuring.load(Ordering::Relaxed);
        // No push connection yet (the subscription is still opening): try again shortly.
        if !writer.typing(&channel) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let arrived = tokio::time::timeout(HEAR_MAX, async {
            loop {
                match heard.recv().await {
                    Ok(Ephemeral::Typing { channel: c, .. }) if c == channel => return true,
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return false,
                }
            }
        })
        .await
        .unwrap_or(false);
        let took = started.elapsed();
        if counted && measuring.load(Ordering::Relaxed) {
            if arrived {
                latencies.record(took);
                notes += 1;
            } else {
                lost += 1;
            }
        }
        tokio::time::sleep(NOTE_EVERY.saturating_sub(took)).await;
    }
    (latencies, notes, lost)
}

/// Runs `typing` on a cluster the harness started.
///
/// # Errors
/// A client could not connect, or a first send failed.
pub async fn run(cellchat: &Cellchat, options: &TypingOptions) -> Result<RunResult> {
    let target = cellchat.target().clone();
    let tag = format!("{:08x}", rand::random::<u32>());
    let mut pairs = Vec::with_capacity(options.pairs);
    for i in 0..options.pairs {
        pairs.push(pair(&target, &tag, i).await?);
    }
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = pairs
        .into_iter()
        .map(|p| tokio::spawn(run_pair(p, measuring.clone(), stop.clone())))
        .collect();
    tokio::time::sleep(options.warmup.max(Duration::from_secs(2))).await;
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(options.duration).await;
    measuring.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let (mut latencies, mut notes, mut lost) = (Latencies::new(), 0, 0);
    for task in tasks {
        let (l, n, x) = task.await?;
        latencies.merge(&l);
        notes += n;
        lost += x;
    }
    let window = options.duration.as_secs_f64();
    let mut result = RunResult::new("typing", "cellchat", cellchat.node_count());
    result.clients = options.pairs * 2;
    result.duration_s = window;
    result.ops = notes;
    result.errors = lost;
    result.throughput_per_s = notes as f64 / window;
    result.latency_ms = latencies.summary();
    Ok(result)
}
