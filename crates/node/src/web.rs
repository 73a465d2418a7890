//! The web client: every node serves the page (`web/static/`, compiled in by `build.rs`) and a
//! WebSocket speaking the JSON protocol of `web/PROTOCOL.md`.
//!
//! A socket is a chat connection in another encoding: each socket has its own [`ChatServer`],
//! so logins, rate limits and every read check are the ones the tarpc clients meet. Writes
//! (sends, channel changes, read marks) that this node cannot make because it does not lead
//! are forwarded to the leader over the members' mutually authenticated Raft RPC
//! (`RaftRpc::web_write`), which runs them for the logged-in user: a page needs one socket.
//! Subscriptions are long polls of `Chat::stream` in a task per followed channel.
//!
//! Nothing a stranger sends can grow a socket's memory past fixed bounds: frames are at most
//! [`FRAME_BYTES_MAX`], calls in flight [`CALLS_MAX`], subscriptions [`SUBSCRIPTIONS_MAX`],
//! bytes queued to the page [`OUTBOX_BYTES_MAX`] (a reader that stops reading stalls its own
//! subscriptions, then loses the socket), and a socket must log in within [`LOGIN_WITHIN`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use futures::{SinkExt, StreamExt};
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use proto::{
    ApiError, ChannelInfoRequest, ChannelsRequest, Chat as _, HistoryRequest, Login, RejectReason,
    SearchRequest, StreamRequest,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinHandle;

use crate::api::{check_admitted, check_channel, ApiShared, ChatServer, TokenBucket};
use crate::conn_limit::{self, AddrKey, ConnLimiter};
use crate::ephemeral::{Direct, Event, Listening, Online, TypingNote};
use crate::push::{TYPING_BURST, TYPING_RATE_PER_S};
use crate::raft_rpc::Network;
use crate::types::NodeId;
use crate::web_forward::{ctx_within, run_write, Forwarded, WebWrite, WebWritten, FORWARD_TIMEOUT};

/// Largest frame a page may send; the largest call (a send of a 16 KiB body as JSON numbers)
/// fits well inside.
pub const FRAME_BYTES_MAX: usize = 256 * 1024;
/// Calls one socket may have in flight; more are answered `RateLimited`.
pub const CALLS_MAX: usize = 32;
/// Channels one socket may follow at once.
pub const SUBSCRIPTIONS_MAX: usize = 256;
/// Bytes queued to one page before its subscriptions wait for it to read.
pub const OUTBOX_BYTES_MAX: usize = 8 * 1024 * 1024;
/// A socket that has not logged in by then is closed.
pub const LOGIN_WITHIN: Duration = Duration::from_secs(15);
/// How often the node tells an idle page it is alive.
const PING_EVERY: Duration = Duration::from_secs(5);
/// A page whose outbox stays full this long is not reading: its socket is closed.
const STALLED_AFTER: Duration = Duration::from_secs(30);
/// How long a member may take to say its web URL, and how long an answer is kept.
const URL_TIMEOUT: Duration = Duration::from_secs(1);
const URL_KEPT: Duration = Duration::from_secs(30);
/// Messages per subscription batch, and how long one long poll waits.
const FOLLOW_BATCH: u32 = 200;
const FOLLOW_WAIT_MS: u32 = 20_000;
/// A request's HTTP head must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

mod assets {
    include!(concat!(env!("OUT_DIR"), "/web_assets.rs"));
}

/// One node's web service.
pub struct Web {
    shared: Arc<ApiShared>,
    network: Network,
    /// This node's own web URL, as pages reach it.
    url: String,
    /// Members' web URLs as they said them, with when.
    urls: Mutex<HashMap<NodeId, (Option<String>, Instant)>>,
}

impl Web {
    /// The web service of the node `shared` serves, reachable at `url`; `network` reaches
    /// the other members.
    pub fn new(shared: Arc<ApiShared>, network: Network, url: String) -> Arc<Web> {
        Arc::new(Web {
            shared,
            network,
            url,
            urls: Mutex::new(HashMap::new()),
        })
    }

    /// The members (`id`, raft address), this node first.
    fn members(&self) -> Vec<(NodeId, String)> {
        let id = self.shared.id;
        let mut members: Vec<(NodeId, String)> =
            crate::raft::with_server_metrics(&self.shared.raft, |m| {
                (m.membership_config.membership().nodes())
                    .map(|(node, member)| (*node, member.raft_addr.clone()))
                    .collect()
            });
        members.sort_by_key(|(node, _)| (*node != id, *node));
        members
    }

    /// Every member's web URL that is known, this node's first.
    async fn nodes(&self) -> Vec<Value> {
        let id = self.shared.id;
        let mut out = vec![json!({ "id": id.to_string(), "web": self.url })];
        for (node, raft_addr) in self.members() {
            if node == id {
                continue;
            }
            let kept = self.urls.lock().get(&node).cloned();
            let url = match kept {
                Some((url, at)) if at.elapsed() < URL_KEPT => url,
                _ => {
                    let peer = self.network.peer(node, raft_addr);
                    let url = peer.web_url(id, URL_TIMEOUT).await;
                    self.urls.lock().insert(node, (url.clone(), Instant::now()));
                    url
                }
            };
            if let Some(url) = url {
                out.push(json!({ "id": node.to_string(), "web": url }));
            }
        }
        out
    }

    /// Runs `write` for the user logged in on `server`: here when this node leads, else on
    /// the leader.
    async fn write(
        &self,
        server: &ChatServer,
        source: Option<IpAddr>,
        write: WebWrite,
    ) -> Result<WebWritten, ApiError> {
        let leader = match run_write(server.clone(), write.clone()).await {
            Err(ApiError::NotLeader {
                leader: Some(leader),
            }) if leader.id != self.shared.id => leader.id,
            answer => return answer,
        };
        let (user, public_key) = server.logged_in().ok_or(ApiError::Unauthenticated)?;
        let raft_addr = (self.members().into_iter())
            .find(|(node, _)| *node == leader)
            .map(|(_, addr)| addr)
            .ok_or_else(|| ApiError::unavailable("the leader is not a known member"))?;
        let forwarded = Forwarded {
            user,
            public_key,
            source,
            write,
        };
        (self.network.peer(leader, raft_addr))
            .web_write(self.shared.id, forwarded, FORWARD_TIMEOUT)
            .await
    }
}

/// Where a request came from, put into its extensions by the accept loop.
#[derive(Debug, Clone, Copy)]
struct Peer {
    ip: IpAddr,
    /// `None` for this machine (see `conn_limit::addr_key`).
    key: Option<AddrKey>,
}

fn router(web: Arc<Web>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/ws", get(upgrade))
        .route("/{*path}", get(asset))
        .with_state(web)
}

async fn index() -> Response {
    serve_asset("index.html")
}

async fn asset(Path(path): Path<String>) -> Response {
    serve_asset(&path)
}

/// The compiled-in file at `path`, with headers that keep it from being framed, sniffed or
/// cached past an upgrade (`no-cache` revalidates).
fn serve_asset(path: &str) -> Response {
    let Some((content_type, bytes)) = assets::find(path) else {
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    };
    let mut response = Response::new(Body::from(bytes));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // Sockets may go to any member's web address (failover), so ws: and wss: are allowed;
    // everything else comes from this origin only.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; \
             frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    );
    response
}

async fn upgrade(
    State(web): State<Arc<Web>>,
    Extension(peer): Extension<Peer>,
    ws: WebSocketUpgrade,
) -> Response {
    // No origin check: a socket is worth nothing before a login signed with the user's key,
    // which only our page's storage holds, so a foreign page gains nothing a raw client lacks.
    ws.max_message_size(FRAME_BYTES_MAX)
        .max_frame_size(FRAME_BYTES_MAX)
        .on_upgrade(move |socket| serve_socket(web, socket, peer))
}

/// Frames to the page, bounded by bytes: the socket's writer task takes them in order.
#[derive(Clone)]
struct Outbox {
    tx: tokio::sync::mpsc::UnboundedSender<Message>,
    queued: Arc<AtomicUsize>,
    drained: Arc<Notify>,
}

impl Outbox {
    /// Queues `text`, first waiting while the page has more than [`OUTBOX_BYTES_MAX`] unread.
    /// `false` once the socket is gone or stalled.
    async fn push(&self, text: String) -> bool {
        let deadline = tokio::time::Instant::now() + STALLED_AFTER;
        while self.queued.load(Ordering::Acquire) > OUTBOX_BYTES_MAX {
            let drained = self.drained.notified();
            if tokio::time::timeout_at(deadline, drained).await.is_err() {
                return false;
            }
        }
        self.push_now(text)
    }

    /// Queues `text` whatever is queued (small frames only: answers to bounded calls, pings).
    fn push_now(&self, text: String) -> bool {
        self.queued.fetch_add(text.len(), Ordering::AcqRel);
        self.tx.send(Message::Text(Utf8Bytes::from(text))).is_ok()
    }

    fn close(&self, code: u16, reason: &'static str) {
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        };
        let _ = self.tx.send(Message::Close(Some(frame)));
    }

    fn stalled(&self) -> bool {
        self.queued.load(Ordering::Acquire) > OUTBOX_BYTES_MAX
    }
}

/// A call from the page.
#[derive(Debug, Deserialize)]
struct Call {
    id: u64,
    op: String,
    #[serde(default)]
    args: Value,
}

/// Close codes (RFC 6455): a frame type we do not speak, and a policy violation.
const CLOSE_UNSUPPORTED: u16 = 1003;
const CLOSE_POLICY: u16 = 1008;
/// Close code of a message too big to process.
const CLOSE_TOO_BIG: u16 = 1009;

async fn serve_socket(web: Arc<Web>, socket: WebSocket, peer: Peer) {
    let (server, welcome) = ChatServer::for_web(web.shared.clone(), peer.key);
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Message>();
    let outbox = Outbox {
        tx,
        queued: Arc::new(AtomicUsize::new(0)),
        drained: Arc::new(Notify::new()),
    };
    let writer = {
        let (queued, drained) = (outbox.queued.clone(), outbox.drained.clone());
        tokio::spawn(async move {
            while let Some(message) = rx.recv().await {
                let (len, close) = match &message {
                    Message::Text(text) => (text.len(), false),
                    _ => (0, true),
                };
                let sent = sink.send(message).await.is_ok();
                queued.fetch_sub(len, Ordering::AcqRel);
                drained.notify_waiters();
                if !sent || close {
                    break;
                }
            }
            let _ = sink.close().await;
        })
    };
    outbox.push_now(
        json!({
            "ev": "welcome",
            "node_id": welcome.node_id.to_string(),
            "cluster": welcome.cluster,
            "protocol": welcome.protocol,
            "challenge": welcome.challenge,
            "server_time_ms": welcome.server_time_ms,
            "web": web.url,
        })
        .to_string(),
    );
    let mut session = Session {
        web,
        server,
        outbox: outbox.clone(),
        source: peer.key.map(|_| peer.ip),
        calls: Arc::new(Semaphore::new(CALLS_MAX)),
        follows: HashMap::new(),
        logged_in: false,
        online: None,
        direct: None,
        watching: false,
        typing: TokenBucket::new(TYPING_RATE_PER_S, TYPING_BURST),
    };
    let mut events = session.web.shared.ephemeral.subscribe();
    let login_deadline = tokio::time::Instant::now() + LOGIN_WITHIN;
    let mut ping = tokio::time::interval(PING_EVERY);
    let mut stalled_since: Option<Instant> = None;
    loop {
        tokio::select! {
            frame = stream.next() => {
                let frame = match frame {
                    Some(Ok(frame)) => frame,
                    Some(Err(e)) => {
                        // The only error the page can cause by what it sends: a frame or
                        // message over the limit (tungstenite's capacity error).
                        if e.to_string().contains("too long") {
                            outbox.close(CLOSE_TOO_BIG, "frames are at most 256 KiB");
                        }
                        break;
                    }
                    None => break,
                };
                match frame {
                    Message::Text(text) => {
                        if let Err(reason) = session.on_text(&text).await {
                            outbox.close(CLOSE_POLICY, reason);
                            break;
                        }
                    }
                    Message::Binary(_) => {
                        outbox.close(CLOSE_UNSUPPORTED, "binary frames are not part of this protocol");
                        break;
                    }
                    Message::Close(_) => break,
                    Message::Ping(_) | Message::Pong(_) => {}
                }
            }
            _ = ping.tick() => {
                if outbox.stalled() {
                    let since = *stalled_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > STALLED_AFTER {
                        break;
                    }
                } else {
                    stalled_since = None;
                    outbox.push_now(r#"{"ev":"ping"}"#.to_owned());
                }
            }
            Some(direct) = async {
                match &mut session.direct {
                    Some(direct) => direct.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                let frame = match direct {
                    Direct::Marker(frame) => session.watching.then_some(frame),
                    Direct::Typing { channel, frame } => {
                        session.follows.contains_key(&*channel).then_some(frame)
                    }
                };
                if let Some(text) = frame.as_deref().and_then(ephemeral_json) {
                    outbox.push_now(text);
                }
            }
            event = events.recv() => {
                let frame = match event {
                    Ok(Event::Presence { frame }) => session.watching.then_some(frame),
                    Err(RecvError::Lagged(_)) => {
                        session.watching.then(|| session.web.shared.ephemeral.full_frame())
                    }
                    Err(RecvError::Closed) => break,
                };
                if let Some(text) = frame.as_deref().and_then(ephemeral_json) {
                    outbox.push_now(text);
                }
            }
            () = tokio::time::sleep_until(login_deadline), if !session.logged_in => {
                outbox.close(CLOSE_POLICY, "log in within 15 s");
                break;
            }
        }
    }
    for (_, (task, _)) in session.follows.drain() {
        task.abort();
    }
    drop(session);
    drop(outbox);
    let _ = writer.await;
}

/// One socket's state.
struct Session {
    web: Arc<Web>,
    server: ChatServer,
    outbox: Outbox,
    /// The page's address for the registration limits of forwarded writes (`None`: this
    /// machine).
    source: Option<IpAddr>,
    calls: Arc<Semaphore>,
    /// Followed channels: the long-poll task, and the typing listener while it lasts.
    follows: HashMap<String, (JoinHandle<()>, Option<Listening>)>,
    logged_in: bool,
    /// Keeps the user online while the socket lasts, once logged in.
    online: Option<Online>,
    /// Typing notes and markers meant for this socket alone.
    direct: Option<mpsc::Receiver<Direct>>,
    /// Whether the page asked for presence, markers and additions (`watch_presence`).
    watching: bool,
    /// The socket's typing notes: over the rate they are dropped.
    typing: TokenBucket,
}

/// A push frame of presence, typing, a marker or an addition as the page's JSON event; other
/// frames (and any that does not decode) give `None`.
fn ephemeral_json(frame: &[u8]) -> Option<String> {
    use proto::push::ServerFrame;
    let body = frame.get(4..)?;
    let value = match proto::push::decode_server_frame(body).ok()? {
        ServerFrame::Typing { channel, user } => {
            json!({ "ev": "typing", "channel": channel, "user": user })
        }
        ServerFrame::Presence {
            online,
            offline,
            full,
        } => json!({ "ev": "presence", "online": online, "offline": offline, "full": full }),
        ServerFrame::Marker { channel, read_to } => {
            json!({ "ev": "marker", "channel": channel, "read_to": read_to })
        }
        ServerFrame::Added { channel, .. } => json!({ "ev": "added", "channel": channel }),
        _ => return None,
    };
    Some(value.to_string())
}

/// A bad argument of a known call.
fn malformed(what: impl Into<String>) -> ApiError {
    ApiError::Rejected(RejectReason::Malformed { what: what.into() })
}

fn answer(id: u64, result: Result<Value, ApiError>) -> String {
    match result {
        Ok(value) => json!({ "id": id, "ok": value }).to_string(),
        Err(e) => json!({ "id": id, "err": e, "message": e.to_string() }).to_string(),
    }
}

fn args<T: serde::de::DeserializeOwned>(op: &str, value: Value) -> Result<T, ApiError> {
    serde_json::from_value(value).map_err(|e| malformed(format!("arguments of {op}: {e}")))
}

fn to_value<T: Serialize>(value: T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

#[derive(Deserialize)]
struct UserKeysArgs {
    names: Vec<String>,
}

#[derive(Deserialize)]
struct FollowArgs {
    channel: String,
    #[serde(default)]
    after_seq: u64,
    #[serde(default)]
    read_token: u64,
}

#[derive(Deserialize)]
struct UnfollowArgs {
    channel: String,
}

impl Session {
    /// Handles one text frame. `Err` closes the socket with that reason: the frame is not a
    /// call of ours.
    async fn on_text(&mut self, text: &str) -> Result<(), &'static str> {
        let call: Call = serde_json::from_str(text).map_err(|_| "not a cellchat call")?;
        let id = call.id;
        match call.op.as_str() {
            "login" => {
                let result = match args::<Login>("login", call.args) {
                    Ok(login) => {
                        self.server
                            .clone()
                            .login(ctx_within(FORWARD_TIMEOUT), login)
                            .await
                    }
                    Err(e) => Err(e),
                };
                if let (Ok(session), None) = (&result, &self.online) {
                    let (online, direct) = self.web.shared.ephemeral.connected(&session.name);
                    (self.online, self.direct) = (Some(online), Some(direct));
                    self.logged_in = true;
                }
                self.outbox.push_now(answer(id, result.map(to_value)));
            }
            "typing" => {
                // Dropped, not refused, when over the rate or not admitted, as on push
                // connections: a typing note is worth too little to cost an error.
                if let (Ok(channel), Some((user, _))) = (
                    args::<UnfollowArgs>("typing", call.args),
                    self.server.logged_in(),
                ) {
                    let allowed = self.typing.take_now().is_ok()
                        && check_channel(&channel.channel).is_ok()
                        && check_admitted(&self.web.shared.chat, &channel.channel, &user).is_ok();
                    if allowed {
                        let note = TypingNote {
                            channel: channel.channel,
                            user,
                        };
                        self.web.shared.ephemeral.typing(note);
                    }
                }
                self.outbox.push_now(answer(id, Ok(Value::Null)));
            }
            "watch_presence" => {
                let result = match self.online {
                    Some(_) => {
                        self.watching = true;
                        Ok(Value::Null)
                    }
                    None => Err(ApiError::Unauthenticated),
                };
                self.outbox.push_now(answer(id, result));
                if self.watching {
                    let full = self.web.shared.ephemeral.full_frame();
                    if let Some(text) = ephemeral_json(&full) {
                        self.outbox.push_now(text);
                    }
                }
            }
            "subscribe" => {
                let result = self.follow(call.args);
                self.outbox
                    .push_now(answer(id, result.map(|()| Value::Null)));
            }
            "unsubscribe" => {
                let result = args::<UnfollowArgs>("unsubscribe", call.args).map(|a| {
                    if let Some((task, _)) = self.follows.remove(&a.channel) {
                        task.abort();
                    }
                    Value::Null
                });
                self.outbox.push_now(answer(id, result));
            }
            _ => {
                let Ok(permit) = self.calls.clone().try_acquire_owned() else {
                    let busy = ApiError::RateLimited {
                        retry_after_ms: 100,
                    };
                    self.outbox.push_now(answer(id, Err(busy)));
                    return Ok(());
                };
                let (web, server, outbox) =
                    (self.web.clone(), self.server.clone(), self.outbox.clone());
                let source = self.source;
                tokio::spawn(async move {
                    let result = call_op(&web, server, source, &call.op, call.args).await;
                    outbox.push(answer(id, result)).await;
                    drop(permit);
                });
            }
        }
        Ok(())
    }

    /// Starts following a channel (replacing an earlier follow of it).
    fn follow(&mut self, value: Value) -> Result<(), ApiError> {
        let follow: FollowArgs = args("subscribe", value)?;
        self.server.logged_in().ok_or(ApiError::Unauthenticated)?;
        check_channel(&follow.channel)?;
        if let Some((task, _)) = self.follows.remove(&follow.channel) {
            task.abort();
        }
        if self.follows.len() >= SUBSCRIPTIONS_MAX {
            return Err(malformed(format!(
                "at most {SUBSCRIPTIONS_MAX} subscriptions per socket"
            )));
        }
        let task = tokio::spawn(run_follow(
            self.server.clone(),
            self.outbox.clone(),
            follow.channel.clone(),
            follow.after_seq,
            follow.read_token,
        ));
        let listening = (self.online.as_ref()).map(|online| online.listening(&follow.channel));
        self.follows.insert(follow.channel, (task, listening));
        Ok(())
    }
}

/// One call other than login and subscriptions.
async fn call_op(
    web: &Web,
    server: ChatServer,
    source: Option<IpAddr>,
    op: &str,
    value: Value,
) -> Result<Value, ApiError> {
    let ctx = || {
        ctx_within(Duration::from_millis(
            u64::from(proto::STREAM_WAIT_MS_MAX) + 5000,
        ))
    };
    match op {
        "send" => {
            let written = web.write(&server, source, WebWrite::Send(args(op, value)?));
            match written.await? {
                WebWritten::Sent(reply) => Ok(to_value(reply)),
                other => Err(unexpected(&other)),
            }
        }
        "channel" => match web
            .write(&server, source, WebWrite::Channel(args(op, value)?))
            .await?
        {
            WebWritten::Channel(token) => Ok(to_value(token)),
            other => Err(unexpected(&other)),
        },
        "mark_read" => {
            match (web.write(&server, source, WebWrite::MarkRead(args(op, value)?))).await? {
                WebWritten::Marked(reply) => Ok(to_value(reply)),
                other => Err(unexpected(&other)),
            }
        }
        "history" => (server
            .history(ctx(), args::<HistoryRequest>(op, value)?)
            .await)
            .map(to_value),
        "channels" => (server
            .channels(ctx(), args::<ChannelsRequest>(op, value)?)
            .await)
            .map(to_value),
        "channel_info" => (server
            .channel_info(ctx(), args::<ChannelInfoRequest>(op, value)?)
            .await)
            .map(to_value),
        "user_keys" => {
            let names = args::<UserKeysArgs>(op, value)?.names;
            (server.user_keys(ctx(), names).await).map(to_value)
        }
        "search" => (server
            .search(ctx(), args::<SearchRequest>(op, value)?)
            .await)
            .map(to_value),
        "cluster" => (server.cluster(ctx()).await).map(to_value),
        "nodes" => Ok(Value::Array(web.nodes().await)),
        _ => Err(malformed(format!("unknown op {:?}", truncate(op)))),
    }
}

fn truncate(text: &str) -> &str {
    let mut end = text.len().min(64);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn unexpected(answer: &WebWritten) -> ApiError {
    tracing::error!(?answer, "a forwarded write answered with the wrong kind");
    ApiError::unavailable("internal error")
}

/// Follows `channel` after `after_seq` with long polls, sending each non-empty batch to the
/// page, until aborted or the channel refuses the user.
async fn run_follow(
    server: ChatServer,
    outbox: Outbox,
    channel: String,
    mut after_seq: u64,
    mut read_token: u64,
) {
    let wait = Duration::from_millis(u64::from(FOLLOW_WAIT_MS) + 5000);
    loop {
        let req = StreamRequest {
            channel: channel.clone(),
            after_seq,
            max: FOLLOW_BATCH,
            wait_ms: FOLLOW_WAIT_MS,
            read_token,
        };
        match server.clone().stream(ctx_within(wait), req).await {
            Ok(batch) => {
                read_token = 0;
                let Some(last) = batch.messages.last().map(|m| m.seq) else {
                    continue;
                };
                after_seq = last;
                let frame = json!({ "ev": "batch", "channel": channel, "batch": batch });
                if !outbox.push(frame.to_string()).await {
                    return;
                }
            }
            Err(ApiError::RateLimited { retry_after_ms }) => {
                tokio::time::sleep(Duration::from_millis(retry_after_ms.clamp(10, 5000))).await;
            }
            Err(e) if e.is_retryable() => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => {
                let frame = json!({
                    "ev": "sub_error", "channel": channel, "err": e, "message": e.to_string(),
                });
                outbox.push(frame.to_string()).await;
                return;
            }
        }
    }
}

/// This node's web URL for a listener at `local`, advertised as `host`.
pub fn url_of(host: IpAddr, port: u16, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://{}", SocketAddr::new(host, port))
}

/// Serves the web client on `listener` (TLS with `tls`, else plain HTTP) until aborted.
pub fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    web: Arc<Web>,
    limiter: ConnLimiter,
) -> JoinHandle<()> {
    let router = router(web);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "web accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Answers go out at once: without it a small frame behind another waits for the
            // browser's delayed ACK (40 ms).
            let _ = stream.set_nodelay(true);
            let local = stream.local_addr().ok();
            let Some(guard) = limiter.admit(peer, local, "web") else {
                continue;
            };
            let from = Peer {
                ip: peer.ip(),
                key: conn_limit::addr_key(peer.ip(), local.map(|l| l.ip())),
            };
            let (router, tls) = (router.clone(), tls.clone());
            tokio::spawn(async move {
                let _guard = guard;
                let service =
                    hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                        req.extensions_mut().insert(from);
                        let router = router.clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                tower::ServiceExt::oneshot(router, req)
                                    .await
                                    .unwrap_or_else(|e| match e {}),
                            )
                        }
                    });
                let mut http = hyper::server::conn::http1::Builder::new();
                http.timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT);
                let served = match tls {
                    Some(tls) => match proto::accept_tls(stream, tls).await {
                        Ok(stream) => {
                            http.serve_connection(TokioIo::new(stream), service)
                                .with_upgrades()
                                .await
                        }
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "web TLS handshake failed");
                            return;
                        }
                    },
                    None => {
                        http.serve_connection(TokioIo::new(stream), service)
                            .with_upgrades()
                            .await
                    }
                };
                if let Err(e) = served {
                    tracing::debug!(%peer, error = %e, "web connection ended");
                }
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::push::{encode_frame, ServerFrame};
    use proto::SendRequest;

    #[test]
    fn ephemeral_frames_become_the_pages_events() {
        let typing = encode_frame(&ServerFrame::Typing {
            channel: "general".into(),
            user: "bob".into(),
        });
        let json: Value = serde_json::from_str(&ephemeral_json(&typing).unwrap()).unwrap();
        assert_eq!(
            json,
            json!({"ev": "typing", "channel": "general", "user": "bob"})
        );
        let presence = encode_frame(&ServerFrame::Presence {
            online: vec!["alice".into()],
            offline: vec!["carol".into()],
            full: false,
        });
        let json: Value = serde_json::from_str(&ephemeral_json(&presence).unwrap()).unwrap();
        assert_eq!(json["online"], json!(["alice"]));
        assert_eq!(json["offline"], json!(["carol"]));
        let marker = encode_frame(&ServerFrame::Marker {
            channel: "general".into(),
            read_to: 9,
        });
        let json: Value = serde_json::from_str(&ephemeral_json(&marker).unwrap()).unwrap();
        assert_eq!(json["read_to"], json!(9));
        // Frames the page has no event for, and bytes that are no frame, give nothing.
        let heartbeat = encode_frame(&ServerFrame::Heartbeat { applied: 3 });
        assert_eq!(ephemeral_json(&heartbeat), None);
        assert_eq!(ephemeral_json(&[0, 0, 0, 2, 0xff, 0xff]), None);
        assert_eq!(ephemeral_json(&[]), None);
    }

    #[test]
    fn only_compiled_in_files_are_served() {
        assert!(assets::find("js/crypto.js").is_some());
        for path in [
            "../Cargo.toml",
            "/etc/passwd",
            "js/../../build.rs",
            "PROTOCOL.md",
            "",
        ] {
            assert_eq!(assets::find(path), None, "{path}");
        }
        let response = serve_asset("js/crypto.js");
        let headers = response.headers();
        assert_eq!(
            headers[header::CONTENT_TYPE],
            "text/javascript; charset=utf-8"
        );
        assert!(headers.contains_key(header::CONTENT_SECURITY_POLICY));
        assert_eq!(serve_asset("nope.js").status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn calls_are_json_objects_with_an_id_and_an_op() {
        let call: Call = serde_json::from_str(r#"{"id": 3, "op": "nodes"}"#).unwrap();
        assert_eq!(
            (call.id, call.op.as_str(), call.args),
            (3, "nodes", Value::Null)
        );
        for text in [
            "",
            "[]",
            r#"{"op": "nodes"}"#,
            r#"{"id": -1, "op": "x"}"#,
            "\u{0}",
        ] {
            assert!(serde_json::from_str::<Call>(text).is_err(), "{text:?}");
        }
        let bad: Result<SendRequest, _> = args("send", json!({"channel": 1}));
        assert!(matches!(
            bad,
            Err(ApiError::Rejected(RejectReason::Malformed { .. }))
        ));
    }

    #[test]
    fn long_ops_are_cut_on_a_character_boundary() {
        let op = "é".repeat(100);
        let cut = truncate(&op);
        assert!(cut.len() <= 64 && cut.chars().all(|c| c == 'é'));
    }
}
