//! Which cluster CA this client trusts, and the TLS configs built on it.
//!
//! In order: the CA named by a join token (`ClientConfig::token`); else the CA pinned for the
//! cluster's name in `known_clusters` in the config dir; else the first CA a node proves itself
//! with (trust on first use, like ssh's `known_hosts`), which is then pinned. A node whose CA
//! differs from the trusted one is refused with a message that says what to do. Discovery
//! answers are never trusted by themselves: a node is a node only once its TLS handshake
//! proves it.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use proto::tls::{self, CaVerifier, Fingerprint, Trust};

use crate::config::ClientConfig;
use crate::identity;

/// The pin file in the config dir: one `cluster fingerprint` line per cluster.
pub const KNOWN_CLUSTERS_FILE: &str = "known_clusters";

/// The client's trust in one cluster and the rustls configs that enforce it.
#[derive(Debug)]
pub struct ClusterTrust {
    verifier: Arc<CaVerifier>,
    /// For the tarpc `Chat` service.
    pub chat: Arc<rustls::ClientConfig>,
    /// For push connections.
    pub push: Arc<rustls::ClientConfig>,
    /// Where a first-use pin is kept (`None`: no config dir, or the token says it all).
    pin_file: Option<PathBuf>,
    cluster: String,
}

impl ClusterTrust {
    /// The trust `config` asks for (see the module doc).
    ///
    /// # Errors
    /// The io error from reading a `known_clusters` file that exists but cannot be read.
    pub fn for_config(config: &ClientConfig) -> io::Result<ClusterTrust> {
        let pin_file = identity::config_dir(config.config_dir.as_deref())
            .ok()
            .map(|dir| dir.join(KNOWN_CLUSTERS_FILE));
        let trust = match (&config.token, &pin_file) {
            (Some(token), _) => Trust::Pinned(token.ca),
            (None, Some(file)) => match read_pin(file, &config.cluster)? {
                Some(ca) => Trust::Pinned(ca),
                None => Trust::FirstUse,
            },
            (None, None) => Trust::FirstUse,
        };
        let verifier = CaVerifier::new(trust);
        Ok(ClusterTrust {
            chat: tls::client_config(verifier.clone(), tls::ALPN_CHAT),
            push: tls::client_config(verifier.clone(), tls::ALPN_PUSH),
            verifier,
            pin_file: if config.token.is_some() {
                None
            } else {
                pin_file
            },
            cluster: config.cluster.clone(),
        })
    }

    /// The CA trusted now, if one is pinned or was accepted.
    pub fn ca(&self) -> Option<Fingerprint> {
        self.verifier.pinned()
    }

    /// Keeps a CA accepted on first use in `known_clusters`, if it is not there yet.
    pub fn remember(&self) {
        let (Some(file), Some(ca)) = (&self.pin_file, self.ca()) else {
            return;
        };
        match read_pin(file, &self.cluster) {
            Ok(Some(_)) => {}
            Ok(None) => match append_pin(file, &self.cluster, ca) {
                Ok(()) => tracing::info!(cluster = %self.cluster, %ca, file = %file.display(),
                    "trusting this cluster's CA from now on"),
                Err(e) => tracing::warn!(error = %e, file = %file.display(),
                    "cannot keep the cluster's CA pin"),
            },
            Err(e) => tracing::warn!(error = %e, "cannot read the cluster pins"),
        }
    }
}

/// The pinned CA of `cluster` in `file`.
fn read_pin(file: &Path, cluster: &str) -> io::Result<Option<Fingerprint>> {
    let text = match fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        if let (Some(name), Some(ca)) = (parts.next(), parts.next()) {
            if name == cluster {
                return ca.parse().map(Some).map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{}: the pin of {cluster:?} is not a fingerprint",
                            file.display()
                        ),
                    )
                });
            }
        }
    }
    Ok(None)
}

fn append_pin(file: &Path, cluster: &str, ca: Fingerprint) -> io::Result<()> {
    use std::io::Write;
    if let Some(dir) = file.parent() {
        fs::create_dir_all(dir)?;
    }
    let mut out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)?;
    writeln!(out, "{cluster} {ca}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_kept_per_cluster_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(KNOWN_CLUSTERS_FILE);
        assert_eq!(read_pin(&file, "a").unwrap(), None);
        append_pin(&file, "a", Fingerprint([1; 32])).unwrap();
        append_pin(&file, "b", Fingerprint([2; 32])).unwrap();
        assert_eq!(read_pin(&file, "a").unwrap(), Some(Fingerprint([1; 32])));
        assert_eq!(read_pin(&file, "b").unwrap(), Some(Fingerprint([2; 32])));
        assert_eq!(read_pin(&file, "c").unwrap(), None);
        fs::write(&file, "a nothex\n").unwrap();
        assert!(read_pin(&file, "a").is_err());
    }

    #[test]
    fn a_token_wins_over_a_pin() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(KNOWN_CLUSTERS_FILE);
        append_pin(&file, "a", Fingerprint([1; 32])).unwrap();
        let mut config = ClientConfig::new("a", 1);
        config.config_dir = Some(dir.path().to_path_buf());
        assert_eq!(
            ClusterTrust::for_config(&config).unwrap().ca(),
            Some(Fingerprint([1; 32]))
        );
        config.token = Some(tls::JoinToken::generate(Fingerprint([3; 32])));
        assert_eq!(
            ClusterTrust::for_config(&config).unwrap().ca(),
            Some(Fingerprint([3; 32]))
        );
        config.token = None;
        config.cluster = "fresh".into();
        assert_eq!(ClusterTrust::for_config(&config).unwrap().ca(), None);
    }
}
