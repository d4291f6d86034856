//! Reconnect storm: N edge nodes (default 10,000; `KEEL_STORM_NODES`)
//! reconnect at once to one CloudHub over loopback QUIC with mTLS, each 10
//! records behind in both directions. Measures wall time until every node
//! is caught up both ways, handshakes/s, and the cloud process's RSS with
//! every connection idle.
//!
//! What the records are: by default real ones, as cloudcore and edgecore
//! write them. The cloud is cloudcore's registry (the embedded control
//! plane) behind the hub; each node runs 10 pods bound to it, and each
//! round the cloud changes every pod's spec (a label, through the
//! registry, which sends the change down) while the node, offline,
//! writes every pod's status (an automerge change by its actor, from its
//! copy of the pod). So each storm carries concurrent edits both ways:
//! the cloud admits each node's changes (the status-only check) and folds
//! them into its objects and the `cluster` stream; a node counts as
//! caught up once its copy of every pod holds the round's spec and the
//! cloud acknowledged its changes, and after the storm the bench checks
//! that the cloud folded every status. Before the first storm every node
//! connects once (with a TLS identity used only then, so the first storm
//! is still cold) to receive its pods. `KEEL_STORM_PAYLOAD=events`
//! replicates opaque event records instead, with a cloud that folds
//! nothing (the link and the log alone, for comparison).
//!
//! `cargo bench -p keel-benches --bench reconnect_storm` (criterion, 10+
//! storms), or with `KEEL_STORM_ONCE=1` two (cold, then warm); `KEEL_STORM_TRACE=1`
//! prints progress twice a second; `KEEL_STORM_MAX_HANDSHAKES` sets the
//! ceiling of the cloud's handshakes in flight (`0`: no bound).
//! `KEEL_STORM_BARE=1` runs quinn and TLS alone on both sides, configured
//! as the hub and the edges configure them, with no link and no log: what
//! a connection costs before keel (its RSS per idle connection, its
//! handshakes/s).
//!
//! The first storm is cold (full TLS handshakes), the later ones warm (the
//! nodes resume their sessions with the hub's tickets). Each storm
//! reports: time until 50 / 90 / 99 / 100 % of the nodes are
//! caught up both ways, handshakes/s, connection attempts the cloud turned
//! away, UDP datagrams the kernel dropped (`/proc/net/snmp`), and the CPU
//! time of the cloud process and of this one (the simulated edges).
//!
//! The cloud runs in a child process (this binary with `KEEL_STORM_CLOUD`
//! set) so that its RSS is its own; the edges share client endpoints (one
//! per 500 nodes) and one log store in this process, or, with
//! `KEEL_STORM_EDGE_PROCS=P`, in P child processes of their own (for
//! 50,000 nodes: `KEEL_STORM_NODES=50000 KEEL_STORM_EDGE_PROCS=4`). Each
//! storm: all connections close, both sides append 10 records per node,
//! then all reconnect at once. An edge gives a handshake 10 s and backs
//! off as EdgeHub does.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    missing_docs
)]

// keel's allocator (see `keel_benches`).
use keel_benches as _;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::Criterion;
use keel_cloud::api::registry::{Registry, Write as RegistryWrite, new_meta};
use keel_cloud::hub::{CloudHub, HubOptions};
use keel_cloud::pki::{self, ClusterCa};
use keel_cloud::plane::{Embedded, PlaneSink};
use keel_log::{Cursor, Entry, PayloadKind, Record, Role, Store, StoreOptions};
use keel_sync::crdt::{ActorId, ObjectStore};
use keel_sync::link::{LinkConfig, Side, down_stream, up_stream};
use keel_sync::objects::apply_records;
use keel_sync::quic::{Sink, run_link};

const BEHIND: usize = 10;

fn nodes() -> usize {
    std::env::var("KEEL_STORM_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

fn node(i: usize) -> String {
    format!("storm-{i:05}")
}

/// What each round's records are (`KEEL_STORM_PAYLOAD`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Payload {
    /// Pod specs from cloudcore's registry, pod statuses from the nodes:
    /// automerge changes, folded on both sides (the default).
    Pods,
    /// Opaque event records, folded into nothing (`events`).
    Events,
}

fn payload() -> Payload {
    match std::env::var("KEEL_STORM_PAYLOAD").as_deref() {
        Ok("events") => Payload::Events,
        Ok("pods") | Err(_) => Payload::Pods,
        Ok(other) => panic!("KEEL_STORM_PAYLOAD={other}: expected pods or events"),
    }
}

/// Pod `k` of node `node` (`BEHIND` per node).
fn pod_key(node: &str, k: usize) -> String {
    format!("pods/default/{node}-p{k}")
}

/// Pod `k` of `node` as the cloud writes it in round `round`: the round
/// is its `rev` label.
fn pod(node: &str, k: usize, round: usize) -> serde_json::Value {
    serde_json::json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("{node}-p{k}"), "namespace": "default",
            "labels": {"app": "storm", "rev": round.to_string()}},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "registry.local/app:1"}]}})
}

/// The status a node reports for pod `k` in round `round` (what its
/// kubelet would: phase, IP, conditions, container state); the round is
/// the container's restart count.
fn pod_status(k: usize, round: usize) -> serde_json::Value {
    let t = format!("2026-11-23T08:{:02}:{:02}Z", round % 60, k % 60);
    serde_json::json!({"status": {
        "phase": "Running",
        "podIP": format!("10.42.{}.{}", round % 250, k % 250),
        "conditions": [
            {"type": "Ready", "status": if round.is_multiple_of(2) { "True" } else { "False" }, "lastTransitionTime": t},
            {"type": "ContainersReady", "status": "True", "lastTransitionTime": "2026-11-23T08:00:00Z"}
        ],
        "containerStatuses": [{"name": "app", "ready": round.is_multiple_of(2), "restartCount": round,
            "image": "registry.local/app:1", "state": {"running": {"startedAt": t}}}]
    }})
}

fn entries(origin: &str, round: usize) -> Vec<Entry> {
    (0..BEHIND)
        .map(|k| {
            // Opaque event records (readings): the cloud refuses a
            // "change" that is not an automerge change by the node.
            Entry::new(
                origin,
                format!("pods/default/p{k}"),
                PayloadKind::Event,
                format!("round {round} record {k}: {:0>200}", k),
            )
        })
        .collect()
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

struct Quiet;
impl Sink for Quiet {
    fn admit(&self, _: &str, _: &str, _: &[Record]) -> Result<(), keel_sync::link::Refusal> {
        Ok(())
    }
    fn room(&self) -> keel_sync::quic::Room<'_> {
        keel_sync::quic::room_now()
    }

    fn persisted(&self, _: &str, _: &str, _: &[Record]) {}
    fn snapshot_installed(&self, _: &str, _: &str) {}
}

/// The lines of this process's stdin (the parent's commands), for async
/// code.
fn stdin_lines() -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Child: the cloud. Commands on stdin: `append`, `rss`; answers on stdout.
fn cloud(dir: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ca = ClusterCa::load_or_create(std::path::Path::new(dir)).unwrap();
        let server = ca.server_cert(&["127.0.0.1"]).unwrap();
        // Session tickets, as cloudcore's hub: storms after the first
        // resume their TLS sessions.
        let tickets = pki::HubTickets::new(&[7; 32]).unwrap();
        let tls =
            pki::hub_tls_config(&ca, &server.cert_pem, &server.key_pem, tickets.clone()).unwrap();
        let store = Store::open(
            std::path::Path::new(dir).join("log"),
            StoreOptions::default(),
        )
        .unwrap();
        let n = nodes();
        let bare = std::env::var_os("KEEL_STORM_BARE").is_some();
        let registry = (payload() == Payload::Pods && !bare).then(|| {
            // cloudcore's registry; it makes each node's streams when it
            // binds the node's first pod.
            Registry::open(store.clone()).unwrap()
        });
        match &registry {
            Some(reg) => write_pods(reg, n, 0).await,
            None => {
                for i in 0..n {
                    store
                        .create_stream(&down_stream(&node(i)), Role::Writer, 1)
                        .unwrap();
                    store
                        .create_stream(&up_stream(&node(i)), Role::Replica, 1)
                        .unwrap();
                }
            }
        }
        if bare {
            return bare_cloud(tls, tickets).await;
        }
        let mut opts = HubOptions::default();
        if let Some(k) = std::env::var("KEEL_STORM_MAX_HANDSHAKES")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
        {
            opts.max_handshakes = if k == 0 { usize::MAX } else { k };
        }
        // As cloudcore's hub: what nodes send is admitted and folded by
        // the embedded control plane.
        let sink: Arc<dyn Sink> = match &registry {
            Some(reg) => Arc::new(PlaneSink(Arc::new(Embedded(reg.clone())))),
            None => Arc::new(Quiet),
        };
        let hub = CloudHub::bind(
            "127.0.0.1:0".parse().unwrap(),
            tls,
            store.clone(),
            sink,
            opts,
        )
        .unwrap();
        println!("addr {}", hub.local_addr().unwrap());
        let mut round = 0;
        let mut rx = stdin_lines();
        while let Some(cmd) = rx.recv().await {
            match cmd.as_str() {
                "append" if registry.is_some() => {
                    round += 1;
                    if let Some(reg) = &registry {
                        write_pods(reg, n, round).await;
                    }
                    println!("ok");
                }
                "append" => {
                    round += 1;
                    let tickets: Vec<_> = (0..n)
                        .map(|i| {
                            store
                                .append_async(&down_stream(&node(i)), entries("kubectl", round))
                                .unwrap()
                        })
                        .collect();
                    for t in tickets {
                        t.await.unwrap();
                    }
                    println!("ok");
                }
                "rss" => println!("rss {} connected {}", rss_kib(), hub.connected().len()),
                "folded" => {
                    // Pods whose status the cloud holds from this round.
                    let mut folded = 0;
                    if let Some(reg) = &registry {
                        reg.scan("pods/", |p| {
                            let restarts = p
                                .pointer("/status/containerStatuses/0/restartCount")
                                .and_then(serde_json::Value::as_u64);
                            folded += usize::from(restarts == Some(round as u64));
                        });
                    }
                    println!("{folded}");
                }
                "turned-away" => println!(
                    "{} {}",
                    hub.stats()
                        .turned_away
                        .load(std::sync::atomic::Ordering::Relaxed),
                    tickets.opened()
                ),
                _ => break,
            }
            std::io::stdout().flush().unwrap();
        }
    });
}

/// Writes round `round` of every node's pods through the registry (it
/// sends each change down to the pod's node), and waits until they are
/// durable.
async fn write_pods(reg: &Registry, n: usize, round: usize) {
    for i in 0..n {
        let name = node(i);
        for k in 0..BEHIND {
            let (key, obj) = (pod_key(&name, k), pod(&name, k, round));
            if i + 1 == n && k + 1 == BEHIND {
                // Commits become durable in order: waiting for the last
                // one waits for them all.
                reg.write(&key, move |old| {
                    Ok(Some(RegistryWrite::Put(next_pod(old, obj))))
                })
                .await
                .unwrap();
            } else {
                reg.room().await;
                reg.submit(&key, move |old| {
                    Ok(Some(RegistryWrite::Put(next_pod(old, obj))))
                })
                .unwrap();
            }
        }
    }
}

/// The pod to store: `obj` if it is new, else the pod held with `obj`'s
/// labels (the status the node reported stays as folded).
fn next_pod(old: Option<&serde_json::Value>, obj: serde_json::Value) -> serde_json::Value {
    match old {
        Some(old) => {
            let mut next = old.clone();
            next["metadata"]["labels"] = obj["metadata"]["labels"].clone();
            next
        }
        None => new_meta(obj, None),
    }
}

/// Child, `KEEL_STORM_BARE`: quinn and TLS alone, as the hub configures
/// them (same TLS, transport and endpoint), holding every connection and
/// running nothing on it: what a connection costs before keel's link.
async fn bare_cloud(tls: rustls::ServerConfig, tickets: Arc<pki::HubTickets>) {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(keel_cloud::hub::transport(
        HubOptions::default().idle_timeout,
        None,
    )));
    let ep =
        keel_sync::quic::server_endpoint(server, "127.0.0.1:0".parse().unwrap(), Some(&[7; 32]))
            .unwrap();
    println!("addr {}", ep.local_addr().unwrap());
    let held: Arc<std::sync::Mutex<Vec<quinn::Connection>>> = Arc::default();
    let h = held.clone();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let h = h.clone();
            tokio::spawn(async move {
                if let Ok(c) = incoming.await {
                    h.lock().unwrap().push(c);
                }
            });
        }
    });
    let mut rx = stdin_lines();
    while let Some(cmd) = rx.recv().await {
        match cmd.as_str() {
            "append" => println!("ok"),
            "rss" => {
                let mut h = held.lock().unwrap();
                h.retain(|c| c.close_reason().is_none());
                println!("rss {} connected {}", rss_kib(), h.len());
            }
            "turned-away" => println!("0 {}", tickets.opened()),
            _ => break,
        }
        std::io::stdout().flush().unwrap();
    }
}

#[derive(Default)]
struct Progress {
    connected: AtomicUsize,
    done: AtomicUsize,
    last_connect_ns: AtomicU64,
    /// When each node was caught up both ways, from the storm's start.
    done_at: std::sync::Mutex<Vec<Duration>>,
}

/// The simulated edges of one process: nodes `first, first + step, …`,
/// their identities (kept across storms: their TLS session tickets),
/// one log store, and one client endpoint (UDP socket) per 500 nodes.
struct Fleet {
    nodes: Vec<usize>,
    configs: Vec<quinn::ClientConfig>,
    /// The same identities with TLS session caches of their own, for the
    /// connection before the first storm (which stays cold).
    prime_configs: Vec<quinn::ClientConfig>,
    payload: Payload,
    /// Each node's copy of its objects (its pods, its Node), with
    /// [`Payload::Pods`].
    objects: Vec<Arc<std::sync::Mutex<ObjectStore>>>,
    store: Store,
    rt: tokio::runtime::Runtime,
    endpoints: Vec<quinn::Endpoint>,
    conns: Arc<std::sync::Mutex<Vec<quinn::Connection>>>,
    round: usize,
    /// Bumped when a storm is over: its nodes stop reconnecting.
    generation: Arc<AtomicUsize>,
    _dir: tempfile::TempDir,
}

/// Nodes per client endpoint: a fleet's packets do not share one socket
/// buffer, and one socket for 10,000 handshakes would measure the
/// bench's own drops.
const PER_ENDPOINT: usize = 500;

/// What one fleet measured in one storm.
struct FleetRun {
    done_at: Vec<Duration>,
    last_connect: Duration,
    cpu: f64,
}

impl Fleet {
    /// Identities signed by the cloud's CA (in `ca_dir`) for `nodes`.
    fn new(ca_dir: &std::path::Path, nodes: Vec<usize>) -> Fleet {
        let ca = ClusterCa::load_or_create(ca_dir).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let (configs, prime_configs): (Vec<_>, Vec<_>) = nodes
            .iter()
            .map(|&i| {
                let name = node(i);
                let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
                let mut params = rcgen::CertificateParams::default();
                params
                    .distinguished_name
                    .push(rcgen::DnType::CommonName, name.clone());
                let csr = params.serialize_request(&key).unwrap().pem().unwrap();
                let cert = ca
                    .sign_node_csr(&csr, &name, pki::DEFAULT_NODE_CERT_VALIDITY)
                    .unwrap();
                let config = || {
                    let tls =
                        pki::client_tls_config(ca.cert_pem(), &cert.cert_pem, &key.serialize_pem())
                            .unwrap();
                    let mut cfg = quinn::ClientConfig::new(Arc::new(
                        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
                    ));
                    cfg.transport_config(Arc::new(keel_cloud::hub::transport(
                        Duration::from_secs(90),
                        Some(Duration::from_secs(25)),
                    )));
                    cfg
                };
                store
                    .create_stream(&up_stream(&name), Role::Writer, 1)
                    .unwrap();
                store
                    .create_stream(&down_stream(&name), Role::Replica, 1)
                    .unwrap();
                (config(), config())
            })
            .unzip();
        let objects = nodes.iter().map(|_| Arc::default()).collect();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut fleet = Fleet {
            nodes,
            configs,
            prime_configs,
            // A bare storm runs no link: nothing to write but records.
            payload: if std::env::var_os("KEEL_STORM_BARE").is_some() {
                Payload::Events
            } else {
                payload()
            },
            objects,
            store,
            rt,
            endpoints: Vec::new(),
            conns: Arc::default(),
            round: 0,
            generation: Arc::default(),
            _dir: dir,
        };
        fleet.endpoints = fleet.new_endpoints();
        fleet
    }

    fn new_endpoints(&self) -> Vec<quinn::Endpoint> {
        self.rt.block_on(async {
            (0..self.nodes.len().div_ceil(PER_ENDPOINT))
                .map(|_| keel_sync::quic::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap())
                .collect()
        })
    }

    /// Every connection closed (nodes stop reconnecting), on fresh
    /// endpoints for the next connections.
    fn disconnect_all(&mut self, why: &[u8]) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.rt.block_on(async {
            for e in &self.endpoints {
                e.close(0u32.into(), why);
            }
            for e in &self.endpoints {
                e.wait_idle().await;
            }
        });
        self.endpoints = self.new_endpoints();
        self.conns.lock().unwrap().clear();
    }

    /// Every connection closed; each node writes 10 more records.
    fn offline_round(&mut self) {
        self.disconnect_all(b"storm round over");
        self.round += 1;
        let tickets: Vec<_> = self
            .nodes
            .iter()
            .zip(&self.objects)
            .map(|(&i, objects)| {
                let name = node(i);
                let entries = match self.payload {
                    Payload::Events => entries(&name, self.round),
                    // The node's kubelet reports every pod's status: a
                    // change by the node's actor to its copy of the pod.
                    Payload::Pods => {
                        let actor = ActorId::from_name(&name);
                        let mut objects = objects.lock().unwrap();
                        (0..BEHIND)
                            .map(|k| {
                                let key = pod_key(&name, k);
                                let change = objects
                                    .edit_merge_patch(&key, &actor, &pod_status(k, self.round))
                                    .unwrap()
                                    .unwrap();
                                Entry::new(&name, key, PayloadKind::Change, change)
                            })
                            .collect()
                    }
                };
                self.store.append_async(&up_stream(&name), entries).unwrap()
            })
            .collect();
        self.rt.block_on(async {
            for t in tickets {
                t.await.unwrap();
            }
        });
    }

    /// Every node connects at once and runs its link until caught up both
    /// ways (the cloud wrote as many records per node as it did).
    fn storm(&self, addr: SocketAddr) -> FleetRun {
        self.connect_all(addr, &self.configs, (self.round * BEHIND) as u64)
    }

    /// Before the first storm ([`Payload::Pods`]): every node connects
    /// once, with identities whose TLS sessions are not kept for the
    /// storms, and receives its pods.
    fn prime(&mut self, addr: SocketAddr) {
        self.connect_all(addr, &self.prime_configs, 0);
        self.disconnect_all(b"primed");
    }

    /// Every node connects at once with `configs` and runs its link until
    /// caught up: the cloud acknowledged `want_up` of its `up` stream, and
    /// it holds the cloud's round [`Fleet::round`] (with
    /// [`Payload::Events`]: that many records per node in `down`).
    fn connect_all(
        &self,
        addr: SocketAddr,
        configs: &[quinn::ClientConfig],
        want_up: u64,
    ) -> FleetRun {
        let want = (self.round * BEHIND) as u64;
        let n = self.nodes.len();
        let progress = Arc::new(Progress::default());
        let trace = std::env::var_os("KEEL_STORM_TRACE").is_some();
        let bare = std::env::var_os("KEEL_STORM_BARE").is_some();
        let cpu_before = cpu_secs(std::process::id());
        let start = Instant::now();
        let mut sinks = Vec::with_capacity(n);
        self.rt.block_on(async {
            for (k, &i) in self.nodes.iter().enumerate() {
                let name = node(i);
                let objects = (self.payload == Payload::Pods).then(|| self.objects[k].clone());
                let sink = Arc::new(EdgeSink {
                    progress: progress.clone(),
                    start,
                    want_up,
                    want_down: want,
                    want_rev: self.round.to_string(),
                    store: self.store.clone(),
                    objects,
                    state: std::sync::Mutex::new((false, want_up == 0)),
                });
                sinks.push((name.clone(), sink.clone()));
                let (ep, cfg, store, conns) = (
                    self.endpoints[k / PER_ENDPOINT].clone(),
                    configs[k].clone(),
                    self.store.clone(),
                    self.conns.clone(),
                );
                let (generation, this) = (self.generation.clone(), self.generation.load(Ordering::SeqCst));
                tokio::spawn(async move {
                    // As an edgecore: a handshake gets 10 s, and one
                    // turned away or lost is tried again after EdgeHub's
                    // jittered back-off; a link that closes (the hub gave
                    // up on a handshake the client had finished) connects
                    // again. Until the storm is over.
                    let defaults = keel_edge::hub::EdgeHubOptions::new(addr, name.clone());
                    let mut attempt = 0;
                    while generation.load(Ordering::SeqCst) == this {
                    let conn = loop {
                        if generation.load(Ordering::SeqCst) != this {
                            return;
                        }
                        let connecting = ep.connect_with(cfg.clone(), addr, "127.0.0.1").unwrap();
                        match tokio::time::timeout(Duration::from_secs(10), connecting).await {
                            Ok(Ok(c)) => break c,
                            Ok(Err(e)) if trace => eprintln!("{name}: {e}; retrying"),
                            Err(_) if trace => eprintln!("{name}: handshake timed out; retrying"),
                            _ => {}
                        }
                        let wait = keel_edge::hub::backoff(
                            attempt,
                            defaults.backoff_min,
                            defaults.backoff_max,
                            rand_u64(),
                        );
                        attempt += 1;
                        tokio::time::sleep(wait).await;
                    };
                    conns.lock().unwrap().push(conn.clone());
                    if bare {
                        // Connected is all a bare storm asks.
                        sink.connected(&name);
                        sink.check(true, true);
                        conn.closed().await;
                        return;
                    }
                    let head = store.info(&down_stream(&name)).unwrap().head;
                    let mut link = LinkConfig::new(name.clone(), Side::Edge, head);
                    link.ping_interval_ms = defaults.ping_interval.as_millis() as u64;
                    link.idle_timeout_ms = defaults.link_idle_timeout.as_millis() as u64;
                    run_link(conn, store.clone(), link, sink.clone(), None).await;
                    }
                });
            }
            let mut last_trace = Instant::now();
            let (mut last_done, mut last_change) = (0, Instant::now());
            while progress.done.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let done = progress.done.load(Ordering::SeqCst);
                if done != last_done {
                    (last_done, last_change) = (done, Instant::now());
                } else if last_change.elapsed() > Duration::from_secs(30) {
                    // No node caught up for 30 s: say which are behind.
                    last_change = Instant::now();
                    for (name, sink) in &sinks {
                        let st = *sink.state.lock().unwrap();
                        if !(st.0 && st.1) {
                            let down = self.store.info(&down_stream(name)).map(|i| i.head.seq);
                            eprintln!(
                                "{name} behind after {:.0} s: down persisted {} (head {down:?}), up acknowledged {}",
                                start.elapsed().as_secs_f64(),
                                st.0,
                                st.1
                            );
                        }
                    }
                }
                if trace && last_trace.elapsed() > Duration::from_millis(500) {
                    last_trace = Instant::now();
                    eprintln!(
                        "storm {:.1}s: {} connected, {} caught up",
                        start.elapsed().as_secs_f64(),
                        progress.connected.load(Ordering::SeqCst),
                        progress.done.load(Ordering::SeqCst)
                    );
                }
                assert!(
                    start.elapsed() < Duration::from_secs(600),
                    "storm stuck: {} connected, {} caught up of {n}",
                    progress.connected.load(Ordering::SeqCst),
                    progress.done.load(Ordering::SeqCst)
                );
            }
        });
        let done_at = progress.done_at.lock().unwrap().clone();
        FleetRun {
            done_at,
            last_connect: Duration::from_nanos(progress.last_connect_ns.load(Ordering::SeqCst)),
            cpu: cpu_secs(std::process::id()) - cpu_before,
        }
    }

    /// UDP bytes both ways of every connection so far, and how many are
    /// still open.
    fn wire(&self) -> (u64, usize, usize) {
        let conns = self.conns.lock().unwrap();
        let bytes = conns
            .iter()
            .map(|c| {
                let s = c.stats();
                s.udp_tx.bytes + s.udp_rx.bytes
            })
            .sum();
        let open = conns.iter().filter(|c| c.close_reason().is_none()).count();
        (bytes, conns.len(), open)
    }
}

/// Child, `KEEL_STORM_FLEET=k/P`: the fleet of nodes `k, k + P, …`.
/// Commands on stdin (`round`, `storm ADDR`, `wire`), one answer line
/// each on stdout.
fn fleet_child(spec: &str, ca_dir: &str) {
    let (k, p) = spec.split_once('/').unwrap();
    let (k, p): (usize, usize) = (k.parse().unwrap(), p.parse().unwrap());
    let mut fleet = Fleet::new(
        std::path::Path::new(ca_dir),
        (k..nodes()).step_by(p).collect(),
    );
    println!("ready");
    std::io::stdout().flush().unwrap();
    for line in std::io::stdin().lock().lines().map_while(Result::ok) {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("round") => {
                fleet.offline_round();
                println!("ok");
            }
            Some("prime") => {
                fleet.prime(words.next().unwrap().parse().unwrap());
                println!("ok");
            }
            Some("storm") => {
                let addr = words.next().unwrap().parse().unwrap();
                let run = fleet.storm(addr);
                let times: Vec<String> = run
                    .done_at
                    .iter()
                    .map(|d| d.as_micros().to_string())
                    .collect();
                println!(
                    "{} {} {}",
                    run.cpu,
                    run.last_connect.as_micros(),
                    times.join(",")
                );
            }
            Some("wire") => {
                let (bytes, all, open) = fleet.wire();
                println!("{bytes} {all} {open}");
            }
            _ => break,
        }
        std::io::stdout().flush().unwrap();
    }
}

/// The edges: one fleet in this process, or fleets in child processes
/// (`KEEL_STORM_EDGE_PROCS`), driven in lockstep.
enum Edges {
    Here(Box<Fleet>),
    Children(Vec<FleetChild>),
}

struct FleetChild {
    child: std::process::Child,
    to: std::process::ChildStdin,
    from: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl FleetChild {
    fn send(&mut self, cmd: &str) {
        writeln!(self.to, "{cmd}").unwrap();
        self.to.flush().unwrap();
    }
    fn answer(&mut self) -> String {
        self.from.next().unwrap().unwrap()
    }
}

impl Edges {
    fn new(ca_dir: &std::path::Path) -> Edges {
        let procs: usize = std::env::var("KEEL_STORM_EDGE_PROCS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        if procs <= 1 {
            return Edges::Here(Box::new(Fleet::new(ca_dir, (0..nodes()).collect())));
        }
        let mut children: Vec<FleetChild> = (0..procs)
            .map(|k| {
                let mut child = Command::new(std::env::current_exe().unwrap())
                    .env("KEEL_STORM_FLEET", format!("{k}/{procs}"))
                    .env("KEEL_STORM_CA", ca_dir)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap();
                let to = child.stdin.take().unwrap();
                let from = BufReader::new(child.stdout.take().unwrap()).lines();
                FleetChild { child, to, from }
            })
            .collect();
        for c in &mut children {
            assert_eq!(c.answer(), "ready");
        }
        Edges::Children(children)
    }

    fn offline_round(&mut self) {
        match self {
            Edges::Here(f) => f.offline_round(),
            Edges::Children(cs) => {
                for c in cs.iter_mut() {
                    c.send("round");
                }
                for c in cs.iter_mut() {
                    assert_eq!(c.answer(), "ok");
                }
            }
        }
    }

    fn prime(&mut self, addr: SocketAddr) {
        match self {
            Edges::Here(f) => f.prime(addr),
            Edges::Children(cs) => {
                for c in cs.iter_mut() {
                    c.send(&format!("prime {addr}"));
                }
                for c in cs.iter_mut() {
                    assert_eq!(c.answer(), "ok");
                }
            }
        }
    }

    fn storm(&mut self, addr: SocketAddr) -> FleetRun {
        match self {
            Edges::Here(f) => f.storm(addr),
            Edges::Children(cs) => {
                for c in cs.iter_mut() {
                    c.send(&format!("storm {addr}"));
                }
                let mut all = FleetRun {
                    done_at: Vec::new(),
                    last_connect: Duration::ZERO,
                    cpu: 0.0,
                };
                for c in cs.iter_mut() {
                    let line = c.answer();
                    let mut parts = line.splitn(3, ' ');
                    all.cpu += parts.next().unwrap().parse::<f64>().unwrap();
                    let last = Duration::from_micros(parts.next().unwrap().parse().unwrap());
                    all.last_connect = all.last_connect.max(last);
                    all.done_at.extend(
                        parts
                            .next()
                            .unwrap_or_default()
                            .split(',')
                            .filter(|t| !t.is_empty())
                            .map(|t| Duration::from_micros(t.parse().unwrap())),
                    );
                }
                all
            }
        }
    }

    fn wire(&mut self) -> (u64, usize, usize) {
        match self {
            Edges::Here(f) => f.wire(),
            Edges::Children(cs) => {
                let mut sum = (0, 0, 0);
                for c in cs.iter_mut() {
                    c.send("wire");
                    let line = c.answer();
                    let v: Vec<u64> = line
                        .split_whitespace()
                        .map(|x| x.parse().unwrap())
                        .collect();
                    sum.0 += v[0];
                    sum.1 += v[1] as usize;
                    sum.2 += v[2] as usize;
                }
                sum
            }
        }
    }
}

impl Drop for Edges {
    fn drop(&mut self) {
        if let Edges::Children(cs) = self {
            for c in cs.iter_mut() {
                c.send("quit");
                let _ = c.child.wait();
            }
        }
    }
}

/// CPU time (user + system) of process `pid`, from `/proc`.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (which may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 (11 and 12 after the name);
    // the kernel's USER_HZ is 100.
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// The kernel's UDP receive errors and receive-buffer drops.
fn udp_drops() -> (u64, u64) {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let udp: Vec<Vec<&str>> = snmp
        .lines()
        .filter(|l| l.starts_with("Udp:"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    let (Some(names), Some(values)) = (udp.first(), udp.get(1)) else {
        return (0, 0);
    };
    let get = |name: &str| {
        names
            .iter()
            .position(|n| *n == name)
            .and_then(|i| values.get(i))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (get("InErrors"), get("RcvbufErrors"))
}

struct EdgeSink {
    progress: Arc<Progress>,
    start: Instant,
    want_up: u64,
    want_down: u64,
    /// With [`Payload::Pods`]: the `rev` label of the round's pods.
    want_rev: String,
    store: Store,
    /// With [`Payload::Pods`]: the node's copy of its objects, which
    /// what it receives is applied to.
    objects: Option<Arc<std::sync::Mutex<ObjectStore>>>,
    state: std::sync::Mutex<(bool, bool)>,
}

impl EdgeSink {
    fn check(&self, down_ok: bool, up_ok: bool) {
        let mut s = self.state.lock().unwrap();
        let before = s.0 && s.1;
        s.0 |= down_ok;
        s.1 |= up_ok;
        if !before && s.0 && s.1 {
            self.progress
                .done_at
                .lock()
                .unwrap()
                .push(self.start.elapsed());
            self.progress.done.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Sink for EdgeSink {
    fn admit(&self, _: &str, _: &str, _: &[Record]) -> Result<(), keel_sync::link::Refusal> {
        Ok(())
    }
    fn room(&self) -> keel_sync::quic::Room<'_> {
        keel_sync::quic::room_now()
    }

    fn persisted(&self, node: &str, stream: &str, records: &[Record]) {
        let Some(objects) = &self.objects else {
            let head = self.store.info(stream).map(|i| i.head.seq).unwrap_or(0);
            return self.check(head >= self.want_down, false);
        };
        // As edgecore's MetaManager: what the cloud sent is applied to the
        // node's objects; caught up once every pod holds the round's spec.
        let mut objects = objects.lock().unwrap();
        apply_records(&mut objects, records).unwrap();
        let rev = |k| {
            objects
                .get_json(&pod_key(node, k))
                .and_then(|p| p.pointer("/metadata/labels/rev").cloned())
        };
        let all =
            (0..BEHIND).all(|k| rev(k).as_ref().and_then(|v| v.as_str()) == Some(&self.want_rev));
        self.check(all, false);
    }
    fn snapshot_installed(&self, _: &str, _: &str) {}
    fn connected(&self, _: &str) {
        self.progress.connected.fetch_add(1, Ordering::SeqCst);
        self.progress
            .last_connect_ns
            .fetch_max(self.start.elapsed().as_nanos() as u64, Ordering::SeqCst);
    }
    fn acked(&self, _: &str, _: &str, cursor: Cursor) {
        self.check(false, cursor.seq >= self.want_up);
    }
}

fn storm(c: &mut Criterion) {
    let n = nodes();
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("KEEL_STORM_CLOUD", dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let cloud_pid = child.id();
    let mut to_cloud = child.stdin.take().unwrap();
    let mut from_cloud = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr: SocketAddr = from_cloud
        .next()
        .unwrap()
        .unwrap()
        .strip_prefix("addr ")
        .unwrap()
        .parse()
        .unwrap();
    let mut ask = |cmd: &str| -> String {
        writeln!(to_cloud, "{cmd}").unwrap();
        to_cloud.flush().unwrap();
        from_cloud.next().unwrap().unwrap()
    };

    // Node identities from the cloud's CA (created by the child).
    let mut edges = Edges::new(dir.path());
    let rss_before = ask("rss");
    let mut report = Vec::new();
    let pods = payload() == Payload::Pods && std::env::var_os("KEEL_STORM_BARE").is_none();
    if pods {
        let start = Instant::now();
        edges.prime(addr);
        eprintln!(
            "{n} nodes received their {BEHIND} pods each in {:.1} s (before the storms)",
            start.elapsed().as_secs_f64()
        );
    }
    let mut round = 0;

    let mut storm_once = || -> Duration {
        // Everyone offline; both sides write 10 records per node.
        edges.offline_round();
        assert_eq!(ask("append"), "ok");
        round += 1;
        let counters = |line: String| -> (u64, u64) {
            let mut v = line.split_whitespace().map(|x| x.parse().unwrap_or(0));
            (v.next().unwrap_or(0), v.next().unwrap_or(0))
        };
        let (turned_away_before, resumed_before) = counters(ask("turned-away"));
        let drops_before = udp_drops();
        let cloud_cpu_before = cpu_secs(cloud_pid);
        let run = edges.storm(addr);
        let cloud_cpu = cpu_secs(cloud_pid) - cloud_cpu_before;
        let mut done_at = run.done_at;
        done_at.sort();
        let took = done_at.last().copied().unwrap_or_default();
        let at = |p: usize| done_at[(done_at.len() * p / 100).min(done_at.len() - 1)].as_secs_f64();
        let drops = udp_drops();
        let (turned_away, resumed) = counters(ask("turned-away"));
        if pods {
            // The cloud folded every status the nodes reported.
            let mut folded = 0;
            for _ in 0..600 {
                folded = ask("folded").parse::<usize>().unwrap();
                if folded == n * BEHIND {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            assert_eq!(
                folded,
                n * BEHIND,
                "pod statuses of round {round} folded by the cloud"
            );
        }
        report.push(StormReport {
            took,
            p50: at(50),
            p90: at(90),
            p99: at(99),
            handshakes_per_sec: n as f64 / run.last_connect.as_secs_f64(),
            turned_away: turned_away - turned_away_before,
            resumed: resumed - resumed_before,
            udp_in_errors: drops.0 - drops_before.0,
            udp_rcvbuf_errors: drops.1 - drops_before.1,
            cloud_cpu,
            edges_cpu: run.cpu,
        });
        took
    };
    if std::env::var_os("KEEL_STORM_ONCE").is_some() {
        // Two storms, no statistics (a 10,000-node storm takes a minute):
        // cold (first connections: full handshakes) and warm (resumed).
        storm_once();
        storm_once();
    } else {
        let mut g = c.benchmark_group("reconnect_storm");
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(1))
            .measurement_time(Duration::from_secs(1));
        g.bench_function(format!("{n}-nodes-10-behind-both-ways"), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| storm_once()).sum())
        });
        g.finish();
    }
    std::thread::sleep(Duration::from_secs(2));
    let rss_idle = ask("rss");
    let idle_secs: u64 = std::env::var("KEEL_STORM_IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let (before, open0, _) = edges.wire();
    std::thread::sleep(Duration::from_secs(idle_secs));
    let (after, _, open) = edges.wire();
    for (i, r) in report.iter().enumerate() {
        let kind = if i == 0 { "cold" } else { "warm" };
        eprintln!(
            "storm {kind}: {n} nodes caught up both ways: 50 % {:.2} s, 90 % {:.2} s, 99 % {:.2} s, 100 % {:.2} s; handshakes {:.0}/s ({} resumed); turned away {}; kernel UDP drops {} (receive-buffer {}); CPU: cloud {:.1} s, edges {:.1} s",
            r.p50,
            r.p90,
            r.p99,
            r.took.as_secs_f64(),
            r.handshakes_per_sec,
            r.resumed,
            r.turned_away,
            r.udp_in_errors,
            r.udp_rcvbuf_errors,
            r.cloud_cpu,
            r.edges_cpu,
        );
    }
    let cap = |f: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/core/{f}"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into())
    };
    eprintln!(
        "UDP socket buffers: keel asks {} bytes, the kernel caps them at net.core.rmem_max {} / wmem_max {}",
        keel_sync::quic::UDP_BUFFER_BYTES,
        cap("rmem_max"),
        cap("wmem_max")
    );
    eprintln!("cloud process before connections: {rss_before}");
    let kib = |s: &str| -> u64 {
        s.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    eprintln!(
        "cloud RSS per idle connected node: {:.1} KB",
        (kib(&rss_idle).saturating_sub(kib(&rss_before))) as f64 * 1024.0 / 1000.0 / n as f64
    );
    eprintln!("cloud process with {n} idle connections: {rss_idle}");
    eprintln!(
        "idle wire: {} bytes both ways over {idle_secs} s for {open0} connections ({open} still open): {:.2} bytes/s per node",
        after - before,
        (after - before) as f64 / idle_secs as f64 / open0.max(1) as f64
    );
    drop(edges);
    let _ = to_cloud.write_all(b"quit\n");
    let _ = child.kill();
    let _ = child.wait();
}

/// What one storm measured.
struct StormReport {
    took: Duration,
    p50: f64,
    p90: f64,
    p99: f64,
    handshakes_per_sec: f64,
    turned_away: u64,
    resumed: u64,
    udp_in_errors: u64,
    udp_rcvbuf_errors: u64,
    cloud_cpu: f64,
    edges_cpu: f64,
}

/// Jitter for the back-off (not cryptographic).
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}

fn main() {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    if let Ok(dir) = std::env::var("KEEL_STORM_CLOUD") {
        cloud(&dir);
        return;
    }
    if let (Ok(spec), Ok(dir)) = (
        std::env::var("KEEL_STORM_FLEET"),
        std::env::var("KEEL_STORM_CA"),
    ) {
        fleet_child(&spec, &dir);
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    storm(&mut c);
    c.final_summary();
}
