//! Startup check that the Raft log still reaches the state machine's last applied entry, and
//! the repair when it does not.
//!
//! # Why the log can end before last applied
//! The chat state (RocksDB) records `last_applied` in the same batch as the messages. The Raft
//! log holds every entry up to its last index, fsync'd before it was acknowledged. Normally the
//! log's last index is at or past last applied, because an entry is applied only after it was
//! appended and committed. The log can only end *before* last applied when synced log bytes were
//! lost: a disk that dropped or cut data (the jepsen `truncate` nemesis cuts the newest
//! segment's last frame), or an operator who removed segment files. raft-log's recovery cuts
//! such a tail as torn, because it cannot tell it from an unsynced one.
//!
//! openraft 0.9 then purges the log through last applied on its own (`get_initial_state`:
//! "clean the hole"), but keeps the older snapshot, so its state says "purged through A" while
//! the newest snapshot ends at S < A. Its invariant `purge_upto <= snapshot_last_log_id` fails
//! and the Raft core panics: the node stays up, never ready, and serves stale reads.
//!
//! # The choice: repair, not refuse
//! Every entry at or below last applied was committed (openraft applies only committed
//! entries) and its effect is already in the state machine. Treating those entries as purged
//! therefore loses nothing this node needs, as long as a snapshot at last applied exists so that
//! a lagging peer can still be brought up to date. So [`reconcile`] logs a loud warning naming
//! both positions, builds a snapshot at last applied if the current one is older (building one
//! flushes RocksDB first, so the state it describes is durable before the log says it is
//! purged), then purges the log through last applied. openraft starts on a consistent state and
//! the node fetches everything after last applied from the leader.
//!
//! What this cannot give back: entries *after* last applied that the node had acknowledged to a
//! leader and then lost. The node may have counted toward their commit quorum, and after the
//! restart it may vote for a candidate lacking them. Refusing to start would not restore them
//! either; it is the same damage to synced data that raft-log lists as a non-goal (it needs
//! protocol-aware recovery). The jepsen `truncate` nemesis cuts only the last frame, so when
//! that frame was at or below last applied (an idle follower), nothing beyond last applied is
//! lost and the repair is exact.

use std::io;

use openraft::storage::{RaftLogStorage, RaftSnapshotBuilder, RaftStateMachine};

use crate::log_store::LogStore;
use crate::state_machine::StateMachine;
use crate::types::LogId;

/// What [`reconcile`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconciled {
    /// The log reaches last applied (or nothing was applied): nothing to do.
    Consistent,
    /// The log ended before last applied; it is now purged through `last_applied` and a snapshot
    /// at `last_applied` exists.
    LogBehindStateMachine {
        /// The log's last entry (or purge point) before the repair.
        log_last: Option<LogId>,
        /// The state machine's last applied entry.
        last_applied: LogId,
        /// Whether a snapshot had to be built at `last_applied`.
        snapshot_built: bool,
    },
}

/// Makes the log consistent with the state machine before openraft starts on them: if the log
/// ends before the state machine's last applied entry, builds a snapshot at last applied (unless
/// the current one is there already) and purges the log through it. See the module doc for why
/// this is safe for every entry at or below last applied.
///
/// # Errors
/// Reading either store, building the snapshot or persisting the purge failed; or the snapshot
/// built does not end at last applied (the state machine changed under us).
pub async fn reconcile(log: &mut LogStore, sm: &mut StateMachine) -> io::Result<Reconciled> {
    let log_last = log.get_log_state().await?.last_log_id;
    let (last_applied, _) = sm.applied_state().await?;
    let Some(last_applied) = last_applied else {
        return Ok(Reconciled::Consistent);
    };
    if log_last.is_some_and(|last| last.index >= last_applied.index) {
        return Ok(Reconciled::Consistent);
    }
    tracing::warn!(
        log_last_index = log_last.map(|l| l.index),
        last_applied_index = last_applied.index,
        log_last = ?log_last,
        last_applied = ?last_applied,
        "the raft log ends before the state machine's last applied entry: synced log entries \
         were lost (disk damage or removed files); treating the log as purged through last \
         applied and catching up from the leader"
    );
    let current = sm.get_current_snapshot().await?.map(|s| s.meta.last_log_id);
    let snapshot_built = current != Some(Some(last_applied));
    if snapshot_built {
        let built = sm.get_snapshot_builder().await.build_snapshot().await?;
        // Paired check: nothing applies while the node starts, so the snapshot must end exactly
        // at the last applied entry read above.
        if built.meta.last_log_id != Some(last_applied) {
            return Err(io::Error::other(format!(
                "snapshot built at startup ends at {:?}, expected last applied {last_applied}",
                built.meta.last_log_id
            )));
        }
    }
    // The snapshot at last applied is durable (file fsync, rename, directory fsync) before the
    // purge point is written. A crash in between leaves the log still behind; the next start
    // finds the snapshot current and only purges.
    log.purge(last_applied).await?;
    tracing::info!(
        purged_through = last_applied.index,
        snapshot_built,
        "log purged through last applied; the rest comes from the leader"
    );
    Ok(Reconciled::LogBehindStateMachine {
        log_last,
        last_applied,
        snapshot_built,
    })
}
