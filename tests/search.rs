//! End-to-end tests of search on real `server` processes: a node's index finds what a client
//! just sent (read-your-writes through the read token), follows edits and deletes, never
//! shows a private channel to a non-member, is rebuilt by a node restarted after kill -9, and
//! refuses bad queries with a clear error; an encrypted conversation is searched on the
//! client, never on the nodes; the CLI's `--search` does both.
//!
//! Timeouts are generous bounds for a loaded 2-core machine, not performance claims.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use cellchat_client::{ApiError, ChannelChange, Client, ClientConfig, Error, Identity, Relation};
use proto::search::QueryError;
use proto::{RejectReason, SearchRequest};
use testkit::{TestClient, TestCluster, TestUser};

const READY: Duration = Duration::from_secs(60);
const CONVERGE: Duration = Duration::from_secs(60);

/// `(channel, seq, shown text)` of each message a search found, newest first.
async fn found(client: &Client, query: &str) -> anyhow::Result<Vec<(String, u64, String)>> {
    let reply = client.search(query, 100).await?;
    Ok(reply
        .messages
        .iter()
        .map(|m| {
            let body = m.edit.as_ref().map_or(&m.body, |e| &e.body);
            let text = proto::search::plaintext_of(body).unwrap_or("?").to_owned();
            (m.channel.clone(), m.seq, text)
        })
        .collect())
}

fn ctx() -> tarpc::context::Context {
    let mut ctx = tarpc::context::current();
    ctx.deadline = Instant::now() + Duration::from_secs(30);
    ctx
}

fn bad_query(result: Result<impl std::fmt::Debug, Error>) -> QueryError {
    match result {
        Err(Error::Api(ApiError::Rejected(RejectReason::BadQuery(e)))) => e,
        other => panic!("expected a bad query, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_index_follows_sends_edits_deletes_and_members_across_a_restart() -> anyhow::Result<()>
{
    let mut cluster = TestCluster::new("search", &[])?;
    testkit::start_nodes(&mut cluster, 3, READY, CONVERGE).await?;
    let connect = |name: &str, seed: [u8; 32]| ClientConfig {
        identity: Some(Identity::ephemeral(name, Some(seed))),
        ..ClientConfig::new(cluster.cluster.clone(), cluster.discovery_port)
    };
    let (alice_seed, bob_seed) = (rand::random(), rand::random());
    let alice = Client::connect(connect("alice", alice_seed)).await?;
    let bob = Client::connect(connect("bob", bob_seed)).await?;

    let deploy = alice
        .send_text("general", "Deploy the API tonight", None)
        .await?;
    // Read-your-writes: the search right after the send finds it, on whichever node answers.
    assert_eq!(
        found(&alice, "deploy").await?,
        [(
            "general".into(),
            deploy.seq,
            "Deploy the API tonight".into()
        )]
    );
    let lunch = alice.send_text("general", "lunch at noon?", None).await?;
    let deployed = bob.send_text("ops", "deployed, all green", None).await?;
    bob.change_channel(
        "vault",
        ChannelChange::Create {
            private: true,
            crypto: None,
        },
    )
    .await?;
    let secret = bob
        .send_text("vault", "deploy the secret plan", None)
        .await?;

    // Words all match, a prefix widens, filters narrow; a private channel only for members.
    let seqs = |hits: Vec<(String, u64, String)>| {
        hits.into_iter().map(|(c, s, _)| (c, s)).collect::<Vec<_>>()
    };
    assert_eq!(
        seqs(found(&alice, "deploy").await?),
        [("general".into(), deploy.seq)]
    );
    assert_eq!(
        seqs(found(&bob, "deploy").await?),
        [("vault".into(), secret.seq), ("general".into(), deploy.seq)]
    );
    assert_eq!(
        seqs(found(&alice, "depl*").await?),
        [("ops".into(), deployed.seq), ("general".into(), deploy.seq)]
    );
    assert_eq!(
        seqs(found(&bob, "depl* from:bob in:#ops").await?),
        [("ops".into(), deployed.seq)]
    );
    assert!(
        found(&alice, "deploy lunch").await?.is_empty(),
        "AND, not OR"
    );

    // An edit replaces the words; a delete removes them.
    alice
        .send_related(
            "general",
            "lunch at one?",
            None,
            Relation::Edit { of: lunch.seq },
        )
        .await?;
    assert!(found(&alice, "noon").await?.is_empty());
    assert_eq!(
        found(&alice, "lunch").await?,
        [("general".into(), lunch.seq, "lunch at one?".into())]
    );
    alice
        .send_related("general", "", None, Relation::Delete { of: deploy.seq })
        .await?;
    assert!(found(&alice, "tonight").await?.is_empty());

    // Bad queries are refused with the reason, before and at the node.
    let long = "word ".repeat(2048);
    assert!(matches!(
        bad_query(alice.search(&long, 10).await),
        QueryError::TooLong { len: 10240, .. }
    ));
    assert_eq!(bad_query(alice.search("  ", 10).await), QueryError::Empty);
    let user = TestUser::with_seed("alice", alice_seed);
    let nodes = cluster.client_addrs();
    let raw = TestClient::login(nodes[0], &cluster.cluster, &user).await?;
    let request = |query: String, read_token| SearchRequest {
        query,
        limit: 10,
        read_token,
    };
    let refused = raw.client.search(ctx(), request(long.clone(), 0)).await?;
    ensure!(
        matches!(
            refused,
            Err(ApiError::Rejected(RejectReason::BadQuery(
                QueryError::TooLong { .. }
            )))
        ),
        "{refused:?}"
    );

    // kill -9 a node and restart it: it builds its index again from its state, edits and
    // deletes included, and covers the newest write before it answers.
    let token = alice.read_token();
    cluster.nodes[0].kill9();
    cluster.restart(0, READY)?;
    let deadline = Instant::now() + CONVERGE;
    let raw = loop {
        match TestClient::login(nodes[0], &cluster.cluster, &user).await {
            Ok(raw) => break raw,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    };
    let reply = raw
        .client
        .search(ctx(), request("lunch".into(), token))
        .await?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let hits: Vec<_> = reply
        .messages
        .iter()
        .map(|m| (m.channel.as_str(), m.seq))
        .collect();
    assert_eq!(hits, [("general", lunch.seq)]);
    assert!(reply.indexed >= token);
    let reply = raw
        .client
        .search(ctx(), request("tonight".into(), token))
        .await?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert!(reply.messages.is_empty(), "the delete survives the rebuild");
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

fn run(command: &mut Command) -> anyhow::Result<std::process::Output> {
    command.output().context("running cellchat")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn encrypted_text_is_searched_on_the_client_only() -> anyhow::Result<()> {
    let mut cluster = TestCluster::new("search-e2e", &[])?;
    testkit::start_nodes(&mut cluster, 3, READY, CONVERGE).await?;
    let dir = tempfile::tempdir()?;
    for name in ["alice", "bob"] {
        let out = run(cli(&cluster, dir.path())?.args([name, "--send", "kickoff meeting"]))?;
        ensure!(out.status.success(), "{out:?}");
    }
    let out = run(cli(&cluster, dir.path())?.args([
        "alice",
        "--channel",
        "@bob",
        "--send",
        "the vault code is 4711",
    ]))?;
    ensure!(out.status.success(), "{out:?}");

    // The nodes' index never holds the encrypted words...
    let out = run(cli(&cluster, dir.path())?.args(["bob", "--search", "vault"]))?;
    ensure!(
        !out.status.success(),
        "nothing matches on the nodes: {out:?}"
    );
    ensure!(String::from_utf8_lossy(&out.stderr).contains("no message matches"));
    // ...and the plaintext ones are there, as JSON lines.
    let out = run(cli(&cluster, dir.path())?.args(["bob", "--search", "kick*", "--json"]))?;
    ensure!(out.status.success(), "{out:?}");
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let senders: Vec<&str> = lines.iter().filter_map(|l| l["sender"].as_str()).collect();
    assert_eq!(senders, ["bob", "alice"], "newest first");
    // In the conversation, the client decrypts and searches itself.
    let out = run(cli(&cluster, dir.path())?.args([
        "bob",
        "--channel",
        "@alice",
        "--search",
        "vault code",
    ]))?;
    ensure!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout)?;
    ensure!(
        text.contains("@alice") && text.contains("the vault code is 4711"),
        "{text}"
    );
    // A query too long is refused with the reason.
    let long = "x".repeat(10 * 1024);
    let out = run(cli(&cluster, dir.path())?.args(["bob", "--search", &long]))?;
    ensure!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        stderr.contains("bad search query") && stderr.contains("10240 bytes"),
        "{stderr}"
    );
    Ok(())
}
