//! `cellchat-server`: runs one cellchat node (`cargo run --release -p server`, no flags needed), or
//! runs an operator command (`status`, `members`, `remove-node`, `leave`, `token`; see
//! `admin.rs`; `backup`, `verify`, `restore`; see `backup_cmd.rs`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum};
use node::{Config, DataDir, Server};
use proto::discovery::DEFAULT_DISCOVERY_PORT;

mod admin;
mod backup_cmd;
mod config_file;
mod sd_notify;

/// mimalloc instead of glibc malloc: a loaded node allocates per request and per message, and
/// glibc's malloc/free (with its consolidation passes) took about 12 % of a leader's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off for the whole process. mimalloc asks the kernel for them,
/// and the kernel then zeroes 2 MiB at the first touch of each: whenever the heap grew, the
/// thread that grew it (the Raft core appending to the log, say) stalled for milliseconds, and
/// every commit in flight with it. Huge pages save a saturated node a little CPU in TLB misses;
/// steady commit latency is worth more. A refusal (an old kernel) is logged and costs only
/// those stalls.
fn no_transparent_huge_pages() {
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        tracing::warn!(error = %e, "cannot turn transparent huge pages off; heap growth may stall commits");
    }
}

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
    /// Print the cluster's join token: give it (`--token` or CELLCHAT_TOKEN) to a node on
    /// another machine to join, or to operator commands run elsewhere. Read from the data dir
    /// of a node on this machine; it is a secret. With --rotate, replace its secret.
    Token(admin::TokenArgs),
    /// Print the cluster's default retention (how long channels without their own keep
    /// messages), or set it with --set.
    Retention(admin::RetentionArgs),
    /// Write a consistent backup of the running cluster's chat state (channels, messages,
    /// users, channel records, dedup records) at a committed index into one checksummed file.
    /// It holds no secret material; see `verify` and `restore`.
    Backup(backup_cmd::BackupArgs),
    /// Check a backup file completely (every checksum, its manifest against its payload)
    /// without restoring it.
    Verify(backup_cmd::VerifyArgs),
    /// Offline: create the data dir of a new cluster's first node from a backup, or from a
    /// continuous archive up to an index or time (--from-archive, --until), with a new node
    /// id, CA and join token (the cluster name stays: end-to-end encryption is bound to it).
    Restore(backup_cmd::RestoreArgs),
    /// Show what a continuous archive holds: its cluster, bases, chunks, the highest archived
    /// index and the index ranges a restore can reach.
    ArchiveInfo(backup_cmd::ArchiveInfoArgs),
}

/// Where an s3:// archive's server is.
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct ArchiveAt {
    /// An S3-compatible endpoint for an s3:// archive (http://127.0.0.1:9000 for a local
    /// MinIO or moto); AWS's when absent.
    #[arg(long, env = "CELLCHAT_ARCHIVE_ENDPOINT", value_name = "URL")]
    pub(crate) archive_endpoint: Option<String>,
    /// The S3 region (default AWS_REGION, else us-east-1).
    #[arg(long, env = "CELLCHAT_ARCHIVE_REGION")]
    pub(crate) archive_region: Option<String>,
}

impl ArchiveAt {
    pub(crate) fn config(&self, url: &str) -> node::archive::ArchiveConfig {
        node::archive::ArchiveConfig {
            url: url.to_owned(),
            endpoint: self.archive_endpoint.clone(),
            region: self.archive_region.clone(),
        }
    }
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
    /// The cluster's join token (`server token` prints it on a member's machine): a fresh node
    /// given it joins that cluster from another machine; operator commands use it to prove
    /// they may administer the cluster. Not needed on the machine that made the cluster: nodes
    /// and commands find it next to the data dirs.
    #[arg(long, env = "CELLCHAT_TOKEN", hide_env_values = true, global = true)]
    pub(crate) token: Option<String>,
    /// Where to look for (and create) node-N data directories when --data-dir is not given;
    /// the cluster's CA and token are kept in cluster-NAME next to the data dirs.
    #[arg(
        long,
        env = "CELLCHAT_DATA_ROOT",
        default_value = "data",
        global = true
    )]
    pub(crate) data_root: PathBuf,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    net: NetArgs,
    /// Data directory of this node. Default: the first unlocked ./data/node-N.
    #[arg(long, env = "CELLCHAT_DATA_DIR")]
    data_dir: Option<PathBuf>,
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
    /// The web client's address (port 0: pick and keep; default: --host on a port picked at
    /// first start and kept). Open the URL the ready line prints as web=.
    #[arg(long, env = "CELLCHAT_WEB", value_name = "HOST:PORT")]
    web: Option<SocketAddr>,
    /// Serve no web client.
    #[arg(long, env = "CELLCHAT_NO_WEB", conflicts_with_all = ["web", "web_cert", "web_key"])]
    no_web: bool,
    /// PEM certificate chain for the web client that browsers trust (with --web-key).
    /// Without one, a loopback address serves plain HTTP and any other the node's cluster
    /// certificate, which browsers accept only once the cluster CA is imported.
    #[arg(
        long,
        env = "CELLCHAT_WEB_CERT",
        value_name = "FILE",
        requires = "web_key"
    )]
    web_cert: Option<PathBuf>,
    /// PEM private key of --web-cert.
    #[arg(
        long,
        env = "CELLCHAT_WEB_KEY",
        value_name = "FILE",
        requires = "web_cert"
    )]
    web_key: Option<PathBuf>,
    /// Most open web client connections.
    #[arg(long, env = "CELLCHAT_WEB_MAX_CONNECTIONS", default_value_t = 4096)]
    web_max_connections: usize,
    /// Most open web client connections from one address (this machine is not counted).
    #[arg(
        long,
        env = "CELLCHAT_WEB_MAX_CONNECTIONS_PER_IP",
        default_value_t = 64
    )]
    web_max_connections_per_ip: usize,
    /// Address the metrics listener binds to (default: --host), e.g. 127.0.0.1 to keep
    /// metrics on this machine while the node serves the network.
    #[arg(long, env = "CELLCHAT_METRICS_BIND", value_name = "HOST")]
    metrics_bind: Option<IpAddr>,
    /// Bearer token that GET /metrics requires (header `Authorization: Bearer TOKEN`; 1-256
    /// visible ASCII characters); /health and /ready stay open. Prefer the environment
    /// variable: a flag shows in the process list.
    #[arg(
        long,
        env = "CELLCHAT_METRICS_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    metrics_token: Option<String>,
    /// Most open client connections (chat RPC and push together); lowered at start, with a
    /// warning, to fit the open-file limit.
    #[arg(long, env = "CELLCHAT_MAX_CONNECTIONS", default_value_t = 20_000)]
    max_connections: usize,
    /// Most open client connections from one address (IPv6: one /64). Connections from this
    /// machine itself (same address at both ends) are not counted against it.
    #[arg(long, env = "CELLCHAT_MAX_CONNECTIONS_PER_IP", default_value_t = 256)]
    max_connections_per_ip: usize,
    /// A client connection with no request in flight for this many seconds is closed (an
    /// open long poll counts as a request).
    #[arg(long, env = "CELLCHAT_CLIENT_IDLE_TIMEOUT_S", default_value_t = 600)]
    client_idle_timeout_s: u64,
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
    /// A Raft log fsync running this long (ms) counts as a stalled disk: the node refuses
    /// writes and, when leading, hands leadership to another voter until the fsync returns.
    #[arg(long, env = "CELLCHAT_DISK_STALL_MS", default_value_t = 500)]
    disk_stall_ms: u64,
    /// How often (ms) the leader proposes an expiry while retention is set or dedup records
    /// are past their 24 h window; expired messages go within about this long.
    #[arg(long, env = "CELLCHAT_EXPIRE_INTERVAL_MS", default_value_t = 10_000)]
    expire_interval_ms: u64,
    /// Continuous archive: the leader uploads committed entries here in sealed chunks, after
    /// a base backup. `file:///absolute/dir` or `s3://bucket/prefix` (S3 credentials from
    /// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY). See `restore --from-archive`.
    #[arg(long, env = "CELLCHAT_ARCHIVE", value_name = "URL")]
    archive: Option<String>,
    #[command(flatten)]
    archive_at: ArchiveAt,
    /// How often (ms) the leader seals what was committed since its last archive chunk.
    #[arg(long, env = "CELLCHAT_ARCHIVE_INTERVAL_MS", default_value_t = 1000)]
    archive_interval_ms: u64,
    /// How often (s) the leader cuts a new archive base (a backup of the state), so a restore
    /// of the latest state and a new leader's resume read only what came after it.
    #[arg(
        long,
        env = "CELLCHAT_ARCHIVE_BASE_INTERVAL_S",
        default_value_t = 86_400
    )]
    archive_base_interval_s: u64,
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
    /// New user names one remote address (an IPv6 /64) may register per minute (sustained);
    /// loopback is not limited.
    #[arg(long, env = "CELLCHAT_REGISTRATION_IP_RATE", default_value_t = 5)]
    registration_ip_rate: u32,
    /// New user names one remote address may register at once.
    #[arg(long, env = "CELLCHAT_REGISTRATION_IP_BURST", default_value_t = 10)]
    registration_ip_burst: u32,
    /// New user names all remote addresses together may register per minute on this node.
    #[arg(long, env = "CELLCHAT_REGISTRATION_NODE_RATE", default_value_t = 60)]
    registration_node_rate: u32,
    /// New user names all remote addresses may register at once on this node.
    #[arg(long, env = "CELLCHAT_REGISTRATION_NODE_BURST", default_value_t = 60)]
    registration_node_burst: u32,
    /// Memory for the newest messages of all channels together, in MiB: past it, the rings of
    /// the least recently used channels are dropped and those channels are read from disk.
    #[arg(long, env = "CELLCHAT_RING_MEMORY_MIB", default_value_t = 256)]
    ring_memory_mib: u64,
    /// Log filter (tracing EnvFilter syntax), e.g. "info" or "node=debug,openraft=info".
    /// The default leaves out tarpc's span per RPC, which is formatted on every request.
    #[arg(
        long,
        env = "CELLCHAT_LOG",
        default_value = "info,openraft=warn,tarpc=warn"
    )]
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
    /// This node's name, shown wherever nodes are listed: 1-32 of a-z 0-9 - _ . (default at
    /// first start: nN for ./data/node-N, else from the data dir's name). Kept in the data
    /// dir; a later start with another name is refused.
    #[arg(long, env = "CELLCHAT_NODE_NAME", value_parser = parse_name)]
    name: Option<String>,
    /// Join the cluster again after `server leave` (clears the data dir's LEFT marker).
    #[arg(long, env = "CELLCHAT_REJOIN")]
    rejoin: bool,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (timestamp, level, target, fields).
    Json,
}

pub(crate) fn parse_name(name: &str) -> Result<String, node::NameError> {
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
    node::create_private_files();
    let cli = parse_cli()?;
    if matches!(cli.command, Some(Command::Backup(_))) {
        // Before the runtime starts, so that its threads inherit it: a backup beside a
        // loaded node takes the CPU the node leaves.
        node::backup::lower_cpu_priority();
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match cli.command {
        Some(Command::Status(args)) => runtime.block_on(admin::status(&cli.run.net, &args)),
        Some(Command::Members(args)) => runtime.block_on(admin::members(&cli.run.net, &args)),
        Some(Command::RemoveNode(args)) => {
            runtime.block_on(admin::remove_node(&cli.run.net, &args))
        }
        Some(Command::Leave(args)) => runtime.block_on(admin::leave(&cli.run.net, &args)),
        Some(Command::Token(args)) => runtime.block_on(admin::token(&cli.run.net, &args)),
        Some(Command::Retention(args)) => runtime.block_on(admin::retention(&cli.run.net, &args)),
        Some(Command::Backup(args)) => runtime.block_on(backup_cmd::backup(&cli.run.net, &args)),
        Some(Command::Verify(args)) => backup_cmd::verify(&args),
        Some(Command::Restore(args)) => runtime.block_on(backup_cmd::restore(&args)),
        Some(Command::ArchiveInfo(args)) => runtime.block_on(backup_cmd::archive_info(&args)),
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
    no_transparent_huge_pages();
    // Checked before the data dir is touched: a refused mode must not leave anything behind.
    let weaken = node::Weaken::parse(&args.weaken).map_err(|e| anyhow::anyhow!(e))?;
    let data_dir = match &args.data_dir {
        Some(dir) => DataDir::open(dir)?,
        None => DataDir::pick(&args.net.data_root)?,
    };
    let path = data_dir.path().to_path_buf();
    let mut config = Config::new(&path);
    config.cluster = args.net.cluster.clone();
    config.bind_host = args.host;
    config.advertise_host = args.advertise;
    config.raft_port = args.raft_port;
    config.client_port = args.client_port;
    config.metrics_port = args.metrics_port;
    config.metrics_host = args.metrics_bind;
    config.web = (!args.no_web).then(|| node::WebConfig {
        addr: args.web,
        cert: args.web_cert.clone().zip(args.web_key.clone()),
        connections_max: args.web_max_connections,
        connections_per_ip_max: args.web_max_connections_per_ip,
    });
    config.metrics_token = match args.metrics_token.clone() {
        Some(token) => Some(
            node::MetricsToken::new(token)
                .map_err(|e| anyhow::anyhow!("--metrics-token (CELLCHAT_METRICS_TOKEN): {e}"))?,
        ),
        None => None,
    };
    config.client_connections_max = args.max_connections;
    config.client_connections_per_ip_max = args.max_connections_per_ip;
    config.client_idle_timeout_s = args.client_idle_timeout_s;
    config.discovery_port = args.net.discovery_port;
    config.broadcast = args.net.broadcast;
    config.join = resolve_join(&args.net.join)?;
    config.max_voters = args.max_voters;
    config.bootstrap_expect = args.bootstrap_expect;
    config.formation_window_ms = args.formation_window_ms;
    config.heartbeat_ms = args.heartbeat_ms;
    config.election_timeout_ms_min = args.election_min_ms;
    config.election_timeout_ms_max = args.election_max_ms;
    config.disk_stall_ms = args.disk_stall_ms;
    config.expire_interval_ms = args.expire_interval_ms;
    config.archive = match &args.archive {
        Some(url) => {
            let archive = args.archive_at.config(url);
            // Checked before the node starts: a mistyped URL stops it here, not at its first
            // term as leader.
            node::archive::Archive::open(&archive)?;
            Some(archive)
        }
        None => None,
    };
    config.archive_interval_ms = args.archive_interval_ms;
    config.archive_base_interval_s = args.archive_base_interval_s;
    config.snapshot_every_entries = args.snapshot_every;
    config.log_keep_entries = args.log_keep;
    config.wal_segment_mib = args.wal_segment_mib;
    config.user_rate_per_s = args.user_rate;
    config.user_burst = args.user_burst;
    config.conn_rate_per_s = args.conn_rate;
    config.conn_burst = args.conn_burst;
    config.registration_ip_rate_per_min = args.registration_ip_rate;
    config.registration_ip_burst = args.registration_ip_burst;
    config.registration_node_rate_per_min = args.registration_node_rate;
    config.registration_node_burst = args.registration_node_burst;
    config.ring_bytes_max =
        usize::try_from(args.ring_memory_mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
    config.weaken = weaken;
    config.name = args.name.clone();
    config.rejoin = args.rejoin;
    config.token = args
        .net
        .token
        .as_deref()
        .map(str::parse)
        .transpose()
        .context("--token")?;
    let server = Server::start(config, data_dir).await?;
    let addrs = server.addrs();
    tracing::info!(
        node = server.id(),
        name = %server.name(),
        client = %addrs.client,
        raft = %addrs.raft,
        metrics = %addrs.metrics,
        data = %path.display(),
        "node starting"
    );
    tokio::select! {
        () = server.wait_ready() => {
            let web = server.web_url().map(|url| format!(" web={url}")).unwrap_or_default();
            println!(
                "ready node={} client={} raft={} metrics={} data={} name={}{web}",
                server.id(), addrs.client, addrs.raft, addrs.metrics, path.display(),
                server.name()
            );
            sd_notify::notify(&format!("READY=1\nSTATUS=serving clients on {}", addrs.client));
        }
        () = server.left() => return stop_after_leave(server).await,
        () = shutdown_signal() => {
            sd_notify::notify("STOPPING=1");
            server.shutdown().await;
            return Ok(());
        }
    }
    tokio::select! {
        () = shutdown_signal() => {}
        () = server.left() => return stop_after_leave(server).await,
    }
    tracing::info!(node = server.id(), name = %server.name(), "shutting down");
    sd_notify::notify("STOPPING=1");
    server.shutdown().await;
    Ok(())
}

async fn stop_after_leave(server: Server) -> anyhow::Result<()> {
    tracing::warn!(
        node = server.id(),
        name = %server.name(),
        "left the cluster; this node stops and stays out on restart unless started with --rejoin"
    );
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
