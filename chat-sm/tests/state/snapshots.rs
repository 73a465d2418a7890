//! Snapshot tests: build, verify, install, refuse damaged files, and build while applying.

use std::thread;

use chat_sm::{read_snapshot_info, ChannelSeq, Command, Error, JoinSecret, LogIndex};

use crate::common::{apply_log, sample_log, Replica, TestEntry};

#[test]
fn snapshot_install_equals_source_and_survives_restart() {
    let src = Replica::new(8);
    apply_log(src.state(), &sample_log(40), 1, &[3]);
    let path = src.dir.path().join("snap.bin");
    let built = src.state().build_snapshot(&path).expect("build");
    assert_eq!(built.applied_index, Some(LogIndex(40)));
    assert_eq!(built.membership, Some(vec![36]));
    assert_eq!(built.bytes, std::fs::metadata(&path).expect("stat").len());
    assert_eq!(read_snapshot_info(&path).expect("verify"), built);

    let mut dst = Replica::new(8);
    apply_log(dst.state(), &sample_log(7), 1, &[2]); // some state to be replaced
    let installed = dst.state().install_snapshot(&path).expect("install");
    assert_eq!(installed, built);
    assert_eq!(dst.dump(), src.dump());
    dst.state().check_consistency().expect("consistent");
    assert_eq!(dst.state().applied_index(), Some(LogIndex(40)));
    dst.restart();
    assert_eq!(dst.dump(), src.dump());
    dst.state()
        .check_consistency()
        .expect("consistent after restart");
    // The old RocksDB directory is gone: only ACTIVE and one db-* remain.
    let mut names: Vec<_> = std::fs::read_dir(dst.dir.path())
        .expect("ls")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec!["ACTIVE".to_string(), "db-00000000000000000002".into()]
    );
}

#[test]
fn the_join_secret_travels_in_snapshots_and_never_shows_in_a_dump() {
    let src = Replica::new(8);
    let secret = JoinSecret(b"0123456789abcdef-secret".to_vec());
    let mut log = sample_log(6);
    log.push(TestEntry::Cmd(Command::SetJoinSecret(secret.clone())));
    apply_log(src.state(), &log, 1, &[2]);
    assert_eq!(src.state().join_secret(), Some(secret.0.clone()));
    let path = src.dir.path().join("snap.bin");
    src.state().build_snapshot(&path).expect("build");

    let mut dst = Replica::new(8);
    assert_eq!(dst.state().join_secret(), None);
    dst.state().install_snapshot(&path).expect("install");
    assert_eq!(dst.state().join_secret(), Some(secret.0.clone()));
    dst.restart();
    assert_eq!(dst.state().join_secret(), Some(secret.0.clone()));
    let dump = dst.dump();
    assert!(dump.contains("meta join_secret crc="), "{dump}");
    assert!(
        !dump.contains(&hex(&secret.0)) && !dump.contains("0123456789"),
        "{dump}"
    );
    assert_eq!(dump, src.dump());
    assert!(!format!("{:?}", Command::SetJoinSecret(secret)).contains("0123"));
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn damaged_snapshot_is_refused_and_state_unchanged() {
    let src = Replica::new(8);
    apply_log(src.state(), &sample_log(12), 1, &[4]);
    let path = src.dir.path().join("snap.bin");
    src.state().build_snapshot(&path).expect("build");
    let good = std::fs::read(&path).expect("read");

    let dst = Replica::new(8);
    apply_log(dst.state(), &sample_log(3), 1, &[1]);
    let before = dst.dump();
    let bad = src.dir.path().join("bad.bin");
    let mut variants: Vec<Vec<u8>> = vec![Vec::new(), good[..good.len() - 1].to_vec()];
    variants.push(good[..good.len() / 2].to_vec());
    let mut extra = good.clone();
    extra.push(0);
    variants.push(extra);
    for at in [
        0,
        8,
        9,
        10,
        20,
        good.len() / 2,
        good.len() - 13,
        good.len() - 5,
        good.len() - 1,
    ] {
        let mut flipped = good.clone();
        flipped[at] ^= 0x10;
        variants.push(flipped);
    }
    for bytes in variants {
        std::fs::write(&bad, &bytes).expect("write");
        assert!(read_snapshot_info(&bad).is_err());
        let err = dst.state().install_snapshot(&bad).expect_err("must refuse");
        assert!(
            matches!(
                err,
                Error::SnapshotCorrupt { .. } | Error::UnsupportedVersion { .. }
            ),
            "{err}"
        );
        assert_eq!(dst.dump(), before);
        dst.state().check_consistency().expect("consistent");
    }
}

#[test]
fn snapshot_built_while_applying_is_a_consistent_prefix() {
    let src = Replica::new(16);
    let log = sample_log(300);
    let path = src.dir.path().join("snap.bin");
    let info = thread::scope(|s| {
        let applier = s.spawn(|| apply_log(src.state(), &log, 1, &[2]));
        let mut info = None;
        // Build until a snapshot lands strictly inside the run (bounded attempts).
        for _ in 0..50 {
            let built = src.state().build_snapshot(&path).expect("build");
            let done = applier.is_finished();
            info = Some(built);
            if done {
                break;
            }
        }
        applier.join().expect("applier");
        info.expect("built at least once")
    });
    let index = info.applied_index.map_or(0, |i| i.0);
    let dst = Replica::new(16);
    dst.state().install_snapshot(&path).expect("install");
    dst.state().check_consistency().expect("consistent");
    let reference = Replica::new(16);
    apply_log(reference.state(), &log[..index as usize], 1, &[2]);
    // Chunk boundaries differ, so compare everything but `last_applied`, which the fake
    // adapter derives from the chunk's last index; both end at `index`.
    assert_eq!(dst.dump(), reference.dump());
    // The replica catches up from the snapshot with the rest of the log.
    apply_log(dst.state(), &log[index as usize..], index + 1, &[2]);
    assert_eq!(dst.dump(), src.dump());
    assert_eq!(dst.state().head("a"), src.state().head("a"));
    assert!(src.state().head("a") > ChannelSeq(0));
}
