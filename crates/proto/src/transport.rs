//! TLS transports for tarpc with postcard bodies, one frame limit, `TCP_NODELAY` and keepalive.
//!
//! Both the client-facing [`Chat`](crate::Chat) service and `node`'s Raft service use these, so
//! every connection in the system has the same framing and the same limit on both ends. tarpc
//! sets neither `TCP_NODELAY` nor keepalive itself.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use rustls::pki_types::{CertificateDer, ServerName};
use serde::{de::DeserializeOwned, Serialize};
use socket2::{SockRef, TcpKeepalive};
use tarpc::tokio_util::codec::LengthDelimitedCodec;
use tokio::net::{TcpListener, TcpStream};

use crate::codec::Postcard;

/// Largest frame body either end sends or accepts, in bytes (64 MiB).
///
/// The reader checks the 4-byte length prefix against this before it allocates. A frame over the
/// limit fails the connection (tarpc then reports it as broken), so senders must size batches to
/// fit: a Raft `AppendEntries` or a snapshot chunk included.
pub const FRAME_BYTES_MAX: usize = 64 << 20;

/// Idle time before the first keepalive probe. With the interval and count below, a peer that
/// vanished without a FIN or RST is detected after about 60 s.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// Time between keepalive probes.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes before the kernel resets the connection.
const KEEPALIVE_RETRIES: u32 = 3;

/// A TLS stream over TCP, either end.
pub type TlsTcp = tokio_rustls::TlsStream<TcpStream>;

/// A postcard-framed tarpc transport over TLS that reads `Item`s and writes `SinkItem`s.
///
/// A client uses `Transport<tarpc::Response<Resp>, tarpc::ClientMessage<Req>>`, a server the
/// reverse.
pub type Transport<Item, SinkItem> =
    tarpc::serde_transport::Transport<TlsTcp, Item, SinkItem, Postcard<Item, SinkItem>>;

/// How long a TLS handshake may take, either end. A peer that opens a connection and then
/// stalls the handshake is dropped after this, so half-open handshakes cannot pile up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to `addr`, sets `TCP_NODELAY` and keepalive, and runs the TLS handshake with
/// `config` for `name`, within `timeout` in all.
///
/// # Errors
///
/// The `io::Error` from connecting or from the handshake (a refused certificate is
/// `InvalidData` with rustls's reason), or `TimedOut`.
pub async fn connect_tls(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    timeout: Duration,
) -> io::Result<TlsTcp> {
    let connecting = async {
        let stream = TcpStream::connect(addr).await?;
        set_socket_options(&stream)?;
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(name, stream)
            .await?;
        Ok(TlsTcp::Client(stream))
    };
    tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "connect and TLS handshake timed out",
            )
        })?
}

/// Runs the server side of the TLS handshake on an accepted `stream`, within
/// [`HANDSHAKE_TIMEOUT`].
///
/// # Errors
///
/// The `io::Error` from the handshake, or `TimedOut`.
pub async fn accept_tls(
    stream: TcpStream,
    config: Arc<rustls::ServerConfig>,
) -> io::Result<TlsTcp> {
    set_socket_options(&stream)?;
    let accepting = tokio_rustls::TlsAcceptor::from(config).accept(stream);
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, accepting)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    Ok(TlsTcp::Server(stream))
}

/// Connects to `addr` over TLS (see [`connect_tls`]) and returns a transport with
/// [`FRAME_BYTES_MAX`].
///
/// # Errors
///
/// As [`connect_tls`].
pub async fn connect<Item, SinkItem>(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    timeout: Duration,
) -> io::Result<Transport<Item, SinkItem>>
where
    Item: DeserializeOwned,
    SinkItem: Serialize,
{
    Ok(framed(connect_tls(addr, config, name, timeout).await?))
}

/// Binds a TCP listener on `addr`. Its connections are plain TCP: the caller runs
/// [`accept_tls`] in the connection's own task, so one slow handshake holds up no other.
///
/// # Errors
///
/// The `io::Error` from binding.
pub async fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Frames a TLS `stream` as a tarpc transport with [`FRAME_BYTES_MAX`].
pub fn framed<Item, SinkItem>(stream: TlsTcp) -> Transport<Item, SinkItem>
where
    Item: DeserializeOwned,
    SinkItem: Serialize,
{
    let framed = LengthDelimitedCodec::builder()
        .max_frame_length(FRAME_BYTES_MAX)
        .new_framed(stream);
    tarpc::serde_transport::new(framed, Postcard::default())
}

/// The ALPN protocol the handshake on `stream` agreed on.
pub fn alpn(stream: &TlsTcp) -> Option<&[u8]> {
    match stream {
        TlsTcp::Client(s) => s.get_ref().1.alpn_protocol(),
        TlsTcp::Server(s) => s.get_ref().1.alpn_protocol(),
    }
}

/// The certificate chain the peer presented on `stream` (the client's, on a server stream;
/// `None` when it sent none).
pub fn peer_certificates(stream: &TlsTcp) -> Option<&[CertificateDer<'static>]> {
    match stream {
        TlsTcp::Client(s) => s.get_ref().1.peer_certificates(),
        TlsTcp::Server(s) => s.get_ref().1.peer_certificates(),
    }
}

/// Sets `TCP_NODELAY` and keepalive on a connection.
///
/// # Errors
///
/// The `io::Error` from setting a socket option.
pub fn set_socket_options(stream: &TcpStream) -> io::Result<()> {
    // Requests and replies are small and latency-bound; Nagle would hold them back.
    stream.set_nodelay(true)?;
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    SockRef::from(stream).set_tcp_keepalive(&keepalive)
}
