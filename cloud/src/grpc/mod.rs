//! The admin gRPC API (tonic) as cloudcore serves it: keel-api's log
//! service ([`LogApi`]: replay, tail, audit, chain verification), and node
//! status, join tokens and node revocation ([`ClusterApi`], cloudcore
//! only), on
//! [`GrpcServer`], which serves only the admin certificate over TLS. The
//! `keel` CLI ([`cli`]) is its client.

pub mod cli;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel_proto::cluster_service_server::{ClusterService, ClusterServiceServer};
use keel_proto::{
    CreateTokenRequest, CreateTokenResponse, NodeStatus, RevokeNodeRequest, RevokeNodeResponse,
    StatusRequest, StatusResponse,
};
use keel_sync::quic::Sink;
use tonic::service::Routes;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::api::registry::Registry;
use crate::hub::HubHandle;
use crate::pki::ClusterCa;
use crate::token::TokenStore;

pub use keel_api::grpc::{ALPN_H2, LogApi, hlc_millis};

/// Default address of cloudcore's admin gRPC endpoint.
pub const DEFAULT_CLOUD_ADDR: &str = "127.0.0.1:10003";

/// Why a revoked node's connection is closed.
pub const REVOKED_REASON: &str = "node certificate revoked";

/// [`ClusterService`]: what cloudcore knows of its nodes, join tokens, and
/// revoking a node.
#[derive(Clone)]
pub struct ClusterApi {
    registry: Arc<Registry>,
    hub: HubHandle,
    tokens: Arc<TokenStore>,
    ca: Arc<ClusterCa>,
    owners: Option<Arc<crate::attach::shards::Shards>>,
}

impl std::fmt::Debug for ClusterApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterApi").finish_non_exhaustive()
    }
}

impl ClusterApi {
    pub fn new(
        registry: Arc<Registry>,
        hub: HubHandle,
        tokens: Arc<TokenStore>,
        ca: Arc<ClusterCa>,
    ) -> ClusterApi {
        ClusterApi {
            registry,
            hub,
            tokens,
            ca,
            owners: None,
        }
    }

    /// Names each node's owning replica (replicas sharing the nodes).
    pub fn with_owners(mut self, shards: Option<Arc<crate::attach::shards::Shards>>) -> Self {
        self.owners = shards;
        self
    }
}

/// Revokes `node` (see [`ClusterCa::revoke_node`]), deletes its unused join
/// tokens, then closes its live connection. The revocation is in force for
/// new handshakes before the connection is closed, so the node cannot come
/// straight back.
///
/// # Errors
/// An invalid node name or an I/O error persisting the revocation (the
/// revocation is then in force in memory, and the connection still closed).
pub async fn revoke_node(
    ca: &Arc<ClusterCa>,
    tokens: &Arc<TokenStore>,
    hub: &HubHandle,
    node: &str,
) -> crate::Result<RevokeNodeResponse> {
    crate::pki::validate_node_name(node)?;
    let (ca, tokens, name) = (Arc::clone(ca), Arc::clone(tokens), node.to_owned());
    let done = tokio::task::spawn_blocking(move || {
        let serials = ca.revoke_node(&name);
        let deleted = tokens.delete_unused_for(&name);
        (serials, deleted)
    })
    .await
    .map_err(|e| crate::Error::Net(std::io::Error::other(format!("revocation task: {e}"))));
    let disconnected = hub.connected().contains(node);
    hub.disconnect(node, REVOKED_REASON);
    let (serials, deleted) = done?;
    let revoked_serials = serials?;
    let tokens_deleted = u64::try_from(deleted?).unwrap_or(u64::MAX);
    info!(%node, certificates = revoked_serials.len(), tokens_deleted, disconnected, "revoked a node");
    Ok(RevokeNodeResponse {
        node: node.to_owned(),
        revoked_serials,
        tokens_deleted,
        disconnected,
    })
}

/// A hub sink that closes the connection of a revoked node as soon as its
/// link is established (a handshake that passed just before the
/// revocation), then passes every event on.
pub struct RevokedNodeGuard {
    inner: Arc<dyn Sink>,
    ca: Arc<ClusterCa>,
    hub: OnceLock<HubHandle>,
}

impl std::fmt::Debug for RevokedNodeGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevokedNodeGuard").finish_non_exhaustive()
    }
}

impl RevokedNodeGuard {
    pub fn new(inner: Arc<dyn Sink>, ca: Arc<ClusterCa>) -> Arc<Self> {
        Arc::new(RevokedNodeGuard {
            inner,
            ca,
            hub: OnceLock::new(),
        })
    }

    /// The hub whose connections it closes (set once the hub is bound).
    pub fn set_hub(&self, hub: HubHandle) {
        let _ = self.hub.set(hub);
    }
}

impl Sink for RevokedNodeGuard {
    fn persisted(&self, node: &str, stream: &str, records: &[keel_log::Record]) {
        self.inner.persisted(node, stream, records);
    }
    fn snapshot_installed(&self, node: &str, stream: &str) {
        self.inner.snapshot_installed(node, stream);
    }
    fn connected(&self, node: &str) {
        if self.ca.is_node_shut_out(node)
            && let Some(hub) = self.hub.get()
        {
            warn!(%node, "a revoked node's link came up; closing it");
            hub.disconnect(node, REVOKED_REASON);
        }
        self.inner.connected(node);
    }
    fn disconnected(&self, node: &str) {
        self.inner.disconnected(node);
    }
    fn acked(&self, node: &str, stream: &str, cursor: keel_log::Cursor) {
        self.inner.acked(node, stream, cursor);
    }
    fn room(&self) -> keel_sync::quic::Room<'_> {
        self.inner.room()
    }
    fn admit(
        &self,
        node: &str,
        stream: &str,
        records: &[keel_log::Record],
    ) -> Result<(), keel_sync::link::Refusal> {
        self.inner.admit(node, stream, records)
    }
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[tonic::async_trait]
impl ClusterService for ClusterApi {
    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        use keel_sync::link::{down_stream, up_stream};
        let store = self.registry.store();
        let streams = store.streams();
        let mut names: BTreeSet<String> = streams
            .iter()
            .filter_map(|s| s.name.strip_suffix("/down").map(str::to_owned))
            .collect();
        let connected = self.hub.connected();
        names.extend(connected.iter().cloned());
        self.registry.scan("nodes/", |n| {
            if let Some(name) = n.pointer("/metadata/name").and_then(|v| v.as_str()) {
                names.insert(name.to_owned());
            }
        });
        let acked = self.hub.acked();
        let seen = self.hub.last_seen();
        let head = |s: &str| {
            streams
                .iter()
                .find(|i| i.name == s)
                .map_or(0, |i| i.head.seq)
        };
        let nodes = names
            .into_iter()
            .map(|node| {
                let down_head = head(&down_stream(&node));
                let ack = acked.get(&node).copied();
                NodeStatus {
                    connected: connected.contains(&node),
                    last_seen_ms: seen.get(&node).copied().map_or(0, millis),
                    down_head_seq: down_head,
                    down_acked_seq: ack.unwrap_or(0),
                    down_lag: ack.map_or(down_head, |a| down_head.saturating_sub(a)),
                    up_received_seq: head(&up_stream(&node)),
                    acked_known: ack.is_some(),
                    owner: self
                        .owners
                        .as_ref()
                        .and_then(|s| s.owner_of(&node))
                        .unwrap_or_default(),
                    node,
                }
            })
            .collect();
        Ok(Response::new(StatusResponse { nodes }))
    }

    async fn create_token(
        &self,
        req: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let r = req.into_inner();
        let ttl = Duration::from_secs(if r.ttl_seconds == 0 {
            3600
        } else {
            r.ttl_seconds
        });
        let tokens = self.tokens.clone();
        let node = r.node.clone();
        let t = tokio::task::spawn_blocking(move || tokens.create(&node, ttl, SystemTime::now()))
            .await
            .map_err(|e| Status::internal(format!("token task: {e}")))?
            .map_err(|e| match e {
                crate::Error::Io { .. } => Status::internal(e.to_string()),
                _ => Status::invalid_argument(e.to_string()),
            })?;
        info!(node = %r.node, "issued a join token over the admin API");
        Ok(Response::new(CreateTokenResponse {
            token: t.as_str().to_owned(),
            expires_ms: millis(t.expires_at()),
        }))
    }

    async fn revoke_node(
        &self,
        req: Request<RevokeNodeRequest>,
    ) -> Result<Response<RevokeNodeResponse>, Status> {
        let node = req.into_inner().node;
        revoke_node(&self.ca, &self.tokens, &self.hub, &node)
            .await
            .map(Response::new)
            .map_err(|e| match e {
                crate::Error::InvalidNodeName { .. } => Status::invalid_argument(e.to_string()),
                _ => Status::internal(e.to_string()),
            })
    }
}

/// A running admin gRPC endpoint (keel-api's [`keel_api::grpc::GrpcServer`]
/// with cloudcore's services and its admin certificate).
#[derive(Debug)]
pub struct GrpcServer(keel_api::grpc::GrpcServer);

impl GrpcServer {
    /// Serves `log` and `cluster` (if any) on `addr` over TLS (`tls` must
    /// require a client certificate of the cluster CA); only the admin
    /// certificate is served.
    pub async fn bind_tls(
        addr: SocketAddr,
        tls: rustls::ServerConfig,
        log: LogApi,
        cluster: Option<ClusterApi>,
    ) -> std::io::Result<GrpcServer> {
        let more = cluster
            .map(|c| Routes::new(ClusterServiceServer::new(c)))
            .unwrap_or_default();
        keel_api::grpc::GrpcServer::bind_tls(addr, tls, log, more, crate::pki::is_admin_cert)
            .await
            .map(GrpcServer)
    }

    /// Serves `log` on `addr` in plain HTTP/2 with no authentication: for
    /// loopback only.
    pub async fn bind_plain(addr: SocketAddr, log: LogApi) -> std::io::Result<GrpcServer> {
        keel_api::grpc::GrpcServer::bind_plain(addr, log)
            .await
            .map(GrpcServer)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.0.local_addr()
    }

    /// Stops accepting and ends open calls.
    pub async fn shutdown(self) {
        self.0.shutdown().await;
    }
}
