//! The client library against an in-process mock cluster: real tarpc `Chat` servers and a real
//! discovery socket on loopback, over one shared in-memory log. Checks routing (NotLeader,
//! leader changes), failover of subscriptions when a node dies, idempotent retries, rate-limit
//! backoff, and error texts, without RocksDB or Raft. `tests/client.rs` at the workspace root
//! repeats the important cases against real `server` processes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellchat_client::crypto;
use cellchat_client::{ApiError, Client, ClientConfig, ClientEvent, Error, Identity, WireMessage};
use ed25519_dalek::{Signature, VerifyingKey};
use futures::StreamExt;
use proto::discovery::{DiscoverySocket, NodeAnnounce, NodeStatus, Packet, PingSocket};
use proto::{
    ChannelInfo, ClusterInfo, Hello, HistoryRequest, LeaderHint, Login, MessageBatch, NodeInfo,
    Pong, RejectReason, Role, SendReply, SendRequest, Session, StreamRequest, Welcome,
};
use tarpc::context::Context;
use tarpc::server::{BaseChannel, Channel};
use tokio::sync::Notify;
use tokio::task::JoinSet;

/// State shared by every mock node: one log, as if replication were instant.
struct Shared {
    cluster: String,
    messages: Mutex<Vec<WireMessage>>,
    dedup: Mutex<HashMap<([u8; 16], u64), SendReply>>,
    users: Mutex<HashMap<String, [u8; 32]>>,
    leader: AtomicU64,
    /// The next this many sends answer RateLimited.
    rate_limited: AtomicU32,
    /// Sends that reached the log (not counting duplicates).
    applied_sends: AtomicU64,
    appended: Notify,
    nodes: Mutex<Vec<(u64, SocketAddr, Arc<AtomicBool>)>>,
    /// Client connections open on all nodes.
    open_conns: AtomicU64,
    /// Most messages in a `stream` or `history` reply (0: no cap), as a node's byte cap makes
    /// a page shorter than asked.
    page_max: AtomicU64,
}

impl Shared {
    fn applied(&self) -> u64 {
        self.messages.lock().unwrap().len() as u64
    }

    fn hint(&self) -> Option<LeaderHint> {
        let leader = self.leader.load(Ordering::SeqCst);
        let nodes = self.nodes.lock().unwrap();
        nodes
            .iter()
            .find(|(id, _, alive)| *id == leader && alive.load(Ordering::SeqCst))
            .map(|(id, addr, _)| LeaderHint {
                id: *id,
                client_addr: *addr,
            })
    }

    fn page(&self, channel: &str, from: u64, limit: usize) -> Vec<WireMessage> {
        let messages = self.messages.lock().unwrap();
        messages
            .iter()
            .filter(|m| m.channel == channel && m.seq >= from)
            .take(limit)
            .cloned()
            .collect()
    }

    /// `page` cut to `page_max`, keeping the oldest messages or the newest.
    fn capped(&self, mut page: Vec<WireMessage>, keep_newest: bool) -> Vec<WireMessage> {
        let max = self.page_max.load(Ordering::SeqCst) as usize;
        if max == 0 || page.len() <= max {
            return page;
        }
        if keep_newest {
            page.drain(..page.len() - max);
        } else {
            page.truncate(max);
        }
        page
    }

    fn head(&self, channel: &str) -> u64 {
        let messages = self.messages.lock().unwrap();
        messages.iter().filter(|m| m.channel == channel).count() as u64
    }
}

#[derive(Clone)]
struct MockChat {
    id: u64,
    shared: Arc<Shared>,
    binding: [u8; 32],
    challenge: Arc<Mutex<Option<[u8; 32]>>>,
    user: Arc<Mutex<Option<String>>>,
}

impl MockChat {
    fn role(&self) -> Role {
        if self.shared.leader.load(Ordering::SeqCst) == self.id {
            Role::Leader
        } else {
            Role::Follower
        }
    }

    fn batch(&self, channel: &str, messages: Vec<WireMessage>) -> MessageBatch {
        MessageBatch {
            channel: channel.to_owned(),
            head: self.shared.head(channel),
            applied: self.shared.applied(),
            messages,
            floor: 1,
        }
    }
}

impl proto::Chat for MockChat {
    async fn hello(self, _: Context, req: Hello) -> Result<Welcome, ApiError> {
        proto::check_hello(&req, &self.shared.cluster)?;
        let challenge: [u8; 32] = rand::random();
        *self.challenge.lock().unwrap() = Some(challenge);
        Ok(Welcome {
            node_id: self.id,
            cluster: self.shared.cluster.clone(),
            protocol: proto::PROTOCOL_VERSION,
            challenge,
            server_time_ms: 0,
        })
    }

    async fn login(self, _: Context, req: Login) -> Result<Session, ApiError> {
        let challenge = self
            .challenge
            .lock()
            .unwrap()
            .take()
            .ok_or(ApiError::Unauthenticated)?;
        let key =
            VerifyingKey::from_bytes(&req.public_key).map_err(|_| ApiError::Unauthenticated)?;
        let sig = Signature::from_slice(&req.signature).map_err(|_| ApiError::Unauthenticated)?;
        key.verify_strict(
            &proto::login_message(&challenge, &self.binding, &self.shared.cluster, &req.name),
            &sig,
        )
        .map_err(|_| ApiError::Unauthenticated)?;
        let registered = self.shared.users.lock().unwrap().get(&req.name).copied();
        match registered {
            Some(k) if k == req.public_key => {}
            Some(_) => return Err(ApiError::Rejected(RejectReason::NameTaken)),
            None if self.role() != Role::Leader => {
                return Err(ApiError::NotLeader {
                    leader: self.shared.hint(),
                })
            }
            None => {
                self.shared
                    .users
                    .lock()
                    .unwrap()
                    .insert(req.name.clone(), req.public_key);
            }
        }
        *self.user.lock().unwrap() = Some(req.name.clone());
        Ok(Session { name: req.name })
    }

    async fn send(self, _: Context, req: SendRequest) -> Result<SendReply, ApiError> {
        let user = self
            .user
            .lock()
            .unwrap()
            .clone()
            .ok_or(ApiError::Unauthenticated)?;
        if self.role() != Role::Leader {
            return Err(ApiError::NotLeader {
                leader: self.shared.hint(),
            });
        }
        let limited =
            self.shared
                .rate_limited
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if limited.is_ok() {
            return Err(ApiError::RateLimited { retry_after_ms: 20 });
        }
        let mut dedup = self.shared.dedup.lock().unwrap();
        if let Some(reply) = dedup.get(&(req.client_id, req.client_seq)) {
            return Ok(SendReply {
                duplicate: true,
                ..reply.clone()
            });
        }
        let mut messages = self.shared.messages.lock().unwrap();
        let seq = messages.iter().filter(|m| m.channel == req.channel).count() as u64 + 1;
        messages.push(WireMessage {
            channel: req.channel.clone(),
            seq,
            sender: user,
            body: req.body,
            at_ms: 1,
            client_seq: req.client_seq,
            ..WireMessage::default()
        });
        let reply = SendReply {
            channel: req.channel,
            seq,
            at_ms: 1,
            read_token: messages.len() as u64,
            duplicate: false,
        };
        dedup.insert((req.client_id, req.client_seq), reply.clone());
        self.shared.applied_sends.fetch_add(1, Ordering::SeqCst);
        drop(messages);
        self.shared.appended.notify_waiters();
        Ok(reply)
    }

    async fn stream(self, ctx: Context, req: StreamRequest) -> Result<MessageBatch, ApiError> {
        let deadline = Instant::now() + proto::wait_budget(&ctx, req.wait_ms);
        loop {
            let appended = self.shared.appended.notified();
            if self.shared.applied() >= req.read_token {
                let page = self
                    .shared
                    .page(&req.channel, req.after_seq + 1, req.max as usize);
                if !page.is_empty() || Instant::now() >= deadline {
                    let page = self.shared.capped(page, false);
                    return Ok(self.batch(&req.channel, page));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            // Woken by an append or by the deadline, then look again.
            let _ = tokio::time::timeout(left, appended).await;
        }
    }

    async fn history(self, _: Context, req: HistoryRequest) -> Result<MessageBatch, ApiError> {
        let head = self.shared.head(&req.channel);
        let limit = u64::from(req.limit);
        let from = match (req.from_seq, req.before_seq) {
            (Some(from), _) => from,
            (None, before) => before
                .unwrap_or(u64::MAX)
                .min(head + 1)
                .saturating_sub(limit)
                .max(1),
        };
        let end = req.before_seq.unwrap_or(u64::MAX);
        let page = self
            .shared
            .page(&req.channel, from, req.limit as usize)
            .into_iter()
            .filter(|m| m.seq < end)
            .collect();
        let page = self.shared.capped(page, req.from_seq.is_none());
        Ok(self.batch(&req.channel, page))
    }

    async fn channels(
        self,
        _: Context,
        _: proto::ChannelsRequest,
    ) -> Result<proto::ChannelPage, ApiError> {
        let general = ChannelInfo {
            name: "general".into(),
            head: self.shared.head("general"),
            owner: None,
            private: false,
            invited: false,
            encrypted: false,
            read_to: 0,
            direct: Vec::new(),
        };
        Ok(proto::ChannelPage {
            channels: vec![general],
            more: false,
        })
    }

    async fn channel_info(
        self,
        _: Context,
        _: proto::ChannelInfoRequest,
    ) -> Result<proto::ChannelDetail, ApiError> {
        Err(ApiError::Rejected(proto::RejectReason::NotMember))
    }

    async fn channel(self, _: Context, _: proto::ChannelRequest) -> Result<u64, ApiError> {
        Err(ApiError::unavailable("no channel records in the mock"))
    }

    async fn mark_read(
        self,
        _: Context,
        _: proto::MarkReadRequest,
    ) -> Result<proto::MarkReadReply, ApiError> {
        Err(ApiError::unavailable("no read markers in the mock"))
    }

    async fn search(
        self,
        _: Context,
        _: proto::SearchRequest,
    ) -> Result<proto::SearchReply, ApiError> {
        Err(ApiError::unavailable("no search in the mock"))
    }

    async fn user_keys(
        self,
        _: Context,
        names: Vec<String>,
    ) -> Result<Vec<proto::UserKey>, ApiError> {
        let unknown = |name| proto::UserKey {
            name,
            public_key: None,
        };
        Ok(names.into_iter().map(unknown).collect())
    }

    async fn cluster(self, _: Context) -> Result<ClusterInfo, ApiError> {
        let nodes = self.shared.nodes.lock().unwrap().clone();
        let leader = self.shared.leader.load(Ordering::SeqCst);
        Ok(ClusterInfo {
            cluster: self.shared.cluster.clone(),
            leader: Some(leader),
            term: 1,
            nodes: nodes
                .into_iter()
                .map(|(id, addr, _)| NodeInfo {
                    id,
                    role: if id == leader {
                        Role::Leader
                    } else {
                        Role::Follower
                    },
                    client_addr: addr,
                    raft_addr: addr,
                    metrics_addr: addr,
                    applied: self.shared.applied(),
                    voter: true,
                })
                .collect(),
        })
    }

    async fn ping(self, _: Context, nonce: u64) -> Pong {
        Pong {
            nonce,
            node_id: self.id,
            role: self.role(),
            applied: self.shared.applied(),
            server_time_ms: 0,
        }
    }
}

/// Whether mock nodes answer UDP RTT pings.
#[derive(Clone, Copy, PartialEq, Eq)]
enum UdpPings {
    Answered,
    /// As behind a firewall that drops UDP: clients must measure over TCP.
    Dropped,
}

/// A mock cluster of `n` nodes with ids 1..=n; node `leader` leads.
struct Mock {
    shared: Arc<Shared>,
    /// The mock cluster's CA, which the clients' tokens name.
    ca: proto::tls::Fingerprint,
    discovery_port: u16,
    tasks: Vec<Arc<Mutex<JoinSet<()>>>>,
    _discovery: tokio::task::JoinHandle<()>,
}

/// A CA and one node certificate for every mock node (they need not tell themselves apart to
/// the client), served without client certificates, as a node's client port is.
fn mock_tls() -> (Arc<rustls::ServerConfig>, proto::tls::Fingerprint) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![proto::tls::NODE_NAME.to_owned()])
        .unwrap()
        .signed_by(&key, &Issuer::new(ca_params, &ca_key))
        .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(proto::tls::provider())
        .with_protocol_versions(proto::tls::VERSIONS)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone(), ca.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    // Both protocols, as a node offers: the mock then reads a push opening as tarpc and hangs
    // up, as a node without push would, and clients fall back to long polls.
    config.alpn_protocols = vec![
        proto::tls::ALPN_CHAT.to_vec(),
        proto::tls::ALPN_PUSH.to_vec(),
    ];
    (Arc::new(config), proto::tls::Fingerprint::of(ca.der()))
}

impl Mock {
    async fn start(n: u64, leader: u64) -> Mock {
        Mock::start_with(n, leader, UdpPings::Answered).await
    }

    async fn start_with(n: u64, leader: u64, pings: UdpPings) -> Mock {
        let shared = Arc::new(Shared {
            cluster: format!("mock-{:08x}", rand::random::<u32>()),
            messages: Mutex::new(Vec::new()),
            dedup: Mutex::new(HashMap::new()),
            users: Mutex::new(HashMap::new()),
            leader: AtomicU64::new(leader),
            rate_limited: AtomicU32::new(0),
            applied_sends: AtomicU64::new(0),
            appended: Notify::new(),
            nodes: Mutex::new(Vec::new()),
            open_conns: AtomicU64::new(0),
            page_max: AtomicU64::new(0),
        });
        let (tls, ca) = mock_tls();
        let mut tasks = Vec::new();
        for id in 1..=n {
            let listener = proto::listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let set = Arc::new(Mutex::new(JoinSet::new()));
            if pings == UdpPings::Answered {
                // Like a node: a ping socket on the client address, gone with the node.
                let socket = PingSocket::bind(addr, shared.cluster.clone()).unwrap();
                let status_of = shared.clone();
                set.lock().unwrap().spawn(socket.serve(move || NodeStatus {
                    node_id: id,
                    role: if status_of.leader.load(Ordering::SeqCst) == id {
                        Role::Leader
                    } else {
                        Role::Follower
                    },
                    applied: status_of.applied(),
                }));
            }
            let inner_set = set.clone();
            let node_shared = shared.clone();
            let tls = tls.clone();
            set.lock().unwrap().spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let node_shared = node_shared.clone();
                    let tls = tls.clone();
                    inner_set.lock().unwrap().spawn(async move {
                        let Ok(stream) = proto::accept_tls(stream, tls).await else {
                            return;
                        };
                        let binding = proto::tls::stream_binding(&stream).unwrap();
                        let server = MockChat {
                            id,
                            shared: node_shared.clone(),
                            binding,
                            challenge: Arc::default(),
                            user: Arc::default(),
                        };
                        let conns = node_shared.clone();
                        conns.open_conns.fetch_add(1, Ordering::SeqCst);
                        BaseChannel::with_defaults(proto::framed(stream))
                            .execute(proto::Chat::serve(server))
                            .for_each(|response| async move {
                                tokio::spawn(response);
                            })
                            .await;
                        conns.open_conns.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            });
            shared
                .nodes
                .lock()
                .unwrap()
                .push((id, addr, Arc::new(AtomicBool::new(true))));
            tasks.push(set);
        }
        let socket = DiscoverySocket::bind(
            0,
            proto::discovery::DEFAULT_BROADCAST,
            shared.cluster.clone(),
        )
        .unwrap();
        let discovery_port = socket.local_addr().unwrap().port();
        let disc_shared = shared.clone();
        let discovery = tokio::spawn(async move {
            while let Ok((packet, from)) = socket.recv().await {
                if !matches!(packet, Packet::Probe { .. }) {
                    continue;
                }
                let nodes = disc_shared.nodes.lock().unwrap().clone();
                let leader = disc_shared.leader.load(Ordering::SeqCst);
                for (id, addr, alive) in nodes {
                    if !alive.load(Ordering::SeqCst) {
                        continue;
                    }
                    let announce = NodeAnnounce {
                        cluster: disc_shared.cluster.clone(),
                        node_id: id,
                        client_addr: addr,
                        raft_addr: addr,
                        metrics_addr: addr,
                        role: if id == leader {
                            Role::Leader
                        } else {
                            Role::Follower
                        },
                        leader: Some(leader),
                        term: 1,
                        applied: disc_shared.applied(),
                        voter: true,
                        started_ms: 0,
                        name: format!("n{id}"),
                    };
                    let _ = socket.send_to(&Packet::Announce(announce), from).await;
                }
            }
        });
        Mock {
            shared,
            ca,
            discovery_port,
            tasks,
            _discovery: discovery,
        }
    }

    /// Like kill -9: the listener and every connection of node `id` go away at once.
    fn kill(&self, id: u64) {
        self.tasks[(id - 1) as usize].lock().unwrap().abort_all();
        for (node, _, alive) in self.shared.nodes.lock().unwrap().iter() {
            if *node == id {
                alive.store(false, Ordering::SeqCst);
            }
        }
    }

    fn config(&self, name: &str) -> ClientConfig {
        ClientConfig {
            identity: Some(Identity::ephemeral(name, None)),
            token: Some(proto::tls::JoinToken::generate(self.ca)),
            probe_interval: Duration::from_millis(200),
            ..ClientConfig::new(self.shared.cluster.clone(), self.discovery_port)
        }
    }
}

async fn receive(sub: &mut cellchat_client::Subscription, count: usize) -> Vec<WireMessage> {
    let mut got = Vec::new();
    while got.len() < count {
        match tokio::time::timeout(Duration::from_secs(20), sub.recv()).await {
            Ok(Some(Ok(m))) => got.push(m),
            other => panic!("after {} messages: {other:?}", got.len()),
        }
    }
    got
}

fn seqs(messages: &[WireMessage]) -> Vec<u64> {
    messages.iter().map(|m| m.seq).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_follow_the_leader_and_subscriptions_see_dense_seqs() {
    let mock = Mock::start(3, 2).await;
    let alice = Client::connect(mock.config("alice")).await.unwrap();
    let bob = Client::connect(mock.config("bob")).await.unwrap();
    let mut sub = bob.subscribe("general", 0);
    for i in 0..5 {
        alice
            .send_text("general", &format!("m{i}"), None)
            .await
            .unwrap();
    }
    // Leadership moves: the old leader answers NotLeader with a hint and the client follows.
    mock.shared.leader.store(3, Ordering::SeqCst);
    for i in 5..10 {
        alice
            .send_text("general", &format!("m{i}"), None)
            .await
            .unwrap();
    }
    assert_eq!(alice.status().leader, Some(3));
    let got = receive(&mut sub, 10).await;
    assert_eq!(seqs(&got), (1..=10).collect::<Vec<_>>());
    let opened = crypto::open_message(
        &crypto::Keys::default(),
        "c1",
        "general",
        "alice",
        got[9].client_seq,
        None,
        &got[9].body,
    );
    assert_eq!(opened.content().display(), "m9");
    assert_eq!(mock.shared.applied_sends.load(Ordering::SeqCst), 10);
    // Read-your-writes: the read token covers every send.
    assert!(alice.read_token() >= 10);
    let servers = bob.servers().await;
    assert_eq!(servers.len(), 3);
    assert_eq!(servers.iter().filter(|s| s.reading).count(), 1);
    assert!(servers.iter().all(|s| s.rtt_ms.is_some()), "{servers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_moves_off_a_killed_node_without_gap_or_duplicate() {
    let mock = Mock::start(3, 1).await;
    let alice = Client::connect(mock.config("alice")).await.unwrap();
    let bob = Client::connect(mock.config("bob")).await.unwrap();
    let mut sub = bob.subscribe("general", 0);
    for i in 0..10 {
        alice
            .send_text("general", &format!("m{i}"), None)
            .await
            .unwrap();
    }
    let mut got = receive(&mut sub, 10).await;
    let victim = bob.status().reading.unwrap();
    // Keep the leader alive so sends go on; kill the reader if it is not the leader, else
    // move the leadership first.
    if victim == 1 {
        mock.shared.leader.store(2, Ordering::SeqCst);
    }
    mock.kill(victim);
    let killed = Instant::now();
    alice
        .send_text("general", "after the kill", None)
        .await
        .unwrap();
    got.extend(receive(&mut sub, 1).await);
    let failover = killed.elapsed();
    for i in 11..30 {
        alice
            .send_text("general", &format!("m{i}"), None)
            .await
            .unwrap();
    }
    got.extend(receive(&mut sub, 19).await);
    assert_eq!(seqs(&got), (1..=30).collect::<Vec<_>>());
    assert_ne!(bob.status().reading, Some(victim));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sub.recv())
            .await
            .is_err(),
        "no duplicate after the last message"
    );
    eprintln!("failover to the next message took {failover:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_are_waited_out_and_reported_and_the_message_lands_once() {
    let mock = Mock::start(1, 1).await;
    let alice = Client::connect(mock.config("alice")).await.unwrap();
    let mut events = alice.events();
    mock.shared.rate_limited.store(3, Ordering::SeqCst);
    let reply = alice.send_text("general", "hello", None).await.unwrap();
    assert_eq!(reply.seq, 1);
    let mut limited = 0;
    while let Ok(event) = events.try_recv() {
        if matches!(event, ClientEvent::RateLimited { retry_after_ms: 20 }) {
            limited += 1;
        }
    }
    assert_eq!(limited, 3);
    assert_eq!(mock.shared.applied_sends.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_key_is_applied_once_and_answers_the_original_seq() {
    let mock = Mock::start(2, 1).await;
    let alice = Client::connect(mock.config("alice")).await.unwrap();
    let id = [7; 16];
    let first = alice
        .send_with_key("general", vec![0, b'a'], id, 1)
        .await
        .unwrap();
    let again = alice
        .send_once("general", vec![0, b'a'], id, 1)
        .await
        .unwrap();
    assert_eq!((first.seq, first.duplicate), (1, false));
    assert_eq!((again.seq, again.duplicate), (1, true));
    assert_eq!(mock.shared.applied_sends.load(Ordering::SeqCst), 1);
    // A single attempt on a follower reports NotLeader and learns the leader for next time.
    mock.shared.leader.store(2, Ordering::SeqCst);
    let err = alice
        .send_once("general", vec![0, b'b'], id, 2)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Api(ApiError::NotLeader { .. })),
        "{err:?}"
    );
    let ok = alice
        .send_once("general", vec![0, b'b'], id, 2)
        .await
        .unwrap();
    assert_eq!(ok.seq, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_name_and_a_dead_cluster_give_clear_errors() {
    let mock = Mock::start(1, 1).await;
    let owner = Identity::ephemeral("dave", Some([1; 32]));
    let dave = Client::connect(ClientConfig {
        identity: Some(owner),
        send_retry_budget: Duration::from_secs(2),
        ..mock.config("x")
    })
    .await
    .unwrap();
    let err = Client::connect(mock.config("dave"))
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, Error::NameTaken { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("name dave is registered with another key"),
        "{err}"
    );

    mock.kill(1);
    let err = dave
        .send_text("general", "anyone?", None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::RetriesExhausted { .. }), "{err:?}");
    assert!(err.to_string().contains("gave up after"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_server_says_where_it_looked() {
    let config = ClientConfig {
        identity: None,
        discovery_window: Duration::from_millis(50),
        join: vec!["127.0.0.1:9".parse().unwrap()],
        ..ClientConfig::new("nobody-here", 9)
    };
    let err = Client::connect(config).await.err().expect("nothing there");
    let text = err.to_string();
    assert!(matches!(err, Error::NoServers { .. }), "{err:?}");
    assert!(text.contains("127.255.255.255:9"), "{text}");
    assert!(text.contains("127.0.0.1:9"), "{text}");
    assert!(text.contains("--join"), "{text}");
}

/// Waits until `check` holds, polling every 50 ms, for at most 20 s.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_client_holds_one_connection_and_still_measures_every_node() {
    let mock = Mock::start(3, 1).await;
    let alice = Client::connect(ClientConfig {
        writer_idle: Duration::from_millis(300),
        ..mock.config("alice")
    })
    .await
    .unwrap();
    let mut sub = alice.subscribe("general", 0);
    alice.send_text("general", "hi", None).await.unwrap();
    assert_eq!(receive(&mut sub, 1).await[0].seq, 1);
    let conns = || mock.shared.open_conns.load(Ordering::SeqCst);
    // Reader and writer: one connection if they are the same node, else two. Right after
    // connecting a third may be open until the next prune (seen once in CI under load, cause
    // not traced; a first reader picked before any RTT was measured and then replaced by a
    // nearer one would do it). The checks that follow are the ones that must hold for good.
    eventually("at most the reader's and the writer's connections", || {
        conns() <= 2
    })
    .await;
    // The write connection closes once idle; the subscription's stays.
    eventually("one connection left", || conns() == 1).await;
    for _ in 0..3 {
        let servers = alice.servers().await;
        assert_eq!(servers.len(), 3);
        assert!(
            servers.iter().all(|s| s.rtt_ms.is_some() && !s.down),
            "{servers:?}"
        );
        assert_eq!(servers.iter().filter(|s| s.role == "leader").count(), 1);
        assert!(servers.iter().all(|s| s.applied == 1), "{servers:?}");
        assert_eq!(conns(), 1, "measuring nodes opened connections");
    }
    // The next send opens the write connection again and logs in on it.
    alice.send_text("general", "again", None).await.unwrap();
    assert_eq!(receive(&mut sub, 1).await[0].seq, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_that_drop_udp_pings_are_measured_over_tcp() {
    let mock = Mock::start_with(3, 2, UdpPings::Dropped).await;
    let alice = Client::connect(mock.config("alice")).await.unwrap();
    let servers = alice.servers().await;
    assert_eq!(servers.len(), 3);
    assert!(
        servers.iter().all(|s| s.rtt_ms.is_some() && !s.down),
        "{servers:?}"
    );
    assert_eq!(alice.status().leader, Some(2));
    let mut sub = alice.subscribe("general", 0);
    alice.send_text("general", "hi", None).await.unwrap();
    assert_eq!(receive(&mut sub, 1).await[0].seq, 1);
    // One connection per node, kept for the TCP pings; none more. (A connection opened while
    // the client was still finding its nodes may take a refresh round to close.)
    let conns = || mock.shared.open_conns.load(Ordering::SeqCst);
    eventually("one connection per node", || conns() == 3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(conns(), 3, "connections beyond one per node reappeared");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_pages_are_paged_on_by_subscriptions_and_recent_history() {
    let mock = Mock::start(3, 1).await;
    mock.shared.page_max.store(3, Ordering::SeqCst);
    let alice = Client::connect(mock.config("alice")).await.unwrap();
    for i in 0..10 {
        alice
            .send_text("general", &format!("m{i}"), None)
            .await
            .unwrap();
    }
    // One page is cut short ...
    let page = alice.history("general", None, 8).await.unwrap();
    assert_eq!(seqs(&page.messages), vec![8, 9, 10]);
    // ... but the last 8 come in order, without gap, from several pages.
    let recent = alice.recent("general", 8).await.unwrap();
    assert_eq!(seqs(&recent.messages), (3..=10).collect::<Vec<_>>());
    let all = alice.recent("general", 50).await.unwrap();
    assert_eq!(seqs(&all.messages), (1..=10).collect::<Vec<_>>());
    // A subscription polls on from the last message of each short batch.
    let mut sub = alice.subscribe("general", 0);
    assert_eq!(
        seqs(&receive(&mut sub, 10).await),
        (1..=10).collect::<Vec<_>>()
    );
}
