//! Scenario tests: each one builds a small log by hand and checks responses and reads.

use std::sync::{Arc, Mutex};

use chat_sm::{
    ApplyEntry, ApplyPayload, ChannelOp, ChannelSeq, ChatResponse, Command, LogIndex, RaftMeta,
    RejectReason, Sent, MAX_BATCH_SENDS, MAX_BODY_BYTES,
};

use crate::common::{apply, apply_log, send, Replica, TestEntry};

fn sent(channel: &str, seq: u64, at_ms: u64, duplicate: bool) -> Sent {
    Sent {
        channel: channel.into(),
        seq: ChannelSeq(seq),
        at_ms,
        duplicate,
    }
}

#[test]
fn sends_get_dense_seqs_per_channel() {
    let r = Replica::new(1000);
    let log = [
        TestEntry::Cmd(Command::Send(send("general", "Alice", b"hi", 1, 1))),
        TestEntry::Cmd(Command::Send(send("random", "Bob", b"yo", 2, 1))),
        TestEntry::Cmd(Command::Send(send("general", "Bob", b"hey", 2, 2))),
    ];
    let responses = apply_log(r.state(), &log, 1, &[2]);
    assert_eq!(
        responses,
        vec![
            ChatResponse::Sent(sent("general", 1, 1001, false)),
            ChatResponse::Sent(sent("random", 1, 1001, false)),
            ChatResponse::Sent(sent("general", 2, 1002, false)),
        ]
    );
    assert_eq!(r.state().head("general"), ChannelSeq(2));
    assert_eq!(r.state().head("nope"), ChannelSeq(0));
    assert_eq!(
        r.state().channels(),
        vec![
            ("general".into(), ChannelSeq(2)),
            ("random".into(), ChannelSeq(1))
        ]
    );
    assert_eq!(r.state().applied_index(), Some(LogIndex(3)));
    assert_eq!(r.state().last_applied(), Some(3u64.to_be_bytes().to_vec()));
    r.state().check_consistency().expect("consistent");
}

#[test]
fn retry_in_same_batch_and_later_batch_answers_original() {
    let mut r = Replica::new(1000);
    let first = send("general", "Alice", b"hi", 1, 7);
    let mut retry = first.clone();
    retry.at_ms = 99_999; // a retry proposed later carries a later time
    let batch = Command::SendBatch(vec![first.clone(), retry.clone()]);
    let responses = apply_log(r.state(), &[TestEntry::Cmd(batch)], 1, &[1]);
    assert_eq!(
        responses,
        vec![ChatResponse::Batch(vec![
            Ok(sent("general", 1, 1007, false)),
            Ok(sent("general", 1, 1007, true)),
        ])]
    );
    let again = apply_log(
        r.state(),
        &[TestEntry::Cmd(Command::Send(retry.clone()))],
        2,
        &[1],
    );
    assert_eq!(
        again,
        vec![ChatResponse::Sent(sent("general", 1, 1007, true))]
    );
    r.restart();
    let after = apply_log(r.state(), &[TestEntry::Cmd(Command::Send(retry))], 3, &[1]);
    assert_eq!(
        after,
        vec![ChatResponse::Sent(sent("general", 1, 1007, true))]
    );
    assert_eq!(r.state().head("general"), ChannelSeq(1));
    r.state().check_consistency().expect("consistent");
}

/// Retries of client seqs below the highest one applied for their client (the case where
/// `apply` must look the dedup record up rather than trust the in-memory high-water mark),
/// with several clients interleaved, before and after a restart and a snapshot install.
#[test]
fn retry_of_older_client_seq_answers_original_after_restart_and_install() {
    let mut r = Replica::new(1000);
    let mut log = Vec::new();
    for client_seq in 1..=6u64 {
        for client in [3u8, 1, 2] {
            let channel = if client == 2 { "random" } else { "general" };
            log.push(TestEntry::Cmd(Command::Send(send(
                channel, "Alice", b"m", client, client_seq,
            ))));
        }
    }
    let first = apply_log(r.state(), &log, 1, &[5, 13]);
    let retries = [(1u8, 2u64), (3, 6), (2, 1), (3, 1)];
    let expected = |replica: &Replica, first_index: u64| {
        let entries: Vec<TestEntry> = retries
            .iter()
            .map(|&(client, client_seq)| {
                let channel = if client == 2 { "random" } else { "general" };
                TestEntry::Cmd(Command::Send(send(
                    channel, "Alice", b"m", client, client_seq,
                )))
            })
            .collect();
        let got = apply_log(replica.state(), &entries, first_index, &[4]);
        for (response, &(client, client_seq)) in got.iter().zip(&retries) {
            let position = (client_seq as usize - 1) * 3 + [1, 2, 0][client as usize - 1];
            let ChatResponse::Sent(original) = &first[position] else {
                panic!("send {position} was accepted");
            };
            let ChatResponse::Sent(retried) = response else {
                panic!("retry answered {response:?}");
            };
            assert_eq!(
                (
                    &retried.channel,
                    retried.seq,
                    retried.at_ms,
                    retried.duplicate
                ),
                (&original.channel, original.seq, original.at_ms, true),
                "client {client} seq {client_seq}"
            );
        }
    };
    expected(&r, 19);
    r.restart();
    expected(&r, 23);
    // A new client seq above the mark is still new after the restart.
    let fresh = apply_log(
        r.state(),
        &[TestEntry::Cmd(Command::Send(send(
            "general", "Alice", b"m", 1, 7,
        )))],
        27,
        &[1],
    );
    assert_eq!(
        fresh,
        vec![ChatResponse::Sent(sent("general", 13, 1007, false))]
    );
    let snapshot = r.dir.path().join("snap");
    r.state().build_snapshot(&snapshot).expect("build");
    let other = Replica::new(1000);
    other.state().install_snapshot(&snapshot).expect("install");
    expected(&other, 28);
    assert_eq!(other.state().head("general"), ChannelSeq(13));
    r.state().check_consistency().expect("consistent");
    other.state().check_consistency().expect("consistent");
}

#[test]
fn register_user_is_trust_on_first_use() {
    let mut r = Replica::new(1000);
    let reg = |name: &str, key: u8| {
        TestEntry::Cmd(Command::RegisterUser {
            name: name.into(),
            public_key: [key; 32],
        })
    };
    let log = [
        reg("alice", 1),
        reg("alice", 2),
        reg("alice", 1),
        reg("bad name", 1),
        reg("bob", 3),
    ];
    // The first two land in one apply call: the pending registration must be seen.
    let responses = apply_log(r.state(), &log, 1, &[2, 3]);
    assert_eq!(
        responses,
        vec![
            ChatResponse::Registered,
            ChatResponse::Rejected(RejectReason::NameTaken),
            ChatResponse::Registered,
            ChatResponse::Rejected(RejectReason::InvalidUserName),
            ChatResponse::Registered,
        ]
    );
    r.restart();
    assert_eq!(r.state().user_key("alice"), Some([1; 32]));
    assert_eq!(r.state().user_key("bob"), Some([3; 32]));
    assert_eq!(r.state().user_key("carol"), None);
    let again = apply_log(r.state(), &[reg("alice", 9)], 6, &[1]);
    assert_eq!(again, vec![ChatResponse::Rejected(RejectReason::NameTaken)]);
}

#[test]
fn invalid_sends_are_rejected_in_order_of_checks() {
    let r = Replica::new(1000);
    let big = vec![b'x'; MAX_BODY_BYTES + 1];
    let log = [
        TestEntry::Cmd(Command::Send(send("Bad", "Alice", b"x", 1, 1))),
        TestEntry::Cmd(Command::Send(send("ok", "Al ice", b"x", 1, 2))),
        TestEntry::Cmd(Command::Send(send("ok", "Alice", b"", 1, 3))),
        TestEntry::Cmd(Command::Send(send("ok", "Alice", &big, 1, 4))),
        TestEntry::Cmd(Command::SendBatch(vec![
            send("ok", "Alice", b"x", 1, 5),
            send("-no", "Alice", b"x", 1, 6),
        ])),
        TestEntry::Cmd(Command::SendBatch(vec![
            send("ok", "Alice", b"x", 1, 7);
            MAX_BATCH_SENDS + 1
        ])),
        TestEntry::Malformed,
        TestEntry::Blank,
    ];
    let responses = apply_log(r.state(), &log, 1, &[8]);
    assert_eq!(
        responses,
        vec![
            ChatResponse::Rejected(RejectReason::InvalidChannel),
            ChatResponse::Rejected(RejectReason::InvalidSender),
            ChatResponse::Rejected(RejectReason::EmptyBody),
            ChatResponse::Rejected(RejectReason::BodyTooLarge {
                len: MAX_BODY_BYTES as u64 + 1,
                max: MAX_BODY_BYTES as u64
            }),
            ChatResponse::Batch(vec![
                Ok(sent("ok", 1, 1005, false)),
                Err(RejectReason::InvalidChannel)
            ]),
            ChatResponse::Rejected(RejectReason::BatchTooLarge {
                count: MAX_BATCH_SENDS as u64 + 1,
                max: MAX_BATCH_SENDS as u64
            }),
            ChatResponse::Rejected(RejectReason::Malformed),
            ChatResponse::None,
        ]
    );
    assert_eq!(r.state().channels(), vec![("ok".into(), ChannelSeq(1))]);
}

#[test]
fn history_reads_ring_and_rocksdb() {
    let mut r = Replica::new(4);
    let log: Vec<_> = (1..=10)
        .map(|i| TestEntry::Cmd(Command::Send(send("c", "A", &[i as u8], 1, i))))
        .collect();
    apply_log(r.state(), &log, 1, &[3]);
    for restart in [false, true] {
        if restart {
            r.restart();
        }
        let s = r.state();
        let seqs = |v: Vec<chat_sm::Message>| v.iter().map(|m| m.seq.0).collect::<Vec<_>>();
        assert_eq!(
            seqs(s.history("c", ChannelSeq(0), 100).expect("read")),
            (1..=10).collect::<Vec<_>>()
        );
        assert_eq!(
            seqs(s.history("c", ChannelSeq(8), 2).expect("read")),
            vec![8, 9]
        );
        assert_eq!(
            seqs(s.history("c", ChannelSeq(2), 3).expect("read")),
            vec![2, 3, 4]
        );
        assert_eq!(
            seqs(s.history("c", ChannelSeq(11), 3).expect("read")),
            Vec::<u64>::new()
        );
        assert_eq!(
            seqs(s.history("c", ChannelSeq(5), 0).expect("read")),
            Vec::<u64>::new()
        );
        assert_eq!(
            seqs(
                s.history_before("c", ChannelSeq(u64::MAX), 3)
                    .expect("read")
            ),
            vec![8, 9, 10]
        );
        assert_eq!(
            seqs(s.history_before("c", ChannelSeq(5), 10).expect("read")),
            vec![1, 2, 3, 4]
        );
        assert_eq!(
            seqs(s.history_before("c", ChannelSeq(1), 10).expect("read")),
            Vec::<u64>::new()
        );
        assert!(s.history("zz", ChannelSeq(1), 10).expect("read").is_empty());
        let m = &s.history("c", ChannelSeq(3), 1).expect("read")[0];
        assert_eq!(
            (
                m.channel.as_str(),
                m.sender.as_str(),
                m.body.as_slice(),
                m.client_seq
            ),
            ("c", "A", [3u8].as_slice(), 3)
        );
        s.check_consistency().expect("consistent");
    }
}

#[test]
fn listener_sees_each_batch_with_new_heads() {
    let r = Replica::new(1000);
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    r.state().set_apply_listener(Box::new(move |e| {
        sink.lock().expect("lock").push(e.clone())
    }));
    let log = [
        TestEntry::Cmd(Command::Send(send("b", "A", b"1", 1, 1))),
        TestEntry::Cmd(Command::Send(send("a", "A", b"2", 1, 2))),
        TestEntry::Blank,
        TestEntry::Cmd(Command::Send(send("a", "A", b"2", 1, 2))),
    ];
    apply_log(r.state(), &log, 1, &[2, 1, 1]);
    let events = events.lock().expect("lock").clone();
    assert_eq!(events.len(), 3);
    assert_eq!(events[0].index, LogIndex(2));
    assert_eq!(
        events[0].heads,
        vec![("a".into(), ChannelSeq(1)), ("b".into(), ChannelSeq(1))]
    );
    assert_eq!((events[1].index, events[1].heads.len()), (LogIndex(3), 0));
    assert_eq!((events[2].index, events[2].heads.len()), (LogIndex(4), 0));
}

#[test]
fn membership_is_kept_until_replaced() {
    let mut r = Replica::new(1000);
    apply(
        r.state(),
        &[
            (1, TestEntry::Membership(b"m1".to_vec())),
            (2, TestEntry::Blank),
        ],
    );
    apply(r.state(), &[(3, TestEntry::Blank)]);
    assert_eq!(r.state().membership(), Some(b"m1".to_vec()));
    r.restart();
    assert_eq!(r.state().membership(), Some(b"m1".to_vec()));
    assert_eq!(r.state().applied_index(), Some(LogIndex(3)));
    // An empty call stores meta but applies nothing.
    r.state().apply(
        &[],
        RaftMeta {
            last_applied: b"x".to_vec(),
            membership: None,
        },
    );
    assert_eq!(r.state().last_applied(), Some(b"x".to_vec()));
    assert_eq!(r.state().applied_index(), Some(LogIndex(3)));
}

#[test]
#[should_panic(expected = "apply index went backwards")]
fn apply_index_going_backwards_panics() {
    let r = Replica::new(1000);
    apply(r.state(), &[(5, TestEntry::Blank)]);
    let entry = ApplyEntry {
        index: LogIndex(5),
        payload: ApplyPayload::Blank,
    };
    r.state().apply(
        &[entry],
        RaftMeta {
            last_applied: vec![],
            membership: None,
        },
    );
}

/// A data directory written before dedup records had their own column family keeps them in
/// `default`. Opening it must move every record, keep answering retries with the original
/// seq, and leave the state (as `dump` shows it) as it was.
#[test]
fn dedup_records_of_the_single_column_family_layout_are_moved_at_open() {
    let mut r = Replica::new(1000);
    let log: Vec<TestEntry> = (1..=40u64)
        .map(|client_seq| {
            let client = (client_seq % 5) as u8;
            TestEntry::Cmd(Command::Send(send(
                "general", "Alice", b"m", client, client_seq,
            )))
        })
        .collect();
    let first = apply_log(r.state(), &log, 1, &[3, 7]);
    let before = r.dump();
    drop(r.state.take());

    // Rewrite the directory into the old layout: every dedup record in `default`, no `dedup`
    // column family.
    let active = std::fs::read_to_string(r.dir.path().join("ACTIVE")).expect("ACTIVE");
    let db_dir = r.dir.path().join(active.trim());
    {
        let opts = rocksdb::Options::default();
        let mut db = rocksdb::DB::open_cf(&opts, &db_dir, ["dedup"]).expect("open raw");
        let dedup = db.cf_handle("dedup").expect("dedup cf");
        let records: Vec<_> = db
            .iterator_cf(dedup, rocksdb::IteratorMode::Start)
            .map(|item| item.expect("iterate"))
            .collect();
        assert_eq!(records.len(), 40, "one dedup record per send");
        for (key, value) in &records {
            db.put(key, value).expect("put");
        }
        db.drop_cf("dedup").expect("drop cf");
    }

    r.restart();
    assert_eq!(r.dump(), before);
    r.state().check_consistency().expect("consistent");
    // Every retry is still recognised, through the moved records.
    let retries = apply_log(r.state(), &log, 41, &[40]);
    for (original, retry) in first.iter().zip(&retries) {
        let (ChatResponse::Sent(original), ChatResponse::Sent(retry)) = (original, retry) else {
            panic!("sends accepted: {original:?} / {retry:?}");
        };
        assert_eq!(
            (&retry.channel, retry.seq, retry.duplicate),
            (&original.channel, original.seq, true)
        );
    }
    // And `default` is left without dedup records.
    drop(r.state.take());
    let opts = rocksdb::Options::default();
    let db = rocksdb::DB::open_cf(&opts, &db_dir, ["dedup"]).expect("open raw");
    let stray = db
        .iterator(rocksdb::IteratorMode::Start)
        .map(|item| item.expect("iterate"))
        .filter(|(key, _)| key.first() == Some(&b'd'))
        .count();
    assert_eq!(stray, 0);
}

/// The suppression attack: Mallory sends first under Alice's client id and next client seqs.
/// Alice's real sends must still be stored, and Mallory's retries still be his own.
#[test]
fn nobody_can_claim_another_senders_client_seqs() {
    let r = Replica::new(1000);
    let log = [
        TestEntry::Cmd(Command::Send(send("general", "Mallory", b"x", 1, 5))),
        TestEntry::Cmd(Command::Send(send("general", "Mallory", b"x", 1, 6))),
        TestEntry::Cmd(Command::Send(send("general", "Alice", b"real", 1, 5))),
        TestEntry::Cmd(Command::Send(send("general", "Alice", b"real", 1, 6))),
        TestEntry::Cmd(Command::Send(send("general", "Mallory", b"x", 1, 5))),
    ];
    let responses = apply_log(r.state(), &log, 1, &[2, 3]);
    assert_eq!(
        responses,
        vec![
            ChatResponse::Sent(sent("general", 1, 1005, false)),
            ChatResponse::Sent(sent("general", 2, 1006, false)),
            ChatResponse::Sent(sent("general", 3, 1005, false)),
            ChatResponse::Sent(sent("general", 4, 1006, false)),
            ChatResponse::Sent(sent("general", 1, 1005, true)),
        ]
    );
    let stored = r
        .state()
        .history("general", ChannelSeq(1), 10)
        .expect("read");
    let senders: Vec<&str> = stored.iter().map(|m| m.sender.as_str()).collect();
    assert_eq!(senders, ["Mallory", "Mallory", "Alice", "Alice"]);
    r.state().check_consistency().expect("consistent");
}

/// A store of the release before dedup records named their sender (keyed by client id alone,
/// no format marker) is rewritten at open: retries are still recognised, by the same sender
/// only.
#[test]
fn dedup_records_keyed_by_client_id_alone_are_rekeyed_by_sender_at_open() {
    let mut r = Replica::new(1000);
    let log: Vec<TestEntry> = (1..=30u64)
        .map(|i| {
            let sender = if i % 2 == 0 { "Alice" } else { "Bob" };
            TestEntry::Cmd(Command::Send(send(
                ["a", "b"][(i % 3 == 0) as usize],
                sender,
                b"m",
                (i % 4) as u8,
                i,
            )))
        })
        .collect();
    let first = apply_log(r.state(), &log, 1, &[4]);
    let before = r.dump();
    drop(r.state.take());

    // Which (channel, seq) each send became, to key its record by client id alone.
    let mut origin = std::collections::HashMap::new();
    for (entry, response) in log.iter().zip(&first) {
        let (TestEntry::Cmd(Command::Send(cmd)), ChatResponse::Sent(sent)) = (entry, response)
        else {
            panic!("a send: {response:?}");
        };
        origin.insert(
            (sent.channel.clone(), sent.seq.0),
            (cmd.client_id, cmd.client_seq),
        );
    }
    let active = std::fs::read_to_string(r.dir.path().join("ACTIVE")).expect("ACTIVE");
    let db_dir = r.dir.path().join(active.trim());
    {
        let opts = rocksdb::Options::default();
        let db = rocksdb::DB::open_cf(&opts, &db_dir, ["dedup"]).expect("open raw");
        let dedup = db.cf_handle("dedup").expect("dedup cf");
        let records: Vec<_> = db
            .iterator_cf(dedup, rocksdb::IteratorMode::Start)
            .map(|item| item.expect("iterate"))
            .collect();
        assert_eq!(records.len(), 30);
        for (key, value) in &records {
            // Value: version, seq, at_ms, channel.
            let seq = u64::from_be_bytes(value[1..9].try_into().expect("seq"));
            let channel = String::from_utf8(value[17..].to_vec()).expect("channel");
            let (client, client_seq) = origin[&(channel, seq)];
            let mut old = vec![b'd'];
            old.extend_from_slice(&client.0);
            old.extend_from_slice(&client_seq.to_be_bytes());
            db.delete_cf(dedup, key).expect("delete");
            db.put_cf(dedup, old, value).expect("put");
        }
        db.delete(b"Mdedup_format").expect("delete marker");
    }

    r.restart();
    assert_eq!(
        r.dump(),
        before,
        "the records are rewritten to exactly today's keys"
    );
    r.state().check_consistency().expect("consistent");
    let retries = apply_log(r.state(), &log, 31, &[30]);
    for (original, retry) in first.iter().zip(&retries) {
        let (ChatResponse::Sent(original), ChatResponse::Sent(retry)) = (original, retry) else {
            panic!("sends accepted: {original:?} / {retry:?}");
        };
        assert_eq!((retry.seq, retry.duplicate), (original.seq, true));
    }
    // The same client id and seq under another sender is a new message.
    let other = apply_log(
        r.state(),
        &[TestEntry::Cmd(Command::Send(send(
            "a", "Carol", b"m", 2, 2,
        )))],
        61,
        &[1],
    );
    let [ChatResponse::Sent(sent)] = &other[..] else {
        panic!("{other:?}");
    };
    assert!(!sent.duplicate);
}

#[test]
fn private_channels_admit_members_only_and_lists_show_what_a_user_may_see() {
    let mut r = Replica::new(1000);
    let op = |channel: &str, by: &str, op: ChannelOp| {
        TestEntry::Cmd(Command::Channel {
            channel: channel.into(),
            by: by.into(),
            op,
        })
    };
    let reg = |name: &str| {
        TestEntry::Cmd(Command::RegisterUser {
            name: name.into(),
            public_key: [name.len() as u8; 32],
        })
    };
    let msg = |channel: &str, sender: &str, seq: u64| {
        TestEntry::Cmd(Command::Send(send(channel, sender, b"hi", 1, seq)))
    };
    let create = |private| ChannelOp::Create {
        private,
        crypto: None,
    };
    let log = [
        reg("alice"),
        reg("bob"),
        op("vault", "alice", create(true)),
        msg("vault", "bob", 1),
        op("vault", "bob", ChannelOp::Accept),
        op("vault", "bob", ChannelOp::Invite("bob".into())),
        op("vault", "alice", ChannelOp::Invite("carol".into())),
        op("vault", "alice", ChannelOp::Invite("bob".into())),
        op("vault", "bob", ChannelOp::Accept),
        msg("vault", "bob", 2),
        msg("lobby", "carol", 1),
        op("lobby", "alice", create(false)),
        op("lobby", "alice", create(true)),
        op("vault", "bob", ChannelOp::Remove("alice".into())),
        op("vault", "bob", ChannelOp::Remove("bob".into())),
        msg("vault", "bob", 3),
    ];
    let responses = apply_log(r.state(), &log, 1, &[3, 2]);
    use ChatResponse::{ChannelUpdated as Ok_, Registered, Rejected as R};
    assert_eq!(
        responses,
        vec![
            Registered,
            Registered,
            Ok_,
            R(RejectReason::NotMember),
            R(RejectReason::NotInvited),
            R(RejectReason::NotOwner),
            R(RejectReason::UnknownUser),
            Ok_,
            Ok_,
            ChatResponse::Sent(sent("vault", 1, 1_002, false)),
            ChatResponse::Sent(sent("lobby", 1, 1_001, false)),
            R(RejectReason::ChannelExists),
            R(RejectReason::ChannelExists),
            R(RejectReason::OwnerCannotLeave),
            Ok_,
            R(RejectReason::NotMember),
        ]
    );
    r.restart();
    let s = r.state();
    assert!(s.admits("vault", "alice") && !s.admits("vault", "bob"));
    assert!(s.admits("lobby", "bob"), "public");
    let lobby = s
        .channel_record("lobby")
        .expect("a first message makes a record");
    assert_eq!(lobby.owner.as_deref(), Some("carol"));
    let names = |user: &str| {
        let (page, more) = s.channel_page(user, None, 10).expect("page");
        assert!(!more);
        page.into_iter().map(|c| c.name).collect::<Vec<_>>()
    };
    assert_eq!(names("alice"), ["lobby", "vault"]);
    assert_eq!(names("bob"), ["lobby"], "bob left the private channel");
    s.check_consistency().expect("consistent");
}

#[test]
fn direct_conversations_are_made_whole_and_never_change_members() {
    let mut r = Replica::new(1000);
    let op = |channel: &str, by: &str, op: ChannelOp| {
        TestEntry::Cmd(Command::Channel {
            channel: channel.into(),
            by: by.into(),
            op,
        })
    };
    let reg = |name: &str| {
        TestEntry::Cmd(Command::RegisterUser {
            name: name.into(),
            public_key: [name.len() as u8; 32],
        })
    };
    let msg = |channel: &str, sender: &str, seq: u64| {
        TestEntry::Cmd(Command::Send(send(channel, sender, b"hi", 1, seq)))
    };
    let direct = |members: &[&str]| ChannelOp::CreateDirect {
        members: members.iter().map(|m| m.to_string()).collect(),
        crypto: vec![7; 300],
    };
    let dm = chat_sm::direct_channel_name(&["alice", "bob"]);
    let trio = chat_sm::direct_channel_name(&["alice", "bob", "carol"]);
    let nine: Vec<String> = (0..9).map(|i| format!("u{i}")).collect();
    let nine_refs: Vec<&str> = nine.iter().map(String::as_str).collect();
    let too_many = chat_sm::direct_channel_name(&nine_refs);
    let log = [
        reg("alice"),
        reg("bob"),
        // Refused: a member not registered, a name not of the members, the creator not a
        // member, a duplicate, one member, nine members, an oversized record, a squatter.
        op(&trio, "alice", direct(&["alice", "bob", "carol"])),
        op(&dm, "alice", direct(&["alice", "carol"])),
        op(&dm, "carol", direct(&["alice", "bob"])),
        op(&dm, "alice", direct(&["alice", "bob", "bob"])),
        op(
            &chat_sm::direct_channel_name(&["alice"]),
            "alice",
            direct(&["alice"]),
        ),
        op(&too_many, "u0", direct(&nine_refs)),
        op(
            &dm,
            "alice",
            ChannelOp::CreateDirect {
                members: vec!["alice".into(), "bob".into()],
                crypto: vec![0; chat_sm::MAX_DIRECT_CRYPTO_BYTES + 1],
            },
        ),
        msg(&dm, "mallory", 1),
        op(
            &dm,
            "mallory",
            ChannelOp::Create {
                private: false,
                crypto: None,
            },
        ),
        // Made, then: once only; members write; others and every change are refused.
        op(&dm, "bob", direct(&["bob", "alice"])),
        op(&dm, "alice", direct(&["alice", "bob"])),
        msg(&dm, "alice", 2),
        msg(&dm, "mallory", 3),
        op(&dm, "bob", ChannelOp::Invite("mallory".into())),
        op(&dm, "alice", ChannelOp::Remove("alice".into())),
        op(&dm, "bob", ChannelOp::SetTopic(Some("x".into()))),
        op(&dm, "bob", ChannelOp::SetCrypto(vec![1])),
    ];
    let responses = apply_log(r.state(), &log, 1, &[5, 4]);
    use ChatResponse::{ChannelUpdated as Ok_, Registered, Rejected as R};
    let d = RejectReason::InvalidDirect;
    assert_eq!(
        responses,
        vec![
            Registered,
            Registered,
            R(RejectReason::UnknownUser),
            R(d.clone()),
            R(d.clone()),
            R(d.clone()),
            R(d.clone()),
            R(d.clone()),
            R(RejectReason::CryptoTooLarge {
                len: chat_sm::MAX_DIRECT_CRYPTO_BYTES as u64 + 1
            }),
            R(RejectReason::DirectChannel),
            R(RejectReason::DirectChannel),
            Ok_,
            R(RejectReason::ChannelExists),
            ChatResponse::Sent(sent(&dm, 1, 1_002, false)),
            R(RejectReason::NotMember),
            R(RejectReason::DirectChannel),
            R(RejectReason::DirectChannel),
            R(RejectReason::DirectChannel),
            R(RejectReason::DirectChannel),
        ]
    );
    r.restart();
    let s = r.state();
    let record = s.channel_record(&dm).expect("made");
    assert!(record.private && record.invited.is_empty());
    assert_eq!(record.owner.as_deref(), Some("bob"));
    assert_eq!(record.members.iter().collect::<Vec<_>>(), ["alice", "bob"]);
    assert_eq!(record.crypto.as_deref(), Some(&[7u8; 300][..]));
    assert!(s.admits(&dm, "alice") && !s.admits(&dm, "mallory"));
    s.check_consistency().expect("consistent");
}

#[test]
fn the_channel_list_pages_in_name_order() {
    let r = Replica::new(10);
    let log: Vec<TestEntry> = (0..25u64)
        .map(|i| {
            TestEntry::Cmd(Command::Send(send(
                &format!("c{i:02}"),
                "alice",
                b"x",
                1,
                i,
            )))
        })
        .collect();
    apply_log(r.state(), &log, 1, &[7]);
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let (page, more) = r
            .state()
            .channel_page("bob", after.as_deref(), 10)
            .expect("page");
        seen.extend(page.iter().map(|c| c.name.clone()));
        after = page.last().map(|c| c.name.clone());
        if !more {
            break;
        }
    }
    let want: Vec<String> = (0..25).map(|i| format!("c{i:02}")).collect();
    assert_eq!(seen, want);
}
