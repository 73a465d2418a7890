//! [`Authors`]: who wrote a message, as far as this client can tell. Senders' registered keys
//! are asked of the cluster, pinned on first sight ([`crate::pins`]), and every signed body is
//! checked under the pinned key, never under what a node says later, so a node that swaps a
//! user's key cannot make its forgeries verify. Replays are spotted by a bounded
//! [`ReplayGuard`].

use std::collections::HashMap;
use std::path::Path;

use parking_lot::Mutex;

use crate::crypto::{ChannelHistory, Opened, ReplayGuard, Seen};
use crate::pins::{PinCheck, Pins};

/// Most served keys kept in memory; past it the cache starts over (keys are asked again).
const SERVED_KEYS_MAX: usize = 10_000;

/// What this client holds for a sender's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenderKey {
    /// Pinned (now, or earlier) and the cluster still serves the same key.
    Pinned([u8; 32]),
    /// The cluster knows no key for the name: nothing can be verified.
    Unknown,
    /// The cluster now serves another key than the pinned one: a node lies, or the name's key
    /// file was replaced. Messages are still checked under the pinned key.
    Changed {
        /// The key pinned on first sight.
        pinned: [u8; 32],
        /// The key a node served now.
        served: [u8; 32],
    },
}

impl SenderKey {
    /// The key to verify with: the pinned one.
    pub fn verify_with(self) -> Option<[u8; 32]> {
        match self {
            SenderKey::Pinned(key) | SenderKey::Changed { pinned: key, .. } => Some(key),
            SenderKey::Unknown => None,
        }
    }
}

/// A message as a reader should show it: its body opened and checked, whether it was seen
/// before at another seq, and what is known of its sender's key.
#[derive(Debug, Clone)]
pub struct Shown {
    /// The body opened with the channel's keys and checked under the sender's pinned key.
    pub opened: Opened,
    /// What the replay guard said.
    pub seen: Seen,
    /// Whether plaintext in this channel is suspect (the channel is encrypted).
    pub history: ChannelHistory,
    /// The sender's key as this client holds it.
    pub key: SenderKey,
}

impl Shown {
    /// Markers and text, e.g. `[forged?] pay me`, `[plaintext] hi`, `[key changed!] ...`.
    /// Not sanitized: print it through the terminal's sanitizer.
    pub fn display(&self) -> String {
        let line = self.opened.display(self.history, self.seen);
        if matches!(self.key, SenderKey::Changed { .. }) {
            format!("[key changed!] {line}")
        } else {
            line
        }
    }

    /// Whether the text is readable, its signature verified under the pinned key, and it is
    /// no replay.
    pub fn is_trusted(&self) -> bool {
        self.opened.verified_text().is_some()
            && !matches!(self.seen, Seen::Replayed { .. })
            && !matches!(self.key, SenderKey::Changed { .. })
    }
}

/// A channel's crypto record against the one this client pinned for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelSecurity {
    /// No record now, and none pinned: a plain channel as far as this client knows.
    Plain,
    /// A record, the pinned one (or pinned now, on first sight).
    Encrypted,
    /// No record now, but this client pinned one: a node dropped it. Treat the channel as
    /// encrypted; never send it plaintext unasked.
    RecordGone,
    /// A record other than the pinned one: a node replaced it. Do not unlock with it.
    RecordChanged,
}

/// The pins (on disk when the client has a config dir, else for this session only), the keys
/// the cluster served, and the replay guard, shared by every clone of a client.
pub(crate) struct Authors {
    pins: Mutex<PinStore>,
    /// SHA-256 of each encrypted channel's crypto record, pinned on first sight.
    channels: Mutex<PinStore>,
    served: Mutex<HashMap<String, [u8; 32]>>,
    replay: Mutex<ReplayGuard>,
}

enum PinStore {
    File(Pins),
    Memory(HashMap<String, [u8; 32]>),
}

impl PinStore {
    /// Pins in `config_dir` loaded by `load`, or in memory when there is no config dir or the
    /// file cannot be read (then a warning is logged and nothing is written).
    fn open(
        config_dir: Option<&Path>,
        load: impl FnOnce(&Path) -> Result<Pins, crate::identity::IdentityError>,
    ) -> PinStore {
        match config_dir.map(load) {
            Some(Ok(pins)) => PinStore::File(pins),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "cannot read pins; pinning for this session only");
                PinStore::Memory(HashMap::new())
            }
            None => PinStore::Memory(HashMap::new()),
        }
    }

    /// As [`Pins::check`], saving a new pin at once.
    fn check(&mut self, name: &str, key: [u8; 32]) -> PinCheck {
        match self {
            PinStore::File(pins) => {
                let check = pins.check(name, key);
                if check == PinCheck::New {
                    if let Err(e) = pins.save() {
                        tracing::warn!(error = %e, "cannot save a pin");
                    }
                }
                check
            }
            PinStore::Memory(pins) => match pins.get(name) {
                Some(&pinned) if pinned == key => PinCheck::Same,
                Some(&pinned) => PinCheck::Changed { pinned },
                None => {
                    pins.insert(name.to_owned(), key);
                    PinCheck::New
                }
            },
        }
    }

    fn pinned(&self, name: &str) -> Option<[u8; 32]> {
        match self {
            PinStore::File(pins) => pins.pinned(name),
            PinStore::Memory(pins) => pins.get(name).copied(),
        }
    }
}

impl Authors {
    /// Pins kept in `config_dir` for `cluster`, or in memory when `config_dir` is `None`.
    pub(crate) fn new(config_dir: Option<&Path>, cluster: &str) -> Authors {
        Authors {
            pins: Mutex::new(PinStore::open(config_dir, |dir| Pins::load(dir, cluster))),
            channels: Mutex::new(PinStore::open(config_dir, |dir| {
                Pins::load_channels(dir, cluster)
            })),
            served: Mutex::new(HashMap::new()),
            replay: Mutex::new(ReplayGuard::default()),
        }
    }

    /// Checks `record`, `channel`'s crypto record as a node served it now, against the pin
    /// (pinning it on first sight).
    pub(crate) fn channel_security(&self, channel: &str, record: Option<&[u8]>) -> ChannelSecurity {
        let mut pins = self.channels.lock();
        match record {
            None if pins.pinned(channel).is_some() => ChannelSecurity::RecordGone,
            None => ChannelSecurity::Plain,
            Some(record) => {
                let digest: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, record)
                    .as_ref()
                    .try_into()
                    .expect("SHA-256 is 32 bytes");
                match pins.check(channel, digest) {
                    PinCheck::New | PinCheck::Same => ChannelSecurity::Encrypted,
                    PinCheck::Changed { .. } | PinCheck::BadName => ChannelSecurity::RecordChanged,
                }
            }
        }
    }

    /// The key a node served for `name` earlier in this session.
    pub(crate) fn served(&self, name: &str) -> Option<[u8; 32]> {
        self.served.lock().get(name).copied()
    }

    /// Takes the key a node serves for `name` and checks it against the pin (pinning it on
    /// first sight).
    pub(crate) fn learn(&self, name: &str, served: Option<[u8; 32]>) -> SenderKey {
        let Some(served) = served else {
            // Never pinned and not registered: nothing to verify with. Pinned but no longer
            // served: a node hides the name's key; keep checking under the pin.
            return match self.pinned(name) {
                Some(pinned) => SenderKey::Changed {
                    pinned,
                    served: [0; 32],
                },
                None => SenderKey::Unknown,
            };
        };
        {
            let mut cache = self.served.lock();
            if cache.len() >= SERVED_KEYS_MAX {
                cache.clear();
            }
            cache.insert(name.to_owned(), served);
        }
        match self.pins.lock().check(name, served) {
            PinCheck::New | PinCheck::Same => SenderKey::Pinned(served),
            PinCheck::Changed { pinned } => SenderKey::Changed { pinned, served },
            PinCheck::BadName => SenderKey::Unknown,
        }
    }

    fn pinned(&self, name: &str) -> Option<[u8; 32]> {
        self.pins.lock().pinned(name)
    }

    /// What is known of `name`'s key when no node could be asked: its pin, if any.
    pub(crate) fn without_lookup(&self, name: &str) -> SenderKey {
        self.pinned(name)
            .map_or(SenderKey::Unknown, SenderKey::Pinned)
    }

    /// What the replay guard says of `opened`, message `seq` of `channel` from `sender`.
    pub(crate) fn seen(
        &self,
        channel: &str,
        seq: u64,
        sender: &str,
        client_seq: u64,
        opened: &Opened,
    ) -> Seen {
        self.replay
            .lock()
            .check(channel, seq, sender, client_seq, opened)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_key_never_replaces_the_pin_in_memory_or_on_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        for authors in [
            Authors::new(None, "c1"),
            Authors::new(Some(dir.path()), "c1"),
        ] {
            assert_eq!(authors.learn("alice", None), SenderKey::Unknown);
            assert_eq!(authors.without_lookup("alice"), SenderKey::Unknown);
            assert_eq!(
                authors.learn("alice", Some([1; 32])),
                SenderKey::Pinned([1; 32])
            );
            assert_eq!(
                authors.learn("alice", Some([1; 32])),
                SenderKey::Pinned([1; 32])
            );
            // A failed lookup still verifies under the pin.
            assert_eq!(authors.without_lookup("alice"), SenderKey::Pinned([1; 32]));
            let changed = authors.learn("alice", Some([2; 32]));
            assert_eq!(
                changed,
                SenderKey::Changed {
                    pinned: [1; 32],
                    served: [2; 32]
                }
            );
            assert_eq!(
                changed.verify_with(),
                Some([1; 32]),
                "checked under the pin"
            );
            assert_eq!(authors.learn("alice", None).verify_with(), Some([1; 32]));
        }
        // The file pin survives the session.
        let again = Authors::new(Some(dir.path()), "c1");
        assert_eq!(
            again.learn("alice", Some([2; 32])).verify_with(),
            Some([1; 32])
        );
    }

    #[test]
    fn a_dropped_or_replaced_crypto_record_is_noticed_across_sessions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let authors = Authors::new(Some(dir.path()), "c1");
        assert_eq!(
            authors.channel_security("vault", None),
            ChannelSecurity::Plain
        );
        let record = [7u8; 61];
        assert_eq!(
            authors.channel_security("vault", Some(&record)),
            ChannelSecurity::Encrypted
        );
        let later = Authors::new(Some(dir.path()), "c1");
        assert_eq!(
            later.channel_security("vault", None),
            ChannelSecurity::RecordGone
        );
        assert_eq!(
            later.channel_security("vault", Some(&[8u8; 61])),
            ChannelSecurity::RecordChanged
        );
        assert_eq!(
            later.channel_security("vault", Some(&record)),
            ChannelSecurity::Encrypted
        );
    }
}
