//! The server processes of one run: start, kill -9, pause, restart, and the guard that kills
//! every process it started (by pid) when dropped, even when the run fails.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use super::netns::Netns;
use super::proxy::{self, Delay};

/// How nodes are placed on the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Distinct 127.0.0.x hosts in the root namespace.
    Loopback,
    /// One network namespace per node on a bridge the harness creates.
    Netns,
}

impl Mode {
    /// The CLI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Loopback => "loopback",
            Mode::Netns => "netns",
        }
    }
}

pub use testkit::{parse_ready, Ready};

/// How a start attempt ended.
#[derive(Debug)]
pub enum StartOutcome {
    /// The node printed its ready line.
    Ready(Ready),
    /// The process exited first; the last error line of its log.
    Exited(ExitStatus, String),
    /// Neither within the timeout (the process is left running).
    Slow,
}

/// One server process slot.
pub struct Node {
    /// `n1`, `n2`, ...
    pub name: String,
    /// The address it listens on.
    pub host: Ipv4Addr,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its log file (stderr, appended across restarts).
    pub log: PathBuf,
    /// Its namespace in netns mode.
    pub netns: Option<String>,
    /// With the `latency` nemesis: the address its delay proxies listen on, which it
    /// advertises, and its fixed raft, client and metrics ports (the proxies use the same).
    pub proxied: Option<(Ipv4Addr, [u16; 3])>,
    child: Option<Child>,
    ready_rx: Option<mpsc::Receiver<Ready>>,
    /// The last ready line seen.
    pub ready: Option<Ready>,
    /// Stopped with SIGSTOP.
    pub paused: bool,
    /// Refused to start on a corrupt log; never restarted again.
    pub corrupt: bool,
}

impl Node {
    /// Whether the process is running (paused counts as running).
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The process id, while started.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// kill -9 and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Our own unreaped child: the pid cannot name another process.
            let _ = child.kill();
            let _ = child.wait();
        }
        self.ready_rx = None;
        self.paused = false;
    }

    fn signal(&mut self, sig: &str) -> anyhow::Result<()> {
        let pid = self.pid().context("node not running")?;
        let status = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill {sig} {pid} failed");
        }
        Ok(())
    }

    /// SIGSTOP.
    ///
    /// # Errors
    /// Not running, or `kill` failed.
    pub fn pause(&mut self) -> anyhow::Result<()> {
        self.signal("-STOP")?;
        self.paused = true;
        Ok(())
    }

    /// SIGCONT.
    ///
    /// # Errors
    /// Not running, or `kill` failed.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        if self.paused {
            self.signal("-CONT")?;
            self.paused = false;
        }
        Ok(())
    }

    /// Simulated power failure (server `--weaken faulty-fs`): SIGUSR1 makes the node drop
    /// its un-fsynced WAL bytes and abort. Send it to every node first, then [`Node::reap`].
    ///
    /// # Errors
    /// Not running, or `kill` failed.
    pub fn power_fail(&mut self) -> anyhow::Result<()> {
        self.signal("-USR1")
    }

    /// Waits up to `within` for the process to exit on its own, then kill -9s it. Whether it
    /// exited on its own.
    pub fn reap(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut exited = false;
        if let Some(child) = &mut self.child {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    exited = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill9();
        exited
    }

    /// The last lines of the node's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits for the ready line or an exit, whichever comes first.
    pub fn wait_start(&mut self, timeout: Duration) -> StartOutcome {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(rx) = &self.ready_rx {
                if let Ok(ready) = rx.recv_timeout(Duration::from_millis(100)) {
                    self.ready = Some(ready);
                    return StartOutcome::Ready(ready);
                }
            } else {
                std::thread::sleep(Duration::from_millis(100));
            }
            if let Some(child) = &mut self.child {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    self.ready_rx = None;
                    let tail = self.log_tail(400);
                    // The server's own last word is its `Error: ...` line (a backtrace may
                    // follow it).
                    let lines: Vec<&str> = tail.lines().collect();
                    let error = lines
                        .iter()
                        .rev()
                        .find(|l| l.starts_with("Error:"))
                        .or_else(|| lines.iter().rev().find(|l| l.contains("corrupt")))
                        .or_else(|| lines.iter().rev().find(|l| l.contains("ERROR")))
                        .map_or_else(String::new, |l| (*l).to_owned());
                    return StartOutcome::Exited(status, error);
                }
            }
            if Instant::now() > deadline {
                return StartOutcome::Slow;
            }
        }
    }
}

/// Everything needed to start the nodes.
pub struct ClusterSpec {
    /// The `server` binary.
    pub server: PathBuf,
    /// Unique cluster name.
    pub cluster: String,
    /// Unique discovery port.
    pub discovery_port: u16,
    /// Where nodes broadcast discovery probes.
    pub broadcast: Ipv4Addr,
    /// Extra server flags for every node.
    pub extra_args: Vec<String>,
}

/// The nodes of a run. Dropping it kills every process it started, by pid.
pub struct Cluster {
    /// How to start nodes.
    pub spec: ClusterSpec,
    /// The nodes, `n1` first.
    pub nodes: Vec<Node>,
    /// The namespaces and bridge in netns mode (dropped after the nodes).
    pub net: Option<Netns>,
    /// With the `latency` nemesis: each node's proxy delay, `n1` first; else empty.
    pub delays: Vec<Delay>,
}

impl Cluster {
    /// Slots for `hosts.len()` nodes under `dir` (nothing started yet).
    pub fn new(spec: ClusterSpec, dir: &Path, hosts: &[Ipv4Addr], net: Option<Netns>) -> Cluster {
        let nodes = hosts
            .iter()
            .enumerate()
            .map(|(i, host)| {
                let name = format!("n{}", i + 1);
                Node {
                    data_dir: dir.join("data").join(&name),
                    log: dir.join(format!("{name}.log")),
                    netns: net.as_ref().map(|n| n.namespace(i)),
                    proxied: None,
                    name,
                    host: *host,
                    child: None,
                    ready_rx: None,
                    ready: None,
                    paused: false,
                    corrupt: false,
                }
            })
            .collect();
        Cluster {
            spec,
            nodes,
            net,
            delays: Vec::new(),
        }
    }

    /// Puts a delay proxy in front of every node (loopback mode): node i keeps listening on
    /// its host with fixed ports and advertises 127.0.0.(31+i), where the proxies forward to
    /// it. Call before the first start.
    ///
    /// # Errors
    /// No free port, or a proxy cannot bind.
    pub async fn add_delay_proxies(&mut self) -> anyhow::Result<()> {
        for (i, node) in self.nodes.iter_mut().enumerate() {
            let advertise = Ipv4Addr::new(127, 0, 0, 31 + u8::try_from(i).context("node index")?);
            // Bind all three before releasing any, so they differ.
            let listeners = (0..3)
                .map(|_| std::net::TcpListener::bind((node.host, 0)))
                .collect::<Result<Vec<_>, _>>()
                .context("picking ports")?;
            let mut ports = [0u16; 3];
            for (port, l) in ports.iter_mut().zip(&listeners) {
                *port = l.local_addr().context("local addr")?.port();
            }
            drop(listeners);
            let delay = Delay::default();
            for port in ports {
                proxy::spawn(
                    SocketAddr::from((advertise, port)),
                    SocketAddr::from((node.host, port)),
                    delay.clone(),
                )
                .await?;
            }
            node.proxied = Some((advertise, ports));
            self.delays.push(delay);
        }
        Ok(())
    }

    /// Starts node `i` (does not wait).
    ///
    /// # Errors
    /// The binary or log file cannot be opened.
    pub fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let spec = &self.spec;
        let node = &mut self.nodes[i];
        node.kill9();
        std::fs::create_dir_all(&node.data_dir).context("creating the data dir")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .context("opening the node log")?;
        let mut command = match &node.netns {
            // `ip netns exec` execs the server, so the pid we hold is the server's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&spec.server);
                c
            }
            None => Command::new(&spec.server),
        };
        command
            .arg("--data-dir")
            .arg(&node.data_dir)
            .args(["--cluster", &spec.cluster])
            .args(["--discovery-port", &spec.discovery_port.to_string()])
            .args(["--broadcast", &spec.broadcast.to_string()])
            .args(["--host", &node.host.to_string()])
            .args(["--log", "info,openraft=warn,tarpc=warn"])
            .args(&spec.extra_args)
            .args(
                node.proxied
                    .iter()
                    .flat_map(|(advertise, [raft, client, metrics])| {
                        [
                            "--advertise".to_owned(),
                            advertise.to_string(),
                            "--raft-port".to_owned(),
                            raft.to_string(),
                            "--client-port".to_owned(),
                            client.to_string(),
                            "--metrics-port".to_owned(),
                            metrics.to_string(),
                        ]
                    }),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", spec.server.display()))?;
        let stdout = child.stdout.take().context("server stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(ready) = parse_ready(&line) {
                    // Nobody may be waiting any more; that is fine.
                    let _ = tx.send(ready);
                }
            }
        });
        node.child = Some(child);
        node.ready_rx = Some(rx);
        node.paused = false;
        Ok(())
    }

    /// Every node's chat address (known once each was ready once; ports are kept on restart).
    pub fn client_addrs(&self) -> Vec<SocketAddr> {
        self.nodes
            .iter()
            .map(|n| n.ready.map_or(SocketAddr::from((n.host, 1)), |r| r.client))
            .collect()
    }

    /// kill -9 every node; idempotent.
    pub fn kill_all(&mut self) {
        for node in &mut self.nodes {
            node.kill9();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_all();
        // `net` is dropped after this, tearing down namespaces and the bridge.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_parses() {
        let r = parse_ready(
            "ready node=7 client=127.0.0.2:4000 raft=127.0.0.2:1 metrics=127.0.0.2:2 data=/d",
        )
        .expect("parses");
        assert_eq!(r.id, 7);
        assert_eq!(r.client.port(), 4000);
        assert!(parse_ready("node 7 starting").is_none());
    }
}
