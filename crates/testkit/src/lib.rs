//! Test helpers: start real server processes on loopback, each test cluster with its own
//! cluster name and discovery port (so parallel tests never merge), and talk to them.
//!
//! Every process a `TestCluster` starts is killed by pid when the cluster is dropped, even if
//! the test panics.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub mod push;
#[cfg(feature = "sim")]
pub mod sim;

use anyhow::{bail, Context as _};
use ed25519_dalek::{Signer, SigningKey};
use proto::discovery::{DiscoverySocket, NodeAnnounce, Packet};
use proto::{ApiError, ChatClient, Hello, Login, SendReply, SendRequest};

/// File name of the server executable (package `server`).
pub const SERVER_BIN: &str = "cellchat-server";
/// File name of the command-line client executable (package `client`).
pub const CLIENT_BIN: &str = "cellchat";

/// Where cargo put the server binary: next to the test binary's `deps/` directory.
///
/// Tests use the binaries the user built (`cargo run -p server`, `cargo build`, or the
/// workspace test command, which builds every binary). When they are missing, this builds them
/// once per test process (`cargo build -p server -p client`, same profile and target dir as the
/// running test), which is the same package selection as the README's run commands and so
/// reuses their dependencies.
///
/// # Errors
/// When they are not there and cannot be built.
pub fn server_binary() -> anyhow::Result<PathBuf> {
    let dir = profile_dir()?;
    let server = dir.join(SERVER_BIN);
    if !server.exists() || !dir.join(CLIENT_BIN).exists() {
        build_binaries(&dir, &[])?;
    }
    if !server.exists() {
        bail!(
            "{} not found: build it first with `cargo build -p server -p client`",
            server.display()
        );
    }
    Ok(server)
}

/// The command-line client next to the server binary (built with it by [`server_binary`]).
///
/// # Errors
/// When it cannot be found or built.
pub fn client_binary() -> anyhow::Result<PathBuf> {
    let client = server_binary()?.with_file_name(CLIENT_BIN);
    if !client.exists() {
        bail!(
            "{} not found: build it with `cargo build -p client`",
            client.display()
        );
    }
    Ok(client)
}

/// Like [`server_binary`], but a server built with the cargo feature `weaken` (the
/// deliberately broken modes the fault-injection harness must catch). A binary without it,
/// such as the one `cargo run -p server` builds, is rebuilt with it here, and the test says so
/// on stderr: the feature only adds modes that stay off unless named, so the rebuilt binary
/// serves every other test as before.
///
/// # Errors
/// When it cannot be found, run or built.
pub fn server_binary_with_weaken() -> anyhow::Result<PathBuf> {
    static CHECKED: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut checked = CHECKED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let server = server_binary()?;
    if *checked || has_weaken(&server)? {
        *checked = true;
        return Ok(server);
    }
    eprintln!(
        "{} was built without feature `weaken`; building it with \
         `cargo build -p server --features server/weaken -p client`",
        server.display()
    );
    build_binaries(&profile_dir()?, &["--features", "server/weaken"])?;
    if !has_weaken(&server)? {
        bail!(
            "{} still lacks feature `weaken` after building it",
            server.display()
        );
    }
    *checked = true;
    Ok(server)
}

/// Whether `server --version` names the `weaken` feature.
fn has_weaken(server: &Path) -> anyhow::Result<bool> {
    let out = Command::new(server)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", server.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout).contains("weaken"))
}

/// The profile directory (e.g. `target/release`) of the running test binary.
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

/// Builds the server and client into the profile directory `dir` (e.g. `target/release`),
/// with `extra` cargo arguments.
fn build_binaries(dir: &Path, extra: &[&str]) -> anyhow::Result<()> {
    static BUILT: std::sync::Mutex<Vec<Vec<String>>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let key: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
    if built.contains(&key) {
        return Ok(());
    }
    let profile = dir
        .file_name()
        .and_then(|n| n.to_str())
        .context("profile directory has no name")?
        .to_owned();
    let target_dir = dir.parent().context("profile directory has no parent")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .args(["build", "-p", "server", "-p", "client"])
        .args(extra)
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile == "release" {
        command.arg("--release");
    } else if profile != "debug" {
        command.args(["--profile", &profile]);
    }
    let status = command
        .status()
        .context("running cargo build for the server")?;
    if !status.success() {
        bail!("cargo build -p server -p client {extra:?} failed ({status})");
    }
    built.push(key);
    Ok(())
}

/// A free UDP port on loopback (bound and released; good enough for a test's discovery port).
pub fn free_udp_port() -> u16 {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding a UDP port");
    socket.local_addr().expect("local addr").port()
}

/// What a node printed on its `ready` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    /// Node id.
    pub id: u64,
    /// Chat RPC address.
    pub client: SocketAddr,
    /// Raft RPC address.
    pub raft: SocketAddr,
    /// Metrics address.
    pub metrics: SocketAddr,
    /// Web client address (`web=`); `None` from a node that serves no web client.
    pub web: Option<SocketAddr>,
}

/// Parses a server's `ready node=.. client=.. raft=.. metrics=.. data=.. [web=URL]` line.
pub fn parse_ready(line: &str) -> Option<Ready> {
    let rest = line.strip_prefix("ready ")?;
    let mut id = None;
    let mut client = None;
    let mut raft = None;
    let mut metrics = None;
    let mut web = None;
    for part in rest.split_whitespace() {
        let (key, value) = part.split_once('=')?;
        match key {
            "node" => id = value.parse().ok(),
            "client" => client = value.parse().ok(),
            "raft" => raft = value.parse().ok(),
            "metrics" => metrics = value.parse().ok(),
            "web" => {
                let addr = value
                    .trim_start_matches("http://")
                    .trim_start_matches("https://");
                web = addr.parse().ok();
            }
            _ => {}
        }
    }
    Some(Ready {
        id: id?,
        client: client?,
        raft: raft?,
        metrics: metrics?,
        web,
    })
}

/// One server process.
pub struct NodeProc {
    child: Option<Child>,
    data_dir: PathBuf,
    log: PathBuf,
    ready_rx: Option<mpsc::Receiver<Ready>>,
    ready: Option<Ready>,
}

impl NodeProc {
    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The node's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// What the node printed when ready (waits for it if needed).
    ///
    /// # Errors
    /// The node exited or did not get ready within `timeout`.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<Ready> {
        if let Some(ready) = &self.ready {
            return Ok(*ready);
        }
        let rx = self.ready_rx.as_ref().context("node was not started")?;
        let ready = rx.recv_timeout(timeout).map_err(|_| {
            anyhow::anyhow!(
                "node in {} not ready within {timeout:?}; log:\n{}",
                self.data_dir.display(),
                tail(&self.log, 40)
            )
        })?;
        self.ready = Some(ready);
        Ok(ready)
    }

    /// The last ready line seen (after `wait_ready`).
    pub fn ready(&self) -> Option<&Ready> {
        self.ready.as_ref()
    }

    /// The last lines of the node's log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// Sends `signal` (as `kill` names it, e.g. `-STOP`) to the node: our own unreaped child,
    /// so its pid cannot name another process.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self.pid().context("node not running")?;
        let sent = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()?;
        anyhow::ensure!(sent.success(), "kill {signal} {pid} failed");
        Ok(())
    }

    /// kill -9, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The process may have exited already; either way it is gone after wait().
            let _ = child.kill();
            let _ = child.wait();
        }
        self.ready_rx = None;
    }

    /// SIGTERM, then wait up to `timeout` for a clean exit (kill -9 after that).
    /// Returns whether it exited by itself.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        // The pid is our own unreaped child, so it cannot name another process.
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        if !sent.is_ok_and(|s| s.success()) {
            let _ = child.kill();
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Waits up to `timeout` for the process to exit by itself and returns its status (`None`:
    /// still running, or not started).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Test clusters of one test process run one at a time: a 2-core machine running several
/// clusters of debug builds at once starves their heartbeats and turns every test into a
/// failover test. `TestCluster::new` waits for the slot; dropping the cluster frees it.
struct ClusterSlot;

static SLOT_TAKEN: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
static SLOT_FREED: std::sync::Condvar = std::sync::Condvar::new();

impl ClusterSlot {
    fn take() -> ClusterSlot {
        let mut taken = SLOT_TAKEN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while *taken {
            taken = SLOT_FREED
                .wait(taken)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        *taken = true;
        ClusterSlot
    }
}

impl Drop for ClusterSlot {
    fn drop(&mut self) {
        *SLOT_TAKEN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = false;
        SLOT_FREED.notify_one();
    }
}

/// Set this environment variable to keep every test cluster's directory (node data and logs)
/// after the cluster is dropped, for reading the logs of a failed test or a benchmark run.
pub const KEEP_DIRS_ENV: &str = "CELLCHAT_KEEP_TEST_DIRS";

/// Set this environment variable to a tracing filter to override test nodes' `--log`.
pub const NODE_LOG_ENV: &str = "CELLCHAT_TEST_NODE_LOG";

fn node_log_filter() -> String {
    std::env::var(NODE_LOG_ENV).unwrap_or_else(|_| "info,openraft=warn,tarpc=warn".to_owned())
}

/// The server's default `--max-voters`: joiners beyond it stay learners.
const DEFAULT_MAX_VOTERS: usize = 5;

/// Server flags for test clusters: Raft timing with more slack than the production defaults,
/// because a loaded 2-core machine running debug builds can stall a process for longer than
/// 300 ms, and small preallocated log segments, because a test starts dozens of fresh nodes
/// and each zero-fills its first segment.
const TEST_SERVER_ARGS: [&str; 8] = [
    "--wal-segment-mib",
    "4",
    "--heartbeat-ms",
    "100",
    "--election-min-ms",
    "500",
    "--election-max-ms",
    "1000",
];

/// A cluster of server processes private to one test.
pub struct TestCluster {
    dir: tempfile::TempDir,
    /// The cluster name, unique per test cluster.
    pub cluster: String,
    /// The discovery port, unique per test cluster.
    pub discovery_port: u16,
    extra_args: Vec<String>,
    /// Whether nodes get [`TEST_SERVER_ARGS`] (else the server's production defaults).
    test_timing: bool,
    /// The nodes, in start order.
    pub nodes: Vec<NodeProc>,
    /// The server binary nodes and subcommands run; `None` for [`server_binary`].
    server: Option<PathBuf>,
    _slot: ClusterSlot,
}

impl TestCluster {
    /// A new, empty test cluster. `extra_args` go to every server (e.g. snapshot settings).
    ///
    /// # Errors
    /// Cannot make the temp dir.
    pub fn new(name: &str, extra_args: &[&str]) -> anyhow::Result<TestCluster> {
        Self::build(name, extra_args, true)
    }

    /// A new, empty cluster whose nodes run the server's production Raft timing (for
    /// benchmarks on a quiet machine, where the test timing's slack would hide failover cost).
    ///
    /// # Errors
    /// Cannot make the temp dir.
    pub fn with_production_timing(name: &str, extra_args: &[&str]) -> anyhow::Result<TestCluster> {
        Self::build(name, extra_args, false)
    }

    fn build(name: &str, extra_args: &[&str], test_timing: bool) -> anyhow::Result<TestCluster> {
        let slot = ClusterSlot::take();
        let mut dir = tempfile::Builder::new()
            .prefix(&format!("cellchat-{name}-"))
            .tempdir()
            .context("creating the test dir")?;
        if std::env::var_os(KEEP_DIRS_ENV).is_some() {
            dir.disable_cleanup(true);
            eprintln!("{KEEP_DIRS_ENV} is set: keeping {}", dir.path().display());
        }
        let suffix: u32 = rand::random();
        Ok(TestCluster {
            dir,
            cluster: format!("test-{name}-{suffix:08x}"),
            discovery_port: free_udp_port(),
            extra_args: extra_args.iter().map(|s| (*s).to_owned()).collect(),
            test_timing,
            nodes: Vec::new(),
            server: None,
            _slot: slot,
        })
    }

    /// Runs `server` instead of the workspace's server binary for nodes started from now on
    /// and for subcommands (a benchmark's earlier build, for one).
    pub fn use_server_binary(&mut self, server: PathBuf) {
        self.server = Some(server);
    }

    /// The server binary this cluster runs.
    fn server(&self) -> anyhow::Result<PathBuf> {
        self.server.clone().map_or_else(server_binary, Ok)
    }

    /// The directory holding every node's data.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts a new node (does not wait for it). Returns its index.
    ///
    /// # Errors
    /// The server binary is missing or cannot start.
    pub fn spawn_node(&mut self) -> anyhow::Result<usize> {
        let index = self.nodes.len();
        let data_dir = self.dir.path().join(format!("node-{}", index + 1));
        let node = self.launch(&data_dir, index, &[])?;
        self.nodes.push(node);
        Ok(index)
    }

    /// Starts a node of this cluster's name and discovery port in `data_dir`, anywhere (a
    /// data dir outside [`dir`](Self::dir) stands for another machine: it does not share the
    /// cluster directory), with `extra` flags. The node is not added to [`nodes`](Self::nodes).
    ///
    /// # Errors
    /// The server binary is missing or cannot start.
    pub fn spawn_outside(&self, data_dir: &Path, extra: &[&str]) -> anyhow::Result<NodeProc> {
        self.launch(data_dir, 100 + self.nodes.len(), extra)
    }

    /// The join token the cluster's first node made (in `cluster-NAME` under [`dir`](Self::dir)).
    ///
    /// # Errors
    /// No node has started yet, or the file is unreadable.
    pub fn token(&self) -> anyhow::Result<String> {
        let path = self
            .dir
            .path()
            .join(format!("cluster-{}", self.cluster))
            .join("token");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(text.trim().to_owned())
    }

    fn launch(&self, data_dir: &Path, index: usize, extra: &[&str]) -> anyhow::Result<NodeProc> {
        let log = self.dir.path().join(format!("node-{}.log", index + 1));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .context("opening the node log")?;
        let mut child = Command::new(self.server()?)
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--cluster", &self.cluster])
            .args(["--discovery-port", &self.discovery_port.to_string()])
            .args(["--formation-window-ms", "700"])
            .args(["--log", &node_log_filter()])
            .args(if self.test_timing {
                &TEST_SERVER_ARGS[..]
            } else {
                &[]
            })
            .args(&self.extra_args)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .context("starting the server")?;
        let stdout = child.stdout.take().context("server stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(ready) = parse_ready(&line) {
                    // The test may have stopped waiting; nothing to do then.
                    let _ = tx.send(ready);
                }
            }
        });
        Ok(NodeProc {
            child: Some(child),
            data_dir: data_dir.to_path_buf(),
            log,
            ready_rx: Some(rx),
            ready: None,
        })
    }

    /// Starts a node and waits until it is ready.
    ///
    /// # Errors
    /// As [`spawn_node`](Self::spawn_node), or the node did not get ready in time.
    pub fn start_node(&mut self, timeout: Duration) -> anyhow::Result<usize> {
        let index = self.spawn_node()?;
        self.nodes[index].wait_ready(timeout)?;
        Ok(index)
    }

    /// Restarts node `index` in its own data dir and waits until it is ready.
    ///
    /// # Errors
    /// The node did not start or get ready.
    pub fn restart(&mut self, index: usize, timeout: Duration) -> anyhow::Result<Ready> {
        self.nodes[index].kill9();
        let data_dir = self.nodes[index].data_dir.clone();
        self.nodes[index] = self.launch(&data_dir, index, &[])?;
        self.nodes[index].wait_ready(timeout)
    }

    /// Starts node `index` again in its own data dir with `extra` flags (after stopping it if
    /// it still runs), without waiting for it.
    ///
    /// # Errors
    /// The server binary is missing or cannot start.
    pub fn relaunch(&mut self, index: usize, extra: &[&str]) -> anyhow::Result<()> {
        self.nodes[index].kill9();
        let data_dir = self.nodes[index].data_dir.clone();
        self.nodes[index] = self.launch(&data_dir, index, extra)?;
        Ok(())
    }

    /// The client addresses of the nodes that printed their ready line.
    pub fn client_addrs(&self) -> Vec<SocketAddr> {
        self.nodes
            .iter()
            .filter_map(|n| n.ready().map(|r| r.client))
            .collect()
    }

    /// Runs `server ARGS --cluster .. --discovery-port ..` (an operator subcommand such as
    /// `members --json`) against this cluster and returns its output.
    ///
    /// # Errors
    /// The server binary is missing or cannot run.
    pub fn admin(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        Command::new(self.server()?)
            .args(args)
            .args(self.admin_flags())
            .stdin(Stdio::null())
            .output()
            .context("running a server subcommand")
    }

    /// The flags that point an operator subcommand at this cluster: `--cluster`,
    /// `--data-root` (where its token is) and `--discovery-port`.
    pub fn admin_flags(&self) -> Vec<std::ffi::OsString> {
        vec![
            "--cluster".into(),
            self.cluster.clone().into(),
            "--data-root".into(),
            self.dir.path().into(),
            "--discovery-port".into(),
            self.discovery_port.to_string().into(),
        ]
    }

    /// Every node discovery finds in this cluster, by probing for `wait`.
    ///
    /// # Errors
    /// Socket errors.
    pub async fn discover(&self, wait: Duration) -> anyhow::Result<Vec<NodeAnnounce>> {
        let socket = DiscoverySocket::ephemeral(
            self.discovery_port,
            proto::discovery::DEFAULT_BROADCAST,
            self.cluster.clone(),
        )?;
        socket
            .send_broadcast(&Packet::Probe {
                cluster: self.cluster.clone(),
                nonce: rand::random(),
                from_client: true,
            })
            .await?;
        let mut found = std::collections::BTreeMap::new();
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(received) = tokio::time::timeout_at(deadline, socket.recv()).await {
            if let Ok((Packet::Announce(a), _)) = received {
                found.insert(a.node_id, a);
            }
        }
        Ok(found.into_values().collect())
    }

    /// Waits until discovery shows exactly one leader among `expected` nodes that all follow
    /// it, with every node a voter up to the server's default of 5 voters, and returns the
    /// announcements.
    ///
    /// # Errors
    /// Not converged within `timeout`; the error shows the last view.
    pub async fn wait_converged(
        &self,
        expected: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<NodeAnnounce>> {
        let deadline = Instant::now() + timeout;
        loop {
            let view = self.discover(Duration::from_millis(400)).await?;
            let leaders: Vec<u64> = view
                .iter()
                .filter(|a| a.role == proto::Role::Leader)
                .map(|a| a.node_id)
                .collect();
            let agreed = leaders.len() == 1 && view.iter().all(|a| a.leader == Some(leaders[0]));
            // Joiners start as learners and are promoted one by one; until then a cluster that
            // looks converged may have fewer voters than nodes, and killing a fresh voter can
            // leave it without a quorum (promotion itself needs one).
            let voters = view.iter().filter(|a| a.voter).count();
            let promoted = voters >= expected.min(DEFAULT_MAX_VOTERS);
            if view.len() == expected && agreed && promoted {
                return Ok(view);
            }
            if Instant::now() > deadline {
                let tails: String = self
                    .nodes
                    .iter()
                    .enumerate()
                    .map(|(i, node)| {
                        format!("\n--- node {} log tail:\n{}", i + 1, node.log_tail(15))
                    })
                    .collect();
                bail!(
                    "cluster did not converge on one leader of {expected} nodes; last view: \
                     {view:#?}{tails}"
                );
            }
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        // Kill every node before the temp dir under them is removed (fields drop after this).
        for node in &mut self.nodes {
            node.kill9();
        }
    }
}

/// A logged-in chat connection to one node, for tests.
pub struct TestClient {
    /// The tarpc client.
    pub client: ChatClient,
    /// Which node.
    pub addr: SocketAddr,
    /// The TLS session's login binding.
    pub binding: [u8; 32],
}

/// A user identity for tests: a name and a fresh Ed25519 key.
#[derive(Clone)]
pub struct TestUser {
    /// User name.
    pub name: String,
    key: SigningKey,
}

impl TestUser {
    /// A new user with a random key.
    pub fn new(name: &str) -> TestUser {
        TestUser {
            name: name.to_owned(),
            key: SigningKey::from_bytes(&rand::random()),
        }
    }

    /// A user whose key is made from `seed`: the same user as a library client with
    /// `Identity::ephemeral(name, Some(seed))`.
    pub fn with_seed(name: &str, seed: [u8; 32]) -> TestUser {
        TestUser {
            name: name.to_owned(),
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// The user's public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// The user's signature over `message`.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.key.sign(message).to_bytes().to_vec()
    }

    /// A login answering `challenge` on a session with login binding `binding` (chat
    /// connections and push connections log in with the same message).
    pub fn login(&self, challenge: &[u8; 32], binding: &[u8; 32], cluster: &str) -> Login {
        let message = proto::login_message(challenge, binding, cluster, &self.name);
        Login {
            name: self.name.clone(),
            public_key: self.public_key(),
            signature: self.sign(&message),
        }
    }
}

fn ctx(timeout: Duration) -> tarpc::context::Context {
    let mut ctx = tarpc::context::current();
    ctx.deadline = std::time::Instant::now() + timeout;
    ctx
}

impl TestClient {
    /// Connects and says hello (no login).
    ///
    /// # Errors
    /// Connection or protocol errors.
    pub async fn connect(
        addr: SocketAddr,
        cluster: &str,
    ) -> anyhow::Result<(TestClient, [u8; 32])> {
        // Tests of the chat API trust the first CA they meet; the TLS trust itself is tested
        // with pinned CAs (`tests/closed_cluster.rs`).
        let verifier = proto::tls::CaVerifier::new(proto::tls::Trust::FirstUse);
        let config = proto::tls::client_config(verifier, proto::tls::ALPN_CHAT);
        let (client, binding) = proto::connect_chat(addr, config, Duration::from_secs(5)).await?;
        let welcome = client
            .hello(ctx(Duration::from_secs(5)), Hello::new(cluster, None))
            .await??;
        Ok((
            TestClient {
                client,
                addr,
                binding,
            },
            welcome.challenge,
        ))
    }

    /// Connects, says hello and logs in as `user`.
    ///
    /// # Errors
    /// Connection, protocol or login errors.
    pub async fn login(
        addr: SocketAddr,
        cluster: &str,
        user: &TestUser,
    ) -> anyhow::Result<TestClient> {
        TestClient::login_claiming(addr, cluster, user, None).await
    }

    /// Like [`TestClient::login`], with a hello that claims to be `claimed`: an honest node
    /// ignores the claim, one weakened with `forge-sender` stamps sends with it.
    ///
    /// # Errors
    /// Connection, protocol or login errors.
    pub async fn login_claiming(
        addr: SocketAddr,
        cluster: &str,
        user: &TestUser,
        claimed: Option<&str>,
    ) -> anyhow::Result<TestClient> {
        let verifier = proto::tls::CaVerifier::new(proto::tls::Trust::FirstUse);
        let config = proto::tls::client_config(verifier, proto::tls::ALPN_CHAT);
        let (client, binding) = proto::connect_chat(addr, config, Duration::from_secs(5)).await?;
        let hello = Hello::new(cluster, claimed.map(str::to_owned));
        let welcome = client.hello(ctx(Duration::from_secs(5)), hello).await??;
        let (this, challenge) = (
            TestClient {
                client,
                addr,
                binding,
            },
            welcome.challenge,
        );
        let login = user.login(&challenge, &this.binding, cluster);
        this.client
            .login(ctx(Duration::from_secs(5)), login)
            .await??;
        Ok(this)
    }

    /// Logs in at `addr` as `user` (reading needs a login), retrying until `timeout` while
    /// the node refuses: one that has not yet applied the registration of another key for the
    /// name, or a node restarting. Between tries it logs in at each of `nodes` as well.
    ///
    /// # Errors
    /// The last error when no login at `addr` succeeded in time.
    pub async fn login_anywhere(
        addr: SocketAddr,
        nodes: &[SocketAddr],
        cluster: &str,
        user: &TestUser,
        timeout: Duration,
    ) -> anyhow::Result<TestClient> {
        let deadline = Instant::now() + timeout;
        loop {
            let error = match TestClient::login(addr, cluster, user).await {
                Ok(client) => return Ok(client),
                Err(e) => e,
            };
            if Instant::now() > deadline {
                return Err(error.context(format!("logging in at {addr} as {}", user.name)));
            }
            for node in nodes.iter().filter(|n| **n != addr) {
                if TestClient::login(*node, cluster, user).await.is_ok() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One send attempt.
    ///
    /// # Errors
    /// Transport errors; the API error is in the inner result.
    pub async fn send(
        &self,
        channel: &str,
        body: &[u8],
        client_id: [u8; 16],
        client_seq: u64,
    ) -> anyhow::Result<Result<SendReply, ApiError>> {
        let request = SendRequest {
            channel: channel.to_owned(),
            body: body.to_vec(),
            client_id,
            client_seq,
            relation: None,
        };
        Ok(self
            .client
            .send(ctx(Duration::from_secs(5)), request)
            .await?)
    }
}

/// Where the leader is among `cluster.nodes` (by the id in each node's ready line).
///
/// # Errors
/// No leader within `timeout`, or the leader is not one of the nodes this cluster started.
pub async fn leader_index(cluster: &TestCluster, timeout: Duration) -> anyhow::Result<usize> {
    let (leader, _) = leader_client_addr(cluster, timeout).await?;
    cluster
        .nodes
        .iter()
        .position(|n| n.ready().map(|r| r.id) == Some(leader))
        .with_context(|| format!("the leader {leader} is not one of this cluster's nodes"))
}

/// Starts `nodes` new nodes, waits until each is ready within `ready` and all of them agree
/// on one membership within `converge`.
///
/// # Errors
/// A node does not start or get ready, or the cluster does not converge.
pub async fn start_nodes(
    cluster: &mut TestCluster,
    nodes: usize,
    ready: Duration,
    converge: Duration,
) -> anyhow::Result<()> {
    for _ in 0..nodes {
        cluster.spawn_node()?;
    }
    for node in &mut cluster.nodes {
        node.wait_ready(ready)?;
    }
    cluster.wait_converged(nodes, converge).await?;
    Ok(())
}

/// Finds the leader's client address among the nodes discovery sees. While leadership moves,
/// a deposed leader may still announce itself for a moment: the one of the highest term wins.
///
/// # Errors
/// No leader within `timeout`.
pub async fn leader_client_addr(
    cluster: &TestCluster,
    timeout: Duration,
) -> anyhow::Result<(u64, SocketAddr)> {
    let deadline = Instant::now() + timeout;
    loop {
        let view = cluster.discover(Duration::from_millis(300)).await?;
        let leader = view
            .iter()
            .filter(|a| a.role == proto::Role::Leader)
            .max_by_key(|a| a.term);
        if let Some(leader) = leader {
            return Ok((leader.node_id, leader.client_addr));
        }
        if Instant::now() > deadline {
            bail!("no leader within {timeout:?}; view: {view:#?}");
        }
    }
}

/// A node's `/metrics` text (the HTTP answer, headers included), read over a plain
/// connection to `addr`; gives up after 5 s.
///
/// # Errors
/// The node cannot be reached, the read fails, or it takes longer than 5 s.
pub async fn scrape_metrics(addr: SocketAddr) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let read = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: testkit\r\nConnection: close\r\n\r\n")
            .await?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await?;
        anyhow::Ok(text)
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .with_context(|| format!("scraping the metrics at {addr} timed out"))?
}

/// The value of the series `name` (labels included, as the text writes them) in OpenMetrics
/// `text`.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_lines_parse_and_others_do_not() {
        let ready = parse_ready(
            "ready node=42 client=127.0.0.1:1 raft=127.0.0.1:2 metrics=127.0.0.1:3 data=/x",
        )
        .unwrap();
        assert_eq!(ready.id, 42);
        assert_eq!(ready.metrics.port(), 3);
        assert_eq!(ready.web, None);
        let with_web = parse_ready(
            "ready node=1 client=127.0.0.1:1 raft=127.0.0.1:2 metrics=127.0.0.1:3 data=/x \
             name=n1 web=https://127.0.0.1:4",
        )
        .unwrap();
        assert_eq!(with_web.web, Some("127.0.0.1:4".parse().unwrap()));
        assert_eq!(parse_ready("node 42 starting"), None);
        assert_eq!(parse_ready("ready node=x client=1"), None);
    }
}
