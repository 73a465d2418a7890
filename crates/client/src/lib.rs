//! The cellchat client library: every tool that talks to a cluster (the `client` CLI, the fault
//! harness, the benchmarks) goes through [`Client`].
//!
//! # Contract
//!
//! - [`Client::connect`] finds nodes by UDP discovery (a broadcast probe and a probe to every
//!   `join` address), measures each node's RTT with UDP pings to its client address (the RPC
//!   `ping` only for a node that never answers UDP), and keeps the ranking fresh in a
//!   background task (pings every `probe_interval`, membership from `cluster`, discovery every
//!   few rounds). A node that answered UDP before and misses three pings in a row is passed
//!   over; a broken connection marks its node down at once.
//! - Reads (`subscribe`, `history`, `channels`, `cluster`) go to the nearest healthy node;
//!   sends go to the leader, learned from announcements, pings, `cluster` and `NotLeader`
//!   hints. Every connection says `hello`; the write connection also logs in.
//! - Connections only where needed: one to the reader, one to the leader while sending (the
//!   same one when the reader leads), closed when no longer used (`writer_idle` after the last
//!   send), so an idle subscribed client holds exactly one server connection.
//! - Sends are idempotent: one random 16-byte client id per [`Client`], a client seq per new
//!   message, and every retry reuses both, so a message is applied at most once. Retries are
//!   bounded in count and time and end in [`Error::RetriesExhausted`].
//! - The read token is the largest `read_token` of any send reply and `applied` of any batch;
//!   every read carries it, so reads are monotonic and include the client's own sends on any
//!   node.
//! - A [`Subscription`] is served by the node pushing batches over a push connection (one per
//!   node per [`Client`], shared by its subscriptions; long polls on nodes without push). It
//!   hands out dense seqs, each once, and resumes exactly after the last one
//!   when it moves to another node.
//! - Presence and typing ([`Client::ephemeral`], [`Client::typing`], [`Client::online`]) ride
//!   on the push connections and are never stored: a user is online while one of their push
//!   connections is open on some node.
//! - Bodies are opaque to servers; [`crypto`] defines the client-side body format and
//!   encryption (format v2: a per-channel record with salt and key check, Argon2id, every
//!   body signed by its sender), [`identity`] the per-user key files, [`pins`] the senders'
//!   keys pinned on first sight. [`Client::show`] opens a message and checks its author
//!   against the pin and its place against earlier sightings.
//!
//! # Non-goals
//!
//! - No server logic and no dependency on `node`, `chat-sm` or RocksDB.
//! - Messages from other clients are not deduplicated beyond what the cluster guarantees.
//! - Discovery is IPv4 only, like `proto::discovery`.

mod authors;
mod client;
mod config;
pub mod crypto;
mod direct;
mod error;
mod handout;
pub mod identity;
pub mod pins;
mod pool;
mod probe;
mod push;
mod retry;
mod routing;
mod stream;
pub mod time;
pub mod trust;

pub use authors::{ChannelSecurity, SenderKey, Shown};
pub use client::{Client, Thread, Unlocked, THREAD_SCAN_MAX};
pub use config::ClientConfig;
pub use direct::{direct_members_of, Direct};
pub use error::Error;
pub use identity::Identity;
pub use proto::{
    ApiError, ChannelChange, ChannelDetail, ChannelInfo, ClusterInfo, MessageBatch, Reaction,
    Relation, Role, SendReply, UserKey, WireMessage,
};
pub use push::Ephemeral;
pub use routing::{ClientEvent, ServerInfo, Status};
pub use stream::Subscription;
