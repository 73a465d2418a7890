//! The cellchat client protocol: wire types, the tarpc [`Chat`] service, the postcard transport
//! shared by every tarpc service in the system, and the UDP [`discovery`] format and sockets.
//!
//! # Contract
//!
//! - Every connection is TLS 1.3 ([`tls`]): a node proves with a certificate from its cluster's
//!   CA that it is a node of that cluster (and, to peers, which node). The ALPN protocol says
//!   what the connection carries: [`tls::ALPN_CHAT`], [`tls::ALPN_PUSH`] or [`tls::ALPN_RAFT`].
//! - Every tarpc frame is a 4-byte big-endian length followed by a postcard body. Both ends refuse
//!   frames longer than [`FRAME_BYTES_MAX`] before allocating for them ([`framed`]).
//! - [`Chat::hello`] is the protocol version check: a client calls it first on every connection
//!   and a server answers every other call except [`Chat::ping`] with
//!   [`ApiError::Unauthenticated`] until `hello` succeeded on that connection. A wrong
//!   [`PROTOCOL_VERSION`] or cluster name gets a typed error ([`check_hello`]).
//! - A connection to a node's client address whose ALPN is [`tls::ALPN_PUSH`] speaks the
//!   [`push`] protocol (server-pushed subscriptions) instead of tarpc.
//! - Errors that cross the wire are [`ApiError`]: small, serializable, and never carrying
//!   `io::Error` text.
//! - Every discovery datagram starts with [`discovery::MAGIC`] and [`discovery::DISCOVERY_VERSION`]
//!   and is at most [`discovery::PACKET_BYTES_MAX`] bytes; decoding garbage returns a typed error
//!   and never panics.
//!
//! # Non-goals
//!
//! - No server logic: signature verification, rate limiting and Raft live in `node`.
//! - No reconnection or leader tracking: that is the `client` crate's job.
//! - Discovery is IPv4 only, and never sends to the limited broadcast address 255.255.255.255.

#![deny(missing_docs)]

mod codec;
pub mod discovery;
mod error;
mod login;
pub mod node_name;
pub mod push;
mod retention;
pub mod search;
mod service;
pub mod tls;
mod transport;
mod types;

pub use codec::Postcard;
pub use error::{ApiError, RejectReason};
pub use login::{login_message, web_binding};
pub use retention::{Retention, RETENTION_AGE_MAX_MS, RETENTION_AGE_MIN_MS};
pub use service::{
    check_hello, connect_chat, deadline_for, wait_budget, Chat, ChatClient, ChatClientTransport,
    ChatRequest, ChatResponse, ChatServerTransport, ServeChat, CHAT_REQUEST_BYTES_MAX,
    DEADLINE_MARGIN, PROTOCOL_VERSION, REPLY_MARGIN, STREAM_WAIT_MS_MAX,
};
pub use transport::{
    accept_tls, alpn, connect, connect_tls, framed, framed_reading_at_most, handshake, listen,
    peer_certificates, set_socket_options, ReadLimited, TlsTcp, Transport, FRAME_BYTES_MAX,
    HANDSHAKE_TIMEOUT, READ_BUFFER_BYTES,
};
pub use types::{
    direct_channel_name, is_direct_channel, valid_user_name, ChannelChange, ChannelDetail,
    ChannelInfo, ChannelInfoRequest, ChannelPage, ChannelRequest, ChannelsRequest, ClusterInfo,
    Hello, HistoryRequest, LeaderHint, Login, MarkReadReply, MarkReadRequest, MessageBatch,
    NodeInfo, Pong, Reaction, Relation, Role, SearchReply, SearchRequest, SendReply, SendRequest,
    Session, StreamRequest, UserKey, Welcome, WireMessage, CHANNEL_PAGE_MAX, DIRECT_MEMBERS_MAX,
    SEARCH_HITS_MAX, USER_KEYS_MAX,
};
