//! A throwaway CA and one certificate it signs, for the TLS the harness sets up itself (the
//! floor's push connections, the TLS-on NATS peer). P-256 ECDSA, as cellchat's nodes use, so
//! every system's handshakes and records cost the same kind of work.

use anyhow::Result;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256};

/// A CA and a leaf certificate for `names`, with the leaf's key.
pub struct CaAndLeaf {
    pub ca: rcgen::Certificate,
    pub leaf: rcgen::Certificate,
    pub leaf_key: KeyPair,
}

/// Generates a CA that may sign leaves only, and a leaf for `names` (DNS names or IP
/// addresses; an IP string becomes an IP SAN).
pub fn ca_and_leaf(names: &[&str]) -> Result<CaAndLeaf> {
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let ca = ca_params.self_signed(&ca_key)?;
    let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let names: Vec<String> = names.iter().map(|&n| n.to_owned()).collect();
    let leaf =
        CertificateParams::new(names)?.signed_by(&leaf_key, &Issuer::new(ca_params, &ca_key))?;
    Ok(CaAndLeaf { ca, leaf, leaf_key })
}
