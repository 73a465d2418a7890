//! A test CA and node certificate, and the configs for both ends, for tests that run a server.

use std::sync::Arc;

use proto::tls::{self, CaVerifier, Fingerprint, Trust};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

/// A server config with a node certificate from a fresh CA, offering `alpn`, and a client config
/// that trusts that CA only.
pub fn tls_pair(alpn: &[u8]) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec![tls::NODE_NAME.to_owned()])
        .expect("params")
        .signed_by(&key, &Issuer::new(ca_params, &ca_key))
        .expect("cert");
    let mut server = rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(tls::VERSIONS)
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone(), ca.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server config");
    server.alpn_protocols = vec![alpn.to_vec()];
    let verifier = CaVerifier::new(Trust::Pinned(Fingerprint::of(ca.der())));
    (Arc::new(server), tls::client_config(verifier, alpn))
}
