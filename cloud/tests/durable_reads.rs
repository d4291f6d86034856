//! Durable reads against a real `cloudcore` process and the kube crate's
//! client: while writers create objects, readers list, get and watch; the
//! process is SIGKILLed at a random moment. No reader may have seen a
//! resourceVersion (or an object at one) that the log does not hold once
//! it is reopened: everything served was durable.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;

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

struct Cloud {
    child: Child,
    dir: tempfile::TempDir,
    args: Vec<String>,
}

impl Drop for Cloud {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Cloud {
    fn start() -> Cloud {
        let dir = tempfile::tempdir().unwrap();
        let args = vec![
            "--api-addr".to_owned(),
            format!("127.0.0.1:{}", port(false)),
            "--hub-addr".to_owned(),
            format!("127.0.0.1:{}", port(true)),
            "--bootstrap-addr".to_owned(),
            format!("127.0.0.1:{}", port(false)),
        ];
        let child = Self::spawn(dir.path(), &args);
        let c = Cloud { child, dir, args };
        c.wait_up();
        c
    }

    fn spawn(dir: &std::path::Path, args: &[String]) -> Child {
        Command::new(env!("CARGO_BIN_EXE_cloudcore"))
            .args(["run", "--no-grpc", "--data-dir"])
            .arg(dir)
            .args(args)
            // A slow disk: the moment between a change and its fsync is
            // long enough that the SIGKILL often lands in it.
            .env("KEEL_FAULT_SLOW_FSYNC_MS", "30")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    fn wait_up(&self) {
        let addr: std::net::SocketAddr = self.args[1].parse().unwrap();
        let t = Instant::now();
        while !(self.dir.path().join("admin.kubeconfig").exists()
            && std::net::TcpStream::connect(addr).is_ok())
        {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "cloudcore did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn restart(&mut self) {
        self.child = Self::spawn(self.dir.path(), &self.args);
        self.wait_up();
    }

    fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    async fn client(&self) -> kube::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kc = Kubeconfig::read_from(self.dir.path().join("admin.kubeconfig")).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .unwrap();
        kube::Client::try_from(cfg).unwrap()
    }
}

/// What readers saw: (name, resourceVersion) of objects, and the
/// resourceVersions of lists.
#[derive(Default)]
struct Seen {
    objects: BTreeSet<(String, u64)>,
    lists: BTreeSet<u64>,
}

fn rv_of(cm: &ConfigMap) -> (String, u64) {
    (
        cm.metadata.name.clone().unwrap(),
        cm.metadata
            .resource_version
            .as_deref()
            .unwrap()
            .parse()
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reader_sees_what_a_sigkill_loses() {
    let mut cloud = Cloud::start();
    let mut checked = 0;
    for round in 0..3 {
        let client = cloud.client().await;
        let cms: Api<ConfigMap> = Api::namespaced(client, "default");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut tasks = Vec::new();
        // Writers.
        for w in 0..2 {
            let cms = cms.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    let cm: ConfigMap = serde_json::from_value(json!({
                        "metadata": {"name": format!("r{round}-w{w}-{i}")},
                        "data": {"i": i.to_string()}}))
                    .unwrap();
                    if cms.create(&PostParams::default(), &cm).await.is_err() {
                        return;
                    }
                }
            }));
        }
        // A lister and getter.
        {
            let cms = cms.clone();
            let seen = seen.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok(list) = cms.list(&ListParams::default()).await else {
                        return;
                    };
                    let newest = list.items.iter().map(rv_of).max_by_key(|(_, rv)| *rv);
                    {
                        let mut s = seen.lock().unwrap();
                        s.lists.insert(
                            list.metadata
                                .resource_version
                                .as_deref()
                                .unwrap()
                                .parse()
                                .unwrap(),
                        );
                        s.objects.extend(list.items.iter().map(rv_of));
                    }
                    if let Some((name, _)) = newest {
                        match cms.get(&name).await {
                            Ok(cm) => {
                                seen.lock().unwrap().objects.insert(rv_of(&cm));
                            }
                            Err(_) => return,
                        }
                    }
                }
            }));
        }
        // A watcher.
        {
            let cms = cms.clone();
            let seen = seen.clone();
            tasks.push(tokio::spawn(async move {
                let Ok(stream) = cms.watch(&WatchParams::default(), "0").await else {
                    return;
                };
                let mut stream = stream.boxed();
                while let Some(Ok(ev)) = stream.next().await {
                    if let WatchEvent::Added(cm) | WatchEvent::Modified(cm) = ev {
                        seen.lock().unwrap().objects.insert(rv_of(&cm));
                    }
                }
            }));
        }
        // A moment that differs from round to round.
        tokio::time::sleep(Duration::from_millis(700 + 250 * round)).await;
        cloud.kill9();
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
        }
        // The log as recovery finds it.
        let store = keel_log::Store::open(
            cloud.dir.path().join("log"),
            keel_log::StoreOptions::default(),
        )
        .unwrap();
        let head = store.info("cluster").unwrap().head.seq;
        let seen = std::mem::take(&mut *seen.lock().unwrap());
        assert!(
            !seen.objects.is_empty() && !seen.lists.is_empty(),
            "round {round}: readers saw nothing"
        );
        for rv in &seen.lists {
            assert!(
                *rv <= head,
                "round {round}: a list at {rv}, the log ends at {head}"
            );
        }
        for (name, rv) in &seen.objects {
            assert!(
                *rv <= head,
                "round {round}: {name} seen at {rv}, the log ends at {head}"
            );
            let keel_log::Read::Records(seg) = store
                .read("cluster", rv - 1, keel_log::ReadLimits::default())
                .unwrap()
            else {
                panic!("no compaction here");
            };
            let r = seg.records.first().unwrap();
            assert_eq!(r.seq, *rv);
            assert_eq!(
                r.key,
                format!("configmaps/default/{name}"),
                "round {round}: record {rv} is not {name}'s"
            );
            checked += 1;
        }
        drop(store);
        cloud.restart();
    }
    assert!(checked > 30, "only {checked} observations checked");
}
