//! keel-api: the API both sides of keel serve, so that kubectl and the
//! `keel` CLI see one API whether they talk to cloudcore or to an
//! edgecore.
//!
//! The Kubernetes REST vocabulary — the resource catalog, discovery,
//! OpenAPI and `kubectl get` tables ([`resources`]), label and field
//! selectors ([`select`]), `Status` errors ([`status`]) and watch history
//! ([`watch`]) — and the HTTP server of the Kubernetes API ([`server`]):
//! reads (get, list, watch, tables, discovery, container logs) over any
//! [`ReadObjects`], writes handed to a [`WriteObjects`] if the server has
//! one (cloudcore's registry; edgecore's API is read-only). The admin
//! log gRPC service ([`grpc`]): replay, tail, audit and chain
//! verification over any keel log.

pub mod auth;
pub mod exec;
pub mod grpc;
pub mod kubelet;
pub mod meta;
pub mod portforward;
pub mod remotecommand;
pub mod resources;
pub mod select;
pub mod server;
pub mod spdy;
pub mod status;
pub mod watch;

pub use server::{ApiServer, LogRequest, LogsFuture, PodLogs, ReadObjects, WriteObjects};
pub use status::Status;

/// Resolves on SIGINT (Ctrl-C) or SIGTERM: the graceful-stop signal of
/// keel's binaries.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending().await,
            }
        } => {}
    }
}
