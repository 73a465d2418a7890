//! The crate's one error type.

use crate::LogIndex;
use std::io;
use std::path::{Path, PathBuf};

/// Everything a `Wal` operation can fail with. Broken invariants (a failed fsync) panic instead.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation failed; `op` names it (`"open segment"`, `"append"`, ...).
    #[error("io error during {op} on {path}: {source}")]
    Io {
        /// The operation that failed.
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Bytes on disk that recovery may not repair: damage in a sealed segment, a valid frame
    /// after a bad one, a non-contiguous index, or a corrupt vote file.
    #[error("corrupt data in {segment} at byte offset {offset}: {reason}")]
    Corrupt {
        /// The damaged file (a segment, or a meta file).
        segment: PathBuf,
        /// Byte offset of the damage within the file.
        offset: u64,
        /// What was wrong.
        reason: String,
    },
    /// A file written by a format version this build cannot read.
    #[error("unsupported format version {found} in {path}")]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version found in its header.
        found: u32,
    },
    /// `append` was given a first index other than `Wal::next_index()`.
    #[error("non-contiguous append: expected index {expected}, found {found}")]
    NonContiguous {
        /// The index the log needs next.
        expected: LogIndex,
        /// The index the caller passed.
        found: LogIndex,
    },
    /// An entry longer than `Config::frame_bytes_max`.
    #[error("entry of {len} bytes exceeds frame_bytes_max {max}")]
    EntryTooLarge {
        /// Payload length in bytes.
        len: u64,
        /// The configured bound.
        max: u32,
    },
    /// A `Config` field out of bounds.
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    /// `truncate_from` at or below the purge point.
    #[error("index {index} is out of range: purged through {purged_through}")]
    OutOfRange {
        /// The index asked for.
        index: LogIndex,
        /// The current purge point.
        purged_through: LogIndex,
    },
    /// An earlier write failed, so the file no longer matches memory; reopen the `Wal`.
    #[error("wal is unusable after an earlier io failure; reopen it")]
    Poisoned,
}

/// Builds the `map_err` closure for an `Error::Io` on `path`.
pub(crate) fn io_error(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::Io { op, path, source }
}
