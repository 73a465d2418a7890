//! Read markers against a model of the rules on `ReadMark`: a marker only moves forward, only
//! for a user admitted to the channel and only up to its head; responses, stored markers and
//! the listing's `read_to` match the model; replicas batching differently, a restart and a
//! snapshot install all end in the same state.

use std::collections::{BTreeSet, HashMap};

use chat_sm::{
    ChannelOp, ChannelSeq, ChatResponse, ClientId, Command, ReadMark, RejectReason, SendCmd, Sent,
    MAX_BATCH_MARKS,
};
use proptest::prelude::*;

use crate::common::{apply_log, Replica, TestEntry};

/// `vault` is private: Alice owns it and Bob is in it unless kicked.
const CHANNELS: &[&str] = &["general", "vault", "Not A Channel"];
const USERS: &[&str] = &["Alice", "Bob", "Carol", ""];

#[derive(Clone, Debug)]
enum Op {
    Send { channel: usize, sender: usize },
    Mark(Vec<(usize, usize, u64)>),
    Kick,
    Readd,
}

fn arb_op() -> impl Strategy<Value = Op> {
    let mark = (0..USERS.len(), 0..CHANNELS.len(), 0u64..10);
    prop_oneof![
        4 => (0..2usize, 0..3usize).prop_map(|(channel, sender)| Op::Send { channel, sender }),
        5 => prop::collection::vec(mark, 1..6).prop_map(Op::Mark),
        1 => Just(Op::Kick),
        1 => Just(Op::Readd),
    ]
}

fn channel_cmd(channel: &str, by: &str, op: ChannelOp) -> Command {
    Command::Channel {
        channel: channel.into(),
        by: by.into(),
        op,
    }
}

/// The setup (users, `vault` with Bob in it), then the ops.
fn commands(ops: &[Op]) -> Vec<Command> {
    let mut out = Vec::new();
    for (i, user) in USERS[..3].iter().enumerate() {
        out.push(Command::RegisterUser {
            name: (*user).into(),
            public_key: [i as u8 + 1; 32],
        });
    }
    let create = ChannelOp::Create {
        private: true,
        crypto: None,
    };
    out.push(channel_cmd("vault", "Alice", create));
    out.push(channel_cmd(
        "vault",
        "Alice",
        ChannelOp::Invite("Bob".into()),
    ));
    out.push(channel_cmd("vault", "Bob", ChannelOp::Accept));
    for (i, op) in ops.iter().enumerate() {
        match op {
            Op::Send { channel, sender } => out.push(Command::Send(SendCmd {
                channel: CHANNELS[*channel].into(),
                sender: USERS[*sender].into(),
                body: vec![0, i as u8],
                client_id: ClientId([*sender as u8 + 1; 16]),
                client_seq: i as u64 + 1,
                at_ms: 1_000 + i as u64,
            })),
            Op::Mark(marks) => out.push(Command::MarkRead(
                marks
                    .iter()
                    .map(|&(user, channel, seq)| ReadMark {
                        user: USERS[user].into(),
                        channel: CHANNELS[channel].into(),
                        seq: ChannelSeq(seq),
                    })
                    .collect(),
            )),
            Op::Kick => out.push(channel_cmd(
                "vault",
                "Alice",
                ChannelOp::Remove("Bob".into()),
            )),
            Op::Readd => {
                out.push(channel_cmd(
                    "vault",
                    "Alice",
                    ChannelOp::Invite("Bob".into()),
                ));
                out.push(channel_cmd("vault", "Bob", ChannelOp::Accept));
            }
        }
    }
    out
}

#[derive(Default)]
struct Model {
    heads: HashMap<String, u64>,
    vault: BTreeSet<String>,
    markers: HashMap<(String, String), u64>,
}

impl Model {
    fn admits(&self, channel: &str, user: &str) -> bool {
        channel != "vault" || self.vault.contains(user)
    }

    fn apply(&mut self, cmd: &Command) -> ChatResponse {
        match cmd {
            Command::RegisterUser { .. } => ChatResponse::Registered,
            Command::Channel { by, op, .. } => {
                match op {
                    ChannelOp::Create { .. } => {
                        self.vault.insert(by.clone());
                    }
                    ChannelOp::Accept => {
                        self.vault.insert(by.clone());
                    }
                    ChannelOp::Remove(user) => {
                        self.vault.remove(user);
                    }
                    _ => {}
                }
                ChatResponse::ChannelUpdated
            }
            Command::Send(send) => {
                if !self.admits(&send.channel, &send.sender) {
                    return ChatResponse::Rejected(RejectReason::NotMember);
                }
                let head = self.heads.entry(send.channel.clone()).or_default();
                *head += 1;
                ChatResponse::Sent(Sent {
                    channel: send.channel.clone(),
                    seq: ChannelSeq(*head),
                    at_ms: send.at_ms,
                    duplicate: false,
                })
            }
            Command::MarkRead(marks) => {
                ChatResponse::Marked(marks.iter().map(|m| self.mark(m)).collect())
            }
            other => panic!("not generated: {other:?}"),
        }
    }

    fn mark(&mut self, mark: &ReadMark) -> Result<ChannelSeq, RejectReason> {
        if mark.channel == "Not A Channel" {
            return Err(RejectReason::InvalidChannel);
        }
        if mark.user.is_empty() {
            return Err(RejectReason::InvalidSender);
        }
        if !self.admits(&mark.channel, &mark.user) {
            return Err(RejectReason::NotMember);
        }
        let head = self.heads.get(&mark.channel).copied().unwrap_or(0);
        if mark.seq.0 == 0 || mark.seq.0 > head {
            return Err(RejectReason::NoSuchMessage);
        }
        let marker = self
            .markers
            .entry((mark.user.clone(), mark.channel.clone()))
            .or_default();
        *marker = (*marker).max(mark.seq.0);
        Ok(ChannelSeq(*marker))
    }
}

fn log_of(cmds: &[Command]) -> Vec<TestEntry> {
    cmds.iter().cloned().map(TestEntry::Cmd).collect()
}

fn arb_chunks() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..8, 1..4)
}

/// Every user's marker in every channel, read both ways, is the model's.
fn check_against(replica: &Replica, model: &Model) -> Result<(), TestCaseError> {
    let state = replica.state();
    for user in &USERS[..3] {
        for channel in &CHANNELS[..2] {
            let want = model
                .markers
                .get(&((*user).to_owned(), (*channel).to_owned()))
                .copied()
                .unwrap_or(0);
            let got = state.read_marker(user, channel).expect("read marker");
            prop_assert_eq!(got, ChannelSeq(want), "{} in {}", user, channel);
        }
        let (page, more) = state.channel_page(user, None, 100).expect("page");
        prop_assert!(!more);
        for listing in page {
            let want = model
                .markers
                .get(&((*user).to_owned(), listing.name.clone()))
                .copied()
                .unwrap_or(0);
            prop_assert_eq!(
                listing.read_to,
                ChannelSeq(want),
                "{} lists {}",
                user,
                listing.name
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn markers_follow_the_rules_on_every_replica_however_batched(
        ops in prop::collection::vec(arb_op(), 1..60),
        chunks_a in arb_chunks(),
        chunks_b in arb_chunks(),
        cut in any::<prop::sample::Index>(),
    ) {
        let cmds = commands(&ops);
        let log = log_of(&cmds);
        let mut model = Model::default();
        let want: Vec<ChatResponse> = cmds.iter().map(|c| model.apply(c)).collect();

        let mut a = Replica::new(2);
        let b = Replica::new(1000);
        prop_assert_eq!(apply_log(a.state(), &log, 1, &chunks_a), want.clone());
        prop_assert_eq!(apply_log(b.state(), &log, 1, &chunks_b), want);
        check_against(&a, &model)?;
        check_against(&b, &model)?;
        prop_assert_eq!(a.dump(), b.dump());

        let dump = a.dump();
        a.restart();
        prop_assert_eq!(a.dump(), dump.clone());
        check_against(&a, &model)?;

        let cut = cut.index(log.len() + 1);
        let src = Replica::new(3);
        apply_log(src.state(), &log[..cut], 1, &[1]);
        let path = src.dir.path().join("snap.bin");
        src.state().build_snapshot(&path).expect("build");
        let dst = Replica::new(3);
        dst.state().install_snapshot(&path).expect("install");
        apply_log(dst.state(), &log[cut..], cut as u64 + 1, &chunks_a);
        prop_assert_eq!(dst.dump(), dump);
        check_against(&dst, &model)?;
    }
}

/// An entry over the bound is refused whole and moves nothing.
#[test]
fn an_oversized_entry_is_refused_whole() {
    let replica = Replica::new(10);
    let mut log = vec![TestEntry::Cmd(Command::Send(SendCmd {
        channel: "general".into(),
        sender: "Alice".into(),
        body: vec![0, 1],
        client_id: ClientId([1; 16]),
        client_seq: 1,
        at_ms: 1_000,
    }))];
    let mark = ReadMark {
        user: "Alice".into(),
        channel: "general".into(),
        seq: ChannelSeq(1),
    };
    log.push(TestEntry::Cmd(Command::MarkRead(vec![
        mark.clone();
        MAX_BATCH_MARKS + 1
    ])));
    let responses = apply_log(replica.state(), &log, 1, &[2]);
    assert_eq!(
        responses[1],
        ChatResponse::Rejected(RejectReason::BatchTooLarge {
            count: MAX_BATCH_MARKS as u64 + 1,
            max: MAX_BATCH_MARKS as u64,
        })
    );
    let state = replica.state();
    assert_eq!(
        state.read_marker("Alice", "general").unwrap(),
        ChannelSeq(0)
    );
    let responses = apply_log(
        replica.state(),
        &[TestEntry::Cmd(Command::MarkRead(vec![mark]))],
        3,
        &[1],
    );
    assert_eq!(responses, [ChatResponse::Marked(vec![Ok(ChannelSeq(1))])]);
}
