//! `floor`: what a send and its deliveries cannot cost less than on this machine, measured next to it (cellchat
//! only). Each part is a result of its own (`part` in the JSON):
//!
//! - `ping`: C closed-loop connections to the leader, each calling `ping` over the same TLS
//!   and tarpc transport a send uses. A ping touches no Raft, no log and no state machine, so
//!   its server CPU per call is the floor of a send's connection path on the leader, and its
//!   latency the floor of one client round trip.
//! - `fsync`: appends the size of a one-send log entry, each followed by `fdatasync`, into a
//!   file zero-filled and synced first, as the Raft log overwrites its prepared segments. Its
//!   latency is the floor of one durable append, paid once by the leader and once by a
//!   follower (in parallel with the leader's) before a send is committed.
//! - `fsync_shared`: the same, from as many threads at once as the cluster has nodes, each
//!   with a file of its own: the nodes of a cluster on one machine share its disk, and their
//!   appends of the same entry reach it together.
//! - `fsync_paced`, once per fan-out rate: `fsync_shared`'s appends made together at that rate,
//!   as a fan-out's publishers make the nodes append, each after the disk has been idle. A
//!   round's `commit` time is what a commit waits for on the disk: the leader's append and the
//!   faster follower's.
//! - `wake`: two threads handing a token back and forth over channels; half a round trip is
//!   one wake-up of a sleeping thread, which every hop between the tasks and threads of a send
//!   pays when the machine is otherwise idle.
//! - `push` and `push_plain`, once per fan-out point: the floor of delivering each message to
//!   many subscribers, over TLS and over bare TCP (see [`push`]).

mod push;

pub use push::PushPoint;

use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use super::CpuMeter;
use crate::stats::{Latencies, RunResult};
use crate::sut::cellchat::Cellchat;
use crate::sut::System;

/// What one `floor` run does.
#[derive(Debug, Clone)]
pub struct FloorOptions {
    /// Closed-loop ping connections of each `ping` part.
    pub clients: Vec<usize>,
    /// Measured time of each `ping` part.
    pub duration: Duration,
    /// Time before measuring.
    pub warmup: Duration,
    /// Body size of the sends this stands for; the `fsync` part appends entries of about the
    /// size a one-send entry of this body has.
    pub body: usize,
    /// Fan-out points of the `push` parts.
    pub push: Vec<PushPoint>,
}

/// Bytes a one-send log entry adds to its body: the sender and channel names, client id, seq
/// and time, the Raft log id and the log's frame. An estimate from those fields (about 110-160
/// bytes with the harness's names), rounded up; an fdatasync of one page costs the same.
const ENTRY_OVERHEAD_BYTES: usize = 160;

/// Appends timed by the `fsync` part (by each thread of `fsync_shared`).
const FSYNC_APPENDS: usize = 5_000;

/// Rounds of an `fsync_paced` part at `rate`: about 5 s of them, at least 300 so that a p99 is
/// not one round, and at most 1,000.
fn fsync_paced_rounds(rate: f64) -> usize {
    ((rate * 5.0) as usize).clamp(300, 1_000)
}

/// Round trips timed by the `wake` part.
const WAKE_ROUND_TRIPS: usize = 20_000;

/// Deadline of one ping.
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `ping` once per client count, then `fsync` and `fsync_shared`, `fsync_paced` once per
/// fan-out rate, `wake`, then `push` and `push_plain` once per fan-out point.
///
/// # Errors
/// The leader cannot be found or reached, or the temp file cannot be written.
pub async fn run(cellchat: &mut Cellchat, options: &FloorOptions) -> Result<Vec<RunResult>> {
    let mut results = Vec::new();
    for &clients in &options.clients {
        results.push(ping(cellchat, clients, options).await?);
    }
    let (body, nodes) = (options.body, cellchat.node_count());
    results.push(tokio::task::spawn_blocking(move || fsync(body, 1)).await??);
    results.push(tokio::task::spawn_blocking(move || fsync(body, nodes)).await??);
    let mut rates: Vec<f64> = options.push.iter().map(|p| p.rate).collect();
    rates.sort_by(f64::total_cmp);
    rates.dedup();
    for rate in rates {
        results.push(tokio::task::spawn_blocking(move || fsync_paced(body, nodes, rate)).await??);
    }
    results.push(tokio::task::spawn_blocking(wake).await??);
    for &point in &options.push {
        for tls in [true, false] {
            results.push(push::run(point, tls, options.duration, options.warmup, body).await?);
        }
    }
    Ok(results)
}

async fn ping(
    cellchat: &mut Cellchat,
    clients: usize,
    options: &FloorOptions,
) -> Result<RunResult> {
    let token =
        cellchat.target().token.clone().context(
            "the floor scenario needs the cluster's token (a cluster the harness started)",
        )?;
    let (_, leader) =
        testkit::leader_client_addr(cellchat.local()?, Duration::from_secs(10)).await?;
    let verifier = proto::tls::CaVerifier::new(proto::tls::Trust::Pinned(token.ca));
    let tls = proto::tls::client_config(verifier, proto::tls::ALPN_CHAT);
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        let (client, _) = proto::connect_chat(leader, tls.clone(), Duration::from_secs(5))
            .await
            .with_context(|| format!("connecting to the leader at {leader}"))?;
        // The node closes a connection that has not said hello within a few seconds.
        let hello = proto::Hello::new(cellchat.target().cluster.clone(), None);
        client
            .hello(tarpc::context::current(), hello)
            .await
            .context("hello")?
            .map_err(|e| anyhow::anyhow!("hello refused: {e}"))?;
        conns.push(client);
    }
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let measured = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|client| {
            let (measuring, stop, measured) = (measuring.clone(), stop.clone(), measured.clone());
            tokio::spawn(async move {
                let (mut latencies, mut ops, mut errors) = (Latencies::new(), 0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let mut ctx = tarpc::context::current();
                    ctx.deadline = Instant::now() + PING_TIMEOUT;
                    let started = Instant::now();
                    let answered = client.ping(ctx, rand::random()).await.is_ok();
                    if !answered {
                        // A broken connection fails at once; looping on it would only spin.
                        errors += 1;
                        break;
                    }
                    if measuring.load(Ordering::Relaxed) {
                        latencies.record(started.elapsed());
                        ops += 1;
                        measured.fetch_add(1, Ordering::Relaxed);
                    }
                }
                (latencies, ops, errors)
            })
        })
        .collect();
    tokio::time::sleep(options.warmup).await;
    let cpu = CpuMeter::start(&*cellchat);
    let started = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(options.duration).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let mut result = RunResult::new("floor", cellchat.kind().name(), cellchat.node_count());
    // The CPU is read before the connections wind down, so their last calls are not in it.
    cpu.finish(&mut result, measured.load(Ordering::Relaxed));
    let (mut total, mut ops, mut errors) = (Latencies::new(), 0, 0);
    stop.store(true, Ordering::Relaxed);
    let mut tallies = Vec::new();
    for task in tasks {
        tallies.push(task.await?);
    }
    for (latencies, task_ops, task_errors) in tallies {
        total.merge(&latencies);
        ops += task_ops;
        errors += task_errors;
    }
    result.clients = clients;
    result.duration_s = elapsed.as_secs_f64();
    result.ops = ops;
    result.errors = errors;
    result.throughput_per_s = ops as f64 / elapsed.as_secs_f64();
    result.latency_ms = total.summary();
    result.set("part", "ping");
    Ok(result)
}

/// `fsync` with one writer, `fsync_shared` with `writers` at once (all starting together).
fn fsync(body: usize, writers: usize) -> Result<RunResult> {
    let entry = body + ENTRY_OVERHEAD_BYTES;
    let (per_writer, elapsed) = appends(entry, writers, FSYNC_APPENDS, Duration::ZERO)?;
    let mut latencies = Latencies::new();
    per_writer
        .iter()
        .flatten()
        .for_each(|&time| latencies.record(time));
    let mut result = RunResult::new("floor", "machine", writers);
    result.clients = writers;
    result.body_bytes = entry;
    result.duration_s = elapsed.as_secs_f64();
    result.ops = (FSYNC_APPENDS * per_writer.len()) as u64;
    result.throughput_per_s = result.ops as f64 / elapsed.as_secs_f64();
    result.latency_ms = latencies.summary();
    result.set("part", if writers > 1 { "fsync_shared" } else { "fsync" });
    Ok(result)
}

/// `fsync_paced`: `writers` threads (the nodes; the first is the leader) append one entry each
/// and `fdatasync` it at the same instants, `rate` times a second.
fn fsync_paced(body: usize, writers: usize, rate: f64) -> Result<RunResult> {
    let entry = body + ENTRY_OVERHEAD_BYTES;
    let rounds = fsync_paced_rounds(rate);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let (per_writer, elapsed) = appends(entry, writers, rounds, interval)?;
    let (mut latencies, mut commits) = (Latencies::new(), Latencies::new());
    for round in 0..rounds {
        per_writer
            .iter()
            .for_each(|times| latencies.record(times[round]));
        commits.record(commit_wait(&per_writer, round));
    }
    let commit = commits.summary();
    let mut result = RunResult::new("floor", "machine", writers);
    result.clients = writers;
    result.body_bytes = entry;
    result.rate_per_s = rate;
    result.duration_s = elapsed.as_secs_f64();
    result.ops = (rounds * per_writer.len()) as u64;
    result.throughput_per_s = result.ops as f64 / elapsed.as_secs_f64();
    result.latency_ms = latencies.summary();
    result.set("part", "fsync_paced");
    result.set("commit_p50_ms", commit.p50);
    result.set("commit_p99_ms", commit.p99);
    Ok(result)
}

/// `writers` threads, each with a zeroed file of its own, append `rounds` entries of `entry`
/// bytes with `fdatasync` after each, all starting at one instant; append `i` of every thread
/// is due `interval * i` after it (zero: back to back). Returns each thread's append times, in
/// order, and the time from the start to the last append.
fn appends(
    entry: usize,
    writers: usize,
    rounds: usize,
    interval: Duration,
) -> Result<(Vec<Vec<Duration>>, Duration)> {
    let mut files = Vec::new();
    for _ in 0..writers.max(1) {
        files.push(zeroed_file((entry * rounds) as u64)?);
    }
    // Far enough ahead for every thread to be waiting when it comes.
    let first = Instant::now() + Duration::from_millis(50);
    let threads: Vec<_> = files
        .into_iter()
        .map(|file| {
            std::thread::spawn(move || -> std::io::Result<Vec<Duration>> {
                let bytes = vec![0x5a_u8; entry];
                let mut times = Vec::with_capacity(rounds);
                for i in 0..rounds {
                    let due = first + interval * i as u32;
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    let at = Instant::now();
                    file.write_all_at(&bytes, (i * entry) as u64)?;
                    file.sync_data()?;
                    times.push(at.elapsed());
                }
                Ok(times)
            })
        })
        .collect();
    let mut per_writer = Vec::new();
    for thread in threads {
        per_writer.push(
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("an fsync floor thread panicked"))??,
        );
    }
    Ok((per_writer, first.elapsed()))
}

/// What a commit of `round` waits for on the disk: the leader's (writer 0) append and, when
/// there are followers, the faster follower's, which completes the majority of three.
fn commit_wait(per_writer: &[Vec<Duration>], round: usize) -> Duration {
    let leader = per_writer[0][round];
    let follower = per_writer[1..].iter().map(|rounds| rounds[round]).min();
    follower.map_or(leader, |f| leader.max(f))
}

/// A temp file of `len` zero bytes, synced: appends then overwrite zeros in place, as the Raft
/// log's do in a prepared segment. It is in the system temp dir, where the harness's clusters
/// keep their data.
fn zeroed_file(len: u64) -> Result<std::fs::File> {
    let mut file = tempfile::tempfile().context("creating the fsync floor's temp file")?;
    let zeros = vec![0u8; 1 << 20];
    let mut written = 0;
    while written < len {
        let n = zeros.len().min((len - written) as usize);
        file.write_all(&zeros[..n])?;
        written += n as u64;
    }
    file.sync_all()?;
    Ok(file)
}

fn wake() -> Result<RunResult> {
    let (to_echo, echo_rx) = std::sync::mpsc::channel::<()>();
    let (to_main, main_rx) = std::sync::mpsc::channel::<()>();
    let echo = std::thread::spawn(move || {
        while echo_rx.recv().is_ok() {
            if to_main.send(()).is_err() {
                break;
            }
        }
    });
    let mut latencies = Latencies::new();
    let started = Instant::now();
    for _ in 0..WAKE_ROUND_TRIPS {
        let at = Instant::now();
        to_echo.send(())?;
        main_rx.recv()?;
        // One round trip is two wake-ups.
        latencies.record(at.elapsed() / 2);
        // Let the echo thread go back to sleep, as a task between sends does.
        std::thread::sleep(Duration::from_micros(50));
    }
    let elapsed = started.elapsed();
    drop(to_echo);
    echo.join()
        .map_err(|_| anyhow::anyhow!("the wake-up echo thread panicked"))?;
    let mut result = RunResult::new("floor", "machine", 0);
    result.clients = 1;
    result.duration_s = elapsed.as_secs_f64();
    result.ops = WAKE_ROUND_TRIPS as u64;
    result.latency_ms = latencies.summary();
    result.set("part", "wake");
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_waits_for_the_leader_and_the_faster_follower() {
        let ms = Duration::from_millis;
        let rounds = [vec![ms(1), ms(4)], vec![ms(5), ms(2)], vec![ms(3), ms(9)]];
        // Round 0: the leader's 1 ms and the faster follower's 3 ms; round 1: the leader's 4.
        assert_eq!(commit_wait(&rounds, 0), ms(3));
        assert_eq!(commit_wait(&rounds, 1), ms(4));
        assert_eq!(
            commit_wait(&rounds[..1], 1),
            ms(4),
            "a lone node waits for itself"
        );
    }
}
