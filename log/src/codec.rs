//! The stored form of a record: one format byte, then the protobuf
//! `keel.v1.Record`. Decoding never panics; anything that does not decode to
//! a well-formed record is an error.

use bytes::Bytes;
use prost::Message;

use crate::record::{MAX_KEY_LEN, MAX_PAYLOAD};
use crate::{Hash, PayloadKind, Record};

/// Format byte of the current stored-record layout.
pub const FORMAT_V1: u8 = 1;

/// Why stored or received record bytes are not a record.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CodecError {
    #[error("empty value")]
    Empty,
    #[error("unknown record format {0}")]
    UnknownFormat(u8),
    #[error("protobuf: {0}")]
    Decode(String),
    #[error("hash is {0} bytes, want 32")]
    HashLength(usize),
    #[error("unknown payload kind {0}")]
    UnknownKind(i32),
    #[error("seq 0 is not a record")]
    ZeroSeq,
    #[error("{0} too long")]
    TooLong(&'static str),
}

pub(crate) fn kind_to_proto(kind: PayloadKind) -> keel_proto::PayloadKind {
    match kind {
        PayloadKind::Change => keel_proto::PayloadKind::Change,
        PayloadKind::Tombstone => keel_proto::PayloadKind::Tombstone,
        PayloadKind::Event => keel_proto::PayloadKind::Event,
    }
}

/// Converts a protobuf record into a record, checking every field's shape
/// (not the chain: that needs the previous hash).
pub fn record_from_proto(p: keel_proto::Record) -> Result<Record, CodecError> {
    let kind = match keel_proto::PayloadKind::try_from(p.kind) {
        Ok(keel_proto::PayloadKind::Change) => PayloadKind::Change,
        Ok(keel_proto::PayloadKind::Tombstone) => PayloadKind::Tombstone,
        Ok(keel_proto::PayloadKind::Event) => PayloadKind::Event,
        _ => return Err(CodecError::UnknownKind(p.kind)),
    };
    if p.seq == 0 {
        return Err(CodecError::ZeroSeq);
    }
    let hash = Hash::from_slice(&p.hash).ok_or(CodecError::HashLength(p.hash.len()))?;
    if p.key.len() > MAX_KEY_LEN {
        return Err(CodecError::TooLong("key"));
    }
    if p.origin.len() > MAX_KEY_LEN {
        return Err(CodecError::TooLong("origin"));
    }
    if p.payload.len() > MAX_PAYLOAD {
        return Err(CodecError::TooLong("payload"));
    }
    Ok(Record {
        seq: p.seq,
        epoch: p.epoch,
        hlc: p.hlc,
        origin: p.origin,
        key: p.key,
        kind,
        payload: p.payload,
        hash,
    })
}

/// The protobuf form of a record.
pub fn record_to_proto(r: &Record) -> keel_proto::Record {
    keel_proto::Record {
        seq: r.seq,
        epoch: r.epoch,
        hlc: r.hlc,
        origin: r.origin.clone(),
        key: r.key.clone(),
        kind: kind_to_proto(r.kind) as i32,
        payload: r.payload.clone(),
        hash: Bytes::copy_from_slice(r.hash.as_bytes()),
    }
}

/// Encodes a record as stored on disk.
pub fn encode_record(r: &Record) -> Vec<u8> {
    let p = record_to_proto(r);
    let mut out = Vec::with_capacity(1 + p.encoded_len());
    out.push(FORMAT_V1);
    // Encoding into a Vec cannot run out of space.
    let _ = p.encode(&mut out);
    out
}

/// Decodes a record as stored on disk.
pub fn decode_record(bytes: &[u8]) -> Result<Record, CodecError> {
    let (&format, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if format != FORMAT_V1 {
        return Err(CodecError::UnknownFormat(format));
    }
    let p = keel_proto::Record::decode(body).map_err(|e| CodecError::Decode(e.to_string()))?;
    record_from_proto(p)
}
