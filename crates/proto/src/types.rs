//! Wire types of the [`Chat`](crate::Chat) service.
//!
//! These are plain data: the server validates them (channel names, body sizes, signatures) and
//! answers with [`ApiError`](crate::ApiError). Times are milliseconds since the Unix epoch
//! (`_ms`). Fields are never reordered or removed within one
//! [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION): postcard encodes by position. Socket
//! addresses travel without IPv6 scope id and flow info (serde's encoding drops them), so
//! link-local IPv6 addresses do not work across the wire.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// First call on every connection: the protocol version check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The client's [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION).
    pub protocol: u16,
    /// The cluster the client means to talk to.
    pub cluster: String,
    /// A name for logs and metrics only; it proves nothing. [`Login`] proves a name.
    pub client_name: Option<String>,
}

impl Hello {
    /// A `Hello` for this crate's [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION).
    pub fn new(cluster: impl Into<String>, client_name: Option<String>) -> Self {
        Self {
            protocol: crate::PROTOCOL_VERSION,
            cluster: cluster.into(),
            client_name,
        }
    }
}

/// The server's answer to a good [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The node that answered.
    pub node_id: u64,
    /// The node's cluster name.
    pub cluster: String,
    /// The node's [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION).
    pub protocol: u16,
    /// Fresh random bytes for this connection; [`Login::signature`] covers them.
    pub challenge: [u8; 32],
    /// The node's wall clock, for showing relative times.
    pub server_time_ms: u64,
}

/// Challenge-response login; the name is registered to `public_key` on first use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Login {
    /// The user name to log in as.
    pub name: String,
    /// The user's Ed25519 public key.
    pub public_key: [u8; 32],
    /// Ed25519 signature over [`login_message`](crate::login_message)`(challenge, binding,
    /// cluster, name)`: a domain prefix, [`Welcome::challenge`], the TLS session's binding, then
    /// the length-prefixed cluster and user names.
    pub signature: Vec<u8>,
}

/// A logged-in session; the server stamps `name` as the sender of every send on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// The name the session is logged in as.
    pub name: String,
}

/// Appends one message to a channel. `(client_id, client_seq)` is the idempotency key: a retry
/// with the same key is applied once and answers with the original seq.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendRequest {
    /// Target channel.
    pub channel: String,
    /// The message body, opaque to the server (ciphertext for encrypted channels).
    pub body: Vec<u8>,
    /// Random per client installation.
    pub client_id: [u8; 16],
    /// Increases by one per new message from `client_id`; retries reuse it.
    pub client_seq: u64,
    /// Makes the message a reply, edit, delete or reaction to an earlier message of the
    /// channel; the node checks the rules as it applies it.
    pub relation: Option<Relation>,
}

/// What a message does to an earlier message of its channel, named by seq.
///
/// The rules (checked by every node as it applies the message): the target exists in the
/// channel and is not itself an edit, delete or reaction, nor deleted; only its sender edits
/// it, keeping its format (an encrypted message is edited encrypted); its sender or the
/// channel's owner deletes it; a user has at most one reaction of each emoji on it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Relation {
    /// Answers the target; the body is the answer.
    Reply {
        /// The seq answered.
        to: u64,
    },
    /// Replaces the target's text; the body is the new text.
    Edit {
        /// The seq edited.
        of: u64,
    },
    /// Erases the target's body and its edits' from every node.
    Delete {
        /// The seq deleted.
        of: u64,
    },
    /// Adds (`on`) or removes the sender's reaction.
    React {
        /// The seq reacted to.
        to: u64,
        /// The reaction: 1 to 32 bytes, no spaces or control characters.
        emoji: String,
        /// Add or remove.
        on: bool,
    },
}

impl Relation {
    /// The seq of the message it changes.
    pub fn target(&self) -> u64 {
        match self {
            Relation::Reply { to } | Relation::React { to, .. } => *to,
            Relation::Edit { of } | Relation::Delete { of } => *of,
        }
    }
}

/// One emoji's reactions on a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reaction {
    /// The emoji.
    pub emoji: String,
    /// Who reacted with it, in name order.
    pub users: Vec<String>,
}

/// The result of a committed and applied send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendReply {
    /// The channel written to.
    pub channel: String,
    /// The message's per-channel seq.
    pub seq: u64,
    /// The server's timestamp on the message.
    pub at_ms: u64,
    /// The applied log index that holds the message; pass it as `read_token` to read it back on
    /// any node.
    pub read_token: u64,
    /// True when this was a retry of an already applied `(client_id, client_seq)`.
    pub duplicate: bool,
}

/// Long poll for messages after `after_seq`.
///
/// The server answers as soon as at least one message is there, and otherwise before the
/// request's deadline, with an empty batch: it waits at most
/// [`wait_budget`](crate::wait_budget)`(ctx, wait_ms)`. Clients set the deadline with
/// [`deadline_for`](crate::deadline_for).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamRequest {
    /// Channel to read.
    pub channel: String,
    /// Return messages with seq strictly greater than this.
    pub after_seq: u64,
    /// Upper bound on messages returned.
    pub max: u32,
    /// How long to wait for a first message, in ms; capped at
    /// [`STREAM_WAIT_MS_MAX`](crate::STREAM_WAIT_MS_MAX).
    pub wait_ms: u32,
    /// The node first waits until it has applied this log index (monotonic reads).
    pub read_token: u64,
}

/// Pages through a channel's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRequest {
    /// Channel to read.
    pub channel: String,
    /// Newest page strictly before this seq (paging backwards).
    pub before_seq: Option<u64>,
    /// Oldest page starting at this seq (paging forwards).
    pub from_seq: Option<u64>,
    /// Upper bound on messages returned.
    pub limit: u32,
    /// The node first waits until it has applied this log index.
    pub read_token: u64,
}

/// One stored chat message.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WireMessage {
    /// The channel it belongs to.
    pub channel: String,
    /// Its per-channel seq; seqs of a channel are dense from 1.
    pub seq: u64,
    /// The logged-in name the server stamped.
    pub sender: String,
    /// The body as sent.
    pub body: Vec<u8>,
    /// The server's timestamp.
    pub at_ms: u64,
    /// The sender's client seq (its client id is not shown: only the sender needs it).
    pub client_seq: u64,
    /// The relation this message carries, if it is a reply, edit, delete or reaction.
    pub relation: Option<Relation>,
    /// Its body was erased by a delete (of it, or of the message it edits); `body` is empty.
    pub deleted: bool,
    /// How many times it was edited.
    pub edits: u32,
    /// Its newest edit, whose body is the current text; absent when it has none, was
    /// deleted, or the edit expired.
    pub edit: Option<Box<WireMessage>>,
    /// How many replies answer it.
    pub replies: u64,
    /// Its reactions, by emoji.
    pub reactions: Vec<Reaction>,
}

/// Messages of one channel in ascending seq order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageBatch {
    /// The channel read.
    pub channel: String,
    /// The messages, ascending by seq.
    pub messages: Vec<WireMessage>,
    /// The channel's highest seq on the answering node.
    pub head: u64,
    /// The answering node's applied log index; use it as the next `read_token`.
    pub applied: u64,
    /// The lowest seq the answering node still keeps (1 until retention expired something),
    /// read after the messages. A reader whose next seq is below it skips to it: the seqs
    /// between expired. Only a jump to at most `floor` is such a skip; any other gap is an
    /// error of the node.
    pub floor: u64,
}

/// One channel in a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelInfo {
    /// Channel name.
    pub name: String,
    /// Highest seq in the channel; 0 before its first message.
    pub head: u64,
    /// The user who created it; `None` for channels from before channel records.
    pub owner: Option<String>,
    /// Only members read and write it.
    pub private: bool,
    /// The listing user is invited and has not accepted yet.
    pub invited: bool,
    /// Its users set an end-to-end encryption record.
    pub encrypted: bool,
    /// The highest seq the listing user marked read in it ([`Chat::mark_read`](crate::Chat::mark_read)); 0 when none.
    pub read_to: u64,
    /// The members of a direct conversation (its name is [`direct_channel_name`] of them,
    /// which a client checks); empty for any other channel.
    pub direct: Vec<String>,
}

/// Asks to move the caller's read marker in `channel` up to `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarkReadRequest {
    /// The channel.
    pub channel: String,
    /// The highest seq read: 1 up to the channel's head.
    pub seq: u64,
}

/// The caller's read marker after a [`MarkReadRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarkReadReply {
    /// The marker now: the requested seq, or a higher one another client of the same user set.
    pub read_to: u64,
    /// The applied log index that holds it (a read token).
    pub read_token: u64,
}

/// Asks for one page of the channel list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelsRequest {
    /// List channels whose names sort after this one; `None` starts at the first.
    pub after: Option<String>,
    /// Most channels to return; the node caps it at [`CHANNEL_PAGE_MAX`].
    pub limit: u32,
    /// Wait until the node has applied this log index (see [`SendReply::read_token`]).
    pub read_token: u64,
}

/// Most channels in one [`ChannelPage`].
pub const CHANNEL_PAGE_MAX: u32 = 1000;

/// One page of the channels the logged-in user may see, in name order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelPage {
    /// The channels.
    pub channels: Vec<ChannelInfo>,
    /// More channels follow the last one: ask again with `after` set to its name.
    pub more: bool,
}

/// A change to a channel's record, made by the logged-in user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChannelChange {
    /// Creates the channel's record, owned by the caller; a private channel must be new.
    Create {
        /// Only members read and write it.
        private: bool,
        /// The public part of its end-to-end encryption (opaque to nodes, at most 128 bytes).
        crypto: Option<Vec<u8>>,
    },
    /// Sets the crypto record of a channel the caller owns that has none.
    SetCrypto(Vec<u8>),
    /// The owner invites a registered user to a private channel.
    Invite(String),
    /// The caller accepts an invitation.
    Accept,
    /// The owner removes a member or invitation, or a user removes themselves.
    Remove(String),
    /// The owner sets how long the channel keeps its messages, or (`None`) lets it follow
    /// the cluster default.
    SetRetention(Option<crate::Retention>),
    /// The owner sets the channel's topic (one line, at most 256 bytes), or (`None`) clears
    /// it.
    SetTopic(Option<String>),
    /// Creates the direct conversation between `members` (the caller among them, 2 to
    /// [`DIRECT_MEMBERS_MAX`]), named [`direct_channel_name`] of them, with its crypto record
    /// (at most 2,048 bytes).
    CreateDirect {
        /// Every member, the caller included.
        members: Vec<String>,
        /// Its end-to-end encryption record: the member names and a key for each.
        crypto: Vec<u8>,
    },
}

/// Most members of a direct conversation.
pub const DIRECT_MEMBERS_MAX: usize = 8;

/// The channel name of the direct conversation between `members` (any order, duplicates
/// ignored): `dm-` and the first 20 bytes, in hex, of SHA-256 over a domain tag and each
/// distinct name, sorted and length-prefixed. The state machine computes the same name to
/// refuse any other, so a client that finds its name finds its conversation.
pub fn direct_channel_name<S: AsRef<str>>(members: &[S]) -> String {
    use sha2::{Digest, Sha256};
    let names: std::collections::BTreeSet<&str> = members.iter().map(AsRef::as_ref).collect();
    let mut hash = Sha256::new();
    hash.update(b"cellchat direct channel v1");
    for name in names {
        hash.update((name.len() as u64).to_le_bytes());
        hash.update(name.as_bytes());
    }
    format!("dm-{}", hex::encode(&hash.finalize()[..20]))
}

/// Asks for the messages matching a search query (the language of [`crate::search`]) in the
/// plaintext channels the caller may read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SearchRequest {
    /// The query, at most [`crate::search::MAX_QUERY_BYTES`] bytes.
    pub query: String,
    /// Most messages to return; the node caps it at [`SEARCH_HITS_MAX`].
    pub limit: u32,
    /// Wait until the node's index covers this log index (see [`SendReply::read_token`]).
    pub read_token: u64,
}

/// Most messages in one [`SearchReply`].
pub const SEARCH_HITS_MAX: u32 = crate::search::MAX_HITS as u32;

/// The messages a search found, newest first (by when their current text was indexed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SearchReply {
    /// The messages, as `history` returns them (an edited one with its newest edit).
    pub messages: Vec<WireMessage>,
    /// The node stopped looking before it found `limit` (narrow the query to see more).
    pub truncated: bool,
    /// The log index the node's index covered when it answered.
    pub indexed: u64,
}

/// Whether `channel` is named like a direct conversation (`dm-`, reserved for them).
pub fn is_direct_channel(channel: &str) -> bool {
    channel.starts_with("dm-")
}

/// Whether `name` is a valid user name: 1..=32 bytes of `A-Za-z0-9_-`, the rule the state
/// machine applies to registrations and senders, for checks at the edge.
pub fn valid_user_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A [`ChannelChange`] to apply to a channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelRequest {
    /// The channel.
    pub channel: String,
    /// The change.
    pub change: ChannelChange,
}

/// Asks for one channel's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelInfoRequest {
    /// The channel.
    pub channel: String,
    /// Wait until the node has applied this log index (see [`SendReply::read_token`]).
    pub read_token: u64,
}

/// A channel's record as a user who may see it reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelDetail {
    /// Its name, head, owner and flags.
    pub info: ChannelInfo,
    /// Members of a private channel, owner included, in name order.
    pub members: Vec<String>,
    /// Open invitations of a private channel, in name order.
    pub invited: Vec<String>,
    /// The public part of its end-to-end encryption, if set.
    pub crypto: Option<Vec<u8>>,
    /// The channel's own retention, if its owner set one.
    pub retention: Option<crate::Retention>,
    /// The cluster's default retention, in force when the channel has none of its own.
    pub default_retention: crate::Retention,
    /// The oldest seq still stored; older messages expired. 1 until something expires.
    pub floor: u64,
    /// The channel's topic, if its owner set one (one line, at most 256 bytes).
    pub topic: Option<String>,
}

/// A user's registered public key, as the answering node knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserKey {
    /// The user name asked for.
    pub name: String,
    /// Its Ed25519 public key, `None` when the name is not registered.
    pub public_key: Option<[u8; 32]>,
}

/// Most names in one `user_keys` call.
pub const USER_KEYS_MAX: usize = 256;

/// A node's Raft role as last seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Leads the current term.
    Leader,
    /// Voter following a leader.
    Follower,
    /// Non-voting read replica.
    Learner,
    /// Voter running an election.
    Candidate,
    /// Not known (starting, shutting down, or not heard from).
    Unknown,
}

/// One cluster member as seen by the answering node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node id.
    pub id: u64,
    /// Its role.
    pub role: Role,
    /// Address of its [`Chat`](crate::Chat) service.
    pub client_addr: SocketAddr,
    /// Address of its Raft RPC service.
    pub raft_addr: SocketAddr,
    /// Address of its metrics endpoint.
    pub metrics_addr: SocketAddr,
    /// Its applied log index as last known.
    pub applied: u64,
    /// Whether it is a voter (else a learner).
    pub voter: bool,
}

/// The cluster as seen by the answering node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// Cluster name.
    pub cluster: String,
    /// Current leader, if known.
    pub leader: Option<u64>,
    /// Current Raft term.
    pub term: u64,
    /// Members, voters and learners.
    pub nodes: Vec<NodeInfo>,
}

/// Answer to [`Chat::ping`](crate::Chat::ping), for RTT and freshness.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    /// The caller's nonce, echoed.
    pub nonce: u64,
    /// The answering node.
    pub node_id: u64,
    /// Its role.
    pub role: Role,
    /// Its applied log index.
    pub applied: u64,
    /// Its wall clock.
    pub server_time_ms: u64,
}

/// Where the leader is, as far as the answering node knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderHint {
    /// Leader node id.
    pub id: u64,
    /// Address of the leader's [`Chat`](crate::Chat) service.
    pub client_addr: SocketAddr,
}
