//! Fast failover when the leader's process dies: followers notice its Raft connections close,
//! check that nothing listens on its Raft port any more, and call an election at once instead
//! of waiting out the leader lease and an election timeout.
//!
//! Why: openraft makes a follower of a live leader wait its leader lease (`election_timeout_max`)
//! plus a random election timeout after the last heartbeat before it campaigns, and a voter
//! refuses every candidate while its own lease runs: 360-480 ms of silence after a `kill -9`
//! with the default timing. The target is a new leader within tens of ms (RESULTS.md, "failover").
//!
//! When a process dies its kernel closes its sockets, so each follower's inbound connection from
//! the leader ends at once. A closed connection alone proves nothing (a leader may redial), so
//! the follower connects to the leader's Raft address: `ECONNREFUSED` means no process listens
//! there. Only then does it act ([`decide`] then [`LeaderWatch::connection_closed`]).
//!
//! Every surviving voter then calls an election without pre-vote (its own lease would refuse
//! a pre-vote round). Campaigning drops a voter's lease, and leader ids order the candidates of
//! one term by node id, so the survivors give way to the one with the highest id. When that
//! first round cannot finish (a survivor asked before another had noticed and was refused by its
//! lease, or the highest survivor's log is behind), a survivor that is still a candidate for
//! itself [`RETRY_EVERY`] later asks again with pre-vote ([`retry`]): a pre-vote changes no
//! term and is granted only to a complete log by voters that hold no lease, so a retry can
//! never depose a leader the first round elected, and a survivor whose log is behind fails it
//! harmlessly.
//!
//! Safety does not depend on any of this: an election is always safe in Raft. A leader that is
//! partitioned rather than dead keeps its connections open (or its port answers), so partitions
//! are left to the ordinary timers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::ServerState;
use parking_lot::Mutex;

use crate::raft::Raft;
use crate::types::NodeId;

/// How long a closed leader connection's probes of the leader's Raft port go on. On loopback
/// or a LAN a refused connection answers within a round trip; probes that time out or are
/// accepted for this long mean the leader (or something at its address) still listens.
const PROBE_WINDOW: Duration = Duration::from_millis(150);

/// The pause between two probes within [`PROBE_WINDOW`].
const PROBE_EVERY: Duration = Duration::from_millis(10);

/// How long a survivor waits, while still a candidate for itself, before asking again. A
/// pre-vote that fails changes nothing, so retries can be frequent.
const RETRY_EVERY: Duration = Duration::from_millis(15);

/// How many times a survivor asks again.
const RETRIES: usize = 8;

/// How long after one reaction a node ignores further closed connections from the same dead
/// leader (its log and snapshot connections close together).
const REACT_ONCE_PER: Duration = Duration::from_secs(1);

/// What one inbound Raft connection has carried: the leader whose AppendEntries came over it
/// last, if any.
#[derive(Clone, Default)]
pub struct InboundConn {
    leader: Arc<Mutex<Option<NodeId>>>,
}

impl InboundConn {
    /// Records that an AppendEntries of `leader`'s came over this connection.
    pub fn saw_leader(&self, leader: NodeId) {
        *self.leader.lock() = Some(leader);
    }

    /// The leader whose AppendEntries came over this connection last.
    pub fn leader(&self) -> Option<NodeId> {
        *self.leader.lock()
    }
}

/// What [`decide`] needs to know of this node when a connection closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    /// This node's id.
    pub id: NodeId,
    /// The leader this node follows, if any.
    pub current_leader: Option<NodeId>,
    /// This node is a voter.
    pub voter: bool,
    /// The last reaction: which dead leader, and when.
    pub last_reaction: Option<(NodeId, Instant)>,
}

/// Why a closed connection did or did not lead to a probe of the leader's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Probe this leader's Raft port; elect if it refuses connections.
    Probe(NodeId),
    /// The connection never carried a leader's AppendEntries.
    NoLeaderSeen,
    /// The connection's leader is no longer this node's leader (or is this node).
    NotCurrentLeader,
    /// This node is not a voter: it cannot campaign.
    NotVoter,
    /// This node already reacted to this leader's death moments ago.
    AlreadyReacted,
}

/// The dead-leader rule for a connection that carried `carried`'s AppendEntries and closed at
/// `now`.
pub fn decide(view: &View, carried: Option<NodeId>, now: Instant) -> Verdict {
    let Some(leader) = carried else {
        return Verdict::NoLeaderSeen;
    };
    if leader == view.id || view.current_leader != Some(leader) {
        return Verdict::NotCurrentLeader;
    }
    if !view.voter {
        return Verdict::NotVoter;
    }
    match view.last_reaction {
        Some((dead, at))
            if dead == leader && now.saturating_duration_since(at) < REACT_ONCE_PER =>
        {
            Verdict::AlreadyReacted
        }
        _ => Verdict::Probe(leader),
    }
}

/// What a retry sees of this node's Raft state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Campaign {
    /// This node is a candidate.
    pub candidate: bool,
    /// Its vote is for itself and not committed: no leader has reached it and it has granted
    /// no other candidate.
    pub voted_for_itself: bool,
}

/// Whether a survivor asks again (with pre-vote) after `done` retries.
pub fn retry(campaign: Campaign, done: usize) -> bool {
    done < RETRIES && campaign.candidate && campaign.voted_for_itself
}

/// Watches inbound Raft connections for a dead leader. One per node, shared by every inbound
/// connection.
#[derive(Clone)]
pub struct LeaderWatch {
    id: NodeId,
    raft: Raft,
    last_reaction: Arc<Mutex<Option<(NodeId, Instant)>>>,
}

impl LeaderWatch {
    /// A watch for node `id`.
    pub fn new(id: NodeId, raft: Raft) -> Self {
        LeaderWatch {
            id,
            raft,
            last_reaction: Arc::default(),
        }
    }

    fn campaign(&self) -> Campaign {
        let metrics = crate::raft::metrics_now(&self.raft);
        Campaign {
            candidate: metrics.state == ServerState::Candidate,
            voted_for_itself: !metrics.vote.is_committed()
                && metrics.vote.leader_id().node_id == self.id,
        }
    }

    /// Called when an inbound Raft connection ends: probes the leader it carried and calls an
    /// election if that leader's process is gone.
    pub async fn connection_closed(&self, conn: &InboundConn) {
        let (view, addr) = {
            let metrics = crate::raft::metrics_now(&self.raft);
            let membership = metrics.membership_config.membership();
            let view = View {
                id: self.id,
                current_leader: metrics.current_leader,
                voter: membership.voter_ids().any(|v| v == self.id),
                last_reaction: *self.last_reaction.lock(),
            };
            let addr = conn
                .leader()
                .and_then(|l| membership.get_node(&l))
                .map(|m| m.raft_addr.clone());
            (view, addr)
        };
        let verdict = decide(&view, conn.leader(), Instant::now());
        let Verdict::Probe(leader) = verdict else {
            tracing::trace!(?verdict, "raft connection closed");
            return;
        };
        let Some(addr) = addr else { return };
        let Ok(addr) = crate::cluster::resolve(&addr).await else {
            return;
        };
        if !refuses_connections(addr).await {
            tracing::debug!(leader, "leader connection closed but its port answers");
            return;
        }
        {
            // Two connections of one dead leader may both get here; one reacts.
            let mut last = self.last_reaction.lock();
            let view = View {
                last_reaction: *last,
                ..view
            };
            if decide(&view, Some(leader), Instant::now()) != Verdict::Probe(leader) {
                return;
            }
            *last = Some((leader, Instant::now()));
        }
        tracing::info!(
            leader,
            raft_addr = %addr,
            "the leader's raft connection closed and its port refuses connections: calling an election"
        );
        if self.raft.trigger().elect(false).await.is_err() {
            return;
        }
        let watch = self.clone();
        tokio::spawn(async move {
            for done in 0.. {
                tokio::time::sleep(RETRY_EVERY).await;
                if !retry(watch.campaign(), done) {
                    return;
                }
                tracing::info!(
                    dead = leader,
                    "still a candidate: asking again with pre-vote"
                );
                if watch.raft.trigger().elect(true).await.is_err() {
                    return;
                }
            }
        });
    }
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

    #[test]
    fn decide_table() {
        let now = Instant::now();
        let follower = View {
            id: 2,
            current_leader: Some(1),
            voter: true,
            last_reaction: None,
        };
        let recent = Some((1, now - REACT_ONCE_PER / 2));
        let old = Some((1, now - REACT_ONCE_PER));
        let rows: &[(&str, View, Option<NodeId>, Verdict)] = &[
            ("leader's connection", follower, Some(1), Verdict::Probe(1)),
            (
                "never carried a leader",
                follower,
                None,
                Verdict::NoLeaderSeen,
            ),
            (
                "a former leader",
                follower,
                Some(3),
                Verdict::NotCurrentLeader,
            ),
            (
                "this node itself",
                View { id: 1, ..follower },
                Some(1),
                Verdict::NotCurrentLeader,
            ),
            (
                "no leader known",
                View {
                    current_leader: None,
                    ..follower
                },
                Some(1),
                Verdict::NotCurrentLeader,
            ),
            (
                "a learner",
                View {
                    voter: false,
                    ..follower
                },
                Some(1),
                Verdict::NotVoter,
            ),
            (
                "reacted moments ago",
                View {
                    last_reaction: recent,
                    ..follower
                },
                Some(1),
                Verdict::AlreadyReacted,
            ),
            (
                "reacted long ago",
                View {
                    last_reaction: old,
                    ..follower
                },
                Some(1),
                Verdict::Probe(1),
            ),
            (
                "reacted to another",
                View {
                    last_reaction: Some((5, now)),
                    ..follower
                },
                Some(1),
                Verdict::Probe(1),
            ),
        ];
        for (name, view, carried, want) in rows {
            assert_eq!(decide(view, *carried, now), *want, "{name}");
        }
    }

    #[test]
    fn retry_table() {
        let alone = Campaign {
            candidate: true,
            voted_for_itself: true,
        };
        let rows: &[(&str, Campaign, usize, bool)] = &[
            ("still alone", alone, 0, true),
            ("last retry", alone, RETRIES - 1, true),
            ("out of retries", alone, RETRIES, false),
            (
                "follows or leads now",
                Campaign {
                    candidate: false,
                    ..alone
                },
                0,
                false,
            ),
            (
                "granted another candidate",
                Campaign {
                    voted_for_itself: false,
                    ..alone
                },
                0,
                false,
            ),
        ];
        for (name, campaign, done, want) in rows {
            assert_eq!(retry(*campaign, *done), *want, "{name}");
        }
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
