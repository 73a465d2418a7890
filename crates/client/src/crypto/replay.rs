//! [`ReplayGuard`]: spots a send shown twice in a channel, in bounded memory.

use std::collections::{HashMap, VecDeque};

use super::body::{Author, Opened, SESSION_LEN};

/// What a [`ReplayGuard`] says of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The first time this send is seen (in the guard's window).
    First,
    /// The same send at the same channel seq again: history read twice, not a replay.
    Again,
    /// The same (sender, session, client seq) at another channel seq: a server replayed it.
    /// `first_seq` is where it was seen first.
    Replayed {
        /// The channel seq it was first seen at.
        first_seq: u64,
    },
    /// Not tracked: no session (v1 formats, malformed bodies) or a bad signature (a forged
    /// copy must not make the genuine message look replayed).
    Untracked,
}

impl Seen {
    /// [`Marker::Replayed`](super::Marker::Replayed) for a replay, else nothing.
    pub fn marker(self) -> Option<super::Marker> {
        match self {
            Seen::Replayed { .. } => Some(super::Marker::Replayed),
            _ => None,
        }
    }
}

/// One send: who, which client session, which client seq.
type SendKey = (String, [u8; SESSION_LEN], u64);

/// The sends seen in one channel, oldest first.
#[derive(Debug, Default)]
struct Window {
    seqs: HashMap<SendKey, u64>,
    order: VecDeque<SendKey>,
    used_tick: u64,
}

/// Remembers which sends (sender, session tag, client seq) a reader has seen at which channel
/// seq, per channel, and reports a send that comes back at another channel seq.
///
/// Invariants:
/// - at most `messages_per_channel` sends are kept per channel, the oldest dropped first, so a
///   replay of a send older than the window is not caught;
/// - at most `channels_max` channels are kept, the least recently checked dropped first;
/// - only sends whose signature verified, or whose sender has no known key, are recorded.
#[derive(Debug)]
pub struct ReplayGuard {
    channels: HashMap<String, Window>,
    messages_per_channel: usize,
    channels_max: usize,
    tick: u64,
}

impl Default for ReplayGuard {
    fn default() -> Self {
        ReplayGuard::new(
            ReplayGuard::MESSAGES_PER_CHANNEL_DEFAULT,
            ReplayGuard::CHANNELS_DEFAULT,
        )
    }
}

impl ReplayGuard {
    /// Default sends remembered per channel (4096, about 300 KiB per channel at most).
    pub const MESSAGES_PER_CHANNEL_DEFAULT: usize = 4096;
    /// Default channels remembered (64).
    pub const CHANNELS_DEFAULT: usize = 64;

    /// A guard keeping `messages_per_channel` sends for each of at most `channels_max`
    /// channels (each at least 1).
    pub fn new(messages_per_channel: usize, channels_max: usize) -> ReplayGuard {
        ReplayGuard {
            channels: HashMap::new(),
            messages_per_channel: messages_per_channel.max(1),
            channels_max: channels_max.max(1),
            tick: 0,
        }
    }

    /// Records the message at `channel_seq` of `channel` from `sender` with `client_seq`, as
    /// [`open_message`](super::open_message) returned it, and says whether it was seen before.
    pub fn check(
        &mut self,
        channel: &str,
        channel_seq: u64,
        sender: &str,
        client_seq: u64,
        opened: &Opened,
    ) -> Seen {
        let Some(session) = opened.session() else {
            return Seen::Untracked;
        };
        if opened.author() == Author::BadSignature {
            return Seen::Untracked;
        }
        self.tick += 1;
        if !self.channels.contains_key(channel) {
            self.evict_channel_if_full();
        }
        let messages_max = self.messages_per_channel;
        let window = self.channels.entry(channel.to_owned()).or_default();
        window.used_tick = self.tick;
        let key = (sender.to_owned(), session, client_seq);
        if let Some(&first_seq) = window.seqs.get(&key) {
            return if first_seq == channel_seq {
                Seen::Again
            } else {
                Seen::Replayed { first_seq }
            };
        }
        if window.order.len() >= messages_max {
            if let Some(oldest) = window.order.pop_front() {
                window.seqs.remove(&oldest);
            }
        }
        window.seqs.insert(key.clone(), channel_seq);
        window.order.push_back(key);
        Seen::First
    }

    #[cfg(test)]
    pub(crate) fn channel_count(&self) -> usize {
        self.channels.len()
    }

    fn evict_channel_if_full(&mut self) {
        if self.channels.len() < self.channels_max {
            return;
        }
        let oldest = self
            .channels
            .iter()
            .min_by_key(|(_, w)| w.used_tick)
            .map(|(name, _)| name.clone());
        if let Some(name) = oldest {
            self.channels.remove(&name);
        }
    }
}
