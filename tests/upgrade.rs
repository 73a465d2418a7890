//! Upgrades keep every message: data directories written by older releases open on today's
//! server and serve every message through today's client.
//!
//! - `fixtures/datadir-v1` (the release before node names; see its README): log, vote and
//!   membership encodings of version 1, a snapshot and log entries after it. Today's server
//!   takes its default name, leads its one-node cluster again, and serves all 30 messages.
//! - `fixtures/datadir-v2` (the last openraft 0.9 release, 25d4b47; see its README): node-1 of
//!   a three-voter cluster, with a snapshot, log entries after it and the old
//!   `log/purged-log-id` file. Started alone it cannot elect a leader (its two peers are not
//!   there), so it never prints `ready`; it still serves its applied history (to the client
//!   identity `reader`, registered when the fixture was made and kept beside it), which must
//!   hold all 60 messages on both channels in order, and it moves the purged log id into
//!   raft-log's purge point and removes the old file.

use std::io::{BufRead as _, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
        assert!(ready.contains(" name=n1"), "{ready}");
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

/// The fixture's second data dir format: what `log/purged-log-id` held (a log id sealed with
/// a CRC-32/IEEE, little endian, as `node::atomic_file::seal` writes it).
fn old_purged_log_id(log_dir: &Path) -> anyhow::Result<node::LogId> {
    let bytes = std::fs::read(log_dir.join("purged-log-id")).context("reading purged-log-id")?;
    let split = bytes
        .len()
        .checked_sub(4)
        .context("purged-log-id too short")?;
    let (body, _crc) = bytes.split_at(split);
    node::codec::decode_log_id(body)
        .context("decoding purged-log-id")?
        .context("purged-log-id holds no log id")
}

/// Runs today's client in `--history` mode against the cluster until it prints `count`
/// messages of `channel` or `deadline` passes; returns the last answer's messages.
fn history_until(
    client: &Path,
    config_dir: &Path,
    discovery_port: &str,
    channel: &str,
    count: usize,
    deadline: Instant,
) -> anyhow::Result<Vec<serde_json::Value>> {
    loop {
        let out = Command::new(client)
            .args(["reader", "--history", "100", "--json", "--channel", channel])
            .args(["--cluster", CLUSTER_V2, "--discovery-port", discovery_port])
            .arg("--config-dir")
            .arg(config_dir)
            .env_remove("CELLCHAT_JOIN")
            .output()
            .context("running the client")?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let messages: Vec<serde_json::Value> = if out.status.success() {
            String::from_utf8(out.stdout)?
                .lines()
                .map(serde_json::from_str)
                .collect::<Result<_, _>>()?
        } else {
            Vec::new()
        };
        if messages.len() >= count {
            return Ok(messages);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "#{channel}: {} of {count} messages before the deadline; client stderr: {stderr}",
            messages.len()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

const CLUSTER_V2: &str = "fixture-v2";

#[test]
fn a_data_dir_of_the_last_openraft_0_9_release_opens_with_every_message_and_its_purged_log_id(
) -> anyhow::Result<()> {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/datadir-v2/node-1");
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("node-1");
    copy_dir(&fixture, &data).context("copying the fixture")?;
    let log_dir = data.join("log");
    let old_purged = old_purged_log_id(&log_dir)?;
    let discovery_port = testkit::free_udp_port().to_string();
    let server = testkit::server_binary()?;
    // The fixture's kept ports may be taken on this machine: fresh ones are given instead.
    // Its two peers are absent, so it stays a follower without a leader: no `ready` line.
    let mut child = Command::new(&server)
        .arg("--data-dir")
        .arg(&data)
        .args(["--cluster", CLUSTER_V2, "--discovery-port", &discovery_port])
        .args(["--raft-port", &free_tcp_port()?.to_string()])
        .args(["--client-port", &free_tcp_port()?.to_string()])
        .args(["--metrics-port", &free_tcp_port()?.to_string()])
        .args(["--wal-segment-mib", "1", "--formation-window-ms", "200"])
        .env_remove("CELLCHAT_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the server")?;
    let outcome = (|| -> anyhow::Result<()> {
        let client = server.with_file_name(testkit::CLIENT_BIN);
        // Logging in under a new name is a Raft write, which a node without a leader cannot
        // make: the reader uses the key it registered with when the fixture was made.
        let config_dir = dir.path().join("client");
        let key = Path::new("identities").join(CLUSTER_V2).join("reader.key");
        std::fs::create_dir_all(config_dir.join(&key).parent().expect("has a parent"))?;
        std::fs::copy(
            fixture.with_file_name("client").join(&key),
            config_dir.join(&key),
        )?;
        // Git does not keep the mode the client asks of a key file.
        std::fs::set_permissions(
            config_dir.join(&key),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )?;
        let deadline = Instant::now() + Duration::from_secs(60);
        for (channel, sender) in [("general", "alice"), ("random", "bob")] {
            let messages =
                history_until(&client, &config_dir, &discovery_port, channel, 30, deadline)?;
            let texts: Vec<&str> = messages.iter().filter_map(|m| m["text"].as_str()).collect();
            let expected: Vec<String> =
                (1..=30).map(|i| format!("{channel} message {i}")).collect();
            assert_eq!(texts, expected, "{messages:#?}");
            for (m, seq) in messages.iter().zip(1..) {
                assert_eq!(m["seq"], seq, "{m}");
                assert_eq!(m["sender"], sender, "{m}");
            }
        }
        // The history was served, so the log has been opened and the file moved.
        assert!(
            !log_dir.join("purged-log-id").exists(),
            "the old purged-log-id file is still there"
        );
        Ok(())
    })();
    let _ = child.kill(); // Our own child; it may have exited already.
    let _ = child.wait();
    outcome?;
    // The id lives on in raft-log's purge point, at or past the old one (a purge is never
    // undone; today's server may have purged further at start).
    let log = node::LogStore::open(&log_dir).context("opening the log after the run")?;
    let point = log
        .wal()
        .purged()
        .context("no purge point after the move")?;
    let payload = point.payload.context("the purge point carries no log id")?;
    let purged = node::codec::decode_log_id(&payload)?.context("an empty purged log id")?;
    assert_eq!(
        purged.index, point.index.0,
        "payload and purge point disagree"
    );
    assert!(
        purged >= old_purged,
        "purged {purged:?} is behind the old file's {old_purged:?}"
    );
    Ok(())
}
