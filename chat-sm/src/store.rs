//! The data directory: which RocksDB instance is current, and how a new one replaces it.
//!
//! Layout of `Config::dir`:
//!
//! ```text
//! ACTIVE                      one line: the name of the current RocksDB directory
//! ACTIVE.tmp                  a pointer being written (removed at open)
//! db-00000000000000000001/    RocksDB instances, numbered by generation
//! ```
//!
//! The rename of `ACTIVE.tmp` over `ACTIVE` is the single commit point of a snapshot install;
//! every `db-*` directory that `ACTIVE` does not name is garbage and is removed at open.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rocksdb::{BlockBasedOptions, DBCompressionType, Options, DB};
use tracing::{info, warn};

use crate::Error;

const ACTIVE: &str = "ACTIVE";
const ACTIVE_TMP: &str = "ACTIVE.tmp";
const DB_DIR_PREFIX: &str = "db-";

/// One open RocksDB instance.
///
/// When a snapshot install replaces it, it is marked retired; the last holder to drop it
/// (a reader may still be using it) closes the database and removes its directory.
pub(crate) struct Store {
    db: Option<DB>,
    dir: PathBuf,
    generation: u64,
    retired: AtomicBool,
}

impl Store {
    /// Opens (creating if needed) the RocksDB instance of `generation` under `data_dir`.
    pub(crate) fn open(data_dir: &Path, generation: u64) -> Result<Store, Error> {
        let dir = data_dir.join(db_dir_name(generation));
        let db =
            DB::open(&db_options(), &dir).map_err(|source| Error::Rocks { op: "open", source })?;
        Ok(Store {
            db: Some(db),
            dir,
            generation,
            retired: AtomicBool::new(false),
        })
    }

    pub(crate) fn db(&self) -> &DB {
        self.db.as_ref().expect("db is only taken in Drop")
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Marks the directory for removal once the last reference is dropped.
    pub(crate) fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    /// Undoes [`Store::retire`] once the directory has become current.
    pub(crate) fn keep(&self) {
        self.retired.store(false, Ordering::Release);
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Close RocksDB before removing its files. No fsync here: the directory is either
        // current (nothing to do) or garbage that `open_layout` would remove anyway.
        drop(self.db.take());
        if self.retired.load(Ordering::Acquire) {
            if let Err(e) = fs::remove_dir_all(&self.dir) {
                warn!(dir = %self.dir.display(), error = %e, "could not remove retired db");
            }
        }
    }
}

/// How many bytes RocksDB writes to a WAL or table file before it starts their write-back.
const SYNC_EVERY_BYTES: u64 = 1024 * 1024;

fn db_options() -> Options {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    // The workspace builds RocksDB without codecs; asking for the default (Snappy) would fail.
    opts.set_compression_type(DBCompressionType::None);
    let mut table = BlockBasedOptions::default();
    // Dedup and user lookups are mostly misses; a bloom filter keeps a miss off the disk.
    table.set_bloom_filter(10.0, false);
    opts.set_block_based_table_factory(&table);
    // The same for the memtable: every send looks up its dedup key, almost always a miss, and
    // without a memtable filter each miss walks the memtable skiplist from the top. A whole-key
    // bloom filter of 2% of the write buffer (about 1.3 MiB for the default 64 MiB, some 30 bits
    // per key at ~200 B per pair) answers most misses without touching the skiplist.
    opts.set_memtable_whole_key_filtering(true);
    opts.set_memtable_prefix_bloom_ratio(0.02);
    opts.set_max_background_jobs(2);
    opts.set_keep_log_file_num(4);
    // Batches are written with sync=false, so without these the WAL and every flushed or
    // compacted table file pile up as dirty pages until the kernel's 30 s write-back or a
    // `flush_wal(true)` at snapshot time writes them in one burst: on the benchmark VM some
    // 35 MB of WAL per node, flushed on all three nodes at once when they reach the same
    // snapshot index, held every raft-log fdatasync (and so every commit) for 200-300 ms.
    // RocksDB's answer is to start write-back (sync_file_range, not waiting) every MiB.
    opts.set_bytes_per_sync(SYNC_EVERY_BYTES);
    opts.set_wal_bytes_per_sync(SYNC_EVERY_BYTES);
    opts
}

fn db_dir_name(generation: u64) -> String {
    format!("{DB_DIR_PREFIX}{generation:020}")
}

/// Prepares `data_dir` and returns the current generation.
///
/// Removes `ACTIVE.tmp` and every `db-*` directory that `ACTIVE` does not name: they are
/// leftovers of an install (or a first open) that crashed before its commit point.
pub(crate) fn open_layout(data_dir: &Path) -> Result<u64, Error> {
    fs::create_dir_all(data_dir).map_err(|e| io_err("create dir", data_dir, e))?;
    let generation = match fs::read_to_string(data_dir.join(ACTIVE)) {
        Ok(text) => parse_active(text.trim()).ok_or_else(|| Error::Corrupt {
            what: "ACTIVE pointer",
            reason: format!("unexpected contents {text:?}"),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(io_err("read", &data_dir.join(ACTIVE), e)),
    };
    remove_garbage(data_dir, generation)?;
    if generation == 0 {
        // First open: make generation 1 current before anything is written into it.
        write_active(data_dir, 1)?;
        info!(dir = %data_dir.display(), "created chat state directory");
        return Ok(1);
    }
    Ok(generation)
}

fn parse_active(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(DB_DIR_PREFIX)?;
    if digits.len() != 20 {
        return None;
    }
    digits.parse().ok().filter(|&g| g > 0)
}

fn remove_garbage(data_dir: &Path, generation: u64) -> Result<(), Error> {
    let entries = fs::read_dir(data_dir).map_err(|e| io_err("read dir", data_dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_err("read dir", data_dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let path = entry.path();
        if name == ACTIVE_TMP {
            fs::remove_file(&path).map_err(|e| io_err("remove", &path, e))?;
        } else if name.starts_with(DB_DIR_PREFIX) && parse_active(name) != Some(generation) {
            warn!(dir = %path.display(), "removing db directory left by an interrupted install");
            fs::remove_dir_all(&path).map_err(|e| io_err("remove dir", &path, e))?;
        }
    }
    Ok(())
}

/// Removes a half-built directory of `generation` if one exists.
pub(crate) fn remove_generation(data_dir: &Path, generation: u64) -> Result<(), Error> {
    let path = data_dir.join(db_dir_name(generation));
    match fs::remove_dir_all(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove dir", &path, e)),
    }
}

/// Makes `generation` current: write `ACTIVE.tmp`, fsync it, rename it over `ACTIVE`, fsync
/// the directory.
pub(crate) fn write_active(data_dir: &Path, generation: u64) -> Result<(), Error> {
    let tmp = data_dir.join(ACTIVE_TMP);
    let active = data_dir.join(ACTIVE);
    let mut file = File::create(&tmp).map_err(|e| io_err("create", &tmp, e))?;
    file.write_all(format!("{}\n", db_dir_name(generation)).as_bytes())
        .map_err(|e| io_err("write", &tmp, e))?;
    // Crash before this fsync returns: ACTIVE still names the old generation and open()
    // removes ACTIVE.tmp and the new directory.
    file.sync_all().map_err(|e| io_err("fsync", &tmp, e))?;
    drop(file);
    // Crash around the rename: rename(2) is atomic, so ACTIVE names either the old or the new
    // generation, never a mix; the other directory is removed at the next open.
    fs::rename(&tmp, &active).map_err(|e| io_err("rename", &active, e))?;
    // Until this fsync returns the rename may not survive power loss; either outcome is a
    // complete state (see above).
    sync_dir(data_dir)
}

/// Fsyncs a directory so that renames and creations in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("fsync dir", dir, e))
}

pub(crate) fn io_err(op: &'static str, path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_first_open_then_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(open_layout(dir.path()).expect("open"), 1);
        assert_eq!(open_layout(dir.path()).expect("reopen"), 1);
    }

    #[test]
    fn layout_removes_uncommitted_generation() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(open_layout(dir.path()).expect("open"), 1);
        fs::create_dir(dir.path().join(db_dir_name(2))).expect("mkdir");
        fs::write(dir.path().join(ACTIVE_TMP), b"garbage").expect("write");
        assert_eq!(open_layout(dir.path()).expect("reopen"), 1);
        assert!(!dir.path().join(db_dir_name(2)).exists());
        assert!(!dir.path().join(ACTIVE_TMP).exists());
    }

    #[test]
    fn layout_refuses_garbled_pointer() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join(ACTIVE), b"db-12").expect("write");
        assert!(matches!(
            open_layout(dir.path()),
            Err(Error::Corrupt { .. })
        ));
    }
}
