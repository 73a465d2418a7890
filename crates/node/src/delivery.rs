//! `Delivery`: wakes long-poll streams and push subscriptions when the state machine applies new messages.
//!
//! chat-sm calls its apply listener synchronously after each applied batch with the applied
//! index and the new head of every channel the batch touched. `Delivery` turns that into two
//! kinds of tokio `watch` channels: one for the applied index (read tokens wait on it) and one
//! per channel that has at least one waiting stream (so an apply wakes only the streams of the
//! channels it touched, never every stream on the node).
//!
//! Waiters name channels that may never be written again, so the per-channel map is bounded:
//! entries without receivers are swept as new channels are added, and past
//! [`HEAD_CHANNELS_MAX`] channels a new waiter is woken by every apply instead.
//!
//! Step 7 of "Life of a chat message" in ARCHITECTURE.md.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chat_sm::AppliedEvent;
use parking_lot::Mutex;
use tokio::sync::watch;

/// Most channels with a head sender of their own (a few hundred bytes each). Live
/// entries are bounded by the open waits (client connections times the requests or
/// subscriptions each may hold), which can be far more; past this, waiters are woken by every
/// apply and re-read their head, which costs wakeups but never a missed message.
pub const HEAD_CHANNELS_MAX: usize = 100_000;

/// Sweep the head senders at least after this many new channels, so small maps are not swept
/// on every add.
const HEADS_SWEEP_MIN: usize = 1024;

/// Applied-position notifications for one node. Cheap to clone.
#[derive(Clone)]
pub struct Delivery {
    inner: Arc<Inner>,
}

struct Inner {
    applied: watch::Sender<u64>,
    heads: Mutex<Heads>,
    /// Cap on `heads.senders`; [`HEAD_CHANNELS_MAX`] but in tests.
    channels_max: usize,
}

/// The per-channel head senders.
///
/// Invariants: `senders.len() <= channels_max`; `senders.len()` is at most the live entries
/// at the last sweep plus `added`, and a sweep runs when `added` reaches `sweep_after`, so
/// entries without receivers never outnumber `max(live, HEADS_SWEEP_MIN)`.
#[derive(Default)]
struct Heads {
    /// Channel name -> its head. Entries are created by the first waiter and removed when the
    /// last receiver is gone: checked on each apply that touches the channel, and for every
    /// channel by a sweep.
    senders: HashMap<String, watch::Sender<u64>>,
    /// New channels asked for since the last sweep.
    added: usize,
    /// Sweep when `added` reaches this: the entries left by the last sweep, at least
    /// [`HEADS_SWEEP_MIN`], so a sweep's O(n) is paid once per n new channels.
    sweep_after: usize,
}

impl Heads {
    fn sweep(&mut self) {
        self.senders.retain(|_, tx| tx.receiver_count() > 0);
        self.added = 0;
        self.sweep_after = self.senders.len().max(HEADS_SWEEP_MIN);
    }
}

impl Delivery {
    /// A notifier starting at `applied_index`.
    pub fn new(applied_index: u64) -> Delivery {
        Delivery::with_channels_max(applied_index, HEAD_CHANNELS_MAX)
    }

    fn with_channels_max(applied_index: u64, channels_max: usize) -> Delivery {
        Delivery {
            inner: Arc::new(Inner {
                applied: watch::Sender::new(applied_index),
                heads: Mutex::new(Heads {
                    sweep_after: HEADS_SWEEP_MIN,
                    ..Heads::default()
                }),
                channels_max,
            }),
        }
    }

    /// The listener to install with `ChatState::set_apply_listener`.
    pub fn listener(&self) -> Box<dyn Fn(&AppliedEvent) + Send + Sync> {
        let delivery = self.clone();
        Box::new(move |event| delivery.on_applied(event))
    }

    fn on_applied(&self, event: &AppliedEvent) {
        {
            let heads = &mut self.inner.heads.lock().senders;
            for (channel, head) in &event.heads {
                if let Some(tx) = heads.get(channel) {
                    if tx.receiver_count() == 0 {
                        heads.remove(channel);
                    } else {
                        tx.send_replace(head.0);
                    }
                }
            }
        }
        self.inner.applied.send_modify(|applied| {
            *applied = (*applied).max(event.index.0);
        });
    }

    /// The highest applied log index seen.
    pub fn applied(&self) -> u64 {
        *self.inner.applied.borrow()
    }

    /// Waits until the applied index is at least `index`, or `timeout` passes.
    /// Returns whether it was reached.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> bool {
        let mut rx = self.inner.applied.subscribe();
        let reached = tokio::time::timeout(timeout, rx.wait_for(|applied| *applied >= index)).await;
        matches!(reached, Ok(Ok(_)))
    }

    /// A receiver bumped by every apply that touches `channel` while the receiver lives, or,
    /// when [`HEAD_CHANNELS_MAX`] channels have receivers already, by every apply. Its value
    /// is no head to rely on: read the real head from the state machine after subscribing,
    /// then again after each change (push subscriptions and [`Delivery::wait_head`] do).
    pub fn head_receiver(&self, channel: &str) -> watch::Receiver<u64> {
        let mut heads = self.inner.heads.lock();
        if let Some(tx) = heads.senders.get(channel) {
            return tx.subscribe();
        }
        heads.added += 1;
        if heads.added >= heads.sweep_after {
            heads.sweep();
        }
        if heads.senders.len() >= self.inner.channels_max {
            return self.inner.applied.subscribe();
        }
        let tx = watch::Sender::new(0);
        let rx = tx.subscribe();
        heads.senders.insert(channel.to_owned(), tx);
        rx
    }

    /// Waits until `channel`'s head passes `after_seq`, or `timeout` passes. `current_head`
    /// is the head the caller just read from the state machine, checked after subscribing so a
    /// message applied between the read and the subscription is not missed.
    /// Returns whether the head moved past `after_seq`.
    pub async fn wait_head(
        &self,
        channel: &str,
        after_seq: u64,
        current_head: impl Fn() -> u64,
        timeout: Duration,
    ) -> bool {
        let mut rx = self.head_receiver(channel);
        let moved = async {
            loop {
                // Mark the value seen before reading the head, so an apply in between is
                // either in the head read or wakes `changed` below.
                rx.borrow_and_update();
                if current_head() > after_seq {
                    return true;
                }
                if rx.changed().await.is_err() {
                    return false;
                }
            }
        };
        tokio::time::timeout(timeout, moved).await.unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_sm::{ChannelSeq, LogIndex};

    fn event(index: u64, heads: &[(&str, u64)]) -> AppliedEvent {
        AppliedEvent {
            index: LogIndex(index),
            heads: heads
                .iter()
                .map(|(c, h)| ((*c).to_owned(), ChannelSeq(*h)))
                .collect(),
            join_secret_changed: false,
            markers: Vec::new(),
            added: Vec::new(),
            snapshot: false,
        }
    }

    use std::sync::atomic::{AtomicU64, Ordering};

    /// A head the test moves, as the state machine's would be before its listener runs, and
    /// how often a waiter read it.
    #[derive(Default)]
    struct Head {
        value: AtomicU64,
        reads: AtomicU64,
    }

    impl Head {
        fn reader(self: &Arc<Self>) -> impl Fn() -> u64 + Send + 'static {
            let head = self.clone();
            move || {
                head.reads.fetch_add(1, Ordering::Relaxed);
                head.value.load(Ordering::Relaxed)
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_stream_wakes_on_its_channel_only() {
        let delivery = Delivery::new(0);
        let listener = delivery.listener();
        let (general_head, random_head) = (Arc::new(Head::default()), Arc::new(Head::default()));
        let (d, head) = (delivery.clone(), general_head.reader());
        let general = tokio::spawn(async move {
            d.wait_head("general", 0, head, Duration::from_secs(5))
                .await
        });
        let (d, head) = (delivery.clone(), random_head.reader());
        let random =
            tokio::spawn(
                async move { d.wait_head("random", 0, head, Duration::from_secs(5)).await },
            );
        tokio::task::yield_now().await;
        general_head.value.store(1, Ordering::Relaxed);
        listener(&event(7, &[("general", 1)]));
        assert!(general.await.unwrap());
        // "random" saw nothing, never woke to read its head again, and times out (virtual
        // time).
        assert!(!random.await.unwrap());
        assert_eq!(random_head.reads.load(Ordering::Relaxed), 1);
        assert_eq!(delivery.applied(), 7);
    }

    fn sender_count(delivery: &Delivery) -> usize {
        delivery.inner.heads.lock().senders.len()
    }

    #[test]
    fn waiters_on_channels_never_written_are_swept() {
        let delivery = Delivery::new(0);
        for i in 0..10_000 {
            drop(delivery.head_receiver(&format!("gone-{i}")));
        }
        assert!(sender_count(&delivery) <= HEADS_SWEEP_MIN);
        let held: Vec<_> = (0..3000)
            .map(|i| delivery.head_receiver(&format!("held-{i}")))
            .collect();
        for i in 0..10_000 {
            drop(delivery.head_receiver(&format!("gone-again-{i}")));
            assert!(sender_count(&delivery) <= 2 * held.len() + HEADS_SWEEP_MIN);
        }
        let heads = delivery.inner.heads.lock();
        assert!((0..3000).all(|i| heads.senders.contains_key(&format!("held-{i}"))));
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_cap_a_waiter_is_woken_by_every_apply() {
        let delivery = Delivery::with_channels_max(0, 2);
        let listener = delivery.listener();
        let _held = [delivery.head_receiver("a"), delivery.head_receiver("b")];
        let head = Arc::new(Head::default());
        let (d, reader) = (delivery.clone(), head.reader());
        let waiter =
            tokio::spawn(async move { d.wait_head("c", 0, reader, Duration::from_secs(5)).await });
        tokio::task::yield_now().await;
        assert_eq!(sender_count(&delivery), 2, "no sender for c past the cap");
        // An apply elsewhere wakes it; its head has not moved, so it waits on.
        listener(&event(1, &[("x", 5)]));
        tokio::task::yield_now().await;
        assert_eq!(head.reads.load(Ordering::Relaxed), 2);
        assert!(!waiter.is_finished());
        head.value.store(1, Ordering::Relaxed);
        listener(&event(2, &[("c", 1)]));
        assert!(waiter.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn wait_applied_returns_at_once_when_reached_and_times_out_otherwise() {
        let delivery = Delivery::new(5);
        assert!(delivery.wait_applied(5, Duration::from_secs(1)).await);
        assert!(!delivery.wait_applied(6, Duration::from_secs(1)).await);
        let listener = delivery.listener();
        let d = delivery.clone();
        let waiter = tokio::spawn(async move { d.wait_applied(9, Duration::from_secs(5)).await });
        tokio::task::yield_now().await;
        listener(&event(9, &[]));
        assert!(waiter.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_already_past_returns_without_waiting() {
        let delivery = Delivery::new(0);
        assert!(
            delivery
                .wait_head("general", 3, || 4, Duration::from_secs(5))
                .await
        );
    }
}
