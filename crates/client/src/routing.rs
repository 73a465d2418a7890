//! The routing table: every known node with its address, smoothed RTT, role, applied index and
//! down mark; the leader and the reader; and the read token. [`Table`] decides (ranking,
//! leader hints, reader moves) without sockets or clocks; [`Routes`] shares it and sends the
//! events its changes produce.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use proto::discovery::NodeAnnounce;
use proto::{ClusterInfo, LeaderHint, Role};
use serde::Serialize;
use tokio::sync::{broadcast, watch};

/// How long a node that failed is passed over when choosing where to read or write.
const DOWN_COOLDOWN: Duration = Duration::from_secs(2);
/// A leader hint naming a node this long after we marked it down lifts the mark: live nodes
/// stop naming a dead leader within an election timeout, so one still named has been heard
/// from since, and our failure was ours (a connection broken by the election, say).
const HINT_OUTWEIGHS_DOWN_AFTER: Duration = Duration::from_millis(250);
/// Reads move to a faster node only when it saves at least this much RTT (and halves it), so
/// sub-millisecond noise on one host does not bounce streams between nodes.
const RERANK_GAIN_MS_MIN: f64 = 1.0;
/// Weight of a new RTT sample in the smoothed RTT.
const RTT_ALPHA: f64 = 0.3;
/// Capacity of the event channel; slow listeners miss the oldest events.
const EVENTS_CAPACITY: usize = 256;

/// Something the client did on its own that a user may want to know about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// A send was rate limited and waits `retry_after_ms` before its next attempt.
    RateLimited {
        /// The wait the node asked for.
        retry_after_ms: u64,
    },
    /// Reads moved to another node.
    ReaderChanged {
        /// The previous node, if any.
        from: Option<u64>,
        /// The new node.
        to: u64,
    },
    /// The client learned of a new leader.
    LeaderChanged {
        /// The leader's node id.
        leader: u64,
    },
}

/// One node as this client sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServerInfo {
    /// Node id.
    pub id: u64,
    /// The node's name (`server --name`); empty until its announcement was heard.
    pub name: String,
    /// Its Raft role as last seen.
    pub role: String,
    /// Address of its chat service.
    pub client_addr: SocketAddr,
    /// Smoothed round trip of its pings, in ms; `None` until measured or while down.
    pub rtt_ms: Option<f64>,
    /// Its applied log index as last seen.
    pub applied: u64,
    /// Whether this client reads from it.
    pub reading: bool,
    /// Whether this client believes it leads.
    pub leader: bool,
    /// Whether it failed recently and is passed over.
    pub down: bool,
}

/// A snapshot for a status line.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    /// The node reads go to.
    pub reading: Option<u64>,
    /// Its name, when its announcement was heard.
    pub reading_name: Option<String>,
    /// Its smoothed RTT in ms.
    pub reading_rtt_ms: Option<f64>,
    /// The leader, if known.
    pub leader: Option<u64>,
    /// The leader's name, when its announcement was heard.
    pub leader_name: Option<String>,
}

/// How a node's RTT is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probe {
    /// UDP pings to its ping socket: no connection needed.
    Udp,
    /// The RPC `ping`, for a node that has never answered UDP at this address; its connection
    /// is kept open for this.
    Tcp,
}

#[derive(Debug, Clone)]
struct NodeState {
    client_addr: SocketAddr,
    /// From the node's announcement; empty until one was heard.
    name: String,
    role: Role,
    applied: u64,
    rtt_ms: Option<f64>,
    down_until: Option<Instant>,
    /// How the last answered probe reached it; `None` until one was answered at this address.
    probed: Option<Probe>,
}

impl NodeState {
    fn new(client_addr: SocketAddr) -> Self {
        Self {
            client_addr,
            name: String::new(),
            role: Role::Unknown,
            applied: 0,
            rtt_ms: None,
            down_until: None,
            probed: None,
        }
    }

    fn is_down(&self, now: Instant) -> bool {
        self.down_until.is_some_and(|t| t > now)
    }
}

/// The nodes known to this client.
///
/// Invariants: `reading` and `leader`, when set, name nodes in `nodes`; nodes are never
/// removed, so once discovery found one, there is always a node to try.
#[derive(Debug, Default)]
pub(crate) struct Table {
    nodes: BTreeMap<u64, NodeState>,
    leader: Option<u64>,
    reading: Option<u64>,
    /// Events of changes made under the lock; [`Routes::update`] sends them after it.
    outbox: Vec<ClientEvent>,
    /// Whether a node was marked down or reads moved, so streams on the old node must look.
    rerouted: bool,
}

impl Table {
    /// Healthy nodes first, then by RTT (unmeasured last), then by id.
    fn ranked(&self, now: Instant) -> Vec<u64> {
        let mut ids: Vec<u64> = self.nodes.keys().copied().collect();
        let health = |id: &u64| (self.nodes[id].is_down(now), self.nodes[id].rtt_ms.is_none());
        let rtt = |id: &u64| self.nodes[id].rtt_ms.unwrap_or(0.0);
        ids.sort_by(|a, b| (health(a).cmp(&health(b))).then(rtt(a).total_cmp(&rtt(b))));
        ids
    }

    fn upsert(&mut self, id: u64, client_addr: SocketAddr) -> &mut NodeState {
        let node = self
            .nodes
            .entry(id)
            .or_insert_with(|| NodeState::new(client_addr));
        if node.client_addr != client_addr {
            // The node restarted on another port: old measurements are void.
            *node = NodeState::new(client_addr);
        }
        node
    }

    pub(crate) fn addr_of(&self, node: u64) -> Option<SocketAddr> {
        self.nodes.get(&node).map(|n| n.client_addr)
    }

    pub(crate) fn is_down(&self, node: u64, now: Instant) -> bool {
        self.nodes.get(&node).is_none_or(|n| n.is_down(now))
    }

    pub(crate) fn reader(&self) -> Option<u64> {
        self.reading
    }

    pub(crate) fn probed(&self, node: u64) -> Option<Probe> {
        self.nodes.get(&node).and_then(|n| n.probed)
    }

    /// Every node with its address and smoothed RTT, for a probe round.
    pub(crate) fn probe_targets(&self) -> Vec<(u64, SocketAddr, Option<f64>)> {
        self.nodes
            .iter()
            .map(|(&id, n)| (id, n.client_addr, n.rtt_ms))
            .collect()
    }

    pub(crate) fn set_leader(&mut self, leader: u64) {
        if self.leader.replace(leader) != Some(leader) {
            tracing::info!(leader, "leader changed");
            self.outbox.push(ClientEvent::LeaderChanged { leader });
        }
    }

    /// The cluster is electing: forget the old leader, so the next attempt asks a live node
    /// instead of redialing a dead one.
    pub(crate) fn forget_leader(&mut self) {
        self.leader = None;
    }

    /// Records the leader a node named. A hint naming a new leader comes from a live node that
    /// saw it win an election, which outweighs an earlier failure of ours, so its down mark is
    /// lifted; so is a mark at least [`HINT_OUTWEIGHS_DOWN_AFTER`] old.
    pub(crate) fn learn_hint(&mut self, hint: &LeaderHint, now: Instant) {
        let news = self.leader != Some(hint.id);
        let node = self.upsert(hint.id, hint.client_addr);
        // `down_until` is the mark's time plus DOWN_COOLDOWN.
        let old_mark = node.down_until.is_some_and(|until| {
            until.saturating_duration_since(now) + HINT_OUTWEIGHS_DOWN_AFTER <= DOWN_COOLDOWN
        });
        if news || old_mark {
            node.down_until = None;
        }
        self.set_leader(hint.id);
    }

    pub(crate) fn merge_announce(&mut self, announce: &NodeAnnounce) {
        let node = self.upsert(announce.node_id, announce.client_addr);
        node.name.clone_from(&announce.name);
        node.role = announce.role;
        node.applied = node.applied.max(announce.applied);
        if announce.role == Role::Leader {
            self.set_leader(announce.node_id);
        }
    }

    pub(crate) fn merge_cluster(&mut self, info: &ClusterInfo) {
        for member in &info.nodes {
            let node = self.upsert(member.id, member.client_addr);
            if member.role != Role::Unknown {
                node.role = member.role;
            }
            node.applied = node.applied.max(member.applied);
        }
        if let Some(leader) = info.leader.filter(|id| self.nodes.contains_key(id)) {
            self.set_leader(leader);
        }
    }

    /// Passes over `node` for [`DOWN_COOLDOWN`], forgetting its RTT; reads move off it.
    pub(crate) fn mark_down(&mut self, node: u64, now: Instant) {
        if let Some(state) = self.nodes.get_mut(&node) {
            state.down_until = Some(now + DOWN_COOLDOWN);
            state.rtt_ms = None;
        }
        if self.reading == Some(node) {
            self.reading = None;
        }
        self.rerouted = true;
    }

    /// Records an answered probe: smooths the RTT, lifts any down mark, learns role and applied.
    pub(crate) fn record_pong(&mut self, id: u64, rtt: Duration, pong: (Role, u64), probe: Probe) {
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        let sample = rtt.as_secs_f64() * 1000.0;
        node.rtt_ms = Some(
            node.rtt_ms
                .map_or(sample, |old| old + (sample - old) * RTT_ALPHA),
        );
        node.down_until = None;
        node.role = pong.0;
        node.applied = node.applied.max(pong.1);
        if probe == Probe::Tcp && node.probed.is_none() {
            tracing::info!(
                node = id,
                "node does not answer UDP pings; measuring it over TCP"
            );
        }
        node.probed = Some(probe);
        if pong.0 == Role::Leader {
            self.set_leader(id);
        }
    }

    /// The node to read from: the current reader if healthy, else the best-ranked node.
    pub(crate) fn pick_reader(&mut self, now: Instant) -> Option<u64> {
        if let Some(id) = self.reading.filter(|&id| !self.is_down(id, now)) {
            return Some(id);
        }
        let to = *self.ranked(now).first()?;
        let from = self.reading.replace(to);
        tracing::info!(?from, to, "reading from another node");
        self.outbox.push(ClientEvent::ReaderChanged { from, to });
        self.rerouted = true;
        Some(to)
    }

    /// Moves reads to a clearly faster node (less than half the current RTT), or picks one.
    pub(crate) fn rerank(&mut self, now: Instant) {
        let best = self.ranked(now).first().copied();
        if let (Some(current), Some(best)) = (self.reading, best) {
            let rtt = |id: u64| self.nodes.get(&id).and_then(|n| n.rtt_ms);
            let faster = matches!((rtt(current), rtt(best)),
                (Some(c), Some(b)) if b * 2.0 < c && c - b > RERANK_GAIN_MS_MIN);
            if current != best && (faster || self.is_down(current, now)) {
                self.reading = None;
            }
        }
        self.pick_reader(now);
    }

    /// Where sends go: the known leader if healthy, else the best-ranked node (which names the
    /// leader if it is not); with the leader as known.
    pub(crate) fn writer_target(&self, now: Instant) -> (Option<u64>, Option<u64>) {
        let target = (self.leader.filter(|&id| !self.is_down(id, now)))
            .or_else(|| self.ranked(now).first().copied());
        (self.leader, target)
    }

    /// The nodes whose connection must stay open to measure them.
    pub(crate) fn tcp_probed(&self) -> impl Iterator<Item = u64> + '_ {
        self.nodes
            .iter()
            .filter(|(_, n)| n.probed == Some(Probe::Tcp))
            .map(|(&id, _)| id)
    }

    pub(crate) fn servers(&self, now: Instant) -> Vec<ServerInfo> {
        let info = |(&id, n): (&u64, &NodeState)| ServerInfo {
            id,
            name: n.name.clone(),
            role: format!("{:?}", n.role).to_lowercase(),
            client_addr: n.client_addr,
            rtt_ms: n.rtt_ms,
            applied: n.applied,
            reading: self.reading == Some(id),
            leader: self.leader == Some(id),
            down: n.is_down(now),
        };
        self.nodes.iter().map(info).collect()
    }

    pub(crate) fn status(&self) -> Status {
        let node = |id: Option<u64>| id.and_then(|id| self.nodes.get(&id));
        let name_of = |id| {
            node(id)
                .map(|n| n.name.clone())
                .filter(|name| !name.is_empty())
        };
        Status {
            reading: self.reading,
            reading_name: name_of(self.reading),
            reading_rtt_ms: node(self.reading).and_then(|n| n.rtt_ms),
            leader: self.leader,
            leader_name: name_of(self.leader),
        }
    }
}

/// The routing table shared by a client's tasks, its events, and the read token.
///
/// Invariant: the read token only grows; every read passes it, so reads are monotonic and
/// include this client's acknowledged sends, whichever node answers.
pub(crate) struct Routes {
    table: Mutex<Table>,
    events: broadcast::Sender<ClientEvent>,
    /// Bumped whenever a node is marked down or reads move, so streams on the old node stop.
    route_tx: watch::Sender<u64>,
    read_token: AtomicU64,
}

impl Routes {
    pub(crate) fn new() -> Self {
        Self {
            table: Mutex::new(Table::default()),
            events: broadcast::channel(EVENTS_CAPACITY).0,
            route_tx: watch::channel(0).0,
            read_token: AtomicU64::new(0),
        }
    }

    /// Runs `change` on the table, then sends the events it produced (after the lock).
    pub(crate) fn update<R>(&self, change: impl FnOnce(&mut Table, Instant) -> R) -> R {
        let (out, events, rerouted) = {
            let mut table = self.table.lock();
            let out = change(&mut table, Instant::now());
            (
                out,
                std::mem::take(&mut table.outbox),
                std::mem::take(&mut table.rerouted),
            )
        };
        for event in events {
            self.emit(event);
        }
        if rerouted {
            self.route_tx.send_modify(|generation| *generation += 1);
        }
        out
    }

    /// Reads the table without changing it.
    pub(crate) fn view<R>(&self, read: impl FnOnce(&Table, Instant) -> R) -> R {
        read(&self.table.lock(), Instant::now())
    }

    pub(crate) fn emit(&self, event: ClientEvent) {
        // Nobody listening is fine: events are advisory.
        let _ = self.events.send(event);
    }

    pub(crate) fn events(&self) -> broadcast::Receiver<ClientEvent> {
        self.events.subscribe()
    }

    /// Changes whenever a node is marked down or reads move.
    pub(crate) fn reroutes(&self) -> watch::Receiver<u64> {
        self.route_tx.subscribe()
    }

    pub(crate) fn mark_down(&self, node: u64, reason: &str) {
        tracing::debug!(node, reason, "node marked down");
        self.update(|table, now| table.mark_down(node, now));
    }

    pub(crate) fn pick_reader(&self) -> Option<u64> {
        self.update(Table::pick_reader)
    }

    pub(crate) fn addr_of(&self, node: u64) -> Option<SocketAddr> {
        self.view(|table, _| table.addr_of(node))
    }

    pub(crate) fn token(&self) -> u64 {
        self.read_token.load(Ordering::Acquire)
    }

    pub(crate) fn observe(&self, token: u64) {
        self.read_token.fetch_max(token, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(port: u16, rtt: Option<f64>, down: bool) -> NodeState {
        let mut n = NodeState::new(([127, 0, 0, 1], port).into());
        n.rtt_ms = rtt;
        if down {
            n.down_until = Some(Instant::now() + Duration::from_secs(60));
        }
        n
    }

    fn hint(id: u64, port: u16) -> LeaderHint {
        LeaderHint {
            id,
            client_addr: ([127, 0, 0, 1], port).into(),
        }
    }

    #[test]
    fn ranking_puts_healthy_fast_nodes_first() {
        let mut table = Table::default();
        table.nodes.insert(1, node(1, Some(3.0), false));
        table.nodes.insert(2, node(2, Some(0.5), true));
        table.nodes.insert(3, node(3, None, false));
        table.nodes.insert(4, node(4, Some(0.7), false));
        assert_eq!(table.ranked(Instant::now()), vec![4, 1, 3, 2]);
    }

    #[test]
    fn a_hint_naming_a_new_leader_lifts_its_down_mark_but_a_repeated_one_does_not() {
        let mut table = Table::default();
        table.nodes.insert(1, node(9, None, true));
        table.nodes.insert(2, node(10, None, true));
        table.leader = Some(2);
        let now = Instant::now();
        // Node 2 is the recorded leader and was just marked down: a hint naming it again is
        // stale news (live nodes may not have noticed its death yet).
        table.nodes.get_mut(&2).expect("node 2").down_until = Some(now + DOWN_COOLDOWN);
        table.learn_hint(&hint(2, 10), now);
        assert!(table.nodes[&2].is_down(now));
        // Node 1 won an election a live node saw: try it even though it failed us before.
        table.learn_hint(&hint(1, 9), now);
        assert!(!table.nodes[&1].is_down(now));
        assert_eq!(table.outbox, vec![ClientEvent::LeaderChanged { leader: 1 }]);
    }

    #[test]
    fn a_hint_still_naming_a_leader_well_after_it_was_marked_down_lifts_the_mark() {
        let mut table = Table::default();
        table.nodes.insert(2, node(10, None, false));
        table.leader = Some(2);
        let marked = Instant::now();
        table.nodes.get_mut(&2).expect("node 2").down_until = Some(marked + DOWN_COOLDOWN);
        let soon = marked + HINT_OUTWEIGHS_DOWN_AFTER / 2;
        table.learn_hint(&hint(2, 10), soon);
        assert!(
            table.nodes[&2].is_down(soon),
            "too soon to doubt the failure"
        );
        let later = marked + HINT_OUTWEIGHS_DOWN_AFTER;
        table.learn_hint(&hint(2, 10), later);
        assert!(
            !table.nodes[&2].is_down(later),
            "live nodes still name it: it leads"
        );
    }

    #[test]
    fn a_restarted_node_loses_its_measurements() {
        let mut table = Table::default();
        table.nodes.insert(1, node(1, Some(1.0), false));
        table.upsert(1, ([127, 0, 0, 1], 9).into());
        assert_eq!(table.nodes[&1].rtt_ms, None);
        table.upsert(1, ([127, 0, 0, 1], 9).into()).rtt_ms = Some(2.0);
        table.upsert(1, ([127, 0, 0, 1], 9).into());
        assert_eq!(table.nodes[&1].rtt_ms, Some(2.0));
    }

    #[test]
    fn reads_move_only_to_a_clearly_faster_node_or_off_a_down_one() {
        let now = Instant::now();
        let mut table = Table::default();
        table.nodes.insert(1, node(1, Some(3.0), false));
        table.nodes.insert(2, node(2, Some(2.0), false));
        table.reading = Some(1);
        table.rerank(now);
        assert_eq!(table.reading, Some(1), "2 ms against 3 ms is noise");
        table.nodes.get_mut(&2).expect("node 2").rtt_ms = Some(1.0);
        table.rerank(now);
        assert_eq!(table.reading, Some(2));
        table.mark_down(2, now);
        assert_eq!(table.pick_reader(now), Some(1));
        assert!(table.rerouted);
    }
}
