//! `StateMachine`: openraft's `RaftStateMachine` over `chat_sm::ChatState`, with snapshots kept
//! as files.
//!
//! # Correctness
//! - *One response per entry*: `ChatState::apply` returns exactly one `ChatResponse` per
//!   `ApplyEntry` (asserted here), blank and membership entries included.
//! - *Last applied and membership persist with the state*: they ride in the same RocksDB
//!   `WriteBatch` as the messages (`RaftMeta`), so a restart never sees one without the other.
//! - *A snapshot is a consistent view*: `ChatState::build_snapshot` streams from a RocksDB
//!   snapshot while applies continue, and flushes RocksDB first, so everything at or below
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

use std::io;

use chat_sm::{ApplyEntry, ApplyPayload, ChatState, RaftMeta, SnapshotInfo};
use futures::{Stream, StreamExt};
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::EntryPayload;
use parking_lot::Mutex;

use crate::codec;
use crate::snapshot_file::SnapshotFile;
use crate::storage_metrics::StorageMetrics;
use crate::types::{Entry, LogId, Snapshot, SnapshotMeta, StoredMembership, TypeConfig};

/// Name of the snapshot that `get_current_snapshot` serves.
pub(crate) const CURRENT_SNAPSHOT: &str = "current.snap";

/// The chat state machine as openraft drives it. Cheap to clone; the node keeps a clone (or
/// [`StateMachine::chat`]) for reads.
#[derive(Clone)]
pub struct StateMachine {
    inner: Arc<Inner>,
    /// Where apply latency and snapshot times go; `None` in tests and tools.
    metrics: Option<StorageMetrics>,
    /// Build and install snapshots on the calling task instead of a blocking thread.
    inline: bool,
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

/// An error as the io error openraft's storage traits return, keeping its message.
fn any(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::other(e)
}

/// A value on disk that does not decode: the message names what and why.
fn invalid(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {e}"))
}

impl StateMachine {
    /// Opens the chat state in `dir/chat` and the snapshots in `dir/snapshots`.
    ///
    /// # Errors
    /// RocksDB fails to open, or the current snapshot file is unreadable.
    pub fn open(dir: &Path) -> io::Result<StateMachine> {
        StateMachine::open_with(dir, chat_sm::RING_BYTES_MAX_DEFAULT)
    }

    /// [`StateMachine::open`] with the chat state's ring memory budget, in bytes
    /// (`chat_sm::Config::ring_bytes_max`).
    ///
    /// # Errors
    /// As [`StateMachine::open`], and the budget is out of bounds.
    pub fn open_with(dir: &Path, ring_bytes_max: usize) -> io::Result<StateMachine> {
        let mut config = chat_sm::Config::new(dir.join("chat"));
        config.ring_bytes_max = ring_bytes_max;
        let chat = ChatState::open(config).map_err(any)?;
        let snapshot_dir = dir.join("snapshots");
        std::fs::create_dir_all(&snapshot_dir)?;
        remove_temp_files(&snapshot_dir)?;
        let current_path = snapshot_dir.join(CURRENT_SNAPSHOT);
        let current = if current_path.exists() {
            let info = chat_sm::read_snapshot_info(&current_path)
                .map_err(|e| invalid(&current_path.display().to_string(), e))?;
            Some(snapshot_meta(&info)?.0)
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
            inline: false,
        })
    }

    /// Builds and installs snapshots on the calling task: for the simulated cluster, whose
    /// paused clock would run ahead while a blocking thread worked.
    pub fn inline_blocking_work(mut self) -> StateMachine {
        self.inline = true;
        self
    }

    /// Runs `work` on a blocking thread, or inline (see [`StateMachine::inline_blocking_work`]).
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<T> {
        if self.inline {
            return Ok(work());
        }
        tokio::task::spawn_blocking(work).await.map_err(any)
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

    /// A fresh temp file path in the snapshot directory (removed at the next open).
    pub(crate) fn tmp_path(&self, kind: &str) -> PathBuf {
        let n = self.inner.next_tmp.fetch_add(1, Ordering::Relaxed);
        self.inner
            .snapshot_dir
            .join(format!("{kind}-{}-{n}.tmp", std::process::id()))
    }
}

/// Removes snapshot files left by a crash mid-build or mid-receive.
fn remove_temp_files(dir: &Path) -> io::Result<()> {
    let entries = std::fs::read_dir(dir)?;
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
/// The openraft metadata of a snapshot file, and a name for it in logs
/// (`term-index-checksum`).
fn snapshot_meta(info: &SnapshotInfo) -> io::Result<(SnapshotMeta, String)> {
    let last_log_id = match &info.last_applied {
        Some(bytes) => codec::decode_log_id(bytes).map_err(|e| invalid("snapshot log id", e))?,
        None => None,
    };
    let last_membership = match &info.membership {
        Some(bytes) => {
            codec::decode_membership(bytes).map_err(|e| invalid("snapshot membership", e))?
        }
        None => StoredMembership::default(),
    };
    let name = match last_log_id {
        Some(id) => format!("{}-{}-{:08x}", id.leader_id.term, id.index, info.checksum),
        None => format!("none-{:08x}", info.checksum),
    };
    let meta = SnapshotMeta {
        last_log_id,
        last_membership,
    };
    Ok((meta, name))
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl StateMachine {
    /// Moves a verified snapshot file to `current.snap` and records its metadata.
    fn make_current(&self, from: &Path, meta: SnapshotMeta) -> io::Result<()> {
        let dest = self.inner.snapshot_dir.join(CURRENT_SNAPSHOT);
        let mut current = self.inner.current.lock();
        // Crash after the rename but before the directory fsync: either the old or the new
        // `current.snap` survives; both are complete, checksummed snapshots.
        std::fs::rename(from, &dest).and_then(|()| fsync_dir(&self.inner.snapshot_dir))?;
        *current = Some(meta);
        if let Some(metrics) = &self.metrics {
            metrics.snapshot_made(SystemTime::now());
        }
        Ok(())
    }

    async fn open_current(&self) -> io::Result<Option<Snapshot>> {
        let meta = self.inner.current.lock().clone();
        let Some(meta) = meta else {
            return Ok(None);
        };
        let path = self.inner.snapshot_dir.join(CURRENT_SNAPSHOT);
        let file = SnapshotFile::open(&path).await?;
        Ok(Some(Snapshot {
            meta,
            snapshot: file,
        }))
    }
}

/// Whether `entry` is a [`chat_sm::Command::Expire`], which chat-sm applies alone.
fn is_expire(entry: &Entry) -> bool {
    matches!(&entry.payload, EntryPayload::Normal(command) if matches!(**command, chat_sm::Command::Expire { .. }))
}

/// Turns openraft entries into chat-sm apply entries plus the raft meta for the batch.
fn to_apply_batch(entries: &[Entry]) -> (Vec<ApplyEntry<'_>>, RaftMeta) {
    let mut membership = None;
    let batch = entries
        .iter()
        .map(|entry| {
            let log_id = entry.log_id;
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
    let last = entries.last().map(|e| e.log_id);
    let meta = RaftMeta {
        last_applied: codec::encode_log_id(&last),
        membership: membership.as_ref().map(codec::encode_membership),
    };
    (batch, meta)
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> io::Result<(Option<LogId>, StoredMembership)> {
        let chat = &self.inner.chat;
        let last_applied = match chat.last_applied() {
            Some(bytes) => codec::decode_log_id(&bytes).map_err(|e| invalid("last applied", e))?,
            None => None,
        };
        let membership = match chat.membership() {
            Some(bytes) => {
                codec::decode_membership(&bytes).map_err(|e| invalid("membership", e))?
            }
            None => StoredMembership::default(),
        };
        Ok((last_applied, membership))
    }

    /// Applies the entries openraft hands over in one RocksDB batch (each expiry in one of its
    /// own), then answers each.
    #[tracing::instrument(level = "debug", skip_all)]
    async fn apply<S>(&mut self, mut entries: S) -> io::Result<()>
    where
        S: Stream<Item = io::Result<EntryResponder<TypeConfig>>> + Unpin + Send,
    {
        let mut batch_entries = Vec::new();
        let mut responders = Vec::new();
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            batch_entries.push(entry);
            responders.push(responder);
        }
        if batch_entries.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        // A RocksDB write failure inside apply panics in chat-sm: an error only this replica
        // saw would make replicas diverge. An expiry is applied alone (chat-sm's rule), so the
        // entries go in runs split around each one.
        let mut responses = Vec::with_capacity(batch_entries.len());
        let mut start = 0;
        for end in 0..batch_entries.len() {
            let alone = is_expire(&batch_entries[end]);
            let next = batch_entries.get(end + 1).is_some_and(is_expire);
            if alone || next || end + 1 == batch_entries.len() {
                let (batch, meta) = to_apply_batch(&batch_entries[start..=end]);
                responses.extend(self.inner.chat.apply(&batch, meta));
                start = end + 1;
            }
        }
        if let Some(metrics) = &self.metrics {
            metrics.observe_apply(batch_entries.len(), started.elapsed());
        }
        assert_eq!(
            responses.len(),
            batch_entries.len(),
            "one response per applied entry"
        );
        for (responder, response) in responders.into_iter().zip(responses) {
            if let Some(responder) = responder {
                responder.send(response);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    #[tracing::instrument(level = "info", skip_all, fields(last = ?meta.last_log_id))]
    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        mut snapshot: SnapshotFile,
    ) -> io::Result<()> {
        snapshot.sync().await?;
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
            tokio::fs::rename(&src, &staged).await?;
        } else {
            tokio::fs::copy(&src, &staged).await?;
        }
        let chat = self.inner.chat.clone();
        let staged_for_install = staged.clone();
        let info = self
            .blocking(move || chat.install_snapshot(&staged_for_install))
            .await?
            .map_err(|e| invalid("received snapshot", e))?;
        let (installed, name) = snapshot_meta(&info)?;
        if installed.last_log_id != meta.last_log_id {
            return Err(invalid(
                "received snapshot",
                format!(
                    "the file holds state up to {:?}, its metadata says {:?}",
                    installed.last_log_id, meta.last_log_id
                ),
            ));
        }
        self.make_current(&staged, meta.clone())?;
        tracing::info!(snapshot = %name, "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        self.open_current().await
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotFile;

    #[tracing::instrument(level = "info", skip_all)]
    async fn build_snapshot(&mut self) -> io::Result<Snapshot> {
        let tmp = self.tmp_path("build");
        let chat = self.inner.chat.clone();
        let tmp_for_build = tmp.clone();
        let info = self
            .blocking(move || chat.build_snapshot(&tmp_for_build))
            .await?
            .map_err(any)?;
        let (meta, name) = snapshot_meta(&info)?;
        tracing::info!(snapshot = %name, bytes = info.bytes, "snapshot built");
        self.make_current(&tmp, meta)?;
        // The log below this snapshot is purged next; the state's files lose erased bodies
        // now, beside it rather than in the way of the snapshot.
        let chat = self.inner.chat.clone();
        tokio::task::spawn_blocking(move || match chat.compact_if_erased() {
            Ok(true) => tracing::info!("state compacted: erased bodies left its files"),
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "compacting the state failed"),
        });
        let snapshot = self.open_current().await?;
        Ok(snapshot.expect("a snapshot was just made current"))
    }
}
