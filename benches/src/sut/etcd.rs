//! etcd 3.4 under test (Debian package `etcd-server`): a 3-node cluster on loopback with its
//! durable defaults, data in a temp dir. `write` is a Put, `fanout` a prefix watch.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use etcd_client::{Client, EventType, WatchOptions, WatchStream, Watcher};
use futures::future::BoxFuture;
use futures::FutureExt;

use super::procs::{find_binary, free_tcp_port, ProcGroup};
use super::{PeerPaths, Subscriber, System, SystemKind, Writer};

/// An etcd cluster the harness started.
pub struct Etcd {
    procs: ProcGroup,
    clients: Vec<SocketAddr>,
}

impl Etcd {
    /// Starts `nodes` etcd members on loopback and waits until each serves requests.
    ///
    /// # Errors
    /// `etcd` is not installed (the message says how to install it), or a member did not start.
    pub async fn start(nodes: usize, paths: &PeerPaths) -> Result<Self> {
        let binary = find_binary("etcd", paths.etcd.as_deref(), &[]).context(
            "etcd not found: install it with `apt-get install -y etcd-server` (Debian) or pass --etcd-bin",
        )?;
        let mut procs = ProcGroup::new("etcd")?;
        let mut clients = Vec::new();
        let mut peers = Vec::new();
        for _ in 0..nodes {
            clients.push(SocketAddr::from(([127, 0, 0, 1], free_tcp_port()?)));
            peers.push(SocketAddr::from(([127, 0, 0, 1], free_tcp_port()?)));
        }
        let initial: Vec<String> = peers
            .iter()
            .enumerate()
            .map(|(i, p)| format!("e{i}=http://{p}"))
            .collect();
        let initial = initial.join(",");
        for i in 0..nodes {
            let mut command = Command::new(&binary);
            command
                .args(["--name", &format!("e{i}")])
                .arg("--data-dir")
                .arg(procs.dir.path().join(format!("e{i}")))
                .args(["--listen-client-urls", &format!("http://{}", clients[i])])
                .args(["--advertise-client-urls", &format!("http://{}", clients[i])])
                .args(["--listen-peer-urls", &format!("http://{}", peers[i])])
                .args([
                    "--initial-advertise-peer-urls",
                    &format!("http://{}", peers[i]),
                ])
                .args(["--initial-cluster", &initial])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "cellchat-bench"])
                .args(["--log-level", "warn"]);
            procs.spawn(&format!("e{i}"), command)?;
        }
        procs.wait_listening(&clients, Duration::from_secs(30))?;
        let etcd = Self { procs, clients };
        // Listening is not serving: wait for a leader by writing once.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut client = etcd.connect(0).await?;
        loop {
            match client.put("bench/ready", "1", None).await {
                Ok(_) => break,
                Err(e) if tokio::time::Instant::now() > deadline => {
                    bail!(
                        "etcd did not accept a write: {e}; {}",
                        etcd.procs.log_tails()
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        Ok(etcd)
    }

    async fn connect(&self, node: usize) -> Result<Client> {
        let endpoint = format!("http://{}", self.clients[node % self.clients.len()]);
        Client::connect([endpoint], None)
            .await
            .context("connecting to etcd")
    }
}

struct EtcdWriter {
    client: Client,
    next: u64,
    index: usize,
}

impl Writer for EtcdWriter {
    fn write<'a>(&'a mut self, topic: &'a str, body: Vec<u8>) -> BoxFuture<'a, Result<()>> {
        async move {
            // Keys cycle per writer so the keyspace stays bounded over long runs, as etcd's own
            // benchmark tool does with its key space size.
            let key = format!("{topic}/{}/{}", self.index, self.next % 1000);
            self.next += 1;
            self.client.put(key, body, None).await?;
            Ok(())
        }
        .boxed()
    }
}

struct EtcdSubscriber {
    stream: WatchStream,
    pending: std::collections::VecDeque<Vec<u8>>,
    _watcher: Watcher,
}

impl Subscriber for EtcdSubscriber {
    fn next(&mut self) -> BoxFuture<'_, Result<Vec<u8>>> {
        async move {
            loop {
                if let Some(body) = self.pending.pop_front() {
                    return Ok(body);
                }
                let response = self
                    .stream
                    .message()
                    .await?
                    .context("etcd closed the watch")?;
                if response.canceled() {
                    bail!("etcd canceled the watch: {}", response.cancel_reason());
                }
                for event in response.events() {
                    if event.event_type() == EventType::Put {
                        if let Some(kv) = event.kv() {
                            self.pending.push_back(kv.value().to_vec());
                        }
                    }
                }
            }
        }
        .boxed()
    }
}

impl System for Etcd {
    fn kind(&self) -> SystemKind {
        SystemKind::Etcd
    }

    fn node_count(&self) -> usize {
        self.clients.len()
    }

    fn pids(&self) -> Vec<u32> {
        self.procs.pids()
    }

    fn writer(&self, index: usize) -> BoxFuture<'_, Result<Box<dyn Writer>>> {
        async move {
            // Writers spread over the members like etcd's benchmark tool; followers forward
            // to the leader.
            let client = self.connect(index).await?;
            Ok(Box::new(EtcdWriter {
                client,
                next: 0,
                index,
            }) as Box<dyn Writer>)
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
            let mut client = self.connect(node).await?;
            let (watcher, stream) = client
                .watch(format!("{topic}/"), Some(WatchOptions::new().with_prefix()))
                .await?;
            Ok(Box::new(EtcdSubscriber {
                stream,
                pending: std::collections::VecDeque::new(),
                _watcher: watcher,
            }) as Box<dyn Subscriber>)
        }
        .boxed()
    }
}
