//! keel-log: the durable, hash-chained, replicated log that all of keel's
//! cloud↔edge state lives in.
//!
//! A [`Store`] holds many *streams*. Each stream has exactly one writer: the
//! store that created it with [`Role::Writer`] assigns `seq`, `epoch`, `hlc`
//! and the chain `hash`; every other store holds a [`Role::Replica`] of it
//! and only accepts records that extend its chain
//! ([`Store::append_replicated`]).
//!
//! Durability: every append goes through group commit: a staging thread
//! writes all pending appends of all streams as one atomic fjall batch, and
//! a sync thread makes the journal durable with a single fdatasync for every
//! batch staged meanwhile, and only then completes the callers. Staging the
//! next group overlaps with the previous group's fsync. A failed write or fsync poisons the store: every later write is
//! refused with [`Error::Poisoned`]. Reads only ever return durable records.
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
pub mod wire;

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
