//! End-to-end tests of presence and typing on real `server` processes: typing crosses nodes
//! to the users subscribed to the channel and nobody else; a user is online while a client of
//! theirs is connected anywhere, and goes offline on their own when the client is killed,
//! falls silent, or its node dies; a read marker moved on one client is pushed to the user's
//! others.
//!
//! Timeouts are generous bounds for a loaded 2-core machine, not performance claims.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use cellchat_client::{Client, ClientConfig, Ephemeral, Identity};
use node::{GOSSIP_EVERY, PEER_EXPIRY};
use proto::push::{ClientFrame, ServerFrame, Subscribe, CLIENT_SILENCE_MS_MAX};
use testkit::push::RawPush;
use testkit::{TestClient, TestCluster, TestUser};

const READY: Duration = Duration::from_secs(60);
const CONVERGE: Duration = Duration::from_secs(60);
/// Presence and typing travel within a gossip period or two; this is the bound on a loaded
/// machine.
const HEAR: Duration = Duration::from_secs(15);

/// Registers `user` (a login on the leader's side) and waits until `nodes` all know them.
async fn register(
    cluster: &TestCluster,
    nodes: &[SocketAddr],
    user: &TestUser,
) -> anyhow::Result<()> {
    for addr in nodes {
        TestClient::login_anywhere(*addr, nodes, &cluster.cluster, user, CONVERGE).await?;
    }
    Ok(())
}

fn subscribe(sub_id: u64, channel: &str) -> ClientFrame {
    ClientFrame::Subscribe(Subscribe {
        sub_id,
        channel: channel.to_owned(),
        after_seq: 0,
        read_token: 0,
    })
}

/// Waits on `conn` until its presence frames (after `WatchPresence`) say `user` is `online`
/// (true) or offline (false).
async fn presence_of(conn: &mut RawPush, user: &str, online: bool) -> anyhow::Result<()> {
    conn.until(HEAR, |frame| match frame {
        ServerFrame::Presence {
            online: on,
            offline,
            full,
        } => {
            let is_on = on.iter().any(|u| u == user);
            let is_off = offline.iter().any(|u| u == user) || (*full && !is_on);
            ((online && is_on) || (!online && is_off)).then_some(())
        }
        _ => None,
    })
    .await
    .with_context(|| {
        format!(
            "waiting for {user} to be {}",
            if online { "online" } else { "offline" }
        )
    })
}

/// Waits on `conn` for the next typing frame.
async fn next_typing(conn: &mut RawPush) -> anyhow::Result<(String, String)> {
    conn.until(HEAR, |frame| match frame {
        ServerFrame::Typing { channel, user } => Some((channel.clone(), user.clone())),
        _ => None,
    })
    .await
}

fn cli(cluster: &TestCluster, dir: &std::path::Path) -> anyhow::Result<Command> {
    let mut command = Command::new(testkit::client_binary()?);
    command
        .args(["--cluster", &cluster.cluster])
        .args(["--discovery-port", &cluster.discovery_port.to_string()])
        .arg("--config-dir")
        .arg(dir)
        .env_remove("CELLCHAT_JOIN");
    Ok(command)
}

/// Kills the child by pid when dropped, also when the test fails.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn typing_and_presence_cross_nodes_and_expire_on_their_own() -> anyhow::Result<()> {
    let mut cluster = TestCluster::new("presence", &[])?;
    testkit::start_nodes(&mut cluster, 3, READY, CONVERGE).await?;
    let nodes = cluster.client_addrs();
    let (alice, bob, carol) = (
        TestUser::new("alice"),
        TestUser::new("bob"),
        TestUser::new("carol"),
    );
    for user in [&alice, &bob, &carol] {
        register(&cluster, &nodes, user).await?;
    }
    let (_, leader) = testkit::leader_client_addr(&cluster, CONVERGE).await?;
    let writer = TestClient::login(leader, &cluster.cluster, &alice).await?;
    writer.send("general", b"hello", [1; 16], 1).await??;

    // Before a login, presence and typing are refused and the connection closed.
    for frame in [
        ClientFrame::WatchPresence,
        ClientFrame::Typing {
            channel: "general".into(),
        },
    ] {
        let mut stranger = RawPush::hello(nodes[1], &cluster.cluster).await?;
        stranger.send(&frame).await?;
        let refused = stranger
            .until(HEAR, |f| match f {
                ServerFrame::Error {
                    sub_id: None,
                    error,
                } => Some(error.clone()),
                _ => None,
            })
            .await?;
        ensure!(
            refused == proto::ApiError::Unauthenticated,
            "{frame:?} before a login: {refused:?}"
        );
        ensure!(
            stranger.next(HEAR).await?.is_none(),
            "the connection stayed open after {frame:?}"
        );
    }

    // Bob on node 2 and Alice on node 1 follow #general and watch presence.
    let mut bob_push = RawPush::login(nodes[1], &cluster.cluster, &bob).await?;
    bob_push.send(&subscribe(1, "general")).await?;
    bob_push.send(&ClientFrame::WatchPresence).await?;
    presence_of(&mut bob_push, "bob", true).await?;
    let mut alice_push = RawPush::login(nodes[0], &cluster.cluster, &alice).await?;
    alice_push.send(&subscribe(1, "general")).await?;
    alice_push.send(&ClientFrame::WatchPresence).await?;
    presence_of(&mut bob_push, "alice", true).await?;
    presence_of(&mut alice_push, "bob", true).await?;

    // Typing in #general crosses from node 1 to node 2.
    let typed = Instant::now();
    alice_push
        .send(&ClientFrame::Typing {
            channel: "general".into(),
        })
        .await?;
    let heard = next_typing(&mut bob_push).await?;
    assert_eq!(heard, ("general".to_owned(), "alice".to_owned()));
    println!("typing crossed nodes in {:?}", typed.elapsed());

    // Carol, who may not read Alice's private channel, cannot tell its members she types
    // there; Bob's typing in #general, told after it, is what Alice hears next.
    let private = proto::ChannelChange::Create {
        private: true,
        crypto: None,
    };
    let change = proto::ChannelRequest {
        channel: "vault".into(),
        change: private,
    };
    let mut ctx = tarpc::context::current();
    ctx.deadline = Instant::now() + Duration::from_secs(10);
    writer.client.channel(ctx, change).await??;
    let mut carol_push = RawPush::login(nodes[2], &cluster.cluster, &carol).await?;
    // Carol plays a client that vanished without closing: no heartbeats from here on.
    carol_push.heartbeats = false;
    alice_push.send(&subscribe(2, "vault")).await?;
    carol_push
        .send(&ClientFrame::Typing {
            channel: "vault".into(),
        })
        .await?;
    let carol_silent_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    bob_push
        .send(&ClientFrame::Typing {
            channel: "general".into(),
        })
        .await?;
    let heard = next_typing(&mut alice_push).await?;
    assert_eq!(heard, ("general".to_owned(), "bob".to_owned()));

    // The library and the CLI: Dave's client lists who is online; killing his `--tail`
    // process takes him offline.
    let dir = tempfile::tempdir()?;
    let tail = cli(&cluster, dir.path())?
        .args(["dave", "--tail"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut tail = Killed(tail);
    presence_of(&mut bob_push, "dave", true).await?;
    let online = cli(&cluster, dir.path())?
        .args(["erin", "--online", "--json"])
        .output()?;
    ensure!(online.status.success(), "--online: {online:?}");
    let listed: Vec<String> = serde_json::from_slice(&online.stdout)?;
    for user in ["alice", "bob", "dave", "erin"] {
        ensure!(listed.iter().any(|u| u == user), "{user} not in {listed:?}");
    }
    tail.0.kill()?;
    let _ = tail.0.wait();
    presence_of(&mut bob_push, "dave", false).await?;

    // Carol said nothing since her typing: the node closes her connection after the client
    // silence limit, and she goes offline everywhere.
    presence_of(&mut bob_push, "carol", false).await?;
    let silent = carol_silent_from.elapsed();
    ensure!(
        silent >= Duration::from_millis(CLIENT_SILENCE_MS_MAX) - Duration::from_millis(500),
        "carol went offline after only {silent:?} of silence"
    );
    // Frames written before the close (heartbeats) are still buffered; then the end.
    let deadline = Instant::now() + HEAR;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match carol_push.next(left).await {
            Ok(None) => break,
            Ok(Some(_)) => {}
            Err(e) => bail!("carol's silent connection stayed open: {e}"),
        }
    }

    // Alice's first connection fell silent too (nobody read it since); she connects to node
    // 1 again, and then that node dies: nobody tells the others she left, and her presence
    // expires with the node's (after the peer expiry, not at once). Bob asks for the whole
    // list again: her going offline may be among the frames read while waiting for Carol.
    bob_push.send(&ClientFrame::WatchPresence).await?;
    presence_of(&mut bob_push, "alice", false).await?;
    let _alice_again = RawPush::login(nodes[0], &cluster.cluster, &alice).await?;
    presence_of(&mut bob_push, "alice", true).await?;
    let killed = Instant::now();
    cluster.nodes[0].kill9();
    presence_of(&mut bob_push, "alice", false).await?;
    let took = killed.elapsed();
    println!("a dead node's users went offline after {took:?}");
    ensure!(
        took >= PEER_EXPIRY - GOSSIP_EVERY - Duration::from_millis(500),
        "alice went offline {took:?} after her node died: sooner than its news could expire"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_clients_hear_each_others_typing_and_list_who_is_online() -> anyhow::Result<()> {
    let mut cluster = TestCluster::new("presence-lib", &[])?;
    testkit::start_nodes(&mut cluster, 3, READY, CONVERGE).await?;
    let connect = |name: &str, seed: Option<[u8; 32]>| ClientConfig {
        identity: Some(Identity::ephemeral(name, seed)),
        ..ClientConfig::new(cluster.cluster.clone(), cluster.discovery_port)
    };
    let alice = Client::connect(connect("alice", None)).await?;
    let bob_seed: [u8; 32] = rand::random();
    let bob = Client::connect(connect("bob", Some(bob_seed))).await?;
    alice.send_text("general", "hello", None).await?;
    let _alice_sub = alice.subscribe("general", 0);
    let _bob_sub = bob.subscribe("general", 0);
    let mut heard = bob.ephemeral();
    // Alice's push connection opens with her subscription; a typing note before it is not
    // sent, so she retries the way a typing user renews it.
    let deadline = Instant::now() + HEAR;
    let mut sent = false;
    loop {
        ensure!(
            Instant::now() < deadline,
            "bob never heard alice typing (sent: {sent})"
        );
        sent |= alice.typing("general");
        match tokio::time::timeout(Duration::from_millis(500), heard.recv()).await {
            Ok(Ok(Ephemeral::Typing { channel, user })) => {
                assert_eq!((channel.as_str(), user.as_str()), ("general", "alice"));
                break;
            }
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => bail!("events: {e}"),
        }
    }
    // Each lists the other within a gossip period.
    for (client, other) in [(&alice, "bob"), (&bob, "alice")] {
        let deadline = Instant::now() + HEAR;
        loop {
            let online = client.online().await?;
            if online.iter().any(|u| u == other) {
                break;
            }
            ensure!(Instant::now() < deadline, "{other} not online: {online:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Bob reads #general on his phone: his first client hears the marker move at once.
    let phone = Client::connect(connect("bob", Some(bob_seed))).await?;
    phone.mark_read("general", 1).await?;
    let deadline = Instant::now() + HEAR;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, heard.recv()).await {
            Ok(Ok(Ephemeral::Marker { channel, read_to })) => {
                assert_eq!((channel.as_str(), read_to), ("general", 1));
                break;
            }
            Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(e)) => bail!("events: {e}"),
            Err(_) => bail!("bob's first client never heard his marker move"),
        }
    }

    // Dropping Alice's client closes her connection: Bob sees her go.
    drop(_alice_sub);
    drop(alice);
    let deadline = Instant::now() + HEAR;
    loop {
        let online = bob.online().await?;
        if !online.iter().any(|u| u == "alice") {
            break;
        }
        ensure!(Instant::now() < deadline, "alice still online: {online:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}
