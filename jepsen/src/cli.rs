//! Command-line interface: subcommands (`check`, `run`, `cleanup`), printing the verdict, exit
//! codes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::checker::check;
use crate::history::History;
use crate::report;

/// Exit code of a history that breaks an invariant.
pub const EXIT_INVALID: u8 = 1;
/// Exit code of a history that cannot be read (malformed line, missing file, unwritable --out).
pub const EXIT_MALFORMED: u8 = 2;

/// cellchat fault-injection harness.
#[derive(Debug, Parser)]
#[command(name = "jepsen", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Re-check a history file (JSON lines) offline and print the verdict. Exits 0 when valid,
    /// 1 when an anomaly was found, 2 when the file is unreadable or malformed.
    Check {
        /// The history, e.g. runs/<dir>/history.jsonl.
        file: PathBuf,
        /// Write results.json and report.html (with SVG plots) into this directory.
        #[arg(long, env = "JEPSEN_OUT")]
        out: Option<PathBuf>,
    },
    /// Start a real cluster, drive the workload while the nemesis injects faults, heal, take
    /// final reads from every node, check, and write a run directory. Exits 0 when valid, 1
    /// when invalid, 2 when the run could not be set up.
    Run(Box<RunArgs>),
    /// Remove namespaces, bridges and veths named `jp<pid>...` whose harness process is gone.
    Cleanup,
}

/// Options of `jepsen run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Cluster size.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Seconds of workload (healing, recovery and final reads come after).
    #[arg(long, default_value_t = 30)]
    pub time_limit: u64,
    /// Seed of the fault schedule (default: from the clock; printed first).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Comma-separated faults: kill,pause,bitflip,truncate,partition,loss,power-fail, or `all`
    /// (every one but power-fail, which needs a server built with feature `weaken`).
    #[arg(long, default_value = "kill,pause")]
    pub nemesis: String,
    /// Mean seconds between faults.
    #[arg(long, default_value_t = 5.0)]
    pub interval: f64,
    /// Client operations per second, all processes together.
    #[arg(long, default_value_t = 40.0)]
    pub rate: f64,
    /// Client processes (every fourth one streams; the others send).
    #[arg(long, default_value_t = 6)]
    pub clients: usize,
    /// Channels written and read.
    #[arg(long, default_value_t = 4)]
    pub channels: usize,
    /// Run directory (default: jepsen/runs/<time>-seed<seed>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// `loopback` (127.0.0.x hosts) or `netns` (a namespace per node; root, ip, iptables).
    #[arg(long, default_value = "loopback")]
    pub mode: String,
    /// The server binary (default: `server` next to this executable).
    #[arg(long)]
    pub server: Option<PathBuf>,
    /// Keep node data dirs even when the run is valid.
    #[arg(long)]
    pub keep_data: bool,
    /// Run a deliberately broken server (`server --weaken`; needs a server built with the
    /// cargo feature `weaken`): comma-separated `skip-dedup`, `ack-before-fsync`, `faulty-fs`.
    /// Such a run is expected to be invalid; it shows the checker catches the breakage.
    #[arg(long, default_value = "")]
    pub weaken: String,
    /// One more flag for every server (repeatable; `--server-arg=--election-min-ms`
    /// `--server-arg=5000`), passed after the harness's own.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    pub server_args: Vec<String>,
    /// Set this cluster default retention before the workload (`40`, `2m`, `7d,500`) and
    /// propose expiries often, so messages expire during the run; the checker allows expired
    /// messages to be missing and nothing else.
    #[arg(long)]
    pub retention: Option<String>,
}

/// Runs a parsed command line and returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Check { file, out } => run_check(&file, out.as_deref()),
        Command::Run(args) => run_live(&args),
        Command::Cleanup => {
            let removed = crate::live::netns::cleanup();
            for r in &removed {
                println!("removed {r}");
            }
            println!("{} leftovers removed", removed.len());
            ExitCode::SUCCESS
        }
    }
}

/// Turns the CLI options into a [`RunConfig`](crate::live::RunConfig).
///
/// # Errors
/// An unknown nemesis or mode.
pub fn run_config(args: &RunArgs) -> anyhow::Result<crate::live::RunConfig> {
    use crate::live::cluster::Mode;
    use crate::live::nemesis::Fault;
    let nemesis = if args.nemesis == "all" {
        // `power-fail` needs a server built with feature `weaken`; name it explicitly.
        Fault::ALL
            .into_iter()
            .filter(|f| *f != Fault::PowerFail)
            .collect()
    } else {
        let mut v = Vec::new();
        for name in args
            .nemesis
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let f = Fault::parse(name)?;
            if !v.contains(&f) {
                v.push(f);
            }
        }
        v
    };
    let mode = match args.mode.as_str() {
        "loopback" => Mode::Loopback,
        "netns" => Mode::Netns,
        other => anyhow::bail!("unknown --mode {other:?}: use loopback or netns"),
    };
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs() ^ u64::from(d.subsec_nanos()))
    });
    let out = args.out.clone().unwrap_or_else(|| {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("runs")
            .join(format!("{ts}-seed{seed}"))
    });
    if !args.interval.is_finite() || args.interval <= 0.0 {
        anyhow::bail!("--interval must be positive");
    }
    Ok(crate::live::RunConfig {
        nodes: args.nodes,
        time_limit: std::time::Duration::from_secs(args.time_limit),
        seed,
        nemesis,
        interval: std::time::Duration::from_secs_f64(args.interval),
        rate: args.rate,
        clients: args.clients,
        channels: args.channels,
        out,
        mode,
        server: args.server.clone(),
        keep_data: args.keep_data,
        weaken: args.weaken.clone(),
        server_args: args.server_args.clone(),
        retention: args.retention.clone(),
    })
}

fn run_live(args: &RunArgs) -> ExitCode {
    let cfg = match run_config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(EXIT_MALFORMED);
        }
    };
    match crate::live::run_live(cfg) {
        Ok(outcome) => {
            println!("run directory: {}", outcome.dir.display());
            println!("{} passed, {} failed", outcome.passed, outcome.failed);
            if outcome.valid() {
                println!("VALID");
                ExitCode::SUCCESS
            } else {
                println!("INVALID");
                ExitCode::from(EXIT_INVALID)
            }
        }
        Err(e) => {
            eprintln!("error: the run could not complete: {e:#}");
            println!("0 passed, 1 failed");
            ExitCode::from(EXIT_MALFORMED)
        }
    }
}

fn run_check(file: &Path, out: Option<&Path>) -> ExitCode {
    let history = match History::read(file) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {}: {e}", file.display());
            eprintln!("fix or truncate that line; the format is described in jepsen/README.md");
            return ExitCode::from(EXIT_MALFORMED);
        }
    };
    let report = check(&history);
    report::print_summary(&report);
    if let Some(dir) = out {
        let perf = report::perf(&history);
        if let Err(e) = report::write(dir, &report, &perf) {
            eprintln!("error: cannot write the report into {}: {e}", dir.display());
            return ExitCode::from(EXIT_MALFORMED);
        }
        println!(
            "wrote {} and {}",
            dir.join("results.json").display(),
            dir.join("report.html").display()
        );
    }
    if report.valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_INVALID)
    }
}
