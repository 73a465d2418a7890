//! [`Handout`]: where a subscription's messages are checked and handed to the application,
//! by the subscription's poll loop (`stream.rs`) or by the push connection it reads from
//! (`push.rs`), so a pushed message reaches the application without waking the poll loop.

use std::sync::Arc;

use parking_lot::Mutex;
use proto::{MessageBatch, WireMessage};
use tokio::sync::mpsc;

use crate::error::Error;
use crate::routing::Routes;

/// Where one subscription's messages are checked and handed to the application, by its poll
/// loop or by the push connection it reads from.
///
/// Invariants (every hand-out runs under `state`'s lock, whoever makes it):
/// - seqs are dense: each message's seq is one more than `last`, or at most the batch's floor
///   (the seqs between expired under the channel's retention);
/// - no seq is handed out twice: one at or below `last` is skipped;
/// - a push connection hands out only for the poll loop's current attempt, and only while no
///   batch it passed to the poll loop waits there, so messages keep the node's order.
pub(crate) struct Handout {
    channel: String,
    pub(crate) routes: Arc<Routes>,
    pub(crate) tx: mpsc::Sender<Result<WireMessage, Error>>,
    state: Mutex<HandoutState>,
}

struct HandoutState {
    /// The last seq handed out.
    last: u64,
    /// The poll loop's current attempt on a node.
    attempt: u64,
    /// Batches of `attempt` passed to the poll loop and not yet handed out.
    queued: usize,
}

/// How far handing out a batch got.
pub(crate) enum Step {
    /// Every message is handed out, or was before.
    Done,
    /// No room for the next message.
    Full,
    /// The next message is past a gap; nothing from it on was handed out.
    Gap { expected: u64, found: u64 },
    /// The subscriber went away.
    Closed,
}

/// Room for one message in the subscriber's channel, or why there is none.
pub(crate) enum Room<'a> {
    Slot(mpsc::Permit<'a, Result<WireMessage, Error>>),
    Full,
    Closed,
}

impl Handout {
    pub(crate) fn new(
        channel: &str,
        after_seq: u64,
        routes: Arc<Routes>,
        tx: mpsc::Sender<Result<WireMessage, Error>>,
    ) -> Self {
        Self {
            channel: channel.to_owned(),
            routes,
            tx,
            state: Mutex::new(HandoutState {
                last: after_seq,
                attempt: 0,
                queued: 0,
            }),
        }
    }

    /// The last seq handed out.
    pub(crate) fn last(&self) -> u64 {
        self.state.lock().last
    }

    /// Starts the poll loop's next attempt on a node and returns its id: connections
    /// subscribed for earlier attempts stop handing out.
    pub(crate) fn begin(&self) -> u64 {
        let mut state = self.state.lock();
        state.attempt += 1;
        state.queued = 0;
        state.attempt
    }

    /// The poll loop has handed out a batch a push connection passed it for `attempt`.
    pub(crate) fn passed_batch_done(&self, attempt: u64) {
        let mut state = self.state.lock();
        if state.attempt == attempt {
            state.queued = state.queued.saturating_sub(1);
        }
    }

    /// A batch a push connection received for `attempt`: handed out here if nothing waits
    /// before it and the subscriber has room, else what is left of it goes to the poll loop
    /// (returned, and counted there when it is the current attempt's).
    pub(crate) fn offer(
        &self,
        node: u64,
        attempt: u64,
        mut batch: MessageBatch,
    ) -> Option<MessageBatch> {
        let mut state = self.state.lock();
        if state.attempt != attempt {
            return Some(batch);
        }
        if state.queued == 0 {
            self.routes.observe(batch.applied);
            let step = self.hand_out_locked(&mut state, node, &mut batch, || {
                match self.tx.try_reserve() {
                    Ok(permit) => Room::Slot(permit),
                    Err(mpsc::error::TrySendError::Full(())) => Room::Full,
                    Err(mpsc::error::TrySendError::Closed(())) => Room::Closed,
                }
            });
            // A closed subscriber's poll loop ends on its own.
            if matches!(step, Step::Done | Step::Closed) {
                return None;
            }
        }
        state.queued += 1;
        Some(batch)
    }

    /// Hands out the messages of `batch` in order, each through room from `room`, and removes
    /// what it handled (handed out or skipped as handed out before) from the batch.
    pub(crate) fn hand_out<'a>(
        &self,
        node: u64,
        batch: &mut MessageBatch,
        room: impl FnMut() -> Room<'a>,
    ) -> Step {
        self.hand_out_locked(&mut self.state.lock(), node, batch, room)
    }

    fn hand_out_locked<'a>(
        &self,
        state: &mut HandoutState,
        node: u64,
        batch: &mut MessageBatch,
        mut room: impl FnMut() -> Room<'a>,
    ) -> Step {
        let mut handled = 0;
        let step = loop {
            let Some(message) = batch.messages.get_mut(handled) else {
                break Step::Done;
            };
            if message.seq <= state.last {
                handled += 1;
                continue;
            }
            let expected = state.last + 1;
            if message.seq != expected && message.seq > batch.floor {
                break Step::Gap {
                    expected,
                    found: message.seq,
                };
            }
            let permit = match room() {
                Room::Slot(permit) => permit,
                Room::Full => break Step::Full,
                Room::Closed => break Step::Closed,
            };
            if message.seq != expected {
                let (channel, from, to) = (&self.channel, expected, message.seq - 1);
                tracing::info!(node, %channel, from, to, "messages expired before delivery");
            }
            state.last = message.seq;
            permit.send(Ok(std::mem::take(message)));
            handled += 1;
        };
        batch.messages.drain(..handled);
        step
    }
}
