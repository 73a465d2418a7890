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

/// How often a stalled watchdog looks at the log's sync (to repeat its transfer and to see the
/// disk recover); a healthy one looks only as often as [`next_look`] needs.
const TICK: Duration = Duration::from_millis(25);

/// The shortest wait between two looks, so a sync about to cross the threshold is not polled in
/// a spin.
const LOOK_MIN: Duration = Duration::from_millis(1);

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

/// How long the watchdog waits before its next look, given what it saw now: [`TICK`] while the
/// disk counts as stalled; otherwise until the sync running now would reach the threshold (the
/// whole threshold when none runs).
///
/// So a sync that hangs is seen at its threshold (within [`LOOK_MIN`]) however the syncs before
/// it ran: it started after the last look, which was at most a threshold before the next, and
/// that next look, if early, waits out the rest of its threshold. A healthy node looks about
/// twice a second instead of every [`TICK`].
pub fn next_look(stalled: bool, sync_running: Duration, threshold: Duration) -> Duration {
    if stalled {
        return TICK;
    }
    threshold.saturating_sub(sync_running).max(LOOK_MIN)
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
        loop {
            let sync_running = self.sync.running_for();
            let role = crate::raft::with_server_metrics(&self.raft, |m| m.state);
            if role == ServerState::Shutdown {
                return;
            }
            let leading = role == ServerState::Leader;
            // Only a stalled leader hands over; finding to whom copies the whole metrics.
            let successor = if leading && (state.stalled || sync_running >= self.threshold) {
                successor_of(&metrics_now(&self.raft))
            } else {
                None
            };
            let tick = Tick {
                sync_running,
                threshold: self.threshold,
                leading,
                successor,
            };
            for action in decide(&mut state, tick, Instant::now()) {
                self.apply(action, tick).await;
            }
            let wait = next_look(state.stalled, self.sync.running_for(), self.threshold);
            tokio::time::sleep(wait).await;
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

    /// Simulates the watchdog's looks over syncs that each take `durations[i]` ms after a gap of
    /// `gaps[i]` ms, the last one hanging: it is seen once it has run the threshold, and no
    /// more than [`LOOK_MIN`] later.
    fn first_look_at_the_hung_sync(gaps: &[u64], durations: &[u64], threshold: Duration) -> u64 {
        let mut syncs = Vec::new();
        let mut at = 0;
        for (gap, took) in gaps.iter().zip(durations) {
            at += gap;
            syncs.push((at, at + took));
            at += took;
        }
        let hung = at + gaps.last().copied().unwrap_or(0);
        // Microseconds, so the 1 ms floor and sub-ms remainders are exact.
        let running_at = |t: u64| {
            if t >= hung * 1000 {
                return Duration::from_micros(t - hung * 1000);
            }
            syncs
                .iter()
                .find(|&&(from, to)| from * 1000 <= t && t < to * 1000)
                .map_or(Duration::ZERO, |&(from, _)| {
                    Duration::from_micros(t - from * 1000)
                })
        };
        let mut t = 0u64;
        loop {
            let running = running_at(t);
            if t >= hung * 1000 && running >= threshold {
                return t - hung * 1000;
            }
            t += next_look(false, running, threshold).as_micros() as u64;
        }
    }

    proptest::proptest! {
        #[test]
        fn a_hung_sync_is_seen_at_its_threshold(
            syncs in proptest::collection::vec((0u64..700, 0u64..700), 0..40),
            threshold_ms in 50u64..1000,
        ) {
            let (gaps, durations): (Vec<u64>, Vec<u64>) = syncs.into_iter().unzip();
            let threshold = Duration::from_millis(threshold_ms);
            let seen_after = first_look_at_the_hung_sync(&gaps, &durations, threshold);
            let latest = (threshold + LOOK_MIN).as_micros() as u64;
            proptest::prop_assert!(seen_after <= latest, "seen {seen_after} us after it hung");
        }
    }

    #[test]
    fn a_stalled_watchdog_ticks_and_a_healthy_one_waits_out_the_threshold() {
        let threshold = Duration::from_millis(500);
        assert_eq!(next_look(true, Duration::ZERO, threshold), TICK);
        assert_eq!(next_look(false, Duration::ZERO, threshold), threshold);
        let running = Duration::from_millis(480);
        assert_eq!(
            next_look(false, running, threshold),
            Duration::from_millis(20)
        );
        assert_eq!(next_look(false, threshold * 2, threshold), LOOK_MIN);
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
