//! Node-to-node Raft RPC over tarpc: the `RaftRpc` service, its server, and openraft's network
//! (the v2 trait) with a per-peer connection pool.
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
//! Step 5 of "Life of a chat message" in ARCHITECTURE.md.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use openraft::error::{
    NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tarpc::client::RpcError;
use tarpc::context;
use tarpc::server::{BaseChannel, Channel};

use crate::admin::{Admin, Contacts, LeaveReply, LeaveRequest, MemberInfo, MembersRequest};
use crate::cluster::{
    self, JoinError, JoinReply, JoinRequest, LeaderContact, RemoveReply, RemoveRequest,
};
use crate::leader_watch::{InboundConn, LeaderWatch};
use crate::raft::Raft;
use crate::snapshot_file::SnapshotFile;
use crate::snapshot_transfer::{self, SnapshotChunk, SnapshotReceiver, TransferError};
use crate::types::{Member, NodeId, Snapshot, TypeConfig, Vote};

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
        req: RemoveRequest,
    ) -> Result<Result<RemoveReply, JoinError>, WrongNode>;
    /// Asks the leader for every member and its state (see `admin::Admin::handle_members`).
    async fn members(
        to: NodeId,
        req: MembersRequest,
    ) -> Result<Result<Vec<MemberInfo>, JoinError>, WrongNode>;
    /// Asks the addressee to leave the cluster for good (see `admin::Admin::handle_leave`).
    async fn leave(
        to: NodeId,
        req: LeaveRequest,
    ) -> Result<Result<LeaveReply, JoinError>, WrongNode>;
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
        Inbound::Vote => false,
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
    snapshots: SnapshotReceiver,
    contact: LeaderContact,
    /// The connection this clone serves (each accepted connection gets its own).
    conn: InboundConn,
}

impl RaftRpcServer {
    /// A server for node `id` of `cluster`; `admin` answers the operator RPCs, `snapshots`
    /// receives snapshot chunks and `contact` records the leader's AppendEntries.
    pub fn new(
        id: NodeId,
        cluster: &str,
        raft: Raft,
        admin: Arc<Admin>,
        snapshots: SnapshotReceiver,
        contact: LeaderContact,
    ) -> Self {
        RaftRpcServer {
            id,
            cluster: cluster.into(),
            watch: LeaderWatch::new(id, raft.clone()),
            raft,
            admin,
            snapshots,
            contact,
            conn: InboundConn::default(),
        }
    }

    /// A clone that records what one newly accepted connection carries.
    fn for_connection(&self) -> Self {
        RaftRpcServer {
            conn: InboundConn::default(),
            ..self.clone()
        }
    }

    fn check(&self, to: NodeId) -> Result<(), WrongNode> {
        if to == self.id {
            Ok(())
        } else {
            tracing::warn!(wanted = to, "raft rpc addressed to another node");
            Err(WrongNode::Addressee {
                wanted: to,
                actual: self.id,
            })
        }
    }

    /// [`check`](Self::check), then [`admit`] for a request from `sender`.
    fn check_member(&self, to: NodeId, sender: NodeId, inbound: Inbound) -> Result<(), WrongNode> {
        self.check(to)?;
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
        tracing::warn!(
            sender,
            ?inbound,
            "raft rpc from a node outside the membership refused"
        );
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
        let term = req.vote.leader_id().term;
        self.check_member(to, sender_of(&req.vote), Inbound::Append { term })?;
        if req.vote.is_committed() {
            self.conn.saw_leader(sender_of(&req.vote));
            self.contact.heard();
        }
        Ok(self.raft.append_entries(req).await)
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
        self.check(to)?;
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
        tracing::info!(node = req.id, raft_addr = %req.member.raft_addr, "join request");
        Ok(cluster::handle_join(&self.raft, &self.cluster, req).await)
    }

    async fn remove(
        self,
        _: context::Context,
        to: NodeId,
        req: RemoveRequest,
    ) -> Result<Result<RemoveReply, JoinError>, WrongNode> {
        self.check(to)?;
        tracing::info!(node = req.id, "remove request");
        Ok(cluster::handle_remove(&self.raft, &self.cluster, req).await)
    }

    async fn members(
        self,
        _: context::Context,
        to: NodeId,
        req: MembersRequest,
    ) -> Result<Result<Vec<MemberInfo>, JoinError>, WrongNode> {
        self.check(to)?;
        Ok(self.admin.handle_members(&req))
    }

    async fn leave(
        self,
        _: context::Context,
        to: NodeId,
        req: LeaveRequest,
    ) -> Result<Result<LeaveReply, JoinError>, WrongNode> {
        self.check(to)?;
        tracing::info!("leave request");
        Ok(self.admin.handle_leave(&req).await)
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
}

/// The answer every admin RPC gives: refused by the leader, or sent to the wrong node.
type AdminAnswer<T> = Result<Result<T, JoinError>, WrongNode>;

/// Makes one admin call over a fresh connection to `addr`, waiting at most `timeout`, and folds
/// its three layers of failure (transport, wrong node, refusal) into one error.
async fn admin_call<T, F, Fut>(
    addr: SocketAddr,
    timeout: Duration,
    call: F,
) -> Result<T, JoinCallError>
where
    F: FnOnce(RaftRpcClient, context::Context) -> Fut,
    Fut: std::future::Future<Output = Result<AdminAnswer<T>, tarpc::client::RpcError>>,
{
    let (client, ctx) = admin_client(addr, timeout).await?;
    let answer = call(client, ctx)
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
    addr: SocketAddr,
    to: NodeId,
    request: JoinRequest,
) -> Result<JoinReply, JoinCallError> {
    admin_call(addr, JOIN_TIMEOUT, |client, ctx| async move {
        client.join(ctx, to, request).await
    })
    .await
}

/// Sends a removal request to node `to` (the leader) at `addr` over a fresh connection.
///
/// # Errors
/// [`JoinCallError`] saying why there was no success.
pub async fn request_remove(
    addr: SocketAddr,
    to: NodeId,
    request: RemoveRequest,
) -> Result<RemoveReply, JoinCallError> {
    admin_call(addr, JOIN_TIMEOUT, |client, ctx| async move {
        client.remove(ctx, to, request).await
    })
    .await
}

/// Asks node `to` (the leader) at `addr` for its membership, over a fresh connection.
///
/// # Errors
/// [`JoinCallError`] saying why there was no answer; `NotLeader` names the leader to ask.
pub async fn request_members(
    addr: SocketAddr,
    to: NodeId,
    request: MembersRequest,
) -> Result<Vec<MemberInfo>, JoinCallError> {
    admin_call(addr, JOIN_TIMEOUT, |client, ctx| async move {
        client.members(ctx, to, request).await
    })
    .await
}

/// Asks node `to` at `addr` to leave the cluster for good, over a fresh connection.
///
/// # Errors
/// [`JoinCallError`] saying why it did not leave.
pub async fn request_leave(
    addr: SocketAddr,
    to: NodeId,
    request: LeaveRequest,
) -> Result<LeaveReply, JoinCallError> {
    admin_call(addr, LEAVE_CALL_TIMEOUT, |client, ctx| async move {
        client.leave(ctx, to, request).await
    })
    .await
}

async fn admin_client(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(RaftRpcClient, context::Context), JoinCallError> {
    let unreachable = |reason: String| JoinCallError::Unreachable { addr, reason };
    let transport = tokio::time::timeout(CONNECT_TIMEOUT, proto::connect(addr))
        .await
        .map_err(|_| unreachable("connect timed out".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
    let client = RaftRpcClient::new(tarpc::client::Config::default(), transport).spawn();
    let mut ctx = context::current();
    ctx.deadline = Instant::now() + timeout;
    Ok((client, ctx))
}

/// The Raft RPC listener.
pub(crate) type RaftListener =
    proto::Listener<tarpc::ClientMessage<RaftRpcRequest>, tarpc::Response<RaftRpcResponse>>;

/// Binds the Raft RPC listener. Separate from [`serve`] so the caller learns the port before
/// Raft starts (the port goes into this node's `Member`).
///
/// # Errors
/// The io error from binding.
pub async fn bind(addr: SocketAddr) -> std::io::Result<RaftListener> {
    proto::listen(addr).await
}

/// Accepts Raft RPC connections until the returned task is aborted. Each connection's
/// requests run concurrently. When a connection that carried the leader's AppendEntries ends,
/// [`LeaderWatch`] checks whether the leader died. Connections beyond `limiter`'s caps are
/// closed at once.
pub fn serve(
    listener: RaftListener,
    server: RaftRpcServer,
    limiter: crate::conn_limit::ConnLimiter,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let (transport, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    tracing::warn!(error = %e, "raft rpc accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(guard) = limiter.admit(peer, Some(listener.local_addr()), "raft") else {
                continue;
            };
            let server = server.for_connection();
            tokio::spawn(async move {
                let _guard = guard;
                let (watch, conn) = (server.watch.clone(), server.conn.clone());
                BaseChannel::with_defaults(transport)
                    .execute(server.serve())
                    .for_each(|response| async move {
                        tokio::spawn(response);
                    })
                    .await;
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
}

type Pool = Arc<Mutex<HashMap<(NodeId, Lane), RaftRpcClient>>>;

/// openraft's network factory: hands out per-peer handles sharing one connection pool.
#[derive(Clone, Default)]
pub struct Network {
    pool: Pool,
    contacts: Contacts,
}

impl Network {
    /// When each peer last answered an AppendEntries (for `server members`).
    pub fn contacts(&self) -> Contacts {
        self.contacts.clone()
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> PeerClient {
        PeerClient {
            target,
            addr: node.raft_addr.clone(),
            pool: self.pool.clone(),
            contacts: self.contacts.clone(),
        }
    }
}

/// A handle to one peer. Connects lazily; a broken connection is dropped from the pool and
/// redialed on the next call.
pub struct PeerClient {
    target: NodeId,
    addr: String,
    pool: Pool,
    contacts: Contacts,
}

/// How long a connect may take before the peer counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// The shortest deadline of an AppendEntries that carries entries. openraft gives every
/// AppendEntries one heartbeat (30 ms); a follower's fsync on a loaded machine takes longer,
/// and an append cut off by its deadline is sent again whole, so the slow disk gets more work.
/// Heartbeats (no entries) keep openraft's deadline.
const APPEND_DEADLINE_MIN: Duration = Duration::from_secs(1);

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
        let transport = tokio::time::timeout(CONNECT_TIMEOUT, proto::connect(addr))
            .await
            .map_err(|e| unreachable(&e))?
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
        let ttl = if rpc.entries.is_empty() {
            option.hard_ttl()
        } else {
            option.hard_ttl().max(APPEND_DEADLINE_MIN)
        };
        let answer = client.append(ctx_within(ttl), self.target, rpc).await;
        let response = self.settle(Lane::Log, answer)?;
        self.contacts.heard(self.target);
        Ok(response)
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
