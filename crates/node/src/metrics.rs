//! Prometheus metrics and health endpoints of one node, served over plain HTTP/1.1.
//!
//! `GET /metrics` answers Prometheus text (Raft role, term, leader, commit and applied index,
//! apply lag, sends, deliveries, batch sizes, stream waiters, connected clients, push
//! connections and subscriptions, RPC latency
//! histograms); `GET /health` answers 200 while the process runs; `GET /ready` answers 200 once
//! the node has a leader and has applied everything it knows to be committed, else 503.
//! The HTTP side is deliberately tiny (one request per connection, GET only, 8 KiB request
//! limit): it serves scrapers and probes, not browsers.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use openraft::{Raft, ServerState};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::types::TypeConfig;

type Labels = Vec<(&'static str, &'static str)>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 us to ~1.6 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// The node's metrics. Counters are bumped by the code paths they count; Raft gauges are
/// refreshed from openraft's metrics at each scrape.
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
    /// Open push subscriptions.
    pub push_subscriptions: Gauge,
    /// Push batches encoded (each shared by every subscriber at the same position).
    pub push_batches_encoded: Counter,
    /// Sends per proposed log entry.
    pub batch_sends: Histogram,
    rpc_seconds: HistogramFamily,
    role: Family<Labels, Gauge>,
    term: Gauge,
    leader: Gauge,
    commit_index: Gauge,
    applied_index: Gauge,
    apply_lag: Gauge,
    last_log_index: Gauge,
    /// Commit index as last saved by the log store (openraft 0.9 metrics lack it).
    committed: Arc<AtomicU64>,
}

impl Metrics {
    /// Registers every metric. `committed` is the log store's committed-index cell.
    pub fn new(committed: Arc<AtomicU64>) -> Metrics {
        let mut registry = Registry::with_prefix("cellchat");
        let sends_total = Counter::default();
        let deliveries_total = Counter::default();
        let stream_waiters = Gauge::default();
        let connected_clients = Gauge::default();
        let push_connections = Gauge::default();
        let push_subscriptions = Gauge::default();
        let push_batches_encoded = Counter::default();
        let batch_sends = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        let rpc_seconds: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let role = Family::<Labels, Gauge>::default();
        let term = Gauge::default();
        let leader = Gauge::default();
        let commit_index = Gauge::default();
        let applied_index = Gauge::default();
        let apply_lag = Gauge::default();
        let last_log_index = Gauge::default();
        registry.register(
            "sends",
            "Sends acknowledged by this node",
            sends_total.clone(),
        );
        registry.register(
            "deliveries",
            "Messages delivered to streams",
            deliveries_total.clone(),
        );
        registry.register(
            "stream_waiters",
            "Long-poll streams waiting",
            stream_waiters.clone(),
        );
        registry.register(
            "connected_clients",
            "Open client connections",
            connected_clients.clone(),
        );
        registry.register(
            "push_connections",
            "Open push connections",
            push_connections.clone(),
        );
        registry.register(
            "push_subscriptions",
            "Open push subscriptions",
            push_subscriptions.clone(),
        );
        registry.register(
            "push_batches_encoded",
            "Push batches encoded, each shared by every subscriber at the same position",
            push_batches_encoded.clone(),
        );
        registry.register(
            "batch_sends",
            "Sends per proposed log entry",
            batch_sends.clone(),
        );
        registry.register(
            "rpc_seconds",
            "Client RPC latency by method",
            rpc_seconds.clone(),
        );
        registry.register(
            "raft_role",
            "1 for this node's current Raft role",
            role.clone(),
        );
        registry.register("raft_term", "Current Raft term", term.clone());
        registry.register(
            "raft_leader",
            "Leader node id as this node sees it (0: none)",
            leader.clone(),
        );
        registry.register(
            "raft_commit_index",
            "Last committed log index",
            commit_index.clone(),
        );
        registry.register(
            "raft_applied_index",
            "Last applied log index",
            applied_index.clone(),
        );
        registry.register(
            "raft_apply_lag",
            "Committed but not yet applied entries",
            apply_lag.clone(),
        );
        registry.register(
            "raft_last_log_index",
            "Last log index",
            last_log_index.clone(),
        );
        Metrics {
            registry,
            sends_total,
            deliveries_total,
            stream_waiters,
            connected_clients,
            push_connections,
            push_subscriptions,
            push_batches_encoded,
            batch_sends,
            rpc_seconds,
            role,
            term,
            leader,
            commit_index,
            applied_index,
            apply_lag,
            last_log_index,
            committed,
        }
    }

    /// Records one client RPC's latency.
    pub fn observe_rpc(&self, method: &'static str, took: Duration) {
        self.rpc_seconds
            .get_or_create(&vec![("method", method)])
            .observe(took.as_secs_f64());
    }

    fn refresh(&self, raft: &Raft<TypeConfig>) {
        let m = raft.metrics().borrow().clone();
        for (state, name) in [
            (ServerState::Leader, "leader"),
            (ServerState::Follower, "follower"),
            (ServerState::Candidate, "candidate"),
            (ServerState::Learner, "learner"),
        ] {
            let value = i64::from(m.state == state);
            self.role.get_or_create(&vec![("role", name)]).set(value);
        }
        let applied = m.last_applied.map_or(0, |l| l.index);
        let committed = self.committed.load(std::sync::atomic::Ordering::Relaxed);
        self.term.set(m.current_term as i64);
        self.leader.set(m.current_leader.map_or(0, |l| l as i64));
        self.commit_index.set(committed as i64);
        self.applied_index.set(applied as i64);
        self.apply_lag.set(committed.saturating_sub(applied) as i64);
        self.last_log_index
            .set(m.last_log_index.unwrap_or(0) as i64);
    }

    /// The Prometheus text exposition.
    pub fn render(&self, raft: &Raft<TypeConfig>) -> String {
        self.refresh(raft);
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Whether the node can serve: it knows a leader and has applied what it knows is committed.
pub fn is_ready(raft: &Raft<TypeConfig>, committed: u64) -> bool {
    let m = raft.metrics().borrow().clone();
    let applied = m.last_applied.map_or(0, |l| l.index);
    m.current_leader.is_some() && m.state != ServerState::Shutdown && applied >= committed
}

/// Serves `/metrics`, `/health` and `/ready` until the task is aborted.
pub fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    raft: Raft<TypeConfig>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let metrics = metrics.clone();
            let raft = raft.clone();
            tokio::spawn(async move {
                if let Err(e) = answer(stream, &metrics, &raft).await {
                    tracing::debug!(error = %e, "metrics request failed");
                }
            });
        }
    })
}

const REQUEST_BYTES_MAX: usize = 8192;

async fn answer(
    mut stream: TcpStream,
    metrics: &Metrics,
    raft: &Raft<TypeConfig>,
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
    let committed = metrics.committed.load(std::sync::atomic::Ordering::Relaxed);
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(raft),
        ),
        ("GET", "/health") => ("200 OK", "text/plain", "ok\n".to_owned()),
        ("GET", "/ready") if is_ready(raft, committed) => {
            ("200 OK", "text/plain", "ready\n".to_owned())
        }
        ("GET", "/ready") => (
            "503 Service Unavailable",
            "text/plain",
            "not ready: no leader yet, or still applying committed entries\n".to_owned(),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "try /metrics, /health or /ready\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
