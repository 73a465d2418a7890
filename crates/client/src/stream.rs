//! [`Subscription`]: the messages of one channel in seq order, pushed by the nearest node over
//! a push connection (`push.rs`; long polls with `Chat::stream` on nodes without push), moving
//! to the next nearest node when its node fails, and resuming right after the last seq it
//! delivered.
//!
//! A subscription's poll loop ([`Follower`]) picks the node and moves; its [`Handout`] is where
//! messages are checked and handed to the application. The push connection hands a batch out
//! itself when it can, so a pushed message reaches the application without waking the poll
//! loop; when the application's channel is full, or at a gap, the batch goes to the poll loop,
//! which waits for room or moves.

use std::sync::Arc;
use std::time::Duration;

use proto::{ApiError, MessageBatch, StreamRequest, WireMessage};
use tokio::sync::mpsc;

use crate::error::Error;
use crate::handout::{Handout, Room, Step};
use crate::pool::Pool;
use crate::push::{DialError, PushPool};
use crate::retry::{backoff, jitter, Failure, BACKOFF_MAX};
use crate::routing::Routes;

/// Messages one poll asks for.
const POLL_MESSAGES_MAX: u32 = 500;
/// Capacity of a subscription's channel; the poll loop waits while it is full.
const SUBSCRIPTION_CAPACITY: usize = 1024;
/// Most messages the poll loop reserves room for at once while it hands out a batch.
const HANDOUT_CHUNK: usize = 64;

/// The messages of one channel after a given seq, in seq order, each exactly once.
///
/// Invariants (checked in the poll loop before anything is handed out):
/// - seqs are dense: each message's seq is one more than the previous one's (the first is
///   `after_seq + 1`);
/// - no seq is handed out twice, also across a move to another node.
///
/// Dropping it stops the poll loop (and unsubscribes on the push connection).
#[derive(Debug)]
pub struct Subscription {
    channel: String,
    rx: mpsc::Receiver<Result<WireMessage, Error>>,
}

impl Subscription {
    /// The channel read.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The next message; `Some(Err(..))` once when the channel cannot be read (for example an
    /// invalid name), after which the subscription ends with `None`.
    pub async fn recv(&mut self) -> Option<Result<WireMessage, Error>> {
        self.rx.recv().await
    }

    /// The underlying receiver, for `select!` loops.
    pub fn into_receiver(self) -> mpsc::Receiver<Result<WireMessage, Error>> {
        self.rx
    }
}

/// What subscriptions read with: the routing table, RPC connections for long polls, and push
/// connections.
#[derive(Clone)]
pub(crate) struct Streams {
    pub(crate) routes: Arc<Routes>,
    pub(crate) pool: Arc<Pool>,
    pub(crate) push: Arc<PushPool>,
    /// How long one long poll waits on the node (`ClientConfig::stream_wait`).
    pub(crate) wait: Duration,
}

impl Streams {
    /// Starts a subscription to `channel` after `after_seq`; its poll loop ends when the
    /// [`Subscription`] is dropped.
    pub(crate) fn subscribe(&self, channel: &str, after_seq: u64) -> Subscription {
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_CAPACITY);
        let follower = Follower {
            s: self.clone(),
            channel: channel.to_owned(),
            failures: 0,
            handout: Arc::new(Handout::new(channel, after_seq, self.routes.clone(), tx)),
        };
        tokio::spawn(follower.run());
        Subscription {
            channel: channel.to_owned(),
            rx,
        }
    }
}

/// How one attempt on a node ended.
enum Poll {
    /// Try again: a batch was handed out, reads moved, or the node wants long polls.
    Again,
    /// The node failed or fell behind; try another.
    NodeFailed(String),
    /// Wait, then poll again.
    Wait(Duration),
    /// The channel cannot be read at all.
    Fatal(ApiError),
    /// The subscriber went away.
    Closed,
}

/// The poll loop of one subscription. Each attempt (on this node or another) resumes right
/// after the last seq handed out.
struct Follower {
    s: Streams,
    channel: String,
    failures: u32,
    handout: Arc<Handout>,
}

impl Follower {
    async fn run(mut self) {
        while !self.handout.tx.is_closed() {
            let Some(node) = self.s.routes.pick_reader() else {
                self.failures += 1;
                tokio::time::sleep(backoff(self.failures, BACKOFF_MAX, jitter())).await;
                continue;
            };
            let outcome = if self.s.push.supports(node) {
                self.push_once(node).await
            } else {
                self.poll_once(node).await
            };
            match outcome {
                Poll::Again => {}
                Poll::NodeFailed(reason) => {
                    self.failures += 1;
                    let after_seq = self.handout.last();
                    let channel = &self.channel;
                    tracing::info!(node, %channel, after_seq, %reason, "stream node failed, moving");
                    self.s.pool.mark_down(node, &reason);
                    if self.failures > 1 {
                        tokio::time::sleep(backoff(self.failures, BACKOFF_MAX, jitter())).await;
                    }
                }
                Poll::Wait(wait) => tokio::time::sleep(wait).await,
                Poll::Fatal(e) => {
                    // The subscriber may be gone already; the loop ends either way.
                    let _ = self.handout.tx.send(Err(Error::Api(e))).await;
                    return;
                }
                Poll::Closed => return,
            }
        }
    }

    /// Hands out the messages of `batch` after the last one handed out, in order, waiting for
    /// room, and stops at a gap without handing out anything past it. `pushed` is the attempt
    /// a push connection passed the batch for, which no longer waits here once it returns.
    async fn deliver(&mut self, node: u64, mut batch: MessageBatch, pushed: Option<u64>) -> Poll {
        self.failures = 0;
        let handout = &self.handout;
        handout.routes.observe(batch.applied);
        let outcome = loop {
            let want = (batch.messages.len().min(HANDOUT_CHUNK)).min(handout.tx.max_capacity());
            if want == 0 {
                break Poll::Again;
            }
            let Ok(mut permits) = handout.tx.reserve_many(want).await else {
                break Poll::Closed;
            };
            let step = handout.hand_out(node, &mut batch, || {
                permits.next().map_or(Room::Full, Room::Slot)
            });
            match step {
                Step::Done => break Poll::Again,
                Step::Full => {}
                Step::Gap { expected, found } => {
                    let channel = &self.channel;
                    tracing::warn!(node, %channel, expected, found, "seq gap from node, moving");
                    break Poll::NodeFailed("seq gap".into());
                }
                Step::Closed => break Poll::Closed,
            }
        };
        if let Some(attempt) = pushed {
            handout.passed_batch_done(attempt);
        }
        outcome
    }

    /// One long poll on `node`, abandoned early when the node is marked down or reads move
    /// (nothing of it was handed out then).
    async fn poll_once(&mut self, node: u64) -> Poll {
        self.handout.begin();
        let pool = self.s.pool.clone();
        let _polling = pool.poll_guard();
        let conn = match pool.read_conn(node).await {
            Ok(conn) => conn,
            Err(failure) => return failed(failure),
        };
        let request = StreamRequest {
            channel: self.channel.clone(),
            after_seq: self.handout.last(),
            max: POLL_MESSAGES_MAX,
            wait_ms: u32::try_from(self.s.wait.as_millis()).unwrap_or(proto::STREAM_WAIT_MS_MAX),
            read_token: self.s.routes.token(),
        };
        let (mut reroutes, tx) = (self.s.routes.reroutes(), self.handout.tx.clone());
        let call = conn.stream(proto::deadline_for(self.s.wait), request);
        tokio::pin!(call);
        loop {
            tokio::select! {
                outcome = &mut call => return match outcome {
                    Ok(Ok(batch)) => self.deliver(node, batch, None).await,
                    Ok(Err(e)) => classify(e),
                    Err(e) => Poll::NodeFailed(format!("stream: {e}")),
                },
                changed = reroutes.changed() => {
                    if let Some(outcome) = self.route_change(node, changed.is_ok()) {
                        return outcome;
                    }
                }
                () = tx.closed() => return Poll::Closed,
            }
        }
    }

    /// One push subscription on `node`, until the node fails, reads move, or the subscriber
    /// goes away (dropping the subscription unsubscribes). The connection hands batches out
    /// itself; this loop gets the ones that must wait for room, and the node's errors.
    async fn push_once(&mut self, node: u64) -> Poll {
        let attempt = self.handout.begin();
        let started_after = self.handout.last();
        let outcome = self.push_attempt(node, attempt, started_after).await;
        if matches!(outcome, Poll::NodeFailed(_)) && self.handout.last() > started_after {
            // Messages came in this attempt: the node worked, so the next failure starts the
            // backoff afresh, as a delivered batch does on the long-poll path.
            self.failures = 0;
        }
        outcome
    }

    async fn push_attempt(&mut self, node: u64, attempt: u64, after_seq: u64) -> Poll {
        let mut reroutes = self.s.routes.reroutes();
        let conn = match self.s.push.get(node).await {
            Ok(conn) => conn,
            Err(DialError::Unsupported) => return Poll::Again,
            Err(DialError::Failed(failure)) => return failed(failure),
        };
        let token = self.s.routes.token();
        let subscribed = conn.subscribe(&self.channel, after_seq, token, &self.handout, attempt);
        let Some(mut sub) = subscribed else {
            self.s.push.forget(node);
            return Poll::NodeFailed("push connection closed".into());
        };
        // The waits on the subscriber and on the routes live across batches, each made again
        // only when it fires: made per batch, each registers and removes a waiter for every
        // message delivered.
        let tx = self.handout.tx.clone();
        let closed = tx.closed();
        tokio::pin!(closed);
        loop {
            let changed = reroutes.changed();
            tokio::pin!(changed);
            let outcome = loop {
                let outcome = tokio::select! {
                    event = sub.events.recv() => match event {
                        Some(Ok(batch)) => self.deliver(node, batch, Some(attempt)).await,
                        Some(Err(e)) => classify(e),
                        None => {
                            self.s.push.forget(node);
                            Poll::NodeFailed("push connection lost".into())
                        }
                    },
                    changed = &mut changed => {
                        break self.route_change(node, changed.is_ok()).unwrap_or(Poll::Again);
                    }
                    () = &mut closed => Poll::Closed,
                };
                if !matches!(outcome, Poll::Again) {
                    break outcome;
                }
            };
            if !matches!(outcome, Poll::Again) {
                return outcome;
            }
        }
    }

    /// What a change of routes means for a stream on `node`: stop if the node was marked down
    /// (or the client is gone), move if reads went elsewhere, else keep going (`None`).
    fn route_change(&self, node: u64, still_routing: bool) -> Option<Poll> {
        let (down, reader) = (self.s.routes).view(|t, now| (t.is_down(node, now), t.reader()));
        if !still_routing || down {
            return Some(Poll::NodeFailed("node marked down".into()));
        }
        (reader != Some(node)).then_some(Poll::Again)
    }
}

fn failed(failure: Failure) -> Poll {
    match failure {
        Failure::Api(e) => classify(e),
        Failure::Transport(reason) => Poll::NodeFailed(reason),
    }
}

fn classify(e: ApiError) -> Poll {
    match e {
        ApiError::RateLimited { retry_after_ms } => {
            Poll::Wait(Duration::from_millis(retry_after_ms))
        }
        e if e.is_retryable() => Poll::NodeFailed(e.to_string()),
        e => Poll::Fatal(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(seq: u64) -> WireMessage {
        WireMessage {
            channel: "general".into(),
            seq,
            sender: "a".into(),
            body: vec![0, b'x'],
            at_ms: 0,
            client_seq: seq,
            ..WireMessage::default()
        }
    }

    fn batch(seqs: &[u64]) -> MessageBatch {
        batch_above(seqs, 1)
    }

    fn batch_above(seqs: &[u64], floor: u64) -> MessageBatch {
        MessageBatch {
            channel: "general".into(),
            messages: seqs.iter().map(|&seq| message(seq)).collect(),
            head: 0,
            applied: 0,
            floor,
        }
    }

    fn follower(
        after_seq: u64,
        capacity: usize,
    ) -> (Follower, mpsc::Receiver<Result<WireMessage, Error>>) {
        let (tx, rx) = mpsc::channel(capacity);
        let routes = Arc::new(Routes::new());
        let config = Arc::new(crate::ClientConfig {
            token: Some(proto::tls::JoinToken::generate(proto::tls::Fingerprint(
                [0; 32],
            ))),
            ..crate::ClientConfig::default()
        });
        let trust = Arc::new(crate::trust::ClusterTrust::for_config(&config).unwrap());
        let follower = Follower {
            s: Streams {
                pool: Arc::new(Pool::new(
                    config.clone(),
                    trust.clone(),
                    None,
                    routes.clone(),
                )),
                push: Arc::new(PushPool::new(config, trust, routes.clone(), None)),
                routes: routes.clone(),
                wait: Duration::from_secs(1),
            },
            channel: "general".into(),
            failures: 0,
            handout: Arc::new(Handout::new("general", after_seq, routes, tx)),
        };
        (follower, rx)
    }

    fn drain(rx: &mut mpsc::Receiver<Result<WireMessage, Error>>) -> Vec<u64> {
        let mut seqs = Vec::new();
        while let Ok(message) = rx.try_recv() {
            seqs.push(message.expect("ok").seq);
        }
        seqs
    }

    fn seqs(batch: &MessageBatch) -> Vec<u64> {
        batch.messages.iter().map(|m| m.seq).collect()
    }

    #[tokio::test]
    async fn deliver_skips_duplicates_and_stops_at_gaps() {
        let (mut follower, mut rx) = follower(2, 16);
        let outcome = follower.deliver(1, batch(&[1, 2, 3, 4, 6]), None).await;
        assert!(matches!(outcome, Poll::NodeFailed(reason) if reason == "seq gap"));
        assert_eq!(follower.handout.last(), 4);
        assert_eq!(drain(&mut rx), vec![3, 4]);
        // Resuming after a move hands out the rest once.
        let outcome = follower.deliver(2, batch(&[4, 5, 6]), None).await;
        assert!(matches!(outcome, Poll::Again));
        assert_eq!(follower.handout.last(), 6);
        // Expired seqs are skipped up to the floor, and only up to it.
        let outcome = follower.deliver(2, batch_above(&[9, 10], 9), None).await;
        assert!(matches!(outcome, Poll::Again));
        assert_eq!(follower.handout.last(), 10);
        let outcome = follower.deliver(2, batch_above(&[13], 12), None).await;
        assert!(matches!(outcome, Poll::NodeFailed(reason) if reason == "seq gap"));
        assert_eq!(follower.handout.last(), 10);
        assert_eq!(drain(&mut rx), vec![5, 6, 9, 10]);
    }

    #[tokio::test]
    async fn deliver_waits_for_room_in_a_full_channel() {
        let (mut follower, mut rx) = follower(0, 2);
        let seqs: Vec<u64> = (1..=200).collect();
        let delivering = tokio::spawn(async move {
            let outcome = follower.deliver(1, batch(&seqs), None).await;
            (matches!(outcome, Poll::Again), follower.handout.last())
        });
        let mut got = Vec::new();
        while got.len() < 200 {
            got.push(rx.recv().await.expect("open").expect("ok").seq);
        }
        assert_eq!(got, (1..=200).collect::<Vec<_>>());
        assert_eq!(delivering.await.unwrap(), (true, 200));
    }

    #[tokio::test]
    async fn a_connection_hands_out_itself_while_nothing_waits_and_there_is_room() {
        let (follower, mut rx) = follower(0, 2);
        let handout = follower.handout.clone();
        let attempt = handout.begin();
        // Room for all: handed out here, nothing for the poll loop.
        assert!(handout.offer(1, attempt, batch(&[1, 2])).is_none());
        assert_eq!(drain(&mut rx), vec![1, 2]);
        // Duplicates are skipped here too.
        assert!(handout.offer(1, attempt, batch(&[2, 3])).is_none());
        assert_eq!(drain(&mut rx), vec![3]);
        // Room for two of five: two go out, the rest waits for the poll loop...
        let rest = handout
            .offer(1, attempt, batch(&[4, 5, 6, 7, 8]))
            .expect("rest");
        assert_eq!(seqs(&rest), vec![6, 7, 8]);
        assert_eq!(handout.last(), 5);
        // ...and while it waits, later batches wait behind it, even with room.
        assert_eq!(drain(&mut rx), vec![4, 5]);
        let later = handout.offer(1, attempt, batch(&[9])).expect("queued");
        assert_eq!(seqs(&later), vec![9]);
        assert!(rx.try_recv().is_err());
        // The poll loop hands both out in order, waiting for room; then the connection hands
        // out again.
        let mut follower = follower;
        let reading = tokio::spawn(async move {
            let mut got = Vec::new();
            while got.len() < 4 {
                got.push(rx.recv().await.expect("open").expect("ok").seq);
            }
            (got, rx)
        });
        let outcome = follower.deliver(1, rest, Some(attempt)).await;
        assert!(matches!(outcome, Poll::Again));
        let outcome = follower.deliver(1, later, Some(attempt)).await;
        assert!(matches!(outcome, Poll::Again));
        let (got, mut rx) = reading.await.unwrap();
        assert_eq!(got, vec![6, 7, 8, 9]);
        assert!(handout.offer(1, attempt, batch(&[10])).is_none());
        assert_eq!(drain(&mut rx), vec![10]);
    }

    #[tokio::test]
    async fn a_connection_passes_gaps_on_and_is_silent_for_an_old_attempt() {
        let (follower, mut rx) = follower(0, 16);
        let handout = follower.handout.clone();
        let old = handout.begin();
        // At a gap, what is before it goes out and the rest goes to the poll loop, which moves.
        let rest = handout.offer(1, old, batch(&[1, 2, 4, 5])).expect("gap");
        assert_eq!(seqs(&rest), vec![4, 5]);
        assert_eq!(drain(&mut rx), vec![1, 2]);
        let mut follower = follower;
        let outcome = follower.deliver(1, rest, Some(old)).await;
        assert!(matches!(outcome, Poll::NodeFailed(reason) if reason == "seq gap"));
        // After the move a connection of the old attempt hands out nothing.
        let new = handout.begin();
        let stale = handout.offer(1, old, batch(&[3])).expect("stale");
        assert_eq!(seqs(&stale), vec![3]);
        assert!(rx.try_recv().is_err());
        assert!(handout.offer(2, new, batch(&[3, 4])).is_none());
        assert_eq!(drain(&mut rx), vec![3, 4]);
        // An expired range up to the floor is no gap.
        assert!(handout.offer(2, new, batch_above(&[8], 8)).is_none());
        assert_eq!(drain(&mut rx), vec![8]);
    }
}
