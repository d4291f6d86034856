//! The real Kubernetes control plane the attached-mode tests run against
//! (etcd, kube-apiserver, kube-controller-manager, kube-scheduler; see
//! `support/k8s.rs`): it starts, serves the admin, and its controllers and
//! scheduler act on a Deployment.
//!
//! The binaries come from `KEEL_K8S_BIN` or `./dev k8s-peers` (built once,
//! then cached).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/k8s.rs"]
mod k8s;
#[path = "../../cloud/tests/support/kubectl.rs"]
mod support;

use std::time::{Duration, Instant};

use cluster::wait_for;
use k8s::{ControlPlane, K8sOptions};
use serde_json::Value;

const DEPLOYMENT: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: smoke
  namespace: default
spec:
  replicas: 2
  selector:
    matchLabels:
      app: smoke
  template:
    metadata:
      labels:
        app: smoke
    spec:
      nodeSelector:
        node-role.kubernetes.io/edge: ""
      containers:
      - name: main
        image: busybox
        command: ["sleep", "3600"]
"#;

fn items(cp: &ControlPlane, args: &[&str]) -> Vec<Value> {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let list: Value = serde_json::from_str(&cp.kubectl_ok(&all)).unwrap();
    list["items"].as_array().cloned().unwrap_or_default()
}

fn unschedulable(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "PodScheduled" && c["status"] == "False")
}

#[test]
fn control_plane_starts_and_its_controllers_and_scheduler_work() {
    let t = Instant::now();
    let cp = ControlPlane::start(K8sOptions::default());
    eprintln!("Kubernetes control plane started in {:.1?}", t.elapsed());
    assert!(cp.server().starts_with("https://127.0.0.1:"));
    assert!(cp.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(cp.admin_kubeconfig().is_file());

    assert_eq!(cp.kubectl_ok(&["get", "--raw", "/readyz"]).trim(), "ok");
    assert_eq!(cp.kubectl_ok(&["auth", "can-i", "*", "*"]).trim(), "yes");
    assert_eq!(
        cp.kubectl_ok(&[
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}"
        ])
        .trim(),
        "keel-test-admin"
    );

    // The service-account and root-CA publisher controllers.
    let limit = Duration::from_secs(60);
    wait_for("the default ServiceAccount", limit, || {
        cp.kubectl(&["get", "serviceaccount", "default", "-n", "default"])
            .status
            .success()
    });
    wait_for("the kube-root-ca.crt ConfigMap", limit, || {
        cp.kubectl(&["get", "configmap", "kube-root-ca.crt", "-n", "default"])
            .status
            .success()
    });
    let ca = cp.kubectl_ok(&[
        "get",
        "configmap",
        "kube-root-ca.crt",
        "-n",
        "default",
        "-o",
        "jsonpath={.data.ca\\.crt}",
    ]);
    assert_eq!(ca.trim(), cp.ca_pem().trim());

    // The deployment and replicaset controllers.
    cp.apply_yaml(DEPLOYMENT);
    let t = Instant::now();
    wait_for("the Deployment's ReplicaSet and 2 Pods", limit, || {
        items(
            &cp,
            &["get", "replicasets", "-n", "default", "-l", "app=smoke"],
        )
        .len()
            == 1
            && items(&cp, &["get", "pods", "-n", "default", "-l", "app=smoke"]).len() == 2
    });
    let rs = items(
        &cp,
        &["get", "replicasets", "-n", "default", "-l", "app=smoke"],
    );
    assert_eq!(
        rs[0]["metadata"]["ownerReferences"][0]["kind"],
        "Deployment"
    );
    assert_eq!(rs[0]["metadata"]["ownerReferences"][0]["name"], "smoke");
    eprintln!("ReplicaSet and Pods created in {:.1?}", t.elapsed());

    // The scheduler: no node matches (there are none), so each pod gets
    // PodScheduled=False and a FailedScheduling event.
    let t = Instant::now();
    wait_for("both Pods marked unschedulable", limit, || {
        let pods = items(&cp, &["get", "pods", "-n", "default", "-l", "app=smoke"]);
        let events = items(
            &cp,
            &[
                "get",
                "events",
                "-n",
                "default",
                "--field-selector",
                "reason=FailedScheduling",
            ],
        );
        pods.len() == 2
            && pods.iter().all(|p| {
                let name = &p["metadata"]["name"];
                unschedulable(p) || events.iter().any(|e| e["involvedObject"]["name"] == *name)
            })
    });
    eprintln!("Pods marked unschedulable in {:.1?}", t.elapsed());
    for p in items(&cp, &["get", "pods", "-n", "default", "-l", "app=smoke"]) {
        assert!(p["spec"]["nodeName"].is_null(), "{p}");
        assert_eq!(p["status"]["phase"], "Pending", "{p}");
    }
}
