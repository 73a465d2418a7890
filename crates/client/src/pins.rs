//! Known users: the public key first seen for each sender name of a cluster (trust on first
//! sight, like ssh's `known_hosts`), so a reader notices when a server later presents another
//! key for a name and can check message signatures against the key it pinned.
//!
//! Known channels, the same way: the SHA-256 of the crypto record first seen for each
//! encrypted channel (`known_channels`, channel names by the cluster's channel rules), so a
//! client notices when a server drops or replaces a channel's record and never takes that
//! channel for a plain one.
//!
//! # File
//!
//! `<config dir>/identities/<cluster>/known_users`, mode 0600, written atomically (a synced
//! temporary file renamed into place). One `name hexkey` line per user: the name (1..=32
//! bytes of `A-Za-z0-9_-`, the cluster's sender rules), one space, the 32-byte Ed25519 public
//! key as 64 lowercase hex digits. Lines starting with `#` and blank lines are ignored. A file
//! its group or others may write is refused.
//!
//! # Non-goals
//!
//! - No way to accept a changed key from inside the client: a user who trusts the new key
//!   deletes the name's line (out of band, on purpose).
//! - No lock between clients: [`Pins::save`] merges with what is on disk, but two saves at
//!   the same instant may lose the newer pins of one (they are pinned again on next sight).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::identity::{check_file_name, replace_private_file, IdentityError};

/// Name of the known-users file in `<config dir>/identities/<cluster>/`.
pub const KNOWN_USERS_FILE: &str = "known_users";

/// Name of the known-channels file in `<config dir>/identities/<cluster>/`.
pub const KNOWN_CHANNELS_FILE: &str = "known_channels";

/// What a pin file holds: its file name, its header line, and which names it accepts.
#[derive(Debug)]
struct Kind {
    file: &'static str,
    header: &'static str,
    valid: fn(&str) -> bool,
}

const USERS: Kind = Kind {
    file: KNOWN_USERS_FILE,
    header: "# cellchat known users: name and Ed25519 public key, pinned on first sight\n",
    valid: proto::valid_user_name,
};

const CHANNELS: Kind = Kind {
    file: KNOWN_CHANNELS_FILE,
    header: "# cellchat known channels: channel and SHA-256 of its crypto record, pinned on first sight\n",
    valid: is_valid_channel,
};

/// What [`Pins::check`] found for a name and the key a server gave for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinCheck {
    /// First sight of the name: the key is now pinned (saved by [`Pins::save`]).
    New,
    /// The key is the pinned one.
    Same,
    /// The key differs from the pinned one, which stays pinned: the server (or the user's
    /// owner) changed the name's key. Show this loudly; messages signed by the new key will
    /// not verify under the pin.
    Changed {
        /// The key pinned before.
        pinned: [u8; 32],
    },
    /// The name is not a valid sender name (1..=32 bytes of `A-Za-z0-9_-`): not pinned, treat
    /// its messages as from an unknown sender.
    BadName,
}

/// The pinned keys of one cluster's users.
///
/// Invariants: a pinned key is never replaced in memory; every name is a valid sender name;
/// `unsaved` is true when memory holds a pin the file may not have.
#[derive(Debug)]
pub struct Pins {
    kind: &'static Kind,
    path: PathBuf,
    keys: BTreeMap<String, [u8; 32]>,
    unsaved: bool,
}

impl Pins {
    /// Loads the pins of `cluster` from `config_dir`; none when the file does not exist yet.
    ///
    /// # Errors
    ///
    /// [`IdentityError::BadName`] for a cluster name that cannot be a directory,
    /// [`IdentityError::WritableByOthers`], [`IdentityError::BadPinLine`] for a line that does
    /// not parse or repeats a name, IO failures.
    pub fn load(config_dir: &Path, cluster: &str) -> Result<Pins, IdentityError> {
        Pins::load_kind(&USERS, config_dir, cluster)
    }

    /// Loads the pinned crypto-record hashes of `cluster`'s channels (`known_channels`).
    ///
    /// # Errors
    ///
    /// As [`Pins::load`].
    pub fn load_channels(config_dir: &Path, cluster: &str) -> Result<Pins, IdentityError> {
        Pins::load_kind(&CHANNELS, config_dir, cluster)
    }

    fn load_kind(
        kind: &'static Kind,
        config_dir: &Path,
        cluster: &str,
    ) -> Result<Pins, IdentityError> {
        check_file_name("cluster name", cluster)?;
        let path = config_dir.join("identities").join(cluster).join(kind.file);
        let keys = read_pins(kind, &path)?;
        Ok(Pins {
            kind,
            path,
            keys,
            unsaved: false,
        })
    }

    /// The file the pins live in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The key pinned for `name`: what a reader passes to
    /// [`open_message`](crate::crypto::open_message) as the sender's key.
    pub fn pinned(&self, name: &str) -> Option<[u8; 32]> {
        self.keys.get(name).copied()
    }

    /// The number of pinned names.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no name is pinned.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Compares `key`, the key a server says `name` is registered with, to the pin, and pins
    /// it on first sight. A changed key never replaces the pin.
    pub fn check(&mut self, name: &str, key: [u8; 32]) -> PinCheck {
        if !(self.kind.valid)(name) {
            return PinCheck::BadName;
        }
        match self.keys.get(name) {
            Some(pinned) if *pinned == key => PinCheck::Same,
            Some(pinned) => PinCheck::Changed { pinned: *pinned },
            None => {
                self.keys.insert(name.to_owned(), key);
                self.unsaved = true;
                PinCheck::New
            }
        }
    }

    /// Writes new pins to the file, merged with what is there now (a pin another client
    /// saved first wins over ours for the same name). Does nothing when nothing is new.
    ///
    /// # Errors
    ///
    /// As [`Pins::load`] for the file on disk, and IO failures writing it.
    pub fn save(&mut self) -> Result<(), IdentityError> {
        if !self.unsaved {
            return Ok(());
        }
        let on_disk = read_pins(self.kind, &self.path)?;
        let mut merged = self.keys.clone();
        merged.extend(on_disk);
        let mut text = self.kind.header.to_owned();
        for (name, key) in &merged {
            text.push_str(&format!("{name} {}\n", hex::encode(key)));
        }
        replace_private_file(&self.path, text.as_bytes())?;
        self.keys = merged;
        self.unsaved = false;
        Ok(())
    }
}

/// The pins in `path`; none when it does not exist.
fn read_pins(kind: &Kind, path: &Path) -> Result<BTreeMap<String, [u8; 32]>, IdentityError> {
    let io = |source| IdentityError::Io {
        op: "reading",
        path: path.to_path_buf(),
        source,
    };
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(io(e)),
    };
    check_not_writable_by_others(path)?;
    let mut keys = BTreeMap::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || IdentityError::BadPinLine {
            path: path.to_path_buf(),
            line: index + 1,
        };
        let (name, key) = parse_pin_line(kind, line).ok_or_else(bad)?;
        if keys.insert(name.to_owned(), key).is_some() {
            return Err(bad());
        }
    }
    Ok(keys)
}

fn parse_pin_line<'a>(kind: &Kind, line: &'a str) -> Option<(&'a str, [u8; 32])> {
    let mut fields = line.split_whitespace();
    let (name, key) = (fields.next()?, fields.next()?);
    if fields.next().is_some() || !(kind.valid)(name) {
        return None;
    }
    let key = hex::decode(key).ok()?.try_into().ok()?;
    Some((name, key))
}

fn check_not_writable_by_others(path: &Path) -> Result<(), IdentityError> {
    let mode = crate::identity::file_mode(path)?;
    if mode & 0o022 != 0 {
        return Err(IdentityError::WritableByOthers {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// The cluster's sender-name rule (`chat_sm` `is_valid_sender`): 1..=32 bytes of
/// `A-Za-z0-9_-`. Names outside it never come from a correct server and could not be stored
/// on one line.
/// The cluster's channel name rules: 1..=64 bytes of `a-z0-9_-`, starting with `a-z0-9`.
fn is_valid_channel(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=64).contains(&bytes.len())
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const A: [u8; 32] = [0xAA; 32];
    const B: [u8; 32] = [0xBB; 32];

    #[test]
    fn channel_pins_live_in_their_own_file_under_the_channel_rules() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut channels = Pins::load_channels(dir.path(), "c1").expect("load");
        assert_eq!(channels.check("general", A), PinCheck::New);
        assert_eq!(
            channels.check("Alice", A),
            PinCheck::BadName,
            "no uppercase"
        );
        let long = "a".repeat(64);
        assert_eq!(
            channels.check(&long, B),
            PinCheck::New,
            "64 bytes is a channel name"
        );
        channels.save().expect("save");
        let path = dir.path().join("identities/c1/known_channels");
        assert_eq!(channels.path(), path);
        let again = Pins::load_channels(dir.path(), "c1").expect("reload");
        assert_eq!(again.pinned("general"), Some(A));
        assert_eq!(again.pinned(&long), Some(B));
        let users = Pins::load(dir.path(), "c1").expect("users");
        assert!(users.is_empty(), "the users' file is another file");
    }

    #[test]
    fn first_sight_pins_and_a_changed_key_keeps_the_pin() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut pins = Pins::load(dir.path(), "c1").expect("load");
        assert!(pins.is_empty());
        assert_eq!(pins.check("alice", A), PinCheck::New);
        assert_eq!(pins.check("alice", A), PinCheck::Same);
        assert_eq!(pins.check("alice", B), PinCheck::Changed { pinned: A });
        assert_eq!(pins.pinned("alice"), Some(A));
        pins.save().expect("save");
        let mut again = Pins::load(dir.path(), "c1").expect("reload");
        assert_eq!(again.pinned("alice"), Some(A));
        assert_eq!(again.check("alice", B), PinCheck::Changed { pinned: A });
        assert_eq!(again.len(), 1);
    }

    #[test]
    fn the_file_is_private_one_line_per_user_and_nothing_else_is_left() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut pins = Pins::load(dir.path(), "c1").expect("load");
        pins.check("bob", B);
        pins.check("alice", A);
        pins.save().expect("save");
        let path = dir.path().join("identities/c1/known_users");
        assert_eq!(pins.path(), path);
        let text = fs::read_to_string(&path).expect("read");
        let lines: Vec<_> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                format!("alice {}", hex::encode(A)),
                format!("bob {}", hex::encode(B))
            ]
        );
        let mode = fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<_> = fs::read_dir(path.parent().expect("dir"))
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("known_users")]);
    }

    #[test]
    fn nothing_new_writes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut pins = Pins::load(dir.path(), "c1").expect("load");
        pins.save().expect("save");
        assert!(!pins.path().exists());
    }

    #[test]
    fn invalid_names_are_not_pinned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut pins = Pins::load(dir.path(), "c1").expect("load");
        for bad in ["", "a b", "a\nb", "ünïcode", &"x".repeat(33), "../x"] {
            assert_eq!(pins.check(bad, A), PinCheck::BadName, "{bad:?}");
        }
        assert!(pins.is_empty());
        assert!(Pins::load(dir.path(), "../c1").is_err());
    }

    #[test]
    fn malformed_lines_are_typed_errors_with_their_line_number() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("identities/c1/known_users");
        fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        let good = format!("alice {}", hex::encode(A));
        let cases = [
            format!("# comment\n\n{good}\nbob\n"),
            format!("{good}\n\nbob {}\n", hex::encode([1; 31])),
            format!("{good}\nbob {} extra\n", hex::encode(B)),
            format!("{good}\nb@d {}\n", hex::encode(B)),
            format!("{good}\nbob zz{}\n", &hex::encode(B)[2..]),
            format!("{good}\nalice {}\n", hex::encode(B)),
        ];
        let expected_lines = [4, 3, 2, 2, 2, 2];
        for (text, expected) in cases.iter().zip(expected_lines) {
            fs::write(&path, text).expect("write");
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
            let err = Pins::load(dir.path(), "c1").expect_err("malformed");
            assert!(
                matches!(err, IdentityError::BadPinLine { line, .. } if line == expected),
                "{text:?}: {err}"
            );
        }
    }

    #[test]
    fn a_file_others_may_write_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut pins = Pins::load(dir.path(), "c1").expect("load");
        pins.check("alice", A);
        pins.save().expect("save");
        for mode in [0o622, 0o602, 0o620] {
            fs::set_permissions(pins.path(), fs::Permissions::from_mode(mode)).expect("chmod");
            let err = Pins::load(dir.path(), "c1").expect_err("refused");
            assert!(
                matches!(err, IdentityError::WritableByOthers { .. }),
                "{err}"
            );
        }
        fs::set_permissions(pins.path(), fs::Permissions::from_mode(0o644)).expect("chmod");
        Pins::load(dir.path(), "c1").expect("readable by others is fine: keys are public");
    }

    #[test]
    fn two_clients_saving_keep_both_and_the_first_pin_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut one = Pins::load(dir.path(), "c1").expect("one");
        let mut two = Pins::load(dir.path(), "c1").expect("two");
        one.check("alice", A);
        two.check("bob", B);
        two.check("alice", B);
        one.save().expect("save one");
        two.save().expect("save two");
        assert_eq!(two.pinned("alice"), Some(A), "the pin saved first wins");
        let again = Pins::load(dir.path(), "c1").expect("reload");
        assert_eq!(again.pinned("alice"), Some(A));
        assert_eq!(again.pinned("bob"), Some(B));
    }

    #[test]
    fn clusters_have_separate_pins() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c1 = Pins::load(dir.path(), "c1").expect("c1");
        c1.check("alice", A);
        c1.save().expect("save");
        let mut c2 = Pins::load(dir.path(), "c2").expect("c2");
        assert_eq!(c2.check("alice", B), PinCheck::New);
    }
}
