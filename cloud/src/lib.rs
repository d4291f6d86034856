//! keel-cloud: the `cloudcore` side of keel. This crate holds the cluster's
//! security root: the cluster CA and the certificates it issues
//! ([`pki`]: node client certificates from CSRs, the cloudcore server
//! certificate, the admin certificate, revocation, and the mutual-TLS rustls
//! configurations of the QUIC hub), single-use node-bound join tokens that
//! pin the CA by hash ([`token`]), and the HTTPS bootstrap endpoint through
//! which an edge node joins and later renews its certificate
//! ([`bootstrap`]). Errors are one enum, [`Error`].

pub mod admission;
pub mod api;
pub mod attach;
pub mod bootstrap;
pub mod core;
pub mod error;
pub mod grpc;
pub mod hub;
pub mod pki;
pub mod plane;
pub mod retention;
pub mod streams;
pub mod token;

pub use error::{Error, Result, TokenError};
