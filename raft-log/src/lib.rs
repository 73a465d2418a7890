//! A segmented, CRC-framed, group-committed write-ahead log for the cellchat Raft log.
//!
//! # Contract
//!
//! - An entry is an opaque payload at a [`LogIndex`]. Indexes are contiguous; the first entry of
//!   an empty, never-purged log may have any index (openraft starts at 0).
//! - [`Wal::append`] with [`Durability::Sync`] returns only after an fdatasync covering the
//!   batch has returned. Several threads appending at once share fsyncs (group commit).
//! - Entries are readable as soon as `append` returns. Every payload read back is CRC-checked
//!   again; a mismatch is `Error::Corrupt`, never a wrong payload.
//! - [`Wal::truncate_from`] and [`Wal::purge_through`] are durable when they return. Nothing at
//!   or below the purge point is ever returned.
//! - The `Wal` owns all of Raft's durable metadata besides the entries, as opaque bytes: the
//!   vote (durable when [`Wal::save_vote`] returns), the committed marker (replaced atomically
//!   but may lag after a crash, see [`Wal::save_committed`]), and a payload stored with the
//!   purge point ([`Wal::purge_through_with`], read back by [`Wal::purged`]), durable together
//!   with it and before any segment is deleted.
//! - Recovery at open truncates a torn tail of the newest segment and refuses to open on any
//!   other damage (see `recovery.rs` for the rule and its assumption).
//! - A failed fsync panics, everywhere in the crate, and is never retried or returned as an
//!   error: afterwards the page cache no longer says what is on disk ("fsyncgate"). The rule
//!   and its one implementation live in `durable.rs`, with the one atomic-replace helper that
//!   every meta file goes through.
//!
//! The on-disk layout is described once, in `format.rs`.
//!
//! # Invariants (enforced by `Wal`)
//!
//! - Segment N+1 starts one past the last index of segment N.
//! - Records are never rewritten in place, only cut from the tail (by overwriting them with
//!   zeros, so a cut can never be undone by a crash).
//! - Only the newest segment may end in zeros; its successor is prepared zero-filled in the
//!   background so that appends overwrite zeros and an fdatasync has no size change to commit
//!   (see `segment.rs`).
//!
//! # Non-goals
//!
//! - Surviving damage to bytes that were already fsynced (that would take something like
//!   TigerBeetle's protocol-aware recovery); such damage is reported, not repaired.
//! - Async I/O, terms or any knowledge of Raft: payloads are opaque bytes.
//! - Repair tooling; an operator wipes a corrupt node and re-adds it.
#![deny(missing_docs)]

mod config;
mod durable;
mod error;
mod format;
mod fs;
mod meta;
mod recovery;
mod segment;
mod wal;

pub use config::{Config, FsyncObserver};
pub use error::Error;
#[cfg(feature = "testing")]
pub use fs::{FaultyFs, Tear};
pub use fs::{FileSystem, FsFile, StdFs};
pub use meta::PurgePoint;
pub use wal::{Wal, WalStats};

use std::fmt;

/// Position of an entry in the Raft log. Index 0 is a valid entry position (openraft uses it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogIndex(pub u64);

impl fmt::Display for LogIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Whether `append` waits for the batch to reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Return only after an fdatasync covering the batch (possibly shared with other callers).
    Sync,
    /// Return after the write syscall; a later `sync` or `Sync` append makes it durable.
    Buffered,
}
