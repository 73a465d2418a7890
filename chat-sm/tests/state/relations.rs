//! Replies, edits, deletes and reactions against a model of the rules in `relation.rs`:
//! responses, stored bodies and metas match the model; replicas batching differently, a
//! restart and a snapshot install all end in the same state; retries are answered once; a
//! deleted body is in no RocksDB file after compaction.

use std::collections::HashMap;

use chat_sm::{
    ChannelSeq, ChatResponse, ClientId, Command, MessageMeta, RejectReason, RelateCmd, Relation,
    SendCmd, Sent, MAX_EDITS,
};
use proptest::prelude::*;

use crate::common::{apply_log, Replica, TestEntry};

const CHANNELS: &[&str] = &["general", "ops"];
const SENDERS: &[&str] = &["Alice", "Bob", "Carol"];
const EMOJI: &[&str] = &["👍", "🎉", "no way", "\u{1b}[2J"];

#[derive(Clone, Debug)]
enum Op {
    Send {
        channel: usize,
        sender: usize,
        format: u8,
    },
    Relate {
        channel: usize,
        sender: usize,
        format: u8,
        kind: u8,
        target: u64,
        emoji: usize,
        on: bool,
    },
    Retry(prop::sample::Index),
}

fn arb_op() -> impl Strategy<Value = Op> {
    let format = prop::sample::select(vec![0u8, 3]);
    prop_oneof![
        3 => (0..CHANNELS.len(), 0..SENDERS.len(), format.clone())
            .prop_map(|(channel, sender, format)| Op::Send { channel, sender, format }),
        6 => (
            0..CHANNELS.len(),
            0..SENDERS.len(),
            format,
            0u8..4,
            0u64..12,
            0..EMOJI.len(),
            any::<bool>(),
        )
            .prop_map(|(channel, sender, format, kind, target, emoji, on)| Op::Relate {
                channel,
                sender,
                format,
                kind,
                target,
                emoji,
                on,
            }),
        1 => any::<prop::sample::Index>().prop_map(Op::Retry),
    ]
}

/// Turns ops into commands, each with a fresh client seq (a retry repeats an earlier one).
fn commands(ops: &[Op]) -> Vec<Command> {
    let mut out: Vec<Command> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let client_seq = i as u64 + 1;
        let send = |channel: usize, sender: usize, body: Vec<u8>| SendCmd {
            channel: CHANNELS[channel].into(),
            sender: SENDERS[sender].into(),
            body,
            client_id: ClientId([sender as u8 + 1; 16]),
            client_seq,
            at_ms: 1_000 + client_seq,
        };
        let cmd = match op {
            Op::Send {
                channel,
                sender,
                format,
            } => Command::Send(send(*channel, *sender, vec![*format, b's', i as u8])),
            Op::Relate {
                channel,
                sender,
                format,
                kind,
                target,
                emoji,
                on,
            } => {
                let target = ChannelSeq(*target);
                let relation = match kind {
                    0 => Relation::Reply { to: target },
                    1 => Relation::Edit { of: target },
                    2 => Relation::Delete { of: target },
                    _ => Relation::React {
                        to: target,
                        emoji: EMOJI[*emoji].into(),
                        on: *on,
                    },
                };
                Command::Relate(RelateCmd {
                    send: send(*channel, *sender, vec![*format, b'r', i as u8]),
                    relation,
                })
            }
            Op::Retry(index) if !out.is_empty() => out[index.index(out.len())].clone(),
            Op::Retry(_) => continue,
        };
        out.push(cmd);
    }
    out
}

#[derive(Clone, Debug)]
struct ModelMessage {
    sender: String,
    body: Vec<u8>,
    meta: MessageMeta,
}

#[derive(Default)]
struct Model {
    channels: HashMap<String, Vec<ModelMessage>>,
    owners: HashMap<String, String>,
    sent: HashMap<(String, [u8; 16], u64), Sent>,
}

impl Model {
    fn apply(&mut self, cmd: &Command) -> ChatResponse {
        let (send, relation) = match cmd {
            Command::Send(send) => (send, None),
            Command::Relate(r) => (&r.send, Some(&r.relation)),
            other => panic!("not generated: {other:?}"),
        };
        let key = (send.sender.clone(), send.client_id.0, send.client_seq);
        if let Some(sent) = self.sent.get(&key) {
            return ChatResponse::Sent(Sent {
                duplicate: true,
                ..sent.clone()
            });
        }
        let messages = self.channels.entry(send.channel.clone()).or_default();
        let seq = messages.len() as u64 + 1;
        if let Some(relation) = relation {
            let owner = self.owners.get(&send.channel);
            if let Err(reason) = relate(messages, owner, send, relation, seq) {
                return ChatResponse::Rejected(reason);
            }
        }
        self.owners
            .entry(send.channel.clone())
            .or_insert_with(|| send.sender.clone());
        let messages = self.channels.get_mut(&send.channel).expect("inserted");
        messages.push(ModelMessage {
            sender: send.sender.clone(),
            body: send.body.clone(),
            meta: MessageMeta {
                relation: relation.cloned(),
                ..MessageMeta::default()
            },
        });
        let sent = Sent {
            channel: send.channel.clone(),
            seq: ChannelSeq(seq),
            at_ms: send.at_ms,
            duplicate: false,
        };
        self.sent.insert(key, sent.clone());
        ChatResponse::Sent(sent)
    }
}

/// The rules of `relation.rs`, written plainly on a vector.
fn relate(
    messages: &mut [ModelMessage],
    owner: Option<&String>,
    send: &SendCmd,
    relation: &Relation,
    seq: u64,
) -> Result<(), RejectReason> {
    if let Relation::React { emoji, .. } = relation {
        if emoji.contains(' ') || emoji.chars().any(char::is_control) {
            return Err(RejectReason::InvalidReaction);
        }
    }
    let at = relation.target().0;
    if at == 0 || at > messages.len() as u64 {
        return Err(RejectReason::NoSuchMessage);
    }
    let target = messages[at as usize - 1].clone();
    if matches!(
        target.meta.relation,
        Some(Relation::Edit { .. } | Relation::Delete { .. } | Relation::React { .. })
    ) {
        return Err(RejectReason::NotATarget);
    }
    if target.meta.deleted {
        return Err(RejectReason::MessageDeleted);
    }
    let mut meta = target.meta.clone();
    match relation {
        Relation::Reply { .. } => meta.replies += 1,
        Relation::Edit { .. } => {
            if target.sender != send.sender {
                return Err(RejectReason::NotSender);
            }
            if target.body[0] != send.body[0] {
                return Err(RejectReason::EditFormatChanged);
            }
            if meta.edits.len() >= MAX_EDITS {
                return Err(RejectReason::TooManyEdits);
            }
            meta.edits.push(ChannelSeq(seq));
        }
        Relation::Delete { .. } => {
            if target.sender != send.sender && owner != Some(&send.sender) {
                return Err(RejectReason::NotSender);
            }
            for edit in &meta.edits {
                let e = &mut messages[edit.0 as usize - 1];
                e.body.clear();
                e.meta.deleted = true;
            }
            messages[at as usize - 1].body.clear();
            meta.deleted = true;
            meta.reactions.clear();
        }
        Relation::React { emoji, on, .. } => {
            let users = meta.reactions.entry(emoji.clone()).or_default();
            if *on && !users.insert(send.sender.clone()) {
                return Err(RejectReason::AlreadyReacted);
            }
            if !*on {
                if !users.remove(&send.sender) {
                    return Err(RejectReason::NotReacted);
                }
                if users.is_empty() {
                    meta.reactions.remove(emoji);
                }
            }
        }
    }
    messages[at as usize - 1].meta = meta;
    Ok(())
}

fn log_of(cmds: &[Command]) -> Vec<TestEntry> {
    cmds.iter().cloned().map(TestEntry::Cmd).collect()
}

/// Every stored message of `r` equals the model's, and edits are attached to their targets.
fn check_against(r: &Replica, model: &Model) -> Result<(), TestCaseError> {
    for (channel, messages) in &model.channels {
        let stored = r
            .state()
            .history(channel, ChannelSeq(1), usize::MAX)
            .expect("read");
        prop_assert_eq!(stored.len(), messages.len(), "{}", channel);
        for (m, want) in stored.iter().zip(messages) {
            prop_assert_eq!(&m.sender, &want.sender);
            prop_assert_eq!(&m.body, &want.body, "{}/{}", channel, m.seq.0);
            prop_assert_eq!(&m.meta, &want.meta, "{}/{}", channel, m.seq.0);
            let newest = want.meta.edits.last().filter(|_| !want.meta.deleted);
            prop_assert_eq!(m.edit.as_ref().map(|e| e.seq), newest.copied());
            if let Some(edit) = &m.edit {
                prop_assert_eq!(&edit.body, &messages[edit.seq.0 as usize - 1].body);
            }
        }
    }
    Ok(())
}

fn arb_chunks() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..6, 1..4)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn relations_follow_the_rules_on_every_replica_however_batched(
        ops in prop::collection::vec(arb_op(), 1..60),
        chunks_a in arb_chunks(),
        chunks_b in arb_chunks(),
        cut in any::<prop::sample::Index>(),
    ) {
        let cmds = commands(&ops);
        let log = log_of(&cmds);
        let mut model = Model::default();
        let want: Vec<ChatResponse> = cmds.iter().map(|c| model.apply(c)).collect();

        // A small ring sends most target lookups to RocksDB, a large one keeps them in memory.
        let mut a = Replica::new(2);
        let b = Replica::new(1000);
        prop_assert_eq!(apply_log(a.state(), &log, 1, &chunks_a), want.clone());
        prop_assert_eq!(apply_log(b.state(), &log, 1, &chunks_b), want);
        check_against(&a, &model)?;
        check_against(&b, &model)?;
        prop_assert_eq!(a.dump(), b.dump());
        a.state().check_consistency().expect("consistent");
        b.state().check_consistency().expect("consistent");

        let dump = a.dump();
        a.restart();
        prop_assert_eq!(a.dump(), dump.clone());
        check_against(&a, &model)?;

        // A snapshot taken part way, then the rest of the log, ends in the same state.
        let cut = cut.index(log.len() + 1);
        let src = Replica::new(3);
        apply_log(src.state(), &log[..cut], 1, &[1]);
        let path = src.dir.path().join("snap.bin");
        src.state().build_snapshot(&path).expect("build");
        let dst = Replica::new(3);
        dst.state().install_snapshot(&path).expect("install");
        apply_log(dst.state(), &log[cut..], cut as u64 + 1, &chunks_a);
        prop_assert_eq!(dst.dump(), dump);
        dst.state().check_consistency().expect("consistent");
    }
}

fn relate_cmd(sender: &str, client_seq: u64, body: &[u8], relation: Relation) -> Command {
    Command::Relate(RelateCmd {
        send: send_cmd(sender, client_seq, body),
        relation,
    })
}

fn send_cmd(sender: &str, client_seq: u64, body: &[u8]) -> SendCmd {
    SendCmd {
        channel: "general".into(),
        sender: sender.into(),
        body: body.to_vec(),
        client_id: ClientId([sender.len() as u8; 16]),
        client_seq,
        at_ms: 5_000 + client_seq,
    }
}

fn files_containing(dir: &std::path::Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if std::fs::read(&path)
                .expect("read")
                .windows(needle.len())
                .any(|w| w == needle)
            {
                found.push(path);
            }
        }
    }
    found
}

#[test]
fn a_deleted_body_and_its_edits_are_in_no_file_after_compaction() {
    let r = Replica::new(1000);
    let secret = b"\x00the launch code is 0000";
    let edited = b"\x00the launch code is 1234";
    let control = b"\x00a control message that stays";
    let log = log_of(&[
        Command::Send(send_cmd("Alice", 1, secret)),
        relate_cmd("Alice", 2, edited, Relation::Edit { of: ChannelSeq(1) }),
        Command::Send(send_cmd("Alice", 3, control)),
    ]);
    apply_log(r.state(), &log, 1, &[1]);
    r.state().compact().expect("compact");
    assert!(
        !files_containing(r.dir.path(), secret).is_empty(),
        "the test sees stored bodies"
    );
    assert!(!files_containing(r.dir.path(), edited).is_empty());

    // Bob may not delete it; Alice may. Bob owns nothing: Alice's first send made her owner.
    let delete = log_of(&[
        relate_cmd("Bob", 1, b"\x02", Relation::Delete { of: ChannelSeq(1) }),
        relate_cmd("Alice", 4, b"\x02", Relation::Delete { of: ChannelSeq(1) }),
        relate_cmd(
            "Alice",
            5,
            b"\x00again",
            Relation::Edit { of: ChannelSeq(1) },
        ),
    ]);
    let responses = apply_log(r.state(), &delete, 4, &[3]);
    assert_eq!(
        responses[0],
        ChatResponse::Rejected(RejectReason::NotSender)
    );
    assert!(matches!(&responses[1], ChatResponse::Sent(s) if s.seq == ChannelSeq(4)));
    assert_eq!(
        responses[2],
        ChatResponse::Rejected(RejectReason::MessageDeleted)
    );

    let history = r
        .state()
        .history("general", ChannelSeq(1), 10)
        .expect("read");
    assert!(history[0].body.is_empty() && history[0].meta.deleted && history[0].edit.is_none());
    assert!(history[1].body.is_empty() && history[1].meta.deleted);
    assert_eq!(history[2].body, control);
    r.state().compact().expect("compact");
    assert_eq!(
        files_containing(r.dir.path(), secret),
        Vec::<std::path::PathBuf>::new()
    );
    assert_eq!(
        files_containing(r.dir.path(), edited),
        Vec::<std::path::PathBuf>::new()
    );
    assert!(!files_containing(r.dir.path(), control).is_empty());
}

fn topic(by: &str, topic: Option<&str>) -> Command {
    Command::Channel {
        channel: "general".into(),
        by: by.into(),
        op: chat_sm::ChannelOp::SetTopic(topic.map(str::to_owned)),
    }
}

#[test]
fn only_the_owner_sets_a_topic_and_it_survives_a_restart_and_a_snapshot() {
    let mut r = Replica::new(10);
    let long = "x".repeat(chat_sm::MAX_TOPIC_BYTES + 1);
    let log = log_of(&[
        Command::Send(send_cmd("Alice", 1, b"\x00hi")),
        topic("Bob", Some("bob was here")),
        topic("Alice", Some(&long)),
        topic("Alice", Some("two\nlines")),
        topic("Alice", Some("release 1.2: freeze on Friday")),
    ]);
    let responses = apply_log(r.state(), &log, 1, &[2]);
    assert_eq!(responses[1], ChatResponse::Rejected(RejectReason::NotOwner));
    assert_eq!(
        responses[2],
        ChatResponse::Rejected(RejectReason::InvalidTopic)
    );
    assert_eq!(
        responses[3],
        ChatResponse::Rejected(RejectReason::InvalidTopic)
    );
    assert_eq!(responses[4], ChatResponse::ChannelUpdated);
    let want = Some("release 1.2: freeze on Friday".to_owned());
    assert_eq!(r.state().topic("general"), want);
    r.state().check_consistency().expect("consistent");
    r.restart();
    assert_eq!(r.state().topic("general"), want);
    let path = r.dir.path().join("snap.bin");
    r.state().build_snapshot(&path).expect("build");
    let copy = Replica::new(10);
    copy.state().install_snapshot(&path).expect("install");
    assert_eq!(copy.state().topic("general"), want);
    assert_eq!(copy.dump(), r.dump());
    // Clearing it removes it.
    apply_log(r.state(), &log_of(&[topic("Alice", None)]), 6, &[1]);
    assert_eq!(r.state().topic("general"), None);
    r.state().check_consistency().expect("consistent");
}
