//! Property tests over random logs: replicas agree, snapshot plus suffix equals full replay,
//! responses match a simple model (exactly-once, dense seqs), restart preserves everything,
//! rejected commands change nothing but meta, and decoding arbitrary bytes never panics.
//! Channel records (private channels, members, invitations) are part of every log.

use std::collections::{BTreeSet, HashMap};
use std::sync::LazyLock;

use chat_sm::{
    ChannelOp, ChannelRecord, ChannelSeq, ChatResponse, ClientId, Command, JoinSecret,
    RejectReason, SendCmd, Sent, MAX_BODY_BYTES, MAX_CRYPTO_RECORD_BYTES, MAX_DIRECT_CRYPTO_BYTES,
    MAX_DIRECT_MEMBERS,
};
use proptest::prelude::*;

use crate::common::{apply_log, Replica, TestEntry};

const CHANNELS: &[&str] = &["general", "a-b", "x_1", "Bad", "", "-x"];
const SENDERS: &[&str] = &["Alice", "bob_2", "bad name"];
const USERS: &[&str] = &["alice", "bob_2", "no name"];
const INVITEES: &[&str] = &["alice", "bob_2", "Alice", "nobody"];

fn arb_channel_op() -> impl Strategy<Value = ChannelOp> {
    let crypto = prop_oneof![
        4 => prop::collection::vec(any::<u8>(), 1..4),
        1 => Just(vec![7u8; MAX_CRYPTO_RECORD_BYTES + 1]),
    ];
    prop_oneof![
        3 => (any::<bool>(), prop::option::of(crypto.clone()))
            .prop_map(|(private, crypto)| ChannelOp::Create { private, crypto }),
        1 => crypto.prop_map(ChannelOp::SetCrypto),
        3 => prop::sample::select(INVITEES).prop_map(|u| ChannelOp::Invite(u.into())),
        2 => Just(ChannelOp::Accept),
        2 => prop::sample::select(INVITEES).prop_map(|u| ChannelOp::Remove(u.into())),
    ]
}

/// The direct conversation of alice and bob_2, which logs write to, change and create.
static DM: LazyLock<String> = LazyLock::new(|| chat_sm::direct_channel_name(&["alice", "bob_2"]));

/// A channel name, sometimes the direct conversation's.
fn arb_channel(names: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(names).prop_map(str::to_owned),
        1 => Just(DM.clone()),
    ]
}

/// Creates of direct conversations: members drawn with repeats and bad names, named after
/// them most of the time, by a member or not, with a record that fits or not.
fn arb_direct_cmd() -> impl Strategy<Value = Command> {
    let members = prop_oneof![
        2 => Just(vec!["alice", "bob_2"]),
        1 => Just(vec!["bob_2", "alice"]),
        3 => prop::collection::vec(prop::sample::select(INVITEES), 0..4),
    ];
    (
        members,
        prop::sample::select(&["alice", "bob_2", "Alice"][..]),
        prop_oneof![4 => Just(true), 1 => Just(false)],
        prop_oneof![4 => 1usize..64, 1 => Just(MAX_DIRECT_CRYPTO_BYTES + 1)],
    )
        .prop_map(|(members, by, named, crypto_len)| Command::Channel {
            channel: if named {
                chat_sm::direct_channel_name(&members)
            } else {
                DM.clone()
            },
            by: by.into(),
            op: ChannelOp::CreateDirect {
                members: members.iter().map(|m| m.to_string()).collect(),
                crypto: vec![5; crypto_len],
            },
        })
}

fn arb_channel_cmd() -> impl Strategy<Value = Command> {
    (
        arb_channel(&["general", "x_1", "Bad"]),
        prop::sample::select(&["Alice", "bob_2", "alice", "bad name"][..]),
        arb_channel_op(),
    )
        .prop_map(|(channel, by, op)| Command::Channel {
            channel,
            by: by.into(),
            op,
        })
}

fn arb_send() -> impl Strategy<Value = SendCmd> {
    (
        arb_channel(CHANNELS),
        prop::sample::select(SENDERS),
        prop_oneof![8 => 1usize..24, 1 => Just(0usize), 1 => Just(MAX_BODY_BYTES + 1)],
        0u8..3,
        0u64..6,
        0u64..1_000,
    )
        .prop_map(
            |(channel, sender, body_len, client, client_seq, at_ms)| SendCmd {
                channel,
                sender: sender.into(),
                body: vec![client ^ (client_seq as u8); body_len],
                client_id: ClientId([client; 16]),
                client_seq,
                at_ms,
            },
        )
}

fn arb_entry() -> impl Strategy<Value = TestEntry> {
    prop_oneof![
        6 => arb_send().prop_map(|s| TestEntry::Cmd(Command::Send(s))),
        4 => prop::collection::vec(arb_send(), 0..6)
            .prop_map(|v| TestEntry::Cmd(Command::SendBatch(v))),
        2 => (prop::sample::select(USERS), 0u8..2).prop_map(|(n, k)| {
            TestEntry::Cmd(Command::RegisterUser { name: n.into(), public_key: [k; 32] })
        }),
        1 => prop_oneof![Just(0usize), 15usize..18, 63usize..66].prop_map(|len| {
            TestEntry::Cmd(Command::SetJoinSecret(JoinSecret(vec![len as u8; len])))
        }),
        4 => arb_channel_cmd().prop_map(TestEntry::Cmd),
        3 => arb_direct_cmd().prop_map(TestEntry::Cmd),
        1 => Just(TestEntry::Blank),
        1 => any::<u8>().prop_map(|b| TestEntry::Membership(vec![b])),
        1 => Just(TestEntry::Malformed),
    ]
}

fn arb_log() -> impl Strategy<Value = Vec<TestEntry>> {
    prop::collection::vec(arb_entry(), 1..40)
}

fn arb_chunks() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..6, 1..4)
}

fn name_ok(n: &str, first_alnum: bool) -> bool {
    !n.is_empty()
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && (!first_alnum || n.as_bytes()[0].is_ascii_alphanumeric())
}

fn channel_ok(channel: &str) -> bool {
    name_ok(channel, true) && !channel.bytes().any(|b| b.is_ascii_uppercase())
}

/// The channel-op rules of `chat-sm/src/channel.rs`, written out plainly.
fn model_channel_op(
    records: &mut HashMap<String, ChannelRecord>,
    heads: &HashMap<String, u64>,
    users: &HashMap<String, [u8; 32]>,
    (channel, by, op): (&str, &str, &ChannelOp),
) -> Result<(), RejectReason> {
    if !channel_ok(channel) {
        return Err(RejectReason::InvalidChannel);
    }
    if !name_ok(by, false) {
        return Err(RejectReason::InvalidSender);
    }
    if let ChannelOp::CreateDirect { members, crypto } = op {
        let set: BTreeSet<String> = members.iter().cloned().collect();
        if set.len() != members.len()
            || !(2..=MAX_DIRECT_MEMBERS).contains(&set.len())
            || !set.contains(by)
            || !set.iter().all(|m| name_ok(m, false))
            || chat_sm::direct_channel_name(members) != channel
        {
            return Err(RejectReason::InvalidDirect);
        }
        if crypto.len() > MAX_DIRECT_CRYPTO_BYTES {
            return Err(RejectReason::CryptoTooLarge {
                len: crypto.len() as u64,
            });
        }
        if !set.iter().all(|m| users.contains_key(m)) {
            return Err(RejectReason::UnknownUser);
        }
        if records.contains_key(channel) || heads.get(channel).is_some_and(|&h| h > 0) {
            return Err(RejectReason::ChannelExists);
        }
        let record = ChannelRecord {
            owner: Some(by.into()),
            private: true,
            members: set,
            invited: BTreeSet::new(),
            crypto: Some(crypto.clone()),
        };
        records.insert(channel.into(), record);
        return Ok(());
    }
    if channel.starts_with("dm-") {
        return Err(RejectReason::DirectChannel);
    }
    if let ChannelOp::Create {
        crypto: Some(c), ..
    }
    | ChannelOp::SetCrypto(c) = op
    {
        if c.len() > MAX_CRYPTO_RECORD_BYTES {
            return Err(RejectReason::CryptoTooLarge {
                len: c.len() as u64,
            });
        }
    }
    let current = records.get(channel).cloned();
    let owner = |r: &ChannelRecord| r.owner.as_deref() == Some(by);
    let record = match op {
        ChannelOp::Create { private, crypto } => {
            if current.is_some() || (*private && heads.get(channel).is_some_and(|&h| h > 0)) {
                return Err(RejectReason::ChannelExists);
            }
            ChannelRecord {
                owner: Some(by.into()),
                private: *private,
                members: if *private {
                    BTreeSet::from([by.to_owned()])
                } else {
                    BTreeSet::new()
                },
                invited: BTreeSet::new(),
                crypto: crypto.clone(),
            }
        }
        ChannelOp::SetCrypto(c) => match current {
            Some(r) if owner(&r) => {
                if r.crypto.is_some() {
                    return Err(RejectReason::CryptoAlreadySet);
                }
                ChannelRecord {
                    crypto: Some(c.clone()),
                    ..r
                }
            }
            _ => return Err(RejectReason::NotOwner),
        },
        ChannelOp::Invite(user) | ChannelOp::Remove(user)
            if !current.as_ref().is_some_and(|r| r.private) =>
        {
            let _ = user;
            return Err(RejectReason::NotPrivate);
        }
        ChannelOp::Accept if !current.as_ref().is_some_and(|r| r.private) => {
            return Err(RejectReason::NotPrivate);
        }
        ChannelOp::Invite(user) => {
            let mut r = current.expect("private checked");
            if !owner(&r) {
                return Err(RejectReason::NotOwner);
            }
            if !users.contains_key(user) {
                return Err(RejectReason::UnknownUser);
            }
            if !r.members.contains(user) {
                r.invited.insert(user.clone());
            }
            r
        }
        ChannelOp::Accept => {
            let mut r = current.expect("private checked");
            if !r.members.contains(by) {
                if !r.invited.remove(by) {
                    return Err(RejectReason::NotInvited);
                }
                r.members.insert(by.into());
            }
            r
        }
        ChannelOp::SetRetention(_) => unreachable!("not generated here: see retention.rs"),
        ChannelOp::SetTopic(_) => unreachable!("not generated here: see relations.rs"),
        ChannelOp::CreateDirect { .. } => unreachable!("handled above"),
        ChannelOp::Remove(user) => {
            let mut r = current.expect("private checked");
            if r.owner.as_deref() == Some(user.as_str()) {
                return Err(RejectReason::OwnerCannotLeave);
            }
            if !owner(&r) && by != user {
                return Err(RejectReason::NotOwner);
            }
            r.members.remove(user);
            r.invited.remove(user);
            r
        }
    };
    records.insert(channel.into(), record);
    Ok(())
}

/// The expected responses, from a model that is obviously right: a map of dedup keys, a map
/// of heads and a map of channel records.
fn model(log: &[TestEntry]) -> Vec<ChatResponse> {
    let mut heads: HashMap<String, u64> = HashMap::new();
    let mut dedup: HashMap<(String, ClientId, u64), Sent> = HashMap::new();
    let mut users: HashMap<String, [u8; 32]> = HashMap::new();
    let mut records: HashMap<String, ChannelRecord> = HashMap::new();
    let send = |heads: &mut HashMap<String, u64>,
                records: &mut HashMap<String, ChannelRecord>,
                dedup: &mut HashMap<(String, ClientId, u64), Sent>,
                s: &SendCmd|
     -> Result<Sent, RejectReason> {
        if !channel_ok(&s.channel) {
            return Err(RejectReason::InvalidChannel);
        }
        if !name_ok(&s.sender, false) {
            return Err(RejectReason::InvalidSender);
        }
        if s.body.is_empty() {
            return Err(RejectReason::EmptyBody);
        }
        if s.body.len() > MAX_BODY_BYTES {
            return Err(RejectReason::BodyTooLarge {
                len: s.body.len() as u64,
                max: MAX_BODY_BYTES as u64,
            });
        }
        let key = (s.sender.clone(), s.client_id, s.client_seq);
        if let Some(orig) = dedup.get(&key) {
            return Ok(Sent {
                duplicate: true,
                ..orig.clone()
            });
        }
        match records.get(&s.channel) {
            Some(r) if r.private && !r.members.contains(&s.sender) => {
                return Err(RejectReason::NotMember)
            }
            Some(_) => {}
            None if heads.get(&s.channel).is_some_and(|&h| h > 0) => {}
            None if s.channel.starts_with("dm-") => return Err(RejectReason::DirectChannel),
            None => {
                let record = ChannelRecord {
                    owner: Some(s.sender.clone()),
                    ..ChannelRecord::default()
                };
                records.insert(s.channel.clone(), record);
            }
        }
        let head = heads.entry(s.channel.clone()).or_insert(0);
        *head += 1;
        let sent = Sent {
            channel: s.channel.clone(),
            seq: ChannelSeq(*head),
            at_ms: s.at_ms,
            duplicate: false,
        };
        dedup.insert(key, sent.clone());
        Ok(sent)
    };
    let mut out = Vec::new();
    for e in log {
        out.push(match e {
            TestEntry::Blank | TestEntry::Membership(_) => ChatResponse::None,
            TestEntry::Malformed => ChatResponse::Rejected(RejectReason::Malformed),
            TestEntry::Cmd(Command::Send(s)) => {
                match send(&mut heads, &mut records, &mut dedup, s) {
                    Ok(sent) => ChatResponse::Sent(sent),
                    Err(r) => ChatResponse::Rejected(r),
                }
            }
            TestEntry::Cmd(Command::SendBatch(v)) => ChatResponse::Batch(
                v.iter()
                    .map(|s| send(&mut heads, &mut records, &mut dedup, s))
                    .collect(),
            ),
            TestEntry::Cmd(Command::Channel { channel, by, op }) => {
                match model_channel_op(&mut records, &heads, &users, (channel, by, op)) {
                    Ok(()) => ChatResponse::ChannelUpdated,
                    Err(r) => ChatResponse::Rejected(r),
                }
            }
            TestEntry::Cmd(Command::Expire { .. } | Command::SetDefaultRetention(_)) => {
                unreachable!("not generated here: see retention.rs")
            }
            TestEntry::Cmd(Command::Relate(_)) => {
                unreachable!("not generated here: see relations.rs")
            }
            TestEntry::Cmd(Command::MarkRead(_)) => {
                unreachable!("not generated here: see markers.rs")
            }
            TestEntry::Cmd(Command::SetJoinSecret(secret)) => {
                if (16..=64).contains(&secret.0.len()) {
                    ChatResponse::JoinSecretSet
                } else {
                    let len = secret.0.len() as u64;
                    ChatResponse::Rejected(RejectReason::InvalidJoinSecret { len })
                }
            }
            TestEntry::Cmd(Command::RegisterUser { name, public_key }) => {
                if name.contains(' ') {
                    ChatResponse::Rejected(RejectReason::InvalidUserName)
                } else {
                    match users.get(name) {
                        Some(k) if k != public_key => {
                            ChatResponse::Rejected(RejectReason::NameTaken)
                        }
                        _ => {
                            users.insert(name.clone(), *public_key);
                            ChatResponse::Registered
                        }
                    }
                }
            }
        });
    }
    out
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 24,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn responses_match_model_and_seqs_stay_dense(log in arb_log(), chunks in arb_chunks()) {
        let r = Replica::new(3);
        let responses = apply_log(r.state(), &log, 1, &chunks);
        prop_assert_eq!(responses, model(&log));
        r.state().check_consistency().expect("consistent");
        let last_secret = log.iter().rev().find_map(|e| match e {
            TestEntry::Cmd(Command::SetJoinSecret(s)) if (16..=64).contains(&s.0.len()) => {
                Some(s.0.clone())
            }
            _ => None,
        });
        prop_assert_eq!(r.state().join_secret(), last_secret);
        for (channel, head) in r.state().channels() {
            let msgs = r.state().history(&channel, ChannelSeq(1), usize::MAX).expect("read");
            let seqs: Vec<u64> = msgs.iter().map(|m| m.seq.0).collect();
            prop_assert_eq!(seqs, (1..=head.0).collect::<Vec<_>>());
        }
    }

    #[test]
    fn replicas_with_different_batching_agree(
        log in arb_log(),
        chunks_a in arb_chunks(),
        chunks_b in arb_chunks(),
    ) {
        let a = Replica::new(3);
        let b = Replica::new(3);
        let ra = apply_log(a.state(), &log, 1, &chunks_a);
        let rb = apply_log(b.state(), &log, 1, &chunks_b);
        prop_assert_eq!(ra, rb);
        prop_assert_eq!(a.dump(), b.dump());
    }

    #[test]
    fn snapshot_plus_suffix_equals_full_replay(
        log in arb_log(),
        cut in any::<prop::sample::Index>(),
        chunks in arb_chunks(),
    ) {
        let cut = cut.index(log.len() + 1);
        let full = Replica::new(3);
        let full_responses = apply_log(full.state(), &log, 1, &[1]);

        let src = Replica::new(3);
        apply_log(src.state(), &log[..cut], 1, &chunks);
        let path = src.dir.path().join("snap.bin");
        src.state().build_snapshot(&path).expect("build");
        let dst = Replica::new(3);
        dst.state().install_snapshot(&path).expect("install");
        let suffix = apply_log(dst.state(), &log[cut..], cut as u64 + 1, &[1]);
        prop_assert_eq!(&suffix[..], &full_responses[cut..]);
        prop_assert_eq!(dst.dump(), full.dump());
        dst.state().check_consistency().expect("consistent");
    }

    #[test]
    fn restart_preserves_everything(log in arb_log(), chunks in arb_chunks()) {
        let mut r = Replica::new(2);
        apply_log(r.state(), &log, 1, &chunks);
        let dump = r.dump();
        let channels = r.state().channels();
        let recent: Vec<_> = channels
            .iter()
            .map(|(c, _)| r.state().history_before(c, ChannelSeq(u64::MAX), 5).expect("read"))
            .collect();
        r.restart();
        prop_assert_eq!(r.dump(), dump);
        prop_assert_eq!(r.state().channels(), channels.clone());
        for ((c, _), before) in channels.iter().zip(recent) {
            let after = r.state().history_before(c, ChannelSeq(u64::MAX), 5).expect("read");
            prop_assert_eq!(after, before);
        }
        r.state().check_consistency().expect("rings rebuilt");
    }

    #[test]
    fn rejected_commands_change_nothing_but_meta(log in arb_log(), bad in arb_send()) {
        let r = Replica::new(3);
        apply_log(r.state(), &log, 1, &[2]);
        // Seed a registration so that a NameTaken is possible.
        apply_log(r.state(), &[TestEntry::Cmd(Command::RegisterUser {
            name: "zed".into(), public_key: [0; 32] })], log.len() as u64 + 1, &[1]);
        let strip = |d: String| d.lines().filter(|l| !l.starts_with("meta ")).map(String::from).collect::<Vec<_>>();
        let before = strip(r.dump());
        let mut invalid = bad.clone();
        invalid.channel = "Not-valid".into();
        let mut empty = bad;
        empty.body.clear();
        let rejects = [
            TestEntry::Cmd(Command::Send(invalid.clone())),
            TestEntry::Cmd(Command::SendBatch(vec![invalid, empty])),
            TestEntry::Cmd(Command::RegisterUser { name: "zed".into(), public_key: [1; 32] }),
            TestEntry::Cmd(Command::RegisterUser { name: "no name".into(), public_key: [1; 32] }),
            TestEntry::Malformed,
        ];
        let responses = apply_log(r.state(), &rejects, log.len() as u64 + 2, &[2]);
        for resp in responses {
            let ok = match resp {
                ChatResponse::Rejected(_) => true,
                ChatResponse::Batch(v) => v.iter().all(|x| x.is_err()),
                _ => false,
            };
            prop_assert!(ok);
        }
        prop_assert_eq!(strip(r.dump()), before);
    }

    #[test]
    fn decode_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ignored = Command::decode(&bytes);
        let mut versioned = vec![chat_sm::COMMAND_VERSION];
        versioned.extend_from_slice(&bytes);
        if let Ok(cmd) = Command::decode(&versioned) {
            prop_assert_eq!(Command::decode(&cmd.encode()).expect("re-decode"), cmd);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn damaged_snapshot_never_installs(
        log in arb_log(),
        at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
        truncate in any::<bool>(),
    ) {
        let src = Replica::new(3);
        apply_log(src.state(), &log, 1, &[2]);
        let path = src.dir.path().join("snap.bin");
        src.state().build_snapshot(&path).expect("build");
        let mut bytes = std::fs::read(&path).expect("read");
        let at = at.index(bytes.len());
        if truncate {
            bytes.truncate(at);
        } else {
            bytes[at] ^= flip;
        }
        std::fs::write(&path, &bytes).expect("write");
        let dst = Replica::new(3);
        let before = dst.dump();
        prop_assert!(dst.state().install_snapshot(&path).is_err());
        prop_assert_eq!(dst.dump(), before);
        prop_assert_eq!(dst.state().applied_index(), None);
    }
}
