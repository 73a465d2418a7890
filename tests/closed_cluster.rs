//! The closed cluster, tried as a stranger would: real `server` processes on loopback, and a
//! test process that plays a node without the token, a node of another cluster, a client
//! trusting another CA, and an eavesdropper on the loopback interface.
//!
//! Each refusal is checked on the answer (a typed error), and the cluster is checked unchanged
//! afterwards (same members, same term).

use std::io::Read as _;
use std::time::{Duration, Instant};

use cellchat_client::{Client, ClientConfig, Identity};
use node::{EnrollError, EnrollRequest, JoinRequest, Member, NodeId, Vote, WrongNode};
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use proto::discovery::NodeAnnounce;
use proto::tls::{CaVerifier, Fingerprint, JoinToken, Trust};
use proto::Role;
use tarpc::context;
use testkit::TestCluster;

const READY: Duration = Duration::from_secs(30);
const CONVERGE: Duration = Duration::from_secs(30);

async fn converged(name: &str, n: usize) -> anyhow::Result<TestCluster> {
    let mut cluster = TestCluster::new(name, &[])?;
    for _ in 0..n {
        cluster.spawn_node()?;
    }
    for node in &mut cluster.nodes {
        node.wait_ready(READY)?;
    }
    cluster.wait_converged(n, CONVERGE).await?;
    Ok(cluster)
}

fn ctx() -> context::Context {
    let mut ctx = context::current();
    ctx.deadline = Instant::now() + Duration::from_secs(5);
    ctx
}

/// The leader and one follower, as discovery announces them.
async fn leader_and_follower(
    cluster: &TestCluster,
) -> anyhow::Result<(NodeAnnounce, NodeAnnounce)> {
    let nodes = cluster.discover(Duration::from_millis(800)).await?;
    let leader = nodes
        .iter()
        .find(|n| n.role == Role::Leader)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no leader announced"))?;
    let follower = nodes
        .iter()
        .find(|n| n.role != Role::Leader)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no follower announced"))?;
    Ok((leader, follower))
}

/// The highest term any node announces.
async fn term(cluster: &TestCluster) -> anyhow::Result<u64> {
    let nodes = cluster.discover(Duration::from_millis(800)).await?;
    Ok(nodes.iter().map(|n| n.term).max().unwrap_or(0))
}

fn members_json(cluster: &TestCluster) -> anyhow::Result<Vec<serde_json::Value>> {
    let output = cluster.admin(&["members", "--json"])?;
    anyhow::ensure!(
        output.status.success(),
        "members failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(serde_json::from_slice(&output.stdout)?)
}

fn unauthenticated<T: std::fmt::Debug>(answer: Result<T, WrongNode>) -> bool {
    matches!(answer, Err(WrongNode::Unauthenticated { .. }))
}

/// A dialer with no certificate that trusts whatever CA the node shows: a stranger who can
/// reach the port and completes the handshake, the most it can do without the token.
fn anonymous_dialer() -> node::Dialer {
    proto::tls::client_config(CaVerifier::new(Trust::FirstUse), proto::tls::ALPN_RAFT)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_without_the_token_can_change_nothing() -> anyhow::Result<()> {
    let cluster = converged("stranger", 3).await?;
    let token: JoinToken = cluster.token()?.parse()?;
    let (leader, follower) = leader_and_follower(&cluster).await?;
    let term_before = term(&cluster).await?;
    let stranger_id: NodeId = 0x5757;

    // Anonymous: the handshake succeeds, every Raft and admin request is refused.
    let anon =
        node::connect_raft(&anonymous_dialer(), follower.raft_addr, follower.node_id).await?;
    let big_term = Vote::new(term_before + 1000, leader.node_id);
    let vote = anon
        .vote(ctx(), follower.node_id, VoteRequest::new(big_term, None))
        .await?;
    assert!(unauthenticated(vote), "an anonymous vote must be refused");
    let pre_vote = anon
        .pre_vote(ctx(), follower.node_id, VoteRequest::new(big_term, None))
        .await?;
    assert!(
        unauthenticated(pre_vote),
        "an anonymous pre-vote must be refused"
    );
    let append = AppendEntriesRequest {
        vote: Vote::new_committed(term_before + 1000, leader.node_id),
        prev_log_id: None,
        entries: Vec::new(),
        leader_commit: None,
    };
    let append = anon.append(ctx(), follower.node_id, append).await?;
    assert!(
        unauthenticated(append),
        "an anonymous append must be refused"
    );
    let member = Member {
        raft_addr: "127.0.0.1:1".into(),
        client_addr: "127.0.0.1:1".into(),
        metrics_addr: "127.0.0.1:1".into(),
        name: "mallory".into(),
    };
    let join = JoinRequest {
        cluster: cluster.cluster.clone(),
        id: stranger_id,
        member,
    };
    let anon_leader =
        node::connect_raft(&anonymous_dialer(), leader.raft_addr, leader.node_id).await?;
    let joined = anon_leader.join(ctx(), leader.node_id, join).await?;
    assert!(unauthenticated(joined), "an anonymous join must be refused");
    let wrong_admin = [7u8; 32];
    let removed = anon_leader
        .remove(
            ctx(),
            leader.node_id,
            wrong_admin,
            node::RemoveRequest {
                cluster: cluster.cluster.clone(),
                id: follower.node_id,
            },
        )
        .await?;
    assert!(
        unauthenticated(removed),
        "a removal without the admin credential must be refused"
    );
    let listed = anon_leader
        .members(
            ctx(),
            leader.node_id,
            wrong_admin,
            node::MembersRequest {
                cluster: cluster.cluster.clone(),
            },
        )
        .await?;
    assert!(
        unauthenticated(listed),
        "members without the admin credential must be refused"
    );
    let enroll = EnrollRequest {
        cluster: cluster.cluster.clone(),
        id: stranger_id,
        public_key: vec![4; 65],
        secret: vec![0; 16],
    };
    let enrolled = anon_leader.enroll(ctx(), enroll).await?;
    assert_eq!(enrolled.err(), Some(EnrollError::WrongSecret));

    // A node of another cluster (its own CA): its certificate is refused in the handshake.
    let elsewhere = tempfile::tempdir()?;
    let node::pki::Settled::Ready(foreign) = node::pki::settle(
        &elsewhere.path().join("node-1"),
        &cluster.cluster,
        stranger_id,
        None,
    )?
    else {
        anyhow::bail!("a fresh root makes a fresh identity");
    };
    assert_ne!(foreign.ca().fingerprint(), token.ca);
    let dialer = foreign.dialer_trusting(CaVerifier::new(Trust::FirstUse))?;
    let refused = match node::connect_raft(&dialer, follower.raft_addr, follower.node_id).await {
        Err(_) => true,
        // TLS 1.3 reports a refused client certificate on the first read.
        Ok(client) => client
            .vote(ctx(), follower.node_id, VoteRequest::new(big_term, None))
            .await
            .is_err(),
    };
    assert!(refused, "a certificate from another CA must be refused");
    // Trusting only its own CA, the foreign node does not even accept the cluster's nodes.
    assert!(
        node::connect_raft(&foreign.peer_client, follower.raft_addr, follower.node_id)
            .await
            .is_err()
    );

    // Nothing changed: the same three members, no election forced by the big terms.
    let members = members_json(&cluster)?;
    assert_eq!(members.len(), 3, "{members:?}");
    assert!(
        !members
            .iter()
            .any(|m| m["id"].as_u64() == Some(stranger_id)),
        "{members:?}"
    );
    let term_after = term(&cluster).await?;
    assert!(
        term_after < term_before + 1000,
        "the refused requests must not raise the term ({term_before} -> {term_after})"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_certificate_speaks_only_for_its_own_node() -> anyhow::Result<()> {
    let cluster = converged("impostor", 3).await?;
    let token: JoinToken = cluster.token()?.parse()?;
    let (leader, follower) = leader_and_follower(&cluster).await?;
    // Enroll a real certificate for a new id, with the right secret.
    let elsewhere = tempfile::tempdir()?;
    let dir = elsewhere.path().join("node-1");
    let id: NodeId = 0x1234_5678;
    let node::pki::Settled::Enroll { token: t, key } =
        node::pki::settle(&dir, &cluster.cluster, id, Some(&token))?
    else {
        anyhow::bail!("a fresh dir with a token enrolls");
    };
    let request = EnrollRequest {
        cluster: cluster.cluster.clone(),
        id,
        public_key: key.public_key_raw().to_vec(),
        secret: token.secret.to_vec(),
    };
    // Asking for the certificate of an existing member is refused.
    let taken = EnrollRequest {
        id: follower.node_id,
        ..request.clone()
    };
    let refused = node::request_enroll(&token, leader.raft_addr, taken).await;
    assert!(
        matches!(
            refused,
            Err(node::JoinCallError::EnrollRefused(EnrollError::IdTaken(_)))
        ),
        "{refused:?}"
    );
    let reply = node::request_enroll(&token, leader.raft_addr, request).await?;
    let pem = |der: &[u8]| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()));
    let ca = node::pki::ClusterCa::from_pem(
        &cluster.cluster,
        pem(&reply.ca_cert).as_bytes(),
        &reply.ca_key_pem,
        &dir,
    )?;
    let enrolled = node::pki::Enrolled {
        ca,
        cert: reply.cert.into(),
    };
    let tls = node::pki::finish_enrollment(&dir, enrolled, t, key)?;

    // With it, a vote naming the leader as candidate is refused: the certificate names `id`.
    let client = node::connect_raft(&tls.peer_client, follower.raft_addr, follower.node_id).await?;
    let term_now = term(&cluster).await?;
    let forged = Vote::new(term_now + 50, leader.node_id);
    let answer = client
        .vote(ctx(), follower.node_id, VoteRequest::new(forged, None))
        .await?;
    assert!(
        unauthenticated(answer),
        "a vote in another node's name must be refused"
    );
    // In its own name it is authenticated, but not a member: refused as such.
    let client = node::connect_raft(&tls.peer_client, follower.raft_addr, follower.node_id).await?;
    let own = Vote::new(term_now + 50, id);
    let answer = client
        .vote(ctx(), follower.node_id, VoteRequest::new(own, None))
        .await?;
    assert!(
        matches!(answer, Err(WrongNode::NotAMember { .. })),
        "{answer:?}"
    );
    assert!(term(&cluster).await? < term_now + 50);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_on_another_machine_joins_with_the_token_and_only_with_it() -> anyhow::Result<()> {
    let cluster = converged("token-join", 2).await?;
    let token = cluster.token()?;
    // "Another machine": a data dir outside the cluster's directory, so no shared CA.
    let elsewhere = tempfile::tempdir()?;
    let mut joiner = cluster.spawn_outside(
        &elsewhere.path().join("node-1"),
        &["--token", &token, "--name", "far"],
    )?;
    joiner.wait_ready(READY)?;
    let deadline = Instant::now() + CONVERGE;
    loop {
        let members = members_json(&cluster)?;
        if members.len() == 3 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the joiner never became a member: {members:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // The right CA with a wrong secret: refused, and the node says so and exits.
    let parsed: JoinToken = token.parse()?;
    let wrong = JoinToken {
        ca: parsed.ca,
        secret: [0x42; 16],
    };
    let wrong_dir = elsewhere.path().join("wrong");
    let mut refused = cluster.spawn_outside(&wrong_dir, &["--token", &wrong.to_string()])?;
    let status = refused
        .wait_exit(Duration::from_secs(30))
        .ok_or_else(|| anyhow::anyhow!("a node with a wrong token kept running"))?;
    assert!(!status.success());
    let log = refused.log_tail(20);
    assert!(log.contains("secret is wrong"), "{log}");

    // A malformed token is refused before anything else.
    let mut malformed =
        cluster.spawn_outside(&elsewhere.path().join("bad"), &["--token", "CC1-zz"])?;
    let status = malformed
        .wait_exit(Duration::from_secs(30))
        .ok_or_else(|| anyhow::anyhow!("a node with a malformed token kept running"))?;
    assert!(!status.success());
    assert!(
        malformed.log_tail(20).contains("join token"),
        "{}",
        malformed.log_tail(20)
    );
    assert_eq!(members_json(&cluster)?.len(), 3);
    Ok(())
}

/// Plays a stranger on the discovery port until `stop`: announces, by broadcast and in answer to
/// every probe, a leader of a huge term with the lowest possible id, and a fresh node below
/// every real id, both at `addr` (a listener the test watches).
fn forge_announcements(
    cluster: &TestCluster,
    addr: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use proto::discovery::{DiscoverySocket, Packet, DEFAULT_BROADCAST};
    let socket = DiscoverySocket::bind(
        cluster.discovery_port,
        DEFAULT_BROADCAST,
        cluster.cluster.clone(),
    )?;
    let forged = |node_id: u64, role: Role, term: u64| {
        Packet::Announce(NodeAnnounce {
            cluster: cluster.cluster.clone(),
            node_id,
            client_addr: addr,
            raft_addr: addr,
            metrics_addr: addr,
            role,
            leader: (role == Role::Leader).then_some(node_id),
            term,
            applied: 1 << 40,
            voter: true,
            started_ms: 1,
            name: format!("forged-{node_id}"),
        })
    };
    let packets = std::sync::Arc::new([
        forged(1, Role::Leader, 1_000_000),
        forged(0, Role::Follower, 0),
    ]);
    let socket = std::sync::Arc::new(socket);
    // Answers every probe at once, on a task of its own, while the other broadcasts.
    let answering = {
        let (socket, packets) = (socket.clone(), packets.clone());
        tokio::spawn(async move {
            while let Ok((packet, from)) = socket.recv().await {
                if matches!(packet, Packet::Probe { .. }) {
                    for packet in packets.iter() {
                        let _ = socket.send_to(packet, from).await;
                    }
                }
            }
        })
    };
    Ok(tokio::spawn(async move {
        // Bounded: a test that forgets to stop it still ends.
        let deadline = Instant::now() + Duration::from_secs(120);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
            for packet in packets.iter() {
                let _ = socket.send_broadcast(packet).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        answering.abort();
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_announcements_neither_stop_formation_nor_capture_a_client() -> anyhow::Result<()> {
    let mut cluster = TestCluster::new("forged-announce", &[])?;
    let trap = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let trap_addr = trap.local_addr()?;
    let dialed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = {
        let dialed = dialed.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = trap.accept().await {
                dialed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                drop(conn);
            }
        })
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let forger = forge_announcements(&cluster, trap_addr, stop.clone())?;
    for _ in 0..3 {
        cluster.spawn_node()?;
    }
    for node in &mut cluster.nodes {
        node.wait_ready(READY)?;
    }
    // The real nodes form one cluster among themselves while the forger announces.
    let deadline = Instant::now() + CONVERGE;
    let mut forger_heard = false;
    loop {
        let heard = cluster.discover(Duration::from_millis(400)).await?;
        forger_heard |= heard.iter().any(|a| a.raft_addr == trap_addr);
        let real: Vec<&NodeAnnounce> = heard.iter().filter(|a| a.raft_addr != trap_addr).collect();
        let leaders: Vec<u64> = real
            .iter()
            .filter(|a| a.role == Role::Leader)
            .map(|a| a.node_id)
            .collect();
        let formed = real.len() == 3
            && leaders.len() == 1
            && real.iter().all(|a| a.leader == Some(leaders[0]) && a.voter);
        if formed && forger_heard {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no cluster formed under forged announcements (forger heard: {forger_heard}): \
             {real:#?}"
        );
    }
    assert_eq!(
        dialed.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "a node acted on a forged announcement"
    );

    // A client and the operator tools get past the forger (one refused handshake each).
    let token: JoinToken = cluster.token()?.parse()?;
    let home = tempfile::tempdir()?;
    let mut config = client_config(&cluster, home.path());
    config.token = Some(token);
    let client = Client::connect(config).await?;
    client.send("general", b"past the forger".to_vec()).await?;
    let members = members_json(&cluster)?;
    assert_eq!(members.len(), 3, "{members:?}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    forger.await?;
    counter.abort();
    assert!(
        term(&cluster).await? < 1_000_000,
        "no node took the forged term"
    );
    Ok(())
}

/// The token file a node keeps in its data dir.
fn node_token(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("tls").join("token"))
        .map_or_else(|_| String::new(), |t| t.trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_keeps_every_member_and_only_it_admits() -> anyhow::Result<()> {
    let mut cluster = converged("token-rotate", 3).await?;
    let old = cluster.token()?;
    // A member that is down during the rotation learns the new secret from the log.
    cluster.nodes[2].kill9();

    let output = cluster.admin(&["token", "--rotate"])?;
    let stdout = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    anyhow::ensure!(
        output.status.success(),
        "token --rotate failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let new: JoinToken = stdout.parse()?;
    let old_parsed: JoinToken = old.parse()?;
    assert_eq!(new.ca, old_parsed.ca, "a rotation keeps the CA");
    assert_ne!(new.secret, old_parsed.secret);
    let new = new.to_string();

    cluster.restart(2, READY)?;
    let deadline = Instant::now() + CONVERGE;
    loop {
        let tokens: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| node_token(n.data_dir()))
            .collect();
        if tokens.iter().all(|t| *t == new) && cluster.token()? == new {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the members did not all take the new token: {tokens:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(members_json(&cluster)?.len(), 3, "every member stays");

    // The old token no longer works for operator commands, the new one does.
    let refused = cluster.admin(&["members", "--json", "--token", &old])?;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("admin credential"), "{stderr}");
    let accepted = cluster.admin(&["members", "--json", "--token", &new])?;
    assert!(
        accepted.status.success(),
        "{}",
        String::from_utf8_lossy(&accepted.stderr)
    );

    // Nor for joining; the new one admits a node from another machine.
    let elsewhere = tempfile::tempdir()?;
    let mut stale = cluster.spawn_outside(&elsewhere.path().join("stale"), &["--token", &old])?;
    let status = stale
        .wait_exit(Duration::from_secs(30))
        .ok_or_else(|| anyhow::anyhow!("a node with the old token kept running"))?;
    assert!(!status.success());
    assert!(
        stale.log_tail(20).contains("secret is wrong"),
        "{}",
        stale.log_tail(20)
    );
    let mut joiner = cluster.spawn_outside(
        &elsewhere.path().join("node-1"),
        &["--token", &new, "--name", "far"],
    )?;
    joiner.wait_ready(READY)?;
    // Twice the usual bound: this is the fourth node started on a loaded 2-core machine.
    let deadline = Instant::now() + 2 * CONVERGE;
    loop {
        let members = members_json(&cluster)?;
        if members.len() == 4 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the joiner with the new token never became a member: {members:?}\njoiner's log:\n{}",
            joiner.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(node_token(&elsewhere.path().join("node-1")), new);

    // Clients keep their pin: the CA did not change.
    let home = tempfile::tempdir()?;
    let mut config = client_config(&cluster, home.path());
    config.token = Some(old_parsed);
    let client = Client::connect(config).await?;
    client
        .send("general", b"after the rotation".to_vec())
        .await?;
    Ok(())
}

fn client_config(cluster: &TestCluster, config_dir: &std::path::Path) -> ClientConfig {
    // One key for every client of a test: a name stays bound to the key that registered it.
    static ALICE: std::sync::OnceLock<Identity> = std::sync::OnceLock::new();
    ClientConfig {
        identity: Some(
            ALICE
                .get_or_init(|| Identity::ephemeral("alice", None))
                .clone(),
        ),
        config_dir: Some(config_dir.to_path_buf()),
        ..ClientConfig::new(cluster.cluster.clone(), cluster.discovery_port)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_trust_the_token_or_their_pin_and_refuse_another_ca() -> anyhow::Result<()> {
    let cluster = converged("client-trust", 1).await?;
    let token: JoinToken = cluster.token()?.parse()?;
    let home = tempfile::tempdir()?;

    // The token's CA: accepted.
    let mut config = client_config(&cluster, home.path());
    config.token = Some(token.clone());
    let client = Client::connect(config).await?;
    client.send("general", b"with the token".to_vec()).await?;
    drop(client);

    // Another CA's token: refused, and the error names the CA.
    let mut config = client_config(&cluster, home.path());
    config.token = Some(JoinToken::generate(Fingerprint([9; 32])));
    let error = Client::connect(config)
        .await
        .err()
        .expect("another CA is refused");
    assert!(error.to_string().contains("CA"), "{error}");

    // No token: the first CA met is pinned, and used again.
    let client = Client::connect(client_config(&cluster, home.path())).await?;
    client
        .send("general", b"pinned on first use".to_vec())
        .await?;
    drop(client);
    let pins = std::fs::read_to_string(home.path().join("known_clusters"))?;
    assert!(
        pins.contains(&format!("{} {}", cluster.cluster, token.ca)),
        "{pins}"
    );
    // A changed pin (the cluster made anew, or a forger): refused.
    std::fs::write(
        home.path().join("known_clusters"),
        format!("{} {}\n", cluster.cluster, Fingerprint([5; 32])),
    )?;
    let error = Client::connect(client_config(&cluster, home.path()))
        .await
        .err()
        .expect("a changed CA is refused");
    assert!(error.to_string().contains("CA"), "{error}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_signature_is_bound_to_its_tls_session() -> anyhow::Result<()> {
    let cluster = converged("login-binding", 1).await?;
    let addr = cluster.nodes[0].ready().expect("ready").client;
    let user = testkit::TestUser::new("bob");
    // A relay holds two sessions: it shows the node's challenge on one to the user, who signs
    // it with the binding of the session the user sees.
    let (relay, challenge) = testkit::TestClient::connect(addr, &cluster.cluster).await?;
    let (user_side, _) = testkit::TestClient::connect(addr, &cluster.cluster).await?;
    assert_ne!(relay.binding, user_side.binding);
    let signed = proto::login_message(&challenge, &user_side.binding, &cluster.cluster, "bob");
    let login = proto::Login {
        name: "bob".into(),
        public_key: user.public_key(),
        signature: user.sign(&signed),
    };
    let answer = relay.client.login(ctx(), login).await?;
    assert_eq!(answer.err(), Some(proto::ApiError::Unauthenticated));
    // Signed for the relay's own session, the same challenge logs in.
    let (direct, challenge) = testkit::TestClient::connect(addr, &cluster.cluster).await?;
    let signed = proto::login_message(&challenge, &direct.binding, &cluster.cluster, "bob");
    let login = proto::Login {
        name: "bob".into(),
        public_key: user.public_key(),
        signature: user.sign(&signed),
    };
    direct.client.login(ctx(), login).await??;
    Ok(())
}

/// Captures every frame on the loopback interface (a raw packet socket; needs root) until
/// `stop` is set, and returns the bytes.
fn capture_loopback(
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<Vec<u8>>> {
    use socket2::{Domain, Protocol, Socket, Type};
    const ETH_P_ALL: u16 = 0x0003;
    let socket = Socket::new(
        Domain::PACKET,
        Type::RAW,
        Some(Protocol::from(i32::from(ETH_P_ALL.to_be()))),
    )?;
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    Ok(std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 65_536];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(n) = (&socket).read(&mut buf) {
                seen.extend_from_slice(&buf[..n]);
            }
        }
        seen
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_message_body_crosses_loopback_in_the_clear() -> anyhow::Result<()> {
    let cluster = converged("wire", 3).await?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let capture = match capture_loopback(stop.clone()) {
        Ok(capture) => capture,
        Err(e)
            if e.to_string().contains("ermission") || e.to_string().contains("not permitted") =>
        {
            anyhow::bail!("this test needs root for a raw packet socket (CI runs as root): {e}")
        }
        Err(e) => return Err(e),
    };
    let marker = format!("secret-body-{:016x}", rand::random::<u64>());
    let home = tempfile::tempdir()?;
    let client = Client::connect(client_config(&cluster, home.path())).await?;
    client.send("general", marker.as_bytes().to_vec()).await?;
    // Read it back, so it crosses the client port both ways; replication carried it over the
    // Raft port to the followers.
    let history = client.history("general", None, 10).await?;
    assert!(history.messages.iter().any(|m| m.body == marker.as_bytes()));
    drop(client);
    // The control: the same marker sent in the clear must be seen, or the capture saw nothing.
    let control = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let sink = std::net::UdpSocket::bind("127.0.0.1:0")?;
    control.send_to(format!("control-{marker}").as_bytes(), sink.local_addr()?)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = capture.join().expect("the capture thread does not panic");
    let count = |needle: &[u8]| seen.windows(needle.len()).filter(|w| *w == needle).count();
    // A packet socket sees each loopback packet going out and coming in: count, don't assume.
    let control = count(format!("control-{marker}").as_bytes());
    assert!(control > 0, "the capture saw nothing");
    let plain = count(marker.as_bytes());
    assert_eq!(
        plain, control,
        "the message body crossed loopback in the clear outside the control datagram"
    );
    Ok(())
}

/// Every path under `dir` that its group or others may use, with its mode.
fn open_to_others(dir: &std::path::Path) -> Vec<(std::path::PathBuf, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue; // removed meanwhile (RocksDB rotates files)
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 && !meta.file_type().is_symlink() {
            found.push((path.clone(), mode));
        }
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                pending.extend(entries.flatten().map(|e| e.path()));
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_and_everything_in_it_are_private_to_the_owner() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut cluster = TestCluster::new("private-files", &[])?;
    // The second node's dir exists already, open to everyone, as an earlier release left it.
    let loose = cluster.dir().join("node-2");
    std::fs::create_dir_all(&loose)?;
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(loose.join("notes"), "left by an operator")?;
    std::fs::set_permissions(loose.join("notes"), std::fs::Permissions::from_mode(0o644))?;
    for _ in 0..2 {
        cluster.spawn_node()?;
    }
    for node in &mut cluster.nodes {
        node.wait_ready(READY)?;
    }
    cluster.wait_converged(2, CONVERGE).await?;
    anyhow::ensure!(
        cluster.nodes[1].data_dir() == loose,
        "the test assumes node-2's dir"
    );
    let token: JoinToken = cluster.token()?.parse()?;
    let home = tempfile::tempdir()?;
    let mut config = client_config(&cluster, home.path());
    config.token = Some(token);
    let client = Client::connect(config).await?;
    for i in 0..20 {
        client
            .send("general", format!("message {i}").into_bytes())
            .await?;
    }
    for node in &cluster.nodes {
        let open = open_to_others(node.data_dir());
        assert!(open.is_empty(), "open to others: {open:?}");
    }
    let shared = cluster.dir().join(format!("cluster-{}", cluster.cluster));
    assert!(open_to_others(&shared).is_empty());
    Ok(())
}

/// A push connection to `addr` that said hello; returns the framed stream, the welcome's
/// challenge and the TLS session's login binding.
async fn push_hello(
    addr: std::net::SocketAddr,
    cluster: &str,
) -> anyhow::Result<(
    tarpc::tokio_util::codec::Framed<proto::TlsTcp, tarpc::tokio_util::codec::LengthDelimitedCodec>,
    [u8; 32],
    [u8; 32],
)> {
    use futures::{SinkExt as _, StreamExt as _};
    use proto::push::{self, ClientFrame, PushHello, ServerFrame};
    use tokio::io::AsyncWriteExt as _;
    let verifier = CaVerifier::new(Trust::FirstUse);
    let config = proto::tls::client_config(verifier, proto::tls::ALPN_PUSH);
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = proto::handshake(stream, config, proto::tls::any_node()).await?;
    let binding = proto::tls::stream_binding(&tls)?;
    tls.write_all(&push::PUSH_MAGIC).await?;
    let mut frames =
        tarpc::tokio_util::codec::Framed::new(tls, push::frame_codec(proto::FRAME_BYTES_MAX));
    let hello = ClientFrame::Hello(PushHello::new(cluster.to_owned(), None));
    frames
        .send(push::encode_frame(&hello).slice(push::LENGTH_BYTES..))
        .await?;
    let first = frames
        .next()
        .await
        .ok_or_else(|| anyhow::anyhow!("closed"))??;
    let ServerFrame::Welcome(welcome) = push::decode_server_frame(&first)? else {
        anyhow::bail!("no welcome");
    };
    Ok((frames, welcome.challenge, binding))
}

/// The next frame after `frames`' current position is `Error { sub_id: None, Unauthenticated }`
/// and then the node closes the connection.
async fn refused_and_closed(
    frames: &mut tarpc::tokio_util::codec::Framed<
        proto::TlsTcp,
        tarpc::tokio_util::codec::LengthDelimitedCodec,
    >,
) -> anyhow::Result<()> {
    use futures::StreamExt as _;
    use proto::push::{self, ServerFrame};
    let frame = tokio::time::timeout(Duration::from_secs(10), frames.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("closed without an error frame"))??;
    let ServerFrame::Error {
        sub_id: None,
        error,
    } = push::decode_server_frame(&frame)?
    else {
        anyhow::bail!("expected an error frame");
    };
    assert_eq!(error, proto::ApiError::Unauthenticated);
    let next = tokio::time::timeout(Duration::from_secs(10), frames.next()).await?;
    assert!(!matches!(next, Some(Ok(_))), "the connection stayed open");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_needs_a_login_on_every_read_path() -> anyhow::Result<()> {
    use futures::SinkExt as _;
    use proto::push::{self, ClientFrame, Subscribe};
    use proto::{ApiError, HistoryRequest, StreamRequest};
    let cluster = converged("read-login", 1).await?;
    let addr = cluster.nodes[0].ready().expect("ready").client;
    let alice = testkit::TestUser::new("alice");
    let writer = testkit::TestClient::login(addr, &cluster.cluster, &alice).await?;
    writer
        .send("general", b"for members' eyes", [1; 16], 1)
        .await??;

    // Chat RPC: a hello is not enough to read; the membership is still served.
    let (anonymous, _) = testkit::TestClient::connect(addr, &cluster.cluster).await?;
    let history = HistoryRequest {
        channel: "general".into(),
        before_seq: None,
        from_seq: Some(1),
        limit: 10,
        read_token: 0,
    };
    let stream = StreamRequest {
        channel: "general".into(),
        after_seq: 0,
        max: 10,
        wait_ms: 0,
        read_token: 0,
    };
    let client = &anonymous.client;
    assert_eq!(
        client.history(ctx(), history.clone()).await?.err(),
        Some(ApiError::Unauthenticated)
    );
    assert_eq!(
        client.stream(ctx(), stream).await?.err(),
        Some(ApiError::Unauthenticated)
    );
    assert_eq!(
        client
            .channels(
                ctx(),
                proto::ChannelsRequest {
                    after: None,
                    limit: 10,
                    read_token: 0,
                },
            )
            .await?
            .err(),
        Some(ApiError::Unauthenticated)
    );
    let info = proto::ChannelInfoRequest {
        channel: "general".into(),
        read_token: 0,
    };
    assert_eq!(
        client.channel_info(ctx(), info).await?.err(),
        Some(ApiError::Unauthenticated)
    );
    assert_eq!(
        client.user_keys(ctx(), vec!["alice".into()]).await?.err(),
        Some(ApiError::Unauthenticated)
    );
    let change = proto::ChannelRequest {
        channel: "general".into(),
        change: proto::ChannelChange::Create {
            private: true,
            crypto: None,
        },
    };
    assert_eq!(
        client.channel(ctx(), change).await?.err(),
        Some(ApiError::Unauthenticated)
    );
    assert!(
        client.cluster(ctx()).await?.is_ok(),
        "the membership needs no login"
    );
    // Logged in, the same connection kind reads.
    let page = writer.client.history(ctx(), history).await??;
    assert_eq!(page.messages.len(), 1);

    // Push: a subscription before a login, and a login with a bad signature, are refused and
    // end the connection.
    let subscribe = ClientFrame::Subscribe(Subscribe {
        sub_id: 1,
        channel: "general".into(),
        after_seq: 0,
        read_token: 0,
    });
    let (mut frames, _, _) = push_hello(addr, &cluster.cluster).await?;
    frames
        .send(push::encode_frame(&subscribe).slice(push::LENGTH_BYTES..))
        .await?;
    refused_and_closed(&mut frames).await?;
    let (mut frames, challenge, _) = push_hello(addr, &cluster.cluster).await?;
    // Signed for another session's binding: what a relay would hold.
    let login = ClientFrame::Login(alice.login(&challenge, &[0; 32], &cluster.cluster));
    frames
        .send(push::encode_frame(&login).slice(push::LENGTH_BYTES..))
        .await?;
    refused_and_closed(&mut frames).await?;

    // The client library says what is missing.
    let home = tempfile::tempdir()?;
    let mut config = client_config(&cluster, home.path());
    config.identity = None;
    config.token = Some(cluster.token()?.parse()?);
    let nameless = Client::connect(config).await?;
    let error = nameless
        .history("general", None, 10)
        .await
        .expect_err("refused");
    assert!(
        matches!(error, cellchat_client::Error::NoIdentity),
        "{error:?}"
    );
    Ok(())
}
