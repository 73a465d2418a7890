//! TLS for every connection: the cluster's trust root, join tokens, and rustls configurations.
//!
//! Every cluster has its own certificate authority, made when the cluster is created. Each node
//! holds a certificate from it that names two DNS identities: [`NODE_NAME`], shared by every
//! node (what a client checks: "this is a node of my cluster"), and [`node_server_name`] of its
//! own id (what a peer checks: "this is node N"). Nothing outside the CA's signature is trusted,
//! so a discovery announcement or an address learned from anyone is only a hint.
//!
//! A [`JoinToken`] carries the CA's [`Fingerprint`] and a secret: the fingerprint lets a newcomer
//! check it talks to the real cluster before it says anything, the secret lets the cluster check
//! the newcomer (the pattern of kubeadm and docker swarm join tokens). Clients need only the
//! fingerprint, from a token or pinned on first contact.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

/// The DNS name in every node certificate; clients verify a node against it.
pub const NODE_NAME: &str = "node.cellchat.invalid";

/// ALPN of the tarpc `Chat` service on a node's client port.
pub const ALPN_CHAT: &[u8] = b"cellchat-chat/1";
/// ALPN of push connections on a node's client port.
pub const ALPN_PUSH: &[u8] = b"cellchat-push/1";
/// ALPN of the Raft port (Raft RPCs, joins and admin calls).
pub const ALPN_RAFT: &[u8] = b"cellchat-raft/1";

/// The exporter label that binds a login signature to one TLS session (RFC 5705 / 8446 §7.5):
/// both ends derive the same 32 bytes, which a relay between them cannot.
const LOGIN_EXPORTER_LABEL: &[u8] = b"EXPORTER-cellchat-login";

/// The DNS name in node `id`'s certificate; peers verify node `id` against it.
pub fn node_server_name(id: u64) -> String {
    format!("n{id:016x}.node.cellchat.invalid")
}

/// The crypto provider every config here uses: ring, TLS 1.3 only.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS 1.3 protocol version list for config builders.
pub const VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// The SHA-256 of a CA certificate's DER: what a token and a client's pin name.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of `cert` (DER).
    pub fn of(cert: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(cert).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl FromStr for Fingerprint {
    type Err = TokenError;

    fn from_str(text: &str) -> Result<Self, TokenError> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).map_err(|_| TokenError::BadFingerprint)?;
        Ok(Fingerprint(bytes))
    }
}

/// Length of a join secret in bytes.
pub const SECRET_BYTES: usize = 16;

/// Why a join token could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not `CC1-<fingerprint>-<secret>`.
    #[error("a join token looks like CC1-<64 hex digits>-<32 hex digits>; this one does not (print the cluster's with `server token`)")]
    Malformed,
    /// The version prefix is not one this build knows.
    #[error("join token version {0:?} is not known to this build (it knows CC1)")]
    UnknownVersion(String),
    /// The CA fingerprint part is not 64 hex digits.
    #[error("the join token's CA fingerprint is not 64 hex digits")]
    BadFingerprint,
    /// The secret part is not 32 hex digits.
    #[error("the join token's secret is not 32 hex digits")]
    BadSecret,
}

/// A cluster's join token: the CA's fingerprint and the join secret.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Which CA the cluster's nodes are signed by.
    pub ca: Fingerprint,
    /// What a newcomer proves it knows.
    pub secret: [u8; SECRET_BYTES],
}

impl JoinToken {
    /// A token for the CA `ca` with a fresh random secret.
    pub fn generate(ca: Fingerprint) -> JoinToken {
        JoinToken {
            ca,
            secret: rand::random(),
        }
    }

    /// Whether `secret` is this token's secret, compared in constant time.
    pub fn secret_matches(&self, secret: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        secret.len() == SECRET_BYTES && bool::from(self.secret.ct_eq(secret))
    }

    /// The admin credential derived from this token: what `server members`, `remove-node`,
    /// `leave` and `token --rotate` present. Derived, so the secret itself is not what an
    /// admin call carries.
    pub fn admin_credential(&self) -> [u8; 32] {
        let mut hash = Sha256::new();
        hash.update(b"cellchat admin credential v1\0");
        hash.update(self.secret);
        hash.finalize().into()
    }

    /// Whether `credential` is this token's admin credential, compared in constant time.
    pub fn admin_matches(&self, credential: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        credential.len() == 32 && bool::from(self.admin_credential().ct_eq(credential))
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CC1-{}-{}", self.ca, hex::encode(self.secret))
    }
}

/// The secret stays out of logs and panics: only the fingerprint is shown.
impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinToken {{ ca: {}, secret: <hidden> }}", self.ca)
    }
}

impl FromStr for JoinToken {
    type Err = TokenError;

    fn from_str(text: &str) -> Result<Self, TokenError> {
        let mut parts = text.trim().split('-');
        let (Some(version), Some(ca), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        if version != "CC1" {
            return Err(TokenError::UnknownVersion(
                version.chars().take(16).collect(),
            ));
        }
        let ca = ca.parse()?;
        let mut bytes = [0u8; SECRET_BYTES];
        hex::decode_to_slice(secret, &mut bytes).map_err(|_| TokenError::BadSecret)?;
        Ok(JoinToken { ca, secret: bytes })
    }
}

/// The 32 bytes that bind a login to this TLS session: both ends of one session compute the
/// same value, and a relay holding two sessions cannot make them agree.
///
/// # Errors
/// A rustls error when the handshake has not finished.
pub fn stream_binding<IO>(stream: &tokio_rustls::TlsStream<IO>) -> Result<[u8; 32], rustls::Error> {
    let mut out = [0u8; 32];
    match stream {
        tokio_rustls::TlsStream::Client(s) => {
            s.get_ref()
                .1
                .export_keying_material(&mut out, LOGIN_EXPORTER_LABEL, None)?;
        }
        tokio_rustls::TlsStream::Server(s) => {
            s.get_ref()
                .1
                .export_keying_material(&mut out, LOGIN_EXPORTER_LABEL, None)?;
        }
    }
    Ok(out)
}

/// What a client trusts a cluster's nodes by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// Only a chain ending in this CA (from a token or an earlier pin).
    Pinned(Fingerprint),
    /// Trust on first use: the first CA that signs a node's certificate is pinned, and from
    /// then on only it is trusted ([`CaVerifier::pinned`] reports it, for the caller to keep).
    FirstUse,
}

/// A server certificate verifier for clients: the chain's CA (sent by the node after its own
/// certificate) must have the trusted fingerprint, and must have signed the node's certificate
/// for the name asked for.
#[derive(Debug)]
pub struct CaVerifier {
    trust: Mutex<Trust>,
    provider: Arc<CryptoProvider>,
}

impl CaVerifier {
    /// A verifier that trusts `trust`.
    pub fn new(trust: Trust) -> Arc<CaVerifier> {
        Arc::new(CaVerifier {
            trust: Mutex::new(trust),
            provider: provider(),
        })
    }

    /// The CA this verifier trusts: the pinned one, or the first one accepted.
    pub fn pinned(&self) -> Option<Fingerprint> {
        match *self.trust.lock().expect("not poisoned") {
            Trust::Pinned(ca) => Some(ca),
            Trust::FirstUse => None,
        }
    }
}

impl ServerCertVerifier for CaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates.last().ok_or_else(|| {
            rustls::Error::General("the node sent no CA certificate after its own".into())
        })?;
        let found = Fingerprint::of(ca);
        let trust = *self.trust.lock().expect("not poisoned");
        if let Trust::Pinned(expected) = trust {
            if found != expected {
                return Err(rustls::Error::General(format!(
                    "the node's CA is {found}, not the cluster's {expected}: either this is not \
                     a node of your cluster, or the cluster was made anew; in that case pass its \
                     current token (`server token` prints it) or forget the old pin"
                )));
            }
        }
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        let verified = inner.verify_server_cert(end_entity, &[], server_name, ocsp, now)?;
        let mut trust = self.trust.lock().expect("not poisoned");
        match *trust {
            Trust::FirstUse => *trust = Trust::Pinned(found),
            // Another handshake pinned a different CA meanwhile: only the first one counts.
            Trust::Pinned(pinned) if pinned != found => {
                return Err(rustls::Error::General(format!(
                    "the node's CA is {found}, but {pinned} was trusted first"
                )))
            }
            Trust::Pinned(_) => {}
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client config that verifies nodes with `verifier` and offers `alpn`, without a client
/// certificate (chat clients and admin tools).
pub fn client_config(verifier: Arc<CaVerifier>, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .expect("ring supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

/// The server name a client asks for when it does not care which node answers.
pub fn any_node() -> ServerName<'static> {
    ServerName::try_from(NODE_NAME).expect("a valid DNS name")
}

/// The server name that only node `id` can answer to.
pub fn node(id: u64) -> ServerName<'static> {
    ServerName::try_from(node_server_name(id)).expect("a valid DNS name")
}

/// Whether the end-entity certificate `cert`, already verified against the cluster CA in the
/// handshake, names node `id`.
pub fn cert_names_node(cert: &CertificateDer<'_>, id: u64) -> bool {
    let Ok(cert) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    let name = node(id);
    cert.verify_is_valid_for_subject_name(&name).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_prints_and_parses_back() {
        let token = JoinToken::generate(Fingerprint([7; 32]));
        let text = token.to_string();
        assert!(text.starts_with("CC1-0707"));
        assert_eq!(text.parse::<JoinToken>().unwrap(), token);
        assert!(!format!("{token:?}").contains(&hex::encode(token.secret)));
    }

    #[test]
    fn bad_tokens_get_typed_errors() {
        let ca = "ab".repeat(32);
        let secret = "cd".repeat(16);
        let cases = [
            (String::new(), TokenError::Malformed),
            ("CC1".into(), TokenError::Malformed),
            (format!("CC1-{ca}-{secret}-x"), TokenError::Malformed),
            (
                format!("CC9-{ca}-{secret}"),
                TokenError::UnknownVersion("CC9".into()),
            ),
            (
                format!("CC1-{}-{secret}", &ca[2..]),
                TokenError::BadFingerprint,
            ),
            (
                format!("CC1-{ca}-zz{}", &secret[2..]),
                TokenError::BadSecret,
            ),
            (format!("CC1-{ca}-{secret}00"), TokenError::BadSecret),
        ];
        for (text, error) in cases {
            assert_eq!(text.parse::<JoinToken>(), Err(error), "{text:?}");
        }
    }

    #[test]
    fn secrets_and_admin_credentials_match_only_themselves() {
        let token = JoinToken::generate(Fingerprint([1; 32]));
        let other = JoinToken::generate(Fingerprint([1; 32]));
        assert!(token.secret_matches(&token.secret));
        assert!(!token.secret_matches(&other.secret));
        assert!(!token.secret_matches(&token.secret[..15]));
        assert!(token.admin_matches(&token.admin_credential()));
        assert!(!token.admin_matches(&other.admin_credential()));
        assert_ne!(token.admin_credential()[..16], token.secret[..]);
    }

    #[test]
    fn node_names_are_distinct_per_id() {
        assert_ne!(node_server_name(1), node_server_name(2));
        assert!(node_server_name(u64::MAX).ends_with(".node.cellchat.invalid"));
    }
}
