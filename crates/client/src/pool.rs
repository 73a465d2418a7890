//! The connection pool: at most one open RPC connection per node, each of which said hello,
//! and which of them is logged in and carries sends (the writer). Connections exist only to
//! the reader, the writer (the same one when they are the same node) and nodes measured over
//! TCP; [`Pool::prune`] closes the rest, so an idle subscribed client holds no RPC connection.

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use parking_lot::Mutex;
use proto::{ApiError, ChatClient, Hello, Login, Welcome};

use crate::config::ClientConfig;
use crate::identity::Identity;
use crate::retry::Failure;
use crate::routing::Routes;
use crate::trust::ClusterTrust;

/// One open connection to a node.
#[derive(Clone)]
struct Conn {
    client: ChatClient,
    /// Numbers connections, so a login marks the one it was made on.
    serial: u64,
    /// The unused login challenge of its hello; a login attempt takes it.
    challenge: Option<[u8; 32]>,
    /// The TLS session's login binding; the login signature covers it.
    binding: [u8; 32],
    /// Whether it logged in, so it can send.
    logged_in: bool,
}

/// The RPC connections of one client.
///
/// Invariants: at most one connection per node; `writer`, when set, names a node whose
/// connection in `conns` is logged in.
pub(crate) struct Pool {
    config: Arc<ClientConfig>,
    trust: Arc<ClusterTrust>,
    identity: Option<Identity>,
    routes: Arc<Routes>,
    conns: Mutex<HashMap<u64, Conn>>,
    conn_serial: AtomicU64,
    /// The node sends go to. An async lock, held while the writer is chosen and logged in.
    writer: tokio::sync::Mutex<Option<u64>>,
    /// Held across every login, so two logins never race for one connection's challenge.
    logins: tokio::sync::Mutex<()>,
    /// When a send and a read RPC last used a connection; each closes after `writer_idle`.
    last_write: Mutex<Instant>,
    last_read: Mutex<Instant>,
    /// Long polls in flight: the reader's connection stays open while any runs.
    polls_in_flight: AtomicUsize,
}

/// A long poll in flight; see [`Pool::poll_guard`].
pub(crate) struct PollGuard<'a>(&'a AtomicUsize);

impl Drop for PollGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A tarpc context whose deadline is `timeout` from now.
pub(crate) fn ctx(timeout: Duration) -> tarpc::context::Context {
    let mut ctx = tarpc::context::current();
    ctx.deadline = Instant::now() + timeout;
    ctx
}

impl Pool {
    pub(crate) fn new(
        config: Arc<ClientConfig>,
        trust: Arc<ClusterTrust>,
        identity: Option<Identity>,
        routes: Arc<Routes>,
    ) -> Self {
        Self {
            config,
            trust,
            identity,
            routes,
            conns: Mutex::new(HashMap::new()),
            conn_serial: AtomicU64::new(0),
            writer: tokio::sync::Mutex::new(None),
            logins: tokio::sync::Mutex::new(()),
            last_write: Mutex::new(Instant::now()),
            last_read: Mutex::new(Instant::now()),
            polls_in_flight: AtomicUsize::new(0),
        }
    }

    pub(crate) fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    /// A deadline of one request.
    pub(crate) fn ctx(&self) -> tarpc::context::Context {
        ctx(self.config.request_timeout)
    }

    /// Says hello on `conn`, to `node` (a node id or an address, for the error text).
    async fn hello(&self, conn: &ChatClient, node: impl Display) -> Result<Welcome, Failure> {
        let name = self.identity.as_ref().map(|i| i.name().to_owned());
        match conn
            .hello(self.ctx(), Hello::new(self.config.cluster.clone(), name))
            .await
        {
            Ok(Ok(welcome)) => Ok(welcome),
            Ok(Err(e)) => Err(Failure::Api(e)),
            Err(e) => Err(Failure::Transport(format!("hello to {node}: {e}"))),
        }
    }

    /// The open connection to `node`, or a new one that said hello.
    ///
    /// Boxed, like [`Pool::login`]: a connect's state (TLS handshake, hello) is kilobytes, and
    /// an async fn holds every future it may await inline, so every send and read would carry
    /// and copy it through each layer above, though almost none of them connects.
    fn conn(&self, node: u64) -> BoxFuture<'_, Result<Conn, Failure>> {
        Box::pin(self.open_or_reuse(node))
    }

    async fn open_or_reuse(&self, node: u64) -> Result<Conn, Failure> {
        if let Some(conn) = self.conns.lock().get(&node) {
            return Ok(conn.clone());
        }
        let addr = (self.routes.addr_of(node))
            .ok_or_else(|| Failure::Transport(format!("node {node} unknown")))?;
        let fail = |e: &dyn Display| Failure::Transport(format!("connect to {addr}: {e}"));
        let (client, binding) =
            proto::connect_chat(addr, self.trust.chat.clone(), self.config.connect_timeout)
                .await
                .map_err(|e| fail(&e))?;
        self.trust.remember();
        let welcome = self.hello(&client, addr).await?;
        if welcome.node_id != node {
            return Err(fail(&format_args!("answered as node {}", welcome.node_id)));
        }
        let conn = Conn {
            client,
            serial: self.conn_serial.fetch_add(1, Ordering::Relaxed),
            challenge: Some(welcome.challenge),
            binding,
            logged_in: false,
        };
        // Another task may have dialed the node meanwhile: keep theirs, so there is one
        // connection per node (ours closes when dropped here).
        Ok(self.conns.lock().entry(node).or_insert(conn).clone())
    }

    /// The open connection to `node`, if any, without opening one or counting as a read.
    pub(crate) fn open_conn(&self, node: u64) -> Option<ChatClient> {
        self.conns.lock().get(&node).map(|conn| conn.client.clone())
    }

    /// A connection to `node` that said hello, reusing an open one.
    pub(crate) async fn connect(&self, node: u64) -> Result<ChatClient, Failure> {
        self.conn(node).await.map(|conn| conn.client)
    }

    /// A logged-in connection to `node` for a read RPC (reads need a login); keeps the
    /// reader's connection open.
    pub(crate) async fn read_conn(&self, node: u64) -> Result<ChatClient, Failure> {
        *self.last_read.lock() = Instant::now();
        let identity = (self.identity.as_ref()).ok_or(Failure::Api(ApiError::Unauthenticated))?;
        let conn = self.conn(node).await?;
        if !conn.logged_in {
            self.login(node, &conn, identity).await?;
        }
        Ok(conn.client)
    }

    /// A connection to `node` that said hello, for the calls that need no login (the
    /// cluster's membership); keeps the reader's connection open.
    pub(crate) async fn info_conn(&self, node: u64) -> Result<ChatClient, Failure> {
        *self.last_read.lock() = Instant::now();
        self.connect(node).await
    }

    /// Marks a long poll in flight until the guard drops (the reader's connection is kept).
    pub(crate) fn poll_guard(&self) -> PollGuard<'_> {
        self.polls_in_flight.fetch_add(1, Ordering::Relaxed);
        PollGuard(&self.polls_in_flight)
    }

    /// Drops the connection to `node` (a concurrent caller that already replaced it with a
    /// fresh one only pays a redial).
    pub(crate) fn forget(&self, node: u64) {
        self.conns.lock().remove(&node);
    }

    /// Drops the connection to `node` and passes the node over: for a node that failed.
    pub(crate) fn mark_down(&self, node: u64, reason: &str) {
        self.forget(node);
        self.routes.mark_down(node, reason);
    }

    /// The logged-in write connection: to the known leader, else to the best-ranked node
    /// (which names the leader if it is not). It reuses the node's open connection and logs
    /// in on it if it has not yet.
    pub(crate) async fn writer_conn(&self) -> Result<(u64, ChatClient), Failure> {
        let identity = (self.identity.as_ref()).ok_or(Failure::Api(ApiError::Unauthenticated))?;
        let mut writer = self.writer.lock().await;
        *self.last_write.lock() = Instant::now();
        let (leader, target) = self.routes.view(|table, now| table.writer_target(now));
        if let Some(node) = writer.filter(|&node| leader.is_none_or(|l| l == node)) {
            if let Some(conn) = self.conns.lock().get(&node).filter(|c| c.logged_in) {
                return Ok((node, conn.client.clone()));
            }
        }
        *writer = None;
        let target = target.ok_or_else(|| Failure::Transport("no node known".into()))?;
        let conn = match self.conn(target).await {
            Ok(conn) => conn,
            Err(e @ Failure::Transport(_)) => {
                self.mark_down(target, "connect failed");
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        if !conn.logged_in {
            self.login(target, &conn, identity).await?;
        }
        *writer = Some(target);
        Ok((target, conn.client))
    }

    /// Logs in on `conn` to `node`, with the challenge of its hello if still unused, else with
    /// a fresh one. Boxed for the reason [`Pool::conn`] gives.
    fn login<'a>(
        &'a self,
        node: u64,
        conn: &'a Conn,
        identity: &'a Identity,
    ) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(self.log_in(node, conn, identity))
    }

    async fn log_in(&self, node: u64, conn: &Conn, identity: &Identity) -> Result<(), Failure> {
        let _one_at_a_time = self.logins.lock().await;
        let done =
            (self.conns.lock().get(&node)).is_some_and(|c| c.serial == conn.serial && c.logged_in);
        if done {
            return Ok(());
        }
        let unused = (self.conns.lock().get_mut(&node))
            .filter(|c| c.serial == conn.serial)
            .and_then(|c| c.challenge.take());
        let challenge = match unused {
            Some(challenge) => challenge,
            None => match self.hello(&conn.client, node).await {
                Ok(welcome) => welcome.challenge,
                Err(e) => {
                    if matches!(e, Failure::Transport(_)) {
                        self.mark_down(node, "hello failed");
                    }
                    return Err(e);
                }
            },
        };
        let message = proto::login_message(
            &challenge,
            &conn.binding,
            &self.config.cluster,
            identity.name(),
        );
        let login = Login {
            name: identity.name().to_owned(),
            public_key: identity.public_key(),
            signature: identity.sign(&message).to_vec(),
        };
        match conn.client.login(self.ctx(), login).await {
            Ok(Ok(_session)) => {
                tracing::debug!(node, "logged in");
                let mut conns = self.conns.lock();
                if let Some(c) = conns.get_mut(&node).filter(|c| c.serial == conn.serial) {
                    c.logged_in = true;
                }
                Ok(())
            }
            Ok(Err(e)) => {
                if let ApiError::NotLeader { leader: Some(hint) } = &e {
                    self.routes.update(|table, now| table.learn_hint(hint, now));
                }
                Err(Failure::Api(e))
            }
            Err(e) => {
                self.mark_down(node, "login failed");
                Err(Failure::Transport(format!("login at node {node}: {e}")))
            }
        }
    }

    /// Counts a send on the writer, keeping its connection open.
    pub(crate) fn touch_writer(&self) {
        *self.last_write.lock() = Instant::now();
    }

    /// Stops sending to `node`; its connection stays for reads if it is the reader, and is
    /// closed by the next prune otherwise.
    pub(crate) async fn drop_writer(&self, node: u64) {
        let mut writer = self.writer.lock().await;
        if *writer == Some(node) {
            *writer = None;
        }
    }

    /// Closes the connections no longer used: all but the reader's and the writer's (each
    /// until idle for `writer_idle`) and those of nodes measured over TCP. A connection
    /// closes once the last request on it is done.
    pub(crate) fn prune(&self) {
        let idle = self.config.writer_idle;
        // A send or a login holds the writer lock, so the writer is in use; prune next round.
        let Ok(mut writer) = self.writer.try_lock() else {
            return;
        };
        if writer.is_some() && self.last_write.lock().elapsed() >= idle {
            tracing::debug!(node = ?*writer, "closing the idle write connection");
            *writer = None;
        }
        let reading = self.polls_in_flight.load(Ordering::Relaxed) > 0
            || self.last_read.lock().elapsed() < idle;
        let keep: Vec<u64> = self.routes.view(|table, _| {
            let reader = table.reader().filter(|_| reading);
            reader
                .into_iter()
                .chain(*writer)
                .chain(table.tcp_probed())
                .collect()
        });
        self.conns.lock().retain(|id, _| keep.contains(id));
    }
}
