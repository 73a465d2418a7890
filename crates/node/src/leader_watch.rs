//! Fast failover when the leader's process dies: followers notice its Raft connections close,
//! check that nothing listens on its Raft port any more, and call an election at once instead
//! of waiting out the leader lease and an election timeout.
//!
//! Why: openraft 0.9 makes a follower of a committed leader wait `election_timeout_max` (its
//! leader lease) plus a random election timeout after the last heartbeat before it campaigns,
//! and a voter refuses every candidate while its own lease runs. With the default timing that
//! is 360-525 ms of silence after a `kill -9`, and a second round when the first split.
//!
//! When a process dies, its kernel closes its sockets: each follower's inbound connection from
//! the leader ends at once. A closed connection alone proves nothing (a leader may redial), so
//! the follower then connects to the leader's Raft address: `ECONNREFUSED` means no process
//! listens there. Only then does it act.
//!
//! Every surviving voter calls an election in the next term. A voter whose lease still runs
//! refuses every candidate, but a voter that has campaigned holds an uncommitted vote, which
//! carries no lease. openraft 0.9's default leader ids order candidates of one term by node
//! id, so when the survivors campaign within a moment of each other they do not split: each
//! gives way to the one with the highest id, which wins in this first round.
//!
//! Two things can still stop that first round:
//!
//! - one survivor asked before another had noticed, and was refused by the other's lease; it
//!   will not ask again before its election timer. So the survivor with the highest id, if it
//!   is still a candidate for itself [`RETRY_EVERY`] later, campaigns again in a higher term
//!   (at most [`RETRIES`] times): by then the others have campaigned too and hold no lease.
//!   A lower-id survivor never retries this way, and no survivor retries once it follows or
//!   leads, so a retry can never depose a leader the first round elected;
//! - the highest-id survivor's log is behind another's (the dead leader had replicated one
//!   more entry to it). Then its campaigns can never win and must stop: its vote requests
//!   come back refused with a more complete log ([`BehindSignal`], raised by the network
//!   layer), which ends its retries. The survivor with the more complete log, on refusing it,
//!   campaigns itself in a higher term ([`LeaderWatch::refused_a_less_complete_candidate`]).
//!
//! The rule also applies the other way round: when a peer refuses this node's vote request
//! because it campaigns itself with a higher vote but a less complete log ([`RivalSignal`]).
//! After a kill, the highest-id survivor may be behind: it out-ranks the others in the first
//! round, they give way, and it cannot win; traced, that cost one 683 ms failover round, until
//! its own timer ran out and the refusal above finally happened.
//!
//! The same refusal rule also ends a disruption that no death caused. When a disk stall holds a
//! follower's log writes longer than its election timeout, it campaigns with a log that may be
//! behind; its higher term deposes the leader (openraft 0.9 has no pre-vote), and its
//! campaigns cannot win. Without help, the cluster then waits for a more complete voter's
//! election timer, behind that voter's own lease: over a second of no commits, seen in the
//! 128-sender benchmark. So a voter that knows no leader and refuses a less complete candidate
//! campaigns at once, at most once per [`REACT_ONCE_PER`] outside a dead-leader reaction.
//!
//! Whatever this module misses, the ordinary election timers still elect, as they would have
//! without it.
//!
//! Safety does not depend on any of this: an election at any time is always safe in Raft. A
//! wrong guess costs one term change. A leader that is partitioned rather than dead keeps its
//! connections open (or its port answers), so partitions are left to the ordinary timers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::{Raft, ServerState};
use parking_lot::Mutex;

use crate::types::{NodeId, TypeConfig};

/// How long a closed leader connection's probes of the leader's Raft port go on. On loopback
/// or a LAN a refused connection answers within a round trip; probes that time out or are
/// accepted for this long mean the leader (or something at its address) still listens.
const PROBE_WINDOW: Duration = Duration::from_millis(150);

/// The pause between two probes within [`PROBE_WINDOW`].
const PROBE_EVERY: Duration = Duration::from_millis(10);

/// How long the highest-id survivor waits, while still a candidate, before campaigning again.
const RETRY_EVERY: Duration = Duration::from_millis(40);

/// How many times the highest-id survivor campaigns again.
const RETRIES: usize = 4;

/// How long after one reaction a node ignores further closed connections from the same dead
/// leader (its log and snapshot connections close together).
const REACT_ONCE_PER: Duration = Duration::from_secs(1);

/// Raised when a peer refuses this node's vote request because its own log is more complete;
/// lowered when this node starts reacting to a dead leader.
#[derive(Clone, Default)]
pub struct BehindSignal(Arc<AtomicBool>);

impl BehindSignal {
    /// A peer refused our candidate with a more complete log.
    pub fn raise(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn lower(&self) {
        self.0.store(false, Ordering::Release);
    }

    fn is_raised(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Raised by the network layer when a peer refuses this node's vote request because the peer
/// campaigns itself with a higher vote, though its log is less complete than this node's.
/// That peer cannot win this node's vote; [`LeaderWatch::watch_rivals`] answers by
/// campaigning above its term, as on refusing such a candidate's own request.
#[derive(Clone, Default)]
pub struct RivalSignal(Arc<RivalInner>);

#[derive(Default)]
struct RivalInner {
    /// The highest rival term not yet answered.
    term: Mutex<Option<u64>>,
    wake: tokio::sync::Notify,
}

impl RivalSignal {
    /// A less complete peer campaigns in `term` with a vote above ours.
    pub fn raise(&self, term: u64) {
        let mut slot = self.0.term.lock();
        *slot = Some(slot.map_or(term, |t| t.max(term)));
        drop(slot);
        // Stores a permit when nobody waits, so a raise is never lost.
        self.0.wake.notify_one();
    }

    async fn next(&self) -> u64 {
        loop {
            if let Some(term) = self.0.term.lock().take() {
                return term;
            }
            self.0.wake.notified().await;
        }
    }
}

/// One reaction to a dead leader.
#[derive(Debug, Clone, Copy)]
struct Reaction {
    leader: NodeId,
    at: Instant,
    /// Campaigns called since, on refusing a candidate whose log is less complete.
    log_campaigns: usize,
}

/// Watches inbound Raft connections for a dead leader. One per node, shared by every
/// inbound connection.
#[derive(Clone)]
pub struct LeaderWatch {
    id: NodeId,
    raft: Raft<TypeConfig>,
    behind: BehindSignal,
    last_reaction: Arc<Mutex<Option<Reaction>>>,
    /// When this node last campaigned on refusing a less complete candidate outside a
    /// dead-leader reaction.
    last_refusal_campaign: Arc<Mutex<Option<Instant>>>,
}

/// What one inbound Raft connection has carried: the leader whose AppendEntries came over it
/// last, if any.
#[derive(Clone, Default)]
pub struct InboundConn {
    leader: Arc<Mutex<Option<NodeId>>>,
}

impl InboundConn {
    /// Records that an AppendEntries of `leader`'s came over this connection.
    pub fn saw_leader(&self, leader: NodeId) {
        let mut slot = self.leader.lock();
        if *slot != Some(leader) {
            *slot = Some(leader);
        }
    }

    /// The leader whose AppendEntries came over this connection last.
    pub fn leader(&self) -> Option<NodeId> {
        *self.leader.lock()
    }
}

/// Why a closed connection did or did not lead to an election (logged, and returned so tests
/// of the decision need no cluster).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The connection never carried a leader's AppendEntries.
    NoLeaderSeen,
    /// The connection's leader is no longer this node's leader (or is this node).
    NotCurrentLeader,
    /// This node is not a voter: it cannot campaign.
    NotVoter,
    /// This node already reacted to this leader's death moments ago.
    AlreadyReacted,
    /// The leader's Raft address is unknown or does not resolve.
    NoAddress,
    /// Something kept accepting connections at the leader's Raft address (or the probes timed
    /// out) for the whole probe window: the leader may be alive.
    LeaderListens,
    /// Nothing listens at the leader's Raft address: an election was called.
    Elected,
    /// Nothing listens at the leader's Raft address, but this node's Raft has stopped.
    Stopped,
}

impl LeaderWatch {
    /// A watch for node `id`; `behind` is raised by its network layer.
    pub fn new(id: NodeId, raft: Raft<TypeConfig>, behind: BehindSignal) -> Self {
        LeaderWatch {
            id,
            raft,
            behind,
            last_reaction: Arc::new(Mutex::new(None)),
            last_refusal_campaign: Arc::new(Mutex::new(None)),
        }
    }

    /// Called when this node refused a candidate whose log is less complete than its own.
    /// That candidate cannot win this node's vote, and this node would otherwise wait for its
    /// election timer (and its lease) before campaigning: it campaigns now, in a term above
    /// the refused one's. Does nothing while this node leads or knows a leader, or is not a voter; within
    /// a dead-leader reaction at most [`RETRIES`] times, otherwise at most once per
    /// [`REACT_ONCE_PER`].
    pub async fn refused_a_less_complete_candidate(&self, their_term: u64) {
        self.campaign_above_less_complete(their_term).await;
    }

    /// Answers every [`RivalSignal`] raise like a refusal of that rival's own request. Runs
    /// until the process ends.
    pub async fn watch_rivals(self, rivals: RivalSignal) {
        loop {
            let their_term = rivals.next().await;
            self.campaign_above_less_complete(their_term).await;
        }
    }

    async fn campaign_above_less_complete(&self, their_term: u64) {
        let metrics = self.raft.metrics().borrow().clone();
        let view = RefusalView {
            // Still electing means no leader is known. (Having given way to a higher candidate
            // of the same term, as the first round after a death makes every survivor but one
            // do, this node may already count as a follower.)
            knows_leader: metrics.state == ServerState::Leader || metrics.current_leader.is_some(),
            voter: metrics
                .membership_config
                .membership()
                .voter_ids()
                .any(|v| v == self.id),
            our_term: metrics.vote.leader_id().get_term(),
            campaigning_for_itself: campaigning_for_itself(&self.raft, self.id),
        };
        let decision = {
            let mut reaction = self.last_reaction.lock();
            let mut last_refusal = self.last_refusal_campaign.lock();
            decide_refusal_campaign(
                &view,
                their_term,
                reaction.as_mut(),
                &mut last_refusal,
                Instant::now(),
            )
        };
        let RefusalCampaign::Campaign {
            elections,
            reacting,
        } = decision
        else {
            return;
        };
        tracing::info!(
            our_term = view.our_term,
            their_term,
            reacting,
            "a less complete candidate cannot win and no leader is known: campaigning"
        );
        for _ in 0..elections {
            if self.raft.trigger().elect().await.is_err() {
                return;
            }
        }
    }

    /// Called when an inbound Raft connection ends. Probes the leader it carried and calls
    /// an election if that leader's process is gone.
    pub async fn connection_closed(&self, conn: &InboundConn) -> Verdict {
        let verdict = self.react(conn).await;
        match verdict {
            Verdict::Elected => {}
            Verdict::LeaderListens | Verdict::NoAddress => {
                tracing::debug!(?verdict, leader = ?conn.leader(), "leader connection closed");
            }
            _ => tracing::trace!(?verdict, "raft connection closed"),
        }
        verdict
    }

    async fn react(&self, conn: &InboundConn) -> Verdict {
        let Some(leader) = conn.leader() else {
            return Verdict::NoLeaderSeen;
        };
        let metrics = self.raft.metrics().borrow().clone();
        if leader == self.id || metrics.current_leader != Some(leader) {
            return Verdict::NotCurrentLeader;
        }
        let membership = metrics.membership_config.membership();
        if !membership.voter_ids().any(|v| v == self.id) {
            return Verdict::NotVoter;
        }
        if let Some(reaction) = *self.last_reaction.lock() {
            if reaction.leader == leader && reaction.at.elapsed() < REACT_ONCE_PER {
                return Verdict::AlreadyReacted;
            }
        }
        let Some(node) = membership.get_node(&leader) else {
            return Verdict::NoAddress;
        };
        let Ok(addr) = crate::raft_rpc::resolve(&node.raft_addr).await else {
            return Verdict::NoAddress;
        };
        if !refuses_connections(addr).await {
            return Verdict::LeaderListens;
        }
        {
            let mut last = self.last_reaction.lock();
            if let Some(reaction) = *last {
                if reaction.leader == leader && reaction.at.elapsed() < REACT_ONCE_PER {
                    return Verdict::AlreadyReacted;
                }
            }
            *last = Some(Reaction {
                leader,
                at: Instant::now(),
                log_campaigns: 0,
            });
            self.behind.lower();
        }
        tracing::info!(
            leader,
            raft_addr = %addr,
            "the leader's raft connection closed and its port refuses connections: calling an election"
        );
        if self.raft.trigger().elect().await.is_err() {
            return Verdict::Stopped;
        }
        let highest_survivor = membership
            .voter_ids()
            .filter(|v| *v != leader)
            .max()
            .is_some_and(|v| v == self.id);
        if highest_survivor {
            let (raft, id, behind) = (self.raft.clone(), self.id, self.behind.clone());
            tokio::spawn(async move {
                for _ in 0..RETRIES {
                    tokio::time::sleep(RETRY_EVERY).await;
                    if !campaigning_for_itself(&raft, id) || behind.is_raised() {
                        return;
                    }
                    tracing::info!(dead = leader, "still a candidate: campaigning again");
                    if raft.trigger().elect().await.is_err() {
                        return;
                    }
                }
            });
        }
        Verdict::Elected
    }
}

/// What the refusal rule needs to know of this node's Raft state.
#[derive(Debug, Clone, Copy)]
struct RefusalView {
    /// This node leads, or follows a leader it knows.
    knows_leader: bool,
    /// This node is a voter.
    voter: bool,
    /// The term of this node's vote.
    our_term: u64,
    /// This node is a candidate that has so far voted only for itself.
    campaigning_for_itself: bool,
}

/// The refusal rule's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RefusalCampaign {
    /// Do nothing.
    Skip,
    /// Call `elections` elections in a row (the last lands one term above the rival's);
    /// `reacting` when inside a dead-leader reaction.
    Campaign { elections: u64, reacting: bool },
}

/// The refusal rule of [`LeaderWatch::refused_a_less_complete_candidate`] as a pure decision,
/// at time `now`: `reaction` is the current dead-leader reaction (its campaign count is bumped
/// when it is used) and `last_refusal` when this node last campaigned under the rule outside
/// one (set when it campaigns now).
fn decide_refusal_campaign(
    view: &RefusalView,
    their_term: u64,
    reaction: Option<&mut Reaction>,
    last_refusal: &mut Option<Instant>,
    now: Instant,
) -> RefusalCampaign {
    if view.knows_leader || !view.voter {
        return RefusalCampaign::Skip;
    }
    let reacting = match reaction {
        Some(reaction) if now.saturating_duration_since(reaction.at) < REACT_ONCE_PER => {
            if reaction.log_campaigns >= RETRIES {
                return RefusalCampaign::Skip;
            }
            reaction.log_campaigns += 1;
            true
        }
        _ => false,
    };
    if !reacting {
        // Already campaigning above the refused candidate: that round may still win.
        if view.our_term > their_term && view.campaigning_for_itself {
            return RefusalCampaign::Skip;
        }
        if last_refusal.is_some_and(|at| now.saturating_duration_since(at) < REACT_ONCE_PER) {
            return RefusalCampaign::Skip;
        }
        *last_refusal = Some(now);
    }
    // Each election takes the next term; a campaign in the refused candidate's own term would
    // lose to it when its id is higher, so go one above it.
    let elections = their_term
        .saturating_add(1)
        .saturating_sub(view.our_term)
        .clamp(1, 3);
    RefusalCampaign::Campaign {
        elections,
        reacting,
    }
}

/// Whether node `id` is a candidate that has so far voted only for itself: no leader has
/// reached it and it has granted no other candidate.
fn campaigning_for_itself(raft: &Raft<TypeConfig>, id: NodeId) -> bool {
    let metrics = raft.metrics().borrow().clone();
    metrics.state == ServerState::Candidate
        && !metrics.vote.is_committed()
        && metrics.vote.leader_id().voted_for() == Some(id)
}

/// Whether `addr` refuses TCP connections within [`PROBE_WINDOW`]. A dying process's
/// connections can close a moment before its listener does, and the kernel completes a
/// handshake on a listener whose process is exiting, so one accepted probe proves nothing:
/// it is retried every [`PROBE_EVERY`] until the window closes.
async fn refuses_connections(addr: std::net::SocketAddr) -> bool {
    let start = Instant::now();
    loop {
        let left = PROBE_WINDOW.saturating_sub(start.elapsed());
        if left.is_zero() {
            return false;
        }
        match tokio::time::timeout(left, tokio::net::TcpStream::connect(addr)).await {
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => return true,
            Ok(Ok(probe)) => drop(probe),
            Ok(Err(_)) | Err(_) => {}
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_remembers_the_last_leader_it_carried() {
        let conn = InboundConn::default();
        assert_eq!(conn.leader(), None);
        conn.saw_leader(7);
        conn.saw_leader(9);
        assert_eq!(conn.leader(), Some(9));
        let clone = conn.clone();
        clone.saw_leader(3);
        assert_eq!(conn.leader(), Some(3), "clones share one record");
    }

    /// A voter in `our_term` that knows no leader and is not campaigning.
    fn electing(our_term: u64) -> RefusalView {
        RefusalView {
            knows_leader: false,
            voter: true,
            our_term,
            campaigning_for_itself: false,
        }
    }

    #[test]
    fn a_node_that_knows_a_leader_or_cannot_vote_never_campaigns_on_a_refusal() {
        let now = Instant::now();
        let mut last = None;
        let leader_known = RefusalView {
            knows_leader: true,
            ..electing(5)
        };
        let learner = RefusalView {
            voter: false,
            ..electing(5)
        };
        for view in [leader_known, learner] {
            assert_eq!(
                decide_refusal_campaign(&view, 6, None, &mut last, now),
                RefusalCampaign::Skip
            );
        }
        assert_eq!(last, None, "a skipped refusal uses up no turn");
    }

    #[test]
    fn outside_a_reaction_a_refusal_campaigns_one_term_above_the_rival_once_a_second() {
        let start = Instant::now();
        let mut last = None;
        // Rival in term 7, this node in 5: elections for 6, 7 and 8.
        assert_eq!(
            decide_refusal_campaign(&electing(5), 7, None, &mut last, start),
            RefusalCampaign::Campaign {
                elections: 3,
                reacting: false
            }
        );
        assert_eq!(last, Some(start));
        // A second refusal within REACT_ONCE_PER waits, one after it acts again.
        let soon = start + REACT_ONCE_PER / 2;
        assert_eq!(
            decide_refusal_campaign(&electing(5), 7, None, &mut last, soon),
            RefusalCampaign::Skip
        );
        let later = start + REACT_ONCE_PER;
        assert_eq!(
            decide_refusal_campaign(&electing(8), 8, None, &mut last, later),
            RefusalCampaign::Campaign {
                elections: 1,
                reacting: false
            }
        );
        // Far below the rival: at most three elections (the rest is left to the next refusal).
        let much_later = later + REACT_ONCE_PER;
        assert_eq!(
            decide_refusal_campaign(&electing(2), 40, None, &mut last, much_later),
            RefusalCampaign::Campaign {
                elections: 3,
                reacting: false
            }
        );
    }

    #[test]
    fn a_node_already_campaigning_above_the_rival_lets_its_round_run() {
        let mut last = None;
        let campaigning = RefusalView {
            campaigning_for_itself: true,
            ..electing(9)
        };
        let now = Instant::now();
        assert_eq!(
            decide_refusal_campaign(&campaigning, 8, None, &mut last, now),
            RefusalCampaign::Skip
        );
        assert_eq!(last, None);
        // Campaigning, but not above the rival: its round cannot win, so go above.
        assert_eq!(
            decide_refusal_campaign(&campaigning, 9, None, &mut last, now),
            RefusalCampaign::Campaign {
                elections: 1,
                reacting: false
            }
        );
    }

    #[test]
    fn inside_a_dead_leader_reaction_a_refusal_campaigns_at_most_retries_times() {
        let start = Instant::now();
        let mut reaction = Reaction {
            leader: 1,
            at: start,
            log_campaigns: 0,
        };
        let mut last = None;
        let at = start + Duration::from_millis(10);
        for _ in 0..RETRIES {
            assert_eq!(
                decide_refusal_campaign(&electing(5), 5, Some(&mut reaction), &mut last, at),
                RefusalCampaign::Campaign {
                    elections: 1,
                    reacting: true
                }
            );
        }
        assert_eq!(reaction.log_campaigns, RETRIES);
        assert_eq!(
            last, None,
            "campaigns inside a reaction leave the once-a-second turn"
        );
        assert_eq!(
            decide_refusal_campaign(&electing(5), 5, Some(&mut reaction), &mut last, at),
            RefusalCampaign::Skip
        );
        // Once the reaction is over, the ordinary once-a-second rule applies again.
        let after = start + REACT_ONCE_PER;
        assert_eq!(
            decide_refusal_campaign(&electing(5), 5, Some(&mut reaction), &mut last, after),
            RefusalCampaign::Campaign {
                elections: 1,
                reacting: false
            }
        );
    }

    #[tokio::test]
    async fn a_listening_port_is_alive_and_a_closed_one_refuses() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(!refuses_connections(addr).await, "a bound listener answers");
        drop(listener);
        assert!(refuses_connections(addr).await, "nothing listens any more");
    }

    #[tokio::test]
    async fn a_listener_that_closes_within_the_window_counts_as_gone() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            tokio::time::sleep(PROBE_WINDOW / 3).await;
            drop(listener);
        });
        assert!(refuses_connections(addr).await);
    }
}
