//! Small meta files: Raft's durable metadata other than the entries. The committed marker and
//! the purge point (with the caller's payload) are replaced atomically by rename
//! (`durable::replace_file`); the vote is overwritten in place in one of two checksummed slots
//! ([`VoteSlots`]), because a rename plus a directory fsync waits for a journal commit of the
//! whole file system, which under load has taken over half a second and stalled an election.
//! Fsync failures follow the crate's one policy (`durable.rs`): they panic.

use crate::durable;
use crate::format::{self, MetaError};
use crate::fs::FileSystem;
use crate::{Durability, Error, LogIndex};
use std::io;
use std::path::Path;

/// File that held the vote before vote slots (read once, migrated, then removed).
pub(crate) const VOTE_FILE: &str = "vote.meta";
/// File holding the two vote slots.
pub(crate) const VOTE_SLOTS_FILE: &str = "vote.slots";
/// Bytes per vote slot: a meta frame (header, 8-byte sequence number, vote), zero-padded.
pub(crate) const VOTE_SLOT_LEN: usize = 512;
/// File holding the committed bytes.
pub(crate) const COMMITTED_FILE: &str = "committed.meta";
/// File holding the purge point and the caller's payload (a purge record, see `format.rs`).
pub(crate) const PURGED_FILE: &str = "purged.meta";

/// The purge point as stored on disk, with the bytes the caller stored alongside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgePoint {
    /// Entries at or below this index are gone.
    pub index: LogIndex,
    /// The bytes handed to [`crate::Wal::purge_through_with`] with this purge point, stored in
    /// the same file and so made durable together with it. `None` when the purge point was
    /// written by [`crate::Wal::purge_through`] or by a build from before purge payloads.
    pub payload: Option<Vec<u8>>,
}

/// Replaces `dir/name` with a meta file holding `payload`, by way of
/// [`durable::replace_file`] (durable with `Durability::Sync`, only atomic with `Buffered`).
///
/// # Errors
///
/// `Io`.
///
/// # Panics
///
/// If an fsync fails.
pub(crate) fn write_atomic(
    fs: &dyn FileSystem,
    dir: &Path,
    name: &str,
    payload: &[u8],
    durability: Durability,
) -> Result<(), Error> {
    durable::replace_file(fs, dir, name, &format::encode_meta(payload), durability)
}

/// Replaces `purged.meta` with `point`, durably.
///
/// # Errors
///
/// `Io`.
///
/// # Panics
///
/// If an fsync fails.
pub(crate) fn save_purge_point(
    fs: &dyn FileSystem,
    dir: &Path,
    point: &PurgePoint,
) -> Result<(), Error> {
    let record = format::encode_purge_record(point.index.0, point.payload.as_deref());
    write_atomic(fs, dir, PURGED_FILE, &record, Durability::Sync)
}

/// Loads `purged.meta`; `None` if there is none. Layout 1 (a bare index, as earlier builds
/// wrote) loads with payload `None`.
///
/// # Errors
///
/// `Corrupt` or `UnsupportedVersion` naming the file for a damaged file, a record shorter than
/// its index, or a record layout this build cannot read; `Io`.
pub(crate) fn load_purge_point(
    fs: &dyn FileSystem,
    dir: &Path,
) -> Result<Option<PurgePoint>, Error> {
    let Some(record) = load(fs, dir, PURGED_FILE, OnCorrupt::Fail)? else {
        return Ok(None);
    };
    let path = dir.join(PURGED_FILE);
    match format::decode_purge_record(&record) {
        Ok((index, payload)) => Ok(Some(PurgePoint {
            index: LogIndex(index),
            payload: payload.map(<[u8]>::to_vec),
        })),
        Err(MetaError::UnsupportedVersion(found)) => Err(Error::UnsupportedVersion { path, found }),
        Err(MetaError::Corrupt(reason)) => Err(Error::Corrupt {
            segment: path,
            offset: format::META_HEADER_LEN as u64,
            reason: reason.into(),
        }),
    }
}

/// Opens `path` for reading and writing; `None` if it does not exist.
fn open_existing(
    fs: &dyn FileSystem,
    path: &Path,
    op: &'static str,
) -> Result<Option<std::sync::Arc<dyn crate::fs::FsFile>>, Error> {
    match fs.open(path) {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(crate::error::io_error(op, path)(e)),
    }
}

/// How a damaged meta file is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnCorrupt {
    /// Refuse to open: the file was written durably, so damage is real corruption.
    Fail,
    /// Read as missing, with a `warn`: the file is written without fsync and may be torn.
    Ignore,
}

/// Loads the payload of `dir/name`; `None` if the file does not exist.
pub(crate) fn load(
    fs: &dyn FileSystem,
    dir: &Path,
    name: &str,
    on_corrupt: OnCorrupt,
) -> Result<Option<Vec<u8>>, Error> {
    let path = dir.join(name);
    let io = |op: &'static str| crate::error::io_error(op, &path);
    let Some(file) = open_existing(fs, &path, "open meta")? else {
        return Ok(None);
    };
    let len = file.file_len().map_err(io("stat meta"))?;
    // Meta payloads are a few dozen bytes; anything huge is damage, not a reason to allocate.
    let mut bytes = vec![0u8; len.min(1 << 20) as usize];
    file.read_exact_at(&mut bytes, 0).map_err(io("read meta"))?;
    match format::decode_meta(&bytes) {
        Ok(payload) => Ok(Some(payload.to_vec())),
        Err(MetaError::UnsupportedVersion(found)) => Err(Error::UnsupportedVersion { path, found }),
        Err(MetaError::Corrupt(reason)) => match on_corrupt {
            OnCorrupt::Fail => Err(Error::Corrupt {
                segment: path,
                offset: 0,
                reason: reason.into(),
            }),
            OnCorrupt::Ignore => {
                tracing::warn!(file = %path.display(), reason, "ignoring damaged meta file");
                Ok(None)
            }
        },
    }
}

/// Opaque vote bytes.
type Vote = Vec<u8>;

/// The vote file: two fixed slots of [`VOTE_SLOT_LEN`] bytes, each a meta frame whose payload
/// is a sequence number (u64 LE) and the vote. Saves alternate between the slots and fdatasync
/// the file; its size and blocks never change after creation, so the fdatasync carries data
/// only and never waits for a journal commit.
///
/// A crash while one slot is written can tear only that slot; the other still holds the
/// previous vote, which is the latest one a caller was told is durable. At load the valid slot
/// with the higher sequence number wins; an all-zero slot is empty; a damaged slot next to a
/// valid one is taken for such a torn write (with a `warn`); two damaged slots are corruption.
#[derive(Debug)]
pub(crate) struct VoteSlots {
    file: std::sync::Arc<dyn crate::fs::FsFile>,
    path: std::path::PathBuf,
    /// Sequence number of the newest saved vote (0: none yet).
    seq: u64,
}

impl VoteSlots {
    /// Opens `dir/vote.slots` and returns it with the newest vote; creates it when missing
    /// (first open by this build, or a new WAL), moving an earlier build's `vote.meta` into it.
    ///
    /// # Errors
    ///
    /// `Corrupt` or `UnsupportedVersion` naming the file; `Io`.
    ///
    /// # Panics
    ///
    /// If an fsync fails.
    pub(crate) fn open_or_migrate(
        fs: &dyn FileSystem,
        dir: &Path,
    ) -> Result<(VoteSlots, Option<Vote>), Error> {
        if let Some(opened) = VoteSlots::open(fs, dir)? {
            return Ok(opened);
        }
        let old = load(fs, dir, VOTE_FILE, OnCorrupt::Fail)?;
        // The old vote goes into the slots durably before its file is removed: a crash in
        // between leaves both, and the next open reads the slots and never the old file again.
        let slots = VoteSlots::create(fs, dir, old.as_deref())?;
        if old.is_some() {
            let path = dir.join(VOTE_FILE);
            fs.remove_file(&path)
                .map_err(crate::error::io_error("remove old vote file", &path))?;
            // Crash before this sync returns: `vote.meta` may reappear, unread, as above.
            durable::sync_dir_or_panic(fs, dir);
        }
        Ok((slots, old))
    }

    /// Opens `dir/vote.slots`, or `None` when there is none yet. Returns the newest vote.
    fn open(fs: &dyn FileSystem, dir: &Path) -> Result<Option<(VoteSlots, Option<Vote>)>, Error> {
        let path = dir.join(VOTE_SLOTS_FILE);
        let io = |op: &'static str| crate::error::io_error(op, &path);
        let Some(file) = open_existing(fs, &path, "open vote slots")? else {
            return Ok(None);
        };
        let len = file.file_len().map_err(io("stat vote slots"))?;
        if len != 2 * VOTE_SLOT_LEN as u64 {
            return Err(Error::Corrupt {
                segment: path,
                offset: 0,
                reason: format!(
                    "vote slots file has {len} bytes, expected {}",
                    2 * VOTE_SLOT_LEN
                ),
            });
        }
        let mut bytes = vec![0u8; 2 * VOTE_SLOT_LEN];
        file.read_exact_at(&mut bytes, 0)
            .map_err(io("read vote slots"))?;
        let mut newest: Option<(u64, Vec<u8>)> = None;
        let mut damaged = Vec::new();
        for (slot, chunk) in bytes.chunks(VOTE_SLOT_LEN).enumerate() {
            if chunk.iter().all(|b| *b == 0) {
                continue;
            }
            match decode_slot(chunk) {
                Ok((seq, vote)) => {
                    if newest.as_ref().is_none_or(|(best, _)| seq > *best) {
                        newest = Some((seq, vote));
                    }
                }
                Err(MetaError::UnsupportedVersion(found)) => {
                    return Err(Error::UnsupportedVersion { path, found })
                }
                Err(MetaError::Corrupt(reason)) => damaged.push((slot, reason)),
            }
        }
        match (&newest, damaged.as_slice()) {
            (None, [_, _]) => {
                return Err(Error::Corrupt {
                    segment: path,
                    offset: 0,
                    reason: format!("both vote slots are damaged: {}", damaged[0].1),
                })
            }
            (Some(_), [(slot, reason)]) => tracing::warn!(
                file = %path.display(),
                slot,
                reason,
                "ignoring a damaged vote slot (a save torn by a crash)"
            ),
            _ => {}
        }
        let (seq, vote) = match newest {
            Some((seq, vote)) => (seq, Some(vote)),
            None => (0, None),
        };
        Ok(Some((VoteSlots { file, path, seq }, vote)))
    }

    /// Creates `dir/vote.slots` holding `vote` (or nothing), durably: zero-filled slots
    /// written and synced under a temp name, renamed, directory synced. Done once per WAL.
    ///
    /// # Panics
    ///
    /// If an fsync fails.
    fn create(fs: &dyn FileSystem, dir: &Path, vote: Option<&[u8]>) -> Result<VoteSlots, Error> {
        let path = dir.join(VOTE_SLOTS_FILE);
        let mut bytes = vec![0u8; 2 * VOTE_SLOT_LEN];
        let seq = match vote {
            Some(vote) => {
                bytes[..VOTE_SLOT_LEN].copy_from_slice(&encode_slot(&path, 1, vote)?);
                1
            }
            None => 0,
        };
        durable::replace_file(fs, dir, VOTE_SLOTS_FILE, &bytes, Durability::Sync)?;
        let file = open_existing(fs, &path, "open vote slots")?.ok_or_else(|| {
            crate::error::io_error("open vote slots", &path)(io::ErrorKind::NotFound.into())
        })?;
        Ok(VoteSlots { file, path, seq })
    }

    /// Saves `vote` durably in the slot the newest vote is not in.
    ///
    /// # Panics
    ///
    /// If the fdatasync fails.
    pub(crate) fn save(&mut self, vote: &[u8], warn_ms: u64) -> Result<(), Error> {
        let seq = self.seq + 1;
        let slot = encode_slot(&self.path, seq, vote)?;
        let offset = (seq % 2) * VOTE_SLOT_LEN as u64;
        self.file
            .write_all_at(&slot, offset)
            .map_err(crate::error::io_error("write vote slot", &self.path))?;
        // Crash before this sync returns: only this slot can be torn; the other still holds
        // the previous vote, the newest one a caller was told is durable.
        durable::sync_or_panic(self.file.as_ref(), &self.path, warn_ms);
        self.seq = seq;
        Ok(())
    }
}

/// One slot's bytes: a meta frame of `seq` and `vote`, zero-padded to [`VOTE_SLOT_LEN`].
fn encode_slot(path: &Path, seq: u64, vote: &[u8]) -> Result<Vec<u8>, Error> {
    let mut payload = Vec::with_capacity(8 + vote.len());
    payload.extend_from_slice(&seq.to_le_bytes());
    payload.extend_from_slice(vote);
    let mut frame = format::encode_meta(&payload);
    if frame.len() > VOTE_SLOT_LEN {
        return Err(crate::error::io_error("encode vote slot", path)(
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a vote of {} bytes does not fit a {VOTE_SLOT_LEN}-byte slot",
                    vote.len()
                ),
            ),
        ));
    }
    frame.resize(VOTE_SLOT_LEN, 0);
    Ok(frame)
}

/// Decodes one slot into its sequence number and vote.
fn decode_slot(chunk: &[u8]) -> Result<(u64, Vec<u8>), MetaError> {
    // The frame's own length field tells where it ends; the zero padding after it is ignored.
    let frame_len = format::meta_frame_len(chunk).ok_or(MetaError::Corrupt("slot header"))?;
    let payload = format::decode_meta(
        chunk
            .get(..frame_len)
            .ok_or(MetaError::Corrupt("slot frame longer than the slot"))?,
    )?;
    let (seq, vote) = payload.split_first_chunk::<8>().ok_or(MetaError::Corrupt(
        "slot payload shorter than its sequence number",
    ))?;
    Ok((u64::from_le_bytes(*seq), vote.to_vec()))
}
