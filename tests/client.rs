//! End-to-end tests of the client library and CLI (issue 4): real `server` processes on
//! loopback through `testkit`, each test with its own cluster name and discovery port, talked to
//! through `cellchat_client::Client` or the `client` binary.
//!
//! What each test checks is in its name. Timeouts are generous bounds for a loaded 2-core
//! machine, not performance claims; timing goals live in benchmarks.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use cellchat_client::crypto::{self, Author, ChannelHistory, Content, CryptoError, Keys};
use cellchat_client::{Client, ClientConfig, ClientEvent, Error, Identity, WireMessage};
use proto::HistoryRequest;
use testkit::{TestClient, TestCluster};

const READY: Duration = Duration::from_secs(30);
const CONVERGE: Duration = Duration::from_secs(30);
const RECEIVE: Duration = Duration::from_secs(60);

/// A converged three-node cluster with `extra` server flags.
async fn three_nodes(name: &str, extra: &[&str]) -> anyhow::Result<TestCluster> {
    let mut cluster = TestCluster::new(name, extra)?;
    for _ in 0..3 {
        cluster.spawn_node()?;
    }
    for node in &mut cluster.nodes {
        node.wait_ready(READY)?;
    }
    cluster.wait_converged(3, CONVERGE).await?;
    Ok(cluster)
}

fn config(cluster: &TestCluster, identity: Option<Identity>) -> ClientConfig {
    ClientConfig {
        identity,
        ..ClientConfig::new(cluster.cluster.clone(), cluster.discovery_port)
    }
}

async fn client_as(cluster: &TestCluster, name: &str) -> anyhow::Result<Client> {
    let identity = Identity::ephemeral(name, None);
    Ok(Client::connect(config(cluster, Some(identity))).await?)
}

/// Receives `count` messages or fails after `timeout`.
async fn receive(
    sub: &mut cellchat_client::Subscription,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<WireMessage>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut got = Vec::new();
    while got.len() < count {
        match tokio::time::timeout_at(deadline, sub.recv()).await {
            Ok(Some(Ok(message))) => got.push(message),
            Ok(Some(Err(e))) => bail!("subscription failed after {} messages: {e}", got.len()),
            Ok(None) => bail!("subscription ended after {} messages", got.len()),
            Err(_) => bail!("only {} of {count} messages within {timeout:?}", got.len()),
        }
    }
    Ok(got)
}

fn assert_dense(messages: &[WireMessage], first: u64) {
    let seqs: Vec<u64> = messages.iter().map(|m| m.seq).collect();
    let want: Vec<u64> = (first..first + messages.len() as u64).collect();
    assert_eq!(
        seqs, want,
        "seqs must be dense, in order, without duplicates"
    );
}

/// The text of a plaintext message (its signature is not checked here).
fn text_of(message: &WireMessage) -> String {
    crypto::open_message(
        &Keys::default(),
        "",
        &message.channel,
        &message.sender,
        message.client_seq,
        None,
        &message.body,
    )
    .content()
    .display()
    .into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_is_seen_by_another_clients_subscription_with_dense_seqs() -> anyhow::Result<()> {
    let cluster = three_nodes("cl-basic", &[]).await?;
    let alice = client_as(&cluster, "alice").await?;
    let bob = client_as(&cluster, "bob").await?;

    let first = alice.send_text("general", "Hello world!", None).await?;
    assert_eq!(first.seq, 1);
    // Read-your-writes: the sender's own history includes it at once, wherever it reads.
    let page = alice.history("general", None, 10).await?;
    assert_eq!(page.messages.len(), 1);

    let mut sub = bob.subscribe("general", 0);
    for i in 2..=5 {
        alice
            .send_text("general", &format!("line {i}"), None)
            .await?;
    }
    let got = receive(&mut sub, 5, RECEIVE).await?;
    assert_dense(&got, 1);
    assert_eq!(text_of(&got[0]), "Hello world!");
    assert_eq!(
        got[0].sender, "alice",
        "the server stamps the logged-in name"
    );
    assert_eq!(text_of(&got[4]), "line 5");

    let servers = bob.servers().await;
    assert_eq!(servers.len(), 3, "{servers:?}");
    assert_eq!(servers.iter().filter(|s| s.reading).count(), 1);
    assert_eq!(servers.iter().filter(|s| s.leader).count(), 1);
    let channels = bob.channels().await?;
    assert!(channels.iter().any(|c| c.name == "general" && c.head == 5));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_the_subscribers_node_moves_it_without_gap_or_duplicate() -> anyhow::Result<()> {
    let mut cluster = three_nodes("cl-failover", &[]).await?;
    let alice = client_as(&cluster, "alice").await?;
    let bob = client_as(&cluster, "bob").await?;
    let mut sub = bob.subscribe("general", 0);

    const TOTAL: usize = 60;
    let sender = {
        let alice = alice.clone();
        tokio::spawn(async move {
            let mut sent = Vec::new();
            for i in 0..TOTAL {
                let text = format!("message {i}");
                let reply = alice.send_text("general", &text, None).await?;
                sent.push((reply.seq, text));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            anyhow::Ok(sent)
        })
    };

    let mut got = receive(&mut sub, 15, RECEIVE).await?;
    let victim = bob.status().reading.context("bob reads from some node")?;
    let index = node_index(&cluster, victim)?;
    cluster.nodes[index].kill9();
    let killed_at = Instant::now();

    got.extend(receive(&mut sub, TOTAL - 15, RECEIVE).await?);
    let sent = sender.await??;
    assert_dense(&got, 1);
    let received: Vec<(u64, String)> = got.iter().map(|m| (m.seq, text_of(m))).collect();
    assert_eq!(
        received, sent,
        "every acknowledged message exactly once, in seq order"
    );
    let now_reading = bob.status().reading;
    assert_ne!(now_reading, Some(victim), "bob moved off the killed node");
    // Nothing more arrives: no duplicate after the last message.
    let extra = tokio::time::timeout(Duration::from_millis(500), sub.recv()).await;
    assert!(extra.is_err(), "unexpected extra delivery: {extra:?}");
    eprintln!(
        "moved off node {victim}; all {TOTAL} delivered {:?} after the kill",
        killed_at.elapsed()
    );
    Ok(())
}

/// The node's `cellchat_connected_clients` gauge, read over its metrics HTTP endpoint.
async fn connected_clients(metrics: std::net::SocketAddr) -> anyhow::Result<u64> {
    let text = testkit::scrape_metrics(metrics).await?;
    let value = testkit::metric_value(&text, "cellchat_connected_clients")
        .with_context(|| format!("no connected_clients gauge in:\n{text}"))?;
    Ok(value as u64)
}

/// Client connections open on all nodes of `cluster`.
async fn connections(cluster: &TestCluster) -> anyhow::Result<u64> {
    let mut total = 0;
    for node in &cluster.nodes {
        total += connected_clients(node.ready().context("ready")?.metrics).await?;
    }
    Ok(total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_subscribed_client_holds_one_connection_and_sees_every_nodes_rtt(
) -> anyhow::Result<()> {
    let cluster = three_nodes("cl-conns", &[]).await?;
    assert_eq!(connections(&cluster).await?, 0, "nothing connected yet");
    let alice = Client::connect(ClientConfig {
        writer_idle: Duration::from_millis(500),
        probe_interval: Duration::from_millis(200),
        ..config(&cluster, Some(Identity::ephemeral("alice", None)))
    })
    .await?;
    let bob = Client::connect(ClientConfig {
        writer_idle: Duration::from_millis(500),
        probe_interval: Duration::from_millis(200),
        ..config(&cluster, Some(Identity::ephemeral("bob", None)))
    })
    .await?;
    let mut alices = alice.subscribe("general", 0);
    let mut bobs = bob.subscribe("general", 0);
    let sent = alice.send_text("general", "anyone?", None).await?;
    assert_eq!(receive(&mut alices, 1, RECEIVE).await?[0].seq, sent.seq);
    assert_eq!(receive(&mut bobs, 1, RECEIVE).await?[0].seq, sent.seq);

    // Each client keeps only the push connection its subscription streams on: Alice's write
    // connection and any RPC connection to a reader close after 500 ms without use.
    settle_at_one_connection_each(&cluster, 2).await?;
    for client in [&alice, &bob] {
        // `/servers` asks the reader for the membership over RPC (that connection idles out
        // again); RTT, role and applied of every node come from UDP pings.
        let servers = client.servers().await;
        assert_eq!(servers.len(), 3, "{servers:?}");
        for server in &servers {
            assert!(server.rtt_ms.is_some(), "no RTT for {server:?}");
            assert!(!server.down, "{server:?}");
            assert!(server.applied >= sent.read_token, "{server:?}");
        }
        assert_eq!(servers.iter().filter(|s| s.role == "leader").count(), 1);
    }
    settle_at_one_connection_each(&cluster, 2).await?;
    Ok(())
}

/// Waits until the cluster's nodes hold `clients` client connections in all.
async fn settle_at_one_connection_each(cluster: &TestCluster, clients: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + CONVERGE;
    let mut open = connections(cluster).await?;
    while open != clients {
        if Instant::now() > deadline {
            bail!("{open} client connections, not {clients} (one per idle client)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        open = connections(cluster).await?;
    }
    Ok(())
}

/// Every file under `dir` that contains `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> anyhow::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    found.push(path);
                }
            }
        }
    }
    Ok(found)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_messages_plaintext_is_in_no_nodes_data_dir() -> anyhow::Result<()> {
    let cluster = three_nodes("cl-e2ee", &[]).await?;
    let alice = client_as(&cluster, "alice").await?;
    let marker: u64 = rand::random();
    let secret = format!("zebra-secret-{marker:016x}");
    let visible = format!("plain-control-{marker:016x}");

    let unlocked = alice.unlock_channel("vault", "correct horse").await?;
    assert!(
        unlocked.created,
        "the first passphrase sets the channel's record"
    );
    let key = unlocked.keys.v2.clone().context("a v2 key")?;
    let sealed = alice.send_text("vault", &secret, Some(&key)).await?;
    // A plaintext control message proves the grep below sees what nodes store.
    let plain = alice.send_text("vault", &visible, None).await?;

    // Wait until every node has applied both messages.
    let auditor = testkit::TestUser::new("auditor");
    for node in &cluster.nodes {
        let ready = *node.ready().context("ready")?;
        let nodes = cluster.client_addrs();
        let conn =
            TestClient::login_anywhere(ready.client, &nodes, &cluster.cluster, &auditor, CONVERGE)
                .await?;
        let mut ctx = tarpc::context::current();
        ctx.deadline = Instant::now() + Duration::from_secs(20);
        let page = conn
            .client
            .history(
                ctx,
                HistoryRequest {
                    channel: "vault".into(),
                    before_seq: None,
                    from_seq: Some(1),
                    limit: 10,
                    read_token: plain.read_token,
                },
            )
            .await??;
        assert_eq!(page.messages.len(), 2, "node {} has both", ready.id);
    }

    for node in &cluster.nodes {
        let dir = node.data_dir();
        let leaked = files_containing(dir, secret.as_bytes())?;
        assert!(leaked.is_empty(), "plaintext found in {leaked:?}");
        let control = files_containing(dir, visible.as_bytes())?;
        assert!(
            !control.is_empty(),
            "control text not found under {}",
            dir.display()
        );
    }

    // With the passphrase a reader decrypts and verifies who wrote it; without it the
    // message shows as encrypted, never as garbage; a wrong passphrase is reported as wrong.
    let bob = client_as(&cluster, "bob").await?;
    let page = bob.history("vault", None, 10).await?;
    let m = page
        .messages
        .iter()
        .find(|m| m.seq == sealed.seq)
        .context("sealed message")?;
    let wrong = bob.unlock_channel("vault", "wrong horse").await;
    assert!(
        matches!(wrong, Err(Error::Crypto(CryptoError::WrongPassphrase))),
        "{wrong:?}"
    );
    let bob_keys = bob.unlock_channel("vault", "correct horse").await?;
    assert!(!bob_keys.created);
    let shown = bob.show(&bob_keys.keys, ChannelHistory::Encrypted, m).await;
    assert_eq!(shown.opened.content(), &Content::Clear(secret.clone()));
    assert_eq!(shown.opened.author(), Author::Verified);
    assert!(shown.is_trusted());
    let blind = bob
        .show(&Keys::default(), ChannelHistory::Encrypted, m)
        .await;
    assert_eq!(blind.display(), "[encrypted]");
    // The plaintext control line is marked as such in an encrypted channel.
    let control = page
        .messages
        .iter()
        .find(|m| m.seq == plain.seq)
        .context("control")?;
    let shown = bob
        .show(&bob_keys.keys, ChannelHistory::Encrypted, control)
        .await;
    assert_eq!(shown.display(), format!("[plaintext] {visible}"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_key_for_a_taken_name_is_refused_with_a_clear_error() -> anyhow::Result<()> {
    let cluster = three_nodes("cl-names", &[]).await?;
    let home = tempfile::tempdir()?;
    let laptop = tempfile::tempdir()?;
    let owner = ClientConfig {
        name: Some("dave".into()),
        config_dir: Some(home.path().to_path_buf()),
        ..config(&cluster, None)
    };
    let dave = Client::connect(owner.clone()).await?;
    dave.send_text("general", "I am dave", None).await?;
    drop(dave);

    let impostor = ClientConfig {
        config_dir: Some(laptop.path().to_path_buf()),
        ..owner.clone()
    };
    let err = match Client::connect(impostor).await {
        Ok(_) => bail!("a second key for dave was accepted"),
        Err(e) => e,
    };
    assert!(matches!(err, Error::NameTaken { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("name dave is registered with another key"),
        "{text}"
    );
    assert!(text.contains("copy"), "{text}");

    // The owner's key file still works, also after a restart of the client.
    let again = Client::connect(owner).await?;
    again.send_text("general", "still dave", None).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flooding_past_the_rate_limit_backs_off_and_every_message_lands_once() -> anyhow::Result<()>
{
    let cluster = three_nodes("cl-flood", &["--user-rate", "5", "--user-burst", "5"]).await?;
    let alice = client_as(&cluster, "alice").await?;
    let mut events = alice.events();

    const TOTAL: usize = 20;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..TOTAL {
        let alice = alice.clone();
        tasks.spawn(async move { alice.send_text("flood", &format!("flood {i}"), None).await });
    }
    let mut seqs = BTreeSet::new();
    while let Some(joined) = tasks.join_next().await {
        let reply = joined??;
        assert!(
            !reply.duplicate,
            "first answers are never duplicates: {reply:?}"
        );
        assert!(
            seqs.insert(reply.seq),
            "seq {} acknowledged twice",
            reply.seq
        );
    }
    assert_eq!(seqs, (1..=TOTAL as u64).collect::<BTreeSet<u64>>());

    let mut rate_limited = 0;
    while let Ok(event) = events.try_recv() {
        if matches!(event, ClientEvent::RateLimited { retry_after_ms } if retry_after_ms > 0) {
            rate_limited += 1;
        }
    }
    assert!(rate_limited > 0, "20 sends at 5/s must hit the limit");

    let page = alice.history("flood", None, 100).await?;
    assert_dense(&page.messages, 1);
    let mut texts: Vec<String> = page.messages.iter().map(text_of).collect();
    texts.sort();
    let mut want: Vec<String> = (0..TOTAL).map(|i| format!("flood {i}")).collect();
    want.sort();
    assert_eq!(texts, want, "each message stored exactly once");
    Ok(())
}

fn cli(
    cluster: &TestCluster,
    config_dir: &Path,
    args: &[&str],
) -> anyhow::Result<std::process::Output> {
    Command::new(testkit::client_binary()?)
        .args(["--cluster", &cluster.cluster])
        .args(["--discovery-port", &cluster.discovery_port.to_string()])
        .arg("--config-dir")
        .arg(config_dir)
        .args(args)
        .env_remove("CELLCHAT_JOIN")
        .output()
        .context("running the client binary")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scriptable_modes_send_history_and_servers_as_json() -> anyhow::Result<()> {
    let cluster = three_nodes("cl-cli", &[]).await?;
    let dir = tempfile::tempdir()?;
    let sent = cli(
        &cluster,
        dir.path(),
        &["alice", "--send", "Hello from the CLI"],
    )?;
    assert!(
        sent.status.success(),
        "send failed: {}",
        String::from_utf8_lossy(&sent.stderr)
    );

    let history = cli(&cluster, dir.path(), &["bob", "--history", "5", "--json"])?;
    assert!(
        history.status.success(),
        "{}",
        String::from_utf8_lossy(&history.stderr)
    );
    let stdout = String::from_utf8(history.stdout)?;
    let line: serde_json::Value = serde_json::from_str(stdout.lines().next().context("a line")?)?;
    assert_eq!(line["channel"], "general");
    assert_eq!(line["seq"], 1);
    assert_eq!(line["sender"], "alice");
    assert_eq!(line["text"], "Hello from the CLI");
    assert!(line["at_ms"].as_u64().is_some());
    assert_eq!(
        line["verified"], true,
        "signed by alice, pinned by bob: {line}"
    );
    assert_eq!(line["markers"], serde_json::json!([]));

    // Deep history: the page before a seq.
    for text in ["two", "three", "four"] {
        let sent = cli(&cluster, dir.path(), &["alice", "--send", text])?;
        assert!(
            sent.status.success(),
            "{}",
            String::from_utf8_lossy(&sent.stderr)
        );
    }
    let args = ["bob", "--history", "2", "--before", "4", "--json"];
    let page = cli(&cluster, dir.path(), &args)?;
    assert!(
        page.status.success(),
        "{}",
        String::from_utf8_lossy(&page.stderr)
    );
    let texts: Vec<String> = String::from_utf8(page.stdout)?
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).map(|v| v["text"].to_string()))
        .collect::<Result<_, _>>()?;
    assert_eq!(texts, ["\"two\"", "\"three\""]);

    let servers = cli(&cluster, dir.path(), &["--servers", "--json"])?;
    assert!(
        servers.status.success(),
        "{}",
        String::from_utf8_lossy(&servers.stderr)
    );
    let nodes: serde_json::Value = serde_json::from_slice(&servers.stdout)?;
    let nodes = nodes.as_array().context("one JSON array")?;
    assert_eq!(nodes.len(), 3);
    assert_eq!(nodes.iter().filter(|n| n["reading"] == true).count(), 1);
    for node in nodes {
        for field in ["id", "role", "client_addr", "rtt_ms", "applied", "reading"] {
            assert!(node.get(field).is_some(), "{field} missing in {node}");
        }
        // Test clusters name their nodes n1, n2, n3 by default.
        let name = node["name"].as_str().context("a name")?;
        assert!(["n1", "n2", "n3"].contains(&name), "{node}");
    }

    // A thread, a read marker and the channel list, as JSON lines.
    let args = ["bob", "--send", "a reply", "--reply", "1"];
    let reply = cli(&cluster, dir.path(), &args)?;
    assert!(
        reply.status.success(),
        "{}",
        String::from_utf8_lossy(&reply.stderr)
    );
    // Each run is a new client reading from the nearest node, which may not have applied
    // the previous run's write yet: read until it has, within RECEIVE.
    let json_lines = |args: &[&str]| -> anyhow::Result<Vec<serde_json::Value>> {
        let run = cli(&cluster, dir.path(), args)?;
        ensure_ok(&run)?;
        Ok(String::from_utf8(run.stdout)?
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?)
    };
    let deadline = Instant::now() + RECEIVE;
    let lines = loop {
        let lines = json_lines(&["bob", "--thread", "1", "--json"])?;
        if lines.len() == 2 || Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(
        (lines[0]["seq"].as_u64(), lines[0]["replies"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(lines[1]["text"], "a reply");
    let marked = cli(&cluster, dir.path(), &["bob", "--mark-read", "3", "--json"])?;
    assert!(
        marked.status.success(),
        "{}",
        String::from_utf8_lossy(&marked.stderr)
    );
    let marked: serde_json::Value = serde_json::from_slice(&marked.stdout)?;
    assert_eq!(marked["read_to"], 3, "{marked}");
    let past = cli(&cluster, dir.path(), &["bob", "--mark-read", "99"])?;
    assert_eq!(
        past.status.code(),
        Some(1),
        "a mark past the head is refused"
    );
    let deadline = Instant::now() + RECEIVE;
    let general = loop {
        let general = json_lines(&["bob", "--channels", "--json"])?
            .into_iter()
            .find(|c| c["channel"] == "general")
            .context("#general listed")?;
        if general["read_to"] == 3 || Instant::now() > deadline {
            break general;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (general["head"].as_u64(), general["read_to"].as_u64()),
        (Some(5), Some(3))
    );

    let empty = cli(&cluster, dir.path(), &["alice", "--send", ""])?;
    assert!(!empty.status.success(), "an empty message must not be sent");

    let nowhere = Command::new(testkit::client_binary()?)
        .args([
            "--cluster",
            "nobody-here",
            "--discovery-port",
            "9",
            "--config-dir",
        ])
        .arg(dir.path())
        .args(["alice", "--send", "x"])
        .output()?;
    assert!(!nowhere.status.success());
    let err = String::from_utf8_lossy(&nowhere.stderr);
    assert!(
        err.contains("127.255.255.255:9") && err.contains("--join"),
        "{err}"
    );
    Ok(())
}

/// Fails with the client's stderr when `run` did not exit 0.
fn ensure_ok(run: &std::process::Output) -> anyhow::Result<()> {
    if !run.status.success() {
        bail!(
            "the client failed: {}",
            String::from_utf8_lossy(&run.stderr)
        );
    }
    Ok(())
}

/// A private tmux server (its own socket), killed when dropped. Needs `tmux` installed.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new() -> Tmux {
        Tmux {
            socket: format!("cellchat-test-{:08x}", rand::random::<u32>()),
        }
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .env("TERM", "xterm-256color")
            .output()
            .context("running tmux (install it: apt-get install -y tmux)")?;
        if !out.status.success() {
            bail!("tmux {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Sends `text` as keys in one burst, as a paste or a fast typist does.
    fn type_burst(&self, session: &str, text: &str) -> anyhow::Result<()> {
        self.run(&["send-keys", "-t", session, "-l", text])
            .map(drop)
    }

    /// Starts `name`'s full-screen client in a session of its name, `size` cells wide and
    /// high, with its config in `dir` and its log in `dir/NAME.log`.
    fn start_full_screen(
        &self,
        cluster: &TestCluster,
        dir: &Path,
        name: &str,
        (width, height): (u16, u16),
    ) -> anyhow::Result<()> {
        let command = format!(
            "{} --cluster {} --discovery-port {} --config-dir {} --log-file {} {name}",
            testkit::client_binary()?.display(),
            cluster.cluster,
            cluster.discovery_port,
            dir.display(),
            dir.join(format!("{name}.log")).display(),
        );
        let (width, height) = (width.to_string(), height.to_string());
        self.run(&[
            "new-session",
            "-d",
            "-s",
            name,
            "-x",
            &width,
            "-y",
            &height,
            &command,
        ])
        .map(drop)
    }

    /// Starts `name`'s line mode (`--plain`) in session `session`, 150x40, with its config in
    /// `dir`.
    fn start_line_mode(
        &self,
        cluster: &TestCluster,
        dir: &Path,
        session: &str,
        name: &str,
    ) -> anyhow::Result<()> {
        let command = format!(
            "{} --plain --cluster {} --discovery-port {} --config-dir {} {name}",
            testkit::client_binary()?.display(),
            cluster.cluster,
            cluster.discovery_port,
            dir.display()
        );
        let args = [
            "new-session",
            "-d",
            "-s",
            session,
            "-x",
            "150",
            "-y",
            "40",
            &command,
        ];
        self.run(&args).map(drop)
    }

    fn screen(&self, session: &str) -> anyhow::Result<String> {
        self.run(&["capture-pane", "-p", "-t", session])
    }

    /// Waits until `session`'s screen satisfies `check`; returns the screen.
    async fn wait_for(
        &self,
        session: &str,
        what: &str,
        check: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + RECEIVE;
        loop {
            let screen = self.screen(session)?;
            if check(&screen) {
                return Ok(screen);
            }
            if Instant::now() > deadline {
                bail!("{session}'s screen never showed {what}:\n{screen}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        // Ends the panes' client processes with it; it may be gone already.
        let _ = self.run(&["kill-server"]);
    }
}

/// `[now] #3 Alice: Hello world!` or `[3s ago] #3 Alice: Hello world!` on some line.
fn shows_message_from(screen: &str, sender: &str, text: &str) -> bool {
    screen.lines().any(|line| {
        let Some(rest) = line.trim_start().strip_prefix('[') else {
            return false;
        };
        let Some((when, said)) = rest.split_once("] ") else {
            return false;
        };
        let relative = when == "now"
            || when
                .strip_suffix("s ago")
                .is_some_and(|n| n.parse::<u32>().is_ok());
        let said = said
            .strip_prefix('#')
            .and_then(|rest| rest.split_once(' '))
            .filter(|(seq, _)| seq.parse::<u64>().is_ok())
            .map_or(said, |(_, said)| said);
        relative && said == format!("{sender}: {text}")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn line_mode_clients_in_tmux_see_each_other_and_keep_half_typed_input() -> anyhow::Result<()>
{
    let cluster = three_nodes("cl-tmux", &[]).await?;
    let dir = tempfile::tempdir()?;
    let tmux = Tmux::new();
    for name in ["Alice", "Bob"] {
        tmux.start_line_mode(&cluster, dir.path(), name, name)?;
    }
    for name in ["Alice", "Bob"] {
        tmux.wait_for(name, "the prompt", |s| s.contains("#general @n"))
            .await?;
    }

    // Bob starts typing but does not press Enter.
    tmux.type_burst("Bob", "half-typed")?;
    // A burst shows whole at once.
    tmux.wait_for("Bob", "his input", |s| {
        s.lines().any(|l| l.trim_end().ends_with("> half-typed"))
    })
    .await?;
    tmux.type_burst("Alice", "Hello world!")?;
    tmux.run(&["send-keys", "-t", "Alice", "Enter"])?;

    // The incoming line prints above the input, and the input line, drawn again after it,
    // still holds what Bob typed. tmux can show the screen between the message's line and
    // the input's redraw (a CI run caught it there), so it is read until both are there.
    tmux.wait_for("Bob", "Alice's message above his half-typed input", |s| {
        let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
        let message_at = lines.iter().position(|l| l.contains("Alice: Hello world!"));
        let input_at = lines
            .iter()
            .rposition(|l| l.contains("#general") && l.trim_end().ends_with("half-typed"));
        shows_message_from(s, "Alice", "Hello world!")
            && matches!((message_at, input_at), (Some(m), Some(i)) if m < i)
    })
    .await?;

    // Bob finishes his line; Alice sees it.
    tmux.type_burst("Bob", " done")?;
    tmux.run(&["send-keys", "-t", "Bob", "Enter"])?;
    tmux.wait_for("Alice", "Bob's message", |s| {
        shows_message_from(s, "Bob", "half-typed done")
    })
    .await?;

    // Keys and Enter in one burst are sent at once; so is a bracketed paste ending in a line
    // break.
    tmux.run(&["send-keys", "-t", "Alice", "one burst", "Enter"])?;
    tmux.wait_for("Bob", "Alice's burst", |s| {
        shows_message_from(s, "Alice", "one burst")
    })
    .await?;
    tmux.run(&["set-buffer", "-b", "p", "pasted in line mode\n"])?;
    tmux.run(&["paste-buffer", "-p", "-b", "p", "-t", "Bob"])?;
    tmux.wait_for("Alice", "Bob's paste", |s| {
        shows_message_from(s, "Bob", "pasted in line mode")
    })
    .await?;

    // Bad input is refused with a message and sends nothing.
    tmux.type_burst("Alice", "/frobnicate")?;
    tmux.run(&["send-keys", "-t", "Alice", "Enter"])?;
    tmux.wait_for("Alice", "the unknown-command message", |s| {
        s.contains("unknown command /frobnicate")
    })
    .await?;
    tmux.type_burst("Alice", "/quit")?;
    tmux.run(&["send-keys", "-t", "Alice", "Enter"])?;
    Ok(())
}

/// The message row of the full-screen client showing `sender: text`, if any.
fn full_screen_row<'a>(screen: &'a str, sender: &str, text: &str) -> Option<&'a str> {
    let said = format!("{sender}: {text}");
    screen.lines().find(|line| line.trim_end().ends_with(&said))
}

/// The full-screen client's input line (the last row starting with the prompt).
fn input_row(screen: &str) -> &str {
    screen
        .lines()
        .rev()
        .find(|l| l.starts_with('>'))
        .unwrap_or("")
        .trim_end()
}

/// The full-screen client's status bar.
fn status_bar(screen: &str) -> &str {
    screen
        .lines()
        .rev()
        .find(|l| l.contains(" | read "))
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_full_screen_client_in_tmux_pastes_counts_unread_pages_back_and_survives_a_failover(
) -> anyhow::Result<()> {
    let mut cluster = three_nodes("cl-tui", &[]).await?;
    let dir = tempfile::tempdir()?;
    // 150 messages before anyone opens the channel: more than the 100 a client reads when it
    // opens one, so the first of them only come from the servers by paging back.
    let carol = client_as(&cluster, "Carol").await?;
    for i in 1..=150 {
        carol
            .send_text("general", &format!("early {i}"), None)
            .await?;
    }
    let tmux = Tmux::new();
    for name in ["Alice", "Bob"] {
        tmux.start_full_screen(&cluster, dir.path(), name, (120, 30))?;
    }
    for name in ["Alice", "Bob"] {
        tmux.wait_for(name, "the status bar and the newest message", |s| {
            status_bar(s).contains(&format!("{name} in #general"))
                && full_screen_row(s, "Carol", "early 150").is_some()
        })
        .await?;
    }

    // Keys sent in one burst show at once, and Enter sends at once.
    tmux.run(&["send-keys", "-t", "Bob", "-l", "abcdef"])?;
    tmux.wait_for("Bob", "the whole burst", |s| input_row(s) == "> abcdef")
        .await?;
    tmux.run(&["send-keys", "-t", "Bob", "C-u"])?;
    tmux.run(&["send-keys", "-t", "Bob", "hello from a burst", "Enter"])?;
    tmux.wait_for("Alice", "Bob's burst", |s| {
        full_screen_row(s, "Bob", "hello from a burst").is_some()
    })
    .await?;
    // A bracketed paste ending in a line break is sent as one message.
    tmux.run(&["set-buffer", "-b", "p", "a pasted line\n"])?;
    tmux.run(&["paste-buffer", "-p", "-b", "p", "-t", "Alice"])?;
    tmux.wait_for("Bob", "Alice's paste", |s| {
        full_screen_row(s, "Alice", "a pasted line").is_some()
    })
    .await?;

    // Bob opens #ops; what Alice says in #general counts as unread there, a mention rings.
    tmux.run(&["send-keys", "-t", "Bob", "/join #ops", "Enter"])?;
    tmux.wait_for("Bob", "#ops shown", |s| {
        status_bar(s).contains("Bob in #ops")
    })
    .await?;
    tmux.run(&["send-keys", "-t", "Alice", "in general", "Enter"])?;
    tmux.run(&["send-keys", "-t", "Alice", "look @Bob", "Enter"])?;
    tmux.wait_for("Bob", "2 unread, 1 mention", |s| {
        s.lines().any(|l| l.starts_with("#general (2, @1)"))
    })
    .await?;
    let bell = tmux.run(&["display-message", "-p", "-t", "Bob", "#{window_bell_flag}"])?;
    assert_eq!(bell.trim(), "1", "a mention rings the bell");
    tmux.run(&["send-keys", "-t", "Bob", "C-p"])?;
    let screen = tmux
        .wait_for("Bob", "#general opened and its count cleared", |s| {
            status_bar(s).contains("Bob in #general")
                && s.lines().any(|l| l.starts_with("#general "))
                && !s.contains("#general (")
        })
        .await?;
    let mention = full_screen_row(&screen, "Alice", "look @Bob").context("the mention")?;

    // The relative time of a line on screen changes while it stays there.
    let when = |row: &str| row.split("Alice:").next().unwrap_or("").trim().to_owned();
    let before = when(mention);
    let later = tmux
        .wait_for("Bob", "the mention's relative time to change", |s| {
            full_screen_row(s, "Alice", "look @Bob").is_some_and(|row| when(row) != before)
        })
        .await?;
    assert!(
        full_screen_row(&later, "Alice", "look @Bob").is_some_and(|r| r.contains("s ago")),
        "{later}"
    );

    // PgUp pages back past what was read at start, to the first message.
    let deadline = Instant::now() + RECEIVE;
    loop {
        tmux.run(&["send-keys", "-t", "Bob", "PPage"])?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let screen = tmux.screen("Bob")?;
        if full_screen_row(&screen, "Carol", "early 1").is_some() {
            assert!(screen.contains("-- the start of #general --"), "{screen}");
            break;
        }
        if Instant::now() > deadline {
            bail!("PgUp never reached the first message:\n{screen}");
        }
    }
    tmux.run(&["send-keys", "-t", "Bob", "End"])?;

    // Bob half-types a line; the node he reads from is killed; Alice's next line arrives and
    // his input is intact; the status bar names another node.
    tmux.run(&["send-keys", "-t", "Bob", "-l", "half-typed"])?;
    let screen = tmux
        .wait_for("Bob", "his input", |s| input_row(s) == "> half-typed")
        .await?;
    let reading = status_bar(&screen)
        .split(" | read ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .context("the node read from")?
        .to_owned();
    let servers = carol.servers().await;
    let id = servers
        .iter()
        .find(|s| s.name == reading)
        .with_context(|| format!("no node named {reading} in {servers:?}"))?
        .id;
    let index = node_index(&cluster, id)?;
    cluster.nodes[index].kill9();
    tmux.run(&["send-keys", "-t", "Alice", "after the kill", "Enter"])?;
    let screen = tmux
        .wait_for(
            "Bob",
            "the line after the kill, read from another node",
            |s| {
                full_screen_row(s, "Alice", "after the kill").is_some()
                    && !status_bar(s).contains(&format!(" | read {reading} "))
            },
        )
        .await?;
    assert_eq!(input_row(&screen), "> half-typed", "{screen}");
    tmux.run(&["send-keys", "-t", "Bob", " done", "Enter"])?;
    tmux.wait_for("Alice", "Bob's finished line", |s| {
        full_screen_row(s, "Bob", "half-typed done").is_some()
    })
    .await?;

    // Nothing was logged onto the screen; the log went to its file.
    assert!(dir.path().join("Bob.log").exists());

    // Ctrl-C clears the line; a second one quits.
    tmux.run(&["send-keys", "-t", "Bob", "-l", "junk"])?;
    tmux.wait_for("Bob", "junk typed", |s| input_row(s) == "> junk")
        .await?;
    tmux.run(&["send-keys", "-t", "Bob", "C-c"])?;
    tmux.wait_for("Bob", "the line cleared", |s| input_row(s) == ">")
        .await?;
    tmux.run(&["send-keys", "-t", "Bob", "C-c"])?;
    let deadline = Instant::now() + RECEIVE;
    while tmux.run(&["has-session", "-t", "Bob"]).is_ok() {
        if Instant::now() > deadline {
            bail!("a second Ctrl-C did not quit:\n{}", tmux.screen("Bob")?);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The input history was saved, privately.
    let saved = dir
        .path()
        .join("history")
        .join(&cluster.cluster)
        .join("Bob");
    let history =
        std::fs::read_to_string(&saved).with_context(|| format!("reading {}", saved.display()))?;
    assert!(history.contains("half-typed done"), "{history}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_full_screen_client_stays_responsive_through_a_resize_storm_a_16_kib_line_and_binary(
) -> anyhow::Result<()> {
    let cluster = three_nodes("cl-tui-bad", &[]).await?;
    let dir = tempfile::tempdir()?;
    let tmux = Tmux::new();
    tmux.start_full_screen(&cluster, dir.path(), "Alice", (100, 30))?;
    tmux.wait_for("Alice", "the status bar", |s| {
        status_bar(s).contains("Alice in #general")
    })
    .await?;
    let carol = client_as(&cluster, "Carol").await?;
    // A message of 16,000 bytes on one line, and one that tries to clear the screen.
    carol
        .send_text("general", &"y".repeat(16_000), None)
        .await?;
    carol
        .send_text("general", "\u{1b}[2J\u{7}cleared?", None)
        .await?;
    tmux.wait_for("Alice", "the escape shown harmless", |s| {
        full_screen_row(s, "Carol", "\u{fffd}[2J\u{fffd}cleared?").is_some()
    })
    .await?;
    // Pasted binary shows as U+FFFD in the input and is not sent.
    tmux.run(&["set-buffer", "-b", "bin", "ab\u{1}\u{2}cd"])?;
    tmux.run(&["paste-buffer", "-p", "-b", "bin", "-t", "Alice"])?;
    tmux.wait_for("Alice", "the pasted binary in the input", |s| {
        input_row(s) == "> ab\u{fffd}\u{fffd}cd"
    })
    .await?;

    // A resize storm, through sizes too small to draw.
    for i in 0..200u16 {
        let (x, y) = if i % 3 == 0 {
            (20, 4)
        } else {
            (60 + i % 90, 10 + i % 30)
        };
        tmux.run(&[
            "resize-window",
            "-t",
            "Alice",
            "-x",
            &x.to_string(),
            "-y",
            &y.to_string(),
        ])?;
    }
    tmux.run(&["resize-window", "-t", "Alice", "-x", "30", "-y", "5"])?;
    tmux.wait_for("Alice", "the too-small notice", |s| {
        s.contains("terminal too small")
    })
    .await?;
    tmux.run(&["resize-window", "-t", "Alice", "-x", "100", "-y", "30"])?;
    carol.send_text("general", "after the storm", None).await?;
    let screen = tmux
        .wait_for("Alice", "a message after the storm", |s| {
            full_screen_row(s, "Carol", "after the storm").is_some()
        })
        .await?;
    assert_eq!(input_row(&screen), "> ab\u{fffd}\u{fffd}cd", "{screen}");
    tmux.run(&["send-keys", "-t", "Alice", "C-d"])?;
    Ok(())
}

/// The index in `cluster.nodes` of the running node whose id is `id`.
fn node_index(cluster: &TestCluster, id: u64) -> anyhow::Result<usize> {
    cluster
        .nodes
        .iter()
        .position(|n| n.ready().is_some_and(|r| r.id == id))
        .with_context(|| format!("node {id} is not one of this cluster's"))
}

/// The value of the unlabeled metric `name` in a node's Prometheus text.
async fn metric(addr: std::net::SocketAddr, name: &str) -> anyhow::Result<f64> {
    let text = testkit::scrape_metrics(addr).await?;
    testkit::metric_value(&text, name).with_context(|| format!("no metric {name} at {addr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_subscriptions_share_one_push_connection_and_resume_after_a_kill9(
) -> anyhow::Result<()> {
    let mut cluster = three_nodes("cl-push-many", &[]).await?;
    let alice = client_as(&cluster, "alice").await?;
    let bob = client_as(&cluster, "bob").await?;
    for i in 0..5 {
        alice
            .send_text("general", &format!("before {i}"), None)
            .await?;
    }
    // 16 subscriptions of one client: two channels, several starting points.
    const SUBS: usize = 16;
    let starts: Vec<(&str, u64)> = (0..SUBS)
        .map(|i| {
            (
                if i % 2 == 0 { "general" } else { "random" },
                (i % 4) as u64,
            )
        })
        .collect();
    let mut subs: Vec<_> = starts
        .iter()
        .map(|(channel, after)| bob.subscribe(channel, *after))
        .collect();
    const TOTAL: u64 = 40;
    let sender = {
        let alice = alice.clone();
        tokio::spawn(async move {
            for i in 0..TOTAL {
                alice.send_text("general", &format!("g{i}"), None).await?;
                alice.send_text("random", &format!("r{i}"), None).await?;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            anyhow::Ok(())
        })
    };
    let heads = |channel: &str| {
        if channel == "general" {
            5 + TOTAL
        } else {
            TOTAL
        }
    };
    let mut got: Vec<Vec<WireMessage>> = Vec::new();
    for (sub, (channel, after)) in subs.iter_mut().zip(&starts) {
        // The first few past each start, so every subscription is live before the kill.
        let first = receive(sub, 3, RECEIVE).await?;
        assert_dense(&first, after + 1);
        assert!(first.iter().all(|m| m.channel == *channel));
        got.push(first);
    }
    let victim = bob.status().reading.context("bob reads from some node")?;
    let index = node_index(&cluster, victim)?;
    let victim_metrics = cluster.nodes[index].ready().context("ready")?.metrics;
    // All of bob's subscriptions on one push connection (alice has none: she only sends).
    assert_eq!(
        metric(victim_metrics, "cellchat_push_connections").await?,
        1.0
    );
    assert_eq!(
        metric(victim_metrics, "cellchat_push_subscriptions").await?,
        SUBS as f64
    );
    cluster.nodes[index].kill9();

    for ((sub, (channel, after)), got) in subs.iter_mut().zip(&starts).zip(&mut got) {
        let want = heads(channel) - after;
        let rest = receive(sub, (want as usize) - got.len(), RECEIVE).await?;
        got.extend(rest);
        assert_dense(got, after + 1);
        assert!(got.iter().all(|m| m.channel == *channel));
    }
    sender.await??;
    assert_ne!(
        bob.status().reading,
        Some(victim),
        "bob moved off the killed node"
    );
    for sub in &mut subs {
        let extra = tokio::time::timeout(Duration::from_millis(300), sub.recv()).await;
        assert!(extra.is_err(), "unexpected extra delivery: {extra:?}");
    }
    Ok(())
}

/// A push connection's two clocks. The client's heartbeats keep a client that only listens
/// connected past the node's silence limit, and the node's keep the client from leaving a
/// healthy node; a node that stops answering (frozen with SIGSTOP: no FIN, no RST) is left
/// for another within the client's silence limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listening_client_keeps_its_push_connection_and_leaves_a_frozen_node(
) -> anyhow::Result<()> {
    use proto::push::{CLIENT_SILENCE_MS_MAX, SILENCE_MS_MAX};
    let cluster = three_nodes("cl-push-frozen", &[]).await?;
    let alice = client_as(&cluster, "alice").await?;
    // Bob probes the nodes once a minute, longer than the test, so only the push connection's own
    // silence limit can tell him that his node froze.
    let bob = Client::connect(ClientConfig {
        probe_interval: Duration::from_secs(60),
        ..config(&cluster, Some(Identity::ephemeral("bob", None)))
    })
    .await?;
    let mut bobs = bob.subscribe("general", 0);
    let first = alice.send_text("general", "before", None).await?;
    assert_eq!(receive(&mut bobs, 1, RECEIVE).await?[0].seq, first.seq);

    let reader = bob.status().reading.context("bob reads from some node")?;
    let index = node_index(&cluster, reader)?;
    let metrics = cluster.nodes[index].ready().context("ready")?.metrics;
    let opened = metric(metrics, "cellchat_push_connections_opened_total").await?;
    assert_eq!(metric(metrics, "cellchat_push_connections").await?, 1.0);

    // Bob only listens, for longer than the node waits for a silent client.
    tokio::time::sleep(Duration::from_millis(CLIENT_SILENCE_MS_MAX + 1_500)).await;
    assert_eq!(
        metric(metrics, "cellchat_push_connections_opened_total").await?,
        opened,
        "bob's push connection was dropped and opened again while he listened"
    );
    assert_eq!(metric(metrics, "cellchat_push_connections").await?, 1.0);
    assert_eq!(bob.status().reading, Some(reader));

    cluster.nodes[index].signal("-STOP")?;
    let frozen = Instant::now();
    let moved = async {
        // The send waits for a new leader if the frozen node led.
        let second = alice.send_text("general", "while frozen", None).await?;
        let got = receive(&mut bobs, 1, RECEIVE).await?;
        anyhow::Ok((second, got))
    }
    .await;
    let waited = frozen.elapsed();
    cluster.nodes[index].signal("-CONT")?;
    let (second, got) = moved?;
    assert_eq!(got[0].seq, second.seq);
    assert_ne!(
        bob.status().reading,
        Some(reader),
        "bob moved off the frozen node"
    );
    // The frozen node stops its heartbeats; the client gives up on it after its silence
    // limit, then dials and subscribes elsewhere (generous: a loaded test machine).
    assert!(
        waited < Duration::from_millis(SILENCE_MS_MAX) + Duration::from_secs(10),
        "bob took {waited:?} to leave the frozen node"
    );
    Ok(())
}

/// Raw push protocol against a real node: typed errors for bad input, and the node keeps
/// serving afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_push_port_answers_bad_input_with_typed_errors_and_keeps_serving() -> anyhow::Result<()>
{
    use futures::{SinkExt as _, StreamExt as _};
    use proto::push::{self, ClientFrame, PushHello, ServerFrame, Subscribe};
    use proto::{ApiError, RejectReason};
    use tarpc::tokio_util::codec::Framed;
    use tokio::io::AsyncWriteExt;

    let cluster = three_nodes("cl-push-bad", &[]).await?;
    let alice = client_as(&cluster, "alice").await?;
    alice.send_text("general", "one", None).await?;
    let node = *cluster.nodes[0].ready().context("ready")?;

    type PushFramed = Framed<proto::TlsTcp, tarpc::tokio_util::codec::LengthDelimitedCodec>;
    async fn open(addr: std::net::SocketAddr) -> anyhow::Result<PushFramed> {
        let verifier = proto::tls::CaVerifier::new(proto::tls::Trust::FirstUse);
        let config = proto::tls::client_config(verifier, proto::tls::ALPN_PUSH);
        let mut stream = proto::connect_tls(addr, config, proto::tls::any_node(), RECEIVE).await?;
        stream.write_all(&push::PUSH_MAGIC).await?;
        stream.flush().await?;
        Ok(Framed::new(
            stream,
            push::frame_codec(proto::FRAME_BYTES_MAX),
        ))
    }
    async fn send(framed: &mut PushFramed, frame: &ClientFrame) -> anyhow::Result<()> {
        let encoded = push::encode_frame(frame);
        framed.send(encoded.slice(push::LENGTH_BYTES..)).await?;
        Ok(())
    }
    async fn next(framed: &mut PushFramed) -> anyhow::Result<Option<ServerFrame>> {
        match tokio::time::timeout(RECEIVE, framed.next()).await? {
            None => Ok(None),
            // A TLS peer that hangs up without close_notify reads as an unexpected EOF.
            Some(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
            Some(body) => Ok(Some(push::decode_server_frame(&body?)?)),
        }
    }
    let hello = ClientFrame::Hello(PushHello::new(cluster.cluster.clone(), None));

    // A subscribe before hello: Unauthenticated for the connection, then close.
    let mut conn = open(node.client).await?;
    send(&mut conn, &ClientFrame::Unsubscribe { sub_id: 1 }).await?;
    assert_eq!(
        next(&mut conn).await?,
        Some(ServerFrame::Error {
            sub_id: None,
            error: ApiError::Unauthenticated
        })
    );
    assert_eq!(next(&mut conn).await?, None, "closed after the error");

    // Another version, another cluster.
    let mut conn = open(node.client).await?;
    let mut other = PushHello::new(cluster.cluster.clone(), None);
    other.version = push::PUSH_VERSION + 7;
    send(&mut conn, &ClientFrame::Hello(other)).await?;
    assert!(matches!(
        next(&mut conn).await?,
        Some(ServerFrame::Error {
            sub_id: None,
            error: ApiError::UnsupportedProtocol { .. }
        })
    ));
    let mut conn = open(node.client).await?;
    send(
        &mut conn,
        &ClientFrame::Hello(PushHello::new("not-ours", None)),
    )
    .await?;
    assert!(matches!(
        next(&mut conn).await?,
        Some(ServerFrame::Error {
            sub_id: None,
            error: ApiError::WrongCluster { .. }
        })
    ));

    // Garbage after hello: a typed error, then close.
    let mut conn = open(node.client).await?;
    send(&mut conn, &hello).await?;
    assert!(
        matches!(next(&mut conn).await?, Some(ServerFrame::Welcome(w)) if w.node_id == node.id)
    );
    conn.send(bytes_of(&[0xff; 9])).await?;
    assert!(matches!(
        next(&mut conn).await?,
        Some(ServerFrame::Error {
            sub_id: None,
            error: ApiError::Rejected(RejectReason::Malformed { .. })
        })
    ));

    // An oversized length prefix: closed without reading the body.
    let mut framed = open(node.client).await?;
    let raw = framed.get_mut();
    raw.write_all(&encode_raw(&hello)).await?;
    raw.write_all(&((push::CLIENT_FRAME_BYTES_MAX as u32) + 1).to_be_bytes())
        .await?;
    raw.flush().await?;
    assert!(matches!(
        next(&mut framed).await?,
        Some(ServerFrame::Welcome(_))
    ));
    let mut closed = false;
    while let Some(frame) = next(&mut framed).await? {
        assert!(
            matches!(
                frame,
                ServerFrame::Error { sub_id: None, .. } | ServerFrame::Heartbeat { .. }
            ),
            "{frame:?}"
        );
        closed = matches!(frame, ServerFrame::Error { .. }) || closed;
    }
    assert!(closed, "an error frame before the close");

    // An invalid channel ends that subscription only; a good one on the same connection works.
    // Reading needs a login: a user registered through the leader first.
    let reader = testkit::TestUser::new("push-reader");
    let nodes = cluster.client_addrs();
    testkit::TestClient::login_anywhere(node.client, &nodes, &cluster.cluster, &reader, RECEIVE)
        .await?;
    let mut conn = open(node.client).await?;
    let binding = proto::tls::stream_binding(conn.get_ref())?;
    send(&mut conn, &hello).await?;
    let Some(ServerFrame::Welcome(welcome)) = next(&mut conn).await? else {
        bail!("no welcome");
    };
    let login = ClientFrame::Login(reader.login(&welcome.challenge, &binding, &cluster.cluster));
    send(&mut conn, &login).await?;
    let subscribe = |sub_id: u64, channel: &str| {
        ClientFrame::Subscribe(Subscribe {
            sub_id,
            channel: channel.into(),
            after_seq: 0,
            read_token: alice.read_token(),
        })
    };
    send(&mut conn, &subscribe(1, "Not A Channel!")).await?;
    send(&mut conn, &subscribe(2, "general")).await?;
    let mut saw_error = false;
    let mut saw_batch = false;
    while !(saw_error && saw_batch) {
        match next(&mut conn).await?.context("connection closed")? {
            ServerFrame::Error {
                sub_id: Some(1),
                error,
            } => {
                assert_eq!(error, ApiError::Rejected(RejectReason::InvalidChannel));
                saw_error = true;
            }
            ServerFrame::Batch { sub_id: 2, batch } => {
                assert_eq!(batch.messages.len(), 1);
                assert_eq!(batch.messages[0].seq, 1);
                saw_batch = true;
            }
            ServerFrame::Heartbeat { .. } => {}
            other => bail!("unexpected {other:?}"),
        }
    }
    // Pushed live: the next send arrives on the open subscription.
    alice.send_text("general", "two", None).await?;
    loop {
        match next(&mut conn).await?.context("connection closed")? {
            ServerFrame::Batch { sub_id: 2, batch } => {
                assert_eq!(batch.messages[0].seq, 2);
                break;
            }
            ServerFrame::Heartbeat { .. } => {}
            other => bail!("unexpected {other:?}"),
        }
    }
    // Idle: heartbeats come.
    let idle = tokio::time::timeout(Duration::from_millis(push::SILENCE_MS_MAX), conn.next())
        .await
        .context("no frame within the silence limit")?
        .context("closed")??;
    assert!(matches!(
        push::decode_server_frame(&idle)?,
        ServerFrame::Heartbeat { .. }
    ));

    // tarpc on the same port still works.
    let page = alice.history("general", None, 10).await?;
    assert_eq!(page.messages.len(), 2);
    Ok(())
}

fn encode_raw(frame: &proto::push::ClientFrame) -> Vec<u8> {
    proto::push::encode_frame(frame).to_vec()
}

fn bytes_of(bytes: &[u8]) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(bytes)
}

/// The exit code of a finished client process.
fn code(output: &std::process::Output) -> Option<i32> {
    output.status.code()
}

/// The JSON acknowledgement `--send --json` prints.
fn ack(output: &std::process::Output) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(
        output.status.success(),
        "send failed ({:?}): {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(serde_json::from_slice(&output.stdout)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scripting_contract_exit_codes_idempotency_key_tail_after_and_broken_pipes(
) -> anyhow::Result<()> {
    let mut cluster = three_nodes("cl-contract", &[]).await?;
    let dir = tempfile::tempdir()?;
    let dir = dir.path();

    // 2: usage. Nothing is sent.
    for args in [
        &["alice", "--send", ""][..],
        &["alice", "--send", "x", "--channel", "no spaces"],
        &["alice", "--send", "x", "--idempotency-key", ""],
        &["alice", "--history", "0"],
        &["alice", "--send", "x", "--timeout", "soon"],
    ] {
        let output = cli(&cluster, dir, args)?;
        assert_eq!(code(&output), Some(2), "{args:?}: {output:?}");
    }

    // 0, then the same key again: the first send's seq, marked a duplicate.
    let args = ["alice", "--send", "deploy 1", "--idempotency-key", "job-1"];
    let first = ack(&cli(&cluster, dir, &[&args[..], &["--json"]].concat())?)?;
    assert_eq!(first["duplicate"], false, "{first}");
    let again = ack(&cli(&cluster, dir, &[&args[..], &["--json"]].concat())?)?;
    assert_eq!(again["seq"], first["seq"], "{again}");
    assert_eq!(again["duplicate"], true, "{again}");

    // A send with a key while its leader is killed: whatever that run's exit code (0, or 3:
    // outcome unknown), running it again until it exits 0 leaves exactly one message.
    let index = testkit::leader_index(&cluster, Duration::from_secs(10)).await?;
    let args = [
        "alice",
        "--send",
        "deploy 2",
        "--idempotency-key",
        "job-2",
        "--json",
        "--timeout",
        "20",
    ];
    let mut command = Command::new(testkit::client_binary()?);
    command
        .args(["--cluster", &cluster.cluster])
        .args(["--discovery-port", &cluster.discovery_port.to_string()])
        .arg("--config-dir")
        .arg(dir)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let racing = command.spawn()?;
    tokio::time::sleep(Duration::from_millis(150)).await;
    cluster.nodes[index].kill9();
    let raced = tokio::task::spawn_blocking(move || racing.wait_with_output()).await??;
    assert!(
        matches!(code(&raced), Some(0 | 3)),
        "a send racing a leader kill: {raced:?}"
    );
    let mut settled = None;
    for _ in 0..5 {
        let output = cli(&cluster, dir, &args)?;
        match code(&output) {
            Some(0) => {
                settled = Some(ack(&output)?);
                break;
            }
            Some(3) => tokio::time::sleep(Duration::from_secs(1)).await,
            other => bail!("retrying with the key exited {other:?}: {output:?}"),
        }
    }
    let settled = settled.context("the retries never got an acknowledgement")?;
    if code(&raced) == Some(0) {
        let raced = ack(&raced)?;
        assert_eq!(settled["seq"], raced["seq"]);
        assert_eq!(settled["duplicate"], true, "{settled}");
    }
    let history = cli(&cluster, dir, &["bob", "--history", "100", "--json"])?;
    let lines: Vec<serde_json::Value> = String::from_utf8(history.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let texts: Vec<&str> = lines.iter().filter_map(|l| l["text"].as_str()).collect();
    assert_eq!(texts, ["deploy 1", "deploy 2"], "each key applied once");

    // 1: refused. The name alice with another key (another config dir).
    let other = tempfile::tempdir()?;
    let refused = cli(&cluster, other.path(), &["alice", "--send", "hi"])?;
    assert_eq!(code(&refused), Some(1), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("registered with another key"));

    // --tail --after: every message after the seq, then it stops at --timeout with 0.
    let first_seq = lines[0]["seq"].as_u64().context("seq")?;
    let tail = cli(
        &cluster,
        dir,
        &[
            "bob",
            "--tail",
            "--after",
            &first_seq.to_string(),
            "--json",
            "--timeout",
            "3",
        ],
    )?;
    assert_eq!(code(&tail), Some(0), "{tail:?}");
    let tailed: Vec<serde_json::Value> = String::from_utf8(tail.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(tailed.len(), 1, "{tailed:?}");
    assert_eq!(tailed[0]["text"], "deploy 2");

    // A reader that went away (`| head -1`): exit 0 and nothing on stderr.
    let mut piped = Command::new(testkit::client_binary()?)
        .args(["--cluster", &cluster.cluster])
        .args(["--discovery-port", &cluster.discovery_port.to_string()])
        .arg("--config-dir")
        .arg(dir)
        .args(["bob", "--history", "100"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    drop(piped.stdout.take());
    let output = tokio::task::spawn_blocking(move || piped.wait_with_output()).await??;
    assert_eq!(code(&output), Some(0), "{output:?}");
    assert!(output.stderr.is_empty(), "{output:?}");

    // 3: no cluster to answer. The hint says a retry with the key is safe.
    for node in &mut cluster.nodes {
        node.kill9();
    }
    let args = ["alice", "--send", "x", "--idempotency-key", "job-3"];
    let unknown = cli(&cluster, dir, &[&args[..], &["--timeout", "5"]].concat())?;
    assert_eq!(code(&unknown), Some(3), "{unknown:?}");
    let err = String::from_utf8_lossy(&unknown.stderr);
    assert!(err.contains("at most once"), "{err}");

    // Completions and a man page.
    let completions = Command::new(testkit::client_binary()?)
        .args(["--completions", "bash"])
        .output()?;
    assert!(completions.status.success());
    assert!(String::from_utf8_lossy(&completions.stdout).contains("--idempotency-key"));
    let man = Command::new(testkit::client_binary()?)
        .arg("--man")
        .output()?;
    assert!(man.status.success());
    assert!(String::from_utf8_lossy(&man.stdout).contains(".TH cellchat"));
    Ok(())
}

/// The index of the first line of `screen` containing `needle`.
fn line_of(screen: &str, needle: &str) -> Option<usize> {
    screen.lines().position(|l| l.contains(needle))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_and_presence_show_between_the_full_screen_client_and_the_line_mode(
) -> anyhow::Result<()> {
    let cluster = three_nodes("cl-typing", &[]).await?;
    let dir = tempfile::tempdir()?;
    let tmux = Tmux::new();
    tmux.start_full_screen(&cluster, dir.path(), "Bob", (120, 30))?;
    tmux.wait_for("Bob", "Bob online", |s| {
        status_bar(s).contains("Bob in #general") && status_bar(s).contains("| 1 online")
    })
    .await?;
    tmux.start_line_mode(&cluster, dir.path(), "Alice", "Alice")?;
    tmux.wait_for("Alice", "the line mode's prompt", |s| {
        s.contains("#general @")
    })
    .await?;
    tmux.wait_for("Bob", "Alice online", |s| {
        status_bar(s).contains("| 2 online")
    })
    .await?;

    // Alice writes without sending: Bob's status bar says so; her message ends it.
    tmux.type_burst("Alice", "almost")?;
    tmux.wait_for("Bob", "Alice typing", |s| {
        status_bar(s).contains("Alice is typing…")
    })
    .await?;
    tmux.run(&["send-keys", "-t", "Alice", " done", "Enter"])?;
    tmux.wait_for("Bob", "Alice's message, and no more typing", |s| {
        full_screen_row(s, "Alice", "almost done").is_some() && !status_bar(s).contains("is typing")
    })
    .await?;

    // Bob writes: Alice's prompt says so until the note runs out.
    tmux.type_burst("Bob", "hmm")?;
    tmux.wait_for("Alice", "Bob typing in the prompt", |s| {
        s.contains("(Bob is typing…) #general")
    })
    .await?;
    let shown = Instant::now();
    tmux.wait_for("Alice", "the note running out", |s| {
        !s.contains("is typing")
    })
    .await?;
    let lasted = shown.elapsed();
    ensure!(
        lasted >= Duration::from_secs(2),
        "the typing note vanished after {lasted:?}, before its time"
    );

    // /members lists who is online; Alice leaves and Bob sees it.
    tmux.run(&["send-keys", "-t", "Alice", "/members", "Enter"])?;
    tmux.wait_for("Alice", "online users", |s| {
        s.contains("online: Alice, Bob")
    })
    .await?;
    tmux.run(&["send-keys", "-t", "Alice", "/quit", "Enter"])?;
    tmux.wait_for("Bob", "Alice offline", |s| {
        status_bar(s).contains("| 1 online")
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_conversation_and_search_in_the_full_screen_client_and_the_line_mode(
) -> anyhow::Result<()> {
    let cluster = three_nodes("cl-direct", &[]).await?;
    let dir = tempfile::tempdir()?;
    let tmux = Tmux::new();
    tmux.start_full_screen(&cluster, dir.path(), "Bob", (120, 30))?;
    tmux.wait_for("Bob", "Bob online", |s| {
        status_bar(s).contains("Bob in #general") && status_bar(s).contains("| 1 online")
    })
    .await?;
    // A name registers with its first message.
    tmux.run(&["send-keys", "-t", "Bob", "deploy is green", "Enter"])?;
    tmux.start_line_mode(&cluster, dir.path(), "Alice", "Alice")?;
    tmux.wait_for("Alice", "Bob's message", |s| {
        s.contains("Bob: deploy is green")
    })
    .await?;

    // Alice starts the conversation from the line mode; Bob's list shows it at once.
    tmux.run(&["send-keys", "-t", "Alice", "/dm Bob", "Enter"])?;
    tmux.wait_for("Alice", "the conversation opened", |s| {
        s.contains("started your direct conversation with Bob") && s.contains("@Bob [e2e]")
    })
    .await?;
    tmux.run(&[
        "send-keys",
        "-t",
        "Alice",
        "psst, the code is 4711",
        "Enter",
    ])?;
    tmux.wait_for("Bob", "the conversation listed with a mention", |s| {
        s.lines().any(|l| l.contains("@Alice (1, @1)"))
    })
    .await?;
    tmux.run(&["send-keys", "-t", "Bob", "/dm Alice", "Enter"])?;
    tmux.wait_for("Bob", "Alice's message, decrypted", |s| {
        status_bar(s).contains("Bob in @Alice [e2e")
            && full_screen_row(s, "Alice", "psst, the code is 4711").is_some()
    })
    .await?;

    // Bob searches the conversation on his machine; Alice searches the plaintext channels.
    tmux.run(&["send-keys", "-t", "Bob", "/search code", "Enter"])?;
    tmux.wait_for("Bob", "the local search", |s| {
        s.contains("-- 1 match in the last 10000 messages of @Alice --")
    })
    .await?;
    tmux.run(&["send-keys", "-t", "Alice", "/leave", "Enter"])?;
    tmux.run(&["send-keys", "-t", "Alice", "/search depl*", "Enter"])?;
    tmux.wait_for("Alice", "the nodes' search", |s| {
        s.contains("-- 1 match in plaintext channels --")
            && s.contains("#general [")
            && s.contains("Bob: deploy is green")
    })
    .await?;
    tmux.run(&["send-keys", "-t", "Alice", "/dm @Bob", "Enter"])?;
    tmux.run(&["send-keys", "-t", "Alice", "/search code", "Enter"])?;
    tmux.wait_for("Alice", "her key searches her side too", |s| {
        s.contains("-- 1 match in the last 10000 messages of @Bob --")
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_markers_follow_a_user_from_the_full_screen_client_to_the_line_mode_and_back(
) -> anyhow::Result<()> {
    let cluster = three_nodes("cl-marks", &[]).await?;
    let dir = tempfile::tempdir()?;
    let carol = client_as(&cluster, "Carol").await?;
    for i in 1..=5 {
        carol.send_text("general", &format!("g{i}"), None).await?;
    }
    carol.send_text("ops", "o1", None).await?;
    let tmux = Tmux::new();

    // Bob reads #general to its end in the full-screen client, then moves to #ops; two
    // more messages in #general count as unread there.
    tmux.start_full_screen(&cluster, dir.path(), "Bob", (120, 30))?;
    tmux.wait_for("Bob", "#general read to its end", |s| {
        status_bar(s).contains("Bob in #general") && full_screen_row(s, "Carol", "g5").is_some()
    })
    .await?;
    // Bob's key, as a library client, to see his marker reach the cluster.
    let key = Identity::load_or_create(dir.path(), &cluster.cluster, "Bob")?;
    let bob = Client::connect(config(&cluster, Some(key))).await?;
    let deadline = Instant::now() + RECEIVE;
    loop {
        let channels = bob.channels().await?;
        if channels
            .iter()
            .any(|c| c.name == "general" && c.read_to == 5)
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("Bob's marker in #general never reached 5: {channels:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tmux.run(&["send-keys", "-t", "Bob", "/join #ops", "Enter"])?;
    tmux.wait_for("Bob", "#ops shown", |s| {
        status_bar(s).contains("Bob in #ops")
    })
    .await?;
    for i in 6..=7 {
        carol.send_text("general", &format!("g{i}"), None).await?;
    }
    tmux.wait_for("Bob", "2 unread in #general", |s| {
        s.lines().any(|l| l.starts_with("#general (2)"))
    })
    .await?;

    // Bob's line mode, on the same key, marks where he stopped: the two new ones.
    tmux.start_line_mode(&cluster, dir.path(), "BobLine", "Bob")?;
    let screen = tmux
        .wait_for("BobLine", "the history with the new ones marked", |s| {
            s.contains("#general @n") && shows_message_from(s, "Carol", "g7")
        })
        .await?;
    let divider = line_of(&screen, "-- new since you last read --")
        .with_context(|| format!("no divider:\n{screen}"))?;
    let g5 = line_of(&screen, "Carol: g5").context("g5")?;
    let g6 = line_of(&screen, "Carol: g6").context("g6")?;
    assert!(g5 < divider && divider < g6, "divider misplaced:\n{screen}");

    // What the line mode read stops counting in the full-screen client.
    tmux.wait_for("Bob", "#general's count cleared by the other client", |s| {
        s.lines().any(|l| l.starts_with("#general ")) && !s.contains("#general (")
    })
    .await?;
    tmux.type_burst("BobLine", "/quit")?;
    tmux.run(&["send-keys", "-t", "BobLine", "Enter"])?;

    // Back in the full-screen client, #general opens with a line above what is new.
    carol.send_text("general", "g8", None).await?;
    tmux.wait_for("Bob", "1 unread in #general", |s| {
        s.lines().any(|l| l.starts_with("#general (1)"))
    })
    .await?;
    tmux.run(&["send-keys", "-t", "Bob", "C-p"])?;
    let screen = tmux
        .wait_for("Bob", "#general with the divider", |s| {
            status_bar(s).contains("Bob in #general") && full_screen_row(s, "Carol", "g8").is_some()
        })
        .await?;
    let divider = line_of(&screen, "── new since you last read ──")
        .with_context(|| format!("no divider:\n{screen}"))?;
    let g7 = line_of(&screen, "Carol: g7").context("g7")?;
    let g8 = line_of(&screen, "Carol: g8").context("g8")?;
    assert!(g7 < divider && divider < g8, "divider misplaced:\n{screen}");
    Ok(())
}
