//! `backup`: the archive tools of issue 18 against a local cellchat cluster. Fills the cluster
//! with `messages` acknowledged sends, then times the real `cellchat-server backup`, `verify`
//! and `restore` subprocesses on it (one result, `part: archive`). Then, unless `passes` is 0,
//! closed-loop senders run in alternating windows without and with backups running back to
//! back, and the second result (`part: under_load`) compares their throughput and latency.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use super::write::{Senders, WriteOptions};
use super::{bar, connect_writers};
use crate::stats::{Latencies, RunResult};
use crate::sut::cellchat::Cellchat;
use crate::sut::procs::cpu_time;
use crate::sut::{System, Writer};

/// What one `backup` run does.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// Acknowledged sends that fill the cluster before the first backup.
    pub messages: u64,
    /// Concurrent writers filling it.
    pub fill_clients: usize,
    /// Topics (channels) the fill spreads over.
    pub topics: usize,
    /// Body size in bytes.
    pub body: usize,
    /// Pairs of measured windows (without, then with backups); 0 skips the under-load part.
    pub passes: usize,
    /// The closed-loop load of each window (its `duration` is the window).
    pub load: WriteOptions,
}

impl BackupOptions {
    /// Checks the bounds the command line cannot express.
    ///
    /// # Errors
    /// An option is out of its range.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            (1..=100_000_000).contains(&self.messages),
            "--messages must be 1..=100000000, got {}",
            self.messages
        );
        ensure!(
            (1..=4096).contains(&self.fill_clients),
            "--fill-clients must be 1..=4096, got {}",
            self.fill_clients
        );
        ensure!(
            (1..=4096).contains(&self.load.clients),
            "--clients must be 1..=4096, got {}",
            self.load.clients
        );
        ensure!(
            (1..=1024).contains(&self.topics),
            "--topics must be 1..=1024, got {}",
            self.topics
        );
        ensure!(
            self.passes <= 10,
            "--passes must be 0..=10, got {}",
            self.passes
        );
        Ok(())
    }
}

/// Longest any one tool run may take before it is killed and the run fails.
const TOOL_TIMEOUT: Duration = Duration::from_secs(900);
/// Attempts at one fill send before the fill fails (a leader change costs a few).
const SEND_ATTEMPTS_MAX: u32 = 50;
/// The slowest fill accepted: below this rate (plus a minute) the fill fails.
const FILL_RATE_MIN_PER_S: u64 = 100;
/// Pause after a failed backup in the under-load loop, so a failing tool is not restarted in
/// a tight loop.
const BACKUP_RETRY_PAUSE: Duration = Duration::from_millis(500);
/// Stderr kept per tool run, for error messages.
const STDERR_BYTES_MAX: usize = 16 * 1024;

/// The `cellchat-server` archive subcommands, pointed at a local cluster, and a scratch dir
/// for their files (removed on drop).
pub struct Tools {
    server: PathBuf,
    cluster: String,
    discovery_port: u16,
    /// Where the nodes' data dirs and the cluster's token are: the tools find the token there.
    data_root: PathBuf,
    scratch: tempfile::TempDir,
}

/// One finished tool run.
struct ToolRun {
    /// From spawning the process to its exit.
    wall: Duration,
    /// From spawning to the backup tool's "cut the state" line (the node has cut and the copy
    /// begins); `None` for other tools.
    cut: Option<Duration>,
    /// Its one JSON object.
    json: serde_json::Value,
}

impl Tools {
    /// The tools for the cluster `cellchat` started.
    ///
    /// # Errors
    /// The cluster was joined, the server binary is missing, or the scratch dir cannot be
    /// made.
    pub fn of(cellchat: &mut Cellchat) -> Result<Tools> {
        let cluster = cellchat
            .local()
            .context("backup measures a cluster the harness starts (not --join)")?;
        let scratch = tempfile::Builder::new()
            .prefix("cellchat-backup-bench-")
            .tempdir()
            .context("creating the scratch dir for backup files")?;
        Ok(Tools {
            server: testkit::server_binary()?,
            cluster: cluster.cluster.clone(),
            discovery_port: cluster.discovery_port,
            data_root: cluster.dir().to_path_buf(),
            scratch,
        })
    }

    /// `backup --out FILE --json` against the cluster.
    async fn backup(&self, file: &Path) -> Result<ToolRun> {
        let mut args: Vec<OsString> = vec!["backup".into(), "--out".into(), file.into()];
        args.extend(self.cluster_args());
        self.run(&args, "backup").await
    }

    /// `verify FILE --json`.
    async fn verify(&self, file: &Path) -> Result<ToolRun> {
        self.run(&["verify".into(), file.into()], "verify").await
    }

    /// `restore FILE --data-dir DIR --json`.
    async fn restore(&self, file: &Path, data_dir: &Path) -> Result<ToolRun> {
        let args: Vec<OsString> = vec![
            "restore".into(),
            file.into(),
            "--data-dir".into(),
            data_dir.into(),
        ];
        self.run(&args, "restore").await
    }

    /// Snapshots the nodes built for Raft (not for backups) so far, counted in their logs at
    /// `data_root/node-N.log` (their `snapshot built ... purpose=Snapshot` lines): each writes
    /// the whole state on its node, as a backup's cut does, so a window holding one is not
    /// a window of backups alone. Best effort: 0 when the logs cannot be read.
    fn raft_snapshots_built(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.data_root) else {
            return 0;
        };
        entries
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|e| e == "log"))
            .filter_map(|path| std::fs::read_to_string(path).ok())
            .map(|text| {
                text.lines()
                    .filter(|l| l.contains("snapshot built") && l.contains("purpose=Snapshot"))
                    .count()
            })
            .sum()
    }

    /// What `TestCluster::admin` passes: the cluster, where its token is, its discovery port.
    fn cluster_args(&self) -> Vec<OsString> {
        vec![
            "--cluster".into(),
            self.cluster.clone().into(),
            "--data-root".into(),
            self.data_root.clone().into(),
            "--discovery-port".into(),
            self.discovery_port.to_string().into(),
        ]
    }

    /// Runs `cellchat-server ARGS --json`, timed, and parses its JSON line. The process is
    /// killed when this future is dropped (an interrupted run) or after [`TOOL_TIMEOUT`].
    async fn run(&self, args: &[OsString], what: &str) -> Result<ToolRun> {
        let started = Instant::now();
        let mut child = tokio::process::Command::new(&self.server)
            .args(args)
            .arg("--json")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} {what}", self.server.display()))?;
        let mut stdout = child.stdout.take().context("the tool's stdout")?;
        let stderr = child.stderr.take().context("the tool's stderr")?;
        let read_stdout = async {
            let mut text = String::new();
            stdout.read_to_string(&mut text).await?;
            Ok::<_, std::io::Error>(text)
        };
        let read_stderr = async {
            let (mut text, mut cut) = (String::new(), None);
            let mut lines = BufReader::new(stderr).lines();
            while let Some(line) = lines.next_line().await? {
                if cut.is_none() && line.contains("cut the state") {
                    cut = Some(started.elapsed());
                }
                if text.len() < STDERR_BYTES_MAX {
                    text.push_str(&line);
                    text.push('\n');
                }
            }
            Ok::<_, std::io::Error>((text, cut))
        };
        let finished = tokio::time::timeout(TOOL_TIMEOUT, async {
            tokio::try_join!(child.wait(), read_stdout, read_stderr)
        })
        .await;
        let Ok(finished) = finished else {
            bail!("{what} did not finish within {TOOL_TIMEOUT:?}; killed it");
        };
        let (status, stdout, (stderr, cut)) =
            finished.with_context(|| format!("running {what}"))?;
        let wall = started.elapsed();
        if !status.success() {
            bail!("{what} failed ({status}):\n{stderr}");
        }
        let line = stdout
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .with_context(|| format!("{what} printed no JSON; stderr:\n{stderr}"))?;
        let json = serde_json::from_str(line)
            .with_context(|| format!("{what} printed something other than JSON: {line}"))?;
        Ok(ToolRun { wall, cut, json })
    }
}

/// Fills the cluster, then times backup, verify and restore of it.
///
/// # Errors
/// The fill failed, or a tool failed or printed no JSON.
pub async fn archive(
    cellchat: &Cellchat,
    tools: &Tools,
    options: &BackupOptions,
) -> Result<RunResult> {
    let (acked, fill_errors, fill_time) = fill(cellchat, options).await?;
    let file = tools.scratch.path().join("bench.ccb");
    let pids = cellchat.pids();
    let cpu = |pids: &[u32]| -> Duration { pids.iter().filter_map(|p| cpu_time(*p)).sum() };
    let cpu_before = cpu(&pids);
    let backup = tools.backup(&file).await?;
    let node_cpu = cpu(&pids).saturating_sub(cpu_before);
    let verify = tools.verify(&file).await?;
    let restore_root = tools.scratch.path().join("restore");
    let restore = tools.restore(&file, &restore_root.join("node-1")).await?;
    let restored_bytes = dir_bytes(&restore_root);
    // Both are large (hundreds of MB at a million messages); the scratch dir goes on drop too.
    std::fs::remove_dir_all(&restore_root)
        .with_context(|| format!("removing {}", restore_root.display()))?;
    std::fs::remove_file(&file).with_context(|| format!("removing {}", file.display()))?;

    let (b, v, r) = (&backup.json, &verify.json, &restore.json);
    let file_bytes = b["bytes"].as_u64().unwrap_or(0);
    let verified = file_bytes > 0 && v["bytes"] == b["bytes"] && v["sha256"] == b["sha256"];
    let restored = r["applied_index"] == b["manifest"]["applied_index"]
        && r["contents"] == b["manifest"]["contents"];
    let mut result = RunResult::new("backup", "cellchat", cellchat.node_count());
    result.clients = options.fill_clients;
    result.body_bytes = options.body;
    result.duration_s = fill_time.as_secs_f64();
    result.ops = acked;
    result.errors = fill_errors;
    result.throughput_per_s = acked as f64 / fill_time.as_secs_f64();
    result.set("part", "archive");
    result.set("messages", options.messages);
    result.set(
        "messages_in_backup",
        b["manifest"]["contents"]["messages"].clone(),
    );
    result.set("applied_index", b["manifest"]["applied_index"].clone());
    result.set("source_node", b["manifest"]["source_node"][1].clone());
    result.set("file_bytes", file_bytes);
    result.set("backup_s", backup.wall.as_secs_f64());
    result.set("backup_tool_elapsed_s", b["elapsed_s"].clone());
    let cut = backup.cut.map(|c| c.as_secs_f64());
    result.set("backup_until_cut_s", cut);
    result.set("backup_copy_s", cut.map(|c| backup.wall.as_secs_f64() - c));
    result.set(
        "backup_mib_per_s",
        file_bytes as f64 / (1 << 20) as f64 / backup.wall.as_secs_f64(),
    );
    result.set("backup_node_cpu_s", node_cpu.as_secs_f64());
    result.set("verify_s", verify.wall.as_secs_f64());
    result.set("restore_s", restore.wall.as_secs_f64());
    result.set("restore_tool_elapsed_s", r["elapsed_s"].clone());
    result.set("restored_dir_bytes", restored_bytes);
    result.set("verified", verified);
    result.set("restored", restored);
    Ok(result)
}

/// Sends `options.messages` messages of random bytes (as end-to-end encrypted bodies are, so
/// the store cannot compress them away) from `options.fill_clients` writers, retrying each
/// until it is acknowledged. Returns the acknowledged sends, the failed attempts and the time.
async fn fill(cellchat: &Cellchat, options: &BackupOptions) -> Result<(u64, u64, Duration)> {
    let writers = connect_writers(cellchat, options.fill_clients).await?;
    let claimed = Arc::new(AtomicU64::new(0));
    let progress = bar(options.messages, "filling the cluster");
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60 + options.messages / FILL_RATE_MIN_PER_S);
    let mut tasks = Vec::new();
    for (index, writer) in writers.into_iter().enumerate() {
        let claimed = claimed.clone();
        let progress = progress.clone();
        let topic = format!("archive-{}", index % options.topics);
        let (messages, body) = (options.messages, options.body);
        tasks.push(tokio::spawn(async move {
            let mut sends = FillSends {
                writer,
                topic,
                body,
                deadline,
                acked: 0,
                errors: 0,
            };
            // Each claim is one message to get acknowledged; the claims stop at `messages`,
            // and a writer that fails ends the others' claims too.
            while claimed.fetch_add(1, Ordering::Relaxed) < messages {
                let sent = if Instant::now() > deadline {
                    Err(anyhow::anyhow!(
                        "the fill ran slower than {FILL_RATE_MIN_PER_S} messages/s"
                    ))
                } else {
                    sends.send_one().await
                };
                if let Err(e) = sent {
                    claimed.store(messages, Ordering::Relaxed);
                    return Err(e);
                }
                progress.inc(1);
            }
            anyhow::Ok((sends.acked, sends.errors))
        }));
    }
    let (mut acked, mut errors) = (0, 0);
    let mut failure = None;
    for task in tasks {
        match task.await? {
            Ok((a, e)) => (acked, errors) = (acked + a, errors + e),
            Err(e) => failure = failure.or(Some(e)),
        }
    }
    progress.finish_and_clear();
    if let Some(e) = failure {
        return Err(e.context(format!("filling the cluster ({acked} acknowledged)")));
    }
    Ok((acked, errors, started.elapsed()))
}

/// One fill writer and what it counted.
struct FillSends {
    writer: Box<dyn Writer>,
    topic: String,
    body: usize,
    deadline: Instant,
    acked: u64,
    errors: u64,
}

impl FillSends {
    /// Sends one message until it is acknowledged, at most [`SEND_ATTEMPTS_MAX`] times and not
    /// past the deadline. A retry is a new send: a failed attempt may still have been stored,
    /// so the cluster may hold a few more messages than were acknowledged.
    async fn send_one(&mut self) -> Result<()> {
        let body: Vec<u8> = (0..self.body).map(|_| rand::random::<u8>()).collect();
        let mut attempt = 1;
        loop {
            match self.writer.write(&self.topic, body.clone()).await {
                Ok(()) => {
                    self.acked += 1;
                    return Ok(());
                }
                Err(e) => {
                    self.errors += 1;
                    if attempt >= SEND_ATTEMPTS_MAX || Instant::now() > self.deadline {
                        return Err(e.context(format!("a send failed {attempt} times")));
                    }
                }
            }
            attempt += 1;
            let backoff = Duration::from_millis(10 << attempt.min(6));
            tokio::time::sleep(backoff).await;
        }
    }
}

/// What one measured window gave.
#[derive(Default)]
struct Window {
    ops: u64,
    errors: u64,
    elapsed: Duration,
    latencies: Latencies,
}

impl Window {
    fn per_s(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    fn add(&mut self, other: &Window) {
        self.ops += other.ops;
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        self.latencies.merge(&other.latencies);
    }
}

/// Backups run back to back during one window.
#[derive(Default)]
struct BackupLoop {
    completed: u64,
    failed: u64,
    /// Wall seconds of each completed backup.
    seconds: Vec<f64>,
    /// The last failure, for the result.
    last_error: Option<String>,
}

/// `options.passes` pairs of windows: closed-loop senders without backups, then with backups
/// running back to back (alternating, so a drift over the run, such as the state growing,
/// weighs on both kinds alike).
///
/// # Errors
/// Senders could not connect, or a backup could not be removed.
pub async fn under_load(
    cellchat: &Cellchat,
    tools: &Tools,
    options: &BackupOptions,
) -> Result<RunResult> {
    let (mut plain, mut backed) = (Window::default(), Window::default());
    let (mut plain_passes, mut backed_passes) = (Vec::new(), Vec::new());
    let (mut plain_snapshots, mut backed_snapshots) = (Vec::new(), Vec::new());
    let mut backups = BackupLoop::default();
    for pass in 1..=options.passes {
        let senders = Senders::start(cellchat, &options.load).await?;
        let label = format!("pass {pass}: no backup");
        let snapshots_before = tools.raft_snapshots_built();
        tracing::info!(pass, backups = false, "window starts");
        let window = window_of(senders.measure(options.load.duration, &label).await?);
        tracing::info!(
            pass,
            backups = false,
            per_s = window.per_s(),
            "window ended"
        );
        plain_snapshots.push(
            tools
                .raft_snapshots_built()
                .saturating_sub(snapshots_before),
        );
        plain_passes.push(window.per_s());
        plain.add(&window);

        let senders = Senders::start(cellchat, &options.load).await?;
        let label = format!("pass {pass}: backups");
        let until = Instant::now() + options.load.duration;
        let snapshots_before = tools.raft_snapshots_built();
        tracing::info!(pass, backups = true, "window starts");
        let (measured, looped) = tokio::join!(
            senders.measure(options.load.duration, &label),
            backup_loop(tools, until, pass)
        );
        // Counted after the last backup ended, so it may include a few seconds past the window.
        backed_snapshots.push(
            tools
                .raft_snapshots_built()
                .saturating_sub(snapshots_before),
        );
        let window = window_of(measured?);
        let looped = looped?;
        tracing::info!(
            pass,
            backups = true,
            per_s = window.per_s(),
            "window and backups ended"
        );
        backed_passes.push(window.per_s());
        backed.add(&window);
        backups.completed += looped.completed;
        backups.failed += looped.failed;
        backups.seconds.extend(looped.seconds);
        backups.last_error = looped.last_error.or(backups.last_error);
    }
    let mut result = RunResult::new("backup", "cellchat", cellchat.node_count());
    result.clients = options.load.clients;
    result.body_bytes = options.load.body;
    result.duration_s = backed.elapsed.as_secs_f64();
    result.ops = backed.ops;
    result.errors = backed.errors;
    result.throughput_per_s = backed.per_s();
    result.latency_ms = backed.latencies.summary();
    let (plain_latency, backed_latency) = (plain.latencies.summary(), result.latency_ms);
    let ratio = backed.per_s() / plain.per_s().max(f64::MIN_POSITIVE);
    result.set("part", "under_load");
    result.set("passes", options.passes);
    result.set("baseline_per_s", plain.per_s());
    result.set("with_backups_per_s", backed.per_s());
    result.set("ratio", ratio);
    result.set("throughput_drop_percent", (1.0 - ratio) * 100.0);
    result.set("baseline_per_s_by_pass", plain_passes);
    result.set("with_backups_per_s_by_pass", backed_passes);
    result.set("baseline_p50_ms", plain_latency.p50);
    result.set("baseline_p99_ms", plain_latency.p99);
    result.set("baseline_errors", plain.errors);
    result.set("with_backups_p50_ms", backed_latency.p50);
    result.set("with_backups_p99_ms", backed_latency.p99);
    result.set("raft_snapshots_in_baseline_by_pass", plain_snapshots);
    result.set("raft_snapshots_in_with_backups_by_pass", backed_snapshots);
    result.set("backups_completed", backups.completed);
    result.set("backups_failed", backups.failed);
    let mean = backups.seconds.iter().sum::<f64>() / backups.seconds.len().max(1) as f64;
    result.set("backup_under_load_s_mean", mean);
    result.set("backup_under_load_s_by_run", backups.seconds);
    if let Some(error) = backups.last_error {
        result.set("backup_last_error", error);
    }
    Ok(result)
}

fn window_of((tally, elapsed): (super::write::SenderTally, Duration)) -> Window {
    Window {
        ops: tally.ops,
        errors: tally.errors,
        elapsed,
        latencies: tally.latencies,
    }
}

/// Starts backups one after another until `until`; the one running then is waited for (it
/// ends after the window, which no longer counts sends), so no session is left on a node.
async fn backup_loop(tools: &Tools, until: Instant, pass: usize) -> Result<BackupLoop> {
    let mut looped = BackupLoop::default();
    let mut run = 0;
    while Instant::now() < until {
        run += 1;
        let file = tools.scratch.path().join(format!("load-{pass}-{run}.ccb"));
        match tools.backup(&file).await {
            Ok(backup) => {
                looped.completed += 1;
                looped.seconds.push(backup.wall.as_secs_f64());
                std::fs::remove_file(&file)
                    .with_context(|| format!("removing {}", file.display()))?;
            }
            Err(e) => {
                looped.failed += 1;
                looped.last_error = Some(format!("{e:#}"));
                tokio::time::sleep(BACKUP_RETRY_PAUSE).await;
            }
        }
    }
    Ok(looped)
}

/// Bytes of the files under `dir` (0 for what cannot be read).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => dir_bytes(&entry.path()),
            Ok(_) => entry.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}
