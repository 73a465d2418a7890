//! The chat-log checker: notes/jepsen.md §1.6 over a [`History`], in O(n log n).
//!
//! One pass over the history collects, per message, its send attempts and acknowledgement, and
//! per `(channel, seq)` the message observed there; per-operation and per-session checks (read
//! density, stream continuity, read-your-writes) run during that pass. Whole-history checks
//! (lost, duplicates, real-time order, divergence) run afterwards over those indexes.
//!
//! Conventions:
//! - An `info` operation is neither acknowledged nor failed; a send invoked without any
//!   completion counts as `info`. An unacknowledged send whose message is read is `recovered`.
//! - Message ids are unique across the whole history; a channel's seqs start at 1.
//! - Nemesis operations and unknown client functions are counted and otherwise ignored.
//! - Retention: a read may carry the answering node's `floor`, its channel's lowest kept seq.
//!   Seqs below a read's floor expired there, so that read may lack them anywhere (a gap, a
//!   late start, a stream jump) as long as it resumes at or below the floor; an acknowledged
//!   message below a node's floor may be missing from its final read (`stats.expired`), and
//!   one below the highest floor seen is not a lost write. Everything at or above a floor is
//!   held to the same rules as without retention.
//! - Edits and deletes are messages of their own (each with its own key, msg and seq), held
//!   to every rule a send is. A read shows an entry a delete erased as a marker with no msg:
//!   it stands for whatever message sits at that seq, so it is neither lost nor a lost write,
//!   but some delete of it (or of the message it edits) must possibly have applied.
//! - A read token orders reads after writes across processes: a read that passed token `t`
//!   shows the state at applied index `t` or later, so it must reflect every delete and edit
//!   acknowledged with a token at or below `t`. Final reads must reflect every one.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasherDefault, Hasher};

use serde::Serialize;
use serde_json::{json, Value};

use crate::history::{Call, Entry, History, Op, OpType, Process, RelKind};

/// Examples kept per anomaly type.
pub const EXAMPLES_MAX: usize = 8;

/// Every anomaly the checker reports. Any occurrence makes the history invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Anomaly {
    /// An ok send missing from one node's final read (counted per node).
    Lost,
    /// An ok send at or below the highest seq read in its channel, never read (kafka).
    LostWrite,
    /// One message, or one idempotency key, read at two seqs.
    Duplicate,
    /// Two different messages observed at one `(channel, seq)` (sends, reads, final reads).
    InconsistentOffsets,
    /// A message read whose every send attempt failed.
    AbortedRead,
    /// A message read that was never sent.
    Unexpected,
    /// Two ok sends with one idempotency key answered different seqs.
    DedupOffsetMismatch,
    /// Inside one read, seqs not strictly increasing.
    IntNonmonotonic,
    /// Inside one read, a gap between seqs (or the read starts after its `from`).
    IntSkip,
    /// An ok send completed before another send was invoked, yet got a seq at or above it.
    RealtimeOrder,
    /// A history read by a process missed that process's own earlier acknowledged send.
    Ryw,
    /// A stream batch started at or below the last seq that stream already delivered.
    NonmonotonicRead,
    /// A stream batch started above last + 1.
    ReadSkip,
    /// Final reads of two nodes disagree at a seq (different message, or missing on one).
    Divergence,
    /// An acknowledged delete's target (or one of its edits) shown with its body by a final
    /// read or a read whose token covers the delete; or an entry marked deleted whose body
    /// was still returned.
    ResurrectedDelete,
    /// An acknowledged edit's target shown undeleted with no edit or an older one by a final
    /// read or a read whose token covers the edit.
    LostEdit,
}

impl Anomaly {
    /// All anomaly types, in report order.
    pub const ALL: [Anomaly; 16] = [
        Anomaly::Lost,
        Anomaly::LostWrite,
        Anomaly::Duplicate,
        Anomaly::InconsistentOffsets,
        Anomaly::AbortedRead,
        Anomaly::Unexpected,
        Anomaly::DedupOffsetMismatch,
        Anomaly::IntNonmonotonic,
        Anomaly::IntSkip,
        Anomaly::RealtimeOrder,
        Anomaly::Ryw,
        Anomaly::NonmonotonicRead,
        Anomaly::ReadSkip,
        Anomaly::Divergence,
        Anomaly::ResurrectedDelete,
        Anomaly::LostEdit,
    ];

    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Anomaly::Lost => "lost",
            Anomaly::LostWrite => "lost-write",
            Anomaly::Duplicate => "duplicate",
            Anomaly::InconsistentOffsets => "inconsistent-offsets",
            Anomaly::AbortedRead => "aborted-read",
            Anomaly::Unexpected => "unexpected",
            Anomaly::DedupOffsetMismatch => "dedup-offset-mismatch",
            Anomaly::IntNonmonotonic => "int-nonmonotonic",
            Anomaly::IntSkip => "int-skip",
            Anomaly::RealtimeOrder => "realtime-order",
            Anomaly::Ryw => "ryw",
            Anomaly::NonmonotonicRead => "nonmonotonic-read",
            Anomaly::ReadSkip => "read-skip",
            Anomaly::Divergence => "divergence",
            Anomaly::ResurrectedDelete => "resurrected-delete",
            Anomaly::LostEdit => "lost-edit",
        }
    }
}

/// Count and first examples of one anomaly type.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AnomalySummary {
    /// How many times it occurred.
    pub count: u64,
    /// Up to [`EXAMPLES_MAX`] examples, each naming channel, seq, msg, process and op indexes.
    pub examples: Vec<Value>,
}

/// Operation counts of one `f`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FCounts {
    /// Invocations.
    pub invoke: u64,
    /// `ok` completions.
    pub ok: u64,
    /// `fail` completions.
    pub fail: u64,
    /// `info` completions.
    pub info: u64,
}

/// Numbers that describe the history without judging it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    /// Operations in the history.
    pub ops: u64,
    /// Counts per `f` (nemesis functions included).
    pub by_f: BTreeMap<String, FCounts>,
    /// Distinct messages with an ok send (edits and deletes not included).
    pub acknowledged_sends: u64,
    /// Distinct edits acknowledged.
    pub acknowledged_edits: u64,
    /// Distinct deletes acknowledged.
    pub acknowledged_deletes: u64,
    /// Distinct `(channel, seq)` that some read showed erased by a delete.
    pub erased_read: u64,
    /// Distinct messages seen by any read, stream batch or final read.
    pub msgs_read: u64,
    /// `(seq, msg)` pairs returned by reads, counting repeats.
    pub observations: u64,
    /// Messages never acknowledged (info or unfinished sends) that reads returned.
    pub recovered: u64,
    /// Ok final reads.
    pub final_reads: u64,
    /// Nodes with at least one ok final read.
    pub nodes: Vec<String>,
    /// `lost` occurrences per node.
    pub lost_by_node: BTreeMap<String, u64>,
    /// Acknowledged messages missing from a node's final read below that node's floor:
    /// expired by retention, not lost (counted per final read).
    pub expired: u64,
    /// Highest floor any read reported, over all channels.
    pub floor_max: u64,
}

/// The verdict on a history.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// True when no anomaly occurred.
    pub valid: bool,
    /// Every anomaly type by name, with count 0 when absent.
    pub anomalies: BTreeMap<String, AnomalySummary>,
    /// Descriptive numbers.
    pub stats: Stats,
    /// Checks that could not run, such as `lost` without any final read.
    pub warnings: Vec<String>,
}

impl Report {
    /// How many times `anomaly` occurred.
    pub fn count(&self, anomaly: Anomaly) -> u64 {
        self.anomalies.get(anomaly.name()).map_or(0, |s| s.count)
    }

    /// The anomaly types that occurred, in report order.
    pub fn found(&self) -> Vec<Anomaly> {
        Anomaly::ALL
            .into_iter()
            .filter(|a| self.count(*a) > 0)
            .collect()
    }
}

/// Checks `history` against every invariant of notes/jepsen.md §1.6.
pub fn check(history: &History) -> Report {
    let mut state = State::default();
    for op in history.ops() {
        state.count_op(op);
        let call = Call::parse(op).expect("History validated every op when it was built");
        match &call {
            Call::Send { .. } => state.on_send(op, &call),
            Call::Read {
                channel,
                msgs: Some(msgs),
                ..
            } if op.kind == OpType::Ok => state.on_read(op, &call, channel, msgs),
            Call::Read { .. } if op.kind == OpType::Invoke => {
                if let Process::Client(p) = op.process {
                    state.read_invoked.insert(p, op.time);
                }
            }
            Call::FinalRead {
                channel,
                floor,
                msgs: Some(msgs),
            } if op.kind == OpType::Ok => {
                state.on_final_read(op, channel, floor.unwrap_or(0), msgs);
            }
            Call::Resubscribe { channel, after } => {
                if let Process::Client(p) = op.process {
                    let ch = state.channels.id(channel);
                    state.stream_last.insert((p, ch), *after);
                }
            }
            _ => {}
        }
    }
    state.finish()
}

/// The checker's maps hash small integers and short ids millions of times; SipHash's DoS
/// resistance buys nothing for a local file, so they use the Fx hash (rustc's) instead.
type HashMap<K, V> = std::collections::HashMap<K, V, BuildHasherDefault<FxHasher>>;
type HashSet<K> = std::collections::HashSet<K, BuildHasherDefault<FxHasher>>;

/// The Fx hash: rotate, xor, multiply per word; rotate at the end.
#[derive(Default, Clone, Copy)]
struct FxHasher {
    hash: u64,
}

impl FxHasher {
    const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(Self::SEED);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        // A product's high bits depend on every input bit, its low bits only on low input bits;
        // hashbrown picks buckets by low bits, so bring the high bits down (as rustc-hash 2).
        self.hash.rotate_left(26)
    }
}

/// Strings to dense ids, so the per-observation maps hash integers.
#[derive(Default)]
struct Interner {
    ids: HashMap<String, u32>,
    names: Vec<String>,
}

impl Interner {
    fn id(&mut self, name: &str) -> u32 {
        if let Some(id) = self.ids.get(name) {
            return *id;
        }
        let id = u32::try_from(self.names.len()).expect("fewer than 2^32 distinct names");
        self.ids.insert(name.to_string(), id);
        self.names.push(name.to_string());
        id
    }

    fn name(&self, id: u32) -> &str {
        &self.names[id as usize]
    }
}

/// What the history says about one message id.
#[derive(Default, Clone)]
struct MsgInfo {
    channel: Option<u32>,
    key: Option<u32>,
    invokes: u32,
    oks: u32,
    fails: u32,
    infos: u32,
    /// Time and index of the first send invocation.
    invoked: Option<(u64, u64)>,
    /// Seq, time and index of the first ok send.
    ack: Option<(u64, u64, u64)>,
    /// Distinct `(channel, seq)` where reads returned it, with the first op index.
    read_at: Vec<(u32, u64, u64)>,
    /// For an edit or delete: what it does and the target's seq.
    relation: Option<(RelKind, u64)>,
}

impl MsgInfo {
    fn attempts(&self) -> u32 {
        self.invokes.max(self.oks + self.fails + self.infos)
    }

    /// Whether some attempt may have been applied (not every attempt definitely failed).
    fn may_have_applied(&self) -> bool {
        self.oks > 0 || self.attempts() > self.fails
    }
}

/// One entry of a read as the checker keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Slot {
    seq: u64,
    /// The message shown; `None` when a delete erased its body.
    msg: Option<u32>,
    /// The node marked it deleted.
    deleted: bool,
    /// The seq of its newest edit, as attached by the read.
    edit: Option<u64>,
}

/// What a read with a token showed of an edit's or delete's target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shown {
    /// The target itself, undeleted, with the seq of its newest edit if any.
    Alive { edit: Option<u64> },
    /// One of the target's edits, with its body.
    EditAlive,
    /// The target, or one of its edits, erased.
    Erased,
}

/// One observation of a target by a read that passed a token.
#[derive(Debug, Clone, Copy)]
struct Seen {
    token: u64,
    index: u64,
    seq: u64,
    shown: Shown,
}

/// An acknowledged edit or delete: its own seq, token, op index and msg.
#[derive(Debug, Clone, Copy)]
struct RelAck {
    seq: u64,
    token: Option<u64>,
    index: u64,
    msg: u32,
}

/// One process's acknowledged sends in one channel: seq to (msg, ack time, op index).
type OwnSends = BTreeMap<u64, (u32, u64, u64)>;

#[derive(Default)]
struct State {
    channels: Interner,
    msgs: Interner,
    keys: Interner,
    nodes: Interner,
    info: Vec<MsgInfo>,
    anomalies: BTreeMap<Anomaly, AnomalySummary>,
    stats: Stats,
    /// `(channel, seq)` to the first message observed there and its op index.
    at_seq: HashMap<(u32, u64), (u32, u64)>,
    /// `(channel, seq)` already reported as inconsistent.
    inconsistent: HashSet<(u32, u64)>,
    /// Key to the seq, channel, msg and index of its first ok send.
    key_ack: HashMap<u32, (u64, u32, u32, u64)>,
    /// Highest seq any read returned, per channel.
    read_max: HashMap<u32, u64>,
    /// Highest floor any read reported, per channel: every seq below it expired somewhere.
    floor_max: HashMap<u32, u64>,
    /// Per (process, channel): acked own sends by seq, with msg, ack time and index.
    own_sends: HashMap<(u64, u32), OwnSends>,
    /// Invoke time of each process's outstanding read.
    read_invoked: HashMap<u64, u64>,
    /// Per (process, channel): last seq the stream delivered (None: no constraint).
    stream_last: HashMap<(u64, u32), Option<u64>>,
    /// Per (channel, node): position in `final_reads` of the last ok final read.
    final_read: BTreeMap<(u32, u32), usize>,
    final_reads: Vec<FinalRead>,
    /// `(channel, seq)` of every message an edit or delete was invoked on.
    rel_targets: HashSet<(u32, u64)>,
    /// Per target: its first acknowledged delete; after the pass, also a delete known
    /// applied because a read returned it (without a token: only final reads are held to it).
    deletes_applied: HashMap<(u32, u64), RelAck>,
    /// Per target: its acknowledged edits; after the pass, also those a read returned.
    edits_applied: HashMap<(u32, u64), Vec<RelAck>>,
    /// Per target: what reads that passed a token showed of it.
    watched: HashMap<(u32, u64), Vec<Seen>>,
    /// `(channel, seq)` some read showed erased, with the `edit_of` it gave and the op index.
    erased: HashMap<(u32, u64), (Option<u64>, u64)>,
}

/// One ok final read: its op index, the node's floor, and what it returned.
struct FinalRead {
    index: u64,
    floor: u64,
    pairs: Vec<Slot>,
}

impl State {
    fn add(&mut self, anomaly: Anomaly, example: impl FnOnce(&State) -> Value) {
        let example = {
            let summary = self.anomalies.get(&anomaly);
            match summary {
                Some(s) if s.examples.len() >= EXAMPLES_MAX => None,
                _ => Some(example(self)),
            }
        };
        let summary = self.anomalies.entry(anomaly).or_default();
        summary.count += 1;
        summary.examples.extend(example);
    }

    /// A slot for an example: its msg, `"(deleted)"`, and the seq of its newest edit.
    fn shown(&self, slot: &Slot) -> Value {
        let msg = match (slot.msg, slot.deleted) {
            (Some(m), false) => json!(self.msgs.name(m)),
            (Some(m), true) => json!(format!("{} (deleted)", self.msgs.name(m))),
            (None, _) => json!("(deleted)"),
        };
        match slot.edit {
            Some(edit) => json!({"msg": msg, "edit": edit}),
            None => msg,
        }
    }

    fn count_op(&mut self, op: &Op) {
        self.stats.ops += 1;
        let counts = self.stats.by_f.entry(op.f.clone()).or_default();
        match op.kind {
            OpType::Invoke => counts.invoke += 1,
            OpType::Ok => counts.ok += 1,
            OpType::Fail => counts.fail += 1,
            OpType::Info => counts.info += 1,
        }
    }

    fn msg(&mut self, msg: &str) -> u32 {
        let id = self.msgs.id(msg);
        if id as usize == self.info.len() {
            self.info.push(MsgInfo::default());
        }
        id
    }

    fn on_send(&mut self, op: &Op, call: &Call<'_>) {
        let Call::Send {
            channel,
            key,
            msg,
            seq,
            relation,
            token,
        } = *call
        else {
            unreachable!("on_send is only called with Call::Send")
        };
        let ch = self.channels.id(channel);
        let key = self.keys.id(key);
        let m = self.msg(msg);
        let info = &mut self.info[m as usize];
        info.channel.get_or_insert(ch);
        info.key.get_or_insert(key);
        if let Some((kind, target)) = relation {
            info.relation.get_or_insert((kind, target));
            self.rel_targets.insert((ch, target));
            if op.kind == OpType::Ok {
                let ack = RelAck {
                    seq: seq.expect("validated: an ok edit or delete carries seq"),
                    token,
                    index: op.index,
                    msg: m,
                };
                record_applied(
                    &mut self.deletes_applied,
                    &mut self.edits_applied,
                    kind,
                    (ch, target),
                    ack,
                );
            }
        }
        let info = &mut self.info[m as usize];
        match op.kind {
            OpType::Invoke => {
                info.invokes += 1;
                info.invoked.get_or_insert((op.time, op.index));
            }
            OpType::Fail => info.fails += 1,
            OpType::Info => info.infos += 1,
            OpType::Ok => {
                info.oks += 1;
                let seq = seq.expect("validated: an ok send carries seq");
                info.ack.get_or_insert((seq, op.time, op.index));
                self.on_send_ok(op, ch, key, m, seq);
            }
        }
    }

    fn on_send_ok(&mut self, op: &Op, ch: u32, key: u32, m: u32, seq: u64) {
        self.observe(ch, seq, m, op.index);
        match self.key_ack.get(&key).copied() {
            None => {
                self.key_ack.insert(key, (seq, ch, m, op.index));
            }
            Some((first_seq, first_ch, _, first_index)) if first_seq != seq || first_ch != ch => {
                self.add(Anomaly::DedupOffsetMismatch, |s| {
                    json!({"key": s.keys.name(key), "channel": s.channels.name(ch),
                        "msg": s.msgs.name(m), "seqs": [first_seq, seq],
                        "indexes": [first_index, op.index]})
                });
            }
            Some(_) => {}
        }
        if let Process::Client(p) = op.process {
            let own = self.own_sends.entry((p, ch)).or_default();
            own.entry(seq).or_insert((m, op.time, op.index));
        }
    }

    /// Records that `m` sits at `(ch, seq)`; reports a second, different message there.
    fn observe(&mut self, ch: u32, seq: u64, m: u32, index: u64) {
        match self.at_seq.get(&(ch, seq)).copied() {
            None => {
                self.at_seq.insert((ch, seq), (m, index));
            }
            Some((first, first_index)) if first != m => {
                if self.inconsistent.insert((ch, seq)) {
                    self.add(Anomaly::InconsistentOffsets, |s| {
                        json!({"channel": s.channels.name(ch), "seq": seq,
                            "msgs": [s.msgs.name(first), s.msgs.name(m)],
                            "indexes": [first_index, index]})
                    });
                }
            }
            Some(_) => {}
        }
    }

    /// Notes that a read returned `m` at `(ch, seq)` in op `index`.
    fn note_read_at(&mut self, m: u32, ch: u32, seq: u64, index: u64) {
        self.observe(ch, seq, m, index);
        let read_at = &mut self.info[m as usize].read_at;
        if !read_at.iter().any(|(c, s, _)| *c == ch && *s == seq) {
            read_at.push((ch, seq, index));
        }
    }

    /// Interns and records every entry a read returned, attached edits included; returns
    /// them as slots.
    fn observe_read(&mut self, op: &Op, ch: u32, entries: &[Entry<'_>]) -> Vec<Slot> {
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let msg = e.msg.map(|text| {
                let m = self.msg(text);
                self.note_read_at(m, ch, e.seq, op.index);
                m
            });
            if e.deleted {
                self.erased
                    .entry((ch, e.seq))
                    .or_insert((e.edit_of, op.index));
                if let Some(m) = msg {
                    // Deleting erases the body on every node; a body next to the marker
                    // means the erasure did not happen.
                    self.add(Anomaly::ResurrectedDelete, |s| {
                        json!({"channel": s.channels.name(ch), "seq": e.seq,
                            "msg": s.msgs.name(m), "read_index": op.index,
                            "note": "marked deleted, yet its body was returned"})
                    });
                }
            }
            let edit = e.edit.map(|(edit_seq, text)| {
                let em = self.msg(text);
                self.note_read_at(em, ch, edit_seq, op.index);
                self.check_attached_edit(op, ch, e.seq, edit_seq, em);
                edit_seq
            });
            out.push(Slot {
                seq: e.seq,
                msg,
                deleted: e.deleted,
                edit,
            });
        }
        self.stats.observations += entries.len() as u64;
        if let Some(last) = entries.iter().map(|e| e.seq).max() {
            let max = self.read_max.entry(ch).or_insert(0);
            *max = (*max).max(last);
        }
        out
    }

    /// A read attached `em` (at `edit_seq`) as the newest edit of `seq`: `em` must be an edit
    /// of `seq`. A message nobody sent is left to `unexpected` through its read.
    fn check_attached_edit(&mut self, op: &Op, ch: u32, seq: u64, edit_seq: u64, em: u32) {
        let info = &self.info[em as usize];
        if info.attempts() == 0 || info.relation == Some((RelKind::Edit, seq)) {
            return;
        }
        self.add(Anomaly::Unexpected, |s| {
            json!({"channel": s.channels.name(ch), "seq": seq, "edit_seq": edit_seq,
                "msg": s.msgs.name(em), "index": op.index,
                "note": "shown as the newest edit of a message it does not edit"})
        });
    }

    /// The target an edit or delete of which explains this slot, and what the slot shows of
    /// it: an edit entry stands for the message it edits.
    fn target_of(&self, ch: u32, slot: &Slot) -> ((u32, u64), Shown) {
        // An erased entry shows no msg; the history may still know which message sits there.
        let msg = slot
            .msg
            .or_else(|| self.at_seq.get(&(ch, slot.seq)).map(|(m, _)| *m));
        let edit_of = msg
            .and_then(|m| match self.info[m as usize].relation {
                Some((RelKind::Edit, target)) => Some(target),
                _ => None,
            })
            .or_else(|| {
                self.erased
                    .get(&(ch, slot.seq))
                    .and_then(|(edit_of, _)| *edit_of)
                    .filter(|_| slot.deleted)
            });
        let shown = match (slot.deleted, edit_of) {
            (true, _) => Shown::Erased,
            (false, Some(_)) => Shown::EditAlive,
            (false, None) => Shown::Alive { edit: slot.edit },
        };
        ((ch, edit_of.unwrap_or(slot.seq)), shown)
    }

    /// Keeps what a read that passed `token` showed of every edit's or delete's target.
    fn watch(&mut self, op: &Op, ch: u32, slots: &[Slot], token: u64) {
        for slot in slots {
            let (key, shown) = self.target_of(ch, slot);
            if self.rel_targets.contains(&key) {
                self.watched.entry(key).or_default().push(Seen {
                    token,
                    index: op.index,
                    seq: slot.seq,
                    shown,
                });
            }
        }
    }

    /// Notes that a read saw `floor` in channel `ch`.
    fn observe_floor(&mut self, ch: u32, floor: u64) {
        let max = self.floor_max.entry(ch).or_insert(0);
        *max = (*max).max(floor);
        self.stats.floor_max = self.stats.floor_max.max(floor);
    }

    fn on_read(&mut self, op: &Op, call: &Call<'_>, channel: &str, msgs: &[Entry<'_>]) {
        let Call::Read {
            from,
            before,
            limit,
            head,
            floor,
            stream,
            token,
            ..
        } = call
        else {
            unreachable!("on_read is only called with Call::Read")
        };
        let floor = floor.unwrap_or(0);
        let ch = self.channels.id(channel);
        let pairs = self.observe_read(op, ch, msgs);
        self.observe_floor(ch, floor);
        if let Some(token) = token {
            self.watch(op, ch, &pairs, *token);
        }
        self.check_density(op, ch, &pairs, *from, floor);
        if let (Some(before), Some(last)) = (before, pairs.last()) {
            if last.seq + 1 < *before {
                let last_seq = last.seq;
                self.add(Anomaly::IntSkip, |s| {
                    json!({"channel": s.channels.name(ch), "process": op.process.to_string(),
                        "before": before, "last": last_seq, "index": op.index})
                });
            }
        }
        let Process::Client(p) = op.process else {
            return;
        };
        if *stream {
            self.check_stream(op, p, ch, &pairs, floor);
        } else {
            let invoked = self.read_invoked.remove(&p).unwrap_or(op.time);
            let page = Page {
                from: *from,
                before: *before,
                limit: *limit,
                head: *head,
                floor,
            };
            self.check_ryw(op, p, ch, &pairs, invoked, page);
        }
    }

    fn on_final_read(&mut self, op: &Op, channel: &str, floor: u64, msgs: &[Entry<'_>]) {
        let ch = self.channels.id(channel);
        let pairs = self.observe_read(op, ch, msgs);
        self.observe_floor(ch, floor);
        // A final read is a whole-channel read, so it must start at seq 1 (or the floor).
        self.check_density(op, ch, &pairs, Some(1), floor);
        let node = self.nodes.id(op
            .node
            .as_deref()
            .expect("validated: an ok final-read has a node"));
        self.stats.final_reads += 1;
        self.final_read.insert((ch, node), self.final_reads.len());
        self.final_reads.push(FinalRead {
            index: op.index,
            floor,
            pairs,
        });
    }

    /// Inside one read: seqs strictly increase by exactly one, starting at `from` if given;
    /// only seqs below `floor` may be skipped.
    fn check_density(&mut self, op: &Op, ch: u32, pairs: &[Slot], from: Option<u64>, floor: u64) {
        if let (Some(from), Some(first)) = (from, pairs.first()) {
            if first.seq > from.max(floor) {
                let first = first.seq;
                self.add(Anomaly::IntSkip, |s| {
                    json!({"channel": s.channels.name(ch), "process": op.process.to_string(),
                        "from": from, "first": first, "index": op.index})
                });
            }
        }
        let Some(bad) = pairs
            .windows(2)
            .find(|w| w[1].seq != w[0].seq + 1 && !(w[1].seq > w[0].seq && w[1].seq <= floor))
        else {
            return;
        };
        let (prev, next) = (bad[0].seq, bad[1].seq);
        let anomaly = if next <= prev {
            Anomaly::IntNonmonotonic
        } else {
            Anomaly::IntSkip
        };
        self.add(anomaly, |s| {
            json!({"channel": s.channels.name(ch), "process": op.process.to_string(),
                "seqs": [prev, next], "msgs": [s.shown(&bad[0]), s.shown(&bad[1])],
                "index": op.index})
        });
    }

    /// Successive stream batches of one process continue at exactly last + 1, or jump ahead
    /// to at most the batch's floor over expired seqs.
    fn check_stream(&mut self, op: &Op, p: u64, ch: u32, pairs: &[Slot], floor: u64) {
        let (Some(first), Some(last)) = (pairs.first(), pairs.last()) else {
            return;
        };
        let (first, last_seq) = (first.seq, last.seq);
        let slot = self.stream_last.entry((p, ch)).or_insert(None);
        let prev = slot.replace(last_seq);
        let Some(prev) = prev else { return };
        let anomaly = match first {
            f if f <= prev => Anomaly::NonmonotonicRead,
            f if f > prev + 1 && f > floor => Anomaly::ReadSkip,
            _ => return,
        };
        self.add(anomaly, |s| {
            json!({"channel": s.channels.name(ch), "process": p, "last": prev,
                "next": first, "index": op.index})
        });
    }

    /// A history read by `p` must contain every own ack in the range it covers.
    fn check_ryw(&mut self, op: &Op, p: u64, ch: u32, pairs: &[Slot], invoked: u64, page: Page) {
        let Some(own) = self.own_sends.get(&(p, ch)) else {
            return;
        };
        let (lo, hi) = page.covered(pairs);
        if lo > hi {
            return;
        }
        let read: HashMap<u64, Slot> = pairs.iter().map(|p| (p.seq, *p)).collect();
        // An entry shown erased holds whatever message is there: its erasure is checked
        // against the deletes on its own.
        let holds = |seq: &u64, m: &u32| {
            read.get(seq)
                .is_some_and(|slot| slot.msg == Some(*m) || slot.deleted)
        };
        // Bounded: a dense read holds every own seq in range, so this stops after at most
        // len + 1 misses-or-hits plus one.
        let missing = own
            .range(lo..=hi)
            .filter(|(_, (_, acked, _))| *acked < invoked)
            .take(pairs.len() + 1)
            .find(|(seq, (m, _, _))| !holds(seq, m))
            .map(|(seq, v)| (*seq, *v));
        let head_behind = match (page.head, own.range(..).next_back()) {
            (Some(head), Some((seq, v))) if head < *seq && v.1 < invoked => Some((*seq, *v)),
            _ => None,
        };
        if let Some((seq, (m, _, send_index))) = missing.or(head_behind) {
            self.add(Anomaly::Ryw, |s| {
                json!({"channel": s.channels.name(ch), "process": p, "seq": seq,
                    "msg": s.msgs.name(m), "send_index": send_index, "read_index": op.index})
            });
        }
    }

    fn finish(mut self) -> Report {
        self.check_messages();
        self.check_keys();
        self.check_realtime();
        self.add_recovered_relations();
        self.check_final_reads();
        self.check_erasures();
        self.check_watched();
        let mut warnings = Vec::new();
        if self.stats.final_reads == 0 {
            warnings.push("no ok final-read: `lost` and `divergence` were not checked".to_string());
        }
        self.stats.nodes = self.nodes.names.clone();
        let mut anomalies = BTreeMap::new();
        for anomaly in Anomaly::ALL {
            let summary = self.anomalies.remove(&anomaly).unwrap_or_default();
            anomalies.insert(anomaly.name().to_string(), summary);
        }
        let valid = anomalies.values().all(|s| s.count == 0);
        Report {
            valid,
            anomalies,
            stats: self.stats,
            warnings,
        }
    }

    /// Per message: duplicate, aborted-read, unexpected, lost-write; counts recovered.
    fn check_messages(&mut self) {
        for m in 0..self.info.len() {
            let info = self.info[m].clone();
            let m = u32::try_from(m).expect("ids fit u32");
            if info.ack.is_some() {
                let count = match info.relation {
                    None => &mut self.stats.acknowledged_sends,
                    Some((RelKind::Edit, _)) => &mut self.stats.acknowledged_edits,
                    Some((RelKind::Delete, _)) => &mut self.stats.acknowledged_deletes,
                };
                *count += 1;
            }
            let Some(&(ch, seq, index)) = info.read_at.first() else {
                if let (Some((seq, _, index)), Some(ch)) = (info.ack, info.channel) {
                    let expired = seq < self.floor_max.get(&ch).copied().unwrap_or(0);
                    // Shown erased is shown: a delete took its body before any read saw it.
                    let erased = self.erased.contains_key(&(ch, seq));
                    if !expired && !erased && seq <= self.read_max.get(&ch).copied().unwrap_or(0) {
                        self.add(Anomaly::LostWrite, |s| {
                            json!({"channel": s.channels.name(ch), "seq": seq,
                                "msg": s.msgs.name(m), "index": index})
                        });
                    }
                }
                continue;
            };
            self.stats.msgs_read += 1;
            if info.read_at.len() > 1 {
                let at: Vec<Value> = info
                    .read_at
                    .iter()
                    .map(|(c, s, i)| json!([self.channels.name(*c), s, i]))
                    .collect();
                self.add(
                    Anomaly::Duplicate,
                    |s| json!({"msg": s.msgs.name(m), "at": at, "note": "[channel, seq, index]"}),
                );
            }
            let attempts = info.attempts();
            if attempts == 0 {
                self.add(Anomaly::Unexpected, |s| {
                    json!({"channel": s.channels.name(ch), "seq": seq, "msg": s.msgs.name(m),
                        "index": index})
                });
            } else if info.oks == 0 && info.fails >= attempts {
                self.add(Anomaly::AbortedRead, |s| {
                    json!({"channel": s.channels.name(ch), "seq": seq, "msg": s.msgs.name(m),
                        "index": index})
                });
            } else if info.oks == 0 {
                self.stats.recovered += 1;
            }
        }
    }

    /// Two different messages with one idempotency key, read at two seqs.
    fn check_keys(&mut self) {
        let mut first: HashMap<u32, (u32, u32, u64)> = HashMap::default();
        for m in 0..self.info.len() {
            let info = &self.info[m];
            let (Some(key), Some(&(ch, seq, _))) = (info.key, info.read_at.first()) else {
                continue;
            };
            let m = u32::try_from(m).expect("ids fit u32");
            match first.get(&key).copied() {
                None => {
                    first.insert(key, (m, ch, seq));
                }
                Some((m0, ch0, seq0)) if (ch0, seq0) != (ch, seq) => {
                    self.add(Anomaly::Duplicate, |s| {
                        json!({"key": s.keys.name(key), "msgs": [s.msgs.name(m0), s.msgs.name(m)],
                            "at": [[s.channels.name(ch0), seq0], [s.channels.name(ch), seq]]})
                    });
                }
                Some(_) => {}
            }
        }
    }

    /// I7: if ok send s1 completed before send s2 was invoked, seq(s1) < seq(s2).
    fn check_realtime(&mut self) {
        // Per channel: (seq, completion time or MAX, first invoke time, msg).
        let mut by_channel: HashMap<u32, Vec<(u64, u64, u64, u32)>> = HashMap::default();
        for (m, info) in self.info.iter().enumerate() {
            let seq_ch = match (info.ack, info.channel, info.read_at.first()) {
                (Some((seq, _, _)), Some(ch), _) => (seq, ch),
                (None, _, Some(&(ch, seq, _))) => (seq, ch),
                _ => continue,
            };
            let Some((invoked, _)) = info.invoked else {
                continue;
            };
            let completed = info.ack.map_or(u64::MAX, |(_, t, _)| t);
            let m = u32::try_from(m).expect("ids fit u32");
            by_channel
                .entry(seq_ch.1)
                .or_default()
                .push((seq_ch.0, completed, invoked, m));
        }
        let mut channels: Vec<_> = by_channel.into_iter().collect();
        channels.sort_unstable_by_key(|(ch, _)| *ch);
        for (ch, mut sends) in channels {
            sends.sort_unstable();
            // Walk from the highest seq down, keeping the earliest completion seen so far.
            let mut earliest: Option<(u64, usize)> = None;
            for i in (0..sends.len()).rev() {
                let (seq2, completed2, invoked2, m2) = sends[i];
                if let Some((completed1, j)) = earliest {
                    if completed1 < invoked2 {
                        let (seq1, _, _, m1) = sends[j];
                        self.add(Anomaly::RealtimeOrder, |s| {
                            json!({"channel": s.channels.name(ch),
                                "earlier": {"msg": s.msgs.name(m1), "seq": seq1, "completed": completed1},
                                "later": {"msg": s.msgs.name(m2), "seq": seq2, "invoked": invoked2}})
                        });
                    }
                }
                if earliest.is_none_or(|(t, _)| completed2 < t) {
                    earliest = Some((completed2, i));
                }
            }
        }
    }

    /// Lost (per node) and divergence (between nodes), from the last final read per node.
    fn check_final_reads(&mut self) {
        let mut per_channel: BTreeMap<u32, Vec<(u32, usize)>> = BTreeMap::new();
        for (&(ch, node), &pos) in &self.final_read {
            per_channel.entry(ch).or_default().push((node, pos));
        }
        let mut acked_by_channel: HashMap<u32, Vec<u32>> = HashMap::default();
        for (m, info) in self.info.iter().enumerate() {
            if let (Some(_), Some(ch)) = (info.ack, info.channel) {
                let m = u32::try_from(m).expect("ids fit u32");
                acked_by_channel.entry(ch).or_default().push(m);
            }
        }
        for (ch, reads) in per_channel {
            let acked = acked_by_channel.remove(&ch).unwrap_or_default();
            for &(node, pos) in &reads {
                self.check_lost(ch, node, pos, &acked);
                self.check_final_relations(ch, node, pos);
            }
            self.check_divergence(ch, &reads);
        }
    }

    /// An unacknowledged edit or delete whose own entry a read returned was applied: final
    /// reads are held to it like to an acknowledged one.
    fn add_recovered_relations(&mut self) {
        for (m, info) in self.info.iter().enumerate() {
            let (Some((kind, target)), Some(ch), None, Some(&(_, seq, index))) =
                (info.relation, info.channel, info.ack, info.read_at.first())
            else {
                continue;
            };
            let ack = RelAck {
                seq,
                token: None,
                index,
                msg: u32::try_from(m).expect("ids fit u32"),
            };
            record_applied(
                &mut self.deletes_applied,
                &mut self.edits_applied,
                kind,
                (ch, target),
                ack,
            );
        }
    }

    /// A final read reflects every applied delete (the target and its edits erased)
    /// and every applied edit (the target shows it or a newer one, unless erased).
    fn check_final_relations(&mut self, ch: u32, node: u32, pos: usize) {
        let index = self.final_reads[pos].index;
        for i in 0..self.final_reads[pos].pairs.len() {
            let slot = self.final_reads[pos].pairs[i];
            let (key, shown) = self.target_of(ch, &slot);
            if shown != Shown::Erased {
                if let Some(ack) = self.deletes_applied.get(&key).copied() {
                    self.add(Anomaly::ResurrectedDelete, |s| {
                        json!({"channel": s.channels.name(ch), "node": s.nodes.name(node),
                            "target": key.1, "seq": slot.seq, "shown": s.shown(&slot),
                            "delete": s.msgs.name(ack.msg), "delete_seq": ack.seq,
                            "delete_index": ack.index, "final_read_index": index})
                    });
                }
            }
            if let Shown::Alive { edit } = shown {
                let newest = self
                    .edits_applied
                    .get(&key)
                    .and_then(|acks| acks.iter().max_by_key(|a| a.seq))
                    .copied();
                if let Some(ack) = newest.filter(|a| edit.unwrap_or(0) < a.seq) {
                    self.add(Anomaly::LostEdit, |s| {
                        json!({"channel": s.channels.name(ch), "node": s.nodes.name(node),
                            "seq": slot.seq, "shown": s.shown(&slot),
                            "edit": s.msgs.name(ack.msg), "edit_seq": ack.seq,
                            "edit_index": ack.index, "final_read_index": index})
                    });
                }
            }
        }
    }

    /// Every entry a read showed erased needs a delete that may have applied: of it, or of
    /// the message it edits. With only failed deletes it is an aborted read; with none, a
    /// state no operation produced.
    fn check_erasures(&mut self) {
        let mut deletes: HashMap<(u32, u64), (bool, u32)> = HashMap::default();
        for (m, info) in self.info.iter().enumerate() {
            if let (Some((RelKind::Delete, target)), Some(ch)) = (info.relation, info.channel) {
                let m = u32::try_from(m).expect("ids fit u32");
                let entry = deletes.entry((ch, target)).or_insert((false, m));
                entry.0 |= info.may_have_applied();
            }
        }
        let mut erased: Vec<(u32, u64, u64)> = self
            .erased
            .iter()
            .map(|(&(ch, seq), &(_, index))| (ch, seq, index))
            .collect();
        erased.sort_unstable();
        self.stats.erased_read = erased.len() as u64;
        for (ch, seq, index) in erased {
            let slot = Slot {
                seq,
                msg: None,
                deleted: true,
                edit: None,
            };
            let (key, _) = self.target_of(ch, &slot);
            let (anomaly, note) = match deletes.get(&key) {
                Some((true, _)) => continue,
                Some((false, _)) => (
                    Anomaly::AbortedRead,
                    "shown erased; every delete of it failed",
                ),
                None => (Anomaly::Unexpected, "shown erased; nothing deleted it"),
            };
            self.add(anomaly, |s| {
                json!({"channel": s.channels.name(ch), "seq": seq, "target": key.1,
                    "index": index, "note": note})
            });
        }
    }

    /// Reads that passed a token reflect every delete and edit acknowledged at or below it.
    fn check_watched(&mut self) {
        let mut keys: Vec<(u32, u64)> = self.watched.keys().copied().collect();
        keys.sort_unstable();
        for key in keys {
            let seen = self.watched.remove(&key).unwrap_or_default();
            let delete = self.deletes_applied.get(&key).copied();
            let edits = self.edits_applied.get(&key).cloned().unwrap_or_default();
            let ch = key.0;
            for s in seen {
                let covered = |ack: &RelAck| ack.token.is_some_and(|t| t <= s.token);
                if let Some(ack) = delete.filter(|a| covered(a) && s.shown != Shown::Erased) {
                    self.add(Anomaly::ResurrectedDelete, |st| {
                        json!({"channel": st.channels.name(ch), "target": key.1, "seq": s.seq,
                            "read_token": s.token, "read_index": s.index,
                            "delete": st.msgs.name(ack.msg), "delete_seq": ack.seq,
                            "delete_token": ack.token, "delete_index": ack.index})
                    });
                }
                let Shown::Alive { edit } = s.shown else {
                    continue;
                };
                let newest = edits.iter().filter(|a| covered(a)).max_by_key(|a| a.seq);
                if let Some(ack) = newest.filter(|a| edit.unwrap_or(0) < a.seq) {
                    self.add(Anomaly::LostEdit, |st| {
                        json!({"channel": st.channels.name(ch), "seq": key.1,
                            "shown_edit": edit, "read_token": s.token, "read_index": s.index,
                            "edit": st.msgs.name(ack.msg), "edit_seq": ack.seq,
                            "edit_token": ack.token, "edit_index": ack.index})
                    });
                }
            }
        }
    }

    fn check_lost(&mut self, ch: u32, node: u32, pos: usize, acked: &[u32]) {
        let read = &self.final_reads[pos];
        let (index, floor) = (read.index, read.floor);
        let present: HashSet<u32> = read.pairs.iter().filter_map(|p| p.msg).collect();
        // An erased entry holds the message at its seq; whether a delete explains it is
        // checked by `check_erasures`.
        let erased: HashSet<u64> = read
            .pairs
            .iter()
            .filter(|p| p.deleted)
            .map(|p| p.seq)
            .collect();
        for &m in acked.iter().filter(|m| !present.contains(m)) {
            let (seq, _, _) = self.info[m as usize].ack.expect("only acked messages");
            if erased.contains(&seq) {
                continue;
            }
            if seq < floor {
                self.stats.expired += 1;
                continue;
            }
            let node_name = self.nodes.name(node).to_string();
            *self.stats.lost_by_node.entry(node_name).or_default() += 1;
            self.add(Anomaly::Lost, |s| {
                let info = &s.info[m as usize];
                let (seq, _, send_index) = info.ack.expect("only acked messages are checked");
                json!({"channel": s.channels.name(ch), "node": s.nodes.name(node), "seq": seq,
                    "msg": s.msgs.name(m), "key": info.key.map(|k| s.keys.name(k)),
                    "send_index": send_index, "final_read_index": index})
            });
        }
    }

    fn check_divergence(&mut self, ch: u32, reads: &[(u32, usize)]) {
        if reads.len() < 2 {
            return;
        }
        // Nodes agree on a seq when they hold the same message in the same state: both
        // erased, or both undeleted with the same newest edit.
        let mut by_seq: BTreeMap<u64, Vec<(u32, Slot)>> = BTreeMap::new();
        for &(node, pos) in reads {
            for slot in &self.final_reads[pos].pairs {
                let state = Slot {
                    msg: slot.msg.filter(|_| !slot.deleted),
                    ..*slot
                };
                by_seq.entry(slot.seq).or_default().push((node, state));
            }
        }
        for (seq, held) in by_seq {
            let distinct: BTreeSet<Slot> = held.iter().map(|(_, slot)| *slot).collect();
            // A node may lack a seq below its own floor: retention expired it there first.
            let all_hold = reads.iter().all(|&(node, pos)| {
                seq < self.final_reads[pos].floor || held.iter().any(|(n, _)| *n == node)
            });
            if distinct.len() == 1 && all_hold {
                continue;
            }
            self.add(Anomaly::Divergence, |s| {
                let nodes: serde_json::Map<String, Value> = reads
                    .iter()
                    .map(|(node, _)| {
                        let shown = held
                            .iter()
                            .find(|(n, _)| n == node)
                            .map(|(_, slot)| s.shown(slot));
                        (s.nodes.name(*node).to_string(), json!(shown))
                    })
                    .collect();
                json!({"channel": s.channels.name(ch), "seq": seq, "nodes": nodes})
            });
        }
    }
}

/// The request shape of a history read, for deciding which seqs it covers.
#[derive(Clone, Copy)]
struct Page {
    from: Option<u64>,
    before: Option<u64>,
    limit: Option<u64>,
    head: Option<u64>,
    floor: u64,
}

impl Page {
    /// The seqs `[lo, hi]` the read claims to cover completely.
    ///
    /// - `from` pages forward: `[from, ∞)`, cut at the last seq returned if the page is full.
    /// - `before` pages backward: `[first returned, before - 1]`, or nothing if empty and full.
    /// - neither: the newest page, `[first returned (1 if none), ∞)`.
    ///
    /// Seqs below the floor expired, so the range never starts below it.
    fn covered(&self, pairs: &[Slot]) -> (u64, u64) {
        let (lo, hi) = self.covered_ignoring_floor(pairs);
        (lo.max(self.floor), hi)
    }

    fn covered_ignoring_floor(&self, pairs: &[Slot]) -> (u64, u64) {
        let full = self.limit.is_some_and(|l| pairs.len() as u64 >= l);
        let first = pairs.first().map(|p| p.seq);
        let last = pairs.last().map(|p| p.seq);
        match (self.from, self.before) {
            (Some(from), _) if full => (from, last.unwrap_or(0)),
            (Some(from), _) => (from, self.head.unwrap_or(u64::MAX)),
            (None, Some(before)) => (
                first.unwrap_or(if full { before } else { 1 }),
                before.saturating_sub(1),
            ),
            (None, None) => (first.unwrap_or(1), self.head.unwrap_or(u64::MAX)),
        }
    }
}

/// Records an edit or delete of `target` as applied in (deletes, edits): a delete's first
/// acknowledgement counts, every edit is kept.
fn record_applied(
    deletes: &mut HashMap<(u32, u64), RelAck>,
    edits: &mut HashMap<(u32, u64), Vec<RelAck>>,
    kind: RelKind,
    target: (u32, u64),
    ack: RelAck,
) {
    match kind {
        RelKind::Delete => {
            deletes.entry(target).or_insert(ack);
        }
        RelKind::Edit => edits.entry(target).or_default().push(ack),
    }
}
