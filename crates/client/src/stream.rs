//! [`Subscription`]: the messages of one channel in seq order, pushed by the nearest node over
//! a push connection (`push.rs`; long polls with `Chat::stream` on nodes without push), moving
//! to the next nearest node when its node fails, and resuming right after the last seq it
//! delivered.

use std::sync::Arc;
use std::time::Duration;

use proto::{ApiError, StreamRequest, WireMessage};
use tokio::sync::mpsc;

use crate::client::{backoff, Client, Failure, Inner};
use crate::error::Error;
use crate::push::{DialError, SubEvent};

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

impl Client {
    /// Streams `channel`'s messages with seq greater than `after_seq` (0 for all), from the
    /// nearest healthy node; see [`Subscription`] for the guarantees.
    pub fn subscribe(&self, channel: &str, after_seq: u64) -> Subscription {
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_CAPACITY);
        tokio::spawn(poll_loop(
            self.inner.clone(),
            channel.to_owned(),
            after_seq,
            tx,
        ));
        Subscription {
            channel: channel.to_owned(),
            rx,
        }
    }
}

/// What one poll gave.
enum Poll {
    /// Messages (maybe none) and the node's applied index.
    Batch(Vec<WireMessage>, u64),
    /// The node failed or fell behind; try another.
    NodeFailed(String),
    /// Wait, then poll again.
    Wait(Duration),
    /// The channel cannot be read at all.
    Fatal(ApiError),
    /// Reads moved to another node; poll there.
    Moved,
    /// The node does not speak push; long-poll it.
    Unsupported,
    /// The subscriber went away.
    Closed,
}

async fn poll_loop(
    inner: Arc<Inner>,
    channel: String,
    after_seq: u64,
    tx: mpsc::Sender<Result<WireMessage, Error>>,
) {
    let mut last = after_seq;
    let mut failures = 0u32;
    loop {
        if tx.is_closed() {
            return;
        }
        let Some(node) = inner.pick_reader() else {
            failures += 1;
            tokio::time::sleep(backoff(failures)).await;
            continue;
        };
        let outcome = if inner.push.supports(node) {
            push_once(&inner, node, &channel, &mut last, &mut failures, &tx).await
        } else {
            poll_once(&inner, node, &channel, last, &tx).await
        };
        match outcome {
            Poll::Batch(messages, applied) => {
                failures = 0;
                inner.observe(applied);
                match deliver(&tx, &mut last, messages).await {
                    Delivered::Ok => {}
                    Delivered::Gap { expected, found } => {
                        tracing::warn!(node, %channel, expected, found, "seq gap from node, moving");
                        inner.mark_down(node, "seq gap");
                    }
                    Delivered::Closed => return,
                }
            }
            Poll::NodeFailed(reason) => {
                failures += 1;
                tracing::info!(node, %channel, after_seq = last, %reason, "stream node failed, moving");
                inner.mark_down(node, &reason);
                if failures > 1 {
                    tokio::time::sleep(backoff(failures)).await;
                }
            }
            Poll::Wait(wait) => tokio::time::sleep(wait).await,
            Poll::Moved | Poll::Unsupported => {}
            Poll::Fatal(e) => {
                // The subscriber may be gone already; the loop ends either way.
                let _ = tx.send(Err(Error::Api(e))).await;
                return;
            }
            Poll::Closed => return,
        }
    }
}

enum Delivered {
    Ok,
    Gap { expected: u64, found: u64 },
    Closed,
}

/// Hands out the messages after `last` in order, skipping any already delivered, and stops at
/// a gap without handing out anything past it.
async fn deliver(
    tx: &mpsc::Sender<Result<WireMessage, Error>>,
    last: &mut u64,
    messages: Vec<WireMessage>,
) -> Delivered {
    for message in messages {
        if message.seq <= *last {
            continue;
        }
        if message.seq != *last + 1 {
            return Delivered::Gap {
                expected: *last + 1,
                found: message.seq,
            };
        }
        let seq = message.seq;
        if tx.send(Ok(message)).await.is_err() {
            return Delivered::Closed;
        }
        assert_eq!(seq, *last + 1, "subscriptions hand out dense seqs");
        *last = seq;
    }
    Delivered::Ok
}

/// One long poll on `node`, abandoned early when the node is marked down (a failed ping) or
/// the subscriber goes away.
async fn poll_once(
    inner: &Inner,
    node: u64,
    channel: &str,
    last: u64,
    tx: &mpsc::Sender<Result<WireMessage, Error>>,
) -> Poll {
    let _polling = inner.poll_guard();
    let conn = match inner.read_conn(node).await {
        Ok(conn) => conn,
        Err(Failure::Api(e)) => return classify(e),
        Err(Failure::Transport(reason)) => return Poll::NodeFailed(reason),
    };
    let wait = inner.config.stream_wait;
    let request = StreamRequest {
        channel: channel.to_owned(),
        after_seq: last,
        max: POLL_MESSAGES_MAX,
        wait_ms: u32::try_from(wait.as_millis()).unwrap_or(proto::STREAM_WAIT_MS_MAX),
        read_token: inner.token(),
    };
    let mut route_rx = inner.route_tx.subscribe();
    let call = conn.stream(proto::deadline_for(wait), request);
    tokio::pin!(call);
    loop {
        tokio::select! {
            outcome = &mut call => {
                return match outcome {
                    Ok(Ok(batch)) => Poll::Batch(batch.messages, batch.applied),
                    Ok(Err(e)) => classify(e),
                    Err(e) => Poll::NodeFailed(format!("stream: {e}")),
                };
            }
            changed = route_rx.changed() => {
                // Nothing of this poll was handed out; the next poll resumes after `last`.
                if let Some(outcome) = route_change(inner, node, changed.is_ok()) {
                    return outcome;
                }
            }
            () = tx.closed() => return Poll::Closed,
        }
    }
}

/// One push subscription on `node`, handing out batches as they come, until the node fails,
/// reads move, or the subscriber goes away. `last` follows every message handed out, so the
/// next attempt (here or on another node) resumes right after it.
async fn push_once(
    inner: &Inner,
    node: u64,
    channel: &str,
    last: &mut u64,
    failures: &mut u32,
    tx: &mpsc::Sender<Result<WireMessage, Error>>,
) -> Poll {
    let mut route_rx = inner.route_tx.subscribe();
    let conn = match inner.push.get(inner, node).await {
        Ok(conn) => conn,
        Err(DialError::Unsupported) => return Poll::Unsupported,
        Err(DialError::Failed(Failure::Api(e))) => return classify(e),
        Err(DialError::Failed(Failure::Transport(reason))) => return Poll::NodeFailed(reason),
    };
    let Some(mut sub) = conn.subscribe(channel, *last, inner.token()) else {
        inner.push.forget(node);
        return Poll::NodeFailed("push connection closed".into());
    };
    loop {
        tokio::select! {
            event = sub.events.recv() => match event {
                Some(SubEvent::Batch(batch)) => {
                    *failures = 0;
                    inner.observe(batch.applied);
                    match deliver(tx, last, batch.messages).await {
                        Delivered::Ok => {}
                        Delivered::Gap { expected, found } => {
                            tracing::warn!(node, %channel, expected, found, "seq gap from node, moving");
                            inner.mark_down(node, "seq gap");
                            return Poll::Moved;
                        }
                        Delivered::Closed => return Poll::Closed,
                    }
                }
                Some(SubEvent::Error(e)) => return classify(e),
                None => {
                    inner.push.forget(node);
                    return Poll::NodeFailed("push connection lost".into());
                }
            },
            changed = route_rx.changed() => {
                // Dropping `sub` unsubscribes; the next attempt resumes after `last`.
                if let Some(outcome) = route_change(inner, node, changed.is_ok()) {
                    return outcome;
                }
            }
            () = tx.closed() => return Poll::Closed,
        }
    }
}

/// What a change of routes means for a stream on `node`: stop if the node was marked down
/// (or the client is gone), move if reads went elsewhere, else keep going (`None`).
fn route_change(inner: &Inner, node: u64, still_routing: bool) -> Option<Poll> {
    if !still_routing || inner.is_down(node) {
        return Some(Poll::NodeFailed("node marked down".into()));
    }
    (inner.current_reader() != Some(node)).then_some(Poll::Moved)
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
            client_id: [0; 16],
            client_seq: seq,
        }
    }

    #[tokio::test]
    async fn deliver_skips_duplicates_and_stops_at_gaps() {
        let (tx, mut rx) = mpsc::channel(16);
        let mut last = 2;
        let batch = vec![message(1), message(2), message(3), message(4), message(6)];
        let outcome = deliver(&tx, &mut last, batch).await;
        assert!(matches!(
            outcome,
            Delivered::Gap {
                expected: 5,
                found: 6
            }
        ));
        assert_eq!(last, 4);
        let seqs: Vec<u64> = [rx.recv().await, rx.recv().await]
            .into_iter()
            .map(|m| m.expect("message").expect("ok").seq)
            .collect();
        assert_eq!(seqs, vec![3, 4]);
        assert!(rx.try_recv().is_err());
        // Resuming after a move hands out the rest once.
        let outcome = deliver(&tx, &mut last, vec![message(4), message(5), message(6)]).await;
        assert!(matches!(outcome, Delivered::Ok));
        assert_eq!(last, 6);
    }
}
