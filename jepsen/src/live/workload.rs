//! The client workload: writer processes send unique messages with idempotency keys, now and
//! then edit or delete one of their own acknowledged messages, and read their own channel
//! back from another node; streamer processes long-poll a channel and move between nodes.
//! Every call is recorded as invoke, then ok / fail / info.
//!
//! An edit or delete is a message of its own (a send carrying a relation), so it follows the
//! send's discipline below, with its own key and a unique body: `p{proc}-{n}-e{t}` replaces the
//! text of the process's message `t`, `p{proc}-{n}-d{t}` deletes it.
//!
//! Classification of a send's outcome:
//! - `ok`: the node answered with a seq;
//! - `fail` (definitely not applied): could not connect or log in before sending, `NotLeader`
//!   (the node answers it only for entries it never proposed or that were truncated), a
//!   validation `Rejected`, `RateLimited`, `Unauthenticated`;
//! - `info` (unknown): timeouts, transport errors after sending, `Unavailable`, `Aborted`,
//!   the node's `Timeout`.
//!
//! A message is retried with the same key and msg after any outcome but `ok` (at most
//! [`SEND_ATTEMPTS`] times); the next message always gets a new key.
//!
//! Reads record what the node showed of each message ([`ReadEntry`]): an erased entry as a
//! marker, an edited one with its newest edit; and the read token they passed, which the
//! checker holds them to.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proto::{
    ApiError, ChatClient, HistoryRequest, Relation, SendRequest, StreamRequest, WireMessage,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use testkit::{TestClient, TestUser};
use tokio::time::{sleep, timeout, Instant};

use crate::history::{HistoryWriter, Op, OpType, ReadEntry};

/// Attempts per message (same key, same msg).
pub const SEND_ATTEMPTS: u32 = 4;
/// Client-side deadline of a send.
const SEND_TIMEOUT: Duration = Duration::from_secs(3);
/// Deadline of connect + hello + login.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one stream poll waits on the node.
const STREAM_WAIT: Duration = Duration::from_millis(500);
/// Deadline of a history read.
const READ_TIMEOUT: Duration = Duration::from_secs(3);
/// Messages per history read page.
const PAGE: u32 = 50;
/// A writer's op is an edit or delete of one of its own messages one time in this many.
const RELATE_ONE_IN: u32 = 10;
/// Of those, deletes are this many in five (the rest are edits).
const DELETES_IN_FIVE: u32 = 2;

/// Op counters for the progress line.
#[derive(Default)]
pub struct Counters {
    /// Invocations.
    pub invoke: AtomicU64,
    /// ok completions.
    pub ok: AtomicU64,
    /// fail completions.
    pub fail: AtomicU64,
    /// info completions.
    pub info: AtomicU64,
    /// History lines that could not be written.
    pub write_errors: AtomicU64,
}

/// What every client process shares.
pub struct Shared {
    /// The history.
    pub history: Arc<HistoryWriter>,
    /// Chat address of each node (ports are kept across restarts).
    pub addrs: Vec<SocketAddr>,
    /// The cluster name.
    pub cluster: String,
    /// The channels written and read.
    pub channels: Vec<String>,
    /// No new operation starts after this.
    pub stop_at: Instant,
    /// Pause between one process's operations.
    pub op_gap: Duration,
    /// Counters.
    pub counters: Counters,
    /// Random per run, part of every client id.
    pub nonce: u64,
    /// Seed for the processes' own randomness.
    pub seed: u64,
    /// The user final reads log in as, registered before the faults start.
    pub reader: TestUser,
}

impl Shared {
    /// Records `op`, counting it.
    pub fn rec(&self, op: Op) {
        let counter = match op.kind {
            OpType::Invoke => &self.counters.invoke,
            OpType::Ok => &self.counters.ok,
            OpType::Fail => &self.counters.fail,
            OpType::Info => &self.counters.info,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if self.history.record(op).is_err() {
            self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn node_of(&self, addr: SocketAddr) -> Option<usize> {
        self.addrs.iter().position(|a| *a == addr)
    }
}

fn node_name(i: usize) -> String {
    format!("n{}", i + 1)
}

fn ctx(timeout: Duration) -> tarpc::context::Context {
    let mut ctx = tarpc::context::current();
    ctx.deadline = std::time::Instant::now() + timeout;
    ctx
}

/// One client process: its user, its connections, the highest read token it has seen.
pub struct Proc {
    id: u64,
    user: TestUser,
    client_id: [u8; 16],
    conns: HashMap<usize, ChatClient>,
    token: u64,
    target: usize,
    rng: StdRng,
}

impl Proc {
    /// Process `id` with its own user.
    pub fn new(sh: &Shared, id: u64) -> Proc {
        let mut client_id = [0u8; 16];
        client_id[..8].copy_from_slice(&sh.nonce.to_le_bytes());
        client_id[8..].copy_from_slice(&id.to_le_bytes());
        let n = sh.addrs.len().max(1);
        Proc {
            id,
            user: TestUser::new(&format!("jp{:x}p{id}", sh.nonce & 0xffff_ffff)),
            client_id,
            conns: HashMap::new(),
            token: 0,
            target: usize::try_from(id).unwrap_or(0) % n,
            rng: StdRng::seed_from_u64(sh.seed ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        }
    }

    async fn conn(&mut self, sh: &Shared, node: usize) -> Result<ChatClient, String> {
        if let Some(c) = self.conns.get(&node) {
            return Ok(c.clone());
        }
        let login = TestClient::login(sh.addrs[node], &sh.cluster, &self.user);
        match timeout(CONNECT_TIMEOUT, login).await {
            Ok(Ok(c)) => {
                self.conns.insert(node, c.client.clone());
                Ok(c.client)
            }
            Ok(Err(e)) => Err(format!("connect/login: {e:#}")),
            Err(_) => Err("connect/login: timed out".to_owned()),
        }
    }

    fn next_node(&mut self, sh: &Shared) {
        self.target = (self.target + 1) % sh.addrs.len();
    }

    /// Registers the user (a Raft write: needs the leader), trying every node for up to
    /// `within`. Recorded as nothing: it is setup.
    async fn register(&mut self, sh: &Shared, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.conn(sh, self.target).await.is_ok() {
                return true;
            }
            self.next_node(sh);
            sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// Appends message `n` to `channel`: a send of `msg`, or an edit or delete whose body is
    /// `msg`. At most [`SEND_ATTEMPTS`] attempts with one key and msg.
    async fn write(
        &mut self,
        sh: &Shared,
        channel: &str,
        n: u64,
        msg: &str,
        change: Change,
    ) -> Outcome {
        let key = format!("c{}-{n}", self.id);
        let mut unknown = false;
        for _ in 0..SEND_ATTEMPTS {
            if Instant::now() >= sh.stop_at {
                break;
            }
            let node = self.target;
            let nn = node_name(node);
            let id = self.id;
            let op = |kind| change.op(kind, id, channel, &key, msg).with_node(&nn);
            sh.rec(op(OpType::Invoke));
            let client = match self.conn(sh, node).await {
                Ok(c) => c,
                Err(e) => {
                    sh.rec(op(OpType::Fail).with_error(&e));
                    self.next_node(sh);
                    sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let req = SendRequest {
                channel: channel.to_owned(),
                body: msg.as_bytes().to_vec(),
                client_id: self.client_id,
                client_seq: n,
                relation: change.relation(),
            };
            let call = client.send(ctx(SEND_TIMEOUT), req);
            match timeout(SEND_TIMEOUT + Duration::from_millis(500), call).await {
                Ok(Ok(Ok(reply))) => {
                    self.token = self.token.max(reply.read_token);
                    let done = op(OpType::Ok).with_seq(reply.seq);
                    sh.rec(done.with_token(reply.read_token));
                    return Outcome::Ok(reply.seq);
                }
                Ok(Ok(Err(ApiError::NotLeader { leader }))) => {
                    sh.rec(op(OpType::Fail).with_error("not leader"));
                    match leader.and_then(|h| sh.node_of(h.client_addr)) {
                        Some(i) if i != node => self.target = i,
                        _ => {
                            self.next_node(sh);
                            sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                Ok(Ok(Err(ApiError::RateLimited { retry_after_ms }))) => {
                    sh.rec(op(OpType::Fail).with_error("rate limited"));
                    sleep(Duration::from_millis(retry_after_ms.min(1_000))).await;
                }
                Ok(Ok(Err(
                    e @ (ApiError::Rejected(_)
                    | ApiError::Unauthenticated
                    | ApiError::WrongCluster { .. }
                    | ApiError::UnsupportedProtocol { .. }),
                ))) => {
                    sh.rec(op(OpType::Fail).with_error(&e.to_string()));
                    return Outcome::Refused;
                }
                Ok(Ok(Err(e))) => {
                    // Unavailable, Aborted, Timeout: may still be applied.
                    sh.rec(op(OpType::Info).with_error(&e.to_string()));
                    unknown = true;
                    self.next_node(sh);
                    sleep(Duration::from_millis(150)).await;
                }
                Ok(Err(e)) => {
                    sh.rec(op(OpType::Info).with_error(&format!("rpc: {e}")));
                    unknown = true;
                    self.conns.remove(&node);
                    self.next_node(sh);
                    sleep(Duration::from_millis(100)).await;
                }
                Err(_) => {
                    sh.rec(op(OpType::Info).with_error("client timeout"));
                    unknown = true;
                    self.conns.remove(&node);
                    self.next_node(sh);
                }
            }
        }
        if unknown {
            Outcome::Unknown
        } else {
            Outcome::Failed
        }
    }

    /// One history page of `channel` from `node`, starting at `from`.
    async fn read(&mut self, sh: &Shared, node: usize, channel: &str, from: u64) {
        let nn = node_name(node);
        let id = self.id;
        let token = self.token;
        let op = |kind| {
            Op::read(kind, id, channel)
                .with_from(from)
                .with_limit(u64::from(PAGE))
                .with_token(token)
                .with_node(&nn)
        };
        sh.rec(op(OpType::Invoke));
        let client = match self.conn(sh, node).await {
            Ok(c) => c,
            Err(e) => {
                sh.rec(op(OpType::Fail).with_error(&e));
                return;
            }
        };
        let req = HistoryRequest {
            channel: channel.to_owned(),
            before_seq: None,
            from_seq: Some(from),
            limit: PAGE,
            read_token: token,
        };
        let call = client.history(ctx(READ_TIMEOUT), req);
        match timeout(READ_TIMEOUT + Duration::from_millis(500), call).await {
            Ok(Ok(Ok(batch))) => {
                self.token = self.token.max(batch.applied);
                sh.rec(
                    op(OpType::Ok)
                        .with_entries(batch.messages.iter().map(entry))
                        .with_head(batch.head)
                        .with_floor(batch.floor),
                );
            }
            Ok(Ok(Err(e))) => sh.rec(op(OpType::Fail).with_error(&e.to_string())),
            Ok(Err(e)) => {
                sh.rec(op(OpType::Fail).with_error(&format!("rpc: {e}")));
                self.conns.remove(&node);
            }
            Err(_) => {
                sh.rec(op(OpType::Fail).with_error("client timeout"));
                self.conns.remove(&node);
            }
        }
    }
}

/// What a writer appends.
#[derive(Debug, Clone, Copy)]
enum Change {
    /// A new message.
    Send,
    /// New text for the process's own message at this seq.
    Edit { of: u64 },
    /// Erases the process's own message at this seq.
    Delete { of: u64 },
}

impl Change {
    fn op(self, kind: OpType, process: u64, channel: &str, key: &str, msg: &str) -> Op {
        match self {
            Change::Send => Op::send(kind, process, channel, key, msg),
            Change::Edit { of } => Op::edit(kind, process, channel, key, msg, of),
            Change::Delete { of } => Op::delete(kind, process, channel, key, msg, of),
        }
    }

    fn relation(self) -> Option<Relation> {
        match self {
            Change::Send => None,
            Change::Edit { of } => Some(Relation::Edit { of }),
            Change::Delete { of } => Some(Relation::Delete { of }),
        }
    }
}

/// How a [`Proc::write`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Acknowledged at this seq.
    Ok(u64),
    /// Some attempt may have been applied.
    Unknown,
    /// Refused by the node's rules (or the session): not applied, and retrying will not help.
    Refused,
    /// Every attempt definitely failed.
    Failed,
}

/// One of a writer's acknowledged messages it may still edit or delete.
struct Own {
    channel: String,
    seq: u64,
    /// Its message number: `p{proc}-{n}`.
    n: u64,
}

fn body(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// What a read showed of `m`. A deleted entry's body is empty on the wire, so it is recorded
/// as a marker, not as a message with an empty body (which no process sent).
fn entry(m: &WireMessage) -> ReadEntry {
    let erased = m.deleted && m.body.is_empty();
    let (edit_of, delete_of) = match m.relation {
        Some(Relation::Edit { of }) => (Some(of), None),
        Some(Relation::Delete { of }) => (None, Some(of)),
        _ => (None, None),
    };
    ReadEntry {
        seq: m.seq,
        msg: (!erased).then(|| body(&m.body)),
        deleted: m.deleted,
        edit: m.edit.as_ref().map(|e| (e.seq, body(&e.body))),
        edit_of,
        delete_of,
    }
}

/// A writer: sends to a rotating set of channels; one op in eight is a history read of the
/// channel it last wrote, from its own last seq, on a random node (read-your-writes); one in
/// [`RELATE_ONE_IN`] of the others edits or deletes one of its own acknowledged messages.
///
/// A message whose delete ended with an unknown outcome, or was refused, is neither edited
/// nor deleted again: it may be gone, and the node would refuse either.
pub async fn writer(sh: Arc<Shared>, id: u64) {
    let mut p = Proc::new(&sh, id);
    if !p.register(&sh, Duration::from_secs(20)).await {
        eprintln!("process {id}: could not log in to any node; it sends nothing");
        return;
    }
    let mut n = 0u64;
    let mut last: Option<(String, u64)> = None;
    let mut own: Vec<Own> = Vec::new();
    for _ in 0..1_000_000 {
        if Instant::now() >= sh.stop_at {
            break;
        }
        let read_now = last.is_some() && p.rng.random_range(0..8) == 0;
        let relate_now = !own.is_empty() && p.rng.random_range(0..RELATE_ONE_IN) == 0;
        if read_now {
            if let Some((channel, seq)) = last.clone() {
                let node = p.rng.random_range(0..sh.addrs.len());
                p.read(&sh, node, &channel, seq).await;
            }
        } else if relate_now {
            n += 1;
            let i = p.rng.random_range(0..own.len());
            let (channel, of, t) = (own[i].channel.clone(), own[i].seq, own[i].n);
            let delete = p.rng.random_range(0..5) < DELETES_IN_FIVE;
            let (change, msg) = if delete {
                (Change::Delete { of }, format!("p{id}-{n}-d{t}"))
            } else {
                (Change::Edit { of }, format!("p{id}-{n}-e{t}"))
            };
            match p.write(&sh, &channel, n, &msg, change).await {
                Outcome::Ok(_) => {
                    if delete {
                        own.swap_remove(i);
                    }
                    // The next read-your-writes read starts at the target, so it covers it.
                    last = Some((channel, of));
                }
                Outcome::Unknown if delete => {
                    own.swap_remove(i);
                }
                Outcome::Refused => {
                    own.swap_remove(i);
                }
                Outcome::Unknown | Outcome::Failed => {}
            }
        } else {
            n += 1;
            let k = sh.channels.len();
            let channel = sh.channels[usize::try_from(id + n).unwrap_or(0) % k].clone();
            let msg = format!("p{id}-{n}");
            if let Outcome::Ok(seq) = p.write(&sh, &channel, n, &msg, Change::Send).await {
                own.push(Own {
                    channel: channel.clone(),
                    seq,
                    n,
                });
                last = Some((channel, seq));
            }
        }
        sleep(jitter(&mut p.rng, sh.op_gap)).await;
    }
}

fn jitter(rng: &mut StdRng, gap: Duration) -> Duration {
    let ms = gap.as_millis() as u64;
    Duration::from_millis(rng.random_range(ms / 2..=ms * 3 / 2 + 1))
}

/// A streamer: long-polls one channel at a time, passing the highest read token seen; moves
/// to another node every few batches or after an error (recording `resubscribe` with the last
/// seq it saw), and to another channel now and then.
pub async fn streamer(sh: Arc<Shared>, id: u64) {
    let mut p = Proc::new(&sh, id);
    if !p.register(&sh, Duration::from_secs(20)).await {
        eprintln!("process {id}: could not log in to any node; it reads nothing");
        return;
    }
    let k = sh.channels.len();
    let mut ci = usize::try_from(id).unwrap_or(0) % k;
    let mut last: HashMap<usize, u64> = HashMap::new();
    let mut resubscribe = true;
    let mut batches = 0u32;
    for _ in 0..1_000_000 {
        if Instant::now() >= sh.stop_at {
            break;
        }
        let channel = sh.channels[ci].clone();
        let node = p.target;
        let nn = node_name(node);
        let after = last.get(&ci).copied().unwrap_or(0);
        if resubscribe {
            let op = |kind| Op::resubscribe(kind, id, &channel, after).with_node(&nn);
            sh.rec(op(OpType::Invoke));
            sh.rec(op(OpType::Ok));
            resubscribe = false;
        }
        let token = p.token;
        let op = |kind| {
            Op::stream_read(kind, id, &channel)
                .with_token(token)
                .with_node(&nn)
        };
        sh.rec(op(OpType::Invoke));
        let client = match p.conn(&sh, node).await {
            Ok(c) => c,
            Err(e) => {
                sh.rec(op(OpType::Fail).with_error(&e));
                p.next_node(&sh);
                resubscribe = true;
                sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let req = StreamRequest {
            channel: channel.clone(),
            after_seq: after,
            max: 200,
            wait_ms: u32::try_from(STREAM_WAIT.as_millis()).unwrap_or(500),
            read_token: token,
        };
        let call = client.stream(proto::deadline_for(STREAM_WAIT), req);
        let limit = STREAM_WAIT + proto::DEADLINE_MARGIN + Duration::from_millis(500);
        let mut moved = false;
        match timeout(limit, call).await {
            Ok(Ok(Ok(batch))) => {
                p.token = p.token.max(batch.applied);
                if let Some(m) = batch.messages.last() {
                    last.insert(ci, m.seq);
                }
                let entries = batch.messages.iter().map(entry);
                sh.rec(op(OpType::Ok).with_entries(entries).with_floor(batch.floor));
            }
            Ok(Ok(Err(e))) => {
                sh.rec(op(OpType::Fail).with_error(&e.to_string()));
                moved = true;
            }
            Ok(Err(e)) => {
                sh.rec(op(OpType::Fail).with_error(&format!("rpc: {e}")));
                p.conns.remove(&node);
                moved = true;
            }
            Err(_) => {
                sh.rec(op(OpType::Fail).with_error("client timeout"));
                p.conns.remove(&node);
                moved = true;
            }
        }
        batches += 1;
        if moved || batches.is_multiple_of(10) {
            p.next_node(&sh);
            resubscribe = true;
        }
        if batches.is_multiple_of(25) {
            ci = (ci + 1) % k;
            resubscribe = true;
        }
        if moved {
            sleep(Duration::from_millis(200)).await;
        }
        // Some history reads too, from a random node, starting a little before the stream.
        if p.rng.random_range(0..6) == 0 {
            let node = p.rng.random_range(0..sh.addrs.len());
            let from = last
                .get(&ci)
                .copied()
                .unwrap_or(0)
                .saturating_sub(20)
                .max(1);
            let ch = sh.channels[ci].clone();
            p.read(&sh, node, &ch, from).await;
        }
    }
}

/// Final read of every channel on `node`, whole, from seq 1, paging with the node's own
/// applied index as read token. One `final-read` op per channel.
pub async fn final_reads(
    sh: &Shared,
    process: u64,
    node: usize,
    cluster: &str,
    applied: u64,
) -> usize {
    let nn = node_name(node);
    let mut ok = 0;
    // Reading needs a login: the run's reader, registered at the start (a fault that lost
    // the registration is repaired by a login at the leader).
    let login = TestClient::login_anywhere(
        sh.addrs[node],
        &sh.addrs,
        cluster,
        &sh.reader,
        CONNECT_TIMEOUT * 10,
    );
    let client = match timeout(CONNECT_TIMEOUT * 11, login).await {
        Ok(Ok(c)) => Some(c.client),
        _ => None,
    };
    for channel in &sh.channels {
        let op = |kind| Op::final_read(kind, process, &nn, channel);
        sh.rec(op(OpType::Invoke));
        let Some(client) = &client else {
            sh.rec(op(OpType::Fail).with_error("cannot connect"));
            continue;
        };
        let mut msgs: Vec<ReadEntry> = Vec::new();
        let mut head = 0;
        let mut floor = 0;
        let mut error = None;
        for _ in 0..10_000 {
            let from = msgs.last().map_or(1, |e| e.seq + 1);
            let req = HistoryRequest {
                channel: channel.clone(),
                before_seq: None,
                from_seq: Some(from),
                limit: 1000,
                read_token: applied,
            };
            let call = client.history(ctx(Duration::from_secs(10)), req);
            match timeout(Duration::from_secs(11), call).await {
                Ok(Ok(Ok(batch))) => {
                    head = batch.head;
                    floor = batch.floor.max(floor);
                    let got = batch.messages.len();
                    msgs.extend(batch.messages.iter().map(entry));
                    if got == 0 || msgs.last().is_some_and(|e| e.seq >= head) {
                        break;
                    }
                }
                Ok(Ok(Err(e))) => {
                    error = Some(e.to_string());
                    break;
                }
                Ok(Err(e)) => {
                    error = Some(format!("rpc: {e}"));
                    break;
                }
                Err(_) => {
                    error = Some("client timeout".to_owned());
                    break;
                }
            }
        }
        match error {
            None => {
                ok += 1;
                let done = op(OpType::Ok).with_from(1).with_entries(msgs);
                sh.rec(done.with_head(head).with_floor(floor));
            }
            Some(e) => sh.rec(op(OpType::Fail).with_error(&e)),
        }
    }
    ok
}

/// The node's applied index and the leader it knows, by `ping` and `cluster`.
pub async fn probe(addr: SocketAddr, cluster: &str) -> Option<(u64, Option<u64>, u64)> {
    let fut = async {
        let (c, _) = TestClient::connect(addr, cluster).await.ok()?;
        let info = c
            .client
            .cluster(ctx(Duration::from_secs(1)))
            .await
            .ok()?
            .ok()?;
        let pong = c.client.ping(ctx(Duration::from_secs(1)), 1).await.ok()?;
        Some((pong.applied, info.leader, pong.node_id))
    };
    timeout(Duration::from_millis(1_500), fut)
        .await
        .ok()
        .flatten()
}

/// `{"n1": applied, ...}` for a JSON value.
pub fn applied_json(applied: &[(usize, u64)]) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for (i, a) in applied {
        map.insert(node_name(*i), json!(a));
    }
    serde_json::Value::Object(map)
}
