//! The openraft type configuration shared by every node, and the addresses a member publishes.

use std::io::Cursor;

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

// `declare_raft_types!` expands a bare `Cursor` for its default snapshot type; keep it in scope
// even though we override `SnapshotData`.
#[allow(dead_code)]
type _CursorInScope = Cursor<Vec<u8>>;

openraft::declare_raft_types!(
    /// cellchat's openraft configuration: entries carry chat commands, responses are chat
    /// responses, snapshots are files streamed from disk.
    pub TypeConfig:
        D = chat_sm::Command,
        R = chat_sm::ChatResponse,
        NodeId = NodeId,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = SnapshotFile,
        AsyncRuntime = openraft::TokioRuntime,
        Responder = openraft::impls::OneshotResponder<TypeConfig>,
);

/// A log entry as openraft sees it.
pub type Entry = openraft::Entry<TypeConfig>;
/// A log id (leader id + index).
pub type LogId = openraft::LogId<NodeId>;
/// A vote.
pub type Vote = openraft::Vote<NodeId>;
/// Storage errors in openraft's vocabulary.
pub type StorageError = openraft::StorageError<NodeId>;
/// Membership as stored in the state machine.
pub type StoredMembership = openraft::StoredMembership<NodeId, Member>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Member>;
/// A snapshot handle with its metadata.
pub type Snapshot = openraft::Snapshot<TypeConfig>;
