//! Probing: UDP discovery rounds that find nodes, UDP pings that measure every known node's RTT
//! (the RPC `ping` for a node that never answered UDP), and the refresh loop that runs both.
//!
//! Each node answers pings on its client address ([`proto::discovery::PingSocket`]); a ping to
//! the shared discovery port would reach a random node on the host. So RTTs, roles and applied
//! indexes of every node come without a connection to any of them.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use proto::discovery::{DiscoverySocket, NodeAnnounce, Packet};
use tarpc::client::RpcError;

use crate::config::ClientConfig;
use crate::error::Error;
use crate::pool::{ctx, Pool};
use crate::retry::Failure;
use crate::routing::{Probe, Routes, Table};

/// UDP pings per node and probe round before the node counts as silent: one lost datagram is
/// not a failure.
const PING_ATTEMPTS: u32 = 3;
/// Shortest and longest wait for pongs after one round of pings (4 x the node's smoothed
/// RTT in between). With [`PING_ATTEMPTS`] the shortest bounds how fast a hung node is passed
/// over: one probe interval plus 3 x 250 ms on a LAN.
const PONG_WAIT_MIN: Duration = Duration::from_millis(250);
const PONG_WAIT_MAX: Duration = Duration::from_secs(1);
/// Wait for pongs from a node whose RTT is not measured yet.
const PONG_WAIT_UNMEASURED: Duration = Duration::from_millis(500);
/// Discovery rounds run every this many probe intervals, to find nodes that joined.
const DISCOVERY_EVERY: u32 = 5;

/// Finds and measures the nodes of one client's table.
pub(crate) struct Prober {
    config: Arc<ClientConfig>,
    routes: Arc<Routes>,
    pool: Arc<Pool>,
    /// For discovery rounds and pings; a round holds it while it reads the replies, so rounds
    /// never take each other's.
    socket: tokio::sync::Mutex<DiscoverySocket>,
}

impl Prober {
    /// # Errors
    ///
    /// [`Error::Discovery`] when the UDP socket cannot be opened.
    pub(crate) fn new(
        config: Arc<ClientConfig>,
        routes: Arc<Routes>,
        pool: Arc<Pool>,
    ) -> Result<Self, Error> {
        let (port, broadcast) = (config.discovery_port, config.broadcast);
        let socket = DiscoverySocket::ephemeral(port, broadcast, config.cluster.clone())
            .map_err(Error::Discovery)?;
        Ok(Self {
            config,
            routes,
            pool,
            socket: tokio::sync::Mutex::new(socket),
        })
    }

    /// Discovery with growing windows until some node answers.
    ///
    /// # Errors
    ///
    /// [`Error::NoServers`], saying where it looked.
    pub(crate) async fn initial_discovery(&self) -> Result<(), Error> {
        let socket = self.socket.lock().await;
        for round in 0..3u32 {
            let found = self.discover(&socket, self.config.discovery_window * (1 + 2 * round));
            if self.merge(found.await) {
                return Ok(());
            }
        }
        Err(Error::NoServers {
            cluster: self.config.cluster.clone(),
            broadcast: socket.broadcast_addr(),
            join: self.config.join.clone(),
        })
    }

    /// Merges announcements into the table; whether there were any.
    fn merge(&self, found: Vec<NodeAnnounce>) -> bool {
        self.routes
            .update(|table, _| found.iter().for_each(|a| table.merge_announce(a)));
        !found.is_empty()
    }

    /// One discovery round: a broadcast probe and a probe to every join address, then the
    /// announcements heard within `window`.
    async fn discover(&self, socket: &DiscoverySocket, window: Duration) -> Vec<NodeAnnounce> {
        let probe = Packet::Probe {
            cluster: self.config.cluster.clone(),
            nonce: rand::random(),
            from_client: true,
        };
        if let Err(e) = socket.send_broadcast(&probe).await {
            tracing::debug!(error = %e, "discovery broadcast failed");
        }
        for addr in &self.config.join {
            if let Err(e) = socket.send_to(&probe, *addr).await {
                tracing::debug!(error = %e, %addr, "discovery probe to join address failed");
            }
        }
        let mut found = BTreeMap::new();
        let deadline = tokio::time::Instant::now() + window;
        while let Ok(received) = tokio::time::timeout_at(deadline, socket.recv()).await {
            match received {
                Ok((Packet::Announce(announce), _)) => {
                    found.insert(announce.node_id, announce);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "discovery receive failed");
                    break;
                }
            }
        }
        found.into_values().collect()
    }

    /// Measures every known node: UDP pings first; a node that missed them all is passed over
    /// if it has answered UDP at this address before (it is hung, gone or cut off), and is
    /// pinged over TCP if it never has (UDP may be filtered, or it has no ping socket); a
    /// failed TCP ping marks it down. Then moves reads to a clearly faster node, if any.
    pub(crate) async fn probe_all(&self) {
        let targets = self.routes.view(|table, _| table.probe_targets());
        let silent = self.ping_udp(&targets).await;
        let probed = |id| self.routes.view(|table, _| table.probed(id));
        let (udp, tcp): (Vec<u64>, Vec<u64>) = silent
            .into_iter()
            .partition(|&id| probed(id) == Some(Probe::Udp));
        for id in udp {
            self.routes.mark_down(id, "missed its UDP pings");
        }
        let pings = tcp
            .into_iter()
            .map(|id| async move { (id, self.ping_tcp(id).await) });
        for (id, result) in futures::future::join_all(pings).await {
            match result {
                Ok((rtt, pong)) => self.routes.update(|table, _| {
                    table.record_pong(id, rtt, (pong.role, pong.applied), Probe::Tcp);
                }),
                Err(e) => self.pool.mark_down(id, &e.to_string()),
            }
        }
        self.routes.update(Table::rerank);
    }

    /// Pings `targets` over UDP, each up to [`PING_ATTEMPTS`] times, and records every pong;
    /// returns the nodes that answered none. A pong counts only with the nonce of a ping of
    /// this round and the node id that ping was meant for.
    async fn ping_udp(&self, targets: &[(u64, SocketAddr, Option<f64>)]) -> Vec<u64> {
        let socket = self.socket.lock().await;
        let mut pending: BTreeMap<u64, (SocketAddr, Option<f64>)> = targets
            .iter()
            .map(|&(id, addr, rtt)| (id, (addr, rtt)))
            .collect();
        let mut sent: HashMap<u64, (u64, Instant)> = HashMap::new();
        for _ in 0..PING_ATTEMPTS {
            let mut wait = None;
            for (&id, &(addr, rtt_ms)) in &pending {
                let nonce = rand::random();
                let ping = Packet::Ping {
                    nonce,
                    sent_ns: monotonic_ns(),
                };
                if let Err(e) = socket.send_to(&ping, addr).await {
                    tracing::debug!(node = id, %addr, error = %e, "UDP ping not sent");
                    continue;
                }
                sent.insert(nonce, (id, Instant::now()));
                wait = wait.max(Some(pong_wait(rtt_ms)));
            }
            // Nothing could be sent (an IPv6 address, say): waiting would not help.
            let Some(wait) = wait else { break };
            let deadline = tokio::time::Instant::now() + wait;
            while !pending.is_empty() {
                let Ok(received) = tokio::time::timeout_at(deadline, socket.recv()).await else {
                    break;
                };
                let (nonce, node_id, role, applied) = match received {
                    Ok((
                        Packet::PongStatus {
                            nonce,
                            node_id,
                            role,
                            applied,
                            ..
                        },
                        _,
                    )) => (nonce, node_id, role, applied),
                    // A late announcement or an old-style pong.
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::debug!(error = %e, "receiving pongs failed");
                        break;
                    }
                };
                // Pongs of earlier rounds and from a node other than the one pinged (its
                // address now belongs to another node) do not count.
                let Some(&(id, at)) = sent.get(&nonce) else {
                    continue;
                };
                if id != node_id {
                    tracing::debug!(node = id, answered = node_id, "pong from another node");
                    continue;
                }
                if pending.remove(&id).is_some() {
                    let pong = (role, applied);
                    self.routes.update(|table, _| {
                        table.record_pong(id, at.elapsed(), pong, Probe::Udp);
                    });
                }
            }
            if pending.is_empty() {
                break;
            }
        }
        pending.into_keys().collect()
    }

    /// The RPC `ping` on a connection to `id` (kept open while the node is measured this way).
    /// A pooled connection that broke since its last use (the node restarted, say) says
    /// nothing about the node now: it is dropped and the ping retried once on a fresh one.
    async fn ping_tcp(&self, id: u64) -> Result<(Duration, proto::Pong), Failure> {
        let timeout = self.config.request_timeout.min(Duration::from_secs(1));
        let mut redialed = false;
        loop {
            let conn = self.pool.read_conn(id).await?;
            let started = Instant::now();
            match conn.ping(ctx(timeout), rand::random()).await {
                Ok(pong) => return Ok((started.elapsed(), pong)),
                Err(RpcError::Shutdown) if !redialed => {
                    redialed = true;
                    self.pool.forget(id);
                }
                Err(e) => return Err(Failure::Transport(format!("ping: {e}"))),
            }
        }
    }

    /// One refresh round: discovery now and then, the membership from the reader, pings to
    /// every node, and closing connections no longer used.
    async fn refresh(&self, round: u32) {
        let discovery_round = round.is_multiple_of(DISCOVERY_EVERY);
        if discovery_round {
            let socket = self.socket.lock().await;
            self.merge(self.discover(&socket, self.config.discovery_window).await);
        }
        // The membership over a connection that is open anyway; a client that finds nodes only
        // through `join` addresses (no broadcast reaches it) also opens one each discovery
        // round, since its probes show only the nodes it names.
        if let Some(reader) = self.routes.pick_reader() {
            let conn = match self.pool.open_conn(reader) {
                None if discovery_round && !self.config.join.is_empty() => {
                    self.pool.connect(reader).await.ok()
                }
                conn => conn,
            };
            if let Some(conn) = conn {
                if let Ok(Ok(info)) = conn.cluster(self.pool.ctx()).await {
                    self.routes.update(|table, _| table.merge_cluster(&info));
                }
            }
        }
        self.probe_all().await;
        self.pool.prune();
    }

    /// Runs a refresh round every probe interval until the task is aborted.
    pub(crate) async fn refresh_loop(self: Arc<Self>) {
        for round in 1u32.. {
            tokio::time::sleep(self.config.probe_interval).await;
            self.refresh(round).await;
        }
    }
}

/// How long to wait for pongs from a node with smoothed RTT `rtt_ms`.
fn pong_wait(rtt_ms: Option<f64>) -> Duration {
    rtt_ms
        .map_or(PONG_WAIT_UNMEASURED, |ms| {
            Duration::from_secs_f64(ms * 4.0 / 1000.0)
        })
        .clamp(PONG_WAIT_MIN, PONG_WAIT_MAX)
}

/// This process's monotonic clock in ns, for a ping's `sent_ns`.
fn monotonic_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}
