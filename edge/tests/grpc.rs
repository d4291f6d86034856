//! The `keel` CLI against real processes: a `cloudcore` (admin gRPC over
//! TLS) and an `edgecore` (log gRPC on loopback) running a real pod, with
//! edits made by the real kubectl. The audit of the pod shows the kubectl
//! user's edits and the edge's status changes, on both sides.
//!
//! cloudcore and keel are the binaries built next to edgecore (`cargo test
//! --workspace` builds them; with `-p keel-edge` alone build them first:
//! `cargo build -p keel-cloud --bins`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

#[path = "support/cluster.rs"]
mod cluster;
#[path = "../../cloud/tests/support/kubectl.rs"]
mod support;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use cluster::{Proc, free_port, free_udp_port, kubectl, ok, run, wait_for};
use serde_json::Value;

fn sibling(name: &str) -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_edgecore")).with_file_name(name);
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, or `cargo build -p keel-cloud --bins` first",
        bin.display()
    );
    bin
}

struct Cluster {
    dir: PathBuf,
    grpc: String,
}

impl Cluster {
    fn kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> String {
        ok(
            kubectl(
                &self.kubeconfig(),
                &self.dir.join("kube-cache"),
                args,
                stdin,
            ),
            &format!("kubectl {args:?}"),
        )
    }

    fn keel(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(sibling("keel"));
        cmd.arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(["--server", &self.grpc])
            .args(args);
        run(&mut cmd, None)
    }

    fn keel_json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&ok(self.keel(&a), &format!("keel {args:?}"))).unwrap()
    }
}

fn keel_edge(addr: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(sibling("keel"));
    cmd.args(["--edge", addr]).args(args);
    run(&mut cmd, None)
}

fn origins(audit: &Value, stream: Option<&str>) -> Vec<(String, String)> {
    audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| stream.is_none_or(|s| e["stream"] == s))
        .map(|e| {
            (
                e["origin"].as_str().unwrap().to_owned(),
                e["originKind"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Whether an audit entry set `/status/phase` (or all of `/status`) to `phase`.
fn sets_phase(e: &Value, phase: &str) -> bool {
    e["patch"].as_array().unwrap().iter().any(|op| {
        (op["path"] == "/status/phase" && op["value"] == phase)
            || (op["path"] == "/status" && op["value"]["phase"] == phase)
    })
}

#[test]
fn audit_of_a_running_pod_on_cloud_and_edge() {
    let tmp = tempfile::tempdir().unwrap();
    let node = "edge-1";
    let c = Cluster {
        dir: tmp.path().join("cloud"),
        grpc: format!("127.0.0.1:{}", free_port()),
    };
    let hub = format!("127.0.0.1:{}", free_udp_port());
    let bootstrap = format!("127.0.0.1:{}", free_port());
    let _cloud = Proc(Some(
        Command::new(sibling("cloudcore"))
            .args(["run", "--data-dir"])
            .arg(&c.dir)
            .args(["--api-addr", "127.0.0.1:0", "--hub-addr", &hub])
            .args(["--bootstrap-addr", &bootstrap, "--grpc-addr", &c.grpc])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(tmp.path().join("cloudcore.log")).unwrap())
            .spawn()
            .unwrap(),
    ));
    wait_for("cloudcore's admin API", Duration::from_secs(60), || {
        c.kubeconfig().exists() && c.keel(&["verify"]).status.success()
    });
    let token = ok(c.keel(&["token", "create", node]), "keel token create");
    let edge_dir = tmp.path().join(node);
    let edge_grpc = format!("127.0.0.1:{}", free_port());
    let _edge = Proc(Some(
        Command::new(env!("CARGO_BIN_EXE_edgecore"))
            .args(["run", "--data-dir"])
            .arg(&edge_dir)
            .args(["--cloud-hub", &hub, "--cloud-bootstrap", &bootstrap])
            .args(["--api-addr", &format!("127.0.0.1:{}", free_port())])
            .args(["--grpc-addr", &edge_grpc, "--token", token.trim()])
            .args(["--mqtt-addr", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(tmp.path().join("edgecore.log")).unwrap())
            .spawn()
            .unwrap(),
    ));
    wait_for("the node connected", Duration::from_secs(60), || {
        let n = c.keel_json(&["nodes"]);
        n["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["node"] == node && n["connected"] == true)
    });
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  nodeName: {node}\n  containers:\n  - name: main\n    image: busybox\n    command: [\"/bin/sh\", \"-c\", \"exec sleep 3600\"]\n"
    );
    c.kubectl(&["apply", "-f", "-"], Some(&pod));
    wait_for(
        "the pod Running in the cloud",
        Duration::from_secs(60),
        || {
            let p: Value =
                serde_json::from_str(&c.kubectl(&["get", "pod", "web", "-o", "json"], None))
                    .unwrap();
            p["status"]["phase"] == "Running"
        },
    );
    c.kubectl(&["label", "pod", "web", "tier=front"], None);

    // The cloud's audit: kubectl's create and label as the admin user, the
    // edge's status changes as the node.
    let cloud = c.keel_json(&["audit", "pod/web"]);
    let o = origins(&cloud, None);
    assert!(
        o.iter()
            .filter(|(who, kind)| who == "user:keel-admin" && kind == "user")
            .count()
            >= 2,
        "{cloud}"
    );
    assert!(
        o.iter().any(|(who, kind)| who == node && kind == "node"),
        "{cloud}"
    );
    let entries = cloud["entries"].as_array().unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e["origin"] == node && sets_phase(e, "Running")),
        "{cloud}"
    );
    assert!(entries.iter().any(|e| e["origin"] == "user:keel-admin"
        && e["patch"].as_array().unwrap().iter().any(|op| {
            op["path"] == "/metadata/labels/tier" || op["value"]["tier"] == "front"
        })));
    let table = ok(c.keel(&["audit", "pod/web"]), "keel audit");
    assert!(table.starts_with("pods/default/web"), "{table}");
    assert!(
        table.contains("user user:keel-admin") && table.contains(&format!("node {node}")),
        "{table}"
    );

    // The edge's audit, from its own log: what it was sent on down, what
    // it reported on up.
    wait_for("the label on the edge", Duration::from_secs(60), || {
        let o = keel_edge(&edge_grpc, &["audit", "pod/web", "-o", "json"]);
        o.status.success()
            && serde_json::from_slice::<Value>(&o.stdout).unwrap()["object"]["metadata"]["labels"]["tier"]
                == "front"
    });
    let edge: Value =
        serde_json::from_slice(&keel_edge(&edge_grpc, &["audit", "pod/web", "-o", "json"]).stdout)
            .unwrap();
    let up = origins(&edge, Some(&format!("{node}/up")));
    assert!(
        !up.is_empty() && up.iter().all(|(who, _)| who == node),
        "{edge}"
    );
    // The create (its first binding) and the label, by the kubectl user.
    let down = origins(&edge, Some(&format!("{node}/down")));
    assert!(
        down.iter()
            .filter(|(who, _)| who == "user:keel-admin")
            .count()
            >= 2,
        "{edge}"
    );
    assert!(
        edge["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["stream"] == format!("{node}/up") && sets_phase(e, "Running")),
        "{edge}"
    );
    // The edge's chains verify; replay shows both streams; cluster-wide
    // calls are cloudcore's.
    let v: Value = serde_json::from_str(&ok(
        keel_edge(&edge_grpc, &["verify", "-o", "json"]),
        "verify",
    ))
    .unwrap();
    let streams = v["streams"].as_array().unwrap();
    assert_eq!(streams.len(), 2, "{v}");
    assert!(streams.iter().all(|s| s["ok"] == true), "{v}");
    let replay = ok(
        keel_edge(&edge_grpc, &["replay", "--kind", "pods", "-o", "json"]),
        "replay",
    );
    let lines: Vec<Value> = replay
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        lines
            .iter()
            .filter(|l| l["type"] == "record")
            .all(|l| l["key"] == "pods/default/web")
    );
    assert!(
        lines
            .iter()
            .any(|l| l["type"] == "record" && l["stream"] == format!("{node}/up"))
    );
    let e = keel_edge(&edge_grpc, &["nodes"]);
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("not served here"));
}
