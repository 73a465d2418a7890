//! The openraft type configuration shared by every node, and the addresses a member publishes.

use serde::{Deserialize, Serialize};

use crate::snapshot_file::SnapshotFile;

/// A node's identity in the cluster. Chosen once at first start and kept in the data dir.
pub type NodeId = u64;

/// What the cluster membership records about a node: where to reach it, and its name.
///
/// openraft stores this inside membership log entries, so it is part of the replicated state
/// and of the on-disk log format: a change here bumps `codec::FORMAT_VERSION` and keeps a
/// decoder for the old layout (`codec::v1`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// `host:port` of the node-to-node Raft RPC listener.
    pub raft_addr: String,
    /// `host:port` of the client-facing chat RPC listener.
    pub client_addr: String,
    /// `host:port` of the HTTP metrics and health endpoint.
    pub metrics_addr: String,
    /// The node's name (see `name.rs`). Empty for a member added before nodes had names
    /// (codec version 1); listings then fall back to the name discovery hears, or the id.
    pub name: String,
}

/// openraft's tokio runtime, with every random draw openraft makes (election timeouts, tick
/// phases) taken from a generator seeded per task: [`start_raft`] seeds it, from entropy on a
/// server and from the scenario's seed in the simulated cluster, where it makes runs repeat.
pub type Runtime = openraft::rt::deterministic_rng::DeterministicRng<openraft::impls::TokioRuntime>;

openraft::declare_raft_types!(
    /// cellchat's openraft configuration: entries carry chat commands, responses are chat
    /// responses; terms, leader ids (ordered by term, then node id) and entries are openraft's
    /// defaults. A command is shared (`Arc`) so the log's tail cache hands the same decoded
    /// entry to replication and apply without copying it; it encodes exactly as the command.
    pub TypeConfig:
        D = std::sync::Arc<chat_sm::Command>,
        R = chat_sm::ChatResponse,
        NodeId = NodeId,
        Node = Member,
        AsyncRuntime = Runtime,
);

/// A log entry as openraft sees it.
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
/// A log id (leader id + index).
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
/// The leader id a log id carries (term + node id).
pub type CommittedLeaderId = openraft::alias::CommittedLeaderIdOf<TypeConfig>;
/// A vote.
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
/// Membership as stored in the state machine.
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
/// A membership configuration.
pub type Membership = openraft::Membership<NodeId, Member>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
/// A snapshot handle with its metadata.
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, SnapshotFile>;
