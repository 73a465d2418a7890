//! The node's TLS identity: the cluster CA, this node's certificate, the join token, and the
//! rustls configurations built from them.
//!
//! A node's certificate names its Raft id ([`proto::tls::node_server_name`]) and the name every
//! node shares ([`proto::tls::NODE_NAME`]). Where the identity comes from, in order:
//! 1. the node's own `tls/` directory, written at its first start;
//! 2. with `--token`, an enrollment with a running member ([`enroll`](crate::enroll)): the node
//!    checks the member's CA against the token's fingerprint, proves the secret, and gets the
//!    CA and its own certificate back;
//! 3. otherwise the cluster directory next to the data dir (`<parent>/cluster-<name>/`), shared
//!    by every node started on this machine from the same place, and created (CA and token) by
//!    the first of them under a lock. This keeps "start the server N times" a one-machine
//!    cluster with no flags, while a stranger on the network has nothing to join with.
//!
//! Every member holds the CA key so that any of them can admit a newcomer; a member is trusted
//! with the cluster's data anyway. Certificates do not expire (rcgen's default validity): a
//! cluster identity lasts as long as the cluster.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use proto::tls::{self, Fingerprint, JoinToken};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SignatureAlgorithm, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::atomic_file;
use crate::types::NodeId;

/// The node's TLS files, inside its data dir.
pub const TLS_DIR: &str = "tls";
const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const NODE_CERT: &str = "node.crt";
const NODE_KEY: &str = "node.key";
/// The join token, as `server token` prints it.
pub const TOKEN_FILE: &str = "token";
const LOCK_FILE: &str = "LOCK";

/// Why the node's TLS identity could not be settled.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// An io error: what was being done, on which path.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A file holds something that is not what it should.
    #[error("{path} is damaged ({reason}); restore it from a backup, or start the node with a fresh data dir and --token")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// `--token` names another CA than the one this node belongs to.
    #[error("this node belongs to the cluster whose CA is {ours}, but the token is for CA {theirs}: drop --token, or use a fresh data dir to join the other cluster")]
    OtherCluster {
        /// The node's CA.
        ours: Fingerprint,
        /// The token's.
        theirs: Fingerprint,
    },
    /// Making a key or certificate failed.
    #[error("cannot make a certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// rustls refused the key or certificates.
    #[error("cannot use the node's certificate: {0}")]
    Tls(#[from] rustls::Error),
}

fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PkiError + 'a {
    move |source| PkiError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn damaged(path: &Path, reason: impl ToString) -> PkiError {
    PkiError::Damaged {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// The cluster's CA: its certificate and signing key.
pub struct ClusterCa {
    cert: CertificateDer<'static>,
    key: KeyPair,
    /// The cluster name the CA's subject was made with; the issuer must repeat it exactly.
    cluster: String,
}

impl ClusterCa {
    /// A new CA for `cluster`.
    ///
    /// # Errors
    /// rcgen's, which only a broken crypto library produces.
    pub fn generate(cluster: &str) -> Result<ClusterCa, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = ca_params(cluster).self_signed(&key)?;
        Ok(ClusterCa {
            cert: cert.der().clone(),
            key,
            cluster: cluster.to_owned(),
        })
    }

    /// The CA certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The CA's fingerprint, as tokens and client pins carry it.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.cert)
    }

    /// The CA key in PKCS#8 PEM, for a node that enrolls.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A CA read back from PEM text.
    ///
    /// # Errors
    /// [`PkiError::Damaged`] naming `origin` when either part does not parse.
    pub fn from_pem(
        cluster: &str,
        cert_pem: &[u8],
        key_pem: &str,
        origin: &Path,
    ) -> Result<ClusterCa, PkiError> {
        let cert = CertificateDer::from_pem_slice(cert_pem).map_err(|e| damaged(origin, e))?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| damaged(origin, e))?;
        Ok(ClusterCa {
            cert,
            key,
            cluster: cluster.to_owned(),
        })
    }

    /// A certificate for node `id` over `public_key`.
    ///
    /// # Errors
    /// rcgen's.
    pub fn issue(
        &self,
        id: NodeId,
        public_key: &impl PublicKeyData,
    ) -> Result<CertificateDer<'static>, PkiError> {
        let mut params =
            CertificateParams::new(vec![tls::NODE_NAME.to_owned(), tls::node_server_name(id)])?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("cellchat node {id:016x}"));
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let issuer = Issuer::new(ca_params(&self.cluster), &self.key);
        Ok(params.signed_by(public_key, &issuer)?.der().clone())
    }
}

/// The CA's parameters; issuing rebuilds them, so they must be a pure function of the name.
fn ca_params(cluster: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("cellchat cluster CA ({cluster})"),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// A P-256 public key received from an enrolling node (its uncompressed SEC1 point).
pub struct RemotePublicKey(Vec<u8>);

impl RemotePublicKey {
    /// The key, if `raw` has the shape of an uncompressed P-256 point.
    pub fn parse(raw: &[u8]) -> Option<RemotePublicKey> {
        (raw.len() == 65 && raw[0] == 4).then(|| RemotePublicKey(raw.to_vec()))
    }
}

impl PublicKeyData for RemotePublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

/// What an enrolling node receives: everything it needs to be a member.
pub struct Enrolled {
    /// The CA, key included.
    pub ca: ClusterCa,
    /// The node's certificate from it.
    pub cert: CertificateDer<'static>,
}

/// The node's settled TLS identity and the configurations every listener and dialer uses.
pub struct NodeTls {
    ca: ClusterCa,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    token: RwLock<JoinToken>,
    /// Held while a new token is written, so two writers never share the temp file.
    token_write: parking_lot::Mutex<()>,
    dir: PathBuf,
    /// The Raft port: a client certificate is asked for and verified against the CA, but not
    /// required, so that enrollment and admin tools (which have none) can connect; every Raft
    /// handler checks the certificate itself.
    pub raft_server: Arc<rustls::ServerConfig>,
    /// The client port: no client certificates; ALPN says chat or push.
    pub client_server: Arc<rustls::ServerConfig>,
    /// Dialing a peer's Raft port with this node's certificate.
    pub peer_client: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeTls {{ ca: {} }}", self.ca.fingerprint())
    }
}

impl NodeTls {
    /// The CA.
    pub fn ca(&self) -> &ClusterCa {
        &self.ca
    }

    /// The web client's TLS: HTTP/1.1 under `chain` and `key` when given (a certificate
    /// browsers trust, from `--web-cert` and `--web-key`), else under this node's cluster
    /// certificate.
    ///
    /// # Errors
    /// A sentence naming the file that cannot be read or the chain rustls refuses.
    pub fn web_server(&self, pem: Option<(&Path, &Path)>) -> Result<rustls::ServerConfig, String> {
        let (chain, key) = match pem {
            Some((cert, key)) => {
                let chain = (CertificateDer::pem_file_iter(cert))
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("web certificate {}: {e}", cert.display()))?;
                if chain.is_empty() {
                    return Err(format!(
                        "web certificate {}: no certificate",
                        cert.display()
                    ));
                }
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("web key {}: {e}", key.display()))?;
                (chain, key)
            }
            None => (self.chain.clone(), self.key.clone_key()),
        };
        let mut config = rustls::ServerConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(tls::VERSIONS)
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| format!("web certificate and key: {e}"))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }

    /// A dialer that presents this node's certificate but trusts servers by `verifier`
    /// instead of this node's CA (for tools and tests that play a foreign node).
    ///
    /// # Errors
    /// rustls's, if it refuses the key.
    pub fn dialer_trusting(
        &self,
        verifier: Arc<tls::CaVerifier>,
    ) -> Result<Arc<rustls::ClientConfig>, PkiError> {
        let mut config = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(tls::VERSIONS)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![tls::ALPN_RAFT.to_vec()];
        Ok(Arc::new(config))
    }

    /// The key this node seals discovery datagrams with, and checks its peers' with: derived
    /// from the CA key, which every member holds and nobody else does.
    pub fn discovery_key(&self) -> proto::discovery::DiscoveryKey {
        proto::discovery::DiscoveryKey::derive(&self.ca.key.serialize_der())
    }

    /// The cluster's current join token.
    pub fn token(&self) -> JoinToken {
        self.token.read().clone()
    }

    /// Makes `secret` the join token's secret (the CA stays), if it is not already: on disk
    /// in the node's `tls/token`, then in the cluster directory next to the data dir when that
    /// holds this cluster's CA (so nodes started later on this machine, and `server token`,
    /// see it), then in memory. Returns whether anything changed.
    ///
    /// # Errors
    /// The io error from writing a token file; memory is then unchanged, and the next call
    /// tries again.
    pub fn adopt_secret(
        &self,
        cluster: &str,
        secret: [u8; tls::SECRET_BYTES],
    ) -> Result<bool, PkiError> {
        let _writing = self.token_write.lock();
        if self.token.read().secret == secret {
            return Ok(false);
        }
        let token = JoinToken {
            ca: self.ca.fingerprint(),
            secret,
        };
        let line = format!("{token}\n");
        let path = self.dir.join(TLS_DIR).join(TOKEN_FILE);
        atomic_file::write_private(&path, line.as_bytes()).map_err(io_error("write", &path))?;
        let shared = cluster_dir(&self.dir, cluster);
        if shared.join(CA_CERT).exists() {
            let _lock = lock(&shared.join(LOCK_FILE))?;
            if let Ok(Some((ca, _))) = read_ca(&shared, cluster) {
                if ca.fingerprint() == token.ca {
                    let path = shared.join(TOKEN_FILE);
                    atomic_file::write_private(&path, line.as_bytes())
                        .map_err(io_error("write", &path))?;
                }
            }
        }
        *self.token.write() = token;
        Ok(true)
    }

    /// Builds the configurations for node certificate `cert` (with key `key`) from `ca`.
    fn new(
        ca: ClusterCa,
        token: JoinToken,
        cert: CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
        dir: &Path,
    ) -> Result<NodeTls, PkiError> {
        let provider = tls::provider();
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert().clone())?;
        let roots = Arc::new(roots);
        let chain = vec![cert, ca.cert().clone()];
        let (chain_head, ca_cert, key_copy) = (chain[0].clone(), chain[1].clone(), key.clone_key());
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        let mut raft_server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(tls::VERSIONS)?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        raft_server.alpn_protocols = vec![tls::ALPN_RAFT.to_vec()];
        let mut client_server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(tls::VERSIONS)?
            .with_no_client_auth()
            .with_single_cert(chain.clone(), key.clone_key())?;
        client_server.alpn_protocols = vec![tls::ALPN_CHAT.to_vec(), tls::ALPN_PUSH.to_vec()];
        let mut peer_client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(tls::VERSIONS)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        peer_client.alpn_protocols = vec![tls::ALPN_RAFT.to_vec()];
        Ok(NodeTls {
            ca,
            chain: vec![chain_head, ca_cert],
            key: key_copy,
            token: RwLock::new(token),
            token_write: parking_lot::Mutex::new(()),
            dir: dir.to_path_buf(),
            raft_server: Arc::new(raft_server),
            client_server: Arc::new(client_server),
            peer_client: Arc::new(peer_client),
        })
    }
}

/// Where this node's TLS identity comes from, once [`settle`] has looked.
pub enum Settled {
    /// Ready to serve.
    Ready(NodeTls),
    /// The node must enroll with a running member using the token; then [`finish_enrollment`].
    Enroll {
        /// The token given with `--token`.
        token: JoinToken,
        /// The node's new key, whose public half goes into the enrollment request.
        key: KeyPair,
    },
}

/// The shared cluster directory for nodes whose data dir is `data_dir`.
pub fn cluster_dir(data_dir: &Path, cluster: &str) -> PathBuf {
    let parent = data_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    parent.join(format!("cluster-{cluster}"))
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, PkiError> {
    atomic_file::read(path).map_err(io_error("read", path))
}

fn read_token(path: &Path) -> Result<JoinToken, PkiError> {
    let text = fs::read_to_string(path).map_err(io_error("read", path))?;
    text.trim().parse().map_err(|e| damaged(path, e))
}

/// Reads a CA (certificate and key) and the token from `dir`, if all three are there.
fn read_ca(dir: &Path, cluster: &str) -> Result<Option<(ClusterCa, JoinToken)>, PkiError> {
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    let Some(cert) = read_optional(&cert_path)? else {
        return Ok(None);
    };
    let key = read_optional(&key_path)?.ok_or_else(|| damaged(&key_path, "missing"))?;
    let key = String::from_utf8(key).map_err(|e| damaged(&key_path, e))?;
    let ca = ClusterCa::from_pem(cluster, &cert, &key, &cert_path)?;
    let token_path = dir.join(TOKEN_FILE);
    let token = read_token(&token_path)?;
    if token.ca != ca.fingerprint() {
        return Err(damaged(
            &token_path,
            "the token names another CA than ca.crt",
        ));
    }
    Ok(Some((ca, token)))
}

/// Writes a CA and token into `dir` (created 0700), key and token readable by the owner only.
fn write_ca(dir: &Path, ca: &ClusterCa, token: &JoinToken) -> Result<(), PkiError> {
    create_private_dir(dir)?;
    let key_path = dir.join(CA_KEY);
    atomic_file::write_private(&key_path, ca.key_pem().as_bytes())
        .map_err(io_error("write", &key_path))?;
    let token_path = dir.join(TOKEN_FILE);
    atomic_file::write_private(&token_path, format!("{token}\n").as_bytes())
        .map_err(io_error("write", &token_path))?;
    // The certificate last: its presence says the other two are complete.
    let cert_path = dir.join(CA_CERT);
    atomic_file::write_durably(&cert_path, pem("CERTIFICATE", ca.cert()).as_bytes())
        .map_err(io_error("write", &cert_path))
}

fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_error("create", dir))
}

fn pem(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der))
}

/// Finds this node's TLS identity (see the module doc for the order).
///
/// # Errors
/// [`PkiError`] naming the file and what is wrong; [`PkiError::OtherCluster`] when `token`
/// names another CA than the node's own.
pub fn settle(
    data_dir: &Path,
    cluster: &str,
    id: NodeId,
    token: Option<&JoinToken>,
) -> Result<Settled, PkiError> {
    let tls_dir = data_dir.join(TLS_DIR);
    if let Some(cert) = read_optional(&tls_dir.join(NODE_CERT))? {
        let (ca, stored) = read_ca(&tls_dir, cluster)?
            .ok_or_else(|| damaged(&tls_dir.join(CA_CERT), "missing next to node.crt"))?;
        if let Some(token) = token {
            if token.ca != ca.fingerprint() {
                return Err(PkiError::OtherCluster {
                    ours: ca.fingerprint(),
                    theirs: token.ca,
                });
            }
        }
        let cert_path = tls_dir.join(NODE_CERT);
        let cert = CertificateDer::from_pem_slice(&cert).map_err(|e| damaged(&cert_path, e))?;
        let key_path = tls_dir.join(NODE_KEY);
        let key = read_optional(&key_path)?.ok_or_else(|| damaged(&key_path, "missing"))?;
        let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| damaged(&key_path, e))?;
        return Ok(Settled::Ready(NodeTls::new(
            ca, stored, cert, key, data_dir,
        )?));
    }
    if let Some(token) = token {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        return Ok(Settled::Enroll {
            token: token.clone(),
            key,
        });
    }
    let shared = cluster_dir(data_dir, cluster);
    let (ca, token) = {
        create_private_dir(&shared)?;
        let _lock = lock(&shared.join(LOCK_FILE))?;
        match read_ca(&shared, cluster)? {
            Some(found) => found,
            None => {
                let ca = ClusterCa::generate(cluster)?;
                let token = JoinToken::generate(ca.fingerprint());
                write_ca(&shared, &ca, &token)?;
                tracing::info!(dir = %shared.display(), ca = %ca.fingerprint(),
                    "created the cluster's CA and join token");
                (ca, token)
            }
        }
    };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = ca.issue(id, &key)?;
    Ok(Settled::Ready(finish(
        data_dir,
        Enrolled { ca, cert },
        token,
        key,
    )?))
}

/// Whether the cluster directory `shared` holds a CA already.
pub fn holds_ca(shared: &Path) -> bool {
    shared.join(CA_CERT).exists()
}

/// Makes a new cluster identity for node `id` in `data_dir` (a restored node, the first of a
/// new cluster): a fresh CA and join token, and the node's certificate. Returns the token.
///
/// # Errors
/// [`PkiError`] from making or writing the keys and certificates.
pub fn new_cluster(data_dir: &Path, cluster: &str, id: NodeId) -> Result<JoinToken, PkiError> {
    let ca = ClusterCa::generate(cluster)?;
    let token = JoinToken::generate(ca.fingerprint());
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = ca.issue(id, &key)?;
    finish(data_dir, Enrolled { ca, cert }, token.clone(), key)?;
    Ok(token)
}

/// Copies the CA and token of the node in `data_dir` into the cluster directory next to it,
/// unless that holds a CA already, so that nodes started there later join this cluster the way
/// a local cluster's nodes do.
///
/// # Errors
/// [`PkiError`] reading the node's identity or writing the copy.
pub fn share_identity(data_dir: &Path, cluster: &str) -> Result<(), PkiError> {
    let tls_dir = data_dir.join(TLS_DIR);
    let (ca, token) =
        read_ca(&tls_dir, cluster)?.ok_or_else(|| damaged(&tls_dir.join(CA_CERT), "missing"))?;
    let shared = cluster_dir(data_dir, cluster);
    create_private_dir(&shared)?;
    let _lock = lock(&shared.join(LOCK_FILE))?;
    if holds_ca(&shared) {
        return Ok(());
    }
    write_ca(&shared, &ca, &token)
}

/// Stores what an enrollment returned and builds the node's configurations.
///
/// # Errors
/// io errors writing the files; [`PkiError::OtherCluster`] when the CA is not the token's.
pub fn finish_enrollment(
    data_dir: &Path,
    enrolled: Enrolled,
    token: JoinToken,
    key: KeyPair,
) -> Result<NodeTls, PkiError> {
    if enrolled.ca.fingerprint() != token.ca {
        return Err(PkiError::OtherCluster {
            ours: enrolled.ca.fingerprint(),
            theirs: token.ca,
        });
    }
    finish(data_dir, enrolled, token, key)
}

fn finish(
    data_dir: &Path,
    enrolled: Enrolled,
    token: JoinToken,
    key: KeyPair,
) -> Result<NodeTls, PkiError> {
    let tls_dir = data_dir.join(TLS_DIR);
    write_ca(&tls_dir, &enrolled.ca, &token)?;
    let key_path = tls_dir.join(NODE_KEY);
    atomic_file::write_private(&key_path, key.serialize_pem().as_bytes())
        .map_err(io_error("write", &key_path))?;
    // The node certificate last: its presence marks the identity complete.
    let cert_path = tls_dir.join(NODE_CERT);
    atomic_file::write_durably(&cert_path, pem("CERTIFICATE", &enrolled.cert).as_bytes())
        .map_err(io_error("write", &cert_path))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    NodeTls::new(enrolled.ca, token, enrolled.cert, key, data_dir)
}

/// Takes an exclusive `flock` on `path`, waiting for it: the first node on a machine creates
/// the CA while the others wait, then read it.
fn lock(path: &Path) -> Result<File, PkiError> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io_error("open", path))?;
    file.lock().map_err(io_error("lock", path))?;
    Ok(file)
}

/// The token kept in the cluster directory under `root` (where `server` with no --data-dir
/// keeps its node-N dirs).
///
/// # Errors
/// [`PkiError`] when there is none, or it is damaged.
pub fn root_token(root: &Path, cluster: &str) -> Result<JoinToken, PkiError> {
    read_token(&root.join(format!("cluster-{cluster}")).join(TOKEN_FILE))
}

/// The token of the cluster whose node keeps its data in `data_dir`, or of the shared cluster
/// directory next to it; for `server token`.
///
/// # Errors
/// [`PkiError`] when neither has one, or it is damaged.
pub fn find_token(data_dir: &Path, cluster: &str) -> Result<JoinToken, PkiError> {
    let own = data_dir.join(TLS_DIR).join(TOKEN_FILE);
    if own.exists() {
        return read_token(&own);
    }
    read_token(&cluster_dir(data_dir, cluster).join(TOKEN_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(settled: Settled) -> NodeTls {
        match settled {
            Settled::Ready(tls) => tls,
            Settled::Enroll { .. } => panic!("expected a ready identity"),
        }
    }

    #[test]
    fn nodes_of_one_root_share_one_ca_and_keep_it_across_restarts() {
        let root = tempfile::tempdir().unwrap();
        let a = ready(settle(&root.path().join("node-1"), "c", 1, None).unwrap());
        let b = ready(settle(&root.path().join("node-2"), "c", 2, None).unwrap());
        assert_eq!(a.ca().fingerprint(), b.ca().fingerprint());
        assert_eq!(a.token(), b.token());
        let again = ready(settle(&root.path().join("node-1"), "c", 1, None).unwrap());
        assert_eq!(again.ca().fingerprint(), a.ca().fingerprint());
        let other = ready(settle(&root.path().join("node-3"), "d", 3, None).unwrap());
        assert_ne!(other.ca().fingerprint(), a.ca().fingerprint());
    }

    #[test]
    fn secrets_are_private_files() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        ready(settle(&root.path().join("node-1"), "c", 1, None).unwrap());
        for path in [
            root.path().join("cluster-c").join(CA_KEY),
            root.path().join("cluster-c").join(TOKEN_FILE),
            root.path().join("node-1/tls").join(NODE_KEY),
            root.path().join("node-1/tls").join(CA_KEY),
            root.path().join("node-1/tls").join(TOKEN_FILE),
        ] {
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{} is {mode:o}", path.display());
        }
    }

    #[test]
    fn a_token_for_another_ca_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("node-1");
        ready(settle(&dir, "c", 1, None).unwrap());
        let stranger = JoinToken::generate(Fingerprint([9; 32]));
        assert!(matches!(
            settle(&dir, "c", 1, Some(&stranger)),
            Err(PkiError::OtherCluster { .. })
        ));
    }

    #[test]
    fn a_fresh_node_with_a_token_enrolls() {
        let root = tempfile::tempdir().unwrap();
        let first = ready(settle(&root.path().join("a/node-1"), "c", 1, None).unwrap());
        let token = first.token();
        let dir = root.path().join("b/node-1");
        let Settled::Enroll { token: t, key } = settle(&dir, "c", 7, Some(&token)).unwrap() else {
            panic!("expected enrollment");
        };
        let public = RemotePublicKey::parse(key.public_key_raw()).unwrap();
        let cert = first.ca().issue(7, &public).unwrap();
        let ca = ClusterCa::from_pem(
            "c",
            pem("CERTIFICATE", first.ca().cert()).as_bytes(),
            &first.ca().key_pem(),
            &dir,
        )
        .unwrap();
        let tls = finish_enrollment(&dir, Enrolled { ca, cert }, t, key).unwrap();
        assert_eq!(tls.ca().fingerprint(), token.ca);
        let again = ready(settle(&dir, "c", 7, Some(&token)).unwrap());
        assert_eq!(again.token(), token);
    }

    #[test]
    fn certificates_name_their_node_only() {
        let ca = ClusterCa::generate("c").unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = ca.issue(42, &key).unwrap();
        assert!(tls::cert_names_node(&cert, 42));
        assert!(!tls::cert_names_node(&cert, 43));
    }

    #[test]
    fn a_damaged_key_file_names_the_file() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("node-1");
        ready(settle(&dir, "c", 1, None).unwrap());
        fs::write(dir.join(TLS_DIR).join(NODE_KEY), "garbage").unwrap();
        let error = settle(&dir, "c", 1, None).err().unwrap().to_string();
        assert!(error.contains("node.key"), "{error}");
    }
}
