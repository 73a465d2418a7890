//! Snapshot files: a streamed, checksummed copy of every RocksDB pair (layout in
//! [`crate::format`]).
//!
//! Building reads from a RocksDB snapshot, so applies can go on meanwhile and the file still
//! shows one applied index; neither side ever holds the whole state in memory.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use tracing::info;

use crate::format::{self, *};
use crate::store::{io_err, sync_dir, Store};
use crate::{Error, LogIndex};

/// What a snapshot file holds, as far as the adapter cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The opaque `last_applied` bytes stored with the state, if any entry was applied.
    pub last_applied: Option<Vec<u8>>,
    /// The opaque membership bytes stored with the state, if any.
    pub membership: Option<Vec<u8>>,
    /// The log index of the last applied entry, if any.
    pub applied_index: Option<LogIndex>,
    /// File length in bytes.
    pub bytes: u64,
    /// The file's trailer checksum (CRC-32/IEEE over everything before it).
    pub checksum: u32,
}

/// Bytes of snapshot file written between fdatasyncs while building one. A snapshot is tens of
/// MB, built by every node at the same index; written whole and then fsynced, it sat in front
/// of every raft-log fdatasync on the node for 100-150 ms on the benchmark VM. Synced a MiB at
/// a time, an append's fdatasync finds at most that much queued ahead of it.
const SYNC_EVERY_BYTES: u64 = 1024 * 1024;

/// What a snapshot or backup file holds, counted by kind of record while it is written or
/// read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotContents {
    /// Channels with messages (one head record each).
    pub channels: u64,
    /// Messages.
    pub messages: u64,
    /// Registered users (name and public key).
    pub users: u64,
    /// Channel records (owner, members, invitations, crypto record).
    pub channel_records: u64,
    /// Dedup records (one per accepted send).
    pub dedup_records: u64,
    /// Every other pair (state-machine metadata and bookkeeping).
    pub other: u64,
}

impl SnapshotContents {
    fn observe(&mut self, key: &[u8]) {
        let count = match key.first() {
            Some(&PREFIX_HEAD) => &mut self.channels,
            Some(&PREFIX_MESSAGE) => &mut self.messages,
            Some(&PREFIX_USER) => &mut self.users,
            Some(&PREFIX_CHANNEL) => &mut self.channel_records,
            Some(&PREFIX_DEDUP) => &mut self.dedup_records,
            _ => &mut self.other,
        };
        *count += 1;
    }

    /// Every record counted.
    pub fn pairs(&self) -> u64 {
        self.channels
            + self.messages
            + self.users
            + self.channel_records
            + self.dedup_records
            + self.other
    }
}

/// Why a file of pairs is written: the two kinds share the format, not the contents or the
/// durability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// A Raft snapshot: every pair, durable before the raft log below it may be purged.
    Snapshot,
    /// A backup's payload: the chat data without the cluster's own identity (its raft meta
    /// and join secret), which a restore replaces; streamed out at once, so never synced.
    Backup,
}

impl Purpose {
    fn keeps(self, key: &[u8]) -> bool {
        self == Purpose::Snapshot
            || !matches!(key, META_LAST_APPLIED | META_MEMBERSHIP | META_JOIN_SECRET)
    }
}

/// Writes a snapshot of `db` to `path` (via `path.tmp` and a rename) and fsyncs it, syncing
/// every [`SYNC_EVERY_BYTES`] on the way.
pub(crate) fn write_snapshot(store: &Store, path: &Path) -> Result<SnapshotInfo, Error> {
    write_pairs(store, path, Purpose::Snapshot).map(|(info, _)| info)
}

/// Writes the pairs `purpose` keeps to `path` (via `path.tmp` and a rename) in the snapshot
/// format, and counts them.
pub(crate) fn write_pairs(
    store: &Store,
    path: &Path,
    purpose: Purpose,
) -> Result<(SnapshotInfo, SnapshotContents), Error> {
    let durable = purpose == Purpose::Snapshot;
    let db = store.db();
    let snap = db.snapshot();
    // The raft log up to the snapshot's index may be purged as soon as this returns, so all
    // of it must be durable in RocksDB, whose applied batches skip the WAL. Flushing *after*
    // taking the snapshot covers every write the snapshot can see; flushing before would leave
    // a window of visible but unflushed batches. A crash before this returns leaves no
    // snapshot, and the raft log still holds every entry. Every purpose flushes: the scans
    // below then read table files, not the dedup memtable, which is costly to scan in order.
    store.persist()?;
    let tmp = tmp_path(path);
    let file = File::create(&tmp).map_err(|e| io_err("create", &tmp, e))?;
    let mut out = HashingWriter::new(BufWriter::with_capacity(1 << 20, file), &tmp);
    out.write(SNAPSHOT_MAGIC)?;
    out.write(&[SNAPSHOT_VERSION])?;
    let mut meta = MetaCollector::default();
    let mut contents = SnapshotContents::default();
    let mut count: u64 = 0;
    let mut synced_bytes = 0;
    store.for_each_pair(&snap, |key, value| {
        if !purpose.keeps(key) {
            return Ok(());
        }
        meta.observe(key, value)?;
        contents.observe(key);
        write_record(&mut out, key, value)?;
        count += 1;
        if durable && out.bytes - synced_bytes >= SYNC_EVERY_BYTES {
            out.sync_data()?;
            synced_bytes = out.bytes;
        }
        Ok(())
    })?;
    out.write(&[TAG_TRAILER])?;
    out.write(&count.to_le_bytes())?;
    let checksum = out.hasher.clone().finalize();
    out.write(&checksum.to_le_bytes())?;
    let bytes = out.bytes;
    let file = out
        .inner
        .into_inner()
        .map_err(|e| io_err("write", &tmp, e.into_error()))?;
    // A crash before this fsync returns leaves only `path.tmp`, which the adapter never
    // reads; the previous snapshot at `path` (if any) is untouched.
    if durable {
        file.sync_all().map_err(|e| io_err("fsync", &tmp, e))?;
    }
    drop(file);
    // rename(2) is atomic: `path` is the old file or the complete new one.
    std::fs::rename(&tmp, path).map_err(|e| io_err("rename", path, e))?;
    if durable {
        sync_dir(parent_dir(path))?;
    }
    info!(path = %path.display(), records = count, bytes, ?purpose, "snapshot built");
    Ok((meta.into_info(bytes, checksum), contents))
}

fn write_record<W: Write>(
    out: &mut HashingWriter<'_, W>,
    key: &[u8],
    value: &[u8],
) -> Result<(), Error> {
    let key_len = u32::try_from(key.len()).expect("rocksdb keys here are short");
    let value_len = u32::try_from(value.len()).expect("values are bounded by MAX_BODY_BYTES");
    // Our own keys and values stay far below the reader's limits; a bigger one means the
    // state is not what this crate wrote.
    assert!(key_len <= SNAPSHOT_KEY_BYTES_MAX && value_len <= SNAPSHOT_VALUE_BYTES_MAX);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&key_len.to_le_bytes());
    crc.update(&value_len.to_le_bytes());
    crc.update(key);
    crc.update(value);
    out.write(&[TAG_RECORD])?;
    out.write(&key_len.to_le_bytes())?;
    out.write(&value_len.to_le_bytes())?;
    out.write(&crc.finalize().to_le_bytes())?;
    out.write(key)?;
    out.write(value)
}

/// Reads and fully verifies the snapshot at `path`, passing each pair to `sink` in order.
///
/// `sink` sees pairs before the trailer is checked, so a caller must not make anything it
/// wrote visible until this returns `Ok`.
pub(crate) fn read_snapshot(
    path: &Path,
    sink: impl FnMut(&[u8], &[u8]) -> Result<(), Error>,
) -> Result<SnapshotInfo, Error> {
    let file = File::open(path).map_err(|e| io_err("open", path, e))?;
    let input = BufReader::with_capacity(1 << 20, file);
    read_pairs(input, path, sink).map(|(info, _)| info)
}

/// Reads and fully verifies a snapshot from `input` (which must end where the snapshot does),
/// passing each pair to `sink` in order; `path` only names the source in errors, whose
/// offsets count from the start of `input`.
fn read_pairs<R: Read>(
    input: R,
    path: &Path,
    mut sink: impl FnMut(&[u8], &[u8]) -> Result<(), Error>,
) -> Result<(SnapshotInfo, SnapshotContents), Error> {
    let mut input = HashingReader {
        inner: input,
        hasher: crc32fast::Hasher::new(),
        offset: 0,
        path,
    };
    let mut header = [0u8; SNAPSHOT_HEADER_LEN];
    input.read_exact(&mut header)?;
    if &header[..8] != SNAPSHOT_MAGIC {
        return Err(input.corrupt("bad magic"));
    }
    if header[8] != SNAPSHOT_VERSION {
        return Err(Error::UnsupportedVersion {
            what: "snapshot",
            found: header[8],
        });
    }
    let mut meta = MetaCollector::default();
    let mut contents = SnapshotContents::default();
    let mut key = Vec::new();
    let mut prev_key = Vec::new();
    let mut value = Vec::new();
    let mut count: u64 = 0;
    loop {
        let mut tag = [0u8; 1];
        input.read_exact(&mut tag)?;
        match tag[0] {
            TAG_RECORD => {
                read_record(&mut input, &mut key, &mut value)?;
                if count > 0 && key <= prev_key {
                    return Err(input.corrupt("keys out of order"));
                }
                meta.observe(&key, &value)?;
                contents.observe(&key);
                sink(&key, &value)?;
                std::mem::swap(&mut key, &mut prev_key);
                count += 1;
            }
            TAG_TRAILER => break,
            other => return Err(input.corrupt(&format!("unknown tag {other:#04x}"))),
        }
    }
    let mut trailer = [0u8; TRAILER_LEN];
    input.read_exact(&mut trailer[..8])?;
    let expected = input.hasher.clone().finalize();
    input.read_exact(&mut trailer[8..])?;
    let record_count = u64::from_le_bytes(trailer[..8].try_into().expect("8 bytes"));
    let checksum = u32::from_le_bytes(trailer[8..].try_into().expect("4 bytes"));
    if checksum != expected {
        return Err(input.corrupt("file checksum mismatch"));
    }
    if record_count != count {
        return Err(input.corrupt(&format!(
            "trailer says {record_count} records, read {count}"
        )));
    }
    let mut extra = [0u8; 1];
    match input.inner.read(&mut extra) {
        Ok(0) => {}
        Ok(_) => return Err(input.corrupt("bytes after trailer")),
        Err(e) => return Err(io_err("read", path, e)),
    }
    Ok((meta.into_info(input.offset, checksum), contents))
}

/// Verifies a snapshot read from `input` (for example a backup's payload, cut to its length)
/// without installing it, and counts what it holds. `name` names the source in errors, whose
/// offsets count from the start of `input`.
///
/// # Errors
/// [`Error::SnapshotCorrupt`] or [`Error::UnsupportedVersion`] if the bytes are not one
/// complete, valid snapshot; [`Error::Io`] if they cannot be read.
pub fn verify_snapshot<R: Read>(
    input: R,
    name: &Path,
) -> Result<(SnapshotInfo, SnapshotContents), Error> {
    read_pairs(input, name, |_, _| Ok(()))
}

fn read_record<R: Read>(
    input: &mut HashingReader<'_, R>,
    key: &mut Vec<u8>,
    value: &mut Vec<u8>,
) -> Result<(), Error> {
    let mut head = [0u8; RECORD_HEADER_LEN];
    input.read_exact(&mut head)?;
    let key_len = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes"));
    let value_len = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    // Check lengths before allocating, so a corrupt length cannot ask for gigabytes.
    if key_len == 0 || key_len > SNAPSHOT_KEY_BYTES_MAX || value_len > SNAPSHOT_VALUE_BYTES_MAX {
        return Err(input.corrupt("record length out of bounds"));
    }
    key.resize(key_len as usize, 0);
    value.resize(value_len as usize, 0);
    input.read_exact(key)?;
    input.read_exact(value)?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&head[0..8]);
    hasher.update(key);
    hasher.update(value);
    if hasher.finalize() != crc {
        return Err(input.corrupt("record checksum mismatch"));
    }
    if !format::is_known_key(key) {
        return Err(input.corrupt("unknown key prefix"));
    }
    Ok(())
}

/// Verifies the snapshot at `path` and returns its metadata without installing it.
///
/// # Errors
/// [`Error::SnapshotCorrupt`] or [`Error::UnsupportedVersion`] if the file is not a complete,
/// valid snapshot; [`Error::Io`] if it cannot be read.
pub fn read_snapshot_info(path: &Path) -> Result<SnapshotInfo, Error> {
    read_snapshot(path, |_, _| Ok(()))
}

#[derive(Default)]
struct MetaCollector {
    last_applied: Option<Vec<u8>>,
    membership: Option<Vec<u8>>,
    applied_index: Option<LogIndex>,
}

impl MetaCollector {
    fn observe(&mut self, key: &[u8], value: &[u8]) -> Result<(), Error> {
        match key {
            META_LAST_APPLIED => {
                self.last_applied = Some(decode_bytes_value(value, "last_applied")?.to_vec());
            }
            META_MEMBERSHIP => {
                self.membership = Some(decode_bytes_value(value, "membership")?.to_vec());
            }
            META_APPLIED_INDEX => {
                self.applied_index = Some(LogIndex(decode_u64_value(value, "applied_index")?));
            }
            _ => {}
        }
        Ok(())
    }

    fn into_info(self, bytes: u64, checksum: u32) -> SnapshotInfo {
        SnapshotInfo {
            last_applied: self.last_applied,
            membership: self.membership,
            applied_index: self.applied_index,
            bytes,
            checksum,
        }
    }
}

impl HashingWriter<'_, BufWriter<File>> {
    /// Writes out the buffer and fdatasyncs the file so far. A crash meanwhile leaves a partial
    /// `path.tmp`, as any crash before the final fsync does.
    fn sync_data(&mut self) -> Result<(), Error> {
        self.inner
            .flush()
            .map_err(|e| io_err("write", self.path, e))?;
        self.inner
            .get_ref()
            .sync_data()
            .map_err(|e| io_err("fsync", self.path, e))
    }
}

struct HashingWriter<'a, W> {
    inner: W,
    hasher: crc32fast::Hasher,
    bytes: u64,
    path: &'a Path,
}

impl<'a, W: Write> HashingWriter<'a, W> {
    fn new(inner: W, path: &'a Path) -> Self {
        HashingWriter {
            inner,
            hasher: crc32fast::Hasher::new(),
            bytes: 0,
            path,
        }
    }

    fn write(&mut self, buf: &[u8]) -> Result<(), Error> {
        self.hasher.update(buf);
        self.bytes += buf.len() as u64;
        self.inner
            .write_all(buf)
            .map_err(|e| io_err("write", self.path, e))
    }
}

struct HashingReader<'a, R> {
    inner: R,
    hasher: crc32fast::Hasher,
    offset: u64,
    path: &'a Path,
}

impl<R: Read> HashingReader<'_, R> {
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), Error> {
        match self.inner.read_exact(buf) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(self.corrupt("truncated"));
            }
            Err(e) => return Err(io_err("read", self.path, e)),
        }
        self.hasher.update(buf);
        self.offset += buf.len() as u64;
        Ok(())
    }

    fn corrupt(&self, reason: &str) -> Error {
        Error::SnapshotCorrupt {
            path: self.path.to_owned(),
            offset: self.offset,
            reason: reason.to_owned(),
        }
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(".tmp");
    PathBuf::from(name)
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}
