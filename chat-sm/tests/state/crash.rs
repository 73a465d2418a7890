//! Crash tests: a child process (this test binary, run again) applies a log and aborts
//! without closing RocksDB, as kill -9 would stop a node; the parent reopens the directory.
//! Applied batches skip RocksDB's WAL, so the crash loses every batch after the last flush.
//! The state must be a whole prefix of the log that reaches at least the last snapshot (whose
//! build flushed), and re-applying the rest, as openraft does at startup, must give the state
//! of a replica that never crashed.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command as Process;

use chat_sm::{ChatState, Config, LogIndex};

use crate::common::{apply_log, sample_log, Replica};

/// Set in the child: the directory it applies into.
const CHILD_DIR_ENV: &str = "CHAT_SM_CRASH_CHILD_DIR";

const SIGABRT: i32 = 6;

/// Entries the child applies in all, and the index after which it builds a snapshot.
const LOG_LEN: u64 = 1_200;
const SNAPSHOT_AT: u64 = 500;

fn open(dir: &Path) -> ChatState {
    ChatState::open(Config::new(dir)).expect("open")
}

/// In the child: applies the log with a snapshot on the way, then aborts.
fn child(dir: &Path) -> ! {
    let log = sample_log(LOG_LEN);
    let state = open(&dir.join("sm"));
    let split = SNAPSHOT_AT as usize;
    apply_log(&state, &log[..split], 1, &[3, 1, 5]);
    state
        .build_snapshot(&dir.join("snap.bin"))
        .expect("build snapshot");
    apply_log(&state, &log[split..], SNAPSHOT_AT + 1, &[2, 7]);
    std::process::abort();
}

#[test]
fn a_crash_keeps_a_whole_prefix_no_older_than_the_snapshot() {
    if let Some(dir) = std::env::var_os(CHILD_DIR_ENV) {
        child(Path::new(&dir));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let child = Process::new(std::env::current_exe().expect("test binary"))
        .args([
            "crash::a_crash_keeps_a_whole_prefix_no_older_than_the_snapshot",
            "--exact",
            "--test-threads=1",
        ])
        .env(CHILD_DIR_ENV, dir.path())
        .output()
        .expect("run the child");
    assert_eq!(
        child.status.signal(),
        Some(SIGABRT),
        "the child aborts: {}\n{}",
        child.status,
        String::from_utf8_lossy(&child.stderr)
    );
    assert!(
        dir.path().join("snap.bin").exists(),
        "the child built its snapshot"
    );

    let log = sample_log(LOG_LEN);
    let state = open(&dir.path().join("sm"));
    state
        .check_consistency()
        .expect("consistent after the crash");
    let kept = state.applied_index().map_or(0, |i| i.0);
    assert!(
        (SNAPSHOT_AT..=LOG_LEN).contains(&kept),
        "the crash kept {kept} entries; the snapshot at {SNAPSHOT_AT} must survive"
    );
    let reference = Replica::new(chat_sm::Config::new(dir.path()).ring_len);
    apply_log(reference.state(), &log[..kept as usize], 1, &[4]);
    assert_eq!(
        state.dump().expect("dump"),
        reference.dump(),
        "the kept state is the log's prefix through {kept}"
    );

    // Startup re-applies the rest of the log; the result is what an uncrashed replica has.
    apply_log(&state, &log[kept as usize..], kept + 1, &[5]);
    apply_log(reference.state(), &log[kept as usize..], kept + 1, &[5]);
    assert_eq!(state.applied_index(), Some(LogIndex(LOG_LEN)));
    assert_eq!(state.dump().expect("dump"), reference.dump());
    state
        .check_consistency()
        .expect("consistent after re-applying");
}
