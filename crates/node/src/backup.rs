//! Backups: `server backup` cuts the chat state of a running cluster at a committed index and
//! streams it into one checksummed file, `server verify` checks such a file, and `server
//! restore` seeds a new cluster from one, offline.
//!
//! # The cut
//! The tool asks the leader for a linearizable read index (every write acknowledged before
//! the request is at or below it), then asks one node (a follower by default, to spare the
//! leader) to wait until it applied that index and write the chat state from one RocksDB
//! snapshot: the state after one whole applied batch, at an index at or past the read index.
//! Applies go on meanwhile. The node keeps the file as a session the tool reads in chunks; a
//! session idle for [`SESSION_IDLE`] is dropped with its file.
//!
//! # The file
//! All integers little-endian.
//!
//! | part     | field        | width | meaning                                                  |
//! | -------- | ------------ | ----- | -------------------------------------------------------- |
//! | header   | magic        | 8     | [`BACKUP_MAGIC`] `"CCBACKUP"`                            |
//! | header   | version      | 1     | [`BACKUP_VERSION`]                                       |
//! | header   | manifest_len | 4     | at most [`MANIFEST_BYTES_MAX`]                           |
//! | manifest | JSON         | var   | [`Manifest`]: source, index, contents, payload SHA-256   |
//! | payload  | snapshot     | var   | chat-sm's snapshot format, with per-record CRCs          |
//! | trailer  | magic        | 8     | [`TRAILER_MAGIC`] `"CCBKDONE"`                           |
//! | trailer  | sha256       | 32    | SHA-256 of every byte before the trailer                 |
//!
//! The payload leaves out the cluster's own identity (its Raft meta and join secret): a backup
//! carries no secret material, and a restore gives the data a new cluster. The tool writes
//! `FILE.partial`, verifies it completely, fsyncs it and renames it to `FILE`, so a backup
//! killed half way never leaves a file under the name asked for, and a `.partial` file has no
//! trailer and fails verification.
//!
//! # Restore
//! [`restore`] builds a data dir in a staging directory next to the target and renames it into
//! place only when it is complete: a new node id, a new CA and join token (a new cluster
//! identity, like `etcdutl snapshot restore`), the chat state loaded from the payload, and a
//! [`RESTORED_FILE`] marker. At its first start the node, knowing its addresses by then, seeds
//! the Raft meta ([`seed_restored`]): last applied = (term 0, itself, the backup's index), and
//! a membership of itself alone. The empty log then ends before last applied, which
//! `reconcile` treats as purged (building the first snapshot), and the node elects itself;
//! nodes that join later catch up by snapshot, since the log below the backup's index does not
//! exist.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use chat_sm::{ChatState, RaftMeta, SnapshotContents};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cluster::{check_cluster, JoinError, NodeAddrs};
use crate::delivery::Delivery;
use crate::raft::Raft;
use crate::state_machine::StateMachine;
use crate::types::{CommittedLeaderId, LogId, Membership, NodeId, StoredMembership};
use crate::{atomic_file, codec, pki, DataDir};

/// Backup file magic number.
pub const BACKUP_MAGIC: &[u8; 8] = b"CCBACKUP";
/// Backup file format version.
pub const BACKUP_VERSION: u8 = 1;
/// Marks the end of the payload; the file's SHA-256 follows.
pub const TRAILER_MAGIC: &[u8; 8] = b"CCBKDONE";
/// Largest manifest a reader accepts; checked before allocating.
pub const MANIFEST_BYTES_MAX: u32 = 64 * 1024;
/// Bytes per [`BackupRead`] answer: small next to the RPC frame limit, large enough that the
/// per-call cost does not matter.
pub const CHUNK_BYTES: usize = 1 << 20;
/// A session not read for this long is dropped with its file.
pub const SESSION_IDLE: Duration = Duration::from_secs(120);
/// Open sessions per node: each holds a copy of the state on the node's disk.
pub const SESSIONS_MAX: usize = 2;
/// How long a node waits to apply the read index before it refuses to cut.
const APPLY_WAIT: Duration = Duration::from_secs(30);
/// The marker a restored data dir carries until its first start seeds its Raft meta.
pub const RESTORED_FILE: &str = "RESTORED";
/// The payload's format, as the manifest names it.
const PAYLOAD_FORMAT: &str = "chat-sm snapshot v1";
/// What secret material a backup holds, as the manifest says it.
const SECRETS: &str = "none: no private keys, no join secret, no TLS keys. The payload holds \
    users' public keys and message bodies as stored: plaintext channels in the clear, \
    end-to-end encrypted channels as ciphertext whose channel records allow offline \
    passphrase guessing, as any member could";
/// The writer syncs the file every this many bytes: one sync of a whole backup at the end
/// would hold the disk for hundreds of milliseconds, stalling the WAL fsyncs of nodes on the
/// same disk.
const SYNC_EVERY: u64 = 8 << 20;
const HEADER_LEN: u64 = 13;
const TRAILER_LEN: u64 = 40;

/// Asks a node to cut a backup (`server backup`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupOpen {
    /// The cluster the caller means.
    pub cluster: String,
    /// Cut at or past this applied index (the leader's read index, from [`BackupIndex`]);
    /// `None` asks the addressee, which must lead, to take its own read index.
    pub min_index: Option<u64>,
}

/// Asks the leader for a linearizable read index to cut a backup at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupIndex {
    /// The cluster the caller means.
    pub cluster: String,
}

/// A backup session a node opened: its payload waits in a file on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupOpened {
    /// Names the session in [`BackupRead`].
    pub session: u64,
    /// The node that cut it.
    pub node: NodeId,
    /// Its name.
    pub node_name: String,
    /// The cluster.
    pub cluster: String,
    /// The last log index the payload reflects.
    pub applied_index: u64,
    /// What the payload holds.
    pub contents: SnapshotContents,
    /// Payload length in bytes.
    pub bytes: u64,
    /// Payload SHA-256.
    pub sha256: [u8; 32],
}

/// Asks for the payload bytes of a session from `offset` (at most [`CHUNK_BYTES`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRead {
    /// The session.
    pub session: u64,
    /// Where to read from.
    pub offset: u64,
}

/// What a backup file says about itself, in JSON after the header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The file format version (the header's).
    pub format: u8,
    /// The release that wrote it.
    pub cellchat_version: String,
    /// The cluster it was cut from.
    pub cluster: String,
    /// When the tool wrote it, in ms since the epoch.
    pub created_unix_ms: u64,
    /// The node that cut it: id and name.
    pub source_node: (NodeId, String),
    /// The last log index the payload reflects.
    pub applied_index: u64,
    /// What the payload holds.
    pub contents: SnapshotContents,
    /// What secret material it holds.
    pub secrets: String,
    /// The payload's format, length and SHA-256 (hex).
    pub payload: Payload,
}

/// The manifest's description of the payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    /// Its format.
    pub format: String,
    /// Its length in bytes.
    pub bytes: u64,
    /// Its SHA-256, lowercase hex.
    pub sha256: String,
}

impl Manifest {
    /// The manifest of a session's payload, written now.
    pub fn for_session(opened: &BackupOpened) -> Manifest {
        let created_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Manifest {
            format: BACKUP_VERSION,
            cellchat_version: env!("CARGO_PKG_VERSION").to_owned(),
            cluster: opened.cluster.clone(),
            created_unix_ms,
            source_node: (opened.node, opened.node_name.clone()),
            applied_index: opened.applied_index,
            contents: opened.contents,
            secrets: SECRETS.to_owned(),
            payload: Payload {
                format: PAYLOAD_FORMAT.to_owned(),
                bytes: opened.bytes,
                sha256: hex::encode(opened.sha256),
            },
        }
    }
}

/// Why a backup file is not usable, or a backup, verify or restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// An io error: what was being done, on which path.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The file is damaged, cut short, or not a backup; `offset` is where reading found it.
    #[error("{path} is not a valid backup: {reason} (at byte offset {offset})")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Where the problem was found.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The file is a backup of a format this release does not read.
    #[error(
        "{path} is a backup of format version {found}; this release reads version {BACKUP_VERSION}"
    )]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u8,
    },
    /// The target of a restore is not empty.
    #[error("{path} exists and is not empty: restore only into a new or empty directory")]
    TargetNotEmpty {
        /// The directory.
        path: PathBuf,
    },
    /// The cluster directory next to the target belongs to another cluster identity.
    #[error(
        "{path} holds the CA of another cluster {cluster:?} (perhaps the one backed up): nodes \
         started next to the restored one would join that cluster; restore into a data dir \
         under another parent directory"
    )]
    ForeignClusterDir {
        /// The shared cluster directory.
        path: PathBuf,
        /// The cluster name.
        cluster: String,
    },
    /// The chat state refused the payload, or could not be written.
    #[error("chat state: {0}")]
    State(#[from] chat_sm::Error),
    /// The data dir could not be set up.
    #[error(transparent)]
    DataDir(#[from] crate::DataDirError),
    /// The new cluster identity could not be made.
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BackupError + 'a {
    move |source| BackupError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

// ---------------------------------------------------------------------------------------------
// The node's side: sessions.

/// A payload waiting on the node's disk for the tool to read it.
struct Session {
    path: PathBuf,
    file: Arc<File>,
    bytes: u64,
    last_used: Instant,
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove a backup file");
        }
    }
}

/// A node's backup sessions (the Raft RPC service's `backup_*` calls).
pub struct Backups {
    id: NodeId,
    name: String,
    cluster: String,
    raft: Raft,
    state: StateMachine,
    delivery: Delivery,
    sessions: parking_lot::Mutex<(u64, HashMap<u64, Session>)>,
}

impl Backups {
    /// The chat state the sessions are cut from.
    pub(crate) fn chat(&self) -> &Arc<ChatState> {
        self.state.chat()
    }

    /// The sessions of node `id`, cut from `state`; a task drops idle ones until the returned
    /// value is dropped.
    pub fn new(
        (id, name, cluster): (NodeId, String, String),
        raft: Raft,
        state: StateMachine,
        delivery: Delivery,
    ) -> Arc<Backups> {
        let backups = Arc::new(Backups {
            id,
            name,
            cluster,
            raft,
            state,
            delivery,
            sessions: parking_lot::Mutex::new((rand::random::<u32>().into(), HashMap::new())),
        });
        let weak: Weak<Backups> = Arc::downgrade(&backups);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SESSION_IDLE / 4).await;
                let Some(backups) = weak.upgrade() else {
                    return;
                };
                backups.drop_idle();
            }
        });
        backups
    }

    fn drop_idle(&self) {
        let expired: Vec<Session> = {
            let mut sessions = self.sessions.lock();
            let idle: Vec<u64> = sessions
                .1
                .iter()
                .filter(|(_, s)| s.last_used.elapsed() >= SESSION_IDLE)
                .map(|(id, _)| *id)
                .collect();
            idle.iter().filter_map(|id| sessions.1.remove(id)).collect()
        };
        for session in &expired {
            tracing::info!(path = %session.path.display(), "backup session idle; dropped");
        }
    }

    /// The leader's linearizable read index: every write acknowledged before this call is at
    /// or below it.
    ///
    /// # Errors
    /// [`JoinError::WrongCluster`]; [`JoinError::NotLeader`]; [`JoinError::Busy`] when
    /// leadership could not be confirmed.
    pub async fn read_index(&self, request: &BackupIndex) -> Result<u64, JoinError> {
        check_cluster(&self.cluster, &request.cluster)?;
        match self
            .raft
            .ensure_linearizable(openraft::ReadPolicy::ReadIndex)
            .await
        {
            Ok(read) => Ok(read.index()),
            Err(e) => {
                let leader = crate::raft::metrics_now(&self.raft).current_leader;
                if leader != Some(self.id) {
                    return Err(JoinError::NotLeader { leader });
                }
                Err(JoinError::Busy(format!("cannot confirm leadership: {e}")))
            }
        }
    }

    /// Cuts the state at or past the read index and opens a session on the file.
    ///
    /// # Errors
    /// As [`Backups::read_index`]; [`JoinError::Backup`] when too many sessions are open, the
    /// node did not apply the index in time, or the file could not be written.
    pub async fn open(&self, request: &BackupOpen) -> Result<BackupOpened, JoinError> {
        check_cluster(&self.cluster, &request.cluster)?;
        let min_index = match request.min_index {
            Some(index) => index,
            None => {
                let request = BackupIndex {
                    cluster: request.cluster.clone(),
                };
                self.read_index(&request).await?
            }
        };
        if self.sessions.lock().1.len() >= SESSIONS_MAX {
            return Err(JoinError::Backup(format!(
                "{SESSIONS_MAX} backups are in progress on this node; retry when one ends"
            )));
        }
        if !self.delivery.wait_applied(min_index, APPLY_WAIT).await {
            return Err(JoinError::Backup(format!(
                "this node did not apply index {min_index} within {}s; it is behind the \
                 leader, pick another node",
                APPLY_WAIT.as_secs()
            )));
        }
        let path = self.state.tmp_path("backup");
        let chat: Arc<ChatState> = self.state.chat().clone();
        let cut = {
            let path = path.clone();
            in_background("backup-cut", move || write_payload(&chat, &path))
                .await
                .map_err(|e| JoinError::Backup(format!("backup task failed: {e}")))?
        };
        let (applied_index, contents, bytes, sha256, file) = match cut {
            Ok(cut) => cut,
            Err(e) => {
                let _ = fs::remove_file(&path);
                return Err(JoinError::Backup(format!("cutting the backup: {e}")));
            }
        };
        let session = Session {
            path,
            file: Arc::new(file),
            bytes,
            last_used: Instant::now(),
        };
        let mut sessions = self.sessions.lock();
        sessions.0 += 1;
        let id = sessions.0;
        sessions.1.insert(id, session);
        drop(sessions);
        tracing::info!(
            session = id,
            applied_index,
            bytes,
            messages = contents.messages,
            "backup cut"
        );
        Ok(BackupOpened {
            session: id,
            node: self.id,
            node_name: self.name.clone(),
            cluster: self.cluster.clone(),
            applied_index,
            contents,
            bytes,
            sha256,
        })
    }

    /// Up to [`CHUNK_BYTES`] of a session's payload from `offset`; the read that reaches the
    /// end closes the session and removes its file.
    ///
    /// # Errors
    /// [`JoinError::Backup`] for an unknown or expired session, an offset past the end, or a
    /// read error.
    pub async fn read(&self, request: &BackupRead) -> Result<Vec<u8>, JoinError> {
        let (file, bytes) = {
            let mut sessions = self.sessions.lock();
            let session = sessions.1.get_mut(&request.session).ok_or_else(|| {
                JoinError::Backup(format!(
                    "no backup session {} on this node (it ended, or was idle for more than \
                     {}s); start the backup again",
                    request.session,
                    SESSION_IDLE.as_secs()
                ))
            })?;
            session.last_used = Instant::now();
            (session.file.clone(), session.bytes)
        };
        if request.offset > bytes {
            return Err(JoinError::Backup(format!(
                "offset {} is past the end of the backup ({bytes} bytes)",
                request.offset
            )));
        }
        let want = usize::try_from(bytes - request.offset)
            .map_or(CHUNK_BYTES, |left| left.min(CHUNK_BYTES));
        let offset = request.offset;
        let data = tokio::task::spawn_blocking(move || {
            let mut data = vec![0; want];
            file.read_exact_at(&mut data, offset).map(|()| data)
        })
        .await
        .map_err(|e| JoinError::Backup(format!("backup read task failed: {e}")))?
        .map_err(|e| JoinError::Backup(format!("reading the backup file: {e}")))?;
        if offset + want as u64 == bytes {
            let ended = self.sessions.lock().1.remove(&request.session);
            drop(ended);
        }
        Ok(data)
    }
}

type Cut = (u64, SnapshotContents, u64, [u8; 32], File);

/// The nice value of background work: a backup's cut, an archive base, the backup tool.
/// Under a write load that saturates the CPU they then take what the write path leaves, and
/// take longer, rather than slowing every acknowledgement.
pub const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's CPU priority to [`BACKGROUND_NICE`]. Threads it starts later
/// inherit it. On Linux the nice value is per thread, so only threads that never go back to
/// serving the write path may call this. A failure is logged and ignored: the work is only
/// slower to yield.
pub fn lower_cpu_priority() {
    // No pid: the calling thread on Linux.
    if let Err(e) = rustix::process::setpriority_process(None, BACKGROUND_NICE) {
        tracing::debug!(error = %e, "cannot lower the CPU priority of background work");
    }
}

/// Runs `work` on a new thread at background priority and waits for it without blocking the
/// runtime. A dedicated thread, not the blocking pool, because a pool thread would keep the
/// lowered priority for unrelated work later.
///
/// # Errors
/// The thread cannot start, or `work` panicked.
pub async fn in_background<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            lower_cpu_priority();
            let _ = done.send(work());
        })?;
    result
        .await
        .map_err(|_| io::Error::other(format!("the {name} thread panicked")))
}

/// Writes the payload to `path` and hashes it.
fn write_payload(chat: &ChatState, path: &Path) -> Result<Cut, BackupError> {
    let (info, contents) = chat.write_backup(path)?;
    let applied_index = info.applied_index.map_or(0, |i| i.0);
    let mut file = File::open(path).map_err(io_err("open", path))?;
    let mut hasher = Sha256::new();
    let bytes = io::copy(&mut file, &mut hasher).map_err(io_err("read", path))?;
    Ok((
        applied_index,
        contents,
        bytes,
        hasher.finalize().into(),
        file,
    ))
}

// ---------------------------------------------------------------------------------------------
// The file: writing, and reading with verification.

/// Writes a backup file as its bytes arrive; [`BackupWriter::finish`] seals it.
pub struct BackupWriter {
    out: BufWriter<File>,
    partial: PathBuf,
    target: PathBuf,
    all: Sha256,
    payload: Sha256,
    payload_left: u64,
    manifest: Manifest,
    unsynced: u64,
}

/// The `.partial` path a backup to `target` is written to first.
pub fn partial_path(target: &Path) -> PathBuf {
    let mut name = target.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

impl BackupWriter {
    /// Starts `target.partial` with the header and `manifest`. Refuses a `target` that exists.
    ///
    /// # Errors
    /// [`BackupError::Io`], also when `target` exists.
    pub fn create(target: &Path, manifest: Manifest) -> Result<BackupWriter, BackupError> {
        if target.exists() {
            return Err(BackupError::Io {
                op: "create",
                path: target.to_path_buf(),
                source: io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "the file exists; remove it or pick another --out",
                ),
            });
        }
        let partial = partial_path(target);
        // Owner-only, as the data dirs: the file holds every message of plaintext channels.
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)
            .map_err(io_err("create", &partial))?;
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io_err("set the mode of", &partial))?;
        let json = serde_json::to_vec(&manifest).expect("a manifest always serializes");
        let manifest_len = u32::try_from(json.len()).expect("manifests are small");
        let mut writer = BackupWriter {
            out: BufWriter::with_capacity(1 << 20, file),
            partial,
            target: target.to_path_buf(),
            all: Sha256::new(),
            payload: Sha256::new(),
            payload_left: manifest.payload.bytes,
            manifest,
            unsynced: 0,
        };
        writer.write(BACKUP_MAGIC)?;
        writer.write(&[BACKUP_VERSION])?;
        writer.write(&manifest_len.to_le_bytes())?;
        writer.write(&json)?;
        Ok(writer)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), BackupError> {
        self.all.update(bytes);
        self.out
            .write_all(bytes)
            .map_err(io_err("write", &self.partial))?;
        self.unsynced += bytes.len() as u64;
        if self.unsynced >= SYNC_EVERY {
            self.sync()?;
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<(), BackupError> {
        self.out.flush().map_err(io_err("write", &self.partial))?;
        self.out
            .get_ref()
            .sync_data()
            .map_err(io_err("fsync", &self.partial))?;
        self.unsynced = 0;
        Ok(())
    }

    /// Appends payload bytes.
    ///
    /// # Errors
    /// [`BackupError::Io`]; [`BackupError::Corrupt`] when more bytes arrive than the manifest
    /// announced.
    pub fn payload(&mut self, bytes: &[u8]) -> Result<(), BackupError> {
        if bytes.len() as u64 > self.payload_left {
            return Err(self.transfer_error("the node sent more bytes than it announced"));
        }
        self.payload_left -= bytes.len() as u64;
        self.payload.update(bytes);
        self.write(bytes)
    }

    /// Bytes of payload still expected.
    pub fn payload_left(&self) -> u64 {
        self.payload_left
    }

    fn transfer_error(&self, reason: &str) -> BackupError {
        BackupError::Corrupt {
            path: self.partial.clone(),
            offset: HEADER_LEN + self.manifest.payload.bytes - self.payload_left,
            reason: reason.to_owned(),
        }
    }

    /// Checks the payload against the node's SHA-256, writes the trailer, verifies the whole
    /// file from disk, fsyncs it and renames it to the target (then fsyncs the directory).
    ///
    /// # Errors
    /// [`BackupError`]; the `.partial` file is removed on any error.
    pub fn finish(mut self) -> Result<Verified, BackupError> {
        let result = self.seal();
        if result.is_err() {
            let _ = fs::remove_file(&self.partial);
        }
        result
    }

    fn seal(&mut self) -> Result<Verified, BackupError> {
        if self.payload_left != 0 {
            return Err(self.transfer_error("the payload ended early"));
        }
        let got = hex::encode(self.payload.clone().finalize());
        if got != self.manifest.payload.sha256 {
            return Err(self.transfer_error(&format!(
                "the payload's SHA-256 is {got}, the node computed {}",
                self.manifest.payload.sha256
            )));
        }
        self.write(TRAILER_MAGIC)?;
        let digest: [u8; 32] = self.all.clone().finalize().into();
        self.out
            .write_all(&digest)
            .map_err(io_err("write", &self.partial))?;
        self.out.flush().map_err(io_err("write", &self.partial))?;
        self.out
            .get_ref()
            .sync_all()
            .map_err(io_err("fsync", &self.partial))?;
        let verified = verify(&self.partial)?;
        fs::rename(&self.partial, &self.target).map_err(io_err("rename", &self.target))?;
        let parent = match self.target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync", parent))?;
        Ok(verified)
    }
}

/// A backup file that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// What it says about itself (checked against the payload).
    pub manifest: Manifest,
    /// The whole file's SHA-256 (the trailer's).
    pub sha256: [u8; 32],
    /// File length in bytes.
    pub bytes: u64,
}

/// Reads a backup file through, hashing everything and counting the payload's bytes; the
/// payload goes to `sink` as well.
struct Reader<'a> {
    input: BufReader<File>,
    path: &'a Path,
    offset: u64,
    all: Sha256,
}

impl Reader<'_> {
    fn corrupt(&self, offset: u64, reason: impl Into<String>) -> BackupError {
        BackupError::Corrupt {
            path: self.path.to_path_buf(),
            offset,
            reason: reason.into(),
        }
    }

    fn read_exact(&mut self, buf: &mut [u8], what: &str) -> Result<(), BackupError> {
        match self.input.read_exact(buf) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(self.corrupt(self.offset, format!("the file ends inside the {what}")));
            }
            Err(e) => return Err(io_err("read", self.path)(e)),
        }
        self.all.update(&*buf);
        self.offset += buf.len() as u64;
        Ok(())
    }

    /// Header and manifest.
    fn head(&mut self) -> Result<Manifest, BackupError> {
        let mut header = [0u8; HEADER_LEN as usize];
        self.read_exact(&mut header, "header")?;
        if &header[..8] != BACKUP_MAGIC {
            return Err(self.corrupt(0, "not a cellchat backup (bad magic)"));
        }
        if header[8] != BACKUP_VERSION {
            return Err(BackupError::Version {
                path: self.path.to_path_buf(),
                found: header[8],
            });
        }
        let len = u32::from_le_bytes(header[9..13].try_into().expect("4 bytes"));
        if len > MANIFEST_BYTES_MAX {
            return Err(self.corrupt(9, format!("manifest length {len} is out of bounds")));
        }
        let mut json = vec![0; len as usize];
        self.read_exact(&mut json, "manifest")?;
        let manifest: Manifest = serde_json::from_slice(&json)
            .map_err(|e| self.corrupt(HEADER_LEN, format!("unreadable manifest: {e}")))?;
        if manifest.format != BACKUP_VERSION || manifest.payload.format != PAYLOAD_FORMAT {
            return Err(self.corrupt(
                HEADER_LEN,
                format!(
                    "the manifest names format {} / {:?}, the header {BACKUP_VERSION} / {PAYLOAD_FORMAT:?}",
                    manifest.format, manifest.payload.format
                ),
            ));
        }
        Ok(manifest)
    }

    /// The trailer, after the payload.
    fn tail(&mut self) -> Result<[u8; 32], BackupError> {
        let at = self.offset;
        let mut magic = [0u8; 8];
        self.read_exact(&mut magic, "trailer")?;
        if &magic != TRAILER_MAGIC {
            return Err(self.corrupt(at, "no trailer where the payload ends (bad magic)"));
        }
        let expected: [u8; 32] = self.all.clone().finalize().into();
        let mut digest = [0u8; 32];
        self.read_exact(&mut digest, "trailer")?;
        if digest != expected {
            return Err(self.corrupt(
                at + 8,
                "the file's SHA-256 does not match its trailer (a byte was changed)",
            ));
        }
        let mut extra = [0u8; 1];
        match self.input.read(&mut extra) {
            Ok(0) => Ok(digest),
            Ok(_) => Err(self.corrupt(self.offset, "bytes after the trailer")),
            Err(e) => Err(io_err("read", self.path)(e)),
        }
    }
}

/// Hashes and counts what passes through, and hands it on.
struct Tee<'a, R, W> {
    inner: R,
    copy: Option<&'a mut W>,
    all: &'a mut Sha256,
    payload: Sha256,
    copy_error: Option<io::Error>,
}

impl<R: Read, W: Write> Read for Tee<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.all.update(&buf[..n]);
        self.payload.update(&buf[..n]);
        if let Some(copy) = self.copy.as_mut() {
            if let Err(e) = copy.write_all(&buf[..n]) {
                // Reported after the read; a failed copy must not look like a corrupt file.
                self.copy_error.get_or_insert(e);
            }
        }
        Ok(n)
    }
}

/// Checks a backup file completely: header, manifest, every payload record, the payload's
/// SHA-256 and contents against the manifest, and the whole file's SHA-256.
///
/// # Errors
/// [`BackupError::Corrupt`] naming the offset of the first problem, [`BackupError::Version`],
/// [`BackupError::Io`].
pub fn verify(path: &Path) -> Result<Verified, BackupError> {
    read_backup::<File>(path, None)
}

/// [`verify`], copying the payload to `copy` on the way.
fn read_backup<W: Write>(path: &Path, copy: Option<&mut W>) -> Result<Verified, BackupError> {
    let file = File::open(path).map_err(io_err("open", path))?;
    let bytes = file.metadata().map_err(io_err("stat", path))?.len();
    let mut reader = Reader {
        input: BufReader::with_capacity(1 << 20, file),
        path,
        offset: 0,
        all: Sha256::new(),
    };
    let manifest = reader.head()?;
    let payload_at = reader.offset;
    let expected_len = payload_at + manifest.payload.bytes + TRAILER_LEN;
    if bytes < expected_len {
        return Err(reader.corrupt(
            bytes,
            format!("the file is cut short: {bytes} bytes, the manifest implies {expected_len}"),
        ));
    }
    let (info, contents, payload_sha) = {
        let Reader { input, all, .. } = &mut reader;
        let mut tee = Tee {
            inner: input.take(manifest.payload.bytes),
            copy,
            all,
            payload: Sha256::new(),
            copy_error: None,
        };
        let checked = chat_sm::verify_snapshot(&mut tee, path);
        if let Some(e) = tee.copy_error.take() {
            return Err(BackupError::Io {
                op: "copy the payload of",
                path: path.to_path_buf(),
                source: e,
            });
        }
        let (info, contents) = checked.map_err(|e| match e {
            chat_sm::Error::SnapshotCorrupt { offset, reason, .. } => BackupError::Corrupt {
                path: path.to_path_buf(),
                offset: payload_at + offset,
                reason: format!("payload: {reason}"),
            },
            other => BackupError::State(other),
        })?;
        (info, contents, hex::encode(tee.payload.finalize()))
    };
    reader.offset = payload_at + manifest.payload.bytes;
    if payload_sha != manifest.payload.sha256 {
        return Err(reader.corrupt(
            payload_at,
            "the payload's SHA-256 does not match the manifest",
        ));
    }
    if contents != manifest.contents {
        return Err(reader.corrupt(
            payload_at,
            format!(
                "the payload holds {contents:?}, the manifest says {:?}",
                manifest.contents
            ),
        ));
    }
    if info.applied_index.map_or(0, |i| i.0) != manifest.applied_index {
        return Err(reader.corrupt(
            payload_at,
            format!(
                "the payload is at index {:?}, the manifest says {}",
                info.applied_index, manifest.applied_index
            ),
        ));
    }
    if info.last_applied.is_some() || info.membership.is_some() {
        return Err(reader.corrupt(payload_at, "the payload carries a cluster's raft meta"));
    }
    let sha256 = reader.tail()?;
    Ok(Verified {
        manifest,
        sha256,
        bytes,
    })
}

// ---------------------------------------------------------------------------------------------
// Restore, offline.

/// What [`restore`] made.
#[derive(Debug, Clone)]
pub struct Restored {
    /// The backup, as verified.
    pub backup: Verified,
    /// The new node's id.
    pub node_id: NodeId,
    /// Its name.
    pub name: String,
    /// The new cluster's join token (`CC1-...`).
    pub token: String,
    /// The cluster directory next to the data dir that now holds the new CA and token, so
    /// nodes started there join without a token; or why it could not be written.
    pub shared_ca: Result<PathBuf, String>,
}

/// What a restored data dir's [`RESTORED_FILE`] records until the first start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Pending {
    /// The backup's index: the seeded last applied.
    applied_index: u64,
    /// The cluster it belongs to.
    cluster: String,
}

/// Builds a data dir at `target` (new or empty) holding the backup at `file` as the first
/// node of a new cluster (new node id, CA and join token), named `name` or by the default
/// rule. Works in a staging directory next to `target` and renames it into place when
/// complete; on any error nothing is left at `target`.
///
/// # Errors
/// [`BackupError`] naming what is wrong: the file (as [`verify`]), the target, the cluster
/// directory next to it, or an io error.
pub fn restore(file: &Path, target: &Path, name: Option<&str>) -> Result<Restored, BackupError> {
    if let Some(name) = name {
        crate::validate_name(name).map_err(crate::DataDirError::InvalidName)?;
    }
    match fs::read_dir(target) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(BackupError::TargetNotEmpty {
                    path: target.to_path_buf(),
                });
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("read", target)(e)),
    }
    let target_name =
        target
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| BackupError::Io {
                op: "use",
                path: target.to_path_buf(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "no directory name"),
            })?;
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(io_err("create", &parent))?;
    let staging = parent.join(format!(".{target_name}.restoring-{}", std::process::id()));
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(io_err("remove", &staging))?;
    }
    let cluster = read_manifest(file)?.cluster;
    let shared = pki::cluster_dir(target, &cluster);
    if pki::holds_ca(&shared) {
        return Err(BackupError::ForeignClusterDir {
            path: shared,
            cluster,
        });
    }
    let name = name.map_or_else(|| crate::default_name(target), str::to_owned);
    let result = restore_into(file, &staging, target, &name);
    match result {
        Ok(restored) => Ok(restored),
        Err(e) => {
            if let Err(cleanup) = fs::remove_dir_all(&staging) {
                tracing::warn!(dir = %staging.display(), error = %cleanup, "cannot remove the staging dir");
            }
            Err(e)
        }
    }
}

fn restore_into(
    file: &Path,
    staging: &Path,
    target: &Path,
    name: &str,
) -> Result<Restored, BackupError> {
    let mut data_dir = DataDir::open(staging)?;
    data_dir.claim_name(Some(name))?;
    let node_id = data_dir.node_id();
    let sm_dir = staging.join(crate::data_dir::STATE_DIR);
    let state = StateMachine::open(&sm_dir).map_err(io_err("open the chat state in", &sm_dir))?;
    let backup = load_backup(file, &state)?;
    let cluster = backup.manifest.cluster.clone();
    drop(state);
    let token = pki::new_cluster(staging, &cluster, node_id)?;
    let pending = Pending {
        applied_index: backup.manifest.applied_index,
        cluster,
    };
    let marker = serde_json::to_vec(&pending).expect("serializes");
    let marker_path = staging.join(RESTORED_FILE);
    atomic_file::write_durably(&marker_path, &marker).map_err(io_err("write", &marker_path))?;
    drop(data_dir);
    // Only now, complete, does the directory appear under its name.
    fs::rename(staging, target).map_err(io_err("rename into", target))?;
    let parent = target.parent().filter(|p| !p.as_os_str().is_empty());
    let parent = parent.unwrap_or(Path::new("."));
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", parent))?;
    // Nodes started next to this one (the same --data-root) find the new CA there and join
    // without a token; without it they would need --token.
    let shared_ca = pki::share_identity(target, &pending.cluster)
        .map(|()| pki::cluster_dir(target, &pending.cluster))
        .map_err(|e| e.to_string());
    Ok(Restored {
        backup,
        node_id,
        name: name.to_owned(),
        token: token.to_string(),
        shared_ca,
    })
}

/// Whether `dir` holds a restored state that has not started yet, for which cluster.
///
/// # Errors
/// An unreadable or damaged marker.
pub(crate) fn pending(dir: &Path) -> io::Result<Option<(u64, String)>> {
    let path = dir.join(RESTORED_FILE);
    let Some(bytes) = atomic_file::read(&path)? else {
        return Ok(None);
    };
    let pending: Pending = serde_json::from_slice(&bytes).map_err(|e| {
        io::Error::other(format!("{}: damaged restore marker: {e}", path.display()))
    })?;
    Ok(Some((pending.applied_index, pending.cluster)))
}

/// Seeds the Raft meta of a restored state before Raft starts (see the module doc), then
/// removes the marker. A crash in between seeds nothing twice: the meta is found equal.
///
/// # Errors
/// The marker names another cluster, or the state cannot be written.
pub(crate) fn seed_restored(
    dir: &Path,
    cluster: &str,
    state: &StateMachine,
    (id, name, addrs): (NodeId, &str, NodeAddrs),
) -> io::Result<()> {
    let Some((applied_index, restored_for)) = pending(dir)? else {
        return Ok(());
    };
    if restored_for != cluster {
        return Err(io::Error::other(format!(
            "this data dir was restored for cluster {restored_for:?}, not {cluster:?}: start it \
             with --cluster {restored_for}"
        )));
    }
    let chat = state.chat();
    if chat.applied_index().map_or(0, |i| i.0) != applied_index {
        return Err(io::Error::other(format!(
            "the restored state is at index {:?}, its marker says {applied_index}",
            chat.applied_index()
        )));
    }
    let last = LogId::new(
        <CommittedLeaderId as openraft::vote::RaftLeaderId>::new(0, id),
        applied_index,
    );
    let nodes = BTreeMap::from([(id, addrs.member(name))]);
    let membership = Membership::new(vec![BTreeSet::from([id])], nodes)
        .map_err(|e| io::Error::other(format!("membership: {e}")))?;
    let stored = StoredMembership::new(Some(last), membership);
    let meta = RaftMeta {
        last_applied: codec::encode_log_id(&Some(last)),
        membership: Some(codec::encode_membership(&stored)),
    };
    if chat.last_applied().is_none() {
        chat.seed_raft_meta(meta).map_err(io::Error::other)?;
        tracing::info!(
            applied_index,
            "restored state seeded as the first node of a new cluster"
        );
    } else if chat.last_applied() != Some(meta.last_applied) {
        return Err(io::Error::other(
            "the restored state already has other raft meta than its marker implies",
        ));
    }
    let marker = dir.join(RESTORED_FILE);
    fs::remove_file(&marker)?;
    File::open(dir)?.sync_all()
}

/// Writes a backup of `chat`'s applied state to `target` on this machine (the archive's
/// bases), through a `.partial` file like the tool; `source` is (node id, node name, cluster).
///
/// # Errors
/// The state cannot be read or the file written.
pub(crate) fn write_backup_file(
    chat: &ChatState,
    target: &Path,
    (node, node_name, cluster): (NodeId, String, String),
) -> Result<Verified, BackupError> {
    let payload = partial_path(target).with_extension("payload");
    let result = (|| {
        let (applied_index, contents, bytes, sha256, mut file) = write_payload(chat, &payload)?;
        let opened = BackupOpened {
            session: 0,
            node,
            node_name,
            cluster,
            applied_index,
            contents,
            bytes,
            sha256,
        };
        let mut writer = BackupWriter::create(target, Manifest::for_session(&opened))?;
        io::Seek::rewind(&mut file).map_err(io_err("read", &payload))?;
        let mut buf = vec![0; CHUNK_BYTES];
        loop {
            let n = file.read(&mut buf).map_err(io_err("read", &payload))?;
            if n == 0 {
                break;
            }
            writer.payload(&buf[..n])?;
        }
        writer.finish()
    })();
    let _ = fs::remove_file(&payload);
    result
}

/// Verifies the backup at `file` and loads its chat state into `state` (an empty state),
/// through a payload file in the state's own temp dir (the backup's may be read-only).
///
/// # Errors
/// As [`verify`]; the state refuses the payload.
pub(crate) fn load_backup(file: &Path, state: &StateMachine) -> Result<Verified, BackupError> {
    let payload = state.tmp_path("restore");
    let result = (|| {
        let verified = {
            let out = File::create(&payload).map_err(io_err("create", &payload))?;
            let mut out = BufWriter::with_capacity(1 << 20, out);
            let verified = read_backup(file, Some(&mut out))?;
            out.flush().map_err(io_err("write", &payload))?;
            verified
        };
        state.chat().install_snapshot(&payload)?;
        Ok(verified)
    })();
    let _ = fs::remove_file(&payload);
    result
}

/// Reads the payload length of a backup quickly (header and manifest only), for tools that
/// report progress.
///
/// # Errors
/// As [`verify`], for the header and manifest.
pub fn read_manifest(path: &Path) -> Result<Manifest, BackupError> {
    let file = File::open(path).map_err(io_err("open", path))?;
    let mut reader = Reader {
        input: BufReader::new(file),
        path,
        offset: 0,
        all: Sha256::new(),
    };
    reader.head()
}

#[cfg(test)]
mod tests {
    use chat_sm::{ApplyEntry, ApplyPayload, ClientId, Command, LogIndex, SendCmd};

    use super::*;

    /// A chat state with `messages` messages in two channels, a user and a join secret, applied
    /// as entries 1..; returns it with its directory.
    fn state(messages: u64) -> (tempfile::TempDir, StateMachine) {
        let dir = tempfile::tempdir().unwrap();
        let state = StateMachine::open(&dir.path().join("sm")).unwrap();
        let mut commands = vec![
            Command::RegisterUser {
                name: "alice".into(),
                public_key: [3; 32],
            },
            Command::SetJoinSecret(chat_sm::JoinSecret(vec![9; 32])),
        ];
        for n in 0..messages {
            commands.push(Command::Send(SendCmd {
                channel: format!("c{}", n % 2),
                sender: "alice".into(),
                body: format!("message {n}").into_bytes(),
                client_id: ClientId([1; 16]),
                client_seq: n + 1,
                at_ms: 1_700_000_000_000 + n,
            }));
        }
        let entries: Vec<ApplyEntry<'_>> = commands
            .iter()
            .enumerate()
            .map(|(i, c)| ApplyEntry {
                index: LogIndex(i as u64 + 1),
                payload: ApplyPayload::Command(c),
            })
            .collect();
        let meta = RaftMeta {
            last_applied: vec![1, 2, 3],
            membership: Some(vec![4, 5]),
        };
        let _ = state.chat().apply(&entries, meta);
        (dir, state)
    }

    /// Writes a backup of `state` to `dir/backup.ccb` the way the tool does, from a session.
    fn backup_file(dir: &Path, state: &StateMachine) -> PathBuf {
        let payload = dir.join("payload");
        let (applied_index, contents, bytes, sha256, _) =
            write_payload(state.chat(), &payload).unwrap();
        let opened = BackupOpened {
            session: 1,
            node: 7,
            node_name: "n1".into(),
            cluster: "c".into(),
            applied_index,
            contents,
            bytes,
            sha256,
        };
        let target = dir.join("backup.ccb");
        let mut writer = BackupWriter::create(&target, Manifest::for_session(&opened)).unwrap();
        for chunk in fs::read(&payload).unwrap().chunks(1000) {
            writer.payload(chunk).unwrap();
        }
        writer.finish().unwrap();
        target
    }

    #[tokio::test]
    async fn background_work_runs_at_a_lower_priority_and_leaves_the_caller_alone() {
        let before = rustix::process::getpriority_process(None).unwrap();
        let inside = in_background("test", || rustix::process::getpriority_process(None))
            .await
            .unwrap()
            .unwrap();
        assert!(inside >= BACKGROUND_NICE.max(before), "nice {inside}");
        assert_eq!(rustix::process::getpriority_process(None).unwrap(), before);
    }

    #[test]
    fn a_backup_holds_the_chat_data_and_no_cluster_identity() {
        let (dir, state) = state(10);
        let file = backup_file(dir.path(), &state);
        let verified = verify(&file).unwrap();
        let m = &verified.manifest;
        assert_eq!(m.applied_index, 12);
        assert_eq!(m.cluster, "c");
        assert_eq!(m.source_node, (7, "n1".to_owned()));
        assert_eq!(
            (m.contents.channels, m.contents.messages, m.contents.users),
            (2, 10, 1)
        );
        assert_eq!(m.contents.dedup_records, 10);
        assert!(m.secrets.starts_with("none"));
        assert!(!partial_path(&file).exists());
        let mode = fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        // The payload carries no join secret and no raft meta: a restored state has neither.
        let restored = StateMachine::open(&dir.path().join("restored")).unwrap();
        let payload = dir.path().join("copy");
        read_backup(&file, Some(&mut File::create(&payload).unwrap())).unwrap();
        restored.chat().install_snapshot(&payload).unwrap();
        assert_eq!(restored.chat().join_secret(), None);
        assert_eq!(restored.chat().last_applied(), None);
        assert_eq!(restored.chat().membership(), None);
        assert_eq!(restored.chat().applied_index(), Some(LogIndex(12)));
        assert_eq!(restored.chat().user_key("alice"), Some([3; 32]));
        let original = state.chat().dump().unwrap();
        let copy = restored.chat().dump().unwrap();
        let without_identity = |dump: &str| {
            dump.lines()
                .filter(|l| !l.contains("last_applied") && !l.contains("membership"))
                .filter(|l| !l.contains("join_secret"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(without_identity(&original), without_identity(&copy));
    }

    #[test]
    fn an_existing_target_is_never_overwritten() {
        let (dir, state) = state(2);
        let file = backup_file(dir.path(), &state);
        let before = fs::read(&file).unwrap();
        let opened = BackupOpened {
            session: 1,
            node: 7,
            node_name: "n1".into(),
            cluster: "c".into(),
            applied_index: 1,
            contents: SnapshotContents::default(),
            bytes: 0,
            sha256: [0; 32],
        };
        let refused = BackupWriter::create(&file, Manifest::for_session(&opened));
        assert!(matches!(refused, Err(BackupError::Io { .. })));
        assert_eq!(fs::read(&file).unwrap(), before);
    }

    /// Every damage is refused, with the offset where reading found it.
    #[test]
    fn damaged_files_are_refused_naming_the_offset() {
        let (dir, state) = state(50);
        let file = backup_file(dir.path(), &state);
        let good = fs::read(&file).unwrap();
        let manifest_len = u32::from_le_bytes(good[9..13].try_into().unwrap()) as usize;
        let payload_at = 13 + manifest_len;
        let damaged = dir.path().join("damaged.ccb");
        let check = |bytes: &[u8], want: &str| {
            fs::write(&damaged, bytes).unwrap();
            let err = verify(&damaged).unwrap_err().to_string();
            assert!(err.contains(want), "{want:?} not in {err:?}");
            err
        };
        // A flipped bit in one message's body, a record's last bytes: found by that record's
        // CRC, so the offset named is where the record ends, just past the flipped byte.
        let mut flipped = good.clone();
        let at = good
            .windows(10)
            .position(|w| w == b"message 25")
            .expect("a message body in the payload")
            + 9;
        assert!(at > payload_at);
        flipped[at] ^= 0x10;
        let err = check(&flipped, "payload:");
        let offset: usize = err
            .rsplit("offset ")
            .next()
            .and_then(|s| s.trim_end_matches(')').parse().ok())
            .unwrap();
        assert!(offset > at && offset <= at + 8, "{err}");
        // Cut short anywhere: refused.
        for cut in [5, 13, payload_at + 10, good.len() - 1] {
            check(&good[..cut], "");
        }
        check(&good[..payload_at + 10], "cut short");
        // Another version, another file, a changed manifest, a changed trailer, extra bytes.
        let mut version = good.clone();
        version[8] = 9;
        check(&version, "format version 9");
        let mut magic = good.clone();
        magic[0] = b'X';
        check(&magic, "bad magic");
        let mut manifest = good.clone();
        let pos = good
            .windows(8)
            .position(|w| w == b"messages")
            .expect("the manifest counts messages");
        manifest[pos + 10] = if manifest[pos + 10] == b'5' {
            b'6'
        } else {
            b'5'
        };
        check(&manifest, "manifest");
        let mut trailer = good.clone();
        *trailer.last_mut().unwrap() ^= 1;
        check(&trailer, "SHA-256");
        let mut longer = good.clone();
        longer.push(0);
        check(&longer, "after the trailer");
        // A .partial file (no trailer) is refused.
        check(&good[..good.len() - 40], "");
    }

    #[test]
    fn restore_builds_a_new_identity_and_leaves_nothing_on_failure() {
        let (dir, state) = state(20);
        let file = backup_file(dir.path(), &state);
        let target = dir.path().join("new").join("node-1");
        let restored = restore(&file, &target, None).unwrap();
        assert_eq!(restored.name, "n1");
        assert!(restored.token.starts_with("CC1-"), "{}", restored.token);
        assert!(target.join("tls").join("node.crt").exists());
        assert!(target.join(RESTORED_FILE).exists());
        assert_eq!(
            restored.shared_ca.as_deref().ok(),
            Some(dir.path().join("new").join("cluster-c").as_path())
        );
        assert_eq!(DataDir::read_node_id(&target).unwrap(), restored.node_id);
        assert_eq!(pending(&target).unwrap(), Some((22, "c".to_owned())));
        // Into a non-empty dir: refused, nothing changed.
        let again = restore(&file, &target, None);
        assert!(
            matches!(again, Err(BackupError::TargetNotEmpty { .. })),
            "{again:?}"
        );
        // Next to another cluster's CA: refused before anything is written.
        let sibling = dir.path().join("new").join("node-2");
        let foreign = restore(&file, &sibling, None);
        assert!(
            matches!(foreign, Err(BackupError::ForeignClusterDir { .. })),
            "{foreign:?}"
        );
        assert!(!sibling.exists());
        // A damaged file: nothing at the target, no staging dir left.
        let mut bytes = fs::read(&file).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        let damaged = dir.path().join("damaged.ccb");
        fs::write(&damaged, &bytes).unwrap();
        let elsewhere = dir.path().join("other").join("node-1");
        let refused = restore(&damaged, &elsewhere, Some("r1"));
        assert!(
            matches!(refused, Err(BackupError::Corrupt { .. })),
            "{refused:?}"
        );
        assert!(!elsewhere.exists());
        let left: Vec<_> = fs::read_dir(dir.path().join("other"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn seeding_a_restored_state_is_idempotent_and_names_its_cluster() {
        let (dir, state) = state(4);
        let file = backup_file(dir.path(), &state);
        let target = dir.path().join("r").join("node-1");
        let restored = restore(&file, &target, None).unwrap();
        let id = restored.node_id;
        let addr = |p: u16| std::net::SocketAddr::from(([127, 0, 0, 1], p));
        let addrs = NodeAddrs {
            raft: addr(1),
            client: addr(2),
            metrics: addr(3),
        };
        let sm = StateMachine::open(&target.join(crate::data_dir::STATE_DIR)).unwrap();
        let wrong = seed_restored(&target, "other", &sm, (id, "n1", addrs));
        assert!(wrong.unwrap_err().to_string().contains("--cluster c"));
        seed_restored(&target, "c", &sm, (id, "n1", addrs)).unwrap();
        assert!(!target.join(RESTORED_FILE).exists());
        let last = codec::decode_log_id(&sm.chat().last_applied().unwrap()).unwrap();
        assert_eq!(
            last,
            Some(LogId::new(
                <CommittedLeaderId as openraft::vote::RaftLeaderId>::new(0, id),
                6
            ))
        );
        let membership = codec::decode_membership(&sm.chat().membership().unwrap()).unwrap();
        let voters: Vec<NodeId> = membership.membership().voter_ids().collect();
        assert_eq!(voters, vec![id]);
        // No marker: nothing to do.
        seed_restored(&target, "c", &sm, (id, "n1", addrs)).unwrap();
    }
}
