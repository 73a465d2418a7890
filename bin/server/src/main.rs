//! `server`: runs one cellchat node (`cargo run --release -p server`, no flags needed), or
//! runs an operator command (`status`, `members`, `remove-node`, `leave`; see `admin.rs`).

mod admin;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use node::{Config, DataDir, Server};
use proto::discovery::DEFAULT_DISCOVERY_PORT;

/// mimalloc instead of glibc malloc: a loaded node allocates per request and per message, and
/// glibc's malloc/free (with its consolidation passes) took about 12 % of a leader's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A cellchat server: one node of a Raft-replicated chat cluster.
///
/// With no flags it picks a free data dir under ./data, free ports (kept across restarts) and
/// a persistent node id, finds other nodes by UDP broadcast on this machine, and forms or joins
/// one cluster. Every flag also reads an environment variable.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show every node discovery can find: name, role, addresses, term, applied index, leader.
    Status(admin::StatusArgs),
    /// Show the leader's Raft membership: every voter and learner, down ones included, with
    /// its state (leader, up, unreachable, lagging by N entries).
    Members(admin::MembersArgs),
    /// Take a dead node out of the cluster membership, by name or id, through the leader. A
    /// removed node that is started again asks to join again; to keep a live node out for
    /// good, use `leave`.
    RemoveNode(admin::RemoveArgs),
    /// Make a running node leave the cluster for good: it moves leadership away if it leads,
    /// is removed from the membership, and stops. Restarted, it stays out unless started with
    /// --rejoin. The last voter cannot leave.
    Leave(admin::LeaveArgs),
}

#[derive(Args, Debug, Clone)]
pub(crate) struct NetArgs {
    /// Cluster name; nodes and clients of other clusters are ignored.
    #[arg(
        long,
        env = "CELLCHAT_CLUSTER",
        default_value = "cellchat",
        global = true
    )]
    pub(crate) cluster: String,
    /// UDP port shared by every node of a machine for discovery.
    #[arg(long, env = "CELLCHAT_DISCOVERY_PORT", default_value_t = DEFAULT_DISCOVERY_PORT, global = true)]
    pub(crate) discovery_port: u16,
    /// Broadcast address for discovery: 127.255.255.255 reaches this machine only; use your
    /// LAN's broadcast address (e.g. 192.168.1.255) to find nodes on other machines.
    #[arg(
        long,
        env = "CELLCHAT_BROADCAST",
        default_value = "127.255.255.255",
        global = true
    )]
    pub(crate) broadcast: Ipv4Addr,
    /// Discovery address (host:port) of a node broadcast cannot reach; repeatable, or
    /// comma-separated in the environment variable.
    #[arg(
        long = "join",
        env = "CELLCHAT_JOIN",
        value_delimiter = ',',
        global = true
    )]
    pub(crate) join: Vec<String>,
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
    /// Test only: deliberately broken modes (skip-dedup, ack-before-fsync, faulty-fs), for
    /// showing that the fault-injection harness catches broken guarantees. Refused unless the
    /// binary was built with the cargo feature `weaken`.
    #[arg(long, env = "CELLCHAT_WEAKEN", default_value = "", hide = true)]
    weaken: String,
    /// This node's name, shown wherever nodes are listed: 1-32 of a-z 0-9 - _ . (default at
    /// first start: nN for ./data/node-N, else from the data dir's name). Kept in the data
    /// dir; a later start with another name is refused.
    #[arg(long, env = "CELLCHAT_NODE_NAME", value_parser = parse_name)]
    name: Option<String>,
    /// Join the cluster again after `server leave` (clears the data dir's LEFT marker).
    #[arg(long, env = "CELLCHAT_REJOIN")]
    rejoin: bool,
}

fn parse_name(name: &str) -> Result<String, node::NameError> {
    node::validate_name(name)?;
    Ok(name.to_owned())
}

pub(crate) fn resolve_join(join: &[String]) -> anyhow::Result<Vec<SocketAddr>> {
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
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match cli.command {
        Some(Command::Status(args)) => runtime.block_on(admin::status(&cli.run.net, &args)),
        Some(Command::Members(args)) => runtime.block_on(admin::members(&cli.run.net, &args)),
        Some(Command::RemoveNode(args)) => {
            runtime.block_on(admin::remove_node(&cli.run.net, &args))
        }
        Some(Command::Leave(args)) => runtime.block_on(admin::leave(&cli.run.net, &args)),
        None => runtime.block_on(run(cli.run)),
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log).context("--log")?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
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
    config.name = args.name.clone();
    config.rejoin = args.rejoin;
    let server = Server::start(config, data_dir).await?;
    let addrs = server.addrs();
    eprintln!(
        "node {} ({}) starting: client={} raft={} metrics={} data={}",
        server.name(),
        server.id(),
        addrs.client,
        addrs.raft,
        addrs.metrics,
        path.display()
    );
    tokio::select! {
        () = server.wait_ready() => {
            println!(
                "ready node={} client={} raft={} metrics={} data={} name={}",
                server.id(), addrs.client, addrs.raft, addrs.metrics, path.display(),
                server.name()
            );
        }
        () = server.left() => return stop_after_leave(server).await,
        () = shutdown_signal() => {
            server.shutdown().await;
            return Ok(());
        }
    }
    tokio::select! {
        () = shutdown_signal() => {}
        () = server.left() => return stop_after_leave(server).await,
    }
    eprintln!("shutting down node {} ({})", server.name(), server.id());
    server.shutdown().await;
    Ok(())
}

async fn stop_after_leave(server: Server) -> anyhow::Result<()> {
    eprintln!(
        "node {} ({}) left the cluster and stops; it stays out on restart unless started with \
         --rejoin",
        server.name(),
        server.id()
    );
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
