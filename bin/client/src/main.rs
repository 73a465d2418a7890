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
use cellchat_client::crypto::{ChannelHistory, Keys};
use cellchat_client::identity::{self, KeyProtection, PassphrasePrompt};
use cellchat_client::{ChannelSecurity, Client, ClientConfig, Identity};
use clap::Parser;

const ABOUT: &str = "cellchat client: chat on a cellchat cluster, which it finds by itself.";

const AFTER_HELP: &str = "\
Examples:
  cellchat Alice                            chat interactively as Alice in #general
  cellchat Alice --send 'Hello world!'      send one message; exit 0 once acknowledged
  cellchat Bob --tail --channel random --json
                                            print #random's new messages as JSON lines
  cellchat Bob --history 50                 print the last 50 messages of #general
  cellchat Bob --history 50 --before 1200   the 50 messages before seq 1200 (any depth)
  cellchat --servers --json                 every node as one JSON array

Scriptable output: message JSON lines carry channel, seq, sender, text, at_ms, encrypted,
readable and client_seq; --servers --json prints one array of nodes with id, name, role,
client_addr, rtt_ms, applied, reading (the node this client reads from), leader and down.

Identity: the first run with a name creates an Ed25519 key in
<config dir>/identities/<cluster>/<NAME>.key (mode 0600) and the cluster registers the name to
it. To use the name on another machine, copy that file to the same path there (keep it private,
mode 0600). Without it, the name is refused there.

A key file can be protected by a passphrase (--protect-key); the client then asks for it
without echo, or reads it from --key-passphrase-file.

Encryption: with a channel passphrase (/key in the chat, or --passphrase-file) messages are
encrypted with AES-256-GCM under a key derived by Argon2id from the passphrase and the
channel's public record (salt and key check, so a wrong passphrase is reported); servers
store only ciphertext. Every message is signed with the sender's key; readers check it
against the key they pinned for that name (<config dir>/identities/<cluster>/known_users)
and mark what fails: [forged?], [replayed], [unverified], [unsigned], [plaintext].";

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
    /// With --history: the messages before this seq instead of the newest ones.
    #[arg(long, value_name = "SEQ", requires = "history", value_parser = clap::value_parser!(u64).range(1..))]
    before: Option<u64>,
    /// Print every node (role, address, RTT, applied index, which one you read from) and exit.
    #[arg(long)]
    servers: bool,
    /// Channel for --send, --tail and --history, and the first channel of the chat.
    #[arg(long, env = "CELLCHAT_CHANNEL", default_value = "general")]
    channel: String,
    /// With --send: send in the clear even when the channel is end-to-end encrypted.
    #[arg(long)]
    plaintext: bool,
    /// Protect your key file with a passphrase (asked twice, without echo) and exit.
    #[arg(long, conflicts_with_all = ["send", "tail", "history", "servers"])]
    protect_key: bool,
    /// File holding the passphrase of your protected key file (first line); without it the
    /// client asks on the terminal.
    #[arg(long, env = "CELLCHAT_KEY_PASSPHRASE_FILE", value_name = "FILE")]
    key_passphrase_file: Option<PathBuf>,
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
    let identity = match &args.name {
        Some(name) => Some(load_identity(&args, name)?),
        None => None,
    };
    if args.protect_key {
        return protect_key(identity.as_ref());
    }
    let config = ClientConfig {
        cluster: args.cluster.clone(),
        discovery_port: args.discovery_port,
        broadcast: args.broadcast,
        join: resolve_join(&args.join)?,
        name: args.name.clone(),
        identity,
        config_dir: Some(identity::config_dir(args.config_dir.as_deref())?),
        token: find_token(&args)?,
        ..ClientConfig::default()
    };
    let client = Client::connect(config).await?;
    if args.servers {
        return servers(&client, args.json).await;
    }
    let keys = match passphrase {
        Some(p) => Some(client.unlock_channel(&channel, &p).await?.keys),
        None => None,
    };
    // A channel whose pinned crypto record is gone or changed counts as encrypted.
    let history = match client.channel_security(&channel).await {
        Ok(ChannelSecurity::Plain) | Err(_) => ChannelHistory::Plain,
        Ok(_) => ChannelHistory::Encrypted,
    };
    if let Some(text) = &args.send {
        let key = keys.as_ref().and_then(|k| k.v2.as_ref());
        if key.is_none() && history == ChannelHistory::Encrypted && !args.plaintext {
            bail!(
                "#{channel} is end-to-end encrypted: give its passphrase with --passphrase-file, \
                 or send in the clear with --plaintext; nothing sent"
            );
        }
        let reply = client.send_text(&channel, text, key).await?;
        println!("sent #{channel} seq {}", reply.seq);
        return Ok(());
    }
    let keys = keys.unwrap_or_default();
    if let Some(n) = args.history {
        let page = client.recent_before(&channel, args.before, n).await?;
        let now = timefmt::now_ms();
        for message in &page.messages {
            print_message(&client, &keys, history, message, now, args.json).await;
        }
        return Ok(());
    }
    if args.tail {
        return tail(&client, &channel, &keys, history, args.json).await;
    }
    interactive::run(client, channel, Some(keys).filter(|k| k.v2.is_some())).await
}

/// Loads (or creates) the user's key file, asking for its passphrase when it is protected.
fn load_identity(args: &Args, name: &str) -> anyhow::Result<Identity> {
    let dir = identity::config_dir(args.config_dir.as_deref())?;
    let from_file = args
        .key_passphrase_file
        .as_ref()
        .map(read_passphrase)
        .transpose()?;
    let mut ask = |prompt: PassphrasePrompt<'_>| match prompt {
        PassphrasePrompt::Unlock { path } => from_file
            .clone()
            .or_else(|| interactive::ask_secret(&format!("passphrase of {}: ", path.display()))),
        PassphrasePrompt::Create { .. } => None,
    };
    let identity =
        Identity::load_or_create_with(&dir, &args.cluster, name, KeyProtection::Plain, &mut ask)?;
    Ok(identity)
}

/// `--protect-key`: seals the key file under a passphrase typed twice.
fn protect_key(identity: Option<&Identity>) -> anyhow::Result<()> {
    let identity = identity.context("--protect-key needs a user name")?;
    let first = interactive::ask_secret("new passphrase for your key file: ")
        .context("no passphrase given: nothing changed")?;
    let again = interactive::ask_secret("the same passphrase again: ")
        .context("no passphrase given: nothing changed")?;
    if first != again {
        bail!("the two passphrases differ: nothing changed");
    }
    identity.protect(&first)?;
    let path = identity.path().map(|p| p.display().to_string());
    println!(
        "{} is protected now: the client asks for the passphrase at start",
        path.unwrap_or_default()
    );
    Ok(())
}

async fn print_message(
    client: &Client,
    keys: &Keys,
    history: ChannelHistory,
    message: &cellchat_client::WireMessage,
    now: u64,
    json: bool,
) {
    let shown = client.show(keys, history, message).await;
    if json {
        println!("{}", output::json(&shown, message));
    } else {
        println!("{}", output::line(&shown, message, now));
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
    keys: &Keys,
    history: ChannelHistory,
    json: bool,
) -> anyhow::Result<()> {
    let head = client.history(channel, None, 1).await?.head;
    let mut sub = client.subscribe(channel, head);
    loop {
        tokio::select! {
            next = sub.recv() => match next {
                Some(Ok(message)) => {
                    print_message(client, keys, history, &message, timefmt::now_ms(), json).await
                }
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
