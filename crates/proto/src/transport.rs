//! TLS transports for tarpc with postcard bodies, one frame limit, `TCP_NODELAY` and keepalive.
//!
//! Both the client-facing [`Chat`](crate::Chat) service and `node`'s Raft service use these, so
//! every connection in the system has the same framing and the same limit on both ends. tarpc
//! sets neither `TCP_NODELAY` nor keepalive itself.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use rustls::pki_types::{CertificateDer, ServerName};
use serde::{de::DeserializeOwned, Serialize};
use socket2::{SockRef, TcpKeepalive};
use tarpc::tokio_util::codec::{Framed, LengthDelimitedCodec};
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
pub type Transport<Item, SinkItem> = tarpc::serde_transport::Transport<
    ReadLimited<TlsTcp>,
    Item,
    SinkItem,
    Postcard<Item, SinkItem>,
>;

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
        handshake(stream, config, name).await
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

/// Runs the client side of the TLS handshake on a connected `stream` (no timeout: wrap it),
/// after setting `TCP_NODELAY` and keepalive; for callers that open the TCP connection
/// themselves, e.g. from a chosen local address.
///
/// # Errors
///
/// The `io::Error` from a socket option or the handshake.
pub async fn handshake(
    stream: TcpStream,
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
) -> io::Result<TlsTcp> {
    set_socket_options(&stream)?;
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await?;
    Ok(TlsTcp::Client(stream))
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

/// Frames a TLS `stream` as a tarpc transport with [`FRAME_BYTES_MAX`] both ways.
pub fn framed<Item, SinkItem>(stream: TlsTcp) -> Transport<Item, SinkItem>
where
    Item: DeserializeOwned,
    SinkItem: Serialize,
{
    framed_reading_at_most(stream, FRAME_BYTES_MAX)
}

/// Bytes a connection's read buffer starts with. It grows to the largest frame read (the codec
/// reserves a frame's length from its prefix), so this only sets what an idle connection holds:
/// most of a node's connections are idle clients, and the codec's default is 8 KiB.
pub const READ_BUFFER_BYTES: usize = 1 << 10;

/// Frames a TLS `stream` as a tarpc transport that sends frames up to [`FRAME_BYTES_MAX`] but
/// reads only frames up to `read_max` bytes: a server whose requests are small (the chat
/// service) refuses a large one from its 4-byte prefix, before it buffers any of the body.
pub fn framed_reading_at_most<Item, SinkItem>(
    stream: TlsTcp,
    read_max: usize,
) -> Transport<Item, SinkItem>
where
    Item: DeserializeOwned,
    SinkItem: Serialize,
{
    let codec = LengthDelimitedCodec::builder()
        .max_frame_length(FRAME_BYTES_MAX)
        .new_codec();
    let framed =
        Framed::with_capacity(ReadLimited::new(stream, read_max), codec, READ_BUFFER_BYTES);
    tarpc::serde_transport::new(framed, Postcard::default())
}

/// A stream whose incoming bytes are checked as 4-byte big-endian length-prefixed frames: a
/// prefix above the limit fails the read with `InvalidData`, so the codec above never waits
/// for (or allocates) the body. Writes pass through.
#[derive(Debug)]
pub struct ReadLimited<S> {
    inner: S,
    limit: usize,
    /// The prefix bytes of the next frame seen so far.
    prefix: [u8; 4],
    prefix_len: usize,
    /// Body bytes of the current frame still to come.
    body_left: usize,
}

impl<S> ReadLimited<S> {
    /// Wraps `inner`, allowing frames up to `limit` bytes.
    pub fn new(inner: S, limit: usize) -> Self {
        ReadLimited {
            inner,
            limit,
            prefix: [0; 4],
            prefix_len: 0,
            body_left: 0,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Follows the frame structure over `bytes`, newly read.
    fn check(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let skip = self.body_left.min(bytes.len());
                self.body_left -= skip;
                bytes = &bytes[skip..];
                continue;
            }
            self.prefix[self.prefix_len] = bytes[0];
            self.prefix_len += 1;
            bytes = &bytes[1..];
            if self.prefix_len == self.prefix.len() {
                self.prefix_len = 0;
                let len = u32::from_be_bytes(self.prefix) as usize;
                if len > self.limit {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "a frame of {len} bytes is over this connection's limit of {}",
                            self.limit
                        ),
                    ));
                }
                self.body_left = len;
            }
        }
        Ok(())
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for ReadLimited<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = &polled {
            self.check(&buf.filled()[before..])?;
        }
        polled
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for ReadLimited<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
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

#[cfg(test)]
mod tests {
    use super::ReadLimited;

    fn frame(len: u32) -> Vec<u8> {
        let mut out = len.to_be_bytes().to_vec();
        out.extend(std::iter::repeat_n(7u8, len as usize));
        out
    }

    #[test]
    fn frames_within_the_limit_pass_however_the_reads_split_them() {
        let bytes: Vec<u8> = [frame(10), frame(0), frame(100), frame(3)].concat();
        for split in 1..bytes.len() {
            let mut limited = ReadLimited::new((), 100);
            for piece in bytes.chunks(split) {
                limited.check(piece).expect("within the limit");
            }
            assert_eq!(
                (limited.prefix_len, limited.body_left),
                (0, 0),
                "split {split}"
            );
        }
    }

    #[test]
    fn a_prefix_over_the_limit_fails_before_its_body() {
        let mut limited = ReadLimited::new((), 100);
        limited.check(&frame(100)).expect("at the limit");
        let error = limited.check(&101u32.to_be_bytes()).expect_err("over");
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
        let mut limited = ReadLimited::new((), 100);
        limited.check(&[0, 0]).expect("half a prefix");
        assert!(
            limited.check(&[1, 0]).is_err(),
            "a prefix split across reads"
        );
    }
}
