//! Pipelined replication under faults: a leader keeps several AppendEntries out to each
//! follower, and each follower hands them to openraft in the order they came
//! (`node::raft_rpc`, `node::append_pipe`). Real `server` processes on loopback.
//!
//! The faults cut pipelines in the middle: a follower frozen past the AppendEntries deadline
//! (the leader gives up on the requests it has out; the follower reads them, and their
//! cancellations, when it thaws), a follower killed and restarted (a new connection), and the
//! leader killed and restarted (its unreplicated tail conflicts with the new leader's log).
//! Timeouts are generous bounds for a loaded 2-core machine, not performance claims.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use cellchat_client::{Client, ClientConfig, Identity};
use proto::{HistoryRequest, WireMessage};
use testkit::{leader_index, NodeProc, TestClient, TestCluster, TestUser};

const READY: Duration = Duration::from_secs(30);
const CONVERGE: Duration = Duration::from_secs(30);
const CHANNEL: &str = "pipe";
/// Concurrent senders, each a user of its own: enough sends arrive while an AppendEntries is
/// out that the leader has entries for the next one.
const SENDERS: usize = 24;
/// Sends per sender at most, so the run stays bounded however fast the machine is.
const SENDS_MAX: usize = 400;

/// The leader's `raft_append_in_flight` histogram: (requests sent alone, requests sent in all),
/// counting only AppendEntries that carried entries.
async fn appends_sent(node: &NodeProc) -> anyhow::Result<(f64, f64)> {
    let metrics = node.ready().context("ready")?.metrics;
    let text = testkit::scrape_metrics(metrics).await?;
    let series = |suffix: &str| {
        text.lines()
            .find_map(|line| {
                line.strip_prefix("cellchat_raft_append_in_flight")?
                    .strip_prefix(suffix)
            })
            .and_then(|value| value.trim().parse::<f64>().ok())
            .with_context(|| format!("no raft_append_in_flight{suffix} at {metrics}"))
    };
    Ok((series("_bucket{le=\"1.0\"}")?, series("_count")?))
}

/// Every message of `CHANNEL` as node `node` serves it once it has applied `read_token`.
async fn history_on(
    cluster: &TestCluster,
    node: usize,
    user: &TestUser,
    read_token: u64,
) -> anyhow::Result<Vec<WireMessage>> {
    let ready = *cluster.nodes[node].ready().context("ready")?;
    let nodes = cluster.client_addrs();
    let client =
        TestClient::login_anywhere(ready.client, &nodes, &cluster.cluster, user, CONVERGE).await?;
    let mut messages: Vec<WireMessage> = Vec::new();
    loop {
        let mut ctx = tarpc::context::current();
        ctx.deadline = Instant::now() + Duration::from_secs(30);
        let from = messages.last().map_or(1, |m| m.seq + 1);
        let page = client
            .client
            .history(
                ctx,
                HistoryRequest {
                    channel: CHANNEL.into(),
                    before_seq: None,
                    from_seq: Some(from),
                    limit: 500,
                    read_token,
                },
            )
            .await??;
        if page.messages.is_empty() {
            return Ok(messages);
        }
        messages.extend(page.messages);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_cut_by_a_freeze_a_restart_and_a_leader_kill_lose_nothing_acknowledged(
) -> anyhow::Result<()> {
    let mut cluster = TestCluster::new("pipeline", &[])?;
    for _ in 0..3 {
        cluster.spawn_node()?;
    }
    for node in &mut cluster.nodes {
        node.wait_ready(READY)?;
    }
    let deadline = Instant::now() + CONVERGE;
    while cluster
        .wait_converged(3, CONVERGE)
        .await?
        .iter()
        .filter(|a| a.voter)
        .count()
        < 3
    {
        ensure!(
            Instant::now() < deadline,
            "three voters within {CONVERGE:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Each sender records what was acknowledged, and how many sends failed (those may or
    // may not have been applied).
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for k in 0..SENDERS {
        let seed: [u8; 32] = rand::random();
        let config = ClientConfig {
            identity: Some(Identity::ephemeral(format!("s{k}"), Some(seed))),
            ..ClientConfig::new(cluster.cluster.clone(), cluster.discovery_port)
        };
        let client = Client::connect(config).await?;
        let stop = stop.clone();
        senders.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut failed = 0;
            for i in 0..SENDS_MAX {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let body = format!("s{k}-{i}").into_bytes();
                match client.send(CHANNEL, body.clone()).await {
                    Ok(reply) => acked.push((body, reply.read_token)),
                    Err(_) => failed += 1,
                }
            }
            (seed, acked, failed)
        }));
    }

    tokio::time::sleep(Duration::from_secs(1)).await;
    let leader = leader_index(&cluster, CONVERGE).await?;
    let followers: Vec<usize> = (0..3).filter(|&i| i != leader).collect();

    // Frozen past the 1 s AppendEntries deadline, with requests out to it.
    cluster.nodes[followers[0]].signal("-STOP")?;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    cluster.nodes[followers[0]].signal("-CONT")?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The leader pipelined: some AppendEntries went out while others were still out.
    let (alone, sent) = appends_sent(&cluster.nodes[leader]).await?;
    ensure!(
        sent > alone,
        "the leader sent {sent} AppendEntries with entries, {alone} of them with none other \
         out: no pipelining"
    );

    cluster.nodes[followers[1]].kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.restart(followers[1], READY)?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    cluster.nodes[leader].kill9();
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.restart(leader, READY)?;
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    stop.store(true, Ordering::Relaxed);
    let mut acked: BTreeSet<Vec<u8>> = BTreeSet::new();
    let mut read_token = 0;
    let mut failed = 0;
    let mut reader = None;
    for (k, sender) in senders.into_iter().enumerate() {
        let (seed, sent, fails) = sender.await?;
        failed += fails;
        for (body, token) in sent {
            read_token = read_token.max(token);
            acked.insert(body);
        }
        reader.get_or_insert_with(|| TestUser::with_seed(&format!("s{k}"), seed));
    }
    let reader = reader.context("a sender")?;
    eprintln!(
        "{} sends acknowledged, {failed} failed; the leader sent {sent} AppendEntries with \
         entries, {alone} with none other out",
        acked.len()
    );
    ensure!(
        acked.len() > SENDERS * 10,
        "only {} sends acknowledged ({failed} failed)",
        acked.len()
    );

    // Every node serves the same history, with every acknowledged send exactly once.
    let mut first: Option<Vec<WireMessage>> = None;
    for node in 0..3 {
        let history = history_on(&cluster, node, &reader, read_token).await?;
        let mut seen: BTreeMap<&[u8], u64> = BTreeMap::new();
        for (i, message) in history.iter().enumerate() {
            ensure!(
                message.seq == i as u64 + 1,
                "node {node}: seq {} at {i}",
                message.seq
            );
            if let Some(earlier) = seen.insert(&message.body, message.seq) {
                anyhow::bail!(
                    "node {node}: body applied twice, seqs {earlier} and {}",
                    message.seq
                );
            }
        }
        let missing: Vec<_> = acked
            .iter()
            .filter(|b| !seen.contains_key(b.as_slice()))
            .collect();
        ensure!(
            missing.is_empty(),
            "node {node}: {} of {} acknowledged sends missing",
            missing.len(),
            acked.len()
        );
        // A send that failed at the client may still have been applied after the last
        // acknowledged one, so the histories agree on their common part.
        match &first {
            None => first = Some(history),
            Some(first) => {
                let common = first.len().min(history.len());
                ensure!(
                    first[..common] == history[..common],
                    "node {node}'s history differs from the first node's"
                );
            }
        }
    }
    Ok(())
}
