//! The client-facing `proto::Chat` service of one node; step 2 of "Life of a chat message" in
//! ARCHITECTURE.md.
//!
//! tarpc serves one `ChatServer` value per connection, holding its hello, login challenge,
//! user and rate-limit bucket. Reads are served by any node from its applied state once it has
//! applied the caller's read token. `send` needs a login; a follower answers `NotLeader` and
//! does not forward, so a send is never in flight on two nodes at once and the client always
//! knows which node to retry.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chat_sm::{ChannelSeq, ChatResponse, ChatState, ClientId, Command, SendCmd};
use ed25519_dalek::{Signature, VerifyingKey};
use openraft::error::{ClientWriteError, RaftError};
use parking_lot::Mutex;
use proto::{
    wait_budget, ApiError, ChannelChange, ChannelDetail, ChannelInfo, ChannelInfoRequest,
    ChannelPage, ChannelRequest, ChannelsRequest, ClusterInfo, Hello, HistoryRequest, LeaderHint,
    Login, MarkReadReply, MarkReadRequest, MessageBatch, NodeInfo, Pong, RejectReason, Role,
    SearchReply, SearchRequest, SendReply, SendRequest, Session, StreamRequest, UserKey, Welcome,
    WireMessage,
};
use tarpc::context::Context;

use crate::cluster::{role_of, Peers};
use crate::conn_limit::AddrKey;
use crate::conn_watch::{Activity, Busy, ConnWatch};
use crate::delivery::Delivery;
use crate::ephemeral::Ephemeral;
use crate::metrics::{GaugeGuard, Metrics};
use crate::proposer::{ProposeError, Proposer};
use crate::raft::Raft;
use crate::read_marks::ReadMarks;
use crate::types::{Member, NodeId};

/// Most messages one `stream` or `history` call returns.
pub const BATCH_MESSAGES_MAX: u32 = 1000;

/// Most bytes of messages one `stream` or `history` reply carries (at least one message
/// always goes, and one fits easily). A thousand full-size messages would make a reply of
/// 16 MiB, held in memory at once on both ends; clients page on from the last message they
/// got, so a shorter page only costs a round trip.
pub const REPLY_BYTES_MAX: usize = 4 << 20;

/// Most users whose send bucket has not refilled yet (about 150 B each). A bucket is full
/// again `user_burst / user_rate_per_s` seconds (4 by default) after the user's last send and
/// is then dropped, so this caps the users sending within that window, not the users ever
/// seen; past it, a user without a bucket is refused until buckets refill.
pub const USER_BUCKETS_MAX: usize = 100_000;

/// Most source addresses whose registration bucket has not refilled yet (about 100 B each).
/// Only a registration the node-wide limit lets through makes a bucket, so the default
/// limits never come near it.
pub const REGISTRATION_SOURCES_MAX: usize = 10_000;

/// A [`BucketMap`] sweeps after at least this many new keys, so small maps are not swept on
/// every add.
const BUCKET_SWEEP_MIN: usize = 1024;

/// Which end of a page a byte cap keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    /// The lowest seqs: the client pages on upwards from the last one.
    Oldest,
    /// The highest seqs: the client pages on downwards from the first one.
    Newest,
}

/// A message's size in a reply, near enough for a cap: its variable fields plus a bound on
/// the fixed ones and the encoding's length prefixes.
fn reply_bytes(message: &chat_sm::Message) -> usize {
    message.body.len() + message.sender.len() + message.channel.len() + 64
}

/// Cuts `messages` (ascending) to the longest run from the `keep` end whose size stays within
/// `max`; one message always stays.
fn cap_reply(messages: &mut Vec<chat_sm::Message>, keep: Keep, max: usize) {
    let mut total = 0usize;
    let mut fits = |m: &chat_sm::Message| {
        total = total.saturating_add(reply_bytes(m));
        total <= max
    };
    let kept = match keep {
        Keep::Oldest => messages.iter().take_while(|m| fits(m)).count(),
        Keep::Newest => messages.iter().rev().take_while(|m| fits(m)).count(),
    }
    .max(1);
    if kept >= messages.len() {
        return;
    }
    match keep {
        Keep::Oldest => messages.truncate(kept),
        Keep::Newest => {
            messages.drain(..messages.len() - kept);
        }
    }
}

/// Everything the chat service of one node shares across connections. Rate limits are token
/// buckets (sustained rate, burst): `user_buckets` for each user's sends, `registrations` for
/// new names, `conn_*` for every request of one connection.
pub struct ApiShared {
    pub id: NodeId,
    pub cluster: String,
    /// For leader and membership queries and user registration.
    pub raft: Raft,
    /// Applied chat state, for reads.
    pub chat: Arc<ChatState>,
    /// The search index over this node's plaintext messages.
    pub searcher: crate::search::Searcher,
    pub delivery: Delivery,
    pub proposer: Proposer,
    /// Coalesces read markers into entries.
    pub read_marks: ReadMarks,
    /// Presence and typing, never in the log.
    pub ephemeral: Ephemeral,
    /// Nodes heard by discovery (roles and applied indexes of others).
    pub peers: Peers,
    pub metrics: Arc<Metrics>,
    /// Each user's send bucket (`user_rate_per_s`, `user_burst`), at most
    /// [`USER_BUCKETS_MAX`] users.
    pub user_buckets: Mutex<BucketMap<String>>,
    /// Limits on registering new names (see [`Registrations`]).
    pub registrations: Mutex<Registrations>,
    pub conn_rate_per_s: u32,
    pub conn_burst: u32,
    /// A connection with no request in flight for this long is closed (`conn_watch.rs`).
    pub client_idle_timeout: Duration,
    /// Deliberately broken modes (feature `weaken`); default none.
    pub weaken: crate::Weaken,
}

/// A token bucket: `burst` tokens, refilled at `rate` per second.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_per_s: u32, burst: u32) -> TokenBucket {
        TokenBucket {
            tokens: f64::from(burst),
            rate: f64::from(rate_per_s),
            burst: f64::from(burst),
            last: Instant::now(),
        }
    }

    /// Takes one token, or says in how many ms one will be there.
    pub fn take(&mut self, now: Instant) -> Result<(), u64> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        // Round up so a client that waits exactly this long finds a token.
        Err(((1.0 - self.tokens) / self.rate * 1000.0).ceil() as u64)
    }

    /// [`TokenBucket::take`] now, refusing with `RateLimited`.
    pub(crate) fn take_now(&mut self) -> Result<(), ApiError> {
        self.take(Instant::now())
            .map_err(|retry_after_ms| ApiError::RateLimited { retry_after_ms })
    }

    /// A full bucket at `now`, refilled at `rate_per_s` tokens per second (may be below 1).
    fn at(rate_per_s: f64, burst: u32, now: Instant) -> TokenBucket {
        TokenBucket {
            tokens: f64::from(burst),
            rate: rate_per_s,
            burst: f64::from(burst),
            last: now,
        }
    }

    /// As [`TokenBucket::take`], but leaves the token where it is.
    fn ready(&self, now: Instant) -> Result<(), u64> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        let tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if tokens >= 1.0 {
            return Ok(());
        }
        Err(((1.0 - tokens) / self.rate * 1000.0).ceil() as u64)
    }

    /// From when on the bucket is full again, and so answers as a new one would. A
    /// millisecond late, so float rounding never calls a bucket full a moment early.
    fn full_time(&self) -> Instant {
        let refill_s = (self.burst - self.tokens).max(0.0) / self.rate;
        self.last + Duration::from_secs_f64(refill_s) + Duration::from_millis(1)
    }
}

/// Token buckets by key (a user name, a source address), all with one rate and burst, in a
/// bounded map.
///
/// A bucket that has refilled completely answers exactly as a new one would, so dropping it
/// changes no decision. Such buckets are swept after as many new keys as the last sweep left
/// buckets (at least [`BUCKET_SWEEP_MIN`]), so a sweep's O(n) is paid once per n new keys.
/// When `len_max` buckets are still refilling, a new key is refused, without sweeping again,
/// until more than a tenth of them are full.
///
/// Invariant: `buckets.len() <= len_max`.
pub struct BucketMap<K> {
    buckets: HashMap<K, TokenBucket>,
    rate_per_s: f64,
    burst: u32,
    len_max: usize,
    /// New keys since the last sweep.
    added: usize,
    /// Sweep when `added` reaches this.
    sweep_after: usize,
    /// Set when the map was found full: refuse new keys until then.
    full_until: Option<Instant>,
}

impl<K: Hash + Eq> BucketMap<K> {
    /// An empty map of buckets refilled at `rate_per_s` tokens per second, holding `burst`,
    /// for at most `len_max` (at least 1) keys.
    pub fn new(rate_per_s: f64, burst: u32, len_max: usize) -> BucketMap<K> {
        assert!(
            len_max >= 1 && rate_per_s > 0.0,
            "a bucket map needs room and a rate"
        );
        BucketMap {
            buckets: HashMap::new(),
            rate_per_s,
            burst,
            len_max,
            added: 0,
            sweep_after: BUCKET_SWEEP_MIN,
            full_until: None,
        }
    }

    /// Takes a token from `key`'s bucket (a new full one when it has none) at `now`, or says
    /// in how many ms to retry.
    pub fn take<Q>(&mut self, key: &Q, now: Instant) -> Result<(), u64>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if let Some(bucket) = self.buckets.get_mut(key) {
            return bucket.take(now);
        }
        self.make_room(now)?;
        let mut bucket = TokenBucket::at(self.rate_per_s, self.burst, now);
        let taken = bucket.take(now);
        self.buckets.insert(key.to_owned(), bucket);
        self.added += 1;
        assert!(
            self.buckets.len() <= self.len_max,
            "bucket map over its cap"
        );
        taken
    }

    /// Whether [`BucketMap::take`] would succeed at `now`, taking nothing.
    fn ready<Q>(&mut self, key: &Q, now: Instant) -> Result<(), u64>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self.buckets.get(key) {
            Some(bucket) => bucket.ready(now),
            None => self.make_room(now),
        }
    }

    /// Makes sure a new key fits, sweeping when due; or says in how many ms to retry.
    fn make_room(&mut self, now: Instant) -> Result<(), u64> {
        match self.full_until {
            Some(until) if now < until => return Err(ms_until(now, until)),
            Some(_) => self.sweep(now),
            None if self.added >= self.sweep_after => self.sweep(now),
            None => {}
        }
        if self.buckets.len() < self.len_max {
            return Ok(());
        }
        // Every bucket left is still refilling: wait until more than a tenth of them are
        // full, so the next sweep frees that many.
        let mut times: Vec<Instant> = self.buckets.values().map(TokenBucket::full_time).collect();
        let tenth = times.len() / 10;
        let until = *times.select_nth_unstable(tenth).1;
        self.full_until = Some(until);
        Err(ms_until(now, until))
    }

    fn sweep(&mut self, now: Instant) {
        self.buckets.retain(|_, bucket| bucket.full_time() > now);
        self.added = 0;
        self.sweep_after = self.buckets.len().max(BUCKET_SWEEP_MIN);
        self.full_until = None;
    }
}

/// Whole milliseconds from `now` until `until`, rounded up, at least 1.
fn ms_until(now: Instant, until: Instant) -> u64 {
    let micros = until.saturating_duration_since(now).as_micros();
    u64::try_from(micros.div_ceil(1000))
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Registration limits of one node, each a token bucket refilled per minute (see
/// [`Registrations`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistrationLimits {
    /// Registrations per minute from one source address, sustained.
    pub ip_rate_per_min: u32,
    /// Burst of registrations from one source address.
    pub ip_burst: u32,
    /// Registrations per minute from all remote sources together, sustained.
    pub node_rate_per_min: u32,
    /// Burst of those.
    pub node_burst: u32,
}

/// Counts registrations (a new name's first send) per source address and for the whole node.
///
/// Anyone can make a key pair and a new name, and each registered name is a log entry and a
/// key every replica keeps in memory for good, so registrations are limited where names come
/// from: a source address (IPv6: one /64, as `conn_limit.rs` counts them) and the node as a
/// whole. Connections from this machine are exempt from both, as from the per-address
/// connection cap: local processes (the operator's clients, tests, load harnesses) could
/// exhaust the node by other means anyway. An attempt counts whether or not the leader then
/// accepts it; a refused one takes from neither bucket and writes nothing.
pub struct Registrations {
    node: TokenBucket,
    by_source: BucketMap<AddrKey>,
}

impl Registrations {
    /// Full buckets for `limits`.
    pub fn new(limits: RegistrationLimits) -> Registrations {
        let per_s = |per_min: u32| f64::from(per_min) / 60.0;
        let now = Instant::now();
        Registrations {
            node: TokenBucket::at(per_s(limits.node_rate_per_min), limits.node_burst, now),
            by_source: BucketMap::new(
                per_s(limits.ip_rate_per_min),
                limits.ip_burst,
                REGISTRATION_SOURCES_MAX,
            ),
        }
    }

    /// Counts one registration attempt from `source` (`None`: this machine, not counted) at
    /// `now`, or says in how many ms to retry.
    pub fn admit(&mut self, source: Option<AddrKey>, now: Instant) -> Result<(), u64> {
        let Some(source) = source else {
            return Ok(());
        };
        // Both checked before either is taken: one address must not spend the node's budget
        // on attempts its own limit refuses.
        self.by_source.ready(&source, now)?;
        self.node.ready(now)?;
        self.by_source.take(&source, now)?;
        self.node.take(now)
    }
}

struct ConnState {
    hello: bool,
    /// The TLS session's login binding; a login signature must cover it.
    binding: [u8; 32],
    challenge: Option<[u8; 32]>,
    /// The logged-in user and the key it proved.
    user: Option<(String, [u8; 32])>,
    /// Whether that name is registered to that key (known at login, or registered by the
    /// first send).
    registered: bool,
    /// The name the hello claimed; used only by the weakened `forge-sender` mode.
    claimed_name: Option<String>,
    bucket: TokenBucket,
    /// Counts the connection in `connected_clients` until its last request is done.
    _connected: GaugeGuard,
}

/// The chat service for one connection.
#[derive(Clone)]
pub struct ChatServer {
    shared: Arc<ApiShared>,
    conn: Arc<Mutex<ConnState>>,
    /// The connection's hello and requests, for its deadlines.
    activity: Arc<Activity>,
    /// Where the connection comes from, for the registration limits; `None` for this machine.
    source: Option<AddrKey>,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A retention as the wire carries it.
fn wire_retention(r: chat_sm::Retention) -> proto::Retention {
    proto::Retention {
        max_age_ms: r.max_age_ms,
        max_count: r.max_count,
    }
}

/// A state machine rejection as the wire says it.
pub(crate) fn rejected(reason: chat_sm::RejectReason) -> ApiError {
    use chat_sm::RejectReason as R;
    let malformed = |what: &str| RejectReason::Malformed { what: what.into() };
    ApiError::Rejected(match reason {
        R::InvalidChannel => RejectReason::InvalidChannel,
        R::EmptyBody => RejectReason::EmptyBody,
        R::BodyTooLarge { len, max } => RejectReason::BodyTooLarge { len, max },
        R::InvalidSender | R::InvalidUserName => RejectReason::InvalidName,
        R::NameTaken => RejectReason::NameTaken,
        R::BatchTooLarge { .. } => malformed("batch too large"),
        R::Malformed => malformed("command"),
        R::InvalidJoinSecret { .. } => malformed("join secret"),
        R::NotMember => RejectReason::NotMember,
        R::NotOwner => RejectReason::NotOwner,
        R::ChannelExists => RejectReason::ChannelExists,
        R::NotInvited => RejectReason::NotInvited,
        R::UnknownUser => RejectReason::UnknownUser,
        R::TooManyChannels => RejectReason::LimitReached {
            what: "channels you own".into(),
            max: chat_sm::MAX_CHANNELS_PER_USER as u64,
        },
        R::TooManyMembers => RejectReason::LimitReached {
            what: "members and invitations of a channel".into(),
            max: chat_sm::MAX_MEMBERS as u64,
        },
        R::NotPrivate => RejectReason::NotPrivate,
        R::CryptoAlreadySet => RejectReason::CryptoAlreadySet,
        R::CryptoTooLarge { .. } => malformed("crypto record"),
        R::OwnerCannotLeave => RejectReason::OwnerCannotLeave,
        R::InvalidRetention => RejectReason::InvalidRetention,
        R::RetryExpired => RejectReason::RetryExpired {
            window_hours: chat_sm::DEDUP_WINDOW_MS / 3_600_000,
        },
        R::NoSuchMessage => RejectReason::NoSuchMessage,
        R::NotATarget => RejectReason::NotATarget,
        R::MessageDeleted => RejectReason::MessageDeleted,
        R::NotSender => RejectReason::NotSender,
        R::EditFormatChanged => RejectReason::EditFormatChanged,
        R::TooManyEdits => RejectReason::LimitReached {
            what: "edits of a message".into(),
            max: chat_sm::MAX_EDITS as u64,
        },
        R::InvalidReaction => RejectReason::InvalidReaction,
        R::AlreadyReacted => RejectReason::AlreadyReacted,
        R::NotReacted => RejectReason::NotReacted,
        R::InvalidTopic => RejectReason::InvalidTopic,
        R::InvalidDirect => RejectReason::InvalidDirect,
        R::DirectChannel => RejectReason::DirectChannel,
        R::TooManyReactions => RejectReason::LimitReached {
            what: "reactions on a message".into(),
            max: chat_sm::MAX_REACTIONS as u64,
        },
    })
}

/// A relation as the state machine takes it.
fn sm_relation(relation: proto::Relation) -> chat_sm::Relation {
    use chat_sm::ChannelSeq as Seq;
    match relation {
        proto::Relation::Reply { to } => chat_sm::Relation::Reply { to: Seq(to) },
        proto::Relation::Edit { of } => chat_sm::Relation::Edit { of: Seq(of) },
        proto::Relation::Delete { of } => chat_sm::Relation::Delete { of: Seq(of) },
        proto::Relation::React { to, emoji, on } => chat_sm::Relation::React {
            to: Seq(to),
            emoji,
            on,
        },
    }
}

/// A relation as the wire says it.
fn wire_relation(relation: chat_sm::Relation) -> proto::Relation {
    match relation {
        chat_sm::Relation::Reply { to } => proto::Relation::Reply { to: to.0 },
        chat_sm::Relation::Edit { of } => proto::Relation::Edit { of: of.0 },
        chat_sm::Relation::Delete { of } => proto::Relation::Delete { of: of.0 },
        chat_sm::Relation::React { to, emoji, on } => proto::Relation::React {
            to: to.0,
            emoji,
            on,
        },
    }
}

/// Refuses a read of a private channel by a non-member.
pub(crate) fn check_admitted(chat: &ChatState, channel: &str, user: &str) -> Result<(), ApiError> {
    if chat.admits(channel, user) {
        Ok(())
    } else {
        Err(ApiError::Rejected(RejectReason::NotMember))
    }
}

fn channel_info(chat: &ChatState, listing: chat_sm::ChannelListing) -> ChannelInfo {
    ChannelInfo {
        direct: direct_members(chat, &listing.name),
        name: listing.name,
        head: listing.head.0,
        owner: listing.owner,
        private: listing.private,
        invited: listing.invited,
        encrypted: listing.encrypted,
        read_to: listing.read_to.0,
    }
}

/// The members of `channel` when it is a direct conversation; empty otherwise.
fn direct_members(chat: &ChatState, channel: &str) -> Vec<String> {
    if !chat_sm::is_direct_channel(channel) {
        return Vec::new();
    }
    (chat.channel_record(channel))
        .map(|r| r.members.into_iter().collect())
        .unwrap_or_default()
}

/// Refuses a channel name the state machine would reject, before any read or wait.
pub(crate) fn check_channel(channel: &str) -> Result<(), ApiError> {
    chat_sm::ChannelName::new(channel)
        .map(drop)
        .map_err(rejected)
}

/// A failed read of `channel` from the chat state: logged here, since its text never crosses
/// the wire.
pub(crate) fn storage_error(channel: &str) -> impl FnOnce(chat_sm::Error) -> ApiError + '_ {
    move |e| {
        tracing::error!(error = %e, %channel, "chat state read failed");
        ApiError::unavailable("storage read failed")
    }
}

pub(crate) fn to_wire(message: chat_sm::Message) -> WireMessage {
    let meta = message.meta;
    WireMessage {
        channel: message.channel,
        seq: message.seq.0,
        sender: message.sender,
        body: message.body,
        at_ms: message.at_ms,
        client_seq: message.client_seq,
        relation: meta.relation.map(wire_relation),
        deleted: meta.deleted,
        edits: u32::try_from(meta.edits.len()).unwrap_or(u32::MAX),
        edit: message.edit.map(|edit| Box::new(to_wire(*edit))),
        replies: meta.replies,
        reactions: meta
            .reactions
            .into_iter()
            .map(|(emoji, users)| proto::Reaction {
                emoji,
                users: users.into_iter().collect(),
            })
            .collect(),
    }
}

/// What a client is told when a batched write (a send, read markers) was not applied here.
fn propose_error(e: ProposeError) -> ApiError {
    match e {
        ProposeError::NotLeader { leader } => not_leader(leader),
        ProposeError::Unavailable(reason) => ApiError::unavailable(reason),
    }
}

fn not_leader(leader: Option<(NodeId, Member)>) -> ApiError {
    let hint = leader.and_then(|(id, member)| {
        let client_addr = member.client_addr.parse().ok()?;
        Some(LeaderHint { id, client_addr })
    });
    ApiError::NotLeader { leader: hint }
}

impl ChatServer {
    /// A server value for a new connection whose TLS session has login binding `binding`,
    /// from `source` (`None`: this machine; see [`crate::conn_limit::addr_key`]).
    pub fn new(shared: Arc<ApiShared>, binding: [u8; 32], source: Option<AddrKey>) -> ChatServer {
        let conn = ConnState {
            hello: false,
            binding,
            challenge: None,
            user: None,
            registered: false,
            claimed_name: None,
            bucket: TokenBucket::new(shared.conn_rate_per_s, shared.conn_burst),
            _connected: GaugeGuard::new(&shared.metrics.connected_clients),
        };
        ChatServer {
            shared,
            conn: Arc::new(Mutex::new(conn)),
            activity: Activity::new(),
            source,
        }
    }

    /// A server value for a web client's socket (`web.rs`), its hello done: the login binding
    /// is [`proto::web_binding`] of the challenge, since a browser cannot read its TLS
    /// session's exporter. Answers the welcome the page gets.
    pub(crate) fn for_web(
        shared: Arc<ApiShared>,
        source: Option<AddrKey>,
    ) -> (ChatServer, Welcome) {
        let server = ChatServer::new(shared, [0; 32], source);
        let challenge: [u8; 32] = rand::random();
        {
            let mut conn = server.conn.lock();
            conn.hello = true;
            conn.challenge = Some(challenge);
            conn.binding = proto::web_binding(&challenge);
        }
        server.activity.hello_done();
        let welcome = Welcome {
            node_id: server.shared.id,
            cluster: server.shared.cluster.clone(),
            protocol: proto::PROTOCOL_VERSION,
            challenge,
            server_time_ms: now_ms(),
        };
        (server, welcome)
    }

    /// A server value acting for `user`, who proved `public_key` to the member that forwarded
    /// the call (`web.rs`): members are trusted to authenticate their users, as they are to
    /// stamp senders. Rate limits and registration limits apply here as on a connection.
    pub(crate) fn on_behalf(
        shared: Arc<ApiShared>,
        user: String,
        public_key: [u8; 32],
        source: Option<AddrKey>,
    ) -> ChatServer {
        let registered = shared.chat.user_key(&user) == Some(public_key);
        let server = ChatServer::new(shared, [0; 32], source);
        {
            let mut conn = server.conn.lock();
            conn.hello = true;
            conn.user = Some((user, public_key));
            conn.registered = registered;
        }
        server.activity.hello_done();
        server
    }

    /// The logged-in user and the key it proved, if any.
    pub(crate) fn logged_in(&self) -> Option<(String, [u8; 32])> {
        self.conn.lock().user.clone()
    }

    /// What the connection's watchdog needs (see [`crate::conn_watch::serve_watched`]).
    pub fn watch(&self) -> ConnWatch {
        ConnWatch {
            activity: self.activity.clone(),
            idle: self.shared.client_idle_timeout,
        }
    }

    /// Marks a request in flight until the guard drops.
    fn busy(&self) -> Busy {
        self.activity.busy()
    }

    /// The client seq to propose: the client's own, or, in the deliberately broken
    /// `skip-dedup` mode, a fresh random one (top bit set, so it never meets a real one) that
    /// makes the state machine apply a retry as a new message. The rewritten seq is inside the
    /// entry, so every replica still applies the same command.
    fn client_seq(&self, requested: u64) -> u64 {
        if self.shared.weaken.skip_dedup {
            rand::random::<u64>() | 1 << 63
        } else {
            requested
        }
    }

    /// Every call but `hello` and `ping` needs a hello on this connection and a token of its
    /// rate limit.
    fn require_hello(&self) -> Result<(), ApiError> {
        let mut conn = self.conn.lock();
        if !conn.hello {
            return Err(ApiError::Unauthenticated);
        }
        conn.bucket.take_now()
    }

    /// Reads need a logged-in user on this connection (and a token of its rate limit); answers
    /// the user's name.
    fn require_login(&self) -> Result<String, ApiError> {
        self.require_hello()?;
        let conn = self.conn.lock();
        let (name, _) = conn.user.as_ref().ok_or(ApiError::Unauthenticated)?;
        Ok(name.clone())
    }

    /// Registers the logged-in name through the leader unless it is known to be registered:
    /// a name's first write registers it (trust on first use).
    async fn ensure_registered(&self, user: &str, public_key: [u8; 32]) -> Result<(), ApiError> {
        if self.conn.lock().registered {
            return Ok(());
        }
        register(&self.shared, self.source, user, public_key).await?;
        self.conn.lock().registered = true;
        Ok(())
    }

    /// Takes a token of `user`'s write rate limit.
    fn take_user_token(&self, user: &str) -> Result<(), ApiError> {
        (self.shared.user_buckets.lock())
            .take(user, Instant::now())
            .map_err(|retry_after_ms| ApiError::RateLimited { retry_after_ms })
    }

    /// Waits until this node applied `read_token`, within `budget`.
    async fn wait_token(&self, read_token: u64, budget: Duration) -> Result<(), ApiError> {
        if self.shared.delivery.wait_applied(read_token, budget).await {
            Ok(())
        } else {
            Err(ApiError::unavailable("node is behind the read token"))
        }
    }

    fn batch(&self, channel: &str, messages: Vec<chat_sm::Message>) -> MessageBatch {
        MessageBatch {
            channel: channel.to_owned(),
            head: self.shared.chat.head(channel).0,
            applied: self.shared.delivery.applied(),
            messages: messages.into_iter().map(to_wire).collect(),
            floor: self.shared.chat.floor(channel).0,
        }
    }
}

/// Checks a login made on a connection whose hello gave `challenge` and whose TLS session has
/// `binding`: the signature, then the name's registered key. Returns whether the name is
/// registered to this key. A name this node has not seen registered logs in all the same (the
/// signature proves the key): it may read, and its first send registers it through the leader
/// (trust on first use), so logging in needs no leader and no log write. Shared by chat and
/// push connections.
///
/// # Errors
/// [`ApiError::Unauthenticated`] for a bad signature, `NameTaken` for another key,
/// `InvalidName`.
pub(crate) fn verify_login(
    shared: &ApiShared,
    challenge: &[u8; 32],
    binding: &[u8; 32],
    req: &Login,
) -> Result<bool, ApiError> {
    if !chat_sm::valid_user_name(&req.name) {
        return Err(ApiError::Rejected(RejectReason::InvalidName));
    }
    let message = proto::login_message(challenge, binding, &shared.cluster, &req.name);
    let verified = VerifyingKey::from_bytes(&req.public_key).is_ok_and(|key| {
        Signature::from_slice(&req.signature)
            .is_ok_and(|signature| key.verify_strict(&message, &signature).is_ok())
    });
    if !verified {
        return Err(ApiError::Unauthenticated);
    }
    match shared.chat.user_key(&req.name) {
        Some(registered) if registered == req.public_key => Ok(true),
        Some(_) => Err(ApiError::Rejected(RejectReason::NameTaken)),
        None => Ok(false),
    }
}

/// Registers `name` to `public_key` through the leader, within the registration limits for
/// `source` (see [`Registrations`]).
async fn register(
    shared: &ApiShared,
    source: Option<AddrKey>,
    name: &str,
    public_key: [u8; 32],
) -> Result<(), ApiError> {
    (shared.registrations.lock())
        .admit(source, Instant::now())
        .map_err(|retry_after_ms| ApiError::RateLimited { retry_after_ms })?;
    let name = name.to_owned();
    let command = Command::RegisterUser { name, public_key };
    match write_command(shared, command, "registration").await?.0 {
        ChatResponse::Registered => Ok(()),
        ChatResponse::Rejected(reason) => Err(rejected(reason)),
        other => panic!("state machine answered a registration with {other:?}"),
    }
}

/// Writes one command that is not a send (those go through the proposer) as its own log
/// entry on this node, which must lead; answers the state machine's response and the entry's
/// index (a read token).
async fn write_command(
    shared: &ApiShared,
    command: Command,
    what: &'static str,
) -> Result<(ChatResponse, u64), ApiError> {
    // Boxed: openraft's write future is kilobytes, and held inline it would make every
    // request future on the connection that large (the send handler awaits this on its rare
    // paths), to be copied on each request.
    match Box::pin(shared.raft.client_write(command.into())).await {
        Ok(response) => Ok((response.data, response.log_id.index)),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            Err(not_leader(f.leader_id.zip(f.leader_node)))
        }
        Err(e) => {
            tracing::warn!(error = %e, what, "write failed");
            Err(ApiError::unavailable("raft unavailable"))
        }
    }
}

impl proto::Chat for ChatServer {
    async fn hello(self, _: Context, req: Hello) -> Result<Welcome, ApiError> {
        let _busy = self.busy();
        proto::check_hello(&req, &self.shared.cluster)?;
        let challenge: [u8; 32] = rand::random();
        let mut conn = self.conn.lock();
        conn.hello = true;
        conn.challenge = Some(challenge);
        conn.claimed_name = req.client_name.clone();
        self.activity.hello_done();
        Ok(Welcome {
            node_id: self.shared.id,
            cluster: self.shared.cluster.clone(),
            protocol: proto::PROTOCOL_VERSION,
            challenge,
            server_time_ms: now_ms(),
        })
    }

    #[tracing::instrument(level = "debug", skip_all, fields(user = %req.name))]
    async fn login(self, _: Context, req: Login) -> Result<Session, ApiError> {
        let _busy = self.busy();
        self.require_hello()?;
        let challenge = self.conn.lock().challenge.take();
        let challenge = challenge.ok_or(ApiError::Unauthenticated)?;
        let binding = self.conn.lock().binding;
        let registered = verify_login(&self.shared, &challenge, &binding, &req)?;
        let mut conn = self.conn.lock();
        conn.user = Some((req.name.clone(), req.public_key));
        conn.registered = registered;
        drop(conn);
        Ok(Session { name: req.name })
    }

    #[tracing::instrument(level = "debug", skip_all, fields(channel = %req.channel, client_seq = req.client_seq))]
    async fn send(self, _: Context, req: SendRequest) -> Result<SendReply, ApiError> {
        let _busy = self.busy();
        let started = Instant::now();
        self.require_hello()?;
        let (user, claimed) = {
            let conn = self.conn.lock();
            (conn.user.clone(), conn.claimed_name.clone())
        };
        let (mut user, public_key) = user.ok_or(ApiError::Unauthenticated)?;
        self.take_user_token(&user)?;
        // The first send of a name this node did not know registers it (on the leader; a
        // follower answers NotLeader as for the send itself).
        self.ensure_registered(&user, public_key).await?;
        if self.shared.weaken.forge_sender {
            // A lying node: it stamps whatever name the hello claimed.
            user = claimed.unwrap_or(user);
        }
        // Cheap checks before the log, so junk never takes log space; apply repeats them
        // deterministically.
        if req.body.len() > chat_sm::MAX_BODY_BYTES {
            return Err(ApiError::Rejected(RejectReason::BodyTooLarge {
                len: req.body.len() as u64,
                max: chat_sm::MAX_BODY_BYTES as u64,
            }));
        }
        let send = SendCmd {
            channel: req.channel,
            sender: user,
            body: req.body,
            client_id: ClientId(req.client_id),
            client_seq: self.client_seq(req.client_seq),
            at_ms: now_ms(),
        };
        let proposed = match req.relation {
            // Relations are rare next to sends: each is an entry of its own, so the batched
            // path stays as it is.
            Some(relation) => {
                let command = Command::Relate(chat_sm::RelateCmd {
                    send,
                    relation: sm_relation(relation),
                });
                let (response, log_index) =
                    write_command(&self.shared, command, "relation").await?;
                let result = match response {
                    ChatResponse::Sent(sent) => Ok(sent),
                    ChatResponse::Rejected(reason) => Err(reason),
                    other => panic!("state machine answered a relation with {other:?}"),
                };
                crate::proposer::Proposed { result, log_index }
            }
            None => {
                let outcome = self.shared.proposer.propose(send).await;
                outcome.map_err(propose_error)?
            }
        };
        self.shared.metrics.observe_rpc("send", started.elapsed());
        let sent = proposed.result.map_err(rejected)?;
        self.shared.metrics.sends_total.inc();
        Ok(SendReply {
            channel: sent.channel,
            seq: sent.seq.0,
            at_ms: sent.at_ms,
            read_token: proposed.log_index,
            duplicate: sent.duplicate,
        })
    }

    async fn stream(self, ctx: Context, req: StreamRequest) -> Result<MessageBatch, ApiError> {
        let _busy = self.busy();
        let started = Instant::now();
        let user = self.require_login()?;
        check_channel(&req.channel)?;
        let budget = wait_budget(&ctx, req.wait_ms);
        let deadline = Instant::now() + budget;
        self.wait_token(req.read_token, budget).await?;
        check_admitted(&self.shared.chat, &req.channel, &user)?;
        let max = req.max.clamp(1, BATCH_MESSAGES_MAX) as usize;
        let chat = &self.shared.chat;
        let from = ChannelSeq(req.after_seq.saturating_add(1));
        let read = || {
            chat.history(&req.channel, from, max)
                .map_err(storage_error(&req.channel))
        };
        let mut messages = read()?;
        if messages.is_empty() {
            let _waiting = GaugeGuard::new(&self.shared.metrics.stream_waiters);
            let remaining = deadline.saturating_duration_since(Instant::now());
            let head = || chat.head(&req.channel).0;
            let delivery = &self.shared.delivery;
            if delivery
                .wait_head(&req.channel, req.after_seq, head, remaining)
                .await
            {
                // Membership may have ended while waiting.
                check_admitted(chat, &req.channel, &user)?;
                messages = read()?;
            }
        }
        cap_reply(&mut messages, Keep::Oldest, REPLY_BYTES_MAX);
        let metrics = &self.shared.metrics;
        metrics.deliveries_total.inc_by(messages.len() as u64);
        metrics.observe_rpc("stream", started.elapsed());
        Ok(self.batch(&req.channel, messages))
    }

    async fn history(self, ctx: Context, req: HistoryRequest) -> Result<MessageBatch, ApiError> {
        let _busy = self.busy();
        let started = Instant::now();
        let user = self.require_login()?;
        check_channel(&req.channel)?;
        self.wait_token(req.read_token, wait_budget(&ctx, proto::STREAM_WAIT_MS_MAX))
            .await?;
        check_admitted(&self.shared.chat, &req.channel, &user)?;
        let limit = req.limit.clamp(1, BATCH_MESSAGES_MAX) as usize;
        let (chat, channel) = (&self.shared.chat, &req.channel);
        let (messages, keep) = match (req.from_seq, req.before_seq) {
            (Some(from), _) => (chat.history(channel, ChannelSeq(from), limit), Keep::Oldest),
            (None, before) => {
                let before = ChannelSeq(before.unwrap_or(u64::MAX));
                (chat.history_before(channel, before, limit), Keep::Newest)
            }
        };
        let mut messages = messages.map_err(storage_error(channel))?;
        cap_reply(&mut messages, keep, REPLY_BYTES_MAX);
        self.shared
            .metrics
            .observe_rpc("history", started.elapsed());
        Ok(self.batch(&req.channel, messages))
    }

    async fn channels(self, ctx: Context, req: ChannelsRequest) -> Result<ChannelPage, ApiError> {
        let _busy = self.busy();
        let user = self.require_login()?;
        self.wait_token(req.read_token, wait_budget(&ctx, proto::STREAM_WAIT_MS_MAX))
            .await?;
        let limit = req.limit.min(proto::CHANNEL_PAGE_MAX) as usize;
        let (page, more) = (self.shared.chat)
            .channel_page(&user, req.after.as_deref(), limit)
            .map_err(|e| {
                tracing::error!(error = %e, "cannot list channels");
                ApiError::unavailable("storage error")
            })?;
        Ok(ChannelPage {
            channels: (page.into_iter())
                .map(|listing| channel_info(&self.shared.chat, listing))
                .collect(),
            more,
        })
    }

    async fn channel_info(
        self,
        ctx: Context,
        req: ChannelInfoRequest,
    ) -> Result<ChannelDetail, ApiError> {
        let _busy = self.busy();
        let user = self.require_login()?;
        check_channel(&req.channel)?;
        self.wait_token(req.read_token, wait_budget(&ctx, proto::STREAM_WAIT_MS_MAX))
            .await?;
        let chat = &self.shared.chat;
        let head = chat.head(&req.channel);
        let record = chat.channel_record(&req.channel).unwrap_or_default();
        if !record.visible_to(&user) {
            return Err(ApiError::Rejected(RejectReason::NotMember));
        }
        let read_to = (chat.read_marker(&user, &req.channel))
            .map_err(storage_error(&req.channel))?
            .0;
        let info = ChannelInfo {
            direct: direct_members(chat, &req.channel),
            name: req.channel,
            head: head.0,
            owner: record.owner,
            private: record.private,
            invited: record.invited.contains(&user),
            encrypted: record.crypto.is_some(),
            read_to,
        };
        let retention = chat.retention(&info.name);
        let topic = chat.topic(&info.name);
        Ok(ChannelDetail {
            info,
            members: record.members.into_iter().collect(),
            invited: record.invited.into_iter().collect(),
            crypto: record.crypto,
            retention: retention.own.map(wire_retention),
            default_retention: wire_retention(retention.default),
            floor: retention.floor.0,
            topic,
        })
    }

    #[tracing::instrument(level = "debug", skip_all, fields(channel = %req.channel))]
    async fn channel(self, _: Context, req: ChannelRequest) -> Result<u64, ApiError> {
        let _busy = self.busy();
        self.require_hello()?;
        let user = self.conn.lock().user.clone();
        let (user, public_key) = user.ok_or(ApiError::Unauthenticated)?;
        check_channel(&req.channel)?;
        self.take_user_token(&user)?;
        self.ensure_registered(&user, public_key).await?;
        let op = match req.change {
            ChannelChange::Create { private, crypto } => {
                chat_sm::ChannelOp::Create { private, crypto }
            }
            ChannelChange::SetCrypto(crypto) => chat_sm::ChannelOp::SetCrypto(crypto),
            ChannelChange::Invite(name) => chat_sm::ChannelOp::Invite(name),
            ChannelChange::Accept => chat_sm::ChannelOp::Accept,
            ChannelChange::Remove(name) => chat_sm::ChannelOp::Remove(name),
            ChannelChange::SetTopic(topic) => chat_sm::ChannelOp::SetTopic(topic),
            ChannelChange::CreateDirect { members, crypto } => {
                chat_sm::ChannelOp::CreateDirect { members, crypto }
            }
            ChannelChange::SetRetention(retention) => {
                chat_sm::ChannelOp::SetRetention(retention.map(|r| chat_sm::Retention {
                    max_age_ms: r.max_age_ms,
                    max_count: r.max_count,
                }))
            }
        };
        let command = Command::Channel {
            channel: req.channel,
            by: user,
            op,
        };
        match write_command(&self.shared, command, "channel change").await? {
            (ChatResponse::ChannelUpdated, index) => Ok(index),
            (ChatResponse::Rejected(reason), _) => Err(rejected(reason)),
            (other, _) => panic!("state machine answered a channel change with {other:?}"),
        }
    }

    async fn user_keys(self, _: Context, names: Vec<String>) -> Result<Vec<UserKey>, ApiError> {
        let _busy = self.busy();
        self.require_login()?;
        if names.len() > proto::USER_KEYS_MAX {
            return Err(ApiError::Rejected(RejectReason::Malformed {
                what: "too many names".into(),
            }));
        }
        let chat = &self.shared.chat;
        Ok(names
            .into_iter()
            .map(|name| UserKey {
                public_key: chat.user_key(&name),
                name,
            })
            .collect())
    }

    async fn cluster(self, _: Context) -> Result<ClusterInfo, ApiError> {
        let _busy = self.busy();
        self.require_hello()?;
        let metrics = crate::raft::metrics_now(&self.shared.raft);
        let membership = metrics.membership_config.membership();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let parse = |s: &str| {
            s.parse()
                .map_err(|_| ApiError::unavailable("bad member address"))
        };
        let mut nodes = Vec::new();
        for (&id, member) in membership.nodes() {
            let (role, applied) = if id == self.shared.id {
                (role_of(metrics.state), self.shared.delivery.applied())
            } else if let Some(peer) = self.shared.peers.get(id) {
                (peer.role, peer.applied)
            } else {
                (Role::Unknown, 0)
            };
            nodes.push(NodeInfo {
                id,
                role,
                client_addr: parse(&member.client_addr)?,
                raft_addr: parse(&member.raft_addr)?,
                metrics_addr: parse(&member.metrics_addr)?,
                applied,
                voter: voters.contains(&id),
            });
        }
        Ok(ClusterInfo {
            cluster: self.shared.cluster.clone(),
            leader: metrics.current_leader,
            term: metrics.current_term,
            nodes,
        })
    }

    async fn ping(self, _: Context, nonce: u64) -> Pong {
        let _busy = self.busy();
        let metrics = crate::raft::metrics_now(&self.shared.raft);
        Pong {
            nonce,
            node_id: self.shared.id,
            role: role_of(metrics.state),
            applied: self.shared.delivery.applied(),
            server_time_ms: now_ms(),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(channel = %req.channel, seq = req.seq))]
    async fn mark_read(self, _: Context, req: MarkReadRequest) -> Result<MarkReadReply, ApiError> {
        let _busy = self.busy();
        let started = Instant::now();
        self.require_hello()?;
        let user = self.conn.lock().user.clone();
        let (user, public_key) = user.ok_or(ApiError::Unauthenticated)?;
        check_channel(&req.channel)?;
        // Cheap checks before the log, as for a send; apply repeats them deterministically.
        let chat = &self.shared.chat;
        check_admitted(chat, &req.channel, &user)?;
        if req.seq == 0 || req.seq > chat.head(&req.channel).0 {
            return Err(ApiError::Rejected(RejectReason::NoSuchMessage));
        }
        self.ensure_registered(&user, public_key).await?;
        let mark = chat_sm::ReadMark {
            user,
            channel: req.channel,
            seq: ChannelSeq(req.seq),
        };
        let marked = (self.shared.read_marks.mark(mark).await).map_err(propose_error)?;
        self.shared
            .metrics
            .observe_rpc("mark_read", started.elapsed());
        let read_to = marked.result.map_err(rejected)?;
        Ok(MarkReadReply {
            read_to: read_to.0,
            read_token: marked.log_index,
        })
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn search(self, ctx: Context, req: SearchRequest) -> Result<SearchReply, ApiError> {
        let _busy = self.busy();
        let started = Instant::now();
        let user = self.require_login()?;
        let query = proto::search::Query::parse(&req.query)
            .map_err(|e| ApiError::Rejected(RejectReason::BadQuery(e)))?;
        // A search costs up to milliseconds of CPU, unlike a read: it spends the user's
        // write budget, so a flood of them is paced like a flood of sends.
        self.take_user_token(&user)?;
        let budget = wait_budget(&ctx, proto::STREAM_WAIT_MS_MAX);
        let mut covered = self.shared.searcher.covered();
        let behind = *covered.borrow() < req.read_token;
        let _waiting = behind.then(|| self.shared.searcher.waiting());
        let wait = covered.wait_for(|&covered| covered >= req.read_token);
        let indexed = match tokio::time::timeout(budget, wait).await {
            Ok(Ok(covered)) => *covered,
            _ => {
                return Err(ApiError::unavailable(
                    "the search index is behind the read token",
                ))
            }
        };
        let limit = req.limit.clamp(1, proto::SEARCH_HITS_MAX) as usize;
        let shared = self.shared.clone();
        let found = tokio::task::spawn_blocking(move || {
            let chat = &shared.chat;
            let page = shared
                .searcher
                .query(&query, |channel| chat.admits(channel, &user), limit);
            let mut messages = Vec::with_capacity(page.hits.len());
            for hit in page.hits {
                // Read back, so what was deleted or expired since it was indexed is left out
                // and an edited message shows its current text.
                let read = chat.history(&hit.channel, ChannelSeq(hit.seq), 1);
                let message = read.map_err(storage_error(&hit.channel))?.pop();
                if let Some(m) = message.filter(|m| m.seq.0 == hit.seq && !m.meta.deleted) {
                    messages.push(to_wire(m));
                }
            }
            Ok::<_, ApiError>(SearchReply {
                messages,
                truncated: page.truncated,
                indexed,
            })
        })
        .await
        .map_err(|_| ApiError::unavailable("search failed"))??;
        self.shared.metrics.searches_total.inc();
        self.shared.metrics.observe_rpc("search", started.elapsed());
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `f` returns, without calling it.
    fn returned_size<A, F: FnOnce(A) -> Fut, Fut>(_: F) -> usize {
        std::mem::size_of::<Fut>()
    }

    #[test]
    fn a_send_request_future_holds_no_raft_write_inline() {
        // Every request on a connection is as large as the largest method's future, and it is
        // copied several times on its way into the connection's task. The rare raft writes
        // (registration, relations, channel changes, marks) are boxed to keep it small.
        let limit = 2_048;
        let send = returned_size(|(s, c, r): (ChatServer, Context, SendRequest)| {
            proto::Chat::send(s, c, r)
        });
        assert!(send <= limit, "send's future is {send} bytes");
        let channel = returned_size(|(s, c, r): (ChatServer, Context, ChannelRequest)| {
            proto::Chat::channel(s, c, r)
        });
        assert!(channel <= limit, "channel's future is {channel} bytes");
        let mark = returned_size(|(s, c, r): (ChatServer, Context, MarkReadRequest)| {
            proto::Chat::mark_read(s, c, r)
        });
        assert!(mark <= limit, "mark_read's future is {mark} bytes");
    }

    #[test]
    fn clients_and_the_state_machine_name_direct_conversations_alike() {
        let sets: [&[&str]; 4] = [
            &["alice", "bob"],
            &["bob", "alice", "bob"],
            &["Zed", "a-b", "c_d", "x"],
            &["u0", "u1", "u2", "u3", "u4", "u5", "u6", "u7"],
        ];
        for set in sets {
            assert_eq!(
                proto::direct_channel_name(set),
                chat_sm::direct_channel_name(set)
            );
        }
    }

    #[test]
    fn a_bucket_allows_its_burst_then_says_when_to_retry() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10, 3);
        for _ in 0..3 {
            bucket.take(start).unwrap();
        }
        let retry = bucket.take(start).unwrap_err();
        assert_eq!(retry, 100, "one token per 100 ms at 10/s");
        bucket.take(start + Duration::from_millis(100)).unwrap();
    }

    /// A small xorshift generator, so the test needs no seed plumbing and replays exactly.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn dropping_full_buckets_changes_no_decision() {
        let start = Instant::now();
        let mut bounded = BucketMap::new(10.0, 3, USER_BUCKETS_MAX);
        let mut unbounded: HashMap<u64, TokenBucket> = HashMap::new();
        let (mut now, mut rng) = (start, 0x9e37_79b9_7f4a_7c15u64);
        let (mut refused, mut largest) = (0, 0);
        for _ in 0..200_000 {
            now += Duration::from_micros(next(&mut rng) % 200);
            // Few hot keys, many cold ones, so buckets both run dry and are swept.
            let key = match next(&mut rng) % 4 {
                0 => next(&mut rng) % 8,
                _ => next(&mut rng) % 20_000,
            };
            let expected = (unbounded.entry(key))
                .or_insert_with(|| TokenBucket::at(10.0, 3, now))
                .take(now);
            assert_eq!(bounded.take(&key, now), expected);
            refused += usize::from(expected.is_err());
            largest = largest.max(bounded.buckets.len());
        }
        assert!(refused > 1000, "the hot keys ran dry ({refused} refusals)");
        assert!(largest < unbounded.len() / 2, "{largest} buckets kept");
    }

    #[test]
    fn a_full_map_refuses_new_keys_until_a_tenth_is_full_again() {
        let start = Instant::now();
        // One token per second: a bucket is full again a second after its last take.
        let mut map = BucketMap::new(1.0, 1, 20);
        for key in 0..20u32 {
            let at = start + Duration::from_millis(u64::from(key) * 10);
            map.take(&key, at).unwrap();
        }
        // Keys 0, 1 and 2 (more than a tenth) are full again 1001, 1011 and 1021 ms in.
        let retry = map
            .take(&100, start + Duration::from_millis(500))
            .unwrap_err();
        assert_eq!(retry, 521);
        assert_eq!(map.buckets.len(), 20);
        // Known keys still answer from their own buckets meanwhile.
        assert!(map.take(&19, start + Duration::from_millis(600)).is_err());
        let later = start + Duration::from_millis(1021);
        for key in 100..103 {
            map.take(&key, later).unwrap();
        }
        assert_eq!(map.buckets.len(), 20, "keys 0, 1 and 2 made room");
        assert!(map.take(&103, later).is_err());
    }

    fn source(last: u8) -> Option<AddrKey> {
        let peer = std::net::IpAddr::from([192, 0, 2, last]);
        crate::conn_limit::addr_key(peer, Some([10, 0, 0, 1].into()))
    }

    #[test]
    fn registrations_are_limited_per_source_and_per_node() {
        let limits = RegistrationLimits {
            ip_rate_per_min: 6,
            ip_burst: 2,
            node_rate_per_min: 60,
            node_burst: 5,
        };
        let mut regs = Registrations::new(limits);
        let now = Instant::now();
        regs.admit(source(1), now).unwrap();
        regs.admit(source(1), now).unwrap();
        // 6 a minute: the next token in 10 s.
        assert_eq!(regs.admit(source(1), now), Err(10_000));
        // The refusals took nothing from the node's budget: three more sources fit it.
        for _ in 0..5 {
            assert!(regs.admit(source(1), now).is_err());
        }
        regs.admit(source(2), now).unwrap();
        regs.admit(source(2), now).unwrap();
        regs.admit(source(3), now).unwrap();
        // The node's burst of 5 is spent, whatever the source; refilled at 1 a second.
        assert_eq!(regs.admit(source(4), now), Err(1_000));
        assert_eq!(
            regs.by_source.buckets.len(),
            3,
            "a refused source gets no bucket"
        );
        regs.admit(source(4), now + Duration::from_secs(1)).unwrap();
        // This machine is not counted.
        for _ in 0..100 {
            regs.admit(None, now).unwrap();
        }
    }

    fn message(seq: u64, body_len: usize) -> chat_sm::Message {
        chat_sm::Message {
            channel: "c".into(),
            seq: ChannelSeq(seq),
            sender: "s".into(),
            body: vec![0; body_len],
            at_ms: 0,
            client_id: ClientId([0; 16]),
            client_seq: seq,
            meta: chat_sm::MessageMeta::default(),
            edit: None,
        }
    }

    /// Messages whose reply size is exactly 100 bytes each.
    fn page(seqs: std::ops::RangeInclusive<u64>) -> Vec<chat_sm::Message> {
        let overhead = reply_bytes(&message(0, 0));
        seqs.map(|seq| message(seq, 100 - overhead)).collect()
    }

    fn seqs(messages: &[chat_sm::Message]) -> Vec<u64> {
        messages.iter().map(|m| m.seq.0).collect()
    }

    #[test_case::test_case(Keep::Oldest, 1000, vec![1, 2, 3, 4, 5] ; "under the cap: all")]
    #[test_case::test_case(Keep::Oldest, 300, vec![1, 2, 3] ; "oldest: cut at the end")]
    #[test_case::test_case(Keep::Newest, 300, vec![3, 4, 5] ; "newest: cut at the start")]
    #[test_case::test_case(Keep::Oldest, 299, vec![1, 2] ; "one byte short")]
    #[test_case::test_case(Keep::Oldest, 10, vec![1] ; "one message always, oldest")]
    #[test_case::test_case(Keep::Newest, 10, vec![5] ; "one message always, newest")]
    fn cap_reply_table(keep: Keep, max: usize, expected: Vec<u64>) {
        let mut messages = page(1..=5);
        cap_reply(&mut messages, keep, max);
        assert_eq!(seqs(&messages), expected);
    }

    #[test]
    fn a_full_page_of_the_largest_messages_is_cut_to_the_cap() {
        let mut messages: Vec<_> = (1..=u64::from(BATCH_MESSAGES_MAX))
            .map(|seq| message(seq, chat_sm::MAX_BODY_BYTES))
            .collect();
        cap_reply(&mut messages, Keep::Oldest, REPLY_BYTES_MAX);
        let bytes: usize = messages.iter().map(reply_bytes).sum();
        assert!(bytes <= REPLY_BYTES_MAX);
        assert!(bytes + reply_bytes(&messages[0]) > REPLY_BYTES_MAX);
        assert_eq!(messages[0].seq, ChannelSeq(1));
        let mut empty = Vec::new();
        cap_reply(&mut empty, Keep::Newest, 0);
        assert!(empty.is_empty());
    }
}
