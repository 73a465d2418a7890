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
//! Connections learn of both through [`Ephemeral::subscribe`]: typing notes as they come,
//! presence as differences of the union.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use proto::push::{self, ServerFrame};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, Notify};

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

/// What a push connection hears, each with its push frame encoded once for every connection.
#[derive(Debug, Clone)]
pub enum Event {
    /// Someone types somewhere (the connection passes it on if it subscribes to the channel
    /// and is not that user's).
    Typing {
        /// Who types where.
        note: Arc<TypingNote>,
        /// `ServerFrame::Typing` of it.
        frame: Bytes,
    },
    /// Who came online and who went offline in the cluster: `ServerFrame::Presence` of the
    /// change (not `full`).
    Presence {
        /// The encoded frame.
        frame: Bytes,
    },
}

impl Event {
    fn typing(note: TypingNote) -> Event {
        let frame = push::encode_frame(&ServerFrame::Typing {
            channel: note.channel.clone(),
            user: note.user.clone(),
        });
        Event::Typing {
            note: Arc::new(note),
            frame,
        }
    }
}

struct PeerView {
    users: BTreeSet<String>,
    epoch: u64,
    version: u64,
    heard: Instant,
}

#[derive(Default)]
struct State {
    /// Users with a connection here, and how many.
    local: HashMap<String, usize>,
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
}

/// Keeps a user online on this node while it lives (one per logged-in push connection).
pub struct Online {
    hub: Ephemeral,
    user: String,
}

impl Drop for Online {
    fn drop(&mut self) {
        let mut state = self.hub.inner.state.lock();
        let gone = match state.local.get_mut(&self.user) {
            Some(count) if *count > 1 => {
                *count -= 1;
                false
            }
            Some(_) => true,
            None => false,
        };
        if gone {
            state.local.remove(&self.user);
            state.local_changed = true;
            self.hub.publish(&mut state);
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
            }),
        }
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
    /// watching gets first.
    pub fn full_frame(&self) -> Bytes {
        push::encode_frame(&ServerFrame::Presence {
            online: self.online(),
            offline: Vec::new(),
            full: true,
        })
    }

    /// `user` has a new logged-in connection here; online until the guard drops.
    pub fn connected(&self, user: &str) -> Online {
        let mut state = self.inner.state.lock();
        let count = state.local.entry(user.to_owned()).or_insert(0);
        *count += 1;
        if *count == 1 {
            state.local_changed = true;
            self.publish(&mut state);
            drop(state);
            self.inner.wake.notify_one();
        }
        Online {
            hub: self.clone(),
            user: user.to_owned(),
        }
    }

    /// A local client's typing note: to this node's connections now, to the peers next.
    pub fn typing(&self, note: TypingNote) {
        {
            let mut state = self.inner.state.lock();
            if state.typing_out.len() >= TYPING_QUEUE_MAX {
                return;
            }
            state.typing_out.push(note.clone());
        }
        // No receiver is not an error: nobody is connected here.
        let _ = self.inner.events.send(Event::typing(note));
        self.inner.wake.notify_one();
    }

    /// News from peer `from` (authenticated by the caller).
    pub fn heard_from(&self, from: NodeId, news: EphemeralNews, now: Instant) {
        for note in news.typing.into_iter().take(TYPING_QUEUE_MAX) {
            let _ = self.inner.events.send(Event::typing(note));
        }
        let mut state = self.inner.state.lock();
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
        self.publish(&mut state);
    }

    /// Forgets the peers not heard from within [`PEER_EXPIRY`] before `now`.
    pub fn expire(&self, now: Instant) {
        let mut state = self.inner.state.lock();
        let before = state.peers.len();
        state
            .peers
            .retain(|_, view| now.saturating_duration_since(view.heard) < PEER_EXPIRY);
        if state.peers.len() != before {
            self.publish(&mut state);
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

    /// Recomputes the union and sends what changed as an [`Event::Presence`].
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
        let frame = push::encode_frame(&ServerFrame::Presence {
            online,
            offline,
            full: false,
        });
        let _ = self.inner.events.send(Event::Presence { frame });
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
        let Event::Presence { frame } = event else {
            panic!("expected presence, got {event:?}");
        };
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
        let first = hub.connected("alice");
        let second = hub.connected("alice");
        assert_eq!(
            presence(events.try_recv().unwrap()),
            (vec!["alice".into()], vec![])
        );
        drop(first);
        assert!(events.try_recv().is_err(), "still one connection");
        assert_eq!(hub.online(), vec!["alice".to_string()]);
        drop(second);
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
        let mut events = hub.subscribe();
        let t0 = Instant::now();
        hub.heard_from(2, news(7, 1, &["alice", "bob"]), t0);
        assert_eq!(
            presence(events.try_recv().unwrap()),
            (vec!["bob".into()], vec![])
        );
        // An older list that arrives late changes nothing.
        hub.heard_from(2, news(7, 0, &[]), t0);
        assert_eq!(hub.online(), vec!["alice".to_string(), "bob".to_string()]);
        // A restarted peer (new epoch) starts its counter over.
        hub.heard_from(2, news(8, 0, &["carol"]), t0);
        assert_eq!(
            presence(events.try_recv().unwrap()),
            (vec!["carol".into()], vec!["bob".into()])
        );
        hub.expire(t0 + PEER_EXPIRY - Duration::from_millis(1));
        assert!(events.try_recv().is_err());
        hub.expire(t0 + PEER_EXPIRY);
        assert_eq!(
            presence(events.try_recv().unwrap()),
            (vec![], vec!["carol".into()])
        );
        assert_eq!(hub.online(), vec!["alice".to_string()]);
    }

    #[tokio::test]
    async fn news_carries_the_local_list_and_the_typing_queued_since_the_last() {
        let hub = Ephemeral::new();
        let mut events = hub.subscribe();
        let _bob = hub.connected("bob");
        let note = TypingNote {
            channel: "general".into(),
            user: "bob".into(),
        };
        hub.typing(note.clone());
        let _ = events.try_recv();
        assert!(matches!(events.try_recv(), Ok(Event::Typing { note: n, .. }) if *n == note));
        let soon = tokio::time::Instant::now() + Duration::from_secs(5);
        let first = hub.next_news(soon).await.expect("news");
        assert_eq!(first.online, vec!["bob".to_string()]);
        assert_eq!(first.typing, vec![note]);
        // Nothing new: the next news comes at the deadline, with the list and no typing.
        let now = tokio::time::Instant::now() + Duration::from_millis(20);
        let second = hub.next_news(now).await.expect("periodic news");
        assert!(second.typing.is_empty());
        assert!(second.version > first.version);
    }

    #[tokio::test]
    async fn typing_from_a_peer_reaches_local_connections() {
        let hub = Ephemeral::new();
        let mut events = hub.subscribe();
        let mut from = news(1, 1, &[]);
        from.typing.push(TypingNote {
            channel: "ops".into(),
            user: "carol".into(),
        });
        hub.heard_from(3, from, Instant::now());
        assert!(
            matches!(events.try_recv(), Ok(Event::Typing { note, .. }) if note.user == "carol")
        );
    }
}
