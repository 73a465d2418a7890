//! `Server`: one running cellchat node, wired from its parts.
//!
//! `Server::start` opens storage, binds the three listeners (Raft RPC, clients, HTTP metrics)
//! on ports that are kept across restarts, starts openraft, the proposer, discovery and the
//! formation loop, and returns a handle. The client listener serves both the tarpc `Chat`
//! service and push connections (`push.rs`), told apart by the TLS ALPN protocol. `wait_ready` resolves once the node can serve;
//! `shutdown` stops it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;

use proto::discovery::{DiscoverySocket, NodeAnnounce, PingSocket};
use proto::ChatServerTransport;
use tarpc::server::{BaseChannel, Channel};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::admin::Admin;
use crate::api::{ApiShared, BucketMap, ChatServer, Registrations, USER_BUCKETS_MAX};
use crate::backup::{self, Backups};
use crate::cluster::{self, LeaderContact, NodeAddrs, Peers};
use crate::config::Config;
use crate::conn_limit::{self, ConnGuard, ConnLimiter, ConnLimits};
use crate::conn_watch;
use crate::data_dir::{DataDir, DataDirError, STATE_DIR};
use crate::delivery::Delivery;
use crate::enroll::{self, EnrollFailed};
use crate::ephemeral::Ephemeral;
use crate::fd_limit;
use crate::formation::Formation;
use crate::handover::{self, DiskWatchdog, WriteGate};
use crate::join_secret;
use crate::log_store::{AckPolicy, LogStore, WAL_DIR};
use crate::metrics::{self, DiskPaths, Metrics, NodeInfo, StorageMetrics};
use crate::pki::{self, NodeTls, PkiError, Settled};
use crate::proposer::{Proposer, ProposerConfig};
use crate::push::{self, BatchCache};
use crate::raft::{start_raft, Raft};
use crate::raft_rpc::{self, Network, RaftRpcServer};
use crate::read_marks::ReadMarks;
use crate::reconcile;
use crate::search::Searcher;
use crate::snapshot_transfer::SnapshotReceiver;
use crate::state_machine::StateMachine;
use crate::types::NodeId;
use crate::web_forward::WebInbound;

/// Most concurrent requests on one client connection (each open long-poll holds one).
const CONN_REQUESTS_MAX: usize = 1024;
/// The Raft log's directory inside the data dir (the WAL itself sits in its `WAL_DIR`).
const LOG_DIR: &str = "log";

/// Why a node could not start. Each variant keeps its cause as `source`.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A setting is out of bounds.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A listener could not bind.
    #[error(
        "cannot listen for {what} on {addr}: {source}; pick another port or stop what uses it"
    )]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// Storage failed to open: which step, and why (corruption names file and offset).
    #[error("storage: {what}: {source}")]
    Storage {
        /// The step that failed.
        what: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// openraft failed to start.
    #[error("raft did not start: {0}")]
    Raft(#[source] openraft::error::Fatal<crate::types::TypeConfig>),
    /// The threads serving push connections could not start.
    #[error("cannot start the push threads: {0}")]
    Threads(#[source] std::io::Error),
    /// The data dir's identity (name, marker) could not be settled.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    /// The node's TLS identity could not be read or made.
    #[error("TLS identity: {0}")]
    Tls(#[from] PkiError),
    /// A node with `--token` could not enroll with the cluster.
    #[error(transparent)]
    Enroll(#[from] EnrollFailed),
    /// The node left its cluster with `server leave` and stays out.
    #[error(
        "node {name} (id {id}) has left the cluster ({marker}) and stays out; start it with \
         --rejoin to join again (its data is kept and brought up to date), or remove {dir}"
    )]
    Left {
        /// The node's name.
        name: String,
        /// The node's id.
        id: NodeId,
        /// What the marker says.
        marker: String,
        /// The data dir.
        dir: String,
    },
}

/// A storage step's error, named.
fn storage_error(what: &'static str) -> impl FnOnce(std::io::Error) -> ServerError {
    move |source| ServerError::Storage { what, source }
}

/// A running node.
pub struct Server {
    id: NodeId,
    name: String,
    addrs: NodeAddrs,
    /// The web client's URL, when the node serves it.
    web_url: Option<String>,
    left: Arc<tokio::sync::Notify>,
    raft: Raft,
    committed: Arc<std::sync::atomic::AtomicU64>,
    /// Closed at shutdown, so no new send starts while leadership is handed over.
    gate: WriteGate,
    tasks: Vec<JoinHandle<()>>,
    /// Runs every push connection.
    _push: SideRuntime,
    /// Answers RTT pings.
    _pings: SideRuntime,
    _data_dir: Arc<DataDir>,
}

/// A runtime of its own, apart from the one that runs Raft and the `Chat` RPCs; shut down in the
/// background when dropped with the server. Two exist, for work that would otherwise queue
/// behind Raft's or hold it up:
///
/// - Push connections (half the CPUs). One applied message wakes every subscription of its
///   channel at once. On a shared runtime those hundreds of socket writes queue ahead of the few
///   task hops that carry the sender's own answer (state machine task, Raft core, proposer, RPC
///   handler), so a send into a busy channel waited for the whole fan-out. With the fan-out on
///   its own threads the kernel schedules the two side by side, and an idle woken RPC thread
///   runs at once.
/// - RTT pings (one thread). Every client pings every node each probe interval, so pings
///   outnumber every other event on an idle node. On its own thread a ping wakes that thread
///   alone, where among the Raft runtime's workers it often woke two, and its answer waits for
///   neither Raft's work nor a fan-out: an RTT measures the network, not a queue.
struct SideRuntime(Option<tokio::runtime::Runtime>);

impl SideRuntime {
    fn start(name: &str, threads: usize) -> std::io::Result<SideRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name(name)
            .enable_all()
            .build()?;
        Ok(SideRuntime(Some(runtime)))
    }

    /// Half the CPUs, at least one thread: the other half stays for Raft, the log and RPCs.
    fn for_push() -> std::io::Result<SideRuntime> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        SideRuntime::start("cellchat-push", (cpus / 2).max(1))
    }

    /// One thread: a pong is a few microseconds of work.
    fn for_pings() -> std::io::Result<SideRuntime> {
        SideRuntime::start("cellchat-ping", 1)
    }

    fn handle(&self) -> tokio::runtime::Handle {
        self.0
            .as_ref()
            .expect("the runtime lives until drop")
            .handle()
            .clone()
    }
}

impl Drop for SideRuntime {
    fn drop(&mut self) {
        // A runtime dropped inside another one's task must not block on its workers.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Ports chosen at first start, kept in the data dir so the node's addresses in the cluster
/// membership stay valid across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ports {
    raft: u16,
    client: u16,
    metrics: u16,
    /// 0 when the node has never served the web client.
    web: u16,
}

const PORTS_FILE: &str = "ports";

fn load_ports(dir: &Path) -> Option<Ports> {
    let text = std::fs::read_to_string(dir.join(PORTS_FILE)).ok()?;
    let mut ports = Ports {
        raft: 0,
        client: 0,
        metrics: 0,
        web: 0,
    };
    for part in text.split_whitespace() {
        let (key, value) = part.split_once('=')?;
        let value: u16 = value.parse().ok()?;
        match key {
            "raft" => ports.raft = value,
            "client" => ports.client = value,
            "metrics" => ports.metrics = value,
            "web" => ports.web = value,
            _ => return None,
        }
    }
    Some(ports)
}

fn save_ports(dir: &Path, ports: Ports) -> std::io::Result<()> {
    let text = format!(
        "raft={} client={} metrics={} web={}\n",
        ports.raft, ports.client, ports.metrics, ports.web
    );
    crate::atomic_file::write_durably(&dir.join(PORTS_FILE), text.as_bytes())
}

/// Whether the web client on `ip` speaks TLS: always with a certificate of its own, and
/// otherwise everywhere but loopback, where plain HTTP never leaves the machine.
fn web_tls_wanted(config: &Config, ip: std::net::IpAddr) -> bool {
    let own_cert = config.web.as_ref().is_some_and(|web| web.cert.is_some());
    own_cert || !ip.is_loopback()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Stage 1: the log and the chat state, consistent with each other.
struct Storage {
    log: LogStore,
    state: StateMachine,
    metrics: StorageMetrics,
}

impl Storage {
    /// Opens the log and the state machine; `restored` (the node's id, name and addresses)
    /// seeds a restored state's Raft meta first (see `backup.rs`).
    async fn open(
        dir: &Path,
        config: &Config,
        restored: Option<(NodeId, &str, NodeAddrs)>,
    ) -> Result<Storage, ServerError> {
        let metrics = StorageMetrics::default();
        let (mut log, mut state) = open_storage(dir, config, &metrics)?;
        if let Some(node) = restored {
            backup::seed_restored(dir, &config.cluster, &state, node)
                .map_err(storage_error("seeding the restored state"))?;
        }
        // A log that lost synced entries may end before last applied; openraft would wedge on
        // it (see `reconcile.rs` for the case and why the repair is safe).
        reconcile::reconcile(&mut log, &mut state)
            .await
            .map_err(storage_error("reconciling the log with the state machine"))?;
        Ok(Storage {
            log,
            state,
            metrics,
        })
    }
}

/// Stage 2: the three listeners, on the ports kept in the data dir (or the flags').
struct Listeners {
    raft: raft_rpc::RaftListener,
    client: TcpListener,
    metrics: TcpListener,
    /// The web client's listener and its URL, unless the node serves none.
    web: Option<(TcpListener, String)>,
    /// Where the client listener is bound (the ping socket shares its address).
    client_local: SocketAddr,
    /// The addresses peers and clients are told.
    advertised: NodeAddrs,
}

impl Listeners {
    async fn bind(config: &Config, dir: &Path) -> Result<Listeners, ServerError> {
        let kept = load_ports(dir);
        let pick = |flag: u16, kept: Option<u16>| if flag != 0 { flag } else { kept.unwrap_or(0) };
        let at = |port| SocketAddr::new(config.bind_host, port);
        let bind_error = |what, addr| move |source| ServerError::Bind { what, addr, source };
        let raft_addr = at(pick(config.raft_port, kept.map(|p| p.raft)));
        let raft = raft_rpc::bind(raft_addr)
            .await
            .map_err(bind_error("raft rpc", raft_addr))?;
        let raft_local = raft
            .local_addr()
            .map_err(bind_error("raft rpc", raft_addr))?;
        let mut tcp = Vec::new();
        for (what, host, flag, kept) in [
            (
                "clients",
                config.bind_host,
                config.client_port,
                kept.map(|p| p.client),
            ),
            (
                "metrics",
                config.metrics_bind_host(),
                config.metrics_port,
                kept.map(|p| p.metrics),
            ),
        ] {
            let addr = SocketAddr::new(host, pick(flag, kept));
            let listener = TcpListener::bind(addr)
                .await
                .map_err(bind_error(what, addr))?;
            let local = listener.local_addr().map_err(bind_error(what, addr))?;
            tcp.push((listener, local));
        }
        let (metrics, metrics_local) = tcp.pop().expect("two listeners");
        let (client, client_local) = tcp.pop().expect("two listeners");
        let web = match &config.web {
            Some(web) => {
                let port = pick(web.addr.map_or(0, |a| a.port()), kept.map(|p| p.web));
                let addr = SocketAddr::new(web.addr.map_or(config.bind_host, |a| a.ip()), port);
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(bind_error("web", addr))?;
                let local = listener.local_addr().map_err(bind_error("web", addr))?;
                Some((listener, local))
            }
            None => None,
        };
        let ports = Ports {
            raft: raft_local.port(),
            client: client_local.port(),
            metrics: metrics_local.port(),
            web: web
                .as_ref()
                .map_or(kept.map_or(0, |p| p.web), |(_, l)| l.port()),
        };
        if kept != Some(ports) {
            save_ports(dir, ports).map_err(storage_error("saving the ports"))?;
        }
        let host = config.advertised_host();
        let web = web.map(|(listener, local)| {
            let host = if local.ip().is_unspecified() {
                host
            } else {
                local.ip()
            };
            let tls = web_tls_wanted(config, local.ip());
            (listener, crate::web::url_of(host, local.port(), tls))
        });
        Ok(Listeners {
            raft,
            client,
            metrics,
            web,
            client_local,
            advertised: NodeAddrs {
                raft: SocketAddr::new(host, ports.raft),
                client: SocketAddr::new(host, ports.client),
                metrics: SocketAddr::new(config.advertised_metrics_host(), ports.metrics),
            },
        })
    }
}

impl Server {
    /// Starts a node in `data_dir` (locked by the caller): settles its identity, opens storage,
    /// binds the listeners, then starts Raft and the services.
    ///
    /// # Errors
    /// [`ServerError`] naming what failed and what to do.
    pub async fn start(config: Config, mut data_dir: DataDir) -> Result<Server, ServerError> {
        config.validate().map_err(ServerError::Config)?;
        let name = data_dir.claim_name(config.name.as_deref())?;
        let rejoining = check_left(&data_dir, &name, config.rejoin)?;
        if config.weaken.any() {
            tracing::warn!(weaken = %config.weaken, "deliberately broken modes are on (test only)");
        }
        let (tls, enrolled) = settle_tls(&config, &data_dir).await?;
        let tls = Arc::new(tls);
        let limits = fd_limit::fit_caps_to_process(
            config.client_limits().map_err(ServerError::Config)?,
            config.raft_limits().map_err(ServerError::Config)?,
        );
        let restored = backup::pending(data_dir.path())
            .map_err(storage_error("reading the restore marker"))?
            .is_some();
        // A restored node's first membership records its addresses, so it binds before it
        // opens its storage; every other start opens storage first, as before.
        let (storage, listeners) = if restored {
            let listeners = Listeners::bind(&config, data_dir.path()).await?;
            let node = (data_dir.node_id(), name.as_str(), listeners.advertised);
            let storage = Storage::open(data_dir.path(), &config, Some(node)).await?;
            (storage, listeners)
        } else {
            let storage = Storage::open(data_dir.path(), &config, None).await?;
            (storage, Listeners::bind(&config, data_dir.path()).await?)
        };
        let parts = (data_dir, name, rejoining, enrolled);
        Self::start_services(config, parts, tls, storage, listeners, limits).await
    }

    /// Stage 3: Raft, the proposer, the RPC servers, discovery, formation and the watchdog.
    /// `limits` are the client and Raft listeners' connection caps.
    async fn start_services(
        config: Config,
        (data_dir, name, rejoining, enrolled): (DataDir, String, bool, bool),
        tls: Arc<NodeTls>,
        storage: Storage,
        listeners: Listeners,
        (client_limits, raft_limits): (ConnLimits, ConnLimits),
    ) -> Result<Server, ServerError> {
        let raft_config = Arc::new(config.raft_config().map_err(ServerError::Config)?);
        let id = data_dir.node_id();
        let dir = data_dir.path().to_path_buf();
        let addrs = listeners.advertised;
        let Storage {
            log: log_store,
            state: state_machine,
            metrics: storage_metrics,
        } = storage;
        let committed = log_store.committed_index();
        let sync_watch = log_store.sync_watch();
        #[cfg(feature = "weaken")]
        if config.weaken.stall_fsync {
            crate::weaken::spawn_stall_trigger(sync_watch.clone())
                .map_err(storage_error("installing the SIGUSR2 handler"))?;
        }
        let chat = state_machine.chat().clone();
        let delivery = Delivery::new(chat.applied_index().map_or(0, |i| i.0));
        let secret_changed = Arc::new(tokio::sync::Notify::new());
        let ephemeral = Ephemeral::new();
        let searcher = Searcher::new();
        chat.set_apply_listener({
            let (deliver, secret_changed) = (delivery.listener(), secret_changed.clone());
            let markers = ephemeral.clone();
            let index = searcher.clone();
            Box::new(move |event| {
                deliver(event);
                index.applied(event);
                markers.markers_moved(&event.markers);
                markers.channels_added(&event.added, event.index.0);
                if event.join_secret_changed {
                    secret_changed.notify_one();
                }
            })
        });
        let network = Network::new(tls.peer_client.clone()).timing_appends(
            storage_metrics.append_round_trip_seconds.clone(),
            storage_metrics.append_in_flight.clone(),
        );
        let append_handling = storage_metrics.append_handling_seconds.clone();
        let contacts = network.contacts();
        let gossip_network = network.clone();
        let web_network = network.clone();
        let snapshots = SnapshotReceiver::new(state_machine.clone());
        let backup_state = state_machine.clone();
        let archive_log = log_store.clone();
        let seed = rand::random();
        let raft = start_raft(id, raft_config, network, log_store, state_machine, seed)
            .await
            .map_err(ServerError::Raft)?;
        let node_info = NodeInfo {
            id,
            name: Some(name.clone()),
        };
        let disk_paths = DiskPaths {
            data: dir.clone(),
            wal: dir.join(LOG_DIR),
            state: dir.join(STATE_DIR),
        };
        let metrics = Arc::new(Metrics::new(
            committed.clone(),
            storage_metrics,
            node_info,
            disk_paths,
        ));
        ephemeral.count_into(metrics.users_online.clone(), metrics.typing_notes.clone());
        let gate = WriteGate::default();
        let proposer = Proposer::spawn(
            raft.clone(),
            ProposerConfig::default(),
            metrics.clone(),
            gate.clone(),
        );
        let read_marks = ReadMarks::spawn(raft.clone(), gate.clone());
        let peers = Peers::default();
        let shared = Arc::new(ApiShared {
            id,
            cluster: config.cluster.clone(),
            raft: raft.clone(),
            chat,
            searcher: searcher.clone(),
            delivery,
            proposer,
            read_marks,
            ephemeral: ephemeral.clone(),
            peers: peers.clone(),
            metrics: metrics.clone(),
            user_buckets: parking_lot::Mutex::new(BucketMap::new(
                f64::from(config.user_rate_per_s),
                config.user_burst,
                USER_BUCKETS_MAX,
            )),
            registrations: parking_lot::Mutex::new(Registrations::new(
                config.registration_limits(),
            )),
            conn_rate_per_s: config.conn_rate_per_s,
            conn_burst: config.conn_burst,
            client_idle_timeout: Duration::from_secs(config.client_idle_timeout_s),
            weaken: config.weaken,
        });

        let follow_secret = join_secret::follow(
            tls.clone(),
            shared.chat.clone(),
            config.cluster.clone(),
            secret_changed,
        );
        let ping_runtime = SideRuntime::for_pings().map_err(ServerError::Threads)?;
        let pings = {
            // Bound inside the ping runtime, so its socket's readiness wakes that runtime.
            let handle = ping_runtime.handle();
            let _inside = handle.enter();
            ping_responder(listeners.client_local, &config.cluster)
        };
        let push_runtime = SideRuntime::for_push().map_err(ServerError::Threads)?;
        let data_dir = Arc::new(data_dir);
        let admin = Arc::new(Admin {
            id,
            name: name.clone(),
            cluster: config.cluster.clone(),
            raft: raft.clone(),
            peers: peers.clone(),
            contacts,
            data_dir: data_dir.clone(),
            leaving: Default::default(),
            left: Default::default(),
            remove: {
                let tls = tls.clone();
                Arc::new(move |addr, leader, request| {
                    let (dialer, admin) = (tls.peer_client.clone(), tls.token().admin_credential());
                    Box::pin(async move {
                        raft_rpc::request_remove(&dialer, admin, addr, leader, request)
                            .await
                            .map_err(|e| e.to_string())
                    })
                })
            },
        });
        let (leaving, left) = (admin.leaving.clone(), admin.left.clone());
        let contact = LeaderContact::default();
        let backups = Backups::new(
            (id, name.clone(), config.cluster.clone()),
            raft.clone(),
            backup_state.clone(),
            shared.delivery.clone(),
        );
        let web_url = listeners.web.as_ref().map(|(_, url)| url.clone());
        let rpc_server = RaftRpcServer::new(
            id,
            &config.cluster,
            raft.clone(),
            (admin, backups, ephemeral.clone()),
            snapshots,
            contact.clone(),
            tls.clone(),
        )
        .with_web(Arc::new(WebInbound::new(shared.clone(), web_url.clone())))
        .timing_appends(append_handling);
        let web_task = match (listeners.web, &config.web) {
            (Some((listener, url)), Some(web_config)) => {
                let ip = listener
                    .local_addr()
                    .map_err(storage_error("the web address"))?
                    .ip();
                let tls = web_tls_wanted(&config, ip)
                    .then(|| {
                        let pem =
                            (web_config.cert.as_ref()).map(|(c, k)| (c.as_path(), k.as_path()));
                        tls.web_server(pem).map(Arc::new)
                    })
                    .transpose()
                    .map_err(ServerError::Config)?;
                let limits = ConnLimits::new(
                    web_config.connections_max,
                    web_config.connections_per_ip_max,
                )
                .map_err(ServerError::Config)?;
                let web = crate::web::Web::new(shared.clone(), web_network, url);
                Some(crate::web::serve(
                    listener,
                    tls,
                    web,
                    ConnLimiter::observed(limits, metrics.refusal_observer("web")),
                ))
            }
            _ => None,
        };
        let mut tasks = vec![
            raft_rpc::serve(
                listeners.raft,
                rpc_server,
                ConnLimiter::observed(raft_limits, metrics.refusal_observer("raft")),
            ),
            serve_clients(
                listeners.client,
                tls.client_server.clone(),
                shared.clone(),
                push_runtime.handle(),
                ConnLimiter::observed(client_limits, metrics.refusal_observer("client")),
            ),
            tokio::spawn(follow_secret),
            tokio::spawn(ephemeral.clone().run_presence()),
            tokio::spawn(searcher.clone().run(shared.chat.clone())),
            tokio::spawn(crate::search::count_into(
                searcher,
                metrics.search_messages.clone(),
                metrics.search_bytes.clone(),
            )),
            tokio::spawn(raft_rpc::gossip_ephemeral(
                id,
                ephemeral,
                raft.clone(),
                gossip_network,
            )),
            tokio::spawn(crate::retention::expire_loop(
                raft.clone(),
                shared.chat.clone(),
                Duration::from_millis(config.expire_interval_ms),
            )),
            tokio::spawn(metrics::count_leader_changes(
                metrics.clone(),
                raft.metrics(),
            )),
            metrics::serve(
                listeners.metrics,
                metrics,
                raft.clone(),
                config.metrics_token.clone(),
            ),
            tokio::spawn(
                DiskWatchdog {
                    raft: raft.clone(),
                    sync: sync_watch,
                    gate: gate.clone(),
                    threshold: Duration::from_millis(config.disk_stall_ms),
                }
                .run(),
            ),
        ];
        tasks.extend(web_task);
        if let Some(archive) = &config.archive {
            let archive = crate::archive::Archive::open(archive)
                .map_err(|e| ServerError::Config(e.to_string()))?;
            let uploader = crate::archive::Uploader {
                archive,
                identity: crate::archive::Identity::of(
                    &config.cluster,
                    tls.ca(),
                    crate::api::now_ms(),
                ),
                signer: crate::archive::Signer::new(tls.ca()).map_err(ServerError::Config)?,
                node: (id, name.clone()),
                raft: raft.clone(),
                log: archive_log,
                state: backup_state.clone(),
                interval: Duration::from_millis(config.archive_interval_ms),
                base_interval: Duration::from_secs(config.archive_base_interval_s),
                scratch: dir.join("archive-tmp"),
                archived: Default::default(),
            };
            tasks.push(tokio::spawn(uploader.run()));
        }
        if let Some(pings) = pings {
            let (raft, delivery) = (raft.clone(), shared.delivery.clone());
            let serving = cluster::serve_pings(pings, id, raft, delivery);
            tasks.push(ping_runtime.handle().spawn(serving));
        }
        // Discovery listens on the node's own interface only (see `DiscoverySocket::bind_on`),
        // and believes only announcements sealed by a member.
        let socket = DiscoverySocket::bind_on(
            config.bind_host,
            config.discovery_port,
            config.broadcast,
            config.cluster.clone(),
        )
        .map_err(|source| ServerError::Bind {
            what: "discovery",
            addr: SocketAddr::new(config.bind_host, config.discovery_port),
            source,
        })?
        .sealed_with(tls.discovery_key());
        let started_ms = now_ms();
        let announce_raft = raft.clone();
        let cluster_name = config.cluster.clone();
        let announce_name = name.clone();
        let announce = move || {
            cluster::self_announce(
                &announce_raft,
                &cluster_name,
                &announce_name,
                &addrs,
                started_ms,
            )
        };
        tasks.push(tokio::spawn(cluster::run_discovery(
            socket,
            announce,
            peers.clone(),
            config.join.clone(),
        )));
        let formation = Formation {
            raft: raft.clone(),
            cluster: config.cluster.clone(),
            member: addrs.member(&name),
            peers,
            window: config.formation_window(),
            bootstrap_expect: config.bootstrap_expect,
            enrolled,
            max_voters: config.max_voters,
            election_timeout_max: Duration::from_millis(config.election_timeout_ms_max),
            leaving,
            rejoining,
            contact,
            join: {
                let dialer = tls.peer_client.clone();
                Arc::new(move |leader: NodeAnnounce, request| {
                    let dialer = dialer.clone();
                    Box::pin(async move {
                        raft_rpc::request_join(&dialer, leader.raft_addr, leader.node_id, request)
                            .await
                            .map_err(|e| e.to_string())
                    })
                })
            },
        };
        tasks.push(tokio::spawn(formation.run()));
        let web = web_url.as_deref().unwrap_or("none");
        tracing::info!(node = id, name = %name, raft = %addrs.raft, client = %addrs.client, metrics = %addrs.metrics, web, "node started");
        Ok(Server {
            id,
            name,
            addrs,
            web_url,
            left,
            raft,
            committed,
            gate,
            tasks,
            _push: push_runtime,
            _pings: ping_runtime,
            _data_dir: data_dir,
        })
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The web client's URL (`http://` only on loopback), when the node serves it.
    pub fn web_url(&self) -> Option<&str> {
        self.web_url.as_deref()
    }

    /// Resolves once this node has left the cluster (`server leave`); the caller then stops
    /// it with [`Server::shutdown`].
    pub async fn left(&self) {
        self.left.notified().await;
        // The leave RPC's answer is written by its own task; give it a moment to reach the
        // caller before the process stops.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    /// This node's advertised addresses.
    pub fn addrs(&self) -> NodeAddrs {
        self.addrs
    }

    /// This node's Raft handle.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Waits until the node knows a leader and has applied everything it knows is committed.
    pub async fn wait_ready(&self) {
        use openraft::async_runtime::WatchReceiver;
        let mut rx = self.raft.metrics();
        loop {
            if metrics::is_ready(
                &self.raft,
                self.committed.load(std::sync::atomic::Ordering::Relaxed),
            ) {
                return;
            }
            // Re-check on every metrics change, and at least every 100 ms (the committed index
            // lives outside openraft's metrics).
            let _changed = tokio::time::timeout(Duration::from_millis(100), rx.changed()).await;
        }
    }

    /// Stops the node in order: new sends are refused (clients retry on the next leader),
    /// leadership goes to the most caught-up voter, Raft stops (sends in flight get their
    /// answer or a retryable error), then the remaining tasks. The data dir lock is released
    /// when the `Server` is dropped.
    pub async fn shutdown(self) {
        self.gate.close();
        handover::hand_over(&self.raft).await;
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown reported an error");
        }
        for task in &self.tasks {
            task.abort();
        }
        tracing::info!(node = self.id, "node stopped");
    }
}

/// Refuses to start a node that left its cluster, unless `rejoin` clears its marker.
/// Returns whether it did (the node then rejoins; `--rejoin` without a marker changes nothing).
fn check_left(data_dir: &DataDir, name: &str, rejoin: bool) -> Result<bool, ServerError> {
    let Some(marker) = data_dir.left()? else {
        return Ok(false);
    };
    if rejoin {
        data_dir.clear_left()?;
        tracing::info!(
            name,
            "--rejoin: cleared the LEFT marker; joining the cluster again"
        );
        return Ok(true);
    }
    Err(ServerError::Left {
        name: name.to_owned(),
        id: data_dir.node_id(),
        marker,
        dir: data_dir.path().display().to_string(),
    })
}

/// Opens the log and the chat state machine in the data dir. With the `weaken` feature and
/// mode `faulty-fs`, the log runs on raft-log's `FaultyFs` and SIGUSR1 simulates a power
/// failure (see `weaken.rs`); `ack-before-fsync` changes when appends are acknowledged.
fn open_storage(
    dir: &Path,
    config: &Config,
    metrics: &StorageMetrics,
) -> Result<(LogStore, StateMachine), ServerError> {
    let weaken = config.weaken;
    let mut wal_config = raft_log::Config::new(dir.join(LOG_DIR).join(WAL_DIR));
    wal_config.segment_bytes_max = config.wal_segment_mib << 20;
    // A server's log lives long: zero-fill its first segment now instead of paying the
    // file-growing fdatasync for the first segment's worth of entries.
    wal_config.prepare_first_segment = true;
    wal_config.fsync_observer = Some(metrics.fsync_observer());
    let log_dir = dir.join(LOG_DIR);
    let sm_dir = dir.join(STATE_DIR);
    let ack = if weaken.ack_before_fsync {
        tracing::warn!("weaken: log appends are acknowledged before fsync (ack-before-fsync)");
        AckPolicy::BeforeFsync
    } else {
        AckPolicy::AfterFsync
    };
    #[cfg(feature = "weaken")]
    crate::weaken::power::roll_back_if_power_failed(&sm_dir, dir).map_err(|e| {
        storage_error("rolling back after a simulated power failure")(std::io::Error::other(e))
    })?;
    let log_store = if weaken.faulty_fs {
        open_faulty_log(dir, &log_dir, wal_config, ack)?
    } else {
        let wal = raft_log::Wal::open(wal_config)
            .map_err(|e| storage_error("opening the raft log")(std::io::Error::other(e)))?;
        LogStore::from_wal_acking(wal, log_dir, ack)
            .map_err(storage_error("opening the raft log"))?
    };
    let state_machine = StateMachine::open_with(&sm_dir, config.ring_bytes_max)
        .map_err(storage_error("opening the chat state"))?
        .with_metrics(metrics.clone());
    Ok((log_store, state_machine))
}

#[cfg(feature = "weaken")]
fn open_faulty_log(
    dir: &Path,
    log_dir: &Path,
    wal_config: raft_log::Config,
    ack: AckPolicy,
) -> Result<LogStore, ServerError> {
    tracing::warn!("weaken: the raft log runs on FaultyFs; SIGUSR1 simulates a power failure");
    let fs = Arc::new(raft_log::FaultyFs::new());
    let wal = raft_log::Wal::open_with_fs(wal_config, fs.clone())
        .map_err(|e| storage_error("opening the raft log")(std::io::Error::other(e)))?;
    crate::weaken::power::spawn_trigger(fs, dir)
        .map_err(storage_error("installing the SIGUSR1 handler"))?;
    LogStore::from_wal_acking(wal, log_dir.to_path_buf(), ack)
        .map_err(storage_error("opening the raft log"))
}

/// Without the feature `Config::validate` refuses every weaken mode before this is reached.
#[cfg(not(feature = "weaken"))]
fn open_faulty_log(
    _: &Path,
    _: &Path,
    _: raft_log::Config,
    _: AckPolicy,
) -> Result<LogStore, ServerError> {
    Err(ServerError::Config(
        "weaken mode faulty-fs needs the cargo feature `weaken`".into(),
    ))
}

/// The UDP socket on the client listener's address that answers clients' RTT pings, or `None`
/// with a warning when that UDP port is taken: the node still serves, and clients measure it
/// over TCP instead (their fallback for nodes that never answer UDP).
fn ping_responder(client_addr: SocketAddr, cluster: &str) -> Option<PingSocket> {
    match PingSocket::bind(client_addr, cluster) {
        Ok(socket) => Some(socket),
        Err(e) => {
            tracing::warn!(addr = %client_addr, error = %e,
                "cannot bind the UDP ping socket; clients will measure this node over TCP");
            None
        }
    }
}

/// Accepts client connections; each runs its TLS handshake in its own task and is routed by
/// the ALPN protocol it agreed on: push connections to the push server (on `push`, the
/// [`SideRuntime`]), chat connections to the tarpc `Chat` service. Connections beyond
/// `limiter`'s caps are closed at once.
fn serve_clients(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shared: Arc<ApiShared>,
    push: tokio::runtime::Handle,
    limiter: ConnLimiter,
) -> JoinHandle<()> {
    let cache = Arc::new(BatchCache::default());
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "client accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(guard) = limiter.admit(peer, stream.local_addr().ok(), "client") else {
                continue;
            };
            let (tls, shared, cache, push) =
                (tls.clone(), shared.clone(), cache.clone(), push.clone());
            tokio::spawn(async move {
                if let Err(e) = route_client(stream, peer, tls, shared, cache, push, guard).await {
                    tracing::debug!(%peer, error = %e, "client connection setup failed");
                }
            });
        }
    })
}

/// Runs the TLS handshake on a new client connection and starts the task that serves it, as
/// push (on `push`) or as tarpc. `guard` counts the connection against the listener's caps
/// until it ends.
async fn route_client(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    shared: Arc<ApiShared>,
    cache: Arc<BatchCache>,
    push: tokio::runtime::Handle,
    guard: ConnGuard,
) -> std::io::Result<()> {
    let local = stream.local_addr().ok().map(|addr| addr.ip());
    let source = conn_limit::addr_key(peer.ip(), local);
    let mut stream = proto::accept_tls(stream, tls).await?;
    let binding = proto::tls::stream_binding(&stream).map_err(std::io::Error::other)?;
    if proto::alpn(&stream) == Some(proto::tls::ALPN_PUSH) {
        let mut magic = [0u8; 4];
        tokio::time::timeout(proto::HANDSHAKE_TIMEOUT, stream.read_exact(&mut magic))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no push magic"))??;
        if magic != proto::push::PUSH_MAGIC {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "a push connection must start with the push magic",
            ));
        }
        let halves = {
            let _on_push = push.enter();
            register_here(stream.get_mut().0)?;
            tokio::io::split(stream)
        };
        push.spawn(push::serve_connection(
            shared, cache, halves, peer, binding, guard,
        ));
        return Ok(());
    }
    tokio::spawn(chat_connection(
        stream, shared, binding, source, peer, guard,
    ));
    Ok(())
}

/// The task that serves one chat connection after its handshake: tarpc's `Chat` service under
/// the connection's watchdog (see [`conn_watch`]), holding `guard` until the connection ends.
///
/// The serving state is boxed and the task starts here, apart from the handshake's: an async
/// block keeps what it captures beside what it moves it into, so an idle connection would
/// otherwise hold its serving state two or three times over for as long as it is open.
fn chat_connection(
    stream: proto::TlsTcp,
    shared: Arc<ApiShared>,
    binding: [u8; 32],
    source: Option<conn_limit::AddrKey>,
    peer: SocketAddr,
    guard: ConnGuard,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let transport: ChatServerTransport =
        proto::framed_reading_at_most(stream, proto::CHAT_REQUEST_BYTES_MAX);
    let server = ChatServer::new(shared, binding, source);
    let watch = server.watch();
    let serving = Box::pin(
        BaseChannel::with_defaults(transport)
            .max_concurrent_requests(CONN_REQUESTS_MAX)
            .execute(proto::Chat::serve(server))
            // A connection's requests run inside its own task rather than one spawned task
            // each: a spawn, its scheduling and its wake-ups cost more than most handlers, and
            // the channel already bounds how many run at once. Each still runs concurrently,
            // so an open long poll never holds up the connection's other calls.
            .for_each_concurrent(None, |response| response),
    );
    async move {
        conn_watch::serve_watched(watch, peer, serving).await;
        drop(guard);
    }
}

/// Moves `socket` to the I/O driver of the runtime this runs on (or has entered).
///
/// A connection accepted on the Raft runtime stays registered with that runtime's driver even
/// when its task runs elsewhere, so each of a push connection's reads would wake a Raft thread
/// just to wake the push thread. The socket is duplicated, the copy registered here and put in
/// the original's place, and the original deregistered (by `into_std`) before it is closed.
fn register_here(socket: &mut TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsFd;
    let copy = std::net::TcpStream::from(socket.as_fd().try_clone_to_owned()?);
    let original = std::mem::replace(socket, TcpStream::from_std(copy)?);
    drop(original.into_std()?);
    Ok(())
}

/// Settles the node's TLS identity: its own files, an enrollment with `--token`, or the
/// cluster directory shared on this machine (see `pki.rs`). True when it enrolled now.
async fn settle_tls(config: &Config, data_dir: &DataDir) -> Result<(NodeTls, bool), ServerError> {
    let id = data_dir.node_id();
    match pki::settle(data_dir.path(), &config.cluster, id, config.token.as_ref())? {
        Settled::Ready(tls) => Ok((tls, false)),
        Settled::Enroll { token, key } => {
            tracing::info!(ca = %token.ca, "enrolling with the cluster named by the token");
            Ok((
                enroll::enroll(config, data_dir.path(), id, token, key).await?,
                true,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};

    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    /// The size of what `f` returns, without calling it.
    fn returned_size<A, F: FnOnce(A) -> Fut, Fut>(_: F) -> usize {
        std::mem::size_of::<Fut>()
    }

    /// An idle client's connections are most of what it costs a node, and each lives in a task
    /// as large as its future for as long as it is open: a chat connection's task holds its
    /// boxed serving state once, a push connection's its stream's halves, not whole copies.
    #[test]
    fn an_open_connection_task_holds_its_state_once() {
        let chat = returned_size(
            |(stream, shared, source, peer, guard): (
                proto::TlsTcp,
                Arc<ApiShared>,
                Option<conn_limit::AddrKey>,
                SocketAddr,
                ConnGuard,
            )| chat_connection(stream, shared, [0; 32], source, peer, guard),
        );
        assert!(chat <= 1_024, "a chat connection's task is {chat} bytes");
        type Halves = (ReadHalf<proto::TlsTcp>, WriteHalf<proto::TlsTcp>);
        let push = returned_size(
            |(shared, cache, halves, peer, guard): (
                Arc<ApiShared>,
                Arc<BatchCache>,
                Halves,
                SocketAddr,
                ConnGuard,
            )| push::serve_connection(shared, cache, halves, peer, [0; 32], guard),
        );
        assert!(push <= 2_048, "a push connection's task is {push} bytes");
    }

    /// Once moved, the socket no longer needs the runtime that accepted it: it still reads and
    /// writes after that runtime (and its driver) is gone, which it cannot while registered
    /// there.
    #[test]
    fn a_moved_socket_outlives_the_runtime_that_accepted_it() {
        let (accepting, serving) = (runtime(), runtime());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let mut socket = accepting.block_on(async {
            listener.set_nonblocking(true).unwrap();
            let listener = TcpListener::from_std(listener).unwrap();
            listener.accept().await.unwrap().0
        });
        serving
            .block_on(async { register_here(&mut socket) })
            .unwrap();
        drop(accepting);

        serving.block_on(async {
            socket.write_all(b"out").await.unwrap();
            let mut heard = [0u8; 3];
            peer.read_exact(&mut heard).unwrap();
            assert_eq!(&heard, b"out");
            peer.write_all(b"in!").unwrap();
            socket.read_exact(&mut heard).await.unwrap();
            assert_eq!(&heard, b"in!");
        });
    }
}
