//! Typing indicators for both interactive modes: who types where ([`TypingBoard`]), and
//! telling the cluster when this user types ([`TypingTeller`]).

use std::collections::{BTreeMap, HashMap};

use cellchat_client::Client;
use proto::push::TYPING_RENEW_MS;

/// Who types in which channel, until when (ms).
#[derive(Debug, Default)]
pub struct TypingBoard {
    typing: BTreeMap<String, BTreeMap<String, u64>>,
}

impl TypingBoard {
    /// `user` types in `channel`; shown until `until_ms`.
    pub fn heard(&mut self, channel: &str, user: &str, until_ms: u64) {
        let users = self.typing.entry(channel.to_owned()).or_default();
        users.insert(user.to_owned(), until_ms);
    }

    /// A message of `user` arrived in `channel`: they are done typing it.
    pub fn spoke(&mut self, channel: &str, user: &str) {
        if let Some(users) = self.typing.get_mut(channel) {
            users.remove(user);
        }
    }

    /// `user` went offline: they type nowhere.
    pub fn gone(&mut self, user: &str) {
        for users in self.typing.values_mut() {
            users.remove(user);
        }
    }

    /// The users typing in `channel` at `now_ms`, by name; forgets those whose time ran out.
    pub fn typing_in(&mut self, channel: &str, now_ms: u64) -> Vec<String> {
        let Some(users) = self.typing.get_mut(channel) else {
            return Vec::new();
        };
        users.retain(|_, until| *until > now_ms);
        users.keys().cloned().collect()
    }
}

/// Tells the cluster that this user types, at most every [`TYPING_RENEW_MS`] per channel.
#[derive(Debug, Default)]
pub struct TypingTeller {
    told: HashMap<String, u64>,
}

impl TypingTeller {
    /// The input of `channel` is now `input`: tells the cluster if it is a message being
    /// written (not empty, not a command) and the last note is old enough.
    pub fn typed(&mut self, client: &Client, channel: &str, input: &str, now_ms: u64) {
        if input.is_empty() || input.starts_with('/') {
            return;
        }
        let told = self.told.get(channel).copied().unwrap_or(0);
        if now_ms.saturating_sub(told) >= TYPING_RENEW_MS && client.typing(channel) {
            self.told.insert(channel.to_owned(), now_ms);
        }
    }

    /// A line was entered in `channel`: the next key starts a new note at once.
    pub fn entered(&mut self, channel: &str) {
        self.told.remove(channel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typing_shows_until_its_time_runs_out_or_the_user_speaks_or_leaves() {
        let mut board = TypingBoard::default();
        board.heard("general", "bob", 1_000);
        board.heard("general", "carol", 2_000);
        board.heard("ops", "bob", 2_000);
        assert_eq!(board.typing_in("general", 999), vec!["bob", "carol"]);
        assert_eq!(board.typing_in("general", 1_000), vec!["carol"]);
        board.spoke("general", "carol");
        assert!(board.typing_in("general", 1_000).is_empty());
        assert_eq!(board.typing_in("ops", 1_000), vec!["bob"]);
        board.gone("bob");
        assert!(board.typing_in("ops", 1_000).is_empty());
        assert!(board.typing_in("nowhere", 0).is_empty());
    }
}
