//! `Wal`: ordered segments; append with group commit, read, truncate_from, purge_through, and
//! the vote and committed meta state.

use crate::durable::{self, sync_dir_or_panic};
use crate::format::{self, PURGE_PAYLOAD_BYTES_MAX};
use crate::fs::{FileSystem, StdFs};
use crate::meta::{self, PurgePoint, COMMITTED_FILE, PURGED_FILE};
use crate::recovery;
use crate::segment::{self, PreparePace, Prepared, ReadPlan, Segment};
use crate::{Config, Durability, Error, LogIndex};
use parking_lot::{Condvar, Mutex, RwLock};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Largest byte range one `pread` covers when reading entries back.
const READ_CHUNK_BYTES: u64 = 4 * 1024 * 1024;
/// The append encode buffer is released when a batch grew it beyond this.
const ENCODE_BUF_KEEP_BYTES: usize = 4 * 1024 * 1024;

/// Counters for tests and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalStats {
    /// Fdatasyncs of segment files issued since open (group commit shares them).
    pub fsyncs: u64,
    /// Successful `append` calls with at least one entry.
    pub appends: u64,
    /// Frame bytes written by `append`.
    pub bytes_written: u64,
}

/// A write-ahead log of opaque entries in segment files under one directory.
///
/// Invariants:
/// - indexes are contiguous: every append starts at `next_index()` (the first append to an
///   empty, never-purged log may choose its index);
/// - segment N+1 starts one past the last index of segment N;
/// - nothing at or below `purged_through()` can be read;
/// - with `Durability::Sync`, `append` returns only after the bytes are on disk;
/// - records are never rewritten in place, only cut from the tail.
///
/// All methods take `&self`: one mutex orders writes and guards the index of offsets; fsyncs
/// and `pread`s run outside it. `Wal` is `Send + Sync`.
#[derive(Debug)]
pub struct Wal {
    config: Config,
    fs: Arc<dyn FileSystem>,
    state: Mutex<State>,
    /// Readers hold it shared while they `pread`; `truncate_from` holds it exclusively so a read
    /// never sees bytes cut and rewritten under it.
    truncate_gate: RwLock<()>,
    sync: Mutex<SyncState>,
    sync_done: Condvar,
    meta: Mutex<MetaState>,
    poisoned: AtomicBool,
    fsyncs: AtomicU64,
    appends: AtomicU64,
    bytes_written: AtomicU64,
}

#[derive(Debug)]
struct State {
    /// Ordered by first index; the last one is the active segment, appended to.
    segments: Vec<Segment>,
    purged: Option<u64>,
    /// The payload stored with the purge point in `purged.meta` (see [`PurgePoint`]).
    purged_payload: Option<Vec<u8>>,
    /// Number of batches written; a batch is durable once `SyncState::synced_seq` reaches it.
    written_seq: u64,
    /// Reused for every batch so the append path allocates nothing per entry.
    encode_buf: Vec<u8>,
    /// The background thread preparing the next segment file, if one was started.
    prepare: Option<PrepareJob>,
}

/// A segment file being prepared on a background thread.
#[derive(Debug)]
struct PrepareJob {
    thread: JoinHandle<Result<Prepared, Error>>,
    pace: PreparePace,
}

/// Group commit bookkeeping.
#[derive(Debug, Default)]
struct SyncState {
    /// Every batch with a sequence number up to this is durable.
    synced_seq: u64,
    /// A thread is running an fsync right now.
    in_flight: bool,
    /// An fsync failed; every waiter panics too.
    failed: bool,
}

#[derive(Debug)]
struct MetaState {
    vote: Option<Vec<u8>>,
    vote_slots: meta::VoteSlots,
    /// The latest committed marker handed to `save_committed` (maybe newer than the file).
    committed: Option<Vec<u8>>,
    /// When the committed file was last written; `None` before the first write.
    committed_written_at: Option<Instant>,
    /// Whether `committed` is newer than what the file holds.
    committed_dirty: bool,
}

/// The committed marker is written to its file at most this often; values in between live in
/// memory until the next write or `close` (see [`Wal::save_committed`]).
const COMMITTED_WRITE_INTERVAL: Duration = Duration::from_millis(100);

impl State {
    fn last_index(&self) -> Option<u64> {
        let first = self.segments.first()?.first_index;
        let next = self.segments.last()?.next_index();
        // After `truncate_from(purged + 1)` a segment may hold only purged entries.
        let purged_next = self.purged.map_or(0, |p| p + 1);
        (next > first && next > purged_next).then(|| next - 1)
    }

    fn first_readable(&self) -> Option<u64> {
        let last = self.last_index()?;
        let first = self.segments[0].first_index;
        let first = match self.purged {
            Some(purged) => first.max(purged + 1),
            None => first,
        };
        (first <= last).then_some(first)
    }

    fn next_index(&self) -> u64 {
        match (self.last_index(), self.purged) {
            (Some(last), _) => last + 1,
            (None, Some(purged)) => purged + 1,
            (None, None) => 0,
        }
    }

    /// Byte ranges to `pread` for entries `[from, to)`, clipped to what is readable.
    fn read_plans(&self, from: u64, to: u64) -> Vec<ReadPlan> {
        let (Some(first), Some(last)) = (self.first_readable(), self.last_index()) else {
            return Vec::new();
        };
        let (from, to) = (from.max(first), to.min(last + 1));
        let mut plans = Vec::new();
        for segment in &self.segments {
            let mut lo = from.max(segment.first_index);
            let hi = to.min(segment.next_index());
            while lo < hi {
                let (start, _) = segment.byte_range(lo, lo + 1);
                // Grow the chunk up to READ_CHUNK_BYTES, but always take at least one entry.
                let rel = &segment.offsets[(lo - segment.first_index) as usize..];
                let fit = rel.partition_point(|&o| o < start + READ_CHUNK_BYTES) as u64;
                let chunk_to = hi.min(lo + fit.max(1));
                let (start, end) = segment.byte_range(lo, chunk_to);
                plans.push(ReadPlan {
                    path: segment.path.clone(),
                    file: segment.file.clone(),
                    from: lo,
                    to: chunk_to,
                    start_offset: start,
                    end_offset: end,
                });
                lo = chunk_to;
            }
        }
        plans
    }
}

impl Wal {
    /// Opens (or creates) the WAL in `config.dir` on the real file system, recovering it.
    ///
    /// # Errors
    ///
    /// `InvalidConfig`; `Io`; `Corrupt` or `UnsupportedVersion` when recovery refuses the files
    /// (see `recovery.rs`).
    ///
    /// # Panics
    ///
    /// If an fsync fails during recovery.
    pub fn open(config: Config) -> Result<Wal, Error> {
        Wal::open_with_fs(config, Arc::new(StdFs))
    }

    /// Like [`Wal::open`], on the given file system (for example a `FaultyFs`).
    ///
    /// # Errors
    ///
    /// As [`Wal::open`].
    ///
    /// # Panics
    ///
    /// If an fsync fails during recovery.
    pub fn open_with_fs(config: Config, fs: Arc<dyn FileSystem>) -> Result<Wal, Error> {
        config.validate()?;
        let recovered = recovery::recover(fs.as_ref(), &config)?;
        let (purged, purged_payload) = match recovered.purge_point {
            Some(point) => (Some(point.index.0), point.payload),
            None => (None, None),
        };
        let state = State {
            segments: recovered.segments,
            purged,
            purged_payload,
            written_seq: 0,
            encode_buf: Vec::new(),
            prepare: None,
        };
        let prepare_first = config.prepare_first_segment && state.segments.is_empty();
        let wal = Wal {
            config,
            fs,
            state: Mutex::new(state),
            truncate_gate: RwLock::new(()),
            sync: Mutex::new(SyncState::default()),
            sync_done: Condvar::new(),
            meta: Mutex::new(MetaState {
                vote: recovered.vote,
                vote_slots: recovered.vote_slots,
                committed: recovered.committed,
                committed_written_at: None,
                committed_dirty: false,
            }),
            poisoned: AtomicBool::new(false),
            fsyncs: AtomicU64::new(0),
            appends: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
        };
        if prepare_first {
            wal.start_prepare(&mut wal.state.lock(), PreparePace::eager);
        }
        Ok(wal)
    }

    /// Index of the first readable entry; `None` if the log is empty.
    pub fn first_index(&self) -> Option<LogIndex> {
        self.state.lock().first_readable().map(LogIndex)
    }

    /// Index of the last entry; `None` if the log is empty.
    pub fn last_index(&self) -> Option<LogIndex> {
        self.state.lock().last_index().map(LogIndex)
    }

    /// The purge point: entries at or below it are gone. `None` if never purged.
    pub fn purged_through(&self) -> Option<LogIndex> {
        self.state.lock().purged.map(LogIndex)
    }

    /// The purge point with the payload stored alongside it by [`Wal::purge_through_with`];
    /// `None` if never purged. After a crash it is the last purge point whose write reached the
    /// disk: the one the last returned purge call stored, or that of a later call that had not
    /// returned yet.
    pub fn purged(&self) -> Option<PurgePoint> {
        let state = self.state.lock();
        state.purged.map(|index| PurgePoint {
            index: LogIndex(index),
            payload: state.purged_payload.clone(),
        })
    }

    /// The index the next `append` must start at: last + 1, else purged + 1, else 0.
    pub fn next_index(&self) -> LogIndex {
        LogIndex(self.state.lock().next_index())
    }

    /// Counters since open.
    pub fn stats(&self) -> WalStats {
        WalStats {
            fsyncs: self.fsyncs.load(Ordering::Relaxed),
            appends: self.appends.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
        }
    }

    /// Appends `payloads` at indexes `first, first + 1, ...`. The entries are readable when it
    /// returns; with `Durability::Sync` they are also durable (an fdatasync covering them has
    /// returned, possibly one issued by another thread). The batch is encoded into one buffer
    /// and written with one `pwrite`.
    ///
    /// # Errors
    ///
    /// `NonContiguous` unless `first == next_index()` (any `first` is accepted while the log is
    /// empty and was never purged); `EntryTooLarge`; `Io` (the `Wal` is then poisoned);
    /// `Poisoned`.
    ///
    /// # Panics
    ///
    /// If an fsync fails, here or in the thread whose fsync this call joined.
    ///
    /// Step 4 of "Life of a chat message" in `ARCHITECTURE.md`.
    #[tracing::instrument(skip_all, fields(log_index = first.0, count = payloads.len()))]
    pub fn append<P: AsRef<[u8]>>(
        &self,
        first: LogIndex,
        payloads: &[P],
        durability: Durability,
    ) -> Result<(), Error> {
        self.check_poisoned()?;
        let mut batch_len = 0u64;
        for payload in payloads {
            let len = payload.as_ref().len();
            if len > self.config.frame_bytes_max as usize {
                return Err(Error::EntryTooLarge {
                    len: len as u64,
                    max: self.config.frame_bytes_max,
                });
            }
            batch_len += format::frame_len(len) as u64;
        }
        if payloads.is_empty() {
            return Ok(());
        }
        let seq = {
            let mut state = self.state.lock();
            self.check_poisoned()?;
            let open_start = state.last_index().is_none() && state.purged.is_none();
            let expected = state.next_index();
            if !open_start && first.0 != expected {
                return Err(Error::NonContiguous {
                    expected: LogIndex(expected),
                    found: first,
                });
            }
            self.append_prepare_segment(&mut state, first.0, batch_len)?;
            self.append_write(&mut state, first.0, payloads, batch_len)?
        };
        if durability == Durability::Sync {
            self.sync_through(seq);
        }
        Ok(())
    }

    /// Makes sure the active segment can take a batch starting at `first`: creates the first
    /// segment, replaces an empty segment starting elsewhere, or rotates a full one.
    fn append_prepare_segment(
        &self,
        state: &mut State,
        first: u64,
        batch_len: u64,
    ) -> Result<(), Error> {
        let dir = self.config.dir.as_path();
        match state.segments.last() {
            Some(active) if active.entry_count() == 0 && active.first_index != first => {
                // Only reachable on an empty, never-purged log whose leftover empty segment starts
                // elsewhere. Crash after the removal: the log is empty either way.
                let active = state.segments.pop().expect("matched Some");
                self.fs
                    .remove_file(&active.path)
                    .map_err(|source| Error::Io {
                        op: "remove empty segment",
                        path: active.path.clone(),
                        source,
                    })?;
                sync_dir_or_panic(self.fs.as_ref(), dir);
            }
            Some(active)
                if active.entry_count() > 0
                    && active.end_offset + batch_len > self.config.segment_bytes_max =>
            {
                // Seal: cut the zero tail and sync the full segment before the next one exists,
                // so unsynced bytes and zero tails only ever sit in the newest segment
                // (recovery's assumption).
                let took = active.seal(self.config.fsync_warn_ms)?;
                self.fsyncs.fetch_add(1, Ordering::Relaxed);
                self.observe_fsync(took);
                let written_seq = state.written_seq;
                let mut sync = self.sync.lock();
                sync.synced_seq = sync.synced_seq.max(written_seq);
                drop(sync);
                tracing::info!(segment = %active.path.display(), "segment sealed");
            }
            Some(_) => return Ok(()),
            None => {}
        }
        let segment = self.create_segment(state, first)?;
        state.segments.push(segment);
        Ok(())
    }

    /// Creates the segment starting at `first` from the prepared file when one was started
    /// (waiting for it if needed), else, or if preparing it failed, inline without
    /// preallocation.
    fn create_segment(&self, state: &mut State, first: u64) -> Result<Segment, Error> {
        let dir = self.config.dir.as_path();
        if let Some(job) = state.prepare.take() {
            // Waiting holds the state lock, so appends and the planning step of reads wait too.
            // It only happens when the zero-fill took longer than three quarters of a segment
            // of appends; creating an unprepared segment instead would make every append to it
            // pay the slower, size-changing fdatasync for a whole segment. From here on the
            // zero-fill runs without its pauses, since an append now waits for it.
            job.pace.hurry();
            match job.thread.join() {
                Ok(Ok(prepared)) => {
                    return Segment::create_from_prepared(self.fs.as_ref(), dir, prepared, first)
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "preparing a segment failed; creating one inline");
                }
                // The thread panicked: an fsync failed there (or an assertion did), and that stops
                // the node here as it would have on this thread (`durable.rs`).
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        Segment::create(self.fs.as_ref(), dir, first)
    }

    /// Starts preparing the next segment file on a background thread, unless one is already
    /// being prepared. A failure to spawn only costs the preallocation.
    fn start_prepare(&self, state: &mut State, pace: fn() -> PreparePace) {
        if state.prepare.is_some() {
            return;
        }
        let pace = pace();
        let fs = self.fs.clone();
        let dir = self.config.dir.clone();
        let len = self.config.segment_bytes_max;
        let thread_pace = pace.clone();
        let spawned = std::thread::Builder::new()
            .name("raft-log-prepare".into())
            .spawn(move || segment::prepare(fs.as_ref(), &dir, len, &thread_pace));
        match spawned {
            Ok(thread) => state.prepare = Some(PrepareJob { thread, pace }),
            Err(e) => tracing::warn!(error = %e, "could not spawn segment preparation thread"),
        }
    }

    /// Encodes the batch into the reused buffer and writes it with one `pwrite`; returns the
    /// batch's sequence number for group commit.
    fn append_write<P: AsRef<[u8]>>(
        &self,
        state: &mut State,
        first: u64,
        payloads: &[P],
        batch_len: u64,
    ) -> Result<u64, Error> {
        let State {
            segments,
            encode_buf,
            written_seq,
            ..
        } = state;
        let segment = segments
            .last_mut()
            .expect("append_prepare_segment left an active segment");
        assert_eq!(
            segment.next_index(),
            first,
            "batch must continue the active segment"
        );
        let base = segment.end_offset;
        let count_before = segment.offsets.len();
        encode_buf.clear();
        encode_buf.reserve(batch_len as usize);
        for (i, payload) in payloads.iter().enumerate() {
            segment.offsets.push(base + encode_buf.len() as u64);
            format::encode_frame(encode_buf, first + i as u64, payload.as_ref());
        }
        assert_eq!(encode_buf.len() as u64, batch_len);
        if let Err(source) = segment.file.write_all_at(encode_buf, base) {
            segment.offsets.truncate(count_before);
            // A partial batch may now sit past `end_offset`. Poison rather than risk a later,
            // shorter batch leaving stale whole frames behind it; recovery sorts the file out.
            self.poisoned.store(true, Ordering::SeqCst);
            return Err(Error::Io {
                op: "append",
                path: segment.path.clone(),
                source,
            });
        }
        segment.end_offset += batch_len;
        let prepare_next = segment.end_offset >= self.config.segment_bytes_max / 4;
        if encode_buf.capacity() > ENCODE_BUF_KEEP_BYTES {
            *encode_buf = Vec::new();
        }
        *written_seq += 1;
        let seq = *written_seq;
        if prepare_next {
            // The successor of the active segment is prepared once the active one is a quarter
            // full: early enough that, even at full append speed, the zero-fill has three
            // quarters of a segment's worth of appends to finish (rotation waits for it
            // otherwise), and late enough that a log which never fills a quarter of a segment
            // never writes a segment's worth of zeros, and that the zero-fill does not compete
            // for the disk right after every rotation.
            self.start_prepare(state, PreparePace::background);
        }
        self.appends.fetch_add(1, Ordering::Relaxed);
        self.bytes_written.fetch_add(batch_len, Ordering::Relaxed);
        Ok(seq)
    }

    /// Makes everything appended so far durable, joining an in-flight fsync when that covers it.
    ///
    /// # Errors
    ///
    /// `Poisoned`.
    ///
    /// # Panics
    ///
    /// If an fsync fails (never retried; see `durable.rs`).
    pub fn sync(&self) -> Result<(), Error> {
        self.check_poisoned()?;
        let seq = self.state.lock().written_seq;
        self.sync_through(seq);
        Ok(())
    }

    /// Group commit: returns once batch `seq` is durable. One thread at a time runs the fsync,
    /// outside the state mutex; it first reads the newest written sequence, so its fsync covers
    /// every batch written before it started, and callers covered by it return without their own.
    fn sync_through(&self, seq: u64) {
        let mut sync = self.sync.lock();
        loop {
            assert!(!sync.failed, "an fsync failed in another thread; stopping");
            if sync.synced_seq >= seq {
                return;
            }
            if !sync.in_flight {
                break;
            }
            self.sync_done.wait(&mut sync);
        }
        sync.in_flight = true;
        drop(sync);
        let (target, active) = {
            let state = self.state.lock();
            let active = state
                .segments
                .last()
                .map(|s| (s.file.clone(), s.path.clone()));
            (state.written_seq, active)
        };
        // Older segments were synced when sealed, so syncing the active one covers `target`.
        let result = match &active {
            Some((file, path)) => {
                durable::timed_sync(file.as_ref(), path, self.config.fsync_warn_ms).map(Some)
            }
            None => Ok(None),
        };
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        if let Ok(Some(took)) = &result {
            self.observe_fsync(*took);
        }
        let mut sync = self.sync.lock();
        sync.in_flight = false;
        if let Err(e) = result {
            sync.failed = true;
            drop(sync);
            self.sync_done.notify_all();
            let path = active.map(|(_, p)| p).unwrap_or_default();
            durable::fsync_failed(&path, &e);
        }
        sync.synced_seq = sync.synced_seq.max(target);
        drop(sync);
        self.sync_done.notify_all();
    }

    /// Hands the duration of one segment fdatasync on the append path to the configured
    /// observer.
    fn observe_fsync(&self, took: Duration) {
        if let Some(observer) = &self.config.fsync_observer {
            observer.observe(took);
        }
    }

    /// Entries present in `[from, to_exclusive)`, in order, clipped to what exists; never
    /// entries at or below the purge point. Payloads are read with `pread` and CRC-checked.
    ///
    /// # Errors
    ///
    /// `Corrupt` if a frame read back fails its CRC, length or index check; `Io`; `Poisoned`.
    pub fn read(
        &self,
        from: LogIndex,
        to_exclusive: LogIndex,
    ) -> Result<Vec<(LogIndex, Vec<u8>)>, Error> {
        self.check_poisoned()?;
        let _gate = self.truncate_gate.read();
        let plans = self.state.lock().read_plans(from.0, to_exclusive.0);
        let count: u64 = plans.iter().map(|p| p.to - p.from).sum();
        let mut out = Vec::with_capacity(count as usize);
        for plan in &plans {
            segment::read_frames(plan, self.config.frame_bytes_max, &mut out)?;
        }
        Ok(out)
    }

    /// Removes `index` and every entry after it, durably: later segments are removed newest
    /// first and the directory synced, then the containing segment is cut and synced. A no-op
    /// if `index` is past the last entry.
    ///
    /// # Errors
    ///
    /// `OutOfRange` if `index` is at or below the purge point; `Io`; `Poisoned`.
    ///
    /// # Panics
    ///
    /// If an fsync fails.
    pub fn truncate_from(&self, index: LogIndex) -> Result<(), Error> {
        self.check_poisoned()?;
        let _gate = self.truncate_gate.write();
        let mut state = self.state.lock();
        if let Some(purged) = state.purged.filter(|&p| index.0 <= p) {
            return Err(Error::OutOfRange {
                index,
                purged_through: LogIndex(purged),
            });
        }
        if state.last_index().is_none_or(|last| index.0 > last) {
            return Ok(());
        }
        let mut removed = false;
        while state
            .segments
            .last()
            .is_some_and(|s| s.first_index > index.0)
        {
            let segment = state.segments.pop().expect("checked non-empty");
            if let Err(source) = self.fs.remove_file(&segment.path) {
                let path = segment.path.clone();
                state.segments.push(segment);
                return Err(Error::Io {
                    op: "remove segment",
                    path,
                    source,
                });
            }
            removed = true;
        }
        if removed {
            // Crash before this sync returns: some removed segments may reappear, but only a
            // newest-first run of them, so the log is still contiguous; the caller has not
            // returned and Raft repeats the truncation. This sync comes before the cut below so
            // that a cut never becomes durable while a later segment survives (a gap).
            sync_dir_or_panic(self.fs.as_ref(), &self.config.dir);
        }
        if let Some(segment) = state.segments.last_mut() {
            if let Err(e) = segment.truncate_from(index.0) {
                // Some of the frames to cut may already be zeroed while the index still lists
                // them; recovery sorts the file out.
                self.poisoned.store(true, Ordering::SeqCst);
                return Err(e);
            }
            self.fsyncs.fetch_add(1, Ordering::Relaxed);
        }
        // Sealed segments were synced when sealed and the cut synced the active one.
        let written_seq = state.written_seq;
        let mut sync = self.sync.lock();
        sync.synced_seq = sync.synced_seq.max(written_seq);
        Ok(())
    }

    /// Purges every entry at or below `index`, storing no payload with the purge point; the
    /// same as [`Wal::purge_through_with`] with the payload absent (a later [`Wal::purged`]
    /// returns `payload: None`). Kept for callers that keep no metadata of their own with it.
    ///
    /// # Errors
    ///
    /// As [`Wal::purge_through_with`].
    ///
    /// # Panics
    ///
    /// As [`Wal::purge_through_with`].
    pub fn purge_through(&self, index: LogIndex) -> Result<(), Error> {
        self.purge_through_inner(index, None)
    }

    /// Purges every entry at or below `index` and stores `payload` with the purge point. The
    /// purge point and the payload go to disk together (one file, replaced atomically and
    /// fsynced, directory fsynced) before any segment is deleted, so after a crash the stored
    /// payload always belongs to the stored purge point, and no entry above the stored purge
    /// point is ever gone. openraft stores its purged log id here: it needs the term, which the
    /// purged entries no longer provide.
    ///
    /// - Whole segments holding only purged entries are removed afterwards; a crash before
    ///   that is completed at the next open.
    /// - `index` may lie beyond the last entry (after a snapshot install): the log becomes
    ///   empty and the next append starts at `index + 1`.
    /// - Below the current purge point: a no-op, the stored payload is kept. At the current
    ///   purge point: only the payload is replaced, if it differs (so a caller can move its
    ///   payload in from a file of its own).
    /// - On a never-purged log whose first entry is above `index + 1`, the purge point recorded
    ///   is `first - 1` (recovery rejects a gap before the first segment); the payload is stored
    ///   as given, and [`Wal::purged`] returns it with the recorded index.
    ///
    /// # Errors
    ///
    /// `Io`, also for a payload over 4096 bytes (nothing is changed then); after another `Io`
    /// the purge point may or may not be durable; retry. `Poisoned`.
    ///
    /// # Panics
    ///
    /// If an fsync fails, or if `index` is `u64::MAX` (no next index would remain).
    pub fn purge_through_with(&self, index: LogIndex, payload: &[u8]) -> Result<(), Error> {
        if payload.len() > PURGE_PAYLOAD_BYTES_MAX {
            let path = self.config.dir.join(PURGED_FILE);
            return Err(crate::error::io_error("encode purge point", &path)(
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "a purge payload of {} bytes exceeds {PURGE_PAYLOAD_BYTES_MAX} bytes",
                        payload.len()
                    ),
                ),
            ));
        }
        self.purge_through_inner(index, Some(payload))
    }

    fn purge_through_inner(&self, index: LogIndex, payload: Option<&[u8]>) -> Result<(), Error> {
        self.check_poisoned()?;
        let mut state = self.state.lock();
        match state.purged {
            Some(purged) if index.0 < purged => return Ok(()),
            Some(purged) if index.0 == purged => {
                if state.purged_payload.as_deref() != payload {
                    self.purge_save(&mut state, purged, payload)?;
                }
                return Ok(());
            }
            _ => {}
        }
        let mut purge_point = index.0;
        if let (Some(first), Some(_)) = (state.segments.first(), state.last_index()) {
            // Recovery rejects a gap between the purge point and the first segment.
            purge_point = purge_point.max(first.first_index.saturating_sub(1));
        }
        assert!(
            purge_point < u64::MAX,
            "purge point must leave room for a next index"
        );
        // Crash during this write: the old purge point and payload stay (the file is replaced
        // atomically), nothing was removed yet. Crash after it: recovery removes the segments
        // we were about to remove.
        self.purge_save(&mut state, purge_point, payload)?;
        let mut doomed = Vec::new();
        let mut kept = Vec::with_capacity(state.segments.len());
        for segment in state.segments.drain(..) {
            if segment.next_index() <= purge_point + 1 || segment.entry_count() == 0 {
                doomed.push(segment);
            } else {
                kept.push(segment);
            }
        }
        state.segments = kept;
        self.purge_remove_segments(doomed)
    }

    /// Writes `purged.meta` durably, then records the purge point in memory.
    fn purge_save(
        &self,
        state: &mut State,
        purge_point: u64,
        payload: Option<&[u8]>,
    ) -> Result<(), Error> {
        assert!(
            state.purged.is_none_or(|p| p <= purge_point),
            "the purge point never moves back"
        );
        let point = PurgePoint {
            index: LogIndex(purge_point),
            payload: payload.map(<[u8]>::to_vec),
        };
        meta::save_purge_point(self.fs.as_ref(), &self.config.dir, &point)?;
        state.purged = Some(purge_point);
        state.purged_payload = point.payload;
        Ok(())
    }

    /// Removes the files of purged segments, oldest first, then syncs the directory.
    fn purge_remove_segments(&self, doomed: Vec<Segment>) -> Result<(), Error> {
        if doomed.is_empty() {
            return Ok(());
        }
        let mut first_error = None;
        for segment in &doomed {
            if let Err(source) = self.fs.remove_file(&segment.path) {
                tracing::warn!(segment = %segment.path.display(), error = %source, "remove purged segment failed");
                first_error.get_or_insert(Error::Io {
                    op: "remove purged segment",
                    path: segment.path.clone(),
                    source,
                });
            }
        }
        // Crash before this sync returns: some purged segments may reappear; the durable purge
        // point hides their entries and recovery removes them.
        sync_dir_or_panic(self.fs.as_ref(), &self.config.dir);
        first_error.map_or(Ok(()), Err)
    }

    /// Stores the vote durably: overwrites the older of the two vote slots in place and
    /// fdatasyncs (see `meta::VoteSlots`).
    ///
    /// # Errors
    ///
    /// `Io`, also for a vote too large for a slot (over 472 bytes); `Poisoned`.
    ///
    /// # Panics
    ///
    /// If an fsync fails.
    pub fn save_vote(&self, vote: &[u8]) -> Result<(), Error> {
        self.check_poisoned()?;
        let mut meta = self.meta.lock();
        meta.vote_slots.save(vote, self.config.fsync_warn_ms)?;
        meta.vote = Some(vote.to_vec());
        Ok(())
    }

    /// The last saved vote.
    pub fn vote(&self) -> Option<Vec<u8>> {
        self.meta.lock().vote.clone()
    }

    /// Stores the committed marker atomically but without fsync, and at most every 100 ms.
    ///
    /// openraft calls this before every apply batch (hundreds of times a second under load)
    /// and uses the value only to re-apply entries sooner after a restart, so it skips both
    /// fsyncs, and a call within 100 ms of the last file write only updates the value in
    /// memory (written by the next call after the interval, or by [`Wal::close`]): a file
    /// create and rename per apply batch cost several percent of a busy node's CPU. After a
    /// crash the file holds an older value, or is empty or torn (its CRC fails and it reads as
    /// `None`, with a `warn`). Either way it is a value openraft once handed us, never one that
    /// was not committed, and openraft learns the current commit index from the leader again.
    ///
    /// # Errors
    ///
    /// `Io`; `Poisoned`.
    pub fn save_committed(&self, committed: &[u8]) -> Result<(), Error> {
        self.check_poisoned()?;
        let mut meta = self.meta.lock();
        meta.committed = Some(committed.to_vec());
        let due = meta
            .committed_written_at
            .is_none_or(|at| at.elapsed() >= COMMITTED_WRITE_INTERVAL);
        if due {
            self.write_committed(&mut meta)?;
        } else {
            meta.committed_dirty = true;
        }
        Ok(())
    }

    fn write_committed(&self, meta: &mut MetaState) -> Result<(), Error> {
        let Some(committed) = meta.committed.as_deref() else {
            return Ok(());
        };
        meta::write_atomic(
            self.fs.as_ref(),
            &self.config.dir,
            COMMITTED_FILE,
            committed,
            Durability::Buffered,
        )?;
        meta.committed_written_at = Some(Instant::now());
        meta.committed_dirty = false;
        Ok(())
    }

    /// The last saved committed marker (after a crash, possibly an older one, or `None`).
    pub fn committed(&self) -> Option<Vec<u8>> {
        self.meta.lock().committed.clone()
    }

    /// Orderly shutdown: makes everything appended durable, writes a committed marker newer than
    /// its file, and releases the files. Dropping a
    /// `Wal` instead never fsyncs, so buffered appends may be lost on a later power failure.
    ///
    /// # Errors
    ///
    /// `Poisoned`.
    ///
    /// # Panics
    ///
    /// If the fsync fails.
    pub fn close(self) -> Result<(), Error> {
        self.sync()?;
        {
            let mut meta = self.meta.lock();
            if meta.committed_dirty {
                self.write_committed(&mut meta)?;
            }
        }
        // Wait for a segment being prepared and remove it, so no thread writes into the
        // directory after close. Open would remove the `.tmp` anyway.
        if let Some(job) = self.state.lock().prepare.take() {
            job.pace.hurry();
            let joined = job
                .thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            if let Ok(prepared) = joined {
                drop(prepared.file);
                if let Err(e) = self.fs.remove_file(&prepared.path) {
                    tracing::warn!(error = %e, "could not remove prepared segment");
                }
            }
        }
        Ok(())
    }

    fn check_poisoned(&self) -> Result<(), Error> {
        if self.poisoned.load(Ordering::SeqCst) {
            Err(Error::Poisoned)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &std::path::Path) -> Wal {
        let mut config = Config::new(dir);
        config.segment_bytes_max = 4096;
        Wal::open(config).expect("open")
    }

    #[test]
    fn wal_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Wal>();
    }

    #[test]
    fn empty_log_starts_anywhere_then_requires_contiguity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wal = open(dir.path());
        assert_eq!(wal.next_index(), LogIndex(0));
        wal.append(LogIndex(5), &[b"a"], Durability::Sync)
            .expect("append");
        let err = wal
            .append(LogIndex(7), &[b"b"], Durability::Sync)
            .expect_err("gap");
        assert!(matches!(
            err,
            Error::NonContiguous {
                expected: LogIndex(6),
                found: LogIndex(7)
            }
        ));
        assert_eq!(wal.first_index(), Some(LogIndex(5)));
        assert_eq!(
            wal.read(LogIndex(0), LogIndex(100)).expect("read"),
            vec![(LogIndex(5), b"a".to_vec())]
        );
    }

    #[test]
    fn a_fresh_log_can_start_on_a_preallocated_segment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let seg_len = |dir: &std::path::Path| {
            std::fs::read_dir(dir)
                .expect("read_dir")
                .map(|e| e.expect("entry").path())
                .filter(|p| p.extension().is_some_and(|x| x == "seg"))
                .map(|p| std::fs::metadata(p).expect("metadata").len())
                .collect::<Vec<_>>()
        };
        for (prepare, sub) in [(true, "eager"), (false, "lazy")] {
            let mut config = Config::new(dir.path().join(sub));
            config.segment_bytes_max = 1 << 20;
            config.prepare_first_segment = prepare;
            let wal = Wal::open(config).expect("open");
            wal.append(LogIndex(1), &[b"first"], Durability::Sync)
                .expect("append");
            let lens = seg_len(&dir.path().join(sub));
            assert_eq!(lens.len(), 1, "{sub}: {lens:?}");
            // Preallocated: the file is a whole segment of zeros past the first frame.
            assert_eq!(lens[0] == 1 << 20, prepare, "{sub}: {lens:?}");
            drop(wal);
            let wal = Wal::open(Config::new(dir.path().join(sub))).expect("reopen");
            assert_eq!(
                wal.read(LogIndex(1), LogIndex(2)).expect("read"),
                vec![(LogIndex(1), b"first".to_vec())]
            );
        }
    }

    #[test]
    fn committed_writes_are_throttled_and_flushed_by_close() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wal = open(dir.path());
        wal.save_committed(b"a").expect("save");
        wal.save_committed(b"b").expect("save");
        // In memory at once; on disk only the first (the second came within the interval).
        assert_eq!(wal.committed(), Some(b"b".to_vec()));
        drop(wal);
        let wal = open(dir.path());
        assert_eq!(wal.committed(), Some(b"a".to_vec()));
        wal.save_committed(b"c").expect("save");
        wal.save_committed(b"d").expect("save");
        wal.close().expect("close");
        assert_eq!(open(dir.path()).committed(), Some(b"d".to_vec()));
    }

    #[test]
    fn rotation_keeps_entries_readable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wal = open(dir.path());
        let payload = [7u8; 1000];
        for i in 0..20 {
            wal.append(LogIndex(i), &[payload], Durability::Buffered)
                .expect("append");
        }
        let segments = std::fs::read_dir(dir.path())
            .expect("read_dir")
            .filter(|e| {
                e.as_ref()
                    .expect("entry")
                    .path()
                    .extension()
                    .is_some_and(|x| x == "seg")
            })
            .count();
        assert!(segments >= 5, "expected rotation, got {segments} segments");
        let entries = wal.read(LogIndex(3), LogIndex(17)).expect("read");
        assert_eq!(entries.len(), 14);
        assert!(entries
            .iter()
            .enumerate()
            .all(|(i, (index, p))| index.0 == 3 + i as u64 && p == &payload));
    }

    #[test]
    fn entry_too_large_is_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::new(dir.path());
        config.frame_bytes_max = 10;
        let wal = Wal::open(config).expect("open");
        let err = wal
            .append(LogIndex(1), &[[0u8; 11]], Durability::Sync)
            .expect_err("too large");
        assert!(matches!(err, Error::EntryTooLarge { len: 11, max: 10 }));
    }

    /// The fsync observer sees every segment fdatasync on the append path, and nothing else:
    /// a synced append reports one, a buffered append none, a rotation its seal as well.
    #[test]
    fn fsync_observer_sees_synced_appends_and_seals() {
        let dir = tempfile::tempdir().expect("tempdir");
        let seen = Arc::new(parking_lot::Mutex::new(Vec::<Duration>::new()));
        let mut config = Config::new(dir.path());
        config.segment_bytes_max = 4096;
        let sink = seen.clone();
        config.fsync_observer = Some(crate::FsyncObserver::new(move |took| {
            sink.lock().push(took)
        }));
        let wal = Wal::open(config).expect("open");

        wal.append(LogIndex(1), &[b"a"], Durability::Sync)
            .expect("append");
        assert_eq!(seen.lock().len(), 1, "one group commit");
        assert_eq!(wal.stats().fsyncs, 1);

        wal.append(LogIndex(2), &[b"b"], Durability::Buffered)
            .expect("append");
        assert_eq!(seen.lock().len(), 1, "a buffered append does not sync");
        wal.sync().expect("sync");
        assert_eq!(
            seen.lock().len(),
            2,
            "an explicit sync is a group commit too"
        );

        // 3 KiB entries: the second one seals the first segment, then syncs the new one.
        let big = [0u8; 3 * 1024];
        wal.append(LogIndex(3), &[big], Durability::Sync)
            .expect("append");
        wal.append(LogIndex(4), &[big], Durability::Sync)
            .expect("append");
        assert_eq!(seen.lock().len() as u64, wal.stats().fsyncs);
        assert_eq!(wal.stats().fsyncs, 5, "two group commits and one seal");
    }
}
