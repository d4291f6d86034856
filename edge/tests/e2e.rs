//! End to end, with real processes: a `cloudcore` and two `edgecore`s on
//! loopback, each its own OS process, and the real kubectl against both the
//! cloud and an edge's read-only API. Recovery is tested with SIGKILL.
//!
//! cloudcore is the binary built next to edgecore (`cargo test --workspace`
//! builds both; with `-p keel-edge` alone build it first:
//! `cargo build -p keel-cloud --bin cloudcore`).

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

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cluster::*;
use serde_json::Value;

fn pod_yaml(name: &str, node: &str, script: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels:\n    app: demo\nspec:\n  nodeName: {node}\n  containers:\n  - name: main\n    image: busybox\n    command: [\"/bin/sh\", \"-c\", {script:?}]\n"
    )
}

fn pid_of(pod: &Value) -> Option<u32> {
    pod["status"]["containerStatuses"][0]["containerID"]
        .as_str()?
        .strip_prefix("process://")?
        .parse()
        .ok()
}

fn restarts(pod: &Value) -> u64 {
    pod["status"]["containerStatuses"][0]["restartCount"]
        .as_u64()
        .unwrap_or(0)
}

fn phase(pod: &Value) -> &str {
    pod["status"]["phase"].as_str().unwrap_or("")
}

fn cloud_pod(cloud: &Cloud, name: &str) -> Value {
    serde_json::from_str(&ok(cloud.k(&["get", "pod", name, "-o", "json"]), "get pod")).unwrap()
}

#[test]
fn pods_run_on_their_edge_and_survive_outages() {
    let tmp = tempfile::tempdir().unwrap();
    eprintln!("state and logs in {}", tmp.path().display());
    let mut cloud = Cloud::start(&tmp.path().join("cloud"), None, None, None);
    let mut a = Edge::start(
        &tmp.path().join("edge-a"),
        "edge-a",
        &cloud,
        Some(cloud.token("edge-a")),
        None,
    );
    let b = Edge::start(
        &tmp.path().join("edge-b"),
        "edge-b",
        &cloud,
        Some(cloud.token("edge-b")),
        None,
    );

    // Both nodes appear Ready, with the host's capacity reported.
    wait_for("two Ready nodes", Duration::from_secs(30), || {
        let out = String::from_utf8_lossy(&cloud.k(&["get", "nodes"]).stdout).into_owned();
        ["edge-a", "edge-b"].iter().all(|n| {
            out.lines()
                .any(|l| l.starts_with(n) && l.contains(" Ready"))
        })
    });
    wait_for("node capacity", Duration::from_secs(30), || {
        let n: Value =
            serde_json::from_slice(&cloud.k(&["get", "node", "edge-a", "-o", "json"]).stdout)
                .unwrap_or(Value::Null);
        n["status"]["capacity"]["cpu"].is_string() && n["status"]["nodeInfo"]["bootID"].is_string()
    });

    // A pod for each edge, with a configmap file and env; each runs on its own edge.
    ok(
        kubectl(
            &cloud.kubeconfig(),
            &tmp.path().join("kc"),
            &["apply", "-f", "-"],
            Some(
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: conf\ndata:\n  greeting: hello\n",
            ),
        ),
        "apply configmap",
    );
    let counter = pod_yaml(
        "counter",
        "edge-a",
        "i=0; while true; do i=$((i+1)); echo \"$GREETING $i\"; sleep 0.2; done",
    )
    .replace(
        "    command:",
        "    env:\n    - name: GREETING\n      valueFrom:\n        configMapKeyRef: {name: conf, key: greeting}\n    command:",
    );
    ok(
        kubectl(
            &cloud.kubeconfig(),
            &tmp.path().join("kc"),
            &["apply", "-f", "-"],
            Some(&counter),
        ),
        "apply counter",
    );
    ok(
        kubectl(
            &cloud.kubeconfig(),
            &tmp.path().join("kc"),
            &["apply", "-f", "-"],
            Some(&pod_yaml("sleeper", "edge-b", "exec sleep 3600")),
        ),
        "apply sleeper",
    );
    wait_for(
        "both pods Running on the cloud",
        Duration::from_secs(30),
        || {
            ["counter", "sleeper"]
                .iter()
                .all(|p| phase(&cloud_pod(&cloud, p)) == "Running")
        },
    );
    let wide = ok(cloud.k(&["get", "pods", "-o", "wide"]), "get pods -o wide");
    assert!(
        wide.lines()
            .any(|l| l.starts_with("counter") && l.contains("Running") && l.contains("edge-a")),
        "{wide}"
    );
    assert!(
        wide.lines()
            .any(|l| l.starts_with("sleeper") && l.contains("Running") && l.contains("edge-b")),
        "{wide}"
    );
    // Each edge holds only its own pod.
    assert!(a.pod("counter").is_some() && a.pod("sleeper").is_none());
    assert!(b.pod("sleeper").is_some() && b.pod("counter").is_none());
    // kubectl logs against the edge reads the container's output.
    wait_for("log lines", Duration::from_secs(10), || {
        String::from_utf8_lossy(&a.k(&["logs", "counter"]).stdout).contains("hello 3")
    });
    let tail = ok(a.k(&["logs", "counter", "--tail=1"]), "logs --tail");
    assert_eq!(tail.lines().count(), 1, "{tail}");
    // The edge's API is read-only.
    let o = a.k(&["delete", "pod", "counter"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("read-only"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // The cloud goes away (SIGKILL). A pod's process is killed: the edge restarts it.
    cloud.proc.kill9();
    let pod = a.pod("counter").unwrap();
    let (pid, before) = (pid_of(&pod).unwrap(), restarts(&pod));
    ok(
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .output()
            .unwrap(),
        "kill container",
    );
    wait_for(
        "the container restarted offline",
        Duration::from_secs(30),
        || {
            let p = a.pod("counter").unwrap();
            restarts(&p) == before + 1
                && phase(&p) == "Running"
                && pid_of(&p).is_some_and(|n| n != pid)
        },
    );
    // kubectl works against the offline edge.
    let listed = ok(a.k(&["get", "pods", "-o", "wide"]), "get pods on the edge");
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("counter") && l.contains("Running") && l.contains("edge-a")),
        "{listed}"
    );
    let described = ok(
        a.k(&["describe", "pod", "counter"]),
        "describe pod on the edge",
    );
    assert!(
        described.contains("Node:") && described.contains("edge-a"),
        "{described}"
    );
    let node = ok(a.k(&["get", "node", "edge-a"]), "get node on the edge");
    assert!(node.contains("edge-a"), "{node}");
    let previous = ok(a.k(&["logs", "counter", "--previous"]), "logs --previous");
    assert!(previous.contains("hello 1"), "{previous}");

    // edgecore is SIGKILLed and restarted while the cloud is still down: the pod comes back.
    let pid = pid_of(&a.pod("counter").unwrap()).unwrap();
    a.proc.kill9();
    let api = a.api.clone();
    a = Edge::start(
        &tmp.path().join("edge-a"),
        "edge-a",
        &cloud,
        None,
        Some(api),
    );
    wait_for(
        "the pod back after the edge restart",
        Duration::from_secs(30),
        || {
            a.pod("counter")
                .is_some_and(|p| phase(&p) == "Running" && pid_of(&p).is_some_and(|n| n != pid))
        },
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z ")),
        "the container of the killed edgecore was not left running twice"
    );
    let offline = a.pod("counter").unwrap();
    let offline_restarts = restarts(&offline);
    assert!(offline_restarts > before);

    // cloudcore comes back on the same addresses: every status change made offline arrives.
    let (api, hub, bootstrap) = (
        cloud.api.clone(),
        cloud.hub.clone(),
        cloud.bootstrap.clone(),
    );
    let dir = cloud.dir.clone();
    drop(cloud);
    let cloud = Cloud::start(&dir, Some(api), Some(hub), Some(bootstrap));
    wait_for(
        "the offline status on the cloud",
        Duration::from_secs(60),
        || {
            let p = cloud_pod(&cloud, "counter");
            restarts(&p) == offline_restarts && pid_of(&p) == pid_of(&offline)
        },
    );
    // edge-b, idle, reconnects too: the restarted cloudcore recognises the
    // connection IDs its predecessor issued (keyed from the persisted
    // reset secret) and answers edge-b's next keep-alive with a stateless
    // reset, rather than leaving it to QUIC's 90 s idle timeout.
    wait_for("both nodes Ready again", Duration::from_secs(150), || {
        let out = String::from_utf8_lossy(&cloud.k(&["get", "nodes"]).stdout).into_owned();
        ["edge-a", "edge-b"].iter().all(|n| {
            out.lines()
                .any(|l| l.starts_with(n) && l.contains(" Ready"))
        })
    });
    let log = std::fs::read_to_string(tmp.path().join("edge-b").join("edgecore.log")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("disconnected from cloudcore") && l.contains("reset by peer")),
        "edge-b learnt of the restart from a stateless reset:\n{log}"
    );
    let sleeper = cloud_pod(&cloud, "sleeper");
    assert_eq!(phase(&sleeper), "Running");
    let wide = ok(cloud.k(&["get", "pods", "-o", "wide"]), "get pods");
    assert!(
        wide.contains("counter") && wide.contains("sleeper"),
        "{wide}"
    );

    // Deleting a pod on the cloud stops its process on the edge.
    let pid = pid_of(&b.pod("sleeper").unwrap()).unwrap();
    ok(cloud.k(&["delete", "pod", "sleeper"]), "delete pod");
    wait_for(
        "the pod gone from the edge",
        Duration::from_secs(30),
        || b.pod("sleeper").is_none(),
    );
    wait_for("the process gone", Duration::from_secs(30), || {
        !Path::new(&format!("/proc/{pid}")).exists()
    });
    drop(b);
    // None lost, in order: once both have stopped, the cloud's replica of
    // edge-a's up stream is the edge's stream, record for record (same
    // head seq and chain hash).
    wait_for("the cloud to catch up", Duration::from_secs(30), || {
        let p = cloud_pod(&cloud, "counter");
        let e = a.pod("counter").unwrap();
        p["status"] == e["status"]
    });
    a.proc.stop();
    let mut cloud = cloud;
    cloud.proc.stop();
    let open = |p: PathBuf| keel_log::Store::open(p, keel_log::StoreOptions::default()).unwrap();
    let edge_up = open(tmp.path().join("edge-a").join("log"))
        .info("edge-a/up")
        .unwrap()
        .head;
    let cloud_up = open(dir.join("log")).info("edge-a/up").unwrap().head;
    assert!(edge_up.seq > 0);
    assert_eq!(
        edge_up, cloud_up,
        "the cloud holds every record edge-a wrote"
    );
}

/// A process-runtime pod runs as the unprivileged `nobody` unless its
/// securityContext says otherwise, owns its directory and volumes, and
/// cannot read the node's private key, its local log or its containers'
/// logs.
#[test]
fn process_pods_run_unprivileged_and_keep_out_of_the_node() {
    let tmp = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(&tmp.path().join("cloud"), None, None, None);
    let data = tmp.path().join("edge-1");
    let _edge = Edge::start(&data, "edge-1", &cloud, Some(cloud.token("edge-1")), None);
    let d = data.display();
    let probe = format!(
        "id -u; id -g; \
         cat {d}/pki/node.key >/dev/null 2>&1 && echo key-READ || echo key-denied; \
         ls {d}/log >/dev/null 2>&1 && echo log-LISTED || echo log-denied; \
         ls {d}/pods/logs >/dev/null 2>&1 && echo logs-LISTED || echo logs-denied; \
         cat sec/token && echo; touch mine && echo home-writable; \
         exec sleep 3600"
    );
    let yaml = |name: &str, security: &str| {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s-{name}\ndata:\n  token: czNjcmV0\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  nodeName: edge-1\n{security}  volumes:\n  - name: sec\n    secret:\n      secretName: s-{name}\n  containers:\n  - name: main\n    image: busybox\n    command: [\"/bin/sh\", \"-c\", {probe:?}]\n    volumeMounts:\n    - name: sec\n      mountPath: sec\n"
        )
    };
    let apply = |y: &str| {
        ok(
            kubectl(
                &cloud.kubeconfig(),
                &tmp.path().join("kc"),
                &["apply", "-f", "-"],
                Some(y),
            ),
            "kubectl apply",
        )
    };
    apply(&yaml("plain", ""));
    apply(&yaml(
        "chosen",
        "  securityContext:\n    runAsUser: 1234\n    runAsGroup: 2345\n",
    ));
    let logs = |name: &str| String::from_utf8_lossy(&cloud.k(&["logs", name]).stdout).into_owned();
    for (name, uid, gid) in [("plain", "65534", "65534"), ("chosen", "1234", "2345")] {
        wait_for(&format!("{name}'s report"), Duration::from_secs(60), || {
            logs(name).contains("home-writable")
        });
        let out = logs(name);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            [
                uid,
                gid,
                "key-denied",
                "log-denied",
                "logs-denied",
                "s3cret",
                "home-writable"
            ],
            "{name}: {out}"
        );
    }
}
