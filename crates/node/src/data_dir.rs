//! `DataDir`: a node's directory, locked for the life of the process, holding its identity.
//!
//! `cargo run -p server` with no flags must never let two processes share one directory, and
//! a restarted node must come back with its own identity and data. `DataDir::pick` walks
//! `root/node-1`, `root/node-2`, ... and takes the first one whose lock it can get (an advisory
//! `flock` on `LOCK`, released by the kernel when the process dies, even by kill -9); a fresh
//! directory gets a random node id written durably before anything else uses it.
//!
//! The directory also keeps the node's name, chosen at first start and then fixed: it is part
//! of the replicated membership, which a join never rewrites for an existing member, so a
//! rename would leave the cluster's record and the node disagreeing. After `server leave`, a
//! `LEFT` marker keeps the node out of the cluster until it is started with `--rejoin`.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use crate::atomic_file;
use crate::name::{default_name, validate_name, NameError};
use crate::types::NodeId;

/// The state machine's directory inside a data dir (RocksDB and snapshots).
pub(crate) const STATE_DIR: &str = "sm";

const LOCK_FILE: &str = "LOCK";
const NODE_ID_FILE: &str = "node-id";
const NODE_NAME_FILE: &str = "node-name";
const LEFT_FILE: &str = "LEFT";
/// How many `node-N` directories `pick` tries before giving up.
const PICK_ATTEMPTS_MAX: usize = 1000;

/// Why a data directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// Another live process holds the directory.
    #[error(
        "data dir {path} is locked by another running server; stop it or pick another --data-dir"
    )]
    Locked { path: PathBuf },
    /// Every candidate under `root` was locked (`tried` of them).
    #[error("no free data dir under {root} (tried {tried}); stop some servers or pass --data-dir")]
    NoneFree { root: PathBuf, tried: usize },
    /// The node id file is damaged.
    #[error("node id file {path} is damaged ({reason}); restore it from a backup or remove the directory")]
    BadNodeId { path: PathBuf, reason: String },
    /// The name file holds something that is not a valid name.
    #[error("node name file {path} is damaged ({source}); write the node's name into it")]
    BadNodeName { path: PathBuf, source: NameError },
    /// `--name` asks for another name than the one `kept` in this directory.
    #[error(
        "data dir {path} belongs to node {kept:?}, not {requested:?}: a node keeps its name for \
         its life in the cluster; drop --name, pass --name {kept}, or use a fresh data dir"
    )]
    NameMismatch {
        path: PathBuf,
        kept: String,
        requested: String,
    },
    /// An invalid `--name`.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// An io error: what was being done (`op`), on which path.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> DataDirError + 'a {
    move |source| DataDirError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The text of `file` in `dir`, or `None` when it does not exist.
fn read(dir: &Path, file: &str) -> Result<Option<String>, DataDirError> {
    let path = dir.join(file);
    match fs::read_to_string(&path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("read", &path)(e)),
    }
}

/// Writes `file` in `dir` so it is either absent or whole after a crash.
fn write_durably(dir: &Path, file: &str, text: &str) -> Result<(), DataDirError> {
    let path = dir.join(file);
    atomic_file::write_durably(&path, text.as_bytes()).map_err(io_error("write", &path))
}

/// A locked data directory. The lock lasts as long as this value.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    node_id: NodeId,
    /// `None` until [`DataDir::claim_name`] on a directory that has none yet.
    name: Option<String>,
    /// Holding the open file holds the flock.
    _lock: File,
}

/// Makes every file and directory this process creates from now on private to its owner
/// (umask 077): RocksDB, the log and snapshots create their files with the default modes.
pub fn create_private_files() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

/// Creates `path` readable by its owner only (0700), or tightens an existing one that its
/// group or others may enter, together with everything inside it (files 0600, dirs 0700):
/// a data dir holds every message, the node's TLS key and the cluster CA's key.
fn make_private(path: &Path) -> Result<(), DataDirError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io_error("create", path))?;
    let mode = fs::metadata(path)
        .map_err(io_error("stat", path))?
        .permissions()
        .mode();
    if mode & 0o077 == 0 {
        return Ok(());
    }
    let mut tightened = 0u64;
    let mut pending = vec![path.to_path_buf()];
    while let Some(dir) = pending.pop() {
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(io_error("chmod", &dir))?;
        for entry in fs::read_dir(&dir).map_err(io_error("list", &dir))? {
            let entry = entry.map_err(io_error("list", &dir))?;
            let kind = entry.file_type().map_err(io_error("stat", &entry.path()))?;
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                let file = entry.path();
                let mode = entry
                    .metadata()
                    .map_err(io_error("stat", &file))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    fs::set_permissions(&file, fs::Permissions::from_mode(mode & 0o700))
                        .map_err(io_error("chmod", &file))?;
                    tightened += 1;
                }
            }
        }
    }
    tracing::warn!(
        dir = %path.display(),
        files = tightened,
        "the data dir was open to other users; it and its files are now private to the owner"
    );
    Ok(())
}

impl DataDir {
    /// Locks `path` (creating it if needed) and reads or creates its node id.
    ///
    /// # Errors
    /// [`DataDirError::Locked`] if another process holds it; io errors; a damaged id file.
    pub fn open(path: &Path) -> Result<DataDir, DataDirError> {
        make_private(path)?;
        let lock_path = path.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_error("open", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let path = path.to_path_buf();
                return Err(DataDirError::Locked { path });
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_error("lock", &lock_path)(e)),
        }
        let node_id = match read(path, NODE_ID_FILE)? {
            Some(text) => parse_node_id(&path.join(NODE_ID_FILE), &text)?,
            None => {
                let id = random_node_id();
                // Crash before the rename inside: no id file, and the next start makes a new
                // id, which is fine because nothing used this one yet.
                write_durably(path, NODE_ID_FILE, &format!("{id}\n"))?;
                id
            }
        };
        let name = match read(path, NODE_NAME_FILE)? {
            Some(text) => {
                let name = text.trim().to_owned();
                validate_name(&name).map_err(|source| DataDirError::BadNodeName {
                    path: path.join(NODE_NAME_FILE),
                    source,
                })?;
                Some(name)
            }
            None => None,
        };
        Ok(DataDir {
            path: path.to_path_buf(),
            node_id,
            name,
            _lock: lock,
        })
    }

    /// Takes the first free `root/node-N` (N from 1), reusing an existing directory (and its
    /// identity) before creating a new one.
    ///
    /// # Errors
    /// [`DataDirError::NoneFree`] if all candidates are locked; io errors.
    pub fn pick(root: &Path) -> Result<DataDir, DataDirError> {
        for n in 1..=PICK_ATTEMPTS_MAX {
            match DataDir::open(&root.join(format!("node-{n}"))) {
                Err(DataDirError::Locked { .. }) => continue,
                result => return result,
            }
        }
        let (root, tried) = (root.to_path_buf(), PICK_ATTEMPTS_MAX);
        Err(DataDirError::NoneFree { root, tried })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This node's persistent id.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// This node's name, once the directory has one (see [`DataDir::claim_name`]).
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Settles this node's name: the one kept in the directory, else `requested`, else
    /// [`default_name`]; a new name is validated and written durably before it is returned.
    ///
    /// # Errors
    /// [`DataDirError::NameMismatch`] when the directory keeps another name than `requested`;
    /// [`DataDirError::InvalidName`]; io errors.
    pub fn claim_name(&mut self, requested: Option<&str>) -> Result<String, DataDirError> {
        if let Some(requested) = requested {
            validate_name(requested)?;
        }
        match (&self.name, requested) {
            (Some(kept), Some(requested)) if kept != requested => {
                return Err(DataDirError::NameMismatch {
                    path: self.path.clone(),
                    kept: kept.clone(),
                    requested: requested.to_owned(),
                })
            }
            (Some(kept), _) => return Ok(kept.clone()),
            (None, _) => {}
        }
        let name = requested.map_or_else(|| default_name(&self.path), str::to_owned);
        validate_name(&name)?;
        // Crash before the rename: no name file, and the next start chooses again, which is
        // fine because the name reached nobody yet (it is claimed before Raft starts).
        write_durably(&self.path, NODE_NAME_FILE, &format!("{name}\n"))?;
        self.name = Some(name.clone());
        Ok(name)
    }

    /// What the `LEFT` marker says, if this node has left its cluster with `server leave`.
    ///
    /// # Errors
    /// Io errors other than "not found".
    pub fn left(&self) -> Result<Option<String>, DataDirError> {
        Ok(read(&self.path, LEFT_FILE)?.map(|text| text.trim().to_owned()))
    }

    /// Writes the `LEFT` marker durably, saying which cluster was left.
    ///
    /// # Errors
    /// Io errors.
    pub fn mark_left(&self, cluster: &str) -> Result<(), DataDirError> {
        // Crash before the rename: no marker, and the node may rejoin on restart, as if the
        // leave had not been asked for; the leave RPC had not answered yet either.
        write_durably(&self.path, LEFT_FILE, &format!("left cluster {cluster}\n"))
    }

    /// Removes the `LEFT` marker (`--rejoin`, or a leave that failed), durably.
    ///
    /// # Errors
    /// Io errors other than "not found".
    pub fn clear_left(&self) -> Result<(), DataDirError> {
        let path = self.path.join(LEFT_FILE);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_error("remove", &path)(e)),
        }
        // A crash before this fsync may bring the marker back; the node then stays out and
        // says so, and `--rejoin` removes it again.
        File::open(&self.path)
            .and_then(|d| d.sync_all())
            .map_err(io_error("fsync", &self.path))
    }

    /// The node id kept in `dir`, read without taking the lock (for commands that address the
    /// node running there).
    ///
    /// # Errors
    /// [`DataDirError::BadNodeId`] or io errors (also when `dir` has no node id yet).
    pub fn read_node_id(dir: &Path) -> Result<NodeId, DataDirError> {
        let path = dir.join(NODE_ID_FILE);
        let text = fs::read_to_string(&path).map_err(io_error("read", &path))?;
        parse_node_id(&path, &text)
    }
}

fn parse_node_id(path: &Path, text: &str) -> Result<NodeId, DataDirError> {
    let text = text.trim();
    let id = text.parse::<NodeId>().ok().filter(|id| *id != 0);
    id.ok_or_else(|| DataDirError::BadNodeId {
        path: path.to_path_buf(),
        reason: format!("expected a non-zero integer, found {text:?}"),
    })
}

/// A random non-zero id, below 2^63 so it stays positive in signed contexts (JSON readers,
/// metrics labels). Collisions among 10^4 nodes have probability ~10^-11; the cluster also
/// refuses a join from an id it already has with other addresses.
fn random_node_id() -> NodeId {
    loop {
        let id = rand::random::<u64>() >> 1;
        if id != 0 {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_locked_dir_is_refused_and_pick_moves_on() {
        let root = tempfile::tempdir().unwrap();
        let first = DataDir::pick(root.path()).unwrap();
        assert!(first.path().ends_with("node-1"));
        assert!(matches!(
            DataDir::open(first.path()),
            Err(DataDirError::Locked { .. })
        ));
        let second = DataDir::pick(root.path()).unwrap();
        assert!(second.path().ends_with("node-2"));
        assert_ne!(first.node_id(), second.node_id());
    }

    #[test]
    fn a_reopened_dir_keeps_its_identity() {
        let root = tempfile::tempdir().unwrap();
        let id = DataDir::pick(root.path()).unwrap().node_id();
        // The first handle was dropped, releasing the lock: pick reuses node-1.
        let again = DataDir::pick(root.path()).unwrap();
        assert!(again.path().ends_with("node-1"));
        assert_eq!(again.node_id(), id);
    }

    #[test]
    fn a_damaged_id_file_is_a_clear_error() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("node-1");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(NODE_ID_FILE), "not a number").unwrap();
        assert!(matches!(
            DataDir::open(&dir),
            Err(DataDirError::BadNodeId { .. })
        ));
    }

    #[test]
    fn a_name_is_chosen_once_and_kept_across_restarts() {
        let root = tempfile::tempdir().unwrap();
        let mut dir = DataDir::pick(root.path()).unwrap();
        assert_eq!(dir.name(), None);
        assert_eq!(dir.claim_name(None).unwrap(), "n1");
        let path = dir.path().to_path_buf();
        drop(dir);
        let mut again = DataDir::open(&path).unwrap();
        assert_eq!(again.name(), Some("n1"));
        assert_eq!(again.claim_name(None).unwrap(), "n1");
        assert_eq!(again.claim_name(Some("n1")).unwrap(), "n1");
    }

    #[test]
    fn an_explicit_name_is_kept_and_another_one_later_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("anywhere");
        let mut dir = DataDir::open(&path).unwrap();
        assert_eq!(dir.claim_name(Some("alpha")).unwrap(), "alpha");
        drop(dir);
        let mut again = DataDir::open(&path).unwrap();
        let error = again.claim_name(Some("beta")).unwrap_err();
        assert!(
            matches!(&error, DataDirError::NameMismatch { kept, requested, .. }
                if kept == "alpha" && requested == "beta"),
            "{error}"
        );
        // Refused means nothing changed.
        assert_eq!(again.claim_name(None).unwrap(), "alpha");
    }

    #[test]
    fn an_invalid_name_is_refused_and_nothing_is_written() {
        let root = tempfile::tempdir().unwrap();
        let mut dir = DataDir::pick(root.path()).unwrap();
        assert!(matches!(
            dir.claim_name(Some("Bad Name")),
            Err(DataDirError::InvalidName(NameError { .. }))
        ));
        assert!(!dir.path().join(NODE_NAME_FILE).exists());
    }

    #[test]
    fn the_left_marker_is_written_read_and_cleared() {
        let root = tempfile::tempdir().unwrap();
        let dir = DataDir::pick(root.path()).unwrap();
        assert_eq!(dir.left().unwrap(), None);
        dir.mark_left("prod").unwrap();
        assert_eq!(dir.left().unwrap().as_deref(), Some("left cluster prod"));
        dir.clear_left().unwrap();
        assert_eq!(dir.left().unwrap(), None);
        dir.clear_left().unwrap();
        assert_eq!(DataDir::read_node_id(dir.path()).unwrap(), dir.node_id());
    }
}
