//! The v2 channel crypto record and the channel key it unlocks. The record's byte layout is
//! in the [`crypto`](super) module doc.

use aes_gcm::{Aes256Gcm, KeyInit};
use subtle::ConstantTimeEq;

use super::kdf::{self, Argon2Params, Bounds};
use super::{CryptoError, RecordError};

/// Version byte of a v2 channel crypto record.
pub const RECORD_VERSION_V2: u8 = 0x02;
/// Length of a v2 record, in bytes: version, three u32 parameters, salt, key check.
pub const RECORD_LEN_V2: usize = 1 + 3 * 4 + SALT_LEN + KEY_CHECK_LEN;
/// Length of the random salt in a record, in bytes.
pub const SALT_LEN: usize = 16;
/// Length of the key-check value in a record, in bytes.
pub const KEY_CHECK_LEN: usize = 32;

const SALT_DOMAIN: &[u8] = b"cellchat/v2/";
const INFO_MESSAGE_KEY: &[u8] = b"cellchat v2 channel message key";
const INFO_KEY_CHECK: &[u8] = b"cellchat v2 channel key check";

/// A decoded v2 channel crypto record: public, stored by the cluster as opaque bytes.
///
/// Invariant: the parameters passed the bounds of the decoder or creator that built it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelRecord {
    params: Argon2Params,
    salt: [u8; SALT_LEN],
    key_check: [u8; KEY_CHECK_LEN],
}

impl ChannelRecord {
    /// Decodes a record and checks its parameters against the v2 bounds
    /// ([`Argon2Params::check_v2`]).
    ///
    /// # Errors
    ///
    /// [`CryptoError::BadRecord`] for a record of another length or version, or with
    /// parameters out of bounds.
    pub fn decode(bytes: &[u8]) -> Result<ChannelRecord, CryptoError> {
        Self::decode_with(&Bounds::V2, bytes)
    }

    pub(crate) fn decode_with(bounds: &Bounds, bytes: &[u8]) -> Result<ChannelRecord, CryptoError> {
        let bad = CryptoError::BadRecord;
        match bytes.first() {
            None => {
                return Err(bad(RecordError::Length {
                    len: 0,
                    expected: RECORD_LEN_V2,
                }))
            }
            Some(&RECORD_VERSION_V2) => {}
            Some(&found) => return Err(bad(RecordError::Version { found })),
        }
        let bytes: &[u8; RECORD_LEN_V2] = bytes.try_into().map_err(|_| {
            bad(RecordError::Length {
                len: bytes.len(),
                expected: RECORD_LEN_V2,
            })
        })?;
        let u32_at =
            |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("a 4-byte slice"));
        let params = Argon2Params {
            memory_kib: u32_at(1),
            passes: u32_at(5),
            lanes: u32_at(9),
        };
        bounds
            .check(params)
            .map_err(|e| bad(RecordError::Params(e)))?;
        Ok(ChannelRecord {
            params,
            salt: bytes[13..13 + SALT_LEN].try_into().expect("16 bytes"),
            key_check: bytes[13 + SALT_LEN..].try_into().expect("32 bytes"),
        })
    }

    /// The record's bytes ([`RECORD_LEN_V2`] of them).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(RECORD_LEN_V2);
        out.push(RECORD_VERSION_V2);
        for value in [
            self.params.memory_kib,
            self.params.passes,
            self.params.lanes,
        ] {
            out.extend_from_slice(&value.to_le_bytes());
        }
        out.extend_from_slice(&self.salt);
        out.extend_from_slice(&self.key_check);
        assert_eq!(out.len(), RECORD_LEN_V2);
        out
    }

    /// The Argon2id parameters a passphrase is stretched with.
    pub fn params(&self) -> Argon2Params {
        self.params
    }
}

/// The AES-256-GCM key of one channel of one cluster under format v2. The key bytes are not
/// printable.
#[derive(Clone)]
pub struct ChannelKeyV2 {
    cipher: Aes256Gcm,
    cluster: String,
    channel: String,
}

impl std::fmt::Debug for ChannelKeyV2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelKeyV2")
            .field("cluster", &self.cluster)
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

/// The two keys one Argon2id output is split into.
struct Derived {
    message_key: [u8; 32],
    key_check: [u8; KEY_CHECK_LEN],
}

fn derive(
    params: Argon2Params,
    salt: &[u8; SALT_LEN],
    passphrase: &str,
    cluster: &str,
    channel: &str,
) -> Result<Derived, CryptoError> {
    // The cluster and channel are part of the Argon2 salt, so a record copied to another
    // channel or cluster yields another key and fails its key check there.
    let mut salt_input = SALT_DOMAIN.to_vec();
    salt_input.extend_from_slice(salt);
    kdf::put_field(&mut salt_input, cluster.as_bytes());
    kdf::put_field(&mut salt_input, channel.as_bytes());
    let master = kdf::argon2id(params, passphrase, &salt_input)?;
    Ok(Derived {
        message_key: kdf::hkdf_sha256(&master, INFO_MESSAGE_KEY),
        key_check: kdf::hkdf_sha256(&master, INFO_KEY_CHECK),
    })
}

impl ChannelKeyV2 {
    /// Makes a new v2 key for `channel` of `cluster` from `passphrase` with the default
    /// parameters ([`Argon2Params::V2_DEFAULT`]) and a fresh random salt. Returns the key and
    /// the record bytes to store in the cluster's channel record; every member then unlocks
    /// the key with [`ChannelKeyV2::unlock`]. Takes one Argon2id derivation (about 50 ms
    /// on one server core).
    ///
    /// # Errors
    ///
    /// [`CryptoError::EmptyPassphrase`] for an empty passphrase.
    pub fn create(
        passphrase: &str,
        cluster: &str,
        channel: &str,
    ) -> Result<(ChannelKeyV2, Vec<u8>), CryptoError> {
        Self::create_with(Argon2Params::V2_DEFAULT, passphrase, cluster, channel)
    }

    /// [`ChannelKeyV2::create`] with chosen parameters, which must pass
    /// [`Argon2Params::check_v2`].
    ///
    /// # Errors
    ///
    /// [`CryptoError::BadRecord`] with [`RecordError::Params`] for parameters out of bounds,
    /// [`CryptoError::EmptyPassphrase`] for an empty passphrase.
    pub fn create_with(
        params: Argon2Params,
        passphrase: &str,
        cluster: &str,
        channel: &str,
    ) -> Result<(ChannelKeyV2, Vec<u8>), CryptoError> {
        Self::create_bounded(&Bounds::V2, params, passphrase, cluster, channel)
    }

    pub(crate) fn create_bounded(
        bounds: &Bounds,
        params: Argon2Params,
        passphrase: &str,
        cluster: &str,
        channel: &str,
    ) -> Result<(ChannelKeyV2, Vec<u8>), CryptoError> {
        bounds
            .check(params)
            .map_err(|e| CryptoError::BadRecord(RecordError::Params(e)))?;
        // 128 random bits from the thread CSPRNG: a fresh salt per channel key, so the same
        // passphrase set again gives a new key and no table built earlier applies.
        let salt: [u8; SALT_LEN] = rand::random();
        let derived = derive(params, &salt, passphrase, cluster, channel)?;
        let record = ChannelRecord {
            params,
            salt,
            key_check: derived.key_check,
        };
        let key = Self::from_message_key(&derived.message_key, cluster, channel);
        Ok((key, record.encode()))
    }

    /// Unlocks the key of `channel` of `cluster` from `passphrase` and the channel's record:
    /// one Argon2id derivation with the record's parameters (checked against the v2 bounds
    /// before any memory is spent), then a constant-time compare with its key check.
    ///
    /// # Errors
    ///
    /// [`CryptoError::BadRecord`] for a record this build cannot use,
    /// [`CryptoError::WrongPassphrase`] when the key check differs (a wrong passphrase, or a
    /// record made for another channel or cluster), [`CryptoError::EmptyPassphrase`].
    pub fn unlock(
        passphrase: &str,
        cluster: &str,
        channel: &str,
        record: &[u8],
    ) -> Result<ChannelKeyV2, CryptoError> {
        Self::unlock_bounded(&Bounds::V2, passphrase, cluster, channel, record)
    }

    pub(crate) fn unlock_bounded(
        bounds: &Bounds,
        passphrase: &str,
        cluster: &str,
        channel: &str,
        record: &[u8],
    ) -> Result<ChannelKeyV2, CryptoError> {
        let record = ChannelRecord::decode_with(bounds, record)?;
        let derived = derive(record.params, &record.salt, passphrase, cluster, channel)?;
        if !bool::from(derived.key_check.ct_eq(&record.key_check)) {
            return Err(CryptoError::WrongPassphrase);
        }
        Ok(Self::from_message_key(
            &derived.message_key,
            cluster,
            channel,
        ))
    }

    pub(crate) fn from_message_key(key: &[u8; 32], cluster: &str, channel: &str) -> ChannelKeyV2 {
        ChannelKeyV2 {
            cipher: Aes256Gcm::new_from_slice(key).expect("an AES-256 key is 32 bytes"),
            cluster: cluster.to_owned(),
            channel: channel.to_owned(),
        }
    }

    /// The cluster this key belongs to.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// The channel this key belongs to.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Whether this is the key of `channel` in `cluster`.
    pub fn is_for(&self, cluster: &str, channel: &str) -> bool {
        self.cluster == cluster && self.channel == channel
    }

    pub(crate) fn cipher(&self) -> &Aes256Gcm {
        &self.cipher
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const SMALL: Argon2Params = Argon2Params {
        memory_kib: 64,
        passes: 1,
        lanes: 1,
    };

    pub(crate) fn create_small(passphrase: &str, channel: &str) -> (ChannelKeyV2, Vec<u8>) {
        ChannelKeyV2::create_bounded(&Bounds::TEST, SMALL, passphrase, "c1", channel)
            .expect("create")
    }

    fn unlock_small(
        passphrase: &str,
        cluster: &str,
        channel: &str,
        record: &[u8],
    ) -> Result<ChannelKeyV2, CryptoError> {
        ChannelKeyV2::unlock_bounded(&Bounds::TEST, passphrase, cluster, channel, record)
    }

    #[test]
    fn record_round_trips_and_has_the_documented_layout() {
        let (_, bytes) = create_small("pw", "general");
        assert_eq!(bytes.len(), RECORD_LEN_V2);
        assert_eq!(RECORD_LEN_V2, 61);
        assert_eq!(bytes[0], RECORD_VERSION_V2);
        assert_eq!(&bytes[1..5], &64u32.to_le_bytes());
        assert_eq!(&bytes[5..9], &1u32.to_le_bytes());
        assert_eq!(&bytes[9..13], &1u32.to_le_bytes());
        let record = ChannelRecord::decode_with(&Bounds::TEST, &bytes).expect("decode");
        assert_eq!(record.encode(), bytes);
        assert_eq!(record.params(), SMALL);
    }

    #[test]
    fn unlock_with_the_right_passphrase_gives_the_same_key() {
        let (created, record) = create_small("open sesame", "general");
        let unlocked = unlock_small("open sesame", "c1", "general", &record).expect("unlock");
        let body = super::super::seal_v2(
            &created,
            &crate::Identity::ephemeral("alice", Some([1; 32])),
            "c1",
            "general",
            [9; 16],
            1,
            "hi",
        )
        .expect("seal");
        let keys = super::super::Keys {
            v2: Some(unlocked),
            v1: None,
        };
        let opened = super::super::open_message(&keys, "c1", "general", "alice", 1, None, &body);
        assert_eq!(opened.content(), &super::super::Content::Clear("hi".into()));
    }

    #[test]
    fn wrong_passphrase_is_a_typed_error() {
        let (_, record) = create_small("right", "general");
        assert_eq!(
            unlock_small("wrong", "c1", "general", &record).expect_err("wrong"),
            CryptoError::WrongPassphrase
        );
        assert_eq!(
            unlock_small("", "c1", "general", &record).expect_err("empty"),
            CryptoError::EmptyPassphrase
        );
    }

    #[test]
    fn a_record_copied_to_another_channel_or_cluster_does_not_unlock() {
        let (_, record) = create_small("pw", "general");
        assert_eq!(
            unlock_small("pw", "c1", "random", &record).expect_err("channel"),
            CryptoError::WrongPassphrase
        );
        assert_eq!(
            unlock_small("pw", "c2", "general", &record).expect_err("cluster"),
            CryptoError::WrongPassphrase
        );
    }

    #[test]
    fn two_creations_use_different_salts() {
        let (_, a) = create_small("pw", "general");
        let (_, b) = create_small("pw", "general");
        assert_ne!(a, b);
    }

    #[test]
    fn a_tampered_key_check_or_salt_is_a_wrong_passphrase() {
        let (_, record) = create_small("pw", "general");
        for at in 13..RECORD_LEN_V2 {
            let mut bad = record.clone();
            bad[at] ^= 0x80;
            assert_eq!(
                unlock_small("pw", "c1", "general", &bad).expect_err("tampered"),
                CryptoError::WrongPassphrase,
                "flip at {at}"
            );
        }
    }

    #[test]
    fn bad_records_are_refused_before_any_derivation() {
        let (_, record) = create_small("pw", "general");
        let err = |bytes: &[u8]| ChannelRecord::decode(bytes).expect_err("refused");
        assert_eq!(
            err(&[]),
            CryptoError::BadRecord(RecordError::Length {
                len: 0,
                expected: 61
            })
        );
        assert_eq!(
            err(&[0x03; 61]),
            CryptoError::BadRecord(RecordError::Version { found: 3 })
        );
        assert!(matches!(
            err(&record[..60]),
            CryptoError::BadRecord(RecordError::Length { len: 60, .. })
        ));
        let mut long = record.clone();
        long.push(0);
        assert!(matches!(
            err(&long),
            CryptoError::BadRecord(RecordError::Length { len: 62, .. })
        ));
        // The tiny test parameters are below the v2 minimum: the real decoder refuses them.
        assert!(matches!(
            err(&record),
            CryptoError::BadRecord(RecordError::Params(super::super::ParamsError::Memory {
                found: 64,
                ..
            }))
        ));
        // A hostile server asking for 4 GiB of memory or 2^32 passes.
        let mut huge = record.clone();
        huge[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            err(&huge),
            CryptoError::BadRecord(RecordError::Params(_))
        ));
        let mut slow = record;
        slow[1..5].copy_from_slice(&47_104u32.to_le_bytes());
        slow[5..9].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            err(&slow),
            CryptoError::BadRecord(RecordError::Params(_))
        ));
    }

    #[test]
    fn create_with_parameters_out_of_bounds_is_refused() {
        assert!(matches!(
            ChannelKeyV2::create_with(SMALL, "pw", "c1", "general"),
            Err(CryptoError::BadRecord(RecordError::Params(_)))
        ));
    }

    /// The one test of the real v2 parameters (46 MiB, one pass).
    #[test]
    fn real_parameters_create_and_unlock() {
        let (_, record) = ChannelKeyV2::create("pw", "c1", "general").expect("create");
        assert_eq!(
            ChannelRecord::decode(&record).expect("decode").params(),
            Argon2Params::V2_DEFAULT
        );
        ChannelKeyV2::unlock("pw", "c1", "general", &record).expect("unlock");
        assert_eq!(
            ChannelKeyV2::unlock("pW", "c1", "general", &record).expect_err("wrong"),
            CryptoError::WrongPassphrase
        );
    }
}
