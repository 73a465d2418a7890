//! Small files replaced atomically and durably: write a temp file, fsync it, rename it over the
//! old one, fsync the directory. Used for the node's identity files and its TLS keys.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

/// Replaces `path` with `bytes`, durably.
///
/// # Errors
/// Any io error; on error the old file is still in place (or absent, if there was none).
pub fn write_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_durably_with_mode(path, bytes, 0o644)
}

/// Replaces `path` with `bytes`, durably, readable by its owner only (keys, tokens). The temp
/// file is created with that mode, so the secret is never readable by others, not even
/// between the write and the rename.
///
/// # Errors
/// As [`write_durably`].
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_durably_with_mode(path, bytes, 0o600)
}

fn write_durably_with_mode(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("atomic file path has no parent directory"))?;
    let tmp = path.with_extension("tmp");
    {
        // A leftover temp file from a crash may have another mode; start from nothing.
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(bytes)?;
        // Crash before this fsync returns: the temp file may be torn, but the old file is
        // untouched and the temp file is ignored (and overwritten) next time.
        file.sync_all()?;
    }
    // Crash after the rename but before the directory fsync: either name may be visible, and
    // both hold complete, checksummed contents, so either outcome is a valid state.
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}

/// Reads `path`, or `None` if it does not exist.
///
/// # Errors
/// Any io error other than "not found".
pub fn read(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Appends a CRC-32/IEEE of `body` so a reader can tell a complete file from a damaged one.
#[cfg(test)]
pub fn seal(body: &[u8]) -> Vec<u8> {
    let mut out = body.to_vec();
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out
}

/// Checks and strips the checksum added by [`seal`].
pub fn unseal(bytes: &[u8]) -> Option<&[u8]> {
    let split = bytes.len().checked_sub(4)?;
    let (body, crc) = bytes.split_at(split);
    let crc = u32::from_le_bytes(crc.try_into().expect("split leaves exactly 4 bytes"));
    (crc32fast::hash(body) == crc).then_some(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_bytes_round_trip_and_damage_is_detected() {
        let sealed = seal(b"purged 42");
        assert_eq!(unseal(&sealed), Some(&b"purged 42"[..]));
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x10;
            assert_eq!(unseal(&bad), None, "flip at {i}");
        }
        assert_eq!(unseal(&sealed[..3]), None);
    }

    #[test]
    fn write_durably_replaces_contents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        assert_eq!(read(&path).unwrap(), None);
        write_durably(&path, b"one").unwrap();
        write_durably(&path, b"two").unwrap();
        assert_eq!(read(&path).unwrap().as_deref(), Some(&b"two"[..]));
        assert!(!path.with_extension("tmp").exists());
    }
}
