//! The file layer under the WAL: a `FileSystem` trait, the std implementation used by default,
//! and (feature `testing`) `FaultyFs`, which models what a power failure leaves on disk.
//!
//! Every file the WAL touches goes through this trait, so a test can swap in a file system that
//! drops unsynced bytes, tears a write, fails a write after N bytes, or fails an fsync.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A file system holding WAL segments and meta files.
///
/// # Correctness
///
/// - `create` and `rename` are durable only after `sync_dir` on the parent directory returns.
/// - File contents are durable only up to the length they had when `FsFile::sync_data` last
///   returned `Ok`.
/// - Implementations must be usable from several threads at once (`Send + Sync`).
pub trait FileSystem: Send + Sync + fmt::Debug {
    /// Creates `dir` and its parents if missing.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Creates `path` (truncating it if it exists) for reading and writing.
    fn create(&self, path: &Path) -> io::Result<Arc<dyn FsFile>>;
    /// Opens the existing file `path` for reading and writing.
    fn open(&self, path: &Path) -> io::Result<Arc<dyn FsFile>>;
    /// Lists the entries of `dir` (full paths, any order).
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<PathBuf>>;
    /// Removes the file `path`.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Atomically renames `from` to `to`, replacing `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Fsyncs the directory `dir`, making creations, renames and removals in it durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// One open file. All methods take `&self` so that readers can `pread` while a writer appends.
pub trait FsFile: Send + Sync + fmt::Debug {
    /// Writes all of `buf` at `offset` (pwrite).
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Fills `buf` from `offset` (pread); fails with `UnexpectedEof` if the file is too short.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Current length in bytes.
    fn file_len(&self) -> io::Result<u64>;
    /// Truncates or extends the file to `len` bytes (ftruncate).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes the file's data durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
}

/// The real file system, through `std::fs`.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdFs;

#[derive(Debug)]
struct StdFile(File);

impl FsFile for StdFile {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }
    fn file_len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
}

impl FileSystem for StdFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }
    fn create(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(Arc::new(StdFile(file)))
    }
    fn open(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Arc::new(StdFile(file)))
    }
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        std::fs::read_dir(dir)?
            .map(|entry| entry.map(|e| e.path()))
            .collect()
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

#[cfg(feature = "testing")]
pub use faulty::{FaultyFs, Tear};

#[cfg(feature = "testing")]
mod faulty {
    //! `FaultyFs`: real files on disk plus a model of which bytes and names are durable.
    //!
    //! What is modelled:
    //! - each file's durable length, which advances to the current length on `sync_data`;
    //! - every write since the last `sync_data`, with the bytes it overwrote inside the durable
    //!   length, so that `power_fail` can undo overwrites of preallocated (zero-filled) space as
    //!   well as appends past the end;
    //! - whether a file's creation (or the rename that produced it) is durable, which becomes
    //!   true when its parent directory is synced;
    //! - un-synced renames, which `power_fail` undoes, restoring the replaced file's durable
    //!   contents (it keeps an in-memory copy, so this is meant for small files such as meta files).
    //!
    //! What is not modelled: `set_len` that shrinks a file counts as durable at once (the cut
    //! bytes are gone from disk, so they cannot come back); removals count as durable at once;
    //! metadata (mtime) is ignored. Files that existed before the `FaultyFs` was created count as
    //! fully durable. `FaultyFs` never calls the real fsync: durability is what it models, and
    //! tests run faster without it.

    use super::{FileSystem, FsFile, StdFs};
    use parking_lot::Mutex;
    use std::collections::HashMap;
    use std::fmt;
    use std::io;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    /// How `FaultyFs::power_fail` treats the first unsynced write of each file (an append past
    /// the end or an overwrite of preallocated space alike).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Tear {
        /// Drop every unsynced byte.
        None,
        /// Keep a pseudo-random prefix (chosen from the seed) of each file's first unsynced
        /// write, as a torn sector write would.
        Prefix(u64),
    }

    #[derive(Debug, Clone, Copy)]
    enum Fault {
        WriteAfter(u64),
        Sync,
        Remove,
    }

    #[derive(Debug, Clone, Default)]
    struct Track {
        durable_len: u64,
        created_durable: bool,
        /// Every write since the last sync, oldest first.
        unsynced: Vec<Unsynced>,
    }

    /// One write not yet covered by a sync.
    #[derive(Debug, Clone)]
    struct Unsynced {
        offset: u64,
        len: u64,
        /// What the file held in `[offset, offset + len)` before the write, clipped to the
        /// durable length (bytes past it are dropped by the final truncation instead).
        overwritten: Vec<u8>,
    }

    #[derive(Debug)]
    struct PendingRename {
        to: PathBuf,
        /// Durable contents of `to` before the rename, if it had any.
        replaced: Option<Vec<u8>>,
    }

    #[derive(Debug, Default)]
    struct State {
        files: HashMap<PathBuf, Track>,
        renames: Vec<PendingRename>,
        faults: HashMap<String, Fault>,
        failed: bool,
    }

    #[derive(Debug, Default)]
    struct Shared {
        state: Mutex<State>,
    }

    /// A fault-injecting file system over real files (feature `testing`).
    ///
    /// Fault points, named `module::op::fault`:
    /// `segment::append::fault` (write to a segment), `segment::sync::fault`,
    /// `prepare::write::fault` and `prepare::sync::fault` (a segment file being zero-filled
    /// in the background, before it gets its name), `meta::write::fault`, `meta::sync::fault`,
    /// `dir::sync::fault`, and `segment::remove::fault`, `meta::remove::fault` (removing such a
    /// file fails; see [`FaultyFs::fail_remove`]).
    #[derive(Debug, Clone, Default)]
    pub struct FaultyFs {
        shared: Arc<Shared>,
    }

    struct FaultyFile {
        inner: Arc<dyn FsFile>,
        path: PathBuf,
        shared: Arc<Shared>,
    }

    impl fmt::Debug for FaultyFile {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("FaultyFile")
                .field("path", &self.path)
                .finish()
        }
    }

    fn powered_off() -> io::Error {
        io::Error::other("faulty fs: power failed; this handle is dead")
    }

    fn injected(point: &str) -> io::Error {
        io::Error::other(format!("injected fault: {point}"))
    }

    fn kind(path: &Path) -> &'static str {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(crate::format::PREPARED_PREFIX) {
            "prepare"
        } else if name.contains(".seg") {
            "segment"
        } else {
            "meta"
        }
    }

    impl State {
        fn check_alive(&self) -> io::Result<()> {
            if self.failed {
                Err(powered_off())
            } else {
                Ok(())
            }
        }
    }

    impl FaultyFile {
        /// Copies the durable bytes a write of `len` bytes at `offset` is about to overwrite.
        fn overwritten(&self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
            let durable_len = {
                let state = self.shared.state.lock();
                state.files.get(&self.path).map_or(0, |t| t.durable_len)
            };
            let end = (offset + len).min(durable_len);
            let mut old = vec![0u8; end.saturating_sub(offset) as usize];
            if !old.is_empty() {
                self.inner.read_exact_at(&mut old, offset)?;
            }
            Ok(old)
        }

        fn track_write(&self, offset: u64, len: u64, mut overwritten: Vec<u8>) {
            let mut state = self.shared.state.lock();
            if let Some(track) = state.files.get_mut(&self.path) {
                overwritten.truncate(len as usize);
                track.unsynced.push(Unsynced {
                    offset,
                    len,
                    overwritten,
                });
            }
        }
    }

    impl FsFile for FaultyFile {
        fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            let point = format!(
                "{}::{}::fault",
                kind(&self.path),
                if kind(&self.path) == "segment" {
                    "append"
                } else {
                    "write"
                }
            );
            let fault = {
                let state = self.shared.state.lock();
                state.check_alive()?;
                state.faults.get(&point).copied()
            };
            let overwritten = self.overwritten(offset, buf.len() as u64)?;
            if let Some(Fault::WriteAfter(bytes)) = fault {
                let cut = (bytes as usize).min(buf.len());
                self.inner.write_all_at(&buf[..cut], offset)?;
                self.track_write(offset, cut as u64, overwritten);
                return Err(injected(&point));
            }
            self.inner.write_all_at(buf, offset)?;
            self.track_write(offset, buf.len() as u64, overwritten);
            Ok(())
        }
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.shared.state.lock().check_alive()?;
            self.inner.read_exact_at(buf, offset)
        }
        fn file_len(&self) -> io::Result<u64> {
            self.shared.state.lock().check_alive()?;
            self.inner.file_len()
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            let mut state = self.shared.state.lock();
            state.check_alive()?;
            self.inner.set_len(len)?;
            if let Some(track) = state.files.get_mut(&self.path) {
                track.durable_len = track.durable_len.min(len);
                // Bytes past the new length are gone; so is anything to undo there.
                track.unsynced.retain_mut(|w| {
                    w.len = w.len.min(len.saturating_sub(w.offset));
                    w.overwritten.truncate(w.len as usize);
                    w.len > 0
                });
            }
            Ok(())
        }
        fn sync_data(&self) -> io::Result<()> {
            let point = format!("{}::sync::fault", kind(&self.path));
            let mut state = self.shared.state.lock();
            state.check_alive()?;
            if let Some(Fault::Sync) = state.faults.get(&point) {
                return Err(injected(&point));
            }
            let len = self.inner.file_len()?;
            if let Some(track) = state.files.get_mut(&self.path) {
                track.durable_len = len;
                track.unsynced.clear();
            }
            Ok(())
        }
    }

    impl FaultyFs {
        /// A new fault-free `FaultyFs`.
        pub fn new() -> Self {
            Self::default()
        }

        /// From now on, writes through fault point `point` write only the first `bytes` bytes
        /// and then fail.
        pub fn fail_write_after(&self, point: &str, bytes: u64) {
            let mut state = self.shared.state.lock();
            state
                .faults
                .insert(point.to_owned(), Fault::WriteAfter(bytes));
        }

        /// From now on, fsyncs through fault point `point` fail.
        pub fn fail_sync(&self, point: &str) {
            let mut state = self.shared.state.lock();
            state.faults.insert(point.to_owned(), Fault::Sync);
        }

        /// From now on, removing a file through fault point `point` fails and leaves the file.
        pub fn fail_remove(&self, point: &str) {
            let mut state = self.shared.state.lock();
            state.faults.insert(point.to_owned(), Fault::Remove);
        }

        /// Removes every injected fault.
        pub fn clear_faults(&self) {
            self.shared.state.lock().faults.clear();
        }

        /// Puts the files on disk into a state a power failure could leave, then fails every
        /// later operation through this file system (and its open files).
        ///
        /// Order: undo un-synced renames (newest first), remove files whose creation was never
        /// made durable by a directory sync; in every other tracked file, undo each unsynced
        /// write (newest first, restoring the bytes it overwrote) and truncate the file to its
        /// durable length, keeping with `Tear::Prefix` a random prefix of its first unsynced
        /// write.
        /// A server process may call this and then `std::process::abort()`. Afterwards every
        /// operation fails, fsyncs included, so a `Wal` still using this file system returns
        /// errors or, on its next fsync, panics; drop it and open a new one.
        pub fn power_fail(&self, tear: Tear) -> io::Result<()> {
            let mut state = self.shared.state.lock();
            state.failed = true;
            let mut rng = match tear {
                Tear::None => None,
                Tear::Prefix(seed) => Some(SplitMix64(seed)),
            };
            let renames = std::mem::take(&mut state.renames);
            for rename in renames.into_iter().rev() {
                match rename.replaced {
                    Some(bytes) => {
                        std::fs::write(&rename.to, &bytes)?;
                        let track = Track {
                            durable_len: bytes.len() as u64,
                            created_durable: true,
                            unsynced: Vec::new(),
                        };
                        state.files.insert(rename.to, track);
                    }
                    None => {
                        remove_if_exists(&rename.to)?;
                        state.files.remove(&rename.to);
                    }
                }
            }
            let mut paths: Vec<_> = state.files.keys().cloned().collect();
            paths.sort();
            for path in paths {
                let track = state.files[&path].clone();
                if !track.created_durable {
                    remove_if_exists(&path)?;
                    continue;
                }
                let Ok(file) = std::fs::OpenOptions::new().write(true).open(&path) else {
                    continue;
                };
                let current = file.metadata()?.len();
                let keep = power_fail_file(&file, &track, current, rng.as_mut())?;
                file.set_len(keep)?;
            }
            Ok(())
        }

        fn track_created(&self, path: &Path) {
            let track = Track::default();
            self.shared
                .state
                .lock()
                .files
                .insert(path.to_owned(), track);
        }

        fn wrap(&self, inner: Arc<dyn FsFile>, path: &Path) -> Arc<dyn FsFile> {
            Arc::new(FaultyFile {
                inner,
                path: path.to_owned(),
                shared: self.shared.clone(),
            })
        }
    }

    /// Undoes the unsynced writes of one file and returns the length to cut it to.
    fn power_fail_file(
        file: &std::fs::File,
        track: &Track,
        current: u64,
        rng: Option<&mut SplitMix64>,
    ) -> io::Result<u64> {
        use std::os::unix::fs::FileExt;
        let torn_prefix = match (rng, track.unsynced.first()) {
            (Some(rng), Some(first)) => rng.next() % (first.len + 1),
            _ => 0,
        };
        for (i, write) in track.unsynced.iter().enumerate().rev() {
            // The first write keeps `torn_prefix` of its new bytes; everything else is undone.
            let skip = if i == 0 { torn_prefix } else { 0 } as usize;
            if write.overwritten.len() > skip {
                file.write_all_at(&write.overwritten[skip..], write.offset + skip as u64)?;
            }
        }
        let mut keep = track.durable_len.min(current);
        if let Some(first) = track.unsynced.first() {
            keep = keep.max((first.offset + torn_prefix).min(current));
        }
        Ok(keep)
    }

    fn remove_if_exists(path: &Path) -> io::Result<()> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    impl FileSystem for FaultyFs {
        fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
            self.shared.state.lock().check_alive()?;
            StdFs.create_dir_all(dir)
        }
        fn create(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
            self.shared.state.lock().check_alive()?;
            let inner = StdFs.create(path)?;
            self.track_created(path);
            Ok(self.wrap(inner, path))
        }
        fn open(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
            let mut state = self.shared.state.lock();
            state.check_alive()?;
            let inner = StdFs.open(path)?;
            if !state.files.contains_key(path) {
                // A file this FaultyFs has not seen was written before it existed: all durable.
                let len = inner.file_len()?;
                let track = Track {
                    durable_len: len,
                    created_durable: true,
                    unsynced: Vec::new(),
                };
                state.files.insert(path.to_owned(), track);
            }
            drop(state);
            Ok(self.wrap(inner, path))
        }
        fn list_dir(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
            self.shared.state.lock().check_alive()?;
            StdFs.list_dir(dir)
        }
        fn remove_file(&self, path: &Path) -> io::Result<()> {
            let mut state = self.shared.state.lock();
            state.check_alive()?;
            let point = format!("{}::remove::fault", kind(path));
            if let Some(Fault::Remove) = state.faults.get(&point) {
                return Err(injected(&point));
            }
            StdFs.remove_file(path)?;
            state.files.remove(path);
            Ok(())
        }
        fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
            let mut state = self.shared.state.lock();
            state.check_alive()?;
            let replaced = match state.files.get(to) {
                Some(track) if track.created_durable => {
                    let mut bytes = std::fs::read(to)?;
                    bytes.truncate(track.durable_len as usize);
                    Some(bytes)
                }
                Some(_) => None,
                None => match std::fs::read(to) {
                    Ok(bytes) => Some(bytes),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                    Err(e) => return Err(e),
                },
            };
            StdFs.rename(from, to)?;
            let mut track = state.files.remove(from).unwrap_or_default();
            track.created_durable = false;
            state.files.insert(to.to_owned(), track);
            state.renames.push(PendingRename {
                to: to.to_owned(),
                replaced,
            });
            Ok(())
        }
        fn sync_dir(&self, dir: &Path) -> io::Result<()> {
            let mut state = self.shared.state.lock();
            state.check_alive()?;
            if let Some(Fault::Sync) = state.faults.get("dir::sync::fault") {
                return Err(injected("dir::sync::fault"));
            }
            for (path, track) in state.files.iter_mut() {
                if path.parent() == Some(dir) {
                    track.created_durable = true;
                }
            }
            state.renames.retain(|r| r.to.parent() != Some(dir));
            Ok(())
        }
    }

    /// SplitMix64: a tiny deterministic generator, so the library needs no `rand` dependency.
    struct SplitMix64(u64);

    impl SplitMix64 {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
    }
}
