//! `bench`: cellchat's load harness. Starts a local cluster of the system under test (cellchat,
//! etcd or NATS JetStream) on loopback, drives a scenario through its client library, and
//! prints a table or JSON lines; results and SVG charts go to `--out`.
//!
//! ```text
//! cargo run --release -p bench -- write --system cellchat,etcd,nats-sync,nats --clients 1,128
//! cargo run --release -p bench -- backup --messages 1000000 --duration 15 --json
//! cargo run --release -p bench -- report        # everything, and benches/RESULTS.md
//! ```

mod pki;
mod plot;
mod report;
mod scenario;
mod stats;
mod sut;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};

use crate::scenario::floor::PushPoint;
use crate::sut::SystemKind;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "cellchat's load harness: write, fanout, failover, scale and backup scenarios against cellchat, etcd and NATS JetStream"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Command,
}

/// Options every scenario takes.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Systems under test, comma separated: cellchat, cellchat-signed, cellchat-base (with
    /// --base-bin), etcd, nats (JetStream default sync), nats-sync (JetStream with
    /// sync_interval: always), nats-tls (default sync, TLS on clients and routes).
    #[arg(long, global = true, value_delimiter = ',', default_value = "cellchat")]
    system: Vec<SystemKind>,
    /// Server nodes each system runs.
    #[arg(long, global = true, default_value_t = 3)]
    nodes: usize,
    /// Print one JSON line per run instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Where results (`<scenario>.jsonl`) and charts (`*.svg`) go.
    #[arg(long, global = true, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    out: PathBuf,
    /// Measure a running cellchat cluster at these discovery addresses (host:port) instead of
    /// starting one; with --cluster and --discovery-port.
    #[arg(long, global = true)]
    join: Vec<SocketAddr>,
    /// Cluster name of the running cluster (with --join).
    #[arg(long, global = true, default_value = "cellchat")]
    cluster: String,
    /// Discovery port of the running cluster (with --join).
    #[arg(long, global = true, default_value_t = proto::discovery::DEFAULT_DISCOVERY_PORT)]
    discovery_port: u16,
    /// The etcd binary (default: `etcd` on PATH).
    #[arg(long, global = true)]
    etcd_bin: Option<PathBuf>,
    /// The nats-server binary (default: on PATH, else python3's scripts dir).
    #[arg(long, global = true)]
    nats_bin: Option<PathBuf>,
    /// The server binary of an earlier cellchat build, run as system `cellchat-base` (the
    /// reference for performance changes; `bench report` includes it when this is given).
    #[arg(long, global = true, env = "CELLCHAT_BASE_BIN")]
    base_bin: Option<PathBuf>,
    /// Message body size in bytes.
    #[arg(long, global = true, default_value_t = 100)]
    body: usize,
    /// Measured seconds per run.
    #[arg(long, global = true, default_value_t = 10.0)]
    duration: f64,
    /// Warm-up seconds before measuring.
    #[arg(long, global = true, default_value_t = 2.0)]
    warmup: f64,
    /// Runs the whole command this many times, the systems taking turns (in reverse order
    /// every other round); each result carries its `round`, and the cellchat/peer ratios are
    /// given per round and as medians over the rounds. On a shared VM whose speed drifts over
    /// minutes, one round can meet or miss a ratio by the machine's phase alone.
    #[arg(long, global = true, default_value_t = 1)]
    repeat: usize,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Closed-loop senders: throughput and acknowledgement latency.
    Write {
        /// Sender counts to run, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "1,16,128,1024")]
        clients: Vec<usize>,
        /// Topics (channels) the senders spread over.
        #[arg(long, default_value_t = 8)]
        topics: usize,
    },
    /// What a send cannot cost less than here (cellchat only): closed-loop `ping`s to the
    /// leader over a send's TLS and tarpc (no Raft), one-entry appends with fdatasync (back to
    /// back, and paced at each fan-out rate), a thread's wake-up, and pushing messages to many
    /// subscribers with no node. One result per part (`part`: ping, fsync, fsync_shared,
    /// fsync_paced, wake, push, push_plain).
    Floor {
        /// Ping connection counts to run, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "1,128")]
        clients: Vec<usize>,
        /// Fan-out points of the push parts, comma separated SUBSCRIBERS@RATE (messages per
        /// second to all of them).
        #[arg(long, value_delimiter = ',', default_value = "100@200,1000@20")]
        push: Vec<PushPoint>,
    },
    /// Fixed-rate publishers, many subscribers: send-to-delivery latency, missing, duplicates.
    Fanout {
        /// Subscriber counts to run, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "100")]
        subscribers: Vec<usize>,
        /// Messages per second, all publishers together.
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        /// Publishers.
        #[arg(long, default_value_t = 1)]
        publishers: usize,
    },
    /// Steady load, kill -9 of the leader (cellchat only, on a cluster the harness starts).
    Failover {
        /// Closed-loop senders.
        #[arg(long, default_value_t = 16)]
        clients: usize,
        /// Kill rounds: even rounds kill the leader, odd rounds the subscriber's node.
        #[arg(long, default_value_t = 10)]
        rounds: usize,
    },
    /// Idle connected clients plus a chat load (cellchat only): latency, RSS, CPU.
    Scale {
        /// Idle connected clients.
        #[arg(long, default_value_t = 10_000)]
        idle: usize,
        /// Subscribers of the measured load.
        #[arg(long, default_value_t = 100)]
        subscribers: usize,
        /// Messages per second of the measured load.
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
    },
    /// Backup, verify and restore of a filled cluster, then write throughput without and with
    /// backups running (cellchat only, on a cluster the harness starts). Prints two results:
    /// `part: archive` (fill, then the timed `cellchat-server backup`, `verify`, `restore`)
    /// and, unless --passes is 0, `part: under_load` (--clients closed-loop senders for
    /// --duration per window; each pass is one window without backups, then one with backups
    /// back to back).
    Backup {
        /// Acknowledged sends (of --body bytes) that fill the cluster before the backup.
        #[arg(long, default_value_t = 1_000_000)]
        messages: u64,
        /// Concurrent writers filling the cluster.
        #[arg(long, default_value_t = 128)]
        fill_clients: usize,
        /// Closed-loop senders of the under-load windows.
        #[arg(long, default_value_t = 128)]
        clients: usize,
        /// Pairs of under-load windows (without, then with backups), alternating; 0 skips
        /// the under-load part.
        #[arg(long, default_value_t = 2)]
        passes: usize,
        /// Topics (channels) the writers spread over.
        #[arg(long, default_value_t = 8)]
        topics: usize,
        /// The servers' --snapshot-every (default: theirs, 10,000 entries). The cluster's own
        /// snapshots write the whole state on every node, as a backup's cut does on one; a
        /// value past the run keeps them out of the windows, to see the backups' own cost.
        #[arg(long)]
        snapshot_every: Option<u64>,
    },
    /// Read markers and presence: users online as the interactive clients are, marking an
    /// active channel read once a second (cellchat only): the servers' CPU without them,
    /// with them online, and with them marking; mark latency.
    Markers {
        /// Users marking the channel read.
        #[arg(long, default_value_t = 1000)]
        users: usize,
        /// Messages per second sent into the channel meanwhile.
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
    },
    /// Typing indicators: from a writer's typing note to its reader's client, pair by pair
    /// (cellchat only).
    Typing {
        /// Writer and reader pairs, each in a channel of its own.
        #[arg(long, default_value_t = 20)]
        pairs: usize,
    },
    /// Full-text search (cellchat only): loads signed plaintext messages, then times searches
    /// of six kinds through the client library, each answered by the searcher's nearest node;
    /// the indexing lag after the load; each node's index size and RSS. Prints two results:
    /// `part: quiet` and, unless --write-rate is 0, `part: while_writing` (the same searches
    /// again while a writer sends).
    Search {
        /// Messages loaded first, 12 words each.
        #[arg(long, default_value_t = 1_000_000)]
        messages: u64,
        /// Channels they are spread over.
        #[arg(long, default_value_t = 100)]
        channels: usize,
        /// Users loading them, each with a client of its own and 8 sends in flight (and each
        /// a `from:` target).
        #[arg(long, alias = "loaders", default_value_t = 100)]
        users: usize,
        /// Searches timed in each pass.
        #[arg(long, default_value_t = 2000)]
        queries: usize,
        /// Concurrent searching clients, each a user of its own.
        #[arg(long, default_value_t = 4)]
        searchers: usize,
        /// Messages per second a writer sends during the second pass of the searches; 0 skips
        /// that pass.
        #[arg(long, default_value_t = 200.0)]
        write_rate: f64,
    },
    /// Runs the standard matrix on every system and rewrites the generated part of
    /// benches/RESULTS.md.
    Report {
        /// Shorter runs and fewer points (for a smoke run).
        #[arg(long)]
        quick: bool,
        /// The results file to rewrite.
        #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/RESULTS.md"))]
        results_md: PathBuf,
    },
    /// (internal) Holds idle clients for `scale` until stdin closes.
    #[command(hide = true)]
    Idle {
        /// Clients to hold.
        #[arg(long)]
        count: usize,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BENCH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // The handlers are installed before the run starts: the run may block its thread for a
        // while (starting a cluster), and a signal in that time must not kill the harness with
        // its servers still running.
        let interrupted = interrupted();
        tokio::select! {
            signal = interrupted => {
                // `run` is dropped here, and with it every system it started: their handles
                // kill their processes by pid and remove their temp dirs.
                bail!(
                    "stopped by {signal}: every server this run started was killed; results \
                     measured before are in the --out directory"
                )
            }
            result = run(cli) => result,
        }
    })
}

/// Installs handlers for SIGINT (Ctrl-C) and SIGTERM at once, and returns a future that waits
/// for either and names it. It never completes when the handlers cannot be installed (the run
/// then ends only by itself). Must be called inside the runtime.
fn interrupted() -> impl std::future::Future<Output = &'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    );
    async move {
        let (Ok(mut int), Ok(mut term)) = handlers else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let common = cli.common;
    validate(&common)?;
    match cli.command {
        Command::Idle { count } => {
            let target = sut::cellchat::Target {
                cluster: common.cluster.clone(),
                discovery_port: common.discovery_port,
                join: common.join.clone(),
                token: sut::cellchat::token_from_env(),
            };
            scenario::scale::hold_idle(target, count).await
        }
        Command::Report { quick, results_md } => report::run_all(&common, quick, &results_md).await,
        command => {
            let mut sink = report::Sink::new(&common)?;
            report::run_command(&common, &command_spec(command), &mut sink).await?;
            sink.finish()
        }
    }
}

/// A scenario with its parameters, as run by `report::run_command`.
#[derive(Debug, Clone)]
pub enum Spec {
    Write {
        clients: Vec<usize>,
        topics: usize,
    },
    Fanout {
        subscribers: Vec<usize>,
        rate: f64,
        publishers: usize,
    },
    Floor {
        clients: Vec<usize>,
        push: Vec<PushPoint>,
    },
    Failover {
        clients: usize,
        rounds: usize,
    },
    Scale {
        idle: usize,
        subscribers: usize,
        rate: f64,
    },
    Backup {
        messages: u64,
        fill_clients: usize,
        clients: usize,
        passes: usize,
        topics: usize,
        snapshot_every: Option<u64>,
    },
    Markers {
        users: usize,
        rate: f64,
    },
    Typing {
        pairs: usize,
    },
    Search {
        messages: u64,
        channels: usize,
        users: usize,
        queries: usize,
        searchers: usize,
        write_rate: f64,
    },
}

fn command_spec(command: Command) -> Spec {
    match command {
        Command::Write { clients, topics } => Spec::Write { clients, topics },
        Command::Floor { clients, push } => Spec::Floor { clients, push },
        Command::Fanout {
            subscribers,
            rate,
            publishers,
        } => Spec::Fanout {
            subscribers,
            rate,
            publishers,
        },
        Command::Failover { clients, rounds } => Spec::Failover { clients, rounds },
        Command::Scale {
            idle,
            subscribers,
            rate,
        } => Spec::Scale {
            idle,
            subscribers,
            rate,
        },
        Command::Backup {
            messages,
            fill_clients,
            clients,
            passes,
            topics,
            snapshot_every,
        } => Spec::Backup {
            messages,
            fill_clients,
            clients,
            passes,
            topics,
            snapshot_every,
        },
        Command::Markers { users, rate } => Spec::Markers { users, rate },
        Command::Typing { pairs } => Spec::Typing { pairs },
        Command::Search {
            messages,
            channels,
            users,
            queries,
            searchers,
            write_rate,
        } => Spec::Search {
            messages,
            channels,
            users,
            queries,
            searchers,
            write_rate,
        },
        Command::Report { .. } | Command::Idle { .. } => {
            unreachable!("handled before scenarios are dispatched")
        }
    }
}

fn validate(common: &Common) -> Result<()> {
    if common.nodes == 0 || common.nodes > 15 {
        bail!("--nodes must be 1..=15, got {}", common.nodes);
    }
    if !(common.duration > 0.0 && common.duration <= 3600.0) {
        bail!(
            "--duration must be in (0, 3600] seconds, got {}",
            common.duration
        );
    }
    if !(0.0..=600.0).contains(&common.warmup) {
        bail!(
            "--warmup must be in [0, 600] seconds, got {}",
            common.warmup
        );
    }
    if common.body < scenario::STAMP_LEN || common.body > 64 * 1024 {
        bail!(
            "--body must be {}..=65536 bytes (the fan-out stamp takes {}), got {}",
            scenario::STAMP_LEN,
            scenario::STAMP_LEN,
            common.body
        );
    }
    if common.repeat == 0 || common.repeat > 100 {
        bail!("--repeat must be 1..=100, got {}", common.repeat);
    }
    if !common.join.is_empty() && common.system.iter().any(|s| !s.is_cellchat()) {
        bail!(
            "--join measures a running cellchat cluster; it cannot be combined with peer systems"
        );
    }
    Ok(())
}

/// Seconds as a `Duration`, for validated option values.
pub fn secs(value: f64) -> Duration {
    Duration::from_secs_f64(value)
}
