//! keel-edge: the `edgecore` agent that runs on each edge node. This crate
//! so far holds the node's identity: [`bootstrap`] joins the cluster with a
//! single-use join token (pinning the cluster CA by the hash the token
//! carries before trusting the server), keeps the node's key and
//! certificate in `data_dir/pki/`, renews the certificate over mutual TLS
//! before it expires, and builds the rustls client configuration the QUIC
//! EdgeHub presents to cloudcore. Errors are one enum, [`Error`].

pub mod bootstrap;
pub mod core;
pub mod devicetwin;
pub mod edged;
pub mod error;
pub mod eventbus;
pub mod hub;
pub mod meta;
pub mod node;
mod streams;

pub use error::{Error, Result};
