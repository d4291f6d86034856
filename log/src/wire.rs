//! Conversions between the log's types and the protobuf wire types, with
//! every check a receiver must make before trusting bytes from a peer: a
//! segment decodes only if its records are contiguous, of its epoch, and
//! extend the hash chain from its `prev` cursor.

use bytes::Bytes;

use crate::codec::{
    CodecError, delimited_field_len, encode_record_body, nonempty_field_len, record_body_len,
    record_from_proto, record_to_proto, varint_field_len,
};
use crate::record::validate_stream_name;
use crate::store::{ObjectSnapshot, Segment, Snapshot};
use crate::{Cursor, Hash, Record};

/// Why a segment, snapshot or cursor from a peer was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    #[error("protobuf: {0}")]
    Decode(String),
    #[error("missing field {0}")]
    Missing(&'static str),
    #[error("invalid stream name")]
    StreamName,
    #[error("record {index}: {source}")]
    Record { index: usize, source: CodecError },
    #[error("hash field is {0} bytes, want 32")]
    HashLength(usize),
    #[error("record seq {got} where {want} was expected")]
    Gap { want: u64, got: u64 },
    #[error("record seq {seq} has epoch {got}, segment epoch is {want}")]
    Epoch { seq: u64, want: u64, got: u64 },
    #[error("record seq {seq} does not chain to its predecessor")]
    Chain { seq: u64 },
    #[error("seq overflow")]
    Overflow,
}

pub fn cursor_to_proto(stream: &str, c: &Cursor) -> keel_proto::Cursor {
    keel_proto::Cursor {
        stream: stream.to_owned(),
        epoch: c.epoch,
        seq: c.seq,
        hash: Bytes::copy_from_slice(c.hash.as_bytes()),
    }
}

/// Returns the stream name and the cursor.
pub fn cursor_from_proto(p: &keel_proto::Cursor) -> Result<(String, Cursor), WireError> {
    validate_stream_name(&p.stream).map_err(|_| WireError::StreamName)?;
    let hash = Hash::from_slice(&p.hash).ok_or(WireError::HashLength(p.hash.len()))?;
    Ok((
        p.stream.clone(),
        Cursor {
            epoch: p.epoch,
            seq: p.seq,
            hash,
        },
    ))
}

pub fn segment_to_proto(s: &Segment) -> keel_proto::Segment {
    keel_proto::Segment {
        stream: s.stream.clone(),
        epoch: s.epoch,
        prev_seq: s.prev.seq,
        prev_hash: Bytes::copy_from_slice(s.prev.hash.as_bytes()),
        records: s.records.iter().map(record_to_proto).collect(),
        compression: keel_proto::Compression::None as i32,
    }
}

/// The length of the protobuf encoding of `keel.v1.Segment` for `s` (what
/// [`encode_segment_body`] writes).
pub fn segment_body_len(s: &Segment) -> usize {
    nonempty_field_len(1, s.stream.len())
        + varint_field_len(2, s.epoch)
        + varint_field_len(3, s.prev.seq)
        + delimited_field_len(4, s.prev.hash.0.len())
        + s.records
            .iter()
            .map(|r| delimited_field_len(5, record_body_len(r)))
            .sum::<usize>()
}

/// Writes exactly prost's encoding of [`segment_to_proto`]`(s)`, straight
/// from the segment: no intermediate message, no copies of the records'
/// strings or payloads beyond the output itself.
pub fn encode_segment_body(s: &Segment, out: &mut Vec<u8>) {
    use prost::encoding::{WireType, encode_key, encode_varint, string, uint64};
    if !s.stream.is_empty() {
        string::encode(1, &s.stream, out);
    }
    if s.epoch != 0 {
        uint64::encode(2, &s.epoch, out);
    }
    if s.prev.seq != 0 {
        uint64::encode(3, &s.prev.seq, out);
    }
    encode_key(4, WireType::LengthDelimited, out);
    encode_varint(s.prev.hash.0.len() as u64, out);
    out.extend_from_slice(&s.prev.hash.0);
    touch(&s.records);
    for r in &s.records {
        encode_key(5, WireType::LengthDelimited, out);
        encode_varint(record_body_len(r) as u64, out);
        encode_record_body(r, out);
    }
}

/// Writes one record as a segment body carries it: field 5 (`records`),
/// its length, its body. A log that keeps its records in this form sends
/// them by copying ([`EncodedSegment`]) instead of encoding them again.
pub fn encode_record_entry(r: &Record, out: &mut Vec<u8>) {
    use prost::encoding::{WireType, encode_key, encode_varint};
    encode_key(5, WireType::LengthDelimited, out);
    encode_varint(record_body_len(r) as u64, out);
    encode_record_body(r, out);
}

/// A segment in its wire form: exactly what [`encode_segment_body`]
/// writes for the same records, put together from records a log holds
/// already encoded ([`encode_record_entry`]) by copying their bytes. What
/// the sender needs to account for it is beside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedSegment {
    pub stream: String,
    /// The record (or horizon) the first record chains to.
    pub prev: Cursor,
    /// The cursor after the last record.
    pub end: Cursor,
    /// How many records it holds.
    pub records: usize,
    /// The records' [`Record::size_hint`]s, summed.
    pub size: usize,
    /// The segment as the `segment` body of a `keel.v1.Frame` (its field
    /// key and length, then the `keel.v1.Segment`): the frame a sender
    /// writes, as is.
    pub frame: Bytes,
}

/// The field of `keel.v1.Frame`'s body that carries a segment.
pub const FRAME_SEGMENT_FIELD: u32 = 2;

/// Room left before a segment being put together for the frame's field
/// key (one byte) and the body's length (a varint).
const FRAME_HEADROOM: usize = 1 + 10;

impl EncodedSegment {
    /// Starts a segment of `stream` after `prev` whose records are of
    /// `epoch`, with room for `capacity` bytes of records.
    pub fn builder(
        stream: &str,
        epoch: u64,
        prev: Cursor,
        capacity: usize,
    ) -> EncodedSegmentBuilder {
        use prost::encoding::{WireType, encode_key, encode_varint, uint64};
        let mut out = Vec::with_capacity(
            FRAME_HEADROOM + nonempty_field_len(1, stream.len()) + 2 * 11 + 34 + capacity,
        );
        out.resize(FRAME_HEADROOM, 0);
        if !stream.is_empty() {
            encode_key(1, WireType::LengthDelimited, &mut out);
            encode_varint(stream.len() as u64, &mut out);
            out.extend_from_slice(stream.as_bytes());
        }
        if epoch != 0 {
            uint64::encode(2, &epoch, &mut out);
        }
        if prev.seq != 0 {
            uint64::encode(3, &prev.seq, &mut out);
        }
        encode_key(4, WireType::LengthDelimited, &mut out);
        encode_varint(prev.hash.0.len() as u64, &mut out);
        out.extend_from_slice(&prev.hash.0);
        EncodedSegmentBuilder {
            out,
            stream: stream.to_owned(),
            prev,
            end: prev,
            records: 0,
            size: 0,
        }
    }

    /// The `keel.v1.Segment` body (the frame without its field key and
    /// length).
    pub fn body(&self) -> Bytes {
        use prost::encoding::{decode_key, decode_varint};
        let mut rest = &self.frame[..];
        let at = match (decode_key(&mut rest), decode_varint(&mut rest)) {
            (Ok(_), Ok(_)) => self.frame.len() - rest.len(),
            _ => 0,
        };
        self.frame.slice(at..)
    }

    /// The segment it carries, decoded and verified as a receiver would.
    pub fn decode(&self) -> Result<Segment, WireError> {
        self.decode_chained()
            .map(|(stream, chained)| chained.into_segment(stream))
    }

    /// [`EncodedSegment::decode`], returning the stream and the records as
    /// the chain it checked them to be.
    pub fn decode_chained(&self) -> Result<(String, Chained), WireError> {
        use prost::Message;
        let p = keel_proto::Segment::decode(self.body())
            .map_err(|e| WireError::Decode(e.to_string()))?;
        segment_from_proto_chained(p)
    }
}

/// An [`EncodedSegment`] being put together.
#[derive(Debug)]
pub struct EncodedSegmentBuilder {
    out: Vec<u8>,
    stream: String,
    prev: Cursor,
    end: Cursor,
    records: usize,
    size: usize,
}

impl EncodedSegmentBuilder {
    /// Appends records held as [`encode_record_entry`] wrote them, one
    /// after another: `count` of them, the last ending at `end`, their
    /// size hints summing to `size`.
    pub fn extend(&mut self, entries: &[u8], count: usize, end: Cursor, size: usize) {
        self.out.extend_from_slice(entries);
        self.records += count;
        self.size += size;
        self.end = end;
    }

    pub fn records(&self) -> usize {
        self.records
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn finish(self) -> EncodedSegment {
        use prost::encoding::{WireType, encode_key, encode_varint};
        let mut out = self.out;
        // The frame's field key and the body's length, just before it.
        let mut prefix = Vec::with_capacity(FRAME_HEADROOM);
        encode_key(FRAME_SEGMENT_FIELD, WireType::LengthDelimited, &mut prefix);
        encode_varint(out.len().saturating_sub(FRAME_HEADROOM) as u64, &mut prefix);
        let at = FRAME_HEADROOM - prefix.len();
        if let Some(room) = out.get_mut(at..FRAME_HEADROOM) {
            room.copy_from_slice(&prefix);
        }
        EncodedSegment {
            stream: self.stream,
            prev: self.prev,
            end: self.end,
            records: self.records,
            size: self.size,
            frame: Bytes::from(out).slice(at..),
        }
    }
}

/// Reads one byte of each cache line the records' strings and payloads
/// occupy, before any of them is copied. The reads do not depend on each
/// other, so the CPU has their cache misses outstanding together rather
/// than meeting them one copy at a time: the records of a catch-up are
/// usually read long after they were written, and out of cache. Only the
/// first [`TOUCH_BYTES`] are read ahead (more would leave the cache before
/// their copy).
fn touch(records: &[Record]) {
    let mut x = 0u8;
    let mut budget = TOUCH_BYTES;
    for r in records {
        for part in [r.origin.as_bytes(), r.key.as_bytes(), &r.payload] {
            let part = part.get(..budget.min(part.len())).unwrap_or_default();
            budget -= part.len();
            for b in part.iter().step_by(64).chain(part.last()) {
                x ^= *b;
            }
        }
        if budget == 0 {
            break;
        }
    }
    std::hint::black_box(x);
}

/// How much of a segment [`touch`] reads ahead.
const TOUCH_BYTES: usize = 64 << 10;

/// Decodes and verifies a segment: contiguous seqs after `prev_seq`, one
/// epoch, and an unbroken hash chain from `prev_hash`.
pub fn segment_from_proto(p: keel_proto::Segment) -> Result<Segment, WireError> {
    segment_from_proto_chained(p).map(|(stream, chained)| chained.into_segment(stream))
}

/// [`segment_from_proto`], returning the segment's stream and its records
/// as the chain it checked them to be.
pub fn segment_from_proto_chained(p: keel_proto::Segment) -> Result<(String, Chained), WireError> {
    validate_stream_name(&p.stream).map_err(|_| WireError::StreamName)?;
    let prev_hash =
        Hash::from_slice(&p.prev_hash).ok_or(WireError::HashLength(p.prev_hash.len()))?;
    let mut chain = Chain::new(p.epoch, p.prev_seq, prev_hash)?;
    let mut records = Vec::with_capacity(p.records.len());
    for (index, rp) in p.records.into_iter().enumerate() {
        let r = record_from_proto(rp).map_err(|source| WireError::Record { index, source })?;
        chain.check(&r)?;
        records.push(r);
    }
    Ok((p.stream, chain.chained(records)))
}

/// The checks that tie a segment's records together, one record at a
/// time: contiguous seqs, one epoch, each hash chaining to the one before.
struct Chain {
    epoch: u64,
    prev: Cursor,
    want: u64,
    last: Hash,
}

impl Chain {
    fn new(epoch: u64, prev_seq: u64, prev_hash: Hash) -> Result<Chain, WireError> {
        Ok(Chain {
            epoch,
            prev: Cursor {
                // The epoch of the record before a segment is not carried;
                // the chain hash pins it.
                epoch,
                seq: prev_seq,
                hash: prev_hash,
            },
            want: prev_seq.checked_add(1).ok_or(WireError::Overflow)?,
            last: prev_hash,
        })
    }

    fn check(&mut self, r: &Record) -> Result<(), WireError> {
        if r.seq != self.want {
            return Err(WireError::Gap {
                want: self.want,
                got: r.seq,
            });
        }
        if r.epoch != self.epoch {
            return Err(WireError::Epoch {
                seq: r.seq,
                want: self.epoch,
                got: r.epoch,
            });
        }
        if r.expected_hash(&self.last) != r.hash {
            return Err(WireError::Chain { seq: r.seq });
        }
        self.last = r.hash;
        self.want = self.want.checked_add(1).ok_or(WireError::Overflow)?;
        Ok(())
    }

    fn chained(self, records: Vec<Record>) -> Chained {
        Chained {
            epoch: self.epoch,
            prev: self.prev,
            records,
        }
    }
}

/// Records checked to form one chain: contiguous seqs from `prev.seq + 1`,
/// all of one epoch, each record's hash its chain hash after the record
/// before it (the first's after `prev.hash`).
///
/// Only a check makes one ([`Chained::verify`], or this module's segment
/// decoders, which check each record as they read it), so a store appends
/// one to a replica whose head is its `prev` (or holds a prefix of it)
/// without hashing its records again ([`crate::Store::append_chained`]):
/// each link of a received chain is verified once, where it is decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chained {
    epoch: u64,
    prev: Cursor,
    records: Vec<Record>,
}

impl Chained {
    /// Checks that `records` chain from `prev` within `epoch`.
    pub fn verify(epoch: u64, prev: Cursor, records: Vec<Record>) -> Result<Chained, WireError> {
        let mut chain = Chain::new(epoch, prev.seq, prev.hash)?;
        for r in &records {
            chain.check(r)?;
        }
        Ok(chain.chained(records))
    }

    /// Checks a segment as a decoder checks one it reads (its stream name,
    /// then its chain): the segment's stream and its records.
    pub fn from_segment(seg: Segment) -> Result<(String, Chained), WireError> {
        validate_stream_name(&seg.stream).map_err(|_| WireError::StreamName)?;
        let chained = Chained::verify(seg.epoch, seg.prev, seg.records)?;
        Ok((seg.stream, chained))
    }

    /// The record (or horizon) the first record chains to.
    pub fn prev(&self) -> Cursor {
        self.prev
    }

    /// Cursor after the last record (`prev` when there is none).
    pub fn end(&self) -> Cursor {
        self.records.last().map(Record::cursor).unwrap_or(self.prev)
    }

    pub fn records(&self) -> &[Record] {
        &self.records
    }

    pub fn into_records(self) -> Vec<Record> {
        self.records
    }

    /// The segment of `stream` these records make.
    pub fn into_segment(self, stream: String) -> Segment {
        Segment {
            stream,
            epoch: self.epoch,
            prev: self.prev,
            records: self.records,
        }
    }

    /// Drops the first `n` records (all of them if there are fewer): what
    /// is left chains from the last record dropped.
    pub fn skip(&mut self, n: usize) {
        let n = n.min(self.records.len());
        if let Some(last) = n.checked_sub(1).and_then(|i| self.records.get(i)) {
            self.prev = last.cursor();
        }
        self.records.drain(..n);
    }

    /// Drops the last record: what is left is still a chain from `prev`.
    pub fn pop(&mut self) -> Option<Record> {
        self.records.pop()
    }
}

impl std::ops::Deref for Chained {
    type Target = [Record];

    fn deref(&self) -> &[Record] {
        &self.records
    }
}

/// Decodes the body of a `keel.v1.Segment` straight into a verified
/// segment whose payloads are slices of `bytes`, with no intermediate
/// message: the receive path of the bulk of the sync traffic.
///
/// `None` unless the body has the plain shape protobuf encoders (keel's
/// among them) write — fields in ascending order, each singular field at
/// most once, no unknown fields, at most `max_records` records — *and*
/// everything in it is valid. The caller then decodes the same bytes with
/// prost and [`segment_from_proto`], which accept the other legal
/// encodings and say precisely what is wrong with a bad one. So what this
/// returns is always what that path returns (a property test holds them
/// together), and it never accepts what that path refuses.
pub fn decode_segment_body_fast(bytes: &Bytes, max_records: usize) -> Option<Segment> {
    decode_segment_body_chained(bytes, max_records)
        .map(|(stream, chained)| chained.into_segment(stream))
}

/// [`decode_segment_body_fast`], returning the segment's stream and its
/// records as the chain the decoder checked them to be.
pub fn decode_segment_body_chained(bytes: &Bytes, max_records: usize) -> Option<(String, Chained)> {
    let mut r = fast::Reader::new(bytes);
    let (mut stream, mut epoch, mut prev_seq, mut prev_hash) = (String::new(), 0, 0, None);
    let mut chain: Option<Chain> = None;
    let mut records = Vec::new();
    let mut last_field = 0;
    while !r.done() {
        let (field, wire) = r.key()?;
        // Ascending; only the records (5) may repeat.
        if field < last_field || (field == last_field && field != 5) {
            return None;
        }
        last_field = field;
        match (field, wire) {
            (1, 2) => stream = r.string()?,
            (2, 0) => epoch = r.varint()?,
            (3, 0) => prev_seq = r.varint()?,
            (4, 2) => prev_hash = Some(r.delimited()?),
            (5, 2) => {
                if records.len() >= max_records {
                    return None;
                }
                let chain = match &mut chain {
                    Some(c) => c,
                    None => chain.insert(begin(&stream, epoch, prev_seq, prev_hash.as_ref())?),
                };
                let (start, end) = r.delimited_range()?;
                if records.is_empty() {
                    // Room for as many records as the rest of the body
                    // holds of this one's size (no more than it could hold
                    // of the smallest, nor than `max_records`).
                    let each = (end - start).max(MIN_RECORD_BODY) + 2;
                    records.reserve(max_records.min((r.end - start) / each + 1));
                }
                let record = fast::record(fast::Reader {
                    at: start,
                    end,
                    ..r
                })?;
                chain.check(&record).ok()?;
                records.push(record);
            }
            (6, 0) => {
                r.varint()?;
            }
            _ => return None,
        }
    }
    let chain = match chain {
        Some(c) => c,
        None => begin(&stream, epoch, prev_seq, prev_hash.as_ref())?,
    };
    Some((stream, chain.chained(records)))
}

/// The fewest bytes a record's body takes: its 32-byte hash (field 8),
/// its non-zero seq (field 1) and its kind (field 6).
const MIN_RECORD_BODY: usize = 34 + 2 + 2;

/// The segment-level checks of [`segment_from_proto`], before its records.
fn begin(stream: &str, epoch: u64, prev_seq: u64, prev_hash: Option<&Bytes>) -> Option<Chain> {
    validate_stream_name(stream).ok()?;
    let prev_hash = Hash::from_slice(prev_hash.map(Bytes::as_ref).unwrap_or_default())?;
    Chain::new(epoch, prev_seq, prev_hash).ok()
}

/// The reading half of [`decode_segment_body_fast`]: protobuf's wire
/// format as prost reads it, refusing (`None`) instead of erring.
mod fast {
    use bytes::Bytes;

    use bytestring::ByteString;

    use crate::Record;
    use crate::codec::{RecordFields, record_from_fields};

    /// Reads `bytes[at..end]`; what it takes out of it are slices of
    /// `bytes`.
    #[derive(Clone, Copy)]
    pub(super) struct Reader<'a> {
        pub(super) bytes: &'a Bytes,
        pub(super) at: usize,
        pub(super) end: usize,
    }

    impl<'a> Reader<'a> {
        pub(super) fn new(bytes: &'a Bytes) -> Self {
            Reader {
                bytes,
                at: 0,
                end: bytes.len(),
            }
        }

        pub(super) fn done(&self) -> bool {
            self.at >= self.end
        }

        /// A varint, as prost reads one (at most ten bytes, the tenth
        /// holding one bit); one byte (every key, most lengths and small
        /// numbers) without a loop.
        pub(super) fn varint(&mut self) -> Option<u64> {
            let rest = self.bytes.get(self.at..self.end)?;
            if let Some(&b) = rest.first()
                && b < 0x80
            {
                self.at += 1;
                return Some(u64::from(b));
            }
            let mut v = 0u64;
            for (i, &b) in rest.iter().take(10).enumerate() {
                if i == 9 && b > 1 {
                    return None;
                }
                v |= u64::from(b & 0x7f) << (7 * i);
                if b < 0x80 {
                    self.at += i + 1;
                    return Some(v);
                }
            }
            None
        }

        /// A field's number and wire type.
        pub(super) fn key(&mut self) -> Option<(u64, u64)> {
            let k = self.varint()?;
            Some((k >> 3, k & 7))
        }

        pub(super) fn delimited_range(&mut self) -> Option<(usize, usize)> {
            let len = usize::try_from(self.varint()?).ok()?;
            let end = self.at.checked_add(len)?;
            if end > self.end {
                return None;
            }
            let start = std::mem::replace(&mut self.at, end);
            Some((start, end))
        }

        pub(super) fn delimited(&mut self) -> Option<Bytes> {
            let (start, end) = self.delimited_range()?;
            Some(self.bytes.slice(start..end))
        }

        /// A string field, as a slice of the bytes.
        pub(super) fn text(&mut self) -> Option<ByteString> {
            ByteString::try_from(self.delimited()?).ok()
        }

        pub(super) fn string(&mut self) -> Option<String> {
            let (start, end) = self.delimited_range()?;
            let s = std::str::from_utf8(self.bytes.get(start..end)?).ok()?;
            Some(s.to_owned())
        }
    }

    /// One `keel.v1.Record` body, checked as [`super::record_from_proto`] checks
    /// it.
    pub(super) fn record(mut r: Reader<'_>) -> Option<Record> {
        let mut p = RecordFields::default();
        let mut last_field = 0;
        while !r.done() {
            let (field, wire) = r.key()?;
            if field <= last_field {
                return None;
            }
            last_field = field;
            match (field, wire) {
                (1, 0) => p.seq = r.varint()?,
                (2, 0) => p.epoch = r.varint()?,
                (3, 0) => p.hlc = r.varint()?,
                (4, 2) => p.origin = r.text()?,
                (5, 2) => p.key = r.text()?,
                // int32, as prost reads it: the varint's low 32 bits.
                (6, 0) => p.kind = r.varint()? as i32,
                (7, 2) => p.payload = r.delimited()?,
                (8, 2) => p.hash = r.delimited()?,
                _ => return None,
            }
        }
        record_from_fields(p).ok()
    }
}

/// A snapshot chunk: its stream's base cursor and objects.
pub fn snapshot_to_proto(
    stream: &str,
    s: &Snapshot,
    chunk: u32,
    last: bool,
) -> keel_proto::Snapshot {
    keel_proto::Snapshot {
        base: Some(cursor_to_proto(stream, &s.base)),
        objects: s
            .objects
            .iter()
            .map(|o| keel_proto::ObjectSnapshot {
                key: o.key.clone(),
                seq: o.seq,
                state: o.state.clone(),
            })
            .collect(),
        chunk,
        last,
    }
}

/// Returns the stream name and the snapshot chunk.
pub fn snapshot_from_proto(p: keel_proto::Snapshot) -> Result<(String, Snapshot), WireError> {
    let base = p.base.as_ref().ok_or(WireError::Missing("snapshot.base"))?;
    let (stream, base) = cursor_from_proto(base)?;
    let objects = p
        .objects
        .into_iter()
        .map(|o| ObjectSnapshot {
            key: o.key,
            seq: o.seq,
            state: o.state,
        })
        .collect();
    Ok((stream, Snapshot { base, objects }))
}

/// Decodes a protobuf `Segment` from bytes and verifies it
/// ([`segment_from_proto`]).
pub fn decode_segment(bytes: &[u8]) -> Result<Segment, WireError> {
    use prost::Message;
    let p = keel_proto::Segment::decode(bytes).map_err(|e| WireError::Decode(e.to_string()))?;
    segment_from_proto(p)
}

/// Encodes a segment as protobuf bytes.
pub fn encode_segment(s: &Segment) -> Vec<u8> {
    use prost::Message;
    segment_to_proto(s).encode_to_vec()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use bytes::Bytes;
    use proptest::prelude::*;

    use super::fast::Reader;

    /// prost's reading of `bytes`: the value and how many bytes it took.
    fn prost_varint(bytes: &[u8]) -> Option<(u64, usize)> {
        let mut rest = bytes;
        let v = prost::encoding::decode_varint(&mut rest).ok()?;
        Some((v, bytes.len() - rest.len()))
    }

    fn fast_varint(bytes: &[u8]) -> Option<(u64, usize)> {
        let b = Bytes::copy_from_slice(bytes);
        let mut r = Reader::new(&b);
        let v = r.varint()?;
        Some((v, r.at))
    }

    proptest! {
        /// The segment decoder's varints are prost's, for any bytes: the
        /// same value, the same length, the same refusals (ends, tenth
        /// bytes over one, eleven-byte runs).
        #[test]
        fn varints_read_as_prost_reads_them(
            bytes in prop::collection::vec(
                prop_oneof![any::<u8>(), Just(0x80u8), Just(0xffu8), Just(0u8), Just(1u8)],
                0..13,
            ),
        ) {
            prop_assert_eq!(fast_varint(&bytes), prost_varint(&bytes));
        }

        /// Every value prost writes reads back whole.
        #[test]
        fn written_varints_read_back(v in any::<u64>()) {
            let mut bytes = Vec::new();
            prost::encoding::encode_varint(v, &mut bytes);
            prop_assert_eq!(fast_varint(&bytes), Some((v, bytes.len())));
        }
    }
}
