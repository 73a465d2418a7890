//! [`ChatState`]: applies committed entries to RocksDB and serves reads from memory first.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock, RwLockReadGuard};
use rocksdb::{ColumnFamily, ReadOptions, WriteBatch, WriteOptions, DB};
use tracing::{debug, info};

use crate::channel::{ChannelOp, ChannelRecord, MAX_CHANNELS_PER_USER, MAX_MEMBERS};
use crate::command::{is_valid_channel, is_valid_sender, validate_send};
use crate::dedup::{self, DedupId};
use crate::format::{self, *};
use crate::relation::valid_emoji;
use crate::retention::{Retention, DEDUP_WINDOW_MS, EXPIRE_DEDUP_MAX, EXPIRE_SCAN_MAX};
use crate::snapshot::{self, SnapshotContents, SnapshotInfo};
use crate::store::{self, Store};
use crate::{
    ChannelSeq, ChatResponse, ClientId, Command, Error, LogIndex, Message, MessageMeta, ReadMark,
    RejectReason, Relation, SendCmd, Sent, JOIN_SECRET_BYTES, MAX_BATCH_MARKS, MAX_BATCH_SENDS,
    MAX_CRYPTO_RECORD_BYTES, MAX_EDITS, MAX_REACTIONS,
};

/// Default number of recent messages kept in memory per channel.
pub const RING_LEN_DEFAULT: usize = 1000;
/// Largest accepted [`Config::ring_len`].
pub const RING_LEN_MAX: usize = 100_000;
/// Reads return at most this many messages, whatever `limit` the caller asks for.
pub const HISTORY_LIMIT_MAX: usize = 10_000;
/// A page of the channel list holds at most this many channels.
pub const CHANNEL_PAGE_MAX: usize = 1000;
/// Default [`Config::ring_bytes_max`]: 256 MiB for the rings of all channels together.
pub const RING_BYTES_MAX_DEFAULT: usize = 256 << 20;
/// Smallest accepted [`Config::ring_bytes_max`] (64 KiB): below that, rings could not hold
/// even a few of the largest messages.
pub const RING_BYTES_MAX_MIN: usize = 64 << 10;
/// Largest accepted [`Config::ring_bytes_max`] (1 TiB): anything above is a typo, not a
/// machine.
pub const RING_BYTES_MAX_MAX: usize = 1 << 40;

/// What one ring entry costs beyond the bytes of its body and sender: the allocator's headers
/// of those two heap buffers. The entry itself is counted as a slot of the ring's buffer.
const RING_ENTRY_HEAP_OVERHEAD_BYTES: usize = 32;

/// Most clients whose highest client seq [`ClientSeqs`] keeps in memory (about 50 B each).
const CLIENT_SEQS_MAX: usize = 1 << 20;

/// Pairs written per `WriteBatch` while installing a snapshot.
const INSTALL_BATCH_RECORDS: usize = 4096;

/// Configuration of a [`ChatState`].
#[derive(Clone, Debug)]
pub struct Config {
    /// Data directory; created if missing. Holds the `ACTIVE` pointer and `db-*` RocksDB
    /// directories (see the crate docs).
    pub dir: PathBuf,
    /// Recent messages kept in memory per channel. Unit: messages. Default
    /// [`RING_LEN_DEFAULT`] (1000); bounds 1..=[`RING_LEN_MAX`].
    pub ring_len: usize,
    /// Memory budget of all channel rings together. Unit: bytes, counted as each ring's
    /// buffer (capacity times the entry size) plus every entry's body, sender and allocator
    /// overhead. Default [`RING_BYTES_MAX_DEFAULT`] (256 MiB); bounds
    /// [`RING_BYTES_MAX_MIN`]..=[`RING_BYTES_MAX_MAX`]. Without it, every channel keeps up to
    /// `ring_len` messages in memory forever, so one user creating many channels with large
    /// bodies could grow a node's memory without limit. Over the budget, the rings of the
    /// least recently used channels are dropped (see [`ChatState`]).
    pub ring_bytes_max: usize,
}

impl Config {
    /// A configuration with defaults for everything but the directory.
    pub fn new(dir: impl Into<PathBuf>) -> Config {
        Config {
            dir: dir.into(),
            ring_len: RING_LEN_DEFAULT,
            ring_bytes_max: RING_BYTES_MAX_DEFAULT,
        }
    }

    /// Checks the bounds documented on each field.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the field out of bounds.
    pub fn validate(&self) -> Result<(), Error> {
        if !(1..=RING_LEN_MAX).contains(&self.ring_len) {
            return Err(Error::InvalidConfig {
                reason: format!("ring_len {} is outside 1..={RING_LEN_MAX}", self.ring_len),
            });
        }
        if !(RING_BYTES_MAX_MIN..=RING_BYTES_MAX_MAX).contains(&self.ring_bytes_max) {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "ring_bytes_max {} is outside {RING_BYTES_MAX_MIN}..={RING_BYTES_MAX_MAX}",
                    self.ring_bytes_max
                ),
            });
        }
        Ok(())
    }
}

/// The payload of one committed entry, as the adapter decoded it.
#[derive(Clone, Copy, Debug)]
pub enum ApplyPayload<'a> {
    /// A blank (leader no-op) entry.
    Blank,
    /// A membership entry; its opaque bytes travel in [`RaftMeta::membership`].
    Membership,
    /// An application command.
    Command(&'a Command),
    /// An application entry whose bytes did not decode ([`Command::decode`] failed). Applied
    /// as [`RejectReason::Malformed`] so that every replica answers the same.
    Malformed,
}

/// One committed entry to apply.
#[derive(Clone, Copy, Debug)]
pub struct ApplyEntry<'a> {
    /// Its log index; strictly increasing across calls to [`ChatState::apply`].
    pub index: LogIndex,
    /// What it carries.
    pub payload: ApplyPayload<'a>,
}

/// Raft metadata stored atomically with an applied batch. Opaque to this crate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaftMeta {
    /// The adapter's encoding of the last applied log id.
    pub last_applied: Vec<u8>,
    /// The adapter's encoding of the latest membership; `None` leaves the stored one as is.
    pub membership: Option<Vec<u8>>,
}

/// Passed to the apply listener after each applied batch (and after a snapshot install).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedEvent {
    /// Index of the last entry applied.
    pub index: LogIndex,
    /// Every channel whose head changed, with its new head, sorted by channel name.
    pub heads: Vec<(String, ChannelSeq)>,
    /// The join secret may have changed (a [`Command::SetJoinSecret`], or a snapshot).
    pub join_secret_changed: bool,
    /// Every read marker that moved, as (user, channel, new marker), sorted. Empty after a
    /// snapshot install, which may move any.
    pub markers: Vec<(String, String, ChannelSeq)>,
    /// Users made members of a direct conversation, or invited to a private channel, by
    /// someone else: (user, channel), in log order. Empty after a snapshot install.
    pub added: Vec<(String, String)>,
    /// A snapshot replaced the whole state: anything derived from earlier events is stale.
    pub snapshot: bool,
}

type Listener = Box<dyn Fn(&AppliedEvent) + Send + Sync>;

/// An owned RocksDB pair.
type KeyValue = (Vec<u8>, Vec<u8>);

/// A message in a channel ring; its channel and seq follow from where it sits.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RingEntry {
    sender: String,
    body: Vec<u8>,
    at_ms: u64,
    client_id: ClientId,
    client_seq: u64,
    /// `None` for a plain message nobody touched, the common case, which costs no allocation.
    meta: Option<Box<MessageMeta>>,
}

impl RingEntry {
    fn to_message(&self, channel: &str, seq: u64) -> Message {
        Message {
            channel: channel.to_owned(),
            seq: ChannelSeq(seq),
            sender: self.sender.clone(),
            body: self.body.clone(),
            at_ms: self.at_ms,
            client_id: self.client_id,
            client_seq: self.client_seq,
            meta: self.meta.as_deref().cloned().unwrap_or_default(),
            edit: None,
        }
    }

    fn from_message(m: Message) -> RingEntry {
        RingEntry {
            sender: m.sender,
            body: m.body,
            at_ms: m.at_ms,
            client_id: m.client_id,
            client_seq: m.client_seq,
            meta: (!m.meta.is_plain()).then(|| Box::new(m.meta)),
        }
    }

    fn meta(&self) -> MessageMeta {
        self.meta.as_deref().cloned().unwrap_or_default()
    }

    fn set_meta(&mut self, meta: MessageMeta) {
        self.meta = (!meta.is_plain()).then(|| Box::new(meta));
    }

    /// Its stored value's fields.
    fn value(&self) -> MessageValue<'_> {
        static PLAIN: MessageMeta = MessageMeta {
            relation: None,
            deleted: false,
            edits: Vec::new(),
            replies: 0,
            reactions: std::collections::BTreeMap::new(),
        };
        MessageValue {
            at_ms: self.at_ms,
            client_id: self.client_id.0,
            client_seq: self.client_seq,
            sender: &self.sender,
            body: &self.body,
            meta: std::borrow::Cow::Borrowed(self.meta.as_deref().unwrap_or(&PLAIN)),
        }
    }

    /// What the entry's heap buffers cost against [`Config::ring_bytes_max`].
    fn heap_bytes(&self) -> usize {
        self.body.capacity()
            + self.sender.capacity()
            + self.meta.as_deref().map_or(0, MessageMeta::heap_bytes)
            + RING_ENTRY_HEAP_OVERHEAD_BYTES
    }
}

/// In-memory view of one channel.
///
/// Invariants:
/// - messages `floor..=head` are stored and no others (`floor == head + 1` once every message
///   expired);
/// - `ring` holds seqs `head - ring.len() + 1 ..= head`, equal to those messages in RocksDB;
/// - `ring.len() <= min(head + 1 - floor, ring_len)`: the ring is full while it stays in
///   memory, empty once evicted (or when it did not fit the budget at open), and then a suffix
///   that grows with each apply until it is full again;
/// - `heap_bytes` is the sum of [`RingEntry::heap_bytes`] over `ring`.
#[derive(Debug)]
struct ChannelView {
    head: u64,
    /// The lowest stored seq (see `retention.rs`); 1 until something expires.
    floor: u64,
    ring: VecDeque<RingEntry>,
    heap_bytes: usize,
    /// The [`View::tick`] of the latest apply or read of this channel; eviction drops the
    /// rings with the lowest first. Readers write it under the read lock, hence atomic.
    last_used: AtomicU64,
}

impl ChannelView {
    fn new(head: u64) -> ChannelView {
        ChannelView {
            head,
            floor: 1,
            ring: VecDeque::new(),
            heap_bytes: 0,
            last_used: AtomicU64::new(0),
        }
    }

    fn ring_first(&self) -> u64 {
        self.head + 1 - self.ring.len() as u64
    }

    /// What the ring costs against [`Config::ring_bytes_max`]: its buffer, whose slots hold
    /// the entries, plus the entries' heap buffers.
    fn ring_bytes(&self) -> usize {
        self.ring.capacity() * std::mem::size_of::<RingEntry>() + self.heap_bytes
    }

    /// Drops the ring entries below `floor`, which expiry just removed from RocksDB.
    fn trim_ring(&mut self, floor: u64) {
        let below = floor
            .saturating_sub(self.ring_first())
            .min(self.ring.len() as u64);
        for old in self.ring.drain(..below as usize) {
            self.heap_bytes -= old.heap_bytes();
        }
    }

    /// Drops the ring and its buffer; reads then go to RocksDB until applies refill it.
    fn evict_ring(&mut self) {
        self.ring = VecDeque::new();
        self.heap_bytes = 0;
    }
}

/// One channel as a user's channel list shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelListing {
    /// The channel's name.
    pub name: String,
    /// Its newest seq; 0 before its first message.
    pub head: ChannelSeq,
    /// Its owner, if it has a record with one.
    pub owner: Option<String>,
    /// Whether only members read and write it.
    pub private: bool,
    /// Whether the listing user is invited and not yet a member.
    pub invited: bool,
    /// Whether it has a crypto record (its users encrypt it end to end).
    pub encrypted: bool,
    /// Its lowest stored seq: older ones expired. 1 until something expires; `head + 1` when
    /// every message expired.
    pub floor: ChannelSeq,
    /// The highest seq the listing user marked read in it; 0 when none.
    pub read_to: ChannelSeq,
}

/// How long a channel keeps its messages, as [`ChatState::retention`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetentionInfo {
    /// The channel's own retention, if its owner set one.
    pub own: Option<Retention>,
    /// The cluster default, which applies when the channel has none.
    pub default: Retention,
    /// The channel's lowest stored seq (see [`ChannelListing::floor`]).
    pub floor: ChannelSeq,
}

impl RetentionInfo {
    /// The retention in force: the channel's own, else the default.
    pub fn effective(&self) -> Retention {
        self.own.unwrap_or(self.default)
    }
}

/// What readers see; replaced as a whole by a snapshot install.
struct View {
    store: Arc<Store>,
    channels: HashMap<String, ChannelView>,
    /// Channel records by channel name.
    records: HashMap<String, ChannelRecord>,
    /// How many records name each user as owner.
    owned: HashMap<String, usize>,
    /// Every channel with messages or a record, in name order (for the paged channel list).
    names: BTreeSet<String>,
    users: HashMap<String, [u8; 32]>,
    join_secret: Option<Vec<u8>>,
    last_applied: Option<Vec<u8>>,
    membership: Option<Vec<u8>>,
    applied_index: Option<LogIndex>,
    /// Channels' own retentions, by channel name.
    retention: HashMap<String, Retention>,
    /// Channels' topics, by channel name.
    topics: HashMap<String, String>,
    /// The retention of every channel without one of its own.
    default_retention: Retention,
    /// The state machine's clock: the latest `at_ms` of an applied `Expire` (0 before one).
    clock: u64,
    /// Sum of [`ChannelView::ring_bytes`] over `channels`; at most `Config::ring_bytes_max`
    /// whenever the write lock is free.
    ring_bytes: usize,
    /// Source of the [`ChannelView::last_used`] stamps.
    tick: AtomicU64,
}

impl View {
    /// A fresh recency stamp, higher than every earlier one. Relaxed: a stamp only ranks
    /// channels for eviction, and a slightly stale rank costs a RocksDB read, never an answer.
    fn next_tick(&self) -> u64 {
        self.tick.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// State only the applying thread touches; its mutex serializes `apply` and
/// `install_snapshot`.
struct Writer {
    store: Arc<Store>,
    applied_index: Option<LogIndex>,
    key: Vec<u8>,
    value: Vec<u8>,
    /// The puts of the `apply` call in progress; empty between calls.
    puts: Puts,
    client_seqs: ClientSeqs,
}

/// The highest client seq stored (or expired) for each client id, so that most sends skip the
/// dedup lookup.
///
/// Clients number their sends upwards, so a new send almost always carries a client seq above
/// every seq stored for its client; such a send cannot be a repeat and needs no RocksDB
/// lookup, which was the second largest cost of `apply`. Anything else (a retry, a client
/// not tracked) is looked up as before, so the map only decides whether to look, never what
/// the answer is: replicas with different maps still answer identically.
///
/// Invariant: for every tracked client, no dedup record and no dedup floor with a higher
/// client seq exists; when `complete`, neither exists for an untracked client. Bounded by
/// [`CLIENT_SEQS_MAX`]; past it, new clients go untracked and `complete` turns false.
#[derive(Debug, Default)]
struct ClientSeqs {
    max: HashMap<DedupId, u64>,
    complete: bool,
}

impl ClientSeqs {
    /// Whether a dedup record for (`client`, `client_seq`) is known not to exist.
    fn is_new(&self, client: DedupId, client_seq: u64) -> bool {
        match self.max.get(&client) {
            Some(&max) => client_seq > max,
            None => self.complete,
        }
    }

    /// Notes that a dedup record for (`client`, `client_seq`) is being written.
    fn record(&mut self, client: DedupId, client_seq: u64) {
        if let Some(max) = self.max.get_mut(&client) {
            *max = (*max).max(client_seq);
        } else if self.max.len() < CLIENT_SEQS_MAX {
            self.max.insert(client, client_seq);
        } else {
            self.complete = false;
        }
    }
}

/// Reads the highest client seq of every client from the dedup records: two seeks per client
/// (its first key, then the last key of its range), not a scan of every record.
fn load_client_seqs(store: &Store) -> Result<ClientSeqs, Error> {
    let mut it = store
        .db()
        .raw_iterator_cf_opt(store.dedup_cf(), store::total_order());
    let mut seqs = ClientSeqs {
        max: HashMap::new(),
        complete: true,
    };
    it.seek([PREFIX_DEDUP]);
    let mut last = [0xffu8; 25];
    while let Some(key) = it.key() {
        if seqs.max.len() == CLIENT_SEQS_MAX {
            seqs.complete = false;
            break;
        }
        let bad_key = || Error::Corrupt {
            what: "dedup",
            reason: format!("bad key {}", hex(key)),
        };
        if key.len() != 25 {
            return Err(bad_key());
        }
        last[..17].copy_from_slice(&key[..17]);
        it.seek_for_prev(last);
        let Some(key) = it.key() else {
            it.status().map_err(rocks("iterate"))?;
            return Err(Error::Corrupt {
                what: "dedup",
                reason: "seek_for_prev found no key".into(),
            });
        };
        let client = DedupId(key[1..17].try_into().expect("25-byte key checked above"));
        let client_seq = u64::from_be_bytes(key[17..25].try_into().expect("8 bytes"));
        seqs.max.insert(client, client_seq);
        it.next();
    }
    it.status().map_err(rocks("iterate"))?;
    // A client whose records all expired still has a floor: its seqs at or below it are
    // retries to refuse, never new sends.
    for (key, value) in scan_prefix(store.db(), PREFIX_DEDUP_FLOOR)? {
        let client = DedupId(key[1..].try_into().map_err(|_| Error::Corrupt {
            what: "dedup floor",
            reason: format!("bad key {}", hex(&key)),
        })?);
        let floor = decode_u64_value(&value, "dedup floor")?;
        if let Some(max) = seqs.max.get_mut(&client) {
            *max = (*max).max(floor);
        } else if seqs.max.len() < CLIENT_SEQS_MAX {
            seqs.max.insert(client, floor);
        } else {
            seqs.complete = false;
        }
    }
    Ok(seqs)
}

/// The RocksDB puts of one `apply` call, in one reused arena, handed to RocksDB sorted by key.
///
/// Why sorted: RocksDB inserts a `WriteBatch` into its memtable skiplist in batch order, and
/// the skiplist remembers where the previous insert went. Puts in key order (each channel's
/// messages in seq order, each client's dedup records in client seq order) mostly land right
/// after the previous one, so an insert costs a few comparisons instead of a full search from
/// the top of a skiplist of hundreds of thousands of keys; that search, cache miss after cache
/// miss, was the largest cost of `apply`. Order cannot change the result: the sort is stable,
/// so when a call puts a key twice (a message appended, then changed by a relation in the
/// same call) the later put still comes later and wins, and the batch is atomic anyway.
#[derive(Default)]
struct Puts {
    /// Keys and values, each value right after its key.
    bytes: Vec<u8>,
    /// Per put: (offset of the key in `bytes`, key length, value length).
    items: Vec<(usize, usize, usize)>,
}

impl Puts {
    /// Adds a put; dedup keys (`b'd'`) go to the dedup column family.
    fn put(&mut self, key: &[u8], value: &[u8]) {
        self.items.push((self.bytes.len(), key.len(), value.len()));
        self.bytes.extend_from_slice(key);
        self.bytes.extend_from_slice(value);
    }

    /// Adds the puts to `wb` in key order, after what `wb` holds, and empties `self`, keeping
    /// its capacity.
    fn take_sorted_batch(&mut self, dedup_cf: &ColumnFamily, mut wb: WriteBatch) -> WriteBatch {
        let bytes = &self.bytes;
        let key = |&(at, key_len, _): &(usize, usize, usize)| &bytes[at..at + key_len];
        self.items.sort_by(|a, b| key(a).cmp(key(b)));
        for &(at, key_len, value_len) in &self.items {
            let value_at = at + key_len;
            let (key, value) = (&bytes[at..value_at], &bytes[value_at..value_at + value_len]);
            if key[0] == PREFIX_DEDUP {
                wb.put_cf(dedup_cf, key, value);
            } else {
                wb.put(key, value);
            }
        }
        self.bytes.clear();
        self.items.clear();
        wb
    }
}

/// Changes made by one `apply` call, kept until its `WriteBatch` is written.
struct Batch<'a> {
    /// Touched channels: new head and every message appended in this call, in seq order.
    touched: HashMap<&'a str, (u64, Vec<RingEntry>)>,
    /// Stored messages a relation changed in this call (their meta, or an erased body), as
    /// they stand after it: rewritten after the appends, so they win over them.
    changed: HashMap<(&'a str, u64), RingEntry>,
    /// Sends accepted earlier in this call: dedup key -> (channel, seq, at_ms).
    dedup: HashMap<(DedupId, u64), (&'a str, u64, u64)>,
    /// Registrations accepted earlier in this call.
    users: HashMap<&'a str, [u8; 32]>,
    /// The join secret set last in this call.
    join_secret: Option<&'a [u8]>,
    /// Channel records created or changed in this call, as they stand after it.
    records: HashMap<&'a str, ChannelRecord>,
    /// Records created in this call per owner.
    new_owned: HashMap<&'a str, usize>,
    /// Channels' own retentions set in this call; `None` removes one.
    retention: HashMap<&'a str, Option<Retention>>,
    /// Topics set in this call; `None` clears one.
    topics: HashMap<&'a str, Option<&'a str>>,
    /// Read markers moved in this call: (user, channel) -> seq.
    marks: HashMap<(&'a str, &'a str), u64>,
    /// Users added to a channel by someone else in this call: (user, channel).
    added: Vec<(&'a str, &'a str)>,
    /// The default retention set last in this call.
    default_retention: Option<Retention>,
    /// What an `Expire` in this call removes.
    expiry: Option<Expiry>,
}

/// What one `Expire` removes, found by reading the state before it.
#[derive(Default)]
struct Expiry {
    /// The state machine's clock after it.
    clock: u64,
    /// Channels whose floor rises: (channel, old floor, new floor).
    floors: Vec<(String, u64, u64)>,
    /// Expired dedup records: (expiry index key, dedup key).
    dedup: Vec<(Vec<u8>, Vec<u8>)>,
    /// Clients whose dedup floor rises, with the new floor.
    dedup_floors: HashMap<DedupId, u64>,
}

/// The chat state machine of one replica.
///
/// Invariants:
/// - per channel, seqs are dense: messages `1..=head` exist and nothing above `head`;
/// - a (client_id, client_seq) pair names at most one message, and its dedup record points
///   at it;
/// - messages, heads, dedup records, users, applied index, `last_applied` and membership of
///   one `apply` call reach RocksDB in one `WriteBatch`, so a crash never splits them;
/// - the applied index only grows (asserted);
/// - each channel ring equals the tail of that channel in RocksDB, possibly shorter than
///   `min(head, ring_len)` (checked by [`ChatState::check_consistency`]);
/// - all rings together cost at most [`Config::ring_bytes_max`] once `open`, `apply` or
///   `install_snapshot` returns (asserted).
///
/// Rings: reads are served from a channel's ring when it covers the range, else from
/// RocksDB. When the rings pass the budget, the rings of the channels least recently applied
/// to or read are dropped whole, down to 90 % of it; applies then refill them from the new
/// message on. At open and install, the channels with the newest last message are loaded
/// first, up to 90 % of the budget. Rings decide only where a read is served from, never what
/// is applied or what a read answers, so replicas that evict differently (they serve
/// different reads) still apply the same and answer the same.
///
/// Concurrency: `apply` and `install_snapshot` serialize on one mutex; readers take a
/// read lock on the in-memory view only for as long as it takes to copy out of it, and read
/// RocksDB without locks. `build_snapshot` holds no lock while it streams the file.
pub struct ChatState {
    config: Config,
    writer: Mutex<Writer>,
    view: RwLock<View>,
    listener: RwLock<Option<Listener>>,
    /// A delete erased a body since the last [`ChatState::compact_if_erased`].
    erased: std::sync::atomic::AtomicBool,
}

impl ChatState {
    /// Opens (or creates) the state in `config.dir`, rebuilding heads, users and rings from
    /// RocksDB.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`], [`Error::Io`], [`Error::Rocks`], or [`Error::Corrupt`] if the
    /// stored state breaks an invariant.
    pub fn open(config: Config) -> Result<ChatState, Error> {
        config.validate()?;
        let generation = store::open_layout(&config.dir)?;
        let store = Arc::new(Store::open(&config.dir, generation)?);
        dedup::migrate(&store)?;
        let view = load_view(store.clone(), config.ring_len, config.ring_bytes_max)?;
        let client_seqs = load_client_seqs(&store)?;
        info!(
            dir = %config.dir.display(),
            generation,
            channels = view.channels.len(),
            users = view.users.len(),
            ring_bytes = view.ring_bytes,
            applied_index = view.applied_index.map(|i| i.0),
            "chat state opened"
        );
        let writer = Writer {
            store,
            applied_index: view.applied_index,
            key: Vec::with_capacity(128),
            value: Vec::with_capacity(1024),
            puts: Puts::default(),
            client_seqs,
        };
        Ok(ChatState {
            config,
            writer: Mutex::new(writer),
            view: RwLock::new(view),
            listener: RwLock::new(None),
            erased: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Applies committed entries in order and returns exactly one response per entry.
    ///
    /// Everything the call changes, plus `meta`, goes to RocksDB in one `WriteBatch` written
    /// without RocksDB's WAL: the raft log is the durable record, and a replica that loses the
    /// batches no flush has written yet (any crash, kill -9 included) restarts from an older
    /// `last_applied` and re-applies the rest from the raft log. Flushes write both column
    /// families atomically and never split a batch. [`ChatState::build_snapshot`] flushes
    /// before the raft log can be purged.
    ///
    /// The apply listener, if set, is called before this returns.
    ///
    /// # Panics
    /// - if an entry's index is not above the previous applied index (broken raft contract);
    /// - if a RocksDB read or write fails, or a stored record is corrupt: an error that only
    ///   this replica sees must not turn into a different response or state than the other
    ///   replicas have, so the process stops and recovers from disk and the raft log.
    pub fn apply(&self, entries: &[ApplyEntry<'_>], meta: RaftMeta) -> Vec<ChatResponse> {
        self.try_apply(entries, meta)
            .unwrap_or_else(|e| panic!("rocksdb write failed in apply: {e}"))
    }

    /// [`ChatState::apply`] for a state that is thrown away when it fails (a restore's
    /// scratch state): a failed RocksDB write is returned instead of stopping the process.
    /// After an error the state is unusable, because its applied index is already past what
    /// it stored.
    ///
    /// # Errors
    /// [`Error::Rocks`] when the batch cannot be written (a full disk).
    ///
    /// # Panics
    /// As [`ChatState::apply`], except for the batch write.
    pub fn try_apply(
        &self,
        entries: &[ApplyEntry<'_>],
        meta: RaftMeta,
    ) -> Result<Vec<ChatResponse>, Error> {
        let mut guard = self.writer.lock();
        let w = &mut *guard;
        let mut batch = Batch {
            touched: HashMap::new(),
            changed: HashMap::new(),
            dedup: HashMap::new(),
            users: HashMap::new(),
            join_secret: None,
            records: HashMap::new(),
            new_owned: HashMap::new(),
            retention: HashMap::new(),
            topics: HashMap::new(),
            marks: HashMap::new(),
            added: Vec::new(),
            default_retention: None,
            expiry: None,
        };
        let mut responses = Vec::with_capacity(entries.len());
        for entry in entries {
            if let ApplyPayload::Command(Command::Expire { .. }) = entry.payload {
                // What an expiry pass removes is read from the stored state, which holds none
                // of this call's other entries: alone, it removes the same on every replica
                // however the entries were batched.
                assert_eq!(entries.len(), 1, "an Expire entry must be applied alone");
            }
            if let Some(prev) = w.applied_index {
                assert!(
                    entry.index > prev,
                    "apply index went backwards: {} after {}",
                    entry.index.0,
                    prev.0
                );
            }
            w.applied_index = Some(entry.index);
            responses.push(self.apply_entry(w, &mut batch, entry));
        }
        if let Some(event) = self.write_batch(w, batch, meta, entries.len())? {
            self.notify(&event);
        }
        Ok(responses)
    }

    fn apply_entry<'a>(
        &self,
        w: &mut Writer,
        batch: &mut Batch<'a>,
        entry: &ApplyEntry<'a>,
    ) -> ChatResponse {
        match entry.payload {
            ApplyPayload::Blank | ApplyPayload::Membership => ChatResponse::None,
            ApplyPayload::Malformed => ChatResponse::Rejected(RejectReason::Malformed),
            ApplyPayload::Command(Command::Send(cmd)) => match self.apply_send(w, batch, cmd, None)
            {
                Ok(sent) => ChatResponse::Sent(sent),
                Err(reason) => ChatResponse::Rejected(reason),
            },
            ApplyPayload::Command(Command::SendBatch(cmds)) => {
                if cmds.len() > MAX_BATCH_SENDS {
                    return ChatResponse::Rejected(RejectReason::BatchTooLarge {
                        count: cmds.len() as u64,
                        max: MAX_BATCH_SENDS as u64,
                    });
                }
                let results = cmds
                    .iter()
                    .map(|c| self.apply_send(w, batch, c, None))
                    .collect();
                ChatResponse::Batch(results)
            }
            ApplyPayload::Command(Command::RegisterUser { name, public_key }) => {
                self.apply_register(w, batch, name, public_key)
            }
            ApplyPayload::Command(Command::SetJoinSecret(secret)) => {
                if !JOIN_SECRET_BYTES.contains(&secret.0.len()) {
                    let len = secret.0.len() as u64;
                    return ChatResponse::Rejected(RejectReason::InvalidJoinSecret { len });
                }
                batch.join_secret = Some(&secret.0);
                ChatResponse::JoinSecretSet
            }
            ApplyPayload::Command(Command::Channel { channel, by, op }) => {
                match self.apply_channel_op(batch, channel, by, op) {
                    Ok(()) => ChatResponse::ChannelUpdated,
                    Err(reason) => ChatResponse::Rejected(reason),
                }
            }
            ApplyPayload::Command(Command::Expire { at_ms }) => self.apply_expire(w, batch, *at_ms),
            ApplyPayload::Command(Command::SetDefaultRetention(retention)) => {
                if let Err(reason) = retention.validate() {
                    return ChatResponse::Rejected(reason);
                }
                batch.default_retention = Some(*retention);
                ChatResponse::DefaultRetentionSet
            }
            ApplyPayload::Command(Command::Relate(cmd)) => {
                match self.apply_send(w, batch, &cmd.send, Some(&cmd.relation)) {
                    Ok(sent) => ChatResponse::Sent(sent),
                    Err(reason) => ChatResponse::Rejected(reason),
                }
            }
            ApplyPayload::Command(Command::MarkRead(marks)) => {
                if marks.len() > MAX_BATCH_MARKS {
                    return ChatResponse::Rejected(RejectReason::BatchTooLarge {
                        count: marks.len() as u64,
                        max: MAX_BATCH_MARKS as u64,
                    });
                }
                let results = marks
                    .iter()
                    .map(|mark| self.apply_mark(w, batch, mark))
                    .collect();
                ChatResponse::Marked(results)
            }
        }
    }

    /// Finds what an `Expire` at `at_ms` removes (see `retention.rs`), reading the stored
    /// state: the call holds no other entry.
    fn apply_expire(&self, w: &mut Writer, batch: &mut Batch<'_>, at_ms: u64) -> ChatResponse {
        let db = w.store.db();
        let view = self.view.read();
        let clock = view.clock.max(at_ms);
        let mut expiry = Expiry {
            clock,
            ..Expiry::default()
        };
        let mut scan_left = EXPIRE_SCAN_MAX;
        let mut messages = 0;
        // In name order, so the scan bound cuts the same channels short on every replica.
        for name in &view.names {
            let Some(c) = view.channels.get(name) else {
                continue;
            };
            let policy = view
                .retention
                .get(name)
                .copied()
                .unwrap_or(view.default_retention);
            if policy.is_forever() || c.floor > c.head {
                continue;
            }
            let mut floor = c.floor.max(policy.count_floor(c.head));
            let cutoff = policy.age_cutoff(clock);
            if cutoff > 0 && floor <= c.head {
                floor += count_older(db, name, floor, c.head, cutoff, &mut scan_left)
                    .unwrap_or_else(|e| panic!("rocksdb read failed in expire: {e}"));
            }
            if floor > c.floor {
                messages += floor - c.floor;
                expiry.floors.push((name.clone(), c.floor, floor));
            }
        }
        drop(view);
        let cutoff = clock.saturating_sub(DEDUP_WINDOW_MS);
        if cutoff > 0 {
            expire_dedup(&w.store, cutoff, &mut expiry)
                .unwrap_or_else(|e| panic!("rocksdb read failed in expire: {e}"));
        }
        let dedup_records = expiry.dedup.len() as u64;
        if messages > 0 || dedup_records > 0 {
            info!(clock, messages, dedup_records, "expired by retention");
        }
        batch.expiry = Some(expiry);
        ChatResponse::Expired {
            messages,
            dedup_records,
        }
    }

    /// Whether `sender` may write `channel`; the first message of a channel without a record
    /// creates its public record, owned by the sender.
    fn admit_send<'a>(
        &self,
        batch: &mut Batch<'a>,
        channel: &'a str,
        sender: &'a str,
    ) -> Result<(), RejectReason> {
        let admits = |r: &ChannelRecord| {
            if r.admits(sender) {
                Ok(())
            } else {
                Err(RejectReason::NotMember)
            }
        };
        if let Some(record) = batch.records.get(channel) {
            return admits(record);
        }
        let view = self.view.read();
        if let Some(record) = view.records.get(channel) {
            return admits(record);
        }
        if view.channels.contains_key(channel) || batch.touched.contains_key(channel) {
            // A channel from before records: public, unowned.
            return Ok(());
        }
        if crate::is_direct_channel(channel) {
            // Only `CreateDirect` makes a direct conversation, so nobody can squat its name.
            return Err(RejectReason::DirectChannel);
        }
        let owned = self.owned_by(&view, batch, sender);
        drop(view);
        if owned >= MAX_CHANNELS_PER_USER {
            return Err(RejectReason::TooManyChannels);
        }
        let record = ChannelRecord {
            owner: Some(sender.to_owned()),
            ..ChannelRecord::default()
        };
        batch.records.insert(channel, record);
        *batch.new_owned.entry(sender).or_default() += 1;
        Ok(())
    }

    /// Channels `user` owns, counting those created earlier in this call.
    fn owned_by(&self, view: &View, batch: &Batch<'_>, user: &str) -> usize {
        view.owned.get(user).copied().unwrap_or(0) + batch.new_owned.get(user).copied().unwrap_or(0)
    }

    /// Applies one [`ChannelOp`] by the rules in `channel.rs`.
    fn apply_channel_op<'a>(
        &self,
        batch: &mut Batch<'a>,
        channel: &'a str,
        by: &'a str,
        op: &'a ChannelOp,
    ) -> Result<(), RejectReason> {
        if !is_valid_channel(channel) {
            return Err(RejectReason::InvalidChannel);
        }
        if !is_valid_sender(by) {
            return Err(RejectReason::InvalidSender);
        }
        let view = self.view.read();
        let current = match batch.records.get(channel) {
            Some(record) => Some(record.clone()),
            None => view.records.get(channel).cloned(),
        };
        if let ChannelOp::CreateDirect { members, crypto } = op {
            let record = self.create_direct(&view, batch, channel, by, members, crypto, current)?;
            drop(view);
            *batch.new_owned.entry(by).or_default() += 1;
            let others = members.iter().filter(|m| m.as_str() != by);
            batch.added.extend(others.map(|m| (m.as_str(), channel)));
            batch.records.insert(channel, record);
            return Ok(());
        }
        if crate::is_direct_channel(channel) {
            return Err(RejectReason::DirectChannel);
        }
        if let ChannelOp::SetTopic(topic) = op {
            if current.as_ref().and_then(|r| r.owner.as_deref()) != Some(by) {
                return Err(RejectReason::NotOwner);
            }
            if topic.as_deref().is_some_and(|t| !crate::valid_topic(t)) {
                return Err(RejectReason::InvalidTopic);
            }
            let topic = topic.as_deref().filter(|t| !t.is_empty());
            batch.topics.insert(channel, topic);
            return Ok(());
        }
        if let ChannelOp::SetRetention(retention) = op {
            if current.as_ref().and_then(|r| r.owner.as_deref()) != Some(by) {
                return Err(RejectReason::NotOwner);
            }
            if let Some(retention) = retention {
                retention.validate()?;
            }
            batch.retention.insert(channel, *retention);
            return Ok(());
        }
        let crypto_len = match op {
            ChannelOp::Create {
                crypto: Some(crypto),
                ..
            }
            | ChannelOp::SetCrypto(crypto) => crypto.len(),
            _ => 0,
        };
        if crypto_len > MAX_CRYPTO_RECORD_BYTES {
            return Err(RejectReason::CryptoTooLarge {
                len: crypto_len as u64,
            });
        }
        let is_owner = |r: &ChannelRecord| r.owner.as_deref() == Some(by);
        let private = |r: Option<ChannelRecord>| match r {
            Some(r) if r.private => Ok(r),
            _ => Err(RejectReason::NotPrivate),
        };
        let record = match op {
            ChannelOp::Create { private, crypto } => {
                let head = match batch.touched.get(channel) {
                    Some(&(head, _)) => head,
                    None => view.channels.get(channel).map_or(0, |c| c.head),
                };
                if current.is_some() || (*private && head > 0) {
                    return Err(RejectReason::ChannelExists);
                }
                if self.owned_by(&view, batch, by) >= MAX_CHANNELS_PER_USER {
                    return Err(RejectReason::TooManyChannels);
                }
                *batch.new_owned.entry(by).or_default() += 1;
                let members = if *private {
                    BTreeSet::from([by.to_owned()])
                } else {
                    BTreeSet::new()
                };
                ChannelRecord {
                    owner: Some(by.to_owned()),
                    private: *private,
                    members,
                    invited: BTreeSet::new(),
                    crypto: crypto.clone(),
                }
            }
            ChannelOp::SetCrypto(crypto) => {
                let mut record = current.filter(is_owner).ok_or(RejectReason::NotOwner)?;
                if record.crypto.is_some() {
                    return Err(RejectReason::CryptoAlreadySet);
                }
                record.crypto = Some(crypto.clone());
                record
            }
            ChannelOp::Invite(user) => {
                let mut record = private(current)?;
                if !is_owner(&record) {
                    return Err(RejectReason::NotOwner);
                }
                let registered = batch.users.contains_key(user.as_str())
                    || view.users.contains_key(user.as_str());
                if !registered {
                    return Err(RejectReason::UnknownUser);
                }
                if record.members.contains(user) || record.invited.contains(user) {
                    return Ok(());
                }
                if record.members.len() + record.invited.len() >= MAX_MEMBERS {
                    return Err(RejectReason::TooManyMembers);
                }
                record.invited.insert(user.clone());
                batch.added.push((user.as_str(), channel));
                record
            }
            ChannelOp::Accept => {
                let mut record = private(current)?;
                if record.members.contains(by) {
                    return Ok(());
                }
                if !record.invited.remove(by) {
                    return Err(RejectReason::NotInvited);
                }
                record.members.insert(by.to_owned());
                record
            }
            ChannelOp::Remove(user) => {
                let mut record = private(current)?;
                if record.owner.as_deref() == Some(user.as_str()) {
                    return Err(RejectReason::OwnerCannotLeave);
                }
                if !is_owner(&record) && by != user {
                    return Err(RejectReason::NotOwner);
                }
                let removed = record.members.remove(user) | record.invited.remove(user);
                if !removed {
                    return Ok(());
                }
                record
            }
            ChannelOp::SetRetention(_)
            | ChannelOp::SetTopic(_)
            | ChannelOp::CreateDirect { .. } => {
                unreachable!("handled above")
            }
        };
        drop(view);
        batch.records.insert(channel, record);
        Ok(())
    }

    /// The record a [`ChannelOp::CreateDirect`] makes, by the rules in `channel.rs`.
    #[allow(clippy::too_many_arguments)]
    fn create_direct(
        &self,
        view: &View,
        batch: &Batch<'_>,
        channel: &str,
        by: &str,
        members: &[String],
        crypto: &[u8],
        current: Option<ChannelRecord>,
    ) -> Result<ChannelRecord, RejectReason> {
        let set: BTreeSet<String> = members.iter().cloned().collect();
        let shaped = set.len() == members.len()
            && (2..=crate::MAX_DIRECT_MEMBERS).contains(&set.len())
            && set.contains(by)
            && set.iter().all(|m| is_valid_sender(m))
            && crate::direct_channel_name(members) == channel;
        if !shaped {
            return Err(RejectReason::InvalidDirect);
        }
        if crypto.len() > crate::MAX_DIRECT_CRYPTO_BYTES {
            return Err(RejectReason::CryptoTooLarge {
                len: crypto.len() as u64,
            });
        }
        let registered = |m: &String| {
            batch.users.contains_key(m.as_str()) || view.users.contains_key(m.as_str())
        };
        if !set.iter().all(registered) {
            return Err(RejectReason::UnknownUser);
        }
        let has_messages = match batch.touched.get(channel) {
            Some(&(head, _)) => head > 0,
            None => view.channels.get(channel).is_some_and(|c| c.head > 0),
        };
        if current.is_some() || has_messages {
            return Err(RejectReason::ChannelExists);
        }
        if self.owned_by(view, batch, by) >= MAX_CHANNELS_PER_USER {
            return Err(RejectReason::TooManyChannels);
        }
        Ok(ChannelRecord {
            owner: Some(by.to_owned()),
            private: true,
            members: set,
            invited: BTreeSet::new(),
            crypto: Some(crypto.to_vec()),
        })
    }

    fn apply_send<'a>(
        &self,
        w: &mut Writer,
        batch: &mut Batch<'a>,
        cmd: &'a SendCmd,
        relation: Option<&'a Relation>,
    ) -> Result<Sent, RejectReason> {
        validate_send(cmd)?;
        let id = DedupId::of(&cmd.sender, &cmd.client_id);
        let dedup = (id, cmd.client_seq);
        if let Some(&(channel, seq, at_ms)) = batch.dedup.get(&dedup) {
            return Ok(duplicate(channel, seq, at_ms));
        }
        format::dedup_key(&mut w.key, &id.0, cmd.client_seq);
        if !w.client_seqs.is_new(id, cmd.client_seq) {
            let stored = w.store.db().get_pinned_cf(w.store.dedup_cf(), &w.key);
            let stored = stored.unwrap_or_else(|e| panic!("rocksdb get failed in apply: {e}"));
            if let Some(value) = stored {
                let (seq, at_ms, channel) = decode_dedup_value(&value)
                    .unwrap_or_else(|e| panic!("corrupt dedup record in apply: {e}"));
                return Ok(duplicate(channel, seq, at_ms));
            }
            if dedup_floor(&w.store, id).is_some_and(|floor| cmd.client_seq <= floor) {
                return Err(RejectReason::RetryExpired);
            }
        }
        let channel = cmd.channel.as_str();
        if let Some(relation) = relation {
            relation_shape(relation)?;
            if !self.has_messages(batch, channel) {
                // Refused before `admit_send`, which would create the record of a channel
                // without one; only membership is told apart, as for any send.
                let record = self.record(batch, channel);
                if record.is_some_and(|r| !r.admits(&cmd.sender)) {
                    return Err(RejectReason::NotMember);
                }
                return Err(RejectReason::NoSuchMessage);
            }
        }
        self.admit_send(batch, channel, &cmd.sender)?;
        let changes = match relation {
            Some(relation) => {
                let seq = self.head_in_call(batch, channel) + 1;
                self.relate(&*w, batch, cmd, relation, seq)?
            }
            None => Vec::new(),
        };
        w.client_seqs.record(id, cmd.client_seq);
        let touched = batch.touched.entry(channel).or_insert_with(|| {
            let head = self.view.read().channels.get(channel).map_or(0, |c| c.head);
            (head, Vec::new())
        });
        touched.0 += 1;
        let seq = touched.0;
        encode_dedup_value(&mut w.value, seq, cmd.at_ms, channel);
        w.puts.put(&w.key, &w.value);
        format::expiry_key(&mut w.key, cmd.at_ms, &id.0, cmd.client_seq);
        w.puts.put(&w.key, &[VALUE_VERSION]);
        format::message_key(&mut w.key, channel, seq);
        let entry = RingEntry {
            sender: cmd.sender.clone(),
            body: cmd.body.clone(),
            at_ms: cmd.at_ms,
            client_id: cmd.client_id,
            client_seq: cmd.client_seq,
            meta: relation.map(|r| {
                Box::new(MessageMeta {
                    relation: Some(r.clone()),
                    ..MessageMeta::default()
                })
            }),
        };
        encode_message_value(&mut w.value, &entry.value());
        w.puts.put(&w.key, &w.value);
        touched.1.push(entry);
        for (target, changed) in changes {
            batch.changed.insert((channel, target), changed);
        }
        batch.dedup.insert(dedup, (channel, seq, cmd.at_ms));
        Ok(Sent {
            channel: channel.to_owned(),
            seq: ChannelSeq(seq),
            at_ms: cmd.at_ms,
            duplicate: false,
        })
    }

    /// Checks `relation` of a send, which will take seq `own_seq`, by the rules in
    /// `relation.rs` and returns the stored messages it changes, as they stand after it.
    /// Changes nothing itself.
    fn relate(
        &self,
        w: &Writer,
        batch: &Batch<'_>,
        cmd: &SendCmd,
        relation: &Relation,
        own_seq: u64,
    ) -> Result<Vec<(u64, RingEntry)>, RejectReason> {
        let channel = cmd.channel.as_str();
        let seq = relation.target().0;
        let mut target = self
            .stored(w, batch, channel, seq)
            .ok_or(RejectReason::NoSuchMessage)?;
        let mut meta = target.meta();
        if meta.relation.as_ref().is_some_and(|r| !r.is_target()) {
            return Err(RejectReason::NotATarget);
        }
        if meta.deleted {
            return Err(RejectReason::MessageDeleted);
        }
        let mut changes = Vec::new();
        match relation {
            Relation::Reply { .. } => meta.replies += 1,
            Relation::Edit { .. } => {
                if target.sender != cmd.sender {
                    return Err(RejectReason::NotSender);
                }
                if target.body.first() != cmd.body.first() {
                    return Err(RejectReason::EditFormatChanged);
                }
                if meta.edits.len() >= MAX_EDITS {
                    return Err(RejectReason::TooManyEdits);
                }
                meta.edits.push(ChannelSeq(own_seq));
            }
            Relation::Delete { .. } => {
                if target.sender != cmd.sender && !self.is_owner(batch, channel, &cmd.sender) {
                    return Err(RejectReason::NotSender);
                }
                for edit in &meta.edits {
                    let mut erased = self.stored(w, batch, channel, edit.0).unwrap_or_else(|| {
                        panic!("{channel}/{}: edit of a stored message is missing", edit.0)
                    });
                    erased.body = Vec::new();
                    let mut edit_meta = erased.meta();
                    edit_meta.deleted = true;
                    erased.set_meta(edit_meta);
                    changes.push((edit.0, erased));
                }
                target.body = Vec::new();
                meta.deleted = true;
                meta.reactions.clear();
                self.erased.store(true, Ordering::Relaxed);
            }
            Relation::React { emoji, on, .. } => {
                let users = meta.reactions.entry(emoji.clone()).or_default();
                if *on {
                    if users.contains(&cmd.sender) {
                        return Err(RejectReason::AlreadyReacted);
                    }
                    users.insert(cmd.sender.clone());
                    if meta.reaction_count() > MAX_REACTIONS {
                        return Err(RejectReason::TooManyReactions);
                    }
                } else {
                    if !users.remove(&cmd.sender) {
                        return Err(RejectReason::NotReacted);
                    }
                    if users.is_empty() {
                        meta.reactions.remove(emoji);
                    }
                }
            }
        }
        target.set_meta(meta);
        changes.push((seq, target));
        Ok(changes)
    }

    /// Moves `mark.user`'s read marker in `mark.channel` up to `mark.seq` (the rules are on
    /// [`ReadMark`]); answers the marker after it.
    fn apply_mark<'a>(
        &self,
        w: &Writer,
        batch: &mut Batch<'a>,
        mark: &'a ReadMark,
    ) -> Result<ChannelSeq, RejectReason> {
        let (user, channel) = (mark.user.as_str(), mark.channel.as_str());
        if !is_valid_channel(channel) {
            return Err(RejectReason::InvalidChannel);
        }
        if !is_valid_sender(user) {
            return Err(RejectReason::InvalidSender);
        }
        if !self.record(batch, channel).is_none_or(|r| r.admits(user)) {
            return Err(RejectReason::NotMember);
        }
        if mark.seq.0 == 0 || mark.seq.0 > self.head_in_call(batch, channel) {
            return Err(RejectReason::NoSuchMessage);
        }
        let current = match batch.marks.get(&(user, channel)) {
            Some(&seq) => seq,
            None => read_mark(&w.store, user, channel)
                .unwrap_or_else(|e| panic!("rocksdb read failed in apply: {e}")),
        };
        if mark.seq.0 <= current {
            return Ok(ChannelSeq(current));
        }
        batch.marks.insert((user, channel), mark.seq.0);
        Ok(mark.seq)
    }

    /// Whether `user` owns `channel`, counting records changed in this call.
    fn is_owner(&self, batch: &Batch<'_>, channel: &str, user: &str) -> bool {
        self.record(batch, channel)
            .is_some_and(|r| r.owner.as_deref() == Some(user))
    }

    /// The record of `channel` as it stands at this point of the `apply` call.
    fn record(&self, batch: &Batch<'_>, channel: &str) -> Option<ChannelRecord> {
        match batch.records.get(channel) {
            Some(record) => Some(record.clone()),
            None => self.view.read().records.get(channel).cloned(),
        }
    }

    /// Whether `channel` has (or had: expired ones count) a message, counting this call's.
    fn has_messages(&self, batch: &Batch<'_>, channel: &str) -> bool {
        self.head_in_call(batch, channel) > 0
    }

    /// `channel`'s head at this point of the `apply` call.
    fn head_in_call(&self, batch: &Batch<'_>, channel: &str) -> u64 {
        match batch.touched.get(channel) {
            Some(&(head, _)) => head,
            None => self.view.read().channels.get(channel).map_or(0, |c| c.head),
        }
    }

    /// Message `seq` of `channel` as it stands at this point of the `apply` call: changed or
    /// appended in this call, or stored. `None` when it is not stored (0, above the head,
    /// below the floor).
    fn stored(&self, w: &Writer, batch: &Batch<'_>, channel: &str, seq: u64) -> Option<RingEntry> {
        if let Some(entry) = batch.changed.get(&(channel, seq)) {
            return Some(entry.clone());
        }
        let view = self.view.read();
        let (head, floor) = view
            .channels
            .get(channel)
            .map_or((0, 1), |c| (c.head, c.floor));
        if let Some((_, new)) = batch.touched.get(channel) {
            if seq > head {
                return new.get((seq - head - 1) as usize).cloned();
            }
        }
        if seq == 0 || seq < floor || seq > head {
            return None;
        }
        let c = &view.channels[channel];
        if seq >= c.ring_first() {
            return Some(c.ring[(seq - c.ring_first()) as usize].clone());
        }
        drop(view);
        // A key of its own: the caller holds its dedup key in `w.key`.
        let mut key = Vec::new();
        format::message_key(&mut key, channel, seq);
        let value = w
            .store
            .db()
            .get_pinned(&key)
            .unwrap_or_else(|e| panic!("rocksdb get failed in apply: {e}"))
            .unwrap_or_else(|| panic!("{channel}/{seq}: stored message missing below head"));
        let message = decode_message(channel, seq, &value)
            .unwrap_or_else(|e| panic!("corrupt message in apply: {e}"));
        Some(RingEntry::from_message(message))
    }

    fn apply_register<'a>(
        &self,
        w: &mut Writer,
        batch: &mut Batch<'a>,
        name: &'a str,
        public_key: &[u8; 32],
    ) -> ChatResponse {
        if !is_valid_sender(name) {
            return ChatResponse::Rejected(RejectReason::InvalidUserName);
        }
        let existing = match batch.users.get(name) {
            Some(key) => Some(*key),
            None => self.view.read().users.get(name).copied(),
        };
        match existing {
            Some(key) if key == *public_key => ChatResponse::Registered,
            Some(_) => ChatResponse::Rejected(RejectReason::NameTaken),
            None => {
                format::user_key(&mut w.key, name);
                w.puts.put(&w.key, &encode_bytes_value(public_key));
                batch.users.insert(name, *public_key);
                ChatResponse::Registered
            }
        }
    }

    /// Writes the batch plus meta, then publishes it to readers. Returns the event for the
    /// listener, or `None` when no entry was applied.
    fn write_batch(
        &self,
        w: &mut Writer,
        batch: Batch<'_>,
        meta: RaftMeta,
        entry_count: usize,
    ) -> Result<Option<AppliedEvent>, Error> {
        for (channel, (head, _)) in &batch.touched {
            format::head_key(&mut w.key, channel);
            w.puts.put(&w.key, &encode_u64_value(*head));
        }
        w.puts
            .put(META_LAST_APPLIED, &encode_bytes_value(&meta.last_applied));
        if let Some(membership) = &meta.membership {
            w.puts.put(META_MEMBERSHIP, &encode_bytes_value(membership));
        }
        if let Some(index) = w.applied_index {
            w.puts.put(META_APPLIED_INDEX, &encode_u64_value(index.0));
        }
        if let Some(secret) = batch.join_secret {
            w.puts.put(META_JOIN_SECRET, &encode_bytes_value(secret));
        }
        for (channel, record) in &batch.records {
            format::channel_key(&mut w.key, channel);
            w.puts.put(&w.key, &encode_channel_value(record));
        }
        for (&(channel, seq), entry) in &batch.changed {
            format::message_key(&mut w.key, channel, seq);
            encode_message_value(&mut w.value, &entry.value());
            w.puts.put(&w.key, &w.value);
        }
        // Deletes go first: a put of this call is never undone by them.
        let mut wb =
            WriteBatch::with_capacity_bytes(w.puts.bytes.len() + 8 * w.puts.items.len() + 64);
        for (channel, topic) in &batch.topics {
            format::channel_prefixed_key(&mut w.key, PREFIX_TOPIC, channel);
            match topic {
                Some(topic) => w.puts.put(&w.key, &encode_bytes_value(topic.as_bytes())),
                None => wb.delete(&w.key),
            }
        }
        for (&(user, channel), &seq) in &batch.marks {
            format::read_mark_key(&mut w.key, user, channel);
            w.puts.put(&w.key, &encode_u64_value(seq));
        }
        for (channel, retention) in &batch.retention {
            format::channel_prefixed_key(&mut w.key, PREFIX_RETENTION, channel);
            match retention {
                Some(retention) => w.puts.put(&w.key, &encode_retention_value(retention)),
                None => wb.delete(&w.key),
            }
        }
        if let Some(retention) = &batch.default_retention {
            w.puts
                .put(META_RETENTION_DEFAULT, &encode_retention_value(retention));
        }
        if let Some(expiry) = &batch.expiry {
            let mut end = Vec::new();
            for (channel, old, new) in &expiry.floors {
                format::message_key(&mut w.key, channel, *old);
                format::message_key(&mut end, channel, *new);
                wb.delete_range(&w.key, &end);
                format::channel_prefixed_key(&mut w.key, PREFIX_FLOOR, channel);
                w.puts.put(&w.key, &encode_u64_value(*new));
            }
            for (index_key, dedup_key) in &expiry.dedup {
                wb.delete(index_key);
                wb.delete_cf(w.store.dedup_cf(), dedup_key);
            }
            for (client, floor) in &expiry.dedup_floors {
                format::dedup_floor_key(&mut w.key, &client.0);
                w.puts.put(&w.key, &encode_u64_value(*floor));
            }
            w.puts.put(META_CLOCK, &encode_u64_value(expiry.clock));
        }
        let wb = w.puts.take_sorted_batch(w.store.dedup_cf(), wb);
        let mut opts = WriteOptions::default();
        // No WAL: see `apply` for why that is enough.
        opts.disable_wal(true);
        w.store
            .db()
            .write_opt(wb, &opts)
            .map_err(|source| Error::Rocks {
                op: "write the applied batch",
                source,
            })?;

        let mut heads: Vec<(String, ChannelSeq)> = Vec::with_capacity(batch.touched.len());
        let mut markers: Vec<(String, String, ChannelSeq)> = batch
            .marks
            .iter()
            .map(|(&(user, channel), &seq)| (user.to_owned(), channel.to_owned(), ChannelSeq(seq)))
            .collect();
        markers.sort_unstable();
        let mut view = self.view.write();
        for (channel, (head, new)) in batch.touched {
            if !view.channels.contains_key(channel) {
                view.names.insert(channel.to_owned());
            }
            publish_channel(&mut view, channel, head, new, self.config.ring_len);
            heads.push((channel.to_owned(), ChannelSeq(head)));
        }
        for ((channel, seq), entry) in batch.changed {
            replace_in_ring(&mut view, channel, seq, entry);
        }
        for (owner, count) in batch.new_owned {
            *view.owned.entry(owner.to_owned()).or_default() += count;
        }
        for (channel, record) in batch.records {
            if !view.names.contains(channel) {
                view.names.insert(channel.to_owned());
            }
            view.records.insert(channel.to_owned(), record);
        }
        if let Some(expiry) = batch.expiry {
            for (channel, _, floor) in expiry.floors {
                let c = view.channels.get_mut(&channel).expect("expiry found it");
                let before = c.ring_bytes();
                c.floor = floor;
                c.trim_ring(floor);
                view.ring_bytes = view.ring_bytes - before + view.channels[&channel].ring_bytes();
            }
            view.clock = expiry.clock;
        }
        for (channel, retention) in batch.retention {
            match retention {
                Some(retention) => view.retention.insert(channel.to_owned(), retention),
                None => view.retention.remove(channel),
            };
        }
        for (channel, topic) in batch.topics {
            match topic {
                Some(topic) => view.topics.insert(channel.to_owned(), topic.to_owned()),
                None => view.topics.remove(channel),
            };
        }
        if let Some(retention) = batch.default_retention {
            view.default_retention = retention;
        }
        evict_rings(&mut view, self.config.ring_bytes_max);
        for (name, key) in batch.users {
            view.users.insert(name.to_owned(), key);
        }
        let join_secret_changed = batch.join_secret.is_some();
        if let Some(secret) = batch.join_secret {
            view.join_secret = Some(secret.to_vec());
        }
        view.last_applied = Some(meta.last_applied);
        if meta.membership.is_some() {
            view.membership = meta.membership;
        }
        view.applied_index = w.applied_index;
        drop(view);
        if entry_count == 0 {
            return Ok(None);
        }
        heads.sort_unstable();
        debug!(
            log_index = w.applied_index.map(|i| i.0),
            entries = entry_count,
            channels = heads.len(),
            "applied batch"
        );
        Ok(Some(AppliedEvent {
            index: w.applied_index.expect("set by a non-empty batch"),
            heads,
            join_secret_changed,
            markers,
            added: (batch.added.into_iter())
                .map(|(user, channel)| (user.to_owned(), channel.to_owned()))
                .collect(),
            snapshot: false,
        }))
    }

    fn notify(&self, event: &AppliedEvent) {
        if let Some(listener) = &*self.listener.read() {
            listener(event);
        }
    }

    /// Sets the function called after each applied batch and after each snapshot install.
    ///
    /// It runs on the applying thread while `apply` holds its lock, so events arrive in
    /// order; it must be quick and must not call `apply`, `install_snapshot` or
    /// `set_apply_listener` (reads are fine).
    pub fn set_apply_listener(&self, f: Box<dyn Fn(&AppliedEvent) + Send + Sync>) {
        *self.listener.write() = Some(f);
    }

    /// The opaque `last_applied` bytes stored by the latest `apply` (or snapshot).
    pub fn last_applied(&self) -> Option<Vec<u8>> {
        self.view.read().last_applied.clone()
    }

    /// The opaque membership bytes last stored, if any.
    pub fn membership(&self) -> Option<Vec<u8>> {
        self.view.read().membership.clone()
    }

    /// The index of the last applied entry, if any.
    pub fn applied_index(&self) -> Option<LogIndex> {
        self.view.read().applied_index
    }

    /// The newest seq of `channel`; 0 if it has no messages (or is not a valid name).
    pub fn head(&self, channel: &str) -> ChannelSeq {
        ChannelSeq(self.view.read().channels.get(channel).map_or(0, |c| c.head))
    }

    /// Every channel with at least one message and its head, sorted by name.
    pub fn channels(&self) -> Vec<(String, ChannelSeq)> {
        let view = self.view.read();
        let mut out: Vec<_> = view
            .channels
            .iter()
            .map(|(name, c)| (name.clone(), ChannelSeq(c.head)))
            .collect();
        drop(view);
        out.sort_unstable();
        out
    }

    /// Whether `user` may read and write `channel`: it is public (or has no record), or
    /// `user` is a member.
    pub fn admits(&self, channel: &str, user: &str) -> bool {
        let view = self.view.read();
        view.records.get(channel).is_none_or(|r| r.admits(user))
    }

    /// The record of `channel`, if it has one.
    pub fn channel_record(&self, channel: &str) -> Option<ChannelRecord> {
        self.view.read().records.get(channel).cloned()
    }

    /// Up to `limit` (at most [`CHANNEL_PAGE_MAX`]) channels `user` may see, in name order,
    /// after `after`; and whether more follow. A user sees public channels and the private
    /// ones they are a member of or invited to.
    pub fn channel_page(
        &self,
        user: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<ChannelListing>, bool), Error> {
        let limit = limit.clamp(1, CHANNEL_PAGE_MAX);
        let view = self.view.read();
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut visible = view
            .names
            .range::<str, _>((start, Bound::Unbounded))
            .filter_map(|name| {
                let record = view.records.get(name);
                if !record.is_none_or(|r| r.visible_to(user)) {
                    return None;
                }
                Some(ChannelListing {
                    name: name.clone(),
                    head: ChannelSeq(view.channels.get(name).map_or(0, |c| c.head)),
                    owner: record.and_then(|r| r.owner.clone()),
                    private: record.is_some_and(|r| r.private),
                    invited: record.is_some_and(|r| r.invited.contains(user)),
                    encrypted: record.is_some_and(|r| r.crypto.is_some()),
                    floor: ChannelSeq(view.channels.get(name).map_or(1, |c| c.floor)),
                    read_to: ChannelSeq(0),
                })
            });
        let mut page: Vec<ChannelListing> = visible.by_ref().take(limit).collect();
        let more = visible.next().is_some();
        let store = view.store.clone();
        drop(view);
        fill_read_marks(&store, user, &mut page)?;
        Ok((page, more))
    }

    /// The lowest seq `channel` still keeps: 1 until retention expired some of it.
    pub fn floor(&self, channel: &str) -> ChannelSeq {
        ChannelSeq(
            self.view
                .read()
                .channels
                .get(channel)
                .map_or(1, |c| c.floor),
        )
    }

    /// The retention of `channel`: its own, the default, and its floor.
    pub fn retention(&self, channel: &str) -> RetentionInfo {
        let view = self.view.read();
        RetentionInfo {
            own: view.retention.get(channel).copied(),
            default: view.default_retention,
            floor: ChannelSeq(view.channels.get(channel).map_or(1, |c| c.floor)),
        }
    }

    /// The topic of `channel`, if its owner set one.
    pub fn topic(&self, channel: &str) -> Option<String> {
        self.view.read().topics.get(channel).cloned()
    }

    /// The retention of every channel without one of its own.
    pub fn default_retention(&self) -> Retention {
        self.view.read().default_retention
    }

    /// The state machine's clock: the latest `at_ms` of an applied [`Command::Expire`], 0
    /// before one.
    pub fn clock_ms(&self) -> u64 {
        self.view.read().clock
    }

    /// Whether an [`Command::Expire`] at `now_ms` would remove anything: a channel holds more
    /// messages than its count allows, its oldest kept message is past its age, or a dedup
    /// record is older than [`DEDUP_WINDOW_MS`]. The leader asks before it proposes one, so a
    /// cluster with nothing due writes no entries (and its applied index stays still).
    ///
    /// # Errors
    /// [`Error::Rocks`] or [`Error::Corrupt`] when a message or the expiry index cannot be read.
    pub fn expiry_due(&self, now_ms: u64) -> Result<bool, Error> {
        let view = self.view.read();
        // The same clock and rules as `apply_expire`, so "due" means "would remove".
        let clock = view.clock.max(now_ms);
        let mut aged = Vec::new();
        for (name, c) in &view.channels {
            let policy = view
                .retention
                .get(name)
                .copied()
                .unwrap_or(view.default_retention);
            if policy.is_forever() || c.floor > c.head {
                continue;
            }
            let floor = c.floor.max(policy.count_floor(c.head));
            if floor > c.floor {
                return Ok(true);
            }
            let cutoff = policy.age_cutoff(clock);
            if cutoff > 0 {
                aged.push((name.clone(), floor, cutoff));
            }
        }
        let store = view.store.clone();
        drop(view);
        let mut key = Vec::new();
        for (name, floor, cutoff) in aged {
            // Only the oldest kept message needs reading: expiry removes a prefix. An apply
            // since the view was read may have removed it; then the next tick decides.
            format::message_key(&mut key, &name, floor);
            let value = store.db().get(&key).map_err(rocks("get"))?;
            if let Some(value) = value {
                if decode_message_value(&value)?.at_ms < cutoff {
                    return Ok(true);
                }
            }
        }
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(vec![PREFIX_EXPIRY + 1]);
        let mut it = store.db().raw_iterator_opt(opts);
        it.seek([PREFIX_EXPIRY]);
        let oldest = match it.key() {
            Some(key) => Some(parse_expiry_key(key)?.0),
            None => None,
        };
        it.status().map_err(rocks("iterate"))?;
        Ok(oldest.is_some_and(|at| at < clock.saturating_sub(DEDUP_WINDOW_MS)))
    }

    /// Bytes the channel rings hold now, counted as for [`Config::ring_bytes_max`] (never
    /// more than it once `open`, `apply` or `install_snapshot` returned).
    pub fn ring_bytes(&self) -> usize {
        self.view.read().ring_bytes
    }

    /// The cluster's join secret, once a [`Command::SetJoinSecret`] was applied.
    pub fn join_secret(&self) -> Option<Vec<u8>> {
        self.view.read().join_secret.clone()
    }

    /// The public key registered for `name`, if any.
    pub fn user_key(&self, name: &str) -> Option<[u8; 32]> {
        self.view.read().users.get(name).copied()
    }

    /// The highest seq `user` has marked read in `channel`; 0 when none.
    ///
    /// # Errors
    /// [`Error::Rocks`] or [`Error::Corrupt`] when RocksDB fails.
    pub fn read_marker(&self, user: &str, channel: &str) -> Result<ChannelSeq, Error> {
        let store = self.view.read().store.clone();
        read_mark(&store, user, channel).map(ChannelSeq)
    }

    /// Messages of `channel` with seq `>= from_seq`, ascending, at most
    /// `min(limit, HISTORY_LIMIT_MAX)`. Served from the ring when it covers the range,
    /// otherwise from RocksDB. An unknown or invalid channel has no messages.
    ///
    /// # Errors
    /// [`Error::Rocks`] or [`Error::Corrupt`] when RocksDB has to be read and fails.
    pub fn history(
        &self,
        channel: &str,
        from_seq: ChannelSeq,
        limit: usize,
    ) -> Result<Vec<Message>, Error> {
        let limit = limit.min(HISTORY_LIMIT_MAX) as u64;
        let view = self.view.read();
        let Some(c) = view.channels.get(channel) else {
            return Ok(Vec::new());
        };
        let from = from_seq.0.max(c.floor);
        if limit == 0 || from > c.head {
            return Ok(Vec::new());
        }
        let last = c.head.min(from.saturating_add(limit - 1));
        let messages = read_range(view, channel, from, last)?;
        self.attach_edits(channel, messages)
    }

    /// Attaches to each edited, undeleted message its newest edit, read like any message.
    fn attach_edits(
        &self,
        channel: &str,
        mut messages: Vec<Message>,
    ) -> Result<Vec<Message>, Error> {
        for m in &mut messages {
            let Some(&edit) = m.meta.edits.last().filter(|_| !m.meta.deleted) else {
                continue;
            };
            let view = self.view.read();
            let Some(c) = view.channels.get(channel) else {
                continue;
            };
            if edit.0 < c.floor || edit.0 > c.head {
                continue;
            }
            m.edit = read_range(view, channel, edit.0, edit.0)?
                .pop()
                .map(Box::new);
        }
        Ok(messages)
    }

    /// The `limit` newest messages of `channel` with seq `< before_seq`, ascending (at most
    /// [`HISTORY_LIMIT_MAX`]). `before_seq = ChannelSeq(u64::MAX)` gives the latest ones.
    ///
    /// # Errors
    /// As [`ChatState::history`].
    pub fn history_before(
        &self,
        channel: &str,
        before_seq: ChannelSeq,
        limit: usize,
    ) -> Result<Vec<Message>, Error> {
        let limit = limit.min(HISTORY_LIMIT_MAX) as u64;
        let view = self.view.read();
        let Some(c) = view.channels.get(channel) else {
            return Ok(Vec::new());
        };
        let last = c.head.min(before_seq.0.saturating_sub(1));
        if limit == 0 || last < c.floor {
            return Ok(Vec::new());
        }
        let from = last.saturating_sub(limit - 1).max(c.floor);
        let messages = read_range(view, channel, from, last)?;
        self.attach_edits(channel, messages)
    }

    /// Rewrites RocksDB's files so that nothing overwritten or removed (the body of a deleted
    /// message, expired messages) is left in them. Applies and reads go on meanwhile.
    ///
    /// # Errors
    /// [`Error::Rocks`] when a flush fails.
    pub fn compact(&self) -> Result<(), Error> {
        let store = self.view.read().store.clone();
        store.compact()
    }

    /// [`compact`](Self::compact)s when a delete erased a body since the last call, so an
    /// erased body leaves the state's files soon after (the node calls it after each
    /// snapshot). Answers whether it compacted.
    ///
    /// # Errors
    /// As [`compact`](Self::compact); the next call tries again.
    pub fn compact_if_erased(&self) -> Result<bool, Error> {
        if !self.erased.swap(false, Ordering::Relaxed) {
            return Ok(false);
        }
        self.compact()
            .inspect_err(|_| self.erased.store(true, Ordering::Relaxed))?;
        Ok(true)
    }

    /// Writes a snapshot file of the current state to `path` (through `path.tmp` and a
    /// rename) and fsyncs it. Applies and reads go on meanwhile; the file shows the state
    /// after one whole `apply` call.
    ///
    /// Before writing, the RocksDB WAL is synced, so that everything the snapshot holds is
    /// durable in RocksDB before the adapter purges the raft log up to the snapshot's index.
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Rocks`]; `path` is then left as it was.
    pub fn build_snapshot(&self, path: &Path) -> Result<SnapshotInfo, Error> {
        let store = self.view.read().store.clone();
        snapshot::write_snapshot(&store, path)
    }

    /// Writes a backup payload of the state to `path`: the snapshot format, with every pair
    /// except this cluster's own identity (its Raft meta and join secret), which a restore into
    /// a new cluster replaces. Reads one RocksDB snapshot like [`ChatState::build_snapshot`],
    /// so applies go on meanwhile and the file shows the state after one whole `apply` call,
    /// at the index it reports; it is not synced (the caller streams it out and removes it).
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Rocks`]; `path` is then left as it was.
    pub fn write_backup(&self, path: &Path) -> Result<(SnapshotInfo, SnapshotContents), Error> {
        let store = self.view.read().store.clone();
        snapshot::write_pairs(&store, path, snapshot::Purpose::Backup)
    }

    /// Stores `meta` as the Raft meta of a state that has none: a restored backup about to
    /// start as its new cluster's first node. Synced before it returns, so the node never runs
    /// Raft on a state without it.
    ///
    /// # Errors
    /// [`Error::Rocks`]; [`Error::InvalidConfig`] when the state already has Raft meta (it
    /// belongs to a cluster) or `meta` carries no membership.
    pub fn seed_raft_meta(&self, meta: RaftMeta) -> Result<(), Error> {
        let w = self.writer.lock();
        let Some(membership) = meta.membership else {
            return Err(Error::InvalidConfig {
                reason: "seeded raft meta needs a membership".into(),
            });
        };
        if self.view.read().last_applied.is_some() {
            return Err(Error::InvalidConfig {
                reason: "the state already belongs to a cluster (it has raft meta)".into(),
            });
        }
        let mut batch = WriteBatch::default();
        batch.put(META_LAST_APPLIED, encode_bytes_value(&meta.last_applied));
        batch.put(META_MEMBERSHIP, encode_bytes_value(&membership));
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        w.store
            .db()
            .write_opt(batch, &opts)
            .map_err(|source| Error::Rocks {
                op: "write",
                source,
            })?;
        let mut view = self.view.write();
        view.last_applied = Some(meta.last_applied);
        view.membership = Some(membership);
        Ok(())
    }

    /// Replaces the whole state with the snapshot at `path`.
    ///
    /// The file is verified completely (checksums, record count, trailer) while it is loaded
    /// into a fresh RocksDB directory; only then is that directory made current by renaming
    /// the `ACTIVE` pointer (the commit point; see `store::write_active`). A crash before the
    /// rename leaves the old state, after it the new one; the other directory is removed at
    /// the next open. Applies wait for the install; readers see the old state until the swap.
    ///
    /// # Errors
    /// [`Error::SnapshotCorrupt`], [`Error::UnsupportedVersion`], [`Error::Io`],
    /// [`Error::Rocks`], [`Error::Corrupt`]. On error the state is unchanged.
    pub fn install_snapshot(&self, path: &Path) -> Result<SnapshotInfo, Error> {
        let mut w = self.writer.lock();
        let generation = w.store.generation() + 1;
        store::remove_generation(&self.config.dir, generation)?;
        let store = Arc::new(Store::open(&self.config.dir, generation)?);
        // Until the pointer names it, the new directory is garbage: if anything below fails,
        // dropping `store` removes it.
        store.retire();
        let info = load_snapshot(&store, path)?;
        // A snapshot from a node of the earlier release holds the earlier dedup format.
        dedup::migrate(&store)?;
        let view = load_view(
            store.clone(),
            self.config.ring_len,
            self.config.ring_bytes_max,
        )?;
        let client_seqs = load_client_seqs(&store)?;
        store::write_active(&self.config.dir, generation)?;
        store.keep();
        let old_heads = self.head_map();
        let old = std::mem::replace(&mut *self.view.write(), view);
        old.store.retire();
        w.store = store;
        w.applied_index = info.applied_index;
        w.client_seqs = client_seqs;
        drop(old);
        info!(
            path = %path.display(),
            generation,
            applied_index = info.applied_index.map(|i| i.0),
            "snapshot installed"
        );
        if let Some(index) = info.applied_index {
            let heads = self.changed_heads(&old_heads);
            self.notify(&AppliedEvent {
                index,
                heads,
                join_secret_changed: true,
                markers: Vec::new(),
                added: Vec::new(),
                snapshot: true,
            });
        }
        Ok(info)
    }

    fn head_map(&self) -> HashMap<String, u64> {
        let view = self.view.read();
        view.channels
            .iter()
            .map(|(name, c)| (name.clone(), c.head))
            .collect()
    }

    fn changed_heads(&self, old: &HashMap<String, u64>) -> Vec<(String, ChannelSeq)> {
        let mut heads: Vec<_> = self
            .channels()
            .into_iter()
            .filter(|(name, head)| old.get(name) != Some(&head.0))
            .collect();
        heads.sort_unstable();
        heads
    }

    /// A deterministic, human-readable dump of everything stored in RocksDB (messages, heads,
    /// dedup records, users, meta), one line per pair in key order. Two replicas that applied
    /// the same entries with the same meta produce the same dump. Scans everything; for
    /// tests and debugging.
    ///
    /// # Errors
    /// [`Error::Rocks`] or [`Error::Corrupt`].
    pub fn dump(&self) -> Result<String, Error> {
        let store = self.view.read().store.clone();
        let mut out = String::new();
        store.for_each_pair(&store.db().snapshot(), |key, value| {
            dump_pair(&mut out, key, value)?;
            out.push('\n');
            Ok(())
        })?;
        Ok(out)
    }

    /// Checks every invariant against RocksDB: heads, dense seqs, rings (each the tail of its
    /// channel, all within the budget), users, meta. Scans everything; for tests and health
    /// checks.
    ///
    /// # Errors
    /// [`Error::Corrupt`] naming the first broken invariant; [`Error::Rocks`].
    pub fn check_consistency(&self) -> Result<(), Error> {
        let writer = self.writer.lock();
        let view = self.view.read();
        // Heads, users and meta only: rings depend on what was read and evicted, so they are
        // compared with RocksDB's tails by `check_rings` instead.
        let fresh = load_view(view.store.clone(), self.config.ring_len, 0)?;
        let broken = |reason: String| Error::Corrupt {
            what: "chat state",
            reason,
        };
        let heads = |channels: &HashMap<String, ChannelView>| -> HashMap<String, u64> {
            channels.iter().map(|(n, c)| (n.clone(), c.head)).collect()
        };
        if heads(&fresh.channels) != heads(&view.channels) {
            return Err(broken("in-memory channels differ from rocksdb".into()));
        }
        let floors = |channels: &HashMap<String, ChannelView>| -> HashMap<String, u64> {
            channels.iter().map(|(n, c)| (n.clone(), c.floor)).collect()
        };
        if floors(&fresh.channels) != floors(&view.channels)
            || (&fresh.retention, fresh.default_retention, fresh.clock)
                != (&view.retention, view.default_retention, view.clock)
            || fresh.topics != view.topics
        {
            return Err(broken("in-memory retention differs from rocksdb".into()));
        }
        if (&fresh.records, &fresh.owned, &fresh.names) != (&view.records, &view.owned, &view.names)
        {
            return Err(broken(
                "in-memory channel records differ from rocksdb".into(),
            ));
        }
        check_rings(&view, self.config.ring_len, self.config.ring_bytes_max)?;
        if fresh.users != view.users {
            return Err(broken("in-memory users differ from rocksdb".into()));
        }
        if fresh.join_secret != view.join_secret {
            return Err(broken("in-memory join secret differs from rocksdb".into()));
        }
        if (&fresh.last_applied, &fresh.membership, fresh.applied_index)
            != (&view.last_applied, &view.membership, view.applied_index)
        {
            return Err(broken("in-memory meta differs from rocksdb".into()));
        }
        // The other end of `ClientSeqs`'s invariant: it must never claim a client seq is new
        // while a record for it, or for a higher one, exists.
        let stored = load_client_seqs(&view.store)?;
        for (client, &max) in &stored.max {
            if writer.client_seqs.is_new(*client, max) {
                return Err(broken(format!(
                    "client seq high-water mark below stored record {}/{max}",
                    hex(&client.0)
                )));
            }
        }
        check_dense(view.store.db(), &view.channels)
    }
}

fn duplicate(channel: &str, seq: u64, at_ms: u64) -> Sent {
    Sent {
        channel: channel.to_owned(),
        seq: ChannelSeq(seq),
        at_ms,
        duplicate: true,
    }
}

fn rocks(op: &'static str) -> impl Fn(rocksdb::Error) -> Error {
    move |source| Error::Rocks { op, source }
}

/// How many messages of `channel` from `floor` up (at most to `head`) in a row have an
/// `at_ms` below `cutoff`, looking at no more than `scan_left` of them (and counting those
/// looked at against it).
fn count_older(
    db: &DB,
    channel: &str,
    floor: u64,
    head: u64,
    cutoff: u64,
    scan_left: &mut u64,
) -> Result<u64, Error> {
    let mut start = Vec::new();
    format::message_key(&mut start, channel, floor);
    let mut opts = ReadOptions::default();
    opts.set_iterate_upper_bound(format::message_key_end(channel));
    let mut it = db.raw_iterator_opt(opts);
    it.seek(&start);
    let mut older = 0;
    while floor + older <= head && *scan_left > 0 {
        let Some((key, value)) = it.item() else { break };
        let (_, seq) = parse_message_key(key)?;
        if seq != floor + older {
            return Err(Error::Corrupt {
                what: "channel",
                reason: format!("{channel}: message {} missing above floor", floor + older),
            });
        }
        *scan_left -= 1;
        if decode_message_value(value)?.at_ms >= cutoff {
            break;
        }
        older += 1;
        it.next();
    }
    it.status().map_err(rocks("iterate"))?;
    Ok(older)
}

/// Collects into `expiry` the dedup records stamped before `cutoff`, oldest first, at most
/// [`EXPIRE_DEDUP_MAX`], and the dedup floors they raise.
fn expire_dedup(store: &Store, cutoff: u64, expiry: &mut Expiry) -> Result<(), Error> {
    let db = store.db();
    let mut upper = vec![PREFIX_EXPIRY];
    upper.extend_from_slice(&cutoff.to_be_bytes());
    let mut opts = ReadOptions::default();
    opts.set_iterate_upper_bound(upper);
    let mut it = db.raw_iterator_opt(opts);
    it.seek([PREFIX_EXPIRY]);
    while let Some(key) = it.key() {
        if expiry.dedup.len() as u64 == EXPIRE_DEDUP_MAX {
            break;
        }
        let (_, id, client_seq) = parse_expiry_key(key)?;
        let mut dedup = Vec::with_capacity(25);
        format::dedup_key(&mut dedup, &id, client_seq);
        expiry.dedup.push((key.to_vec(), dedup));
        let floor = expiry.dedup_floors.entry(DedupId(id)).or_insert(0);
        *floor = (*floor).max(client_seq);
        it.next();
    }
    it.status().map_err(rocks("iterate"))?;
    for (client, floor) in &mut expiry.dedup_floors {
        *floor = (*floor).max(dedup_floor(store, *client).unwrap_or(0));
    }
    Ok(())
}

/// The highest client seq of `client` whose dedup record expired, if one did.
///
/// # Panics
/// When RocksDB fails or the record is corrupt: only called inside `apply`.
fn dedup_floor(store: &Store, client: DedupId) -> Option<u64> {
    let mut key = Vec::with_capacity(17);
    format::dedup_floor_key(&mut key, &client.0);
    let value = store
        .db()
        .get_pinned(&key)
        .unwrap_or_else(|e| panic!("rocksdb get failed in apply: {e}"));
    value.map(|v| {
        decode_u64_value(&v, "dedup floor")
            .unwrap_or_else(|e| panic!("corrupt dedup floor in apply: {e}"))
    })
}

/// The checks of a relation that need no stored state.
fn relation_shape(relation: &Relation) -> Result<(), RejectReason> {
    match relation {
        Relation::React { emoji, .. } if !valid_emoji(emoji) => Err(RejectReason::InvalidReaction),
        _ => Ok(()),
    }
}

/// Puts `entry` in place of message `seq` in `channel`'s ring, if the ring holds it, keeping
/// the byte counts current.
fn replace_in_ring(view: &mut View, channel: &str, seq: u64, entry: RingEntry) {
    let Some(c) = view.channels.get_mut(channel) else {
        return;
    };
    if c.ring.is_empty() || seq < c.ring_first() {
        return;
    }
    let before = c.ring_bytes();
    let at = (seq - c.ring_first()) as usize;
    let slot = &mut c.ring[at];
    c.heap_bytes = c.heap_bytes - slot.heap_bytes() + entry.heap_bytes();
    *slot = entry;
    view.ring_bytes = view.ring_bytes - before + c.ring_bytes();
}

/// Moves `channel`'s head to `head` and appends the newest `ring_len` of `new` (the messages
/// of the batch) to its ring, which keeps its newest `ring_len`. Keeps `view.ring_bytes` and
/// the channel's recency stamp current; [`evict_rings`] restores the budget afterwards.
fn publish_channel(
    view: &mut View,
    channel: &str,
    head: u64,
    mut new: Vec<RingEntry>,
    ring_len: usize,
) {
    if new.len() > ring_len {
        new.drain(..new.len() - ring_len);
    }
    if !view.channels.contains_key(channel) {
        // No preallocated buffer: most channels hold a few messages, and the buffer counts
        // against the budget.
        view.channels
            .insert(channel.to_owned(), ChannelView::new(0));
    }
    let tick = view.next_tick();
    let c = view.channels.get_mut(channel).expect("inserted above");
    assert!(
        head > c.head,
        "channel head must grow when messages are added"
    );
    let before = c.ring_bytes();
    // Drop first, then append, so the buffer never grows past `ring_len` entries.
    let excess = (c.ring.len() + new.len()).saturating_sub(ring_len);
    for old in c.ring.drain(..excess) {
        c.heap_bytes -= old.heap_bytes();
    }
    c.heap_bytes += new.iter().map(RingEntry::heap_bytes).sum::<usize>();
    c.head = head;
    c.ring.extend(new);
    *c.last_used.get_mut() = tick;
    view.ring_bytes = view.ring_bytes - before + c.ring_bytes();
    debug_assert!(c.ring.len() as u64 <= c.head.min(ring_len as u64));
}

/// The ring bytes eviction brings the total down to: 90 % of the budget, so that one round
/// frees room for many applies instead of one.
fn ring_bytes_target(ring_bytes_max: usize) -> usize {
    ring_bytes_max - ring_bytes_max / 10
}

/// When the rings together cost more than `ring_bytes_max`, drops whole rings, least recently
/// used first, until they cost at most [`ring_bytes_target`]. Those channels are then read
/// from RocksDB until applies refill their rings.
///
/// A round sorts the stamps of every channel holding a ring, O(n log n), under the write
/// lock; it frees a tenth of the budget, so it runs at most once per tenth of the budget
/// appended to rings.
fn evict_rings(view: &mut View, ring_bytes_max: usize) {
    if view.ring_bytes <= ring_bytes_max {
        return;
    }
    let mut by_age: Vec<(u64, usize)> = view
        .channels
        .values()
        .filter(|c| c.ring_bytes() > 0)
        .map(|c| (c.last_used.load(Ordering::Relaxed), c.ring_bytes()))
        .collect();
    by_age.sort_unstable();
    // Stamps are unique among rings (each apply or read takes a fresh one), so evicting every
    // ring stamped at or below `cutoff` evicts exactly the oldest ones counted here.
    let (mut left, mut cutoff, mut count) = (view.ring_bytes, 0, 0usize);
    for (tick, bytes) in by_age {
        if left <= ring_bytes_target(ring_bytes_max) {
            break;
        }
        (left, cutoff, count) = (left - bytes, tick, count + 1);
    }
    for c in view.channels.values_mut() {
        if c.ring_bytes() > 0 && *c.last_used.get_mut() <= cutoff {
            view.ring_bytes -= c.ring_bytes();
            c.evict_ring();
        }
    }
    assert!(
        view.ring_bytes <= ring_bytes_max,
        "ring eviction left {} bytes over a budget of {ring_bytes_max}",
        view.ring_bytes
    );
    debug!(
        channels = count,
        ring_bytes = view.ring_bytes,
        "evicted channel rings over the memory budget"
    );
}

/// Reads seqs `from..=last` of `channel` (with `floor <= from <= last <= head`).
fn read_range(
    view: RwLockReadGuard<'_, View>,
    channel: &str,
    from: u64,
    last: u64,
) -> Result<Vec<Message>, Error> {
    let c = view
        .channels
        .get(channel)
        .expect("caller found the channel");
    c.last_used.store(view.next_tick(), Ordering::Relaxed);
    let ring_first = c.ring_first();
    if from >= ring_first {
        let start = (from - ring_first) as usize;
        let end = (last - ring_first) as usize;
        return Ok(c
            .ring
            .range(start..=end)
            .zip(from..)
            .map(|(entry, seq)| entry.to_message(channel, seq))
            .collect());
    }
    // Messages at or below a published head are in RocksDB, so the read can go on without
    // the lock: a relation applied meanwhile changes a message in one atomic write, and the
    // iterator sees it whole or not at all. The Arc keeps the store open across an install.
    let store = view.store.clone();
    drop(view);
    read_db_range(store.db(), channel, from, last)
}

fn read_db_range(db: &DB, channel: &str, from: u64, last: u64) -> Result<Vec<Message>, Error> {
    let mut start = Vec::new();
    format::message_key(&mut start, channel, from);
    let mut opts = ReadOptions::default();
    opts.set_iterate_upper_bound(format::message_key_end(channel));
    let mut it = db.raw_iterator_opt(opts);
    it.seek(&start);
    let mut out = Vec::with_capacity((last - from + 1) as usize);
    let mut expected = from;
    while expected <= last {
        let Some((key, value)) = it.item() else { break };
        let (_, seq) = parse_message_key(key)?;
        if seq != expected {
            break;
        }
        out.push(decode_message(channel, seq, value)?);
        expected += 1;
        it.next();
    }
    it.status().map_err(rocks("iterate"))?;
    if expected <= last {
        return Err(Error::Corrupt {
            what: "channel",
            reason: format!("{channel}: message {expected} missing below head"),
        });
    }
    Ok(out)
}

fn decode_message(channel: &str, seq: u64, value: &[u8]) -> Result<Message, Error> {
    let v = decode_message_value(value)?;
    Ok(Message {
        channel: channel.to_owned(),
        seq: ChannelSeq(seq),
        sender: v.sender.to_owned(),
        body: v.body.to_vec(),
        at_ms: v.at_ms,
        client_id: ClientId(v.client_id),
        client_seq: v.client_seq,
        meta: v.meta.into_owned(),
        edit: None,
    })
}

/// Builds the in-memory view from RocksDB: heads, rings (within `ring_bytes_max`; none when
/// it is 0), users, meta.
fn load_view(store: Arc<Store>, ring_len: usize, ring_bytes_max: usize) -> Result<View, Error> {
    let db = store.db();
    let mut channels = HashMap::new();
    for (key, value) in scan_prefix(db, PREFIX_HEAD)? {
        let channel = std::str::from_utf8(&key[1..])
            .ok()
            .filter(|c| crate::command::is_valid_channel(c))
            .ok_or_else(|| Error::Corrupt {
                what: "head",
                reason: format!("bad channel in key {}", hex(&key)),
            })?;
        let head = decode_u64_value(&value, "head")?;
        channels.insert(channel.to_owned(), ChannelView::new(head));
    }
    let mut records = HashMap::new();
    let mut owned: HashMap<String, usize> = HashMap::new();
    for (key, value) in scan_prefix(db, PREFIX_CHANNEL)? {
        let channel = std::str::from_utf8(&key[1..])
            .ok()
            .filter(|c| is_valid_channel(c))
            .ok_or_else(|| Error::Corrupt {
                what: "channel",
                reason: format!("bad channel in key {}", hex(&key)),
            })?;
        let record = decode_channel_value(&value)?;
        if let Some(owner) = &record.owner {
            *owned.entry(owner.clone()).or_default() += 1;
        }
        records.insert(channel.to_owned(), record);
    }
    for (key, value) in scan_prefix(db, PREFIX_FLOOR)? {
        let c = std::str::from_utf8(&key[1..])
            .ok()
            .and_then(|name| channels.get_mut(name))
            .ok_or_else(|| Error::Corrupt {
                what: "floor",
                reason: format!("floor of a channel without a head: {}", hex(&key)),
            })?;
        c.floor = decode_u64_value(&value, "floor")?;
        if c.floor == 0 || c.floor > c.head + 1 {
            return Err(Error::Corrupt {
                what: "floor",
                reason: format!("floor {} with head {} in {}", c.floor, c.head, hex(&key)),
            });
        }
    }
    let mut retention = HashMap::new();
    for (key, value) in scan_prefix(db, PREFIX_RETENTION)? {
        let channel = std::str::from_utf8(&key[1..])
            .ok()
            .filter(|c| is_valid_channel(c))
            .ok_or_else(|| Error::Corrupt {
                what: "retention",
                reason: format!("bad channel in key {}", hex(&key)),
            })?;
        retention.insert(channel.to_owned(), decode_retention_value(&value)?);
    }
    let mut topics = HashMap::new();
    for (key, value) in scan_prefix(db, PREFIX_TOPIC)? {
        let channel = std::str::from_utf8(&key[1..])
            .ok()
            .filter(|c| is_valid_channel(c));
        let topic = std::str::from_utf8(decode_bytes_value(&value, "topic")?).ok();
        let (Some(channel), Some(topic)) = (channel, topic) else {
            return Err(Error::Corrupt {
                what: "topic",
                reason: format!("bad topic under key {}", hex(&key)),
            });
        };
        topics.insert(channel.to_owned(), topic.to_owned());
    }
    let names = channels.keys().chain(records.keys()).cloned().collect();
    let (ring_bytes, tick) = load_rings(db, &mut channels, ring_len, ring_bytes_max)?;
    let mut users = HashMap::new();
    for (key, value) in scan_prefix(db, PREFIX_USER)? {
        let name = String::from_utf8(key[1..].to_vec()).map_err(|_| Error::Corrupt {
            what: "user",
            reason: format!("bad name in key {}", hex(&key)),
        })?;
        users.insert(name, decode_user_value(&value)?);
    }
    let get = |key: &[u8]| db.get(key).map_err(rocks("get"));
    let last_applied = match get(META_LAST_APPLIED)? {
        Some(v) => Some(decode_bytes_value(&v, "last_applied")?.to_vec()),
        None => None,
    };
    let membership = match get(META_MEMBERSHIP)? {
        Some(v) => Some(decode_bytes_value(&v, "membership")?.to_vec()),
        None => None,
    };
    let applied_index = match get(META_APPLIED_INDEX)? {
        Some(v) => Some(LogIndex(decode_u64_value(&v, "applied_index")?)),
        None => None,
    };
    let join_secret = match get(META_JOIN_SECRET)? {
        Some(v) => Some(decode_bytes_value(&v, "join_secret")?.to_vec()),
        None => None,
    };
    let default_retention = match get(META_RETENTION_DEFAULT)? {
        Some(v) => decode_retention_value(&v)?,
        None => Retention::FOREVER,
    };
    let clock = match get(META_CLOCK)? {
        Some(v) => decode_u64_value(&v, "clock")?,
        None => 0,
    };
    let mut view = View {
        store,
        channels,
        records,
        owned,
        names,
        users,
        join_secret,
        last_applied,
        membership,
        applied_index,
        retention,
        topics,
        default_retention,
        clock,
        ring_bytes,
        tick: AtomicU64::new(tick),
    };
    // Normally a no-op: a buffer with more capacity than asked for could pass the target.
    evict_rings(&mut view, ring_bytes_max);
    Ok(view)
}

/// Fills the empty rings of `channels` from RocksDB, the channels whose newest message is
/// newest first, up to [`ring_bytes_target`] of `ring_bytes_max`: the channel where that
/// fills up gets the newest messages that fit, older channels none (their reads go to
/// RocksDB until applies refill them). Returns the bytes used and the highest recency stamp
/// given; newer channels get higher stamps, so they are evicted last.
fn load_rings(
    db: &DB,
    channels: &mut HashMap<String, ChannelView>,
    ring_len: usize,
    ring_bytes_max: usize,
) -> Result<(usize, u64), Error> {
    if ring_bytes_max == 0 {
        return Ok((0, 0));
    }
    let mut by_age = Vec::with_capacity(channels.len());
    let mut key = Vec::new();
    for (name, c) in channels.iter().filter(|(_, c)| c.floor <= c.head) {
        format::message_key(&mut key, name, c.head);
        let value = db.get(&key).map_err(rocks("get"))?;
        let value = value.ok_or_else(|| Error::Corrupt {
            what: "channel",
            reason: format!("{name}: message {} missing at head", c.head),
        })?;
        by_age.push((decode_message_value(&value)?.at_ms, name.clone()));
    }
    // Newest first; equal times in name order, so a restart loads the same rings.
    by_age.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let (mut room, mut used) = (ring_bytes_target(ring_bytes_max), 0);
    let mut loaded = 0u64;
    for (_, name) in &by_age {
        let c = channels.get_mut(name).expect("listed above");
        let from = c.head.saturating_sub(ring_len as u64 - 1).max(c.floor);
        let mut entries: Vec<RingEntry> = read_db_range(db, name, from, c.head)?
            .into_iter()
            .map(RingEntry::from_message)
            .collect();
        let all = entries.len();
        let kept = newest_that_fit(&entries, room);
        if kept == 0 {
            break;
        }
        let mut ring = VecDeque::with_capacity(kept);
        ring.extend(entries.drain(all - kept..));
        c.heap_bytes = ring.iter().map(RingEntry::heap_bytes).sum();
        c.ring = ring;
        room = room.saturating_sub(c.ring_bytes());
        used += c.ring_bytes();
        loaded += 1;
        if kept < all {
            break;
        }
    }
    // The newest channel gets the highest stamp.
    for (stamp, (_, name)) in (1..=loaded).rev().zip(&by_age) {
        channels[name.as_str()]
            .last_used
            .store(stamp, Ordering::Relaxed);
    }
    Ok((used, loaded))
}

/// How many of the newest `entries` fit in `room` bytes as a ring of their own.
fn newest_that_fit(entries: &[RingEntry], room: usize) -> usize {
    let mut cost = 0;
    entries
        .iter()
        .rev()
        .take_while(|e| {
            cost += std::mem::size_of::<RingEntry>() + e.heap_bytes();
            cost <= room
        })
        .count()
}

/// Every pair whose key starts with `prefix`. Only for the small tables (heads, users).
fn scan_prefix(db: &DB, prefix: u8) -> Result<Vec<KeyValue>, Error> {
    let mut opts = ReadOptions::default();
    opts.set_iterate_upper_bound(vec![prefix + 1]);
    let mut it = db.raw_iterator_opt(opts);
    it.seek([prefix]);
    let mut out = Vec::new();
    while let Some((key, value)) = it.item() {
        out.push((key.to_vec(), value.to_vec()));
        it.next();
    }
    it.status().map_err(rocks("iterate"))?;
    Ok(out)
}

/// Checks the rings of [`ChannelView`]'s invariants: each is at most `min(head, ring_len)`
/// long and equals the newest messages of its channel in RocksDB, its byte count is right,
/// and all of them together fit in `ring_bytes_max`.
fn check_rings(view: &View, ring_len: usize, ring_bytes_max: usize) -> Result<(), Error> {
    let broken = |reason: String| Error::Corrupt {
        what: "ring",
        reason,
    };
    let mut total = 0;
    for (name, c) in &view.channels {
        if c.ring.len() as u64 > (c.head + 1 - c.floor).min(ring_len as u64) {
            return Err(broken(format!("{name}: {} entries", c.ring.len())));
        }
        if c.heap_bytes != c.ring.iter().map(RingEntry::heap_bytes).sum::<usize>() {
            return Err(broken(format!("{name}: byte count wrong")));
        }
        total += c.ring_bytes();
        if c.ring.is_empty() {
            continue;
        }
        let stored: Vec<RingEntry> = read_db_range(view.store.db(), name, c.ring_first(), c.head)?
            .into_iter()
            .map(RingEntry::from_message)
            .collect();
        if !c.ring.iter().eq(&stored) {
            return Err(broken(format!("{name}: differs from the tail in rocksdb")));
        }
    }
    if total != view.ring_bytes || total > ring_bytes_max {
        return Err(broken(format!(
            "rings hold {total} bytes, counted {}, budget {ring_bytes_max}",
            view.ring_bytes
        )));
    }
    Ok(())
}

/// Checks that the stored messages are exactly seqs `floor..=head` of each known channel.
fn check_dense(db: &DB, channels: &HashMap<String, ChannelView>) -> Result<(), Error> {
    // Per channel with messages: (lowest seq, highest seq), checked dense on the way.
    let mut ranges: HashMap<String, (u64, u64)> = HashMap::new();
    let mut opts = ReadOptions::default();
    opts.set_iterate_upper_bound(vec![PREFIX_MESSAGE + 1]);
    let mut it = db.raw_iterator_opt(opts);
    it.seek([PREFIX_MESSAGE]);
    while let Some((key, _)) = it.item() {
        let (channel, seq) = parse_message_key(key)?;
        let range = ranges.entry(channel.to_owned()).or_insert((seq, seq - 1));
        if seq != range.1 + 1 {
            return Err(Error::Corrupt {
                what: "channel",
                reason: format!("{channel}: found seq {seq} where {} belongs", range.1 + 1),
            });
        }
        range.1 = seq;
        it.next();
    }
    it.status().map_err(rocks("iterate"))?;
    let heads: HashMap<String, (u64, u64)> = channels
        .iter()
        .filter(|(_, c)| c.floor <= c.head)
        .map(|(n, c)| (n.clone(), (c.floor, c.head)))
        .collect();
    if ranges != heads {
        return Err(Error::Corrupt {
            what: "channel",
            reason: "message counts differ from heads".into(),
        });
    }
    Ok(())
}

/// Loads every pair of the snapshot at `path` into `db` and syncs the WAL.
fn load_snapshot(store: &Store, path: &Path) -> Result<SnapshotInfo, Error> {
    let (db, dedup_cf) = (store.db(), store.dedup_cf());
    let mut wb = WriteBatch::default();
    let mut opts = WriteOptions::default();
    // No fsync per batch: one WAL sync below covers them all, before the pointer rename.
    opts.set_sync(false);
    let info = snapshot::read_snapshot(path, |key, value| {
        if key.first() == Some(&PREFIX_DEDUP) {
            wb.put_cf(dedup_cf, key, value);
        } else {
            wb.put(key, value);
        }
        if wb.len() >= INSTALL_BATCH_RECORDS {
            db.write_opt(std::mem::take(&mut wb), &opts)
                .map_err(rocks("write"))?;
        }
        Ok(())
    })?;
    db.write_opt(wb, &opts).map_err(rocks("write"))?;
    // Crash before this returns: the pointer still names the old directory.
    db.flush_wal(true).map_err(rocks("flush_wal"))?;
    Ok(info)
}

/// `user`'s read marker in `channel` as stored; 0 when none.
fn read_mark(store: &Store, user: &str, channel: &str) -> Result<u64, Error> {
    let mut key = Vec::new();
    format::read_mark_key(&mut key, user, channel);
    match store.db().get_pinned(&key).map_err(rocks("get"))? {
        Some(value) => decode_u64_value(&value, "read marker"),
        None => Ok(0),
    }
}

/// Sets `read_to` of every listing in `page` (in name order) from `user`'s stored markers:
/// one pass over the user's marker range from the page's first name to its last.
fn fill_read_marks(store: &Store, user: &str, page: &mut [ChannelListing]) -> Result<(), Error> {
    let (Some(first), Some(last)) = (page.first(), page.last()) else {
        return Ok(());
    };
    let mut start = Vec::new();
    format::read_mark_key(&mut start, user, &first.name);
    let mut end = Vec::new();
    format::read_mark_key(&mut end, user, &last.name);
    end.push(0);
    let mut opts = store::total_order();
    opts.set_iterate_upper_bound(end);
    let mut it = store.db().raw_iterator_opt(opts);
    it.seek(&start);
    let mut listings = page.iter_mut().peekable();
    while let (Some(key), Some(value)) = (it.key(), it.value()) {
        let (_, channel) = parse_read_mark_key(key)?;
        while listings.next_if(|l| l.name.as_str() < channel).is_some() {}
        if let Some(listing) = listings.next_if(|l| l.name == channel) {
            listing.read_to = ChannelSeq(decode_u64_value(value, "read marker")?);
        }
        it.next();
    }
    it.status().map_err(rocks("iterate"))
}

fn dump_pair(out: &mut String, key: &[u8], value: &[u8]) -> Result<(), Error> {
    let name = || String::from_utf8_lossy(&key[1..]).into_owned();
    let line = match key[0] {
        // A secret is never printed; its checksum still tells two replicas apart.
        _ if key == META_JOIN_SECRET => format!(
            "meta join_secret crc={:08x}",
            crc32fast::hash(decode_bytes_value(value, "join_secret")?)
        ),
        PREFIX_META => format!(
            "meta {} {}",
            name(),
            hex(decode_bytes_value(value, "meta")?)
        ),
        PREFIX_DEDUP if key.len() == 25 => {
            let (seq, at_ms, channel) = decode_dedup_value(value)?;
            let client_seq = u64::from_be_bytes(key[17..25].try_into().expect("8 bytes"));
            let client = hex(&key[1..17]);
            format!("dedup {client}/{client_seq} -> {channel}/{seq} at={at_ms}")
        }
        PREFIX_HEAD => format!("head {} {}", name(), decode_u64_value(value, "head")?),
        PREFIX_MESSAGE => {
            let (channel, seq) = parse_message_key(key)?;
            let v = decode_message_value(value)?;
            let meta = if v.meta.is_plain() {
                String::new()
            } else {
                format!(" meta={:?}", v.meta)
            };
            format!(
                "msg {channel}/{seq} sender={} at={} client={}/{} body={}{meta}",
                v.sender,
                v.at_ms,
                hex(&v.client_id),
                v.client_seq,
                hex(v.body)
            )
        }
        PREFIX_USER => format!("user {} {}", name(), hex(&decode_user_value(value)?)),
        PREFIX_EXPIRY => {
            let (at_ms, id, client_seq) = parse_expiry_key(key)?;
            format!("expiry at={at_ms} {}/{client_seq}", hex(&id))
        }
        PREFIX_DEDUP_FLOOR => format!(
            "dedup-floor {} {}",
            hex(&key[1..]),
            decode_u64_value(value, "dedup floor")?
        ),
        PREFIX_FLOOR => format!("floor {} {}", name(), decode_u64_value(value, "floor")?),
        PREFIX_RETENTION => format!("retention {} {:?}", name(), decode_retention_value(value)?),
        PREFIX_TOPIC => format!(
            "topic {} {:?}",
            name(),
            String::from_utf8_lossy(decode_bytes_value(value, "topic")?)
        ),
        PREFIX_READ_MARK => {
            let (user, channel) = parse_read_mark_key(key)?;
            let seq = decode_u64_value(value, "read marker")?;
            format!("read-mark {user} {channel} {seq}")
        }
        PREFIX_CHANNEL => {
            let r = decode_channel_value(value)?;
            let list = |set: &BTreeSet<String>| set.iter().cloned().collect::<Vec<_>>().join(",");
            format!(
                "channel {} owner={} private={} members={} invited={} crypto={}",
                name(),
                r.owner.as_deref().unwrap_or("-"),
                r.private,
                list(&r.members),
                list(&r.invited),
                r.crypto.as_deref().map_or_else(|| "-".to_owned(), hex)
            )
        }
        _ => format!("unknown {} {}", hex(key), hex(value)),
    };
    out.push_str(&line);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Over the budget, the rings of the channels least recently applied to or read go
    /// first, down to 90 % of the budget; the channel just written keeps its ring.
    #[test]
    fn eviction_drops_the_least_recently_used_rings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::new(dir.path());
        config.ring_bytes_max = RING_BYTES_MAX_MIN;
        let state = ChatState::open(config).expect("open");
        let body = vec![1u8; 15_000];
        let send_to = |index: u64, channel: &str| {
            let command = Command::Send(SendCmd {
                channel: channel.into(),
                sender: "Alice".into(),
                body: body.clone(),
                client_id: ClientId([1; 16]),
                client_seq: index,
                at_ms: index,
            });
            let entry = ApplyEntry {
                index: LogIndex(index),
                payload: ApplyPayload::Command(&command),
            };
            let meta = RaftMeta {
                last_applied: index.to_be_bytes().to_vec(),
                membership: None,
            };
            state.apply(&[entry], meta);
        };
        let has_ring = |channel: &str| !state.view.read().channels[channel].ring.is_empty();
        for (index, channel) in (1..).zip(["a", "b", "c", "d"]) {
            send_to(index, channel);
        }
        assert!(["a", "b", "c", "d"].iter().all(|c| has_ring(c)));
        state.history("a", ChannelSeq(1), 1).expect("read");
        // Five rings of 15 kB pass the 64 KiB budget; b and c are the least recently used, and
        // four would still be over 90 % of it.
        send_to(5, "e");
        assert_eq!(
            ["a", "b", "c", "d", "e"].map(has_ring),
            [true, false, false, true, true]
        );
        assert!(state.ring_bytes() <= ring_bytes_target(RING_BYTES_MAX_MIN));
        // An evicted ring refills from the next apply on; older messages come from RocksDB.
        send_to(6, "b");
        assert_eq!(state.view.read().channels["b"].ring.len(), 1);
        let seqs: Vec<u64> = (state.history("b", ChannelSeq(1), 10).expect("read"))
            .iter()
            .map(|m| m.seq.0)
            .collect();
        assert_eq!(seqs, vec![1, 2]);
        state.check_consistency().expect("consistent");
    }

    /// The highest client seq of every client, by a forward scan of every dedup record.
    fn max_seqs_by_scan(store: &Store) -> HashMap<DedupId, u64> {
        let mut max = HashMap::new();
        let mut it = store
            .db()
            .raw_iterator_cf_opt(store.dedup_cf(), store::total_order());
        it.seek_to_first();
        while let Some(key) = it.key() {
            let client = DedupId(key[1..17].try_into().expect("16 bytes"));
            let seq = u64::from_be_bytes(key[17..25].try_into().expect("8 bytes"));
            let entry = max.entry(client).or_insert(0);
            *entry = seq.max(*entry);
            it.next();
        }
        it.status().expect("iterate");
        max
    }

    /// `load_client_seqs` seeks backwards, and the dedup family's hash-skiplist memtable
    /// does not implement `SeekForPrev` itself (RocksDB's memtable iterator builds it from
    /// `Seek` and `Prev` on a total-order copy of the buckets). Records still in the memtable
    /// (after a snapshot install, or in `check_consistency` while running) are checked here
    /// as well as flushed ones.
    #[test]
    fn client_seqs_are_found_in_the_memtable_and_in_table_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = ChatState::open(Config::new(dir.path())).expect("open");
        let mut index = 0;
        let mut apply_round = |state: &ChatState, round: u64| {
            // 40 clients, interleaved, each with a few rising seqs per call; client c's
            // seqs stop at a different height so the maxima differ.
            let sends: Vec<SendCmd> = (0..40u8)
                .flat_map(|c| (0..3u64).map(move |k| (c, round * 3 + k + 1)))
                .filter(|&(c, seq)| seq <= 10 + u64::from(c))
                .map(|(c, seq)| SendCmd {
                    channel: format!("c{}", c % 4),
                    sender: "Alice".into(),
                    body: vec![b'x'; 10],
                    client_id: ClientId([c; 16]),
                    client_seq: seq,
                    at_ms: 1,
                })
                .collect();
            if sends.is_empty() {
                return;
            }
            index += 1;
            let command = Command::SendBatch(sends);
            let entry = ApplyEntry {
                index: LogIndex(index),
                payload: ApplyPayload::Command(&command),
            };
            let meta = RaftMeta {
                last_applied: index.to_be_bytes().to_vec(),
                membership: None,
            };
            state.apply(&[entry], meta);
        };
        for round in 0..8 {
            apply_round(&state, round);
        }
        // Part of the records in table files, the rest in the memtable.
        let store = state.view.read().store.clone();
        store.db().flush_cf(store.dedup_cf()).expect("flush");
        for round in 8..20 {
            apply_round(&state, round);
        }
        let expected = max_seqs_by_scan(&store);
        assert_eq!(expected.len(), 40);
        assert_eq!(expected[&DedupId::of("Alice", &ClientId([39; 16]))], 49);
        let loaded = load_client_seqs(&store).expect("load");
        assert!(loaded.complete);
        assert_eq!(loaded.max, expected);
    }
}
