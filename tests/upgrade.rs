//! Upgrades keep every message: a data directory written by the release before node names
//! (`fixtures/datadir-v1`, see its README: log, vote and membership encodings of version 1, a
//! snapshot and log entries after it) opens on today's server, which takes its default name,
//! leads its one-node cluster again, and serves all 30 messages through today's client.

use std::io::{BufRead as _, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;

const CLUSTER: &str = "fixture-v1";

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[test]
fn a_data_dir_of_the_release_before_names_opens_with_every_message() -> anyhow::Result<()> {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/datadir-v1/node-1");
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("node-1");
    copy_dir(&fixture, &data).context("copying the fixture")?;
    let discovery_port = testkit::free_udp_port().to_string();
    let server = testkit::server_binary()?;
    // The fixture's kept ports may be taken on this machine: fresh ones are given instead.
    let mut child = Command::new(&server)
        .arg("--data-dir")
        .arg(&data)
        .args(["--cluster", CLUSTER, "--discovery-port", &discovery_port])
        .args(["--raft-port", &free_tcp_port()?.to_string()])
        .args(["--client-port", &free_tcp_port()?.to_string()])
        .args(["--metrics-port", &free_tcp_port()?.to_string()])
        .args(["--wal-segment-mib", "1", "--formation-window-ms", "200"])
        .env_remove("CELLCHAT_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the server")?;
    let stdout = child.stdout.take().context("server stdout")?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("ready ") {
                let _ = ready_tx.send(line); // The test may have given up waiting.
            }
        }
    });
    let outcome = (|| -> anyhow::Result<()> {
        let ready = ready_rx
            .recv_timeout(Duration::from_secs(60))
            .context("no ready line within 60 s")?;
        assert!(ready.ends_with(" name=n1"), "{ready}");
        let config_dir = dir.path().join("client");
        let out = Command::new(server.with_file_name(testkit::CLIENT_BIN))
            .args(["reader", "--history", "100", "--json"])
            .args(["--cluster", CLUSTER, "--discovery-port", &discovery_port])
            .arg("--config-dir")
            .arg(&config_dir)
            .env_remove("CELLCHAT_JOIN")
            .output()
            .context("running the client")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let messages: Vec<serde_json::Value> = String::from_utf8(out.stdout)?
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        let texts: Vec<&str> = messages.iter().filter_map(|m| m["text"].as_str()).collect();
        let expected: Vec<String> = (1..=30).map(|i| format!("message {i}")).collect();
        assert_eq!(texts, expected, "{messages:#?}");
        for (m, seq) in messages.iter().zip(1..) {
            assert_eq!(m["seq"], seq, "{m}");
            assert_eq!(m["sender"], "alice", "{m}");
        }
        Ok(())
    })();
    let _ = child.kill(); // Our own child; it may have exited already.
    let _ = child.wait();
    outcome
}
