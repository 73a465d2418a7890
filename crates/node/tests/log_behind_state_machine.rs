//! Recovery: the Raft log ends before the state machine's last applied entry (synced log bytes
//! lost, as the jepsen `truncate` nemesis does). A one-node cluster writes entries, snapshots,
//! writes more and applies them all; the test then cuts the newest segment's last frame on disk
//! and restarts on the same directories through `node::reconcile`, as `Server::start` does.
//! Without the repair openraft purges through last applied but keeps the older snapshot, its
//! `purge_upto <= snapshot_last_log_id` invariant fails and the core stops: the write after the
//! restart fails. With it, the node starts, keeps every applied message and takes new writes.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chat_sm::Command;
use node::{LogStore, Member, Network, Raft, Reconciled, StateMachine};
use openraft::storage::{RaftLogStorage, RaftStateMachine};

fn raft_config() -> Arc<openraft::Config> {
    let config = openraft::Config {
        cluster_name: "log-behind-sm".into(),
        heartbeat_interval: 50,
        election_timeout_min: 150,
        election_timeout_max: 300,
        snapshot_policy: openraft::SnapshotPolicy::Never,
        ..Default::default()
    };
    Arc::new(config.validate().expect("valid raft config"))
}

fn register(i: u64) -> Command {
    Command::RegisterUser {
        name: format!("user{i}"),
        public_key: [u8::try_from(i % 256).expect("small"); 32],
    }
}

/// Opens both stores the way `Server::start` does and starts Raft on them; returns clones of
/// the stores for inspection.
async fn start(dir: &Path) -> (Raft, Reconciled, LogStore, StateMachine) {
    let mut log = LogStore::open(&dir.join("log")).expect("open log");
    let mut sm = open_sm(&dir.join("sm")).await;
    let reconciled = node::reconcile(&mut log, &mut sm).await.expect("reconcile");
    let (log_view, sm_view) = (log.clone(), sm.clone());
    // One node: the network is never dialed, but it needs an identity to dial with.
    let node::pki::Settled::Ready(tls) =
        node::pki::settle(&dir.join("tls-node"), "test", 1, None).expect("identity")
    else {
        panic!("a fresh root makes an identity");
    };
    let network = Network::new(tls.peer_client.clone());
    let raft = node::start_raft(1, raft_config(), network, log, sm, 1)
        .await
        .expect("raft starts");
    (raft, reconciled, log_view, sm_view)
}

/// openraft's state machine worker may still hold RocksDB for a moment after `shutdown`
/// returns; retry the open (bounded) instead of failing on its lock.
async fn open_sm(dir: &Path) -> StateMachine {
    for _ in 0..100 {
        match StateMachine::open(dir) {
            Ok(sm) => return sm,
            Err(e) if e.to_string().contains("lock") => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("open state machine: {e}"),
        }
    }
    panic!("the state machine stayed locked for 5 s after shutdown");
}

async fn wait_leader(raft: &Raft) {
    raft.wait(Some(Duration::from_secs(10)))
        .current_leader(1, "node 1 leads")
        .await
        .expect("node 1 becomes leader");
}

/// Cuts the last byte of the newest segment: its last frame is torn, and recovery drops it.
fn cut_last_frame(dir: &Path) {
    let wal = dir.join("log").join(node::WAL_DIR);
    let mut segments: Vec<_> = std::fs::read_dir(&wal)
        .expect("read wal dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segments.sort();
    let newest = segments.last().expect("a segment");
    let len = std::fs::metadata(newest).expect("stat").len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(newest)
        .expect("open segment");
    file.set_len(len - 1).expect("cut");
    file.sync_all().expect("sync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_log_tail_below_last_applied_was_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (raft, reconciled, _, _) = start(dir.path()).await;
    assert_eq!(reconciled, Reconciled::Consistent);
    let members = BTreeMap::from([(1, Member::default())]);
    raft.initialize(members).await.expect("initialize");
    wait_leader(&raft).await;
    let mut written = 0;
    for i in 0..5 {
        written = raft
            .client_write(register(i).into())
            .await
            .expect("write")
            .log_id
            .index;
    }
    raft.wait(Some(Duration::from_secs(10)))
        .applied_index(Some(written), "first writes applied")
        .await
        .expect("applied");
    raft.trigger().snapshot().await.expect("trigger snapshot");
    let snapshot_index = raft
        .wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.snapshot.is_some(), "snapshot built")
        .await
        .expect("snapshot")
        .snapshot
        .expect("some")
        .index;
    let mut last = 0;
    for i in 5..8 {
        last = raft
            .client_write(register(i).into())
            .await
            .expect("write")
            .log_id
            .index;
    }
    raft.wait(Some(Duration::from_secs(10)))
        .applied_index(Some(last), "all applied")
        .await
        .expect("applied");
    raft.shutdown().await.expect("shutdown");
    drop(raft);

    // The last entry (already applied) loses its last byte: the log now ends at `last - 1`.
    cut_last_frame(dir.path());

    let (raft, reconciled, mut log, mut sm) = start(dir.path()).await;
    match reconciled {
        Reconciled::LogBehindStateMachine {
            log_last,
            last_applied,
            snapshot_built,
        } => {
            assert_eq!(log_last.map(|l| l.index), Some(last - 1));
            assert_eq!(last_applied.index, last);
            assert!(snapshot_built, "the snapshot at {snapshot_index} was older");
        }
        other => panic!("expected the log-behind repair, got {other:?}"),
    }
    wait_leader(&raft).await;
    let next = raft
        .client_write(register(8).into())
        .await
        .expect("a write after the restart commits");
    assert!(next.log_id.index > last, "{:?} after {last}", next.log_id);

    // The applied users survived, the log is purged through the old last applied, and a
    // snapshot at that point or later is there to serve lagging peers.
    for i in 0..9 {
        assert!(
            sm.chat().user_key(&format!("user{i}")).is_some(),
            "user{i} lost"
        );
    }
    let state = log.get_log_state().await.expect("log state");
    assert!(state.last_purged_log_id.is_some_and(|p| p.index >= last));
    let snapshot = sm
        .get_current_snapshot()
        .await
        .expect("snapshot")
        .expect("one");
    assert!(snapshot.meta.last_log_id.is_some_and(|s| s.index >= last));
    raft.shutdown().await.expect("shutdown");
}
