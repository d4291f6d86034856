//! Two cloudcore replicas attached to one real Kubernetes cluster (etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler v1.37.2 on
//! loopback, `edge/tests/support/k8s.rs`), sharing `KEEL_REPLICA_BENCH_NODES`
//! (default 2,000) simulated edge nodes by shard Leases. Each simulated
//! node is keel-edge's own EdgeHub and MetaManager in this process (one log
//! store for all of them, as `reconnect_storm` shares one), with a node
//! certificate signed by the cluster CA and both replicas' hubs. Measured,
//! and printed as one table:
//!
//! 1. Cold start: every node connects at once; time until every Node is
//!    Ready on the API server (a list of Nodes every 500 ms), and how the
//!    nodes split between the replicas (the replica whose stream address
//!    the Node's status names).
//! 2. cloudcore VmRSS per replica with its nodes connected, minus before
//!    any node connected, per connected node.
//! 3. API load with every node idle: requests of cloudcore's user the API
//!    server received (its audit log, stage RequestReceived) over
//!    `KEEL_REPLICA_BENCH_IDLE_SECS` (default 60), per second per 1,000
//!    nodes, by verb and resource.
//! 4. Failover: the replica holding the most nodes is SIGKILLed; time until
//!    every Node is Ready again with its status written by the survivor.
//!
//! Shard Leases last `KEEL_REPLICA_BENCH_LEASE_SECS` (default 15, as
//! `kubernetes.replica.leaseSeconds`); nodes wait as long for a silent
//! replica before trying the other.
//!
//! `cargo build --release --bins && cargo bench -p keel-benches --bench replicas`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    missing_docs
)]

#[path = "../../edge/tests/support/k8s.rs"]
mod k8s;
#[path = "../../cloud/tests/support/kubectl.rs"]
mod support;

#[path = "support/k8s_cluster.rs"]
mod cluster;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::Value;

use cluster::wait_for;
use k8s::{ControlPlane, K8sOptions};
use keel_benches::{Kill, port, rss_kib};

const COMMAND: &str = "cargo bench -p keel-benches --bench replicas";
const USER: &str = "keel-cloudcore";
const AUDIT_POLICY: &str = r#"apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["ResponseStarted", "ResponseComplete"]
rules:
- level: Metadata
  users: ["keel-cloudcore"]
- level: None
"#;

fn env(k: &str) -> Option<u64> {
    std::env::var(k).ok()?.parse().ok()
}

fn node_name(i: usize) -> String {
    format!("sim-{i:05}")
}

struct Replica {
    id: String,
    hub: String,
    stream: String,
    proc: Option<Kill>,
}

/// Node name → (Ready, the stream address its status names).
fn nodes(rt: &tokio::runtime::Runtime, api: &Api<Node>) -> BTreeMap<String, (bool, String)> {
    let Ok(list) =
        rt.block_on(api.list(&ListParams::default().labels("node-role.kubernetes.io/edge")))
    else {
        return BTreeMap::new();
    };
    list.items
        .into_iter()
        .filter_map(|n| {
            let name = n.metadata.name.clone()?;
            let st = n.status?;
            let ready = st
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let ip = st.addresses.as_ref()?.first()?.address.clone();
            let port = st.daemon_endpoints?.kubelet_endpoint?.port;
            Some((name, (ready, format!("{ip}:{port}"))))
        })
        .collect()
}

/// Requests of cloudcore's user the API server received between two
/// byte offsets of its audit log, by `verb resource[/subresource]`.
fn requests(audit: &Path, from: u64, to: u64) -> BTreeMap<String, u64> {
    let bytes = std::fs::read(audit).unwrap_or_default();
    let (from, to) = (from as usize, (to as usize).min(bytes.len()));
    let mut by = BTreeMap::new();
    for l in bytes
        .get(from..to)
        .unwrap_or_default()
        .split(|b| *b == b'\n')
    {
        let Ok(e) = serde_json::from_slice::<Value>(l) else {
            continue;
        };
        if e["stage"] != "RequestReceived" || e["user"]["username"] != USER {
            continue;
        }
        let o = &e["objectRef"];
        let mut what = format!(
            "{} {}",
            e["verb"].as_str().unwrap_or("?"),
            o["resource"].as_str().unwrap_or("-")
        );
        if let Some(sub) = o["subresource"].as_str() {
            what = format!("{what}/{sub}");
        }
        *by.entry(what).or_insert(0) += 1;
    }
    by
}

fn mark(audit: &Path) -> u64 {
    std::fs::metadata(audit).map(|m| m.len()).unwrap_or(0)
}

/// Writes a node identity for `node` signed by `ca` under `dir/pki`.
fn identity(ca: &keel_cloud::pki::ClusterCa, dir: &Path, node: &str) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, node);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let issued = ca
        .sign_node_csr(&csr, node, keel_cloud::pki::DEFAULT_NODE_CERT_VALIDITY)
        .unwrap();
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    std::fs::write(pki.join("ca.pem"), ca.cert_pem()).unwrap();
    std::fs::write(pki.join("node.pem"), issued.cert_pem).unwrap();
    std::fs::write(pki.join("node.key"), key.serialize_pem()).unwrap();
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    eprintln!("{COMMAND}");
    let n = env("KEEL_REPLICA_BENCH_NODES").unwrap_or(2_000).max(2) as usize;
    let idle_secs = env("KEEL_REPLICA_BENCH_IDLE_SECS").unwrap_or(60).max(1);
    let lease = env("KEEL_REPLICA_BENCH_LEASE_SECS").unwrap_or(15).max(3);
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    std::fs::write(path("audit-policy.yaml"), AUDIT_POLICY).unwrap();
    let audit = path("audit.log");
    let qps = ["--kube-api-qps=500", "--kube-api-burst=1000"].map(String::from);
    let k8s = ControlPlane::start(K8sOptions {
        apiserver_args: vec![
            format!(
                "--audit-policy-file={}",
                path("audit-policy.yaml").display()
            ),
            format!("--audit-log-path={}", audit.display()),
        ],
        controller_manager_args: qps.to_vec(),
        scheduler_args: qps.to_vec(),
        // Nodes that lose their replica are not evicted meanwhile.
        unreachable_toleration_secs: 600,
        ..K8sOptions::default()
    });
    let kubeconfig = k8s.client_kubeconfig("cloudcore", USER, &["system:masters"]);

    // Two replicas; the second takes the first one's CA from the cluster.
    let mut replicas: Vec<Replica> = (0..2)
        .map(|i| Replica {
            id: format!("r{i}"),
            hub: format!("127.0.0.1:{}", port(true)),
            stream: format!("127.0.0.1:{}", port(false)),
            proc: None,
        })
        .collect();
    let lease_s = lease.to_string();
    for r in &mut replicas {
        let d = path(&format!("cloud-{}", r.id));
        let (boot, webhook, api) = (
            format!("127.0.0.1:{}", port(false)),
            format!("127.0.0.1:{}", port(false)),
            format!("127.0.0.1:{}", port(false)),
        );
        let out = path(&format!("{}.out", r.id));
        r.proc = Some(keel_benches::cloudcore(
            &d,
            &r.hub,
            &boot,
            &[
                "--kubeconfig".as_ref(),
                kubeconfig.as_ref(),
                "--replica-id".as_ref(),
                r.id.as_ref(),
                "--shard-lease-seconds".as_ref(),
                lease_s.as_ref(),
                "--webhook-addr".as_ref(),
                webhook.as_ref(),
                "--stream-addr".as_ref(),
                r.stream.as_ref(),
                "--api-addr".as_ref(),
                api.as_ref(),
            ],
            Some(out.as_path()),
            Some(path(&format!("{}.log", r.id)).as_path()),
        ));
        wait_for(
            "a cloudcore replica to start",
            Duration::from_secs(120),
            || std::fs::read_to_string(&out).is_ok_and(|s| s.contains("cloudcore is running")),
        );
    }
    // The shards split between the two.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = rt.block_on(async {
        let kc = Kubeconfig::read_from(k8s.admin_kubeconfig()).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .unwrap();
        kube::Client::try_from(cfg).unwrap()
    });
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "kube-system");
    wait_for(
        "the shards split two ways",
        Duration::from_secs(120),
        || {
            let Ok(l) =
                rt.block_on(leases.list(&ListParams::default().labels("lease.keel.io/kind=shard")))
            else {
                return false;
            };
            let mut by: BTreeMap<String, usize> = BTreeMap::new();
            for x in l.items {
                if let Some(h) = x.spec.and_then(|s| s.holder_identity) {
                    *by.entry(h).or_default() += 1;
                }
            }
            by.len() == 2 && by.values().all(|v| *v == 16)
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    let rss0: Vec<u64> = replicas
        .iter()
        .map(|r| rss_kib(r.proc.as_ref().unwrap().0.id()))
        .collect();

    // The simulated nodes' identities, signed by a copy of the cluster CA.
    eprintln!("signing {n} node certificates");
    let ca_copy = path("ca-copy");
    std::fs::create_dir_all(ca_copy.join("pki")).unwrap();
    for f in ["ca.pem", "ca.key"] {
        std::fs::copy(
            path("cloud-r0").join("pki").join(f),
            ca_copy.join("pki").join(f),
        )
        .unwrap();
    }
    let ca = keel_cloud::pki::ClusterCa::load_or_create(&ca_copy).unwrap();
    let node_dirs: Vec<PathBuf> = (0..n)
        .map(|i| {
            let d = path("nodes").join(node_name(i));
            identity(&ca, &d, &node_name(i));
            d
        })
        .collect();

    // Every node connects at once, each knowing both hubs (its first the
    // replica it would join through, alternating).
    let store = rt.block_on(async {
        keel_log::Store::open(path("edge-log"), keel_log::StoreOptions::default()).unwrap()
    });
    let hubs: Vec<SocketAddr> = replicas.iter().map(|r| r.hub.parse().unwrap()).collect();
    let api: Api<Node> = Api::all(client);
    eprintln!("{n} nodes connecting");
    let t0 = Instant::now();
    rt.block_on(async {
        use keel_edge::{bootstrap, hub, meta::MetaManager};
        for (i, d) in node_dirs.iter().enumerate() {
            let name = node_name(i);
            let id = bootstrap::NodeIdentity::load(d).unwrap();
            let tls = bootstrap::LiveIdentity::new(id)
                .unwrap()
                .client_tls_config()
                .unwrap();
            let meta = MetaManager::open(store.clone(), &name).unwrap();
            let mut opts = hub::EdgeHubOptions::new(hubs[i % 2], name);
            opts.alternates = vec![hubs[(i + 1) % 2]];
            opts.idle_timeout = Duration::from_secs(lease);
            tokio::spawn(hub::run(
                opts,
                tls,
                store.clone(),
                meta,
                None,
                std::future::pending(),
            ));
        }
    });
    let live: Vec<String> = replicas.iter().map(|r| r.stream.clone()).collect();
    wait_for(
        "every node Ready on the API server",
        Duration::from_secs(1800),
        || {
            std::thread::sleep(Duration::from_millis(400));
            let s = nodes(&rt, &api);
            s.len() == n && s.values().all(|(r, at)| *r && live.contains(at))
        },
    );
    let cold = t0.elapsed();
    let split: Vec<usize> = replicas
        .iter()
        .map(|r| {
            nodes(&rt, &api)
                .values()
                .filter(|(_, at)| *at == r.stream)
                .count()
        })
        .collect();
    eprintln!(
        "all Ready after {:.1} s ({split:?}); {idle_secs} s idle",
        cold.as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(10));
    let rss1: Vec<u64> = replicas
        .iter()
        .map(|r| rss_kib(r.proc.as_ref().unwrap().0.id()))
        .collect();
    let from = mark(&audit);
    std::thread::sleep(Duration::from_secs(idle_secs));
    let idle = requests(&audit, from, mark(&audit));
    let total: u64 = idle.values().sum();

    // SIGKILL the replica holding the most nodes.
    let victim = usize::from(split[1] > split[0]);
    let survivor = 1 - victim;
    eprintln!("killing {} ({} nodes)", replicas[victim].id, split[victim]);
    let t1 = Instant::now();
    if let Some(mut k) = replicas[victim].proc.take() {
        let _ = k.0.kill();
        let _ = k.0.wait();
        std::mem::forget(k);
    }
    let only = replicas[survivor].stream.clone();
    wait_for(
        "every node Ready under the survivor",
        Duration::from_secs(1800),
        || {
            std::thread::sleep(Duration::from_millis(400));
            let s = nodes(&rt, &api);
            s.len() == n && s.values().all(|(r, at)| *r && *at == only)
        },
    );
    let failover = t1.elapsed();
    let rss2 = rss_kib(replicas[survivor].proc.as_ref().unwrap().0.id());

    let mib = |kib: u64| kib as f64 / 1024.0;
    println!();
    println!("{COMMAND}   (KEEL_REPLICA_BENCH_NODES={n}, lease {lease} s)");
    println!(
        "2 release cloudcore replicas attached to kube-apiserver v1.37.2 on loopback, {n} simulated edge nodes (EdgeHub + MetaManager in the bench process), {} cores",
        std::thread::available_parallelism().map_or(0, |c| c.get())
    );
    println!();
    println!(
        "1. cold start, all {n} nodes at once: every Node Ready on the API server after {:.1} s; nodes per replica {split:?}",
        cold.as_secs_f64()
    );
    for (i, r) in replicas.iter().enumerate() {
        println!(
            "2. {} VmRSS {:.1} MiB before any node, {:.1} MiB with {} nodes: {:.1} KiB per connected node",
            r.id,
            mib(rss0[i]),
            mib(rss1[i]),
            split[i],
            (rss1[i] as f64 - rss0[i] as f64) / split[i].max(1) as f64
        );
    }
    let per_s_per_k = total as f64 / idle_secs as f64 / (n as f64 / 1000.0);
    println!(
        "3. idle: {total} requests of cloudcore's user in {idle_secs} s = {:.1}/s, {per_s_per_k:.1}/s per 1,000 idle nodes   [KubeEdge runs cloudcore with qps 60,000 for 100,000 nodes: 600/s per 1,000]",
        total as f64 / idle_secs as f64
    );
    for (k, v) in &idle {
        println!("   {v:>7} {k}");
    }
    println!(
        "4. {} SIGKILLed with {} nodes: every Node Ready under {} after {:.1} s (lease {lease} s); survivor VmRSS {:.1} MiB with {n} nodes",
        replicas[victim].id,
        split[victim],
        replicas[survivor].id,
        failover.as_secs_f64(),
        mib(rss2)
    );
    rt.shutdown_background();
    drop(replicas);
    drop(k8s);
}
