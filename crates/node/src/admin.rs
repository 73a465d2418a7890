//! Operator commands over the Raft RPC admin path: the leader's membership listing
//! (`server members`) and a node leaving the cluster for good (`server leave`).
//!
//! # Member states
//! The leader describes every voter and learner of its membership, down ones included, by
//! [`describe_members`]: a member with no AppendEntries acknowledgement (heartbeats included)
//! within [`CONTACT_TTL`] is `unreachable`; one whose matched index is more than
//! [`LAG_SHOWN_MIN`] entries behind the leader's last index is `lagging`; else `up`.
//!
//! # Leaving
//! `leave` is handled by the node that leaves, because only it can write the `LEFT` marker
//! into its own data dir. It refuses when it is the last voter, stops campaigning, writes the
//! marker, and has itself removed: by the leader over `remove` when it follows, or by its own
//! membership change when it leads (a leader whose removal commits steps down, and the
//! remaining voters elect a new one). Then it stops. On restart the marker keeps it out until
//! `--rejoin`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::cluster::{check_cluster, JoinError, Peers, RemoveReply, RemoveRequest};
use crate::data_dir::DataDir;
use crate::raft::Raft;
use crate::types::{Member, NodeId};

/// A member that acknowledged no AppendEntries for this long is shown as unreachable. Several
/// heartbeat periods and election timeouts, so a busy but live member is not flagged.
pub const CONTACT_TTL: Duration = Duration::from_secs(3);
/// A member this many entries or fewer behind the leader is replicating normally (entries in
/// flight under load); more is shown as lagging.
pub const LAG_SHOWN_MIN: u64 = 10;
/// How long a leave may take in all: finding the leader, a joint membership change, retries.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(20);

/// When the leader last heard an AppendEntries answer from each peer; kept by its `Network`.
#[derive(Clone, Default)]
pub struct Contacts {
    inner: Arc<Mutex<HashMap<NodeId, Instant>>>,
}

impl Contacts {
    /// Records an answer from `id` now.
    pub fn heard(&self, id: NodeId) {
        self.inner.lock().insert(id, Instant::now());
    }

    /// How long ago `id` last answered, if ever.
    pub fn since(&self, id: NodeId) -> Option<Duration> {
        self.inner.lock().get(&id).map(Instant::elapsed)
    }
}

/// Asks the leader for its membership (`server members`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembersRequest {
    /// The cluster the caller means.
    pub cluster: String,
}

/// What the leader knows about one member's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberState {
    /// The member is the leader answering.
    Leader,
    /// Answering and caught up (within [`LAG_SHOWN_MIN`] entries).
    Up,
    /// Answering, but `entries` behind the leader's last entry.
    Lagging {
        /// Entries behind.
        entries: u64,
    },
    /// No AppendEntries answer within [`CONTACT_TTL`].
    Unreachable,
}

impl std::fmt::Display for MemberState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MemberState::Leader => f.write_str("leader"),
            MemberState::Up => f.write_str("up"),
            MemberState::Lagging { entries } => write!(f, "lagging by {entries} entries"),
            MemberState::Unreachable => f.write_str("unreachable"),
        }
    }
}

/// One voter or learner of the leader's membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// Node id.
    pub id: NodeId,
    /// Its name: from the membership, else from discovery, else empty (a member added
    /// before names whose node is not heard).
    pub name: String,
    /// Its addresses as the membership records them.
    pub member: Member,
    /// Voter (true) or learner.
    pub voter: bool,
    /// Its state as the leader sees it.
    pub state: MemberState,
    /// Its matched log index as the leader knows it (the leader's own last index for the
    /// leader), if any.
    pub matched_index: Option<u64>,
}

/// Everything [`describe_members`] decides from, gathered on the leader: its id and last log
/// index, the voters (all halves of a joint config), every member, each peer's matched index
/// (openraft's replication metrics) and time since its last AppendEntries answer, and names
/// heard by discovery for members recorded before names.
#[derive(Debug, Clone, Default)]
pub struct MembershipView {
    pub leader: NodeId,
    pub last_index: u64,
    pub voters: BTreeSet<NodeId>,
    pub nodes: BTreeMap<NodeId, Member>,
    pub matched: BTreeMap<NodeId, Option<u64>>,
    pub contact_age: BTreeMap<NodeId, Duration>,
    pub heard_names: BTreeMap<NodeId, String>,
}

/// The leader's listing of its members, in id order. A pure function of the view, so its rule
/// is tested with tables.
pub fn describe_members(view: &MembershipView) -> Vec<MemberInfo> {
    let describe = |(&id, member): (&NodeId, &Member)| {
        let matched = view.matched.get(&id).copied().flatten();
        let behind = view.last_index.saturating_sub(matched.unwrap_or(0));
        let (state, matched_index) = if id == view.leader {
            (MemberState::Leader, Some(view.last_index))
        } else if view
            .contact_age
            .get(&id)
            .is_none_or(|age| *age > CONTACT_TTL)
        {
            (MemberState::Unreachable, matched)
        } else if behind > LAG_SHOWN_MIN {
            (MemberState::Lagging { entries: behind }, matched)
        } else {
            (MemberState::Up, matched)
        };
        let name = match member.name.as_str() {
            "" => view.heard_names.get(&id).cloned().unwrap_or_default(),
            name => name.to_owned(),
        };
        MemberInfo {
            id,
            name,
            member: member.clone(),
            voter: view.voters.contains(&id),
            state,
            matched_index,
        }
    };
    view.nodes.iter().map(describe).collect()
}

/// Asks the node that receives it to leave the cluster for good (`server leave`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaveRequest {
    /// The cluster the caller means.
    pub cluster: String,
}

/// The leaving node's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaveReply {
    /// Removed from the membership and marked as left; the node is stopping.
    Left {
        /// Whether it led when asked (leadership then moved by its own removal).
        was_leader: bool,
    },
    /// It was not a member any more; marked as left and stopping.
    NotMember,
}

/// What the admin RPCs need from the running node.
pub struct Admin {
    pub id: NodeId,
    /// This node's name (discovery does not report a node to itself).
    pub name: String,
    pub cluster: String,
    pub raft: Raft,
    /// Peers heard by discovery (names of members recorded before names).
    pub peers: Peers,
    /// AppendEntries answers heard by this node's network.
    pub contacts: Contacts,
    /// For the `LEFT` marker.
    pub data_dir: Arc<DataDir>,
    /// Set once a leave starts: the formation loop must not ask to join again.
    pub leaving: Arc<AtomicBool>,
    /// Signalled once this node has left; the process then stops.
    pub left: Arc<tokio::sync::Notify>,
    /// How a removal request reaches the leader (`raft_rpc::request_remove` on a server).
    pub remove: RemoveFn,
}

/// Sends a removal request to the leader at an address; the error is a sentence.
pub type RemoveFn = Arc<
    dyn Fn(
            std::net::SocketAddr,
            NodeId,
            RemoveRequest,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<RemoveReply, String>> + Send>,
        > + Send
        + Sync,
>;

impl Admin {
    /// The leader's side of `members`.
    ///
    /// # Errors
    /// [`JoinError::WrongCluster`]; [`JoinError::NotLeader`] with the leader this node knows.
    pub fn handle_members(&self, request: &MembersRequest) -> Result<Vec<MemberInfo>, JoinError> {
        check_cluster(&self.cluster, &request.cluster)?;
        let metrics = crate::raft::metrics_now(&self.raft);
        if metrics.state != ServerState::Leader {
            let leader = metrics.current_leader;
            return Err(JoinError::NotLeader { leader });
        }
        let membership = metrics.membership_config.membership();
        let nodes: BTreeMap<NodeId, Member> =
            membership.nodes().map(|(id, m)| (*id, m.clone())).collect();
        let replication = metrics.replication.iter().flatten();
        let heard = self.peers.alive().into_iter().map(|a| (a.node_id, a.name));
        let view = MembershipView {
            leader: self.id,
            last_index: metrics.last_log_index.unwrap_or(0),
            voters: membership.voter_ids().collect(),
            matched: replication
                .map(|(id, log_id)| (*id, log_id.map(|l| l.index)))
                .collect(),
            contact_age: (nodes.keys())
                .filter_map(|id| Some((*id, self.contacts.since(*id)?)))
                .collect(),
            heard_names: heard.chain([(self.id, self.name.clone())]).collect(),
            nodes,
        };
        Ok(describe_members(&view))
    }

    /// The leaving node's side of `leave`: see the module doc for the steps.
    ///
    /// # Errors
    /// [`JoinError::WrongCluster`]; [`JoinError::LastVoter`] (nothing changed); or the reason
    /// the removal failed, after which the marker is removed again and the node stays.
    pub async fn handle_leave(&self, request: &LeaveRequest) -> Result<LeaveReply, JoinError> {
        check_cluster(&self.cluster, &request.cluster)?;
        let metrics = crate::raft::metrics_now(&self.raft);
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        if voters.len() == 1 && voters.contains(&self.id) {
            return Err(JoinError::LastVoter { id: self.id });
        }
        let member = membership.get_node(&self.id).is_some();
        let was_leader = metrics.state == ServerState::Leader;
        if self.leaving.swap(true, Ordering::SeqCst) {
            return Err(JoinError::Busy("a leave is already in progress".into()));
        }
        let failed = |reason: String| {
            self.leaving.store(false, Ordering::SeqCst);
            JoinError::Busy(format!("leave failed, nothing changed: {reason}"))
        };
        self.data_dir
            .mark_left(&self.cluster)
            .map_err(|e| failed(e.to_string()))?;
        if member {
            // A removed node that campaigns would bump the term of the members that remain;
            // it stops campaigning before it is removed.
            self.raft.runtime_config().elect(false);
            if let Err(e) = self.remove_self().await {
                self.raft.runtime_config().elect(true);
                if let Err(clear) = self.data_dir.clear_left() {
                    tracing::error!(error = %clear, "leave failed and the LEFT marker stays");
                }
                return Err(failed(e));
            }
        }
        tracing::info!(node = self.id, was_leader, "left the cluster; stopping");
        self.left.notify_one();
        Ok(if member {
            LeaveReply::Left { was_leader }
        } else {
            LeaveReply::NotMember
        })
    }

    /// Has this node removed from the membership, by the leader or (when it leads) by itself,
    /// following NotLeader hints until [`LEAVE_TIMEOUT`].
    async fn remove_self(&self) -> Result<(), String> {
        let deadline = Instant::now() + LEAVE_TIMEOUT;
        let mut last = String::from("no leader known");
        while Instant::now() < deadline {
            let metrics = crate::raft::metrics_now(&self.raft);
            let membership = metrics.membership_config.membership();
            let leader = metrics.current_leader;
            let node = leader.and_then(|id| membership.get_node(&id));
            let outcome = match (leader, node.and_then(|m| m.raft_addr.parse().ok())) {
                (Some(id), _) if id == self.id => {
                    let voter = membership.voter_ids().any(|v| v == self.id);
                    self.remove_self_as_leader(voter).await
                }
                (Some(id), Some(addr)) => {
                    let (cluster, me) = (self.cluster.clone(), self.id);
                    let request = RemoveRequest { cluster, id: me };
                    match (self.remove)(addr, id, request).await {
                        Ok(RemoveReply::Removed | RemoveReply::NotMember) => Ok(()),
                        Err(e) => Err(e),
                    }
                }
                _ => Err(last.clone()),
            };
            match outcome {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::info!(error = %e, "leave: removal not done yet; will retry");
                    last = e;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(last)
    }

    async fn remove_self_as_leader(&self, voter: bool) -> Result<(), String> {
        let ids = BTreeSet::from([self.id]);
        let change = if voter {
            ChangeMembers::RemoveVoters(ids)
        } else {
            ChangeMembers::RemoveNodes(ids)
        };
        // `retain = false`: the node leaves the node list too, so nobody replicates to it or
        // promotes it again. openraft makes this leader step down once the change commits.
        match self.raft.change_membership(change, false).await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(format!("leadership moved to {:?}", f.leader_id))
            }
            Err(e) => Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str) -> Member {
        Member {
            raft_addr: "127.0.0.1:1".into(),
            client_addr: "127.0.0.1:2".into(),
            metrics_addr: "127.0.0.1:3".into(),
            name: name.into(),
        }
    }

    /// Leader 1 at index 100; voters 1, 2, 3; learner 4.
    fn view() -> MembershipView {
        MembershipView {
            leader: 1,
            last_index: 100,
            voters: BTreeSet::from([1, 2, 3]),
            nodes: BTreeMap::from([
                (1, member("n1")),
                (2, member("n2")),
                (3, member("")),
                (4, member("n4")),
            ]),
            matched: BTreeMap::from([(2, Some(100)), (3, Some(95)), (4, Some(40))]),
            contact_age: BTreeMap::from([
                (2, Duration::from_millis(30)),
                (3, Duration::from_millis(30)),
                (4, Duration::from_millis(30)),
            ]),
            heard_names: BTreeMap::from([(3, "n3".to_owned())]),
        }
    }

    fn states(view: &MembershipView) -> Vec<(NodeId, String, bool, MemberState)> {
        describe_members(view)
            .into_iter()
            .map(|m| (m.id, m.name, m.voter, m.state))
            .collect()
    }

    #[test]
    fn every_member_is_listed_with_its_state() {
        assert_eq!(
            states(&view()),
            vec![
                (1, "n1".into(), true, MemberState::Leader),
                (2, "n2".into(), true, MemberState::Up),
                // Five behind is within the normal in-flight window; the name came from
                // discovery because the membership predates names.
                (3, "n3".into(), true, MemberState::Up),
                (4, "n4".into(), false, MemberState::Lagging { entries: 60 }),
            ]
        );
    }

    #[test]
    fn a_member_not_heard_within_the_ttl_or_never_is_unreachable() {
        let mut view = view();
        view.contact_age
            .insert(2, CONTACT_TTL + Duration::from_millis(1));
        view.contact_age.remove(&4);
        view.heard_names.clear();
        let got = states(&view);
        assert_eq!(got[1], (2, "n2".into(), true, MemberState::Unreachable));
        // Down and recorded before names: listed all the same, with no name.
        assert_eq!(got[2], (3, String::new(), true, MemberState::Up));
        assert_eq!(got[3], (4, "n4".into(), false, MemberState::Unreachable));
    }

    #[test]
    fn a_member_with_no_matched_index_counts_as_all_behind() {
        let mut view = view();
        view.matched.insert(4, None);
        assert_eq!(states(&view)[3].3, MemberState::Lagging { entries: 100 });
        assert_eq!(
            MemberState::Lagging { entries: 100 }.to_string(),
            "lagging by 100 entries"
        );
    }
}
