//! End-to-end encryption and authorship of message bodies. Servers store and replicate body
//! bytes (and a channel's crypto record) as they are; only clients read these formats.
//!
//! Format v2 encrypts with a key unlocked from a passphrase and a per-channel record, signs
//! every body with the sender's Ed25519 identity key, and binds each body to its cluster,
//! channel, sender, client session and client seq. A hostile server then cannot read
//! encrypted text, cannot forge or alter a message of a sender whose key the reader pinned
//! ([`crate::pins`]), cannot move a body to another channel, cluster, sender or client seq,
//! and cannot show one send twice without a [`ReplayGuard`] noticing. Format v1 stays
//! readable; [`open_body`] and [`Text`] remain for callers that have not moved to
//! [`open_message`].
//!
//! # Body formats
//!
//! | first byte | name | rest |
//! |---|---|---|
//! | `0x00` | plaintext v1 (legacy) | the UTF-8 text; unsigned |
//! | `0x01` | AES-GCM v1 (legacy) | nonce (12) then ciphertext with its 16-byte tag; unsigned |
//! | `0x02` | signed plaintext v2 | session (16), UTF-8 text, signature (64) |
//! | `0x03` | encrypted v2 | session (16), nonce (12), AES-256-GCM ciphertext of the padded text with its tag (16), signature (64) |
//!
//! Any other first byte shows as [`Content::UnknownVersion`], never as garbage. A body is at
//! most [`BODY_BYTES_MAX`] (16 384) bytes.
//!
//! - *session* is [`session_of`]`(client_id)` = `SHA-256("cellchat session v2" || client_id)`,
//!   first 16 bytes: readers learn which sends share a client session, not the client id.
//! - *padded text* (`0x03`) is `len (u16 LE) || text || zeros`, as long as the smallest of
//!   [`PAD_BUCKETS`] (64, 128, ..., 8192, 16 275) that holds it; readers refuse any other
//!   size, a length that does not fit, or non-zero padding. Longest text: 16 273 bytes
//!   (`0x03`), 16 303 bytes (`0x02`).
//! - *nonce*: 96 fresh random bits per message.
//! - *associated data* (`0x03`): `"cellchat-body-v2" || f(cluster) || f(channel) || f(sender)
//!   || session || client_seq (u64 LE)`, where `f(x) = len(x) (u64 LE) || x`.
//! - *signature* (`0x02`, `0x03`): Ed25519 by the sender's identity key over
//!   `"cellchat-signature-v2" || f(cluster) || f(channel) || f(sender) || session ||
//!   client_seq (u64 LE) || f(body before the signature)`, checked with `verify_strict`
//!   under the key the reader pinned for the sender ([`crate::pins`]).
//!
//! The sender and client seq come from the server's [`WireMessage`](proto::WireMessage), the
//! cluster and channel from the reader's own context: a server that changes any of them, or
//! a byte of the body, breaks the signature (and for `0x03` the AES-GCM tag). Replaying a
//! body at another channel seq keeps it valid, so readers run a [`ReplayGuard`].
//!
//! # Channel crypto record (v2)
//!
//! Public; the cluster keeps it with the channel as opaque bytes. Integers little-endian.
//!
//! | offset | width | field |
//! |---|---|---|
//! | 0 | 1 | version, [`RECORD_VERSION_V2`] (`0x02`) |
//! | 1 | 4 | Argon2id memory, KiB (u32) |
//! | 5 | 4 | Argon2id passes (u32) |
//! | 9 | 4 | Argon2id lanes (u32) |
//! | 13 | 16 | random salt |
//! | 29 | 32 | key check |
//!
//! Exactly [`RECORD_LEN_V2`] (61) bytes. Decoding refuses another length or version, and
//! parameters outside the v2 bounds ([`Argon2Params::check_v2`]: memory 19 MiB ..= 1 GiB,
//! passes 1 ..= 16, lanes 1 ..= 4, memory × passes at least v1's), before any memory is
//! spent. The default is OWASP's first choice, 46 MiB, 1 pass, 1 lane.
//!
//! Key derivation: `master = Argon2id(passphrase, "cellchat/v2/" || salt || f(cluster) ||
//! f(channel))` (version 0x13, 32 bytes); then HKDF-SHA256 with an empty salt splits it into
//! the message key (info `"cellchat v2 channel message key"`) and the key check (info
//! `"cellchat v2 channel key check"`). The key check tells a wrong passphrase from a right
//! one (compared in constant time) and says nothing about the message key. Binding cluster
//! and channel in the salt makes a record copied elsewhere fail its key check there.
//!
//! # Non-goals and limits
//!
//! - No fork or equivocation detection: a server can still withhold, delay or reorder
//!   messages, or show different readers different subsets of a channel.
//! - Replays are caught only within a [`ReplayGuard`]'s window and lifetime (memory only).
//! - Authorship is trust on first sight: a message is [`Author::Verified`] only against a key
//!   the reader pinned; before that it is [`Author::UnknownSender`].
//! - Whether a channel is encrypted is the caller's knowledge: a server that drops a
//!   channel's record must not make a client fall back to plaintext (remember the record).
//! - One key per channel: no rotation, no forward secrecy, no per-member keys; anyone with
//!   the passphrase reads all of the channel's history. A record is an offline guessing
//!   target for the passphrase, at the cost of one Argon2id derivation per guess.
//! - Key bytes are not wiped from memory after use.
//!
//! # Format v1 (legacy)
//!
//! Argon2id, version 0x13, memory 19 MiB (19 456 KiB), 2 passes, 1 lane, 32-byte output. The
//! salt is `"cellchat/v1/" || cluster || "/" || channel`. Associated data:
//! `"cellchat-body-v1" || len32(channel) || channel || len32(sender) || sender ||
//! client_seq (u64 LE)`, lengths as u32 little-endian. [`ChannelKey`] still seals v1 bodies
//! for older readers; [`open_message`] reads them as [`Author::Unsigned`].

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use argon2::{Algorithm, Argon2, Params, Version};

mod body;
mod direct;
mod kdf;
mod record;
mod replay;

pub use body::{
    bound_channel, is_encrypted_format, open_message, open_related, seal_v2, seal_v2_related,
    session_of, sign_plain, sign_plain_related, Author, ChannelHistory, Content, Keys, Marker,
    Opened, UnreadableReason, BODY_BYTES_MAX, FORMAT_ENCRYPTED_V2, FORMAT_SIGNED_V2,
    PADDED_LEN_MAX, PAD_BUCKETS, SESSION_LEN, SIGNATURE_LEN, TAG_LEN, TEXT_BYTES_MAX_ENCRYPTED,
    TEXT_BYTES_MAX_SIGNED,
};
pub use direct::{create_direct, direct_members, open_direct, DirectError, DIRECT_RECORD_VERSION};
pub use kdf::Argon2Params;
pub(crate) use kdf::{argon2id, hkdf_sha256, put_field, Bounds};
pub use record::{
    ChannelKeyV2, ChannelRecord, KEY_CHECK_LEN, RECORD_LEN_V2, RECORD_VERSION_V2, SALT_LEN,
};
pub use replay::{ReplayGuard, Seen};

/// Format byte of a plaintext body.
pub const FORMAT_PLAINTEXT: u8 = 0x00;
/// Format byte of an AES-256-GCM body.
pub const FORMAT_AES_GCM_V1: u8 = 0x01;
/// Nonce length of AES-GCM, in bytes (96 bits).
pub const NONCE_LEN: usize = 12;
/// Argon2id memory cost of v1, in KiB.
pub const ARGON2_MEMORY_KIB: u32 = 19_456;
/// Argon2id passes of v1.
pub const ARGON2_PASSES: u32 = 2;
/// Argon2id lanes of v1.
pub const ARGON2_LANES: u32 = 1;

const AD_DOMAIN: &[u8] = b"cellchat-body-v1";
const SALT_PREFIX: &[u8] = b"cellchat/v1/";

/// Why a key could not be derived or unlocked, or a body could not be sealed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// The passphrase is empty.
    #[error("empty passphrase: type at least one character")]
    EmptyPassphrase,
    /// Argon2 refused its inputs (should not happen with parameters within bounds).
    #[error("key derivation failed: {0}")]
    Derive(String),
    /// AES-GCM refused to encrypt (only for absurdly long bodies).
    #[error("encryption failed")]
    Seal,
    /// The passphrase does not match the channel's record (or the record belongs to another
    /// channel or cluster).
    #[error("wrong passphrase for this channel: check it with whoever set it")]
    WrongPassphrase,
    /// The channel's crypto record cannot be used.
    #[error("unusable channel crypto record: {0}")]
    BadRecord(RecordError),
    /// The text does not fit in one body.
    #[error("message is {len} bytes, over the limit of {max}: shorten it or split it")]
    TooLong {
        /// Bytes of UTF-8 text.
        len: usize,
        /// The most this format holds.
        max: usize,
    },
    /// A direct conversation's record could not be made or did not check.
    #[error("{0}")]
    Direct(DirectError),
    /// The key given belongs to another channel or cluster.
    #[error("the key given is for channel {channel:?} of cluster {cluster:?}")]
    KeyMismatch {
        /// The key's cluster.
        cluster: String,
        /// The key's channel.
        channel: String,
    },
}

/// Why a channel crypto record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The record has the wrong length for its version.
    #[error("record is {len} bytes, a v2 record is {expected}")]
    Length {
        /// Its length.
        len: usize,
        /// The length of its version.
        expected: usize,
    },
    /// A version this build does not know.
    #[error("record version {found} is unknown to this build (it reads version 2): upgrade")]
    Version {
        /// The version byte.
        found: u8,
    },
    /// Argon2id parameters out of the v2 bounds.
    #[error("argon2id parameters refused: {0}")]
    Params(ParamsError),
}

/// Which bound Argon2id parameters break (see [`Argon2Params::check_v2`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParamsError {
    /// Memory outside `min..=max` KiB.
    #[error("memory {found} KiB outside {min}..={max} KiB")]
    Memory {
        /// Memory asked for, KiB.
        found: u32,
        /// Smallest accepted, KiB.
        min: u32,
        /// Largest accepted, KiB.
        max: u32,
    },
    /// Passes outside `1..=max`.
    #[error("{found} passes outside 1..={max}")]
    Passes {
        /// Passes asked for.
        found: u32,
        /// Most accepted.
        max: u32,
    },
    /// Lanes outside `1..=max`.
    #[error("{found} lanes outside 1..={max}")]
    Lanes {
        /// Lanes asked for.
        found: u32,
        /// Most accepted.
        max: u32,
    },
    /// Memory × passes below the minimum cost.
    #[error("memory x passes is {found} KiB, below the minimum of {min} KiB")]
    Cost {
        /// Memory × passes, KiB.
        found: u64,
        /// Smallest accepted, KiB.
        min: u64,
    },
}

/// An AES-256-GCM key for one channel of one cluster. The key bytes are not printable.
#[derive(Clone)]
pub struct ChannelKey {
    cipher: Aes256Gcm,
    channel: String,
}

impl std::fmt::Debug for ChannelKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelKey")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

impl ChannelKey {
    /// Derives the key of `channel` in `cluster` from `passphrase` with Argon2id (parameters in
    /// the module doc). Takes a few hundred ms in release builds, on purpose.
    ///
    /// # Errors
    ///
    /// [`CryptoError::EmptyPassphrase`] for an empty passphrase.
    pub fn derive(passphrase: &str, cluster: &str, channel: &str) -> Result<Self, CryptoError> {
        let params = Params::new(ARGON2_MEMORY_KIB, ARGON2_PASSES, ARGON2_LANES, Some(32))
            .map_err(|e| CryptoError::Derive(e.to_string()))?;
        Self::derive_with(params, passphrase, cluster, channel)
    }

    fn derive_with(
        params: Params,
        passphrase: &str,
        cluster: &str,
        channel: &str,
    ) -> Result<Self, CryptoError> {
        if passphrase.is_empty() {
            return Err(CryptoError::EmptyPassphrase);
        }
        let mut salt = SALT_PREFIX.to_vec();
        salt.extend_from_slice(cluster.as_bytes());
        salt.push(b'/');
        salt.extend_from_slice(channel.as_bytes());
        let mut key = [0u8; 32];
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password_into(passphrase.as_bytes(), &salt, &mut key)
            .map_err(|e| CryptoError::Derive(e.to_string()))?;
        let cipher = Aes256Gcm::new_from_slice(&key).expect("an AES-256 key is 32 bytes");
        Ok(Self {
            cipher,
            channel: channel.to_owned(),
        })
    }

    /// The channel this key belongs to.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Encrypts `text` as a [`FORMAT_AES_GCM_V1`] body with a fresh random nonce, bound to the
    /// key's channel, `sender` and `client_seq`.
    ///
    /// # Errors
    ///
    /// [`CryptoError::Seal`] if AES-GCM refuses (bodies over 64 GiB).
    pub fn seal(&self, sender: &str, client_seq: u64, text: &str) -> Result<Vec<u8>, CryptoError> {
        // 96 random bits from the thread CSPRNG (ChaCha, seeded and reseeded from the OS): the
        // chance of a repeat stays negligible for far more messages than one key will see.
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let ad = associated_data(&self.channel, sender, client_seq);
        let sealed = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce_bytes),
                Payload {
                    msg: text.as_bytes(),
                    aad: &ad,
                },
            )
            .map_err(|_| CryptoError::Seal)?;
        let mut body = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        body.push(FORMAT_AES_GCM_V1);
        body.extend_from_slice(&nonce_bytes);
        body.extend_from_slice(&sealed);
        Ok(body)
    }

    /// Decrypts an [`FORMAT_AES_GCM_V1`] body; `None` when the key, channel, sender or seq does
    /// not match, or the body was changed.
    pub fn open(&self, sender: &str, client_seq: u64, body: &[u8]) -> Option<String> {
        let rest = body.strip_prefix(&[FORMAT_AES_GCM_V1])?;
        if rest.len() < NONCE_LEN {
            return None;
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let ad = associated_data(&self.channel, sender, client_seq);
        let plain = self
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: &ad,
                },
            )
            .ok()?;
        String::from_utf8(plain).ok()
    }
}

fn associated_data(channel: &str, sender: &str, client_seq: u64) -> Vec<u8> {
    let mut ad = AD_DOMAIN.to_vec();
    for part in [channel, sender] {
        let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
        ad.extend_from_slice(&len.to_le_bytes());
        ad.extend_from_slice(part.as_bytes());
    }
    ad.extend_from_slice(&client_seq.to_le_bytes());
    ad
}

/// A plaintext body: [`FORMAT_PLAINTEXT`] then the UTF-8 text.
pub fn plain_body(text: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(1 + text.len());
    body.push(FORMAT_PLAINTEXT);
    body.extend_from_slice(text.as_bytes());
    body
}

/// What a reader can show of a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Text {
    /// Plaintext, or ciphertext that decrypted.
    Clear(String),
    /// Encrypted and the reader has no key for the channel.
    NoKey,
    /// Encrypted and decryption failed: wrong key, or the body, channel, sender or seq changed.
    WrongKey,
    /// A format this build does not understand (or plaintext that is not UTF-8).
    Unreadable,
}

impl Text {
    /// The line to show: the text, or `[encrypted]`, `[encrypted: wrong key?]`,
    /// `[unreadable message]`.
    pub fn display(&self) -> &str {
        match self {
            Text::Clear(text) => text,
            Text::NoKey => "[encrypted]",
            Text::WrongKey => "[encrypted: wrong key?]",
            Text::Unreadable => "[unreadable message]",
        }
    }
}

/// Reads a message body of `channel` from `sender`: plaintext is returned as is, ciphertext is
/// decrypted with `key` when there is one for this channel.
pub fn open_body(
    key: Option<&ChannelKey>,
    channel: &str,
    sender: &str,
    client_seq: u64,
    body: &[u8],
) -> Text {
    match body.first() {
        Some(&FORMAT_PLAINTEXT) => match std::str::from_utf8(&body[1..]) {
            Ok(text) => Text::Clear(text.to_owned()),
            Err(_) => Text::Unreadable,
        },
        Some(&FORMAT_AES_GCM_V1) => match key.filter(|k| k.channel() == channel) {
            None => Text::NoKey,
            Some(key) => key
                .open(sender, client_seq, body)
                .map_or(Text::WrongKey, Text::Clear),
        },
        _ => Text::Unreadable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small Argon2 parameters keep unit tests fast in debug builds; `real_parameters_work`
    /// covers the real ones once.
    fn key(passphrase: &str, channel: &str) -> ChannelKey {
        let params = Params::new(64, 1, 1, Some(32)).expect("params");
        ChannelKey::derive_with(params, passphrase, "c1", channel).expect("derive")
    }

    #[test]
    fn round_trip() {
        let k = key("open sesame", "general");
        let body = k.seal("alice", 7, "Hello world!").expect("seal");
        assert_eq!(body[0], FORMAT_AES_GCM_V1);
        assert_eq!(k.open("alice", 7, &body).as_deref(), Some("Hello world!"));
        assert_eq!(
            open_body(Some(&k), "general", "alice", 7, &body),
            Text::Clear("Hello world!".into())
        );
    }

    #[test]
    fn real_parameters_work() {
        let k = ChannelKey::derive("pw", "c1", "general").expect("derive");
        let body = k.seal("a", 1, "x").expect("seal");
        assert_eq!(k.open("a", 1, &body).as_deref(), Some("x"));
    }

    #[test]
    fn wrong_passphrase_fails() {
        let body = key("right", "general")
            .seal("alice", 1, "secret")
            .expect("seal");
        let wrong = key("wrong", "general");
        assert_eq!(wrong.open("alice", 1, &body), None);
        assert_eq!(
            open_body(Some(&wrong), "general", "alice", 1, &body).display(),
            "[encrypted: wrong key?]"
        );
    }

    #[test]
    fn changed_sender_channel_or_seq_fails() {
        let k = key("pw", "general");
        let body = k.seal("alice", 5, "secret").expect("seal");
        assert_eq!(k.open("mallory", 5, &body), None, "sender is bound");
        assert_eq!(k.open("alice", 6, &body), None, "client seq is bound");
        // Same passphrase on another channel: another salt and other associated data.
        assert_eq!(key("pw", "random").open("alice", 5, &body), None);
    }

    #[test]
    fn tampered_body_fails() {
        let k = key("pw", "general");
        let body = k.seal("alice", 1, "secret").expect("seal");
        for at in 1..body.len() {
            let mut bad = body.clone();
            bad[at] ^= 0x01;
            assert_eq!(k.open("alice", 1, &bad), None, "flip at {at}");
        }
        assert_eq!(k.open("alice", 1, &body[..body.len() - 1]), None);
        assert_eq!(k.open("alice", 1, &body[..5]), None);
    }

    #[test]
    fn nonces_differ_between_two_encryptions() {
        let k = key("pw", "general");
        let a = k.seal("alice", 1, "same text").expect("seal");
        let b = k.seal("alice", 1, "same text").expect("seal");
        assert_ne!(a[1..1 + NONCE_LEN], b[1..1 + NONCE_LEN]);
        assert_ne!(a, b);
    }

    #[test]
    fn readers_without_a_key_see_a_placeholder() {
        let body = key("pw", "general")
            .seal("alice", 1, "secret")
            .expect("seal");
        assert_eq!(open_body(None, "general", "alice", 1, &body), Text::NoKey);
        assert_eq!(Text::NoKey.display(), "[encrypted]");
        // A key of another channel is not used.
        let other = key("pw", "random");
        assert_eq!(
            open_body(Some(&other), "general", "alice", 1, &body),
            Text::NoKey
        );
    }

    #[test]
    fn plaintext_and_unknown_formats() {
        let body = plain_body("hi");
        assert_eq!(
            open_body(None, "general", "a", 1, &body),
            Text::Clear("hi".into())
        );
        assert_eq!(
            open_body(None, "general", "a", 1, &[0x00, 0xff]),
            Text::Unreadable
        );
        assert_eq!(
            open_body(None, "general", "a", 1, &[0x07, 1]),
            Text::Unreadable
        );
        assert_eq!(open_body(None, "general", "a", 1, &[]), Text::Unreadable);
    }

    /// A body sealed by the v1 code as it was before format v2 existed (commit 677c9b1), with
    /// the real Argon2id parameters: v1 bodies already in clusters must keep opening.
    #[test]
    fn v1_fixed_vector_still_opens() {
        let k = ChannelKey::derive("correct horse battery staple", "cellchat", "general")
            .expect("derive");
        let body = hex::decode(
            "0110457d4b77d6e31b2cf042e848cd27a79bfac190494b53339f9bec3a4e80559c81ac43cab36d37e7\
             8534ee8a",
        )
        .expect("hex");
        assert_eq!(
            k.open("alice", 42, &body).as_deref(),
            Some("Hello, v1 world!")
        );
        assert_eq!(k.open("alice", 43, &body), None);
    }

    #[test]
    fn empty_passphrase_is_refused() {
        assert_eq!(
            ChannelKey::derive("", "c1", "general").expect_err("empty"),
            CryptoError::EmptyPassphrase
        );
    }
}
