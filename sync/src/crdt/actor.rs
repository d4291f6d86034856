//! Writer identities.

use std::fmt;

/// A stable writer identity: 16 bytes, used as the automerge actor id of every
/// change the writer makes.
///
/// Each actor must write from exactly one place (one [`super::ObjectStore`]):
/// automerge numbers an actor's changes with a per-document sequence number, and
/// two stores making different changes as the same actor on the same object
/// would produce two different changes with the same `(actor, seq)`, which the
/// other replicas reject.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ActorId([u8; 16]);

impl ActorId {
    /// Derive an actor id from a stable name (e.g. `"cloud"` or `"edge/node-7"`).
    ///
    /// Deterministic across processes, platforms and versions: the id is the
    /// 128-bit FNV-1a hash of `"keel-actor\0" ++ name`, big-endian. FNV is not a
    /// cryptographic hash; actor names are configuration, not attacker input,
    /// and 128 bits make accidental collisions between names negligible.
    pub fn from_name(name: &str) -> Self {
        const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
        const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
        let mut h = OFFSET;
        for &b in b"keel-actor\0".iter().chain(name.as_bytes()) {
            h ^= u128::from(b);
            h = h.wrapping_mul(PRIME);
        }
        Self(h.to_be_bytes())
    }

    /// Use raw bytes as the actor id.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The raw 16 bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    pub(crate) fn to_automerge(self) -> automerge::ActorId {
        automerge::ActorId::from(self.0)
    }
}

impl From<ActorId> for automerge::ActorId {
    fn from(a: ActorId) -> Self {
        a.to_automerge()
    }
}

impl fmt::Display for ActorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ActorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ActorId({self})")
    }
}
