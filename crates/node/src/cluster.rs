//! Cluster membership plumbing: discovery announcements and the peers they record, the
//! leader's join and removal handlers. The formation and promotion rules are in `formation.rs`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use parking_lot::Mutex;
use proto::discovery::{DiscoverySocket, NodeAnnounce, NodeStatus, Packet, PingSocket};
use proto::Role;
use serde::{Deserialize, Serialize};

use crate::raft::Raft;
use crate::types::{Member, NodeId};

/// How long a peer's announcement counts as alive.
const PEER_TTL: Duration = Duration::from_secs(5);
/// Announcement period while forming, and once settled.
const ANNOUNCE_FAST: Duration = Duration::from_millis(200);
const ANNOUNCE_SLOW: Duration = Duration::from_secs(1);
/// How long after start announcements stay fast.
const FAST_PHASE: Duration = Duration::from_secs(10);

/// A request to be added to the cluster, sent to the leader over Raft RPC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The cluster the joiner belongs to.
    pub cluster: String,
    /// The joiner's id.
    pub id: NodeId,
    /// Its addresses.
    pub member: Member,
}

/// The leader's answer to a join.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinReply {
    /// Added as a learner.
    Added,
    /// Already a member with these addresses.
    AlreadyMember,
}

/// Why a join was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum JoinError {
    /// Ask this node instead.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The leader, if known.
        leader: Option<NodeId>,
    },
    /// The joiner names another cluster.
    #[error("wrong cluster {theirs:?}, this is {ours:?}")]
    WrongCluster {
        /// This cluster.
        ours: String,
        /// The joiner's.
        theirs: String,
    },
    /// Another node with the same id is a member at other addresses.
    #[error("node id {id} is already a member at {existing}; two nodes claim one id")]
    IdConflict {
        /// The id.
        id: NodeId,
        /// The member's raft address.
        existing: String,
    },
    /// Retry later (a membership change is in progress, or Raft is stopping).
    #[error("busy: {0}")]
    Busy(String),
    /// Another member already has the joiner's name.
    #[error("node name {name:?} is taken by member {id}; start the new node with another --name")]
    NameTaken {
        /// The name.
        name: String,
        /// The member that has it.
        id: NodeId,
    },
    /// The node is the cluster's only voter; leaving would leave no cluster.
    #[error("node {id} is the last voter of the cluster; it cannot leave (nothing was changed)")]
    LastVoter {
        /// The node.
        id: NodeId,
    },
    /// A backup could not be cut or read (see `backup.rs`).
    #[error("backup: {0}")]
    Backup(String),
}

/// Refuses a request that names another cluster: every join and admin request carries the
/// cluster name, and a node acts only on its own.
///
/// # Errors
/// [`JoinError::WrongCluster`].
pub(crate) fn check_cluster(ours: &str, theirs: &str) -> Result<(), JoinError> {
    if ours == theirs {
        return Ok(());
    }
    Err(JoinError::WrongCluster {
        ours: ours.to_owned(),
        theirs: theirs.to_owned(),
    })
}

/// When this node last received an AppendEntries from a committed leader. openraft names the
/// leader of the vote it saved even right after a restart, before that leader has sent
/// anything, and a node removed meanwhile never hears from it again: formation counts a
/// leader only while it is heard. Cheap to clone; clones share the record.
#[derive(Clone, Default)]
pub struct LeaderContact(Arc<Mutex<Option<Instant>>>);

impl LeaderContact {
    /// An AppendEntries of the leader arrived now.
    pub fn heard(&self) {
        *self.0.lock() = Some(Instant::now());
    }

    /// How long ago the leader was last heard; `None` if never since start.
    pub fn since(&self) -> Option<Duration> {
        self.0.lock().map(|at| at.elapsed())
    }
}

/// Nodes heard through discovery, by id.
#[derive(Clone, Default)]
pub struct Peers {
    inner: Arc<Mutex<HashMap<NodeId, (NodeAnnounce, Instant)>>>,
}

impl Peers {
    /// Records an announcement heard now.
    pub fn record(&self, announce: NodeAnnounce) {
        self.inner
            .lock()
            .insert(announce.node_id, (announce, Instant::now()));
    }

    /// Announcements heard within the last few seconds.
    pub fn alive(&self) -> Vec<NodeAnnounce> {
        let mut map = self.inner.lock();
        map.retain(|_, (_, seen)| seen.elapsed() < PEER_TTL);
        map.values().map(|(a, _)| a.clone()).collect()
    }

    /// The latest announcement of `id`, if alive.
    pub fn get(&self, id: NodeId) -> Option<NodeAnnounce> {
        self.alive().into_iter().find(|a| a.node_id == id)
    }
}

/// Maps openraft's server state to the wire role.
pub fn role_of(state: ServerState) -> Role {
    match state {
        ServerState::Leader => Role::Leader,
        ServerState::Follower => Role::Follower,
        ServerState::Candidate => Role::Candidate,
        ServerState::Learner => Role::Learner,
        ServerState::Shutdown => Role::Unknown,
    }
}

/// What this node announces about itself, from its current Raft metrics.
pub fn self_announce(
    raft: &Raft,
    cluster: &str,
    name: &str,
    addrs: &NodeAddrs,
    started_ms: u64,
) -> NodeAnnounce {
    let metrics = crate::raft::metrics_now(raft);
    let voter = metrics
        .membership_config
        .membership()
        .voter_ids()
        .any(|id| id == metrics.id);
    NodeAnnounce {
        cluster: cluster.to_owned(),
        node_id: metrics.id,
        client_addr: addrs.client,
        raft_addr: addrs.raft,
        metrics_addr: addrs.metrics,
        role: role_of(metrics.state),
        leader: metrics.current_leader,
        term: metrics.current_term,
        applied: metrics.last_applied.map_or(0, |l| l.index),
        voter,
        started_ms,
        name: name.to_owned(),
    }
}

/// A node's three listening addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeAddrs {
    /// Raft RPC.
    pub raft: SocketAddr,
    /// Chat RPC.
    pub client: SocketAddr,
    /// HTTP metrics.
    pub metrics: SocketAddr,
}

impl NodeAddrs {
    /// The membership record for a node of this name at these addresses.
    pub fn member(&self, name: &str) -> Member {
        Member {
            raft_addr: self.raft.to_string(),
            client_addr: self.client.to_string(),
            metrics_addr: self.metrics.to_string(),
            name: name.to_owned(),
        }
    }
}

/// Resolves a `host:port` from a membership record.
pub(crate) async fn resolve(addr: &str) -> std::io::Result<SocketAddr> {
    if let Ok(addr) = addr.parse() {
        return Ok(addr);
    }
    tokio::net::lookup_host(addr)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{addr} resolves to no address")))
}

/// Runs discovery for a node: answers probes and pings, records peers, and announces itself
/// periodically (by broadcast and to every join address). Runs until aborted.
pub async fn run_discovery(
    socket: DiscoverySocket,
    announce: impl Fn() -> NodeAnnounce + Send + Sync + 'static,
    peers: Peers,
    join: Vec<SocketAddr>,
) {
    let socket = Arc::new(socket);
    let announce = Arc::new(announce);
    let receiver = {
        let socket = socket.clone();
        let announce = announce.clone();
        tokio::spawn(async move { receive_loop(&socket, &*announce, &peers).await })
    };
    let started = Instant::now();
    loop {
        let packet = Packet::Announce(announce());
        if let Err(e) = socket.send_broadcast(&packet).await {
            tracing::debug!(error = %e, "discovery broadcast failed");
        }
        // Join addresses are beyond broadcast: tell them about us, and ask them about
        // themselves (their replies come back by unicast).
        let probe = Packet::Probe {
            cluster: socket.cluster().to_owned(),
            nonce: rand::random(),
            from_client: false,
        };
        for addr in &join {
            for packet in [&packet, &probe] {
                if let Err(e) = socket.send_to(packet, *addr).await {
                    tracing::debug!(error = %e, %addr, "discovery packet to join address failed");
                }
            }
        }
        let period = if started.elapsed() < FAST_PHASE {
            ANNOUNCE_FAST
        } else {
            ANNOUNCE_SLOW
        };
        tokio::time::sleep(period).await;
        if receiver.is_finished() {
            tracing::error!("discovery receiver stopped");
            return;
        }
    }
}

/// Answers clients' RTT pings on this node's own UDP socket (see `proto::discovery::PingSocket`)
/// with its id, role and applied index. Runs until aborted.
pub async fn serve_pings(
    socket: PingSocket,
    id: NodeId,
    raft: Raft,
    delivery: crate::delivery::Delivery,
) {
    socket
        .serve(move || NodeStatus {
            node_id: id,
            // A borrow, not a clone of the metrics: every client pings every node each second.
            role: crate::raft::with_server_metrics(&raft, |m| role_of(m.state)),
            applied: delivery.applied(),
        })
        .await;
}

async fn receive_loop(
    socket: &DiscoverySocket,
    announce: &(dyn Fn() -> NodeAnnounce + Send + Sync),
    peers: &Peers,
) {
    let me = announce().node_id;
    loop {
        let (packet, from) = match socket.recv().await {
            Ok(received) => received,
            Err(e) => {
                tracing::warn!(error = %e, "discovery receive failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match packet {
            Packet::Announce(a) if a.node_id != me => peers.record(a),
            Packet::Announce(_) => {}
            Packet::Probe { .. } => {
                let reply = Packet::Announce(announce());
                if let Err(e) = socket.send_to(&reply, from).await {
                    tracing::debug!(error = %e, %from, "probe reply failed");
                }
            }
            Packet::Ping { nonce, sent_ns } => {
                // The same answer as the node's own ping socket gives; clients ping that one,
                // since a ping to this shared port reaches a random node on the host.
                let a = announce();
                let status = NodeStatus {
                    node_id: a.node_id,
                    role: a.role,
                    applied: a.applied,
                };
                let reply = status.pong(socket.cluster(), nonce, sent_ns);
                if let Err(e) = socket.send_to(&reply, from).await {
                    tracing::debug!(error = %e, %from, "pong failed");
                }
            }
            Packet::Pong { .. } | Packet::PongStatus { .. } => {}
        }
    }
}

/// Members recorded before names (empty name) whose node reports itself (through discovery,
/// or the leader itself) at the recorded Raft address, with the name it reports, unless
/// another member has that name. The leader writes these back into the membership, so a
/// member that goes down later is still listed by name.
pub fn names_for_unnamed_members(
    nodes: &BTreeMap<NodeId, Member>,
    reported: impl IntoIterator<Item = (NodeId, Member)>,
) -> BTreeMap<NodeId, Member> {
    let taken: BTreeSet<&str> = nodes.values().map(|m| m.name.as_str()).collect();
    let mut named = BTreeMap::new();
    for (id, report) in reported {
        let Some(member) = nodes.get(&id) else {
            continue;
        };
        let usable = crate::name::validate_name(&report.name).is_ok()
            && !taken.contains(report.name.as_str())
            && !named.values().any(|m: &Member| m.name == report.name);
        if member.name.is_empty() && member.raft_addr == report.raft_addr && usable {
            let member = Member {
                name: report.name,
                ..member.clone()
            };
            named.insert(id, member);
        }
    }
    named
}

/// The leader's side of a join: checks the request and adds the node as a learner.
///
/// # Errors
/// [`JoinError`] saying why, and whether to retry elsewhere.
pub async fn handle_join(
    raft: &Raft,
    cluster: &str,
    request: JoinRequest,
) -> Result<JoinReply, JoinError> {
    check_cluster(cluster, &request.cluster)?;
    let metrics = crate::raft::metrics_now(raft);
    if metrics.state != ServerState::Leader {
        return Err(JoinError::NotLeader {
            leader: metrics.current_leader,
        });
    }
    let membership = metrics.membership_config.membership();
    if let Some(existing) = membership.get_node(&request.id) {
        if existing.raft_addr == request.member.raft_addr {
            return Ok(JoinReply::AlreadyMember);
        }
        return Err(JoinError::IdConflict {
            id: request.id,
            existing: existing.raft_addr.clone(),
        });
    }
    // Names are what operators type (`remove-node NAME`), so two members never share one.
    // Members from before names have an empty name and conflict with nobody.
    let name = &request.member.name;
    if let Some((id, _)) = membership
        .nodes()
        .find(|(_, m)| !name.is_empty() && &m.name == name)
    {
        return Err(JoinError::NameTaken {
            name: name.clone(),
            id: *id,
        });
    }
    match raft.add_learner(request.id, request.member, false).await {
        Ok(_) => Ok(JoinReply::Added),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            Err(JoinError::NotLeader {
                leader: f.leader_id,
            })
        }
        Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
            ChangeMembershipError::InProgress(_),
        ))) => Err(JoinError::Busy("membership change in progress".into())),
        Err(e) => Err(JoinError::Busy(e.to_string())),
    }
}

/// A request to take a node out of the cluster membership (`server remove-node`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveRequest {
    /// The cluster the caller means.
    pub cluster: String,
    /// The node to remove.
    pub id: NodeId,
}

/// The leader's answer to a removal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemoveReply {
    /// The node is no longer a voter or learner. A live node keeps running with its data
    /// (`server leave` is the way to stop one for good); a dead one, restarted, asks to join
    /// again through discovery and comes back as a learner, then a voter.
    Removed,
    /// The node was not a member.
    NotMember,
}

/// The leader's side of a removal: a voter is removed with a joint change, a learner directly.
/// The leader refuses to remove itself (ask after a leader change).
///
/// # Errors
/// [`JoinError`] (the join and removal refusals are the same) saying why.
pub async fn handle_remove(
    raft: &Raft,
    cluster: &str,
    request: RemoveRequest,
) -> Result<RemoveReply, JoinError> {
    check_cluster(cluster, &request.cluster)?;
    let metrics = crate::raft::metrics_now(raft);
    if metrics.state != ServerState::Leader {
        return Err(JoinError::NotLeader {
            leader: metrics.current_leader,
        });
    }
    if request.id == metrics.id {
        return Err(JoinError::Busy("the leader does not remove itself".into()));
    }
    let membership = metrics.membership_config.membership();
    let ids = BTreeSet::from([request.id]);
    let change = if membership.voter_ids().any(|v| v == request.id) {
        ChangeMembers::RemoveVoters(ids)
    } else if membership.get_node(&request.id).is_some() {
        ChangeMembers::RemoveNodes(ids)
    } else {
        return Ok(RemoveReply::NotMember);
    };
    // `retain = false`: a removed voter leaves the node list too, so it is not kept as a
    // learner that the promotion loop would make a voter again at once.
    match raft.change_membership(change, false).await {
        Ok(_) => {
            tracing::info!(node = request.id, "removed from the cluster");
            Ok(RemoveReply::Removed)
        }
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            Err(JoinError::NotLeader {
                leader: f.leader_id,
            })
        }
        Err(e) => Err(JoinError::Busy(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(port: u16, name: &str) -> Member {
        NodeAddrs {
            raft: SocketAddr::from(([127, 0, 0, 1], port)),
            client: SocketAddr::from(([127, 0, 0, 1], port + 1)),
            metrics: SocketAddr::from(([127, 0, 0, 1], port + 2)),
        }
        .member(name)
    }

    fn heard(id: NodeId, port: u16, name: &str) -> NodeAnnounce {
        let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        NodeAnnounce {
            cluster: "c".into(),
            node_id: id,
            client_addr: addr(port + 1),
            raft_addr: addr(port),
            metrics_addr: addr(port + 2),
            role: Role::Follower,
            leader: None,
            term: 1,
            applied: 0,
            voter: true,
            started_ms: 0,
            name: name.into(),
        }
    }

    fn reports(heard: &[NodeAnnounce]) -> Vec<(NodeId, Member)> {
        heard
            .iter()
            .map(|a| (a.node_id, crate::formation::announced_member(a)))
            .collect()
    }

    #[test]
    fn unnamed_members_get_the_name_their_node_announces() {
        let nodes = BTreeMap::from([(1, member(100, "")), (2, member(200, "n2"))]);
        let named =
            names_for_unnamed_members(&nodes, reports(&[heard(1, 100, "n1"), heard(2, 200, "x")]));
        assert_eq!(named, BTreeMap::from([(1, member(100, "n1"))]));
    }

    #[test]
    fn names_are_not_filled_from_another_address_a_taken_name_or_an_invalid_one() {
        let nodes = BTreeMap::from([
            (1, member(100, "")),
            (2, member(200, "n2")),
            (3, member(300, "")),
            (4, member(400, "")),
            (5, member(500, "")),
        ]);
        let heard = [
            // At another address: maybe another process claiming the id.
            heard(1, 111, "n1"),
            // Taken by member 2.
            heard(3, 300, "n2"),
            heard(4, 400, "Not Valid"),
            // Absent from the membership.
            heard(9, 900, "n9"),
            heard(5, 500, "n5"),
        ];
        let named = names_for_unnamed_members(&nodes, reports(&heard));
        assert_eq!(named, BTreeMap::from([(5, member(500, "n5"))]));
    }
}
