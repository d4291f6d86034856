//! cloudcore attached to a real Kubernetes cluster, end to end: etcd,
//! kube-apiserver, kube-controller-manager and kube-scheduler built from
//! the Go module proxy (`support/k8s.rs`), a cloudcore with `--kubeconfig`,
//! two real edgecores, and the real kubectl against the cluster. Workloads
//! are made by the cluster's own controllers and placed by its scheduler;
//! cloudcore is SIGKILLed while the cluster changes, and the edges are cut
//! off for longer than the cluster's unreachable toleration.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/devices.rs"]
mod devices;
#[path = "support/k8s.rs"]
mod k8s;
#[path = "../../cloud/tests/support/kubectl.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cluster::*;
use devices::ModbusDevice;
use k8s::{ControlPlane, K8sOptions};
use serde_json::Value;

const NODES: [&str; 2] = ["edge-a", "edge-b"];

fn deployment(replicas: u32, color: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: web}}
  template:
    metadata:
      labels: {{app: web}}
    spec:
      nodeSelector:
        node-role.kubernetes.io/edge: ""
      terminationGracePeriodSeconds: 2
      containers:
      - name: main
        image: busybox
        command: ["/bin/sh", "-c", "echo color=$COLOR; exec sleep 3600"]
        env:
        - name: COLOR
          value: {color}
"#
    )
}

/// One pod per edge node; its container exits every second, so each
/// restart is a status change the edge records.
const DAEMONSET: &str = r#"apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: agent
spec:
  selector:
    matchLabels: {app: agent}
  template:
    metadata:
      labels: {app: agent}
    spec:
      nodeSelector:
        node-role.kubernetes.io/edge: ""
      terminationGracePeriodSeconds: 2
      containers:
      - name: main
        image: busybox
        command: ["/bin/sh", "-c", "sleep 1; exit 3"]
"#;

/// A pod for edge-b that opts out of edge autonomy: the control of the
/// partition, evicted by the cluster.
const CONTROL_POD: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: control
  labels: {app: control}
  annotations: {keel.io/autonomy: "off"}
spec:
  nodeName: edge-b
  terminationGracePeriodSeconds: 2
  containers:
  - name: main
    image: busybox
    command: ["/bin/sh", "-c", "exec sleep 3600"]
"#;

/// The API server refuses every status update of pods labelled
/// `keel-test/reject-status` (a ValidatingAdmissionPolicy, CEL).
const REJECT_POLICY: &str = r#"apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata:
  name: reject-status
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
    - apiGroups: [""]
      apiVersions: ["v1"]
      operations: ["UPDATE"]
      resources: ["pods/status"]
  validations:
  - expression: "!has(object.metadata.labels) || !('keel-test/reject-status' in object.metadata.labels)"
    message: "status updates of this pod are refused by policy"
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata:
  name: reject-status
spec:
  policyName: reject-status
  validationActions: [Deny]
"#;

fn pods(k8s: &ControlPlane, selector: &str) -> Vec<Value> {
    let out = k8s.kubectl_ok(&["get", "pods", "-l", selector, "-o", "json"]);
    let list: Value = serde_json::from_str(&out).unwrap();
    list["items"].as_array().cloned().unwrap_or_default()
}

fn running_ready(p: &Value) -> bool {
    p["status"]["phase"] == "Running"
        && p["metadata"]["deletionTimestamp"].is_null()
        && p["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

fn pid_of(p: &Value) -> Option<i32> {
    p["status"]["containerStatuses"][0]["containerID"]
        .as_str()?
        .strip_prefix("process://")?
        .parse()
        .ok()
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

fn node_ready(k8s: &ControlPlane, node: &str) -> Option<String> {
    let out = k8s.kubectl(&["get", "node", node, "-o", "json"]);
    if !out.status.success() {
        return None;
    }
    let n: Value = serde_json::from_slice(&out.stdout).unwrap();
    n["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")
        .and_then(|c| c["status"].as_str().map(str::to_owned))
}

fn restarts(p: &Value) -> u64 {
    p["status"]["containerStatuses"][0]["restartCount"]
        .as_u64()
        .unwrap_or(0)
}

/// Every pod of `selector` on the edges' own APIs: name → pod.
fn edge_pods(edges: &[Edge], selector: &str) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for e in edges {
        let o = e.k(&["get", "pods", "-l", selector, "-o", "json"]);
        if !o.status.success() {
            continue;
        }
        let list: Value = serde_json::from_slice(&o.stdout).unwrap();
        for p in list["items"].as_array().cloned().unwrap_or_default() {
            out.insert(p["metadata"]["name"].as_str().unwrap().to_owned(), p);
        }
    }
    out
}

fn rollout(k8s: &ControlPlane, what: &str) {
    let out = k8s.kubectl(&["rollout", "status", what, "--timeout=180s"]);
    assert!(
        out.status.success(),
        "rollout of {what}: {}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        k8s.kubectl_ok(&["get", "pods", "-o", "wide"])
    );
}

/// `kubectl get pods --watch` of the DaemonSet's pods, as JSON lines.
fn watch_pods(k8s: &ControlPlane, selector: &str, out: &Path) -> Child {
    Command::new(support::kubectl_bin())
        .arg("--kubeconfig")
        .arg(k8s.admin_kubeconfig())
        .args(["get", "pods", "-l", selector, "--watch", "-o", "json"])
        .stdout(std::fs::File::create(out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Pod objects in a `kubectl --watch -o json` output (one JSON document
/// after another).
fn watched(out: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(out).unwrap();
    serde_json::Deserializer::from_str(&text)
        .into_iter::<Value>()
        .filter_map(Result::ok)
        .collect()
}

/// `kubectl logs`, `exec` and `port-forward` against the API server, for
/// edge pods: the API server calls the kubelet API at the Node's address,
/// which is cloudcore's stream server, and cloudcore goes on through the
/// node's own connection. Who may use that server is the API server's
/// decision (`nodes/proxy`).
fn streams_through_the_api_server(k8s: &ControlPlane, www: &Path, pod: &Value) {
    let name = pod["metadata"]["name"].as_str().unwrap();
    let node: Value =
        serde_json::from_str(&k8s.kubectl_ok(&["get", "node", "edge-a", "-o", "json"])).unwrap();
    assert_eq!(
        node["status"]["addresses"],
        serde_json::json!([{"type": "InternalIP", "address": "127.0.0.1"}]),
        "{node}"
    );
    let own: Value = serde_json::from_str(
        node["metadata"]["annotations"]["node.keel.io/edge-addresses"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert!(own.as_array().is_some_and(|a| !a.is_empty()), "{own}");
    let port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
        .as_u64()
        .unwrap();

    let logs = k8s.kubectl_ok(&["logs", name]);
    assert_eq!(logs, "color=red\n");
    let stamped = k8s.kubectl_ok(&["logs", name, "--timestamps"]);
    assert!(stamped.ends_with("Z color=red\n"), "{stamped}");
    let o = k8s.kubectl(&[
        "exec",
        name,
        "--",
        "sh",
        "-c",
        "echo $HOSTNAME; echo oops >&2; exit 3",
    ]);
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), format!("{name}\n"));
    assert!(String::from_utf8_lossy(&o.stderr).contains("oops"), "{o:?}");
    let o = kubectl(
        k8s.admin_kubeconfig(),
        &k8s.dir().join("kube-cache"),
        &["exec", "-i", name, "--", "tr", "a-z", "A-Z"],
        Some("through the api server\n"),
    );
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "THROUGH THE API SERVER\n"
    );
    let o = k8s.kubectl(&["exec", name, "--", "no-such-binary"]);
    assert!(!o.status.success(), "{o:?}");

    // port-forward to an HTTP server in an edge pod.
    std::fs::create_dir_all(www).unwrap();
    std::fs::write(www.join("hello.txt"), "hello from the edge\n").unwrap();
    let http_port = free_port();
    k8s.apply_yaml(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: http\nspec:\n  nodeName: edge-a\n  containers:\n  - name: main\n    image: python\n    command: [\"python3\", \"-m\", \"http.server\", \"{http_port}\", \"--bind\", \"127.0.0.1\", \"--directory\", {:?}]\n    readinessProbe:\n      tcpSocket:\n        port: {http_port}\n      periodSeconds: 1\n",
        www.display().to_string()
    ));
    wait_for("the http pod Ready", Duration::from_secs(60), || {
        k8s.kubectl(&[
            "get",
            "pod",
            "http",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ])
        .stdout
            == b"True"
    });
    let mut forward = Command::new(support::kubectl_bin())
        .arg("--kubeconfig")
        .arg(k8s.admin_kubeconfig())
        .arg("--cache-dir")
        .arg(k8s.dir().join("kube-cache"))
        .args(["port-forward", "pod/http", &format!(":{http_port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(forward.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut out, &mut first).unwrap();
    let local: u16 = first
        .strip_prefix("Forwarding from 127.0.0.1:")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("kubectl port-forward said {first:?}"));
    let answer = {
        use std::io::{Read as _, Write as _};
        let mut c = std::net::TcpStream::connect(("127.0.0.1", local)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        c.write_all(b"GET /hello.txt HTTP/1.0\r\nHost: pod\r\n\r\n")
            .unwrap();
        let mut a = String::new();
        c.read_to_string(&mut a).unwrap();
        a
    };
    let _ = forward.kill();
    let _ = forward.wait();
    assert!(answer.contains("hello from the edge"), "{answer}");
    k8s.kubectl_ok(&["delete", "pod", "http", "--wait=false"]);

    // The stream server asks the API server who may use it: a certificate
    // of the cluster's CA without `nodes/proxy` is refused; no
    // certificate, no connection.
    let (cert, key) = k8s.client_cert("someone", &[]);
    let (crt, keyf) = (k8s.dir().join("someone.crt"), k8s.dir().join("someone.key"));
    std::fs::write(&crt, cert).unwrap();
    std::fs::write(&keyf, key).unwrap();
    let url = format!("https://127.0.0.1:{port}/containerLogs/default/{name}/main");
    let o = Command::new("curl")
        .args(["-sk", "--cert"])
        .arg(&crt)
        .arg("--key")
        .arg(&keyf)
        .arg(&url)
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&o.stdout);
    assert!(
        body.contains("Forbidden") && body.contains("someone") && body.contains("nodes/proxy"),
        "{body}"
    );
    let o = Command::new("curl").args(["-sk", &url]).output().unwrap();
    assert!(!o.status.success(), "{o:?}");
}

#[test]
fn workloads_devices_and_outages_on_a_real_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    eprintln!("state and logs in {}", tmp.path().display());
    let mut k8s = ControlPlane::start(K8sOptions {
        unreachable_toleration_secs: 4,
        // Above cloudcore's lease renewal (every 10 s), as Kubernetes
        // requires of a node agent.
        node_monitor_grace_secs: 25,
        ..K8sOptions::default()
    });
    let kubeconfig = k8s.admin_kubeconfig().to_owned();

    // Bad input first: a kubeconfig whose server cannot be reached, and one
    // the API server does not accept, both stop cloudcore with a message
    // naming the server.
    let bad = tmp.path().join("unreachable.kubeconfig");
    let text = std::fs::read_to_string(&kubeconfig).unwrap();
    let server = k8s.server();
    std::fs::write(&bad, text.replace(&server, "https://127.0.0.1:9")).unwrap();
    // cloudcore on a bad kubeconfig: (exited with success, stderr).
    let attach_with = |kubeconfig: &Path| {
        let out = Command::new(cloudcore_bin())
            .args(["run", "--no-grpc", "--data-dir"])
            .arg(tmp.path().join("bad-cloud"))
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok_exit, err) = attach_with(&bad);
    assert!(!ok_exit);
    assert!(
        err.contains("cannot reach the Kubernetes API server at https://127.0.0.1:9"),
        "{err}"
    );
    let stranger = k8s.client_kubeconfig("stranger", "stranger", &[]);
    let (ok_exit, err) = attach_with(&stranger);
    assert!(!ok_exit);
    assert!(
        err.contains(&format!("the Kubernetes API server at {server}"))
            && err.contains("refused cloudcore's credentials"),
        "{err}"
    );

    // cloudcore attached; two edge nodes join and become Nodes.
    let cloud_dir = tmp.path().join("cloud");
    let mut cloud = Cloud::start_attached(&cloud_dir, &kubeconfig, None, None, None);
    let (hub, bootstrap, webhook) = (
        cloud.hub.clone(),
        cloud.bootstrap.clone(),
        cloud.api.clone(),
    );
    let edges: Vec<Edge> = NODES
        .iter()
        .map(|n| Edge::start(&tmp.path().join(n), n, &cloud, Some(cloud.token(n)), None))
        .collect();
    wait_for(
        "edge Nodes Ready on the cluster",
        Duration::from_secs(60),
        || {
            NODES
                .iter()
                .all(|n| node_ready(&k8s, n).as_deref() == Some("True"))
        },
    );
    let nodes = k8s.kubectl_ok(&[
        "get",
        "nodes",
        "-l",
        "node-role.kubernetes.io/edge",
        "-o",
        "json",
    ]);
    let nodes: Value = serde_json::from_str(&nodes).unwrap();
    for n in nodes["items"].as_array().unwrap() {
        assert!(n["status"]["allocatable"]["pods"].is_string(), "{n}");
        assert!(n["status"]["nodeInfo"].is_object(), "{n}");
        assert!(n["status"]["addresses"].is_array(), "{n}");
    }
    let lease = k8s.kubectl_ok(&[
        "get",
        "lease",
        "-n",
        "kube-node-lease",
        "edge-a",
        "-o",
        "json",
    ]);
    assert!(lease.contains("renewTime"), "{lease}");

    // A Deployment and a DaemonSet, made by the cluster's controllers and
    // placed by its scheduler, run on the edges.
    k8s.apply_yaml(&deployment(3, "red"));
    k8s.apply_yaml(DAEMONSET);
    rollout(&k8s, "deployment/web");
    let web = pods(&k8s, "app=web");
    assert_eq!(web.len(), 3);
    for p in &web {
        assert!(running_ready(p), "{p}");
        assert!(
            NODES.contains(&p["spec"]["nodeName"].as_str().unwrap()),
            "{p}"
        );
        let tol = p["spec"]["tolerations"].as_array().unwrap();
        assert!(
            tol.iter()
                .any(|t| t["key"] == "node.kubernetes.io/unreachable"
                    && t.get("tolerationSeconds").is_none()),
            "the autonomy webhook's toleration: {p}"
        );
    }
    let wide = k8s.kubectl_ok(&["get", "pods", "-o", "wide"]);
    assert!(
        wide.contains("Running") && wide.contains("edge-a"),
        "{wide}"
    );
    wait_for(
        "the DaemonSet on both nodes",
        Duration::from_secs(60),
        || {
            let agents = pods(&k8s, "app=agent");
            agents.len() == 2
                && NODES.iter().all(|n| {
                    agents
                        .iter()
                        .any(|p| p["spec"]["nodeName"] == *n && restarts(p) >= 1)
                })
        },
    );
    // The edges hold exactly what is bound to them.
    let on_edges = edge_pods(&edges, "app=web");
    assert_eq!(on_edges.len(), 3, "{on_edges:?}");
    for (i, e) in edges.iter().enumerate() {
        let mine = edge_pods(std::slice::from_ref(e), "app in (web, agent)");
        assert!(
            mine.values().all(|p| p["spec"]["nodeName"] == NODES[i]),
            "{} holds another node's pod",
            NODES[i]
        );
    }

    streams_through_the_api_server(&k8s, &tmp.path().join("www"), &web[0]);

    // Scale to 5; a rolling update (changed env) replaces every pod.
    k8s.kubectl_ok(&["scale", "deployment/web", "--replicas=5"]);
    rollout(&k8s, "deployment/web");
    assert_eq!(
        pods(&k8s, "app=web")
            .iter()
            .filter(|p| running_ready(p))
            .count(),
        5
    );
    let old_uids: BTreeSet<String> = pods(&k8s, "app=web")
        .iter()
        .map(|p| p["metadata"]["uid"].as_str().unwrap().to_owned())
        .collect();
    k8s.apply_yaml(&deployment(5, "blue"));
    rollout(&k8s, "deployment/web");
    wait_for("only blue pods", Duration::from_secs(60), || {
        let web = pods(&k8s, "app=web");
        web.len() == 5
            && web.iter().all(|p| {
                running_ready(p)
                    && !old_uids.contains(p["metadata"]["uid"].as_str().unwrap())
                    && p["spec"]["containers"][0]["env"][0]["value"] == "blue"
            })
    });
    wait_for(
        "the edges run only the new pods",
        Duration::from_secs(60),
        || {
            let on = edge_pods(&edges, "app=web");
            on.len() == 5
                && on.values().all(|p| {
                    p["spec"]["containers"][0]["env"][0]["value"] == "blue"
                        && p["status"]["phase"] == "Running"
                })
        },
    );

    // A status the API server refuses is logged, and the node's stream
    // goes on (the other pods' statuses still arrive).
    k8s.apply_yaml(REJECT_POLICY);
    k8s.apply_yaml(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: probe\n  labels: {keel-test/reject-status: \"yes\"}\nspec:\n  nodeSelector: {keel-test/nowhere: \"yes\"}\n  containers:\n  - name: main\n    image: busybox\n",
    );
    wait_for("the policy in force", Duration::from_secs(30), || {
        !k8s.kubectl(&[
            "patch",
            "pod",
            "probe",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"message":"probe"}}"#,
        ])
        .status
        .success()
    });
    k8s.apply_yaml(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: refused\n  labels: {keel-test/reject-status: \"yes\"}\nspec:\n  nodeName: edge-a\n  containers:\n  - name: main\n    image: busybox\n    command: [\"/bin/sh\", \"-c\", \"exec sleep 3600\"]\n",
    );
    wait_for(
        "the refusal in cloudcore's log",
        Duration::from_secs(60),
        || {
            let log = std::fs::read_to_string(cloud_dir.with_extension("log")).unwrap_or_default();
            log.lines()
                .any(|l| l.contains("rejected a status") && l.contains("pods/default/refused"))
        },
    );
    assert!(
        edges[0]
            .pod("refused")
            .is_some_and(|p| p["status"]["phase"] == "Running"),
        "the refused pod still runs on its edge"
    );

    // cloudcore SIGKILLed; meanwhile the cluster scales the Deployment and
    // restarts it, and the edges keep recording the agents' restarts.
    let watch_out = tmp.path().join("agents.watch");
    let mut watch = watch_pods(&k8s, "app=agent", &watch_out);
    let agents_before: BTreeMap<String, u64> = pods(&k8s, "app=agent")
        .iter()
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap().to_owned(),
                restarts(p),
            )
        })
        .collect();
    cloud.proc.kill9();
    k8s.kubectl_ok(&["scale", "deployment/web", "--replicas=4"]);
    k8s.kubectl_ok(&["rollout", "restart", "deployment/web"]);
    let mut during: BTreeMap<String, u64> = BTreeMap::new();
    wait_for(
        "restarts recorded on the edges during the outage",
        Duration::from_secs(120),
        || {
            during = edge_pods(&edges, "app=agent")
                .iter()
                .map(|(n, p)| (n.clone(), restarts(p)))
                .collect();
            during.len() == agents_before.len()
                && during
                    .iter()
                    .all(|(name, n)| *n > agents_before.get(name).copied().unwrap_or(u64::MAX))
        },
    );
    let _cloud = Cloud::start_attached(
        &cloud_dir,
        &kubeconfig,
        Some(hub),
        Some(bootstrap),
        Some(webhook),
    );
    rollout(&k8s, "deployment/web");
    wait_for(
        "the edges converge on 4 web pods",
        Duration::from_secs(90),
        || {
            let on = edge_pods(&edges, "app=web");
            let cluster = pods(&k8s, "app=web");
            on.len() == 4
                && cluster.len() == 4
                && cluster.iter().all(|p| {
                    running_ready(p)
                        && on
                            .get(p["metadata"]["name"].as_str().unwrap())
                            .is_some_and(|e| e["status"]["phase"] == "Running")
                })
        },
    );
    // Every restart the edges recorded meanwhile reaches the cluster (the
    // count is cumulative: reaching the edge's count means none was lost),
    // and the cluster's watch saw each pod's counts in order.
    wait_for(
        "the outage's restarts on the cluster",
        Duration::from_secs(60),
        || {
            let cluster = pods(&k8s, "app=agent");
            during.iter().all(|(name, n)| {
                cluster
                    .iter()
                    .any(|p| p["metadata"]["name"] == name.as_str() && restarts(p) >= *n)
            })
        },
    );
    let _ = watch.kill();
    let _ = watch.wait();
    let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for p in watched(&watch_out) {
        seen.entry(
            p["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )
        .or_default()
        .push(restarts(&p));
    }
    for (name, counts) in &seen {
        assert!(
            counts.windows(2).all(|w| w[0] <= w[1]),
            "restart counts of {name} went back on the cluster: {counts:?}"
        );
    }
    for name in during.keys() {
        assert!(
            seen.get(name).is_some_and(|c| c.len() >= 2),
            "{name}: {seen:?}"
        );
    }
    // Pods created while cloudcore was down (no webhook) got their
    // unlimited tolerations when it came back.
    wait_for(
        "outage tolerations on every web pod",
        Duration::from_secs(30),
        || {
            pods(&k8s, "app=web").iter().all(|p| {
                p["spec"]["tolerations"].as_array().is_some_and(|ts| {
                    ts.iter().any(|t| {
                        t["key"] == "node.kubernetes.io/unreachable"
                            && t.get("tolerationSeconds").is_none()
                    })
                })
            })
        },
    );

    // Devices: KubeEdge YAML applied to the cluster; a reading from a real
    // Modbus device reaches the Device's status there, and a desired value
    // set there reaches the register.
    let mut modbus = ModbusDevice::start(free_port(), 200);
    modbus.set("ir", 0, 215);
    let yaml = include_str!("../../examples/devices/thermostat.yaml")
        .replace("port: 5020", &format!("port: {}", modbus.port))
        .replace("nodeName: edge-1", "nodeName: edge-a");
    wait_for("the device CRD served", Duration::from_secs(30), || {
        k8s.kubectl(&["get", "devices"]).status.success()
    });
    k8s.apply_yaml(&yaml);
    let device = |k8s: &ControlPlane| -> Value {
        serde_json::from_str(&k8s.kubectl_ok(&["get", "device", "thermostat", "-o", "json"]))
            .unwrap()
    };
    let reported = |d: &Value, prop: &str| -> Option<String> {
        d["status"]["twins"]
            .as_array()?
            .iter()
            .find(|t| t["propertyName"] == prop)?["reported"]["value"]
            .as_str()
            .map(str::to_owned)
    };
    wait_for(
        "a Modbus reading on the cluster",
        Duration::from_secs(60),
        || {
            let d = device(&k8s);
            reported(&d, "temperature").as_deref() == Some("21.5")
                && d["status"]["state"] == "online"
        },
    );
    k8s.kubectl_ok(&[
        "patch",
        "device",
        "thermostat",
        "--type=json",
        "-p",
        r#"[{"op": "replace", "path": "/spec/properties/2/desired/value", "value": "25"}]"#,
    ]);
    wait_for(
        "setpoint 25 in the register",
        Duration::from_secs(30),
        || modbus.get("hr", 0) == 25,
    );
    wait_for(
        "setpoint 25 reported on the cluster",
        Duration::from_secs(30),
        || reported(&device(&k8s), "setpoint").as_deref() == Some("25"),
    );

    // Partition: edge-b cut off (its edgecore frozen with SIGSTOP; its
    // pods, processes of their own, run on) for longer than the cluster's
    // unreachable toleration. When its QUIC connection times out, the node
    // goes unreachable and is tainted NoExecute; the control pod (opted out
    // of autonomy) is evicted; the edge pods are not: same pods, same UIDs,
    // processes alive. (Only one node of two: with every node of a zone
    // unreachable, Kubernetes evicts nothing at all.)
    k8s.apply_yaml(CONTROL_POD);
    wait_for("the control pod running", Duration::from_secs(60), || {
        pods(&k8s, "app=control").first().is_some_and(running_ready)
    });
    // edge-b's pods on the cluster: name → UID.
    let on_b = |k8s: &ControlPlane| -> BTreeMap<String, String> {
        pods(k8s, "app in (web, agent)")
            .iter()
            .filter(|p| p["spec"]["nodeName"] == "edge-b")
            .map(|p| {
                (
                    p["metadata"]["name"].as_str().unwrap().to_owned(),
                    p["metadata"]["uid"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let before = on_b(&k8s);
    let web_pids: Vec<i32> = edge_pods(std::slice::from_ref(&edges[1]), "app=web")
        .values()
        .filter_map(pid_of)
        .collect();
    assert!(!web_pids.is_empty());
    assert!(before.len() >= 2, "{before:?}");
    signal(edges[1].proc.0.as_ref().unwrap(), "-STOP");
    wait_for(
        "edge-b tainted unreachable",
        Duration::from_secs(180),
        || {
            let out = k8s.kubectl_ok(&["get", "node", "edge-b", "-o", "jsonpath={.spec.taints}"]);
            out.contains("node.kubernetes.io/unreachable") && out.contains("NoExecute")
        },
    );
    wait_for("the control pod evicted", Duration::from_secs(60), || {
        pods(&k8s, "app=control")
            .first()
            .is_none_or(|p| !p["metadata"]["deletionTimestamp"].is_null())
    });
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(
        on_b(&k8s),
        before,
        "edge-b's pods on the cluster after the toleration"
    );
    for p in pods(&k8s, "app in (web, agent)") {
        assert!(
            p["metadata"]["deletionTimestamp"].is_null(),
            "being evicted: {p}"
        );
    }
    for pid in &web_pids {
        assert!(alive(*pid), "a web process on edge-b died");
    }
    signal(edges[1].proc.0.as_ref().unwrap(), "-CONT");
    wait_for("edge-b Ready again", Duration::from_secs(120), || {
        node_ready(&k8s, "edge-b").as_deref() == Some("True")
    });
    assert_eq!(
        on_b(&k8s),
        before,
        "the same pods, same UIDs, after the partition"
    );
    rollout(&k8s, "deployment/web");
    wait_for("the control pod gone", Duration::from_secs(60), || {
        pods(&k8s, "app=control").is_empty()
    });

    // kubectl delete stops the processes on the edges.
    let pids: Vec<i32> = edge_pods(&edges, "app=web")
        .values()
        .filter_map(pid_of)
        .collect();
    assert_eq!(pids.len(), 4);
    k8s.kubectl_ok(&["delete", "deployment", "web", "--wait=false"]);
    k8s.kubectl_ok(&["delete", "daemonset", "agent", "--wait=false"]);
    wait_for(
        "the web pods gone everywhere",
        Duration::from_secs(90),
        || {
            pods(&k8s, "app=web").is_empty()
                && edge_pods(&edges, "app=web").is_empty()
                && pids.iter().all(|p| !alive(*p))
        },
    );
    // With no pod left on edge-b, the ConfigMap its pods projected
    // (kube-root-ca.crt) leaves it too; edge-a still runs a pod using it.
    wait_for(
        "kube-root-ca.crt gone from edge-b",
        Duration::from_secs(60),
        || {
            edge_pods(
                std::slice::from_ref(&edges[1]),
                "app in (web, agent, control)",
            )
            .is_empty()
                && !edges[1]
                    .k(&["get", "configmap", "kube-root-ca.crt"])
                    .status
                    .success()
        },
    );
    assert!(
        edges[0]
            .k(&["get", "configmap", "kube-root-ca.crt"])
            .status
            .success(),
        "edge-a's remaining pod still has its ConfigMap"
    );
    assert!(k8s.alive("kube-apiserver"));
}
