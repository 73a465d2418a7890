//! Evidence that the harness can fail: live runs against a deliberately weakened server
//! (`server --weaken`, cargo feature `weaken`, which `--all-features` builds) must be reported
//! invalid by the checker, from the history alone; the same fault against the normal server
//! must stay valid.
//!
//! - `skip-dedup` + `pause-majority` (both followers stopped past the client's 3 s send
//!   deadline, with election timeouts longer than the pause so no new leader drops the
//!   pending entries): the sends caught in the pause commit after it, their clients saw only
//!   timeouts and retried with the same key and msg, and the weakened node applied the retries
//!   as new messages, so final reads hold one msg at two seqs (`duplicate`).
//! - `ack-before-fsync` + `power-fail` (every node loses its un-fsynced WAL bytes at once):
//!   acknowledged sends vanish (`lost`). With the normal server the same schedule loses nothing.
//!
//! Loopback mode, 3 nodes, about 10 s of workload each. Needs the server binary next to the
//! test binary built with feature `weaken` (`cargo build --workspace --all-features` does;
//! testkit rebuilds a binary that lacks it, and says so).

use std::time::Duration;

use jepsen::live::nemesis::{schedule, Fault};
use jepsen::live::{run_live, RunConfig, RunOutcome};
use jepsen::Anomaly;

const INTERVAL: Duration = Duration::from_secs(2);

fn config(
    dir: &std::path::Path,
    seed: u64,
    faults: &[Fault],
    time_limit: Duration,
    weaken: &str,
) -> RunConfig {
    let out = dir.join(format!(
        "run-{}",
        if weaken.is_empty() { "normal" } else { weaken }
    ));
    RunConfig {
        // Many concurrent writers keep sends in flight at every moment, so a leader fault
        // nearly always catches some committed but unanswered.
        rate: 200.0,
        clients: 9,
        weaken: weaken.to_owned(),
        ..RunConfig::loopback(seed, faults, time_limit, INTERVAL, out)
    }
}

fn describe(outcome: &RunOutcome) -> String {
    format!(
        "anomalies {:?}, checks {:?}; see {}",
        outcome.report.found(),
        outcome
            .checks
            .iter()
            .filter(|c| !c.passed)
            .collect::<Vec<_>>(),
        outcome.dir.display()
    )
}

#[test]
fn skip_dedup_under_majority_pauses_is_reported_duplicate() {
    if let Err(e) = testkit::server_binary_with_weaken() {
        panic!("{e:#}");
    }
    let faults = [Fault::PauseMajority];
    let time_limit = Duration::from_secs(12);
    let seed = (0..1_000)
        .find(|&s| !schedule(s, &faults, 3, time_limit, INTERVAL).is_empty())
        .expect("a seed with a majority pause");
    let dir = tempfile::tempdir().expect("tempdir");
    // Election timeouts longer than the pause: when the followers resume they take the
    // leader's buffered entries instead of electing a leader without them, so the sends that
    // timed out during the pause commit, and so do their retries.
    let slow_elections = ["--election-min-ms", "6000", "--election-max-ms", "7000"]
        .map(str::to_owned)
        .to_vec();
    let mut cfg = config(dir.path(), seed, &faults, time_limit, "skip-dedup");
    cfg.server_args.clone_from(&slow_elections);
    let weak = run_live(cfg).expect("the weakened run completes");
    assert!(!weak.report.valid, "{}", describe(&weak));
    assert!(
        weak.report.count(Anomaly::Duplicate) >= 1,
        "expected duplicates: {}",
        describe(&weak)
    );

    // The same schedule against the normal server: the retries are deduplicated.
    let mut cfg = config(dir.path(), seed, &faults, time_limit, "");
    cfg.server_args = slow_elections;
    let normal = run_live(cfg).expect("the normal run completes");
    assert!(normal.valid(), "{}", describe(&normal));
}

#[test]
fn power_failure_loses_acknowledged_sends_only_with_ack_before_fsync() {
    if let Err(e) = testkit::server_binary_with_weaken() {
        panic!("{e:#}");
    }
    let faults = [Fault::PowerFail];
    let time_limit = Duration::from_secs(10);
    let seed = (0..1_000)
        .find(|&s| schedule(s, &faults, 3, time_limit, INTERVAL).len() >= 2)
        .expect("a seed with two power failures");

    let dir = tempfile::tempdir().expect("tempdir");
    let weak = run_live(config(
        dir.path(),
        seed,
        &faults,
        time_limit,
        "ack-before-fsync",
    ))
    .expect("the weakened run completes");
    assert!(!weak.report.valid, "{}", describe(&weak));
    assert!(
        weak.report.count(Anomaly::Lost) >= 1,
        "expected lost acknowledged sends: {}",
        describe(&weak)
    );

    let normal = run_live(config(dir.path(), seed, &faults, time_limit, ""))
        .expect("the normal run completes");
    assert!(normal.valid(), "{}", describe(&normal));
    assert!(
        normal.report.stats.acknowledged_sends > 50,
        "too few sends to mean anything: {:?}",
        normal.report.stats
    );
}
