//! Open and recover a log of 1,000,000 entries of 200 B (about 216 MB in 64 MiB segments).
//! Run: `cargo bench -p raft-log --bench wal_recover`.

use criterion::{criterion_group, criterion_main, Criterion};
use raft_log::{Config, Durability, LogIndex, Wal};

const ENTRIES: u64 = 1_000_000;

fn open_recover(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(Config::new(dir.path())).expect("open");
    let payloads = vec![[0xa5u8; 200]; 1000];
    for batch in 0..ENTRIES / 1000 {
        wal.append(LogIndex(batch * 1000), &payloads, Durability::Buffered)
            .expect("append");
    }
    wal.close().expect("close");
    let mut group = c.benchmark_group("wal_recover");
    group.sample_size(10);
    group.bench_function("open_1M_entries_200B", |b| {
        b.iter(|| {
            let wal = Wal::open(Config::new(dir.path())).expect("open");
            assert_eq!(wal.last_index(), Some(LogIndex(ENTRIES - 1)));
            wal
        })
    });
    group.finish();
}

criterion_group!(benches, open_recover);
criterion_main!(benches);
