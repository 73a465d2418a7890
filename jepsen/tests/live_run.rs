//! The CI scenario of `jepsen run`: a real 3-node cluster on loopback, kill -9 and pause
//! faults, about 15 s of workload with edits and deletes among the sends. The run must be
//! valid and must have acknowledged edits and deletes; the same live history, deliberately
//! corrupted (an acknowledged message dropped from one node's final read; a fabricated
//! duplicate; a deleted message shown again; an edit dropped), must be reported invalid, so
//! the harness is shown able to fail.
//!
//! Needs the `server` binary next to the test binary (`cargo build -p server`).

use std::time::Duration;

use jepsen::live::nemesis::{schedule, Fault};
use jepsen::live::{run_live, RunConfig};
use jepsen::{
    check, Anomaly, History, Op, OpType, Process, F_DELETE, F_EDIT, F_FINAL_READ, F_SEND,
};
use serde_json::{json, Value};

const TIME_LIMIT: Duration = Duration::from_secs(15);
const INTERVAL: Duration = Duration::from_secs(3);
const FAULTS: [Fault; 2] = [Fault::Kill, Fault::Pause];

/// The first seed whose schedule has both a kill and a pause.
fn seed_with_kill_and_pause() -> u64 {
    (0..1_000)
        .find(|&seed| {
            let events = schedule(seed, &FAULTS, 3, TIME_LIMIT, INTERVAL);
            FAULTS.iter().all(|f| events.iter().any(|e| e.fault == *f))
        })
        .expect("some seed schedules both faults")
}

#[test]
fn ci_kill_and_pause_run_is_valid_and_corrupted_copies_are_not() {
    if let Err(e) = testkit::server_binary() {
        panic!("{e:#}");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let seed = seed_with_kill_and_pause();
    let cfg = RunConfig {
        rate: 30.0,
        ..RunConfig::loopback(seed, &FAULTS, TIME_LIMIT, INTERVAL, dir.path().join("run"))
    };
    let outcome = run_live(cfg).expect("the run completes");
    let failed: Vec<_> = outcome.checks.iter().filter(|c| !c.passed).collect();
    assert!(
        outcome.valid(),
        "run invalid: anomalies {:?}, failed checks {failed:?}; see {}",
        outcome.report.found(),
        outcome.dir.display()
    );
    for file in [
        "history.jsonl",
        "results.json",
        "report.html",
        "test.json",
        "n1.log",
    ] {
        assert!(outcome.dir.join(file).exists(), "{file} missing");
    }
    let stats = &outcome.report.stats;
    assert!(stats.acknowledged_sends > 20, "too few sends: {stats:?}");
    assert_eq!(stats.final_reads, 9, "3 channels from 3 nodes");

    let history = History::read(&outcome.dir.join("history.jsonl")).expect("history");
    let ops = history.ops().to_vec();
    // Edits and deletes ran under the faults, and reads showed their effect: the run did
    // not pass by never exercising them.
    let oks = |f: &str| {
        ops.iter()
            .filter(|o| o.f == f && o.kind == OpType::Ok)
            .count()
    };
    assert!(
        oks(F_EDIT) > 0 && oks(F_DELETE) > 0,
        "{} ok edits, {} ok deletes",
        oks(F_EDIT),
        oks(F_DELETE)
    );
    assert!(
        stats.acknowledged_edits > 0 && stats.acknowledged_deletes > 0 && stats.erased_read > 0,
        "{stats:?}"
    );
    // Faults never overlap, so each kill or pause lasts until the next start or resume.
    let mut windows = Vec::new();
    let mut opened = None;
    for o in ops.iter().filter(|o| o.process == Process::Nemesis) {
        match o.f.as_str() {
            "kill" | "pause" => opened = opened.or(Some(o.time)),
            "start" | "resume" => windows.extend(opened.take().map(|t| (t, o.time))),
            _ => {}
        }
    }
    let under_fault = ops.iter().any(|o| {
        [F_EDIT, F_DELETE].contains(&o.f.as_str())
            && o.kind == OpType::Invoke
            && windows.iter().any(|(a, b)| (*a..=*b).contains(&o.time))
    });
    assert!(
        under_fault,
        "no edit or delete invoked inside a fault window {windows:?}"
    );
    for f in ["kill", "start", "pause", "resume"] {
        assert!(
            ops.iter()
                .any(|o| o.process == Process::Nemesis && o.f == f),
            "no nemesis {f} in the history"
        );
    }

    // Corruption 1: drop one acknowledged message from n2's final read.
    let acked: Vec<String> = ops
        .iter()
        .filter(|o| o.f == F_SEND && o.kind == OpType::Ok)
        .map(|o| o.value["msg"].as_str().expect("msg").to_owned())
        .collect();
    let mut lost = ops.clone();
    let target = lost
        .iter_mut()
        .find(|o| {
            o.f == F_FINAL_READ
                && o.kind == OpType::Ok
                && o.node.as_deref() == Some("n2")
                && o.value["msgs"].as_array().is_some_and(|m| {
                    m.iter()
                        .any(|pair| acked.iter().any(|a| pair[1] == json!(a)))
                })
        })
        .expect("n2 read an acknowledged message");
    let msgs = target.value["msgs"].as_array_mut().expect("msgs");
    let at = msgs
        .iter()
        .rposition(|pair| acked.iter().any(|a| pair[1] == json!(a)))
        .expect("an acknowledged one");
    msgs.remove(at);
    let report = check(&History::new(lost).expect("still well-formed"));
    assert!(!report.valid);
    assert!(report.count(Anomaly::Lost) >= 1, "{:?}", report.found());

    // Corruption 3: a deleted message shown again, with a body, in n3's final read.
    let mut revived = ops.clone();
    let entry = final_entry(&mut revived, "n3", |e| {
        e[2]["deleted"] == json!(true) && e[2].get("edit_of").is_none()
    });
    let seq = entry[0].clone();
    *entry = json!([seq, "revived"]);
    let report = check(&History::new(revived).expect("still well-formed"));
    assert!(
        report.count(Anomaly::ResurrectedDelete) >= 1,
        "{:?}",
        report.found()
    );

    // Corruption 4: an edited message shown without its edit in n1's final read.
    let mut unedited = ops.clone();
    let entry = final_entry(&mut unedited, "n1", |e| e[2].get("edit").is_some());
    entry[2]
        .as_object_mut()
        .expect("annotations")
        .remove("edit");
    let report = check(&History::new(unedited).expect("still well-formed"));
    assert!(report.count(Anomaly::LostEdit) >= 1, "{:?}", report.found());

    // Corruption 2: a fabricated duplicate, one message read again at the next seq.
    let mut dup = ops;
    let target = dup
        .iter_mut()
        .find(|o| {
            o.f == F_FINAL_READ
                && o.kind == OpType::Ok
                && o.value["msgs"].as_array().is_some_and(|m| !m.is_empty())
        })
        .expect("a non-empty final read");
    let msgs = target.value["msgs"].as_array_mut().expect("msgs");
    let first: Value = msgs[0][1].clone();
    let next = msgs.last().expect("non-empty")[0].as_u64().expect("seq") + 1;
    msgs.push(json!([next, first]));
    target.value["head"] = json!(next);
    let report = check(&History::new(dup).expect("still well-formed"));
    assert!(!report.valid);
    assert!(
        report.count(Anomaly::Duplicate) >= 1,
        "{:?}",
        report.found()
    );
}

/// The first entry of `node`'s final reads that satisfies `pick`.
fn final_entry<'a>(ops: &'a mut [Op], node: &str, pick: impl Fn(&Value) -> bool) -> &'a mut Value {
    ops.iter_mut()
        .filter(|o| o.f == F_FINAL_READ && o.kind == OpType::Ok && o.node.as_deref() == Some(node))
        .flat_map(|o| o.value["msgs"].as_array_mut().expect("msgs").iter_mut())
        .find(|e| pick(e))
        .unwrap_or_else(|| panic!("no such entry in {node}'s final reads"))
}
