//! The `push` and `push_plain` parts of `floor`: what delivering one message to many
//! subscribers cannot cost less than on this machine, with no Raft, no state and no node.
//!
//! A pusher (a runtime of its own, one thread per core, as a node's push runtime has) writes
//! each message, encoded once as the same `ServerFrame::Batch` a node pushes, to every
//! subscriber connection in turn: one task per thread, each owning its share of the
//! connections, so no delivery pays a task wake-up or a lock on the pushing side. Each
//! subscriber is a task on the harness's runtime reading its own connection, as every cellchat
//! client in the `fanout` scenario does, decoding each frame and reading the body's stamp. The
//! latency is from the moment the pusher starts writing a message to the moment a subscriber
//! has decoded it, per delivery, as `fanout` measures it minus the publisher's commit.
//!
//! `push` runs over the TLS 1.3 connections cellchat uses (a certificate chain of the same kind
//! as a node's, made for the run); `push_plain` over bare TCP, as the peers' drivers connect.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use proto::push::{self, ServerFrame};
use proto::tls::{self, CaVerifier, Fingerprint, Trust};
use proto::{MessageBatch, TlsTcp, WireMessage, FRAME_BYTES_MAX};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tarpc::tokio_util::codec::FramedRead;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::scenario::{now_micros, read_stamp, stamped_body};
use crate::stats::{Latencies, RunResult};
use crate::sut::procs::{cpu_time, threads_cpu_time};

/// One fan-out point: this many subscribers, this many messages a second to all of them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PushPoint {
    pub subscribers: usize,
    pub rate: f64,
}

impl std::str::FromStr for PushPoint {
    type Err = String;

    /// `SUBSCRIBERS@RATE`, e.g. `1000@20`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (subscribers, rate) = s
            .split_once('@')
            .ok_or_else(|| format!("{s:?}: expected SUBSCRIBERS@RATE, e.g. 1000@20"))?;
        let subscribers: usize = subscribers
            .parse()
            .map_err(|e| format!("{s:?}: subscribers: {e}"))?;
        let rate: f64 = rate.parse().map_err(|e| format!("{s:?}: rate: {e}"))?;
        if subscribers == 0 || !(rate > 0.0 && rate <= 10_000.0) {
            return Err(format!(
                "{s:?}: at least one subscriber and a rate above 0 and at most 10000 per second"
            ));
        }
        Ok(PushPoint { subscribers, rate })
    }
}

/// Name of the pusher's threads; their CPU is the pushing side's.
const PUSHER_THREAD: &str = "floor-pusher";

/// Connections set up at a time (each a TLS handshake on both ends).
const CONNECT_PARALLELISM: usize = 32;

/// How long the subscribers may take to receive the last message after it was written.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs one point over TLS (`tls`) or bare TCP for `warmup` then `duration`, with bodies of
/// `body` bytes.
///
/// # Errors
/// A connection cannot be set up, or a pusher task fails.
pub async fn run(
    point: PushPoint,
    tls: bool,
    duration: Duration,
    warmup: Duration,
    body: usize,
) -> Result<RunResult> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let pusher = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(PUSHER_THREAD)
        .enable_all()
        .build()
        .context("starting the pusher's runtime")?;
    let shape = Shape {
        point,
        duration,
        warmup,
        body,
        threads,
    };
    let result = if tls {
        let (server, client) = tls_configs()?;
        let accept = move |stream| proto::accept_tls(stream, server.clone());
        let connect = move |stream: TcpStream| {
            let client = client.clone();
            async move { proto::handshake(stream, client, tls::any_node()).await }
        };
        let (pushing, reading) = connect_pairs::<TlsTcp, TlsTcp, _, _, _, _>(
            &pusher,
            point.subscribers,
            accept,
            connect,
        )
        .await?;
        measure(&pusher, pushing, reading, &shape).await
    } else {
        let (pushing, reading) = connect_pairs(&pusher, point.subscribers, plain, plain).await?;
        measure(&pusher, pushing, reading, &shape).await
    };
    // Dropping a runtime blocks on its threads, which an async context must not do.
    pusher.shutdown_background();
    let mut result = result?;
    result.set("part", if tls { "push" } else { "push_plain" });
    Ok(result)
}

/// Either end of a bare TCP connection, with the socket options cellchat's connections have.
async fn plain(stream: TcpStream) -> std::io::Result<TcpStream> {
    proto::set_socket_options(&stream)?;
    Ok(stream)
}

/// A server config with a CA-signed certificate for [`tls::NODE_NAME`] (P-256, as a node's),
/// and a client config that trusts exactly that CA, both for push connections.
fn tls_configs() -> Result<(Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>)> {
    let pki = crate::pki::ca_and_leaf(&[tls::NODE_NAME])?;
    let ca = pki.ca.der().clone();
    let leaf = pki.leaf.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.leaf_key.serialize_der()));
    let chain: Vec<CertificateDer<'static>> = vec![leaf, ca.clone()];
    let mut server = rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(tls::VERSIONS)?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    server.alpn_protocols = vec![tls::ALPN_PUSH.to_vec()];
    let verifier = CaVerifier::new(Trust::Pinned(Fingerprint::of(&ca)));
    Ok((
        Arc::new(server),
        tls::client_config(verifier, tls::ALPN_PUSH),
    ))
}

/// Opens `count` loopback connections: the accepting ends (set up by `accept` on the pusher's
/// runtime) and the connecting ends (by `connect` on this one).
async fn connect_pairs<P, R, A, AF, C, CF>(
    pusher: &tokio::runtime::Runtime,
    count: usize,
    accept: A,
    connect: C,
) -> Result<(Vec<P>, Vec<R>)>
where
    P: Send + 'static,
    R: Send + 'static,
    A: Fn(TcpStream) -> AF + Send + Sync + 'static,
    AF: std::future::Future<Output = std::io::Result<P>> + Send + 'static,
    C: Fn(TcpStream) -> CF,
    CF: std::future::Future<Output = std::io::Result<R>>,
{
    let listener = {
        let _entered = pusher.enter();
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        TcpListener::from_std(std_listener)?
    };
    let addr = listener.local_addr()?;
    let accepting = pusher.spawn(async move {
        let accept = Arc::new(accept);
        let mut handshakes = tokio::task::JoinSet::new();
        for _ in 0..count {
            let (stream, _) = listener.accept().await?;
            let accept = accept.clone();
            handshakes.spawn(async move { accept(stream).await });
        }
        let mut streams = Vec::with_capacity(count);
        while let Some(done) = handshakes.join_next().await {
            streams.push(done.map_err(std::io::Error::other)??);
        }
        std::io::Result::Ok(streams)
    });
    let reading = futures::stream::iter(0..count)
        .map(|_| async {
            let stream = TcpStream::connect(addr).await?;
            connect(stream).await
        })
        .buffer_unordered(CONNECT_PARALLELISM)
        .try_collect::<Vec<R>>()
        .await
        .context("connecting the floor's subscribers")?;
    let pushing = accepting
        .await?
        .context("accepting the floor's subscribers")?;
    Ok((pushing, reading))
}

/// What one run does.
#[derive(Clone, Copy)]
struct Shape {
    point: PushPoint,
    duration: Duration,
    warmup: Duration,
    body: usize,
    /// The pusher's threads, and its tasks.
    threads: usize,
}

/// What one subscriber saw.
struct Tally {
    latencies: Latencies,
    received: u64,
}

async fn measure<P, R>(
    pusher: &tokio::runtime::Runtime,
    pushing: Vec<P>,
    reading: Vec<R>,
    shape: &Shape,
) -> Result<RunResult>
where
    P: AsyncWrite + Unpin + Send + 'static,
    R: AsyncRead + Unpin + Send + 'static,
{
    let Shape {
        point,
        duration,
        warmup,
        body,
        threads,
    } = *shape;
    let warm = (warmup.as_secs_f64() * point.rate).ceil() as u64;
    let measured = ((duration.as_secs_f64() * point.rate).ceil() as u64).max(1);
    let total = warm + measured;

    let subscribers: Vec<_> = reading
        .into_iter()
        .map(|stream| tokio::spawn(subscribe(stream, warm, total)))
        .collect();

    // The pusher's tasks, each with its share of the connections.
    let mut groups: Vec<Vec<P>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, stream) in pushing.into_iter().enumerate() {
        groups[i % threads].push(stream);
    }
    let mut to_groups = Vec::with_capacity(threads);
    let mut writers = Vec::with_capacity(threads);
    for mut streams in groups {
        let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
        to_groups.push(tx);
        writers.push(pusher.spawn(async move {
            while let Some(frame) = rx.recv().await {
                for stream in &mut streams {
                    stream.write_all(&frame).await?;
                    stream.flush().await?;
                }
            }
            // The streams close here, which ends a subscriber still waiting.
            std::io::Result::Ok(())
        }));
    }

    // The schedule, on the pusher's runtime as a node's apply would be.
    let interval = Duration::from_secs_f64(1.0 / point.rate);
    let schedule = pusher.spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut cpu_start = None;
        for counter in 0..total {
            tick.tick().await;
            if counter == warm {
                cpu_start = Some((
                    cpu_time(std::process::id()),
                    threads_cpu_time(PUSHER_THREAD),
                    Instant::now(),
                ));
            }
            let frame = message_frame(counter, body);
            for tx in &to_groups {
                // A writer gone has failed; its error comes from its task.
                let _ = tx.send(frame.clone());
            }
        }
        cpu_start
    });
    let cpu_start = schedule.await?;
    for writer in writers {
        writer
            .await?
            .context("the floor's pusher failed to write")?;
    }
    let (mut latencies, mut received) = (Latencies::new(), 0);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, futures::future::join_all(subscribers))
        .await
        .context("the floor's subscribers did not finish")?;
    let (cpu_total, cpu_pusher) = (
        cpu_time(std::process::id()),
        threads_cpu_time(PUSHER_THREAD),
    );
    for tally in drained {
        let tally = tally?;
        latencies.merge(&tally.latencies);
        received += tally.received;
    }
    let Some((Some(total_before), pusher_before, started)) = cpu_start else {
        bail!("the floor's process CPU could not be read");
    };
    let elapsed = started.elapsed();
    let pushed = cpu_pusher.saturating_sub(pusher_before);
    let everything = cpu_total.unwrap_or_default().saturating_sub(total_before);
    let per = |cpu: Duration| cpu.as_secs_f64() * 1e6 / measured as f64;

    let mut result = RunResult::new("floor", "machine", 0);
    result.subscribers = point.subscribers;
    result.rate_per_s = point.rate;
    result.body_bytes = body;
    result.duration_s = elapsed.as_secs_f64();
    result.ops = received;
    result.throughput_per_s = received as f64 / elapsed.as_secs_f64();
    result.latency_ms = latencies.summary();
    result.missing = Some((measured * point.subscribers as u64).saturating_sub(received));
    result.set("sent", measured);
    // As `fanout` reports it, per message sent with its deliveries: the pushing side in the
    // server's column, the subscribers in the harness's.
    result.set("server_cpu_us_per_msg", per(pushed));
    result.set(
        "harness_cpu_us_per_msg",
        per(everything.saturating_sub(pushed)),
    );
    Ok(result)
}

/// Reads frames until `total` messages came or the connection ends, timing those from
/// `warm` on.
async fn subscribe<R: AsyncRead + Unpin>(stream: R, warm: u64, total: u64) -> Tally {
    let mut frames = FramedRead::new(stream, push::frame_codec(FRAME_BYTES_MAX));
    let mut tally = Tally {
        latencies: Latencies::new(),
        received: 0,
    };
    let mut seen = 0;
    while seen < total {
        let Some(Ok(body)) = frames.next().await else {
            break;
        };
        let Ok(ServerFrame::Batch { batch, .. }) = push::decode_server_frame(&body) else {
            break;
        };
        for message in &batch.messages {
            seen += 1;
            let Some((_, counter, sent)) = read_stamp(&message.body) else {
                continue;
            };
            if counter >= warm {
                let now = now_micros();
                tally
                    .latencies
                    .record(Duration::from_micros(now.saturating_sub(sent)));
                tally.received += 1;
            }
        }
    }
    tally
}

/// The frame a node pushes for message `counter` of a channel, stamped now.
fn message_frame(counter: u64, body: usize) -> Bytes {
    let seq = counter + 1;
    let message = WireMessage {
        channel: "topic-0".to_owned(),
        seq,
        sender: "bench-publisher-0".to_owned(),
        body: stamped_body(body, 0, counter, now_micros()),
        at_ms: seq,
        client_seq: seq,
        ..WireMessage::default()
    };
    let batch = MessageBatch {
        channel: message.channel.clone(),
        messages: vec![message],
        head: seq,
        applied: seq,
        floor: 1,
    };
    push::encode_frame(&ServerFrame::Batch { sub_id: 1, batch })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_point_reads_as_subscribers_at_rate() {
        assert_eq!(
            "1000@20".parse::<PushPoint>(),
            Ok(PushPoint {
                subscribers: 1000,
                rate: 20.0
            })
        );
        for bad in ["1000", "0@20", "10@0", "10@-1", "x@20", "10@y", "10@20000"] {
            assert!(bad.parse::<PushPoint>().is_err(), "{bad}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_subscriber_gets_every_message_over_tls_and_plain() {
        for tls in [true, false] {
            let point = PushPoint {
                subscribers: 5,
                rate: 200.0,
            };
            let result = run(
                point,
                tls,
                Duration::from_millis(200),
                Duration::from_millis(50),
                100,
            )
            .await
            .unwrap();
            let sent = result.extra["sent"].as_u64().unwrap();
            assert_eq!(sent, 40);
            assert_eq!(result.missing, Some(0), "tls {tls}");
            assert_eq!(result.ops, sent * 5, "tls {tls}");
            assert!(result.latency_ms.p50 > 0.0);
        }
    }
}
