//! `Config`: everything a node needs to run, with units, defaults and bounds.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::api::RegistrationLimits;
use crate::conn_limit::ConnLimits;

use crate::metrics::MetricsToken;
use crate::weaken::Weaken;

/// A node's configuration. Build with [`Config::new`] and adjust fields; [`Config::validate`]
/// checks the bounds.
#[derive(Debug, Clone)]
pub struct Config {
    /// The node's data directory (already locked by the caller through `DataDir`).
    pub data_dir: PathBuf,
    /// Cluster name; nodes and clients of other clusters are ignored. Default `cellchat`;
    /// 1 to 64 characters.
    pub cluster: String,
    /// Address the three listeners bind to. Default 127.0.0.1.
    pub bind_host: IpAddr,
    /// Address other nodes and clients are told to use; default: `bind_host`, or 127.0.0.1
    /// when binding to an unspecified address.
    pub advertise_host: Option<IpAddr>,
    /// Raft RPC port; 0 picks a free port at first start, which is then kept across restarts.
    pub raft_port: u16,
    /// Client (chat) RPC port; 0 as for `raft_port`.
    pub client_port: u16,
    /// HTTP metrics port; 0 as for `raft_port`.
    pub metrics_port: u16,
    /// UDP port every node of the machine shares for discovery. Default 7946.
    pub discovery_port: u16,
    /// Where announcements are broadcast. Default 127.255.255.255 (this machine only).
    pub broadcast: Ipv4Addr,
    /// Discovery addresses (`host:port`) of nodes that broadcast cannot reach.
    pub join: Vec<SocketAddr>,
    /// Most voters; further nodes stay learners. Default 5; 1 to 9.
    pub max_voters: usize,
    /// Wait for this many fresh nodes before bootstrapping them together as voters. `None`
    /// (default): the lowest-id fresh node bootstraps alone once the formation window passes.
    pub bootstrap_expect: Option<usize>,
    /// How long a fresh node listens for others before deciding to bootstrap or join, in ms.
    /// Default 1500; 100 to 60000.
    pub formation_window_ms: u64,
    /// Leader heartbeat period in ms; also openraft's AppendEntries timeout. Default 30.
    pub heartbeat_ms: u64,
    /// Election timeout lower bound in ms. Default 120; more than `heartbeat_ms`.
    pub election_timeout_ms_min: u64,
    /// Election timeout upper bound in ms. Default 240; more than the lower bound. openraft
    /// also uses it as the leader lease: a follower refuses votes for this long after the
    /// leader's last heartbeat.
    pub election_timeout_ms_max: u64,
    /// A Raft log fsync running this long (ms) counts as a stalled disk: the node refuses
    /// writes and elections and, when leading, hands leadership over until it returns
    /// (`handover.rs`). Default 500; 50 to 60000.
    pub disk_stall_ms: u64,
    /// How often the leader proposes an expiry when retention or old dedup records call for
    /// one (see `retention.rs`), in ms. Default 10000; 100 to 3600000.
    pub expire_interval_ms: u64,
    /// The continuous archive (`archive.rs`): where the leader uploads committed entries.
    /// `None`: no archive.
    pub archive: Option<crate::archive::ArchiveConfig>,
    /// How often the leader seals the entries committed since its last chunk, in ms. Default
    /// 1000; 100 to 3600000.
    pub archive_interval_ms: u64,
    /// How often the leader cuts a new archive base, in seconds. Default 86400 (a day); 1 to
    /// 31536000.
    pub archive_base_interval_s: u64,
    /// Build a snapshot after this many applied entries. Default 10000; at least 2.
    pub snapshot_every_entries: u64,
    /// Entries kept in the log after a snapshot, so briefly lagging followers need no
    /// snapshot. Default 1000.
    pub log_keep_entries: u64,
    /// Size of one Raft log segment file in MiB; segments are preallocated with zeros (a
    /// fresh node zero-fills its first one at start). Default 64; 1 to 1024. Test clusters
    /// use small ones, so dozens of nodes do not write gigabytes of zeros.
    pub wal_segment_mib: u64,
    /// Sends allowed per second per user, sustained. Default 50; at least 1.
    pub user_rate_per_s: u32,
    /// Burst of sends a user may make at once. Default 200; at least 1.
    pub user_burst: u32,
    /// Requests allowed per second per connection, sustained. Default 500; at least 1.
    pub conn_rate_per_s: u32,
    /// Burst of requests per connection. Default 1000; at least 1.
    pub conn_burst: u32,
    /// Registrations (a new name's first send) allowed per minute from one source address
    /// (IPv6: one /64), sustained; connections from this machine are exempt, as from
    /// `client_connections_per_ip_max`. Anyone can make new names, and each registered one is
    /// kept by every replica for good. Default 5; 1 to 1000000.
    pub registration_ip_rate_per_min: u32,
    /// Burst of registrations from one source address. Default 10; 1 to 1000000.
    pub registration_ip_burst: u32,
    /// Registrations allowed per minute from all remote sources together, sustained, so that
    /// many addresses cannot add up to an unbounded rate. Default 60; 1 to 1000000.
    pub registration_node_rate_per_min: u32,
    /// Burst of registrations from all remote sources together. Default 60; 1 to 1000000.
    pub registration_node_burst: u32,
    /// Memory budget of the chat state's in-memory rings of recent messages, all channels
    /// together, in bytes (`chat_sm::Config::ring_bytes_max`): past it, the least recently
    /// used channels are read from RocksDB instead. Default 256 MiB; 64 KiB to 1 TiB.
    pub ring_bytes_max: usize,
    /// Most open client connections, tarpc and push together. Default 20000; 1 to 1000000.
    /// Lowered at start, with a warning, when the process's open-file limit cannot hold it
    /// beside storage's reserve (`fd_limit.rs`).
    pub client_connections_max: usize,
    /// Most open client connections from one address (IPv6: one /64); connections from this
    /// machine are exempt (`conn_limit.rs`). Default 256; 1 to `client_connections_max`.
    pub client_connections_per_ip_max: usize,
    /// Most open Raft RPC connections (two per peer, plus short admin calls). Default 1024; 1
    /// to 100000. Lowered at start as `client_connections_max` is.
    pub raft_connections_max: usize,
    /// Most open Raft RPC connections from one address, exempt as for clients. Default 64; 1
    /// to `raft_connections_max`.
    pub raft_connections_per_ip_max: usize,
    /// A client RPC connection with no request in flight for this long is closed, in seconds
    /// (an open long poll is a request in flight). Default 600; 1 to 86400.
    pub client_idle_timeout_s: u64,
    /// Address the metrics listener binds to; default `bind_host`.
    pub metrics_host: Option<IpAddr>,
    /// Bearer token that `GET /metrics` requires (`Authorization: Bearer TOKEN`); default
    /// none, so `/metrics` is open to whoever reaches `metrics_host`.
    pub metrics_token: Option<MetricsToken>,
    /// Deliberately broken modes for the fault-injection harness; default none. Any mode needs
    /// the cargo feature `weaken` (see `weaken.rs`).
    pub weaken: Weaken,
    /// This node's name at its first start (see `name.rs`); `None` picks a default from the
    /// data dir. A later start must name the same node or leave it out.
    pub name: Option<String>,
    /// Clear the `LEFT` marker of a node that left with `server leave` and join again.
    /// Default false: a node that left stays out. Without a marker it changes nothing.
    pub rejoin: bool,
    /// The join token of the cluster to join from another machine (`--token`); `None` uses
    /// the node's own TLS identity or the cluster directory next to its data dir.
    pub token: Option<proto::tls::JoinToken>,
    /// The web client (`web.rs`); `None` serves none.
    pub web: Option<WebConfig>,
}

/// Where and how a node serves the web client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebConfig {
    /// Address to bind; `None`: `bind_host` on a port picked at first start and then kept.
    pub addr: Option<SocketAddr>,
    /// A PEM certificate chain and key browsers trust (`--web-cert`, `--web-key`). Without
    /// them a loopback address serves plain HTTP and any other the node's cluster
    /// certificate, which browsers trust only once the cluster CA is imported.
    pub cert: Option<(PathBuf, PathBuf)>,
    /// Most open web connections in all; default 4096.
    pub connections_max: usize,
    /// Most open web connections from one address (this machine exempt); default 64.
    pub connections_per_ip_max: usize,
}

impl WebConfig {
    /// The defaults: a kept port on `bind_host`, no certificate of its own.
    pub fn new() -> WebConfig {
        WebConfig {
            addr: None,
            cert: None,
            connections_max: 4096,
            connections_per_ip_max: 64,
        }
    }
}

impl Config {
    /// Defaults for a node keeping its data in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            data_dir: data_dir.into(),
            cluster: "cellchat".into(),
            bind_host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            advertise_host: None,
            raft_port: 0,
            client_port: 0,
            metrics_port: 0,
            discovery_port: proto::discovery::DEFAULT_DISCOVERY_PORT,
            broadcast: proto::discovery::DEFAULT_BROADCAST,
            join: Vec::new(),
            max_voters: 5,
            bootstrap_expect: None,
            formation_window_ms: 1500,
            heartbeat_ms: 30,
            election_timeout_ms_min: 120,
            election_timeout_ms_max: 240,
            disk_stall_ms: 500,
            expire_interval_ms: 10_000,
            archive: None,
            archive_interval_ms: 1000,
            archive_base_interval_s: 86_400,
            snapshot_every_entries: 10_000,
            log_keep_entries: 1000,
            wal_segment_mib: 64,
            user_rate_per_s: 50,
            user_burst: 200,
            conn_rate_per_s: 500,
            conn_burst: 1000,
            registration_ip_rate_per_min: 5,
            registration_ip_burst: 10,
            registration_node_rate_per_min: 60,
            registration_node_burst: 60,
            ring_bytes_max: chat_sm::RING_BYTES_MAX_DEFAULT,
            client_connections_max: 20_000,
            client_connections_per_ip_max: 256,
            raft_connections_max: 1024,
            raft_connections_per_ip_max: 64,
            client_idle_timeout_s: 600,
            metrics_host: None,
            metrics_token: None,
            weaken: Weaken::default(),
            name: None,
            rejoin: false,
            token: None,
            web: Some(WebConfig::new()),
        }
    }

    /// Checks every bound stated on the fields.
    ///
    /// # Errors
    /// A sentence naming the field, its value and the allowed range.
    pub fn validate(&self) -> Result<(), String> {
        let name_ok = !self.cluster.is_empty()
            && self.cluster.len() <= 64
            && self
                .cluster
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
        if !name_ok {
            return Err(format!(
                "cluster name {:?} must be 1 to 64 characters from a-z, A-Z, 0-9, '-', '_', '.'",
                self.cluster
            ));
        }
        if !(1..=9).contains(&self.max_voters) {
            return Err(format!("max voters {} must be 1 to 9", self.max_voters));
        }
        if let Some(n) = self.bootstrap_expect {
            if n == 0 || n > self.max_voters {
                return Err(format!(
                    "bootstrap-expect {n} must be 1 to max-voters ({})",
                    self.max_voters
                ));
            }
        }
        if !(100..=60_000).contains(&self.formation_window_ms) {
            return Err(format!(
                "formation window {} ms must be 100 to 60000",
                self.formation_window_ms
            ));
        }
        if self.heartbeat_ms == 0
            || self.election_timeout_ms_min <= self.heartbeat_ms
            || self.election_timeout_ms_max <= self.election_timeout_ms_min
        {
            return Err(format!(
                "need 0 < heartbeat ({}) < election timeout min ({}) < max ({}), in ms",
                self.heartbeat_ms, self.election_timeout_ms_min, self.election_timeout_ms_max
            ));
        }
        if !(1..=1024).contains(&self.wal_segment_mib) {
            return Err(format!(
                "wal segment size {} MiB must be 1 to 1024",
                self.wal_segment_mib
            ));
        }
        if !(50..=60_000).contains(&self.disk_stall_ms) {
            return Err(format!(
                "disk stall threshold {} ms must be 50 to 60000",
                self.disk_stall_ms
            ));
        }
        if !(100..=3_600_000).contains(&self.expire_interval_ms) {
            return Err(format!(
                "expire interval {} ms must be 100 to 3600000",
                self.expire_interval_ms
            ));
        }
        if !(100..=3_600_000).contains(&self.archive_interval_ms) {
            return Err(format!(
                "archive interval {} ms must be 100 to 3600000",
                self.archive_interval_ms
            ));
        }
        if !(1..=31_536_000).contains(&self.archive_base_interval_s) {
            return Err(format!(
                "archive base interval {} s must be 1 to 31536000",
                self.archive_base_interval_s
            ));
        }
        if self.snapshot_every_entries < 2 {
            return Err("snapshot-every must be at least 2 entries".into());
        }
        if self.user_rate_per_s == 0
            || self.user_burst == 0
            || self.conn_rate_per_s == 0
            || self.conn_burst == 0
        {
            return Err("rate limits and bursts must be at least 1".into());
        }
        self.check_registration_limits()?;
        if !(chat_sm::RING_BYTES_MAX_MIN..=chat_sm::RING_BYTES_MAX_MAX)
            .contains(&self.ring_bytes_max)
        {
            return Err(format!(
                "ring bytes max {} must be {} (64 KiB) to {} (1 TiB)",
                self.ring_bytes_max,
                chat_sm::RING_BYTES_MAX_MIN,
                chat_sm::RING_BYTES_MAX_MAX
            ));
        }
        self.check_connection_limits()?;
        self.weaken.check_available()?;
        if self.broadcast == Ipv4Addr::BROADCAST {
            return Err(
                "broadcast 255.255.255.255 is refused: use the subnet's broadcast address, \
                 e.g. 192.168.1.255, or 127.255.255.255 for one machine"
                    .into(),
            );
        }
        Ok(())
    }

    fn check_registration_limits(&self) -> Result<(), String> {
        let limits = [
            (
                "registration ip rate per min",
                self.registration_ip_rate_per_min,
            ),
            ("registration ip burst", self.registration_ip_burst),
            (
                "registration node rate per min",
                self.registration_node_rate_per_min,
            ),
            ("registration node burst", self.registration_node_burst),
        ];
        for (name, value) in limits {
            if !(1..=1_000_000).contains(&value) {
                return Err(format!("{name} {value} must be 1 to 1000000"));
            }
        }
        Ok(())
    }

    /// The registration limits of the chat API.
    pub(crate) fn registration_limits(&self) -> RegistrationLimits {
        RegistrationLimits {
            ip_rate_per_min: self.registration_ip_rate_per_min,
            ip_burst: self.registration_ip_burst,
            node_rate_per_min: self.registration_node_rate_per_min,
            node_burst: self.registration_node_burst,
        }
    }

    fn check_connection_limits(&self) -> Result<(), String> {
        if !(1..=1_000_000).contains(&self.client_connections_max) {
            return Err(format!(
                "max connections {} must be 1 to 1000000",
                self.client_connections_max
            ));
        }
        if !(1..=100_000).contains(&self.raft_connections_max) {
            return Err(format!(
                "raft connections max {} must be 1 to 100000",
                self.raft_connections_max
            ));
        }
        self.client_limits()?;
        self.raft_limits()?;
        if !(1..=86_400).contains(&self.client_idle_timeout_s) {
            return Err(format!(
                "client idle timeout {} s must be 1 to 86400",
                self.client_idle_timeout_s
            ));
        }
        Ok(())
    }

    /// The client listener's connection caps.
    ///
    /// # Errors
    /// The per-address cap is 0 or above the global one.
    pub fn client_limits(&self) -> Result<ConnLimits, String> {
        ConnLimits::new(
            self.client_connections_max,
            self.client_connections_per_ip_max,
        )
        .map_err(|e| format!("max connections per ip: {e}"))
    }

    /// The Raft listener's connection caps.
    ///
    /// # Errors
    /// The per-address cap is 0 or above the global one.
    pub fn raft_limits(&self) -> Result<ConnLimits, String> {
        ConnLimits::new(self.raft_connections_max, self.raft_connections_per_ip_max)
            .map_err(|e| format!("raft connections per ip: {e}"))
    }

    /// The host the metrics listener binds to.
    pub fn metrics_bind_host(&self) -> IpAddr {
        self.metrics_host.unwrap_or(self.bind_host)
    }

    /// The host other nodes and operators are told for metrics: the metrics host when it is a
    /// specific address other than the node's, else the node's advertised host.
    pub fn advertised_metrics_host(&self) -> IpAddr {
        match self.metrics_host {
            Some(host) if !host.is_unspecified() && host != self.bind_host => host,
            _ => self.advertised_host(),
        }
    }

    /// The host other nodes and clients should dial.
    pub fn advertised_host(&self) -> IpAddr {
        match self.advertise_host {
            Some(host) => host,
            None if self.bind_host.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            None => self.bind_host,
        }
    }

    /// openraft's configuration from these settings.
    ///
    /// # Errors
    /// openraft's own validation failed.
    pub fn raft_config(&self) -> Result<openraft::Config, String> {
        let config = openraft::Config {
            cluster_name: self.cluster.clone(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_timeout_ms_min,
            election_timeout_max: self.election_timeout_ms_max,
            // Each entry is a batch of up to 1 MiB of bodies (see ProposerConfig), so 32
            // entries stay well under the 64 MiB frame limit.
            max_payload_entries: 32,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_every_entries),
            max_in_snapshot_log_to_keep: self.log_keep_entries,
            purge_batch_size: 256,
            // Per chunk; the last chunk also covers installing the snapshot on the follower.
            install_snapshot_timeout: 5_000,
            // A node that was partitioned or restarted asks before it campaigns, so its higher
            // term never deposes a leader the rest of the cluster still follows.
            enable_pre_vote: Some(true),
            // A restarted leader must win an election again: the chat state is not flushed on
            // apply and the committed id is saved without fsync, so one restored without a
            // vote could serve a stale state machine (openraft's condition for this option).
            enable_leader_restore: Some(false),
            ..Default::default()
        };
        config.validate().map_err(|e| e.to_string())
    }

    /// The formation window.
    pub fn formation_window(&self) -> Duration {
        Duration::from_millis(self.formation_window_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let config = Config::new("/tmp/x");
        config.validate().unwrap();
        config.raft_config().unwrap();
    }

    #[test]
    fn bad_values_are_named() {
        let mut config = Config::new("/tmp/x");
        config.max_voters = 0;
        assert!(config.validate().unwrap_err().contains("max voters"));
        let mut config = Config::new("/tmp/x");
        config.election_timeout_ms_min = 10;
        assert!(config.validate().unwrap_err().contains("heartbeat"));
        let mut config = Config::new("/tmp/x");
        config.broadcast = Ipv4Addr::BROADCAST;
        assert!(config.validate().unwrap_err().contains("refused"));
        let mut config = Config::new("/tmp/x");
        config.cluster = "bad name!".into();
        assert!(config.validate().unwrap_err().contains("cluster name"));
        let mut config = Config::new("/tmp/x");
        config.client_connections_per_ip_max = config.client_connections_max + 1;
        assert!(config.validate().unwrap_err().contains("per ip"));
        let mut config = Config::new("/tmp/x");
        config.client_connections_max = 0;
        assert!(config.validate().unwrap_err().contains("max connections"));
        let mut config = Config::new("/tmp/x");
        config.raft_connections_per_ip_max = 0;
        assert!(config.validate().unwrap_err().contains("raft connections"));
        let mut config = Config::new("/tmp/x");
        config.client_idle_timeout_s = 0;
        assert!(config.validate().unwrap_err().contains("idle timeout"));
        let mut config = Config::new("/tmp/x");
        config.registration_ip_burst = 0;
        assert!(config
            .validate()
            .unwrap_err()
            .contains("registration ip burst 0"));
        let mut config = Config::new("/tmp/x");
        config.registration_node_rate_per_min = 1_000_001;
        assert!(config
            .validate()
            .unwrap_err()
            .contains("registration node rate"));
        let mut config = Config::new("/tmp/x");
        config.ring_bytes_max = 1024;
        assert!(config
            .validate()
            .unwrap_err()
            .contains("ring bytes max 1024"));
    }

    #[test]
    fn metrics_are_advertised_where_they_listen() {
        let mut config = Config::new("/tmp/x");
        config.bind_host = "0.0.0.0".parse().unwrap();
        config.advertise_host = Some("10.0.0.5".parse().unwrap());
        assert_eq!(config.advertised_metrics_host(), config.advertised_host());
        config.metrics_host = Some("127.0.0.1".parse().unwrap());
        assert_eq!(config.metrics_bind_host().to_string(), "127.0.0.1");
        assert_eq!(config.advertised_metrics_host().to_string(), "127.0.0.1");
    }
}
