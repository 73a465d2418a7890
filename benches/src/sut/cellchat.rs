//! cellchat under test: a local cluster of `server` processes with production Raft timing (or
//! a running cluster joined with `--join`), driven through the client library.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cellchat_client::crypto;
use cellchat_client::identity::Identity;
use cellchat_client::{Client, ClientConfig, Subscription};
use futures::future::BoxFuture;
use futures::FutureExt;
use testkit::TestCluster;

use super::{Subscriber, System, SystemKind, Writer};

/// Server flags for benchmark clusters: the per-user and per-connection rate limits exist to
/// stop abuse, not to shape a load test, so they are raised out of the way (every sender of a
/// run is its own user on its own connection, as in production; etcd and NATS run without
/// limits too).
const BENCH_SERVER_ARGS: [&str; 8] = [
    "--user-rate",
    "10000000",
    "--user-burst",
    "10000000",
    "--conn-rate",
    "10000000",
    "--conn-burst",
    "10000000",
];

/// How long a node may take to start and report ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the clients of a run find the cluster.
#[derive(Debug, Clone)]
pub struct Target {
    /// Cluster name.
    pub cluster: String,
    /// Discovery port.
    pub discovery_port: u16,
    /// Discovery addresses to probe directly (empty: broadcast on loopback only).
    pub join: Vec<SocketAddr>,
    /// The cluster's join token, whose CA the clients trust (`None`: `CELLCHAT_TOKEN`, else
    /// trust on first use).
    pub token: Option<proto::tls::JoinToken>,
}

/// A reader identity of its own for this process: one name for all its readers, registered
/// once.
pub fn reader_identity() -> Identity {
    Identity::ephemeral(format!("b{:08x}-reader", rand::random::<u32>()), None)
}

/// The token in `CELLCHAT_TOKEN`, if set and valid.
pub fn token_from_env() -> Option<proto::tls::JoinToken> {
    std::env::var("CELLCHAT_TOKEN").ok()?.parse().ok()
}

/// A cellchat cluster the harness started, or one it joined.
pub struct Cellchat {
    target: Target,
    /// The local cluster; `None` when joined. In a mutex only because its nodes' ready
    /// receivers are not `Sync`; `&mut self` methods reach it without locking.
    cluster: Option<Mutex<TestCluster>>,
    nodes: usize,
    /// Tells this process's user names apart from earlier processes' on a joined cluster.
    run_tag: u32,
    /// Numbers writers, so every writer of this process is a user of its own (a name
    /// registered once stays bound to its key).
    writers_made: AtomicU64,
    /// The user every reader of this process logs in as (reading needs a login).
    reader: Identity,
    /// Writers sign each body and verify it once acknowledged (`cellchat-signed`).
    signed: bool,
    /// With `signed`, each writer's public key by user name: subscribers verify every body
    /// under its sender's key, as a reader that pinned the writers would.
    writer_keys: WriterKeys,
    /// The nodes run an earlier build (`cellchat-base`).
    base: bool,
}

impl Cellchat {
    /// Starts `nodes` server processes on loopback and waits for one leader followed by all.
    ///
    /// # Errors
    /// The server binary cannot be built or found, or the cluster did not converge.
    pub async fn start(nodes: usize) -> Result<Self> {
        Self::start_with(nodes, &[]).await
    }

    /// As [`start`](Self::start), with `extra` flags for every server after the harness's own.
    ///
    /// # Errors
    /// As [`start`](Self::start).
    pub async fn start_with(nodes: usize, extra: &[&str]) -> Result<Self> {
        Self::start_from(nodes, extra, None).await
    }

    /// As [`start_with`](Self::start_with), the nodes running `server` when given (an earlier
    /// build, reported as `cellchat-base`) instead of this workspace's server binary.
    ///
    /// # Errors
    /// As [`start`](Self::start).
    pub async fn start_from(nodes: usize, extra: &[&str], server: Option<&Path>) -> Result<Self> {
        if nodes == 0 {
            bail!("--nodes must be at least 1");
        }
        let args: Vec<&str> = BENCH_SERVER_ARGS.iter().chain(extra).copied().collect();
        let mut cluster = TestCluster::with_production_timing("bench", &args)?;
        if let Some(server) = server {
            cluster.use_server_binary(server.to_path_buf());
        }
        for _ in 0..nodes {
            cluster.spawn_node()?;
        }
        for node in &mut cluster.nodes {
            node.wait_ready(READY_TIMEOUT)?;
        }
        cluster
            .wait_converged(nodes, Duration::from_secs(60))
            .await
            .context("the benchmark cluster did not form")?;
        Ok(Self {
            target: Target {
                cluster: cluster.cluster.clone(),
                discovery_port: cluster.discovery_port,
                join: Vec::new(),
                token: Some(cluster.token()?.parse()?),
            },
            cluster: Some(Mutex::new(cluster)),
            nodes,
            run_tag: rand::random(),
            writers_made: AtomicU64::new(0),
            reader: reader_identity(),
            signed: false,
            writer_keys: Arc::default(),
            base: server.is_some(),
        })
    }

    /// The same cluster, its writers signing every body (`cellchat-signed`) or not.
    pub fn signing(self, signed: bool) -> Self {
        Self { signed, ..self }
    }

    /// Uses a running cluster (`--join`): nothing is started or killed.
    ///
    /// # Errors
    /// No node answers discovery.
    pub async fn join(target: Target) -> Result<Self> {
        let probe = Client::connect(client_config(&target, None)).await?;
        let nodes = probe.servers().await.len();
        Ok(Self {
            target,
            cluster: None,
            nodes,
            run_tag: rand::random(),
            writers_made: AtomicU64::new(0),
            reader: reader_identity(),
            signed: false,
            writer_keys: Arc::default(),
            base: false,
        })
    }

    /// Where clients find this cluster.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The identity this process's readers share.
    pub fn reader(&self) -> &Identity {
        &self.reader
    }

    /// The local cluster, for scenarios that kill and restart nodes.
    ///
    /// # Errors
    /// The cluster was joined, not started here.
    pub fn local(&mut self) -> Result<&mut TestCluster> {
        self.cluster
            .as_mut()
            .map(|c| c.get_mut().unwrap_or_else(PoisonError::into_inner))
            .context(
                "this scenario kills nodes, so it needs a cluster the harness started (not --join)",
            )
    }

    /// Each started node's pid and metrics address (`GET /metrics`), in start order; empty
    /// when the cluster was joined (its processes are not known here).
    pub fn node_procs(&self) -> Vec<(Option<u32>, Option<SocketAddr>)> {
        self.cluster
            .as_ref()
            .map(|c| {
                let cluster = c.lock().unwrap_or_else(PoisonError::into_inner);
                cluster
                    .nodes
                    .iter()
                    .map(|n| (n.pid(), n.ready().map(|r| r.metrics)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The index in the local cluster of the node discovery reports as leader.
    ///
    /// # Errors
    /// No leader was found within 10 s, or the cluster was joined.
    pub async fn leader_index(&mut self) -> Result<usize> {
        let cluster = self.local()?;
        let (leader, _) = testkit::leader_client_addr(cluster, Duration::from_secs(10)).await?;
        cluster
            .nodes
            .iter()
            .position(|n| n.ready().map(|r| r.id) == Some(leader))
            .with_context(|| format!("leader {leader} is not one of the started nodes"))
    }
}

/// The client config of one benchmark client: fast discovery, and background probes rare
/// enough that thousands of idle clients do not load the nodes.
pub fn client_config(target: &Target, identity: Option<Identity>) -> ClientConfig {
    ClientConfig {
        cluster: target.cluster.clone(),
        discovery_port: target.discovery_port,
        join: target.join.clone(),
        identity,
        token: target.token.clone(),
        discovery_window: Duration::from_millis(150),
        connect_timeout: Duration::from_millis(500),
        probe_interval: Duration::from_secs(5),
        ..ClientConfig::default()
    }
}

struct CellchatWriter {
    client: Client,
    /// `Some` for `cellchat-signed`: the writer's identity, which signs every body.
    signer: Option<Identity>,
}

impl Writer for CellchatWriter {
    fn write<'a>(&'a mut self, topic: &'a str, body: Vec<u8>) -> BoxFuture<'a, Result<()>> {
        async move {
            let Some(signer) = &self.signer else {
                self.client.send(topic, body).await?;
                return Ok(());
            };
            // What `Client::send_text` does, with the harness's body as the text, then one
            // reader's check of the acknowledged body.
            let text = String::from_utf8(body).context("bench bodies are ASCII")?;
            let (cluster, client_id) = (self.client.cluster_name(), self.client.client_id());
            let seq = self.client.next_client_seq();
            let signed = crypto::sign_plain(signer, cluster, topic, client_id, seq, &text)?;
            let sent = self
                .client
                .send_with_key(topic, signed.clone(), client_id, seq)
                .await?;
            let opened = crypto::open_message(
                &crypto::Keys::default(),
                cluster,
                topic,
                signer.name(),
                seq,
                Some(signer.public_key()),
                &signed,
            );
            if opened.author() != crypto::Author::Verified {
                bail!("message {} of {topic} did not verify", sent.seq);
            }
            Ok(())
        }
        .boxed()
    }
}

/// Each signing writer's public key by user name.
type WriterKeys = Arc<Mutex<HashMap<String, [u8; 32]>>>;

struct CellchatSubscriber {
    subscription: Subscription,
    /// `Some` for `cellchat-signed`: the writers' keys. Each body is verified under its
    /// sender's key, and its text, the stamped body, is what the scenario reads.
    verify: Option<WriterKeys>,
    /// Keeps the client's session (connections, refresher) alive.
    client: Client,
}

impl Subscriber for CellchatSubscriber {
    fn next(&mut self) -> BoxFuture<'_, Result<Vec<u8>>> {
        async move {
            match self.subscription.recv().await {
                Some(Ok(message)) => {
                    let Some(keys) = &self.verify else {
                        return Ok(message.body);
                    };
                    let key = keys
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get(&message.sender)
                        .copied();
                    let opened = crypto::open_message(
                        &crypto::Keys::default(),
                        self.client.cluster_name(),
                        &message.channel,
                        &message.sender,
                        message.client_seq,
                        key,
                        &message.body,
                    );
                    match opened.verified_text() {
                        Some(text) => Ok(text.as_bytes().to_vec()),
                        None => bail!(
                            "message {} of {} did not verify",
                            message.seq,
                            message.channel
                        ),
                    }
                }
                Some(Err(e)) => Err(e.into()),
                None => bail!("subscription ended"),
            }
        }
        .boxed()
    }
}

impl System for Cellchat {
    fn kind(&self) -> SystemKind {
        if self.signed {
            SystemKind::CellchatSigned
        } else if self.base {
            SystemKind::CellchatBase
        } else {
            SystemKind::Cellchat
        }
    }

    fn node_count(&self) -> usize {
        self.nodes
    }

    fn pids(&self) -> Vec<u32> {
        self.cluster
            .as_ref()
            .map(|c| {
                let cluster = c.lock().unwrap_or_else(PoisonError::into_inner);
                cluster
                    .nodes
                    .iter()
                    .filter_map(testkit::NodeProc::pid)
                    .collect()
            })
            .unwrap_or_default()
    }

    fn metrics_addrs(&self) -> Vec<SocketAddr> {
        self.node_procs()
            .into_iter()
            .filter_map(|(_, metrics)| metrics)
            .collect()
    }

    fn writer(&self, _index: usize) -> BoxFuture<'_, Result<Box<dyn Writer>>> {
        async move {
            let serial = self.writers_made.fetch_add(1, Ordering::Relaxed);
            let name = format!("b{:08x}-w{serial}", self.run_tag);
            let identity = Identity::ephemeral(name, None);
            let client =
                Client::connect(client_config(&self.target, Some(identity.clone()))).await?;
            if self.signed {
                self.writer_keys
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(identity.name().to_owned(), identity.public_key());
            }
            let signer = self.signed.then_some(identity);
            Ok(Box::new(CellchatWriter { client, signer }) as Box<dyn Writer>)
        }
        .boxed()
    }

    fn subscriber<'a>(
        &'a self,
        _index: usize,
        _node: usize,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn Subscriber>>> {
        // The client reads from the node it measures nearest; on loopback that spreads
        // subscribers over the nodes by their probe RTTs, not by `node`.
        async move {
            let reader = Some(self.reader.clone());
            let client = Client::connect(client_config(&self.target, reader)).await?;
            let head = client
                .channels()
                .await?
                .into_iter()
                .find(|c| c.name == topic)
                .map_or(0, |c| c.head);
            let subscription = client.subscribe(topic, head);
            let verify = self.signed.then(|| self.writer_keys.clone());
            Ok(Box::new(CellchatSubscriber {
                subscription,
                verify,
                client,
            }) as Box<dyn Subscriber>)
        }
        .boxed()
    }
}
