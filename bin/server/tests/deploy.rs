//! The deployment files in `deploy/` against real tools: systemd's own verifier accepts the
//! unit file without a warning, and the server accepts the example config file and serves with
//! it, announcing readiness over a real `NOTIFY_SOCKET`.

use std::io::{BufRead as _, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

#[test]
fn systemd_verifies_the_unit_file_without_warnings() {
    let unit = std::fs::read_to_string(deploy_dir().join("systemd/cellchat-server.service"))
        .expect("reading the unit file");
    assert!(unit.contains("ExecStart=/usr/local/bin/cellchat-server "));
    // The verifier checks that ExecStart's binary exists: point it at the one just built.
    let unit = unit.replace(
        "/usr/local/bin/cellchat-server",
        env!("CARGO_BIN_EXE_cellchat-server"),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cellchat-server.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("running systemd-analyze (Debian package systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The verifier complains about a missing multi-user.target on machines that never booted
    // systemd; anything about our file names it.
    let about_ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("cellchat-server"))
        .collect();
    assert!(out.status.success(), "{stderr}");
    assert!(about_ours.is_empty(), "{stderr}");
}

#[test]
fn a_node_started_with_the_example_config_notifies_systemd_when_ready() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let discovery_port = {
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_cellchat-server"))
        .arg("--config")
        .arg(deploy_dir().join("cellchat-server.toml"))
        .arg("--data-dir")
        .arg(dir.path().join("node"))
        .args(["--cluster", "deploy-test", "--formation-window-ms", "200"])
        .args(["--discovery-port", &discovery_port.to_string()])
        .args(["--wal-segment-mib", "1"])
        .env("NOTIFY_SOCKET", &socket_path)
        .env_remove("CELLCHAT_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the server");
    let stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let mut buf = [0u8; 256];
    let ready = socket.recv(&mut buf).map(|n| buf[..n].to_vec());
    let _ = child.kill(); // The test's own child; it may have exited already.
    let _ = child.wait();
    let log = log.join().unwrap();
    let ready = ready.unwrap_or_else(|e| panic!("no READY=1 within 60 s ({e}); log: {log:#?}"));
    let ready = String::from_utf8(ready).unwrap();
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    // The example file asks for JSON logs: every line the node wrote is one JSON object.
    assert!(!log.is_empty());
    for line in &log {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        assert!(value.get("level").is_some(), "{line}");
    }
}
