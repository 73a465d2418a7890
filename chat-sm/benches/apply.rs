//! Apply throughput: how many 100-byte sends per second `ChatState::apply` takes when the
//! node coalesces 1, 64 or 256 sends into one entry (one entry per `apply` call, one channel
//! per 16 clients, every send new). RocksDB WAL on, sync=false, as in production.

use std::hint::black_box;

use chat_sm::{
    ApplyEntry, ApplyPayload, ChatState, ClientId, Command, Config, LogIndex, RaftMeta, SendCmd,
};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const BODY_LEN: usize = 100;
const CHANNELS: u64 = 8;

fn batch(next_seq: &mut u64, size: usize) -> Command {
    let sends: Vec<SendCmd> = (0..size)
        .map(|_| {
            *next_seq += 1;
            let seq = *next_seq;
            SendCmd {
                channel: format!("channel-{}", seq % CHANNELS),
                sender: "Alice".into(),
                body: vec![b'x'; BODY_LEN],
                client_id: ClientId([(seq % 251) as u8; 16]),
                client_seq: seq,
                at_ms: 1_700_000_000_000 + seq,
            }
        })
        .collect();
    if size == 1 {
        Command::Send(sends.into_iter().next().expect("one send"))
    } else {
        Command::SendBatch(sends)
    }
}

fn bench_apply(c: &mut Criterion) {
    let mut group = c.benchmark_group("apply");
    for size in [1usize, 64, 256] {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = ChatState::open(Config::new(dir.path())).expect("open");
        let mut next_seq = 0u64;
        let mut index = 0u64;
        group.throughput(Throughput::Elements(size as u64));
        group.bench_with_input(
            BenchmarkId::new("sends_per_entry_100B_sync_false", size),
            &size,
            |b, &size| {
                b.iter_batched(
                    || batch(&mut next_seq, size),
                    |cmd| {
                        index += 1;
                        let entry = ApplyEntry {
                            index: LogIndex(index),
                            payload: ApplyPayload::Command(&cmd),
                        };
                        let meta = RaftMeta {
                            last_applied: index.to_be_bytes().to_vec(),
                            membership: None,
                        };
                        black_box(state.apply(&[entry], meta))
                    },
                    criterion::BatchSize::SmallInput,
                );
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench_apply);
criterion_main!(benches);
