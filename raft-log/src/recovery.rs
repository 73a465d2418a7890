//! Scan at open: rebuild the in-memory index, and tell a torn tail from corruption.
//!
//! # Assumption
//!
//! Only bytes whose fsync never returned can be torn. Every byte covered by a returned fsync is
//! assumed to read back exactly as written; damage to such bytes is corruption, which we report
//! and refuse to open on, never repair. Since appends only ever go to the end of the newest
//! segment, and a segment is synced before a newer one is created, unsynced bytes can only sit at
//! the tail of the newest segment.
//!
//! # Rule
//!
//! The newest segment may end in a zero-filled tail (it was preallocated; see `segment.rs`).
//! Reading stops at the first offset X that does not hold a valid frame with the expected
//! index; then:
//! - in the newest segment, if every byte from X to the end of the file is zero: the clean end
//!   of the data. Nothing is changed or logged. (A zero frame header can never be a valid
//!   frame: its CRC field is 0, but the CRC-32/IEEE of an index of eight zero bytes is not.)
//! - in the newest segment, otherwise, with no valid frame anywhere after X: a torn tail. The
//!   bytes from X to the last non-zero byte are overwritten with zeros, fsynced, and a `warn`
//!   is logged; the file keeps its length, so it stays preallocated;
//! - in an older segment, or with a valid frame after X: `Error::Corrupt` naming file and X.
//!   Sealed segments are cut at their last frame when sealed, so even a zero tail there is
//!   corruption.
//!
//! A frame with a valid CRC but an unexpected index, or a segment that does not start one past
//! the previous one, is always `Error::Corrupt`: a torn write cannot produce either.
//!
//! What zeroed-out synced bytes (damage, a non-goal) do: a zeroed range inside a sealed segment,
//! or inside the newest one with any non-zero byte after it, is refused as above; a zeroed
//! range at the end of a sealed segment is refused because the next segment no longer starts
//! one past its last entry. Only a zeroed range reaching the very end of the newest segment
//! is indistinguishable from a preallocated tail, and reads as a shorter log, exactly as a
//! torn tail would have before preallocation.
//!
//! A valid frame after a bad one is treated as corruption even though, strictly, the kernel may
//! write back unsynced pages out of order; that case needs a crash in the middle of writeback of
//! two unsynced batches, and refusing to open is the safe answer (the node is rebuilt from peers).

use crate::config::Config;
use crate::durable::{sync_dir_or_panic, sync_or_panic};
use crate::format::{self, HeaderError, FRAME_HEADER_LEN, SEGMENT_HEADER_LEN, TMP_SUFFIX};
use crate::fs::FileSystem;
use crate::meta::{self, OnCorrupt, PurgePoint};
use crate::segment::{self, Segment};
use crate::Error;
use std::path::{Path, PathBuf};

/// The state found on disk at open.
#[derive(Debug)]
pub(crate) struct Recovered {
    pub segments: Vec<Segment>,
    pub purge_point: Option<PurgePoint>,
    pub vote: Option<Vec<u8>>,
    /// The vote file, to save later votes in.
    pub vote_slots: meta::VoteSlots,
    pub committed: Option<Vec<u8>>,
}

#[derive(Debug, Default)]
struct Summary {
    records: u64,
    bytes_truncated: u64,
}

/// Recovers the WAL in `config.dir`, creating the directory if missing.
///
/// # Panics
///
/// If an fsync fails while truncating a torn tail or removing leftovers.
pub(crate) fn recover(fs: &dyn FileSystem, config: &Config) -> Result<Recovered, Error> {
    let dir = config.dir.as_path();
    let io = |op: &'static str| crate::error::io_error(op, dir);
    fs.create_dir_all(dir).map_err(io("create wal dir"))?;
    let segment_paths = recover_dir_listing(fs, dir)?;
    let purge_point = meta::load_purge_point(fs, dir)?;
    let (vote_slots, vote) = meta::VoteSlots::open_or_migrate(fs, dir)?;
    let committed = meta::load(fs, dir, meta::COMMITTED_FILE, OnCorrupt::Ignore)?;

    let mut summary = Summary::default();
    let mut segments: Vec<Segment> = Vec::with_capacity(segment_paths.len());
    let mut buf = Vec::new();
    for (position, (first_index, path)) in segment_paths.iter().enumerate() {
        let newest = position + 1 == segment_paths.len();
        let Some(segment) = recover_segment(
            fs,
            config,
            path,
            *first_index,
            newest,
            &mut buf,
            &mut summary,
        )?
        else {
            continue;
        };
        if let Some(previous) = segments.last() {
            if segment.first_index != previous.next_index() {
                return Err(Error::Corrupt {
                    segment: path.clone(),
                    offset: 0,
                    reason: format!(
                        "non-contiguous index: segment starts at {} but the previous one ends before {}",
                        segment.first_index,
                        previous.next_index()
                    ),
                });
            }
        }
        summary.records += segment.entry_count();
        segments.push(segment);
    }
    if let Some(point) = &purge_point {
        recover_purged_segments(fs, dir, &mut segments, point.index.0)?;
    }
    if let Some(newest) = segments.last() {
        // A previous process may have exited without syncing: its bytes are readable from the
        // page cache, and Raft will treat every recovered entry as persisted (it may ack or vote
        // on them), so make them durable before anyone relies on them.
        sync_or_panic(newest.file.as_ref(), &newest.path, config.fsync_warn_ms);
    }
    tracing::info!(
        dir = %dir.display(),
        segments = segments.len(),
        records = summary.records,
        bytes_truncated = summary.bytes_truncated,
        "wal recovered"
    );
    Ok(Recovered {
        segments,
        purge_point,
        vote_slots,
        vote,
        committed,
    })
}

/// Removes leftover `.tmp` files and returns the segment files sorted by first index.
fn recover_dir_listing(fs: &dyn FileSystem, dir: &Path) -> Result<Vec<(u64, PathBuf)>, Error> {
    let entries = fs.list_dir(dir).map_err(|source| Error::Io {
        op: "list wal dir",
        path: dir.to_owned(),
        source,
    })?;
    let mut segments = Vec::new();
    let mut removed_tmp = false;
    for path in entries {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.ends_with(TMP_SUFFIX) {
            fs.remove_file(&path).map_err(|source| Error::Io {
                op: "remove tmp file",
                path: path.clone(),
                source,
            })?;
            removed_tmp = true;
        } else if let Some(first_index) = format::parse_segment_file_name(name) {
            segments.push((first_index, path));
        }
    }
    if removed_tmp {
        // Crash before this sync returns: a `.tmp` may reappear and is removed again next open.
        sync_dir_or_panic(fs, dir);
    }
    segments.sort();
    Ok(segments)
}

/// Reads one segment sequentially in a single `pread`, validates its header and frames, and
/// truncates a torn tail if this is the newest segment. `None` if the newest segment was
/// removed because even its header was torn.
fn recover_segment(
    fs: &dyn FileSystem,
    config: &Config,
    path: &Path,
    first_index: u64,
    newest: bool,
    buf: &mut Vec<u8>,
    summary: &mut Summary,
) -> Result<Option<Segment>, Error> {
    let io = |op: &'static str| crate::error::io_error(op, path);
    let file = fs.open(path).map_err(io("open segment"))?;
    let len = file.file_len().map_err(io("stat segment"))?;
    buf.resize(len as usize, 0);
    file.read_exact_at(buf, 0).map_err(io("read segment"))?;
    let corrupt = |offset: u64, reason: String| Error::Corrupt {
        segment: path.to_owned(),
        offset,
        reason,
    };
    if newest && len < SEGMENT_HEADER_LEN {
        // `Segment::create` syncs the header before the rename, so this needs a file system that
        // does not order data before the rename. Such a file holds no entries: drop it.
        drop(file);
        fs.remove_file(path).map_err(io("remove torn segment"))?;
        // Crash before this sync returns: the file may reappear and is removed again.
        sync_dir_or_panic(fs, path.parent().expect("segment paths have a parent"));
        tracing::warn!(segment = %path.display(), offset = 0, bytes = len, "removed segment with torn header");
        summary.bytes_truncated += len;
        return Ok(None);
    }
    match format::decode_segment_header(buf) {
        Ok(found) if found == first_index => {}
        Ok(found) => {
            return Err(corrupt(
                12,
                format!("header first index {found} != file name"),
            ))
        }
        Err(HeaderError::UnsupportedVersion(found)) => {
            return Err(Error::UnsupportedVersion {
                path: path.to_owned(),
                found,
            })
        }
        Err(e) => return Err(corrupt(0, format!("bad segment header: {e:?}"))),
    }
    let scan = recover_segment_frames(buf, first_index, config.frame_bytes_max);
    let mut segment = Segment {
        first_index,
        path: path.to_owned(),
        file,
        offsets: scan.offsets,
        end_offset: len,
    };
    let Some((bad_offset, reason)) = scan.failure else {
        return Ok(Some(segment));
    };
    // Every byte after the last non-zero one; a valid frame always has a non-zero byte at or
    // after its start (a non-zero length, or for an empty payload the non-zero CRC).
    let nonzero_end = nonzero_end(buf) as u64;
    if newest && nonzero_end <= bad_offset && !scan.index_mismatch {
        segment.end_offset = bad_offset;
        return Ok(Some(segment));
    }
    if !newest {
        return Err(corrupt(bad_offset, format!("{reason} in a sealed segment")));
    }
    if scan.index_mismatch {
        return Err(corrupt(bad_offset, reason));
    }
    let expected = segment.next_index();
    let found = recover_segment_find_frame(buf, bad_offset, nonzero_end, expected, config);
    if let Some(valid_offset) = found {
        return Err(corrupt(
            bad_offset,
            format!("{reason}, followed by a valid frame at offset {valid_offset}"),
        ));
    }
    recover_segment_tail(&mut segment, bad_offset, nonzero_end, config, summary)?;
    Ok(Some(segment))
}

/// One past the last non-zero byte of `buf` (0 if all zero). Compares 64 bytes at a time,
/// because a preallocated newest segment ends in up to `segment_bytes_max` zeros.
fn nonzero_end(buf: &[u8]) -> usize {
    let mut end = buf.len();
    let block_is_zero = |block: &[u8]| {
        block
            .chunks_exact(16)
            .all(|c| u128::from_ne_bytes(c.try_into().expect("16-byte chunk")) == 0)
    };
    while end >= 64 && block_is_zero(&buf[end - 64..end]) {
        end -= 64;
    }
    buf[..end]
        .iter()
        .rposition(|&b| b != 0)
        .map_or(0, |at| at + 1)
}

/// Zeroes the torn tail `[bad_offset, nonzero_end)` of the newest segment, durably.
fn recover_segment_tail(
    segment: &mut Segment,
    bad_offset: u64,
    nonzero_end: u64,
    config: &Config,
    summary: &mut Summary,
) -> Result<(), Error> {
    let bytes = nonzero_end - bad_offset;
    segment::write_zeros(segment.file.as_ref(), bad_offset, nonzero_end).map_err(|source| {
        Error::Io {
            op: "zero torn tail",
            path: segment.path.clone(),
            source,
        }
    })?;
    // Crash before this sync returns: some torn bytes may still be there; the next open finds
    // and zeroes them again.
    sync_or_panic(segment.file.as_ref(), &segment.path, config.fsync_warn_ms);
    segment.end_offset = bad_offset;
    summary.bytes_truncated += bytes;
    tracing::warn!(segment = %segment.path.display(), offset = bad_offset, bytes, "truncated torn tail");
    Ok(())
}

/// Result of scanning the frames of one segment.
struct FrameScan {
    offsets: Vec<u64>,
    /// Offset and description of the first invalid frame, if any.
    failure: Option<(u64, String)>,
    /// The failure is a valid frame carrying the wrong index.
    index_mismatch: bool,
}

/// Walks the frames after the header until the end or the first invalid frame.
fn recover_segment_frames(buf: &[u8], first_index: u64, frame_bytes_max: u32) -> FrameScan {
    let mut offsets = Vec::new();
    let mut at = SEGMENT_HEADER_LEN as usize;
    let mut expected = first_index;
    while at < buf.len() {
        match format::decode_frame(&buf[at..], frame_bytes_max) {
            Ok(frame) if frame.index == expected => {
                offsets.push(at as u64);
                at += frame.len();
                expected += 1;
            }
            Ok(frame) => {
                let reason = format!(
                    "non-contiguous index: frame has {}, expected {expected}",
                    frame.index
                );
                return FrameScan {
                    offsets,
                    failure: Some((at as u64, reason)),
                    index_mismatch: true,
                };
            }
            Err(e) => {
                return FrameScan {
                    offsets,
                    failure: Some((at as u64, e.to_string())),
                    index_mismatch: false,
                }
            }
        }
    }
    FrameScan {
        offsets,
        failure: None,
        index_mismatch: false,
    }
}

/// Looks for any valid frame starting after `bad_offset` and before `nonzero_end` (a frame has
/// a non-zero byte at or after its start) whose index could follow `expected`. The index filter
/// keeps the byte-by-byte scan cheap: a CRC is computed only for candidates.
fn recover_segment_find_frame(
    buf: &[u8],
    bad_offset: u64,
    nonzero_end: u64,
    expected: u64,
    config: &Config,
) -> Option<u64> {
    let start = bad_offset as usize + 1;
    let slack = (buf.len() / FRAME_HEADER_LEN) as u64 + 1;
    let end = buf
        .len()
        .saturating_sub(FRAME_HEADER_LEN - 1)
        .min(nonzero_end as usize);
    (start..end)
        .filter(|&at| {
            format::peek_frame_index(&buf[at..])
                .is_some_and(|index| index >= expected && index - expected <= slack)
        })
        .find(|&at| format::decode_frame(&buf[at..], config.frame_bytes_max).is_ok())
        .map(|at| at as u64)
}

/// Removes segments whose entries are all at or below the purge point (left behind by a crash
/// inside `purge_through`), then checks that no entry is missing after the purge point.
fn recover_purged_segments(
    fs: &dyn FileSystem,
    dir: &Path,
    segments: &mut Vec<Segment>,
    purged: u64,
) -> Result<(), Error> {
    let mut removed = 0;
    while segments
        .first()
        .is_some_and(|s| s.next_index() <= purged.saturating_add(1))
    {
        let segment = segments.remove(0);
        fs.remove_file(&segment.path).map_err(|source| Error::Io {
            op: "remove purged segment",
            path: segment.path.clone(),
            source,
        })?;
        removed += 1;
    }
    if removed > 0 {
        // Crash before this sync returns: the purged segments may reappear; they are removed
        // again next open, and reads never return entries at or below the purge point.
        sync_dir_or_panic(fs, dir);
    }
    if let Some(first) = segments.first() {
        if first.first_index > purged.saturating_add(1) {
            return Err(Error::Corrupt {
                segment: first.path.clone(),
                offset: 0,
                reason: format!(
                    "gap: log purged through {purged} but the first segment starts at {}",
                    first.first_index
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    #[test_case(0, None; "empty")]
    #[test_case(200, None; "all zero")]
    #[test_case(200, Some(0); "first byte")]
    #[test_case(200, Some(63); "inside the first block")]
    #[test_case(200, Some(150); "inside the last full block")]
    #[test_case(200, Some(199); "last byte")]
    fn nonzero_end_finds_last_nonzero_byte(len: usize, nonzero: Option<usize>) {
        let mut buf = vec![0u8; len];
        if let Some(at) = nonzero {
            buf[at] = 1;
        }
        assert_eq!(nonzero_end(&buf), nonzero.map_or(0, |at| at + 1));
    }
}
