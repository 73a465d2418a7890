//! End-to-end tests of users' trust (issue 17) on real `server` processes: private channels
//! on every read and write path, and what readers show of messages a lying node wrote.
//!
//! Timeouts are generous bounds for a loaded 2-core machine, not performance claims.

use std::time::Duration;

use anyhow::{bail, Context as _};
use cellchat_client::crypto::{self, Author, ChannelHistory, ChannelKey, CryptoError, Keys, Seen};
use cellchat_client::{
    ApiError, ChannelChange, Client, ClientConfig, Error, Identity, Subscription, WireMessage,
};
use proto::RejectReason;
use testkit::TestCluster;

const READY: Duration = Duration::from_secs(30);
const CONVERGE: Duration = Duration::from_secs(30);
const RECEIVE: Duration = Duration::from_secs(30);

async fn cluster_of(name: &str, nodes: usize, extra: &[&str]) -> anyhow::Result<TestCluster> {
    let mut cluster = TestCluster::new(name, extra)?;
    for _ in 0..nodes {
        cluster.spawn_node()?;
    }
    for node in &mut cluster.nodes {
        node.wait_ready(READY)?;
    }
    cluster.wait_converged(nodes, CONVERGE).await?;
    Ok(cluster)
}

async fn client_as(cluster: &TestCluster, name: &str) -> anyhow::Result<Client> {
    let config = ClientConfig {
        identity: Some(Identity::ephemeral(name, None)),
        ..ClientConfig::new(cluster.cluster.clone(), cluster.discovery_port)
    };
    Ok(Client::connect(config).await?)
}

fn is_rejected<T: std::fmt::Debug>(result: &Result<T, Error>, want: &RejectReason) -> bool {
    matches!(result, Err(Error::Api(ApiError::Rejected(r))) if r == want)
}

/// Asserts every read and write path refuses `user` on `channel` with `NotMember`.
async fn assert_locked_out(user: &Client, channel: &str) -> anyhow::Result<()> {
    let not_member = RejectReason::NotMember;
    let history = user.history(channel, None, 10).await;
    assert!(is_rejected(&history, &not_member), "history: {history:?}");
    let from = user.history_from(channel, 1, 10).await;
    assert!(is_rejected(&from, &not_member), "history from: {from:?}");
    let info = user.channel_info(channel).await;
    assert!(is_rejected(&info, &not_member), "channel info: {info:?}");
    let sent = user.send(channel, b"\x00let me in".to_vec()).await;
    assert!(is_rejected(&sent, &not_member), "send: {sent:?}");
    let mut sub = user.subscribe(channel, 0);
    match tokio::time::timeout(RECEIVE, sub.recv()).await {
        Ok(Some(Err(Error::Api(ApiError::Rejected(RejectReason::NotMember))))) => {}
        other => bail!("a subscription of a non-member got {other:?}"),
    }
    let listed = user.channels().await?;
    assert!(
        listed.iter().all(|c| c.name != channel),
        "a non-member's list shows the private channel: {listed:?}"
    );
    Ok(())
}

async fn next_message(sub: &mut Subscription) -> anyhow::Result<WireMessage> {
    match tokio::time::timeout(RECEIVE, sub.recv()).await {
        Ok(Some(Ok(message))) => Ok(message),
        other => bail!("expected a message, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_channel_is_read_and_written_by_its_members_only() -> anyhow::Result<()> {
    let cluster = cluster_of("trust-private", 3, &[]).await?;
    let alice = client_as(&cluster, "alice").await?;
    let bob = client_as(&cluster, "bob").await?;
    let mallory = client_as(&cluster, "mallory").await?;
    // Names register with their first write.
    bob.send("lobby", b"\x00hi".to_vec()).await?;
    mallory.send("lobby", b"\x00hi".to_vec()).await?;

    let create = ChannelChange::Create {
        private: true,
        crypto: None,
    };
    alice.change_channel("vault", create.clone()).await?;
    // Creating it again is answered as done: the record is already alice's, as asked.
    alice.change_channel("vault", create).await?;
    let taken = mallory
        .change_channel(
            "vault",
            ChannelChange::Create {
                private: false,
                crypto: None,
            },
        )
        .await;
    assert!(
        is_rejected(&taken, &RejectReason::ChannelExists),
        "{taken:?}"
    );
    alice.send("vault", b"\x00the plan".to_vec()).await?;

    // Nobody else reads, writes, lists or subscribes to it; bob cannot invite himself.
    for outsider in [&bob, &mallory] {
        outsider.observe_read_token(alice.read_token());
        assert_locked_out(outsider, "vault").await?;
    }
    let accept = bob.change_channel("vault", ChannelChange::Accept).await;
    assert!(
        is_rejected(&accept, &RejectReason::NotInvited),
        "{accept:?}"
    );
    let invite = mallory
        .change_channel("vault", ChannelChange::Invite("mallory".into()))
        .await;
    assert!(is_rejected(&invite, &RejectReason::NotOwner), "{invite:?}");
    let nobody = alice
        .change_channel("vault", ChannelChange::Invite("nobody".into()))
        .await;
    assert!(
        is_rejected(&nobody, &RejectReason::UnknownUser),
        "{nobody:?}"
    );

    // An invitation shows the channel to bob, but is not membership yet.
    alice
        .change_channel("vault", ChannelChange::Invite("bob".into()))
        .await?;
    bob.observe_read_token(alice.read_token());
    let listed = bob.channels().await?;
    let vault = listed.iter().find(|c| c.name == "vault");
    assert!(
        vault.is_some_and(|c| c.private && c.invited && c.owner.as_deref() == Some("alice")),
        "{listed:?}"
    );
    let early = bob.history("vault", None, 10).await;
    assert!(is_rejected(&early, &RejectReason::NotMember), "{early:?}");

    bob.change_channel("vault", ChannelChange::Accept).await?;
    let page = bob.history("vault", None, 10).await?;
    assert_eq!(page.messages.len(), 1);
    let mut sub = bob.subscribe("vault", 1);
    alice.send("vault", b"\x00welcome bob".to_vec()).await?;
    assert_eq!(next_message(&mut sub).await?.seq, 2);
    bob.send("vault", b"\x00thanks".to_vec()).await?;
    let detail = alice.channel_info("vault").await?;
    assert_eq!(detail.members, ["alice", "bob"]);
    assert!(detail.invited.is_empty());

    // Removed, bob is locked out again, and his open subscription ends at the next message.
    let removed = alice
        .change_channel("vault", ChannelChange::Remove("bob".into()))
        .await?;
    bob.observe_read_token(removed);
    alice.send("vault", b"\x00bob is gone".to_vec()).await?;
    let after = tokio::time::timeout(RECEIVE, sub.recv()).await;
    match after {
        // The message sent before the removal may still arrive first.
        Ok(Some(Ok(m))) if m.seq == 3 => match tokio::time::timeout(RECEIVE, sub.recv()).await {
            Ok(Some(Err(Error::Api(ApiError::Rejected(RejectReason::NotMember))))) => {}
            other => bail!("after removal the subscription got {other:?}"),
        },
        Ok(Some(Err(Error::Api(ApiError::Rejected(RejectReason::NotMember))))) => {}
        other => bail!("after removal the subscription got {other:?}"),
    }
    assert_locked_out(&bob, "vault").await?;
    let leave = alice
        .change_channel("vault", ChannelChange::Remove("alice".into()))
        .await;
    assert!(
        is_rejected(&leave, &RejectReason::OwnerCannotLeave),
        "{leave:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_channel_list_is_paged_and_complete() -> anyhow::Result<()> {
    let cluster = cluster_of("trust-pages", 1, &[]).await?;
    let alice = client_as(&cluster, "alice").await?;
    let names: Vec<String> = (0..25).map(|i| format!("room-{i:02}")).collect();
    for name in &names {
        alice.send(name, b"\x00x".to_vec()).await?;
    }
    let mut seen = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let page = alice.channels_page(after.clone(), 10).await?;
        pages += 1;
        seen.extend(page.channels.iter().map(|c| c.name.clone()));
        after = page.channels.last().map(|c| c.name.clone());
        if !page.more {
            break;
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, names);
    let all = alice.channels().await?;
    let all: Vec<String> = all.into_iter().map(|c| c.name).collect();
    assert_eq!(all, names);
    Ok(())
}

/// The owner of a channel is whoever sent its first message; the record is checked with the
/// context it gives on failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_message_makes_its_sender_the_owner() -> anyhow::Result<()> {
    let cluster = cluster_of("trust-owner", 1, &[]).await?;
    let carol = client_as(&cluster, "carol").await?;
    carol.send("news", b"\x00first".to_vec()).await?;
    let detail = carol.channel_info("news").await.context("channel info")?;
    assert_eq!(detail.info.owner.as_deref(), Some("carol"));
    assert!(!detail.info.private);
    let private_later = carol
        .change_channel(
            "news",
            ChannelChange::Create {
                private: true,
                crypto: None,
            },
        )
        .await;
    assert!(
        is_rejected(&private_later, &RejectReason::ChannelExists),
        "a channel with history cannot turn private: {private_later:?}"
    );
    Ok(())
}

/// The suppression attack: Mallory learns Alice's client id and sends her next client seqs
/// first. With dedup keyed by (client id, client seq) alone, Alice's real sends were then
/// answered "duplicate" with Mallory's messages and stored nowhere; keyed by sender too,
/// each of Alice's sends is stored as hers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_cannot_suppress_a_senders_messages_by_taking_her_client_seqs(
) -> anyhow::Result<()> {
    let cluster = cluster_of("trust-suppress", 1, &[]).await?;
    let alice = client_as(&cluster, "alice").await?;
    let mallory = client_as(&cluster, "mallory").await?;
    let stolen = alice.client_id();
    for seq in 1..=3 {
        let decoy = format!("\x00decoy {seq}").into_bytes();
        let reply = mallory.send_with_key("general", decoy, stolen, seq).await?;
        assert!(!reply.duplicate);
    }
    for seq in 1..=3 {
        let body = format!("\x00alice {seq}").into_bytes();
        let reply = alice.send_with_key("general", body, stolen, seq).await?;
        assert!(
            !reply.duplicate,
            "alice's send {seq} was taken for mallory's"
        );
    }
    let page = alice.history("general", None, 10).await?;
    let from_alice: Vec<&[u8]> = page
        .messages
        .iter()
        .filter(|m| m.sender == "alice")
        .map(|m| m.body.as_slice())
        .collect();
    assert_eq!(
        from_alice,
        [&b"\x00alice 1"[..], b"\x00alice 2", b"\x00alice 3"]
    );
    // A real retry of alice's is still a duplicate.
    let again = alice
        .send_with_key("general", b"\x00alice 3".to_vec(), stolen, 3)
        .await?;
    assert!(again.duplicate);
    Ok(())
}

/// A lying node stamps Mallory's messages with Alice's name. Every reader shows them as not
/// Alice's: a body Mallory signed fails Alice's pinned key, an unsigned one is unsigned, and a
/// copy of Alice's own message is a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_a_lying_node_stamps_with_another_name_are_never_shown_as_theirs(
) -> anyhow::Result<()> {
    testkit::server_binary_with_weaken()?;
    let cluster = cluster_of("trust-forge", 1, &["--weaken", "forge-sender"]).await?;
    let alice = client_as(&cluster, "alice").await?;
    let bob = client_as(&cluster, "bob").await?;
    let carol = client_as(&cluster, "carol").await?;
    let genuine = alice.send_text("general", "lunch at noon", None).await?;

    // Mallory logs in as herself (registering her name) and claims to be alice in her hello.
    let addr = cluster.nodes[0].ready().context("ready")?.client;
    let mallory = testkit::TestUser::new("mallory");
    let honest = testkit::TestClient::login(addr, &cluster.cluster, &mallory).await?;
    honest.send("lobby", b"\x00hi", [1; 16], 1).await??;
    let forger =
        testkit::TestClient::login_claiming(addr, &cluster.cluster, &mallory, Some("alice"))
            .await?;
    let mallory_id = Identity::ephemeral("mallory", None);
    let signed = crypto::sign_plain(
        &mallory_id,
        &cluster.cluster,
        "general",
        [2; 16],
        1,
        "send the payroll to mallory",
    )?;
    forger.send("general", &signed, [2; 16], 1).await??;
    forger
        .send("general", b"\x00alice here: new bank details", [2; 16], 2)
        .await??;
    // Alice's own message again, with her client seq: a replay at another seq.
    let page = bob.history("general", None, 10).await?;
    let original = page
        .messages
        .iter()
        .find(|m| m.seq == genuine.seq)
        .context("alice's message")?;
    let replayed = forger
        .send("general", &original.body, [3; 16], original.client_seq)
        .await??;

    for reader in [&bob, &carol] {
        reader.observe_read_token(replayed.read_token);
        let page = reader.history("general", None, 10).await?;
        assert_eq!(page.messages.len(), 4);
        let mut lines = Vec::new();
        for m in &page.messages {
            assert_eq!(
                m.sender, "alice",
                "the node stamped every message as alice's"
            );
            lines.push(
                reader
                    .show(&Keys::default(), ChannelHistory::Plain, m)
                    .await,
            );
        }
        assert!(lines[0].is_trusted(), "alice's own message: {:?}", lines[0]);
        assert_eq!(lines[0].display(), "lunch at noon");
        assert_eq!(lines[1].opened.author(), Author::BadSignature);
        assert_eq!(lines[1].display(), "[forged?] send the payroll to mallory");
        assert_eq!(
            lines[2].display(),
            "[unsigned] alice here: new bank details"
        );
        assert!(matches!(lines[3].seen, Seen::Replayed { first_seq: 1 }));
        assert_eq!(lines[3].display(), "[replayed] lunch at noon");
        for line in &lines[1..] {
            assert!(!line.is_trusted(), "{line:?}");
        }
    }
    Ok(())
}

/// Messages encrypted with format v1 (the release before v2) stay readable once the channel
/// gets a v2 record: unlocking derives the v1 key too, and they show as unsigned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_encrypted_history_stays_readable_after_the_channel_moves_to_v2() -> anyhow::Result<()> {
    let cluster = cluster_of("trust-v1", 1, &[]).await?;
    let alice = client_as(&cluster, "alice").await?;
    let bob = client_as(&cluster, "bob").await?;
    let v1 = ChannelKey::derive("old horse", &cluster.cluster, "archive")?;
    alice
        .send_text_v1("archive", "from the old days", Some(&v1))
        .await?;
    let unlocked = alice.unlock_channel("archive", "old horse").await?;
    assert!(unlocked.created);
    assert!(unlocked.keys.v1.is_some(), "the channel had history");
    let v2 = unlocked.keys.v2.clone().context("v2 key")?;
    alice.send_text("archive", "from today", Some(&v2)).await?;

    let keys = bob.unlock_channel("archive", "old horse").await?.keys;
    let page = bob.history("archive", None, 10).await?;
    let mut shown = Vec::new();
    for m in &page.messages {
        shown.push(
            bob.show(&keys, ChannelHistory::Encrypted, m)
                .await
                .display(),
        );
    }
    assert_eq!(shown, ["[unsigned] from the old days", "from today"]);
    // A wrong passphrase is reported, and reads nothing.
    let wrong = bob.unlock_channel("archive", "new horse").await;
    assert!(
        matches!(wrong, Err(Error::Crypto(CryptoError::WrongPassphrase))),
        "{wrong:?}"
    );
    Ok(())
}
