//! Presence and typing: state that lives only in memory, never in the Raft log.
//!
//! A user is online on a node while at least one logged-in push connection of theirs is open
//! there. Each node tells its peers its own online users every [`GOSSIP_EVERY`], and at once
//! when that set changes; a peer that has not been heard from for [`PEER_EXPIRY`] counts as
//! having nobody online, so a node that dies takes its users offline with it. Everyone online
//! in the cluster is the union of the node's own set and its peers' latest sets.
//!
//! A typing note from a client goes to the push connections on this node at once, and to every
//! peer with the next news (sent as soon as it is queued). Nothing here is durable or
//! replicated through Raft: a restart forgets it all, and clients rebuild it within a gossip
//! period.
//!
//! Presence changes go to every connection ([`Ephemeral::subscribe`], as differences of the
//! union). Typing notes and read markers go only to the connections they concern, each on its
//! own channel ([`Ephemeral::connected`]): a typing note to those subscribed to its channel,
//! a marker to its user's. A broadcast would wake every connection for each of them.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use proto::push::{self, ServerFrame};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, Notify};

use crate::types::NodeId;

/// A node sends its online users to its peers at least this often.
pub const GOSSIP_EVERY: Duration = Duration::from_secs(2);

/// A peer not heard from for this long (three gossip periods) has nobody online.
pub const PEER_EXPIRY: Duration = Duration::from_secs(6);

/// Typing notes waiting for the next news to the peers; more are dropped (they are ephemeral,
/// and a typing user sends another within seconds).
const TYPING_QUEUE_MAX: usize = 4_096;

/// Events buffered per connection; a connection that falls further behind gets the whole
/// online list again instead of the changes it missed, and misses typing notes.
const EVENTS_CAPACITY: usize = 1_024;

/// Most names taken from one peer's news (a sanity bound; peers are authenticated nodes).
const PEER_ONLINE_MAX: usize = 1 << 20;

/// Presence changes within this long of the first one go out as one frame to each watcher.
pub const PRESENCE_BATCH: Duration = Duration::from_millis(100);

/// Frames waiting for one connection on its own channel (its user's markers); more are
/// dropped, and the client's periodic read-back of its markers catches up.
const DIRECT_CAPACITY: usize = 256;

/// `user` types in `channel`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypingNote {
    /// The channel typed in.
    pub channel: String,
    /// Who types.
    pub user: String,
}

/// What one node tells another (the `RaftRpc::ephemeral` call).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EphemeralNews {
    /// Random per run of the sender, so a restarted node's counter starts over cleanly.
    pub epoch: u64,
    /// Counts the sender's news within its epoch; calls may arrive out of order, and an older
    /// online list must not replace a newer one.
    pub version: u64,
    /// Every user online on the sender (the whole list, not a change).
    pub online: Vec<String>,
    /// Typing notes since the previous news.
    pub typing: Vec<TypingNote>,
}

/// What every push connection hears, with its frame encoded once for all of them.
#[derive(Debug, Clone)]
pub enum Event {
    /// Who came online and who went offline in the cluster: `ServerFrame::Presence` of the
    /// change (not `full`).
    Presence {
        /// The encoded frame.
        frame: Bytes,
    },
}

/// What one push connection hears on its own channel: routed by user or by channel, so a
/// note wakes only the connections it concerns.
#[derive(Debug, Clone)]
pub enum Direct {
    /// For watchers of presence only: this user's read marker moved (`ServerFrame::Marker`),
    /// or someone added them to a channel (`ServerFrame::Added`).
    Marker(Bytes),
    /// Someone else types in `channel`, which this connection listens to:
    /// `ServerFrame::Typing`. The connection checks its subscription there still stands.
    Typing {
        /// The channel.
        channel: Arc<str>,
        /// The encoded frame.
        frame: Bytes,
    },
}

/// One logged-in push connection on this node.
struct Conn {
    user: String,
    tx: mpsc::Sender<Direct>,
    /// The channels it subscribes to, with how many subscriptions each.
    channels: HashMap<String, usize>,
}

struct PeerView {
    users: BTreeSet<String>,
    epoch: u64,
    version: u64,
    heard: Instant,
}

#[derive(Default)]
struct State {
    /// Users with a connection here, and their connections' ids.
    local: HashMap<String, BTreeSet<u64>>,
    /// Every logged-in connection here, by id.
    conns: HashMap<u64, Conn>,
    /// The connections subscribed to each channel.
    listening: HashMap<String, BTreeSet<u64>>,
    /// The next connection id.
    next_conn: u64,
    /// Each peer's latest online list.
    peers: HashMap<NodeId, PeerView>,
    /// The union as last published in an [`Event::Presence`].
    online: BTreeSet<String>,
    /// Typing notes for the next news.
    typing_out: Vec<TypingNote>,
    /// The local set changed since the last news.
    local_changed: bool,
    /// Counter of the news this node sent.
    version: u64,
}

/// The node's presence and typing hub. Cheap to clone.
#[derive(Clone)]
pub struct Ephemeral {
    inner: Arc<Inner>,
}

struct Inner {
    epoch: u64,
    state: Mutex<State>,
    events: broadcast::Sender<Event>,
    /// Wakes the gossip loop: news to send now.
    wake: Notify,
    /// The metrics this hub keeps current, once the node has them.
    counts: std::sync::OnceLock<(Gauge, Counter)>,
    /// Wakes [`Ephemeral::run_presence`]: someone came or went.
    presence_due: Notify,
}

/// Keeps a user online on this node while it lives (one per logged-in push connection).
pub struct Online {
    hub: Ephemeral,
    user: String,
    conn: u64,
}

/// Keeps a connection listening to a channel's typing while it lives (one per subscription).
pub struct Listening {
    hub: Ephemeral,
    conn: u64,
    channel: String,
}

impl Drop for Listening {
    fn drop(&mut self) {
        unlisten(&self.hub, self.conn, &self.channel);
    }
}

impl Online {
    /// [`Online::listen`] to `channel` until the guard drops.
    pub fn listening(&self, channel: &str) -> Listening {
        self.listen(channel);
        Listening {
            hub: self.hub.clone(),
            conn: self.conn,
            channel: channel.to_owned(),
        }
    }

    /// The connection subscribed to `channel`: typing there reaches it.
    pub fn listen(&self, channel: &str) {
        let mut state = self.hub.inner.state.lock();
        let Some(conn) = state.conns.get_mut(&self.conn) else {
            return;
        };
        *conn.channels.entry(channel.to_owned()).or_insert(0) += 1;
        let listeners = state.listening.entry(channel.to_owned()).or_default();
        listeners.insert(self.conn);
    }

    /// One subscription of the connection to `channel` ended.
    pub fn unlisten(&self, channel: &str) {
        unlisten(&self.hub, self.conn, channel);
    }
}

fn unlisten(hub: &Ephemeral, id: u64, channel: &str) {
    let mut state = hub.inner.state.lock();
    let Some(conn) = state.conns.get_mut(&id) else {
        return;
    };
    let Some(count) = conn.channels.get_mut(channel) else {
        return;
    };
    *count -= 1;
    if *count == 0 {
        conn.channels.remove(channel);
        if let Some(listeners) = state.listening.get_mut(channel) {
            listeners.remove(&id);
            if listeners.is_empty() {
                state.listening.remove(channel);
            }
        }
    }
}

impl Drop for Online {
    fn drop(&mut self) {
        let mut state = self.hub.inner.state.lock();
        if let Some(conn) = state.conns.remove(&self.conn) {
            for channel in conn.channels.keys() {
                if let Some(listeners) = state.listening.get_mut(channel) {
                    listeners.remove(&self.conn);
                    if listeners.is_empty() {
                        state.listening.remove(channel);
                    }
                }
            }
        }
        let gone = match state.local.get_mut(&self.user) {
            Some(conns) => {
                conns.remove(&self.conn);
                conns.is_empty()
            }
            None => false,
        };
        if gone {
            state.local.remove(&self.user);
            state.local_changed = true;
            self.hub.presence_changed();
            drop(state);
            self.hub.inner.wake.notify_one();
        }
    }
}

impl Default for Ephemeral {
    fn default() -> Self {
        Self::new()
    }
}

impl Ephemeral {
    /// An empty hub.
    pub fn new() -> Self {
        Ephemeral {
            inner: Arc::new(Inner {
                epoch: rand::random(),
                state: Mutex::default(),
                events: broadcast::channel(EVENTS_CAPACITY).0,
                wake: Notify::new(),
                counts: std::sync::OnceLock::new(),
                presence_due: Notify::new(),
            }),
        }
    }

    /// Keeps `online` at the number of users online and counts passed typing notes in
    /// `typing` from now on (the first call wins).
    pub fn count_into(&self, online: Gauge, typing: Counter) {
        online.set(self.inner.state.lock().online.len() as i64);
        let _ = self.inner.counts.set((online, typing));
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Everyone online in the cluster as this node knows it, sorted.
    pub fn online(&self) -> Vec<String> {
        self.inner.state.lock().online.iter().cloned().collect()
    }

    /// `ServerFrame::Presence` of everyone online, `full`: what a connection that starts
    /// watching gets first. Changes waiting for their batch are published first, so the list
    /// is current (it holds the watcher itself) and the changes that follow it are newer.
    pub fn full_frame(&self) -> Bytes {
        let mut state = self.inner.state.lock();
        self.publish(&mut state);
        push::encode_frame(&ServerFrame::Presence {
            online: state.online.iter().cloned().collect(),
            offline: Vec::new(),
            full: true,
        })
    }

    /// `user` has a new logged-in connection here; online until the guard drops. The
    /// receiver gets what concerns this connection alone: its user's read markers, and
    /// typing in the channels it listens to ([`Online::listen`]).
    pub fn connected(&self, user: &str) -> (Online, mpsc::Receiver<Direct>) {
        let (tx, rx) = mpsc::channel(DIRECT_CAPACITY);
        let mut state = self.inner.state.lock();
        let conn = state.next_conn;
        state.next_conn += 1;
        let entry = Conn {
            user: user.to_owned(),
            tx,
            channels: HashMap::new(),
        };
        state.conns.insert(conn, entry);
        let conns = state.local.entry(user.to_owned()).or_default();
        conns.insert(conn);
        if conns.len() == 1 {
            state.local_changed = true;
            self.presence_changed();
            drop(state);
            self.inner.wake.notify_one();
        }
        let online = Online {
            hub: self.clone(),
            user: user.to_owned(),
            conn,
        };
        (online, rx)
    }

    /// A local client's typing note: to this node's connections now, to the peers next.
    pub fn typing(&self, note: TypingNote) {
        let mut state = self.inner.state.lock();
        if state.typing_out.len() >= TYPING_QUEUE_MAX {
            return;
        }
        deliver_typing(&state, &note);
        state.typing_out.push(note);
        if let Some((_, typing)) = self.inner.counts.get() {
            typing.inc();
        }
        drop(state);
        self.inner.wake.notify_one();
    }

    /// Read markers this node applied, as (user, channel, marker): to those users'
    /// connections here. Every node applies every marker, so this needs no news. Cheap
    /// enough for the apply thread: a frame is encoded only for a user connected here, and a
    /// full connection channel drops it rather than wait.
    pub fn markers_moved(&self, markers: &[(String, String, chat_sm::ChannelSeq)]) {
        if markers.is_empty() {
            return;
        }
        let state = self.inner.state.lock();
        for (user, channel, seq) in markers {
            let Some(ids) = state.local.get(user) else {
                continue;
            };
            let frame = push::encode_frame(&ServerFrame::Marker {
                channel: channel.clone(),
                read_to: seq.0,
            });
            for conn in ids.iter().filter_map(|id| state.conns.get(id)) {
                let _ = conn.tx.try_send(Direct::Marker(frame.clone()));
            }
        }
    }

    /// Users added to channels by someone else, as (user, channel), by the entries applied up
    /// to log index `applied`: an `Added` frame to those users' connections here, like
    /// [`markers_moved`](Self::markers_moved).
    pub fn channels_added(&self, added: &[(String, String)], applied: u64) {
        if added.is_empty() {
            return;
        }
        let state = self.inner.state.lock();
        for (user, channel) in added {
            let Some(ids) = state.local.get(user) else {
                continue;
            };
            let frame = push::encode_frame(&ServerFrame::Added {
                channel: channel.clone(),
                applied,
            });
            for conn in ids.iter().filter_map(|id| state.conns.get(id)) {
                let _ = conn.tx.try_send(Direct::Marker(frame.clone()));
            }
        }
    }

    /// News from peer `from` (authenticated by the caller).
    pub fn heard_from(&self, from: NodeId, news: EphemeralNews, now: Instant) {
        let mut state = self.inner.state.lock();
        for note in news.typing.iter().take(TYPING_QUEUE_MAX) {
            deliver_typing(&state, note);
        }
        let newer = match state.peers.get(&from) {
            Some(view) => view.epoch != news.epoch || news.version > view.version,
            None => true,
        };
        if !newer {
            return;
        }
        let users = news.online.into_iter().take(PEER_ONLINE_MAX).collect();
        let view = PeerView {
            users,
            epoch: news.epoch,
            version: news.version,
            heard: now,
        };
        state.peers.insert(from, view);
        self.presence_changed();
    }

    /// Forgets the peers not heard from within [`PEER_EXPIRY`] before `now`.
    pub fn expire(&self, now: Instant) {
        let mut state = self.inner.state.lock();
        let before = state.peers.len();
        state
            .peers
            .retain(|_, view| now.saturating_duration_since(view.heard) < PEER_EXPIRY);
        if state.peers.len() != before {
            self.presence_changed();
        }
    }

    /// Waits until there is news for the peers or `deadline` passes, then takes it: the local
    /// online list and the queued typing notes. `None` when nothing changed and the deadline
    /// has not passed (a spurious wake).
    pub async fn next_news(&self, deadline: tokio::time::Instant) -> Option<EphemeralNews> {
        let woken = tokio::select! {
            () = self.inner.wake.notified() => true,
            () = tokio::time::sleep_until(deadline) => false,
        };
        let mut state = self.inner.state.lock();
        if woken && !state.local_changed && state.typing_out.is_empty() {
            return None;
        }
        state.local_changed = false;
        state.version += 1;
        let mut online: Vec<String> = state.local.keys().cloned().collect();
        online.sort_unstable();
        Some(EphemeralNews {
            epoch: self.inner.epoch,
            version: state.version,
            online,
            typing: std::mem::take(&mut state.typing_out),
        })
    }

    /// Someone came or went, here or on a peer: publish within [`PRESENCE_BATCH`].
    fn presence_changed(&self) {
        self.inner.presence_due.notify_one();
    }

    /// Publishes presence changes, each batch [`PRESENCE_BATCH`] after its first change, until
    /// aborted. Batched because a thousand clients reconnecting after a failover would
    /// otherwise each cost a frame to every watching connection and a recount of the union.
    pub async fn run_presence(self) {
        loop {
            self.inner.presence_due.notified().await;
            tokio::time::sleep(PRESENCE_BATCH).await;
            self.flush_presence();
        }
    }

    /// Recomputes the union now and sends what changed as an [`Event::Presence`].
    pub fn flush_presence(&self) {
        let mut state = self.inner.state.lock();
        self.publish(&mut state);
    }

    fn publish(&self, state: &mut State) {
        let mut union: BTreeSet<String> = state.local.keys().cloned().collect();
        for view in state.peers.values() {
            union.extend(view.users.iter().cloned());
        }
        let online: Vec<String> = union.difference(&state.online).cloned().collect();
        let offline: Vec<String> = state.online.difference(&union).cloned().collect();
        if online.is_empty() && offline.is_empty() {
            return;
        }
        state.online = union;
        if let Some((online, _)) = self.inner.counts.get() {
            online.set(state.online.len() as i64);
        }
        let frame = push::encode_frame(&ServerFrame::Presence {
            online,
            offline,
            full: false,
        });
        let _ = self.inner.events.send(Event::Presence { frame });
    }
}

/// `note` to the connections here that listen to its channel, but not to its user's own. A
/// connection that is not keeping up misses it.
fn deliver_typing(state: &State, note: &TypingNote) {
    let Some(listeners) = state.listening.get(&note.channel) else {
        return;
    };
    let mut frame = None;
    for conn in listeners.iter().filter_map(|id| state.conns.get(id)) {
        if conn.user == note.user {
            continue;
        }
        let frame = frame.get_or_insert_with(|| {
            push::encode_frame(&ServerFrame::Typing {
                channel: note.channel.clone(),
                user: note.user.clone(),
            })
        });
        let _ = conn.tx.try_send(Direct::Typing {
            channel: Arc::from(note.channel.as_str()),
            frame: frame.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn news(epoch: u64, version: u64, online: &[&str]) -> EphemeralNews {
        EphemeralNews {
            epoch,
            version,
            online: online.iter().map(|s| s.to_string()).collect(),
            typing: Vec::new(),
        }
    }

    fn presence(event: Event) -> (Vec<String>, Vec<String>) {
        let Event::Presence { frame } = event;
        match push::decode_server_frame(&frame[push::LENGTH_BYTES..]) {
            Ok(ServerFrame::Presence {
                online,
                offline,
                full: false,
            }) => (online, offline),
            other => panic!("expected a presence change, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_user_is_online_while_any_of_their_connections_is_open() {
        let hub = Ephemeral::new();
        let mut events = hub.subscribe();
        let (first, _) = hub.connected("alice");
        let (second, _) = hub.connected("alice");
        hub.flush_presence();
        assert_eq!(
            presence(events.try_recv().unwrap()),
            (vec!["alice".into()], vec![])
        );
        drop(first);
        hub.flush_presence();
        assert!(events.try_recv().is_err(), "still one connection");
        assert_eq!(hub.online(), vec!["alice".to_string()]);
        drop(second);
        hub.flush_presence();
        assert_eq!(
            presence(events.try_recv().unwrap()),
            (vec![], vec!["alice".into()])
        );
        assert!(hub.online().is_empty());
    }

    #[tokio::test]
    async fn peers_add_their_users_until_they_fall_silent() {
        let hub = Ephemeral::new();
        let _alice = hub.connected("alice");
        hub.flush_presence();
        let mut events = hub.subscribe();
        let t0 = Instant::now();
        hub.heard_from(2, news(7, 1, &["alice", "bob"]), t0);
        hub.flush_presence();
        assert_eq!(
            presence(events.try_recv().unwrap()),
            (vec!["bob".into()], vec![])
        );
        // An older list that arrives late changes nothing.
        hub.heard_from(2, news(7, 0, &[]), t0);
        hub.flush_presence();
        assert_eq!(hub.online(), vec!["alice".to_string(), "bob".to_string()]);
        // A restarted peer (new epoch) starts its counter over.
        hub.heard_from(2, news(8, 0, &["carol"]), t0);
        hub.flush_presence();
        assert_eq!(
            presence(events.try_recv().unwrap()),
            (vec!["carol".into()], vec!["bob".into()])
        );
        hub.expire(t0 + PEER_EXPIRY - Duration::from_millis(1));
        hub.flush_presence();
        assert!(events.try_recv().is_err());
        hub.expire(t0 + PEER_EXPIRY);
        hub.flush_presence();
        assert_eq!(
            presence(events.try_recv().unwrap()),
            (vec![], vec!["carol".into()])
        );
        assert_eq!(hub.online(), vec!["alice".to_string()]);
    }

    #[tokio::test]
    async fn news_carries_the_local_list_and_the_typing_queued_since_the_last() {
        let hub = Ephemeral::new();
        let (bob, mut bob_rx) = hub.connected("bob");
        bob.listen("general");
        let (carol, mut carol_rx) = hub.connected("carol");
        carol.listen("general");
        let (dave, mut dave_rx) = hub.connected("dave");
        dave.listen("ops");
        let note = TypingNote {
            channel: "general".into(),
            user: "bob".into(),
        };
        hub.typing(note.clone());
        assert!(
            matches!(carol_rx.try_recv(), Ok(Direct::Typing { channel, .. }) if &*channel == "general")
        );
        assert!(bob_rx.try_recv().is_err(), "not to the one who types");
        assert!(dave_rx.try_recv().is_err(), "not to another channel");
        carol.unlisten("general");
        hub.typing(note.clone());
        assert!(
            carol_rx.try_recv().is_err(),
            "not after the subscription ended"
        );
        let soon = tokio::time::Instant::now() + Duration::from_secs(5);
        let first = hub.next_news(soon).await.expect("news");
        assert_eq!(first.online, vec!["bob", "carol", "dave"]);
        assert_eq!(first.typing, vec![note.clone(), note]);
        // Nothing new: the next news comes at the deadline, with the list and no typing.
        let now = tokio::time::Instant::now() + Duration::from_millis(20);
        let second = hub.next_news(now).await.expect("periodic news");
        assert!(second.typing.is_empty());
        assert!(second.version > first.version);
    }

    #[tokio::test]
    async fn the_metrics_follow_who_is_online_and_count_typing() {
        let hub = Ephemeral::new();
        let (online, typing) = (Gauge::default(), Counter::default());
        let _alice = hub.connected("alice");
        hub.flush_presence();
        hub.count_into(online.clone(), typing.clone());
        assert_eq!(online.get(), 1);
        hub.heard_from(2, news(1, 1, &["bob", "carol"]), Instant::now());
        hub.flush_presence();
        assert_eq!(online.get(), 3);
        hub.typing(TypingNote {
            channel: "general".into(),
            user: "alice".into(),
        });
        assert_eq!(typing.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn changes_close_together_go_out_as_one_frame() {
        let hub = Ephemeral::new();
        let mut events = hub.subscribe();
        tokio::spawn(hub.clone().run_presence());
        let guards: Vec<_> = ["a", "b", "c"].iter().map(|u| hub.connected(u)).collect();
        tokio::time::sleep(PRESENCE_BATCH * 2).await;
        assert_eq!(
            presence(events.try_recv().unwrap()),
            (vec!["a".into(), "b".into(), "c".into()], vec![])
        );
        assert!(events.try_recv().is_err(), "one frame for three changes");
        drop(guards);
        tokio::time::sleep(PRESENCE_BATCH * 2).await;
        let (_, gone) = presence(events.try_recv().unwrap());
        assert_eq!(gone.len(), 3);
    }

    /// The frame a connection was sent for its user alone (a marker or an added channel).
    fn user_frame(rx: &mut mpsc::Receiver<Direct>) -> ServerFrame {
        let Ok(Direct::Marker(frame)) = rx.try_recv() else {
            panic!("a frame for the user");
        };
        push::decode_server_frame(&frame[push::LENGTH_BYTES..]).expect("a frame that decodes")
    }

    #[tokio::test]
    async fn a_moved_marker_goes_to_its_users_connections_only() {
        let hub = Ephemeral::new();
        let (_bob, mut bob) = hub.connected("bob");
        let (_bob2, mut bob2) = hub.connected("bob");
        let (_carol, mut carol) = hub.connected("carol");
        let moved = [("bob".to_owned(), "ops".to_owned(), chat_sm::ChannelSeq(7))];
        hub.markers_moved(&moved);
        for rx in [&mut bob, &mut bob2] {
            assert_eq!(
                user_frame(rx),
                ServerFrame::Marker {
                    channel: "ops".into(),
                    read_to: 7
                }
            );
        }
        assert!(carol.try_recv().is_err(), "not carol's marker");
    }

    #[tokio::test]
    async fn an_added_channel_reaches_its_user_with_the_index_that_added_it() {
        let hub = Ephemeral::new();
        let (_bob, mut bob) = hub.connected("bob");
        let (_carol, mut carol) = hub.connected("carol");
        hub.channels_added(&[("bob".to_owned(), "dm-x".to_owned())], 41);
        assert_eq!(
            user_frame(&mut bob),
            ServerFrame::Added {
                channel: "dm-x".into(),
                applied: 41
            }
        );
        assert!(carol.try_recv().is_err(), "not added to carol");
    }

    #[tokio::test]
    async fn typing_from_a_peer_reaches_local_connections() {
        let hub = Ephemeral::new();
        let (bob, mut bob_rx) = hub.connected("bob");
        bob.listen("ops");
        let mut from = news(1, 1, &[]);
        from.typing.push(TypingNote {
            channel: "ops".into(),
            user: "carol".into(),
        });
        hub.heard_from(3, from, Instant::now());
        assert!(matches!(bob_rx.try_recv(), Ok(Direct::Typing { .. })));
    }
}
