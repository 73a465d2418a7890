//! A user-space delay proxy for the `latency` nemesis (the kernel here has no netem).
//!
//! With `latency` on, node i binds its ports on 127.0.0.(11+i) but advertises 127.0.0.(31+i),
//! where one proxy per port forwards to it. Every peer and client therefore reaches node i
//! through its proxies, and the nemesis sets a delay that applies to every byte, both
//! directions, of every connection into that node. Order is kept: each direction is a FIFO of
//! chunks stamped with `read time + delay`, and a chunk is written once its time has come.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Chunks queued per direction before the reader waits (bounds memory under delay).
const QUEUE_CHUNKS: usize = 1024;
/// Largest chunk read at once.
const CHUNK_BYTES: usize = 64 * 1024;

/// The delay of one node's proxies, in ms; 0 forwards at once.
#[derive(Debug, Clone, Default)]
pub struct Delay(Arc<AtomicU64>);

impl Delay {
    /// Sets the one-way delay added to every chunk read from now on.
    pub fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::Relaxed);
    }

    /// The current delay.
    pub fn get(&self) -> Duration {
        Duration::from_millis(self.0.load(Ordering::Relaxed))
    }
}

/// Starts a proxy listening on `listen` that forwards every connection to `target`, delayed
/// by `delay`. It runs until the runtime shuts down.
///
/// # Errors
/// `listen` cannot be bound.
pub async fn spawn(listen: SocketAddr, target: SocketAddr, delay: Delay) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the delay proxy on {listen}"))?;
    tokio::spawn(async move {
        loop {
            let Ok((inbound, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let delay = delay.clone();
            tokio::spawn(async move {
                // The node may be down (killed, restarting): drop the connection, as a
                // refused connect would.
                let Ok(outbound) = TcpStream::connect(target).await else {
                    return;
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                let (in_read, in_write) = inbound.into_split();
                let (out_read, out_write) = outbound.into_split();
                tokio::spawn(pump(in_read, out_write, delay.clone()));
                tokio::spawn(pump(out_read, in_write, delay));
            });
        }
    });
    Ok(())
}

/// One direction: a reader stamps chunks, a writer releases them when due.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Delay) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUE_CHUNKS);
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        // The reader saw EOF: pass the half-close on after the queued bytes.
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let due = Instant::now() + delay.get();
                if tx.send((due, buf[..n].to_vec())).await.is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn forwards_in_order_and_adds_the_delay() {
        let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let target = echo.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.expect("accept");
            let mut buf = [0u8; 1024];
            loop {
                let n = s.read(&mut buf).await.expect("read");
                if n == 0 {
                    return;
                }
                s.write_all(&buf[..n]).await.expect("write");
            }
        });
        let listen = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let delay = Delay::default();
        spawn(listen, target, delay.clone()).await.expect("proxy");
        let mut c = TcpStream::connect(listen).await.expect("connect");
        c.write_all(b"a").await.expect("write");
        let mut one = [0u8; 1];
        c.read_exact(&mut one).await.expect("read");
        delay.set(40);
        let started = std::time::Instant::now();
        c.write_all(b"bc").await.expect("write");
        let mut two = [0u8; 2];
        c.read_exact(&mut two).await.expect("read");
        assert_eq!(&two, b"bc");
        // 40 ms each way through the proxy.
        assert!(started.elapsed() >= Duration::from_millis(80));
    }
}
