//! The shared TLS transport enforces FRAME_BYTES_MAX on both ends without panicking, accepts
//! frames above tokio's 8 MiB default, and reports undecodable frames as errors.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use futures::{SinkExt, StreamExt};
use proto::{
    accept_tls, connect_tls, framed, listen, TlsTcp, Transport, FRAME_BYTES_MAX, READ_BUFFER_BYTES,
};
use socket2::SockRef;
use tokio::io::AsyncWriteExt;

mod common;

/// A connected client and server TLS stream pair over loopback.
async fn streams() -> (TlsTcp, TlsTcp) {
    let listener = listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .await
        .expect("listen");
    let (server_tls, client_tls): (Arc<rustls::ServerConfig>, _) =
        common::tls_pair(proto::tls::ALPN_CHAT);
    let addr = listener.local_addr().expect("addr");
    let connecting = connect_tls(
        addr,
        client_tls,
        proto::tls::any_node(),
        Duration::from_secs(5),
    );
    let accepting = async {
        let (stream, _) = listener.accept().await.expect("accept");
        accept_tls(stream, server_tls).await.expect("handshake")
    };
    let (client, server) = tokio::join!(connecting, accepting);
    (client.expect("connect"), server)
}

async fn pair() -> (Transport<String, String>, Transport<String, String>) {
    let (client, server) = streams().await;
    for stream in [&client, &server] {
        let tcp = stream.get_ref().0;
        assert!(tcp.nodelay().expect("nodelay"));
        assert!(SockRef::from(tcp).keepalive().expect("keepalive"));
        assert_eq!(
            SockRef::from(tcp).tcp_keepalive_time().expect("idle"),
            Duration::from_secs(30)
        );
    }
    (framed(client), framed(server))
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
async fn frames_around_the_start_buffer_arrive_whole_and_in_order() {
    let (mut client, mut server) = pair().await;
    // Sizes below, at and above the read buffer's starting size, sent back to back so that
    // several share one read and some straddle the buffer's end.
    let sizes = [
        1,
        READ_BUFFER_BYTES - 5,
        READ_BUFFER_BYTES,
        3 * READ_BUFFER_BYTES + 7,
        40,
    ];
    let sent: Vec<String> = (0..40)
        .map(|i| {
            char::from(b'a' + (i % 26) as u8)
                .to_string()
                .repeat(sizes[i % sizes.len()])
        })
        .collect();
    let sending = async {
        for frame in &sent {
            client.feed(frame.clone()).await.expect("feed");
        }
        client.flush().await.expect("flush");
    };
    let receiving = async {
        let mut got = Vec::new();
        while got.len() < sent.len() {
            got.push(server.next().await.expect("a frame").expect("decoded"));
        }
        got
    };
    let ((), got) = tokio::join!(sending, receiving);
    assert_eq!(got, sent);
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
    let (mut raw, server) = streams().await;
    let mut server: Transport<String, String> = framed(server);
    let claimed = u32::try_from(FRAME_BYTES_MAX + 1).expect("fits u32");
    raw.write_all(&claimed.to_be_bytes()).await.expect("write");
    raw.write_all(b"not really that long").await.expect("write");
    raw.flush().await.expect("flush");
    let err = server
        .next()
        .await
        .expect("an item")
        .expect_err("must refuse");
    assert_eq!(err.kind(), io::ErrorKind::Other, "{err}");
}

#[tokio::test]
async fn garbage_frame_is_invalid_data() {
    let (mut raw, server) = streams().await;
    let mut server: Transport<String, String> = framed(server);
    // A 3-byte frame holding a string length of 100: truncated postcard.
    raw.write_all(&[0, 0, 0, 3, 100, b'a', b'b'])
        .await
        .expect("write");
    raw.flush().await.expect("flush");
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
