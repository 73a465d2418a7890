//! The deterministic chat state machine of cellchat, persisted in RocksDB.
//!
//! Every committed raft entry reaches [`ChatState::apply`] in log order on every replica.
//! Given the same entries and the same [`RaftMeta`], every replica ends in the same state
//! (compare with [`ChatState::dump`]) and returns the same [`ChatResponse`]s.
//!
//! # Contract
//! - **Versioned encodings.** A [`Command`] is `[COMMAND_VERSION] ++ postcard`; every RocksDB
//!   value and the snapshot file start with a version byte. An unknown version decodes to
//!   [`Error::UnsupportedVersion`]; [`Command::decode`] never panics on any input.
//! - **Dense per-channel seqs.** A channel exists from its first accepted message; its
//!   messages are numbered without gaps from its floor (1 until something expires) to its
//!   head ([`ChatState`] lists the invariants).
//! - **Exactly-once effect per sender.** A send repeating an earlier (sender, client_id,
//!   client_seq) makes no new message and answers the original (channel, seq, at_ms) with
//!   `duplicate: true`, whether the original was in the same entry, an earlier one, before a
//!   restart or inside an installed snapshot, for [`DEDUP_WINDOW_MS`]; after that it is
//!   `Rejected(RetryExpired)`, never stored twice.
//! - **Retention by the log's clock.** [`Command::Expire`] removes messages past their
//!   channel's [`Retention`] and dedup records past their window, judged by the leader times
//!   carried in the log, never the applying node's clock (rules in `retention.rs`). It must
//!   be the only entry of its `apply` call (asserted), so batching cannot change what it
//!   removes.
//! - **Deterministic rejections.** Invalid channel names ([`ChannelName`]), senders, bodies
//!   (1..=[`MAX_BODY_BYTES`]) and oversized batches are answered with a [`RejectReason`];
//!   they change nothing but the applied meta.
//! - **Relations.** Replies, edits, deletes and reactions are messages of their own that
//!   also change their target's [`MessageMeta`] ([`Command::Relate`], rules in
//!   `relation.rs`); a delete erases the bodies of its target and the target's edits.
//! - **Trust on first use.** The first [`Command::RegisterUser`] of a name wins; the same key
//!   again is `Registered`, a different key is `Rejected(NameTaken)`.
//! - **Channel records.** A channel's record names its owner, whether it is private, its
//!   members and invitations, and the public part of its end-to-end encryption
//!   ([`ChannelRecord`], rules in `channel.rs`). Only members write a private channel
//!   (`Rejected(NotMember)`); the node checks reads the same way with [`ChatState::admits`].
//!   A user owns at most [`MAX_CHANNELS_PER_USER`] channels.
//! - **One join secret.** The last [`Command::SetJoinSecret`] applied is the cluster's join
//!   secret ([`ChatState::join_secret`]); it travels in snapshots like any other state, and
//!   [`ChatState::dump`] shows only its checksum.
//! - **Atomic batches.** One `apply` call is one RocksDB `WriteBatch`, WAL on, `sync=false`.
//!   The raft log is the durable record; [`ChatState::build_snapshot`] syncs the WAL before a
//!   snapshot can let the raft log be purged.
//! - **Local faults panic inside `apply`.** A RocksDB error seen by one replica must not
//!   become a response or state the others do not have.
//! - **Memory.** The newest `ring_len` (default 1000) messages per channel, within a budget
//!   of `ring_bytes_max` (default 256 MiB) for all channels together, live in memory; past
//!   the budget, the least recently used channels lose their rings and are read from
//!   RocksDB. Every channel head and every user key live in memory too (not counted in the
//!   budget; both grow only with what is stored). Dedup records and older messages live only
//!   in RocksDB.
//! - **Snapshots** are one streamed file with per-record and whole-file CRC-32/IEEE
//!   (layout in `format.rs`); installing one verifies it fully and swaps RocksDB
//!   directories through an atomically renamed pointer file (see `store.rs`).
//!
//! # Non-goals
//! - No tokio, no openraft: the adapter in `crates/node` translates log ids and membership
//!   into the opaque bytes of [`RaftMeta`].
//! - No authentication: the node verifies who sends; this crate stores the registered keys
//!   and the sender it is given. Sends are not checked against registered users.
//! - Deleting a message erases its body (and its edits'), not its seq: retention alone
//!   removes messages, oldest first, so seqs stay dense.
//! - Damage to synced RocksDB files is RocksDB's business; a corrupt record found by this
//!   crate is an [`Error::Corrupt`] at open or a panic inside `apply`.

#![deny(missing_docs)]

use std::path::PathBuf;

mod channel;
mod command;
mod dedup;
mod format;
mod relation;
mod retention;
mod snapshot;
mod state;
mod store;

pub use channel::{
    direct_channel_name, is_direct_channel, valid_topic, ChannelOp, ChannelRecord, DIRECT_PREFIX,
    MAX_CHANNELS_PER_USER, MAX_CRYPTO_RECORD_BYTES, MAX_DIRECT_CRYPTO_BYTES, MAX_DIRECT_MEMBERS,
    MAX_MEMBERS, MAX_TOPIC_BYTES,
};
pub use command::{
    valid_user_name, ChannelName, ChannelSeq, ChatResponse, ClientId, Command, JoinSecret,
    LogIndex, Message, ReadMark, RejectReason, RelateCmd, SendCmd, Sent, COMMAND_VERSION,
    JOIN_SECRET_BYTES, MAX_BATCH_MARKS, MAX_BATCH_SENDS, MAX_BODY_BYTES, MAX_CHANNEL_BYTES,
    MAX_SENDER_BYTES,
};
pub use relation::{valid_emoji, MessageMeta, Relation, MAX_EDITS, MAX_EMOJI_BYTES, MAX_REACTIONS};
pub use retention::{
    Retention, DEDUP_WINDOW_MS, EXPIRE_DEDUP_MAX, EXPIRE_SCAN_MAX, RETENTION_AGE_MAX_MS,
    RETENTION_AGE_MIN_MS,
};
pub use snapshot::{read_snapshot_info, verify_snapshot, SnapshotContents, SnapshotInfo};
pub use state::{
    AppliedEvent, ApplyEntry, ApplyPayload, ChannelListing, ChatState, Config, RaftMeta,
    RetentionInfo, CHANNEL_PAGE_MAX, HISTORY_LIMIT_MAX, RING_BYTES_MAX_DEFAULT, RING_BYTES_MAX_MAX,
    RING_BYTES_MAX_MIN, RING_LEN_DEFAULT, RING_LEN_MAX,
};

/// Errors of this crate. Deterministic command rejections are not errors; they are
/// [`RejectReason`] values inside a [`ChatResponse`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file system operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was attempted.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A RocksDB operation failed.
    #[error("rocksdb {op}: {source}")]
    Rocks {
        /// What was attempted.
        op: &'static str,
        /// RocksDB's error.
        source: rocksdb::Error,
    },
    /// An encoding carries a version byte this build does not know.
    #[error("unsupported {what} version {found}")]
    UnsupportedVersion {
        /// Which encoding.
        what: &'static str,
        /// The version byte found.
        found: u8,
    },
    /// Bytes from outside (a command payload) do not decode.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// Which encoding.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// Stored state breaks an invariant or does not decode.
    #[error("corrupt {what}: {reason}")]
    Corrupt {
        /// Which record or structure.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// A snapshot file is truncated, corrupt or otherwise invalid.
    #[error("corrupt snapshot {} at offset {offset}: {reason}", path.display())]
    SnapshotCorrupt {
        /// The file.
        path: PathBuf,
        /// Byte offset where the problem was found.
        offset: u64,
        /// Why.
        reason: String,
    },
    /// A [`Config`] field is out of bounds.
    #[error("invalid config: {reason}")]
    InvalidConfig {
        /// Which field and bound.
        reason: String,
    },
}
