//! The purge point and the payload stored with it (`purged.meta`): round trip across reopen,
//! the rules for purging below, at and above the current point, the payload bound, and how open
//! treats the file's bytes: an earlier build's file (a bare u64 index, checked in below as
//! literal bytes) opens with the payload absent; a damaged file, a record shorter than its
//! index, or a record layout from a later build refuses to open with an error naming the file.

use raft_log::{Config, Durability, Error, LogIndex, PurgePoint, Wal};
use std::path::Path;

fn config(dir: &Path) -> Config {
    let mut config = Config::new(dir);
    config.segment_bytes_max = 4096;
    config
}

fn open(dir: &Path) -> Result<Wal, Error> {
    Wal::open(config(dir))
}

fn point(index: u64, payload: Option<&[u8]>) -> Option<PurgePoint> {
    Some(PurgePoint {
        index: LogIndex(index),
        payload: payload.map(<[u8]>::to_vec),
    })
}

/// `purged.meta` as every build before purge payloads wrote it, for purge point 4: meta header
/// (`CCRLMETA`, version 1, payload length 8, CRC-32/IEEE) and the index as u64 LE. These are
/// the bytes of `testdata/v1/purged.meta`.
const OLD_PURGED_META_4: [u8; 28] = [
    0x43, 0x43, 0x52, 0x4c, 0x4d, 0x45, 0x54, 0x41, // magic
    0x01, 0x00, 0x00, 0x00, // format version 1
    0x08, 0x00, 0x00, 0x00, // payload length 8
    0xc0, 0xa2, 0x95, 0xc0, // crc
    0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // purge point 4
];

/// A meta file holding `payload`, built by hand from the table in `format.rs`.
fn meta_file(payload: &[u8]) -> Vec<u8> {
    let mut bytes = b"CCRLMETA".to_vec();
    bytes.extend_from_slice(&1u32.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&bytes[8..16]);
    hasher.update(payload);
    bytes.extend_from_slice(&hasher.finalize().to_le_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

#[test]
fn meta_file_builder_matches_the_old_bytes() {
    assert_eq!(meta_file(&4u64.to_le_bytes()), OLD_PURGED_META_4);
}

#[test]
fn old_purged_meta_without_payload_opens_with_payload_absent() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("purged.meta"), OLD_PURGED_META_4).expect("write");
    let wal = open(dir.path()).expect("open an earlier build's purge point");
    assert_eq!(wal.purged(), point(4, None));
    assert_eq!(wal.purged_through(), Some(LogIndex(4)));
    assert_eq!(wal.next_index(), LogIndex(5));
    // The caller moves its payload in at the same index: only the payload changes.
    wal.purge_through_with(LogIndex(4), b"log id 4")
        .expect("store payload");
    drop(wal);
    let wal = open(dir.path()).expect("reopen");
    assert_eq!(wal.purged(), point(4, Some(b"log id 4")));
}

#[test]
fn payload_round_trips_and_follows_the_purge_point() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = open(dir.path()).expect("open");
    assert_eq!(wal.purged(), None);
    let payloads: Vec<Vec<u8>> = (0..40).map(|i| vec![i as u8; 300]).collect();
    wal.append(LogIndex(1), &payloads, Durability::Sync)
        .expect("append");
    wal.purge_through_with(LogIndex(10), b"term 3 index 10")
        .expect("purge");
    assert_eq!(wal.purged(), point(10, Some(b"term 3 index 10")));
    assert_eq!(wal.first_index(), Some(LogIndex(11)));

    // Below the purge point: a no-op, the payload stays.
    wal.purge_through_with(LogIndex(5), b"older")
        .expect("purge");
    assert_eq!(wal.purged(), point(10, Some(b"term 3 index 10")));
    // At it with the same payload: nothing to write. An empty payload is a payload.
    wal.purge_through_with(LogIndex(10), b"term 3 index 10")
        .expect("purge");
    wal.purge_through_with(LogIndex(20), b"").expect("purge");
    assert_eq!(wal.purged(), point(20, Some(b"")));
    drop(wal);

    let wal = open(dir.path()).expect("reopen");
    assert_eq!(wal.purged(), point(20, Some(b"")));
    assert_eq!(wal.first_index(), Some(LogIndex(21)));
    // The payload-free form stores the payload as absent, in the layout earlier builds read.
    wal.purge_through(LogIndex(25)).expect("purge");
    assert_eq!(wal.purged(), point(25, None));
    drop(wal);
    assert_eq!(
        std::fs::read(dir.path().join("purged.meta")).expect("read"),
        meta_file(&25u64.to_le_bytes())
    );
    assert_eq!(open(dir.path()).expect("reopen").purged(), point(25, None));
}

#[test]
fn purge_beyond_the_last_entry_keeps_the_payload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = open(dir.path()).expect("open");
    wal.append(LogIndex(0), &[b"a", b"b"], Durability::Sync)
        .expect("append");
    wal.purge_through_with(LogIndex(100), b"snapshot 100")
        .expect("purge");
    assert_eq!(wal.first_index(), None);
    assert_eq!(wal.next_index(), LogIndex(101));
    drop(wal);
    let wal = open(dir.path()).expect("reopen");
    assert_eq!(wal.purged(), point(100, Some(b"snapshot 100")));
    assert_eq!(wal.next_index(), LogIndex(101));
}

#[test]
fn payload_over_the_bound_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = open(dir.path()).expect("open");
    wal.append(LogIndex(1), &[b"a", b"b", b"c"], Durability::Sync)
        .expect("append");
    wal.purge_through_with(LogIndex(1), &[7u8; 4096])
        .expect("at the bound");
    let err = wal
        .purge_through_with(LogIndex(2), &[7u8; 4097])
        .expect_err("over the bound");
    assert!(
        matches!(
            &err,
            Error::Io {
                op: "encode purge point",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(wal.purged(), point(1, Some(&[7u8; 4096])));
    assert_eq!(wal.first_index(), Some(LogIndex(2)));
}

/// Writes `bytes` as `purged.meta` into an otherwise empty WAL directory and opens it.
fn open_with_purged_meta(bytes: &[u8]) -> (tempfile::TempDir, Result<Wal, Error>) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("purged.meta"), bytes).expect("write");
    let opened = open(dir.path());
    (dir, opened)
}

#[test]
fn purged_meta_from_a_later_layout_refuses_to_open() {
    let mut record = 4u64.to_le_bytes().to_vec();
    record.extend_from_slice(&[3, b'x']);
    let (dir, opened) = open_with_purged_meta(&meta_file(&record));
    let err = opened.expect_err("layout 3 is unknown");
    assert!(
        matches!(&err, Error::UnsupportedVersion { path, found: 3 } if *path == dir.path().join("purged.meta")),
        "{err}"
    );
    assert!(err.to_string().contains("purged.meta"), "{err}");
}

#[test]
fn purged_meta_from_a_later_format_version_refuses_to_open() {
    let mut bytes = OLD_PURGED_META_4.to_vec();
    bytes[8] = 2;
    let (dir, opened) = open_with_purged_meta(&bytes);
    let err = opened.expect_err("format version 2 is unknown");
    assert!(
        matches!(&err, Error::UnsupportedVersion { path, found: 2 } if *path == dir.path().join("purged.meta")),
        "{err}"
    );
}

#[test]
fn purged_meta_shorter_than_its_index_refuses_to_open() {
    let (dir, opened) = open_with_purged_meta(&meta_file(&[4, 0, 0]));
    let err = opened.expect_err("short record");
    assert!(
        matches!(&err, Error::Corrupt { segment, reason, .. }
            if *segment == dir.path().join("purged.meta") && reason.contains("shorter than its 8-byte index")),
        "{err}"
    );
}

#[test]
fn damaged_purged_meta_refuses_to_open() {
    for at in [0, 9, 13, 17, 20, 27] {
        let mut bytes = OLD_PURGED_META_4.to_vec();
        bytes[at] ^= 0x10;
        let (dir, opened) = open_with_purged_meta(&bytes);
        let err = opened.expect_err("damaged");
        let names_file = match &err {
            Error::Corrupt { segment, .. } => *segment == dir.path().join("purged.meta"),
            Error::UnsupportedVersion { path, .. } => *path == dir.path().join("purged.meta"),
            _ => false,
        };
        assert!(names_file, "flip at {at}: {err}");
    }
    let (_dir, opened) = open_with_purged_meta(&OLD_PURGED_META_4[..27]);
    assert!(matches!(opened, Err(Error::Corrupt { .. })), "cut file");
}
