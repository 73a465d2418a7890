//! `LogStore`: openraft's `RaftLogStorage` over `raft_log::Wal`.
//!
//! # Correctness
//! How each clause of openraft's contract is met:
//! - *Entries are readable when `append` returns*: `Wal::append` writes them (buffered) before
//!   it returns, and `Wal::read` serves them from the file, synced or not.
//! - *The flush callback fires only after the entries are durable*: the callback goes to the
//!   flusher thread, which calls `Wal::sync` (fdatasync, shared by every callback waiting at that
//!   moment: group commit) and only then calls `io_completed`. A failed fsync panics inside
//!   `raft_log`, so a callback never reports success for bytes that may not be on disk.
//! - *I/O in submission order*: appends, truncations and purges all run on openraft's single
//!   RaftCore task against one `Wal`; the flusher only syncs, it never reorders writes.
//! - *No holes*: `Wal::append` refuses a first index other than `next_index()`.
//! - *Votes are durable before `save_vote` returns*: `Wal::save_vote` fsyncs a temp file,
//!   renames it and fsyncs the directory.
//! - *The purge point is persisted before entries are deleted*: `purge` hands the purged log id
//!   to `Wal::purge_through_with`, which makes it durable together with the purge index before
//!   it deletes any segment; a crash in between is finished at the next `open`. raft-log holds
//!   all of Raft's durable metadata (vote, committed, purge point) under one fsync policy.
//! - *Truncation is durable*: `Wal::truncate_from` fsyncs the cut.
//! - *Reads see exactly the log*: the decoded tail (`log_tail.rs`) that serves the newest
//!   entries is cut before the log is cut and filled after the log is written, on the same task.
//! - *One AppendEntries stays small*: `limited_get_log_entries` hands replication at most
//!   [`APPEND_BYTES_MAX`] bytes of entries (at least one entry), so one request fits a frame.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use tokio::time::Instant;

use std::io;

use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::{LogState, RaftLogReader};
use parking_lot::Mutex;
use raft_log::{Durability, LogIndex, Wal};

use crate::atomic_file;
use crate::codec;
use crate::log_tail::LogTail;
use crate::types::{Entry, LogId, TypeConfig, Vote};

/// File in the log directory where builds before the purge payload kept the last purged log
/// id; read once, moved into raft-log's purge point, then removed.
const OLD_PURGED_FILE: &str = "purged-log-id";

/// Subdirectory of the log directory that `raft_log` owns.
pub const WAL_DIR: &str = "wal";

/// Most entry bytes one AppendEntries carries (2 MiB) when it has more than one entry: a
/// follower that fell behind catches up in requests that cross a LAN in milliseconds and stay
/// far below the transport's frame limit. One entry always goes (the proposer caps one at
/// 1 MiB of bodies).
pub const APPEND_BYTES_MAX: usize = 2 << 20;

/// Entries read per step while filling an AppendEntries up to [`APPEND_BYTES_MAX`].
const READ_STEP: u64 = 16;

/// When the flush callback tells openraft that appended entries are durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AckPolicy {
    /// After `Wal::sync` returned (fdatasync): the contract openraft relies on.
    #[default]
    AfterFsync,
    /// At once, without any fdatasync. Deliberately broken: only the `ack-before-fsync` mode
    /// of the `weaken` feature selects it, to show that the harness catches the loss after a
    /// power failure.
    BeforeFsync,
    /// After `Wal::sync` on the appending task itself, with no flusher thread and no group
    /// commit: for the simulated cluster, whose paused clock would jump ahead while openraft
    /// waited for another thread.
    Inline,
}

/// How long the log's current fsync has run: what the disk watchdog (`handover.rs`) reads.
/// Cheap to clone; clones share the flusher's record. Times are tokio's, so a paused test
/// clock (the simulated cluster) sees stalls in virtual time.
#[derive(Clone, Default)]
pub struct SyncWatch {
    /// When the running sync started; `None` while none runs.
    started: Arc<Mutex<Option<Instant>>>,
    /// Test hook (weaken mode `stall-fsync`, the simulated cluster): syncs wait until then, as
    /// on a hung disk.
    stall_until: Arc<Mutex<Option<Instant>>>,
}

impl SyncWatch {
    /// How long the current sync has been running; zero when none runs.
    pub fn running_for(&self) -> Duration {
        self.started.lock().map_or(Duration::ZERO, |at| {
            Instant::now().saturating_duration_since(at)
        })
    }

    /// Makes every sync from now until `until` wait until then, as a hung disk would.
    pub fn stall_until(&self, until: Instant) {
        *self.stall_until.lock() = Some(until);
    }

    /// When a sync starting now would end its stall, if one is set; records the start.
    fn begin(&self) -> Option<Instant> {
        let now = Instant::now();
        *self.started.lock() = Some(now);
        let mut stall = self.stall_until.lock();
        match *stall {
            Some(until) if until > now => Some(until),
            _ => {
                *stall = None;
                None
            }
        }
    }

    /// Runs one sync on the flusher thread, recording when it started.
    fn time<T>(&self, sync: impl FnOnce() -> T) -> T {
        if let Some(until) = self.begin() {
            std::thread::sleep(until.saturating_duration_since(Instant::now()));
        }
        let result = sync();
        *self.started.lock() = None;
        result
    }

    /// Runs one sync on the appending task ([`AckPolicy::Inline`]).
    async fn time_inline<T>(&self, sync: impl FnOnce() -> T) -> T {
        if let Some(until) = self.begin() {
            tokio::time::sleep_until(until).await;
        }
        let result = sync();
        *self.started.lock() = None;
        result
    }
}

/// The Raft log of one node. Cheap to clone; clones share the same `Wal` and serve as
/// openraft's log reader handles for the replication tasks.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

struct Inner {
    wal: Arc<Wal>,
    dir: PathBuf,
    /// Last purged log id and last present log id, kept in memory so `get_log_state` reads no
    /// disk. Updated by `append`, `truncate` and `purge` (all on the RaftCore task).
    state: Mutex<LogState<TypeConfig>>,
    /// The newest entries, decoded: what replication and apply read nearly always.
    tail: Mutex<LogTail>,
    /// The flusher thread's queue; `None` with [`AckPolicy::Inline`].
    flusher: Option<mpsc::Sender<IOFlushed<TypeConfig>>>,
    /// Index of the last committed id openraft saved, for metrics and readiness.
    committed_index: Arc<AtomicU64>,
    sync_watch: SyncWatch,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("dir", &self.inner.dir)
            .finish()
    }
}

/// A raft-log error as the io error openraft's storage traits return, keeping its message
/// (which names the file and offset for corruption).
fn io_err(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::other(e)
}

impl LogStore {
    /// Opens (or creates) the log in `dir`, running `raft_log`'s recovery.
    ///
    /// # Errors
    /// Recovery found corruption (the error names file and offset), the purge point file is
    /// damaged, or an io error.
    pub fn open(dir: &Path) -> io::Result<LogStore> {
        Self::open_with(dir, raft_log::Config::new(dir.join(WAL_DIR)))
    }

    /// Opens the log with an explicit `raft_log` configuration; `dir` holds the purge point.
    ///
    /// # Errors
    /// As [`LogStore::open`].
    pub fn open_with(dir: &Path, config: raft_log::Config) -> io::Result<LogStore> {
        std::fs::create_dir_all(dir)?;
        let wal = Wal::open(config).map_err(io_err)?;
        Self::from_wal(wal, dir.to_path_buf())
    }

    /// Wraps an already opened `Wal` (tests use this with a fault-injecting file system);
    /// `dir` holds the purge point file and must not be the `Wal`'s own directory.
    ///
    /// # Errors
    /// As [`LogStore::open`].
    pub fn from_wal(wal: Wal, dir: PathBuf) -> io::Result<LogStore> {
        Self::from_wal_acking(wal, dir, AckPolicy::AfterFsync)
    }

    /// Like [`LogStore::from_wal`], acknowledging appends as `ack` says.
    ///
    /// # Errors
    /// As [`LogStore::open`].
    pub fn from_wal_acking(wal: Wal, dir: PathBuf, ack: AckPolicy) -> io::Result<LogStore> {
        let wal = Arc::new(wal);
        migrate_old_purged(&wal, &dir)?;
        let purged = match wal.purged().and_then(|p| p.payload) {
            Some(bytes) => codec::decode_log_id(&bytes).map_err(|e| {
                invalid_data(format!(
                    "{}: purged log id: {e}",
                    dir.join(WAL_DIR).display()
                ))
            })?,
            None => None,
        };
        let last = match wal.last_index() {
            Some(index) => Some(read_log_id(&wal, &dir, index)?),
            None => purged,
        };
        let sync_watch = SyncWatch::default();
        let flusher = if ack == AckPolicy::Inline {
            None
        } else {
            let (tx, rx) = mpsc::channel();
            let flusher_wal = wal.clone();
            let flusher_watch = sync_watch.clone();
            thread::Builder::new()
                .name("raft-log-flusher".into())
                .spawn(move || run_flusher(&flusher_wal, &rx, ack, &flusher_watch))?;
            Some(tx)
        };
        Ok(LogStore {
            inner: Arc::new(Inner {
                wal,
                dir,
                state: Mutex::new(LogState {
                    last_purged_log_id: purged,
                    last_log_id: last,
                }),
                tail: Mutex::new(LogTail::default()),
                flusher,
                committed_index: Arc::new(AtomicU64::new(0)),
                sync_watch,
            }),
        })
    }

    /// The last committed index openraft reported, shared for metrics and readiness.
    pub fn committed_index(&self) -> Arc<AtomicU64> {
        self.inner.committed_index.clone()
    }

    /// The flusher's sync progress, for the disk watchdog.
    pub fn sync_watch(&self) -> SyncWatch {
        self.inner.sync_watch.clone()
    }

    /// The underlying `Wal`, for metrics and tests. Writing to it directly bypasses the
    /// decoded tail: only a store that is dropped next may do it.
    pub fn wal(&self) -> &Wal {
        &self.inner.wal
    }
}

/// Group commit for openraft's flush callbacks: take every callback waiting now, fsync once,
/// then complete them all. Runs until every `LogStore` clone is dropped.
fn run_flusher(
    wal: &Wal,
    rx: &mpsc::Receiver<IOFlushed<TypeConfig>>,
    ack: AckPolicy,
    watch: &SyncWatch,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        if ack == AckPolicy::BeforeFsync {
            // Deliberately broken (weaken mode `ack-before-fsync`): the entries are only in the
            // page cache, and a power failure loses them after they were acknowledged.
            for callback in batch {
                callback.io_completed(Ok(()));
            }
            continue;
        }
        // `Wal::sync` panics if fsync itself fails (the page cache no longer tells us what is
        // on disk, so nothing may be acknowledged); an `Err` here is a closed or broken Wal,
        // which openraft treats as a fatal storage error.
        let result = watch.time(|| wal.sync());
        for callback in batch {
            let outcome = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::other(e.to_string())),
            };
            callback.io_completed(outcome);
        }
    }
}

fn invalid_data(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Moves the purged log id of a data dir written before raft-log stored it (its own file in
/// `dir`) into raft-log's purge point, then removes the file. A crash in between leaves both,
/// and the next open does it again.
fn migrate_old_purged(wal: &Wal, dir: &Path) -> io::Result<()> {
    let path = dir.join(OLD_PURGED_FILE);
    let Some(bytes) = atomic_file::read(&path)? else {
        return Ok(());
    };
    let body = atomic_file::unseal(&bytes)
        .ok_or_else(|| invalid_data(format!("checksum mismatch in {}", path.display())))?;
    let purged =
        codec::decode_log_id(body).map_err(|e| invalid_data(format!("{}: {e}", path.display())))?;
    if let Some(purged) = purged {
        // The old build persisted this file before purging the Wal, so the Wal's own purge
        // point is at or below it: this finishes that purge and stores the id with it.
        wal.purge_through_with(LogIndex(purged.index), body)
            .map_err(io_err)?;
    }
    std::fs::remove_file(&path)?;
    std::fs::File::open(dir)?.sync_all()
}

fn read_log_id(wal: &Wal, dir: &Path, index: LogIndex) -> io::Result<LogId> {
    let entries = wal.read(index, LogIndex(index.0 + 1)).map_err(io_err)?;
    let (_, bytes) = entries
        .first()
        .ok_or_else(|| io::Error::other(format!("log entry {} missing", index.0)))?;
    Ok(decode_at(dir, index, bytes)?.log_id)
}

/// Decodes the entry the Wal in `dir` filed at `index`. An entry of a future format, or one
/// whose own index is not where it was filed (paired check), is refused, naming the log.
fn decode_at(dir: &Path, index: LogIndex, bytes: &[u8]) -> io::Result<Entry> {
    let refuse = |what: String| {
        invalid_data(format!(
            "raft log in {}: entry {}: {what}",
            dir.display(),
            index.0
        ))
    };
    let entry = codec::decode_entry(bytes).map_err(|e| refuse(e.to_string()))?;
    if entry.log_id.index != index.0 {
        return Err(refuse(format!("holds index {}", entry.log_id.index)));
    }
    Ok(entry)
}

impl LogStore {
    /// Entries in `[start, end)` for a reader outside Raft (the archive), stopping once they
    /// hold `budget` bytes (at least one entry). Purged entries are missing from the front:
    /// the caller checks the first index.
    ///
    /// # Errors
    /// The log cannot be read or holds a damaged entry.
    pub fn read_range(&self, start: u64, end: u64, budget: usize) -> io::Result<Vec<Entry>> {
        self.read_within(start, end, budget)
    }

    /// Entries in `[start, end)`, stopping once they hold `budget` bytes (at least one entry).
    /// The decoded tail serves what it holds; the file serves the rest.
    fn read_within(&self, start: u64, end: u64, budget: usize) -> io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        // Whether one more entry of `size` bytes fits the budget (the first always does).
        let mut fits = |size: usize, out: &Vec<Entry>| {
            bytes = bytes.saturating_add(size);
            bytes <= budget || out.is_empty()
        };
        // Purged entries are gone; the range starts at the first one present.
        let mut at = start.max(self.inner.wal.first_index().map_or(start, |first| first.0));
        while at < end {
            let tail_first = {
                let tail = self.inner.tail.lock();
                while at < end {
                    let Some((entry, size)) = tail.get(at) else {
                        break;
                    };
                    if !fits(size, &out) {
                        return Ok(out);
                    }
                    out.push(entry.clone());
                    at += 1;
                }
                tail.first()
            };
            if at >= end {
                break;
            }
            // The file, up to where the tail starts if it starts further on.
            let mut step_end = end.min(at.saturating_add(READ_STEP));
            if let Some(first) = tail_first.filter(|&first| first > at) {
                step_end = step_end.min(first);
            }
            let raw = self
                .inner
                .wal
                .read(LogIndex(at), LogIndex(step_end))
                .map_err(io_err)?;
            let Some(&(last, _)) = raw.last() else {
                break;
            };
            for (index, payload) in &raw {
                if !fits(payload.len(), &out) {
                    return Ok(out);
                }
                out.push(decode_at(&self.inner.dir, *index, payload)?);
            }
            if last.0 + 1 < step_end {
                // The log ends here.
                break;
            }
            at = step_end;
        }
        Ok(out)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<Entry>> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => e.saturating_add(1),
            Bound::Excluded(&e) => e,
            Bound::Unbounded => u64::MAX,
        };
        if start >= end {
            return Ok(Vec::new());
        }
        self.read_within(start, end, usize::MAX)
    }

    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> io::Result<Vec<Entry>> {
        self.read_within(start, end, APPEND_BYTES_MAX)
    }

    async fn read_vote(&mut self) -> io::Result<Option<Vote>> {
        match self.inner.wal.vote() {
            None => Ok(None),
            Some(bytes) => codec::decode_vote(&bytes)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("vote: {e}"))),
        }
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> io::Result<LogState<TypeConfig>> {
        Ok(self.inner.state.lock().clone())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> io::Result<()> {
        self.inner
            .wal
            .save_vote(&codec::encode_vote(vote))
            .map_err(io_err)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> io::Result<()> {
        if let Some(id) = committed {
            self.inner
                .committed_index
                .fetch_max(id.index, Ordering::Relaxed);
        }
        // Buffered on purpose: openraft calls this before every apply batch, and a stale value
        // after a power failure only means re-applying less at startup.
        self.inner
            .wal
            .save_committed(&codec::encode_log_id(&committed))
            .map_err(io_err)
    }

    async fn read_committed(&mut self) -> io::Result<Option<LogId>> {
        match self.inner.wal.committed() {
            None => Ok(None),
            Some(bytes) => match codec::decode_log_id(&bytes) {
                Ok(Some(committed)) => {
                    // A committed id past the last entry can only come from a log that lost
                    // synced entries (outside raft-log's recovery assumption). Re-applying up
                    // to it would read entries that are gone, so clamp it and let the leader
                    // re-replicate the rest.
                    let last = self.inner.state.lock().last_log_id;
                    if last.is_none_or(|last| last.index < committed.index) {
                        tracing::warn!(committed = committed.index, last = ?last, "committed log id is past the end of the log; clamping");
                        return Ok(last);
                    }
                    Ok(Some(committed))
                }
                Ok(None) => Ok(None),
                Err(e) => {
                    tracing::warn!(error = %e, "committed log id unreadable; ignoring it");
                    Ok(None)
                }
            },
        }
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut first: Option<u64> = None;
        let mut last: Option<LogId> = None;
        let mut payloads = Vec::new();
        let mut decoded = Vec::new();
        let purged = self.inner.wal.purged_through().map(|p| p.0);
        for entry in entries {
            let log_id = entry.log_id;
            // An entry at or below the purge point is already covered by the state machine
            // and can never be read again; openraft's suite writes such entries after
            // `get_initial_state` purged up to the state machine. Skip them.
            if purged.is_some_and(|p| log_id.index <= p) {
                continue;
            }
            if let Some(prev) = last {
                assert_eq!(log_id.index, prev.index + 1, "openraft appended a hole");
            }
            first.get_or_insert(log_id.index);
            last = Some(log_id);
            let payload = codec::encode_entry(&entry);
            decoded.push((entry, payload.len()));
            payloads.push(payload);
        }
        if let (Some(first), Some(last)) = (first, last) {
            // openraft truncates a conflicting suffix before appending, but its contract (and
            // its test suite) also allows writing over present entries, like a map insert.
            // The Wal only appends at its end, so cut the overlap first; that cut is durable.
            if self
                .inner
                .wal
                .last_index()
                .is_some_and(|present| present.0 >= first)
            {
                self.inner.tail.lock().cut_from(first);
                self.inner
                    .wal
                    .truncate_from(LogIndex(first))
                    .map_err(io_err)?;
            }
            self.inner
                .wal
                .append(LogIndex(first), &payloads, Durability::Buffered)
                .map_err(io_err)?;
            let mut tail = self.inner.tail.lock();
            for (entry, size) in decoded {
                tail.push(entry, size);
            }
            drop(tail);
            self.inner.state.lock().last_log_id = Some(last);
        }
        // Durability is the flusher's job; the entries are readable already.
        match &self.inner.flusher {
            Some(flusher) => flusher
                .send(callback)
                .map_err(|_| io::Error::other("log flusher stopped"))?,
            None => {
                let wal = &self.inner.wal;
                let result = self.inner.sync_watch.time_inline(|| wal.sync()).await;
                callback.io_completed(result.map_err(|e| io::Error::other(e.to_string())));
            }
        }
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> io::Result<()> {
        let wal = &self.inner.wal;
        // Entries at or below the purge point are covered by the state machine; there is
        // nothing of them left to cut.
        let from = last_log_id
            .map_or(0, |id| id.index + 1)
            .max(wal.purged_through().map_or(0, |p| p.0 + 1));
        if wal.last_index().is_some_and(|last| last.0 >= from) {
            self.inner.tail.lock().cut_from(from);
            wal.truncate_from(LogIndex(from)).map_err(io_err)?;
        }
        let last = match wal.last_index() {
            Some(index) => Some(read_log_id(wal, &self.inner.dir, index)?),
            None => self.inner.state.lock().last_purged_log_id,
        };
        self.inner.state.lock().last_log_id = last;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        // raft-log makes the id durable with the purge point before it deletes any entry
        // (openraft's rule); a crash in between is finished at the next open.
        self.inner.tail.lock().purge_through(log_id.index);
        self.inner
            .wal
            .purge_through_with(LogIndex(log_id.index), &codec::encode_log_id(&Some(log_id)))
            .map_err(io_err)?;
        let mut state = self.inner.state.lock();
        state.last_purged_log_id = Some(log_id);
        if state
            .last_log_id
            .is_none_or(|last| last.index < log_id.index)
        {
            state.last_log_id = Some(log_id);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::CommittedLeaderId;
    use openraft::vote::RaftLeaderId;

    fn log_id(index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(4, 2), index)
    }

    fn blank(index: u64) -> Entry {
        Entry {
            log_id: log_id(index),
            payload: openraft::EntryPayload::Blank,
        }
    }

    /// A data dir of the build before raft-log kept the purged log id: the id in its own sealed
    /// file, the Wal purged to the same point or (after a crash in between) not yet.
    #[tokio::test]
    async fn an_old_purged_log_id_file_moves_into_the_log_and_finishes_its_purge() {
        for wal_purged_too in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            {
                let mut store = LogStore::open(dir.path()).unwrap();
                openraft::storage::RaftLogStorageExt::blocking_append(
                    &mut store,
                    (0..20).map(blank).collect::<Vec<_>>(),
                )
                .await
                .unwrap();
                if wal_purged_too {
                    store.wal().purge_through(LogIndex(9)).unwrap();
                }
            }
            let old = dir.path().join(OLD_PURGED_FILE);
            crate::atomic_file::write_durably(
                &old,
                &crate::atomic_file::seal(&codec::encode_log_id(&Some(log_id(9)))),
            )
            .unwrap();

            let mut store = LogStore::open(dir.path()).unwrap();
            let state = store.get_log_state().await.unwrap();
            assert_eq!(
                state.last_purged_log_id,
                Some(log_id(9)),
                "{wal_purged_too}"
            );
            assert_eq!(state.last_log_id, Some(log_id(19)));
            let first = store.try_get_log_entries(0..20).await.unwrap()[0].log_id;
            assert_eq!(
                first,
                log_id(10),
                "nothing at or below the purge point is served"
            );
            assert!(!old.exists(), "the old file is gone once moved");
            drop(store);
            let mut reopened = LogStore::open(dir.path()).unwrap();
            let state = reopened.get_log_state().await.unwrap();
            assert_eq!(
                state.last_purged_log_id,
                Some(log_id(9)),
                "kept by raft-log"
            );
        }
    }

    /// One step of [`reads_through_the_tail_are_reads_of_the_log`].
    #[derive(Debug, Clone)]
    enum Step {
        /// Append `count` entries from `back` entries before the end (writing over them).
        Append {
            back: u64,
            count: u64,
            name_len: usize,
        },
        /// Truncate after the entry `back` entries before the last.
        Truncate { back: u64 },
        /// Purge through the entry `ahead` entries after the first.
        Purge { ahead: u64 },
        /// Close and open the store: its tail starts empty.
        Reopen,
        /// Read `[first + from, first + from + len)` within `budget` bytes.
        Read { from: u64, len: u64, budget: usize },
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0u64..4, 1u64..40, 0usize..300)
                .prop_map(|(back, count, name_len)| Step::Append { back, count, name_len }),
            1 => (0u64..20).prop_map(|back| Step::Truncate { back }),
            1 => (0u64..20).prop_map(|ahead| Step::Purge { ahead }),
            1 => Just(Step::Reopen),
            4 => (0u64..80, 0u64..80, 1usize..4000)
                .prop_map(|(from, len, budget)| Step::Read { from, len, budget }),
        ]
    }

    fn named(term: u64, index: u64, name_len: usize) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 2), index),
            payload: openraft::EntryPayload::Normal(
                chat_sm::Command::RegisterUser {
                    name: "n".repeat(name_len),
                    public_key: [0; 32],
                }
                .into(),
            ),
        }
    }

    /// The log as a model: what it holds from `first` on, encoded.
    struct Model {
        first: u64,
        entries: Vec<Vec<u8>>,
    }

    impl Model {
        fn end(&self) -> u64 {
            self.first + self.entries.len() as u64
        }

        /// `[start, end)` as `read_within` must give it: from the first entry present, stopping
        /// before the entry that would pass `budget` bytes (never before the first).
        fn read(&self, start: u64, end: u64, budget: usize) -> Vec<Vec<u8>> {
            let (mut out, mut bytes) = (Vec::new(), 0usize);
            for index in start.max(self.first)..end.min(self.end()) {
                let entry = &self.entries[(index - self.first) as usize];
                bytes += entry.len();
                if bytes > budget && !out.is_empty() {
                    break;
                }
                out.push(entry.clone());
            }
            out
        }
    }

    /// Whatever the store did (appends over present entries, truncations, purges, restarts
    /// that empty the tail), every read returns exactly the entries the log holds, within its
    /// budget, and the tail holds only entries the log holds.
    #[test]
    fn reads_through_the_tail_are_reads_of_the_log() {
        use proptest::prelude::*;
        let config = ProptestConfig {
            cases: 48,
            ..ProptestConfig::default()
        };
        proptest!(config, |(steps in proptest::collection::vec(step(), 1..40))| {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            runtime.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let mut store = LogStore::open(dir.path()).unwrap();
                let mut model = Model { first: 0, entries: Vec::new() };
                let mut term = 1;
                for step in steps {
                    match step {
                        Step::Append { back, count, name_len } => {
                            // A new term writes over what it replaces, as a new leader does.
                            term += 1;
                            let from = model.end().saturating_sub(back).max(model.first);
                            let entries: Vec<Entry> =
                                (from..from + count).map(|i| named(term, i, name_len)).collect();
                            model.entries.truncate((from - model.first) as usize);
                            model.entries.extend(entries.iter().map(codec::encode_entry));
                            openraft::storage::RaftLogStorageExt::blocking_append(&mut store, entries)
                                .await
                                .unwrap();
                        }
                        Step::Truncate { back } => {
                            if model.entries.is_empty() {
                                continue;
                            }
                            let keep = model.end().saturating_sub(1 + back).max(model.first);
                            let last = codec::decode_entry(&model.entries[(keep - model.first) as usize])
                                .unwrap()
                                .log_id;
                            store.truncate_after(Some(last)).await.unwrap();
                            model.entries.truncate((keep + 1 - model.first) as usize);
                        }
                        Step::Purge { ahead } => {
                            if model.entries.is_empty() {
                                continue;
                            }
                            let through = (model.first + ahead).min(model.end() - 1);
                            let id = codec::decode_entry(&model.entries[(through - model.first) as usize])
                                .unwrap()
                                .log_id;
                            store.purge(id).await.unwrap();
                            model.entries.drain(..=((through - model.first) as usize));
                            model.first = through + 1;
                        }
                        Step::Reopen => {
                            drop(store);
                            store = LogStore::open(dir.path()).unwrap();
                        }
                        Step::Read { from, len, budget } => {
                            let start = model.first + from;
                            let got: Vec<Vec<u8>> = store
                                .read_within(start, start + len, budget)
                                .unwrap()
                                .iter()
                                .map(codec::encode_entry)
                                .collect();
                            prop_assert_eq!(got, model.read(start, start + len, budget));
                        }
                    }
                    let tail = store.inner.tail.lock();
                    let mut index = tail.first().unwrap_or(0);
                    while let Some((entry, size)) = tail.get(index) {
                        let held = model.entries.get(index.wrapping_sub(model.first) as usize);
                        let bytes = codec::encode_entry(entry);
                        prop_assert_eq!(Some(&bytes), held, "tail entry {}", index);
                        prop_assert_eq!(size, bytes.len());
                        index += 1;
                    }
                }
                Ok(())
            })?;
        });
    }

    #[tokio::test]
    async fn a_damaged_old_purged_log_id_file_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        drop(LogStore::open(dir.path()).unwrap());
        std::fs::write(dir.path().join(OLD_PURGED_FILE), b"garbage!").unwrap();
        let err = LogStore::open(dir.path()).expect_err("refused");
        assert!(err.to_string().contains(OLD_PURGED_FILE), "{err}");
    }

    #[tokio::test]
    async fn an_entry_of_a_future_format_is_refused_naming_the_log() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = LogStore::open(dir.path()).unwrap();
            openraft::storage::RaftLogStorageExt::blocking_append(&mut store, vec![blank(0)])
                .await
                .unwrap();
            let mut future = codec::encode_entry(&blank(1));
            future[0] = codec::FORMAT_VERSION + 1;
            store
                .wal()
                .append(LogIndex(1), &[future], Durability::Sync)
                .unwrap();
        }
        let err = LogStore::open(dir.path()).expect_err("refused");
        let text = err.to_string();
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
        assert!(text.contains("unsupported format version"), "{text}");
    }
}
