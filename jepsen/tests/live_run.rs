//! The CI scenario of `jepsen run`: a real 3-node cluster on loopback, kill -9 and pause
//! faults, about 15 s of workload. The run must be valid; the same live history, deliberately
//! corrupted (an acknowledged message dropped from one node's final read; a fabricated
//! duplicate), must be reported invalid, so the harness is shown able to fail.
//!
//! Needs the `server` binary next to the test binary (`cargo build -p server`).

use std::time::Duration;

use jepsen::live::nemesis::{schedule, Fault};
use jepsen::live::{run_live, RunConfig};
use jepsen::{check, Anomaly, History, OpType, Process, F_FINAL_READ, F_SEND};
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
