//! `LogTail`: the newest log entries, decoded, kept beside the log so that replication (once
//! per follower) and apply read them without reading and decoding the same bytes again.
//!
//! # Correctness
//! The log on disk is the truth; the tail is a copy of a run at its end. It stays one because
//! `LogStore` changes it in step with the log, on the one task that writes the log:
//! - it cuts (or purges) the tail *before* it cuts (or purges) the log, so no reader finds
//!   there an entry the log no longer has;
//! - it fills the tail *after* the log holds the entries, so the tail never has an entry the
//!   log lacks;
//! - an entry that does not follow the tail's last one empties the tail first, so the tail is
//!   always one contiguous run.
//!
//! Entries share their command (`Arc`), so a copy out of the tail costs a reference count.

use std::collections::VecDeque;

use crate::types::Entry;

/// Most entries the tail keeps: replication and apply trail the newest entry by a round trip
/// or two, a few hundred entries at the most at full load.
pub const TAIL_ENTRIES_MAX: usize = 1024;

/// Most encoded bytes the tail keeps (the decoded entries take about as much). A follower that
/// is further behind reads the file, as every read did before the tail.
pub const TAIL_BYTES_MAX: usize = 16 << 20;

/// A contiguous run of the log's newest entries, decoded, with each one's encoded size.
#[derive(Default)]
pub struct LogTail {
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
}

impl LogTail {
    /// Index of the first entry held.
    pub fn first(&self) -> Option<u64> {
        self.entries.front().map(|(entry, _)| entry.log_id.index)
    }

    /// The entry at `index` and its encoded size, if the tail holds it.
    pub fn get(&self, index: u64) -> Option<(&Entry, usize)> {
        let offset = index.checked_sub(self.first()?)?;
        let (entry, size) = self.entries.get(usize::try_from(offset).ok()?)?;
        Some((entry, *size))
    }

    /// Adds `entry` (which the log now holds) at the end, dropping the oldest entries past the
    /// bounds. An entry that does not directly follow the last one replaces the whole tail.
    pub fn push(&mut self, entry: Entry, size: usize) {
        let follows = self
            .entries
            .back()
            .is_none_or(|(last, _)| last.log_id.index.checked_add(1) == Some(entry.log_id.index));
        if !follows {
            self.clear();
        }
        self.bytes = self.bytes.saturating_add(size);
        self.entries.push_back((entry, size));
        while self.entries.len() > TAIL_ENTRIES_MAX
            || (self.bytes > TAIL_BYTES_MAX && self.entries.len() > 1)
        {
            self.pop_front();
        }
    }

    /// Drops `index` and every entry after it: call before the log cuts them.
    pub fn cut_from(&mut self, index: u64) {
        while self
            .entries
            .back()
            .is_some_and(|(last, _)| last.log_id.index >= index)
        {
            let (_, size) = self.entries.pop_back().expect("checked non-empty");
            self.bytes -= size;
        }
    }

    /// Drops every entry up to and including `index`: call before the log purges them.
    pub fn purge_through(&mut self, index: u64) {
        while self.first().is_some_and(|first| first <= index) {
            self.pop_front();
        }
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    fn pop_front(&mut self) {
        if let Some((_, size)) = self.entries.pop_front() {
            self.bytes -= size;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{CommittedLeaderId, LogId};
    use openraft::vote::RaftLeaderId;

    fn entry(index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: openraft::EntryPayload::Blank,
        }
    }

    fn indexes(tail: &LogTail) -> Vec<u64> {
        tail.entries.iter().map(|(e, _)| e.log_id.index).collect()
    }

    #[test]
    fn the_tail_keeps_a_contiguous_run_within_its_bounds() {
        let mut tail = LogTail::default();
        for index in 0..(TAIL_ENTRIES_MAX as u64 + 10) {
            tail.push(entry(index), 1);
        }
        assert_eq!(tail.entries.len(), TAIL_ENTRIES_MAX);
        assert_eq!(tail.first(), Some(10));
        assert_eq!(tail.bytes, TAIL_ENTRIES_MAX);
        assert!(tail.get(9).is_none());
        assert_eq!(
            tail.get(10).map(|(e, s)| (e.log_id.index, s)),
            Some((10, 1))
        );

        // Big entries: the byte bound evicts, but the newest entry always stays.
        tail.push(entry(TAIL_ENTRIES_MAX as u64 + 10), TAIL_BYTES_MAX);
        assert_eq!(indexes(&tail), vec![TAIL_ENTRIES_MAX as u64 + 10]);
        tail.push(entry(TAIL_ENTRIES_MAX as u64 + 11), TAIL_BYTES_MAX + 1);
        assert_eq!(indexes(&tail), vec![TAIL_ENTRIES_MAX as u64 + 11]);
        assert_eq!(tail.bytes, TAIL_BYTES_MAX + 1);
    }

    #[test]
    fn a_gap_replaces_the_tail_and_cuts_and_purges_drop_their_ends() {
        let mut tail = LogTail::default();
        for index in 5..10 {
            tail.push(entry(index), 10);
        }
        tail.push(entry(12), 10);
        assert_eq!(indexes(&tail), vec![12], "a gap never joins two runs");
        tail.push(entry(5), 10);
        assert_eq!(indexes(&tail), vec![5], "nor does an entry before the end");
        for index in 6..10 {
            tail.push(entry(index), 10);
        }
        tail.cut_from(8);
        assert_eq!(indexes(&tail), vec![5, 6, 7]);
        assert!(tail.get(8).is_none());
        tail.purge_through(5);
        assert_eq!(indexes(&tail), vec![6, 7]);
        assert_eq!(tail.bytes, 20);
        tail.cut_from(0);
        tail.purge_through(100);
        assert_eq!((tail.first(), tail.bytes), (None, 0));
    }
}
