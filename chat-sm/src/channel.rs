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
//! | `CreateDirect` | a member    | the name is not [`direct_channel_name`] of the members; fewer  |
//! |             |                | than 2 or more than [`MAX_DIRECT_MEMBERS`] members, or the     |
//! |             |                | creator not among them; a member is not registered; a record   |
//! |             |                | exists; the creator owns [`MAX_CHANNELS_PER_USER`] channels    |
//!
//! # Direct conversations
//!
//! A direct conversation is a private channel whose name is derived from its members
//! ([`direct_channel_name`], `dm-` and 40 hex digits), so the same people always meet in the
//! same channel and a client can check a listed member set against the name. It is created
//! whole by [`ChannelOp::CreateDirect`], with its crypto record (up to
//! [`MAX_DIRECT_CRYPTO_BYTES`], since it carries a key for each member), and its members never
//! change: every other op on a `dm-` name, and a first message to a `dm-` name without a
//! record, are refused with `DirectChannel`. The creator owns it, so direct conversations count
//! towards [`MAX_CHANNELS_PER_USER`].
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

/// Largest crypto record of a direct conversation: it holds the member names and a wrapped
/// key for each.
pub const MAX_DIRECT_CRYPTO_BYTES: usize = 2048;

/// Most members of a direct conversation ("small groups"; larger groups are private channels).
pub const MAX_DIRECT_MEMBERS: usize = 8;

/// The name prefix reserved for direct conversations.
pub const DIRECT_PREFIX: &str = "dm-";

/// The channel name of the direct conversation between `members` (in any order, duplicates
/// ignored): `dm-` and the first 20 bytes, in hex, of SHA-256 over a domain tag and each
/// distinct name, sorted, length-prefixed. Clients compute the same to find and to check it.
pub fn direct_channel_name<S: AsRef<str>>(members: &[S]) -> String {
    use sha2::{Digest, Sha256};
    let names: BTreeSet<&str> = members.iter().map(AsRef::as_ref).collect();
    let mut hash = Sha256::new();
    hash.update(b"cellchat direct channel v1");
    for name in names {
        hash.update((name.len() as u64).to_le_bytes());
        hash.update(name.as_bytes());
    }
    let digest = hash.finalize();
    let mut name = String::with_capacity(DIRECT_PREFIX.len() + 40);
    name.push_str(DIRECT_PREFIX);
    for byte in &digest[..20] {
        name.push_str(&format!("{byte:02x}"));
    }
    name
}

/// Whether `channel` is named like a direct conversation.
pub fn is_direct_channel(channel: &str) -> bool {
    channel.starts_with(DIRECT_PREFIX)
}

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
    /// Creates a direct conversation between `members` (the creator among them): private,
    /// owned by the creator, with its crypto record. Appended last like `SetTopic`.
    CreateDirect {
        /// Every member, the creator included.
        members: Vec<String>,
        /// The conversation's crypto record (opaque to servers).
        crypto: Vec<u8>,
    },
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

    #[test]
    fn a_direct_name_depends_on_the_member_set_only() {
        let name = direct_channel_name(&["bob", "alice"]);
        assert_eq!(name, direct_channel_name(&["alice", "bob", "alice"]));
        assert_ne!(name, direct_channel_name(&["alice", "bob", "carol"]));
        assert_ne!(
            name,
            direct_channel_name(&["Alice", "bob"]),
            "names are case-sensitive"
        );
        assert!(is_direct_channel(&name));
        assert_eq!(name.len(), DIRECT_PREFIX.len() + 40);
        assert!(
            crate::ChannelName::new(&name).is_ok(),
            "{name} is a valid channel name"
        );
        // The length prefix keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(
            direct_channel_name(&["ab", "c"]),
            direct_channel_name(&["a", "bc"])
        );
    }
}
