//! End-to-end tests of backups on real `server` processes: `server backup` under load,
//! `server restore` into a new cluster that serves every acknowledged message as it was, and a
//! backup that fails (killed, or its node killed) without leaving a file that looks complete.
//!
//! Timeouts are generous bounds for a loaded 2-core machine, not performance claims.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use cellchat_client::{ApiError, ChannelChange, Client, ClientConfig, Error, Identity};
use proto::RejectReason;
use testkit::TestCluster;

const READY: Duration = Duration::from_secs(60);
const CONVERGE: Duration = Duration::from_secs(60);

/// Rate limits out of the way: the load below is many senders per user.
const NO_LIMITS: [&str; 8] = [
    "--user-rate",
    "1000000",
    "--user-burst",
    "1000000",
    "--conn-rate",
    "1000000",
    "--conn-burst",
    "1000000",
];

/// Senders of the load, over this many users (one client each).
const SENDERS: usize = 128;
const USERS: usize = 8;

async fn start(cluster: &mut TestCluster, nodes: usize) -> anyhow::Result<()> {
    testkit::start_nodes(cluster, nodes, READY, CONVERGE).await
}

fn config(cluster: &TestCluster, name: &str, token: Option<&str>) -> anyhow::Result<ClientConfig> {
    Ok(ClientConfig {
        identity: Some(Identity::ephemeral(name, Some(key_of(name)))),
        token: token.map(str::parse).transpose()?,
        ..ClientConfig::new(cluster.cluster.clone(), cluster.discovery_port)
    })
}

/// A fixed identity key per name, so the same user logs in to the restored cluster.
fn key_of(name: &str) -> [u8; 32] {
    let mut key = [7u8; 32];
    for (k, b) in key.iter_mut().zip(name.bytes()) {
        *k ^= b;
    }
    key
}

/// One acknowledged message: where the cluster put it and what it was.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Acked {
    sender: String,
    body: Vec<u8>,
    client_id: [u8; 16],
    client_seq: u64,
}

type Ledger = Arc<Mutex<BTreeMap<(String, u64), Acked>>>;

/// 128 senders over 8 users writing to 4 channels until `stop`; every acknowledgement goes
/// into the ledger. Bodies are random bytes, as end-to-end encrypted bodies are.
fn load(
    clients: &[Arc<Client>],
    stop: &Arc<AtomicBool>,
    ledger: &Ledger,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..SENDERS)
        .map(|n| {
            let client = clients[n % clients.len()].clone();
            let (stop, ledger) = (stop.clone(), ledger.clone());
            tokio::spawn(async move {
                let channel = format!("load-{}", n % 4);
                while !stop.load(Ordering::Relaxed) {
                    let body: Vec<u8> = (0..64).map(|_| rand::random::<u8>()).collect();
                    let client_seq = client.next_client_seq();
                    let client_id = client.client_id();
                    let sent = client
                        .send_with_key(&channel, body.clone(), client_id, client_seq)
                        .await;
                    if let Ok(sent) = sent {
                        let acked = Acked {
                            sender: client.name().unwrap_or_default().to_owned(),
                            body,
                            client_id,
                            client_seq,
                        };
                        ledger
                            .lock()
                            .unwrap()
                            .insert((channel.clone(), sent.seq), acked);
                    }
                }
            })
        })
        .collect()
}

fn server(args: &[&str], cluster: &TestCluster) -> anyhow::Result<std::process::Output> {
    cluster.admin(args)
}

fn run_ok(output: std::process::Output, what: &str) -> anyhow::Result<String> {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    ensure!(output.status.success(), "{what} failed: {stdout}\n{stderr}");
    Ok(stdout)
}

/// Every message of `channel` on `client`'s cluster, by seq.
async fn all_messages(
    client: &Client,
    channel: &str,
) -> anyhow::Result<BTreeMap<u64, (String, Vec<u8>, u64)>> {
    let batch = client.recent(channel, 1_000_000).await?;
    Ok(batch
        .messages
        .into_iter()
        .map(|m| (m.seq, (m.sender, m.body, m.at_ms)))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_under_load_restores_into_a_new_cluster_with_every_acknowledged_message(
) -> anyhow::Result<()> {
    let mut old = TestCluster::new("backup", &NO_LIMITS)?;
    start(&mut old, 3).await?;
    let mut clients = Vec::new();
    for n in 0..USERS {
        clients.push(Arc::new(
            Client::connect(config(&old, &format!("user{n}"), None)?).await?,
        ));
    }
    // A user is registered by its first message; only registered users can be invited.
    for client in &clients {
        client.send("lobby", b"hello".to_vec()).await?;
    }
    // A private channel with an encryption record: both must survive the restore.
    let alice = &clients[0];
    let crypto = vec![0x5a; 61];
    alice
        .change_channel(
            "vault",
            ChannelChange::Create {
                private: true,
                crypto: Some(crypto.clone()),
            },
        )
        .await?;
    alice
        .change_channel("vault", ChannelChange::Invite("user1".into()))
        .await?;
    clients[1]
        .change_channel("vault", ChannelChange::Accept)
        .await?;
    let vault_first = alice
        .send("vault", b"\x03ciphertext stands here".to_vec())
        .await?;

    let stop = Arc::new(AtomicBool::new(false));
    let ledger: Ledger = Arc::default();
    let senders = load(&clients, &stop, &ledger);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Everything acknowledged before the backup starts must be in it.
    let before = ledger.lock().unwrap().clone();
    ensure!(
        before.len() > 100,
        "the load acknowledged only {} messages",
        before.len()
    );
    // Outside the old cluster's directory: the old cluster is gone before the new one starts.
    let files = tempfile::tempdir()?;
    let file = files.path().join("under-load.ccb");
    let file_arg = file.to_str().context("utf-8 path")?.to_owned();
    let backup = {
        let args = ["backup", "--out", file_arg.as_str(), "--json"].map(str::to_owned);
        let cluster_args = (
            old.cluster.clone(),
            old.discovery_port,
            old.dir().to_path_buf(),
        );
        tokio::task::spawn_blocking(move || admin_at(&cluster_args, &args)).await??
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for sender in senders {
        sender.await?;
    }
    let report: serde_json::Value = serde_json::from_str(run_ok(backup, "backup")?.trim())?;
    let manifest = &report["manifest"];
    ensure!(manifest["cluster"] == old.cluster.as_str(), "{report}");
    ensure!(
        manifest["secrets"]
            .as_str()
            .unwrap_or("")
            .starts_with("none"),
        "{report}"
    );
    let messages = manifest["contents"]["messages"]
        .as_u64()
        .context("message count")?;
    // The load's messages, the greetings and the first one in the vault.
    ensure!(
        messages >= (before.len() + USERS + 1) as u64,
        "{messages} messages in {report}"
    );
    ensure!(!node::backup::partial_path(&file).exists());
    run_ok(server(&["verify", &file_arg], &old)?, "verify")?;

    // The whole history of the old cluster, after the load stopped.
    let mut old_history = BTreeMap::new();
    for channel in ["lobby", "load-0", "load-1", "load-2", "load-3", "vault"] {
        old_history.insert(
            channel,
            all_messages(alice_or_member(&clients, channel), channel).await?,
        );
    }

    // One test cluster runs at a time: the old one stops before the new one starts.
    let old_token = old.token()?;
    let old_cluster = old.cluster.clone();
    drop(clients);
    drop(old);

    // A new cluster from the file: same name (end-to-end encryption is bound to it), new
    // discovery port, new CA.
    let mut new = TestCluster::new("restored", &NO_LIMITS)?;
    new.cluster = old_cluster;
    let target = new.dir().join("node-1");
    let target_arg = target.to_str().context("utf-8 path")?.to_owned();
    let restored = run_ok(
        server(
            &["restore", &file_arg, "--data-dir", &target_arg, "--json"],
            &new,
        )?,
        "restore",
    )?;
    let restored: serde_json::Value = serde_json::from_str(restored.trim())?;
    let token = restored["token"].as_str().context("token")?.to_owned();
    ensure!(token != old_token, "a restore makes a new cluster identity");
    start(&mut new, 3).await?;

    let reader = Client::connect(config(&new, "user0", Some(&token))?).await?;
    let member = Client::connect(config(&new, "user1", Some(&token))?).await?;
    let mut heads = BTreeMap::new();
    for (channel, old_messages) in &old_history {
        let client = if *channel == "vault" {
            &reader
        } else {
            &member
        };
        let restored = all_messages(client, channel).await?;
        // The restored channel is exactly a prefix of the old one: same seqs, senders, bodies
        // (byte for byte) and timestamps.
        let head = restored.keys().next_back().copied().unwrap_or(0);
        ensure!(
            restored.len() as u64 == head,
            "{channel}: seqs are not dense 1..={head}"
        );
        heads.insert(*channel, head);
        for (seq, message) in &restored {
            ensure!(
                old_messages.get(seq) == Some(message),
                "{channel}/{seq} differs"
            );
        }
        // Every message acknowledged before the backup started is there.
        for ((c, seq), acked) in before.iter().filter(|((c, _), _)| c == channel) {
            let Some((sender, body, _)) = restored.get(seq) else {
                bail!("{c}/{seq}, acknowledged before the backup, is missing");
            };
            ensure!(
                sender == &acked.sender && body == &acked.body,
                "{c}/{seq} differs"
            );
        }
    }
    ensure!(old_history["vault"].contains_key(&vault_first.seq));

    // Users, channel records and dedup state came along: the private channel stays private
    // with its crypto record, a name stays bound to its key, and a retry of a send acknowledged
    // before the backup is answered with its original seq.
    let info = reader.channel_info("vault").await?;
    ensure!(
        info.info.private && info.crypto.as_deref() == Some(&crypto[..]),
        "{info:?}"
    );
    let stranger = Client::connect(config(&new, "user5", Some(&token))?).await?;
    let refused = stranger.history("vault", None, 10).await;
    ensure!(
        matches!(
            refused,
            Err(Error::Api(ApiError::Rejected(RejectReason::NotMember)))
        ),
        "{refused:?}"
    );
    let impostor = ClientConfig {
        identity: Some(Identity::ephemeral("user2", Some([1; 32]))),
        token: Some(token.parse()?),
        ..ClientConfig::new(new.cluster.clone(), new.discovery_port)
    };
    let taken = Client::connect(impostor).await;
    ensure!(
        taken.is_err(),
        "a name registered in the backup was taken with another key"
    );
    let ((channel, seq), acked) = before
        .iter()
        .find(|(_, a)| a.sender == "user1")
        .context("user1 sent something")?;
    let retry = member
        .send_with_key(
            channel,
            acked.body.clone(),
            acked.client_id,
            acked.client_seq,
        )
        .await?;
    ensure!(retry.duplicate && retry.seq == *seq, "{retry:?}");
    // The restored cluster takes writes and its joiners caught up by snapshot.
    let next = member.send("load-0", b"after the restore".to_vec()).await?;
    ensure!(
        next.seq == heads["load-0"] + 1,
        "{next:?} after head {}",
        heads["load-0"]
    );
    Ok(())
}

fn alice_or_member<'a>(clients: &'a [Arc<Client>], channel: &str) -> &'a Client {
    if channel == "vault" {
        &clients[1]
    } else {
        &clients[2]
    }
}

/// `server ARGS` against the cluster (name, discovery port, data root), from any thread.
fn admin_at(
    (cluster, port, root): &(String, u16, PathBuf),
    args: &[String],
) -> anyhow::Result<std::process::Output> {
    Command::new(testkit::server_binary()?)
        .args(args)
        .args(["--cluster", cluster])
        .arg("--data-root")
        .arg(root)
        .args(["--discovery-port", &port.to_string()])
        .stdin(Stdio::null())
        .output()
        .context("running a server subcommand")
}

/// Fills a channel with about `bytes` of messages.
async fn fill(client: &Client, bytes: usize) -> anyhow::Result<()> {
    let body = vec![b'x'; 4000];
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (client, body) = (client.clone(), body.clone());
        let count = bytes / body.len() / 16 + 1;
        tasks.push(tokio::spawn(async move {
            for _ in 0..count {
                client.send("bulk", body.clone()).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

fn spawn_backup(
    cluster: &TestCluster,
    out: &Path,
    extra: &[&str],
) -> anyhow::Result<std::process::Child> {
    Command::new(testkit::server_binary()?)
        .arg("backup")
        .arg("--out")
        .arg(out)
        .args(extra)
        .args(cluster.admin_flags())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting a backup")
}

/// The index in the local cluster of the node with `name`.
fn index_named(cluster: &TestCluster, name: &str) -> Option<usize> {
    cluster.nodes.iter().position(|n| {
        n.data_dir().file_name().and_then(|f| f.to_str()) == Some(&format!("node-{}", &name[1..]))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_backup_leaves_no_file_and_a_killed_node_does_not_stop_one() -> anyhow::Result<()>
{
    let mut cluster = TestCluster::new("backup-kill", &NO_LIMITS)?;
    start(&mut cluster, 3).await?;
    let client = Client::connect(config(&cluster, "filler", None)?).await?;
    fill(&client, 3 << 20).await?;

    // kill -9 of the backup process half way: no file under the name asked for, and what it
    // left is refused by verify.
    let out = cluster.dir().join("killed.ccb");
    let mut backup = spawn_backup(&cluster, &out, &["--rate-kib", "512"])?;
    let partial = node::backup::partial_path(&out);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !partial.exists() {
        ensure!(
            std::time::Instant::now() < deadline,
            "the backup never started writing"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    backup.kill()?;
    backup.wait()?;
    ensure!(!out.exists(), "a killed backup left {}", out.display());
    let partial_arg = partial.to_str().context("utf-8")?;
    let verify = server(&["verify", partial_arg], &cluster)?;
    ensure!(
        !verify.status.success(),
        "verify accepted a killed backup's partial file"
    );

    // kill -9 of the leader while a (throttled) backup copies from a follower: it completes.
    let out = cluster.dir().join("leader-killed.ccb");
    let backup = spawn_backup(&cluster, &out, &["--rate-kib", "1024", "--json"])?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let leader = cluster_leader(&mut cluster).await?;
    cluster.nodes[leader].kill9();
    let output = tokio::task::spawn_blocking(move || backup.wait_with_output()).await??;
    let report: serde_json::Value =
        serde_json::from_str(run_ok(output, "backup with the leader killed")?.trim())?;
    ensure!(
        report["manifest"]["contents"]["messages"].as_u64() > Some(700),
        "{report}"
    );
    run_ok(
        server(&["verify", out.to_str().context("utf-8")?], &cluster)?,
        "verify",
    )?;
    cluster.restart(leader, READY)?;
    cluster.wait_converged(3, CONVERGE).await?;

    // kill -9 of the node cutting the backup: the tool starts over on another node.
    let out = cluster.dir().join("source-killed.ccb");
    let mut backup = spawn_backup(&cluster, &out, &["--rate-kib", "1024", "--json"])?;
    let stderr = lines_of(backup.stderr.take().context("stderr")?);
    let cut_deadline = std::time::Instant::now() + Duration::from_secs(60);
    let cutting = loop {
        let said = stderr.lock().unwrap().iter().find_map(|l| cut_by(l));
        if let Some(name) = said {
            break name;
        }
        ensure!(
            std::time::Instant::now() < cut_deadline,
            "the backup never cut"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let index = index_named(&cluster, &cutting).with_context(|| format!("no node {cutting}"))?;
    cluster.nodes[index].kill9();
    let output = tokio::task::spawn_blocking(move || backup.wait_with_output()).await??;
    let report: serde_json::Value =
        serde_json::from_str(run_ok(output, "backup with its node killed")?.trim())?;
    let stderr = stderr.lock().unwrap().join("\n");
    ensure!(stderr.contains("attempt 1 of"), "{stderr}");
    ensure!(
        report["manifest"]["source_node"][1] != cutting.as_str(),
        "{report}"
    );
    run_ok(
        server(&["verify", out.to_str().context("utf-8")?], &cluster)?,
        "verify",
    )?;
    Ok(())
}

/// The lines `from` writes, collected by a thread as they come.
fn lines_of(from: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(from).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

/// The node a backup tool's progress line names as cutting (`node NAME cut the state ...`).
fn cut_by(line: &str) -> Option<String> {
    let rest = line.strip_prefix("node ")?;
    let (name, tail) = rest.split_once(' ')?;
    tail.starts_with("cut the state").then(|| name.to_owned())
}

async fn cluster_leader(cluster: &mut TestCluster) -> anyhow::Result<usize> {
    testkit::leader_index(cluster, Duration::from_secs(10)).await
}
