//! End-to-end tests of the server cluster (issue 3): real `server` processes on loopback, each
//! test with its own cluster name and discovery port, cleaned up by pid when the test ends.
//!
//! What each test checks is in its name; timing goals live in benchmarks, not here. Timeouts
//! below are generous bounds for a loaded 2-core machine, not performance claims.

use std::time::{Duration, Instant};

use proto::{ApiError, HistoryRequest, Role, StreamRequest};
use testkit::{leader_client_addr, TestClient, TestCluster, TestUser};

const READY: Duration = Duration::from_secs(30);
const CONVERGE: Duration = Duration::from_secs(30);

fn ctx(timeout: Duration) -> tarpc::context::Context {
    let mut ctx = tarpc::context::current();
    ctx.deadline = Instant::now() + timeout;
    ctx
}

/// Sends through whichever node leads, following NotLeader and retrying with the same key
/// until acknowledged.
async fn send_until_acked(
    cluster: &TestCluster,
    user: &TestUser,
    channel: &str,
    body: &[u8],
    client_id: [u8; 16],
    client_seq: u64,
    timeout: Duration,
) -> anyhow::Result<proto::SendReply> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        let Ok((_, addr)) = leader_client_addr(cluster, Duration::from_secs(2)).await else {
            continue;
        };
        match TestClient::login(addr, &cluster.cluster, user).await {
            Ok(client) => match client.send(channel, body, client_id, client_seq).await {
                Ok(Ok(reply)) => return Ok(reply),
                Ok(Err(e)) => last = e.to_string(),
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let logs: Vec<String> = cluster
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| format!("--- node {} log tail:\n{}", i + 1, n.log_tail(25)))
        .collect();
    anyhow::bail!(
        "send not acknowledged within {timeout:?}; last error: {last}\n{}",
        logs.join("\n")
    )
}

/// Starts three nodes of a fresh test cluster and waits until each printed its ready line.
fn three_ready_nodes(name: &str, extra: &[&str]) -> anyhow::Result<TestCluster> {
    let mut cluster = TestCluster::new(name, extra)?;
    for _ in 0..3 {
        cluster.spawn_node()?;
    }
    for node in &mut cluster.nodes {
        node.wait_ready(READY)?;
    }
    Ok(cluster)
}

/// The position in `cluster.nodes` of the node with id `id`.
fn index_of(cluster: &TestCluster, id: u64) -> usize {
    cluster
        .nodes
        .iter()
        .position(|n| n.ready().map(|r| r.id) == Some(id))
        .expect("the node is one of ours")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_form_one_cluster_and_replicate() -> anyhow::Result<()> {
    let cluster = three_ready_nodes("three", &[])?;
    // Nodes join as learners and are promoted once caught up; wait for all three voters.
    let deadline = Instant::now() + CONVERGE;
    loop {
        let view = cluster.wait_converged(3, CONVERGE).await?;
        let voters = view.iter().filter(|a| a.voter).count();
        if voters == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "expected 3 voters: {view:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let alice = TestUser::new("alice");
    let reply =
        send_until_acked(&cluster, &alice, "general", b"hello", [1; 16], 1, CONVERGE).await?;
    assert_eq!(reply.seq, 1);
    // Every node serves the message once it has applied the read token.
    for node in &cluster.nodes {
        let ready = *node.ready().expect("ready");
        let nodes = cluster.client_addrs();
        let client =
            TestClient::login_anywhere(ready.client, &nodes, &cluster.cluster, &alice, CONVERGE)
                .await?;
        let page = client
            .client
            .history(
                ctx(Duration::from_secs(10)),
                HistoryRequest {
                    channel: "general".into(),
                    before_seq: None,
                    from_seq: Some(1),
                    limit: 10,
                    read_token: reply.read_token,
                },
            )
            .await??;
        assert_eq!(page.messages.len(), 1, "node {} history", ready.id);
        assert_eq!(page.messages[0].sender, "alice");
        assert_eq!(page.messages[0].body, b"hello");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_nodes_started_at_once_form_exactly_one_cluster() -> anyhow::Result<()> {
    let mut cluster = TestCluster::new("ten", &[])?;
    for _ in 0..10 {
        cluster.spawn_node()?;
    }
    for node in &mut cluster.nodes {
        node.wait_ready(Duration::from_secs(60))?;
    }
    // Promotion of learners to voters happens after joining; wait for it to settle.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let view = cluster.wait_converged(10, CONVERGE).await?;
        let voters = view.iter().filter(|a| a.voter).count();
        let learners = view.iter().filter(|a| a.role == Role::Learner).count();
        if voters == 5 && learners == 5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expected 5 voters and 5 learners, got {voters} voters, {learners} learners: {view:#?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_elects_another_and_sends_continue() -> anyhow::Result<()> {
    let mut cluster = three_ready_nodes("failover", &[])?;
    cluster.wait_converged(3, CONVERGE).await?;
    let bob = TestUser::new("bob");
    let first =
        send_until_acked(&cluster, &bob, "general", b"before", [2; 16], 1, CONVERGE).await?;

    let (leader_id, _) = leader_client_addr(&cluster, CONVERGE).await?;
    let index = index_of(&cluster, leader_id);
    cluster.nodes[index].kill9();

    let second =
        send_until_acked(&cluster, &bob, "general", b"after", [2; 16], 2, CONVERGE).await?;
    assert_eq!(
        second.seq,
        first.seq + 1,
        "seqs stay dense across the failover"
    );
    let (new_leader, _) = leader_client_addr(&cluster, CONVERGE).await?;
    assert_ne!(new_leader, leader_id);
    Ok(())
}

/// A leader killed with `kill -9` is replaced long before the followers' timers would run
/// out: they see its connections close and its Raft port refuse, and call an election
/// (`node::leader_watch`). The timers here are 10-12 s, so without that the first election
/// could not start before ~22 s (lease plus election timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_before_the_election_timers_run_out() -> anyhow::Result<()> {
    let timing = [
        "--heartbeat-ms",
        "100",
        "--election-min-ms",
        "10000",
        "--election-max-ms",
        "12000",
    ];
    let mut cluster = TestCluster::with_production_timing("deadleader", &timing)?;
    for _ in 0..3 {
        cluster.spawn_node()?;
    }
    for node in &mut cluster.nodes {
        node.wait_ready(READY)?;
    }
    cluster.wait_converged(3, Duration::from_secs(60)).await?;
    let dave = TestUser::new("dave");
    let first =
        send_until_acked(&cluster, &dave, "general", b"before", [4; 16], 1, CONVERGE).await?;

    let (leader_id, _) = leader_client_addr(&cluster, CONVERGE).await?;
    let index = index_of(&cluster, leader_id);
    let killed = Instant::now();
    cluster.nodes[index].kill9();

    // Well under the 10 s minimum election timeout alone, let alone lease plus timeout.
    let within = Duration::from_secs(8);
    let new_leader = loop {
        let left = within.saturating_sub(killed.elapsed());
        anyhow::ensure!(
            !left.is_zero(),
            "no new leader {within:?} after killing leader {leader_id}"
        );
        let (id, _) = leader_client_addr(&cluster, left).await?;
        if id != leader_id {
            break id;
        }
    };
    let second =
        send_until_acked(&cluster, &dave, "general", b"after", [4; 16], 2, CONVERGE).await?;
    assert_eq!(second.seq, first.seq + 1);
    eprintln!(
        "leader {leader_id} killed; node {new_leader} leads after {:?}",
        killed.elapsed()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_send_across_a_leader_change_is_applied_once() -> anyhow::Result<()> {
    let mut cluster = three_ready_nodes("dedup", &[])?;
    cluster.wait_converged(3, CONVERGE).await?;
    let carol = TestUser::new("carol");
    let key = [3; 16];
    let original = send_until_acked(&cluster, &carol, "dedup", b"once", key, 7, CONVERGE).await?;
    assert!(!original.duplicate);

    let (leader_id, _) = leader_client_addr(&cluster, CONVERGE).await?;
    let index = index_of(&cluster, leader_id);
    cluster.nodes[index].kill9();

    let retried = send_until_acked(&cluster, &carol, "dedup", b"once", key, 7, CONVERGE).await?;
    assert_eq!(
        retried.seq, original.seq,
        "a retry answers the original seq"
    );
    assert!(retried.duplicate, "a retry is reported as a duplicate");
    let next = send_until_acked(&cluster, &carol, "dedup", b"twice", key, 8, CONVERGE).await?;
    assert_eq!(
        next.seq,
        original.seq + 1,
        "the retry made no second message"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_on_a_follower_with_a_read_token_sees_the_senders_message() -> anyhow::Result<()> {
    let cluster = three_ready_nodes("ryw", &[])?;
    let view = cluster.wait_converged(3, CONVERGE).await?;
    let dave = TestUser::new("dave");
    let reply = send_until_acked(&cluster, &dave, "ryw", b"mine", [4; 16], 1, CONVERGE).await?;
    for follower in view.iter().filter(|a| a.role != Role::Leader) {
        let nodes = cluster.client_addrs();
        let addr = follower.client_addr;
        let client =
            TestClient::login_anywhere(addr, &nodes, &cluster.cluster, &dave, CONVERGE).await?;
        let batch = client
            .client
            .stream(
                proto::deadline_for(Duration::from_secs(5)),
                StreamRequest {
                    channel: "ryw".into(),
                    after_seq: 0,
                    max: 100,
                    wait_ms: 5000,
                    read_token: reply.read_token,
                },
            )
            .await??;
        assert_eq!(
            batch.messages.len(),
            1,
            "follower {} stream",
            follower.node_id
        );
        assert_eq!(batch.messages[0].body, b"mine");
        assert!(batch.applied >= reply.read_token);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_to_a_follower_answers_not_leader_with_the_leaders_address() -> anyhow::Result<()> {
    let cluster = three_ready_nodes("notleader", &[])?;
    let erin = TestUser::new("erin");
    // Register through the leader first (a follower cannot write the registration).
    send_until_acked(&cluster, &erin, "general", b"hello", [5; 16], 1, CONVERGE).await?;
    // Leadership may move at any moment on a loaded machine, so the hint is checked against a
    // leader that discovery showed both before and after the send; an attempt during which
    // the leader changed proves nothing either way and is made again.
    let deadline = Instant::now() + CONVERGE;
    let mut attempts = Vec::new();
    while Instant::now() < deadline {
        let before = cluster.wait_converged(3, CONVERGE).await?;
        let leader = before
            .iter()
            .find(|a| a.role == Role::Leader)
            .expect("a leader");
        let follower = before
            .iter()
            .find(|a| a.role != Role::Leader)
            .expect("a follower");
        let client = match TestClient::login(follower.client_addr, &cluster.cluster, &erin).await {
            Ok(client) => client,
            Err(e) => {
                attempts.push(format!("login at follower {}: {e:#}", follower.node_id));
                continue;
            }
        };
        let reply = client.send("general", b"x", [5; 16], 2).await?;
        let after = cluster.wait_converged(3, CONVERGE).await?;
        let still_leading = after.iter().any(|a| {
            a.role == Role::Leader && a.node_id == leader.node_id && a.term == leader.term
        });
        match reply {
            Err(ApiError::NotLeader { leader: Some(hint) }) if still_leading => {
                assert_eq!(hint.id, leader.node_id);
                assert_eq!(hint.client_addr, leader.client_addr);
                return Ok(());
            }
            other if !still_leading => attempts.push(format!("leader changed; reply {other:?}")),
            other => panic!("expected NotLeader with a hint, got {other:?}"),
        }
    }
    anyhow::bail!("no attempt with a stable leader: {attempts:#?}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_catches_up_and_a_node_down_past_a_purge_catches_up_by_snapshot(
) -> anyhow::Result<()> {
    // Snapshot every 20 entries and keep only 5 after it, so a node that misses 100 sends
    // can only catch up by snapshot.
    let mut cluster = three_ready_nodes("catchup", &["--snapshot-every", "20", "--log-keep", "5"])?;
    let view = cluster.wait_converged(3, CONVERGE).await?;
    let follower_id = view
        .iter()
        .find(|a| a.role != Role::Leader)
        .expect("a follower")
        .node_id;
    let index = index_of(&cluster, follower_id);
    cluster.nodes[index].kill9();

    let frank = TestUser::new("frank");
    let mut last = None;
    for seq in 1..=100u64 {
        let body = format!("m{seq}");
        last = Some(
            send_until_acked(
                &cluster,
                &frank,
                "catchup",
                body.as_bytes(),
                [6; 16],
                seq,
                CONVERGE,
            )
            .await?,
        );
    }
    let last = last.expect("sent");
    assert_eq!(last.seq, 100);

    let ready = cluster.restart(index, READY)?;
    let nodes = cluster.client_addrs();
    let client =
        TestClient::login_anywhere(ready.client, &nodes, &cluster.cluster, &frank, CONVERGE)
            .await?;
    let page = client
        .client
        .history(
            ctx(Duration::from_secs(30)),
            HistoryRequest {
                channel: "catchup".into(),
                before_seq: None,
                from_seq: Some(1),
                limit: 1000,
                read_token: last.read_token,
            },
        )
        .await??;
    let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
    assert_eq!(
        seqs,
        (1..=100).collect::<Vec<_>>(),
        "dense history after catch-up"
    );
    assert_eq!(page.messages[99].body, b"m100");
    // The history answer can come before the node logs its snapshot work (a release build
    // answers within milliseconds of catching up), so give the log line a moment.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut log = cluster.nodes[index].log_tail(200);
    while !(log.contains("snapshot") || log.contains("install")) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        log = cluster.nodes[index].log_tail(200);
    }
    assert!(
        log.contains("snapshot") || log.contains("install"),
        "the restarted node should have installed a snapshot; log tail:\n{log}"
    );
    Ok(())
}

/// A leader whose log fsyncs hang hands leadership to another voter (`node::handover`'s disk
/// watchdog) while its disk is still stalled. `--weaken stall-fsync` makes SIGUSR2 hang every
/// log fsync of the leader for 3 s. Its followers' fsyncs still make a quorum, so openraft
/// keeps it leading (its heartbeats go on) however long its own disk hangs; without the
/// watchdog the leader would not change at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_disk_stalls_hands_over_before_the_stall_ends() -> anyhow::Result<()> {
    testkit::server_binary_with_weaken()?;
    let stall = ["--weaken", "stall-fsync", "--disk-stall-ms", "300"];
    let cluster = three_ready_nodes("diskstall", &stall)?;
    cluster.wait_converged(3, CONVERGE).await?;
    let erin = TestUser::new("erin");
    let first =
        send_until_acked(&cluster, &erin, "general", b"before", [5; 16], 1, CONVERGE).await?;

    let (leader_id, _) = leader_client_addr(&cluster, CONVERGE).await?;
    let index = index_of(&cluster, leader_id);
    let pid = cluster.nodes[index].pid().expect("running");
    // Our own child's pid, so the signal cannot reach another process.
    let sent = std::process::Command::new("kill")
        .args(["-USR2", &pid.to_string()])
        .status()?;
    anyhow::ensure!(sent.success(), "kill -USR2 {pid} failed");
    let stalled = Instant::now();
    // The stall shows only once there is something to sync.
    let second =
        send_until_acked(&cluster, &erin, "general", b"during", [5; 16], 2, CONVERGE).await?;
    assert_eq!(
        second.seq,
        first.seq + 1,
        "seqs stay dense, the send applied once"
    );

    let within = Duration::from_millis(2500);
    let new_leader = loop {
        let (id, _) = leader_client_addr(&cluster, CONVERGE).await?;
        if id != leader_id {
            break id;
        }
        let log = cluster.nodes[index].log_tail(60);
        anyhow::ensure!(
            stalled.elapsed() < within,
            "leader {leader_id} still leads {within:?} into a 3 s stall; its log:\n{log}"
        );
    };
    let moved = stalled.elapsed();
    let old_log = cluster.nodes[index].log_tail(200);
    assert!(
        old_log.contains("disk stalled: handing leadership over"),
        "the stalled leader handed over:\n{old_log}"
    );
    let third =
        send_until_acked(&cluster, &erin, "general", b"after", [5; 16], 3, CONVERGE).await?;
    assert_eq!(third.seq, second.seq + 1);
    eprintln!("leader {leader_id}'s disk stalled; node {new_leader} leads after {moved:?}");
    Ok(())
}

/// A leader stopped with SIGTERM hands leadership to a caught-up voter before it exits, and
/// the cluster keeps taking sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_with_sigterm_hands_leadership_over_first() -> anyhow::Result<()> {
    let mut cluster = three_ready_nodes("handover", &[])?;
    cluster.wait_converged(3, CONVERGE).await?;
    let fay = TestUser::new("fay");
    let first =
        send_until_acked(&cluster, &fay, "general", b"before", [6; 16], 1, CONVERGE).await?;
    let (leader_id, _) = leader_client_addr(&cluster, CONVERGE).await?;
    let index = index_of(&cluster, leader_id);
    assert!(
        cluster.nodes[index].terminate(Duration::from_secs(20)),
        "the leader exits by itself on SIGTERM"
    );
    let log = cluster.nodes[index].log_tail(100);
    assert!(
        log.contains("stopping: handing leadership over"),
        "the leader offered leadership away:\n{log}"
    );
    assert!(
        !log.contains("no other node took over"),
        "another node took over before the leader stopped:\n{log}"
    );
    let second =
        send_until_acked(&cluster, &fay, "general", b"after", [6; 16], 2, CONVERGE).await?;
    assert_eq!(second.seq, first.seq + 1);
    let (new_leader, _) = leader_client_addr(&cluster, CONVERGE).await?;
    assert_ne!(new_leader, leader_id);
    Ok(())
}

/// A node's process runs without transparent huge pages (its allocator would otherwise ask for
/// them, and the kernel's zeroing of each stalls the thread that grew the heap), as the kernel
/// reports it in `/proc/PID/status`.
#[test]
fn a_node_runs_without_transparent_huge_pages() -> anyhow::Result<()> {
    let mut cluster = TestCluster::new("no-thp", &[])?;
    cluster.spawn_node()?;
    cluster.nodes[0].wait_ready(READY)?;
    let pid = cluster.nodes[0].pid().expect("the node is running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let thp = status
        .lines()
        .find_map(|line| line.strip_prefix("THP_enabled:"))
        .map(str::trim);
    assert_eq!(
        thp,
        Some("0"),
        "THP_enabled in /proc/{pid}/status:\n{status}"
    );
    Ok(())
}
