//! Small meta files (vote, committed, purge point), each replaced atomically by rename.

use crate::format::{self, MetaError, TMP_SUFFIX};
use crate::fs::FileSystem;
use crate::segment::{sync_dir_or_panic, sync_or_panic};
use crate::{Durability, Error};
use std::io;
use std::path::Path;

/// File holding the vote bytes.
pub(crate) const VOTE_FILE: &str = "vote.meta";
/// File holding the committed bytes.
pub(crate) const COMMITTED_FILE: &str = "committed.meta";
/// File holding the purge point (u64 LE).
pub(crate) const PURGED_FILE: &str = "purged.meta";

/// Replaces `dir/name` with a meta file holding `payload`: write `name.tmp`, fsync it, rename
/// over `name`, fsync `dir`. With `Durability::Buffered` both fsyncs are skipped, so the
/// replacement is atomic (readers see the old or the new file) but not durable.
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
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}{TMP_SUFFIX}"));
    let io = |op: &'static str| crate::error::io_error(op, &tmp);
    let file = fs.create(&tmp).map_err(io("create meta"))?;
    file.write_all_at(&format::encode_meta(payload), 0)
        .map_err(io("write meta"))?;
    if durability == Durability::Sync {
        // Crash before this sync returns: the old file is untouched; the `.tmp` is removed at open.
        sync_or_panic(file.as_ref(), &tmp, u64::MAX);
    }
    drop(file);
    fs.rename(&tmp, &path).map_err(io("rename meta"))?;
    if durability == Durability::Sync {
        // Crash before this directory sync returns: the name points at the old or the new file,
        // both complete and checksummed, because the new one was synced before the rename.
        sync_dir_or_panic(fs, dir);
    }
    Ok(())
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
    let file = match fs.open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("open meta")(e)),
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

/// Decodes the purge point payload.
pub(crate) fn decode_purged(dir: &Path, payload: &[u8]) -> Result<u64, Error> {
    let bytes: [u8; 8] = payload.try_into().map_err(|_| Error::Corrupt {
        segment: dir.join(PURGED_FILE),
        offset: format::META_HEADER_LEN as u64,
        reason: format!("purge point has {} bytes, expected 8", payload.len()),
    })?;
    Ok(u64::from_le_bytes(bytes))
}
