//! Node-to-node Raft RPC over tarpc: the `RaftRpc` service, its server, and openraft's network
//! (the v2 trait) with a per-peer connection pool.
//!
//! Every connection is TLS. A peer proves with its certificate which node it is, and every
//! Raft request is checked against it: the sender a vote or append names must be the node the
//! certificate names, so nothing from outside the cluster reaches openraft. Admin calls carry
//! the admin credential derived from the join token; enrollment (a new node asking for its
//! certificate) carries the join secret.
//!
//! Every request names the node it is meant for. A node that receives a request addressed to
//! another id answers `WrongNode` instead of acting on it, so an address reused by a different
//! node (a restart on a recycled port, a stale membership) can never make a leader replicate
//! to the wrong node or to itself. A vote or append from a node outside this node's membership
//! is refused ([`admit`]).
//!
//! Each peer gets two connections: one for AppendEntries and votes, one for snapshot chunks,
//! so multi-megabyte snapshot frames never queue ahead of heartbeats on one TCP stream.
//!
//! Replication is pipelined: the leader keeps several AppendEntries out to each follower
//! ([`APPEND_PIPELINE_MAX`]), so a round trip carries the entries appended while the ones
//! before were out instead of waiting for them; the follower hands each connection's
//! AppendEntries to openraft in the order they came (`append_pipe.rs`).
//!
//! Step 5 of "Life of a chat message" in ARCHITECTURE.md.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::FuturesOrdered;
use futures::{Stream, StreamExt};
use openraft::base::{BoxFuture, BoxStream};
use openraft::error::{
    NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult,
    TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use parking_lot::Mutex;
use prometheus_client::metrics::histogram::Histogram;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tarpc::client::RpcError;
use tarpc::context;
use tarpc::server::{BaseChannel, Channel};

use crate::admin::{Admin, Contacts, LeaveReply, LeaveRequest, MemberInfo, MembersRequest};
use crate::append_pipe::{AppendPipe, Turn};
use crate::backup::{BackupIndex, BackupOpen, BackupOpened, BackupRead, Backups};
use crate::cluster::{
    self, JoinError, JoinReply, JoinRequest, LeaderContact, RemoveReply, RemoveRequest,
};
use crate::ephemeral::{Ephemeral, EphemeralNews, GOSSIP_EVERY};
use crate::join_secret::{self, RotateRequest};
use crate::leader_watch::{InboundConn, LeaderWatch};
use crate::pki::{NodeTls, RemotePublicKey};
use crate::raft::Raft;
use crate::retention::{self, RetentionRequest};
use crate::snapshot_file::SnapshotFile;
use crate::snapshot_transfer::{self, SnapshotChunk, SnapshotReceiver, TransferError};
use crate::storage_metrics::{count_histogram, latency_histogram};
use crate::types::{LogId, Member, NodeId, Snapshot, TypeConfig, Vote};
use crate::web_forward::{Forwarded, WebInbound, WebWritten};

/// A request that reached a node other than the one it was addressed to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum WrongNode {
    /// The addressee is another node.
    #[error("request for node {wanted} reached node {actual}")]
    Addressee {
        /// The addressee.
        wanted: NodeId,
        /// Who answered.
        actual: NodeId,
    },
    /// The sender is not in the receiver's membership.
    #[error("node {sender} is not a member of node {actual}'s cluster")]
    NotAMember {
        /// Who sent the request.
        sender: NodeId,
        /// Who refused it.
        actual: NodeId,
    },
    /// The caller did not prove who it is: no certificate naming the sender, or a wrong admin
    /// credential.
    #[error("node {actual} refused an unauthenticated request: {reason}")]
    Unauthenticated {
        /// Who refused it.
        actual: NodeId,
        /// What was missing.
        reason: String,
    },
}

/// What proves an admin call: [`proto::tls::JoinToken::admin_credential`].
pub type AdminCredential = [u8; 32];

/// A new node's request for its certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// The cluster it means to join.
    pub cluster: String,
    /// Its node id, which the certificate will name.
    pub id: NodeId,
    /// Its P-256 public key (uncompressed SEC1 point).
    pub public_key: Vec<u8>,
    /// The join secret from its token.
    pub secret: Vec<u8>,
}

/// What an enrolled node receives.
#[derive(Clone, Serialize, Deserialize)]
pub struct EnrollReply {
    /// The CA certificate (DER).
    pub ca_cert: Vec<u8>,
    /// The CA key (PKCS#8 PEM), so that this node can admit others in turn.
    pub ca_key_pem: String,
    /// The node's certificate (DER).
    pub cert: Vec<u8>,
}

impl std::fmt::Debug for EnrollReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EnrollReply { .. }")
    }
}

/// Why an enrollment was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum EnrollError {
    /// The secret is not the cluster's.
    #[error("the join token's secret is wrong (or was rotated): get the current one with `server token` on a member")]
    WrongSecret,
    /// The request names another cluster.
    #[error("this node serves cluster {ours:?}, not {theirs:?}")]
    WrongCluster {
        /// The answering node's cluster.
        ours: String,
        /// The request's.
        theirs: String,
    },
    /// The id belongs to a member already.
    #[error("node id {0} is already a member; a node with a fresh data dir gets a fresh id")]
    IdTaken(NodeId),
    /// The public key is not a P-256 point.
    #[error("the public key is not an uncompressed P-256 point")]
    BadKey,
    /// The CA could not sign.
    #[error("the node could not issue a certificate: {0}")]
    Issue(String),
}

/// What openraft answers for a vote, pre-vote or append.
type RaftAnswer<T> = Result<Result<T, RaftError<TypeConfig>>, WrongNode>;

/// The node-to-node Raft service. Each method takes the addressee's id first.
#[tarpc::service]
pub trait RaftRpc {
    /// openraft AppendEntries (replication and heartbeats).
    async fn append(
        to: NodeId,
        req: AppendEntriesRequest<TypeConfig>,
    ) -> RaftAnswer<AppendEntriesResponse<TypeConfig>>;
    /// openraft RequestVote.
    async fn vote(to: NodeId, req: VoteRequest<TypeConfig>)
        -> RaftAnswer<VoteResponse<TypeConfig>>;
    /// openraft's pre-vote: would the addressee vote, without changing any term.
    async fn pre_vote(
        to: NodeId,
        req: VoteRequest<TypeConfig>,
    ) -> RaftAnswer<VoteResponse<TypeConfig>>;
    /// One chunk of a snapshot; the last one installs it and carries openraft's answer.
    async fn snapshot(
        to: NodeId,
        chunk: SnapshotChunk,
    ) -> Result<Result<Option<SnapshotResponse<TypeConfig>>, TransferError>, WrongNode>;
    /// The leader hands leadership to the addressee (see `Trigger::transfer_leader`).
    async fn transfer_leader(
        to: NodeId,
        req: TransferLeaderRequest<TypeConfig>,
    ) -> RaftAnswer<TransferLeaderResponse<TypeConfig>>;
    /// Asks the leader to add the sender to the cluster (see `cluster::handle_join`).
    async fn join(to: NodeId, req: JoinRequest) -> Result<Result<JoinReply, JoinError>, WrongNode>;
    /// Asks the leader to remove a node from the membership (see `cluster::handle_remove`).
    async fn remove(
        to: NodeId,
        admin: AdminCredential,
        req: RemoveRequest,
    ) -> Result<Result<RemoveReply, JoinError>, WrongNode>;
    /// Asks the leader for every member and its state (see `admin::Admin::handle_members`).
    async fn members(
        to: NodeId,
        admin: AdminCredential,
        req: MembersRequest,
    ) -> Result<Result<Vec<MemberInfo>, JoinError>, WrongNode>;
    /// Asks the addressee to leave the cluster for good (see `admin::Admin::handle_leave`).
    async fn leave(
        to: NodeId,
        admin: AdminCredential,
        req: LeaveRequest,
    ) -> Result<Result<LeaveReply, JoinError>, WrongNode>;
    /// A new node with the join token asks for its certificate (see [`EnrollRequest`]).
    async fn enroll(req: EnrollRequest) -> Result<EnrollReply, EnrollError>;
    /// Asks the leader to replace the join secret; answers the new token (see
    /// `join_secret::handle_rotate`).
    async fn rotate_token(
        to: NodeId,
        admin: AdminCredential,
        req: RotateRequest,
    ) -> Result<Result<String, JoinError>, WrongNode>;
    /// Asks the leader for the read index to cut a backup at (see `backup.rs`).
    async fn backup_index(
        to: NodeId,
        admin: AdminCredential,
        req: BackupIndex,
    ) -> Result<Result<u64, JoinError>, WrongNode>;
    /// Asks the addressee to cut a backup and keep it as a session.
    async fn backup_open(
        to: NodeId,
        admin: AdminCredential,
        req: BackupOpen,
    ) -> Result<Result<BackupOpened, JoinError>, WrongNode>;
    /// Reads one chunk of a backup session.
    async fn backup_read(
        to: NodeId,
        admin: AdminCredential,
        req: BackupRead,
    ) -> Result<Result<Vec<u8>, JoinError>, WrongNode>;
    /// Asks the leader for the cluster's default retention, replacing it first if the request
    /// says so (see `retention::handle_default_retention`).
    async fn default_retention(
        to: NodeId,
        admin: AdminCredential,
        req: RetentionRequest,
    ) -> Result<Result<proto::Retention, JoinError>, WrongNode>;
    /// The sender's online users and typing notes (see `ephemeral.rs`); a member only.
    async fn ephemeral(to: NodeId, from: NodeId, news: EphemeralNews) -> Result<(), WrongNode>;
    /// A web client's write, forwarded by the member it is connected to (see `web.rs`); a
    /// member only.
    async fn web_write(
        to: NodeId,
        from: NodeId,
        req: Forwarded,
    ) -> Result<Result<WebWritten, proto::ApiError>, WrongNode>;
    /// The addressee's web client URL, if it serves one; a member only.
    async fn web_url(to: NodeId, from: NodeId) -> Result<Option<String>, WrongNode>;
}

/// What the membership rule needs to know of the receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MembershipView {
    /// The receiver's membership names at least one node (it has joined or formed a cluster).
    pub has_members: bool,
    /// The sender is in that membership, as a voter or a learner.
    pub sender_is_member: bool,
    /// The receiver's current term.
    pub our_term: u64,
}

/// Which request the membership rule is asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound {
    /// A vote or pre-vote request.
    Vote,
    /// An AppendEntries, in the sender's term.
    Append {
        /// The sender's term.
        term: u64,
    },
    /// Presence and typing news: only a member's is worth hearing.
    News,
    /// A web client's forwarded write or a web URL: only members act for users.
    Web,
}

/// Whether a vote or append from a sender is let through to openraft.
///
/// A node with no membership yet (a joiner before its first append) takes anything: it has
/// nothing to protect, and the leader adding it is not in any membership it knows. Otherwise a
/// vote from a non-member is refused (refusing a vote is always safe). An append from a
/// non-member is refused unless its term is above ours: a node this one has not yet seen added
/// can have become leader in a later term, and refusing it would strand this node.
pub fn admit(view: MembershipView, inbound: Inbound) -> bool {
    if !view.has_members || view.sender_is_member {
        return true;
    }
    match inbound {
        Inbound::Vote | Inbound::News | Inbound::Web => false,
        Inbound::Append { term } => term > view.our_term,
    }
}

/// Serves `RaftRpc` for one node by calling into its `Raft`.
#[derive(Clone)]
pub struct RaftRpcServer {
    id: NodeId,
    cluster: Arc<str>,
    raft: Raft,
    watch: LeaderWatch,
    admin: Arc<Admin>,
    backups: Arc<Backups>,
    snapshots: SnapshotReceiver,
    contact: LeaderContact,
    tls: Arc<NodeTls>,
    /// The connection this clone serves (each accepted connection gets its own).
    conn: InboundConn,
    /// The certificate the connection's peer presented, verified against the cluster CA in
    /// the handshake; `None` for callers without one (enrollment, admin tools).
    peer: Option<Arc<CertificateDer<'static>>>,
    /// The node id the certificate was found to name, once a request claimed it.
    peer_id: Arc<std::sync::OnceLock<NodeId>>,
    /// Paces the warnings about refused requests, shared by every connection.
    refusals: Arc<WarnGate>,
    /// Presence and typing heard from peers go here.
    ephemeral: Ephemeral,
    /// Runs the web clients' writes members forward; `None` until set (`with_web`).
    web: Option<Arc<WebInbound>>,
    /// How long this node took to answer each AppendEntries that carried entries: its log
    /// append and fdatasync as a follower, and the hops around them.
    append_handling: Histogram,
    /// The connection's AppendEntries, handed to openraft in the order they came.
    appends: Arc<AppendPipe>,
    /// This request's place in that order, when it is an `append` (taken by the handler).
    append_turn: Option<Arc<Mutex<Option<Turn>>>>,
}

/// How often a refused request may be logged: anyone can send refused requests, and a flood
/// of them must not become a flood of log lines.
const REFUSAL_WARN_EVERY: Duration = Duration::from_secs(10);

/// Lets a warning through at most once per [`REFUSAL_WARN_EVERY`], counting the ones held
/// back in between.
#[derive(Default)]
struct WarnGate {
    state: Mutex<(Option<Instant>, u64)>,
}

impl WarnGate {
    /// `Some(held back since the last one)` when this warning may be logged.
    fn pass(&self) -> Option<u64> {
        let mut state = self.state.lock();
        let now = Instant::now();
        match state.0 {
            Some(last) if now.duration_since(last) < REFUSAL_WARN_EVERY => {
                state.1 += 1;
                None
            }
            _ => {
                state.0 = Some(now);
                Some(std::mem::take(&mut state.1))
            }
        }
    }
}

impl RaftRpcServer {
    /// A server for node `id` of `cluster`; `admin` answers the operator RPCs, `backups` the
    /// backup RPCs, `ephemeral` takes the peers' presence and typing news, `snapshots`
    /// receives snapshot chunks and `contact` records the leader's AppendEntries.
    pub fn new(
        id: NodeId,
        cluster: &str,
        raft: Raft,
        (admin, backups, ephemeral): (Arc<Admin>, Arc<Backups>, Ephemeral),
        snapshots: SnapshotReceiver,
        contact: LeaderContact,
        tls: Arc<NodeTls>,
    ) -> Self {
        RaftRpcServer {
            id,
            cluster: cluster.into(),
            watch: LeaderWatch::new(id, raft.clone()),
            raft,
            admin,
            backups,
            snapshots,
            contact,
            tls,
            conn: InboundConn::default(),
            peer: None,
            peer_id: Arc::default(),
            refusals: Arc::default(),
            ephemeral,
            web: None,
            append_handling: latency_histogram(18),
            appends: Arc::default(),
            append_turn: None,
        }
    }

    /// Records into `histogram` how long each AppendEntries with entries took to answer.
    pub fn timing_appends(mut self, histogram: Histogram) -> Self {
        self.append_handling = histogram;
        self
    }

    /// Serves members' forwarded web writes and this node's web URL through `web`.
    pub(crate) fn with_web(mut self, web: Arc<WebInbound>) -> Self {
        self.web = Some(web);
        self
    }

    /// A clone that serves one newly accepted connection whose peer presented `peer`.
    fn for_connection(&self, peer: Option<CertificateDer<'static>>) -> Self {
        RaftRpcServer {
            conn: InboundConn::default(),
            peer: peer.map(Arc::new),
            peer_id: Arc::default(),
            appends: Arc::default(),
            append_turn: None,
            ..self.clone()
        }
    }

    /// Whether the connection's certificate names node `sender`. A connection serves one peer:
    /// once a sender was proven, another one is refused.
    fn authenticate(&self, sender: NodeId) -> Result<(), WrongNode> {
        let refuse = |reason: &str| {
            if let Some(held_back) = self.refusals.pass() {
                tracing::warn!(
                    sender,
                    reason,
                    held_back,
                    "raft rpc refused: the peer did not prove its id"
                );
            }
            Err(WrongNode::Unauthenticated {
                actual: self.id,
                reason: reason.to_owned(),
            })
        };
        if let Some(&id) = self.peer_id.get() {
            return if id == sender {
                Ok(())
            } else {
                refuse("the connection already speaks for another node")
            };
        }
        match &self.peer {
            Some(cert) if proto::tls::cert_names_node(cert, sender) => {
                // A concurrent first request may have proven another id: only one counts.
                if *self.peer_id.get_or_init(|| sender) == sender {
                    Ok(())
                } else {
                    refuse("the connection already speaks for another node")
                }
            }
            Some(_) => refuse("the certificate names another node"),
            None => refuse("no node certificate"),
        }
    }

    /// Whether `credential` is the cluster's admin credential.
    fn check_admin(&self, to: NodeId, credential: &AdminCredential) -> Result<(), WrongNode> {
        self.check(to)?;
        if self.tls.token().admin_matches(credential) {
            return Ok(());
        }
        if let Some(held_back) = self.refusals.pass() {
            tracing::warn!(held_back, "admin rpc refused: wrong admin credential");
        }
        Err(WrongNode::Unauthenticated {
            actual: self.id,
            reason: "wrong admin credential (derived from the join token)".into(),
        })
    }

    fn handle_enroll(&self, req: &EnrollRequest) -> Result<EnrollReply, EnrollError> {
        if req.cluster != *self.cluster {
            return Err(EnrollError::WrongCluster {
                ours: self.cluster.to_string(),
                theirs: req.cluster.chars().take(64).collect(),
            });
        }
        if !self.tls.token().secret_matches(&req.secret) {
            if let Some(held_back) = self.refusals.pass() {
                tracing::warn!(
                    node = req.id,
                    held_back,
                    "enrollment refused: wrong join secret"
                );
            }
            return Err(EnrollError::WrongSecret);
        }
        let taken = req.id == self.id
            || crate::raft::with_server_metrics(&self.raft, |m| {
                m.membership_config.membership().get_node(&req.id).is_some()
            });
        if taken {
            return Err(EnrollError::IdTaken(req.id));
        }
        let key = RemotePublicKey::parse(&req.public_key).ok_or(EnrollError::BadKey)?;
        let cert = self
            .tls
            .ca()
            .issue(req.id, &key)
            .map_err(|e| EnrollError::Issue(e.to_string()))?;
        tracing::info!(node = req.id, "enrolled a new node");
        Ok(EnrollReply {
            ca_cert: self.tls.ca().cert().to_vec(),
            ca_key_pem: self.tls.ca().key_pem(),
            cert: cert.to_vec(),
        })
    }

    fn check(&self, to: NodeId) -> Result<(), WrongNode> {
        if to == self.id {
            Ok(())
        } else {
            if let Some(held_back) = self.refusals.pass() {
                tracing::warn!(wanted = to, held_back, "raft rpc addressed to another node");
            }
            Err(WrongNode::Addressee {
                wanted: to,
                actual: self.id,
            })
        }
    }

    /// [`check`](Self::check), [`authenticate`](Self::authenticate), then [`admit`] for a
    /// request from `sender`.
    fn check_member(&self, to: NodeId, sender: NodeId, inbound: Inbound) -> Result<(), WrongNode> {
        self.check(to)?;
        self.authenticate(sender)?;
        let view = crate::raft::with_server_metrics(&self.raft, |m| {
            let membership = m.membership_config.membership();
            MembershipView {
                has_members: membership.nodes().next().is_some(),
                sender_is_member: membership.get_node(&sender).is_some(),
                our_term: m.vote.leader_id().term,
            }
        });
        if admit(view, inbound) {
            return Ok(());
        }
        if let Some(held_back) = self.refusals.pass() {
            tracing::warn!(
                sender,
                ?inbound,
                held_back,
                "raft rpc from a node outside the membership refused"
            );
        }
        Err(WrongNode::NotAMember {
            sender,
            actual: self.id,
        })
    }
}

/// The node a vote names as candidate or leader.
fn sender_of(vote: &Vote) -> NodeId {
    vote.leader_id().node_id
}

impl RaftRpc for RaftRpcServer {
    async fn append(
        self,
        _: context::Context,
        to: NodeId,
        req: AppendEntriesRequest<TypeConfig>,
    ) -> RaftAnswer<AppendEntriesResponse<TypeConfig>> {
        // Taken first: a request refused below gives up its turn as it returns.
        let turn = self
            .append_turn
            .as_ref()
            .and_then(|turn| turn.lock().take());
        let term = req.vote.leader_id().term;
        self.check_member(to, sender_of(&req.vote), Inbound::Append { term })?;
        if req.vote.is_committed() {
            self.conn.saw_leader(sender_of(&req.vote));
            self.contact.heard();
        }
        let started = (!req.entries.is_empty()).then(Instant::now);
        let response = match turn {
            Some(turn) => self.appends.append(&self.raft, turn, req).await,
            None => self.raft.append_entries(req).await,
        };
        if let Some(started) = started {
            self.append_handling
                .observe(started.elapsed().as_secs_f64());
        }
        Ok(response)
    }

    async fn vote(
        self,
        _: context::Context,
        to: NodeId,
        req: VoteRequest<TypeConfig>,
    ) -> RaftAnswer<VoteResponse<TypeConfig>> {
        self.check_member(to, sender_of(&req.vote), Inbound::Vote)?;
        Ok(self.raft.vote(req).await)
    }

    async fn pre_vote(
        self,
        _: context::Context,
        to: NodeId,
        req: VoteRequest<TypeConfig>,
    ) -> RaftAnswer<VoteResponse<TypeConfig>> {
        self.check_member(to, sender_of(&req.vote), Inbound::Vote)?;
        Ok(self.raft.pre_vote(req).await)
    }

    async fn snapshot(
        self,
        _: context::Context,
        to: NodeId,
        chunk: SnapshotChunk,
    ) -> Result<Result<Option<SnapshotResponse<TypeConfig>>, TransferError>, WrongNode> {
        let term = chunk.vote.leader_id().term;
        self.check_member(to, sender_of(&chunk.vote), Inbound::Append { term })?;
        Ok(self.snapshots.receive(&self.raft, chunk).await)
    }

    async fn transfer_leader(
        self,
        _: context::Context,
        to: NodeId,
        req: TransferLeaderRequest<TypeConfig>,
    ) -> RaftAnswer<TransferLeaderResponse<TypeConfig>> {
        self.check_member(to, sender_of(req.from_leader()), Inbound::Vote)?;
        Ok(self
            .raft
            .handle_transfer_leader(req)
            .await
            .map_err(RaftError::Fatal))
    }

    async fn join(
        self,
        _: context::Context,
        to: NodeId,
        req: JoinRequest,
    ) -> Result<Result<JoinReply, JoinError>, WrongNode> {
        self.check(to)?;
        self.authenticate(req.id)?;
        tracing::info!(node = req.id, raft_addr = %req.member.raft_addr, "join request");
        Ok(cluster::handle_join(&self.raft, &self.cluster, req).await)
    }

    async fn remove(
        self,
        _: context::Context,
        to: NodeId,
        admin: AdminCredential,
        req: RemoveRequest,
    ) -> Result<Result<RemoveReply, JoinError>, WrongNode> {
        self.check_admin(to, &admin)?;
        tracing::info!(node = req.id, "remove request");
        Ok(cluster::handle_remove(&self.raft, &self.cluster, req).await)
    }

    async fn members(
        self,
        _: context::Context,
        to: NodeId,
        admin: AdminCredential,
        req: MembersRequest,
    ) -> Result<Result<Vec<MemberInfo>, JoinError>, WrongNode> {
        self.check_admin(to, &admin)?;
        Ok(self.admin.handle_members(&req))
    }

    async fn leave(
        self,
        _: context::Context,
        to: NodeId,
        admin: AdminCredential,
        req: LeaveRequest,
    ) -> Result<Result<LeaveReply, JoinError>, WrongNode> {
        self.check_admin(to, &admin)?;
        tracing::info!("leave request");
        Ok(self.admin.handle_leave(&req).await)
    }

    async fn enroll(
        self,
        _: context::Context,
        req: EnrollRequest,
    ) -> Result<EnrollReply, EnrollError> {
        self.handle_enroll(&req)
    }

    async fn rotate_token(
        self,
        _: context::Context,
        to: NodeId,
        admin: AdminCredential,
        req: RotateRequest,
    ) -> Result<Result<String, JoinError>, WrongNode> {
        self.check_admin(to, &admin)?;
        tracing::info!("join secret rotation requested");
        Ok(join_secret::handle_rotate(&self.raft, &self.cluster, &self.tls, &req).await)
    }

    async fn backup_index(
        self,
        _: context::Context,
        to: NodeId,
        admin: AdminCredential,
        req: BackupIndex,
    ) -> Result<Result<u64, JoinError>, WrongNode> {
        self.check_admin(to, &admin)?;
        Ok(self.backups.read_index(&req).await)
    }

    async fn backup_open(
        self,
        _: context::Context,
        to: NodeId,
        admin: AdminCredential,
        req: BackupOpen,
    ) -> Result<Result<BackupOpened, JoinError>, WrongNode> {
        self.check_admin(to, &admin)?;
        tracing::info!(min_index = ?req.min_index, "backup requested");
        Ok(self.backups.open(&req).await)
    }

    async fn backup_read(
        self,
        _: context::Context,
        to: NodeId,
        admin: AdminCredential,
        req: BackupRead,
    ) -> Result<Result<Vec<u8>, JoinError>, WrongNode> {
        self.check_admin(to, &admin)?;
        Ok(self.backups.read(&req).await)
    }

    async fn default_retention(
        self,
        _: context::Context,
        to: NodeId,
        admin: AdminCredential,
        req: RetentionRequest,
    ) -> Result<Result<proto::Retention, JoinError>, WrongNode> {
        self.check_admin(to, &admin)?;
        let chat = self.backups.chat();
        Ok(retention::handle_default_retention(&self.raft, chat, &self.cluster, &req).await)
    }

    async fn ephemeral(
        self,
        _: context::Context,
        to: NodeId,
        from: NodeId,
        news: EphemeralNews,
    ) -> Result<(), WrongNode> {
        self.check_member(to, from, Inbound::News)?;
        self.ephemeral.heard_from(from, news, Instant::now());
        Ok(())
    }

    async fn web_write(
        self,
        _: context::Context,
        to: NodeId,
        from: NodeId,
        req: Forwarded,
    ) -> Result<Result<WebWritten, proto::ApiError>, WrongNode> {
        self.check_member(to, from, Inbound::Web)?;
        Ok(match &self.web {
            Some(web) => web.run_forwarded(req).await,
            None => Err(proto::ApiError::unavailable("node starting")),
        })
    }

    async fn web_url(
        self,
        _: context::Context,
        to: NodeId,
        from: NodeId,
    ) -> Result<Option<String>, WrongNode> {
        self.check_member(to, from, Inbound::Web)?;
        Ok(self.web.as_ref().and_then(|web| web.url.clone()))
    }
}

/// News waiting for one peer; more is dropped (the next periodic news carries the online list
/// again, and typing notes are worth nothing late).
const NEWS_QUEUE_LEN: usize = 64;

/// How long one piece of news to a peer may take before the next is tried.
const NEWS_TIMEOUT: Duration = Duration::from_secs(1);

/// Sends node `id`'s presence and typing news from `hub` to every other member of its
/// membership: at once when there is some, and every [`GOSSIP_EVERY`] anyway. Each peer has
/// its own queue and task, so a dead peer delays nobody else. Runs until aborted.
pub async fn gossip_ephemeral(id: NodeId, hub: Ephemeral, raft: Raft, network: Network) {
    let mut queues: HashMap<NodeId, tokio::sync::mpsc::Sender<EphemeralNews>> = HashMap::new();
    let mut deadline = tokio::time::Instant::now() + GOSSIP_EVERY;
    loop {
        let Some(news) = hub.next_news(deadline).await else {
            continue;
        };
        let now = tokio::time::Instant::now();
        if now >= deadline {
            deadline = now + GOSSIP_EVERY;
        }
        hub.expire(Instant::now());
        let peers: Vec<(NodeId, String)> = crate::raft::with_server_metrics(&raft, |m| {
            m.membership_config
                .membership()
                .nodes()
                .filter(|(node, _)| **node != id)
                .map(|(node, member)| (*node, member.raft_addr.clone()))
                .collect()
        });
        // Dropping a removed peer's queue ends its task.
        queues.retain(|node, _| peers.iter().any(|(peer, _)| peer == node));
        for (target, addr) in peers {
            let queue = queues.entry(target).or_insert_with(|| {
                let (tx, mut rx) = tokio::sync::mpsc::channel(NEWS_QUEUE_LEN);
                let peer = network.peer(target, addr);
                tokio::spawn(async move {
                    while let Some(news) = rx.recv().await {
                        peer.send_news(id, news).await;
                    }
                });
                tx
            });
            let _ = queue.try_send(news.clone());
        }
    }
}

/// How long a join request may take (adding a learner commits a membership entry).
const JOIN_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a leave may take: the leaving node finds the leader and waits for a joint
/// membership change to commit, retrying for up to 20 s (`admin.rs`).
const LEAVE_CALL_TIMEOUT: Duration = Duration::from_secs(25);

/// Why a join request did not get an answer from the leader.
#[derive(Debug, thiserror::Error)]
pub enum JoinCallError {
    /// No connection.
    #[error("cannot reach {addr}: {reason}")]
    Unreachable {
        /// Where.
        addr: SocketAddr,
        /// Why, briefly.
        reason: String,
    },
    /// The node at that address is not who discovery said.
    #[error(transparent)]
    WrongNode(#[from] WrongNode),
    /// The leader refused.
    #[error(transparent)]
    Refused(#[from] JoinError),
    /// The member refused an enrollment.
    #[error(transparent)]
    EnrollRefused(#[from] EnrollError),
}

/// The answer every admin RPC gives: refused by the leader, or sent to the wrong node.
type AdminAnswer<T> = Result<Result<T, JoinError>, WrongNode>;

/// How one side dials another's Raft port for a one-off call: with the node's own
/// certificate (node to node) or with none (admin tools, enrollment), verifying the answering
/// node against the cluster CA either way.
pub type Dialer = Arc<rustls::ClientConfig>;

/// Makes one admin call over a fresh connection to node `to` at `addr`, waiting at most
/// `timeout`, and folds its three layers of failure (transport, wrong node, refusal) into one
/// error.
async fn admin_call<T, F, Fut>(
    dialer: &Dialer,
    addr: SocketAddr,
    to: NodeId,
    timeout: Duration,
    call: F,
) -> Result<T, JoinCallError>
where
    F: FnOnce(RaftRpcClient, context::Context) -> Fut,
    Fut: std::future::Future<Output = Result<AdminAnswer<T>, tarpc::client::RpcError>>,
{
    let client = dial(dialer, addr, proto::tls::node(to)).await?;
    let answer =
        call(client, ctx_within(timeout))
            .await
            .map_err(|e| JoinCallError::Unreachable {
                addr,
                reason: e.to_string(),
            })??;
    Ok(answer?)
}

/// Sends a join request to node `to` at `addr` over a fresh connection.
///
/// # Errors
/// [`JoinCallError`] saying why there was no success.
pub async fn request_join(
    dialer: &Dialer,
    addr: SocketAddr,
    to: NodeId,
    request: JoinRequest,
) -> Result<JoinReply, JoinCallError> {
    admin_call(dialer, addr, to, JOIN_TIMEOUT, |client, ctx| async move {
        client.join(ctx, to, request).await
    })
    .await
}

/// Sends a removal request to node `to` (the leader) at `addr` over a fresh connection.
///
/// # Errors
/// [`JoinCallError`] saying why there was no success.
pub async fn request_remove(
    dialer: &Dialer,
    admin: AdminCredential,
    addr: SocketAddr,
    to: NodeId,
    request: RemoveRequest,
) -> Result<RemoveReply, JoinCallError> {
    admin_call(dialer, addr, to, JOIN_TIMEOUT, |client, ctx| async move {
        client.remove(ctx, to, admin, request).await
    })
    .await
}

/// Asks node `to` (the leader) at `addr` for its membership, over a fresh connection.
///
/// # Errors
/// [`JoinCallError`] saying why there was no answer; `NotLeader` names the leader to ask.
pub async fn request_members(
    dialer: &Dialer,
    admin: AdminCredential,
    addr: SocketAddr,
    to: NodeId,
    request: MembersRequest,
) -> Result<Vec<MemberInfo>, JoinCallError> {
    admin_call(dialer, addr, to, JOIN_TIMEOUT, |client, ctx| async move {
        client.members(ctx, to, admin, request).await
    })
    .await
}

/// Asks node `to` (the leader) at `addr` to rotate the join secret, proving the current
/// token's admin credential; answers the new token.
///
/// # Errors
/// [`JoinCallError`] saying why there was no rotation; `NotLeader` names the leader to ask.
pub async fn request_rotate(
    dialer: &Dialer,
    admin: AdminCredential,
    addr: SocketAddr,
    to: NodeId,
    request: RotateRequest,
) -> Result<String, JoinCallError> {
    admin_call(dialer, addr, to, JOIN_TIMEOUT, |client, ctx| async move {
        client.rotate_token(ctx, to, admin, request).await
    })
    .await
}

/// Asks node `to` (the leader) at `addr` for the cluster's default retention, setting it first
/// when `request.set` is given; answers the default in force.
///
/// # Errors
/// [`JoinCallError`]; `NotLeader` names the leader to ask.
pub async fn request_default_retention(
    dialer: &Dialer,
    admin: AdminCredential,
    addr: SocketAddr,
    to: NodeId,
    request: RetentionRequest,
) -> Result<proto::Retention, JoinCallError> {
    admin_call(dialer, addr, to, JOIN_TIMEOUT, |client, ctx| async move {
        client.default_retention(ctx, to, admin, request).await
    })
    .await
}

/// How long a backup cut may take: the node may wait for its state machine to reach the read
/// index, then writes the whole state.
const BACKUP_OPEN_TIMEOUT: Duration = Duration::from_secs(300);
/// How long one chunk of a backup may take.
const BACKUP_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// An operator's connection to one node for a backup: one TLS connection for the cut and all
/// its chunks.
pub struct BackupClient {
    client: RaftRpcClient,
    admin: AdminCredential,
    addr: SocketAddr,
    to: NodeId,
}

impl BackupClient {
    /// Connects to node `to` at `addr`.
    ///
    /// # Errors
    /// [`JoinCallError::Unreachable`] when the connection or the handshake fails.
    pub async fn connect(
        dialer: &Dialer,
        admin: AdminCredential,
        addr: SocketAddr,
        to: NodeId,
    ) -> Result<BackupClient, JoinCallError> {
        let client = dial(dialer, addr, proto::tls::node(to)).await?;
        Ok(BackupClient {
            client,
            admin,
            addr,
            to,
        })
    }

    fn unreachable(&self, e: &tarpc::client::RpcError) -> JoinCallError {
        JoinCallError::Unreachable {
            addr: self.addr,
            reason: e.to_string(),
        }
    }

    /// The addressee's (the leader's) read index.
    ///
    /// # Errors
    /// [`JoinCallError`]; `NotLeader` names the leader to ask.
    pub async fn read_index(&self, request: BackupIndex) -> Result<u64, JoinCallError> {
        let ctx = ctx_within(JOIN_TIMEOUT);
        let answer = self
            .client
            .backup_index(ctx, self.to, self.admin, request)
            .await;
        Ok(answer.map_err(|e| self.unreachable(&e))???)
    }

    /// Has the addressee cut a backup.
    ///
    /// # Errors
    /// [`JoinCallError`].
    pub async fn open(&self, request: BackupOpen) -> Result<BackupOpened, JoinCallError> {
        let ctx = ctx_within(BACKUP_OPEN_TIMEOUT);
        let answer = self
            .client
            .backup_open(ctx, self.to, self.admin, request)
            .await;
        Ok(answer.map_err(|e| self.unreachable(&e))???)
    }

    /// One chunk of session `session` from `offset`.
    ///
    /// # Errors
    /// [`JoinCallError`].
    pub async fn read(&self, session: u64, offset: u64) -> Result<Vec<u8>, JoinCallError> {
        let ctx = ctx_within(BACKUP_READ_TIMEOUT);
        let request = BackupRead { session, offset };
        let answer = self
            .client
            .backup_read(ctx, self.to, self.admin, request)
            .await;
        Ok(answer.map_err(|e| self.unreachable(&e))???)
    }
}

/// Asks node `to` at `addr` to leave the cluster for good, over a fresh connection.
///
/// # Errors
/// [`JoinCallError`] saying why it did not leave.
pub async fn request_leave(
    dialer: &Dialer,
    admin: AdminCredential,
    addr: SocketAddr,
    to: NodeId,
    request: LeaveRequest,
) -> Result<LeaveReply, JoinCallError> {
    admin_call(
        dialer,
        addr,
        to,
        LEAVE_CALL_TIMEOUT,
        |client, ctx| async move { client.leave(ctx, to, admin, request).await },
    )
    .await
}

/// Asks the node at `addr` (any member) for a certificate, proving the join secret. The
/// answering node is verified against the token's CA before the secret is sent.
///
/// # Errors
/// [`JoinCallError::Unreachable`] with the transport's or the refusal's reason.
pub async fn request_enroll(
    token: &proto::tls::JoinToken,
    addr: SocketAddr,
    request: EnrollRequest,
) -> Result<EnrollReply, JoinCallError> {
    let verifier = proto::tls::CaVerifier::new(proto::tls::Trust::Pinned(token.ca));
    let dialer = proto::tls::client_config(verifier, proto::tls::ALPN_RAFT);
    let client = dial(&dialer, addr, proto::tls::any_node()).await?;
    let unreachable = |reason: String| JoinCallError::Unreachable { addr, reason };
    Ok(client
        .enroll(ctx_within(JOIN_TIMEOUT), request)
        .await
        .map_err(|e| unreachable(e.to_string()))??)
}

/// Opens a Raft RPC connection to node `to` at `addr` with `dialer`, for tools and tests that
/// speak the protocol directly.
///
/// # Errors
/// [`JoinCallError::Unreachable`] when the connection or the handshake fails.
pub async fn connect_raft(
    dialer: &Dialer,
    addr: SocketAddr,
    to: NodeId,
) -> Result<RaftRpcClient, JoinCallError> {
    dial(dialer, addr, proto::tls::node(to)).await
}

async fn dial(
    dialer: &Dialer,
    addr: SocketAddr,
    name: rustls::pki_types::ServerName<'static>,
) -> Result<RaftRpcClient, JoinCallError> {
    let transport = proto::connect(addr, dialer.clone(), name, CONNECT_TIMEOUT)
        .await
        .map_err(|e| JoinCallError::Unreachable {
            addr,
            reason: e.to_string(),
        })?;
    Ok(RaftRpcClient::new(tarpc::client::Config::default(), transport).spawn())
}

/// Largest frame the Raft port reads from a caller without a node certificate (64 KiB):
/// enrollment and admin requests are a few hundred bytes.
const ANONYMOUS_FRAME_BYTES_MAX: usize = 64 << 10;

/// The Raft RPC listener: plain TCP, the handshake runs in each connection's task.
pub(crate) type RaftListener = tokio::net::TcpListener;

/// Binds the Raft RPC listener. Separate from [`serve`] so the caller learns the port before
/// Raft starts (the port goes into this node's `Member`).
///
/// # Errors
/// The io error from binding.
pub async fn bind(addr: SocketAddr) -> std::io::Result<RaftListener> {
    proto::listen(addr).await
}

/// Accepts Raft RPC connections until the returned task is aborted. Connections beyond
/// `limiter`'s caps are closed at once; each other one runs its TLS handshake in its own task,
/// then its requests run concurrently. When a connection that carried the leader's
/// AppendEntries ends, [`LeaderWatch`] checks whether the leader died.
pub fn serve(
    listener: RaftListener,
    server: RaftRpcServer,
    limiter: crate::conn_limit::ConnLimiter,
) -> tokio::task::JoinHandle<()> {
    let local = listener.local_addr().ok();
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    tracing::warn!(error = %e, "raft rpc accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(guard) = limiter.admit(peer, local, "raft") else {
                continue;
            };
            let server = server.clone();
            tokio::spawn(async move {
                let _guard = guard;
                let stream = match proto::accept_tls(stream, server.tls.raft_server.clone()).await {
                    Ok(stream) => stream,
                    Err(e) => {
                        tracing::info!(%peer, error = %e, "raft port: TLS handshake failed");
                        return;
                    }
                };
                let cert = proto::peer_certificates(&stream)
                    .and_then(|chain| chain.first())
                    .cloned();
                // Only a node certificate (verified in the handshake) earns big frames: an
                // anonymous caller (enrollment, admin tools) sends small requests only.
                let read_max = if cert.is_some() {
                    proto::FRAME_BYTES_MAX
                } else {
                    ANONYMOUS_FRAME_BYTES_MAX
                };
                let server = server.for_connection(cert);
                let transport = proto::framed_reading_at_most(stream, read_max);
                let (watch, conn) = (server.watch.clone(), server.conn.clone());
                // Each request runs on its own task; an `append` first takes a ticket here, in
                // the order the connection read it, so openraft gets them in that order.
                let mut requests = std::pin::pin!(BaseChannel::with_defaults(transport).requests());
                while let Some(request) = requests.next().await {
                    let request = match request {
                        Ok(request) => request,
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "raft rpc connection failed");
                            break;
                        }
                    };
                    let mut server = server.clone();
                    if matches!(request.get().message, RaftRpcRequest::Append { .. }) {
                        let turn = server.appends.turn(server.appends.ticket());
                        server.append_turn = Some(Arc::new(Mutex::new(Some(turn))));
                    }
                    tokio::spawn(request.execute(server.serve()));
                }
                watch.connection_closed(&conn).await;
            });
        }
    })
}

/// Which of a peer's two connections a call uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Lane {
    /// AppendEntries, votes and leadership transfer.
    Log,
    /// Snapshot chunks.
    Snapshot,
    /// Presence and typing news, kept off the log lane so it never waits behind a large
    /// AppendEntries.
    News,
    /// Web clients' forwarded writes and web URLs.
    Web,
}

type Pool = Arc<Mutex<HashMap<(NodeId, Lane), RaftRpcClient>>>;

/// openraft's network factory: hands out per-peer handles sharing one connection pool.
#[derive(Clone)]
pub struct Network {
    pool: Pool,
    contacts: Contacts,
    dialer: Dialer,
    /// Round trips of the AppendEntries this node sent with entries, answered.
    append_round_trip: Histogram,
    /// How many AppendEntries with entries were out to the peer as each was sent.
    append_in_flight: Histogram,
}

impl Network {
    /// A network that dials peers with `dialer` (the node's certificate).
    pub fn new(dialer: Dialer) -> Network {
        Network {
            pool: Pool::default(),
            contacts: Contacts::default(),
            dialer,
            append_round_trip: latency_histogram(18),
            append_in_flight: count_histogram(),
        }
    }

    /// Records into `round_trip` the round trip of each answered AppendEntries with entries,
    /// and into `in_flight` how many such requests were out to the peer as each was sent.
    pub fn timing_appends(mut self, round_trip: Histogram, in_flight: Histogram) -> Network {
        self.append_round_trip = round_trip;
        self.append_in_flight = in_flight;
        self
    }

    /// When each peer last answered an AppendEntries (for `server members`).
    pub fn contacts(&self) -> Contacts {
        self.contacts.clone()
    }

    /// A handle to peer `target` at `addr`, sharing the pool's connections.
    pub fn peer(&self, target: NodeId, addr: String) -> PeerClient {
        PeerClient {
            target,
            addr,
            pool: self.pool.clone(),
            contacts: self.contacts.clone(),
            dialer: self.dialer.clone(),
            append_round_trip: self.append_round_trip.clone(),
            append_in_flight: self.append_in_flight.clone(),
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> PeerClient {
        self.peer(target, node.raft_addr.clone())
    }
}

/// A handle to one peer. Connects lazily; a broken connection is dropped from the pool and
/// redialed on the next call.
pub struct PeerClient {
    target: NodeId,
    addr: String,
    pool: Pool,
    contacts: Contacts,
    dialer: Dialer,
    append_round_trip: Histogram,
    append_in_flight: Histogram,
}

/// Most AppendEntries a leader keeps out to one follower at once.
const APPEND_PIPELINE_MAX: usize = 8;

/// The log ids an AppendEntries covers: after its `prev_log_id`, up to the last it carries.
type AppendRange = (Option<LogId>, Option<LogId>);

type InFlightAppend = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = (
                    AppendRange,
                    Option<Instant>,
                    Result<RaftAnswer<AppendEntriesResponse<TypeConfig>>, RpcError>,
                ),
            > + Send,
    >,
>;

/// A pipelined `stream_append`: its requests still to come and those out, oldest first.
struct Pipeline<S> {
    input: Option<S>,
    in_flight: FuturesOrdered<InFlightAppend>,
    /// How many of `in_flight` carry entries.
    with_entries: usize,
}

/// How long a connect and TLS handshake may take before the peer counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// The shortest deadline of an AppendEntries that carries entries. openraft gives every
/// AppendEntries one heartbeat (30 ms); a follower's fsync on a loaded machine takes longer,
/// and an append cut off by its deadline is sent again whole, so the slow disk gets more work.
/// Heartbeats (no entries) keep openraft's deadline.
const APPEND_DEADLINE_MIN: Duration = Duration::from_secs(1);

/// The deadline of one AppendEntries: openraft's, or [`APPEND_DEADLINE_MIN`] when it carries
/// entries.
fn append_ttl(option: &RPCOption, req: &AppendEntriesRequest<TypeConfig>) -> Duration {
    if req.entries.is_empty() {
        option.hard_ttl()
    } else {
        option.hard_ttl().max(APPEND_DEADLINE_MIN)
    }
}

fn ctx_for(option: &RPCOption) -> context::Context {
    ctx_within(option.hard_ttl())
}

fn ctx_within(ttl: Duration) -> context::Context {
    let mut ctx = context::current();
    ctx.deadline = Instant::now() + ttl;
    ctx
}

/// Why a call to a peer failed before openraft's own answer: the transport, or the peer.
enum CallError {
    Unreachable(Unreachable<TypeConfig>),
    Network(NetworkError<TypeConfig>),
}

impl From<CallError> for RPCError<TypeConfig> {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Unreachable(e) => e.into(),
            CallError::Network(e) => e.into(),
        }
    }
}

impl From<CallError> for StreamingError<TypeConfig> {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Unreachable(e) => e.into(),
            CallError::Network(e) => e.into(),
        }
    }
}

impl PeerClient {
    async fn client(&self, lane: Lane) -> Result<RaftRpcClient, CallError> {
        if let Some(client) = self.pool.lock().get(&(self.target, lane)) {
            return Ok(client.clone());
        }
        let unreachable = |e: &dyn std::fmt::Display| {
            CallError::Unreachable(Unreachable::new(&std::io::Error::other(e.to_string())))
        };
        let addr = crate::cluster::resolve(&self.addr)
            .await
            .map_err(|e| unreachable(&e))?;
        let name = proto::tls::node(self.target);
        let transport = proto::connect(addr, self.dialer.clone(), name, CONNECT_TIMEOUT)
            .await
            .map_err(|e| unreachable(&e))?;
        let client = RaftRpcClient::new(tarpc::client::Config::default(), transport).spawn();
        self.pool.lock().insert((self.target, lane), client.clone());
        Ok(client)
    }

    /// Folds a call's three layers (transport, wrong node, openraft's fatal error) into one.
    fn settle<T>(
        &self,
        lane: Lane,
        answer: Result<RaftAnswer<T>, RpcError>,
    ) -> Result<T, CallError> {
        match answer {
            Ok(Ok(Ok(response))) => Ok(response),
            // The peer's Raft has stopped: to this node it is as good as unreachable.
            Ok(Ok(Err(e))) => Err(CallError::Unreachable(Unreachable::new(&e))),
            Ok(Err(wrong)) => Err(self.wrong_node(lane, wrong)),
            Err(e) => Err(self.transport_error(lane, e)),
        }
    }

    fn transport_error(&self, lane: Lane, e: RpcError) -> CallError {
        match e {
            RpcError::Shutdown | RpcError::Send(_) | RpcError::Channel(_) => {
                self.pool.lock().remove(&(self.target, lane));
                CallError::Unreachable(Unreachable::new(&e))
            }
            RpcError::DeadlineExceeded | RpcError::Server(_) => {
                CallError::Network(NetworkError::new(&e))
            }
        }
    }

    /// Forwards a web client's write from node `from` to this peer (the leader), within
    /// `timeout`. Transport failures become `Unavailable`: the page retries with the same
    /// idempotency key.
    pub async fn web_write(
        &self,
        from: NodeId,
        req: Forwarded,
        timeout: Duration,
    ) -> Result<WebWritten, proto::ApiError> {
        let unreachable = || proto::ApiError::unavailable("the leader is unreachable");
        let client = self.client(Lane::Web).await.map_err(|_| unreachable())?;
        match client
            .web_write(ctx_within(timeout), self.target, from, req)
            .await
        {
            Ok(Ok(answer)) => answer,
            Ok(Err(wrong)) => {
                self.wrong_node(Lane::Web, wrong);
                Err(unreachable())
            }
            Err(e) => {
                self.transport_error(Lane::Web, e);
                Err(unreachable())
            }
        }
    }

    /// This peer's web URL as it says, or `None` when it serves none or cannot be asked.
    pub async fn web_url(&self, from: NodeId, timeout: Duration) -> Option<String> {
        let client = self.client(Lane::Web).await.ok()?;
        match client.web_url(ctx_within(timeout), self.target, from).await {
            Ok(Ok(url)) => url,
            Ok(Err(wrong)) => {
                self.wrong_node(Lane::Web, wrong);
                None
            }
            Err(e) => {
                self.transport_error(Lane::Web, e);
                None
            }
        }
    }

    /// Sends `news` from node `from`; a failure is only logged (the next news follows soon).
    async fn send_news(&self, from: NodeId, news: EphemeralNews) {
        let Ok(client) = self.client(Lane::News).await else {
            return;
        };
        let answer = client
            .ephemeral(ctx_within(NEWS_TIMEOUT), self.target, from, news)
            .await;
        let failed = match answer {
            Ok(Ok(())) => return,
            Ok(Err(wrong)) => {
                let error = wrong.to_string();
                self.wrong_node(Lane::News, wrong);
                error
            }
            Err(e) => {
                let error = e.to_string();
                self.transport_error(Lane::News, e);
                error
            }
        };
        tracing::debug!(peer = self.target, %failed, "presence news not delivered");
    }

    /// Sends one AppendEntries of a pipelined stream; the future answers with the range it
    /// covers and, when it carried entries, when it was sent.
    fn send_append(
        &self,
        client: &RaftRpcClient,
        option: &RPCOption,
        req: AppendEntriesRequest<TypeConfig>,
    ) -> InFlightAppend {
        let last = req.entries.last().map(|e| e.log_id).or(req.prev_log_id);
        let range = (req.prev_log_id, last);
        let ttl = append_ttl(option, &req);
        let started = (!req.entries.is_empty()).then(Instant::now);
        let (client, target) = (client.clone(), self.target);
        Box::pin(async move {
            let answer = client.append(ctx_within(ttl), target, req).await;
            (range, started, answer)
        })
    }

    /// openraft's reading of one pipelined AppendEntries answer, and whether the stream may go
    /// on: not after a refusal, an error, or an answer that took only part of the entries.
    fn finish_append(
        &self,
        (prev, last): AppendRange,
        started: Option<Instant>,
        answer: Result<RaftAnswer<AppendEntriesResponse<TypeConfig>>, RpcError>,
    ) -> (
        Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>,
        bool,
    ) {
        let response = match self.settle(Lane::Log, answer) {
            Ok(response) => response,
            Err(e) => return (Err(e.into()), false),
        };
        if let Some(started) = started {
            self.append_round_trip
                .observe(started.elapsed().as_secs_f64());
        }
        self.contacts.heard(self.target);
        let whole = match &response {
            AppendEntriesResponse::PartialSuccess(got) => *got == last,
            _ => true,
        };
        let result = response.into_stream_result(prev, last);
        let go_on = result.is_ok() && whole;
        (Ok(result), go_on)
    }

    fn wrong_node(&self, lane: Lane, e: WrongNode) -> CallError {
        // The address now belongs to someone else, or the peer does not count us as a member:
        // forget the connection and back off.
        self.pool.lock().remove(&(self.target, lane));
        CallError::Unreachable(Unreachable::new(&e))
    }
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let client = self.client(Lane::Log).await?;
        let ttl = append_ttl(&option, &rpc);
        let started = (!rpc.entries.is_empty()).then(Instant::now);
        let answer = client.append(ctx_within(ttl), self.target, rpc).await;
        let response = self.settle(Lane::Log, answer)?;
        if let Some(started) = started {
            self.append_round_trip
                .observe(started.elapsed().as_secs_f64());
        }
        self.contacts.heard(self.target);
        Ok(response)
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<
            BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>,
            RPCError<TypeConfig>,
        >,
    >
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        Box::pin(async move {
            let client = self.client(Lane::Log).await?;
            let this: &'s PeerClient = self;
            let state = Pipeline {
                input: Some(input),
                in_flight: FuturesOrdered::new(),
                with_entries: 0,
            };
            // Each step sends requests while there is room, until the oldest one out is
            // answered; the stream ends after an answer that stops it, or when the input has
            // ended and every request is answered.
            let answers = futures::stream::unfold(Some(state), move |state| {
                let client = client.clone();
                let option = option.clone();
                async move {
                    let mut state = state?;
                    loop {
                        let Pipeline {
                            input,
                            in_flight,
                            with_entries,
                        } = &mut state;
                        let room = input.is_some() && in_flight.len() < APPEND_PIPELINE_MAX;
                        if !room && in_flight.is_empty() {
                            return None;
                        }
                        let next_request = async {
                            match input.as_mut() {
                                Some(input) => input.next().await,
                                None => std::future::pending().await,
                            }
                        };
                        tokio::select! {
                            biased;
                            Some((range, started, answer)) = in_flight.next(), if !in_flight.is_empty() => {
                                if started.is_some() {
                                    *with_entries -= 1;
                                }
                                let (answer, go_on) = this.finish_append(range, started, answer);
                                return Some((answer, go_on.then_some(state)));
                            }
                            request = next_request, if room => match request {
                                Some(req) => {
                                    if !req.entries.is_empty() {
                                        *with_entries += 1;
                                        this.append_in_flight.observe(*with_entries as f64);
                                    }
                                    in_flight.push_back(this.send_append(&client, &option, req));
                                }
                                None => *input = None,
                            },
                        }
                    }
                }
            });
            let answers: BoxStream<'s, _> = Box::pin(answers);
            Ok(answers)
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let client = self.client(Lane::Log).await?;
        let answer = client.vote(ctx_for(&option), self.target, rpc).await;
        Ok(self.settle(Lane::Log, answer)?)
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let client = self.client(Lane::Log).await?;
        let answer = client.pre_vote(ctx_for(&option), self.target, rpc).await;
        Ok(self.settle(Lane::Log, answer)?)
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let client = self.client(Lane::Log).await?;
        let answer = client
            .transfer_leader(ctx_for(&option), self.target, req)
            .await;
        Ok(self.settle(Lane::Log, answer)?)
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let client = self.client(Lane::Snapshot).await?;
        let (target, lane, this) = (self.target, Lane::Snapshot, &*self);
        let send = snapshot_transfer::send(vote, snapshot, |chunk| {
            let client = client.clone();
            let ctx = ctx_for(&option);
            async move {
                match client.snapshot(ctx, target, chunk).await {
                    Ok(Ok(Ok(answer))) => Ok(answer),
                    Ok(Ok(Err(refused))) => Err(CallError::Network(NetworkError::new(&refused))),
                    Ok(Err(wrong)) => Err(this.wrong_node(lane, wrong)),
                    Err(e) => Err(this.transport_error(lane, e)),
                }
            }
        });
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            result = send => result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_warnings_pass_once_per_period_and_count_the_rest() {
        let gate = WarnGate::default();
        assert_eq!(gate.pass(), Some(0));
        assert_eq!(gate.pass(), None);
        assert_eq!(gate.pass(), None);
        // A period later the next one passes with the count held back.
        gate.state.lock().0 = Some(Instant::now() - REFUSAL_WARN_EVERY);
        assert_eq!(gate.pass(), Some(2));
        assert_eq!(gate.pass(), None);
    }
}
