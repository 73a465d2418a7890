//! `Delivery`: wakes long-poll streams and push subscriptions when the state machine applies new messages.
//!
//! chat-sm calls its apply listener synchronously after each applied batch with the applied
//! index and the new head of every channel the batch touched. `Delivery` turns that into two
//! kinds of tokio `watch` channels: one for the applied index (read tokens wait on it) and one
//! per channel that has at least one waiting stream (so an apply wakes only the streams of the
//! channels it touched, never every stream on the node).
//!
//! Step 7 of "Life of a chat message" in ARCHITECTURE.md.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chat_sm::AppliedEvent;
use parking_lot::Mutex;
use tokio::sync::watch;

/// Applied-position notifications for one node. Cheap to clone.
#[derive(Clone)]
pub struct Delivery {
    inner: Arc<Inner>,
}

struct Inner {
    applied: watch::Sender<u64>,
    /// Channel name -> its head. Entries are created by the first waiter and removed when the
    /// last receiver is gone (checked on each apply that touches the channel).
    heads: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl Delivery {
    /// A notifier starting at `applied_index`.
    pub fn new(applied_index: u64) -> Delivery {
        Delivery {
            inner: Arc::new(Inner {
                applied: watch::Sender::new(applied_index),
                heads: Mutex::new(HashMap::new()),
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
            let mut heads = self.inner.heads.lock();
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

    /// A receiver of `channel`'s head, bumped by every apply that touches the channel while
    /// the receiver lives. Its value starts at 0 (or a stale head): read the real head from
    /// the state machine after subscribing, then wait for changes (push subscriptions do).
    pub fn head_receiver(&self, channel: &str) -> watch::Receiver<u64> {
        let mut heads = self.inner.heads.lock();
        heads
            .entry(channel.to_owned())
            .or_insert_with(|| watch::Sender::new(0))
            .subscribe()
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
        if current_head() > after_seq {
            return true;
        }
        let moved = tokio::time::timeout(timeout, rx.wait_for(|head| *head > after_seq)).await;
        matches!(moved, Ok(Ok(_)))
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
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_stream_wakes_on_its_channel_only() {
        let delivery = Delivery::new(0);
        let listener = delivery.listener();
        let d = delivery.clone();
        let general = tokio::spawn(async move {
            d.wait_head("general", 0, || 0, Duration::from_secs(5))
                .await
        });
        let d = delivery.clone();
        let random =
            tokio::spawn(
                async move { d.wait_head("random", 0, || 0, Duration::from_secs(5)).await },
            );
        tokio::task::yield_now().await;
        listener(&event(7, &[("general", 1)]));
        assert!(general.await.unwrap());
        // "random" saw nothing and times out (virtual time).
        assert!(!random.await.unwrap());
        assert_eq!(delivery.applied(), 7);
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
