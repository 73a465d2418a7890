//! netns mode: one network namespace per node (`jp<pid>-nN`) on a bridge the harness creates
//! (`jp<pid>br`), with addresses from one private /24 that is used only on that bridge and in
//! those namespaces (no default route, no NAT). Partitions and packet loss are iptables rules in
//! a chain `JEPSEN` inside each node's namespace; healing flushes only that chain.
//!
//! Everything is named with the prefix `jp<pid>`, so `jepsen cleanup` can find leftovers of
//! runs whose process is gone, and [`Netns`]'s `Drop` removes what this run made.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{bail, Context as _};

/// The chain holding every rule the harness adds inside a namespace.
pub const CHAIN: &str = "JEPSEN";

fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (is it installed?)"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The namespaces and bridge of one run.
pub struct Netns {
    prefix: String,
    /// The /24's first three octets.
    net: [u8; 3],
    nodes: usize,
    created_bridge: bool,
    created_ns: Vec<String>,
}

impl Netns {
    /// Creates the bridge and `nodes` namespaces. Any failure tears down what was made and
    /// says why (not root, `ip`/`iptables` missing, ...).
    ///
    /// # Errors
    /// The reason netns mode is not available.
    pub fn setup(nodes: usize) -> anyhow::Result<Netns> {
        run("ip", &["-V"]).context("`ip` (iproute2) is needed")?;
        run("iptables", &["--version"]).context("`iptables` is needed")?;
        let pid = std::process::id();
        let mut this = Netns {
            prefix: format!("jp{pid}"),
            net: pick_subnet(pid)?,
            nodes,
            created_bridge: false,
            created_ns: Vec::new(),
        };
        this.build().context("creating namespaces (needs root)")?;
        Ok(this)
    }

    fn build(&mut self) -> anyhow::Result<()> {
        let bridge = self.bridge();
        run("ip", &["link", "add", &bridge, "type", "bridge"])?;
        self.created_bridge = true;
        let host_addr = format!("{}/24", self.host_addr());
        run(
            "ip",
            &["addr", "add", &host_addr, "brd", "+", "dev", &bridge],
        )?;
        run("ip", &["link", "set", &bridge, "up"])?;
        for i in 0..self.nodes {
            let ns = self.namespace(i);
            run("ip", &["netns", "add", &ns])?;
            self.created_ns.push(ns.clone());
            let outside = format!("{}v{}", self.prefix, i + 1);
            let inside = format!("{}p{}", self.prefix, i + 1);
            run(
                "ip",
                &[
                    "link", "add", &outside, "type", "veth", "peer", "name", &inside,
                ],
            )?;
            run("ip", &["link", "set", &inside, "netns", &ns])?;
            run("ip", &["link", "set", &outside, "master", &bridge, "up"])?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
            let addr = format!("{}/24", self.node_addr(i));
            run(
                "ip",
                &["-n", &ns, "addr", "add", &addr, "brd", "+", "dev", &inside],
            )?;
            run("ip", &["-n", &ns, "link", "set", &inside, "up"])?;
            self.iptables(i, &["-N", CHAIN])?;
            self.iptables(i, &["-I", "INPUT", "-j", CHAIN])?;
        }
        Ok(())
    }

    fn bridge(&self) -> String {
        format!("{}br", self.prefix)
    }

    /// The namespace of node `i` (0-based).
    pub fn namespace(&self, i: usize) -> String {
        format!("{}-n{}", self.prefix, i + 1)
    }

    /// The address of node `i` (0-based): `.1`, `.2`, ...
    pub fn node_addr(&self, i: usize) -> Ipv4Addr {
        let last = u8::try_from(i + 1).unwrap_or(250);
        Ipv4Addr::new(self.net[0], self.net[1], self.net[2], last)
    }

    /// The harness's own address on the bridge (`.254`), where clients connect from.
    pub fn host_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.net[0], self.net[1], self.net[2], 254)
    }

    /// The bridge's broadcast address, for discovery.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.net[0], self.net[1], self.net[2], 255)
    }

    fn iptables(&self, i: usize, args: &[&str]) -> anyhow::Result<String> {
        let ns = self.namespace(i);
        let mut full = vec!["netns", "exec", ns.as_str(), "iptables", "-w", "5"];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Node `i` drops every packet from the nodes in `from`.
    ///
    /// # Errors
    /// iptables failed.
    pub fn drop_from(&self, i: usize, from: &[usize]) -> anyhow::Result<()> {
        for &j in from {
            let src = self.node_addr(j).to_string();
            self.iptables(i, &["-A", CHAIN, "-s", &src, "-j", "DROP"])?;
        }
        Ok(())
    }

    /// Node `i` drops incoming packets at random with `probability`.
    ///
    /// # Errors
    /// iptables failed.
    pub fn lossy(&self, i: usize, probability: f64) -> anyhow::Result<()> {
        let p = format!("{probability:.3}");
        self.iptables(
            i,
            &[
                "-A",
                CHAIN,
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &p,
                "-j",
                "DROP",
            ],
        )?;
        Ok(())
    }

    /// Flushes our chain in every namespace.
    ///
    /// # Errors
    /// The first iptables failure (every namespace is still attempted).
    pub fn heal(&self) -> anyhow::Result<()> {
        let mut first = Ok(());
        for i in 0..self.nodes {
            if let Err(e) = self.iptables(i, &["-F", CHAIN]) {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in self.created_ns.drain(..) {
            kill_namespace_pids(&ns);
            let _ = run("ip", &["netns", "del", &ns]);
        }
        if self.created_bridge {
            let _ = run("ip", &["link", "del", &self.bridge()]);
        }
    }
}

fn kill_namespace_pids(ns: &str) {
    if let Ok(pids) = run("ip", &["netns", "pids", ns]) {
        for pid in pids.split_whitespace() {
            // Only processes inside a namespace this harness created (ours by construction).
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
}

/// A 10.x.y.0/24 derived from the pid that no interface of the root namespace uses.
fn pick_subnet(pid: u32) -> anyhow::Result<[u8; 3]> {
    let used = run("ip", &["-4", "-o", "addr", "show"]).unwrap_or_default()
        + &run("ip", &["-4", "route", "show"]).unwrap_or_default();
    for attempt in 0..64u32 {
        let n = pid.wrapping_add(attempt.wrapping_mul(7919));
        let a = 200 + u8::try_from(n % 50).unwrap_or(0);
        let b = u8::try_from((n / 50) % 256).unwrap_or(0);
        let candidate = format!("10.{a}.{b}.");
        if !used.contains(&candidate) {
            return Ok([10, a, b]);
        }
    }
    bail!("no free 10.x.y.0/24 found for the namespace bridge")
}

fn pid_alive(pid: &str) -> bool {
    std::path::Path::new("/proc").join(pid).exists()
}

/// Removes namespaces and bridges named `jp<pid>...` whose harness process is gone (killing
/// the processes inside those namespaces first). Returns what was removed.
pub fn cleanup() -> Vec<String> {
    let mut removed = Vec::new();
    let own = std::process::id().to_string();
    let stale = |pid: &str| pid != own && !pid_alive(pid);
    if let Ok(list) = run("ip", &["netns", "list"]) {
        for line in list.lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            let Some(rest) = name.strip_prefix("jp") else {
                continue;
            };
            let Some((pid, node)) = rest.split_once("-n") else {
                continue;
            };
            if pid.bytes().all(|b| b.is_ascii_digit())
                && node.bytes().all(|b| b.is_ascii_digit())
                && stale(pid)
            {
                kill_namespace_pids(name);
                if run("ip", &["netns", "del", name]).is_ok() {
                    removed.push(format!("netns {name}"));
                }
            }
        }
    }
    if let Ok(links) = run("ip", &["-o", "link", "show"]) {
        let mut names = BTreeSet::new();
        for line in links.lines() {
            // "12: jp123br: <...>" or "13: jp123v1@if2: <...>"
            if let Some(name) = line.split(": ").nth(1) {
                names.insert(name.split('@').next().unwrap_or("").to_owned());
            }
        }
        for name in names {
            let Some(rest) = name.strip_prefix("jp") else {
                continue;
            };
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            let tail = &rest[digits.len()..];
            let ours = tail == "br"
                || (tail.len() > 1
                    && (tail.starts_with('v') || tail.starts_with('p'))
                    && tail[1..].bytes().all(|b| b.is_ascii_digit()));
            if !digits.is_empty()
                && ours
                && stale(&digits)
                && run("ip", &["link", "del", &name]).is_ok()
            {
                removed.push(format!("link {name}"));
            }
        }
    }
    removed
}
