//! End-to-end tests of the continuous archive on real `server` processes: the leader uploads
//! committed entries to a directory and to a real S3-compatible server (moto, started here on
//! loopback); a kill -9 of the leader and a frozen S3 server leave no gap and no duplicate;
//! `restore --from-archive` rebuilds a new cluster that serves every acknowledged message as
//! it was, whole or up to an index; bad archives and targets are refused leaving nothing.
//!
//! Timeouts are generous bounds for a loaded 2-core machine, not performance claims.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use cellchat_client::{Client, ClientConfig, Identity};
use testkit::TestCluster;

const READY: Duration = Duration::from_secs(60);
const CONVERGE: Duration = Duration::from_secs(60);
/// How long the archive may take to reach the cluster's applied index once writes stop.
const CATCH_UP: Duration = Duration::from_secs(60);

async fn start(cluster: &mut TestCluster, nodes: usize) -> anyhow::Result<()> {
    testkit::start_nodes(cluster, nodes, READY, CONVERGE).await
}

fn config(cluster: &TestCluster, name: &str, token: Option<&str>) -> anyhow::Result<ClientConfig> {
    let mut key = [9u8; 32];
    for (k, b) in key.iter_mut().zip(name.bytes()) {
        *k = b;
    }
    Ok(ClientConfig {
        identity: Some(Identity::ephemeral(name, Some(key))),
        token: token.map(str::parse).transpose()?,
        ..ClientConfig::new(cluster.cluster.clone(), cluster.discovery_port)
    })
}

fn run_ok(output: std::process::Output, what: &str) -> anyhow::Result<String> {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    ensure!(output.status.success(), "{what} failed: {stdout}\n{stderr}");
    Ok(stdout)
}

fn run_err(output: std::process::Output, what: &str) -> anyhow::Result<String> {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    ensure!(
        !output.status.success(),
        "{what} should have failed: {stdout}"
    );
    Ok(stderr)
}

/// Every message of `channel`, by seq: (sender, body, time).
type History = BTreeMap<u64, (String, Vec<u8>, u64)>;

async fn history(client: &Client, channel: &str) -> anyhow::Result<History> {
    let batch = client.recent(channel, 1_000_000).await?;
    Ok(batch
        .messages
        .into_iter()
        .map(|m| (m.seq, (m.sender, m.body, m.at_ms)))
        .collect())
}

/// Sends `count` messages numbered from `from`, recording each acknowledged seq.
async fn send(
    client: &Client,
    from: u64,
    count: u64,
    acked: &mut BTreeMap<u64, Vec<u8>>,
) -> anyhow::Result<()> {
    for n in from..from + count {
        let body = format!("message {n}").into_bytes();
        let sent = client.send("general", body.clone()).await?;
        ensure!(
            acked.insert(sent.seq, body).is_none(),
            "seq {} acknowledged twice",
            sent.seq
        );
    }
    Ok(())
}

/// The highest applied index any node of `cluster` reports.
fn applied(cluster: &TestCluster) -> anyhow::Result<u64> {
    let out = run_ok(cluster.admin(&["status", "--json"])?, "status")?;
    let rows: serde_json::Value = serde_json::from_str(out.trim())?;
    rows.as_array()
        .context("status rows")?
        .iter()
        .filter_map(|r| r["applied"].as_u64())
        .max()
        .context("no node reports an applied index")
}

/// `archive-info --json` for the archive `args` name.
fn archive_info(cluster: &TestCluster, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let mut all = vec!["archive-info", "--json"];
    all.extend_from_slice(args);
    let out = run_ok(cluster.admin(&all)?, "archive-info")?;
    Ok(serde_json::from_str(out.trim())?)
}

/// Waits until the archive reaches the cluster's applied index (writes have stopped).
async fn wait_archived(cluster: &TestCluster, args: &[&str]) -> anyhow::Result<u64> {
    let target = applied(cluster)?;
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let info = archive_info(cluster, args)?;
        let last = info["last_index"].as_u64().unwrap_or(0);
        if last >= target {
            return Ok(last);
        }
        if Instant::now() > deadline {
            bail!("the archive reached index {last}, not {target}, in {CATCH_UP:?}: {info}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Restores from the archive into a new cluster's first node, starts three nodes there, and
/// returns the cluster, a client and the restore's JSON report.
async fn restore_and_start(
    old_cluster: &str,
    archive: &[&str],
    until: Option<&str>,
    name: &str,
) -> anyhow::Result<(TestCluster, Client, serde_json::Value)> {
    let mut new = TestCluster::new(name, &[])?;
    new.cluster = old_cluster.to_owned();
    let target = new.dir().join("node-1");
    let target_arg = target.to_str().context("utf-8 path")?.to_owned();
    let mut args = vec!["restore", "--data-dir", &target_arg, "--json"];
    args.extend_from_slice(archive);
    if let Some(until) = until {
        args.extend_from_slice(&["--until", until]);
    }
    let report = run_ok(new.admin(&args)?, "restore --from-archive")?;
    let report: serde_json::Value = serde_json::from_str(report.trim())?;
    let token = report["token"].as_str().context("token")?.to_owned();
    start(&mut new, 3).await?;
    let client = Client::connect(config(&new, "alice", Some(&token))?).await?;
    Ok((new, client, report))
}

/// The restored channel holds exactly the old one: same seqs, senders, bodies and times, every
/// acknowledged message among them, nothing twice (seqs dense from 1).
fn same_history(
    restored: &History,
    old: &History,
    acked: &BTreeMap<u64, Vec<u8>>,
) -> anyhow::Result<()> {
    ensure!(
        restored.len() as u64 == restored.keys().next_back().copied().unwrap_or(0),
        "restored seqs are not dense from 1"
    );
    for (seq, body) in acked {
        let Some((sender, got, _)) = restored.get(seq) else {
            bail!("acknowledged message {seq} is missing from the restore");
        };
        ensure!(sender == "alice" && got == body, "message {seq} differs");
    }
    ensure!(
        restored == old,
        "the restore differs from the old cluster's history"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_directory_archive_survives_a_leader_kill_and_restores_whole_or_to_an_index(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = format!("file://{}", dir.path().join("archive").display());
    // A new base every 2 s: restores to a point before the latest base still work.
    let mut cluster = TestCluster::new(
        "archive-dir",
        &[
            "--archive",
            &url,
            "--archive-interval-ms",
            "200",
            "--archive-base-interval-s",
            "2",
        ],
    )?;
    start(&mut cluster, 3).await?;
    let alice = Client::connect(config(&cluster, "alice", None)?).await?;
    let mut acked = BTreeMap::new();
    send(&alice, 1, 40, &mut acked).await?;
    // A point in time after message 40 was acknowledged and before 41 is sent.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let cut = chrono::DateTime::from_timestamp_millis(i64::try_from(now_ms)?)
        .context("a time")?
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let first_40: Vec<u64> = acked.keys().copied().collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    // A leader killed while it uploads: the next one resumes from what the archive holds.
    let index = testkit::leader_index(&cluster, Duration::from_secs(10)).await?;
    cluster.nodes[index].kill9();
    send(&alice, 41, 40, &mut acked).await?;
    cluster.restart(index, READY)?;
    send(&alice, 81, 20, &mut acked).await?;
    let archive = ["--from-archive", url.as_str()];
    let info_args = ["--archive", url.as_str()];
    let last = wait_archived(&cluster, &info_args).await?;
    let info = archive_info(&cluster, &info_args)?;
    ensure!(
        info["identity"]["cluster"] == cluster.cluster.as_str(),
        "{info}"
    );
    ensure!(info["restorable"][0][1].as_u64() == Some(last), "{info}");
    ensure!(
        info["bases"].as_array().map_or(0, Vec::len) >= 2,
        "no periodic base was cut: {info}"
    );
    // Idle, no new base: once writes stop, two readings a base interval and more apart agree.
    let bases = |info: &serde_json::Value| info["bases"].as_array().map_or(0, Vec::len);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut before = bases(&info);
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = bases(&archive_info(&cluster, &info_args)?);
        if now == before {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "bases are still being cut on an idle cluster: {before} then {now}"
        );
        before = now;
    }
    let old = history(&alice, "general").await?;
    ensure!(
        old.len() == 100,
        "{} messages on the old cluster",
        old.len()
    );

    // Bad input changes nothing: an index past the archive, a non-empty target.
    let target = cluster.dir().join("not-created");
    let target_arg = target.to_str().context("utf-8")?.to_owned();
    let past = (last + 1000).to_string();
    let err = run_err(
        cluster.admin(&[
            "restore",
            "--from-archive",
            &url,
            "--until",
            &past,
            "--data-dir",
            &target_arg,
        ])?,
        "restore past the archive",
    )?;
    ensure!(
        err.contains("past what the base") && err.contains("can restore indexes"),
        "{err}"
    );
    ensure!(
        !target.exists(),
        "a refused restore left {}",
        target.display()
    );
    let busy = cluster.nodes[0]
        .data_dir()
        .to_str()
        .context("utf-8")?
        .to_owned();
    let err = run_err(
        cluster.admin(&["restore", "--from-archive", &url, "--data-dir", &busy])?,
        "restore into a used data dir",
    )?;
    ensure!(err.contains("not empty"), "{err}");
    // An archive signed by another CA than the one expected (here: another fingerprint).
    let ca = info["identity"]["ca"]
        .as_str()
        .context("the CA")?
        .to_owned();
    let other_ca = "00".repeat(32);
    let err = run_err(
        cluster.admin(&[
            "restore",
            "--from-archive",
            &url,
            "--expect-ca",
            &other_ca,
            "--data-dir",
            &target_arg,
        ])?,
        "restore expecting another CA",
    )?;
    ensure!(
        err.contains(&format!("is signed by CA {ca}")) && err.contains("nothing was created"),
        "{err}"
    );
    ensure!(!target.exists(), "a refused restore left {target_arg}");

    // The whole archive, into a new cluster (test clusters run one at a time), pinned to the
    // CA of the cluster that wrote it.
    let name = cluster.cluster.clone();
    drop(alice);
    drop(cluster);
    let pinned = ["--from-archive", url.as_str(), "--expect-ca", ca.as_str()];
    let (whole, client, report) = restore_and_start(&name, &pinned, None, "from-dir").await?;
    ensure!(report["applied_index"].as_u64() == Some(last), "{report}");
    ensure!(
        report["from_archive"]["ca"] == ca.as_str() && report["from_archive"]["ca_checked"] == true,
        "{report}"
    );
    same_history(&history(&client, "general").await?, &old, &acked)?;

    // Up to an index: the state at that index is a prefix of the whole.
    let mid = last / 2;
    drop(client);
    drop(whole);
    let (part_cluster, client, report) =
        restore_and_start(&name, &archive, Some(&mid.to_string()), "from-dir-mid").await?;
    ensure!(report["applied_index"].as_u64() == Some(mid), "{report}");
    let part = history(&client, "general").await?;
    ensure!(
        !part.is_empty() && part.len() < old.len(),
        "{} of {}",
        part.len(),
        old.len()
    );
    for (seq, message) in &part {
        ensure!(
            old.get(seq) == Some(message),
            "{seq} differs in the partial restore"
        );
    }

    // Up to a time: exactly the messages acknowledged before it.
    drop(client);
    drop(part_cluster);
    let (_timed, client, report) =
        restore_and_start(&name, &archive, Some(&cut), "from-dir-time").await?;
    let timed = history(&client, "general").await?;
    ensure!(
        timed.keys().copied().collect::<Vec<_>>() == first_40,
        "restored to {cut}: seqs {:?}, expected the first 40 ({report})",
        timed.keys().collect::<Vec<_>>()
    );
    for (seq, message) in &timed {
        ensure!(
            old.get(seq) == Some(message),
            "{seq} differs in the timed restore"
        );
    }

    // A base whose signature is not the CA's (one hex digit of its name changed, as a bucket
    // writer would have to) is refused, and nothing is created.
    let bases = dir.path().join("archive").join("base");
    let latest = std::fs::read_dir(&bases)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .max()
        .context("a base")?;
    let name = latest
        .file_name()
        .and_then(|n| n.to_str())
        .context("utf-8")?;
    let (head, sig) = name.rsplit_once('-').context("a signed base name")?;
    let flipped = if sig.starts_with('0') { '1' } else { '0' };
    let forged = bases.join(format!("{head}-{flipped}{}", &sig[1..]));
    std::fs::rename(&latest, &forged)?;
    let target = dir.path().join("not-created");
    let target_arg = target.to_str().context("utf-8")?.to_owned();
    let err = run_err(
        tool(&["restore", "--from-archive", &url, "--data-dir", &target_arg])?,
        "restore from a base with a forged signature",
    )?;
    ensure!(err.contains("signature is not the archive CA's"), "{err}");
    ensure!(!target.exists(), "a refused restore left {target_arg}");
    Ok(())
}

/// The server binary with `args`, for commands that need no cluster (restore, archive-info).
fn tool(args: &[&str]) -> anyhow::Result<std::process::Output> {
    Ok(Command::new(testkit::server_binary()?)
        .args(args)
        .stdin(Stdio::null())
        .output()?)
}

/// A moto S3 server on a loopback port, killed when dropped.
struct Moto {
    child: Child,
    endpoint: String,
    checks_credentials: bool,
}

impl Moto {
    /// A server that takes any credentials.
    fn start() -> anyhow::Result<Moto> {
        Moto::start_checking(false)
    }

    /// With `checks_credentials`, moto checks every request's signature against its own IAM
    /// users, and it has none, so every key is refused.
    fn start_checking(checks_credentials: bool) -> anyhow::Result<Moto> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        Ok(Moto {
            child: Moto::spawn(port, checks_credentials)?,
            endpoint: format!("http://127.0.0.1:{port}"),
            checks_credentials,
        })
    }

    /// Kills the server (kill -9; it keeps everything in memory, so every object is lost) and
    /// starts a new one on the same port.
    fn restart(&mut self) -> anyhow::Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let port: u16 = self.endpoint.rsplit(':').next().context("port")?.parse()?;
        self.child = Moto::spawn(port, self.checks_credentials)?;
        Ok(())
    }

    /// Starts moto on `port` and waits until it listens.
    fn spawn(port: u16, checks_credentials: bool) -> anyhow::Result<Child> {
        let binary = find_moto()?;
        let mut command = Command::new(&binary);
        if checks_credentials {
            command.env("INITIAL_NO_AUTH_ACTION_COUNT", "0");
        }
        let mut child = command
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("moto did not listen on {port} in 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(child)
    }

    /// Creates a bucket (moto accepts unsigned requests).
    fn create_bucket(&self, bucket: &str) -> anyhow::Result<()> {
        use std::io::{Read, Write};
        let host = self.endpoint.trim_start_matches("http://");
        let mut stream = std::net::TcpStream::connect(host)?;
        write!(
            stream,
            "PUT /{bucket} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        ensure!(
            answer.starts_with("HTTP/1.1 200"),
            "creating the bucket: {answer}"
        );
        Ok(())
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()?;
        ensure!(status.success(), "kill {signal} moto");
        Ok(())
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.signal("-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// moto's server: `MOTO_SERVER`, else on PATH, else pyenv's shim (where this machine kind has
/// it; `.ci/run` installs it on a machine without).
fn find_moto() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("MOTO_SERVER") {
        return Ok(PathBuf::from(path));
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("moto_server"))
        .chain([PathBuf::from("/root/.pyenv/shims/moto_server")])
        .find(|p| p.is_file());
    on_path.context(
        "moto_server not found (pip install 'moto[server]', or set MOTO_SERVER): the archive's \
         S3 test needs a real S3-compatible server",
    )
}

/// A cluster (no node started yet) archiving to `url` on the S3 server at `endpoint`, sealing
/// a chunk every 200 ms.
fn s3_cluster(name: &str, url: &str, endpoint: &str) -> anyhow::Result<TestCluster> {
    let flags = [
        "--archive",
        url,
        "--archive-endpoint",
        endpoint,
        "--archive-interval-ms",
        "200",
    ];
    TestCluster::new(name, &flags)
}

/// Credentials for moto, which the nodes and tools read from the environment; every test sets
/// the same values.
fn aws_env() {
    for (key, value) in [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
    ] {
        std::env::set_var(key, value);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_s3_archive_survives_a_frozen_server_a_restarted_one_and_a_leader_kill(
) -> anyhow::Result<()> {
    let mut moto = Moto::start()?;
    moto.create_bucket("cellchat")?;
    let url = "s3://cellchat/cluster-a";
    let endpoint = moto.endpoint.clone();
    let at = ["--archive-endpoint", endpoint.as_str()];
    aws_env();
    let mut cluster = s3_cluster("archive-s3", url, &endpoint)?;
    start(&mut cluster, 3).await?;
    let alice = Client::connect(config(&cluster, "alice", None)?).await?;
    let mut acked = BTreeMap::new();
    send(&alice, 1, 30, &mut acked).await?;
    // The S3 server frozen for a few seconds while writes go on: uploads stall and resume.
    moto.signal("-STOP")?;
    send(&alice, 31, 30, &mut acked).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    moto.signal("-CONT")?;
    // The S3 server killed and restarted empty (moto keeps nothing on disk) while writes go
    // on: once the bucket is back, the leader starts the archive again from a new base.
    let info_args = ["--archive", url, at[0], at[1]];
    wait_archived(&cluster, &info_args).await?;
    moto.restart()?;
    send(&alice, 61, 10, &mut acked).await?;
    moto.create_bucket("cellchat")?;
    send(&alice, 71, 10, &mut acked).await?;
    let index = testkit::leader_index(&cluster, Duration::from_secs(10)).await?;
    cluster.nodes[index].kill9();
    send(&alice, 81, 30, &mut acked).await?;
    let last = wait_archived(&cluster, &info_args).await?;
    let old = history(&alice, "general").await?;
    ensure!(
        old.len() == 110,
        "{} messages on the old cluster",
        old.len()
    );
    let info = archive_info(&cluster, &info_args)?;
    ensure!(
        info["bases"].as_array().map(Vec::len) == Some(1)
            && info["bases"][0][0].as_u64() > Some(60),
        "the emptied archive did not start again from a new base: {info}"
    );
    let archive = ["--from-archive", url, at[0], at[1]];
    let name = cluster.cluster.clone();
    drop(alice);
    drop(cluster);
    let (new, client, report) = restore_and_start(&name, &archive, None, "from-s3").await?;
    ensure!(report["applied_index"].as_u64() == Some(last), "{report}");
    same_history(&history(&client, "general").await?, &old, &acked)?;

    // An unreachable endpoint is named, and nothing is created.
    drop(moto);
    let target = new.dir().join("not-created");
    let target_arg = target.to_str().context("utf-8")?.to_owned();
    let err = run_err(
        new.admin(&[
            "restore",
            "--from-archive",
            url,
            at[0],
            at[1],
            "--data-dir",
            &target_arg,
        ])?,
        "restore from a dead endpoint",
    )?;
    ensure!(
        err.contains(url) && err.contains("nothing was created"),
        "{err}"
    );
    ensure!(
        !target.exists(),
        "a failed restore left {}",
        target.display()
    );
    Ok(())
}

/// Runs the server binary with `args` in a private mount namespace where `dir` is a 256 KiB
/// tmpfs, so writing there runs out of space. Returns the output and what was left in `dir`
/// when the command ended (the mount vanishes with the namespace). Needs root, like the
/// jepsen tests' network namespaces.
fn on_full_disk(
    cluster: &TestCluster,
    dir: &std::path::Path,
    args: &[&str],
) -> anyhow::Result<(std::process::Output, Vec<String>)> {
    const LEFT: &str = "@@left:";
    std::fs::create_dir_all(dir)?;
    let script = format!(
        "dir=$0; mount -t tmpfs -o size=256k cellchat-full \"$dir\" || exit 99; \"$@\"; rc=$?; \
         echo {LEFT}; ls -A \"$dir\"; exit $rc"
    );
    let output = Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .arg(dir)
        .arg(testkit::server_binary()?)
        .args(args)
        .args(cluster.admin_flags())
        .stdin(Stdio::null())
        .output()
        .context("running unshare (util-linux)")?;
    ensure!(
        output.status.code() != Some(99),
        "cannot mount a tmpfs in a private mount namespace (this test needs root): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let (_, left) = stdout.rsplit_once(LEFT).context("the script's listing")?;
    let left = left.split_whitespace().map(str::to_owned).collect();
    Ok((output, left))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_credentials_a_missing_bucket_and_a_full_disk_are_named_and_leave_nothing(
) -> anyhow::Result<()> {
    aws_env();
    // Credentials the S3 server refuses: a node keeps acknowledging writes and names the
    // cause in its log; the tools name it and create nothing.
    let moto = Moto::start_checking(true)?;
    let url = "s3://cellchat/refused";
    let at = ["--archive-endpoint", moto.endpoint.as_str()];
    let mut cluster = s3_cluster("archive-refused", url, &moto.endpoint)?;
    start(&mut cluster, 1).await?;
    let alice = Client::connect(config(&cluster, "alice", None)?).await?;
    let mut acked = BTreeMap::new();
    send(&alice, 1, 20, &mut acked).await?;
    let refused = "the store refused the credentials";
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cluster.nodes[0].log_tail(200).contains(refused) {
        ensure!(
            Instant::now() < deadline,
            "the node never logged the refused credentials:\n{}",
            cluster.nodes[0].log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    send(&alice, 21, 5, &mut acked).await?;
    let err = run_err(
        cluster.admin(&["archive-info", "--archive", url, at[0], at[1]])?,
        "archive-info with refused credentials",
    )?;
    ensure!(
        err.contains(refused) && err.contains("InvalidAccessKeyId"),
        "{err}"
    );
    let target = cluster.dir().join("not-created");
    let target_arg = target.to_str().context("utf-8")?.to_owned();
    let restore = [
        "restore",
        "--from-archive",
        url,
        at[0],
        at[1],
        "--data-dir",
        &target_arg,
    ];
    let err = run_err(cluster.admin(&restore)?, "restore with refused credentials")?;
    ensure!(
        err.contains(refused) && err.contains("nothing was created"),
        "{err}"
    );
    ensure!(!target.exists(), "a refused restore left {target_arg}");
    drop(moto);

    // A bucket that does not exist is named as such, not taken for an empty archive.
    let moto = Moto::start()?;
    let at = ["--archive-endpoint", moto.endpoint.as_str()];
    let err = run_err(
        cluster.admin(&["archive-info", "--archive", "s3://missing/x", at[0], at[1]])?,
        "archive-info of a missing bucket",
    )?;
    ensure!(err.contains("the bucket does not exist"), "{err}");
    drop(moto);
    drop(alice);
    drop(cluster);

    // A full disk under a backup, a restore and a restore from the archive: each names it
    // and leaves nothing behind.
    let dir = tempfile::tempdir()?;
    let url = format!("file://{}", dir.path().join("archive").display());
    let mut cluster = TestCluster::new(
        "archive-full",
        &["--archive", &url, "--archive-interval-ms", "200"],
    )?;
    start(&mut cluster, 1).await?;
    let alice = Client::connect(config(&cluster, "alice", None)?).await?;
    // About 1.2 MB of messages, several times the full disk.
    for _ in 0..300 {
        alice.send("general", vec![b'x'; 4000]).await?;
    }
    wait_archived(&cluster, &["--archive", &url]).await?;
    let good = dir.path().join("good.ccb");
    let good_arg = good.to_str().context("utf-8")?.to_owned();
    run_ok(
        cluster.admin(&["backup", "--out", &good_arg])?,
        "a backup to a disk with room",
    )?;
    let full = dir.path().join("full");
    let full_file = full.join("b.ccb");
    let full_target = full.join("restored");
    let runs: [(&str, Vec<&str>); 3] = [
        (
            "backup",
            vec!["backup", "--out", full_file.to_str().context("utf-8")?],
        ),
        (
            "restore",
            vec![
                "restore",
                &good_arg,
                "--data-dir",
                full_target.to_str().context("utf-8")?,
            ],
        ),
        (
            "restore --from-archive",
            vec![
                "restore",
                "--from-archive",
                &url,
                "--data-dir",
                full_target.to_str().context("utf-8")?,
            ],
        ),
    ];
    for (what, args) in runs {
        let (output, left) = on_full_disk(&cluster, &full, &args)?;
        let err = run_err(output, &format!("{what} to a full disk"))?;
        ensure!(
            err.contains("No space left on device") || err.contains("the disk is full"),
            "{what} to a full disk: {err}"
        );
        ensure!(
            left.is_empty(),
            "{what} to a full disk left {left:?}: {err}"
        );
    }
    Ok(())
}
