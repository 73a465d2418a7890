//! The [`Chat`] tarpc service, its protocol version, and the deadline helpers for long polls.

use std::{
    io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tarpc::{context, ClientMessage, Response};

use crate::{
    error::ApiError,
    transport::{self, Transport},
    types::{
        ChannelDetail, ChannelInfoRequest, ChannelPage, ChannelRequest, ChannelsRequest,
        ClusterInfo, Hello, HistoryRequest, Login, MarkReadReply, MarkReadRequest, MessageBatch,
        Pong, SearchReply, SearchRequest, SendReply, SendRequest, Session, StreamRequest, UserKey,
        Welcome,
    },
};

/// Version of the [`Chat`] wire protocol. Bump it on any change to a wire type or to the
/// service's methods; nodes refuse other versions in [`Chat::hello`].
///
/// Version 3: `WireMessage` no longer carries the sender's client id, and `stream`, `history`
/// and `channels` need a login. Version 4: channel records (private channels, invitations,
/// crypto records), a paged channel list, and users' registered keys. Version 5: retention
/// (a channel change, the channel detail's retention and floor, and two rejections).
/// Version 6: relations (replies, edits, deletes, reactions) in sends and messages.
/// Version 7: read markers (`mark_read`, and each listed channel's `read_to`). Version 8:
/// direct conversations (a channel change, two rejections, each listed channel's `direct`)
/// and `search`.
pub const PROTOCOL_VERSION: u16 = 8;

/// Largest request frame a node reads on the chat service, in bytes (64 KiB): a send carries
/// at most a 16 KiB body, so anything larger is refused from its length prefix, logged in or
/// not, before any of it is buffered.
pub const CHAT_REQUEST_BYTES_MAX: usize = 64 << 10;

/// Extra time [`deadline_for`] allows beyond the requested wait, for the round trip and for the
/// node to catch up to a `read_token`.
pub const DEADLINE_MARGIN: Duration = Duration::from_secs(2);

/// Time [`wait_budget`] keeps free before the deadline so the reply arrives before it.
pub const REPLY_MARGIN: Duration = Duration::from_millis(50);

/// Cap on [`StreamRequest::wait_ms`], in ms (30 s), so one poll cannot hold a slot for long.
pub const STREAM_WAIT_MS_MAX: u32 = 30_000;

/// The client-facing chat service.
///
/// # Correctness
///
/// - A client calls [`hello`](Chat::hello) first on each connection. Until it succeeds the node
///   answers every call except `ping` with [`ApiError::Unauthenticated`]; servers keep this
///   per-connection state in the value they `serve()` for that connection.
/// - Every call but `hello`, `ping` and `cluster` needs a successful [`login`](Chat::login) on
///   the connection; the node stamps the logged-in name as sender. `cluster` needs a hello
///   only. A login proves the key; a name registered to another key is refused, and a name
///   not registered yet is registered to the key by its first send (through the leader).
/// - `send` answers only after the message is committed and applied; retries with the same
///   `(client_id, client_seq)` from the same sender answer with the original seq and
///   `duplicate: true`. Another sender's client id and seqs are another sender's.
/// - `stream` and `history` first wait until the node has applied `read_token`, so a client
///   that passes the highest `read_token`/`applied` it has seen gets monotonic reads and
///   read-your-writes on any node.
/// - A private channel is read and written by its members only: other users get
///   `Rejected(NotMember)` from `send`, `stream`, `history` and `channel_info`, and never see
///   it in `channels` unless invited.
#[tarpc::service]
pub trait Chat {
    /// Checks protocol version and cluster name ([`check_hello`]) and returns a login challenge.
    async fn hello(req: Hello) -> Result<Welcome, ApiError>;
    /// Proves ownership of a name with a signature over the challenge.
    async fn login(req: Login) -> Result<Session, ApiError>;
    /// Appends a message through the leader; followers answer [`ApiError::NotLeader`].
    async fn send(req: SendRequest) -> Result<SendReply, ApiError>;
    /// Long poll: returns as soon as there are messages after `after_seq`, and otherwise with an
    /// empty batch before the request deadline (after [`wait_budget`]). Set the deadline with
    /// [`deadline_for`]; the default tarpc deadline of 10 s is too short for long waits.
    async fn stream(req: StreamRequest) -> Result<MessageBatch, ApiError>;
    /// Reads a page of stored messages.
    async fn history(req: HistoryRequest) -> Result<MessageBatch, ApiError>;
    /// One page of the channels the caller may see, in name order.
    async fn channels(req: ChannelsRequest) -> Result<ChannelPage, ApiError>;
    /// One channel's record (members, invitations, crypto record); for members and invitees
    /// of a private channel, for anyone of a public one.
    async fn channel_info(req: ChannelInfoRequest) -> Result<ChannelDetail, ApiError>;
    /// Changes a channel's record through the leader (followers answer `NotLeader`); answers
    /// the read token of the change.
    async fn channel(req: ChannelRequest) -> Result<u64, ApiError>;
    /// The registered keys of up to [`USER_KEYS_MAX`](crate::USER_KEYS_MAX) names, so readers
    /// can verify who signed a message.
    async fn user_keys(names: Vec<String>) -> Result<Vec<UserKey>, ApiError>;
    /// Describes the cluster as the answering node sees it.
    async fn cluster() -> Result<ClusterInfo, ApiError>;
    /// Round-trip probe; allowed before `hello`.
    async fn ping(nonce: u64) -> Pong;
    /// Moves the caller's read marker in a channel up to a seq, through the leader (followers
    /// answer `NotLeader`). The leader coalesces the marks of all its clients into one log
    /// entry now and then, so this answers after that entry applied: with the marker (never
    /// lower than before) and the entry's read token.
    async fn mark_read(req: MarkReadRequest) -> Result<MarkReadReply, ApiError>;
    /// Full-text search over the plaintext messages of the channels the caller may read, from
    /// the answering node's index, after it covers `read_token` (see [`crate::search`]). Each
    /// search spends a token of the user's rate limit, as a send does.
    async fn search(req: SearchRequest) -> Result<SearchReply, ApiError>;
}

/// A client-side transport for [`Chat`].
pub type ChatClientTransport = Transport<Response<ChatResponse>, ClientMessage<ChatRequest>>;
/// A server-side transport for [`Chat`].
pub type ChatServerTransport = Transport<ClientMessage<ChatRequest>, Response<ChatResponse>>;
/// Connects to a node's [`Chat`] service over TLS and spawns the client's dispatch task.
/// Returns the client and the session's login binding
/// ([`stream_binding`](crate::tls::stream_binding)).
///
/// # Errors
///
/// The `io::Error` from [`connect_tls`](crate::connect_tls), or `InvalidData` when the
/// session has no exporter (it always has after a finished TLS 1.3 handshake).
///
/// # Panics
///
/// Outside a tokio runtime (the dispatch task is spawned).
pub async fn connect_chat(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> io::Result<(ChatClient, [u8; 32])> {
    let stream = transport::connect_tls(addr, config, crate::tls::any_node(), timeout).await?;
    let binding = crate::tls::stream_binding(&stream).map_err(io::Error::other)?;
    let transport: ChatClientTransport = transport::framed(stream);
    Ok((
        ChatClient::new(tarpc::client::Config::default(), transport).spawn(),
        binding,
    ))
}

/// The server-side check of a [`Hello`]: same protocol version, same cluster name.
///
/// # Errors
///
/// [`ApiError::UnsupportedProtocol`] or [`ApiError::WrongCluster`], protocol checked first.
pub fn check_hello(hello: &Hello, our_cluster: &str) -> Result<(), ApiError> {
    if hello.protocol != PROTOCOL_VERSION {
        return Err(ApiError::UnsupportedProtocol {
            ours: PROTOCOL_VERSION,
            theirs: hello.protocol,
        });
    }
    if hello.cluster != our_cluster {
        return Err(ApiError::WrongCluster {
            ours: our_cluster.to_owned(),
            theirs: hello.cluster.clone(),
        });
    }
    Ok(())
}

/// A client context whose deadline is `now + wait + DEADLINE_MARGIN`, for calls that wait on
/// the server, such as `stream` with `wait_ms = wait`.
pub fn deadline_for(wait: Duration) -> context::Context {
    let mut ctx = context::current();
    ctx.deadline = Instant::now() + wait + DEADLINE_MARGIN;
    ctx
}

/// How long a server handler may wait for `wait_ms`: the smaller of `wait_ms` (capped at
/// [`STREAM_WAIT_MS_MAX`]) and the time left before `ctx`'s deadline less [`REPLY_MARGIN`]. Zero
/// when the deadline is (nearly) past.
pub fn wait_budget(ctx: &context::Context, wait_ms: u32) -> Duration {
    let wait = Duration::from_millis(u64::from(wait_ms.min(STREAM_WAIT_MS_MAX)));
    let left = ctx
        .deadline
        .saturating_duration_since(Instant::now())
        .saturating_sub(REPLY_MARGIN);
    wait.min(left)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx_with(left: Duration) -> context::Context {
        let mut ctx = context::current();
        ctx.deadline = Instant::now() + left;
        ctx
    }

    #[test]
    fn wait_budget_is_the_wait_when_the_deadline_is_far() {
        let ctx = deadline_for(Duration::from_millis(1_500));
        assert_eq!(wait_budget(&ctx, 1_500), Duration::from_millis(1_500));
    }

    #[test]
    fn wait_budget_ends_before_the_deadline() {
        let budget = wait_budget(&ctx_with(Duration::from_secs(1)), 5_000);
        assert!(
            budget <= Duration::from_secs(1) - REPLY_MARGIN,
            "{budget:?}"
        );
        assert!(budget > Duration::from_millis(500), "{budget:?}");
    }

    #[test]
    fn wait_budget_is_zero_past_the_deadline() {
        let mut ctx = context::current();
        ctx.deadline = Instant::now();
        assert_eq!(wait_budget(&ctx, 1_000), Duration::ZERO);
        assert_eq!(
            wait_budget(&ctx_with(REPLY_MARGIN / 2), 1_000),
            Duration::ZERO
        );
    }

    #[test]
    fn wait_budget_caps_the_wait() {
        let ctx = ctx_with(Duration::from_secs(600));
        let want = Duration::from_millis(u64::from(STREAM_WAIT_MS_MAX));
        assert_eq!(wait_budget(&ctx, u32::MAX), want);
    }

    #[test]
    fn deadline_for_adds_the_margin() {
        let before = Instant::now();
        let ctx = deadline_for(Duration::from_secs(20));
        assert!(ctx.deadline >= before + Duration::from_secs(20) + DEADLINE_MARGIN);
        assert!(ctx.deadline <= Instant::now() + Duration::from_secs(20) + DEADLINE_MARGIN);
    }

    #[test]
    fn check_hello_accepts_ours() {
        assert_eq!(check_hello(&Hello::new("c1", None), "c1"), Ok(()));
    }

    #[test]
    fn check_hello_checks_protocol_first() {
        let mut hello = Hello::new("other", Some("alice".into()));
        hello.protocol = PROTOCOL_VERSION + 1;
        assert_eq!(
            check_hello(&hello, "c1"),
            Err(ApiError::UnsupportedProtocol {
                ours: PROTOCOL_VERSION,
                theirs: PROTOCOL_VERSION + 1
            })
        );
    }

    #[test]
    fn check_hello_rejects_other_cluster() {
        assert_eq!(
            check_hello(&Hello::new("other", None), "c1"),
            Err(ApiError::WrongCluster {
                ours: "c1".into(),
                theirs: "other".into()
            })
        );
    }
}
