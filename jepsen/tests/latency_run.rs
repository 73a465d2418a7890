//! The `latency` nemesis on a real 3-node loopback cluster, about 10 s of workload: every node
//! sits behind user-space delay proxies, and the nemesis delays one node at a time. The run
//! must be valid, and the delay must be real: every client operation on the delayed node that
//! started and ended inside its window took at least two one-way delays (request in, answer
//! out), since the proxy holds each chunk for the delay set when it was read.
//!
//! Needs the `server` binary next to the test binary (`cargo build -p server`).

use std::time::Duration;

use jepsen::live::nemesis::{schedule, Fault};
use jepsen::live::{run_live, RunConfig};
use jepsen::{History, OpType, Process, F_READ, F_SEND};

const TIME_LIMIT: Duration = Duration::from_secs(10);
const INTERVAL: Duration = Duration::from_secs(2);

#[test]
fn latency_run_is_valid_and_delays_the_target_node() {
    if let Err(e) = testkit::server_binary() {
        panic!("{e:#}");
    }
    let faults = [Fault::Latency];
    let seed = (0..1_000)
        .find(|&s| schedule(s, &faults, 3, TIME_LIMIT, INTERVAL).len() >= 2)
        .expect("a seed with two latency windows");
    let dir = tempfile::tempdir().expect("tempdir");
    let outcome = run_live(RunConfig {
        rate: 60.0,
        clients: 6,
        ..RunConfig::loopback(seed, &faults, TIME_LIMIT, INTERVAL, dir.path().join("run"))
    })
    .expect("the run completes");
    assert!(
        outcome.valid(),
        "anomalies {:?}, checks {:?}; see {}",
        outcome.report.found(),
        outcome.checks,
        outcome.dir.display()
    );

    let history = History::read(&outcome.dir.join("history.jsonl")).expect("history");
    let ops = history.ops();
    // (node, delay, start, end) of each window, in ns since the start.
    let mut windows = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        if op.process == Process::Nemesis && op.f == "start-latency" {
            let node = op.value["node"].as_str().expect("node").to_owned();
            let delay_ns = op.value["delay_ms"].as_u64().expect("delay") * 1_000_000;
            let end = ops[i..]
                .iter()
                .find(|o| o.f == "stop-latency")
                .map_or(u64::MAX, |o| o.time);
            windows.push((node, delay_ns, op.time, end));
        }
    }
    assert!(!windows.is_empty(), "no latency window in the history");
    let mut checked = 0;
    for (i, invoke) in ops.iter().enumerate() {
        // Sends and reads are RPCs; `resubscribe` is bookkeeping without one.
        let rpc = invoke.f == F_SEND || invoke.f == F_READ;
        if invoke.kind != OpType::Invoke || invoke.process == Process::Nemesis || !rpc {
            continue;
        }
        let Some(done) = ops[i + 1..]
            .iter()
            .find(|o| o.process == invoke.process && o.kind != OpType::Invoke)
        else {
            continue;
        };
        if done.kind != OpType::Ok {
            continue;
        }
        for (node, delay_ns, start, end) in &windows {
            let on_node = invoke.node.as_deref() == Some(node.as_str());
            if on_node && invoke.time > *start && done.time < *end {
                checked += 1;
                assert!(
                    done.time - invoke.time >= 2 * delay_ns,
                    "op {} on {node} took {} ns in a {delay_ns} ns window",
                    invoke.index,
                    done.time - invoke.time
                );
            }
        }
    }
    assert!(checked > 0, "no operation ran on a delayed node");
}
