//! End-to-end test of erasure on real `server` processes: the body of a deleted message is,
//! after the next snapshots, found in no file of any node's data directory: not in the Raft
//! log (purged below the snapshot, its segment removed), not in the chat state's RocksDB
//! (compacted after the snapshot), not in a snapshot file.
//!
//! Timeouts are generous bounds for a loaded 2-core machine, not performance claims.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::ensure;
use cellchat_client::{Client, ClientConfig, Identity, Relation};
use testkit::TestCluster;

const READY: Duration = Duration::from_secs(60);
const CONVERGE: Duration = Duration::from_secs(60);
/// Frequent snapshots and a short log tail; test clusters use 4 MiB log segments, so a few
/// MiB of traffic roll them.
const SMALL_LOG: [&str; 4] = ["--snapshot-every", "20", "--log-keep", "5"];

/// Every file under `dir` holding `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if std::fs::read(&path)
                .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
            {
                found.push(path);
            }
        }
    }
    found
}

fn holders(cluster: &TestCluster, needle: &[u8]) -> Vec<PathBuf> {
    (cluster.nodes.iter())
        .flat_map(|node| files_containing(node.data_dir(), needle))
        .collect()
}

/// Sends `count` messages of about 6 KiB: traffic that rolls log segments and snapshots.
async fn filler(client: &Client, count: usize) -> anyhow::Result<()> {
    let text = "filler ".repeat(900);
    for _ in 0..count {
        client.send_text("noise", &text, None).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_body_is_in_no_file_of_any_node_after_the_next_snapshots() -> anyhow::Result<()> {
    let mut cluster = TestCluster::new("erasure", &SMALL_LOG)?;
    testkit::start_nodes(&mut cluster, 3, READY, CONVERGE).await?;
    let config = ClientConfig {
        identity: Some(Identity::ephemeral("alice", None)),
        ..ClientConfig::new(cluster.cluster.clone(), cluster.discovery_port)
    };
    let alice = Client::connect(config).await?;
    let marker: [u8; 16] = rand::random();
    let secret = format!("the launch code is {:032x}", u128::from_le_bytes(marker));
    let kept = format!("this one stays {:032x}", rand::random::<u128>());
    let sent = alice.send_text("general", &secret, None).await?;
    alice.send_text("general", &kept, None).await?;

    // The test sees stored bodies: every node's log holds the secret once it replicated.
    let deadline = Instant::now() + CONVERGE;
    loop {
        let on = (cluster.nodes.iter())
            .filter(|node| !files_containing(node.data_dir(), secret.as_bytes()).is_empty())
            .count();
        if on == cluster.nodes.len() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the secret reached only {on} nodes' files"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    alice
        .send_related("general", "", None, Relation::Delete { of: sent.seq })
        .await?;
    // Traffic until every copy is gone: snapshots purge the log and compact the state.
    let deadline = Instant::now() + CONVERGE * 2;
    loop {
        filler(&alice, 200).await?;
        let left = holders(&cluster, secret.as_bytes());
        if left.is_empty() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the deleted body is still in {left:?}"
        );
    }
    // What was not deleted is still stored on every node.
    for node in &cluster.nodes {
        ensure!(
            !files_containing(node.data_dir(), kept.as_bytes()).is_empty(),
            "a kept message vanished from {}",
            node.data_dir().display()
        );
    }
    let page = alice.history("general", None, 10).await?;
    ensure!(page.messages.iter().any(|m| m.seq == sent.seq && m.deleted));
    Ok(())
}
