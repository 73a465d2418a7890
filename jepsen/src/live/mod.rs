//! `jepsen run`: a real cluster of `server` processes, the workload, the nemesis, healing,
//! final reads, the check and the run directory.

pub mod cluster;
pub mod nemesis;
pub mod netns;
pub mod proxy;
pub mod workload;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};

use crate::checker::{check, Anomaly, Report};
use crate::history::{History, HistoryWriter, Op};
use crate::report;
use cluster::{Cluster, ClusterSpec, Mode, StartOutcome};
use nemesis::{node_name, Event, Fault};

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Cluster size.
    pub nodes: usize,
    /// Workload duration.
    pub time_limit: Duration,
    /// Seed of the fault schedule and of the clients' choices.
    pub seed: u64,
    /// Faults to inject.
    pub nemesis: Vec<Fault>,
    /// Mean gap between faults.
    pub interval: Duration,
    /// Client operations per second, all processes together.
    pub rate: f64,
    /// Client processes.
    pub clients: usize,
    /// Channels written and read.
    pub channels: usize,
    /// Run directory.
    pub out: PathBuf,
    /// Network placement.
    pub mode: Mode,
    /// The `server` binary (default: next to this executable).
    pub server: Option<PathBuf>,
    /// Keep node data dirs even when the run is valid.
    pub keep_data: bool,
    /// Deliberately broken server modes (`server --weaken`, comma-separated; needs a server
    /// built with feature `weaken`): `skip-dedup`, `ack-before-fsync`, `faulty-fs`. Empty for
    /// a normal run. The `power-fail` nemesis adds `faulty-fs`.
    pub weaken: String,
    /// More server flags for every node, after the harness's own (a later flag wins), e.g.
    /// `--election-min-ms 5000`.
    pub server_args: Vec<String>,
    /// A cluster default retention set before the workload starts (`server retention --set`,
    /// e.g. `40` or `2m`), with expiries proposed every [`RETENTION_EXPIRE_MS`]: the checker
    /// must then accept expired messages missing and still catch everything else. `None`:
    /// messages are kept forever.
    pub retention: Option<String>,
}

/// How often the leader proposes expiries in a run with retention (`--expire-interval-ms`),
/// so floors move many times within a short run.
pub const RETENTION_EXPIRE_MS: u64 = 300;

impl RunConfig {
    /// A 3-node loopback run of `nemesis` with the workload the CI tests use (40 ops/s from 5
    /// clients over 3 channels), no weakening and no extra server flags; adjust fields after.
    pub fn loopback(
        seed: u64,
        nemesis: &[Fault],
        time_limit: Duration,
        interval: Duration,
        out: PathBuf,
    ) -> Self {
        Self {
            nodes: 3,
            time_limit,
            seed,
            nemesis: nemesis.to_vec(),
            interval,
            rate: 40.0,
            clients: 5,
            channels: 3,
            out,
            mode: Mode::Loopback,
            server: None,
            keep_data: false,
            weaken: String::new(),
            server_args: Vec::new(),
            retention: None,
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "nodes": self.nodes,
            "time_limit_s": self.time_limit.as_secs_f64(),
            "seed": self.seed,
            "nemesis": self.nemesis.iter().map(|f| f.name()).collect::<Vec<_>>(),
            "interval_s": self.interval.as_secs_f64(),
            "rate": self.rate,
            "clients": self.clients,
            "channels": self.channels,
            "out": self.out.display().to_string(),
            "mode": self.mode.as_str(),
            "server": self.server.as_ref().map(|p| p.display().to_string()),
            "weaken": self.weaken,
            "server_args": self.server_args,
            "retention": self.retention,
        })
    }
}

/// A harness-level check (beyond the history checker): name, passed, detail.
#[derive(Debug, Clone)]
pub struct HarnessCheck {
    /// What was checked.
    pub name: String,
    /// Whether it held.
    pub passed: bool,
    /// Details.
    pub detail: String,
}

/// What a run found.
#[derive(Debug)]
pub struct RunOutcome {
    /// The run directory.
    pub dir: PathBuf,
    /// The checker's report.
    pub report: Report,
    /// Harness checks (disk-fault expectations, recovery, final reads).
    pub checks: Vec<HarnessCheck>,
    /// Checks passed (anomaly types absent + harness checks held).
    pub passed: usize,
    /// Checks failed.
    pub failed: usize,
}

impl RunOutcome {
    /// Valid when nothing failed.
    pub fn valid(&self) -> bool {
        self.failed == 0
    }
}

/// Extra flags for every server: small snapshots and log segments so snapshot install, dedup
/// persistence and segment rotation get exercised, and user rates that never limit the
/// workload.
const SERVER_ARGS: [&str; 12] = [
    "--formation-window-ms",
    "1000",
    "--wal-segment-mib",
    "4",
    "--snapshot-every",
    "300",
    "--log-keep",
    "100",
    "--user-rate",
    "10000",
    "--user-burst",
    "10000",
];

fn server_args(weaken: &str, retention: bool, extra: &[String]) -> Vec<String> {
    let mut args: Vec<String> = SERVER_ARGS.iter().map(|s| (*s).to_owned()).collect();
    if !weaken.is_empty() {
        args.extend(["--weaken".to_owned(), weaken.to_owned()]);
    }
    if retention {
        args.extend([
            "--expire-interval-ms".to_owned(),
            RETENTION_EXPIRE_MS.to_string(),
        ]);
    }
    args.extend(extra.iter().cloned());
    args
}

/// How long a restarted node may take to print its ready line.
const RESTART_TIMEOUT: Duration = Duration::from_secs(20);

/// The server to run: `explicit` as given, else testkit's, built with feature `weaken` when a
/// weakened mode is asked for.
fn server_binary(explicit: Option<&Path>, weaken: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        if !p.exists() {
            bail!("--server {} does not exist", p.display());
        }
        return Ok(p.to_path_buf());
    }
    if weaken.is_empty() {
        testkit::server_binary()
    } else {
        testkit::server_binary_with_weaken()
    }
}

fn default_hosts(n: usize) -> Vec<Ipv4Addr> {
    // 127.0.0.1 is everyone's default; stay off it.
    (0..n)
        .map(|i| Ipv4Addr::new(127, 0, 0, 11 + u8::try_from(i).unwrap_or(0)))
        .collect()
}

/// Runs the whole test. Every process it starts is killed when it returns, even on error.
///
/// # Errors
/// Setup failures (no server binary, cluster never formed, unwritable run dir).
pub fn run_live(mut cfg: RunConfig) -> anyhow::Result<RunOutcome> {
    if !(1..=9).contains(&cfg.nodes) || cfg.clients == 0 || cfg.channels == 0 || cfg.rate <= 0.0 {
        bail!("need 1..=9 nodes, at least one client and channel, and a positive rate");
    }
    println!("seed {}", cfg.seed);
    let mut notes = Vec::new();
    let net = if cfg.mode == Mode::Netns {
        match netns::Netns::setup(cfg.nodes) {
            Ok(net) => Some(net),
            Err(e) => {
                let note = format!("netns mode unavailable ({e:#}); falling back to loopback mode");
                println!("{note}");
                notes.push(note);
                cfg.mode = Mode::Loopback;
                None
            }
        }
    } else {
        None
    };
    if cfg.mode == Mode::Loopback {
        let dropped: Vec<&str> = cfg
            .nemesis
            .iter()
            .filter(|f| f.needs_netns())
            .map(|f| f.name())
            .collect();
        if !dropped.is_empty() {
            let note = format!(
                "nemesis {} needs netns mode (namespaces + iptables); left out in loopback mode",
                dropped.join(",")
            );
            println!("{note}");
            notes.push(note);
            cfg.nemesis.retain(|f| !f.needs_netns());
        }
    }
    if cfg.mode == Mode::Netns && cfg.nemesis.contains(&Fault::Latency) {
        let note = "nemesis latency uses loopback delay proxies; left out in netns mode".to_owned();
        println!("{note}");
        notes.push(note);
        cfg.nemesis.retain(|f| *f != Fault::Latency);
    }
    if cfg.nemesis.contains(&Fault::PowerFail) && !cfg.weaken.split(',').any(|m| m == "faulty-fs") {
        // The power failure is simulated inside the server (raft-log's FaultyFs).
        let note = "nemesis power-fail: servers run with --weaken faulty-fs".to_owned();
        println!("{note}");
        notes.push(note);
        cfg.weaken = if cfg.weaken.is_empty() {
            "faulty-fs".into()
        } else {
            format!("{},faulty-fs", cfg.weaken)
        };
    }
    let server = server_binary(cfg.server.as_deref(), &cfg.weaken)?;
    cfg.server = Some(server.clone());
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("creating {}", cfg.out.display()))?;
    let schedule = nemesis::schedule(
        cfg.seed,
        &cfg.nemesis,
        cfg.nodes,
        cfg.time_limit,
        cfg.interval,
    );
    let suffix: u32 = rand::random();
    let cluster_name = format!("jepsen-{suffix:08x}");
    let discovery_port = testkit::free_udp_port();
    println!("config {}", cfg.to_json());
    println!(
        "cluster {cluster_name} discovery-port {discovery_port} server {} schedule: {} faults",
        server.display(),
        schedule.len()
    );
    for e in &schedule {
        println!("  {}", e.to_json());
    }
    let test_json = json!({
        "config": cfg.to_json(),
        "seed": cfg.seed,
        "cluster": cluster_name,
        "discovery_port": discovery_port,
        "schedule": schedule.iter().map(Event::to_json).collect::<Vec<_>>(),
        "notes": notes,
        "replay": format!(
            "jepsen run --seed {} --nodes {} --time-limit {} --nemesis {} --interval {} --mode {}{}",
            cfg.seed, cfg.nodes, cfg.time_limit.as_secs(),
            cfg.nemesis.iter().map(|f| f.name()).collect::<Vec<_>>().join(","),
            cfg.interval.as_secs_f64(), cfg.mode.as_str(),
            if cfg.weaken.is_empty() { String::new() } else { format!(" --weaken {}", cfg.weaken) }
                + &cfg.retention.as_ref().map(|r| format!(" --retention {r}")).unwrap_or_default()
                + &cfg.server_args.iter().map(|a| format!(" --server-arg={a}")).collect::<String>()),
    });
    write_json(&cfg.out.join("test.json"), &test_json)?;

    let (hosts, broadcast) = match &net {
        Some(n) => (
            (0..cfg.nodes).map(|i| n.node_addr(i)).collect(),
            n.broadcast(),
        ),
        None => (default_hosts(cfg.nodes), Ipv4Addr::new(127, 255, 255, 255)),
    };
    let spec = ClusterSpec {
        server,
        cluster: cluster_name.clone(),
        discovery_port,
        broadcast,
        extra_args: server_args(&cfg.weaken, cfg.retention.is_some(), &cfg.server_args),
    };
    // The guard: dropping `cluster` kills every node by pid, then removes the namespaces.
    let mut cluster = Cluster::new(spec, &cfg.out, &hosts, net);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let outcome = if cfg.nemesis.contains(&Fault::Latency) {
        runtime
            .block_on(cluster.add_delay_proxies())
            .context("starting the delay proxies")
    } else {
        Ok(())
    }
    .and_then(|()| drive(&cfg, &mut cluster, &runtime, &schedule, &cluster_name));
    cluster.kill_all();
    drop(cluster);
    runtime.shutdown_timeout(Duration::from_secs(2));
    let outcome = outcome?;
    if outcome.valid() && !cfg.keep_data {
        // Data dirs are large; they stay for invalid runs, to look at.
        let _ = std::fs::remove_dir_all(cfg.out.join("data"));
    }
    Ok(outcome)
}

fn write_json(path: &Path, v: &Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(v).expect("json");
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

fn drive(
    cfg: &RunConfig,
    cluster: &mut Cluster,
    runtime: &tokio::runtime::Runtime,
    schedule: &[Event],
    cluster_name: &str,
) -> anyhow::Result<RunOutcome> {
    let started = Instant::now();
    for i in 0..cfg.nodes {
        cluster.spawn(i)?;
    }
    for i in 0..cfg.nodes {
        match cluster.nodes[i].wait_start(Duration::from_secs(90)) {
            StartOutcome::Ready(_) => {}
            other => bail!(
                "{} did not get ready: {other:?}\n{}",
                cluster.nodes[i].name,
                cluster.nodes[i].log_tail(30)
            ),
        }
    }
    let addrs = cluster.client_addrs();
    converge(
        runtime,
        &addrs,
        cluster_name,
        cfg.nodes,
        Duration::from_secs(60),
    )
    .context("the cluster did not form one leader with every node")?;
    println!(
        "cluster ready in {:.1}s: {}",
        started.elapsed().as_secs_f64(),
        addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{}={a}", node_name(i)))
            .collect::<Vec<_>>()
            .join(" ")
    );
    if let Some(policy) = &cfg.retention {
        let said = set_default_retention(cluster, &cfg.out.join("data"), policy)?;
        println!("{said}");
    }

    let history = Arc::new(
        HistoryWriter::create(&cfg.out.join("history.jsonl")).context("creating history.jsonl")?,
    );
    let workload_start = Instant::now();
    let stop_at = tokio::time::Instant::from_std(workload_start + cfg.time_limit);
    let gap_s = cfg.clients as f64 / cfg.rate;
    let nonce: u64 = rand::random();
    // Reading needs a login, and a follower registers no names: the final reader is
    // registered now, while the cluster is healthy (a later login re-registers it if a fault
    // lost the registration).
    let reader = testkit::TestUser::new(&format!("jp{:x}reader", nonce & 0xffff_ffff));
    let registered = runtime.block_on(testkit::TestClient::login_anywhere(
        addrs[0],
        &addrs,
        cluster_name,
        &reader,
        Duration::from_secs(30),
    ));
    registered.context("registering the final reader")?;
    let shared = Arc::new(workload::Shared {
        history: Arc::clone(&history),
        addrs: addrs.clone(),
        cluster: cluster_name.to_owned(),
        channels: (0..cfg.channels).map(|i| format!("ch{i}")).collect(),
        stop_at,
        op_gap: Duration::from_secs_f64(gap_s.clamp(0.001, 60.0)),
        counters: workload::Counters::default(),
        nonce,
        seed: cfg.seed,
        reader,
    });
    let mut checks: Vec<HarnessCheck> = Vec::new();
    let stop = AtomicBool::new(false);
    let handle = runtime.handle().clone();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let nemesis_thread = scope.spawn(|| {
            run_nemesis(
                cluster,
                schedule,
                &shared,
                &handle,
                workload_start,
                cfg.time_limit,
                &stop,
            )
        });
        runtime.block_on(async {
            let mut tasks = Vec::new();
            for p in 0..cfg.clients {
                let sh = Arc::clone(&shared);
                let id = p as u64;
                if cfg.clients >= 2 && p % 4 == 3 {
                    tasks.push(tokio::spawn(workload::streamer(sh, id)));
                } else {
                    tasks.push(tokio::spawn(workload::writer(sh, id)));
                }
            }
            let hard_stop = stop_at + Duration::from_secs(20);
            let mut last_print = tokio::time::Instant::now();
            for task in &mut tasks {
                loop {
                    let now = tokio::time::Instant::now();
                    if now.duration_since(last_print) >= Duration::from_secs(5) {
                        print_progress(&shared, workload_start, cfg.time_limit);
                        last_print = now;
                    }
                    if now > hard_stop {
                        task.abort();
                        break;
                    }
                    if tokio::time::timeout(Duration::from_millis(500), &mut *task)
                        .await
                        .is_ok()
                    {
                        break;
                    }
                }
            }
        });
        stop.store(true, Ordering::Relaxed);
        let nemesis_checks = nemesis_thread
            .join()
            .map_err(|_| anyhow::anyhow!("the nemesis thread panicked"))?;
        checks.extend(nemesis_checks);
        Ok(())
    })?;
    print_progress(&shared, workload_start, cfg.time_limit);

    // Heal everything, then wait for recovery.
    heal(cluster, &shared, &mut checks);
    let live: Vec<usize> = (0..cfg.nodes)
        .filter(|&i| !cluster.nodes[i].corrupt)
        .collect();
    let recovered = runtime.block_on(wait_recovered(
        &addrs,
        cluster_name,
        &live,
        Duration::from_secs(60),
    ));
    let applied: Vec<(usize, u64)> = match &recovered {
        Ok(a) => a.clone(),
        Err(a) => a.clone(),
    };
    shared.rec(Op::nemesis(
        "recovered",
        json!({"applied": workload::applied_json(&applied), "converged": recovered.is_ok()}),
    ));
    checks.push(HarnessCheck {
        name: "recovery".into(),
        passed: recovered.is_ok(),
        detail: format!(
            "after healing, live nodes {} agree on one leader and applied index: {:?}",
            live.iter()
                .map(|&i| node_name(i))
                .collect::<Vec<_>>()
                .join(","),
            applied
        ),
    });

    // Final reads: every channel from every live node.
    let base = cfg.clients as u64;
    let mut complete = true;
    for &(i, a) in &applied {
        let ok = runtime.block_on(workload::final_reads(
            &shared,
            base + i as u64,
            i,
            cluster_name,
            a,
        ));
        complete &= ok == cfg.channels;
    }
    let missing: Vec<String> = live
        .iter()
        .filter(|i| !applied.iter().any(|(j, _)| j == *i))
        .map(|&i| node_name(i))
        .collect();
    checks.push(HarnessCheck {
        name: "final-reads".into(),
        passed: complete && missing.is_empty(),
        detail: format!(
            "every channel read whole from every live node (unreachable: {missing:?}; corrupt, excluded: {:?})",
            cluster.nodes.iter().filter(|n| n.corrupt).map(|n| n.name.clone()).collect::<Vec<_>>()
        ),
    });
    let write_errors = shared.counters.write_errors.load(Ordering::Relaxed);
    if write_errors > 0 {
        checks.push(HarnessCheck {
            name: "history-written".into(),
            passed: false,
            detail: format!("{write_errors} history lines could not be written"),
        });
    }
    drop(shared);
    drop(history);

    // Node logs are already in the run directory (nN.log); stop the nodes before checking.
    cluster.kill_all();
    let history =
        History::read(&cfg.out.join("history.jsonl")).context("reading the history back")?;
    let report = check(&history);
    let perf = report::perf(&history);
    report::write(&cfg.out, &report, &perf).context("writing the report")?;
    report::print_summary(&report);
    if let Some(policy) = &cfg.retention {
        // A run whose floors never moved would pass without testing retention at all.
        checks.push(HarnessCheck {
            name: "retention".into(),
            passed: report.stats.floor_max > 0,
            detail: format!(
                "default retention {policy}: highest floor read {}, {} acknowledged messages \
                 expired from final reads",
                report.stats.floor_max, report.stats.expired
            ),
        });
    }
    let anomaly_types = Anomaly::ALL.len();
    let anomalies_failed = report.found().len();
    let harness_failed = checks.iter().filter(|c| !c.passed).count();
    for c in &checks {
        println!(
            "{} {}: {}",
            if c.passed { "PASS" } else { "FAIL" },
            c.name,
            c.detail
        );
    }
    let passed = anomaly_types - anomalies_failed + checks.len() - harness_failed;
    let failed = anomalies_failed + harness_failed;
    let mut test_json: Value = std::fs::read_to_string(cfg.out.join("test.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| json!({}));
    test_json["checks"] = Value::Array(
        checks
            .iter()
            .map(|c| json!({"name": c.name, "passed": c.passed, "detail": c.detail}))
            .collect(),
    );
    test_json["valid"] = json!(failed == 0);
    write_json(&cfg.out.join("test.json"), &test_json)?;
    Ok(RunOutcome {
        dir: cfg.out.clone(),
        report,
        checks,
        passed,
        failed,
    })
}

/// Sets the cluster's default retention with `server retention --set` (from inside the first
/// node's namespace in netns mode); returns what the command printed. Retried while the
/// leader settles.
fn set_default_retention(
    cluster: &Cluster,
    data_root: &Path,
    policy: &str,
) -> anyhow::Result<String> {
    let spec = &cluster.spec;
    let mut last = String::new();
    for _ in 0..10 {
        let mut command = match &cluster.nodes[0].netns {
            Some(ns) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&spec.server);
                c
            }
            None => std::process::Command::new(&spec.server),
        };
        let output = command
            .args(["retention", "--set", policy])
            .args(["--cluster", &spec.cluster])
            .arg("--data-root")
            .arg(data_root)
            .args(["--discovery-port", &spec.discovery_port.to_string()])
            .args(["--broadcast", &spec.broadcast.to_string()])
            .stdin(std::process::Stdio::null())
            .output()
            .context("running server retention")?;
        if output.status.success() {
            return Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned());
        }
        last = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        std::thread::sleep(Duration::from_secs(1));
    }
    bail!("server retention --set {policy} failed: {last}")
}

fn print_progress(sh: &workload::Shared, start: Instant, limit: Duration) {
    let c = &sh.counters;
    println!(
        "[{:>5.1}s/{}s] invoke={} ok={} fail={} info={}",
        start.elapsed().as_secs_f64(),
        limit.as_secs(),
        c.invoke.load(Ordering::Relaxed),
        c.ok.load(Ordering::Relaxed),
        c.fail.load(Ordering::Relaxed),
        c.info.load(Ordering::Relaxed),
    );
}

/// Waits until all `expected` nodes answer and name the same leader.
fn converge(
    runtime: &tokio::runtime::Runtime,
    addrs: &[std::net::SocketAddr],
    cluster: &str,
    expected: usize,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    let mut last = Vec::new();
    while Instant::now() < deadline {
        last = runtime.block_on(async {
            let mut v = Vec::new();
            for a in addrs {
                v.push(workload::probe(*a, cluster).await);
            }
            v
        });
        let leaders: Vec<Option<u64>> = last.iter().map(|p| p.and_then(|x| x.1)).collect();
        if last.len() == expected
            && leaders[0].is_some()
            && leaders.iter().all(|l| *l == leaders[0])
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    bail!("last view (applied, leader, id) per node: {last:?}")
}

/// Waits until the `live` nodes agree on one leader and one applied index (twice in a row).
/// Ok or Err, the applied index of each node that answered.
async fn wait_recovered(
    addrs: &[std::net::SocketAddr],
    cluster: &str,
    live: &[usize],
    within: Duration,
) -> Result<Vec<(usize, u64)>, Vec<(usize, u64)>> {
    let deadline = Instant::now() + within;
    let mut stable = 0;
    let mut last: Vec<(usize, u64)> = Vec::new();
    let mut prev: Vec<(usize, u64)> = Vec::new();
    while Instant::now() < deadline {
        let mut view = Vec::new();
        let mut leaders = Vec::new();
        for &i in live {
            if let Some((applied, leader, _)) = workload::probe(addrs[i], cluster).await {
                view.push((i, applied));
                leaders.push(leader);
            }
        }
        let agreed = view.len() == live.len()
            && leaders.first().is_some_and(Option::is_some)
            && leaders.iter().all(|l| *l == leaders[0])
            && view.iter().all(|(_, a)| *a == view[0].1);
        if agreed && view == prev {
            stable += 1;
            if stable >= 1 {
                return Ok(view);
            }
        } else {
            stable = 0;
        }
        prev.clone_from(&view);
        last = view;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(last)
}

fn heal(cluster: &mut Cluster, sh: &workload::Shared, checks: &mut Vec<HarnessCheck>) {
    if let Some(net) = &cluster.net {
        if let Err(e) = net.heal() {
            checks.push(HarnessCheck {
                name: "heal-network".into(),
                passed: false,
                detail: format!("{e:#}"),
            });
        }
    }
    for delay in &cluster.delays {
        delay.set(0);
    }
    let mut restarted = Vec::new();
    for i in 0..cluster.nodes.len() {
        let node = &mut cluster.nodes[i];
        if node.paused {
            let _ = node.resume();
        }
        if !node.corrupt && !node.is_running() {
            restarted.push(i);
        }
    }
    for &i in &restarted {
        start_node(cluster, i, sh, checks, "heal");
    }
    sh.rec(Op::nemesis(
        "heal",
        json!({"restarted": restarted.iter().map(|&i| node_name(i)).collect::<Vec<_>>()}),
    ));
}

/// Starts node `i` again and records `start`; a failure to start is a failed check.
fn start_node(
    cluster: &mut Cluster,
    i: usize,
    sh: &workload::Shared,
    checks: &mut Vec<HarnessCheck>,
    why: &str,
) -> StartOutcome {
    let name = cluster.nodes[i].name.clone();
    if let Err(e) = cluster.spawn(i) {
        checks.push(HarnessCheck {
            name: format!("restart {name}"),
            passed: false,
            detail: format!("{e:#}"),
        });
        return StartOutcome::Slow;
    }
    let outcome = cluster.nodes[i].wait_start(RESTART_TIMEOUT);
    let (result, error) = match &outcome {
        StartOutcome::Ready(_) => ("ready", String::new()),
        StartOutcome::Exited(status, e) => ("exited", format!("{status}: {e}")),
        StartOutcome::Slow => ("slow", String::new()),
    };
    sh.rec(Op::nemesis(
        "start",
        json!({"node": name, "outcome": result, "error": error, "why": why}),
    ));
    outcome
}

/// Which node a fault hits: the leader (if asked and known), else `preferred`, moving on to
/// the next node that is running, not corrupt and (for `avoid_leader`) not the leader.
fn pick_target(
    cluster: &mut Cluster,
    handle: &tokio::runtime::Handle,
    cluster_name: &str,
    preferred: usize,
    want_leader: bool,
    avoid_leader: bool,
) -> Option<usize> {
    let addrs = cluster.client_addrs();
    let mut leader = None;
    if want_leader || avoid_leader {
        for (i, a) in addrs.iter().enumerate() {
            if cluster.nodes[i].paused || !cluster.nodes[i].is_running() {
                continue;
            }
            if let Some((_, Some(id), _)) = handle.block_on(workload::probe(*a, cluster_name)) {
                leader = cluster
                    .nodes
                    .iter()
                    .position(|n| n.ready.is_some_and(|r| r.id == id));
                break;
            }
        }
    }
    if want_leader {
        if let Some(l) = leader {
            return Some(l);
        }
    }
    let n = cluster.nodes.len();
    (0..n).map(|d| (preferred + d) % n).find(|&i| {
        let node = &mut cluster.nodes[i];
        let usable = !node.corrupt && !node.paused && node.is_running();
        usable && !(avoid_leader && Some(i) == leader)
    })
}

fn sleep_until(at: Instant, stop: &AtomicBool) -> bool {
    while Instant::now() < at {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50).min(at - Instant::now()));
    }
    true
}

/// Executes the schedule; every fault is healed before the next one. Returns the harness
/// checks of the disk faults and restarts.
fn run_nemesis(
    cluster: &mut Cluster,
    schedule: &[Event],
    sh: &workload::Shared,
    handle: &tokio::runtime::Handle,
    start: Instant,
    limit: Duration,
    stop: &AtomicBool,
) -> Vec<HarnessCheck> {
    let mut checks = Vec::new();
    let cluster_name = sh.cluster.clone();
    for event in schedule {
        if event.at + event.duration > limit || !sleep_until(start + event.at, stop) {
            break;
        }
        // A slow restart can make the schedule late: skip what cannot run on time rather
        // than run past the time limit.
        let late = start.elapsed().saturating_sub(event.at);
        if stop.load(Ordering::Relaxed) || start.elapsed() + event.duration > limit {
            break;
        }
        if late > Duration::from_secs(1) {
            sh.rec(Op::nemesis(
                "skipped",
                json!({"fault": event.fault.name(), "late_ms": late.as_millis() as u64}),
            ));
            continue;
        }
        let end = start + event.at + event.duration;
        match event.fault {
            Fault::Kill => {
                let Some(i) = pick_target(
                    cluster,
                    handle,
                    &cluster_name,
                    event.node,
                    event.leader,
                    false,
                ) else {
                    continue;
                };
                cluster.nodes[i].kill9();
                sh.rec(Op::nemesis(
                    "kill",
                    json!({"node": node_name(i), "leader": event.leader}),
                ));
                sleep_until(end, &AtomicBool::new(false));
                if let StartOutcome::Exited(status, e) =
                    start_node(cluster, i, sh, &mut checks, "kill")
                {
                    checks.push(HarnessCheck {
                        name: format!("restart {} after kill", node_name(i)),
                        passed: false,
                        detail: format!("{status}: {e}"),
                    });
                }
            }
            Fault::Pause => {
                let Some(i) = pick_target(
                    cluster,
                    handle,
                    &cluster_name,
                    event.node,
                    event.leader,
                    false,
                ) else {
                    continue;
                };
                if cluster.nodes[i].pause().is_err() {
                    continue;
                }
                sh.rec(Op::nemesis(
                    "pause",
                    json!({"node": node_name(i), "leader": event.leader}),
                ));
                sleep_until(end, &AtomicBool::new(false));
                let _ = cluster.nodes[i].resume();
                sh.rec(Op::nemesis("resume", json!({"node": node_name(i)})));
            }
            Fault::Bitflip | Fault::Truncate => {
                let Some(i) = pick_target(cluster, handle, &cluster_name, event.node, false, true)
                else {
                    continue;
                };
                disk_fault(cluster, i, event, sh, &mut checks, end);
            }
            Fault::PowerFail => power_fail(cluster, sh, &mut checks, end),
            Fault::Membership => {
                let Some(i) = pick_target(cluster, handle, &cluster_name, event.node, false, true)
                else {
                    continue;
                };
                remove_and_readd(cluster, i, sh, &mut checks, end);
            }
            Fault::Latency => {
                let Some(delay) = cluster.delays.get(event.node) else {
                    continue;
                };
                let ms = nemesis::latency_ms(event.pick);
                delay.set(ms);
                sh.rec(Op::nemesis(
                    "start-latency",
                    json!({"node": node_name(event.node), "delay_ms": ms}),
                ));
                sleep_until(end, &AtomicBool::new(false));
                // Recorded before the delay is lifted (and `start-latency` after it was set),
                // so an op between the two records was delayed both ways.
                sh.rec(Op::nemesis(
                    "stop-latency",
                    json!({"node": node_name(event.node)}),
                ));
                delay.set(0);
            }
            Fault::PauseMajority => pause_majority(cluster, handle, sh, end),
            Fault::Partition | Fault::Loss => {
                let Some(net) = &cluster.net else {
                    continue;
                };
                let (start_f, stop_f) = if event.fault == Fault::Partition {
                    ("start-partition", "stop-partition")
                } else {
                    ("start-loss", "stop-loss")
                };
                let mut applied = Ok(());
                for (i, from) in event.grudge.iter().enumerate() {
                    if from.is_empty() {
                        continue;
                    }
                    let r = if event.fault == Fault::Partition {
                        net.drop_from(i, from)
                    } else {
                        net.lossy(i, event.probability)
                    };
                    if r.is_err() && applied.is_ok() {
                        applied = r;
                    }
                }
                let mut value =
                    json!({"kind": event.kind, "grudge": nemesis::grudge_json(&event.grudge)});
                if event.fault == Fault::Loss {
                    value["probability"] = json!(event.probability);
                }
                if let Err(e) = &applied {
                    value["error"] = json!(format!("{e:#}"));
                    checks.push(HarnessCheck {
                        name: start_f.to_owned(),
                        passed: false,
                        detail: format!("{e:#}"),
                    });
                }
                sh.rec(Op::nemesis(start_f, value));
                sleep_until(end, &AtomicBool::new(false));
                let healed = net.heal();
                sh.rec(Op::nemesis(stop_f, json!({"ok": healed.is_ok()})));
            }
        }
    }
    checks
}

/// Removes node `i` from the membership with `server remove-node`, keeps it running outside
/// the cluster until `end`, then restarts it so that it asks to join again.
fn remove_and_readd(
    cluster: &mut Cluster,
    i: usize,
    sh: &workload::Shared,
    checks: &mut Vec<HarnessCheck>,
    end: Instant,
) {
    let name = node_name(i);
    let Some(id) = cluster.nodes[i].ready.map(|r| r.id) else {
        return;
    };
    let spec = &cluster.spec;
    let output = std::process::Command::new(&spec.server)
        .arg("remove-node")
        .arg(id.to_string())
        .args(["--cluster", &spec.cluster])
        .args(["--discovery-port", &spec.discovery_port.to_string()])
        .args(["--broadcast", &spec.broadcast.to_string()])
        // The admin credential comes from the token in the cluster directory next to the
        // node data dirs.
        .arg("--data-root")
        .arg(
            cluster.nodes[i]
                .data_dir
                .parent()
                .unwrap_or(std::path::Path::new(".")),
        )
        .stdin(std::process::Stdio::null())
        .output();
    let (removed, detail) = match output {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout).trim(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
        ),
        Err(e) => (false, format!("running server remove-node: {e}")),
    };
    sh.rec(Op::nemesis(
        "remove",
        json!({"node": name, "id": id, "ok": removed, "detail": detail}),
    ));
    if !removed {
        // Nothing changed (e.g. a membership change in progress); not a finding.
        return;
    }
    sleep_until(end, &AtomicBool::new(false));
    cluster.nodes[i].kill9();
    let outcome = start_node(cluster, i, sh, checks, "re-add");
    if !matches!(outcome, StartOutcome::Ready(_)) {
        checks.push(HarnessCheck {
            name: format!("re-add {name}"),
            passed: false,
            detail: format!("{name} did not come back after its removal: {outcome:?}"),
        });
    }
}

/// SIGSTOPs a majority of the nodes that excludes the leader, SIGCONTs them at `end`.
fn pause_majority(
    cluster: &mut Cluster,
    handle: &tokio::runtime::Handle,
    sh: &workload::Shared,
    end: Instant,
) {
    let n = cluster.nodes.len();
    let leader = pick_target(cluster, handle, &sh.cluster, 0, true, false);
    let candidates: Vec<usize> = (0..n)
        .filter(|&i| Some(i) != leader)
        .filter(|&i| !cluster.nodes[i].corrupt && cluster.nodes[i].is_running())
        .take(n / 2 + 1)
        .collect();
    let victims: Vec<usize> = candidates
        .into_iter()
        .filter(|&i| cluster.nodes[i].pause().is_ok())
        .collect();
    if victims.is_empty() {
        return;
    }
    let names: Vec<String> = victims.iter().map(|&i| node_name(i)).collect();
    sh.rec(Op::nemesis(
        "pause",
        json!({"nodes": names, "leader": leader.map(node_name), "majority": true}),
    ));
    sleep_until(end, &AtomicBool::new(false));
    for &i in &victims {
        let _ = cluster.nodes[i].resume();
    }
    sh.rec(Op::nemesis("resume", json!({"nodes": names})));
}

/// Power-fails every running node at once (SIGUSR1 to all, then reap), keeps them down until
/// `end`, restarts them all; each must come back.
fn power_fail(
    cluster: &mut Cluster,
    sh: &workload::Shared,
    checks: &mut Vec<HarnessCheck>,
    end: Instant,
) {
    let victims: Vec<usize> = (0..cluster.nodes.len())
        .filter(|&i| !cluster.nodes[i].corrupt && cluster.nodes[i].is_running())
        .collect();
    let signalled: Vec<usize> = victims
        .iter()
        .copied()
        .filter(|&i| cluster.nodes[i].power_fail().is_ok())
        .collect();
    // Only after every node got the signal: none outlives another by more than a fork+exec.
    let clean: Vec<bool> = victims
        .iter()
        .map(|&i| cluster.nodes[i].reap(Duration::from_secs(5)))
        .collect();
    sh.rec(Op::nemesis(
        "power-fail",
        json!({
            "nodes": victims.iter().map(|&i| node_name(i)).collect::<Vec<_>>(),
            "signalled": signalled.iter().map(|&i| node_name(i)).collect::<Vec<_>>(),
            "aborted_on_signal": clean,
        }),
    ));
    if clean.iter().any(|c| !c) {
        checks.push(HarnessCheck {
            name: "power-fail".into(),
            passed: false,
            detail: "a node did not abort on SIGUSR1 (was the server started with --weaken faulty-fs, built with feature weaken?); it was killed -9 instead".into(),
        });
    }
    sleep_until(end, &AtomicBool::new(false));
    for &i in &victims {
        if let StartOutcome::Exited(status, e) = start_node(cluster, i, sh, checks, "power-fail") {
            checks.push(HarnessCheck {
                name: format!("restart {} after power failure", node_name(i)),
                passed: false,
                detail: format!("{status}: {e}"),
            });
        }
    }
}

fn disk_fault(
    cluster: &mut Cluster,
    i: usize,
    event: &Event,
    sh: &workload::Shared,
    checks: &mut Vec<HarnessCheck>,
    end: Instant,
) {
    let name = node_name(i);
    cluster.nodes[i].kill9();
    sh.rec(Op::nemesis(
        "kill",
        json!({"node": name, "for": event.fault.name()}),
    ));
    let data = cluster.nodes[i].data_dir.clone();
    match event.fault {
        Fault::Bitflip => match nemesis::bitflip(&data, event.pick) {
            Ok(flip) => {
                sh.rec(Op::nemesis(
                    "bitflip",
                    json!({"node": name, "file": flip.file.display().to_string(),
                        "frame_offset": flip.frame_offset, "byte_offset": flip.byte_offset,
                        "bit": flip.bit, "sealed": flip.sealed}),
                ));
                sleep_until(end, &AtomicBool::new(false));
                let outcome = start_node(cluster, i, sh, checks, "bitflip");
                let file_name = flip
                    .file
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let (passed, detail) = match outcome {
                    StartOutcome::Exited(status, error) => {
                        let names = error.contains(&file_name)
                            && error.contains(&format!("offset {}", flip.frame_offset));
                        cluster.nodes[i].corrupt = true;
                        (
                            names,
                            format!("{name} refused to start ({status}); error names file and frame offset {}: {names}: {error}", flip.frame_offset),
                        )
                    }
                    StartOutcome::Ready(_) => (
                        false,
                        format!(
                            "{name} STARTED on a log with a flipped bit at {} byte {}",
                            flip.file.display(),
                            flip.byte_offset
                        ),
                    ),
                    StartOutcome::Slow => (
                        false,
                        format!("{name} neither started nor exited within {RESTART_TIMEOUT:?}"),
                    ),
                };
                checks.push(HarnessCheck {
                    name: format!("bitflip {name} refused"),
                    passed,
                    detail,
                });
            }
            Err(e) => {
                sh.rec(Op::nemesis(
                    "bitflip",
                    json!({"node": name, "skipped": format!("{e:#}")}),
                ));
                sleep_until(end, &AtomicBool::new(false));
                start_node(cluster, i, sh, checks, "bitflip skipped");
            }
        },
        _ => {
            let cut = nemesis::truncate(&data, event.pick);
            let value = match &cut {
                Ok(c) => {
                    json!({"node": name, "file": c.file.display().to_string(), "from": c.from, "to": c.to})
                }
                Err(e) => json!({"node": name, "skipped": format!("{e:#}")}),
            };
            sh.rec(Op::nemesis("truncate", value));
            sleep_until(end, &AtomicBool::new(false));
            let outcome = start_node(cluster, i, sh, checks, "truncate");
            if let Ok(c) = cut {
                let (passed, detail) = match outcome {
                    StartOutcome::Ready(_) => (
                        true,
                        format!(
                            "{name} started after its newest segment lost {} tail bytes",
                            c.from - c.to
                        ),
                    ),
                    StartOutcome::Exited(status, e) => {
                        (false, format!("{name} refused a torn tail ({status}): {e}"))
                    }
                    StartOutcome::Slow => (
                        false,
                        format!("{name} not ready within {RESTART_TIMEOUT:?} after a torn tail"),
                    ),
                };
                checks.push(HarnessCheck {
                    name: format!("truncate {name} recovered"),
                    passed,
                    detail,
                });
            }
        }
    }
}
