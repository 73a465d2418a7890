//! Crash tests of `node::LogStore` on raft-log's fault-injecting file system: what the store
//! acknowledged to openraft (the flush callback fired) survives a power failure that drops
//! every unsynced byte and tears the last write; the vote survives too; and a purge is never
//! undone.

use std::sync::Arc;

use node::CommittedLeaderId;
use node::{Entry, LogId, LogStore, Vote};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
use openraft::vote::RaftLeaderId;
use openraft::RaftLogReader;
use raft_log::{FaultyFs, Tear, Wal};

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn blank(term: u64, index: u64) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload: openraft::EntryPayload::Blank,
    }
}

fn open(dir: &std::path::Path, fs: &Arc<FaultyFs>) -> LogStore {
    let config = raft_log::Config::new(dir.join(node::WAL_DIR));
    let wal = Wal::open_with_fs(config, fs.clone()).expect("open wal");
    LogStore::from_wal(wal, dir.to_path_buf()).expect("open log store")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_entries_and_vote_survive_power_failure_with_torn_write() {
    for seed in 0..8u64 {
        let dir = tempfile::tempdir().unwrap();
        let fs = Arc::new(FaultyFs::new());
        let mut store = open(dir.path(), &fs);
        store.save_vote(&Vote::new(3, 1)).await.unwrap();
        // blocking_append returns only after the flush callback fired: acknowledged.
        let acked: Vec<Entry> = (0..20).map(|i| blank(3, i)).collect();
        store.blocking_append(acked.clone()).await.unwrap();
        drop(store);
        fs.power_fail(Tear::Prefix(seed)).unwrap();

        let fs = Arc::new(FaultyFs::new());
        let mut store = open(dir.path(), &fs);
        assert_eq!(
            store.read_vote().await.unwrap(),
            Some(Vote::new(3, 1)),
            "seed {seed}"
        );
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(log_id(3, 19)), "seed {seed}");
        let read = store.try_get_log_entries(0..20).await.unwrap();
        assert_eq!(read.len(), 20, "seed {seed}");
        assert_eq!(read[19].log_id, log_id(3, 19));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_survives_power_failure_and_purged_entries_stay_gone() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Arc::new(FaultyFs::new());
    let mut store = open(dir.path(), &fs);
    store
        .blocking_append((0..50).map(|i| blank(1, i)).collect::<Vec<_>>())
        .await
        .unwrap();
    store.purge(log_id(1, 29)).await.unwrap();
    drop(store);
    fs.power_fail(Tear::None).unwrap();

    let fs = Arc::new(FaultyFs::new());
    let mut store = open(dir.path(), &fs);
    let state = store.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 29)));
    assert_eq!(state.last_log_id, Some(log_id(1, 49)));
    let read = store.try_get_log_entries(0..50).await.unwrap();
    assert_eq!(read.first().map(|e| e.log_id.index), Some(30));
    assert_eq!(read.len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_beyond_the_last_entry_moves_the_next_index() {
    // After a snapshot install openraft purges past everything this node has.
    let dir = tempfile::tempdir().unwrap();
    let fs = Arc::new(FaultyFs::new());
    let mut store = open(dir.path(), &fs);
    store
        .blocking_append((0..5).map(|i| blank(1, i)).collect::<Vec<_>>())
        .await
        .unwrap();
    store.purge(log_id(2, 100)).await.unwrap();
    let state = store.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(2, 100)));
    assert_eq!(state.last_log_id, Some(log_id(2, 100)));
    store.blocking_append(vec![blank(2, 101)]).await.unwrap();
    drop(store);

    let mut store = open(dir.path(), &Arc::new(FaultyFs::new()));
    let state = store.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id(2, 101)));
    let read = store.try_get_log_entries(0..200).await.unwrap();
    assert_eq!(read.len(), 1);
}

fn register(term: u64, index: u64, key_bytes: usize) -> Entry {
    // A registration carries no body, so a long name stands in for a large entry.
    Entry {
        log_id: log_id(term, index),
        payload: openraft::EntryPayload::Normal(
            chat_sm::Command::RegisterUser {
                name: "x".repeat(key_bytes),
                public_key: [0; 32],
            }
            .into(),
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_reads_stop_at_the_byte_budget_but_never_at_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Arc::new(FaultyFs::new());
    let mut store = open(dir.path(), &fs);
    let entry_bytes = 600 << 10;
    store
        .blocking_append(
            (0..8)
                .map(|i| register(1, i, entry_bytes))
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    store
        .blocking_append(vec![register(1, 8, 3 << 20), register(1, 9, 10)])
        .await
        .unwrap();
    // Three 600 KiB entries fit in 2 MiB, a fourth does not.
    let fit = node::APPEND_BYTES_MAX / entry_bytes;
    let got = store.limited_get_log_entries(0, 8).await.unwrap();
    assert_eq!(got.len(), fit);
    assert_eq!(got.last().unwrap().log_id.index, fit as u64 - 1);
    // An entry over the whole budget still goes, alone.
    let got = store.limited_get_log_entries(8, 10).await.unwrap();
    assert_eq!(got.len(), 1);
    // Unlimited reads are not cut.
    assert_eq!(store.try_get_log_entries(0..10).await.unwrap().len(), 10);
}
