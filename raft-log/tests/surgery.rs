//! File surgery: write a small log, close it, then edit the bytes on disk and reopen.
//! - a cut at every byte offset of the newest segment recovers a prefix (never an error, never
//!   a wrong payload), exactly the frames that fit before the cut;
//! - a flipped bit in a sealed segment is `Error::Corrupt` naming that file and frame offset;
//! - a flipped bit in the newest segment followed by valid frames is `Error::Corrupt`, while one
//!   in its last frame is a torn tail;
//! - an unknown format version is `Error::UnsupportedVersion`; a missing middle segment is
//!   `Error::Corrupt`;
//! - a zero tail on the newest segment is a clean end and is left alone; a zero tail on a
//!   sealed segment, zeroed last frames of a sealed segment, and a zeroed range in the newest
//!   segment followed by frames are `Error::Corrupt`.

use raft_log::{Config, Durability, Error, FileSystem, LogIndex, Wal};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// With feature `testing`, `FaultyFs` (which never issues real fsyncs) keeps the thousands of
/// reopens here fast; durability itself is not under test in this file.
fn fast_fs() -> Arc<dyn FileSystem> {
    #[cfg(feature = "testing")]
    {
        Arc::new(raft_log::FaultyFs::new())
    }
    #[cfg(not(feature = "testing"))]
    {
        Arc::new(raft_log::StdFs)
    }
}

fn open(dir: &Path) -> Result<Wal, Error> {
    Wal::open_with_fs(config(dir), fast_fs())
}

const HEADER_LEN: u64 = 24;
const FRAME_HEADER_LEN: u64 = 16;

fn config(dir: &Path) -> Config {
    let mut config = Config::new(dir);
    config.segment_bytes_max = 4096;
    config
}

/// Writes 80 entries at indexes 1..=80 (40..140 bytes each) in Sync batches of 3 and closes.
fn write_log(dir: &Path) -> Vec<(LogIndex, Vec<u8>)> {
    let wal = open(dir).expect("open");
    let entries: Vec<(LogIndex, Vec<u8>)> = (1..=80u64)
        .map(|i| (LogIndex(i), vec![i as u8; 40 + (i as usize * 37) % 100]))
        .collect();
    for batch in entries.chunks(3) {
        let payloads: Vec<&[u8]> = batch.iter().map(|(_, p)| p.as_slice()).collect();
        wal.append(batch[0].0, &payloads, Durability::Sync)
            .expect("append");
    }
    wal.close().expect("close");
    entries
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    paths.sort();
    paths
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, to.join(path.file_name().expect("name"))).expect("copy");
    }
}

fn first_index_of(segment: &Path) -> u64 {
    let stem = segment.file_stem().and_then(|s| s.to_str()).expect("stem");
    stem.parse().expect("numeric segment name")
}

/// Start offsets of the frames in `segment`, given the entries it holds.
fn frame_offsets(segment: &Path, entries: &[(LogIndex, Vec<u8>)]) -> Vec<(u64, u64)> {
    let first = first_index_of(segment);
    let len = std::fs::metadata(segment).expect("stat").len();
    let mut offset = HEADER_LEN;
    let mut frames = Vec::new();
    for (index, payload) in entries.iter().filter(|(i, _)| i.0 >= first) {
        if offset >= len {
            break;
        }
        frames.push((index.0, offset));
        offset += FRAME_HEADER_LEN + payload.len() as u64;
    }
    frames
}

fn read_all(wal: &Wal) -> Vec<(LogIndex, Vec<u8>)> {
    wal.read(LogIndex(0), LogIndex(u64::MAX)).expect("read")
}

#[test]
fn recover_cut_at_every_offset_of_newest_segment_yields_prefix() {
    let original = tempfile::tempdir().expect("tempdir");
    let entries = write_log(original.path());
    let newest = segments(original.path()).pop().expect("a segment");
    assert!(segments(original.path()).len() >= 3, "want rotation");
    let newest_first = first_index_of(&newest);
    let frames = frame_offsets(&newest, &entries);
    let len = std::fs::metadata(&newest).expect("stat").len();
    for cut in 0..=len {
        let dir = tempfile::tempdir().expect("tempdir");
        copy_dir(original.path(), dir.path());
        let cut_path = dir.path().join(newest.file_name().expect("name"));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&cut_path)
            .expect("open")
            .set_len(cut)
            .expect("cut");
        let wal = open(dir.path()).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        let got = read_all(&wal);
        let whole_frames = frames
            .iter()
            .filter(|(index, offset)| {
                offset + FRAME_HEADER_LEN + entries[*index as usize - 1].1.len() as u64 <= cut
            })
            .count();
        let expected = (newest_first - 1) as usize + whole_frames;
        assert_eq!(got.len(), expected, "cut at {cut}");
        assert_eq!(got[..], entries[..expected], "cut at {cut}");
        // The log continues normally after recovery.
        let next = wal.next_index();
        wal.append(next, &[b"after"], Durability::Sync)
            .expect("append after torn tail");
    }
}

#[test]
fn recover_crc_mismatch_in_sealed_segment_fails() {
    let original = tempfile::tempdir().expect("tempdir");
    let entries = write_log(original.path());
    let sealed = segments(original.path())[1].clone();
    let frames = frame_offsets(&sealed, &entries);
    let len = std::fs::metadata(&sealed).expect("stat").len();
    for byte in (HEADER_LEN..len).step_by(5) {
        let dir = tempfile::tempdir().expect("tempdir");
        copy_dir(original.path(), dir.path());
        let path = dir.path().join(sealed.file_name().expect("name"));
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[byte as usize] ^= 1 << (byte % 8);
        std::fs::write(&path, &bytes).expect("write");
        let frame_offset = frames
            .iter()
            .rev()
            .find(|(_, o)| *o <= byte)
            .expect("frame")
            .1;
        match open(dir.path()) {
            Err(Error::Corrupt {
                segment, offset, ..
            }) => {
                assert_eq!(segment, path, "byte {byte}");
                assert_eq!(offset, frame_offset, "byte {byte}");
            }
            other => panic!("byte {byte}: expected Corrupt, got {other:?}"),
        }
    }
}

#[test]
fn recover_bad_frame_followed_by_valid_frames_in_newest_fails() {
    let original = tempfile::tempdir().expect("tempdir");
    let entries = write_log(original.path());
    let newest = segments(original.path()).pop().expect("segment");
    let frames = frame_offsets(&newest, &entries);
    assert!(frames.len() >= 3);
    let (_, target) = frames[frames.len() - 3];
    let dir = tempfile::tempdir().expect("tempdir");
    copy_dir(original.path(), dir.path());
    let path = dir.path().join(newest.file_name().expect("name"));
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[target as usize + 20] ^= 0x10;
    std::fs::write(&path, &bytes).expect("write");
    match open(dir.path()) {
        Err(Error::Corrupt {
            segment, offset, ..
        }) => {
            assert_eq!(segment, path);
            assert_eq!(offset, target);
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn recover_bad_last_frame_in_newest_is_torn_tail() {
    let original = tempfile::tempdir().expect("tempdir");
    let entries = write_log(original.path());
    let newest = segments(original.path()).pop().expect("segment");
    let (_, last) = *frame_offsets(&newest, &entries).last().expect("frame");
    let path = original.path().join(newest.file_name().expect("name"));
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[last as usize + 18] ^= 0x01;
    std::fs::write(&path, &bytes).expect("write");
    let len = bytes.len();
    let wal = open(original.path()).expect("open");
    assert_eq!(read_all(&wal)[..], entries[..entries.len() - 1]);
    let after = std::fs::read(&path).expect("read");
    assert_eq!(after.len(), len, "the file keeps its length");
    assert!(
        after[last as usize..].iter().all(|&b| b == 0),
        "torn tail zeroed on disk"
    );
}

#[test]
fn recover_unknown_version_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path());
    let newest = segments(dir.path()).pop().expect("segment");
    let mut bytes = std::fs::read(&newest).expect("read");
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    std::fs::write(&newest, &bytes).expect("write");
    match open(dir.path()) {
        Err(Error::UnsupportedVersion { path, found: 2 }) => assert_eq!(path, newest),
        other => panic!("expected UnsupportedVersion, got {other:?}"),
    }
}

#[test]
fn recover_missing_middle_segment_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path());
    let all = segments(dir.path());
    std::fs::remove_file(&all[1]).expect("remove");
    match open(dir.path()) {
        Err(Error::Corrupt {
            segment, offset: 0, ..
        }) => assert_eq!(segment, all[2]),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn recover_zero_filled_tail_is_clean_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let entries = write_log(dir.path());
    let newest = segments(dir.path()).pop().expect("segment");
    let mut bytes = std::fs::read(&newest).expect("read");
    bytes.extend_from_slice(&[0u8; 4096]);
    std::fs::write(&newest, &bytes).expect("write");
    let wal = open(dir.path()).expect("open");
    assert_eq!(read_all(&wal), entries);
    assert_eq!(
        std::fs::read(&newest).expect("read"),
        bytes,
        "a clean zero tail is left alone"
    );
}

#[test]
fn recover_zero_tail_in_sealed_segment_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path());
    let sealed = segments(dir.path())[0].clone();
    let mut bytes = std::fs::read(&sealed).expect("read");
    let len = bytes.len() as u64;
    bytes.extend_from_slice(&[0u8; 64]);
    std::fs::write(&sealed, &bytes).expect("write");
    match open(dir.path()) {
        Err(Error::Corrupt {
            segment, offset, ..
        }) => {
            assert_eq!(segment, sealed);
            assert_eq!(offset, len);
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn recover_zeroed_last_frames_of_sealed_segment_fail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let entries = write_log(dir.path());
    let all = segments(dir.path());
    let sealed = all[0].clone();
    let (_, last) = *frame_offsets(&sealed, &entries).last().expect("frame");
    let mut bytes = std::fs::read(&sealed).expect("read");
    bytes[last as usize..].fill(0);
    std::fs::write(&sealed, &bytes).expect("write");
    // The zeroed frame is caught in the sealed segment itself; were its zeros cut off
    // instead, the next segment would no longer start one past its last entry.
    assert!(matches!(open(dir.path()), Err(Error::Corrupt { segment, .. }) if segment == sealed));
    bytes.truncate(last as usize);
    std::fs::write(&sealed, &bytes).expect("write");
    assert!(
        matches!(open(dir.path()), Err(Error::Corrupt { segment, offset: 0, .. }) if segment == all[1])
    );
}

#[test]
fn recover_zeroed_range_in_newest_followed_by_data_fails() {
    let original = tempfile::tempdir().expect("tempdir");
    let entries = write_log(original.path());
    let newest = segments(original.path()).pop().expect("segment");
    let frames = frame_offsets(&newest, &entries);
    assert!(frames.len() >= 3);
    let (_, target) = frames[frames.len() - 3];
    let (_, next) = frames[frames.len() - 2];
    let mut bytes = std::fs::read(&newest).expect("read");
    bytes[target as usize..next as usize].fill(0);
    std::fs::write(&newest, &bytes).expect("write");
    match open(original.path()) {
        Err(Error::Corrupt {
            segment, offset, ..
        }) => {
            assert_eq!(segment, newest);
            assert_eq!(offset, target);
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn recover_removes_leftover_tmp_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path());
    let tmp = dir.path().join("00000000000000000999.seg.tmp");
    std::fs::write(&tmp, b"partial").expect("write");
    let _wal = open(dir.path()).expect("open");
    assert!(!tmp.exists());
}

#[test]
fn read_of_corrupted_payload_after_open_is_corrupt_not_wrong() {
    let dir = tempfile::tempdir().expect("tempdir");
    let entries = write_log(dir.path());
    let wal = open(dir.path()).expect("open");
    let first = segments(dir.path())[0].clone();
    let (index, offset) = frame_offsets(&first, &entries)[2];
    let mut bytes = std::fs::read(&first).expect("read");
    bytes[offset as usize + 17] ^= 0x40;
    std::fs::write(&first, &bytes).expect("write");
    match wal.read(LogIndex(index), LogIndex(index + 1)) {
        Err(Error::Corrupt {
            segment,
            offset: at,
            ..
        }) => {
            assert_eq!(segment, first);
            assert_eq!(at, offset);
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..proptest::prelude::ProptestConfig::default()
    })]

    /// One flipped byte anywhere in any segment is either refused at open or handled by the
    /// torn-tail rule; whatever opens reads back a prefix of the entries, never a changed payload.
    #[test]
    fn any_byte_flip_is_caught_or_yields_prefix(segment_pick in 0usize..16, at in 0u64..8192, mask in 1u8..=255) {
        let dir = tempfile::tempdir().expect("tempdir");
        let entries = write_log(dir.path());
        let all = segments(dir.path());
        let path = &all[segment_pick % all.len()];
        let mut bytes = std::fs::read(path).expect("read");
        let at = (at % bytes.len() as u64) as usize;
        bytes[at] ^= mask;
        std::fs::write(path, &bytes).expect("write");
        match open(dir.path()) {
            Ok(wal) => {
                let got = read_all(&wal);
                proptest::prop_assert_eq!(&got[..], &entries[..got.len()]);
            }
            Err(Error::Corrupt { segment, .. }) => proptest::prop_assert_eq!(&segment, path),
            Err(Error::UnsupportedVersion { path: p, .. }) => proptest::prop_assert_eq!(&p, path),
            Err(e) => proptest::prop_assert!(false, "unexpected error {}", e),
        }
    }
}
