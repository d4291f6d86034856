//! edgecore assembled: node identity (join or load), the local log,
//! MetaManager, Edged, the node status reporter, the read-only API on
//! loopback, and EdgeHub. The `edgecore` binary parses flags and calls
//! [`run`]. Nothing here needs the cloud to keep pods running: Edged is
//! driven by the local object view alone.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use keel_api::{ApiServer, LogRequest, PodLogs, Status};
use keel_log::{Store, StoreOptions};
use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
use tokio::sync::mpsc;
use tracing::{Instrument as _, info, info_span, warn};

use crate::bootstrap::{self, NodeIdentity};
use crate::devicetwin::DeviceTwin;
use crate::edged::{
    CriRuntime, Edged, EdgedConfig, PROCESS_RUNTIME_CLASS, ProcessRuntime, StatusSink, crilog,
};
use crate::error::{Error, Result};
use crate::eventbus::EventBus;
use crate::hub::{self, EdgeHubOptions};
use crate::meta::MetaManager;

/// edgecore's settings (YAML file, then flags).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// Where the node identity, the log and the pods' files live.
    pub data_dir: PathBuf,
    /// CloudHub (QUIC).
    pub cloud_hub: SocketAddr,
    /// More cloudcore replicas' CloudHubs, tried in turn after `cloudHub`
    /// when it cannot be reached; a replica that does not own this node
    /// sends it to the one that does (`MOVED`).
    #[serde(default)]
    pub cloud_hubs: Vec<SocketAddr>,
    /// cloudcore's join endpoint (HTTPS), used once with a join token.
    pub cloud_bootstrap: SocketAddr,
    /// Name cloudcore's certificate carries; default: the hub's IP.
    #[serde(default)]
    pub server_name: Option<String>,
    /// The read-only Kubernetes API: plain HTTP on loopback, or HTTPS with
    /// client certificates once `clientCAFile` is set (required for any
    /// other address).
    pub api_addr: SocketAddr,
    /// The node's address (InternalIP, pod IPs of the process runtime);
    /// default: the local address that reaches the cloud.
    #[serde(default)]
    pub node_ip: Option<String>,
    /// The log gRPC API (replay, tail, audit, chain verification for the
    /// `keel` CLI's `--edge`): plain HTTP/2 on loopback, or TLS with client
    /// certificates once `clientCAFile` is set. Off unless set.
    #[serde(default)]
    pub grpc_addr: Option<SocketAddr>,
    /// Seconds without a packet from cloudcore before its connection counts
    /// as lost (and the next replica's hub is tried); the edge keeps it
    /// alive at a third of that, at most every 25 s.
    #[serde(default = "default_hub_idle_timeout")]
    pub hub_idle_timeout_seconds: u64,
    /// First container restart back-off in seconds (doubles up to 300).
    #[serde(default = "default_backoff")]
    pub restart_backoff_seconds: f64,
    /// The event bus: MQTT broker for mappers and devices; on loopback, or
    /// anywhere with `mqttPasswordFile`.
    #[serde(default = "default_mqtt")]
    pub mqtt_addr: SocketAddr,
    /// A container's log file is rotated past this many bytes (the
    /// kubelet's `containerLogMaxSize`; default 10 MiB).
    #[serde(default = "default_log_max_size")]
    pub container_log_max_size: u64,
    /// Log files kept per container run, the current one included (the
    /// kubelet's `containerLogMaxFiles`; default 5).
    #[serde(default = "default_log_max_files")]
    pub container_log_max_files: u32,
    /// A CRI runtime's socket (containerd's): pods run there as
    /// containers, except those with `runtimeClassName: keel-process`,
    /// which run as host processes. Without it, every pod runs as host
    /// processes.
    #[serde(default)]
    pub cri_socket: Option<PathBuf>,
    /// Authentication of the Kubernetes API and the log gRPC API (the
    /// kubelet's `--client-ca-file`): a client must present a certificate
    /// this CA (PEM) issued, and only the cluster admin's certificate is
    /// served. The cluster CA the node joined with is `<dataDir>/pki/ca.pem`.
    #[serde(default, rename = "clientCAFile")]
    pub client_ca_file: Option<PathBuf>,
    /// The endpoints' serving certificate and key (PEM), with
    /// `clientCAFile`; default: a self-signed certificate created in
    /// `<dataDir>/pki/serving.pem` (as the kubelet does).
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub tls_private_key_file: Option<PathBuf>,
    /// MQTT clients must log in with a user and password from this file
    /// (`user:password` lines; readable by its owner only).
    #[serde(default)]
    pub mqtt_password_file: Option<PathBuf>,
    /// How long the edge API's watch history lasts (`5m`): a local
    /// watcher away longer lists again.
    #[serde(default = "default_watch_window", with = "keel_api::meta::age_serde")]
    pub watch_window: Duration,
}

fn default_watch_window() -> Duration {
    crate::meta::WATCH_WINDOW
}

fn default_log_max_size() -> u64 {
    10 << 20
}

fn default_log_max_files() -> u32 {
    5
}

fn default_mqtt() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 1883))
}

fn default_hub_idle_timeout() -> u64 {
    90
}

fn default_backoff() -> f64 {
    10.0
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("edgecore-data"),
            cloud_hub: SocketAddr::from(([127, 0, 0, 1], 10000)),
            cloud_hubs: Vec::new(),
            hub_idle_timeout_seconds: default_hub_idle_timeout(),
            cloud_bootstrap: SocketAddr::from(([127, 0, 0, 1], 10002)),
            server_name: None,
            api_addr: SocketAddr::from(([127, 0, 0, 1], 10550)),
            node_ip: None,
            grpc_addr: None,
            restart_backoff_seconds: default_backoff(),
            mqtt_addr: default_mqtt(),
            container_log_max_size: default_log_max_size(),
            container_log_max_files: default_log_max_files(),
            cri_socket: None,
            client_ca_file: None,
            tls_cert_file: None,
            tls_private_key_file: None,
            mqtt_password_file: None,
            watch_window: default_watch_window(),
        }
    }
}

impl Config {
    /// The edge's own endpoints (Kubernetes API, log gRPC API, MQTT
    /// broker) listen on a loopback address, where only this host reaches
    /// them, unless they authenticate their clients: the APIs with
    /// `clientCAFile`, the broker with `mqttPasswordFile`. Anything else is
    /// refused before anything listens.
    ///
    /// # Errors
    /// [`Error::Config`] naming the endpoint and its address, or the
    /// setting that is incomplete.
    pub fn check_endpoints(&self) -> Result<()> {
        let auth = self.client_ca_file.is_some();
        let endpoints = [
            (
                "the Kubernetes API (apiAddr, --api-addr)",
                Some(self.api_addr),
                auth,
                "clientCAFile (--client-ca-file)",
            ),
            (
                "the log gRPC API (grpcAddr, --grpc-addr)",
                self.grpc_addr,
                auth,
                "clientCAFile (--client-ca-file)",
            ),
            (
                "the MQTT broker (mqttAddr, --mqtt-addr)",
                Some(self.mqtt_addr),
                self.mqtt_password_file.is_some(),
                "mqttPasswordFile (--mqtt-password-file)",
            ),
        ];
        for (what, addr, authenticated, setting) in endpoints {
            if let Some(addr) = addr
                && !addr.ip().is_loopback()
                && !authenticated
            {
                return Err(Error::Config(format!(
                    "{what} would listen on {addr}, which is not a loopback address, without authentication: set {setting}, or listen on loopback (127.0.0.0/8 or ::1)"
                )));
            }
        }
        match (&self.tls_cert_file, &self.tls_private_key_file) {
            (Some(_), None) | (None, Some(_)) => {
                return Err(Error::Config(
                    "tlsCertFile and tlsPrivateKeyFile (--tls-cert-file, --tls-private-key-file) go together".into(),
                ));
            }
            (Some(_), Some(_)) if !auth => {
                return Err(Error::Config(
                    "tlsCertFile serves the endpoints with client certificates: set clientCAFile (--client-ca-file) too".into(),
                ));
            }
            _ => {}
        }
        Ok(())
    }

    /// The TLS configuration of the Kubernetes API and the gRPC API, when
    /// they authenticate clients; `names` go into a generated serving
    /// certificate.
    fn endpoint_tls(&self, names: &[String]) -> Result<Option<rustls::ServerConfig>> {
        let Some(ca) = &self.client_ca_file else {
            return Ok(None);
        };
        let serving = self
            .tls_cert_file
            .as_deref()
            .zip(self.tls_private_key_file.as_deref());
        bootstrap::endpoint_tls_config(&self.data_dir, ca, serving, names).map(Some)
    }
}

/// Joins the cluster with `token` unless this data directory already holds
/// a node identity; returns the identity.
pub async fn ensure_identity(cfg: &Config, token: Option<&str>) -> Result<NodeIdentity> {
    match NodeIdentity::load(&cfg.data_dir) {
        Ok(id) => Ok(id),
        Err(Error::NotJoined(_)) => {
            let Some(token) = token else {
                return Err(Error::NotJoined(cfg.data_dir.clone()));
            };
            let t = bootstrap::JoinToken::parse(token)?;
            let id = bootstrap::join(cfg.cloud_bootstrap, token, t.node(), &cfg.data_dir).await?;
            info!(node = %id.node, "joined the cluster");
            Ok(id)
        }
        Err(e) => Err(e),
    }
}

/// The local address used to reach `peer` (no packet is sent).
fn local_ip_towards(peer: SocketAddr) -> Option<String> {
    let bind: SocketAddr = if peer.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let s = std::net::UdpSocket::bind(bind).ok()?;
    s.connect(peer).ok()?;
    Some(s.local_addr().ok()?.ip().to_string())
}

/// Edged's status reports go into the pod objects (and so into `up`).
/// Once edgecore is stopping, containers it stops are not reported as
/// terminated: they are restarted on the next start, which reports them.
#[derive(Debug)]
struct MetaStatus(Arc<MetaManager>, Arc<std::sync::atomic::AtomicBool>);

impl StatusSink for MetaStatus {
    fn pod_status(&self, key: &str, status: Value) {
        if self.1.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let r = self.0.update(key, |obj| {
            if let Some(o) = obj.as_object_mut() {
                o.insert("status".into(), status);
            }
        });
        if let Err(e) = r {
            warn!(%key, error = %e, "could not record pod status");
        }
    }
}

/// Container logs from Edged's files.
#[derive(Debug)]
struct EdgeLogs(Arc<Edged>);

impl PodLogs for EdgeLogs {
    fn logs<'a>(&'a self, pod: &'a Value, req: &'a LogRequest) -> keel_api::LogsFuture<'a> {
        Box::pin(std::future::ready(crate::streams::Logs::logs_now(
            self, pod, req,
        )))
    }
}

impl crate::streams::Logs for EdgeLogs {
    fn logs_now(&self, pod: &Value, req: &LogRequest) -> Result<mpsc::Receiver<Bytes>, Status> {
        let names: Vec<String> = pod
            .pointer("/spec/containers")
            .and_then(Value::as_array)
            .map(|cs| {
                cs.iter()
                    .filter_map(|c| c.get("name").and_then(Value::as_str).map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let container = match (&req.container, names.as_slice()) {
            (Some(c), _) if names.contains(c) => c.clone(),
            (Some(c), _) => {
                return Err(Status::bad_request(format!(
                    "container {c} is not valid for pod {}",
                    req.pod
                )));
            }
            (None, [one]) => one.clone(),
            (None, _) => {
                return Err(Status::bad_request(format!(
                    "a container name must be specified for pod {}, choose one of: [{}]",
                    req.pod,
                    names.join(" ")
                )));
            }
        };
        let path = self
            .0
            .log_path(&req.namespace, &req.pod, &container, req.previous)
            .filter(|p| p.exists())
            .ok_or_else(|| {
                Status::bad_request(format!(
                    "{}container \"{container}\" in pod \"{}\" has no log{}",
                    if req.previous {
                        "previous terminated "
                    } else {
                        ""
                    },
                    req.pod,
                    if req.previous {
                        ""
                    } else {
                        " yet (waiting to start)"
                    }
                ))
            })?;
        let (tx, rx) = mpsc::channel(16);
        let edged = self.0.clone();
        let req = req.clone();
        tokio::spawn(async move {
            if let Err(e) = stream_log(&edged, path, &container, &req, &tx).await {
                let _ = tx
                    .send(Bytes::from(format!("keel: reading the log failed: {e}\n")))
                    .await;
            }
        });
        Ok(rx)
    }
}

/// Sends the log at `path` (its last `tail_lines`, lines since `since`,
/// with their times when asked, at most `limit_bytes`), then, with
/// `follow`, what is appended while it is the container's current log.
/// The file holds CRI entries (see `edged::crilog`).
pub(crate) async fn stream_log(
    edged: &Edged,
    path: PathBuf,
    container: &str,
    req: &LogRequest,
    tx: &mpsc::Sender<Bytes>,
) -> std::io::Result<()> {
    let mut r = crilog::Reader::open(&path).await?;
    // What the log holds now: `--tail` counts back from here, and an
    // answer that does not follow ends here.
    let end = r.file().metadata().await?.len();
    if !req.follow {
        r.stop_at(end);
    }
    if let Some(n) = req.tail_lines {
        let at = tail_offset(r.file(), end, n).await?;
        r.seek(std::io::SeekFrom::Start(at)).await?;
    }
    let since = req.since(time::OffsetDateTime::now_utc());
    let mut left = req.limit_bytes.unwrap_or(u64::MAX);
    let mut out = Vec::new();
    let take = |bytes: &[u8], left: &mut u64| {
        let n = usize::try_from(*left)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        *left -= n as u64;
        bytes
            .get(..n)
            .map(Bytes::copy_from_slice)
            .unwrap_or_default()
    };
    loop {
        if left == 0 {
            return Ok(());
        }
        out.clear();
        let read = r
            .read(|entry| {
                if since.is_none_or(|s| entry.time.is_none_or(|t| t >= s)) {
                    crilog::render(entry, req.timestamps, &mut out);
                }
            })
            .await?;
        if read {
            let chunk = take(&out, &mut left);
            if !chunk.is_empty() && tx.send(chunk).await.is_err() {
                return Ok(());
            }
            continue;
        }
        if !req.follow {
            let chunk = take(r.partial(), &mut left);
            if !chunk.is_empty() {
                let _ = tx.send(chunk).await;
            }
            return Ok(());
        }
        // Follow while this file is the container's current log; after a
        // rotation, in the new file at that path.
        let current = edged.log_path(&req.namespace, &req.pod, container, false);
        if current.as_deref() != Some(path.as_path()) || tx.is_closed() {
            return Ok(());
        }
        if r.rotated().await? {
            continue;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Where the last `n` lines of the first `len` bytes of the log file `f`
/// start, read from that end (only as much as those lines hold, plus a
/// block).
pub(crate) async fn tail_offset(f: &mut tokio::fs::File, len: u64, n: u64) -> std::io::Result<u64> {
    const BLOCK: u64 = 64 << 10;
    let mut buf: Vec<u8> = Vec::new();
    let mut from = len;
    while from > 0 {
        let start = from.saturating_sub(BLOCK);
        let mut block = vec![0u8; usize::try_from(from - start).unwrap_or(0)];
        f.seek(std::io::SeekFrom::Start(start)).await?;
        f.read_exact(&mut block).await?;
        block.append(&mut buf);
        buf = block;
        from = start;
        if from == 0 {
            break;
        }
        // The first line may be cut: count from the next one.
        if let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let rest = buf.get(nl + 1..).unwrap_or_default();
            let at = tail_start(rest, n);
            if at > 0 {
                return Ok(from + (nl + 1 + at) as u64);
            }
        }
    }
    Ok(tail_start(&buf, n) as u64)
}

/// Where the last `n` lines of a log file start: just after the `n + 1`th
/// entry from the end that ends a line (or at the start).
fn tail_start(file: &[u8], n: u64) -> usize {
    let mut ends = Vec::new();
    let mut start = 0;
    for (i, b) in file.iter().enumerate() {
        if *b == b'\n' {
            ends.push((start, i));
            start = i + 1;
        }
    }
    let mut full = 0u64;
    for &(start, end) in ends.iter().rev() {
        if crilog::parse(file.get(start..end).unwrap_or_default()).full {
            if full == n {
                return end + 1;
            }
            full += 1;
        }
    }
    0
}

#[cfg(test)]
mod tail_tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    #[tokio::test]
    async fn tail_reads_from_the_end() {
        use tokio::io::AsyncReadExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let mut text = String::new();
        for i in 0..20_000 {
            text.push_str(&format!("2026-01-01T00:00:00Z stdout F line {i}\n"));
        }
        std::fs::write(&path, &text).unwrap();
        for n in [0u64, 1, 5, 3000, 19_999, 20_000, 50_000] {
            let mut f = tokio::fs::File::open(&path).await.unwrap();
            let len = f.metadata().await.unwrap().len();
            let at = super::tail_offset(&mut f, len, n).await.unwrap();
            assert_eq!(
                at as usize,
                super::tail_start(text.as_bytes(), n),
                "n = {n}"
            );
            let mut f = tokio::fs::File::open(&path).await.unwrap();
            let mut all = String::new();
            f.read_to_string(&mut all).await.unwrap();
            let lines = all[at as usize..].lines().count() as u64;
            assert_eq!(lines, n.min(20_000), "n = {n}");
        }
    }

    #[test]
    fn endpoints_listen_only_on_loopback() {
        let mut cfg = super::Config::default();
        assert!(cfg.check_endpoints().is_ok());
        cfg.api_addr = "127.0.0.2:10550".parse().unwrap();
        cfg.grpc_addr = Some("[::1]:10650".parse().unwrap());
        assert!(cfg.check_endpoints().is_ok());
        for (field, addr) in [
            ("api", "0.0.0.0:10550"),
            ("grpc", "10.1.2.3:10650"),
            ("mqtt", "[::]:1883"),
        ] {
            let mut cfg = super::Config::default();
            let addr: std::net::SocketAddr = addr.parse().unwrap();
            match field {
                "api" => cfg.api_addr = addr,
                "grpc" => cfg.grpc_addr = Some(addr),
                _ => cfg.mqtt_addr = addr,
            }
            let err = cfg.check_endpoints().unwrap_err().to_string();
            assert!(
                err.contains(&addr.to_string()) && err.contains("not a loopback"),
                "{err}"
            );
            // With the endpoint's authentication set, it may listen there.
            if field == "mqtt" {
                cfg.mqtt_password_file = Some("pw".into());
            } else {
                cfg.client_ca_file = Some("ca.pem".into());
            }
            assert!(cfg.check_endpoints().is_ok(), "{field}");
        }
        // A serving certificate needs its key, and client authentication.
        let mut cfg = super::Config {
            tls_cert_file: Some("c.pem".into()),
            ..super::Config::default()
        };
        assert!(cfg.check_endpoints().is_err());
        cfg.tls_private_key_file = Some("k.pem".into());
        assert!(
            cfg.check_endpoints()
                .unwrap_err()
                .to_string()
                .contains("clientCAFile")
        );
        cfg.client_ca_file = Some("ca.pem".into());
        assert!(cfg.check_endpoints().is_ok());
    }

    #[test]
    fn tail_counts_lines_not_parts() {
        let f = b"t stdout F a\nt stdout P b\nt stdout F c\nt stdout F d\n";
        // Raw (non-CRI) lines count as lines too; here every line is raw.
        assert_eq!(super::tail_start(f, 0), f.len());
        assert_eq!(super::tail_start(f, 1), f.len() - 13);
        assert_eq!(super::tail_start(f, 10), 0);
        let cri = b"2026-01-01T00:00:00Z stdout F a\n2026-01-01T00:00:00Z stdout P b\n2026-01-01T00:00:00Z stdout F c\n";
        // The last line is the `P` part and the `F` that ends it.
        assert_eq!(super::tail_start(cri, 1), 32);
        assert_eq!(super::tail_start(cri, 2), 0);
    }
}

/// Runs Edged from the object view: on every change, the desired pods.
async fn reconcile(meta: Arc<MetaManager>, edged: Arc<Edged>) {
    let mut changed = meta.subscribe();
    loop {
        let pods: Vec<(String, Value)> = meta
            .objects("pods/")
            .into_iter()
            .map(|(k, v)| (k, (*v).clone()))
            .collect();
        let lookup = |k: &str| meta.object(k).map(|v| (*v).clone());
        edged.sync(pods, &lookup);
        if changed.changed().await.is_err() {
            return;
        }
    }
}

/// Records above the horizon before a stream is compacted.
const COMPACT_AFTER: u64 = 4096;

/// Keeps the local log bounded: every minute, streams with enough new
/// records are folded into per-object snapshots (see
/// [`MetaManager::compact`]).
async fn compact_loop(meta: Arc<MetaManager>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        let m = meta.clone();
        match tokio::task::spawn_blocking(move || m.compact(COMPACT_AFTER)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(error = %e, "compacting the local log failed"),
            Err(e) => warn!(error = %e, "the compaction task failed"),
        }
    }
}

/// Aborts a spawned task when dropped.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A running edgecore.
#[derive(Debug)]
pub struct Running {
    pub node: String,
    pub api_addr: SocketAddr,
    pub mqtt_addr: SocketAddr,
    /// The log gRPC API, if served.
    pub grpc_addr: Option<SocketAddr>,
    pub meta: Arc<MetaManager>,
}

/// Starts edgecore and runs it until `stop` resolves; `started` is called
/// once everything listens.
pub async fn run(
    cfg: Config,
    token: Option<String>,
    started: impl FnOnce(&Running),
    stop: impl std::future::Future<Output = ()>,
) -> Result<()> {
    cfg.check_endpoints()?;
    // The data directory holds the node's key, its log (secrets included)
    // and the pods' directories. Others may pass through it (0711: a pod
    // of the process runtime, running as another user, reaches its own
    // directory under pods/) but list or read nothing: the key (pki/), the
    // log (log/), container logs and state are their owner's only.
    {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = &cfg.data_dir;
        let mode = |d: &std::path::Path, m: u32| {
            std::fs::create_dir_all(d)
                .and_then(|()| std::fs::set_permissions(d, std::fs::Permissions::from_mode(m)))
                .map_err(|e| Error::io(format!("data directory {}", d.display()), e))
        };
        mode(dir, 0o711)?;
        mode(&dir.join("log"), 0o700)?;
        mode(&dir.join("pods"), 0o711)?;
    }
    ensure_identity(&cfg, token.as_deref()).await?;
    // Renewed while running, at 2/3 of its lifetime (at once if past that);
    // each new connection presents the current certificate.
    let identity = bootstrap::LiveIdentity::new(NodeIdentity::load(&cfg.data_dir)?)?;
    let renewer = AbortOnDrop(tokio::spawn(
        identity
            .clone()
            .renew_loop(cfg.cloud_bootstrap, cfg.data_dir.clone()),
    ));
    let node = identity.identity().node;
    let span = info_span!("edgecore", %node);
    async move {
        let store = Store::open(cfg.data_dir.join("log"), StoreOptions::default())?;
        let meta = MetaManager::open(store.clone(), &node)?;
        meta.set_watch_window(cfg.watch_window);
        let node_ip = cfg
            .node_ip
            .clone()
            .or_else(|| local_ip_towards(cfg.cloud_hub))
            .unwrap_or_else(|| "127.0.0.1".into());
        let mut ecfg = EdgedConfig::new(cfg.data_dir.join("pods"), node.clone(), node_ip.clone());
        if !(cfg.restart_backoff_seconds.is_finite() && cfg.restart_backoff_seconds > 0.0) {
            return Err(Error::Config(format!(
                "restartBackoffSeconds must be a positive number, not {}",
                cfg.restart_backoff_seconds
            )));
        }
        ecfg.backoff_base = Duration::from_secs_f64(cfg.restart_backoff_seconds);
        if cfg.container_log_max_size < 1024 || cfg.container_log_max_files < 1 {
            return Err(Error::Config(format!(
                "containerLogMaxSize must be at least 1024 bytes and containerLogMaxFiles at least 1, not {} and {}",
                cfg.container_log_max_size, cfg.container_log_max_files
            )));
        }
        ecfg.container_log_max_size = cfg.container_log_max_size;
        ecfg.container_log_max_files = cfg.container_log_max_files;
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let process: Arc<dyn crate::edged::Runtime> = Arc::new(ProcessRuntime);
        let default: Arc<dyn crate::edged::Runtime> = match &cfg.cri_socket {
            Some(socket) => CriRuntime::connect(socket)
                .await
                .map_err(|e| Error::Config(format!("criSocket: {e}")))?,
            None => process.clone(),
        };
        let edged = Arc::new(
            Edged::with_runtimes(
                ecfg,
                default,
                [(PROCESS_RUNTIME_CLASS.to_owned(), process)].into(),
                Arc::new(MetaStatus(meta.clone(), stopping.clone())),
            )
            .map_err(|e| Error::Config(format!("edged: {e}")))?,
        );
        let reconciler = tokio::spawn(reconcile(meta.clone(), edged.clone()));
        let compactor = tokio::spawn(compact_loop(meta.clone()));
        // With clientCAFile, both APIs are TLS with client certificates; a
        // generated serving certificate names the node and its addresses.
        let mut names: std::collections::BTreeSet<String> =
            [node.clone(), "localhost".into(), "127.0.0.1".into(), node_ip.clone()].into();
        for a in [Some(cfg.api_addr), cfg.grpc_addr].into_iter().flatten() {
            if !a.ip().is_unspecified() {
                names.insert(a.ip().to_string());
            }
        }
        let names: Vec<String> = names.into_iter().collect();
        let tls = cfg.endpoint_tls(&names)?;
        let users = cfg
            .mqtt_password_file
            .as_deref()
            .map(crate::eventbus::MqttUsers::load)
            .transpose()
            .map_err(|e| Error::Config(format!("mqttPasswordFile: {e}")))?;
        let api = ApiServer::bind_read_only(
            cfg.api_addr,
            meta.clone(),
            Some(Arc::new(EdgeLogs(edged.clone()))),
            tls.clone(),
        )
        .await
        .map_err(|e| Error::io(format!("edge API on {}", cfg.api_addr), e))?;
        let grpc = match cfg.grpc_addr {
            Some(a) => {
                let streams = vec![
                    keel_sync::link::down_stream(&node),
                    keel_sync::link::up_stream(&node),
                ];
                let log = keel_api::grpc::LogApi::new(store.clone(), streams);
                Some(
                    keel_api::grpc::GrpcServer::bind_log(a, log, tls)
                        .await
                        .map_err(|e| Error::io(format!("edge log gRPC API on {a}"), e))?,
                )
            }
            None => None,
        };
        let reporter = tokio::spawn(crate::node::report(
            meta.clone(),
            node_ip,
            api.local_addr().port(),
        ));
        let bus = EventBus::bind(cfg.mqtt_addr, users)
            .await
            .map_err(|e| Error::io(format!("event bus (MQTT) on {}", cfg.mqtt_addr), e))?;
        let devicetwin = DeviceTwin::start(meta.clone(), bus.clone());
        let running = Running {
            node: node.clone(),
            api_addr: api.local_addr(),
            mqtt_addr: bus.addr(),
            grpc_addr: grpc.as_ref().map(keel_api::grpc::GrpcServer::local_addr),
            meta: meta.clone(),
        };
        started(&running);
        let mut opts = EdgeHubOptions::new(cfg.cloud_hub, node.clone());
        opts.alternates = cfg.cloud_hubs.clone();
        opts.idle_timeout = Duration::from_secs(cfg.hub_idle_timeout_seconds.max(3));
        opts.keep_alive = (opts.idle_timeout / 3).min(opts.keep_alive);
        if let Some(n) = &cfg.server_name {
            opts.server_name = n.clone();
        }
        let tls = identity.client_tls_config()?;
        let sessions = Arc::new(crate::streams::Sessions {
            logs: EdgeLogs(edged.clone()),
            edged: edged.clone(),
            meta: meta.clone(),
        });
        let r = hub::run(opts, tls, store, meta.clone(), Some(sessions), stop).await;
        drop(renewer);
        info!("stopping: containers get their grace period");
        stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        reconciler.abort();
        reporter.abort();
        compactor.abort();
        api.shutdown();
        drop(devicetwin);
        if let Some(g) = grpc {
            g.shutdown().await;
        }
        edged.shutdown().await;
        r
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::Config;

    #[test]
    fn config_yaml_is_camel_case_and_strict() {
        let c: Config = serde_yaml::from_str(
            "dataDir: /var/lib/keel\ncloudHub: 10.0.0.1:10000\ncloudBootstrap: 10.0.0.1:10002\napiAddr: 127.0.0.1:10550\nnodeIp: 10.0.0.7\nrestartBackoffSeconds: 2.5\n",
        )
        .unwrap();
        assert_eq!(c.data_dir.to_str(), Some("/var/lib/keel"));
        assert_eq!(c.node_ip.as_deref(), Some("10.0.0.7"));
        assert!((c.restart_backoff_seconds - 2.5).abs() < f64::EPSILON);
        let e = serde_yaml::from_str::<Config>(
            "dataDir: x\ncloudHub: 10.0.0.1:10000\ncloudBootstrap: 10.0.0.1:10002\napiAddr: 127.0.0.1:10550\nnodeIP: 1.2.3.4\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `nodeIP`"), "{e}");
    }
}
