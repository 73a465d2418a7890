//! Read markers, moved in the background: both interactive modes note the newest seq their
//! user has seen in each channel, and one task sends what changed at most once per
//! [`MARK_EVERY`], so reading a busy channel costs one small write a second, not one per
//! message. The cluster keeps the highest marker, so marks from several clients of one user
//! never move it back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellchat_client::Client;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::actions::lock;

/// Most often one channel's marker is sent.
pub const MARK_EVERY: Duration = Duration::from_secs(1);

/// Longest wait at exit for the last marks to be written.
pub const MARK_DRAIN_MAX: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Pending {
    /// Newest seq seen per channel, not yet sent.
    seen: HashMap<String, u64>,
    /// The marker as last sent or heard from the cluster, per channel.
    sent: HashMap<String, u64>,
    closed: bool,
}

/// Notes what was read; cheap to clone.
#[derive(Clone)]
pub struct Marks {
    pending: Arc<Mutex<Pending>>,
    wake: Arc<Notify>,
}

impl Marks {
    /// Starts the task that sends marks through `client`; it ends after [`Marks::close`].
    pub fn start(client: Client) -> (Marks, JoinHandle<()>) {
        let marks = Marks {
            pending: Arc::default(),
            wake: Arc::default(),
        };
        let task = tokio::spawn(marks.clone().run(client));
        (marks, task)
    }

    /// The user has seen `channel` up to `seq`.
    pub fn seen(&self, channel: &str, seq: u64) {
        let mut pending = lock(&self.pending);
        if pending.sent.get(channel).is_some_and(|&s| s >= seq) {
            return;
        }
        let at = pending.seen.entry(channel.to_owned()).or_default();
        *at = (*at).max(seq);
    }

    /// The cluster holds `seq` as the marker of `channel` (another client may have moved it):
    /// nothing at or below it needs sending.
    pub fn known(&self, channel: &str, seq: u64) {
        let mut pending = lock(&self.pending);
        let sent = pending.sent.entry(channel.to_owned()).or_default();
        *sent = (*sent).max(seq);
        if pending.seen.get(channel).is_some_and(|&s| s <= seq) {
            pending.seen.remove(channel);
        }
    }

    /// Sends what is pending and stops the task.
    pub fn close(&self) {
        lock(&self.pending).closed = true;
        self.wake.notify_one();
    }

    async fn run(self, client: Client) {
        loop {
            let closed = tokio::select! {
                () = tokio::time::sleep(MARK_EVERY) => false,
                () = self.wake.notified() => true,
            };
            let due: Vec<(String, u64)> = {
                let mut pending = lock(&self.pending);
                let due: Vec<(String, u64)> = pending.seen.drain().collect();
                for (channel, seq) in &due {
                    pending.sent.insert(channel.clone(), *seq);
                }
                due
            };
            let (client, this) = (&client, &self);
            let sends = due.iter().map(|(channel, seq)| async move {
                match client.mark_read(channel, *seq).await {
                    Ok(read_to) => this.known(channel, read_to),
                    // A marker left behind only shows a message as unread again.
                    Err(e) => {
                        tracing::warn!(%channel, seq = *seq, error = %e, "read marker not moved");
                    }
                }
            });
            futures::future::join_all(sends).await;
            if closed || lock(&self.pending).closed {
                return;
            }
        }
    }
}
