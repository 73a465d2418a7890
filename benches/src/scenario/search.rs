//! `search`: how long a full-text search takes on a cluster holding N plaintext messages.
//! U users load N messages into C channels as the clients send them without a channel key
//! (signed plaintext, `Client::send_text`), 12 words each drawn from a Zipf-like vocabulary (a
//! few words are very common, most are rare). Then S searching clients run Q searches of six
//! kinds through the client library, each answered by the searcher's nearest node from its
//! index: first on a quiet cluster, then the same searches again while a writer sends at a
//! fixed rate.
//!
//! The searchers connect before the load, and right after its last acknowledgement each makes
//! one search carrying the loaders' newest read token: a node answers it only once its index
//! covers the whole load, so the time of that search is the indexing lag.
//!
//! Every hit is checked against its query (words, prefix, sender, channel) after it is timed,
//! so a fast but wrong answer shows up as `wrong_hits`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cellchat_client::identity::Identity;
use cellchat_client::Client;
use futures::{StreamExt, TryStreamExt};
use proto::WireMessage;
use serde_json::json;
use testkit::{metric_value, scrape_metrics};

use crate::stats::{Latencies, RunResult};
use crate::sut::cellchat::{client_config, Cellchat};
use crate::sut::procs::rss_bytes;
use crate::sut::System;

/// Distinct words in the vocabulary.
const VOCABULARY: u64 = 50_000;
/// Words per message.
const WORDS: usize = 12;
/// Sends one loading user keeps in flight: with the default 100 users, hundreds of sends wait
/// at the leader at once, so it batches them into few log entries.
const IN_FLIGHT: usize = 8;
/// Hits asked for per search (the most a node returns).
const LIMIT: u32 = 100;
/// How long the writer sends before the searches of the second pass begin, so that every
/// search of the pass runs beside its writes.
const WRITE_LEAD: Duration = Duration::from_secs(1);
/// The nodes refresh their index-size gauges every 5 s; a scrape waits this long at most for
/// them to show the whole load.
const GAUGE_WAIT: Duration = Duration::from_secs(20);

/// What one `search` run does.
#[derive(Debug, Clone)]
pub struct SearchOptions {
    /// Messages loaded before the searches.
    pub messages: u64,
    /// Channels they are spread over.
    pub channels: usize,
    /// Loading users, each with a client of its own.
    pub users: usize,
    /// Searches timed in each pass.
    pub queries: usize,
    /// Concurrent searching clients.
    pub searchers: usize,
    /// Messages per second a writer sends during the second pass; 0 skips that pass.
    pub write_rate: f64,
}

/// splitmix64: small, fast, deterministic, so every run loads the same words.
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

    /// A word rank, log-uniform over the vocabulary: rank r comes about 1/r as often (Zipf
    /// with exponent 1), as words do in text.
    fn rank(&mut self) -> u64 {
        let k = ((VOCABULARY + 1) as f64).powf(self.unit()) as u64;
        k.clamp(1, VOCABULARY) - 1
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// One message's text.
    fn text(&mut self) -> String {
        let words: Vec<String> = (0..WORDS).map(|_| word(self.rank())).collect();
        words.join(" ")
    }
}

/// The word of a rank. Words of the same leading digits share a prefix, so `w42*` stands for
/// a 3-letter prefix typed into a search box: it expands to up to 128 dictionary tokens.
fn word(rank: u64) -> String {
    format!("w{rank}")
}

/// Ranks of the common query words: with 12 words a message, each is in 10-55 % of the
/// messages, so a search for one fills its page from the newest few hundred.
const COMMON: std::ops::Range<u64> = 0..10;
/// Ranks of the rare query words: each is in roughly 20-200 messages per million, so a search
/// walks its whole list.
const RARE: std::ops::Range<u64> = 5_000..VOCABULARY;
/// Ranks of the words asked for with `in:`: frequent enough that most channels hold some.
const CHANNEL_WORD: std::ops::Range<u64> = 0..1_000;

fn pick(rng: &mut Rng, range: std::ops::Range<u64>) -> String {
    word(range.start + rng.below(range.end - range.start))
}

/// User and channel names of one run: a name registered once stays bound to its key, so each
/// run's are new.
#[derive(Clone)]
struct Names {
    tag: String,
}

impl Names {
    fn user(&self, i: u64) -> String {
        format!("s{}-{i}", self.tag)
    }

    fn channel(&self, i: u64) -> String {
        format!("c{}-{i}", self.tag)
    }
}

/// The six kinds of query, by name.
const KINDS: [&str; 6] = [
    "rare word",
    "common word",
    "common + rare",
    "prefix",
    "from:user",
    "in:channel + word",
];

enum Term {
    Word(String),
    Prefix(String),
    From(String),
    In(String),
}

/// One query of one kind, and what its hits must satisfy.
struct Search {
    terms: Vec<Term>,
}

impl Search {
    fn new(kind: usize, rng: &mut Rng, names: &Names, options: &SearchOptions) -> Search {
        let terms = match kind {
            0 => vec![Term::Word(pick(rng, RARE))],
            1 => vec![Term::Word(pick(rng, COMMON))],
            2 => vec![Term::Word(pick(rng, COMMON)), Term::Word(pick(rng, RARE))],
            3 => vec![Term::Prefix(format!("w{}", 10 + rng.below(90)))],
            4 => vec![Term::From(names.user(rng.below(options.users as u64)))],
            _ => vec![
                Term::In(names.channel(rng.below(options.channels as u64))),
                Term::Word(pick(rng, CHANNEL_WORD)),
            ],
        };
        Search { terms }
    }

    fn text(&self) -> String {
        let terms: Vec<String> = (self.terms.iter())
            .map(|term| match term {
                Term::Word(w) => w.clone(),
                Term::Prefix(p) => format!("{p}*"),
                Term::From(u) => format!("from:{u}"),
                Term::In(c) => format!("in:{c}"),
            })
            .collect();
        terms.join(" ")
    }

    /// Whether `hit` satisfies every term (the loaded texts are words separated by spaces).
    fn matches(&self, hit: &WireMessage) -> bool {
        let current = hit.edit.as_deref().unwrap_or(hit);
        let Some(text) = proto::search::plaintext_of(&current.body) else {
            return false;
        };
        self.terms.iter().all(|term| match term {
            Term::Word(w) => text.split(' ').any(|t| t == w),
            Term::Prefix(p) => text.split(' ').any(|t| t.starts_with(p.as_str())),
            Term::From(u) => hit.sender == *u,
            Term::In(c) => hit.channel == *c,
        })
    }
}

/// What the searches of one kind (or all) measured.
#[derive(Default, Clone)]
struct Tally {
    latencies: Latencies,
    queries: u64,
    errors: u64,
    hits: u64,
    /// Searches that found nothing.
    empty: u64,
    /// Searches the node stopped early (`SearchReply::truncated`).
    truncated: u64,
    /// Hits that do not satisfy their query.
    wrong_hits: u64,
}

impl Tally {
    fn merge(&mut self, other: &Tally) {
        self.latencies.merge(&other.latencies);
        self.queries += other.queries;
        self.errors += other.errors;
        self.hits += other.hits;
        self.empty += other.empty;
        self.truncated += other.truncated;
        self.wrong_hits += other.wrong_hits;
    }

    fn json(&self) -> serde_json::Value {
        let s = self.latencies.summary();
        json!({
            "queries": self.queries,
            "errors": self.errors,
            "p50_ms": s.p50,
            "p90_ms": s.p90,
            "p99_ms": s.p99,
            "max_ms": s.max,
            "hits": self.hits,
            "empty": self.empty,
            "truncated": self.truncated,
            "wrong_hits": self.wrong_hits,
        })
    }
}

/// Sends `count` messages as one user, [`IN_FLIGHT`] at a time, each made as it is sent (the
/// load is never held in memory); answers the failed sends and the client's read token after
/// the last.
async fn load(
    client: Client,
    names: Names,
    seed: u64,
    count: u64,
    channels: usize,
    sent: Arc<AtomicU64>,
) -> (u64, u64) {
    let mut rng = Rng(seed);
    let client = &client;
    let items = (0..count).map(|_| (names.channel(rng.below(channels as u64)), rng.text()));
    let mut sends = futures::stream::iter(items)
        .map(|(channel, text)| async move { client.send_text(&channel, &text, None).await })
        .buffer_unordered(IN_FLIGHT);
    let mut failures = 0;
    while let Some(outcome) = sends.next().await {
        match outcome {
            Ok(_) => {
                sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => failures += 1,
        }
    }
    drop(sends);
    (failures, client.read_token())
}

/// Connects `count` clients, each a user named by `name`.
async fn connect_users(
    target: &crate::sut::cellchat::Target,
    count: usize,
    what: &str,
    name: impl Fn(usize) -> String,
) -> Result<Vec<Client>> {
    let bar = super::bar(count as u64, what);
    let clients = futures::stream::iter(0..count)
        .map(|i| {
            let (identity, bar) = (Identity::ephemeral(name(i), None), bar.clone());
            async move {
                let client = Client::connect(client_config(target, Some(identity))).await?;
                bar.inc(1);
                anyhow::Ok(client)
            }
        })
        .buffered(super::CONNECT_PARALLELISM)
        .try_collect()
        .await;
    bar.finish_and_clear();
    clients
}

/// One pass of the searches: query g (0..Q) goes to searcher g mod S and is of kind g mod 6,
/// each searcher's made from a seed of its own, so every pass runs the same queries. Answers
/// the tallies by kind and the pass's wall time.
async fn search_pass(
    searchers: &[Client],
    names: &Names,
    options: &SearchOptions,
    label: &str,
) -> Result<(Vec<Tally>, Duration)> {
    let bar = super::bar(options.queries as u64, label);
    let count = searchers.len();
    let started = Instant::now();
    let tasks: Vec<_> = (searchers.iter().cloned().enumerate())
        .map(|(i, client)| {
            let (names, options, bar) = (names.clone(), options.clone(), bar.clone());
            tokio::spawn(async move {
                let mut rng = Rng(1_000 + i as u64);
                let mut tallies = vec![Tally::default(); KINDS.len()];
                for g in (i..options.queries).step_by(count) {
                    let kind = g % KINDS.len();
                    let search = Search::new(kind, &mut rng, &names, &options);
                    let text = search.text();
                    let began = Instant::now();
                    let outcome = client.search(&text, LIMIT).await;
                    let took = began.elapsed();
                    let tally = &mut tallies[kind];
                    tally.queries += 1;
                    match outcome {
                        Ok(reply) => {
                            tally.latencies.record(took);
                            tally.hits += reply.messages.len() as u64;
                            tally.empty += u64::from(reply.messages.is_empty());
                            tally.truncated += u64::from(reply.truncated);
                            let wrong = reply.messages.iter().filter(|m| !search.matches(m));
                            tally.wrong_hits += wrong.count() as u64;
                        }
                        Err(_) => tally.errors += 1,
                    }
                    bar.inc(1);
                }
                tallies
            })
        })
        .collect();
    let mut by_kind = vec![Tally::default(); KINDS.len()];
    for task in tasks {
        for (mine, theirs) in by_kind.iter_mut().zip(task.await?) {
            mine.merge(&theirs);
        }
    }
    bar.finish_and_clear();
    Ok((by_kind, started.elapsed()))
}

/// Sends into random channels at `rate` until `stop`, each send on its own task so a slow
/// acknowledgement does not lower the rate; answers the sends acknowledged, the failed ones
/// and their acknowledgement latencies.
async fn write_steadily(
    client: Client,
    names: Names,
    channels: usize,
    rate: f64,
    stop: Arc<AtomicBool>,
) -> (u64, u64, Latencies) {
    let gap = Duration::from_secs_f64(1.0 / rate);
    let mut rng = Rng(7_777);
    let mut sends = tokio::task::JoinSet::new();
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let (client, channel, text) = (
            client.clone(),
            names.channel(rng.below(channels as u64)),
            rng.text(),
        );
        sends.spawn(async move {
            let began = Instant::now();
            client
                .send_text(&channel, &text, None)
                .await
                .map(|_| began.elapsed())
        });
        next += gap;
        tokio::time::sleep_until(next.into()).await;
    }
    let (mut sent, mut failed, mut latencies) = (0, 0, Latencies::new());
    while let Some(done) = sends.join_next().await {
        match done {
            Ok(Ok(took)) => {
                latencies.record(took);
                sent += 1;
            }
            _ => failed += 1,
        }
    }
    (sent, failed, latencies)
}

/// Per node: its index's size as its gauges report it, the searches it answered, its RSS.
/// Waits up to [`GAUGE_WAIT`] for every node's gauge to reach `indexed` messages.
async fn node_figures(cellchat: &Cellchat, indexed: u64) -> Vec<serde_json::Value> {
    let procs = cellchat.node_procs();
    let deadline = Instant::now() + GAUGE_WAIT;
    loop {
        let mut figures = Vec::with_capacity(procs.len());
        let mut behind = false;
        for &(pid, metrics) in &procs {
            let text = match metrics {
                Some(addr) => scrape_metrics(addr).await.unwrap_or_default(),
                None => String::new(),
            };
            let messages = metric_value(&text, "cellchat_search_messages");
            behind |= messages.is_none_or(|m| m < indexed as f64);
            let mib = |bytes: f64| bytes / (1024.0 * 1024.0);
            figures.push(json!({
                "search_messages": messages.map(|m| m as u64),
                "search_mib": metric_value(&text, "cellchat_search_bytes").map(mib),
                "searches": metric_value(&text, "cellchat_searches_total").map(|s| s as u64),
                "rss_mib": pid.and_then(rss_bytes).map(|b| mib(b as f64)),
            }));
        }
        if !behind || Instant::now() >= deadline {
            return figures;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The result of one pass: overall figures in the common fields, each kind in `kinds`.
fn pass_result(
    cellchat: &Cellchat,
    options: &SearchOptions,
    part: &str,
    by_kind: &[Tally],
    wall: Duration,
) -> RunResult {
    let mut all = Tally::default();
    for tally in by_kind {
        all.merge(tally);
    }
    let mut result = RunResult::new("search", "cellchat", cellchat.node_count());
    result.clients = options.searchers;
    result.duration_s = wall.as_secs_f64();
    result.ops = all.queries - all.errors;
    result.errors = all.errors;
    result.throughput_per_s = result.ops as f64 / wall.as_secs_f64();
    result.latency_ms = all.latencies.summary();
    result.set("part", part);
    result.set("hits", all.hits);
    result.set("empty", all.empty);
    result.set("truncated", all.truncated);
    result.set("wrong_hits", all.wrong_hits);
    let kinds: serde_json::Map<String, serde_json::Value> = (KINDS.iter())
        .zip(by_kind)
        .map(|(kind, tally)| ((*kind).to_owned(), tally.json()))
        .collect();
    result.set("kinds", kinds);
    result
}

/// Runs `search` on a cluster the harness started (or joined): two results, `part: quiet`
/// (the load, the indexing lag, the searches, each node's index) and, with a write rate,
/// `part: while_writing`.
///
/// # Errors
/// A client could not connect, nothing was loaded, or the first searches failed.
pub async fn run(cellchat: &Cellchat, options: &SearchOptions) -> Result<Vec<RunResult>> {
    let target = cellchat.target().clone();
    let names = Names {
        tag: format!("{:06x}", rand::random::<u32>() & 0xff_ffff),
    };
    let rss_before: Vec<Option<u64>> = (cellchat.node_procs().iter())
        .map(|(pid, _)| pid.and_then(rss_bytes))
        .collect();
    let loaders = connect_users(&target, options.users, "connecting users", |i| {
        names.user(i as u64)
    })
    .await
    .context("a loading user's connect")?;
    let searchers = connect_users(&target, options.searchers, "connecting searchers", |i| {
        format!("q{}-{i}", names.tag)
    })
    .await
    .context("a searcher's connect")?;

    // Load: user i sends its share, the first `messages % users` users one more.
    let sent = Arc::new(AtomicU64::new(0));
    let users = options.users as u64;
    let started = Instant::now();
    let bar = super::bar(options.messages, "loading messages");
    let tasks: Vec<_> = (loaders.into_iter().enumerate())
        .map(|(i, client)| {
            let i = i as u64;
            let count = options.messages / users + u64::from(i < options.messages % users);
            let (names, sent) = (names.clone(), sent.clone());
            tokio::spawn(load(client, names, 7 + i, count, options.channels, sent))
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
        let (failed, read_token) = task.await?;
        load_errors += failed;
        token = token.max(read_token);
    }
    let load_time = started.elapsed();
    progress.abort();
    bar.finish_and_clear();
    let loaded = sent.load(Ordering::Relaxed);
    ensure!(
        loaded > 0,
        "nothing was loaded ({load_errors} sends failed)"
    );

    // Indexing lag: each searcher's first search waits for its node to cover the whole load.
    let firsts = futures::future::join_all(searchers.iter().map(|client| async move {
        client.observe_read_token(token);
        let began = Instant::now();
        let reply = client.search(&word(0), LIMIT).await;
        (began.elapsed(), reply)
    }))
    .await;
    let mut lags = Vec::with_capacity(firsts.len());
    for (took, reply) in firsts {
        let reply = reply.context("a first search after the load")?;
        if reply.messages.is_empty() {
            bail!("the most common word matched nothing after the load");
        }
        lags.push(took.as_secs_f64() * 1000.0);
    }

    let (by_kind, wall) = search_pass(&searchers, &names, options, "searching").await?;
    let nodes = node_figures(cellchat, loaded).await;
    let mut quiet = pass_result(cellchat, options, "quiet", &by_kind, wall);
    quiet.set("messages_loaded", loaded);
    quiet.set("load_errors", load_errors);
    quiet.set("users", options.users);
    quiet.set("channels", options.channels);
    quiet.set("load_s", load_time.as_secs_f64());
    quiet.set("load_rate_per_s", loaded as f64 / load_time.as_secs_f64());
    quiet.set("index_lag_ms", lags.iter().copied().fold(0.0, f64::max));
    quiet.set("index_lag_ms_by_searcher", lags);
    quiet.set(
        "server_rss_before_load_mib",
        (rss_before.iter())
            .map(|b| b.map(|b| b as f64 / (1024.0 * 1024.0)))
            .collect::<Vec<_>>(),
    );
    quiet.set("nodes", nodes);
    let mut results = vec![quiet];

    if options.write_rate > 0.0 {
        let writer = connect_users(&target, 1, "connecting the writer", |_| {
            format!("s{}-live", names.tag)
        })
        .await
        .context("the writer's connect")?;
        let stop = Arc::new(AtomicBool::new(false));
        let writing_since = Instant::now();
        let writing = tokio::spawn(write_steadily(
            writer[0].clone(),
            names.clone(),
            options.channels,
            options.write_rate,
            stop.clone(),
        ));
        tokio::time::sleep(WRITE_LEAD).await;
        let (by_kind, wall) =
            search_pass(&searchers, &names, options, "searching while writing").await?;
        stop.store(true, Ordering::Relaxed);
        let writing_for = writing_since.elapsed();
        let (written, write_errors, acks) = writing.await?;
        let mut busy = pass_result(cellchat, options, "while_writing", &by_kind, wall);
        busy.rate_per_s = options.write_rate;
        busy.set("written", written);
        busy.set("write_errors", write_errors);
        busy.set("written_per_s", written as f64 / writing_for.as_secs_f64());
        let acks = acks.summary();
        busy.set("write_ack_p50_ms", acks.p50);
        busy.set("write_ack_p99_ms", acks.p99);
        results.push(busy);
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_follow_their_ranks_and_queries_match_their_own_kind() {
        let mut rng = Rng(1);
        let mut counts = vec![0u64; VOCABULARY as usize];
        for _ in 0..200_000 {
            counts[rng.rank() as usize] += 1;
        }
        // Rank r comes about 1/r as often: the top word far more than rank 100's.
        assert!(counts[0] > 50 * counts[100].max(1), "{:?}", &counts[..5]);
        assert_eq!(rng.text().split(' ').count(), WORDS);

        let names = Names { tag: "t".into() };
        let options = SearchOptions {
            messages: 1,
            channels: 3,
            users: 2,
            queries: 1,
            searchers: 1,
            write_rate: 0.0,
        };
        for kind in 0..KINDS.len() {
            let text = Search::new(kind, &mut rng, &names, &options).text();
            proto::search::Query::parse(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        }
        let search = Search {
            terms: vec![
                Term::Prefix("w42".into()),
                Term::From("s-1".into()),
                Term::Word("w7".into()),
            ],
        };
        let hit = |sender: &str, text: &str| WireMessage {
            channel: "c".into(),
            seq: 1,
            sender: sender.into(),
            body: cellchat_client::crypto::plain_body(text),
            at_ms: 0,
            client_seq: 1,
            relation: None,
            deleted: false,
            edits: 0,
            edit: None,
            replies: 0,
            reactions: Vec::new(),
        };
        assert!(search.matches(&hit("s-1", "w7 w4213 w9")));
        assert!(
            !search.matches(&hit("s-2", "w7 w4213 w9")),
            "another sender"
        );
        assert!(!search.matches(&hit("s-1", "w70 w4213")), "w70 is not w7");
        assert!(
            !search.matches(&hit("s-1", "w7 w143")),
            "no word starts w42"
        );
    }
}
