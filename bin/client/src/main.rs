//! The cellchat command-line client: `cellchat NAME` for interactive chat, plus scriptable modes
//! (`--send`, `--tail`, `--history`, `--servers`) that other tools depend on.

mod command;
mod interactive;
mod output;
mod timefmt;

use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use cellchat_client::crypto::ChannelKey;
use cellchat_client::{Client, ClientConfig};
use clap::Parser;

const ABOUT: &str = "cellchat client: chat on a cellchat cluster, which it finds by itself.";

const AFTER_HELP: &str = "\
Examples:
  cellchat Alice                            chat interactively as Alice in #general
  cellchat Alice --send 'Hello world!'      send one message; exit 0 once acknowledged
  cellchat Bob --tail --channel random --json
                                            print #random's new messages as JSON lines
  cellchat Bob --history 50                 print the last 50 messages of #general
  cellchat --servers --json                 every node as one JSON array

Scriptable output: message JSON lines carry channel, seq, sender, text, at_ms, encrypted,
readable and client_seq; --servers --json prints one array of nodes with id, name, role,
client_addr, rtt_ms, applied, reading (the node this client reads from), leader and down.

Identity: the first run with a name creates an Ed25519 key in
<config dir>/identities/<cluster>/<NAME>.key (mode 0600) and the cluster registers the name to
it. To use the name on another machine, copy that file to the same path there (keep it private,
mode 0600). Without it, the name is refused there.

Encryption: with a channel passphrase (/key in the chat, or --passphrase-file) messages are
encrypted with AES-256-GCM under a key derived by Argon2id; servers store only ciphertext.";

/// Command-line arguments.
#[derive(Parser, Debug)]
#[command(name = "cellchat", version, about = ABOUT, after_help = AFTER_HELP)]
struct Args {
    /// Your user name (1 to 32 of a-z, A-Z, 0-9, '-', '_'); needed for everything but --servers.
    #[arg(env = "CELLCHAT_NAME")]
    name: Option<String>,
    /// Send TEXT to the channel and exit: 0 once acknowledged, 1 with a message otherwise.
    #[arg(long, value_name = "TEXT", conflicts_with_all = ["tail", "history", "servers"])]
    send: Option<String>,
    /// Print the channel's new messages as they arrive, until interrupted.
    #[arg(long, conflicts_with_all = ["history", "servers"])]
    tail: bool,
    /// Print the last N messages of the channel and exit.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000), conflicts_with = "servers")]
    history: Option<u32>,
    /// Print every node (role, address, RTT, applied index, which one you read from) and exit.
    #[arg(long)]
    servers: bool,
    /// Channel for --send, --tail and --history, and the first channel of the chat.
    #[arg(long, env = "CELLCHAT_CHANNEL", default_value = "general")]
    channel: String,
    /// Print JSON (one object per message line; one array for --servers).
    #[arg(long, env = "CELLCHAT_JSON")]
    json: bool,
    /// Cluster name; nodes of other clusters are ignored.
    #[arg(long, env = "CELLCHAT_CLUSTER", default_value = "cellchat")]
    cluster: String,
    /// UDP discovery port the nodes share.
    #[arg(long, env = "CELLCHAT_DISCOVERY_PORT", default_value_t = proto::discovery::DEFAULT_DISCOVERY_PORT)]
    discovery_port: u16,
    /// Broadcast address for discovery: 127.255.255.255 reaches this machine only; use your
    /// LAN's broadcast address (e.g. 192.168.1.255) to find nodes on other machines.
    #[arg(long, env = "CELLCHAT_BROADCAST", default_value = "127.255.255.255")]
    broadcast: Ipv4Addr,
    /// Discovery address (host:port, the nodes' discovery port) of a node broadcast cannot
    /// reach; repeatable, or comma-separated in the environment variable.
    #[arg(
        long = "join",
        env = "CELLCHAT_JOIN",
        value_delimiter = ',',
        value_name = "HOST:PORT"
    )]
    join: Vec<String>,
    /// File holding the channel passphrase (first line, UTF-8) for end-to-end encryption of
    /// --channel; keep it private.
    #[arg(long, env = "CELLCHAT_PASSPHRASE_FILE", value_name = "FILE")]
    passphrase_file: Option<PathBuf>,
    /// Where identities and pinned cluster CAs live; default $CELLCHAT_CONFIG_DIR, else
    /// ~/.config/cellchat.
    #[arg(long, env = "CELLCHAT_CONFIG_DIR", value_name = "DIR")]
    config_dir: Option<PathBuf>,
    /// The cluster's join token (`server token` prints it): trust only nodes signed by its CA.
    /// Without it: the token next to the servers' data dirs on this machine (--data-root),
    /// else the CA pinned for this cluster name, else the first CA met, which is then pinned.
    #[arg(long, env = "CELLCHAT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Where the servers on this machine keep their data dirs (and the cluster's token).
    #[arg(
        long,
        env = "CELLCHAT_DATA_ROOT",
        default_value = "data",
        value_name = "DIR"
    )]
    data_root: PathBuf,
    /// Log filter for diagnostics on stderr (e.g. `info`, `cellchat_client=debug`).
    #[arg(long, env = "CELLCHAT_LOG", default_value = "warn")]
    log: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("client: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("client: {}", output::sanitize(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

/// The cluster's token: `--token`, else the one the servers keep under `--data-root` (a
/// server and its clients on one machine need no flags), else none.
fn find_token(args: &Args) -> anyhow::Result<Option<proto::tls::JoinToken>> {
    if let Some(token) = &args.token {
        return Ok(Some(token.parse().context("--token")?));
    }
    let path = args
        .data_root
        .join(format!("cluster-{}", args.cluster))
        .join("token");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            Ok(Some(text.trim().parse().with_context(|| {
                format!("the token in {}", path.display())
            })?))
        }
        Err(_) => Ok(None),
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let channel = command::parse_channel(&args.channel).map_err(anyhow::Error::msg)?;
    let passphrase = args
        .passphrase_file
        .as_ref()
        .map(read_passphrase)
        .transpose()?;
    if args.name.is_none() && !args.servers {
        bail!("give a user name, e.g. `cellchat Alice` (only --servers works without one)");
    }
    if let Some(text) = &args.send {
        check_message(text)?;
    }
    let config = ClientConfig {
        cluster: args.cluster.clone(),
        discovery_port: args.discovery_port,
        broadcast: args.broadcast,
        join: resolve_join(&args.join)?,
        name: args.name.clone(),
        config_dir: args.config_dir.clone(),
        token: find_token(&args)?,
        ..ClientConfig::default()
    };
    let client = Client::connect(config).await?;
    let key = match passphrase {
        Some(p) => Some(derive(&p, &args.cluster, &channel).await?),
        None => None,
    };
    if args.servers {
        return servers(&client, args.json).await;
    }
    if let Some(text) = &args.send {
        let reply = client.send_text(&channel, text, key.as_ref()).await?;
        println!("sent #{} seq {}", reply.channel, reply.seq);
        return Ok(());
    }
    if let Some(n) = args.history {
        let page = client.recent(&channel, n).await?;
        let now = timefmt::now_ms();
        for message in &page.messages {
            print_message(key.as_ref(), message, now, args.json);
        }
        return Ok(());
    }
    if args.tail {
        return tail(&client, &channel, key, args.json).await;
    }
    interactive::run(client, channel, key).await
}

fn print_message(
    key: Option<&ChannelKey>,
    message: &cellchat_client::WireMessage,
    now: u64,
    json: bool,
) {
    if json {
        println!("{}", output::json(key, message));
    } else {
        println!("{}", output::line(key, message, now));
    }
}

async fn servers(client: &Client, json: bool) -> anyhow::Result<()> {
    let servers = client.servers().await;
    if json {
        println!("{}", serde_json::to_string(&servers)?);
    } else {
        println!("{}", output::servers_table(&servers));
    }
    Ok(())
}

async fn tail(
    client: &Client,
    channel: &str,
    key: Option<ChannelKey>,
    json: bool,
) -> anyhow::Result<()> {
    let head = client.history(channel, None, 1).await?.head;
    let mut sub = client.subscribe(channel, head);
    loop {
        tokio::select! {
            next = sub.recv() => match next {
                Some(Ok(message)) => print_message(key.as_ref(), &message, timefmt::now_ms(), json),
                Some(Err(e)) => return Err(e.into()),
                None => bail!("the subscription ended"),
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// Refuses messages the cluster would refuse, before connecting.
fn check_message(text: &str) -> anyhow::Result<()> {
    if text.trim().is_empty() {
        bail!("empty message: nothing sent");
    }
    if text.len() > command::LINE_BYTES_MAX {
        bail!(
            "message is {} bytes, over the {} KiB limit: nothing sent",
            text.len(),
            command::LINE_BYTES_MAX / 1024
        );
    }
    Ok(())
}

/// The passphrase is the file's first line without its line ending.
fn read_passphrase(path: &PathBuf) -> anyhow::Result<String> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("reading the passphrase file {}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|_| {
        anyhow::anyhow!(
            "passphrase file {} is not UTF-8 text: write the passphrase as text",
            path.display()
        )
    })?;
    let first = text.lines().next().unwrap_or("").to_owned();
    if first.is_empty() {
        bail!(
            "passphrase file {} is empty: put the passphrase on its first line",
            path.display()
        );
    }
    Ok(first)
}

/// Argon2id is deliberately slow; run it off the async threads.
async fn derive(passphrase: &str, cluster: &str, channel: &str) -> anyhow::Result<ChannelKey> {
    let (p, c, ch) = (
        passphrase.to_owned(),
        cluster.to_owned(),
        channel.to_owned(),
    );
    let key = tokio::task::spawn_blocking(move || ChannelKey::derive(&p, &c, &ch)).await??;
    Ok(key)
}

fn resolve_join(join: &[String]) -> anyhow::Result<Vec<SocketAddr>> {
    let mut out = Vec::new();
    for entry in join.iter().map(|j| j.trim()).filter(|j| !j.is_empty()) {
        let addrs = entry
            .to_socket_addrs()
            .with_context(|| format!("--join {entry}: not a host:port (e.g. 10.0.0.5:7946)"))?;
        out.extend(addrs.filter(SocketAddr::is_ipv4));
    }
    Ok(out)
}
