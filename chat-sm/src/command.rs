//! Commands replicated through the Raft log, their responses, and the deterministic
//! validation rules every replica applies to them.
//!
//! A command travels as `[COMMAND_VERSION] ++ postcard(Command)`. The version byte comes first
//! so that a later format can be told apart before postcard ever sees the bytes; decoding an
//! unknown version is [`Error::UnsupportedVersion`], never a panic.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::channel::{ChannelOp, MAX_CHANNELS_PER_USER, MAX_MEMBERS};
use crate::relation::{MessageMeta, Relation, MAX_EDITS, MAX_EMOJI_BYTES, MAX_REACTIONS};
use crate::retention::{Retention, DEDUP_WINDOW_MS};
use crate::Error;

/// Version byte in front of every encoded [`Command`].
pub const COMMAND_VERSION: u8 = 1;

/// Largest accepted message body, in bytes (16 KiB). Bodies are usually ciphertext.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// Largest accepted channel name, in bytes.
pub const MAX_CHANNEL_BYTES: usize = 64;

/// Largest accepted sender or user name, in bytes.
pub const MAX_SENDER_BYTES: usize = 32;

/// Shortest and longest accepted join secret ([`Command::SetJoinSecret`]), in bytes.
pub const JOIN_SECRET_BYTES: std::ops::RangeInclusive<usize> = 16..=64;

/// Largest number of sends in one [`Command::SendBatch`]; a larger batch is rejected whole
/// with [`RejectReason::BatchTooLarge`]. Bounds the work and the `WriteBatch` of one entry.
pub const MAX_BATCH_SENDS: usize = 4096;

/// Largest number of read markers in one [`Command::MarkRead`]; a larger entry is rejected
/// whole with [`RejectReason::BatchTooLarge`].
pub const MAX_BATCH_MARKS: usize = 4096;

/// Per-channel sequence number. The first message of a channel is 1; 0 means "none".
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default,
)]
pub struct ChannelSeq(pub u64);

/// Client identity for idempotent retries: a random 128-bit id chosen by the client.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default,
)]
pub struct ClientId(pub [u8; 16]);

/// Raft log position, starting at 1.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogIndex(pub u64);

/// A validated channel name.
///
/// Rules (checked by [`ChannelName::new`], identical on every replica):
/// - 1..=64 bytes ([`MAX_CHANNEL_BYTES`]);
/// - only `a-z`, `0-9`, `_`, `-` (lowercase ASCII, so names never need case folding);
/// - the first byte is `a-z` or `0-9`.
///
/// The byte 0 can therefore never occur in a name, which the message key layout relies on.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChannelName(String);

impl ChannelName {
    /// Validates `name` against the channel name rules.
    ///
    /// # Errors
    /// [`RejectReason::InvalidChannel`] when a rule is broken.
    pub fn new(name: &str) -> Result<ChannelName, RejectReason> {
        if is_valid_channel(name) {
            Ok(ChannelName(name.to_owned()))
        } else {
            Err(RejectReason::InvalidChannel)
        }
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as an owned string.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `name` follows the [`ChannelName`] rules.
pub(crate) fn is_valid_channel(name: &str) -> bool {
    let bytes = name.as_bytes();
    let Some(&first) = bytes.first() else {
        return false;
    };
    bytes.len() <= MAX_CHANNEL_BYTES
        && (first.is_ascii_lowercase() || first.is_ascii_digit())
        && bytes
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Whether `name` is a valid user (and sender) name: 1..=[`MAX_SENDER_BYTES`] bytes of
/// `A-Za-z0-9_-`. The same rule `apply` enforces, for checks at the edge.
pub fn valid_user_name(name: &str) -> bool {
    is_valid_sender(name)
}

/// Whether `name` is a valid sender or user name: 1..=32 bytes of `A-Za-z0-9_-`.
pub(crate) fn is_valid_sender(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_SENDER_BYTES
        && bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// One chat message submitted by a client.
///
/// `channel` and `sender` are raw strings on the wire so that invalid names can be carried
/// through the log and rejected deterministically by every replica.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SendCmd {
    /// Target channel; validated at apply time.
    pub channel: String,
    /// Sender name, stamped by the server; validated at apply time.
    pub sender: String,
    /// Message body (usually ciphertext), 1..=[`MAX_BODY_BYTES`] bytes.
    pub body: Vec<u8>,
    /// Idempotency key, part one.
    pub client_id: ClientId,
    /// Idempotency key, part two.
    pub client_seq: u64,
    /// Wall-clock time chosen by the leader when it proposed the entry, in ms since the epoch.
    /// It is part of the entry, so every replica stores the same value.
    pub at_ms: u64,
}

/// A replicated state machine command.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// One message.
    Send(SendCmd),
    /// Several messages coalesced by the leader into one log entry, applied in order.
    SendBatch(Vec<SendCmd>),
    /// Trust-on-first-use registration: the first key for a name wins.
    RegisterUser {
        /// User name; same rules as a sender.
        name: String,
        /// Ed25519 (or similar) public key, opaque to the state machine.
        public_key: [u8; 32],
    },
    /// Replaces the cluster's join secret (`server token --rotate`). Replicated so that every
    /// member, and every member that later catches up from a snapshot, admits newcomers with
    /// the same secret.
    SetJoinSecret(JoinSecret),
    /// A change to a channel's record (owner, privacy, members, crypto record).
    Channel {
        /// The channel; validated at apply time.
        channel: String,
        /// The user making the change, stamped by the node from the login.
        by: String,
        /// What to change.
        op: ChannelOp,
    },
    /// Expires messages and dedup records by the retention rules (`retention.rs`), with
    /// `at_ms` as the state machine's clock if it is later. Proposed by the leader now and
    /// then; always applied alone.
    Expire {
        /// The leader's wall clock when it proposed the entry, in ms since the epoch.
        at_ms: u64,
    },
    /// Sets the retention of every channel without one of its own (an operator's command).
    SetDefaultRetention(Retention),
    /// A reply, edit, delete or reaction: a send that also changes an earlier message of the
    /// same channel (rules in `relation.rs`). Appended last, so entries of earlier releases
    /// keep their variant numbers.
    Relate(RelateCmd),
    /// Read markers moved by users' clients, coalesced by the leader into one entry and
    /// applied in order; each is checked on its own (see [`ReadMark`]).
    MarkRead(Vec<ReadMark>),
}

/// "`user` has read `channel` up to `seq`". A marker only moves forward: a mark at or below
/// the stored one changes nothing, so marks from several clients of one user, in any order,
/// end at the highest. Refused, changing nothing, when the user is not admitted to the
/// channel (`NotMember`) or `seq` is 0 or above the channel's head (`NoSuchMessage`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ReadMark {
    /// The reader, stamped by the node from the login.
    pub user: String,
    /// The channel; validated at apply time.
    pub channel: String,
    /// The highest seq read.
    pub seq: ChannelSeq,
}

/// A send carrying a [`Relation`] to an earlier message of its channel.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RelateCmd {
    /// The message itself, deduplicated and numbered like any send.
    pub send: SendCmd,
    /// What it does to its target.
    pub relation: Relation,
}

/// A join secret as the log carries it: opaque bytes whose `Debug` never shows them, so no
/// log line of an entry leaks the secret.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
#[serde(transparent)]
pub struct JoinSecret(pub Vec<u8>);

impl fmt::Debug for JoinSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinSecret({} bytes)", self.0.len())
    }
}

/// A one-line summary for logs: the kind and size, never a message body.
impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Send(send) => write!(f, "send({}, {} bytes)", send.channel, send.body.len()),
            Command::SendBatch(sends) => write!(f, "send-batch({} messages)", sends.len()),
            Command::RegisterUser { name, .. } => write!(f, "register-user({name})"),
            Command::SetJoinSecret(_) => write!(f, "set-join-secret"),
            Command::Channel { channel, op, .. } => {
                let op = match op {
                    ChannelOp::Create { .. } => "create",
                    ChannelOp::SetCrypto(_) => "set-crypto",
                    ChannelOp::Invite(_) => "invite",
                    ChannelOp::Accept => "accept",
                    ChannelOp::Remove(_) => "remove",
                    ChannelOp::SetRetention(_) => "set-retention",
                    ChannelOp::SetTopic(_) => "set-topic",
                    ChannelOp::CreateDirect { .. } => "create-direct",
                };
                write!(f, "channel-{op}({channel})")
            }
            Command::Expire { at_ms } => write!(f, "expire(at {at_ms})"),
            Command::SetDefaultRetention(r) => write!(f, "set-default-retention({r:?})"),
            Command::Relate(cmd) => write!(
                f,
                "{}({}, {} -> {}, {} bytes)",
                cmd.relation.kind(),
                cmd.send.channel,
                cmd.send.client_seq,
                cmd.relation.target().0,
                cmd.send.body.len()
            ),
            Command::MarkRead(marks) => write!(f, "mark-read({} markers)", marks.len()),
        }
    }
}

impl Command {
    /// Encodes as `[COMMAND_VERSION] ++ postcard(self)`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![COMMAND_VERSION];
        self.encode_into(&mut out);
        out
    }

    /// Appends `postcard(self)` to `out` (without the version byte).
    fn encode_into(&self, out: &mut Vec<u8>) {
        let bytes = postcard::to_extend(self, std::mem::take(out))
            .expect("postcard serialization into a Vec cannot fail");
        *out = bytes;
    }

    /// Decodes bytes produced by [`Command::encode`]. Never panics on arbitrary input.
    ///
    /// # Errors
    /// - [`Error::Malformed`] for empty input, bad postcard data or trailing bytes;
    /// - [`Error::UnsupportedVersion`] for an unknown version byte.
    pub fn decode(bytes: &[u8]) -> Result<Command, Error> {
        let (&version, rest) = bytes.split_first().ok_or(Error::Malformed {
            what: "command",
            reason: "empty input".into(),
        })?;
        if version != COMMAND_VERSION {
            return Err(Error::UnsupportedVersion {
                what: "command",
                found: version,
            });
        }
        let (command, tail) = postcard::take_from_bytes(rest).map_err(|e| Error::Malformed {
            what: "command",
            reason: e.to_string(),
        })?;
        if !tail.is_empty() {
            return Err(Error::Malformed {
                what: "command",
                reason: format!("{} trailing bytes", tail.len()),
            });
        }
        Ok(command)
    }
}

/// A deterministic reason for refusing a command. Replicated like a success.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum RejectReason {
    /// The channel name breaks the [`ChannelName`] rules.
    InvalidChannel,
    /// The body is empty.
    EmptyBody,
    /// The body is longer than [`MAX_BODY_BYTES`].
    BodyTooLarge {
        /// Body length in bytes.
        len: u64,
        /// The limit in bytes.
        max: u64,
    },
    /// The sender name is not 1..=32 bytes of `A-Za-z0-9_-`.
    InvalidSender,
    /// The user name in a registration is not 1..=32 bytes of `A-Za-z0-9_-`.
    InvalidUserName,
    /// The user name is registered with a different key.
    NameTaken,
    /// A batch holds more than [`MAX_BATCH_SENDS`] sends.
    BatchTooLarge {
        /// Number of sends in the batch.
        count: u64,
        /// The limit.
        max: u64,
    },
    /// The entry payload could not be decoded (see [`crate::ApplyPayload::Malformed`]).
    Malformed,
    /// A join secret outside [`JOIN_SECRET_BYTES`].
    InvalidJoinSecret {
        /// Its length in bytes.
        len: u64,
    },
    /// The channel is private and the user is not a member.
    NotMember,
    /// Only the channel's owner may do that.
    NotOwner,
    /// The channel has a record already (or, for a private one, messages).
    ChannelExists,
    /// The user has no invitation to the channel.
    NotInvited,
    /// The invitee is not a registered user.
    UnknownUser,
    /// The user owns [`MAX_CHANNELS_PER_USER`] channels already.
    TooManyChannels,
    /// The channel has [`MAX_MEMBERS`] members and invitations already.
    TooManyMembers,
    /// Members and invitations exist only in private channels.
    NotPrivate,
    /// The channel has a crypto record already; it never changes, so history stays readable.
    CryptoAlreadySet,
    /// A crypto record longer than [`crate::MAX_CRYPTO_RECORD_BYTES`].
    CryptoTooLarge {
        /// Its length in bytes.
        len: u64,
    },
    /// The owner cannot leave a private channel (nobody could invite anyone again).
    OwnerCannotLeave,
    /// A retention outside the bounds of [`Retention::validate`].
    InvalidRetention,
    /// A retry of a send whose dedup record expired ([`DEDUP_WINDOW_MS`] after it was
    /// stored): whether it was stored cannot be told any more, so it is not stored again.
    RetryExpired,
    /// The target of a relation is not stored in the channel (never sent, or expired).
    NoSuchMessage,
    /// The target of a relation is an edit, delete or reaction, not a message.
    NotATarget,
    /// The target of a relation was deleted.
    MessageDeleted,
    /// Only the message's sender may edit it (and only the sender or the channel's owner
    /// delete it).
    NotSender,
    /// An edit must keep its target's body format: an encrypted message is edited encrypted.
    EditFormatChanged,
    /// The message has [`MAX_EDITS`] edits already.
    TooManyEdits,
    /// A reaction is 1..=[`MAX_EMOJI_BYTES`] bytes without control characters or spaces.
    InvalidReaction,
    /// The user has this reaction on the message already.
    AlreadyReacted,
    /// The user has no such reaction on the message.
    NotReacted,
    /// The message has [`MAX_REACTIONS`] reactions already.
    TooManyReactions,
    /// A topic over [`crate::MAX_TOPIC_BYTES`] bytes or with a control character.
    InvalidTopic,
    /// A direct conversation must be named [`crate::direct_channel_name`] of its 2..=
    /// [`crate::MAX_DIRECT_MEMBERS`] members, the creator among them.
    InvalidDirect,
    /// Direct conversations are created whole and their members never change; `dm-` names
    /// are theirs.
    DirectChannel,
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RejectReason::InvalidChannel => write!(
                f,
                "invalid channel name: use 1..=64 bytes of a-z 0-9 _ - starting with a letter or digit"
            ),
            RejectReason::EmptyBody => write!(f, "message body is empty"),
            RejectReason::BodyTooLarge { len, max } => {
                write!(f, "message body is {len} bytes, the limit is {max}")
            }
            RejectReason::InvalidSender => {
                write!(f, "invalid sender name: use 1..=32 bytes of A-Z a-z 0-9 _ -")
            }
            RejectReason::InvalidUserName => {
                write!(f, "invalid user name: use 1..=32 bytes of A-Z a-z 0-9 _ -")
            }
            RejectReason::NameTaken => write!(f, "user name is registered with another key"),
            RejectReason::BatchTooLarge { count, max } => {
                write!(f, "batch holds {count} sends, the limit is {max}")
            }
            RejectReason::Malformed => write!(f, "malformed command"),
            RejectReason::InvalidJoinSecret { len } => write!(
                f,
                "a join secret is {}..={} bytes, not {len}",
                JOIN_SECRET_BYTES.start(),
                JOIN_SECRET_BYTES.end()
            ),
            RejectReason::NotMember => write!(f, "the channel is private and you are not a member"),
            RejectReason::NotOwner => write!(f, "only the channel's owner may do that"),
            RejectReason::ChannelExists => write!(f, "the channel exists already"),
            RejectReason::NotInvited => write!(f, "you have no invitation to the channel"),
            RejectReason::UnknownUser => write!(f, "no user of that name is registered"),
            RejectReason::TooManyChannels => {
                write!(f, "you own {MAX_CHANNELS_PER_USER} channels, the limit")
            }
            RejectReason::TooManyMembers => {
                write!(f, "the channel has {MAX_MEMBERS} members and invitations, the limit")
            }
            RejectReason::NotPrivate => write!(f, "the channel is public: everyone may read it"),
            RejectReason::CryptoAlreadySet => {
                write!(f, "the channel's encryption is set and never changes")
            }
            RejectReason::CryptoTooLarge { len } => write!(
                f,
                "a crypto record is at most {} bytes, not {len}",
                crate::MAX_CRYPTO_RECORD_BYTES
            ),
            RejectReason::OwnerCannotLeave => write!(f, "the owner cannot leave the channel"),
            RejectReason::InvalidRetention => write!(
                f,
                "a retention is an age from 1 minute to 100 years and/or a count of at least 1"
            ),
            RejectReason::RetryExpired => write!(
                f,
                "a retry more than {} h after the first attempt: it may have been stored then, \
                 so it is not stored again",
                DEDUP_WINDOW_MS / 3_600_000
            ),
            RejectReason::NoSuchMessage => write!(f, "no such message in this channel"),
            RejectReason::NotATarget => write!(
                f,
                "that entry is an edit, delete or reaction; point at the message itself"
            ),
            RejectReason::MessageDeleted => write!(f, "the message was deleted"),
            RejectReason::NotSender => write!(
                f,
                "only the sender may edit a message (and the sender or the channel's owner delete it)"
            ),
            RejectReason::EditFormatChanged => write!(
                f,
                "an edit keeps the message's format: an encrypted message is edited encrypted"
            ),
            RejectReason::TooManyEdits => {
                write!(f, "the message has {MAX_EDITS} edits, the limit")
            }
            RejectReason::InvalidReaction => write!(
                f,
                "a reaction is 1..={MAX_EMOJI_BYTES} bytes without spaces or control characters"
            ),
            RejectReason::AlreadyReacted => write!(f, "you reacted so already"),
            RejectReason::NotReacted => write!(f, "you have no such reaction on the message"),
            RejectReason::TooManyReactions => {
                write!(f, "the message has {MAX_REACTIONS} reactions, the limit")
            }
            RejectReason::InvalidTopic => write!(
                f,
                "a topic is one line of at most {} bytes",
                crate::MAX_TOPIC_BYTES
            ),
            RejectReason::InvalidDirect => write!(
                f,
                "a direct conversation is named after its 2 to {} members, you among them",
                crate::MAX_DIRECT_MEMBERS
            ),
            RejectReason::DirectChannel => write!(
                f,
                "direct conversations are created with their members, which never change"
            ),
        }
    }
}

impl std::error::Error for RejectReason {}

/// Validates a send; the order of checks is part of the replicated behaviour.
pub(crate) fn validate_send(cmd: &SendCmd) -> Result<(), RejectReason> {
    if !is_valid_channel(&cmd.channel) {
        return Err(RejectReason::InvalidChannel);
    }
    if !is_valid_sender(&cmd.sender) {
        return Err(RejectReason::InvalidSender);
    }
    if cmd.body.is_empty() {
        return Err(RejectReason::EmptyBody);
    }
    if cmd.body.len() > MAX_BODY_BYTES {
        return Err(RejectReason::BodyTooLarge {
            len: cmd.body.len() as u64,
            max: MAX_BODY_BYTES as u64,
        });
    }
    Ok(())
}

/// The result of one accepted send.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Sent {
    /// Channel the message went to.
    pub channel: String,
    /// Its per-channel sequence number.
    pub seq: ChannelSeq,
    /// The `at_ms` stored with the message (the original one for a duplicate).
    pub at_ms: u64,
    /// True when this send repeated an earlier (client_id, client_seq): no new message was
    /// made and `seq`/`at_ms` are the original ones.
    pub duplicate: bool,
}

/// The state machine's answer to one log entry.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum ChatResponse {
    /// Blank and membership entries.
    None,
    /// A [`Command::Send`] was accepted (or was a duplicate).
    Sent(Sent),
    /// One result per send of a [`Command::SendBatch`], in order.
    Batch(Vec<Result<Sent, RejectReason>>),
    /// A [`Command::RegisterUser`] was accepted (first registration or same key again).
    Registered,
    /// A [`Command::SetJoinSecret`] was applied.
    JoinSecretSet,
    /// A [`Command::Channel`] was applied (or changed nothing, as a repeat).
    ChannelUpdated,
    /// The whole command was refused.
    Rejected(RejectReason),
    /// A [`Command::Expire`] ran.
    Expired {
        /// Messages removed.
        messages: u64,
        /// Dedup records removed.
        dedup_records: u64,
    },
    /// A [`Command::SetDefaultRetention`] was applied.
    DefaultRetentionSet,
    /// One result per mark of a [`Command::MarkRead`], in order: the user's marker in that
    /// channel after it.
    Marked(Vec<Result<ChannelSeq, RejectReason>>),
}

/// A stored chat message.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Channel name.
    pub channel: String,
    /// Per-channel sequence number.
    pub seq: ChannelSeq,
    /// Sender name.
    pub sender: String,
    /// Body bytes.
    pub body: Vec<u8>,
    /// Leader-chosen time, ms since the epoch.
    pub at_ms: u64,
    /// Idempotency key, part one.
    pub client_id: ClientId,
    /// Idempotency key, part two.
    pub client_seq: u64,
    /// The relation it carries and what later relations did to it.
    pub meta: MessageMeta,
    /// The newest edit of this message, attached by reads so that a page far from the edit
    /// shows the current text. `None` when it has no edit or was deleted.
    pub edit: Option<Box<Message>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    #[test_case("general", true; "plain")]
    #[test_case("a", true; "one byte")]
    #[test_case("0day", true; "leading digit")]
    #[test_case("my_chan-2", true; "underscore and dash")]
    #[test_case("", false; "empty")]
    #[test_case("_x", false; "leading underscore")]
    #[test_case("-x", false; "leading dash")]
    #[test_case("General", false; "uppercase")]
    #[test_case("a b", false; "space")]
    #[test_case("caf\u{e9}", false; "non ascii")]
    #[test_case("a\0b", false; "nul")]
    fn channel_name_rules(name: &str, ok: bool) {
        assert_eq!(ChannelName::new(name).is_ok(), ok);
    }

    #[test]
    fn channel_name_length_limit() {
        assert!(ChannelName::new(&"a".repeat(64)).is_ok());
        assert!(ChannelName::new(&"a".repeat(65)).is_err());
    }

    #[test_case("Alice", true; "plain")]
    #[test_case("a_B-9", true; "mixed")]
    #[test_case("", false; "empty")]
    #[test_case("al ice", false; "space")]
    #[test_case("ääää", false; "non ascii")]
    fn sender_rules(name: &str, ok: bool) {
        assert_eq!(is_valid_sender(name), ok);
    }

    #[test]
    fn sender_length_limit() {
        assert!(is_valid_sender(&"A".repeat(32)));
        assert!(!is_valid_sender(&"A".repeat(33)));
    }

    fn send(body: Vec<u8>) -> SendCmd {
        SendCmd {
            channel: "general".into(),
            sender: "Alice".into(),
            body,
            client_id: ClientId([7; 16]),
            client_seq: 3,
            at_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn validate_send_order_and_limits() {
        assert_eq!(validate_send(&send(b"hi".to_vec())), Ok(()));
        assert_eq!(validate_send(&send(vec![])), Err(RejectReason::EmptyBody));
        assert_eq!(validate_send(&send(vec![0; MAX_BODY_BYTES])), Ok(()));
        assert_eq!(
            validate_send(&send(vec![0; MAX_BODY_BYTES + 1])),
            Err(RejectReason::BodyTooLarge {
                len: MAX_BODY_BYTES as u64 + 1,
                max: MAX_BODY_BYTES as u64
            })
        );
        let mut bad = send(vec![]);
        bad.channel = "Bad".into();
        bad.sender = String::new();
        assert_eq!(validate_send(&bad), Err(RejectReason::InvalidChannel));
    }

    #[test]
    fn command_round_trip() {
        let cmds = [
            Command::Send(send(b"hello".to_vec())),
            Command::SendBatch(vec![send(b"a".to_vec()), send(b"b".to_vec())]),
            Command::SendBatch(vec![]),
            Command::RegisterUser {
                name: "Bob".into(),
                public_key: [9; 32],
            },
            Command::Channel {
                channel: "vault".into(),
                by: "Alice".into(),
                op: ChannelOp::Create {
                    private: true,
                    crypto: Some(vec![2; 40]),
                },
            },
            Command::Channel {
                channel: "vault".into(),
                by: "Alice".into(),
                op: ChannelOp::Invite("Bob".into()),
            },
        ];
        for cmd in cmds {
            let bytes = cmd.encode();
            assert_eq!(bytes[0], COMMAND_VERSION);
            assert_eq!(Command::decode(&bytes).expect("round trip"), cmd);
        }
    }

    #[test]
    fn decode_rejects_bad_input() {
        assert!(matches!(Command::decode(&[]), Err(Error::Malformed { .. })));
        assert!(matches!(
            Command::decode(&[2, 0]),
            Err(Error::UnsupportedVersion { found: 2, .. })
        ));
        let mut bytes = Command::SendBatch(vec![]).encode();
        bytes.push(0);
        assert!(matches!(
            Command::decode(&bytes),
            Err(Error::Malformed { .. })
        ));
        let bytes = Command::Send(send(b"hello".to_vec())).encode();
        for cut in 1..bytes.len() {
            assert!(Command::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }
}
