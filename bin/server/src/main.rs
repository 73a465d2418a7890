//! `server`: runs one cellchat node (`cargo run --release -p server`, no flags needed), or
//! shows the cluster as discovery sees it (`server status [--json]`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum};
use node::{Config, DataDir, Server};

mod config_file;
mod sd_notify;
use proto::discovery::{DiscoverySocket, NodeAnnounce, Packet, DEFAULT_DISCOVERY_PORT};

/// mimalloc instead of glibc malloc: a loaded node allocates per request and per message, and
/// glibc's malloc/free (with its consolidation passes) took about 12 % of a leader's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `--version`: a build with the test-only broken modes says so, so nobody deploys one by
/// mistake and test harnesses can tell the builds apart.
const VERSION: &str = if cfg!(feature = "weaken") {
    concat!(
        env!("CARGO_PKG_VERSION"),
        " (test build with feature weaken)"
    )
} else {
    env!("CARGO_PKG_VERSION")
};

/// A cellchat server: one node of a Raft-replicated chat cluster.
///
/// With no flags it picks a free data dir under ./data, free ports (kept across restarts) and
/// a persistent node id, finds other nodes by UDP broadcast on this machine, and forms or joins
/// one cluster. Every flag also reads an environment variable.
#[derive(Parser, Debug)]
#[command(name = "cellchat-server", version = VERSION, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show every node discovery can find: id, role, addresses, term, applied index, leader.
    Status(StatusArgs),
    /// Take node ID out of the cluster membership, through the leader discovery finds. The
    /// node keeps running with its data; restarted, it asks to join again.
    RemoveNode(RemoveArgs),
}

#[derive(Args, Debug)]
struct RemoveArgs {
    /// The node id to remove (as `status` lists it).
    id: u64,
    /// How long to listen for the cluster's announcements, in ms.
    #[arg(long, default_value_t = 1000)]
    wait_ms: u64,
}

#[derive(Args, Debug, Clone)]
struct NetArgs {
    /// Cluster name; nodes and clients of other clusters are ignored.
    #[arg(
        long,
        env = "CELLCHAT_CLUSTER",
        default_value = "cellchat",
        global = true
    )]
    cluster: String,
    /// UDP port shared by every node of a machine for discovery.
    #[arg(long, env = "CELLCHAT_DISCOVERY_PORT", default_value_t = DEFAULT_DISCOVERY_PORT, global = true)]
    discovery_port: u16,
    /// Broadcast address for discovery: 127.255.255.255 reaches this machine only; use your
    /// LAN's broadcast address (e.g. 192.168.1.255) to find nodes on other machines.
    #[arg(
        long,
        env = "CELLCHAT_BROADCAST",
        default_value = "127.255.255.255",
        global = true
    )]
    broadcast: Ipv4Addr,
    /// Discovery address (host:port) of a node broadcast cannot reach; repeatable, or
    /// comma-separated in the environment variable.
    #[arg(
        long = "join",
        env = "CELLCHAT_JOIN",
        value_delimiter = ',',
        global = true
    )]
    join: Vec<String>,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    net: NetArgs,
    /// Data directory of this node. Default: the first unlocked ./data/node-N.
    #[arg(long, env = "CELLCHAT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Where to look for (and create) node-N data directories when --data-dir is not given.
    #[arg(long, env = "CELLCHAT_DATA_ROOT", default_value = "data")]
    data_root: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "CELLCHAT_HOST", default_value = "127.0.0.1")]
    host: IpAddr,
    /// Address other nodes and clients should dial (default: --host).
    #[arg(long, env = "CELLCHAT_ADVERTISE")]
    advertise: Option<IpAddr>,
    /// Raft RPC port (0: pick a free one at first start and keep it).
    #[arg(long, env = "CELLCHAT_RAFT_PORT", default_value_t = 0)]
    raft_port: u16,
    /// Client RPC port (0: pick and keep).
    #[arg(long, env = "CELLCHAT_CLIENT_PORT", default_value_t = 0)]
    client_port: u16,
    /// HTTP metrics port, serving /metrics, /health and /ready (0: pick and keep).
    #[arg(long, env = "CELLCHAT_METRICS_PORT", default_value_t = 0)]
    metrics_port: u16,
    /// Most voters in the cluster; further nodes join as learners (read replicas).
    #[arg(long, env = "CELLCHAT_MAX_VOTERS", default_value_t = 5)]
    max_voters: usize,
    /// Wait for N fresh nodes and bootstrap them together (for production starts).
    #[arg(long, env = "CELLCHAT_BOOTSTRAP_EXPECT")]
    bootstrap_expect: Option<usize>,
    /// How long a fresh node listens for others before it bootstraps or joins, in ms.
    #[arg(long, env = "CELLCHAT_FORMATION_WINDOW_MS", default_value_t = 1500)]
    formation_window_ms: u64,
    /// Raft heartbeat period in ms (also the AppendEntries timeout).
    #[arg(long, env = "CELLCHAT_HEARTBEAT_MS", default_value_t = 30)]
    heartbeat_ms: u64,
    /// Raft election timeout lower bound in ms.
    #[arg(long, env = "CELLCHAT_ELECTION_MIN_MS", default_value_t = 120)]
    election_min_ms: u64,
    /// Raft election timeout upper bound in ms (also the leader lease).
    #[arg(long, env = "CELLCHAT_ELECTION_MAX_MS", default_value_t = 240)]
    election_max_ms: u64,
    /// Take a snapshot (and purge the log below it) every N applied entries.
    #[arg(long, env = "CELLCHAT_SNAPSHOT_EVERY", default_value_t = 10_000)]
    snapshot_every: u64,
    /// Entries kept in the log after a snapshot.
    #[arg(long, env = "CELLCHAT_LOG_KEEP", default_value_t = 1000)]
    log_keep: u64,
    /// Raft log segment size in MiB (segments are preallocated with zeros).
    #[arg(long, env = "CELLCHAT_WAL_SEGMENT_MIB", default_value_t = 64)]
    wal_segment_mib: u64,
    /// Sends per second allowed per user (sustained).
    #[arg(long, env = "CELLCHAT_USER_RATE", default_value_t = 50)]
    user_rate: u32,
    /// Sends a user may burst at once.
    #[arg(long, env = "CELLCHAT_USER_BURST", default_value_t = 200)]
    user_burst: u32,
    /// Requests per second allowed per client connection (sustained).
    #[arg(long, env = "CELLCHAT_CONN_RATE", default_value_t = 500)]
    conn_rate: u32,
    /// Requests a connection may burst at once.
    #[arg(long, env = "CELLCHAT_CONN_BURST", default_value_t = 1000)]
    conn_burst: u32,
    /// Log filter (tracing EnvFilter syntax), e.g. "info" or "node=debug,openraft=info".
    #[arg(long, env = "CELLCHAT_LOG", default_value = "info,openraft=warn")]
    log: String,
    /// Log line format on stderr: `text` for people, `json` (one object per line) for log
    /// collectors.
    #[arg(long, env = "CELLCHAT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// A TOML file with the same keys as these flags, without their dashes (`max-voters = 5`);
    /// a flag or its environment variable wins over the file. Applies to every subcommand.
    #[arg(long, env = "CELLCHAT_CONFIG", value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Test only: deliberately broken modes (skip-dedup, ack-before-fsync, faulty-fs), for
    /// showing that the fault-injection harness catches broken guarantees. Refused unless the
    /// binary was built with the cargo feature `weaken`.
    #[arg(long, env = "CELLCHAT_WEAKEN", default_value = "", hide = true)]
    weaken: String,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (timestamp, level, target, fields).
    Json,
}

#[derive(Args, Debug)]
struct StatusArgs {
    /// Print one JSON array instead of a table.
    #[arg(long)]
    json: bool,
    /// How long to listen for answers, in ms.
    #[arg(long, default_value_t = 1000)]
    wait_ms: u64,
}

fn resolve_join(join: &[String]) -> anyhow::Result<Vec<SocketAddr>> {
    use std::net::ToSocketAddrs;
    join.iter()
        .map(|j| {
            j.to_socket_addrs()
                .with_context(|| {
                    format!("--join {j}: expected host:port of a node's discovery port")
                })?
                .find(SocketAddr::is_ipv4)
                .with_context(|| format!("--join {j}: no IPv4 address (discovery is IPv4 only)"))
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let cli = parse_cli()?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match cli.command {
        Some(Command::Status(args)) => runtime.block_on(status(&cli.run.net, &args)),
        Some(Command::RemoveNode(args)) => runtime.block_on(remove_node(&cli.run.net, &args)),
        None => runtime.block_on(run(cli.run)),
    }
}

/// The command line, with a `--config` file's keys filled in where the command line and the
/// environment left a flag at its default.
fn parse_cli() -> anyhow::Result<Cli> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let command = Cli::command();
    let matches = command.clone().get_matches_from(&argv);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let Some(path) = cli.run.config.as_deref() else {
        return Ok(cli);
    };
    let from_file =
        config_file::arguments_from_file(path, &command, &matches, &["config", "weaken"])?;
    let argv = argv
        .first()
        .cloned()
        .into_iter()
        .chain(from_file)
        .chain(argv.iter().skip(1).cloned());
    let matches = command.get_matches_from(argv);
    Ok(Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit()))
}

fn init_logging(filter: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).context("--log")?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    init_logging(&args.log, args.log_format)?;
    // Checked before the data dir is touched: a refused mode must not leave anything behind.
    let weaken = node::Weaken::parse(&args.weaken).map_err(|e| anyhow::anyhow!(e))?;
    let data_dir = match &args.data_dir {
        Some(dir) => DataDir::open(dir)?,
        None => DataDir::pick(&args.data_root)?,
    };
    let path = data_dir.path().to_path_buf();
    let mut config = Config::new(&path);
    config.cluster = args.net.cluster.clone();
    config.bind_host = args.host;
    config.advertise_host = args.advertise;
    config.raft_port = args.raft_port;
    config.client_port = args.client_port;
    config.metrics_port = args.metrics_port;
    config.discovery_port = args.net.discovery_port;
    config.broadcast = args.net.broadcast;
    config.join = resolve_join(&args.net.join)?;
    config.max_voters = args.max_voters;
    config.bootstrap_expect = args.bootstrap_expect;
    config.formation_window_ms = args.formation_window_ms;
    config.heartbeat_ms = args.heartbeat_ms;
    config.election_timeout_ms_min = args.election_min_ms;
    config.election_timeout_ms_max = args.election_max_ms;
    config.snapshot_every_entries = args.snapshot_every;
    config.log_keep_entries = args.log_keep;
    config.wal_segment_mib = args.wal_segment_mib;
    config.user_rate_per_s = args.user_rate;
    config.user_burst = args.user_burst;
    config.conn_rate_per_s = args.conn_rate;
    config.conn_burst = args.conn_burst;
    config.weaken = weaken;
    let server = Server::start(config, data_dir).await?;
    let addrs = server.addrs();
    tracing::info!(
        node = server.id(),
        client = %addrs.client,
        raft = %addrs.raft,
        metrics = %addrs.metrics,
        data = %path.display(),
        "node starting"
    );
    tokio::select! {
        () = server.wait_ready() => {
            println!(
                "ready node={} client={} raft={} metrics={} data={}",
                server.id(), addrs.client, addrs.raft, addrs.metrics, path.display()
            );
            sd_notify::notify(&format!("READY=1\nSTATUS=serving clients on {}", addrs.client));
        }
        () = shutdown_signal() => {
            sd_notify::notify("STOPPING=1");
            server.shutdown().await;
            return Ok(());
        }
    }
    shutdown_signal().await;
    tracing::info!(node = server.id(), "shutting down");
    sd_notify::notify("STOPPING=1");
    server.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Every node of the cluster that answers a discovery probe within `wait_ms`, by id.
async fn discover(
    net: &NetArgs,
    join: &[SocketAddr],
    wait_ms: u64,
) -> anyhow::Result<std::collections::BTreeMap<u64, NodeAnnounce>> {
    let socket = DiscoverySocket::ephemeral(net.discovery_port, net.broadcast, net.cluster.clone())
        .context("opening a discovery socket")?;
    let nonce: u64 = rand::random();
    let probe = Packet::Probe {
        cluster: net.cluster.clone(),
        nonce,
        from_client: true,
    };
    socket
        .send_broadcast(&probe)
        .await
        .context("broadcasting a probe")?;
    for addr in join {
        socket
            .send_to(&probe, *addr)
            .await
            .with_context(|| format!("probing {addr}"))?;
    }
    let mut nodes: std::collections::BTreeMap<u64, NodeAnnounce> = Default::default();
    let deadline = Instant::now() + Duration::from_millis(wait_ms);
    while let Ok(received) = tokio::time::timeout_at(deadline.into(), socket.recv()).await {
        if let Ok((Packet::Announce(a), _)) = received {
            nodes.insert(a.node_id, a);
        }
    }
    Ok(nodes)
}

async fn remove_node(net: &NetArgs, args: &RemoveArgs) -> anyhow::Result<()> {
    let join = resolve_join(&net.join)?;
    let nodes = discover(net, &join, args.wait_ms).await?;
    let leader = nodes
        .values()
        .filter(|a| a.role == proto::Role::Leader)
        .max_by_key(|a| a.term)
        .with_context(|| {
            format!(
                "no leader of cluster {:?} answered on {}:{}; check `server status`",
                net.cluster, net.broadcast, net.discovery_port
            )
        })?;
    let request = node::RemoveRequest {
        cluster: net.cluster.clone(),
        id: args.id,
    };
    let reply = node::request_remove(leader.raft_addr, leader.node_id, request)
        .await
        .with_context(|| {
            format!(
                "removing node {} through leader {}",
                args.id, leader.node_id
            )
        })?;
    println!("{reply:?} node={} leader={}", args.id, leader.node_id);
    Ok(())
}

async fn status(net: &NetArgs, args: &StatusArgs) -> anyhow::Result<()> {
    let join = resolve_join(&net.join)?;
    let nodes = discover(net, &join, args.wait_ms).await?;
    if args.json {
        let rows: Vec<serde_json::Value> = nodes
            .values()
            .map(|a| {
                serde_json::json!({
                    "id": a.node_id,
                    "role": role_name(a.role),
                    "client_addr": a.client_addr.to_string(),
                    "raft_addr": a.raft_addr.to_string(),
                    "metrics_addr": a.metrics_addr.to_string(),
                    "term": a.term,
                    "applied": a.applied,
                    "leader": a.leader,
                    "voter": a.voter,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    if nodes.is_empty() {
        anyhow::bail!(
            "no node of cluster {:?} answered on {}:{} (and {} --join address(es)); start one with \
             `cargo run --release -p server`, or pass --join host:port / --broadcast",
            net.cluster,
            net.broadcast,
            net.discovery_port,
            join.len()
        );
    }
    println!(
        "{:<20} {:<9} {:<6} {:<22} {:<22} {:<22} {:>6} {:>10} {:<20}",
        "id", "role", "voter", "client", "raft", "metrics", "term", "applied", "leader"
    );
    for a in nodes.values() {
        println!(
            "{:<20} {:<9} {:<6} {:<22} {:<22} {:<22} {:>6} {:>10} {:<20}",
            a.node_id,
            role_name(a.role),
            a.voter,
            a.client_addr,
            a.raft_addr,
            a.metrics_addr,
            a.term,
            a.applied,
            a.leader.map_or("-".to_owned(), |l| l.to_string())
        );
    }
    Ok(())
}

fn role_name(role: proto::Role) -> &'static str {
    match role {
        proto::Role::Leader => "leader",
        proto::Role::Follower => "follower",
        proto::Role::Learner => "learner",
        proto::Role::Candidate => "candidate",
        proto::Role::Unknown => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_file_sets_its_keys() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/cellchat-server.toml");
        let command = Cli::command();
        let argv = ["cellchat-server", "--max-voters", "3"];
        let matches = command.clone().try_get_matches_from(argv).unwrap();
        let from_file =
            config_file::arguments_from_file(&path, &command, &matches, &["config", "weaken"])
                .unwrap();
        let argv = std::iter::once("cellchat-server".into())
            .chain(from_file)
            .chain(argv.iter().skip(1).map(Into::into));
        let cli = Cli::from_arg_matches(&command.try_get_matches_from(argv).unwrap()).unwrap();
        assert_eq!(cli.run.log_format, LogFormat::Json);
        assert_eq!(cli.run.net.cluster, "cellchat");
        // The command line wins over the file's `max-voters = 5`.
        assert_eq!(cli.run.max_voters, 3);
    }
}
