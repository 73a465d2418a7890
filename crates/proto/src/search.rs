//! Full-text search: the query language shared by nodes and clients, and [`SearchIndex`], the
//! index each node keeps over the plaintext messages its state machine applied (clients build
//! one over the decrypted history of an encrypted channel).
//!
//! Every node keeps its own index in memory, fed with the messages it applies (and rebuilt from
//! the state machine when the node starts), so any node can answer a search without a Raft
//! round trip.
//!
//! # What is indexed
//!
//! Only plaintext bodies: the legacy `0x00` format and the signed plaintext `0x02` format
//! ([`plaintext_of`] extracts their text). Encrypted bodies (`0x01`, `0x03`) and unknown formats
//! are opaque to servers and never searchable here. A message is identified by its channel and
//! sequence number; [`SearchIndex::insert`] of an existing (channel, seq) replaces its text
//! (an edit), [`SearchIndex::remove`] forgets it (a deletion) and [`SearchIndex::trim`] forgets
//! a channel's messages below a sequence number (retention).
//!
//! # Tokenizer
//!
//! A token is a maximal run of alphanumeric characters (`char::is_alphanumeric`, so letters and
//! digits of every script) and `_`, with leading and trailing `_` removed, lower-cased with
//! `str::to_lowercase`. Everything else separates tokens: `don't` is `don` and `t`. Tokens
//! longer than [`MAX_TOKEN_BYTES`] (after lower-casing) are not indexed, and indexing stops after
//! [`MAX_TOKENS_PER_MESSAGE`] tokens of one message. Each distinct token of a message is posted
//! once; there is no stemming, no stop-word list and no accent folding.
//!
//! # Query syntax
//!
//! Whitespace-separated terms, all of which must match (AND):
//! - a word matches messages containing it; it is tokenized like message text, so `don't`
//!   requires both `don` and `t`, and a word longer than [`MAX_TOKEN_BYTES`] matches nothing;
//! - a word ending in `*` is a prefix: `depl*` matches `deploy`, `deployed`, ... It needs at
//!   least [`MIN_PREFIX_CHARS`] characters before the `*` and expands to at most
//!   [`MAX_PREFIX_EXPANSION`] tokens, the first in lexicographic order (type more letters to
//!   narrow it);
//! - `from:NAME` matches messages whose sender is exactly `NAME`;
//! - `in:CHANNEL` or `in:#CHANNEL` matches messages of exactly that channel.
//!
//! Filter keywords are lower-case. A query holds at most [`MAX_QUERY_BYTES`] bytes and at most
//! [`MAX_TERMS`] terms (a word that splits into several tokens counts each). A query with
//! neither a word nor a filter is [`QueryError::Empty`]; a query of filters only is fine.
//!
//! # Ordering and limits
//!
//! Hits come newest first, by the order in which each message's current text was indexed: an
//! edited message counts as new at its edit. One query returns at most [`MAX_HITS`] hits and
//! looks at most at [`SCAN_MAX`] candidate messages; a query that reached that cap before
//! filling its page says so with [`SearchPage::truncated`].
//!
//! The caller's access check runs at most once per channel per query, for the channels of the
//! candidates looked at (before their words are checked, so the messages of channels the asker
//! may not read cost little to skip).
//!
//! # Query cost
//!
//! The term with the shortest posting list drives: its list is walked from newest to oldest
//! and each candidate is checked against the other terms (filters by comparing the message's
//! channel and sender, words by a forward-only search of their lists that decodes one block at
//! a time). A prefix term's lists are merged when it drives; when it is checked, a candidate is
//! looked up in each of its lists until the lookups outnumber the lists' entries, and then the
//! lists are decoded once into a bitmap of documents. A query therefore costs at most about
//! [`SCAN_MAX`] candidate steps plus the decoding of its lists, and allocates one byte per
//! channel and at most one bit per document per prefix.
//!
//! # Memory
//!
//! Each indexed text version gets a document number. Per live message the index holds a
//! 16-byte document entry, 4 bytes in its channel's sequence table, and its document number in
//! the channel's, the sender's and each token's posting list. Posting lists are delta-coded
//! (LEB128 varints in blocks of 64 entries, each block starting with an absolute number and
//! listed in a skip table), so an entry costs one byte in lists of common tokens and a few
//! in lists of rare ones. Each distinct token costs two copies of its text (a hash map
//! for lookups, an ordered set for prefixes) plus roughly 200 bytes of table slots, list
//! header and allocations. Channel and sender names are stored twice as well.
//!
//! Edits, deletions and trims leave dead documents in the lists (skipped by queries); once they
//! exceed a quarter of all documents, the change that crossed the line rebuilds every table
//! without them, renumbering the live documents in order. That one call takes time
//! proportional to the whole index, but it comes only after a quarter of the index changed, so
//! the cost per change stays small on average and memory stays within a third above the live
//! messages' share.

use std::borrow::Cow;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::mem;
use std::ops::Bound;

/// Body format byte of legacy plaintext: the rest of the body is the text.
pub const FORMAT_PLAINTEXT: u8 = 0x00;
/// Body format byte of signed plaintext v2: session, text, signature.
pub const FORMAT_SIGNED_V2: u8 = 0x02;
/// Length of the session tag that opens a `0x02` body after the format byte.
const SESSION_LEN: usize = 16;
/// Length of the Ed25519 signature that closes a `0x02` body.
const SIGNATURE_LEN: usize = 64;

/// Longest indexed token, in bytes of lower-cased UTF-8. Longer runs are hashes, keys or
/// base64 noise that nobody types into a search box, and they would bloat the dictionary.
pub const MAX_TOKEN_BYTES: usize = 64;
/// Most tokens indexed from one message (a body is at most 16 KiB anyway), so one insert's
/// work is bounded.
pub const MAX_TOKENS_PER_MESSAGE: usize = 4096;
/// Longest query text, in bytes.
pub const MAX_QUERY_BYTES: usize = 1024;
/// Most terms in one query (words, prefixes and filters), bounding the lists one query
/// intersects.
pub const MAX_TERMS: usize = 16;
/// Fewest characters before a prefix term's `*`: a one-letter prefix would expand to a large
/// slice of the dictionary and match nearly everything.
pub const MIN_PREFIX_CHARS: usize = 2;
/// Most tokens a prefix term expands to (the first in lexicographic order), bounding the lists
/// one prefix merges.
pub const MAX_PREFIX_EXPANSION: usize = 128;
/// Most hits one query returns; larger limits are lowered to this.
pub const MAX_HITS: usize = 100;
/// Most candidate documents one query looks at before it gives up with
/// [`SearchPage::truncated`], so a query whose terms are common but rarely together (or whose
/// channels the asker may not read) still ends quickly.
pub const SCAN_MAX: usize = 200_000;
/// Entries per block of a posting list: a membership test decodes one block, and each block
/// costs 8 bytes of skip table.
const BLOCK: usize = 64;
/// Most document slots (live or dead). Document numbers are `u32` and list offsets too; past
/// this, inserts are dropped (a node runs out of memory long before).
const MAX_DOCS: usize = 1 << 28;

/// The searchable text of a message body, or `None` when the body is not plaintext: encrypted
/// (`0x01`, `0x03`), of an unknown format, too short for its format, or not UTF-8.
pub fn plaintext_of(body: &[u8]) -> Option<&str> {
    let (&format, rest) = body.split_first()?;
    let text = match format {
        FORMAT_PLAINTEXT => rest,
        FORMAT_SIGNED_V2 => rest.get(SESSION_LEN..rest.len().checked_sub(SIGNATURE_LEN)?)?,
        _ => return None,
    };
    std::str::from_utf8(text).ok()
}

/// The tokens of `text` in order, repeats included (see the module documentation for the
/// rules). Lower-casing allocates only for tokens that are not already lower-case ASCII.
fn tokens(text: &str) -> impl Iterator<Item = Cow<'_, str>> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .map(|word| word.trim_matches('_'))
        .filter(|word| !word.is_empty())
        .map(|word| {
            if word
                .bytes()
                .any(|b| b.is_ascii_uppercase() || !b.is_ascii())
            {
                Cow::Owned(word.to_lowercase())
            } else {
                Cow::Borrowed(word)
            }
        })
}

/// The distinct tokens indexed for a message's `text`: short enough, from the first
/// [`MAX_TOKENS_PER_MESSAGE`], sorted.
fn index_tokens(text: &str) -> Vec<Cow<'_, str>> {
    let mut all: Vec<Cow<'_, str>> = tokens(text)
        .filter(|token| token.len() <= MAX_TOKEN_BYTES)
        .take(MAX_TOKENS_PER_MESSAGE)
        .collect();
    all.sort_unstable();
    all.dedup();
    all
}

/// Why a query text is not a query.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum QueryError {
    /// No word and no filter.
    #[error("the query has no search term")]
    Empty,
    /// Longer than [`MAX_QUERY_BYTES`].
    #[error("the query is {len} bytes long; at most {max} are allowed")]
    TooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// More than [`MAX_TERMS`] terms.
    #[error("the query has {count} terms; at most {max} are allowed")]
    TooManyTerms {
        /// Terms in it.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A prefix term with fewer than [`MIN_PREFIX_CHARS`] characters before its `*`.
    #[error("prefix term `{term}` needs at least {MIN_PREFIX_CHARS} letters before the `*`")]
    PrefixTooShort {
        /// The term.
        term: String,
    },
    /// `from:` or `in:` with nothing after it.
    #[error("filter `{term}` names nobody")]
    EmptyFilter {
        /// The term.
        term: String,
    },
}

/// A parsed search query: every part must match (see the module documentation for the syntax).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Tokens a message must contain.
    words: Vec<String>,
    /// Prefixes each of which some token of the message must start with.
    prefixes: Vec<String>,
    /// Senders the message must be from (all equal, or nothing matches).
    senders: Vec<String>,
    /// Channels the message must be in (all equal, or nothing matches).
    channels: Vec<String>,
}

impl Query {
    /// Parses a query text.
    ///
    /// # Errors
    ///
    /// [`QueryError`] when the text is too long, has too many terms, a too-short prefix, an
    /// empty filter, or nothing to search for.
    pub fn parse(text: &str) -> Result<Query, QueryError> {
        if text.len() > MAX_QUERY_BYTES {
            return Err(QueryError::TooLong {
                len: text.len(),
                max: MAX_QUERY_BYTES,
            });
        }
        let mut query = Query {
            words: Vec::new(),
            prefixes: Vec::new(),
            senders: Vec::new(),
            channels: Vec::new(),
        };
        for term in text.split_whitespace() {
            if let Some(name) = term.strip_prefix("from:") {
                if name.is_empty() {
                    return Err(QueryError::EmptyFilter { term: term.into() });
                }
                query.senders.push(name.into());
            } else if let Some(name) = term.strip_prefix("in:") {
                let name = name.strip_prefix('#').unwrap_or(name);
                if name.is_empty() {
                    return Err(QueryError::EmptyFilter { term: term.into() });
                }
                query.channels.push(name.into());
            } else if let Some(stem) = term.strip_suffix('*') {
                let mut words: Vec<String> = tokens(stem).map(Cow::into_owned).collect();
                let prefix = words
                    .pop()
                    .filter(|p| p.chars().count() >= MIN_PREFIX_CHARS);
                let Some(prefix) = prefix else {
                    return Err(QueryError::PrefixTooShort { term: term.into() });
                };
                query.words.extend(words);
                query.prefixes.push(prefix);
            } else {
                query.words.extend(tokens(term).map(Cow::into_owned));
            }
        }
        let count =
            query.words.len() + query.prefixes.len() + query.senders.len() + query.channels.len();
        if count > MAX_TERMS {
            return Err(QueryError::TooManyTerms {
                count,
                max: MAX_TERMS,
            });
        }
        if count == 0 {
            return Err(QueryError::Empty);
        }
        for part in [
            &mut query.words,
            &mut query.prefixes,
            &mut query.senders,
            &mut query.channels,
        ] {
            part.sort_unstable();
            part.dedup();
        }
        Ok(query)
    }
}

/// One matching message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    /// Its channel.
    pub channel: String,
    /// Its seq in the channel.
    pub seq: u64,
    /// Who sent it.
    pub sender: String,
}

/// The answer to one query: hits newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SearchPage {
    /// The matching messages, newest first.
    pub hits: Vec<Hit>,
    /// The query stopped at [`SCAN_MAX`] candidates before it found `limit` hits: older
    /// matches may exist.
    pub truncated: bool,
}

/// The in-memory full-text index of one node (see the module documentation).
#[derive(Debug)]
pub struct SearchIndex {
    /// Every document slot by document number, live or dead.
    docs: Vec<Doc>,
    /// Which slots are dead (removed, trimmed, or replaced by an edit).
    tombs: Tombstones,
    /// Token to the documents containing it: one hash lookup per token of an insert.
    terms: HashMap<Box<str>, Postings>,
    /// The tokens of `terms` in order, so a prefix is a range. A second copy of each token,
    /// but a B-tree lookup per indexed token would cost several string comparisons, each a
    /// cache miss; this one changes only when a new token appears.
    sorted_terms: BTreeSet<Box<str>>,
    /// Estimated heap bytes of `terms` and `sorted_terms`, kept up to date so
    /// [`SearchIndex::heap_bytes`] need not walk the dictionary.
    term_bytes: usize,
    channels: Vec<Channel>,
    channel_ids: HashMap<Box<str>, u32>,
    senders: Vec<Sender>,
    sender_ids: HashMap<Box<str>, u32>,
    /// [`SCAN_MAX`], lowered by tests.
    scan_max: usize,
}

/// One version of one message's text.
#[derive(Debug, Clone, Copy)]
struct Doc {
    channel: u32,
    sender: u32,
    seq: u64,
}

#[derive(Debug, Default)]
struct Channel {
    name: Box<str>,
    /// Documents of the channel in document order, for `in:` and for trims.
    docs: Postings,
    /// Document numbers sorted by sequence number, one per sequence number: the current
    /// version, or a dead one for a deleted message (dropped at the next compaction).
    by_seq: Vec<u32>,
}

#[derive(Debug, Default)]
struct Sender {
    name: Box<str>,
    /// Documents of the sender in document order, for `from:`.
    docs: Postings,
}

/// Approximate bytes of one token's entries in the hash table (between 44 and 88 % full, plus
/// a control byte) and in the sorted set's B-tree nodes (between half and completely full),
/// besides the token's two copies and its list.
const TERM_SLOT_BYTES: usize =
    (mem::size_of::<(Box<str>, Postings)>() + 1) * 3 / 2 + mem::size_of::<Box<str>>() * 3 / 2;

impl Default for SearchIndex {
    fn default() -> Self {
        SearchIndex::new()
    }
}

impl SearchIndex {
    /// An empty index.
    pub fn new() -> Self {
        SearchIndex {
            docs: Vec::new(),
            tombs: Tombstones::default(),
            terms: HashMap::new(),
            sorted_terms: BTreeSet::new(),
            term_bytes: 0,
            channels: Vec::new(),
            channel_ids: HashMap::new(),
            senders: Vec::new(),
            sender_ids: HashMap::new(),
            scan_max: SCAN_MAX,
        }
    }

    /// Indexes a message's text, replacing any earlier text of the same (channel, seq), which
    /// is how edits arrive. The new text counts as the newest document.
    pub fn insert(&mut self, channel: &str, seq: u64, sender: &str, text: &str) {
        if self.docs.len() >= MAX_DOCS {
            // No room for another slot: at least the stale text must stop matching.
            self.remove(channel, seq);
            return;
        }
        let (Some(ch), Some(from)) = (self.channel_id(channel), self.sender_id(sender)) else {
            return;
        };
        // Below MAX_DOCS, so it fits.
        let doc = self.docs.len() as u32;
        let docs = &self.docs;
        let Some(chan) = self.channels.get_mut(ch as usize) else {
            return;
        };
        match chan.by_seq.binary_search_by_key(&seq, |&d| seq_of(docs, d)) {
            Ok(pos) => {
                if let Some(slot) = chan.by_seq.get_mut(pos) {
                    self.tombs.kill(mem::replace(slot, doc));
                }
            }
            Err(pos) => chan.by_seq.insert(pos, doc),
        }
        chan.docs.push(doc);
        if let Some(author) = self.senders.get_mut(from as usize) {
            author.docs.push(doc);
        }
        self.docs.push(Doc {
            channel: ch,
            sender: from,
            seq,
        });
        self.tombs.cover(self.docs.len());
        for token in index_tokens(text) {
            match self.terms.get_mut(&*token) {
                Some(list) => {
                    let before = list.heap_bytes();
                    list.push(doc);
                    self.term_bytes += list.heap_bytes().saturating_sub(before);
                }
                None => {
                    let mut list = Postings::default();
                    list.push(doc);
                    self.term_bytes += 2 * token.len() + list.heap_bytes() + TERM_SLOT_BYTES;
                    self.sorted_terms.insert(Box::from(&*token));
                    self.terms.insert(token.into(), list);
                }
            }
        }
        self.maybe_compact();
    }

    /// Forgets a message (deleted): it never matches again.
    pub fn remove(&mut self, channel: &str, seq: u64) {
        let Some(&ch) = self.channel_ids.get(channel) else {
            return;
        };
        let docs = &self.docs;
        let Some(chan) = self.channels.get(ch as usize) else {
            return;
        };
        if let Ok(pos) = chan.by_seq.binary_search_by_key(&seq, |&d| seq_of(docs, d)) {
            if let Some(&doc) = chan.by_seq.get(pos) {
                self.tombs.kill(doc);
            }
        }
        self.maybe_compact();
    }

    /// Forgets every message of `channel` with a sequence number below `first_kept` (retention
    /// trimmed them). Costs time proportional to the channel's documents.
    pub fn trim(&mut self, channel: &str, first_kept: u64) {
        let Some(&ch) = self.channel_ids.get(channel) else {
            return;
        };
        let docs = &self.docs;
        let Some(chan) = self.channels.get_mut(ch as usize) else {
            return;
        };
        let cut = chan
            .by_seq
            .partition_point(|&d| seq_of(docs, d) < first_kept);
        if cut == 0 {
            return;
        }
        for doc in chan.by_seq.drain(..cut) {
            self.tombs.kill(doc);
        }
        // Drop the channel's dead documents from its own list now, so `in:` queries on a
        // trimmed channel do not wade through them until the next compaction.
        let tombs = &self.tombs;
        let kept: Postings = chan.docs.iter().filter(|&d| !tombs.is_dead(d)).collect();
        chan.docs = kept;
        self.maybe_compact();
    }

    /// Live messages.
    pub fn len(&self) -> usize {
        self.docs.len().saturating_sub(self.tombs.count)
    }

    /// Whether no live message is indexed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rough heap bytes held by the index, for a metric: the capacities of its tables and lists
    /// and an estimate of the dictionary's slots, without allocator overhead. Costs time
    /// proportional to the number of channels and senders.
    pub fn heap_bytes(&self) -> usize {
        let names = |ids: &HashMap<Box<str>, u32>| {
            ids.capacity() * (mem::size_of::<(Box<str>, u32)>() + 1)
                + ids.keys().map(|name| 2 * name.len()).sum::<usize>()
        };
        self.docs.capacity() * mem::size_of::<Doc>()
            + self.tombs.bits.capacity() * mem::size_of::<u64>()
            + self.term_bytes
            + self.channels.capacity() * mem::size_of::<Channel>()
            + self
                .channels
                .iter()
                .map(|c| c.docs.heap_bytes() + c.by_seq.capacity() * mem::size_of::<u32>())
                .sum::<usize>()
            + names(&self.channel_ids)
            + self.senders.capacity() * mem::size_of::<Sender>()
            + self
                .senders
                .iter()
                .map(|s| s.docs.heap_bytes())
                .sum::<usize>()
            + names(&self.sender_ids)
    }

    /// The newest messages matching `query` in channels `admits` lets through, at most `limit`
    /// (itself at most [`MAX_HITS`]). `admits(channel)` is the caller's access check, called at
    /// most once per channel; see the module documentation for the cost.
    pub fn query(
        &self,
        query: &Query,
        mut admits: impl FnMut(&str) -> bool,
        limit: usize,
    ) -> SearchPage {
        let mut page = SearchPage::default();
        let limit = limit.min(MAX_HITS);
        if limit == 0 {
            return page;
        }
        // The caller's answer per channel id, asked on first need.
        let mut admitted: Vec<Option<bool>> = vec![None; self.channels.len()];
        let mut admit = |id: u32| match admitted.get_mut(id as usize) {
            Some(Some(known)) => *known,
            Some(unknown) => {
                let answer = self
                    .channels
                    .get(id as usize)
                    .is_some_and(|c| admits(&c.name));
                *unknown = Some(answer);
                answer
            }
            None => false,
        };
        // Each term as a set of lists and its size; any missing part means no match at all.
        let mut terms: Vec<(usize, Term<'_>)> = Vec::new();
        for name in &query.channels {
            let Some((id, chan)) = lookup(&self.channel_ids, &self.channels, name) else {
                return page;
            };
            // A channel the asker may not read: nothing to scan.
            if !admit(id) {
                return page;
            }
            terms.push((chan.docs.len(), Term::Channel(id, &chan.docs)));
        }
        for name in &query.senders {
            let Some((id, author)) = lookup(&self.sender_ids, &self.senders, name) else {
                return page;
            };
            terms.push((author.docs.len(), Term::Sender(id, &author.docs)));
        }
        for word in &query.words {
            let Some(list) = self.terms.get(word.as_str()) else {
                return page;
            };
            terms.push((list.len(), Term::Lists(vec![list])));
        }
        for prefix in &query.prefixes {
            let mut lists: Vec<&Postings> = self
                .sorted_terms
                .range::<str, _>((Bound::Included(prefix.as_str()), Bound::Unbounded))
                .take_while(|token| token.starts_with(prefix.as_str()))
                .take(MAX_PREFIX_EXPANSION)
                .filter_map(|token| self.terms.get(token))
                .collect();
            if lists.is_empty() {
                return page;
            }
            // Longest first: as a check, the likeliest list to hold a candidate is tried first.
            lists.sort_by_key(|list| std::cmp::Reverse(list.len()));
            terms.push((lists.iter().map(|l| l.len()).sum(), Term::Lists(lists)));
        }
        terms.sort_by_key(|(size, _)| *size);
        let mut terms = terms.into_iter().map(|(_, term)| term);
        let Some(driver) = terms.next() else {
            return page;
        };
        let driver = Driver::new(match driver {
            Term::Channel(_, list) | Term::Sender(_, list) => vec![list],
            Term::Lists(lists) => lists,
        });
        // Field comparisons first, then the access check (cached, so a channel the asker may
        // not read costs no list search), then list searches, shortest list first.
        let mut fields: Vec<Field> = Vec::new();
        let mut lists: Vec<AnyOf<'_>> = Vec::new();
        for term in terms {
            match term {
                Term::Channel(id, _) => fields.push(Field::Channel(id)),
                Term::Sender(id, _) => fields.push(Field::Sender(id)),
                Term::Lists(any) => lists.push(AnyOf::new(any)),
            }
        }
        for (scanned, id) in driver.enumerate() {
            if scanned == self.scan_max {
                page.truncated = true;
                break;
            }
            if self.tombs.is_dead(id) {
                continue;
            }
            let Some(doc) = self.docs.get(id as usize) else {
                continue;
            };
            if !fields.iter().all(|field| field.matches(doc)) || !admit(doc.channel) {
                continue;
            }
            // Each list is asked about decreasing documents only, as a probe requires.
            if !lists
                .iter_mut()
                .all(|any| any.contains(id, self.docs.len()))
            {
                continue;
            }
            let (Some(chan), Some(author)) = (
                self.channels.get(doc.channel as usize),
                self.senders.get(doc.sender as usize),
            ) else {
                continue;
            };
            page.hits.push(Hit {
                channel: chan.name.to_string(),
                seq: doc.seq,
                sender: author.name.to_string(),
            });
            if page.hits.len() == limit {
                break;
            }
        }
        page
    }

    fn channel_id(&mut self, name: &str) -> Option<u32> {
        if let Some(&id) = self.channel_ids.get(name) {
            return Some(id);
        }
        let id = u32::try_from(self.channels.len()).ok()?;
        self.channel_ids.insert(name.into(), id);
        self.channels.push(Channel {
            name: name.into(),
            ..Channel::default()
        });
        Some(id)
    }

    fn sender_id(&mut self, name: &str) -> Option<u32> {
        if let Some(&id) = self.sender_ids.get(name) {
            return Some(id);
        }
        let id = u32::try_from(self.senders.len()).ok()?;
        self.sender_ids.insert(name.into(), id);
        self.senders.push(Sender {
            name: name.into(),
            ..Sender::default()
        });
        Some(id)
    }

    /// Compacts once dead documents exceed a quarter of all: queries then skip at most about
    /// one dead entry per three live ones, and the rebuild's cost is spread over as many changes
    /// as the index has documents divided by four.
    fn maybe_compact(&mut self) {
        if self.tombs.count > 0 && self.tombs.count * 4 > self.docs.len() {
            self.compact();
        }
    }

    /// Rebuilds every table without dead documents, renumbering the live ones in the same order
    /// (so the newest-first order is kept) and dropping tokens, channels and senders left with
    /// no live document.
    fn compact(&mut self) {
        const GONE: u32 = u32::MAX;
        let mut renumber = vec![GONE; self.docs.len()];
        let mut channel_map = vec![GONE; self.channels.len()];
        let mut sender_map = vec![GONE; self.senders.len()];
        let mut docs = Vec::with_capacity(self.len());
        let mut channels: Vec<Channel> = Vec::new();
        let mut senders: Vec<Sender> = Vec::new();
        for (old, doc) in self.docs.iter().enumerate() {
            // Document numbers and channel and sender ids fit u32 (see insert).
            if self.tombs.is_dead(old as u32) {
                continue;
            }
            let new = docs.len() as u32;
            let (Some(ch), Some(from), Some(slot)) = (
                channel_map.get_mut(doc.channel as usize),
                sender_map.get_mut(doc.sender as usize),
                renumber.get_mut(old),
            ) else {
                continue;
            };
            *slot = new;
            if *ch == GONE {
                *ch = channels.len() as u32;
                let name = self
                    .channels
                    .get_mut(doc.channel as usize)
                    .map(|c| mem::take(&mut c.name));
                channels.push(Channel {
                    name: name.unwrap_or_default(),
                    ..Channel::default()
                });
            }
            if *from == GONE {
                *from = senders.len() as u32;
                let name = self
                    .senders
                    .get_mut(doc.sender as usize)
                    .map(|s| mem::take(&mut s.name));
                senders.push(Sender {
                    name: name.unwrap_or_default(),
                    ..Sender::default()
                });
            }
            if let Some(chan) = channels.get_mut(*ch as usize) {
                chan.docs.push(new);
            }
            if let Some(author) = senders.get_mut(*from as usize) {
                author.docs.push(new);
            }
            docs.push(Doc {
                channel: *ch,
                sender: *from,
                seq: doc.seq,
            });
        }
        let live = |old: &u32| renumber.get(*old as usize).copied().filter(|&n| n != GONE);
        for (old, chan) in self.channels.iter().enumerate() {
            let new = channel_map.get(old).copied().unwrap_or(GONE);
            if let Some(target) = channels.get_mut(new as usize) {
                target.by_seq = chan.by_seq.iter().filter_map(live).collect();
            }
        }
        let mut term_bytes = 0;
        self.terms.retain(|token, list| {
            *list = list.iter().filter_map(|old| live(&old)).collect();
            term_bytes += 2 * token.len() + list.heap_bytes() + TERM_SLOT_BYTES;
            !list.is_empty()
        });
        let terms = &self.terms;
        self.sorted_terms.retain(|token| terms.contains_key(token));
        self.term_bytes = term_bytes;
        self.channel_ids = names_to_ids(&channels, |c| &c.name);
        self.sender_ids = names_to_ids(&senders, |s| &s.name);
        self.channels = channels;
        self.senders = senders;
        self.docs = docs;
        self.tombs = Tombstones::default();
        self.tombs.cover(self.docs.len());
    }
}

/// The sequence number of document `doc` (`u64::MAX` for a number out of range, which the
/// tables never hold).
fn seq_of(docs: &[Doc], doc: u32) -> u64 {
    docs.get(doc as usize).map_or(u64::MAX, |d| d.seq)
}

fn lookup<'a, T>(ids: &HashMap<Box<str>, u32>, table: &'a [T], name: &str) -> Option<(u32, &'a T)> {
    let &id = ids.get(name)?;
    Some((id, table.get(id as usize)?))
}

fn names_to_ids<T>(table: &[T], name: impl Fn(&T) -> &str) -> HashMap<Box<str>, u32> {
    // The table came from u32 ids, so its positions fit.
    (0..)
        .zip(table)
        .map(|(id, item)| (Box::from(name(item)), id))
        .collect()
}

/// A query term resolved to posting lists.
enum Term<'a> {
    Channel(u32, &'a Postings),
    Sender(u32, &'a Postings),
    /// One list for a word; a prefix's expansion, any of which may hold a match.
    Lists(Vec<&'a Postings>),
}

/// A filter checked against each candidate of the driving term.
enum Field {
    Channel(u32),
    Sender(u32),
}

impl Field {
    fn matches(&self, doc: &Doc) -> bool {
        match self {
            Field::Channel(ch) => doc.channel == *ch,
            Field::Sender(from) => doc.sender == *from,
        }
    }
}

/// The lists of one query term, any of which may hold a match, checked against candidates.
///
/// Probing costs up to one test per list per candidate, which adds up for a prefix of many
/// lists that rarely match. So once the tests made exceed the entries of all its lists, the
/// lists are decoded once into a bitmap of documents: a term never costs much more than twice
/// the cheaper of the two ways.
struct AnyOf<'a> {
    probes: Vec<Probe<'a>>,
    tests: usize,
    entries: usize,
    bits: Option<Vec<u64>>,
}

impl<'a> AnyOf<'a> {
    fn new(lists: Vec<&'a Postings>) -> Self {
        AnyOf {
            entries: lists.iter().map(|list| list.len()).sum(),
            probes: lists.into_iter().map(Probe::new).collect(),
            tests: 0,
            bits: None,
        }
    }

    /// Whether a list holds `doc`, which must be below every document asked before; `docs`
    /// bounds the document numbers.
    fn contains(&mut self, doc: u32, docs: usize) -> bool {
        if self.bits.is_none() && self.probes.len() > 1 && self.tests > self.entries {
            let mut bits = vec![0u64; docs.div_ceil(64)];
            for probe in &self.probes {
                for entry in probe.list.iter() {
                    set_bit(&mut bits, entry);
                }
            }
            self.bits = Some(bits);
        }
        if let Some(bits) = &self.bits {
            return bit(bits, doc);
        }
        let tests = &mut self.tests;
        self.probes.iter_mut().any(|probe| {
            *tests += 1;
            probe.contains(doc)
        })
    }
}

fn bit(bits: &[u64], index: u32) -> bool {
    let index = index as usize;
    bits.get(index / 64)
        .is_some_and(|word| word >> (index % 64) & 1 == 1)
}

/// Sets bit `index`, returning whether it was clear.
fn set_bit(bits: &mut [u64], index: u32) -> bool {
    let index = index as usize;
    let Some(word) = bits.get_mut(index / 64) else {
        return false;
    };
    let mask = 1 << (index % 64);
    let was_clear = *word & mask == 0;
    *word |= mask;
    was_clear
}

/// Dead document slots, one bit each.
#[derive(Debug, Default)]
struct Tombstones {
    bits: Vec<u64>,
    count: usize,
}

impl Tombstones {
    fn is_dead(&self, doc: u32) -> bool {
        bit(&self.bits, doc)
    }

    /// Marks `doc` dead (once).
    fn kill(&mut self, doc: u32) {
        if set_bit(&mut self.bits, doc) {
            self.count += 1;
        }
    }

    /// Makes room for `docs` slots.
    fn cover(&mut self, docs: usize) {
        let words = docs.div_ceil(64);
        if self.bits.len() < words {
            self.bits.resize(words, 0);
        }
    }
}

/// A sorted list of document numbers, delta-coded.
///
/// Entries are LEB128 varints in blocks of [`BLOCK`]: a block's first entry is absolute, the
/// others are differences from their predecessor, so a block decodes on its own. The skip table
/// holds the first entry and byte offset of every block but the first (so a short list needs no
/// second allocation), which lets a search jump to the one block that may hold a number.
#[derive(Debug, Default, Clone)]
struct Postings {
    data: Vec<u8>,
    skips: Vec<Skip>,
    len: u32,
    last: u32,
}

#[derive(Debug, Clone, Copy)]
struct Skip {
    first: u32,
    offset: u32,
}

impl Postings {
    fn len(&self) -> usize {
        self.len as usize
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn heap_bytes(&self) -> usize {
        self.data.capacity() + self.skips.capacity() * mem::size_of::<Skip>()
    }

    /// Appends `doc`, which must exceed every entry (document numbers only grow).
    fn push(&mut self, doc: u32) {
        if self.len().is_multiple_of(BLOCK) {
            if self.len > 0 {
                // Lists hold fewer than MAX_DOCS entries of at most 5 bytes, so offsets fit.
                self.skips.push(Skip {
                    first: doc,
                    offset: self.data.len() as u32,
                });
            }
            put_varint(&mut self.data, doc);
        } else {
            debug_assert!(doc > self.last, "posting lists are appended in order");
            put_varint(&mut self.data, doc.wrapping_sub(self.last));
        }
        self.last = doc;
        self.len += 1;
    }

    fn blocks(&self) -> usize {
        self.len().div_ceil(BLOCK)
    }

    /// The first entry of block `block`.
    fn block_first(&self, block: usize) -> u32 {
        match block.checked_sub(1) {
            None => get_varint(&self.data, &mut 0).unwrap_or(u32::MAX),
            Some(skip) => self.skips.get(skip).map_or(u32::MAX, |s| s.first),
        }
    }

    /// Decodes block `block` into `buf`, returning how many entries it holds.
    fn decode_block(&self, block: usize, buf: &mut [u32; BLOCK]) -> usize {
        let mut pos = match block.checked_sub(1) {
            None => 0,
            Some(skip) => match self.skips.get(skip) {
                Some(s) => s.offset as usize,
                None => return 0,
            },
        };
        let count = self.len().saturating_sub(block * BLOCK).min(BLOCK);
        let mut doc = 0u32;
        for (i, slot) in buf.iter_mut().take(count).enumerate() {
            let Some(value) = get_varint(&self.data, &mut pos) else {
                return i;
            };
            doc = if i == 0 {
                value
            } else {
                doc.wrapping_add(value)
            };
            *slot = doc;
        }
        count
    }

    /// The entries in ascending order.
    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        let mut pos = 0;
        let mut doc = 0u32;
        (0..self.len()).map_while(move |i| {
            let value = get_varint(&self.data, &mut pos)?;
            doc = if i.is_multiple_of(BLOCK) {
                value
            } else {
                doc.wrapping_add(value)
            };
            Some(doc)
        })
    }
}

impl FromIterator<u32> for Postings {
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
        let mut list = Postings::default();
        for doc in iter {
            list.push(doc);
        }
        list.data.shrink_to_fit();
        list.skips.shrink_to_fit();
        list
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: u32) {
    while value >= 0x80 {
        out.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn get_varint(data: &[u8], pos: &mut usize) -> Option<u32> {
    let mut value = 0u32;
    let mut shift = 0;
    loop {
        let &byte = data.get(*pos)?;
        *pos += 1;
        value |= u32::from(byte & 0x7f).checked_shl(shift)?;
        if byte & 0x80 == 0 {
            return Some(value);
        }
        shift += 7;
    }
}

/// A list's entries from newest (largest) to oldest, one decoded block at a time.
struct Rev<'a> {
    list: &'a Postings,
    /// Blocks not yet decoded: `0..block`.
    block: usize,
    buf: [u32; BLOCK],
    /// Entries of `buf` not yet returned: `..pos`.
    pos: usize,
}

impl<'a> Rev<'a> {
    fn new(list: &'a Postings) -> Self {
        Rev {
            list,
            block: list.blocks(),
            buf: [0; BLOCK],
            pos: 0,
        }
    }
}

impl Iterator for Rev<'_> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        loop {
            if let Some(pos) = self.pos.checked_sub(1) {
                self.pos = pos;
                return self.buf.get(pos).copied();
            }
            self.block = self.block.checked_sub(1)?;
            self.pos = self.list.decode_block(self.block, &mut self.buf);
        }
    }
}

/// The driving term's documents, newest first, each once: one list walked backwards, or the
/// lists of a prefix merged through a heap of their heads.
enum Driver<'a> {
    One(Box<Rev<'a>>),
    Merge {
        lists: Vec<Rev<'a>>,
        heads: BinaryHeap<(u32, usize)>,
    },
}

impl<'a> Driver<'a> {
    fn new(mut lists: Vec<&'a Postings>) -> Self {
        if lists.len() == 1 {
            if let Some(list) = lists.pop() {
                return Driver::One(Box::new(Rev::new(list)));
            }
        }
        let mut lists: Vec<Rev<'a>> = lists.into_iter().map(Rev::new).collect();
        let heads = lists
            .iter_mut()
            .enumerate()
            .filter_map(|(i, list)| Some((list.next()?, i)))
            .collect();
        Driver::Merge { lists, heads }
    }
}

impl Iterator for Driver<'_> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        match self {
            Driver::One(list) => list.next(),
            Driver::Merge { lists, heads } => {
                let (doc, i) = heads.pop()?;
                let mut advance = |i: usize, heads: &mut BinaryHeap<(u32, usize)>| {
                    if let Some(next) = lists.get_mut(i).and_then(Iterator::next) {
                        heads.push((next, i));
                    }
                };
                advance(i, heads);
                // The same document under several tokens of the prefix.
                while let Some(&(same, j)) = heads.peek() {
                    if same != doc {
                        break;
                    }
                    heads.pop();
                    advance(j, heads);
                }
                Some(doc)
            }
        }
    }
}

/// Membership tests against one list for a strictly decreasing series of documents: a cursor
/// stays on the largest entry not above the last document asked, so a miss usually costs one
/// comparison, and moving on costs a binary search of one block or of the skip table.
struct Probe<'a> {
    list: &'a Postings,
    /// The decoded block, `None` before the first test.
    block: Option<usize>,
    buf: [u32; BLOCK],
    /// The cursor in `buf`.
    pos: usize,
    /// Every entry is above the last document asked.
    exhausted: bool,
}

impl<'a> Probe<'a> {
    fn new(list: &'a Postings) -> Self {
        Probe {
            list,
            block: None,
            buf: [0; BLOCK],
            pos: 0,
            exhausted: false,
        }
    }

    /// Whether the list holds `doc`, which must be below every document asked before.
    fn contains(&mut self, doc: u32) -> bool {
        if self.exhausted {
            return false;
        }
        let Some(block) = self.block else {
            return self.seek(self.list.blocks(), doc);
        };
        let cursor = self.buf.get(self.pos).copied().unwrap_or(0);
        if cursor <= doc {
            return cursor == doc;
        }
        if self.buf[0] <= doc {
            // Within this block, below the cursor.
            let below = self.buf.get(..self.pos).unwrap_or_default();
            self.pos = below.partition_point(|&d| d <= doc).saturating_sub(1);
            return self.buf.get(self.pos) == Some(&doc);
        }
        self.seek(block, doc)
    }

    /// Moves the cursor to the largest entry not above `doc` among blocks `0..upper`.
    fn seek(&mut self, upper: usize, doc: u32) -> bool {
        let (mut low, mut high) = (0, upper);
        while low < high {
            let mid = low + (high - low) / 2;
            if self.list.block_first(mid) <= doc {
                low = mid + 1;
            } else {
                high = mid;
            }
        }
        let Some(block) = low.checked_sub(1) else {
            self.exhausted = true;
            return false;
        };
        let count = self.list.decode_block(block, &mut self.buf);
        let Some(entries) = self.buf.get(..count).filter(|e| !e.is_empty()) else {
            self.exhausted = true;
            return false;
        };
        self.pos = entries.partition_point(|&d| d <= doc).saturating_sub(1);
        self.block = Some(block);
        self.buf.get(self.pos) == Some(&doc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::cell::RefCell;

    fn signed(text: &[u8]) -> Vec<u8> {
        let mut body = vec![FORMAT_SIGNED_V2];
        body.extend_from_slice(&[7; SESSION_LEN]);
        body.extend_from_slice(text);
        body.extend_from_slice(&[9; SIGNATURE_LEN]);
        body
    }

    fn toks(text: &str) -> Vec<String> {
        tokens(text).map(Cow::into_owned).collect()
    }

    fn q(text: &str) -> Query {
        match Query::parse(text) {
            Ok(query) => query,
            Err(e) => panic!("{text:?} does not parse: {e}"),
        }
    }

    /// (channel, seq) of the hits of `query` with every channel admitted.
    fn find(index: &SearchIndex, query: &str) -> Vec<(String, u64)> {
        let page = index.query(&q(query), |_| true, MAX_HITS);
        page.hits.into_iter().map(|h| (h.channel, h.seq)).collect()
    }

    fn hits(list: &[(&str, u64)]) -> Vec<(String, u64)> {
        list.iter().map(|&(c, s)| (c.to_string(), s)).collect()
    }

    #[test]
    fn plaintext_of_legacy() {
        assert_eq!(plaintext_of(b"\x00hello"), Some("hello"));
        assert_eq!(plaintext_of(b"\x00"), Some(""));
        assert_eq!(plaintext_of(b"\x00\xff\xfe"), None);
        assert_eq!(plaintext_of(b""), None);
    }

    #[test]
    fn plaintext_of_signed_v2() {
        assert_eq!(plaintext_of(&signed("grüße".as_bytes())), Some("grüße"));
        assert_eq!(plaintext_of(&signed(b"")), Some(""));
        let shortest = signed(b"");
        assert_eq!(shortest.len(), 1 + SESSION_LEN + SIGNATURE_LEN);
        assert_eq!(plaintext_of(&shortest[..shortest.len() - 1]), None);
        assert_eq!(plaintext_of(&[FORMAT_SIGNED_V2]), None);
        assert_eq!(plaintext_of(&signed(b"\xc3")), None);
    }

    #[test]
    fn plaintext_of_encrypted_and_unknown() {
        for format in [0x01, 0x03, 0x04, 0x7f, 0xff] {
            assert_eq!(plaintext_of(&[format]), None);
            assert_eq!(plaintext_of(&[format, b'h', b'i']), None);
            let mut long = signed(b"hello");
            long[0] = format;
            assert_eq!(plaintext_of(&long), None);
        }
    }

    #[test]
    fn tokenizer_unicode_and_case() {
        assert_eq!(toks("Hello WORLD"), ["hello", "world"]);
        assert_eq!(
            toks("Grüße aus KÖLN, 東京 и Москва!"),
            ["grüße", "aus", "köln", "東京", "и", "москва"]
        );
        assert_eq!(toks("ΟΔΟΣ"), ["οδος"]);
        assert_eq!(toks("café٣ x²"), ["café٣", "x²"]);
    }

    #[test]
    fn tokenizer_punctuation_digits_underscores() {
        assert_eq!(toks("don't"), ["don", "t"]);
        assert_eq!(
            toks("foo-bar.baz/qux (x) [y]"),
            ["foo", "bar", "baz", "qux", "x", "y"]
        );
        assert_eq!(
            toks("v2 2024-06-01 1.5"),
            ["v2", "2024", "06", "01", "1", "5"]
        );
        assert_eq!(
            toks("snake_case __init__ ___ _x_"),
            ["snake_case", "init", "x"]
        );
        assert_eq!(toks("  \t\n!!!"), Vec::<String>::new());
        assert_eq!(toks("🎉party🎉"), ["party"]);
    }

    #[test]
    fn tokenizer_long_tokens_and_cap() {
        let long = "a".repeat(MAX_TOKEN_BYTES + 1);
        let exact = "b".repeat(MAX_TOKEN_BYTES);
        let text = format!("x {long} {exact} y");
        assert_eq!(index_tokens(&text), [exact.as_str(), "x", "y"]);
        // Lower-casing can lengthen a token: the limit applies to the indexed form.
        let grows = "İ".repeat(MAX_TOKEN_BYTES / 2);
        assert_eq!(grows.len(), MAX_TOKEN_BYTES);
        assert!(index_tokens(&grows).is_empty());

        let many: String = (0..MAX_TOKENS_PER_MESSAGE + 10)
            .map(|i| format!("w{i} "))
            .collect();
        let indexed = index_tokens(&many);
        assert_eq!(indexed.len(), MAX_TOKENS_PER_MESSAGE);
        assert!(!indexed
            .iter()
            .any(|t| t == &format!("w{MAX_TOKENS_PER_MESSAGE}")));
        assert_eq!(index_tokens("a A a b"), ["a", "b"]);
    }

    #[test]
    fn parse_errors() {
        assert_eq!(Query::parse(""), Err(QueryError::Empty));
        assert_eq!(Query::parse("  \t "), Err(QueryError::Empty));
        assert_eq!(Query::parse("!!! -- ?"), Err(QueryError::Empty));
        let at_max = "a".repeat(MAX_QUERY_BYTES);
        assert!(Query::parse(&at_max).is_ok());
        let over = "a".repeat(MAX_QUERY_BYTES + 1);
        assert_eq!(
            Query::parse(&over),
            Err(QueryError::TooLong {
                len: 1025,
                max: 1024
            })
        );
        let huge = "word ".repeat(2048);
        assert_eq!(
            Query::parse(&huge),
            Err(QueryError::TooLong {
                len: 10240,
                max: 1024
            })
        );
        let words = |n: usize| {
            (0..n)
                .map(|i| format!("w{i}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert!(Query::parse(&words(MAX_TERMS)).is_ok());
        assert_eq!(
            Query::parse(&words(MAX_TERMS + 1)),
            Err(QueryError::TooManyTerms { count: 17, max: 16 })
        );
        // A word that splits counts each part.
        let split = format!("{} a-b", words(MAX_TERMS - 1));
        assert!(matches!(
            Query::parse(&split),
            Err(QueryError::TooManyTerms { count: 17, .. })
        ));
        for bad in ["*", "a*", "é*", "!!*", "don't*", "ok a*"] {
            assert!(
                matches!(Query::parse(bad), Err(QueryError::PrefixTooShort { .. })),
                "{bad}"
            );
        }
        for bad in ["from:", "in:", "in:#", "hello from:"] {
            assert!(
                matches!(Query::parse(bad), Err(QueryError::EmptyFilter { .. })),
                "{bad}"
            );
        }
        let error: Box<dyn std::error::Error> = Box::new(QueryError::Empty);
        assert!(!error.to_string().is_empty());
    }

    #[test]
    fn parse_terms() {
        let query = q("Deploy* FAILED from:Alice in:#ops don't in:ops ab**");
        assert_eq!(query.words, ["don", "failed", "t"]);
        assert_eq!(query.prefixes, ["ab", "deploy"]);
        assert_eq!(query.senders, ["Alice"]);
        assert_eq!(query.channels, ["ops"]);
        assert_eq!(q("from:bob").senders, ["bob"]);
    }

    #[test]
    fn and_semantics() {
        let mut index = SearchIndex::new();
        index.insert("c", 1, "u", "red apple");
        index.insert("c", 2, "u", "green apple");
        index.insert("c", 3, "u", "red car");
        assert_eq!(find(&index, "apple"), hits(&[("c", 2), ("c", 1)]));
        assert_eq!(find(&index, "red apple"), hits(&[("c", 1)]));
        assert_eq!(find(&index, "APPLE, Red!"), hits(&[("c", 1)]));
        assert_eq!(find(&index, "red banana"), hits(&[]));
        assert_eq!(find(&index, "green car"), hits(&[]));
        assert_eq!(find(&index, "appl"), hits(&[]));
    }

    #[test]
    fn filters() {
        let mut index = SearchIndex::new();
        index.insert("ops", 1, "alice", "deploy done");
        index.insert("dev", 1, "alice", "deploy broken");
        index.insert("ops", 2, "bob", "deploy again");
        assert_eq!(
            find(&index, "deploy from:alice"),
            hits(&[("dev", 1), ("ops", 1)])
        );
        assert_eq!(
            find(&index, "deploy in:#ops"),
            hits(&[("ops", 2), ("ops", 1)])
        );
        assert_eq!(find(&index, "in:ops from:alice"), hits(&[("ops", 1)]));
        assert_eq!(find(&index, "from:alice"), hits(&[("dev", 1), ("ops", 1)]));
        assert_eq!(find(&index, "in:dev"), hits(&[("dev", 1)]));
        assert_eq!(find(&index, "from:Alice"), hits(&[]));
        assert_eq!(find(&index, "from:carol"), hits(&[]));
        assert_eq!(find(&index, "in:nowhere deploy"), hits(&[]));
        assert_eq!(find(&index, "from:alice from:bob"), hits(&[]));
        assert_eq!(find(&index, "in:ops in:dev"), hits(&[]));
        let page = index.query(&q("from:bob"), |_| true, 10);
        assert_eq!(
            page.hits,
            [Hit {
                channel: "ops".into(),
                seq: 2,
                sender: "bob".into()
            }]
        );
    }

    #[test]
    fn prefix_terms() {
        let mut index = SearchIndex::new();
        index.insert("c", 1, "u", "deploy");
        index.insert("c", 2, "u", "deployed deployment");
        index.insert("c", 3, "u", "redeploy");
        index.insert("c", 4, "u", "de");
        assert_eq!(find(&index, "depl*"), hits(&[("c", 2), ("c", 1)]));
        assert_eq!(find(&index, "de*"), hits(&[("c", 4), ("c", 2), ("c", 1)]));
        assert_eq!(find(&index, "DEPLOYM*"), hits(&[("c", 2)]));
        assert_eq!(find(&index, "zz*"), hits(&[]));
        assert_eq!(find(&index, "depl* de*"), hits(&[("c", 2), ("c", 1)]));
        assert_eq!(find(&index, "redeploy*"), hits(&[("c", 3)]));
    }

    #[test]
    fn prefix_expansion_is_capped() {
        let mut index = SearchIndex::new();
        for i in 0..MAX_PREFIX_EXPANSION + 10 {
            index.insert("c", i as u64, "u", &format!("pre{i:04}"));
        }
        let found = index.query(&q("pre*"), |_| true, MAX_HITS).hits;
        assert_eq!(found.len(), MAX_HITS);
        // Only the first 128 tokens in lexicographic order take part.
        let all = index.query(&q("pre0* pre*"), |_| true, MAX_HITS).hits;
        assert!(all.iter().all(|h| h.seq < MAX_PREFIX_EXPANSION as u64));
    }

    #[test]
    fn prefix_check_switches_to_bitmap() {
        // Oldest first: three messages with both terms, then the prefix's tokens without the
        // word, then the word without the prefix, so the word drives and its newest candidates
        // all miss the prefix's five lists until those are turned into a bitmap.
        let mut index = SearchIndex::new();
        for seq in 0..3 {
            index.insert("c", seq, "u", &format!("alpha zz{seq}"));
        }
        for seq in 3..400 {
            index.insert("c", seq, "u", &format!("zz{}", seq % 5));
        }
        for seq in 400..600 {
            index.insert("c", seq, "u", "alpha");
        }
        assert_eq!(
            find(&index, "alpha zz*"),
            hits(&[("c", 2), ("c", 1), ("c", 0)])
        );
        assert_eq!(find(&index, "alpha zz1*"), hits(&[("c", 1)]));
    }

    #[test]
    fn edit_replaces_text() {
        let mut index = SearchIndex::new();
        index.insert("c", 1, "u", "old words here");
        index.insert("c", 2, "u", "other here");
        index.insert("c", 1, "u", "new text here");
        assert_eq!(index.len(), 2);
        assert_eq!(find(&index, "old"), hits(&[]));
        assert_eq!(find(&index, "words"), hits(&[]));
        assert_eq!(find(&index, "new"), hits(&[("c", 1)]));
        // The edit counts as the newest message.
        assert_eq!(find(&index, "here"), hits(&[("c", 1), ("c", 2)]));
    }

    #[test]
    fn remove_forgets() {
        let mut index = SearchIndex::new();
        index.insert("c", 1, "u", "hello");
        index.insert("c", 2, "u", "hello");
        index.insert("d", 1, "u", "hello");
        index.remove("c", 1);
        index.remove("c", 99);
        index.remove("nowhere", 1);
        assert_eq!(index.len(), 2);
        assert_eq!(find(&index, "hello"), hits(&[("d", 1), ("c", 2)]));
        index.remove("c", 1);
        assert_eq!(index.len(), 2);
        // Inserting again after a delete is a new message.
        index.insert("c", 1, "u", "hello again");
        assert_eq!(find(&index, "hello"), hits(&[("c", 1), ("d", 1), ("c", 2)]));
    }

    #[test]
    fn trim_forgets_old() {
        let mut index = SearchIndex::new();
        for seq in 0..10 {
            index.insert("c", seq, "u", "word");
            index.insert("d", seq, "u", "word");
        }
        index.trim("c", 7);
        index.trim("c", 3);
        index.trim("nowhere", 3);
        assert_eq!(index.len(), 13);
        let found = find(&index, "word in:c");
        assert_eq!(found, hits(&[("c", 9), ("c", 8), ("c", 7)]));
        assert_eq!(find(&index, "in:d").len(), 10);
        index.trim("c", u64::MAX);
        assert_eq!(find(&index, "in:c"), hits(&[]));
        assert_eq!(index.len(), 10);
    }

    #[test]
    fn admits_skips_private_and_is_asked_once_per_channel() {
        let mut index = SearchIndex::new();
        for seq in 0..5 {
            index.insert("public", seq, "u", "secret plan");
            index.insert("private", seq, "u", "secret plan");
            index.insert("other", seq, "u", "secret plan");
        }
        let asked = RefCell::new(Vec::new());
        let admits = |channel: &str| {
            asked.borrow_mut().push(channel.to_string());
            channel != "private"
        };
        let page = index.query(&q("secret"), admits, MAX_HITS);
        assert_eq!(page.hits.len(), 10);
        assert!(page.hits.iter().all(|h| h.channel != "private"));
        let mut asked = asked.into_inner();
        asked.sort();
        assert_eq!(asked, ["other", "private", "public"]);

        let mut calls = 0;
        let page = index.query(
            &q("in:private plan"),
            |_| {
                calls += 1;
                false
            },
            MAX_HITS,
        );
        assert_eq!((page.hits.len(), calls), (0, 1));
    }

    #[test]
    fn newest_first_and_limit() {
        let mut index = SearchIndex::new();
        for seq in 0..300 {
            let channel = if seq % 2 == 0 { "even" } else { "odd" };
            index.insert(channel, seq, "u", "tick");
        }
        let page = index.query(&q("tick"), |_| true, 5);
        let seqs: Vec<u64> = page.hits.iter().map(|h| h.seq).collect();
        assert_eq!(seqs, [299, 298, 297, 296, 295]);
        assert!(!page.truncated);
        assert_eq!(index.query(&q("tick"), |_| true, 1000).hits.len(), MAX_HITS);
        assert!(index.query(&q("tick"), |_| true, 0).hits.is_empty());
        let page = index.query(&q("tick"), |c| c == "odd", 3);
        let seqs: Vec<u64> = page.hits.iter().map(|h| h.seq).collect();
        assert_eq!(seqs, [299, 297, 295]);
    }

    #[test]
    fn truncated_at_scan_cap() {
        let mut index = SearchIndex::new();
        for seq in 0..50 {
            index.insert("c", seq, "u", "common");
        }
        index.insert("c", 50, "u", "common rare");
        index.insert("secret", 0, "u", "common rare");
        index.scan_max = 10;
        let page = index.query(&q("common"), |c| c != "c", 5);
        assert_eq!(page.hits.len(), 1);
        assert!(page.truncated);
        // Found enough before the cap: not truncated.
        let page = index.query(&q("common"), |_| true, 5);
        assert_eq!((page.hits.len(), page.truncated), (5, false));
        // The cap counts candidates of the driving (shortest) list only.
        let page = index.query(&q("common rare"), |_| true, 5);
        assert_eq!((page.hits.len(), page.truncated), (2, false));
        // Exactly at the cap with nothing left is not truncated.
        index.scan_max = 2;
        let page = index.query(&q("rare"), |_| false, 5);
        assert_eq!((page.hits.len(), page.truncated), (0, false));
    }

    #[test]
    fn compaction_keeps_results() {
        let mut index = SearchIndex::new();
        for round in 0..20u64 {
            for seq in 0..200u64 {
                let sender = format!("u{}", seq % 7);
                index.insert("c", seq, &sender, &format!("round{round} item{seq} shared"));
            }
        }
        assert_eq!(index.len(), 200);
        assert!(index.docs.len() <= 200 * 4 / 3 + 1);
        assert_eq!(find(&index, "round0"), hits(&[]));
        assert_eq!(find(&index, "round19 item5"), hits(&[("c", 5)]));
        assert_eq!(find(&index, "shared").len(), MAX_HITS);
        assert_eq!(find(&index, "from:u3 item3"), hits(&[("c", 3)]));
        for seq in 0..150 {
            index.remove("c", seq);
        }
        assert_eq!(index.len(), 50);
        assert_eq!(find(&index, "shared").len(), 50);
        assert!(index.terms.keys().all(|t| !t.starts_with("round0")));
        assert!(index.heap_bytes() > 0);
    }

    #[test]
    fn postings_roundtrip_and_probe() {
        let docs: Vec<u32> = (0..1000u32).map(|i| i * i % 100_000 + i * 3).collect();
        let mut sorted = docs.clone();
        sorted.sort_unstable();
        sorted.dedup();
        let list: Postings = sorted.iter().copied().collect();
        assert_eq!(list.iter().collect::<Vec<_>>(), sorted);
        let mut backwards: Vec<u32> = Rev::new(&list).collect();
        backwards.reverse();
        assert_eq!(backwards, sorted);
        let mut probe = Probe::new(&list);
        for doc in (0..*sorted.last().unwrap_or(&0) + 5).rev() {
            assert_eq!(
                probe.contains(doc),
                sorted.binary_search(&doc).is_ok(),
                "{doc}"
            );
        }
        for value in [0, 1, 127, 128, 16_383, 16_384, u32::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            assert_eq!(get_varint(&out, &mut 0), Some(value));
        }
    }

    /// A naive tokenizer, written independently: character by character.
    fn model_tokens(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut word = String::new();
        for c in text.chars().chain([' ']) {
            if c.is_alphanumeric() || c == '_' {
                word.push(c);
            } else if !word.is_empty() {
                let token = word.trim_matches('_').to_lowercase();
                if !token.is_empty() && token.len() <= MAX_TOKEN_BYTES {
                    out.push(token);
                }
                word.clear();
            }
        }
        out
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(usize, u64, usize, String),
        Remove(usize, u64),
        Trim(usize, u64),
        Query(String, usize, u8),
    }

    const CHANNELS: [&str; 3] = ["general", "ops", "dm-x"];
    const SENDERS: [&str; 3] = ["alice", "bob", "Carol"];

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => prop::collection::vec(
                ("[abcAB_é]{1,2}", prop::sample::select(vec![" ", ", ", "'", "-", "  "])),
                0..8
            )
            .prop_map(|words| words.into_iter().map(|(w, s)| w + s).collect()),
            1 => "\\PC{0,30}",
        ]
    }

    fn query_text() -> impl Strategy<Value = String> {
        let part = prop_oneof![
            4 => "[abAé_]{1,2}",
            2 => "[abé]{2}\\*",
            1 => prop::sample::select(SENDERS.to_vec()).prop_map(|s| format!("from:{s}")),
            1 => prop::sample::select(CHANNELS.to_vec()).prop_map(|c| format!("in:#{c}")),
            1 => "\\PC{0,6}",
        ];
        prop::collection::vec(part, 1..3).prop_map(|parts| parts.join(" "))
    }

    /// Operations on messages with sequence numbers below `seqs`, queries with limits below
    /// `limits`.
    fn op(seqs: u64, limits: usize) -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..3usize, 0..seqs, 0..3usize, text())
                .prop_map(|(c, s, u, t)| Op::Insert(c, s, u, t)),
            2 => (0..3usize, 0..seqs).prop_map(|(c, s)| Op::Remove(c, s)),
            1 => (0..3usize, 0..seqs).prop_map(|(c, s)| Op::Trim(c, s)),
            4 => (query_text(), 0..limits, any::<u8>()).prop_map(|(q, l, m)| Op::Query(q, l, m)),
        ]
    }

    struct Entry {
        channel: usize,
        seq: u64,
        sender: usize,
        tokens: Vec<String>,
    }

    fn model_query(model: &[Entry], query: &Query, mask: u8, limit: usize) -> Vec<Hit> {
        let matches = |e: &Entry| {
            query.words.iter().all(|w| e.tokens.contains(w))
                && query
                    .prefixes
                    .iter()
                    .all(|p| e.tokens.iter().any(|t| t.starts_with(p.as_str())))
                && query.senders.iter().all(|s| s == SENDERS[e.sender])
                && query.channels.iter().all(|c| c == CHANNELS[e.channel])
                && mask & (1 << e.channel) != 0
        };
        model
            .iter()
            .rev()
            .filter(|e| matches(e))
            .take(limit.min(MAX_HITS))
            .map(|e| Hit {
                channel: CHANNELS[e.channel].into(),
                seq: e.seq,
                sender: SENDERS[e.sender].into(),
            })
            .collect()
    }

    fn run_model(ops: Vec<Op>) -> Result<(), TestCaseError> {
        let mut index = SearchIndex::new();
        let mut model: Vec<Entry> = Vec::new();
        for op in ops {
            match op {
                Op::Insert(channel, seq, sender, text) => {
                    model.retain(|e| (e.channel, e.seq) != (channel, seq));
                    model.push(Entry {
                        channel,
                        seq,
                        sender,
                        tokens: model_tokens(&text),
                    });
                    index.insert(CHANNELS[channel], seq, SENDERS[sender], &text);
                }
                Op::Remove(channel, seq) => {
                    model.retain(|e| (e.channel, e.seq) != (channel, seq));
                    index.remove(CHANNELS[channel], seq);
                }
                Op::Trim(channel, first_kept) => {
                    model.retain(|e| e.channel != channel || e.seq >= first_kept);
                    index.trim(CHANNELS[channel], first_kept);
                }
                Op::Query(text, limit, mask) => {
                    let Ok(query) = Query::parse(&text) else {
                        continue;
                    };
                    let mut asked: Vec<String> = Vec::new();
                    let page = index.query(
                        &query,
                        |c| {
                            asked.push(c.to_string());
                            CHANNELS
                                .iter()
                                .position(|&n| n == c)
                                .is_some_and(|i| mask & (1 << i) != 0)
                        },
                        limit,
                    );
                    prop_assert!(!page.truncated);
                    prop_assert_eq!(page.hits, model_query(&model, &query, mask, limit));
                    let mut distinct = asked.clone();
                    distinct.sort();
                    distinct.dedup();
                    prop_assert_eq!(distinct.len(), asked.len());
                }
            }
            prop_assert_eq!(index.len(), model.len());
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn matches_naive_model(ops in prop::collection::vec(op(12, 6), 1..80)) {
            run_model(ops)?;
        }

        #[test]
        fn never_panics(text in "\\PC{0,200}", body in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = plaintext_of(&body);
            let mut index = SearchIndex::new();
            if let Some(plain) = plaintext_of(&body) {
                index.insert("c", 0, "u", plain);
            }
            index.insert(&text, u64::MAX, &text, &text);
            if let Ok(query) = Query::parse(&text) {
                let _ = index.query(&query, |_| true, usize::MAX);
            }
            index.trim(&text, u64::MAX);
            index.remove(&text, 0);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]

        #[test]
        fn matches_naive_model_multi_block(ops in prop::collection::vec(op(200, 120), 300..700)) {
            run_model(ops)?;
        }
    }
}
