//! cloudcore assembled: cluster CA, log store, registry, CloudHub, the
//! bootstrap endpoint, the Kubernetes API, metrics, and the admin
//! kubeconfig. The `cloudcore` binary parses flags and calls [`run`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use keel_log::{Store, StoreOptions};
use serde::Deserialize;
use tracing::{info, warn};

use crate::api::registry::{CLUSTER_STREAM, Registry};
use crate::api::{self, ApiServer};
use crate::attach::{Attached, KubernetesConfig};
use crate::bootstrap::{BootstrapOptions, BootstrapServer};
use crate::grpc::{ClusterApi, GrpcServer, LogApi, RevokedNodeGuard};
use crate::hub::{CloudHub, HubOptions};
use crate::pki::{self, ClusterCa};
use crate::plane::{ControlPlane, Embedded, PlaneSink};
use crate::token::TokenStore;

pub use keel_api::shutdown_signal;

/// cloudcore's settings (YAML file, then flags).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// Where the CA, tokens, log and kubeconfig live.
    pub data_dir: PathBuf,
    /// Kubernetes API (HTTPS).
    pub api_addr: SocketAddr,
    /// CloudHub (QUIC).
    pub hub_addr: SocketAddr,
    /// Join and certificate renewal (HTTPS).
    pub bootstrap_addr: SocketAddr,
    /// Prometheus metrics (plain HTTP); none if absent.
    #[serde(default)]
    pub metrics_addr: Option<SocketAddr>,
    /// The admin gRPC API (TLS, admin certificate only): log replay, tail,
    /// audit, chain verification, node status, join tokens. `null`: off.
    #[serde(default = "default_grpc_addr")]
    pub grpc_addr: Option<SocketAddr>,
    /// Names and addresses the server certificate is valid for.
    #[serde(default = "default_names")]
    pub server_names: Vec<String>,
    /// Attached mode: the Kubernetes cluster that owns desired state
    /// (cloudcore then serves no Kubernetes API of its own). Absent: the
    /// embedded control plane.
    #[serde(default)]
    pub kubernetes: Option<KubernetesConfig>,
    /// What the log keeps, and how often it is compacted.
    #[serde(default)]
    pub retention: crate::retention::RetentionConfig,
}

fn default_grpc_addr() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 10003)))
}

fn default_names() -> Vec<String> {
    vec!["127.0.0.1".into(), "localhost".into()]
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("cloudcore-data"),
            api_addr: SocketAddr::from(([127, 0, 0, 1], 6443)),
            hub_addr: SocketAddr::from(([127, 0, 0, 1], 10000)),
            bootstrap_addr: SocketAddr::from(([127, 0, 0, 1], 10002)),
            metrics_addr: None,
            grpc_addr: default_grpc_addr(),
            server_names: default_names(),
            kubernetes: None,
            retention: crate::retention::RetentionConfig::default(),
        }
    }
}

/// Errors starting cloudcore.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{0}")]
    Pki(#[from] crate::Error),
    #[error("log store: {0}")]
    Log(#[from] keel_log::Error),
    #[error("registry: {0}")]
    Registry(#[from] crate::api::status::Status),
    #[error("{0}")]
    Attach(#[from] crate::attach::AttachError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CoreError {
    let what = what.into();
    move |source| CoreError::Io { what, source }
}

/// Writes a kubeconfig for the admin certificate at `path`.
pub fn write_kubeconfig(
    path: &Path,
    server: &str,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> std::io::Result<()> {
    use base64_engine::encode;
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: keel\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\nusers:\n- name: keel-admin\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: keel\n  context:\n    cluster: keel\n    user: keel-admin\n    namespace: default\ncurrent-context: keel\n",
        encode(ca_pem.as_bytes()),
        encode(cert_pem.as_bytes()),
        encode(key_pem.as_bytes())
    );
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&tmp)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

mod base64_engine {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    /// Standard base64 with padding.
    pub fn encode(data: &[u8]) -> String {
        let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
        for chunk in data.chunks(3) {
            let b = [
                chunk.first().copied().unwrap_or(0),
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    let idx = ((n >> (18 - 6 * i)) & 63) as usize;
                    out.push(char::from(*ALPHABET.get(idx).unwrap_or(&b'A')));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

/// Path of the admin kubeconfig in `data_dir`.
pub fn kubeconfig_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.kubeconfig")
}

/// Issues a join token for `node`, valid for `ttl`.
pub fn create_token(data_dir: &Path, node: &str, ttl: Duration) -> Result<String, CoreError> {
    let ca = ClusterCa::load_or_create(data_dir)?;
    let tokens = TokenStore::open(data_dir, &ca.ca_hash())?;
    let t = tokens.create(node, ttl, SystemTime::now())?;
    Ok(t.as_str().to_owned())
}

/// A running cloudcore.
#[derive(Debug)]
pub struct Running {
    /// The embedded Kubernetes API (none when attached to a cluster).
    pub api_addr: Option<SocketAddr>,
    pub hub_addr: SocketAddr,
    pub bootstrap_addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub grpc_addr: Option<SocketAddr>,
    pub kubeconfig: PathBuf,
    pub registry: Arc<Registry>,
    /// The attached cluster's bridge, in attached mode.
    pub attached: Option<Arc<Attached>>,
    /// The edge-autonomy admission webhook, in attached mode.
    pub webhook_addr: Option<SocketAddr>,
    api: Option<ApiServer>,
    hub: CloudHub,
    bootstrap: BootstrapServer,
    metrics: Option<tokio::task::JoinHandle<()>>,
    grpc: Option<GrpcServer>,
    compactor: tokio::task::JoinHandle<()>,
    admission: Option<tokio::task::JoinHandle<()>>,
}

/// The hub's stateless-reset secret, created once (0600) in the data
/// directory so that it survives restarts.
fn reset_secret(dir: &Path) -> Result<[u8; 32], CoreError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join("hub-reset.key");
    if let Ok(bytes) = std::fs::read(&path)
        && let Ok(secret) = <[u8; 32]>::try_from(bytes.as_slice())
    {
        return Ok(secret);
    }
    let mut secret = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret).map_err(
        |_| CoreError::Io {
            what: "generating the hub reset secret".into(),
            source: std::io::Error::other("no system randomness"),
        },
    )?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("writing the hub reset secret"))?;
    f.write_all(&secret)
        .and_then(|()| f.sync_all())
        .map_err(io("writing the hub reset secret"))?;
    std::fs::rename(&tmp, &path).map_err(io("writing the hub reset secret"))?;
    Ok(secret)
}

/// The log's options. `KEEL_FAULT_SLOW_FSYNC_MS` (crash tests only) makes
/// every fsync that much slower, so that a SIGKILL lands between a change
/// and its durability more often than on a fast disk.
fn store_options() -> StoreOptions {
    let slow_sync = std::env::var("KEEL_FAULT_SLOW_FSYNC_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(std::time::Duration::from_millis);
    if let Some(d) = slow_sync {
        warn!(?d, "fault injection: every fsync is slowed down");
    }
    StoreOptions {
        slow_sync,
        ..StoreOptions::default()
    }
}

/// Starts every part of cloudcore.
pub async fn start(cfg: &Config) -> Result<Running, CoreError> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(io("creating the data directory"))?;
    // Replicas of one cluster share its CA (a Secret on the cluster).
    if let Some(k) = &cfg.kubernetes
        && let Some(r) = &k.replica
    {
        crate::attach::shards::share_ca(k, r, &cfg.data_dir).await?;
    }
    let ca = Arc::new(ClusterCa::load_or_create(&cfg.data_dir)?);
    let tokens = Arc::new(TokenStore::open(&cfg.data_dir, &ca.ca_hash())?);
    // Replicas share join tokens, issued certificates and revocations
    // through the cluster; what the others did is merged before this one
    // admits anyone.
    let shared_admission = match cfg
        .kubernetes
        .as_ref()
        .and_then(|k| Some((k, k.replica.as_ref()?)))
    {
        Some((k, r)) => {
            let (client, _, _) = crate::attach::client_for(k).await?;
            let store = Arc::new(crate::attach::admission::SecretAdmission::new(client, r));
            ca.share(store.clone());
            tokens.share(store.clone());
            let seen = crate::attach::admission::merge_now(&store, &ca, &tokens).await?;
            Some((store, seen))
        }
        None => None,
    };
    let names: Vec<&str> = cfg.server_names.iter().map(String::as_str).collect();
    let server = ca.server_cert(&names)?;
    let store = Store::open(cfg.data_dir.join("log"), store_options())?;
    let registry = Registry::open(store.clone())?;
    // A watch resumes from history as long as the log keeps it as history.
    registry.set_watch_window(cfg.retention.age);

    // `kubectl logs`, `exec`, `attach` and `port-forward` through each
    // node's connection (the hub comes later).
    let tunnel = crate::streams::Tunnel::new(registry.clone());
    // The control plane: the embedded one, or the attached cluster.
    let (plane, attached, api): (Arc<dyn ControlPlane>, _, _) = match &cfg.kubernetes {
        Some(k) => {
            let a = Attached::connect(k.clone(), registry.clone()).await?;
            (a.clone(), Some(a), None)
        }
        None => {
            let api_tls = pki::api_tls_config(&ca, &server.cert_pem, &server.key_pem)?;
            let api = api::bind(cfg.api_addr, api_tls, registry.clone(), tunnel.clone())
                .await
                .map_err(io(format!("binding the API on {}", cfg.api_addr)))?;
            (Arc::new(Embedded(registry.clone())), None, Some(api))
        }
    };
    let webhook_addr = match &attached {
        Some(a) => a.start(&ca, &server, tunnel.pod_streams()).await?,
        None => None,
    };
    // Session tickets sealed with a key derived from the hub's persisted
    // secret: nodes resume their TLS sessions across cloudcore restarts.
    let hub_secret = reset_secret(&cfg.data_dir)?;
    let tickets = pki::HubTickets::new(&hub_secret)?;
    let hub_tls = pki::hub_tls_config(&ca, &server.cert_pem, &server.key_pem, tickets.clone())?;
    // Closes a revoked node's link that raced its revocation.
    let guard = RevokedNodeGuard::new(Arc::new(PlaneSink(plane)), ca.clone());
    // One of several replicas: the hub takes only this one's nodes.
    let shards = attached.as_ref().and_then(|a| a.shards());
    let router = match (&attached, &shards) {
        (Some(a), Some(_)) => Some(a.clone() as Arc<dyn crate::hub::Router>),
        _ => None,
    };
    let hub = CloudHub::bind(
        cfg.hub_addr,
        hub_tls,
        store.clone(),
        guard.clone(),
        HubOptions {
            reset_secret: Some(hub_secret),
            revocations: Some(ca.revocations()),
            router,
            ..HubOptions::default()
        },
    )?;
    guard.set_hub(hub.stats_handle());
    let admission = shared_admission.map(|(store, seen)| {
        tokio::spawn(crate::attach::admission::run(
            store,
            ca.clone(),
            tokens.clone(),
            hub.stats_handle(),
            seen,
        ))
    });
    if let (Some(a), Some(s)) = (&attached, &shards) {
        let bound = hub.local_addr()?;
        if !s.set_address(bound) {
            return Err(CoreError::Io {
                what: format!(
                    "replica {}: the hub is bound to {bound}, which edges cannot be sent to; set kubernetes.replica.advertise",
                    s.id()
                ),
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            });
        }
        a.start_shards(hub.stats_handle());
    }
    tunnel.set_hub(hub.stats_handle());
    let bootstrap = BootstrapServer::bind(
        cfg.bootstrap_addr,
        ca.clone(),
        tokens.clone(),
        &server,
        BootstrapOptions::default(),
    )
    .await?;

    let admin = ca.admin_cert()?;
    let kubeconfig = kubeconfig_path(&cfg.data_dir);
    let api_addr = api.as_ref().map(ApiServer::local_addr);
    // In attached mode nothing serves this address: the kubeconfig then
    // carries keel's admin credentials for the `keel` CLI only.
    write_kubeconfig(
        &kubeconfig,
        &format!("https://{}", api_addr.unwrap_or(cfg.api_addr)),
        ca.cert_pem(),
        &admin.cert_pem,
        &admin.key_pem,
    )
    .map_err(io("writing the kubeconfig"))?;

    let (metrics, metrics_addr) = match cfg.metrics_addr {
        Some(a) => {
            let (task, addr) = metrics::serve(
                a,
                registry.clone(),
                hub.stats_handle(),
                shards.clone(),
                tickets,
            )
            .await
            .map_err(io(format!("binding metrics on {a}")))?;
            (Some(task), Some(addr))
        }
        None => (None, None),
    };
    let grpc = match cfg.grpc_addr {
        Some(a) => {
            let tls = pki::api_tls_config(&ca, &server.cert_pem, &server.key_pem)?;
            let log = LogApi::new(store.clone(), vec![CLUSTER_STREAM.to_owned()]);
            let cluster = ClusterApi::new(registry.clone(), hub.stats_handle(), tokens, ca.clone())
                .with_owners(shards.clone());
            let cluster = Some(cluster);
            Some(
                GrpcServer::bind_tls(a, tls, log, cluster)
                    .await
                    .map_err(io(format!("binding the admin gRPC API on {a}")))?,
            )
        }
        None => None,
    };
    let grpc_addr = grpc.as_ref().map(GrpcServer::local_addr);
    let compactor = tokio::spawn(crate::retention::run(
        registry.clone(),
        hub.stats_handle(),
        cfg.retention.clone(),
    ));
    let hub_addr = hub.local_addr()?;
    info!(api = ?api_addr, hub = %hub_addr, bootstrap = %bootstrap.local_addr(),
        grpc = ?grpc_addr, kubeconfig = %kubeconfig.display(), "cloudcore running");
    Ok(Running {
        api_addr,
        hub_addr,
        bootstrap_addr: bootstrap.local_addr(),
        metrics_addr,
        grpc_addr,
        kubeconfig,
        registry,
        attached,
        webhook_addr,
        api,
        hub,
        bootstrap,
        metrics,
        grpc,
        compactor,
        admission,
    })
}

impl Running {
    /// Stops accepting, closes every connection, and returns.
    pub async fn shutdown(self) {
        if let Some(api) = &self.api {
            api.shutdown();
        }
        if let Some(a) = &self.attached {
            a.shutdown();
            a.release_shards().await;
        }
        if let Some(g) = self.grpc {
            g.shutdown().await;
        }
        if let Some(m) = self.metrics {
            m.abort();
        }
        self.compactor.abort();
        if let Some(a) = self.admission {
            a.abort();
        }
        self.bootstrap.shutdown().await;
        self.hub.shutdown().await;
        info!("cloudcore stopped");
    }
}

mod metrics {
    use super::*;
    use bytes::Bytes;
    use http_body_util::Full;
    use hyper::{Request, Response};
    use hyper_util::rt::TokioIo;

    pub async fn serve(
        addr: SocketAddr,
        registry: Arc<Registry>,
        hub: crate::hub::HubHandle,
        shards: Option<Arc<crate::attach::shards::Shards>>,
        tickets: Arc<crate::pki::HubTickets>,
    ) -> std::io::Result<(tokio::task::JoinHandle<()>, SocketAddr)> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (registry, hub, shards, tickets) = (
                    registry.clone(),
                    hub.clone(),
                    shards.clone(),
                    tickets.clone(),
                );
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let body = if req.uri().path() == "/metrics" {
                                render(&registry, &hub, shards.as_deref(), &tickets)
                            } else {
                                String::new()
                            };
                            let code = if req.uri().path() == "/metrics" {
                                200
                            } else {
                                404
                            };
                            async move {
                                let mut r = Response::new(Full::new(Bytes::from(body)));
                                *r.status_mut() =
                                    hyper::StatusCode::from_u16(code).unwrap_or_default();
                                r.headers_mut().insert(
                                    hyper::header::CONTENT_TYPE,
                                    hyper::header::HeaderValue::from_static(
                                        "text/plain; version=0.0.4",
                                    ),
                                );
                                Ok::<_, std::convert::Infallible>(r)
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Ok((task, local))
    }

    fn render(
        registry: &Registry,
        hub: &crate::hub::HubHandle,
        shards: Option<&crate::attach::shards::Shards>,
        tickets: &crate::pki::HubTickets,
    ) -> String {
        let mut out = String::new();
        if let Some(s) = shards {
            out.push_str("# HELP keel_replica_shards Shards this cloudcore replica owns.\n# TYPE keel_replica_shards gauge\n");
            out.push_str(&format!(
                "keel_replica_shards{{replica=\"{}\"}} {}\n",
                s.id(),
                s.owned_count()
            ));
            out.push_str("# HELP keel_node_owner The replica owning each node this one knows, as its shard Leases say.\n# TYPE keel_node_owner gauge\n");
            for node in registry.nodes() {
                if let Some(owner) = s.owner_of(&node) {
                    out.push_str(&format!(
                        "keel_node_owner{{node=\"{node}\",replica=\"{owner}\"}} 1\n"
                    ));
                }
            }
        }
        let connected = hub.connected();
        out.push_str("# HELP keel_connected_nodes Edge nodes with a live connection.\n# TYPE keel_connected_nodes gauge\n");
        out.push_str(&format!("keel_connected_nodes {}\n", connected.len()));
        let s = hub.stats();
        out.push_str("# HELP keel_hub_connections_total Connections by outcome.\n# TYPE keel_hub_connections_total counter\n");
        for (what, v) in [
            ("accepted", &s.accepted),
            ("refused", &s.refused),
            ("turned_away", &s.turned_away),
            ("closed", &s.closed),
        ] {
            out.push_str(&format!(
                "keel_hub_connections_total{{outcome=\"{what}\"}} {}\n",
                v.load(Ordering::Relaxed)
            ));
        }
        out.push_str("# HELP keel_hub_resumed_sessions_total Handshakes that resumed a TLS session with one of the hub's tickets.\n# TYPE keel_hub_resumed_sessions_total counter\n");
        out.push_str(&format!(
            "keel_hub_resumed_sessions_total {}\n",
            tickets.opened()
        ));
        out.push_str("# HELP keel_hub_link_violations_total Links closed because the node broke a rule, by rule.\n# TYPE keel_hub_link_violations_total counter\n");
        for (rule, v) in [
            ("forbidden", &s.forbidden),
            ("limit", &s.limit),
            ("malformed", &s.malformed),
            ("unauthorized", &s.unauthorized),
        ] {
            out.push_str(&format!(
                "keel_hub_link_violations_total{{rule=\"{rule}\"}} {}\n",
                v.load(Ordering::Relaxed)
            ));
        }
        out.push_str("# HELP keel_objects Objects in the registry.\n# TYPE keel_objects gauge\n");
        out.push_str(&format!("keel_objects {}\n", registry.len()));
        out.push_str("# HELP keel_rebased_objects_total Object histories replaced by a rebase root.\n# TYPE keel_rebased_objects_total counter\n");
        out.push_str(&format!(
            "keel_rebased_objects_total {}\n",
            registry.rebased_total()
        ));
        out.push_str("# HELP keel_stream_head_seq Last durable seq of each stream (appends).\n# TYPE keel_stream_head_seq counter\n");
        let streams = registry.store().streams();
        for st in &streams {
            out.push_str(&format!(
                "keel_stream_head_seq{{stream=\"{}\"}} {}\n",
                st.name, st.head.seq
            ));
        }
        out.push_str("# HELP keel_stream_horizon_seq Seq each stream is compacted up to (its snapshot).\n# TYPE keel_stream_horizon_seq gauge\n");
        for st in &streams {
            out.push_str(&format!(
                "keel_stream_horizon_seq{{stream=\"{}\"}} {}\n",
                st.name, st.horizon.seq
            ));
        }
        out.push_str("# HELP keel_node_acked_seq Seq of each node's down stream the node has acknowledged.\n# TYPE keel_node_acked_seq gauge\n");
        out.push_str("# HELP keel_node_lag_records Records of each node's down stream not yet acknowledged.\n# TYPE keel_node_lag_records gauge\n");
        for (node, acked) in hub.acked() {
            let head = streams
                .iter()
                .find(|s| s.name == keel_sync::link::down_stream(&node))
                .map_or(0, |s| s.head.seq);
            out.push_str(&format!("keel_node_acked_seq{{node=\"{node}\"}} {acked}\n"));
            out.push_str(&format!(
                "keel_node_lag_records{{node=\"{node}\"}} {}\n",
                head.saturating_sub(acked)
            ));
        }
        out
    }
}

/// Runs cloudcore until `stop` resolves; `started` is called once
/// everything listens.
pub async fn run(
    cfg: Config,
    started: impl FnOnce(&Running),
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), CoreError> {
    let running = start(&cfg).await?;
    started(&running);
    stop.await;
    warn!("shutting down");
    running.shutdown().await;
    Ok(())
}
