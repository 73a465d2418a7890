//! End-to-end tests of direct conversations on real `server` processes: one is found by its
//! members' names, created on first use and encrypted to their registered keys; only members
//! read or write it; the other member hears of it at once; its name cannot be squatted; a
//! conversation with an unknown user is refused and changes nothing; the CLI reaches it as
//! `--channel @name`.
//!
//! Timeouts are generous bounds for a loaded 2-core machine, not performance claims.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use cellchat_client::crypto::{ChannelHistory, Content};
use cellchat_client::{
    ApiError, ChannelChange, Client, ClientConfig, Ephemeral, Error, Identity, SenderKey,
};
use proto::RejectReason;
use testkit::TestCluster;

const READY: Duration = Duration::from_secs(60);
const CONVERGE: Duration = Duration::from_secs(60);
const HEAR: Duration = Duration::from_secs(15);

fn rejected(result: Result<impl std::fmt::Debug, Error>) -> RejectReason {
    match result {
        Err(Error::Api(ApiError::Rejected(reason))) => reason,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

/// Waits until `client` can see `names` registered.
async fn registered(client: &Client, names: &[&str]) -> anyhow::Result<()> {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let asked: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let keys = client.user_keys(&asked).await?;
        if keys.iter().all(|k| k.public_key.is_some()) {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "not registered: {keys:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `heard` gives an event `wanted` accepts; `what` names it in the error.
async fn hears(
    heard: &mut tokio::sync::broadcast::Receiver<Ephemeral>,
    what: &str,
    wanted: impl Fn(&Ephemeral) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + HEAR;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, heard.recv()).await {
            Ok(Ok(event)) if wanted(&event) => return Ok(()),
            Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(e)) => bail!("events: {e}"),
            Err(_) => bail!("never heard {what}"),
        }
    }
}

/// Waits until `heard` tells that someone added its client to `channel`.
async fn hears_added(
    heard: &mut tokio::sync::broadcast::Receiver<Ephemeral>,
    channel: &str,
) -> anyhow::Result<()> {
    let what = format!("of being added to {channel}");
    hears(
        heard,
        &what,
        |e| matches!(e, Ephemeral::Added { channel: c } if c == channel),
    )
    .await
}

/// The text `client` reads at `seq` of `channel` with `keys`, checked as signed by `sender`.
async fn read_text(
    client: &Client,
    keys: &cellchat_client::crypto::Keys,
    channel: &str,
    seq: u64,
) -> anyhow::Result<(String, String)> {
    // Another member's message reaches the node this client reads from once that node applied
    // it (a read token covers only the client's own writes), so look again for a while.
    let deadline = Instant::now() + HEAR;
    let message = loop {
        let page = client.history(channel, None, 100).await?;
        if let Some(message) = page.messages.into_iter().find(|m| m.seq == seq) {
            break message;
        }
        ensure!(Instant::now() < deadline, "no #{seq} in {channel}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let message = &message;
    let shown = client.show(keys, ChannelHistory::Encrypted, message).await;
    ensure!(
        shown.opened.is_encrypted(),
        "a direct message travels encrypted"
    );
    ensure!(
        shown.opened.verified_text().is_some(),
        "not verified: {:?}",
        shown.opened
    );
    match shown.opened.content() {
        Content::Clear(text) => Ok((message.sender.clone(), text.clone())),
        other => bail!("unreadable: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_meet_by_name_and_nobody_else_reads_or_squats() -> anyhow::Result<()> {
    let mut cluster = TestCluster::new("direct", &[])?;
    testkit::start_nodes(&mut cluster, 3, READY, CONVERGE).await?;
    let connect = |name: &str| ClientConfig {
        identity: Some(Identity::ephemeral(name, None)),
        ..ClientConfig::new(cluster.cluster.clone(), cluster.discovery_port)
    };
    let alice = Client::connect(connect("alice")).await?;
    let bob = Client::connect(connect("bob")).await?;
    let carol = Client::connect(connect("carol")).await?;
    // A name registers with its first message.
    for client in [&alice, &bob, &carol] {
        client.send_text("general", "hi all", None).await?;
    }
    registered(&alice, &["alice", "bob", "carol"]).await?;
    // Bob listens for news the way the chat clients do: presence on his push connection.
    let _bob_sub = bob.subscribe("general", 0);
    let mut bob_heard = bob.ephemeral();
    // His push connection is live once it gave him the first list of who is online.
    let presence = |e: &Ephemeral| matches!(e, Ephemeral::Presence { full: true, .. });
    hears(
        &mut bob_heard,
        "bob's first list of who is online",
        presence,
    )
    .await?;

    // A conversation with an unknown user is refused and creates nothing.
    let ghost = proto::direct_channel_name(&["alice", "nobody"]);
    assert_eq!(
        rejected(alice.open_direct(&["nobody".into()]).await),
        RejectReason::UnknownUser
    );
    let detail = alice.channel_info(&ghost).await?;
    assert!(detail.crypto.is_none() && detail.members.is_empty() && detail.info.head == 0);
    assert_eq!(
        rejected(alice.open_direct_channel(&ghost).await),
        RejectReason::NotMember,
        "no such conversation"
    );

    // Alice starts it; the name is the one both compute.
    let dm = (alice.open_direct(&["bob".into()]).await).context("alice opens it")?;
    assert!(dm.created);
    assert_eq!(dm.channel, proto::direct_channel_name(&["bob", "alice"]));
    assert_eq!(dm.members, ["alice", "bob"]);
    let key = dm
        .keys
        .v2
        .as_ref()
        .context("a direct conversation has a key")?;
    let sent = alice.send_text(&dm.channel, "psst, bob", Some(key)).await?;

    // Bob hears of it at once, opens it by its channel name on whichever node he reads from,
    // and reads her message.
    hears_added(&mut bob_heard, &dm.channel).await?;
    let bobs = (bob.open_direct_channel(&dm.channel).await).context("bob opens it by name")?;
    assert!(!bobs.created);
    assert_eq!(
        read_text(&bob, &bobs.keys, &dm.channel, sent.seq).await?,
        ("alice".to_owned(), "psst, bob".to_owned())
    );
    // His answer, through the same name from his side, reaches her.
    let again = (bob.open_direct(&["alice".into()]).await).context("bob opens it")?;
    assert_eq!(again.channel, dm.channel);
    let answer = bob
        .send_text(&dm.channel, "got it", again.keys.v2.as_ref())
        .await?;
    assert_eq!(
        read_text(&alice, &dm.keys, &dm.channel, answer.seq).await?,
        ("bob".to_owned(), "got it".to_owned())
    );
    // Both list it with its members; carol does not see it.
    for client in [&alice, &bob] {
        let listed = client.channels().await?;
        let entry = (listed.iter())
            .find(|c| c.name == dm.channel)
            .context("listed")?;
        assert_eq!(entry.direct, ["alice", "bob"]);
        assert!(entry.private && entry.encrypted);
    }
    assert!(!carol.channels().await?.iter().any(|c| c.name == dm.channel));

    // Carol can neither read, write, open nor change it.
    assert_eq!(
        rejected(carol.history(&dm.channel, None, 10).await),
        RejectReason::NotMember
    );
    assert_eq!(
        rejected(carol.send_text(&dm.channel, "let me in", None).await),
        RejectReason::NotMember
    );
    assert_eq!(
        rejected(carol.open_direct_channel(&dm.channel).await),
        RejectReason::NotMember
    );
    assert_eq!(
        rejected(
            alice
                .change_channel(&dm.channel, ChannelChange::Invite("carol".into()))
                .await
        ),
        RejectReason::DirectChannel,
        "members never change"
    );
    // Nor can she squat the name of a conversation not started yet.
    let alice_carol = proto::direct_channel_name(&["alice", "carol"]);
    assert_eq!(
        rejected(carol.send_text(&alice_carol, "mine now", None).await),
        RejectReason::DirectChannel
    );
    let create = ChannelChange::Create {
        private: false,
        crypto: None,
    };
    assert_eq!(
        rejected(carol.change_channel(&alice_carol, create).await),
        RejectReason::DirectChannel
    );
    // A conversation named after other members is refused.
    let wrong = ChannelChange::CreateDirect {
        members: vec!["alice".into(), "carol".into()],
        crypto: vec![3; 100],
    };
    assert_eq!(
        rejected(carol.change_channel(&dm.channel, wrong).await),
        RejectReason::InvalidDirect
    );

    // A group of three: each member opens the same key.
    let group = carol.open_direct(&["alice".into(), "bob".into()]).await?;
    assert_eq!(group.members, ["alice", "bob", "carol"]);
    let hello = carol
        .send_text(&group.channel, "hello both", group.keys.v2.as_ref())
        .await?;
    // Bob hears of it; alice, who does not watch, is handed carol's read token with the name,
    // as a link from another session would carry it. Either way their next read may go to a
    // node other than carol's.
    hears_added(&mut bob_heard, &group.channel).await?;
    alice.observe_read_token(carol.read_token());
    for client in [&alice, &bob] {
        let opened = client.open_direct_channel(&group.channel).await?;
        assert_eq!(
            read_text(client, &opened.keys, &group.channel, hello.seq).await?,
            ("carol".to_owned(), "hello both".to_owned())
        );
    }
    // Every member's key was pinned on the way.
    assert!(matches!(
        alice.sender_key("carol").await,
        SenderKey::Pinned(_)
    ));
    Ok(())
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

fn run(command: &mut Command) -> anyhow::Result<String> {
    let output = command.output().context("running cellchat")?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    ensure!(
        output.status.success(),
        "cellchat failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_reaches_a_conversation_as_at_name() -> anyhow::Result<()> {
    let mut cluster = TestCluster::new("direct-cli", &[])?;
    testkit::start_nodes(&mut cluster, 3, READY, CONVERGE).await?;
    let dir = tempfile::tempdir()?;
    // Each user registers with a first message.
    for name in ["alice", "bob"] {
        run(cli(&cluster, dir.path())?.args([name, "--send", "here"]))?;
    }
    let sent =
        run(cli(&cluster, dir.path())?.args(["alice", "--channel", "@bob", "--send", "just us"]))?;
    let channel = proto::direct_channel_name(&["alice", "bob"]);
    ensure!(sent.contains(&format!("sent #{channel} seq 1")), "{sent}");
    let read = run(cli(&cluster, dir.path())?.args([
        "bob",
        "--channel",
        "@alice",
        "--history",
        "5",
        "--json",
    ]))?;
    let line: serde_json::Value = serde_json::from_str(read.lines().next().context("a line")?)?;
    assert_eq!(line["text"], "just us", "{read}");
    assert_eq!(line["sender"], "alice");
    let listed = run(cli(&cluster, dir.path())?.args(["bob", "--channels"]))?;
    ensure!(
        listed.contains("@alice 1 messages") && listed.contains("--channel @alice"),
        "{listed}"
    );
    let json = run(cli(&cluster, dir.path())?.args(["bob", "--channels", "--json"]))?;
    ensure!(json.contains(r#""direct":["alice","bob"]"#), "{json}");
    // A conversation with an unknown user fails with the reason, and nothing is sent.
    let output = cli(&cluster, dir.path())?
        .args(["alice", "--channel", "@nobody", "--send", "hello?"])
        .output()?;
    ensure!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(stderr.contains("no user of that name"), "{stderr}");
    Ok(())
}
