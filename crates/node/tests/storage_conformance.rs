//! Runs openraft's own storage conformance suite (`openraft::testing::log::Suite::test_all`:
//! vote, log reads, append, truncate, purge, apply, membership, snapshots) against
//! `node::LogStore` and `node::StateMachine` on real directories.

use node::{LogStore, StateMachine, TypeConfig};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::{ErrorSubject, ErrorVerb, StorageError};

struct DiskStores;

fn open_failed(e: std::io::Error) -> StorageError<TypeConfig> {
    StorageError::from_io_error(ErrorSubject::Store, ErrorVerb::Read, e)
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for DiskStores {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = LogStore::open(&dir.path().join("log")).map_err(open_failed)?;
        let sm = StateMachine::open(&dir.path().join("sm")).map_err(open_failed)?;
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite_passes_on_disk() -> Result<(), Box<StorageError<TypeConfig>>> {
    Suite::test_all(DiskStores).await.map_err(Box::new)
}
