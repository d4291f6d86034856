//! The kube crate's own client against a real `cloudcore` process: list
//! with selectors, watch, and a reflector kept in step with changes.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::json;

struct Cloud {
    child: Child,
    _dir: tempfile::TempDir,
    kubeconfig: std::path::PathBuf,
}

impl Drop for Cloud {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn port(udp: bool) -> u16 {
    if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }
}

fn start() -> Cloud {
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_cloudcore"))
        .args(["run", "--no-grpc", "--data-dir"])
        .arg(dir.path())
        .args(["--api-addr", "127.0.0.1:0"])
        .args(["--hub-addr", &format!("127.0.0.1:{}", port(true))])
        .args(["--bootstrap-addr", &format!("127.0.0.1:{}", port(false))])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let kubeconfig = dir.path().join("admin.kubeconfig");
    let t = Instant::now();
    while !kubeconfig.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "cloudcore did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    Cloud {
        child,
        _dir: dir,
        kubeconfig,
    }
}

async fn client(c: &Cloud) -> kube::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kc = Kubeconfig::read_from(&c.kubeconfig).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    kube::Client::try_from(cfg).unwrap()
}

fn pod(name: &str, app: &str) -> Pod {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {"nodeName": "edge-1", "containers": [{"name": "c", "image": "i"}]}}))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_watch_and_reflector() {
    let cloud = start();
    let client = client(&cloud).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for (n, app) in [("a", "web"), ("b", "web"), ("c", "db")] {
        let created = pods
            .create(&PostParams::default(), &pod(n, app))
            .await
            .unwrap();
        assert!(created.metadata.uid.is_some());
        assert!(created.metadata.resource_version.is_some());
    }
    // List with a label selector and a field selector.
    let web = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap();
    let mut names: Vec<String> = web
        .items
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    names.sort();
    assert_eq!(names, ["a", "b"]);
    let on_node = pods
        .list(&ListParams::default().fields("spec.nodeName=edge-1,metadata.name=c"))
        .await
        .unwrap();
    assert_eq!(on_node.items.len(), 1);
    let rv = web.metadata.resource_version.clone().unwrap();

    // A raw watch from the list's resourceVersion sees a status change.
    let mut stream = pods
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    pods.patch_status(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running"}})),
    )
    .await
    .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), stream.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match ev {
        WatchEvent::Modified(p) => {
            assert_eq!(p.metadata.name.as_deref(), Some("a"));
            assert_eq!(p.status.unwrap().phase.as_deref(), Some("Running"));
        }
        other => panic!("expected MODIFIED, got {other:?}"),
    }

    // A reflector follows creates and deletes.
    let (reader, writer) = reflector::store::<Pod>();
    let rf = reflector(writer, watcher(pods.clone(), watcher::Config::default()))
        .applied_objects()
        .for_each(|_| futures::future::ready(()));
    let task = tokio::spawn(rf);
    reader.wait_until_ready().await.unwrap();
    assert_eq!(reader.state().len(), 3);
    pods.create(&PostParams::default(), &pod("d", "web"))
        .await
        .unwrap();
    pods.delete("c", &DeleteParams::default()).await.unwrap();
    let t = Instant::now();
    loop {
        let mut names: Vec<String> = reader
            .state()
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        names.sort();
        if names == ["a", "b", "d"] {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "reflector saw {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    task.abort();

    // Typed errors: a missing object is a 404 Status.
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    match cms.get("missing").await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 404);
            assert_eq!(s.reason, "NotFound");
        }
        other => panic!("expected a 404, got {other:?}"),
    }
}
