//! cloudcore attached to a real Kubernetes cluster: etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler v1.37.2 on loopback (the
//! end-to-end tests' control plane, `edge/tests/support/k8s.rs`), the
//! release `cloudcore run --kubeconfig …` and two release edgecores that
//! joined it. Measured, and printed as one table:
//!
//! 1. Pod startup: a Deployment of process-runtime pods bound to the edge
//!    label is scaled from 0 to `KEEL_ATTACHED_PODS` (default 100)
//!    replicas; a watch on the API server, started before the scale,
//!    records for each pod the local receive time of its ADDED event, of
//!    the first event with `spec.nodeName` set (bound by the scheduler) and
//!    of the first event with phase Running and condition Ready=True (the
//!    status the edge reported, written back by cloudcore). p50 / p99 /
//!    max (nearest rank) over the pods of ADDED → Running+Ready, and its
//!    two parts.
//! 2. Pod status writes: the `patch pods/status` requests of cloudcore's
//!    user the API server completed with 200, from the scale command to the
//!    last pod seen Running+Ready, divided by that time.
//! 3. Idle API load: every request of cloudcore's user the API server
//!    received (its audit log, stage RequestReceived, so a watch counts
//!    once when it is opened), over `KEEL_ATTACHED_IDLE_SECS` (default 60,
//!    20 with `KEEL_ATTACHED_ONCE=1`) with no node joined and again with
//!    both edges connected and no pods; per idle node per minute is the
//!    difference divided by 2, scaled to a minute.
//! 4. cloudcore's RSS (VmRSS) with both nodes connected minus before any
//!    node joined, divided by 2.
//!
//! cloudcore has its own client certificate (user `keel-cloudcore`, group
//! `system:masters`) and the API server an audit policy that logs only
//! that user's requests (metadata), so nothing else is counted.
//! kube-controller-manager and kube-scheduler get `--kube-api-qps=500
//! --kube-api-burst=1000` so that their client rate limits do not pace
//! the scale-up.
//!
//! `cargo build --release --bins && cargo bench -p keel-benches --bench attached`
//! (`KEEL_ATTACHED_ONCE=1` for a shorter run; the Kubernetes binaries come
//! from `KEEL_K8S_BIN` or `./dev k8s-peers`).

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
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::Value;

use cluster::wait_for;
use k8s::{ControlPlane, K8sOptions};
use keel_benches::{Kill, port, rss_kib};

const COMMAND: &str = "cargo bench -p keel-benches --bench attached";
const NODES: [&str; 2] = ["edge-a", "edge-b"];
const USER: &str = "keel-cloudcore";

/// Logs the metadata of every request of cloudcore's user when it is
/// received and when it completes (a watch's "started" stage left out),
/// nothing else.
const AUDIT_POLICY: &str = r#"apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["ResponseStarted"]
rules:
- level: Metadata
  users: ["keel-cloudcore"]
- level: None
"#;

/// The bench's Deployment, 0 replicas: process-runtime pods (`sleep`)
/// for the edge nodes.
fn deployment() -> Deployment {
    let labels = serde_json::json!({"app": "bench"});
    serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "bench"},
        "spec": {"replicas": 0, "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {
                "nodeSelector": {"node-role.kubernetes.io/edge": ""},
                "terminationGracePeriodSeconds": 2,
                "containers": [{"name": "main", "image": "busybox",
                    "command": ["/bin/sh", "-c", "exec sleep 3600"]}]}}}}))
    .unwrap()
}

/// The API server's audit log (JSON lines), read from a byte offset.
struct Audit(PathBuf);

impl Audit {
    fn mark(&self) -> u64 {
        std::fs::metadata(&self.0).map(|m| m.len()).unwrap_or(0)
    }

    /// Events of `stage` written between the marks `from` and `to`.
    fn events(&self, from: u64, to: u64, stage: &str) -> Vec<Value> {
        let bytes = std::fs::read(&self.0).unwrap_or_default();
        let (from, to) = (from as usize, (to as usize).min(bytes.len()));
        bytes
            .get(from..to)
            .unwrap_or_default()
            .split(|b| *b == b'\n')
            .filter_map(|l| serde_json::from_slice::<Value>(l).ok())
            .filter(|e| e["stage"] == stage && e["user"]["username"] == USER)
            .collect()
    }

    /// Requests received between two marks, by `verb resource[/subresource]`.
    fn requests(&self, from: u64, to: u64) -> BTreeMap<String, u64> {
        let mut by = BTreeMap::new();
        for e in self.events(from, to, "RequestReceived") {
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
}

/// When the watch first saw a pod, saw it bound, saw it Running+Ready.
#[derive(Debug, Default, Clone)]
struct Seen {
    added: Option<Instant>,
    bound: Option<Instant>,
    ready: Option<Instant>,
    node: String,
}

fn running_ready(p: &Pod) -> bool {
    let Some(st) = &p.status else { return false };
    p.metadata.deletion_timestamp.is_none()
        && st.phase.as_deref() == Some("Running")
        && st
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// Watches the bench's pods from `rv` for ever, resuming where a watch
/// ended, recording the local receive times of [`Seen`].
async fn watch(api: Api<Pod>, mut rv: String, seen: Arc<Mutex<BTreeMap<String, Seen>>>) {
    let wp = WatchParams::default().labels("app=bench");
    loop {
        let mut w = api.watch(&wp, &rv).await.unwrap().boxed();
        while let Some(ev) = w.next().await {
            let now = Instant::now();
            let pod = match ev.unwrap() {
                WatchEvent::Added(p) | WatchEvent::Modified(p) | WatchEvent::Deleted(p) => p,
                WatchEvent::Bookmark(b) => {
                    rv = b.metadata.resource_version;
                    continue;
                }
                WatchEvent::Error(e) => panic!("pod watch: {e:?}"),
            };
            rv = pod.metadata.resource_version.clone().unwrap_or(rv);
            let mut seen = seen.lock().unwrap();
            let s = seen
                .entry(pod.metadata.name.clone().unwrap_or_default())
                .or_default();
            s.added.get_or_insert(now);
            if let Some(node) = pod.spec.as_ref().and_then(|spec| spec.node_name.clone()) {
                s.bound.get_or_insert(now);
                s.node = node;
            }
            if running_ready(&pod) {
                s.ready.get_or_insert(now);
            }
        }
    }
}

/// p50, p99 and max (nearest rank) of `d`, in seconds.
fn pcts(mut d: Vec<Duration>) -> String {
    d.sort();
    let at = |p: f64| d[((d.len() as f64 * p).ceil() as usize).clamp(1, d.len()) - 1];
    format!(
        "p50 {:.2} s, p99 {:.2} s, max {:.2} s",
        at(0.5).as_secs_f64(),
        at(0.99).as_secs_f64(),
        d.last().unwrap().as_secs_f64()
    )
}

fn node_ready(k8s: &ControlPlane, node: &str) -> bool {
    let o = k8s.kubectl(&[
        "get",
        "node",
        node,
        "-o",
        r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#,
    ]);
    o.status.success() && o.stdout == b"True"
}

/// Sleeps `secs` and returns cloudcore's requests meanwhile, by kind.
fn idle(audit: &Audit, secs: u64) -> BTreeMap<String, u64> {
    let from = audit.mark();
    std::thread::sleep(Duration::from_secs(secs));
    audit.requests(from, audit.mark())
}

fn total(by: &BTreeMap<String, u64>) -> u64 {
    by.values().sum()
}

/// Seconds since midnight of an RFC 3339 UTC timestamp
/// (`2026-01-02T03:04:05.123456Z`).
fn secs_of_day(ts: &str) -> Option<f64> {
    let (_, time) = ts.trim_end_matches('Z').split_once('T')?;
    let mut parts = time.splitn(3, ':').map(str::parse::<f64>);
    let (h, m, s) = (
        parts.next()?.ok()?,
        parts.next()?.ok()?,
        parts.next()?.ok()?,
    );
    Some(h * 3600.0 + m * 60.0 + s)
}

fn env(k: &str) -> Option<u64> {
    std::env::var(k).ok().and_then(|v| v.parse().ok())
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    eprintln!("{COMMAND}");
    let once = std::env::var_os("KEEL_ATTACHED_ONCE").is_some();
    let idle_secs = env("KEEL_ATTACHED_IDLE_SECS").unwrap_or(if once { 20 } else { 60 });
    let pods = env("KEEL_ATTACHED_PODS").unwrap_or(100).max(1) as usize;
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    std::fs::write(path("audit-policy.yaml"), AUDIT_POLICY).unwrap();
    let audit = Audit(path("audit.log"));
    let qps = ["--kube-api-qps=500", "--kube-api-burst=1000"].map(String::from);
    let k8s = ControlPlane::start(K8sOptions {
        apiserver_args: vec![
            format!(
                "--audit-policy-file={}",
                path("audit-policy.yaml").display()
            ),
            format!("--audit-log-path={}", audit.0.display()),
        ],
        controller_manager_args: qps.to_vec(),
        scheduler_args: qps.to_vec(),
        ..K8sOptions::default()
    });

    // cloudcore attached, with its own user; no node yet.
    let kubeconfig = k8s.client_kubeconfig("cloudcore", USER, &["system:masters"]);
    let cloud_dir = path("cloud");
    let (hub, boot) = (
        format!("127.0.0.1:{}", port(true)),
        format!("127.0.0.1:{}", port(false)),
    );
    let (webhook, api, stream) = (
        format!("127.0.0.1:{}", port(false)),
        format!("127.0.0.1:{}", port(false)),
        format!("127.0.0.1:{}", port(false)),
    );
    let cloud = keel_benches::cloudcore(
        &cloud_dir,
        &hub,
        &boot,
        &[
            "--kubeconfig".as_ref(),
            kubeconfig.as_ref(),
            "--webhook-addr".as_ref(),
            webhook.as_ref(),
            "--stream-addr".as_ref(),
            stream.as_ref(),
            "--api-addr".as_ref(),
            api.as_ref(),
        ],
        Some(path("cloudcore.out").as_path()),
        Some(path("cloudcore.log").as_path()),
    );
    let cloud_pid = cloud.0.id();
    wait_for(
        "attached cloudcore to start",
        Duration::from_secs(60),
        || {
            std::fs::read_to_string(path("cloudcore.out"))
                .is_ok_and(|s| s.contains("cloudcore is running"))
        },
    );
    std::thread::sleep(Duration::from_secs(5));
    eprintln!("cloudcore attached; {idle_secs} s with no node");
    let idle0 = idle(&audit, idle_secs);
    let rss0 = rss_kib(cloud_pid);

    // Two edges join and go Ready on the cluster; idle, no pods.
    let edges: Vec<Kill> = NODES
        .iter()
        .map(|n| {
            let token = keel_benches::token(&cloud_dir, n);
            let log = path(&format!("{n}.log"));
            keel_benches::edgecore(&path(n), &hub, &boot, &token, Some(log.as_path()))
        })
        .collect();
    wait_for("both edge Nodes Ready", Duration::from_secs(60), || {
        NODES.iter().all(|n| node_ready(&k8s, n))
    });
    std::thread::sleep(Duration::from_secs(5));
    eprintln!("both edges Ready; {idle_secs} s idle");
    let idle2 = idle(&audit, idle_secs);
    let rss2 = rss_kib(cloud_pid);

    // The scale-up, watched from before it.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = rt.block_on(async {
        let kc = Kubeconfig::read_from(k8s.admin_kubeconfig()).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .unwrap();
        kube::Client::try_from(cfg).unwrap()
    });
    rt.block_on(
        Api::<Deployment>::namespaced(client.clone(), "default")
            .create(&PostParams::default(), &deployment()),
    )
    .unwrap();
    let api: Api<Pod> = Api::namespaced(client, "default");
    let rv = rt
        .block_on(api.list(&ListParams::default().labels("app=bench")))
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let seen: Arc<Mutex<BTreeMap<String, Seen>>> = Arc::default();
    rt.spawn(watch(api, rv, seen.clone()));
    std::thread::sleep(Duration::from_secs(1));
    eprintln!("scaling to {pods} pods");
    let from = audit.mark();
    let t0 = Instant::now();
    k8s.kubectl_ok(&["scale", "deployment/bench", &format!("--replicas={pods}")]);
    wait_for(
        "every pod Running+Ready on the cluster",
        Duration::from_secs(300),
        || {
            let seen = seen.lock().unwrap();
            seen.values().filter(|s| s.ready.is_some()).count() >= pods
        },
    );
    let to = audit.mark();
    let seen = seen.lock().unwrap().clone();
    let last = seen.values().filter_map(|s| s.ready).max().unwrap();
    let burst = last.duration_since(t0);
    rt.shutdown_background();
    // When the API server completed each of cloudcore's pod status patches.
    let writes: Vec<f64> = audit
        .events(from, to, "ResponseComplete")
        .iter()
        .filter(|e| {
            e["verb"] == "patch"
                && e["objectRef"]["resource"] == "pods"
                && e["objectRef"]["subresource"] == "status"
                && e["responseStatus"]["code"] == 200
        })
        .filter_map(|e| secs_of_day(e["stageTimestamp"].as_str()?))
        .collect();
    let status_writes = writes.len();
    let peak = writes
        .iter()
        .map(|t| writes.iter().filter(|u| (*t..t + 1.0).contains(*u)).count())
        .max()
        .unwrap_or(0);
    let rss_pods = rss_kib(cloud_pid);

    let part = |a: fn(&Seen) -> Option<Instant>, b: fn(&Seen) -> Option<Instant>| {
        pcts(
            seen.values()
                .map(|s| b(s).unwrap().duration_since(a(s).unwrap()))
                .collect(),
        )
    };
    let per_node: BTreeMap<&str, usize> = seen.values().fold(BTreeMap::new(), |mut m, s| {
        *m.entry(s.node.as_str()).or_default() += 1;
        m
    });
    let per_min = |by: &BTreeMap<String, u64>| total(by) as f64 * 60.0 / idle_secs as f64;
    let list = |by: &BTreeMap<String, u64>| {
        by.iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mib = |kib: u64| kib as f64 / 1024.0;

    println!();
    println!("{COMMAND}");
    println!(
        "release cloudcore attached to kube-apiserver v1.37.2 on loopback, 2 release edgecores ({}), {} cores",
        NODES.join(", "),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!(
        "1. pod startup, Deployment scaled 0 -> {pods} (pods per node: {per_node:?}), local receive times on one API server watch:"
    );
    println!(
        "   ADDED -> Running+Ready      {}   [KubeEdge, 100k nodes: p50 1.69 s, p99 4.09 s]",
        part(|s| s.added, |s| s.ready)
    );
    println!(
        "   ADDED -> bound (scheduler)  {}",
        part(|s| s.added, |s| s.bound)
    );
    println!(
        "   bound -> Running+Ready      {}   (cloudcore mirror -> edge -> status written back)",
        part(|s| s.bound, |s| s.ready)
    );
    println!(
        "   scale command -> last pod Running+Ready: {:.2} s",
        burst.as_secs_f64()
    );
    println!(
        "2. pod status writes: {status_writes} `patch pods/status` by cloudcore completed 200 in those {:.2} s = {:.1} /s ({:.2} per pod)",
        burst.as_secs_f64(),
        status_writes as f64 / burst.as_secs_f64(),
        status_writes as f64 / pods as f64
    );
    println!("   at most {peak} of them completed within one second");
    println!(
        "3. cloudcore requests received by kube-apiserver, {idle_secs} s windows: no node {} ({:.1}/min: {}); 2 idle nodes {} ({:.1}/min: {})",
        total(&idle0),
        per_min(&idle0),
        list(&idle0),
        total(&idle2),
        per_min(&idle2),
        list(&idle2)
    );
    println!(
        "   per idle edge node: {:.1} requests/min ((2 nodes - no node) / 2); {:.1} with the no-node baseline included (2 nodes / 2)",
        (per_min(&idle2) - per_min(&idle0)) / 2.0,
        per_min(&idle2) / 2.0
    );
    println!(
        "4. cloudcore VmRSS: {:.1} MiB before any node joined, {:.1} MiB with 2 idle nodes, {:.1} MiB with {pods} pods; per connected node {:.0} KiB",
        mib(rss0),
        mib(rss2),
        mib(rss_pods),
        (rss2 as f64 - rss0 as f64) / 2.0
    );

    // The edges stop their pods on SIGTERM, before cloudcore and the
    // control plane go.
    drop(edges);
    drop(cloud);
    drop(k8s);
}
