//! [`ClientConfig`]: where to look for servers, who to be, and the client's time bounds.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::identity::Identity;

/// Everything [`Client::connect`](crate::Client::connect) needs.
///
/// Fields are public so tools can fill what they need and take the rest from
/// [`Default`]. [`ClientConfig::validate`] checks the bounds stated on each field.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Cluster name; nodes of other clusters are ignored. Default `cellchat`.
    pub cluster: String,
    /// UDP port the nodes share for discovery. Default 7946.
    pub discovery_port: u16,
    /// Directed broadcast address for discovery probes. Default 127.255.255.255 (this host
    /// only); 255.255.255.255 is refused.
    pub broadcast: Ipv4Addr,
    /// Discovery addresses (`host:discovery_port`) of nodes broadcast cannot reach.
    pub join: Vec<SocketAddr>,
    /// User name to log in as. With `identity` unset, its key is loaded from (or created in)
    /// `config_dir`. `None` with `identity` unset: a read-only client that cannot send.
    pub name: Option<String>,
    /// The key to log in with; its name wins over `name` (which must then be unset or equal).
    pub identity: Option<Identity>,
    /// Config dir for identities and pinned cluster CAs; default `$CELLCHAT_CONFIG_DIR` or
    /// the user's config dir.
    pub config_dir: Option<PathBuf>,
    /// The cluster's join token, or any token of it: the client trusts only nodes signed by
    /// its CA. `None`: the CA pinned for this cluster name, or the first one met (see
    /// `trust.rs`).
    pub token: Option<proto::tls::JoinToken>,
    /// How long one discovery round collects announcements. Default 300 ms; 10 ms to 10 s.
    pub discovery_window: Duration,
    /// TCP connect timeout per node. Default 500 ms; 10 ms to 10 s. Short, so a dead node is
    /// skipped quickly.
    pub connect_timeout: Duration,
    /// Deadline of one request (other than long polls). Default 5 s; 100 ms to 60 s.
    pub request_timeout: Duration,
    /// Interval of the background RTT probes (UDP pings to every node) and cluster refresh.
    /// Default 1 s; 50 ms to 60 s.
    pub probe_interval: Duration,
    /// How long the write connection (to the leader) stays open without a send, and the
    /// reader's RPC connection without a read (history, channels; pushed streams have their
    /// own), before it is closed; the next use opens (and logs in) again. Default 60 s;
    /// 100 ms to 1 h.
    pub writer_idle: Duration,
    /// Total time one send may spend on retries before failing. Default 30 s; up to 1 h.
    pub send_retry_budget: Duration,
    /// Most attempts of one send. Default 200; 1 to 100 000.
    pub send_attempts_max: u32,
    /// How long one `stream` long poll waits on the node. Default 10 s; 100 ms to 30 s.
    pub stream_wait: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            cluster: "cellchat".to_owned(),
            discovery_port: proto::discovery::DEFAULT_DISCOVERY_PORT,
            broadcast: proto::discovery::DEFAULT_BROADCAST,
            join: Vec::new(),
            name: None,
            identity: None,
            config_dir: None,
            token: None,
            discovery_window: Duration::from_millis(300),
            connect_timeout: Duration::from_millis(500),
            request_timeout: Duration::from_secs(5),
            probe_interval: Duration::from_secs(1),
            writer_idle: Duration::from_secs(60),
            send_retry_budget: Duration::from_secs(30),
            send_attempts_max: 200,
            stream_wait: Duration::from_secs(10),
        }
    }
}

impl ClientConfig {
    /// The defaults for `cluster` on `discovery_port`.
    pub fn new(cluster: impl Into<String>, discovery_port: u16) -> Self {
        Self {
            cluster: cluster.into(),
            discovery_port,
            ..Self::default()
        }
    }

    /// Checks the bounds documented on each field.
    ///
    /// # Errors
    ///
    /// A sentence naming the first field out of bounds.
    pub fn validate(&self) -> Result<(), String> {
        let ms = |d: Duration| d.as_millis();
        if self.broadcast == Ipv4Addr::BROADCAST {
            return Err("broadcast 255.255.255.255 is refused: use a directed broadcast such as 127.255.255.255".into());
        }
        if self.cluster.is_empty() {
            return Err("cluster name is empty".into());
        }
        if let (Some(name), Some(identity)) = (&self.name, &self.identity) {
            if name != identity.name() {
                return Err(format!(
                    "name {name:?} differs from the identity's {:?}",
                    identity.name()
                ));
            }
        }
        let bounds = [
            ("discovery_window", ms(self.discovery_window), 10, 10_000),
            ("connect_timeout", ms(self.connect_timeout), 10, 10_000),
            ("request_timeout", ms(self.request_timeout), 100, 60_000),
            ("probe_interval", ms(self.probe_interval), 50, 60_000),
            ("writer_idle", ms(self.writer_idle), 100, 3_600_000),
            (
                "send_retry_budget",
                ms(self.send_retry_budget),
                0,
                3_600_000,
            ),
            ("stream_wait", ms(self.stream_wait), 100, 30_000),
        ];
        for (field, value, min, max) in bounds {
            if !(min..=max).contains(&value) {
                return Err(format!("{field} is {value} ms, outside {min}..={max} ms"));
            }
        }
        if !(1..=100_000).contains(&self.send_attempts_max) {
            return Err(format!(
                "send_attempts_max is {}, outside 1..=100000",
                self.send_attempts_max
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_limited_broadcast_is_not() {
        assert_eq!(ClientConfig::default().validate(), Ok(()));
        let config = ClientConfig {
            broadcast: Ipv4Addr::BROADCAST,
            ..ClientConfig::default()
        };
        assert!(config.validate().is_err());
        let config = ClientConfig {
            stream_wait: Duration::from_secs(60),
            ..ClientConfig::default()
        };
        assert!(config
            .validate()
            .expect_err("too long")
            .contains("stream_wait"));
    }
}
