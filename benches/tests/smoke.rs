//! The harness end to end, briefly: each scenario against a real local cluster, checking the
//! JSON it writes. Peers run when their binaries are installed (`.ci/run` installs both); a
//! missing peer must fail with a message naming what to install.

use std::path::Path;
use std::process::Command;

/// One harness run at a time: each starts a whole cluster, and a 2-core machine running
/// several at once turns every run into a failover test.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn bench(out: &Path, args: &[&str]) -> (bool, String, String) {
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let output = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(args)
        .args(["--json", "--duration", "1", "--warmup", "0.5", "--out"])
        .arg(out)
        .output()
        .expect("running bench");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn runs(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

#[test]
fn write_and_fanout_measure_cellchat() {
    let out = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr) = bench(out.path(), &["write", "--clients", "1,4"]);
    assert!(ok, "{stderr}");
    let results = runs(&stdout);
    assert_eq!(results.len(), 2, "{stdout}");
    for r in &results {
        assert_eq!(r["system"], "cellchat");
        assert!(r["ops"].as_u64().unwrap() > 0, "{r}");
        assert!(r["throughput_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["latency_ms"]["p99"].as_f64().unwrap() > 0.0, "{r}");
        // The machine's speed through the window, beside the CPU it is read with.
        for key in [
            "canary_unit_us",
            "canary_memory_us",
            "server_cpu_us_per_msg",
        ] {
            assert!(
                r["extra"][key].as_f64().is_some_and(|v| v > 0.0),
                "{key}: {r}"
            );
        }
    }
    assert!(out.path().join("write.jsonl").exists());
    assert!(out.path().join("write-throughput.svg").exists());
    // The nodes' own hop timings: the leader answered the sends, proposed them and sent
    // AppendEntries; the followers answered those.
    let nodes = results[1]["extra"]["nodes_leader_first"]
        .as_array()
        .unwrap_or_else(|| panic!("no hop timings: {}", results[1]));
    assert_eq!(nodes.len(), 3, "{}", results[1]);
    let positive = |node: &serde_json::Value, key: &str| {
        assert!(node[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {node}");
    };
    for key in [
        "send_rpc_ms_mean",
        "propose_ms_mean",
        "append_round_trip_ms_mean",
        "fsync_ms_mean",
        "apply_ms_mean",
    ] {
        positive(&nodes[0], key);
    }
    for follower in &nodes[1..] {
        positive(follower, "append_handling_ms_mean");
        positive(follower, "fsync_ms_mean");
    }

    // The signed system's subscribers verify every body under its writer's key and read the
    // stamp from the verified text.
    let (ok, stdout, stderr) = bench(
        out.path(),
        &[
            "fanout",
            "--system",
            "cellchat,cellchat-signed",
            "--subscribers",
            "5",
            "--rate",
            "50",
        ],
    );
    assert!(ok, "{stderr}");
    let results = runs(&stdout);
    assert_eq!(results.len(), 2, "{stdout}");
    for r in &results {
        assert_eq!(r["missing"], 0, "{r}");
        assert_eq!(r["duplicates"], 0, "{r}");
        assert_eq!(r["errors"], 0, "{r}");
        // Nothing is sent after the 1 s window, so a stalled run sends fewer than 50; every
        // acknowledged one reaches all 5 subscribers.
        let sent = r["extra"]["sent"].as_u64().unwrap();
        assert!(sent >= 25, "{r}");
        assert_eq!(r["ops"].as_u64().unwrap(), 5 * sent, "{r}");
        assert!(r["extra"]["ack_p50_ms"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["extra"]["sent_per_s"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert_eq!(results[1]["system"], "cellchat-signed");
}

#[test]
fn floor_measures_pings_fsyncs_wake_ups_and_pushes() {
    let out = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr) = bench(out.path(), &["floor", "--clients", "2", "--push", "5@100"]);
    assert!(ok, "{stderr}");
    let results = runs(&stdout);
    let parts: Vec<_> = results.iter().map(|r| r["extra"]["part"].clone()).collect();
    assert_eq!(
        parts,
        [
            "ping",
            "fsync",
            "fsync_shared",
            "fsync_paced",
            "wake",
            "push",
            "push_plain"
        ],
        "{stdout}"
    );
    let ping = &results[0];
    assert_eq!(ping["clients"], 2, "{ping}");
    assert_eq!(ping["errors"], 0, "{ping}");
    assert!(ping["ops"].as_u64().unwrap() > 0, "{ping}");
    assert!(
        ping["extra"]["server_cpu_us_per_msg"].as_f64().unwrap() > 0.0,
        "{ping}"
    );
    // One writer, then one per node of the default three-node cluster, 5,000 appends each.
    assert_eq!(results[1]["ops"], 5000, "{}", results[1]);
    assert_eq!(results[2]["clients"], 3, "{}", results[2]);
    assert_eq!(results[2]["ops"], 15000, "{}", results[2]);
    // The three nodes' appends, 500 rounds (5 s) at the fan-out's rate; a commit waits for two.
    let paced = &results[3];
    assert_eq!(paced["ops"], 1500, "{paced}");
    assert_eq!(paced["rate_per_s"], 100.0, "{paced}");
    assert!(
        paced["extra"]["commit_p50_ms"].as_f64().unwrap() > 0.0,
        "{paced}"
    );
    // Every message of the measured window reaches all five subscribers, over TLS and not.
    for push in &results[5..] {
        let sent = push["extra"]["sent"].as_u64().unwrap();
        assert!(sent > 0, "{push}");
        assert_eq!(push["subscribers"], 5, "{push}");
        assert_eq!(push["missing"], 0, "{push}");
        assert_eq!(push["ops"].as_u64().unwrap(), 5 * sent, "{push}");
    }
    for r in &results {
        assert!(r["latency_ms"]["p50"].as_f64().unwrap() > 0.0, "{r}");
    }
}

#[test]
fn markers_measure_the_cost_of_read_markers() {
    let out = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr) = bench(out.path(), &["markers", "--users", "5", "--rate", "10"]);
    assert!(ok, "{stderr}");
    let r = &runs(&stdout)[0];
    assert_eq!(r["scenario"], "markers", "{r}");
    assert_eq!(r["errors"], 0, "{r}");
    // Five users marking once a second for the 1 s window.
    assert!(r["ops"].as_u64().unwrap() >= 3, "{r}");
    assert!(r["latency_ms"]["p99"].as_f64().unwrap() > 0.0, "{r}");
    for key in [
        "server_cpu_percent_with_presence",
        "server_cpu_percent_with_markers",
        "presence_and_markers_cpu_percent_of_machine",
    ] {
        assert!(r["extra"][key].as_f64().is_some(), "{key}: {r}");
    }
}

#[test]
fn typing_times_notes_from_writer_to_reader() {
    let out = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr) = bench(out.path(), &["typing", "--pairs", "2"]);
    assert!(ok, "{stderr}");
    let r = &runs(&stdout)[0];
    assert_eq!(r["scenario"], "typing", "{r}");
    assert_eq!(r["errors"], 0, "no note lost: {r}");
    // Two pairs, a note each every half second, for the 1 s window.
    assert!(r["ops"].as_u64().unwrap() >= 2, "{r}");
    assert!(r["latency_ms"]["p99"].as_f64().unwrap() > 0.0, "{r}");
}

#[test]
fn search_loads_messages_and_times_queries() {
    let out = tempfile::tempdir().unwrap();
    let args = [
        "search",
        "--messages",
        "2000",
        "--channels",
        "5",
        "--users",
        "4",
        "--queries",
        "50",
        "--searchers",
        "2",
        "--write-rate",
        "50",
    ];
    let (ok, stdout, stderr) = bench(out.path(), &args);
    assert!(ok, "{stderr}");
    let results = runs(&stdout);
    assert_eq!(
        results.len(),
        2,
        "a quiet pass and one while writing: {stdout}"
    );
    for (r, part) in results.iter().zip(["quiet", "while_writing"]) {
        assert_eq!(r["scenario"], "search", "{r}");
        assert_eq!(r["extra"]["part"], part, "{r}");
        assert_eq!(r["errors"], 0, "{r}");
        assert_eq!(r["ops"], 50, "{r}");
        assert!(r["extra"]["hits"].as_u64().unwrap() > 0, "{r}");
        assert_eq!(
            r["extra"]["wrong_hits"], 0,
            "every hit matches its query: {r}"
        );
        assert!(r["latency_ms"]["p99"].as_f64().unwrap() > 0.0, "{r}");
        let kinds = r["extra"]["kinds"].as_object().unwrap();
        assert_eq!(kinds.len(), 6, "{r}");
        let queries: u64 = kinds.values().map(|k| k["queries"].as_u64().unwrap()).sum();
        assert_eq!(queries, 50, "{r}");
        // A common word, a sender and a 3-letter prefix match in any load.
        for kind in ["common word", "from:user", "prefix"] {
            assert!(kinds[kind]["hits"].as_u64().unwrap() > 0, "{kind}: {r}");
        }
    }
    let quiet = &results[0]["extra"];
    assert_eq!(quiet["messages_loaded"], 2000, "{quiet}");
    assert_eq!(quiet["load_errors"], 0, "{quiet}");
    assert!(quiet["load_rate_per_s"].as_f64().unwrap() > 0.0, "{quiet}");
    assert!(quiet["index_lag_ms"].as_f64().unwrap() > 0.0, "{quiet}");
    let nodes = quiet["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{quiet}");
    for node in nodes {
        // Every node indexes every plaintext message the cluster applied.
        assert_eq!(node["search_messages"], 2000, "{quiet}");
        assert!(node["search_mib"].as_f64().unwrap() > 0.0, "{quiet}");
    }
    let writing = &results[1]["extra"];
    assert!(writing["written"].as_u64().unwrap() > 0, "{writing}");
    assert_eq!(writing["write_errors"], 0, "{writing}");
}

#[test]
fn failover_measures_a_leader_kill() {
    let out = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr) = bench(out.path(), &["failover", "--rounds", "1", "--clients", "2"]);
    assert!(ok, "{stderr}");
    let r = &runs(&stdout)[0];
    assert_eq!(r["extra"]["rounds_not_recovered"], 0, "{r}");
    let to_ack = r["extra"]["kill_to_next_ack_ms_max"].as_f64().unwrap();
    assert!(to_ack > 0.0 && to_ack < 30_000.0, "{r}");
}

#[test]
fn backup_verifies_restores_and_measures_writes_beside_it() {
    let out = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr) = bench(
        out.path(),
        &[
            "backup",
            "--messages",
            "3000",
            "--fill-clients",
            "16",
            "--clients",
            "8",
            "--passes",
            "1",
        ],
    );
    assert!(ok, "{stderr}");
    let results = runs(&stdout);
    assert_eq!(results.len(), 2, "{stdout}");
    // Only that each step worked: how long it took depends on the machine's load.
    let archive = &results[0]["extra"];
    assert_eq!(archive["part"], "archive", "{archive}");
    assert_eq!(results[0]["ops"], 3000, "{}", results[0]);
    assert!(
        archive["messages_in_backup"].as_u64().unwrap() >= 3000,
        "{archive}"
    );
    assert!(
        archive["file_bytes"].as_u64().unwrap() > 3000 * 28,
        "{archive}"
    );
    assert_eq!(archive["verified"], true, "{archive}");
    assert_eq!(archive["restored"], true, "{archive}");
    for key in ["backup_s", "verify_s", "restore_s", "backup_tool_elapsed_s"] {
        assert!(archive[key].as_f64().unwrap() > 0.0, "{key}: {archive}");
    }
    let load = &results[1]["extra"];
    assert_eq!(load["part"], "under_load", "{load}");
    assert!(load["baseline_per_s"].as_f64().unwrap() > 0.0, "{load}");
    assert!(load["with_backups_per_s"].as_f64().unwrap() > 0.0, "{load}");
    assert!(load["backups_completed"].as_u64().unwrap() >= 1, "{load}");
    assert!(out.path().join("backup.jsonl").exists());
}

#[cfg(feature = "peers")]
#[test]
fn peers_run_or_say_what_to_install() {
    let out = tempfile::tempdir().unwrap();
    // nats-tls also proves, when it starts, that its servers refuse a plain-text client.
    for (system, install) in [
        ("etcd", "apt-get install"),
        ("nats-sync", "pip install"),
        ("nats-tls", "pip install"),
    ] {
        let (ok, stdout, stderr) =
            bench(out.path(), &["write", "--system", system, "--clients", "2"]);
        if ok {
            let r = &runs(&stdout)[0];
            assert_eq!(r["system"], system);
            assert!(r["ops"].as_u64().unwrap() > 0, "{r}");
        } else {
            assert!(
                stderr.contains(install),
                "{system} failed without saying what to install: {stderr}"
            );
        }
    }
    let (ok, _, stderr) = bench(
        out.path(),
        &[
            "write",
            "--system",
            "etcd",
            "--etcd-bin",
            "/nonexistent/etcd",
        ],
    );
    assert!(!ok);
    assert!(stderr.contains("etcd not found"), "{stderr}");
}

#[cfg(not(feature = "peers"))]
#[test]
fn peers_without_their_drivers_say_how_to_build_them() {
    let out = tempfile::tempdir().unwrap();
    let (ok, _, stderr) = bench(out.path(), &["write", "--system", "etcd", "--clients", "2"]);
    assert!(!ok);
    assert!(stderr.contains("--features peers"), "{stderr}");
}

#[test]
fn repeated_rounds_take_turns_and_carry_their_round() {
    let out = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr) = bench(
        out.path(),
        &[
            "write",
            "--system",
            "cellchat,cellchat-signed",
            "--clients",
            "1",
            "--repeat",
            "2",
        ],
    );
    assert!(ok, "{stderr}");
    let order: Vec<(String, u64)> = runs(&stdout)
        .iter()
        .map(|r| {
            let round = r["extra"]["round"].as_u64();
            (r["system"].as_str().unwrap().to_owned(), round.unwrap())
        })
        .collect();
    let expected = [
        ("cellchat", 0),
        ("cellchat-signed", 0),
        ("cellchat-signed", 1),
        ("cellchat", 1),
    ];
    assert_eq!(
        order,
        expected.map(|(s, r)| (s.to_owned(), r)),
        "the second round runs the systems in reverse"
    );
}

#[test]
fn bad_options_are_refused_clearly() {
    let out = tempfile::tempdir().unwrap();
    let (ok, _, stderr) = bench(out.path(), &["write", "--system", "redis"]);
    assert!(!ok);
    assert!(stderr.contains("unknown system"), "{stderr}");
    let (ok, _, stderr) = bench(out.path(), &["write", "--nodes", "0"]);
    assert!(!ok);
    assert!(stderr.contains("--nodes"), "{stderr}");
    let (ok, _, stderr) = bench(out.path(), &["write", "--repeat", "0"]);
    assert!(!ok);
    assert!(stderr.contains("--repeat"), "{stderr}");
}

/// Temp dirs of bench clusters (`cellchat-bench-*`) under the temp dir now.
fn bench_dirs() -> std::collections::BTreeSet<std::path::PathBuf> {
    std::fs::read_dir(std::env::temp_dir())
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with("cellchat-bench-")
                })
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Pids of live processes whose command line names `dir`.
fn processes_naming(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(&needle))
        })
        .collect()
}

#[test]
fn an_interrupted_run_stops_every_server_it_started() {
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let out = tempfile::tempdir().unwrap();
    let before = bench_dirs();
    let child = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args([
            "write",
            "--clients",
            "2",
            "--duration",
            "120",
            "--json",
            "--out",
        ])
        .arg(out.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running bench");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let dir = loop {
        let started = bench_dirs()
            .difference(&before)
            .find(|dir| processes_naming(dir).len() >= 3)
            .cloned();
        if let Some(dir) = started {
            break dir;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no 3-node cluster started within 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    // Let it measure for a moment, then stop it the way a terminal or a scheduler would.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("running kill");
    assert!(sent.success());
    let output = child.wait_with_output().expect("waiting for bench");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("stopped by SIGTERM"), "{stderr}");
    assert_eq!(
        processes_naming(&dir),
        Vec::<u32>::new(),
        "servers of {} outlived the run",
        dir.display()
    );
    assert!(!dir.exists(), "{} was left behind", dir.display());
}
