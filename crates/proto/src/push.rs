//! The push protocol: server-pushed subscriptions on a node's client address.
//!
//! A long poll ([`Chat::stream`](crate::Chat::stream)) costs a request, a response and a new
//! request per delivery. A push connection instead carries any number of subscriptions, and
//! the node writes each new batch of a channel to every subscriber as soon as it applies it.
//!
//! # Connection
//!
//! A client opens a plain TCP connection to the node's client address (the same port as the
//! tarpc [`Chat`](crate::Chat) service) and writes the 4 bytes [`PUSH_MAGIC`] first. Read as a
//! tarpc frame's big-endian length prefix they are larger than [`FRAME_BYTES_MAX`], so no
//! tarpc client can ever start a connection with them; the node peeks at the first 4 bytes of
//! every accepted connection and routes it to the push server or to tarpc. A node that does not
//! know the push protocol reads the magic as an oversized tarpc frame and closes the
//! connection, which a client takes as "push not supported" and falls back to long polls.
//!
//! After the magic both directions carry frames: a 4-byte big-endian body length, then a
//! postcard body. The client sends [`ClientFrame`]s, at most [`CLIENT_FRAME_BYTES_MAX`] each
//! (they are small); the node sends [`ServerFrame`]s, at most [`FRAME_BYTES_MAX`] each.
//!
//! | step | client | node |
//! | --- | --- | --- |
//! | 1 | magic, `Hello` | checks it like [`check_hello`](crate::check_hello), with [`PUSH_VERSION`] |
//! | 2 | | `Welcome` with a login challenge, or `Error { sub_id: None, .. }` and close |
//! | 3 | `Login`, signed over the challenge and this TLS session's binding as on a chat connection | checks it like [`Chat::login`](crate::Chat::login); `Error { sub_id: None, .. }` and close if it fails |
//! | 4 | `Subscribe { sub_id, channel, after_seq, read_token }` | waits for `read_token`, then `Batch`es from `after_seq + 1` on |
//! | 5 | `Unsubscribe { sub_id }` | stops that subscription; no more frames for it |
//! | 6 | `Typing { channel }` (v3) | passes `Typing { channel, user }` to the other users' connections subscribed to `channel`, on every node; drops it silently when the user may not read the channel or types faster than a few notes a second |
//! | 7 | `WatchPresence` (v3) | `Presence { full: true, .. }` with everyone online, then a `Presence` per change, a `Marker { channel, read_to }` whenever this user's read marker moves, and an `Added { channel, applied }` (v4; `applied` since v5) when someone starts a direct conversation with this user or invites them |
//! | 8 | `Heartbeat` (v3), when it wrote nothing for [`CLIENT_HEARTBEAT_MS`] | closes a connection silent for [`CLIENT_SILENCE_MS_MAX`] |
//!
//! Presence and typing are never stored: a user is online while one of their logged-in push
//! connections is open on some node, and nodes tell each other their online users.
//! A client may send its `Login` and `Subscribe` frames without waiting: the node reads them
//! in order. A `Subscribe` before a good `Login` is refused with `Unauthenticated` and closes
//! the connection.
//!
//! - A subscription's batches are in seq order and dense: each batch starts right after the
//!   previous one of the same `sub_id` ended (the first at `after_seq + 1`). Frames of
//!   different subscriptions interleave.
//! - An error for one subscription is `Error { sub_id: Some(id), .. }` and ends only that
//!   subscription. An error without a `sub_id` (a bad hello, a frame that does not decode, a
//!   subscribe before hello) is the last frame on the connection.
//! - When it has written nothing for [`HEARTBEAT_MS`], the node sends a `Heartbeat`. A client
//!   that hears nothing for [`SILENCE_MS_MAX`] treats the node as dead. A killed node's
//!   connection ends at once (RST or EOF); the silence limit catches a node that vanished
//!   without either (a partition or a frozen host).
//!
//! # Versioning
//!
//! [`PUSH_VERSION`] versions everything after the magic. Across versions, variant 0 of both
//! frame enums and the first field of [`PushHello`] keep their meaning, so a node can always
//! read a client's version and answer with a typed error it understands. `Error` stays variant
//! 1 of [`ServerFrame`] for the same reason.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::transport::FRAME_BYTES_MAX;
use crate::types::{Login, MessageBatch};

/// First 4 bytes of a push connection, from the client: ASCII `CCPS`. As a tarpc length prefix
/// this is 0x43435053, far above [`FRAME_BYTES_MAX`].
pub const PUSH_MAGIC: [u8; 4] = *b"CCPS";

const _: () = assert!(u32::from_be_bytes(PUSH_MAGIC) as usize > FRAME_BYTES_MAX);

/// Version of the push protocol (frames after the magic). Version 2: batches carry the
/// `WireMessage` of protocol version 3 (no client id), and reading needs a `Login`. Version 3:
/// typing and presence frames, and client heartbeats. Version 4: `Added`. Version 5: `Added`
/// carries the log index that made it.
pub const PUSH_VERSION: u16 = 5;

/// Largest client frame body a node accepts, in bytes (64 KiB). Client frames carry a channel
/// name and a few integers; a node never allocates more than this for one.
pub const CLIENT_FRAME_BYTES_MAX: usize = 64 << 10;

/// A node sends a heartbeat after this long without writing anything on a connection, in ms.
pub const HEARTBEAT_MS: u64 = 1_000;

/// A client treats a push connection as dead after this long without any frame, in ms (three
/// heartbeats).
pub const SILENCE_MS_MAX: u64 = 3 * HEARTBEAT_MS;

/// A client sends a heartbeat after this long without writing anything (since version 3), in
/// ms. It is what keeps its user online while it only listens.
pub const CLIENT_HEARTBEAT_MS: u64 = 2_000;

/// A node closes a push connection that sent nothing for this long, in ms (five client
/// heartbeats). A killed client's connection ends at once; this limit catches a client whose
/// host vanished, so its user goes offline anyway. It is generous because a client on a loaded
/// machine may be late.
pub const CLIENT_SILENCE_MS_MAX: u64 = 5 * CLIENT_HEARTBEAT_MS;

/// How long a client shows that someone is typing after the last typing frame, in ms. A
/// typing client sends a new frame every [`TYPING_RENEW_MS`] while keys arrive, so the
/// indicator stays on while they type and goes off on its own when they stop or die.
pub const TYPING_SHOW_MS: u64 = 6_000;

/// A typing client sends at most one typing frame per channel this often, in ms.
pub const TYPING_RENEW_MS: u64 = 3_000;

/// Length of the frame length prefix, in bytes.
pub const LENGTH_BYTES: usize = 4;

/// The client's first frame on a push connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushHello {
    /// The client's [`PUSH_VERSION`]; always the first field.
    pub version: u16,
    /// The cluster the client means to talk to.
    pub cluster: String,
    /// A name for logs only; it proves nothing.
    pub client_name: Option<String>,
}

impl PushHello {
    /// A hello for this crate's [`PUSH_VERSION`].
    pub fn new(cluster: impl Into<String>, client_name: Option<String>) -> Self {
        Self {
            version: PUSH_VERSION,
            cluster: cluster.into(),
            client_name,
        }
    }
}

/// The node's check of a [`PushHello`]: same version, same cluster.
///
/// # Errors
///
/// [`ApiError::UnsupportedProtocol`] or [`ApiError::WrongCluster`], version checked first.
pub fn check_push_hello(hello: &PushHello, our_cluster: &str) -> Result<(), ApiError> {
    if hello.version != PUSH_VERSION {
        return Err(ApiError::UnsupportedProtocol {
            ours: PUSH_VERSION,
            theirs: hello.version,
        });
    }
    if hello.cluster != our_cluster {
        return Err(ApiError::WrongCluster {
            ours: our_cluster.to_owned(),
            theirs: hello.cluster.clone(),
        });
    }
    Ok(())
}

/// Starts a subscription on a push connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscribe {
    /// Chosen by the client, unique among its open subscriptions on this connection.
    pub sub_id: u64,
    /// Channel to read.
    pub channel: String,
    /// Deliver messages with seq strictly greater than this.
    pub after_seq: u64,
    /// The node first waits until it has applied this log index (monotonic reads).
    pub read_token: u64,
}

/// Frames a client sends after [`PUSH_MAGIC`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientFrame {
    /// Variant 0 in every version: the version check, first on the connection.
    Hello(PushHello),
    /// Opens a subscription.
    Subscribe(Subscribe),
    /// Ends a subscription; unknown ids are ignored.
    Unsubscribe {
        /// The subscription to end.
        sub_id: u64,
    },
    /// Logs in, once, before the first subscription (since version 2).
    Login(Login),
    /// The user is typing in `channel` (since version 3). The node passes it to the other users
    /// subscribed to the channel, on every node; it is never stored. A user must be admitted
    /// to the channel; a typing frame that is not, or that comes faster than the node's limit,
    /// is dropped without an answer.
    Typing {
        /// The channel typed in.
        channel: String,
    },
    /// Asks for [`ServerFrame::Presence`] frames on this connection (since version 3): first
    /// every user online in the cluster, then each change.
    WatchPresence,
    /// Sent when the client wrote nothing for [`CLIENT_HEARTBEAT_MS`] (since version 3).
    Heartbeat,
}

/// The node's answer to a good [`PushHello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushWelcome {
    /// The node that answered.
    pub node_id: u64,
    /// The node's [`PUSH_VERSION`].
    pub version: u16,
    /// How often the node sends a heartbeat when idle, in ms.
    pub heartbeat_ms: u64,
    /// What the client's `Login` signs (since version 2).
    pub challenge: [u8; 32],
}

/// Frames a node sends on a push connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerFrame {
    /// Variant 0 in every version: the answer to a good hello.
    Welcome(PushWelcome),
    /// Variant 1 in every version: an error. With a `sub_id`, that subscription has ended;
    /// without one, the connection closes after this frame.
    Error {
        /// The subscription it concerns, or `None` for the whole connection.
        sub_id: Option<u64>,
        /// What went wrong.
        error: ApiError,
    },
    /// The next messages of a subscription; `batch.applied` is a read token.
    Batch {
        /// The subscription.
        sub_id: u64,
        /// Messages right after the previous batch of this subscription.
        batch: MessageBatch,
    },
    /// Sent when the node wrote nothing for [`HEARTBEAT_MS`].
    Heartbeat {
        /// The node's applied log index.
        applied: u64,
    },
    /// `user` is typing in `channel`, a channel this connection subscribes to (since version
    /// 3). Show it for [`TYPING_SHOW_MS`], or until a message of `user` arrives there.
    Typing {
        /// The channel.
        channel: String,
        /// Who types.
        user: String,
    },
    /// Who came online and who went offline (since version 3), after
    /// [`ClientFrame::WatchPresence`]. The first one is `full`: `online` is everyone online
    /// and the client's list starts over from it; later ones are changes.
    Presence {
        /// Users now online.
        online: Vec<String>,
        /// Users now offline.
        offline: Vec<String>,
        /// `online` is the whole list.
        full: bool,
    },
    /// This user's read marker in `channel` moved to `read_to` (since version 3), on any of
    /// their clients; sent to connections that watch presence.
    Marker {
        /// The channel.
        channel: String,
        /// The new marker.
        read_to: u64,
    },
    /// Someone started a direct conversation with this user, or invited them to a private
    /// channel (since version 4); sent to connections that watch presence.
    Added {
        /// The channel: a direct conversation (`dm-`), or the private channel invited to.
        channel: String,
        /// The log index that added the user (since version 5): a read token under which any
        /// node shows the channel, since the client's next read may go to another node than
        /// the one that told it.
        applied: u64,
    },
}

/// Postcard's variant index of [`ServerFrame::Batch`], for [`encode_batch_frame`].
const BATCH_VARIANT: u32 = 2;

/// Why a push frame could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix names more bytes than the limit allows.
    #[error("frame of {len} bytes is over the limit of {max}")]
    TooLarge {
        /// Announced body length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The body is not a valid frame of this version.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Encodes one frame: length prefix and postcard body.
///
/// # Panics
///
/// If the body exceeds [`FRAME_BYTES_MAX`] (callers size batches below it) or serde fails,
/// which it cannot for these types.
pub fn encode_frame<T: Serialize>(frame: &T) -> Bytes {
    let mut out = BytesMut::with_capacity(64);
    out.put_u32(0);
    let mut out = postcard::to_extend(frame, out).expect("push frames always serialize");
    let len = out.len() - LENGTH_BYTES;
    assert!(len <= FRAME_BYTES_MAX, "push frame of {len} bytes");
    out[..LENGTH_BYTES].copy_from_slice(&(len as u32).to_be_bytes());
    out.freeze()
}

/// The postcard body of a [`MessageBatch`], to be encoded once and shared by every subscriber
/// at the same position ([`encode_batch_frame`]).
///
/// # Panics
///
/// If serde fails, which it cannot for this type.
pub fn encode_batch_body(batch: &MessageBatch) -> Bytes {
    Bytes::from(postcard::to_allocvec(batch).expect("batches always serialize"))
}

/// The head of a `ServerFrame::Batch { sub_id, batch }` frame whose batch is the shared
/// `body` from [`encode_batch_body`]: write the returned head, then `body`. Postcard encodes
/// an enum variant as its index followed by its fields in order, with no lengths, so head and
/// body together are exactly `encode_frame(&ServerFrame::Batch { sub_id, batch })`.
///
/// # Panics
///
/// If the frame would exceed [`FRAME_BYTES_MAX`].
pub fn encode_batch_frame(sub_id: u64, body: &[u8]) -> Bytes {
    let mut tag = [0u8; 16];
    let tag = postcard::to_slice(&(BATCH_VARIANT, sub_id), &mut tag)
        .expect("two varints fit in 16 bytes");
    let len = tag.len() + body.len();
    assert!(len <= FRAME_BYTES_MAX, "push batch frame of {len} bytes");
    let mut head = BytesMut::with_capacity(LENGTH_BYTES + tag.len());
    head.put_u32(len as u32);
    head.put_slice(tag);
    head.freeze()
}

/// Decodes a client frame body (without its length prefix).
///
/// # Errors
///
/// [`FrameError::TooLarge`] over [`CLIENT_FRAME_BYTES_MAX`], [`FrameError::Malformed`] when
/// postcard cannot read it or bytes are left over.
pub fn decode_client_frame(body: &[u8]) -> Result<ClientFrame, FrameError> {
    decode(body, CLIENT_FRAME_BYTES_MAX)
}

/// Decodes a server frame body (without its length prefix).
///
/// # Errors
///
/// As [`decode_client_frame`], with [`FRAME_BYTES_MAX`].
pub fn decode_server_frame(body: &[u8]) -> Result<ServerFrame, FrameError> {
    decode(body, FRAME_BYTES_MAX)
}

fn decode<T: serde::de::DeserializeOwned>(body: &[u8], max: usize) -> Result<T, FrameError> {
    if body.len() > max {
        return Err(FrameError::TooLarge {
            len: body.len(),
            max,
        });
    }
    match postcard::take_from_bytes(body) {
        Ok((frame, [])) => Ok(frame),
        Ok((_, rest)) => Err(FrameError::Malformed(format!(
            "{} bytes after the frame",
            rest.len()
        ))),
        Err(e) => Err(FrameError::Malformed(e.to_string())),
    }
}

/// A length-delimited codec with `max` as frame limit, for `FramedRead` over either half of a
/// push connection. Frames over the limit fail the read before anything is allocated for them.
pub fn frame_codec(max: usize) -> tarpc::tokio_util::codec::LengthDelimitedCodec {
    tarpc::tokio_util::codec::LengthDelimitedCodec::builder()
        .length_field_length(LENGTH_BYTES)
        .max_frame_length(max)
        .new_codec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::WireMessage;
    use futures::StreamExt;
    use proptest::prelude::*;
    use tarpc::tokio_util::codec::FramedRead;

    fn message(seq: u64, body: Vec<u8>) -> WireMessage {
        WireMessage {
            channel: "general".into(),
            seq,
            sender: "alice".into(),
            body,
            at_ms: seq.wrapping_add(1_700_000_000_000),
            client_seq: seq.wrapping_mul(3),
            ..WireMessage::default()
        }
    }

    fn batch(first: u64, bodies: Vec<Vec<u8>>, applied: u64) -> MessageBatch {
        let messages: Vec<WireMessage> = bodies
            .into_iter()
            .enumerate()
            .map(|(i, b)| message(first + i as u64, b))
            .collect();
        MessageBatch {
            channel: "general".into(),
            head: first + messages.len() as u64,
            messages,
            applied,
            floor: 1,
        }
    }

    fn body_of(frame: &Bytes) -> &[u8] {
        let len = u32::from_be_bytes(frame[..LENGTH_BYTES].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - LENGTH_BYTES, "length prefix");
        &frame[LENGTH_BYTES..]
    }

    #[test]
    fn the_magic_is_no_tarpc_frame_length() {
        assert!(u32::from_be_bytes(PUSH_MAGIC) as usize > FRAME_BYTES_MAX);
    }

    #[test]
    fn the_batch_variant_index_is_what_postcard_writes() {
        let frame = encode_frame(&ServerFrame::Batch {
            sub_id: 0,
            batch: batch(1, vec![], 0),
        });
        assert_eq!(body_of(&frame)[0], BATCH_VARIANT as u8);
    }

    #[test]
    fn error_frames_keep_variant_one() {
        let frame = encode_frame(&ServerFrame::Error {
            sub_id: None,
            error: ApiError::Unauthenticated,
        });
        assert_eq!(body_of(&frame)[0], 1);
    }

    #[test]
    fn a_hello_of_another_version_is_refused_with_a_typed_error() {
        let mut hello = PushHello::new("c1", None);
        assert_eq!(check_push_hello(&hello, "c1"), Ok(()));
        hello.version = PUSH_VERSION + 1;
        assert_eq!(
            check_push_hello(&hello, "other"),
            Err(ApiError::UnsupportedProtocol {
                ours: PUSH_VERSION,
                theirs: PUSH_VERSION + 1
            })
        );
        hello.version = PUSH_VERSION;
        assert!(matches!(
            check_push_hello(&hello, "other"),
            Err(ApiError::WrongCluster { .. })
        ));
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let frame = encode_frame(&ClientFrame::Unsubscribe { sub_id: 5 });
        let mut body = body_of(&frame).to_vec();
        body.push(0);
        assert!(matches!(
            decode_client_frame(&body),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn an_oversized_client_frame_is_refused_before_decoding() {
        let body = vec![0u8; CLIENT_FRAME_BYTES_MAX + 1];
        assert!(matches!(
            decode_client_frame(&body),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn the_reader_fails_an_oversized_length_prefix_without_reading_the_body() {
        let mut bytes = ((CLIENT_FRAME_BYTES_MAX + 1) as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0; 16]);
        let mut reader = FramedRead::new(&bytes[..], frame_codec(CLIENT_FRAME_BYTES_MAX));
        let first = reader.next().await.expect("an item");
        assert!(first.is_err(), "{first:?}");
    }

    fn arb_client_frame() -> impl Strategy<Value = ClientFrame> {
        prop_oneof![
            (
                any::<u16>(),
                "[a-z0-9]{0,20}",
                proptest::option::of("[a-z]{0,8}")
            )
                .prop_map(|(version, cluster, client_name)| ClientFrame::Hello(
                    PushHello {
                        version,
                        cluster,
                        client_name
                    }
                )),
            (any::<u64>(), ".{0,70}", any::<u64>(), any::<u64>()).prop_map(
                |(sub_id, channel, after_seq, read_token)| ClientFrame::Subscribe(Subscribe {
                    sub_id,
                    channel,
                    after_seq,
                    read_token
                })
            ),
            any::<u64>().prop_map(|sub_id| ClientFrame::Unsubscribe { sub_id }),
            ".{0,70}".prop_map(|channel| ClientFrame::Typing { channel }),
            Just(ClientFrame::WatchPresence),
            Just(ClientFrame::Heartbeat),
        ]
    }

    proptest! {
        #[test]
        fn client_frames_round_trip(frame in arb_client_frame()) {
            let encoded = encode_frame(&frame);
            prop_assert_eq!(decode_client_frame(body_of(&encoded)), Ok(frame));
        }

        #[test]
        fn a_shared_batch_body_spliced_under_a_head_is_the_whole_frame(
            sub_id in any::<u64>(),
            first in 1u64..u64::MAX / 2,
            bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8),
            applied in any::<u64>(),
        ) {
            let batch = batch(first, bodies, applied);
            let body = encode_batch_body(&batch);
            let head = encode_batch_frame(sub_id, &body);
            let mut spliced = head.to_vec();
            spliced.extend_from_slice(&body);
            let whole = encode_frame(&ServerFrame::Batch { sub_id, batch: batch.clone() });
            prop_assert_eq!(&spliced[..], &whole[..]);
            prop_assert_eq!(
                decode_server_frame(body_of(&whole)),
                Ok(ServerFrame::Batch { sub_id, batch })
            );
        }

        #[test]
        fn typing_and_presence_frames_round_trip(
            channel in "[a-z0-9-]{1,20}",
            user in "[a-z0-9]{1,20}",
            online in proptest::collection::vec("[a-z0-9]{1,20}", 0..8),
            offline in proptest::collection::vec("[a-z0-9]{1,20}", 0..8),
            full in any::<bool>(),
        ) {
            for frame in [
                ServerFrame::Typing { channel, user },
                ServerFrame::Presence { online, offline, full },
            ] {
                let encoded = encode_frame(&frame);
                prop_assert_eq!(decode_server_frame(body_of(&encoded)), Ok(frame));
            }
        }

        #[test]
        fn garbage_never_panics_the_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_client_frame(&bytes);
            let _ = decode_server_frame(&bytes);
        }

        #[test]
        fn truncated_frames_are_errors(frame in arb_client_frame(), cut in 0usize..64) {
            let encoded = encode_frame(&frame);
            let body = body_of(&encoded);
            prop_assume!(cut < body.len());
            prop_assert!(decode_client_frame(&body[..cut]).is_err());
        }
    }
}
