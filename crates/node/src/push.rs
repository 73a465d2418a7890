//! The push server: server-pushed subscriptions over `proto::push` connections.
//!
//! The client address accepts both tarpc and push connections; `server.rs` peeks at the
//! first 4 bytes and hands connections that start with [`proto::push::PUSH_MAGIC`] to
//! [`serve_connection`]. One task per connection reads client frames (hello, subscribe,
//! unsubscribe) and sends heartbeats; one task per subscription writes that subscription's
//! batches. Frames of all of a connection's tasks go through one [`Out`], a lock around the
//! socket's write half, so a frame is always written whole.
//!
//! The hot path, one applied batch delivered to N subscribers of a channel:
//! - the apply listener ([`Delivery`](crate::Delivery)) bumps the channel's head watch, which
//!   wakes exactly the subscription tasks of that channel (never a timer);
//! - each task asks the [`BatchCache`] for the batch after its position; the first one reads
//!   the messages (from chat-sm's in-memory ring of the newest 1000 messages per channel, or
//!   from RocksDB for a subscriber further behind) and encodes them once into a
//!   [`Bytes`] body; every other subscriber at the same position gets the same bytes;
//! - each task writes a small per-subscription frame head and the shared body to its socket.
//!
//! Memory: a subscription holds at most one batch (up to [`BATCH_MESSAGES_MAX`] messages or
//! [`PUSH_BATCH_BYTES_MAX`] bytes) while its socket write waits; a slow reader's task waits on
//! TCP backpressure and reads its next batch only after the write finished. A write that waits
//! longer than [`WRITE_TIMEOUT`] closes the connection. The cache is bounded per channel in
//! entries and bytes and evicts the oldest entry first.
//!
//! Step 8 of "Life of a chat message" in ARCHITECTURE.md.

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
    HEARTBEAT_MS,
};
use proto::{ApiError, MessageBatch, RejectReason};
use tarpc::tokio_util::codec::FramedRead;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::{map_reject, to_wire, ApiShared, TokenBucket, BATCH_MESSAGES_MAX};

/// Most bytes of message bodies in one pushed batch (1 MiB); a batch holds at least one
/// message. Small enough that one slow subscriber's pending batch stays cheap, large enough
/// that a subscriber catching up moves fast.
pub const PUSH_BATCH_BYTES_MAX: usize = 1 << 20;

/// Most open subscriptions on one push connection (as many as long polls on one tarpc
/// connection).
pub const SUBSCRIPTIONS_PER_CONNECTION_MAX: usize = 1024;

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

/// One encoded batch: messages `first..=last` of a channel.
#[derive(Debug)]
struct Encoded {
    last: u64,
    count: u64,
    /// `proto::push::encode_batch_body` of the batch.
    body: Bytes,
}

#[derive(Default)]
struct ChannelCache {
    /// `(after_seq, head, batch)`, oldest first: the batch after `after_seq` as read when the
    /// channel's head was `head`.
    entries: VecDeque<(u64, u64, Arc<Encoded>)>,
    bytes: usize,
}

/// Encoded batches shared among the subscribers of a channel.
///
/// Invariant: an entry `(after, head, batch)` holds the messages `after + 1 ..= batch.last`,
/// read when the channel's head was `head`; messages never change once applied, so an entry
/// is valid for as long as it is kept.
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
/// read and encoded (and cached).
fn batch_after(
    shared: &ApiShared,
    cache: &Mutex<ChannelCache>,
    channel: &str,
    after: u64,
    head: u64,
) -> Result<Option<Arc<Encoded>>, ApiError> {
    if let Some(hit) = cache
        .lock()
        .entries
        .iter()
        .find(|(a, h, _)| *a == after && *h == head)
    {
        return Ok(Some(hit.2.clone()));
    }
    let count = (head - after).min(u64::from(BATCH_MESSAGES_MAX)) as usize;
    let mut messages = shared
        .chat
        .history(channel, chat_sm::ChannelSeq(after + 1), count)
        .map_err(|e| {
            tracing::error!(error = %e, %channel, "chat state read failed");
            ApiError::unavailable("storage read failed")
        })?;
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
    if messages.first().map(|m| m.seq.0) != Some(after + 1) || last != after + messages.len() as u64
    {
        tracing::error!(%channel, after, "chat state returned a non-dense range");
        return Err(ApiError::unavailable("storage read failed"));
    }
    let batch = MessageBatch {
        channel: channel.to_owned(),
        head,
        applied: shared.delivery.applied(),
        messages: messages.into_iter().map(to_wire).collect(),
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
            let Some((_, _, old)) = cache.entries.pop_front() else {
                break;
            };
            cache.bytes -= old.body.len();
        }
        cache.entries.push_back((after, head, encoded.clone()));
        cache.bytes += len;
    }
    Ok(Some(encoded))
}

/// The write side of one push connection, shared by its tasks.
struct Out {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    /// When the last frame was written, in ms since `started`.
    last_write_ms: AtomicU64,
    started: Instant,
    /// Set to true when the connection must close (a write failed or timed out).
    closed: watch::Sender<bool>,
}

impl Out {
    /// Writes `head` then `body` as one frame. Returns false (and closes the connection) if
    /// the write failed or took longer than [`WRITE_TIMEOUT`].
    async fn write(&self, head: Bytes, body: Bytes) -> bool {
        let mut writer = self.writer.lock().await;
        let mut frame = head.chain(body);
        let written = tokio::time::timeout(WRITE_TIMEOUT, writer.write_all_buf(&mut frame)).await;
        drop(writer);
        match written {
            Ok(Ok(())) => {
                let ms = self.started.elapsed().as_millis() as u64;
                self.last_write_ms.store(ms, Ordering::Relaxed);
                true
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "push write failed");
                self.closed.send_replace(true);
                false
            }
            Err(_) => {
                tracing::debug!("push write timed out; closing the connection");
                self.closed.send_replace(true);
                false
            }
        }
    }

    async fn send(&self, frame: &ServerFrame) -> bool {
        self.write(push::encode_frame(frame), Bytes::new()).await
    }

    async fn send_error(&self, sub_id: Option<u64>, error: ApiError) -> bool {
        self.send(&ServerFrame::Error { sub_id, error }).await
    }

    fn idle(&self) -> Duration {
        let last = self.last_write_ms.load(Ordering::Relaxed);
        self.started
            .elapsed()
            .saturating_sub(Duration::from_millis(last))
    }
}

/// Aborts a subscription task when dropped.
struct SubTask(JoinHandle<()>);

impl Drop for SubTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Decrements a gauge when dropped.
struct GaugeGuard(prometheus_client::metrics::gauge::Gauge);

impl GaugeGuard {
    fn new(gauge: &prometheus_client::metrics::gauge::Gauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Serves one push connection whose [`PUSH_MAGIC`](proto::push::PUSH_MAGIC) was already read,
/// until the client closes it, a write fails, or the client breaks the protocol (then with a
/// debug log, and an error frame where one can still be understood).
pub async fn serve_connection(
    shared: Arc<ApiShared>,
    cache: Arc<BatchCache>,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let _connected = GaugeGuard::new(&shared.metrics.connected_clients);
    let _push = GaugeGuard::new(&shared.metrics.push_connections);
    let (read, write) = stream.into_split();
    let mut frames = FramedRead::new(read, push::frame_codec(CLIENT_FRAME_BYTES_MAX));
    let (closed, mut closed_rx) = watch::channel(false);
    let out = Arc::new(Out {
        writer: tokio::sync::Mutex::new(write),
        last_write_ms: AtomicU64::new(0),
        started: Instant::now(),
        closed,
    });

    let hello = match tokio::time::timeout(HELLO_TIMEOUT, frames.next()).await {
        Ok(Some(Ok(body))) => push::decode_client_frame(&body),
        Ok(Some(Err(e))) => {
            tracing::debug!(%peer, error = %e, "push connection: bad first frame");
            return;
        }
        Ok(None) => return,
        Err(_) => {
            tracing::debug!(%peer, "push connection: no hello in time");
            return;
        }
    };
    match hello {
        Ok(ClientFrame::Hello(hello)) => {
            if let Err(error) = push::check_push_hello(&hello, &shared.cluster) {
                tracing::debug!(%peer, %error, "push hello refused");
                out.send_error(None, error).await;
                return;
            }
        }
        Ok(_) => {
            tracing::debug!(%peer, "push connection: frame before hello");
            out.send_error(None, ApiError::Unauthenticated).await;
            return;
        }
        Err(e) => {
            tracing::debug!(%peer, error = %e, "push connection: undecodable hello");
            out.send_error(None, malformed(&e)).await;
            return;
        }
    }
    let welcome = ServerFrame::Welcome(PushWelcome {
        node_id: shared.id,
        version: push::PUSH_VERSION,
        heartbeat_ms: HEARTBEAT_MS,
    });
    if !out.send(&welcome).await {
        return;
    }

    let mut bucket = TokenBucket::new(shared.conn_rate_per_s, shared.conn_burst);
    let mut subs: HashMap<u64, SubTask> = HashMap::new();
    let heartbeat = Duration::from_millis(HEARTBEAT_MS);
    let mut tick = tokio::time::interval(heartbeat / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            frame = frames.next() => {
                let body = match frame {
                    Some(Ok(body)) => body,
                    Some(Err(e)) => {
                        // Oversized or cut frames: the stream cannot be resynchronized.
                        tracing::debug!(%peer, error = %e, "push connection: bad frame");
                        out.send_error(None, ApiError::Rejected(RejectReason::Malformed {
                            what: "push frame".into(),
                        })).await;
                        return;
                    }
                    None => return,
                };
                let frame = match push::decode_client_frame(&body) {
                    Ok(frame) => frame,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "push connection: undecodable frame");
                        out.send_error(None, malformed(&e)).await;
                        return;
                    }
                };
                match frame {
                    ClientFrame::Hello(_) => {
                        tracing::debug!(%peer, "push connection: second hello");
                        out.send_error(None, ApiError::Rejected(RejectReason::Malformed {
                            what: "second hello".into(),
                        })).await;
                        return;
                    }
                    ClientFrame::Unsubscribe { sub_id } => {
                        subs.remove(&sub_id);
                    }
                    ClientFrame::Subscribe(sub) => {
                        subs.retain(|_, task| !task.0.is_finished());
                        let sub_id = sub.sub_id;
                        let refused = if let Err(retry_after_ms) = bucket.take(Instant::now()) {
                            Some(ApiError::RateLimited { retry_after_ms })
                        } else if subs.contains_key(&sub_id) {
                            Some(ApiError::Rejected(RejectReason::Malformed {
                                what: "sub_id already open".into(),
                            }))
                        } else if subs.len() >= SUBSCRIPTIONS_PER_CONNECTION_MAX {
                            Some(ApiError::RateLimited { retry_after_ms: 1_000 })
                        } else {
                            chat_sm::ChannelName::new(&sub.channel)
                                .err()
                                .map(|r| ApiError::Rejected(map_reject(r)))
                        };
                        if let Some(error) = refused {
                            if !out.send_error(Some(sub_id), error).await {
                                return;
                            }
                            continue;
                        }
                        let task = tokio::spawn(run_subscription(
                            shared.clone(),
                            cache.clone(),
                            out.clone(),
                            sub,
                        ));
                        subs.insert(sub_id, SubTask(task));
                    }
                }
            }
            _ = tick.tick() => {
                if out.idle() >= heartbeat {
                    let applied = shared.delivery.applied();
                    // A task holding the writer is writing anyway; never wait behind it here.
                    if let Ok(mut writer) = out.writer.try_lock() {
                        let frame = push::encode_frame(&ServerFrame::Heartbeat { applied });
                        let written = tokio::time::timeout(WRITE_TIMEOUT, writer.write_all(&frame)).await;
                        if !matches!(written, Ok(Ok(()))) {
                            tracing::debug!(%peer, "push heartbeat write failed");
                            return;
                        }
                        let ms = out.started.elapsed().as_millis() as u64;
                        out.last_write_ms.store(ms, Ordering::Relaxed);
                    }
                }
            }
            () = async {
                // The guard `wait_for` returns is not `Send`; drop it inside.
                let _ = closed_rx.wait_for(|closed| *closed).await;
            } => return,
        }
    }
}

fn malformed(e: &FrameError) -> ApiError {
    let what = match e {
        FrameError::TooLarge { .. } => "push frame too large",
        FrameError::Malformed(_) => "push frame",
    };
    ApiError::Rejected(RejectReason::Malformed { what: what.into() })
}

/// One subscription: waits for its read token, then writes every batch after `after_seq`,
/// woken by applies to its channel. Ends when the connection fails or it is aborted
/// (unsubscribe, connection closed).
async fn run_subscription(
    shared: Arc<ApiShared>,
    cache: Arc<BatchCache>,
    out: Arc<Out>,
    sub: Subscribe,
) {
    let _gauge = GaugeGuard::new(&shared.metrics.push_subscriptions);
    let Subscribe {
        sub_id,
        channel,
        after_seq,
        read_token,
    } = sub;
    if !shared
        .delivery
        .wait_applied(read_token, READ_TOKEN_WAIT)
        .await
    {
        out.send_error(
            Some(sub_id),
            ApiError::unavailable("node is behind the read token"),
        )
        .await;
        return;
    }
    let channel_cache = cache.channel(&channel);
    let mut heads = shared.delivery.head_receiver(&channel);
    let mut after = after_seq;
    loop {
        // Mark the current value seen before reading the head, so an apply in between is
        // either in the head read or wakes `changed` below.
        heads.borrow_and_update();
        let head = shared.chat.head(&channel).0;
        if head > after {
            match batch_after(&shared, &channel_cache, &channel, after, head) {
                Ok(Some(batch)) => {
                    let frame_head = push::encode_batch_frame(sub_id, &batch.body);
                    if !out.write(frame_head, batch.body.clone()).await {
                        return;
                    }
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
            out.send_error(Some(sub_id), ApiError::unavailable("shutting down"))
                .await;
            return;
        }
    }
}
