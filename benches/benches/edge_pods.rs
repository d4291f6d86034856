//! edgecore with real pods, against real processes: the release
//! `cloudcore` and `edgecore` binaries on loopback (build them first), and
//! the kube client on the cloud side:
//!
//! - edgecore's RSS when idle with 0 pods and with 20 running pods;
//! - pod create → `Running` seen by a watch on the cloud, p50/p99 over
//!   `KEEL_EDGE_PODS` pods (default 120), created one after another: the
//!   create goes into the node's `down` stream, over QUIC to the edge, is
//!   fsync'd there, the process runtime starts the container, and its
//!   status goes back through `up`, fsync'd on the cloud, to the watch.
//!
//! With `KEEL_EDGE_CRI=1` the pods are containers of a containerd the
//! bench starts (its own config, state and socket; Debian's containerd,
//! runc and busybox-static, which `./dev test` installs), from an image
//! built from busybox and imported with `edgecore import-image`; the
//! RSS of containerd and of its shims is reported beside edgecore's.
//!
//! `cargo build --release --bins && cargo bench -p keel-benches --bench edge_pods`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    missing_docs
)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

use keel_benches::rss_kib;

#[path = "../../edge/tests/support/containerd.rs"]
mod containerd;

const IMAGE: &str = "docker.io/library/keel-busybox:1";

/// RSS of containerd and of every shim it started (KiB).
fn containerd_rss(c: &containerd::Containerd, pid: u32) -> (u64, u64) {
    let sock = c.socket.display().to_string();
    let mut shims = 0;
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("containerd-shim")
            && cmdline.contains(&sock)
            && let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>()
        {
            shims += rss_kib(pid);
        }
    }
    (rss_kib(pid), shims)
}

fn main() {
    let n: usize = std::env::var("KEEL_EDGE_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120)
        .max(20);
    let dir = tempfile::tempdir().unwrap();
    let cri = std::env::var_os("KEEL_EDGE_CRI").is_some();
    let containerd = cri.then(|| {
        let c = containerd::Containerd::start(&dir.path().join("containerd"), IMAGE);
        let archive = dir.path().join("image.tar");
        containerd::build_image(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../edge/tests/support/oci_image.py"),
            &archive,
            IMAGE,
        );
        let sock = c.socket.display().to_string();
        let out = std::process::Command::new(keel_benches::bin("edgecore"))
            .args(["import-image", "--cri-socket", &sock])
            .arg(&archive)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (c, sock)
    });
    let edge_extra: Vec<&str> = match &containerd {
        Some((_, sock)) => vec!["--cri-socket", sock.as_str()],
        None => Vec::new(),
    };
    let cluster = keel_benches::Cluster::start_with(dir.path(), &edge_extra);
    let image = if cri { IMAGE } else { "sleep" };
    let kubeconfig = cluster.kubeconfig.clone();
    let edge_pid = cluster.edge.0.id();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kc = Kubeconfig::read_from(&kubeconfig).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .unwrap();
        let client = kube::Client::try_from(cfg).unwrap();
        let nodes: Api<Node> = Api::all(client.clone());
        let start = Instant::now();
        loop {
            let ready = nodes.list(&ListParams::default()).await.unwrap().items.iter().any(|n| {
                n.status.as_ref().and_then(|s| s.capacity.as_ref()).is_some()
            });
            if ready {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "edge-1 never reported");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        let rss0 = rss_kib(edge_pid);

        let api: Api<Pod> = Api::namespaced(client, "default");
        let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let notify = Arc::new(tokio::sync::Notify::new());
        let rv = api.list(&ListParams::default()).await.unwrap().metadata.resource_version.unwrap();
        {
            let (api, seen, notify) = (api.clone(), seen.clone(), notify.clone());
            tokio::spawn(async move {
                let mut w = api.watch(&WatchParams::default(), &rv).await.unwrap().boxed();
                while let Some(ev) = w.next().await {
                    if let Ok(WatchEvent::Added(p) | WatchEvent::Modified(p)) = ev {
                        let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                        if running {
                            let name = p.metadata.name.unwrap_or_default();
                            seen.lock().unwrap().entry(name).or_insert_with(Instant::now);
                            notify.notify_waiters();
                        }
                    }
                }
            });
        }
        let mut lat = Vec::new();
        let mut rss20 = 0;
        for i in 0..n {
            let name = format!("p-{i:04}");
            let pod: Pod = serde_json::from_value(serde_json::json!({
                "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                "spec": {"nodeName": "edge-1", "containers": [{"name": "main", "image": image,
                    "imagePullPolicy": "IfNotPresent", "command": ["sleep", "3600"]}]}}))
            .unwrap();
            let t = Instant::now();
            api.create(&PostParams::default(), &pod).await.unwrap();
            loop {
                let wait = notify.notified();
                if let Some(at) = seen.lock().unwrap().get(&name) {
                    lat.push(at.duration_since(t));
                    break;
                }
                assert!(t.elapsed() < Duration::from_secs(30), "{name} never Running");
                let _ = tokio::time::timeout(Duration::from_millis(50), wait).await;
            }
            if i == 19 {
                tokio::time::sleep(Duration::from_secs(5)).await;
                rss20 = rss_kib(edge_pid);
                if let Some((c, _)) = &containerd {
                    let pid = c.pid();
                    let (own, shims) = containerd_rss(c, pid);
                    eprintln!(
                        "with 20 running containers: containerd RSS {:.1} MiB, its 20 shims {:.1} MiB in all",
                        own as f64 / 1024.0,
                        shims as f64 / 1024.0
                    );
                }
            }
        }
        lat.sort();
        let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
        eprintln!(
            "{}: pod create -> Running seen on the cloud ({n} pods, one at a time): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            if cri { "containers (containerd)" } else { "process runtime" },
            pct(0.5).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
            lat.last().unwrap().as_secs_f64() * 1e3,
        );
        eprintln!(
            "edgecore RSS idle: {:.1} MiB with 0 pods, {:.1} MiB with 20 pods, {:.1} MiB with {n} pods",
            rss0 as f64 / 1024.0,
            rss20 as f64 / 1024.0,
            rss_kib(edge_pid) as f64 / 1024.0
        );
    });
    // edgecore stops (its pods with it) before cloudcore; containerd last.
    drop(cluster);
    drop(containerd);
}
