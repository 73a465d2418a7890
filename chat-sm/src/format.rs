//! The only file that knows the byte layout of RocksDB keys and values and of snapshot files.
//!
//! # RocksDB keys and values
//!
//! Every value starts with [`VALUE_VERSION`]; integers in keys are big-endian so that key order
//! is numeric order. Channel names never contain byte 0 (see [`crate::ChannelName`]), so the
//! messages of one channel form one contiguous key range. The `b'd'` (dedup) keys are kept in
//! the column family `dedup`, all others in `default`; "key order" means the order of all keys
//! together.
//!
//! | key                                   | value after the version byte                                    |
//! | ------------------------------------- | --------------------------------------------------------------- |
//! | `b'M'` `"applied_index"`              | log index, u64 BE                                               |
//! | `b'M'` `"last_applied"`               | opaque bytes from the adapter                                   |
//! | `b'M'` `"membership"`                 | opaque bytes from the adapter                                   |
//! | `b'M'` `"join_secret"`                | the cluster's join secret, once one was set                      |
//! | `b'M'` `"dedup_format"`               | u64 BE: the dedup layout: 3 (with expiry index), 2 (without), absent (client id alone) |
//! | `b'M'` `"clock"`                      | u64 BE: the latest `at_ms` of an applied `Expire`               |
//! | `b'M'` `"retention_default"`          | postcard of [`crate::Retention`]                                |
//!
//! A dedup id is the first 16 bytes of SHA-256 over `"cellchat dedup v2\0"`, the sender's
//! length (one byte), the sender and the client id (`dedup.rs`).
//! | `b'd'` dedup_id(16) client_seq(u64 BE) | seq u64 BE, at_ms u64 BE, channel bytes (rest)                 |
//! | `b'e'` at_ms(u64 BE) dedup_id(16) client_seq(u64 BE) | nothing: the expiry index of the dedup records   |
//! | `b'f'` dedup_id(16)                   | u64 BE: the client's dedup floor (highest client seq expired)   |
//! | `b'h'` channel                        | head seq u64 BE                                                 |
//! | `b'm'` channel `0x00` seq(u64 BE)     | at_ms u64 BE, client_id(16), client_seq u64 BE, sender_len u8, sender, body (rest) |
//! | `b'm'` (same key), version byte 2     | as version 1, with meta_len u32 BE and postcard of [`crate::MessageMeta`] between sender and body |
//!
//! A message value has version 2 only when its meta is not plain (it carries a relation, or
//! a relation changed it); plain messages keep version 1, so older values stay as they are.
//! | `b'u'` name                           | public key (32)                                                 |
//! | `b'c'` channel                        | postcard of [`crate::ChannelRecord`]                            |
//! | `b'l'` channel                        | u64 BE: the channel's floor, its lowest stored seq (absent: 1)  |
//! | `b'r'` channel                        | postcard of the channel's own [`crate::Retention`]              |
//! | `b't'` channel                        | the channel's topic, UTF-8                                      |
//! | `b'k'` user `0x00` channel            | u64 BE: the highest seq `user` has read in `channel`            |
//!
//! # Snapshot file
//!
//! All integers little-endian. Checksums are CRC-32/IEEE (`crc32fast`).
//!
//! | part    | field        | width | meaning                                                     |
//! | ------- | ------------ | ----- | ----------------------------------------------------------- |
//! | header  | magic        | 8     | [`SNAPSHOT_MAGIC`] `"CCSMSNAP"`                              |
//! | header  | version      | 1     | [`SNAPSHOT_VERSION`]                                        |
//! | record  | tag          | 1     | [`TAG_RECORD`] `b'R'`                                       |
//! | record  | key_len      | 4     | at most [`SNAPSHOT_KEY_BYTES_MAX`]                          |
//! | record  | value_len    | 4     | at most [`SNAPSHOT_VALUE_BYTES_MAX`]                        |
//! | record  | crc          | 4     | CRC over key_len, value_len, key, value                     |
//! | record  | key, value   | var   | one RocksDB pair, in key order                              |
//! | trailer | tag          | 1     | [`TAG_TRAILER`] `b'T'`                                      |
//! | trailer | record_count | 8     | number of records                                           |
//! | trailer | file_crc     | 4     | CRC over every byte of the file before this field           |
//!
//! The file ends right after `file_crc`; extra bytes make it invalid.

use crate::Error;

/// Version byte in front of every RocksDB value.
pub(crate) const VALUE_VERSION: u8 = 1;

/// Version byte of a message value that carries a [`crate::MessageMeta`].
pub(crate) const MESSAGE_META_VERSION: u8 = 2;

/// Largest encoded meta a message value may carry (checked when decoding).
const META_BYTES_MAX: usize = 1 << 20;

pub(crate) const PREFIX_META: u8 = b'M';
pub(crate) const PREFIX_DEDUP: u8 = b'd';
/// Length of the part of a dedup key that names its client: the prefix byte and the client
/// id. The dedup column family hashes its memtable on it.
pub(crate) const DEDUP_CLIENT_PREFIX_LEN: usize = 17;
pub(crate) const PREFIX_HEAD: u8 = b'h';
pub(crate) const PREFIX_MESSAGE: u8 = b'm';
pub(crate) const PREFIX_USER: u8 = b'u';
pub(crate) const PREFIX_CHANNEL: u8 = b'c';
pub(crate) const PREFIX_EXPIRY: u8 = b'e';
pub(crate) const PREFIX_DEDUP_FLOOR: u8 = b'f';
pub(crate) const PREFIX_FLOOR: u8 = b'l';
pub(crate) const PREFIX_RETENTION: u8 = b'r';
pub(crate) const PREFIX_TOPIC: u8 = b't';
pub(crate) const PREFIX_READ_MARK: u8 = b'k';
/// Length of an expiry index key: prefix, at_ms, dedup id, client seq.
pub(crate) const EXPIRY_KEY_LEN: usize = 33;

pub(crate) const META_APPLIED_INDEX: &[u8] = b"Mapplied_index";
pub(crate) const META_LAST_APPLIED: &[u8] = b"Mlast_applied";
pub(crate) const META_MEMBERSHIP: &[u8] = b"Mmembership";
pub(crate) const META_JOIN_SECRET: &[u8] = b"Mjoin_secret";
pub(crate) const META_DEDUP_FORMAT: &[u8] = b"Mdedup_format";
pub(crate) const META_CLOCK: &[u8] = b"Mclock";
pub(crate) const META_RETENTION_DEFAULT: &[u8] = b"Mretention_default";

/// Snapshot file magic number.
pub(crate) const SNAPSHOT_MAGIC: &[u8; 8] = b"CCSMSNAP";
/// Snapshot file format version.
pub(crate) const SNAPSHOT_VERSION: u8 = 1;
pub(crate) const SNAPSHOT_HEADER_LEN: usize = 9;
pub(crate) const TAG_RECORD: u8 = b'R';
pub(crate) const TAG_TRAILER: u8 = b'T';
/// Record header after the tag: key_len, value_len, crc.
pub(crate) const RECORD_HEADER_LEN: usize = 12;
/// Trailer after the tag: record_count, file_crc.
pub(crate) const TRAILER_LEN: usize = 12;
/// Largest key a snapshot reader accepts; checked before allocating.
pub(crate) const SNAPSHOT_KEY_BYTES_MAX: u32 = 1024;
/// Largest value a snapshot reader accepts; checked before allocating (16 MiB).
pub(crate) const SNAPSHOT_VALUE_BYTES_MAX: u32 = 16 << 20;

/// Fills `out` with the message key of (`channel`, `seq`).
pub(crate) fn message_key(out: &mut Vec<u8>, channel: &str, seq: u64) {
    out.clear();
    out.push(PREFIX_MESSAGE);
    out.extend_from_slice(channel.as_bytes());
    out.push(0);
    out.extend_from_slice(&seq.to_be_bytes());
}

/// The first key past every message of `channel`.
pub(crate) fn message_key_end(channel: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(channel.len() + 2);
    out.push(PREFIX_MESSAGE);
    out.extend_from_slice(channel.as_bytes());
    out.push(1);
    out
}

/// Splits a message key into (channel, seq).
pub(crate) fn parse_message_key(key: &[u8]) -> Result<(&str, u64), Error> {
    let corrupt = || corrupt_key(key, "bad message key");
    let rest = key.strip_prefix(&[PREFIX_MESSAGE]).ok_or_else(corrupt)?;
    if rest.len() < 9 || rest[rest.len() - 9] != 0 {
        return Err(corrupt());
    }
    let (channel, seq) = rest.split_at(rest.len() - 9);
    let channel = std::str::from_utf8(channel).map_err(|_| corrupt())?;
    let seq = u64::from_be_bytes(seq[1..].try_into().expect("8 bytes by construction"));
    Ok((channel, seq))
}

/// Fills `out` with the head key of `channel`.
pub(crate) fn head_key(out: &mut Vec<u8>, channel: &str) {
    out.clear();
    out.push(PREFIX_HEAD);
    out.extend_from_slice(channel.as_bytes());
}

/// Fills `out` with the dedup key of (`dedup_id`, `client_seq`).
pub(crate) fn dedup_key(out: &mut Vec<u8>, dedup_id: &[u8; 16], client_seq: u64) {
    out.clear();
    out.push(PREFIX_DEDUP);
    out.extend_from_slice(dedup_id);
    out.extend_from_slice(&client_seq.to_be_bytes());
}

/// Fills `out` with the expiry index key of a dedup record stamped `at_ms`.
pub(crate) fn expiry_key(out: &mut Vec<u8>, at_ms: u64, dedup_id: &[u8; 16], client_seq: u64) {
    out.clear();
    out.push(PREFIX_EXPIRY);
    out.extend_from_slice(&at_ms.to_be_bytes());
    out.extend_from_slice(dedup_id);
    out.extend_from_slice(&client_seq.to_be_bytes());
}

/// Splits an expiry index key into (at_ms, dedup id, client seq).
pub(crate) fn parse_expiry_key(key: &[u8]) -> Result<(u64, [u8; 16], u64), Error> {
    if key.len() != EXPIRY_KEY_LEN || key[0] != PREFIX_EXPIRY {
        return Err(corrupt_key(key, "bad expiry key"));
    }
    let at_ms = be_u64(&key[1..9]);
    let id = key[9..25].try_into().expect("16 bytes by the length check");
    Ok((at_ms, id, be_u64(&key[25..33])))
}

/// Fills `out` with the dedup floor key of a client.
pub(crate) fn dedup_floor_key(out: &mut Vec<u8>, dedup_id: &[u8; 16]) {
    out.clear();
    out.push(PREFIX_DEDUP_FLOOR);
    out.extend_from_slice(dedup_id);
}

/// Fills `out` with `prefix` followed by `channel`: the floor and retention keys.
pub(crate) fn channel_prefixed_key(out: &mut Vec<u8>, prefix: u8, channel: &str) {
    out.clear();
    out.push(prefix);
    out.extend_from_slice(channel.as_bytes());
}

/// Encodes a retention policy.
pub(crate) fn encode_retention_value(retention: &crate::Retention) -> Vec<u8> {
    postcard::to_extend(retention, vec![VALUE_VERSION])
        .expect("postcard serialization into a Vec cannot fail")
}

/// Parses a retention policy.
pub(crate) fn decode_retention_value(value: &[u8]) -> Result<crate::Retention, Error> {
    let rest = strip_version(value, "retention")?;
    let corrupt = |reason: String| Error::Corrupt {
        what: "retention",
        reason,
    };
    let (retention, tail) = postcard::take_from_bytes(rest).map_err(|e| corrupt(e.to_string()))?;
    if !tail.is_empty() {
        return Err(corrupt(format!("{} trailing bytes", tail.len())));
    }
    Ok(retention)
}

/// Fills `out` with the user key of `name`.
pub(crate) fn user_key(out: &mut Vec<u8>, name: &str) {
    out.clear();
    out.push(PREFIX_USER);
    out.extend_from_slice(name.as_bytes());
}

/// Fills `out` with the read marker key of (`user`, `channel`). User names never contain
/// byte 0, so one user's markers form one contiguous key range in channel name order.
pub(crate) fn read_mark_key(out: &mut Vec<u8>, user: &str, channel: &str) {
    out.clear();
    out.push(PREFIX_READ_MARK);
    out.extend_from_slice(user.as_bytes());
    out.push(0);
    out.extend_from_slice(channel.as_bytes());
}

/// Splits a read marker key into (user, channel).
pub(crate) fn parse_read_mark_key(key: &[u8]) -> Result<(&str, &str), Error> {
    let corrupt = || Error::Corrupt {
        what: "read marker key",
        reason: format!("bad key of {} bytes", key.len()),
    };
    let rest = key.strip_prefix(&[PREFIX_READ_MARK]).ok_or_else(corrupt)?;
    let nul = rest.iter().position(|&b| b == 0).ok_or_else(corrupt)?;
    let user = std::str::from_utf8(&rest[..nul]).map_err(|_| corrupt())?;
    let channel = std::str::from_utf8(&rest[nul + 1..]).map_err(|_| corrupt())?;
    Ok((user, channel))
}

/// Fills `out` with the record key of `channel`.
pub(crate) fn channel_key(out: &mut Vec<u8>, channel: &str) {
    out.clear();
    out.push(PREFIX_CHANNEL);
    out.extend_from_slice(channel.as_bytes());
}

/// Encodes a channel record.
pub(crate) fn encode_channel_value(record: &crate::ChannelRecord) -> Vec<u8> {
    postcard::to_extend(record, vec![VALUE_VERSION])
        .expect("postcard serialization into a Vec cannot fail")
}

/// Parses a channel record.
pub(crate) fn decode_channel_value(value: &[u8]) -> Result<crate::ChannelRecord, Error> {
    let rest = strip_version(value, "channel")?;
    let corrupt = |reason: String| Error::Corrupt {
        what: "channel",
        reason,
    };
    let (record, tail) = postcard::take_from_bytes(rest).map_err(|e| corrupt(e.to_string()))?;
    if !tail.is_empty() {
        return Err(corrupt(format!("{} trailing bytes", tail.len())));
    }
    Ok(record)
}

/// The fields of a message value.
pub(crate) struct MessageValue<'a> {
    pub(crate) at_ms: u64,
    pub(crate) client_id: [u8; 16],
    pub(crate) client_seq: u64,
    pub(crate) sender: &'a str,
    pub(crate) body: &'a [u8],
    pub(crate) meta: std::borrow::Cow<'a, crate::MessageMeta>,
}

/// Fills `out` with a message value. The sender is at most 32 bytes, validated before.
pub(crate) fn encode_message_value(out: &mut Vec<u8>, v: &MessageValue<'_>) {
    let sender_len = u8::try_from(v.sender.len()).expect("sender validated to <= 32 bytes");
    out.clear();
    let plain = v.meta.is_plain();
    out.push(if plain {
        VALUE_VERSION
    } else {
        MESSAGE_META_VERSION
    });
    out.extend_from_slice(&v.at_ms.to_be_bytes());
    out.extend_from_slice(&v.client_id);
    out.extend_from_slice(&v.client_seq.to_be_bytes());
    out.push(sender_len);
    out.extend_from_slice(v.sender.as_bytes());
    if !plain {
        let len_at = out.len();
        out.extend_from_slice(&[0; 4]);
        let mut bytes = postcard::to_extend(&*v.meta, std::mem::take(out))
            .expect("postcard serialization into a Vec cannot fail");
        let len = u32::try_from(bytes.len() - len_at - 4).expect("meta is bounded");
        bytes[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
        *out = bytes;
    }
    out.extend_from_slice(v.body);
}

/// Parses a message value (version 1, or 2 with a meta).
pub(crate) fn decode_message_value(value: &[u8]) -> Result<MessageValue<'_>, Error> {
    let corrupt = || Error::Corrupt {
        what: "message",
        reason: "short value".into(),
    };
    let (with_meta, rest) = match value.split_first() {
        Some((&MESSAGE_META_VERSION, rest)) => (true, rest),
        _ => (false, strip_version(value, "message")?),
    };
    if rest.len() < 33 {
        return Err(corrupt());
    }
    let at_ms = be_u64(&rest[0..8]);
    let client_id: [u8; 16] = rest[8..24].try_into().expect("16 bytes");
    let client_seq = be_u64(&rest[24..32]);
    let sender_len = usize::from(rest[32]);
    let rest = &rest[33..];
    if rest.len() < sender_len {
        return Err(corrupt());
    }
    let (sender, mut body) = rest.split_at(sender_len);
    let sender = std::str::from_utf8(sender).map_err(|_| Error::Corrupt {
        what: "message",
        reason: "sender is not utf-8".into(),
    })?;
    let mut meta = crate::MessageMeta::default();
    if with_meta {
        if body.len() < 4 {
            return Err(corrupt());
        }
        let len = be_u32(&body[..4]) as usize;
        if len > META_BYTES_MAX || body.len() - 4 < len {
            return Err(corrupt());
        }
        meta = postcard::from_bytes(&body[4..4 + len]).map_err(|e| Error::Corrupt {
            what: "message meta",
            reason: e.to_string(),
        })?;
        body = &body[4 + len..];
    }
    Ok(MessageValue {
        at_ms,
        client_id,
        client_seq,
        sender,
        body,
        meta: std::borrow::Cow::Owned(meta),
    })
}

fn be_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes.try_into().expect("caller passes 4 bytes"))
}

/// Fills `out` with a dedup value.
pub(crate) fn encode_dedup_value(out: &mut Vec<u8>, seq: u64, at_ms: u64, channel: &str) {
    out.clear();
    out.push(VALUE_VERSION);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&at_ms.to_be_bytes());
    out.extend_from_slice(channel.as_bytes());
}

/// Parses a dedup value into (seq, at_ms, channel).
pub(crate) fn decode_dedup_value(value: &[u8]) -> Result<(u64, u64, &str), Error> {
    let rest = strip_version(value, "dedup")?;
    if rest.len() < 16 {
        return Err(Error::Corrupt {
            what: "dedup",
            reason: "short value".into(),
        });
    }
    let channel = std::str::from_utf8(&rest[16..]).map_err(|_| Error::Corrupt {
        what: "dedup",
        reason: "channel is not utf-8".into(),
    })?;
    Ok((be_u64(&rest[0..8]), be_u64(&rest[8..16]), channel))
}

/// Encodes a u64 value (heads, applied index).
pub(crate) fn encode_u64_value(v: u64) -> [u8; 9] {
    let mut out = [0; 9];
    out[0] = VALUE_VERSION;
    out[1..].copy_from_slice(&v.to_be_bytes());
    out
}

/// Parses a u64 value.
pub(crate) fn decode_u64_value(value: &[u8], what: &'static str) -> Result<u64, Error> {
    let rest = strip_version(value, what)?;
    let bytes: [u8; 8] = rest.try_into().map_err(|_| Error::Corrupt {
        what,
        reason: format!("expected 8 bytes, found {}", rest.len()),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

/// Encodes opaque bytes (meta, user keys).
pub(crate) fn encode_bytes_value(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() + 1);
    out.push(VALUE_VERSION);
    out.extend_from_slice(v);
    out
}

/// Parses opaque bytes.
pub(crate) fn decode_bytes_value<'a>(
    value: &'a [u8],
    what: &'static str,
) -> Result<&'a [u8], Error> {
    strip_version(value, what)
}

/// Parses a user value into its public key.
pub(crate) fn decode_user_value(value: &[u8]) -> Result<[u8; 32], Error> {
    let rest = strip_version(value, "user")?;
    rest.try_into().map_err(|_| Error::Corrupt {
        what: "user",
        reason: format!("expected 32 bytes, found {}", rest.len()),
    })
}

fn strip_version<'a>(value: &'a [u8], what: &'static str) -> Result<&'a [u8], Error> {
    match value.split_first() {
        Some((&VALUE_VERSION, rest)) => Ok(rest),
        Some((&found, _)) => Err(Error::UnsupportedVersion { what, found }),
        None => Err(Error::Corrupt {
            what,
            reason: "empty value".into(),
        }),
    }
}

fn be_u64(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes.try_into().expect("caller passes 8 bytes"))
}

fn corrupt_key(key: &[u8], reason: &str) -> Error {
    Error::Corrupt {
        what: "key",
        reason: format!("{reason}: {}", hex(key)),
    }
}

/// Lowercase hex, for dumps and error messages.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        write!(out, "{b:02x}").expect("writing to a String cannot fail");
    }
    out
}

/// Whether `key` is one a snapshot may carry.
pub(crate) fn is_known_key(key: &[u8]) -> bool {
    matches!(
        key.first(),
        Some(
            &(PREFIX_META
                | PREFIX_DEDUP
                | PREFIX_HEAD
                | PREFIX_MESSAGE
                | PREFIX_USER
                | PREFIX_CHANNEL
                | PREFIX_EXPIRY
                | PREFIX_DEDUP_FLOOR
                | PREFIX_FLOOR
                | PREFIX_RETENTION
                | PREFIX_TOPIC
                | PREFIX_READ_MARK)
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_keys_sort_by_channel_then_seq() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        message_key(&mut a, "ab", u64::MAX);
        message_key(&mut b, "ab-c", 1);
        assert!(a < b);
        assert!(b"mab\x01".as_slice() > a.as_slice());
        assert_eq!(message_key_end("ab"), b"mab\x01");
        message_key(&mut b, "ab", 2);
        let mut c = Vec::new();
        message_key(&mut c, "ab", 256);
        assert!(b < c);
        assert_eq!(parse_message_key(&c).expect("valid"), ("ab", 256));
        assert!(parse_message_key(b"mab").is_err());
    }

    #[test]
    fn message_value_round_trip() {
        let v = MessageValue {
            at_ms: 17,
            client_id: [3; 16],
            client_seq: 9,
            sender: "Alice",
            body: b"hello",
            meta: std::borrow::Cow::Owned(crate::MessageMeta::default()),
        };
        let mut out = Vec::new();
        encode_message_value(&mut out, &v);
        let back = decode_message_value(&out).expect("valid");
        assert_eq!(
            (
                back.at_ms,
                back.client_id,
                back.client_seq,
                back.sender,
                back.body
            ),
            (17, [3; 16], 9, "Alice", b"hello".as_slice())
        );
        for cut in 0..34 {
            assert!(decode_message_value(&out[..cut]).is_err());
        }
        out[0] = 9;
        assert!(matches!(
            decode_message_value(&out),
            Err(Error::UnsupportedVersion { found: 9, .. })
        ));
    }

    #[test]
    fn message_value_with_meta_round_trip() {
        let mut meta = crate::MessageMeta {
            relation: Some(crate::Relation::React {
                to: crate::ChannelSeq(3),
                emoji: "👍".into(),
                on: true,
            }),
            ..crate::MessageMeta::default()
        };
        meta.edits.push(crate::ChannelSeq(9));
        let v = MessageValue {
            at_ms: 17,
            client_id: [3; 16],
            client_seq: 9,
            sender: "Bob",
            body: b"",
            meta: std::borrow::Cow::Borrowed(&meta),
        };
        let mut out = Vec::new();
        encode_message_value(&mut out, &v);
        assert_eq!(out[0], MESSAGE_META_VERSION);
        let back = decode_message_value(&out).expect("valid");
        assert_eq!(
            (back.sender, back.body, &*back.meta),
            ("Bob", &b""[..], &meta)
        );
        for cut in 0..out.len() - 1 {
            assert!(decode_message_value(&out[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn dedup_and_u64_values_round_trip() {
        let mut out = Vec::new();
        encode_dedup_value(&mut out, 5, 6, "general");
        assert_eq!(decode_dedup_value(&out).expect("valid"), (5, 6, "general"));
        assert_eq!(
            decode_u64_value(&encode_u64_value(42), "head").expect("valid"),
            42
        );
        assert!(decode_u64_value(&[VALUE_VERSION, 1], "head").is_err());
        assert!(decode_user_value(&encode_bytes_value(&[1; 31])).is_err());
    }
}
