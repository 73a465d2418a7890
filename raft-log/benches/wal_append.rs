//! Append latency with `Durability::Sync` by batch size (1, 16, 256 entries of 200 B), against
//! the floor: the same bytes written with one raw `pwrite` + `fdatasync` on a plain file; plus
//! the CPU cost of a `Durability::Buffered` append of 256 entries.
//! Run: `cargo bench -p raft-log --bench wal_append`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use raft_log::{Config, Durability, LogIndex, Wal};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

const ENTRY_LEN: usize = 200;
const FRAME_LEN: usize = ENTRY_LEN + 16;

fn append_sync(c: &mut Criterion) {
    let mut group = c.benchmark_group("wal_append");
    for batch in [1usize, 16, 256] {
        let dir = tempfile::tempdir().expect("tempdir");
        let wal = Wal::open(Config::new(dir.path())).expect("open");
        let payloads = vec![[0x5au8; ENTRY_LEN]; batch];
        let mut next = 1u64;
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

/// CPU cost of the append path without the fsync: `Durability::Buffered`, 256 x 200 B.
fn append_buffered(c: &mut Criterion) {
    let mut group = c.benchmark_group("wal_append");
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(Config::new(dir.path())).expect("open");
    let payloads = vec![[0x5au8; ENTRY_LEN]; 256];
    let mut next = 1u64;
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
