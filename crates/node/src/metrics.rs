//! Prometheus metrics and health endpoints of one node, served over plain HTTP/1.1.
//!
//! `GET /metrics` answers OpenMetrics text of every series registered in [`Metrics::new`];
//! `GET /health` answers 200 while the process runs; `GET /ready` answers 200 once the node
//! knows a leader and has applied everything it knows to be committed, else 503. One request
//! per connection, GET only, 8 KiB request limit: it serves scrapers and probes, not browsers.
//!
//! With a [`MetricsToken`] configured, `/metrics` answers 401 unless the request carries
//! `Authorization: Bearer TOKEN`, compared in constant time. `/health` and `/ready` stay open:
//! load balancers and orchestrators probe them without credentials, and they tell no more than
//! whether the node is up. The listener takes at most [`METRICS_CONNECTIONS_MAX`] connections
//! (fewer from one address), so a stranger cannot hold the node's descriptors through it.
//!
//! Names follow Prometheus conventions: base units in the name (`_seconds`, `_bytes`), `_total`
//! on counters, and identities as labels of a constant-1 gauge (`node_info`, `raft_leader_info`)
//! rather than as gauge values, since a 64-bit node id does not survive a float.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use openraft::{RaftMetrics, ServerState};
use parking_lot::Mutex;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::conn_limit::{ConnLimiter, ConnLimits, Refusal, RefusalObserver};
use crate::raft::Raft;
pub use crate::storage_metrics::StorageMetrics;
use crate::storage_metrics::{count_histogram, latency_histogram};
use crate::types::{NodeId, TypeConfig};

type Labels = Vec<(&'static str, &'static str)>;
type OwnedLabels = Vec<(&'static str, String)>;

/// The content type of what [`encode`] writes: OpenMetrics text (counter families without
/// `_total` in `# TYPE`, a closing `# EOF`). Scrapers pick their parser by this header, so it
/// must not claim the older Prometheus text format.
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Most directory entries one scrape visits per tree when summing disk bytes: a data dir holds
/// a few hundred files, and the bound keeps a scrape cheap if something else fills it.
const DISK_WALK_ENTRIES_MAX: usize = 100_000;

/// Most bytes of an HTTP request head.
const REQUEST_BYTES_MAX: usize = 8192;

/// Most open connections to the metrics listener: scrapers and probes use one at a time, and
/// each answer takes at most the request timeout plus a render.
pub const METRICS_CONNECTIONS_MAX: usize = 64;
/// Most open metrics connections from one address.
const METRICS_CONNECTIONS_PER_IP_MAX: usize = 16;

/// The bearer token `/metrics` requires. Its `Debug` shows no token, so a logged config does
/// not leak it.
///
/// Invariant: 1 to [`MetricsToken::LEN_MAX`] visible ASCII characters (the bytes that can
/// stand in an HTTP header value without quoting or trimming).
#[derive(Clone, PartialEq, Eq)]
pub struct MetricsToken(String);

impl MetricsToken {
    /// Longest token accepted.
    pub const LEN_MAX: usize = 256;

    /// Checks and wraps `token`.
    ///
    /// # Errors
    /// A sentence saying what is wrong, without the token.
    pub fn new(token: String) -> Result<MetricsToken, String> {
        if token.is_empty() || token.len() > Self::LEN_MAX {
            return Err(format!(
                "metrics token must be 1 to {} characters, got {}",
                Self::LEN_MAX,
                token.len()
            ));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("metrics token must be visible ASCII without spaces".into());
        }
        Ok(MetricsToken(token))
    }

    /// Whether `presented` is the token, in time that depends on its length only.
    fn matches(&self, presented: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        bool::from(self.0.as_bytes().ct_eq(presented))
    }
}

impl std::fmt::Debug for MetricsToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricsToken(..)")
    }
}

/// Whether the request head `head` may read `/metrics`: always without a token, else only with
/// `Authorization: Bearer TOKEN` (header name and scheme in any case).
fn authorized(head: &[u8], token: Option<&MetricsToken>) -> bool {
    let Some(token) = token else {
        return true;
    };
    let mut presented = None;
    for line in head.split(|&b| b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if !name.eq_ignore_ascii_case(b"authorization") {
            continue;
        }
        if presented.is_some() {
            // Two Authorization headers: ambiguous, refused.
            return false;
        }
        let scheme = value
            .get(..7)
            .filter(|s| s.eq_ignore_ascii_case(b"bearer "));
        presented = Some(scheme.map_or(&[][..], |_| value[7..].trim_ascii()));
    }
    presented.is_some_and(|p| token.matches(p))
}

/// `registry.register(name, help, metric.clone())` for each `name, help => metric;` line.
macro_rules! register {
    ($registry:expr; $($name:literal, $help:literal => $metric:expr;)*) => {
        $($registry.register($name, $help, $metric.clone());)*
    };
}

/// Who this node is, exported as the labels of `cellchat_node_info`.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// The node's Raft id.
    pub id: NodeId,
    /// The node's human name, when it has one; exported as the `name` label only then.
    pub name: Option<String>,
}

impl NodeInfo {
    fn labels(&self) -> OwnedLabels {
        let mut labels = vec![
            ("id", self.id.to_string()),
            ("version", env!("CARGO_PKG_VERSION").to_owned()),
        ];
        labels.extend(self.name.clone().map(|name| ("name", name)));
        labels
    }
}

/// The directories whose size `/metrics` reports, all inside the node's data dir.
#[derive(Debug, Clone)]
pub struct DiskPaths {
    /// The data dir; its file system's size and free space are reported.
    pub data: PathBuf,
    /// The Raft log (segments and meta files).
    pub wal: PathBuf,
    /// The chat state: RocksDB and snapshot files.
    pub state: PathBuf,
}

/// Bytes allocated on disk to the regular files under `root` (as `du` counts them: blocks, not
/// lengths, so preallocated segments count in full). Symlinks are not followed, so the walk
/// stays inside the node's own data; unreadable entries are skipped.
fn dir_bytes(root: &Path) -> u64 {
    let mut total = 0u64;
    let mut visited = 0usize;
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            visited += 1;
            if visited > DISK_WALK_ENTRIES_MAX {
                return total;
            }
            // `DirEntry::metadata` does not traverse a symlink.
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                dirs.push(entry.path());
            } else if meta.is_file() {
                total = total.saturating_add(meta.blocks().saturating_mul(512));
            }
        }
    }
    total
}

/// Counts changes of the leader this node knows. The first observation only sets the baseline;
/// after it, every observation that differs from the previous one is a change, to or from no
/// leader included.
#[derive(Debug, Default)]
struct LeaderChanges {
    last: Option<Option<NodeId>>,
}

impl LeaderChanges {
    /// Whether `leader` is a change from the previous observation.
    fn observe(&mut self, leader: Option<NodeId>) -> bool {
        let changed = self.last.is_some_and(|last| last != leader);
        self.last = Some(leader);
        changed
    }
}

/// The gauges refreshed at each scrape (Raft, disk, snapshot age) and the leader-change count.
#[derive(Default)]
struct Scraped {
    role: Family<Labels, Gauge>,
    term: Gauge,
    has_leader: Gauge,
    leader_info: Family<OwnedLabels, Gauge>,
    /// The leader whose `leader_info` series is exported, so the stale one can be removed.
    leader_shown: Mutex<Option<NodeId>>,
    leader_changes_total: Counter,
    leader_changes: Mutex<LeaderChanges>,
    commit_index: Gauge,
    applied_index: Gauge,
    apply_lag: Gauge,
    last_log_index: Gauge,
    snapshot_age_seconds: Family<Labels, Gauge<f64, AtomicU64>>,
    wal_disk_bytes: Gauge,
    state_disk_bytes: Gauge,
    filesystem_avail_bytes: Gauge,
    filesystem_size_bytes: Gauge,
}

/// The node's metrics. Counters are bumped by the code paths they count; Raft gauges, disk
/// usage and snapshot age are refreshed at each scrape.
pub struct Metrics {
    registry: Registry,
    /// Sends acknowledged by this node (as leader).
    pub sends_total: Counter,
    /// Messages handed to stream subscribers by this node.
    pub deliveries_total: Counter,
    /// Long-poll streams currently waiting on this node.
    pub stream_waiters: Gauge,
    /// Open client connections.
    pub connected_clients: Gauge,
    /// Open push connections (a subset of `connected_clients`).
    pub push_connections: Gauge,
    /// Push connections opened since the node started: with `push_connections`, how often
    /// clients come back (a dropped connection is opened again).
    pub push_connections_opened: Counter,
    /// Open push subscriptions.
    pub push_subscriptions: Gauge,
    /// Push batches encoded (each shared by every subscriber at the same position).
    pub push_batches_encoded: Counter,
    /// Users online in the cluster as this node knows it (set by `Ephemeral`).
    pub users_online: Gauge,
    /// Typing notes this node passed on from its own clients (counted by `Ephemeral`).
    pub typing_notes: Counter,
    /// Searches this node answered.
    pub searches_total: Counter,
    /// Messages in this node's search index (set by the indexer's owner).
    pub search_messages: Gauge,
    /// Rough size of this node's search index in bytes.
    pub search_bytes: Gauge,
    /// Sends per proposed log entry.
    pub batch_sends: Histogram,
    /// From proposing a batch to its applied answer.
    pub propose_seconds: Histogram,
    rpc_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    /// Connections closed at accept because a cap was reached, by listener and cap.
    connections_refused: Family<Labels, Counter>,
    scraped: Scraped,
    storage: StorageMetrics,
    disk: DiskPaths,
    /// Commit index as last saved by the log store, which is where the node reads it.
    committed: Arc<AtomicU64>,
}

impl Metrics {
    /// Registers every metric. `committed` is the log store's committed-index cell, `storage`
    /// the metrics the log and the state machine were opened with, `node` this node's identity
    /// and `disk` the directories whose size is reported.
    pub fn new(
        committed: Arc<AtomicU64>,
        storage: StorageMetrics,
        node: NodeInfo,
        disk: DiskPaths,
    ) -> Metrics {
        let mut metrics = Metrics {
            registry: Registry::default(),
            sends_total: Counter::default(),
            deliveries_total: Counter::default(),
            stream_waiters: Gauge::default(),
            connected_clients: Gauge::default(),
            push_connections: Gauge::default(),
            push_connections_opened: Counter::default(),
            push_subscriptions: Gauge::default(),
            push_batches_encoded: Counter::default(),
            users_online: Gauge::default(),
            typing_notes: Counter::default(),
            searches_total: Counter::default(),
            search_messages: Gauge::default(),
            search_bytes: Gauge::default(),
            batch_sends: count_histogram(),
            propose_seconds: latency_histogram(18),
            rpc_seconds: Family::new_with_constructor(|| latency_histogram(16)),
            connections_refused: Family::default(),
            scraped: Scraped::default(),
            storage,
            disk,
            committed,
        };
        let node_info = Family::<OwnedLabels, Gauge>::default();
        node_info.get_or_create(&node.labels()).set(1);
        let (m, s, d) = (&metrics, &metrics.storage, &metrics.scraped);
        let mut r = Registry::with_prefix("cellchat");
        register! { r;
            "sends", "Sends acknowledged by this node" => m.sends_total;
            "deliveries", "Messages delivered to streams" => m.deliveries_total;
            "stream_waiters", "Long-poll streams waiting" => m.stream_waiters;
            "connected_clients", "Open client connections" => m.connected_clients;
            "connections_refused",
                "Connections closed at accept because a listener's cap was reached"
                => m.connections_refused;
            "push_connections", "Open push connections" => m.push_connections;
            "push_connections_opened", "Push connections opened since the node started"
                => m.push_connections_opened;
            "push_subscriptions", "Open push subscriptions" => m.push_subscriptions;
            "push_batches_encoded",
                "Push batches encoded, each shared by every subscriber at the same position"
                => m.push_batches_encoded;
            "users_online", "Users online in the cluster as this node knows it: with a push \
                connection here, or on a peer whose news is fresh" => m.users_online;
            "typing_notes", "Typing notes this node passed on from its own clients"
                => m.typing_notes;
            "searches", "Searches this node answered" => m.searches_total;
            "search_messages", "Messages in this node's search index (plaintext only)"
                => m.search_messages;
            "search_bytes", "Rough memory held by this node's search index, in bytes"
                => m.search_bytes;
            "batch_sends", "Sends per proposed log entry" => m.batch_sends;
            "rpc_seconds", "Client RPC latency by method" => m.rpc_seconds;
            "raft_role", "1 for this node's current Raft role" => d.role;
            "raft_term", "Current Raft term" => d.term;
            "raft_has_leader", "1 while this node knows a leader (itself included), else 0"
                => d.has_leader;
            "raft_leader_info", "Always 1, one series labelled with the id of the leader this \
                node knows; absent while it knows none" => d.leader_info;
            "raft_leader_changes", "Changes of the leader this node knows, counted since the \
                process started: each time the leader in its Raft metrics becomes another node \
                or none, or a node after none. A failover usually counts twice (to none, then \
                to the new leader); changes quicker than the metrics watch wakes up may be \
                missed" => d.leader_changes_total;
            "raft_commit_index", "Last committed log index" => d.commit_index;
            "raft_applied_index", "Last applied log index" => d.applied_index;
            "raft_apply_lag", "Committed but not yet applied entries" => d.apply_lag;
            "raft_last_log_index", "Last log index" => d.last_log_index;
            "wal_fsync_seconds", "Duration of each fdatasync of a Raft log segment on the \
                append path (group commits and segment seals)" => s.wal_fsync_seconds;
            "apply_seconds", "Time the chat state machine took to apply one batch of \
                committed entries" => s.apply_seconds;
            "apply_entries", "Committed entries per applied batch" => s.apply_entries;
            "raft_append_round_trip_seconds", "Leader: round trip of each answered \
                AppendEntries that carried entries, from sending it to its answer (the \
                follower's append, fdatasync and both network legs)"
                => s.append_round_trip_seconds;
            "raft_append_in_flight", "Leader: AppendEntries that carried entries out to one \
                follower when each was sent, itself included (more than one: pipelined)"
                => s.append_in_flight;
            "raft_append_handling_seconds", "Follower: time from receiving an AppendEntries that \
                carried entries to answering it (its log append and fdatasync)"
                => s.append_handling_seconds;
            "propose_seconds", "Leader: time from proposing a batch of sends to Raft until it \
                was applied or failed (commit and apply, not the wait for a proposal slot)"
                => m.propose_seconds;
            "snapshot_age_seconds", "Seconds since the current snapshot was built or installed \
                on this node (at startup: since its file was last written); absent before the \
                node has one" => d.snapshot_age_seconds;
            "wal_disk_bytes", "Bytes allocated on disk to the Raft log directory, measured at \
                scrape time" => d.wal_disk_bytes;
            "state_disk_bytes", "Bytes allocated on disk to the chat state (RocksDB and \
                snapshot files), measured at scrape time" => d.state_disk_bytes;
            "data_filesystem_avail_bytes", "Bytes available to this process on the file \
                system holding the data dir" => d.filesystem_avail_bytes;
            "data_filesystem_size_bytes", "Size in bytes of the file system holding the data \
                dir" => d.filesystem_size_bytes;
            "node_info", "Always 1; the labels say which node this is (id, version, and name \
                when set)" => node_info;
        }
        metrics.registry = r;
        metrics
    }

    /// Records one client RPC's latency.
    pub fn observe_rpc(&self, method: &'static str, took: Duration) {
        let labels = vec![("method", method)];
        self.rpc_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// An observer for `listener`'s connection limiter that counts its refusals.
    pub fn refusal_observer(&self, listener: &'static str) -> RefusalObserver {
        let family = self.connections_refused.clone();
        Arc::new(move |refusal: Refusal| {
            let labels = vec![("listener", listener), ("cap", refusal.cap())];
            family.get_or_create(&labels).inc();
        })
    }

    /// Feeds one observation of the leader this node knows to the leader-changes counter.
    fn observe_leader(&self, leader: Option<NodeId>) {
        if self.scraped.leader_changes.lock().observe(leader) {
            self.scraped.leader_changes_total.inc();
        }
    }

    /// Sets the Raft gauges from one view of openraft's metrics.
    fn refresh_raft(&self, m: &RaftMetrics<TypeConfig>) {
        let g = &self.scraped;
        for (state, name) in [
            (ServerState::Leader, "leader"),
            (ServerState::Follower, "follower"),
            (ServerState::Candidate, "candidate"),
            (ServerState::Learner, "learner"),
        ] {
            let value = i64::from(m.state == state);
            g.role.get_or_create(&vec![("role", name)]).set(value);
        }
        let applied = m.last_applied.map_or(0, |l| l.index);
        let committed = self.committed.load(Ordering::Relaxed);
        g.term.set(m.current_term as i64);
        g.has_leader.set(i64::from(m.current_leader.is_some()));
        self.show_leader(m.current_leader);
        g.commit_index.set(committed as i64);
        g.applied_index.set(applied as i64);
        g.apply_lag.set(committed.saturating_sub(applied) as i64);
        g.last_log_index.set(m.last_log_index.unwrap_or(0) as i64);
    }

    /// Keeps exactly one `raft_leader_info` series, for `leader`, or none: the previous
    /// leader's series left in place would report two leaders at once.
    fn show_leader(&self, leader: Option<NodeId>) {
        let (mut shown, info) = (self.scraped.leader_shown.lock(), &self.scraped.leader_info);
        if *shown != leader {
            let labels = |id: NodeId| vec![("leader_id", id.to_string())];
            if let Some(old) = *shown {
                info.remove(&labels(old));
            }
            if let Some(new) = leader {
                info.get_or_create(&labels(new)).set(1);
            }
            *shown = leader;
        }
    }

    /// Sets the disk gauges. Statvfs failing leaves the file system gauges as they were.
    fn refresh_disk(&self) {
        let (g, paths) = (&self.scraped, &self.disk);
        g.wal_disk_bytes.set(dir_bytes(&paths.wal) as i64);
        g.state_disk_bytes.set(dir_bytes(&paths.state) as i64);
        match rustix::fs::statvfs(paths.data.as_path()) {
            Ok(fs) => {
                let avail = fs.f_bavail.saturating_mul(fs.f_frsize);
                g.filesystem_avail_bytes.set(avail as i64);
                let size = fs.f_blocks.saturating_mul(fs.f_frsize);
                g.filesystem_size_bytes.set(size as i64);
            }
            Err(e) => tracing::debug!(dir = %paths.data.display(), error = %e, "statvfs failed"),
        }
    }

    /// Sets the snapshot age from the recorded time, or removes the series before the first
    /// snapshot. A clock stepped back below the snapshot time reads as a fresh snapshot.
    fn refresh_snapshot_age(&self, now: SystemTime) {
        let age = &self.scraped.snapshot_age_seconds;
        match *self.storage.snapshot_made_at.lock() {
            Some(at) => {
                let seconds = now.duration_since(at).unwrap_or_default().as_secs_f64();
                age.get_or_create(&Vec::new()).set(seconds);
            }
            None => age.clear(),
        }
    }

    /// The OpenMetrics text of every metric as last set.
    fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    /// Refreshes the scrape-time gauges (Raft, disk, snapshot age) and encodes everything.
    /// Walks the data dir, so call it off the async runtime's workers.
    pub fn render(&self, raft: &Raft) -> String {
        self.refresh_raft(&crate::raft::metrics_now(raft));
        self.refresh_disk();
        self.refresh_snapshot_age(SystemTime::now());
        self.encode()
    }
}

/// Increments a gauge while it lives, so every exit path (errors, cancelled futures) undoes it.
pub(crate) struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub(crate) fn new(gauge: &Gauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Counts leader changes from openraft's metrics watch until Raft shuts down.
pub async fn count_leader_changes(metrics: Arc<Metrics>, mut watch: crate::raft::MetricsWatch) {
    use openraft::async_runtime::WatchReceiver;
    loop {
        metrics.observe_leader(watch.borrow_watched().current_leader);
        if watch.changed().await.is_err() {
            return;
        }
    }
}

/// Whether the node can serve: it knows a leader and has applied what it knows is committed.
pub fn is_ready(raft: &Raft, committed: u64) -> bool {
    let m = crate::raft::metrics_now(raft);
    let applied = m.last_applied.map_or(0, |l| l.index);
    m.current_leader.is_some() && m.state != ServerState::Shutdown && applied >= committed
}

/// Serves `/metrics`, `/health` and `/ready` until the task is aborted; `/metrics` needs
/// `token` when one is given.
pub fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    raft: Raft,
    token: Option<MetricsToken>,
) -> tokio::task::JoinHandle<()> {
    let limits = ConnLimits::new(METRICS_CONNECTIONS_MAX, METRICS_CONNECTIONS_PER_IP_MAX)
        .expect("the metrics caps are consistent constants");
    let limiter = ConnLimiter::observed(limits, metrics.refusal_observer("metrics"));
    let token = Arc::new(token);
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Some(guard) = limiter.admit(peer, stream.local_addr().ok(), "metrics") else {
                continue;
            };
            let (metrics, raft, token) = (metrics.clone(), raft.clone(), token.clone());
            tokio::spawn(async move {
                let _guard = guard;
                if let Err(e) = answer(stream, metrics, raft, (*token).as_ref()).await {
                    tracing::debug!(%peer, error = %e, "metrics request failed");
                }
            });
        }
    })
}

/// One HTTP answer: status line text, content type, body.
type Reply = (&'static str, &'static str, String);

async fn answer(
    mut stream: TcpStream,
    metrics: Arc<Metrics>,
    raft: Raft,
    token: Option<&MetricsToken>,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let read = async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < REQUEST_BYTES_MAX {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| std::io::Error::other("request timed out"))??;
    let line = buf.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body) =
        if (method, path) == ("GET", "/metrics") && !authorized(&buf, token) {
            unauthorized_reply()
        } else if (method, path) == ("GET", "/metrics") {
            // Rendering walks the data dir; a slow disk must not hold a runtime worker.
            let body = tokio::task::spawn_blocking(move || metrics.render(&raft))
                .await
                .map_err(std::io::Error::other)?;
            metrics_reply(body)
        } else {
            let committed = metrics.committed.load(Ordering::Relaxed);
            other_reply(method, path, is_ready(&raft, committed))
        };
    let challenge = if status == UNAUTHORIZED {
        "www-authenticate: Bearer realm=\"cellchat metrics\"\r\n"
    } else {
        ""
    };
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n{challenge}connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

const UNAUTHORIZED: &str = "401 Unauthorized";

fn unauthorized_reply() -> Reply {
    let body = "/metrics needs the header Authorization: Bearer <the node's --metrics-token>\n";
    (UNAUTHORIZED, "text/plain", body.to_owned())
}

fn metrics_reply(body: String) -> Reply {
    ("200 OK", METRICS_CONTENT_TYPE, body)
}

/// The answer to every request other than `GET /metrics`.
fn other_reply(method: &str, path: &str, ready: bool) -> Reply {
    let (status, body) = match (method, path) {
        ("GET", "/health") => ("200 OK", "ok\n"),
        ("GET", "/ready") if ready => ("200 OK", "ready\n"),
        ("GET", "/ready") => (
            "503 Service Unavailable",
            "not ready: no leader yet, or still applying committed entries\n",
        ),
        ("GET", _) => ("404 Not Found", "try /metrics, /health or /ready\n"),
        _ => ("405 Method Not Allowed", "GET only\n"),
    };
    (status, "text/plain", body.to_owned())
}

#[cfg(test)]
mod tests {
    //! Each test builds `Metrics` over a temporary data dir, drives it the way the node does
    //! (openraft metrics views, storage observations) and reads the encoded text back.
    use super::*;

    fn metrics_in(dir: &Path, name: Option<&str>) -> Metrics {
        let disk = DiskPaths {
            data: dir.to_path_buf(),
            wal: dir.join("log"),
            state: dir.join("sm"),
        };
        for sub in [&disk.wal, &disk.state] {
            std::fs::create_dir_all(sub).expect("mkdir");
        }
        let node = NodeInfo {
            id: 7,
            name: name.map(str::to_owned),
        };
        Metrics::new(
            Arc::new(AtomicU64::new(0)),
            StorageMetrics::default(),
            node,
            disk,
        )
    }

    /// The value of the series written exactly as `series` (name and labels), if present.
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(series)?.strip_prefix(' ')?;
            rest.parse().ok()
        })
    }

    fn raft_view(leader: Option<NodeId>) -> RaftMetrics<TypeConfig> {
        let mut m = RaftMetrics::new_initial(7);
        m.current_leader = leader;
        m.state = if leader == Some(7) {
            ServerState::Leader
        } else {
            ServerState::Follower
        };
        m
    }

    #[test]
    fn node_info_carries_id_and_version_and_the_name_when_set() {
        let dir = tempfile::tempdir().expect("tempdir");
        let version = env!("CARGO_PKG_VERSION");
        let text = metrics_in(dir.path(), None).encode();
        let series = format!("cellchat_node_info{{id=\"7\",version=\"{version}\"}}");
        assert_eq!(value(&text, &series), Some(1.0), "{text}");
        let text = metrics_in(dir.path(), Some("n1")).encode();
        let series = format!("cellchat_node_info{{id=\"7\",version=\"{version}\",name=\"n1\"}}");
        assert_eq!(value(&text, &series), Some(1.0), "{text}");
    }

    #[test]
    fn leader_is_one_labelled_series_and_the_stale_one_goes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let metrics = metrics_in(dir.path(), None);
        let leader_lines = |text: &str| {
            text.lines()
                .filter(|l| l.starts_with("cellchat_raft_leader_info{"))
                .count()
        };

        metrics.refresh_raft(&raft_view(None));
        let text = metrics.encode();
        assert_eq!(value(&text, "cellchat_raft_has_leader"), Some(0.0));
        assert_eq!(leader_lines(&text), 0, "{text}");

        // An id above 2^53 would be rounded as a float gauge; as a label it stays exact.
        let big: NodeId = 18_446_744_073_709_551_557;
        metrics.refresh_raft(&raft_view(Some(big)));
        let text = metrics.encode();
        assert_eq!(value(&text, "cellchat_raft_has_leader"), Some(1.0));
        let series = format!("cellchat_raft_leader_info{{leader_id=\"{big}\"}}");
        assert_eq!(value(&text, &series), Some(1.0), "{text}");
        assert_eq!(leader_lines(&text), 1);

        metrics.refresh_raft(&raft_view(Some(7)));
        let text = metrics.encode();
        assert_eq!(
            value(&text, "cellchat_raft_leader_info{leader_id=\"7\"}"),
            Some(1.0)
        );
        assert_eq!(
            leader_lines(&text),
            1,
            "the previous leader's series is gone: {text}"
        );
        assert_eq!(
            value(&text, "cellchat_raft_role{role=\"leader\"}"),
            Some(1.0)
        );

        metrics.refresh_raft(&raft_view(None));
        let text = metrics.encode();
        assert_eq!(leader_lines(&text), 0, "{text}");
        assert_eq!(value(&text, "cellchat_raft_has_leader"), Some(0.0));
        assert!(
            !text.contains("cellchat_raft_leader "),
            "old float gauge: {text}"
        );
    }

    #[test]
    fn leader_changes_count_every_change_after_the_first_observation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let metrics = metrics_in(dir.path(), None);
        // Baseline, repeat, elected, repeat, another leader, none, back again.
        for leader in [None, None, Some(1), Some(1), Some(2), None, Some(2)] {
            metrics.observe_leader(leader);
        }
        let text = metrics.encode();
        assert_eq!(
            value(&text, "cellchat_raft_leader_changes_total"),
            Some(4.0),
            "{text}"
        );
        assert!(text.contains("# TYPE cellchat_raft_leader_changes counter"));

        let mut changes = LeaderChanges::default();
        assert!(
            !changes.observe(Some(3)),
            "a node starting under a leader saw no change"
        );
        assert!(changes.observe(None));
    }

    #[test]
    fn storage_metrics_reach_the_text() {
        let dir = tempfile::tempdir().expect("tempdir");
        let metrics = metrics_in(dir.path(), None);
        let mut config = raft_log::Config::new(dir.path().join("log").join("wal"));
        config.fsync_observer = Some(metrics.storage.fsync_observer());
        let wal = raft_log::Wal::open(config).expect("open wal");
        wal.append(
            raft_log::LogIndex(1),
            &[b"entry"],
            raft_log::Durability::Sync,
        )
        .expect("append");
        metrics.storage.observe_apply(3, Duration::from_micros(300));

        let text = metrics.encode();
        assert_eq!(
            value(&text, "cellchat_wal_fsync_seconds_count"),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            value(&text, "cellchat_wal_fsync_seconds_bucket{le=\"+Inf\"}"),
            Some(1.0)
        );
        assert_eq!(value(&text, "cellchat_apply_seconds_count"), Some(1.0));
        assert_eq!(value(&text, "cellchat_apply_entries_sum"), Some(3.0));
    }

    #[test]
    fn snapshot_age_is_absent_until_a_snapshot_then_counts_seconds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let metrics = metrics_in(dir.path(), None);
        let now = SystemTime::now();
        metrics.refresh_snapshot_age(now);
        let text = metrics.encode();
        // An empty family writes nothing, not even its HELP and TYPE lines.
        assert!(!text.contains("cellchat_snapshot_age_seconds"), "{text}");
        assert_eq!(
            value(&text, "cellchat_snapshot_age_seconds"),
            None,
            "{text}"
        );

        metrics.storage.snapshot_made(now - Duration::from_secs(90));
        metrics.refresh_snapshot_age(now);
        let text = metrics.encode();
        assert!(text.contains("# TYPE cellchat_snapshot_age_seconds gauge"));
        assert_eq!(
            value(&text, "cellchat_snapshot_age_seconds"),
            Some(90.0),
            "{text}"
        );
    }

    #[test]
    fn disk_bytes_count_the_node_dirs_and_the_file_system() {
        let dir = tempfile::tempdir().expect("tempdir");
        let metrics = metrics_in(dir.path(), None);
        std::fs::write(dir.path().join("log").join("seg"), vec![1u8; 64 * 1024]).expect("write");
        std::fs::create_dir_all(dir.path().join("sm").join("chat")).expect("mkdir");
        std::fs::write(
            dir.path().join("sm").join("chat").join("db"),
            vec![1u8; 8192],
        )
        .expect("write");
        metrics.refresh_disk();
        let text = metrics.encode();
        let wal = value(&text, "cellchat_wal_disk_bytes").expect("wal bytes");
        let state = value(&text, "cellchat_state_disk_bytes").expect("state bytes");
        assert!(wal >= 64.0 * 1024.0, "{text}");
        assert!((8192.0..64.0 * 1024.0).contains(&state), "{text}");
        let avail = value(&text, "cellchat_data_filesystem_avail_bytes").expect("avail");
        let size = value(&text, "cellchat_data_filesystem_size_bytes").expect("size");
        assert!(0.0 < avail && avail <= size, "{text}");
    }

    #[test]
    fn dir_bytes_does_not_follow_symlinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (inside, outside) = (dir.path().join("inside"), dir.path().join("outside"));
        std::fs::create_dir_all(&inside).expect("mkdir");
        std::fs::create_dir_all(&outside).expect("mkdir");
        std::fs::write(outside.join("big"), vec![1u8; 256 * 1024]).expect("write");
        std::os::unix::fs::symlink(&outside, inside.join("dir-link")).expect("symlink");
        std::os::unix::fs::symlink(outside.join("big"), inside.join("file-link")).expect("symlink");
        assert_eq!(dir_bytes(&inside), 0);
        assert!(dir_bytes(&outside) >= 256 * 1024);
        assert_eq!(dir_bytes(&dir.path().join("missing")), 0);
    }

    #[test]
    fn metrics_are_served_as_openmetrics_text() {
        let dir = tempfile::tempdir().expect("tempdir");
        let metrics = metrics_in(dir.path(), None);
        let (status, content_type, body) = metrics_reply(metrics.encode());
        assert_eq!(status, "200 OK");
        assert_eq!(
            content_type,
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        // The OpenMetrics terminator: proof the body is that format and not Prometheus 0.0.4.
        assert!(body.ends_with("# EOF\n"), "{body}");
        assert!(body.contains("cellchat_sends_total 0"), "{body}");

        assert_eq!(
            other_reply("GET", "/ready", false).0,
            "503 Service Unavailable"
        );
        assert_eq!(other_reply("GET", "/ready", true).0, "200 OK");
        assert_eq!(
            other_reply("POST", "/metrics", true).0,
            "405 Method Not Allowed"
        );
    }

    fn head(headers: &str) -> Vec<u8> {
        format!("GET /metrics HTTP/1.1\r\nhost: x\r\n{headers}\r\n").into_bytes()
    }

    #[test_case::test_case("", false ; "no header")]
    #[test_case::test_case("authorization: Bearer s3cret\r\n", true ; "right token")]
    #[test_case::test_case("Authorization: bearer   s3cret  \r\n", true ; "any case and spacing")]
    #[test_case::test_case("authorization: Bearer s3cre\r\n", false ; "a prefix")]
    #[test_case::test_case("authorization: Bearer s3crett\r\n", false ; "longer")]
    #[test_case::test_case("authorization: Basic s3cret\r\n", false ; "other scheme")]
    #[test_case::test_case("authorization: s3cret\r\n", false ; "no scheme")]
    #[test_case::test_case("x-authorization: Bearer s3cret\r\n", false ; "other header")]
    #[test_case::test_case("authorization: Bearer s3cret\r\nauthorization: Bearer x\r\n", false ; "two headers")]
    #[test_case::test_case("authorization: Bearer\r\n", false ; "empty")]
    fn bearer_token_table(headers: &str, expected: bool) {
        let token = MetricsToken::new("s3cret".into()).unwrap();
        assert_eq!(authorized(&head(headers), Some(&token)), expected);
        assert!(
            authorized(&head(headers), None),
            "no token configured: open"
        );
    }

    #[test]
    fn bad_tokens_are_refused_without_showing_them() {
        for bad in ["", "has space", "tab\there", "é"] {
            let err = MetricsToken::new(bad.into()).unwrap_err();
            assert!(bad.is_empty() || !err.contains(bad), "{err}");
        }
        assert!(MetricsToken::new("x".repeat(MetricsToken::LEN_MAX + 1)).is_err());
        let token = MetricsToken::new("s3cret".into()).unwrap();
        assert!(!format!("{token:?}").contains("s3cret"));
    }

    #[test]
    fn garbage_heads_never_authorize() {
        let token = MetricsToken::new("s3cret".into()).unwrap();
        for garbage in [
            &b""[..],
            b"\r\n\r\n",
            b"authorization",
            b":\n:\n",
            &[0xff; 300],
        ] {
            assert!(!authorized(garbage, Some(&token)));
        }
    }
}
