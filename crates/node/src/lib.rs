//! The cellchat node: openraft glue over `raft_log` (the durable log) and `chat_sm` (the chat
//! state machine).
//!
//! - Storage adapters: [`LogStore`] implements openraft's `RaftLogStorage` over
//!   `raft_log::Wal`, and [`StateMachine`] implements `RaftStateMachine` over
//!   `chat_sm::ChatState` with file-based snapshots. Both pass openraft's own storage
//!   conformance suite (`tests/storage_conformance.rs`); each module doc says which call meets
//!   which clause of openraft's contract.
//! - The running node: [`Server`] wires Raft RPC over tarpc (`raft_rpc`), the chat API
//!   (`api`) and its server-pushed subscriptions (`push`), the send [`Proposer`], apply notifications ([`Delivery`]), discovery and
//!   zero-config formation (`cluster`), and Prometheus metrics (`metrics`).
//! - Backups ([`backup`]): a consistent cut of the chat state streamed from a running node into
//!   one checksummed file, its verification, and the offline restore into a new cluster.

mod admin;
mod api;
mod append_pipe;
pub mod archive;
mod atomic_file;
pub mod backup;
mod cluster;
pub mod codec;
mod config;
mod conn_limit;
mod conn_watch;
mod data_dir;
mod delivery;
mod enroll;
mod ephemeral;
mod fd_limit;
pub mod formation;
mod handover;
mod join_secret;
mod leader_watch;
mod log_store;
mod log_tail;
mod metrics;
mod name;
pub mod pki;
mod proposer;
mod push;
mod raft;
mod raft_rpc;
mod read_marks;
mod reconcile;
mod retention;
mod search;
mod server;
mod snapshot_file;
mod snapshot_transfer;
mod state_machine;
mod storage_metrics;
mod types;
mod weaken;
mod web;
mod web_forward;

pub use admin::{LeaveReply, LeaveRequest, MemberInfo, MemberState, MembersRequest};
pub use cluster::{
    handle_join, role_of, self_announce, JoinError, JoinReply, JoinRequest, LeaderContact,
    NodeAddrs, Peers, RemoveReply, RemoveRequest,
};
pub use config::{Config, WebConfig};
pub use conn_limit::{ConnGuard, ConnLimiter, ConnLimits, Refusal};
pub use conn_watch::HELLO_TIMEOUT;
pub use data_dir::{create_private_files, DataDir, DataDirError};
pub use delivery::Delivery;
pub use enroll::EnrollFailed;
pub use ephemeral::{GOSSIP_EVERY, PEER_EXPIRY};
pub use handover::{hand_over, DiskWatchdog, WriteGate};
pub use join_secret::RotateRequest;
pub use log_store::{AckPolicy, LogStore, SyncWatch, APPEND_BYTES_MAX, WAL_DIR};
pub use metrics::{DiskPaths, Metrics, MetricsToken, NodeInfo, StorageMetrics};
pub use name::{default_name, validate_name, NameError, NAME_LEN_MAX};
pub use proposer::{ProposeError, Proposed, Proposer, ProposerConfig};
pub use raft::{metrics_now, start_raft, Raft};
pub use raft_rpc::{
    connect_raft, request_default_retention, request_enroll, request_leave, request_members,
    request_remove, request_rotate, AdminCredential, BackupClient, Dialer, EnrollError,
    EnrollReply, EnrollRequest, JoinCallError, Network, RaftRpcClient, RaftRpcServer, WrongNode,
};
pub use reconcile::{reconcile, Reconciled};
pub use retention::RetentionRequest;
pub use server::{Server, ServerError};
pub use snapshot_file::SnapshotFile;
pub use snapshot_transfer::{SnapshotChunk, SnapshotReceiver, TransferError};
pub use state_machine::StateMachine;
pub use types::Runtime;
pub use types::{
    CommittedLeaderId, Entry, LogId, Member, Membership, NodeId, Snapshot, SnapshotMeta,
    StoredMembership, TypeConfig, Vote,
};
pub use weaken::{Weaken, POWER_FAILED_FILE};
