//! The web client over TLS with a certificate of the operator's own (`--web-cert`,
//! `--web-key`): the ready line says `https://`, a client trusting only that certificate's
//! CA gets the page, and plain HTTP on the same port gets no page.
//!
//! Timeouts are generous bounds for a loaded 2-core machine, not performance claims.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls_pki_types::{CertificateDer, ServerName};
use testkit::TestCluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const READY: Duration = Duration::from_secs(60);
const IO: Duration = Duration::from_secs(10);

/// A CA and a certificate it issued for `localhost` and 127.0.0.1, as PEM files in `dir`.
fn certificate(dir: &std::path::Path) -> anyhow::Result<(CertificateDer<'static>, String, String)> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate()?;
    let params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
    let cert = params.signed_by(&key, &issuer)?;
    let (cert_path, key_path) = (dir.join("web.crt"), dir.join("web.key"));
    std::fs::write(&cert_path, cert.pem() + &ca.pem())?;
    std::fs::write(&key_path, key.serialize_pem())?;
    Ok((
        ca.der().clone(),
        cert_path.display().to_string(),
        key_path.display().to_string(),
    ))
}

/// `GET /` on `stream`; answers the whole response.
async fn get<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
) -> anyhow::Result<String> {
    let request = "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(IO, stream.read_to_end(&mut response)).await;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_certificate_serves_the_page_over_tls_only() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (ca, cert, key) = certificate(dir.path())?;
    let flags = [
        "--web",
        "127.0.0.1:0",
        "--web-cert",
        &cert,
        "--web-key",
        &key,
    ];
    let mut cluster = TestCluster::new("web-tls", &flags)?;
    let index = cluster.start_node(READY)?;
    let ready = *cluster.nodes[index].ready().context("ready")?;
    let web = ready.web.context("the ready line names no web address")?;
    let log = cluster.nodes[index].log_tail(200);
    ensure!(
        log.contains(&format!("web=\"https://{web}\"")),
        "the ready line must give an https URL: {log}"
    );

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(web).await?;
    let name = ServerName::try_from("localhost")?;
    let tls = tokio::time::timeout(IO, connector.connect(name, tcp)).await??;
    let page = get(tls).await?;
    ensure!(page.starts_with("HTTP/1.1 200"), "over TLS: {page:.200}");
    ensure!(page.contains("<html"), "the page: {page:.400}");
    ensure!(
        page.to_ascii_lowercase()
            .contains("content-security-policy"),
        "the page carries its CSP: {page:.400}"
    );

    let plain = get(TcpStream::connect(web).await?).await?;
    ensure!(
        !plain.contains("<html"),
        "plain HTTP must not get the page: {plain:.200}"
    );
    Ok(())
}
