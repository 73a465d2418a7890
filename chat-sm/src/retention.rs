//! Retention: how long a channel keeps its messages, and how long a send's dedup record
//! lives.
//!
//! # Who decides
//! Expiry is a replicated command, [`crate::Command::Expire`], that the leader proposes now and
//! then with its wall clock. The state machine keeps a clock of its own, the largest `at_ms`
//! of every `Expire` applied, and expires by that clock alone: never by the applying node's
//! clock, so every replica removes exactly the same messages at exactly the same log index.
//! An `Expire` is applied alone (see [`crate::ChatState::apply`]), so what it removes does not
//! depend on how the adapter batches entries.
//!
//! # What expires
//! A channel's effective retention is its own ([`crate::ChannelOp::SetRetention`], set by its
//! owner) or else the cluster default ([`crate::Command::SetDefaultRetention`]); without
//! either, messages are kept forever. Each channel keeps a *floor*: the lowest seq still
//! stored. An `Expire` raises it past
//! - every seq more than `max_count` below the head, and
//! - the longest run of messages from the floor up whose `at_ms` is older than `max_age_ms`
//!   by the state machine's clock. The run stops at the first younger message, so what is
//!   removed is always a prefix: seqs stay dense from the floor to the head, and a message
//!   stamped early by a leader with a slow clock waits for the ones before it.
//!
//! Readers never see a seq below the floor again. Seqs keep growing from the head; a channel
//! whose every message expired keeps its head, so a new message never reuses a seq.
//!
//! # Dedup records
//! A send's dedup record lives [`DEDUP_WINDOW_MS`] past its `at_ms`. When it expires, the
//! client's *dedup floor* rises to its client seq; a later send at or below that floor has no
//! record to answer "duplicate" from, so it is refused with
//! [`crate::RejectReason::RetryExpired`] instead of being stored twice. Dedup floors are
//! never removed: one 25-byte record per (sender, client id) ever used, instead of one per
//! message.
//!
//! # Bounded passes
//! One `Expire` removes at most [`EXPIRE_SCAN_MAX`] messages found by age and at most
//! [`EXPIRE_DEDUP_MAX`] dedup records, so a large backlog (a retention just shortened) is
//! worked off over several passes instead of stalling applies for seconds. Removing by count
//! is one range delete and needs no bound.

use serde::{Deserialize, Serialize};

use crate::RejectReason;

/// How long after its `at_ms` a dedup record expires: 24 hours, far beyond any client's retry
/// horizon (clients give up on a send within minutes).
pub const DEDUP_WINDOW_MS: u64 = 24 * 60 * 60 * 1000;

/// Shortest accepted [`Retention::max_age_ms`]: one minute. Anything shorter would expire
/// messages before slow readers have seen them.
pub const RETENTION_AGE_MIN_MS: u64 = 60 * 1000;

/// Longest accepted [`Retention::max_age_ms`]: 100 years (beyond that, say "forever").
pub const RETENTION_AGE_MAX_MS: u64 = 100 * 365 * 24 * 60 * 60 * 1000;

/// Most messages one `Expire` examines by age.
pub const EXPIRE_SCAN_MAX: u64 = 100_000;

/// Most dedup records one `Expire` removes.
pub const EXPIRE_DEDUP_MAX: u64 = 100_000;

/// A retention policy. Both limits may be set; a message goes when either says so. Neither set
/// means "keep forever" (which, set on a channel, overrides the cluster default).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Retention {
    /// Messages older than this, by the state machine's clock, expire. Unit: ms.
    pub max_age_ms: Option<u64>,
    /// At most this many of the newest messages are kept.
    pub max_count: Option<u64>,
}

impl Retention {
    /// Keep everything.
    pub const FOREVER: Retention = Retention {
        max_age_ms: None,
        max_count: None,
    };

    /// Whether the policy never expires anything.
    pub fn is_forever(&self) -> bool {
        self.max_age_ms.is_none() && self.max_count.is_none()
    }

    /// Checks the bounds: an age within
    /// [`RETENTION_AGE_MIN_MS`]..=[`RETENTION_AGE_MAX_MS`], a count of at least 1.
    ///
    /// # Errors
    /// [`RejectReason::InvalidRetention`].
    pub fn validate(&self) -> Result<(), RejectReason> {
        if let Some(age) = self.max_age_ms {
            if !(RETENTION_AGE_MIN_MS..=RETENTION_AGE_MAX_MS).contains(&age) {
                return Err(RejectReason::InvalidRetention);
            }
        }
        if self.max_count == Some(0) {
            return Err(RejectReason::InvalidRetention);
        }
        Ok(())
    }

    /// The lowest seq this policy keeps of a channel whose head is `head`, by count alone.
    pub(crate) fn count_floor(&self, head: u64) -> u64 {
        match self.max_count {
            Some(n) => head.saturating_sub(n) + 1,
            None => 1,
        }
    }

    /// Messages with `at_ms` below this are old enough to expire at `clock`; 0 when age does
    /// not limit.
    pub(crate) fn age_cutoff(&self, clock: u64) -> u64 {
        match self.max_age_ms {
            Some(age) => clock.saturating_sub(age),
            None => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_and_age_floors() {
        let p = Retention {
            max_age_ms: Some(60_000),
            max_count: Some(10),
        };
        assert_eq!(p.count_floor(5), 1);
        assert_eq!(p.count_floor(25), 16);
        assert_eq!(p.age_cutoff(100_000), 40_000);
        assert_eq!(p.age_cutoff(1_000), 0);
        assert_eq!(Retention::FOREVER.count_floor(1_000), 1);
    }

    #[test]
    fn bounds() {
        let age = |ms| Retention {
            max_age_ms: Some(ms),
            max_count: None,
        };
        assert!(age(RETENTION_AGE_MIN_MS).validate().is_ok());
        assert!(age(RETENTION_AGE_MIN_MS - 1).validate().is_err());
        assert!(age(RETENTION_AGE_MAX_MS + 1).validate().is_err());
        let none = Retention {
            max_age_ms: None,
            max_count: Some(0),
        };
        assert_eq!(none.validate(), Err(RejectReason::InvalidRetention));
    }
}
