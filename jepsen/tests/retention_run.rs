//! A live run with retention: a real 3-node cluster on loopback whose default retention keeps
//! the newest 25 messages per channel, with expiries proposed every 300 ms, under kill -9 and
//! pause faults. Floors move many times during the run; the run must be valid, and the same
//! history with one kept message dropped from a node's final read must not be: retention
//! excuses only what lies below a floor.
//!
//! Needs the `server` binary next to the test binary (`cargo build -p server`).

use std::time::Duration;

use jepsen::live::nemesis::Fault;
use jepsen::live::{run_live, RunConfig};
use jepsen::{check, Anomaly, History, OpType, F_FINAL_READ, F_SEND};
use serde_json::json;

const TIME_LIMIT: Duration = Duration::from_secs(15);
const INTERVAL: Duration = Duration::from_secs(4);
const FAULTS: [Fault; 2] = [Fault::Kill, Fault::Pause];
const KEEP: u64 = 25;

#[test]
fn a_run_with_count_retention_is_valid_and_a_dropped_kept_message_is_lost() {
    if let Err(e) = testkit::server_binary() {
        panic!("{e:#}");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = RunConfig {
        rate: 30.0,
        retention: Some(KEEP.to_string()),
        ..RunConfig::loopback(7, &FAULTS, TIME_LIMIT, INTERVAL, dir.path().join("run"))
    };
    let outcome = run_live(cfg).expect("the run completes");
    let failed: Vec<_> = outcome.checks.iter().filter(|c| !c.passed).collect();
    assert!(
        outcome.valid(),
        "run invalid: anomalies {:?}, failed checks {failed:?}; see {}",
        outcome.report.found(),
        outcome.dir.display()
    );
    let stats = &outcome.report.stats;
    assert!(
        outcome
            .checks
            .iter()
            .any(|c| c.name == "retention" && c.passed),
        "{:?}",
        outcome.checks
    );
    assert!(
        stats.expired > 0,
        "no final read missed an expired message: {stats:?}"
    );

    // Expired messages are gone from the replies: a final read starts at or below its floor
    // (which may rise between its pages), and above seq 1 once the floor moved.
    let history = History::read(&outcome.dir.join("history.jsonl")).expect("history");
    let ops = history.ops().to_vec();
    let finals: Vec<_> = ops
        .iter()
        .filter(|o| o.f == F_FINAL_READ && o.kind == OpType::Ok)
        .collect();
    assert_eq!(finals.len(), 9, "3 channels from 3 nodes");
    for read in &finals {
        let msgs = read.value["msgs"].as_array().expect("msgs");
        let floor = read.value["floor"]
            .as_u64()
            .expect("a final read records the floor");
        if let Some(first) = msgs.first().and_then(|m| m[0].as_u64()) {
            assert!(
                first <= floor,
                "op {}: starts at {first} above floor {floor}",
                read.index
            );
            assert!(
                floor == 1 || first > 1,
                "op {}: expired seq 1 served",
                read.index
            );
        }
    }

    // Drop the newest acknowledged message from one final read whose floor moved: it is above
    // the floor, so it is lost, not expired.
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
                && o.value["floor"].as_u64() > Some(1)
                && o.value["msgs"].as_array().is_some_and(|m| {
                    m.iter()
                        .any(|pair| acked.iter().any(|a| pair[1] == json!(a)))
                })
        })
        .expect("a final read above a moved floor holding an acknowledged message");
    let msgs = target.value["msgs"].as_array_mut().expect("msgs");
    let at = msgs
        .iter()
        .rposition(|pair| acked.iter().any(|a| pair[1] == json!(a)))
        .expect("an acknowledged one");
    msgs.remove(at);
    let report = check(&History::new(lost).expect("still well-formed"));
    assert!(!report.valid);
    assert!(report.count(Anomaly::Lost) >= 1, "{:?}", report.found());
}
