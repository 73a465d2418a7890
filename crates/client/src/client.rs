//! [`Client`], the façade: it wires the routing table (`routing.rs`), probing (`probe.rs`),
//! the connection pool (`pool.rs`), push connections and subscriptions, and drives reads,
//! sends and the login through the one retry policy (`retry.rs`).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::{
    ApiError, ChannelChange, ChannelDetail, ChannelInfo, ChannelInfoRequest, ChannelPage,
    ChannelRequest, ChannelsRequest, ChatClient, ClusterInfo, HistoryRequest, MarkReadRequest,
    MessageBatch, RejectReason, Relation, SendReply, SendRequest, UserKey, WireMessage,
};
use tarpc::client::RpcError;
use tokio::sync::broadcast;

use crate::authors::{Authors, ChannelSecurity, SenderKey, Shown};
use crate::config::ClientConfig;
use crate::crypto::{self, ChannelHistory, ChannelKey, ChannelKeyV2, CryptoError, Keys};
use crate::error::Error;
use crate::identity::{self, Identity};
use crate::pool::Pool;
use crate::probe::Prober;
use crate::push::{Ephemeral, PushPool};
use crate::retry::{jitter, Decision, Failure, Retry, Target};
use crate::routing::{ClientEvent, Routes, ServerInfo, Status};
use crate::stream::{Streams, Subscription};
use crate::trust::ClusterTrust;

/// A client of one cellchat cluster; cheap to clone, every clone shares one session (client id,
/// client seqs, read token, connections).
///
/// Invariant: `(client_id, client_seq)` of a message never changes across its retries, and a
/// new message always gets a client seq above every earlier one of this client.
#[derive(Clone)]
pub struct Client {
    config: Arc<ClientConfig>,
    client_id: [u8; 16],
    next_seq: Arc<AtomicU64>,
    routes: Arc<Routes>,
    pool: Arc<Pool>,
    prober: Arc<Prober>,
    streams: Streams,
    authors: Arc<Authors>,
    _refresher: Arc<AbortOnDrop>,
}

/// A channel's keys after [`Client::unlock_channel`].
#[derive(Debug, Clone)]
pub struct Unlocked {
    /// The v2 key for new messages and v2 history; the v1 key for older history, when the
    /// channel had messages at unlock time.
    pub keys: Keys,
    /// Whether this call set the channel's crypto record (the passphrase is new).
    pub created: bool,
    /// Time spent deriving keys (Argon2id), once per channel per session.
    pub derive: Duration,
}

/// Stops the refresh loop when the last clone of a [`Client`] is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Client {
    /// Finds the cluster's nodes, measures them, picks the nearest for reads, and logs in on
    /// the leader when the config names a user.
    ///
    /// # Errors
    ///
    /// [`Error::NoServers`] (saying where it looked), [`Error::NameTaken`], [`Error::Identity`],
    /// [`Error::Config`], [`Error::Discovery`], or [`Error::RetriesExhausted`] when no leader
    /// accepted the login.
    pub async fn connect(config: ClientConfig) -> Result<Client, Error> {
        config.validate().map_err(Error::Config)?;
        let identity = match (&config.identity, &config.name) {
            (Some(identity), _) => Some(identity.clone()),
            (None, Some(name)) => {
                let dir = identity::config_dir(config.config_dir.as_deref())?;
                Some(Identity::load_or_create(&dir, &config.cluster, name)?)
            }
            (None, None) => None,
        };
        // Pins live next to the identities when this client has a config dir (named users, or
        // an explicit dir); an in-memory identity without one pins for the session only.
        let pins_dir = match (&config.config_dir, &config.identity) {
            (Some(dir), _) => Some(dir.clone()),
            (None, None) if config.name.is_some() => Some(identity::config_dir(None)?),
            (None, _) => None,
        };
        let authors = Arc::new(Authors::new(pins_dir.as_deref(), &config.cluster));
        let config = Arc::new(config);
        let routes = Arc::new(Routes::new());
        let trust = Arc::new(ClusterTrust::for_config(&config).map_err(Error::Trust)?);
        let pool = Arc::new(Pool::new(
            config.clone(),
            trust.clone(),
            identity,
            routes.clone(),
        ));
        let prober = Arc::new(Prober::new(config.clone(), routes.clone(), pool.clone())?);
        prober.initial_discovery().await?;
        prober.probe_all().await;
        let streams = Streams {
            routes: routes.clone(),
            pool: pool.clone(),
            push: Arc::new(PushPool::new(
                config.clone(),
                trust,
                routes.clone(),
                pool.identity().cloned(),
            )),
            wait: config.stream_wait,
        };
        let refresher = tokio::spawn(prober.clone().refresh_loop());
        let client = Client {
            config,
            client_id: rand::random(),
            next_seq: Arc::new(AtomicU64::new(1)),
            routes,
            pool,
            prober,
            streams,
            authors,
            _refresher: Arc::new(AbortOnDrop(refresher)),
        };
        if client.pool.identity().is_some() {
            // Logging in at once makes a taken name fail here, not at the first send.
            client
                .retrying(Target::Leader, || client.pool.writer_conn())
                .await?;
        }
        Ok(client)
    }

    /// This client's random idempotency id.
    pub fn client_id(&self) -> [u8; 16] {
        self.client_id
    }

    /// The logged-in user name, if any.
    pub fn name(&self) -> Option<&str> {
        self.pool.identity().map(Identity::name)
    }

    /// The cluster name.
    pub fn cluster_name(&self) -> &str {
        &self.config.cluster
    }

    /// The highest read token seen (send replies and batches' `applied`).
    pub fn read_token(&self) -> u64 {
        self.routes.token()
    }

    /// Raises the read token to at least `token` (for example one handed over by another
    /// session).
    pub fn observe_read_token(&self, token: u64) {
        self.routes.observe(token);
    }

    /// Takes the client seq for a new message; use it with [`send_with_key`](Self::send_with_key)
    /// when the body must know it (encryption binds it).
    pub fn next_client_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::AcqRel)
    }

    /// Events such as rate limits and reader changes.
    pub fn events(&self) -> broadcast::Receiver<ClientEvent> {
        self.routes.events()
    }

    /// Sends `body` as a new message, retrying until acknowledged or the retry budget runs out.
    ///
    /// # Errors
    ///
    /// As [`send_with_key`](Self::send_with_key).
    pub async fn send(&self, channel: &str, body: Vec<u8>) -> Result<SendReply, Error> {
        let seq = self.next_client_seq();
        self.send_with_key(channel, body, self.client_id, seq).await
    }

    /// Sends `text` as a new message signed by this user's identity key: encrypted with `key`
    /// (format v2) when given, else as signed plaintext (body formats in [`crypto`]).
    ///
    /// # Errors
    ///
    /// [`Error::NoIdentity`] without a name, [`Error::Crypto`] for a text too long or a key of
    /// another channel, else as [`send_with_key`](Self::send_with_key).
    pub async fn send_text(
        &self,
        channel: &str,
        text: &str,
        key: Option<&ChannelKeyV2>,
    ) -> Result<SendReply, Error> {
        let identity = self.pool.identity().ok_or(Error::NoIdentity)?;
        let seq = self.next_client_seq();
        let (cluster, id) = (&self.config.cluster, self.client_id);
        let body = match key {
            Some(key) => crypto::seal_v2(key, identity, cluster, channel, id, seq, text)?,
            None => crypto::sign_plain(identity, cluster, channel, id, seq, text)?,
        };
        self.send_with_key(channel, body, id, seq).await
    }

    /// Sends `text` as a reply, edit, delete or reaction (`relation`), signed and, with
    /// `key`, encrypted like [`send_text`](Self::send_text); the signature binds the relation,
    /// so no node can point it at another message. A delete or reaction usually has an empty
    /// text. An edit of an encrypted message must be encrypted (the cluster refuses a change
    /// of format).
    ///
    /// # Errors
    ///
    /// As [`send_text`](Self::send_text); the cluster's refusals (no such message, not the
    /// sender, ...) are [`Error::Api`].
    pub async fn send_related(
        &self,
        channel: &str,
        text: &str,
        key: Option<&ChannelKeyV2>,
        relation: proto::Relation,
    ) -> Result<SendReply, Error> {
        let identity = self.pool.identity().ok_or(Error::NoIdentity)?;
        let seq = self.next_client_seq();
        let (cluster, id) = (&self.config.cluster, self.client_id);
        let r = Some(&relation);
        let body = match key {
            Some(key) => {
                crypto::seal_v2_related(key, identity, cluster, channel, r, id, seq, text)?
            }
            None => crypto::sign_plain_related(identity, cluster, channel, r, id, seq, text)?,
        };
        let request = SendRequest {
            relation: Some(relation),
            ..send_request(channel, body, id, seq)
        };
        self.send_request_retrying(request).await
    }

    /// [`send_text`](Self::send_text) under a caller's idempotency key: every call with the
    /// same cluster, user, channel and `idempotency_key` uses the same `(client_id,
    /// client_seq)`, so a retry by another process (a script run again after exit code 3) is
    /// applied at most once and answers with the first send's seq and `duplicate` set. Within
    /// the cluster's dedup window; after it the retry is refused, never applied twice.
    ///
    /// # Errors
    ///
    /// As [`send_text`](Self::send_text).
    pub async fn send_text_idempotent(
        &self,
        channel: &str,
        text: &str,
        key: Option<&ChannelKeyV2>,
        idempotency_key: &str,
    ) -> Result<SendReply, Error> {
        let identity = self.pool.identity().ok_or(Error::NoIdentity)?;
        let cluster = &self.config.cluster;
        let id = idempotent_client_id(cluster, identity.name(), channel, idempotency_key);
        // The only message of this client id; seq 0 is not a valid client seq.
        let seq = 1;
        let body = match key {
            Some(key) => crypto::seal_v2(key, identity, cluster, channel, id, seq, text)?,
            None => crypto::sign_plain(identity, cluster, channel, id, seq, text)?,
        };
        self.send_with_key(channel, body, id, seq).await
    }

    /// Sends `text` as a format v1 body (unsigned; AES-GCM v1 with `key`), as releases before
    /// format v2 did: for tests of old history and for readers that know only v1.
    ///
    /// # Errors
    ///
    /// As [`send_text`](Self::send_text).
    pub async fn send_text_v1(
        &self,
        channel: &str,
        text: &str,
        key: Option<&ChannelKey>,
    ) -> Result<SendReply, Error> {
        let seq = self.next_client_seq();
        let body = match key {
            Some(key) => key.seal(self.name().ok_or(Error::NoIdentity)?, seq, text)?,
            None => crypto::plain_body(text),
        };
        self.send_with_key(channel, body, self.client_id, seq).await
    }

    /// Unlocks `channel`'s end-to-end encryption with `passphrase`: checks it against the
    /// channel's crypto record, or, when the channel has none, makes one and stores it with
    /// the channel (a channel without an owner, or one this user owns). Derives the v1 key
    /// too when the channel has history, so older messages stay readable.
    ///
    /// # Errors
    ///
    /// [`Error::Crypto`] with [`CryptoError::WrongPassphrase`] for a passphrase that does not
    /// match the record, or `BadRecord` for a record this build refuses;
    /// [`Error::NotChannelOwner`] when only another user could set the record; as
    /// [`channel_info`](Self::channel_info) and [`change_channel`](Self::change_channel).
    pub async fn unlock_channel(&self, channel: &str, passphrase: &str) -> Result<Unlocked, Error> {
        let name = self.name().ok_or(Error::NoIdentity)?.to_owned();
        if passphrase.is_empty() {
            return Err(CryptoError::EmptyPassphrase.into());
        }
        let mut derive = Duration::ZERO;
        let detail = self.channel_info(channel).await?;
        let refuse = || Error::ChannelRecordChanged {
            channel: channel.to_owned(),
        };
        match self
            .authors
            .channel_security(channel, detail.crypto.as_deref())
        {
            ChannelSecurity::RecordChanged | ChannelSecurity::RecordGone => return Err(refuse()),
            ChannelSecurity::Plain | ChannelSecurity::Encrypted => {}
        }
        let (v2, created) = match detail.crypto {
            Some(record) => (
                self.unlock_record(channel, passphrase, record, &mut derive)
                    .await?,
                false,
            ),
            None => {
                let (cluster, ch, p) = (
                    self.config.cluster.clone(),
                    channel.to_owned(),
                    passphrase.to_owned(),
                );
                let (key, record) =
                    timed(&mut derive, move || ChannelKeyV2::create(&p, &cluster, &ch)).await?;
                let change = match detail.info.owner.as_deref() {
                    None => ChannelChange::Create {
                        private: false,
                        crypto: Some(record.clone()),
                    },
                    Some(owner) if owner == name => ChannelChange::SetCrypto(record.clone()),
                    Some(owner) => {
                        return Err(Error::NotChannelOwner {
                            channel: channel.to_owned(),
                            owner: owner.to_owned(),
                        })
                    }
                };
                match self.change_channel(channel, change).await {
                    Ok(_) => {
                        let pinned = self.authors.channel_security(channel, Some(&record));
                        if pinned != ChannelSecurity::Encrypted {
                            return Err(refuse());
                        }
                        (key, true)
                    }
                    // Another user set a record first: the passphrase must match theirs.
                    Err(Error::Api(ApiError::Rejected(
                        RejectReason::ChannelExists | RejectReason::CryptoAlreadySet,
                    ))) => {
                        let detail = self.channel_info(channel).await?;
                        let record = detail
                            .crypto
                            .ok_or(Error::Api(ApiError::Rejected(RejectReason::ChannelExists)))?;
                        if self.authors.channel_security(channel, Some(&record))
                            != ChannelSecurity::Encrypted
                        {
                            return Err(refuse());
                        }
                        (
                            self.unlock_record(channel, passphrase, record, &mut derive)
                                .await?,
                            false,
                        )
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let v1 = if detail.info.head > 0 {
            let (cluster, ch, p) = (
                self.config.cluster.clone(),
                channel.to_owned(),
                passphrase.to_owned(),
            );
            Some(timed(&mut derive, move || ChannelKey::derive(&p, &cluster, &ch)).await?)
        } else {
            None
        };
        Ok(Unlocked {
            keys: Keys { v2: Some(v2), v1 },
            created,
            derive,
        })
    }

    async fn unlock_record(
        &self,
        channel: &str,
        passphrase: &str,
        record: Vec<u8>,
        derive: &mut Duration,
    ) -> Result<ChannelKeyV2, Error> {
        let (cluster, ch, p) = (
            self.config.cluster.clone(),
            channel.to_owned(),
            passphrase.to_owned(),
        );
        timed(derive, move || {
            ChannelKeyV2::unlock(&p, &cluster, &ch, &record)
        })
        .await
    }

    /// This client's identity, when it has a name.
    pub(crate) fn identity(&self) -> Option<&crate::Identity> {
        self.pool.identity()
    }

    /// `record` checked against the crypto record this client pinned for `channel` (pinned
    /// now when there is none).
    pub(crate) fn authors_channel_security(&self, channel: &str, record: &[u8]) -> ChannelSecurity {
        self.authors.channel_security(channel, Some(record))
    }

    /// Whether `channel` is end-to-end encrypted, checked against the crypto record this client
    /// pinned for it (on first sight): a node that drops or replaces a record is noticed
    /// ([`ChannelSecurity::RecordGone`], [`ChannelSecurity::RecordChanged`]).
    ///
    /// # Errors
    ///
    /// As [`channel_info`](Self::channel_info).
    pub async fn channel_security(&self, channel: &str) -> Result<ChannelSecurity, Error> {
        let detail = self.channel_info(channel).await?;
        Ok(self
            .authors
            .channel_security(channel, detail.crypto.as_deref()))
    }

    /// The key `name` is registered with, checked against this client's pin (pinned on first
    /// sight). Asks the nearest node unless a node served it earlier in this session; when the
    /// lookup fails, the pin alone decides (unknown without one), and the next call asks again.
    pub async fn sender_key(&self, name: &str) -> SenderKey {
        if let Some(served) = self.authors.served(name) {
            return self.authors.learn(name, Some(served));
        }
        match self.user_keys(&[name.to_owned()]).await {
            Ok(keys) => {
                let served = keys
                    .into_iter()
                    .find(|k| k.name == name)
                    .and_then(|k| k.public_key);
                self.authors.learn(name, served)
            }
            Err(e) => {
                tracing::debug!(error = %e, %name, "sender key lookup failed");
                self.authors.without_lookup(name)
            }
        }
    }

    /// Opens `message` with `keys` (the channel's), checks its signature under its sender's
    /// pinned key, and asks the replay guard: what a reader should show. `history` says
    /// whether the channel is encrypted, so its plaintext lines are marked.
    ///
    /// A message with a newest edit attached shows the edit's body, checked the same way
    /// (the edit's signature binds the edited seq), when the edit is the same sender's; an
    /// edit by anyone else is a node's forgery and is ignored.
    pub async fn show(&self, keys: &Keys, history: ChannelHistory, message: &WireMessage) -> Shown {
        let message = match &message.edit {
            Some(edit)
                if edit.sender == message.sender
                    && edit.relation == Some(proto::Relation::Edit { of: message.seq }) =>
            {
                &**edit
            }
            _ => message,
        };
        let key = self.sender_key(&message.sender).await;
        let opened = crypto::open_related(
            keys,
            &self.config.cluster,
            &message.channel,
            message.relation.as_ref(),
            &message.sender,
            message.client_seq,
            key.verify_with(),
            &message.body,
        );
        let seen = self.authors.seen(
            &message.channel,
            message.seq,
            &message.sender,
            message.client_seq,
            &opened,
        );
        Shown {
            opened,
            seen,
            history,
            key,
        }
    }

    /// Sends with a caller-chosen idempotency key, retrying with that same key: NotLeader
    /// redials the leader it names, rate limits wait the time the node asks for (and emit
    /// [`ClientEvent::RateLimited`]), other retryable errors back off exponentially
    /// (25 ms doubling to 1 s). The message is applied at most once whatever happens.
    ///
    /// # Errors
    ///
    /// [`Error::NoIdentity`], [`Error::NameTaken`], [`Error::Api`] for a rejection, or
    /// [`Error::RetriesExhausted`] after `send_attempts_max` attempts or `send_retry_budget`.
    #[tracing::instrument(level = "debug", skip_all, fields(channel = %channel, client_seq = client_seq))]
    pub async fn send_with_key(
        &self,
        channel: &str,
        body: Vec<u8>,
        client_id: [u8; 16],
        client_seq: u64,
    ) -> Result<SendReply, Error> {
        self.send_request_retrying(send_request(channel, body, client_id, client_seq))
            .await
    }

    async fn send_request_retrying(&self, request: SendRequest) -> Result<SendReply, Error> {
        self.pool.identity().ok_or(Error::NoIdentity)?;
        self.retrying(Target::Leader, || async {
            let (node, conn) = self.pool.writer_conn().await?;
            self.send_on(node, &conn, request.clone()).await
        })
        .await
    }

    /// One send attempt on the node this client believes leads, without retries: for callers
    /// that record ambiguous outcomes themselves. A NotLeader answer still updates the leader
    /// for the next call.
    ///
    /// # Errors
    ///
    /// [`Error::Api`] with the node's answer, [`Error::Unreachable`] when the node could not be
    /// reached or the connection broke (the outcome is then unknown), [`Error::NameTaken`],
    /// [`Error::NoIdentity`].
    pub async fn send_once(
        &self,
        channel: &str,
        body: Vec<u8>,
        client_id: [u8; 16],
        client_seq: u64,
    ) -> Result<SendReply, Error> {
        let request = send_request(channel, body, client_id, client_seq);
        self.pool.identity().ok_or(Error::NoIdentity)?;
        let (node, conn) = (self.pool.writer_conn().await).map_err(|e| self.explain(e.into()))?;
        self.send_on(node, &conn, request)
            .await
            .map_err(|failure| match failure {
                Failure::Api(e) => Error::Api(e),
                Failure::Transport(reason) => Error::Unreachable {
                    node: Some(node),
                    reason,
                },
            })
    }

    /// Up to `limit` messages of `channel` before `before_seq` (newest page when `None`), in
    /// ascending seq order, from the nearest healthy node.
    ///
    /// # Errors
    ///
    /// [`Error::Api`] for a rejection (bad channel name), [`Error::RetriesExhausted`] when no
    /// node could answer.
    pub async fn history(
        &self,
        channel: &str,
        before_seq: Option<u64>,
        limit: u32,
    ) -> Result<MessageBatch, Error> {
        self.history_request(channel, before_seq, None, limit).await
    }

    /// Up to `limit` messages of `channel` from `from_seq` on, ascending.
    ///
    /// # Errors
    ///
    /// As [`history`](Self::history).
    pub async fn history_from(
        &self,
        channel: &str,
        from_seq: u64,
        limit: u32,
    ) -> Result<MessageBatch, Error> {
        self.history_request(channel, None, Some(from_seq), limit)
            .await
    }

    /// Message `seq` of `channel` and the replies to it, in seq order. Replies are found by
    /// reading on from the message, page after page, until as many were found as the message
    /// says it has, or [`THREAD_SCAN_MAX`] messages were read (`complete` is then false).
    ///
    /// # Errors
    ///
    /// [`Error::Api`] with `NoSuchMessage` when `seq` is not a stored message of `channel`;
    /// otherwise as [`history`](Self::history).
    pub async fn thread(&self, channel: &str, seq: u64) -> Result<Thread, Error> {
        let no_such = || Error::Api(ApiError::Rejected(RejectReason::NoSuchMessage));
        let page = self.history_from(channel, seq, 1).await?;
        let target = (page.messages.into_iter())
            .find(|m| m.seq == seq)
            .ok_or_else(no_such)?;
        let mut replies = Vec::new();
        let last = seq.saturating_add(THREAD_SCAN_MAX);
        let mut from = seq + 1;
        while (replies.len() as u64) < target.replies && from <= last {
            let page = self.history_from(channel, from, 1000).await?;
            let Some(newest) = page.messages.last().map(|m| m.seq) else {
                break;
            };
            for m in page.messages {
                if m.seq <= last && m.relation == Some(proto::Relation::Reply { to: seq }) {
                    replies.push(m);
                }
            }
            from = newest + 1;
        }
        let complete = replies.len() as u64 >= target.replies;
        Ok(Thread {
            target,
            replies,
            complete,
        })
    }

    /// The last `count` messages of `channel` (all of them when it has fewer), ascending.
    /// A node may answer a page shorter than asked (its replies have a byte cap), so this
    /// pages back from the oldest message it got until it has `count` or reaches the start.
    ///
    /// # Errors
    ///
    /// As [`history`](Self::history).
    pub async fn recent(&self, channel: &str, count: u32) -> Result<MessageBatch, Error> {
        self.recent_before(channel, None, count).await
    }

    /// The last `count` messages of `channel` with seq below `before_seq` (below the head when
    /// `None`), ascending, paging back as [`recent`](Self::recent) does: history to any depth,
    /// one page after another.
    ///
    /// # Errors
    ///
    /// As [`history`](Self::history).
    pub async fn recent_before(
        &self,
        channel: &str,
        before_seq: Option<u64>,
        count: u32,
    ) -> Result<MessageBatch, Error> {
        let mut batch = self.history(channel, before_seq, count).await?;
        // Every round adds at least one older message or stops, so it ends.
        while batch.messages.len() < count as usize {
            let Some(oldest) = batch.messages.first().map(|m| m.seq) else {
                break;
            };
            if oldest <= 1 {
                break;
            }
            let missing = count - batch.messages.len() as u32;
            let page = self.history(channel, Some(oldest), missing).await?;
            batch.applied = batch.applied.max(page.applied);
            let mut older: Vec<_> = (page.messages.into_iter())
                .filter(|m| m.seq < oldest)
                .collect();
            if older.is_empty() {
                break;
            }
            older.append(&mut batch.messages);
            batch.messages = older;
        }
        Ok(batch)
    }

    /// Full-text search (the language of [`proto::search`]) over the plaintext channels this
    /// user may read, answered by the nearest node from its index once it covers this client's
    /// read token: it finds what this client sent and read. Encrypted channels are searched
    /// with [`search_history`](Self::search_history).
    ///
    /// # Errors
    ///
    /// [`Error::Api`] with `BadQuery` for a query the language refuses (over 1,024 bytes, no
    /// term, ...); [`Error::RetriesExhausted`] when no node could answer.
    pub async fn search(&self, query: &str, limit: u32) -> Result<proto::SearchReply, Error> {
        proto::search::Query::parse(query)
            .map_err(|e| Error::Api(ApiError::Rejected(RejectReason::BadQuery(e))))?;
        let reply = self
            .read(|conn| {
                let request = proto::SearchRequest {
                    query: query.to_owned(),
                    limit,
                    read_token: self.routes.token(),
                };
                async move { conn.search(self.pool.ctx(), request).await }
            })
            .await?;
        self.routes.observe(reply.indexed);
        Ok(reply)
    }

    /// Searches the newest `scan` messages of `channel` as this client reads them (decrypted
    /// with `keys`, signatures checked): how an end-to-end encrypted channel is searched, since
    /// no node can read it. Same language as [`search`](Self::search); only text whose author
    /// verified counts. Answers at most `limit` matches, newest first.
    ///
    /// # Errors
    ///
    /// [`Error::Api`] with `BadQuery`, or as [`history`](Self::history).
    pub async fn search_history(
        &self,
        channel: &str,
        keys: &Keys,
        query: &str,
        scan: u32,
        limit: usize,
    ) -> Result<Vec<(WireMessage, Shown)>, Error> {
        let query = proto::search::Query::parse(query)
            .map_err(|e| Error::Api(ApiError::Rejected(RejectReason::BadQuery(e))))?;
        let batch = self.recent_before(channel, None, scan).await?;
        let history = match self.channel_security(channel).await {
            Ok(ChannelSecurity::Plain) => ChannelHistory::Plain,
            _ => ChannelHistory::Encrypted,
        };
        let mut index = proto::search::SearchIndex::new();
        let mut shown = std::collections::HashMap::new();
        for message in batch.messages {
            let text_bearing = matches!(message.relation, None | Some(Relation::Reply { .. }));
            if message.deleted || !text_bearing {
                continue;
            }
            let seen = self.show(keys, history, &message).await;
            if let Some(text) = seen.opened.verified_text() {
                index.insert(channel, message.seq, &message.sender, text);
                shown.insert(message.seq, (message, seen));
            }
        }
        let page = index.query(&query, |_| true, limit);
        Ok(page
            .hits
            .into_iter()
            .filter_map(|hit| shown.remove(&hit.seq))
            .collect())
    }

    async fn history_request(
        &self,
        channel: &str,
        before_seq: Option<u64>,
        from_seq: Option<u64>,
        limit: u32,
    ) -> Result<MessageBatch, Error> {
        let batch = self
            .read(|conn| {
                let request = HistoryRequest {
                    channel: channel.to_owned(),
                    before_seq,
                    from_seq,
                    limit,
                    read_token: self.routes.token(),
                };
                async move { conn.history(self.pool.ctx(), request).await }
            })
            .await?;
        self.routes.observe(batch.applied);
        Ok(batch)
    }

    /// Every channel this user may see (public ones, and private ones they belong to or are
    /// invited to) with its head seq, in name order, from the nearest healthy node: page after
    /// page, at most [`CHANNELS_LISTED_MAX`].
    ///
    /// # Errors
    ///
    /// [`Error::RetriesExhausted`] when no node could answer.
    pub async fn channels(&self) -> Result<Vec<ChannelInfo>, Error> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let page = self.channels_page(after, proto::CHANNEL_PAGE_MAX).await?;
            all.extend(page.channels);
            if !page.more || all.len() >= CHANNELS_LISTED_MAX {
                return Ok(all);
            }
            after = all.last().map(|c: &ChannelInfo| c.name.clone());
        }
    }

    /// One page of [`channels`](Self::channels): up to `limit` channels whose names sort after
    /// `after`.
    ///
    /// # Errors
    ///
    /// [`Error::RetriesExhausted`] when no node could answer.
    pub async fn channels_page(
        &self,
        after: Option<String>,
        limit: u32,
    ) -> Result<ChannelPage, Error> {
        self.read(|conn| {
            let request = ChannelsRequest {
                after: after.clone(),
                limit,
                read_token: self.routes.token(),
            };
            async move { conn.channels(self.pool.ctx(), request).await }
        })
        .await
    }

    /// A channel's record: owner, members and invitations (of a private channel), and its
    /// public crypto record. Reads at least this client's read token, so it shows this
    /// client's own changes.
    ///
    /// # Errors
    ///
    /// [`Error::Api`] with `NotMember` for a private channel this user may not see.
    pub async fn channel_info(&self, channel: &str) -> Result<ChannelDetail, Error> {
        self.read(|conn| {
            let request = ChannelInfoRequest {
                channel: channel.to_owned(),
                read_token: self.routes.token(),
            };
            async move { conn.channel_info(self.pool.ctx(), request).await }
        })
        .await
    }

    /// Changes a channel's record through the leader, retrying like a send. A create whose
    /// first attempt's outcome was lost and whose retry finds the channel is answered by
    /// reading the record: when it is this user's with the same privacy and crypto record,
    /// the create succeeded.
    ///
    /// # Errors
    ///
    /// [`Error::Api`] with the rejection (`ChannelExists`, `NotOwner`, `NotInvited`, ...),
    /// [`Error::NoIdentity`], [`Error::RetriesExhausted`].
    pub async fn change_channel(&self, channel: &str, change: ChannelChange) -> Result<u64, Error> {
        self.pool.identity().ok_or(Error::NoIdentity)?;
        let request = ChannelRequest {
            channel: channel.to_owned(),
            change: change.clone(),
        };
        let outcome = self
            .retrying(Target::Leader, || async {
                let (node, conn) = self.pool.writer_conn().await?;
                let call = Box::pin(conn.channel(self.pool.ctx(), request.clone()));
                self.write_on(node, call).await
            })
            .await;
        match (outcome, &change) {
            (Ok(token), _) => {
                self.routes.observe(token);
                Ok(token)
            }
            (
                Err(Error::Api(ApiError::Rejected(RejectReason::ChannelExists))),
                ChannelChange::Create { private, crypto },
            ) => {
                // Not readable (another user's private channel) is not ours either.
                let mine = self.channel_info(channel).await.is_ok_and(|detail| {
                    detail.info.owner.as_deref() == self.name()
                        && detail.info.private == *private
                        && detail.crypto == *crypto
                });
                if mine {
                    Ok(self.routes.token())
                } else {
                    Err(Error::Api(ApiError::Rejected(RejectReason::ChannelExists)))
                }
            }
            (Err(e), _) => Err(e),
        }
    }

    /// Moves this user's read marker in `channel` up to `seq`, through the leader, retrying
    /// like a send (marking twice is harmless). Answers the marker now: `seq`, or higher when
    /// another of this user's clients read further. The leader gathers marks for a moment
    /// (a tenth of a second) before writing them, so call it from a background task.
    ///
    /// # Errors
    ///
    /// [`Error::Api`] with `NoSuchMessage` (0 or above the head) or `NotMember`,
    /// [`Error::NoIdentity`], [`Error::RetriesExhausted`].
    pub async fn mark_read(&self, channel: &str, seq: u64) -> Result<u64, Error> {
        self.pool.identity().ok_or(Error::NoIdentity)?;
        let request = MarkReadRequest {
            channel: channel.to_owned(),
            seq,
        };
        let reply = self
            .retrying(Target::Leader, || async {
                let (node, conn) = self.pool.writer_conn().await?;
                let call = Box::pin(conn.mark_read(self.pool.ctx(), request.clone()));
                self.write_on(node, call).await
            })
            .await?;
        self.routes.observe(reply.read_token);
        Ok(reply.read_to)
    }

    /// Presence and typing heard from now on. Typing comes for the channels this client
    /// subscribes to. Calling this turns on presence on every push connection of the client, so
    /// each connection's first presence event is a full list of who is online; a connection
    /// opens with the first subscription.
    pub fn ephemeral(&self) -> broadcast::Receiver<Ephemeral> {
        self.streams.push.ephemeral()
    }

    /// Tells the other users subscribed to `channel` that this user types there (they show it
    /// for [`proto::push::TYPING_SHOW_MS`]). Goes out on an open push connection and is never
    /// retried: false when there is none (this client subscribes to nothing yet). Call it at
    /// most every [`proto::push::TYPING_RENEW_MS`] per channel while keys arrive; nodes drop
    /// typing notes that come faster than a few a second.
    pub fn typing(&self, channel: &str) -> bool {
        self.streams.push.typing(channel)
    }

    /// Everyone online in the cluster, as the nearest node knows it: users with an open push
    /// connection (an interactive client, a subscription) on any node. Opens a push connection
    /// when the client has none. What nodes tell of each other is at most a few seconds old.
    ///
    /// # Errors
    ///
    /// [`Error::NoIdentity`] (a push connection needs a login), [`Error::RetriesExhausted`]
    /// when no node answered with a list.
    pub async fn online(&self) -> Result<Vec<String>, Error> {
        self.pool.identity().ok_or(Error::NoIdentity)?;
        let started = Instant::now();
        let mut attempts = 0;
        let mut last = "no node to ask".to_owned();
        while attempts < 4 && started.elapsed() < self.config.request_timeout * 4 {
            attempts += 1;
            let Some(node) = self.routes.pick_reader() else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            match self
                .streams
                .push
                .online(node, self.config.request_timeout)
                .await
            {
                Some(online) => return Ok(online),
                None => {
                    last = format!("node {node} sent no online list");
                    self.streams.push.forget(node);
                }
            }
        }
        Err(Error::RetriesExhausted {
            attempts,
            elapsed_ms: started.elapsed().as_millis() as u64,
            last,
        })
    }

    /// The registered public keys of `names` (at most [`proto::USER_KEYS_MAX`]) as the nearest
    /// node knows them. A node may lie: pin what it says ([`crate::pins`]) and compare.
    ///
    /// # Errors
    ///
    /// [`Error::RetriesExhausted`] when no node could answer.
    pub async fn user_keys(&self, names: &[String]) -> Result<Vec<UserKey>, Error> {
        self.read(|conn| {
            let names = names.to_vec();
            async move { conn.user_keys(self.pool.ctx(), names).await }
        })
        .await
    }

    /// The cluster as the nearest healthy node sees it; also refreshes this client's table.
    ///
    /// # Errors
    ///
    /// [`Error::RetriesExhausted`] when no node could answer.
    pub async fn cluster(&self) -> Result<ClusterInfo, Error> {
        let info = self
            .read_as(Reader::Anyone, |conn| async move {
                conn.cluster(self.pool.ctx()).await
            })
            .await?;
        self.routes.update(|table, _| table.merge_cluster(&info));
        Ok(info)
    }

    /// Every known node with fresh RTTs, sorted by id.
    pub async fn servers(&self) -> Vec<ServerInfo> {
        // Best effort: the table still lists what is known when the refresh fails.
        let _ = self.cluster().await;
        self.prober.probe_all().await;
        self.routes.view(|table, now| table.servers(now))
    }

    /// The node reads go to, its RTT, and the leader, without any network call.
    pub fn status(&self) -> Status {
        self.routes.view(|table, _| table.status())
    }

    /// Streams `channel`'s messages with seq greater than `after_seq` (0 for all), from the
    /// nearest healthy node; see [`Subscription`] for the guarantees.
    pub fn subscribe(&self, channel: &str, after_seq: u64) -> Subscription {
        self.streams.subscribe(channel, after_seq)
    }

    /// Runs `attempt` until it succeeds or the retry policy gives up, sleeping as it says.
    async fn retrying<T, Fut>(&self, target: Target, attempt: impl Fn() -> Fut) -> Result<T, Error>
    where
        Fut: Future<Output = Result<T, Failure>>,
    {
        let started = Instant::now();
        let mut retry = Retry::new(target, &self.config);
        loop {
            let failure = match attempt().await {
                Ok(value) => return Ok(value),
                Err(failure) => failure,
            };
            if let Failure::Api(ApiError::RateLimited { retry_after_ms }) = failure {
                tracing::info!(retry_after_ms, "rate limited, waiting");
                if target == Target::Leader {
                    self.routes
                        .emit(ClientEvent::RateLimited { retry_after_ms });
                }
            }
            let reason = failure.to_string();
            let after = match retry.decide(failure, started.elapsed(), jitter()) {
                Decision::Retry(after) => after,
                Decision::Redirect { leader, after } => {
                    tracing::debug!(leader, "redirected to the leader");
                    after
                }
                Decision::GiveUp(e) => return Err(self.explain(e)),
            };
            tracing::debug!(?target, ?after, %reason, "retrying");
            tokio::time::sleep(after).await;
        }
    }

    /// A read RPC on the reader, logged in, moving to the next node when one fails or cannot
    /// serve reads.
    async fn read<T, Fut>(&self, call: impl Fn(ChatClient) -> Fut) -> Result<T, Error>
    where
        Fut: Future<Output = Result<Result<T, ApiError>, RpcError>>,
    {
        self.pool.identity().ok_or(Error::NoIdentity)?;
        self.read_as(Reader::User, call).await
    }

    async fn read_as<T, Fut>(
        &self,
        reader: Reader,
        call: impl Fn(ChatClient) -> Fut,
    ) -> Result<T, Error>
    where
        Fut: Future<Output = Result<Result<T, ApiError>, RpcError>>,
    {
        self.retrying(Target::Nearest, || async {
            let node = (self.routes.pick_reader())
                .ok_or_else(|| Failure::Transport("no node known".into()))?;
            let conn = match reader {
                Reader::User => self.pool.read_conn(node).await,
                Reader::Anyone => self.pool.info_conn(node).await,
            };
            let conn = conn.inspect_err(|failure| {
                // A refused login says nothing about the node's health.
                if matches!(failure, Failure::Transport(_)) {
                    self.pool.mark_down(node, "connect failed");
                }
            })?;
            match call(conn).await {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(e)) => {
                    if e.is_retryable() && !matches!(e, ApiError::RateLimited { .. }) {
                        self.pool.mark_down(node, "unavailable for reads");
                    }
                    Err(Failure::Api(e))
                }
                Err(e) => {
                    self.pool.mark_down(node, "read failed");
                    Err(Failure::Transport(e.to_string()))
                }
            }
        })
        .await
    }

    /// One send on `conn` to `node`; learns leader hints and read tokens, and stops sending to
    /// a node that failed or does not lead.
    async fn send_on(
        &self,
        node: u64,
        conn: &ChatClient,
        request: SendRequest,
    ) -> Result<SendReply, Failure> {
        let reply = self
            .write_on(node, Box::pin(conn.send(self.pool.ctx(), request)))
            .await?;
        self.routes.observe(reply.read_token);
        Ok(reply)
    }

    /// One write `call` to `node`; learns leader hints, and stops writing to a node that failed
    /// or does not lead.
    ///
    /// The call comes boxed: tarpc's call future is kilobytes, and held inline it would be
    /// copied through every async layer between here and the application on each send.
    async fn write_on<T>(
        &self,
        node: u64,
        call: Pin<Box<impl Future<Output = Result<Result<T, ApiError>, RpcError>>>>,
    ) -> Result<T, Failure> {
        self.pool.touch_writer();
        let e = match call.await {
            Ok(Ok(reply)) => return Ok(reply),
            Ok(Err(e)) => e,
            Err(RpcError::DeadlineExceeded) => {
                return Err(Failure::Transport("send timed out".into()))
            }
            Err(RpcError::Shutdown) => {
                // The pooled connection had closed before the request left: nothing was sent
                // and the node may be fine, so redial instead of passing it over.
                self.pool.drop_writer(node).await;
                self.pool.forget(node);
                return Err(Failure::Transport(
                    "send: the pooled connection had closed".into(),
                ));
            }
            Err(e) => {
                self.pool.drop_writer(node).await;
                self.pool.mark_down(node, "send failed");
                return Err(Failure::Transport(format!("send: {e}")));
            }
        };
        match &e {
            ApiError::NotLeader { leader } => {
                self.pool.drop_writer(node).await;
                self.routes.update(|table, now| match leader {
                    Some(hint) => table.learn_hint(hint, now),
                    None => table.forget_leader(),
                });
            }
            ApiError::Unauthenticated => self.pool.drop_writer(node).await,
            _ => {}
        }
        Err(Failure::Api(e))
    }

    /// Turns a taken name into the error that says how to fix it.
    fn explain(&self, e: Error) -> Error {
        let Error::Api(ApiError::Rejected(RejectReason::NameTaken)) = e else {
            return e;
        };
        let identity = self.pool.identity();
        Error::NameTaken {
            name: identity.map_or_else(String::new, |i| i.name().to_owned()),
            key_path: identity.and_then(|i| i.path().map(ToOwned::to_owned)),
        }
    }
}

/// Runs a key derivation off the async threads, adding its time to `total`.
async fn timed<T: Send + 'static>(
    total: &mut Duration,
    derive: impl FnOnce() -> Result<T, CryptoError> + Send + 'static,
) -> Result<T, Error> {
    let started = Instant::now();
    let result = tokio::task::spawn_blocking(derive)
        .await
        .map_err(|e| CryptoError::Derive(e.to_string()))?;
    *total += started.elapsed();
    Ok(result?)
}

/// Most channels [`Client::channels`] collects, page after page.
pub const CHANNELS_LISTED_MAX: usize = 100_000;

/// Who a read is made as: the client's user (reads of messages and channels), or anyone who
/// said hello (the cluster's membership).
#[derive(Clone, Copy)]
enum Reader {
    User,
    Anyone,
}

/// Most messages [`Client::thread`] reads after a message looking for its replies.
pub const THREAD_SCAN_MAX: u64 = 10_000;

/// A message and its replies ([`Client::thread`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thread {
    /// The message.
    pub target: WireMessage,
    /// Its replies, in seq order.
    pub replies: Vec<WireMessage>,
    /// Whether every reply the message counts was found (false when some are further than
    /// [`THREAD_SCAN_MAX`] messages after it, or expired).
    pub complete: bool,
}

/// The client id of an idempotency key: SHA-256 over a domain, then cluster, user, channel and
/// key, each length-prefixed so no two different tuples hash the same input.
pub fn idempotent_client_id(cluster: &str, user: &str, channel: &str, key: &str) -> [u8; 16] {
    let mut input = b"cellchat idempotency key v1".to_vec();
    for part in [cluster, user, channel, key] {
        input.extend_from_slice(&(part.len() as u64).to_le_bytes());
        input.extend_from_slice(part.as_bytes());
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, &input);
    let mut id = [0; 16];
    id.copy_from_slice(&digest.as_ref()[..16]);
    id
}

fn send_request(channel: &str, body: Vec<u8>, client_id: [u8; 16], client_seq: u64) -> SendRequest {
    SendRequest {
        channel: channel.to_owned(),
        body,
        client_id,
        client_seq,
        relation: None,
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
    fn a_send_future_holds_no_connect_or_rpc_call_inline() {
        // An async fn holds every future it may await, and each layer copies it on the way
        // up: the connect path and tarpc's call are boxed so a send stays small.
        let send = returned_size(|c: &'static Client| c.send_with_key("c", vec![], [0; 16], 0));
        assert!(send <= 2_048, "a send's future is {send} bytes");
        let writer = returned_size(|c: &'static Client| c.pool.writer_conn());
        assert!(
            writer <= 512,
            "the writer lookup's future is {writer} bytes"
        );
    }

    #[test]
    fn an_idempotency_key_names_one_client_id_per_cluster_user_channel_and_key() {
        let id = idempotent_client_id("c", "alice", "general", "job-1");
        assert_eq!(id, idempotent_client_id("c", "alice", "general", "job-1"));
        for other in [
            idempotent_client_id("d", "alice", "general", "job-1"),
            idempotent_client_id("c", "bob", "general", "job-1"),
            idempotent_client_id("c", "alice", "random", "job-1"),
            idempotent_client_id("c", "alice", "general", "job-2"),
            // Length prefixes: moving a byte between fields changes the id.
            idempotent_client_id("c", "alic", "egeneral", "job-1"),
        ] {
            assert_ne!(id, other);
        }
    }
}
