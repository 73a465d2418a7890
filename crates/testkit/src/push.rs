//! A push connection driven frame by frame, for tests of the push protocol: to one node of the
//! test's choosing, with or without the client heartbeats a real client sends.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures::{SinkExt as _, StreamExt as _};
use proto::push::{self, ClientFrame, PushHello, ServerFrame, CLIENT_HEARTBEAT_MS};
use tarpc::tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio::io::AsyncWriteExt as _;

use crate::TestUser;

/// One push connection to one node.
pub struct RawPush {
    frames: Framed<proto::TlsTcp, LengthDelimitedCodec>,
    /// The welcome's login challenge.
    pub challenge: [u8; 32],
    /// The TLS session's login binding.
    pub binding: [u8; 32],
    /// Send a heartbeat while waiting, as a live client does; off to play a client that
    /// vanished without closing its connection.
    pub heartbeats: bool,
    wrote: Instant,
}

impl RawPush {
    /// Connects to `addr` (trusting the first CA met), sends the magic and a hello for
    /// `cluster`, and reads the welcome.
    ///
    /// # Errors
    /// Connection errors, or no welcome.
    pub async fn hello(addr: SocketAddr, cluster: &str) -> anyhow::Result<RawPush> {
        let verifier = proto::tls::CaVerifier::new(proto::tls::Trust::FirstUse);
        let config = proto::tls::client_config(verifier, proto::tls::ALPN_PUSH);
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let mut tls = proto::handshake(stream, config, proto::tls::any_node()).await?;
        let binding = proto::tls::stream_binding(&tls)?;
        tls.write_all(&push::PUSH_MAGIC).await?;
        let mut frames = Framed::new(tls, push::frame_codec(proto::FRAME_BYTES_MAX));
        let hello = ClientFrame::Hello(PushHello::new(cluster.to_owned(), None));
        frames
            .send(push::encode_frame(&hello).slice(push::LENGTH_BYTES..))
            .await?;
        let first = tokio::time::timeout(Duration::from_secs(10), frames.next())
            .await
            .context("no welcome in time")?
            .context("closed before the welcome")??;
        let ServerFrame::Welcome(welcome) = push::decode_server_frame(&first)? else {
            bail!("the first frame was no welcome");
        };
        Ok(RawPush {
            frames,
            challenge: welcome.challenge,
            binding,
            heartbeats: true,
            wrote: Instant::now(),
        })
    }

    /// [`RawPush::hello`], then a login as `user` (who must be registered already).
    ///
    /// # Errors
    /// As `hello`, or the login could not be sent.
    pub async fn login(addr: SocketAddr, cluster: &str, user: &TestUser) -> anyhow::Result<Self> {
        let mut conn = RawPush::hello(addr, cluster).await?;
        let login = user.login(&conn.challenge, &conn.binding, cluster);
        conn.send(&ClientFrame::Login(login)).await?;
        Ok(conn)
    }

    /// Sends one frame.
    ///
    /// # Errors
    /// The connection is broken.
    pub async fn send(&mut self, frame: &ClientFrame) -> anyhow::Result<()> {
        let frame = push::encode_frame(frame).slice(push::LENGTH_BYTES..);
        self.frames.send(frame).await?;
        self.wrote = Instant::now();
        Ok(())
    }

    /// The next frame within `timeout`: `Ok(None)` when the node closed the connection.
    ///
    /// # Errors
    /// Nothing came in time, or the frame does not decode.
    pub async fn next(&mut self, timeout: Duration) -> anyhow::Result<Option<ServerFrame>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let beat = tokio::time::Instant::from_std(
                self.wrote + Duration::from_millis(CLIENT_HEARTBEAT_MS),
            );
            let wake = if self.heartbeats {
                beat.min(deadline)
            } else {
                deadline
            };
            match tokio::time::timeout_at(wake, self.frames.next()).await {
                Ok(None) | Ok(Some(Err(_))) => return Ok(None),
                Ok(Some(Ok(body))) => return Ok(Some(push::decode_server_frame(&body)?)),
                Err(_) if tokio::time::Instant::now() >= deadline => {
                    bail!("no frame within {timeout:?}")
                }
                Err(_) => self.send(&ClientFrame::Heartbeat).await?,
            }
        }
    }

    /// Reads frames until `pick` returns something for one, within `timeout`.
    ///
    /// # Errors
    /// None picked in time, or the connection closed first.
    pub async fn until<T>(
        &mut self,
        timeout: Duration,
        mut pick: impl FnMut(&ServerFrame) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(frame) = self.next(left).await? else {
                bail!("the node closed the connection");
            };
            if let Some(picked) = pick(&frame) {
                return Ok(picked);
            }
        }
    }
}
