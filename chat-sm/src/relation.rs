//! Relations between messages: replies, edits, deletes and reactions.
//!
//! A relation is a message of its own (a [`Command::Relate`](crate::Command::Relate)): it
//! takes the next seq of its channel like any send, is deduplicated like any send, and
//! streams, history and replication carry it without a path of their own. Applying it also
//! changes its target's [`MessageMeta`], so a reader of the target alone (a history page far
//! from the relation) still sees the edit, the deletion, the replies and the reactions.
//!
//! # Rules (applied identically by every replica, checked in this order)
//!
//! The send rules come first (channel, sender, body, dedup, membership). Then:
//!
//! | relation | refused when                                                                 |
//! |----------|------------------------------------------------------------------------------|
//! | any      | the target seq is not stored in this channel (0, above the head, expired):    |
//! |          | `NoSuchMessage`; the target is itself an edit, delete or reaction:           |
//! |          | `NotATarget`; the target was deleted: `MessageDeleted`                        |
//! | `Edit`   | the editor is not the target's sender: `NotSender`; the body's first byte (its |
//! |          | format: plaintext or encrypted) differs from the target's: `EditFormatChanged`; |
//! |          | the target has [`MAX_EDITS`] edits: `TooManyEdits`                            |
//! | `Delete` | the deleter is neither the target's sender nor the channel's owner: `NotSender` |
//! | `React`  | the emoji is not 1..=[`MAX_EMOJI_BYTES`] bytes without control characters or  |
//! |          | spaces: `InvalidReaction` (checked before the target); adding one the user     |
//! |          | has: `AlreadyReacted`; removing one the user has not: `NotReacted`; the target  |
//! |          | has [`MAX_REACTIONS`] reactions: `TooManyReactions`                           |
//!
//! A reply into another channel cannot be expressed: the target is a seq of the relation's
//! own channel.
//!
//! # Effects
//!
//! - `Reply`: the target's `replies` grows by one.
//! - `Edit`: the edit's seq is appended to the target's `edits`; readers show the newest
//!   edit's body (history attaches it as [`Message::edit`](crate::Message::edit)).
//! - `Delete`: the bodies of the target and of every edit of it are erased (stored empty,
//!   `deleted` set) in RocksDB and in the rings, and its reactions are dropped. The entries
//!   keep their seq, sender and time, so seqs stay dense; RocksDB's compaction then drops
//!   the old values from its files.
//! - `React`: the user is added to (or removed from) the emoji's set.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::command::ChannelSeq;

/// Longest reaction emoji, in bytes (a flag or a family emoji with modifiers fits).
pub const MAX_EMOJI_BYTES: usize = 32;

/// Most edits one message keeps.
pub const MAX_EDITS: usize = 100;

/// Most (emoji, user) reactions on one message.
pub const MAX_REACTIONS: usize = 1024;

/// What a relation message does to its target.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Relation {
    /// Answers the target; the body is the answer.
    Reply {
        /// The message answered.
        to: ChannelSeq,
    },
    /// Replaces the target's text; the body is the new text, in the target's format.
    Edit {
        /// The message edited.
        of: ChannelSeq,
    },
    /// Erases the target's body (and its edits'); the body is the deleter's signed note.
    Delete {
        /// The message deleted.
        of: ChannelSeq,
    },
    /// Adds (`on`) or removes a reaction of the sender to the target.
    React {
        /// The message reacted to.
        to: ChannelSeq,
        /// The reaction, e.g. "👍".
        emoji: String,
        /// Add (true) or remove (false).
        on: bool,
    },
}

impl Relation {
    /// The seq of the message this relation changes.
    pub fn target(&self) -> ChannelSeq {
        match self {
            Relation::Reply { to } | Relation::React { to, .. } => *to,
            Relation::Edit { of } | Relation::Delete { of } => *of,
        }
    }

    /// A short name for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Relation::Reply { .. } => "reply",
            Relation::Edit { .. } => "edit",
            Relation::Delete { .. } => "delete",
            Relation::React { .. } => "react",
        }
    }

    /// Whether other relations may point at a message carrying this relation: replies may
    /// be answered, edited, deleted and reacted to; edits, deletes and reactions may not.
    pub(crate) fn is_target(&self) -> bool {
        matches!(self, Relation::Reply { .. })
    }
}

/// Whether `emoji` is an acceptable reaction: 1..=[`MAX_EMOJI_BYTES`] bytes, no control
/// characters and no whitespace (so it prints on one line and cannot smuggle escapes).
pub fn valid_emoji(emoji: &str) -> bool {
    (1..=MAX_EMOJI_BYTES).contains(&emoji.len())
        && !emoji.chars().any(|c| c.is_control() || c.is_whitespace())
}

/// What is known about a stored message beyond its body: the relation it carries, and what
/// later relations did to it. The default (a plain message nobody touched) is not stored.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct MessageMeta {
    /// The relation this message carries, if it is a reply, edit, delete or reaction.
    pub relation: Option<Relation>,
    /// The body was erased by a delete (of this message, or of the message this edits).
    pub deleted: bool,
    /// Seqs of this message's edits, oldest first; the last one is the current text.
    pub edits: Vec<ChannelSeq>,
    /// How many replies answer this message.
    pub replies: u64,
    /// Reactions: emoji -> the users who reacted with it (never an empty set).
    pub reactions: BTreeMap<String, BTreeSet<String>>,
}

impl MessageMeta {
    /// Whether this is the meta of a plain, untouched message.
    pub fn is_plain(&self) -> bool {
        *self == MessageMeta::default()
    }

    /// The number of (emoji, user) reactions.
    pub fn reaction_count(&self) -> usize {
        self.reactions.values().map(BTreeSet::len).sum()
    }

    /// A rough heap size, for the ring memory budget.
    pub(crate) fn heap_bytes(&self) -> usize {
        let reactions: usize = self
            .reactions
            .iter()
            .map(|(emoji, users)| {
                emoji.len() + 48 + users.iter().map(|u| u.len() + 48).sum::<usize>()
            })
            .sum();
        std::mem::size_of::<MessageMeta>() + self.edits.capacity() * 8 + reactions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emoji_rules() {
        assert!(valid_emoji("👍"));
        assert!(valid_emoji("+1"));
        assert!(valid_emoji("👨‍👩‍👧‍👦"));
        assert!(!valid_emoji(""));
        assert!(!valid_emoji("a b"));
        assert!(!valid_emoji("\u{1b}[2J"));
        assert!(!valid_emoji(&"x".repeat(MAX_EMOJI_BYTES + 1)));
        assert!(valid_emoji(&"x".repeat(MAX_EMOJI_BYTES)));
    }

    #[test]
    fn targets() {
        let to = ChannelSeq(4);
        assert_eq!(Relation::Reply { to }.target(), to);
        assert_eq!(Relation::Delete { of: to }.target(), to);
        assert!(Relation::Reply { to }.is_target());
        assert!(!Relation::Edit { of: to }.is_target());
        assert!(MessageMeta::default().is_plain());
    }
}
