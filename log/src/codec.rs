//! The stored form of a record: one format byte, then the protobuf
//! `keel.v1.Record`. Decoding never panics; anything that does not decode to
//! a well-formed record is an error.

use bytes::Bytes;
use bytestring::ByteString;
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
    record_from_fields(RecordFields {
        seq: p.seq,
        epoch: p.epoch,
        hlc: p.hlc,
        origin: p.origin.into(),
        key: p.key.into(),
        kind: p.kind,
        payload: p.payload,
        hash: p.hash,
    })
}

/// The fields of a `keel.v1.Record` as read off the wire, before their
/// checks.
#[derive(Debug, Default)]
pub(crate) struct RecordFields {
    pub seq: u64,
    pub epoch: u64,
    pub hlc: u64,
    pub origin: ByteString,
    pub key: ByteString,
    pub kind: i32,
    pub payload: Bytes,
    pub hash: Bytes,
}

/// [`record_from_proto`] of fields however they were read.
pub(crate) fn record_from_fields(p: RecordFields) -> Result<Record, CodecError> {
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
        origin: r.origin.to_string(),
        key: r.key.to_string(),
        kind: kind_to_proto(r.kind) as i32,
        payload: r.payload.clone(),
        hash: Bytes::copy_from_slice(r.hash.as_bytes()),
    }
}

/// Encodes a record as stored on disk: the format byte, then exactly the
/// protobuf encoding of `keel.v1.Record` (written straight from the record,
/// without building the intermediate message).
pub fn encode_record(r: &Record) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 64 + r.origin.len() + r.key.len() + r.payload.len());
    encode_record_into(r, &mut out);
    out
}

/// [`encode_record`], appended to `out`.
pub fn encode_record_into(r: &Record, out: &mut Vec<u8>) {
    out.push(FORMAT_V1);
    encode_record_body(r, out);
}

/// Encoded length of a varint field holding `v` (prost skips zero).
pub(crate) fn varint_field_len(tag: u32, v: u64) -> usize {
    use prost::encoding::{encoded_len_varint, key_len};
    if v == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(v)
    }
}

/// Encoded length of a length-delimited field of `len` bytes, written
/// even when empty.
pub(crate) fn delimited_field_len(tag: u32, len: usize) -> usize {
    use prost::encoding::{encoded_len_varint, key_len};
    key_len(tag) + encoded_len_varint(len as u64) + len
}

/// [`delimited_field_len`] of a string or bytes field (prost skips it when
/// empty).
pub(crate) fn nonempty_field_len(tag: u32, len: usize) -> usize {
    if len == 0 {
        0
    } else {
        delimited_field_len(tag, len)
    }
}

/// The length of the protobuf encoding of `keel.v1.Record` for `r` (what
/// [`encode_record_body`] writes).
pub fn record_body_len(r: &Record) -> usize {
    varint_field_len(1, r.seq)
        + varint_field_len(2, r.epoch)
        + varint_field_len(3, r.hlc)
        + nonempty_field_len(4, r.origin.len())
        + nonempty_field_len(5, r.key.len())
        + prost::encoding::key_len(6)
        + prost::encoding::encoded_len_varint(kind_to_proto(r.kind) as i32 as u64)
        + nonempty_field_len(7, r.payload.len())
        + delimited_field_len(8, r.hash.0.len())
}

/// Writes exactly prost's encoding of `keel.v1.Record` for `r`, straight
/// from the record (no intermediate message, no copies of its strings).
/// The kind is never the default value, so it is always written.
pub fn encode_record_body(r: &Record, out: &mut Vec<u8>) {
    use prost::encoding::{WireType, encode_key, encode_varint, int32, uint64};
    let out = &mut *out;
    if r.seq != 0 {
        uint64::encode(1, &r.seq, out);
    }
    if r.epoch != 0 {
        uint64::encode(2, &r.epoch, out);
    }
    if r.hlc != 0 {
        uint64::encode(3, &r.hlc, out);
    }
    for (tag, text) in [(4, &r.origin), (5, &r.key)] {
        if !text.is_empty() {
            encode_key(tag, WireType::LengthDelimited, out);
            encode_varint(text.len() as u64, out);
            out.extend_from_slice(text.as_bytes());
        }
    }
    int32::encode(6, &(kind_to_proto(r.kind) as i32), out);
    if !r.payload.is_empty() {
        encode_key(7, WireType::LengthDelimited, out);
        encode_varint(r.payload.len() as u64, out);
        out.extend_from_slice(&r.payload);
    }
    encode_key(8, WireType::LengthDelimited, out);
    encode_varint(r.hash.0.len() as u64, out);
    out.extend_from_slice(&r.hash.0);
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;
    use prost::Message;

    fn kind() -> impl Strategy<Value = PayloadKind> {
        prop_oneof![
            Just(PayloadKind::Change),
            Just(PayloadKind::Tombstone),
            Just(PayloadKind::Event)
        ]
    }

    proptest! {
        /// The hand-written encoder writes exactly prost's encoding, and
        /// decoding gives the record back.
        #[test]
        fn encode_matches_prost_and_round_trips(
            seq in 1u64.., epoch in any::<u64>(), hlc in any::<u64>(),
            origin in ".{0,20}", key in ".{0,40}", kind in kind(),
            payload in prop::collection::vec(any::<u8>(), 0..300), hash in any::<[u8; 32]>(),
        ) {
            let r = Record { seq, epoch, hlc, origin: origin.into(), key: key.into(), kind, payload: payload.into(), hash: Hash(hash) };
            let bytes = encode_record(&r);
            let mut via_prost = vec![FORMAT_V1];
            record_to_proto(&r).encode(&mut via_prost).unwrap();
            prop_assert_eq!(&bytes, &via_prost);
            prop_assert_eq!(record_body_len(&r), bytes.len() - 1);
            prop_assert_eq!(decode_record(&bytes).unwrap(), r);
        }
    }
}
