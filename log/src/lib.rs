//! keel-log: the durable, hash-chained, replicated log that all of keel's
//! cloud↔edge state lives in.
//!
//! A [`Store`] holds many *streams*. Each stream has exactly one writer: the
//! store that created it with [`Role::Writer`] assigns `seq`, `epoch`, `hlc`
//! and the chain `hash`; every other store holds a [`Role::Replica`] of it
//! and only accepts records that extend its chain
//! ([`Store::append_replicated`]).
//!
//! Durability: every append goes through group commit: all pending
//! appends of all streams become one entry of the commit journal (a ring
//! whose blocks are written before use, so its fdatasync commits data
//! alone) and one atomic fjall batch, and one fdatasync of the commit
//! journal makes the group durable; only then are the callers completed
//! (the fjall batch of a large group may be written after, on the apply
//! thread; whatever reads fjall waits for it first).
//! fjall's own journal is synced at checkpoints; on open, the commit
//! journal's entries that fjall lost are applied again. A blocking
//! [`Store::append`] that finds no group being committed commits its own
//! (no hand-off to the commit thread). A failed write or fsync poisons the
//! store: every later write is refused with [`Error::Poisoned`]. Reads
//! only ever return durable records.
//!
//! Compaction folds records up to a seq into one snapshot per object
//! ([`Store::compact`]); reading from a cursor below that horizon yields
//! snapshot + tail ([`Read::Snapshot`]).
//!
//! The log knows nothing of networks, Kubernetes or CRDTs.

mod clock;
pub mod codec;
mod error;
mod fold;
mod record;
mod store;
mod ticket;
mod wal;
pub mod wire;

pub use bytestring::ByteString;
pub use clock::{Clock, Hlc, SystemClock};
pub use error::{Error, Result};
pub use fold::{ConcatFold, Fold, FoldError};
pub use record::{
    Cursor, Entry, Hash, MAX_KEY_LEN, MAX_PAYLOAD, PayloadKind, Record, validate_stream_name,
};
pub use store::{
    CursorCheck, HeadWait, ObjectSnapshot, Read, ReadLimits, Role, Segment, Snapshot, Store,
    StoreOptions, StoreStats, StreamInfo, VerifyOnOpen,
};
pub use ticket::Ticket;
pub use wire::Chained;
