//! The push server: server-pushed subscriptions over `proto::push` connections, whose path is
//! step 8 of "Life of a chat message" in ARCHITECTURE.md.
//!
//! Per connection, one task reads client frames and sends heartbeats, and one task per
//! subscription writes its batches; all frames go through one [`Out`], a lock around the
//! socket's write half, so a frame is always written whole. Memory: a subscription builds a
//! batch only after reserving room for it in its connection's byte budget
//! ([`PUSH_CONNECTION_BYTES_MAX`]) and holds it until written, so a client that stops reading
//! pins a few MiB however many subscriptions it opened; a write slower than [`WRITE_TIMEOUT`]
//! closes the connection, and the [`BatchCache`] is bounded per channel.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use futures::StreamExt;
use parking_lot::Mutex;
use proto::push::{
    self, ClientFrame, FrameError, PushWelcome, ServerFrame, Subscribe, CLIENT_FRAME_BYTES_MAX,
    CLIENT_SILENCE_MS_MAX, HEARTBEAT_MS,
};
use proto::TlsTcp;
use proto::{ApiError, MessageBatch, RejectReason};
use tarpc::tokio_util::codec::FramedRead;
use tokio::io::AsyncWriteExt;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;

use crate::api::{
    self, check_admitted, check_channel, storage_error, to_wire, ApiShared, TokenBucket,
    BATCH_MESSAGES_MAX,
};
use crate::conn_limit::ConnGuard;
use crate::ephemeral::{Direct, Event, Listening, Online, TypingNote};
use crate::metrics::GaugeGuard;

/// Most bytes of message bodies in one pushed batch (1 MiB); a batch holds at least one
/// message. Small enough that one slow subscriber's pending batch stays cheap, large enough
/// that a subscriber catching up moves fast.
pub const PUSH_BATCH_BYTES_MAX: usize = 1 << 20;

/// Most bytes of batches one push connection holds at once, built and not yet written (4 MiB).
pub const PUSH_CONNECTION_BYTES_MAX: usize = 4 << 20;

/// What a subscription reserves of its connection's budget before it builds a batch, in KiB:
/// the batch cap plus room for the encoding's overhead (a cut batch overshoots by at most one
/// message). What the built batch does not use goes back at once.
const BATCH_RESERVE_KIB: u32 = (PUSH_BATCH_BYTES_MAX >> 10) as u32 + 64;

/// Most open subscriptions on one push connection (as many as long polls on one tarpc
/// connection).
pub const SUBSCRIPTIONS_PER_CONNECTION_MAX: usize = 1024;

/// Typing frames one connection may send per second (and in a burst); more are dropped. A
/// client sends one per channel every few seconds while its user types.
pub(crate) const TYPING_RATE_PER_S: u32 = 4;
pub(crate) const TYPING_BURST: u32 = 8;

/// Time a new connection has to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a subscription waits for the node to apply its read token before it answers
/// `Unavailable` (the client then reads from another node).
const READ_TOKEN_WAIT: Duration = Duration::from_secs(5);

/// A frame write that takes longer than this closes the connection: the client stopped
/// reading, or vanished without a FIN or RST.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Cached encoded batches per channel.
const CACHE_ENTRIES_PER_CHANNEL: usize = 32;

/// Bytes of cached encoded batches per channel (8 MiB); a larger batch is not cached.
const CACHE_BYTES_PER_CHANNEL: usize = 8 << 20;

/// One encoded batch: `count` messages of a channel, the last one `last`.
#[derive(Debug)]
struct Encoded {
    last: u64,
    count: u64,
    /// `proto::push::encode_batch_body` of the batch.
    body: Bytes,
}

#[derive(Default)]
struct ChannelCache {
    /// `(after_seq, head, floor, batch)`, oldest first: the batch after `after_seq` as read
    /// when the channel's head was `head` and its floor `floor`.
    entries: VecDeque<(u64, u64, u64, Arc<Encoded>)>,
    bytes: usize,
}

/// Encoded batches shared among the subscribers of a channel.
///
/// Invariant: an entry `(after, head, floor, batch)` holds the messages
/// `max(after + 1, floor) ..= batch.last`, read when the channel's head was `head` and its floor
/// `floor`. Messages never change once applied, only expire, which raises the floor; so an
/// entry is valid while the floor is the one in its key.
#[derive(Default)]
pub struct BatchCache {
    channels: Mutex<HashMap<String, Arc<Mutex<ChannelCache>>>>,
}

impl BatchCache {
    fn channel(&self, channel: &str) -> Arc<Mutex<ChannelCache>> {
        let mut channels = self.channels.lock();
        if let Some(cache) = channels.get(channel) {
            return cache.clone();
        }
        // Drop the caches no subscription holds any more before adding one.
        channels.retain(|_, cache| Arc::strong_count(cache) > 1);
        channels.entry(channel.to_owned()).or_default().clone()
    }
}

/// The batch after `after` of `channel`, whose head is `head` (> `after`): from the cache, or
/// read and encoded (and cached). The first read comes from chat-sm's in-memory ring of each
/// channel's newest messages, or from RocksDB for a subscriber further behind. A subscriber
/// behind the channel's floor gets the batch from the floor on: the seqs between expired.
fn batch_after(
    shared: &ApiShared,
    cache: &Mutex<ChannelCache>,
    channel: &str,
    after: u64,
    head: u64,
) -> Result<Option<Arc<Encoded>>, ApiError> {
    // Keyed by the floor too: once an expiry raises it, no cached batch from before can
    // hand out an expired message again.
    let floor = shared.chat.floor(channel).0;
    let entries = |c: &ChannelCache| {
        c.entries
            .iter()
            .find(|e| (e.0, e.1, e.2) == (after, head, floor))
            .cloned()
    };
    if let Some((.., hit)) = entries(&cache.lock()) {
        return Ok(Some(hit));
    }
    let first = (after + 1).max(floor);
    let count = (head + 1)
        .saturating_sub(first)
        .min(u64::from(BATCH_MESSAGES_MAX)) as usize;
    let mut messages = shared
        .chat
        .history(channel, chat_sm::ChannelSeq(first), count)
        .map_err(storage_error(channel))?;
    // An expiry applied during the read: the floor read after it is the one the batch states.
    let floor = shared.chat.floor(channel).0;
    messages.retain(|m| m.seq.0 >= floor);
    let mut bytes = 0usize;
    if let Some(cut) = messages.iter().position(|m| {
        bytes += m.body.len() + m.sender.len() + 64;
        bytes > PUSH_BATCH_BYTES_MAX
    }) {
        messages.truncate(cut.max(1));
    }
    let Some(last) = messages.last().map(|m| m.seq.0) else {
        return Ok(None);
    };
    let start = messages[0].seq.0;
    let dense = last == start + messages.len() as u64 - 1;
    if !dense || (start != after + 1 && start > floor) {
        tracing::error!(%channel, after, floor, "chat state returned a non-dense range");
        return Err(ApiError::unavailable("storage read failed"));
    }
    let batch = MessageBatch {
        channel: channel.to_owned(),
        head,
        applied: shared.delivery.applied(),
        messages: messages.into_iter().map(to_wire).collect(),
        floor,
    };
    let encoded = Arc::new(Encoded {
        last,
        count: batch.messages.len() as u64,
        body: push::encode_batch_body(&batch),
    });
    shared.metrics.push_batches_encoded.inc();
    let len = encoded.body.len();
    if len <= CACHE_BYTES_PER_CHANNEL {
        let mut cache = cache.lock();
        while cache.entries.len() >= CACHE_ENTRIES_PER_CHANNEL
            || cache.bytes + len > CACHE_BYTES_PER_CHANNEL
        {
            let Some((.., old)) = cache.entries.pop_front() else {
                break;
            };
            cache.bytes -= old.body.len();
        }
        cache
            .entries
            .push_back((after, head, floor, encoded.clone()));
        cache.bytes += len;
    }
    Ok(Some(encoded))
}

/// The write side of one push connection, shared by its tasks.
struct Out {
    writer: tokio::sync::Mutex<WriteHalf<TlsTcp>>,
    /// When the last frame was written, in ms since `started`.
    last_write_ms: AtomicU64,
    started: Instant,
    /// Set to true when the connection must close (a write failed or timed out).
    closed: watch::Sender<bool>,
    /// The connection's byte budget, in KiB permits ([`PUSH_CONNECTION_BYTES_MAX`]).
    budget: Arc<Semaphore>,
}

impl Out {
    /// Writes `frame` (head then body) on a locked writer. Returns false, and closes the
    /// connection, if the write failed or took longer than [`WRITE_TIMEOUT`].
    async fn write_locked(&self, writer: &mut WriteHalf<TlsTcp>, mut frame: impl Buf) -> bool {
        // The flush pushes the TLS records out now rather than when the buffer fills.
        let writing = async {
            writer.write_all_buf(&mut frame).await?;
            writer.flush().await
        };
        let error = match tokio::time::timeout(WRITE_TIMEOUT, writing).await {
            Ok(Ok(())) => {
                let ms = self.started.elapsed().as_millis() as u64;
                self.last_write_ms.store(ms, Ordering::Relaxed);
                return true;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_owned(),
        };
        tracing::debug!(%error, "push write failed; closing the connection");
        self.closed.send_replace(true);
        false
    }

    /// When the last frame was written (the connection's start before any).
    fn last_write_at(&self) -> Instant {
        self.started + Duration::from_millis(self.last_write_ms.load(Ordering::Relaxed))
    }

    /// Writes `head` then `body` as one frame; false if the connection is closed by it.
    async fn write(&self, head: Bytes, body: Bytes) -> bool {
        let mut writer = self.writer.lock().await;
        self.write_locked(&mut writer, head.chain(body)).await
    }

    async fn send_error(&self, sub_id: Option<u64>, error: ApiError) -> bool {
        let frame = push::encode_frame(&ServerFrame::Error { sub_id, error });
        self.write(frame, Bytes::new()).await
    }

    /// A heartbeat, if nothing was written for `heartbeat`. A task holding the writer is
    /// writing anyway, so this never waits behind it. False if the write failed.
    async fn heartbeat(&self, heartbeat: Duration, applied: u64) -> bool {
        let last = Duration::from_millis(self.last_write_ms.load(Ordering::Relaxed));
        if self.started.elapsed().saturating_sub(last) < heartbeat {
            return true;
        }
        let Ok(mut writer) = self.writer.try_lock() else {
            return true;
        };
        let frame = push::encode_frame(&ServerFrame::Heartbeat { applied });
        self.write_locked(&mut writer, frame).await
    }
}

/// A subscription's task and channel; aborts the task when dropped, and stops the
/// connection hearing the channel's typing (through `_listening`).
struct SubTask {
    task: JoinHandle<()>,
    channel: String,
    _listening: Option<Listening>,
}

impl Drop for SubTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether a connection with `subs` passes on typing in `channel`: only while a subscription
/// there still runs (each checks that the user may still read the channel, and ends when
/// they may not).
fn still_reads(channel: &str, subs: &HashMap<u64, SubTask>) -> bool {
    subs.values()
        .any(|sub| sub.channel == channel && !sub.task.is_finished())
}

fn malformed(what: &str) -> ApiError {
    ApiError::Rejected(RejectReason::Malformed { what: what.into() })
}

fn undecodable(e: &FrameError) -> ApiError {
    malformed(match e {
        FrameError::TooLarge { .. } => "push frame too large",
        FrameError::Malformed(_) => "push frame",
    })
}

/// Serves one push connection whose [`PUSH_MAGIC`](proto::push::PUSH_MAGIC) was already read,
/// until the client closes it, a write fails, or the client breaks the protocol (then with a
/// debug log, and an error frame where one can still be understood). `guard` holds the
/// connection's place under the listener's caps until then.
///
/// It takes the stream already split: an async fn keeps its arguments beside everything it
/// moves them into, and this task lives as long as the client stays connected.
pub async fn serve_connection(
    shared: Arc<ApiShared>,
    cache: Arc<BatchCache>,
    (read, write): (ReadHalf<TlsTcp>, WriteHalf<TlsTcp>),
    peer: SocketAddr,
    binding: [u8; 32],
    guard: ConnGuard,
) {
    let _guard = guard;
    let _connected = GaugeGuard::new(&shared.metrics.connected_clients);
    let _push = GaugeGuard::new(&shared.metrics.push_connections);
    shared.metrics.push_connections_opened.inc();
    let mut frames = FramedRead::with_capacity(
        read,
        push::frame_codec(CLIENT_FRAME_BYTES_MAX),
        proto::READ_BUFFER_BYTES,
    );
    let (closed, mut closed_rx) = watch::channel(false);
    let out = Arc::new(Out {
        writer: tokio::sync::Mutex::new(write),
        last_write_ms: AtomicU64::new(0),
        started: Instant::now(),
        closed,
        budget: Arc::new(Semaphore::new(PUSH_CONNECTION_BYTES_MAX >> 10)),
    });
    // The client's next frame: `None` when the connection ended, an error to answer when the
    // stream is broken (oversized or cut frames cannot be resynchronized) or undecodable.
    let next_frame = |body: Option<Result<bytes::BytesMut, std::io::Error>>| match body? {
        Ok(body) => Some(push::decode_client_frame(&body).map_err(|e| undecodable(&e))),
        Err(e) => {
            tracing::debug!(%peer, error = %e, "push connection: bad frame");
            Some(Err(malformed("push frame")))
        }
    };

    let Ok(first) = tokio::time::timeout(HELLO_TIMEOUT, frames.next()).await else {
        tracing::debug!(%peer, "push connection: no hello in time");
        return;
    };
    let refused = match next_frame(first) {
        None => return,
        Some(Ok(ClientFrame::Hello(hello))) => {
            push::check_push_hello(&hello, &shared.cluster).err()
        }
        Some(Ok(_)) => Some(ApiError::Unauthenticated),
        Some(Err(error)) => Some(error),
    };
    if let Some(error) = refused {
        tracing::debug!(%peer, %error, "push hello refused");
        out.send_error(None, error).await;
        return;
    }
    let challenge: [u8; 32] = rand::random();
    let welcome = ServerFrame::Welcome(PushWelcome {
        node_id: shared.id,
        version: push::PUSH_VERSION,
        heartbeat_ms: HEARTBEAT_MS,
        challenge,
    });
    if !out.write(push::encode_frame(&welcome), Bytes::new()).await {
        return;
    }

    let mut bucket = TokenBucket::new(shared.conn_rate_per_s, shared.conn_burst);
    let mut typing_bucket = TokenBucket::new(TYPING_RATE_PER_S, TYPING_BURST);
    let mut user: Option<String> = None;
    // Keeps the user online in the cluster while the connection lasts; its receiver gets
    // the frames meant for this user alone.
    let mut online: Option<(Online, mpsc::Receiver<Direct>)> = None;
    let mut watching = false;
    let mut events = shared.ephemeral.subscribe();
    let mut subs: HashMap<u64, SubTask> = HashMap::new();
    let heartbeat = Duration::from_millis(HEARTBEAT_MS);
    let silence = Duration::from_millis(CLIENT_SILENCE_MS_MAX);
    let mut heard = Instant::now();
    // The loop wakes on its own only when a heartbeat is due or the client's silence runs
    // out: an idle connection costs one wake-up per heartbeat period.
    let mut not_before = Instant::now();
    loop {
        let due = (out.last_write_at() + heartbeat)
            .min(heard + silence)
            .max(not_before);
        tokio::select! {
            frame = frames.next() => {
                heard = Instant::now();
                let sub = match next_frame(frame) {
                    None => return,
                    Some(Ok(ClientFrame::Unsubscribe { sub_id })) => {
                        subs.remove(&sub_id);
                        continue;
                    }
                    Some(Ok(ClientFrame::Heartbeat)) => continue,
                    Some(Ok(ClientFrame::Login(login))) if user.is_none() => {
                        let verified = api::verify_login(&shared, &challenge, &binding, &login);
                        if let Err(error) = verified {
                            tracing::debug!(%peer, %error, "push login refused");
                            out.send_error(None, error).await;
                            return;
                        }
                        online = Some(shared.ephemeral.connected(&login.name));
                        user = Some(login.name);
                        continue;
                    }
                    Some(Ok(ClientFrame::Typing { channel })) => match &user {
                        Some(user) => {
                            // Dropped, not answered, when over the rate or not admitted: a
                            // typing note is worth too little to cost a round trip.
                            let allowed = typing_bucket.take_now().is_ok()
                                && check_channel(&channel).is_ok()
                                && check_admitted(&shared.chat, &channel, user).is_ok();
                            if allowed {
                                let user = user.clone();
                                shared.ephemeral.typing(TypingNote { channel, user });
                            }
                            continue;
                        }
                        None => Err(ApiError::Unauthenticated),
                    },
                    Some(Ok(ClientFrame::WatchPresence)) if user.is_some() => {
                        watching = true;
                        if !out.write(shared.ephemeral.full_frame(), Bytes::new()).await {
                            return;
                        }
                        continue;
                    }
                    Some(Ok(ClientFrame::WatchPresence)) => Err(ApiError::Unauthenticated),
                    Some(Ok(ClientFrame::Login(_))) => Err(malformed("second login")),
                    Some(Ok(ClientFrame::Subscribe(sub))) => match &user {
                        Some(user) => Ok((sub, user.clone())),
                        None => Err(ApiError::Unauthenticated),
                    },
                    Some(Ok(ClientFrame::Hello(_))) => Err(malformed("second hello")),
                    Some(Err(error)) => Err(error),
                };
                let (sub, user) = match sub {
                    Ok(sub) => sub,
                    Err(error) => {
                        tracing::debug!(%peer, %error, "push connection: protocol broken");
                        out.send_error(None, error).await;
                        return;
                    }
                };
                subs.retain(|_, sub| !sub.task.is_finished());
                let sub_id = sub.sub_id;
                let refused = if let Err(limited) = bucket.take_now() {
                    Err(limited)
                } else if subs.contains_key(&sub_id) {
                    Err(malformed("sub_id already open"))
                } else if subs.len() >= SUBSCRIPTIONS_PER_CONNECTION_MAX {
                    Err(ApiError::RateLimited { retry_after_ms: 1_000 })
                } else {
                    check_channel(&sub.channel)
                };
                // Membership is checked again before every batch, after the read token.
                if let Err(error) = refused {
                    if !out.send_error(Some(sub_id), error).await {
                        return;
                    }
                    continue;
                }
                let channel = sub.channel.clone();
                let listening = online.as_ref().map(|(online, _)| online.listening(&channel));
                let task = run_subscription(shared.clone(), cache.clone(), out.clone(), sub, user);
                let task = tokio::spawn(task);
                subs.insert(sub_id, SubTask { task, channel, _listening: listening });
            }
            Some(direct) = async {
                match &mut online {
                    Some((_, direct)) => direct.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                let frame = match direct {
                    Direct::Marker(frame) => watching.then_some(frame),
                    Direct::Typing { channel, frame } => {
                        still_reads(&channel, &subs).then_some(frame)
                    }
                };
                if let Some(frame) = frame {
                    if !out.write(frame, Bytes::new()).await {
                        return;
                    }
                }
            }
            event = events.recv() => {
                let frame = match event {
                    Ok(Event::Presence { frame }) => watching.then_some(frame),
                    // Changes were missed: the whole list again.
                    Err(RecvError::Lagged(_)) => watching.then(|| shared.ephemeral.full_frame()),
                    // The hub lives as long as `shared`, which this connection holds.
                    Err(RecvError::Closed) => return,
                };
                if let Some(frame) = frame {
                    if !out.write(frame, Bytes::new()).await {
                        return;
                    }
                }
            }
            () = tokio::time::sleep_until(due.into()) => {
                // A heartbeat skipped because a batch holds the writer is not retried at
                // once: that write counts as one.
                not_before = Instant::now() + heartbeat / 4;
                if heard.elapsed() > silence {
                    tracing::debug!(%peer, "push connection: the client fell silent");
                    return;
                }
                if !out.heartbeat(heartbeat, shared.delivery.applied()).await {
                    return;
                }
            }
            () = async {
                // The guard `wait_for` returns is not `Send`; drop it inside.
                let _ = closed_rx.wait_for(|closed| *closed).await;
            } => return,
        }
    }
}

/// One subscription of `user`: waits for its read token, then writes every batch after
/// `after_seq`, woken by applies to its channel. Ends when the connection fails, it is aborted
/// (unsubscribe, connection closed), or `user` may no longer read the channel (answered
/// `NotMember`).
async fn run_subscription(
    shared: Arc<ApiShared>,
    cache: Arc<BatchCache>,
    out: Arc<Out>,
    sub: Subscribe,
    user: String,
) {
    let _gauge = GaugeGuard::new(&shared.metrics.push_subscriptions);
    let Subscribe {
        sub_id,
        channel,
        after_seq: mut after,
        read_token,
    } = sub;
    let delivery = &shared.delivery;
    if !delivery.wait_applied(read_token, READ_TOKEN_WAIT).await {
        let error = ApiError::unavailable("node is behind the read token");
        out.send_error(Some(sub_id), error).await;
        return;
    }
    let channel_cache = cache.channel(&channel);
    let mut heads = delivery.head_receiver(&channel);
    loop {
        // Mark the current value seen before reading the head, so an apply in between is
        // either in the head read or wakes `changed` below.
        heads.borrow_and_update();
        if let Err(error) = check_admitted(&shared.chat, &channel, &user) {
            out.send_error(Some(sub_id), error).await;
            return;
        }
        let head = shared.chat.head(&channel).0;
        if head > after {
            let Ok(mut reserved) = out
                .budget
                .clone()
                .acquire_many_owned(BATCH_RESERVE_KIB)
                .await
            else {
                return;
            };
            match batch_after(&shared, &channel_cache, &channel, after, head) {
                Ok(Some(batch)) => {
                    let kib = batch.body.len().div_ceil(1024).max(1);
                    drop(reserved.split(reserved.num_permits().saturating_sub(kib)));
                    let frame_head = push::encode_batch_frame(sub_id, &batch.body);
                    if !out.write(frame_head, batch.body.clone()).await {
                        return;
                    }
                    drop(reserved);
                    shared.metrics.deliveries_total.inc_by(batch.count);
                    after = batch.last;
                    continue;
                }
                // The head moved but the messages are not readable yet (a snapshot install
                // swapping state): wait for the next apply.
                Ok(None) => {}
                Err(error) => {
                    out.send_error(Some(sub_id), error).await;
                    return;
                }
            }
        }
        if heads.changed().await.is_err() {
            // Delivery dropped the channel's sender (it cannot while this receiver lives).
            let error = ApiError::unavailable("shutting down");
            out.send_error(Some(sub_id), error).await;
            return;
        }
    }
}
