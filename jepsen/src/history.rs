//! The history: one JSON object per line, written by [`HistoryWriter`], read back by
//! [`HistoryReader`] and [`History::read`].
//!
//! The format (also in `jepsen/README.md`) keeps Jepsen's keys so a history converts to EDN
//! trivially: `index`, `time` (ns since the start), `type` (`invoke`, `ok`, `fail`, `info`),
//! `process` (an integer, or `"nemesis"`), `f`, `value`, and optional `node` and `error`.
//! Every line is validated on read, including the shape of `value` for the operations the
//! checker understands (`send`, `edit`, `delete`, `read`, `final-read`, `resubscribe`), so the
//! checker itself never meets a malformed operation.
//!
//! A read's `msgs` lists `[seq, msg]` pairs; an entry a delete erased, an edited message and an
//! edit or delete entry carry a third element (see [`ReadEntry`]). Histories written before
//! edits and deletes have only pairs and read back unchanged.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use serde_json::{json, Map, Value};

/// Errors reading a history.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The file could not be opened or read.
    #[error("cannot read {what}: {source}")]
    Io {
        /// What was being read (a path or "history").
        what: String,
        /// The underlying error.
        source: io::Error,
    },
    /// A line is not a valid operation. `line` counts from 1; for histories built in memory it
    /// is the position of the operation, also from 1.
    #[error("line {line}: {reason}")]
    Malformed {
        /// Line number, from 1.
        line: usize,
        /// What is wrong, naming the field.
        reason: String,
    },
}

/// How an operation ended, or `Invoke` for its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpType {
    /// The operation began.
    Invoke,
    /// It definitely happened.
    Ok,
    /// It definitely did not happen.
    Fail,
    /// Unknown: it may take effect at any time, even after the test ends.
    Info,
}

impl OpType {
    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            OpType::Invoke => "invoke",
            OpType::Ok => "ok",
            OpType::Fail => "fail",
            OpType::Info => "info",
        }
    }

    fn parse(s: &str) -> Option<OpType> {
        Some(match s {
            "invoke" => OpType::Invoke,
            "ok" => OpType::Ok,
            "fail" => OpType::Fail,
            "info" => OpType::Info,
            _ => return None,
        })
    }
}

/// Who performed an operation: a client process (single-threaded), or the nemesis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Process {
    /// A client process; it has at most one operation outstanding.
    Client(u64),
    /// The fault injector; its operations are all `info`.
    Nemesis,
}

impl fmt::Display for Process {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Process::Client(p) => write!(f, "{p}"),
            Process::Nemesis => f.write_str("nemesis"),
        }
    }
}

/// One history operation. Fields are public because an `Op` is a plain record; what it must
/// satisfy is checked when a [`History`] is built from it.
#[derive(Debug, Clone, PartialEq)]
pub struct Op {
    /// Position in the history, assigned by the writer.
    pub index: u64,
    /// Nanoseconds since the test started, assigned by the writer.
    pub time: u64,
    /// Invoke or completion type.
    pub kind: OpType,
    /// The process.
    pub process: Process,
    /// The function: `send`, `edit`, `delete`, `read`, `final-read`, `resubscribe`, or a
    /// nemesis function.
    pub f: String,
    /// The arguments and, on completion, the result.
    pub value: Value,
    /// The node the operation went to, like `"n1"`.
    pub node: Option<String>,
    /// Error text of a `fail` or `info`.
    pub error: Option<String>,
}

/// `f` of a send.
pub const F_SEND: &str = "send";
/// `f` of an edit: a message replacing the text of an earlier message of the same process.
pub const F_EDIT: &str = "edit";
/// `f` of a delete: a message erasing an earlier message of the same process.
pub const F_DELETE: &str = "delete";
/// `f` of a history read or stream batch.
pub const F_READ: &str = "read";
/// `f` of a read after healing, one per channel per node.
pub const F_FINAL_READ: &str = "final-read";
/// `f` of a stream moving to another node; resets stream continuity.
pub const F_RESUBSCRIBE: &str = "resubscribe";

impl Op {
    /// An operation with index and time zero (the writer assigns both).
    pub fn new(kind: OpType, process: Process, f: impl Into<String>, value: Value) -> Op {
        Op {
            index: 0,
            time: 0,
            kind,
            process,
            f: f.into(),
            value,
            node: None,
            error: None,
        }
    }

    /// A send of `msg` under idempotency `key`; add the seq of an `ok` with [`Op::with_seq`].
    pub fn send(kind: OpType, process: u64, channel: &str, key: &str, msg: &str) -> Op {
        let value = json!({"channel": channel, "key": key, "msg": msg});
        Op::new(kind, Process::Client(process), F_SEND, value)
    }

    /// An edit of the message at seq `of`: a message of its own, with its own idempotency
    /// `key`, whose body `msg` is the target's new text; add the edit's own seq to an `ok` with
    /// [`Op::with_seq`].
    pub fn edit(kind: OpType, process: u64, channel: &str, key: &str, msg: &str, of: u64) -> Op {
        let value = json!({"channel": channel, "key": key, "msg": msg, "of": of});
        Op::new(kind, Process::Client(process), F_EDIT, value)
    }

    /// A delete of the message at seq `of`: a message of its own, with its own idempotency
    /// `key` and body `msg`, that erases the target's body and its edits'.
    pub fn delete(kind: OpType, process: u64, channel: &str, key: &str, msg: &str, of: u64) -> Op {
        let value = json!({"channel": channel, "key": key, "msg": msg, "of": of});
        Op::new(kind, Process::Client(process), F_DELETE, value)
    }

    /// A history read; add `from`, `limit`, `msgs` with the `with_` helpers.
    pub fn read(kind: OpType, process: u64, channel: &str) -> Op {
        Op::new(
            kind,
            Process::Client(process),
            F_READ,
            json!({"channel": channel}),
        )
    }

    /// A stream batch (`read` with `"stream": true`).
    pub fn stream_read(kind: OpType, process: u64, channel: &str) -> Op {
        let value = json!({"channel": channel, "stream": true});
        Op::new(kind, Process::Client(process), F_READ, value)
    }

    /// A final read of `channel` from `node`.
    pub fn final_read(kind: OpType, process: u64, node: &str, channel: &str) -> Op {
        Op::new(
            kind,
            Process::Client(process),
            F_FINAL_READ,
            json!({"channel": channel}),
        )
        .with_node(node)
    }

    /// A stream moving to another node, continuing after seq `after`.
    pub fn resubscribe(kind: OpType, process: u64, channel: &str, after: u64) -> Op {
        let value = json!({"channel": channel, "after": after});
        Op::new(kind, Process::Client(process), F_RESUBSCRIBE, value)
    }

    /// A nemesis operation (always `info`).
    pub fn nemesis(f: &str, value: Value) -> Op {
        Op::new(OpType::Info, Process::Nemesis, f, value)
    }

    /// Sets `value.seq`.
    pub fn with_seq(self, seq: u64) -> Op {
        self.with_field("seq", json!(seq))
    }

    /// Sets `value.from`, the first seq a history read asks for.
    pub fn with_from(self, from: u64) -> Op {
        self.with_field("from", json!(from))
    }

    /// Sets `value.limit`, the most messages a history read may return.
    pub fn with_limit(self, limit: u64) -> Op {
        self.with_field("limit", json!(limit))
    }

    /// Sets `value.head`, the channel's highest seq on the node that answered a read.
    pub fn with_head(self, head: u64) -> Op {
        self.with_field("head", json!(head))
    }

    /// Sets `value.floor`, the channel's lowest kept seq on the node that answered a read:
    /// retention expired every seq below it there, so a read may lack them.
    pub fn with_floor(self, floor: u64) -> Op {
        self.with_field("floor", json!(floor))
    }

    /// Sets `value.token`: on a read, the read token the request passed (the node answers
    /// only once it has applied that log index); on an ok send, edit or delete, the read
    /// token the node answered (the log index that holds the message).
    pub fn with_token(self, token: u64) -> Op {
        self.with_field("token", json!(token))
    }

    /// Sets `value.msgs` from what a read returned, one [`ReadEntry`] per message.
    pub fn with_entries<I>(self, entries: I) -> Op
    where
        I: IntoIterator<Item = ReadEntry>,
    {
        let list: Vec<Value> = entries.into_iter().map(|e| e.to_json()).collect();
        self.with_field("msgs", Value::Array(list))
    }

    /// Sets `value.msgs`, the `(seq, msg)` pairs a read returned.
    pub fn with_msgs<I, S>(self, msgs: I) -> Op
    where
        I: IntoIterator<Item = (u64, S)>,
        S: AsRef<str>,
    {
        let list: Vec<Value> = msgs
            .into_iter()
            .map(|(s, m)| json!([s, m.as_ref()]))
            .collect();
        self.with_field("msgs", Value::Array(list))
    }

    /// Sets `node`.
    pub fn with_node(mut self, node: &str) -> Op {
        self.node = Some(node.to_string());
        self
    }

    /// Sets `error`.
    pub fn with_error(mut self, error: &str) -> Op {
        self.error = Some(error.to_string());
        self
    }

    /// Sets `time`; for histories built by hand (the writer assigns it otherwise).
    pub fn at(mut self, time_ns: u64) -> Op {
        self.time = time_ns;
        self
    }

    fn with_field(mut self, key: &str, v: Value) -> Op {
        if let Value::Object(map) = &mut self.value {
            map.insert(key.to_string(), v);
        }
        self
    }

    /// The op as one JSON object (no trailing newline).
    pub fn to_json(&self) -> Value {
        let mut map = Map::new();
        map.insert("index".into(), json!(self.index));
        map.insert("time".into(), json!(self.time));
        map.insert("type".into(), json!(self.kind.as_str()));
        let process = match self.process {
            Process::Client(p) => json!(p),
            Process::Nemesis => json!("nemesis"),
        };
        map.insert("process".into(), process);
        map.insert("f".into(), json!(self.f));
        map.insert("value".into(), self.value.clone());
        if let Some(node) = &self.node {
            map.insert("node".into(), json!(node));
        }
        if let Some(error) = &self.error {
            map.insert("error".into(), json!(error));
        }
        Value::Object(map)
    }

    /// Parses and validates one line.
    ///
    /// # Errors
    /// A reason naming the field that is missing or has the wrong type.
    pub fn from_json_line(line: &str) -> Result<Op, String> {
        parse_line(line)
    }
}

/// One message as a read returned it, for [`Op::with_entries`].
///
/// In JSON a plain message is `[seq, msg]`; anything else adds an object:
/// `[seq, msg, {"edit": [E, EM]}]` (its newest edit is the entry at seq `E`, body `EM`),
/// `[seq, null, {"deleted": true}]` (a delete erased it; with `"edit_of": T` when the erased
/// entry is itself an edit of `T`), `[seq, msg, {"delete_of": T}]` (a delete of `T`). A
/// deleted entry whose body the node still returned keeps it in place of `null`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReadEntry {
    /// The entry's seq.
    pub seq: u64,
    /// Its body as text; `None` when a delete erased it.
    pub msg: Option<String>,
    /// The node marked it deleted.
    pub deleted: bool,
    /// Seq and body of its newest edit, as the read attached it.
    pub edit: Option<(u64, String)>,
    /// The entry is an edit of this seq.
    pub edit_of: Option<u64>,
    /// The entry is a delete of this seq.
    pub delete_of: Option<u64>,
}

impl ReadEntry {
    /// A plain message: `[seq, msg]`.
    pub fn plain(seq: u64, msg: &str) -> ReadEntry {
        ReadEntry {
            seq,
            msg: Some(msg.to_string()),
            ..ReadEntry::default()
        }
    }

    /// An entry a delete erased: `[seq, null, {"deleted": true}]`.
    pub fn erased(seq: u64) -> ReadEntry {
        ReadEntry {
            seq,
            deleted: true,
            ..ReadEntry::default()
        }
    }

    fn to_json(&self) -> Value {
        let mut extra = Map::new();
        if self.deleted {
            extra.insert("deleted".into(), json!(true));
        }
        if let Some((seq, msg)) = &self.edit {
            extra.insert("edit".into(), json!([seq, msg]));
        }
        if let Some(of) = self.edit_of {
            extra.insert("edit_of".into(), json!(of));
        }
        if let Some(of) = self.delete_of {
            extra.insert("delete_of".into(), json!(of));
        }
        if extra.is_empty() {
            json!([self.seq, self.msg])
        } else {
            json!([self.seq, self.msg, extra])
        }
    }
}

/// What a relation op does to its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum RelKind {
    Edit,
    Delete,
}

/// The borrowed, validated form of one [`ReadEntry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry<'a> {
    pub(crate) seq: u64,
    pub(crate) msg: Option<&'a str>,
    pub(crate) deleted: bool,
    pub(crate) edit: Option<(u64, &'a str)>,
    pub(crate) edit_of: Option<u64>,
}

/// The checker's typed view of an operation's value, validated when the history is built.
#[derive(Debug, Clone)]
pub(crate) enum Call<'a> {
    /// A send, edit or delete: each appends one message with its own key.
    Send {
        channel: &'a str,
        key: &'a str,
        msg: &'a str,
        seq: Option<u64>,
        /// For edits and deletes: what it does, and the target's seq.
        relation: Option<(RelKind, u64)>,
        token: Option<u64>,
    },
    Read {
        channel: &'a str,
        from: Option<u64>,
        before: Option<u64>,
        limit: Option<u64>,
        head: Option<u64>,
        floor: Option<u64>,
        stream: bool,
        token: Option<u64>,
        msgs: Option<Vec<Entry<'a>>>,
    },
    FinalRead {
        channel: &'a str,
        floor: Option<u64>,
        msgs: Option<Vec<Entry<'a>>>,
    },
    Resubscribe {
        channel: &'a str,
        after: Option<u64>,
    },
    /// Nemesis operations and client functions the checker does not know.
    Other,
}

fn parse_line(line: &str) -> Result<Op, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(mut obj) = v else {
        return Err("expected a JSON object".into());
    };
    let index = u64_field(&obj, "index", "")?;
    let time = u64_field(&obj, "time", "")?;
    let kind_text = str_field(&obj, "type", "")?;
    let kind = OpType::parse(kind_text).ok_or_else(|| {
        format!("field `type`: expected invoke, ok, fail or info, found {kind_text:?}")
    })?;
    let process = match obj.get("process") {
        None => return Err("missing field `process`".into()),
        Some(Value::String(s)) if s == "nemesis" => Process::Nemesis,
        Some(p) => Process::Client(p.as_u64().ok_or_else(|| {
            format!("field `process`: expected a non-negative integer or \"nemesis\", found {p}")
        })?),
    };
    let f = str_field(&obj, "f", "")?.to_string();
    let node = opt_str_field(&obj, "node")?;
    let error = opt_str_field(&obj, "error")?;
    let value = obj.remove("value").ok_or("missing field `value`")?;
    let op = Op {
        index,
        time,
        kind,
        process,
        f,
        value,
        node,
        error,
    };
    Call::parse(&op)?;
    Ok(op)
}

impl<'a> Call<'a> {
    /// The typed view of `op`, borrowing its strings.
    pub(crate) fn parse(op: &'a Op) -> Result<Call<'a>, String> {
        if op.process == Process::Nemesis {
            if op.kind != OpType::Info {
                return Err("field `type`: nemesis operations must be info".into());
            }
            return Ok(Call::Other);
        }
        let known = [
            F_SEND,
            F_EDIT,
            F_DELETE,
            F_READ,
            F_FINAL_READ,
            F_RESUBSCRIBE,
        ];
        if !known.contains(&op.f.as_str()) {
            return Ok(Call::Other);
        }
        let Value::Object(v) = &op.value else {
            return Err(format!(
                "field `value`: expected an object for f {:?}",
                op.f
            ));
        };
        let channel = str_field(v, "channel", "value.")?;
        let is_ok = op.kind == OpType::Ok;
        Ok(match op.f.as_str() {
            F_SEND | F_EDIT | F_DELETE => Call::Send {
                channel,
                key: str_field(v, "key", "value.")?,
                msg: str_field(v, "msg", "value.")?,
                seq: if is_ok {
                    Some(u64_field(v, "seq", "value.")?)
                } else {
                    opt_u64_field(v, "seq")?
                },
                relation: match op.f.as_str() {
                    F_EDIT => Some((RelKind::Edit, u64_field(v, "of", "value.")?)),
                    F_DELETE => Some((RelKind::Delete, u64_field(v, "of", "value.")?)),
                    _ => None,
                },
                token: opt_u64_field(v, "token")?,
            },
            F_READ => Call::Read {
                channel,
                from: opt_u64_field(v, "from")?,
                before: opt_u64_field(v, "before")?,
                limit: opt_u64_field(v, "limit")?,
                head: opt_u64_field(v, "head")?,
                floor: opt_u64_field(v, "floor")?,
                stream: match v.get("stream") {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => *b,
                    Some(other) => {
                        return Err(format!(
                            "field `value.stream`: expected a bool, found {other}"
                        ))
                    }
                },
                token: opt_u64_field(v, "token")?,
                msgs: parse_msgs(v, is_ok)?,
            },
            F_FINAL_READ => {
                if is_ok && op.node.is_none() {
                    return Err("missing field `node` (required on an ok final-read)".into());
                }
                Call::FinalRead {
                    channel,
                    floor: opt_u64_field(v, "floor")?,
                    msgs: parse_msgs(v, is_ok)?,
                }
            }
            _ => Call::Resubscribe {
                channel,
                after: opt_u64_field(v, "after")?,
            },
        })
    }
}

fn parse_msgs(v: &Map<String, Value>, required: bool) -> Result<Option<Vec<Entry<'_>>>, String> {
    let list = match v.get("msgs") {
        None | Some(Value::Null) if required => return Err("missing field `value.msgs`".into()),
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(list)) => list,
        Some(other) => {
            return Err(format!(
                "field `value.msgs`: expected an array, found {other}"
            ))
        }
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        out.push(parse_entry(item).map_err(|why| format!("field `value.msgs[{i}]`: {why}"))?);
    }
    Ok(Some(out))
}

/// One `[seq, msg]` or `[seq, msg, {...}]` element of `msgs` (the shapes on [`ReadEntry`]).
/// Unknown keys of the object are ignored, so newer annotations do not break older checkers.
fn parse_entry(item: &Value) -> Result<Entry<'_>, String> {
    let shape =
        || format!("expected [seq, msg] or [seq, msg, {{...}}] with an integer seq, found {item}");
    let (seq, msg, extra) = match item.as_array().map(Vec::as_slice) {
        Some([seq, msg]) => (seq, msg, None),
        Some([seq, msg, Value::Object(extra)]) => (seq, msg, Some(extra)),
        _ => return Err(shape()),
    };
    let seq = seq.as_u64().ok_or_else(shape)?;
    let msg = match msg {
        Value::String(m) => Some(m.as_str()),
        Value::Null => None,
        _ => return Err(shape()),
    };
    let mut entry = Entry {
        seq,
        msg,
        deleted: false,
        edit: None,
        edit_of: None,
    };
    if let Some(extra) = extra {
        entry.deleted = match extra.get("deleted") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => return Err(format!("`deleted`: expected a bool, found {other}")),
        };
        entry.edit = match extra.get("edit") {
            None | Some(Value::Null) => None,
            Some(pair) => {
                let parsed = match pair.as_array().map(Vec::as_slice) {
                    Some([seq, msg]) => seq.as_u64().zip(msg.as_str()),
                    _ => None,
                };
                Some(parsed.ok_or_else(|| {
                    format!("`edit`: expected [seq, msg] with an integer seq, found {pair}")
                })?)
            }
        };
        entry.edit_of = opt_u64_field(extra, "edit_of")?;
        // Read for validation only: the checker knows a delete's target from its op.
        opt_u64_field(extra, "delete_of")?;
    }
    if entry.msg.is_none() && !entry.deleted {
        return Err(format!(
            "a null msg is allowed only with \"deleted\": true, found {item}"
        ));
    }
    Ok(entry)
}

fn u64_field(v: &Map<String, Value>, key: &str, prefix: &str) -> Result<u64, String> {
    match v.get(key) {
        None => Err(format!("missing field `{prefix}{key}`")),
        Some(x) => x.as_u64().ok_or_else(|| {
            format!("field `{prefix}{key}`: expected a non-negative integer, found {x}")
        }),
    }
}

fn opt_u64_field(v: &Map<String, Value>, key: &str) -> Result<Option<u64>, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_u64().map(Some).ok_or_else(|| {
            format!("field `value.{key}`: expected a non-negative integer, found {x}")
        }),
    }
}

fn str_field<'a>(v: &'a Map<String, Value>, key: &str, prefix: &str) -> Result<&'a str, String> {
    match v.get(key) {
        None => Err(format!("missing field `{prefix}{key}`")),
        Some(x) => x
            .as_str()
            .ok_or_else(|| format!("field `{prefix}{key}`: expected a string, found {x}")),
    }
}

fn opt_str_field(v: &Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(x) => Err(format!("field `{key}`: expected a string, found {x}")),
    }
}

/// A validated history, in file order.
///
/// Invariants: every op's `value` has the shape its `f` needs (ok sends, edits and deletes
/// carry `seq`, edits and deletes carry `of`, ok reads carry `msgs`, ok final reads carry
/// `node`); nemesis ops are `info`.
#[derive(Debug, Clone, Default)]
pub struct History {
    ops: Vec<Op>,
}

impl History {
    /// Validates operations built in memory.
    ///
    /// # Errors
    /// [`HistoryError::Malformed`] naming the position (from 1) of the first bad op.
    pub fn new(ops: Vec<Op>) -> Result<History, HistoryError> {
        for (i, op) in ops.iter().enumerate() {
            Call::parse(op).map_err(|reason| HistoryError::Malformed {
                line: i + 1,
                reason,
            })?;
        }
        Ok(History { ops })
    }

    /// Reads a JSON-lines history file.
    ///
    /// # Errors
    /// [`HistoryError::Io`] if the file cannot be read, [`HistoryError::Malformed`] naming the
    /// first bad line.
    pub fn read(path: &Path) -> Result<History, HistoryError> {
        let file = File::open(path).map_err(|source| HistoryError::Io {
            what: path.display().to_string(),
            source,
        })?;
        History::from_reader(BufReader::new(file))
    }

    /// Reads JSON lines from any reader; blank lines are skipped.
    ///
    /// # Errors
    /// As [`History::read`].
    pub fn from_reader(reader: impl BufRead) -> Result<History, HistoryError> {
        let ops = HistoryReader::new(reader).collect::<Result<Vec<Op>, HistoryError>>()?;
        Ok(History { ops })
    }

    /// The operations in file order.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// Number of operations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// True when there are no operations.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Writes the history as JSON lines.
    ///
    /// # Errors
    /// The writer's error.
    pub fn write_to(&self, mut out: impl Write) -> io::Result<()> {
        for op in &self.ops {
            serde_json::to_writer(&mut out, &op.to_json())?;
            out.write_all(b"\n")?;
        }
        out.flush()
    }
}

/// A streaming reader: yields one validated [`Op`] per non-blank line.
pub struct HistoryReader<R> {
    reader: R,
    line_no: usize,
    buf: String,
}

impl<R: BufRead> HistoryReader<R> {
    /// Wraps a reader.
    pub fn new(reader: R) -> HistoryReader<R> {
        HistoryReader {
            reader,
            line_no: 0,
            buf: String::new(),
        }
    }

    fn next_parsed(&mut self) -> Result<Option<Op>, HistoryError> {
        loop {
            self.buf.clear();
            self.line_no += 1;
            let n = self
                .reader
                .read_line(&mut self.buf)
                .map_err(|source| HistoryError::Io {
                    what: format!("history line {}", self.line_no),
                    source,
                })?;
            if n == 0 {
                return Ok(None);
            }
            if self.buf.trim().is_empty() {
                continue;
            }
            return parse_line(&self.buf)
                .map(Some)
                .map_err(|reason| HistoryError::Malformed {
                    line: self.line_no,
                    reason,
                });
        }
    }
}

impl<R: BufRead> Iterator for HistoryReader<R> {
    type Item = Result<Op, HistoryError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_parsed().transpose()
    }
}

/// Appends operations to a JSON-lines file, assigning `index` and `time`.
///
/// Safe to share between threads and tokio tasks (`Send + Sync`): a std `Mutex` guards the file
/// and the next index. The lock is held only to stamp, format and write one line, never across an
/// `.await`, so a std mutex is cheaper than tokio's here. Each line is flushed before `record`
/// returns, so a crash of the harness loses at most the line being written; the reader reports a
/// torn last line as malformed.
pub struct HistoryWriter {
    start: Instant,
    inner: Mutex<WriterState>,
}

struct WriterState {
    out: Box<dyn Write + Send>,
    next_index: u64,
}

impl HistoryWriter {
    /// Creates (truncating) the file at `path`.
    ///
    /// # Errors
    /// The error from creating the file.
    pub fn create(path: &Path) -> io::Result<HistoryWriter> {
        Ok(HistoryWriter::new(BufWriter::new(File::create(path)?)))
    }

    /// Writes to any sink; time zero is now.
    pub fn new(out: impl Write + Send + 'static) -> HistoryWriter {
        HistoryWriter {
            start: Instant::now(),
            inner: Mutex::new(WriterState {
                out: Box::new(out),
                next_index: 0,
            }),
        }
    }

    /// Nanoseconds since the writer was made.
    pub fn elapsed_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Stamps `op` with the next index and the current time, appends it, flushes, and returns
    /// the stamped op.
    ///
    /// # Errors
    /// The sink's write or flush error; the index is consumed either way.
    ///
    /// # Panics
    /// If another thread panicked while holding the lock.
    pub fn record(&self, mut op: Op) -> io::Result<Op> {
        let mut state = self
            .inner
            .lock()
            .expect("history writer lock poisoned by a panic");
        // Stamping under the lock keeps index and time in the same order as the lines.
        op.index = state.next_index;
        op.time = self.elapsed_ns();
        state.next_index += 1;
        let mut line = serde_json::to_vec(&op.to_json()).map_err(io::Error::other)?;
        line.push(b'\n');
        state.out.write_all(&line)?;
        state.out.flush()?;
        Ok(op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<HistoryWriter>();
    }

    #[test]
    fn op_round_trips_through_json() {
        let op = Op::send(OpType::Ok, 3, "general", "c3-1", "p3-1")
            .with_seq(4)
            .with_node("n2");
        let line = op.to_json().to_string();
        assert_eq!(Op::from_json_line(&line).expect("parses"), op);
    }

    #[test]
    fn edit_delete_and_read_entries_round_trip() {
        let edit = Op::edit(OpType::Ok, 1, "c", "c1-2", "p1-2-e1", 1)
            .with_seq(5)
            .with_token(9);
        let line = edit.to_json().to_string();
        assert_eq!(Op::from_json_line(&line).expect("parses"), edit);
        let read = Op::read(OpType::Ok, 2, "c").with_entries([
            ReadEntry {
                edit: Some((5, "p1-2-e1".into())),
                ..ReadEntry::plain(1, "p1-1")
            },
            ReadEntry::erased(2),
            ReadEntry {
                edit_of: Some(2),
                ..ReadEntry::erased(3)
            },
        ]);
        let line = read.to_json().to_string();
        assert!(line.contains(r#"[2,null,{"deleted":true}]"#), "{line}");
        let back = Op::from_json_line(&line).expect("parses");
        let Ok(Call::Read {
            msgs: Some(entries),
            ..
        }) = Call::parse(&back)
        else {
            panic!("a read with msgs")
        };
        assert_eq!(entries[0].edit, Some((5, "p1-2-e1")));
        assert!(entries[1].deleted && entries[1].msg.is_none());
        assert_eq!(entries[2].edit_of, Some(2));
    }

    #[test]
    fn a_null_msg_needs_the_deleted_marker() {
        let line = r#"{"index":0,"time":0,"type":"ok","process":1,"f":"read","value":{"channel":"c","msgs":[[1,null]]}}"#;
        let err = Op::from_json_line(line).expect_err("null without deleted");
        assert!(err.contains("value.msgs[0]"), "{err}");
    }

    #[test]
    fn nemesis_process_parses() {
        let line =
            r#"{"index":0,"time":5,"type":"info","process":"nemesis","f":"kill","value":["n1"]}"#;
        let op = Op::from_json_line(line).expect("parses");
        assert_eq!(op.process, Process::Nemesis);
    }
}
