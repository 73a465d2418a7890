//! Model-based property test: random sequences of append, sync, truncate_from, purge_through,
//! reopen and power failure (with and without torn writes, through `FaultyFs`) run against a
//! `Wal` and an in-memory model; after every step the whole log, first/last/next index and the
//! purge point with its payload must match (purges store a payload derived from the index, or,
//! for every third index, none). After a power failure the log must be a prefix of what was visible,
//! at least as long as what was durably synced. Small segments exercise rotation, and with it
//! segments made from preallocated, zero-filled files (prepared once the active segment is a
//! quarter full), so appends, truncations and crashes also hit zero tails.
#![cfg(feature = "testing")]

use proptest::prelude::*;
use raft_log::{Config, Durability, Error, FaultyFs, LogIndex, Tear, Wal};
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, Clone)]
enum Op {
    Append {
        count: usize,
        len: usize,
        start: u64,
        sync: bool,
    },
    AppendWrongIndex,
    Sync,
    TruncateBack(u64),
    Purge(u64),
    PurgeBeyond(u64),
    Read {
        from_back: u64,
        count: u64,
    },
    Reopen,
    Crash {
        tear: Option<u64>,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (1usize..8, 0usize..700, 0u64..40, any::<bool>())
            .prop_map(|(count, len, start, sync)| Op::Append { count, len, start, sync }),
        1 => Just(Op::AppendWrongIndex),
        2 => Just(Op::Sync),
        2 => (0u64..12).prop_map(Op::TruncateBack),
        2 => (0u64..20).prop_map(Op::Purge),
        1 => (0u64..5).prop_map(Op::PurgeBeyond),
        2 => (0u64..30, 0u64..30).prop_map(|(from_back, count)| Op::Read { from_back, count }),
        1 => Just(Op::Reopen),
        2 => proptest::option::of(any::<u64>()).prop_map(|tear| Op::Crash { tear }),
    ]
}

/// The expected log: visible entries and the prefix of them known to be durable.
#[derive(Debug, Default)]
struct Model {
    entries: Vec<(u64, Vec<u8>)>,
    durable_count: usize,
    purged: Option<u64>,
    /// The payload stored with the purge point.
    purged_payload: Option<Vec<u8>>,
    generation: u8,
}

impl Model {
    fn next_index(&self) -> u64 {
        match (self.entries.last(), self.purged) {
            (Some((last, _)), _) => last + 1,
            (None, Some(purged)) => purged + 1,
            (None, None) => 0,
        }
    }
}

fn payload(index: u64, generation: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (index as u8)
                .wrapping_mul(31)
                .wrapping_add(generation ^ i as u8)
        })
        .collect()
}

fn config(dir: &Path) -> Config {
    let mut config = Config::new(dir);
    config.segment_bytes_max = 4096;
    config
}

fn open(dir: &Path, fs: &Arc<FaultyFs>) -> Wal {
    Wal::open_with_fs(config(dir), fs.clone()).expect("open")
}

fn check(wal: &Wal, model: &Model) {
    let all = wal.read(LogIndex(0), LogIndex(u64::MAX)).expect("read all");
    let all: Vec<(u64, Vec<u8>)> = all.into_iter().map(|(i, p)| (i.0, p)).collect();
    assert_eq!(all, model.entries);
    assert_eq!(
        wal.first_index().map(|i| i.0),
        model.entries.first().map(|e| e.0)
    );
    assert_eq!(
        wal.last_index().map(|i| i.0),
        model.entries.last().map(|e| e.0)
    );
    assert_eq!(wal.next_index().0, model.next_index());
    assert_eq!(wal.purged_through().map(|i| i.0), model.purged);
    assert_eq!(
        wal.purged().map(|p| (p.index.0, p.payload)),
        model.purged.map(|p| (p, model.purged_payload.clone()))
    );
}

fn apply(wal: &mut Wal, fs: &mut Arc<FaultyFs>, dir: &Path, model: &mut Model, op: Op) {
    match op {
        Op::Append {
            count,
            len,
            start,
            sync,
        } => {
            let first = if model.entries.is_empty() && model.purged.is_none() {
                start
            } else {
                model.next_index()
            };
            model.generation = model.generation.wrapping_add(1);
            let payloads: Vec<Vec<u8>> = (0..count as u64)
                .map(|i| payload(first + i, model.generation, len))
                .collect();
            let durability = if sync {
                Durability::Sync
            } else {
                Durability::Buffered
            };
            wal.append(LogIndex(first), &payloads, durability)
                .expect("append");
            model.entries.extend((first..).zip(payloads));
            if sync {
                model.durable_count = model.entries.len();
            }
        }
        Op::AppendWrongIndex => {
            if !model.entries.is_empty() || model.purged.is_some() {
                let wrong = LogIndex(model.next_index() + 1);
                let err = wal
                    .append(wrong, &[b"x"], Durability::Sync)
                    .expect_err("gap");
                assert!(matches!(err, Error::NonContiguous { .. }), "{err}");
            }
        }
        Op::Sync => {
            wal.sync().expect("sync");
            model.durable_count = model.entries.len();
        }
        Op::TruncateBack(back) => {
            let index = model.next_index().saturating_sub(back);
            match wal.truncate_from(LogIndex(index)) {
                Ok(()) => {
                    let before = model.entries.len();
                    model.entries.retain(|(i, _)| *i < index);
                    if model.entries.len() < before {
                        model.durable_count = model.entries.len();
                    }
                }
                Err(Error::OutOfRange { .. }) => {
                    assert!(model.purged.is_some_and(|p| index <= p));
                }
                Err(e) => panic!("truncate_from: {e}"),
            }
        }
        Op::Purge(delta) => purge(wal, model, model.entries.first().map_or(0, |e| e.0) + delta),
        Op::PurgeBeyond(k) => purge(wal, model, model.next_index() + k),
        Op::Read { from_back, count } => {
            let from = model.next_index().saturating_sub(from_back);
            let got = wal
                .read(LogIndex(from), LogIndex(from + count))
                .expect("read");
            let got: Vec<(u64, Vec<u8>)> = got.into_iter().map(|(i, p)| (i.0, p)).collect();
            let want: Vec<_> = model
                .entries
                .iter()
                .filter(|(i, _)| *i >= from && *i < from + count)
                .cloned()
                .collect();
            assert_eq!(got, want);
        }
        Op::Reopen => {
            // A process restart without close: the page cache keeps every byte, and recovery
            // syncs what it found.
            let old = std::mem::replace(wal, open(dir, fs));
            drop(old);
            *wal = open(dir, fs);
            model.durable_count = model.entries.len();
        }
        Op::Crash { tear } => {
            let tear = tear.map_or(Tear::None, Tear::Prefix);
            fs.power_fail(tear).expect("power_fail");
            // The old handle is dead; a read must fail rather than return anything.
            if !model.entries.is_empty() {
                assert!(wal.read(LogIndex(0), LogIndex(u64::MAX)).is_err());
            }
            *fs = Arc::new(FaultyFs::new());
            *wal = open(dir, fs);
            let got = wal
                .read(LogIndex(0), LogIndex(u64::MAX))
                .expect("read after crash");
            let got: Vec<(u64, Vec<u8>)> = got.into_iter().map(|(i, p)| (i.0, p)).collect();
            assert!(
                got.len() >= model.durable_count,
                "lost durable entries: {} < {}",
                got.len(),
                model.durable_count
            );
            assert!(got.len() <= model.entries.len());
            assert_eq!(
                got[..],
                model.entries[..got.len()],
                "recovered log is not a prefix"
            );
            model.entries.truncate(got.len());
            model.durable_count = got.len();
        }
    }
}

fn purge(wal: &Wal, model: &mut Model, index: u64) {
    let payload = (!index.is_multiple_of(3)).then(|| format!("log id {index}").into_bytes());
    match &payload {
        Some(payload) => wal.purge_through_with(LogIndex(index), payload),
        None => wal.purge_through(LogIndex(index)),
    }
    .expect("purge_through");
    match model.purged {
        Some(p) if index < p => return,
        Some(p) if index == p => {
            model.purged_payload = payload;
            return;
        }
        _ => {}
    }
    model.purged_payload = payload;
    let mut point = index;
    if let Some((first, _)) = model.entries.first() {
        point = point.max(first.saturating_sub(1));
    }
    let before = model.entries.len();
    model.entries.retain(|(i, _)| *i > point);
    model.durable_count = model
        .durable_count
        .saturating_sub(before - model.entries.len());
    model.purged = Some(point);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 96,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn wal_matches_model(ops in proptest::collection::vec(op(), 1..50)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut fs = Arc::new(FaultyFs::new());
        let mut wal = open(dir.path(), &fs);
        let mut model = Model::default();
        for op in ops {
            apply(&mut wal, &mut fs, dir.path(), &mut model, op);
            check(&wal, &model);
        }
    }
}
