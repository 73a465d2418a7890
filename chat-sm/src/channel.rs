//! Channel records: who owns a channel, whether it is private, who may read and write it, and
//! the public part of its end-to-end encryption.
//!
//! A channel gets its record when it is created: explicitly by [`ChannelOp::Create`], or
//! implicitly by the first message sent to a channel that has none (a public channel owned by
//! that sender). Channels written by a release without records have none; they are public and
//! unowned until someone creates their record with [`ChannelOp::Create`].
//!
//! # Rules (applied identically by every replica)
//!
//! | op          | who            | refused when                                                   |
//! |-------------|----------------|----------------------------------------------------------------|
//! | `Create`    | anyone         | a record exists; `private` and the channel has messages; the   |
//! |             |                | creator owns [`MAX_CHANNELS_PER_USER`] channels already        |
//! | `SetCrypto` | the owner      | the channel has a crypto record already                        |
//! | `Invite`    | the owner      | not private; the invitee is not registered; the channel has    |
//! |             |                | [`MAX_MEMBERS`] members and invitations together               |
//! | `Accept`    | an invitee     | not private; not invited                                       |
//! | `Remove`    | the owner, or  | not private; the owner removing themselves                     |
//! |             | the user       |                                                                |
//! | `SetRetention` | the owner   | the retention is out of bounds (see `retention.rs`)            |
//! | `SetTopic`  | the owner      | the topic is over [`MAX_TOPIC_BYTES`] or holds a control       |
//! |             |                | character                                                      |
//!
//! Inviting a member and removing a user who is neither member nor invited change nothing and
//! are accepted, so retries are harmless. Only members read or write a private channel.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// Most channels one user may own (create), explicitly or by a first message.
pub const MAX_CHANNELS_PER_USER: usize = 1024;

/// Most members plus open invitations of one private channel.
pub const MAX_MEMBERS: usize = 1000;

/// Largest public crypto record of a channel, in bytes. Its contents are the clients' business.
pub const MAX_CRYPTO_RECORD_BYTES: usize = 128;

/// Longest channel topic, in bytes.
pub const MAX_TOPIC_BYTES: usize = 256;

/// Whether `topic` is an acceptable channel topic: at most [`MAX_TOPIC_BYTES`] bytes, no
/// control characters (one line, no escapes).
pub fn valid_topic(topic: &str) -> bool {
    topic.len() <= MAX_TOPIC_BYTES && !topic.chars().any(char::is_control)
}

/// A change to a channel's record, made by the logged-in user the node stamps as `by`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum ChannelOp {
    /// Creates the record; the creator becomes owner (and first member if private).
    Create {
        /// Only members read and write a private channel.
        private: bool,
        /// The public part of the channel's end-to-end encryption, opaque to servers.
        crypto: Option<Vec<u8>>,
    },
    /// Sets the crypto record of a channel that has none.
    SetCrypto(Vec<u8>),
    /// Invites a registered user to a private channel.
    Invite(String),
    /// Accepts an invitation: the invitee becomes a member.
    Accept,
    /// Removes a member or an invitation; a user may remove themselves (leave, decline).
    Remove(String),
    /// The owner sets the channel's own retention, or (`None`) lets it follow the cluster
    /// default. Kept apart from the record, so records keep their encoding.
    SetRetention(Option<crate::Retention>),
    /// The owner sets the channel's topic, or (`None`) clears it. Kept apart from the record
    /// like the retention; appended last, so earlier entries keep their variant numbers.
    SetTopic(Option<String>),
}

/// The stored record of one channel.
///
/// Invariants: `owner` is in `members` when `private`; `members` and `invited` are disjoint;
/// a public channel has no members or invitations; `members.len() + invited.len() <=`
/// [`MAX_MEMBERS`]; `crypto` is at most [`MAX_CRYPTO_RECORD_BYTES`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ChannelRecord {
    /// The user who created it; `None` only for records of channels from before records.
    pub owner: Option<String>,
    /// Whether only members may read and write.
    pub private: bool,
    /// Members of a private channel, owner included.
    pub members: BTreeSet<String>,
    /// Users invited to a private channel who have not accepted yet.
    pub invited: BTreeSet<String>,
    /// The channel's public crypto record, if its users set one.
    pub crypto: Option<Vec<u8>>,
}

impl ChannelRecord {
    /// Whether `user` may read and write the channel.
    pub fn admits(&self, user: &str) -> bool {
        !self.private || self.members.contains(user)
    }

    /// Whether the channel appears in `user`'s channel list: public, or `user` is a member or
    /// invited.
    pub fn visible_to(&self, user: &str) -> bool {
        self.admits(user) || self.invited.contains(user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_members_are_admitted_to_a_private_channel() {
        let mut record = ChannelRecord {
            owner: Some("alice".into()),
            private: true,
            ..ChannelRecord::default()
        };
        record.members.insert("alice".into());
        record.invited.insert("bob".into());
        assert!(record.admits("alice"));
        assert!(!record.admits("bob"), "an invitation is not membership");
        assert!(record.visible_to("bob"), "but the invitee sees the channel");
        assert!(!record.visible_to("mallory"));
        record.private = false;
        assert!(record.admits("mallory"));
    }
}
