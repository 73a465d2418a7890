//! Retention and dedup expiry: a property test against a plain model, and scenarios for the
//! edges (everything expired, a retry after the dedup window, snapshots carrying floors).
//!
//! Properties, over random logs of sends, retries, retention changes and `Expire` entries
//! whose clock jumps (sometimes backwards, sometimes past the dedup window):
//! - every response is the model's;
//! - no read ever returns a message below a floor seen earlier, and reads return exactly the
//!   model's stored messages, seqs dense from the floor to the head;
//! - replicas that batch the log differently, restart half way, or install a snapshot half
//!   way end with identical dumps: every node removes the same set.

use std::collections::{BTreeMap, HashMap};

use chat_sm::{
    ChannelOp, ChannelSeq, ChatResponse, Command, RejectReason, Retention, SendCmd, Sent,
    DEDUP_WINDOW_MS, HISTORY_LIMIT_MAX,
};
use proptest::prelude::*;

use crate::common::{apply, apply_log, send, Replica, TestEntry};

const CHANNELS: [&str; 2] = ["a", "b"];
const SENDERS: [&str; 2] = ["Alice", "bob"];
const MINUTE: u64 = 60_000;

/// One step of a generated log, before client seqs and clocks are filled in.
#[derive(Clone, Debug)]
enum Step {
    /// A new send, or (`retry`) a repeat of the sender's send that many seqs back.
    Send {
        channel: usize,
        sender: usize,
        retry: Option<u64>,
    },
    /// The leader's clock moves by this much (negative: a slower leader took over).
    Tick(i64),
    /// The clock jumps past the dedup window.
    Leap,
    SetRetention {
        channel: usize,
        by: usize,
        retention: Option<Retention>,
    },
    SetDefault(Retention),
    Expire,
}

fn arb_retention() -> impl Strategy<Value = Retention> {
    (
        prop::option::of(1u64..10),
        prop::option::of(1u64..6),
        0u8..8,
    )
        .prop_map(|(minutes, count, invalid)| {
            if invalid == 0 {
                // Out of bounds: refused, changes nothing.
                Retention {
                    max_age_ms: Some(1_000),
                    max_count: Some(0),
                }
            } else {
                Retention {
                    max_age_ms: minutes.map(|m| m * MINUTE),
                    max_count: count,
                }
            }
        })
}

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        10 => (0..2usize, 0..2usize, prop::option::weighted(0.15, 1u64..4))
            .prop_map(|(channel, sender, retry)| Step::Send { channel, sender, retry }),
        5 => (-(MINUTE as i64)..4 * MINUTE as i64).prop_map(Step::Tick),
        1 => Just(Step::Leap),
        2 => (0..2usize, 0..2usize, prop::option::of(arb_retention()))
            .prop_map(|(channel, by, retention)| Step::SetRetention { channel, by, retention }),
        1 => arb_retention().prop_map(Step::SetDefault),
        4 => Just(Step::Expire),
    ]
}

/// Turns steps into a log: Alice creates both channels first, client seqs count up per
/// sender, every entry carries the leader clock of its moment.
fn build_log(steps: &[Step]) -> Vec<TestEntry> {
    let mut clock: u64 = 10 * DEDUP_WINDOW_MS;
    let mut seqs = [0u64; 2];
    let mut log: Vec<TestEntry> = CHANNELS
        .iter()
        .map(|c| {
            TestEntry::Cmd(Command::Channel {
                channel: (*c).into(),
                by: "Alice".into(),
                op: ChannelOp::Create {
                    private: false,
                    crypto: None,
                },
            })
        })
        .collect();
    for step in steps {
        log.push(match step {
            Step::Send {
                channel,
                sender,
                retry,
            } => {
                let seq = match retry {
                    Some(back) if seqs[*sender] > *back => seqs[*sender] - back,
                    _ => {
                        seqs[*sender] += 1;
                        seqs[*sender]
                    }
                };
                let mut cmd = send(CHANNELS[*channel], SENDERS[*sender], b"hi", 1, seq);
                cmd.at_ms = clock;
                TestEntry::Cmd(Command::Send(cmd))
            }
            Step::Tick(delta) => {
                clock = clock.saturating_add_signed(*delta);
                continue;
            }
            Step::Leap => {
                clock += DEDUP_WINDOW_MS;
                continue;
            }
            Step::SetRetention {
                channel,
                by,
                retention,
            } => TestEntry::Cmd(Command::Channel {
                channel: CHANNELS[*channel].into(),
                by: SENDERS[*by].into(),
                op: ChannelOp::SetRetention(*retention),
            }),
            Step::SetDefault(r) => TestEntry::Cmd(Command::SetDefaultRetention(*r)),
            Step::Expire => TestEntry::Cmd(Command::Expire { at_ms: clock }),
        });
    }
    log
}

/// A message as the model keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Kept {
    seq: u64,
    at_ms: u64,
    sender: String,
}

/// The retention rules of `chat-sm/src/retention.rs`, written out plainly.
#[derive(Default)]
struct Model {
    /// Per channel: floor, head, and the stored messages.
    channels: BTreeMap<String, (u64, u64, Vec<Kept>)>,
    owners: HashMap<String, String>,
    retention: HashMap<String, Retention>,
    default: Retention,
    clock: u64,
    /// (sender, client seq) -> (channel, seq, at_ms) of the stored send.
    dedup: HashMap<(String, u64), (String, u64, u64)>,
    /// Per sender: the highest client seq whose record expired.
    dedup_floor: HashMap<String, u64>,
}

fn valid(r: &Retention) -> bool {
    r.max_count != Some(0) && r.max_age_ms.is_none_or(|a| a >= MINUTE)
}

impl Model {
    fn apply(&mut self, entry: &TestEntry) -> ChatResponse {
        let TestEntry::Cmd(command) = entry else {
            unreachable!("only commands are generated")
        };
        match command {
            Command::Send(s) => match self.send(s) {
                Ok(sent) => ChatResponse::Sent(sent),
                Err(r) => ChatResponse::Rejected(r),
            },
            Command::Channel { channel, by, op } => match op {
                ChannelOp::Create { .. } => {
                    self.owners.insert(channel.clone(), by.clone());
                    self.channels.insert(channel.clone(), (1, 0, Vec::new()));
                    ChatResponse::ChannelUpdated
                }
                ChannelOp::SetRetention(r) => {
                    if self.owners.get(channel) != Some(by) {
                        ChatResponse::Rejected(RejectReason::NotOwner)
                    } else if r.is_some_and(|r| !valid(&r)) {
                        ChatResponse::Rejected(RejectReason::InvalidRetention)
                    } else {
                        match r {
                            Some(r) => self.retention.insert(channel.clone(), *r),
                            None => self.retention.remove(channel),
                        };
                        ChatResponse::ChannelUpdated
                    }
                }
                _ => unreachable!("not generated"),
            },
            Command::SetDefaultRetention(r) => {
                if !valid(r) {
                    return ChatResponse::Rejected(RejectReason::InvalidRetention);
                }
                self.default = *r;
                ChatResponse::DefaultRetentionSet
            }
            Command::Expire { at_ms } => self.expire(*at_ms),
            _ => unreachable!("not generated"),
        }
    }

    fn send(&mut self, s: &SendCmd) -> Result<Sent, RejectReason> {
        let key = (s.sender.clone(), s.client_seq);
        if let Some((channel, seq, at_ms)) = self.dedup.get(&key) {
            return Ok(Sent {
                channel: channel.clone(),
                seq: ChannelSeq(*seq),
                at_ms: *at_ms,
                duplicate: true,
            });
        }
        if self
            .dedup_floor
            .get(&s.sender)
            .is_some_and(|&f| s.client_seq <= f)
        {
            return Err(RejectReason::RetryExpired);
        }
        let (_, head, kept) = self.channels.get_mut(&s.channel).expect("created first");
        *head += 1;
        kept.push(Kept {
            seq: *head,
            at_ms: s.at_ms,
            sender: s.sender.clone(),
        });
        self.dedup.insert(key, (s.channel.clone(), *head, s.at_ms));
        Ok(Sent {
            channel: s.channel.clone(),
            seq: ChannelSeq(*head),
            at_ms: s.at_ms,
            duplicate: false,
        })
    }

    fn expire(&mut self, at_ms: u64) -> ChatResponse {
        self.clock = self.clock.max(at_ms);
        let mut messages = 0;
        for (name, (floor, head, kept)) in &mut self.channels {
            let policy = self.retention.get(name).copied().unwrap_or(self.default);
            let mut new_floor = *floor;
            if let Some(n) = policy.max_count {
                new_floor = new_floor.max((*head + 1).saturating_sub(n));
            }
            if let Some(age) = policy.max_age_ms {
                let cutoff = self.clock.saturating_sub(age);
                while let Some(m) = kept.iter().find(|m| m.seq == new_floor) {
                    if m.at_ms >= cutoff {
                        break;
                    }
                    new_floor += 1;
                }
            }
            kept.retain(|m| m.seq >= new_floor);
            messages += new_floor - *floor;
            *floor = new_floor;
        }
        let cutoff = self.clock.saturating_sub(DEDUP_WINDOW_MS);
        let old: Vec<(String, u64)> = self
            .dedup
            .iter()
            .filter(|(_, (_, _, at))| *at < cutoff)
            .map(|(k, _)| k.clone())
            .collect();
        for (sender, client_seq) in &old {
            self.dedup.remove(&(sender.clone(), *client_seq));
            let floor = self.dedup_floor.entry(sender.clone()).or_insert(0);
            *floor = (*floor).max(*client_seq);
        }
        ChatResponse::Expired {
            messages,
            dedup_records: old.len() as u64,
        }
    }
}

fn arb_chunks() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..6, 1..4)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn every_replica_expires_the_same_and_no_reader_sees_an_expired_message_again(
        steps in prop::collection::vec(arb_step(), 1..80),
        chunks in arb_chunks(),
        cut in 0.0f64..1.0,
    ) {
        let log = build_log(&steps);
        let mut model = Model::default();
        let first = Replica::new(4);
        let mut seen_floor: HashMap<&str, u64> = HashMap::new();
        for (index, entry) in (1u64..).zip(&log) {
            // The leader proposes an Expire only when `expiry_due`: it must say exactly
            // whether one would remove anything.
            let due = match entry {
                TestEntry::Cmd(Command::Expire { at_ms }) => {
                    Some(first.state().expiry_due(*at_ms).expect("due"))
                }
                _ => None,
            };
            let got = apply(first.state(), &[(index, entry.clone())]);
            prop_assert_eq!(&got[0], &model.apply(entry), "entry {} {:?}", index, entry);
            if let (Some(due), ChatResponse::Expired { messages, dedup_records }) = (due, &got[0]) {
                prop_assert_eq!(due, *messages > 0 || *dedup_records > 0, "entry {}", index);
            }
            for channel in CHANNELS {
                let Some((floor, head, kept)) = model.channels.get(channel) else {
                    continue;
                };
                let info = first.state().retention(channel);
                prop_assert_eq!(info.floor.0, *floor);
                let all = first.state().history(channel, ChannelSeq(1), HISTORY_LIMIT_MAX)
                    .expect("read");
                let newest = first.state().history_before(channel, ChannelSeq(u64::MAX), 3)
                    .expect("read");
                let low = seen_floor.entry(channel).or_insert(1);
                prop_assert!(*floor >= *low, "floors never go down");
                *low = *floor;
                prop_assert!(all.iter().chain(&newest).all(|m| m.seq.0 >= *floor));
                let got: Vec<Kept> = all.iter().map(|m| Kept {
                    seq: m.seq.0, at_ms: m.at_ms, sender: m.sender.clone(),
                }).collect();
                prop_assert_eq!(&got, kept);
                prop_assert_eq!(first.state().head(channel).0, *head);
            }
        }
        first.state().check_consistency().expect("consistent");

        // Another batching, a restart half way, and a snapshot half way: same dump.
        let mut second = Replica::new(4);
        let half = ((log.len() as f64) * cut) as usize;
        apply_log(second.state(), &log[..half], 1, &chunks);
        second.restart();
        apply_log(second.state(), &log[half..], half as u64 + 1, &chunks);
        prop_assert_eq!(first.dump(), second.dump());

        let third = Replica::new(4);
        let source = Replica::new(4);
        apply_log(source.state(), &log[..half], 1, &[3]);
        let snap = source.dir.path().join("snap");
        source.state().build_snapshot(&snap).expect("snapshot");
        third.state().install_snapshot(&snap).expect("install");
        apply_log(third.state(), &log[half..], half as u64 + 1, &[2]);
        prop_assert_eq!(first.dump(), third.dump());
        third.state().check_consistency().expect("consistent");
    }
}

/// Applies `commands` one entry per call from `first_index`; returns the responses.
fn run(replica: &Replica, first_index: u64, commands: Vec<Command>) -> Vec<ChatResponse> {
    commands
        .into_iter()
        .zip(first_index..)
        .flat_map(|(c, i)| apply(replica.state(), &[(i, TestEntry::Cmd(c))]))
        .collect()
}

fn sent_at(channel: &str, client_seq: u64, at_ms: u64) -> Command {
    let mut cmd = send(channel, "Alice", b"hello", 7, client_seq);
    cmd.at_ms = at_ms;
    Command::Send(cmd)
}

/// A channel whose every message expired keeps its head: the next message gets the next seq,
/// never a reused one, and reads before it find nothing.
#[test]
fn a_channel_emptied_by_expiry_keeps_counting() {
    let replica = Replica::new(8);
    let day = 24 * 60 * MINUTE;
    let retention = Retention {
        max_age_ms: Some(60 * MINUTE),
        max_count: None,
    };
    let responses = run(
        &replica,
        1,
        vec![
            sent_at("room", 1, day),
            sent_at("room", 2, day + 1),
            Command::SetDefaultRetention(retention),
            Command::Expire {
                at_ms: day + 59 * MINUTE,
            },
            Command::Expire {
                at_ms: day + 61 * MINUTE,
            },
        ],
    );
    assert_eq!(
        &responses[3..],
        &[
            ChatResponse::Expired {
                messages: 0,
                dedup_records: 0
            },
            ChatResponse::Expired {
                messages: 2,
                dedup_records: 0
            },
        ]
    );
    let state = replica.state();
    assert_eq!(state.retention("room").floor, ChannelSeq(3));
    assert!(state
        .history("room", ChannelSeq(1), 10)
        .expect("read")
        .is_empty());
    assert!(state
        .history_before("room", ChannelSeq(u64::MAX), 10)
        .expect("read")
        .is_empty());
    let next = run(&replica, 6, vec![sent_at("room", 3, day + 62 * MINUTE)]);
    let ChatResponse::Sent(sent) = &next[0] else {
        panic!("{next:?}")
    };
    assert_eq!(sent.seq, ChannelSeq(3));
    state.check_consistency().expect("consistent");
}

/// Within the dedup window a retry is a duplicate; after it, a clear refusal, never a second
/// copy, also after a restart (the floor is stored) and for a retry of an older seq.
#[test]
fn a_retry_after_the_dedup_window_is_refused_not_stored_twice() {
    let mut replica = Replica::new(8);
    let t0 = 5 * DEDUP_WINDOW_MS;
    let responses = run(
        &replica,
        1,
        vec![
            sent_at("room", 1, t0),
            sent_at("room", 2, t0),
            Command::Expire {
                at_ms: t0 + DEDUP_WINDOW_MS,
            },
            sent_at("room", 2, t0 + DEDUP_WINDOW_MS),
            Command::Expire {
                at_ms: t0 + DEDUP_WINDOW_MS + 1,
            },
        ],
    );
    assert!(matches!(&responses[3], ChatResponse::Sent(s) if s.duplicate));
    assert_eq!(
        responses[4],
        ChatResponse::Expired {
            messages: 0,
            dedup_records: 2
        }
    );
    replica.restart();
    let late = run(
        &replica,
        6,
        vec![
            sent_at("room", 2, t0 + DEDUP_WINDOW_MS + 2),
            sent_at("room", 1, t0 + DEDUP_WINDOW_MS + 2),
            sent_at("room", 3, t0 + DEDUP_WINDOW_MS + 2),
        ],
    );
    assert_eq!(late[0], ChatResponse::Rejected(RejectReason::RetryExpired));
    assert_eq!(late[1], ChatResponse::Rejected(RejectReason::RetryExpired));
    assert!(matches!(&late[2], ChatResponse::Sent(s) if !s.duplicate && s.seq == ChannelSeq(3)));
    let state = replica.state();
    assert_eq!(state.head("room"), ChannelSeq(3));
    // Messages outlive their dedup records: no retention is set.
    assert_eq!(
        state
            .history("room", ChannelSeq(1), 10)
            .expect("read")
            .len(),
        3
    );
    state.check_consistency().expect("consistent");
}

/// Only the owner sets a channel's retention; the channel's own beats the default, `None`
/// returns to the default, and a count keeps exactly the newest messages.
#[test]
fn the_owner_sets_a_retention_that_beats_the_default() {
    let replica = Replica::new(8);
    let keep = |n| Retention {
        max_age_ms: None,
        max_count: Some(n),
    };
    let mut commands: Vec<Command> = (1..=6).map(|i| sent_at("room", i, 1_000 + i)).collect();
    commands.extend([
        Command::Channel {
            channel: "room".into(),
            by: "Mallory".into(),
            op: ChannelOp::SetRetention(Some(keep(1))),
        },
        Command::SetDefaultRetention(keep(4)),
        Command::Channel {
            channel: "room".into(),
            by: "Alice".into(),
            op: ChannelOp::SetRetention(Some(Retention::FOREVER)),
        },
        Command::Expire { at_ms: 2_000 },
        Command::Channel {
            channel: "room".into(),
            by: "Alice".into(),
            op: ChannelOp::SetRetention(None),
        },
        Command::Expire { at_ms: 2_001 },
    ]);
    let responses = run(&replica, 1, commands);
    assert_eq!(responses[6], ChatResponse::Rejected(RejectReason::NotOwner));
    assert_eq!(
        responses[9],
        ChatResponse::Expired {
            messages: 0,
            dedup_records: 0
        }
    );
    assert_eq!(
        responses[11],
        ChatResponse::Expired {
            messages: 2,
            dedup_records: 0
        }
    );
    let seqs: Vec<u64> = (replica.state().history("room", ChannelSeq(0), 10))
        .expect("read")
        .iter()
        .map(|m| m.seq.0)
        .collect();
    assert_eq!(seqs, vec![3, 4, 5, 6]);
    let info = replica.state().retention("room");
    assert_eq!((info.own, info.effective()), (None, keep(4)));
}

/// An `Expire` batched with other entries would remove different messages on replicas that
/// batch differently; the state machine refuses to run that way.
#[test]
#[should_panic(expected = "an Expire entry must be applied alone")]
fn an_expire_batched_with_other_entries_is_refused() {
    let replica = Replica::new(8);
    apply(
        replica.state(),
        &[
            (1, TestEntry::Cmd(sent_at("room", 1, 1))),
            (2, TestEntry::Cmd(Command::Expire { at_ms: 2 })),
        ],
    );
}

/// Two clients of one sender: the dedup floor of one never refuses the other's sends.
#[test]
fn client_ids_are_kept_apart_in_dedup_expiry() {
    let replica = Replica::new(8);
    let t0 = 3 * DEDUP_WINDOW_MS;
    let mut other = send("room", "Alice", b"x", 8, 1);
    other.at_ms = t0 + DEDUP_WINDOW_MS + 5;
    let responses = run(
        &replica,
        1,
        vec![
            sent_at("room", 5, t0),
            Command::Expire {
                at_ms: t0 + DEDUP_WINDOW_MS + 1,
            },
            Command::Send(other),
        ],
    );
    assert!(matches!(&responses[2], ChatResponse::Sent(s) if !s.duplicate));
}
