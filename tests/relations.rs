//! End-to-end tests of replies, edits, deletes and reactions on real `server` processes: a
//! storm of them through a kill -9 of the leader ends in the same state on every node, the
//! state the acknowledged operations say; the bad inputs of the issue are refused with their
//! own errors and change nothing.
//!
//! Timeouts are generous bounds for a loaded 2-core machine, not performance claims.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use cellchat_client::crypto::{ChannelHistory, Content, Keys};
use cellchat_client::{ApiError, Client, ClientConfig, Error, Identity, Relation, WireMessage};
use proto::{HistoryRequest, RejectReason};
use testkit::{TestClient, TestCluster, TestUser};

const READY: Duration = Duration::from_secs(60);
const CONVERGE: Duration = Duration::from_secs(60);
const MESSAGES: u64 = 12;

async fn connect(cluster: &TestCluster, name: &str) -> anyhow::Result<Client> {
    let config = ClientConfig {
        identity: Some(Identity::ephemeral(name, None)),
        ..ClientConfig::new(cluster.cluster.clone(), cluster.discovery_port)
    };
    Ok(Client::connect(config).await?)
}

fn react(to: u64, on: bool) -> Relation {
    Relation::React {
        to,
        emoji: "👍".into(),
        on,
    }
}

/// Every message of `channel` as one node serves it once it applied `read_token`.
async fn all_at(
    node: &TestClient,
    channel: &str,
    read_token: u64,
) -> anyhow::Result<Vec<WireMessage>> {
    let mut ctx = tarpc::context::current();
    ctx.deadline = Instant::now() + Duration::from_secs(20);
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
    Ok(batch.messages)
}

/// The text a reader shows for `message` (the newest edit's, when it has one).
async fn text_of(client: &Client, message: &WireMessage) -> String {
    let shown = client
        .show(&Keys::default(), ChannelHistory::Plain, message)
        .await;
    match shown.opened.content() {
        Content::Clear(text) => text.clone(),
        other => format!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_edit_delete_and_reaction_storm_through_a_leader_kill_converges_on_every_node(
) -> anyhow::Result<()> {
    let mut cluster = TestCluster::new("relations", &[])?;
    testkit::start_nodes(&mut cluster, 3, READY, CONVERGE).await?;
    let alice = connect(&cluster, "alice").await?;
    let bob = connect(&cluster, "bob").await?;
    for n in 1..=MESSAGES {
        let sent = alice.send_text("storm", &format!("m{n}"), None).await?;
        ensure!(sent.seq == n, "message {n} got seq {}", sent.seq);
    }

    // Alice edits every message twice and deletes every third; Bob reacts to each message,
    // takes back the reactions to even ones, and replies to the first four. Each user's
    // operations run in order, the two users side by side, while the leader is killed.
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let alice_ops = {
        let alice = alice.clone();
        tokio::spawn(async move {
            let mut outcomes = Vec::new();
            let mut started_tx = Some(started_tx);
            for round in 1..=2 {
                for n in 1..=MESSAGES {
                    if n == 4 {
                        // The leader is killed now, with most of the storm still to come.
                        if let Some(tx) = started_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    let text = format!("m{n} v{round}");
                    let edit = Relation::Edit { of: n };
                    outcomes.push((
                        edit.clone(),
                        alice.send_related("storm", &text, None, edit).await,
                    ));
                }
            }
            for n in (3..=MESSAGES).step_by(3) {
                let delete = Relation::Delete { of: n };
                outcomes.push((
                    delete.clone(),
                    alice.send_related("storm", "", None, delete).await,
                ));
            }
            outcomes
        })
    };
    let bob_ops = {
        let bob = bob.clone();
        tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for n in 1..=MESSAGES {
                outcomes.push((
                    react(n, true),
                    bob.send_related("storm", "", None, react(n, true)).await,
                ));
            }
            for n in (2..=MESSAGES).step_by(2) {
                outcomes.push((
                    react(n, false),
                    bob.send_related("storm", "", None, react(n, false)).await,
                ));
            }
            for n in 1..=4 {
                let reply = Relation::Reply { to: n };
                let text = format!("re m{n}");
                outcomes.push((
                    reply.clone(),
                    bob.send_related("storm", &text, None, reply).await,
                ));
            }
            outcomes
        })
    };
    let leader = testkit::leader_index(&cluster, READY).await?;
    started
        .await
        .context("alice's operations ended before they started")?;
    cluster.nodes[leader].kill9();
    let alice_outcomes = tokio::time::timeout(Duration::from_secs(120), alice_ops)
        .await
        .context("alice's operations stalled")??;
    let bob_outcomes = tokio::time::timeout(Duration::from_secs(120), bob_ops)
        .await
        .context("bob's operations stalled")??;
    cluster.restart(leader, READY)?;

    // Every operation is acknowledged exactly once; the only refusals allowed are reactions
    // and replies that came after their message's delete.
    let mut token = 0;
    let mut deleted = BTreeSet::new();
    for (relation, outcome) in alice_outcomes {
        let sent = outcome.with_context(|| format!("alice's {relation:?} failed"))?;
        token = token.max(sent.read_token);
        if let Relation::Delete { of } = relation {
            deleted.insert(of);
        }
    }
    let mut reactions: BTreeMap<u64, bool> = BTreeMap::new();
    let mut replies: BTreeMap<u64, u64> = BTreeMap::new();
    for (relation, outcome) in bob_outcomes {
        match outcome {
            Ok(sent) => {
                token = token.max(sent.read_token);
                match relation {
                    Relation::React { to, on, .. } => {
                        reactions.insert(to, on);
                    }
                    Relation::Reply { to } => *replies.entry(to).or_default() += 1,
                    _ => unreachable!("bob only reacts and replies"),
                }
            }
            Err(Error::Api(ApiError::Rejected(RejectReason::MessageDeleted)))
                if deleted.contains(&relation.target()) => {}
            Err(e) => return Err(e).with_context(|| format!("bob's {relation:?} failed")),
        }
    }

    // Every node serves the same messages, metas and bodies.
    let reader = TestUser::new("reader");
    let addrs = cluster.client_addrs();
    let mut served: Vec<Vec<WireMessage>> = Vec::new();
    for addr in &addrs {
        let node =
            TestClient::login_anywhere(*addr, &addrs, &cluster.cluster, &reader, READY).await?;
        served.push(all_at(&node, "storm", token).await?);
    }
    for (other, addr) in served.iter().zip(&addrs).skip(1) {
        ensure!(
            *other == served[0],
            "node at {addr} serves another channel than the node at {}",
            addrs[0]
        );
    }
    let messages = &served[0];

    // ... and it is the state the acknowledged operations say.
    for n in 1..=MESSAGES {
        let m = &messages[n as usize - 1];
        ensure!(m.seq == n && m.relation.is_none(), "seq {n}: {m:?}");
        if deleted.contains(&n) {
            ensure!(
                m.deleted && m.body.is_empty() && m.edit.is_none() && m.reactions.is_empty(),
                "deleted message {n} still shows something: {m:?}"
            );
            continue;
        }
        ensure!(!m.deleted && m.edits == 2, "message {n}: {m:?}");
        let text = text_of(&alice, m).await;
        ensure!(text == format!("m{n} v2"), "message {n} reads {text:?}");
        let reacted = reactions.get(&n).copied().unwrap_or(false);
        let want: Vec<proto::Reaction> = if reacted {
            vec![proto::Reaction {
                emoji: "👍".into(),
                users: vec!["bob".into()],
            }]
        } else {
            Vec::new()
        };
        ensure!(
            m.reactions == want,
            "message {n} reactions {:?}",
            m.reactions
        );
        let want_replies = replies.get(&n).copied().unwrap_or(0);
        ensure!(
            m.replies == want_replies,
            "message {n}: {} replies",
            m.replies
        );
    }
    // The edits of a deleted message lost their bodies too.
    for m in messages.iter().skip(MESSAGES as usize) {
        if let Some(Relation::Edit { of }) = m.relation {
            ensure!(
                m.deleted == deleted.contains(&of) && m.body.is_empty() == m.deleted,
                "edit #{} of #{of}: deleted {}, {} bytes",
                m.seq,
                m.deleted,
                m.body.len()
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_relations_are_refused_with_their_own_errors_and_change_nothing() -> anyhow::Result<()>
{
    let mut cluster = TestCluster::new("relations-bad", &[])?;
    testkit::start_nodes(&mut cluster, 3, READY, CONVERGE).await?;
    let alice = connect(&cluster, "alice").await?;
    let bob = connect(&cluster, "bob").await?;
    alice.send_text("general", "hello", None).await?;
    bob.send_text("other", "elsewhere", None).await?;
    let refused = |outcome: Result<proto::SendReply, Error>, want: RejectReason| match outcome {
        Err(Error::Api(ApiError::Rejected(reason))) if reason == want => Ok(()),
        other => Err(anyhow::anyhow!("expected {want:?}, got {other:?}")),
    };
    // Someone else's message cannot be edited or deleted.
    let edit = Relation::Edit { of: 1 };
    refused(
        bob.send_related("general", "hijacked", None, edit).await,
        RejectReason::NotSender,
    )?;
    let delete = Relation::Delete { of: 1 };
    refused(
        bob.send_related("general", "", None, delete).await,
        RejectReason::NotSender,
    )?;
    // A reaction to a message that does not exist; a reply "into another channel" (seq 2
    // exists only in #other, so in #general it names nothing).
    refused(
        bob.send_related("general", "", None, react(7, true)).await,
        RejectReason::NoSuchMessage,
    )?;
    refused(
        bob.send_related("general", "hm", None, Relation::Reply { to: 2 })
            .await,
        RejectReason::NoSuchMessage,
    )?;
    let bad_emoji = Relation::React {
        to: 1,
        emoji: "two words".into(),
        on: true,
    };
    refused(
        bob.send_related("general", "", None, bad_emoji).await,
        RejectReason::InvalidReaction,
    )?;
    refused(
        bob.send_related("general", "", None, react(1, false)).await,
        RejectReason::NotReacted,
    )?;
    bob.send_related("general", "", None, react(1, true))
        .await?;
    refused(
        bob.send_related("general", "", None, react(1, true)).await,
        RejectReason::AlreadyReacted,
    )?;
    // A reaction is not a message: it cannot be edited or reacted to.
    refused(
        bob.send_related("general", "", None, react(2, true)).await,
        RejectReason::NotATarget,
    )?;

    // Nothing refused took a seq or changed the message.
    let page = alice.recent("general", 100).await?;
    ensure!(page.head == 2, "head {} after one reaction", page.head);
    let first = &page.messages[0];
    ensure!(
        first.edits == 0 && !first.deleted && first.replies == 0,
        "{first:?}"
    );
    ensure!(text_of(&alice, first).await == "hello");

    // The channel's topic: only its owner sets it, every reader sees it.
    let set = |topic: &str| proto::ChannelChange::SetTopic(Some(topic.to_owned()));
    let by_bob = bob.change_channel("general", set("bob's now")).await;
    ensure!(
        matches!(
            by_bob,
            Err(Error::Api(ApiError::Rejected(RejectReason::NotOwner)))
        ),
        "bob set alice's topic: {by_bob:?}"
    );
    let long = alice.change_channel("general", set(&"x".repeat(300))).await;
    ensure!(
        matches!(
            long,
            Err(Error::Api(ApiError::Rejected(RejectReason::InvalidTopic)))
        ),
        "a 300-byte topic: {long:?}"
    );
    alice
        .change_channel("general", set("release 1.2: freeze on Friday"))
        .await?;
    let detail = bob.channel_info("general").await?;
    ensure!(
        detail.topic.as_deref() == Some("release 1.2: freeze on Friday"),
        "{detail:?}"
    );

    // A thread: message 1 and its replies, whatever lies between them.
    for (n, text) in ["first answer", "second answer"].into_iter().enumerate() {
        bob.send_text("general", &format!("noise {n}"), None)
            .await?;
        bob.send_related("general", text, None, Relation::Reply { to: 1 })
            .await?;
    }
    // Alice reads at least what Bob wrote (read-your-writes is per client).
    alice.observe_read_token(bob.read_token());
    let thread = alice.thread("general", 1).await?;
    ensure!(thread.complete && thread.target.replies == 2, "{thread:?}");
    let mut texts = Vec::new();
    for reply in &thread.replies {
        texts.push(text_of(&alice, reply).await);
    }
    ensure!(texts == ["first answer", "second answer"], "{texts:?}");
    let missing = alice.thread("general", 99).await;
    ensure!(
        matches!(
            missing,
            Err(Error::Api(ApiError::Rejected(RejectReason::NoSuchMessage)))
        ),
        "a thread of nothing: {missing:?}"
    );
    Ok(())
}
