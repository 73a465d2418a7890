//! End-to-end tests of retention on real `server` processes: a channel owner's count
//! retention and the operator's default remove the same oldest messages on every node, the
//! floor survives a kill -9, and refused policies change nothing.
//!
//! Age retentions are at least a minute, too long for a test here; the state machine's
//! property test (`chat-sm/tests/state/retention.rs`) covers ages with a simulated clock.
//! Timeouts are generous bounds for a loaded 2-core machine, not performance claims.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use cellchat_client::{
    ApiError, ChannelChange, ChannelDetail, Client, ClientConfig, Error, Identity,
};
use proto::{HistoryRequest, RejectReason, Retention};
use testkit::{TestClient, TestCluster, TestUser};

const READY: Duration = Duration::from_secs(60);
const CONVERGE: Duration = Duration::from_secs(60);
/// The leader checks for due expiries this often; short so the test waits little.
const EXPIRE_INTERVAL: &str = "200";

async fn start(cluster: &mut TestCluster, nodes: usize) -> anyhow::Result<()> {
    testkit::start_nodes(cluster, nodes, READY, CONVERGE).await
}

async fn connect(cluster: &TestCluster, name: &str) -> anyhow::Result<Client> {
    let config = ClientConfig {
        identity: Some(Identity::ephemeral(name, None)),
        ..ClientConfig::new(cluster.cluster.clone(), cluster.discovery_port)
    };
    Ok(Client::connect(config).await?)
}

fn count(n: u64) -> Retention {
    Retention {
        max_age_ms: None,
        max_count: Some(n),
    }
}

/// Waits until `channel`'s floor, as the client's node reports it, reaches `floor`.
async fn wait_floor(client: &Client, channel: &str, floor: u64) -> anyhow::Result<ChannelDetail> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let detail = client.channel_info(channel).await?;
        if detail.floor >= floor {
            ensure!(
                detail.floor == floor,
                "{channel}: floor {} passed {floor}",
                detail.floor
            );
            return Ok(detail);
        }
        if Instant::now() > deadline {
            bail!(
                "{channel}: floor still {} after 30 s, expected {floor}",
                detail.floor
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The seqs and bodies of `channel` as one node serves them once it applied `read_token`,
/// paging forwards from seq 1: nothing below the floor may come back.
async fn history_at(
    node: &TestClient,
    channel: &str,
    read_token: u64,
) -> anyhow::Result<Vec<(u64, Vec<u8>)>> {
    let mut ctx = tarpc::context::current();
    ctx.deadline = Instant::now() + Duration::from_secs(10);
    let request = HistoryRequest {
        channel: channel.to_owned(),
        before_seq: None,
        from_seq: Some(1),
        limit: 1000,
        read_token,
    };
    let batch = node
        .client
        .history(ctx, request)
        .await?
        .map_err(|e| anyhow::anyhow!("history at {}: {e}", node.addr))?;
    Ok(batch
        .messages
        .into_iter()
        .map(|m| (m.seq, m.body))
        .collect())
}

fn bodies(range: std::ops::RangeInclusive<u64>) -> Vec<(u64, Vec<u8>)> {
    range.map(|n| (n, format!("m{n}").into_bytes())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_count_retention_removes_the_same_oldest_messages_on_every_node() -> anyhow::Result<()> {
    let mut cluster = TestCluster::new("retention", &["--expire-interval-ms", EXPIRE_INTERVAL])?;
    start(&mut cluster, 3).await?;
    let alice = connect(&cluster, "alice").await?;
    let bob = connect(&cluster, "bob").await?;
    bob.send("lobby", b"hello".to_vec()).await?;
    alice
        .change_channel(
            "short",
            ChannelChange::Create {
                private: false,
                crypto: None,
            },
        )
        .await?;
    for n in 1..=10 {
        let sent = alice.send("short", format!("m{n}").into_bytes()).await?;
        ensure!(sent.seq == n, "message {n} got seq {}", sent.seq);
    }

    // Refused policies change nothing: only the owner sets one, and a count of 0 is out of
    // bounds.
    let by_bob = bob
        .change_channel("short", ChannelChange::SetRetention(Some(count(3))))
        .await;
    ensure!(
        matches!(
            by_bob,
            Err(Error::Api(ApiError::Rejected(RejectReason::NotOwner)))
        ),
        "bob set alice's retention: {by_bob:?}"
    );
    let zero = alice
        .change_channel("short", ChannelChange::SetRetention(Some(count(0))))
        .await;
    ensure!(
        matches!(
            zero,
            Err(Error::Api(ApiError::Rejected(
                RejectReason::InvalidRetention
            )))
        ),
        "a count of 0 was accepted: {zero:?}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let detail = alice.channel_info("short").await?;
    ensure!(
        detail.floor == 1 && detail.retention.is_none(),
        "a refused policy changed the channel: {detail:?}"
    );

    // Keep 3: seqs 8..=10 stay, and the next message pushes the floor up by one.
    alice
        .change_channel("short", ChannelChange::SetRetention(Some(count(3))))
        .await?;
    let detail = wait_floor(&alice, "short", 8).await?;
    ensure!(detail.retention == Some(count(3)), "{detail:?}");
    let sent = alice.send("short", b"m11".to_vec()).await?;
    ensure!(
        sent.seq == 11,
        "seqs keep growing after an expiry: got {}",
        sent.seq
    );
    wait_floor(&alice, "short", 9).await?;
    let recent: Vec<u64> = alice
        .recent("short", 100)
        .await?
        .messages
        .iter()
        .map(|m| m.seq)
        .collect();
    ensure!(recent == [9, 10, 11], "recent history {recent:?}");
    // A subscriber from the start skips what expired and gets the rest in order.
    let mut sub = alice.subscribe("short", 0);
    let mut streamed = Vec::new();
    while streamed.len() < 3 {
        let next = tokio::time::timeout(Duration::from_secs(30), sub.recv())
            .await
            .context("subscription stalled")?
            .context("subscription ended")??;
        streamed.push(next.seq);
    }
    ensure!(
        streamed == [9, 10, 11],
        "subscription from 0 delivered {streamed:?}"
    );

    // Every node serves exactly the same kept messages, read directly from each.
    let reader = TestUser::new("reader");
    let addrs = cluster.client_addrs();
    let (leader_id, leader_addr) = testkit::leader_client_addr(&cluster, READY).await?;
    let at_leader = TestClient::login(leader_addr, &cluster.cluster, &reader).await?;
    let registered = at_leader.send("lobby", b"hi", [9; 16], 1).await??;
    let token = alice.read_token().max(registered.read_token);
    for addr in &addrs {
        let node =
            TestClient::login_anywhere(*addr, &addrs, &cluster.cluster, &reader, READY).await?;
        let kept = history_at(&node, "short", token).await?;
        ensure!(
            kept == bodies(9..=11),
            "node at {addr} (leader {leader_id} at {leader_addr}) serves {kept:?}"
        );
    }

    // The operator's default applies to channels without their own policy.
    let output = cluster.admin(&["retention", "--set", "2"])?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success() && stdout.contains("default retention: 2 messages"),
        "server retention --set 2: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for n in 1..=5 {
        alice.send("busy", format!("m{n}").into_bytes()).await?;
    }
    let busy = wait_floor(&alice, "busy", 4).await?;
    ensure!(
        busy.retention.is_none() && busy.default_retention == count(2),
        "{busy:?}"
    );
    // The channel's own policy wins over the default.
    let short = alice.channel_info("short").await?;
    ensure!(
        short.floor == 9,
        "the default overrode the owner's policy: {short:?}"
    );
    let output = cluster.admin(&["retention", "--set", "forever"])?;
    ensure!(output.status.success(), "server retention --set forever");

    // The floor is durable: a node killed and restarted serves the same messages.
    cluster.nodes[0].kill9();
    cluster.restart(0, READY)?;
    cluster.wait_converged(3, CONVERGE).await?;
    let addr = cluster.client_addrs()[0];
    let node = TestClient::login_anywhere(addr, &addrs, &cluster.cluster, &reader, READY)
        .await
        .context("after the restart")?;
    let kept = history_at(&node, "short", token).await?;
    ensure!(kept == bodies(9..=11), "restarted node serves {kept:?}");
    let kept = history_at(&node, "busy", token).await?;
    ensure!(
        kept == bodies(4..=5),
        "restarted node serves busy as {kept:?}"
    );
    Ok(())
}
