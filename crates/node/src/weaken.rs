//! Deliberately broken modes, so the fault-injection harness can show that it fails when the
//! guarantees are broken (issue 5: "evidence the harness can fail").
//!
//! Two gates keep them out of real use: the code is compiled only with the cargo feature
//! `weaken`, and even then a mode is on only when named at run time (`server --weaken LIST`,
//! env `CELLCHAT_WEAKEN`). Without the feature, naming a mode is refused by
//! [`Weaken::parse`] and [`crate::Config::validate`], so a production binary cannot be
//! weakened by a stray flag.
//!
//! Modes:
//! - `skip-dedup`: the node gives every send a fresh, random client seq before proposing it,
//!   so the state machine applies a retried (client id, client seq) again as a new message.
//!   The rewritten key is inside the log entry, so every replica applies the same thing; only
//!   exactly-once is broken.
//! - `ack-before-fsync`: the log store completes openraft's flush callback without
//!   fdatasync. Entries are acknowledged while only in the page cache; kill -9 keeps them, a
//!   power failure does not.
//! - `faulty-fs`: not a weakness but the power-failure switch: the WAL runs on raft-log's
//!   `FaultyFs` (which models what an fsync made durable), and SIGUSR1 makes the node drop
//!   every un-fsynced WAL byte, tear the last write, mark the data dir and abort. At the next
//!   start the chat state is rolled back to its last snapshot (applied batches reach RocksDB's
//!   files only in its flushes, so after a real crash it may be behind the log; rolling back
//!   to the snapshot, whose build flushed it, is the most it can lose), and openraft re-applies
//!   the log from there.
//! - `stall-fsync`: not a weakness either but a disk fault: SIGUSR2 makes every Raft log fsync
//!   of the next 3 seconds wait until they are over, as a hung disk would, to exercise the
//!   disk watchdog (`handover.rs`).
//! - `forge-sender`: a lying node. It stamps each send with the name the connection's hello
//!   claimed instead of the name its login proved, so one user's messages reach the log under
//!   another's name; readers must show them as not signed by that name.

use std::fmt;

/// Which deliberately broken modes are on. The default is none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Weaken {
    /// Apply retried sends again (break exactly-once).
    pub skip_dedup: bool,
    /// Acknowledge log appends before (and without) fdatasync.
    pub ack_before_fsync: bool,
    /// WAL on `FaultyFs`; SIGUSR1 simulates a power failure.
    pub faulty_fs: bool,
    /// SIGUSR2 stalls the log's fsyncs for 3 s.
    pub stall_fsync: bool,
    /// Stamp sends with the hello's claimed name, not the logged-in one.
    pub forge_sender: bool,
}

/// How long a SIGUSR2 stalls the log's fsyncs in mode `stall-fsync`.
#[cfg(feature = "weaken")]
const STALL: std::time::Duration = std::time::Duration::from_secs(3);

/// Whether this build can be weakened at all (cargo feature `weaken`).
pub const AVAILABLE: bool = cfg!(feature = "weaken");

/// The mode names `parse` accepts.
pub const MODES: [&str; 5] = [
    "skip-dedup",
    "ack-before-fsync",
    "faulty-fs",
    "stall-fsync",
    "forge-sender",
];

/// File in the data dir that a simulated power failure leaves behind; the next start rolls
/// the chat state back to its snapshot and removes it.
pub const POWER_FAILED_FILE: &str = "power-failed";

impl Weaken {
    /// Parses a comma-separated list of mode names (empty: none).
    ///
    /// # Errors
    /// An unknown name, or any name when the binary was built without feature `weaken`.
    pub fn parse(list: &str) -> Result<Weaken, String> {
        let mut weaken = Weaken::default();
        for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match name {
                "skip-dedup" => weaken.skip_dedup = true,
                "ack-before-fsync" => weaken.ack_before_fsync = true,
                "faulty-fs" => weaken.faulty_fs = true,
                "stall-fsync" => weaken.stall_fsync = true,
                "forge-sender" => weaken.forge_sender = true,
                other => {
                    return Err(format!(
                        "unknown weaken mode {other:?}; known: {}",
                        MODES.join(",")
                    ))
                }
            }
        }
        weaken.check_available()?;
        Ok(weaken)
    }

    /// Whether any mode is on.
    pub fn any(&self) -> bool {
        self.skip_dedup
            || self.ack_before_fsync
            || self.faulty_fs
            || self.stall_fsync
            || self.forge_sender
    }

    /// # Errors
    /// A mode is on but the binary was built without feature `weaken`.
    pub fn check_available(&self) -> Result<(), String> {
        if self.any() && !AVAILABLE {
            return Err(format!(
                "--weaken {self} needs a server built with the cargo feature `weaken` (a test-only \
                 build that breaks guarantees on purpose); this binary has none: drop the flag \
                 and CELLCHAT_WEAKEN"
            ));
        }
        Ok(())
    }
}

impl fmt::Display for Weaken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on = [
            self.skip_dedup,
            self.ack_before_fsync,
            self.faulty_fs,
            self.stall_fsync,
            self.forge_sender,
        ];
        let names: Vec<&str> = MODES
            .iter()
            .zip(on)
            .filter_map(|(name, on)| on.then_some(*name))
            .collect();
        f.write_str(&names.join(","))
    }
}

/// Waits for SIGUSR2 (each time), then stalls the log's fsyncs for [`STALL`]
/// (mode `stall-fsync`, feature `weaken` only).
#[cfg(feature = "weaken")]
pub(crate) fn spawn_stall_trigger(watch: crate::log_store::SyncWatch) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut usr2 = signal(SignalKind::user_defined2())?;
    tokio::spawn(async move {
        while usr2.recv().await.is_some() {
            tracing::warn!(
                secs = STALL.as_secs(),
                "weaken: stalling every raft log fsync"
            );
            watch.stall_until(tokio::time::Instant::now() + STALL);
        }
    });
    Ok(())
}

/// The power-failure simulation behind the `faulty-fs` mode (feature `weaken` only).
#[cfg(feature = "weaken")]
pub(crate) mod power {
    use std::path::Path;
    use std::sync::Arc;

    use raft_log::{FaultyFs, Tear};

    use super::POWER_FAILED_FILE;
    use crate::state_machine::StateMachine;

    /// If the previous run ended in a simulated power failure, rolls the chat state back to its
    /// snapshot (or to empty when there is none) before anything reads it, then removes the
    /// marker. Applied batches are only certain to be on disk once a snapshot is built, so
    /// this is the oldest state a real power failure could leave; the log (whose un-fsynced bytes the failure
    /// dropped) is re-applied on top by openraft.
    ///
    /// # Errors
    /// A sentence naming what could not be read, removed or installed.
    pub(crate) fn roll_back_if_power_failed(sm_dir: &Path, data_dir: &Path) -> Result<(), String> {
        let marker = data_dir.join(POWER_FAILED_FILE);
        if !marker.exists() {
            return Ok(());
        }
        let snapshot = sm_dir
            .join("snapshots")
            .join(crate::state_machine::CURRENT_SNAPSHOT);
        if snapshot.exists() {
            let sm = StateMachine::open(sm_dir).map_err(|e| e.to_string())?;
            sm.chat()
                .install_snapshot(&snapshot)
                .map_err(|e| format!("rolling back to {}: {e}", snapshot.display()))?;
        } else {
            let chat = sm_dir.join("chat");
            if chat.exists() {
                std::fs::remove_dir_all(&chat)
                    .map_err(|e| format!("removing {}: {e}", chat.display()))?;
            }
        }
        tracing::warn!(
            snapshot = snapshot.exists(),
            "weaken: simulated power failure in the last run; chat state rolled back to its \
             snapshot (to empty when there is none)"
        );
        std::fs::remove_file(&marker).map_err(|e| format!("removing {}: {e}", marker.display()))
    }

    /// Waits for SIGUSR1, then simulates a power failure: drops every WAL byte no fsync made
    /// durable (tearing each file's first un-synced write), leaves the marker for the next
    /// start, and aborts without any orderly shutdown.
    pub(crate) fn spawn_trigger(fs: Arc<FaultyFs>, data_dir: &Path) -> std::io::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut usr1 = signal(SignalKind::user_defined1())?;
        let marker = data_dir.join(POWER_FAILED_FILE);
        tokio::spawn(async move {
            if usr1.recv().await.is_none() {
                return;
            }
            // The marker first: a crash between the two only rolls the chat state back without
            // a log loss, which a real power failure may also do.
            if let Err(e) = write_marker(&marker) {
                tracing::error!(error = %e, "weaken: cannot write the power-failure marker");
            }
            let result = fs.power_fail(Tear::Prefix(rand::random()));
            eprintln!("weaken: simulated power failure ({result:?}); aborting");
            std::process::abort();
        });
        Ok(())
    }

    fn write_marker(path: &Path) -> std::io::Result<()> {
        let file = std::fs::File::create(path)?;
        file.sync_all()?;
        std::fs::File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_names_and_refusals() {
        assert_eq!(Weaken::parse(""), Ok(Weaken::default()));
        assert!(Weaken::parse("skip-dedupe")
            .unwrap_err()
            .contains("unknown weaken mode"));
        let parsed = Weaken::parse("skip-dedup, ack-before-fsync");
        if AVAILABLE {
            let w = parsed.expect("feature on");
            assert!(w.skip_dedup && w.ack_before_fsync && !w.faulty_fs);
            assert_eq!(w.to_string(), "skip-dedup,ack-before-fsync");
        } else {
            assert!(parsed.unwrap_err().contains("feature `weaken`"));
        }
    }
}
