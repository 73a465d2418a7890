//! How bytes and names reach the disk: the crate's one fsync-failure policy and its one
//! atomic-replace helper. Every fsync and directory fsync in raft-log goes through this module.
//!
//! # The fsync-failure policy
//!
//! A failed fsync (of a file or of a directory) panics, everywhere in this crate, and is never
//! retried and never returned as an error. After a failed fsync the kernel may have dropped the
//! dirty pages and marked them clean, so a retry could "succeed" without the data on disk
//! (PostgreSQL's "fsyncgate"), and even a read no longer tells what the disk holds. The process
//! must stop, restart and recover from what is really on disk. [`fsync_failed`] is the one
//! place that carries this out; [`sync_or_panic`] and [`sync_dir_or_panic`] call it, and
//! group commit (`Wal::sync_through`), which must wake its waiters first, calls it too.
//!
//! This holds for files nobody relies on yet as well (a segment being prepared, a `.tmp` meta
//! file): a disk that failed one fsync is not trusted with the next, and one rule is easier to
//! check than a list of exceptions.
//!
//! # Atomic replacement
//!
//! [`replace_file`] writes a whole small file under `name.tmp`, fsyncs it, renames it over
//! `name` and fsyncs the directory. Meta files (`committed.meta`, `purged.meta`) and the vote
//! slots' first creation (including the migration of an earlier build's `vote.meta`) use it;
//! new segments use its second half, [`install_file`], after writing their header.

use crate::format::TMP_SUFFIX;
use crate::fs::{FileSystem, FsFile};
use crate::{Durability, Error};
use std::path::Path;
use std::time::{Duration, Instant};

/// Carries out the fsync-failure policy (module doc): logs at `error` and panics.
///
/// # Panics
///
/// Always.
pub(crate) fn fsync_failed(path: &Path, error: &std::io::Error) -> ! {
    tracing::error!(file = %path.display(), %error, "fsync failed; stopping");
    panic!("fsync of {} failed: {error}", path.display());
}

/// Fdatasyncs `file`, logging a `warn` when slower than `warn_ms`; returns how long it took.
///
/// # Panics
///
/// If the fsync fails (module doc, "The fsync-failure policy").
pub(crate) fn sync_or_panic(file: &dyn FsFile, path: &Path, warn_ms: u64) -> Duration {
    match timed_sync(file, path, warn_ms) {
        Ok(took) => took,
        Err(e) => fsync_failed(path, &e),
    }
}

/// Fdatasyncs `file`, logging a `warn` when slower than `warn_ms`; returns how long it took.
/// The caller must hand an error to [`fsync_failed`] and never retry; only group commit calls
/// this directly, because it must mark the failure for its waiters before panicking.
pub(crate) fn timed_sync(
    file: &dyn FsFile,
    path: &Path,
    warn_ms: u64,
) -> std::io::Result<Duration> {
    let started = Instant::now();
    file.sync_data()?;
    let elapsed = started.elapsed();
    let elapsed_ms = elapsed.as_millis() as u64;
    if elapsed_ms > warn_ms {
        tracing::warn!(file = %path.display(), elapsed_ms, "slow fsync");
    }
    Ok(elapsed)
}

/// Fsyncs the directory `dir`, making creations, renames and removals in it durable.
///
/// # Panics
///
/// If the fsync fails (module doc, "The fsync-failure policy").
pub(crate) fn sync_dir_or_panic(fs: &dyn FileSystem, dir: &Path) {
    if let Err(e) = fs.sync_dir(dir) {
        fsync_failed(dir, &e);
    }
}

/// Replaces `dir/name` with a file holding exactly `bytes`: writes `name.tmp`, then
/// [`install_file`]s it. With `Durability::Buffered` both fsyncs are skipped, so the
/// replacement is atomic (readers see the old or the new file, or after a crash possibly an
/// empty or torn new one) but not durable.
///
/// # Errors
///
/// `Io` if creating, writing or renaming fails; `dir/name` is then untouched or replaced whole.
///
/// # Panics
///
/// If an fsync fails.
pub(crate) fn replace_file(
    fs: &dyn FileSystem,
    dir: &Path,
    name: &str,
    bytes: &[u8],
    durability: Durability,
) -> Result<(), Error> {
    let tmp = dir.join(format!("{name}{TMP_SUFFIX}"));
    let file = fs
        .create(&tmp)
        .map_err(crate::error::io_error("create file", &tmp))?;
    file.write_all_at(bytes, 0)
        .map_err(crate::error::io_error("write file", &tmp))?;
    install_file(fs, file, &tmp, &dir.join(name), durability)
}

/// Puts the fully written file `tmp` (open as `file`) in place as `path`, in the same
/// directory: fsync `tmp`, rename it over `path`, fsync the directory. Open removes any `.tmp`
/// left behind.
///
/// # Errors
///
/// `Io` if the rename fails (`path` is then untouched).
///
/// # Panics
///
/// If an fsync fails.
pub(crate) fn install_file(
    fs: &dyn FileSystem,
    file: std::sync::Arc<dyn FsFile>,
    tmp: &Path,
    path: &Path,
    durability: Durability,
) -> Result<(), Error> {
    let dir = path.parent().expect("files live in the wal directory");
    if durability == Durability::Sync {
        // Crash before this sync returns: `path` is untouched; the `.tmp` is removed at open.
        sync_or_panic(file.as_ref(), tmp, u64::MAX);
    }
    drop(file);
    fs.rename(tmp, path)
        .map_err(crate::error::io_error("rename file", tmp))?;
    if durability == Durability::Sync {
        // Crash before this directory sync returns: `path` names the old or the new file, both
        // complete (the new one was synced before the rename), or for a first creation nothing.
        sync_dir_or_panic(fs, dir);
    }
    Ok(())
}
