//! The simulated cluster's scenarios (`crates/testkit/scenarios/`): each file is a list of
//! commands with the output they must produce. `UPDATE_GOLDENFILES=1 cargo test -p testkit
//! --features sim --test sim` rewrites the expected output; review the diff before keeping it.

use std::path::Path;

use testkit::sim::Runner;

/// Every scenario runs with this seed (drops and delays); the schedule is then the same on
/// every run.
const SEED: u64 = 15;

fn run(name: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(name);
    let mut runner = Runner::new(SEED).expect("sim starts");
    goldenscript::run(&mut runner, &path).expect("scenario runs");
}

#[test]
fn ten_nodes_form_one_cluster() {
    run("formation");
}

#[test]
fn a_killed_leader_is_replaced_and_a_stopped_one_hands_over() {
    run("leader_kill");
}

#[test]
fn minority_and_majority_partitions() {
    run("partitions");
}

#[test]
fn a_disk_stall_on_the_leader() {
    run("disk_stall");
}

#[test]
fn membership_changes_under_load() {
    run("membership");
}

#[test]
fn the_life_of_one_chat_message() {
    run("message");
}

#[test]
fn a_lossy_reordering_network_loses_nothing_acknowledged() {
    run("lossy");
}

/// The same seed gives the same transcript: run one scenario twice and compare.
#[test]
fn a_scenario_is_deterministic_for_its_seed() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join("partitions");
    let input = std::fs::read_to_string(path).expect("scenario file");
    let first = goldenscript::generate(&mut Runner::new(SEED).expect("sim"), &input).expect("run");
    let second = goldenscript::generate(&mut Runner::new(SEED).expect("sim"), &input).expect("run");
    if first != second {
        let diff: Vec<String> = first
            .lines()
            .zip(second.lines())
            .filter(|(a, b)| a != b)
            .map(|(a, b)| format!("- {a}\n+ {b}"))
            .collect();
        panic!("two runs of one seed differ:\n{}", diff.join("\n"));
    }
}
