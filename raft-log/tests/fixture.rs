//! Format fixtures: `testdata/v1/` holds a log written by format version 1 (two segments, a
//! purge point, vote and committed). It must keep reading after any format change. The ignored
//! test regenerates it: `cargo test -p raft-log --test fixture -- --ignored regenerate`.

use raft_log::{Config, Durability, LogIndex, Wal};
use std::path::{Path, PathBuf};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/v1")
}

fn payload(index: u64) -> Vec<u8> {
    format!("entry {index} ").repeat(12).into_bytes()
}

fn config(dir: &Path) -> Config {
    let mut config = Config::new(dir);
    config.segment_bytes_max = 4096;
    config
}

#[test]
#[ignore = "rewrites the checked-in fixture"]
fn regenerate_fixture_v1() {
    let dir = fixture_dir();
    let _ = std::fs::remove_dir_all(&dir); // Absent on first generation; anything else fails below.
    let wal = Wal::open(config(&dir)).expect("open");
    let payloads: Vec<Vec<u8>> = (0..40).map(payload).collect();
    wal.append(LogIndex(0), &payloads[..20], Durability::Sync)
        .expect("append");
    wal.append(LogIndex(20), &payloads[20..], Durability::Sync)
        .expect("append");
    wal.purge_through(LogIndex(4)).expect("purge");
    wal.save_vote(b"vote-v1").expect("vote");
    wal.save_committed(b"committed-v1").expect("committed");
    wal.close().expect("close");
}

#[test]
fn fixture_v1_reads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(fixture_dir()).expect("fixture exists") {
        let path = entry.expect("entry").path();
        names.push(path.file_name().expect("name").to_owned());
        std::fs::copy(&path, dir.path().join(path.file_name().expect("name"))).expect("copy");
    }
    assert!(
        names.len() >= 5,
        "two segments and three meta files: {names:?}"
    );
    let wal = Wal::open(config(dir.path())).expect("open fixture");
    assert_eq!(wal.purged_through(), Some(LogIndex(4)));
    // The purge point of a build from before purge payloads carries none.
    assert_eq!(
        wal.purged(),
        Some(raft_log::PurgePoint {
            index: LogIndex(4),
            payload: None
        })
    );
    assert_eq!(wal.first_index(), Some(LogIndex(5)));
    assert_eq!(wal.last_index(), Some(LogIndex(39)));
    let entries = wal.read(LogIndex(0), LogIndex(100)).expect("read");
    let expected: Vec<(LogIndex, Vec<u8>)> = (5..40).map(|i| (LogIndex(i), payload(i))).collect();
    assert_eq!(entries, expected);
    assert_eq!(wal.vote(), Some(b"vote-v1".to_vec()));
    assert_eq!(wal.committed(), Some(b"committed-v1".to_vec()));
    // The old vote file moved into the vote slots, and a later vote lands there.
    assert!(!dir.path().join("vote.meta").exists());
    assert!(dir.path().join("vote.slots").exists());
    wal.save_vote(b"vote-after").expect("vote");
    drop(wal);
    let wal = Wal::open(config(dir.path())).expect("reopen");
    assert_eq!(wal.vote(), Some(b"vote-after".to_vec()));
}
