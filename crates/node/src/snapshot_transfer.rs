//! Moving a snapshot file between nodes: the leader sends it in chunks over the snapshot lane,
//! the follower writes them to a temp file and, on the last one, hands the file to openraft.
//!
//! A transfer is the chunks of one snapshot (leader vote and last log id) in order from offset
//! 0; a chunk at offset 0 starts a new transfer and drops any unfinished one. A chunk that
//! does not continue the current transfer is refused, and the leader starts over.

use std::future::Future;

use openraft::error::StreamingError;
use openraft::raft::SnapshotResponse;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::raft::Raft;
use crate::snapshot_file::SnapshotFile;
use crate::state_machine::StateMachine;
use crate::types::{LogId, Snapshot, SnapshotMeta, TypeConfig, Vote};

/// Bytes of snapshot data per chunk: small next to the frame limit, large enough that the
/// per-request cost does not matter.
const CHUNK_BYTES: usize = 1 << 20;

/// One piece of a snapshot on its way to a follower.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotChunk {
    /// The sending leader's vote.
    pub vote: Vote,
    /// The snapshot's metadata (the same in every chunk of a transfer).
    pub meta: SnapshotMeta,
    /// Where `data` starts in the file.
    pub offset: u64,
    /// The bytes.
    pub data: Vec<u8>,
    /// This is the last chunk: install the snapshot.
    pub done: bool,
}

/// Why a follower refused a chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum TransferError {
    /// The chunk does not continue the transfer in progress.
    #[error("snapshot chunk at offset {got} does not continue the transfer (expected {expected})")]
    OutOfOrder {
        /// The offset the receiver expected (0 when no transfer is in progress).
        expected: u64,
        /// The chunk's offset.
        got: u64,
    },
    /// Writing or installing the file failed on the follower.
    #[error("snapshot transfer failed on the receiver: {0}")]
    Receiver(String),
}

/// Sends `snapshot` chunk by chunk through `call`, which returns the follower's answer to
/// each chunk (openraft's response comes with the last one).
///
/// # Errors
/// The first failed call, or an io error reading the file.
pub async fn send<F, Fut, E>(
    vote: Vote,
    mut snapshot: Snapshot,
    mut call: F,
) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>>
where
    F: FnMut(SnapshotChunk) -> Fut,
    Fut: Future<Output = Result<Option<SnapshotResponse<TypeConfig>>, E>>,
    E: Into<StreamingError<TypeConfig>>,
{
    let io = |e: std::io::Error| StreamingError::from(openraft::error::NetworkError::new(&e));
    let file = &mut snapshot.snapshot;
    let len = tokio::fs::metadata(file.path()).await.map_err(io)?.len();
    file.seek(std::io::SeekFrom::Start(0)).await.map_err(io)?;
    let mut offset = 0u64;
    loop {
        let want = usize::try_from(len - offset).map_or(CHUNK_BYTES, |left| left.min(CHUNK_BYTES));
        let mut data = vec![0; want];
        file.read_exact(&mut data).await.map_err(io)?;
        let done = offset + want as u64 == len;
        let chunk = SnapshotChunk {
            vote,
            meta: snapshot.meta.clone(),
            offset,
            data,
            done,
        };
        let answer = call(chunk).await.map_err(Into::into)?;
        offset += want as u64;
        if done {
            return answer.ok_or_else(|| {
                let e = std::io::Error::other("follower did not answer the last snapshot chunk");
                io(e)
            });
        }
    }
}

/// The transfer a follower is receiving.
struct Receiving {
    vote: Vote,
    last: Option<LogId>,
    file: SnapshotFile,
    written: u64,
}

/// A follower's side of snapshot transfers. Cheap to clone; clones share the transfer.
#[derive(Clone)]
pub struct SnapshotReceiver {
    state_machine: StateMachine,
    current: std::sync::Arc<tokio::sync::Mutex<Option<Receiving>>>,
}

impl SnapshotReceiver {
    /// Receives into temp files of `state_machine`'s snapshot directory.
    pub fn new(state_machine: StateMachine) -> Self {
        SnapshotReceiver {
            state_machine,
            current: Default::default(),
        }
    }

    /// Takes one chunk; on the last one installs the snapshot through `raft` and returns
    /// openraft's answer.
    ///
    /// # Errors
    /// [`TransferError`] when the chunk is out of order or the file cannot be written.
    pub async fn receive(
        &self,
        raft: &Raft,
        chunk: SnapshotChunk,
    ) -> Result<Option<SnapshotResponse<TypeConfig>>, TransferError> {
        let failed = |e: std::io::Error| TransferError::Receiver(e.to_string());
        let mut current = self.current.lock().await;
        if chunk.offset == 0 {
            let path = self.state_machine.tmp_path("recv");
            let file = SnapshotFile::create(&path).await.map_err(failed)?;
            *current = Some(Receiving {
                vote: chunk.vote,
                last: chunk.meta.last_log_id,
                file,
                written: 0,
            });
        }
        let receiving = match current.as_mut() {
            Some(r)
                if r.vote == chunk.vote
                    && r.last == chunk.meta.last_log_id
                    && r.written == chunk.offset =>
            {
                r
            }
            other => {
                let expected = other.map_or(0, |r| r.written);
                return Err(TransferError::OutOfOrder {
                    expected,
                    got: chunk.offset,
                });
            }
        };
        receiving
            .file
            .write_all(&chunk.data)
            .await
            .map_err(failed)?;
        receiving.written += chunk.data.len() as u64;
        if !chunk.done {
            return Ok(None);
        }
        let Receiving { mut file, .. } = current.take().expect("matched above");
        drop(current);
        file.sync().await.map_err(failed)?;
        let snapshot = Snapshot {
            meta: chunk.meta,
            snapshot: file,
        };
        raft.install_full_snapshot(chunk.vote, snapshot)
            .await
            .map(Some)
            .map_err(|e| TransferError::Receiver(e.to_string()))
    }
}
