//! The web client in a real browser: Debian's Chromium, driven by the node scripts in
//! `tests/web/` (playwright-core, pinned in `tests/web/package-lock.json`; `npm ci` there
//! installs it, as `.ci/run` does).
//!
//! - `crypto_vectors_in_chromium`: `web/static/js/crypto.js` in the browser opens what the
//!   Rust client made (`web_vectors` example), and the Rust client checks what the browser
//!   made (`web_vectors --verify`).
//! - The scenarios run `node tests/web/scenarios.mjs NAME` against a three-node cluster serving
//!   the page (`--web 127.0.0.1:0`): browsers and the `cellchat` CLI chat with each other,
//!   in the clear and end-to-end encrypted; a page follows a channel through a kill -9 of its
//!   node; a node meets bad WebSocket input. The script asks for a node's death on its stdout
//!   (`KILL <web URL>`), and hears `KILLED` on its stdin once the process is gone. Its
//!   screenshots go to `<target dir>/web-tests/`, and their paths are printed.
//!
//! Timeouts are generous bounds for a loaded 2-core machine, not performance claims.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use testkit::TestCluster;

const READY: Duration = Duration::from_secs(60);
const CONVERGE: Duration = Duration::from_secs(60);
/// How long one node script may run before it is killed and the test fails.
const SCRIPT: Duration = Duration::from_secs(240);

/// The repository's root (this package is `tests/`).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The profile directory (e.g. `target/release`) of the running test binary, where testkit
/// finds the server and client too.
fn profile_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test binary")?;
    let mut dir = exe
        .parent()
        .context("test binary has no parent")?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

/// `node` with the test scripts' packages installed, or an error saying how to get them.
fn node() -> anyhow::Result<Command> {
    let web = repo_root().join("tests/web");
    ensure!(
        web.join("node_modules/playwright-core").is_dir(),
        "the browser tests need their node packages: run \
         `PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci` in {} (.ci/run does)",
        web.display()
    );
    let browser =
        std::env::var_os("CELLCHAT_CHROMIUM").unwrap_or_else(|| "/usr/bin/chromium".into());
    ensure!(
        Path::new(&browser).exists(),
        "{} not found: the browser tests need Debian's Chromium \
         (`apt-get install chromium chromium-driver`; .ci/run does)",
        Path::new(&browser).display()
    );
    let mut command = Command::new("node");
    command.current_dir(&web);
    // The CLI the scripts run gets this cluster's flags; none of the caller's settings.
    for var in [
        "CELLCHAT_JOIN",
        "CELLCHAT_BROADCAST",
        "CELLCHAT_CHANNEL",
        "CELLCHAT_TOKEN",
        "CELLCHAT_JSON",
        "CELLCHAT_PASSPHRASE_FILE",
        "CELLCHAT_KEY_PASSPHRASE_FILE",
    ] {
        command.env_remove(var);
    }
    Ok(command)
}

/// The `web_vectors` example of `cellchat-client`, built (`cargo build --release -p
/// cellchat-client --example web_vectors`) into the same target dir as this test, or built here
/// when it is missing.
fn web_vectors_binary() -> anyhow::Result<PathBuf> {
    let dir = profile_dir()?;
    let binary = dir.join("examples/web_vectors");
    if binary.exists() {
        return Ok(binary);
    }
    let profile = dir
        .file_name()
        .and_then(|n| n.to_str())
        .context("profile dir name")?;
    let target_dir = dir.parent().context("profile dir has no parent")?;
    eprintln!("{} missing: building it", binary.display());
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .args(["build", "-p", "cellchat-client", "--example", "web_vectors"])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(repo_root());
    match profile {
        "release" => {
            command.arg("--release");
        }
        "debug" => {}
        other => {
            command.args(["--profile", other]);
        }
    }
    let status = command
        .status()
        .context("running cargo build for web_vectors")?;
    ensure!(status.success(), "building web_vectors failed ({status})");
    ensure!(
        binary.exists(),
        "{} still missing after building it",
        binary.display()
    );
    Ok(binary)
}

/// Runs `command` to its end, killing it (by its pid) after `timeout`; returns its output.
fn run_bounded(mut command: Command, timeout: Duration) -> anyhow::Result<std::process::Output> {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // The test may have stopped waiting; nothing to do then.
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(output) => Ok(output?),
        Err(_) => {
            // Our own child, not yet reaped (the thread above reaps it), so the pid is its own.
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            let _ = rx.recv_timeout(Duration::from_secs(10));
            bail!("{command:?} did not finish within {timeout:?}: killed");
        }
    }
}

fn ensure_success(what: &str, output: &std::process::Output) -> anyhow::Result<()> {
    ensure!(
        output.status.success(),
        "{what} failed ({}):\n--- stdout:\n{}\n--- stderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

#[test]
fn crypto_vectors_in_chromium() -> anyhow::Result<()> {
    let started = Instant::now();
    let vectors_bin = web_vectors_binary()?;
    let dir = tempfile::Builder::new()
        .prefix("cellchat-web-vectors-")
        .tempdir()?;
    let (vectors, samples) = (dir.path().join("vectors.json"), dir.path().join("js.json"));

    let made = run_bounded(Command::new(&vectors_bin), Duration::from_secs(120))?;
    ensure_success("web_vectors", &made)?;
    std::fs::write(&vectors, &made.stdout)?;

    let mut script = node()?;
    script.arg("vectors.mjs").arg(&vectors).arg(&samples);
    let checked = run_bounded(script, Duration::from_secs(180))?;
    eprint!("{}", String::from_utf8_lossy(&checked.stdout));
    eprint!("{}", String::from_utf8_lossy(&checked.stderr));
    ensure_success("the vectors in Chromium (tests/web/vectors.mjs)", &checked)?;

    let mut verify = Command::new(&vectors_bin);
    verify.arg("--verify").arg(&samples);
    let verified = run_bounded(verify, Duration::from_secs(120))?;
    eprint!("{}", String::from_utf8_lossy(&verified.stderr));
    ensure_success("web_vectors --verify of what Chromium made", &verified)?;
    eprintln!(
        "vectors checked both ways in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Where the scenarios put their screenshots: `<target dir>/web-tests/`.
fn test_out() -> anyhow::Result<PathBuf> {
    let dir = profile_dir()?
        .parent()
        .context("profile dir has no parent")?
        .join("web-tests");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Starts a three-node cluster serving the page, runs `scenarios.mjs NAME` against it,
/// serves its `KILL` requests, and fails unless it exits 0 within [`SCRIPT`].
async fn scenario(name: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut cluster = TestCluster::new(&format!("web-{name}"), &["--web", "127.0.0.1:0"])?;
    testkit::start_nodes(&mut cluster, 3, READY, CONVERGE).await?;
    let urls: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| {
            let web = n
                .ready()
                .and_then(|r| r.web)
                .context("a node names no web address")?;
            Ok(format!("http://{web}"))
        })
        .collect::<anyhow::Result<_>>()?;
    let cli_args: Vec<String> = cluster
        .admin_flags()
        .into_iter()
        .map(|f| f.to_string_lossy().into_owned())
        .collect();
    let out = test_out()?;
    eprintln!(
        "scenario {name}: cluster up in {:.1} s, web {urls:?}, screenshots in {}",
        started.elapsed().as_secs_f64(),
        out.display()
    );
    let mut script = node()?;
    script
        .args(["scenarios.mjs", name])
        .env("CELLCHAT_WEB_URLS", urls.join(","))
        .env("CELLCHAT_CLI", testkit::client_binary()?)
        .env("CELLCHAT_CLI_ARGS", serde_json::to_string(&cli_args)?)
        .env("CELLCHAT_TEST_OUT", &out)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = script.spawn().context("starting node scenarios.mjs")?;
    let result = tokio::task::block_in_place(|| drive(&mut cluster, child, &urls));
    eprintln!(
        "scenario {name}: {} in {:.1} s",
        if result.is_ok() { "passed" } else { "FAILED" },
        started.elapsed().as_secs_f64()
    );
    if result.is_err() {
        for (i, node) in cluster.nodes.iter().enumerate() {
            eprintln!("--- node {} log tail:\n{}", i + 1, node.log_tail(10));
        }
    }
    result
}

/// Follows the script: echoes its output, kills the node a `KILL <url>` line names and
/// answers `KILLED`; kills the script (by pid) if it runs past [`SCRIPT`].
fn drive(cluster: &mut TestCluster, mut child: Child, urls: &[String]) -> anyhow::Result<()> {
    let mut stdin = child.stdin.take().context("script stdin")?;
    let stdout = child.stdout.take().context("script stdout")?;
    let stderr = child.stderr.take().context("script stderr")?;
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Its stderr is echoed, and its last lines kept for the error.
    let (err_done, err_closed) = mpsc::channel::<Vec<String>>();
    std::thread::spawn(move || {
        let mut last = std::collections::VecDeque::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("  ! {line}");
            if last.len() == 30 {
                last.pop_front();
            }
            last.push_back(line);
        }
        let _ = err_done.send(last.into());
    });
    let deadline = Instant::now() + SCRIPT;
    let outcome = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_millis(500))) {
            Ok(line) => {
                eprintln!("  | {line}");
                if let Some(url) = line.strip_prefix("KILL ") {
                    let index = urls.iter().position(|u| u == url.trim()).with_context(|| {
                        format!("KILL of an unknown node {url:?} (nodes: {urls:?})")
                    });
                    let index = match index {
                        Ok(index) => index,
                        Err(e) => break Err(e),
                    };
                    cluster.nodes[index].kill9();
                    eprintln!("  killed node {} ({url})", index + 1);
                    if let Err(e) = stdin.write_all(b"KILLED\n").and_then(|()| stdin.flush()) {
                        break Err(anyhow::anyhow!("telling the script KILLED: {e}"));
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if Instant::now() >= deadline {
                    break Err(anyhow::anyhow!("the script ran past {SCRIPT:?}"));
                }
            }
            // Its stdout closed: it is ending.
            Err(mpsc::RecvTimeoutError::Disconnected) => break Ok(()),
        }
    };
    let status = match outcome {
        Ok(()) => {
            let end = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(status) = child.try_wait()? {
                    break Some(status);
                }
                if Instant::now() > end {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Err(_) => None,
    };
    if status.is_none() {
        stop(&mut child);
    }
    // Its stderr closes when it and its children are gone; do not wait past that for long.
    let said = err_closed
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_default()
        .join("\n");
    outcome.with_context(|| format!("the script's last words:\n{said}"))?;
    let status = status.context("the script closed its stdout but did not exit")?;
    ensure!(
        status.success(),
        "the scenario script failed ({status}):\n{said}"
    );
    Ok(())
}

/// Stops the script: SIGTERM first, so it closes its browser, then SIGKILL after 10 s.
fn stop(child: &mut Child) {
    // Our own child, unreaped until the wait below, so the pid is its own.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browsers_and_a_cli_chat() -> anyhow::Result<()> {
    scenario("two_browsers_and_a_cli_chat").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_across_browser_and_cli() -> anyhow::Result<()> {
    scenario("encrypted_across_browser_and_cli").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_without_gap_or_duplicate() -> anyhow::Result<()> {
    scenario("failover_without_gap_or_duplicate").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input() -> anyhow::Result<()> {
    scenario("bad_input").await
}
