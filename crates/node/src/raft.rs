//! The running Raft type of a node and the helpers that read it: one module above storage
//! (`log_store`, `state_machine`) and below everything that drives Raft.

use crate::log_store::LogStore;
use crate::snapshot_file::SnapshotFile;
use crate::state_machine::StateMachine;
use crate::types::{NodeId, Runtime, TypeConfig};

/// Starts Raft for node `id`, its random draws seeded with `seed`. Every task openraft spawns
/// inherits a seed derived from it, so no draw happens outside a seeded scope.
///
/// # Errors
/// openraft's own start-up failure (storage unreadable).
pub async fn start_raft<N>(
    id: NodeId,
    config: std::sync::Arc<openraft::Config>,
    network: N,
    log: LogStore,
    state: StateMachine,
    seed: u64,
) -> Result<Raft, openraft::error::Fatal<TypeConfig>>
where
    N: openraft::network::RaftNetworkFactory<TypeConfig>,
    N::Network: openraft::network::NetSnapshot<TypeConfig, SnapshotData = SnapshotFile>,
{
    Runtime::scope(seed, Raft::new(id, config, network, log, state)).await
}

/// A running Raft node over cellchat's state machine.
pub type Raft = openraft::Raft<TypeConfig, StateMachine>;
/// openraft's metrics as of now.
pub type Metrics = openraft::RaftMetrics<TypeConfig>;

/// openraft's metrics watch.
pub type MetricsWatch = openraft::alias::WatchReceiverOf<TypeConfig, Metrics>;

/// A copy of `raft`'s current metrics (for a decision that reads several fields at once).
pub fn metrics_now(raft: &Raft) -> Metrics {
    use openraft::async_runtime::WatchReceiver;
    raft.metrics().borrow_watched().clone()
}

/// Runs `f` on `raft`'s current server metrics (role, vote, leader, membership) without
/// copying them: for checks on every RPC.
pub fn with_server_metrics<T>(
    raft: &Raft,
    f: impl FnOnce(&openraft::metrics::RaftServerMetrics<TypeConfig>) -> T,
) -> T {
    use openraft::async_runtime::WatchReceiver;
    f(&raft.server_metrics().borrow_watched())
}
