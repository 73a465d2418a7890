//! `scale`: N nodes, thousands of idle connected clients (each streaming a quiet channel, as a
//! chat user waiting for messages does) held by helper processes, and a steady chat load
//! measured on top: delivery latency, server RSS per idle client, server CPU.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cellchat_client::Client;
use futures::StreamExt;

use super::fanout::{self, FanoutOptions};
use crate::stats::RunResult;
use crate::sut::cellchat::{client_config, Cellchat, Target};
use crate::sut::procs::{cpu_time, rss_bytes};
use crate::sut::System;

/// Idle clients per helper process: each client holds a connection to every node, and one
/// process must stay under its open-file limit.
pub const IDLE_PER_PROCESS: usize = 2500;

/// What one `scale` run does.
#[derive(Debug, Clone)]
pub struct ScaleOptions {
    /// Idle connected clients.
    pub idle: usize,
    /// The chat load measured on top of them.
    pub load: FanoutOptions,
}

/// Helper processes holding idle clients; killed by pid on drop.
struct IdleHolders(Vec<Child>);

impl Drop for IdleHolders {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `scale` on a cluster the harness started.
///
/// # Errors
/// Helper processes failed to connect their clients, or the load could not run.
pub async fn run(cellchat: &Cellchat, options: &ScaleOptions) -> Result<RunResult> {
    let pids = cellchat.pids();
    let rss = |pids: &[u32]| pids.iter().filter_map(|p| rss_bytes(*p)).sum::<u64>();
    let rss_before = rss(&pids);
    let target = cellchat.target().clone();
    let connect_started = Instant::now();
    let holders = spawn_idle(&target, options.idle).await?;
    let connect_time = connect_started.elapsed();
    // Let connection bursts settle before measuring memory and load.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = rss(&pids);
    let cpu_before: Duration = pids.iter().filter_map(|p| cpu_time(*p)).sum();
    let load_started = Instant::now();
    let mut result = fanout::run(cellchat, &options.load).await?;
    let wall = load_started.elapsed();
    let cpu_after: Duration = pids.iter().filter_map(|p| cpu_time(*p)).sum();
    let rss_after = rss(&pids);
    drop(holders);

    result.scenario = "scale".to_owned();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    result.set("idle_clients", options.idle);
    result.set("idle_connect_s", connect_time.as_secs_f64());
    result.set("server_rss_before_mib", mib(rss_before));
    result.set("server_rss_idle_mib", mib(rss_idle));
    result.set("server_rss_after_load_mib", mib(rss_after));
    if options.idle > 0 {
        result.set(
            "server_rss_per_idle_client_kib",
            rss_idle.saturating_sub(rss_before) as f64 / 1024.0 / options.idle as f64,
        );
    }
    result.set(
        "server_cpu_percent",
        100.0 * (cpu_after.saturating_sub(cpu_before)).as_secs_f64() / wall.as_secs_f64(),
    );
    Ok(result)
}

/// Starts helper processes (`bench idle`) holding `count` idle clients in all, and waits until
/// each says its clients are connected.
async fn spawn_idle(target: &Target, count: usize) -> Result<IdleHolders> {
    let exe = std::env::current_exe().context("locating the bench binary")?;
    let mut holders = IdleHolders(Vec::new());
    let mut remaining = count;
    let mut readers = Vec::new();
    while remaining > 0 {
        let here = remaining.min(IDLE_PER_PROCESS);
        remaining -= here;
        let mut command = Command::new(&exe);
        if let Some(token) = &target.token {
            command.env("CELLCHAT_TOKEN", token.to_string());
        }
        let mut child = command
            .arg("idle")
            .args(["--cluster", &target.cluster])
            .args(["--discovery-port", &target.discovery_port.to_string()])
            .args(["--count", &here.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting an idle-client holder")?;
        let stdout = child.stdout.take().context("holder stdout")?;
        readers.push(tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            let read = BufReader::new(stdout).read_line(&mut line);
            (read, line)
        }));
        holders.0.push(child);
    }
    let progress = super::bar(readers.len() as u64, "idle-client holders ready");
    for reader in readers {
        let (read, line) = tokio::time::timeout(Duration::from_secs(600), reader)
            .await
            .context("an idle-client holder took over 10 minutes to connect")??;
        read.context("reading an idle-client holder")?;
        if !line.starts_with("ready") {
            bail!("an idle-client holder failed: {line:?}");
        }
        progress.inc(1);
    }
    progress.finish_and_clear();
    Ok(holders)
}

/// The `bench idle` helper: connects `count` read-only clients, each streaming one of 100
/// quiet channels, prints `ready <count>`, and holds them until stdin closes.
///
/// # Errors
/// A client could not connect.
pub async fn hold_idle(target: Target, count: usize) -> Result<()> {
    let reader = crate::sut::cellchat::reader_identity();
    let clients: Vec<_> = futures::stream::iter(0..count)
        .map(|i| {
            let (target, reader) = (target.clone(), reader.clone());
            async move {
                let client = Client::connect(client_config(&target, Some(reader))).await?;
                let subscription = client.subscribe(&format!("idle-{}", i % 100), 0);
                anyhow::Ok((client, subscription))
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    println!("ready {}", clients.len());
    // Hold until the parent closes our stdin (or dies).
    tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {
            sink.clear();
        }
    })
    .await?;
    drop(clients);
    Ok(())
}
