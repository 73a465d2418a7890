//! End-to-end tests of the limits a node sets before anyone authenticates: the hello and idle
//! timeouts of client connections, the per-address connection cap, and the metrics listener's
//! bind address and bearer token. Each test runs a one-node cluster of real `server`
//! processes on loopback through `testkit`, with its own cluster name and discovery port.
//!
//! Timeouts are generous bounds for a loaded 2-core machine, not performance claims.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use proto::{ChatClient, ChatClientTransport, Hello, StreamRequest};
use testkit::{TestClient, TestCluster, TestUser};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const READY: Duration = Duration::from_secs(30);
/// How long a refused or timed-out connection may take to show as closed.
const CLOSE_BOUND: Duration = Duration::from_secs(30);

/// A one-node cluster with `extra` server flags, ready.
fn one_node(name: &str, extra: &[&str]) -> anyhow::Result<TestCluster> {
    let mut cluster = TestCluster::new(name, extra)?;
    cluster.spawn_node()?;
    cluster.nodes[0].wait_ready(READY)?;
    Ok(cluster)
}

fn ready(cluster: &TestCluster) -> anyhow::Result<testkit::Ready> {
    cluster.nodes[0].ready().cloned().context("node not ready")
}

fn ctx(timeout: Duration) -> tarpc::context::Context {
    let mut ctx = tarpc::context::current();
    ctx.deadline = Instant::now() + timeout;
    ctx
}

/// A TCP connection to `to` from the loopback address `from`.
async fn connect_from(from: &str, to: SocketAddr) -> anyhow::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    let from: IpAddr = from.parse()?;
    socket.bind(SocketAddr::new(from, 0))?;
    Ok(socket.connect(to).await?)
}

/// Runs a chat client's TLS handshake on `stream`, trusting whatever CA the node shows.
async fn tls_on(stream: TcpStream) -> anyhow::Result<proto::TlsTcp> {
    let verifier = proto::tls::CaVerifier::new(proto::tls::Trust::FirstUse);
    let config = proto::tls::client_config(verifier, proto::tls::ALPN_CHAT);
    let handshake = proto::handshake(stream, config, proto::tls::any_node());
    Ok(tokio::time::timeout(Duration::from_secs(10), handshake).await??)
}

/// Says hello on `stream` as a chat client of `cluster`; `Err` when the node closed it.
async fn hello_on(stream: TcpStream, cluster: &str) -> anyhow::Result<ChatClient> {
    let transport: ChatClientTransport = proto::framed(tls_on(stream).await?);
    let client = ChatClient::new(tarpc::client::Config::default(), transport).spawn();
    client
        .hello(ctx(Duration::from_secs(10)), Hello::new(cluster, None))
        .await?
        .map_err(|e| anyhow::anyhow!("hello refused: {e}"))?;
    Ok(client)
}

/// Waits until the node closes `stream`, ignoring whatever it sends first.
async fn closed_by_node(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    within: Duration,
) -> anyhow::Result<()> {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => bail!("the node kept the connection open for {within:?}"),
            Ok(Ok(0) | Err(_)) => return Ok(()),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn limits_a_silent_connection_is_closed_after_the_hello_timeout_and_a_greeted_one_stays(
) -> anyhow::Result<()> {
    let cluster = one_node("limits-hello", &[])?;
    let ready = ready(&cluster)?;
    let greeted =
        TestClient::login(ready.client, &cluster.cluster, &TestUser::new("reader")).await?;

    // A finished TLS handshake and the first bytes of a tarpc frame (a length prefix), so the
    // node serves it as tarpc at once, and then nothing.
    let mut silent = tls_on(TcpStream::connect(ready.client).await?).await?;
    silent.write_all(&[0, 0, 0, 64]).await?;
    silent.flush().await?;
    let started = Instant::now();
    closed_by_node(&mut silent, CLOSE_BOUND).await?;
    let after = started.elapsed();
    assert!(
        after >= node::HELLO_TIMEOUT - Duration::from_millis(500),
        "closed after {after:?}, before the hello timeout"
    );

    // The connection that said hello is past the hello timeout and still serves.
    greeted
        .client
        .channels(ctx(Duration::from_secs(10)), first_page())
        .await
        .context("the greeted connection was closed")?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[tokio::test]
async fn limits_a_stalled_handshake_and_garbage_instead_of_tls_are_dropped() -> anyhow::Result<()> {
    let cluster = one_node("limits-handshake", &[])?;
    let ready = ready(&cluster)?;
    // A TCP connection that never starts the handshake: dropped after the handshake timeout.
    let mut stalled = TcpStream::connect(ready.client).await?;
    let started = Instant::now();
    closed_by_node(&mut stalled, CLOSE_BOUND).await?;
    let after = started.elapsed();
    assert!(
        after >= proto::HANDSHAKE_TIMEOUT - Duration::from_millis(500),
        "closed after {after:?}, before the handshake timeout"
    );
    // Garbage instead of a ClientHello, on both ports: dropped at once, the node unharmed.
    for port in [ready.client, ready.raft] {
        let mut garbage = TcpStream::connect(port).await?;
        garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await?;
        closed_by_node(&mut garbage, CLOSE_BOUND).await?;
    }
    // A finished handshake, then a length prefix far over the request limit, before any
    // login (chat port) or without a node certificate (Raft port): closed without the node
    // waiting for the body.
    for (port, alpn) in [
        (ready.client, proto::tls::ALPN_CHAT),
        (ready.raft, proto::tls::ALPN_RAFT),
    ] {
        let verifier = proto::tls::CaVerifier::new(proto::tls::Trust::FirstUse);
        let config = proto::tls::client_config(verifier, alpn);
        let stream = TcpStream::connect(port).await?;
        let mut big = proto::handshake(stream, config, proto::tls::any_node()).await?;
        big.write_all(&(32u32 << 20).to_be_bytes()).await?;
        big.flush().await?;
        let started = Instant::now();
        closed_by_node(&mut big, CLOSE_BOUND).await?;
        assert!(
            started.elapsed() < proto::HANDSHAKE_TIMEOUT,
            "the oversized frame on {port} was not refused from its prefix"
        );
    }
    let client =
        TestClient::login(ready.client, &cluster.cluster, &TestUser::new("reader")).await?;
    client
        .client
        .channels(ctx(Duration::from_secs(10)), first_page())
        .await?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[tokio::test]
async fn limits_an_idle_connection_is_closed_and_a_long_poll_is_not_idle() -> anyhow::Result<()> {
    let cluster = one_node("limits-idle", &["--client-idle-timeout-s", "2"])?;
    let ready = ready(&cluster)?;
    let client =
        TestClient::login(ready.client, &cluster.cluster, &TestUser::new("reader")).await?;

    // A long poll twice the idle timeout: the connection stays, the poll ends normally.
    let poll = StreamRequest {
        channel: "quiet".into(),
        after_seq: 0,
        max: 10,
        wait_ms: 4_000,
        read_token: 0,
    };
    let batch = client
        .client
        .stream(ctx(Duration::from_secs(15)), poll)
        .await
        .context("the connection closed during a long poll")?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert!(batch.messages.is_empty());

    // Then nothing for twice the idle timeout: the node closes it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after_idle = client
        .client
        .channels(ctx(Duration::from_secs(10)), first_page())
        .await;
    assert!(
        after_idle.is_err(),
        "an idle connection still served: {after_idle:?}"
    );
    Ok(())
}

#[tokio::test]
async fn limits_connections_beyond_the_per_address_cap_are_closed() -> anyhow::Result<()> {
    let cluster = one_node("limits-per-ip", &["--max-connections-per-ip", "2"])?;
    let ready = ready(&cluster)?;
    let name = cluster.cluster.clone();

    let first = hello_on(connect_from("127.0.0.2", ready.client).await?, &name).await?;
    let _second = hello_on(connect_from("127.0.0.2", ready.client).await?, &name).await?;
    // The node accepts the third connection and closes it at once: its hello fails.
    let third = hello_on(connect_from("127.0.0.2", ready.client).await?, &name).await;
    assert!(
        third.is_err(),
        "a third connection from 127.0.0.2 was served"
    );
    let (_, metrics) = get(ready.metrics, "/metrics", "").await?;
    let refused = "cellchat_connections_refused_total{listener=\"client\",cap=\"per_ip\"} 1";
    assert!(metrics.contains(refused), "no {refused} in:\n{metrics}");

    // Another address has its own count.
    let _other = hello_on(connect_from("127.0.0.3", ready.client).await?, &name).await?;
    // The node's own address (this machine) is not capped per address.
    let mut own = Vec::new();
    for _ in 0..5 {
        own.push(hello_on(connect_from("127.0.0.1", ready.client).await?, &name).await?);
    }

    // Closing one frees its slot (the node notices the close asynchronously).
    drop(first);
    let deadline = Instant::now() + CLOSE_BOUND;
    loop {
        let stream = connect_from("127.0.0.2", ready.client).await?;
        if hello_on(stream, &name).await.is_ok() {
            break;
        }
        if Instant::now() > deadline {
            bail!("the slot of a closed connection was never freed");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// One HTTP GET of `path` with `headers`; the status code and the body.
async fn get(addr: SocketAddr, path: &str, headers: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: test\r\n{headers}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {text:?}"))?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    Ok((status, body))
}

#[tokio::test]
async fn limits_metrics_need_the_bearer_token_on_the_metrics_bind_address() -> anyhow::Result<()> {
    const TOKEN: &str = "metrics-token-e2e-7f3a91";
    let cluster = one_node(
        "limits-metrics",
        &["--metrics-token", TOKEN, "--metrics-bind", "127.0.0.2"],
    )?;
    let ready = ready(&cluster)?;
    assert_eq!(ready.metrics.ip().to_string(), "127.0.0.2");
    assert_eq!(ready.client.ip().to_string(), "127.0.0.1");

    let (status, body) = get(ready.metrics, "/metrics", "").await?;
    assert_eq!(status, 401, "{body}");
    assert!(!body.contains(TOKEN));
    let wrong = "Authorization: Bearer metrics-token-e2e-7f3a90\r\n";
    assert_eq!(get(ready.metrics, "/metrics", wrong).await?.0, 401);
    let right = format!("Authorization: Bearer {TOKEN}\r\n");
    let (status, body) = get(ready.metrics, "/metrics", &right).await?;
    assert_eq!(status, 200);
    assert!(body.contains("cellchat_connected_clients"), "{body}");
    assert!(!body.contains(TOKEN), "the token is in a metric");
    // Probes need no token.
    assert_eq!(get(ready.metrics, "/health", "").await?.0, 200);
    assert!(!cluster.nodes[0].log_tail(100_000).contains(TOKEN));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_a_push_connection_that_stops_reading_pins_a_bounded_number_of_batches(
) -> anyhow::Result<()> {
    use futures::{SinkExt as _, StreamExt as _};
    use proto::push::{self, ClientFrame, PushHello, ServerFrame, Subscribe};
    const CHANNELS: u64 = 32;
    const PER_CHANNEL: u64 = 70;
    let rates = [
        "--user-rate",
        "100000",
        "--user-burst",
        "100000",
        "--conn-rate",
        "100000",
    ];
    let cluster = one_node("limits-push-budget", &rates)?;
    let ready = ready(&cluster)?;
    let metric = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0)
    };

    // About 1.1 MiB in each channel: two batches of at most 1 MiB each.
    let home = tempfile::tempdir()?;
    let client = cellchat_client::Client::connect(cellchat_client::ClientConfig {
        identity: Some(cellchat_client::Identity::ephemeral("filler", None)),
        config_dir: Some(home.path().to_path_buf()),
        token: Some(cluster.token()?.parse()?),
        ..cellchat_client::ClientConfig::new(cluster.cluster.clone(), cluster.discovery_port)
    })
    .await?;
    let sends = (0..CHANNELS * PER_CHANNEL).map(|i| {
        let client = client.clone();
        async move {
            client
                .send(&format!("c{}", i % CHANNELS), vec![b'x'; 16_000])
                .await
        }
    });
    let results: Vec<_> = futures::stream::iter(sends)
        .buffer_unordered(32)
        .collect()
        .await;
    for result in results {
        result?;
    }
    let (_, before) = get(ready.metrics, "/metrics", "").await?;
    let encoded_before = metric(&before, "cellchat_push_batches_encoded_total");

    // A push client with a small receive window subscribes to every channel, then reads nothing.
    let socket = TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(64 << 10)?;
    let stream = socket.connect(ready.client).await?;
    let verifier = proto::tls::CaVerifier::new(proto::tls::Trust::FirstUse);
    let config = proto::tls::client_config(verifier, proto::tls::ALPN_PUSH);
    let mut tls = proto::handshake(stream, config, proto::tls::any_node()).await?;
    let binding = proto::tls::stream_binding(&tls)?;
    tls.write_all(&push::PUSH_MAGIC).await?;
    let mut frames =
        tarpc::tokio_util::codec::Framed::new(tls, push::frame_codec(proto::FRAME_BYTES_MAX));
    let hello = push::encode_frame(&ClientFrame::Hello(PushHello::new(
        cluster.cluster.clone(),
        None,
    )));
    frames.send(hello.slice(push::LENGTH_BYTES..)).await?;
    let welcome = frames.next().await.context("no welcome")??;
    let ServerFrame::Welcome(welcome) = push::decode_server_frame(&welcome)? else {
        bail!("the node did not welcome the push connection");
    };
    let user = TestUser::new("pusher");
    let login = ClientFrame::Login(user.login(&welcome.challenge, &binding, &cluster.cluster));
    frames
        .send(push::encode_frame(&login).slice(push::LENGTH_BYTES..))
        .await?;
    for sub_id in 0..CHANNELS {
        let subscribe = ClientFrame::Subscribe(Subscribe {
            sub_id,
            channel: format!("c{sub_id}"),
            after_seq: 0,
            read_token: 0,
        });
        frames
            .send(push::encode_frame(&subscribe).slice(push::LENGTH_BYTES..))
            .await?;
    }
    let deadline = Instant::now() + CLOSE_BOUND;
    loop {
        let (_, text) = get(ready.metrics, "/metrics", "").await?;
        if metric(&text, "cellchat_push_subscriptions") == CHANNELS {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the subscriptions never opened");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, stalled) = get(ready.metrics, "/metrics", "").await?;
    let built = metric(&stalled, "cellchat_push_batches_encoded_total") - encoded_before;
    // What the socket buffers took (the node's send buffer is at most 4 MiB) plus the 4 MiB
    // budget; without a budget every subscription builds its first batch at once.
    assert!(
        (1..=12).contains(&built),
        "{built} batches of 1 MiB built for a connection that reads nothing"
    );

    // Reading again, every message arrives.
    let mut delivered = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while delivered < CHANNELS * PER_CHANNEL {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = tokio::time::timeout(left, frames.next())
            .await
            .context("not every message arrived")?
            .context("the node closed the connection")??;
        if let ServerFrame::Batch { batch, .. } = push::decode_server_frame(&frame)? {
            delivered += batch.messages.len() as u64;
        }
    }
    assert_eq!(delivered, CHANNELS * PER_CHANNEL);
    Ok(())
}

fn first_page() -> proto::ChannelsRequest {
    proto::ChannelsRequest {
        after: None,
        limit: 100,
        read_token: 0,
    }
}
