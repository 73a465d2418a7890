//! UDP discovery: the datagram format and the sockets that nodes and clients use to find each
//! other on one host or LAN, plus RTT probes ([`PingSocket`]).
//!
//! # Datagram layout
//!
//! | field   | width    | encoding                                  |
//! |---------|----------|-------------------------------------------|
//! | magic   | 4 bytes  | [`MAGIC`], `b"CCHT"`                      |
//! | version | 2 bytes  | little-endian u16, [`DISCOVERY_VERSION`]  |
//! | sent_ms | 8 bytes  | little-endian u64, the sender's clock; 0 when unsealed |
//! | tag     | 32 bytes | HMAC-SHA256 of every other byte under the [`DiscoveryKey`]; zeros when unsealed |
//! | body    | the rest | postcard-encoded [`Packet`], no trailing bytes |
//!
//! A whole datagram is at most [`PACKET_BYTES_MAX`] bytes, which fits one Ethernet frame, so it
//! is never fragmented. There is no checksum beyond UDP's own: a damaged body fails to decode.
//!
//! # Sealed announcements
//!
//! Anyone who can send a datagram to the port can claim anything in one, and the formation rule
//! acts on what members announce (join a leader, wait for a lower id). So members seal what
//! they send with a key only members hold ([`DiscoveryKey`], derived from the cluster CA's
//! key), and a socket that has the key ([`DiscoverySocket::sealed_with`]) accepts an
//! [`Packet::Announce`] only when its seal verifies and its `sent_ms` is within
//! [`SEAL_AGE_MAX_MS`] of the receiver's clock (a captured announcement replays for two
//! minutes at most). Clients, admin tools and enrolling nodes hold no key: to them an
//! announcement is a hint, and the TLS handshake that follows proves (or refutes) it.
//!
//! # Sockets
//!
//! Nodes on one host share the well-known [`DEFAULT_DISCOVERY_PORT`] through `SO_REUSEADDR` and
//! `SO_REUSEPORT` ([`DiscoverySocket::bind`]). On Linux a broadcast reaches every socket bound to
//! the port, but a unicast datagram reaches only one of them. So whoever wants replies (a client
//! probing, a node measuring RTT) sends from its own ephemeral socket
//! ([`DiscoverySocket::ephemeral`]) and the answer goes back unicast to that source address.
//!
//! RTT probes need to reach one particular node, which a unicast to the shared port cannot
//! promise. So every node also binds a [`PingSocket`]: a private UDP socket on the IP and port
//! number of its TCP client listener (UDP and TCP port spaces are separate), which answers
//! [`Packet::Ping`] with [`Packet::PongStatus`] and drops everything else. A client pings the
//! `client_addr` it already knows from announcements and needs no TCP connection to measure a
//! node.
//!
//! Broadcasts go to a configured directed broadcast address, by default
//! [`DEFAULT_BROADCAST`] (127.255.255.255, loopback only). The limited broadcast address
//! 255.255.255.255 is refused.
//!
//! A node that listens on one address ([`DiscoverySocket::bind_on`]) keeps discovery on that
//! interface, so hosts elsewhere cannot feed it announcements (on loopback: nobody off the
//! machine). On Linux a UDP socket bound to a unicast address never receives a datagram sent to
//! a broadcast address, since delivery matches the bound address against the destination; so
//! such a node binds two sockets on the port: one on its own address, for unicast (`--join`
//! seeds, replies) and for sending, and one on the broadcast address itself, which receives
//! exactly the directed broadcasts. Sending stays on the unicast socket, so replies come back
//! to an address the node receives on.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
};

use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tracing::debug;

use crate::types::Role;

/// First four bytes of every discovery datagram.
pub const MAGIC: [u8; 4] = *b"CCHT";
/// Version of the discovery format; datagrams with another version are dropped.
///
/// Version 2 added [`NodeAnnounce::name`]. postcard is not self-describing, so a field added to
/// a struct changes the layout of every packet holding it; a version 1 node drops version 2
/// datagrams (and the reverse) with a log line instead of misreading them. Nodes of one
/// cluster run one release: the Raft RPC's member record changed in the same release.
///
/// Version 3 added the seal (`sent_ms` and `tag`) after the version.
pub const DISCOVERY_VERSION: u16 = 3;
/// Largest discovery datagram, header included, in bytes.
pub const PACKET_BYTES_MAX: usize = 1400;
/// Well-known UDP port that nodes share for discovery.
pub const DEFAULT_DISCOVERY_PORT: u16 = 7946;
/// Default broadcast address: loopback only, so discovery stays on this host unless configured.
pub const DEFAULT_BROADCAST: Ipv4Addr = Ipv4Addr::new(127, 255, 255, 255);

/// Receive buffer asked for on a [`PingSocket`], in bytes (4 MiB).
const PING_RECV_BUFFER_BYTES: usize = 4 << 20;

/// Bytes of the version field's end: magic and version.
const VERSION_END: usize = MAGIC.len() + 2;
/// Bytes of the seal: `sent_ms` and the tag.
const SEAL_LEN: usize = 8 + TAG_LEN;
const TAG_LEN: usize = 32;
/// Bytes before the postcard body: magic, version and seal.
const HEADER_LEN: usize = VERSION_END + SEAL_LEN;
/// How far a sealed announcement's `sent_ms` may be from the receiver's clock, either way:
/// longer than any sane clock skew between members, short enough that a replay goes stale.
pub const SEAL_AGE_MAX_MS: u64 = 120_000;

/// The key members seal discovery datagrams with. Its `Debug` never shows it.
#[derive(Clone)]
pub struct DiscoveryKey(ring::hmac::Key);

impl std::fmt::Debug for DiscoveryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DiscoveryKey(..)")
    }
}

impl DiscoveryKey {
    /// The key derived from `material`, a secret every member holds (the cluster CA's key).
    pub fn derive(material: &[u8]) -> DiscoveryKey {
        use sha2::Digest as _;
        let mut hash = sha2::Sha256::new();
        hash.update(b"cellchat discovery key v1\0");
        hash.update(material);
        DiscoveryKey(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            &hash.finalize(),
        ))
    }

    /// The tag over a datagram's bytes, the tag field excluded.
    fn tag(&self, datagram: &[u8]) -> ring::hmac::Tag {
        let mut context = ring::hmac::Context::with_key(&self.0);
        context.update(&datagram[..VERSION_END + 8]);
        context.update(&datagram[HEADER_LEN..]);
        context.sign()
    }
}

/// Whether `datagram` carries a seal made with `key` at a time within [`SEAL_AGE_MAX_MS`] of
/// `now_ms`. The tag is compared in constant time.
pub fn is_sealed_by(datagram: &[u8], key: &DiscoveryKey, now_ms: u64) -> bool {
    if datagram.len() < HEADER_LEN {
        return false;
    }
    let sent_ms = u64::from_le_bytes(
        datagram[VERSION_END..VERSION_END + 8]
            .try_into()
            .expect("8 bytes by the length check"),
    );
    if sent_ms.abs_diff(now_ms) > SEAL_AGE_MAX_MS {
        return false;
    }
    let expected = key.tag(datagram);
    let tag = &datagram[VERSION_END + 8..HEADER_LEN];
    bool::from(subtle::ConstantTimeEq::ct_eq(expected.as_ref(), tag))
}

/// Milliseconds since the Unix epoch by this machine's clock (0 if it is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a node tells others about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAnnounce {
    /// Cluster name.
    pub cluster: String,
    /// The node's id.
    pub node_id: u64,
    /// Address of its [`Chat`](crate::Chat) service.
    pub client_addr: SocketAddr,
    /// Address of its Raft RPC service.
    pub raft_addr: SocketAddr,
    /// Address of its metrics endpoint.
    pub metrics_addr: SocketAddr,
    /// Its Raft role.
    pub role: Role,
    /// The leader it follows, if any.
    pub leader: Option<u64>,
    /// Its current term.
    pub term: u64,
    /// Its applied log index.
    pub applied: u64,
    /// Whether it is a voter.
    pub voter: bool,
    /// When the process started, ms since the Unix epoch; tells a restart from a stale packet.
    pub started_ms: u64,
    /// The node's name (`server --name`); since discovery version 2.
    pub name: String,
}

/// One discovery datagram's body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Packet {
    /// A node's self-description; sent periodically by broadcast and in reply to a probe.
    Announce(NodeAnnounce),
    /// Asks every node of `cluster` that hears it to reply with an `Announce` to the sender.
    Probe {
        /// The cluster asked about.
        cluster: String,
        /// Chosen by the sender to match replies.
        nonce: u64,
        /// True from a client, false from a node.
        from_client: bool,
    },
    /// RTT probe; the receiver answers `Pong` with the same `nonce` and `sent_ns`.
    Ping {
        /// Chosen by the sender to match the reply.
        nonce: u64,
        /// The sender's monotonic clock in ns, echoed back so it needs no state.
        sent_ns: u64,
    },
    /// The first answer to `Ping`. Nodes now answer with [`PongStatus`](Packet::PongStatus);
    /// this variant stays so every later variant keeps its tag, and clients ignore it.
    Pong {
        /// The ping's nonce.
        nonce: u64,
        /// The ping's `sent_ns`.
        sent_ns: u64,
        /// The answering node.
        node_id: u64,
    },
    /// Answer to `Ping`: `Pong`'s fields plus what a client ranks and routes by. Appended after
    /// `Pong`, so every earlier variant keeps its encoding (no [`DISCOVERY_VERSION`] bump), and
    /// a decoder from before it drops it as malformed instead of misreading it.
    PongStatus {
        /// The ping's nonce.
        nonce: u64,
        /// The ping's `sent_ns`.
        sent_ns: u64,
        /// The answering node.
        node_id: u64,
        /// The answering node's cluster; sockets drop other clusters' answers.
        cluster: String,
        /// Its Raft role.
        role: Role,
        /// Its applied log index.
        applied: u64,
    },
}

/// What a node tells a pinger about itself in a [`Packet::PongStatus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeStatus {
    /// The node's id.
    pub node_id: u64,
    /// Its Raft role.
    pub role: Role,
    /// Its applied log index.
    pub applied: u64,
}

impl NodeStatus {
    /// The answer to a ping with `nonce` and `sent_ns` from this node of `cluster`.
    pub fn pong(&self, cluster: &str, nonce: u64, sent_ns: u64) -> Packet {
        Packet::PongStatus {
            nonce,
            sent_ns,
            node_id: self.node_id,
            cluster: cluster.to_owned(),
            role: self.role,
            applied: self.applied,
        }
    }
}

impl Packet {
    /// The cluster the packet is about; `None` for `Ping` (any node answers it) and `Pong`.
    pub fn cluster(&self) -> Option<&str> {
        match self {
            Packet::Announce(announce) => Some(&announce.cluster),
            Packet::Probe { cluster, .. } | Packet::PongStatus { cluster, .. } => Some(cluster),
            Packet::Ping { .. } | Packet::Pong { .. } => None,
        }
    }
}

/// Why a packet could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The encoded packet exceeds [`PACKET_BYTES_MAX`]; shorten the cluster name.
    #[error("discovery packet is {len} bytes, over the limit of {max}: shorten the cluster name")]
    TooLarge {
        /// Encoded length with header.
        len: usize,
        /// [`PACKET_BYTES_MAX`].
        max: usize,
    },
}

/// Why a datagram is not a packet we understand.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than the header.
    #[error("discovery datagram of {len} bytes is shorter than the header")]
    TooShort {
        /// Datagram length.
        len: usize,
    },
    /// Longer than [`PACKET_BYTES_MAX`].
    #[error("discovery datagram of {len} bytes is over the limit of {max}")]
    TooLarge {
        /// Datagram length (at least `max + 1`).
        len: usize,
        /// [`PACKET_BYTES_MAX`].
        max: usize,
    },
    /// Does not start with [`MAGIC`]: not ours.
    #[error("datagram has magic {found:02x?}, not cellchat discovery")]
    BadMagic {
        /// The first four bytes.
        found: [u8; 4],
    },
    /// A discovery version this build does not speak.
    #[error("discovery version {found} is unsupported (we speak {ours}): upgrade the older node")]
    UnsupportedVersion {
        /// The datagram's version.
        found: u16,
        /// [`DISCOVERY_VERSION`].
        ours: u16,
    },
    /// The body is not a valid postcard [`Packet`].
    #[error("malformed discovery body: {reason}")]
    Malformed {
        /// The postcard error.
        reason: String,
    },
    /// An announcement whose node name breaks the naming rule.
    #[error("discovery announcement with a bad node name: {reason}")]
    BadName {
        /// Which rule it breaks.
        reason: String,
    },
    /// A valid packet followed by extra bytes.
    #[error("discovery body has {count} trailing bytes")]
    TrailingBytes {
        /// Number of extra bytes.
        count: usize,
    },
}

/// Encodes `packet` as one datagram.
///
/// # Errors
///
/// [`EncodeError::TooLarge`] when the datagram would exceed [`PACKET_BYTES_MAX`].
pub fn encode(packet: &Packet) -> Result<Vec<u8>, EncodeError> {
    encode_with(packet, None)
}

/// Encodes `packet` as one datagram sealed with `key` at `now_ms`.
///
/// # Errors
///
/// As [`encode`].
pub fn encode_sealed(
    packet: &Packet,
    key: &DiscoveryKey,
    now_ms: u64,
) -> Result<Vec<u8>, EncodeError> {
    encode_with(packet, Some((key, now_ms)))
}

fn encode_with(
    packet: &Packet,
    seal: Option<(&DiscoveryKey, u64)>,
) -> Result<Vec<u8>, EncodeError> {
    let mut bytes = Vec::with_capacity(160);
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&DISCOVERY_VERSION.to_le_bytes());
    bytes.extend_from_slice(&seal.map_or(0, |(_, now_ms)| now_ms).to_le_bytes());
    bytes.extend_from_slice(&[0; TAG_LEN]);
    let mut bytes = postcard::to_extend(packet, bytes)
        .expect("postcard cannot fail on Packet: every field has a known length");
    if bytes.len() > PACKET_BYTES_MAX {
        return Err(EncodeError::TooLarge {
            len: bytes.len(),
            max: PACKET_BYTES_MAX,
        });
    }
    if let Some((key, _)) = seal {
        let tag = key.tag(&bytes);
        bytes[VERSION_END + 8..HEADER_LEN].copy_from_slice(tag.as_ref());
    }
    Ok(bytes)
}

/// Decodes one datagram. Never panics, whatever the bytes.
///
/// # Errors
///
/// A [`DecodeError`] naming the first check that failed: size, magic, version, body.
pub fn decode(bytes: &[u8]) -> Result<Packet, DecodeError> {
    if bytes.len() > PACKET_BYTES_MAX {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            max: PACKET_BYTES_MAX,
        });
    }
    let (Some(magic), Some(version)) = (bytes.get(..4), bytes.get(4..VERSION_END)) else {
        return Err(DecodeError::TooShort { len: bytes.len() });
    };
    if magic != MAGIC {
        let mut found = [0u8; 4];
        found.copy_from_slice(magic);
        return Err(DecodeError::BadMagic { found });
    }
    let found = u16::from_le_bytes([version[0], version[1]]);
    if found != DISCOVERY_VERSION {
        return Err(DecodeError::UnsupportedVersion {
            found,
            ours: DISCOVERY_VERSION,
        });
    }
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::TooShort { len: bytes.len() });
    }
    let (packet, rest) =
        postcard::take_from_bytes::<Packet>(&bytes[HEADER_LEN..]).map_err(|e| {
            DecodeError::Malformed {
                reason: e.to_string(),
            }
        })?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes { count: rest.len() });
    }
    // Names are shown to people; an empty one is shown as the node's id.
    if let Packet::Announce(announce) = &packet {
        if !announce.name.is_empty() {
            crate::node_name::validate_name(&announce.name).map_err(|e| DecodeError::BadName {
                reason: e.to_string(),
            })?;
        }
    }
    Ok(packet)
}

/// A UDP socket for discovery that drops datagrams it cannot decode or that name another
/// cluster.
///
/// Needs a tokio runtime: the constructors panic outside one.
#[derive(Debug)]
pub struct DiscoverySocket {
    /// Sends everything and receives unicast (and, when bound to 0.0.0.0, broadcasts too).
    socket: UdpSocket,
    /// Bound to the broadcast address, when `socket` is bound to one unicast address.
    broadcasts: Option<UdpSocket>,
    broadcast: SocketAddrV4,
    cluster: String,
    /// Seals what this socket sends, and admits only sealed announcements.
    key: Option<DiscoveryKey>,
}

impl DiscoverySocket {
    /// Binds `0.0.0.0:port`, shared with other processes (`SO_REUSEADDR`, `SO_REUSEPORT`), with
    /// `SO_BROADCAST` on. Broadcasts go to `broadcast:port`. Port 0 picks a free port, which
    /// others may then share (tests do this).
    ///
    /// # Errors
    ///
    /// `InvalidInput` for `broadcast` 255.255.255.255, else the `io::Error` from the socket calls.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn bind(port: u16, broadcast: Ipv4Addr, cluster: impl Into<String>) -> io::Result<Self> {
        check_not_limited_broadcast(broadcast)?;
        let socket = shared_udp_socket()?;
        Self::finish(
            socket,
            Ipv4Addr::UNSPECIFIED,
            port,
            broadcast,
            None,
            cluster.into(),
        )
    }

    /// Like [`bind`](Self::bind), but on `host`, the address the node listens on: a specific
    /// IPv4 address gets a socket on `host:port` and one on `broadcast:port` (see the module
    /// doc for why), so nothing arriving on another interface reaches discovery. An unspecified
    /// or IPv6 `host` binds `0.0.0.0:port` as [`bind`](Self::bind) does (discovery is IPv4).
    ///
    /// # Errors
    ///
    /// `InvalidInput` for `broadcast` 255.255.255.255, else the `io::Error` from the socket calls,
    /// which for the broadcast socket names the address: it must be the broadcast address of
    /// one of this machine's interfaces (for example 127.255.255.255 for loopback).
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn bind_on(
        host: IpAddr,
        port: u16,
        broadcast: Ipv4Addr,
        cluster: impl Into<String>,
    ) -> io::Result<Self> {
        let host = match host {
            IpAddr::V4(v4) if !v4.is_unspecified() => v4,
            _ => return Self::bind(port, broadcast, cluster),
        };
        check_not_limited_broadcast(broadcast)?;
        let socket = shared_udp_socket()?;
        let mut this = Self::finish(socket, host, port, broadcast, None, cluster.into())?;
        let port = this.socket.local_addr()?.port();
        let receiver = shared_udp_socket()?;
        receiver.set_nonblocking(true)?;
        let bound = receiver.bind(&SocketAddr::from((broadcast, port)).into());
        bound.map_err(|e| {
            let reason = format!(
                "cannot bind the broadcast address {broadcast}:{port} ({e}); it must be the \
                 broadcast address of the interface of {host}"
            );
            io::Error::new(e.kind(), reason)
        })?;
        this.broadcasts = Some(UdpSocket::from_std(receiver.into())?);
        Ok(this)
    }

    /// Binds a private ephemeral port with `SO_BROADCAST` on, for probes and pings whose replies
    /// come back by unicast. Broadcasts go to `broadcast:discovery_port`.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for `broadcast` 255.255.255.255, else the `io::Error` from the socket calls.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn ephemeral(
        discovery_port: u16,
        broadcast: Ipv4Addr,
        cluster: impl Into<String>,
    ) -> io::Result<Self> {
        check_not_limited_broadcast(broadcast)?;
        let socket = new_udp_socket()?;
        Self::finish(
            socket,
            Ipv4Addr::UNSPECIFIED,
            0,
            broadcast,
            Some(discovery_port),
            cluster.into(),
        )
    }

    /// Binds `host:port`, and aims broadcasts at `broadcast_port` (or at the bound port when
    /// `None`).
    fn finish(
        socket: Socket,
        host: Ipv4Addr,
        port: u16,
        broadcast: Ipv4Addr,
        broadcast_port: Option<u16>,
        cluster: String,
    ) -> io::Result<Self> {
        socket.set_broadcast(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&SocketAddr::from((host, port)).into())?;
        let socket = UdpSocket::from_std(socket.into())?;
        let bound_port = socket.local_addr()?.port();
        let broadcast = SocketAddrV4::new(broadcast, broadcast_port.unwrap_or(bound_port));
        Ok(Self {
            socket,
            broadcasts: None,
            broadcast,
            cluster,
            key: None,
        })
    }

    /// This socket, sealing every datagram it sends with `key` and dropping every announcement
    /// not sealed with it (see "Sealed announcements" in the module doc). For members.
    pub fn sealed_with(mut self, key: DiscoveryKey) -> Self {
        self.key = Some(key);
        self
    }

    /// The bound address (`0.0.0.0:port`, or the host's with [`bind_on`](Self::bind_on)).
    ///
    /// # Errors
    ///
    /// The `io::Error` from `getsockname`.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Where [`send_broadcast`](Self::send_broadcast) sends.
    pub fn broadcast_addr(&self) -> SocketAddr {
        SocketAddr::V4(self.broadcast)
    }

    /// The cluster whose packets [`recv`](Self::recv) accepts.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// Sends `packet` to the broadcast address.
    ///
    /// # Errors
    ///
    /// `InvalidInput` wrapping an [`EncodeError`], or the `io::Error` from sending.
    pub async fn send_broadcast(&self, packet: &Packet) -> io::Result<()> {
        self.send_to(packet, SocketAddr::V4(self.broadcast)).await
    }

    /// Sends `packet` to `addr` (a reply, or a `--join host:port` seed).
    ///
    /// # Errors
    ///
    /// `InvalidInput` for 255.255.255.255 or wrapping an [`EncodeError`], or the `io::Error`
    /// from sending.
    pub async fn send_to(&self, packet: &Packet, addr: SocketAddr) -> io::Result<()> {
        if let IpAddr::V4(ip) = addr.ip() {
            check_not_limited_broadcast(ip)?;
        }
        let bytes = match &self.key {
            Some(key) => encode_sealed(packet, key, now_ms()),
            None => encode(packet),
        };
        let bytes = bytes.map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let sent = self.socket.send_to(&bytes, addr).await?;
        // UDP sends whole datagrams or fails; a short count would be a kernel contract breach.
        assert_eq!(sent, bytes.len(), "short UDP send");
        Ok(())
    }

    /// The next datagram from the unicast socket or the broadcast one.
    async fn recv_from_either(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let Some(broadcasts) = &self.broadcasts else {
            return self.socket.recv_from(buf).await;
        };
        loop {
            let socket = tokio::select! {
                ready = self.socket.readable() => ready.map(|()| &self.socket)?,
                ready = broadcasts.readable() => ready.map(|()| broadcasts)?,
            };
            match socket.try_recv_from(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                received => return received,
            }
        }
    }

    /// Waits for the next packet of our cluster (or a `Ping`/`Pong`) and returns it with its
    /// source address. Undecodable datagrams and other clusters' packets are dropped with a
    /// `debug` log.
    ///
    /// # Errors
    ///
    /// The `io::Error` from receiving, except ICMP-caused refusals, which are skipped.
    pub async fn recv(&self) -> io::Result<(Packet, SocketAddr)> {
        // One byte more than the limit, so an oversized datagram shows as too large instead of
        // being silently truncated to a valid-looking prefix.
        let mut buf = [0u8; PACKET_BYTES_MAX + 1];
        loop {
            let (len, from) = match self.recv_from_either(&mut buf).await {
                Ok(received) => received,
                Err(e) if is_icmp_noise(&e) => {
                    debug!(error = %e, "discovery recv error from an earlier send, skipped");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let packet = match decode(&buf[..len]) {
                Ok(packet) => packet,
                Err(e) => {
                    debug!(%from, len, error = %e, "dropped undecodable discovery datagram");
                    continue;
                }
            };
            match packet.cluster() {
                Some(theirs) if theirs != self.cluster => {
                    debug!(%from, cluster = theirs, "dropped discovery packet of another cluster");
                }
                _ => match (&self.key, &packet) {
                    (Some(key), Packet::Announce(a))
                        if !is_sealed_by(&buf[..len], key, now_ms()) =>
                    {
                        debug!(%from, node = a.node_id, "dropped an announcement without a member's seal");
                    }
                    _ => return Ok((packet, from)),
                },
            }
        }
    }
}

/// A node's unicast RTT-probe socket: bound to the IP and port number of its TCP client
/// listener, it answers every [`Packet::Ping`] with a [`Packet::PongStatus`] and drops anything
/// else with a `debug` log.
///
/// Unlike [`DiscoverySocket::bind`] it does not share its port (no `SO_REUSEPORT`), so a ping
/// sent to it reaches this node and no other.
///
/// Needs a tokio runtime: the constructor panics outside one.
#[derive(Debug)]
pub struct PingSocket {
    socket: UdpSocket,
    cluster: String,
}

impl PingSocket {
    /// Binds `addr` (the client listener's address, with its real port).
    ///
    /// # Errors
    ///
    /// The `io::Error` from the socket calls, for example `AddrInUse` when another process
    /// holds that UDP port.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn bind(addr: SocketAddr, cluster: impl Into<String>) -> io::Result<Self> {
        let domain = if addr.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        };
        let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
        socket.set_nonblocking(true)?;
        // Every client pings every node each probe interval: 10,000 clients send a node 10,000
        // pings/s, and the default buffer (~200 KiB, a few hundred small datagrams) overflows
        // whenever the responder waits a few ms for a core. The kernel caps the size at
        // net.core.rmem_max; a smaller buffer only means more lost pings, which clients retry.
        if let Err(e) = socket.set_recv_buffer_size(PING_RECV_BUFFER_BYTES) {
            debug!(error = %e, "ping socket keeps the default receive buffer");
        }
        socket.bind(&addr.into())?;
        Ok(Self {
            socket: UdpSocket::from_std(socket.into())?,
            cluster: cluster.into(),
        })
    }

    /// The bound address.
    ///
    /// # Errors
    ///
    /// The `io::Error` from `getsockname`.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Answers pings until the task is aborted; `status` is asked once per ping. Receive errors
    /// are logged and the loop goes on after a short pause, so nothing a peer sends stops it.
    pub async fn serve(self, status: impl Fn() -> NodeStatus) {
        // One byte over the limit, as in `DiscoverySocket::recv`, so oversized datagrams show.
        let mut buf = [0u8; PACKET_BYTES_MAX + 1];
        loop {
            let (len, from) = match self.socket.recv_from(&mut buf).await {
                Ok(received) => received,
                Err(e) if is_icmp_noise(&e) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "ping socket receive failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(reply) = answer_ping(&buf[..len], &self.cluster, &status) else {
                continue;
            };
            match encode(&reply) {
                Ok(bytes) => {
                    if let Err(e) = self.socket.send_to(&bytes, from).await {
                        debug!(error = %e, %from, "pong failed");
                    }
                }
                Err(e) => debug!(error = %e, "pong not encodable"),
            }
        }
    }
}

/// What a [`PingSocket`] answers to `datagram`: a [`Packet::PongStatus`] for a `Ping`, `None`
/// (with a `debug` log) for anything else, undecodable bytes included. Never panics; `status`
/// is called only for a ping.
pub fn answer_ping(
    datagram: &[u8],
    cluster: &str,
    status: impl FnOnce() -> NodeStatus,
) -> Option<Packet> {
    match decode(datagram) {
        Ok(Packet::Ping { nonce, sent_ns }) => Some(status().pong(cluster, nonce, sent_ns)),
        Ok(other) => {
            debug!(packet = ?other, "ping socket dropped a packet that is not a ping");
            None
        }
        Err(e) => {
            debug!(len = datagram.len(), error = %e, "ping socket dropped an undecodable datagram");
            None
        }
    }
}

fn new_udp_socket() -> io::Result<Socket> {
    Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
}

/// A UDP socket that shares its port with the other nodes of the machine.
fn shared_udp_socket() -> io::Result<Socket> {
    let socket = new_udp_socket()?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    Ok(socket)
}

fn check_not_limited_broadcast(ip: Ipv4Addr) -> io::Result<()> {
    if ip == Ipv4Addr::BROADCAST {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "refusing to send to 255.255.255.255: use a directed broadcast such as 127.255.255.255",
        ));
    }
    Ok(())
}

/// Errors that an earlier datagram's ICMP reply can leave on a UDP socket.
fn is_icmp_noise(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use test_case::test_case;

    fn announce(cluster: &str) -> NodeAnnounce {
        NodeAnnounce {
            cluster: cluster.to_owned(),
            node_id: 7,
            client_addr: "127.0.0.1:7000".parse().expect("addr"),
            raft_addr: "[::1]:7001".parse().expect("addr"),
            metrics_addr: "10.1.2.3:9100".parse().expect("addr"),
            role: Role::Follower,
            leader: Some(3),
            term: 12,
            applied: 4_000,
            voter: true,
            started_ms: 1_700_000_000_000,
            name: "n7".to_owned(),
        }
    }

    fn with_header(body: &[u8]) -> Vec<u8> {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&DISCOVERY_VERSION.to_le_bytes());
        bytes.extend_from_slice(&[0; SEAL_LEN]);
        bytes.extend_from_slice(body);
        bytes
    }

    #[test]
    fn a_seal_verifies_only_with_its_key_unchanged_and_fresh() {
        let key = DiscoveryKey::derive(b"members' secret");
        let now = 1_800_000_000_000;
        let packet = Packet::Announce(announce("c"));
        let sealed = encode_sealed(&packet, &key, now).expect("encode");
        assert_eq!(decode(&sealed), Ok(packet.clone()));
        assert!(is_sealed_by(&sealed, &key, now));
        assert!(is_sealed_by(&sealed, &key, now + SEAL_AGE_MAX_MS));
        assert!(
            !is_sealed_by(&sealed, &key, now + SEAL_AGE_MAX_MS + 1),
            "stale"
        );
        assert!(
            !is_sealed_by(&sealed, &key, now - SEAL_AGE_MAX_MS - 1),
            "from the future"
        );
        let other = DiscoveryKey::derive(b"a stranger's guess");
        assert!(!is_sealed_by(&sealed, &other, now));
        let unsealed = encode(&packet).expect("encode");
        assert!(!is_sealed_by(&unsealed, &key, now));
        assert!(!is_sealed_by(&unsealed, &key, 0));
        for at in 0..sealed.len() {
            let mut flipped = sealed.clone();
            flipped[at] ^= 1;
            assert!(
                !is_sealed_by(&flipped, &key, now),
                "a flip at byte {at} kept the seal"
            );
        }
        assert!(!is_sealed_by(&sealed[..HEADER_LEN - 1], &key, now));
        assert_eq!(format!("{key:?}"), "DiscoveryKey(..)");
    }

    #[test]
    fn an_announced_name_with_control_characters_is_refused_and_an_empty_one_is_not() {
        let mut hostile = announce("c");
        hostile.name = "\u{1b}[2Jn1".to_owned();
        let bytes = encode(&Packet::Announce(hostile)).expect("encode");
        assert!(matches!(decode(&bytes), Err(DecodeError::BadName { .. })));
        let mut unnamed = announce("c");
        unnamed.name = String::new();
        let bytes = encode(&Packet::Announce(unnamed.clone())).expect("encode");
        assert_eq!(decode(&bytes), Ok(Packet::Announce(unnamed)));
    }

    #[test]
    fn every_variant_round_trips() {
        let packets = [
            Packet::Announce(announce("c1")),
            Packet::Probe {
                cluster: "c1".into(),
                nonce: u64::MAX,
                from_client: true,
            },
            Packet::Ping {
                nonce: 1,
                sent_ns: 2,
            },
            Packet::Pong {
                nonce: 1,
                sent_ns: 2,
                node_id: 3,
            },
            status().pong("c1", 1, 2),
        ];
        for packet in packets {
            let bytes = encode(&packet).expect("encode");
            assert_eq!(&bytes[..4], b"CCHT");
            assert_eq!(decode(&bytes), Ok(packet));
        }
    }

    fn status() -> NodeStatus {
        NodeStatus {
            node_id: 9,
            role: Role::Leader,
            applied: 1234,
        }
    }

    #[test]
    fn earlier_variants_keep_their_tags() {
        // Postcard encodes the variant index first: appending `PongStatus` must not move them.
        let ping = encode(&Packet::Ping {
            nonce: 0,
            sent_ns: 0,
        })
        .expect("encode");
        assert_eq!(ping[HEADER_LEN], 2);
        assert_eq!(
            encode(&status().pong("c", 0, 0)).expect("encode")[HEADER_LEN],
            4
        );
    }

    #[test]
    fn a_ping_is_answered_with_the_nodes_status() {
        let ping = encode(&Packet::Ping {
            nonce: 41,
            sent_ns: 42,
        })
        .expect("encode");
        assert_eq!(
            answer_ping(&ping, "c1", status),
            Some(Packet::PongStatus {
                nonce: 41,
                sent_ns: 42,
                node_id: 9,
                cluster: "c1".into(),
                role: Role::Leader,
                applied: 1234,
            })
        );
    }

    #[test]
    fn everything_but_a_ping_is_dropped_without_asking_for_status() {
        let others = [
            Packet::Announce(announce("c1")),
            Packet::Probe {
                cluster: "c1".into(),
                nonce: 1,
                from_client: true,
            },
            Packet::Pong {
                nonce: 1,
                sent_ns: 2,
                node_id: 3,
            },
            status().pong("c1", 1, 2),
        ];
        let mut datagrams: Vec<Vec<u8>> =
            others.iter().map(|p| encode(p).expect("encode")).collect();
        datagrams.push(Vec::new());
        datagrams.push(b"ping".to_vec());
        datagrams.push(with_header(&[2, 1]));
        datagrams.push(vec![0; PACKET_BYTES_MAX + 1]);
        for datagram in &datagrams {
            let answer = answer_ping(datagram, "c1", || panic!("status asked for {datagram:?}"));
            assert_eq!(answer, None, "{datagram:?}");
        }
    }

    #[tokio::test]
    async fn a_ping_socket_answers_pings_and_survives_garbage() {
        let node = PingSocket::bind("127.0.0.1:0".parse().expect("addr"), "c-ping").expect("bind");
        let node_addr = node.local_addr().expect("addr");
        let server = tokio::spawn(node.serve(status));
        let client = DiscoverySocket::ephemeral(1, DEFAULT_BROADCAST, "c-ping").expect("bind");
        let raw = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        for garbage in [&b""[..], b"garbage", &with_header(&[9, 9, 9])] {
            raw.send_to(garbage, node_addr).await.expect("send");
        }
        let not_a_ping = encode(&Packet::Probe {
            cluster: "c-ping".into(),
            nonce: 1,
            from_client: true,
        })
        .expect("encode");
        raw.send_to(&not_a_ping, node_addr).await.expect("send");
        for nonce in 1..=3 {
            let ping = Packet::Ping { nonce, sent_ns: 7 };
            client.send_to(&ping, node_addr).await.expect("ping");
            let (reply, from) =
                tokio::time::timeout(std::time::Duration::from_secs(10), client.recv())
                    .await
                    .expect("a pong before the timeout")
                    .expect("recv");
            assert_eq!(reply, status().pong("c-ping", nonce, 7));
            assert_eq!(from, node_addr);
        }
        // Nothing came back for the garbage and the probe.
        let mut buf = [0u8; 64];
        let extra = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            raw.recv_from(&mut buf),
        )
        .await;
        assert!(
            extra.is_err(),
            "the ping socket answered a non-ping: {extra:?}"
        );
        assert!(!server.is_finished());
        server.abort();
    }

    #[test]
    fn cluster_of_each_variant() {
        assert_eq!(status().pong("p", 0, 0).cluster(), Some("p"));
        assert_eq!(Packet::Announce(announce("a")).cluster(), Some("a"));
        let probe = Packet::Probe {
            cluster: "b".into(),
            nonce: 0,
            from_client: false,
        };
        assert_eq!(probe.cluster(), Some("b"));
        assert_eq!(
            Packet::Ping {
                nonce: 0,
                sent_ns: 0
            }
            .cluster(),
            None
        );
        assert_eq!(
            Packet::Pong {
                nonce: 0,
                sent_ns: 0,
                node_id: 0
            }
            .cluster(),
            None
        );
    }

    #[test]
    fn encode_refuses_oversized_packets() {
        let packet = Packet::Announce(announce(&"x".repeat(PACKET_BYTES_MAX)));
        match encode(&packet) {
            Err(EncodeError::TooLarge { len, max }) => {
                assert!(len > max);
                assert_eq!(max, PACKET_BYTES_MAX);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn decode_refuses_oversized_datagrams() {
        let mut bytes = encode(&Packet::Ping {
            nonce: 1,
            sent_ns: 1,
        })
        .expect("encode");
        bytes.resize(PACKET_BYTES_MAX + 1, 0);
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::TooLarge {
                len: PACKET_BYTES_MAX + 1,
                max: PACKET_BYTES_MAX
            })
        );
    }

    #[test_case(&[] => DecodeError::TooShort { len: 0 }; "empty")]
    #[test_case(b"CCHT\x01" => DecodeError::TooShort { len: 5 }; "header cut")]
    #[test_case(b"CCHT\x03\x00\x00" => DecodeError::TooShort { len: 7 }; "seal cut")]
    #[test_case(b"XXXX\x01\x00\x02\x01\x02" => DecodeError::BadMagic { found: *b"XXXX" }; "magic")]
    #[test_case(b"CCHT\x01\x00\x02\x01\x02" =>
        DecodeError::UnsupportedVersion { found: 1, ours: 3 }; "the version before names")]
    #[test_case(b"CCHT\x02\x00\x02\x01\x02" =>
        DecodeError::UnsupportedVersion { found: 2, ours: 3 }; "the version before seals")]
    #[test_case(b"CCHT\x04\x00\x02\x01\x02" =>
        DecodeError::UnsupportedVersion { found: 4, ours: 3 }; "a later version")]
    fn decode_errors(bytes: &[u8]) -> DecodeError {
        decode(bytes).expect_err("must not decode")
    }

    #[test]
    fn decode_refuses_trailing_bytes() {
        assert_eq!(
            decode(&with_header(b"\x02\x01\x02\xff")),
            Err(DecodeError::TrailingBytes { count: 1 })
        );
    }

    #[test_case(&[]; "empty body")]
    #[test_case(&[9]; "unknown variant")]
    #[test_case(&[0, 200]; "cut string")]
    #[test_case(&[1, 1, 0xff]; "invalid utf-8")]
    fn decode_of_a_bad_body_is_malformed(body: &[u8]) {
        assert!(matches!(
            decode(&with_header(body)),
            Err(DecodeError::Malformed { .. })
        ));
    }

    #[test]
    fn decode_of_every_truncation_fails() {
        let bytes = encode(&Packet::Announce(announce("cluster-one"))).expect("encode");
        for len in 0..bytes.len() {
            assert!(
                decode(&bytes[..len]).is_err(),
                "prefix of {len} bytes decoded"
            );
        }
    }

    #[test]
    fn limited_broadcast_is_refused() {
        let err = check_not_limited_broadcast(Ipv4Addr::BROADCAST).expect_err("must refuse");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(check_not_limited_broadcast(DEFAULT_BROADCAST).is_ok());
    }

    fn role() -> impl Strategy<Value = Role> {
        prop_oneof![
            Just(Role::Leader),
            Just(Role::Follower),
            Just(Role::Learner),
            Just(Role::Candidate),
            Just(Role::Unknown),
        ]
    }

    /// Serde carries neither IPv6 scope id nor flow info, so generated addresses have none.
    fn socket_addr() -> impl Strategy<Value = SocketAddr> {
        any::<SocketAddr>().prop_map(|addr| match addr {
            SocketAddr::V6(v6) => SocketAddr::from((*v6.ip(), v6.port())),
            v4 => v4,
        })
    }

    prop_compose! {
        fn node_announce()(
            cluster in "[a-z0-9-]{0,64}",
            node_id: u64,
            addrs in (socket_addr(), socket_addr(), socket_addr()),
            role in role(),
            leader: Option<u64>,
            numbers: (u64, u64, u64),
            voter: bool,
            name in "[a-z0-9._-]{0,32}",
        ) -> NodeAnnounce {
            let (client_addr, raft_addr, metrics_addr) = addrs;
            let (term, applied, started_ms) = numbers;
            NodeAnnounce {
                cluster, node_id, client_addr, raft_addr, metrics_addr, role, leader, term,
                applied, voter, started_ms, name,
            }
        }
    }

    fn packet() -> impl Strategy<Value = Packet> {
        prop_oneof![
            node_announce().prop_map(Packet::Announce),
            ("[a-z0-9-]{0,64}", any::<u64>(), any::<bool>()).prop_map(
                |(cluster, nonce, from_client)| Packet::Probe {
                    cluster,
                    nonce,
                    from_client
                }
            ),
            (any::<u64>(), any::<u64>())
                .prop_map(|(nonce, sent_ns)| Packet::Ping { nonce, sent_ns }),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(nonce, sent_ns, node_id)| {
                Packet::Pong {
                    nonce,
                    sent_ns,
                    node_id,
                }
            }),
            (
                (any::<u64>(), any::<u64>(), any::<u64>()),
                "[a-z0-9-]{0,64}",
                role(),
                any::<u64>()
            )
                .prop_map(|((nonce, sent_ns, node_id), cluster, role, applied)| {
                    Packet::PongStatus {
                        nonce,
                        sent_ns,
                        node_id,
                        cluster,
                        role,
                        applied,
                    }
                }),
        ]
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2_000)) {
            // The result does not matter; returning at all is the property.
            let _ = decode(&bytes);
        }

        #[test]
        fn decode_never_panics_behind_a_valid_header(
            body in proptest::collection::vec(any::<u8>(), 0..1_500),
        ) {
            // Most bodies are rejected; those that decode must re-encode to the same bytes.
            let bytes = with_header(&body);
            if let Ok(packet) = decode(&bytes) {
                prop_assert_eq!(encode(&packet).expect("a decoded packet fits"), bytes);
            }
        }

        #[test]
        fn round_trip(packet in packet()) {
            let bytes = encode(&packet).expect("small packets fit");
            prop_assert!(bytes.len() <= PACKET_BYTES_MAX);
            prop_assert_eq!(decode(&bytes), Ok(packet));
        }

        #[test]
        fn answer_ping_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1_500)) {
            let answered = answer_ping(&with_header(&bytes), "c", status);
            // Only a ping is answered, and the answer echoes it.
            if let Some(Packet::PongStatus { nonce, sent_ns, .. }) = answered {
                prop_assert_eq!(decode(&with_header(&bytes)), Ok(Packet::Ping { nonce, sent_ns }));
            } else {
                prop_assert_eq!(answered, None);
            }
            let _ = answer_ping(&bytes, "c", status);
        }

        #[test]
        fn flipped_byte_never_panics(packet in packet(), at: prop::sample::Index, bit in 0u8..8) {
            let mut bytes = encode(&packet).expect("small packets fit");
            let at = at.index(bytes.len());
            bytes[at] ^= 1 << bit;
            // Either an error or some packet; a flip in a u64 can still decode.
            let _ = decode(&bytes);
        }
    }
}
