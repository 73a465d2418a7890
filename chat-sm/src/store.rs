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
//!
//! Each RocksDB instance has two column families: `default` holds every key but the dedup
//! records, which live in [`DEDUP_CF`] (see [`dedup_cf_options`] for why). Instances written
//! before the split kept dedup records in `default`; [`Store::open`] moves them.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rocksdb::{
    BlockBasedOptions, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, DBRawIterator,
    FlushOptions, MemtableFactory, Options, ReadOptions, SliceTransform, Snapshot, WriteBatch,
    WriteOptions, DB,
};
use tracing::{info, warn};

use crate::format::{DEDUP_CLIENT_PREFIX_LEN, PREFIX_DEDUP};
use crate::Error;

/// The column family of the dedup records (`b'd'` keys); every other key is in `default`.
pub(crate) const DEDUP_CF: &str = "dedup";

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
        let dedup = ColumnFamilyDescriptor::new(DEDUP_CF, dedup_cf_options());
        let db = DB::open_cf_descriptors(&db_options(), &dir, [dedup])
            .map_err(|source| Error::Rocks { op: "open", source })?;
        move_dedup_records(&db)?;
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

    /// Writes both column families' memtables to table files in one atomic flush and waits
    /// for it. Applied batches skip RocksDB's WAL, so until this returns they live only in
    /// memory; afterwards everything applied so far survives any crash.
    pub(crate) fn persist(&self) -> Result<(), Error> {
        let db = self.db();
        let default = db
            .cf_handle(rocksdb::DEFAULT_COLUMN_FAMILY_NAME)
            .expect("the default column family always exists");
        let mut opts = FlushOptions::default();
        opts.set_wait(true);
        db.flush_cfs_opt(&[default, self.dedup_cf()], &opts)
            .map_err(|source| Error::Rocks {
                op: "flush",
                source,
            })
    }

    /// The column family of the dedup records.
    pub(crate) fn dedup_cf(&self) -> &ColumnFamily {
        self.db()
            .cf_handle(DEDUP_CF)
            .expect("every store is opened with the dedup column family")
    }

    /// Visits every pair of the state at `snap` in key order, across both column families.
    ///
    /// The dedup records (`b'd'`) sort between the meta keys (`b'M'`) and the heads (`b'h'`),
    /// so the order is: `default` below `b'd'`, all of [`DEDUP_CF`], `default` above `b'd'`.
    /// `default` holds no `b'd'` keys once [`Store::open`] has moved them.
    pub(crate) fn for_each_pair(
        &self,
        snap: &Snapshot<'_>,
        mut visit: impl FnMut(&[u8], &[u8]) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let db = self.db();
        let default = db
            .cf_handle(rocksdb::DEFAULT_COLUMN_FAMILY_NAME)
            .expect("the default column family always exists");
        let mut below = ReadOptions::default();
        below.set_iterate_upper_bound(vec![PREFIX_DEDUP]);
        let mut above = ReadOptions::default();
        above.set_iterate_lower_bound(vec![PREFIX_DEDUP + 1]);
        let parts = [
            snap.raw_iterator_cf_opt(default, below),
            snap.raw_iterator_cf_opt(self.dedup_cf(), total_order()),
            snap.raw_iterator_cf_opt(default, above),
        ];
        for (part, mut it) in parts.into_iter().enumerate() {
            it.seek_to_first();
            while let Some((key, value)) = it.item() {
                if (part == 1) != (key.first() == Some(&PREFIX_DEDUP)) {
                    return Err(Error::Corrupt {
                        what: "column family",
                        reason: format!("key {key:02x?} is in the wrong column family"),
                    });
                }
                visit(key, value)?;
                it.next();
            }
            iter_status(&it)?;
        }
        Ok(())
    }

    /// Flushes the memtables and rewrites every table file, so values that were overwritten
    /// or deleted (an erased message body) leave the files.
    pub(crate) fn compact(&self) -> Result<(), Error> {
        let db = self.db();
        let mut opts = rocksdb::CompactOptions::default();
        opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        self.persist()?;
        db.compact_range_opt::<&[u8], &[u8]>(None, None, &opts);
        db.compact_range_cf_opt::<&[u8], &[u8]>(self.dedup_cf(), None, None, &opts);
        Ok(())
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

/// Read options for a scan of [`DEDUP_CF`]: its prefix extractor would otherwise confine an
/// iterator to the prefix it was seeked to.
pub(crate) fn total_order() -> ReadOptions {
    let mut opts = ReadOptions::default();
    opts.set_total_order_seek(true);
    opts
}

fn iter_status(it: &DBRawIterator<'_>) -> Result<(), Error> {
    it.status().map_err(|source| Error::Rocks {
        op: "iterate",
        source,
    })
}

/// Dedup records moved per `WriteBatch` by [`move_dedup_records`].
const MOVE_BATCH_RECORDS: usize = 4096;

/// Moves dedup records that an older version kept in `default` into [`DEDUP_CF`].
///
/// Each batch puts a run of records into [`DEDUP_CF`] and deletes them from `default` in one
/// atomic `WriteBatch`, so a crash part way leaves every record in exactly one place and the
/// next open moves the rest. Synced before returning, as nothing else will sync it soon.
fn move_dedup_records(db: &DB) -> Result<(), Error> {
    let dedup = db
        .cf_handle(DEDUP_CF)
        .expect("opened with the dedup column family");
    let rocks = |op| move |source| Error::Rocks { op, source };
    let mut opts = ReadOptions::default();
    opts.set_iterate_upper_bound(vec![PREFIX_DEDUP + 1]);
    // The iterator reads the state as of its creation, so the batches' deletes do not get in
    // its way.
    let mut it = db.raw_iterator_opt(opts);
    it.seek([PREFIX_DEDUP]);
    let mut wb = WriteBatch::default();
    let mut moved = 0usize;
    loop {
        let item = it.item();
        if let Some((key, value)) = item {
            wb.put_cf(dedup, key, value);
            wb.delete(key);
            moved += 1;
        }
        if wb.len() >= 2 * MOVE_BATCH_RECORDS || (item.is_none() && !wb.is_empty()) {
            db.write_opt(std::mem::take(&mut wb), &WriteOptions::default())
                .map_err(rocks("write"))?;
        }
        if item.is_none() {
            break;
        }
        it.next();
    }
    iter_status(&it)?;
    if moved > 0 {
        db.flush_wal(true).map_err(rocks("flush_wal"))?;
        info!(
            records = moved,
            "moved dedup records into their column family"
        );
    }
    Ok(())
}

/// How many bytes RocksDB writes to a WAL or table file before it starts their write-back.
const SYNC_EVERY_BYTES: u64 = 1024 * 1024;

/// Write buffer of [`DEDUP_CF`], sized to fill about when `default`'s 64 MiB does (a send adds
/// some 2.5 times more bytes there): with atomic flush, whichever fills first flushes both, and
/// a smaller one would cut `default` into many small tables to compact. Its hash-bucketed
/// memtable is costly to scan in order, but scans rarely meet a full one: after a restart it
/// is empty (there is no WAL to replay), and snapshots and dumps flush before they scan.
const DEDUP_WRITE_BUFFER_BYTES: usize = 24 << 20;

/// Hash buckets of a [`DEDUP_CF`] memtable: one per client id, shared past this many.
const DEDUP_MEMTABLE_BUCKETS: usize = 1 << 16;

/// Options of the database and of its `default` column family.
fn db_options() -> Options {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    // The hash-skiplist memtable of the dedup column family cannot take concurrent inserts;
    // all writes come from the applying thread anyway.
    opts.set_allow_concurrent_memtable_write(false);
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
    // Applied batches skip the WAL (the raft log is what they are re-applied from), so a crash
    // keeps only what flushes wrote. Flushing both column families together keeps that a
    // state after some whole batch: never dedup records without their messages, or the reverse.
    opts.set_atomic_flush(true);
    // Without these, every flushed or compacted table file (and the WAL of the few writes
    // that use it) piles up as dirty pages until the kernel's 30 s write-back or a sync writes
    // them in one burst: on the benchmark VM such bursts, on all three nodes at once when they
    // reach the same snapshot index, held every raft-log fdatasync (and so every commit) for
    // 200-300 ms. RocksDB's answer is to start write-back (sync_file_range, not waiting) every
    // MiB.
    opts.set_bytes_per_sync(SYNC_EVERY_BYTES);
    opts.set_wal_bytes_per_sync(SYNC_EVERY_BYTES);
    opts
}

/// Options of [`DEDUP_CF`].
///
/// Why a column family of its own: a dedup record's key starts with a random client id, so in
/// one skiplist memtable shared with everything else each insert searched the whole list from
/// the top, a cache miss per level; that was over half the CPU of `apply` (the messages, in
/// key order per channel, land next to the previous insert). Here the memtable hashes the
/// client id (the first [`DEDUP_CLIENT_PREFIX_LEN`] bytes) to a bucket holding a small
/// skiplist of that client's records, to which its rising client seqs append.
fn dedup_cf_options() -> Options {
    let mut opts = Options::default();
    opts.set_compression_type(DBCompressionType::None);
    opts.set_prefix_extractor(SliceTransform::create_fixed_prefix(DEDUP_CLIENT_PREFIX_LEN));
    opts.set_memtable_factory(MemtableFactory::HashSkipList {
        bucket_count: DEDUP_MEMTABLE_BUCKETS,
        height: 4,
        branching_factor: 4,
    });
    opts.set_write_buffer_size(DEDUP_WRITE_BUFFER_BYTES);
    let mut table = BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    opts.set_block_based_table_factory(&table);
    opts.set_memtable_whole_key_filtering(true);
    opts.set_memtable_prefix_bloom_ratio(0.02);
    opts.set_bytes_per_sync(SYNC_EVERY_BYTES);
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
