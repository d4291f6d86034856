use std::fmt;

use bytes::Bytes;
use bytestring::ByteString;

use crate::{Error, Result};

/// A 32-byte blake3 chain hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// The hash "before" seq 1 of every stream.
    pub const ZERO: Hash = Hash([0; 32]);

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// `None` unless `bytes` is exactly 32 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Option<Hash> {
        <[u8; 32]>::try_from(bytes).ok().map(Hash)
    }

    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = self.to_hex();
        write!(f, "Hash({})", hex.get(..12).unwrap_or(&hex))
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// What a record's payload is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PayloadKind {
    /// One CRDT change to the object.
    Change,
    /// The object was deleted.
    Tombstone,
    /// An opaque event (telemetry, Kubernetes event) about the object.
    Event,
}

impl PayloadKind {
    pub(crate) fn tag(self) -> u8 {
        match self {
            PayloadKind::Change => 1,
            PayloadKind::Tombstone => 2,
            PayloadKind::Event => 3,
        }
    }
}

/// One durable entry of a stream.
#[derive(Clone, PartialEq, Eq)]
pub struct Record {
    /// Dense from 1 within a stream.
    pub seq: u64,
    pub epoch: u64,
    /// Hybrid logical clock timestamp, see [`crate::Hlc`].
    pub hlc: u64,
    /// Who made the change: a node name or an API user. (A received
    /// record's strings are slices of the bytes it came in, as its payload
    /// is: cloning a record copies none of them.)
    pub origin: ByteString,
    /// Object key, such as `pods/default/web-1`.
    pub key: ByteString,
    pub kind: PayloadKind,
    pub payload: Bytes,
    /// `blake3(prev_hash ‖ canonical(self))`.
    pub hash: Hash,
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("seq", &self.seq)
            .field("epoch", &self.epoch)
            .field("hlc", &self.hlc)
            .field("origin", &self.origin)
            .field("key", &self.key)
            .field("kind", &self.kind)
            .field("payload_len", &self.payload.len())
            .field("hash", &self.hash)
            .finish()
    }
}

/// Domain separation for the chain hash; bump with the canonical layout.
const HASH_CONTEXT: &str = "keel record chain v1";

/// Bytes of the canonical layout before the payload, besides the origin
/// and the key: prev, seq, epoch, hlc, kind and three lengths.
const FIXED_HEAD: usize = 32 + 8 + 8 + 8 + 1 + 4 + 4 + 8;
/// Heads up to this size are hashed from one buffer on the stack.
const HEAD_BUF: usize = 512;

/// The chain hash key, derived once from [`HASH_CONTEXT`].
fn chain_key() -> &'static [u8; 32] {
    static KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    KEY.get_or_init(|| blake3::derive_key(HASH_CONTEXT, b""))
}

impl Record {
    /// The chain hash of a record with these fields following `prev`.
    ///
    /// Canonical layout (all integers little-endian):
    /// `prev(32) seq(8) epoch(8) hlc(8) kind(1) len(origin)(4) origin
    /// len(key)(4) key len(payload)(8) payload`, hashed with blake3 in
    /// keyed mode; the key is `blake3::derive_key("keel record chain v1", b"")`.
    #[allow(clippy::too_many_arguments)]
    pub fn chain_hash(
        prev: &Hash,
        seq: u64,
        epoch: u64,
        hlc: u64,
        origin: &str,
        key: &str,
        kind: PayloadKind,
        payload: &[u8],
    ) -> Hash {
        let mut h = blake3::Hasher::new_keyed(chain_key());
        let parts: [&[u8]; 10] = [
            &prev.0,
            &seq.to_le_bytes(),
            &epoch.to_le_bytes(),
            &hlc.to_le_bytes(),
            &[kind.tag()],
            &(origin.len() as u32).to_le_bytes(),
            origin.as_bytes(),
            &(key.len() as u32).to_le_bytes(),
            key.as_bytes(),
            &(payload.len() as u64).to_le_bytes(),
        ];
        // The fields before the payload go to the hasher in one piece
        // where they fit the buffer (keys and origins are short): each
        // `update` call costs about as much as hashing a few dozen bytes.
        if FIXED_HEAD + origin.len() + key.len() <= HEAD_BUF {
            let mut buf = [0u8; HEAD_BUF];
            let mut at = 0;
            for part in parts {
                let end = at + part.len();
                if let Some(dst) = buf.get_mut(at..end) {
                    dst.copy_from_slice(part);
                }
                at = end;
            }
            h.update(buf.get(..at).unwrap_or_default());
        } else {
            for part in parts {
                h.update(part);
            }
        }
        h.update(payload);
        Hash(*h.finalize().as_bytes())
    }

    /// The hash this record must carry if it follows `prev`.
    pub fn expected_hash(&self, prev: &Hash) -> Hash {
        Self::chain_hash(
            prev,
            self.seq,
            self.epoch,
            self.hlc,
            &self.origin,
            &self.key,
            self.kind,
            &self.payload,
        )
    }

    /// Approximate size on the wire, used for byte limits.
    pub fn size_hint(&self) -> usize {
        self.payload.len() + self.key.len() + self.origin.len() + 64
    }

    /// The cursor a receiver holds after storing this record.
    pub fn cursor(&self) -> Cursor {
        Cursor {
            epoch: self.epoch,
            seq: self.seq,
            hash: self.hash,
        }
    }
}

/// A record to append, before the log gives it seq, epoch, hlc and hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub origin: String,
    pub key: String,
    pub kind: PayloadKind,
    pub payload: Bytes,
}

impl Entry {
    pub fn new(
        origin: impl Into<String>,
        key: impl Into<String>,
        kind: PayloadKind,
        payload: impl Into<Bytes>,
    ) -> Self {
        Entry {
            origin: origin.into(),
            key: key.into(),
            kind,
            payload: payload.into(),
        }
    }
}

/// A position in a stream: what a receiver has durably stored, or where a
/// read starts. `seq` 0 with [`Hash::ZERO`] is the empty prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Cursor {
    pub epoch: u64,
    pub seq: u64,
    pub hash: Hash,
}

/// Longest stream name accepted.
pub const MAX_STREAM_NAME: usize = 512;
/// Longest object key / origin accepted.
pub const MAX_KEY_LEN: usize = 4096;
/// Largest payload accepted (records bigger than this belong in a blob store).
pub const MAX_PAYLOAD: usize = 16 << 20;

/// Stream names are non-empty UTF-8 of at most 512 bytes with no control
/// characters (NUL separates the name from the seq in storage keys).
pub fn validate_stream_name(name: &str) -> Result<()> {
    let bad = |reason| {
        Err(Error::InvalidStreamName {
            name: name.chars().take(80).collect(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_STREAM_NAME {
        return bad("longer than 512 bytes");
    }
    if name.chars().any(char::is_control) {
        return bad("contains a control character");
    }
    Ok(())
}

pub(crate) fn validate_entry(e: &Entry) -> Result<()> {
    if e.key.len() > MAX_KEY_LEN {
        return Err(Error::InvalidEntry("object key longer than 4096 bytes"));
    }
    if e.origin.len() > MAX_KEY_LEN {
        return Err(Error::InvalidEntry("origin longer than 4096 bytes"));
    }
    if e.payload.len() > MAX_PAYLOAD {
        return Err(Error::InvalidEntry("payload larger than 16 MiB"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The canonical layout written out field by field, as documented.
    fn reference(
        prev: &Hash,
        (seq, epoch, hlc): (u64, u64, u64),
        origin: &str,
        key: &str,
        kind: PayloadKind,
        payload: &[u8],
    ) -> Hash {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&prev.0);
        bytes.extend_from_slice(&seq.to_le_bytes());
        bytes.extend_from_slice(&epoch.to_le_bytes());
        bytes.extend_from_slice(&hlc.to_le_bytes());
        bytes.push(kind.tag());
        bytes.extend_from_slice(&(origin.len() as u32).to_le_bytes());
        bytes.extend_from_slice(origin.as_bytes());
        bytes.extend_from_slice(&(key.len() as u32).to_le_bytes());
        bytes.extend_from_slice(key.as_bytes());
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(payload);
        Hash(*blake3::keyed_hash(chain_key(), &bytes).as_bytes())
    }

    proptest! {
        /// Heads that fit the buffer and heads that do not (keys up to
        /// 4 KiB) hash as the layout says.
        #[test]
        fn chain_hash_is_the_canonical_layout(
            prev in any::<[u8; 32]>(),
            ints in any::<(u64, u64, u64)>(),
            origin in "[a-z0-9-]{0,40}",
            key_len in prop_oneof![0usize..80, 400usize..600, 4000usize..4097],
            kind in prop_oneof![Just(PayloadKind::Change), Just(PayloadKind::Tombstone), Just(PayloadKind::Event)],
            payload in proptest::collection::vec(any::<u8>(), 0..3000),
        ) {
            let key: String = "k".repeat(key_len);
            let prev = Hash(prev);
            prop_assert_eq!(
                Record::chain_hash(&prev, ints.0, ints.1, ints.2, &origin, &key, kind, &payload),
                reference(&prev, ints, &origin, &key, kind, &payload)
            );
        }
    }
}
