//! The client-facing `proto::Chat` service of one node; step 2 of "Life of a chat message" in
//! ARCHITECTURE.md.
//!
//! tarpc serves one `ChatServer` value per connection, holding its hello, login challenge,
//! user and rate-limit bucket. Reads are served by any node from its applied state once it has
//! applied the caller's read token. `send` needs a login; a follower answers `NotLeader` and
//! does not forward, so a send is never in flight on two nodes at once and the client always
//! knows which node to retry.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chat_sm::{ChannelSeq, ChatResponse, ChatState, ClientId, Command, SendCmd};
use ed25519_dalek::{Signature, VerifyingKey};
use openraft::error::{ClientWriteError, RaftError};
use parking_lot::Mutex;
use proto::{
    wait_budget, ApiError, ChannelChange, ChannelDetail, ChannelInfo, ChannelInfoRequest,
    ChannelPage, ChannelRequest, ChannelsRequest, ClusterInfo, Hello, HistoryRequest, LeaderHint,
    Login, MessageBatch, NodeInfo, Pong, RejectReason, Role, SendReply, SendRequest, Session,
    StreamRequest, UserKey, Welcome, WireMessage,
};
use tarpc::context::Context;

use crate::cluster::{role_of, Peers};
use crate::conn_watch::{Activity, Busy, ConnWatch};
use crate::delivery::Delivery;
use crate::metrics::{GaugeGuard, Metrics};
use crate::proposer::{ProposeError, Proposer};
use crate::raft::Raft;
use crate::types::{Member, NodeId};

/// Most messages one `stream` or `history` call returns.
pub const BATCH_MESSAGES_MAX: u32 = 1000;

/// Most bytes of messages one `stream` or `history` reply carries (at least one message
/// always goes, and one fits easily). A thousand full-size messages would make a reply of
/// 16 MiB, held in memory at once on both ends; clients page on from the last message they
/// got, so a shorter page only costs a round trip.
pub const REPLY_BYTES_MAX: usize = 4 << 20;

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
/// buckets (sustained per second, burst): `user_*` for each user's sends, `conn_*` for every
/// request of one connection.
pub struct ApiShared {
    pub id: NodeId,
    pub cluster: String,
    /// For leader and membership queries and user registration.
    pub raft: Raft,
    /// Applied chat state, for reads.
    pub chat: Arc<ChatState>,
    pub delivery: Delivery,
    pub proposer: Proposer,
    /// Nodes heard by discovery (roles and applied indexes of others).
    pub peers: Peers,
    pub metrics: Arc<Metrics>,
    pub user_buckets: Mutex<HashMap<String, TokenBucket>>,
    pub user_rate_per_s: u32,
    pub user_burst: u32,
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
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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
    })
}

/// Refuses a read of a private channel by a non-member.
pub(crate) fn check_admitted(chat: &ChatState, channel: &str, user: &str) -> Result<(), ApiError> {
    if chat.admits(channel, user) {
        Ok(())
    } else {
        Err(ApiError::Rejected(RejectReason::NotMember))
    }
}

fn channel_info(listing: chat_sm::ChannelListing) -> ChannelInfo {
    ChannelInfo {
        name: listing.name,
        head: listing.head.0,
        owner: listing.owner,
        private: listing.private,
        invited: listing.invited,
        encrypted: listing.encrypted,
    }
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
    WireMessage {
        channel: message.channel,
        seq: message.seq.0,
        sender: message.sender,
        body: message.body,
        at_ms: message.at_ms,
        client_seq: message.client_seq,
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
    /// A server value for a new connection whose TLS session has login binding `binding`.
    pub fn new(shared: Arc<ApiShared>, binding: [u8; 32]) -> ChatServer {
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
        }
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
        register(&self.shared, user, public_key).await?;
        self.conn.lock().registered = true;
        Ok(())
    }

    /// Takes a token of `user`'s write rate limit.
    fn take_user_token(&self, user: &str) -> Result<(), ApiError> {
        let (rate, burst) = (self.shared.user_rate_per_s, self.shared.user_burst);
        (self.shared.user_buckets.lock())
            .entry(user.to_owned())
            .or_insert_with(|| TokenBucket::new(rate, burst))
            .take_now()
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

async fn register(shared: &ApiShared, name: &str, public_key: [u8; 32]) -> Result<(), ApiError> {
    let name = name.to_owned();
    let command = Command::RegisterUser { name, public_key };
    match shared.raft.client_write(command).await {
        Ok(response) => match response.data {
            ChatResponse::Registered => Ok(()),
            ChatResponse::Rejected(reason) => Err(rejected(reason)),
            other => panic!("state machine answered a registration with {other:?}"),
        },
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            Err(not_leader(f.leader_id.zip(f.leader_node)))
        }
        Err(e) => {
            tracing::warn!(error = %e, "registration failed");
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
        let outcome = self.shared.proposer.propose(send).await;
        self.shared.metrics.observe_rpc("send", started.elapsed());
        let proposed = outcome.map_err(|e| match e {
            ProposeError::NotLeader { leader } => not_leader(leader),
            ProposeError::Unavailable(reason) => ApiError::unavailable(reason),
        })?;
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

    async fn channels(self, _: Context, req: ChannelsRequest) -> Result<ChannelPage, ApiError> {
        let _busy = self.busy();
        let user = self.require_login()?;
        let limit = req.limit.min(proto::CHANNEL_PAGE_MAX) as usize;
        let (page, more) = (self.shared.chat).channel_page(&user, req.after.as_deref(), limit);
        Ok(ChannelPage {
            channels: page.into_iter().map(channel_info).collect(),
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
        let info = ChannelInfo {
            name: req.channel,
            head: head.0,
            owner: record.owner,
            private: record.private,
            invited: record.invited.contains(&user),
            encrypted: record.crypto.is_some(),
        };
        Ok(ChannelDetail {
            info,
            members: record.members.into_iter().collect(),
            invited: record.invited.into_iter().collect(),
            crypto: record.crypto,
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
        };
        let command = Command::Channel {
            channel: req.channel,
            by: user,
            op,
        };
        match self.shared.raft.client_write(command).await {
            Ok(response) => match response.data {
                ChatResponse::ChannelUpdated => Ok(response.log_id.index),
                ChatResponse::Rejected(reason) => Err(rejected(reason)),
                other => panic!("state machine answered a channel change with {other:?}"),
            },
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(not_leader(f.leader_id.zip(f.leader_node)))
            }
            Err(e) => {
                tracing::warn!(error = %e, "channel change failed");
                Err(ApiError::unavailable("raft unavailable"))
            }
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
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn message(seq: u64, body_len: usize) -> chat_sm::Message {
        chat_sm::Message {
            channel: "c".into(),
            seq: ChannelSeq(seq),
            sender: "s".into(),
            body: vec![0; body_len],
            at_ms: 0,
            client_id: ClientId([0; 16]),
            client_seq: seq,
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
