//! Versioned encodings of the openraft values this node persists: log entries, votes, log ids
//! and memberships. Every encoding starts with a one-byte format version so the layout can
//! change later without misreading old bytes.

use serde::{de::DeserializeOwned, Serialize};

use crate::types::{Entry, LogId, StoredMembership, Vote};

/// Version byte of every value in this module.
pub const FORMAT_VERSION: u8 = 1;

/// Why a persisted value could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The value was empty.
    #[error("empty value")]
    Empty,
    /// The value was written by a format this build does not know.
    #[error("unsupported format version {found} (this build reads {FORMAT_VERSION})")]
    UnsupportedVersion {
        /// The version byte found.
        found: u8,
    },
    /// The bytes after the version did not decode.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// The codec's complaint.
        reason: String,
    },
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    // postcard writes to a Vec without failing for these plain-data types; a failure would mean
    // a type that cannot be serialized at all, which is a programming error.
    let body = postcard::to_allocvec(value).expect("openraft values always serialize");
    out.extend_from_slice(&body);
    out
}

fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, DecodeError> {
    let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if version != FORMAT_VERSION {
        return Err(DecodeError::UnsupportedVersion { found: version });
    }
    postcard::from_bytes(body).map_err(|e| DecodeError::Malformed {
        what,
        reason: e.to_string(),
    })
}

/// Encodes a log entry for `raft_log`.
pub fn encode_entry(entry: &Entry) -> Vec<u8> {
    encode(entry)
}

/// Decodes a log entry read back from `raft_log`.
pub fn decode_entry(bytes: &[u8]) -> Result<Entry, DecodeError> {
    decode("log entry", bytes)
}

/// Encodes a vote.
pub fn encode_vote(vote: &Vote) -> Vec<u8> {
    encode(vote)
}

/// Decodes a vote.
pub fn decode_vote(bytes: &[u8]) -> Result<Vote, DecodeError> {
    decode("vote", bytes)
}

/// Encodes an optional log id (committed, last applied, last purged).
pub fn encode_log_id(log_id: &Option<LogId>) -> Vec<u8> {
    encode(log_id)
}

/// Decodes an optional log id.
pub fn decode_log_id(bytes: &[u8]) -> Result<Option<LogId>, DecodeError> {
    decode("log id", bytes)
}

/// Encodes a stored membership.
pub fn encode_membership(membership: &StoredMembership) -> Vec<u8> {
    encode(membership)
}

/// Decodes a stored membership.
pub fn decode_membership(bytes: &[u8]) -> Result<StoredMembership, DecodeError> {
    decode("membership", bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_version_is_refused() {
        let mut bytes = encode_vote(&Vote::new(3, 7));
        bytes[0] = 9;
        assert!(matches!(
            decode_vote(&bytes),
            Err(DecodeError::UnsupportedVersion { found: 9 })
        ));
    }

    #[test]
    fn truncated_value_is_malformed_not_a_panic() {
        let bytes = encode_vote(&Vote::new(3, 7));
        for cut in 0..bytes.len() {
            assert!(decode_vote(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        assert_eq!(decode_vote(&bytes).unwrap(), Vote::new(3, 7));
    }
}
