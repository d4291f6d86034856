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
use crate::{Cursor, Hash};

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
    for r in &s.records {
        encode_key(5, WireType::LengthDelimited, out);
        encode_varint(record_body_len(r) as u64, out);
        encode_record_body(r, out);
    }
}

/// Decodes and verifies a segment: contiguous seqs after `prev_seq`, one
/// epoch, and an unbroken hash chain from `prev_hash`.
pub fn segment_from_proto(p: keel_proto::Segment) -> Result<Segment, WireError> {
    validate_stream_name(&p.stream).map_err(|_| WireError::StreamName)?;
    let prev_hash =
        Hash::from_slice(&p.prev_hash).ok_or(WireError::HashLength(p.prev_hash.len()))?;
    let mut records = Vec::with_capacity(p.records.len());
    let mut want = p.prev_seq.checked_add(1).ok_or(WireError::Overflow)?;
    let mut prev = prev_hash;
    for (index, rp) in p.records.into_iter().enumerate() {
        let r = record_from_proto(rp).map_err(|source| WireError::Record { index, source })?;
        if r.seq != want {
            return Err(WireError::Gap { want, got: r.seq });
        }
        if r.epoch != p.epoch {
            return Err(WireError::Epoch {
                seq: r.seq,
                want: p.epoch,
                got: r.epoch,
            });
        }
        if r.expected_hash(&prev) != r.hash {
            return Err(WireError::Chain { seq: r.seq });
        }
        prev = r.hash;
        want = want.checked_add(1).ok_or(WireError::Overflow)?;
        records.push(r);
    }
    Ok(Segment {
        stream: p.stream,
        epoch: p.epoch,
        prev: Cursor {
            // The epoch of the record before a segment is not carried; the
            // chain hash pins it.
            epoch: p.epoch,
            seq: p.prev_seq,
            hash: prev_hash,
        },
        records,
    })
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
