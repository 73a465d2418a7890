//! Running scenarios against systems, printing and saving their results, charts, and the
//! generated part of `benches/RESULTS.md`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::plot::{self, Series};
use crate::scenario::backup::{self, BackupOptions};
use crate::scenario::failover::{self, FailoverOptions};
use crate::scenario::fanout::{self, FanoutOptions};
use crate::scenario::floor::{self, FloorOptions};
use crate::scenario::markers::{self, MarkersOptions};
use crate::scenario::scale::{self, ScaleOptions};
use crate::scenario::search::{self, SearchOptions};
use crate::scenario::typing::{self, TypingOptions};
use crate::scenario::write::{self, WriteOptions};
use crate::stats::{now_rfc3339, RunResult};
use crate::sut::cellchat::{Cellchat, Target};
use crate::sut::{self, PeerPaths, System, SystemKind};
use crate::{secs, Common, Spec};

/// Where results go as they are measured: the terminal, `<out>/<scenario>.jsonl`, and at the
/// end the charts.
pub struct Sink {
    out: PathBuf,
    json: bool,
    results: Vec<RunResult>,
    header_printed: bool,
    /// Scenario files already truncated by this process.
    started: Vec<String>,
    /// The round being run, stamped on each result, when the systems run more than once.
    round: Option<usize>,
}

impl Sink {
    /// A sink writing under `common.out`.
    ///
    /// # Errors
    /// The directory cannot be made.
    pub fn new(common: &Common) -> Result<Self> {
        std::fs::create_dir_all(&common.out)
            .with_context(|| format!("creating {}", common.out.display()))?;
        Ok(Self {
            out: common.out.clone(),
            json: common.json,
            results: Vec::new(),
            header_printed: false,
            started: Vec::new(),
            round: None,
        })
    }

    /// Prints `result` and appends it to its scenario's JSON-lines file at once, so a failure
    /// later in the run keeps everything measured so far.
    ///
    /// # Errors
    /// The results file cannot be written.
    pub fn push(&mut self, mut result: RunResult) -> Result<()> {
        if let Some(round) = self.round {
            result.set("round", round);
        }
        let line = serde_json::to_string(&result)?;
        if self.json {
            println!("{line}");
        } else {
            if !self.header_printed {
                println!("{}", table_header());
                self.header_printed = true;
            }
            println!("{}", table_row(&result));
            // Their figures are mostly in `extra`; the columns above show only the load (for
            // search: all kinds of query together).
            if result.scenario == "backup" || result.scenario == "search" {
                for (key, value) in &result.extra {
                    print_extra(key, value, 4);
                }
            }
        }
        let path = self.out.join(format!("{}.jsonl", result.scenario));
        let fresh = !self.started.contains(&result.scenario);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(!fresh)
            .truncate(fresh)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(file, "{line}")?;
        if fresh {
            self.started.push(result.scenario.clone());
        }
        self.results.push(result);
        Ok(())
    }

    /// Prints the cellchat/peer ratios and draws the charts.
    ///
    /// # Errors
    /// A chart cannot be written.
    pub fn finish(&self) -> Result<()> {
        let ratios = ratios(&self.results);
        if !ratios.is_empty() && !self.json {
            println!();
            for line in &ratios {
                println!("{line}");
            }
        }
        draw_charts(&self.out, &self.results)
    }
}

/// One figure of `extra` on a line of its own: an object of plain values (or each object of a
/// list) as `key=value` pairs on one line, an object of objects as one such line per field.
/// Fractions are shown to two decimals.
fn print_extra(key: &str, value: &serde_json::Value, indent: usize) {
    use serde_json::Value;
    fn shown(value: &Value) -> String {
        match value {
            Value::Number(n) if n.is_f64() => format!("{:.2}", n.as_f64().unwrap_or(f64::NAN)),
            Value::Array(items) => {
                let items: Vec<String> = items.iter().map(shown).collect();
                format!("[{}]", items.join(", "))
            }
            value => value.to_string(),
        }
    }
    let pairs = |fields: &serde_json::Map<String, Value>| {
        let pairs: Vec<String> = (fields.iter())
            .map(|(k, v)| format!("{k}={}", shown(v)))
            .collect();
        pairs.join(" ")
    };
    match value {
        Value::Object(fields) if fields.values().any(Value::is_object) => {
            println!("{:indent$}{key}:", "");
            for (key, value) in fields {
                print_extra(key, value, indent + 4);
            }
        }
        Value::Object(fields) => println!("{:indent$}{key}: {}", "", pairs(fields)),
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_object) => {
            println!("{:indent$}{key}:", "");
            for (i, item) in items.iter().enumerate() {
                if let Value::Object(fields) = item {
                    println!("{:indent$}    [{i}] {}", "", pairs(fields));
                }
            }
        }
        value => println!("{:indent$}{key}: {}", "", shown(value)),
    }
}

fn table_header() -> String {
    format!(
        "{:<9} {:<9} {:>2} {:>5} {:>5} {:>6} {:>10} {:>8} {:>8} {:>8} {:>8} {:>6} {:>7} {:>5}",
        "scenario",
        "system",
        "n",
        "cli",
        "subs",
        "rate",
        "ops/s",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "max ms",
        "errors",
        "missing",
        "dups"
    )
}

fn table_row(r: &RunResult) -> String {
    let opt = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    format!(
        "{:<9} {:<9} {:>2} {:>5} {:>5} {:>6} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>6} {:>7} {:>5}",
        r.scenario,
        r.system,
        r.nodes,
        r.clients,
        r.subscribers,
        r.rate_per_s,
        r.throughput_per_s,
        r.latency_ms.p50,
        r.latency_ms.p99,
        r.latency_ms.p999,
        r.latency_ms.max,
        r.errors,
        opt(r.missing),
        opt(r.duplicates),
    )
}

/// cellchat against each peer measured in the same process, per scenario, load point and
/// round; with several rounds, then the median of each ratio over them with its range.
fn ratios(results: &[RunResult]) -> Vec<String> {
    let round = |r: &RunResult| r.extra.get("round").and_then(serde_json::Value::as_u64);
    let mut lines = Vec::new();
    // Per load point and peer: each round's throughput, p99 and CPU ratios.
    let mut over_rounds: BTreeMap<String, [Vec<f64>; 3]> = BTreeMap::new();
    for ours in results.iter().filter(|r| r.system == "cellchat") {
        for peer in results.iter().filter(|r| {
            r.system != "cellchat"
                && r.scenario == ours.scenario
                && r.clients == ours.clients
                && r.subscribers == ours.subscribers
                && r.rate_per_s == ours.rate_per_s
                && round(r) == round(ours)
        }) {
            let throughput = ours.throughput_per_s / peer.throughput_per_s.max(f64::MIN_POSITIVE);
            let p99 = ours.latency_ms.p99 / peer.latency_ms.p99.max(f64::MIN_POSITIVE);
            let cpu = |r: &RunResult| r.extra.get("server_cpu_us_per_msg")?.as_f64();
            let cpu_ratio = match (cpu(ours), cpu(peer)) {
                (Some(ours), Some(peer)) if peer > 0.0 => Some(ours / peer),
                _ => None,
            };
            let mut cpu = cpu_ratio.map_or_else(String::new, |ratio| {
                format!(", server CPU per message x{ratio:.2}")
            });
            // Runs minutes apart can meet different phases of a shared machine. The canaries
            // hint whether these two did; each system's own load moves its canary a little too.
            let canary = |r: &RunResult| r.extra.get("canary_unit_us")?.as_f64();
            if let (Some(ours), Some(peer)) = (canary(ours), canary(peer)) {
                let _ = write!(cpu, "; canary {ours:.0} against {peer:.0} µs");
            }
            let rate = if ours.rate_per_s > 0.0 {
                format!(" rate={}", ours.rate_per_s)
            } else {
                String::new()
            };
            let point = format!(
                "{} clients={} subscribers={}{rate}: cellchat/{}",
                ours.scenario, ours.clients, ours.subscribers, peer.system
            );
            let in_round = round(ours).map_or_else(String::new, |r| format!("round {r}: "));
            lines.push(format!(
                "{in_round}{point} throughput x{throughput:.2}, p99 x{p99:.2}{cpu}"
            ));
            if round(ours).is_some() {
                let entry = over_rounds.entry(point).or_default();
                entry[0].push(throughput);
                entry[1].push(p99);
                entry[2].extend(cpu_ratio);
            }
        }
    }
    for (point, [throughput, p99, cpu]) in &mut over_rounds {
        let mut line = format!(
            "over {} rounds: {point} throughput {}, p99 {}",
            throughput.len(),
            median_and_range(throughput),
            median_and_range(p99)
        );
        if !cpu.is_empty() {
            let _ = write!(line, ", server CPU per message {}", median_and_range(cpu));
        }
        lines.push(line);
    }
    lines
}

/// "x<median> (x<min>-x<max>)" of some ratios (at least one).
fn median_and_range(ratios: &mut [f64]) -> String {
    ratios.sort_by(f64::total_cmp);
    let n = ratios.len();
    let median = if n % 2 == 1 {
        ratios[n / 2]
    } else {
        (ratios[n / 2 - 1] + ratios[n / 2]) / 2.0
    };
    format!("x{median:.2} (x{:.2}-x{:.2})", ratios[0], ratios[n - 1])
}

/// One chart: scenario, file name, title, y label, x of a result, y of a result.
type Chart = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    fn(&RunResult) -> f64,
    fn(&RunResult) -> f64,
);

fn draw_charts(out: &Path, results: &[RunResult]) -> Result<()> {
    let by_system = |scenario: &str, x: fn(&RunResult) -> f64, y: fn(&RunResult) -> f64| {
        let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for r in results.iter().filter(|r| r.scenario == scenario) {
            // Fan-out runs at different rates are different curves.
            let label = if scenario == "fanout" {
                format!("{} {} msg/s", r.system, r.rate_per_s)
            } else {
                r.system.clone()
            };
            series.entry(label).or_default().push((x(r), y(r)));
        }
        series
            .into_iter()
            .map(|(label, mut points)| {
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                Series { label, points }
            })
            .collect::<Vec<_>>()
    };
    let charts: [Chart; 5] = [
        (
            "write",
            "write-throughput.svg",
            "write: acknowledged messages/s",
            "messages/s",
            |r| r.clients as f64,
            |r| r.throughput_per_s,
        ),
        (
            "write",
            "write-p50.svg",
            "write: p50 acknowledgement latency",
            "ms",
            |r| r.clients as f64,
            |r| r.latency_ms.p50,
        ),
        (
            "write",
            "write-p99.svg",
            "write: p99 acknowledgement latency",
            "ms",
            |r| r.clients as f64,
            |r| r.latency_ms.p99,
        ),
        (
            "fanout",
            "fanout-p99.svg",
            "fanout: p99 send-to-delivery latency",
            "ms",
            |r| r.subscribers as f64,
            |r| r.latency_ms.p99,
        ),
        (
            "fanout",
            "fanout-p50.svg",
            "fanout: p50 send-to-delivery latency",
            "ms",
            |r| r.subscribers as f64,
            |r| r.latency_ms.p50,
        ),
    ];
    for (scenario, file, title, y_label, x, y) in charts {
        let series = by_system(scenario, x, y);
        if series.is_empty() {
            continue;
        }
        let x_label = if scenario == "write" {
            "concurrent senders (log)"
        } else {
            "subscribers (log)"
        };
        plot::lines(&out.join(file), title, x_label, y_label, &series)?;
    }
    Ok(())
}

/// Starts (or joins) each system of `common` in turn and runs `spec` on it. A system that
/// cannot start is reported and skipped; the error is returned after the others ran.
///
/// # Errors
/// Some system could not start or a scenario failed; results measured before stay written.
pub async fn run_command(common: &Common, spec: &Spec, sink: &mut Sink) -> Result<()> {
    let peers = PeerPaths {
        etcd: common.etcd_bin.clone(),
        nats: common.nats_bin.clone(),
    };
    let mut failures = Vec::new();
    // With several rounds the systems take turns, in the reverse order every other round, so
    // that each ratio compares runs minutes apart rather than a whole round apart, and a
    // machine that drifts favours no system.
    for round in 0..common.repeat {
        sink.round = (common.repeat > 1).then_some(round);
        let mut order = common.system.clone();
        if round % 2 == 1 {
            order.reverse();
        }
        run_round(common, spec, &order, &peers, sink, &mut failures).await;
    }
    if !failures.is_empty() {
        bail!(
            "{} run(s) failed (results measured before are in {}):\n{}",
            failures.len(),
            common.out.display(),
            failures.join("\n")
        );
    }
    Ok(())
}

/// Runs `spec` once on each system of `order`, noting failures and going on.
async fn run_round(
    common: &Common,
    spec: &Spec,
    order: &[SystemKind],
    peers: &PeerPaths,
    sink: &mut Sink,
    failures: &mut Vec<String>,
) {
    for &kind in order {
        let cellchat_only = matches!(
            spec,
            Spec::Failover { .. }
                | Spec::Floor { .. }
                | Spec::Scale { .. }
                | Spec::Markers { .. }
                | Spec::Typing { .. }
                | Spec::Search { .. }
        );
        if cellchat_only && !matches!(kind, SystemKind::Cellchat | SystemKind::CellchatSigned) {
            eprintln!("skipping {kind}: this scenario kills or loads cellchat nodes only");
            continue;
        }
        // The archive tools are cellchat's; a signed run would measure the same backups.
        if matches!(spec, Spec::Backup { .. }) && kind != SystemKind::Cellchat {
            eprintln!("skipping {kind}: this scenario runs cellchat's archive tools only");
            continue;
        }
        if let Err(e) = run_on(common, spec, kind, peers, sink).await {
            eprintln!("error: {kind}: {e:#}");
            failures.push(format!("{kind}: {e:#}"));
        }
    }
}

async fn run_on(
    common: &Common,
    spec: &Spec,
    kind: SystemKind,
    peers: &PeerPaths,
    sink: &mut Sink,
) -> Result<()> {
    let warmup = secs(common.warmup);
    let duration = secs(common.duration);
    let fanout_options = |subscribers: usize, rate: f64, publishers: usize| FanoutOptions {
        publishers,
        subscribers,
        rate,
        duration,
        warmup,
        body: common.body,
        drain: std::time::Duration::from_secs(10),
        topic: format!("fanout-{:08x}", rand::random::<u32>()),
    };
    // Failover, scale and backup need cellchat's own handle; the others take any system.
    match spec {
        Spec::Failover { clients, rounds } => {
            let mut cellchat = start_cellchat(common).await?;
            let options = FailoverOptions {
                clients: *clients,
                rounds: *rounds,
                steady: std::time::Duration::from_secs(3),
                recover_timeout: std::time::Duration::from_secs(10),
                body: common.body,
            };
            sink.push(failover::run(&mut cellchat, &options).await?)?;
        }
        Spec::Scale {
            idle,
            subscribers,
            rate,
        } => {
            let cellchat = start_cellchat(common).await?;
            let options = ScaleOptions {
                idle: *idle,
                load: fanout_options(*subscribers, *rate, FANOUT_PUBLISHERS),
            };
            sink.push(scale::run(&cellchat, &options).await?)?;
        }
        Spec::Floor { clients, push } => {
            let mut cellchat = start_cellchat(common).await?;
            let options = FloorOptions {
                clients: clients.clone(),
                duration,
                warmup,
                body: common.body,
                push: push.clone(),
            };
            for result in floor::run(&mut cellchat, &options).await? {
                sink.push(result)?;
            }
        }
        Spec::Markers { users, rate } => {
            let cellchat = start_cellchat(common).await?;
            let options = MarkersOptions {
                users: *users,
                rate: *rate,
                duration,
                warmup,
            };
            sink.push(markers::run(&cellchat, &options).await?)?;
        }
        Spec::Search {
            messages,
            channels,
            users,
            queries,
            searchers,
            write_rate,
        } => {
            if !(write_rate.is_finite() && (0.0..=10_000.0).contains(write_rate)) {
                bail!("--write-rate must be 0..=10000 messages/s, got {write_rate}");
            }
            let cellchat = start_cellchat(common).await?;
            let options = SearchOptions {
                messages: *messages,
                channels: (*channels).max(1),
                users: (*users).max(1),
                queries: (*queries).max(1),
                searchers: (*searchers).max(1),
                write_rate: *write_rate,
            };
            for result in search::run(&cellchat, &options).await? {
                sink.push(result)?;
            }
        }
        Spec::Typing { pairs } => {
            let cellchat = start_cellchat(common).await?;
            let options = TypingOptions {
                pairs: *pairs,
                duration,
                warmup,
            };
            sink.push(typing::run(&cellchat, &options).await?)?;
        }
        Spec::Backup {
            messages,
            fill_clients,
            clients,
            passes,
            topics,
            snapshot_every,
        } => {
            let options = BackupOptions {
                messages: *messages,
                fill_clients: *fill_clients,
                topics: *topics,
                body: common.body,
                passes: *passes,
                load: WriteOptions {
                    clients: *clients,
                    duration,
                    warmup,
                    body: common.body,
                    topics: *topics,
                },
            };
            options.validate()?;
            if !common.join.is_empty() {
                bail!(
                    "backup runs the server's tools on a cluster the harness starts; drop --join"
                );
            }
            let every = snapshot_every.map(|n| n.to_string());
            let extra: Vec<&str> = every
                .iter()
                .flat_map(|n| ["--snapshot-every", n.as_str()])
                .collect();
            let mut cellchat = Cellchat::start_with(common.nodes, &extra).await?;
            let tools = backup::Tools::of(&mut cellchat)?;
            sink.push(backup::archive(&cellchat, &tools, &options).await?)?;
            if *passes > 0 {
                sink.push(backup::under_load(&cellchat, &tools, &options).await?)?;
            }
        }
        Spec::Write { clients, topics } => {
            let system = start_system(common, kind, peers).await?;
            for &count in clients {
                let options = WriteOptions {
                    clients: count,
                    duration,
                    warmup,
                    body: common.body,
                    topics: *topics,
                };
                sink.push(write::run(system.as_ref(), &options).await?)?;
            }
        }
        Spec::Fanout {
            subscribers,
            rate,
            publishers,
        } => {
            let system = start_system(common, kind, peers).await?;
            for &count in subscribers {
                let options = fanout_options(count, *rate, *publishers);
                sink.push(fanout::run(system.as_ref(), &options).await?)?;
            }
        }
    }
    Ok(())
}

async fn start_cellchat(common: &Common) -> Result<Cellchat> {
    if common.join.is_empty() {
        Cellchat::start(common.nodes).await
    } else {
        Cellchat::join(Target {
            cluster: common.cluster.clone(),
            discovery_port: common.discovery_port,
            join: common.join.clone(),
            token: crate::sut::cellchat::token_from_env(),
        })
        .await
    }
}

async fn start_system(
    common: &Common,
    kind: SystemKind,
    peers: &PeerPaths,
) -> Result<Box<dyn System>> {
    if kind == SystemKind::CellchatBase {
        let Some(base) = &common.base_bin else {
            bail!("cellchat-base needs --base-bin (or CELLCHAT_BASE_BIN): an earlier server build");
        };
        return Ok(Box::new(
            Cellchat::start_from(common.nodes, &[], Some(base)).await?,
        ));
    }
    if kind.is_cellchat() {
        let signed = kind == SystemKind::CellchatSigned;
        return Ok(Box::new(start_cellchat(common).await?.signing(signed)));
    }
    sut::start(kind, common.nodes, peers).await
}

/// Publishers of the report's fan-out runs, each at its share of the rate and one send at a
/// time. One publisher at 200 msg/s keeps its schedule only while every ack takes under 5 ms,
/// which NATS sync-always (6.3 ms) and a loaded cellchat (5 ms beside 10,000 idle clients) do
/// not: the publisher, not the system, then set the rate.
const FANOUT_PUBLISHERS: usize = 4;

/// Markers around the part of RESULTS.md that `bench report` owns.
const BEGIN: &str = "<!-- bench report: begin (generated by `cargo run --release -p bench -- report`; edits inside are overwritten) -->";
const END: &str = "<!-- bench report: end -->";

/// `bench report`: the standard matrix on every system, then RESULTS.md.
///
/// # Errors
/// Some run failed (everything else still ran and was written), or RESULTS.md could not be
/// rewritten.
pub async fn run_all(common: &Common, quick: bool, results_md: &Path) -> Result<()> {
    let mut common = common.clone();
    common.system = SystemKind::ALL
        .into_iter()
        .filter(|k| *k != SystemKind::CellchatBase || common.base_bin.is_some())
        .collect();
    if quick {
        common.duration = common.duration.min(3.0);
        common.warmup = common.warmup.min(1.0);
    }
    let mut sink = Sink::new(&common)?;
    let (write_clients, fanout_subscribers, fanout_subscribers_slow, rounds, idle) = if quick {
        (vec![1, 128], vec![100], vec![], 3, 1000)
    } else {
        (
            vec![1, 16, 128, 1024],
            vec![100, 1000],
            vec![1000],
            20,
            10_000,
        )
    };
    let specs = [
        Spec::Write {
            clients: write_clients,
            topics: 8,
        },
        Spec::Fanout {
            subscribers: fanout_subscribers,
            rate: 200.0,
            publishers: FANOUT_PUBLISHERS,
        },
        // 1,000 subscribers at 200 msg/s is 200,000 deliveries/s, more than the two cores
        // carry for any system with the harness beside it (the run above shows how far each
        // falls behind); 20 msg/s is the same delivery volume as 100 subscribers at 200.
        Spec::Fanout {
            subscribers: fanout_subscribers_slow,
            rate: 20.0,
            publishers: FANOUT_PUBLISHERS,
        },
        Spec::Failover {
            clients: 16,
            rounds,
        },
        Spec::Scale {
            idle,
            subscribers: 100,
            rate: 200.0,
        },
    ];
    // The build before a change is the reference for the write ratios only: a client speaks
    // its own push protocol version, so an older build's fan-out needs a client of its time.
    let mut fanout_common = common.clone();
    fanout_common
        .system
        .retain(|k| *k != SystemKind::CellchatBase);
    let mut failures = Vec::new();
    for spec in &specs {
        if matches!(spec, Spec::Fanout { subscribers, .. } if subscribers.is_empty()) {
            continue;
        }
        let common = if matches!(spec, Spec::Fanout { .. }) {
            &fanout_common
        } else {
            &common
        };
        if let Err(e) = run_command(common, spec, &mut sink).await {
            failures.push(format!("{e:#}"));
        }
    }
    sink.finish()?;
    write_results_md(results_md, &sink.results, &failures, quick)?;
    if !failures.is_empty() {
        bail!("some runs failed:\n{}", failures.join("\n"));
    }
    Ok(())
}

fn write_results_md(
    path: &Path,
    results: &[RunResult],
    failures: &[String],
    quick: bool,
) -> Result<()> {
    let mut block = String::new();
    let _ = writeln!(block, "{BEGIN}");
    let _ = writeln!(block, "\n### Cluster runs ({})\n", now_rfc3339());
    let _ = writeln!(block, "{}", machine_line());
    let _ = writeln!(
        block,
        "\nCommand: `cargo run --release -p bench -- report{}` (3 nodes of each system on loopback; \
         100 B bodies; writes through each system's client library; raw lines in \
         `benches/results/*.jsonl`, charts `benches/results/*.svg`).\n",
        if quick { " --quick" } else { "" }
    );
    let _ = writeln!(block, "#### write (closed-loop senders)\n");
    let _ = writeln!(
        block,
        "| system | senders | msgs/s | p50 ms | p99 ms | p999 ms | max ms | errors | server CPU µs/msg | harness CPU µs/msg | canary compute / memory µs |"
    );
    let _ = writeln!(
        block,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let extra = |r: &RunResult, key: &str, decimals: usize| {
        r.extra
            .get(key)
            .and_then(serde_json::Value::as_f64)
            .map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
    };
    let canary = |r: &RunResult| {
        format!(
            "{} / {}",
            extra(r, "canary_unit_us", 0),
            extra(r, "canary_memory_us", 0)
        )
    };
    for r in results.iter().filter(|r| r.scenario == "write") {
        let _ = writeln!(
            block,
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} |",
            r.system,
            r.clients,
            r.throughput_per_s,
            r.latency_ms.p50,
            r.latency_ms.p99,
            r.latency_ms.p999,
            r.latency_ms.max,
            r.errors,
            extra(r, "server_cpu_us_per_msg", 0),
            extra(r, "harness_cpu_us_per_msg", 0),
            canary(r),
        );
    }
    if results
        .iter()
        .any(|r| r.system == SystemKind::CellchatBase.name())
    {
        let _ = writeln!(
            block,
            "\n`cellchat-base` is an earlier cellchat build (`--base-bin`), the reference for the \
             write ratios; it runs no fan-out, whose client speaks only today's push protocol."
        );
    }
    let _ = writeln!(
        block,
        "\n#### fanout ({FANOUT_PUBLISHERS} publishers, evenly staggered, on a fixed schedule)\n\n\
         Latency runs from each send to its delivery. Each publisher sends one message at a \
         time and nothing after the measured window, so `sent/s` below the offered rate means \
         the system (with the harness on the same cores) could not keep up, and its latencies \
         then hold for the rate it managed. `ack p50` is the publishers' own \
         send-to-acknowledgement wait.\n"
    );
    let _ = writeln!(
        block,
        "| system | subscribers | offered msg/s | sent/s | deliveries/s | ack p50 ms | p50 ms | p99 ms | max ms | missing | duplicates | server CPU µs/msg |"
    );
    let _ = writeln!(
        block,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for r in results.iter().filter(|r| r.scenario == "fanout") {
        let _ = writeln!(
            block,
            "| {} | {} | {} | {} | {:.0} | {} | {:.2} | {:.2} | {:.2} | {} | {} | {} |",
            r.system,
            r.subscribers,
            r.rate_per_s,
            extra(r, "sent_per_s", 2),
            r.throughput_per_s,
            extra(r, "ack_p50_ms", 2),
            r.latency_ms.p50,
            r.latency_ms.p99,
            r.latency_ms.max,
            r.missing.unwrap_or(0),
            r.duplicates.unwrap_or(0),
            extra(r, "server_cpu_us_per_msg", 0),
        );
    }
    let ratios = ratios(results);
    if !ratios.is_empty() {
        let _ = writeln!(block, "\n#### cellchat / peer, same run\n");
        for line in ratios {
            let _ = writeln!(block, "- {line}");
        }
    }
    for r in results
        .iter()
        .filter(|r| r.scenario == "failover" || r.scenario == "scale")
    {
        let _ = writeln!(block, "\n#### {} (cellchat)\n", r.scenario);
        let _ = writeln!(
            block,
            "{} senders, {:.0} acknowledged or delivered/s overall, latency p50 {:.2} ms / p99 {:.2} ms / max {:.2} ms, errors {}{}",
            r.clients,
            r.throughput_per_s,
            r.latency_ms.p50,
            r.latency_ms.p99,
            r.latency_ms.max,
            r.errors,
            r.missing.map_or_else(String::new, |m| format!(", missing {m}, duplicates {}", r.duplicates.unwrap_or(0))),
        );
        let _ = writeln!(block);
        for (key, value) in &r.extra {
            let _ = writeln!(block, "- {key}: {value}");
        }
    }
    if !failures.is_empty() {
        let _ = writeln!(block, "\n#### Runs that failed\n");
        for failure in failures {
            for line in failure.lines().filter(|l| !l.trim().is_empty()) {
                let _ = writeln!(block, "- {}", line.trim());
            }
        }
    }
    let _ = writeln!(block, "\n{END}");

    let old = std::fs::read_to_string(path).unwrap_or_default();
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(begin), Some(end)) if end > begin => {
            format!(
                "{}{}{}",
                &old[..begin],
                block.trim_end(),
                &old[end + END.len()..]
            )
        }
        _ => format!(
            "{}\n\n## Cluster and comparisons\n\n{}\n",
            old.trim_end(),
            block.trim_end()
        ),
    };
    std::fs::write(path, new).with_context(|| format!("writing {}", path.display()))
}

fn machine_line() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let version = |binary: &str, arg: &str| {
        Command::new(binary)
            .arg(arg)
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.lines().next().map(str::to_owned))
            .unwrap_or_else(|| format!("{binary}: not found"))
    };
    let nats = crate::sut::procs::find_binary(
        "nats-server",
        None,
        &crate::sut::procs::python_scripts_dir()
            .into_iter()
            .collect::<Vec<_>>(),
    )
    .map_or_else(
        || "nats-server: not found".to_owned(),
        |p| version(&p.to_string_lossy(), "--version"),
    );
    format!(
        "Machine: {cores} cores ({cpu}), Linux {kernel}. Versions: cellchat {}, {}, {}.",
        env!("CARGO_PKG_VERSION"),
        version("etcd", "--version"),
        nats
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_run(system: &str, throughput: f64, cpu: f64, canary: Option<f64>) -> RunResult {
        let mut run = RunResult::new("write", system, 3);
        run.clients = 128;
        run.throughput_per_s = throughput;
        run.latency_ms.p99 = 10.0;
        run.set("server_cpu_us_per_msg", cpu);
        if let Some(canary) = canary {
            run.set("canary_unit_us", canary);
        }
        run
    }

    #[test]
    fn a_ratio_names_both_runs_canaries() {
        let lines = ratios(&[
            write_run("cellchat", 20_000.0, 60.0, Some(101.0)),
            write_run("nats", 25_000.0, 50.0, Some(128.0)),
        ]);
        assert_eq!(lines.len(), 1, "{lines:?}");
        let line = &lines[0];
        assert!(line.contains("throughput x0.80"), "{line}");
        assert!(line.contains("server CPU per message x1.20"), "{line}");
        assert!(line.contains("canary 101 against 128 µs"), "{line}");

        let lines = ratios(&[
            write_run("cellchat", 20_000.0, 60.0, None),
            write_run("nats", 25_000.0, 50.0, Some(128.0)),
        ]);
        assert!(!lines[0].contains("canary"), "a run without one: {lines:?}");
    }

    #[test]
    fn rounds_pair_runs_of_the_same_round_and_give_medians() {
        let in_round = |mut run: RunResult, round: u64| {
            run.set("round", round);
            run
        };
        let lines = ratios(&[
            in_round(write_run("cellchat", 10_000.0, 60.0, None), 0),
            in_round(write_run("nats", 20_000.0, 60.0, None), 0),
            in_round(write_run("nats", 10_000.0, 30.0, None), 1),
            in_round(write_run("cellchat", 10_000.0, 60.0, None), 1),
            in_round(write_run("cellchat", 12_000.0, 60.0, None), 2),
            in_round(write_run("nats", 16_000.0, 60.0, None), 2),
        ]);
        assert_eq!(lines.len(), 4, "three rounds and their summary: {lines:?}");
        assert!(lines[0].starts_with("round 0: "), "{lines:?}");
        assert!(lines[0].contains("throughput x0.50"), "{lines:?}");
        assert!(lines[1].contains("throughput x1.00"), "{lines:?}");
        assert!(lines[2].contains("throughput x0.75"), "{lines:?}");
        let summary = &lines[3];
        assert!(summary.starts_with("over 3 rounds: "), "{summary}");
        assert!(
            summary.contains("throughput x0.75 (x0.50-x1.00)"),
            "the median and the range: {summary}"
        );
        assert!(
            summary.contains("server CPU per message x1.00 (x1.00-x2.00)"),
            "{summary}"
        );
    }
}
