//! The cellchat command-line client: `cellchat NAME` for interactive chat, plus scriptable modes
//! (`--send`, `--tail`, `--history`, `--servers`) that other tools depend on.

use client::{actions, command, interactive, output, timefmt, tui};

use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use cellchat_client::crypto::{ChannelHistory, Keys};
use cellchat_client::identity::{self, KeyProtection, PassphrasePrompt};
use cellchat_client::{ChannelSecurity, Client, ClientConfig, Identity, Relation};
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
  cellchat Alice --send 'deploy done' --idempotency-key job-4711 --json --timeout 10
                                            send at most once however often it is retried
  cellchat Bob --tail --after 1200          every message after seq 1200, then new ones
  cellchat --servers --json                 every node as one JSON array

Exit codes: 0 done (a --send acknowledged); 1 refused or failed, with the reason on stderr;
2 usage (bad arguments, nothing done); 3 the cluster could not be reached in time: a --send
may or may not have been applied, so retry it with the same --idempotency-key.

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
    /// Send TEXT to the channel and exit: 0 once acknowledged, 1 refused, 3 outcome unknown.
    #[arg(long, value_name = "TEXT", conflicts_with_all = ["tail", "history", "servers"])]
    send: Option<String>,
    /// With --send: a key of your choosing (a job id, say; 1 to 128 bytes). Every --send with
    /// the same key, user and channel is applied at most once, so a script may retry freely.
    #[arg(long, value_name = "KEY", requires = "send", value_parser = parse_idempotency_key, conflicts_with_all = ["reply", "edit"])]
    idempotency_key: Option<String>,
    /// With --send: send TEXT as a reply to message SEQ of the channel.
    #[arg(long, value_name = "SEQ", requires = "send", conflicts_with = "edit")]
    reply: Option<u64>,
    /// With --send: replace the text of your message SEQ by TEXT.
    #[arg(long, value_name = "SEQ", requires = "send")]
    edit: Option<u64>,
    /// Delete message SEQ (yours, or any in a channel you own): its text is erased on every
    /// node. Exit codes as --send.
    #[arg(long, value_name = "SEQ", conflicts_with_all = ["send", "tail", "history", "servers", "react", "unreact"])]
    delete: Option<u64>,
    /// React to message SEQ with EMOJI ("SEQ:EMOJI", e.g. 12:👍). Exit codes as --send.
    #[arg(long, value_name = "SEQ:EMOJI", value_parser = parse_reaction, conflicts_with_all = ["send", "tail", "history", "servers", "unreact"])]
    react: Option<(u64, String)>,
    /// Take back your reaction EMOJI to message SEQ ("SEQ:EMOJI").
    #[arg(long, value_name = "SEQ:EMOJI", value_parser = parse_reaction, conflicts_with_all = ["send", "tail", "history", "servers"])]
    unreact: Option<(u64, String)>,
    /// Print the channel's new messages as they arrive, until interrupted.
    #[arg(long, conflicts_with_all = ["history", "servers"])]
    tail: bool,
    /// With --tail: first every message after this seq, then new ones (resume a tail).
    #[arg(long, value_name = "SEQ", requires = "tail")]
    after: Option<u64>,
    /// Give up after SECONDS with exit code 3 (--send, --history, --servers), or stop after
    /// SECONDS with exit code 0 (--tail).
    #[arg(long, value_name = "SECONDS", value_parser = parse_timeout)]
    timeout: Option<std::time::Duration>,
    /// Print a completion script for SHELL (bash, zsh, fish, elvish, powershell) and exit.
    #[arg(long, value_name = "SHELL")]
    completions: Option<clap_complete::Shell>,
    /// Print the man page (roff; `cellchat --man | man -l -`) and exit.
    #[arg(long)]
    man: bool,
    /// Print the last N messages of the channel and exit.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000), conflicts_with = "servers")]
    history: Option<u32>,
    /// With --history: the messages before this seq instead of the newest ones.
    #[arg(long, value_name = "SEQ", requires = "history", value_parser = clap::value_parser!(u64).range(1..))]
    before: Option<u64>,
    /// Print every node (role, address, RTT, applied index, which one you read from) and exit.
    #[arg(long)]
    servers: bool,
    /// Print message SEQ of the channel and every reply to it, and exit.
    #[arg(long, value_name = "SEQ", value_parser = clap::value_parser!(u64).range(1..), conflicts_with_all = ["send", "delete", "react", "unreact", "tail", "history", "servers", "protect_key", "plain", "mark_read", "channels"])]
    thread: Option<u64>,
    /// Print the messages matching QUERY, newest first, and exit: every plaintext channel you
    /// may read (from a node's index), or, with the key of --channel (@NAME, or
    /// --passphrase-file), that encrypted channel's last 10,000 messages, searched here. All
    /// words must match; `depl*` is a prefix; `from:NAME` and `in:CHANNEL` filter.
    #[arg(long, value_name = "QUERY", conflicts_with_all = ["send", "delete", "react", "unreact", "tail", "history", "servers", "protect_key", "plain", "channels", "thread", "mark_read", "online"])]
    search: Option<String>,
    /// Mark the channel read up to SEQ for this user on all their clients, and exit.
    #[arg(long, value_name = "SEQ", value_parser = clap::value_parser!(u64).range(1..), conflicts_with_all = ["send", "delete", "react", "unreact", "tail", "history", "servers", "protect_key", "plain", "channels"])]
    mark_read: Option<u64>,
    /// Print every channel this user may see (messages, read marker, private, encrypted,
    /// invited) and exit.
    #[arg(long, conflicts_with_all = ["send", "delete", "react", "unreact", "tail", "history", "servers", "protect_key", "plain"])]
    channels: bool,
    /// Print every user online in the cluster (with a client connected to any node) and exit.
    #[arg(long, conflicts_with_all = ["send", "delete", "react", "unreact", "tail", "history", "servers", "protect_key", "plain", "channels", "thread", "mark_read"])]
    online: bool,
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
    /// Chat in the line mode even on a terminal (for screen readers, or to keep the scrollback
    /// in the terminal). Without a terminal, or with TERM=dumb, it is the mode anyway.
    #[arg(long, conflicts_with_all = ["send", "tail", "history", "servers", "protect_key"])]
    plain: bool,
    /// Where the full-screen chat writes its logs (it never writes them on the screen);
    /// default client.log in the config dir.
    #[arg(long, env = "CELLCHAT_LOG_FILE", value_name = "FILE")]
    log_file: Option<PathBuf>,
    /// Log filter for diagnostics on stderr (e.g. `info`, `cellchat_client=debug`).
    #[arg(long, env = "CELLCHAT_LOG", default_value = "warn")]
    log: String,
}

/// How the client ends, for scripts (the contract in bin/client/README.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// Done; a send was acknowledged.
    Done = 0,
    /// Refused or failed, for a reason retrying will not change.
    Refused = 1,
    /// Bad arguments: nothing was done.
    Usage = 2,
    /// The cluster could not be reached in time: a send may have been applied.
    Unknown = 3,
}

/// An error that is the caller's: [`Exit::Usage`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

/// No answer in time: [`Exit::Unknown`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct NoAnswer(String);

fn usage(text: impl Into<String>) -> anyhow::Error {
    Usage(text.into()).into()
}

impl Exit {
    /// The exit code an error means.
    fn of(error: &anyhow::Error) -> Exit {
        for cause in error.chain() {
            if cause.is::<Usage>() {
                return Exit::Usage;
            }
            if cause.is::<NoAnswer>() {
                return Exit::Unknown;
            }
            if let Some(e) = cause.downcast_ref::<cellchat_client::Error>() {
                use cellchat_client::Error as E;
                return match e {
                    E::NoServers { .. } | E::Unreachable { .. } | E::RetriesExhausted { .. } => {
                        Exit::Unknown
                    }
                    _ => Exit::Refused,
                };
            }
        }
        Exit::Refused
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(shell) = args.completions {
        let mut command = <Args as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut command, "cellchat", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    if args.man {
        let page = clap_mangen::Man::new(<Args as clap::CommandFactory>::command());
        return match page.render(&mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("client: writing the man page: {e}");
                ExitCode::from(Exit::Refused as u8)
            }
        };
    }
    let chatting = args.send.is_none()
        && args.delete.is_none()
        && args.react.is_none()
        && args.unreact.is_none()
        && !args.tail
        && args.history.is_none()
        && !args.servers
        && !args.protect_key
        && args.thread.is_none()
        && args.mark_read.is_none()
        && !args.channels
        && !args.online;
    let filter = tracing_subscriber::EnvFilter::new(&args.log);
    // The full-screen chat logs to a file: anything written to the terminal would land in
    // the middle of the drawing.
    let full_screen = if chatting && !args.plain && tui::usable() {
        match log_file(&args) {
            Ok((path, file)) => {
                tracing_subscriber::fmt()
                    .with_env_filter(filter)
                    .with_ansi(false)
                    .with_writer(std::sync::Mutex::new(file))
                    .init();
                Some(path)
            }
            Err(e) => {
                eprintln!("client: {}", output::sanitize(&format!("{e:#}")));
                return ExitCode::from(Exit::Usage as u8);
            }
        }
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
        None
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("client: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let sending = args.send.is_some()
        || args.delete.is_some()
        || args.react.is_some()
        || args.unreact.is_some();
    let keyed = args.idempotency_key.is_some();
    match runtime.block_on(run(args, full_screen)) {
        Ok(()) => ExitCode::from(Exit::Done as u8),
        Err(e) => {
            let exit = Exit::of(&e);
            eprintln!("client: {}", output::sanitize(&format!("{e:#}")));
            if exit == Exit::Unknown && sending {
                eprintln!(
                    "client: the message may or may not have been applied; {}",
                    if keyed {
                        "running the same command again applies it at most once"
                    } else {
                        "sending it again may show it twice (use --idempotency-key to retry \
                         safely)"
                    }
                );
            }
            ExitCode::from(exit as u8)
        }
    }
}

/// `SEQ:EMOJI` of --react and --unreact.
fn parse_reaction(text: &str) -> Result<(u64, String), String> {
    let (seq, emoji) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?}: give SEQ:EMOJI, e.g. 12:👍"))?;
    let seq = seq
        .parse()
        .map_err(|_| format!("{seq:?} is not a message seq"))?;
    if emoji.is_empty() {
        return Err("which emoji? give SEQ:EMOJI, e.g. 12:👍".to_owned());
    }
    Ok((seq, emoji.to_owned()))
}

/// The relation --reply, --edit, --delete, --react or --unreact asks for, with the text it
/// carries.
fn relation_of(args: &Args) -> Option<(Relation, String)> {
    let text = args.send.clone().unwrap_or_default();
    if let Some(to) = args.reply {
        return Some((Relation::Reply { to }, text));
    }
    if let Some(of) = args.edit {
        return Some((Relation::Edit { of }, text));
    }
    if let Some(of) = args.delete {
        return Some((Relation::Delete { of }, String::new()));
    }
    let react = |(to, emoji): &(u64, String), on| Relation::React {
        to: *to,
        emoji: emoji.clone(),
        on,
    };
    if let Some(r) = &args.react {
        return Some((react(r, true), String::new()));
    }
    args.unreact
        .as_ref()
        .map(|r| (react(r, false), String::new()))
}

fn parse_idempotency_key(text: &str) -> Result<String, String> {
    if text.is_empty() || text.len() > 128 {
        return Err(format!("{} bytes; give 1 to 128", text.len()));
    }
    Ok(text.to_owned())
}

fn parse_timeout(text: &str) -> Result<std::time::Duration, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(0.001..=86_400.0).contains(&seconds) {
        return Err(format!("{seconds} s; give 0.001 to 86400"));
    }
    Ok(std::time::Duration::from_secs_f64(seconds))
}

/// Writes one line to stdout. A reader that went away (`| head -1`) ends the client quietly
/// with exit code 0: what it wanted, it has.
fn out(line: impl std::fmt::Display) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(Exit::Done as i32);
        }
        eprintln!("client: writing to stdout: {e}");
        std::process::exit(Exit::Refused as i32);
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

async fn run(args: Args, full_screen: Option<PathBuf>) -> anyhow::Result<()> {
    let Some(limit) = args.timeout else {
        return run_modes(args, full_screen).await;
    };
    let tail = args.tail;
    match tokio::time::timeout(limit, run_modes(args, full_screen)).await {
        Ok(result) => result,
        Err(_) if tail => Ok(()),
        Err(_) => Err(NoAnswer(format!(
            "no answer within --timeout {:.3}s",
            limit.as_secs_f64()
        ))
        .into()),
    }
}

/// The full-screen chat's log file (created private), from `--log-file` or the config dir.
fn log_file(args: &Args) -> anyhow::Result<(PathBuf, std::fs::File)> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = match &args.log_file {
        Some(path) => path.clone(),
        None => identity::config_dir(args.config_dir.as_deref())?.join("client.log"),
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating {} for the log file", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening the log file {}", path.display()))?;
    Ok((path, file))
}

/// `full_screen`: the log file when the chat is drawn full-screen.
async fn run_modes(args: Args, full_screen: Option<PathBuf>) -> anyhow::Result<()> {
    // `@bob` or `@bob,carol` names a direct conversation, opened once connected.
    let direct_with = (args.channel.trim_start().starts_with('@'))
        .then(|| command::parse_users(&args.channel, "channel"))
        .transpose()
        .map_err(usage)?;
    let mut channel = match direct_with {
        Some(_) => String::new(),
        None => command::parse_channel(&args.channel).map_err(usage)?,
    };
    let passphrase = args
        .passphrase_file
        .as_ref()
        .map(read_passphrase)
        .transpose()
        .map_err(|e| usage(format!("{e:#}")))?;
    if args.name.is_none() && !args.servers {
        return Err(usage(
            "give a user name, e.g. `cellchat Alice` (only --servers works without one)",
        ));
    }
    if let Some(text) = &args.send {
        check_message(text).map_err(|e| usage(e.to_string()))?;
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
    let direct = match direct_with {
        Some(with) => Some(client.open_direct(&with).await?),
        None if proto::is_direct_channel(&channel) => {
            Some(client.open_direct_channel(&channel).await?)
        }
        None => None,
    };
    let keys = match (direct, passphrase) {
        (Some(direct), _) => {
            actions::learn_direct(
                client.name().unwrap_or_default(),
                &direct.channel,
                &direct.members,
            );
            channel = direct.channel;
            Some(direct.keys)
        }
        (None, Some(p)) => Some(client.unlock_channel(&channel, &p).await?.keys),
        (None, None) => None,
    };
    // A channel whose pinned crypto record is gone or changed counts as encrypted.
    let history = match client.channel_security(&channel).await {
        Ok(ChannelSecurity::Plain) | Err(_) => ChannelHistory::Plain,
        Ok(_) => ChannelHistory::Encrypted,
    };
    let related = relation_of(&args);
    if let Some(text) = args
        .send
        .as_ref()
        .or(related.as_ref().map(|(_, text)| text))
    {
        // A delete or reaction carries no text (the emoji is visible to the nodes anyway), so
        // it is signed, never encrypted, and needs no passphrase.
        let key = keys
            .as_ref()
            .and_then(|k| k.v2.as_ref())
            .filter(|_| args.send.is_some());
        if key.is_none()
            && history == ChannelHistory::Encrypted
            && !args.plaintext
            && args.send.is_some()
        {
            return Err(usage(format!(
                "#{channel} is end-to-end encrypted: give its passphrase with --passphrase-file, \
                 or send in the clear with --plaintext; nothing sent"
            )));
        }
        let reply = match (&args.idempotency_key, &related) {
            (_, Some((relation, _))) => {
                client
                    .send_related(&channel, text, key, relation.clone())
                    .await?
            }
            (Some(idempotency), None) => {
                client
                    .send_text_idempotent(&channel, text, key, idempotency)
                    .await?
            }
            (None, None) => client.send_text(&channel, text, key).await?,
        };
        if args.json {
            out(serde_json::json!({
                "channel": reply.channel,
                "seq": reply.seq,
                "at_ms": reply.at_ms,
                "read_token": reply.read_token,
                "duplicate": reply.duplicate,
                "idempotency_key": args.idempotency_key,
            }));
        } else if reply.duplicate {
            out(format_args!(
                "sent #{channel} seq {} (already applied: this key was sent before)",
                reply.seq
            ));
        } else {
            out(format_args!("sent #{channel} seq {}", reply.seq));
        }
        return Ok(());
    }
    let keys = keys.unwrap_or_default();
    if let Some(query) = &args.search {
        return search(&client, &channel, &keys, query, args.json).await;
    }
    if let Some(seq) = args.thread {
        let thread = client.thread(&channel, seq).await?;
        let now = timefmt::now_ms();
        for message in std::iter::once(&thread.target).chain(&thread.replies) {
            print_message(&client, &keys, history, message, now, args.json).await;
        }
        if !thread.complete {
            eprintln!(
                "client: some replies to #{seq} are further than {} messages after it, or                  expired",
                cellchat_client::THREAD_SCAN_MAX
            );
        }
        return Ok(());
    }
    if let Some(seq) = args.mark_read {
        let read_to = client.mark_read(&channel, seq).await?;
        if args.json {
            out(serde_json::json!({ "channel": channel, "read_to": read_to }));
        } else {
            out(format_args!("#{channel} read to #{read_to}"));
        }
        return Ok(());
    }
    if args.channels {
        return list_channels(&client, args.json).await;
    }
    if args.online {
        let online = client.online().await?;
        if args.json {
            out(serde_json::json!(online));
        } else {
            for user in &online {
                out(output::sanitize(user));
            }
        }
        return Ok(());
    }
    if let Some(n) = args.history {
        let page = client.recent_before(&channel, args.before, n).await?;
        let now = timefmt::now_ms();
        for message in &page.messages {
            print_message(&client, &keys, history, message, now, args.json).await;
        }
        return Ok(());
    }
    if args.tail {
        return tail(&client, &channel, &keys, history, args.after, args.json).await;
    }
    let keys = Some(keys).filter(|k| k.v2.is_some());
    match full_screen {
        Some(log) => {
            let dir = identity::config_dir(args.config_dir.as_deref())?;
            let name = client.name().unwrap_or("?").to_owned();
            let files = tui::Files::under(&dir, &args.cluster, &name, log);
            tui::run(client, channel, keys, files).await
        }
        None => interactive::run(client, channel, keys).await,
    }
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
    out(format_args!(
        "{} is protected now: the client asks for the passphrase at start",
        path.unwrap_or_default()
    ));
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
        out(output::json(&shown, message));
    } else {
        out(output::line(&shown, message, now));
    }
}

/// `--search QUERY`: see the flag. Exits 1 (after printing nothing) when nothing matched.
async fn search(
    client: &Client,
    channel: &str,
    keys: &Keys,
    query: &str,
    json: bool,
) -> anyhow::Result<()> {
    let now = timefmt::now_ms();
    let limit = actions::SEARCH_SHOWN;
    let found: Vec<(cellchat_client::WireMessage, cellchat_client::Shown)> = if keys.v2.is_some() {
        client
            .search_history(channel, keys, query, actions::SEARCH_SCAN, limit as usize)
            .await?
    } else {
        let reply = client.search(query, limit).await?;
        if reply.truncated {
            eprintln!("client: the search stopped early; narrow it to see older matches");
        }
        let mut found = Vec::with_capacity(reply.messages.len());
        for message in reply.messages {
            let shown = client.show(keys, ChannelHistory::Plain, &message).await;
            found.push((message, shown));
        }
        found
    };
    for (message, shown) in &found {
        if json {
            out(output::json(shown, message));
        } else {
            let here = output::sanitize(&actions::label(&message.channel));
            out(format_args!("{here} {}", output::line(shown, message, now)));
        }
    }
    if found.is_empty() {
        bail!("no message matches {query:?}");
    }
    Ok(())
}

/// `--channels`: one line (or JSON object) per channel this user may see.
async fn list_channels(client: &Client, json: bool) -> anyhow::Result<()> {
    let me = client.name().unwrap_or_default();
    for c in client.channels().await? {
        // A node's member list counts only when it gives the conversation's name.
        let direct = (!c.direct.is_empty() && proto::direct_channel_name(&c.direct) == c.name)
            .then_some(&c.direct);
        if json {
            out(serde_json::json!({
                "channel": c.name,
                "head": c.head,
                "read_to": c.read_to,
                "private": c.private,
                "encrypted": c.encrypted,
                "invited": c.invited,
                "direct": direct,
            }));
        } else if let Some(members) = direct {
            actions::learn_direct(me, &c.name, members);
            out(format_args!(
                "{} {} messages, read to #{} (direct, encrypted; --channel {})",
                output::sanitize(&actions::label(&c.name)),
                c.head,
                c.read_to,
                output::sanitize(&actions::label(&c.name).replace(", ", ",")),
            ));
        } else {
            let mut notes = Vec::new();
            for (on, note) in [
                (c.private, "private"),
                (c.encrypted, "encrypted"),
                (c.invited, "invited"),
            ] {
                if on {
                    notes.push(note);
                }
            }
            let notes = if notes.is_empty() {
                String::new()
            } else {
                format!(" ({})", notes.join(", "))
            };
            out(format_args!(
                "#{} {} messages, read to #{}{notes}",
                output::sanitize(&c.name),
                c.head,
                c.read_to
            ));
        }
    }
    Ok(())
}

async fn servers(client: &Client, json: bool) -> anyhow::Result<()> {
    let servers = client.servers().await;
    if json {
        out(serde_json::to_string(&servers)?);
    } else {
        out(output::servers_table(&servers));
    }
    Ok(())
}

async fn tail(
    client: &Client,
    channel: &str,
    keys: &Keys,
    history: ChannelHistory,
    after: Option<u64>,
    json: bool,
) -> anyhow::Result<()> {
    let after = match after {
        Some(seq) => seq,
        None => client.history(channel, None, 1).await?.head,
    };
    let mut sub = client.subscribe(channel, after);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// clap checks its own definition only in debug builds; the tests run in release.
    #[test]
    fn the_command_line_definition_is_consistent() {
        <Args as clap::CommandFactory>::command().debug_assert();
    }

    #[test]
    fn one_shot_modes_exclude_each_other() {
        let cases: [&[&str]; 4] = [
            &["cellchat", "bob", "--thread", "1", "--channels"],
            &["cellchat", "bob", "--online", "--tail"],
            &["cellchat", "bob", "--mark-read", "1", "--thread", "2"],
            &["cellchat", "bob", "--channels", "--send", "x"],
        ];
        for args in cases {
            assert!(Args::try_parse_from(args).is_err(), "{args:?}");
        }
        let zero = Args::try_parse_from(["cellchat", "bob", "--mark-read", "0"]);
        assert!(zero.is_err(), "seq 0 is not a message");
    }
}
