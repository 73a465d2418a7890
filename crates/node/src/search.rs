//! The node's search index: a [`proto::search::SearchIndex`] over the plaintext messages this
//! node's state machine applied, kept current by a task fed from the apply listener, and
//! built whole from the state at start and after a snapshot install.
//!
//! # Consistency
//!
//! The index *covers* a log index `i` when every entry up to `i` is reflected in it: its
//! messages indexed, its edits replacing their target's text, its deletes removing their
//! target. [`Searcher::covered`] only grows (a rebuild keeps the old index until the new one
//! is whole). A search waits until the index covers the caller's read token, so a client
//! finds what it sent and everything it has read; it may also see later messages. The indexer
//! lets applied entries gather for a few milliseconds before each pass, and skips that wait
//! while a search is waiting, so the gathering never delays a search for its own messages.
//! Hits are read back from the state when answered, so a message deleted or expired after it was
//! indexed is never returned, and an edited one shows its current text.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chat_sm::{AppliedEvent, ChannelSeq, ChatState, Relation};
use parking_lot::{Mutex, RwLock};
use proto::search::{plaintext_of, Query, SearchIndex, SearchPage};
use tokio::sync::{watch, Notify};

/// Messages read from the state per history call while indexing.
const READ_PAGE: usize = 1000;

/// How often messages that retention expired are dropped from the index (searches skip them
/// meanwhile, since hits are read back from the state).
const TRIM_EVERY: Duration = Duration::from_secs(60);

/// How long the indexer lets applied entries gather before it takes them in, unless a search
/// is waiting for them: a pass costs a task wake-up, a blocking thread and reads of the state,
/// and gathered, one pass serves many entries. A search that needs the newest entries ends
/// the wait at once.
const GATHER_FOR: Duration = Duration::from_millis(20);

/// Channels with new messages since the indexer last looked, and how far the log went.
#[derive(Default)]
struct Pending {
    /// Each event's new channel heads, in log order (a run of one channel merged), so a pass
    /// takes messages in across channels in the order they were applied: hits are newest
    /// first by that order.
    heads: Vec<(String, u64)>,
    /// The newest applied index seen in an event.
    index: u64,
    /// A snapshot replaced the state: build the index again from it.
    rebuild: bool,
}

struct Inner {
    index: RwLock<SearchIndex>,
    /// Per channel, the highest seq whose entry the index has taken in.
    seen: Mutex<HashMap<String, u64>>,
    pending: Mutex<Pending>,
    wake: Notify,
    /// Searches waiting for the index to cover their read token.
    waiting: AtomicUsize,
    /// Told when a search starts waiting, to end the indexer's gathering.
    hurry: Notify,
    /// How long a pass waits for more entries unless a search is waiting ([`GATHER_FOR`]).
    gather: Duration,
    covered: watch::Sender<u64>,
}

/// A search waiting for the index; see [`Searcher::waiting`].
pub struct Waiting(Arc<Inner>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The node's search index and the task that keeps it current. Cheap to clone.
#[derive(Clone)]
pub struct Searcher {
    inner: Arc<Inner>,
}

impl Default for Searcher {
    fn default() -> Self {
        Self::new()
    }
}

impl Searcher {
    /// An empty index covering nothing; [`run`](Self::run) builds it.
    pub fn new() -> Searcher {
        Self::gathering_for(GATHER_FOR)
    }

    /// An empty index whose indexer lets applied entries gather for `gather` before a pass.
    fn gathering_for(gather: Duration) -> Searcher {
        Searcher {
            inner: Arc::new(Inner {
                index: RwLock::new(SearchIndex::new()),
                seen: Mutex::new(HashMap::new()),
                pending: Mutex::new(Pending {
                    rebuild: true,
                    ..Pending::default()
                }),
                wake: Notify::new(),
                waiting: AtomicUsize::new(0),
                hurry: Notify::new(),
                gather,
                covered: watch::channel(0).0,
            }),
        }
    }

    /// Notes an applied batch for the indexer. Cheap: called on the apply thread.
    pub fn applied(&self, event: &AppliedEvent) {
        let mut pending = self.inner.pending.lock();
        for (channel, head) in &event.heads {
            match pending.heads.last_mut() {
                Some((last, at)) if last == channel => *at = (*at).max(head.0),
                _ => pending.heads.push((channel.clone(), head.0)),
            }
        }
        pending.index = pending.index.max(event.index.0);
        pending.rebuild |= event.snapshot;
        drop(pending);
        self.inner.wake.notify_one();
    }

    /// The log index the index covers (see the module doc).
    pub fn covered(&self) -> watch::Receiver<u64> {
        self.inner.covered.subscribe()
    }

    /// Marks a search that waits for the index until the guard drops: the indexer takes in
    /// what was applied at once instead of gathering more first.
    pub fn waiting(&self) -> Waiting {
        self.inner.waiting.fetch_add(1, Ordering::Relaxed);
        self.inner.hurry.notify_one();
        Waiting(self.inner.clone())
    }

    /// Runs `query` for a user admitted by `admits`: at most `limit` hits, newest first.
    pub fn query(
        &self,
        query: &Query,
        admits: impl FnMut(&str) -> bool,
        limit: usize,
    ) -> SearchPage {
        self.inner.index.read().query(query, admits, limit)
    }

    /// Live messages indexed and the index's rough size in bytes.
    pub fn size(&self) -> (usize, usize) {
        let index = self.inner.index.read();
        (index.len(), index.heap_bytes())
    }

    /// Keeps the index current until the runtime stops. Reads from `chat` on a blocking
    /// thread, so applies and RPCs go on while a large backlog is indexed.
    pub async fn run(self, chat: Arc<ChatState>) {
        // The first trim is a period away: a fresh build holds nothing expired, and an
        // interval's immediate first tick would end the first gathering early.
        let mut trim =
            tokio::time::interval_at(tokio::time::Instant::now() + TRIM_EVERY, TRIM_EVERY);
        trim.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let (heads, index, rebuild) = {
                let mut pending = self.inner.pending.lock();
                let taken = std::mem::take(&mut *pending);
                (taken.heads, taken.index, taken.rebuild)
            };
            let (this, state) = (self.clone(), chat.clone());
            let done = tokio::task::spawn_blocking(move || {
                if rebuild {
                    this.rebuild(&state, index)
                } else {
                    this.catch_up(&state, heads, index)
                }
            })
            .await;
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    // The state could not be read: try again from scratch shortly.
                    tracing::error!(error = %e, "search index update failed; rebuilding");
                    self.inner.pending.lock().rebuild = true;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "search indexer stopped");
                    return;
                }
            }
            // A trim is not a reason for a pass: only new entries are, after their gathering.
            loop {
                tokio::select! {
                    _ = self.inner.wake.notified() => break,
                    _ = trim.tick() => self.trim(&chat),
                }
            }
            if self.inner.waiting.load(Ordering::Relaxed) == 0 {
                tokio::select! {
                    _ = tokio::time::sleep(self.inner.gather) => {}
                    _ = self.inner.hurry.notified() => {}
                }
            }
        }
    }

    /// Builds a new index from the whole state, then swaps it in. `index` is the newest
    /// applied index an event reported before the build began.
    fn rebuild(&self, chat: &ChatState, index: u64) -> Result<(), chat_sm::Error> {
        let covers = chat.applied_index().map_or(0, |i| i.0).max(index);
        let fresh = RwLock::new(SearchIndex::new());
        let mut seen = HashMap::new();
        for (channel, _) in chat.channels() {
            let last = take_in(chat, &fresh, &channel, chat.floor(&channel).0, u64::MAX)?;
            seen.insert(channel, last);
        }
        *self.inner.index.write() = fresh.into_inner();
        *self.inner.seen.lock() = seen;
        self.cover(covers);
        tracing::info!(messages = self.size().0, "search index built");
        Ok(())
    }

    /// Takes in the new entries of `heads`' channels, each up to its head there, in that
    /// order, then covers `index`.
    fn catch_up(
        &self,
        chat: &ChatState,
        heads: Vec<(String, u64)>,
        index: u64,
    ) -> Result<(), chat_sm::Error> {
        for (channel, head) in heads {
            let from = self.inner.seen.lock().get(&channel).map_or(0, |&s| s + 1);
            if from > head {
                continue;
            }
            let last = take_in(chat, &self.inner.index, &channel, from.max(1), head)?;
            self.inner.seen.lock().insert(channel, last);
        }
        self.cover(index);
        Ok(())
    }

    fn cover(&self, index: u64) {
        self.inner.covered.send_if_modified(|covered| {
            let grew = index > *covered;
            *covered = (*covered).max(index);
            grew
        });
    }

    /// Drops what retention expired.
    fn trim(&self, chat: &ChatState) {
        let channels: Vec<String> = self.inner.seen.lock().keys().cloned().collect();
        let mut index = self.inner.index.write();
        for channel in channels {
            index.trim(&channel, chat.floor(&channel).0);
        }
    }
}

/// Keeps the index's size in the metrics, every few seconds.
pub async fn count_into(
    searcher: Searcher,
    messages: prometheus_client::metrics::gauge::Gauge,
    bytes: prometheus_client::metrics::gauge::Gauge,
) {
    let mut every = tokio::time::interval(Duration::from_secs(5));
    loop {
        every.tick().await;
        let (count, size) = searcher.size();
        messages.set(i64::try_from(count).unwrap_or(i64::MAX));
        bytes.set(i64::try_from(size).unwrap_or(i64::MAX));
    }
}

/// Takes the entries of `channel` from seq `from` through seq `through` (or its head, if
/// lower) into `index`, a page at a time (read outside the lock, so searches wait for one
/// page at most); answers the last seq taken in (`from - 1` when there was none).
fn take_in(
    chat: &ChatState,
    index: &RwLock<SearchIndex>,
    channel: &str,
    from: u64,
    through: u64,
) -> Result<u64, chat_sm::Error> {
    let mut next = from.max(1);
    let mut last = next - 1;
    while next <= through {
        let page = chat.history(channel, ChannelSeq(next), READ_PAGE)?;
        let page = &page[..page.partition_point(|m| m.seq.0 <= through)];
        let Some(end) = page.last().map(|m| m.seq.0) else {
            return Ok(last);
        };
        let mut index = index.write();
        for message in page {
            take_message(&mut index, channel, message);
        }
        last = end;
        next = end + 1;
    }
    Ok(last)
}

/// One entry's effect on the index: a message (or reply) is indexed when plaintext, an edit
/// replaces its target's text, a delete removes its target, a reaction changes nothing.
fn take_message(index: &mut SearchIndex, channel: &str, message: &chat_sm::Message) {
    let seq = message.seq.0;
    match &message.meta.relation {
        Some(Relation::Delete { of }) => index.remove(channel, of.0),
        Some(Relation::React { .. }) => {}
        // An erased edit says nothing: its delete removes the target too.
        Some(Relation::Edit { of }) if !message.meta.deleted => match plaintext_of(&message.body) {
            Some(text) => index.insert(channel, of.0, &message.sender, text),
            None => index.remove(channel, of.0),
        },
        Some(Relation::Edit { .. }) => {}
        None | Some(Relation::Reply { .. }) if message.meta.deleted => index.remove(channel, seq),
        None | Some(Relation::Reply { .. }) => {
            // A message read late may carry its newest edit: that is its text now.
            let current = message.edit.as_deref().unwrap_or(message);
            if let Some(text) = plaintext_of(&current.body) {
                index.insert(channel, seq, &message.sender, text);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chat_sm::{ApplyEntry, ApplyPayload, ClientId, Command, LogIndex, RaftMeta, SendCmd};

    use super::*;

    fn apply_send(chat: &ChatState, index: u64, text: &str) {
        apply_send_to(chat, "general", index, text);
    }

    fn apply_send_to(chat: &ChatState, channel: &str, index: u64, text: &str) {
        let command = Command::Send(SendCmd {
            channel: channel.into(),
            sender: "alice".into(),
            body: [&[0u8][..], text.as_bytes()].concat(),
            client_id: ClientId([1; 16]),
            client_seq: index,
            at_ms: 1_000 + index,
        });
        let entry = ApplyEntry {
            index: LogIndex(index),
            payload: ApplyPayload::Command(&command),
        };
        let meta = RaftMeta {
            last_applied: index.to_be_bytes().to_vec(),
            membership: None,
        };
        chat.apply(&[entry], meta);
    }

    /// A state holding one message ("first words" at index 1) and a running indexer over it
    /// that gathers for ten minutes, once its first build covers that message.
    async fn started() -> (
        tempfile::TempDir,
        Arc<ChatState>,
        Searcher,
        tokio::task::JoinHandle<()>,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let chat = Arc::new(ChatState::open(chat_sm::Config::new(dir.path())).expect("open"));
        let searcher = Searcher::gathering_for(Duration::from_secs(600));
        let listener = searcher.clone();
        chat.set_apply_listener(Box::new(move |event| listener.applied(event)));
        apply_send(&chat, 1, "first words");
        let indexer = tokio::spawn(searcher.clone().run(chat.clone()));
        tokio::time::timeout(
            Duration::from_secs(10),
            searcher.covered().wait_for(|&c| c >= 1),
        )
        .await
        .expect("the first build covers the state")
        .expect("indexer alive");
        (dir, chat, searcher, indexer)
    }

    fn hits(searcher: &Searcher, text: &str) -> usize {
        let query = Query::parse(text).expect("query");
        searcher.query(&query, |_| true, 10).hits.len()
    }

    /// The gathering delays only other users' messages: a search waiting for its read token
    /// ends it at once. The gathering here is far longer than the test's patience, so the
    /// coverage can only come from the search's signal.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_search_ends_the_gathering() {
        let (_dir, chat, searcher, indexer) = started().await;
        let mut covered = searcher.covered();
        assert_eq!(hits(&searcher, "first"), 1);

        apply_send(&chat, 2, "second words");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(*covered.borrow(), 1, "nobody waits: the entry gathers");
        assert_eq!(hits(&searcher, "second"), 0);

        let waiting = searcher.waiting();
        tokio::time::timeout(Duration::from_secs(10), covered.wait_for(|&c| c >= 2))
            .await
            .expect("a waiting search ends the gathering")
            .expect("indexer alive");
        drop(waiting);
        assert_eq!(hits(&searcher, "second"), 1);
        indexer.abort();
    }

    /// Hits are newest first across channels, also when one pass takes in entries of many
    /// channels at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_gathered_pass_keeps_the_log_order_across_channels() {
        let (_dir, chat, searcher, indexer) = started().await;
        let mut covered = searcher.covered();

        // Channel names out of name order, two of them twice, so that neither a map's order
        // nor the names' order matches the log's.
        let order = [
            "zulu", "alpha", "mike", "bravo", "yankee", "charlie", "alpha", "zulu",
        ];
        for (i, channel) in order.iter().enumerate() {
            apply_send_to(&chat, channel, 2 + i as u64, "gathered word");
        }
        let last = 1 + order.len() as u64;
        let waiting = searcher.waiting();
        tokio::time::timeout(Duration::from_secs(10), covered.wait_for(|&c| c >= last))
            .await
            .expect("a waiting search ends the gathering")
            .expect("indexer alive");
        drop(waiting);
        let query = Query::parse("gathered").expect("query");
        let hits: Vec<(String, u64)> = searcher
            .query(&query, |_| true, 20)
            .hits
            .into_iter()
            .map(|hit| (hit.channel, hit.seq))
            .collect();
        let mut seqs = HashMap::new();
        let mut expected: Vec<(String, u64)> = order
            .iter()
            .map(|channel| {
                let seq = seqs.entry(*channel).or_insert(0);
                *seq += 1;
                ((*channel).to_owned(), *seq)
            })
            .collect();
        expected.reverse();
        assert_eq!(hits, expected);
        indexer.abort();
    }
}
