//! Handing leadership over: on a graceful stop, and when the leader's disk stalls.
//!
//! Both use openraft's leadership transfer (`Trigger::transfer_leader`): the leader names a
//! voter, the voter catches up to the leader's last entry and campaigns with a vote the others
//! grant despite their leases, so the cluster has a new leader within a round trip or two
//! instead of an election timeout after the old one goes silent.
//!
//! The disk watchdog: openraft keeps a leader whose log fsyncs hang (its heartbeats still go
//! out, so no follower campaigns), and every write waits for the disk. A leader whose log sync
//! has run longer than the stall threshold closes its write gate (new sends are answered "not
//! leader" and retried elsewhere), stops campaigning, and hands leadership to the most
//! caught-up voter; once its syncs finish again it opens the gate and campaigns normally.
//! [`decide`] is the rule; [`DiskWatchdog::run`] does the I/O.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use openraft::ServerState;

use crate::log_store::SyncWatch;
use crate::raft::{metrics_now, Metrics, Raft};
use crate::types::{LogId, NodeId};

/// How often the watchdog looks at the log's sync.
const TICK: Duration = Duration::from_millis(25);

/// How often a stalled leader repeats its transfer request while it still leads.
const TRANSFER_EVERY: Duration = Duration::from_millis(200);

/// How long a graceful stop waits for the new leader before stopping anyway.
const HANDOVER_WAIT: Duration = Duration::from_secs(2);

/// The voter to hand leadership to: one whose log matches all of the leader's (`last`), the
/// highest id among them. `None` when no other voter is caught up: a voter behind would first
/// have to catch up, and on a disk stall shared by every node (one machine, one array) a
/// follower that is behind is stalled too, and handing it leadership would only move the
/// stall.
pub fn successor(
    me: NodeId,
    voters: impl IntoIterator<Item = NodeId>,
    matched: &BTreeMap<NodeId, Option<LogId>>,
    last: Option<u64>,
) -> Option<NodeId> {
    voters
        .into_iter()
        .filter(|v| *v != me)
        .filter(|v| matched.get(v).copied().flatten().map(|l| l.index) >= last)
        .max()
}

/// [`successor`] from a leader's metrics; `None` when not leading.
fn successor_of(metrics: &Metrics) -> Option<NodeId> {
    if metrics.state != ServerState::Leader {
        return None;
    }
    let matched = metrics.replication.clone().unwrap_or_default();
    successor(
        metrics.id,
        metrics.membership_config.membership().voter_ids(),
        &matched,
        metrics.last_log_index,
    )
}

/// Open unless the disk watchdog (or a stop) closed it: whether this node takes sends.
#[derive(Clone)]
pub struct WriteGate(Arc<tokio::sync::watch::Sender<bool>>);

impl Default for WriteGate {
    fn default() -> Self {
        WriteGate(Arc::new(tokio::sync::watch::channel(false).0))
    }
}

impl WriteGate {
    /// Whether sends are refused.
    pub fn is_closed(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the gate is closed (at once if it is).
    pub async fn closed(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives in `self`, so the channel cannot close under us.
        let _ = rx.wait_for(|closed| *closed).await;
    }

    /// Refuses sends from now on (a stopping node).
    pub fn close(&self) {
        self.set_closed(true);
    }

    fn set_closed(&self, closed: bool) {
        self.0.send_replace(closed);
    }
}

/// What the watchdog knows between ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatchState {
    /// The disk counts as stalled (gate closed, not campaigning).
    pub stalled: bool,
    /// When leadership was last offered away.
    pub last_transfer: Option<Instant>,
}

/// One tick's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    /// How long the log's current sync has been running (zero when none runs).
    pub sync_running: Duration,
    /// The stall threshold.
    pub threshold: Duration,
    /// This node leads; with the voter it would hand over to.
    pub leading: bool,
    /// The voter to hand over to, when leading.
    pub successor: Option<NodeId>,
}

/// What one tick does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The disk stalled: close the write gate and stop campaigning.
    Stall,
    /// Offer leadership to this voter.
    Transfer(NodeId),
    /// The disk recovered: open the gate and campaign again.
    Recover,
}

/// The disk watchdog's rule: state and tick in, actions out.
pub fn decide(state: &mut WatchState, tick: Tick, now: Instant) -> Vec<Action> {
    let mut actions = Vec::new();
    let stalled = tick.sync_running >= tick.threshold;
    if stalled && !state.stalled {
        state.stalled = true;
        actions.push(Action::Stall);
    }
    if !stalled && state.stalled {
        state.stalled = false;
        state.last_transfer = None;
        actions.push(Action::Recover);
    }
    if state.stalled && tick.leading {
        let due = state
            .last_transfer
            .is_none_or(|at| now.saturating_duration_since(at) >= TRANSFER_EVERY);
        if let (true, Some(to)) = (due, tick.successor) {
            state.last_transfer = Some(now);
            actions.push(Action::Transfer(to));
        }
    }
    actions
}

/// The task that applies [`decide`] to this node.
pub struct DiskWatchdog {
    /// This node's Raft.
    pub raft: Raft,
    /// The log's sync progress.
    pub sync: SyncWatch,
    /// The gate the proposer checks.
    pub gate: WriteGate,
    /// How long a sync may run before the disk counts as stalled.
    pub threshold: Duration,
}

impl DiskWatchdog {
    /// Runs until Raft stops.
    pub async fn run(self) {
        let mut state = WatchState::default();
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let metrics = metrics_now(&self.raft);
            if metrics.state == ServerState::Shutdown {
                return;
            }
            let tick = Tick {
                sync_running: self.sync.running_for(),
                threshold: self.threshold,
                leading: metrics.state == ServerState::Leader,
                successor: successor_of(&metrics),
            };
            for action in decide(&mut state, tick, Instant::now()) {
                self.apply(action, tick).await;
            }
        }
    }

    async fn apply(&self, action: Action, tick: Tick) {
        match action {
            Action::Stall => {
                tracing::warn!(
                    sync_ms = tick.sync_running.as_millis() as u64,
                    "the raft log's fsync is stalled: refusing writes and elections until it returns"
                );
                self.gate.set_closed(true);
                self.raft.runtime_config().elect(false);
            }
            Action::Transfer(to) => {
                tracing::warn!(to, "disk stalled: handing leadership over");
                let _ = self.raft.trigger().transfer_leader(to).await;
            }
            Action::Recover => {
                tracing::info!("the raft log's fsync returned: taking writes again");
                self.gate.set_closed(false);
                self.raft.runtime_config().elect(true);
            }
        }
    }
}

/// On a graceful stop: if this node leads, hands leadership to a caught-up voter (waiting for
/// one, since the write gate is closed and followers catch up) and waits until another node
/// leads, all within [`HANDOVER_WAIT`]. Returns whom it handed to.
pub async fn hand_over(raft: &Raft) -> Option<NodeId> {
    let deadline = Instant::now() + HANDOVER_WAIT;
    let to = loop {
        let metrics = metrics_now(raft);
        if metrics.state != ServerState::Leader {
            return None;
        }
        if let Some(to) = successor_of(&metrics) {
            break to;
        }
        if Instant::now() >= deadline {
            tracing::warn!("no voter caught up in time to take over; stopping anyway");
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let me = metrics_now(raft).id;
    tracing::info!(to, "stopping: handing leadership over");
    raft.trigger().transfer_leader(to).await.ok()?;
    while Instant::now() < deadline {
        let leader = metrics_now(raft).current_leader;
        if leader.is_some_and(|l| l != me) {
            return leader;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tracing::warn!(
        to,
        "no other node took over leadership in time; stopping anyway"
    );
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::CommittedLeaderId;
    use openraft::vote::RaftLeaderId;

    fn at(index: u64) -> Option<LogId> {
        Some(LogId::new(CommittedLeaderId::new(1, 1), index))
    }

    #[test]
    fn successor_table() {
        let matched = BTreeMap::from([(2, at(10)), (3, at(12)), (4, None), (5, at(12))]);
        type Row = (&'static str, Vec<NodeId>, Option<u64>, Option<NodeId>);
        let rows: &[Row] = &[
            (
                "caught up, highest id on a tie",
                vec![1, 2, 3, 5],
                Some(12),
                Some(5),
            ),
            ("the one caught up", vec![1, 2, 3], Some(12), Some(3)),
            ("nobody caught up", vec![1, 2, 4], Some(12), None),
            (
                "a voter never matched, empty log",
                vec![1, 4],
                None,
                Some(4),
            ),
            ("a voter never matched", vec![1, 4], Some(0), None),
            ("alone", vec![1], Some(12), None),
        ];
        for (name, voters, last, want) in rows {
            assert_eq!(
                successor(1, voters.clone(), &matched, *last),
                *want,
                "{name}"
            );
        }
    }

    fn tick(sync_ms: u64, leading: bool) -> Tick {
        Tick {
            sync_running: Duration::from_millis(sync_ms),
            threshold: Duration::from_millis(400),
            leading,
            successor: Some(2),
        }
    }

    #[test]
    fn watchdog_table() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let steps: &[(&str, Tick, Instant, Vec<Action>)] = &[
            ("healthy leader", tick(5, true), ms(0), vec![]),
            (
                "slow but under the threshold",
                tick(399, true),
                ms(25),
                vec![],
            ),
            (
                "stalled leader",
                tick(400, true),
                ms(50),
                vec![Action::Stall, Action::Transfer(2)],
            ),
            ("still leading soon after", tick(450, true), ms(75), vec![]),
            (
                "still leading later: ask again",
                tick(650, true),
                ms(250),
                vec![Action::Transfer(2)],
            ),
            (
                "a follower now, still stalled",
                tick(900, false),
                ms(500),
                vec![],
            ),
            ("recovered", tick(0, false), ms(525), vec![Action::Recover]),
            ("healthy follower", tick(3, false), ms(550), vec![]),
            (
                "a stalled follower only stops campaigning",
                tick(500, false),
                ms(575),
                vec![Action::Stall],
            ),
        ];
        let mut state = WatchState::default();
        for (name, tick, now, want) in steps {
            assert_eq!(decide(&mut state, *tick, *now), *want, "{name}");
        }
    }

    #[test]
    fn a_stalled_leader_with_no_one_to_hand_to_only_closes_its_gate() {
        let mut state = WatchState::default();
        let alone = Tick {
            successor: None,
            ..tick(1000, true)
        };
        assert_eq!(
            decide(&mut state, alone, Instant::now()),
            vec![Action::Stall]
        );
    }
}
