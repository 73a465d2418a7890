//! `StateMachine`: openraft's `RaftStateMachine` over `chat_sm::ChatState`, with snapshots kept
//! as files.
//!
//! # Correctness
//! - *One response per entry*: `ChatState::apply` returns exactly one `ChatResponse` per
//!   `ApplyEntry` (asserted here), blank and membership entries included.
//! - *Last applied and membership persist with the state*: they ride in the same RocksDB
//!   `WriteBatch` as the messages (`RaftMeta`), so a restart never sees one without the other.
//! - *A snapshot is a consistent view*: `ChatState::build_snapshot` streams from a RocksDB
//!   snapshot while applies continue, and syncs RocksDB's WAL first, so everything at or below
//!   the snapshot's index is durable before openraft purges the log below it.
//! - *Install replaces state atomically, then saves the snapshot, then drops older ones*: the
//!   received file is verified and swapped in by `ChatState::install_snapshot`, then renamed to
//!   `current.snap` (fsync, rename, directory fsync); the rename replaces the previous snapshot.
//!   A crash between the two leaves the new state with the older snapshot file, which is still a
//!   valid (older) snapshot to send to others.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use chat_sm::{ApplyEntry, ApplyPayload, ChatResponse, ChatState, RaftMeta, SnapshotInfo};
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{AnyError, EntryPayload, RaftLogId, StorageIOError};
use parking_lot::Mutex;

use crate::codec;
use crate::metrics::StorageMetrics;
use crate::snapshot_file::SnapshotFile;
use crate::types::{
    Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};

/// Name of the snapshot that `get_current_snapshot` serves.
pub(crate) const CURRENT_SNAPSHOT: &str = "current.snap";

/// The chat state machine as openraft drives it. Cheap to clone; the node keeps a clone (or
/// [`StateMachine::chat`]) for reads.
#[derive(Clone)]
pub struct StateMachine {
    inner: Arc<Inner>,
    /// Where apply latency and snapshot times go; `None` in tests and tools.
    metrics: Option<StorageMetrics>,
}

struct Inner {
    chat: Arc<ChatState>,
    snapshot_dir: PathBuf,
    /// Metadata of `current.snap`, if there is one. Held while a snapshot file is renamed into
    /// place so readers never pair new metadata with an old file.
    current: Mutex<Option<SnapshotMeta>>,
    /// Makes temp file names unique within this process.
    next_tmp: AtomicU64,
}

fn any(e: impl std::error::Error + 'static) -> AnyError {
    AnyError::new(&e)
}

impl StateMachine {
    /// Opens the chat state in `dir/chat` and the snapshots in `dir/snapshots`.
    ///
    /// # Errors
    /// RocksDB fails to open, or the current snapshot file is unreadable.
    pub fn open(dir: &Path) -> Result<StateMachine, StorageError> {
        let chat = ChatState::open(chat_sm::Config::new(dir.join("chat")))
            .map_err(|e| StorageIOError::read_state_machine(any(e)))?;
        let snapshot_dir = dir.join("snapshots");
        std::fs::create_dir_all(&snapshot_dir)
            .map_err(|e| StorageIOError::write_snapshot(None, any(e)))?;
        remove_temp_files(&snapshot_dir)?;
        let current_path = snapshot_dir.join(CURRENT_SNAPSHOT);
        let current = if current_path.exists() {
            let info = chat_sm::read_snapshot_info(&current_path)
                .map_err(|e| StorageIOError::read_snapshot(None, any(e)))?;
            Some(snapshot_meta(&info)?)
        } else {
            None
        };
        Ok(StateMachine {
            inner: Arc::new(Inner {
                chat: Arc::new(chat),
                snapshot_dir,
                current: Mutex::new(current),
                next_tmp: AtomicU64::new(0),
            }),
            metrics: None,
        })
    }

    /// Records apply latency and snapshot times in `metrics` from now on. A snapshot already
    /// on disk counts as made when its file was last written (when it was built or received).
    pub fn with_metrics(mut self, metrics: StorageMetrics) -> StateMachine {
        if self.inner.current.lock().is_some() {
            let path = self.inner.snapshot_dir.join(CURRENT_SNAPSHOT);
            match std::fs::metadata(&path).and_then(|m| m.modified()) {
                Ok(at) => metrics.snapshot_made(at),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read the snapshot's time")
                }
            }
        }
        self.metrics = Some(metrics);
        self
    }

    /// The chat state, for reads (history, streams, channels).
    pub fn chat(&self) -> &Arc<ChatState> {
        &self.inner.chat
    }

    fn tmp_path(&self, kind: &str) -> PathBuf {
        let n = self.inner.next_tmp.fetch_add(1, Ordering::Relaxed);
        self.inner
            .snapshot_dir
            .join(format!("{kind}-{}-{n}.tmp", std::process::id()))
    }
}

/// Removes snapshot files left by a crash mid-build or mid-receive.
fn remove_temp_files(dir: &Path) -> Result<(), StorageError> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| StorageIOError::read_snapshot(None, any(e)))?;
    for entry in entries.flatten() {
        if entry.path().extension().is_some_and(|ext| ext == "tmp") {
            // A leftover temp file holds nothing anyone relies on; failing to delete it only
            // wastes space, so the error is logged and not returned.
            if let Err(e) = std::fs::remove_file(entry.path()) {
                tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove temp snapshot");
            }
        }
    }
    Ok(())
}

/// openraft metadata for a snapshot file, from the raft meta bytes stored inside it. The id
/// is derived from the content, so the same file always has the same id.
fn snapshot_meta(info: &SnapshotInfo) -> Result<SnapshotMeta, StorageError> {
    let last_log_id = match &info.last_applied {
        Some(bytes) => {
            codec::decode_log_id(bytes).map_err(|e| StorageIOError::read_snapshot(None, any(e)))?
        }
        None => None,
    };
    let last_membership = match &info.membership {
        Some(bytes) => codec::decode_membership(bytes)
            .map_err(|e| StorageIOError::read_snapshot(None, any(e)))?,
        None => StoredMembership::default(),
    };
    let snapshot_id = match last_log_id {
        Some(id) => format!("{}-{}-{:08x}", id.leader_id.term, id.index, info.checksum),
        None => format!("none-{:08x}", info.checksum),
    };
    Ok(SnapshotMeta {
        last_log_id,
        last_membership,
        snapshot_id,
    })
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl StateMachine {
    /// Moves a verified snapshot file to `current.snap` and records its metadata.
    fn make_current(&self, from: &Path, meta: SnapshotMeta) -> Result<(), StorageError> {
        let dest = self.inner.snapshot_dir.join(CURRENT_SNAPSHOT);
        let mut current = self.inner.current.lock();
        // Crash after the rename but before the directory fsync: either the old or the new
        // `current.snap` survives; both are complete, checksummed snapshots.
        std::fs::rename(from, &dest)
            .and_then(|()| fsync_dir(&self.inner.snapshot_dir))
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), any(e)))?;
        *current = Some(meta);
        if let Some(metrics) = &self.metrics {
            metrics.snapshot_made(SystemTime::now());
        }
        Ok(())
    }

    async fn open_current(&self) -> Result<Option<Snapshot>, StorageError> {
        let meta = self.inner.current.lock().clone();
        let Some(meta) = meta else {
            return Ok(None);
        };
        let path = self.inner.snapshot_dir.join(CURRENT_SNAPSHOT);
        let file = SnapshotFile::open(&path)
            .await
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), any(e)))?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(file),
        }))
    }
}

/// Turns openraft entries into chat-sm apply entries plus the raft meta for the batch.
fn to_apply_batch(entries: &[Entry]) -> (Vec<ApplyEntry<'_>>, RaftMeta) {
    let mut membership = None;
    let batch = entries
        .iter()
        .map(|entry| {
            let log_id = *entry.get_log_id();
            let payload = match &entry.payload {
                EntryPayload::Blank => ApplyPayload::Blank,
                EntryPayload::Normal(command) => ApplyPayload::Command(command),
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(log_id), m.clone()));
                    ApplyPayload::Membership
                }
            };
            ApplyEntry {
                index: chat_sm::LogIndex(log_id.index),
                payload,
            }
        })
        .collect();
    let last = entries.last().map(|e| *e.get_log_id());
    let meta = RaftMeta {
        last_applied: codec::encode_log_id(&last),
        membership: membership.as_ref().map(codec::encode_membership),
    };
    (batch, meta)
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let chat = &self.inner.chat;
        let last_applied = match chat.last_applied() {
            Some(bytes) => codec::decode_log_id(&bytes)
                .map_err(|e| StorageIOError::read_state_machine(any(e)))?,
            None => None,
        };
        let membership = match chat.membership() {
            Some(bytes) => codec::decode_membership(&bytes)
                .map_err(|e| StorageIOError::read_state_machine(any(e)))?,
            None => StoredMembership::default(),
        };
        Ok((last_applied, membership))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ChatResponse>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let (batch, meta) = to_apply_batch(&entries);
        let started = Instant::now();
        // A RocksDB write failure inside apply panics in chat-sm: an error only this replica
        // saw would make replicas diverge.
        let responses = self.inner.chat.apply(&batch, meta);
        if let Some(metrics) = &self.metrics {
            metrics.observe_apply(entries.len(), started.elapsed());
        }
        assert_eq!(
            responses.len(),
            entries.len(),
            "one response per applied entry"
        );
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotFile>, StorageError> {
        let path = self.tmp_path("recv");
        let file = SnapshotFile::create(&path)
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, any(e)))?;
        Ok(Box::new(file))
    }

    #[tracing::instrument(level = "info", skip_all, fields(snapshot = %meta.snapshot_id))]
    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        mut snapshot: Box<SnapshotFile>,
    ) -> Result<(), StorageError> {
        let signature = meta.signature();
        let werr = |e: AnyError| {
            StorageError::from(StorageIOError::write_snapshot(Some(signature.clone()), e))
        };
        snapshot.sync().await.map_err(|e| werr(any(e)))?;
        // The handle may be a file we received (rename it) or, as in openraft's test suite,
        // another node's snapshot (copy it, leaving theirs alone).
        let staged = self.tmp_path("install");
        let src = snapshot.path().to_path_buf();
        drop(snapshot);
        let ours = src.parent() == Some(self.inner.snapshot_dir.as_path())
            && src
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("recv-"));
        if ours {
            tokio::fs::rename(&src, &staged)
                .await
                .map_err(|e| werr(any(e)))?;
        } else {
            tokio::fs::copy(&src, &staged)
                .await
                .map_err(|e| werr(any(e)))?;
        }
        let chat = self.inner.chat.clone();
        let staged_for_install = staged.clone();
        let info = tokio::task::spawn_blocking(move || chat.install_snapshot(&staged_for_install))
            .await
            .map_err(|e| werr(any(e)))?
            .map_err(|e| werr(any(e)))?;
        let installed = snapshot_meta(&info)?;
        if installed.last_log_id != meta.last_log_id {
            return Err(werr(AnyError::error(format!(
                "snapshot file holds state up to {:?}, its metadata says {:?}",
                installed.last_log_id, meta.last_log_id
            ))));
        }
        self.make_current(&staged, meta.clone())?;
        tracing::info!(snapshot = %meta.snapshot_id, "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        self.open_current().await
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    #[tracing::instrument(level = "info", skip_all)]
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let tmp = self.tmp_path("build");
        let chat = self.inner.chat.clone();
        let tmp_for_build = tmp.clone();
        let info = tokio::task::spawn_blocking(move || chat.build_snapshot(&tmp_for_build))
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, any(e)))?
            .map_err(|e| StorageIOError::write_snapshot(None, any(e)))?;
        let meta = snapshot_meta(&info)?;
        tracing::info!(snapshot = %meta.snapshot_id, bytes = info.bytes, "snapshot built");
        self.make_current(&tmp, meta)?;
        let snapshot = self.open_current().await?;
        Ok(snapshot.expect("a snapshot was just made current"))
    }
}
