//! Checker cases: for every anomaly type a hand-built history that exhibits it (the anomaly is
//! reported and the history is invalid) next to its valid counterpart; malformed lines named by
//! line number; property tests over simulated correct logs; and the `check` CLI's exit codes.

use std::io::Write as _;
use std::process::Command;

use jepsen::{check, Anomaly, History, HistoryError, Op, OpType, ReadEntry, Report};
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

// --- edits and deletes ---

/// Builders for edit and delete histories: `E(seq, msg)` a plain entry, erased entries, an
/// entry with its newest edit attached, and edit/delete entries naming their target.
fn e(seq: u64, msg: &str) -> ReadEntry {
    ReadEntry::plain(seq, msg)
}

fn edited(seq: u64, msg: &str, edit_seq: u64, edit: &str) -> ReadEntry {
    ReadEntry {
        edit: Some((edit_seq, edit.to_string())),
        ..ReadEntry::plain(seq, msg)
    }
}

fn edit_entry(seq: u64, msg: &str, of: u64) -> ReadEntry {
    ReadEntry {
        edit_of: Some(of),
        ..ReadEntry::plain(seq, msg)
    }
}

fn delete_entry(seq: u64, msg: &str, of: u64) -> ReadEntry {
    ReadEntry {
        delete_of: Some(of),
        ..ReadEntry::plain(seq, msg)
    }
}

fn erased_edit(seq: u64, of: u64) -> ReadEntry {
    ReadEntry {
        edit_of: Some(of),
        ..ReadEntry::erased(seq)
    }
}

impl B {
    #[allow(clippy::too_many_arguments)]
    fn relate_ok(
        &mut self,
        f: fn(OpType, u64, &str, &str, &str, u64) -> Op,
        p: u64,
        key: &str,
        msg: &str,
        of: u64,
        seq: u64,
        token: u64,
    ) -> &mut B {
        self.op(f(OpType::Invoke, p, "c", key, msg, of));
        self.op(f(OpType::Ok, p, "c", key, msg, of)
            .with_seq(seq)
            .with_token(token))
    }

    fn relate_ended(
        &mut self,
        f: fn(OpType, u64, &str, &str, &str, u64) -> Op,
        kind: OpType,
        key: &str,
        msg: &str,
        of: u64,
    ) -> &mut B {
        self.op(f(OpType::Invoke, 1, "c", key, msg, of));
        self.op(f(kind, 1, "c", key, msg, of).with_error("timeout"))
    }

    /// A history read of `c` from seq 1 by `p`, passing read token `token`.
    fn read_token(&mut self, p: u64, token: u64, entries: &[ReadEntry]) -> &mut B {
        let op = |kind| Op::read(kind, p, "c").with_from(1).with_token(token);
        self.op(op(OpType::Invoke));
        self.op(op(OpType::Ok).with_entries(entries.iter().cloned()))
    }

    fn final_entries(&mut self, node: &str, entries: &[ReadEntry]) -> &mut B {
        self.op(Op::final_read(OpType::Invoke, 99, node, "c"));
        self.op(Op::final_read(OpType::Ok, 99, node, "c").with_entries(entries.iter().cloned()))
    }
}

/// Process 1 sends m1-m3 (seqs 1-3, tokens 11-13), edits m1 (seq 4, token 14) and m2 (seq 5,
/// token 15), then deletes m2 (seq 6, token 16). Process 2 reads at token 14, between the
/// first edit and the second.
fn edits_and_deletes() -> B {
    let mut b = B::default();
    for n in 1..=3u64 {
        b.op(Op::send(
            OpType::Invoke,
            1,
            "c",
            &format!("k{n}"),
            &format!("m{n}"),
        ));
        let ok = Op::send(OpType::Ok, 1, "c", &format!("k{n}"), &format!("m{n}"));
        b.op(ok.with_seq(n).with_token(10 + n));
    }
    b.relate_ok(Op::edit, 1, "k4", "m1-e", 1, 4, 14);
    b.read_token(
        2,
        14,
        &[
            edited(1, "m1", 4, "m1-e"),
            e(2, "m2"),
            e(3, "m3"),
            edit_entry(4, "m1-e", 1),
        ],
    );
    b.relate_ok(Op::edit, 1, "k5", "m2-e", 2, 5, 15);
    b.relate_ok(Op::delete, 1, "k6", "m2-d", 2, 6, 16);
    b
}

/// Entries 1-6 of `edits_and_deletes` once everything applied.
fn after_delete() -> Vec<ReadEntry> {
    vec![
        edited(1, "m1", 4, "m1-e"),
        ReadEntry::erased(2),
        e(3, "m3"),
        edit_entry(4, "m1-e", 1),
        erased_edit(5, 2),
        delete_entry(6, "m2-d", 2),
    ]
}

#[test]
fn edits_and_deletes_valid_history() {
    let mut b = edits_and_deletes();
    // A read whose token predates the delete may still show m2, with its edit.
    let before_delete = [
        edited(1, "m1", 4, "m1-e"),
        edited(2, "m2", 5, "m2-e"),
        e(3, "m3"),
        edit_entry(4, "m1-e", 1),
        edit_entry(5, "m2-e", 2),
    ];
    b.read_token(3, 15, &before_delete);
    let all = after_delete();
    b.read_token(2, 16, &all);
    b.stream(4, "c", &[]);
    b.final_entries("n1", &all).final_entries("n2", &all);
    let report = b.check();
    assert_valid(&report);
    let stats = &report.stats;
    assert_eq!(
        (
            stats.acknowledged_sends,
            stats.acknowledged_edits,
            stats.acknowledged_deletes
        ),
        (3, 2, 1)
    );
    assert_eq!(stats.erased_read, 2, "m2 and its edit");
    assert_eq!(report.stats.by_f["edit"].ok, 2);
}

#[test]
fn an_info_delete_may_or_may_not_have_applied() {
    // Applied: m3 erased, the delete's own entry read (recovered).
    let mut b = edits_and_deletes();
    b.relate_ended(Op::delete, OpType::Info, "k7", "m3-d", 3);
    let mut applied = after_delete();
    applied[2] = ReadEntry::erased(3);
    applied.push(delete_entry(7, "m3-d", 3));
    b.final_entries("n1", &applied)
        .final_entries("n2", &applied);
    let report = b.check();
    assert_valid(&report);
    assert_eq!(report.stats.recovered, 1);

    // Not applied: m3 shown as sent.
    let mut b = edits_and_deletes();
    b.relate_ended(Op::delete, OpType::Info, "k7", "m3-d", 3);
    let all = after_delete();
    b.final_entries("n1", &all).final_entries("n2", &all);
    assert_valid(&b.check());
}

#[test]
fn resurrected_delete_in_a_final_read() {
    let mut b = edits_and_deletes();
    let mut resurrected = after_delete();
    resurrected[1] = edited(2, "m2", 5, "m2-e");
    resurrected[4] = edit_entry(5, "m2-e", 2);
    b.final_entries("n1", &after_delete())
        .final_entries("n2", &resurrected);
    let report = b.check();
    assert_found(&report, Anomaly::ResurrectedDelete);
    let example = &report.anomalies["resurrected-delete"].examples[0];
    assert_eq!(
        (example["node"].clone(), example["target"].clone()),
        (json!("n2"), json!(2))
    );
    assert_eq!(example["delete"], "m2-d");
    // The target and its edit, both shown with their bodies on n2.
    assert_eq!(report.count(Anomaly::ResurrectedDelete), 2);
    assert_found(&report, Anomaly::Divergence);
}

#[test]
fn resurrected_delete_in_a_read_whose_token_covers_the_delete() {
    let mut b = edits_and_deletes();
    let stale = [
        edited(1, "m1", 4, "m1-e"),
        edited(2, "m2", 5, "m2-e"),
        e(3, "m3"),
    ];
    b.read_token(3, 16, &stale);
    let all = after_delete();
    b.final_entries("n1", &all);
    let report = b.check();
    assert_found(&report, Anomaly::ResurrectedDelete);
    assert_eq!(
        report.anomalies["resurrected-delete"].examples[0]["read_token"],
        16
    );
    assert_eq!(report.found(), vec![Anomaly::ResurrectedDelete]);
}

#[test]
fn resurrected_delete_when_the_erased_marker_keeps_the_body() {
    let mut b = edits_and_deletes();
    let mut kept = after_delete();
    kept[1] = ReadEntry {
        deleted: true,
        ..e(2, "m2")
    };
    b.final_entries("n1", &kept);
    assert_found(&b.check(), Anomaly::ResurrectedDelete);
}

#[test]
fn lost_edit_in_a_final_read() {
    let mut b = edits_and_deletes();
    let mut lost = after_delete();
    lost[0] = e(1, "m1");
    b.final_entries("n1", &after_delete())
        .final_entries("n2", &lost);
    let report = b.check();
    assert_found(&report, Anomaly::LostEdit);
    let example = &report.anomalies["lost-edit"].examples[0];
    assert_eq!(
        (example["node"].clone(), example["edit_seq"].clone()),
        (json!("n2"), json!(4))
    );
}

#[test]
fn lost_edit_when_an_older_edit_is_shown() {
    let mut b = edits_and_deletes();
    b.relate_ok(Op::edit, 1, "k7", "m1-e2", 1, 7, 17);
    let mut all = after_delete();
    all.push(edit_entry(7, "m1-e2", 1));
    // n1 shows the newest edit; n2 still the first one.
    let mut newest = all.clone();
    newest[0] = edited(1, "m1", 7, "m1-e2");
    b.final_entries("n1", &newest).final_entries("n2", &all);
    let report = b.check();
    assert_found(&report, Anomaly::LostEdit);
    assert_eq!(
        report.count(Anomaly::LostEdit),
        1,
        "{:#?}",
        report.anomalies["lost-edit"]
    );
}

#[test]
fn lost_edit_in_a_read_whose_token_covers_the_edit() {
    let mut b = edits_and_deletes();
    // Token 13 predates the first edit (token 14): no edit yet is fine.
    b.read_token(3, 13, &[e(1, "m1"), e(2, "m2"), e(3, "m3")]);
    assert_valid(&b.check());
    b.read_token(
        3,
        14,
        &[e(1, "m1"), e(2, "m2"), e(3, "m3"), edit_entry(4, "m1-e", 1)],
    );
    let report = b.check();
    assert_found(&report, Anomaly::LostEdit);
    assert_eq!(report.found(), vec![Anomaly::LostEdit]);
}

#[test]
fn an_erased_entry_needs_a_delete_that_may_have_applied() {
    let mut b = edits_and_deletes();
    let mut ghost = after_delete();
    ghost[2] = ReadEntry::erased(3);
    b.final_entries("n1", &ghost);
    let report = b.check();
    assert_found(&report, Anomaly::Unexpected);
    assert_eq!(report.anomalies["unexpected"].examples[0]["seq"], 3);
    assert_eq!(report.count(Anomaly::Lost), 0, "erased is not lost");

    let mut b = edits_and_deletes();
    b.relate_ended(Op::delete, OpType::Fail, "k7", "m3-d", 3);
    b.final_entries("n1", &ghost);
    assert_found(&b.check(), Anomaly::AbortedRead);
}

#[test]
fn an_attached_edit_must_edit_that_message() {
    let mut b = edits_and_deletes();
    let mut wrong = after_delete();
    wrong[2] = edited(3, "m3", 4, "m1-e");
    b.final_entries("n1", &wrong);
    assert_found(&b.check(), Anomaly::Unexpected);
}

#[test]
fn final_reads_must_agree_on_deletion() {
    let mut b = edits_and_deletes();
    b.relate_ended(Op::delete, OpType::Info, "k7", "m3-d", 3);
    let mut applied = after_delete();
    applied[2] = ReadEntry::erased(3);
    applied.push(delete_entry(7, "m3-d", 3));
    let mut alive = after_delete();
    alive.push(delete_entry(7, "m3-d", 3));
    b.final_entries("n1", &applied).final_entries("n2", &alive);
    let report = b.check();
    assert_eq!(
        report.anomalies["divergence"].examples[0]["nodes"],
        json!({"n1": "(deleted)", "n2": "m3"})
    );
    // n2 holds the (unacknowledged) delete's entry, so the delete applied there too.
    assert_eq!(
        report.found(),
        vec![Anomaly::Divergence, Anomaly::ResurrectedDelete]
    );
    assert_eq!(
        report.anomalies["resurrected-delete"].examples[0]["node"],
        "n2"
    );
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
    /// An edit or delete of a live, plain message of the channel picked by `pick`, with the
    /// same outcomes as a send.
    Relate {
        p: u64,
        ch: usize,
        pick: usize,
        delete: bool,
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
        2 => (0..4u64, 0..3usize, any::<usize>(), any::<bool>(), 0..5u8).prop_map(
            |(p, ch, pick, delete, outcome)| Action::Relate { p, ch, pick, delete, outcome }
        ),
        2 => (0..4u64, 0..3usize, any::<u64>(), proptest::option::of(1..5u64))
            .prop_map(|(p, ch, from, limit)| Action::Read { p, ch, from, limit }),
        2 => (0..4u64, 0..3usize).prop_map(|(p, ch)| Action::Stream { p, ch }),
        1 => (0..4u64, 0..3usize, 0..3u64).prop_map(|(p, ch, back)| Action::Resubscribe { p, ch, back }),
    ]
}

const CHANNELS: [&str; 3] = ["a", "b", "c"];
const NODES: [&str; 3] = ["n1", "n2", "n3"];

/// One entry of a simulated channel, as a correct node keeps it.
#[derive(Debug, Clone, Default)]
struct SimEntry {
    msg: String,
    /// `(delete, target)` for edits and deletes.
    relation: Option<(bool, u64)>,
    deleted: bool,
    /// Seq of the newest edit.
    edit: Option<u64>,
}

/// A correct cluster: channels and the applied index, which every read passes as its token
/// (reads here see everything applied, so they may pass the highest token).
#[derive(Default)]
struct Sim {
    logs: Vec<Vec<SimEntry>>,
    applied: u64,
}

impl Sim {
    /// Appends `entry` to channel `ch`, applying its relation; returns its seq.
    fn apply(&mut self, ch: usize, entry: SimEntry) -> u64 {
        let log = &mut self.logs[ch];
        log.push(entry.clone());
        let seq = log.len() as u64;
        match entry.relation {
            Some((false, of)) => log[of as usize - 1].edit = Some(seq),
            Some((true, of)) => {
                for e in log.iter_mut() {
                    if e.relation == Some((false, of)) {
                        e.deleted = true;
                    }
                }
                let target = &mut log[of as usize - 1];
                (target.deleted, target.edit) = (true, None);
            }
            None => {}
        }
        self.applied += 1;
        seq
    }

    /// Entries of channel `ch` from seq `from`, at most `take`, as a read shows them.
    fn read(&self, ch: usize, from: usize, take: usize) -> Vec<ReadEntry> {
        let log = &self.logs[ch];
        log.iter()
            .enumerate()
            .skip(from - 1)
            .take(take)
            .map(|(i, e)| {
                let seq = i as u64 + 1;
                let (edit_of, delete_of) = match e.relation {
                    Some((false, of)) => (Some(of), None),
                    Some((true, of)) => (None, Some(of)),
                    None => (None, None),
                };
                ReadEntry {
                    seq,
                    msg: (!e.deleted).then(|| e.msg.clone()),
                    deleted: e.deleted,
                    edit: e.edit.map(|s| (s, log[s as usize - 1].msg.clone())),
                    edit_of,
                    delete_of,
                }
            })
            .collect()
    }
}

/// What a simulation produced: the ops, the acknowledged (channel, msg) pairs whose bodies
/// the final reads still show (a delete erased the others), and the (channel, target seq,
/// delete) of every acknowledged edit or delete.
struct Simulated {
    b: B,
    acked: Vec<(usize, String)>,
    relations: Vec<(usize, u64, bool)>,
}

/// Simulates a correct log.
fn simulate(actions: &[Action]) -> Simulated {
    let mut b = B::default();
    let mut sim = Sim {
        logs: vec![Vec::new(); CHANNELS.len()],
        applied: 0,
    };
    let mut stream_last = std::collections::HashMap::new();
    let mut acked = Vec::new();
    let mut relations = Vec::new();
    for (n, a) in actions.iter().enumerate() {
        match *a {
            Action::Send { p, ch, outcome } => {
                let (c, key, msg) = (CHANNELS[ch], format!("k{n}"), format!("m{n}"));
                let entry = SimEntry {
                    msg: msg.clone(),
                    ..SimEntry::default()
                };
                let op = |kind| Op::send(kind, p, c, &key, &msg);
                write(&mut b, &mut sim, ch, entry, outcome, op, &mut acked);
            }
            Action::Relate {
                p,
                ch,
                pick,
                delete,
                outcome,
            } => {
                let targets: Vec<u64> = (sim.logs[ch].iter().enumerate())
                    .filter(|(_, e)| e.relation.is_none() && !e.deleted)
                    .map(|(i, _)| i as u64 + 1)
                    .collect();
                if targets.is_empty() {
                    continue;
                }
                let of = targets[pick % targets.len()];
                let (c, key) = (CHANNELS[ch], format!("k{n}"));
                let msg = format!("m{n}-{}{of}", if delete { "d" } else { "e" });
                let entry = SimEntry {
                    msg: msg.clone(),
                    relation: Some((delete, of)),
                    ..SimEntry::default()
                };
                let f = if delete { Op::delete } else { Op::edit };
                let op = |kind| f(kind, p, c, &key, &msg, of);
                if write(&mut b, &mut sim, ch, entry, outcome, op, &mut acked) {
                    relations.push((ch, of, delete));
                }
            }
            Action::Read { p, ch, from, limit } => {
                let len = sim.logs[ch].len() as u64;
                let from = 1 + from % (len + 1);
                let take = limit.unwrap_or(u64::MAX) as usize;
                let entries = sim.read(ch, from as usize, take);
                let token = sim.applied;
                let mut invoke = Op::read(OpType::Invoke, p, CHANNELS[ch]).with_from(from);
                let mut ok = Op::read(OpType::Ok, p, CHANNELS[ch]).with_from(from);
                if let Some(l) = limit {
                    (invoke, ok) = (invoke.with_limit(l), ok.with_limit(l));
                }
                let ok = ok.with_token(token).with_entries(entries);
                b.op(invoke.with_token(token)).op(ok);
            }
            Action::Stream { p, ch } => {
                let last: &mut u64 = stream_last.entry((p, ch)).or_default();
                let entries = sim.read(ch, *last as usize + 1, usize::MAX);
                if let Some(e) = entries.last() {
                    *last = e.seq;
                    let op = |kind| Op::stream_read(kind, p, CHANNELS[ch]).with_token(sim.applied);
                    b.op(op(OpType::Invoke))
                        .op(op(OpType::Ok).with_entries(entries));
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
            let entries = sim.read(ch, 1, usize::MAX);
            b.op(Op::final_read(OpType::Ok, 100, node, c).with_entries(entries));
        }
    }
    acked.retain(|(ch, msg)| sim.logs[*ch].iter().any(|e| e.msg == *msg && !e.deleted));
    Simulated {
        b,
        acked,
        relations,
    }
}

/// Records one write (send, edit or delete) with `outcome` (as on [`Action::Send`]),
/// applying `entry` when the outcome says it applied; true when it was acknowledged.
fn write(
    b: &mut B,
    sim: &mut Sim,
    ch: usize,
    entry: SimEntry,
    outcome: u8,
    op: impl Fn(OpType) -> Op,
    acked: &mut Vec<(usize, String)>,
) -> bool {
    let msg = entry.msg.clone();
    b.op(op(OpType::Invoke));
    match outcome {
        0 => {
            let seq = sim.apply(ch, entry);
            b.op(op(OpType::Ok).with_seq(seq).with_token(sim.applied));
            acked.push((ch, msg));
            true
        }
        1 => {
            b.op(op(OpType::Fail).with_error("refused"));
            false
        }
        2 | 4 => {
            let seq = sim.apply(ch, entry);
            b.op(op(OpType::Info).with_error("timeout"));
            if outcome == 4 {
                b.op(op(OpType::Invoke));
                b.op(op(OpType::Ok).with_seq(seq).with_token(sim.applied));
                acked.push((ch, msg));
            }
            outcome == 4
        }
        _ => {
            b.op(op(OpType::Info).with_error("timeout"));
            false
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn simulated_correct_log_is_valid(actions in proptest::collection::vec(action(), 0..80)) {
        let report = simulate(&actions).b.check();
        prop_assert!(report.valid, "{:#?}", report.anomalies);
    }

    #[test]
    fn dropping_an_acked_msg_from_one_final_read_is_lost(
        actions in proptest::collection::vec(action(), 1..80),
        pick in any::<prop::sample::Index>(),
        node in 0..3usize,
    ) {
        let Simulated { mut b, acked, .. } = simulate(&actions);
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

    /// Undoing an acknowledged edit or delete in one node's final read (the target shown
    /// without its edits; the erased target shown with a body) is found.
    #[test]
    fn undoing_an_acked_edit_or_delete_in_one_final_read_is_found(
        actions in proptest::collection::vec(action(), 1..80),
        pick in any::<prop::sample::Index>(),
        node in 0..3usize,
    ) {
        let Simulated { mut b, relations, .. } = simulate(&actions);
        prop_assume!(!relations.is_empty());
        let (ch, of, delete) = relations[pick.index(relations.len())];
        let target = b.ops.iter_mut().find(|op| {
            op.kind == OpType::Ok && op.f == "final-read" && op.node.as_deref() == Some(NODES[node])
                && op.value["channel"] == CHANNELS[ch]
        }).expect("every node final-reads every channel");
        let entry = &mut target.value["msgs"][of as usize - 1];
        prop_assert_eq!(&entry[0], &json!(of));
        let anomaly = if delete {
            prop_assert_eq!(&entry[2]["deleted"], &json!(true));
            *entry = json!([of, "revived"]);
            Anomaly::ResurrectedDelete
        } else {
            // An edited target is undeleted, or a later delete erased it (and its edit).
            prop_assume!(entry[2].get("edit").is_some());
            entry[2].as_object_mut().expect("annotations").remove("edit");
            Anomaly::LostEdit
        };
        let report = b.check();
        prop_assert!(report.count(anomaly) >= 1, "{:?}", report.found());
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
