//! Helpers shared by the integration tests: building commands, logs and replicas.

use chat_sm::{
    ApplyEntry, ApplyPayload, ChatResponse, ChatState, ClientId, Command, Config, LogIndex,
    RaftMeta, SendCmd,
};
use tempfile::TempDir;

/// One entry of a test log, owning its command.
#[derive(Clone, Debug)]
pub enum TestEntry {
    Blank,
    Membership(Vec<u8>),
    Cmd(Command),
    Malformed,
}

/// A replica with its own temporary directory.
pub struct Replica {
    pub dir: TempDir,
    pub state: Option<ChatState>,
    pub ring_len: usize,
}

impl Replica {
    pub fn new(ring_len: usize) -> Replica {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::new(dir.path());
        config.ring_len = ring_len;
        let state = ChatState::open(config).expect("open");
        Replica {
            dir,
            state: Some(state),
            ring_len,
        }
    }

    pub fn state(&self) -> &ChatState {
        self.state.as_ref().expect("open")
    }

    /// Closes and reopens the state in the same directory.
    pub fn restart(&mut self) {
        drop(self.state.take());
        let mut config = Config::new(self.dir.path());
        config.ring_len = self.ring_len;
        self.state = Some(ChatState::open(config).expect("reopen"));
    }

    pub fn dump(&self) -> String {
        self.state().dump().expect("dump")
    }
}

pub fn send(channel: &str, sender: &str, body: &[u8], client: u8, client_seq: u64) -> SendCmd {
    SendCmd {
        channel: channel.into(),
        sender: sender.into(),
        body: body.to_vec(),
        client_id: ClientId([client; 16]),
        client_seq,
        at_ms: 1_000 + client_seq,
    }
}

/// The meta the fake adapter stores with the batch ending at `index`.
pub fn meta_for(index: u64, entries: &[(u64, TestEntry)]) -> RaftMeta {
    let membership = entries.iter().rev().find_map(|(_, e)| match e {
        TestEntry::Membership(m) => Some(m.clone()),
        _ => None,
    });
    RaftMeta {
        last_applied: index.to_be_bytes().to_vec(),
        membership,
    }
}

/// Applies `entries` (index, entry) as one `apply` call.
pub fn apply(state: &ChatState, entries: &[(u64, TestEntry)]) -> Vec<ChatResponse> {
    let borrowed: Vec<ApplyEntry<'_>> = entries
        .iter()
        .map(|(index, e)| ApplyEntry {
            index: LogIndex(*index),
            payload: match e {
                TestEntry::Blank => ApplyPayload::Blank,
                TestEntry::Membership(_) => ApplyPayload::Membership,
                TestEntry::Cmd(c) => ApplyPayload::Command(c),
                TestEntry::Malformed => ApplyPayload::Malformed,
            },
        })
        .collect();
    let last = entries.last().map_or(0, |(i, _)| *i);
    let responses = state.apply(&borrowed, meta_for(last, entries));
    assert_eq!(responses.len(), entries.len());
    responses
}

/// Numbers `log` from `first_index` and applies it in calls of the given sizes (cycled), each
/// `Expire` in a call of its own as the state machine requires.
pub fn apply_log(
    state: &ChatState,
    log: &[TestEntry],
    first_index: u64,
    chunks: &[usize],
) -> Vec<ChatResponse> {
    let numbered: Vec<(u64, TestEntry)> = log
        .iter()
        .cloned()
        .zip(first_index..)
        .map(|(e, i)| (i, e))
        .collect();
    let mut out = Vec::new();
    let mut rest = numbered.as_slice();
    let mut sizes = chunks.iter().copied().cycle();
    while !rest.is_empty() {
        let mut n = sizes.next().unwrap_or(1).clamp(1, rest.len());
        let is_expire =
            |(_, e): &(u64, TestEntry)| matches!(e, TestEntry::Cmd(Command::Expire { .. }));
        if let Some(at) = rest[..n].iter().position(is_expire) {
            n = at.max(1);
        }
        out.extend(apply(state, &rest[..n]));
        rest = &rest[n..];
    }
    out
}

/// A log of `count` entries mixing sends to three channels (every other one a retry of an
/// earlier send), user registrations and membership changes.
pub fn sample_log(count: u64) -> Vec<TestEntry> {
    (1..=count)
        .map(|i| match i % 5 {
            0 => TestEntry::Cmd(Command::RegisterUser {
                name: format!("user{i}"),
                public_key: [i as u8; 32],
            }),
            1 => TestEntry::Membership(vec![i as u8]),
            _ => TestEntry::Cmd(Command::SendBatch(vec![
                send(
                    ["a", "b", "c"][(i % 3) as usize],
                    "Al",
                    &i.to_be_bytes(),
                    1,
                    i,
                ),
                send("a", "Bo", b"x", 2, i / 2), // every other one repeats
            ])),
        })
        .collect()
}
