//! cloudcore attached to a real Kubernetes cluster (`--kubeconfig`): the
//! bridge between the cluster's API server and keel's log.
//!
//! The cluster owns desired state. cloudcore watches what is bound to its
//! edge nodes — pods with `spec.nodeName` of a keel node (whatever made
//! them: Deployment, DaemonSet, Job, a plain pod), the ConfigMaps and
//! Secrets they use, Devices with `spec.nodeName` and their DeviceModels —
//! and writes each into its [`Registry`], which is now a durable mirror:
//! every change an automerge change in `cluster` and in the node's `down`
//! stream, exactly as in embedded mode. What nodes report in `up` (pod
//! status, node status, device twins) is folded there too and then
//! patched back through the status subresources ([`writeback`]).
//!
//! - **Ownership.** The cluster writes everything but the `status` of pods
//!   and devices bound to a keel node; the edge writes that status. A
//!   mirror write keeps the mirror's status, so a late watch event never
//!   takes back what the edge reported.
//! - **Resume.** Watches resume from resourceVersion (kube's watcher). On
//!   a relist (`410 Gone`, a new watch, a cloudcore start) the listed set
//!   is diffed against the mirror: unchanged objects write nothing (the
//!   registry drops a no-op), changed ones write one change, and mirrored
//!   objects that are gone are deleted. Nothing is missed, nothing sent
//!   twice.
//! - **Deletion.** A pod with a `deletionTimestamp` is deleted from the
//!   mirror (the tombstone in `N/down` stops it on the edge, now or when
//!   the node comes back) and, once that is durable, deleted from the
//!   cluster with grace period 0 and a UID precondition: cloudcore plays
//!   the kubelet's final delete.
//! - **Nodes.** Each edge node is a Node of the cluster, created by
//!   cloudcore on first connect with the `node-role.kubernetes.io/edge`
//!   label (and the configured taints); its Lease in `kube-node-lease` is
//!   renewed while its QUIC connection lives; its Ready condition follows
//!   the connection; capacity, allocatable, addresses and nodeInfo are
//!   what the edge reports.
//! - **Autonomy.** A mutating admission webhook ([`webhook`]) gives pods
//!   meant for edge nodes tolerations of `node.kubernetes.io/unreachable`
//!   and `not-ready` without a time limit, so the cluster never evicts
//!   them while a node is offline.

pub mod admission;
mod kinds;
pub mod shards;
mod streams;
mod webhook;
mod writeback;

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt as _;
use keel_log::Record;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::api::registry::{
    Registry, Write, now_rfc3339, now_rfc3339_micro, pod_refs, ready_condition,
};
use crate::pki::ClusterCa;
use crate::plane::ControlPlane;
use kinds::KINDS;
pub use kinds::Kind;

/// The `kubernetes:` section of cloudcore's config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KubernetesConfig {
    /// The cluster's kubeconfig (its current context is used).
    pub kubeconfig: PathBuf,
    /// Taints put on an edge Node when cloudcore creates it (Kubernetes
    /// `Taint` objects), e.g. `[{key: node-role.kubernetes.io/edge,
    /// effect: NoSchedule}]` to keep other workloads off edge nodes.
    #[serde(default)]
    pub node_taints: Vec<Value>,
    /// How pods bound to edge nodes survive an offline node:
    /// `webhook` (default) or `none`.
    #[serde(default)]
    pub autonomy: Autonomy,
    /// Where cloudcore serves the admission webhook (HTTPS, cluster CA).
    #[serde(default = "default_webhook_addr")]
    pub webhook_addr: SocketAddr,
    /// The URL the API server calls for the webhook; default
    /// `https://<webhookAddr>/mutate-pods`.
    #[serde(default)]
    pub webhook_url: Option<String>,
    /// Seconds between renewals of a connected node's Lease.
    #[serde(default = "default_lease_renew")]
    pub lease_renew_seconds: u64,
    /// Where cloudcore serves the kubelet streaming API of its edge nodes
    /// (HTTPS): the API server's `kubectl logs`, `exec`, `attach` and
    /// `port-forward` for edge pods arrive here and go on through each
    /// node's own connection.
    #[serde(default = "default_stream_addr")]
    pub stream_addr: SocketAddr,
    /// The address the API server dials for it (each edge Node's
    /// `InternalIP`); default: the IP of `streamAddr`, which must then not
    /// be a wildcard.
    #[serde(default)]
    pub stream_advertise_address: Option<std::net::IpAddr>,
    /// PEM file of the CA that issues the API server's kubelet client
    /// certificate (`--kubelet-client-certificate`); default: the CA of
    /// the kubeconfig's cluster.
    #[serde(default)]
    pub kubelet_client_ca: Option<PathBuf>,
    /// Set when this cloudcore is one of several replicas sharing the
    /// cluster's edge nodes (`shards`).
    #[serde(default)]
    pub replica: Option<shards::ReplicaConfig>,
}

/// How long a node taken over from another replica has to re-assert its
/// status before this replica writes what it holds of it.
const TAKEOVER_QUIET: Duration = Duration::from_secs(5);

/// The label on the Nodes cloudcore created for its edge nodes (set in
/// `sync_node`).
const MANAGED_BY: &str = "node.keel.io/managed-by";

/// The annotation on an edge Node with the node's own addresses (JSON, as
/// `status.addresses`), since its status names cloudcore's stream server.
pub const EDGE_ADDRESSES: &str = "node.keel.io/edge-addresses";

fn default_webhook_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 10004))
}

fn default_lease_renew() -> u64 {
    10
}

fn default_stream_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 10350))
}

impl KubernetesConfig {
    /// Attached to the cluster of `kubeconfig`, every other setting default.
    pub fn new(kubeconfig: PathBuf) -> Self {
        KubernetesConfig {
            kubeconfig,
            node_taints: Vec::new(),
            autonomy: Autonomy::default(),
            webhook_addr: default_webhook_addr(),
            webhook_url: None,
            lease_renew_seconds: default_lease_renew(),
            stream_addr: default_stream_addr(),
            stream_advertise_address: None,
            kubelet_client_ca: None,
            replica: None,
        }
    }
}

/// How pods on edge nodes are kept through an outage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Autonomy {
    /// The admission webhook adds unlimited unreachable / not-ready
    /// tolerations to pods meant for edge nodes.
    #[default]
    Webhook,
    /// Nothing: the cluster's own eviction applies.
    None,
}

/// Errors attaching to a cluster.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttachError {
    /// The kubeconfig cannot be read or used.
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig { path: String, message: String },
    /// The API server cannot be reached (retryable).
    #[error("cannot reach the Kubernetes API server at {server}: {message}")]
    Unreachable { server: String, message: String },
    /// The API server refused cloudcore's credentials.
    #[error("the Kubernetes API server at {server} refused cloudcore's credentials: {message}")]
    Unauthorized { server: String, message: String },
    /// A set-up request failed.
    #[error("the Kubernetes API server at {server}: {what}: {message}")]
    Setup {
        server: String,
        what: String,
        message: String,
    },
    /// The webhook listener could not start.
    #[error("admission webhook on {addr}: {message}")]
    Webhook { addr: SocketAddr, message: String },
    /// The kubelet stream server could not start.
    #[error("the kubelet stream API on {addr}: {message}")]
    Streams { addr: SocketAddr, message: String },
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Keys waiting for work: FIFO in the order they first became due, each
/// at most once (bounded by the number of objects, not by the event rate).
#[derive(Debug, Default)]
struct WorkQueue {
    inner: Mutex<(VecDeque<String>, HashSet<String>)>,
    wake: Notify,
}

impl WorkQueue {
    fn push(&self, key: String) {
        let mut g = lock(&self.inner);
        if g.1.insert(key.clone()) {
            g.0.push_back(key);
        }
        drop(g);
        self.wake.notify_one();
    }
    fn pop(&self) -> Option<String> {
        let mut g = lock(&self.inner);
        let k = g.0.pop_front()?;
        g.1.remove(&k);
        Some(k)
    }
    async fn next(&self) -> String {
        loop {
            let notified = self.wake.notified();
            if let Some(k) = self.pop() {
                return k;
            }
            notified.await;
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// Edge nodes of this cloudcore (they hold streams in its log).
    nodes: BTreeSet<String>,
    /// Nodes this replica just took over from another: what its registry
    /// holds of their Node's status may be older than what the cluster
    /// has, so it is not written until the node has re-asserted its own
    /// (or, if it has nothing to re-assert, for `TAKEOVER_QUIET`).
    taken_over: BTreeMap<String, (std::time::Instant, bool)>,
    /// Nodes with a live connection.
    connected: BTreeSet<String>,
    /// The cluster's current objects of every watched kind, by registry
    /// key (normalised: no resourceVersion, no managedFields).
    cache: BTreeMap<String, Value>,
    /// Node statuses last written to the cluster.
    node_status: BTreeMap<String, Value>,
    /// The edge's own addresses last written to its Node's annotation.
    edge_addresses: BTreeMap<String, Value>,
    /// Per node, the highest seq of its `down` stream it holds durably
    /// (its acks, and the cursor of its Hello).
    acked_down: BTreeMap<String, u64>,
    /// Pods deleted on the cluster that wait for their node to hold the
    /// tombstone: key → (node, `down` seq it must hold).
    deleting: BTreeMap<String, (String, u64)>,
    /// Status writes skipped because this replica did not write its node's
    /// status at that moment though the node was connected to it (a shard
    /// lease renewed late, a takeover's quiet time): key → node. Written
    /// once it does (the lease loop looks), dropped if the node leaves.
    deferred_status: BTreeMap<String, String>,
}

/// cloudcore's side of an attached cluster.
pub struct Attached {
    client: kube::Client,
    server: String,
    registry: Arc<Registry>,
    cfg: KubernetesConfig,
    state: Mutex<State>,
    /// Keys whose mirror may differ from the cluster.
    mirror_q: WorkQueue,
    /// Keys whose status the cluster may not have yet.
    status_q: WorkQueue,
    /// Nodes whose connection changed, or whose Node needs writing.
    node_q: WorkQueue,
    /// Whether the Device CRD has a `status` subresource.
    device_status_subresource: std::sync::atomic::AtomicBool,
    /// The CA certificates (DER) of the kubeconfig's cluster.
    cluster_ca: Vec<Vec<u8>>,
    /// Where the API server reaches the kubelet API of every edge node
    /// (cloudcore's stream server), once it listens.
    stream_endpoint: std::sync::OnceLock<SocketAddr>,
    /// The stream server, while it runs.
    streams_server: Mutex<Option<keel_api::kubelet::KubeletServer>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// This replica's share of the nodes, when it is one of several.
    shards: std::sync::OnceLock<Arc<shards::Shards>>,
}

impl std::fmt::Debug for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attached")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// Origin of a change the cluster made: `k8s:<field manager>` of its
/// latest managed-fields entry (who wrote it: kubectl, a controller), or
/// `k8s:unknown`.
fn origin_of(obj: &Value) -> String {
    let manager = obj
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .and_then(|mf| {
            mf.iter()
                .filter_map(|e| Some((e.get("time")?.as_str()?, e.get("manager")?.as_str()?)))
                .max_by(|a, b| a.0.cmp(b.0))
                .map(|(_, m)| m.to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    format!("k8s:{manager}")
}

fn str_at<'a>(v: &'a Value, ptr: &str) -> Option<&'a str> {
    v.pointer(ptr)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

impl Attached {
    /// Connects to the cluster of `cfg.kubeconfig` and checks that cloudcore
    /// may use it; fails naming the server when it cannot.
    pub async fn connect(
        cfg: KubernetesConfig,
        registry: Arc<Registry>,
    ) -> Result<Arc<Attached>, AttachError> {
        let (client, server, cluster_ca) = client_for(&cfg).await?;
        // /version answers anyone; listing nodes proves the credentials.
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
        nodes
            .list(&ListParams::default().limit(1))
            .await
            .map_err(|e| classify(&server, "listing nodes", &e))?;
        let state = State {
            nodes: registry.nodes().into_iter().collect(),
            ..State::default()
        };
        Ok(Arc::new(Attached {
            client,
            server,
            registry,
            cfg,
            state: Mutex::new(state),
            mirror_q: WorkQueue::default(),
            status_q: WorkQueue::default(),
            node_q: WorkQueue::default(),
            device_status_subresource: std::sync::atomic::AtomicBool::new(true),
            cluster_ca,
            stream_endpoint: std::sync::OnceLock::new(),
            streams_server: Mutex::new(None),
            tasks: Mutex::new(Vec::new()),
            shards: std::sync::OnceLock::new(),
        }))
    }

    /// When this cloudcore is one of several replicas (`kubernetes.replica`):
    /// its share of the nodes. The hub routes connections by it;
    /// `start_shards` keeps it.
    pub fn shards(&self) -> Option<Arc<shards::Shards>> {
        let cfg = self.cfg.replica.clone()?;
        Some(
            self.shards
                .get_or_init(|| shards::Shards::new(cfg, self.client.clone()))
                .clone(),
        )
    }

    /// Keeps this replica's share of the nodes (see `shards`), closing
    /// through `hub` the connections of nodes it no longer owns.
    pub fn start_shards(&self, hub: crate::hub::HubHandle) {
        if let Some(s) = self.shards.get() {
            let s = s.clone();
            let id = s.id().to_owned();
            lock(&self.tasks).push(tokio::spawn(
                s.run(hub).instrument(info_span!("shards", replica = %id)),
            ));
        }
    }

    /// Whether this replica writes the status of `node`'s pods and devices
    /// now: always when it is the only one; when it is one of several,
    /// only while it owns the node, the node is connected to it, and it
    /// was not just taken over (its copy may be older than the cluster's until
    /// the node re-asserts its own).
    fn writes_status_of(&self, node: &str) -> bool {
        if self.shards.get().is_none() {
            return true;
        }
        if !self.owns(node) {
            return false;
        }
        let st = lock(&self.state);
        st.connected.contains(node)
            && st
                .taken_over
                .get(node)
                .is_none_or(|(t, _)| t.elapsed() >= TAKEOVER_QUIET)
    }

    /// Remembers that `key`'s status was not written because this replica
    /// did not write `node`'s status just then: if the node is connected
    /// here, the write is tried again once it does (nothing else would
    /// queue it again if the node reports nothing new).
    fn defer_status(&self, node: &str, key: &str) {
        let mut st = lock(&self.state);
        if st.connected.contains(node) {
            debug!(%node, %key, "status write deferred: this replica does not write the node's status now");
            st.deferred_status.insert(key.to_owned(), node.to_owned());
        }
    }

    /// Queues the deferred status writes whose node's status this replica
    /// writes now; forgets those whose node is no longer connected here.
    fn retry_deferred_status(&self) {
        let deferred = std::mem::take(&mut lock(&self.state).deferred_status);
        let mut keep = BTreeMap::new();
        for (key, node) in deferred {
            if self.writes_status_of(&node) {
                self.status_q.push(key);
            } else if lock(&self.state).connected.contains(&node) {
                keep.insert(key, node);
            }
        }
        lock(&self.state).deferred_status.extend(keep);
    }

    /// Whether this replica owns `node` (always, unless it is one of
    /// several): only the owner writes a node's status and its objects'.
    fn owns(&self, node: &str) -> bool {
        use crate::hub::Router as _;
        self.shards
            .get()
            .is_none_or(|s| matches!(s.route(node), crate::hub::Route::Here { .. }))
    }

    /// The API server's URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Installs what cloudcore needs in the cluster (the device CRDs if
    /// absent, the admission webhook) and starts the watches, the
    /// mirror, the status write-back and the node lifecycle.
    pub async fn start(
        self: &Arc<Self>,
        ca: &ClusterCa,
        server_cert: &crate::pki::Credentials,
        streams: keel_api::server::PodStreams,
    ) -> Result<Option<SocketAddr>, AttachError> {
        kinds::install_crds(self).await?;
        let endpoint = streams::start(self, server_cert, streams).await?;
        let _ = self.stream_endpoint.set(endpoint);
        let webhook_addr = match self.cfg.autonomy {
            Autonomy::Webhook => Some(webhook::start(self, ca, server_cert).await?),
            Autonomy::None => None,
        };
        let mut tasks = Vec::new();
        for kind in KINDS {
            let me = self.clone();
            tasks.push(tokio::spawn(
                async move { me.watch(kind).await }
                    .instrument(info_span!("watch", kind = kind.plural)),
            ));
        }
        let me = self.clone();
        tasks.push(tokio::spawn(
            async move { me.mirror_loop().await }.instrument(info_span!("mirror")),
        ));
        let me = self.clone();
        tasks.push(tokio::spawn(
            async move { me.status_loop().await }.instrument(info_span!("writeback")),
        ));
        let me = self.clone();
        tasks.push(tokio::spawn(
            async move { me.node_loop().await }.instrument(info_span!("nodes")),
        ));
        let me = self.clone();
        tasks.push(tokio::spawn(
            async move { me.lease_loop().await }.instrument(info_span!("leases")),
        ));
        let me = self.clone();
        tasks.push(tokio::spawn(
            async move { me.watch_nodes().await }.instrument(info_span!("watch", kind = "nodes")),
        ));
        lock(&self.tasks).extend(tasks);
        Ok(webhook_addr)
    }

    /// A replica that stops gives its shards back (see
    /// `Shards::release_all`), within a few seconds.
    pub async fn release_shards(&self) {
        if let Some(s) = self.shards.get() {
            let _ = tokio::time::timeout(Duration::from_secs(5), s.release_all()).await;
        }
    }

    /// Stops every task.
    pub fn shutdown(&self) {
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
        lock(&self.streams_server).take();
    }

    /// Whether `node` is one of this cloudcore's edge nodes.
    fn is_edge_node(&self, node: &str) -> bool {
        lock(&self.state).nodes.contains(node)
    }

    /// Watches one kind for ever: caches the cluster's objects and queues
    /// each changed key for the mirror; on every (re)list, keys that
    /// disappeared are queued too.
    async fn watch(self: Arc<Self>, kind: &'static Kind) {
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &kind.api_resource());
        let mut cfg = watcher::Config::default();
        if let Some(f) = kind.field_selector {
            cfg = cfg.fields(f);
        }
        let mut listed: Option<BTreeSet<String>> = None;
        let mut stream = watcher(api, cfg).default_backoff().boxed();
        while let Some(ev) = stream.next().await {
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => {
                    warn!(server = %self.server, error = %e, "watch failed; retrying");
                    continue;
                }
            };
            match ev {
                watcher::Event::Init => listed = Some(BTreeSet::new()),
                watcher::Event::InitApply(obj) => {
                    if let Some(key) = self.cache_put(kind, obj)
                        && let Some(l) = listed.as_mut()
                    {
                        l.insert(key);
                    }
                }
                watcher::Event::InitDone => {
                    let listed = listed.take().unwrap_or_default();
                    let gone: Vec<String> = {
                        let mut st = lock(&self.state);
                        let gone: Vec<String> = st
                            .cache
                            .range(kind.prefix().to_owned()..)
                            .take_while(|(k, _)| k.starts_with(kind.prefix()))
                            .filter(|(k, _)| !listed.contains(*k))
                            .map(|(k, _)| k.clone())
                            .collect();
                        for k in &gone {
                            st.cache.remove(k);
                        }
                        gone
                    };
                    // The mirror may hold objects deleted while nobody
                    // watched (cloudcore down, or a 410 gap).
                    let mut stale = gone;
                    self.registry.scan(kind.prefix(), |o| {
                        if let Some(k) = kind.key_of(o)
                            && !listed.contains(&k)
                        {
                            stale.push(k);
                        }
                    });
                    for k in listed.into_iter().chain(stale) {
                        self.mirror_q.push(k);
                    }
                    // (Each listed key's status is compared again when the
                    // mirror takes it: what nodes reported while nobody
                    // was patching reaches the cluster.)
                    info!(kind = kind.plural, "listed");
                }
                watcher::Event::Apply(obj) => {
                    if let Some(key) = self.cache_put(kind, obj) {
                        self.mirror_q.push(key);
                    }
                }
                watcher::Event::Delete(obj) => {
                    if let Some(key) = kind.key_of(&dynamic_json(kind, obj)) {
                        lock(&self.state).cache.remove(&key);
                        self.mirror_q.push(key);
                    }
                }
            }
        }
    }

    /// Caches one object from the cluster; its key.
    fn cache_put(&self, kind: &'static Kind, obj: DynamicObject) -> Option<String> {
        let mut v = dynamic_json(kind, obj);
        // Kept only for the origin of a change; the rest is never needed.
        if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut)
            && let Some(mf) = m.get_mut("managedFields").and_then(Value::as_array_mut)
        {
            let latest = mf
                .iter()
                .filter(|e| e.get("time").is_some())
                .max_by(|a, b| {
                    a.get("time")
                        .and_then(Value::as_str)
                        .cmp(&b.get("time").and_then(Value::as_str))
                })
                .map(|e| json!({"manager": e.get("manager"), "time": e.get("time")}));
            *mf = latest.into_iter().collect();
        }
        let key = kind.key_of(&v)?;
        lock(&self.state).cache.insert(key.clone(), v);
        Some(key)
    }

    /// Brings the mirror in line with the cluster, one key at a time.
    async fn mirror_loop(self: Arc<Self>) {
        loop {
            let key = self.mirror_q.next().await;
            if let Err(e) = self.sync_key(&key, false).await {
                warn!(%key, error = %e, "could not mirror an object; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                self.mirror_q.push(key);
            }
        }
    }

    /// Mirrors one key: written if bound to an edge node (the objects it
    /// uses first), deleted from the mirror otherwise. `adopt`: the
    /// cluster's status replaces the mirror's too (a node taken over from
    /// another replica: what this one kept is older than what that one
    /// wrote to the cluster).
    async fn sync_key(&self, key: &str, adopt: bool) -> Result<(), String> {
        let Some(kind) = Kind::of_key(key) else {
            return Ok(());
        };
        let kube = lock(&self.state).cache.get(key).cloned();
        let want = match (&kube, kind.node_bound) {
            (Some(obj), true) => {
                let bound = str_at(obj, "/spec/nodeName").is_some_and(|n| self.is_edge_node(n));
                let deleting = obj.pointer("/metadata/deletionTimestamp").is_some();
                if bound && deleting {
                    self.finish_delete(kind, key, obj).await?;
                    return Ok(());
                }
                bound
            }
            (Some(obj), false) => self.referenced(kind, obj),
            (None, _) => false,
        };
        if !want {
            self.unmirror(key, "k8s:cloudcore").await?;
            return Ok(());
        }
        let Some(obj) = kube else {
            return Ok(());
        };
        if kind.node_bound {
            // The objects a pod or device uses reach the node before it.
            let ns = str_at(&obj, "/metadata/namespace").unwrap_or("default");
            for (k, name) in refs_of(kind, &obj) {
                let rk = format!("{k}/{ns}/{name}");
                let cached = lock(&self.state).cache.get(&rk).cloned();
                if let Some(r) = cached {
                    self.put(&rk, &r, false).await?;
                }
            }
        }
        // A new object under an old name (a pod deleted and made again, a
        // device recreated): the old one leaves the mirror, and its nodes,
        // first.
        if self
            .registry
            .get(key)
            .is_some_and(|cur| cur.pointer("/metadata/uid") != obj.pointer("/metadata/uid"))
        {
            self.unmirror(key, &origin_of(&obj)).await?;
        }
        self.put(key, &obj, kind.edge_status && !adopt).await?;
        if kind.edge_status {
            // The cluster may have changed a status the edge owns (the
            // node lifecycle controller marks pods not ready): compare.
            self.status_q.push(key.to_owned());
        }
        if kind.plural == "pods" && self.cfg.autonomy == Autonomy::Webhook {
            self.tolerate_outages(kind, key, &obj).await?;
        }
        Ok(())
    }

    /// The webhook's backstop: a pod bound to an edge node that was
    /// admitted without unlimited unreachable / not-ready tolerations
    /// (created while cloudcore was down, or before it was attached) gets
    /// them now. Kubernetes lets a pod's toleration lose its time limit.
    async fn tolerate_outages(
        &self,
        kind: &'static Kind,
        key: &str,
        pod: &Value,
    ) -> Result<(), String> {
        let Some(patch) = webhook::toleration_patch(pod) else {
            return Ok(());
        };
        let (Some(ns), Some(name)) = (
            str_at(pod, "/metadata/namespace"),
            str_at(pod, "/metadata/name"),
        ) else {
            return Ok(());
        };
        let Some(tolerations) = patch.pointer("/0/value") else {
            return Ok(());
        };
        let body = json!({"metadata": {"uid": pod.pointer("/metadata/uid")},
            "spec": {"tolerations": tolerations}});
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), ns, &kind.api_resource());
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(&body))
            .await
        {
            Ok(_) => {
                info!(%key, "unlimited outage tolerations added to a pod on an edge node");
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
            Err(kube::Error::Api(s)) if (400..500).contains(&s.code) => {
                warn!(%key, reason = %s.reason, message = %s.message,
                    "the API server refused outage tolerations for a pod");
                Ok(())
            }
            Err(e) => Err(format!("adding tolerations to {key}: {e}")),
        }
    }

    /// Deletes `key` from the mirror (its nodes get the tombstone); the
    /// ConfigMaps, Secrets or DeviceModels it used are looked at again, so
    /// that one no mirrored object uses any more leaves too.
    async fn unmirror(&self, key: &str, origin: &str) -> Result<(), String> {
        let Some(cur) = self.registry.get(key) else {
            return Ok(());
        };
        self.registry
            .write_as(origin, key, |_| Ok(Some(Write::Delete)))
            .await
            .map_err(|e| e.message)?;
        debug!(%key, "removed from the mirror");
        if let Some(kind) = Kind::of_key(key) {
            let ns = str_at(&cur, "/metadata/namespace").unwrap_or("default");
            for (k, name) in refs_of(kind, &cur) {
                self.mirror_q.push(format!("{k}/{ns}/{name}"));
            }
        }
        Ok(())
    }

    /// Writes the cluster's `obj` into the mirror at `key`; where the edge
    /// owns `status`, the mirror's status stays.
    async fn put(&self, key: &str, obj: &Value, keep_status: bool) -> Result<(), String> {
        let origin = origin_of(obj);
        let mut new = obj.clone();
        if let Some(m) = new.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("managedFields");
        }
        self.registry
            .write_as(&origin, key, move |cur| {
                if keep_status
                    && let Some(cur) = cur
                    && cur.pointer("/metadata/uid") == new.pointer("/metadata/uid")
                    && let Some(o) = new.as_object_mut()
                {
                    match cur.get("status") {
                        Some(st) => {
                            o.insert("status".into(), st.clone());
                        }
                        None => {
                            o.remove("status");
                        }
                    }
                }
                Ok(Some(Write::Put(new)))
            })
            .await
            .map(|_| ())
            .map_err(|e| e.message)
    }

    /// Whether a mirrored pod (or device) uses `obj` (a ConfigMap, Secret
    /// or DeviceModel).
    fn referenced(&self, kind: &'static Kind, obj: &Value) -> bool {
        let Some(name) = str_at(obj, "/metadata/name") else {
            return false;
        };
        let ns = str_at(obj, "/metadata/namespace").unwrap_or("default");
        let Some(user) = kind.used_by else {
            return false;
        };
        let prefix = format!("{}{ns}/", user.prefix());
        let mut used = false;
        self.registry.scan(&prefix, |o| {
            used = used
                || refs_of(user, o)
                    .iter()
                    .any(|(k, n)| *k == kind.qualified() && n == name);
        });
        used
    }

    /// A pod being deleted on the cluster: deleted from the mirror (the
    /// node stops it), then, once that is durable, deleted on the cluster
    /// for good (the kubelet's last step).
    async fn finish_delete(
        &self,
        kind: &'static Kind,
        key: &str,
        obj: &Value,
    ) -> Result<(), String> {
        self.unmirror(key, &origin_of(obj)).await?;
        // Like a kubelet, the final delete waits until the node has the
        // stop: its `down` stream, held durably up to the tombstone.
        let Some(node) = str_at(obj, "/spec/nodeName") else {
            return Ok(());
        };
        let need = lock(&self.state).deleting.get(key).map(|(_, seq)| *seq);
        let need = match need {
            Some(seq) => seq,
            None => {
                let seq = self
                    .registry
                    .store()
                    .info(&keel_sync::link::down_stream(node))
                    .map(|i| i.head.seq)
                    .unwrap_or(0);
                lock(&self.state)
                    .deleting
                    .insert(key.to_owned(), (node.to_owned(), seq));
                seq
            }
        };
        let held = lock(&self.state).acked_down.get(node).copied().unwrap_or(0);
        if held < need {
            debug!(%key, %node, need, held, "the final delete waits for the node to hold the stop");
            return Ok(());
        }
        let (Some(ns), Some(name), Some(uid)) = (
            str_at(obj, "/metadata/namespace"),
            str_at(obj, "/metadata/name"),
            str_at(obj, "/metadata/uid"),
        ) else {
            return Ok(());
        };
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), ns, &kind.api_resource());
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(kube::api::Preconditions {
                uid: Some(uid.to_owned()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let r = match api.delete(name, &dp).await {
            Ok(_) => {
                info!(%key, %node, "deleted on the cluster: its node holds the stop");
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
            Err(e) => Err(format!("deleting {key} on the cluster: {e}")),
        };
        if r.is_ok() {
            lock(&self.state).deleting.remove(key);
        }
        r
    }

    /// Node lifecycle on the cluster: Node created on first connect,
    /// Ready condition, reported status.
    async fn node_loop(self: Arc<Self>) {
        loop {
            let node = self.node_q.next().await;
            if let Err(e) = self.sync_node(&node).await {
                warn!(%node, server = %self.server, error = %e, "could not write the Node; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                self.node_q.push(node);
            }
        }
    }

    async fn sync_node(&self, node: &str) -> Result<(), String> {
        use k8s_openapi::api::core::v1::Node;
        let api: Api<Node> = Api::all(self.client.clone());
        let (connected, taken_over) = {
            let st = lock(&self.state);
            let quiet = st
                .taken_over
                .get(node)
                .map(|(t, _)| t.elapsed() < TAKEOVER_QUIET);
            (st.connected.contains(node), quiet)
        };
        if !connected && !self.owns(node) {
            // Another replica's node now: its owner writes it.
            debug!(%node, "not this replica's node; its status left to its owner");
            return Ok(());
        }
        if taken_over == Some(true) {
            debug!(%node, "a node just taken over: its status waits for the node's own");
            return Ok(());
        }
        // Taken over and quiet for a while: the conditions only; what the
        // node reports waits for its first report to this replica (what
        // this one holds may be from an older ownership).
        let reported = if taken_over.is_some() {
            Value::Null
        } else {
            self.registry
                .get_latest(&format!("nodes/{node}"))
                .and_then(|n| n.get("status").cloned())
                .unwrap_or(Value::Null)
        };
        let mut status = serde_json::Map::new();
        for f in [
            "capacity",
            "allocatable",
            "addresses",
            "nodeInfo",
            "daemonEndpoints",
        ] {
            if let Some(v) = reported.get(f) {
                status.insert(f.into(), v.clone());
            }
        }
        if let Some(endpoint) = self.stream_endpoint.get() {
            // The API server reaches the node's kubelet API at cloudcore
            // (the list replaced whole: an address of the edge there would
            // be dialled instead).
            status.insert(
                "addresses".into(),
                json!([{"$patch": "replace"},
                    {"type": "InternalIP", "address": endpoint.ip().to_string()}]),
            );
            status.insert(
                "daemonEndpoints".into(),
                json!({"kubeletEndpoint": {"Port": endpoint.port()}}),
            );
        }
        let now = now_rfc3339();
        let (st, reason, message) = ready_condition(connected);
        let previous = lock(&self.state).node_status.get(node).cloned();
        let transition = previous
            .as_ref()
            .filter(|p| p.pointer("/ready") == Some(&json!(st)))
            .and_then(|p| p.get("since").cloned())
            .unwrap_or_else(|| json!(now));
        status.insert(
            "conditions".into(),
            json!([{"type": "Ready", "status": st, "reason": reason, "message": message,
                "lastHeartbeatTime": now, "lastTransitionTime": transition}]),
        );
        let body = json!({"status": Value::Object(status)});
        let pp = PatchParams::default();
        let written = match api.patch_status(node, &pp, &Patch::Strategic(&body)).await {
            Err(kube::Error::Api(s)) if s.code == 404 => {
                // First connect: the Node is made, then given its status.
                self.create_node(&api, node).await?;
                api.patch_status(node, &pp, &Patch::Strategic(&body)).await
            }
            other => other,
        };
        written.map_err(|e| format!("writing the status of Node {node}: {e}"))?;
        if self.stream_endpoint.get().is_some()
            && let Some(own) = reported.get("addresses")
            && lock(&self.state).edge_addresses.get(node) != Some(own)
        {
            // The edge's own addresses, which `status.addresses` cannot
            // hold here: for people and tools that want them.
            let body = json!({"metadata": {"annotations": {EDGE_ADDRESSES: own.to_string()}}});
            api.patch(node, &PatchParams::default(), &Patch::Merge(&body))
                .await
                .map_err(|e| format!("writing the addresses of Node {node}: {e}"))?;
            lock(&self.state)
                .edge_addresses
                .insert(node.to_owned(), own.clone());
        }
        lock(&self.state)
            .node_status
            .insert(node.to_owned(), json!({"ready": st, "since": transition}));
        if connected {
            self.renew_lease(node).await?;
        }
        debug!(%node, ready = st, "node status written to the cluster");
        Ok(())
    }

    /// Creates the Node of edge node `node` on the cluster (labels, the
    /// configured taints).
    async fn create_node(
        &self,
        api: &Api<k8s_openapi::api::core::v1::Node>,
        node: &str,
    ) -> Result<(), String> {
        let spec = if self.cfg.node_taints.is_empty() {
            json!({})
        } else {
            json!({"taints": self.cfg.node_taints})
        };
        let obj: k8s_openapi::api::core::v1::Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node, "labels": {
                "kubernetes.io/hostname": node,
                "kubernetes.io/os": "linux",
                "node-role.kubernetes.io/edge": "",
                "node.keel.io/managed-by": "cloudcore"}},
            "spec": spec,
        }))
        .map_err(|e| format!("node object: {e}"))?;
        match api.create(&PostParams::default(), &obj).await {
            Ok(_) => {
                info!(%node, "created the Node on the cluster");
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(format!("creating Node {node}: {e}")),
        }
    }

    /// Renews (or creates) `node`'s Lease in `kube-node-lease`.
    async fn renew_lease(&self, node: &str) -> Result<(), String> {
        use k8s_openapi::api::coordination::v1::Lease;
        let api: Api<Lease> = Api::namespaced(self.client.clone(), "kube-node-lease");
        let now = now_rfc3339_micro();
        let duration = self.lease_duration();
        let patch = json!({"spec": {"holderIdentity": node, "renewTime": now,
            "leaseDurationSeconds": duration}});
        match api
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => {
                let lease: Lease = serde_json::from_value(json!({
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": node, "namespace": "kube-node-lease"},
                    "spec": {"holderIdentity": node, "leaseDurationSeconds": duration,
                        "acquireTime": now, "renewTime": now}}))
                .map_err(|e| format!("lease object: {e}"))?;
                match api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
                    Err(e) => Err(format!("creating the Lease of {node}: {e}")),
                }
            }
            Err(e) => Err(format!("renewing the Lease of {node}: {e}")),
        }
    }

    /// Watches cloudcore's Nodes on the cluster: one whose Ready condition
    /// is not `True` while its node is connected is written again (the
    /// cluster's node lifecycle controller sets it `Unknown` when a Lease
    /// lapses, and only the node's agent sets it back, as a kubelet does).
    async fn watch_nodes(self: Arc<Self>) {
        use k8s_openapi::api::core::v1::Node;
        let api: Api<Node> = Api::all(self.client.clone());
        let cfg = watcher::Config::default().labels(&format!("{MANAGED_BY}=cloudcore"));
        let mut stream = watcher(api, cfg).default_backoff().boxed();
        while let Some(ev) = stream.next().await {
            let node = match ev {
                Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n)) => n,
                Ok(_) => continue,
                Err(e) => {
                    warn!(server = %self.server, error = %e, "node watch failed; retrying");
                    continue;
                }
            };
            let Some(name) = node.metadata.name.as_deref() else {
                continue;
            };
            let ready = node
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
                .is_some_and(|c| c.status == "True");
            if !ready && lock(&self.state).connected.contains(name) {
                debug!(node = %name, "the cluster sees a connected node as not ready; writing it again");
                self.node_q.push(name.to_owned());
            }
        }
    }

    /// A Lease's duration: four renewals (40 s at the default 10 s, as a
    /// kubelet's).
    fn lease_duration(&self) -> u64 {
        self.cfg.lease_renew_seconds.max(1).saturating_mul(4)
    }

    /// Renews every connected node's Lease.
    async fn lease_loop(self: Arc<Self>) {
        let mut tick =
            tokio::time::interval(Duration::from_secs(self.cfg.lease_renew_seconds.max(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let nodes: Vec<String> = lock(&self.state).connected.iter().cloned().collect();
            // Nodes taken over whose quiet time is over: written now (once).
            let quiet: Vec<String> = {
                let mut st = lock(&self.state);
                st.taken_over
                    .iter_mut()
                    .filter(|(_, (t, pushed))| !*pushed && t.elapsed() >= TAKEOVER_QUIET)
                    .map(|(n, (_, pushed))| {
                        *pushed = true;
                        n.clone()
                    })
                    .collect()
            };
            for node in quiet {
                self.node_q.push(node);
            }
            self.retry_deferred_status();
            for node in nodes {
                if let Err(e) = self.renew_lease(&node).await {
                    warn!(%node, server = %self.server, error = %e, "lease renewal failed");
                }
            }
        }
    }
}

/// The cluster's object as JSON, normalised: `apiVersion`/`kind` set (list
/// items lack them), `resourceVersion` dropped (the mirror has its own).
fn dynamic_json(kind: &Kind, obj: DynamicObject) -> Value {
    let mut v = serde_json::to_value(obj).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.insert("apiVersion".into(), json!(kind.api_version()));
        o.insert("kind".into(), json!(kind.kind));
    }
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
        m.remove("selfLink");
    }
    v
}

/// Objects a pod or device uses: (qualified resource, name).
fn refs_of(kind: &Kind, obj: &Value) -> Vec<(&'static str, String)> {
    match kind.plural {
        "pods" => pod_refs(obj),
        "devices" => str_at(obj, "/spec/deviceModelRef/name")
            .map(|m| vec![("devicemodels.devices.kubeedge.io", m.to_owned())])
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// A failed request, as an error naming the server.
/// A client of the cluster of `cfg.kubeconfig`, once its API server
/// answered: (client, server URL, the cluster's CA certificates).
pub(crate) async fn client_for(
    cfg: &KubernetesConfig,
) -> Result<(kube::Client, String, Vec<Vec<u8>>), AttachError> {
    let path = cfg.kubeconfig.display().to_string();
    let kc = kube::config::Kubeconfig::read_from(&cfg.kubeconfig).map_err(|e| {
        AttachError::Kubeconfig {
            path: path.clone(),
            message: e.to_string(),
        }
    })?;
    let mut config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(|e| AttachError::Kubeconfig {
            path: path.clone(),
            message: e.to_string(),
        })?;
    config.connect_timeout = Some(Duration::from_secs(5));
    let cluster_ca = config.root_cert.clone().unwrap_or_default();
    let server = config.cluster_url.to_string();
    let client = kube::Client::try_from(config).map_err(|e| AttachError::Kubeconfig {
        path,
        message: e.to_string(),
    })?;
    match tokio::time::timeout(Duration::from_secs(15), client.apiserver_version()).await {
        Ok(Ok(v)) => {
            info!(%server, version = %v.git_version, "attached to a Kubernetes cluster")
        }
        Ok(Err(e)) => {
            return Err(classify(&server, "version", &e));
        }
        Err(_) => {
            return Err(AttachError::Unreachable {
                server,
                message: "no answer within 15 s".into(),
            });
        }
    }
    Ok((client, server, cluster_ca))
}

fn classify(server: &str, what: &str, e: &kube::Error) -> AttachError {
    match e {
        kube::Error::Api(s) if s.code == 401 || s.code == 403 => AttachError::Unauthorized {
            server: server.to_owned(),
            message: format!("{what}: {}", s.message),
        },
        kube::Error::Api(s) => AttachError::Setup {
            server: server.to_owned(),
            what: what.to_owned(),
            message: s.message.clone(),
        },
        other => AttachError::Unreachable {
            server: server.to_owned(),
            message: format!("{what}: {other}"),
        },
    }
}

impl crate::hub::Router for Attached {
    fn route(&self, node: &str) -> crate::hub::Route {
        match self.shards.get() {
            Some(s) => s.route(node),
            None => crate::hub::Route::Here { epoch: 1 },
        }
    }

    /// Mirrors everything the cluster binds to `node` before its link
    /// starts, so that the snapshot a node taken over installs is whole
    /// (an object missing from it would be stopped there); on a takeover
    /// with the cluster's status, which the node then corrects with its
    /// own (`MetaManager`'s re-assertion).
    fn prepare<'a>(
        &'a self,
        node: &'a str,
        takeover: bool,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let keys: Vec<String> = {
                let mut st = lock(&self.state);
                st.nodes.insert(node.to_owned());
                st.cache
                    .iter()
                    .filter(|(_, v)| str_at(v, "/spec/nodeName") == Some(node))
                    .map(|(k, _)| k.clone())
                    .collect()
            };
            for key in &keys {
                if let Err(e) = self.sync_key(key, takeover).await {
                    warn!(%node, %key, error = %e, "could not mirror an object of a node taken over");
                }
            }
            if takeover {
                // Its Node object too, which a replica that never had the
                // node makes only as it connects: otherwise the snapshot
                // lacks it and what the node re-asserts has nowhere to go.
                self.registry.node_ready(node, true);
                // What the node wrote on this replica's documents earlier
                // (an ownership ago) must not apply any more: only what it
                // writes on the new epoch's, its re-assertion first.
                let mut own: Vec<String> = keys
                    .iter()
                    .filter(|k| {
                        k.starts_with("pods/")
                            || k.starts_with(crate::api::registry::DEVICES_PREFIX)
                    })
                    .cloned()
                    .collect();
                own.push(format!("nodes/{node}"));
                let rebased = self.registry.rebase_keys(own);
                info!(%node, objects = keys.len(), rebased, "node taken over from another replica");
                // A node whose status this replica already held as it is
                // re-asserts nothing: its status is written after a while
                // (by the lease loop).
                lock(&self.state)
                    .taken_over
                    .insert(node.to_owned(), (std::time::Instant::now(), false));
            }
        })
    }
}

impl ControlPlane for Attached {
    fn registry(&self) -> &Registry {
        &self.registry
    }
    fn node_connected(&self, node: &str) {
        self.registry.node_ready(node, true);
        let new = {
            let mut st = lock(&self.state);
            st.connected.insert(node.to_owned());
            st.nodes.insert(node.to_owned())
        };
        if new {
            // A node seen for the first time: what the cluster already
            // bound to it is now for the mirror.
            let keys: Vec<String> = lock(&self.state)
                .cache
                .iter()
                .filter(|(_, v)| str_at(v, "/spec/nodeName") == Some(node))
                .map(|(k, _)| k.clone())
                .collect();
            for k in keys {
                self.mirror_q.push(k);
            }
        }
        self.node_q.push(node.to_owned());
    }

    fn node_disconnected(&self, node: &str) {
        self.registry.node_ready(node, false);
        lock(&self.state).connected.remove(node);
        self.node_q.push(node.to_owned());
    }

    fn node_acked(&self, node: &str, stream: &str, seq: u64) {
        if stream != keel_sync::link::down_stream(node) {
            return;
        }
        let ready: Vec<String> = {
            let mut st = lock(&self.state);
            let held = st.acked_down.entry(node.to_owned()).or_default();
            *held = (*held).max(seq);
            st.deleting
                .iter()
                .filter(|(_, (n, need))| n == node && *need <= seq)
                .map(|(k, _)| k.clone())
                .collect()
        };
        for key in ready {
            self.mirror_q.push(key);
        }
    }

    fn node_reported(&self, node: &str, records: &[Record]) {
        let changed = self.registry.apply_from_node(node, records);
        if !changed.is_empty() && lock(&self.state).taken_over.remove(node).is_some() {
            info!(%node, objects = changed.len(), "a node taken over re-asserted its status");
            // The node's own status (its re-assertion after a takeover
            // comes in one append): from now on what this replica holds,
            // and its Node is written (a write skipped while it was quiet,
            // such as Ready again, is not lost).
            self.node_q.push(node.to_owned());
        }
        for key in changed {
            if key.starts_with("nodes/") {
                self.node_q.push(node.to_owned());
            } else {
                self.status_q.push(key);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn origin_names_the_latest_field_manager() {
        let obj = json!({"metadata": {"managedFields": [
            {"manager": "kubectl-client-side-apply", "time": "2026-01-01T00:00:00Z"},
            {"manager": "kube-controller-manager", "time": "2026-01-02T00:00:00Z"}]}});
        assert_eq!(origin_of(&obj), "k8s:kube-controller-manager");
        assert_eq!(origin_of(&json!({"metadata": {}})), "k8s:unknown");
    }

    #[test]
    fn cluster_objects_normalised_and_keyed_like_the_registry() {
        let kind = Kind::of_key("pods/default/x").unwrap();
        let obj: DynamicObject = serde_json::from_value(json!({
            "metadata": {"name": "x", "namespace": "ns", "resourceVersion": "42", "uid": "u"},
            "spec": {"nodeName": "edge-1", "volumes": [{"name": "t", "projected": {"sources": [
                {"configMap": {"name": "kube-root-ca.crt"}}, {"serviceAccountToken": {"path": "token"}}]}}]}}))
        .unwrap();
        let v = dynamic_json(kind, obj);
        assert_eq!(v["apiVersion"], "v1");
        assert_eq!(v["kind"], "Pod");
        assert!(v["metadata"].get("resourceVersion").is_none());
        assert_eq!(kind.key_of(&v).as_deref(), Some("pods/ns/x"));
        assert_eq!(
            refs_of(kind, &v),
            vec![("configmaps", "kube-root-ca.crt".to_owned())]
        );
        let dev = Kind::of_key("devices.devices.kubeedge.io/ns/d").unwrap();
        assert_eq!(dev.api_version(), "devices.kubeedge.io/v1beta1");
        assert_eq!(
            refs_of(dev, &json!({"spec": {"deviceModelRef": {"name": "m"}}})),
            vec![("devicemodels.devices.kubeedge.io", "m".to_owned())]
        );
        assert_eq!(
            dev.used_by.map(Kind::qualified),
            None,
            "devices are bound by nodeName, not used by another kind"
        );
        assert_eq!(
            Kind::of_key("devicemodels.devices.kubeedge.io/ns/m")
                .and_then(|k| k.used_by)
                .map(Kind::qualified),
            Some("devices.devices.kubeedge.io")
        );
    }
}
