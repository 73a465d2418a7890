//! `search`: how long a full-text search takes on a cluster holding N plaintext messages.
//! Loaders fill C channels with messages of 12 words drawn from a Zipf-like vocabulary
//! (a few words are very common, most are rare); then searchers run queries of six kinds
//! through the client library, each answered by the searcher's nearest node from its index.
//! The first search after the load waits until that node's index covers the last write, so
//! its time is the indexing lag.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use cellchat_client::identity::Identity;
use cellchat_client::{crypto, Client};
use futures::StreamExt;

use crate::stats::{Latencies, RunResult};
use crate::sut::cellchat::{client_config, Cellchat};
use crate::sut::System;

/// Distinct words in the vocabulary.
const VOCABULARY: u64 = 50_000;
/// Words per message.
const WORDS: usize = 12;
/// Sends one loader keeps in flight.
const IN_FLIGHT: usize = 8;
/// Hits asked for per search (the most a node returns).
const LIMIT: u32 = 100;

/// What one `search` run does.
#[derive(Debug, Clone)]
pub struct SearchOptions {
    /// Messages loaded before the searches.
    pub messages: u64,
    /// Channels they are spread over.
    pub channels: usize,
    /// Loading clients (each its own user).
    pub loaders: usize,
    /// Searches timed.
    pub queries: usize,
    /// Concurrent searching clients.
    pub searchers: usize,
}

/// splitmix64: small, fast, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A word rank, log-uniform over the vocabulary: rank r comes about 1/r as often, as
    /// words do in text.
    fn rank(&mut self) -> u64 {
        ((VOCABULARY as f64).powf(self.unit()) as u64).clamp(1, VOCABULARY) - 1
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn word(rank: u64) -> String {
    format!("w{rank}")
}

/// The six kinds of query, by name, made from `rng`.
const KINDS: [&str; 6] = [
    "rare word",
    "common word",
    "common + rare",
    "prefix",
    "from:user",
    "in:channel + word",
];

fn query(kind: usize, rng: &mut Rng, tag: &str, options: &SearchOptions) -> String {
    match kind {
        0 => word(5_000 + rng.below(45_000)),
        1 => word(rng.below(10)),
        2 => format!("{} {}", word(rng.below(10)), word(1_000 + rng.below(9_000))),
        3 => format!("w{}*", 10 + rng.below(90)),
        4 => format!("from:s{tag}-{}", rng.below(options.loaders as u64)),
        _ => format!(
            "in:c{tag}-{} {}",
            rng.below(options.channels as u64),
            word(rng.below(1_000))
        ),
    }
}

/// Loads `count` messages as one user, [`IN_FLIGHT`] at a time; answers the failed sends and
/// the client's read token after the last.
async fn load(
    client: Client,
    tag: String,
    seed: u64,
    count: u64,
    channels: usize,
    sent: Arc<AtomicU64>,
) -> Result<(u64, u64)> {
    let mut rng = Rng(seed);
    let mut failures = 0;
    let client = &client;
    let items = (0..count).map(|_| {
        let channel = format!("c{tag}-{}", rng.below(channels as u64));
        let text = (0..WORDS)
            .map(|_| word(rng.rank()))
            .collect::<Vec<_>>()
            .join(" ");
        (channel, text)
    });
    let mut results = futures::stream::iter(items)
        .map(
            |(channel, text)| async move { client.send(&channel, crypto::plain_body(&text)).await },
        )
        .buffer_unordered(IN_FLIGHT);
    while let Some(result) = results.next().await {
        match result {
            Ok(_) => {
                sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => failures += 1,
        }
    }
    drop(results);
    Ok((failures, client.read_token()))
}

/// Runs `search` on a cluster the harness started.
///
/// # Errors
/// A client could not connect, or the load failed.
pub async fn run(cellchat: &Cellchat, options: &SearchOptions) -> Result<RunResult> {
    let target = cellchat.target().clone();
    let tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let connect = |name: String| {
        let identity = Identity::ephemeral(name, None);
        Client::connect(client_config(&target, Some(identity)))
    };

    // Load.
    let mut loaders = Vec::with_capacity(options.loaders);
    for i in 0..options.loaders {
        loaders.push(
            connect(format!("s{tag}-{i}"))
                .await
                .context("a loader's connect")?,
        );
    }
    let sent = Arc::new(AtomicU64::new(0));
    let per = options.messages / options.loaders as u64;
    let started = Instant::now();
    let bar = super::bar(per * options.loaders as u64, "loading messages");
    let tasks: Vec<_> = (loaders.into_iter().enumerate())
        .map(|(i, client)| {
            let (tag, sent) = (tag.clone(), sent.clone());
            tokio::spawn(load(client, tag, 7 + i as u64, per, options.channels, sent))
        })
        .collect();
    let progress = {
        let (sent, bar) = (sent.clone(), bar.clone());
        tokio::spawn(async move {
            loop {
                bar.set_position(sent.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let (mut load_errors, mut token) = (0, 0);
    for task in tasks {
        let (failed, read_token) = task.await??;
        load_errors += failed;
        token = token.max(read_token);
    }
    progress.abort();
    bar.finish_and_clear();
    let load_s = started.elapsed().as_secs_f64();
    let loaded = sent.load(Ordering::Relaxed);
    ensure!(loaded > 0, "nothing was loaded");

    // The first search waits for the index to cover the load.
    let mut searchers = Vec::with_capacity(options.searchers);
    for i in 0..options.searchers {
        searchers.push(
            connect(format!("q{tag}-{i}"))
                .await
                .context("a searcher's connect")?,
        );
    }
    searchers[0].observe_read_token(token);
    let first = Instant::now();
    let reply = searchers[0].search(&word(0), LIMIT).await?;
    let lag = first.elapsed();
    ensure!(
        !reply.messages.is_empty(),
        "the most common word matched nothing"
    );

    // Timed searches, kinds in turn.
    let per_searcher = options.queries.div_ceil(options.searchers);
    let tasks: Vec<_> = (searchers.into_iter().enumerate())
        .map(|(i, client)| {
            let (tag, options) = (tag.clone(), options.clone());
            tokio::spawn(async move {
                let mut rng = Rng(1_000 + i as u64);
                let mut by_kind: Vec<Latencies> = KINDS.iter().map(|_| Latencies::new()).collect();
                let (mut all, mut hits, mut truncated, mut errors) =
                    (Latencies::new(), 0u64, 0u64, 0u64);
                for n in 0..per_searcher {
                    let kind = (n + i) % KINDS.len();
                    let q = query(kind, &mut rng, &tag, &options);
                    let started = Instant::now();
                    match client.search(&q, LIMIT).await {
                        Ok(reply) => {
                            let took = started.elapsed();
                            by_kind[kind].record(took);
                            all.record(took);
                            hits += reply.messages.len() as u64;
                            truncated += u64::from(reply.truncated);
                        }
                        Err(_) => errors += 1,
                    }
                }
                (by_kind, all, hits, truncated, errors)
            })
        })
        .collect();
    let (mut by_kind, mut all) = (
        KINDS.iter().map(|_| Latencies::new()).collect::<Vec<_>>(),
        Latencies::new(),
    );
    let (mut hits, mut truncated, mut errors) = (0, 0, 0);
    let timed = Instant::now();
    for task in tasks {
        let (k, a, h, t, e) = task.await?;
        for (mine, theirs) in by_kind.iter_mut().zip(&k) {
            mine.merge(theirs);
        }
        all.merge(&a);
        hits += h;
        truncated += t;
        errors += e;
    }
    let window = timed.elapsed().as_secs_f64();
    let done = all.summary();
    let mut result = RunResult::new("search", "cellchat", cellchat.node_count());
    result.clients = options.searchers;
    result.duration_s = window;
    result.ops = (options.searchers * per_searcher) as u64 - errors;
    result.errors = errors;
    result.throughput_per_s = result.ops as f64 / window;
    result.latency_ms = done;
    let extra = &mut result.extra;
    extra.insert("messages_loaded".into(), loaded.into());
    extra.insert("load_errors".into(), load_errors.into());
    extra.insert("load_rate_per_s".into(), (loaded as f64 / load_s).into());
    extra.insert("index_lag_ms".into(), (lag.as_secs_f64() * 1000.0).into());
    extra.insert("hits".into(), hits.into());
    extra.insert("truncated".into(), truncated.into());
    for (kind, latencies) in KINDS.iter().zip(&by_kind) {
        let summary = latencies.summary();
        extra.insert(
            format!("{kind} p50/p99/max ms"),
            format!("{:.2}/{:.2}/{:.2}", summary.p50, summary.p99, summary.max).into(),
        );
    }
    Ok(result)
}
