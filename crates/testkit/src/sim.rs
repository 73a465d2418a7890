//! An in-process simulated cluster (feature `sim`): N nodes in one tokio runtime, each a real
//! `node` stack (openraft over `LogStore` and `StateMachine` on files, the formation and
//! promotion task, the disk watchdog), joined by an in-memory network that can partition,
//! heal, delay, drop and reorder, and an in-memory discovery bus.
//!
//! Run it on a current-thread runtime with a paused clock (`Sim::runtime`): time then moves
//! only when every task waits, so a scenario's seconds take milliseconds, and the schedule is
//! the same on every run. What is drawn at random (drops, delays) comes from one generator
//! seeded by `Sim::new`. openraft draws each election timeout from its own thread-local
//! generator; the simulated nodes use an election timeout range one millisecond wide, so that
//! draw has a single outcome.
//!
//! Scenario files (goldenscript: commands, then `---` and their output) drive it through
//! [`Runner`]; `crates/testkit/tests/sim.rs` runs every file in `crates/testkit/scenarios/`.

use std::collections::{BTreeMap, BTreeSet};
use std::error::Error;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_sm::{ChatResponse, ClientId, Command, SendCmd};
use node::formation::Formation;
use node::{
    AckPolicy, LeaderContact, LogStore, Member, NodeAddrs, NodeId, Peers, Raft, Snapshot,
    SnapshotFile, StateMachine, SyncWatch, TypeConfig, Vote, WriteGate,
};
use openraft::error::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::ServerState;
use proto::discovery::NodeAnnounce;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The cluster name every simulated node uses.
const CLUSTER: &str = "sim";
/// How often a node announces itself on the bus.
const ANNOUNCE_EVERY: Duration = Duration::from_millis(200);
/// The formation window of a simulated node.
const WINDOW: Duration = Duration::from_millis(1000);
/// The disk watchdog's threshold in the simulation.
const DISK_STALL: Duration = Duration::from_millis(500);

/// The network's state: who is reachable, and how messages are delayed and dropped.
struct NetState {
    rafts: BTreeMap<NodeId, Raft>,
    peers: BTreeMap<NodeId, Peers>,
    contacts: BTreeMap<NodeId, LeaderContact>,
    /// Pairs that cannot talk, both ways.
    cut: BTreeSet<(NodeId, NodeId)>,
    delay: Duration,
    jitter: Duration,
    drop_percent: u32,
    rng: StdRng,
    dropped: u64,
}

/// The in-memory network, shared by every node's Raft network and the discovery bus.
#[derive(Clone)]
struct Net(Arc<Mutex<NetState>>);

fn unreachable(why: &str) -> Unreachable<TypeConfig> {
    Unreachable::new(&std::io::Error::other(why.to_owned()))
}

impl Net {
    fn lock(&self) -> std::sync::MutexGuard<'_, NetState> {
        self.0
            .lock()
            .expect("the sim never panics while holding the net")
    }

    fn linked(state: &NetState, a: NodeId, b: NodeId) -> bool {
        !state.cut.contains(&(a.min(b), a.max(b)))
    }

    /// The target's Raft and this message's delay, or why it does not arrive.
    fn route(&self, from: NodeId, to: NodeId) -> Result<(Raft, Duration), Unreachable<TypeConfig>> {
        let mut s = self.lock();
        if !Self::linked(&s, from, to) {
            return Err(unreachable("partitioned"));
        }
        let Some(raft) = s.rafts.get(&to).cloned() else {
            return Err(unreachable("node down"));
        };
        let drop_percent = s.drop_percent;
        if drop_percent > 0 && s.rng.random_range(0..100) < drop_percent {
            s.dropped += 1;
            return Err(unreachable("dropped"));
        }
        let max_jitter = s.jitter;
        let jitter = if max_jitter.is_zero() {
            Duration::ZERO
        } else {
            s.rng.random_range(Duration::ZERO..max_jitter)
        };
        Ok((raft, s.delay + jitter))
    }

    /// Delivers one request and its answer, each way delayed; a partition that appears
    /// meanwhile loses the answer.
    async fn call<T, F, Fut>(
        &self,
        from: NodeId,
        to: NodeId,
        f: F,
    ) -> Result<T, Unreachable<TypeConfig>>
    where
        F: FnOnce(Raft) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let (raft, delay) = self.route(from, to)?;
        tokio::time::sleep(delay).await;
        let answer = f(raft).await;
        let (_, back) = self.route(to, from)?;
        tokio::time::sleep(back).await;
        Ok(answer)
    }

    /// Delivers an announcement to every node linked to its sender.
    fn announce(&self, from: NodeId, announce: &NodeAnnounce) {
        let s = self.lock();
        for (id, peers) in &s.peers {
            if *id != from && s.rafts.contains_key(id) && Self::linked(&s, from, *id) {
                peers.record(announce.clone());
            }
        }
    }
}

/// openraft's network for one simulated node.
struct SimNetwork {
    from: NodeId,
    net: Net,
}

impl RaftNetworkFactory<TypeConfig> for SimNetwork {
    type Network = SimPeer;

    async fn new_client(&mut self, target: NodeId, _node: &Member) -> SimPeer {
        SimPeer {
            from: self.from,
            to: target,
            net: self.net.clone(),
        }
    }
}

/// One node's handle to one peer.
struct SimPeer {
    from: NodeId,
    to: NodeId,
    net: Net,
}

fn flatten<T, E: Error + 'static>(
    answer: Result<Result<T, E>, Unreachable<TypeConfig>>,
) -> Result<T, RPCError<TypeConfig>> {
    match answer {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(RPCError::Unreachable(Unreachable::new(&e))),
        Err(e) => Err(RPCError::Unreachable(e)),
    }
}

impl SimPeer {
    /// One RPC to the peer through the simulated network, folded into openraft's error.
    async fn rpc<T, E, F, Fut>(&self, f: F) -> Result<T, RPCError<TypeConfig>>
    where
        E: Error + 'static,
        F: FnOnce(Raft) -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        flatten(self.net.call(self.from, self.to, f).await)
    }
}

impl RaftNetworkV2<TypeConfig> for SimPeer {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        // As the node's RPC server does: a committed leader's append counts as contact.
        let contact = rpc
            .vote
            .is_committed()
            .then(|| self.net.lock().contacts.get(&self.to).cloned())
            .flatten();
        self.rpc(|raft| async move {
            if let Some(contact) = contact {
                contact.heard();
            }
            raft.append_entries(rpc).await
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc(|raft| async move { raft.vote(rpc).await }).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc(|raft| async move { raft.pre_vote(rpc).await })
            .await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc(|raft| async move { raft.handle_transfer_leader(req).await })
            .await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        _cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        // The receiver copies the sender's file (it is not one of its own received files).
        let path = snapshot.snapshot.path().to_path_buf();
        let meta = snapshot.meta;
        let answer = self
            .net
            .call(self.from, self.to, |raft| async move {
                let file = SnapshotFile::open(&path)
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()));
                match file {
                    Ok(file) => raft
                        .install_full_snapshot(
                            vote,
                            Snapshot {
                                meta,
                                snapshot: file,
                            },
                        )
                        .await
                        .map_err(|e| std::io::Error::other(e.to_string())),
                    Err(e) => Err(e),
                }
            })
            .await;
        match answer {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StreamingError::Unreachable(Unreachable::new(&e))),
            Err(e) => Err(StreamingError::Unreachable(e)),
        }
    }
}

/// One simulated node.
struct SimNode {
    name: String,
    raft: Raft,
    state: StateMachine,
    sync: SyncWatch,
    gate: WriteGate,
    tasks: Vec<JoinHandle<()>>,
}

/// The simulated cluster.
pub struct Sim {
    net: Net,
    dir: tempfile::TempDir,
    nodes: BTreeMap<NodeId, SimNode>,
    /// Nodes ever started (stopped ones keep their data dir and may restart).
    known: BTreeSet<NodeId>,
    config: Arc<openraft::Config>,
    client_seq: u64,
    seed: u64,
}

/// A fake address per node and listener, for announcements and membership records.
fn addrs(id: NodeId) -> NodeAddrs {
    let port = |base: u64| u16::try_from(base + id).expect("small ids");
    let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    NodeAddrs {
        raft: at(port(10_000)),
        client: at(port(20_000)),
        metrics: at(port(30_000)),
    }
}

/// `n3` → 3.
fn parse_node(name: &str) -> Result<NodeId, Box<dyn Error>> {
    name.strip_prefix('n')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("not a node name: {name:?}").into())
}

/// `250ms`, `2s`.
fn parse_duration(text: &str) -> Result<Duration, Box<dyn Error>> {
    if let Some(ms) = text.strip_suffix("ms") {
        return Ok(Duration::from_millis(ms.parse()?));
    }
    if let Some(s) = text.strip_suffix('s') {
        return Ok(Duration::from_millis((s.parse::<f64>()? * 1000.0) as u64));
    }
    Err(format!("not a duration: {text:?} (say 250ms or 2s)").into())
}

impl Sim {
    /// A current-thread runtime with a paused clock, for running a `Sim`.
    ///
    /// # Panics
    /// When tokio cannot build a runtime.
    pub fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a current-thread runtime")
    }

    /// An empty simulated cluster; `seed` draws every drop and delay.
    ///
    /// # Errors
    /// The temp dir or openraft's config.
    pub fn new(seed: u64) -> Result<Sim, Box<dyn Error>> {
        // tmpfs where there is one: an fsync there costs nothing, and the paused clock does
        // not count the real time a disk would take anyway.
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::Builder::new()
                .prefix("cellchat-sim-")
                .tempdir_in(shm)?
        } else {
            tempfile::Builder::new().prefix("cellchat-sim-").tempdir()?
        };
        let config = openraft::Config {
            cluster_name: CLUSTER.into(),
            heartbeat_interval: 50,
            // One millisecond wide: openraft's unseeded draw has a single outcome.
            election_timeout_min: 300,
            election_timeout_max: 301,
            enable_pre_vote: Some(true),
            enable_leader_restore: Some(false),
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(50),
            max_in_snapshot_log_to_keep: 10,
            purge_batch_size: 1,
            ..Default::default()
        };
        Ok(Sim {
            net: Net(Arc::new(Mutex::new(NetState {
                rafts: BTreeMap::new(),
                peers: BTreeMap::new(),
                contacts: BTreeMap::new(),
                cut: BTreeSet::new(),
                delay: Duration::from_millis(1),
                jitter: Duration::ZERO,
                drop_percent: 0,
                rng: StdRng::seed_from_u64(seed),
                dropped: 0,
            }))),
            dir,
            nodes: BTreeMap::new(),
            known: BTreeSet::new(),
            config: Arc::new(config.validate()?),
            client_seq: 0,
            seed,
        })
    }

    fn node_dir(&self, id: NodeId) -> PathBuf {
        self.dir.path().join(format!("n{id}"))
    }

    /// Starts node `id` (fresh, or on the data it had when it stopped).
    ///
    /// # Errors
    /// Storage or openraft failed to start.
    pub async fn start(&mut self, id: NodeId) -> Result<(), Box<dyn Error>> {
        if self.nodes.contains_key(&id) {
            return Err(format!("n{id} is running").into());
        }
        let dir = self.node_dir(id);
        let wal = raft_log::Wal::open(raft_log::Config::new(dir.join("log").join(node::WAL_DIR)))?;
        let mut log = LogStore::from_wal_acking(wal, dir.join("log"), AckPolicy::Inline)?;
        let mut state = open_state(&dir.join("sm")).await?.inline_blocking_work();
        node::reconcile(&mut log, &mut state).await?;
        let sync = log.sync_watch();
        let network = SimNetwork {
            from: id,
            net: self.net.clone(),
        };
        let seed = self.seed ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let raft =
            node::start_raft(id, self.config.clone(), network, log, state.clone(), seed).await?;
        let name = format!("n{id}");
        let peers = Peers::default();
        let contact = LeaderContact::default();
        {
            let mut net = self.net.lock();
            net.rafts.insert(id, raft.clone());
            net.peers.insert(id, peers.clone());
            net.contacts.insert(id, contact.clone());
        }
        let gate = WriteGate::default();
        let mut tasks = Vec::new();
        let (announce_raft, net, announce_name) = (raft.clone(), self.net.clone(), name.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let announce =
                    node::self_announce(&announce_raft, CLUSTER, &announce_name, &addrs(id), 0);
                net.announce(id, &announce);
                tokio::time::sleep(ANNOUNCE_EVERY).await;
            }
        }));
        let join_net = self.net.clone();
        let formation = Formation {
            raft: raft.clone(),
            cluster: CLUSTER.into(),
            member: addrs(id).member(&name),
            peers,
            window: WINDOW,
            bootstrap_expect: None,
            enrolled: false,
            max_voters: 5,
            election_timeout_max: Duration::from_millis(self.config.election_timeout_max),
            leaving: Arc::default(),
            rejoining: false,
            contact,
            join: Arc::new(move |leader: NodeAnnounce, request| {
                let net = join_net.clone();
                Box::pin(async move {
                    let answer = net
                        .call(id, leader.node_id, |raft| async move {
                            node::handle_join(&raft, CLUSTER, request).await
                        })
                        .await;
                    match answer {
                        Ok(Ok(reply)) => Ok(reply),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(e) => Err(e.to_string()),
                    }
                })
            }),
        };
        tasks.push(tokio::spawn(formation.run()));
        tasks.push(tokio::spawn(
            node::DiskWatchdog {
                raft: raft.clone(),
                sync: sync.clone(),
                gate: gate.clone(),
                threshold: DISK_STALL,
            }
            .run(),
        ));
        self.known.insert(id);
        self.nodes.insert(
            id,
            SimNode {
                name,
                raft,
                state,
                sync,
                gate,
                tasks,
            },
        );
        Ok(())
    }

    /// Stops node `id` at once, as a crash would: no handover, no goodbye.
    ///
    /// # Errors
    /// The node is not running.
    pub async fn kill(&mut self, id: NodeId) -> Result<(), Box<dyn Error>> {
        let node = self
            .nodes
            .remove(&id)
            .ok_or_else(|| format!("n{id} is not running"))?;
        {
            let mut net = self.net.lock();
            net.rafts.remove(&id);
            net.peers.remove(&id);
            net.contacts.remove(&id);
        }
        for task in &node.tasks {
            task.abort();
        }
        node.raft.shutdown().await?;
        Ok(())
    }

    /// Stops node `id` the way SIGTERM does: hands leadership over first.
    ///
    /// # Errors
    /// The node is not running.
    pub async fn stop(&mut self, id: NodeId) -> Result<Option<NodeId>, Box<dyn Error>> {
        let raft = self
            .nodes
            .get(&id)
            .ok_or_else(|| format!("n{id} is not running"))?
            .raft
            .clone();
        let to = node::hand_over(&raft).await;
        self.kill(id).await?;
        Ok(to)
    }

    /// The leader that every running node of `among` (all when empty) names, if they agree
    /// and it runs.
    pub fn agreed_leader(&self, among: &[NodeId]) -> Option<NodeId> {
        let mut named = self
            .nodes
            .iter()
            .filter(|(id, _)| among.is_empty() || among.contains(id))
            .map(|(_, n)| node::metrics_now(&n.raft).current_leader);
        let first = named.next()??;
        (named.all(|l| l == Some(first)) && self.nodes.contains_key(&first)).then_some(first)
    }

    /// The node that believes it leads with the highest term.
    pub fn leader(&self) -> Option<NodeId> {
        self.nodes
            .iter()
            .map(|(id, n)| (id, node::metrics_now(&n.raft)))
            .filter(|(_, m)| m.state == ServerState::Leader)
            .max_by_key(|(_, m)| m.current_term)
            .map(|(id, _)| *id)
    }

    /// Runs the cluster until every running node of `among` (all when empty) names the same
    /// running leader, at most `limit`; returns how long that took.
    ///
    /// # Errors
    /// No agreement within `limit`.
    pub async fn wait_leader(
        &self,
        limit: Duration,
        among: &[NodeId],
    ) -> Result<Duration, Box<dyn Error>> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.agreed_leader(among).is_some() {
                return Ok(start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(format!("no agreed leader within {limit:?}\n{}", self.status()).into())
    }

    /// Sends one message through node `id`, as the chat API does after its checks.
    ///
    /// # Errors
    /// openraft's refusal (not leader, stopped) as text.
    pub async fn send(
        &mut self,
        id: NodeId,
        channel: &str,
        text: &str,
    ) -> Result<String, Box<dyn Error>> {
        let node = self
            .nodes
            .get(&id)
            .ok_or_else(|| format!("n{id} is not running"))?;
        if node.gate.is_closed() {
            return Ok(format!("{}: refused, disk stalled", node.name));
        }
        self.client_seq += 1;
        let send = SendCmd {
            channel: channel.into(),
            sender: "sim".into(),
            body: text.as_bytes().to_vec(),
            client_id: ClientId([7; 16]),
            client_seq: self.client_seq,
            at_ms: 0,
        };
        let raft = node.raft.clone();
        match tokio::time::timeout(
            Duration::from_secs(5),
            raft.client_write(Command::Send(send).into()),
        )
        .await
        {
            Ok(Ok(reply)) => match reply.data {
                ChatResponse::Sent(sent) => Ok(format!("{channel} seq {}", sent.seq.0)),
                other => Ok(format!("answered {other:?}")),
            },
            Ok(Err(e)) => Ok(format!("n{id}: {}", refusal(&e.to_string()))),
            Err(_) => Ok(format!("n{id}: no answer within 5s")),
        }
    }

    /// One line per running node: role, term, membership and applied index, plus the network.
    pub fn status(&self) -> String {
        let mut out = String::new();
        for (id, n) in &self.nodes {
            let m = node::metrics_now(&n.raft);
            let membership = m.membership_config.membership();
            let kind = if membership.voter_ids().any(|v| v == *id) {
                "voter"
            } else if membership.get_node(id).is_some() {
                "learner"
            } else {
                "outside"
            };
            let leader = m.current_leader.map_or("-".to_owned(), |l| format!("n{l}"));
            let _ = writeln!(
                out,
                "{} {:?} {kind} term={} leader={leader} members={}",
                n.name,
                m.state,
                m.current_term,
                membership.nodes().count()
            );
        }
        out
    }

    /// Messages of `channel` as node `id` has applied them: `seq text`, comma-separated, or
    /// for more than a dozen a summary (count, whether seqs run 1..n without a gap, the last).
    ///
    /// # Errors
    /// The node is not running, or its state cannot be read.
    pub fn history(&self, id: NodeId, channel: &str) -> Result<String, Box<dyn Error>> {
        let node = self
            .nodes
            .get(&id)
            .ok_or_else(|| format!("n{id} is not running"))?;
        let messages = node
            .state
            .chat()
            .history(channel, chat_sm::ChannelSeq(1), 1000)?;
        let shown: Vec<String> = messages
            .iter()
            .map(|m| format!("{} {}", m.seq.0, String::from_utf8_lossy(&m.body)))
            .collect();
        if shown.len() <= 12 {
            return Ok(shown.join(", "));
        }
        let dense = messages.iter().zip(1..).all(|(m, i)| m.seq.0 == i);
        Ok(format!(
            "{} messages, seqs {}, last {}",
            shown.len(),
            if dense {
                "1..n without gaps"
            } else {
                "WITH GAPS"
            },
            shown.last().expect("more than 12")
        ))
    }

    /// Per running node: the last applied, snapshot and purged log indexes.
    pub fn storage(&self) -> String {
        let index = |id: Option<node::LogId>| id.map_or("-".to_owned(), |l| l.index.to_string());
        let mut out = String::new();
        for n in self.nodes.values() {
            let m = node::metrics_now(&n.raft);
            let _ = writeln!(
                out,
                "{} applied={} snapshot={} purged={}",
                n.name,
                index(m.last_applied),
                index(m.snapshot),
                index(m.purged)
            );
        }
        out
    }

    /// Cuts every link between the groups (each a list of node ids).
    pub fn partition(&self, groups: &[Vec<NodeId>]) {
        let mut net = self.net.lock();
        for (i, a) in groups.iter().enumerate() {
            for b in &groups[i + 1..] {
                for x in a {
                    for y in b {
                        net.cut.insert(((*x).min(*y), (*x).max(*y)));
                    }
                }
            }
        }
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.net.lock().cut.clear();
    }

    /// Every message from now on waits `delay` plus up to `jitter` (which reorders them).
    pub fn set_delay(&self, delay: Duration, jitter: Duration) {
        let mut net = self.net.lock();
        net.delay = delay;
        net.jitter = jitter;
    }

    /// Each message from now on is lost with this probability (in percent).
    pub fn set_drop(&self, percent: u32) {
        self.net.lock().drop_percent = percent.min(100);
    }

    /// Hangs every log sync of node `id` for `for_`.
    ///
    /// # Errors
    /// The node is not running.
    pub fn stall_disk(&self, id: NodeId, for_: Duration) -> Result<(), Box<dyn Error>> {
        let node = self
            .nodes
            .get(&id)
            .ok_or_else(|| format!("n{id} is not running"))?;
        node.sync.stall_until(Instant::now() + for_);
        Ok(())
    }

    /// Shuts every node down.
    pub async fn shutdown(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            let _ = self.kill(id).await;
        }
    }
}

/// openraft's refusal, short: which leader to ask, or why not.
fn refusal(text: &str) -> String {
    if text.contains("forward request to") || text.contains("ForwardToLeader") {
        "not leader".to_owned()
    } else {
        text.lines().next().unwrap_or_default().to_owned()
    }
}

/// Opens a node's state machine; a stopped node's RocksDB may still be closing for a moment.
async fn open_state(dir: &std::path::Path) -> Result<StateMachine, Box<dyn Error>> {
    let mut last = String::new();
    for _ in 0..100 {
        match StateMachine::open(dir) {
            Ok(sm) => return Ok(sm),
            Err(e) if e.to_string().contains("lock") => {
                last = e.to_string();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(format!("state machine still locked: {last}").into())
}

/// Runs scenario files against a [`Sim`] (see the module doc).
pub struct Runner {
    rt: tokio::runtime::Runtime,
    sim: Sim,
}

impl Runner {
    /// A runner with a fresh simulated cluster.
    ///
    /// # Errors
    /// As [`Sim::new`].
    pub fn new(seed: u64) -> Result<Runner, Box<dyn Error>> {
        Ok(Runner {
            rt: Sim::runtime(),
            sim: Sim::new(seed)?,
        })
    }

    /// Resolves `n3` or `leader`.
    fn target(&self, word: &str) -> Result<NodeId, Box<dyn Error>> {
        if word == "leader" {
            return self
                .sim
                .leader()
                .ok_or_else(|| format!("no leader\n{}", self.sim.status()).into());
        }
        parse_node(word)
    }

    fn exec(&mut self, command: &goldenscript::Command) -> Result<String, Box<dyn Error>> {
        let mut args = command.consume_args();
        let mut keys = BTreeMap::new();
        while let Some((key, value)) = args.next_key() {
            keys.insert(key, value);
        }
        let pos: Vec<&str> = std::iter::from_fn(|| args.next_pos()).collect();
        let arg = |i: usize| -> Result<&str, Box<dyn Error>> {
            pos.get(i)
                .copied()
                .ok_or_else(|| format!("{}: missing argument {}", command.name, i + 1).into())
        };
        match command.name.as_str() {
            // start N: N more nodes; start n4: node n4 (again).
            "start" => {
                let what = arg(0)?;
                let ids: Vec<NodeId> = if let Ok(id) = parse_node(what) {
                    vec![id]
                } else {
                    let count: u64 = what.parse()?;
                    let first = self.sim.known.iter().max().map_or(1, |m| m + 1);
                    (first..first + count).collect()
                };
                for id in &ids {
                    self.rt.block_on(self.sim.start(*id))?;
                }
                let names: Vec<String> = ids.iter().map(|i| format!("n{i}")).collect();
                Ok(format!("started {}\n", names.join(" ")))
            }
            "run" => {
                let d = parse_duration(arg(0)?)?;
                self.rt.block_on(async { tokio::time::sleep(d).await });
                Ok(String::new())
            }
            // wait-leader 3s [n3 n4 n5]: until those nodes (default: all) agree on a leader.
            "wait-leader" => {
                let limit = parse_duration(arg(0)?)?;
                let among = pos[1..]
                    .iter()
                    .map(|n| parse_node(n))
                    .collect::<Result<Vec<_>, _>>()?;
                let took = self.rt.block_on(self.sim.wait_leader(limit, &among))?;
                let leader = self.sim.agreed_leader(&among).ok_or("leader lost")?;
                let who = if among.is_empty() {
                    "all".to_owned()
                } else {
                    pos[1..].join(" ")
                };
                Ok(format!(
                    "n{leader} leads, agreed by {who} after {}ms\n",
                    took.as_millis()
                ))
            }
            // send-many leader general 100: sends m1..m100 one after another.
            "send-many" => {
                let channel = arg(1)?;
                let count: u64 = arg(2)?.parse()?;
                let mut outcomes = BTreeMap::<String, u64>::new();
                for i in 1..=count {
                    // The leader may change under load: resolve it per send.
                    let id = self.target(arg(0)?)?;
                    let out = self
                        .rt
                        .block_on(self.sim.send(id, channel, &format!("m{i}")))?;
                    let kind = if out.starts_with(channel) {
                        "acknowledged".to_owned()
                    } else {
                        out
                    };
                    *outcomes.entry(kind).or_default() += 1;
                }
                Ok(outcomes.iter().map(|(k, n)| format!("{n} {k}\n")).collect())
            }
            "status" => Ok(self.sim.status()),
            "storage" => Ok(self.sim.storage()),
            "kill" => {
                let id = self.target(arg(0)?)?;
                self.rt.block_on(self.sim.kill(id))?;
                Ok(format!("killed n{id}\n"))
            }
            "stop" => {
                let id = self.target(arg(0)?)?;
                Ok(match self.rt.block_on(self.sim.stop(id))? {
                    Some(to) => format!("stopped n{id}; it handed leadership to n{to}\n"),
                    None => format!("stopped n{id}\n"),
                })
            }
            "send" => {
                let id = self.target(arg(0)?)?;
                let (channel, text) = (arg(1)?, arg(2)?);
                let out = self.rt.block_on(self.sim.send(id, channel, text))?;
                Ok(format!("{out}\n"))
            }
            "history" => {
                let id = self.target(arg(0)?)?;
                Ok(format!("n{id}: {}\n", self.sim.history(id, arg(1)?)?))
            }
            // partition "n1 n2" "n3 n4 n5"
            "partition" => {
                let groups = pos
                    .iter()
                    .map(|g| {
                        g.split_whitespace()
                            .map(parse_node)
                            .collect::<Result<Vec<_>, _>>()
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                self.sim.partition(&groups);
                Ok(String::new())
            }
            "heal" => {
                self.sim.heal();
                Ok(String::new())
            }
            // net delay=5ms jitter=10ms drop=10
            "net" => {
                let duration = |key| keys.get(key).map(|v| parse_duration(v)).transpose();
                let delay = duration("delay")?.unwrap_or(Duration::from_millis(1));
                let jitter = duration("jitter")?.unwrap_or(Duration::ZERO);
                self.sim.set_delay(delay, jitter);
                if let Some(drop) = keys.get("drop") {
                    self.sim.set_drop(drop.parse()?);
                }
                Ok(String::new())
            }
            "stall-disk" => {
                let id = self.target(arg(0)?)?;
                let d = parse_duration(arg(1)?)?;
                // Inside the runtime: the stall ends on its paused clock.
                let sim = &self.sim;
                self.rt.block_on(async { sim.stall_disk(id, d) })?;
                Ok(format!("n{id}'s log syncs hang for {}ms\n", d.as_millis()))
            }
            other => Err(format!("unknown command {other:?}").into()),
        }
    }
}

impl goldenscript::Runner for Runner {
    type Command = goldenscript::Command;

    fn run(
        &mut self,
        command: &goldenscript::Command,
        _context: &goldenscript::Context,
    ) -> Result<String, Box<dyn Error>> {
        self.exec(command)
    }

    fn end_script(&mut self) -> Result<(), Box<dyn Error>> {
        let Runner { rt, sim } = self;
        rt.block_on(sim.shutdown());
        Ok(())
    }
}
