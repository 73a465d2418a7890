//! Interleaved A/B of durable group commit on a noisy disk: the WAL (`Durability::Sync`,
//! steady state, preallocated active segment) against the two raw floors (`pwrite` +
//! `fdatasync` appended to a growing file, and into a pre-zeroed file), for one batch size.
//! Criterion runs each bench in its own time window, so on a VM whose fdatasync latency swings
//! with other tenants' I/O its figures are not comparable with each other; here the three take
//! turns in short rounds and each reports the median, 90th percentile, maximum and mean of all
//! its samples, and the throughput at the mean.
//!
//! Run: `cargo run --release -p raft-log --example append_interleaved -- [batch] [rounds]`
//! (defaults 256 and 30; 100 appends per variant per round).

use raft_log::{Config, Durability, LogIndex, Wal};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

const ENTRY_LEN: usize = 200;
const FRAME_LEN: usize = ENTRY_LEN + 16;
const PER_ROUND: usize = 100;
const ZEROED_BYTES: u64 = 256 * 1024 * 1024;

fn raw_file(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("create")
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort_unstable();
    samples[((samples.len() - 1) as f64 * p) as usize]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let batch: usize = args.next().map_or(256, |a| a.parse().expect("batch"));
    let rounds: usize = args.next().map_or(30, |a| a.parse().expect("rounds"));
    let dir = tempfile::tempdir().expect("tempdir");

    let config = Config::new(dir.path().join("wal"));
    let fill = config.segment_bytes_max as usize / FRAME_LEN + 1;
    let wal = Wal::open(config).expect("open");
    let fill_payloads = vec![[0x11u8; ENTRY_LEN]; 1024];
    let mut next = 1u64;
    for _ in 0..fill.div_ceil(1024) {
        wal.append(LogIndex(next), &fill_payloads, Durability::Buffered)
            .expect("fill");
        next += 1024;
    }
    wal.sync().expect("sync");
    let payloads = vec![[0x5au8; ENTRY_LEN]; batch];

    let growing = raw_file(&dir.path().join("raw-growing"));
    let zeroed = raw_file(&dir.path().join("raw-zeroed"));
    let zeros = vec![0u8; 1 << 20];
    for chunk in 0..ZEROED_BYTES / zeros.len() as u64 {
        zeroed
            .write_all_at(&zeros, chunk * zeros.len() as u64)
            .expect("zero");
    }
    zeroed.sync_all().expect("fsync");
    let buf = vec![0x5au8; FRAME_LEN * batch];
    let (mut growing_offset, mut zeroed_offset) = (0u64, 0u64);

    let mut samples: [Vec<Duration>; 3] = Default::default();
    for _ in 0..rounds {
        for _ in 0..PER_ROUND {
            let started = Instant::now();
            wal.append(LogIndex(next), &payloads, Durability::Sync)
                .expect("append");
            samples[0].push(started.elapsed());
            next += batch as u64;
        }
        for _ in 0..PER_ROUND {
            let started = Instant::now();
            growing.write_all_at(&buf, growing_offset).expect("write");
            growing.sync_data().expect("fdatasync");
            samples[1].push(started.elapsed());
            growing_offset += buf.len() as u64;
        }
        for _ in 0..PER_ROUND {
            if zeroed_offset + buf.len() as u64 > ZEROED_BYTES {
                zeroed_offset = 0;
            }
            let started = Instant::now();
            zeroed.write_all_at(&buf, zeroed_offset).expect("write");
            zeroed.sync_data().expect("fdatasync");
            samples[2].push(started.elapsed());
            zeroed_offset += buf.len() as u64;
        }
    }
    let names = ["wal sync", "raw growing file", "raw pre-zeroed file"];
    println!("batch {batch} x {ENTRY_LEN} B, {rounds} rounds of {PER_ROUND} per variant");
    for (name, samples) in names.iter().zip(samples.iter_mut()) {
        let median = percentile(samples, 0.5);
        let p90 = percentile(samples, 0.9);
        let max = percentile(samples, 1.0);
        let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
        let per_second = batch as f64 / mean.as_secs_f64();
        println!(
            "{name:>20}: median {median:>8.1?}  p90 {p90:>8.1?}  max {max:>8.1?}  \
             mean {mean:>8.1?}  {per_second:>8.0} entries/s at the mean"
        );
    }
    wal.close().expect("close");
}
