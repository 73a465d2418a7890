//! Property tests over random logs: replicas agree, snapshot plus suffix equals full replay,
//! responses match a simple model (exactly-once, dense seqs), restart preserves everything,
//! rejected commands change nothing but meta, and decoding arbitrary bytes never panics.

use std::collections::HashMap;

use chat_sm::{
    ChannelSeq, ChatResponse, ClientId, Command, JoinSecret, RejectReason, SendCmd, Sent,
    MAX_BODY_BYTES,
};
use proptest::prelude::*;

use crate::common::{apply_log, Replica, TestEntry};

const CHANNELS: &[&str] = &["general", "a-b", "x_1", "Bad", "", "-x"];
const SENDERS: &[&str] = &["Alice", "bob_2", "bad name"];
const USERS: &[&str] = &["alice", "bob", "no name"];

fn arb_send() -> impl Strategy<Value = SendCmd> {
    (
        prop::sample::select(CHANNELS),
        prop::sample::select(SENDERS),
        prop_oneof![8 => 1usize..24, 1 => Just(0usize), 1 => Just(MAX_BODY_BYTES + 1)],
        0u8..3,
        0u64..6,
        0u64..1_000,
    )
        .prop_map(
            |(channel, sender, body_len, client, client_seq, at_ms)| SendCmd {
                channel: channel.into(),
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

/// The expected responses, from a model that is obviously right: a map of dedup keys and a
/// map of heads.
fn model(log: &[TestEntry]) -> Vec<ChatResponse> {
    let mut heads: HashMap<String, u64> = HashMap::new();
    let mut dedup: HashMap<(String, ClientId, u64), Sent> = HashMap::new();
    let mut users: HashMap<String, [u8; 32]> = HashMap::new();
    let mut send = |s: &SendCmd| -> Result<Sent, RejectReason> {
        let name_ok = |n: &str, first_alnum: bool| {
            !n.is_empty()
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && (!first_alnum || n.as_bytes()[0].is_ascii_alphanumeric())
        };
        if !name_ok(&s.channel, true) || s.channel.bytes().any(|b| b.is_ascii_uppercase()) {
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
            TestEntry::Cmd(Command::Send(s)) => match send(s) {
                Ok(sent) => ChatResponse::Sent(sent),
                Err(r) => ChatResponse::Rejected(r),
            },
            TestEntry::Cmd(Command::SendBatch(v)) => {
                ChatResponse::Batch(v.iter().map(&mut send).collect())
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
