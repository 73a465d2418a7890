//! User identities: one Ed25519 key per (cluster, name), created on first use and kept in the
//! user's config dir, optionally sealed under a passphrase.
//!
//! # Files
//!
//! `<config dir>/identities/<cluster>/<name>.key`, mode 0600. The config dir is
//! `$CELLCHAT_CONFIG_DIR`, else `dirs::config_dir()/cellchat` (`~/.config/cellchat` on Linux).
//! A key file is at most 4 KiB and has one of two forms.
//!
//! Plain: the 32-byte secret seed as 64 lowercase hex digits and a newline.
//!
//! Protected by a passphrase (first line starts with `cellchat-key-v2 `):
//!
//! ```text
//! cellchat-key-v2 argon2id m=<KiB> t=<passes> p=<lanes> salt=<32 hex> nonce=<24 hex> check=<64 hex>
//! <96 hex: AES-256-GCM ciphertext of the 32-byte seed with its 16-byte tag>
//! ```
//!
//! - `master = Argon2id(passphrase, "cellchat/key/v2/" || salt || f(cluster) || f(name))`,
//!   with `f(x) = len(x) (u64 LE) || x` and the header's parameters, which must be within the
//!   v2 bounds of [`Argon2Params::check_v2`] (new files use [`Argon2Params::V2_DEFAULT`]);
//! - HKDF-SHA256 of `master` gives the file key (info `"cellchat v2 key file key"`) and the
//!   check (info `"cellchat v2 key file check"`): a check that differs is a wrong passphrase
//!   ([`IdentityError::WrongPassphrase`]); a check that matches but a ciphertext that does not
//!   open is a changed file ([`IdentityError::Tampered`]);
//! - associated data: `"cellchat-key-v2" || f(cluster) || f(name) || f(header line)`, so the
//!   file cannot be moved to another name or cluster, nor its header edited.
//!
//! To use a name on another machine, copy its key file to the same path there (keep mode 0600;
//! a key file its group or others may read is refused). The cluster registers the name to the
//! key of its first message (trust on first use), so without the file the name cannot be used
//! anywhere else. A passphrase protects a copied or stolen file; it does not protect a key
//! while a client holds it in memory.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use ed25519_dalek::{Signer, SigningKey};
use subtle::ConstantTimeEq;

use crate::crypto::{self, Argon2Params, Bounds, CryptoError};

/// Environment variable that overrides the config dir.
pub const CONFIG_DIR_ENV: &str = "CELLCHAT_CONFIG_DIR";

/// First word of a passphrase-protected key file.
pub const PROTECTED_KEY_MAGIC: &str = "cellchat-key-v2";

/// Largest key file read, in bytes; a larger file is malformed.
const KEY_FILE_BYTES_MAX: u64 = 4096;
const KEY_FILE_SALT_DOMAIN: &[u8] = b"cellchat/key/v2/";
const INFO_FILE_KEY: &[u8] = b"cellchat v2 key file key";
const INFO_FILE_CHECK: &[u8] = b"cellchat v2 key file check";
/// Seed and AES-GCM tag.
const SEALED_SEED_LEN: usize = 32 + 16;

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
    /// The key file is protected and no passphrase was given.
    #[error("key file {} is protected by a passphrase: give the passphrase to use the name", path.display())]
    PassphraseNeeded {
        /// The file.
        path: PathBuf,
    },
    /// The passphrase does not unlock the key file.
    #[error("wrong passphrase for key file {}", path.display())]
    WrongPassphrase {
        /// The file.
        path: PathBuf,
    },
    /// A protected key file whose header or body cannot be parsed.
    #[error("protected key file {} is malformed ({reason}); restore it from a backup", path.display())]
    MalformedProtected {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The passphrase is right but the sealed key does not open: the file was changed, or
    /// copied from another name or cluster.
    #[error("protected key file {} was changed or belongs to another name; restore it from a backup", path.display())]
    Tampered {
        /// The file.
        path: PathBuf,
    },
    /// The identity has no key file to rewrite (an ephemeral identity).
    #[error("this identity has no key file")]
    NoKeyFile,
    /// Others than the owner may write a file whose integrity matters.
    #[error("{} is writable by others (mode {mode:o}): anyone could change it; run `chmod 600 {}`", path.display(), path.display())]
    WritableByOthers {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A line of the known-users file cannot be parsed.
    #[error("known-users file {} line {line} is malformed: it must be `name hexkey`; fix or delete the line", path.display())]
    BadPinLine {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
    /// Deriving or sealing failed.
    #[error("{0}")]
    Crypto(#[from] CryptoError),
}

/// How [`Identity::load_or_create_with`] writes a key it has to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyProtection {
    /// 64 hex digits, readable without a passphrase.
    Plain,
    /// Sealed under a passphrase asked for with [`PassphrasePrompt::Create`].
    Passphrase,
}

/// Why the passphrase provider is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassphrasePrompt<'a> {
    /// To unlock this existing protected key file.
    Unlock {
        /// The file.
        path: &'a Path,
    },
    /// To protect the new key file about to be created here.
    Create {
        /// The file.
        path: &'a Path,
    },
}

/// A passphrase provider: `None` (or an empty passphrase) when the user gives none.
pub type PassphraseProvider<'a> = dyn FnMut(PassphrasePrompt<'_>) -> Option<String> + 'a;

/// The Argon2id parameters for new protected files and the bounds for reading them; tests
/// use small ones.
#[derive(Debug, Clone, Copy)]
struct KeyFileKdf {
    params: Argon2Params,
    bounds: Bounds,
}

impl KeyFileKdf {
    const V2: KeyFileKdf = KeyFileKdf {
        params: Argon2Params::V2_DEFAULT,
        bounds: Bounds::V2,
    };
}

/// Who a key file belongs to, bound into its derivation and associated data.
struct Owner<'a> {
    path: &'a Path,
    cluster: &'a str,
    name: &'a str,
}

/// A user name and its Ed25519 signing key.
#[derive(Clone)]
pub struct Identity {
    name: String,
    key: SigningKey,
    path: Option<PathBuf>,
    cluster: Option<String>,
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
            cluster: None,
        }
    }

    /// Loads the key of `name` in `cluster` from `config_dir`, creating a plain key file on
    /// first use.
    ///
    /// # Errors
    ///
    /// [`IdentityError`] for a name that cannot be a file name, IO failures, a malformed key
    /// file, or [`IdentityError::PassphraseNeeded`] for a protected key file (use
    /// [`Identity::load_or_create_with`]).
    pub fn load_or_create(
        config_dir: &Path,
        cluster: &str,
        name: &str,
    ) -> Result<Self, IdentityError> {
        Self::load_or_create_with(config_dir, cluster, name, KeyProtection::Plain, &mut |_| {
            None
        })
    }

    /// Loads the key of `name` in `cluster` from `config_dir`, creating it on first use as
    /// `new_key` says. `passphrase` is called only to unlock a protected file
    /// ([`PassphrasePrompt::Unlock`]) or to protect a new one
    /// ([`PassphrasePrompt::Create`]); one Argon2id derivation follows (about 50 ms).
    ///
    /// # Errors
    ///
    /// As [`Identity::load_or_create`], and [`IdentityError::PassphraseNeeded`] when the
    /// provider gives no passphrase, [`IdentityError::WrongPassphrase`],
    /// [`IdentityError::MalformedProtected`], [`IdentityError::Tampered`].
    pub fn load_or_create_with(
        config_dir: &Path,
        cluster: &str,
        name: &str,
        new_key: KeyProtection,
        passphrase: &mut PassphraseProvider<'_>,
    ) -> Result<Self, IdentityError> {
        Self::load_or_create_kdf(
            &KeyFileKdf::V2,
            config_dir,
            cluster,
            name,
            new_key,
            passphrase,
        )
    }

    fn load_or_create_kdf(
        kdf: &KeyFileKdf,
        config_dir: &Path,
        cluster: &str,
        name: &str,
        new_key: KeyProtection,
        passphrase: &mut PassphraseProvider<'_>,
    ) -> Result<Self, IdentityError> {
        check_file_name("cluster name", cluster)?;
        check_file_name("user name", name)?;
        let path = key_path(config_dir, cluster, name);
        let owner = Owner {
            path: &path,
            cluster,
            name,
        };
        let key = match read_key_file(&path) {
            Ok(text) => open_key_file(kdf, &owner, &text, passphrase)?,
            Err(IdentityError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                create_key(kdf, &owner, new_key, passphrase)?
            }
            Err(e) => return Err(e),
        };
        Ok(Self {
            name: name.to_owned(),
            key,
            path: Some(path),
            cluster: Some(cluster.to_owned()),
        })
    }

    /// Rewrites the key file sealed under `passphrase` (adding protection, or changing the
    /// passphrase), with [`Argon2Params::V2_DEFAULT`]. The file is replaced atomically.
    ///
    /// # Errors
    ///
    /// [`IdentityError::NoKeyFile`] for an ephemeral identity,
    /// [`IdentityError::PassphraseNeeded`] for an empty passphrase, IO failures.
    pub fn protect(&self, passphrase: &str) -> Result<(), IdentityError> {
        self.protect_kdf(&KeyFileKdf::V2, passphrase)
    }

    fn protect_kdf(&self, kdf: &KeyFileKdf, passphrase: &str) -> Result<(), IdentityError> {
        let (path, cluster) = self.key_file()?;
        if passphrase.is_empty() {
            return Err(IdentityError::PassphraseNeeded {
                path: path.to_path_buf(),
            });
        }
        let owner = Owner {
            path,
            cluster,
            name: &self.name,
        };
        let text = seal_key_file(kdf.params, &owner, &self.key.to_bytes(), passphrase)?;
        replace_private_file(path, text.as_bytes())
    }

    /// Rewrites the key file as a plain one (64 hex digits), removing protection. The file is
    /// replaced atomically.
    ///
    /// # Errors
    ///
    /// [`IdentityError::NoKeyFile`] for an ephemeral identity, IO failures.
    pub fn unprotect(&self) -> Result<(), IdentityError> {
        let (path, _) = self.key_file()?;
        replace_private_file(path, plain_key_text(&self.key.to_bytes()).as_bytes())
    }

    fn key_file(&self) -> Result<(&Path, &str), IdentityError> {
        match (&self.path, &self.cluster) {
            (Some(path), Some(cluster)) => Ok((path, cluster)),
            _ => Err(IdentityError::NoKeyFile),
        }
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

    /// X25519 of this identity's secret scalar (the clamped scalar Ed25519 signs with) and
    /// `public` (a Montgomery point): how a direct conversation's key reaches its members.
    pub(crate) fn x25519(&self, public: &[u8; 32]) -> [u8; 32] {
        curve25519_dalek::montgomery::MontgomeryPoint(*public)
            .mul_clamped(self.key.to_scalar_bytes())
            .to_bytes()
    }
}

/// The permission bits of `path`.
pub(crate) fn file_mode(path: &Path) -> Result<u32, IdentityError> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = fs::metadata(path).map_err(|source| IdentityError::Io {
        op: "reading",
        path: path.to_path_buf(),
        source,
    })?;
    Ok(metadata.permissions().mode() & 0o777)
}

/// Refuses a key file that its group or others may read or write.
fn check_private(path: &Path) -> Result<(), IdentityError> {
    let mode = file_mode(path)?;
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

pub(crate) fn check_file_name(what: &'static str, value: &str) -> Result<(), IdentityError> {
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

fn plain_key_text(seed: &[u8; 32]) -> String {
    format!("{}\n", hex::encode(seed))
}

/// Reads a key file of at most [`KEY_FILE_BYTES_MAX`] bytes.
fn read_key_file(path: &Path) -> Result<String, IdentityError> {
    let io = |source| IdentityError::Io {
        op: "reading",
        path: path.to_path_buf(),
        source,
    };
    let file = fs::File::open(path).map_err(io)?;
    let mut text = String::new();
    match file.take(KEY_FILE_BYTES_MAX + 1).read_to_string(&mut text) {
        Ok(len) if len as u64 <= KEY_FILE_BYTES_MAX => Ok(text),
        Ok(_) => Err(IdentityError::Malformed {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => Err(IdentityError::Malformed {
            path: path.to_path_buf(),
        }),
        Err(source) => Err(io(source)),
    }
}

fn ask(
    passphrase: &mut PassphraseProvider<'_>,
    prompt: PassphrasePrompt<'_>,
    path: &Path,
) -> Result<String, IdentityError> {
    passphrase(prompt)
        .filter(|p| !p.is_empty())
        .ok_or_else(|| IdentityError::PassphraseNeeded {
            path: path.to_path_buf(),
        })
}

/// The signing key in an existing key file, plain or protected.
fn open_key_file(
    kdf: &KeyFileKdf,
    owner: &Owner<'_>,
    text: &str,
    passphrase: &mut PassphraseProvider<'_>,
) -> Result<SigningKey, IdentityError> {
    check_private(owner.path)?;
    let is_protected = text
        .strip_prefix(PROTECTED_KEY_MAGIC)
        .is_some_and(|rest| rest.starts_with(' '));
    if !is_protected {
        return parse_key(text).ok_or_else(|| IdentityError::Malformed {
            path: owner.path.to_path_buf(),
        });
    }
    let file = ProtectedFile::parse(&kdf.bounds, text).map_err(|reason| {
        IdentityError::MalformedProtected {
            path: owner.path.to_path_buf(),
            reason,
        }
    })?;
    let passphrase = ask(
        passphrase,
        PassphrasePrompt::Unlock { path: owner.path },
        owner.path,
    )?;
    file.unseal(owner, &passphrase)
}

/// Creates the key file of `owner` with a new random key, or loads the one another process
/// created first.
fn create_key(
    kdf: &KeyFileKdf,
    owner: &Owner<'_>,
    new_key: KeyProtection,
    passphrase: &mut PassphraseProvider<'_>,
) -> Result<SigningKey, IdentityError> {
    let seed: [u8; 32] = rand::random();
    let text = match new_key {
        KeyProtection::Plain => plain_key_text(&seed),
        KeyProtection::Passphrase => {
            let prompt = PassphrasePrompt::Create { path: owner.path };
            let passphrase = ask(passphrase, prompt, owner.path)?;
            seal_key_file(kdf.params, owner, &seed, &passphrase)?
        }
    };
    match create_key_file(owner.path, text.as_bytes())? {
        Created::New => Ok(SigningKey::from_bytes(&seed)),
        Created::Existing => {
            let text = read_key_file(owner.path)?;
            open_key_file(kdf, owner, &text, passphrase)
        }
    }
}

/// The parsed form of a protected key file (see the module doc).
struct ProtectedFile<'a> {
    header: &'a str,
    params: Argon2Params,
    salt: [u8; 16],
    nonce: [u8; 12],
    check: [u8; 32],
    sealed: [u8; SEALED_SEED_LEN],
}

/// The file key and check of one passphrase.
struct FileKeys {
    key: [u8; 32],
    check: [u8; 32],
}

fn derive_file_keys(
    params: Argon2Params,
    salt: &[u8; 16],
    owner: &Owner<'_>,
    passphrase: &str,
) -> Result<FileKeys, CryptoError> {
    let mut salt_input = KEY_FILE_SALT_DOMAIN.to_vec();
    salt_input.extend_from_slice(salt);
    crypto::put_field(&mut salt_input, owner.cluster.as_bytes());
    crypto::put_field(&mut salt_input, owner.name.as_bytes());
    let master = crypto::argon2id(params, passphrase, &salt_input)?;
    Ok(FileKeys {
        key: crypto::hkdf_sha256(&master, INFO_FILE_KEY),
        check: crypto::hkdf_sha256(&master, INFO_FILE_CHECK),
    })
}

fn key_file_ad(owner: &Owner<'_>, header: &str) -> Vec<u8> {
    let mut ad = PROTECTED_KEY_MAGIC.as_bytes().to_vec();
    crypto::put_field(&mut ad, owner.cluster.as_bytes());
    crypto::put_field(&mut ad, owner.name.as_bytes());
    crypto::put_field(&mut ad, header.as_bytes());
    ad
}

/// The text of a protected key file holding `seed`.
fn seal_key_file(
    params: Argon2Params,
    owner: &Owner<'_>,
    seed: &[u8; 32],
    passphrase: &str,
) -> Result<String, CryptoError> {
    let salt: [u8; 16] = rand::random();
    let nonce: [u8; 12] = rand::random();
    let keys = derive_file_keys(params, &salt, owner, passphrase)?;
    let header = format!(
        "{PROTECTED_KEY_MAGIC} argon2id m={} t={} p={} salt={} nonce={} check={}",
        params.memory_kib,
        params.passes,
        params.lanes,
        hex::encode(salt),
        hex::encode(nonce),
        hex::encode(keys.check),
    );
    let sealed = Aes256Gcm::new_from_slice(&keys.key)
        .expect("an AES-256 key is 32 bytes")
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: seed,
                aad: &key_file_ad(owner, &header),
            },
        )
        .map_err(|_| CryptoError::Seal)?;
    Ok(format!("{header}\n{}\n", hex::encode(sealed)))
}

impl<'a> ProtectedFile<'a> {
    /// Parses the two lines; the reason names the first thing wrong.
    fn parse(bounds: &Bounds, text: &'a str) -> Result<ProtectedFile<'a>, String> {
        let mut lines = text.lines();
        let header = lines.next().unwrap_or_default();
        let sealed = lines.next().ok_or("no sealed key line")?;
        if lines.any(|line| !line.trim().is_empty()) {
            return Err("text after the sealed key line".into());
        }
        let fields: Vec<&str> = header.split(' ').collect();
        let [_magic, kdf, m, t, p, salt, nonce, check] = fields[..] else {
            return Err(format!("header has {} fields, not 8", fields.len()));
        };
        if kdf != "argon2id" {
            return Err(format!("unknown key derivation {kdf:?}"));
        }
        let params = Argon2Params {
            memory_kib: number_field(m, "m=")?,
            passes: number_field(t, "t=")?,
            lanes: number_field(p, "p=")?,
        };
        bounds.check(params).map_err(|e| e.to_string())?;
        Ok(ProtectedFile {
            header,
            params,
            salt: hex_field(salt, "salt=")?,
            nonce: hex_field(nonce, "nonce=")?,
            check: hex_field(check, "check=")?,
            sealed: hex_field(sealed.trim(), "")?,
        })
    }

    fn unseal(&self, owner: &Owner<'_>, passphrase: &str) -> Result<SigningKey, IdentityError> {
        let keys = derive_file_keys(self.params, &self.salt, owner, passphrase)?;
        if !bool::from(keys.check.ct_eq(&self.check)) {
            return Err(IdentityError::WrongPassphrase {
                path: owner.path.to_path_buf(),
            });
        }
        let seed = Aes256Gcm::new_from_slice(&keys.key)
            .expect("an AES-256 key is 32 bytes")
            .decrypt(
                Nonce::from_slice(&self.nonce),
                Payload {
                    msg: &self.sealed,
                    aad: &key_file_ad(owner, self.header),
                },
            )
            .ok()
            .and_then(|seed| <[u8; 32]>::try_from(seed).ok())
            .ok_or_else(|| IdentityError::Tampered {
                path: owner.path.to_path_buf(),
            })?;
        Ok(SigningKey::from_bytes(&seed))
    }
}

fn number_field(field: &str, prefix: &str) -> Result<u32, String> {
    field
        .strip_prefix(prefix)
        .filter(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|digits| digits.parse().ok())
        .ok_or_else(|| format!("expected {prefix}<number>, found {field:?}"))
}

fn hex_field<const N: usize>(field: &str, prefix: &str) -> Result<[u8; N], String> {
    field
        .strip_prefix(prefix)
        .and_then(|digits| hex::decode(digits).ok())
        .and_then(|bytes| <[u8; N]>::try_from(bytes).ok())
        .ok_or_else(|| format!("expected {prefix}<{} hex digits>", 2 * N))
}

/// Whether [`create_key_file`] wrote the file or found one in place.
enum Created {
    New,
    Existing,
}

/// Writes `text` to a temporary file with mode 0600, syncs it, and links it into place
/// without replacing an existing file, so two clients starting at once end with one key.
fn create_key_file(path: &Path, text: &[u8]) -> Result<Created, IdentityError> {
    let dir = path.parent().expect("a key path has a parent");
    let tmp = write_private_tmp(dir, text)?;
    // A crash before this link leaves only the temp file; the next run creates a new key. After
    // it, the complete, synced file is in place. hard_link fails if another process won the race,
    // and then we use its key.
    let linked = fs::hard_link(&tmp, path);
    // The temp name is ours alone; failing to remove it leaves a harmless file.
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            sync_dir(dir);
            Ok(Created::New)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(Created::Existing),
        Err(source) => Err(IdentityError::Io {
            op: "linking",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Replaces `path` with `bytes` atomically: a synced temporary file of mode 0600 in the same
/// directory, renamed over it. The one atomic-replace helper of the client's config files.
pub(crate) fn replace_private_file(path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    let dir = path.parent().expect("a config file path has a parent");
    let tmp = write_private_tmp(dir, bytes)?;
    // A crash before the rename leaves the old file whole (and a stray temp file); after it,
    // the new file is complete because it was synced first. rename replaces atomically.
    if let Err(source) = fs::rename(&tmp, path) {
        // Best effort: a leftover temp file is never read.
        let _ = fs::remove_file(&tmp);
        return Err(IdentityError::Io {
            op: "renaming",
            path: path.to_path_buf(),
            source,
        });
    }
    sync_dir(dir);
    Ok(())
}

/// A new, synced file of mode 0600 holding `bytes`, under a random temporary name in `dir`.
fn write_private_tmp(dir: &Path, bytes: &[u8]) -> Result<PathBuf, IdentityError> {
    let io = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| IdentityError::Io { op, path, source }
    };
    fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let tmp = dir.join(format!(".{}.tmp", rand::random::<u64>()));
    let mut file = open_private(&tmp).map_err(io("creating", &tmp))?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    drop(file);
    if let Err(source) = written {
        // Best effort: a leftover temp file holds nothing anyone reads.
        let _ = fs::remove_file(&tmp);
        return Err(IdentityError::Io {
            op: "writing",
            path: tmp,
            source,
        });
    }
    Ok(tmp)
}

/// Persists a new directory entry; a failure only risks losing the newest write on a crash.
fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        // See above: losing the entry at a crash is the worst case, so the result is not needed.
        let _ = d.sync_all();
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

    const SMALL: KeyFileKdf = KeyFileKdf {
        params: Argon2Params {
            memory_kib: 64,
            passes: 1,
            lanes: 1,
        },
        bounds: Bounds::TEST,
    };

    /// Loads alice's key in c1 with small Argon2 parameters, answering every prompt with
    /// `passphrase` and counting the prompts.
    fn load(
        dir: &Path,
        new_key: KeyProtection,
        passphrase: Option<&str>,
        prompts: &mut Vec<String>,
    ) -> Result<Identity, IdentityError> {
        Identity::load_or_create_kdf(&SMALL, dir, "c1", "alice", new_key, &mut |prompt| {
            prompts.push(format!("{prompt:?}"));
            passphrase.map(str::to_owned)
        })
    }

    fn protected_file(dir: &Path, passphrase: &str) -> (Identity, PathBuf) {
        let mut prompts = Vec::new();
        let id = load(
            dir,
            KeyProtection::Passphrase,
            Some(passphrase),
            &mut prompts,
        )
        .expect("create");
        assert_eq!(prompts.len(), 1, "asked once, to create");
        assert!(prompts[0].starts_with("Create"), "{prompts:?}");
        let path = key_path(dir, "c1", "alice");
        (id, path)
    }

    #[test]
    fn a_protected_key_is_created_private_and_reloads_with_its_passphrase() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (created, path) = protected_file(dir.path(), "hunter2");
        let text = fs::read_to_string(&path).expect("read");
        assert!(
            text.starts_with("cellchat-key-v2 argon2id m=64 t=1 p=1 salt="),
            "{text}"
        );
        assert!(!text.contains(&hex::encode(created.key.to_bytes())));
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let mut prompts = Vec::new();
        let again = load(
            dir.path(),
            KeyProtection::Plain,
            Some("hunter2"),
            &mut prompts,
        )
        .expect("unlock");
        assert_eq!(again.public_key(), created.public_key());
        assert_eq!(prompts.len(), 1);
        assert!(prompts[0].starts_with("Unlock"), "{prompts:?}");
    }

    #[test]
    fn plain_files_never_ask_for_a_passphrase() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut prompts = Vec::new();
        let a = load(dir.path(), KeyProtection::Plain, Some("x"), &mut prompts).expect("a");
        let b = load(
            dir.path(),
            KeyProtection::Passphrase,
            Some("x"),
            &mut prompts,
        )
        .expect("b");
        assert_eq!(a.public_key(), b.public_key());
        assert!(prompts.is_empty(), "{prompts:?}");
    }

    #[test]
    fn a_protected_file_without_a_passphrase_is_passphrase_needed() {
        let dir = tempfile::tempdir().expect("tempdir");
        protected_file(dir.path(), "pw");
        for given in [None, Some("")] {
            let err =
                load(dir.path(), KeyProtection::Plain, given, &mut Vec::new()).expect_err("needed");
            assert!(
                matches!(err, IdentityError::PassphraseNeeded { .. }),
                "{err}"
            );
        }
    }

    #[test]
    fn creating_a_protected_key_without_a_passphrase_creates_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err =
            load(dir.path(), KeyProtection::Passphrase, None, &mut Vec::new()).expect_err("needed");
        assert!(
            matches!(err, IdentityError::PassphraseNeeded { .. }),
            "{err}"
        );
        assert!(!key_path(dir.path(), "c1", "alice").exists());
    }

    #[test]
    fn wrong_passphrase_is_a_typed_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        protected_file(dir.path(), "right");
        let err = load(
            dir.path(),
            KeyProtection::Plain,
            Some("wrong"),
            &mut Vec::new(),
        )
        .expect_err("wrong");
        assert!(
            matches!(err, IdentityError::WrongPassphrase { .. }),
            "{err}"
        );
    }

    #[test]
    fn a_protected_file_copied_to_another_name_does_not_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, path) = protected_file(dir.path(), "pw");
        let to = key_path(dir.path(), "c1", "bob");
        fs::copy(&path, &to).expect("copy");
        let err = Identity::load_or_create_kdf(
            &SMALL,
            dir.path(),
            "c1",
            "bob",
            KeyProtection::Plain,
            &mut |_| Some("pw".into()),
        )
        .expect_err("bound to alice");
        assert!(
            matches!(err, IdentityError::WrongPassphrase { .. }),
            "{err}"
        );
    }

    #[test]
    fn a_tampered_protected_file_is_a_typed_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, path) = protected_file(dir.path(), "pw");
        let text = fs::read_to_string(&path).expect("read");
        let (header, sealed) = text.trim_end().split_once('\n').expect("two lines");
        let flip_hex = |s: &str, at: usize| {
            let mut b = s.as_bytes().to_vec();
            b[at] = if b[at] == b'0' { b'1' } else { b'0' };
            String::from_utf8(b).expect("ascii")
        };
        let nonce_at = header.find("nonce=").expect("nonce") + 6;
        let salt_at = header.find("salt=").expect("salt") + 5;
        let check_at = header.find("check=").expect("check") + 6;
        let cases = [
            // The sealed seed or its tag changed.
            (format!("{header}\n{}\n", flip_hex(sealed, 0)), "tampered"),
            (format!("{header}\n{}\n", flip_hex(sealed, 95)), "tampered"),
            // The nonce changed: the check still matches, AES-GCM does not.
            (
                format!("{}\n{sealed}\n", flip_hex(header, nonce_at)),
                "tampered",
            ),
            // The salt or check changed: the passphrase no longer matches.
            (
                format!("{}\n{sealed}\n", flip_hex(header, salt_at)),
                "wrong",
            ),
            (
                format!("{}\n{sealed}\n", flip_hex(header, check_at)),
                "wrong",
            ),
        ];
        for (bad, expected) in cases {
            fs::write(&path, &bad).expect("write");
            let err = load(
                dir.path(),
                KeyProtection::Plain,
                Some("pw"),
                &mut Vec::new(),
            )
            .expect_err("refused");
            let ok = match expected {
                "tampered" => matches!(err, IdentityError::Tampered { .. }),
                _ => matches!(err, IdentityError::WrongPassphrase { .. }),
            };
            assert!(ok, "{expected}: {err}");
        }
    }

    #[test]
    fn malformed_protected_files_are_typed_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, path) = protected_file(dir.path(), "pw");
        let text = fs::read_to_string(&path).expect("read");
        let (header, sealed) = text.trim_end().split_once('\n').expect("two lines");
        let bad_files = [
            format!("{header}\n"),
            format!("{header}\n{sealed}\nextra\n"),
            format!("{header} more\n{sealed}\n"),
            format!("{}\n{sealed}\n", header.replace("argon2id", "scrypt")),
            format!("{}\n{sealed}\n", header.replace("m=64", "m=")),
            format!("{}\n{sealed}\n", header.replace("m=64", "m=+64")),
            format!("{}\n{sealed}\n", header.replace("m=64", "m=99999999999")),
            format!("{}\n{sealed}\n", header.replace("m=64", "m=4")),
            format!("{}\n{sealed}\n", header.replace("t=1", "t=17")),
            format!("{}\n{sealed}\n", header.replace("p=1", "p=9")),
            format!("{}\n{sealed}\n", header.replace("salt=", "salt=00")),
            format!("{}\n{sealed}\n", header.replace("nonce=", "nonce=zz")),
            format!("{header}\n{}\n", &sealed[2..]),
            format!("{header}\nnot hex\n"),
            "cellchat-key-v2 \n".to_owned(),
        ];
        for bad in bad_files {
            fs::write(&path, &bad).expect("write");
            let err = load(
                dir.path(),
                KeyProtection::Plain,
                Some("pw"),
                &mut Vec::new(),
            )
            .expect_err("refused");
            assert!(
                matches!(err, IdentityError::MalformedProtected { .. }),
                "{bad:?}: {err}"
            );
        }
        // The real loader refuses the tiny test parameters as below the v2 minimum.
        fs::write(&path, &text).expect("write");
        let err = Identity::load_or_create_with(
            dir.path(),
            "c1",
            "alice",
            KeyProtection::Plain,
            &mut |_| Some("pw".into()),
        )
        .expect_err("weak parameters");
        assert!(
            matches!(err, IdentityError::MalformedProtected { .. }),
            "{err}"
        );
        // A huge file is malformed, not read whole.
        fs::write(&path, "0".repeat(5000)).expect("write");
        let err = Identity::load_or_create(dir.path(), "c1", "alice").expect_err("huge");
        assert!(matches!(err, IdentityError::Malformed { .. }), "{err}");
    }

    #[test]
    fn protect_change_and_unprotect_keep_the_same_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plain = Identity::load_or_create(dir.path(), "c1", "alice").expect("create");
        plain.protect_kdf(&SMALL, "one").expect("protect");
        let one = load(
            dir.path(),
            KeyProtection::Plain,
            Some("one"),
            &mut Vec::new(),
        )
        .expect("unlock with one");
        assert_eq!(one.public_key(), plain.public_key());
        one.protect_kdf(&SMALL, "two").expect("change");
        let err = load(
            dir.path(),
            KeyProtection::Plain,
            Some("one"),
            &mut Vec::new(),
        )
        .expect_err("old passphrase");
        assert!(
            matches!(err, IdentityError::WrongPassphrase { .. }),
            "{err}"
        );
        let two = load(
            dir.path(),
            KeyProtection::Plain,
            Some("two"),
            &mut Vec::new(),
        )
        .expect("unlock with two");
        two.unprotect().expect("unprotect");
        let again = Identity::load_or_create(dir.path(), "c1", "alice").expect("plain again");
        assert_eq!(again.public_key(), plain.public_key());
        use std::os::unix::fs::PermissionsExt;
        let path = key_path(dir.path(), "c1", "alice");
        let mode = fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<_> = fs::read_dir(path.parent().expect("dir"))
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("alice.key")]);
        let err = plain.protect_kdf(&SMALL, "").expect_err("empty");
        assert!(
            matches!(err, IdentityError::PassphraseNeeded { .. }),
            "{err}"
        );
    }

    #[test]
    fn ephemeral_identities_have_no_file_to_protect() {
        let id = Identity::ephemeral("alice", None);
        assert!(matches!(id.protect("pw"), Err(IdentityError::NoKeyFile)));
        assert!(matches!(id.unprotect(), Err(IdentityError::NoKeyFile)));
    }

    /// The one test of the real key-file parameters (46 MiB, one pass).
    #[test]
    fn real_parameters_protect_and_unlock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = Identity::load_or_create(dir.path(), "c1", "alice").expect("create");
        id.protect("pw").expect("protect");
        let err = Identity::load_or_create(dir.path(), "c1", "alice").expect_err("needed");
        assert!(
            matches!(err, IdentityError::PassphraseNeeded { .. }),
            "{err}"
        );
        let again = Identity::load_or_create_with(
            dir.path(),
            "c1",
            "alice",
            KeyProtection::Plain,
            &mut |_| Some("pw".into()),
        )
        .expect("unlock");
        assert_eq!(again.public_key(), id.public_key());
    }

    #[test]
    fn signatures_verify() {
        let id = Identity::ephemeral("alice", Some([3; 32]));
        let sig = ed25519_dalek::Signature::from_bytes(&id.sign(b"m"));
        let key = ed25519_dalek::VerifyingKey::from_bytes(&id.public_key()).expect("key");
        key.verify_strict(b"m", &sig).expect("verifies");
    }
}
