//! Sync frames: the internal form of `keel.v1.Frame` and its codec. Every
//! frame from a peer passes through [`decode_frame`], which checks size,
//! shape and (for segments) the hash chain before anything acts on it.

use bytes::Bytes;
use keel_log::wire::{
    EncodedSegment, WireError, cursor_from_proto, cursor_to_proto, decode_segment_body_chained,
    encode_segment_body, segment_body_len, segment_from_proto, segment_from_proto_chained,
    segment_to_proto, snapshot_from_proto, snapshot_to_proto,
};
use keel_log::{Chained, Cursor, Segment, Snapshot};
use prost::Message;

/// Largest encoded frame accepted: one record of the largest payload
/// keel-log accepts, with room for its segment around it.
pub const MAX_FRAME_BYTES: usize = keel_log::MAX_PAYLOAD + (1 << 20);

/// Largest control frame (Hello, Ack, Ping, Pong, Error) accepted, and so
/// the largest first frame of a connection: nothing bigger is read, let
/// alone allocated, before the peer's Hello is accepted.
pub const MAX_CONTROL_FRAME_BYTES: usize = 64 << 10;

/// Most cursors a Hello may carry.
pub const MAX_HELLO_CURSORS: usize = 16;
/// Most records one segment may carry.
pub const MAX_SEGMENT_RECORDS: usize = 16_384;
/// Most objects one snapshot chunk may carry.
pub const MAX_CHUNK_OBJECTS: usize = 65_536;

/// Why bytes from a peer are not a frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("protobuf: {0}")]
    Decode(String),
    #[error("frame has no body")]
    Empty,
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("field {0} is invalid")]
    Invalid(&'static str),
    #[error("{what} carries more than {max} entries")]
    TooMany { what: &'static str, max: usize },
}

/// `Hello`: protocol version, node, and the sender's cursors for the
/// streams it receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub protocol_version: u32,
    pub node: String,
    pub cursors: Vec<(String, Cursor)>,
    pub window_records: u32,
    pub window_bytes: u64,
}

/// Error codes carried by [`Frame::Error`].
pub use keel_proto::ErrorCode;

/// One sync frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    Segment(Segment),
    /// A segment as its log held it, already in wire form (the sender's
    /// side of [`Frame::Segment`]: it decodes as one).
    EncodedSegment(EncodedSegment),
    Ack {
        stream: String,
        cursor: Cursor,
    },
    Snapshot {
        stream: String,
        snapshot: Snapshot,
        chunk: u32,
        last: bool,
    },
    Ping(u64),
    Pong(u64),
    Error {
        code: ErrorCode,
        message: String,
    },
}

impl Frame {
    /// Control frames (everything but segments and snapshots) must never
    /// wait behind bulk data.
    pub fn is_control(&self) -> bool {
        !matches!(
            self,
            Frame::Segment(_) | Frame::EncodedSegment(_) | Frame::Snapshot { .. }
        )
    }
}

/// Longest node name accepted (a DNS subdomain, as Kubernetes requires).
const MAX_NODE_NAME: usize = 253;

pub fn frame_to_proto(f: &Frame) -> keel_proto::Frame {
    use keel_proto::frame::Body;
    let body = match f {
        Frame::Hello(h) => Body::Hello(keel_proto::Hello {
            protocol_version: h.protocol_version,
            node: h.node.clone(),
            cursors: h
                .cursors
                .iter()
                .map(|(s, c)| cursor_to_proto(s, c))
                .collect(),
            window_records: h.window_records,
            window_bytes: h.window_bytes,
        }),
        Frame::Segment(s) => Body::Segment(segment_to_proto(s)),
        // Its body was written by keel's own encoder (a log's records
        // copied), so it decodes.
        Frame::EncodedSegment(s) => {
            Body::Segment(prost::Message::decode(s.body()).unwrap_or_default())
        }
        Frame::Ack { stream, cursor } => Body::Ack(keel_proto::Ack {
            cursor: Some(cursor_to_proto(stream, cursor)),
        }),
        Frame::Snapshot {
            stream,
            snapshot,
            chunk,
            last,
        } => Body::Snapshot(snapshot_to_proto(stream, snapshot, *chunk, *last)),
        Frame::Ping(n) => Body::Ping(keel_proto::Ping { nonce: *n }),
        Frame::Pong(n) => Body::Pong(keel_proto::Pong { nonce: *n }),
        Frame::Error { code, message } => Body::Error(keel_proto::Error {
            code: *code as i32,
            message: message.clone(),
        }),
    };
    keel_proto::Frame { body: Some(body) }
}

/// Checks and converts a protobuf frame.
pub fn frame_from_proto(p: keel_proto::Frame) -> Result<Frame, FrameError> {
    use keel_proto::frame::Body;
    Ok(match p.body.ok_or(FrameError::Empty)? {
        Body::Hello(h) => {
            if h.node.is_empty()
                || h.node.len() > MAX_NODE_NAME
                || h.node.chars().any(char::is_control)
            {
                return Err(FrameError::Invalid("hello.node"));
            }
            let cursors = h
                .cursors
                .iter()
                .map(cursor_from_proto)
                .collect::<Result<Vec<_>, _>>()?;
            Frame::Hello(Hello {
                protocol_version: h.protocol_version,
                node: h.node,
                cursors,
                window_records: h.window_records,
                window_bytes: h.window_bytes,
            })
        }
        Body::Segment(s) => Frame::Segment(segment_from_proto(s)?),
        Body::Ack(a) => {
            let (stream, cursor) =
                cursor_from_proto(a.cursor.as_ref().ok_or(FrameError::Invalid("ack.cursor"))?)?;
            Frame::Ack { stream, cursor }
        }
        Body::Snapshot(s) => {
            let (chunk, last) = (s.chunk, s.last);
            let (stream, snapshot) = snapshot_from_proto(s)?;
            Frame::Snapshot {
                stream,
                snapshot,
                chunk,
                last,
            }
        }
        Body::Ping(p) => Frame::Ping(p.nonce),
        Body::Pong(p) => Frame::Pong(p.nonce),
        Body::Error(e) => Frame::Error {
            code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
            message: e.message,
        },
    })
}

/// Encodes a frame (without any length prefix; the transport frames it).
pub fn encode_frame(f: &Frame) -> Bytes {
    match f {
        // The bulk of the traffic: written straight from the records.
        Frame::Segment(s) => {
            use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
            let len = segment_body_len(s);
            let mut out = Vec::with_capacity(1 + encoded_len_varint(len as u64) + len);
            encode_key(2, WireType::LengthDelimited, &mut out);
            encode_varint(len as u64, &mut out);
            encode_segment_body(s, &mut out);
            Bytes::from(out)
        }
        // Framed already, from the records as the log held them.
        Frame::EncodedSegment(s) => s.frame.clone(),
        _ => Bytes::from(frame_to_proto(f).encode_to_vec()),
    }
}

/// Decodes and checks a frame received from a peer. List lengths are
/// counted on the wire first, so a small frame of many empty entries is
/// refused before anything is allocated for them.
pub fn decode_frame(bytes: &[u8]) -> Result<Frame, FrameError> {
    decode_from(bytes)
}

/// [`decode_frame`] of a buffer the frame may keep: the records' payloads
/// are slices of `bytes`, not copies (the buffer lives while any of them
/// does). A segment frame in the shape keel writes is read without prost
/// ([`segment_chained`]); the result is the same either way, for any bytes.
pub fn decode_frame_shared(bytes: Bytes) -> Result<Frame, FrameError> {
    decode_received(bytes).map(Received::into_frame)
}

/// A frame from the peer as a link takes it: a segment keeps the proof
/// that its chain was checked as it was decoded, so that the store does
/// not hash its records again.
pub(crate) enum Received {
    Frame(Frame),
    /// A segment: its stream, and its records as the chain they were
    /// checked to be.
    Chained(String, Chained),
}

impl Received {
    fn into_frame(self) -> Frame {
        match self {
            Received::Frame(f) => f,
            Received::Chained(stream, records) => Frame::Segment(records.into_segment(stream)),
        }
    }
}

/// [`decode_frame_shared`], keeping a segment's proof.
pub(crate) fn decode_received(bytes: Bytes) -> Result<Received, FrameError> {
    if bytes.len() <= MAX_FRAME_BYTES
        && let Some((stream, records)) = segment_chained(&bytes)
    {
        return Ok(Received::Chained(stream, records));
    }
    received_from(bytes)
}

/// [`decode_frame`], keeping a segment's proof.
pub(crate) fn decode_received_copy(bytes: &[u8]) -> Result<Received, FrameError> {
    received_from(bytes)
}

/// [`segment_chained`]'s segment, as its tests compare it.
#[cfg(test)]
fn segment_fast(bytes: &Bytes) -> Option<Segment> {
    segment_chained(bytes).map(|(stream, records)| records.into_segment(stream))
}

/// A segment frame in the plain shape keel writes, decoded without prost
/// ([`keel_log::wire::decode_segment_body_chained`]): its stream, and its
/// records as the chain they were checked to be. `None` sends the frame
/// down the general path, which decodes every legal encoding and names
/// what is wrong with a bad one.
fn segment_chained(bytes: &Bytes) -> Option<(String, Chained)> {
    // The frame's one field: body `segment` (2, length-delimited), to the
    // end of the frame.
    let (&key, mut rest) = bytes.split_first()?;
    if key != (2 << 3 | 2) {
        return None;
    }
    let len = prost::encoding::decode_varint(&mut rest).ok()?;
    if usize::try_from(len).ok()? != rest.len() {
        return None;
    }
    let body = bytes.slice(bytes.len() - rest.len()..);
    decode_segment_body_chained(&body, MAX_SEGMENT_RECORDS)
}

fn decode_from<B: bytes::Buf + AsRef<[u8]>>(bytes: B) -> Result<Frame, FrameError> {
    received_from(bytes).map(Received::into_frame)
}

/// [`decode_from`], keeping a segment's proof.
fn received_from<B: bytes::Buf + AsRef<[u8]>>(bytes: B) -> Result<Received, FrameError> {
    use keel_proto::frame::Body;
    let len = bytes.as_ref().len();
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    check_list_lengths(bytes.as_ref())?;
    let p = keel_proto::Frame::decode(bytes).map_err(|e| FrameError::Decode(e.to_string()))?;
    match p.body {
        Some(Body::Segment(s)) => {
            let (stream, records) = segment_from_proto_chained(s)?;
            Ok(Received::Chained(stream, records))
        }
        body => frame_from_proto(keel_proto::Frame { body }).map(Received::Frame),
    }
}

/// The repeated fields of a frame body, by body field number: (field of
/// the list inside the body, what it is, its cap).
const LISTS: [(u32, u32, &str, usize); 3] = [
    (1, 3, "hello.cursors", MAX_HELLO_CURSORS),
    (2, 5, "segment.records", MAX_SEGMENT_RECORDS),
    (4, 2, "snapshot.objects", MAX_CHUNK_OBJECTS),
];

/// Counts the entries of each list of a frame without decoding it (a
/// body may occur several times on the wire; protobuf merges them, so
/// the counts add up).
fn check_list_lengths(bytes: &[u8]) -> Result<(), FrameError> {
    let mut counts = [0usize; LISTS.len()];
    for field in wire::fields(bytes) {
        let (number, body) = field?;
        let Some(body) = body else { continue };
        for ((outer, inner, what, max), count) in LISTS.iter().zip(counts.iter_mut()) {
            if number != *outer {
                continue;
            }
            for f in wire::fields(body) {
                if f?.0 == *inner {
                    *count += 1;
                    if *count > *max {
                        return Err(FrameError::TooMany { what, max: *max });
                    }
                }
            }
        }
    }
    Ok(())
}

/// A minimal protobuf wire walker: enough to count fields.
mod wire {
    use super::FrameError;

    fn varint(b: &mut &[u8]) -> Result<u64, FrameError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b
                .split_first()
                .ok_or_else(|| FrameError::Decode("truncated varint".into()))?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(FrameError::Decode("varint too long".into()))
    }

    fn skip<'a>(b: &mut &'a [u8], n: u64) -> Result<&'a [u8], FrameError> {
        let n = usize::try_from(n).map_err(|_| FrameError::Decode("length overflows".into()))?;
        if n > b.len() {
            return Err(FrameError::Decode("truncated field".into()));
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Ok(head)
    }

    /// The fields of a message: (number, bytes if length-delimited).
    pub(super) fn fields(
        mut b: &[u8],
    ) -> impl Iterator<Item = Result<(u32, Option<&[u8]>), FrameError>> {
        let mut failed = false;
        std::iter::from_fn(move || {
            if failed || b.is_empty() {
                return None;
            }
            let r = (|| {
                let key = varint(&mut b)?;
                let number = u32::try_from(key >> 3)
                    .map_err(|_| FrameError::Decode("field number overflows".into()))?;
                match key & 7 {
                    0 => varint(&mut b).map(|_| (number, None)),
                    1 => skip(&mut b, 8).map(|_| (number, None)),
                    2 => {
                        let len = varint(&mut b)?;
                        skip(&mut b, len).map(|body| (number, Some(body)))
                    }
                    5 => skip(&mut b, 4).map(|_| (number, None)),
                    w => Err(FrameError::Decode(format!("unsupported wire type {w}"))),
                }
            })();
            failed = r.is_err();
            Some(r)
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;
    use keel_log::{Hash, PayloadKind, Record};
    use proptest::prelude::*;

    fn record() -> impl Strategy<Value = Record> {
        (
            (
                1u64..,
                prop_oneof![Just(0u64), any::<u64>()],
                prop_oneof![Just(0u64), any::<u64>()],
            ),
            (".{0,12}", ".{0,30}", 0u8..3),
            (
                prop::collection::vec(any::<u8>(), 0..200),
                any::<[u8; 32]>(),
            ),
        )
            .prop_map(
                |((seq, epoch, hlc), (origin, key, kind), (payload, hash))| Record {
                    seq,
                    epoch,
                    hlc,
                    origin: origin.into(),
                    key: key.into(),
                    kind: match kind {
                        0 => PayloadKind::Change,
                        1 => PayloadKind::Tombstone,
                        _ => PayloadKind::Event,
                    },
                    payload: payload.into(),
                    hash: Hash(hash),
                },
            )
    }

    /// Segments whose records chain as a writer's do.
    fn chained() -> impl Strategy<Value = Segment> {
        (
            ("[a-z]{1,8}/[a-z0-9-]{1,12}", 1u64..4, 0u64..1000),
            any::<[u8; 32]>(),
            prop::collection::vec(
                (
                    any::<u64>(),
                    ".{0,8}",
                    ".{0,20}",
                    0u8..3,
                    prop::collection::vec(any::<u8>(), 0..300),
                ),
                0..6,
            ),
        )
            .prop_map(|((stream, epoch, prev_seq), prev_hash, parts)| {
                let prev = Cursor {
                    epoch,
                    seq: prev_seq,
                    hash: Hash(prev_hash),
                };
                let mut last = prev.hash;
                let records = parts
                    .into_iter()
                    .enumerate()
                    .map(|(i, (hlc, origin, key, kind, payload))| {
                        let kind = match kind {
                            0 => PayloadKind::Change,
                            1 => PayloadKind::Tombstone,
                            _ => PayloadKind::Event,
                        };
                        let seq = prev_seq + 1 + i as u64;
                        let hash = Record::chain_hash(
                            &last, seq, epoch, hlc, &origin, &key, kind, &payload,
                        );
                        last = hash;
                        Record {
                            seq,
                            epoch,
                            hlc,
                            origin: origin.into(),
                            key: key.into(),
                            kind,
                            payload: payload.into(),
                            hash,
                        }
                    })
                    .collect();
                Segment {
                    stream,
                    epoch,
                    prev,
                    records,
                }
            })
    }

    /// A change to a frame's bytes: a byte set, a cut, or a run repeated.
    fn mutate(bytes: &[u8], how: u8, at: usize, value: u8, len: usize) -> Vec<u8> {
        let mut b = bytes.to_vec();
        if b.is_empty() {
            return b;
        }
        let at = at % b.len();
        match how % 3 {
            0 => b[at] = value,
            1 => b.truncate(at),
            _ => {
                let end = (at + len).min(b.len());
                let run = b[at..end].to_vec();
                b.splice(at..at, run);
            }
        }
        b
    }

    /// Legal encodings keel does not write (a field out of order, an
    /// unknown field, a field twice) take prost's path and decode alike.
    #[test]
    fn other_legal_encodings_take_the_general_path() {
        let seg = Segment {
            stream: "up/edge-1".into(),
            epoch: 1,
            prev: Cursor::default(),
            records: vec![],
        };
        let seg = Segment {
            prev: Cursor {
                epoch: 1,
                ..seg.prev
            },
            ..seg
        };
        let body = |fields: &[&[u8]]| {
            let body: Vec<u8> = fields.concat();
            let mut b = vec![0x12];
            prost::encoding::encode_varint(body.len() as u64, &mut b);
            b.extend_from_slice(&body);
            Bytes::from(b)
        };
        let mut stream = vec![0x0a, 9];
        stream.extend_from_slice(b"up/edge-1");
        let epoch: &[u8] = &[0x10, 1];
        let mut hash = vec![0x22, 32];
        hash.extend_from_slice(&[0; 32]);
        let unknown: &[u8] = &[0x78, 5];
        for (name, bytes, fast) in [
            ("as written", body(&[&stream, epoch, &hash]), true),
            ("out of order", body(&[epoch, &stream, &hash]), false),
            (
                "unknown field",
                body(&[&stream, epoch, &hash, unknown]),
                false,
            ),
            ("twice", body(&[&stream, epoch, epoch, &hash]), false),
        ] {
            assert_eq!(segment_fast(&bytes).is_some(), fast, "{name}");
            assert_eq!(
                decode_frame_shared(bytes),
                Ok(Frame::Segment(seg.clone())),
                "{name}"
            );
        }
    }

    proptest! {
        /// Segment frames as keel writes them take the decoder without
        /// prost, and it gives what prost's path gives.
        #[test]
        fn written_segments_decode_without_prost(seg in chained()) {
            let bytes = encode_frame(&Frame::Segment(seg.clone()));
            prop_assert_eq!(segment_fast(&bytes), Some(seg.clone()));
            prop_assert_eq!(decode_from(bytes.clone()), Ok(Frame::Segment(seg.clone())));
            prop_assert_eq!(decode_frame_shared(bytes), Ok(Frame::Segment(seg)));
        }

        /// Whatever the decoder without prost accepts, prost's path
        /// accepts too, as the same segment: changed bytes (which mostly
        /// break the chain, the shape, or both) never slip through it.
        #[test]
        fn the_fast_decoder_accepts_nothing_prost_would_not(
            seg in chained(),
            changes in prop::collection::vec((any::<u8>(), any::<usize>(), any::<u8>(), 0usize..40), 1..4),
        ) {
            let mut bytes = encode_frame(&Frame::Segment(seg)).to_vec();
            for (how, at, value, len) in changes {
                bytes = mutate(&bytes, how, at, value, len);
            }
            let bytes = Bytes::from(bytes);
            prop_assert_eq!(decode_frame_shared(bytes.clone()), decode_from(bytes.clone()));
            if let Some(fast) = segment_fast(&bytes) {
                prop_assert_eq!(decode_from(bytes), Ok(Frame::Segment(fast)));
            }
        }

        /// Arbitrary bytes after a segment frame's key, likewise.
        #[test]
        fn arbitrary_segment_bodies_decode_alike(body in prop::collection::vec(any::<u8>(), 0..400)) {
            let mut bytes = vec![0x12];
            prost::encoding::encode_varint(body.len() as u64, &mut bytes);
            bytes.extend_from_slice(&body);
            let bytes = Bytes::from(bytes);
            prop_assert_eq!(decode_frame_shared(bytes.clone()), decode_from(bytes.clone()));
            if let Some(fast) = segment_fast(&bytes) {
                prop_assert_eq!(decode_from(bytes), Ok(Frame::Segment(fast)));
            }
        }

        /// A segment put together from its records' entries, in one or
        /// more pieces, is the frame written from the segment, byte for
        /// byte, and the peer decodes it to the segment.
        #[test]
        fn encoded_segments_are_the_segment_frame(seg in chained(), cut in any::<usize>()) {
            let mut entries = Vec::new();
            let mut ends = Vec::new();
            for r in &seg.records {
                keel_log::wire::encode_record_entry(r, &mut entries);
                ends.push(entries.len());
            }
            let mut enc = EncodedSegment::builder(&seg.stream, seg.epoch, seg.prev, 0);
            let cut = cut % (seg.records.len() + 1);
            let at = if cut == 0 { 0 } else { ends[cut - 1] };
            let size = |rs: &[keel_log::Record]| rs.iter().map(keel_log::Record::size_hint).sum::<usize>();
            for (bytes, records) in [
                (&entries[..at], &seg.records[..cut]),
                (&entries[at..], &seg.records[cut..]),
            ] {
                if let Some(last) = records.last() {
                    enc.extend(bytes, records.len(), last.cursor(), size(records));
                }
            }
            let enc = enc.finish();
            prop_assert_eq!(enc.records, seg.records.len());
            prop_assert_eq!(enc.end, seg.end());
            prop_assert_eq!(enc.size, size(&seg.records));
            prop_assert_eq!(enc.decode(), Ok(seg.clone()));
            let bytes = encode_frame(&Frame::EncodedSegment(enc));
            prop_assert_eq!(&bytes, &encode_frame(&Frame::Segment(seg.clone())));
            prop_assert_eq!(decode_frame_shared(bytes), Ok(Frame::Segment(seg)));
        }

        /// A segment frame written straight from the records is byte for
        /// byte what prost writes for the same frame.
        #[test]
        fn segment_frames_encode_as_prost_does(
            stream in "[a-z/]{0,20}",
            epoch in prop_oneof![Just(0u64), any::<u64>()],
            prev_seq in prop_oneof![Just(0u64), any::<u64>()],
            prev_hash in any::<[u8; 32]>(), records in prop::collection::vec(record(), 0..5),
        ) {
            let f = Frame::Segment(Segment {
                stream,
                epoch,
                prev: Cursor { epoch, seq: prev_seq, hash: Hash(prev_hash) },
                records,
            });
            prop_assert_eq!(encode_frame(&f).to_vec(), frame_to_proto(&f).encode_to_vec());
        }
    }
}
