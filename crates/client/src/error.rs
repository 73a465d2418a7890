//! [`Error`], the client library's one error type.

use std::net::SocketAddr;
use std::path::PathBuf;

use proto::ApiError;

use crate::crypto::CryptoError;
use crate::identity::IdentityError;

/// Why a client operation failed. The text says what was wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Discovery found no node of the cluster.
    #[error(
        "no cellchat server of cluster {cluster:?} found: probed broadcast {broadcast} and join \
         list [{}]; start a server (`cargo run --release -p server`), or point at one with \
         --join host:discovery-port",
        join.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    )]
    NoServers {
        /// The cluster looked for.
        cluster: String,
        /// Where broadcasts went.
        broadcast: SocketAddr,
        /// The join addresses probed.
        join: Vec<SocketAddr>,
    },
    /// The name is registered to another key.
    #[error(
        "name {name} is registered with another key; pick another name, or to use it here copy \
         {} from the machine that owns it",
        key_path.as_ref().map_or_else(|| "its key file".to_owned(), |p| p.display().to_string())
    )]
    NameTaken {
        /// The name.
        name: String,
        /// Where this client keeps the name's key.
        key_path: Option<PathBuf>,
    },
    /// Sending and reading need a name; this client has none.
    #[error("this client has no name: give a user name to send or read")]
    NoIdentity,
    /// The cluster answered with an error that retrying will not fix (or a single attempt
    /// failed).
    #[error("{0}")]
    Api(#[from] ApiError),
    /// A single attempt could not reach its node, or the connection broke during it (the
    /// outcome of a send is then unknown).
    #[error("node unreachable: {reason}")]
    Unreachable {
        /// The node, when one was chosen.
        node: Option<u64>,
        /// What failed.
        reason: String,
    },
    /// The retry budget ran out.
    #[error(
        "gave up after {attempts} attempts in {elapsed_ms} ms (last error: {last}); the cluster \
         may be down or without a leader: check `client --servers`"
    )]
    RetriesExhausted {
        /// Attempts made.
        attempts: u32,
        /// Time spent.
        elapsed_ms: u64,
        /// The last failure.
        last: String,
    },
    /// The identity could not be loaded or created.
    #[error("identity: {0}")]
    Identity(#[from] IdentityError),
    /// Encryption failed.
    #[error("encryption: {0}")]
    Crypto(#[from] CryptoError),
    /// The channel has no encryption record and only its owner may set one.
    #[error("#{channel} is not encrypted yet and only its owner {owner} can set its passphrase: ask them to /key it")]
    NotChannelOwner {
        /// The channel.
        channel: String,
        /// Its owner.
        owner: String,
    },
    /// The channel's crypto record is gone or differs from the one this client pinned: a node
    /// dropped or replaced it.
    #[error("#{channel}'s encryption record is gone or changed since this client first saw it: a node may be lying; nothing was unlocked or sent. If its users really set a new passphrase, delete its line in known_channels")]
    ChannelRecordChanged {
        /// The channel.
        channel: String,
    },
    /// The configuration is out of bounds.
    #[error("bad client configuration: {0}")]
    Config(String),
    /// A local socket could not be opened.
    #[error("discovery socket: {0}")]
    Discovery(#[source] std::io::Error),
    /// The pinned CAs (`known_clusters` in the config dir) could not be read.
    #[error("cluster pins: {0}")]
    Trust(#[source] std::io::Error),
}
