//! One segment file: create (inline, or from a file prepared in the background), append,
//! sync, seal, truncate, and read frames back.
//!
//! # Preallocation
//!
//! On ext4 (and most journalling file systems) an fdatasync after a write that extends the
//! file must also commit the new size and extents through the journal; on the benchmark VM that
//! roughly doubles its latency (~405 us against ~215 us for 55 KB). So segments are prepared
//! ahead of need: [`prepare`] writes a `.tmp` file full of zeros, `segment_bytes_max` long, and
//! fsyncs it; [`Segment::create_from_prepared`] writes the header into it and renames it into
//! place. Appends then overwrite zeros inside the file and their fdatasync flushes data only.
//! `fallocate` alone would not do: it leaves unwritten extents whose conversion on first write
//! is again a metadata change the fdatasync must journal.
//!
//! The zero-fill is written and fdatasynced one [`PREPARE_CHUNK_BYTES`] chunk at a time, never
//! as one 64 MiB write followed by one fdatasync. An fdatasync of the active segment issued while
//! the disk works through a large write-back queues behind all of it: on the benchmark VM, three
//! nodes preparing their next segment at the same moment (they reach the same log position
//! together) held every append's fdatasync for 0.3-0.9 s, and with it every commit. Synced in
//! chunks, a concurrent fdatasync waits for at most a chunk or two. A background preparation also
//! pauses after each chunk for as long as the chunk took, so it uses at most about half of the
//! disk's time, unless a rotation is waiting for it (see [`PreparePace`]).
//!
//! The active segment therefore has a zero-filled tail after its last frame. Invariant: every
//! byte of the active segment from `end_offset` to the end of the file is zero on disk once the
//! last sync has returned (appends write at `end_offset`; `truncate_from` zeroes what it cuts;
//! recovery zeroes a torn tail). Sealing cuts the file at `end_offset`, so sealed segments end
//! exactly at their last frame, as in format version 1.

use crate::durable::{self, sync_or_panic};
use crate::format::{self, PREPARED_PREFIX, SEGMENT_HEADER_LEN, SEGMENT_SUFFIX, TMP_SUFFIX};
use crate::fs::{FileSystem, FsFile};
use crate::{Durability, Error, LogIndex};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest buffer of zeros written by one `pwrite` when preparing a segment or zeroing a range.
const ZERO_CHUNK_BYTES: u64 = 1024 * 1024;
/// Bytes of a prepared segment written and fdatasynced together: the most an append's fdatasync
/// can find queued ahead of it from one preparation. 1 MiB takes a few milliseconds to write on
/// the benchmark VM, and a 64 MiB segment needs 64 chunk fdatasyncs.
const PREPARE_CHUNK_BYTES: u64 = 1024 * 1024;
/// Longest pause after one chunk of a background preparation. When the disk is so slow that a
/// chunk takes longer, the pause is capped so the preparation still finishes in bounded time.
const PREPARE_PAUSE_MAX: Duration = Duration::from_millis(50);

/// How fast [`prepare`] may write, shared with the thread running it.
///
/// [`PreparePace::eager`] writes chunk after chunk: someone may be about to wait for the file
/// (the first segment of a new log, prepared at open while the node starts up).
/// [`PreparePace::background`] pauses after each chunk as long as the chunk took (at most
/// [`PREPARE_PAUSE_MAX`]): it prepares the successor of the active segment, needed only after
/// three quarters of a segment of appends. A rotation that finds the preparation unfinished calls
/// [`PreparePace::hurry`] before it waits, so the pauses never delay an append for long.
#[derive(Debug, Clone)]
pub(crate) struct PreparePace {
    eager: Arc<AtomicBool>,
}

impl PreparePace {
    /// A pace without pauses.
    pub fn eager() -> Self {
        PreparePace {
            eager: Arc::new(AtomicBool::new(true)),
        }
    }

    /// A pace that leaves the disk idle about half the time, until [`PreparePace::hurry`].
    pub fn background() -> Self {
        PreparePace {
            eager: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Drops the pauses from here on.
    pub fn hurry(&self) {
        self.eager.store(true, Ordering::Relaxed);
    }

    fn pause_after(&self, chunk: Duration) {
        if !self.eager.load(Ordering::Relaxed) {
            std::thread::sleep(chunk.min(PREPARE_PAUSE_MAX));
        }
    }
}

/// A zero-filled file ready to become a segment, made by [`prepare`].
#[derive(Debug)]
pub(crate) struct Prepared {
    pub path: PathBuf,
    pub file: Arc<dyn FsFile>,
}

/// Makes a segment file ahead of need: `len` zero bytes under a unique `.tmp` name in `dir`,
/// fdatasynced, so that its size and extents are on disk before any entry goes into it. Writes
/// and syncs [`PREPARE_CHUNK_BYTES`] at a time, at the given pace (module doc, "Preallocation").
/// Runs on a background thread.
///
/// # Errors
///
/// `Io` if creating or writing the file fails (the caller then creates the segment inline).
///
/// # Panics
///
/// If an fsync fails, like every fsync in this crate (`durable.rs`); the thread joining this
/// one passes the panic on.
pub(crate) fn prepare(
    fs: &dyn FileSystem,
    dir: &Path,
    len: u64,
    pace: &PreparePace,
) -> Result<Prepared, Error> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = format!(
        "{PREPARED_PREFIX}{}-{n}{SEGMENT_SUFFIX}{TMP_SUFFIX}",
        std::process::id()
    );
    let path = dir.join(name);
    let io = |op: &'static str| crate::error::io_error(op, &path);
    let file = fs.create(&path).map_err(io("create prepared segment"))?;
    let started = Instant::now();
    let mut at = 0;
    while at < len {
        let chunk_started = Instant::now();
        let chunk_end = len.min(at + PREPARE_CHUNK_BYTES);
        write_zeros(file.as_ref(), at, chunk_end).map_err(io("zero prepared segment"))?;
        // Crash before or after this sync: the file is a `.tmp`, removed at open.
        sync_or_panic(file.as_ref(), &path, u64::MAX);
        at = chunk_end;
        if at < len {
            pace.pause_after(chunk_started.elapsed());
        }
    }
    tracing::debug!(
        segment = %path.display(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "segment file prepared"
    );
    Ok(Prepared { path, file })
}

/// Writes zeros over `[from, to)` of `file`, in chunks of at most [`ZERO_CHUNK_BYTES`].
pub(crate) fn write_zeros(file: &dyn FsFile, from: u64, to: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; (to.saturating_sub(from)).min(ZERO_CHUNK_BYTES) as usize];
    let mut at = from;
    while at < to {
        let len = (to - at).min(ZERO_CHUNK_BYTES) as usize;
        file.write_all_at(&zeros[..len], at)?;
        at += len as u64;
    }
    Ok(())
}

/// One segment: a file of frames with contiguous indexes starting at `first_index`.
///
/// Invariants:
/// - `offsets[i]` is the byte offset of the frame holding index `first_index + i`;
/// - offsets are strictly increasing, the first is `SEGMENT_HEADER_LEN`, and `end_offset` is
///   the end of the last frame (where the next frame goes);
/// - every byte from `end_offset` to the end of the file is zero (the file may end there);
///   sealed segments end exactly at `end_offset`.
#[derive(Debug)]
pub(crate) struct Segment {
    pub first_index: u64,
    pub path: PathBuf,
    pub file: Arc<dyn FsFile>,
    pub offsets: Vec<u64>,
    pub end_offset: u64,
}

impl Segment {
    /// Creates a new, empty segment whose first entry will be `first_index`, durably: the header
    /// is written to a `.tmp` file, synced, renamed into place, and the directory synced.
    ///
    /// # Panics
    ///
    /// If an fsync fails.
    pub fn create(fs: &dyn FileSystem, dir: &Path, first_index: u64) -> Result<Segment, Error> {
        let name = format::segment_file_name(first_index);
        let path = dir.join(&name);
        let header = format::encode_segment_header(first_index);
        // Crash inside: the file is either still `.tmp` (removed at open) or a segment holding a
        // synced header and no entries, which recovery accepts.
        durable::replace_file(fs, dir, &name, &header, Durability::Sync)?;
        // Reopen under the final name so later syncs are attributed to the right file.
        let file = fs.open(&path).map_err(|source| Error::Io {
            op: "open segment",
            path: path.clone(),
            source,
        })?;
        Ok(Segment {
            first_index,
            path,
            file,
            offsets: Vec::new(),
            end_offset: SEGMENT_HEADER_LEN,
        })
    }

    /// Turns a prepared, zero-filled file into the segment whose first entry will be
    /// `first_index`, durably: the header is written into it and synced, then it is renamed into
    /// place and the directory synced.
    ///
    /// # Panics
    ///
    /// If an fsync fails.
    pub fn create_from_prepared(
        fs: &dyn FileSystem,
        dir: &Path,
        prepared: Prepared,
        first_index: u64,
    ) -> Result<Segment, Error> {
        let path = dir.join(format::segment_file_name(first_index));
        let tmp = prepared.path;
        let io = |op: &'static str| crate::error::io_error(op, &tmp);
        let header = format::encode_segment_header(first_index);
        prepared
            .file
            .write_all_at(&header, 0)
            .map_err(io("write segment header"))?;
        // Crash inside: the file is either still `.tmp` (removed at open) or a segment holding a
        // synced header and zeros, which recovery reads as empty. The header overwrites zeros,
        // so the fdatasync in there has no size change to journal.
        durable::install_file(fs, prepared.file, &tmp, &path, Durability::Sync)?;
        let file = fs.open(&path).map_err(|source| Error::Io {
            op: "open segment",
            path: path.clone(),
            source,
        })?;
        tracing::debug!(segment = %path.display(), "prepared segment put in place");
        Ok(Segment {
            first_index,
            path,
            file,
            offsets: Vec::new(),
            end_offset: SEGMENT_HEADER_LEN,
        })
    }

    /// Seals the segment before a newer one is created: cuts the zero-filled tail so that the
    /// file ends at its last frame, and fdatasyncs it. Returns how long the fdatasync took.
    ///
    /// # Panics
    ///
    /// If the fsync fails.
    pub fn seal(&self, warn_ms: u64) -> Result<Duration, Error> {
        self.file
            .set_len(self.end_offset)
            .map_err(|source| Error::Io {
                op: "seal segment",
                path: self.path.clone(),
                source,
            })?;
        // Crash before this sync returns: no newer segment exists yet, so this one is still the
        // newest and recovery accepts its zero tail, or any unsynced frames as a torn tail.
        Ok(sync_or_panic(self.file.as_ref(), &self.path, warn_ms))
    }

    /// Number of entries in the segment.
    pub fn entry_count(&self) -> u64 {
        self.offsets.len() as u64
    }

    /// Index one past the last entry (equals `first_index` when empty).
    pub fn next_index(&self) -> u64 {
        self.first_index + self.entry_count()
    }

    /// Byte range `[start, end)` of the frames for entries `[from, to)`, which must be present.
    pub fn byte_range(&self, from: u64, to: u64) -> (u64, u64) {
        assert!(self.first_index <= from && from < to && to <= self.next_index());
        let start = self.offsets[(from - self.first_index) as usize];
        let end = match self.offsets.get((to - self.first_index) as usize) {
            Some(&offset) => offset,
            None => self.end_offset,
        };
        (start, end)
    }

    /// Durably cuts the segment so that `index` and everything after it are gone.
    ///
    /// The cut frames are overwritten with zeros rather than cut off with `ftruncate`, so a
    /// preallocated segment stays preallocated. Zeroing matters: the stale frames carry the very
    /// indexes the next appends will use and would pass their CRC, so if they stayed on disk, a
    /// crash after new, shorter appends could resurrect them behind the new tail.
    ///
    /// # Panics
    ///
    /// If the fsync fails.
    pub fn truncate_from(&mut self, index: u64) -> Result<(), Error> {
        assert!(self.first_index <= index && index <= self.next_index());
        let keep = (index - self.first_index) as usize;
        let cut_offset = match self.offsets.get(keep) {
            Some(&offset) => offset,
            None => self.end_offset,
        };
        write_zeros(self.file.as_ref(), cut_offset, self.end_offset).map_err(|source| {
            Error::Io {
                op: "truncate segment",
                path: self.path.clone(),
                source,
            }
        })?;
        self.offsets.truncate(keep);
        self.end_offset = cut_offset;
        // Crash before this sync returns: the file may still hold some of the cut frames; the
        // caller has not returned, so Raft will truncate again after restart.
        sync_or_panic(self.file.as_ref(), &self.path, u64::MAX);
        Ok(())
    }
}

/// What `read_frames` needs from a segment, copied out so the read runs without the WAL lock.
#[derive(Debug)]
pub(crate) struct ReadPlan {
    pub path: PathBuf,
    pub file: Arc<dyn FsFile>,
    pub from: u64,
    pub to: u64,
    pub start_offset: u64,
    pub end_offset: u64,
}

/// Reads entries `[plan.from, plan.to)` with one `pread`, re-checking every frame's CRC,
/// length and index, and appends them to `out`.
pub(crate) fn read_frames(
    plan: &ReadPlan,
    frame_bytes_max: u32,
    out: &mut Vec<(LogIndex, Vec<u8>)>,
) -> Result<(), Error> {
    let len = (plan.end_offset - plan.start_offset) as usize;
    let mut buf = vec![0u8; len];
    plan.file
        .read_exact_at(&mut buf, plan.start_offset)
        .map_err(|source| Error::Io {
            op: "read segment",
            path: plan.path.clone(),
            source,
        })?;
    let mut at = 0usize;
    for index in plan.from..plan.to {
        let offset = plan.start_offset + at as u64;
        let corrupt = |reason: String| Error::Corrupt {
            segment: plan.path.clone(),
            offset,
            reason,
        };
        let frame = format::decode_frame(&buf[at..], frame_bytes_max)
            .map_err(|e| corrupt(format!("on read: {e}")))?;
        if frame.index != index {
            return Err(corrupt(format!(
                "on read: frame has index {}, expected {index}",
                frame.index
            )));
        }
        out.push((LogIndex(index), frame.payload.to_vec()));
        at += frame.len();
    }
    // Paired with the offsets invariant: the frames exactly fill the planned range.
    if at != len {
        return Err(Error::Corrupt {
            segment: plan.path.clone(),
            offset: plan.start_offset + at as u64,
            reason: "on read: frames do not fill the indexed byte range".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::StdFs;
    use test_case::test_case;

    /// A prepared file is `len` zero bytes whatever the pace, including a last chunk shorter
    /// than `PREPARE_CHUNK_BYTES`.
    #[test_case(PreparePace::eager; "eager")]
    #[test_case(PreparePace::background; "background")]
    fn prepare_writes_len_zero_bytes(pace: fn() -> PreparePace) {
        let dir = tempfile::tempdir().expect("tempdir");
        let len = 2 * PREPARE_CHUNK_BYTES + 4097;
        let prepared = prepare(&StdFs, dir.path(), len, &pace()).expect("prepare");
        assert_eq!(prepared.file.file_len().expect("len"), len);
        let mut buf = vec![1u8; len as usize];
        prepared.file.read_exact_at(&mut buf, 0).expect("read");
        assert!(buf.iter().all(|&b| b == 0));
    }

    /// `hurry` on the handle a rotation keeps reaches the clone the preparing thread reads.
    #[test]
    fn hurry_reaches_every_clone() {
        let pace = PreparePace::background();
        let thread_pace = pace.clone();
        assert!(!thread_pace.eager.load(Ordering::Relaxed));
        pace.hurry();
        assert!(thread_pace.eager.load(Ordering::Relaxed));
    }
}
