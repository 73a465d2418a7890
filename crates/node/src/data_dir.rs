//! `DataDir`: a node's directory, locked for the life of the process, holding its identity.
//!
//! `cargo run -p server` with no flags must never let two processes share one directory, and
//! a restarted node must come back with its own identity and data. `DataDir::pick` walks
//! `root/node-1`, `root/node-2`, ... and takes the first one whose lock it can get (an advisory
//! `flock` on `LOCK`, released by the kernel when the process dies, even by kill -9); a fresh
//! directory gets a random node id written durably before anything else uses it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::types::NodeId;

const LOCK_FILE: &str = "LOCK";
const NODE_ID_FILE: &str = "node-id";
/// How many `node-N` directories `pick` tries before giving up.
const PICK_ATTEMPTS_MAX: usize = 1000;

/// Why a data directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// Another live process holds the directory.
    #[error(
        "data dir {path} is locked by another running server; stop it or pick another --data-dir"
    )]
    Locked {
        /// The directory.
        path: PathBuf,
    },
    /// Every candidate under the root was locked.
    #[error("no free data dir under {root} (tried {tried}); stop some servers or pass --data-dir")]
    NoneFree {
        /// The root searched.
        root: PathBuf,
        /// How many candidates were tried.
        tried: usize,
    },
    /// The node id file is damaged.
    #[error("node id file {path} is damaged ({reason}); restore it from a backup or remove the directory")]
    BadNodeId {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// An io error.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
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

/// A locked data directory. The lock lasts as long as this value.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    node_id: NodeId,
    /// Holding the open file holds the flock.
    _lock: File,
}

impl DataDir {
    /// Locks `path` (creating it if needed) and reads or creates its node id.
    ///
    /// # Errors
    /// [`DataDirError::Locked`] if another process holds it; io errors; a damaged id file.
    pub fn open(path: &Path) -> Result<DataDir, DataDirError> {
        fs::create_dir_all(path).map_err(io_error("create", path))?;
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
                return Err(DataDirError::Locked {
                    path: path.to_path_buf(),
                })
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_error("lock", &lock_path)(e)),
        }
        let node_id = read_or_create_node_id(path)?;
        Ok(DataDir {
            path: path.to_path_buf(),
            node_id,
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
                Ok(dir) => return Ok(dir),
                Err(DataDirError::Locked { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(DataDirError::NoneFree {
            root: root.to_path_buf(),
            tried: PICK_ATTEMPTS_MAX,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This node's persistent id.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }
}

fn read_or_create_node_id(dir: &Path) -> Result<NodeId, DataDirError> {
    let path = dir.join(NODE_ID_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse::<NodeId>()
            .ok()
            .filter(|id| *id != 0)
            .ok_or_else(|| DataDirError::BadNodeId {
                path: path.clone(),
                reason: format!("expected a non-zero integer, found {:?}", text.trim()),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let id = random_node_id();
            let tmp = path.with_extension("tmp");
            let mut file = File::create(&tmp).map_err(io_error("create", &tmp))?;
            file.write_all(format!("{id}\n").as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(io_error("write", &tmp))?;
            // Crash before the rename: no id file, and the next start makes a new id, which is
            // fine because nothing used this one yet. After the rename + dir fsync the id is
            // permanent.
            fs::rename(&tmp, &path).map_err(io_error("rename", &path))?;
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_error("fsync", dir))?;
            Ok(id)
        }
        Err(e) => Err(io_error("read", &path)(e)),
    }
}

/// A random non-zero id. Collisions among 10^4 nodes have probability ~10^-11; the cluster
/// also refuses a join from an id it already has with other addresses.
fn random_node_id() -> NodeId {
    loop {
        let id: u64 = rand::random();
        // Keep ids positive in signed contexts (JSON readers, metrics labels).
        let id = id >> 1;
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
}
