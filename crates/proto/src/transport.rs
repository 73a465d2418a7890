//! TCP transports for tarpc with postcard bodies, one frame limit, `TCP_NODELAY` and keepalive.
//!
//! Both the client-facing [`Chat`](crate::Chat) service and `node`'s Raft service use these, so
//! every connection in the system has the same framing and the same limit on both ends. tarpc
//! sets neither `TCP_NODELAY` nor keepalive itself.

use std::{
    io,
    marker::PhantomData,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use futures::Stream;
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

/// A postcard-framed tarpc transport over TCP that reads `Item`s and writes `SinkItem`s.
///
/// A client uses `Transport<tarpc::Response<Resp>, tarpc::ClientMessage<Req>>`, a server the
/// reverse.
pub type Transport<Item, SinkItem> =
    tarpc::serde_transport::Transport<TcpStream, Item, SinkItem, Postcard<Item, SinkItem>>;

/// Connects to `addr` and returns a transport with [`FRAME_BYTES_MAX`], `TCP_NODELAY` and
/// keepalive set.
///
/// There is no connect timeout here; wrap the call in `tokio::time::timeout`.
///
/// # Errors
///
/// The `io::Error` from connecting or from setting a socket option.
pub async fn connect<Item, SinkItem>(addr: SocketAddr) -> io::Result<Transport<Item, SinkItem>>
where
    Item: DeserializeOwned,
    SinkItem: Serialize,
{
    let stream = TcpStream::connect(addr).await?;
    wrap(stream)
}

/// Binds a TCP listener on `addr` whose connections get the same settings as [`connect`]'s.
///
/// # Errors
///
/// The `io::Error` from binding.
pub async fn listen<Item, SinkItem>(addr: SocketAddr) -> io::Result<Listener<Item, SinkItem>>
where
    Item: DeserializeOwned,
    SinkItem: Serialize,
{
    let inner = TcpListener::bind(addr).await?;
    let local_addr = inner.local_addr()?;
    Ok(Listener {
        inner,
        local_addr,
        ghost: PhantomData,
    })
}

/// Accepts TCP connections and wraps each in a [`Transport`].
///
/// It is also a never-ending [`Stream`] of transports, for tarpc's combinators; an `Err` item is
/// one failed accept (for example `EMFILE`) and the stream continues after it.
#[derive(Debug)]
pub struct Listener<Item, SinkItem> {
    inner: TcpListener,
    local_addr: SocketAddr,
    ghost: PhantomData<fn(SinkItem) -> Item>,
}

impl<Item, SinkItem> Listener<Item, SinkItem>
where
    Item: DeserializeOwned,
    SinkItem: Serialize,
{
    /// The address the listener is bound to, with the real port when bound to port 0.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Waits for one connection and returns its transport and the peer's address.
    ///
    /// # Errors
    ///
    /// The `io::Error` from accepting or from setting a socket option on the new connection.
    pub async fn accept(&self) -> io::Result<(Transport<Item, SinkItem>, SocketAddr)> {
        let (stream, peer) = self.inner.accept().await?;
        Ok((wrap(stream)?, peer))
    }
}

impl<Item, SinkItem> Stream for Listener<Item, SinkItem>
where
    Item: DeserializeOwned,
    SinkItem: Serialize,
{
    type Item = io::Result<Transport<Item, SinkItem>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner
            .poll_accept(cx)
            .map(|accepted| Some(accepted.and_then(|(s, _)| wrap(s))))
    }
}

/// Wraps an accepted or connected `stream` in a [`Transport`] with the same settings as
/// [`connect`]'s; for servers that accept connections themselves (to route push connections).
///
/// # Errors
///
/// The `io::Error` from setting a socket option.
pub fn transport_from_stream<Item, SinkItem>(
    stream: TcpStream,
) -> io::Result<Transport<Item, SinkItem>>
where
    Item: DeserializeOwned,
    SinkItem: Serialize,
{
    wrap(stream)
}

/// Sets `TCP_NODELAY` and keepalive on a client connection (as [`connect`] does).
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

/// Sets the socket options and frames `stream` with the shared limit.
fn wrap<Item, SinkItem>(stream: TcpStream) -> io::Result<Transport<Item, SinkItem>>
where
    Item: DeserializeOwned,
    SinkItem: Serialize,
{
    set_socket_options(&stream)?;
    let framed = LengthDelimitedCodec::builder()
        .max_frame_length(FRAME_BYTES_MAX)
        .new_framed(stream);
    Ok(tarpc::serde_transport::new(framed, Postcard::default()))
}
