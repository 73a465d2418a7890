//! The crypto record of a direct conversation: a fresh random channel key wrapped to each
//! member's registered identity key, so members need no shared passphrase, and signed by its
//! creator, so a node cannot swap in a key it knows. Byte layout (integers little-endian):
//!
//! | part | width | field |
//! |---|---|---|
//! | header | 1 | version, [`DIRECT_RECORD_VERSION`] (`0x03`) |
//! | | 1 | member count `n`, 2 ..= [`proto::DIRECT_MEMBERS_MAX`] |
//! | | 1 | the creator's index among the members |
//! | | n × (1 + len) | each member name, length-prefixed, sorted, distinct |
//! | | 32 | ephemeral X25519 public key `E` |
//! | wraps | n × 48 | the 32-byte channel secret sealed to each member (AES-256-GCM, tag 16) |
//! | | 64 | the creator's Ed25519 signature |
//!
//! - Member `i`'s X25519 key is their Ed25519 identity key mapped to Montgomery form (the
//!   secret side: the clamped scalar Ed25519 signs with), so the keys users registered to log
//!   in are the keys a conversation is encrypted to.
//! - Wrap `i` is sealed under `HKDF-SHA256(X25519(e, member_i), "cellchat direct wrap v1" ||
//!   E || identity_i || i)` with an all-zero nonce (each wrap key is used once, as `e` is
//!   fresh) and associated data `f(cluster) || f(channel) || header`.
//! - The signature covers `"cellchat-direct-record-v1" || f(cluster) || f(channel) || header
//!   || wraps` and is checked with `verify_strict` under the key the reader pinned for the
//!   creator.
//! - The channel's message key is `HKDF-SHA256(secret, "cellchat direct message key v1")`;
//!   bodies then use format v2 exactly as a passphrase channel does.
//!
//! A reader also checks that the channel is named [`proto::direct_channel_name`] of the
//! members, so the member list a node shows cannot differ from the one the creator signed.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use curve25519_dalek::montgomery::MontgomeryPoint;
use ed25519_dalek::{Signature, VerifyingKey};

use super::kdf::{hkdf_sha256, put_field};
use super::record::ChannelKeyV2;
use crate::identity::Identity;

/// Version byte of a direct conversation's crypto record.
pub const DIRECT_RECORD_VERSION: u8 = 0x03;

const WRAP_LEN: usize = 32 + 16;
const SIGNATURE_LEN: usize = 64;
const SIGNATURE_DOMAIN: &[u8] = b"cellchat-direct-record-v1";
const INFO_WRAP: &[u8] = b"cellchat direct wrap v1";
const INFO_MESSAGE_KEY: &[u8] = b"cellchat direct message key v1";

/// Why a direct conversation's record was refused or could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectError {
    /// The bytes do not parse as a direct record of this version.
    #[error("the direct conversation's record is malformed ({0})")]
    Malformed(&'static str),
    /// The record's members are not the ones the channel is named after.
    #[error("the direct conversation's record names other members than its channel name")]
    WrongMembers,
    /// The reader is not among the members.
    #[error("you are not a member of this direct conversation")]
    NotAMember,
    /// The creator's signature does not verify under the key pinned for them.
    #[error("the direct conversation's record is not signed by {creator}'s pinned key")]
    BadSignature {
        /// The member who claims to have made it.
        creator: String,
    },
    /// A member's registered key is not a usable Ed25519 key.
    #[error("{member}'s registered key cannot receive a direct conversation key")]
    BadMemberKey {
        /// The member.
        member: String,
    },
    /// This member's wrap does not open with their key.
    #[error("the direct conversation's key was not sealed to your identity key")]
    Unwrap,
}

/// A parsed direct record; the wraps stay bytes until a member opens theirs.
struct Parsed<'a> {
    members: Vec<String>,
    creator: usize,
    header: &'a [u8],
    ephemeral: [u8; 32],
    wraps: &'a [u8],
    signed: &'a [u8],
    signature: [u8; SIGNATURE_LEN],
}

/// The members a direct record names, sorted, without checking anything else: enough for a
/// list to show who a conversation is with.
///
/// # Errors
///
/// [`DirectError::Malformed`] for bytes that do not parse.
pub fn direct_members(record: &[u8]) -> Result<Vec<String>, DirectError> {
    parse(record).map(|p| p.members)
}

fn parse(bytes: &[u8]) -> Result<Parsed<'_>, DirectError> {
    let bad = DirectError::Malformed;
    let [version, count, creator, rest @ ..] = bytes else {
        return Err(bad("too short"));
    };
    if *version != DIRECT_RECORD_VERSION {
        return Err(bad("unknown version"));
    }
    let (count, creator) = (usize::from(*count), usize::from(*creator));
    if !(2..=proto::DIRECT_MEMBERS_MAX).contains(&count) || creator >= count {
        return Err(bad("member count"));
    }
    let mut at = 0;
    let mut members: Vec<String> = Vec::with_capacity(count);
    for _ in 0..count {
        let len = usize::from(*rest.get(at).ok_or(bad("truncated names"))?);
        let name = rest
            .get(at + 1..at + 1 + len)
            .ok_or(bad("truncated names"))?;
        let name = std::str::from_utf8(name).map_err(|_| bad("a name is not UTF-8"))?;
        if !proto::valid_user_name(name) {
            return Err(bad("a name is not a user name"));
        }
        if members.last().is_some_and(|last| last.as_str() >= name) {
            return Err(bad("names not sorted and distinct"));
        }
        members.push(name.to_owned());
        at += 1 + len;
    }
    let header_len = 3 + at + 32;
    let wraps_end = header_len + count * WRAP_LEN;
    if bytes.len() != wraps_end + SIGNATURE_LEN {
        return Err(bad("length"));
    }
    Ok(Parsed {
        members,
        creator,
        header: &bytes[..header_len],
        ephemeral: bytes[header_len - 32..header_len]
            .try_into()
            .expect("32 bytes"),
        wraps: &bytes[header_len..wraps_end],
        signed: &bytes[..wraps_end],
        signature: bytes[wraps_end..].try_into().expect("64 bytes"),
    })
}

fn signed_message(cluster: &str, channel: &str, signed: &[u8]) -> Vec<u8> {
    let mut message = SIGNATURE_DOMAIN.to_vec();
    put_field(&mut message, cluster.as_bytes());
    put_field(&mut message, channel.as_bytes());
    message.extend_from_slice(signed);
    message
}

fn wrap_aad(cluster: &str, channel: &str, header: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + 64);
    put_field(&mut aad, cluster.as_bytes());
    put_field(&mut aad, channel.as_bytes());
    aad.extend_from_slice(header);
    aad
}

fn wrap_key(
    shared: &[u8; 32],
    ephemeral: &[u8; 32],
    identity: &[u8; 32],
    index: usize,
) -> Aes256Gcm {
    let mut info = INFO_WRAP.to_vec();
    info.extend_from_slice(ephemeral);
    info.extend_from_slice(identity);
    info.push(u8::try_from(index).expect("at most 8 members"));
    Aes256Gcm::new_from_slice(&hkdf_sha256(shared, &info)).expect("a 32-byte key")
}

/// The Montgomery form of an Ed25519 public key; `None` for a key that is not a point or has
/// small order (a DH with it would leak nothing secret but also protect nothing).
fn montgomery(identity: &[u8; 32]) -> Option<MontgomeryPoint> {
    let key = VerifyingKey::from_bytes(identity).ok()?;
    (!key.is_weak()).then(|| key.to_montgomery())
}

fn message_key(secret: &[u8; 32], cluster: &str, channel: &str) -> ChannelKeyV2 {
    ChannelKeyV2::from_message_key(&hkdf_sha256(secret, INFO_MESSAGE_KEY), cluster, channel)
}

/// Makes the record of the direct conversation `channel` of `cluster` between `members`
/// (name and registered Ed25519 key each; `creator` among them), with a fresh channel secret.
/// Returns the channel key and the record bytes.
///
/// # Errors
///
/// [`DirectError::WrongMembers`] when `channel` is not named after the members or `creator`
/// is not one of them; [`DirectError::Malformed`] for a member count out of bounds or a name
/// that is not a user name; [`DirectError::BadMemberKey`] for a key that is not a usable
/// Ed25519 public key.
pub fn create_direct(
    creator: &Identity,
    cluster: &str,
    channel: &str,
    members: &[(String, [u8; 32])],
) -> Result<(ChannelKeyV2, Vec<u8>), DirectError> {
    let mut members = members.to_vec();
    members.sort_by(|a, b| a.0.cmp(&b.0));
    members.dedup_by(|a, b| a.0 == b.0);
    if !(2..=proto::DIRECT_MEMBERS_MAX).contains(&members.len()) {
        return Err(DirectError::Malformed("member count"));
    }
    if members
        .iter()
        .any(|(name, _)| !proto::valid_user_name(name))
    {
        return Err(DirectError::Malformed("a name is not a user name"));
    }
    let names: Vec<&str> = members.iter().map(|(name, _)| name.as_str()).collect();
    let Some(creator_index) = names.iter().position(|&n| n == creator.name()) else {
        return Err(DirectError::WrongMembers);
    };
    if proto::direct_channel_name(&names) != channel {
        return Err(DirectError::WrongMembers);
    }
    let points = (members.iter())
        .map(|(name, key)| {
            montgomery(key).ok_or_else(|| DirectError::BadMemberKey {
                member: name.clone(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // A fresh ephemeral key per record: every wrap key is then used for one seal only.
    let ephemeral_secret: [u8; 32] = rand::random();
    let ephemeral = MontgomeryPoint::mul_base_clamped(ephemeral_secret).to_bytes();
    let secret: [u8; 32] = rand::random();
    let mut record = vec![
        DIRECT_RECORD_VERSION,
        u8::try_from(members.len()).expect("at most 8"),
        u8::try_from(creator_index).expect("at most 8"),
    ];
    for name in &names {
        record.push(u8::try_from(name.len()).expect("a user name is at most 32 bytes"));
        record.extend_from_slice(name.as_bytes());
    }
    record.extend_from_slice(&ephemeral);
    let aad = wrap_aad(cluster, channel, &record);
    for (index, ((_, identity), point)) in members.iter().zip(&points).enumerate() {
        let shared = point.mul_clamped(ephemeral_secret).to_bytes();
        let sealed = wrap_key(&shared, &ephemeral, identity, index)
            .encrypt(
                Nonce::from_slice(&[0; 12]),
                Payload {
                    msg: &secret,
                    aad: &aad,
                },
            )
            .expect("sealing 32 bytes cannot fail");
        record.extend_from_slice(&sealed);
    }
    let signature = creator.sign(&signed_message(cluster, channel, &record));
    record.extend_from_slice(&signature);
    Ok((message_key(&secret, cluster, channel), record))
}

/// Opens the record of the direct conversation `channel` of `cluster` as `reader`: checks the
/// members against the channel name and the creator's signature under `creator_key` (the key
/// the reader pinned for that member, looked up by name), then unseals the reader's wrap.
///
/// # Errors
///
/// [`DirectError::Malformed`], [`DirectError::WrongMembers`], [`DirectError::NotAMember`],
/// [`DirectError::BadSignature`] (also when no key is known for the creator),
/// [`DirectError::Unwrap`].
pub fn open_direct(
    reader: &Identity,
    cluster: &str,
    channel: &str,
    record: &[u8],
    creator_key: impl FnOnce(&str) -> Option<[u8; 32]>,
) -> Result<ChannelKeyV2, DirectError> {
    let parsed = parse(record)?;
    if proto::direct_channel_name(&parsed.members) != channel {
        return Err(DirectError::WrongMembers);
    }
    let index = (parsed.members.iter())
        .position(|m| m == reader.name())
        .ok_or(DirectError::NotAMember)?;
    let creator = &parsed.members[parsed.creator];
    let bad_signature = || DirectError::BadSignature {
        creator: creator.clone(),
    };
    let key = creator_key(creator)
        .and_then(|k| VerifyingKey::from_bytes(&k).ok())
        .ok_or_else(bad_signature)?;
    key.verify_strict(
        &signed_message(cluster, channel, parsed.signed),
        &Signature::from_bytes(&parsed.signature),
    )
    .map_err(|_| bad_signature())?;
    let shared = reader.x25519(&parsed.ephemeral);
    if shared == [0; 32] {
        return Err(DirectError::Unwrap);
    }
    let wrap = &parsed.wraps[index * WRAP_LEN..(index + 1) * WRAP_LEN];
    let secret = wrap_key(&shared, &parsed.ephemeral, &reader.public_key(), index)
        .decrypt(
            Nonce::from_slice(&[0; 12]),
            Payload {
                msg: wrap,
                aad: &wrap_aad(cluster, channel, parsed.header),
            },
        )
        .map_err(|_| DirectError::Unwrap)?;
    let secret: [u8; 32] = secret.try_into().map_err(|_| DirectError::Unwrap)?;
    Ok(message_key(&secret, cluster, channel))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::body::{open_message, seal_v2, Content, Keys};

    fn people(names: &[&str]) -> Vec<Identity> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| Identity::ephemeral(*n, Some([i as u8 + 1; 32])))
            .collect()
    }

    fn keys_of(ids: &[Identity]) -> Vec<(String, [u8; 32])> {
        ids.iter()
            .map(|i| (i.name().to_owned(), i.public_key()))
            .collect()
    }

    fn lookup(ids: &[Identity]) -> impl Fn(&str) -> Option<[u8; 32]> + '_ {
        |name| {
            ids.iter()
                .find(|i| i.name() == name)
                .map(Identity::public_key)
        }
    }

    #[test]
    fn every_member_opens_the_same_key_and_nobody_else_does() {
        let ids = people(&["carol", "alice", "bob"]);
        let channel = proto::direct_channel_name(&["alice", "bob", "carol"]);
        let (key, record) = create_direct(&ids[1], "c1", &channel, &keys_of(&ids)).unwrap();
        assert_eq!(direct_members(&record).unwrap(), ["alice", "bob", "carol"]);
        let body = seal_v2(&key, &ids[1], "c1", &channel, [1; 16], 1, "hello").unwrap();
        for reader in &ids {
            let opened = open_direct(reader, "c1", &channel, &record, lookup(&ids)).unwrap();
            let keys = Keys {
                v2: Some(opened),
                v1: None,
            };
            let shown = open_message(
                &keys,
                "c1",
                &channel,
                "alice",
                1,
                Some(ids[1].public_key()),
                &body,
            );
            assert_eq!(
                shown.content(),
                &Content::Clear("hello".into()),
                "{}",
                reader.name()
            );
        }
        let mallory = Identity::ephemeral("mallory", Some([9; 32]));
        assert_eq!(
            open_direct(&mallory, "c1", &channel, &record, lookup(&ids)).unwrap_err(),
            DirectError::NotAMember
        );
        // Another cluster or channel: the name check, then the signature, refuse it.
        assert!(open_direct(&ids[0], "c2", &channel, &record, lookup(&ids)).is_err());
        let other = proto::direct_channel_name(&["alice", "bob"]);
        assert_eq!(
            open_direct(&ids[0], "c1", &other, &record, lookup(&ids)).unwrap_err(),
            DirectError::WrongMembers
        );
    }

    #[test]
    fn a_node_cannot_swap_the_record_or_a_byte_of_it() {
        let ids = people(&["alice", "bob"]);
        let channel = proto::direct_channel_name(&["alice", "bob"]);
        let (_, record) = create_direct(&ids[0], "c1", &channel, &keys_of(&ids)).unwrap();
        // A record the node made itself, claiming alice made it, signed by another key.
        let forger = Identity::ephemeral("alice", Some([42; 32]));
        let forged_ids = [forger, ids[1].clone()];
        let (_, forged) =
            create_direct(&forged_ids[0], "c1", &channel, &keys_of(&forged_ids)).unwrap();
        assert_eq!(
            open_direct(&ids[1], "c1", &channel, &forged, lookup(&ids)).unwrap_err(),
            DirectError::BadSignature {
                creator: "alice".into()
            }
        );
        for at in 0..record.len() {
            let mut flipped = record.clone();
            flipped[at] ^= 0x01;
            assert!(
                open_direct(&ids[1], "c1", &channel, &flipped, lookup(&ids)).is_err(),
                "a flip at byte {at} went unnoticed"
            );
        }
        assert!(open_direct(
            &ids[1],
            "c1",
            &channel,
            &record[..record.len() - 1],
            lookup(&ids)
        )
        .is_err());
        assert!(open_direct(&ids[1], "c1", &channel, &[], lookup(&ids)).is_err());
        assert_eq!(
            open_direct(&ids[1], "c1", &channel, &record, |_| None).unwrap_err(),
            DirectError::BadSignature {
                creator: "alice".into()
            },
            "an unknown creator key is not trusted"
        );
    }

    #[test]
    fn creation_refuses_wrong_shapes() {
        let ids = people(&["alice", "bob"]);
        let keys = keys_of(&ids);
        let channel = proto::direct_channel_name(&["alice", "bob"]);
        assert_eq!(
            create_direct(&ids[0], "c1", "dm-other", &keys).unwrap_err(),
            DirectError::WrongMembers
        );
        let carol = Identity::ephemeral("carol", None);
        assert_eq!(
            create_direct(&carol, "c1", &channel, &keys).unwrap_err(),
            DirectError::WrongMembers
        );
        assert_eq!(
            create_direct(&ids[0], "c1", &channel, &keys[..1]).unwrap_err(),
            DirectError::Malformed("member count")
        );
        let mut weak = keys.clone();
        weak[1].1 = [0; 32];
        weak[1].1[0] = 1; // the identity point: small order
        assert_eq!(
            create_direct(&ids[0], "c1", &channel, &weak).unwrap_err(),
            DirectError::BadMemberKey {
                member: "bob".into()
            }
        );
        let nine: Vec<(String, [u8; 32])> = (0..9)
            .map(|i| (format!("u{i}"), ids[0].public_key()))
            .collect();
        let names: Vec<&str> = nine.iter().map(|(n, _)| n.as_str()).collect();
        let u0 = Identity::ephemeral("u0", None);
        assert_eq!(
            create_direct(&u0, "c1", &proto::direct_channel_name(&names), &nine).unwrap_err(),
            DirectError::Malformed("member count")
        );
    }

    #[test]
    fn the_largest_record_fits_the_state_machine_limit() {
        let names: Vec<String> = (0..proto::DIRECT_MEMBERS_MAX)
            .map(|i| format!("{i}{}", "x".repeat(31)))
            .collect();
        let ids: Vec<Identity> = names
            .iter()
            .enumerate()
            .map(|(i, n)| Identity::ephemeral(n.clone(), Some([i as u8 + 1; 32])))
            .collect();
        let channel = proto::direct_channel_name(&names);
        let (_, record) = create_direct(&ids[0], "c1", &channel, &keys_of(&ids)).unwrap();
        assert!(record.len() <= 2048, "{} bytes", record.len());
    }
}
