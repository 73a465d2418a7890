//! Web clients' writes as members forward them to the leader (`RaftRpc::web_write`), apart
//! from `web.rs` so that the Raft RPC server can run them without depending on the web server.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::{
    ApiError, ChannelRequest, Chat as _, MarkReadReply, MarkReadRequest, SendReply, SendRequest,
};
use serde::{Deserialize, Serialize};
use tarpc::context;

use crate::api::{ApiShared, ChatServer};
use crate::conn_limit;

/// How long a forwarded write may take.
pub(crate) const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// A write the page asked for, forwarded to the leader when this node does not lead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WebWrite {
    /// `Chat::send`.
    Send(SendRequest),
    /// `Chat::channel`.
    Channel(ChannelRequest),
    /// `Chat::mark_read`.
    MarkRead(MarkReadRequest),
}

/// What a [`WebWrite`] answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WebWritten {
    /// A send's reply.
    Sent(SendReply),
    /// A channel change's read token.
    Channel(u64),
    /// A read mark's reply.
    Marked(MarkReadReply),
}

/// A forwarded write: the user the forwarding member logged in, the key they proved, and the
/// address they came from (for the registration limits; `None`: the member's own machine).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forwarded {
    /// The logged-in user.
    pub user: String,
    /// The key the login proved.
    pub public_key: [u8; 32],
    /// Where the page connects from.
    pub source: Option<IpAddr>,
    /// The write.
    pub write: WebWrite,
}

/// What the Raft RPC server needs to serve members' web calls.
pub(crate) struct WebInbound {
    shared: Arc<ApiShared>,
    /// This node's web URL, when it serves the web client.
    pub url: Option<String>,
}

impl WebInbound {
    /// Serves `shared`; `url` is this node's web URL.
    pub(crate) fn new(shared: Arc<ApiShared>, url: Option<String>) -> WebInbound {
        WebInbound { shared, url }
    }

    /// Runs a write a member forwarded, for its user.
    pub async fn run_forwarded(&self, req: Forwarded) -> Result<WebWritten, ApiError> {
        let source = req.source.and_then(|ip| conn_limit::addr_key(ip, None));
        let server = ChatServer::on_behalf(self.shared.clone(), req.user, req.public_key, source);
        run_write(server, req.write).await
    }
}

pub(crate) fn ctx_within(ttl: Duration) -> context::Context {
    let mut ctx = context::current();
    ctx.deadline = Instant::now() + ttl;
    ctx
}

pub(crate) async fn run_write(server: ChatServer, write: WebWrite) -> Result<WebWritten, ApiError> {
    let ctx = ctx_within(FORWARD_TIMEOUT);
    match write {
        WebWrite::Send(req) => server.send(ctx, req).await.map(WebWritten::Sent),
        WebWrite::Channel(req) => server.channel(ctx, req).await.map(WebWritten::Channel),
        WebWrite::MarkRead(req) => server.mark_read(ctx, req).await.map(WebWritten::Marked),
    }
}
