//! The shared TCP transport enforces FRAME_BYTES_MAX on both ends without panicking, accepts
//! frames above tokio's 8 MiB default, and reports undecodable frames as errors.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use futures::{SinkExt, StreamExt};
use proto::{connect, listen, Listener, Transport, FRAME_BYTES_MAX};
use socket2::SockRef;
use tokio::{io::AsyncWriteExt, net::TcpStream};

async fn listener() -> Listener<String, String> {
    listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .await
        .expect("listen")
}

async fn pair() -> (Transport<String, String>, Transport<String, String>) {
    let listener = listener().await;
    let client = connect(listener.local_addr()).await.expect("connect");
    let (server, peer) = listener.accept().await.expect("accept");
    assert_eq!(peer, client.local_addr().expect("addr"));
    assert!(client.get_ref().nodelay().expect("nodelay"));
    assert!(server.get_ref().nodelay().expect("nodelay"));
    for stream in [client.get_ref(), server.get_ref()] {
        assert!(SockRef::from(stream).keepalive().expect("keepalive"));
        assert_eq!(
            SockRef::from(stream).tcp_keepalive_time().expect("idle"),
            Duration::from_secs(30)
        );
    }
    (client, server)
}

#[tokio::test]
async fn frame_above_tokio_default_limit_passes() {
    let (mut client, mut server) = pair().await;
    let big = "b".repeat(9 << 20);
    // Send and receive together: the frame is larger than the socket buffers.
    let (sent, got) = tokio::join!(client.send(big.clone()), server.next());
    sent.expect("send");
    let got = got.expect("a frame").expect("decoded");
    assert_eq!(got.len(), big.len());
    server.send("ok".to_string()).await.expect("reply");
    assert_eq!(
        client.next().await.expect("a frame").expect("decoded"),
        "ok"
    );
}

#[tokio::test]
async fn oversized_frame_is_refused_by_the_sender() {
    let (mut client, _server) = pair().await;
    // Postcard adds a length prefix, so the frame is longer than the string.
    let too_big = "x".repeat(FRAME_BYTES_MAX);
    let err = client.send(too_big).await.expect_err("must refuse");
    assert!(err.to_string().contains("frame size too big"), "{err}");
}

#[tokio::test]
async fn oversized_length_prefix_is_refused_by_the_reader() {
    let listener = listener().await;
    let mut raw = TcpStream::connect(listener.local_addr())
        .await
        .expect("connect");
    let (mut server, _) = listener.accept().await.expect("accept");
    let claimed = u32::try_from(FRAME_BYTES_MAX + 1).expect("fits u32");
    raw.write_all(&claimed.to_be_bytes()).await.expect("write");
    raw.write_all(b"not really that long").await.expect("write");
    let err = server
        .next()
        .await
        .expect("an item")
        .expect_err("must refuse");
    assert_eq!(err.kind(), io::ErrorKind::Other, "{err}");
}

#[tokio::test]
async fn garbage_frame_is_invalid_data() {
    let listener = listener().await;
    let mut raw = TcpStream::connect(listener.local_addr())
        .await
        .expect("connect");
    let (mut server, _) = listener.accept().await.expect("accept");
    // A 3-byte frame holding a string length of 100: truncated postcard.
    raw.write_all(&[0, 0, 0, 3, 100, b'a', b'b'])
        .await
        .expect("write");
    let err = server
        .next()
        .await
        .expect("an item")
        .expect_err("must refuse");
    let inner = err.get_ref().and_then(|e| e.downcast_ref::<io::Error>());
    assert_eq!(
        inner.map(io::Error::kind),
        Some(io::ErrorKind::InvalidData),
        "{err:?}"
    );
}

#[tokio::test]
async fn listener_stream_yields_configured_transports() {
    let mut listener = listener().await;
    let addr = listener.local_addr();
    let mut client: Transport<String, String> = connect(addr).await.expect("connect");
    let mut server = listener
        .next()
        .await
        .expect("never ends")
        .expect("accepted");
    assert!(server.get_ref().nodelay().expect("nodelay"));
    client.send("hi".to_string()).await.expect("send");
    assert_eq!(
        server.next().await.expect("a frame").expect("decoded"),
        "hi"
    );
}
