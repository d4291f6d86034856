//! The admin gRPC API and the `keel` CLI: a real `cloudcore` process, the
//! real `keel` binary, the real kubectl, and an edge node (EdgeHub and
//! MetaManager in this process) connected over QUIC. The chain check runs
//! against a log this test alters on disk, served in-process to the real
//! `keel` binary.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use keel_log::{Entry, PayloadKind, Read, ReadLimits, Record, Role, Store, StoreOptions};
use serde_json::Value;

#[path = "support/ports.rs"]
mod ports;
#[path = "support/kubectl.rs"]
mod support;
use ports::{free_port, free_udp_port};
use support::kubectl_bin;

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `keel` with `args`.
fn keel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(args)
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn keel_ok(args: &[&str]) -> String {
    let o = keel(args);
    assert!(
        o.status.success(),
        "keel {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// `keel` that must fail; returns its stderr.
fn keel_fails(args: &[&str]) -> String {
    let o = keel(args);
    assert!(
        !o.status.success(),
        "keel {args:?} should have failed:\n{}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8(o.stderr).unwrap()
}

struct Cloud {
    child: Child,
    dir: tempfile::TempDir,
    kc: String,
    grpc: String,
    hub: String,
    bootstrap: String,
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
        let grpc = format!("127.0.0.1:{}", free_port());
        let hub = format!("127.0.0.1:{}", free_udp_port());
        let bootstrap = format!("127.0.0.1:{}", free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_cloudcore"))
            .args(["run", "--data-dir"])
            .arg(dir.path())
            .args(["--api-addr", "127.0.0.1:0", "--hub-addr", &hub])
            .args(["--bootstrap-addr", &bootstrap, "--grpc-addr", &grpc])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let kc = dir
            .path()
            .join("admin.kubeconfig")
            .to_str()
            .unwrap()
            .to_owned();
        let mut c = Cloud {
            child,
            kc,
            dir,
            grpc,
            hub,
            bootstrap,
        };
        wait_for("cloudcore's admin API", || {
            assert!(c.child.try_wait().unwrap().is_none(), "cloudcore exited");
            c.kubeconfig().exists() && keel(&c.args(&["verify"])).status.success()
        });
        c
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("admin.kubeconfig")
    }

    /// `keel` arguments for this cloudcore, then `rest`.
    fn args<'a>(&'a self, rest: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec!["--kubeconfig", self.kc.as_str(), "--server", &self.grpc];
        v.extend_from_slice(rest);
        v
    }

    fn kubectl(&self, args: &[&str]) -> String {
        let o = Command::new(kubectl_bin())
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .arg("--cache-dir")
            .arg(self.dir.path().join("kube-cache"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    fn apply(&self, path: &Path, yaml: &str) {
        std::fs::write(path, yaml).unwrap();
        self.kubectl(&["apply", "-f", path.to_str().unwrap()]);
    }
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Every record of every stream of the log at `dir`.
fn whole_log(dir: &Path) -> BTreeMap<String, Vec<Record>> {
    let store = Store::open(dir, StoreOptions::default()).unwrap();
    let mut out = BTreeMap::new();
    for st in store.streams() {
        assert_eq!(st.horizon.seq, 0, "cloudcore does not compact");
        let mut records = Vec::new();
        let mut after = 0;
        while after < st.head.seq {
            let Read::Records(seg) = store.read(&st.name, after, ReadLimits::default()).unwrap()
            else {
                panic!("no snapshot expected")
            };
            after = seg.end().seq;
            records.extend(seg.records);
        }
        out.insert(st.name, records);
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn replay_is_the_log_status_tokens_and_only_the_admin_is_served() {
    let c = Cloud::start();
    let node = "edge-a";
    // A join token over the admin API, redeemed by a node.
    let token = keel_ok(&c.args(&["token", "create", node, "-o", "json"]));
    let token: Value = serde_json::from_str(&token).unwrap();
    assert_eq!(token["node"], node);
    let token = token["token"].as_str().unwrap().to_owned();
    let bad = keel_fails(&c.args(&["token", "create", "Not_A_Node"]));
    assert!(bad.contains("invalid request"), "{bad}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let identity = rt
        .block_on(keel_edge::bootstrap::join(
            c.bootstrap.parse().unwrap(),
            &token,
            node,
            edge_dir.path(),
        ))
        .unwrap();
    let store = Store::open(edge_dir.path().join("log"), StoreOptions::default()).unwrap();
    let _in_runtime = rt.enter();
    let meta = keel_edge::meta::MetaManager::open(store.clone(), node).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let hub = {
        let opts = keel_edge::hub::EdgeHubOptions::new(c.hub.parse().unwrap(), node);
        let tls = identity.client_tls_config().unwrap();
        let (store, meta) = (store.clone(), meta.clone());
        rt.spawn(async move {
            keel_edge::hub::run(opts, tls, store, meta, None, async {
                let _ = stop_rx.await;
            })
            .await
        })
    };
    let nodes =
        || -> Value { serde_json::from_str(&keel_ok(&c.args(&["nodes", "-o", "json"]))).unwrap() };
    wait_for("the node connected", || {
        nodes()["nodes"][0]["connected"] == true
    });
    // kubectl writes a pod for the node; the edge reports its status.
    let pod = c.dir.path().join("pod.yaml");
    c.apply(
        &pod,
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  nodeName: {node}\n  containers:\n  - name: app\n    image: i\n"
        ),
    );
    c.kubectl(&["label", "pod", "web", "rev=2"]);
    wait_for("the pod on the edge", || {
        meta.object("pods/default/web")
            .is_some_and(|p| p["metadata"]["labels"]["rev"] == "2")
    });
    meta.update("pods/default/web", |p| {
        p["status"] = serde_json::json!({"phase": "Running"});
    })
    .unwrap();
    wait_for("the status in the cloud", || {
        let pod: Value =
            serde_json::from_str(&c.kubectl(&["get", "pod", "web", "-o", "json"])).unwrap();
        pod["status"]["phase"] == "Running"
    });
    wait_for("everything acknowledged", || {
        let n = nodes();
        let n = &n["nodes"][0];
        n["node"] == node
            && n["connected"] == true
            && n["lastSeen"].is_string()
            && n["down"]["lag"] == 0
            && n["down"]["acked"] == n["down"]["head"]
            && n["up"]["received"].as_u64() >= Some(1)
    });
    let table = keel_ok(&c.args(&["nodes"]));
    let row = table.lines().find(|l| l.starts_with(node)).unwrap();
    assert!(row.contains("yes") && row.contains("now"), "{table}");

    // The audit names the kubectl user and the node.
    let audit: Value =
        serde_json::from_str(&keel_ok(&c.args(&["audit", "pod/web", "-o", "json"]))).unwrap();
    let entries = audit["entries"].as_array().unwrap();
    let by = |origin: &str| entries.iter().filter(|e| e["origin"] == origin).count();
    assert_eq!(by("user:keel-admin"), 2, "{audit}");
    assert_eq!(by(node), 1, "{audit}");
    let status = entries.iter().find(|e| e["origin"] == node).unwrap();
    assert_eq!(status["originKind"], "node");
    assert!(
        status["patch"].as_array().unwrap().iter().any(|op| {
            (op["path"] == "/status/phase" && op["value"] == "Running")
                || (op["path"] == "/status" && op["value"]["phase"] == "Running")
        }),
        "{status}"
    );
    let label = entries
        .iter()
        .find(|e| {
            e["patch"]
                .as_array()
                .unwrap()
                .iter()
                .any(|op| op["path"] == "/metadata/labels/rev" || op["value"]["rev"] == "2")
        })
        .unwrap();
    assert_eq!(label["originKind"], "user");
    assert_eq!(label["origin"], "user:keel-admin");
    assert_eq!(audit["object"]["status"]["phase"], "Running");

    // Replay of everything, and of one object.
    let lines = json_lines(&keel_ok(&c.args(&["replay", "-o", "json"])));
    let one = json_lines(&keel_ok(&c.args(&[
        "replay", "--object", "pod/web", "-s", "cluster", "-o", "json",
    ])));
    let one_records: Vec<&Value> = one.iter().filter(|l| l["type"] == "record").collect();
    assert_eq!(one_records.len(), entries.len());
    assert!(one_records.iter().all(|r| r["key"] == "pods/default/web"));
    let since_future = json_lines(&keel_ok(&c.args(&[
        "replay",
        "--since",
        &u64::MAX.to_string(),
        "-o",
        "json",
    ])));
    assert!(since_future.iter().all(|l| l["type"] == "stream"));

    // Clients without the admin certificate are refused: a node's
    // certificate (from the cluster CA) is denied, no certificate fails
    // the TLS handshake.
    let node_kc = c.dir.path().join("node.kubeconfig");
    keel_cloud::core::write_kubeconfig(
        &node_kc,
        "https://127.0.0.1:1",
        &identity.ca_pem,
        &identity.cert_pem,
        &identity.key_pem,
    )
    .unwrap();
    for cmd in [
        &["nodes"][..],
        &["replay"],
        &["verify"],
        &["token", "create", "x"],
    ] {
        let mut a = vec![
            "--kubeconfig",
            node_kc.to_str().unwrap(),
            "--server",
            &c.grpc,
        ];
        a.extend_from_slice(cmd);
        let e = keel_fails(&a);
        assert!(
            e.contains("refused: only the cluster admin certificate"),
            "{cmd:?}: {e}"
        );
    }
    let anonymous = rt.block_on(async {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&identity.ca_pem))
            .domain_name("127.0.0.1");
        let ch = tonic::transport::Endpoint::from_shared(format!("https://{}", c.grpc))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await;
        match ch {
            Err(e) => Err(e.to_string()),
            Ok(ch) => keel_proto::log_service_client::LogServiceClient::new(ch)
                .verify_chain(keel_proto::VerifyChainRequest::default())
                .await
                .map(|_| ())
                .map_err(|s| s.to_string()),
        }
    });
    assert!(
        anonymous.is_err(),
        "a client without a certificate was served"
    );

    // The edge leaves; the replay is compared with the log on disk.
    let _ = stop_tx.send(());
    rt.block_on(hub).unwrap().unwrap();
    let mut c = c;
    let _ = c.child.kill();
    let _ = c.child.wait();
    let log = whole_log(&c.dir.path().join("log"));
    let mut replayed: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    let mut heads = BTreeMap::new();
    for l in &lines {
        match l["type"].as_str() {
            Some("stream") => {
                heads.insert(
                    l["stream"].as_str().unwrap().to_owned(),
                    l["head"].as_u64().unwrap(),
                );
                assert_eq!(l["from"], 1);
            }
            Some("record") => replayed
                .entry(l["stream"].as_str().unwrap().to_owned())
                .or_default()
                .push(l),
            other => panic!("unexpected line type {other:?}"),
        }
    }
    assert!(heads.contains_key("cluster") && heads.contains_key(&format!("{node}/down")));
    for (stream, head) in &heads {
        let got = replayed.get(stream).map(Vec::as_slice).unwrap_or_default();
        let want = &log[stream];
        assert_eq!(
            got.len() as u64,
            *head,
            "{stream}: the whole stream up to its head"
        );
        assert!(want.len() >= got.len());
        for (g, w) in got.iter().zip(want) {
            use base64::Engine as _;
            assert_eq!(g["seq"], w.seq);
            assert_eq!(g["epoch"], w.epoch);
            assert_eq!(g["hlc"], w.hlc);
            assert_eq!(g["origin"], &*w.origin);
            assert_eq!(g["key"], &*w.key);
            assert_eq!(g["hash"], hex(w.hash.as_bytes()));
            let payload = base64::engine::general_purpose::STANDARD
                .decode(g["payload"].as_str().unwrap())
                .unwrap();
            assert_eq!(payload, w.payload.as_ref(), "{stream} seq {}", w.seq);
        }
    }
    assert_eq!(heads.len(), log.len(), "every stream was replayed");
}

/// A log with three streams, served like cloudcore serves its own (TLS,
/// admin certificate) and like edgecore does (plain, loopback).
#[test]
fn verify_chain_finds_a_record_altered_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = Store::open(dir.path().join("log"), StoreOptions::default()).unwrap();
    for s in ["a/down", "a/up", "cluster"] {
        store.create_stream(s, Role::Writer, 1).unwrap();
        let entries = (0..300)
            .map(|i| {
                Entry::new(
                    "cloudcore",
                    format!("configmaps/default/c{}", i % 7),
                    PayloadKind::Event,
                    format!("event {i}").into_bytes(),
                )
            })
            .collect();
        store.append(s, entries).unwrap();
    }
    let ca = keel_cloud::pki::ClusterCa::load_or_create(dir.path()).unwrap();
    let server = ca.server_cert(&["127.0.0.1"]).unwrap();
    let admin = ca.admin_cert().unwrap();
    let kc = dir.path().join("admin.kubeconfig");
    keel_cloud::core::write_kubeconfig(
        &kc,
        "https://127.0.0.1:1",
        ca.cert_pem(),
        &admin.cert_pem,
        &admin.key_pem,
    )
    .unwrap();
    let (tls_srv, plain_srv) = rt.block_on(async {
        let tls = keel_cloud::pki::api_tls_config(&ca, &server.cert_pem, &server.key_pem).unwrap();
        let log = keel_cloud::grpc::LogApi::new(store.clone(), vec!["cluster".into()]);
        let t = keel_cloud::grpc::GrpcServer::bind_tls(
            "127.0.0.1:0".parse().unwrap(),
            tls,
            log.clone(),
            None,
        )
        .await
        .unwrap();
        let p = keel_cloud::grpc::GrpcServer::bind_plain("127.0.0.1:0".parse().unwrap(), log)
            .await
            .unwrap();
        (t, p)
    });
    let cloud = tls_srv.local_addr().to_string();
    let edge = plain_srv.local_addr().to_string();
    let kc = kc.to_str().unwrap();
    let verify_json = |target: &[&str]| -> (bool, Value) {
        let mut a = target.to_vec();
        a.extend_from_slice(&["verify", "-o", "json"]);
        let o = keel(&a);
        (
            o.status.success(),
            serde_json::from_slice(&o.stdout).unwrap(),
        )
    };
    let cloud_args = ["--kubeconfig", kc, "--server", cloud.as_str()];
    let edge_args = ["--edge", edge.as_str()];
    for t in [&cloud_args[..], &edge_args[..]] {
        let (ok, v) = verify_json(t);
        assert!(ok, "{v}");
        assert_eq!(v["streams"].as_array().unwrap().len(), 3);
        assert!(
            v["streams"]
                .as_array()
                .unwrap()
                .iter()
                .all(|s| s["ok"] == true && s["head"] == 300)
        );
    }
    // Record 137 of a/up gets another payload (same hash), record 42 of
    // cluster bytes that do not decode.
    let mut r = match store.read("a/up", 136, ReadLimits::default()).unwrap() {
        Read::Records(seg) => seg.records.into_iter().next().unwrap(),
        Read::Snapshot { .. } => panic!(),
    };
    assert_eq!(r.seq, 137);
    r.payload = bytes::Bytes::from_static(b"rewritten history");
    store
        .tamper_record("a/up", 137, keel_log::codec::encode_record(&r))
        .unwrap();
    store
        .tamper_record("cluster", 42, b"\x01garbage".to_vec())
        .unwrap();
    for t in [&cloud_args[..], &edge_args[..]] {
        let (ok, v) = verify_json(t);
        assert!(!ok, "a broken chain exits non-zero");
        let s = |name: &str| {
            v["streams"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["stream"] == name)
                .unwrap()
                .clone()
        };
        assert_eq!(s("a/down")["ok"], true);
        assert_eq!(s("a/up")["ok"], false);
        assert_eq!(s("a/up")["firstBadSeq"], 137, "{v}");
        assert_eq!(s("cluster")["firstBadSeq"], 42, "{v}");
    }
    let mut a = cloud_args.to_vec();
    a.push("verify");
    let o = keel(&a);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("a/up at seq 137") && stderr.contains("cluster at seq 42"),
        "{stderr}"
    );
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("a/up") && l.contains("BROKEN") && l.contains("137")),
        "{table}"
    );
    // Replaying across the altered record is an error, not silence.
    let mut a = edge_args.to_vec();
    a.extend_from_slice(&["replay", "-s", "a/up", "--after", "100"]);
    let e = keel_fails(&a);
    assert!(e.contains("seq 137"), "{e}");
    // Bad input gets a clear message.
    let mut a = edge_args.to_vec();
    a.extend_from_slice(&["nodes"]);
    assert!(keel_fails(&a).contains("not served here"));
    let mut a = edge_args.to_vec();
    a.extend_from_slice(&["audit", "web"]);
    assert!(keel_fails(&a).contains("TYPE/NAME"));
    let mut a = edge_args.to_vec();
    a.extend_from_slice(&["replay", "-s", "nope"]);
    assert!(keel_fails(&a).contains("no stream \"nope\""));
    rt.block_on(async {
        tls_srv.shutdown().await;
        plain_srv.shutdown().await;
    });
}

/// Records folded into a snapshot are reported as compacted history: the
/// audit starts from the object's state there, and a replay says where
/// each stream's records begin.
#[test]
fn audit_and_replay_across_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = Store::open(dir.path().join("log"), StoreOptions::default()).unwrap();
    let stream = "n1/down";
    store.create_stream(stream, Role::Writer, 1).unwrap();
    let key = "configmaps/default/conf";
    let mut objects = keel_sync::crdt::ObjectStore::new();
    let actor = keel_sync::crdt::ActorId::from_name("cloudcore");
    for v in 1..=5 {
        let obj = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "conf", "namespace": "default"}, "data": {"v": v.to_string()}});
        let change = objects.edit_replace(key, &actor, &obj).unwrap().unwrap();
        store
            .append(
                stream,
                vec![Entry::new(
                    "user:keel-admin",
                    key,
                    PayloadKind::Change,
                    change,
                )],
            )
            .unwrap();
    }
    store
        .compact(stream, 3, &keel_sync::objects::CrdtFold)
        .unwrap();
    let srv = rt.block_on(async {
        let log = keel_cloud::grpc::LogApi::new(store.clone(), vec![stream.into()]);
        keel_cloud::grpc::GrpcServer::bind_plain("127.0.0.1:0".parse().unwrap(), log)
            .await
            .unwrap()
    });
    let addr = srv.local_addr().to_string();
    let audit: Value = serde_json::from_str(&keel_ok(&[
        "--edge",
        &addr,
        "audit",
        "configmap/conf",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(audit["compacted"][0]["stream"], stream);
    assert_eq!(audit["compacted"][0]["throughSeq"], 3);
    assert_eq!(audit["compacted"][0]["object"]["data"]["v"], "3");
    let entries = audit["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{audit}");
    assert_eq!(entries[0]["seq"], 4);
    assert_eq!(entries[0]["patch"][0]["path"], "/data/v");
    assert_eq!(entries[0]["patch"][0]["value"], "4");
    assert_eq!(entries[1]["originKind"], "user");
    assert_eq!(audit["object"]["data"]["v"], "5");
    let table = keel_ok(&["--edge", &addr, "audit", "configmap/conf"]);
    assert!(
        table.contains("history before seq 4 of n1/down compacted"),
        "{table}"
    );
    let lines = json_lines(&keel_ok(&["--edge", &addr, "replay", "-o", "json"]));
    assert_eq!(lines[0]["horizon"], 3);
    assert_eq!(lines[0]["from"], 4);
    let seqs: Vec<u64> = lines[1..]
        .iter()
        .map(|l| l["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [4, 5]);
    rt.block_on(srv.shutdown());
}

/// `keel tail` prints records as they are appended, including those of a
/// stream created after it started.
#[test]
fn tail_follows_appends() {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = Store::open(dir.path().join("log"), StoreOptions::default()).unwrap();
    store.create_stream("s1", Role::Writer, 1).unwrap();
    let event = |i: u32| Entry::new("n1", "events/default/e", PayloadKind::Event, i.to_string());
    store.append("s1", vec![event(1)]).unwrap();
    let srv = rt.block_on(async {
        let log = keel_cloud::grpc::LogApi::new(store.clone(), vec![]);
        keel_cloud::grpc::GrpcServer::bind_plain("127.0.0.1:0".parse().unwrap(), log)
            .await
            .unwrap()
    });
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args([
            "--edge",
            &srv.local_addr().to_string(),
            "tail",
            "-o",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(serde_json::from_str(&line).unwrap()).is_err() {
                return;
            }
        }
    });
    let next = || rx.recv_timeout(Duration::from_secs(30)).unwrap();
    // The header of s1 comes first: the tail starts at its head (seq 1).
    let h = next();
    assert_eq!(
        (h["type"].as_str(), h["stream"].as_str()),
        (Some("stream"), Some("s1"))
    );
    store.append("s1", vec![event(2), event(3)]).unwrap();
    let seqs: Vec<u64> = (0..2).map(|_| next()["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [2, 3], "only what was appended after the start");
    store.create_stream("s2", Role::Writer, 1).unwrap();
    store.append("s2", vec![event(4)]).unwrap();
    let h = next();
    assert_eq!(
        (h["type"].as_str(), h["stream"].as_str()),
        (Some("stream"), Some("s2"))
    );
    let r = next();
    assert_eq!(
        (r["stream"].as_str(), r["seq"].as_u64()),
        (Some("s2"), Some(1))
    );
    let _ = child.kill();
    let _ = child.wait();
    rt.block_on(srv.shutdown());
}

/// An edge node in this process: joined, then EdgeHub running.
struct TestEdge {
    dir: tempfile::TempDir,
    identity: keel_edge::bootstrap::NodeIdentity,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestEdge {
    fn join_and_run(rt: &tokio::runtime::Runtime, c: &Cloud, node: &str, token: &str) -> TestEdge {
        let dir = tempfile::tempdir().unwrap();
        let identity = rt
            .block_on(keel_edge::bootstrap::join(
                c.bootstrap.parse().unwrap(),
                token,
                node,
                dir.path(),
            ))
            .unwrap();
        let store = Store::open(dir.path().join("log"), StoreOptions::default()).unwrap();
        let _in_runtime = rt.enter();
        let meta = keel_edge::meta::MetaManager::open(store.clone(), node).unwrap();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let opts = keel_edge::hub::EdgeHubOptions::new(c.hub.parse().unwrap(), node);
        let tls = identity.client_tls_config().unwrap();
        rt.spawn(async move {
            keel_edge::hub::run(opts, tls, store, meta, None, async {
                let _ = stop_rx.await;
            })
            .await
        });
        TestEdge {
            dir,
            identity,
            stop: Some(stop),
        }
    }
}

impl Drop for TestEdge {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

#[test]
fn revoking_a_node_closes_its_connection_and_keeps_it_out() {
    let c = Cloud::start();
    let token = |node: &str| -> String {
        let t: Value =
            serde_json::from_str(&keel_ok(&c.args(&["token", "create", node, "-o", "json"])))
                .unwrap();
        t["token"].as_str().unwrap().to_owned()
    };
    let connected = |node: &str| -> bool {
        let n: Value = serde_json::from_str(&keel_ok(&c.args(&["nodes", "-o", "json"]))).unwrap();
        n["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["node"] == node && n["connected"] == true)
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a = TestEdge::join_and_run(&rt, &c, "edge-a", &token("edge-a"));
    let b = TestEdge::join_and_run(&rt, &c, "edge-b", &token("edge-b"));
    // A token for edge-a nobody used yet: revoking edge-a deletes it.
    let spare = token("edge-a");
    wait_for("both nodes connected", || {
        connected("edge-a") && connected("edge-b")
    });

    let started = Instant::now();
    let out: Value = serde_json::from_str(&keel_ok(
        &c.args(&["node", "revoke", "edge-a", "-o", "json"]),
    ))
    .unwrap();
    assert_eq!(out["node"], "edge-a");
    assert_eq!(out["disconnected"], true, "{out}");
    assert_eq!(out["tokensDeleted"], 1, "{out}");
    let serials: Vec<&str> = out["revokedSerials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(serials, [a.identity.serial.as_str()], "{out}");
    // Closed at once (not by QUIC's 90 s idle timeout); the deadline is
    // only generous for slow machines.
    wait_for("edge-a disconnected", || !connected("edge-a"));
    let closed_after = started.elapsed();
    println!("edge-a's connection closed {closed_after:?} after `keel node revoke` started");
    assert!(closed_after < Duration::from_secs(30), "{closed_after:?}");

    // It keeps trying (back-off from 200 ms) and is refused at every
    // handshake; edge-b stays connected throughout.
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(5) {
        assert!(!connected("edge-a"), "the revoked node reconnected");
        assert!(connected("edge-b"), "the other node was disconnected");
        std::thread::sleep(Duration::from_millis(250));
    }
    // Persisted for the next start.
    let revoked = std::fs::read_to_string(c.dir.path().join("pki").join("revoked")).unwrap();
    assert!(revoked.lines().any(|l| l == a.identity.serial), "{revoked}");

    // It cannot renew, nor join with the token it was given before.
    let bootstrap = c.bootstrap.parse().unwrap();
    match rt
        .block_on(keel_edge::bootstrap::renew(bootstrap, a.dir.path()))
        .unwrap_err()
    {
        keel_edge::Error::Tls { source, .. } => assert_eq!(
            source,
            rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRevoked)
        ),
        other => panic!("expected a TLS refusal, got {other}"),
    }
    let again = tempfile::tempdir().unwrap();
    match rt
        .block_on(keel_edge::bootstrap::join(
            bootstrap,
            &spare,
            "edge-a",
            again.path(),
        ))
        .unwrap_err()
    {
        keel_edge::Error::Refused { status, code, .. } => {
            assert_eq!((status, code.as_str()), (401, "token_unknown"));
        }
        other => panic!("expected the old token refused, got {other}"),
    }
    // Names keel keeps for itself cannot be given a token; a bad name
    // cannot be revoked.
    let e = keel_fails(&c.args(&["token", "create", "cloudcore"]));
    assert!(e.contains("reserved"), "{e}");
    let e = keel_fails(&c.args(&["node", "revoke", "Not_A_Node"]));
    assert!(e.contains("invalid"), "{e}");

    // The admin lets it back in with a new token: a new certificate, a
    // new connection.
    drop(a);
    let back = TestEdge::join_and_run(&rt, &c, "edge-a", &token("edge-a"));
    wait_for("edge-a back with a new certificate", || connected("edge-a"));
    assert!(connected("edge-b"));
    drop(back);
    drop(b);
}
