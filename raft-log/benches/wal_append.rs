//! Append latency with `Durability::Sync` by batch size (1, 16, 256 entries of 200 B), against
//! two floors: the same bytes written with one raw `pwrite` + `fdatasync` appended to a growing
//! plain file, and into a pre-zeroed (written and fsynced) file, which is what the WAL does once
//! its segments are preallocated; plus the CPU cost of a `Durability::Buffered` append of 256
//! entries.
//!
//! Every WAL bench first fills one segment (Buffered, then synced) so it measures the steady
//! state of a long-lived log, whose active segment was prepared (zero-filled) in the background.
//! Run: `cargo bench -p raft-log --bench wal_append`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use raft_log::{Config, Durability, LogIndex, Wal};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

const ENTRY_LEN: usize = 200;
const FRAME_LEN: usize = ENTRY_LEN + 16;
/// Size of the pre-zeroed raw floor file; the bench wraps around inside it.
const RAW_ZEROED_BYTES: u64 = 256 * 1024 * 1024;

/// Opens a WAL in `dir` and appends until it has rotated once, so that the active segment is
/// one prepared in the background. Returns the WAL and its next index.
fn open_steady(dir: &std::path::Path) -> (Wal, u64) {
    let config = Config::new(dir);
    let fill = config.segment_bytes_max as usize / FRAME_LEN + 1;
    let wal = Wal::open(config).expect("open");
    let payloads = vec![[0x11u8; ENTRY_LEN]; 1024];
    let mut next = 1u64;
    for _ in 0..fill.div_ceil(1024) {
        wal.append(LogIndex(next), &payloads, Durability::Buffered)
            .expect("fill");
        next += payloads.len() as u64;
    }
    wal.sync().expect("sync");
    (wal, next)
}

fn append_sync(c: &mut Criterion) {
    let mut group = c.benchmark_group("wal_append");
    for batch in [1usize, 16, 256] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (wal, mut next) = open_steady(dir.path());
        let payloads = vec![[0x5au8; ENTRY_LEN]; batch];
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::new("sync_200B", batch), &batch, |b, _| {
            b.iter(|| {
                wal.append(LogIndex(next), &payloads, Durability::Sync)
                    .expect("append");
                next += batch as u64;
            })
        });
        wal.close().expect("close");
    }
    append_raw_floor(&mut group);
    append_raw_floor_zeroed(&mut group);
    group.finish();
}

/// The floor: the same bytes (`batch` frames of 216 B in one buffer) written with one `pwrite`
/// and one `fdatasync` on a plain file, with no WAL code at all.
fn append_raw_floor(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    for batch in [1usize, 16, 256] {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("raw"))
            .expect("create");
        let buf = vec![0x5au8; FRAME_LEN * batch];
        let mut offset = 0u64;
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(
            BenchmarkId::new("raw_pwrite_fdatasync_216B", batch),
            &batch,
            |b, _| {
                b.iter(|| {
                    file.write_all_at(&buf, offset).expect("write");
                    file.sync_data().expect("fdatasync");
                    offset += buf.len() as u64;
                })
            },
        );
    }
}

/// The floor for preallocated segments: the same `pwrite` + `fdatasync`, into a file that was
/// first filled with zeros and fsynced, so the fdatasync has no size or extent change to commit.
fn append_raw_floor_zeroed(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("raw-zeroed"))
        .expect("create");
    let zeros = vec![0u8; 1024 * 1024];
    for chunk in 0..RAW_ZEROED_BYTES / zeros.len() as u64 {
        file.write_all_at(&zeros, chunk * zeros.len() as u64)
            .expect("zero");
    }
    file.sync_all().expect("fsync");
    for batch in [1usize, 16, 256] {
        let buf = vec![0x5au8; FRAME_LEN * batch];
        let mut offset = 0u64;
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(
            BenchmarkId::new("raw_pwrite_fdatasync_216B_prezeroed", batch),
            &batch,
            |b, _| {
                b.iter(|| {
                    if offset + buf.len() as u64 > RAW_ZEROED_BYTES {
                        offset = 0;
                    }
                    file.write_all_at(&buf, offset).expect("write");
                    file.sync_data().expect("fdatasync");
                    offset += buf.len() as u64;
                })
            },
        );
    }
}

/// CPU cost of the append path without the fsync: `Durability::Buffered`, 256 x 200 B.
fn append_buffered(c: &mut Criterion) {
    let mut group = c.benchmark_group("wal_append");
    let dir = tempfile::tempdir().expect("tempdir");
    let (wal, mut next) = open_steady(dir.path());
    let payloads = vec![[0x5au8; ENTRY_LEN]; 256];
    group.throughput(Throughput::Elements(256));
    group.bench_function(BenchmarkId::new("buffered_200B", 256), |b| {
        b.iter(|| {
            wal.append(LogIndex(next), &payloads, Durability::Buffered)
                .expect("append");
            next += 256;
        })
    });
    group.finish();
    wal.close().expect("close");
}

criterion_group!(benches, append_sync, append_buffered);
criterion_main!(benches);
