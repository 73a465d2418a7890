//! The only file that knows the on-disk byte layout: segment header, frame, meta file, checksum
//! and version.
//!
//! All integers are little-endian. Every checksum is CRC-32/IEEE (polynomial 0x04C11DB7,
//! reflected, as computed by `crc32fast`). `FORMAT_VERSION` is 1.
//!
//! | Where | Field | Width | Contents |
//! | --- | --- | --- | --- |
//! | segment header | magic | 8 B | `SEGMENT_MAGIC` = ASCII `CCRLSEG1` |
//! | segment header | format_version | u32 LE | `FORMAT_VERSION` |
//! | segment header | first_index | u64 LE | index of the segment's first entry; equals the number in the file name `{first_index:020}.seg` |
//! | segment header | header_crc | u32 LE | CRC-32/IEEE over the 20 bytes before it (magic, version, first_index) |
//! | frame (repeated) | payload_len | u32 LE | payload length in bytes, at most `Config::frame_bytes_max` |
//! | frame | crc | u32 LE | CRC-32/IEEE over `index ‖ payload` (the 8 index bytes, then the payload) |
//! | frame | index | u64 LE | log index of the entry; frames in a segment are contiguous from first_index |
//! | frame | payload | payload_len B | opaque entry bytes |
//! | meta file | magic | 8 B | `META_MAGIC` = ASCII `CCRLMETA` |
//! | meta file | format_version | u32 LE | `FORMAT_VERSION` |
//! | meta file | payload_len | u32 LE | payload length in bytes |
//! | meta file | crc | u32 LE | CRC-32/IEEE over `format_version ‖ payload_len ‖ payload` |
//! | meta file | payload | payload_len B | opaque vote or committed bytes; for `purged.meta`, a purge record (below) |
//!
//! The payload of `purged.meta` is a purge record, in one of two layouts told apart by length:
//!
//! | Layout | Field | Width | Contents |
//! | --- | --- | --- | --- |
//! | 1 (exactly 8 bytes) | index | u64 LE | the purge point; no caller payload. Written by `Wal::purge_through` and by every build before purge payloads |
//! | 2 (9 bytes or more) | index | u64 LE | the purge point |
//! | 2 | layout | u8 | `PURGE_LAYOUT_WITH_PAYLOAD` = 2; any other value is a layout this build cannot read (`Error::UnsupportedVersion`) |
//! | 2 | payload | rest of the meta payload (at most `PURGE_PAYLOAD_BYTES_MAX` = 4096 B) | opaque caller bytes stored with the purge point (`Wal::purge_through_with`), possibly empty |
//!
//! A purge record shorter than 8 bytes is corruption. An earlier build refuses to open a
//! layout-2 record (it expects exactly 8 bytes), so after `purge_through_with` a downgrade is
//! not supported.
//!
//! A segment is a header (24 bytes) followed by frames (16 bytes plus payload each), then, in
//! the newest segment only, a zero-filled tail up to the end of the file:
//!
//! | Where | Field | Width | Contents |
//! | --- | --- | --- | --- |
//! | newest segment, after the last frame | zero tail | to end of file | all bytes 0; left by preallocation (`segment.rs`), by `truncate_from`, or by recovery zeroing a torn tail |
//!
//! The data of a segment ends at the first frame header that is all zeros. Such a header can
//! never be a valid frame: its crc field is 0, while the CRC-32/IEEE of `index ‖ payload` for
//! index 0 and an empty payload (eight zero bytes) is 0x6522DF69. Sealed segments are cut at
//! their last frame when sealed and have no zero tail.
//!
//! Compatibility: `FORMAT_VERSION` stays 1, because frames and headers are byte-for-byte
//! unchanged and each reader handles the other's files. This reader opens version-1 files
//! written before preallocation (no zero tail; such a newest segment simply grows at the end).
//! The earlier reader treats a zero tail as a torn tail and truncates it, which loses nothing.
//!
//! Meta files are `committed.meta` and `purged.meta`, replaced whole by rename. The vote lives
//! in `vote.slots`: two 512-byte slots, each a meta frame (above) whose payload is a sequence
//! number (u64 LE) followed by the vote bytes, zero-padded to the slot's end; the valid slot
//! with the higher sequence number holds the vote, and an all-zero slot is empty. Saves
//! overwrite the older slot in place (see `meta::VoteSlots`). A `vote.meta` written by an
//! earlier build is read once, moved into `vote.slots`, and removed; an earlier build opening
//! a WAL after that would not see the vote, so downgrades are not supported.

/// Version written into every segment header and meta file.
pub(crate) const FORMAT_VERSION: u32 = 1;
/// Magic bytes opening every segment.
pub(crate) const SEGMENT_MAGIC: [u8; 8] = *b"CCRLSEG1";
/// Magic bytes opening every meta file.
pub(crate) const META_MAGIC: [u8; 8] = *b"CCRLMETA";
/// Length of the segment header in bytes.
pub(crate) const SEGMENT_HEADER_LEN: u64 = 24;
/// Length of a frame header (payload_len, crc, index) in bytes.
pub(crate) const FRAME_HEADER_LEN: usize = 16;
/// Length of the meta file header in bytes.
pub(crate) const META_HEADER_LEN: usize = 20;

/// Suffix of segment files.
pub(crate) const SEGMENT_SUFFIX: &str = ".seg";
/// Suffix of files still being prepared; removed at open.
pub(crate) const TMP_SUFFIX: &str = ".tmp";
/// Prefix of segment files prepared ahead of need: `prepared-{pid}-{n}.seg.tmp`.
pub(crate) const PREPARED_PREFIX: &str = "prepared-";
/// The layout byte of a purge record that carries a caller payload (layout 2).
pub(crate) const PURGE_LAYOUT_WITH_PAYLOAD: u8 = 2;
/// Largest caller payload a purge record carries. openraft's purged log id takes a few dozen
/// bytes; the bound keeps `purged.meta` small enough to read whole at open.
pub(crate) const PURGE_PAYLOAD_BYTES_MAX: usize = 4096;

/// File name of the segment whose first entry is `first_index`.
pub(crate) fn segment_file_name(first_index: u64) -> String {
    format!("{first_index:020}{SEGMENT_SUFFIX}")
}

/// Parses a segment file name back into its first index; `None` for anything else.
pub(crate) fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Encodes a segment header.
pub(crate) fn encode_segment_header(first_index: u64) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
    header[0..8].copy_from_slice(&SEGMENT_MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[12..20].copy_from_slice(&first_index.to_le_bytes());
    let crc = crc32fast::hash(&header[0..20]);
    header[20..24].copy_from_slice(&crc.to_le_bytes());
    header
}

/// Why a segment header was rejected.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HeaderError {
    /// Fewer bytes than a header.
    Short,
    /// Wrong magic bytes.
    BadMagic,
    /// A version this build cannot read.
    UnsupportedVersion(u32),
    /// Header CRC mismatch.
    BadCrc,
}

/// Decodes a segment header and returns its first index.
pub(crate) fn decode_segment_header(bytes: &[u8]) -> Result<u64, HeaderError> {
    if bytes.len() < SEGMENT_HEADER_LEN as usize {
        return Err(HeaderError::Short);
    }
    if bytes[0..8] != SEGMENT_MAGIC {
        return Err(HeaderError::BadMagic);
    }
    let version = read_u32(bytes, 8);
    if version != FORMAT_VERSION {
        return Err(HeaderError::UnsupportedVersion(version));
    }
    if crc32fast::hash(&bytes[0..20]) != read_u32(bytes, 20) {
        return Err(HeaderError::BadCrc);
    }
    Ok(read_u64(bytes, 12))
}

/// Length in bytes of the frame holding a payload of `payload_len` bytes.
pub(crate) fn frame_len(payload_len: usize) -> usize {
    FRAME_HEADER_LEN + payload_len
}

/// CRC-32/IEEE of `index ‖ payload`.
fn frame_crc(index: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&index.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// Appends one frame to `buf`. The caller has checked `payload.len()` against `frame_bytes_max`.
pub(crate) fn encode_frame(buf: &mut Vec<u8>, index: u64, payload: &[u8]) {
    let payload_len = u32::try_from(payload.len()).expect("caller checked frame_bytes_max");
    buf.extend_from_slice(&payload_len.to_le_bytes());
    buf.extend_from_slice(&frame_crc(index, payload).to_le_bytes());
    buf.extend_from_slice(&index.to_le_bytes());
    buf.extend_from_slice(payload);
}

/// Why a frame was rejected.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// Fewer bytes than a frame header.
    ShortHeader,
    /// The length field exceeds `frame_bytes_max`; checked before anything is allocated.
    TooLong(u32),
    /// The frame runs past the end of the available bytes.
    ShortPayload,
    /// CRC mismatch.
    BadCrc,
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::ShortHeader => write!(f, "short frame header"),
            FrameError::TooLong(len) => write!(f, "frame length {len} exceeds frame_bytes_max"),
            FrameError::ShortPayload => write!(f, "frame runs past end of file"),
            FrameError::BadCrc => write!(f, "frame crc mismatch"),
        }
    }
}

/// A frame decoded in place.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Frame<'a> {
    /// Log index stored in the frame.
    pub index: u64,
    /// Payload bytes.
    pub payload: &'a [u8],
}

impl Frame<'_> {
    /// Bytes the frame occupies on disk.
    pub fn len(&self) -> usize {
        frame_len(self.payload.len())
    }
}

/// Decodes the frame at the start of `bytes`, checking length bound and CRC.
pub(crate) fn decode_frame(bytes: &[u8], frame_bytes_max: u32) -> Result<Frame<'_>, FrameError> {
    if bytes.len() < FRAME_HEADER_LEN {
        return Err(FrameError::ShortHeader);
    }
    let payload_len = read_u32(bytes, 0);
    if payload_len > frame_bytes_max {
        return Err(FrameError::TooLong(payload_len));
    }
    let end = FRAME_HEADER_LEN + payload_len as usize;
    if bytes.len() < end {
        return Err(FrameError::ShortPayload);
    }
    let index = read_u64(bytes, 8);
    let payload = &bytes[FRAME_HEADER_LEN..end];
    if frame_crc(index, payload) != read_u32(bytes, 4) {
        return Err(FrameError::BadCrc);
    }
    Ok(Frame { index, payload })
}

/// Reads only the index field of the frame header at the start of `bytes`, without checking it.
pub(crate) fn peek_frame_index(bytes: &[u8]) -> Option<u64> {
    (bytes.len() >= FRAME_HEADER_LEN).then(|| read_u64(bytes, 8))
}

/// Encodes a whole meta file.
pub(crate) fn encode_meta(payload: &[u8]) -> Vec<u8> {
    let payload_len = u32::try_from(payload.len()).expect("meta payloads are small");
    let mut buf = Vec::with_capacity(META_HEADER_LEN + payload.len());
    buf.extend_from_slice(&META_MAGIC);
    buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    buf.extend_from_slice(&payload_len.to_le_bytes());
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&buf[8..16]);
    hasher.update(payload);
    buf.extend_from_slice(&hasher.finalize().to_le_bytes());
    buf.extend_from_slice(payload);
    buf
}

/// The length of the meta frame at the start of `bytes`, read from its header without
/// checking it; `None` if `bytes` is shorter than a header.
pub(crate) fn meta_frame_len(bytes: &[u8]) -> Option<usize> {
    (bytes.len() >= META_HEADER_LEN).then(|| META_HEADER_LEN + read_u32(bytes, 12) as usize)
}

/// Why a meta file was rejected.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum MetaError {
    /// Wrong magic, short file, bad length or CRC mismatch.
    Corrupt(&'static str),
    /// A version this build cannot read.
    UnsupportedVersion(u32),
}

/// Decodes a whole meta file and returns its payload.
pub(crate) fn decode_meta(bytes: &[u8]) -> Result<&[u8], MetaError> {
    if bytes.len() < META_HEADER_LEN {
        return Err(MetaError::Corrupt("short meta file"));
    }
    if bytes[0..8] != META_MAGIC {
        return Err(MetaError::Corrupt("bad meta magic"));
    }
    let version = read_u32(bytes, 8);
    if version != FORMAT_VERSION {
        return Err(MetaError::UnsupportedVersion(version));
    }
    let payload_len = read_u32(bytes, 12) as usize;
    if bytes.len() != META_HEADER_LEN + payload_len {
        return Err(MetaError::Corrupt("meta length mismatch"));
    }
    let payload = &bytes[META_HEADER_LEN..];
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&bytes[8..16]);
    hasher.update(payload);
    if hasher.finalize() != read_u32(bytes, 16) {
        return Err(MetaError::Corrupt("meta crc mismatch"));
    }
    Ok(payload)
}

/// Encodes a purge record: layout 1 (the index alone) without a payload, layout 2 with one.
pub(crate) fn encode_purge_record(index: u64, payload: Option<&[u8]>) -> Vec<u8> {
    let mut record = Vec::with_capacity(9 + payload.map_or(0, <[u8]>::len));
    record.extend_from_slice(&index.to_le_bytes());
    if let Some(payload) = payload {
        record.push(PURGE_LAYOUT_WITH_PAYLOAD);
        record.extend_from_slice(payload);
    }
    record
}

/// Decodes a purge record into the purge point and the caller payload, if any.
pub(crate) fn decode_purge_record(record: &[u8]) -> Result<(u64, Option<&[u8]>), MetaError> {
    let Some((index, rest)) = record.split_first_chunk::<8>() else {
        return Err(MetaError::Corrupt(
            "purge record shorter than its 8-byte index",
        ));
    };
    let index = u64::from_le_bytes(*index);
    match rest.split_first() {
        None => Ok((index, None)),
        Some((&PURGE_LAYOUT_WITH_PAYLOAD, payload)) => Ok((index, Some(payload))),
        Some((&layout, _)) => Err(MetaError::UnsupportedVersion(u32::from(layout))),
    }
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("slice of length 4"))
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("slice of length 8"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    #[test_case(0, 16; "empty payload")]
    #[test_case(1, 17; "one byte")]
    #[test_case(200, 216; "typical entry")]
    fn frame_len_adds_header(payload_len: usize, expected: usize) {
        assert_eq!(frame_len(payload_len), expected);
    }

    #[test_case(0, "00000000000000000000.seg")]
    #[test_case(42, "00000000000000000042.seg")]
    #[test_case(u64::MAX, "18446744073709551615.seg")]
    fn segment_file_name_round_trips(index: u64, name: &str) {
        assert_eq!(segment_file_name(index), name);
        assert_eq!(parse_segment_file_name(name), Some(index));
    }

    #[test_case("42.seg"; "not padded")]
    #[test_case("00000000000000000042.seg.tmp"; "tmp")]
    #[test_case("vote.meta"; "meta")]
    fn parse_segment_file_name_rejects(name: &str) {
        assert_eq!(parse_segment_file_name(name), None);
    }

    #[test]
    fn frame_round_trips() {
        let mut buf = Vec::new();
        encode_frame(&mut buf, 7, b"hello");
        let frame = decode_frame(&buf, 1024).expect("valid frame");
        assert_eq!(
            frame,
            Frame {
                index: 7,
                payload: b"hello"
            }
        );
        assert_eq!(frame.len(), buf.len());
    }

    #[test]
    fn zero_filled_frame_is_rejected() {
        assert_eq!(decode_frame(&[0u8; 64], 1024), Err(FrameError::BadCrc));
        // The documented constant: why an all-zero header can never pass.
        assert_eq!(frame_crc(0, &[]), 0x6522_DF69);
    }

    #[test]
    fn frame_longer_than_max_is_rejected_before_reading_payload() {
        let mut buf = Vec::new();
        encode_frame(&mut buf, 1, &[1u8; 100]);
        assert_eq!(decode_frame(&buf[..20], 99), Err(FrameError::TooLong(100)));
    }

    #[test]
    fn every_bit_flip_in_a_frame_is_caught() {
        let mut buf = Vec::new();
        encode_frame(&mut buf, 3, b"payload");
        for bit in 0..buf.len() * 8 {
            let mut copy = buf.clone();
            copy[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_frame(&copy, 1 << 20).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn header_rejects_unknown_version() {
        let mut header = encode_segment_header(5);
        assert_eq!(decode_segment_header(&header), Ok(5));
        header[8] = 9;
        assert_eq!(
            decode_segment_header(&header),
            Err(HeaderError::UnsupportedVersion(9))
        );
    }

    #[test_case(0, None; "layout 1, index 0")]
    #[test_case(42, None; "layout 1")]
    #[test_case(42, Some(&b""[..]); "layout 2, empty payload")]
    #[test_case(u64::MAX - 1, Some(&b"log id"[..]); "layout 2")]
    fn purge_record_round_trips(index: u64, payload: Option<&[u8]>) {
        let record = encode_purge_record(index, payload);
        assert_eq!(record.len(), 8 + payload.map_or(0, |p| 1 + p.len()));
        assert_eq!(decode_purge_record(&record), Ok((index, payload)));
    }

    #[test]
    fn purge_record_layout_1_is_the_bare_index_earlier_builds_wrote() {
        assert_eq!(encode_purge_record(4, None), 4u64.to_le_bytes());
    }

    #[test_case(&[][..], MetaError::Corrupt("purge record shorter than its 8-byte index"); "empty")]
    #[test_case(&[1, 2, 3][..], MetaError::Corrupt("purge record shorter than its 8-byte index"); "short")]
    #[test_case(&[4, 0, 0, 0, 0, 0, 0, 0, 3][..], MetaError::UnsupportedVersion(3); "future layout")]
    #[test_case(&[4, 0, 0, 0, 0, 0, 0, 0, 1, 9][..], MetaError::UnsupportedVersion(1); "layout byte 1")]
    fn purge_record_rejects(record: &[u8], expected: MetaError) {
        assert_eq!(decode_purge_record(record), Err(expected));
    }

    #[test]
    fn meta_round_trips_and_catches_flips() {
        let bytes = encode_meta(b"vote");
        assert_eq!(decode_meta(&bytes), Ok(&b"vote"[..]));
        let mut flipped = bytes.clone();
        flipped[21] ^= 1;
        assert!(decode_meta(&flipped).is_err());
    }
}
