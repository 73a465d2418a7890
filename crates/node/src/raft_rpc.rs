//! Node-to-node Raft RPC over tarpc: the `RaftRpc` service, its server, and openraft's network
//! factory with a per-peer connection pool.
//!
//! Every request names the node it is meant for. A node that receives a request addressed to
//! another id answers `WrongNode` instead of acting on it, so an address reused by a different
//! node (a restart on a recycled port, a stale membership) can never make a leader replicate
//! to the wrong node or to itself.
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
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::Raft;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tarpc::client::RpcError;
use tarpc::context;
use tarpc::server::{BaseChannel, Channel};

use crate::admin::{Admin, Contacts, LeaveReply, LeaveRequest, MemberInfo, MembersRequest};
use crate::cluster::{self, JoinError, JoinReply, JoinRequest, RemoveReply, RemoveRequest};
use crate::leader_watch::{BehindSignal, InboundConn, LeaderWatch, RivalSignal};
use crate::types::{Member, NodeId, TypeConfig};

/// A request that reached a node other than the one it was addressed to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("request for node {wanted} reached node {actual}")]
pub struct WrongNode {
    /// The addressee.
    pub wanted: NodeId,
    /// Who answered.
    pub actual: NodeId,
}

/// The node-to-node Raft service. Each method takes the addressee's id first.
#[tarpc::service]
pub trait RaftRpc {
    /// openraft AppendEntries (replication and heartbeats).
    async fn append(
        to: NodeId,
        req: AppendEntriesRequest<TypeConfig>,
    ) -> Result<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>, WrongNode>;
    /// openraft RequestVote.
    async fn vote(
        to: NodeId,
        req: VoteRequest<NodeId>,
    ) -> Result<Result<VoteResponse<NodeId>, RaftError<NodeId>>, WrongNode>;
    /// One chunk of a snapshot.
    async fn snapshot(
        to: NodeId,
        req: InstallSnapshotRequest<TypeConfig>,
    ) -> Result<
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
        WrongNode,
    >;
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

/// Serves `RaftRpc` for one node by calling into its `Raft`.
#[derive(Clone)]
pub struct RaftRpcServer {
    id: NodeId,
    cluster: Arc<str>,
    raft: Raft<TypeConfig>,
    watch: LeaderWatch,
    admin: Arc<Admin>,
    /// The connection this clone serves (each accepted connection gets its own).
    conn: InboundConn,
}

impl RaftRpcServer {
    /// A server for node `id` of `cluster`. `behind` is the signal of this node's
    /// [`Network`] ([`Network::behind_signal`]); `admin` answers the operator RPCs.
    pub fn new(
        id: NodeId,
        cluster: &str,
        raft: Raft<TypeConfig>,
        behind: BehindSignal,
        admin: Arc<Admin>,
    ) -> Self {
        RaftRpcServer {
            id,
            cluster: cluster.into(),
            watch: LeaderWatch::new(id, raft.clone(), behind),
            raft,
            admin,
            conn: InboundConn::default(),
        }
    }

    /// The task that answers `rivals`, raised by this node's [`Network`]
    /// ([`LeaderWatch::watch_rivals`]).
    pub fn watch_rivals(
        &self,
        rivals: RivalSignal,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.watch.clone().watch_rivals(rivals)
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
            Err(WrongNode {
                wanted: to,
                actual: self.id,
            })
        }
    }
}

impl RaftRpc for RaftRpcServer {
    async fn append(
        self,
        _: context::Context,
        to: NodeId,
        req: AppendEntriesRequest<TypeConfig>,
    ) -> Result<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>, WrongNode> {
        self.check(to)?;
        if req.vote.is_committed() {
            if let Some(leader) = req.vote.leader_id().voted_for() {
                self.conn.saw_leader(leader);
            }
        }
        Ok(self.raft.append_entries(req).await)
    }

    async fn vote(
        self,
        _: context::Context,
        to: NodeId,
        req: VoteRequest<NodeId>,
    ) -> Result<Result<VoteResponse<NodeId>, RaftError<NodeId>>, WrongNode> {
        self.check(to)?;
        let (their_log, their_term) = (req.last_log_id, req.vote.leader_id().get_term());
        let answer = self.raft.vote(req).await;
        if let Ok(response) = &answer {
            if !response.vote_granted && response.last_log_id > their_log {
                self.watch
                    .refused_a_less_complete_candidate(their_term)
                    .await;
            }
        }
        Ok(answer)
    }

    async fn snapshot(
        self,
        _: context::Context,
        to: NodeId,
        req: InstallSnapshotRequest<TypeConfig>,
    ) -> Result<
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
        WrongNode,
    > {
        self.check(to)?;
        Ok(self.raft.install_snapshot(req).await)
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

type RaftListener =
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
/// [`LeaderWatch`] checks whether the leader died.
pub fn serve(listener: RaftListener, server: RaftRpcServer) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let transport = match listener.accept().await {
                Ok((transport, _peer)) => transport,
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    tracing::warn!(error = %e, "raft rpc accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let server = server.for_connection();
            tokio::spawn(async move {
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
    /// AppendEntries and votes.
    Log,
    /// Snapshot chunks.
    Snapshot,
}

type Pool = Arc<Mutex<HashMap<(NodeId, Lane), RaftRpcClient>>>;

/// openraft's network factory: hands out per-peer handles sharing one connection pool.
#[derive(Clone, Default)]
pub struct Network {
    pool: Pool,
    behind: BehindSignal,
    rivals: RivalSignal,
    contacts: Contacts,
}

impl Network {
    /// Raised when a peer refuses this node's vote request with a more complete log (read by
    /// [`LeaderWatch`]: a candidate that is behind must not keep campaigning).
    pub fn behind_signal(&self) -> BehindSignal {
        self.behind.clone()
    }

    /// Raised when a peer refuses this node's vote request because it campaigns with a
    /// higher vote and a less complete log (answered by [`LeaderWatch::watch_rivals`]).
    pub fn rival_signal(&self) -> RivalSignal {
        self.rivals.clone()
    }

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
            behind: self.behind.clone(),
            rivals: self.rivals.clone(),
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
    behind: BehindSignal,
    rivals: RivalSignal,
    contacts: Contacts,
}

/// How long a connect may take before the peer counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Most body bytes one AppendEntries carries when it has more than one entry (2 MiB).
///
/// openraft 0.9 gives an AppendEntries one heartbeat interval to finish, and a follower that
/// fell behind is sent up to `max_payload_entries` entries of up to a 1 MiB batch each. A
/// request over this budget is answered locally with `PayloadTooLarge` naming how many entries
/// fit, and openraft resends that many at once; a single entry always goes (the proposer caps
/// one at 1 MiB of bodies). 2 MiB crosses loopback in about a millisecond and a 1 Gbit/s LAN in
/// about 17 ms.
pub const APPEND_BYTES_MAX: usize = 2 << 20;

/// How many leading entries of `entries` fit in `budget` body bytes: at least one, and all of
/// them when they fit.
fn entries_within(entries: &[crate::types::Entry], budget: usize) -> usize {
    let mut total = 0usize;
    for (i, entry) in entries.iter().enumerate() {
        total = total.saturating_add(entry_bytes(entry));
        if total > budget {
            return i.max(1);
        }
    }
    entries.len()
}

/// The bytes an entry puts on the wire, roughly: bodies plus names (exact enough for a budget).
fn entry_bytes(entry: &crate::types::Entry) -> usize {
    use chat_sm::Command;
    let send_bytes = |s: &chat_sm::SendCmd| s.body.len() + s.channel.len() + s.sender.len() + 48;
    match &entry.payload {
        openraft::EntryPayload::Normal(Command::SendBatch(sends)) => {
            sends.iter().map(send_bytes).sum()
        }
        openraft::EntryPayload::Normal(Command::Send(send)) => send_bytes(send),
        _ => 256,
    }
}

fn ctx_for(option: &RPCOption) -> context::Context {
    let mut ctx = context::current();
    ctx.deadline = Instant::now() + option.hard_ttl();
    ctx
}

impl PeerClient {
    async fn client<E: std::error::Error>(
        &self,
        lane: Lane,
    ) -> Result<RaftRpcClient, RPCError<NodeId, Member, E>> {
        if let Some(client) = self.pool.lock().get(&(self.target, lane)) {
            return Ok(client.clone());
        }
        let addr = resolve(&self.addr)
            .await
            .map_err(|e| Unreachable::new(&e))?;
        let transport = tokio::time::timeout(CONNECT_TIMEOUT, proto::connect(addr))
            .await
            .map_err(|e| Unreachable::new(&e))?
            .map_err(|e| Unreachable::new(&e))?;
        let client = RaftRpcClient::new(tarpc::client::Config::default(), transport).spawn();
        self.pool.lock().insert((self.target, lane), client.clone());
        Ok(client)
    }

    fn transport_error<E: std::error::Error>(
        &self,
        lane: Lane,
        e: RpcError,
    ) -> RPCError<NodeId, Member, E> {
        match e {
            RpcError::Shutdown | RpcError::Send(_) | RpcError::Channel(_) => {
                self.pool.lock().remove(&(self.target, lane));
                Unreachable::new(&e).into()
            }
            RpcError::DeadlineExceeded | RpcError::Server(_) => NetworkError::new(&e).into(),
        }
    }

    fn wrong_node<E: std::error::Error>(
        &self,
        lane: Lane,
        e: WrongNode,
    ) -> RPCError<NodeId, Member, E> {
        // The address now belongs to someone else: forget the connection and back off.
        self.pool.lock().remove(&(self.target, lane));
        Unreachable::new(&e).into()
    }
}

pub(crate) async fn resolve(addr: &str) -> std::io::Result<SocketAddr> {
    if let Ok(addr) = addr.parse() {
        return Ok(addr);
    }
    tokio::net::lookup_host(addr)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{addr} resolves to no address")))
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        let fit = entries_within(&rpc.entries, APPEND_BYTES_MAX);
        if fit < rpc.entries.len() {
            return Err(PayloadTooLarge::new_entries_hint(fit as u64).into());
        }
        let client = self.client(Lane::Log).await?;
        match client.append(ctx_for(&option), self.target, rpc).await {
            Ok(Ok(Ok(response))) => {
                self.contacts.heard(self.target);
                Ok(response)
            }
            Ok(Ok(Err(e))) => Err(RemoteError::new(self.target, e).into()),
            Ok(Err(wrong)) => Err(self.wrong_node(Lane::Log, wrong)),
            Err(e) => Err(self.transport_error(Lane::Log, e)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        let client = self.client(Lane::Log).await?;
        let (ours, our_vote) = (rpc.last_log_id, rpc.vote);
        let mut answer = client
            .vote(ctx_for(&option), self.target, rpc.clone())
            .await;
        if matches!(answer, Err(RpcError::Shutdown)) {
            // The pooled connection had died before the request left (the peer restarted
            // since): nothing was sent, so dial again and ask once more. openraft does not
            // resend a vote request, and a lost one can cost an election round.
            self.pool.lock().remove(&(self.target, Lane::Log));
            let client = self.client(Lane::Log).await?;
            answer = client.vote(ctx_for(&option), self.target, rpc).await;
        }
        match answer {
            Ok(Ok(Ok(response))) => {
                if !response.vote_granted && response.last_log_id > ours {
                    self.behind.raise();
                }
                let rival = response.vote.leader_id().voted_for() == Some(self.target)
                    && !response.vote.is_committed();
                if !response.vote_granted
                    && rival
                    && response.vote > our_vote
                    && response.last_log_id < ours
                {
                    self.rivals.raise(response.vote.leader_id().get_term());
                }
                Ok(response)
            }
            Ok(Ok(Err(e))) => Err(RemoteError::new(self.target, e).into()),
            Ok(Err(wrong)) => Err(self.wrong_node(Lane::Log, wrong)),
            Err(e) => Err(self.transport_error(Lane::Log, e)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let client = self.client(Lane::Snapshot).await?;
        match client.snapshot(ctx_for(&option), self.target, rpc).await {
            Ok(Ok(Ok(response))) => Ok(response),
            Ok(Ok(Err(e))) => Err(RemoteError::new(self.target, e).into()),
            Ok(Err(wrong)) => Err(self.wrong_node(Lane::Snapshot, wrong)),
            Err(e) => Err(self.transport_error(Lane::Snapshot, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_sm::{ClientId, Command, SendCmd};
    use openraft::{CommittedLeaderId, EntryPayload, LogId};

    fn batch_entry(index: u64, sends: usize, body: usize) -> crate::types::Entry {
        let send = |i: usize| SendCmd {
            channel: "general".into(),
            sender: "alice".into(),
            body: vec![b'x'; body],
            client_id: ClientId([1; 16]),
            client_seq: i as u64,
            at_ms: 0,
        };
        openraft::Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 0), index),
            payload: EntryPayload::Normal(Command::SendBatch((0..sends).map(send).collect())),
        }
    }

    #[test]
    fn small_requests_go_whole() {
        let entries: Vec<_> = (1..=32).map(|i| batch_entry(i, 100, 100)).collect();
        assert_eq!(entries_within(&entries, APPEND_BYTES_MAX), 32);
        assert_eq!(entries_within(&[], APPEND_BYTES_MAX), 0);
    }

    #[test]
    fn large_requests_are_cut_to_the_budget_but_never_to_nothing() {
        // 1 MiB-ish batches: two fit in 2 MiB only if their overhead does; expect 1.
        let entries: Vec<_> = (1..=32).map(|i| batch_entry(i, 1024, 1024)).collect();
        let fit = entries_within(&entries, APPEND_BYTES_MAX);
        assert!((1..32).contains(&fit), "{fit}");
        let bytes: usize = entries[..fit].iter().map(entry_bytes).sum();
        assert!(bytes <= APPEND_BYTES_MAX || fit == 1, "{bytes}");
        // One entry over the whole budget still goes alone.
        let huge = vec![batch_entry(1, 4096, 1024), batch_entry(2, 1, 1)];
        assert_eq!(entries_within(&huge, APPEND_BYTES_MAX), 1);
    }
}
