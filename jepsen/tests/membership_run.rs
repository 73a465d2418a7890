//! The `membership` nemesis on a real 3-node loopback cluster, about 12 s of workload: a
//! follower is taken out of the membership with `server remove-node`, kept running outside the
//! cluster, then restarted so that it asks to join again. The run must be valid (nothing
//! acknowledged lost, every node including the re-added one holding the same channels), at
//! least one removal must have succeeded, and every removed node must have come back ready.
//!
//! Needs the `server` binary next to the test binary (`cargo build -p server`).

use std::time::Duration;

use jepsen::live::nemesis::{schedule, Fault};
use jepsen::live::{run_live, RunConfig};
use jepsen::{History, Process};

const TIME_LIMIT: Duration = Duration::from_secs(12);
const INTERVAL: Duration = Duration::from_secs(3);

#[test]
fn membership_run_removes_and_readds_and_stays_valid() {
    if let Err(e) = testkit::server_binary() {
        panic!("{e:#}");
    }
    let faults = [Fault::Membership];
    let seed = (0..1_000)
        .find(|&s| schedule(s, &faults, 3, TIME_LIMIT, INTERVAL).len() >= 2)
        .expect("a seed with two membership changes");
    let dir = tempfile::tempdir().expect("tempdir");
    let outcome = run_live(RunConfig::loopback(
        seed,
        &faults,
        TIME_LIMIT,
        INTERVAL,
        dir.path().join("run"),
    ))
    .expect("the run completes");
    assert!(
        outcome.valid(),
        "anomalies {:?}, checks {:?}; see {}",
        outcome.report.found(),
        outcome.checks,
        outcome.dir.display()
    );
    assert_eq!(
        outcome.report.stats.final_reads, 9,
        "3 channels from 3 nodes"
    );

    let history = History::read(&outcome.dir.join("history.jsonl")).expect("history");
    let nemesis: Vec<_> = history
        .ops()
        .iter()
        .filter(|o| o.process == Process::Nemesis)
        .collect();
    let removals: Vec<usize> = nemesis
        .iter()
        .enumerate()
        .filter(|(_, o)| o.f == "remove" && o.value["ok"] == true)
        .map(|(i, _)| i)
        .collect();
    assert!(!removals.is_empty(), "no removal succeeded: {nemesis:?}");
    for i in removals {
        let node = &nemesis[i].value["node"];
        let back = nemesis[i..]
            .iter()
            .find(|o| o.f == "start" && o.value["node"] == *node)
            .expect("a restart after the removal");
        assert_eq!(back.value["outcome"], "ready", "{node} did not come back");
    }
}
