//! End-to-end tests of read markers on real `server` processes: two clients of one user share
//! one marker, which never moves back; marks acknowledged before a kill -9 of the leader are
//! on every node after it; bad marks are refused with their own errors and change nothing.
//!
//! Timeouts are generous bounds for a loaded 2-core machine, not performance claims.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use cellchat_client::{ApiError, Client, ClientConfig, Error, Identity};
use proto::{ChannelInfoRequest, RejectReason};
use testkit::{TestClient, TestCluster, TestUser};

const READY: Duration = Duration::from_secs(60);
const CONVERGE: Duration = Duration::from_secs(60);
const SEE: Duration = Duration::from_secs(30);

async fn connect(cluster: &TestCluster, name: &str, seed: [u8; 32]) -> anyhow::Result<Client> {
    let config = ClientConfig {
        identity: Some(Identity::ephemeral(name, Some(seed))),
        ..ClientConfig::new(cluster.cluster.clone(), cluster.discovery_port)
    };
    Ok(Client::connect(config).await?)
}

/// `client`'s marker in `channel` as its channel list shows it.
async fn listed(client: &Client, channel: &str) -> anyhow::Result<u64> {
    let channels = client.channels().await?;
    let info = channels
        .iter()
        .find(|c| c.name == channel)
        .with_context(|| format!("#{channel} not listed"))?;
    Ok(info.read_to)
}

/// Waits until `client` lists `want` as its marker in `channel` (another client of the same
/// user moved it; this one reads from whichever node is nearest).
async fn wait_listed(client: &Client, channel: &str, want: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + SEE;
    loop {
        let got = listed(client, channel).await?;
        if got == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("#{channel} lists read_to {got}, want {want}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn refused(outcome: Result<u64, Error>, want: RejectReason) -> anyhow::Result<()> {
    match outcome {
        Err(Error::Api(ApiError::Rejected(reason))) if reason == want => Ok(()),
        other => bail!("expected {want:?}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_users_clients_share_one_marker_that_survives_a_leader_kill_and_refuses_bad_marks(
) -> anyhow::Result<()> {
    let mut cluster = TestCluster::new("markers", &[])?;
    testkit::start_nodes(&mut cluster, 3, READY, CONVERGE).await?;
    let alice = connect(&cluster, "alice", rand::random()).await?;
    for n in 1..=8 {
        alice.send_text("general", &format!("m{n}"), None).await?;
    }
    let private = proto::ChannelChange::Create {
        private: true,
        crypto: None,
    };
    alice.change_channel("vault", private).await?;
    alice.send_text("vault", "secret", None).await?;

    let bob_seed: [u8; 32] = rand::random();
    let laptop = connect(&cluster, "bob", bob_seed).await?;
    let phone = connect(&cluster, "bob", bob_seed).await?;
    ensure!(
        listed(&laptop, "general").await? == 0,
        "a marker before any mark"
    );

    // One client's mark is the other's; a lower mark answers the marker as it stands.
    ensure!(laptop.mark_read("general", 3).await? == 3);
    wait_listed(&phone, "general", 3).await?;
    ensure!(
        phone.mark_read("general", 2).await? == 3,
        "a marker moved back"
    );
    ensure!(phone.mark_read("general", 5).await? == 5);
    wait_listed(&laptop, "general", 5).await?;

    // Marks that race from both clients end at the highest of them.
    let racing = |client: Client, seqs: Vec<u64>| {
        tokio::spawn(async move {
            for seq in seqs {
                client.mark_read("general", seq).await?;
            }
            anyhow::Ok(())
        })
    };
    let a = racing(laptop.clone(), vec![6, 8, 7]);
    let b = racing(phone.clone(), vec![7, 6]);
    a.await??;
    b.await??;
    wait_listed(&phone, "general", 8).await?;

    // The bad marks of the kind: nothing there, not a member, not a channel.
    refused(
        laptop.mark_read("general", 0).await,
        RejectReason::NoSuchMessage,
    )?;
    refused(
        laptop.mark_read("general", 9).await,
        RejectReason::NoSuchMessage,
    )?;
    refused(
        laptop.mark_read("nowhere", 1).await,
        RejectReason::NoSuchMessage,
    )?;
    refused(laptop.mark_read("vault", 1).await, RejectReason::NotMember)?;
    refused(
        laptop.mark_read("Not A Channel", 1).await,
        RejectReason::InvalidChannel,
    )?;
    wait_listed(&laptop, "general", 8).await?;

    // A mark acknowledged just before the leader dies is on every node after it.
    alice.send_text("general", "m9", None).await?;
    ensure!(laptop.mark_read("general", 9).await? == 9);
    let leader = testkit::leader_index(&cluster, READY).await?;
    cluster.nodes[leader].kill9();
    alice.send_text("general", "m10", None).await?;
    cluster.restart(leader, READY)?;
    let token = alice.read_token().max(laptop.read_token());
    let bob = TestUser::with_seed("bob", bob_seed);
    let addrs = cluster.client_addrs();
    for addr in &addrs {
        let node = TestClient::login_anywhere(*addr, &addrs, &cluster.cluster, &bob, READY).await?;
        let mut ctx = tarpc::context::current();
        ctx.deadline = Instant::now() + Duration::from_secs(20);
        let request = ChannelInfoRequest {
            channel: "general".into(),
            read_token: token,
        };
        let detail = node
            .client
            .channel_info(ctx, request)
            .await?
            .map_err(|e| anyhow::anyhow!("channel_info at {addr}: {e}"))?;
        ensure!(
            detail.info.read_to == 9 && detail.info.head == 10,
            "node at {addr}: read_to {} of head {}",
            detail.info.read_to,
            detail.info.head
        );
    }
    // Another user's marker is their own.
    ensure!(listed(&alice, "general").await? == 0);
    Ok(())
}
