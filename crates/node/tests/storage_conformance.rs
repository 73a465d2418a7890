//! Runs openraft's own storage conformance suite (`openraft::testing::Suite::test_all`, 35
//! cases: vote, log reads, append, truncate, purge, apply, membership, snapshot transfer)
//! against `node::LogStore` and `node::StateMachine` on real directories.

use node::{LogStore, StateMachine, StorageError, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};

struct DiskStores;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for DiskStores {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = LogStore::open(&dir.path().join("log"))?;
        let sm = StateMachine::open(&dir.path().join("sm"))?;
        Ok((dir, log, sm))
    }
}

// A plain #[test]: the suite builds its own runtime per case.
#[test]
fn openraft_storage_suite_passes_on_disk() -> Result<(), Box<StorageError>> {
    Suite::test_all(DiskStores).map_err(Box::new)
}
