//! Durability under `FaultyFs`: group commit from several threads survives a power failure;
//! vote and committed round-trip across reopen and crash; purge and truncate survive a crash;
//! a crash between writing the purge point (with its payload) and removing segments finishes
//! the purge at open, and a crash while writing it keeps the previous one; a failed fsync
//! panics (never retried), wherever it happens, segment preparation and meta files included;
//! a failed write poisons the `Wal`. In a segment made
//! from a preallocated (zero-filled) file, unsynced overwrites are lost or torn to a prefix, and
//! a `truncate_from` followed by a shorter unsynced rewrite never brings the cut entries back.
#![cfg(feature = "testing")]

use parking_lot::Mutex;
use raft_log::{Config, Durability, Error, FaultyFs, LogIndex, PurgePoint, Tear, Wal};
use std::path::Path;
use std::sync::Arc;

fn config(dir: &Path) -> Config {
    let mut config = Config::new(dir);
    config.segment_bytes_max = 4096;
    config
}

fn open(dir: &Path, fs: &Arc<FaultyFs>) -> Wal {
    Wal::open_with_fs(config(dir), fs.clone()).expect("open")
}

fn crash_and_reopen(dir: &Path, fs: &Arc<FaultyFs>, tear: Tear) -> Wal {
    fs.power_fail(tear).expect("power_fail");
    open(dir, &Arc::new(FaultyFs::new()))
}

#[test]
fn group_commit_entries_survive_power_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = Arc::new(FaultyFs::new());
    let wal = Arc::new(open(dir.path(), &fs));
    let next = Arc::new(Mutex::new(1u64));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (wal, next) = (wal.clone(), next.clone());
            std::thread::spawn(move || {
                for i in 0..50u64 {
                    {
                        // Contiguity needs one writer at a time to pick the index.
                        let mut next = next.lock();
                        let payload = format!("t{t} i{i} at {}", *next);
                        wal.append(LogIndex(*next), &[payload], Durability::Buffered)
                            .expect("append");
                        *next += 1;
                    }
                    wal.sync().expect("sync");
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("thread");
    }
    let stats = wal.stats();
    assert_eq!(stats.appends, 200);
    assert!(stats.fsyncs >= 1 && stats.fsyncs <= 200 + 200, "{stats:?}");
    let before = wal.read(LogIndex(0), LogIndex(u64::MAX)).expect("read");
    drop(wal);
    let wal = crash_and_reopen(dir.path(), &fs, Tear::Prefix(7));
    assert_eq!(
        wal.read(LogIndex(0), LogIndex(u64::MAX)).expect("read"),
        before
    );
    assert_eq!(wal.last_index(), Some(LogIndex(200)));
}

#[test]
fn concurrent_sync_calls_share_fsyncs_and_are_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = Arc::new(FaultyFs::new());
    let wal = Arc::new(open(dir.path(), &fs));
    let next = Arc::new(Mutex::new(0u64));
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let (wal, next) = (wal.clone(), next.clone());
            std::thread::spawn(move || {
                for _ in 0..40 {
                    let mut guard = next.lock();
                    let index = *guard;
                    *guard += 1;
                    // Write under the index lock; wait for durability outside it, so several
                    // threads' sync() calls can share one fsync.
                    wal.append(LogIndex(index), &[[index as u8; 100]], Durability::Buffered)
                        .expect("append");
                    drop(guard);
                    wal.sync().expect("sync");
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("thread");
    }
    drop(wal);
    let wal = crash_and_reopen(dir.path(), &fs, Tear::None);
    assert_eq!(wal.next_index(), LogIndex(120));
}

#[test]
fn unsynced_appends_are_lost_on_power_failure_synced_ones_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = Arc::new(FaultyFs::new());
    let wal = open(dir.path(), &fs);
    wal.append(LogIndex(1), &[b"one", b"two"], Durability::Sync)
        .expect("append");
    wal.append(LogIndex(3), &[b"three"], Durability::Buffered)
        .expect("append");
    drop(wal);
    let wal = crash_and_reopen(dir.path(), &fs, Tear::None);
    assert_eq!(wal.last_index(), Some(LogIndex(2)));
    assert_eq!(
        wal.read(LogIndex(2), LogIndex(3)).expect("read"),
        vec![(LogIndex(2), b"two".to_vec())]
    );
}

#[test]
fn vote_and_committed_round_trip_across_reopen_and_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = Arc::new(FaultyFs::new());
    let wal = open(dir.path(), &fs);
    assert_eq!(wal.vote(), None);
    assert_eq!(wal.committed(), None);
    wal.save_vote(b"term 3 node 2").expect("vote");
    wal.save_committed(b"commit 10").expect("committed");
    wal.close().expect("close");
    let wal = open(dir.path(), &fs);
    assert_eq!(wal.vote(), Some(b"term 3 node 2".to_vec()));
    assert_eq!(wal.committed(), Some(b"commit 10".to_vec()));
    wal.save_vote(b"term 4 node 1").expect("vote");
    wal.save_committed(b"commit 12").expect("committed");
    drop(wal);
    let wal = crash_and_reopen(dir.path(), &fs, Tear::None);
    assert_eq!(
        wal.vote(),
        Some(b"term 4 node 1".to_vec()),
        "vote is durable"
    );
    // Committed is buffered: after a crash it may be the older value (or None), never newer.
    let committed = wal.committed();
    assert!(
        committed.is_none()
            || committed == Some(b"commit 10".to_vec())
            || committed == Some(b"commit 12".to_vec()),
        "{committed:?}"
    );
}

#[test]
fn corrupt_committed_reads_as_none_and_corrupt_vote_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(config(dir.path())).expect("open");
    wal.save_vote(b"vote").expect("vote");
    wal.save_committed(b"committed").expect("committed");
    wal.close().expect("close");
    let committed = dir.path().join("committed.meta");
    let mut bytes = std::fs::read(&committed).expect("read");
    bytes[22] ^= 1;
    std::fs::write(&committed, &bytes).expect("write");
    let wal = Wal::open(config(dir.path())).expect("open with bad committed");
    assert_eq!(wal.committed(), None);
    assert_eq!(wal.vote(), Some(b"vote".to_vec()));
    drop(wal);
    // The vote sits in one of two slots of `vote.slots`; damage to both is corruption.
    let vote = dir.path().join("vote.slots");
    let mut bytes = std::fs::read(&vote).expect("read");
    bytes[21] ^= 1;
    bytes[512 + 21] ^= 1;
    std::fs::write(&vote, &bytes).expect("write");
    match Wal::open(config(dir.path())) {
        Err(Error::Corrupt { segment, .. }) => assert_eq!(segment, vote),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn a_damaged_vote_slot_falls_back_to_the_other_and_saves_alternate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(config(dir.path())).expect("open");
    wal.save_vote(b"first").expect("vote"); // slot 1
    wal.save_vote(b"second").expect("vote"); // slot 0
    wal.save_vote(b"third").expect("vote"); // slot 1
    drop(wal);
    let vote = dir.path().join("vote.slots");
    assert_eq!(std::fs::metadata(&vote).expect("stat").len(), 1024);
    let mut bytes = std::fs::read(&vote).expect("read");
    // Tear the newest slot, as a crash during its write would.
    bytes[512 + 30] ^= 0xff;
    std::fs::write(&vote, &bytes).expect("write");
    let wal = Wal::open(config(dir.path())).expect("open with one torn slot");
    assert_eq!(wal.vote(), Some(b"second".to_vec()));
    wal.save_vote(b"fourth").expect("vote");
    drop(wal);
    let wal = Wal::open(config(dir.path())).expect("reopen");
    assert_eq!(wal.vote(), Some(b"fourth".to_vec()));
}

#[test]
fn a_vote_save_cut_by_power_failure_leaves_the_previous_vote_or_the_new_one() {
    for seed in 0..40 {
        let dir = tempfile::tempdir().expect("tempdir");
        let fs = Arc::new(FaultyFs::new());
        let wal = open(dir.path(), &fs);
        wal.save_vote(b"term 7 node 1 committed").expect("vote");
        wal.save_vote(b"term 8 node 2").expect("vote");
        fs.fail_sync("meta::sync::fault");
        let cut = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wal.save_vote(b"term 9 node 3, never acknowledged")
        }));
        assert!(cut.is_err(), "a failed vote fsync panics");
        drop(wal);
        let wal = crash_and_reopen(dir.path(), &fs, Tear::Prefix(seed));
        let vote = wal.vote();
        assert!(
            vote == Some(b"term 8 node 2".to_vec())
                || vote == Some(b"term 9 node 3, never acknowledged".to_vec()),
            "seed {seed}: {vote:?}"
        );
    }
}

#[test]
fn a_vote_too_large_for_a_slot_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(config(dir.path())).expect("open");
    wal.save_vote(b"small").expect("vote");
    assert!(matches!(wal.save_vote(&[7u8; 600]), Err(Error::Io { .. })));
    assert_eq!(wal.vote(), Some(b"small".to_vec()));
    drop(wal);
    let wal = Wal::open(config(dir.path())).expect("reopen");
    assert_eq!(wal.vote(), Some(b"small".to_vec()));
}

#[test]
fn purge_beyond_last_survives_crash_and_next_append_follows_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = Arc::new(FaultyFs::new());
    let wal = open(dir.path(), &fs);
    wal.append(LogIndex(0), &[b"a", b"b", b"c"], Durability::Sync)
        .expect("append");
    wal.purge_through(LogIndex(100)).expect("purge");
    assert_eq!(wal.first_index(), None);
    assert_eq!(wal.next_index(), LogIndex(101));
    wal.purge_through(LogIndex(50))
        .expect("re-purge below is a no-op");
    assert_eq!(wal.purged_through(), Some(LogIndex(100)));
    drop(wal);
    let wal = crash_and_reopen(dir.path(), &fs, Tear::None);
    assert_eq!(wal.purged_through(), Some(LogIndex(100)));
    assert_eq!(wal.next_index(), LogIndex(101));
    let err = wal
        .append(LogIndex(0), &[b"x"], Durability::Sync)
        .expect_err("must follow purge");
    assert!(matches!(
        err,
        Error::NonContiguous {
            expected: LogIndex(101),
            ..
        }
    ));
    wal.append(LogIndex(101), &[b"x"], Durability::Sync)
        .expect("append");
    assert_eq!(
        wal.read(LogIndex(0), LogIndex(200)).expect("read"),
        vec![(LogIndex(101), b"x".to_vec())]
    );
}

fn segment_files(dir: &Path) -> Vec<u64> {
    let mut firsts: Vec<u64> = std::fs::read_dir(dir)
        .expect("read_dir")
        .filter_map(|e| {
            let name = e.expect("entry").file_name().into_string().ok()?;
            name.strip_suffix(".seg")?.parse().ok()
        })
        .collect();
    firsts.sort();
    firsts
}

/// Sixty 300-byte entries from index 1, one append each, about a dozen per 4 KiB segment.
fn append_sixty(wal: &Wal) -> Vec<Vec<u8>> {
    let payloads: Vec<Vec<u8>> = (0..60).map(|i| vec![i as u8; 300]).collect();
    for (i, payload) in payloads.iter().enumerate() {
        wal.append(LogIndex(i as u64 + 1), &[payload], Durability::Sync)
            .expect("append");
    }
    payloads
}

#[test]
fn crash_between_purge_point_and_segment_removal_finishes_the_purge_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = Arc::new(FaultyFs::new());
    let wal = open(dir.path(), &fs);
    let payloads = append_sixty(&wal);
    let before = segment_files(dir.path());
    assert!(before.len() >= 4, "{before:?}");
    // The purge point reaches the disk, then the first removal fails and the power goes.
    fs.fail_remove("segment::remove::fault");
    let err = wal
        .purge_through_with(LogIndex(40), b"log id 40")
        .expect_err("removal fails");
    assert!(
        matches!(
            &err,
            Error::Io {
                op: "remove purged segment",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(segment_files(dir.path()), before, "nothing removed yet");
    drop(wal);
    let wal = crash_and_reopen(dir.path(), &fs, Tear::None);
    assert_eq!(
        wal.purged(),
        Some(PurgePoint {
            index: LogIndex(40),
            payload: Some(b"log id 40".to_vec()),
        })
    );
    assert_eq!(wal.first_index(), Some(LogIndex(41)));
    let after = segment_files(dir.path());
    assert!(
        after.len() < before.len() && after[0] <= 41,
        "open removed the purged segments: {before:?} -> {after:?}"
    );
    let entries = wal.read(LogIndex(0), LogIndex(100)).expect("read");
    assert_eq!(entries.first().map(|e| e.0), Some(LogIndex(41)));
    assert_eq!(entries.len(), 20);
    assert!(entries
        .iter()
        .all(|(i, p)| *p == payloads[i.0 as usize - 1]));
}

#[test]
fn crash_while_writing_the_purge_point_keeps_the_previous_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = Arc::new(FaultyFs::new());
    let wal = open(dir.path(), &fs);
    append_sixty(&wal);
    wal.purge_through_with(LogIndex(5), b"log id 5")
        .expect("purge");
    let before = segment_files(dir.path());
    fs.fail_write_after("meta::write::fault", 11);
    let err = wal
        .purge_through_with(LogIndex(40), b"log id 40")
        .expect_err("write fails");
    assert!(
        matches!(
            &err,
            Error::Io {
                op: "write file",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(segment_files(dir.path()), before, "nothing removed");
    assert_eq!(wal.purged_through(), Some(LogIndex(5)));
    drop(wal);
    let wal = crash_and_reopen(dir.path(), &fs, Tear::Prefix(3));
    assert_eq!(
        wal.purged(),
        Some(PurgePoint {
            index: LogIndex(5),
            payload: Some(b"log id 5".to_vec()),
        })
    );
    assert_eq!(wal.first_index(), Some(LogIndex(6)));
    assert_eq!(wal.last_index(), Some(LogIndex(60)));
}

#[test]
#[should_panic(expected = "fsync")]
fn failed_purge_point_fsync_panics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = Arc::new(FaultyFs::new());
    let wal = open(dir.path(), &fs);
    append_sixty(&wal);
    fs.fail_sync("meta::sync::fault");
    let _never = wal.purge_through_with(LogIndex(40), b"log id 40");
}

#[test]
#[should_panic(expected = "fsync")]
fn failed_purge_point_directory_fsync_panics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = Arc::new(FaultyFs::new());
    let wal = open(dir.path(), &fs);
    append_sixty(&wal);
    fs.fail_sync("dir::sync::fault");
    let _never = wal.purge_through(LogIndex(40));
}

/// A failed fsync while a segment is zero-filled in the background stops the node like any
/// other failed fsync: the rotation that takes the prepared file passes the panic on.
#[test]
#[should_panic(expected = "fsync")]
fn failed_fsync_while_preparing_a_segment_panics_at_rotation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = Arc::new(FaultyFs::new());
    fs.fail_sync("prepare::sync::fault");
    let wal = open(dir.path(), &fs);
    for i in 1..=60u64 {
        wal.append(LogIndex(i), &[[0u8; 300]], Durability::Sync)
            .expect("append");
    }
}

#[test]
fn truncate_from_survives_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = Arc::new(FaultyFs::new());
    let wal = open(dir.path(), &fs);
    let payloads: Vec<Vec<u8>> = (0..60).map(|i| vec![i as u8; 300]).collect();
    wal.append(LogIndex(1), &payloads[..30], Durability::Sync)
        .expect("append");
    wal.append(LogIndex(31), &payloads[30..], Durability::Sync)
        .expect("append");
    wal.truncate_from(LogIndex(10)).expect("truncate");
    wal.append(LogIndex(10), &[b"new"], Durability::Buffered)
        .expect("append");
    drop(wal);
    let wal = crash_and_reopen(dir.path(), &fs, Tear::None);
    assert_eq!(wal.last_index(), Some(LogIndex(9)));
    assert_eq!(
        wal.read(LogIndex(9), LogIndex(10)).expect("read")[0].1,
        payloads[8]
    );
}

#[test]
#[should_panic(expected = "fsync")]
fn failed_fsync_panics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = Arc::new(FaultyFs::new());
    let wal = open(dir.path(), &fs);
    wal.append(LogIndex(1), &[b"ok"], Durability::Sync)
        .expect("append");
    fs.fail_sync("segment::sync::fault");
    let _never = wal.append(LogIndex(2), &[b"lost"], Durability::Sync);
}

#[test]
#[should_panic(expected = "fsync")]
fn failed_vote_fsync_panics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = Arc::new(FaultyFs::new());
    let wal = open(dir.path(), &fs);
    fs.fail_sync("meta::sync::fault");
    let _never = wal.save_vote(b"vote");
}

#[test]
fn failed_write_poisons_and_reopen_recovers_prefix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = Arc::new(FaultyFs::new());
    let wal = open(dir.path(), &fs);
    wal.append(LogIndex(1), &[b"one"], Durability::Sync)
        .expect("append");
    fs.fail_write_after("segment::append::fault", 10);
    let err = wal
        .append(LogIndex(2), &[[2u8; 100], [3u8; 100]], Durability::Sync)
        .expect_err("fault");
    assert!(matches!(err, Error::Io { op: "append", .. }), "{err}");
    assert!(matches!(
        wal.read(LogIndex(1), LogIndex(2)),
        Err(Error::Poisoned)
    ));
    drop(wal);
    fs.clear_faults();
    let wal = open(dir.path(), &fs);
    assert_eq!(
        wal.read(LogIndex(0), LogIndex(10)).expect("read"),
        vec![(LogIndex(1), b"one".to_vec())]
    );
}

/// Appends until the log has rotated into a segment made from a prepared, zero-filled file,
/// and returns the path of that active segment.
fn fill_into_preallocated_segment(dir: &Path, wal: &Wal) -> std::path::PathBuf {
    let mut next = wal.next_index().0.max(1);
    loop {
        wal.append(LogIndex(next), &[vec![next as u8; 500]], Durability::Sync)
            .expect("append");
        next += 1;
        let mut segments: Vec<_> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "seg"))
            .collect();
        segments.sort();
        let newest = segments.pop().expect("a segment");
        let len = std::fs::metadata(&newest).expect("stat").len();
        if segments.len() >= 2 && len == 4096 {
            return newest;
        }
        assert!(next < 100, "no preallocated segment after {next} appends");
    }
}

#[test]
fn unsynced_overwrites_of_preallocated_space_are_lost_on_power_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = Arc::new(FaultyFs::new());
    let wal = open(dir.path(), &fs);
    let active = fill_into_preallocated_segment(dir.path(), &wal);
    let durable_last = wal.last_index().expect("entries");
    let first = LogIndex(durable_last.0 + 1);
    wal.append(first, &[[7u8; 100], [8u8; 100]], Durability::Buffered)
        .expect("append");
    assert_eq!(
        std::fs::metadata(&active).expect("stat").len(),
        4096,
        "the append overwrote zeros; the file did not grow"
    );
    drop(wal);
    let wal = crash_and_reopen(dir.path(), &fs, Tear::None);
    assert_eq!(wal.last_index(), Some(durable_last));
    // The log goes on in the same preallocated segment.
    wal.append(first, &[b"after"], Durability::Sync)
        .expect("append");
    assert_eq!(std::fs::metadata(&active).expect("stat").len(), 4096);
}

#[test]
fn torn_overwrite_of_preallocated_space_recovers_a_prefix() {
    for seed in 0..40u64 {
        let dir = tempfile::tempdir().expect("tempdir");
        let fs = Arc::new(FaultyFs::new());
        let wal = open(dir.path(), &fs);
        fill_into_preallocated_segment(dir.path(), &wal);
        let before = wal.read(LogIndex(0), LogIndex(u64::MAX)).expect("read");
        let first = LogIndex(wal.last_index().expect("entries").0 + 1);
        let batch: Vec<Vec<u8>> = (0..4).map(|i| vec![i as u8 + 1; 150]).collect();
        wal.append(first, &batch, Durability::Buffered)
            .expect("append");
        drop(wal);
        let wal = crash_and_reopen(dir.path(), &fs, Tear::Prefix(seed));
        let got = wal.read(LogIndex(0), LogIndex(u64::MAX)).expect("read");
        assert!(
            got.len() >= before.len() && got.len() <= before.len() + 4,
            "seed {seed}"
        );
        assert_eq!(got[..before.len()], before[..], "seed {seed}");
        for (i, (index, payload)) in got[before.len()..].iter().enumerate() {
            assert_eq!(*index, LogIndex(first.0 + i as u64), "seed {seed}");
            assert_eq!(payload, &batch[i], "seed {seed}");
        }
    }
}

#[test]
fn truncate_inside_preallocated_segment_never_resurrects_cut_entries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = Arc::new(FaultyFs::new());
    let wal = open(dir.path(), &fs);
    let active = fill_into_preallocated_segment(dir.path(), &wal);
    let base = wal.last_index().expect("entries").0;
    let payloads: Vec<Vec<u8>> = (0..4).map(|i| vec![0xc0 + i as u8; 100]).collect();
    wal.append(LogIndex(base + 1), &payloads, Durability::Sync)
        .expect("append");
    wal.truncate_from(LogIndex(base + 2)).expect("truncate");
    // A shorter rewrite that is never synced: if the cut frames base+3.. were still on disk,
    // the crash would bring them back after the lost rewrite.
    wal.append(LogIndex(base + 2), &[b"short"], Durability::Buffered)
        .expect("append");
    drop(wal);
    let wal = crash_and_reopen(dir.path(), &fs, Tear::None);
    assert_eq!(wal.last_index(), Some(LogIndex(base + 1)));
    assert_eq!(std::fs::metadata(&active).expect("stat").len(), 4096);
}
