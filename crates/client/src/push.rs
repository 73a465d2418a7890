//! Push connections: one per node per [`Client`](crate::Client), shared by all of that
//! client's subscriptions reading from the node (`proto::push` describes the protocol).
//!
//! A [`PushConn`] runs one task that writes the client's frames and reads the node's, and
//! hands each batch out to its subscription's application channel itself (`handout.rs`'s
//! `Handout`), or passes it to the subscription's poll loop when that channel is full. The
//! connection ends (and every subscription on it sees its channel close) on EOF, a read error,
//! a protocol violation by the node, or [`proto::push::SILENCE_MS_MAX`] without any frame;
//! killing the node ends it at once, a vanished node within that silence limit.
//!
//! Backpressure: past the application's channel, a subscription's poll loop holds
//! [`SUB_EVENTS_CAPACITY`] batches; when the application does not keep up, the connection task
//! waits, stops reading the socket, and TCP slows the node down. Subscriptions on one
//! connection therefore share its pace.
//!
//! Presence and typing ([`Ephemeral`]) from every connection go to one broadcast per client,
//! which drops what a slow listener misses rather than slowing the connection. A connection
//! sends a heartbeat when it wrote nothing for [`push::CLIENT_HEARTBEAT_MS`]: that is what
//! keeps the user online while the client only listens.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use parking_lot::Mutex;
use proto::push::{self, ClientFrame, PushHello, ServerFrame, Subscribe};
use proto::TlsTcp;
use proto::{ApiError, MessageBatch};
use tarpc::tokio_util::codec::FramedRead;
use tokio::io::AsyncWriteExt;
use tokio::sync::{broadcast, mpsc};

use crate::config::ClientConfig;
use crate::handout::Handout;
use crate::identity::Identity;
use crate::retry::Failure;
use crate::routing::Routes;
use crate::trust::ClusterTrust;

/// Batches buffered per subscription before the connection stops reading.
const SUB_EVENTS_CAPACITY: usize = 64;

/// A node that closed a push connection before welcoming it (an older node) is served by long
/// polls for this long before push is tried again.
const UNSUPPORTED_RETRY: Duration = Duration::from_secs(60);

/// What a subscription receives: the next messages, or why the node ended it.
type SubEvent = Result<MessageBatch, ApiError>;

/// Presence and typing events buffered for a slow listener before it misses some.
const EPHEMERAL_CAPACITY: usize = 1_024;

/// Presence, typing and read markers, as the client's push connections hear them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ephemeral {
    /// `user` types in `channel`, a channel this client subscribes to; show it for
    /// [`proto::push::TYPING_SHOW_MS`] or until their next message there.
    Typing {
        /// The channel.
        channel: String,
        /// Who types.
        user: String,
    },
    /// Who came online and who went offline. When `full`, `online` is everyone online and
    /// replaces what was known.
    Presence {
        /// Now online.
        online: Vec<String>,
        /// Now offline.
        offline: Vec<String>,
        /// `online` is the whole list.
        full: bool,
    },
    /// This user's read marker in `channel` moved to `read_to`, on any of their clients.
    Marker {
        /// The channel.
        channel: String,
        /// The new marker.
        read_to: u64,
    },
    /// Someone started a direct conversation with this user (`channel` is `dm-...`), or
    /// invited them to the private `channel`. Heard once per connection that heard it, so a
    /// client connected to two nodes may hear it twice. The client's read token covers it
    /// before it is heard, so reading the channel next finds it on any node.
    Added {
        /// The channel.
        channel: String,
    },
}

/// What the client's push connections heard of presence and typing, shared with their tasks.
pub(crate) struct Heard {
    events: broadcast::Sender<Ephemeral>,
    /// Everyone online, once a full list arrived.
    online: Mutex<Option<BTreeSet<String>>>,
    /// Wakes [`PushPool::online`] when a full list arrives.
    full: tokio::sync::Notify,
}

impl Heard {
    fn new() -> Self {
        Heard {
            events: broadcast::channel(EPHEMERAL_CAPACITY).0,
            online: Mutex::default(),
            full: tokio::sync::Notify::new(),
        }
    }

    fn hear(&self, event: Ephemeral) {
        if let Ephemeral::Presence {
            online,
            offline,
            full,
        } = &event
        {
            let mut known = self.online.lock();
            if *full {
                *known = Some(online.iter().cloned().collect());
                self.full.notify_waiters();
            } else if let Some(known) = known.as_mut() {
                known.extend(online.iter().cloned());
                for user in offline {
                    known.remove(user);
                }
            }
        }
        // Nobody listening is fine: the list above is kept either way.
        let _ = self.events.send(event);
    }
}

/// Why no push connection could be had.
#[derive(Debug)]
pub(crate) enum DialError {
    /// The node does not speak the push protocol; use long polls.
    Unsupported,
    /// As for any connection.
    Failed(Failure),
}

/// The push connections of one client, by node id.
pub(crate) struct PushPool {
    config: Arc<ClientConfig>,
    trust: Arc<ClusterTrust>,
    routes: Arc<Routes>,
    /// Who logs in on each push connection (reading needs a login).
    identity: Option<Identity>,
    conns: Mutex<HashMap<u64, Arc<PushConn>>>,
    unsupported: Mutex<HashMap<u64, Instant>>,
    /// Serializes dials, so subscriptions started together share one connection.
    dialing: tokio::sync::Mutex<()>,
    heard: Arc<Heard>,
    /// Every connection asks for presence once someone wants it.
    watch_presence: AtomicBool,
}

impl PushPool {
    pub(crate) fn new(
        config: Arc<ClientConfig>,
        trust: Arc<ClusterTrust>,
        routes: Arc<Routes>,
        identity: Option<Identity>,
    ) -> Self {
        Self {
            config,
            trust,
            routes,
            identity,
            conns: Mutex::default(),
            unsupported: Mutex::default(),
            dialing: tokio::sync::Mutex::default(),
            heard: Arc::new(Heard::new()),
            watch_presence: AtomicBool::new(false),
        }
    }

    /// Presence and typing from now on; turns on presence for every connection.
    pub(crate) fn ephemeral(&self) -> broadcast::Receiver<Ephemeral> {
        let events = self.heard.events.subscribe();
        self.watch_presence.store(true, Ordering::Release);
        for conn in self.conns.lock().values() {
            conn.watch_presence();
        }
        events
    }

    /// Everyone online as of the last full list and the changes after it, waiting up to
    /// `wait` for a first full list from a connection to `node`; `None` if none came.
    pub(crate) async fn online(&self, node: u64, wait: Duration) -> Option<Vec<String>> {
        let full = self.heard.full.notified();
        tokio::pin!(full);
        full.as_mut().enable();
        if let Some(known) = &*self.heard.online.lock() {
            return Some(known.iter().cloned().collect());
        }
        let _events = self.ephemeral();
        if let Ok(conn) = self.get(node).await {
            conn.watch_presence();
        }
        tokio::time::timeout(wait, full).await.ok()?;
        let known = self.heard.online.lock();
        known.as_ref().map(|known| known.iter().cloned().collect())
    }

    /// Tells the node of a live connection that this user types in `channel`; false when
    /// there is no live connection to tell (typing is never worth a dial).
    pub(crate) fn typing(&self, channel: &str) -> bool {
        let conn = {
            let mut conns = self.conns.lock();
            conns.retain(|_, conn| !conn.shared.closed.load(Ordering::Acquire));
            conns.values().next().cloned()
        };
        conn.is_some_and(|conn| {
            let frame = ClientFrame::Typing {
                channel: channel.to_owned(),
            };
            conn.frames.send(frame).is_ok()
        })
    }

    /// Whether push should be tried on `node` (false for a while after it refused push).
    pub(crate) fn supports(&self, node: u64) -> bool {
        let mut unsupported = self.unsupported.lock();
        unsupported.retain(|_, since| since.elapsed() < UNSUPPORTED_RETRY);
        !unsupported.contains_key(&node)
    }

    fn live(&self, node: u64) -> Option<Arc<PushConn>> {
        let mut conns = self.conns.lock();
        conns.retain(|_, conn| !conn.shared.closed.load(Ordering::Acquire));
        conns.get(&node).cloned()
    }

    /// Drops the pool's connection to `node` (subscriptions on it keep it until they end).
    pub(crate) fn forget(&self, node: u64) {
        self.conns.lock().remove(&node);
    }

    /// The open push connection to `node`, or a new one.
    pub(crate) async fn get(&self, node: u64) -> Result<Arc<PushConn>, DialError> {
        if let Some(conn) = self.live(node) {
            return Ok(conn);
        }
        let _dialing = self.dialing.lock().await;
        if let Some(conn) = self.live(node) {
            return Ok(conn);
        }
        let Some(identity) = &self.identity else {
            return Err(DialError::Failed(Failure::Api(ApiError::Unauthenticated)));
        };
        let dialed = dial(
            &self.config,
            &self.trust,
            &self.routes,
            identity,
            node,
            self.heard.clone(),
        );
        let conn = match dialed.await {
            Ok(conn) => Arc::new(conn),
            Err(DialError::Unsupported) => {
                tracing::info!(node, "node does not speak push; using long polls");
                self.unsupported.lock().insert(node, Instant::now());
                return Err(DialError::Unsupported);
            }
            Err(e) => return Err(e),
        };
        self.conns.lock().insert(node, conn.clone());
        if self.watch_presence.load(Ordering::Acquire) {
            conn.watch_presence();
        }
        Ok(conn)
    }
}

/// State shared by a [`PushConn`] and its task.
#[derive(Default)]
struct ConnShared {
    subs: Mutex<HashMap<u64, SubEntry>>,
    closed: AtomicBool,
}

/// One open subscription, as its connection's task sees it.
struct SubEntry {
    /// Where its batches are handed out.
    handout: Arc<Handout>,
    /// The poll loop's attempt it was opened for.
    attempt: u64,
    /// Its poll loop: batches that wait for room, and the node's errors.
    events: mpsc::Sender<SubEvent>,
}

/// One push connection to one node.
pub(crate) struct PushConn {
    shared: Arc<ConnShared>,
    frames: mpsc::UnboundedSender<ClientFrame>,
    next_sub_id: AtomicU64,
    /// `WatchPresence` was sent.
    watching: AtomicBool,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PushConn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An open subscription on a [`PushConn`]; dropping it unsubscribes.
pub(crate) struct PushSub {
    conn: Arc<PushConn>,
    sub_id: u64,
    pub(crate) events: mpsc::Receiver<SubEvent>,
}

impl Drop for PushSub {
    fn drop(&mut self) {
        if self.conn.shared.subs.lock().remove(&self.sub_id).is_some() {
            // The connection may be gone already; then there is nothing to stop.
            let _ = self.conn.frames.send(ClientFrame::Unsubscribe {
                sub_id: self.sub_id,
            });
        }
    }
}

impl PushConn {
    /// Asks the node for presence, once per connection.
    fn watch_presence(&self) {
        if !self.watching.swap(true, Ordering::AcqRel) {
            let _ = self.frames.send(ClientFrame::WatchPresence);
        }
    }

    /// Subscribes to `channel` after `after_seq` for the poll loop's `attempt`, handing batches
    /// out through `handout`; `None` if the connection has closed.
    pub(crate) fn subscribe(
        self: &Arc<Self>,
        channel: &str,
        after_seq: u64,
        read_token: u64,
        handout: &Arc<Handout>,
        attempt: u64,
    ) -> Option<PushSub> {
        let sub_id = self.next_sub_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(SUB_EVENTS_CAPACITY);
        {
            let mut subs = self.shared.subs.lock();
            if self.shared.closed.load(Ordering::Acquire) {
                return None;
            }
            let entry = SubEntry {
                handout: handout.clone(),
                attempt,
                events: tx,
            };
            subs.insert(sub_id, entry);
        }
        let frame = ClientFrame::Subscribe(Subscribe {
            sub_id,
            channel: channel.to_owned(),
            after_seq,
            read_token,
        });
        if self.frames.send(frame).is_err() {
            self.shared.subs.lock().remove(&sub_id);
            return None;
        }
        Some(PushSub {
            conn: self.clone(),
            sub_id,
            events: rx,
        })
    }
}

/// Connects to `node`, says hello, waits for the welcome and logs in as `identity`.
async fn dial(
    config: &ClientConfig,
    trust: &ClusterTrust,
    routes: &Arc<Routes>,
    identity: &Identity,
    node: u64,
    heard: Arc<Heard>,
) -> Result<PushConn, DialError> {
    let Some(addr) = routes.addr_of(node) else {
        return Err(DialError::Failed(Failure::Transport(format!(
            "node {node} unknown"
        ))));
    };
    let fail = |step: &str, e: &dyn std::fmt::Display| {
        DialError::Failed(Failure::Transport(format!("push {step} {addr}: {e}")))
    };
    let stream = proto::connect_tls(
        addr,
        trust.push.clone(),
        proto::tls::any_node(),
        config.connect_timeout,
    )
    .await
    .map_err(|e| fail("connect to", &e))?;
    trust.remember();
    let binding = proto::tls::stream_binding(&stream).map_err(|e| fail("connect to", &e))?;
    // One task reads and writes the connection, so it keeps the stream whole: a split stream
    // takes a lock on every read and write.
    // The read buffer starts small and grows to the largest batch: a process may hold many
    // clients, each connection keeps its buffer while open, and a frame is split off where
    // the last one ended, so the whole buffer is walked before it is reused.
    let mut frames = FramedRead::with_capacity(
        stream,
        push::frame_codec(proto::FRAME_BYTES_MAX),
        proto::READ_BUFFER_BYTES,
    );
    let hello = push::encode_frame(&ClientFrame::Hello(PushHello::new(
        config.cluster.clone(),
        None,
    )));
    let opening = [&push::PUSH_MAGIC[..], &hello[..]].concat();
    let write = frames.get_mut();
    write
        .write_all(&opening)
        .await
        .map_err(|e| fail("hello to", &e))?;
    write.flush().await.map_err(|e| fail("hello to", &e))?;
    let first = tokio::time::timeout(config.request_timeout, frames.next()).await;
    let welcome = match first.map_err(|_| fail("hello to", &"timed out"))? {
        // A node without push reads the magic as an oversized tarpc frame and hangs up.
        None => return Err(DialError::Unsupported),
        // Over TLS a hangup without close_notify reads as an unexpected EOF.
        Some(Err(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            return Err(DialError::Unsupported)
        }
        Some(Err(e)) => return Err(fail("hello to", &e)),
        Some(Ok(body)) => match push::decode_server_frame(&body) {
            Ok(ServerFrame::Welcome(welcome)) => welcome,
            Ok(ServerFrame::Error { error, .. }) => {
                return Err(DialError::Failed(Failure::Api(error)))
            }
            Ok(other) => return Err(fail("hello to", &format!("answered {other:?}"))),
            Err(e) => return Err(fail("hello to", &e)),
        },
    };
    if welcome.node_id != node {
        return Err(fail(
            "hello to",
            &format!("answered node {}", welcome.node_id),
        ));
    }
    // The node answers a refused login with an error frame and a close, which the
    // connection task reports; nothing to wait for here.
    let message = proto::login_message(
        &welcome.challenge,
        &binding,
        &config.cluster,
        identity.name(),
    );
    let login = push::encode_frame(&ClientFrame::Login(proto::Login {
        name: identity.name().to_owned(),
        public_key: identity.public_key(),
        signature: identity.sign(&message).to_vec(),
    }));
    let write = frames.get_mut();
    let sent = async {
        write.write_all(&login).await?;
        write.flush().await
    };
    sent.await.map_err(|e| fail("login to", &e))?;
    let silence = Duration::from_millis(welcome.heartbeat_ms.max(1) * 3)
        .max(Duration::from_millis(push::SILENCE_MS_MAX));
    let shared = Arc::new(ConnShared::default());
    let (frames_tx, frames_rx) = mpsc::unbounded_channel();
    let io = (frames, frames_rx);
    let task = tokio::spawn(run(
        shared.clone(),
        heard,
        routes.clone(),
        node,
        io,
        silence,
    ));
    Ok(PushConn {
        shared,
        frames: frames_tx,
        next_sub_id: AtomicU64::new(1),
        watching: AtomicBool::new(false),
        task,
    })
}

type Frames = FramedRead<TlsTcp, tarpc::tokio_util::codec::LengthDelimitedCodec>;

/// The connection task: writes client frames, routes server frames, ends on any failure.
async fn run(
    shared: Arc<ConnShared>,
    ephemeral: Arc<Heard>,
    routes: Arc<Routes>,
    node: u64,
    (mut frames, mut outgoing): (Frames, mpsc::UnboundedReceiver<ClientFrame>),
    silence: Duration,
) {
    let beat = Duration::from_millis(push::CLIENT_HEARTBEAT_MS);
    let (mut heard, mut wrote) = (tokio::time::Instant::now(), tokio::time::Instant::now());
    // One timer for each deadline for the connection's whole life: a frame only moves `heard`
    // or `wrote`, and a timer that fires early is set again to the moved deadline. A timer
    // made per frame costs a registration in tokio's timer wheel and its removal for every
    // message delivered.
    let silent = tokio::time::sleep_until(heard + silence);
    let beating = tokio::time::sleep_until(wrote + beat);
    tokio::pin!(silent, beating);
    let reason = loop {
        let frame = tokio::select! {
            frame = outgoing.recv() => {
                let Some(frame) = frame else { break "client gone".to_owned() };
                frame
            }
            () = &mut beating => {
                if wrote + beat > tokio::time::Instant::now() {
                    beating.as_mut().reset(wrote + beat);
                    continue;
                }
                ClientFrame::Heartbeat
            }
            () = &mut silent => {
                if heard + silence > tokio::time::Instant::now() {
                    silent.as_mut().reset(heard + silence);
                    continue;
                }
                break format!("no frame for {} ms", silence.as_millis());
            }
            read = frames.next() => {
                let body = match read {
                    None => break "closed by the node".to_owned(),
                    Some(Err(e)) => break format!("read: {e}"),
                    Some(Ok(body)) => body,
                };
                match push::decode_server_frame(&body) {
                    Ok(ServerFrame::Batch { sub_id, batch }) => {
                        // Handed out under the map's lock, so a subscription that was dropped
                        // (and maybe moved to another node) gets nothing more from here.
                        let waiting = {
                            let subs = shared.subs.lock();
                            subs.get(&sub_id).and_then(|sub| {
                                let rest = sub.handout.offer(node, sub.attempt, batch)?;
                                Some((sub.events.clone(), rest))
                            })
                        };
                        if let Some((tx, rest)) = waiting {
                            // A closed receiver is a subscription ending; its unsubscribe is
                            // on its way.
                            let _ = tx.send(Ok(rest)).await;
                        }
                    }
                    Ok(ServerFrame::Error { sub_id: Some(sub_id), error }) => {
                        let sub = shared.subs.lock().remove(&sub_id);
                        if let Some(sub) = sub {
                            let _ = sub.events.send(Err(error)).await;
                        }
                    }
                    Ok(ServerFrame::Error { sub_id: None, error }) => {
                        break format!("node closed the connection: {error}");
                    }
                    Ok(ServerFrame::Heartbeat { .. }) => {}
                    Ok(ServerFrame::Typing { channel, user }) => {
                        ephemeral.hear(Ephemeral::Typing { channel, user });
                    }
                    Ok(ServerFrame::Presence { online, offline, full }) => {
                        ephemeral.hear(Ephemeral::Presence { online, offline, full });
                    }
                    Ok(ServerFrame::Marker { channel, read_to }) => {
                        ephemeral.hear(Ephemeral::Marker { channel, read_to });
                    }
                    Ok(ServerFrame::Added { channel, applied }) => {
                        // The listener's next read may go to a node behind this one.
                        routes.observe(applied);
                        ephemeral.hear(Ephemeral::Added { channel });
                    }
                    Ok(ServerFrame::Welcome(_)) => break "second welcome".to_owned(),
                    Err(e) => break format!("bad frame: {e}"),
                }
                // Time spent handing a batch to a slow subscriber is not the node's silence.
                heard = tokio::time::Instant::now();
                continue;
            }
        };
        let frame = push::encode_frame(&frame);
        let write = frames.get_mut();
        if let Err(e) = async {
            write.write_all(&frame).await?;
            write.flush().await
        }
        .await
        {
            break format!("write: {e}");
        }
        wrote = tokio::time::Instant::now();
        beating.as_mut().reset(wrote + beat);
    };
    tracing::debug!(node, %reason, "push connection ended");
    let mut subs = shared.subs.lock();
    shared.closed.store(true, Ordering::Release);
    // Dropping the senders tells every subscription the connection is gone.
    subs.clear();
}
