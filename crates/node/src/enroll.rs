//! Enrollment: a node started with `--token` and no identity finds a running member and gets
//! its certificate from it.
//!
//! Discovery (broadcast and `--join` addresses) only says where members might be; each
//! candidate must prove with the token's CA that it is a member before the node sends the
//! secret (`raft_rpc::request_enroll`). A forged announcement therefore costs one failed
//! handshake and learns nothing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use proto::discovery::{DiscoverySocket, Packet};
use proto::tls::JoinToken;
use rcgen::KeyPair;
use rustls::pki_types::CertificateDer;

use crate::config::Config;
use crate::pki::{self, ClusterCa, Enrolled, NodeTls, PkiError};
use crate::raft_rpc::{self, EnrollError, EnrollRequest, JoinCallError};
use crate::types::NodeId;

/// How long one discovery round listens for announcements.
const DISCOVERY_WINDOW: Duration = Duration::from_millis(500);
/// How long a node keeps looking for a member to enroll with before it gives up.
const ENROLL_DEADLINE: Duration = Duration::from_secs(60);

/// Why enrollment failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollFailed {
    /// No member was found or none accepted, within the deadline.
    #[error("no member of cluster {cluster:?} enrolled this node within {secs} s{}", last.as_ref().map(|e| format!(" (last answer: {e})")).unwrap_or_default())]
    NoMember {
        /// The cluster looked for.
        cluster: String,
        /// The deadline.
        secs: u64,
        /// The last refusal or transport error, if any.
        last: Option<String>,
    },
    /// A member refused the token: retrying cannot help.
    #[error("the cluster refused this node's token: {0}")]
    Refused(String),
    /// The answer could not be used or stored.
    #[error(transparent)]
    Pki(#[from] PkiError),
}

/// Finds a member and enrolls with it, then stores the identity in `data_dir`.
///
/// # Errors
/// [`EnrollFailed`]: nobody answered in time, the secret was refused, or the files could not
/// be written.
pub async fn enroll(
    config: &Config,
    data_dir: &Path,
    id: NodeId,
    token: JoinToken,
    key: KeyPair,
) -> Result<NodeTls, EnrollFailed> {
    let deadline = tokio::time::Instant::now() + ENROLL_DEADLINE;
    let request = EnrollRequest {
        cluster: config.cluster.clone(),
        id,
        public_key: key.public_key_raw().to_vec(),
        secret: token.secret.to_vec(),
    };
    let mut last = None;
    while tokio::time::Instant::now() < deadline {
        for addr in candidates(config).await {
            match raft_rpc::request_enroll(&token, addr, request.clone()).await {
                Ok(reply) => {
                    let cert_der = CertificateDer::from(reply.ca_cert);
                    let cert_pem = pem::encode(&pem::Pem::new("CERTIFICATE", cert_der.to_vec()));
                    let ca = ClusterCa::from_pem(
                        &config.cluster,
                        cert_pem.as_bytes(),
                        &reply.ca_key_pem,
                        data_dir,
                    )?;
                    let enrolled = Enrolled {
                        ca,
                        cert: CertificateDer::from(reply.cert),
                    };
                    tracing::info!(%addr, "enrolled with the cluster");
                    return Ok(pki::finish_enrollment(data_dir, enrolled, token, key)?);
                }
                // Retrying with the same secret cannot help; other refusals (an id taken, a
                // member of another cluster name) can change as the cluster changes.
                Err(JoinCallError::EnrollRefused(e @ EnrollError::WrongSecret)) => {
                    return Err(EnrollFailed::Refused(e.to_string()));
                }
                Err(e) => {
                    tracing::info!(%addr, error = %e, "enrollment attempt failed");
                    last = Some(e.to_string());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(EnrollFailed::NoMember {
        cluster: config.cluster.clone(),
        secs: ENROLL_DEADLINE.as_secs(),
        last,
    })
}

/// The Raft addresses announced for this cluster in one discovery round.
async fn candidates(config: &Config) -> Vec<SocketAddr> {
    let socket = match DiscoverySocket::ephemeral(
        config.discovery_port,
        config.broadcast,
        &config.cluster,
    ) {
        Ok(socket) => socket,
        Err(e) => {
            tracing::warn!(error = %e, "cannot open a discovery socket to find the cluster");
            return Vec::new();
        }
    };
    let probe = Packet::Probe {
        cluster: config.cluster.clone(),
        nonce: rand::random(),
        from_client: false,
    };
    if let Err(e) = socket.send_broadcast(&probe).await {
        tracing::debug!(error = %e, "discovery broadcast failed");
    }
    for addr in &config.join {
        if let Err(e) = socket.send_to(&probe, *addr).await {
            tracing::debug!(error = %e, %addr, "discovery probe failed");
        }
    }
    let mut found = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + DISCOVERY_WINDOW;
    while let Ok(Ok((packet, _))) = tokio::time::timeout_at(deadline, socket.recv()).await {
        if let Packet::Announce(announce) = packet {
            found.insert(announce.node_id, announce.raft_addr);
        }
    }
    found.into_values().collect()
}
