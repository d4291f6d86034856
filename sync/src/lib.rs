//! keel-sync: the replication protocol as a sans-IO state machine, the CRDT
//! object store, and (later) the QUIC driver that runs the protocol on sockets.

pub mod crdt;
pub mod frame;
pub mod link;
pub mod objects;
#[cfg(feature = "quic")]
pub mod queue;
#[cfg(feature = "quic")]
pub mod quic;
#[cfg(feature = "quic")]
pub mod session;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
