//! Checker cases: for every anomaly type a hand-built history that exhibits it (the anomaly is
//! reported and the history is invalid) next to its valid counterpart; malformed lines named by
//! line number; property tests over simulated correct logs; and the `check` CLI's exit codes.

use std::io::Write as _;
use std::process::Command;

use jepsen::{check, Anomaly, History, HistoryError, Op, OpType, Report};
use proptest::prelude::*;
use serde_json::json;

/// Builds a history with index = position and time = 1000 × position.
#[derive(Default, Clone)]
struct B {
    ops: Vec<Op>,
}

impl B {
    fn op(&mut self, op: Op) -> &mut B {
        let n = self.ops.len() as u64;
        let mut op = op.at(n * 1000);
        op.index = n;
        self.ops.push(op);
        self
    }

    fn send_ok(&mut self, p: u64, c: &str, key: &str, msg: &str, seq: u64) -> &mut B {
        self.op(Op::send(OpType::Invoke, p, c, key, msg));
        self.op(Op::send(OpType::Ok, p, c, key, msg).with_seq(seq))
    }

    fn send_ended(&mut self, kind: OpType, p: u64, c: &str, key: &str, msg: &str) -> &mut B {
        self.op(Op::send(OpType::Invoke, p, c, key, msg));
        self.op(Op::send(kind, p, c, key, msg).with_error("timeout"))
    }

    fn read(&mut self, p: u64, c: &str, msgs: &[(u64, &str)]) -> &mut B {
        self.op(Op::read(OpType::Invoke, p, c));
        self.op(Op::read(OpType::Ok, p, c).with_msgs(msgs.iter().copied()))
    }

    fn read_from(
        &mut self,
        p: u64,
        c: &str,
        from: u64,
        limit: u64,
        msgs: &[(u64, &str)],
    ) -> &mut B {
        self.op(Op::read(OpType::Invoke, p, c)
            .with_from(from)
            .with_limit(limit));
        let ok = Op::read(OpType::Ok, p, c).with_from(from).with_limit(limit);
        self.op(ok.with_msgs(msgs.iter().copied()))
    }

    fn stream(&mut self, p: u64, c: &str, msgs: &[(u64, &str)]) -> &mut B {
        self.op(Op::stream_read(OpType::Invoke, p, c));
        self.op(Op::stream_read(OpType::Ok, p, c).with_msgs(msgs.iter().copied()))
    }

    fn final_read(&mut self, node: &str, c: &str, msgs: &[(u64, &str)]) -> &mut B {
        self.op(Op::final_read(OpType::Invoke, 99, node, c));
        self.op(Op::final_read(OpType::Ok, 99, node, c).with_msgs(msgs.iter().copied()))
    }

    fn check(&self) -> Report {
        check(&History::new(self.ops.clone()).expect("hand-built ops are well formed"))
    }
}

const M12: &[(u64, &str)] = &[(1, "m1"), (2, "m2")];

/// Two acknowledged sends, a read, a partition, and equal final reads on two nodes.
fn base() -> B {
    let mut b = B::default();
    b.op(Op::nemesis("start-partition", json!({"n1": ["n2"]})));
    b.send_ok(1, "c", "k1", "m1", 1)
        .send_ok(1, "c", "k2", "m2", 2);
    b.op(Op::nemesis("stop-partition", json!(null)));
    b.read(2, "c", M12);
    b
}

fn finals(b: &mut B, n1: &[(u64, &str)], n2: &[(u64, &str)]) {
    b.final_read("n1", "c", n1).final_read("n2", "c", n2);
}

#[track_caller]
fn assert_found(report: &Report, anomaly: Anomaly) {
    assert!(
        report.count(anomaly) > 0,
        "expected {}: {:#?}",
        anomaly.name(),
        report.anomalies
    );
    assert!(!report.valid);
    let summary = &report.anomalies[anomaly.name()];
    assert!(!summary.examples.is_empty() && summary.examples.len() <= jepsen::EXAMPLES_MAX);
}

#[track_caller]
fn assert_valid(report: &Report) {
    assert!(report.valid, "expected valid: {:?}", report.found());
    assert!(report.found().is_empty());
}

#[test]
fn base_history_is_valid() {
    let mut b = base();
    finals(&mut b, M12, M12);
    let report = b.check();
    assert_valid(&report);
    assert!(report.warnings.is_empty());
    assert_eq!(report.stats.acknowledged_sends, 2);
    assert_eq!(
        report.stats.by_f["start-partition"].info, 1,
        "nemesis ops are counted only"
    );
}

#[test]
fn lost_is_reported_per_node() {
    let mut b = base();
    finals(&mut b, M12, &[(1, "m1")]);
    let report = b.check();
    assert_found(&report, Anomaly::Lost);
    assert_eq!(report.count(Anomaly::Lost), 1);
    assert_eq!(report.stats.lost_by_node.get("n2"), Some(&1));
    assert_eq!(report.anomalies["lost"].examples[0]["node"], "n2");
    assert_eq!(report.anomalies["lost"].examples[0]["msg"], "m2");
}

#[test]
fn without_final_reads_lost_is_not_checked_and_warned() {
    let report = base().check();
    assert_valid(&report);
    assert_eq!(report.warnings.len(), 1);
}

fn four_sends() -> B {
    let mut b = B::default();
    for i in 1..=4 {
        b.send_ok(1, "c", &format!("k{i}"), &format!("m{i}"), i);
    }
    b.read_from(2, "c", 1, 2, M12);
    b.read_from(2, "c", 4, 10, &[(4, "m4")]);
    b
}

#[test]
fn lost_write_acked_below_highest_read_never_seen() {
    let report = four_sends().check();
    assert_found(&report, Anomaly::LostWrite);
    assert_eq!(report.anomalies["lost-write"].examples[0]["msg"], "m3");
}

#[test]
fn lost_write_valid_when_seen() {
    let mut b = four_sends();
    b.read_from(3, "c", 3, 1, &[(3, "m3")]);
    assert_valid(&b.check());
}

#[test]
fn duplicate_msg_at_two_seqs() {
    let mut b = base();
    b.read(2, "c", &[(1, "m1"), (2, "m2"), (3, "m1")]);
    assert_found(&b.check(), Anomaly::Duplicate);
}

#[test]
fn duplicate_key_at_two_seqs() {
    let mut b = B::default();
    b.send_ok(1, "c", "k1", "m1", 1);
    b.send_ended(OpType::Info, 1, "c", "k1", "m1-retry");
    b.read(2, "c", &[(1, "m1"), (2, "m1-retry")]);
    assert_found(&b.check(), Anomaly::Duplicate);
}

#[test]
fn duplicate_valid_when_retry_lands_once() {
    let mut b = B::default();
    b.send_ended(OpType::Info, 1, "c", "k1", "m1");
    b.send_ok(1, "c", "k1", "m1", 1);
    b.read(2, "c", &[(1, "m1")]);
    b.final_read("n1", "c", &[(1, "m1")]);
    assert_valid(&b.check());
}

#[test]
fn inconsistent_offsets_between_send_and_read() {
    let mut b = base();
    b.send_ended(OpType::Info, 3, "c", "k3", "m3");
    b.read(4, "c", &[(1, "m1"), (2, "m3")]);
    let report = b.check();
    assert_found(&report, Anomaly::InconsistentOffsets);
    assert_eq!(
        report.anomalies["inconsistent-offsets"].examples[0]["seq"],
        2
    );
}

#[test]
fn inconsistent_offsets_valid_counterpart() {
    let mut b = base();
    b.send_ended(OpType::Info, 3, "c", "k3", "m3");
    b.read(4, "c", &[(1, "m1"), (2, "m2"), (3, "m3")]);
    assert_valid(&b.check());
}

#[test]
fn aborted_read_of_a_failed_send() {
    let mut b = base();
    b.send_ended(OpType::Fail, 3, "c", "k3", "m3");
    b.read(4, "c", &[(1, "m1"), (2, "m2"), (3, "m3")]);
    assert_found(&b.check(), Anomaly::AbortedRead);
}

#[test]
fn info_send_read_is_recovered_not_an_anomaly() {
    let mut b = base();
    b.send_ended(OpType::Info, 3, "c", "k3", "m3");
    b.send_ended(OpType::Info, 3, "c", "k4", "m4");
    let all: &[(u64, &str)] = &[(1, "m1"), (2, "m2"), (3, "m3")];
    b.read(4, "c", all);
    finals(&mut b, all, all);
    let report = b.check();
    assert_valid(&report);
    assert_eq!(
        report.stats.recovered, 1,
        "m3 recovered; m4 never applied, which is allowed"
    );
    assert_eq!(report.stats.by_f["send"].info, 2);
}

#[test]
fn unexpected_msg_never_sent() {
    let mut b = base();
    b.read(4, "c", &[(1, "m1"), (2, "m2"), (3, "ghost")]);
    assert_found(&b.check(), Anomaly::Unexpected);
}

#[test]
fn dedup_offset_mismatch_on_retry() {
    let mut b = B::default();
    b.send_ok(1, "c", "k1", "m1", 1)
        .send_ok(1, "c", "k1", "m1", 3);
    assert_found(&b.check(), Anomaly::DedupOffsetMismatch);
}

#[test]
fn dedup_same_seq_on_retry_is_valid() {
    let mut b = B::default();
    b.send_ok(1, "c", "k1", "m1", 1)
        .send_ok(1, "c", "k1", "m1", 1);
    assert_valid(&b.check());
}

#[test]
fn int_nonmonotonic_inside_one_read() {
    let mut b = base();
    b.read(2, "c", &[(2, "m2"), (1, "m1")]);
    assert_found(&b.check(), Anomaly::IntNonmonotonic);
}

#[test]
fn int_skip_gap_inside_one_read() {
    let mut b = base();
    b.send_ok(1, "c", "k3", "m3", 3);
    b.read(2, "c", &[(1, "m1"), (3, "m3")]);
    assert_found(&b.check(), Anomaly::IntSkip);
}

#[test]
fn int_skip_read_starts_after_from() {
    let mut b = base();
    b.read_from(2, "c", 1, 5, &[(2, "m2")]);
    assert_found(&b.check(), Anomaly::IntSkip);
}

#[test]
fn int_valid_partial_range() {
    let mut b = base();
    b.read_from(2, "c", 2, 5, &[(2, "m2")]);
    assert_valid(&b.check());
}

#[test]
fn realtime_order_violated() {
    let mut b = B::default();
    b.send_ok(1, "c", "k1", "m1", 2);
    b.send_ok(2, "c", "k2", "m2", 1);
    let report = b.check();
    assert_found(&report, Anomaly::RealtimeOrder);
    let example = &report.anomalies["realtime-order"].examples[0];
    assert_eq!(
        (
            example["earlier"]["msg"].clone(),
            example["later"]["msg"].clone()
        ),
        ("m1".into(), "m2".into())
    );
}

#[test]
fn realtime_order_concurrent_sends_may_go_either_way() {
    let mut b = B::default();
    b.op(Op::send(OpType::Invoke, 1, "c", "k1", "m1"));
    b.op(Op::send(OpType::Invoke, 2, "c", "k2", "m2"));
    b.op(Op::send(OpType::Ok, 1, "c", "k1", "m1").with_seq(2));
    b.op(Op::send(OpType::Ok, 2, "c", "k2", "m2").with_seq(1));
    assert_valid(&b.check());
}

#[test]
fn ryw_own_send_missing_from_later_read() {
    let mut b = B::default();
    b.send_ok(1, "c", "k1", "m1", 1)
        .send_ok(1, "c", "k2", "m2", 2);
    b.read(1, "c", &[(1, "m1")]);
    let report = b.check();
    assert_found(&report, Anomaly::Ryw);
    assert_eq!(report.anomalies["ryw"].examples[0]["msg"], "m2");
}

#[test]
fn ryw_head_below_own_send() {
    let mut b = B::default();
    b.send_ok(1, "c", "k1", "m1", 1)
        .send_ok(1, "c", "k2", "m2", 2);
    b.op(Op::read(OpType::Invoke, 1, "c").with_from(1).with_limit(1));
    let ok = Op::read(OpType::Ok, 1, "c").with_from(1).with_limit(1);
    b.op(ok.with_head(1).with_msgs([(1, "m1")]));
    assert_found(&b.check(), Anomaly::Ryw);
}

#[test]
fn ryw_full_page_need_not_reach_own_send() {
    let mut b = B::default();
    b.send_ok(1, "c", "k1", "m1", 1)
        .send_ok(1, "c", "k2", "m2", 2);
    b.read_from(1, "c", 1, 1, &[(1, "m1")]);
    b.read(2, "c", &[(1, "m1")]);
    b.read(1, "c", M12);
    assert_valid(&b.check());
}

#[test]
fn nonmonotonic_read_stream_goes_back() {
    let mut b = base();
    b.stream(3, "c", M12).stream(3, "c", &[(2, "m2")]);
    assert_found(&b.check(), Anomaly::NonmonotonicRead);
}

#[test]
fn read_skip_stream_jumps() {
    let mut b = base();
    b.send_ok(1, "c", "k3", "m3", 3);
    b.stream(3, "c", &[(1, "m1")]).stream(3, "c", &[(3, "m3")]);
    assert_found(&b.check(), Anomaly::ReadSkip);
}

#[test]
fn stream_continuity_valid_and_reset_by_resubscribe() {
    let mut b = base();
    b.send_ok(1, "c", "k3", "m3", 3);
    b.stream(3, "c", &[(1, "m1")]).stream(3, "c", &[(2, "m2")]);
    b.op(Op::resubscribe(OpType::Ok, 3, "c", 1).with_node("n2"));
    b.stream(3, "c", &[(2, "m2"), (3, "m3")]);
    b.stream(4, "c", &[(3, "m3")]);
    assert_valid(&b.check());
}

#[test]
fn resubscribe_sets_the_expected_start() {
    let mut b = base();
    b.send_ok(1, "c", "k3", "m3", 3);
    b.stream(3, "c", &[(1, "m1")]);
    b.op(Op::resubscribe(OpType::Ok, 3, "c", 1));
    b.stream(3, "c", &[(3, "m3")]);
    assert_found(&b.check(), Anomaly::ReadSkip);
}

#[test]
fn divergence_between_final_reads() {
    let mut b = base();
    b.send_ended(OpType::Info, 3, "c", "k3", "m3");
    finals(&mut b, &[(1, "m1"), (2, "m2"), (3, "m3")], M12);
    let report = b.check();
    assert_found(&report, Anomaly::Divergence);
    assert_eq!(report.count(Anomaly::Lost), 0, "m3 was never acknowledged");
    assert_eq!(
        report.anomalies["divergence"].examples[0]["nodes"]["n2"],
        json!(null)
    );
}

/// Five acknowledged sends in channel `c`, seqs 1-5, for the retention cases.
fn five_sends() -> B {
    let mut b = B::default();
    for n in 1..=5u64 {
        b.send_ok(1, "c", &format!("k{n}"), &format!("m{n}"), n);
    }
    b
}

const M345: &[(u64, &str)] = &[(3, "m3"), (4, "m4"), (5, "m5")];

/// A final read of `node` that reports the node's floor.
fn final_read_floor(b: &mut B, node: &str, floor: u64, msgs: &[(u64, &str)]) {
    b.op(Op::final_read(OpType::Invoke, 99, node, "c"));
    let ok = Op::final_read(OpType::Ok, 99, node, "c").with_floor(floor);
    b.op(ok.with_msgs(msgs.iter().copied()));
}

/// A history read from seq 1 whose node reports `floor`.
fn read_floor(b: &mut B, p: u64, floor: u64, msgs: &[(u64, &str)]) {
    b.op(Op::read(OpType::Invoke, p, "c").with_from(1));
    let ok = Op::read(OpType::Ok, p, "c").with_from(1).with_floor(floor);
    b.op(ok.with_msgs(msgs.iter().copied()));
}

#[test]
fn retention_messages_below_the_floor_may_be_missing() {
    let mut b = five_sends();
    // The owner's own read starts at the floor; a stream jumps over expired seqs to it.
    read_floor(&mut b, 1, 3, M345);
    b.stream(2, "c", &[(1, "m1")]);
    b.op(Op::stream_read(OpType::Invoke, 2, "c"));
    let jump = Op::stream_read(OpType::Ok, 2, "c").with_floor(3);
    b.op(jump.with_msgs(M345.iter().copied()));
    // Nodes expired at different moments: n1 still holds seq 2, n2 does not.
    final_read_floor(
        &mut b,
        "n1",
        2,
        &[(2, "m2"), (3, "m3"), (4, "m4"), (5, "m5")],
    );
    final_read_floor(&mut b, "n2", 3, M345);
    let report = b.check();
    assert_valid(&report);
    assert_eq!(report.stats.expired, 3, "m1 on n1; m1 and m2 on n2");
    assert_eq!(report.stats.floor_max, 3);
}

#[test]
fn retention_a_message_at_or_above_the_floor_is_still_lost() {
    let mut b = five_sends();
    final_read_floor(&mut b, "n1", 3, M345);
    final_read_floor(&mut b, "n2", 3, &[(3, "m3"), (5, "m5")]);
    let report = b.check();
    assert_found(&report, Anomaly::Lost);
    assert_eq!(report.anomalies["lost"].examples[0]["msg"], "m4");
    assert_found(&report, Anomaly::IntSkip);
    assert_found(&report, Anomaly::Divergence);
}

#[test]
fn retention_a_read_may_skip_only_up_to_its_floor() {
    // Starting above the floor skips a kept message.
    let mut b = five_sends();
    read_floor(&mut b, 2, 3, &[(4, "m4"), (5, "m5")]);
    assert_found(&b.check(), Anomaly::IntSkip);
    // A stream that jumps past the floor skips one too.
    let mut b = five_sends();
    b.stream(2, "c", &[(1, "m1")]);
    b.op(Op::stream_read(OpType::Invoke, 2, "c"));
    let jump = Op::stream_read(OpType::Ok, 2, "c").with_floor(3);
    b.op(jump.with_msgs([(4, "m4"), (5, "m5")]));
    assert_found(&b.check(), Anomaly::ReadSkip);
    // The writer's own message at the floor missing from its read: ryw.
    let mut b = five_sends();
    read_floor(&mut b, 1, 3, &[]);
    assert_found(&b.check(), Anomaly::Ryw);
    // A node whose floor is below a missing seq diverges from one that holds it.
    let mut b = five_sends();
    final_read_floor(
        &mut b,
        "n1",
        1,
        &[(1, "m1"), (2, "m2"), (3, "m3"), (4, "m4"), (5, "m5")],
    );
    final_read_floor(&mut b, "n2", 2, &[(3, "m3"), (4, "m4"), (5, "m5")]);
    let report = b.check();
    assert_found(&report, Anomaly::Divergence);
    assert_eq!(report.anomalies["divergence"].examples[0]["seq"], 2);
}

#[test]
fn retention_an_unread_send_below_the_highest_floor_is_not_a_lost_write() {
    let mut b = five_sends();
    read_floor(&mut b, 2, 4, &[(4, "m4"), (5, "m5")]);
    assert_valid(&b.check());
    // Without the floor the same read makes m1-m3 lost writes.
    let mut b = five_sends();
    b.read_from(2, "c", 4, 10, &[(4, "m4"), (5, "m5")]);
    assert_found(&b.check(), Anomaly::LostWrite);
}

#[test]
fn realtime_order_and_every_name_is_listed() {
    let report = base().check();
    for anomaly in Anomaly::ALL {
        assert_eq!(report.anomalies[anomaly.name()].count, 0);
    }
}

// --- malformed input ---

fn parse(text: &str) -> Result<History, HistoryError> {
    History::from_reader(text.as_bytes())
}

const GOOD: &str = r#"{"index":0,"time":1,"type":"invoke","process":1,"f":"send","value":{"channel":"c","key":"k","msg":"m"}}"#;

#[track_caller]
fn assert_malformed(text: &str, line: usize, words: &str) {
    let err = parse(text).expect_err("malformed");
    let HistoryError::Malformed {
        line: found,
        reason,
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(*found, line, "{err}");
    assert!(err.to_string().starts_with(&format!("line {line}:")));
    assert!(
        reason.contains(words),
        "{reason:?} should mention {words:?}"
    );
}

#[test]
fn malformed_bad_json_names_line() {
    assert_malformed(&format!("{GOOD}\n\n{{\"index\": 1,\n"), 3, "invalid JSON");
}

#[test]
fn malformed_missing_field_names_it() {
    let line = r#"{"index":1,"time":2,"process":1,"f":"send","value":{}}"#;
    assert_malformed(&format!("{GOOD}\n{line}\n"), 2, "`type`");
    let no_seq = r#"{"index":1,"time":2,"type":"ok","process":1,"f":"send","value":{"channel":"c","key":"k","msg":"m"}}"#;
    assert_malformed(&format!("{GOOD}\n{no_seq}\n"), 2, "`value.seq`");
}

#[test]
fn malformed_wrong_type_names_field() {
    let line = r#"{"index":"one","time":2,"type":"ok","process":1,"f":"x","value":1}"#;
    assert_malformed(line, 1, "`index`");
    let msgs = r#"{"index":1,"time":2,"type":"ok","process":1,"f":"read","value":{"channel":"c","msgs":[[1,2]]}}"#;
    assert_malformed(&format!("{GOOD}\n{msgs}"), 2, "value.msgs[0]");
    let process = r#"{"index":1,"time":2,"type":"ok","process":-3,"f":"x","value":1}"#;
    assert_malformed(process, 1, "`process`");
}

#[test]
fn written_history_reads_back() {
    let mut b = base();
    finals(&mut b, M12, M12);
    let history = History::new(b.ops.clone()).expect("valid");
    let mut text = Vec::new();
    history.write_to(&mut text).expect("write to memory");
    let back = History::from_reader(text.as_slice()).expect("reads back");
    assert_eq!(back.ops(), history.ops());
}

#[test]
fn writer_stamps_index_and_time_across_threads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("history.jsonl");
    let writer = std::sync::Arc::new(jepsen::HistoryWriter::create(&path).expect("create"));
    let handles: Vec<_> = (0..4)
        .map(|p| {
            let writer = writer.clone();
            std::thread::spawn(move || {
                for i in 0..25 {
                    let (key, msg) = (format!("k{p}-{i}"), format!("m{p}-{i}"));
                    writer
                        .record(Op::send(OpType::Invoke, p, "c", &key, &msg))
                        .expect("write");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("writer thread");
    }
    let history = History::read(&path).expect("reads back");
    assert_eq!(history.len(), 100);
    for (i, w) in history.ops().windows(2).enumerate() {
        assert_eq!(w[0].index, i as u64);
        assert!(w[0].time <= w[1].time);
    }
}

// --- property tests over simulated correct logs ---

#[derive(Debug, Clone)]
enum Action {
    /// outcome: 0 ok, 1 fail, 2 info applied, 3 info not applied, 4 info applied then retried ok.
    Send {
        p: u64,
        ch: usize,
        outcome: u8,
    },
    Read {
        p: u64,
        ch: usize,
        from: u64,
        limit: Option<u64>,
    },
    Stream {
        p: u64,
        ch: usize,
    },
    Resubscribe {
        p: u64,
        ch: usize,
        back: u64,
    },
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => (0..4u64, 0..3usize, 0..5u8).prop_map(|(p, ch, outcome)| Action::Send { p, ch, outcome }),
        2 => (0..4u64, 0..3usize, any::<u64>(), proptest::option::of(1..5u64))
            .prop_map(|(p, ch, from, limit)| Action::Read { p, ch, from, limit }),
        2 => (0..4u64, 0..3usize).prop_map(|(p, ch)| Action::Stream { p, ch }),
        1 => (0..4u64, 0..3usize, 0..3u64).prop_map(|(p, ch, back)| Action::Resubscribe { p, ch, back }),
    ]
}

const CHANNELS: [&str; 3] = ["a", "b", "c"];
const NODES: [&str; 3] = ["n1", "n2", "n3"];

/// Simulates a correct log; returns the ops and the acknowledged (channel, msg) pairs.
fn simulate(actions: &[Action]) -> (B, Vec<(usize, String)>) {
    let mut b = B::default();
    let mut logs: Vec<Vec<String>> = vec![Vec::new(); CHANNELS.len()];
    let mut stream_last = std::collections::HashMap::new();
    let mut acked = Vec::new();
    for (n, a) in actions.iter().enumerate() {
        match *a {
            Action::Send { p, ch, outcome } => {
                let (c, key, msg) = (CHANNELS[ch], format!("k{n}"), format!("m{n}"));
                let log = &mut logs[ch];
                match outcome {
                    0 => {
                        log.push(msg.clone());
                        b.send_ok(p, c, &key, &msg, log.len() as u64);
                        acked.push((ch, msg));
                    }
                    1 => {
                        b.send_ended(OpType::Fail, p, c, &key, &msg);
                    }
                    2 | 4 => {
                        log.push(msg.clone());
                        b.send_ended(OpType::Info, p, c, &key, &msg);
                        if outcome == 4 {
                            b.send_ok(p, c, &key, &msg, log.len() as u64);
                            acked.push((ch, msg));
                        }
                    }
                    _ => {
                        b.send_ended(OpType::Info, p, c, &key, &msg);
                    }
                }
            }
            Action::Read { p, ch, from, limit } => {
                let log = &logs[ch];
                let from = 1 + from % (log.len() as u64 + 1);
                let take = limit.unwrap_or(u64::MAX) as usize;
                let msgs = numbered(log, from as usize, take);
                let mut invoke = Op::read(OpType::Invoke, p, CHANNELS[ch]).with_from(from);
                let mut ok = Op::read(OpType::Ok, p, CHANNELS[ch]).with_from(from);
                if let Some(l) = limit {
                    (invoke, ok) = (invoke.with_limit(l), ok.with_limit(l));
                }
                b.op(invoke).op(ok.with_msgs(msgs));
            }
            Action::Stream { p, ch } => {
                let last: &mut u64 = stream_last.entry((p, ch)).or_default();
                let msgs = numbered(&logs[ch], *last as usize + 1, usize::MAX);
                if let Some((seq, _)) = msgs.last() {
                    *last = *seq;
                    let refs: Vec<(u64, &str)> =
                        msgs.iter().map(|(s, m)| (*s, m.as_str())).collect();
                    b.stream(p, CHANNELS[ch], &refs);
                }
            }
            Action::Resubscribe { p, ch, back } => {
                let last: &mut u64 = stream_last.entry((p, ch)).or_default();
                *last = last.saturating_sub(back);
                b.op(Op::resubscribe(OpType::Ok, p, CHANNELS[ch], *last));
            }
        }
    }
    for node in NODES {
        for (ch, c) in CHANNELS.iter().enumerate() {
            b.op(Op::final_read(OpType::Invoke, 100, node, c));
            b.op(Op::final_read(OpType::Ok, 100, node, c).with_msgs(numbered(
                &logs[ch],
                1,
                usize::MAX,
            )));
        }
    }
    (b, acked)
}

/// `(seq, msg)` pairs of `log` from seq `from`, at most `take` of them.
fn numbered(log: &[String], from: usize, take: usize) -> Vec<(u64, String)> {
    log.iter()
        .enumerate()
        .skip(from - 1)
        .take(take)
        .map(|(i, m)| (i as u64 + 1, m.clone()))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn simulated_correct_log_is_valid(actions in proptest::collection::vec(action(), 0..80)) {
        let (b, _) = simulate(&actions);
        let report = b.check();
        prop_assert!(report.valid, "{:#?}", report.anomalies);
    }

    #[test]
    fn dropping_an_acked_msg_from_one_final_read_is_lost(
        actions in proptest::collection::vec(action(), 1..80),
        pick in any::<prop::sample::Index>(),
        node in 0..3usize,
    ) {
        let (mut b, acked) = simulate(&actions);
        prop_assume!(!acked.is_empty());
        let (ch, msg) = &acked[pick.index(acked.len())];
        let target = b.ops.iter_mut().find(|op| {
            op.kind == OpType::Ok && op.f == "final-read" && op.node.as_deref() == Some(NODES[node])
                && op.value["channel"] == CHANNELS[*ch]
        }).expect("every node final-reads every channel");
        let msgs = target.value["msgs"].as_array_mut().expect("msgs list");
        msgs.retain(|pair| pair[1] != msg.as_str());
        let report = b.check();
        prop_assert_eq!(report.count(Anomaly::Lost), 1);
        prop_assert_eq!(&report.anomalies["lost"].examples[0]["node"], NODES[node]);
        prop_assert!(!report.valid);
    }
}

// --- the CLI ---

fn write_history(dir: &std::path::Path, name: &str, b: &B) -> std::path::PathBuf {
    let path = dir.join(name);
    let mut file = std::fs::File::create(&path).expect("create history");
    History::new(b.ops.clone())
        .expect("valid")
        .write_to(&mut file)
        .expect("write history");
    path
}

fn jepsen(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_jepsen"))
        .args(args)
        .output()
        .expect("run jepsen")
}

#[test]
fn cli_check_exit_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut good = base();
    finals(&mut good, M12, M12);
    let valid = write_history(dir.path(), "valid.jsonl", &good);
    let out_dir = dir.path().join("out");
    let out = jepsen(&[
        "check".as_ref(),
        valid.as_os_str(),
        "--out".as_ref(),
        out_dir.as_os_str(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("VALID"));
    assert!(out_dir.join("results.json").exists() && out_dir.join("report.html").exists());
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("results.json")).expect("read"))
            .expect("results.json is JSON");
    assert_eq!(results["valid"], true);
    assert!(results["availability"].is_array());

    let mut bad = base();
    finals(&mut bad, M12, &[(1, "m1")]);
    let invalid = write_history(dir.path(), "invalid.jsonl", &bad);
    let out = jepsen(&["check".as_ref(), invalid.as_os_str()]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("lost: 1") && stdout.contains("INVALID"),
        "{stdout}"
    );

    let malformed = dir.path().join("malformed.jsonl");
    let mut file = std::fs::File::create(&malformed).expect("create");
    writeln!(file, "{GOOD}\nnot json").expect("write");
    let out = jepsen(&["check".as_ref(), malformed.as_os_str()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2"));
}
