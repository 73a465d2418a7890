//! [`Client`]: discovery, the node table with RTT ranking (UDP pings), connections only where
//! needed, reads from the nearest node, idempotent sends through the leader.
//!
//! Connections: a client opens a TCP connection to a node only to read from it (its reader) or
//! to send (the leader, on the first send, or at connect to log in), at most one per node, and
//! the reader's and the writer's are the same connection when they are the same node. Each
//! refresh round closes the rest: a former reader's after a move, the writer's once it has been
//! idle for `writer_idle`. RTTs, roles and applied indexes of every node come from UDP pings to
//! each node's client address ([`proto::discovery::PingSocket`]), so an idle subscribed client
//! holds exactly one server connection. A node that has never answered a UDP ping (a firewall,
//! a node that could not bind its ping socket) is measured over TCP instead, on a connection
//! kept for that purpose.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use proto::discovery::{DiscoverySocket, NodeAnnounce, Packet};
use proto::{
    ApiError, ChannelInfo, ChatClient, ClusterInfo, Hello, HistoryRequest, LeaderHint, Login,
    MessageBatch, RejectReason, Role, SendReply, SendRequest,
};
use serde::Serialize;
use tarpc::client::RpcError;
use tokio::sync::{broadcast, watch};

use crate::config::ClientConfig;
use crate::crypto::{self, ChannelKey};
use crate::error::Error;
use crate::identity::{self, Identity};

/// How long a node that failed is passed over when choosing where to read or write.
const DOWN_COOLDOWN: Duration = Duration::from_secs(2);
/// How long after marking a node down a leader hint naming it again lifts the mark. Live
/// nodes stop naming a dead leader once they campaign, tens of ms after a kill (the dead-leader
/// watch) and at most an election timeout later; one that still names it this long after our
/// failure has heard from it since, so that failure was ours (a connection broken by the
/// election, say), and the node leads.
const HINT_OUTWEIGHS_DOWN_AFTER: Duration = Duration::from_millis(250);
/// First retry delay of a send; doubles per attempt up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(25);
/// Longest retry delay between two attempts (rate limits excepted: they say how long).
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Longest retry delay while the cluster is between leaders (no node names one) or the node
/// tried is gone: an election takes the leader lease plus an election timeout (360-480 ms by default), so waiting
/// up to a second would add most of a second to every failover. Within the default budget of
/// 200 attempts this still keeps retrying for 10-20 s.
const ELECTION_BACKOFF_MAX: Duration = Duration::from_millis(100);
/// Reads move to a faster node only when it saves at least this much RTT (and halves it), so
/// sub-millisecond noise on one host does not bounce streams between nodes.
const RERANK_GAIN_MS_MIN: f64 = 1.0;
/// Weight of a new RTT sample in the smoothed RTT.
const RTT_ALPHA: f64 = 0.3;
/// UDP pings per node and probe round before the node counts as silent: one lost datagram is
/// not a failure.
const PING_ATTEMPTS: u32 = 3;
/// Shortest wait for pongs after one round of pings. With [`PING_ATTEMPTS`] it bounds how fast a
/// hung node is passed over: at most one probe interval plus 3 x 250 ms on a LAN.
const PONG_WAIT_MIN: Duration = Duration::from_millis(250);
/// Longest wait for pongs after one round of pings (far nodes wait 4 x their smoothed RTT).
const PONG_WAIT_MAX: Duration = Duration::from_secs(1);
/// Wait for pongs from a node whose RTT is not measured yet.
const PONG_WAIT_UNMEASURED: Duration = Duration::from_millis(500);
/// Discovery rounds run every this many probe intervals, to find nodes that joined.
const DISCOVERY_EVERY: u32 = 5;
/// Capacity of the event channel; slow listeners miss the oldest events.
const EVENTS_CAPACITY: usize = 256;

/// Something the client did on its own that a user may want to know about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// A send was rate limited and waits `retry_after_ms` before its next attempt.
    RateLimited {
        /// The wait the node asked for.
        retry_after_ms: u64,
    },
    /// Reads moved to another node.
    ReaderChanged {
        /// The previous node, if any.
        from: Option<u64>,
        /// The new node.
        to: u64,
    },
    /// The client learned of a new leader.
    LeaderChanged {
        /// The leader's node id.
        leader: u64,
    },
}

/// One node as this client sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServerInfo {
    /// Node id.
    pub id: u64,
    /// The node's name (`server --name`); empty until its announcement was heard.
    pub name: String,
    /// Its Raft role as last seen.
    pub role: String,
    /// Address of its chat service.
    pub client_addr: SocketAddr,
    /// Smoothed round trip of the RPC `ping`, in ms; `None` until measured or while down.
    pub rtt_ms: Option<f64>,
    /// Its applied log index as last seen.
    pub applied: u64,
    /// Whether this client reads from it.
    pub reading: bool,
    /// Whether this client believes it leads.
    pub leader: bool,
    /// Whether it failed recently and is passed over.
    pub down: bool,
}

/// A snapshot for a status line.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    /// The node reads go to.
    pub reading: Option<u64>,
    /// Its name, when its announcement was heard.
    pub reading_name: Option<String>,
    /// Its smoothed RTT in ms.
    pub reading_rtt_ms: Option<f64>,
    /// The leader, if known.
    pub leader: Option<u64>,
    /// The leader's name, when its announcement was heard.
    pub leader_name: Option<String>,
}

#[derive(Debug, Clone)]
struct NodeState {
    client_addr: SocketAddr,
    /// From the node's announcement; empty until one was heard.
    name: String,
    role: Role,
    applied: u64,
    rtt_ms: Option<f64>,
    down_until: Option<Instant>,
    /// How the last answered probe reached it; `None` until one was answered at this address.
    probed: Option<Probe>,
}

/// How a node's RTT is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    /// UDP pings to its ping socket: no connection needed.
    Udp,
    /// The RPC `ping`, for a node that has never answered UDP at this address; its connection
    /// is kept open for this.
    Tcp,
}

impl NodeState {
    fn new(client_addr: SocketAddr) -> Self {
        Self {
            client_addr,
            name: String::new(),
            role: Role::Unknown,
            applied: 0,
            rtt_ms: None,
            down_until: None,
            probed: None,
        }
    }

    fn is_down(&self, now: Instant) -> bool {
        self.down_until.is_some_and(|t| t > now)
    }
}

/// The nodes known to this client.
///
/// Invariants: `reading` and `leader`, when set, name nodes in `nodes`.
#[derive(Debug, Default)]
struct Table {
    nodes: BTreeMap<u64, NodeState>,
    leader: Option<u64>,
    reading: Option<u64>,
}

impl Table {
    /// Healthy nodes first, then by RTT (unmeasured last), then by id.
    fn ranked(&self, now: Instant) -> Vec<u64> {
        let mut ids: Vec<u64> = self.nodes.keys().copied().collect();
        ids.sort_by(|a, b| {
            let (na, nb) = (&self.nodes[a], &self.nodes[b]);
            let key = |n: &NodeState| (n.is_down(now), n.rtt_ms.is_none());
            key(na)
                .cmp(&key(nb))
                .then(
                    na.rtt_ms
                        .unwrap_or(0.0)
                        .total_cmp(&nb.rtt_ms.unwrap_or(0.0)),
                )
                .then(a.cmp(b))
        });
        ids
    }

    /// Records the node a leader hint names (see `Inner::learn_hint`); lifts its down mark
    /// when it is not the leader already recorded, or when the mark is at least
    /// [`HINT_OUTWEIGHS_DOWN_AFTER`] old.
    fn learn_hint(&mut self, hint: &LeaderHint, now: Instant) {
        let news = self.leader != Some(hint.id);
        let node = self.upsert(hint.id, hint.client_addr);
        // `down_until` is the mark's time plus DOWN_COOLDOWN.
        let old_mark = node.down_until.is_some_and(|until| {
            until.saturating_duration_since(now) + HINT_OUTWEIGHS_DOWN_AFTER <= DOWN_COOLDOWN
        });
        if news || old_mark {
            node.down_until = None;
        }
    }

    fn upsert(&mut self, id: u64, client_addr: SocketAddr) -> &mut NodeState {
        let node = self
            .nodes
            .entry(id)
            .or_insert_with(|| NodeState::new(client_addr));
        if node.client_addr != client_addr {
            // The node restarted on another port: old measurements are void.
            *node = NodeState::new(client_addr);
        }
        node
    }
}

/// A client of one cellchat cluster; cheap to clone, every clone shares one session (client id,
/// client seqs, read token, connections).
///
/// Invariants:
/// - `(client_id, client_seq)` of a message never changes across its retries, and a new message
///   always gets a client seq above every earlier one of this client.
/// - The read token only grows; every read passes it, so reads are monotonic and include this
///   client's acknowledged sends, whichever node answers.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
    _refresher: Arc<AbortOnDrop>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub(crate) struct Inner {
    pub(crate) config: ClientConfig,
    identity: Option<Identity>,
    client_id: [u8; 16],
    next_seq: AtomicU64,
    read_token: AtomicU64,
    table: Mutex<Table>,
    /// Open connections that said hello, at most one per node; the writer's is among them.
    conns: Mutex<HashMap<u64, Conn>>,
    /// Numbers connections, so a login marks the one it was made on.
    conn_serial: AtomicU64,
    /// The node sends go to; its connection in `conns` is logged in. The lock serializes
    /// logins.
    writer: tokio::sync::Mutex<Option<u64>>,
    /// When a send last used the writer, to close an idle write connection.
    last_write: Mutex<Instant>,
    /// When a read RPC (history, channels, a long poll) last used a connection: the reader's
    /// connection closes after `writer_idle` without one (pushed streams have their own).
    last_read: Mutex<Instant>,
    /// Long polls in flight: the reader's RPC connection stays open while any runs.
    polls_in_flight: std::sync::atomic::AtomicUsize,
    /// The UDP socket for discovery rounds and RTT pings; a round holds it while it reads the
    /// replies, so rounds never take each other's.
    socket: tokio::sync::Mutex<DiscoverySocket>,
    events: broadcast::Sender<ClientEvent>,
    /// Bumped whenever a node is marked down or reads move, so long polls on the old node stop
    /// waiting.
    pub(crate) route_tx: watch::Sender<u64>,
    /// Push connections for subscriptions, one per node (`push.rs`).
    pub(crate) push: crate::push::PushPool,
}

/// One open connection to a node.
#[derive(Clone)]
struct Conn {
    client: ChatClient,
    /// From [`Inner::conn_serial`].
    serial: u64,
    /// The unused login challenge of its hello; a login attempt takes it.
    challenge: Option<[u8; 32]>,
    /// Whether it logged in, so it can send.
    logged_in: bool,
}

/// A long poll in flight; see [`Inner::poll_guard`].
pub(crate) struct PollGuard<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for PollGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why one attempt on one node failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The node is unreachable or the connection broke; the node is marked down.
    Transport(String),
    /// The node answered with an error.
    Api(ApiError),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Transport(reason) => f.write_str(reason),
            Failure::Api(e) => write!(f, "{e}"),
        }
    }
}

fn ctx(timeout: Duration) -> tarpc::context::Context {
    let mut ctx = tarpc::context::current();
    ctx.deadline = Instant::now() + timeout;
    ctx
}

impl Client {
    /// Finds the cluster's nodes, measures them, picks the nearest for reads, and logs in on
    /// the leader when the config names a user.
    ///
    /// # Errors
    ///
    /// [`Error::NoServers`] (saying where it looked), [`Error::NameTaken`], [`Error::Identity`],
    /// [`Error::Config`], or [`Error::RetriesExhausted`] when no leader accepted the login.
    pub async fn connect(config: ClientConfig) -> Result<Client, Error> {
        config.validate().map_err(Error::Config)?;
        let identity = match (&config.identity, &config.name) {
            (Some(identity), _) => Some(identity.clone()),
            (None, Some(name)) => {
                let dir = identity::config_dir(config.config_dir.as_deref())?;
                Some(Identity::load_or_create(&dir, &config.cluster, name)?)
            }
            (None, None) => None,
        };
        let (route_tx, _) = watch::channel(0);
        let socket = DiscoverySocket::ephemeral(
            config.discovery_port,
            config.broadcast,
            config.cluster.clone(),
        )
        .map_err(Error::Discovery)?;
        let inner = Arc::new(Inner {
            identity,
            client_id: rand::random(),
            next_seq: AtomicU64::new(1),
            read_token: AtomicU64::new(0),
            table: Mutex::new(Table::default()),
            conns: Mutex::new(HashMap::new()),
            conn_serial: AtomicU64::new(0),
            writer: tokio::sync::Mutex::new(None),
            last_write: Mutex::new(Instant::now()),
            last_read: Mutex::new(Instant::now()),
            polls_in_flight: std::sync::atomic::AtomicUsize::new(0),
            socket: tokio::sync::Mutex::new(socket),
            events: broadcast::channel(EVENTS_CAPACITY).0,
            route_tx,
            config,
            push: crate::push::PushPool::default(),
        });
        inner.initial_discovery().await?;
        inner.probe_all().await;
        inner.rerank();
        if inner.identity.is_some() {
            inner.establish_writer().await?;
        }
        let refresher = tokio::spawn(refresh_loop(Arc::downgrade(&inner)));
        Ok(Client {
            inner,
            _refresher: Arc::new(AbortOnDrop(refresher)),
        })
    }

    /// This client's random idempotency id.
    pub fn client_id(&self) -> [u8; 16] {
        self.inner.client_id
    }

    /// The logged-in user name, if any.
    pub fn name(&self) -> Option<&str> {
        self.inner.identity.as_ref().map(Identity::name)
    }

    /// The cluster name.
    pub fn cluster_name(&self) -> &str {
        &self.inner.config.cluster
    }

    /// The highest read token seen (send replies and batches' `applied`).
    pub fn read_token(&self) -> u64 {
        self.inner.read_token.load(Ordering::Acquire)
    }

    /// Raises the read token to at least `token` (for example one handed over by another
    /// session).
    pub fn observe_read_token(&self, token: u64) {
        self.inner.observe(token);
    }

    /// Takes the client seq for a new message; use it with [`send_with_key`](Self::send_with_key)
    /// when the body must know it (encryption binds it).
    pub fn next_client_seq(&self) -> u64 {
        self.inner.next_seq.fetch_add(1, Ordering::AcqRel)
    }

    /// Events such as rate limits and reader changes.
    pub fn events(&self) -> broadcast::Receiver<ClientEvent> {
        self.inner.events.subscribe()
    }

    /// Sends `body` as a new message, retrying until acknowledged or the retry budget runs out.
    ///
    /// # Errors
    ///
    /// As [`send_with_key`](Self::send_with_key).
    pub async fn send(&self, channel: &str, body: Vec<u8>) -> Result<SendReply, Error> {
        let seq = self.next_client_seq();
        self.send_with_key(channel, body, self.client_id(), seq)
            .await
    }

    /// Sends `text` as a new message: encrypted with `key` when given, else as plaintext
    /// (body formats in [`crypto`](crate::crypto)).
    ///
    /// # Errors
    ///
    /// [`Error::NoIdentity`] without a name (the sender is bound into the ciphertext), else as
    /// [`send_with_key`](Self::send_with_key).
    pub async fn send_text(
        &self,
        channel: &str,
        text: &str,
        key: Option<&ChannelKey>,
    ) -> Result<SendReply, Error> {
        let seq = self.next_client_seq();
        let body = match key {
            Some(key) => {
                let name = self.name().ok_or(Error::NoIdentity)?;
                key.seal(name, seq, text)?
            }
            None => crypto::plain_body(text),
        };
        self.send_with_key(channel, body, self.client_id(), seq)
            .await
    }

    /// Sends with a caller-chosen idempotency key, retrying with that same key: NotLeader
    /// redials the leader it names, rate limits wait the time the node asks for (and emit
    /// [`ClientEvent::RateLimited`]), other retryable errors back off exponentially
    /// (25 ms doubling to 1 s). The message is applied at most once whatever happens.
    ///
    /// # Errors
    ///
    /// [`Error::NoIdentity`], [`Error::NameTaken`], [`Error::Api`] for a rejection, or
    /// [`Error::RetriesExhausted`] after `send_attempts_max` attempts or `send_retry_budget`.
    pub async fn send_with_key(
        &self,
        channel: &str,
        body: Vec<u8>,
        client_id: [u8; 16],
        client_seq: u64,
    ) -> Result<SendReply, Error> {
        let request = SendRequest {
            channel: channel.to_owned(),
            body,
            client_id,
            client_seq,
        };
        self.inner.send_retrying(request).await
    }

    /// One send attempt on the node this client believes leads, without retries: for callers
    /// that record ambiguous outcomes themselves. A NotLeader answer still updates the leader
    /// for the next call.
    ///
    /// # Errors
    ///
    /// [`Error::Api`] with the node's answer, [`Error::Unreachable`] when the node could not be
    /// reached or the connection broke (the outcome is then unknown), [`Error::NameTaken`],
    /// [`Error::NoIdentity`].
    pub async fn send_once(
        &self,
        channel: &str,
        body: Vec<u8>,
        client_id: [u8; 16],
        client_seq: u64,
    ) -> Result<SendReply, Error> {
        let request = SendRequest {
            channel: channel.to_owned(),
            body,
            client_id,
            client_seq,
        };
        if self.inner.identity.is_none() {
            return Err(Error::NoIdentity);
        }
        let (node, conn) = self
            .inner
            .writer_conn()
            .await
            .map_err(|e| self.inner.fatal(e))?;
        match self.inner.send_on(node, &conn, request).await {
            Ok(reply) => Ok(reply),
            Err(Failure::Api(e)) => Err(Error::Api(e)),
            Err(Failure::Transport(reason)) => Err(Error::Unreachable {
                node: Some(node),
                reason,
            }),
        }
    }

    /// Up to `limit` messages of `channel` before `before_seq` (newest page when `None`), in
    /// ascending seq order, from the nearest healthy node.
    ///
    /// # Errors
    ///
    /// [`Error::Api`] for a rejection (bad channel name), [`Error::RetriesExhausted`] when no
    /// node could answer.
    pub async fn history(
        &self,
        channel: &str,
        before_seq: Option<u64>,
        limit: u32,
    ) -> Result<MessageBatch, Error> {
        self.history_request(channel, before_seq, None, limit).await
    }

    /// Up to `limit` messages of `channel` from `from_seq` on, ascending.
    ///
    /// # Errors
    ///
    /// As [`history`](Self::history).
    pub async fn history_from(
        &self,
        channel: &str,
        from_seq: u64,
        limit: u32,
    ) -> Result<MessageBatch, Error> {
        self.history_request(channel, None, Some(from_seq), limit)
            .await
    }

    async fn history_request(
        &self,
        channel: &str,
        before_seq: Option<u64>,
        from_seq: Option<u64>,
        limit: u32,
    ) -> Result<MessageBatch, Error> {
        let inner = &self.inner;
        let timeout = inner.config.request_timeout;
        let batch = inner
            .read(|conn| {
                let request = HistoryRequest {
                    channel: channel.to_owned(),
                    before_seq,
                    from_seq,
                    limit,
                    read_token: inner.token(),
                };
                async move { conn.history(ctx(timeout), request).await }
            })
            .await?;
        inner.observe(batch.applied);
        Ok(batch)
    }

    /// Every channel with its head seq, from the nearest healthy node.
    ///
    /// # Errors
    ///
    /// [`Error::RetriesExhausted`] when no node could answer.
    pub async fn channels(&self) -> Result<Vec<ChannelInfo>, Error> {
        let timeout = self.inner.config.request_timeout;
        self.inner
            .read(|conn| async move { conn.channels(ctx(timeout)).await })
            .await
    }

    /// The cluster as the nearest healthy node sees it; also refreshes this client's table.
    ///
    /// # Errors
    ///
    /// [`Error::RetriesExhausted`] when no node could answer.
    pub async fn cluster(&self) -> Result<ClusterInfo, Error> {
        let timeout = self.inner.config.request_timeout;
        let info = self
            .inner
            .read(|conn| async move { conn.cluster(ctx(timeout)).await })
            .await?;
        self.inner.merge_cluster(&info);
        Ok(info)
    }

    /// Every known node with fresh RTTs, sorted by id.
    pub async fn servers(&self) -> Vec<ServerInfo> {
        // Best effort: the table still lists what is known when the refresh fails.
        let _ = self.cluster().await;
        self.inner.probe_all().await;
        self.inner.rerank();
        self.inner.servers()
    }

    /// The node reads go to, its RTT, and the leader, without any network call.
    pub fn status(&self) -> Status {
        let table = self.inner.table.lock();
        let reading_rtt_ms = table
            .reading
            .and_then(|id| table.nodes.get(&id))
            .and_then(|n| n.rtt_ms);
        let name_of = |id: Option<u64>| {
            id.and_then(|id| table.nodes.get(&id))
                .map(|n| n.name.clone())
                .filter(|name| !name.is_empty())
        };
        Status {
            reading: table.reading,
            reading_name: name_of(table.reading),
            reading_rtt_ms,
            leader: table.leader,
            leader_name: name_of(table.leader),
        }
    }
}

impl Inner {
    pub(crate) fn token(&self) -> u64 {
        self.read_token.load(Ordering::Acquire)
    }

    pub(crate) fn observe(&self, token: u64) {
        self.read_token.fetch_max(token, Ordering::AcqRel);
    }

    pub(crate) fn addr_of(&self, node: u64) -> Option<SocketAddr> {
        self.table.lock().nodes.get(&node).map(|n| n.client_addr)
    }

    pub(crate) fn is_down(&self, node: u64) -> bool {
        let now = Instant::now();
        self.table
            .lock()
            .nodes
            .get(&node)
            .is_none_or(|n| n.is_down(now))
    }

    /// Passes over `node` for [`DOWN_COOLDOWN`] and drops its connection.
    pub(crate) fn mark_down(&self, node: u64, reason: &str) {
        self.conns.lock().remove(&node);
        self.pass_over(node, reason);
    }

    /// Passes over `node` for [`DOWN_COOLDOWN`] but keeps its connection: for a node that
    /// missed its pings, whose connection may still work (a send on it fails on its own if not).
    fn pass_over(&self, node: u64, reason: &str) {
        {
            let mut table = self.table.lock();
            if let Some(state) = table.nodes.get_mut(&node) {
                state.down_until = Some(Instant::now() + DOWN_COOLDOWN);
                state.rtt_ms = None;
            }
            if table.reading == Some(node) {
                table.reading = None;
            }
        }
        tracing::debug!(node, reason, "node marked down");
        self.route_tx.send_modify(|generation| *generation += 1);
    }

    fn set_leader(&self, leader: u64) {
        let changed = {
            let mut table = self.table.lock();
            let changed = table.leader != Some(leader);
            table.leader = Some(leader);
            changed
        };
        if changed {
            tracing::info!(leader, "leader changed");
            // Nobody listening is fine: events are advisory.
            let _ = self.events.send(ClientEvent::LeaderChanged { leader });
        }
    }

    /// Records the leader a node named. A hint that names a new leader comes from a live node
    /// that just saw it win an election, which outweighs an earlier failure of ours (for
    /// example a broken connection from before the node restarted): its down mark is lifted so
    /// the next send goes straight to it instead of to nodes that keep naming it. So does a
    /// hint that still names it [`HINT_OUTWEIGHS_DOWN_AFTER`] after we marked it down: traced
    /// in `bench failover`, a send to a just-elected leader failed, the hint naming it was no
    /// longer news, and the client asked a follower for 2 s (the whole down mark) while the
    /// follower kept naming the live leader.
    fn learn_hint(&self, hint: &LeaderHint) {
        self.table.lock().learn_hint(hint, Instant::now());
        self.set_leader(hint.id);
    }

    fn merge_announce(&self, announce: &NodeAnnounce) {
        {
            let mut table = self.table.lock();
            let node = table.upsert(announce.node_id, announce.client_addr);
            node.name.clone_from(&announce.name);
            node.role = announce.role;
            node.applied = node.applied.max(announce.applied);
        }
        if announce.role == Role::Leader {
            self.set_leader(announce.node_id);
        }
    }

    pub(crate) fn merge_cluster(&self, info: &ClusterInfo) {
        {
            let mut table = self.table.lock();
            for member in &info.nodes {
                let node = table.upsert(member.id, member.client_addr);
                if member.role != Role::Unknown {
                    node.role = member.role;
                }
                node.applied = node.applied.max(member.applied);
            }
        }
        if let Some(leader) = info.leader {
            if self.table.lock().nodes.contains_key(&leader) {
                self.set_leader(leader);
            }
        }
    }

    fn servers(&self) -> Vec<ServerInfo> {
        let now = Instant::now();
        let table = self.table.lock();
        table
            .nodes
            .iter()
            .map(|(&id, n)| ServerInfo {
                id,
                name: n.name.clone(),
                role: format!("{:?}", n.role).to_lowercase(),
                client_addr: n.client_addr,
                rtt_ms: n.rtt_ms,
                applied: n.applied,
                reading: table.reading == Some(id),
                leader: table.leader == Some(id),
                down: n.is_down(now),
            })
            .collect()
    }

    /// Discovery with growing windows until some node answers.
    async fn initial_discovery(&self) -> Result<(), Error> {
        let socket = self.socket.lock().await;
        for round in 0..3u32 {
            let window = self.config.discovery_window * (1 + 2 * round);
            let found = self.discover(&socket, window).await;
            for announce in &found {
                self.merge_announce(announce);
            }
            if !found.is_empty() {
                return Ok(());
            }
        }
        Err(Error::NoServers {
            cluster: self.config.cluster.clone(),
            broadcast: socket.broadcast_addr(),
            join: self.config.join.clone(),
        })
    }

    /// One discovery round: a broadcast probe and a probe to every join address, then the
    /// announcements heard within `window`.
    async fn discover(&self, socket: &DiscoverySocket, window: Duration) -> Vec<NodeAnnounce> {
        let probe = Packet::Probe {
            cluster: self.config.cluster.clone(),
            nonce: rand::random(),
            from_client: true,
        };
        if let Err(e) = socket.send_broadcast(&probe).await {
            tracing::debug!(error = %e, "discovery broadcast failed");
        }
        for addr in &self.config.join {
            if let Err(e) = socket.send_to(&probe, *addr).await {
                tracing::debug!(error = %e, %addr, "discovery probe to join address failed");
            }
        }
        let mut found = BTreeMap::new();
        let deadline = tokio::time::Instant::now() + window;
        while let Ok(received) = tokio::time::timeout_at(deadline, socket.recv()).await {
            match received {
                Ok((Packet::Announce(announce), _)) => {
                    found.insert(announce.node_id, announce);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "discovery receive failed");
                    break;
                }
            }
        }
        found.into_values().collect()
    }

    /// Opens a connection to `addr` and says hello; returns it with the node id that answered.
    async fn dial(&self, addr: SocketAddr) -> Result<(ChatClient, [u8; 32], u64), Failure> {
        let connect = tokio::time::timeout(self.config.connect_timeout, proto::connect_chat(addr));
        let conn = match connect.await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(Failure::Transport(format!("connect to {addr}: {e}"))),
            Err(_) => return Err(Failure::Transport(format!("connect to {addr}: timed out"))),
        };
        let hello = Hello::new(
            self.config.cluster.clone(),
            self.identity.as_ref().map(|i| i.name().to_owned()),
        );
        match conn.hello(ctx(self.config.request_timeout), hello).await {
            Ok(Ok(welcome)) => Ok((conn, welcome.challenge, welcome.node_id)),
            Ok(Err(e)) => Err(Failure::Api(e)),
            Err(e) => Err(Failure::Transport(format!("hello to {addr}: {e}"))),
        }
    }

    /// A connection to `node` that said hello, reusing an open one.
    pub(crate) async fn read_conn(&self, node: u64) -> Result<ChatClient, Failure> {
        *self.last_read.lock() = Instant::now();
        self.conn(node).await.map(|conn| conn.client)
    }

    /// Marks a long poll in flight until the guard drops (the reader's connection is kept).
    pub(crate) fn poll_guard(&self) -> PollGuard<'_> {
        self.polls_in_flight.fetch_add(1, Ordering::Relaxed);
        PollGuard(&self.polls_in_flight)
    }

    /// The open connection to `node`, if any, without opening one or counting as a read.
    fn open_conn(&self, node: u64) -> Option<ChatClient> {
        self.conns.lock().get(&node).map(|conn| conn.client.clone())
    }

    /// The open connection to `node`, or a new one that said hello.
    async fn conn(&self, node: u64) -> Result<Conn, Failure> {
        if let Some(conn) = self.conns.lock().get(&node) {
            return Ok(conn.clone());
        }
        let addr = self
            .addr_of(node)
            .ok_or_else(|| Failure::Transport(format!("node {node} unknown")))?;
        let (client, challenge, answered) = self.dial(addr).await?;
        if answered != node {
            return Err(Failure::Transport(format!(
                "{addr} is node {answered}, not node {node}"
            )));
        }
        let conn = Conn {
            client,
            serial: self.conn_serial.fetch_add(1, Ordering::Relaxed),
            challenge: Some(challenge),
            logged_in: false,
        };
        // Another task may have dialed the node meanwhile: keep theirs, so there is one
        // connection per node (ours closes when dropped here).
        Ok(self.conns.lock().entry(node).or_insert(conn).clone())
    }

    /// Closes the connections this client no longer uses: all but the reader's and the
    /// writer's (each until it has been idle for `writer_idle`) and those of nodes measured
    /// over TCP. A
    /// connection closes once the last request on it is done.
    fn prune_conns(&self) {
        let writer = match self.writer.try_lock() {
            Ok(mut writer) => {
                if writer.is_some() && self.last_write.lock().elapsed() >= self.config.writer_idle {
                    tracing::debug!(node = ?*writer, "closing the idle write connection");
                    *writer = None;
                }
                *writer
            }
            // A send or a login holds it, so the writer is in use; prune next round.
            Err(_) => return,
        };
        let keep: Vec<u64> = {
            let table = self.table.lock();
            let tcp_probed = table
                .nodes
                .iter()
                .filter(|(_, n)| n.probed == Some(Probe::Tcp))
                .map(|(&id, _)| id);
            let reader = table.reading.filter(|_| {
                self.polls_in_flight.load(Ordering::Relaxed) > 0
                    || self.last_read.lock().elapsed() < self.config.writer_idle
            });
            reader.into_iter().chain(writer).chain(tcp_probed).collect()
        };
        self.conns.lock().retain(|id, _| keep.contains(id));
    }

    /// The node to read from: the current reader if healthy, else the best-ranked node.
    pub(crate) fn pick_reader(&self) -> Option<u64> {
        let now = Instant::now();
        let (from, to) = {
            let mut table = self.table.lock();
            if let Some(id) = table.reading {
                if table.nodes.get(&id).is_some_and(|n| !n.is_down(now)) {
                    return Some(id);
                }
            }
            let to = *table.ranked(now).first()?;
            let from = table.reading.replace(to);
            (from, to)
        };
        tracing::info!(?from, to, "reading from another node");
        // Nobody listening is fine: events are advisory.
        let _ = self.events.send(ClientEvent::ReaderChanged { from, to });
        Some(to)
    }

    /// Moves reads to a clearly faster node (less than half the current RTT), or picks one.
    fn rerank(&self) {
        let now = Instant::now();
        let switch = {
            let table = self.table.lock();
            let best = table.ranked(now).first().copied();
            match (table.reading, best) {
                (Some(current), Some(best)) if current != best => {
                    let rtt = |id: u64| table.nodes.get(&id).and_then(|n| n.rtt_ms);
                    matches!((rtt(current), rtt(best)),
                        (Some(c), Some(b)) if b * 2.0 < c && c - b > RERANK_GAIN_MS_MIN)
                        || table.nodes.get(&current).is_none_or(|n| n.is_down(now))
                }
                _ => false,
            }
        };
        if switch {
            self.table.lock().reading = None;
        }
        let before = self.table.lock().reading;
        if self.pick_reader() != before {
            // Long polls on the old reader stop waiting and move.
            self.route_tx.send_modify(|generation| *generation += 1);
        }
    }

    /// The node reads go to now, without choosing one.
    pub(crate) fn current_reader(&self) -> Option<u64> {
        self.table.lock().reading
    }

    /// Measures every known node and records RTT, role and applied index: UDP pings first
    /// ([`ping_udp`](Self::ping_udp)); a node that missed them all is passed over if it has
    /// answered UDP at this address before (it is hung, gone or cut off), and is pinged over
    /// TCP if it never has (UDP may be filtered on the way to it, or it has no ping socket);
    /// a failed TCP ping marks it down.
    async fn probe_all(&self) {
        let targets: Vec<(u64, SocketAddr, Option<f64>)> = {
            let table = self.table.lock();
            let nodes = table.nodes.iter();
            nodes
                .map(|(&id, n)| (id, n.client_addr, n.rtt_ms))
                .collect()
        };
        let silent = self.ping_udp(&targets).await;
        let mut over_tcp = Vec::new();
        for id in silent {
            let probed = self.table.lock().nodes.get(&id).and_then(|n| n.probed);
            if probed == Some(Probe::Udp) {
                self.pass_over(id, "missed its UDP pings");
            } else {
                over_tcp.push(id);
            }
        }
        let probes = over_tcp
            .into_iter()
            .map(|id| async move { (id, self.ping_tcp(id).await) });
        for (id, result) in futures::future::join_all(probes).await {
            match result {
                Ok((elapsed, pong)) => {
                    self.record_pong(id, elapsed, pong.role, pong.applied, Probe::Tcp);
                }
                Err(e) => self.mark_down(id, &e.to_string()),
            }
        }
    }

    /// Pings `targets` over UDP, each up to [`PING_ATTEMPTS`] times, and records every pong;
    /// returns the nodes that answered none. A pong counts only with the nonce of a ping of
    /// this round and the node id that ping was meant for.
    async fn ping_udp(&self, targets: &[(u64, SocketAddr, Option<f64>)]) -> Vec<u64> {
        let socket = self.socket.lock().await;
        let mut pending: BTreeMap<u64, (SocketAddr, Option<f64>)> = targets
            .iter()
            .map(|&(id, addr, rtt)| (id, (addr, rtt)))
            .collect();
        let mut sent: HashMap<u64, (u64, Instant)> = HashMap::new();
        for _ in 0..PING_ATTEMPTS {
            let mut wait = None;
            for (&id, &(addr, rtt_ms)) in &pending {
                let nonce = rand::random();
                let ping = Packet::Ping {
                    nonce,
                    sent_ns: monotonic_ns(),
                };
                if let Err(e) = socket.send_to(&ping, addr).await {
                    tracing::debug!(node = id, %addr, error = %e, "UDP ping not sent");
                    continue;
                }
                sent.insert(nonce, (id, Instant::now()));
                wait = wait.max(Some(pong_wait(rtt_ms)));
            }
            // Nothing could be sent (an IPv6 address, say): waiting would not help.
            let Some(wait) = wait else { break };
            let deadline = tokio::time::Instant::now() + wait;
            while !pending.is_empty() {
                let Ok(received) = tokio::time::timeout_at(deadline, socket.recv()).await else {
                    break;
                };
                let (nonce, node_id, role, applied) = match received {
                    Ok((
                        Packet::PongStatus {
                            nonce,
                            node_id,
                            role,
                            applied,
                            ..
                        },
                        _,
                    )) => (nonce, node_id, role, applied),
                    // A late announcement or an old-style pong.
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::debug!(error = %e, "receiving pongs failed");
                        break;
                    }
                };
                // Pongs of earlier rounds and from a node other than the one pinged (its
                // address now belongs to another node) do not count.
                let Some(&(id, at)) = sent.get(&nonce) else {
                    continue;
                };
                if id != node_id {
                    tracing::debug!(node = id, answered = node_id, "pong from another node");
                    continue;
                }
                if pending.remove(&id).is_some() {
                    self.record_pong(id, at.elapsed(), role, applied, Probe::Udp);
                }
            }
            if pending.is_empty() {
                break;
            }
        }
        pending.into_keys().collect()
    }

    /// The RPC `ping` on a connection to `id` (kept open while the node is measured this way).
    /// A cached connection that broke since it was last used (the node restarted, say) says
    /// nothing about the node now: it is dropped and the ping retried once on a fresh
    /// connection, so only a node that fails now is marked down.
    async fn ping_tcp(&self, id: u64) -> Result<(Duration, proto::Pong), Failure> {
        let timeout = self.config.request_timeout.min(Duration::from_secs(1));
        let mut redialed = false;
        loop {
            let conn = self.read_conn(id).await?;
            let started = Instant::now();
            match conn.ping(ctx(timeout), rand::random()).await {
                Ok(pong) => return Ok((started.elapsed(), pong)),
                Err(RpcError::Shutdown) if !redialed => {
                    redialed = true;
                    self.forget_conn(id);
                }
                Err(e) => return Err(Failure::Transport(format!("ping: {e}"))),
            }
        }
    }

    /// Drops the cached connection to `node` (a concurrent caller that already replaced it
    /// with a fresh one only pays a redial).
    fn forget_conn(&self, node: u64) {
        self.conns.lock().remove(&node);
    }

    fn record_pong(&self, id: u64, elapsed: Duration, role: Role, applied: u64, probe: Probe) {
        let sample = elapsed.as_secs_f64() * 1000.0;
        {
            let mut table = self.table.lock();
            let Some(node) = table.nodes.get_mut(&id) else {
                return;
            };
            node.rtt_ms = Some(match node.rtt_ms {
                Some(old) => old * (1.0 - RTT_ALPHA) + sample * RTT_ALPHA,
                None => sample,
            });
            node.down_until = None;
            node.role = role;
            node.applied = node.applied.max(applied);
            if probe == Probe::Tcp && node.probed.is_none() {
                tracing::info!(
                    node = id,
                    "node does not answer UDP pings; measuring it over TCP"
                );
            }
            node.probed = Some(probe);
        }
        if role == Role::Leader {
            self.set_leader(id);
        }
    }

    /// Runs a read on the reader, moving to the next node on transport errors and on nodes
    /// that are behind or unavailable, waiting on rate limits; bounded by the send budget.
    async fn read<T, F, Fut>(&self, call: F) -> Result<T, Error>
    where
        F: Fn(ChatClient) -> Fut,
        Fut: std::future::Future<Output = Result<Result<T, ApiError>, RpcError>>,
    {
        let started = Instant::now();
        let mut attempts = 0u32;
        let mut last = String::from("no node known");
        while attempts < self.config.send_attempts_max
            && started.elapsed() < self.config.send_retry_budget
        {
            attempts += 1;
            let Some(node) = self.pick_reader() else {
                tokio::time::sleep(backoff(attempts)).await;
                continue;
            };
            let conn = match self.read_conn(node).await {
                Ok(conn) => conn,
                Err(e) => {
                    last = e.to_string();
                    self.mark_down(node, "connect failed");
                    continue;
                }
            };
            match call(conn).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(ApiError::RateLimited { retry_after_ms })) => {
                    last = format!("rate limited for {retry_after_ms} ms");
                    tokio::time::sleep(Duration::from_millis(retry_after_ms)).await;
                }
                Ok(Err(e)) if e.is_retryable() => {
                    last = e.to_string();
                    self.mark_down(node, "unavailable for reads");
                    tokio::time::sleep(backoff(attempts)).await;
                }
                Ok(Err(e)) => return Err(Error::Api(e)),
                Err(e) => {
                    last = e.to_string();
                    self.mark_down(node, "read failed");
                }
            }
        }
        Err(Error::RetriesExhausted {
            attempts,
            elapsed_ms: started.elapsed().as_millis() as u64,
            last,
        })
    }

    /// Logs in on the leader (or a node that names it), within the retry budget; surfaces a
    /// taken name at once.
    async fn establish_writer(&self) -> Result<(), Error> {
        let started = Instant::now();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let last = match self.writer_conn().await {
                Ok(_) => return Ok(()),
                Err(Failure::Api(e)) if !e.is_retryable() => {
                    return Err(self.fatal(Failure::Api(e)))
                }
                Err(e) => e.to_string(),
            };
            if attempts >= self.config.send_attempts_max
                || started.elapsed() >= self.config.send_retry_budget
            {
                return Err(Error::RetriesExhausted {
                    attempts,
                    elapsed_ms: started.elapsed().as_millis() as u64,
                    last,
                });
            }
            tokio::time::sleep(backoff(attempts)).await;
        }
    }

    /// Maps a non-retryable failure to the error a user should see.
    fn fatal(&self, failure: Failure) -> Error {
        match failure {
            Failure::Api(ApiError::Rejected(RejectReason::NameTaken)) => {
                let identity = self.identity.as_ref();
                Error::NameTaken {
                    name: identity.map_or_else(String::new, |i| i.name().to_owned()),
                    key_path: identity.and_then(|i| i.path().map(ToOwned::to_owned)),
                }
            }
            Failure::Api(e) => Error::Api(e),
            Failure::Transport(reason) => Error::Unreachable { node: None, reason },
        }
    }

    /// The logged-in write connection: to the known leader, else to the best-ranked node
    /// (which names the leader if it is not). It reuses the node's open connection (the
    /// reader's, when that is the same node) and logs in on it if it has not yet.
    async fn writer_conn(&self) -> Result<(u64, ChatClient), Failure> {
        let identity = self
            .identity
            .as_ref()
            .ok_or(Failure::Api(ApiError::Unauthenticated))?;
        let mut writer = self.writer.lock().await;
        *self.last_write.lock() = Instant::now();
        let (leader, target) = {
            let table = self.table.lock();
            let now = Instant::now();
            let target = table
                .leader
                .filter(|id| table.nodes.get(id).is_some_and(|n| !n.is_down(now)))
                .or_else(|| table.ranked(now).first().copied());
            (table.leader, target)
        };
        if let Some(node) = *writer {
            if leader.is_none_or(|l| l == node) {
                let conns = self.conns.lock();
                if let Some(conn) = conns.get(&node).filter(|c| c.logged_in) {
                    return Ok((node, conn.client.clone()));
                }
            }
        }
        *writer = None;
        let target = target.ok_or_else(|| Failure::Transport("no node known".into()))?;
        let conn = match self.conn(target).await {
            Ok(conn) => conn,
            Err(e) => {
                if matches!(e, Failure::Transport(_)) {
                    self.mark_down(target, "connect failed");
                }
                return Err(e);
            }
        };
        if !conn.logged_in {
            self.login(target, &conn, identity).await?;
        }
        *writer = Some(target);
        Ok((target, conn.client))
    }

    /// Logs in on `conn` to `node`, with the challenge of its hello if still unused, else with
    /// a fresh one.
    async fn login(&self, node: u64, conn: &Conn, identity: &Identity) -> Result<(), Failure> {
        let timeout = self.config.request_timeout;
        let unused = self
            .conns
            .lock()
            .get_mut(&node)
            .filter(|c| c.serial == conn.serial)
            .and_then(|c| c.challenge.take());
        let challenge = match unused {
            Some(challenge) => challenge,
            None => {
                let hello = Hello::new(self.config.cluster.clone(), Some(identity.name().into()));
                match conn.client.hello(ctx(timeout), hello).await {
                    Ok(Ok(welcome)) => welcome.challenge,
                    Ok(Err(e)) => return Err(Failure::Api(e)),
                    Err(e) => {
                        self.mark_down(node, "hello failed");
                        return Err(Failure::Transport(format!("hello to node {node}: {e}")));
                    }
                }
            }
        };
        let message = proto::login_message(&challenge, &self.config.cluster, identity.name());
        let login = Login {
            name: identity.name().to_owned(),
            public_key: identity.public_key(),
            signature: identity.sign(&message).to_vec(),
        };
        match conn.client.login(ctx(timeout), login).await {
            Ok(Ok(_session)) => {
                tracing::debug!(node, "logged in");
                let mut conns = self.conns.lock();
                if let Some(c) = conns.get_mut(&node).filter(|c| c.serial == conn.serial) {
                    c.logged_in = true;
                }
                Ok(())
            }
            Ok(Err(ApiError::NotLeader { leader: Some(hint) })) => {
                self.learn_hint(&hint);
                Err(Failure::Api(ApiError::NotLeader { leader: Some(hint) }))
            }
            Ok(Err(e)) => Err(Failure::Api(e)),
            Err(e) => {
                self.mark_down(node, "login failed");
                Err(Failure::Transport(format!("login at node {node}: {e}")))
            }
        }
    }

    /// One send on `conn` to `node`; learns leader hints and read tokens, drops the writer on
    /// transport errors and NotLeader.
    async fn send_on(
        &self,
        node: u64,
        conn: &ChatClient,
        request: SendRequest,
    ) -> Result<SendReply, Failure> {
        *self.last_write.lock() = Instant::now();
        match conn.send(ctx(self.config.request_timeout), request).await {
            Ok(Ok(reply)) => {
                self.observe(reply.read_token);
                Ok(reply)
            }
            Ok(Err(e)) => {
                match &e {
                    ApiError::NotLeader { leader } => {
                        self.drop_writer(node).await;
                        match leader {
                            Some(hint) => self.learn_hint(hint),
                            // The cluster is electing: forget the old leader, so the next
                            // attempt asks a live node instead of redialing a dead one.
                            None => self.table.lock().leader = None,
                        }
                    }
                    ApiError::Unauthenticated => self.drop_writer(node).await,
                    _ => {}
                }
                Err(Failure::Api(e))
            }
            Err(RpcError::DeadlineExceeded) => Err(Failure::Transport("send timed out".into())),
            Err(RpcError::Shutdown) => {
                // The pooled connection had closed before the request left (the node
                // restarted, or dropped it, since we last used it): nothing was sent and the
                // node may be fine. Redial on the next attempt instead of passing the node
                // over; if it is really gone, that connect fails and marks it down.
                self.drop_writer(node).await;
                self.forget_conn(node);
                Err(Failure::Transport(
                    "send: the pooled connection had closed".into(),
                ))
            }
            Err(e) => {
                self.drop_writer(node).await;
                self.mark_down(node, "send failed");
                Err(Failure::Transport(format!("send: {e}")))
            }
        }
    }

    /// Stops sending to `node`; its connection stays for reads if it is the reader, and is
    /// closed by the next prune otherwise.
    async fn drop_writer(&self, node: u64) {
        let mut writer = self.writer.lock().await;
        if *writer == Some(node) {
            *writer = None;
        }
    }

    async fn send_retrying(&self, request: SendRequest) -> Result<SendReply, Error> {
        if self.identity.is_none() {
            return Err(Error::NoIdentity);
        }
        let started = Instant::now();
        let mut attempts = 0u32;
        let mut last;
        // The leader the previous NotLeader named: a hint naming another node is news (an
        // election ended), worth trying at once.
        let mut last_hint = None;
        loop {
            attempts += 1;
            let wait = match self.writer_conn().await {
                Ok((node, conn)) => match self.send_on(node, &conn, request.clone()).await {
                    Ok(reply) => return Ok(reply),
                    Err(failure) => {
                        last = failure.to_string();
                        self.retry_wait(failure, attempts, &mut last_hint)?
                    }
                },
                Err(failure) => {
                    last = failure.to_string();
                    self.retry_wait(failure, attempts, &mut last_hint)?
                }
            };
            let spent = started.elapsed();
            if attempts >= self.config.send_attempts_max
                || spent + wait > self.config.send_retry_budget
            {
                return Err(Error::RetriesExhausted {
                    attempts,
                    elapsed_ms: spent.as_millis() as u64,
                    last,
                });
            }
            tracing::debug!(client_seq = request.client_seq, attempts, ?wait, %last, "retrying send");
            tokio::time::sleep(wait).await;
        }
    }

    /// How long to wait before the next attempt after `failure`, or the error to return.
    /// `last_hint` is the leader the previous NotLeader answer named, updated here.
    fn retry_wait(
        &self,
        failure: Failure,
        attempts: u32,
        last_hint: &mut Option<u64>,
    ) -> Result<Duration, Error> {
        match failure {
            Failure::Api(ApiError::RateLimited { retry_after_ms }) => {
                // Nobody listening is fine: events are advisory.
                let _ = self
                    .events
                    .send(ClientEvent::RateLimited { retry_after_ms });
                tracing::info!(retry_after_ms, "rate limited, waiting");
                Ok(Duration::from_millis(retry_after_ms))
            }
            Failure::Api(ApiError::NotLeader { leader: Some(hint) }) => {
                let news = last_hint.replace(hint.id) != Some(hint.id);
                // A hint names the leader: go there at once, but not in a tight loop (two
                // nodes naming each other must not spin). The same hint again and again means
                // nodes still name a leader that is gone (an election is under way): poll as
                // during an election.
                if attempts <= 3 || (news && attempts <= 10) {
                    Ok(Duration::ZERO)
                } else {
                    Ok(backoff_capped(attempts, ELECTION_BACKOFF_MAX))
                }
            }
            Failure::Api(e) if !e.is_retryable() => Err(self.fatal(Failure::Api(e))),
            Failure::Api(ApiError::NotLeader { leader: None }) | Failure::Transport(_) => {
                Ok(backoff_capped(attempts, ELECTION_BACKOFF_MAX))
            }
            _ => Ok(backoff(attempts)),
        }
    }
}

/// Exponential backoff with jitter: 25 ms doubling per attempt, capped at 1 s, then a random
/// 50-100 % of that so many clients do not retry in step.
pub(crate) fn backoff(attempts: u32) -> Duration {
    backoff_capped(attempts, BACKOFF_MAX)
}

/// [`backoff`] with its own cap.
fn backoff_capped(attempts: u32, cap: Duration) -> Duration {
    let exp = BACKOFF_MIN.saturating_mul(1u32 << attempts.saturating_sub(1).min(10));
    let capped = exp.min(cap);
    capped.mul_f64(0.5 + rand::random::<f64>() * 0.5)
}

/// How long to wait for pongs from a node with smoothed RTT `rtt_ms`.
fn pong_wait(rtt_ms: Option<f64>) -> Duration {
    rtt_ms
        .map_or(PONG_WAIT_UNMEASURED, |ms| {
            Duration::from_secs_f64(ms * 4.0 / 1000.0)
        })
        .clamp(PONG_WAIT_MIN, PONG_WAIT_MAX)
}

/// This process's monotonic clock in ns, for a ping's `sent_ns`.
fn monotonic_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Keeps the table fresh: pings every node each probe interval, asks the reader for the
/// membership, runs discovery now and then to find new nodes, and closes connections no longer
/// used. Ends when the client is gone.
async fn refresh_loop(inner: std::sync::Weak<Inner>) {
    let mut round = 0u32;
    loop {
        let interval = match inner.upgrade() {
            Some(inner) => inner.config.probe_interval,
            None => return,
        };
        tokio::time::sleep(interval).await;
        let Some(inner) = inner.upgrade() else { return };
        round += 1;
        if round.is_multiple_of(DISCOVERY_EVERY) {
            let found = {
                let socket = inner.socket.lock().await;
                inner.discover(&socket, inner.config.discovery_window).await
            };
            for announce in found {
                inner.merge_announce(&announce);
            }
        }
        // Membership from the reader: over a connection that is open anyway; a client that
        // finds nodes only through `join` addresses (no broadcast reaches it) also opens one
        // each discovery round, since its probes show only the nodes it names.
        if let Some(reader) = inner.pick_reader() {
            let conn = match inner.open_conn(reader) {
                Some(conn) => Some(conn),
                None if round.is_multiple_of(DISCOVERY_EVERY) && !inner.config.join.is_empty() => {
                    inner.conn(reader).await.ok().map(|conn| conn.client)
                }
                None => None,
            };
            if let Some(conn) = conn {
                if let Ok(Ok(info)) = conn.cluster(ctx(inner.config.request_timeout)).await {
                    inner.merge_cluster(&info);
                }
            }
        }
        inner.probe_all().await;
        inner.rerank();
        inner.prune_conns();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(port: u16, rtt: Option<f64>, down: bool) -> NodeState {
        let mut n = NodeState::new(([127, 0, 0, 1], port).into());
        n.rtt_ms = rtt;
        if down {
            n.down_until = Some(Instant::now() + Duration::from_secs(60));
        }
        n
    }

    #[test]
    fn ranking_puts_healthy_fast_nodes_first() {
        let mut table = Table::default();
        table.nodes.insert(1, node(1, Some(3.0), false));
        table.nodes.insert(2, node(2, Some(0.5), true));
        table.nodes.insert(3, node(3, None, false));
        table.nodes.insert(4, node(4, Some(0.7), false));
        assert_eq!(table.ranked(Instant::now()), vec![4, 1, 3, 2]);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempts in 1..40 {
            let d = backoff(attempts);
            assert!(d <= BACKOFF_MAX, "{attempts}: {d:?}");
            assert!(d >= BACKOFF_MIN / 2, "{attempts}: {d:?}");
        }
        assert!(backoff(20) >= BACKOFF_MAX / 2);
        for attempts in 1..40 {
            assert!(backoff_capped(attempts, ELECTION_BACKOFF_MAX) <= ELECTION_BACKOFF_MAX);
        }
    }

    #[test]
    fn a_hint_naming_a_new_leader_lifts_its_down_mark_but_a_repeated_one_does_not() {
        let addr: SocketAddr = ([127, 0, 0, 1], 9).into();
        let mut table = Table::default();
        table.nodes.insert(1, node(9, None, true));
        table.nodes.insert(2, node(10, None, true));
        table.leader = Some(2);
        let now = Instant::now();
        // Node 2 is the recorded leader and was just marked down: a hint naming it again is
        // stale news (live nodes may not have noticed its death yet).
        table.nodes.get_mut(&2).expect("node 2").down_until = Some(now + DOWN_COOLDOWN);
        table.learn_hint(
            &LeaderHint {
                id: 2,
                client_addr: ([127, 0, 0, 1], 10).into(),
            },
            now,
        );
        assert!(table.nodes[&2].is_down(now));
        // Node 1 won an election a live node saw: try it even though it failed us before.
        table.learn_hint(
            &LeaderHint {
                id: 1,
                client_addr: addr,
            },
            now,
        );
        assert!(!table.nodes[&1].is_down(now));
    }

    #[test]
    fn a_hint_still_naming_a_leader_well_after_it_was_marked_down_lifts_the_mark() {
        let mut table = Table::default();
        table.nodes.insert(2, node(10, None, false));
        table.leader = Some(2);
        let hint = LeaderHint {
            id: 2,
            client_addr: ([127, 0, 0, 1], 10).into(),
        };
        let marked = Instant::now();
        table.nodes.get_mut(&2).expect("node 2").down_until = Some(marked + DOWN_COOLDOWN);
        let soon = marked + HINT_OUTWEIGHS_DOWN_AFTER / 2;
        table.learn_hint(&hint, soon);
        assert!(
            table.nodes[&2].is_down(soon),
            "too soon to doubt the failure"
        );
        let later = marked + HINT_OUTWEIGHS_DOWN_AFTER;
        table.learn_hint(&hint, later);
        assert!(
            !table.nodes[&2].is_down(later),
            "live nodes still name it: it leads"
        );
    }

    #[test]
    fn a_restarted_node_loses_its_measurements() {
        let mut table = Table::default();
        table.nodes.insert(1, node(1, Some(1.0), false));
        table.upsert(1, ([127, 0, 0, 1], 9).into());
        assert_eq!(table.nodes[&1].rtt_ms, None);
        table.upsert(1, ([127, 0, 0, 1], 9).into()).rtt_ms = Some(2.0);
        table.upsert(1, ([127, 0, 0, 1], 9).into());
        assert_eq!(table.nodes[&1].rtt_ms, Some(2.0));
    }
}
