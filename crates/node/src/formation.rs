//! Zero-configuration formation and promotion: the bootstrap-or-join rule ([`step`]) and the
//! leader's promotion rule ([`promotion`]) as pure decisions, driven by [`Formation::run`].
//!
//! # The formation rule
//! A fresh node (no Raft state) listens for `formation_window_ms`, announcing itself. Then,
//! every tick:
//! 1. if some node announces itself leader, the fresh node asks that leader to add it (as a
//!    learner; the leader promotes learners to voters while voters < `max_voters`);
//! 2. else, if any node announces a term > 0 or a vote (a cluster exists but is electing), it
//!    waits;
//! 3. else, among the fresh nodes it has heard (itself included), the one with the lowest id
//!    bootstraps a one-voter cluster and the others wait for it to announce leadership. With
//!    `--bootstrap-expect N` the lowest id waits until it has heard N fresh nodes and
//!    bootstraps them all as voters at once.
//!
//! Every node hears every announcement several times within the window, so ten nodes started
//! in the same second agree on the lowest id and form exactly one cluster. A node that restarts
//! has Raft state and never bootstraps; if it finds no leader in its own view while discovery
//! shows one, it asks to join again (the leader answers at once when it is already a member).
//!
//! The driver takes the join call as a function, so the simulated cluster in testkit runs the
//! same task over its in-memory network.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::{ChangeMembers, ServerState};
use proto::discovery::NodeAnnounce;
use proto::Role;
use tokio::time::Instant;

use crate::cluster::{
    names_for_unnamed_members, JoinReply, JoinRequest, LeaderContact, NodeAddrs, Peers,
};
use crate::raft::{metrics_now, Metrics, Raft};
use crate::types::{LogId, Member, Membership, NodeId};

/// How often formation and promotion look at the cluster.
const TICK: Duration = Duration::from_millis(250);
/// Most entries a learner may lag behind the leader and still be promoted.
const PROMOTE_LAG_MAX: u64 = 1000;
/// How long after a join request another is sent.
const JOIN_EVERY: Duration = Duration::from_secs(1);

/// What the formation rule sees of this node and its peers.
#[derive(Debug, Clone)]
pub struct View<'a> {
    /// This node's id and membership record.
    pub id: NodeId,
    /// This node's membership record.
    pub member: &'a Member,
    /// This node has a membership with voters (it bootstrapped or joined before).
    pub initialized: bool,
    /// The formation window since start is still open.
    pub in_window: bool,
    /// How long this node has known no leader.
    pub leaderless_for: Duration,
    /// openraft's leader lease (a restarted member waits this twice before asking to rejoin).
    pub election_timeout_max: Duration,
    /// A join request went out within [`JOIN_EVERY`].
    pub joined_recently: bool,
    /// Announcements heard recently.
    pub peers: &'a [NodeAnnounce],
    /// `--bootstrap-expect`.
    pub bootstrap_expect: Option<usize>,
    /// This node enrolled with a member at this start: a cluster exists, so it never founds
    /// one alone, however long it hears no leader.
    pub enrolled: bool,
}

/// What the formation rule says to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing this tick.
    Wait,
    /// Ask this leader to add this node.
    Join(NodeAnnounce),
    /// Bootstrap a cluster with these voters.
    Bootstrap(BTreeMap<NodeId, Member>),
    /// This node would bootstrap but has heard fewer fresh nodes than `--bootstrap-expect`.
    AwaitMore {
        /// Fresh nodes heard, this one included.
        heard: usize,
        /// How many it waits for.
        expect: usize,
    },
}

/// The formation rule, for a node that knows no leader.
pub fn step(view: &View<'_>) -> Step {
    if view.in_window {
        return Step::Wait;
    }
    if let Some(leader) = view.peers.iter().find(|p| p.role == Role::Leader) {
        let waited = view.leaderless_for > view.election_timeout_max * 2;
        if (!view.initialized || waited) && !view.joined_recently {
            return Step::Join(leader.clone());
        }
        return Step::Wait;
    }
    if view.initialized || view.peers.iter().any(|p| p.term > 0 || p.voter) {
        return Step::Wait;
    }
    let mut fresh: BTreeMap<NodeId, Member> = view
        .peers
        .iter()
        .filter(|p| p.term == 0 && !p.voter && p.leader.is_none())
        .map(|p| (p.node_id, announced_member(p)))
        .collect();
    fresh.insert(view.id, view.member.clone());
    if fresh.keys().next() != Some(&view.id) {
        return Step::Wait;
    }
    if view.enrolled && view.bootstrap_expect.is_none() {
        return Step::Wait;
    }
    match view.bootstrap_expect {
        None => Step::Bootstrap(BTreeMap::from([(view.id, view.member.clone())])),
        Some(n) if fresh.len() >= n => Step::Bootstrap(fresh.into_iter().take(n).collect()),
        Some(n) => Step::AwaitMore {
            heard: fresh.len(),
            expect: n,
        },
    }
}

/// The membership record a node's announcement describes.
pub fn announced_member(announce: &NodeAnnounce) -> Member {
    NodeAddrs {
        raft: announce.raft_addr,
        client: announce.client_addr,
        metrics: announce.metrics_addr,
    }
    .member(&announce.name)
}

/// What the promotion rule sees of a leader's cluster.
#[derive(Debug, Clone)]
pub struct LeaderView<'a> {
    /// The current membership.
    pub membership: &'a Membership,
    /// The leader's last log index.
    pub last_index: u64,
    /// How far each follower's log matches the leader's.
    pub matched: &'a BTreeMap<NodeId, Option<LogId>>,
    /// Nodes discovery heard recently.
    pub alive: &'a BTreeSet<NodeId>,
    /// Name reports: every peer's announcement and the leader's own record.
    pub reported: Vec<(NodeId, Member)>,
    /// `--max-voters`.
    pub max_voters: usize,
}

/// One membership change the leader makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Promotion {
    /// Move a joint config left behind to its final half. A promotion commits a joint config
    /// and then the final one; when the second step is refused (a concurrent join changed the
    /// membership first) the joint config would stay and block every later promotion.
    FinishJoint,
    /// Fill in the names of members added before nodes had names.
    RecordNames(BTreeMap<NodeId, Member>),
    /// Make this learner a voter.
    AddVoter(NodeId),
}

/// The promotion rule: at most one change per tick.
pub fn promotion(view: &LeaderView<'_>) -> Option<Promotion> {
    let membership = view.membership;
    if membership.get_joint_config().len() > 1 {
        return Some(Promotion::FinishJoint);
    }
    let nodes: BTreeMap<NodeId, Member> =
        membership.nodes().map(|(id, m)| (*id, m.clone())).collect();
    let named = names_for_unnamed_members(&nodes, view.reported.iter().cloned());
    if !named.is_empty() {
        return Some(Promotion::RecordNames(named));
    }
    if membership.voter_ids().count() >= view.max_voters {
        return None;
    }
    // A learner qualifies when it is close behind and known to be alive: discovery heard it,
    // or it has acknowledged the leader's last entry.
    membership
        .learner_ids()
        .find(|id| {
            let matched = view
                .matched
                .get(id)
                .copied()
                .flatten()
                .map_or(0, |l| l.index);
            let close = view.last_index.saturating_sub(matched) <= PROMOTE_LAG_MAX;
            close && (matched == view.last_index || view.alive.contains(id))
        })
        .map(Promotion::AddVoter)
}

/// Sends a join request to the leader an announcement names; the error is a sentence.
pub type JoinFn = Arc<
    dyn Fn(
            NodeAnnounce,
            JoinRequest,
        ) -> Pin<Box<dyn Future<Output = Result<JoinReply, String>> + Send>>
        + Send
        + Sync,
>;

/// The formation and promotion task of one node.
pub struct Formation {
    /// This node's Raft.
    pub raft: Raft,
    /// The cluster name.
    pub cluster: String,
    /// This node's membership record.
    pub member: Member,
    /// Nodes heard through discovery.
    pub peers: Peers,
    /// The formation window.
    pub window: Duration,
    /// `--bootstrap-expect`.
    pub bootstrap_expect: Option<usize>,
    /// This node enrolled with a member at this start (see [`View::enrolled`]).
    pub enrolled: bool,
    /// `--max-voters`.
    pub max_voters: usize,
    /// openraft's leader lease.
    pub election_timeout_max: Duration,
    /// Set while `server leave` runs: formation stands still.
    pub leaving: Arc<AtomicBool>,
    /// Started with `--rejoin`: stays silent until a leader has added it again.
    pub rejoining: bool,
    /// How join requests travel.
    pub join: JoinFn,
    /// When the leader's AppendEntries last arrived.
    pub contact: LeaderContact,
}

impl Formation {
    /// Runs formation (while this node has no leader) and promotion (while it leads), until
    /// Raft shuts down.
    pub async fn run(self) {
        let started = Instant::now();
        let mut leaderless_since = Some(Instant::now());
        let mut last_join: Option<Instant> = None;
        let mut rejoining = self.rejoining;
        // The membership this node started with: a rejoining node waits for a newer one, the
        // one a leader writes when it adds the node again.
        let start_membership = *metrics_now(&self.raft).membership_config.log_id();
        if rejoining {
            // A node that left may still hold a membership naming it a voter. Campaigning on it
            // would raise the term of the members that remain and depose their leader, so it
            // waits, silent, until a leader has added it again and replicates to it.
            self.raft.runtime_config().elect(false);
        }
        loop {
            tokio::time::sleep(TICK).await;
            let metrics = metrics_now(&self.raft);
            if metrics.state == ServerState::Shutdown {
                return;
            }
            if self.leaving.load(Ordering::SeqCst) {
                continue;
            }
            // openraft restores the leader of its saved vote at start, so a node removed while
            // it was down "knows" a leader that no longer replicates to it: only a member has
            // one.
            let member = metrics
                .membership_config
                .membership()
                .get_node(&metrics.id)
                .is_some();
            // A rejoining node asks to join until a membership newer than the one it started
            // with arrives: the one it remembers may still name it, although it was removed.
            let awaiting_readd =
                rejoining && *metrics.membership_config.log_id() == start_membership;
            let heard = metrics.state == ServerState::Leader
                || self
                    .contact
                    .since()
                    .is_some_and(|ago| ago < self.election_timeout_max * 2);
            if metrics.current_leader.is_some() && member && heard && !awaiting_readd {
                if rejoining {
                    self.raft.runtime_config().elect(true);
                    rejoining = false;
                    tracing::info!("rejoined the cluster");
                }
                leaderless_since = None;
                if metrics.state == ServerState::Leader {
                    self.promote(&metrics).await;
                }
                continue;
            }
            let since = *leaderless_since.get_or_insert_with(Instant::now);
            let peers = self.peers.alive();
            let view = View {
                id: metrics.id,
                member: &self.member,
                initialized: metrics
                    .membership_config
                    .membership()
                    .voter_ids()
                    .next()
                    .is_some(),
                in_window: started.elapsed() < self.window,
                leaderless_for: since.elapsed(),
                election_timeout_max: self.election_timeout_max,
                joined_recently: last_join.is_some_and(|t| t.elapsed() < JOIN_EVERY),
                peers: &peers,
                bootstrap_expect: self.bootstrap_expect,
                enrolled: self.enrolled,
            };
            match step(&view) {
                Step::Wait => {}
                Step::Join(leader) => {
                    last_join = Some(Instant::now());
                    let reply = self.join_via(leader, metrics.id).await;
                    if rejoining && reply == Some(JoinReply::AlreadyMember) {
                        // The leader never removed it: no new membership will come.
                        self.raft.runtime_config().elect(true);
                        rejoining = false;
                        tracing::info!("rejoined the cluster (still a member)");
                    }
                }
                Step::Bootstrap(voters) => {
                    let ids: Vec<NodeId> = voters.keys().copied().collect();
                    match self.raft.initialize(voters).await {
                        Ok(()) => tracing::info!(voters = ?ids, "bootstrapped a new cluster"),
                        Err(e) => tracing::warn!(error = %e, "bootstrap refused"),
                    }
                }
                Step::AwaitMore { heard, expect } => {
                    tracing::info!(heard, expect, "waiting for more nodes before bootstrap");
                }
            }
        }
    }

    async fn join_via(&self, leader: NodeAnnounce, id: NodeId) -> Option<JoinReply> {
        let leader_id = leader.node_id;
        let request = JoinRequest {
            cluster: self.cluster.clone(),
            id,
            member: self.member.clone(),
        };
        match (self.join)(leader, request).await {
            Ok(reply) => {
                tracing::info!(leader = leader_id, ?reply, "joined cluster");
                Some(reply)
            }
            Err(e) => {
                tracing::warn!(leader = leader_id, error = %e, "join failed; will retry");
                None
            }
        }
    }

    async fn promote(&self, metrics: &Metrics) {
        let alive: Vec<NodeAnnounce> = self.peers.alive();
        let alive_ids: BTreeSet<NodeId> = alive.iter().map(|a| a.node_id).collect();
        let matched = metrics.replication.clone().unwrap_or_default();
        let view = LeaderView {
            membership: metrics.membership_config.membership(),
            last_index: metrics.last_log_index.unwrap_or(0),
            matched: &matched,
            alive: &alive_ids,
            // Discovery never records this node's own announcements; it reports itself.
            reported: alive
                .iter()
                .map(|a| (a.node_id, announced_member(a)))
                .chain([(metrics.id, self.member.clone())])
                .collect(),
            max_voters: self.max_voters,
        };
        let Some(change) = promotion(&view) else {
            return;
        };
        let members = match &change {
            // Asking for no new voters moves a joint config to its last half.
            Promotion::FinishJoint => ChangeMembers::AddVoterIds(BTreeSet::new()),
            // Same addresses, only the name filled in: the member stays the same process.
            Promotion::RecordNames(named) => ChangeMembers::SetNodes(named.clone()),
            Promotion::AddVoter(id) => ChangeMembers::AddVoterIds(BTreeSet::from([*id])),
        };
        // Awaited to the end on purpose: change_membership commits a joint config and then the
        // final one from this future; abandoning it midway would leave the joint config.
        match self.raft.change_membership(members, true).await {
            Ok(_) => tracing::info!(?change, "membership changed"),
            Err(e) => tracing::warn!(?change, error = %e, "membership change failed; will retry"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn member(id: NodeId) -> Member {
        Member {
            raft_addr: format!("127.0.0.1:{}", 1000 + id),
            client_addr: format!("127.0.0.1:{}", 2000 + id),
            metrics_addr: format!("127.0.0.1:{}", 3000 + id),
            name: format!("n{id}"),
        }
    }

    fn heard(id: NodeId, role: Role, term: u64, voter: bool) -> NodeAnnounce {
        let addr =
            |base: u64| -> SocketAddr { format!("127.0.0.1:{}", base + id).parse().unwrap() };
        NodeAnnounce {
            cluster: "c".into(),
            node_id: id,
            client_addr: addr(2000),
            raft_addr: addr(1000),
            metrics_addr: addr(3000),
            role,
            leader: (role == Role::Leader).then_some(id),
            term,
            applied: 0,
            voter,
            started_ms: 0,
            name: format!("n{id}"),
        }
    }

    fn fresh(id: NodeId) -> NodeAnnounce {
        heard(id, Role::Learner, 0, false)
    }

    #[test]
    fn step_table() {
        let me = member(3);
        let base = View {
            id: 3,
            member: &me,
            initialized: false,
            in_window: false,
            leaderless_for: Duration::from_secs(1),
            election_timeout_max: Duration::from_millis(240),
            joined_recently: false,
            peers: &[],
            bootstrap_expect: None,
            enrolled: false,
        };
        let leader = [heard(1, Role::Leader, 2, true), fresh(5)];
        let electing = [heard(1, Role::Candidate, 2, true)];
        let lower = [fresh(1), fresh(5)];
        let higher = [fresh(4), fresh(5)];
        let alone = BTreeMap::from([(3, member(3))]);
        let two: BTreeMap<NodeId, Member> = [(3, member(3)), (4, member(4))].into();
        let rows: Vec<(&str, View<'_>, Step)> = vec![
            (
                "inside the window",
                View {
                    in_window: true,
                    peers: &leader,
                    ..base.clone()
                },
                Step::Wait,
            ),
            (
                "a leader: join it",
                View {
                    peers: &leader,
                    ..base.clone()
                },
                Step::Join(leader[0].clone()),
            ),
            (
                "joined a moment ago",
                View {
                    peers: &leader,
                    joined_recently: true,
                    ..base.clone()
                },
                Step::Wait,
            ),
            (
                "a member that just lost its leader",
                View {
                    peers: &leader,
                    initialized: true,
                    leaderless_for: Duration::from_millis(100),
                    ..base.clone()
                },
                Step::Wait,
            ),
            (
                "a member leaderless for long: rejoin",
                View {
                    peers: &leader,
                    initialized: true,
                    ..base.clone()
                },
                Step::Join(leader[0].clone()),
            ),
            (
                "a cluster electing",
                View {
                    peers: &electing,
                    ..base.clone()
                },
                Step::Wait,
            ),
            (
                "a lower fresh id bootstraps",
                View {
                    peers: &lower,
                    ..base.clone()
                },
                Step::Wait,
            ),
            (
                "an enrolled node never founds a cluster alone",
                View {
                    enrolled: true,
                    ..base.clone()
                },
                Step::Wait,
            ),
            (
                "an enrolled node still joins a leader it hears",
                View {
                    enrolled: true,
                    peers: &leader,
                    ..base.clone()
                },
                Step::Join(leader[0].clone()),
            ),
            (
                "lowest fresh id bootstraps alone",
                View {
                    peers: &higher,
                    ..base.clone()
                },
                Step::Bootstrap(alone.clone()),
            ),
            (
                "an initialized node never bootstraps",
                View {
                    peers: &higher,
                    initialized: true,
                    ..base.clone()
                },
                Step::Wait,
            ),
            (
                "expect 4, heard 3",
                View {
                    peers: &higher,
                    bootstrap_expect: Some(4),
                    ..base.clone()
                },
                Step::AwaitMore {
                    heard: 3,
                    expect: 4,
                },
            ),
            (
                "expect 2: the two lowest",
                View {
                    peers: &higher,
                    bootstrap_expect: Some(2),
                    ..base.clone()
                },
                Step::Bootstrap(two),
            ),
        ];
        for (name, view, want) in rows {
            assert_eq!(step(&view), want, "{name}");
        }
    }

    fn matched(pairs: &[(NodeId, u64)]) -> BTreeMap<NodeId, Option<LogId>> {
        use crate::types::CommittedLeaderId;
        use openraft::vote::RaftLeaderId;
        pairs
            .iter()
            .map(|(id, i)| (*id, Some(LogId::new(CommittedLeaderId::new(1, 1), *i))))
            .collect()
    }

    #[test]
    fn promotion_table() {
        let nodes: BTreeMap<NodeId, Member> = (1..=4).map(|id| (id, member(id))).collect();
        let voters_12 = Membership::new(vec![BTreeSet::from([1, 2])], nodes.clone()).unwrap();
        let joint = Membership::new(
            vec![BTreeSet::from([1, 2]), BTreeSet::from([1, 2, 3])],
            nodes.clone(),
        )
        .unwrap();
        let mut unnamed = nodes.clone();
        unnamed.get_mut(&4).unwrap().name.clear();
        let unnamed = Membership::new(vec![BTreeSet::from([1, 2])], unnamed).unwrap();
        let none = BTreeSet::new();
        let alive_3 = BTreeSet::from([3]);
        let caught_up = matched(&[(2, 5000), (3, 5000), (4, 3000)]);
        let behind = matched(&[(2, 5000), (3, 1000), (4, 3000)]);
        let reported_4 = vec![(4, member(4))];
        let close = matched(&[(3, 4500), (4, 100)]);
        type Row<'a> = (
            &'a str,
            &'a Membership,
            &'a BTreeMap<NodeId, Option<LogId>>,
            &'a BTreeSet<NodeId>,
            Vec<(NodeId, Member)>,
            usize,
            Option<Promotion>,
        );
        let named_4 = Some(Promotion::RecordNames(BTreeMap::from([(4, member(4))])));
        let rows: Vec<Row<'_>> = vec![
            (
                "joint config left behind",
                &joint,
                &caught_up,
                &none,
                vec![],
                5,
                Some(Promotion::FinishJoint),
            ),
            (
                "unnamed member reports its name",
                &unnamed,
                &caught_up,
                &none,
                reported_4,
                5,
                named_4,
            ),
            (
                "caught-up learner",
                &voters_12,
                &caught_up,
                &none,
                vec![],
                5,
                Some(Promotion::AddVoter(3)),
            ),
            (
                "voters full",
                &voters_12,
                &caught_up,
                &none,
                vec![],
                2,
                None,
            ),
            (
                "close behind and heard",
                &voters_12,
                &close,
                &alive_3,
                vec![],
                5,
                Some(Promotion::AddVoter(3)),
            ),
            (
                "close behind, not heard",
                &voters_12,
                &close,
                &none,
                vec![],
                5,
                None,
            ),
            (
                "too far behind",
                &voters_12,
                &behind,
                &alive_3,
                vec![],
                5,
                None,
            ),
        ];
        for (name, membership, matched, alive, reported, max, want) in rows {
            let v = LeaderView {
                membership,
                last_index: 5000,
                matched,
                alive,
                reported,
                max_voters: max,
            };
            assert_eq!(promotion(&v), want, "{name}");
        }
    }
}
