//! A postcard codec for `tokio-serde`, so tarpc frames carry postcard bodies.

use std::{io, marker::PhantomData, pin::Pin};

use bytes::{Bytes, BytesMut};
use serde::{de::DeserializeOwned, Serialize};
use tarpc::tokio_serde::{Deserializer, Serializer};

/// Serializes `SinkItem`s and deserializes `Item`s with postcard 1.x.
///
/// One frame holds exactly one item; the length-delimited framing below it says where a frame
/// ends. Postcard is not self-describing, so wire types avoid `#[serde(flatten)]`, `untagged` and
/// `skip_serializing_if`. Errors are `io::ErrorKind::InvalidData` and close the connection.
pub struct Postcard<Item, SinkItem> {
    // `fn` pointers keep the codec `Send + Sync + Unpin` whatever the item types are.
    ghost: PhantomData<fn(SinkItem) -> Item>,
}

impl<Item, SinkItem> Default for Postcard<Item, SinkItem> {
    fn default() -> Self {
        Self { ghost: PhantomData }
    }
}

impl<Item, SinkItem> std::fmt::Debug for Postcard<Item, SinkItem> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Postcard")
    }
}

impl<Item: DeserializeOwned, SinkItem> Deserializer<Item> for Postcard<Item, SinkItem> {
    type Error = io::Error;

    fn deserialize(self: Pin<&mut Self>, src: &BytesMut) -> Result<Item, io::Error> {
        postcard::from_bytes(src).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

impl<Item, SinkItem: Serialize> Serializer<SinkItem> for Postcard<Item, SinkItem> {
    type Error = io::Error;

    fn serialize(self: Pin<&mut Self>, item: &SinkItem) -> Result<Bytes, io::Error> {
        postcard::to_allocvec(item)
            .map(Bytes::from)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_invalid_data() {
        let mut codec = Postcard::<String, String>::default();
        // 0xff 0xff ... is an unterminated varint length.
        let src = BytesMut::from(&[0xffu8; 12][..]);
        let err = Pin::new(&mut codec)
            .deserialize(&src)
            .expect_err("garbage must not decode");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn string_round_trip() {
        let mut codec = Postcard::<String, String>::default();
        let bytes = Pin::new(&mut codec)
            .serialize(&"hi".to_string())
            .expect("serialize");
        let back = Pin::new(&mut codec)
            .deserialize(&BytesMut::from(&bytes[..]))
            .expect("decode");
        assert_eq!(back, "hi");
    }
}
