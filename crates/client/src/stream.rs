//! [`Subscription`]: the messages of one channel in seq order, pushed by the nearest node over
//! a push connection (`push.rs`; long polls with `Chat::stream` on nodes without push), moving
//! to the next nearest node when its node fails, and resuming right after the last seq it
//! delivered.

use std::sync::Arc;
use std::time::Duration;

use proto::{ApiError, MessageBatch, StreamRequest, WireMessage};
use tokio::sync::mpsc;

use crate::error::Error;
use crate::pool::Pool;
use crate::push::{DialError, PushPool};
use crate::retry::{backoff, jitter, Failure, BACKOFF_MAX};
use crate::routing::Routes;

/// Messages one poll asks for.
const POLL_MESSAGES_MAX: u32 = 500;
/// Capacity of a subscription's channel; the poll loop waits while it is full.
const SUBSCRIPTION_CAPACITY: usize = 1024;

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
            last: after_seq,
            failures: 0,
            tx,
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

/// The poll loop of one subscription. `last` is the last seq handed out, so the next attempt
/// (on this node or another) resumes right after it.
struct Follower {
    s: Streams,
    channel: String,
    last: u64,
    failures: u32,
    tx: mpsc::Sender<Result<WireMessage, Error>>,
}

impl Follower {
    async fn run(mut self) {
        while !self.tx.is_closed() {
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
                    let (channel, after_seq) = (&self.channel, self.last);
                    tracing::info!(node, %channel, after_seq, %reason, "stream node failed, moving");
                    self.s.pool.mark_down(node, &reason);
                    if self.failures > 1 {
                        tokio::time::sleep(backoff(self.failures, BACKOFF_MAX, jitter())).await;
                    }
                }
                Poll::Wait(wait) => tokio::time::sleep(wait).await,
                Poll::Fatal(e) => {
                    // The subscriber may be gone already; the loop ends either way.
                    let _ = self.tx.send(Err(Error::Api(e))).await;
                    return;
                }
                Poll::Closed => return,
            }
        }
    }

    /// Hands out the messages of `batch` after `last` in order, skipping any already handed
    /// out, and stops at a gap without handing out anything past it. A jump to at most the
    /// batch's floor is no gap: the seqs between expired under the channel's retention.
    async fn deliver(&mut self, node: u64, batch: MessageBatch) -> Poll {
        self.failures = 0;
        self.s.routes.observe(batch.applied);
        for message in batch.messages {
            if message.seq <= self.last {
                continue;
            }
            if message.seq != self.last + 1 && message.seq <= batch.floor {
                let (channel, from, to) = (&self.channel, self.last + 1, message.seq - 1);
                tracing::info!(node, %channel, from, to, "messages expired before delivery");
            } else if message.seq != self.last + 1 {
                let (expected, found, channel) = (self.last + 1, message.seq, &self.channel);
                tracing::warn!(node, %channel, expected, found, "seq gap from node, moving");
                return Poll::NodeFailed("seq gap".into());
            }
            let seq = message.seq;
            if self.tx.send(Ok(message)).await.is_err() {
                return Poll::Closed;
            }
            self.last = seq;
        }
        Poll::Again
    }

    /// One long poll on `node`, abandoned early when the node is marked down or reads move
    /// (nothing of it was handed out then).
    async fn poll_once(&mut self, node: u64) -> Poll {
        let pool = self.s.pool.clone();
        let _polling = pool.poll_guard();
        let conn = match pool.read_conn(node).await {
            Ok(conn) => conn,
            Err(failure) => return failed(failure),
        };
        let request = StreamRequest {
            channel: self.channel.clone(),
            after_seq: self.last,
            max: POLL_MESSAGES_MAX,
            wait_ms: u32::try_from(self.s.wait.as_millis()).unwrap_or(proto::STREAM_WAIT_MS_MAX),
            read_token: self.s.routes.token(),
        };
        let (mut reroutes, tx) = (self.s.routes.reroutes(), self.tx.clone());
        let call = conn.stream(proto::deadline_for(self.s.wait), request);
        tokio::pin!(call);
        loop {
            tokio::select! {
                outcome = &mut call => return match outcome {
                    Ok(Ok(batch)) => self.deliver(node, batch).await,
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

    /// One push subscription on `node`, handing out batches as they come, until the node
    /// fails, reads move, or the subscriber goes away (dropping the subscription unsubscribes).
    async fn push_once(&mut self, node: u64) -> Poll {
        let mut reroutes = self.s.routes.reroutes();
        let conn = match self.s.push.get(node).await {
            Ok(conn) => conn,
            Err(DialError::Unsupported) => return Poll::Again,
            Err(DialError::Failed(failure)) => return failed(failure),
        };
        let Some(mut sub) = conn.subscribe(&self.channel, self.last, self.s.routes.token()) else {
            self.s.push.forget(node);
            return Poll::NodeFailed("push connection closed".into());
        };
        // The waits on the subscriber and on the routes live across batches, each made again
        // only when it fires: made per batch, each registers and removes a waiter for every
        // message delivered.
        let tx = self.tx.clone();
        let closed = tx.closed();
        tokio::pin!(closed);
        loop {
            let changed = reroutes.changed();
            tokio::pin!(changed);
            let outcome = loop {
                let outcome = tokio::select! {
                    event = sub.events.recv() => match event {
                        Some(Ok(batch)) => self.deliver(node, batch).await,
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

    #[tokio::test]
    async fn deliver_skips_duplicates_and_stops_at_gaps() {
        let (tx, mut rx) = mpsc::channel(16);
        let routes = Arc::new(Routes::new());
        let config = Arc::new(crate::ClientConfig {
            token: Some(proto::tls::JoinToken::generate(proto::tls::Fingerprint(
                [0; 32],
            ))),
            ..crate::ClientConfig::default()
        });
        let trust = Arc::new(crate::trust::ClusterTrust::for_config(&config).unwrap());
        let mut follower = Follower {
            s: Streams {
                pool: Arc::new(Pool::new(
                    config.clone(),
                    trust.clone(),
                    None,
                    routes.clone(),
                )),
                push: Arc::new(PushPool::new(config, trust, routes.clone(), None)),
                routes,
                wait: Duration::from_secs(1),
            },
            channel: "general".into(),
            last: 2,
            failures: 0,
            tx,
        };
        let outcome = follower.deliver(1, batch(&[1, 2, 3, 4, 6])).await;
        assert!(matches!(outcome, Poll::NodeFailed(reason) if reason == "seq gap"));
        assert_eq!(follower.last, 4);
        let seqs: Vec<u64> = [rx.recv().await, rx.recv().await]
            .into_iter()
            .map(|m| m.expect("message").expect("ok").seq)
            .collect();
        assert_eq!(seqs, vec![3, 4]);
        assert!(rx.try_recv().is_err());
        // Resuming after a move hands out the rest once.
        let outcome = follower.deliver(2, batch(&[4, 5, 6])).await;
        assert!(matches!(outcome, Poll::Again));
        assert_eq!(follower.last, 6);
        // Expired seqs are skipped up to the floor, and only up to it.
        let outcome = follower.deliver(2, batch_above(&[9, 10], 9)).await;
        assert!(matches!(outcome, Poll::Again));
        assert_eq!(follower.last, 10);
        let outcome = follower.deliver(2, batch_above(&[13], 12)).await;
        assert!(matches!(outcome, Poll::NodeFailed(reason) if reason == "seq gap"));
        assert_eq!(follower.last, 10);
        let mut seqs = Vec::new();
        while let Ok(message) = rx.try_recv() {
            seqs.push(message.expect("ok").seq);
        }
        assert_eq!(seqs, vec![5, 6, 9, 10]);
    }
}
