//! keel-proto: the wire schema (protobuf, prost) of keel.
//!
//! This crate holds generated types and constants only; conversions to the
//! internal log and CRDT types live at the boundary in `keel-log::wire` and
//! `keel-sync`.
//!
//! With the `grpc` feature it also holds the admin services of
//! `keel/v1/admin.proto` (`LogService`, `ClusterService`) with tonic
//! client and server code; crates that only speak the sync protocol leave
//! it off and do not link tonic.

#![allow(missing_debug_implementations)]

/// Version 1 of the schema.
pub mod v1 {
    #![allow(clippy::all, clippy::unwrap_used, clippy::indexing_slicing)]
    include!(concat!(env!("OUT_DIR"), "/keel.v1.rs"));
}

pub use v1::*;

/// The part of the Kubernetes Container Runtime Interface keel's edge
/// speaks (package `runtime.v1`, clients only; feature `cri`).
#[cfg(feature = "cri")]
pub mod cri {
    #![allow(clippy::all, clippy::unwrap_used, clippy::indexing_slicing)]
    include!(concat!(env!("OUT_DIR"), "/runtime.v1.rs"));
}

/// Version of the sync protocol spoken in [`Hello::protocol_version`].
pub const PROTOCOL_VERSION: u32 = 1;

/// Length in bytes of a chain hash.
pub const HASH_LEN: usize = 32;
