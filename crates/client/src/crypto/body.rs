//! Message bodies of format v2: signed plaintext (`0x02`) and signed, padded AES-256-GCM
//! (`0x03`); and [`open_message`], the one reader entry point for every format. The byte
//! layouts are in the [`crypto`](super) module doc.

use std::borrow::Cow;

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::Nonce;
use ed25519_dalek::{Signature, VerifyingKey};

use super::kdf::put_field;
use super::replay::Seen;
use super::{
    open_body, ChannelKey, ChannelKeyV2, CryptoError, Text, FORMAT_AES_GCM_V1, FORMAT_PLAINTEXT,
    NONCE_LEN,
};
use crate::identity::Identity;
use proto::Relation;

/// Format byte of a signed plaintext v2 body.
pub const FORMAT_SIGNED_V2: u8 = 0x02;
/// Format byte of a signed, encrypted v2 body.
pub const FORMAT_ENCRYPTED_V2: u8 = 0x03;
/// Largest body the cluster accepts, in bytes (16 KiB; `chat_sm::command::MAX_BODY_BYTES`).
pub const BODY_BYTES_MAX: usize = 16 * 1024;
/// Length of the session tag in a v2 body, in bytes.
pub const SESSION_LEN: usize = 16;
/// Length of an Ed25519 signature, in bytes.
pub const SIGNATURE_LEN: usize = 64;
/// Length of an AES-GCM tag, in bytes.
pub const TAG_LEN: usize = 16;
/// Largest padded plaintext of a `0x03` body: what is left of [`BODY_BYTES_MAX`] after the
/// format byte, session, nonce, tag and signature (16 275 bytes).
pub const PADDED_LEN_MAX: usize =
    BODY_BYTES_MAX - (1 + SESSION_LEN + NONCE_LEN + TAG_LEN + SIGNATURE_LEN);
/// The sizes a `0x03` plaintext is padded to: the smallest that holds the 2-byte length and
/// the text. Readers refuse any other size.
pub const PAD_BUCKETS: [usize; 9] = [64, 128, 256, 512, 1024, 2048, 4096, 8192, PADDED_LEN_MAX];
/// Longest text of a `0x03` body, in bytes of UTF-8 (16 273).
pub const TEXT_BYTES_MAX_ENCRYPTED: usize = PADDED_LEN_MAX - 2;
/// Longest text of a `0x02` body, in bytes of UTF-8 (16 303).
pub const TEXT_BYTES_MAX_SIGNED: usize = BODY_BYTES_MAX - (1 + SESSION_LEN + SIGNATURE_LEN);

const SESSION_DOMAIN: &[u8] = b"cellchat session v2";
const AD_DOMAIN_V2: &[u8] = b"cellchat-body-v2";
const SIGNATURE_DOMAIN: &[u8] = b"cellchat-signature-v2";
/// Shortest `0x02` body: format byte, session, empty text, signature.
const SIGNED_LEN_MIN: usize = 1 + SESSION_LEN + SIGNATURE_LEN;
/// Shortest `0x03` body that can hold a signature and an AES-GCM tag. (Real ones are longer:
/// the smallest padded plaintext is 64 bytes.)
const ENCRYPTED_LEN_MIN: usize = 1 + SESSION_LEN + NONCE_LEN + TAG_LEN + SIGNATURE_LEN;

/// The session tag of a client id: `SHA-256("cellchat session v2" || client_id)[..16]`. It
/// ties a body to the sending client's session without telling other readers the client id
/// (servers know the client id anyway).
pub fn session_of(client_id: [u8; 16]) -> [u8; SESSION_LEN] {
    let mut input = SESSION_DOMAIN.to_vec();
    input.extend_from_slice(&client_id);
    let digest = ring::digest::digest(&ring::digest::SHA256, &input);
    digest.as_ref()[..SESSION_LEN]
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

/// Whether a body whose first byte is `format` is encrypted (`0x01` or `0x03`): a client that
/// has seen one in a channel knows the channel has encrypted history and marks plaintext lines
/// there ([`ChannelHistory::Encrypted`]).
pub fn is_encrypted_format(format: u8) -> bool {
    matches!(format, FORMAT_AES_GCM_V1 | FORMAT_ENCRYPTED_V2)
}

/// A signed, encrypted `0x03` body of `text` from `id` (its name is the sender) for `channel`
/// of `cluster`, with a fresh random nonce and the text padded to a size bucket.
///
/// `client_id` and `client_seq` are the values the send carries; the body binds the session
/// tag of `client_id` ([`session_of`]) and `client_seq`, so a server cannot replay the body
/// under another seq, channel, cluster or sender.
///
/// # Errors
///
/// [`CryptoError::TooLong`] for text over [`TEXT_BYTES_MAX_ENCRYPTED`] bytes,
/// [`CryptoError::KeyMismatch`] when `key` belongs to another channel or cluster.
pub fn seal_v2(
    key: &ChannelKeyV2,
    id: &Identity,
    cluster: &str,
    channel: &str,
    client_id: [u8; 16],
    client_seq: u64,
    text: &str,
) -> Result<Vec<u8>, CryptoError> {
    seal_v2_related(key, id, cluster, channel, None, client_id, client_seq, text)
}

/// [`seal_v2`] of a message carrying `relation` (a reply, edit, delete or reaction): the
/// associated data and the signature bind the relation too ([`bound_channel`]).
///
/// # Errors
///
/// As [`seal_v2`].
#[allow(clippy::too_many_arguments)]
pub fn seal_v2_related(
    key: &ChannelKeyV2,
    id: &Identity,
    cluster: &str,
    channel: &str,
    relation: Option<&Relation>,
    client_id: [u8; 16],
    client_seq: u64,
    text: &str,
) -> Result<Vec<u8>, CryptoError> {
    if !key.is_for(cluster, channel) {
        return Err(CryptoError::KeyMismatch {
            cluster: key.cluster().to_owned(),
            channel: key.channel().to_owned(),
        });
    }
    let padded = pad(text)?;
    let bound = bound_channel(channel, relation);
    seal_padded(key, id, cluster, &bound, client_id, client_seq, &padded)
}

/// The channel as a v2 body binds it: the channel's name, then, for a message carrying a
/// relation, a NUL byte (never part of a channel name) and the relation in words, e.g.
/// `general\0edit 5` or `general\0react 5 + 👍`. So a node can neither move a signed edit,
/// delete or reaction to another message, nor turn one kind into another, nor strip or add
/// a relation, without breaking the signature.
pub fn bound_channel<'a>(channel: &'a str, relation: Option<&Relation>) -> Cow<'a, str> {
    match relation {
        None => Cow::Borrowed(channel),
        Some(Relation::Reply { to }) => Cow::Owned(format!("{channel}\0reply {to}")),
        Some(Relation::Edit { of }) => Cow::Owned(format!("{channel}\0edit {of}")),
        Some(Relation::Delete { of }) => Cow::Owned(format!("{channel}\0delete {of}")),
        Some(Relation::React { to, emoji, on }) => {
            let sign = if *on { '+' } else { '-' };
            Cow::Owned(format!("{channel}\0react {to} {sign} {emoji}"))
        }
    }
}

/// [`seal_v2`] of an already padded plaintext (tests seal malformed padding with it).
fn seal_padded(
    key: &ChannelKeyV2,
    id: &Identity,
    cluster: &str,
    channel: &str,
    client_id: [u8; 16],
    client_seq: u64,
    padded: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let session = session_of(client_id);
    // 96 random bits per message from the thread CSPRNG: a repeat stays negligible well past
    // 2^32 messages under one key, far more than a channel sees.
    let nonce: [u8; NONCE_LEN] = rand::random();
    let ad = associated_data_v2(cluster, channel, id.name(), &session, client_seq);
    let sealed = key
        .cipher()
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: padded,
                aad: &ad,
            },
        )
        .map_err(|_| CryptoError::Seal)?;
    let mut body = Vec::with_capacity(1 + SESSION_LEN + NONCE_LEN + sealed.len() + SIGNATURE_LEN);
    body.push(FORMAT_ENCRYPTED_V2);
    body.extend_from_slice(&session);
    body.extend_from_slice(&nonce);
    body.extend_from_slice(&sealed);
    append_signature(&mut body, id, cluster, channel, &session, client_seq);
    assert!(
        body.len() <= BODY_BYTES_MAX,
        "padding keeps bodies in bounds"
    );
    Ok(body)
}

/// A signed plaintext `0x02` body of `text` from `id` for `channel` of `cluster` (see
/// [`seal_v2`] for `client_id` and `client_seq`). Anyone can read it; nobody without `id`'s
/// key can forge or alter it unnoticed.
///
/// # Errors
///
/// [`CryptoError::TooLong`] for text over [`TEXT_BYTES_MAX_SIGNED`] bytes.
pub fn sign_plain(
    id: &Identity,
    cluster: &str,
    channel: &str,
    client_id: [u8; 16],
    client_seq: u64,
    text: &str,
) -> Result<Vec<u8>, CryptoError> {
    sign_plain_related(id, cluster, channel, None, client_id, client_seq, text)
}

/// [`sign_plain`] of a message carrying `relation`; the signature binds it
/// ([`bound_channel`]).
///
/// # Errors
///
/// As [`sign_plain`].
pub fn sign_plain_related(
    id: &Identity,
    cluster: &str,
    channel: &str,
    relation: Option<&Relation>,
    client_id: [u8; 16],
    client_seq: u64,
    text: &str,
) -> Result<Vec<u8>, CryptoError> {
    let channel = &*bound_channel(channel, relation);
    if text.len() > TEXT_BYTES_MAX_SIGNED {
        return Err(CryptoError::TooLong {
            len: text.len(),
            max: TEXT_BYTES_MAX_SIGNED,
        });
    }
    let session = session_of(client_id);
    let mut body = Vec::with_capacity(SIGNED_LEN_MIN + text.len());
    body.push(FORMAT_SIGNED_V2);
    body.extend_from_slice(&session);
    body.extend_from_slice(text.as_bytes());
    append_signature(&mut body, id, cluster, channel, &session, client_seq);
    Ok(body)
}

/// `len16 (u16 LE) || text || zeros`, as long as the smallest bucket that holds it.
fn pad(text: &str) -> Result<Vec<u8>, CryptoError> {
    let Some(&bucket) = PAD_BUCKETS.iter().find(|&&size| size >= 2 + text.len()) else {
        return Err(CryptoError::TooLong {
            len: text.len(),
            max: TEXT_BYTES_MAX_ENCRYPTED,
        });
    };
    let len = u16::try_from(text.len()).expect("every bucket is below 65 536 bytes");
    let mut padded = Vec::with_capacity(bucket + TAG_LEN);
    padded.extend_from_slice(&len.to_le_bytes());
    padded.extend_from_slice(text.as_bytes());
    padded.resize(bucket, 0);
    Ok(padded)
}

/// The inverse of [`pad`]: the size must be a bucket, the length must fit, the rest must be
/// zeros, the text must be UTF-8.
fn unpad(padded: &[u8]) -> Result<String, UnreadableReason> {
    if !PAD_BUCKETS.contains(&padded.len()) {
        return Err(UnreadableReason::BadPadding);
    }
    let len = usize::from(u16::from_le_bytes([padded[0], padded[1]]));
    let text = padded.get(2..2 + len).ok_or(UnreadableReason::BadPadding)?;
    if padded[2 + len..].iter().any(|&b| b != 0) {
        return Err(UnreadableReason::BadPadding);
    }
    String::from_utf8(text.to_vec()).map_err(|_| UnreadableReason::NotUtf8)
}

fn associated_data_v2(
    cluster: &str,
    channel: &str,
    sender: &str,
    session: &[u8; SESSION_LEN],
    client_seq: u64,
) -> Vec<u8> {
    let mut ad = AD_DOMAIN_V2.to_vec();
    put_field(&mut ad, cluster.as_bytes());
    put_field(&mut ad, channel.as_bytes());
    put_field(&mut ad, sender.as_bytes());
    ad.extend_from_slice(session);
    ad.extend_from_slice(&client_seq.to_le_bytes());
    ad
}

/// What the signature covers: the context the body cannot carry itself, then the body so far.
fn signed_message(
    cluster: &str,
    channel: &str,
    sender: &str,
    session: &[u8; SESSION_LEN],
    client_seq: u64,
    signed_body: &[u8],
) -> Vec<u8> {
    let mut message = SIGNATURE_DOMAIN.to_vec();
    put_field(&mut message, cluster.as_bytes());
    put_field(&mut message, channel.as_bytes());
    put_field(&mut message, sender.as_bytes());
    message.extend_from_slice(session);
    message.extend_from_slice(&client_seq.to_le_bytes());
    put_field(&mut message, signed_body);
    message
}

fn append_signature(
    body: &mut Vec<u8>,
    id: &Identity,
    cluster: &str,
    channel: &str,
    session: &[u8; SESSION_LEN],
    client_seq: u64,
) {
    let message = signed_message(cluster, channel, id.name(), session, client_seq, body);
    body.extend_from_slice(&id.sign(&message));
}

/// The keys a reader holds for one channel: the v2 key unlocked from the channel's record,
/// and a v1 key for older messages. A key of another channel (or cluster) is not used.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    /// Opens `0x03` bodies.
    pub v2: Option<ChannelKeyV2>,
    /// Opens `0x01` bodies.
    pub v1: Option<ChannelKey>,
}

/// Why a body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnreadableReason {
    /// The body is empty.
    Empty,
    /// The body is shorter than its format's fixed fields.
    TooShort,
    /// The text is not UTF-8.
    NotUtf8,
    /// The decrypted plaintext has a size that is not a bucket, a length that does not fit,
    /// or non-zero padding.
    BadPadding,
}

/// What a reader can show of a body's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// The text: plaintext, or ciphertext that decrypted. Check [`Opened::author`] (or use
    /// [`Opened::display`]) before trusting who wrote it.
    Clear(String),
    /// Encrypted, and the reader holds no key for this channel and format.
    NoKey,
    /// Encrypted, and decryption failed: another key, or the body or its context changed.
    WrongKey,
    /// The format is known but the body is malformed.
    Unreadable(UnreadableReason),
    /// A format byte this build does not know.
    UnknownVersion(u8),
}

impl Content {
    /// The text, or a placeholder: `[encrypted]`, `[encrypted: wrong key?]`,
    /// `[unreadable message]`, `[unknown format 0xNN]`.
    pub fn display(&self) -> Cow<'_, str> {
        match self {
            Content::Clear(text) => Cow::Borrowed(text),
            Content::NoKey => Cow::Borrowed("[encrypted]"),
            Content::WrongKey => Cow::Borrowed("[encrypted: wrong key?]"),
            Content::Unreadable(_) => Cow::Borrowed("[unreadable message]"),
            Content::UnknownVersion(format) => {
                Cow::Owned(format!("[unknown format {format:#04x}]"))
            }
        }
    }
}

/// Who wrote a body, as far as the reader can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Author {
    /// The signature verifies under the sender's pinned key: the named sender wrote exactly
    /// this body for this cluster, channel, session and client seq.
    Verified,
    /// The body claims a signature that does not verify under the sender's pinned key: forged
    /// or altered (by a server, or by anyone holding the channel key). Never show it as valid.
    BadSignature,
    /// A v2 body, but the reader knows no key for the sender, so nothing was checked.
    UnknownSender,
    /// A v1 format (or a body too short or too unknown to hold a signature): no authorship.
    Unsigned,
}

/// A short mark a client prints before a line, in the order [`Opened::markers`] lists them.
///
/// | marker | printed | when |
/// |---|---|---|
/// | [`Marker::Forged`] | `[forged?]` | the signature does not verify ([`Author::BadSignature`]) |
/// | [`Marker::Replayed`] | `[replayed]` | the same (sender, session, client seq) at another channel seq ([`Seen::Replayed`]) |
/// | [`Marker::Unverified`] | `[unverified]` | readable text, no key known for the sender |
/// | [`Marker::Unsigned`] | `[unsigned]` | readable text of a v1 format |
/// | [`Marker::Plaintext`] | `[plaintext]` | readable plaintext in a channel with encrypted history |
///
/// A verified, encrypted (or verified plaintext in a plain channel) message gets no marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    /// `[forged?]`
    Forged,
    /// `[replayed]`
    Replayed,
    /// `[unverified]`
    Unverified,
    /// `[unsigned]`
    Unsigned,
    /// `[plaintext]`
    Plaintext,
}

impl Marker {
    /// The text printed (see the table on [`Marker`]).
    pub fn as_str(self) -> &'static str {
        match self {
            Marker::Forged => "[forged?]",
            Marker::Replayed => "[replayed]",
            Marker::Unverified => "[unverified]",
            Marker::Unsigned => "[unsigned]",
            Marker::Plaintext => "[plaintext]",
        }
    }
}

/// Whether a channel has encrypted history (a v2 record, or any body for which
/// [`is_encrypted_format`] holds), so plaintext there is marked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelHistory {
    /// No sign of encryption in the channel.
    Plain,
    /// The channel is (or was) encrypted.
    Encrypted,
}

/// What [`open_message`] found in one body.
///
/// Invariant: [`Author::Verified`] only when an Ed25519 signature over the body and its
/// context verified (`verify_strict`) under the key the reader passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    content: Content,
    encrypted: bool,
    author: Author,
    session: Option<[u8; SESSION_LEN]>,
}

impl Opened {
    /// The text or why there is none.
    pub fn content(&self) -> &Content {
        &self.content
    }

    /// Whether the body was of an encrypted format (whether or not it could be decrypted).
    pub fn is_encrypted(&self) -> bool {
        self.encrypted
    }

    /// Who wrote it, as far as the reader can tell.
    pub fn author(&self) -> Author {
        self.author
    }

    /// The session tag of a v2 body; with the sender and client seq it names one send, so a
    /// [`ReplayGuard`](super::ReplayGuard) can spot the same send twice.
    pub fn session(&self) -> Option<[u8; SESSION_LEN]> {
        self.session
    }

    /// The text only when it is readable and its signature verified.
    pub fn verified_text(&self) -> Option<&str> {
        match (&self.content, self.author) {
            (Content::Clear(text), Author::Verified) => Some(text),
            _ => None,
        }
    }

    /// The markers to print before this message (see [`Marker`]); `seen` is what a
    /// [`ReplayGuard`](super::ReplayGuard) said of it ([`Seen::Untracked`] without one).
    pub fn markers(&self, history: ChannelHistory, seen: Seen) -> Vec<Marker> {
        let mut markers = Vec::new();
        if self.author == Author::BadSignature {
            markers.push(Marker::Forged);
        }
        if matches!(seen, Seen::Replayed { .. }) {
            markers.push(Marker::Replayed);
        }
        if let Content::Clear(_) = self.content {
            match self.author {
                Author::UnknownSender => markers.push(Marker::Unverified),
                Author::Unsigned => markers.push(Marker::Unsigned),
                Author::Verified | Author::BadSignature => {}
            }
            if history == ChannelHistory::Encrypted && !self.encrypted {
                markers.push(Marker::Plaintext);
            }
        }
        markers
    }

    /// The line to show: the markers, then the text or its placeholder, e.g.
    /// `[forged?] pay me`, `[unverified] hi`, `[encrypted]`.
    pub fn display(&self, history: ChannelHistory, seen: Seen) -> String {
        let mut line = String::new();
        for marker in self.markers(history, seen) {
            line.push_str(marker.as_str());
            line.push(' ');
        }
        line.push_str(&self.content.display());
        line
    }
}

/// Reads any body of `channel` in `cluster` from `sender` (as the server stamped it) with
/// `client_seq`: checks the signature of v2 bodies under `sender_key` (the key the reader's
/// [`Pins`](crate::pins::Pins) hold for `sender`; `None` when it has none) and decrypts with
/// the matching key in `keys`.
///
/// Never panics on any input. A signature is checked whether or not the reader can decrypt,
/// and a body whose signature fails is [`Author::BadSignature`] whatever its content.
pub fn open_message(
    keys: &Keys,
    cluster: &str,
    channel: &str,
    sender: &str,
    client_seq: u64,
    sender_key: Option<[u8; 32]>,
    body: &[u8],
) -> Opened {
    open_related(
        keys, cluster, channel, None, sender, client_seq, sender_key, body,
    )
}

/// [`open_message`] of a message the node says carries `relation`: a v2 body verifies only
/// if its sender signed that same relation ([`bound_channel`]). v1 bodies carry no relation.
#[allow(clippy::too_many_arguments)]
pub fn open_related(
    keys: &Keys,
    cluster: &str,
    channel: &str,
    relation: Option<&Relation>,
    sender: &str,
    client_seq: u64,
    sender_key: Option<[u8; 32]>,
    body: &[u8],
) -> Opened {
    let unsigned = |content, encrypted| Opened {
        content,
        encrypted,
        author: Author::Unsigned,
        session: None,
    };
    match body.first() {
        None => unsigned(Content::Unreadable(UnreadableReason::Empty), false),
        Some(&FORMAT_PLAINTEXT) | Some(&FORMAT_AES_GCM_V1) => {
            let text = open_body(keys.v1.as_ref(), channel, sender, client_seq, body);
            let content = match text {
                Text::Clear(text) => Content::Clear(text),
                Text::NoKey => Content::NoKey,
                Text::WrongKey => Content::WrongKey,
                Text::Unreadable => Content::Unreadable(UnreadableReason::NotUtf8),
            };
            unsigned(content, body[0] == FORMAT_AES_GCM_V1)
        }
        Some(&FORMAT_SIGNED_V2) | Some(&FORMAT_ENCRYPTED_V2) => {
            let bound = bound_channel(channel, relation);
            let context = Context {
                cluster,
                channel,
                bound: &bound,
                sender,
                client_seq,
            };
            open_v2(keys, &context, sender_key, body)
        }
        Some(&format) => unsigned(Content::UnknownVersion(format), false),
    }
}

/// What a v2 body is bound to besides its own bytes.
struct Context<'a> {
    cluster: &'a str,
    channel: &'a str,
    /// The channel with the relation, as signatures and associated data bind it.
    bound: &'a str,
    sender: &'a str,
    client_seq: u64,
}

fn open_v2(keys: &Keys, cx: &Context<'_>, sender_key: Option<[u8; 32]>, body: &[u8]) -> Opened {
    let encrypted = body[0] == FORMAT_ENCRYPTED_V2;
    let len_min = if encrypted {
        ENCRYPTED_LEN_MIN
    } else {
        SIGNED_LEN_MIN
    };
    if body.len() < len_min {
        return Opened {
            content: Content::Unreadable(UnreadableReason::TooShort),
            encrypted,
            author: Author::Unsigned,
            session: None,
        };
    }
    let (signed, signature) = body.split_at(body.len() - SIGNATURE_LEN);
    let session: [u8; SESSION_LEN] = signed[1..1 + SESSION_LEN]
        .try_into()
        .expect("length checked above");
    let author = match sender_key {
        None => Author::UnknownSender,
        Some(key) => verify(&key, cx, &session, signed, signature),
    };
    let rest = &signed[1 + SESSION_LEN..];
    let content = if encrypted {
        decrypt_v2(keys, cx, &session, rest)
    } else {
        match std::str::from_utf8(rest) {
            Ok(text) => Content::Clear(text.to_owned()),
            Err(_) => Content::Unreadable(UnreadableReason::NotUtf8),
        }
    };
    Opened {
        content,
        encrypted,
        author,
        session: Some(session),
    }
}

fn verify(
    key: &[u8; 32],
    cx: &Context<'_>,
    session: &[u8; SESSION_LEN],
    signed: &[u8],
    signature: &[u8],
) -> Author {
    let Ok(key) = VerifyingKey::from_bytes(key) else {
        return Author::BadSignature;
    };
    let Ok(signature) = Signature::from_slice(signature) else {
        return Author::BadSignature;
    };
    let message = signed_message(
        cx.cluster,
        cx.bound,
        cx.sender,
        session,
        cx.client_seq,
        signed,
    );
    // verify_strict also refuses weak keys and non-canonical signatures, so one message has
    // exactly one valid signature under one key.
    match key.verify_strict(&message, &signature) {
        Ok(()) => Author::Verified,
        Err(_) => Author::BadSignature,
    }
}

/// `rest` is `nonce || ciphertext+tag`.
fn decrypt_v2(keys: &Keys, cx: &Context<'_>, session: &[u8; SESSION_LEN], rest: &[u8]) -> Content {
    let Some(key) = keys
        .v2
        .as_ref()
        .filter(|k| k.is_for(cx.cluster, cx.channel))
    else {
        return Content::NoKey;
    };
    let (nonce, sealed) = rest.split_at(NONCE_LEN);
    let ad = associated_data_v2(cx.cluster, cx.bound, cx.sender, session, cx.client_seq);
    let plain = key.cipher().decrypt(
        Nonce::from_slice(nonce),
        Payload {
            msg: sealed,
            aad: &ad,
        },
    );
    match plain {
        Err(_) => Content::WrongKey,
        Ok(padded) => match unpad(&padded) {
            Ok(text) => Content::Clear(text),
            Err(reason) => Content::Unreadable(reason),
        },
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::record::tests::create_small;
    use super::super::ReplayGuard;
    use super::*;

    const CLIENT_ID: [u8; 16] = [0xA5; 16];

    fn alice() -> Identity {
        Identity::ephemeral("alice", Some([1; 32]))
    }

    #[test]
    fn the_signature_binds_a_relation_so_no_node_can_move_or_change_it() {
        let id = alice();
        let edit = Relation::Edit { of: 5 };
        let react = Relation::React {
            to: 5,
            emoji: "👍".into(),
            on: true,
        };
        for relation in [&edit, &react] {
            let body = sign_plain_related(&id, "c1", "general", Some(relation), CLIENT_ID, 3, "x")
                .expect("sign");
            let author = |r: Option<&Relation>| {
                let key = Some(id.public_key());
                open_related(&Keys::default(), "c1", "general", r, "alice", 3, key, &body).author
            };
            assert_eq!(author(Some(relation)), Author::Verified);
            assert_eq!(author(None), Author::BadSignature);
            assert_eq!(
                author(Some(&Relation::Edit { of: 6 })),
                Author::BadSignature
            );
            assert_eq!(
                author(Some(&Relation::Delete { of: 5 })),
                Author::BadSignature
            );
            let removal = Relation::React {
                to: 5,
                emoji: "👍".into(),
                on: false,
            };
            assert_eq!(author(Some(&removal)), Author::BadSignature);
        }
        // A plain body does not verify as a relation either.
        let plain = sign_plain(&id, "c1", "general", CLIENT_ID, 3, "x").expect("sign");
        let opened = open_related(
            &Keys::default(),
            "c1",
            "general",
            Some(&edit),
            "alice",
            3,
            Some(id.public_key()),
            &plain,
        );
        assert_eq!(opened.author, Author::BadSignature);
    }

    fn keys(key: &ChannelKeyV2) -> Keys {
        Keys {
            v2: Some(key.clone()),
            v1: None,
        }
    }

    /// Opens as a reader of c1/general who pinned `alice`'s key.
    fn open(keys: &Keys, sender: &str, client_seq: u64, body: &[u8]) -> Opened {
        let pinned = Some(alice().public_key());
        open_message(keys, "c1", "general", sender, client_seq, pinned, body)
    }

    #[test]
    fn signed_plaintext_round_trips_and_verifies() {
        let body = sign_plain(&alice(), "c1", "general", CLIENT_ID, 7, "hello").expect("sign");
        assert_eq!(body[0], FORMAT_SIGNED_V2);
        assert_eq!(&body[1..17], &session_of(CLIENT_ID));
        assert_eq!(body.len(), 1 + 16 + 5 + 64);
        let opened = open(&Keys::default(), "alice", 7, &body);
        assert_eq!(opened.verified_text(), Some("hello"));
        assert!(!opened.is_encrypted());
        assert_eq!(opened.session(), Some(session_of(CLIENT_ID)));
        assert_eq!(opened.display(ChannelHistory::Plain, Seen::First), "hello");
        assert_eq!(
            opened.display(ChannelHistory::Encrypted, Seen::First),
            "[plaintext] hello"
        );
    }

    #[test]
    fn sealed_round_trips_verifies_and_pads_to_buckets() {
        let (key, _) = create_small("pw", "general");
        let overhead = 1 + SESSION_LEN + NONCE_LEN + TAG_LEN + SIGNATURE_LEN;
        for (text_len, bucket) in [(0, 64), (62, 64), (63, 128), (8190, 8192), (8191, 16_275)] {
            let text = "x".repeat(text_len);
            let body = seal_v2(&key, &alice(), "c1", "general", CLIENT_ID, 3, &text).expect("seal");
            assert_eq!(body[0], FORMAT_ENCRYPTED_V2);
            assert_eq!(body.len(), overhead + bucket, "text of {text_len}");
            let opened = open(&keys(&key), "alice", 3, &body);
            assert_eq!(opened.verified_text(), Some(text.as_str()));
            assert!(opened.is_encrypted());
            assert!(opened
                .markers(ChannelHistory::Encrypted, Seen::First)
                .is_empty());
        }
    }

    #[test]
    fn longest_texts_fill_a_body_and_one_more_byte_is_refused() {
        let (key, _) = create_small("pw", "general");
        let text = "y".repeat(TEXT_BYTES_MAX_ENCRYPTED);
        let body = seal_v2(&key, &alice(), "c1", "general", CLIENT_ID, 1, &text).expect("seal");
        assert_eq!(body.len(), BODY_BYTES_MAX);
        assert_eq!(
            open(&keys(&key), "alice", 1, &body).verified_text(),
            Some(text.as_str())
        );
        let text = "y".repeat(TEXT_BYTES_MAX_ENCRYPTED + 1);
        assert_eq!(
            seal_v2(&key, &alice(), "c1", "general", CLIENT_ID, 1, &text).expect_err("long"),
            CryptoError::TooLong {
                len: 16_274,
                max: 16_273
            }
        );
        let text = "z".repeat(TEXT_BYTES_MAX_SIGNED);
        let body = sign_plain(&alice(), "c1", "general", CLIENT_ID, 1, &text).expect("sign");
        assert_eq!(body.len(), BODY_BYTES_MAX);
        let text = "z".repeat(TEXT_BYTES_MAX_SIGNED + 1);
        assert!(matches!(
            sign_plain(&alice(), "c1", "general", CLIENT_ID, 1, &text),
            Err(CryptoError::TooLong { max: 16_303, .. })
        ));
    }

    #[test]
    fn every_bound_field_is_checked() {
        let (key, _) = create_small("pw", "general");
        let keys = keys(&key);
        let sealed = seal_v2(&key, &alice(), "c1", "general", CLIENT_ID, 5, "hi").expect("seal");
        let signed = sign_plain(&alice(), "c1", "general", CLIENT_ID, 5, "hi").expect("sign");
        let pinned = Some(alice().public_key());
        for body in [&sealed, &signed] {
            let cases = [
                ("c2", "general", "alice", 5),
                ("c1", "random", "alice", 5),
                ("c1", "general", "bob", 5),
                ("c1", "general", "alice", 6),
            ];
            for (cluster, channel, sender, seq) in cases {
                let opened = open_message(&keys, cluster, channel, sender, seq, pinned, body);
                assert_eq!(
                    opened.author(),
                    Author::BadSignature,
                    "{cluster}/{channel}/{sender}/{seq}"
                );
                assert_eq!(opened.verified_text(), None);
                assert!(opened
                    .display(ChannelHistory::Plain, Seen::First)
                    .starts_with("[forged?]"));
            }
        }
        // Where the reader holds the key, a changed sender or seq also fails AES-GCM.
        let opened = open_message(&keys, "c1", "general", "alice", 6, pinned, &sealed);
        assert_eq!(opened.content(), &Content::WrongKey);
    }

    #[test]
    fn a_channel_member_cannot_write_as_someone_else() {
        let (key, _) = create_small("pw", "general");
        let keys = keys(&key);
        let mallory = Identity::ephemeral("mallory", Some([2; 32]));
        // Mallory's own message, relabelled as alice's by a server.
        let body = seal_v2(&key, &mallory, "c1", "general", CLIENT_ID, 1, "pay me").expect("seal");
        let opened = open(&keys, "alice", 1, &body);
        assert_eq!(opened.author(), Author::BadSignature);
        assert_eq!(opened.content(), &Content::WrongKey);
        // Mallory signing with her key while claiming alice's name.
        let fake = Identity::ephemeral("alice", Some([2; 32]));
        let body = seal_v2(&key, &fake, "c1", "general", CLIENT_ID, 1, "pay me").expect("seal");
        let opened = open(&keys, "alice", 1, &body);
        assert_eq!(opened.author(), Author::BadSignature);
        assert_eq!(
            opened.display(ChannelHistory::Encrypted, Seen::First),
            "[forged?] pay me"
        );
    }

    #[test]
    fn authorship_is_checked_without_the_channel_key() {
        let (key, _) = create_small("pw", "general");
        let body = seal_v2(&key, &alice(), "c1", "general", CLIENT_ID, 1, "hi").expect("seal");
        let opened = open(&Keys::default(), "alice", 1, &body);
        assert_eq!(opened.content(), &Content::NoKey);
        assert_eq!(opened.author(), Author::Verified);
        assert_eq!(
            opened.display(ChannelHistory::Encrypted, Seen::First),
            "[encrypted]"
        );
        // A key of another channel is not used.
        let (other, _) = create_small("pw", "random");
        let opened = open(&self::keys(&other), "alice", 1, &body);
        assert_eq!(opened.content(), &Content::NoKey);
        // A key of this channel from another passphrase.
        let (wrong, _) = create_small("other", "general");
        let opened = open(&self::keys(&wrong), "alice", 1, &body);
        assert_eq!(opened.content(), &Content::WrongKey);
        assert_eq!(
            opened.display(ChannelHistory::Encrypted, Seen::First),
            "[encrypted: wrong key?]"
        );
    }

    #[test]
    fn sealing_with_another_channels_key_is_refused() {
        let (key, _) = create_small("pw", "random");
        assert_eq!(
            seal_v2(&key, &alice(), "c1", "general", CLIENT_ID, 1, "hi").expect_err("mismatch"),
            CryptoError::KeyMismatch {
                cluster: "c1".into(),
                channel: "random".into()
            }
        );
    }

    #[test]
    fn unknown_sender_is_shown_unverified() {
        let body = sign_plain(&alice(), "c1", "general", CLIENT_ID, 1, "hi").expect("sign");
        let opened = open_message(&Keys::default(), "c1", "general", "alice", 1, None, &body);
        assert_eq!(opened.author(), Author::UnknownSender);
        assert_eq!(opened.verified_text(), None);
        assert_eq!(
            opened.display(ChannelHistory::Plain, Seen::First),
            "[unverified] hi"
        );
    }

    #[test]
    fn an_invalid_pinned_key_is_a_bad_signature() {
        let body = sign_plain(&alice(), "c1", "general", CLIENT_ID, 1, "hi").expect("sign");
        // Not a point on the curve for verify_strict, or a weak (small-order) key.
        for pinned in [[0xff; 32], [0; 32]] {
            let opened = open_message(
                &Keys::default(),
                "c1",
                "general",
                "alice",
                1,
                Some(pinned),
                &body,
            );
            assert_eq!(opened.author(), Author::BadSignature);
        }
    }

    #[test]
    fn bad_padding_is_unreadable_even_when_signed() {
        let (key, _) = create_small("pw", "general");
        let keys = keys(&key);
        let mut long_len = vec![0u8; 64];
        long_len[..2].copy_from_slice(&63u16.to_le_bytes());
        let mut dirty = vec![0u8; 64];
        dirty[0] = 1;
        dirty[3] = 0xff;
        let mut not_utf8 = vec![0u8; 64];
        not_utf8[0] = 1;
        not_utf8[2] = 0xff;
        let cases = [
            (vec![0u8; 65], UnreadableReason::BadPadding),
            (vec![0u8; 63], UnreadableReason::BadPadding),
            (vec![], UnreadableReason::BadPadding),
            (long_len, UnreadableReason::BadPadding),
            (dirty, UnreadableReason::BadPadding),
            (not_utf8, UnreadableReason::NotUtf8),
        ];
        for (padded, reason) in cases {
            let body =
                seal_padded(&key, &alice(), "c1", "general", CLIENT_ID, 1, &padded).expect("seal");
            let opened = open(&keys, "alice", 1, &body);
            assert_eq!(opened.content(), &Content::Unreadable(reason));
            assert_eq!(opened.author(), Author::Verified);
            assert_eq!(opened.verified_text(), None);
        }
    }

    #[test]
    fn short_empty_unknown_and_v1_bodies() {
        let keys = Keys::default();
        let cases: [(&[u8], Content, Author); 6] = [
            (
                &[],
                Content::Unreadable(UnreadableReason::Empty),
                Author::Unsigned,
            ),
            (
                &[FORMAT_SIGNED_V2; 80],
                Content::Unreadable(UnreadableReason::TooShort),
                Author::Unsigned,
            ),
            (
                &[FORMAT_ENCRYPTED_V2; 108],
                Content::Unreadable(UnreadableReason::TooShort),
                Author::Unsigned,
            ),
            (&[0x07, 1], Content::UnknownVersion(7), Author::Unsigned),
            (
                &[0x00, b'h', b'i'],
                Content::Clear("hi".into()),
                Author::Unsigned,
            ),
            (&[0x01, 1, 2, 3], Content::NoKey, Author::Unsigned),
        ];
        for (body, content, author) in cases {
            let opened = open(&keys, "alice", 1, body);
            assert_eq!((opened.content(), opened.author()), (&content, author));
            assert_eq!(opened.session(), None);
        }
        assert_eq!(
            open(&keys, "alice", 1, &[0x07]).display(ChannelHistory::Plain, Seen::First),
            "[unknown format 0x07]"
        );
        assert_eq!(
            open(&keys, "alice", 1, &[0x00, b'h', b'i'])
                .display(ChannelHistory::Encrypted, Seen::First),
            "[unsigned] [plaintext] hi"
        );
    }

    #[test]
    fn v1_encrypted_bodies_open_through_open_message() {
        let params = argon2::Params::new(64, 1, 1, Some(32)).expect("params");
        let v1 = ChannelKey::derive_with(params, "pw", "c1", "general").expect("derive");
        let body = v1.seal("alice", 4, "old").expect("seal");
        let keys = Keys {
            v2: None,
            v1: Some(v1),
        };
        let opened = open(&keys, "alice", 4, &body);
        assert_eq!(opened.content(), &Content::Clear("old".into()));
        assert_eq!(opened.author(), Author::Unsigned);
        assert!(opened.is_encrypted());
        assert_eq!(
            opened.display(ChannelHistory::Encrypted, Seen::First),
            "[unsigned] old"
        );
    }

    #[test]
    fn encrypted_formats_are_told_apart() {
        assert!(!is_encrypted_format(FORMAT_PLAINTEXT));
        assert!(is_encrypted_format(FORMAT_AES_GCM_V1));
        assert!(!is_encrypted_format(FORMAT_SIGNED_V2));
        assert!(is_encrypted_format(FORMAT_ENCRYPTED_V2));
        assert!(!is_encrypted_format(0x04));
    }

    #[test]
    fn sessions_hide_the_client_id_and_differ_between_clients() {
        assert_ne!(session_of([1; 16]), session_of([2; 16]));
        assert_ne!(session_of([1; 16]), [1; 16]);
    }

    #[test]
    fn marker_texts() {
        let texts: Vec<_> = [
            Marker::Forged,
            Marker::Replayed,
            Marker::Unverified,
            Marker::Unsigned,
            Marker::Plaintext,
        ]
        .into_iter()
        .map(Marker::as_str)
        .collect();
        assert_eq!(
            texts,
            [
                "[forged?]",
                "[replayed]",
                "[unverified]",
                "[unsigned]",
                "[plaintext]"
            ]
        );
    }

    #[test]
    fn replay_guard_marks_a_send_shown_at_another_seq() {
        let body = sign_plain(&alice(), "c1", "general", CLIENT_ID, 9, "hi").expect("sign");
        let opened = open(&Keys::default(), "alice", 9, &body);
        let mut guard = ReplayGuard::default();
        assert_eq!(guard.check("general", 10, "alice", 9, &opened), Seen::First);
        assert_eq!(guard.check("general", 10, "alice", 9, &opened), Seen::Again);
        let seen = guard.check("general", 11, "alice", 9, &opened);
        assert_eq!(seen, Seen::Replayed { first_seq: 10 });
        assert_eq!(opened.display(ChannelHistory::Plain, seen), "[replayed] hi");
        // Another channel keeps its own window (and the signature would fail there anyway).
        assert_eq!(guard.check("random", 11, "alice", 9, &opened), Seen::First);
    }

    #[test]
    fn replay_guard_ignores_forgeries_and_unsigned_bodies() {
        let body = sign_plain(&alice(), "c1", "general", CLIENT_ID, 9, "hi").expect("sign");
        let genuine = open(&Keys::default(), "alice", 9, &body);
        let mut forged_body = body.clone();
        forged_body[20] ^= 1;
        let forged = open(&Keys::default(), "alice", 9, &forged_body);
        assert_eq!(forged.author(), Author::BadSignature);
        let mut guard = ReplayGuard::default();
        assert_eq!(
            guard.check("general", 1, "alice", 9, &forged),
            Seen::Untracked
        );
        assert_eq!(guard.check("general", 2, "alice", 9, &genuine), Seen::First);
        let v1 = open(&Keys::default(), "alice", 9, &[0x00, b'x']);
        assert_eq!(guard.check("general", 3, "alice", 9, &v1), Seen::Untracked);
        assert_eq!(guard.check("general", 4, "alice", 9, &v1), Seen::Untracked);
    }

    #[test]
    fn replay_guard_memory_is_bounded() {
        let mut guard = ReplayGuard::new(2, 2);
        let opened_at = |seq| {
            let body = sign_plain(&alice(), "c1", "general", CLIENT_ID, seq, "x").expect("sign");
            open(&Keys::default(), "alice", seq, &body)
        };
        let (one, two, three) = (opened_at(1), opened_at(2), opened_at(3));
        assert_eq!(guard.check("general", 1, "alice", 1, &one), Seen::First);
        assert_eq!(guard.check("general", 2, "alice", 2, &two), Seen::First);
        assert_eq!(guard.check("general", 3, "alice", 3, &three), Seen::First);
        // Send 1 fell out of the two-send window; send 2 is still there.
        assert_eq!(guard.check("general", 9, "alice", 1, &one), Seen::First);
        assert!(matches!(
            guard.check("general", 9, "alice", 3, &three),
            Seen::Replayed { first_seq: 3 }
        ));
        // A third channel drops the least recently checked one.
        assert_eq!(guard.check("a", 1, "alice", 1, &one), Seen::First);
        assert_eq!(guard.check("b", 1, "alice", 1, &one), Seen::First);
        assert_eq!(guard.channel_count(), 2);
        assert_eq!(guard.check("general", 3, "alice", 3, &three), Seen::First);
    }

    fn arbitrary_body() -> impl Strategy<Value = Vec<u8>> {
        // Mostly known format bytes, so the parsers are what gets exercised.
        (0u8..6, proptest::collection::vec(any::<u8>(), 0..400)).prop_map(|(format, mut rest)| {
            rest.insert(0, format);
            rest
        })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_never_verify(
            body in prop_oneof![arbitrary_body(), proptest::collection::vec(any::<u8>(), 0..200)],
        ) {
            let (key, _) = create_small("pw", "general");
            let params = argon2::Params::new(64, 1, 1, Some(32)).expect("params");
            let v1 = ChannelKey::derive_with(params, "pw", "c1", "general").expect("derive");
            let keys = Keys { v2: Some(key), v1: Some(v1) };
            for pinned in [None, Some(alice().public_key())] {
                let opened = open_message(&keys, "c1", "general", "alice", 1, pinned, &body);
                prop_assert_ne!(opened.author(), Author::Verified);
                prop_assert_eq!(opened.verified_text(), None);
                let _line = opened.display(ChannelHistory::Encrypted, Seen::First);
            }
        }

        #[test]
        fn seal_and_sign_round_trip(
            text in prop_oneof![
                proptest::collection::vec(any::<char>(), 0..4_000)
                    .prop_map(|chars| chars.into_iter().collect::<String>()),
                // Every length up to the longest sealed text, across all buckets.
                (0..=TEXT_BYTES_MAX_ENCRYPTED, any::<u8>())
                    .prop_map(|(len, b)| char::from(b'!' + b % 90).to_string().repeat(len)),
            ],
            client_id in any::<[u8; 16]>(),
            client_seq in any::<u64>(),
        ) {
            let (key, _) = create_small("pw", "general");
            let keys = keys(&key);
            let pinned = Some(alice().public_key());
            let sealed = seal_v2(&key, &alice(), "c1", "general", client_id, client_seq, &text)
                .expect("seal");
            let signed = sign_plain(&alice(), "c1", "general", client_id, client_seq, &text)
                .expect("sign");
            for body in [sealed, signed] {
                prop_assert!(body.len() <= BODY_BYTES_MAX);
                let opened =
                    open_message(&keys, "c1", "general", "alice", client_seq, pinned, &body);
                prop_assert_eq!(opened.verified_text(), Some(text.as_str()));
                prop_assert_eq!(opened.session(), Some(session_of(client_id)));
            }
        }

        #[test]
        fn any_flipped_byte_is_caught(
            text in "\\PC{0,100}",
            encrypted in any::<bool>(),
            at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let (key, _) = create_small("pw", "general");
            let mut body = if encrypted {
                seal_v2(&key, &alice(), "c1", "general", CLIENT_ID, 1, &text).expect("seal")
            } else {
                sign_plain(&alice(), "c1", "general", CLIENT_ID, 1, &text).expect("sign")
            };
            let at = at.index(body.len());
            body[at] ^= flip;
            let opened = open(&keys(&key), "alice", 1, &body);
            prop_assert_ne!(opened.author(), Author::Verified);
            prop_assert_eq!(opened.verified_text(), None);
        }
    }
}
