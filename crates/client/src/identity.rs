//! User identities: one Ed25519 key per (cluster, name), created on first use and kept in the
//! user's config dir.
//!
//! # Files
//!
//! `<config dir>/identities/<cluster>/<name>.key` holds the 32-byte secret seed as 64 lowercase
//! hex digits and a newline, mode 0600. The config dir is `$CELLCHAT_CONFIG_DIR`, else
//! `dirs::config_dir()/cellchat` (`~/.config/cellchat` on Linux).
//!
//! To use a name on another machine, copy its key file to the same path there (keep mode 0600;
//! a key file its group or others may read is refused). The cluster registers the name to the
//! key of its first message (trust on first use), so without the file the name cannot be used
//! anywhere else.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer, SigningKey};

/// Environment variable that overrides the config dir.
pub const CONFIG_DIR_ENV: &str = "CELLCHAT_CONFIG_DIR";

/// Why an identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// No config dir could be determined.
    #[error("no config directory: set {CONFIG_DIR_ENV} or pass --config-dir")]
    NoConfigDir,
    /// The name or cluster cannot be a file name.
    #[error("{what} {value:?} cannot name a key file: use letters, digits, '-' and '_'")]
    BadName {
        /// "user name" or "cluster name".
        what: &'static str,
        /// The value.
        value: String,
    },
    /// Reading or writing the key file failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Others than the owner may read the key file (as ssh refuses a private key).
    #[error("key file {} is readable by others (mode {mode:o}): anyone who reads it can use the name; run `chmod 600 {}`", path.display(), path.display())]
    ReadableByOthers {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file does not hold 64 hex digits.
    #[error("key file {} is malformed: it must hold 64 hex digits; restore it from a backup or from the machine that owns the name", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
    },
}

/// A user name and its Ed25519 signing key.
#[derive(Clone)]
pub struct Identity {
    name: String,
    key: SigningKey,
    path: Option<PathBuf>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.name)
            .field("public_key", &hex::encode(self.public_key()))
            .field("path", &self.path)
            .finish()
    }
}

impl Identity {
    /// An identity held in memory only (tests, tools), with a fresh random key when `seed` is
    /// `None`.
    pub fn ephemeral(name: impl Into<String>, seed: Option<[u8; 32]>) -> Self {
        Self {
            name: name.into(),
            key: SigningKey::from_bytes(&seed.unwrap_or_else(rand::random)),
            path: None,
        }
    }

    /// Loads the key of `name` in `cluster` from `config_dir`, creating it on first use.
    ///
    /// # Errors
    ///
    /// [`IdentityError`] for a name that cannot be a file name, IO failures, or a malformed
    /// key file.
    pub fn load_or_create(
        config_dir: &Path,
        cluster: &str,
        name: &str,
    ) -> Result<Self, IdentityError> {
        check_file_name("cluster name", cluster)?;
        check_file_name("user name", name)?;
        let path = key_path(config_dir, cluster, name);
        let key = match fs::read_to_string(&path) {
            Ok(text) => {
                check_private(&path)?;
                parse_key(&text).ok_or_else(|| IdentityError::Malformed { path: path.clone() })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_key_file(&path)?,
            Err(source) => {
                return Err(IdentityError::Io {
                    op: "reading",
                    path,
                    source,
                })
            }
        };
        Ok(Self {
            name: name.to_owned(),
            key,
            path: Some(path),
        })
    }

    /// The user name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The Ed25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// The key file, when the identity came from one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Signs `message` (the login message).
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }
}

/// Refuses a key file that its group or others may read or write.
fn check_private(path: &Path) -> Result<(), IdentityError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(path)
        .map_err(|source| IdentityError::Io {
            op: "reading",
            path: path.to_path_buf(),
            source,
        })?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::ReadableByOthers {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// The config dir: `explicit`, else `$CELLCHAT_CONFIG_DIR`, else `dirs::config_dir()/cellchat`.
///
/// # Errors
///
/// [`IdentityError::NoConfigDir`] when none of them is set.
pub fn config_dir(explicit: Option<&Path>) -> Result<PathBuf, IdentityError> {
    if let Some(dir) = explicit {
        return Ok(dir.to_path_buf());
    }
    if let Some(dir) = std::env::var_os(CONFIG_DIR_ENV).filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    dirs::config_dir()
        .map(|d| d.join("cellchat"))
        .ok_or(IdentityError::NoConfigDir)
}

/// Where the key of `name` in `cluster` lives under `config_dir`.
pub fn key_path(config_dir: &Path, cluster: &str, name: &str) -> PathBuf {
    config_dir
        .join("identities")
        .join(cluster)
        .join(format!("{name}.key"))
}

fn check_file_name(what: &'static str, value: &str) -> Result<(), IdentityError> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !value.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(IdentityError::BadName {
            what,
            value: value.to_owned(),
        })
    }
}

fn parse_key(text: &str) -> Option<SigningKey> {
    let bytes = hex::decode(text.trim()).ok()?;
    let seed: [u8; 32] = bytes.try_into().ok()?;
    Some(SigningKey::from_bytes(&seed))
}

/// Writes a new key to a temporary file with mode 0600, syncs it, and links it into place
/// without replacing an existing file, so two clients starting at once end with one key.
fn create_key_file(path: &Path) -> Result<SigningKey, IdentityError> {
    let io = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| IdentityError::Io { op, path, source }
    };
    let dir = path.parent().expect("a key path has a parent");
    fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let seed: [u8; 32] = rand::random();
    let tmp = dir.join(format!(".{}.tmp", rand::random::<u64>()));
    let mut file = open_private(&tmp).map_err(io("creating", &tmp))?;
    let written = file
        .write_all(format!("{}\n", hex::encode(seed)).as_bytes())
        .and_then(|()| file.sync_all());
    drop(file);
    if let Err(source) = written {
        // Best effort: a leftover temp file holds no key anyone uses.
        let _ = fs::remove_file(&tmp);
        return Err(IdentityError::Io {
            op: "writing",
            path: tmp,
            source,
        });
    }
    // A crash before this link leaves only the temp file; the next run creates a new key. After
    // it, the complete, synced file is in place. hard_link fails if another process won the race,
    // and then we use its key.
    let linked = fs::hard_link(&tmp, path);
    // The temp name is ours alone; failing to remove it leaves a harmless file.
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            if let Ok(d) = fs::File::open(dir) {
                // Persist the new directory entry; a failure only risks losing a fresh key.
                let _ = d.sync_all();
            }
            Ok(SigningKey::from_bytes(&seed))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let text = fs::read_to_string(path).map_err(io("reading", path))?;
            parse_key(&text).ok_or_else(|| IdentityError::Malformed {
                path: path.to_path_buf(),
            })
        }
        Err(source) => Err(IdentityError::Io {
            op: "linking",
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(unix)]
fn open_private(path: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn open_private(path: &Path) -> std::io::Result<fs::File> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_use_creates_a_private_key_and_reload_gives_the_same_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Identity::load_or_create(dir.path(), "c1", "alice").expect("create");
        let path = key_path(dir.path(), "c1", "alice");
        assert_eq!(first.path(), Some(path.as_path()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let again = Identity::load_or_create(dir.path(), "c1", "alice").expect("load");
        assert_eq!(first.public_key(), again.public_key());
        // No temp files are left behind.
        let names: Vec<_> = fs::read_dir(path.parent().expect("dir"))
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("alice.key")]);
    }

    #[test]
    fn a_key_file_others_may_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        Identity::load_or_create(dir.path(), "c1", "alice").expect("create");
        let path = key_path(dir.path(), "c1", "alice");
        for mode in [0o644, 0o640, 0o604, 0o660] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
            let error = Identity::load_or_create(dir.path(), "c1", "alice").expect_err("refused");
            assert!(
                matches!(error, IdentityError::ReadableByOthers { .. }),
                "{error}"
            );
            assert!(error.to_string().contains("chmod 600"), "{error}");
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).expect("chmod");
        Identity::load_or_create(dir.path(), "c1", "alice").expect("a read-only private key");
    }

    #[test]
    fn names_and_clusters_get_their_own_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Identity::load_or_create(dir.path(), "c1", "alice").expect("a");
        let b = Identity::load_or_create(dir.path(), "c1", "bob").expect("b");
        let c = Identity::load_or_create(dir.path(), "c2", "alice").expect("c");
        assert_ne!(a.public_key(), b.public_key());
        assert_ne!(a.public_key(), c.public_key());
    }

    #[test]
    fn a_copied_key_file_is_the_same_identity() {
        let one = tempfile::tempdir().expect("tempdir");
        let two = tempfile::tempdir().expect("tempdir");
        let a = Identity::load_or_create(one.path(), "c1", "alice").expect("a");
        let to = key_path(two.path(), "c1", "alice");
        fs::create_dir_all(to.parent().expect("dir")).expect("mkdir");
        fs::copy(a.path().expect("path"), &to).expect("copy");
        let b = Identity::load_or_create(two.path(), "c1", "alice").expect("b");
        assert_eq!(a.public_key(), b.public_key());
    }

    #[test]
    fn malformed_key_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = key_path(dir.path(), "c1", "alice");
        fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        fs::write(&path, "not hex").expect("write");
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        let err = Identity::load_or_create(dir.path(), "c1", "alice").expect_err("malformed");
        assert!(matches!(err, IdentityError::Malformed { .. }), "{err}");
    }

    #[test]
    fn path_like_names_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        for bad in ["../x", "a/b", "", ".hidden"] {
            assert!(
                Identity::load_or_create(dir.path(), "c1", bad).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn signatures_verify() {
        let id = Identity::ephemeral("alice", Some([3; 32]));
        let sig = ed25519_dalek::Signature::from_bytes(&id.sign(b"m"));
        let key = ed25519_dalek::VerifyingKey::from_bytes(&id.public_key()).expect("key");
        key.verify_strict(b"m", &sig).expect("verifies");
    }
}
